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

/* Each work unit is R consecutive output rows of one segment, owned by one warp; lanes stride over the unit's
 * columns 8 at a time (one 16-byte load of W per row), UNROLL loads in flight; x is read through L1 (it is shared
 * by every warp). cols % 8 == 0 and 16-byte aligned rows are required (checked by the caller). Splitting a row's
 * columns over 2 or 4 warps (tried as opts.gemv_split, 2026-12-07) did not speed up the batch-1 step on the H100
 * (5.64 ms; 5.66 with 2 warps, 5.77 with 4). */
template <typename T, int M, int R, int UNROLL>
__global__ void __launch_bounds__(128) k_gemv(const mm_segs<T> sg, const float *__restrict__ x, int cols, int pf) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int unit = blockIdx.x * (blockDim.x >> 5) + warp;
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
    constexpr int U = M <= 2 ? 4 : 2;
    kvm_launch_pdl(k_gemv<T, M, R, U>, dim3((u + 3) / 4), dim3(128), 0, sg, x, cols, kvm_cuda_prefetch_mode());
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

/* CTA = RG groups of 16 weight rows of one segment (16 * RG rows: opts.skinny_rows); its NW warps split the
 * columns in chunks of 32 (chunk c goes to warp c % NW) and meet in shared memory at the end. Thread (g = lane/4,
 * t = lane%4) loads 16 bytes of rows g and g+8 of each group at columns 8t..8t+7 of a chunk, and the same 8 columns
 * of activation rows g (and g+8), already rounded to 16 bits (xh): since a dot product does not care about the
 * order of its terms, these 8 physical columns play the logical k indices {2t, 2t+1, 2t+8, 2t+9} of two m16n8k16
 * steps, identically for W (the A operand) and x (B). Weights are read once, with 16-byte loads; a warp's
 * activation fragment serves its RG row groups, so the activations cross L2 once per 16 * RG rows (at 16 rows
 * and 16 tokens they are as many bytes as the weights). cols % 32 == 0. */
template <typename T, int NT, int RG, int NW>
__global__ void __launch_bounds__(NW * 32) k_skinny(const mm_segs<T> sg, const T *__restrict__ xh, int cols, int M,
                                                    int pf) {
    __shared__ float red[NW][16 * RG][16 + 1];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int sgi = seg_of(sg, (int)blockIdx.x);
    const T *__restrict__ W = sg.W[sgi];
    const int rows = sg.rows[sgi];
    const int row0 = ((int)blockIdx.x - sg.start[sgi]) * 16 * RG;
    const uint4 *wa_p[RG], *wb_p[RG];
#pragma unroll
    for (int r = 0; r < RG; r++) {
        const int ra = min(row0 + 16 * r + g, rows - 1), rb = min(row0 + 16 * r + g + 8, rows - 1);
        wa_p[r] = reinterpret_cast<const uint4 *>(W + (size_t)ra * cols) + t;
        wb_p[r] = reinterpret_cast<const uint4 *>(W + (size_t)rb * cols) + t;
    }
    const uint4 *xp[NT];
    bool xv[NT];
#pragma unroll
    for (int j = 0; j < NT; j++) {
        const int tok = j * 8 + g;
        xv[j] = tok < M;
        xp[j] = reinterpret_cast<const uint4 *>(xh + (size_t)(xv[j] ? tok : 0) * cols) + t;
    }
    float acc[RG][NT][4];
#pragma unroll
    for (int r = 0; r < RG; r++)
#pragma unroll
        for (int j = 0; j < NT; j++) acc[r][j][0] = acc[r][j][1] = acc[r][j][2] = acc[r][j][3] = 0.0f;
    const int nchunks = cols / 32;
    int c = warp;
    uint4 wa0[RG], wb0[RG], wa1[RG], wb1[RG]; /* weights first, as in k_gemv */
    bool pre = false;
    if (pf == 2 && c + NW < nchunks) {
#pragma unroll
        for (int r = 0; r < RG; r++) {
            wa0[r] = __ldcs(wa_p[r] + c * 4), wb0[r] = __ldcs(wb_p[r] + c * 4);
            wa1[r] = __ldcs(wa_p[r] + (c + NW) * 4), wb1[r] = __ldcs(wb_p[r] + (c + NW) * 4);
        }
        pre = true;
    } else if (pf == 1) {
        for (int pc = warp; pc < nchunks && pc < warp + 8 * NW; pc += NW)
#pragma unroll
            for (int r = 0; r < RG; r++) {
                asm volatile("prefetch.global.L2 [%0];" ::"l"(wa_p[r] + pc * 4));
                asm volatile("prefetch.global.L2 [%0];" ::"l"(wb_p[r] + pc * 4));
            }
    }
    kvm_pdl_wait();
    for (; c + NW < nchunks; c += 2 * NW) {
        if (!pre) {
#pragma unroll
            for (int r = 0; r < RG; r++) {
                wa0[r] = __ldcs(wa_p[r] + c * 4), wb0[r] = __ldcs(wb_p[r] + c * 4);
                wa1[r] = __ldcs(wa_p[r] + (c + NW) * 4), wb1[r] = __ldcs(wb_p[r] + (c + NW) * 4);
            }
        }
        pre = false;
        uint4 x0[NT], x1[NT];
#pragma unroll
        for (int j = 0; j < NT; j++) {
            x0[j] = xv[j] ? __ldg(xp[j] + c * 4) : make_uint4(0, 0, 0, 0);
            x1[j] = xv[j] ? __ldg(xp[j] + (c + NW) * 4) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int r = 0; r < RG; r++)
#pragma unroll
            for (int j = 0; j < NT; j++) {
                mma16816<T>(acc[r][j], wa0[r].x, wb0[r].x, wa0[r].y, wb0[r].y, x0[j].x, x0[j].y);
                mma16816<T>(acc[r][j], wa0[r].z, wb0[r].z, wa0[r].w, wb0[r].w, x0[j].z, x0[j].w);
                mma16816<T>(acc[r][j], wa1[r].x, wb1[r].x, wa1[r].y, wb1[r].y, x1[j].x, x1[j].y);
                mma16816<T>(acc[r][j], wa1[r].z, wb1[r].z, wa1[r].w, wb1[r].w, x1[j].z, x1[j].w);
            }
    }
    for (; c < nchunks; c += NW) {
        uint4 wa[RG], wb[RG];
#pragma unroll
        for (int r = 0; r < RG; r++) wa[r] = __ldcs(wa_p[r] + c * 4), wb[r] = __ldcs(wb_p[r] + c * 4);
#pragma unroll
        for (int j = 0; j < NT; j++) {
            const uint4 xx = xv[j] ? __ldg(xp[j] + c * 4) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int r = 0; r < RG; r++) {
                mma16816<T>(acc[r][j], wa[r].x, wb[r].x, wa[r].y, wb[r].y, xx.x, xx.y);
                mma16816<T>(acc[r][j], wa[r].z, wb[r].z, wa[r].w, wb[r].w, xx.z, xx.w);
            }
        }
    }
    /* c0,c1: row g, tokens j*8 + 2t, +1; c2,c3: row g+8 */
