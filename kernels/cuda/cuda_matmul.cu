/* cuda_matmul.cu - y[n][rows] = x[n][cols] @ W^T (+ bias) on the GPU.
 *
 * - F32 weights ("fp32 mode", used for parity): cuBLAS SGEMM, true fp32 (no TF32).
 * - BF16/F16 weights, few rows (n <= KVM_GEMV_MAX_ROWS, the decode case): our own GEMV-like kernel that
 *   streams each weight row once with 16-byte loads and multiplies it with the fp32 activations of all n
 *   rows (fp32 accumulation). cuBLAS at these shapes reaches well under half the memory bandwidth
 *   (perf.md §1).
 * - BF16/F16 weights, more rows (prefill): the activations are rounded to the weight dtype into scratch
 *   and cublasGemmEx runs with fp32 output and fp32 compute (tensor cores).
 * The bias is added in the GEMV epilogue, or by a small kernel after cuBLAS. */
#include "cuda_internal.cuh"

#define S g_cuda.stream
#define KVM_GEMV_MAX_ROWS 8

/* ---- conversion and bias ------------------------------------------------------------------------------- */

template <typename T>
__global__ void k_to_half(T *__restrict__ dst, const float *__restrict__ src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = kvm_from_f32<T>(src[i]);
}

__global__ void k_bias(float *y, const float *__restrict__ bias, int rows, size_t total) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        y[i] += bias[i % rows];
}

/* ---- GEMV for few rows ------------------------------------------------------------------------------------ */

__device__ __forceinline__ void unpack8(const uint4 &u, float *f, const __nv_bfloat16 *) {
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 t = __bfloat1622float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}
__device__ __forceinline__ void unpack8(const uint4 &u, float *f, const __half *) {
    const __half2 *h = reinterpret_cast<const __half2 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 t = __half22float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

/* Each warp owns R consecutive output rows; lanes stride over the columns 8 at a time (one 16-byte load
 * of W per row), UNROLL loads in flight; x is read through L1 (it is shared by every warp). cols % 8 == 0
 * and 16-byte aligned rows are required (checked by the caller). */
template <typename T, int M, int R, int UNROLL>
__global__ void __launch_bounds__(128) k_gemv(float *__restrict__ y, const float *__restrict__ x, const T *__restrict__ W,
                                              const float *__restrict__ bias, int rows, int cols) {
    const int warp = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    const int row0 = warp * R;
    if (row0 >= rows) return;
    float acc[M][R];
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[m][r] = 0.0f;
    const uint4 *wr[R];
#pragma unroll
    for (int r = 0; r < R; r++) wr[r] = reinterpret_cast<const uint4 *>(W + (size_t)min(row0 + r, rows - 1) * cols);
    const int nvec = cols / 8;
    int v = lane;
    for (; v + 32 * (UNROLL - 1) < nvec; v += 32 * UNROLL) {
        uint4 wv[UNROLL][R];
#pragma unroll
        for (int u = 0; u < UNROLL; u++)
#pragma unroll
            for (int r = 0; r < R; r++) wv[u][r] = __ldcs(wr[r] + v + 32 * u);
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int c = (v + 32 * u) * 8;
#pragma unroll
            for (int m = 0; m < M; m++) {
                const float4 xa = __ldg(reinterpret_cast<const float4 *>(x + (size_t)m * cols + c));
                const float4 xb = __ldg(reinterpret_cast<const float4 *>(x + (size_t)m * cols + c + 4));
#pragma unroll
                for (int r = 0; r < R; r++) {
                    float f[8];
                    unpack8(wv[u][r], f, (const T *)0);
                    acc[m][r] += f[0] * xa.x + f[1] * xa.y + f[2] * xa.z + f[3] * xa.w + f[4] * xb.x + f[5] * xb.y +
                                 f[6] * xb.z + f[7] * xb.w;
                }
            }
        }
    }
    for (; v < nvec; v += 32) {
        uint4 wv[R];
#pragma unroll
        for (int r = 0; r < R; r++) wv[r] = __ldcs(wr[r] + v);
        const int c = v * 8;
#pragma unroll
        for (int m = 0; m < M; m++) {
            const float4 xa = __ldg(reinterpret_cast<const float4 *>(x + (size_t)m * cols + c));
            const float4 xb = __ldg(reinterpret_cast<const float4 *>(x + (size_t)m * cols + c + 4));
#pragma unroll
            for (int r = 0; r < R; r++) {
                float f[8];
                unpack8(wv[r], f, (const T *)0);
                acc[m][r] += f[0] * xa.x + f[1] * xa.y + f[2] * xa.z + f[3] * xa.w + f[4] * xb.x + f[5] * xb.y +
                             f[6] * xb.z + f[7] * xb.w;
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[m][r] = kvm_warp_sum(acc[m][r]);
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int row = row0 + r;
            if (row < rows) {
                const float b = bias ? bias[row] : 0.0f;
#pragma unroll
                for (int m = 0; m < M; m++) y[(size_t)m * rows + row] = acc[m][r] + b;
            }
        }
    }
}

template <typename T, int M, int R>
static void launch_gemv(float *y, const float *x, const T *W, const float *bias, int rows, int cols) {
    const int warps = (rows + R - 1) / R;
    const int blocks = (warps + 3) / 4;
    k_gemv<T, M, R, (M <= 2 ? 4 : 2)><<<blocks, 128, 0, S>>>(y, x, W, bias, rows, cols);
}

template <typename T>
static void gemv_dispatch(float *y, const float *x, const T *W, const float *bias, int rows, int cols, int n) {
    switch (n) {
    case 1: launch_gemv<T, 1, 1>(y, x, W, bias, rows, cols); break;
    case 2: launch_gemv<T, 2, 1>(y, x, W, bias, rows, cols); break;
    case 3: launch_gemv<T, 3, 2>(y, x, W, bias, rows, cols); break;
    case 4: launch_gemv<T, 4, 2>(y, x, W, bias, rows, cols); break;
    case 5: launch_gemv<T, 5, 2>(y, x, W, bias, rows, cols); break;
    case 6: launch_gemv<T, 6, 2>(y, x, W, bias, rows, cols); break;
    case 7: launch_gemv<T, 7, 2>(y, x, W, bias, rows, cols); break;
    default: launch_gemv<T, 8, 2>(y, x, W, bias, rows, cols); break;
    }
}

/* ---- the op ------------------------------------------------------------------------------------------------ */

static const char *blas_status(cublasStatus_t st) {
    switch (st) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "alloc failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "invalid value";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "arch mismatch";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "execution failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "not supported";
    default: return "error";
    }
}

