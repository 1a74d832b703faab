/* gemm_cpu.c - the CPU backend's matmul: y[n, rows] = x[n, cols] . W^T (+ bias), W in F32/F16/BF16. */
#include <stdbool.h>
#include <stdlib.h>

#include "cpu_common.h"
#include "cpu_pool.h"

typedef struct {
    float *y;
    const float *x;
    const kvm_wmat_t *W;
    const float *bias;
    int n;
} matmul_task_t;

/* output rows [r0, r1) */
static void matmul_task(void *ctx, int r0, int r1, int tid) {
    const matmul_task_t *m = ctx;
    const kvm_wmat_t *W = m->W;
    const int rows = W->rows, cols = W->cols, n = m->n;
    const size_t es = kvm_dtype_size(W->dtype);
    float *wrow = NULL;
    if (W->dtype != KVM_F32) {
        wrow = kvm_cpu_scratch(tid, (size_t)cols * sizeof(float));
        KVM_ASSERT(wrow);
    }
    for (int r = r0; r < r1; r++) {
        const float *w;
        if (W->dtype == KVM_F32) {
            w = (const float *)W->data + (size_t)r * cols;
        } else {
            row_to_f32(wrow, (const char *)W->data + (size_t)r * cols * es, W->dtype, (size_t)cols);
            w = wrow;
        }
        float b = m->bias ? m->bias[r] : 0.0f;
        for (int t = 0; t < n; t++) m->y[(size_t)t * rows + r] = dot_f32(m->x + (size_t)t * cols, w, cols) + b;
    }
}

void kvm_cpu_matmul(float *y, const float *x, const kvm_wmat_t *W, const float *bias, int n) {
    const int rows = W->rows, cols = W->cols;
    /* small products are faster on one thread than handing out chunks */
    const bool par = (double)rows * cols * n > 131072.0;
    const int threads = kvm_cpu_pool_size();
    int grain = rows / (4 * threads);
    matmul_task_t m = {.y = y, .x = x, .W = W, .bias = bias, .n = n};
    kvm_cpu_parallel_for(rows, par ? (grain > 0 ? grain : 1) : rows, matmul_task, &m);
}
