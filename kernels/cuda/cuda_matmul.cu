/* cuda_matmul.cu - y[n][rows] = x[n][cols] @ W^T (+ bias) on the GPU, for one matrix or several that share
 * their input (q/k/v, gate/up: one launch).
 *
 * - F32 weights ("fp32 mode", used for parity): cuBLAS SGEMM, true fp32 (no TF32).
 * - BF16/F16 weights, 1 row (batch-1 decode): our GEMV, which streams each weight row once with 16-byte
 *   loads against the fp32 activations (fp32 accumulation). cuBLAS at these shapes reaches well under half
 *   the memory bandwidth (perf.md §1).
 * - BF16/F16 weights, 2..16 rows (batched decode): our skinny tensor-core GEMM (mma.sync m16n8k16, the
 *   weights as the 16-row A operand, the activations rounded to 16 bits as B), weights read once.
 * - BF16/F16 weights, more rows (prefill): the activations are rounded to the weight dtype into scratch
 *   (once per input) and cublasGemmEx runs with fp32 output and fp32 compute (tensor cores).
 * The bias is added in our kernels' epilogue, or by a small kernel after cuBLAS. */
#include "cuda_internal.cuh"

#include <string.h>
#include <stdio.h>

#define S g_cuda.stream
#define KVM_GEMV_MAX_ROWS 8

/* ---- conversion and bias ------------------------------------------------------------------------------- */