void kvm_cuda_matmul(float *y, const float *x, const kvm_wmat_t *W, const float *bias, int n) {
    const int rows = W->rows, cols = W->cols;
    if (n <= 0 || rows <= 0 || cols <= 0) return;
    const float one = 1.0f, zero = 0.0f;
    cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
    const bool vec_ok = (cols % 8) == 0 && ((uintptr_t)W->data % 16) == 0 && ((uintptr_t)x % 16) == 0;
    if (W->dtype != KVM_F32 && n <= KVM_GEMV_MAX_ROWS && vec_ok) {
        if (W->dtype == KVM_BF16) gemv_dispatch<__nv_bfloat16>(y, x, (const __nv_bfloat16 *)W->data, bias, rows, cols, n);
        else gemv_dispatch<__half>(y, x, (const __half *)W->data, bias, rows, cols, n);
        KVM_CU_LAUNCH("gemv");
        return;
    }
    if (W->dtype == KVM_F32) {
        st = cublasSgemm(g_cuda.blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, n, cols, &one, (const float *)W->data, cols, x, cols,
                         &zero, y, rows);
    } else {
        const size_t nx = (size_t)n * cols;
        void *xh = kvm_cuda_scratch(nx * 2);
        if (!xh) return;
        cudaDataType_t dt = W->dtype == KVM_BF16 ? CUDA_R_16BF : CUDA_R_16F;
        unsigned grid = (unsigned)((nx + 255) / 256);
        if (grid > 65535u * 16u) grid = 65535u * 16u;
        if (!grid) grid = 1;
        if (W->dtype == KVM_BF16) k_to_half<__nv_bfloat16><<<grid, 256, 0, S>>>((__nv_bfloat16 *)xh, x, nx);
        else k_to_half<__half><<<grid, 256, 0, S>>>((__half *)xh, x, nx);
        if (KVM_CU_LAUNCH("matmul: activations to 16 bit")) return;
        st = cublasGemmEx(g_cuda.blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, n, cols, &one, W->data, dt, cols, xh, dt, cols, &zero,
                          y, CUDA_R_32F, rows, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    }
    if (st != CUBLAS_STATUS_SUCCESS) {
        kvm_cuda_fail(KVM_EDEVICE, "cuda: cuBLAS GEMM %s [%d x %d] x %d rows failed: %s", kvm_dtype_name(W->dtype), rows,
                      cols, n, blas_status(st));
        return;
    }
    if (bias) {
        size_t total = (size_t)n * rows;
        unsigned grid = (unsigned)((total + 255) / 256);
        if (grid > 65535u * 16u) grid = 65535u * 16u;
        k_bias<<<grid, 256, 0, S>>>(y, bias, rows, total);
        KVM_CU_LAUNCH("matmul bias");
    }
}
