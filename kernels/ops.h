/* ops.h - the backend-neutral op table (L0).
 *
 * The model forward (runtime/model/forward.c) is written once against this table; a backend supplies
 * the memory functions and the ops. All activations are fp32 in backend memory; weight matrices are
 * views of F32/F16/BF16 data in backend memory; norm weights and biases are fp32 arrays in backend
 * memory. The CPU backend (kernels/cpu) is the reference and is always built; the CUDA backend
 * (kernels/cuda) is built when nvcc is found and chosen at run time when a GPU is present.
 *
 * KV cache layout (the contract between kv/ and the attention kernels): the pool is an array of blocks
 * of KVM_KV_BLOCK tokens; block b holds, for each layer l, K then V, each [n_kv_heads][KVM_KV_BLOCK][head_dim]:
 *   elem(b, l, kv, h, t, d) = ((((b * L + l) * 2 + kv) * H + h) * KVM_KV_BLOCK + t) * D + d
 * Keys are stored post-RoPE (post QK-norm for Qwen3) in the frame of their absolute position. */
#ifndef KVM_OPS_H
#define KVM_OPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <kvmesh_lab.h> /* the CUDA backend's settings and profiling hooks */

#define KVM_KV_BLOCK 16

typedef enum kvm_dtype { KVM_F32 = 0, KVM_F16 = 1, KVM_BF16 = 2 } kvm_dtype_t;
size_t kvm_dtype_size(kvm_dtype_t t);
const char *kvm_dtype_name(kvm_dtype_t t);
/* The dtype named "f32", "f16" or "bf16" into *out; KVM_EINVAL naming `setting` and the accepted values
 * otherwise ("kv_dtype: 'bf61' is not one of f32, f16, bf16"). */
int kvm_dtype_parse(const char *name, const char *setting, kvm_dtype_t *out);
/* 0 if t is a kvm_dtype_t; KVM_EINVAL naming `setting` otherwise. */
int kvm_dtype_check(kvm_dtype_t t, const char *setting);

typedef enum kvm_rope_layout {
    KVM_ROPE_HALF = 0,        /* rotate-half (HF, Llama-3, Qwen): pair j = (x[j], x[j + D/2]) */
    KVM_ROPE_INTERLEAVED = 1, /* llama2.c / Meta original: pair j = (x[2j], x[2j+1]) */
} kvm_rope_layout_t;

/* A weight matrix W[rows = out][cols = in], row-major, in backend memory. */
typedef struct kvm_wmat {
    const void *data;
    kvm_dtype_t dtype;
    int rows, cols;
} kvm_wmat_t;

/* Describes one forward step over several sequences (rows of q are grouped by sequence). */
typedef struct kvm_attn_batch {
    int n_seqs;
    const int32_t *row_start;   /* [n_seqs + 1] first row of each sequence in q/out (backend memory) */
    const int32_t *ctx_len;     /* [n_seqs] tokens in the cache after this step's append (backend memory) */
    const int32_t *block_table; /* [n_seqs][max_blocks] block ids (backend memory) */
    int max_blocks;
    int total_rows;
    /* host copies of the above, for backends that plan on the host */
    const int32_t *h_row_start, *h_ctx_len, *h_block_table;
    /* [total_rows] the position of every row (backend memory, and its host copy), strictly increasing within a
     * sequence and < its ctx_len; NULL = the rows of a sequence are its last ones: ctx_len - n + j. A row writes
     * its K/V at its position and attends to positions [0, its position]. Positions let one sequence recompute
     * scattered rows in place (kvm_batch_item_t.positions). */
    const int32_t *q_pos, *h_q_pos;
} kvm_attn_batch_t;

typedef struct kvm_kv_geom {
    int n_layers, n_kv_heads, head_dim;
    kvm_dtype_t dtype; /* storage dtype of the pool */
} kvm_kv_geom_t;

