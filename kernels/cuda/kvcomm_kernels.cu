/* kvcomm_kernels.cu - CUDA versions of the optional KVCOMM ops of ops.h (kvcomm_dist, kvcomm_softmax,
 * kvcomm_apply; kvcomm.md §3.6, §3.11). The CPU reference is kernels/cpu/ops_cpu_kvcomm.c.
 *
 * Memory-bound. Every thread owns one "pair chunk" of a head row: 16 elements that hold 8 complete RoPE
 * pairs (rotate-half: elements c*8..c*8+7 and D/2+c*8..D/2+c*8+7; interleaved: c*16..c*16+15), loaded
 * with 16-byte vector loads, so a key rotation never needs another thread. A row is D/16 threads.
 *
 *   dist : (k_dist2, the default) one block per (row chunk, anchor n, kv, layer, head) with n fastest in the
 *          grid, so the N blocks of one slab read the candidate's rows from HBM once and from L2 after; each
 *          thread keeps U rows (3 for 16-bit types, 2 for fp32) of candidate and anchor in flight, loaded before
 *          any use. It writes the head-aligned per-row |x-a| sums (partial per (l,h)), the tail-aligned
 *          per-channel sums of squares (partial per row chunk) and the prediction sums (partial per chunk);
 *          k_dist_fin reduces all three in one launch. Row chunks exist only to fill the GPU when N is small.
 *          kvcomm_dist=v1 (KVM_KVCOMM_DIST) runs the first kernel (k_dist: one chunk = all rows, one row per thread
 *          in flight, 1.35x slower at N = 20 on an H100), kvcomm_dist=v2u4 k_dist2 with 4 rows per thread
 *          (1 block per SM: slower). docs/perf/kvcomm.md has the numbers, and the versions that were slower
 *          (the candidate kept in shared memory with a reduction per anchor; a cp.async ring of anchors).
 *   apply: one block per (row chunk, layer, kv, head): y = src + sum_n w_n * delta_n (fp32), RoPE shift
 *          of the keys (cos/sin table of the block's single shift in shared memory), one rounding, scatter
 *          into the paged cache. One launch for all layers; one pass over each anchor delta.
 *
 * Debug: build with -DKVM_KVCOMM_DEBUG to get device asserts on block ids and row ranges. */
#include "cuda_internal.cuh"

#include <assert.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef KVM_KVCOMM_DEBUG
#define KC_ASSERT(x) assert(x)
#else
#define KC_ASSERT(x) ((void)0)
#endif

extern "C" int kvm_cuda_kvcomm_dist(const kvm_kvcomm_dist_args_t *a);
extern "C" int kvm_cuda_kvcomm_softmax(float *w, const float *d, int n, size_t cols, int mode);
extern "C" int kvm_cuda_kvcomm_apply(const kvm_kvcomm_apply_args_t *a);

