/* cuda_kernels.cu - the small ops of the CUDA backend: embedding gather, RMSNorm (plain, per head and fused
 * with the residual add), RoPE, SwiGLU, add, KV writes, the RoPE shift of cached keys, argmax and the
 * synthetic-weight generator. Each matches its CPU reference in kernels/cpu/ops_cpu.c (same formulas,
 * fp32 arithmetic; RoPE angles in fp64 reduced to [-pi, pi) and cos/sin rounded to fp32). */
#include "cuda_internal.cuh"

#include <float.h>

#include "../synthetic_gen.h"

#define S g_cuda.stream

static inline unsigned grid_for(size_t n, int threads) {
    size_t b = (n + threads - 1) / threads;
    if (b > 65535u * 32u) b = 65535u * 32u; /* kernels loop grid-stride */
    return (unsigned)(b ? b : 1);
}

/* ---- embed ----------------------------------------------------------------------------------------- */

template <typename T>
__global__ void k_embed(float *__restrict__ out, const T *__restrict__ table, const int32_t *__restrict__ ids, int dim) {
    kvm_pdl_trigger();
    const int r = blockIdx.x;
    const T *src = table + (size_t)ids[r] * dim;
    float *o = out + (size_t)r * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = kvm_to_f32<T>(src[i]);
}

void kvm_cuda_embed(float *out, const void *table, kvm_dtype_t dt, const int32_t *ids, int n, int dim) {
    KVM_OP("embed");
    if (n <= 0) return;
    if (dt == KVM_F32) k_embed<float><<<n, 256, 0, S>>>(out, (const float *)table, ids, dim);
    else if (dt == KVM_BF16) k_embed<__nv_bfloat16><<<n, 256, 0, S>>>(out, (const __nv_bfloat16 *)table, ids, dim);
    else k_embed<__half><<<n, 256, 0, S>>>(out, (const __half *)table, ids, dim);
    KVM_CU_LAUNCH("embed");
}

/* ---- RMSNorm ------------------------------------------------------------------------------------------ */

/* Block sum for blockDim.x <= 1024 (multiple of 32). */
__device__ __forceinline__ float block_sum(float v, float *sh) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = kvm_warp_sum(v);
    __syncthreads(); /* sh may be reused by a previous call */
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    float t = lane < nw ? sh[lane] : 0.0f;
    return kvm_warp_sum(t);
}

static int norm_threads(int dim) {
    int t = 32;
    while (t < dim / 4 && t < 1024) t *= 2;
    return t;
}

/* One block per row; optional residual add first (x += y) when y != NULL; optionally also writes the
 * output rounded to 16 bits (outh, the input of the next matmul) when outh != NULL. */
template <typename TH>
__global__ void k_rmsnorm(float *__restrict__ out, float *x, const float *__restrict__ y, const float *__restrict__ w,
                          int dim, float eps, TH *__restrict__ outh) {
    kvm_pdl_trigger();
    __shared__ float sh[32];
    const size_t base = (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = x[base + i];
        if (y) {
            v += y[base + i];
            x[base + i] = v;
        }
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float o = w[i] * (x[base + i] * inv);
        if (out) out[base + i] = o; /* NULL: only the 16-bit copy (add_rmsnorm_16) */
        if (outh) outh[base + i] = kvm_from_f32<TH>(o);
    }
}

/* The same as k_rmsnorm for dim % 4 == 0 and dim <= 4 * VPT * blockDim.x (16-byte aligned rows): every thread
 * keeps its VPT float4 chunks of x (+ y) in registers, so x, y and w are read with 16-byte loads issued together
 * (one memory round trip instead of one per element: this kernel runs twice per layer of a decode step, with one
 * block for a batch-1 row, where its latency is the cost). */
