/* cpu_pool.c - kvm_cpu_parallel_for (cpu_pool.h). First version: OpenMP underneath. */
#include "cpu_pool.h"

#include <stdlib.h>

#include "../../runtime/core/core.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define POOL_MAX_THREADS 256

static struct {
    void *p;
    size_t cap;
} g_scratch[POOL_MAX_THREADS];

int kvm_cpu_pool_size(void) { return kvm_threads(); }

void *kvm_cpu_scratch(int tid, size_t bytes) {
    if (tid < 0 || tid >= POOL_MAX_THREADS) return NULL;
    if (g_scratch[tid].cap < bytes) {
        size_t cap = (bytes + 63) & ~(size_t)63;
        void *p = aligned_alloc(64, cap);
        if (!p) {
            kvm_seterr(KVM_ENOMEM, "out of host memory allocating %zu bytes of kernel scratch", bytes);
            return NULL;
        }
        free(g_scratch[tid].p);
        g_scratch[tid].p = p;
        g_scratch[tid].cap = cap;
    }
    return g_scratch[tid].p;
}

void kvm_cpu_parallel_for(int n, int grain, kvm_cpu_task_fn fn, void *ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    int chunks = (n + grain - 1) / grain;
#ifdef _OPENMP
    if (chunks > 1 && kvm_threads() > 1 && !omp_in_parallel()) {
#pragma omp parallel for schedule(dynamic, 1)
        for (int c = 0; c < chunks; c++) {
            int i0 = c * grain, i1 = i0 + grain < n ? i0 + grain : n;
            fn(ctx, i0, i1, omp_get_thread_num());
        }
        return;
    }
#endif
    for (int c = 0; c < chunks; c++) {
        int i0 = c * grain, i1 = i0 + grain < n ? i0 + grain : n;
        fn(ctx, i0, i1, 0);
    }
}
