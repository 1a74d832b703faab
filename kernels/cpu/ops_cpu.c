/* ops_cpu.c - the CPU reference backend. fp32 compute; weights F32/F16/BF16 converted on the fly;
 * parallel over output rows/heads on the pool of cpu_pool.h (both cores of the CI machine). */
#include "../ops.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../runtime/core/core.h"
#include "cpu_common.h"
#include "cpu_kernels.h"
#include "cpu_pool.h"
#include "gemm_cpu.h"
#include "../rope.h"

/* ---- memory: plain host memory -------------------------------------------------------------- */

/* Every allocation of this backend is 64-byte aligned inside a plain malloc/calloc block whose start is kept in the
 * word before the returned pointer, so that cpu_free takes both kinds. cpu_alloc_zeroed takes its block from calloc:
 * a large one is a fresh mapping that glibc (and ASan's allocator) do not clear, so a KV pool of many MiB costs no
 * page until a block is used, where alloc + memset0 touched every page of it (kv_pool.c; docs/perf/cpu.md). */
static void *cpu_alloc_with(size_t n, bool zero) {
    const size_t pad = 64 + sizeof(void *);
    if (n > SIZE_MAX - pad) {
        kvm_seterr(KVM_ENOMEM, "out of host memory allocating %zu bytes", n);
        return NULL;
    }
    char *raw = zero ? calloc(1, n + pad) : malloc(n + pad);
    if (!raw) {
        kvm_seterr(KVM_ENOMEM, "out of host memory allocating %zu bytes", n);
        return NULL;
    }
    uintptr_t a = ((uintptr_t)raw + sizeof(void *) + 63) & ~(uintptr_t)63;
    ((void **)a)[-1] = raw;
    return (void *)a;
}
static void *cpu_alloc(size_t n) { return cpu_alloc_with(n, false); }
static void *cpu_alloc_zeroed(size_t n) { return cpu_alloc_with(n, true); }
static void cpu_free(void *p) {
    if (p) free(((void **)p)[-1]);
}
static int cpu_copy(void *dst, const void *src, size_t n) {
    if (n) memmove(dst, src, n);
    return 0;
}
static int cpu_memset0(void *dst, size_t n) {
    if (n) memset(dst, 0, n);
    return 0;
}
static int cpu_sync(void) { return 0; }

/* ---- helpers ---------------------------------------------------------------------------------- */

/* ---- ops -------------------------------------------------------------------------------------- */

static void cpu_embed(float *out, const void *table, kvm_dtype_t dt, const int32_t *ids, int n, int dim) {
    size_t es = kvm_dtype_size(dt);
    for (int i = 0; i < n; i++)
        row_to_f32(out + (size_t)i * dim, (const char *)table + (size_t)ids[i] * dim * es, dt, (size_t)dim);
}

/* Items per chunk so that a chunk holds at least min_work units of work (per_item units each): work below
 * that runs on the calling thread, since handing out a chunk costs about a microsecond. */
static int grain_for(size_t per_item, size_t min_work) {
    size_t g = per_item ? (min_work + per_item - 1) / per_item : min_work;
    return g > (size_t)INT32_MAX ? INT32_MAX : (int)(g ? g : 1);
}

typedef struct {
    float *out;
    const float *x, *w;
    int dim;
    float eps;
} rmsnorm_task_t;

static void rmsnorm_task(void *ctx, int r0, int r1, int tid) {
    const rmsnorm_task_t *t = ctx;
    const int dim = t->dim;
    for (int r = r0; r < r1; r++) {
        const float *xr = t->x + (size_t)r * dim;
        float *o = t->out + (size_t)r * dim;
        /* the sum of squares in fp64, in 8 chains by i mod 8 (vectorizable; a single chain of dependent adds was
         * most of the op's time), combined in a fixed tree: one order for every row and batch */
        double a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int i = 0;
        for (; i + 8 <= dim; i += 8)
            for (int u = 0; u < 8; u++) a[u] += (double)xr[i + u] * xr[i + u];
        for (; i < dim; i++) a[0] += (double)xr[i] * xr[i];
        const double ss = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        float inv = 1.0f / sqrtf((float)(ss / dim) + t->eps);
        for (i = 0; i < dim; i++) o[i] = t->w[i] * (xr[i] * inv);
    }
}