template <typename TH, int VPT, typename TY = float>
__global__ void k_rmsnorm_v(float *__restrict__ out, float *x, const TY *__restrict__ y, const float *__restrict__ w,
                            int dim, float eps, TH *__restrict__ outh) {
    kvm_pdl_trigger();
    __shared__ float sh[32];
    const size_t base = (size_t)blockIdx.x * dim;
    const int n4 = dim / 4;
    float4 v[VPT], wv[VPT];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < VPT; k++) {
        const int c = threadIdx.x + k * blockDim.x;
        if (c < n4) {
            v[k] = reinterpret_cast<const float4 *>(x + base)[c];
            wv[k] = reinterpret_cast<const float4 *>(w)[c];
            if (y) {
                float4 d;
                if constexpr (sizeof(TY) == 4) {
                    d = reinterpret_cast<const float4 *>(y + base)[c];
                } else { /* a 16-bit y (the GEMM wrote its output in 16 bits) */
                    const uint2 u = reinterpret_cast<const uint2 *>(y + base)[c];
                    const TY *e = reinterpret_cast<const TY *>(&u);
                    d = make_float4(kvm_to_f32<TY>(e[0]), kvm_to_f32<TY>(e[1]), kvm_to_f32<TY>(e[2]), kvm_to_f32<TY>(e[3]));
                }
                v[k].x += d.x, v[k].y += d.y, v[k].z += d.z, v[k].w += d.w;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < VPT; k++) {
        const int c = threadIdx.x + k * blockDim.x;
        if (c < n4) {
            if (y) reinterpret_cast<float4 *>(x + base)[c] = v[k];
            ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
        }
    }
    ss = block_sum(ss, sh);
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
#pragma unroll
    for (int k = 0; k < VPT; k++) {
        const int c = threadIdx.x + k * blockDim.x;
        if (c < n4) {
            const float4 o = make_float4(wv[k].x * (v[k].x * inv), wv[k].y * (v[k].y * inv), wv[k].z * (v[k].z * inv),
                                         wv[k].w * (v[k].w * inv));
            if (out) reinterpret_cast<float4 *>(out + base)[c] = o;
            if (outh) {
                __align__(8) TH h[4] = {kvm_from_f32<TH>(o.x), kvm_from_f32<TH>(o.y), kvm_from_f32<TH>(o.z), kvm_from_f32<TH>(o.w)};
                reinterpret_cast<uint2 *>(outh + base)[c] = *reinterpret_cast<const uint2 *>(h);
            }
        }
    }
}

/* opts.norm_v = false: the scalar norm kernel (for comparisons) */
static bool norm_vec_ok(const float *out, const float *x, const float *y, const float *w, int dim) {
    return g_cuda.opts.norm_v && dim % 4 == 0 && dim <= 4 * 4 * 1024 && ((uintptr_t)out % 16) == 0 && ((uintptr_t)x % 16) == 0 &&
           ((uintptr_t)y % 16) == 0 && ((uintptr_t)w % 16) == 0;
}

/* Rows above which a norm also writes its output rounded to 16 bits for the matmul that follows (prefill); it does
 * so for 2..16 rows too, which the skinny tensor-core GEMM takes in 16 bits (kvm_cuda_skinny_rounds), but writes
 * the fp32 output there in every case. */
#define KVM_NORM_HALF_MIN_ROWS 17

/* only16: leave out's fp32 values unwritten when the 16-bit copy is made (add_rmsnorm_16, prefill rows) */
static void launch_rmsnorm(float *out, float *x, const float *y, const float *w, int n, int dim, float eps,
                           bool only16 = false) {
    const kvm_dtype_t hd = kvm_cuda_half_dtype();
    void *xh = NULL;
    const bool prefill = n >= KVM_NORM_HALF_MIN_ROWS;
    if ((prefill || kvm_cuda_skinny_rounds(n)) && hd != KVM_F32) xh = kvm_cuda_scratch((size_t)n * dim * 2);
    float *fout = xh && only16 && prefill ? NULL : out;
    if (fout) kvm_cuda_wrote(out);
    else kvm_cuda_set_dead(out);
    if (norm_vec_ok(out, x, y, w, dim)) {
        const int n4 = dim / 4;
        const int thr = n4 >= 1024 ? 1024 : (n4 + 31) / 32 * 32;
        const int vpt = (n4 + thr - 1) / thr;
#define KVM_NV(TH, P, V) k_rmsnorm_v<TH, V><<<n, thr, 0, S>>>(fout, x, y, w, dim, eps, (TH *)(P))
#define KVM_NVV(TH, P)                   \
    do {                                 \
        if (vpt == 1) KVM_NV(TH, P, 1);  \
        else if (vpt == 2) KVM_NV(TH, P, 2); \
        else KVM_NV(TH, P, 4);           \
    } while (0)
        if (xh && hd == KVM_BF16) KVM_NVV(__nv_bfloat16, xh);
        else if (xh) KVM_NVV(__half, xh);
        else KVM_NVV(__half, NULL);
#undef KVM_NVV
#undef KVM_NV
        if (KVM_CU_LAUNCH("rmsnorm")) return;
        if (xh) kvm_cuda_set_rounded(out, (size_t)n * dim, hd);
        return;
    }
    if (xh && hd == KVM_BF16)
        k_rmsnorm<__nv_bfloat16><<<n, norm_threads(dim), 0, S>>>(fout, x, y, w, dim, eps, (__nv_bfloat16 *)xh);
    else if (xh)
        k_rmsnorm<__half><<<n, norm_threads(dim), 0, S>>>(fout, x, y, w, dim, eps, (__half *)xh);
    else
        k_rmsnorm<__half><<<n, norm_threads(dim), 0, S>>>(out, x, y, w, dim, eps, (__half *)NULL);
    if (KVM_CU_LAUNCH("rmsnorm")) return;
    if (xh) kvm_cuda_set_rounded(out, (size_t)n * dim, hd);
}

/* x += y16 (bf16 [n][dim], a GEMM's 16-bit output); out = rmsnorm(x) * w kept only as the bf16 copy for the next
 * GEMM (as add_rmsnorm_16). kvm_cuda_norm_from16_ok says when this applies. */
bool kvm_cuda_norm_from16_ok(int n, int dim, const float *x, const float *w) {
    return n >= KVM_NORM_HALF_MIN_ROWS && kvm_cuda_half_dtype() == KVM_BF16 && dim % 4 == 0 && dim <= 4 * 4 * 1024 &&
           ((uintptr_t)x % 16) == 0 && ((uintptr_t)w % 16) == 0 && norm_vec_ok(x, x, NULL, w, dim);
}

void kvm_cuda_add16_rmsnorm_16(float *x, const __nv_bfloat16 *y16, float *out, const float *w, int n, int dim, float eps) {
    KVM_PROF("add_rmsnorm (16-bit in and out)");
    void *xh = kvm_cuda_scratch((size_t)n * dim * 2);
    if (!xh) return;
    kvm_cuda_set_dead(out);
    const int n4 = dim / 4;
    const int thr = n4 >= 1024 ? 1024 : (n4 + 31) / 32 * 32;
    const int vpt = (n4 + thr - 1) / thr;
    typedef __nv_bfloat16 B;
    if (vpt == 1) k_rmsnorm_v<B, 1, B><<<n, thr, 0, S>>>(NULL, x, y16, w, dim, eps, (B *)xh);
    else if (vpt == 2) k_rmsnorm_v<B, 2, B><<<n, thr, 0, S>>>(NULL, x, y16, w, dim, eps, (B *)xh);
    else k_rmsnorm_v<B, 4, B><<<n, thr, 0, S>>>(NULL, x, y16, w, dim, eps, (B *)xh);
    if (KVM_CU_LAUNCH("add_rmsnorm (16-bit in and out)")) return;
    kvm_cuda_set_rounded(out, (size_t)n * dim, KVM_BF16);
}

/* One warp per row of hd (head RMSNorm), in place. */
__global__ void k_head_rmsnorm(float *x, const float *__restrict__ w, int rows, int hd, float eps) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    float *p = x + (size_t)row * hd;
    float ss = 0.0f;
    for (int i = lane; i < hd; i += 32) ss += p[i] * p[i];
    ss = kvm_warp_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)hd + eps);
    for (int i = lane; i < hd; i += 32) p[i] = w[i] * (p[i] * inv);
}


