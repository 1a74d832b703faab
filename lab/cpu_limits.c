/* cpu_limits.c - the CPU's own limits, measured in the run that reports against them (`kvmesh bench engine
 * --backend cpu`): the FMA throughput of the cores (a register-only loop of independent fused multiply-adds, the
 * widest vectors the CPU has), a tuned SGEMM on the model's own GEMM shapes (Debian's OpenBLAS, loaded at run time
 * when installed: kvmesh does not link it), and memory bandwidth (a streaming read and a copy of buffers far larger
 * than the caches). Each runs on `threads` threads at once, as the engine does. */
#include "cpu_limits.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <kvmesh_lab.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LAB_X86 1
#endif

/* ---- one timed job on n threads at once -------------------------------------------------------------- */

typedef struct {
    void (*fn)(void *arg, int tid, int n);
    void *arg;
    int tid, n;
    pthread_barrier_t *bar;
} job_t;

static void *job_main(void *p) {
    job_t *j = p;
    pthread_barrier_wait(j->bar);
    j->fn(j->arg, j->tid, j->n);
    return NULL;
}

/* Runs fn(arg, tid, n) on n threads started together; returns the wall time in seconds (0 when threads fail). */
static double run_threads(int n, void (*fn)(void *, int, int), void *arg) {
    if (n < 1) n = 1;
    if (n > 256) n = 256;
    pthread_t th[256];
    job_t jobs[256];
    pthread_barrier_t bar;
    if (pthread_barrier_init(&bar, NULL, (unsigned)n + 1)) return 0;
    int started = 0;
    for (; started < n; started++) {
        jobs[started] = (job_t){fn, arg, started, n, &bar};
        if (pthread_create(&th[started], NULL, job_main, &jobs[started])) break;
    }
    if (started < n) { /* release the ones that started; the barrier would never open otherwise */
        for (int i = 0; i < started; i++) pthread_cancel(th[i]);
        for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
        pthread_barrier_destroy(&bar);
        return 0;
    }
    uint64_t t0 = kvm_now_ns();
    pthread_barrier_wait(&bar);
    for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
    double s = (double)(kvm_now_ns() - t0) / 1e9;
    pthread_barrier_destroy(&bar);
    return s;
}

/* ---- FMA throughput ---------------------------------------------------------------------------------------- */

#define FMA_ITERS 500000L /* per thread; 12 vectors x 2 flops x lanes each */

typedef struct {
    int lanes;
    volatile float sink;
} fma_arg_t;

#ifdef LAB_X86
__attribute__((target("avx512f"))) static float fma_avx512(void) {
    __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-7f);
    __m512 c0 = _mm512_set1_ps(0), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0, c9 = c0,
           c10 = c0, c11 = c0;
    for (long i = 0; i < FMA_ITERS; i++) {
        c0 = _mm512_fmadd_ps(a, c0, b); c1 = _mm512_fmadd_ps(a, c1, b); c2 = _mm512_fmadd_ps(a, c2, b);
        c3 = _mm512_fmadd_ps(a, c3, b); c4 = _mm512_fmadd_ps(a, c4, b); c5 = _mm512_fmadd_ps(a, c5, b);
        c6 = _mm512_fmadd_ps(a, c6, b); c7 = _mm512_fmadd_ps(a, c7, b); c8 = _mm512_fmadd_ps(a, c8, b);
        c9 = _mm512_fmadd_ps(a, c9, b); c10 = _mm512_fmadd_ps(a, c10, b); c11 = _mm512_fmadd_ps(a, c11, b);
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)),
                             _mm512_add_ps(_mm512_add_ps(c4, c5), _mm512_add_ps(c6, c7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(c8, c9), _mm512_add_ps(c10, c11)));
    return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma"))) static float fma_avx2(void) {
    __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-7f);
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0, c9 = c0,
           c10 = c0, c11 = c0;
    for (long i = 0; i < FMA_ITERS; i++) {
        c0 = _mm256_fmadd_ps(a, c0, b); c1 = _mm256_fmadd_ps(a, c1, b); c2 = _mm256_fmadd_ps(a, c2, b);
        c3 = _mm256_fmadd_ps(a, c3, b); c4 = _mm256_fmadd_ps(a, c4, b); c5 = _mm256_fmadd_ps(a, c5, b);
        c6 = _mm256_fmadd_ps(a, c6, b); c7 = _mm256_fmadd_ps(a, c7, b); c8 = _mm256_fmadd_ps(a, c8, b);
        c9 = _mm256_fmadd_ps(a, c9, b); c10 = _mm256_fmadd_ps(a, c10, b); c11 = _mm256_fmadd_ps(a, c11, b);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)),
                             _mm256_add_ps(_mm256_add_ps(c4, c5), _mm256_add_ps(c6, c7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(c8, c9), _mm256_add_ps(c10, c11)));
    float v[8];
    _mm256_storeu_ps(v, s);
    return v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7];
}
#endif