namespace {

struct DView {
    const void *data;
    const int32_t *blocks;
    int start, rows, l0;
    const float *scale; /* q8 (ops.h kvm_kv_view_t): int8 data, one scale per head row; nullptr = the dtype */
};

struct Geo {
    int L, H, D;
};

__device__ __forceinline__ size_t vidx(const DView &v, const Geo &g, int l, int kv, int h, int r) {
    if (v.blocks) {
        int p = v.start + r;
        KC_ASSERT(p >= 0);
        int b = v.blocks[p / KVM_KV_BLOCK];
        KC_ASSERT(b >= 0);
        return ((((size_t)b * g.L + l) * 2 + kv) * g.H + h) * (size_t)(KVM_KV_BLOCK * g.D) +
               (size_t)(p % KVM_KV_BLOCK) * g.D;
    }
    KC_ASSERT(l >= v.l0 && r >= 0 && r < v.rows);
    return ((((size_t)(l - v.l0) * 2 + kv) * g.H + h) * (size_t)v.rows + r) * (size_t)g.D;
}

/* 8 consecutive elements <-> fp32 (one 16-byte access for 16-bit types, two for fp32) */
__device__ __forceinline__ void ld8(const float *p, float *o) {
    float4 a = reinterpret_cast<const float4 *>(p)[0], b = reinterpret_cast<const float4 *>(p)[1];
    o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
}
template <typename T> __device__ __forceinline__ void ld8(const T *p, float *o) {
    uint4 u = *reinterpret_cast<const uint4 *>(p);
    const T *e = reinterpret_cast<const T *>(&u);
#pragma unroll
    for (int i = 0; i < 8; i++) o[i] = kvm_to_f32<T>(e[i]);
}
__device__ __forceinline__ void st8(float *p, const float *o) {
    reinterpret_cast<float4 *>(p)[0] = make_float4(o[0], o[1], o[2], o[3]);
    reinterpret_cast<float4 *>(p)[1] = make_float4(o[4], o[5], o[6], o[7]);
}
template <typename T> __device__ __forceinline__ void st8(T *p, const float *o) {
    uint4 u;
    T *e = reinterpret_cast<T *>(&u);
#pragma unroll
    for (int i = 0; i < 8; i++) e[i] = kvm_from_f32<T>(o[i]);
    *reinterpret_cast<uint4 *>(p) = u;
}

/* q8 (ops.h, above KVM_Q8_MAX): 8 int8 elements <-> fp32 with the row's scale s; the 16-bit and fp32 loads ignore s */
__device__ __forceinline__ void ld8s(const int8_t *p, float *o, float s) {
    uint2 u = *reinterpret_cast<const uint2 *>(p);
    const int8_t *e = reinterpret_cast<const int8_t *>(&u);
#pragma unroll
    for (int i = 0; i < 8; i++) o[i] = __fmul_rn((float)e[i], s);
}
template <typename T> __device__ __forceinline__ void ld8s(const T *p, float *o, float) { ld8(p, o); }
__device__ __forceinline__ int8_t q8_of(float y, float s) {
    const float v = s > 0.f ? __fdiv_rn(y, s) : 0.f;
    return v > -KVM_Q8_MAX ? (v < KVM_Q8_MAX ? (int8_t)__float2int_rn(v) : (int8_t)127) : v == v ? (int8_t)-127 : (int8_t)0;
}
__device__ __forceinline__ void st8s(int8_t *p, const float *o, float s) {
    uint2 u;
    int8_t *e = reinterpret_cast<int8_t *>(&u);
#pragma unroll
    for (int i = 0; i < 8; i++) e[i] = q8_of(o[i], s);
    *reinterpret_cast<uint2 *>(p) = u;
}
template <typename T> __device__ __forceinline__ void st8s(T *p, const float *o, float) { st8(p, o); }

/* element index (within the row) of chunk slot k of chunk c; pair i = (slot i, slot 8 + i) has frequency c*8+i */
__device__ __forceinline__ int chunk_elem(int c, int k, int D, int il) {
    if (il) return c * 16 + (k < 8 ? 2 * k : 2 * (k - 8) + 1);
    return k < 8 ? c * 8 + k : D / 2 + c * 8 + (k - 8);
}

/* the chunk's 16 elements of a row (s: the row's scale when T is int8, q8) */
template <typename T> __device__ __forceinline__ void ld16(const T *row, int c, int D, int il, float *x, float s = 1.f) {
    if (!il) {
        ld8s(row + c * 8, x, s);
        ld8s(row + D / 2 + c * 8, x + 8, s);
    } else {
        float t[16];
        ld8s(row + c * 16, t, s);
        ld8s(row + c * 16 + 8, t + 8, s);
#pragma unroll
        for (int i = 0; i < 8; i++) x[i] = t[2 * i], x[8 + i] = t[2 * i + 1];
    }
}
template <typename T> __device__ __forceinline__ void st16(T *row, int c, int D, int il, const float *x, float s = 1.f) {
    if (!il) {
        st8s(row + c * 8, x, s);
        st8s(row + D / 2 + c * 8, x + 8, s);
    } else {
        float t[16];
#pragma unroll
        for (int i = 0; i < 8; i++) t[2 * i] = x[i], t[2 * i + 1] = x[8 + i];
        st8s(row + c * 16, t, s);
        st8s(row + c * 16 + 8, t + 8, s);
    }
}

/* the chunk of row (l, kv, h, r) of view v: the dtype T, or q8 when v has scales */
template <typename T>
__device__ __forceinline__ void ld16v(const DView &v, const Geo &g, int l, int kv, int h, int r, int c, int il, float *x) {
    const size_t i = vidx(v, g, l, kv, h, r);
    if (v.scale) ld16(static_cast<const int8_t *>(v.data) + i, c, g.D, il, x, v.scale[i / g.D]);
    else ld16(static_cast<const T *>(v.data) + i, c, g.D, il, x);
}

/* element i (vidx + d) of view v as fp32 (q8 when v has scales) */
template <typename T> __device__ __forceinline__ float ld1v(const DView &v, const Geo &g, size_t i) {
    if (v.scale) return __fmul_rn((float)static_cast<const int8_t *>(v.data)[i], v.scale[i / g.D]);
    return kvm_to_f32<T>(static_cast<const T *>(v.data)[i]);
}

/* rotation of the chunk's 8 pairs with cos/sin table cs[0..D/2) | cs[D/2..D) (same arithmetic as rot()) */
__device__ __forceinline__ void rot16(float *x, const float *cs, int c, int D) {
#pragma unroll
    for (int i = 0; i < 8; i++) {
        float cn = cs[c * 8 + i], sn = cs[D / 2 + c * 8 + i];
        float a = x[i], b = x[8 + i];
        x[i] = __fsub_rn(__fmul_rn(a, cn), __fmul_rn(b, sn));
        x[8 + i] = __fadd_rn(__fmul_rn(a, sn), __fmul_rn(b, cn));
    }
}

__device__ void fill_cs(float *cs, int delta, const float *inv_freq, int D) {
    for (int j = threadIdx.x; j < D / 2; j += blockDim.x) {
        double a = kvm_rope_angle_dev((double)delta, inv_freq[j]);
        double sn, cn;
        sincos(a, &sn, &cn);
        cs[j] = (float)cn;
        cs[D / 2 + j] = (float)sn;
    }
}

/* ---- dist ------------------------------------------------------------------------------------------ */

struct DistParams {
    Geo g;
    DView x;
    int T, N, want, rotate_tail, il;
    const float *inv_freq;
    float *ph_part;   /* [2][N][L*H][T] */
    float *pred_part; /* [N][L*H] */
    float *d_pf;      /* [2][N][L][H][D] */
    DView a[KVM_KVCOMM_MAX_ANCHORS];
    int a_rows[KVM_KVCOMM_MAX_ANCHORS];
};

constexpr int kThreads = 256;

/* Threads per K/V row: one per 16-element chunk (D / 16 of them), rounded up to a power of 2 so that the lanes of
 * a row are consecutive lanes of one warp and kThreads holds whole rows (D = 48, Qwen3-style small heads: 3
 * chunks on 4 lanes). Lanes at or past D / 16 hold no chunk: they load and store nothing. */
__host__ __device__ __forceinline__ int row_lanes(int D) {
    int p = 1;
    while (p < D / 16) p <<= 1;
    return p;
}

/* the (anchor n, head h, layer l, K/V kv) slab of a distance block index b, anchors fastest */
__device__ __forceinline__ void slab_of(int b, int N, const Geo &g, int *n, int *h, int *l, int *kv) {
    *n = b % N;
    b /= N;
    *h = b % g.H;
    b /= g.H;
    *l = b % g.L;
    *kv = b / g.L;
}

template <typename E> __global__ void __launch_bounds__(kThreads) k_dist(const __grid_constant__ DistParams p) {
    extern __shared__ float sm[]; /* cs[D] | red[kThreads / CPR][D] */
    const Geo g = p.g;
    const int N = p.N;
    int n, h, l, kv;
    slab_of(blockIdx.x, N, g, &n, &h, &l, &kv);
    const bool want_ph = p.want & KVM_KVCOMM_WANT_PH, want_pf = p.want & KVM_KVCOMM_WANT_PF;
    const bool want_pred = (p.want & KVM_KVCOMM_WANT_PRED) && kv == 1;
    if (!want_ph && !want_pf && !want_pred) return;
    const int CPR = row_lanes(g.D), RG = kThreads / CPR;
    const int c = threadIdx.x % CPR, rg = threadIdx.x / CPR;
    const bool on = c < g.D / 16;
    const int Tn = p.a_rows[n], T = p.T, off = Tn - T;
    const bool rot = kv == 0 && off && p.rotate_tail && want_pf;
    float *cs = sm, *red = sm + g.D;
    if (rot) fill_cs(cs, -off, p.inv_freq, g.D);
    __syncthreads();
    const E *X = static_cast<const E *>(p.x.data);
    const E *A = static_cast<const E *>(p.a[n].data);
    float acc_pf[16];
#pragma unroll
    for (int k = 0; k < 16; k++) acc_pf[k] = 0.f;
    float acc_pred = 0.f;
    const int lh = l * g.H + h;
    for (int t0 = 0; t0 < T; t0 += RG) {
        const int t = t0 + rg;
        const bool live = on && t < T;
        float x[16], ah[16], at[16];
        float s_abs = 0.f;
        if (live) {
            ld16(X + vidx(p.x, g, l, kv, h, t), c, g.D, p.il, x);
            if (want_ph || want_pred || (want_pf && off == 0)) {
                ld16(A + vidx(p.a[n], g, l, kv, h, t), c, g.D, p.il, ah);
#pragma unroll
                for (int k = 0; k < 16; k++) {
                    float df = x[k] - ah[k];
                    s_abs += fabsf(df);
                    acc_pred += df * df;
                }
            }
            if (want_pf) {
                if (off == 0) {
#pragma unroll
                    for (int k = 0; k < 16; k++) at[k] = ah[k];
                } else {
                    ld16(A + vidx(p.a[n], g, l, kv, h, off + t), c, g.D, p.il, at);
                    if (rot) rot16(at, cs, c, g.D);
                }
#pragma unroll
                for (int k = 0; k < 16; k++) {
                    float df = x[k] - at[k];
                    acc_pf[k] += df * df;
                }
            }
        }
        if (want_ph) {
            /* the CPR lanes of a row are consecutive lanes of one warp (CPR is a power of 2 <= 32) */
            for (int o = CPR / 2; o > 0; o >>= 1) s_abs += __shfl_xor_sync(0xffffffffu, s_abs, o);
            if (live && c == 0) p.ph_part[(((size_t)kv * N + n) * (g.L * g.H) + lh) * T + t] = s_abs;
        }
    }
    if (want_pf) {
        if (on)
#pragma unroll
            for (int k = 0; k < 16; k++) red[rg * g.D + chunk_elem(c, k, g.D, p.il)] = acc_pf[k];
        __syncthreads();
        for (int d = threadIdx.x; d < g.D; d += blockDim.x) {
            float s = 0.f;
            for (int r = 0; r < RG; r++) s += red[r * g.D + d];
            p.d_pf[((((size_t)kv * N + n) * g.L + l) * g.H + h) * g.D + d] = sqrtf(s);
        }
    }
    if (want_pred) {
        __syncthreads();
        float s = kvm_warp_sum(acc_pred);
        if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = s;
        __syncthreads();
        if (threadIdx.x == 0) {
            float tot = 0.f;
            for (int w = 0; w < kThreads / 32; w++) tot += red[w];
            p.pred_part[(size_t)n * g.L * g.H + lh] = tot;
        }
    }
}

/* ---- dist v2 (the default): raw 16-element row chunks, several rows per thread in flight -------------- *
 * Partials: head-aligned per-row |x-a| sums [2][N][L*H][T] (reduced over (l,h) by k_dist_fin, as v1),
 * tail-aligned per-channel sums of squares [NC][2][N][L*H][D] (summed over the NC row chunks and square-rooted
 * by k_dist_fin) and prediction sums of squares [NC][N][L*H]. */

template <typename E> struct RawChunk { uint4 v[2]; }; /* 16 elements of a 16-bit type */
template <> struct RawChunk<float> { float4 v[4]; };

template <typename E> __device__ __forceinline__ void ld_raw(const E *row, int c, int D, int il, RawChunk<E> &r) {
    const uint4 *a = reinterpret_cast<const uint4 *>(row + (il ? c * 16 : c * 8));
    const uint4 *b = reinterpret_cast<const uint4 *>(row + (il ? c * 16 + 8 : D / 2 + c * 8));
    r.v[0] = __ldg(a), r.v[1] = __ldg(b);
}
template <> __device__ __forceinline__ void ld_raw<float>(const float *row, int c, int D, int il, RawChunk<float> &r) {
    const float4 *a = reinterpret_cast<const float4 *>(row + (il ? c * 16 : c * 8));
    const float4 *b = reinterpret_cast<const float4 *>(row + (il ? c * 16 + 8 : D / 2 + c * 8));
    r.v[0] = __ldg(a), r.v[1] = __ldg(a + 1), r.v[2] = __ldg(b), r.v[3] = __ldg(b + 1);
}
/* raw -> fp32 in the chunk order of ld16 (x[i], x[8 + i] = pair i) */
template <typename E> __device__ __forceinline__ void decode(const RawChunk<E> &r, int il, float *x) {
    const E *e = reinterpret_cast<const E *>(&r);
    if (!il) {
#pragma unroll
        for (int k = 0; k < 16; k++) x[k] = kvm_to_f32<E>(e[k]);
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++) x[i] = kvm_to_f32<E>(e[2 * i]), x[8 + i] = kvm_to_f32<E>(e[2 * i + 1]);
    }
}
template <> __device__ __forceinline__ void decode<float>(const RawChunk<float> &r, int il, float *x) {
    const float *e = reinterpret_cast<const float *>(&r);
    if (!il) {
#pragma unroll
        for (int k = 0; k < 16; k++) x[k] = e[k];
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++) x[i] = e[2 * i], x[8 + i] = e[2 * i + 1];
    }
}


