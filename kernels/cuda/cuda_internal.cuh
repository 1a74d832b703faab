/* cuda_internal.cuh - what the CUDA backend's translation units share (never included by C code).
 *
 * One process, one device, one stream: every op is enqueued on g_cuda.stream, so the ops run in the
 * order the forward calls them and a whole decode step can be captured into a CUDA graph. Ops that
 * return void record the first failure in a sticky error that sync() reports (and clears). */
#ifndef KVM_CUDA_INTERNAL_CUH
#define KVM_CUDA_INTERNAL_CUH

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cublas_v2.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "../rope.h"

extern "C" {
/* cublas_lazy.c: cuBLAS is loaded on first use; NULL once loaded, else why not (and the soname it looked for) */
const char *kvm_cublas_load_error(void);
const char *kvm_cublas_soname(void);
#include "../ops.h"
#include "../../runtime/core/status.h"
}

struct kvm_cuda_ctx {
    int ready;               /* 1 after a successful init */
    int device;
    cudaDeviceProp prop;
    cudaStream_t stream;
    cublasHandle_t blas;
    void *blas_ws;           /* cuBLAS workspace (fixed, so graph capture is allowed) */
    size_t blas_ws_bytes;
    void *ws;                /* scratch of the ops (bf16 activations, attention partials, ...) */
    size_t ws_bytes;
    void *retired[48];       /* outgrown scratch buffers, kept alive (see kvm_cuda_scratch) */
    int n_retired;
    int err_code;            /* sticky first error of a void op (0 = none) */
    char err_msg[512];
    kvm_cuda_opts_t opts;    /* the switches of ops.h (kvm_cuda_set_opts); the ops read them when enqueued */
    bool opts_set;           /* opts were set (else cu_init fills in kvm_cuda_opts_default()) */
};
extern kvm_cuda_ctx g_cuda;

/* Records a failure of a void op (first one wins); returns code. */
int kvm_cuda_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Checks a CUDA call; on error records "what: cudaGetErrorString" and returns nonzero. */
#define KVM_CU(call, what) kvm_cuda_check((call), (what), __FILE__, __LINE__)
int kvm_cuda_check(cudaError_t e, const char *what, const char *file, int line);
/* Checks the last launch (call after every <<<>>>). */
#define KVM_CU_LAUNCH(what) kvm_cuda_check(cudaGetLastError(), (what), __FILE__, __LINE__)
/* Scratch of at least `bytes` (grows outside graph capture; fails while capturing). NULL on failure. */
void *kvm_cuda_scratch(size_t bytes);
/* True while g_cuda.stream is being captured into a graph. */
int kvm_cuda_capturing(void);

/* ---- profiling (opts.profile or kvm_cuda_profile_begin): events around every op, summed per name --- */
extern int g_kvm_prof_on;
int kvm_prof_start(const char *name); /* returns a record index, or -1 */
void kvm_prof_stop(int idx);
struct KvmProfScope {
    int idx;
    explicit KvmProfScope(const char *name) : idx(g_kvm_prof_on ? kvm_prof_start(name) : -1) {}
    ~KvmProfScope() {
        if (idx >= 0) kvm_prof_stop(idx);
    }
};
#define KVM_PROF(name) KvmProfScope kvm_prof_scope_(name)
/* Every op but matmul starts with KVM_OP: it may write memory that matmul's cached 16-bit copy came from. */
void kvm_cuda_touch(void);
/* The 16-bit dtype matmul last rounded its input to (KVM_F32 before the first), and a way for a producer
 * op to declare that scratch already holds src[n] rounded to dt (the next matmul on src then reuses it). */
kvm_dtype_t kvm_cuda_half_dtype(void);
void kvm_cuda_set_rounded(const float *src, size_t n, kvm_dtype_t dt);
#define KVM_OP(name)      \
    kvm_cuda_touch();     \
    KVM_PROF(name)

/* ---- ops, one file each ------------------------------------------------------------------------ */
/* cuda_kernels.cu */
void kvm_cuda_embed(float *out, const void *table, kvm_dtype_t dtype, const int32_t *ids, int n, int dim);
void kvm_cuda_rmsnorm(float *out, const float *x, const float *w, int n, int dim, float eps);
void kvm_cuda_head_rmsnorm(float *x, const float *w, int n, int heads, int hd, float eps);
void kvm_cuda_rope(float *x, int n, int heads, int hd, const int32_t *pos, const float *inv_freq, kvm_rope_layout_t layout);
void kvm_cuda_rope_qk(float *q, float *k, int n, int hq, int hk, int hd, const int32_t *pos, const float *inv_freq,
                      kvm_rope_layout_t layout);
