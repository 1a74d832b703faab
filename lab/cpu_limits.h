/* cpu_limits.h - the CPU's own limits for `kvmesh bench engine --backend cpu` (cpu_limits.c), measured in the
 * same run as the engine: FMA throughput, a tuned SGEMM on the model's GEMM shapes (OpenBLAS when installed),
 * streaming read and copy bandwidth. */
#ifndef KVM_LAB_CPU_LIMITS_H
#define KVM_LAB_CPU_LIMITS_H

/* count GEMMs of y[m, n] = x[m, k] . W[n, k]^T */
typedef struct {
    int m, n, k, count;
} lab_gemm_shape_t;

typedef struct {
    int threads;
    const char *isa;         /* "AVX-512", "AVX2+FMA" or "scalar": the vectors of the FMA loop */
    double fma_gflops;       /* fp32 FMA throughput of `threads` cores, GFLOP/s */
    const char *sgemm_name;  /* NULL when no tuned SGEMM library is installed */
    double sgemm_gflops;     /* its best rate over the shapes, GFLOP/s (0 when absent) */
    double read_gbs, copy_gbs; /* streaming read; copy counting read + write bytes; GB/s */
} lab_cpu_limits_t;

/* Measures *L on `threads` threads (about a second); shapes may be NULL (no SGEMM). */
void lab_cpu_limits_measure(int threads, const lab_gemm_shape_t *shapes, int n_shapes, lab_cpu_limits_t *L);

#endif