struct kvm_kvcomm_dist_args;  /* KVCOMM op arguments, defined after the table */
struct kvm_kvcomm_apply_args;
struct kvm_kvcomm_spread_args;
struct kvm_kvcomm_diff_args;
struct kvm_c2c_gather_args;   /* C2C op arguments, defined after the table */
struct kvm_c2c_residual_args;

typedef struct kvm_ops {
    const char *name; /* "cpu" or "cuda" */

    /* memory in this backend; alloc returns NULL on failure (message set) */
    void *(*alloc)(size_t bytes);
    void (*free)(void *p);
    /* optional: alloc whose memory reads as zero without being written (a fresh mapping: a page costs nothing
     * until it is used), released with free; NULL: alloc + memset0 */
    void *(*alloc_zeroed)(size_t bytes);
    int (*h2d)(void *dst, const void *src, size_t bytes);
    int (*d2h)(void *dst, const void *src, size_t bytes);
    int (*d2d)(void *dst, const void *src, size_t bytes);
    int (*memset0)(void *dst, size_t bytes);
    int (*sync)(void);

    /* out[n][dim] = table[ids[n]][:] (table in dtype) */
    void (*embed)(float *out, const void *table, kvm_dtype_t dtype, const int32_t *ids, int n, int dim);
    /* out[n][dim] = x / rms(x) * w  (out may equal x) */
    void (*rmsnorm)(float *out, const float *x, const float *w, int n, int dim, float eps);
    /* per-head RMSNorm in place: x[n][heads][hd] (Qwen3 q_norm / k_norm); row stride = heads*hd */
    void (*head_rmsnorm)(float *x, const float *w, int n, int heads, int hd, float eps);
    /* y[n][rows] = x[n][cols] @ W^T (+ bias[rows] if bias) */
    void (*matmul)(float *y, const float *x, const kvm_wmat_t *W, const float *bias, int n);
    /* in place rotation of x[n][heads][hd] by positions pos[n] (backend memory) with table inv_freq[hd/2]
     * (backend memory, the scaled frequencies). Angles are formed in fp64 and reduced to [-pi, pi). */
    void (*rope)(float *x, int n, int heads, int hd, const int32_t *pos, const float *inv_freq, kvm_rope_layout_t layout);
    /* out[i] = silu(gate[i]) * up[i] */
    void (*swiglu)(float *out, const float *gate, const float *up, size_t n);
    /* x[i] += y[i] */
    void (*add)(float *x, const float *y, size_t n);
    /* writes k,v [rows][kvh*hd] of this step into the cache at positions ctx_len - n_new .. ctx_len - 1 */
    void (*kv_write)(void *kv, const kvm_kv_geom_t *g, int layer, const float *k, const float *v, const kvm_attn_batch_t *b);
    /* causal grouped-query attention of q [rows][heads*hd] over the cache (which already holds this step's
     * keys); out [rows][heads*hd]; scale = 1/sqrt(hd) */
    void (*attention)(float *out, const float *q, const void *kv, const kvm_kv_geom_t *g, int layer, int heads,
                      const kvm_attn_batch_t *b, float scale);
    /* rotates the keys of `n` tokens in the cache by delta[i] positions (all layers, K only):
     * tokens are (block ids blk[i], slot t[i]); both layouts. One launch for all layers. */
    void (*rope_shift)(void *kv, const kvm_kv_geom_t *g, const int32_t *blk, const int32_t *slot, const int32_t *delta,
                       int n, const float *inv_freq, kvm_rope_layout_t layout);
    /* index of the max of x[n] (first on ties) */
    int (*argmax)(const float *x, int n);

    /* ---- optional (NULL on backends that lack them; callers fall back to the ops above) ---- */
    /* x[n][dim] += y; out = rmsnorm(x) * w  (one pass; out may not alias x) */
    void (*add_rmsnorm)(float *x, const float *y, float *out, const float *w, int n, int dim, float eps);
    /* out[r] = argmax of x[r][0..n) (first on ties), out in backend memory */
    void (*argmax_rows)(int32_t *out, const float *x, int rows, int n);
    /* fills dst[n] (dtype dt) with the synthetic-weight generator of kernels/synthetic_gen.h */
    int (*fill_synthetic)(void *dst, kvm_dtype_t dt, size_t n, uint64_t seed, float stddev, float mean);
    /* graph capture of everything enqueued between begin and end; launch replays it */
    int (*graph_begin)(void);
    int (*graph_end)(void **graph);
    int (*graph_launch)(void *graph);
    void (*graph_free)(void *graph);
    /* host backends with a thread pool: fn(ctx, i0, i1, tid) over the chunks of [0, n) of at most grain items, on
     * the pool's threads (the contract of kvm_cpu_parallel_for, kernels/cpu/cpu_pool.h: ops called from fn run
     * inline on fn's thread). The forward runs the rows of a decode step in groups through it, each group's
     * whole step on one thread (forward.c, run_step). */
    void (*parallel_for)(int n, int grain, void (*fn)(void *ctx, int i0, int i1, int tid), void *ctx);
    /* optional: for each query row of b at a position >= from_pos, its attention probabilities over the keys
     * [0, position] (softmax of scale * q.k per head, as attention computes them), summed over the heads, are added
     * to mass[key position] (backend memory, fp32, positions < n; the same order of additions on every call, so the
     * sums are reproducible). q, kv, g, layer, heads, b as for attention. The forward calls it after each layer's
     * attention when asked (kvm_forward_attn_mass): kvcomm.recompute_rank and the attention oracles rank rows by
     * it. NULL: the backend cannot (those refuse, naming the backend). */
    void (*attn_mass)(float *mass, int n, int from_pos, const float *q, const void *kv, const kvm_kv_geom_t *g,
                      int layer, int heads, const kvm_attn_batch_t *b, float scale);
    /* device-side timing: an event recorded now in the op stream; elapsed waits for b */
    void *(*event_record)(void);
    float (*event_elapsed_ms)(void *a, void *b);
    void (*event_free)(void *ev);
    /* y[i][n][W[i]->rows] = x[n][cols] @ W[i]^T (+ bias[i] when bias && bias[i]) for count matrices of one
     * width sharing the input (one launch where the backend can) */
    void (*matmul_multi)(int count, float *const *y, const kvm_wmat_t *const *W, const float *const *bias, const float *x,
                         int n);
    /* rope of q [n][hq][hd] and k [n][hk][hd] in one pass (same contract as rope) */
    void (*rope_qk)(float *q, float *k, int n, int hq, int hk, int hd, const int32_t *pos, const float *inv_freq,
                    kvm_rope_layout_t layout);

    /* ---- optional KVCOMM ops (kvcomm.md §3.6, §3.11), the one KVCOMM path of comm/; where one of them (spread
     * included) is NULL, comm/ prepares KVCOMM prompts DENSE.
     * Types and exact contracts are documented with kvm_kvcomm_dist_args_t / kvm_kvcomm_apply_args_t
     * below. Each returns 0 or a negative KVM_E* (KVM_EUNSUPPORTED: shape the backend cannot do, e.g.
     * head_dim % 16 != 0 or more than KVM_KVCOMM_MAX_ANCHORS anchors on CUDA; comm/ checks the head_dim at
     * kvm_comm_create and prepares DENSE where the backend cannot, and caps kvcomm.max_anchors). ---- */
    /* raw distances of a candidate to N anchors (placeholder, text-segment, prediction) */
    int (*kvcomm_dist)(const struct kvm_kvcomm_dist_args *a);
    /* w[n][c] = softmax_n(-d[n][c]) (mode KVM_KVCOMM_SOFTMAX) or one-hot argmin_n d[n][c], ties to the lowest n
     * (mode KVM_KVCOMM_NEAREST), for c < cols, n < N; fp64 internally, fp32 out; w, d in backend memory;
     * w may equal d (in place) */
    int (*kvcomm_softmax)(float *w, const float *d, int n, size_t cols, int mode);
    /* fused offset + RoPE shift + scatter of one piece (placeholder or text segment) into paged KV */
    int (*kvcomm_apply)(const struct kvm_kvcomm_apply_args *a);
    /* rope_qk over the b->total_rows rows (positions pos) followed by kv_write of k, v, in one pass */
    void (*rope_qk_kv_write)(float *q, float *k, const float *v, int hq, int hd, const int32_t *pos, const float *inv_freq,
                             kvm_rope_layout_t layout, void *kv, const kvm_kv_geom_t *g, int layer, const kvm_attn_batch_t *b);
    /* y[n][W->rows] = (silu(gate) * up)[n][W->cols] @ W^T; gate may be overwritten (scratch) */
    void (*swiglu_matmul)(float *y, float *gate, const float *up, const kvm_wmat_t *W, int n);
    /* ---- optional fused blocks of the device forward (NULL on the CPU; the forward falls back) ---- */
    /* the whole MLP: y[n][W_down->rows] = (silu(x @ W_gate^T) * (x @ W_up^T)) @ W_down^T; h1, h2 are
     * [n][W_gate->rows] fp32 buffers the op may overwrite (scratch). y may equal x. Same result as
     * matmul_multi(gate, up) + swiglu_matmul, except that 16-bit paths may round the gate/up products to
     * the weights' 16-bit dtype (as HF bf16 inference does). */
    void (*ffn)(float *y, const float *x, const kvm_wmat_t *w_gate, const kvm_wmat_t *w_up, const kvm_wmat_t *w_down,
                float *h1, float *h2, int n);
    /* add_rmsnorm whose normalized rows are kept only as the backend's 16-bit copy for the next
     * matmul / matmul_multi / ffn whose input is `out` (out's fp32 contents become unspecified). Only for
     * n > 16 rows with 16-bit weights (the prefill GEMM path); the backend fails the step loudly if that
     * next matmul cannot use the copy. */
    void (*add_rmsnorm_16)(float *x, const float *y, float *out, const float *w, int n, int dim, float eps);
    /* q/k/v = x[b->total_rows] @ W^T (+ biases), RoPE of q and k at pos (as rope_qk) and the KV write of k, v
     * (as kv_write) for the step's rows, fused; q, k, v are written as by those ops (16-bit paths may round the
     * products to the weights' dtype before RoPE, as HF bf16 inference does). Returns 0 when done,
     * KVM_EUNSUPPORTED with nothing enqueued when the backend has no fused path for this step (CUDA: batch-1
     * decode and steps of more than 16 rows with 16-bit weights); the caller then runs the separate ops. No
     * per-head norms (Qwen3 callers use the separate ops). */
    int (*qkv_rope_kv)(float *q, float *k, float *v, const float *x, const kvm_wmat_t *wq, const kvm_wmat_t *wk,
                       const kvm_wmat_t *wv, const float *bq, const float *bk, const float *bv, int hq, int hd,
                       const int32_t *pos, const float *inv_freq, kvm_rope_layout_t layout, void *kv,
                       const kvm_kv_geom_t *g, int layer, const kvm_attn_batch_t *b);
    /* x += in @ W^T (W->rows == dim), then as add_rmsnorm_16 into out (out's fp32 contents unspecified
     * afterwards; out may not alias in). Same n / dtype domain as add_rmsnorm_16. */
    void (*matmul_add_rmsnorm_16)(float *x, const float *in, const kvm_wmat_t *W, float *out, const float *w, int n,
                                  int dim, float eps);
    /* x += ffn(in) (as ffn, with scratch h1, h2), then as add_rmsnorm_16 into out (out may equal in). */
    void (*ffn_add_rmsnorm_16)(float *x, const float *in, const kvm_wmat_t *w_gate, const kvm_wmat_t *w_up,
                               const kvm_wmat_t *w_down, float *h1, float *h2, float *out, const float *w, int n, int dim,
                               float eps);
    /* (ours, kvcomm.recompute_frac): the anchors' disagreement per row of a placeholder,
     * contract with kvm_kvcomm_spread_args_t (part of the KVCOMM op set above) */
    int (*kvcomm_spread)(const struct kvm_kvcomm_spread_args *a);
    /* anchor materialization in backend memory (kvcomm.md §3.8: bases and deltas), contract with
     * kvm_kvcomm_diff_args_t (part of the KVCOMM op set above) */
    int (*kvcomm_diff)(const struct kvm_kvcomm_diff_args *a);

    /* ---- C2C ops (docs/c2c.md; ../shared/spec/c2c.md §2.2, §6), used by runtime/comm/c2c.c. Required of a
     * backend that fuses (kvm_c2c_load refuses a backend where one is NULL). Each returns 0 or a negative KVM_E*.
     * Contracts with kvm_c2c_gather_args_t / kvm_c2c_residual_args_t below. ---- */
    /* the fuser's input rows: sharer then receiver K (or V) of n positions, flattened head-major, fp32 */
    int (*c2c_gather)(const struct kvm_c2c_gather_args *a);
    /* x[i] = 0.5 * x[i] * (1 + erf(x[i] / sqrt(2))) in place (exact-erf GELU, fp32) */
    void (*gelu_erf)(float *x, size_t n);
    /* the gated, weighted residual add into the paged cache: fp32, rounded once to the cache dtype */
    int (*c2c_residual)(const struct kvm_c2c_residual_args *a);
} kvm_ops_t;