#pragma unroll
    for (int r = 0; r < RG; r++)
#pragma unroll
        for (int j = 0; j < NT; j++) {
            red[warp][16 * r + g][j * 8 + 2 * t] = acc[r][j][0];
            red[warp][16 * r + g][j * 8 + 2 * t + 1] = acc[r][j][1];
            red[warp][16 * r + g + 8][j * 8 + 2 * t] = acc[r][j][2];
            red[warp][16 * r + g + 8][j * 8 + 2 * t + 1] = acc[r][j][3];
        }
    __syncthreads();
    float *y = sg.y[sgi];
    const float *bias = sg.bias[sgi];
    for (int e = threadIdx.x; e < 16 * RG * NT * 8; e += blockDim.x) {
        const int r = e % (16 * RG), tok = e / (16 * RG); /* consecutive threads: consecutive rows (coalesced) */
        const int row = row0 + r;
        if (tok < M && row < rows) {
            float v = 0.0f;
#pragma unroll
            for (int w = 0; w < NW; w++) v += red[w][r][tok];
            y[(size_t)tok * rows + row] = v + (bias ? bias[row] : 0.0f);
        }
    }
}

/* Rows per CTA of the skinny GEMM: opts.skinny_rows (16, 32 or 64), halved while the launch would have fewer CTAs
 * than the GPU has SMs (a 4096-row projection at 64 rows would leave half of an H100 idle). */
template <typename T> static int skinny_rows_for(const mm_segs<T> &sg) {
    int per = g_cuda.opts.skinny_rows;
    for (; per > 16; per /= 2) {
        int u = 0;
        for (int i = 0; i < sg.nseg; i++) u += (sg.rows[i] + per - 1) / per;
        if (u >= g_cuda.prop.multiProcessorCount) break;
    }
    return per < 16 ? 16 : per;
}

template <typename T, int RG, int NW>
static void skinny_launch(mm_segs<T> sg, const T *xh, int cols, int n, int pf) {
    int u = 0;
    for (int i = 0; i < sg.nseg; i++) {
        sg.start[i] = u;
        u += (sg.rows[i] + 16 * RG - 1) / (16 * RG);
    }
    sg.start[sg.nseg] = u;
    if (n <= 8) kvm_launch_pdl(k_skinny<T, 1, RG, NW>, dim3(u), dim3(NW * 32), 0, sg, xh, cols, n, pf);
    else kvm_launch_pdl(k_skinny<T, 2, RG, NW>, dim3(u), dim3(NW * 32), 0, sg, xh, cols, n, pf);
}

template <typename T>
static void skinny_dispatch(mm_segs<T> sg, const T *xh, int cols, int n) {
    const int pf = kvm_cuda_prefetch_mode(), per = skinny_rows_for(sg);
    /* (16 warps per CTA, 16 rows, was slower at batch 16 on the H100: 7.71 against 7.55 ms, 2026-12-07) */
    if (per == 64) skinny_launch<T, 4, 8>(sg, xh, cols, n, pf);
    else if (per == 32) skinny_launch<T, 2, 8>(sg, xh, cols, n, pf);
    else skinny_launch<T, 1, 8>(sg, xh, cols, n, pf);
}

/* The activations last rounded to 16 bits (q, k and v, or gate and up, share one input): reused while no
 * other op ran in between (every other op calls kvm_cuda_touch). The copy lives at the start of scratch. */
static const float *g_xh_src;
static size_t g_xh_n;
static kvm_dtype_t g_xh_dt;
static kvm_dtype_t g_last_half = KVM_F32; /* dtype of the last 16-bit rounding (the model's weight dtype) */
/* An input whose fp32 values were never written (add_rmsnorm_16 left only the rounded copy): a matmul that
 * cannot use that copy must fail instead of reading it. Cleared when a matmul or a norm writes it. */
static const float *g_dead;
void kvm_cuda_set_dead(const float *p) { g_dead = p; }
void kvm_cuda_wrote(const float *p) {
    if (p && p == g_dead) g_dead = NULL;
}
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
    if (x && x == g_dead) {
        kvm_cuda_fail(KVM_EINTERNAL, "cuda matmul: input of %zu values holds no fp32 data (add_rmsnorm_16) and its "
                                     "16-bit copy is gone", nx);
        return NULL;
    }
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

/* Which kernel serves few rows (opts.skinny: KVM_CUDA_SKINNY_GEMV, _MMA; _AUTO: the GEMV for 1 row, the
 * tensor-core kernel for 2..16). Read at each call: the benchmark compares both. */