static float fma_scalar(void) {
    float a = 0.999f, b = 1e-7f, c[12] = {0};
    for (long i = 0; i < FMA_ITERS / 16; i++)
        for (int k = 0; k < 12; k++) c[k] = a * c[k] + b;
    float s = 0;
    for (int k = 0; k < 12; k++) s += c[k];
    return s;
}

static int fma_lanes(const char **isa) {
#ifdef LAB_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        *isa = "AVX-512";
        return 16;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        *isa = "AVX2+FMA";
        return 8;
    }
#endif
    *isa = "scalar";
    return 1;
}

static void fma_job(void *p, int tid, int n) {
    (void)tid, (void)n;
    fma_arg_t *a = p;
    float r;
#ifdef LAB_X86
    if (a->lanes == 16) r = fma_avx512();
    else if (a->lanes == 8) r = fma_avx2();
    else r = fma_scalar();
#else
    r = fma_scalar();
#endif
    a->sink = r;
}

/* ---- memory bandwidth ------------------------------------------------------------------------------------------ */

typedef struct {
    float *src, *dst;
    size_t n; /* floats in each buffer */
    bool copy;
    volatile float sink;
} mem_arg_t;

static void mem_job(void *p, int tid, int n) {
    mem_arg_t *a = p;
    size_t per = a->n / (size_t)n, lo = per * (size_t)tid, hi = tid == n - 1 ? a->n : lo + per;
    if (a->copy) {
        memcpy(a->dst + lo, a->src + lo, (hi - lo) * sizeof(float));
        return;
    }
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
    size_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        s0 += a->src[i]; s1 += a->src[i + 1]; s2 += a->src[i + 2]; s3 += a->src[i + 3];
        s4 += a->src[i + 4]; s5 += a->src[i + 5]; s6 += a->src[i + 6]; s7 += a->src[i + 7];
    }
    for (; i < hi; i++) s0 += a->src[i];
    a->sink = s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7;
}

static void measure_memory(int threads, lab_cpu_limits_t *L) {
    const size_t n = (size_t)64 << 20; /* 256 MiB per buffer */
    mem_arg_t a = {.src = malloc(n * sizeof(float)), .dst = malloc(n * sizeof(float)), .n = n};
    if (!a.src || !a.dst) {
        free(a.src);
        free(a.dst);
        return;
    }
    for (size_t i = 0; i < n; i++) a.src[i] = a.dst[i] = (float)(i & 1023);
    double best_read = 0, best_copy = 0;
    for (int rep = 0; rep < 3; rep++) {
        a.copy = false;
        double t = run_threads(threads, mem_job, &a);
        if (t > 0 && (double)n * 4 / t > best_read) best_read = (double)n * 4 / t;
        a.copy = true;
        t = run_threads(threads, mem_job, &a);
        if (t > 0 && 2.0 * (double)n * 4 / t > best_copy) best_copy = 2.0 * (double)n * 4 / t;
    }
    L->read_gbs = best_read / 1e9;
    L->copy_gbs = best_copy / 1e9;
    free(a.src);
    free(a.dst);
}

