/* gemm_cpu.c - the CPU backend's matmul: y[n, rows] = x[n, cols] . W^T (+ bias), W in F32/F16/BF16.
 *
 * One kernel shape for every n (instruction-set paths in gemm_cpu.h, gemm_cpu_x86.c): the weight rows are
 * streamed in their dtype and widened in registers, k along the SIMD lanes, register tiles of rows x tokens with
 * one reduction per output. Every output's arithmetic depends only on its own row of x and of W, so a token's
 * result is the same bits in any batch (prefill, decode, a positioned recompute of a few rows); a GEMM with
 * packed, transposed panels (one FMA chain per output) was faster at large n but gave other bits than the
 * small-n path, which the engine's bit-exact prefix reuse cannot take.
 * Work items (row block, token block) go through kvm_cpu_parallel_for with at least 4 chunks per thread when
 * the product is big enough to split (a thread descheduled on a busy machine then holds little of the rest),
 * inline when it is small. test_cpu_kernels checks the result against an fp64 oracle on ragged shapes. */
#include <stdbool.h>
#include <stdlib.h>

#include "cpu_common.h"
#include "cpu_kernels.h"
#include "cpu_pool.h"
#include "gemm_cpu.h"

#define GEMM_RB 32                /* weight rows per work item */
#define GEMM_CHUNK_MACS 65536.0   /* a parallel chunk does at least this many multiply-adds */
#define GEMM_WIDEN_MIN 32         /* token blocks at least this long widen 16-bit weights first */

/* ---- the portable path (every machine) ------------------------------------------------------------- */

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

void kvm_cpu_widen_portable(float *dst, const void *src, kvm_dtype_t dt, size_t n) { row_to_f32(dst, src, dt, n); }

const cpu_kern_t kvm_cpu_kern_portable = {
    .name = "portable",
    .dot = dot_portable,
    .load_kt = kvm_cpu_load_kt_portable,
    .widen = kvm_cpu_widen_portable,
    .scores = kvm_cpu_scores_portable,
    .softmax = kvm_cpu_softmax_portable,
    .pv = kvm_cpu_pv_portable,
    .swiglu = kvm_cpu_swiglu_portable,
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
    int rb, nb, tb;        /* rows per row block; token blocks and tokens per block */
} gemm_job_t;

/* Items of at least GEMM_WIDEN_MIN tokens first widen their 16-bit weight rows to fp32 in per-thread scratch (exact,
 * so the bits do not change) and run the fp32 kernel: the conversion is then done once per item instead of once
 * per 4 tokens. */
static void gemm_task(void *ctx, int i0, int i1, int tid) {
    const gemm_job_t *j = ctx;
    const int rows = j->W->rows, cols = j->W->cols;
    float *wf = NULL;
    if (j->W->dtype != KVM_F32 && j->tb >= GEMM_WIDEN_MIN) wf = kvm_cpu_scratch(tid, (size_t)j->rb * cols * sizeof(float));
    for (int it = i0; it < i1; it++) {
        int r0 = (it / j->nb) * j->rb, r1 = r0 + j->rb < rows ? r0 + j->rb : rows;
        int t0 = (it % j->nb) * j->tb, t1 = t0 + j->tb < j->n ? t0 + j->tb : j->n;
        float *y = j->y + (size_t)t0 * rows;
        const float *x = j->x + (size_t)t0 * cols;
        if (wf) {
            j->k->widen(wf, (const uint16_t *)j->W->data + (size_t)r0 * cols, j->W->dtype, (size_t)(r1 - r0) * cols);
            j->k->dot(y + r0, rows, x, cols, wf, KVM_F32, cols, 0, r1 - r0, t1 - t0, j->bias ? j->bias + r0 : NULL);
        } else {
            j->k->dot(y, rows, x, cols, j->W->data, j->W->dtype, cols, r0, r1, t1 - t0, j->bias);
        }
    }
}

/* the grain (items per chunk) for `items` items of `macs` multiply-adds each: everything inline when the
 * product is small or there is one thread, else >= 4 chunks per thread of >= GEMM_CHUNK_MACS each */
static int pick_grain(int items, double macs, int threads) {
    if (threads <= 1 || items * macs < 2 * GEMM_CHUNK_MACS) return items;
    int g = items / (4 * threads);
    int gmin = (int)(GEMM_CHUNK_MACS / macs);
    if (g < gmin) g = gmin;
    return g < 1 ? 1 : g;
}

/* Items are (block of GEMM_RB rows, block of tokens): the rows of a block stay in L1 while the tokens stream past;
 * tokens are split only when there are too few row blocks for 4 chunks per thread. */
void kvm_cpu_matmul(float *y, const float *x, const kvm_wmat_t *W, const float *bias, int n) {
    if (n <= 0 || W->rows <= 0) return;
    const int rows = W->rows, cols = W->cols, threads = kvm_cpu_pool_size();
    gemm_job_t j = {.y = y, .x = x, .W = W, .bias = bias, .n = n, .k = kvm_cpu_kern(), .rb = GEMM_RB};
    const int rblocks = (rows + GEMM_RB - 1) / GEMM_RB;
    j.nb = 1;
    if (threads > 1 && rblocks < 4 * threads && n >= 32) j.nb = (4 * threads + rblocks - 1) / rblocks;
    j.tb = ((n + j.nb - 1) / j.nb + 3) / 4 * 4;
    j.nb = (n + j.tb - 1) / j.tb;
    int items = rblocks * j.nb;
    /* the multiply-adds of an item: its tokens, not the block length tb (rounded up to 4), or a one-token matmul
     * counted 4x too much work was split into chunks smaller than a hand-off to the other thread costs */
    const int item_tokens = n < j.tb ? n : j.tb;
    kvm_cpu_parallel_for(items, pick_grain(items, (double)GEMM_RB * cols * item_tokens, threads), gemm_task, &j);
}