void kvm_cuda_rmsnorm(float *out, const float *x, const float *w, int n, int dim, float eps) {
    KVM_OP("rmsnorm");
    if (n <= 0) return;
    launch_rmsnorm(out, (float *)x, NULL, w, n, dim, eps);
}

void kvm_cuda_add_rmsnorm(float *x, const float *y, float *out, const float *w, int n, int dim, float eps) {
    KVM_OP("add_rmsnorm");
    if (n <= 0) return;
    launch_rmsnorm(out, x, y, w, n, dim, eps);
}

void kvm_cuda_add_rmsnorm_16(float *x, const float *y, float *out, const float *w, int n, int dim, float eps) {
    KVM_OP("add_rmsnorm (16-bit out)");
    if (n <= 0) return;
    /* opts.norm16 = false: write the fp32 output too (for comparisons) */
    launch_rmsnorm(out, x, y, w, n, dim, eps, g_cuda.opts.norm16);
}

void kvm_cuda_head_rmsnorm(float *x, const float *w, int n, int heads, int hd, float eps) {
    KVM_OP("head_rmsnorm");
    int rows = n * heads;
    if (rows <= 0) return;
    k_head_rmsnorm<<<(rows + 7) / 8, 256, 0, S>>>(x, w, rows, hd, eps);
    KVM_CU_LAUNCH("head_rmsnorm");
}