static int skinny_mode(void) { return g_cuda.opts.skinny; }

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
        if (x && x == g_dead) {
            kvm_cuda_fail(KVM_EINTERNAL, "cuda matmul: fp32 GEMM on an input add_rmsnorm_16 left without fp32 data");
            return;
        }
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
    kvm_cuda_wrote(y);
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
    if (use_gemv && x == g_dead) {
        kvm_cuda_fail(KVM_EINTERNAL, "cuda matmul: GEMV on an input add_rmsnorm_16 left without fp32 data");
        return;
    }
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
        for (int i = 0; i < count; i++) {
            if (y[i] == g_xh_src) g_xh_src = NULL;
            kvm_cuda_wrote(y[i]);
        }
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

/* ==== the fused MLP (ops->ffn) ================================================================================= */

/* One warp's partial dot products of two weight rows wr[0], wr[1] (cols elements, 16-byte loads) with x,
 * lane-strided, UNROLL loads of each row in flight; pf == 2 issues the first loads before the PDL wait.
 * Adds into acc[0], acc[1] (the caller reduces them over the warp). */
template <typename T, int UNROLL>
__device__ __forceinline__ void warp_dot2(const uint4 *const wr[2], const float *__restrict__ x, int cols, int lane, int pf,
                                          float acc[2]) {
    const int nvec = cols / 8;
    int v = lane;
    uint4 wv[UNROLL][2];
    bool pre = false;
    if (pf == 2 && v + 32 * (UNROLL - 1) < nvec) {
#pragma unroll
        for (int u = 0; u < UNROLL; u++)
#pragma unroll
            for (int r = 0; r < 2; r++) wv[u][r] = __ldcs(wr[r] + v + 32 * u);
        pre = true;
    }
    kvm_pdl_wait();
    for (; v + 32 * (UNROLL - 1) < nvec; v += 32 * UNROLL) {
        if (!pre) {
#pragma unroll
            for (int u = 0; u < UNROLL; u++)
#pragma unroll
                for (int r = 0; r < 2; r++) wv[u][r] = __ldcs(wr[r] + v + 32 * u);
        }
        pre = false;
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int c = (v + 32 * u) * 8;
            const float4 xa = __ldg(reinterpret_cast<const float4 *>(x + c));
            const float4 xb = __ldg(reinterpret_cast<const float4 *>(x + c + 4));
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float f[8];
                unpack8(wv[u][r], f, (const T *)0);
                acc[r] += f[0] * xa.x + f[1] * xa.y + f[2] * xa.z + f[3] * xa.w + f[4] * xb.x + f[5] * xb.y + f[6] * xb.z +
                          f[7] * xb.w;
            }
        }
    }
    for (; v < nvec; v += 32) {
        const int c = v * 8;
        const float4 xa = __ldg(reinterpret_cast<const float4 *>(x + c));
        const float4 xb = __ldg(reinterpret_cast<const float4 *>(x + c + 4));
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float f[8];
            unpack8(__ldcs(wr[r] + v), f, (const T *)0);
            acc[r] += f[0] * xa.x + f[1] * xa.y + f[2] * xa.z + f[3] * xa.w + f[4] * xb.x + f[5] * xb.y + f[6] * xb.z +
                      f[7] * xb.w;
        }
    }
}

/* Batch-1 decode: one warp per output i computes the gate row i and the up row i (two weight streams, UNROLL
 * 16-byte loads of each in flight per lane) and writes act[i] = silu(g) * u in fp32: no SwiGLU launch and no
 * gate/up round trip. Same loads and PDL protocol as k_gemv. */
template <typename T, int UNROLL>
__global__ void __launch_bounds__(128) k_gemv_swiglu(const T *__restrict__ Wg, const T *__restrict__ Wu, float *__restrict__ act,
                                                     const float *__restrict__ x, int rows, int cols, int pf) {
    const int unit = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (unit >= rows) return;
    const uint4 *wr[2] = {reinterpret_cast<const uint4 *>(Wg + (size_t)unit * cols),
                          reinterpret_cast<const uint4 *>(Wu + (size_t)unit * cols)};
    float acc[2] = {0.0f, 0.0f};
    warp_dot2<T, UNROLL>(wr, x, cols, lane, pf, acc);
    const float g = kvm_warp_sum(acc[0]), u = kvm_warp_sum(acc[1]);
    if (lane == 0) act[unit] = (g / (1.0f + expf(-g))) * u;
}

/* Prefill: h[r] = [gate_r | up_r] in 16 bits (row stride 2*ff) -> act[r][i] = silu(gate) * up, rounded to
 * 16 bits; 8 elements (16 bytes) per step. ff % 8 == 0. */
template <typename T>
__global__ void k_swiglu_hh(T *__restrict__ act, const T *__restrict__ h, int ff, size_t total8) {
    kvm_pdl_trigger();
    const int per = ff / 8;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total8; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / per;
        const int c = (int)(i % per) * 8;
        const uint4 gv = *reinterpret_cast<const uint4 *>(h + r * 2 * ff + c);
        const uint4 uv = *reinterpret_cast<const uint4 *>(h + r * 2 * ff + ff + c);
        float g[8], u[8];
        unpack8(gv, g, (const T *)0);
        unpack8(uv, u, (const T *)0);
        __align__(16) T o[8];
#pragma unroll
        for (int e = 0; e < 8; e++) o[e] = kvm_from_f32<T>((g[e] / (1.0f + expf(-g[e]))) * u[e]);
        *reinterpret_cast<uint4 *>(act + r * ff + c) = *reinterpret_cast<const uint4 *>(o);
    }
}

/* opts.ffn = false: the MLP through matmul_multi + swiglu_matmul (the previous path), for comparisons. */
static int ffn_fused_enabled(void) { return g_cuda.opts.ffn; }
/* opts.ffn_gemv: batch-1 gate/up GEMV with the SwiGLU epilogue. Off by default: no gain measured over
 * GEMV + SwiGLU launch in a graph (H100, 2026-11-26 15:14: 6.17 vs 6.14 ms per token, within the spread) */
static int ffn_gemv_enabled(void) { return g_cuda.opts.ffn_gemv; }