template <typename T>
__global__ void k_to_half(T *__restrict__ dst, const float *__restrict__ src, size_t n) {
    kvm_pdl_trigger();
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

/* Up to 4 matrices that share one input (q, k, v; gate, up) go in one launch: work units (warps of the
 * GEMV, CTAs of the skinny GEMM) are numbered across the segments. */
template <typename T> struct mm_segs {
    const T *W[4];
    float *y[4];
    const float *bias[4];
    int rows[4];
    int start[5]; /* first work unit of each segment; start[nseg] = total */
    int nseg;
};

template <typename T> __device__ __forceinline__ int seg_of(const mm_segs<T> &sg, int unit) {
    int s = 0;
#pragma unroll
    for (int i = 1; i < 4; i++)
        if (i < sg.nseg && unit >= sg.start[i]) s = i;
    return s;
}

/* Each warp owns R consecutive output rows of one segment; lanes stride over the columns 8 at a time (one
 * 16-byte load of W per row), UNROLL loads in flight; x is read through L1 (it is shared by every warp).
 * cols % 8 == 0 and 16-byte aligned rows are required (checked by the caller). */
template <typename T, int M, int R, int UNROLL>
__global__ void __launch_bounds__(128) k_gemv(const mm_segs<T> sg, const float *__restrict__ x, int cols, int pf) {
    const int unit = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (unit >= sg.start[sg.nseg]) return;
    const int sgi = seg_of(sg, unit);
    const T *__restrict__ W = sg.W[sgi];
    const int rows = sg.rows[sgi];
    const int row0 = (unit - sg.start[sgi]) * R;
    float acc[M][R];
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[m][r] = 0.0f;
    const uint4 *wr[R];
#pragma unroll
    for (int r = 0; r < R; r++) wr[r] = reinterpret_cast<const uint4 *>(W + (size_t)min(row0 + r, rows - 1) * cols);
    const int nvec = cols / 8;
    /* The weights do not depend on the previous kernel: start reading them before waiting for it (pf 2:
     * the first loop iteration's loads into registers; pf 1: L2 prefetches of the first 8 KB; pf 0: none). */
    int v = lane;
    uint4 wv[UNROLL][R];
    bool pre = false;
    if (pf == 2 && v + 32 * (UNROLL - 1) < nvec) {
#pragma unroll
        for (int u = 0; u < UNROLL; u++)
#pragma unroll
            for (int r = 0; r < R; r++) wv[u][r] = __ldcs(wr[r] + v + 32 * u);
        pre = true;
    } else if (pf == 1) {
        for (int pv = lane; pv < nvec && pv < 32 * 16; pv += 32)
#pragma unroll
            for (int r = 0; r < R; r++) asm volatile("prefetch.global.L2 [%0];" ::"l"(wr[r] + pv));
    }
    kvm_pdl_wait();
    for (; v + 32 * (UNROLL - 1) < nvec; v += 32 * UNROLL) {
        if (!pre) {
#pragma unroll
            for (int u = 0; u < UNROLL; u++)
#pragma unroll
                for (int r = 0; r < R; r++) wv[u][r] = __ldcs(wr[r] + v + 32 * u);
        }
        pre = false;
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
        float *y = sg.y[sgi];
        const float *bias = sg.bias[sgi];
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
static void launch_gemv(mm_segs<T> sg, const float *x, int cols) {
    int u = 0;
    for (int i = 0; i < sg.nseg; i++) {
        sg.start[i] = u;
        u += (sg.rows[i] + R - 1) / R;
    }
    sg.start[sg.nseg] = u;
    kvm_launch_pdl(k_gemv<T, M, R, (M <= 2 ? 4 : 2)>, dim3((u + 3) / 4), dim3(128), 0, sg, x, cols, kvm_cuda_prefetch_mode());
}

template <typename T>
static void gemv_dispatch(const mm_segs<T> &sg, const float *x, int cols, int n) {
    switch (n) {
    case 1: launch_gemv<T, 1, 1>(sg, x, cols); break;
    case 2: launch_gemv<T, 2, 1>(sg, x, cols); break;
    case 3: launch_gemv<T, 3, 2>(sg, x, cols); break;
    case 4: launch_gemv<T, 4, 2>(sg, x, cols); break;
    case 5: launch_gemv<T, 5, 2>(sg, x, cols); break;
    case 6: launch_gemv<T, 6, 2>(sg, x, cols); break;
    case 7: launch_gemv<T, 7, 2>(sg, x, cols); break;
    default: launch_gemv<T, 8, 2>(sg, x, cols); break;
    }
}

/* ---- tensor-core skinny GEMM for 1..16 rows ------------------------------------------------------------ */

template <typename T> __device__ __forceinline__ void mma16816(float *c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                               uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float *c, uint32_t a0, uint32_t a1, uint32_t a2,
                                                                    uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__half>(float *c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                             uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

#define SK_WARPS 8
/* CTA = 16 weight rows of one segment; its 8 warps split the columns in chunks of 32 (chunk c goes to warp
 * c % 8) and meet in shared memory at the end. Thread (g = lane/4, t = lane%4) loads 16 bytes of rows g and
 * g+8 at columns 8t..8t+7 of a chunk, and the same 8 columns of activation rows g (and g+8), already
 * rounded to 16 bits (xh): since a dot product does not care about the order of its terms, these 8
 * physical columns play the logical k indices {2t, 2t+1, 2t+8, 2t+9} of two m16n8k16 steps, identically
 * for W (the A operand) and x (B). Weights are read once, with 16-byte loads. cols % 32 == 0. */
template <typename T, int NT>
__global__ void __launch_bounds__(SK_WARPS * 32) k_skinny(const mm_segs<T> sg, const T *__restrict__ xh, int cols, int M,
                                                          int pf) {
    __shared__ float red[SK_WARPS][16][16 + 1];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int sgi = seg_of(sg, (int)blockIdx.x);
    const T *__restrict__ W = sg.W[sgi];
    const int rows = sg.rows[sgi];
    const int row0 = ((int)blockIdx.x - sg.start[sgi]) * 16;
    const int ra = min(row0 + g, rows - 1), rb = min(row0 + g + 8, rows - 1);
    const uint4 *wa_p = reinterpret_cast<const uint4 *>(W + (size_t)ra * cols) + t;
    const uint4 *wb_p = reinterpret_cast<const uint4 *>(W + (size_t)rb * cols) + t;
    const uint4 *xp[NT];
    bool xv[NT];
#pragma unroll
    for (int j = 0; j < NT; j++) {
        const int tok = j * 8 + g;
        xv[j] = tok < M;
        xp[j] = reinterpret_cast<const uint4 *>(xh + (size_t)(xv[j] ? tok : 0) * cols) + t;
    }
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    const int nchunks = cols / 32;
    int c = warp;
    uint4 wa0, wb0, wa1, wb1; /* weights first, as in k_gemv */
    bool pre = false;
    if (pf == 2 && c + SK_WARPS < nchunks) {
        wa0 = __ldcs(wa_p + c * 4), wb0 = __ldcs(wb_p + c * 4);
        wa1 = __ldcs(wa_p + (c + SK_WARPS) * 4), wb1 = __ldcs(wb_p + (c + SK_WARPS) * 4);
        pre = true;
    } else if (pf == 1) {
        for (int pc = warp; pc < nchunks && pc < warp + 8 * SK_WARPS; pc += SK_WARPS) {
            asm volatile("prefetch.global.L2 [%0];" ::"l"(wa_p + pc * 4));
            asm volatile("prefetch.global.L2 [%0];" ::"l"(wb_p + pc * 4));
        }
    }
    kvm_pdl_wait();
    for (; c + SK_WARPS < nchunks; c += 2 * SK_WARPS) {
        if (!pre) {
            wa0 = __ldcs(wa_p + c * 4), wb0 = __ldcs(wb_p + c * 4);
            wa1 = __ldcs(wa_p + (c + SK_WARPS) * 4), wb1 = __ldcs(wb_p + (c + SK_WARPS) * 4);
        }
        pre = false;
        uint4 x0[NT], x1[NT];
#pragma unroll
        for (int j = 0; j < NT; j++) {
            x0[j] = xv[j] ? __ldg(xp[j] + c * 4) : make_uint4(0, 0, 0, 0);
            x1[j] = xv[j] ? __ldg(xp[j] + (c + SK_WARPS) * 4) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < NT; j++) {
            mma16816<T>(acc[j], wa0.x, wb0.x, wa0.y, wb0.y, x0[j].x, x0[j].y);
            mma16816<T>(acc[j], wa0.z, wb0.z, wa0.w, wb0.w, x0[j].z, x0[j].w);
            mma16816<T>(acc[j], wa1.x, wb1.x, wa1.y, wb1.y, x1[j].x, x1[j].y);
            mma16816<T>(acc[j], wa1.z, wb1.z, wa1.w, wb1.w, x1[j].z, x1[j].w);
        }
    }
    for (; c < nchunks; c += SK_WARPS) {
        const uint4 wa = __ldcs(wa_p + c * 4), wb = __ldcs(wb_p + c * 4);
#pragma unroll
        for (int j = 0; j < NT; j++) {
            const uint4 xx = xv[j] ? __ldg(xp[j] + c * 4) : make_uint4(0, 0, 0, 0);
            mma16816<T>(acc[j], wa.x, wb.x, wa.y, wb.y, xx.x, xx.y);
            mma16816<T>(acc[j], wa.z, wb.z, wa.w, wb.w, xx.z, xx.w);
        }
    }
    /* c0,c1: row g, tokens j*8 + 2t, +1; c2,c3: row g+8 */
#pragma unroll
    for (int j = 0; j < NT; j++) {
        red[warp][g][j * 8 + 2 * t] = acc[j][0];
        red[warp][g][j * 8 + 2 * t + 1] = acc[j][1];
        red[warp][g + 8][j * 8 + 2 * t] = acc[j][2];
        red[warp][g + 8][j * 8 + 2 * t + 1] = acc[j][3];
    }
    __syncthreads();
    float *y = sg.y[sgi];
    const float *bias = sg.bias[sgi];
    for (int e = threadIdx.x; e < 16 * NT * 8; e += blockDim.x) {
        const int r = e % 16, tok = e / 16; /* consecutive threads: consecutive rows (coalesced stores) */
        const int row = row0 + r;
        if (tok < M && row < rows) {
            float v = 0.0f;
#pragma unroll
            for (int w = 0; w < SK_WARPS; w++) v += red[w][r][tok];
            y[(size_t)tok * rows + row] = v + (bias ? bias[row] : 0.0f);
        }
    }
}

template <typename T>
static void skinny_dispatch(mm_segs<T> sg, const T *xh, int cols, int n) {
    int u = 0;
    for (int i = 0; i < sg.nseg; i++) {
        sg.start[i] = u;
        u += (sg.rows[i] + 15) / 16;
    }
    sg.start[sg.nseg] = u;
    const int pf = kvm_cuda_prefetch_mode();
    if (n <= 8) kvm_launch_pdl(k_skinny<T, 1>, dim3(u), dim3(SK_WARPS * 32), 0, sg, xh, cols, n, pf);
    else kvm_launch_pdl(k_skinny<T, 2>, dim3(u), dim3(SK_WARPS * 32), 0, sg, xh, cols, n, pf);
}

/* The activations last rounded to 16 bits (q, k and v, or gate and up, share one input): reused while no
 * other op ran in between (every other op calls kvm_cuda_touch). The copy lives at the start of scratch. */
static const float *g_xh_src;
static size_t g_xh_n;
static kvm_dtype_t g_xh_dt;
static kvm_dtype_t g_last_half = KVM_F32; /* dtype of the last 16-bit rounding (the model's weight dtype) */
void kvm_cuda_touch(void) { g_xh_src = NULL; }
kvm_dtype_t kvm_cuda_half_dtype(void) { return g_last_half; }
void kvm_cuda_set_rounded(const float *src, size_t n, kvm_dtype_t dt) {
    g_xh_src = src;
    g_xh_n = n;
    g_xh_dt = dt;
}

static const void *rounded_input(const float *x, size_t nx, kvm_dtype_t dt) {
    void *xh = kvm_cuda_scratch(nx * 2);
    if (!xh) return NULL;
    if (g_xh_src == x && g_xh_n == nx && g_xh_dt == dt && xh == g_cuda.ws) return xh;
    unsigned grid = (unsigned)((nx + 255) / 256);
    if (grid > 65535u * 16u) grid = 65535u * 16u;
    if (!grid) grid = 1;
    if (dt == KVM_BF16) k_to_half<__nv_bfloat16><<<grid, 256, 0, S>>>((__nv_bfloat16 *)xh, x, nx);
    else k_to_half<__half><<<grid, 256, 0, S>>>((__half *)xh, x, nx);
    if (KVM_CU_LAUNCH("matmul: activations to 16 bit")) return NULL;
    g_xh_src = x;
    g_xh_n = nx;
    g_xh_dt = dt;
    g_last_half = dt;
    return xh;
}

/* Which kernel serves few rows (KVM_CUDA_SKINNY=gemv | mma; default: the GEMV for 1 row, the tensor-core
 * kernel for 2..16). */
static int skinny_mode(void) {
    const char *e = getenv("KVM_CUDA_SKINNY"); /* read each time: the benchmark compares both */
    return e && !strcmp(e, "gemv") ? 1 : e && !strcmp(e, "mma") ? 2 : 0;
}

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

/* cuBLAS for one matrix (fp32 SGEMM, or 16-bit GemmEx on the rounded input), then the bias. */
static void matmul_blas(float *y, const float *x, const kvm_wmat_t *W, const float *bias, int n, const void *xh_given) {
    const int rows = W->rows, cols = W->cols;
    const float one = 1.0f, zero = 0.0f;
    cublasStatus_t st;
    if (W->dtype == KVM_F32) {
        st = cublasSgemm(g_cuda.blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, n, cols, &one, (const float *)W->data, cols, x, cols,
                         &zero, y, rows);
    } else {
        const void *xh = xh_given ? xh_given : rounded_input(x, (size_t)n * cols, W->dtype);
        if (!xh) return;
        cudaDataType_t dt = W->dtype == KVM_BF16 ? CUDA_R_16BF : CUDA_R_16F;
        st = cublasGemmEx(g_cuda.blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, n, cols, &one, W->data, dt, cols, xh, dt, cols, &zero,
                          y, CUDA_R_32F, rows, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    }
    if (y == g_xh_src) g_xh_src = NULL;
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

/* y[i] = x @ W[i]^T (+ bias[i]) for count matrices of the same dtype and width sharing the input x.
 * Few rows: one launch for all of them; more: cuBLAS per matrix (the rounded input is made once). */
static void matmul_segments(int count, float *const *y, const kvm_wmat_t *const *W, const float *const *bias,
                            const float *x, int n) {
    const int cols = W[0]->cols;
    const kvm_dtype_t dt = W[0]->dtype;
    bool vec_ok = dt != KVM_F32 && (cols % 8) == 0 && ((uintptr_t)x % 16) == 0 && count <= 4;
    for (int i = 0; i < count; i++)
        vec_ok = vec_ok && W[i]->dtype == dt && W[i]->cols == cols && ((uintptr_t)W[i]->data % 16) == 0 && W[i]->rows > 0;
    const int mode = skinny_mode();
    const bool use_skinny = vec_ok && n <= 16 && (cols % 32) == 0 && mode != 1 && !(mode == 0 && n == 1);
    const bool use_gemv = vec_ok && !use_skinny && n <= KVM_GEMV_MAX_ROWS;
    char pname[112];
    if (g_kvm_prof_on) {
        int rows = 0;
        for (int i = 0; i < count; i++) rows += W[i]->rows;
        snprintf(pname, sizeof pname, "matmul %s %dx%d%s m=%d %s", kvm_dtype_name(dt), rows, cols, count > 1 ? " (fused)" : "",
                 n, use_skinny ? "mma" : use_gemv ? "gemv" : dt == KVM_F32 ? "sgemm" : "cublas");
    }
    KVM_PROF(g_kvm_prof_on ? pname : "matmul");
    if (use_skinny || use_gemv) {
#define KVM_SEGS(TT)                                                                                                     \
    mm_segs<TT> sg;                                                                                                      \
    memset(&sg, 0, sizeof sg);                                                                                           \
    sg.nseg = count;                                                                                                     \
    for (int i = 0; i < count; i++) {                                                                                    \
        sg.W[i] = (const TT *)W[i]->data;                                                                                \
        sg.y[i] = y[i];                                                                                                  \
        sg.bias[i] = bias ? bias[i] : NULL;                                                                              \
        sg.rows[i] = W[i]->rows;                                                                                         \
    }
        if (use_skinny) {
            const void *xh = rounded_input(x, (size_t)n * cols, dt);
            if (!xh) return;
            if (dt == KVM_BF16) {
                KVM_SEGS(__nv_bfloat16)
                skinny_dispatch<__nv_bfloat16>(sg, (const __nv_bfloat16 *)xh, cols, n);
            } else {
                KVM_SEGS(__half)
                skinny_dispatch<__half>(sg, (const __half *)xh, cols, n);
            }
        } else if (dt == KVM_BF16) {
            KVM_SEGS(__nv_bfloat16)
            gemv_dispatch<__nv_bfloat16>(sg, x, cols, n);
        } else {
            KVM_SEGS(__half)
            gemv_dispatch<__half>(sg, x, cols, n);
        }
#undef KVM_SEGS
        for (int i = 0; i < count; i++)
            if (y[i] == g_xh_src) g_xh_src = NULL;
        KVM_CU_LAUNCH(use_skinny ? "skinny mma gemm" : "gemv");
        return;
    }
    for (int i = 0; i < count; i++) matmul_blas(y[i], x, W[i], bias ? bias[i] : NULL, n, NULL);
}

void kvm_cuda_matmul(float *y, const float *x, const kvm_wmat_t *W, const float *bias, int n) {
    if (n <= 0 || W->rows <= 0 || W->cols <= 0) return;
    matmul_segments(1, &y, &W, &bias, x, n);
}

void kvm_cuda_matmul_multi(int count, float *const *y, const kvm_wmat_t *const *W, const float *const *bias, const float *x,
                           int n) {
    if (n <= 0 || count <= 0) return;
    for (int i = 1; i < count; i++)
        if (W[i]->cols != W[0]->cols) {
            kvm_cuda_fail(KVM_EINVAL, "cuda matmul_multi: matrix %d has %d columns, matrix 0 has %d", i, W[i]->cols, W[0]->cols);
            return;
        }
    for (int i = 0; i < count; i += 4) matmul_segments(count - i < 4 ? count - i : 4, y + i, W + i, bias ? bias + i : NULL, x, n);
}

/* The down projection of the MLP with SwiGLU in front. With 16-bit weights and more than one row, the
 * activation silu(gate) * up goes straight to 16 bits in scratch (no fp32 copy, no second rounding pass);
 * otherwise SwiGLU runs in fp32 into gate, then the matmul. */
void kvm_cuda_swiglu_matmul(float *y, float *gate, const float *up, const kvm_wmat_t *W, int n) {
    const int rows = W->rows, cols = W->cols;
    if (n <= 0 || rows <= 0 || cols <= 0) return;
    const bool half_in = W->dtype != KVM_F32 && n > 1 && (cols % 32) == 0 && ((uintptr_t)W->data % 16) == 0 &&
                         ((uintptr_t)gate % 16) == 0 && ((uintptr_t)up % 16) == 0;
    if (!half_in) {
        kvm_cuda_swiglu(gate, gate, up, (size_t)n * cols);
        kvm_cuda_matmul(y, gate, W, NULL, n);
        return;
    }
    kvm_cuda_touch(); /* scratch is about to hold this activation */
    void *xh = kvm_cuda_scratch((size_t)n * cols * 2);
    if (!xh) return;
    {
        KVM_PROF("swiglu to 16 bit");
        kvm_cuda_swiglu_half(xh, W->dtype, gate, up, (size_t)n * cols);
    }
    const bool skinny = n <= 16 && skinny_mode() != 1;
    char pname[112];
    if (g_kvm_prof_on)
        snprintf(pname, sizeof pname, "matmul %s %dx%d m=%d %s", kvm_dtype_name(W->dtype), rows, cols, n, skinny ? "mma" : "cublas");
    KVM_PROF(g_kvm_prof_on ? pname : "matmul");
    if (skinny) {
        if (W->dtype == KVM_BF16) {
            mm_segs<__nv_bfloat16> sg;
            memset(&sg, 0, sizeof sg);
            sg.nseg = 1;
            sg.W[0] = (const __nv_bfloat16 *)W->data;
            sg.y[0] = y;
            sg.rows[0] = rows;
            skinny_dispatch<__nv_bfloat16>(sg, (const __nv_bfloat16 *)xh, cols, n);
        } else {
            mm_segs<__half> sg;
            memset(&sg, 0, sizeof sg);
            sg.nseg = 1;
            sg.W[0] = (const __half *)W->data;
            sg.y[0] = y;
            sg.rows[0] = rows;
            skinny_dispatch<__half>(sg, (const __half *)xh, cols, n);
        }
        KVM_CU_LAUNCH("skinny mma gemm");
        return;
    }
    matmul_blas(y, NULL, W, NULL, n, xh);
}
