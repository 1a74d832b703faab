/* gemm_cpu.c - the CPU backend's matmul: y[n, rows] = x[n, cols] . W^T (+ bias), W in F32/F16/BF16.
 *
 * Two shapes of work (kernels per instruction set in gemm_cpu.h):
 *  - n <= GEMM_DOT_MAX_N (decode GEMV, lm_head, small batches): the weight rows are streamed in their dtype and
 *    widened in registers, 4 rows x up to 4 tokens at a time; memory-bound at n = 1.
 *  - larger n (prefill, big batches): per panel of nr weight rows and block of kc columns, the panel is packed
 *    once into per-thread scratch (fp32, transposed) and every token tile of the item reuses it from L1; the
 *    register tile is mr tokens x nr rows.
 * Work items are (panel, token block) for the GEMM and row blocks for the dot path, handed out through
 * kvm_cpu_parallel_for with at least 4 chunks per thread when the product is big enough to split (a thread
 * descheduled on a busy machine then holds little of the rest) and inline when it is small. Every output is
 * one fp32 FMA chain over k (plus the block sums when cols > kc_max): results differ from a naive dot product
 * only by summation order (test_cpu_kernels checks 1e-4 relative against an fp64 oracle). */
#include <stdbool.h>
#include <stdlib.h>

#include "cpu_common.h"
#include "cpu_kernels.h"
#include "cpu_pool.h"
#include "gemm_cpu.h"

#define GEMM_DOT_MAX_N 4          /* at most this many tokens: the dot path */
#define GEMM_CHUNK_MACS 65536.0   /* a parallel chunk does at least this many multiply-adds */

/* ---- the portable path (every machine; also the scalar pack of the AVX2 path) ----------------------- */

static inline float w_at(const void *w, kvm_dtype_t dt, size_t e) {
    if (dt == KVM_F32) return ((const float *)w)[e];
    if (dt == KVM_BF16) return kvm_bf16_to_f32(((const uint16_t *)w)[e]);
    return kvm_f16_to_f32(((const uint16_t *)w)[e]);
}

void kvm_cpu_pack_scalar(float *dst, int nr, const void *w, kvm_dtype_t dt, int cols, int r0, int nrows, int k0, int kc);
void kvm_cpu_pack_scalar(float *dst, int nr, const void *w, kvm_dtype_t dt, int cols, int r0, int nrows, int k0, int kc) {
    for (int j = 0; j < nr; j++) {
        if (j >= nrows) {
            for (int k = 0; k < kc; k++) dst[(size_t)k * nr + j] = 0.0f;
            continue;
        }
        size_t base = (size_t)(r0 + j) * cols + k0;
        for (int k = 0; k < kc; k++) dst[(size_t)k * nr + j] = w_at(w, dt, base + k);
    }
}

enum { P_NR = 16, P_MR = 4 };

static void pack_portable(float *dst, const void *w, kvm_dtype_t dt, int cols, int r0, int nrows, int k0, int kc) {
    kvm_cpu_pack_scalar(dst, P_NR, w, dt, cols, r0, nrows, k0, kc);
}

static void tile_portable(float *y, int ldy, const float *x, int ldx, const float *pw, int kc, int m, int nv,
                          const float *bias, int acc) {
    float c[P_MR][P_NR] = {{0}};
    for (int k = 0; k < kc; k++) {
        const float *b = pw + (size_t)k * P_NR;
        for (int i = 0; i < m; i++) {
            float a = x[(size_t)i * ldx + k];
            for (int j = 0; j < P_NR; j++) c[i][j] += a * b[j];
        }
    }
    for (int i = 0; i < m; i++) {
        float *yy = y + (size_t)i * ldy;
        for (int j = 0; j < nv; j++) yy[j] = (acc ? yy[j] : bias ? bias[j] : 0.0f) + c[i][j];
    }
}

static void dot_portable(float *y, int ldy, const float *x, int ldx, const void *w, kvm_dtype_t dt, int cols, int r0,
                         int r1, int n, const float *bias) {
    enum { CH = 256 };
    float wrow[CH];
    for (int r = r0; r < r1; r++) {
        for (int t = 0; t < n; t++) y[(size_t)t * ldy + r] = bias ? bias[r] : 0.0f;
        for (int k0 = 0; k0 < cols; k0 += CH) {
            int kc = cols - k0 < CH ? cols - k0 : CH;
            if (dt == KVM_F32) memcpy(wrow, (const float *)w + (size_t)r * cols + k0, (size_t)kc * sizeof(float));
            else row_to_f32(wrow, (const uint16_t *)w + (size_t)r * cols + k0, dt, (size_t)kc);
            for (int t = 0; t < n; t++) y[(size_t)t * ldy + r] += dot_f32(x + (size_t)t * ldx + k0, wrow, kc);
        }
    }
}

/* attn_cpu.c */
void kvm_cpu_scores_portable(float *s, const float *q, const float *kt, int d);
void kvm_cpu_softmax_pv_portable(float *acc, float *m, float *l, const float *s, int nv, const float *vb, int d);
void kvm_cpu_load_kt_portable(float *kt, const void *k, kvm_dtype_t dt, int d, int nv);

const cpu_kern_t kvm_cpu_kern_portable = {
    .name = "portable",
    .nr = P_NR,
    .mr = P_MR,
    .kc_max = 256,
    .pack = pack_portable,
    .tile = tile_portable,
    .dot = dot_portable,
    .softmax_pv = kvm_cpu_softmax_pv_portable,
    .scores = kvm_cpu_scores_portable,
    .load_kt = kvm_cpu_load_kt_portable,
};

