/* cublas_lazy.c - cuBLAS loaded when the CUDA backend first needs it, not when a process starts.
 *
 * Linking libcublas (which pulls in the 500 MB libcublasLt) costs every process that links libkvmesh about 0.35 s of
 * start-up on the project's machine (its initialisers and page faults), also `kvmesh --help`, `kvmesh trace ...`,
 * every `kvmesh client` call and every test binary, GPU or not: measured with an empty main() linked against the two
 * libraries, 0.356 s against 0.006 s. The backend calls six cuBLAS functions; this file defines them under the names
 * cublas_v2.h gives them and forwards each to the real one, resolved with dlopen/dlsym on first use (thread-safe).
 * The library is found by its soname (the loader's usual search: LD_LIBRARY_PATH, ld.so.cache), then in the CUDA
 * Toolkit's library folder found at build time (KVM_CUBLAS_DIR). If neither loads, the call returns
 * CUBLAS_STATUS_NOT_INITIALIZED and cuda_backend.c's error names the library and what to do. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>

#include <cublas_v2.h>


#define KVM_STR2(x) #x
#define KVM_STR(x) KVM_STR2(x)
#define CUBLAS_SONAME "libcublas.so." KVM_STR(CUBLAS_VER_MAJOR)

typedef cublasStatus_t (*create_fn)(cublasHandle_t *);
typedef cublasStatus_t (*set_stream_fn)(cublasHandle_t, cudaStream_t);
typedef cublasStatus_t (*set_math_fn)(cublasHandle_t, cublasMath_t);
typedef cublasStatus_t (*set_ws_fn)(cublasHandle_t, void *, size_t);
typedef cublasStatus_t (*gemm_ex_fn)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void *,
                                     const void *, cudaDataType, int, const void *, cudaDataType, int, const void *,
                                     void *, cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
typedef cublasStatus_t (*sgemm_fn)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const float *,
                                   const float *, int, const float *, int, const float *, float *, int);

static struct {
    pthread_once_t once;
    void *lib;
    create_fn create;
    set_stream_fn set_stream;
    set_math_fn set_math;
    set_ws_fn set_ws;
    gemm_ex_fn gemm_ex;
    sgemm_fn sgemm;
    char err[512];
} g_blas = {.once = PTHREAD_ONCE_INIT};

static void blas_load(void) {
    void *h = dlopen(CUBLAS_SONAME, RTLD_NOW | RTLD_LOCAL);
#ifdef KVM_CUBLAS_DIR
    if (!h) h = dlopen(KVM_CUBLAS_DIR "/" CUBLAS_SONAME, RTLD_NOW | RTLD_LOCAL);
#endif
    if (!h) {
        const char *e = dlerror();
        snprintf(g_blas.err, sizeof g_blas.err, "%s", e ? e : "not found");
        return;
    }
    g_blas.create = (create_fn)dlsym(h, "cublasCreate_v2");
    g_blas.set_stream = (set_stream_fn)dlsym(h, "cublasSetStream_v2");
    g_blas.set_math = (set_math_fn)dlsym(h, "cublasSetMathMode");
    g_blas.set_ws = (set_ws_fn)dlsym(h, "cublasSetWorkspace_v2");
    g_blas.gemm_ex = (gemm_ex_fn)dlsym(h, "cublasGemmEx");
    g_blas.sgemm = (sgemm_fn)dlsym(h, "cublasSgemm_v2");
    if (!g_blas.create || !g_blas.set_stream || !g_blas.set_math || !g_blas.set_ws || !g_blas.gemm_ex || !g_blas.sgemm) {
        snprintf(g_blas.err, sizeof g_blas.err, "%s lacks a function kvmesh calls (another major version?)",
                 CUBLAS_SONAME);
        dlclose(h);
        return;
    }
    g_blas.lib = h;
}

static bool blas_ready(void) {
    pthread_once(&g_blas.once, blas_load);
    return g_blas.lib != NULL;
}

const char *kvm_cublas_load_error(void) {
    return blas_ready() ? NULL : g_blas.err;
}

const char *kvm_cublas_soname(void) { return CUBLAS_SONAME; }

cublasStatus_t cublasCreate_v2(cublasHandle_t *handle) {
    return blas_ready() ? g_blas.create(handle) : CUBLAS_STATUS_NOT_INITIALIZED;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
    return blas_ready() ? g_blas.set_stream(handle, stream) : CUBLAS_STATUS_NOT_INITIALIZED;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
    return blas_ready() ? g_blas.set_math(handle, mode) : CUBLAS_STATUS_NOT_INITIALIZED;
}

cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void *workspace, size_t bytes) {
    return blas_ready() ? g_blas.set_ws(handle, workspace, bytes) : CUBLAS_STATUS_NOT_INITIALIZED;
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType at, int lda, const void *B, cudaDataType bt,
                            int ldb, const void *beta, void *C, cudaDataType ct, int ldc, cublasComputeType_t compute,
                            cublasGemmAlgo_t algo) {
    return blas_ready() ? g_blas.gemm_ex(handle, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc,
                                         compute, algo)
                        : CUBLAS_STATUS_NOT_INITIALIZED;
}

cublasStatus_t cublasSgemm_v2(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                              const float *alpha, const float *A, int lda, const float *B, int ldb, const float *beta,
                              float *C, int ldc) {
    return blas_ready() ? g_blas.sgemm(handle, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)
                        : CUBLAS_STATUS_NOT_INITIALIZED;
}