/* Prefill MLP up to the activation: [gate | up] = x @ [Wg; Wu]^T as one bf16 GEMM (two into the interleaved
 * buffer when the matrices are not adjacent) into h1's memory, then act = silu(gate) * up in bf16 into h2's memory.
 * Returns act, or NULL after recording a failure. BF16 weights, n > 16, FF % 8 == 0 (checked by the callers). */
static const __nv_bfloat16 *ffn_act_prefill(const float *x, const kvm_wmat_t *Wg, const kvm_wmat_t *Wu, float *h1, float *h2,
                                            int n) {
    const int FF = Wg->rows, D = Wg->cols;
    const void *xh = rounded_input(x, (size_t)n * D, KVM_BF16);
    if (!xh) return NULL;
    __nv_bfloat16 *h = (__nv_bfloat16 *)h1;  /* [n][2FF] 16-bit = the bytes of h1 [n][FF] fp32 */
    __nv_bfloat16 *act = (__nv_bfloat16 *)h2; /* [n][FF] */
    const float one = 1.0f, zero = 0.0f;
    cublasStatus_t st;
    {
        char pname[96];
        if (g_kvm_prof_on) snprintf(pname, sizeof pname, "matmul gate+up -> bf16 2x%dx%d m=%d cublas", FF, D, n);
        KVM_PROF(g_kvm_prof_on ? pname : "ffn gate+up");
        if ((const char *)Wu->data == (const char *)Wg->data + (size_t)FF * D * 2) { /* adjacent: one GEMM */
            st = cublasGemmEx(g_cuda.blas, CUBLAS_OP_T, CUBLAS_OP_N, 2 * FF, n, D, &one, Wg->data, CUDA_R_16BF, D, xh,
                              CUDA_R_16BF, D, &zero, h, CUDA_R_16BF, 2 * FF, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        } else {
            st = cublasGemmEx(g_cuda.blas, CUBLAS_OP_T, CUBLAS_OP_N, FF, n, D, &one, Wg->data, CUDA_R_16BF, D, xh, CUDA_R_16BF,
                              D, &zero, h, CUDA_R_16BF, 2 * FF, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
            if (st == CUBLAS_STATUS_SUCCESS)
                st = cublasGemmEx(g_cuda.blas, CUBLAS_OP_T, CUBLAS_OP_N, FF, n, D, &one, Wu->data, CUDA_R_16BF, D, xh,
                                  CUDA_R_16BF, D, &zero, h + FF, CUDA_R_16BF, 2 * FF, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        }
    }
    if (st != CUBLAS_STATUS_SUCCESS) {
        kvm_cuda_fail(KVM_EDEVICE, "cuda ffn: cuBLAS gate/up GEMM [%d x %d] x %d rows failed: %s", FF, D, n, blas_status(st));
        return NULL;
    }
    if (h1 == g_xh_src || h2 == g_xh_src) g_xh_src = NULL;
    KVM_PROF("swiglu bf16 -> bf16");
    const size_t total8 = (size_t)n * FF / 8;
    size_t gb = (total8 + 255) / 256;
    if (gb > 65535u * 16u) gb = 65535u * 16u;
    k_swiglu_hh<__nv_bfloat16><<<(unsigned)gb, 256, 0, S>>>(act, h, FF, total8);
    if (KVM_CU_LAUNCH("ffn swiglu")) return NULL;
    return act;
}

/* y16[n][W->rows] = a16 @ W^T in bf16 (cuBLAS, fp32 accumulation), a16 the 16-bit input. false after a failure. */
static bool gemm_to_bf16(__nv_bfloat16 *y16, const void *a16, const kvm_wmat_t *W, int n) {
    const float one = 1.0f, zero = 0.0f;
    cublasStatus_t st = cublasGemmEx(g_cuda.blas, CUBLAS_OP_T, CUBLAS_OP_N, W->rows, n, W->cols, &one, W->data, CUDA_R_16BF,
                                     W->cols, a16, CUDA_R_16BF, W->cols, &zero, y16, CUDA_R_16BF, W->rows, CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) {
        kvm_cuda_fail(KVM_EDEVICE, "cuda: cuBLAS GEMM [%d x %d] x %d rows to bf16 failed: %s", W->rows, W->cols, n,
                      blas_status(st));
        return false;
    }
    return true;
}

/* opts.y16 = false: the o and down projections of a prefill write fp32 (then add_rmsnorm_16), for comparisons. */
static bool y16_enabled(void) { return g_cuda.opts.y16; }

void kvm_cuda_ffn(float *y, const float *x, const kvm_wmat_t *Wg, const kvm_wmat_t *Wu, const kvm_wmat_t *Wd, float *h1,
                  float *h2, int n) {
    if (n <= 0) return;
    const int FF = Wg->rows, D = Wg->cols;
    const kvm_dtype_t dt = Wg->dtype;
    if (Wu->rows != FF || Wu->cols != D || Wd->cols != FF || Wu->dtype != dt || Wd->dtype != dt) {
        kvm_cuda_fail(KVM_EINVAL, "cuda ffn: gate [%d x %d], up [%d x %d], down [%d x %d] do not fit together", FF, D,
                      Wu->rows, Wu->cols, Wd->rows, Wd->cols);
        return;
    }
    const bool al = ((uintptr_t)Wg->data % 16) == 0 && ((uintptr_t)Wu->data % 16) == 0 && ((uintptr_t)Wd->data % 16) == 0 &&
                    ((uintptr_t)x % 16) == 0 && ((uintptr_t)h1 % 16) == 0 && ((uintptr_t)h2 % 16) == 0;
    const bool fused = ffn_fused_enabled() && al && dt != KVM_F32 && (D % 8) == 0 && (FF % 8) == 0;
    if (fused && n == 1 && ffn_gemv_enabled() && skinny_mode() != 2 && x != g_dead) {
        {
            char pname[96];
            if (g_kvm_prof_on) snprintf(pname, sizeof pname, "ffn gate+up gemv + swiglu %s 2x%dx%d m=1", kvm_dtype_name(dt), FF, D);
            KVM_PROF(g_kvm_prof_on ? pname : "ffn");
            if (dt == KVM_BF16)
                kvm_launch_pdl(k_gemv_swiglu<__nv_bfloat16, 4>, dim3((FF + 3) / 4), dim3(128), 0, (const __nv_bfloat16 *)Wg->data,
                               (const __nv_bfloat16 *)Wu->data, h1, x, FF, D, kvm_cuda_prefetch_mode());
            else
                kvm_launch_pdl(k_gemv_swiglu<__half, 4>, dim3((FF + 3) / 4), dim3(128), 0, (const __half *)Wg->data,
                               (const __half *)Wu->data, h1, x, FF, D, kvm_cuda_prefetch_mode());
            if (h1 == g_xh_src) g_xh_src = NULL;
            if (KVM_CU_LAUNCH("ffn gate+up gemv + swiglu")) return;
        }
        matmul_segments(1, &y, &Wd, NULL, h1, 1);
        return;
    }
    if (fused && n > 16 && dt == KVM_BF16) {
        const __nv_bfloat16 *act = ffn_act_prefill(x, Wg, Wu, h1, h2, n);
        if (!act) return;
        char pname[96];
        if (g_kvm_prof_on) snprintf(pname, sizeof pname, "matmul %s %dx%d m=%d cublas (ffn down)", kvm_dtype_name(dt), Wd->rows, FF, n);
        KVM_PROF(g_kvm_prof_on ? pname : "ffn down");
        matmul_blas(y, NULL, Wd, NULL, n, act);
        return;
    }
    float *ys[2] = {h1, h2};
    const kvm_wmat_t *ws[2] = {Wg, Wu};
    kvm_cuda_matmul_multi(2, ys, ws, NULL, x, n);
    kvm_cuda_swiglu_matmul(y, h1, h2, Wd, n);
}

/* ==== batch-1 decode: q/k/v GEMV + RoPE + KV write (ops->qkv_rope_kv) ========================================= */

template <typename T, typename TC> struct qkv_args {
    const T *W[3];
    const float *bias[3];
    float *out[3];
    const float *x;
    int cols, hq, hk, hd, il, L, layer;
    const int32_t *pos, *ctx_len, *block_table;
    const float *inv_freq;
    TC *kv;
};

/* One warp per PAIR of output rows: for q and k the two rows RoPE rotates together (j and j + hd/2 of a head, or
 * 2j and 2j+1 interleaved), for v two consecutive rows. The dot products are those of k_gemv (same loads, same
 * summation order); lane 0 adds the biases, rotates q/k pairs by the position's fp64 angle (cos/sin rounded to
 * fp32, no FMA contraction: as k_rope_kv), stores q, k, v in fp32 and k, v into the cache at position ctx_len-1. */
template <typename T, typename TC, int UNROLL>
__global__ void __launch_bounds__(128) k_gemv_qkv(const qkv_args<T, TC> a, int pf) {
    const int unit = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    const int half = a.hd / 2, nq = a.hq * half, nk = a.hk * half;
    if (unit >= nq + 2 * nk) return;
    const int seg = unit < nq ? 0 : unit < nq + nk ? 1 : 2;
    const int uu = unit - (seg == 0 ? 0 : seg == 1 ? nq : nq + nk);
    int ra, rb, j = 0;
    if (seg < 2) {
        const int h = uu / half;
        j = uu % half;
        ra = h * a.hd + (a.il ? 2 * j : j);
        rb = h * a.hd + (a.il ? 2 * j + 1 : j + half);
    } else {
        ra = 2 * uu;
        rb = 2 * uu + 1;
    }
    const int cols = a.cols;
    const uint4 *wr[2] = {reinterpret_cast<const uint4 *>(a.W[seg] + (size_t)ra * cols),
                          reinterpret_cast<const uint4 *>(a.W[seg] + (size_t)rb * cols)};
    const float *__restrict__ x = a.x;
    float acc[2] = {0.0f, 0.0f};
    warp_dot2<T, UNROLL>(wr, x, cols, lane, pf, acc);
    float va = kvm_warp_sum(acc[0]), vb = kvm_warp_sum(acc[1]);
    if (lane != 0) return;
    if (a.bias[seg]) {
        va += a.bias[seg][ra];
        vb += a.bias[seg][rb];
    }
    if (seg < 2) {
        double sn, cn;
        sincos(kvm_rope_angle_dev((double)a.pos[0], a.inv_freq[j]), &sn, &cn);
        const float c = (float)cn, s = (float)sn;
        const float x0 = va, x1 = vb;
        va = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
        vb = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
    }
    a.out[seg][ra] = va;
    a.out[seg][rb] = vb;
    if (seg == 0) return;
    const int ps = a.pos[0]; /* = ctx_len - 1 for a decode row; the row's position in general */
    const int32_t blk = a.block_table[ps / KVM_KV_BLOCK];
    const int t = ps % KVM_KV_BLOCK, kvi = seg - 1;
    const size_t base = (((((size_t)blk * a.L + a.layer) * 2 + kvi) * a.hk) * KVM_KV_BLOCK + t) * (size_t)a.hd;
    /* element (h, d) of this token: base + h * KVM_KV_BLOCK * hd + d (the cache layout of kvm_kv_index_dev) */
    const int ha = ra / a.hd, hb = rb / a.hd;
    a.kv[base + (size_t)ha * KVM_KV_BLOCK * a.hd + ra % a.hd] = kvm_from_f32<TC>(va);
    a.kv[base + (size_t)hb * KVM_KV_BLOCK * a.hd + rb % a.hd] = kvm_from_f32<TC>(vb);
}

template <typename T, typename TC>
static void launch_qkv(float *q, float *k, float *v, const float *x, const kvm_wmat_t *const W[3], const float *const bias[3],
                       int hq, int hk, int hd, int il, const int32_t *pos, const float *inv_freq, void *kv, int L, int layer,
                       const kvm_attn_batch_t *b) {
    qkv_args<T, TC> a;
    memset(&a, 0, sizeof a);
    for (int i = 0; i < 3; i++) {
        a.W[i] = (const T *)W[i]->data;
        a.bias[i] = bias[i];
    }
    a.out[0] = q, a.out[1] = k, a.out[2] = v;
    a.x = x;
    a.cols = W[0]->cols, a.hq = hq, a.hk = hk, a.hd = hd, a.il = il, a.L = L, a.layer = layer;
    a.pos = pos, a.ctx_len = b->ctx_len, a.block_table = b->block_table, a.inv_freq = inv_freq;
    a.kv = (TC *)kv;
    const int units = (hq + 2 * hk) * hd / 2;
    kvm_launch_pdl(k_gemv_qkv<T, TC, 4>, dim3((units + 3) / 4), dim3(128), 0, a, kvm_cuda_prefetch_mode());
}

/* ---- prefill: q|k|v in one bf16 buffer, then RoPE + KV write from it ---- */

/* A second grow-only device buffer (prefill intermediates that must not move the scratch, whose start holds the
 * rounded GEMM input). Grows outside graph capture only (prefill steps are never captured). */
static void *aux_buffer(size_t bytes) {
    static void *buf = NULL;
    static size_t cap = 0;
    if (bytes <= cap) return buf;
    if (kvm_cuda_capturing()) {
        kvm_cuda_fail(KVM_EDEVICE, "cuda: the prefill buffer cannot grow during graph capture");
        return NULL;
    }
    size_t want = bytes + bytes / 4;
    void *nb = NULL;
    if (cudaMalloc(&nb, want) != cudaSuccess) {
        cudaGetLastError();
        kvm_cuda_fail(KVM_ENOMEM, "cuda: cannot allocate %zu bytes for the prefill q/k/v buffer", want);
        return NULL;
    }
    if (buf) {
        cudaStreamSynchronize(S); /* the old buffer may still be read by queued work */
        cudaFree(buf);
    }
    buf = nb;
    cap = want;
    return buf;
}

/* Block per row r of h = [q | k | v] (16-bit GEMM output, row width hw): adds the biases, rotates q and k like
 * k_rope_kv (fp64 angle, cos/sin rounded to fp32, no FMA contraction), writes q, k, v in fp32 and k, v into the
 * cache at the row's position. */
template <typename TH, typename TC>
__global__ void k_rope_kv_h(const TH *__restrict__ h, int hw, const float *__restrict__ bq, const float *__restrict__ bk,
                            const float *__restrict__ bv, float *__restrict__ q, float *__restrict__ k, float *__restrict__ v,
                            int hq, int hk, int hd, const int32_t *__restrict__ pos, const float *__restrict__ inv_freq, int il,
                            TC *__restrict__ kv, int L, int layer, const int32_t *__restrict__ row_start,
                            const int32_t *__restrict__ ctx_len, const int32_t *__restrict__ block_table, int n_seqs,
                            int max_blocks) {
    kvm_pdl_trigger();
    extern __shared__ float cs[];
    const int r = blockIdx.x, half = hd / 2, QD = hq * hd, KD = hk * hd;
    const double p = (double)pos[r];
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double sn, cn;
        sincos(kvm_rope_angle_dev(p, inv_freq[j]), &sn, &cn);
        cs[j] = (float)cn;
        cs[half + j] = (float)sn;
    }
    (void)ctx_len; /* the cache slot is the row's position (= ctx_len - n + j for a sequence's last rows) */
    const int ps = pos[r];
    const size_t kbase = kvm_row_kv_base_dev(L, hk, hd, layer, 0, row_start, n_seqs, block_table, max_blocks, r, ps);
    const size_t vbase = kvm_row_kv_base_dev(L, hk, hd, layer, 1, row_start, n_seqs, block_table, max_blocks, r, ps);
    const size_t hstride = (size_t)KVM_KV_BLOCK * hd; /* between heads of one token in the cache */
    const TH *hr = h + (size_t)r * hw;
    __syncthreads();
    for (int i = threadIdx.x; i < (hq + hk) * half; i += blockDim.x) {
        const int hh = i / half, j = i % half;
        const bool isq = hh < hq;
        const int head = isq ? hh : hh - hq;
        const int ia = il ? 2 * j : j, ib = il ? 2 * j + 1 : j + half;
        const int ca = (isq ? 0 : QD) + head * hd + ia, cb = (isq ? 0 : QD) + head * hd + ib;
        const float *bias = isq ? bq : bk;
        float x0 = kvm_to_f32<TH>(hr[ca]), x1 = kvm_to_f32<TH>(hr[cb]);
        if (bias) {
            x0 += bias[head * hd + ia];
            x1 += bias[head * hd + ib];
        }
        const float c = cs[j], sn = cs[half + j];
        const float ya = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, sn));
        const float yb = __fadd_rn(__fmul_rn(x0, sn), __fmul_rn(x1, c));
        if (isq) {
            q[(size_t)r * QD + head * hd + ia] = ya;
            q[(size_t)r * QD + head * hd + ib] = yb;
        } else {
            k[(size_t)r * KD + head * hd + ia] = ya;
            k[(size_t)r * KD + head * hd + ib] = yb;
            kv[kbase + head * hstride + ia] = kvm_from_f32<TC>(ya);
            kv[kbase + head * hstride + ib] = kvm_from_f32<TC>(yb);
        }
    }
    for (int i = threadIdx.x; i < KD; i += blockDim.x) {
        float x0 = kvm_to_f32<TH>(hr[QD + KD + i]);
        if (bv) x0 += bv[i];
        v[(size_t)r * KD + i] = x0;
        kv[vbase + (i / hd) * hstride + i % hd] = kvm_from_f32<TC>(x0);
    }
}