/* ---- KVCOMM op types ------------------------------------------------------------------------------ */

#define KVM_KVCOMM_MAX_ANCHORS 32 /* most anchors one kvcomm_dist / kvcomm_apply call takes on CUDA */
enum { KVM_KVCOMM_SOFTMAX = 0, KVM_KVCOMM_NEAREST = 1 };
enum { KVM_KVCOMM_WANT_PH = 1, KVM_KVCOMM_WANT_PF = 2, KVM_KVCOMM_WANT_PRED = 4 };

/* A view of KV rows in backend memory, dtype = the geometry's dtype. Element (l, kv, h, r, d), kv 0 = K, 1 = V:
 *   contiguous (blocks == NULL): data[((((l - l0) * 2 + kv) * H + h) * rows + r) * D + d], l in [l0, L)
 *   paged      (blocks != NULL): the KV-cache layout above, position p = start + r, block blocks[p / KVM_KV_BLOCK],
 *              slot p % KVM_KV_BLOCK, all L layers (l0 must be 0); `rows` is unused
 *   q8         (contiguous with scale != NULL): data is int8 in the contiguous layout, and element (l, kv, h, r, d)
 *              is (float)data[i] * scale[i / D] (one fp32 multiply), i the contiguous index above: one scale per
 *              head row (l, kv, h, r). Only the anchor deltas of kvcomm_apply and kvcomm_spread are q8 views.
 * The host layout of comm/ (fp32 [L][2][H][n][D]) is the contiguous view with l0 = 0, rows = n; anchor deltas
 * ([L-1][2][H][n][D], layers 1..L-1) are contiguous with l0 = 1. */