/* ---- RoPE ----------------------------------------------------------------------------------------------- */

/* Rotates pair (a, b) like rotate_pair() of the CPU reference: cos/sin of the fp64 angle rounded to fp32. */
__device__ __forceinline__ void rot(float *a, float *b, float c, float s) {
    float x = *a, y = *b;
    *a = __fsub_rn(__fmul_rn(x, c), __fmul_rn(y, s));
    *b = __fadd_rn(__fmul_rn(x, s), __fmul_rn(y, c));
}

/* The block's cos (cs[0, half)) and sin (cs[half, 2 half)) of position p's RoPE angles, in shared memory;
 * ends with a barrier, so every thread of the block may read the table. */
__device__ __forceinline__ void rope_table(float *cs, double p, const float *__restrict__ inv_freq, int half) {
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double a = kvm_rope_angle_dev(p, inv_freq[j]);
        double sn, cn;
        sincos(a, &sn, &cn);
        cs[j] = (float)cn;
        cs[half + j] = (float)sn;
    }
    __syncthreads();
}

/* Block per token; the cos/sin of its hd/2 angles go to shared memory, then every head of x (and of x2,
 * heads2 of them, when x2 != NULL) is rotated. */
__global__ void k_rope(float *x, int heads, float *x2, int heads2, int hd, const int32_t *__restrict__ pos,
                       const float *__restrict__ inv_freq, int interleaved) {
    kvm_pdl_trigger();
    extern __shared__ float cs[]; /* [half] cos, [half] sin */
    const int t = blockIdx.x, half = hd / 2;
    rope_table(cs, (double)pos[t], inv_freq, half);
    float *xt = x + (size_t)t * heads * hd;
    float *xt2 = x2 ? x2 + (size_t)t * heads2 * hd : NULL;
    const int total = (heads + (x2 ? heads2 : 0)) * half;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        int h = i / half, j = i % half;
        float *v = h < heads ? xt + (size_t)h * hd : xt2 + (size_t)(h - heads) * hd;
        if (interleaved) rot(&v[2 * j], &v[2 * j + 1], cs[j], cs[half + j]);
        else rot(&v[j], &v[j + half], cs[j], cs[half + j]);
    }
}

void kvm_cuda_rope(float *x, int n, int heads, int hd, const int32_t *pos, const float *inv_freq, kvm_rope_layout_t layout) {
    KVM_OP("rope");
    if (n <= 0) return;
    k_rope<<<n, 128, (size_t)hd * sizeof(float), S>>>(x, heads, NULL, 0, hd, pos, inv_freq, layout == KVM_ROPE_INTERLEAVED);
    KVM_CU_LAUNCH("rope");
}