void kvm_cuda_swiglu(float *out, const float *gate, const float *up, size_t n);
void kvm_cuda_rope_qk_kv_write(float *q, float *k, const float *v, int hq, int hd, const int32_t *pos, const float *inv_freq,
                               kvm_rope_layout_t layout, void *kv, const kvm_kv_geom_t *g, int layer, const kvm_attn_batch_t *b);
/* act[i] = silu(gate[i]) * up[i] rounded to T (the 16-bit input of the down projection) */
void kvm_cuda_swiglu_half(void *act, kvm_dtype_t dt, const float *gate, const float *up, size_t n);
void kvm_cuda_add(float *x, const float *y, size_t n);
void kvm_cuda_add_rmsnorm(float *x, const float *y, float *out, const float *w, int n, int dim, float eps);
void kvm_cuda_add_rmsnorm_16(float *x, const float *y, float *out, const float *w, int n, int dim, float eps);
bool kvm_cuda_norm_from16_ok(int n, int dim, const float *x, const float *w);
void kvm_cuda_add16_rmsnorm_16(float *x, const __nv_bfloat16 *y16, float *out, const float *w, int n, int dim, float eps);
void kvm_cuda_matmul_add_rmsnorm_16(float *x, const float *in, const kvm_wmat_t *W, float *out, const float *w, int n,
                                    int dim, float eps);
void kvm_cuda_ffn_add_rmsnorm_16(float *x, const float *in, const kvm_wmat_t *Wg, const kvm_wmat_t *Wu,
                                 const kvm_wmat_t *Wd, float *h1, float *h2, float *out, const float *w, int n, int dim,
                                 float eps);
void kvm_cuda_kv_write(void *kv, const kvm_kv_geom_t *g, int layer, const float *k, const float *v, const kvm_attn_batch_t *b);
void kvm_cuda_rope_shift(void *kv, const kvm_kv_geom_t *g, const int32_t *blk, const int32_t *slot, const int32_t *delta,
                         int n, const float *inv_freq, kvm_rope_layout_t layout);
int kvm_cuda_argmax(const float *x, int n);
void kvm_cuda_argmax_rows(int32_t *out, const float *x, int rows, int n);
int kvm_cuda_fill_synthetic(void *dst, kvm_dtype_t dt, size_t n, uint64_t seed, float stddev, float mean);
/* cuda_matmul.cu */
void kvm_cuda_matmul(float *y, const float *x, const kvm_wmat_t *W, const float *bias, int n);
void kvm_cuda_swiglu_matmul(float *y, float *gate, const float *up, const kvm_wmat_t *W, int n);
void kvm_cuda_matmul_multi(int count, float *const *y, const kvm_wmat_t *const *W, const float *const *bias, const float *x,
                           int n);
void kvm_cuda_ffn(float *y, const float *x, const kvm_wmat_t *Wg, const kvm_wmat_t *Wu, const kvm_wmat_t *Wd, float *h1,
                  float *h2, int n);
int kvm_cuda_qkv_rope_kv(float *q, float *k, float *v, const float *x, const kvm_wmat_t *wq, const kvm_wmat_t *wk,
                         const kvm_wmat_t *wv, const float *bq, const float *bk, const float *bv, int hq, int hd,
                         const int32_t *pos, const float *inv_freq, kvm_rope_layout_t layout, void *kv,
                         const kvm_kv_geom_t *g, int layer, const kvm_attn_batch_t *b);
/* add_rmsnorm_16 (ops.h) leaves `p` without fp32 data: matmuls that cannot use the 16-bit copy fail loudly */
void kvm_cuda_set_dead(const float *p);
void kvm_cuda_wrote(const float *p); /* p now holds fp32 data again */
/* cuda_attention.cu */
void kvm_cuda_attention(float *out, const float *q, const void *kv, const kvm_kv_geom_t *g, int layer, int heads,
                        const kvm_attn_batch_t *b, float scale);
void kvm_cuda_attn_mass(float *mass, int n, int from_pos, const float *q, const void *kv, const kvm_kv_geom_t *g, int layer,
                        int heads, const kvm_attn_batch_t *b, float scale);