typedef struct kvm_kv_view {
    const void *data;
    const int32_t *blocks; /* backend memory, or NULL */
    int start;             /* paged: position of row 0 */
    int rows;              /* contiguous: row stride of one (l, kv, h) slab */
    int l0;                /* contiguous: first layer stored (0 or 1) */
    const float *scale;    /* q8: backend memory, one scale per head row; NULL = the geometry's dtype */
} kvm_kv_view_t;

/* The q8 encoding of one head row y[0, D) (fp32): s = max_d |y[d]| / 127 (fp32 division), stored as the row's
 * scale; q[d] = y[d] / s (fp32 division) rounded to the nearest integer, ties to even, in [-127, 127]; every q is 0
 * when s is 0 (and a NaN quotient gives 0). Decoding is q * s. Error per element <= s / 2, i.e. <= 1/254 of the
 * row's largest magnitude. */
#define KVM_Q8_MAX 127.0f
/* the encoding of one row on the host (the CPU op's, and what uploads of host rows use) */
void kvm_q8_encode_row(int8_t *q, float *scale, const float *y, int D);
/* bytes of a q8 buffer of `elems` elements in rows of D: the int8 data, padded to 16 bytes, then the fp32 scales */
size_t kvm_q8_bytes(size_t elems, int D);
/* the scales of such a buffer: after its `elems` int8 values, padded to 16 bytes */
static inline size_t kvm_q8_data_bytes(size_t elems) { return (elems + 15) / 16 * 16; }
static inline float *kvm_q8_scales(const void *buf, size_t elems) {
    return (float *)((uintptr_t)buf + kvm_q8_data_bytes(elems));
}