struct Dist2Out {
    float *ph_part;   /* [2][N][L*H][T] */
    float *pf_part;   /* [NC][2][N][L*H][D] */
    float *pred_part; /* [NC][N][L*H] */
};

/* One block per (row chunk, kv, layer, head, anchor n) with n fastest (the N blocks of one slab share the
 * candidate rows through L2), kThreads threads: CPR threads per row, RG rows per step, U steps unrolled with
 * every load issued before any use (U rows of candidate and anchor per thread in flight). Per row: |x-a| summed
 * over the row (partial per (l,h), reduced by k_dist_fin); per channel: (x-a')^2 summed over the chunk's rows
 * (partial per chunk); prediction: sum of squares of V rows (partial per chunk). */
template <typename E, int U, int MINB>
__global__ void __launch_bounds__(kThreads, MINB) k_dist2(const __grid_constant__ DistParams p, const Dist2Out o, int rows_per_chunk) {
    extern __shared__ float sm[]; /* cs[D] | red[RG][D] | pred[warps] */
    constexpr int NW = kThreads / 32;
    const Geo g = p.g;
    const int N = p.N, T = p.T;
    int n, h, l, kv;
    slab_of(blockIdx.y, N, g, &n, &h, &l, &kv);
    const bool want_ph = p.want & KVM_KVCOMM_WANT_PH, want_pf = p.want & KVM_KVCOMM_WANT_PF;
    const bool want_pred = (p.want & KVM_KVCOMM_WANT_PRED) && kv == 1;
    if (!want_ph && !want_pf && !want_pred) return;
    const int CPR = row_lanes(g.D), RG = kThreads / CPR;
    const int c = threadIdx.x % CPR, rg = threadIdx.x / CPR, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const bool on = c < g.D / 16;
    const int chunk = blockIdx.x, tb = chunk * rows_per_chunk, te = min(T, tb + rows_per_chunk);
    const size_t LH = (size_t)g.L * g.H, lh = (size_t)l * g.H + h;
    const int off = p.a_rows[n] - T;
    const bool rot = kv == 0 && off && p.rotate_tail && want_pf;
    const bool need_head = want_ph || want_pred || (want_pf && off == 0), need_tail = want_pf && off != 0;
    float *cs = sm, *red = sm + g.D, *psm = red + (size_t)RG * g.D;
    if (rot) fill_cs(cs, -off, p.inv_freq, g.D);
    __syncthreads();
    const E *X = static_cast<const E *>(p.x.data);
    const E *A = static_cast<const E *>(p.a[n].data);
    float acc[16];
#pragma unroll
    for (int k = 0; k < 16; k++) acc[k] = 0.f;
    float acc_pred = 0.f;
    for (int t0 = tb; t0 < te; t0 += RG * U) {
        RawChunk<E> xr[U], ar[U];
        bool live[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int t = t0 + rg + u * RG;
            live[u] = on && t < te;
            if (live[u]) {
                ld_raw(X + vidx(p.x, g, l, kv, h, t), c, g.D, p.il, xr[u]);
                ld_raw(A + vidx(p.a[n], g, l, kv, h, need_head ? t : off + t), c, g.D, p.il, ar[u]);
            }
        }
        float s_abs[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            s_abs[u] = 0.f;
            if (!live[u]) continue;
            float x[16], a[16];
            decode(xr[u], p.il, x);
            decode(ar[u], p.il, a);
            if (need_head) {
#pragma unroll
                for (int k = 0; k < 16; k++) {
                    const float df = x[k] - a[k];
                    s_abs[u] += fabsf(df);
                    acc_pred += df * df;
                    if (!need_tail) acc[k] += df * df;
                }
            } else { /* the tail rows were loaded (only the per-channel distance is wanted) */
                if (rot) rot16(a, cs, c, g.D);
#pragma unroll
                for (int k = 0; k < 16; k++) {
                    const float df = x[k] - a[k];
                    acc[k] += df * df;
                }
            }
        }
        if (need_head && need_tail) { /* T_n > T with the head distances wanted too: the tail rows as well */
#pragma unroll
            for (int u = 0; u < U; u++)
                if (live[u]) ld_raw(A + vidx(p.a[n], g, l, kv, h, off + t0 + rg + u * RG), c, g.D, p.il, ar[u]);
#pragma unroll
            for (int u = 0; u < U; u++) {
                if (!live[u]) continue;
                float x[16], a[16];
                decode(xr[u], p.il, x);
                decode(ar[u], p.il, a);
                if (rot) rot16(a, cs, c, g.D);
#pragma unroll
                for (int k = 0; k < 16; k++) {
                    const float df = x[k] - a[k];
                    acc[k] += df * df;
                }
            }
        }
        if (want_ph) {
#pragma unroll
            for (int u = 0; u < U; u++) {
                float v = s_abs[u];
                for (int o2 = CPR / 2; o2 > 0; o2 >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o2);
                if (live[u] && c == 0) o.ph_part[(((size_t)kv * N + n) * LH + lh) * T + t0 + rg + u * RG] = v;
            }
        }
    }
    if (want_pf && on) {
#pragma unroll
        for (int k = 0; k < 16; k++) red[rg * g.D + chunk_elem(c, k, g.D, p.il)] = acc[k];
    }
    if (want_pred) {
        const float s = kvm_warp_sum(acc_pred);
        if (lane == 0) psm[warp] = s;
    }
    __syncthreads();
    if (want_pf)
        for (int d = threadIdx.x; d < g.D; d += blockDim.x) {
            float s = 0.f;
            for (int r = 0; r < RG; r++) s += red[r * g.D + d];
            o.pf_part[((((size_t)chunk * 2 + kv) * N + n) * LH + lh) * g.D + d] = s;
        }
    if (want_pred && threadIdx.x == 0) {
        float s = 0.f;
        for (int w = 0; w < NW; w++) s += psm[w];
        o.pred_part[((size_t)chunk * N + n) * LH + lh] = s;
    }
}