void kvm_cuda_rope_qk(float *q, float *k, int n, int hq, int hk, int hd, const int32_t *pos, const float *inv_freq,
                      kvm_rope_layout_t layout) {
    KVM_OP("rope q+k");
    if (n <= 0) return;
    k_rope<<<n, 256, (size_t)hd * sizeof(float), S>>>(q, hq, k, hk, hd, pos, inv_freq, layout == KVM_ROPE_INTERLEAVED);
    KVM_CU_LAUNCH("rope q+k");
}

/* ---- elementwise ------------------------------------------------------------------------------------------ */

__global__ void k_swiglu(float *__restrict__ out, const float *__restrict__ gate, const float *__restrict__ up, size_t n) {
    kvm_pdl_trigger();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = (g / (1.0f + expf(-g))) * up[i];
    }
}

__global__ void k_add(float *x, const float *__restrict__ y, size_t n) {
    kvm_pdl_trigger();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) x[i] += y[i];
}

template <typename T>
__global__ void k_swiglu_half(T *__restrict__ out, const float *__restrict__ gate, const float *__restrict__ up, size_t n) {
    kvm_pdl_trigger();
    /* 4 elements per step: 16-byte loads, 8-byte stores (n % 4 == 0 and aligned buffers: checked by the caller) */
    const size_t n4 = n / 4;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n4; i += (size_t)gridDim.x * blockDim.x) {
        const float4 g = reinterpret_cast<const float4 *>(gate)[i], u = reinterpret_cast<const float4 *>(up)[i];
        T o[4];
        o[0] = kvm_from_f32<T>((g.x / (1.0f + expf(-g.x))) * u.x);
        o[1] = kvm_from_f32<T>((g.y / (1.0f + expf(-g.y))) * u.y);
        o[2] = kvm_from_f32<T>((g.z / (1.0f + expf(-g.z))) * u.z);
        o[3] = kvm_from_f32<T>((g.w / (1.0f + expf(-g.w))) * u.w);
        reinterpret_cast<uint2 *>(out)[i] = *reinterpret_cast<const uint2 *>(o);
    }
}

void kvm_cuda_swiglu_half(void *act, kvm_dtype_t dt, const float *gate, const float *up, size_t n) {
    if (!n) return; /* called by swiglu_matmul, which profiles it and owns the scratch it writes */
    if (dt == KVM_BF16) k_swiglu_half<__nv_bfloat16><<<grid_for(n / 4, 256), 256, 0, S>>>((__nv_bfloat16 *)act, gate, up, n);
    else k_swiglu_half<__half><<<grid_for(n / 4, 256), 256, 0, S>>>((__half *)act, gate, up, n);
    KVM_CU_LAUNCH("swiglu to 16 bit");
}

void kvm_cuda_swiglu(float *out, const float *gate, const float *up, size_t n) {
    KVM_OP("swiglu");
    if (!n) return;
    k_swiglu<<<grid_for(n, 256), 256, 0, S>>>(out, gate, up, n);
    KVM_CU_LAUNCH("swiglu");
}

void kvm_cuda_add(float *x, const float *y, size_t n) {
    KVM_OP("add");
    if (!n) return;
    k_add<<<grid_for(n, 256), 256, 0, S>>>(x, y, n);
    KVM_CU_LAUNCH("add");
}

/* ---- KV cache --------------------------------------------------------------------------------------------- */

