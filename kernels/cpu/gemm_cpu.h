/* gemm_cpu.h - the CPU backend's kernel paths per instruction set (internal to kernels/cpu).
 *
 * gemm_cpu.c and attn_cpu.c split the work and hand pieces to one cpu_kern_t: the portable C one (every
 * machine, and the oracle-shaped fallback), AVX2+FMA+F16C or AVX-512 (F, BW, VL), chosen once at run time
 * with __builtin_cpu_supports. The x86 paths are compiled with __attribute__((target(...))) in
 * gemm_cpu_x86.c / attn_cpu_x86.c: the build has no -march flag, so the binary runs on any x86-64.
 *
 * The matmul piece (y[n][rows] = x[n][cols] . W^T + bias, W row-major [rows][cols] in F32/F16/BF16):
 *   dot(y, ldy, x, ldx, w, dt, cols, r0, r1, n, bias): rows [r0, r1) for the n tokens of x / y (row strides ldx,
 *       ldy), the weight rows streamed in their dtype. Each output's arithmetic depends on nothing but its own
 *       row of x and of W (not on n, r0, r1 or the tile it falls in): a row computed alone gives the same bits
 *       as in any batch (the forward's positioned recompute and prefix reuse rely on it).
 *   widen(dst, src, dt, n): dst[0..n) = src[0..n) in dtype dt, widened to fp32 (exact).
 * Attention pieces (attn_cpu.c), over a chunk of key blocks of KVM_KV_BLOCK (16) positions:
 *   load_kt(kt, k, dt, d, nv): kt[d][16] = the first nv rows of one block's keys k[16][d] (dtype dt) transposed
 *       to fp32, rows nv.. zero;
 *   scores(s, lds, q, nq, kt, nblk, d): for the nq queries q[n][d]: s[n * lds + b * 16 + j] = sum_{i < d} q[n][i] *
 *       kt[(b * d + i) * 16 + j] for b < nblk (a query's sums in one fixed order whatever nq);
 *   softmax(s, nv, m, l): one online-softmax step of a query over its next nv scores: m' = max(*m, s[0..nv)),
 *       s[i] = exp(s[i] - m') in place, *l = *l * corr + sum s[i], *m = m'; returns corr = exp(m - m')
 *       (0 while *m was -inf);
 *   pv(acc, p, lds, nq, nv, v, d, corr): for the nq queries: acc[n][:] = acc[n][:] * corr[n] +
 *       sum_{i < nv} p[n * lds + i] * v[i / 16][(i % 16) * d + :] (v: the chunk's blocks of values, [16][d] fp32
 *       each; acc [nq][d]; a query's arithmetic its own whatever nq).
 * SwiGLU (ops_cpu.c): swiglu(out, gate, up, n): out[i] = gate[i] / (1 + exp(-gate[i])) * up[i], the exp of the
 *   path (expf, or the attention's exp within 2e-7 relative); out may equal gate. */
#ifndef KVM_GEMM_CPU_H
#define KVM_GEMM_CPU_H

#include "../ops.h"

enum { KVM_CPU_ISA_AUTO = -1, KVM_CPU_ISA_PORTABLE = 0, KVM_CPU_ISA_AVX2 = 1, KVM_CPU_ISA_AVX512 = 2 };

typedef struct cpu_kern {
    const char *name;
    void (*dot)(float *y, int ldy, const float *x, int ldx, const void *w, kvm_dtype_t dt, int cols, int r0, int r1, int n,
                const float *bias);
    void (*load_kt)(float *kt, const void *k, kvm_dtype_t dt, int d, int nv);
    void (*widen)(float *dst, const void *src, kvm_dtype_t dt, size_t n);
    void (*scores)(float *s, int lds, const float *q, int nq, const float *kt, int nblk, int d);
    float (*softmax)(float *s, int nv, float *m, float *l);
    void (*pv)(float *acc, const float *p, int lds, int nq, int nv, const float *const *v, int d, const float *corr);
    void (*swiglu)(float *out, const float *gate, const float *up, size_t n);
} cpu_kern_t;

extern const cpu_kern_t kvm_cpu_kern_portable;
#if defined(__x86_64__) || defined(__i386__)
extern const cpu_kern_t kvm_cpu_kern_avx2, kvm_cpu_kern_avx512;
#endif

/* the pieces, by path (gemm_cpu.c, attn_cpu.c; gemm_cpu_x86.c, attn_cpu_x86.c) */
void kvm_cpu_load_kt_portable(float *kt, const void *k, kvm_dtype_t dt, int d, int nv);
void kvm_cpu_scores_portable(float *s, int lds, const float *q, int nq, const float *kt, int nblk, int d);
float kvm_cpu_softmax_portable(float *s, int nv, float *m, float *l);
void kvm_cpu_pv_portable(float *acc, const float *p, int lds, int nq, int nv, const float *const *v, int d,
                         const float *corr);
void kvm_cpu_widen_portable(float *dst, const void *src, kvm_dtype_t dt, size_t n);
void kvm_cpu_swiglu_portable(float *out, const float *gate, const float *up, size_t n);
#if defined(__x86_64__) || defined(__i386__)
void kvm_cpu_swiglu_avx512(float *out, const float *gate, const float *up, size_t n);
void kvm_cpu_swiglu_avx2(float *out, const float *gate, const float *up, size_t n);
void kvm_cpu_scores_avx512(float *s, int lds, const float *q, int nq, const float *kt, int nblk, int d);
float kvm_cpu_softmax_avx512(float *s, int nv, float *m, float *l);
void kvm_cpu_pv_avx512(float *acc, const float *p, int lds, int nq, int nv, const float *const *v, int d,
                       const float *corr);
void kvm_cpu_scores_avx2(float *s, int lds, const float *q, int nq, const float *kt, int nblk, int d);
float kvm_cpu_softmax_avx2(float *s, int nv, float *m, float *l);
void kvm_cpu_pv_avx2(float *acc, const float *p, int lds, int nq, int nv, const float *const *v, int d,
                     const float *corr);
#endif

/* The kernels in use: the best the CPU supports, or what kvm_cpu_force_isa chose. */
const cpu_kern_t *kvm_cpu_kern(void);

#endif