/* the three reductions of k_dist2 in one launch: d_ph (sum over (l,h), scaled), d_pf (sqrt of the sum over
 * chunks), d_pred (sqrt of the sum over chunks and (l,h)); fp64 sums */
__global__ void k_dist_fin(float *d_ph, float *d_pf, float *d_pred, const Dist2Out o, int N, int LH, int T, int D, int NC,
                           size_t n_ph, size_t n_pf, size_t n_pred, double scale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n_ph) {
        const size_t kn = i / T, t = i % T;
        const float *q = o.ph_part + kn * LH * T + t;
        double s = 0;
        for (int j = 0; j < LH; j++) s += q[(size_t)j * T];
        d_ph[i] = (float)(s * scale);
        return;
    }
    i -= n_ph;
    if (i < n_pf) {
        double s = 0;
        for (int ch = 0; ch < NC; ch++) s += o.pf_part[(size_t)ch * n_pf + i];
        d_pf[i] = (float)sqrt(s);
        return;
    }
    i -= n_pf;
    if (i < n_pred) {
        double s = 0;
        for (int ch = 0; ch < NC; ch++)
            for (int j = 0; j < LH; j++) s += o.pred_part[((size_t)ch * N + i) * LH + j];
        d_pred[i] = (float)sqrt(s);
    }
}

/* d_ph[kv][n][t] = sum over (l,h) of the partials / (L*H*D) */
__global__ void k_dist_ph_reduce(float *d_ph, const float *part, int N, int LH, int T, float scale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)2 * N * T) return;
    size_t kn = i / T, t = i % T;
    const float *q = part + kn * LH * T + t;
    double s = 0;
    for (int j = 0; j < LH; j++) s += q[(size_t)j * T];
    d_ph[i] = (float)(s * scale);
}

__global__ void k_dist_pred_reduce(float *d_pred, const float *part, int LH) {
    const int n = blockIdx.x;
    __shared__ double sh[32];
    double s = 0;
    for (int j = threadIdx.x; j < LH; j += blockDim.x) s += part[(size_t)n * LH + j];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double tot = 0;
        for (int w = 0; w < (int)(blockDim.x / 32); w++) tot += sh[w];
        d_pred[n] = (float)sqrt(tot);
    }
}

/* ---- softmax over anchors ------------------------------------------------------------------------------ */

__global__ void k_softmax(float *w, const float *d, int N, size_t cols, int mode) {
    size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    if (mode == KVM_KVCOMM_NEAREST) {
        int best = 0;
        float bv = d[c];
        for (int i = 1; i < N; i++) {
            float v = d[(size_t)i * cols + c];
            if (v < bv) bv = v, best = i;
        }
        for (int i = 0; i < N; i++) w[(size_t)i * cols + c] = i == best ? 1.f : 0.f;
        return;
    }
    double mn = d[c];
    for (int i = 1; i < N; i++) mn = fmin(mn, (double)d[(size_t)i * cols + c]);
    double sum = 0;
    for (int i = 0; i < N; i++) sum += exp(-((double)d[(size_t)i * cols + c] - mn));
    for (int i = 0; i < N; i++) w[(size_t)i * cols + c] = (float)(exp(-((double)d[(size_t)i * cols + c] - mn)) / sum);
}

/* ---- apply ------------------------------------------------------------------------------------------------ */

struct ApplyParams {
    Geo g;
    DView src, dst;
    int N, per_channel, w_rows, r0, r1, rows_per_block, shift, il;
    const float *w;
    const float *inv_freq;
    DView d[KVM_KVCOMM_MAX_ANCHORS];
};