/* ---- programmatic dependent launch (PDL) --------------------------------------------------------------
 * Every small kernel lets the next one launch early (kvm_pdl_trigger at its start); kernels launched with the
 * PDL attribute (the GEMV/skinny GEMMs: kvm_launch_pdl) prefetch their weights, then kvm_pdl_wait for the
 * previous kernel to finish and its writes to be visible before reading activations. A kernel launched
 * without the attribute is ordered by the stream as usual (the wait is then a no-op). The small kernels launch
 * plainly: chaining them with PDL too, the GEMMs triggering at their start (tried as opts.pdl_chain,
 * 2026-12-07), made the batch-16 decode step 48% slower on the H100 (7.55 -> 11.2 ms; batch 1 5.64 -> 6.15 ms):
 * the early-launched kernels' CTAs wait on SMs the GEMM still needs. */
__device__ __forceinline__ void kvm_pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void kvm_pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
static inline int kvm_cuda_pdl_enabled(void) { return g_cuda.opts.pdl; } /* opts.pdl = false turns it off */
/* 2..16 rows go through the skinny tensor-core GEMM, which reads its input rounded to 16 bits: producers of such
 * inputs (norms, the decode attention's merge) leave that copy in scratch for it (kvm_cuda_set_rounded), so that
 * the q/k/v, o and gate/up GEMMs of a batched decode step launch no conversion kernel. */
static inline bool kvm_cuda_skinny_rounds(int rows) {
    return rows >= 2 && rows <= 16 && g_cuda.opts.skinny != KVM_CUDA_SKINNY_GEMV;
}
/* How the decode GEMMs read weights before the PDL wait (opts.prefetch): 0 none, 1 L2 prefetch, 2 (default)
 * the first iteration's loads into registers */
static inline int kvm_cuda_prefetch_mode(void) { return g_cuda.opts.prefetch; }
template <typename... KArgs, typename... Args>
static inline cudaError_t kvm_launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args... args) {
    cudaLaunchConfig_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = g_cuda.stream;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = kvm_cuda_pdl_enabled() ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, ((KArgs)args)...);
}

/* ---- small device helpers --------------------------------------------------------------------- */
template <typename T> __device__ __forceinline__ float kvm_to_f32(T v);
template <> __device__ __forceinline__ float kvm_to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float kvm_to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float kvm_to_f32<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T kvm_from_f32(float v);
template <> __device__ __forceinline__ float kvm_from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 kvm_from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half kvm_from_f32<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float kvm_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float kvm_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Element (t, d = 0) of head h, K (kv 0) or V (kv 1), of one layer in cache block blk: the cache layout
 * [block][layer][2][head][KVM_KV_BLOCK][D] (kv_index in ops_cpu.c). */
__device__ __forceinline__ size_t kvm_kv_index_dev(int L, int H, int D, int32_t blk, int layer, int kv, int h, int t) {
    return ((((size_t)blk * L + layer) * 2 + kv) * H + h) * KVM_KV_BLOCK * (size_t)D + (size_t)t * D;
}

/* Sequence of row r (rows are grouped by sequence): the last s with row_start[s] <= r. */
__device__ __forceinline__ int kvm_seq_of_row_dev(const int32_t *row_start, int n_seqs, int r) {
    int lo = 0, hi = n_seqs - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (row_start[mid] <= r) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* Element (head 0, d = 0) of K (kv 0) or V (kv 1) at position p of row r's sequence, in the cache of one layer:
 * head h of that token starts KVM_KV_BLOCK * D elements further per head (kvm_kv_index_dev). */
__device__ __forceinline__ size_t kvm_row_kv_base_dev(int L, int H, int D, int layer, int kv, const int32_t *row_start,
                                                      int n_seqs, const int32_t *block_table, int max_blocks, int r,
                                                      int p) {
    const int32_t blk = block_table[(size_t)kvm_seq_of_row_dev(row_start, n_seqs, r) * max_blocks + p / KVM_KV_BLOCK];
    return kvm_kv_index_dev(L, H, D, blk, layer, kv, 0, p % KVM_KV_BLOCK);
}

/* Butterfly over the warp: every lane ends with the warp's largest `best` and, among equal ones, the
 * smallest index `bi`. */
__device__ __forceinline__ void kvm_warp_argmax(float *best, int *bi) {
    float b = *best;
    int i = *bi;
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, b, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > b || (ov == b && oi < i)) {
            b = ov;
            i = oi;
        }
    }
    *best = b;
    *bi = i;
}

/* The angle kvm_rope_angle gives on the CPU (rope.h): p*w in fp64, fmod 2π, into [-π, π). */
__device__ __forceinline__ double kvm_rope_angle_dev(double pos, float inv_freq) { return kvm_rope_angle_reduced(pos, inv_freq); }

#endif