/* kvcomm_dist: distances of the candidate X (rows [0, T)) to anchors A_n (rows [0, T_n), T_n >= T), n < N.
 * Outputs are fp32 in backend memory; each is written only if its bit is in `want` (others may be NULL):
 *   d_ph[kv][n][t]        = (1/(L*H*D)) * sum_{l<L,h,d} |X[l,kv,h,t,d] - A_n[l,kv,h,t,d]|         (head-aligned)
 *   d_pf[kv][n][l][h][d]  = sqrt(sum_{t<T} (X[l,kv,h,t,d] - A'_n[l,kv,h,T_n-T+t,d])^2)          (tail-aligned)
 *                           where A' = A, except that keys (kv 0) are first rotated by -(T_n - T) positions when
 *                           rotate_tail != 0 (F0 frame; angle in fp64 reduced to [-pi, pi), cos/sin rounded to
 *                           fp32, rotation in fp32, not rounded to the storage dtype)
 *   d_pred[n]             = sqrt(sum_{l<L,h,t<T,d} (X[l,1,h,t,d] - A_n[l,1,h,t,d])^2)  (values only, §3.4)
 * Sums accumulate in fp32 or wider. The views are read only. */
typedef struct kvm_kvcomm_dist_args {
    kvm_kv_geom_t g;
    kvm_kv_view_t x;
    int T;
    int n;                      /* anchors */
    const kvm_kv_view_t *a;     /* host array [n] */
    const int *a_rows;          /* host array [n]: T_n */
    int want;                   /* KVM_KVCOMM_WANT_* bits */
    int rotate_tail;
    const float *inv_freq;      /* backend memory [D/2], the model's table */
    kvm_rope_layout_t layout;
    float *d_ph, *d_pf, *d_pred;
} kvm_kvcomm_dist_args_t;