template <typename T> __global__ void __launch_bounds__(kThreads) k_apply(const __grid_constant__ ApplyParams p) {
    extern __shared__ float sm[]; /* cs[D] | wsm[N][D] in chunk order */
    const Geo g = p.g;
    int b = blockIdx.y;
    const int h = b % g.H;
    b /= g.H;
    const int kv = b % 2;
    const int l = b / 2;
    const int CPR = row_lanes(g.D), RG = kThreads / CPR;
    const int c = threadIdx.x % CPR, rg = threadIdx.x / CPR;
    const bool on = c < g.D / 16;
    const bool rot = kv == 0 && p.shift != 0;
    const bool mix = l >= 1 && p.N > 0;
    float *cs = sm, *wsm = sm + g.D;
    if (rot) fill_cs(cs, p.shift, p.inv_freq, g.D);
    if (mix && p.per_channel) {
        /* weights of (kv, l, h) for every anchor, stored so that thread chunk c reads 16 consecutive floats */
        for (int e = threadIdx.x; e < p.N * g.D; e += blockDim.x) {
            int i = e / g.D, q = e % g.D, cc = q / 16, k = q % 16;
            wsm[e] = p.w[((((size_t)kv * p.N + i) * g.L + l) * g.H + h) * g.D + chunk_elem(cc, k, g.D, p.il)];
        }
    }
    __syncthreads();
    const T *S = static_cast<const T *>(p.src.data);
    T *Y = static_cast<T *>(const_cast<void *>(p.dst.data));
    const int rbeg = p.r0 + blockIdx.x * p.rows_per_block;
    const int rend = on ? min(p.r1, rbeg + p.rows_per_block) : rbeg;
    for (int r = rbeg + rg; r < rend; r += RG) {
        float y[16];
        ld16(S + vidx(p.src, g, l, kv, h, r), c, g.D, p.il, y);
        if (mix) {
#pragma unroll 4
            for (int i = 0; i < p.N; i++) {
                float dl[16];
                ld16v<T>(p.d[i], g, l, kv, h, r, c, p.il, dl);
                if (p.per_channel) {
                    const float4 *wp = reinterpret_cast<const float4 *>(wsm + (size_t)i * g.D + c * 16);
                    float wv[16];
#pragma unroll
                    for (int q = 0; q < 4; q++) {
                        float4 f = wp[q];
                        wv[4 * q] = f.x, wv[4 * q + 1] = f.y, wv[4 * q + 2] = f.z, wv[4 * q + 3] = f.w;
                    }
#pragma unroll
                    for (int k = 0; k < 16; k++) y[k] = __fadd_rn(y[k], __fmul_rn(wv[k], dl[k]));
                } else {
                    const float w = p.w[((size_t)kv * p.N + i) * p.w_rows + r];
#pragma unroll
                    for (int k = 0; k < 16; k++) y[k] = __fadd_rn(y[k], __fmul_rn(w, dl[k]));
                }
            }
        }
        if (rot) rot16(y, cs, c, g.D);
        st16(Y + vidx(p.dst, g, l, kv, h, r), c, g.D, p.il, y);
    }
}

/* ---- host side ------------------------------------------------------------------------------------------ */

float *g_part = nullptr; /* dist partials, grow-only */
size_t g_part_bytes = 0;

float *part_buf(size_t bytes) {
    if (bytes <= g_part_bytes) return g_part;
    if (kvm_cuda_capturing()) {
        kvm_seterr(KVM_EDEVICE, "kvcomm_dist: scratch must grow during graph capture (run once eagerly)");
        return nullptr;
    }
    if (g_part) {
        cudaStreamSynchronize(g_cuda.stream); /* queued dist kernels may still use it */
        cudaFree(g_part);
        g_part = nullptr;
        g_part_bytes = 0;
    }
    bytes += bytes / 2; /* room to grow without another synchronizing free */
    void *q = nullptr;
    if (cudaMalloc(&q, bytes) != cudaSuccess) {
        cudaGetLastError();
        kvm_seterr(KVM_ENOMEM, "kvcomm_dist: cudaMalloc of %zu bytes of scratch failed", bytes);
        return nullptr;
    }
    g_part = static_cast<float *>(q);
    g_part_bytes = bytes;
    return g_part;
}

DView to_dview(const kvm_kv_view_t &v) { return DView{v.data, v.blocks, v.start, v.rows, v.l0, v.scale}; }

int check_common(const kvm_kv_geom_t *g, int N, const char *op) {
    const int D = g->head_dim;
    if (g->n_layers <= 0 || g->n_kv_heads <= 0 || D < 16 || D % 16 || D > 512)
        return kvm_seterr(KVM_EUNSUPPORTED, "%s (cuda): head_dim %d is not a multiple of 16 up to 512", op, D);
    if (N < 0 || N > KVM_KVCOMM_MAX_ANCHORS)
        return kvm_seterr(KVM_EUNSUPPORTED, "%s (cuda): %d anchors (at most %d)", op, N, KVM_KVCOMM_MAX_ANCHORS);
    return 0;
}

/* q8_ok: the view may be q8 (anchor deltas of apply and spread), if contiguous */
int check_view(const kvm_kv_view_t &v, const char *what, const char *op, int rows_needed, bool q8_ok = false) {
    if (!v.data || (reinterpret_cast<uintptr_t>(v.data) & 15))
        return kvm_seterr(KVM_EINVAL, "%s (cuda): %s data is NULL or not 16-byte aligned", op, what);
    if (v.scale && (!q8_ok || v.blocks))
        return kvm_seterr(KVM_EINVAL, "%s (cuda): %s is a %s q8 view (only contiguous anchor deltas may be q8)", op,
                          what, v.blocks ? "paged" : "contiguous");
    if (!v.blocks && v.rows < rows_needed)
        return kvm_seterr(KVM_EINVAL, "%s (cuda): %s has %d rows, %d needed", op, what, v.rows, rows_needed);
    if (v.blocks && (v.l0 != 0 || v.start < 0))
        return kvm_seterr(KVM_EINVAL, "%s (cuda): paged %s needs l0 = 0 and start >= 0", op, what);
    return 0;
}

/* opts.kvcomm_dist = KVM_CUDA_DIST_V1 selects the first distance kernel (one block per anchor, one row per thread
 * in flight), KVM_CUDA_DIST_V2U4 the 4-rows-per-thread variant of k_dist2; both kept for A/B timing */
bool dist_v1() { return g_cuda.opts.kvcomm_dist == KVM_CUDA_DIST_V1; }

bool dist_u4() { return g_cuda.opts.kvcomm_dist == KVM_CUDA_DIST_V2U4; }

int launch_rc(const char *what) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return kvm_seterr(KVM_EDEVICE, "%s: %s", what, cudaGetErrorString(e));
    return 0;
}

} // namespace