/* Block per row: writes its K and V (H heads x D) at its position. */
template <typename T>
__global__ void k_kv_write(T *kv, int L, int H, int D, int layer, const float *__restrict__ k, const float *__restrict__ v,
                           const int32_t *__restrict__ row_start, const int32_t *__restrict__ ctx_len,
                           const int32_t *__restrict__ block_table, int n_seqs, int max_blocks,
                           const int32_t *__restrict__ qpos) {
    const int r = blockIdx.x;
    const int s = kvm_seq_of_row_dev(row_start, n_seqs, r);
    const int r0 = row_start[s], r1 = row_start[s + 1];
    const int pos = qpos ? qpos[r] : ctx_len[s] - (r1 - r0) + (r - r0);
    const int32_t blk = block_table[(size_t)s * max_blocks + pos / KVM_KV_BLOCK];
    const int t = pos % KVM_KV_BLOCK;
    for (int i = threadIdx.x; i < H * D; i += blockDim.x) {
        int h = i / D, d = i % D;
        kv[kvm_kv_index_dev(L, H, D, blk, layer, 0, h, t) + d] = kvm_from_f32<T>(k[(size_t)r * H * D + i]);
        kv[kvm_kv_index_dev(L, H, D, blk, layer, 1, h, t) + d] = kvm_from_f32<T>(v[(size_t)r * H * D + i]);
    }
}

void kvm_cuda_kv_write(void *kv, const kvm_kv_geom_t *g, int layer, const float *k, const float *v, const kvm_attn_batch_t *b) {
    KVM_OP("kv_write");
    if (b->total_rows <= 0) return;
    const int L = g->n_layers, H = g->n_kv_heads, D = g->head_dim;
    if (g->dtype == KVM_F32)
        k_kv_write<float><<<b->total_rows, 128, 0, S>>>((float *)kv, L, H, D, layer, k, v, b->row_start, b->ctx_len,
                                                        b->block_table, b->n_seqs, b->max_blocks, b->q_pos);
    else if (g->dtype == KVM_BF16)
        k_kv_write<__nv_bfloat16><<<b->total_rows, 128, 0, S>>>((__nv_bfloat16 *)kv, L, H, D, layer, k, v, b->row_start,
                                                                b->ctx_len, b->block_table, b->n_seqs, b->max_blocks,
                                                                b->q_pos);
    else
        k_kv_write<__half><<<b->total_rows, 128, 0, S>>>((__half *)kv, L, H, D, layer, k, v, b->row_start, b->ctx_len,
                                                         b->block_table, b->n_seqs, b->max_blocks, b->q_pos);
    KVM_CU_LAUNCH("kv_write");
}

/* Block (row r, group y of the row's q|k heads, hpb of them): one thread per rotated pair (j,
 * j + hd/2, or 2j, 2j+1 interleaved) of one head, with the cos/sin of its own angle (fp64 reduced to [-pi, pi),
 * rounded to fp32: as k_rope); a thread of a k head then writes its two k values and the same two elements of the
 * head's v into the cache at the row's position (as k_kv_write). Spread over rows x head groups so that a batched decode step (16
 * rows) fills the GPU instead of running 16 blocks; every thread's loads are independent. (A block per row took
 * 10.7 us per layer at batch 16 on the H100; this kernel made the step 0.13 ms faster, 2026-12-07.) */
template <typename T>
__global__ void k_rope_kv(float *q, float *k, const float *__restrict__ v, int hq, int hk, int hd, int hpb,
                          const int32_t *__restrict__ pos, const float *__restrict__ inv_freq, int interleaved, T *kv, int L,
                          int layer, const int32_t *__restrict__ row_start, const int32_t *__restrict__ block_table,
                          int n_seqs, int max_blocks) {
    kvm_pdl_trigger();
    const int r = blockIdx.x, half = hd / 2;
    for (int i = threadIdx.x; i < hpb * half; i += blockDim.x) {
        const int hh = blockIdx.y * hpb + i / half, j = i % half;
        if (hh >= hq + hk) return;
        const bool isq = hh < hq;
        const int head = isq ? hh : hh - hq;
        const int ia = interleaved ? 2 * j : j, ib = interleaved ? 2 * j + 1 : j + half;
        float *x = isq ? q + ((size_t)r * hq + head) * hd : k + ((size_t)r * hk + head) * hd;
        double sn, cn;
        sincos(kvm_rope_angle_dev((double)pos[r], inv_freq[j]), &sn, &cn);
        float a = x[ia], b = x[ib];
        rot(&a, &b, (float)cn, (float)sn);
        x[ia] = a;
        x[ib] = b;
        if (isq) continue;
        const float *vr = v + ((size_t)r * hk + head) * hd;
        const size_t hoff = (size_t)head * KVM_KV_BLOCK * hd; /* the cache slot is the row's position */
        const int ps = pos[r];
        const size_t ki = kvm_row_kv_base_dev(L, hk, hd, layer, 0, row_start, n_seqs, block_table, max_blocks, r, ps) + hoff;
        const size_t vi = kvm_row_kv_base_dev(L, hk, hd, layer, 1, row_start, n_seqs, block_table, max_blocks, r, ps) + hoff;
        kv[ki + ia] = kvm_from_f32<T>(a);
        kv[ki + ib] = kvm_from_f32<T>(b);
        kv[vi + ia] = kvm_from_f32<T>(vr[ia]);
        kv[vi + ib] = kvm_from_f32<T>(vr[ib]);
    }
}

