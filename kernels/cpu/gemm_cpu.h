/* gemm_cpu.h - the CPU backend's kernel paths per instruction set (internal to kernels/cpu).
 *
 * gemm_cpu.c and attn_cpu.c split the work and hand pieces to one cpu_kern_t: the portable C one (every
 * machine, and the oracle-shaped fallback), AVX2+FMA+F16C or AVX-512 (F, BW, VL), chosen once at run time
 * with __builtin_cpu_supports. The x86 paths are compiled with __attribute__((target(...))) in
 * gemm_cpu_x86.c / attn_cpu_x86.c: the build has no -march flag, so the binary runs on any x86-64.
 *
 * Matmul pieces (y[n][rows] = x[n][cols] . W^T + bias, W row-major [rows][cols] in F32/F16/BF16):
 *   pack(dst, w, dt, cols, r0, nrows, k0, kc): dst[kc][nr] (fp32) = W[r0 + j][k0 + k] for j < nrows, 0 for
 *       nrows <= j < nr: a panel of nr weight rows, transposed so that nr rows lie across the SIMD lanes.
 *   tile(y, ldy, x, ldx, pw, kc, m, nv, bias, acc): for t < m (<= mr), j < nv (<= nr):
 *       y[t * ldy + j] = (acc ? y[t * ldy + j] : bias ? bias[j] : 0) + sum_{k < kc} x[t * ldx + k] * pw[k * nr + j]
 *       (fp32, k in order: one FMA chain per output).
 *   dot(y, ldy, x, ldx, w, dt, cols, r0, r1, n, bias): rows [r0, r1) of the whole product for all n tokens, the
 *       weight rows streamed in their dtype without a packing pass (decode GEMV and other small n).
 * Attention pieces (attn_cpu.c): over one key block of KVM_KV_BLOCK (16) positions,
 *   scores(s, q, kt, d): s[j] = sum_{i < d} q[i] * kt[i * 16 + j] for j < 16;
 *   softmax_pv(...): the online-softmax update of one query (attn_cpu.c documents it). */
#ifndef KVM_GEMM_CPU_H
#define KVM_GEMM_CPU_H

#include "../ops.h"

enum { KVM_CPU_ISA_AUTO = -1, KVM_CPU_ISA_PORTABLE = 0, KVM_CPU_ISA_AVX2 = 1, KVM_CPU_ISA_AVX512 = 2 };

typedef struct cpu_kern {
    const char *name;
    int nr, mr, kc_max;
    void (*pack)(float *dst, const void *w, kvm_dtype_t dt, int cols, int r0, int nrows, int k0, int kc);
    void (*tile)(float *y, int ldy, const float *x, int ldx, const float *pw, int kc, int m, int nv, const float *bias,
                 int acc);
    void (*dot)(float *y, int ldy, const float *x, int ldx, const void *w, kvm_dtype_t dt, int cols, int r0, int r1, int n,
                const float *bias);
    /* one query's online-softmax step over one key block: s[16] raw scores (already scaled), nv valid keys
     * (j < nv), running max *m and sum *l, acc[d] += sum_j p_j * vb[j * d + :] after rescaling by exp(m_old - m_new) */
    void (*softmax_pv)(float *acc, float *m, float *l, const float *s, int nv, const float *vb, int d);
    void (*scores)(float *s, const float *q, const float *kt, int d);
    /* kt[d][16] = the first nv rows of k[16][d] (dtype dt) transposed to fp32, rows nv.. zero */
    void (*load_kt)(float *kt, const void *k, kvm_dtype_t dt, int d, int nv);
} cpu_kern_t;

extern const cpu_kern_t kvm_cpu_kern_portable;
#if defined(__x86_64__) || defined(__i386__)
extern const cpu_kern_t kvm_cpu_kern_avx2, kvm_cpu_kern_avx512;
#endif

/* The kernels in use: the best the CPU supports, or what kvm_cpu_force_isa chose. */
const cpu_kern_t *kvm_cpu_kern(void);

#endif