/* kvcomm_apply: for rows r in [r0, r1) of a piece with source `src` (candidate X or text segment P, F0):
 *   y[l,kv,h,r,:] = src[l,kv,h,r,:]                                           l == 0 or n == 0
 *   y[l,kv,h,r,d] = src[l,kv,h,r,d] + sum_{i<N} w_i * delta_i[l,kv,h,r,d]    l >= 1, fp32, in order of i
 *     with (N = n, i = anchor) w_i = w[(kv * N + i) * w_rows + r]    (per_channel == 0: one weight per token)
 *       or w_i = w[(((kv * N + i) * L + l) * H + h) * D + d]     (per_channel != 0: one weight per channel)
 *   then keys (kv 0) are rotated by `shift` positions (same numerics as rope_shift; none when shift == 0),
 *   and y is rounded ONCE to the dtype and stored at position dst_pos + (r - r0) of the block table
 *   dst_blocks of the cache dst_kv (token granular; the blocks must be writable).
 * delta_n views normally have l0 = 1 (layers 1..L-1) and rows >= r1. w is fp32 in backend memory. */
typedef struct kvm_kvcomm_apply_args {
    kvm_kv_geom_t g;
    kvm_kv_view_t src;
    int n;                      /* anchors (0: shift and scatter only) */
    const kvm_kv_view_t *delta; /* host array [n] */
    const float *w;
    int per_channel, w_rows;
    int r0, r1;
    void *dst_kv;
    const int32_t *dst_blocks;  /* backend memory */
    int dst_pos;
    int32_t shift;
    const float *inv_freq;      /* backend memory [D/2] */
    kvm_rope_layout_t layout;
    int dst_n_blocks;           /* entries of dst_blocks when > 0: the op then fails (KVM_EINVAL, nothing written)
                                 * unless the last position dst_pos + (r1 - r0) - 1 lies in the table; 0 = unchecked */
} kvm_kvcomm_apply_args_t;