extern "C" int kvm_cuda_kvcomm_dist(const kvm_kvcomm_dist_args_t *a) {
    KVM_OP("kvcomm_dist");
    if (!a) return kvm_seterr(KVM_EINVAL, "kvcomm_dist: no arguments");
    int rc = check_common(&a->g, a->n, "kvcomm_dist");
    if (rc) return rc;
    const int L = a->g.n_layers, H = a->g.n_kv_heads, D = a->g.head_dim, N = a->n, T = a->T;
    if (T <= 0) return kvm_seterr(KVM_EINVAL, "kvcomm_dist: T=%d", T);
    if (N == 0) return 0;
    if ((rc = check_view(a->x, "candidate", "kvcomm_dist", T))) return rc;
    DistParams p;
    memset(&p, 0, sizeof p);
    p.g = Geo{L, H, D};
    p.x = to_dview(a->x);
    p.T = T;
    p.N = N;
    p.want = a->want;
    p.rotate_tail = a->rotate_tail;
    p.il = a->layout == KVM_ROPE_INTERLEAVED;
    p.inv_freq = a->inv_freq;
    p.d_pf = a->d_pf;
    for (int n = 0; n < N; n++) {
        if (a->a_rows[n] < T)
            return kvm_seterr(KVM_EINVAL, "kvcomm_dist: anchor %d has %d rows, fewer than T=%d", n, a->a_rows[n], T);
        if ((rc = check_view(a->a[n], "anchor", "kvcomm_dist", a->a_rows[n]))) return rc;
        p.a[n] = to_dview(a->a[n]);
        p.a_rows[n] = a->a_rows[n];
    }
    if ((a->want & KVM_KVCOMM_WANT_PF) && a->rotate_tail && !a->inv_freq)
        return kvm_seterr(KVM_EINVAL, "kvcomm_dist: rotate_tail needs inv_freq");
    const size_t LH = (size_t)L * H;
    cudaStream_t st = g_cuda.stream;
    if (!dist_v1() && (size_t)N * 2 * LH <= 65535) { /* (beyond: grid.y would overflow; v1 has a 1-D grid) */
        /* row chunks: enough blocks for ~4 waves of 2 blocks per SM, at least one unrolled step per chunk */
        /* rows per thread in flight: 3 for 16-bit (2 blocks per SM), 4 with KVM_KVCOMM_DIST=v2u4 (1 block per SM),
         * 2 for fp32 */
        const int U = a->g.dtype == KVM_F32 ? 2 : dist_u4() ? 4 : 3;
        const int step = (kThreads / row_lanes(D)) * U;
        const size_t base = (size_t)N * 2 * LH, want_blocks = (size_t)8 * (g_cuda.prop.multiProcessorCount > 0 ? g_cuda.prop.multiProcessorCount : 132);
        int NC = (int)((want_blocks + base - 1) / base);
        const int max_nc = (T + step - 1) / step;
        if (NC > max_nc) NC = max_nc;
        if (NC < 1) NC = 1;
        int rpc = (T + NC - 1) / NC;
        rpc = (rpc + step - 1) / step * step;
        NC = (T + rpc - 1) / rpc;
        const size_t n_ph = (a->want & KVM_KVCOMM_WANT_PH) ? (size_t)2 * N * T : 0;
        const size_t n_pf = (a->want & KVM_KVCOMM_WANT_PF) ? (size_t)2 * N * LH * D : 0;
        const size_t n_pred = (a->want & KVM_KVCOMM_WANT_PRED) ? (size_t)N : 0;
        const size_t ph_elems = n_ph ? (size_t)2 * N * LH * T : 0, pf_elems = (size_t)NC * n_pf,
                     pred_elems = n_pred ? (size_t)NC * N * LH : 0;
        float *part = part_buf((ph_elems + pf_elems + pred_elems + 64) * sizeof(float));
        if (!part) return kvm_errcode();
        Dist2Out o{part, part + ph_elems, part + ph_elems + pf_elems};
        const size_t shmem = ((size_t)D + (size_t)kThreads * 16 + kThreads / 32) * sizeof(float);
        dim3 grid((unsigned)NC, (unsigned)base);
        /* shmem stays under the 48 KiB that needs no opt-in (16.6 KiB at most) */
        if (a->g.dtype == KVM_F32) k_dist2<float, 2, 2><<<grid, kThreads, shmem, st>>>(p, o, rpc);
        else if (a->g.dtype == KVM_BF16 && U == 4) k_dist2<__nv_bfloat16, 4, 1><<<grid, kThreads, shmem, st>>>(p, o, rpc);
        else if (a->g.dtype == KVM_BF16) k_dist2<__nv_bfloat16, 3, 2><<<grid, kThreads, shmem, st>>>(p, o, rpc);
        else if (U == 4) k_dist2<__half, 4, 1><<<grid, kThreads, shmem, st>>>(p, o, rpc);
        else k_dist2<__half, 3, 2><<<grid, kThreads, shmem, st>>>(p, o, rpc);
        if ((rc = launch_rc("kvcomm_dist"))) return rc;
        const size_t tot = n_ph + n_pf + n_pred;
        k_dist_fin<<<(unsigned)((tot + 255) / 256), 256, 0, st>>>(a->d_ph, a->d_pf, a->d_pred, o, N, (int)LH, T, D, NC, n_ph,
                                                                  n_pf, n_pred, 1.0 / ((double)LH * D));
        return launch_rc("kvcomm_dist(reduce)");
    }
    size_t ph_elems = (a->want & KVM_KVCOMM_WANT_PH) ? (size_t)2 * N * LH * T : 0;
    size_t pred_elems = (a->want & KVM_KVCOMM_WANT_PRED) ? (size_t)N * LH : 0;
    float *part = part_buf((ph_elems + pred_elems + 64) * sizeof(float));
    if (!part) return kvm_errcode();
    p.ph_part = part;
    p.pred_part = part + ph_elems;
    const int RG = kThreads / row_lanes(D);
    size_t shmem = (size_t)D * sizeof(float) + (size_t)RG * D * sizeof(float);
    unsigned blocks = (unsigned)((size_t)N * 2 * L * H);
    switch (a->g.dtype) {
    case KVM_F32:
        cudaFuncSetAttribute(k_dist<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shmem);
        k_dist<float><<<blocks, kThreads, shmem, st>>>(p);
        break;
    case KVM_BF16:
        cudaFuncSetAttribute(k_dist<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shmem);
        k_dist<__nv_bfloat16><<<blocks, kThreads, shmem, st>>>(p);
        break;
    default:
        cudaFuncSetAttribute(k_dist<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shmem);
        k_dist<__half><<<blocks, kThreads, shmem, st>>>(p);
        break;
    }
    if ((rc = launch_rc("kvcomm_dist"))) return rc;
    if (a->want & KVM_KVCOMM_WANT_PH) {
        size_t n = (size_t)2 * N * T;
        k_dist_ph_reduce<<<(unsigned)((n + 255) / 256), 256, 0, st>>>(a->d_ph, p.ph_part, N, (int)LH, T,
                                                                      (float)(1.0 / ((double)LH * D)));
        if ((rc = launch_rc("kvcomm_dist(ph reduce)"))) return rc;
    }
    if (a->want & KVM_KVCOMM_WANT_PRED) {
        k_dist_pred_reduce<<<(unsigned)N, 256, 0, st>>>(a->d_pred, p.pred_part, (int)LH);
        if ((rc = launch_rc("kvcomm_dist(pred reduce)"))) return rc;
    }
    return 0;
}

extern "C" int kvm_cuda_kvcomm_softmax(float *w, const float *d, int n, size_t cols, int mode) {
    KVM_OP("kvcomm_softmax");
    if (n <= 0) return kvm_seterr(KVM_EINVAL, "kvcomm_softmax: %d anchors", n);
    if (!cols) return 0;
    k_softmax<<<(unsigned)((cols + 255) / 256), 256, 0, g_cuda.stream>>>(w, d, n, cols, mode);
    return launch_rc("kvcomm_softmax");
}