/* opts.qkv_fuse = false: q/k/v through matmul_multi + rope_qk_kv_write (batch-1 decode and prefill) */
static int qkv_fuse_enabled(void) { return g_cuda.opts.qkv_fuse; }

/* Prefill (more than 16 rows, BF16 weights): q|k|v = x @ [Wq;Wk;Wv]^T as ONE cuBLAS GEMM (three into the same
 * buffer when the matrices are not adjacent) with a bf16 output (HF rounds these to bf16 too), then
 * k_rope_kv_h. Returns KVM_EUNSUPPORTED (nothing enqueued) when the shapes do not allow it. */
static int qkv_prefill(float *q, float *k, float *v, const float *x, const kvm_wmat_t *const W[3], const float *const bias[3],
                       int hq, int hk, int hd, int il, const int32_t *pos, const float *inv_freq, void *kv,
                       const kvm_kv_geom_t *g, int layer, const kvm_attn_batch_t *b) {
    const int n = b->total_rows, cols = W[0]->cols, QD = hq * hd, KD = hk * hd, HW = QD + 2 * KD;
    /* opts.qkv16 = false: prefill q/k/v through the separate ops (for comparisons) */
    if (!g_cuda.opts.qkv16 || n <= 16 || W[0]->dtype != KVM_BF16 || (HW % 8) != 0) return KVM_EUNSUPPORTED;
    const void *xh = rounded_input(x, (size_t)n * cols, KVM_BF16);
    if (!xh) return 0; /* failure recorded (sync reports it) */
    __nv_bfloat16 *h = (__nv_bfloat16 *)aux_buffer((size_t)n * HW * 2);
    if (!h) return 0;
    const float one = 1.0f, zero = 0.0f;
    cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
    {
        char pname[96];
        if (g_kvm_prof_on) snprintf(pname, sizeof pname, "matmul q|k|v -> bf16 %dx%d m=%d cublas", HW, cols, n);
        KVM_PROF(g_kvm_prof_on ? pname : "qkv gemm");
        const char *w0 = (const char *)W[0]->data;
        const bool adjacent = (const char *)W[1]->data == w0 + (size_t)QD * cols * 2 &&
                              (const char *)W[2]->data == w0 + (size_t)(QD + KD) * cols * 2;
        if (adjacent) {
            st = cublasGemmEx(g_cuda.blas, CUBLAS_OP_T, CUBLAS_OP_N, HW, n, cols, &one, W[0]->data, CUDA_R_16BF, cols, xh,
                              CUDA_R_16BF, cols, &zero, h, CUDA_R_16BF, HW, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        } else {
            const int off[3] = {0, QD, QD + KD}, rows[3] = {QD, KD, KD};
            for (int i = 0; i < 3 && st == CUBLAS_STATUS_SUCCESS; i++)
                st = cublasGemmEx(g_cuda.blas, CUBLAS_OP_T, CUBLAS_OP_N, rows[i], n, cols, &one, W[i]->data, CUDA_R_16BF,
                                  cols, xh, CUDA_R_16BF, cols, &zero, h + off[i], CUDA_R_16BF, HW, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT);
        }
    }
    if (st != CUBLAS_STATUS_SUCCESS) {
        kvm_cuda_fail(KVM_EDEVICE, "cuda qkv: cuBLAS GEMM [%d x %d] x %d rows failed: %s", HW, cols, n, blas_status(st));
        return 0;
    }
    kvm_cuda_touch(); /* q, k, v change below */
    KVM_PROF("rope q+k, kv_write (from bf16 q|k|v)");
    const size_t sh = (size_t)hd * sizeof(float);
    /* (a kernel with 16-byte accesses, 8 pairs per thread, took twice as long on the H100: 48 against 24 us per
     * layer at 1K rows, 2026-12-07) */
#define KVM_RKH(TC)                                                                                                       \
    k_rope_kv_h<__nv_bfloat16, TC><<<n, 256, sh, S>>>(h, HW, bias[0], bias[1], bias[2], q, k, v, hq, hk, hd, pos, inv_freq, \
                                                      il, (TC *)kv, g->n_layers, layer, b->row_start, b->ctx_len,         \
                                                      b->block_table, b->n_seqs, b->max_blocks)
    if (g->dtype == KVM_BF16) KVM_RKH(__nv_bfloat16);
    else if (g->dtype == KVM_F16) KVM_RKH(__half);
    else KVM_RKH(float);
#undef KVM_RKH
    kvm_cuda_wrote(q), kvm_cuda_wrote(k), kvm_cuda_wrote(v);
    KVM_CU_LAUNCH("rope q+k, kv_write (from bf16 q|k|v)");
    return 0;
}

int kvm_cuda_qkv_rope_kv(float *q, float *k, float *v, const float *x, const kvm_wmat_t *wq, const kvm_wmat_t *wk,
                         const kvm_wmat_t *wv, const float *bq, const float *bk, const float *bv, int hq, int hd,
                         const int32_t *pos, const float *inv_freq, kvm_rope_layout_t layout, void *kv,
                         const kvm_kv_geom_t *g, int layer, const kvm_attn_batch_t *b) {
    const kvm_dtype_t dt = wq->dtype;
    const int hk = g->n_kv_heads, cols = wq->cols;
    const kvm_wmat_t *W[3] = {wq, wk, wv};
    bool ok = qkv_fuse_enabled() && dt != KVM_F32 && wk->dtype == dt && wv->dtype == dt && g->head_dim == hd && hd % 2 == 0 &&
              wq->rows == hq * hd && wk->rows == hk * hd && wv->rows == hk * hd && wk->cols == cols && wv->cols == cols &&
              cols % 8 == 0 && ((uintptr_t)x % 16) == 0;
    for (int i = 0; ok && i < 3; i++) ok = ((uintptr_t)W[i]->data % 16) == 0;
    if (ok && b->total_rows > 16) {
        const float *bias[3] = {bq, bk, bv};
        return qkv_prefill(q, k, v, x, W, bias, hq, hk, hd, layout == KVM_ROPE_INTERLEAVED, pos, inv_freq, kv, g, layer, b);
    }
    ok = ok && b->total_rows == 1 && b->n_seqs == 1 && skinny_mode() != 2 && x != g_dead;
    if (!ok) return KVM_EUNSUPPORTED;
    kvm_cuda_touch();
    char pname[112];
    if (g_kvm_prof_on)
        snprintf(pname, sizeof pname, "qkv gemv + rope + kv_write %s %dx%d m=1", kvm_dtype_name(dt), (hq + 2 * hk) * hd, cols);
    KVM_PROF(g_kvm_prof_on ? pname : "qkv_rope_kv");
    const float *bias[3] = {bq, bk, bv};
    const int il = layout == KVM_ROPE_INTERLEAVED;
#define KVM_QKV(TT, TC) launch_qkv<TT, TC>(q, k, v, x, W, bias, hq, hk, hd, il, pos, inv_freq, kv, g->n_layers, layer, b)
    if (dt == KVM_BF16) {
        if (g->dtype == KVM_BF16) KVM_QKV(__nv_bfloat16, __nv_bfloat16);
        else if (g->dtype == KVM_F16) KVM_QKV(__nv_bfloat16, __half);
        else KVM_QKV(__nv_bfloat16, float);
    } else {
        if (g->dtype == KVM_BF16) KVM_QKV(__half, __nv_bfloat16);
        else if (g->dtype == KVM_F16) KVM_QKV(__half, __half);
        else KVM_QKV(__half, float);
    }
#undef KVM_QKV
    kvm_cuda_wrote(q), kvm_cuda_wrote(k), kvm_cuda_wrote(v);
    if (KVM_CU_LAUNCH("qkv gemv + rope + kv_write")) return 0; /* recorded: sync reports it */
    return 0;
}

/* ==== prefill projections straight into the residual norm (ops->matmul_add_rmsnorm_16, ops->ffn_add_rmsnorm_16) ===
 * The projection's output goes to `out`'s memory in bf16 (HF rounds it to bf16 too) and the fused add + RMSNorm
 * reads it from there: half the bytes of the fp32 round trip. Fallback: the separate ops. */

void kvm_cuda_matmul_add_rmsnorm_16(float *x, const float *in, const kvm_wmat_t *W, float *out, const float *w, int n,
                                    int dim, float eps) {
    const bool ok = y16_enabled() && W->dtype == KVM_BF16 && n > 16 && W->rows == dim && (W->cols % 8) == 0 && out != in &&
                    ((uintptr_t)out % 16) == 0 && ((uintptr_t)W->data % 16) == 0 && kvm_cuda_norm_from16_ok(n, dim, x, w);
    if (!ok) { /* fp32 weights: the plain norm (their GEMMs read fp32) */
        kvm_cuda_matmul(out, in, W, NULL, n);
        if (W->dtype == KVM_F32) kvm_cuda_add_rmsnorm(x, out, out, w, n, dim, eps);
        else kvm_cuda_add_rmsnorm_16(x, out, out, w, n, dim, eps);
        return;
    }
    const void *a16 = rounded_input(in, (size_t)n * W->cols, KVM_BF16);
    if (!a16) return;
    {
        char pname[96];
        if (g_kvm_prof_on) snprintf(pname, sizeof pname, "matmul BF16 %dx%d m=%d cublas -> bf16", W->rows, W->cols, n);
        KVM_PROF(g_kvm_prof_on ? pname : "matmul -> bf16");
        if (!gemm_to_bf16((__nv_bfloat16 *)out, a16, W, n)) return;
    }
    kvm_cuda_touch();
    kvm_cuda_add16_rmsnorm_16(x, (const __nv_bfloat16 *)out, out, w, n, dim, eps);
}

void kvm_cuda_ffn_add_rmsnorm_16(float *x, const float *in, const kvm_wmat_t *Wg, const kvm_wmat_t *Wu,
                                 const kvm_wmat_t *Wd, float *h1, float *h2, float *out, const float *w, int n, int dim,
                                 float eps) {
    const int FF = Wg->rows, D = Wg->cols;
    const bool ok = y16_enabled() && ffn_fused_enabled() && Wg->dtype == KVM_BF16 && Wu->dtype == KVM_BF16 &&
                    Wd->dtype == KVM_BF16 && n > 16 && Wu->rows == FF && Wu->cols == D && Wd->cols == FF && Wd->rows == dim &&
                    (D % 8) == 0 && (FF % 8) == 0 && ((uintptr_t)Wg->data % 16) == 0 && ((uintptr_t)Wu->data % 16) == 0 &&
                    ((uintptr_t)Wd->data % 16) == 0 && ((uintptr_t)in % 16) == 0 && ((uintptr_t)h1 % 16) == 0 &&
                    ((uintptr_t)h2 % 16) == 0 && ((uintptr_t)out % 16) == 0 && kvm_cuda_norm_from16_ok(n, dim, x, w);
    if (!ok) {
        kvm_cuda_ffn(out, in, Wg, Wu, Wd, h1, h2, n);
        if (Wd->dtype == KVM_F32) kvm_cuda_add_rmsnorm(x, out, out, w, n, dim, eps);
        else kvm_cuda_add_rmsnorm_16(x, out, out, w, n, dim, eps);
        return;
    }
    const __nv_bfloat16 *act = ffn_act_prefill(in, Wg, Wu, h1, h2, n);
    if (!act) return;
    {
        char pname[96];
        if (g_kvm_prof_on) snprintf(pname, sizeof pname, "matmul BF16 %dx%d m=%d cublas (ffn down) -> bf16", Wd->rows, FF, n);
        KVM_PROF(g_kvm_prof_on ? pname : "ffn down -> bf16");
        if (!gemm_to_bf16((__nv_bfloat16 *)out, act, Wd, n)) return;
    }
    kvm_cuda_touch();
    kvm_cuda_add16_rmsnorm_16(x, (const __nv_bfloat16 *)out, out, w, n, dim, eps);
}