/* ---- the SGEMM of a peer (OpenBLAS), on the model's GEMM shapes ---------------------------------------------- */

typedef void (*sgemm_fn)(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                         const float *b, int ldb, float beta, float *c, int ldc);
typedef void (*set_threads_fn)(int n);
enum { CBLAS_ROW_MAJOR = 101, CBLAS_NO_TRANS = 111, CBLAS_TRANS = 112 };

static void measure_sgemm(int threads, const lab_gemm_shape_t *shapes, int n_shapes, lab_cpu_limits_t *L) {
    const char *libs[] = {"libopenblas.so.0", "libopenblas.so"};
    void *h = NULL;
    for (size_t i = 0; i < sizeof libs / sizeof libs[0] && !h; i++) h = dlopen(libs[i], RTLD_NOW | RTLD_LOCAL);
    if (!h) return;
    sgemm_fn sgemm = (sgemm_fn)(uintptr_t)dlsym(h, "cblas_sgemm");
    set_threads_fn set_threads = (set_threads_fn)(uintptr_t)dlsym(h, "openblas_set_num_threads");
    if (!sgemm) return; /* the handle stays open, as below */
    if (set_threads) set_threads(threads);
    size_t need_x = 0, need_w = 0, need_y = 0;
    for (int s = 0; s < n_shapes; s++) {
        size_t m = (size_t)shapes[s].m, k = (size_t)shapes[s].k, nn = (size_t)shapes[s].n;
        if (m * k > need_x) need_x = m * k;
        if (nn * k > need_w) need_w = nn * k;
        if (m * nn > need_y) need_y = m * nn;
    }
    float *x = malloc(need_x * sizeof(float)), *w = malloc(need_w * sizeof(float)), *y = malloc(need_y * sizeof(float));
    if (x && w && y) {
        for (size_t i = 0; i < need_x; i++) x[i] = (float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
        for (size_t i = 0; i < need_w; i++) w[i] = (float)((i * 40503u) % 1000) / 1000.0f - 0.5f;
        double best = 0, flops = 0;
        for (int s = 0; s < n_shapes; s++) flops += 2.0 * shapes[s].m * shapes[s].n * shapes[s].k * shapes[s].count;
        for (int rep = 0; rep < 12; rep++) {
            uint64_t t0 = kvm_now_ns();
            for (int s = 0; s < n_shapes; s++)
                for (int c = 0; c < shapes[s].count; c++) /* y[m, n] = x[m, k] . w[n, k]^T, as the engine's matmul */
                    sgemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, shapes[s].m, shapes[s].n, shapes[s].k, 1.0f, x,
                          shapes[s].k, w, shapes[s].k, 0.0f, y, shapes[s].n);
            double t = (double)(kvm_now_ns() - t0) / 1e9;
            if (rep >= 2 && t > 0 && flops / t > best) best = flops / t;
        }
        L->sgemm_gflops = best / 1e9;
        L->sgemm_name = "OpenBLAS cblas_sgemm";
    }
    free(x);
    free(w);
    free(y);
    /* not dlclose'd: OpenBLAS's worker threads live on, and would wake up in unmapped code */
}

void lab_cpu_limits_measure(int threads, const lab_gemm_shape_t *shapes, int n_shapes, lab_cpu_limits_t *L) {
    memset(L, 0, sizeof *L);
    L->threads = threads;
    fma_arg_t f = {.lanes = fma_lanes(&L->isa)};
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t = run_threads(threads, fma_job, &f);
        double flops = (double)threads * FMA_ITERS / (f.lanes == 1 ? 16 : 1) * 12 * 2 * f.lanes;
        if (t > 0 && flops / t > best) best = flops / t;
    }
    L->fma_gflops = best / 1e9;
    measure_memory(threads, L);
    if (shapes && n_shapes > 0) measure_sgemm(threads, shapes, n_shapes, L);
}