/* kvcomm_spread: for rows r in [r0, r1) of a placeholder with candidate x (all layers) and N anchor deltas
 * (views with l0 = 1) mixed with one weight per token, w_i = w[(kv * N + i) * w_rows + r]:
 *   out[r - r0] = S / (X + 1e-30) + 1e-30,   over l in [1, L), kv, h, d:
 *     est = sum_i w_i * delta_i[l,kv,h,r,d]   (fp32, in order of i: the offset kvcomm_apply adds)
 *     S   = sum sum_i w_i * (delta_i[l,kv,h,r,d] - est)^2,   X = sum x[l,kv,h,r,d]^2
 * (the weighted spread of the anchors' deltas around the estimate, relative to the row; kvcomm.md §5.2).
 * Sums in fp32 or wider; out is fp32 in backend memory [r1 - r0]. */
typedef struct kvm_kvcomm_spread_args {
    kvm_kv_geom_t g;
    kvm_kv_view_t x;
    int n;
    const kvm_kv_view_t *delta; /* host array [n] */
    const float *w;             /* backend memory */
    int w_rows;
    int r0, r1;
    float *out;                 /* backend memory */
} kvm_kvcomm_spread_args_t;

/* kvcomm_diff: for rows r in [0, n) and layers l in [l0, L) (l0 = 0 or 1), kv, h, d:
 *   y[l,kv,h,r,d] = a'[l,kv,h,r,d] - (b.data ? b[l,kv,h,r,d] : 0)      (fp32)
 *   where a' = a, except that keys (kv 0) are first rotated by `shift` positions (same numerics as kvcomm_apply's
 *   shift; none when shift == 0); y is rounded ONCE to the dtype and stored contiguous:
 *   out[((((l - l0) * 2 + kv) * H + h) * n + r) * D + d]  (the contiguous view {out, rows = n, l0}).
 *   With out_scale != NULL, y is stored q8 instead (the encoding above KVM_Q8_MAX): out is int8 in the same layout
 *   and out_scale[(((l - l0) * 2 + kv) * H + h) * n + r] the row's scale (the q8 view {out, rows = n, l0, out_scale}).
 * a and b are views (paged or contiguous; a contiguous one must hold layer l0 and n rows); out must not overlap
 * them. An anchor's base is kvcomm_diff(segment rows, no b, l0 = 0); a consumer's delta is
 * kvcomm_diff(its dense rows at position p, shift -p, b = the base or the template's text rows, l0 = 1). */
typedef struct kvm_kvcomm_diff_args {
    kvm_kv_geom_t g;
    kvm_kv_view_t a, b;
    int n, l0;
    int32_t shift;
    const float *inv_freq; /* backend memory [D/2], needed when shift != 0 */
    kvm_rope_layout_t layout;
    void *out;             /* backend memory */
    float *out_scale;      /* backend memory, or NULL (see above) */
} kvm_kvcomm_diff_args_t;