extern "C" int kvm_cuda_kvcomm_apply(const kvm_kvcomm_apply_args_t *a) {
    KVM_OP("kvcomm_apply");
    if (!a) return kvm_seterr(KVM_EINVAL, "kvcomm_apply: no arguments");
    int rc = check_common(&a->g, a->n, "kvcomm_apply");
    if (rc) return rc;
    const int L = a->g.n_layers, H = a->g.n_kv_heads, D = a->g.head_dim, N = a->n;
    if (a->r0 < 0 || a->r1 < a->r0 || (N > 0 && (!a->w || !a->delta)) || !a->dst_blocks || !a->dst_kv ||
        a->dst_pos < 0)
        return kvm_seterr(KVM_EINVAL, "kvcomm_apply: rows [%d, %d), N=%d, dst_pos %d", a->r0, a->r1, N, a->dst_pos);
    if (a->shift && !a->inv_freq) return kvm_seterr(KVM_EINVAL, "kvcomm_apply: a shift needs inv_freq");
    if (a->r1 == a->r0) return 0;
    if (a->dst_n_blocks > 0 && (a->dst_pos + (a->r1 - a->r0) - 1) / KVM_KV_BLOCK >= a->dst_n_blocks)
        return kvm_seterr(KVM_EINVAL, "kvcomm_apply: positions [%d, %d) need block %d, the table has %d", a->dst_pos,
                          a->dst_pos + (a->r1 - a->r0), (a->dst_pos + (a->r1 - a->r0) - 1) / KVM_KV_BLOCK, a->dst_n_blocks);
    if ((rc = check_view(a->src, "source", "kvcomm_apply", a->r1))) return rc;
    ApplyParams p;
    memset(&p, 0, sizeof p);
    p.g = Geo{L, H, D};
    p.src = to_dview(a->src);
    p.dst = DView{a->dst_kv, a->dst_blocks, a->dst_pos - a->r0, 0, 0};
    p.N = N;
    p.per_channel = a->per_channel;
    p.w_rows = a->w_rows;
    if (N > 0 && !a->per_channel && a->w_rows < a->r1)
        return kvm_seterr(KVM_EINVAL, "kvcomm_apply: w_rows %d < r1 %d", a->w_rows, a->r1);
    p.r0 = a->r0;
    p.r1 = a->r1;
    p.shift = a->shift;
    p.il = a->layout == KVM_ROPE_INTERLEAVED;
    p.w = a->w;
    p.inv_freq = a->inv_freq;
    for (int i = 0; i < N; i++) {
        if ((rc = check_view(a->delta[i], "delta", "kvcomm_apply", a->r1, true))) return rc;
        if (!a->delta[i].blocks && a->delta[i].l0 > 1)
            return kvm_seterr(KVM_EINVAL, "kvcomm_apply: delta %d starts at layer %d", i, a->delta[i].l0);
        p.d[i] = to_dview(a->delta[i]);
    }
    const int RG = kThreads / row_lanes(D);
    p.rows_per_block = RG * 2;
    size_t shmem = (size_t)D * sizeof(float) + (a->per_channel ? (size_t)N * D * sizeof(float) : 0);
    if (shmem > 200 * 1024) return kvm_seterr(KVM_EUNSUPPORTED, "kvcomm_apply (cuda): %zu bytes of shared memory", shmem);
    dim3 grid((unsigned)((a->r1 - a->r0 + p.rows_per_block - 1) / p.rows_per_block), (unsigned)(L * 2 * H));
    cudaStream_t st = g_cuda.stream;
    switch (a->g.dtype) {
    case KVM_F32:
        cudaFuncSetAttribute(k_apply<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shmem);
        k_apply<float><<<grid, kThreads, shmem, st>>>(p);
        break;
    case KVM_BF16:
        cudaFuncSetAttribute(k_apply<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shmem);
        k_apply<__nv_bfloat16><<<grid, kThreads, shmem, st>>>(p);
        break;
    default:
        cudaFuncSetAttribute(k_apply<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shmem);
        k_apply<__half><<<grid, kThreads, shmem, st>>>(p);
        break;
    }
    return launch_rc("kvcomm_apply");
}

/* ---- kvcomm_spread (ours, recompute_select=spread): one block per row ---------------------------------------- */

namespace {

struct SpreadParams {
    Geo g;
    DView x;
    int N, w_rows, r0;
    const float *w;
    float *out;
    DView d[KVM_KVCOMM_MAX_ANCHORS];
};

/* Block = one row r; threads stride over the (layer >= 1, kv, head, d) elements of the row; fp32 partial sums,
 * fp64 block reduction. */
template <typename T> __global__ void __launch_bounds__(256) k_spread(const __grid_constant__ SpreadParams p) {
    const Geo g = p.g;
    const int r = p.r0 + blockIdx.x;
    const int per_l = 2 * g.H * g.D;
    const int n_el = (g.L - 1) * per_l;
    float S = 0.f, X = 0.f;
    for (int e = threadIdx.x; e < n_el; e += blockDim.x) {
        const int l = 1 + e / per_l, rem = e % per_l, kv = rem / (g.H * g.D), h = (rem / g.D) % g.H, d = rem % g.D;
        const float x = kvm_to_f32<T>(static_cast<const T *>(p.x.data)[vidx(p.x, g, l, kv, h, r) + d]);
        float dl[KVM_KVCOMM_MAX_ANCHORS];
        float est = 0.f;
        for (int i = 0; i < p.N; i++) {
            dl[i] = ld1v<T>(p.d[i], g, vidx(p.d[i], g, l, kv, h, r) + d);
            est = __fadd_rn(est, __fmul_rn(p.w[((size_t)kv * p.N + i) * p.w_rows + r], dl[i]));
        }
        for (int i = 0; i < p.N; i++) {
            const float df = dl[i] - est;
            S += p.w[((size_t)kv * p.N + i) * p.w_rows + r] * df * df;
        }
        X += x * x;
    }
    __shared__ double sS[256], sX[256];
    sS[threadIdx.x] = S, sX[threadIdx.x] = X;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) sS[threadIdx.x] += sS[threadIdx.x + k], sX[threadIdx.x] += sX[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) p.out[blockIdx.x] = (float)(sS[0] / (sX[0] + 1e-30)) + 1e-30f;
}

} // namespace