void kvm_cuda_rope_qk_kv_write(float *q, float *k, const float *v, int hq, int hd, const int32_t *pos, const float *inv_freq,
                               kvm_rope_layout_t layout, void *kv, const kvm_kv_geom_t *g, int layer, const kvm_attn_batch_t *b) {
    KVM_OP("rope q+k, kv_write");
    if (b->total_rows <= 0) return;
    const int il = layout == KVM_ROPE_INTERLEAVED, hk = g->n_kv_heads, half = hd / 2;
    const int hpb = half >= 256 ? 1 : 256 / half; /* heads per block: 256 pairs (4 heads of 128) */
    const dim3 grid((unsigned)b->total_rows, (unsigned)((hq + hk + hpb - 1) / hpb));
    const dim3 block((unsigned)(hpb * half >= 256 ? 256 : (hpb * half + 31) / 32 * 32));
#define KVM_RKV(TT)                                                                                                      \
    k_rope_kv<TT><<<grid, block, 0, S>>>(q, k, v, hq, hk, hd, hpb, pos, inv_freq, il, (TT *)kv, g->n_layers, layer, \
               b->row_start, b->block_table, b->n_seqs, b->max_blocks)
    if (g->dtype == KVM_F32) KVM_RKV(float);
    else if (g->dtype == KVM_BF16) KVM_RKV(__nv_bfloat16);
    else KVM_RKV(__half);
#undef KVM_RKV
    KVM_CU_LAUNCH("rope q+k, kv_write");
}

/* Block per (token, layer): the token's cos/sin table in shared memory, then every KV head's key rotated
 * in place. One launch covers all layers. */
template <typename T>
__global__ void k_rope_shift(T *kv, int L, int H, int D, const int32_t *__restrict__ blk, const int32_t *__restrict__ slot,
                             const int32_t *__restrict__ delta, const float *__restrict__ inv_freq, int interleaved) {
    extern __shared__ float cs[];
    const int i = blockIdx.x, layer = blockIdx.y, half = D / 2;
    const int dl = delta[i];
    if (dl == 0) return;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double a = kvm_rope_angle_dev((double)dl, inv_freq[j]);
        double sn, cn;
        sincos(a, &sn, &cn);
        cs[j] = (float)cn;
        cs[half + j] = (float)sn;
    }
    __syncthreads();
    for (int w = threadIdx.x; w < H * half; w += blockDim.x) {
        int h = w / half, j = w % half;
        T *kp = kv + kvm_kv_index_dev(L, H, D, blk[i], layer, 0, h, slot[i]);
        int ia = interleaved ? 2 * j : j, ib = interleaved ? 2 * j + 1 : j + half;
        float a = kvm_to_f32<T>(kp[ia]), bb = kvm_to_f32<T>(kp[ib]);
        rot(&a, &bb, cs[j], cs[half + j]);
        kp[ia] = kvm_from_f32<T>(a);
        kp[ib] = kvm_from_f32<T>(bb);
    }
}