/* ---- C2C op types -------------------------------------------------------------------------------- */

/* One model's paged cache, as the C2C ops read and write it: the pool `kv` (backend memory, the KV-cache
 * layout at the top of this file, geometry g) and a sequence's block table `blocks` (backend memory);
 * position p is block blocks[p / KVM_KV_BLOCK], slot p % KVM_KV_BLOCK. */
typedef struct kvm_c2c_cache_view {
    void *kv;
    kvm_kv_geom_t g;
    const int32_t *blocks;
} kvm_c2c_cache_view_t;

/* c2c_gather: for t < n, with Cs = s.g.n_kv_heads * s.g.head_dim and Cr = r.g.n_kv_heads * r.g.head_dim:
 *   x[t][h * Ds + d]      = S[s_layer, kv, h, pos0 + t, d]   h < Hs, d < Ds   (sharer first)
 *   x[t][Cs + h * Dt + d] = R[r_layer, kv, h, pos0 + t, d]   h < Ht, d < Dt   (then the receiver)
 * values converted from each cache's dtype to fp32 exactly; x is [n][Cs + Cr] fp32 in backend memory. */
typedef struct kvm_c2c_gather_args {
    float *x;
    int n, pos0, kv; /* kv 0 = K, 1 = V */
    kvm_c2c_cache_view_t s, r;
    int s_layer, r_layer;
} kvm_c2c_gather_args_t;

/* c2c_residual: for t < n, h < H = c.g.n_kv_heads, d < D = c.g.head_dim, p = pos0 + t:
 *   C[layer, kv, h, p, d] = round_to_cache_dtype( C[...] + sigmoid(wlogit[t][h]) * y[t][h * D + d] )
 * with the old value read as fp32, sigmoid(z) = 1 / (1 + exp(-z)) and the sum in fp32 (rounded once).
 * y [n][H * D] and wlogit [n][H] are fp32 in backend memory. The gate is the caller's: a closed gate calls
 * nothing. */
typedef struct kvm_c2c_residual_args {
    kvm_c2c_cache_view_t c;
    int layer, kv, pos0, n;
    const float *y, *wlogit;
} kvm_c2c_residual_args_t;

/* The CPU reference backend (always available). */
const kvm_ops_t *kvm_ops_cpu(void);
/* The CUDA backend, or NULL (with a message in kvm_errmsg) when it is not compiled in, no driver or
 * no GPU is present. */
const kvm_ops_t *kvm_ops_cuda(void);
/* kvm_cuda_describe and the per-op GPU profile (kvm_cuda_profile_begin / _end): include/kvmesh_lab.h */
/* Why "auto" chose the CPU ("" if it did not fall back): e.g. "no CUDA driver". */
const char *kvm_ops_fallback_reason(void);
/* "auto" (CUDA if usable, else CPU; also NULL or ""), "cpu" or "cuda". NULL + message if the request cannot
 * be met; KVM_EINVAL "backend: 'x' is not one of auto, cpu, cuda" for another name. */
const kvm_ops_t *kvm_ops_select(const char *name);
/* 0 if name is one kvm_ops_select takes (NULL and "" included), else KVM_EINVAL as above (nothing started). */
int kvm_backend_check(const char *name);

/* ---- settings of the CUDA backend --------------------------------------------------------------------
 * kvm_cuda_opts_t and kvm_cuda_opts_default / _check / _parse, kvm_cuda_set_opts, kvm_cuda_get_opts (research and
 * tuning switches, process-wide): include/kvmesh_lab.h */

/* Shared helpers of the reference math (used by every backend's host-side code and the tests). */
/* Angle p*w reduced to [-pi, pi), computed in fp64. */
double kvm_rope_angle(double pos, float inv_freq);

#endif