static void cpu_rmsnorm(float *out, const float *x, const float *w, int n, int dim, float eps) {
    rmsnorm_task_t t = {.out = out, .x = x, .w = w, .dim = dim, .eps = eps};
    kvm_cpu_parallel_for(n, grain_for((size_t)dim, 32768), rmsnorm_task, &t);
}

static void cpu_head_rmsnorm(float *x, const float *w, int n, int heads, int hd, float eps) {
    cpu_rmsnorm(x, x, w, n * heads, hd, eps);
}

typedef struct {
    float *x[2];  /* q [n][heads[0]][hd], k [n][heads[1]][hd] (or NULL) */
    int heads[2], hd;
    const int32_t *pos;
    const float *inv_freq;
    kvm_rope_layout_t layout;
} rope_task_t;

#define ROPE_TABLE_PAIRS 256 /* head vectors up to 512 wide rotate from one table per token */

/* every head of tokens [t0, t1): the angles of a token computed once for its q and k heads (the same bits as
 * rotating each head on its own) */
static void rope_task(void *ctx, int t0, int t1, int tid) {
    const rope_task_t *r = ctx;
    const int hd = r->hd, half = hd / 2;
    float c[ROPE_TABLE_PAIRS], s[ROPE_TABLE_PAIRS];
    (void)tid;
    for (int t = t0; t < t1; t++) {
        const bool table = half <= ROPE_TABLE_PAIRS;
        if (table) kvm_rope_cos_sin(c, s, half, (double)r->pos[t], r->inv_freq);
        for (int x = 0; x < 2; x++)
            for (int h = 0; r->x[x] && h < r->heads[x]; h++) {
                float *v = r->x[x] + ((size_t)t * r->heads[x] + h) * hd;
                if (table) kvm_rope_apply(v, hd, c, s, r->layout);
                else kvm_rope_rotate_vec(v, hd, (double)r->pos[t], r->inv_freq, r->layout);
            }
    }
}

static void cpu_rope_qk(float *q, float *k, int n, int hq, int hk, int hd, const int32_t *pos, const float *inv_freq,
                        kvm_rope_layout_t layout) {
    rope_task_t r = {.x = {q, k}, .heads = {hq, k ? hk : 0}, .hd = hd, .pos = pos, .inv_freq = inv_freq, .layout = layout};
    /* in elementwise ops: a token's angles cost a cos and a sin in fp64 per pair (about 20), its rotations about
     * 3 per pair and head; a chunk does at least 40960 */
    kvm_cpu_parallel_for(n, grain_for((size_t)hd / 2 * (20 + 3 * (size_t)(hq + r.heads[1])), 40960), rope_task, &r);
}

static void cpu_rope(float *x, int n, int heads, int hd, const int32_t *pos, const float *inv_freq, kvm_rope_layout_t layout) {
    cpu_rope_qk(x, NULL, n, heads, 0, hd, pos, inv_freq, layout);
}

/* elementwise ops over pieces of ELEM_PIECE elements */
#define ELEM_PIECE 4096

typedef struct {
    float *out;
    const float *a, *b;
    size_t n;
} elem_task_t;

static void swiglu_task(void *ctx, int p0, int p1, int tid) {
    const elem_task_t *t = ctx;
    size_t i1 = (size_t)p1 * ELEM_PIECE < t->n ? (size_t)p1 * ELEM_PIECE : t->n;
    const size_t i0 = (size_t)p0 * ELEM_PIECE;
    kvm_cpu_kern()->swiglu(t->out + i0, t->a + i0, t->b + i0, i1 - i0);
}

static void cpu_swiglu(float *out, const float *gate, const float *up, size_t n) {
    elem_task_t t = {.out = out, .a = gate, .b = up, .n = n};
    size_t pieces = (n + ELEM_PIECE - 1) / ELEM_PIECE;
    /* an expf per element: 2 pieces (8192 elements) per chunk */
    kvm_cpu_parallel_for((int)pieces, 2, swiglu_task, &t);
}

static void add_task(void *ctx, int p0, int p1, int tid) {
    const elem_task_t *t = ctx;
    size_t i1 = (size_t)p1 * ELEM_PIECE < t->n ? (size_t)p1 * ELEM_PIECE : t->n;
    for (size_t i = (size_t)p0 * ELEM_PIECE; i < i1; i++) t->out[i] += t->b[i];
}