void kvm_cuda_rope_shift(void *kv, const kvm_kv_geom_t *g, const int32_t *blk, const int32_t *slot, const int32_t *delta,
                         int n, const float *inv_freq, kvm_rope_layout_t layout) {
    KVM_OP("rope_shift");
    if (n <= 0) return;
    dim3 grid((unsigned)n, (unsigned)g->n_layers);
    size_t sh = (size_t)g->head_dim * sizeof(float);
    int il = layout == KVM_ROPE_INTERLEAVED;
    const int L = g->n_layers, H = g->n_kv_heads, D = g->head_dim;
    if (g->dtype == KVM_F32)
        k_rope_shift<float><<<grid, 128, sh, S>>>((float *)kv, L, H, D, blk, slot, delta, inv_freq, il);
    else if (g->dtype == KVM_BF16)
        k_rope_shift<__nv_bfloat16><<<grid, 128, sh, S>>>((__nv_bfloat16 *)kv, L, H, D, blk, slot, delta, inv_freq, il);
    else
        k_rope_shift<__half><<<grid, 128, sh, S>>>((__half *)kv, L, H, D, blk, slot, delta, inv_freq, il);
    KVM_CU_LAUNCH("rope_shift");
}

/* ---- argmax ---------------------------------------------------------------------------------------------- */

/* Block per row; first index on ties (and NaN never wins, as in the CPU loop with `>`). */
__global__ void k_argmax_rows(int32_t *out, const float *__restrict__ x, int n) {
    kvm_pdl_trigger();
    __shared__ float sv[32];
    __shared__ int si[32];
    const float *xr = x + (size_t)blockIdx.x * n;
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i];
        if (bi == 0x7fffffff || v > best) { /* this thread's first element, or a strictly larger one */
            best = v;
            bi = i;
        }
    }
    kvm_warp_argmax(&best, &bi);
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (lane == 0) {
        sv[wid] = best;
        si[wid] = bi;
    }
    __syncthreads();
    if (wid == 0) {
        int nw = blockDim.x >> 5;
        best = lane < nw ? sv[lane] : -INFINITY;
        bi = lane < nw ? si[lane] : 0x7fffffff;
        kvm_warp_argmax(&best, &bi);
        if (lane == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
    }
}

void kvm_cuda_argmax_rows(int32_t *out, const float *x, int rows, int n) {
    KVM_OP("argmax");
    if (rows <= 0 || n <= 0) return;
    k_argmax_rows<<<rows, 1024, 0, S>>>(out, x, n);
    KVM_CU_LAUNCH("argmax");
}

int kvm_cuda_argmax(const float *x, int n) {
    int32_t *d = (int32_t *)kvm_cuda_scratch(sizeof(int32_t));
    if (!d || n <= 0) return 0;
    kvm_cuda_argmax_rows(d, x, 1, n);
    int32_t h = 0;
    if (KVM_CU(cudaMemcpyAsync(&h, d, sizeof h, cudaMemcpyDeviceToHost, S), "argmax copy") ||
        KVM_CU(cudaStreamSynchronize(S), "argmax sync"))
        return 0;
    return h;
}

/* ---- synthetic weights ------------------------------------------------------------------------------------ */

template <typename T>
__global__ void k_fill(T *dst, size_t n, uint64_t stream, float stddev, float mean) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = kvm_from_f32<T>(kvm_synthetic_value(stream, i, stddev, mean));
}

int kvm_cuda_fill_synthetic(void *dst, kvm_dtype_t dt, size_t n, uint64_t stream, float stddev, float mean) {
    if (!n) return 0;
    unsigned grid = (unsigned)(g_cuda.prop.multiProcessorCount * 8);
    if (dt == KVM_F32) k_fill<float><<<grid, 256, 0, S>>>((float *)dst, n, stream, stddev, mean);
    else if (dt == KVM_BF16) k_fill<__nv_bfloat16><<<grid, 256, 0, S>>>((__nv_bfloat16 *)dst, n, stream, stddev, mean);
    else k_fill<__half><<<grid, 256, 0, S>>>((__half *)dst, n, stream, stddev, mean);
    if (KVM_CU_LAUNCH("fill_synthetic")) {
        int c = g_cuda.err_code;
        kvm_seterr(c, "%s", g_cuda.err_msg);
        g_cuda.err_code = 0;
        return c;
    }
    return 0;
}
