/* cpu_kernels.h - the CPU backend's kernels that live in their own files (gemm_cpu.c, attn_cpu.c); the
 * op table in ops_cpu.c points at them. Signatures are those of kvm_ops_t (kernels/ops.h). */
#ifndef KVM_CPU_KERNELS_H
#define KVM_CPU_KERNELS_H

#include "../ops.h"

void kvm_cpu_matmul(float *y, const float *x, const kvm_wmat_t *W, const float *bias, int n);
void kvm_cpu_attention(float *out, const float *q, const void *kv, const kvm_kv_geom_t *g, int layer, int heads,
                       const kvm_attn_batch_t *b, float scale);

/* Tests only: run the kernels above on one instruction-set path: 0 portable C, 1 AVX2+FMA+F16C, 2 AVX-512
 * (F/BW/VL/DQ), -1 the best the CPU supports (the default). A path the CPU lacks is clamped to the best it has.
 * Returns the path now in use. Process-wide and not thread-safe: call it while no kernel runs. */
int kvm_cpu_force_isa(int isa);

/* kvm_ops_t.attn_mass (kernels/ops.h) on the CPU */
void kvm_cpu_attn_mass(float *mass, int n, int from_pos, const float *q, const void *kv, const kvm_kv_geom_t *g,
                       int layer, int heads, const kvm_attn_batch_t *b, float scale);

#endif