extern "C" int kvm_cuda_kvcomm_spread(const kvm_kvcomm_spread_args_t *a) {
    KVM_OP("kvcomm_spread");
    if (!a) return kvm_seterr(KVM_EINVAL, "kvcomm_spread: no arguments");
    int rc = check_common(&a->g, a->n, "kvcomm_spread");
    if (rc) return rc;
    const int N = a->n;
    if (a->r0 < 0 || a->r1 < a->r0 || N < 1 || !a->w || !a->delta || !a->out)
        return kvm_seterr(KVM_EINVAL, "kvcomm_spread: rows [%d, %d), N=%d", a->r0, a->r1, N);
    if (a->w_rows < a->r1) return kvm_seterr(KVM_EINVAL, "kvcomm_spread: w_rows %d < r1 %d", a->w_rows, a->r1);
    if (a->r1 == a->r0) return 0;
    if ((rc = check_view(a->x, "candidate", "kvcomm_spread", a->r1))) return rc;
    SpreadParams p;
    memset(&p, 0, sizeof p);
    p.g = Geo{a->g.n_layers, a->g.n_kv_heads, a->g.head_dim};
    p.x = to_dview(a->x);
    p.N = N, p.w_rows = a->w_rows, p.r0 = a->r0, p.w = a->w, p.out = a->out;
    for (int i = 0; i < N; i++) {
        if ((rc = check_view(a->delta[i], "delta", "kvcomm_spread", a->r1, true))) return rc;
        p.d[i] = to_dview(a->delta[i]);
    }
    cudaStream_t st = g_cuda.stream;
    const unsigned grid = (unsigned)(a->r1 - a->r0);
    switch (a->g.dtype) {
    case KVM_F32: k_spread<float><<<grid, 256, 0, st>>>(p); break;
    case KVM_BF16: k_spread<__nv_bfloat16><<<grid, 256, 0, st>>>(p); break;
    default: k_spread<__half><<<grid, 256, 0, st>>>(p); break;
    }
    return launch_rc("kvcomm_spread");
}

/* ---- kvcomm_diff (anchor materialization, kvcomm.md §3.8): one block per (row chunk, layer, kv, head) -------- */

namespace {

struct DiffParams {
    Geo g;
    DView a, b, out;
    int n, l0, rows_per_block, shift, il, has_b;
    const float *inv_freq;
    float *out_scale; /* q8 output (ops.h), or nullptr */
};

/* y = rot(a) - b as k_apply reads and rotates rows (16-element pair chunks), stored contiguous */
template <typename T> __global__ void __launch_bounds__(kThreads) k_diff(const __grid_constant__ DiffParams p) {
    __shared__ float cs[512];
    const Geo g = p.g;
    int b = blockIdx.y;
    const int h = b % g.H;
    b /= g.H;
    const int kv = b % 2;
    const int l = p.l0 + b / 2;
    const int CPR = row_lanes(g.D), RG = kThreads / CPR;
    const int c = threadIdx.x % CPR, rg = threadIdx.x / CPR;
    const bool on = c < g.D / 16;
    const bool rot = kv == 0 && p.shift != 0;
    if (rot) fill_cs(cs, p.shift, p.inv_freq, g.D);
    __syncthreads();
    const T *A = static_cast<const T *>(p.a.data);
    const T *B = static_cast<const T *>(p.b.data);
    /* a q8 row needs the max over its lanes: every lane of a row group runs the loop (the lanes of one group have
     * the same rg, so the same trip count), and lanes past D / 16 load and store nothing */
    const unsigned gmask = CPR >= 32 ? 0xffffffffu : ((1u << CPR) - 1) << (threadIdx.x % 32 / CPR * CPR);
    const int rbeg = blockIdx.x * p.rows_per_block;
    const int rend = on || p.out_scale ? min(p.n, rbeg + p.rows_per_block) : rbeg;
    for (int r = rbeg + rg; r < rend; r += RG) {
        float y[16] = {};
        if (on) {
            ld16(A + vidx(p.a, g, l, kv, h, r), c, g.D, p.il, y);
            if (rot) rot16(y, cs, c, g.D);
            if (p.has_b) {
                float x[16];
                ld16(B + vidx(p.b, g, l, kv, h, r), c, g.D, p.il, x);
#pragma unroll
                for (int k = 0; k < 16; k++) y[k] = __fsub_rn(y[k], x[k]);
            }
        }
        const size_t o = vidx(p.out, g, l, kv, h, r);
        if (p.out_scale) {
            float m = 0.f;
#pragma unroll
            for (int k = 0; k < 16; k++) m = fmaxf(m, fabsf(y[k]));
            for (int w = CPR / 2; w > 0; w >>= 1) m = fmaxf(m, __shfl_xor_sync(gmask, m, w));
            const float sc = __fdiv_rn(m, KVM_Q8_MAX);
            if (c == 0) p.out_scale[o / g.D] = sc;
            if (on) st16(static_cast<int8_t *>(const_cast<void *>(p.out.data)) + o, c, g.D, p.il, y, sc);
        } else {
            st16(static_cast<T *>(const_cast<void *>(p.out.data)) + o, c, g.D, p.il, y);
        }
    }
}

} // namespace

extern "C" int kvm_cuda_kvcomm_diff(const kvm_kvcomm_diff_args_t *a) {
    KVM_OP("kvcomm_diff");
    if (!a) return kvm_seterr(KVM_EINVAL, "kvcomm_diff: no arguments");
    int rc = check_common(&a->g, 0, "kvcomm_diff");
    if (rc) return rc;
    const int L = a->g.n_layers, H = a->g.n_kv_heads, D = a->g.head_dim;
    if (a->n < 0 || a->l0 < 0 || a->l0 > 1 || a->l0 >= L || !a->out)
        return kvm_seterr(KVM_EINVAL, "kvcomm_diff: n=%d l0=%d (L=%d), out %p", a->n, a->l0, L, a->out);
    if (a->shift && !a->inv_freq) return kvm_seterr(KVM_EINVAL, "kvcomm_diff: a shift needs inv_freq");
    if (!a->n) return 0;
    if ((rc = check_view(a->a, "a", "kvcomm_diff", a->n))) return rc;
    if (a->b.data && (rc = check_view(a->b, "b", "kvcomm_diff", a->n))) return rc;
    for (int k = 0; k < 2; k++) {
        const kvm_kv_view_t &v = k ? a->b : a->a;
        if (v.data && !v.blocks && v.l0 > a->l0)
            return kvm_seterr(KVM_EINVAL, "kvcomm_diff: view %c starts at layer %d, needed %d", k ? 'b' : 'a', v.l0, a->l0);
    }
    if (reinterpret_cast<uintptr_t>(a->out) & 15) return kvm_seterr(KVM_EINVAL, "kvcomm_diff (cuda): out not 16-byte aligned");
    DiffParams p;
    memset(&p, 0, sizeof p);
    p.g = Geo{L, H, D};
    p.a = to_dview(a->a);
    p.b = to_dview(a->b);
    p.has_b = a->b.data != nullptr;
    p.out = DView{a->out, nullptr, 0, a->n, a->l0, nullptr};
    p.out_scale = a->out_scale;
    p.n = a->n, p.l0 = a->l0, p.shift = a->shift;
    p.il = a->layout == KVM_ROPE_INTERLEAVED;
    p.inv_freq = a->inv_freq;
    const int RG = kThreads / row_lanes(D);
    p.rows_per_block = RG * 2;
    dim3 grid((unsigned)((a->n + p.rows_per_block - 1) / p.rows_per_block), (unsigned)((L - a->l0) * 2 * H));
    cudaStream_t st = g_cuda.stream;
    switch (a->g.dtype) {
    case KVM_F32: k_diff<float><<<grid, kThreads, 0, st>>>(p); break;
    case KVM_BF16: k_diff<__nv_bfloat16><<<grid, kThreads, 0, st>>>(p); break;
    default: k_diff<__half><<<grid, kThreads, 0, st>>>(p); break;
    }
    return launch_rc("kvcomm_diff");
}
