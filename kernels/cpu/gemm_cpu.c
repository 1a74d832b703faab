/* gemm_cpu.c - the CPU backend's matmul: y[n, rows] = x[n, cols] . W^T (+ bias), W in F32/F16/BF16. */
#include <stdbool.h>
#include <stdlib.h>

#include "cpu_common.h"
#include "cpu_pool.h"

void kvm_cpu_matmul(float *y, const float *x, const kvm_wmat_t *W, const float *bias, int n) {
    const int rows = W->rows, cols = W->cols;
    const size_t es = kvm_dtype_size(W->dtype);
    /* small products are faster on one thread than the fork/join of a parallel region */
    const bool par = (double)rows * cols * n > 131072.0;
#pragma omp parallel if (par)
    {
        float *wrow = NULL;
        if (W->dtype != KVM_F32) wrow = malloc((size_t)cols * sizeof(float));
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) {
            const float *w;
            if (W->dtype == KVM_F32) {
                w = (const float *)W->data + (size_t)r * cols;
            } else {
                row_to_f32(wrow, (const char *)W->data + (size_t)r * cols * es, W->dtype, (size_t)cols);
                w = wrow;
            }
            float b = bias ? bias[r] : 0.0f;
            for (int t = 0; t < n; t++) y[(size_t)t * rows + r] = dot_f32(x + (size_t)t * cols, w, cols) + b;
        }
        free(wrow);
    }
}