/* ---- the choice of path ------------------------------------------------------------------------------ */

static int g_forced_isa = KVM_CPU_ISA_AUTO; /* kvm_cpu_force_isa (tests only) */

static int isa_best(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
        return KVM_CPU_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return KVM_CPU_ISA_AVX2;
#endif
    return KVM_CPU_ISA_PORTABLE;
}

int kvm_cpu_force_isa(int isa) {
    int best = isa_best();
    g_forced_isa = isa < 0 ? KVM_CPU_ISA_AUTO : isa < best ? isa : best;
    return g_forced_isa < 0 ? best : g_forced_isa;
}

const cpu_kern_t *kvm_cpu_kern(void) {
    int isa = g_forced_isa >= 0 ? g_forced_isa : isa_best();
#if defined(__x86_64__) || defined(__i386__)
    if (isa == KVM_CPU_ISA_AVX512) return &kvm_cpu_kern_avx512;
    if (isa == KVM_CPU_ISA_AVX2) return &kvm_cpu_kern_avx2;
#endif
    return &kvm_cpu_kern_portable;
}

/* ---- the matmul ------------------------------------------------------------------------------------- */

typedef struct gemm_job {
    float *y;              /* [n][rows] */
    const float *x;        /* [n][cols] */
    const kvm_wmat_t *W;
    const float *bias;     /* [rows] or NULL */
    int n;
    const cpu_kern_t *k;
    int nb, tb;            /* GEMM: token blocks per panel and tokens per block; dot: rows per item */
} gemm_job_t;

static void gemm_task(void *ctx, int i0, int i1, int tid) {
    const gemm_job_t *j = ctx;
    const cpu_kern_t *K = j->k;
    const int rows = j->W->rows, cols = j->W->cols;
    const int nkb = (cols + K->kc_max - 1) / K->kc_max, kc = (cols + nkb - 1) / nkb;
    float *pw = kvm_cpu_scratch(tid, (size_t)kc * K->nr * sizeof(float));
    for (int it = i0; it < i1; it++) {
        int r0 = (it / j->nb) * K->nr, nv = rows - r0 < K->nr ? rows - r0 : K->nr;
        int t0 = (it % j->nb) * j->tb, t1 = t0 + j->tb < j->n ? t0 + j->tb : j->n;
        if (!pw) { /* no scratch (out of memory): the dot path needs none */
            K->dot(j->y + (size_t)t0 * rows, rows, j->x + (size_t)t0 * cols, cols, j->W->data, j->W->dtype, cols, r0,
                   r0 + nv, t1 - t0, j->bias);
            continue;
        }
        for (int k0 = 0; k0 < cols; k0 += kc) {
            int kcc = cols - k0 < kc ? cols - k0 : kc;
            K->pack(pw, j->W->data, j->W->dtype, cols, r0, nv, k0, kcc);
            for (int t = t0; t < t1; t += K->mr) {
                int m = t1 - t < K->mr ? t1 - t : K->mr;
                K->tile(j->y + (size_t)t * rows + r0, rows, j->x + (size_t)t * cols + k0, cols, pw, kcc, m, nv,
                        j->bias ? j->bias + r0 : NULL, k0 > 0);
            }
        }
    }
}

static void dot_task(void *ctx, int i0, int i1, int tid) {
    const gemm_job_t *j = ctx;
    int r0 = i0 * j->tb, r1 = i1 * j->tb < j->W->rows ? i1 * j->tb : j->W->rows;
    j->k->dot(j->y, j->W->rows, j->x, j->W->cols, j->W->data, j->W->dtype, j->W->cols, r0, r1, j->n, j->bias);
}

/* the grain (items per chunk) for `items` items of `macs` multiply-adds each: everything inline when the
 * product is small or there is one thread, else >= 4 chunks per thread of >= GEMM_CHUNK_MACS each */
static int pick_grain(int items, double macs, int threads) {
    if (threads <= 1 || items * macs < 2 * GEMM_CHUNK_MACS) return items;
    int g = (items + 4 * threads - 1) / (4 * threads);
    int gmin = (int)(GEMM_CHUNK_MACS / macs);
    if (g < gmin) g = gmin;
    return g < 1 ? 1 : g;
}

void kvm_cpu_matmul(float *y, const float *x, const kvm_wmat_t *W, const float *bias, int n) {
    if (n <= 0 || W->rows <= 0) return;
    const cpu_kern_t *K = kvm_cpu_kern();
    const int rows = W->rows, cols = W->cols, threads = kvm_cpu_pool_size();
    gemm_job_t j = {.y = y, .x = x, .W = W, .bias = bias, .n = n, .k = K};
    if (n <= GEMM_DOT_MAX_N || cols <= 0) {
        j.tb = 4;
        int items = (rows + 3) / 4;
        kvm_cpu_parallel_for(items, pick_grain(items, 4.0 * cols * n, threads), dot_task, &j);
        return;
    }
    const int panels = (rows + K->nr - 1) / K->nr, mtiles = (n + K->mr - 1) / K->mr;
    j.nb = 1;
    if (threads > 1 && panels < 4 * threads) j.nb = (4 * threads + panels - 1) / panels;
    if (j.nb > mtiles) j.nb = mtiles;
    j.tb = ((n + j.nb - 1) / j.nb + K->mr - 1) / K->mr * K->mr;
    j.nb = (n + j.tb - 1) / j.tb;
    int items = panels * j.nb;
    kvm_cpu_parallel_for(items, pick_grain(items, (double)K->nr * cols * j.tb, threads), gemm_task, &j);
}