static void cpu_add(float *x, const float *y, size_t n) {
    elem_task_t t = {.out = x, .b = y, .n = n};
    size_t pieces = (n + ELEM_PIECE - 1) / ELEM_PIECE;
    /* memory-bound: 16 pieces (65536 elements) per chunk */
    kvm_cpu_parallel_for((int)pieces, 16, add_task, &t);
}

static void cpu_kv_write(void *kv, const kvm_kv_geom_t *g, int layer, const float *k, const float *v, const kvm_attn_batch_t *b) {
    const int H = g->n_kv_heads, D = g->head_dim;
    for (int s = 0; s < b->n_seqs; s++) {
        int r0 = b->h_row_start[s], r1 = b->h_row_start[s + 1];
        int first_pos = b->h_ctx_len[s] - (r1 - r0);
        for (int r = r0; r < r1; r++) {
            int pos = b->h_q_pos ? b->h_q_pos[r] : first_pos + (r - r0);
            int32_t blk = b->h_block_table[(size_t)s * b->max_blocks + pos / KVM_KV_BLOCK];
            int t = pos % KVM_KV_BLOCK;
            for (int h = 0; h < H; h++) {
                kv_store(kv, g, kv_index(g, blk, layer, 0, h, t), k + ((size_t)r * H + h) * D);
                kv_store(kv, g, kv_index(g, blk, layer, 1, h, t), v + ((size_t)r * H + h) * D);
            }
        }
    }
}

static void cpu_rope_shift(void *kv, const kvm_kv_geom_t *g, const int32_t *blk, const int32_t *slot, const int32_t *delta,
                           int n, const float *inv_freq, kvm_rope_layout_t layout) {
    const int D = g->head_dim;
    float *tmp = malloc((size_t)D * sizeof(float));
    for (int i = 0; i < n; i++) {
        if (delta[i] == 0) continue;
        for (int l = 0; l < g->n_layers; l++)
            for (int h = 0; h < g->n_kv_heads; h++) {
                size_t idx = kv_index(g, blk[i], l, 0, h, slot[i]);
                kv_load(tmp, kv, g, idx);
                kvm_rope_rotate_vec(tmp, D, (double)delta[i], inv_freq, layout);
                kv_store(kv, g, idx, tmp);
            }
    }
    free(tmp);
}

static int cpu_argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* ops_cpu_kvcomm.c */
int kvm_cpu_kvcomm_dist(const kvm_kvcomm_dist_args_t *a);
int kvm_cpu_kvcomm_softmax(float *w, const float *d, int n, size_t cols, int mode);
int kvm_cpu_kvcomm_apply(const kvm_kvcomm_apply_args_t *a);
int kvm_cpu_kvcomm_spread(const kvm_kvcomm_spread_args_t *a);
int kvm_cpu_kvcomm_diff(const kvm_kvcomm_diff_args_t *a);

/* ops_cpu_c2c.c */
int kvm_cpu_c2c_gather(const kvm_c2c_gather_args_t *a);
void kvm_cpu_gelu_erf(float *x, size_t n);
int kvm_cpu_c2c_residual(const kvm_c2c_residual_args_t *a);

static const kvm_ops_t cpu_ops = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .alloc_zeroed = cpu_alloc_zeroed,
    .h2d = cpu_copy,
    .d2h = cpu_copy,
    .d2d = cpu_copy,
    .memset0 = cpu_memset0,
    .sync = cpu_sync,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .head_rmsnorm = cpu_head_rmsnorm,
    .matmul = kvm_cpu_matmul,
    .rope = cpu_rope,
    .rope_qk = cpu_rope_qk,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
    .kv_write = cpu_kv_write,
    .attention = kvm_cpu_attention,
    .rope_shift = cpu_rope_shift,
    .argmax = cpu_argmax,
    .parallel_for = kvm_cpu_parallel_for,
    .attn_mass = kvm_cpu_attn_mass,
    .kvcomm_dist = kvm_cpu_kvcomm_dist,
    .kvcomm_softmax = kvm_cpu_kvcomm_softmax,
    .kvcomm_apply = kvm_cpu_kvcomm_apply,
    .kvcomm_spread = kvm_cpu_kvcomm_spread,
    .kvcomm_diff = kvm_cpu_kvcomm_diff,
    .c2c_gather = kvm_cpu_c2c_gather,
    .gelu_erf = kvm_cpu_gelu_erf,
    .c2c_residual = kvm_cpu_c2c_residual,
};

const kvm_ops_t *kvm_ops_cpu(void) { return &cpu_ops; }
