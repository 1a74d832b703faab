/* cuda_attention.cu - causal grouped-query attention over the paged KV cache.
 *
 * Three kernels, all reading keys and values through the block tables and never forming the T x T score
 * matrix:
 *  - k_attn_mma (prefill; BF16/F16 cache, head_dim 64 or 128): FlashAttention-2 style. A CTA of 4 warps
 *    takes 64 query rows of one sequence and one query head; it walks the keys in tiles of 64 tokens
 *    (4 cache blocks) staged in shared memory, computes S = Q K^T and O += P V with mma.sync m16n8k16
 *    (16-bit operands, fp32 accumulation) and keeps an online softmax per row in registers.
 *  - k_attn_dec (decode and other steps of fewer than 16 rows a sequence; BF16/F16 cache, head_dim 64 or
 *    128): a CTA takes one query row and up to 16 query heads of one KV head (the 16 rows of the tensor-core
 *    MMA) over one chunk of the context; Q and P as hi + lo 16-bit pairs (fp32-level accuracy).
 *  - k_attn_split (every other case, fp32 cache included): a CTA of 4 warps takes one query
 *    row and the query heads of one KV head (they share every K/V load) over one chunk of the context
 *    (split-K); each warp runs an online softmax over every 4th group of 4 tokens; the warps merge in
 *    shared memory and, when the context was split,
 *    k_attn_merge combines the chunks. The split count depends only on the batch shape and the block
 *    table width (not on the context lengths), so a captured decode graph stays valid as sequences grow.
 * scale is applied to q.k in fp32 as in the CPU reference. */
#include "cuda_internal.cuh"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define S g_cuda.stream

/* ==== split-K kernel (any dtype, head_dim <= 32 * DPL) ==================================================== */

#define SPLIT_WARPS 4
#define SPLIT_TB 4   /* tokens per warp iteration (independent loads in flight) */
#define SPLIT_GMAX 8 /* query heads per CTA (one KV head's group, or a chunk of it) */

/* Where a split-K decode CTA works: blockIdx.x = (query row r, KV head kh, chunk of gm query heads of its group: h0 ..
 * h0 + G - 1), blockIdx.y = the context split, whose tokens are [t0, t1) (empty past the row's position); bt: the
 * block table of the row's sequence. */
typedef struct split_cta {
    int split, kh, r, h0, G, t0, t1;
    const int32_t *bt;
} split_cta_t;

__device__ __forceinline__ split_cta_t split_cta_of(int gm, int H, int group, int hchunks, const int32_t *row_start,
                                                    const int32_t *ctx_len, const int32_t *block_table, int n_seqs,
                                                    int max_blocks, int chunk, const int32_t *qpos) {
    split_cta_t c;
    c.split = blockIdx.y;
    const int hc = blockIdx.x % hchunks;
    c.kh = (blockIdx.x / hchunks) % H;
    c.r = blockIdx.x / (hchunks * H);
    c.h0 = c.kh * group + hc * gm;
    c.G = min(gm, group - hc * gm);
    const int s = kvm_seq_of_row_dev(row_start, n_seqs, c.r);
    const int r0 = row_start[s], r1 = row_start[s + 1];
    const int pos = qpos ? qpos[c.r] : ctx_len[s] - (r1 - r0) + (c.r - r0);
    c.t0 = c.split * chunk;
    c.t1 = min(c.t0 + chunk, pos + 1);
    c.bt = block_table + (size_t)s * max_blocks;
    return c;
}

/* Output dimension d of (row, head) wi of one context split: the output itself when the context was not split,
 * else the split's partial for k_attn_merge (m in natural-log units, l and acc[d] relative to it). */
__device__ __forceinline__ void store_split(float *out, float *partial, size_t wi, int D, int d, int n_splits, int split,
                                            float acc, float l, float m) {
    if (n_splits == 1) {
        out[wi * D + d] = acc / l;
        return;
    }
    float *pp = partial + (wi * n_splits + split) * (D + 2);
    pp[2 + d] = acc;
    if (d == 0) {
        pp[0] = m;
        pp[1] = l;
    }
}

/* CTA = (query row r, KV head kh, chunk hc of its query heads, context split). The group's query heads
 * share every K/V load. Each warp runs an online softmax over tokens t0 + 4w .. (step 16); the warps then
 * merge in shared memory. */
template <typename T, int DPL>
__global__ void __launch_bounds__(SPLIT_WARPS * 32)
    k_attn_split(float *__restrict__ out, float *__restrict__ partial, const float *__restrict__ q, const T *__restrict__ kv,
                 int L, int H, int D, int layer, int heads, int group, int hchunks, const int32_t *__restrict__ row_start,
                 const int32_t *__restrict__ ctx_len, const int32_t *__restrict__ block_table, int n_seqs, int max_blocks,
                 float scale, int n_splits, int chunk, const int32_t *__restrict__ qpos) {
    __shared__ float sm_m[SPLIT_WARPS][SPLIT_GMAX], sm_l[SPLIT_WARPS][SPLIT_GMAX];
    kvm_pdl_trigger();
    __shared__ float sm_acc[SPLIT_WARPS][SPLIT_GMAX][32 * DPL];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const split_cta_t cta =
        split_cta_of(SPLIT_GMAX, H, group, hchunks, row_start, ctx_len, block_table, n_seqs, max_blocks, chunk, qpos);
    const int split = cta.split, kh = cta.kh, r = cta.r, h0 = cta.h0, G = cta.G, t0 = cta.t0, t1 = cta.t1;
    const int32_t *bt = cta.bt;

    float qv[SPLIT_GMAX][DPL], acc[SPLIT_GMAX][DPL], m[SPLIT_GMAX], l[SPLIT_GMAX];
#pragma unroll
    for (int g = 0; g < SPLIT_GMAX; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane * DPL + i;
            qv[g][i] = (g < G && d < D) ? q[((size_t)r * heads + h0 + g) * D + d] : 0.0f;
            acc[g][i] = 0.0f;
        }
    }
    for (int tb = t0 + warp * SPLIT_TB; tb < t1; tb += SPLIT_WARPS * SPLIT_TB) {
        float kf[SPLIT_TB][DPL], vf[SPLIT_TB][DPL];
#pragma unroll
        for (int u = 0; u < SPLIT_TB; u++) {
            const int t = tb + u;
            if (t < t1) {
                const int32_t blk = bt[t / KVM_KV_BLOCK];
                const T *kp = kv + kvm_kv_index_dev(L, H, D, blk, layer, 0, kh, t % KVM_KV_BLOCK);
                const T *vp = kv + kvm_kv_index_dev(L, H, D, blk, layer, 1, kh, t % KVM_KV_BLOCK);
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    const int d = lane * DPL + i;
                    kf[u][i] = d < D ? kvm_to_f32<T>(kp[d]) : 0.0f;
                    vf[u][i] = d < D ? kvm_to_f32<T>(vp[d]) : 0.0f;
                }
            } else {
#pragma unroll
                for (int i = 0; i < DPL; i++) kf[u][i] = vf[u][i] = 0.0f;
            }
        }
#pragma unroll
        for (int g = 0; g < SPLIT_GMAX; g++) {
            if (g >= G) break;
            float sc[SPLIT_TB];
#pragma unroll
            for (int u = 0; u < SPLIT_TB; u++) {
                float d = 0.0f;
#pragma unroll
                for (int i = 0; i < DPL; i++) d += qv[g][i] * kf[u][i];
                sc[u] = d;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)
#pragma unroll
                for (int u = 0; u < SPLIT_TB; u++) sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], o);
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < SPLIT_TB; u++) {
                sc[u] = (tb + u < t1) ? sc[u] * scale : -INFINITY;
                mx = fmaxf(mx, sc[u]);
            }
            const float corr = __expf(m[g] - mx); /* m = -inf on the first group: 0 */
            l[g] *= corr;
#pragma unroll
            for (int i = 0; i < DPL; i++) acc[g][i] *= corr;
#pragma unroll
            for (int u = 0; u < SPLIT_TB; u++) {
                const float p = __expf(sc[u] - mx);
                l[g] += p;
#pragma unroll
                for (int i = 0; i < DPL; i++) acc[g][i] += p * vf[u][i];
            }
            m[g] = mx;
        }
    }
    /* merge the warps */
#pragma unroll
    for (int g = 0; g < SPLIT_GMAX; g++) {
        if (lane == 0) {
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }
#pragma unroll
        for (int i = 0; i < DPL; i++) sm_acc[warp][g][lane * DPL + i] = acc[g][i];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < G * D; e += blockDim.x) {
        const int g = e / D, d = e % D;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < SPLIT_WARPS; w++) M = fmaxf(M, sm_m[w][g]);
        float a = 0.0f, Lsum = 0.0f;
#pragma unroll
        for (int w = 0; w < SPLIT_WARPS; w++) {
            const float ws = sm_m[w][g] == -INFINITY ? 0.0f : __expf(sm_m[w][g] - M);
            Lsum += sm_l[w][g] * ws;
            a += sm_acc[w][g][d] * ws;
        }
        store_split(out, partial, (size_t)r * heads + h0 + g, D, d, n_splits, split, a, Lsum, M);
    }
}

/* ==== merge of the splits ===================================================================================== */

/* One (row, head)'s n_splits partials pp[sp * (D + 2)] = (m, l, acc[D]): their largest m, and output dimension d
 * combined from them */
__device__ __forceinline__ float merge_max(const float *pp, int D, int n_splits) {
    float M = -INFINITY;
    for (int sp = 0; sp < n_splits; sp++) M = fmaxf(M, pp[(size_t)sp * (D + 2)]);
    return M;
}
__device__ __forceinline__ float merge_dim(const float *pp, int D, int n_splits, int d, float M) {
    float a = 0.0f, l = 0.0f;
    for (int sp = 0; sp < n_splits; sp++) {
        const float *p = pp + (size_t)sp * (D + 2);
        const float w = p[0] == -INFINITY ? 0.0f : __expf(p[0] - M);
        l += p[1] * w;
        a += p[2 + d] * w;
    }
    return a / l;
}

/* Combines the n_splits partial results (m, l, acc[D]) of each (row, head); outh != NULL: also the output rounded
 * to 16 bits, for the skinny GEMM of the o projection (kvm_cuda_skinny_rounds). */
template <typename TH>
__global__ void k_attn_merge(float *__restrict__ out, const float *__restrict__ partial, int D, int n_splits,
                             TH *__restrict__ outh) {
    kvm_pdl_trigger();
    const int wi = blockIdx.x;
    const float *pp = partial + (size_t)wi * n_splits * (D + 2);
    const float M = merge_max(pp, D, n_splits);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float o = merge_dim(pp, D, n_splits, d, M);
        out[(size_t)wi * D + d] = o;
        if (outh) outh[(size_t)wi * D + d] = kvm_from_f32<TH>(o);
    }
}

/* ==== tensor-core prefill kernel ============================================================================= */

#define MMA_Q 64   /* query rows per CTA (16 per warp) */
#define MMA_K 64   /* keys per tile */

template <typename T> struct mma_t;
template <> struct mma_t<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t pack(float a, float b) {
        __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<uint32_t *>(&v);
    }
    static __device__ __forceinline__ void mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct mma_t<__half> {
    static __device__ __forceinline__ uint32_t pack(float a, float b) {
        __half2 v = __floats2half2_rn(a, b);
        return *reinterpret_cast<uint32_t *>(&v);
    }
    static __device__ __forceinline__ void mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t *r, const void *smem) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t *r, const void *smem) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

/* K and V of tokens [first, first + NTOK) of KV head kh into Ks / Vs [NTOK][D + 8] by cp.async, 16 bytes per copy,
 * spread over the CTA's threads; tokens at or past `end` read as zeros. One commit group. */
template <typename T, int D, int NTOK>
__device__ __forceinline__ void load_kv_tile(T (*Ks)[D + 8], T (*Vs)[D + 8], const T *kv, const int32_t *bt, int L, int H,
                                             int layer, int kh, int first, int end) {
    constexpr int CH = D / 8; /* 16-byte chunks per row */
    for (int idx = threadIdx.x; idx < NTOK * CH; idx += blockDim.x) {
        const int tl = idx / CH, c = idx % CH, tok = first + tl;
        const bool ok = tok < end;
        const int32_t blk = ok ? bt[tok / KVM_KV_BLOCK] : 0;
        const T *kp = ok ? kv + kvm_kv_index_dev(L, H, D, blk, layer, 0, kh, tok % KVM_KV_BLOCK) + c * 8 : kv;
        const T *vp = ok ? kv + kvm_kv_index_dev(L, H, D, blk, layer, 1, kh, tok % KVM_KV_BLOCK) + c * 8 : kv;
        cp_async16(&Ks[tl][c * 8], kp, ok);
        cp_async16(&Vs[tl][c * 8], vp, ok);
    }
    cp_async_commit();
}

/* The copies of load_kv_tile for 64 tokens from a multiple of 16, by 128 threads, with less arithmetic
 * (opts.mma_load): a thread's chunk c = tid % CH is fixed and its tokens tl0 + RS i (tl0 = tid / CH < 16) fall in
 * the tile's cache block RS i / 16 at slot tl0 + RS i % 16 (no carry), so four block bases per tile and one add per
 * copy replace a block-table lookup and two index computations per copy. The same bytes land in the same places. */
template <typename T, int D>
__device__ __forceinline__ void load_kv_tile64(T (*Ks)[D + 8], T (*Vs)[D + 8], const T *kv, const int32_t *bt, int L, int H,
                                               int layer, int kh, int first, int end) {
    static_assert(KVM_KV_BLOCK == 16, "load_kv_tile64 assumes 16-token cache blocks");
    constexpr int CH = D / 8, RS = 128 / CH, ITER = 64 * CH / 128;
    const int tid = threadIdx.x, c = tid % CH, tl0 = tid / CH;
    const size_t vo = (size_t)H * KVM_KV_BLOCK * D; /* V follows K in a block */
    const T *base[4];
#pragma unroll
    for (int b = 0; b < 4; b++) {
        const bool ok = first + b * 16 < end;
        base[b] = ok ? kv + kvm_kv_index_dev(L, H, D, bt[first / KVM_KV_BLOCK + b], layer, 0, kh, tl0) + c * 8 : kv;
    }
#pragma unroll
    for (int i = 0; i < ITER; i++) {
        const int tl = tl0 + RS * i;
        const bool ok = first + tl < end;
        const T *kp = ok ? base[(RS * i) >> 4] + (size_t)((RS * i) & 15) * D : kv;
        cp_async16(&Ks[tl][c * 8], kp, ok);
        cp_async16(&Vs[tl][c * 8], ok ? kp + vo : kv, ok);
    }
    cp_async_commit();
}

/* One online-softmax step of the two rows a thread of an m16n8k16 fragment holds (a: row g, b: row g + 8), in log2
 * units: the tile's maxima mx_a / mx_b (this thread's columns) reduced over the quad, the running maxima m_a / m_b
 * moved to them, l and the NO output fragments o rescaled; base_a / base_b: what the tile's scores subtract before
 * exp2 (0 for a row with no valid score yet, so that nothing becomes NaN). */
template <int NO>
__device__ __forceinline__ void online_step(float mx_a, float mx_b, float &m_a, float &m_b, float &l_a, float &l_b,
                                            float (*o)[4], float &base_a, float &base_b) {
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
    base_a = mx_a == -INFINITY ? 0.0f : mx_a;
    base_b = mx_b == -INFINITY ? 0.0f : mx_b;
    const float corr_a = exp2f(m_a - base_a), corr_b = exp2f(m_b - base_b);
    m_a = mx_a;
    m_b = mx_b;
    l_a *= corr_a;
    l_b *= corr_b;
#pragma unroll
    for (int i = 0; i < NO; i++) {
        o[i][0] *= corr_a;
        o[i][1] *= corr_a;
        o[i][2] *= corr_b;
        o[i][3] *= corr_b;
    }
}

/* Per warp of a k_attn_wg / k_attn_mma CTA: its 16 query rows (a: row g, b: row g + 8 of the m16n8k16 fragments),
 * their positions, and the online softmax state. */
struct attn_rows {
    int pos_a, pos_b, wmin; /* positions of rows a, b and of the warp's first row */
    float m_a, m_b, l_a, l_b;
};

/* Mask (causal, context end) and the online-softmax step of one 64-key tile j of scores sc (the m16n8k16 C
 * fragments of the warp's rows: sc[nt] = keys 8 nt .. 8 nt + 7) in log2 units; o rescaled; P as A fragments. */
template <typename T, int D>
__device__ __forceinline__ void attn_softmax(const float (*scin)[4], float (*o)[4], uint32_t (*pa)[4], attn_rows &w, int j,
                                             int ctx, float scale_log2) {
    const int t4 = threadIdx.x & 3;
    float sc[8][4]; /* the masked scores (the accumulator itself is left as the MMA wrote it) */
#pragma unroll
    for (int nt = 0; nt < 8; nt++) sc[nt][0] = scin[nt][0], sc[nt][1] = scin[nt][1], sc[nt][2] = scin[nt][2], sc[nt][3] = scin[nt][3];
    float ra = -INFINITY, rb = -INFINITY;
    if ((j + 1) * 64 - 1 <= w.wmin && (j + 1) * 64 <= ctx) { /* below the diagonal of every row, inside the context */
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            ra = fmaxf(ra, fmaxf(sc[nt][0], sc[nt][1]));
            rb = fmaxf(rb, fmaxf(sc[nt][2], sc[nt][3]));
        }
    } else {
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            const int tok = j * 64 + nt * 8 + 2 * t4;
            sc[nt][0] = tok <= w.pos_a && tok < ctx ? sc[nt][0] : -INFINITY;
            sc[nt][1] = tok + 1 <= w.pos_a && tok + 1 < ctx ? sc[nt][1] : -INFINITY;
            sc[nt][2] = tok <= w.pos_b && tok < ctx ? sc[nt][2] : -INFINITY;
            sc[nt][3] = tok + 1 <= w.pos_b && tok + 1 < ctx ? sc[nt][3] : -INFINITY;
            ra = fmaxf(ra, fmaxf(sc[nt][0], sc[nt][1]));
            rb = fmaxf(rb, fmaxf(sc[nt][2], sc[nt][3]));
        }
    }
    const float mx_a = fmaxf(w.m_a, ra * scale_log2), mx_b = fmaxf(w.m_b, rb * scale_log2);
    float base_a, base_b;
    online_step<D / 8>(mx_a, mx_b, w.m_a, w.m_b, w.l_a, w.l_b, o, base_a, base_b);
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
        const float p0 = exp2f(fmaf(sc[nt][0], scale_log2, -base_a));
        const float p1 = exp2f(fmaf(sc[nt][1], scale_log2, -base_a));
        const float p2 = exp2f(fmaf(sc[nt][2], scale_log2, -base_b));
        const float p3 = exp2f(fmaf(sc[nt][3], scale_log2, -base_b));
        w.l_a += p0 + p1;
        w.l_b += p2 + p3;
        pa[nt / 2][(nt & 1) * 2 + 0] = mma_t<T>::pack(p0, p1);
        pa[nt / 2][(nt & 1) * 2 + 1] = mma_t<T>::pack(p2, p3);
    }
}

/* The normalised output rows qr_a, qr_b (those below nrows) of head h: fp32, and the 16-bit copy when asked. */
template <int D>
__device__ __forceinline__ void attn_store_rows(float *out, __nv_bfloat16 *outb, __half *outf, const float (*o)[4], float l_a,
                                                float l_b, int r0, int qr_a, int qr_b, int nrows, int heads, int h) {
    const int t4 = threadIdx.x & 3;
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    const float ia = 1.0f / l_a, ib = 1.0f / l_b;
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
        const int d = i * 8 + 2 * t4;
        const size_t ea = ((size_t)(r0 + qr_a) * heads + h) * D + d, eb = ((size_t)(r0 + qr_b) * heads + h) * D + d;
        if (qr_a < nrows) {
            *reinterpret_cast<float2 *>(out + ea) = make_float2(o[i][0] * ia, o[i][1] * ia);
            if (outb) *reinterpret_cast<__nv_bfloat162 *>(outb + ea) = __floats2bfloat162_rn(o[i][0] * ia, o[i][1] * ia);
            if (outf) *reinterpret_cast<__half2 *>(outf + ea) = __floats2half2_rn(o[i][0] * ia, o[i][1] * ia);
        }
        if (qr_b < nrows) {
            *reinterpret_cast<float2 *>(out + eb) = make_float2(o[i][2] * ib, o[i][3] * ib);
            if (outb) *reinterpret_cast<__nv_bfloat162 *>(outb + eb) = __floats2bfloat162_rn(o[i][2] * ib, o[i][3] * ib);
            if (outf) *reinterpret_cast<__half2 *>(outf + eb) = __floats2half2_rn(o[i][2] * ib, o[i][3] * ib);
        }
    }
}

/* Shared memory of k_attn_mma: two stages of K and V tiles (the next tile loads while this one computes). */
template <typename T, int D> constexpr size_t mma_smem_bytes() { return (size_t)2 * 2 * MMA_K * (D + 8) * sizeof(T); }

template <typename T, int D, int MINB, bool FAST>
__global__ void __launch_bounds__(128, MINB)
    k_attn_mma(float *__restrict__ out, const float *__restrict__ q, const T *__restrict__ kv, int L, int H, int layer,
               int heads, int group, const int32_t *__restrict__ row_start, const int32_t *__restrict__ ctx_len,
               const int32_t *__restrict__ block_table, int max_blocks, float scale_log2, __nv_bfloat16 *__restrict__ outb,
               __half *__restrict__ outf, const int32_t *__restrict__ qpos) {
    constexpr int DP = D + 8; /* padded row (bank-conflict free fragment loads) */
    kvm_pdl_trigger();
    extern __shared__ __align__(16) unsigned char mma_smem[];
    T(*Ksb)[MMA_K][DP] = reinterpret_cast<T(*)[MMA_K][DP]>(mma_smem);
    T(*Vsb)[MMA_K][DP] = reinterpret_cast<T(*)[MMA_K][DP]>(mma_smem + (size_t)2 * MMA_K * DP * sizeof(T));
    const int s = blockIdx.z, h = blockIdx.x, kh = h / group;
    const int r0 = row_start[s], nrows = row_start[s + 1] - r0;
    /* the longest (last) query tiles of every head start first: the tile index is the slower grid dimension, so
     * the CTAs are issued longest-first across all heads (list scheduling; the causal work per tile varies 1..n) */
    const int qt0 = (gridDim.y - 1 - blockIdx.y) * MMA_Q;
    if (qt0 >= nrows) return;
    const int ctx = ctx_len[s];
    const int first_pos = ctx - nrows;
    const int32_t *bt = block_table + (size_t)s * max_blocks;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;

    /* this warp's 16 query rows as A fragments (rows past the sequence read as 0) */
    const int qr_a = qt0 + warp * 16 + g, qr_b = qr_a + 8;
    uint32_t qa[D / 16][4];
    {
        const float *qa_p = q + ((size_t)(r0 + qr_a) * heads + h) * D;
        const float *qb_p = q + ((size_t)(r0 + qr_b) * heads + h) * D;
        const bool va = qr_a < nrows, vb = qr_b < nrows;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const int c = kk * 16 + 2 * t4;
            float2 x0 = va ? *reinterpret_cast<const float2 *>(qa_p + c) : make_float2(0.f, 0.f);
            float2 x1 = vb ? *reinterpret_cast<const float2 *>(qb_p + c) : make_float2(0.f, 0.f);
            float2 x2 = va ? *reinterpret_cast<const float2 *>(qa_p + c + 8) : make_float2(0.f, 0.f);
            float2 x3 = vb ? *reinterpret_cast<const float2 *>(qb_p + c + 8) : make_float2(0.f, 0.f);
            qa[kk][0] = mma_t<T>::pack(x0.x, x0.y);
            qa[kk][1] = mma_t<T>::pack(x1.x, x1.y);
            qa[kk][2] = mma_t<T>::pack(x2.x, x2.y);
            qa[kk][3] = mma_t<T>::pack(x3.x, x3.y);
        }
    }
    /* positions: the sequence's last rows (first_pos + row), or given per row (increasing; rows past the
     * sequence take the last row's, their output is not stored) */
    auto row_pos = [&](int qr) { return qpos ? qpos[r0 + min(qr, nrows - 1)] : first_pos + qr; };
    const int wmax = row_pos(qt0 + warp * 16 + 15); /* the last position of this warp's rows */
    /* rows a and b, and the first position (positions increase with the row) */
    attn_rows w = {row_pos(qr_a), row_pos(qr_b), row_pos(qt0 + warp * 16), -INFINITY, -INFINITY, 0.0f, 0.0f};
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

    const int last_pos = row_pos(min(qt0 + MMA_Q, nrows) - 1);
    const int n_tiles = last_pos / MMA_K + 1;
    auto load_tile = [&](int j, int stage) {
        if constexpr (FAST) load_kv_tile64<T, D>(Ksb[stage], Vsb[stage], kv, bt, L, H, layer, kh, j * MMA_K, ctx);
        else load_kv_tile<T, D, MMA_K>(Ksb[stage], Vsb[stage], kv, bt, L, H, layer, kh, j * MMA_K, ctx);
    };
    load_tile(0, 0);
    for (int j = 0; j < n_tiles; j++) {
        if (j + 1 < n_tiles) {
            load_tile(j + 1, (j + 1) & 1);
            cp_async_wait<1>(); /* tile j has landed, j+1 may still be in flight */
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        T(*Ks)[DP] = Ksb[j & 1];
        T(*Vs)[DP] = Vsb[j & 1];
        /* S = Q K^T for 16 rows x 64 keys; key groups past this warp's last row (the causal diagonal) are
         * skipped: the mask below makes them -inf, and their P is 0 in O += P V */
        float sc[MMA_K / 8][4];
#pragma unroll
        for (int nt = 0; nt < MMA_K / 8; nt++) {
            sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
            if (j * MMA_K + nt * 8 > wmax) continue;
            /* B fragments of two k-steps per ldmatrix: rows nt*8.., columns kk*16 + 8i (i = lane / 8) */
#pragma unroll
            for (int kk = 0; kk < D / 16; kk += 2) {
                uint32_t b[4];
                ldmatrix_x4(b, &Ks[nt * 8 + (lane & 7)][kk * 16 + (lane >> 3) * 8]);
                mma_t<T>::mma(sc[nt], qa[kk], b[0], b[1]);
                mma_t<T>::mma(sc[nt], qa[kk + 1], b[2], b[3]);
            }
        }
        /* mask and the online softmax, in log2 units: the scores stay unscaled (the scale is one FMA with the
         * subtraction; fl(max(s) c) = max(fl(s c)) for c > 0), and a tile that lies wholly below the diagonal of
         * every row of the warp and inside the context is not masked */
        uint32_t pa[MMA_K / 16][4];
        attn_softmax<T, D>(sc, o, pa, w, j, ctx, scale_log2);
        /* O += P V */
#pragma unroll
        for (int kj = 0; kj < MMA_K / 16; kj++) {
            if (j * MMA_K + kj * 16 > wmax) continue;
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, &Vs[kj * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)][dp * 16 + (lane >> 4) * 8]);
                mma_t<T>::mma(o[2 * dp], pa[kj], b[0], b[1]);
                mma_t<T>::mma(o[2 * dp + 1], pa[kj], b[2], b[3]);
            }
        }
        __syncthreads(); /* this stage is reloaded two tiles later */
    }
    attn_store_rows<D>(out, outb, outf, o, w.l_a, w.l_b, r0, qr_a, qr_b, nrows, heads, h);
}

/* ==== wgmma prefill kernel (Hopper, sm_90a; opts.attn_wg) ==================================================== */

/* The same work as k_attn_mma (a CTA takes 64 query rows of one head and walks 64-key tiles below their diagonal),
 * with both products as warpgroup MMAs: S = Q K^T by wgmma m64n64k16 with Q and K in shared memory, O += P V by
 * wgmma m64nDk16 with P from registers and V in shared memory. One wgmma does the work of 32 mma.sync and needs no
 * ldmatrix, which is what bounds k_attn_mma (instruction issue, not the tensor cores: docs/cuda.md "Limits").
 *
 * Shared-memory tiles ([64 rows][D] of 16-bit values) are laid out as wgmma's canonical no-swizzle "core
 * matrices": 8 rows x 16 bytes, 128 contiguous bytes; the 16-byte chunk c of row r sits at byte
 * 16 * ((r / 8) * D + 8 c + r % 8). Row groups of 8 are 16 D bytes apart, chunks 128 bytes apart. The same
 * layout serves K (K-major B: rows are keys, the reduction runs along D) and V (MN-major B, transposed by the
 * instruction: the reduction runs along the rows). A thread's 16-byte copy number f goes to byte 16 f, so a
 * warp's copies fill 512 contiguous bytes (no bank conflicts) and read 64 contiguous bytes of each of 8 keys. */
template <typename T> struct wg_t;
/* The wgmma wrappers of one 16-bit type TY (SUF its PTX name). */
#define KVM_WG_OPS(TY, SUF)                                                                                           \
template <> struct wg_t<TY> {                                                                                         \
    /* d (m64n64, fp32) = (acc ? d : 0) + A B^T: A (64 x 16) and B (64 x 16) K-major in shared memory */              \
    static __device__ __forceinline__ void ss_n64(float *d, uint64_t da, uint64_t db, int acc) {                      \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                     \
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32." SUF "." SUF " {"                                   \
                     "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                         \
                     "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"                                \
                     "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                                               \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),            \
                       "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),        \
                       "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),     \
                       "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),     \
                       "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                             \
                     : "l"(da), "l"(db), "r"(acc));                                                                   \
    }                                                                                                                 \
    /* d (m64n64, fp32) += A B: A (64 x 16) in registers (the m16n8k16 A fragments of the warp's 16 rows), B          \
     * (16 x 64) MN-major in shared memory */                                                                         \
    static __device__ __forceinline__ void rs_n64_mn(float *d, const uint32_t *a, uint64_t db) {                      \
        asm volatile("{\n.reg .pred p;\nsetp.eq.u32 p, 1, 1;\n"                                                       \
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32." SUF "." SUF " {"                                   \
                     "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                         \
                     "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"                                \
                     "}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"                                                    \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),            \
                       "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),        \
                       "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),     \
                       "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),     \
                       "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                             \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));                                          \
    }                                                                                                                 \
    /* d (m64n128, fp32) += A B: A (64 x 16) in registers (the m16n8k16 A fragments of the warp's 16 rows), B         \
     * (16 x 128) MN-major in shared memory */                                                                        \
    static __device__ __forceinline__ void rs_n128_mn(float *d, const uint32_t *a, uint64_t db) {                     \
        asm volatile("{\n.reg .pred p;\nsetp.eq.u32 p, 1, 1;\n"                                                       \
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32." SUF "." SUF " {"                                  \
                     "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                         \
                     "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"                               \
                     "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"                               \
                     "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"                                \
                     "}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"                                                    \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),            \
                       "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),        \
                       "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),     \
                       "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),     \
                       "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),     \
                       "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),     \
                       "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),     \
                       "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),     \
                       "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),     \
                       "+f"(d[63])                                                                                    \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));                                          \
    }                                                                                                                 \
};
KVM_WG_OPS(__nv_bfloat16, "bf16")
KVM_WG_OPS(__half, "f16")
#undef KVM_WG_OPS


__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
/* After a wait: the N accumulator registers at d count as written here, so that no read of them is scheduled
 * before the wait (the compiler sees the wgmma's outputs as ready when it is issued) */
template <int N> __device__ __forceinline__ void wg_hold(float *d) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}
/* A shared-memory matrix descriptor, no swizzle: start address, leading- and stride-dimension byte offsets. */
__device__ __forceinline__ uint64_t wg_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo, int sw = 0) {
    return (uint64_t)((saddr & 0x3FFFFu) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) |
           ((uint64_t)sw << 62);
}
/* Byte offset of the 16-byte chunk c of row r in a [64][D] tile. SW 0: wgmma's no-swizzle core matrices (8 rows x 16
 * bytes, 128 contiguous bytes; 8-row groups 16 D bytes apart, chunks 128 apart). SW 1: the 128-byte swizzle (layout
 * type 1): column blocks of 64 values (8 KiB: 64 rows of 128 bytes), chunk c % 8 of row r at position
 * (c % 8) ^ (r % 8) of its 128 bytes, so the 8 rows of a core matrix fall in different banks. */
template <int D, int SW> __device__ __forceinline__ uint32_t wg_chunk(int r, int c) {
    if constexpr (SW == 0) return 16u * (uint32_t)((r >> 3) * D + c * 8 + (r & 7));
    else return (uint32_t)((c >> 3) * 8192 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}
/* The descriptor of the K-major operand (Q, K) of k-step kk (16 values along D) in the tile at tile. No swizzle:
 * 16-byte chunks along D 128 bytes apart (leading offset), 8-row groups 16 D apart (stride); as measured on the H100,
 * the other reading fails every case. Swizzled: 8-row groups 1024 bytes apart (the leading offset is unused),
 * k-steps 32 bytes into the 128-byte rows of a column block. */
template <int D, int SW> __device__ __forceinline__ uint64_t wg_desc_k(uint32_t tile, int kk) {
    if constexpr (SW == 0) return wg_desc(tile + kk * 256, 128, 16 * D);
    else return wg_desc(tile + (kk >> 2) * 8192 + (kk & 3) * 32, 16, 1024, 1);
}
/* The descriptor of the MN-major operand V of k-step kj (16 keys: two 8-row groups). No swizzle: key groups 16 D
 * bytes apart (leading), 16-byte chunks along D 128 apart (stride); measured on the H100 (the other reading reads
 * past the tile). Swizzled: column blocks of 64 values 8 KiB apart (leading), key groups 1024 bytes apart (stride),
 * or, swap (attn_wg 8, not yet run on a GPU), the other way round. */
template <int D, int SW> __device__ __forceinline__ uint64_t wg_desc_v(uint32_t tile, int kj, bool swap) {
    if constexpr (SW == 0) return wg_desc(tile + kj * 32 * D, 16 * D, 128);
    else return swap ? wg_desc(tile + kj * 2048, 1024, 8192, 1) : wg_desc(tile + kj * 2048, 8192, 1024, 1);
}
/* Bytes of one [64][D] 16-bit tile. */
template <int D> __host__ __device__ constexpr size_t wg_tile_bytes() { return (size_t)64 * D * 2; }
/* Shared memory of k_attn_wg: Q, then KS stages of K and VS of V. */
template <int D, int KS, int VS> constexpr size_t wg_smem_bytes() { return (1 + KS + VS) * wg_tile_bytes<D>(); }

/* Q (64 rows of head h from row qt0 of the sequence's rows r0.., rounded to 16 bits; rows past nrows as 0) into the
 * tile at smem: copy f is row (f / D) 8 + f % 8, chunk f / 8 % (D / 8). */
template <typename T, int D, int SW>
__device__ __forceinline__ void wg_load_q(unsigned char *smem, const float *q, int r0, int qt0, int nrows, int heads, int h) {
    for (int f = threadIdx.x; f < 8 * D; f += 128) {
        const int r = (f / D) * 8 + (f & 7), c = (f >> 3) % (D / 8);
        uint4 v = make_uint4(0, 0, 0, 0);
        if (qt0 + r < nrows) {
            const float4 *p = reinterpret_cast<const float4 *>(q + ((size_t)(r0 + qt0 + r) * heads + h) * D + c * 8);
            const float4 x0 = p[0], x1 = p[1];
            v = make_uint4(mma_t<T>::pack(x0.x, x0.y), mma_t<T>::pack(x0.z, x0.w), mma_t<T>::pack(x1.x, x1.y),
                           mma_t<T>::pack(x1.z, x1.w));
        }
        *reinterpret_cast<uint4 *>(smem + wg_chunk<D, SW>(r, c)) = v;
    }
}

/* The K or V tiles of one KV head through the block table. Copy i of a thread is number f = tid + 128 i: row
 * rb + RS i (rb = (tid / D) 8 + tid % 8 < 16), chunk tid / 8 % (D / 8); so its cache block (4 per tile) and its
 * offset in the block are known at compile time but for rb: four block bases per tile, then one add per copy. */
template <typename T, int D, int SW> struct wg_loader {
    static_assert(KVM_KV_BLOCK == 16, "k_attn_wg's copies assume 16-token cache blocks");
    static constexpr int RS = 8 * 128 / D, ITER = 8 * D / 128;
    const T *kv;
    const int32_t *bt;
    int L, H, layer, kh, ctx, rb, c;
    size_t toff;
    __device__ __forceinline__ wg_loader(const T *kv_, const int32_t *bt_, int L_, int H_, int layer_, int kh_, int ctx_)
        : kv(kv_), bt(bt_), L(L_), H(H_), layer(layer_), kh(kh_), ctx(ctx_) {
        const int tid = threadIdx.x;
        rb = (tid / D) * 8 + (tid & 7);
        c = (tid >> 3) % (D / 8);
        toff = (size_t)rb * D + c * 8;
    }
    /* K (kvi 0) or V (kvi 1) of tile j (tokens 64 j ..; past the context as zeros) into the tile at dst; no commit */
    __device__ __forceinline__ void load(int j, int kvi, unsigned char *dst) const {
        const T *base[4];
#pragma unroll
        for (int b = 0; b < 4; b++) {
            const bool ok = j * 64 + b * 16 < ctx;
            base[b] = ok ? kv + kvm_kv_index_dev(L, H, D, bt[j * 4 + b], layer, kvi, kh, 0) + toff : kv;
        }
#pragma unroll
        for (int i = 0; i < ITER; i++) {
            const bool ok = j * 64 + rb + RS * i < ctx;
            const T *p = ok ? base[(RS * i) >> 4] + (size_t)((RS * i) & 15) * D : kv;
            cp_async16(dst + wg_chunk<D, SW>(rb + RS * i, c), p, ok);
        }
    }
};

/* Every thread's copies so far have landed (cp.async.wait_group before): visible to the tensor cores' async proxy,
 * then to the whole CTA. */
__device__ __forceinline__ void wg_landed() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
}

/* KS / VS: stages of K and V; SW: the tiles' layout (wg_chunk); vswap: V's swizzled descriptor read the other way.
 *  - KS 2, VS 2 (80 KiB at D = 128, 2 CTAs per SM): tile j + 1's K and V load while tile j computes.
 *  - KS 2, VS 1 (64 KiB, 3 CTAs per SM): V j + 1 loads once P V j is done, while S j + 1 and its softmax run.
 *  - KS 3, VS 3 (112 KiB, 2 CTAs per SM): tiles load two ahead, and S = Q K^T of tile j + 1 is issued before the
 *    softmax of tile j, which runs while the tensor cores compute it (FlashAttention-3's overlap within a
 *    warpgroup; two score accumulators). */
template <typename T, int D, int KS, int VS, int SW>
__global__ void __launch_bounds__(128, VS == 1 ? 3 : 2)
    k_attn_wg(float *__restrict__ out, const float *__restrict__ q, const T *__restrict__ kv, int L, int H, int layer,
              int heads, int group, const int32_t *__restrict__ row_start, const int32_t *__restrict__ ctx_len,
              const int32_t *__restrict__ block_table, int max_blocks, float scale_log2, __nv_bfloat16 *__restrict__ outb,
              __half *__restrict__ outf, const int32_t *__restrict__ qpos, bool vswap) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    static_assert((KS == 2 && (VS == 1 || VS == 2)) || (KS == 3 && VS == 3), "k_attn_wg: stages 2/2, 2/1 or 3/3");
    constexpr bool PIPE = KS == 3;
    constexpr uint32_t TILE = (uint32_t)wg_tile_bytes<D>();
    kvm_pdl_trigger();
    extern __shared__ __align__(1024) unsigned char wg_smem[]; /* the swizzle's atoms: 1024-byte aligned tiles */
    const uint32_t sbase = (uint32_t)__cvta_generic_to_shared(wg_smem);
    const int s = blockIdx.z, h = blockIdx.x, kh = h / group;
    const int r0 = row_start[s], nrows = row_start[s + 1] - r0;
    const int qt0 = (gridDim.y - 1 - blockIdx.y) * 64; /* longest tiles first, as k_attn_mma */
    if (qt0 >= nrows) return;
    const int ctx = ctx_len[s];
    const int first_pos = ctx - nrows;
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
    wg_load_q<T, D, SW>(wg_smem, q, r0, qt0, nrows, heads, h);
    const wg_loader<T, D, SW> ld(kv, block_table + (size_t)s * max_blocks, L, H, layer, kh, ctx);
    const int qr_a = qt0 + warp * 16 + g, qr_b = qr_a + 8;
    auto row_pos = [&](int qr) { return qpos ? qpos[r0 + min(qr, nrows - 1)] : first_pos + qr; };
    attn_rows w = {row_pos(qr_a), row_pos(qr_b), row_pos(qt0 + warp * 16), -INFINITY, -INFINITY, 0.0f, 0.0f};
    const int n_tiles = row_pos(min(qt0 + 64, nrows) - 1) / 64 + 1;
    auto k_at = [&](int j) { return (1 + j % KS) * TILE; };
    auto v_at = [&](int j) { return (1 + KS + j % VS) * TILE; };
    /* S = Q K^T of tile j into sc (64 x 64), k-steps of 16 along D */
    auto issue_s = [&](float (*sc)[4], int j) {
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
            wg_t<T>::ss_n64(&sc[0][0], wg_desc_k<D, SW>(sbase, kk), wg_desc_k<D, SW>(sbase + k_at(j), kk), kk);
        wg_commit();
    };
    /* O += P V of tile j, k-steps of 16 keys */
    auto issue_pv = [&](float (*o)[4], uint32_t (*pa)[4], int j) {
        wg_fence();
#pragma unroll
        for (int kj = 0; kj < 4; kj++) {
            const uint64_t dv = wg_desc_v<D, SW>(sbase + v_at(j), kj, vswap);
            if constexpr (D == 128) wg_t<T>::rs_n128_mn(&o[0][0], pa[kj], dv);
            else wg_t<T>::rs_n64_mn(&o[0][0], pa[kj], dv);
        }
        wg_commit();
    };

    float o[D / 8][4], sc[8][4];
    uint32_t pa[4][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.0f;
    if constexpr (!PIPE) {
        /* commit groups, in order: VS 2: (K V)0, (K V)1, ...; VS 1: K0, V0, K1, V1, ... with K j + 1 issued at the
         * top of step j and V j + 1 at its end */
        ld.load(0, 0, wg_smem + k_at(0));
        if (VS == 2) ld.load(0, 1, wg_smem + v_at(0));
        cp_async_commit();
        if (VS == 1) {
            ld.load(0, 1, wg_smem + v_at(0));
            cp_async_commit();
        }
        for (int j = 0; j < n_tiles; j++) {
            const bool more = j + 1 < n_tiles;
            if (more) {
                ld.load(j + 1, 0, wg_smem + k_at(j + 1));
                if (VS == 2) ld.load(j + 1, 1, wg_smem + v_at(j + 1));
                cp_async_commit();
            }
            /* K j (and V j with VS 2) landed: after it come V j (VS 1) and the group just issued */
            if (VS == 1) {
                if (more) cp_async_wait<2>();
                else cp_async_wait<1>();
            } else {
                if (more) cp_async_wait<1>();
                else cp_async_wait<0>();
            }
            wg_landed();
            issue_s(sc, j);
            wg_wait0();
            wg_hold<32>(&sc[0][0]);
            attn_softmax<T, D>(sc, o, pa, w, j, ctx, scale_log2);
            if (VS == 1) { /* V j landed: after it comes at most K j + 1 */
                if (more) cp_async_wait<1>();
                else cp_async_wait<0>();
                wg_landed();
            }
            issue_pv(o, pa, j);
            wg_wait0();
            wg_hold<D / 2>(&o[0][0]);
            __syncthreads(); /* K's stage is reloaded two tiles later, V's (VS 1) now */
            if (VS == 1 && more) {
                ld.load(j + 1, 1, wg_smem + v_at(j + 1));
                cp_async_commit();
            }
        }
    } else {
        /* commit groups (K V)0, (K V)1, ...: tile j + 2 is issued at the top of step j, into the stage tile j - 1 left */
        float sc2[8][4];
#pragma unroll
        for (int i = 0; i < 8; i++) sc2[i][0] = sc2[i][1] = sc2[i][2] = sc2[i][3] = 0.0f;
        for (int t = 0; t < 2 && t < n_tiles; t++) {
            ld.load(t, 0, wg_smem + k_at(t));
            ld.load(t, 1, wg_smem + v_at(t));
            cp_async_commit();
        }
        if (n_tiles > 1) cp_async_wait<1>();
        else cp_async_wait<0>();
        wg_landed();
        issue_s(sc, 0);
        wg_wait0();
        wg_hold<32>(&sc[0][0]);
        /* step j: tile j's scores are in cur; S of tile j + 1 goes to nxt while tile j's softmax runs */
        auto step = [&](float (*cur)[4], float (*nxt)[4], int j) {
            const bool more = j + 1 < n_tiles;
            if (j + 2 < n_tiles) {
                ld.load(j + 2, 0, wg_smem + k_at(j + 2));
                ld.load(j + 2, 1, wg_smem + v_at(j + 2));
                cp_async_commit();
                cp_async_wait<1>(); /* tile j + 1 landed; j + 2 may be in flight */
            } else {
                cp_async_wait<0>();
            }
            wg_landed();
            if (more) issue_s(nxt, j + 1);
            attn_softmax<T, D>(cur, o, pa, w, j, ctx, scale_log2);
            /* S j + 1 done before P V j is issued: the softmax rescaled O, an accumulator of P V, and ptxas
             * serializes every wgmma when one's accumulators change while another is in flight */
            wg_wait0();
            if (more) wg_hold<32>(&nxt[0][0]);
            issue_pv(o, pa, j);
            wg_wait0();
            wg_hold<D / 2>(&o[0][0]);
            __syncthreads(); /* tile j's stage is reloaded at the top of step j + 1 */
        };
        for (int j = 0; j < n_tiles; j += 2) {
            step(sc, sc2, j);
            if (j + 1 < n_tiles) step(sc2, sc, j + 1);
        }
    }
    attn_store_rows<D>(out, outb, outf, o, w.l_a, w.l_b, r0, qr_a, qr_b, nrows, heads, h);
#else
    (void)out, (void)q, (void)kv, (void)L, (void)H, (void)layer, (void)heads, (void)group, (void)row_start, (void)ctx_len;
    (void)block_table, (void)max_blocks, (void)scale_log2, (void)outb, (void)outf, (void)qpos, (void)vswap;
    __trap(); /* the host launches it only where sm_90a code was built (kvm_cuda_attn_wg_available) */
#endif
}

/* ==== tensor-core decode kernel ================================================================================= */

#define DM_TOK 64 /* tokens per shared-memory tile (4 cache blocks): 16 per warp */
#define DM_GM 16  /* query heads per CTA: the 16 rows of the mma (the KV head's group, or a chunk of it) */

/* a and b as a pair of 16-bit values (hi) and the pair of what rounding left (lo): hi + lo carries ~16 mantissa
 * bits (bf16) or ~22 (f16), so products through the tensor cores keep close to fp32 accuracy */
template <typename T> __device__ __forceinline__ void split_pack(float a, float b, uint32_t &hi, uint32_t &lo) {
    hi = mma_t<T>::pack(a, b);
    const T *h = reinterpret_cast<const T *>(&hi);
    lo = mma_t<T>::pack(a - kvm_to_f32<T>(h[0]), b - kvm_to_f32<T>(h[1]));
}

/* Shared memory of k_attn_dec: two stages of K and V tiles. */
template <typename T, int D> constexpr size_t dec_smem_bytes() { return (size_t)2 * 2 * DM_TOK * (D + 8) * sizeof(T); }

/* CTA = (query row r, KV head kh, chunk hc of its query heads, context split), as k_attn_split, on the tensor
 * cores: the group's query heads are the 16 rows of mma.sync m16n8k16 (rows past the group are zero). The CTA
 * streams its chunk through shared memory in 64-token tiles with cp.async, the next tile loading while this
 * one computes; warp w takes tokens 16w .. 16w + 15 of each tile: S = Q K^T, an online softmax of its own
 * (exp2, log2 units), O += P V. Q and P go to the tensor cores as hi + lo pairs of 16-bit values (two mma
 * each), so the scores and the output keep near-fp32 accuracy like the CUDA-core kernels. The 4 warps merge
 * in shared memory at the end and write the output, or the chunk's partial (m in natural-log units, l,
 * acc) for k_attn_merge. */
template <typename T, int D>
__global__ void __launch_bounds__(128)
    k_attn_dec(float *__restrict__ out, float *__restrict__ partial, const float *__restrict__ q, const T *__restrict__ kv,
               int L, int H, int layer, int heads, int group, int hchunks, const int32_t *__restrict__ row_start,
               const int32_t *__restrict__ ctx_len, const int32_t *__restrict__ block_table, int n_seqs, int max_blocks,
               float scale_log2, int n_splits, int chunk, const int32_t *__restrict__ qpos) {
    constexpr int DP = D + 8;
    kvm_pdl_trigger();
    extern __shared__ __align__(16) unsigned char dec_smem[];
    T(*Ksb)[DM_TOK][DP] = reinterpret_cast<T(*)[DM_TOK][DP]>(dec_smem);
    T(*Vsb)[DM_TOK][DP] = reinterpret_cast<T(*)[DM_TOK][DP]>(dec_smem + (size_t)2 * DM_TOK * DP * sizeof(T));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const split_cta_t cta =
        split_cta_of(DM_GM, H, group, hchunks, row_start, ctx_len, block_table, n_seqs, max_blocks, chunk, qpos);
    const int split = cta.split, kh = cta.kh, r = cta.r, h0 = cta.h0, G = cta.G, t0 = cta.t0, t1 = cta.t1;
    const int32_t *bt = cta.bt;

    /* the group's query heads as A fragments, hi and lo (heads past G read as 0) */
    uint32_t qh[D / 16][4], ql[D / 16][4];
    {
        const bool va = g < G, vb = g + 8 < G;
        const float *qa_p = q + ((size_t)r * heads + h0 + (va ? g : 0)) * D;
        const float *qb_p = q + ((size_t)r * heads + h0 + (vb ? g + 8 : 0)) * D;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const int c = kk * 16 + 2 * t4;
            const float2 x0 = va ? *reinterpret_cast<const float2 *>(qa_p + c) : make_float2(0.f, 0.f);
            const float2 x1 = vb ? *reinterpret_cast<const float2 *>(qb_p + c) : make_float2(0.f, 0.f);
            const float2 x2 = va ? *reinterpret_cast<const float2 *>(qa_p + c + 8) : make_float2(0.f, 0.f);
            const float2 x3 = vb ? *reinterpret_cast<const float2 *>(qb_p + c + 8) : make_float2(0.f, 0.f);
            split_pack<T>(x0.x, x0.y, qh[kk][0], ql[kk][0]);
            split_pack<T>(x1.x, x1.y, qh[kk][1], ql[kk][1]);
            split_pack<T>(x2.x, x2.y, qh[kk][2], ql[kk][2]);
            split_pack<T>(x3.x, x3.y, qh[kk][3], ql[kk][3]);
        }
    }
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;

    const int n_tiles = t1 > t0 ? (t1 - t0 + DM_TOK - 1) / DM_TOK : 0;
    auto load_tile = [&](int j, int stage) {
        load_kv_tile<T, D, DM_TOK>(Ksb[stage], Vsb[stage], kv, bt, L, H, layer, kh, t0 + j * DM_TOK, t1);
    };
    if (n_tiles > 0) load_tile(0, 0);
    for (int j = 0; j < n_tiles; j++) {
        if (j + 1 < n_tiles) {
            load_tile(j + 1, (j + 1) & 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const int tw = t0 + j * DM_TOK + warp * 16; /* this warp's first token */
        if (tw < t1) {
            T(*Ks)[DP] = Ksb[j & 1];
            T(*Vs)[DP] = Vsb[j & 1];
            float sc[2][4];
#pragma unroll
            for (int nt = 0; nt < 2; nt++) {
                sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) {
                    const int kr = warp * 16 + nt * 8 + g;
                    const uint32_t b0 = *reinterpret_cast<const uint32_t *>(&Ks[kr][kk * 16 + 2 * t4]);
                    const uint32_t b1 = *reinterpret_cast<const uint32_t *>(&Ks[kr][kk * 16 + 8 + 2 * t4]);
                    mma_t<T>::mma(sc[nt], qh[kk], b0, b1);
                    mma_t<T>::mma(sc[nt], ql[kk], b0, b1);
                }
            }
            float mx_a = m_a, mx_b = m_b;
#pragma unroll
            for (int nt = 0; nt < 2; nt++) {
                const int tok = tw + nt * 8 + 2 * t4;
                sc[nt][0] = tok < t1 ? sc[nt][0] * scale_log2 : -INFINITY;
                sc[nt][1] = tok + 1 < t1 ? sc[nt][1] * scale_log2 : -INFINITY;
                sc[nt][2] = tok < t1 ? sc[nt][2] * scale_log2 : -INFINITY;
                sc[nt][3] = tok + 1 < t1 ? sc[nt][3] * scale_log2 : -INFINITY;
                mx_a = fmaxf(mx_a, fmaxf(sc[nt][0], sc[nt][1]));
                mx_b = fmaxf(mx_b, fmaxf(sc[nt][2], sc[nt][3]));
            }
            float base_a, base_b;
            online_step<D / 8>(mx_a, mx_b, m_a, m_b, l_a, l_b, o, base_a, base_b);
            uint32_t ph[4], pl[4];
#pragma unroll
            for (int nt = 0; nt < 2; nt++) {
                const float p0 = exp2f(sc[nt][0] - base_a), p1 = exp2f(sc[nt][1] - base_a);
                const float p2 = exp2f(sc[nt][2] - base_b), p3 = exp2f(sc[nt][3] - base_b);
                l_a += p0 + p1;
                l_b += p2 + p3;
                split_pack<T>(p0, p1, ph[nt * 2 + 0], pl[nt * 2 + 0]);
                split_pack<T>(p2, p3, ph[nt * 2 + 1], pl[nt * 2 + 1]);
            }
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, &Vs[warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)][dp * 16 + (lane >> 4) * 8]);
                mma_t<T>::mma(o[2 * dp], ph, b[0], b[1]);
                mma_t<T>::mma(o[2 * dp], pl, b[0], b[1]);
                mma_t<T>::mma(o[2 * dp + 1], ph, b[2], b[3]);
                mma_t<T>::mma(o[2 * dp + 1], pl, b[2], b[3]);
            }
        }
        __syncthreads(); /* this stage is reloaded two tiles later (and, after the last, reused below) */
    }
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    /* the 4 warps' (m, l, O) through shared memory (the tiles' space: every warp is past its last tile) */
    float(*so)[DM_GM][D + 4] = reinterpret_cast<float(*)[DM_GM][D + 4]>(dec_smem);
    __shared__ float sm_m[4][DM_GM], sm_l[4][DM_GM];
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
        const int d = i * 8 + 2 * t4;
        *reinterpret_cast<float2 *>(&so[warp][g][d]) = make_float2(o[i][0], o[i][1]);
        *reinterpret_cast<float2 *>(&so[warp][g + 8][d]) = make_float2(o[i][2], o[i][3]);
    }
    if (t4 == 0) {
        sm_m[warp][g] = m_a;
        sm_m[warp][g + 8] = m_b;
        sm_l[warp][g] = l_a;
        sm_l[warp][g + 8] = l_b;
    }
    __syncthreads();
    const float LN2 = 0.6931471805599453f;
    for (int e = threadIdx.x; e < G * D; e += blockDim.x) {
        const int hh = e / D, d = e % D;
        const float M = fmaxf(fmaxf(sm_m[0][hh], sm_m[1][hh]), fmaxf(sm_m[2][hh], sm_m[3][hh]));
        float a = 0.0f, ls = 0.0f;
        if (M != -INFINITY) {
#pragma unroll
            for (int w = 0; w < 4; w++) {
                const float f = exp2f(sm_m[w][hh] - M); /* 0 for a warp that saw no token */
                a += so[w][hh][d] * f;
                ls += sm_l[w][hh] * f;
            }
        }
        store_split(out, partial, (size_t)r * heads + h0 + hh, D, d, n_splits, split, a, ls,
                    M == -INFINITY ? -INFINITY : M * LN2);
    }
}

/* ==== dispatch ================================================================================================== */

template <typename T>
static void launch_split(float *out, const float *q, const T *kv, const kvm_kv_geom_t *g, int layer, int heads,
                         const kvm_attn_batch_t *b, float scale) {
    const int D = g->head_dim, H = g->n_kv_heads, group = heads / H;
    /* the tensor-core kernel (16-bit cache, head_dim 64 or 128; opts.attn_dec_mma), else k_attn_split */
    const bool dec = sizeof(T) == 2 && (D == 64 || D == 128) && g_cuda.opts.attn_dec_mma && ((uintptr_t)q % 8) == 0;
    const int gmax = dec ? DM_GM : SPLIT_GMAX;
    const int hchunks = (group + gmax - 1) / gmax;
    const int ctas = b->total_rows * H * hchunks;
    const int max_ctx = b->max_blocks * KVM_KV_BLOCK;
    /* enough CTAs to fill the GPU (8 per SM), chunks of at least 64 tokens; depends only on the batch
     * shape and the block-table width, so a captured decode graph stays valid while contexts grow */
    int n_splits = (8 * g_cuda.prop.multiProcessorCount + ctas - 1) / ctas;
    const int max_by_len = (max_ctx + 63) / 64;
    if (n_splits > max_by_len) n_splits = max_by_len;
    if (n_splits < 1) n_splits = 1;
    int chunk = (max_ctx + n_splits - 1) / n_splits;
    const int gran = dec ? DM_TOK : SPLIT_TB * SPLIT_WARPS; /* the tensor-core kernel splits at whole tiles */
    chunk = (chunk + gran - 1) / gran * gran;
    n_splits = (max_ctx + chunk - 1) / chunk;
    float *partial = NULL;
    /* the merge also leaves the output rounded to 16 bits at the start of scratch for a skinny o projection; the
     * partials go after it */
    const kvm_dtype_t hdt = kvm_cuda_half_dtype();
    const size_t n_out = (size_t)b->total_rows * heads * D;
    const bool half_copy = n_splits > 1 && hdt != KVM_F32 && kvm_cuda_skinny_rounds(b->total_rows);
    const size_t poff = half_copy ? (n_out * 2 + 255) / 256 * 256 : 0;
    char *ws = NULL;
    if (n_splits > 1) {
        ws = (char *)kvm_cuda_scratch(poff + (size_t)b->total_rows * heads * n_splits * (D + 2) * sizeof(float));
        if (!ws) return;
        partial = (float *)(ws + poff);
    }
    dim3 grid((unsigned)ctas, (unsigned)n_splits);
    bool launched = false;
    if constexpr (sizeof(T) == 2) {
        if (dec) {
            static bool attr_set = false; /* per instantiation of this template (T) */
            if (!attr_set) {
                cudaFuncSetAttribute(k_attn_dec<T, 128>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     (int)dec_smem_bytes<T, 128>());
                cudaFuncSetAttribute(k_attn_dec<T, 64>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     (int)dec_smem_bytes<T, 64>());
                attr_set = true;
            }
            const float sl2 = scale * 1.4426950408889634f;
#define KVM_DEC(DD)                                                                                                     \
    k_attn_dec<T, DD><<<grid, 128, dec_smem_bytes<T, DD>(), S>>>(out, partial, q, kv, g->n_layers, H, layer, heads, group, \
                                                                 hchunks, b->row_start, b->ctx_len, b->block_table,      \
                                                                 b->n_seqs, b->max_blocks, sl2, n_splits, chunk, b->q_pos)
            if (D == 128) KVM_DEC(128);
            else KVM_DEC(64);
#undef KVM_DEC
            if (KVM_CU_LAUNCH("attention (tensor-core decode)")) return;
            launched = true;
        }
    }
#define KVM_SPLIT(DPL)                                                                                                  \
    k_attn_split<T, DPL><<<grid, SPLIT_WARPS * 32, 0, S>>>(out, partial, q, kv, g->n_layers, H, D, layer, heads, group,  \
                                                           hchunks, b->row_start, b->ctx_len, b->block_table, b->n_seqs, \
                                                           b->max_blocks, scale, n_splits, chunk, b->q_pos)
    if (!launched) {
        if (D <= 32) KVM_SPLIT(1);
        else if (D <= 64) KVM_SPLIT(2);
        else if (D <= 128) KVM_SPLIT(4);
        else KVM_SPLIT(8);
        if (KVM_CU_LAUNCH("attention (split)")) return;
    }
#undef KVM_SPLIT
    if (n_splits > 1) {
        const dim3 mg((unsigned)(b->total_rows * heads)), mb(D <= 128 ? 128 : 256);
        void *xh = half_copy ? ws : NULL;
        if (xh && hdt == KVM_BF16)
            k_attn_merge<__nv_bfloat16><<<mg, mb, 0, S>>>(out, partial, D, n_splits, (__nv_bfloat16 *)xh);
        else if (xh) k_attn_merge<__half><<<mg, mb, 0, S>>>(out, partial, D, n_splits, (__half *)xh);
        else k_attn_merge<__half><<<mg, mb, 0, S>>>(out, partial, D, n_splits, (__half *)NULL);
        if (KVM_CU_LAUNCH("attention (merge)")) return;
        if (xh) kvm_cuda_set_rounded(out, n_out, hdt);
    }
}

template <typename T>
static void launch_mma(float *out, const float *q, const T *kv, const kvm_kv_geom_t *g, int layer, int heads,
                       const kvm_attn_batch_t *b, float scale, int max_rows) {
    dim3 grid((unsigned)heads, (unsigned)((max_rows + MMA_Q - 1) / MMA_Q), (unsigned)b->n_seqs);
    const float sl2 = scale * 1.4426950408889634f;
    const int group = heads / g->n_kv_heads;
    /* the output, rounded to the weights' 16-bit dtype, is also left in scratch for the o projection */
    const kvm_dtype_t hdt = kvm_cuda_half_dtype();
    const size_t n_out = (size_t)b->total_rows * heads * g->head_dim;
    void *xh = hdt != KVM_F32 ? kvm_cuda_scratch(n_out * 2) : NULL;
    __nv_bfloat16 *outb = xh && hdt == KVM_BF16 ? (__nv_bfloat16 *)xh : NULL;
    __half *outf = xh && hdt == KVM_F16 ? (__half *)xh : NULL;
    /* opts.attn_wg: the warpgroup-MMA kernel (sm_90a; Q read as float4) */
    if (g_cuda.opts.attn_wg && kvm_cuda_attn_wg_available() && ((uintptr_t)q % 16) == 0) {
        static bool wg_attr = false; /* per instantiation of this template (T) */
        if (!wg_attr) {
#define KVM_WG_ATTR(DD, KS, VS, SW)                                                                                     \
    cudaFuncSetAttribute(k_attn_wg<T, DD, KS, VS, SW>, cudaFuncAttributeMaxDynamicSharedMemorySize,                   \
                         (int)wg_smem_bytes<DD, KS, VS>())
            KVM_WG_ATTR(128, 2, 1, 0), KVM_WG_ATTR(128, 2, 2, 0), KVM_WG_ATTR(128, 3, 3, 0), KVM_WG_ATTR(128, 2, 1, 1);
            KVM_WG_ATTR(64, 2, 1, 0), KVM_WG_ATTR(64, 2, 2, 0), KVM_WG_ATTR(64, 3, 3, 0), KVM_WG_ATTR(64, 2, 1, 1);
#undef KVM_WG_ATTR
            wg_attr = true;
        }
        /* attn_wg 1: no swizzle, two stages of K and V; 5: one stage of V; 6: three stages and S of the next tile during
         * the softmax; 7: the 128-byte swizzle with one stage of V; 8: 7 with V's descriptor offsets the other way */
        const int sw = g_cuda.opts.attn_wg;
        const bool vswap = sw == 8;
#define KVM_WG(DD, KS, VS, SW)                                                                                          \
    k_attn_wg<T, DD, KS, VS, SW><<<grid, 128, wg_smem_bytes<DD, KS, VS>(), S>>>(                                       \
        out, q, kv, g->n_layers, g->n_kv_heads, layer, heads, group, b->row_start, b->ctx_len, b->block_table,          \
        b->max_blocks, sl2, outb, outf, b->q_pos, vswap)
        if (g->head_dim == 128) {
            if (sw == 5) KVM_WG(128, 2, 1, 0);
            else if (sw == 6) KVM_WG(128, 3, 3, 0);
            else if (sw >= 7) KVM_WG(128, 2, 1, 1);
            else KVM_WG(128, 2, 2, 0);
        } else {
            if (sw == 5) KVM_WG(64, 2, 1, 0);
            else if (sw == 6) KVM_WG(64, 3, 3, 0);
            else if (sw >= 7) KVM_WG(64, 2, 1, 1);
            else KVM_WG(64, 2, 2, 0);
        }
#undef KVM_WG
        if (KVM_CU_LAUNCH("attention (wgmma)")) return;
        if (xh) kvm_cuda_set_rounded(out, n_out, hdt);
        return;
    }
    /* registers capped for 3 CTAs per SM (168, no spills) unless opts.mma_occ = 1 (199 registers, 2 CTAs) */
    const int occ = g_cuda.opts.mma_occ;
    static bool attr_set = false; /* per instantiation of this template (T) */
    if (!attr_set) {
#define KVM_MMA_ATTR(DD, OCC)                                                                                         \
    cudaFuncSetAttribute(k_attn_mma<T, DD, OCC, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,                  \
                         (int)mma_smem_bytes<T, DD>());                                                               \
    cudaFuncSetAttribute(k_attn_mma<T, DD, OCC, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,                   \
                         (int)mma_smem_bytes<T, DD>())
        KVM_MMA_ATTR(128, 1);
        KVM_MMA_ATTR(64, 1);
        KVM_MMA_ATTR(128, 3);
        KVM_MMA_ATTR(64, 3);
#undef KVM_MMA_ATTR
        attr_set = true;
    }
    /* opts.mma_load: the tiles copied from four block bases per tile (load_kv_tile64) */
    const bool fast = g_cuda.opts.mma_load;
#define KVM_MMA1(DD, OCC, F)                                                                                             \
    k_attn_mma<T, DD, OCC, F><<<grid, 128, mma_smem_bytes<T, DD>(), S>>>(out, q, kv, g->n_layers, g->n_kv_heads, layer,     \
                                                                         heads, group, b->row_start, b->ctx_len,         \
                                                                         b->block_table, b->max_blocks, sl2, outb, outf, \
                                                                         b->q_pos)
#define KVM_MMA(DD, OCC)                                                                                                 \
    do {                                                                                                                 \
        if (fast) KVM_MMA1(DD, OCC, true);                                                                               \
        else KVM_MMA1(DD, OCC, false);                                                                                   \
    } while (0)
    if (g->head_dim == 128) {
        if (occ == 3) KVM_MMA(128, 3);
        else KVM_MMA(128, 1);
    } else {
        if (occ == 3) KVM_MMA(64, 3);
        else KVM_MMA(64, 1);
    }
#undef KVM_MMA
#undef KVM_MMA1
    if (KVM_CU_LAUNCH("attention (mma)")) return;
    if (xh) kvm_cuda_set_rounded(out, n_out, hdt);
}

bool kvm_cuda_attn_wg_available(void) {
#if defined(KVM_CUDA_SM90A)
    if (!g_cuda.ready && !kvm_ops_cuda()) {
        kvm_errclear(); /* no GPU: the answer is no, not an error */
        return false;
    }
    return g_cuda.prop.major == 9 && g_cuda.prop.minor == 0;
#else
    return false;
#endif
}

/* Rows per sequence >= this use the tensor-core kernel (when the cache dtype and head_dim allow). */
#define KVM_MMA_MIN_ROWS 16

void kvm_cuda_attention(float *out, const float *q, const void *kv, const kvm_kv_geom_t *g, int layer, int heads,
                        const kvm_attn_batch_t *b, float scale) {
    kvm_cuda_touch();
    if (b->total_rows <= 0 || b->n_seqs <= 0) return;
    if (g->head_dim > 256 || heads % g->n_kv_heads) {
        kvm_cuda_fail(KVM_EUNSUPPORTED, "cuda attention: head_dim %d / heads %d over %d KV heads not supported", g->head_dim,
                      heads, g->n_kv_heads);
        return;
    }
    int max_rows = 0;
    if (b->h_row_start)
        for (int s = 0; s < b->n_seqs; s++) {
            int nr = b->h_row_start[s + 1] - b->h_row_start[s];
            if (nr > max_rows) max_rows = nr;
        }
    const bool mma_ok = g->dtype != KVM_F32 && (g->head_dim == 64 || g->head_dim == 128) && max_rows >= KVM_MMA_MIN_ROWS &&
                        ((uintptr_t)q % 8) == 0 && ((uintptr_t)out % 8) == 0 && !g_cuda.opts.no_mma_attn;
    KVM_PROF(mma_ok ? "attention mma (prefill)" : g->dtype == KVM_F32 ? "attention split (+merge)" : "attention decode (+merge)");
    if (mma_ok) {
        if (g->dtype == KVM_BF16) launch_mma<__nv_bfloat16>(out, q, (const __nv_bfloat16 *)kv, g, layer, heads, b, scale, max_rows);
        else launch_mma<__half>(out, q, (const __half *)kv, g, layer, heads, b, scale, max_rows);
        return;
    }
    if (g->dtype == KVM_F32) launch_split<float>(out, q, (const float *)kv, g, layer, heads, b, scale);
    else if (g->dtype == KVM_BF16) launch_split<__nv_bfloat16>(out, q, (const __nv_bfloat16 *)kv, g, layer, heads, b, scale);
    else launch_split<__half>(out, q, (const __half *)kv, g, layer, heads, b, scale);
}

/* ==== attention mass (kvm_ops_t.attn_mass) ==================================================================== */

/* The sequence and position of row r of the batch (device copies of its tables). */
__device__ __forceinline__ void mass_row(const int32_t *row_start, const int32_t *ctx_len, const int32_t *q_pos, int n_seqs,
                                         int r, int *s_out, int *pos_out) {
    int s = 0;
    while (s + 1 < n_seqs && row_start[s + 1] <= r) s++;
    *s_out = s;
    *pos_out = q_pos ? q_pos[r] : ctx_len[s] - (row_start[s + 1] - row_start[s]) + (r - row_start[s]);
}

struct mass_args {
    const float *q;
    const int32_t *row_start, *ctx_len, *q_pos, *bt;
    int n_seqs, max_blocks, total_rows, heads, G, L, H, D, layer, from_pos;
    float scale;
};

/* scale * q(r, h) . k(p) of row r's sequence s: one fixed order of fused multiply-adds (both kernels below) */
template <typename T>
__device__ __forceinline__ float mass_score(const mass_args &a, const T *kv, int s, int r, int h, int p) {
    const T *k = kv + kvm_kv_index_dev(a.L, a.H, a.D, a.bt[(size_t)s * a.max_blocks + p / KVM_KV_BLOCK], a.layer, 0, h / a.G,
                                       p % KVM_KV_BLOCK);
    const float *qv = a.q + ((size_t)r * a.heads + h) * a.D;
    float acc = 0.0f;
    for (int d = 0; d < a.D; d++) acc = fmaf(qv[d], kvm_to_f32<T>(k[d]), acc);
    return acc * a.scale;
}

/* (max, sum of exp(score - max)) of two parts */
__device__ __forceinline__ void mass_merge(float &m, float &l, float m2, float l2) {
    if (m2 == -INFINITY) return;
    if (m == -INFINITY) {
        m = m2, l = l2;
        return;
    }
    const float M = fmaxf(m, m2);
    l = l * expf(m - M) + l2 * expf(m2 - M);
    m = M;
}

/* One block per (row, head): the softmax's max and sum over the row's keys into ml[2 (r heads + h) ..] (rows before
 * from_pos: 0, 0). */
template <typename T> __global__ void k_mass_ml(float *__restrict__ ml, const T *__restrict__ kv, mass_args a) {
    const int r = blockIdx.x, h = blockIdx.y;
    int s, pos;
    mass_row(a.row_start, a.ctx_len, a.q_pos, a.n_seqs, r, &s, &pos);
    float m = -INFINITY, l = 0.0f;
    if (pos >= a.from_pos)
        for (int p = threadIdx.x; p <= pos; p += blockDim.x) mass_merge(m, l, mass_score<T>(a, kv, s, r, h, p), 1.0f);
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), l2 = __shfl_xor_sync(0xffffffffu, l, o);
        mass_merge(m, l, m2, l2);
    }
    __shared__ float sm[32], sl[32];
    const int w = threadIdx.x / 32, nw = blockDim.x / 32;
    if ((threadIdx.x & 31) == 0) sm[w] = m, sl[w] = l;
    __syncthreads();
    if (threadIdx.x == 0) {
        float M = -INFINITY, Lsum = 0.0f;
        for (int i = 0; i < nw; i++) mass_merge(M, Lsum, sm[i], sl[i]);
        ml[2 * ((size_t)r * a.heads + h)] = M == -INFINITY ? 0.0f : M;
        ml[2 * ((size_t)r * a.heads + h) + 1] = Lsum;
    }
}

/* One thread per key position p < n: the probabilities every counted row (in row order, then head order) gives p,
 * added to mass[p] (one writer per position: the same sums on every run). */
template <typename T>
__global__ void k_mass_add(float *__restrict__ mass, int n, const float *__restrict__ ml, const T *__restrict__ kv, mass_args a) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= n) return;
    float acc = 0.0f;
    for (int r = 0; r < a.total_rows; r++) {
        int s, pos;
        mass_row(a.row_start, a.ctx_len, a.q_pos, a.n_seqs, r, &s, &pos);
        if (pos < a.from_pos || p > pos) continue;
        for (int h = 0; h < a.heads; h++) {
            const float l = ml[2 * ((size_t)r * a.heads + h) + 1];
            if (l > 0.0f) acc += expf(mass_score<T>(a, kv, s, r, h, p) - ml[2 * ((size_t)r * a.heads + h)]) / l;
        }
    }
    mass[p] += acc;
}

void kvm_cuda_attn_mass(float *mass, int n, int from_pos, const float *q, const void *kv, const kvm_kv_geom_t *g, int layer,
                        int heads, const kvm_attn_batch_t *b, float scale) {
    KVM_OP("attention mass");
    if (b->total_rows <= 0 || b->n_seqs <= 0 || n <= 0) return;
    if (heads % g->n_kv_heads) {
        kvm_cuda_fail(KVM_EUNSUPPORTED, "cuda attention mass: %d heads over %d KV heads", heads, g->n_kv_heads);
        return;
    }
    float *ml = (float *)kvm_cuda_scratch((size_t)b->total_rows * heads * 2 * sizeof(float));
    if (!ml) return;
    const mass_args a = {q, b->row_start, b->ctx_len, b->q_pos, b->block_table, b->n_seqs, b->max_blocks, b->total_rows,
                         heads, heads / g->n_kv_heads, g->n_layers, g->n_kv_heads, g->head_dim, layer, from_pos, scale};
    const dim3 grid((unsigned)b->total_rows, (unsigned)heads);
    const unsigned nb = (unsigned)((n + 127) / 128);
    if (g->dtype == KVM_F32) {
        k_mass_ml<float><<<grid, 128, 0, S>>>(ml, (const float *)kv, a);
        k_mass_add<float><<<nb, 128, 0, S>>>(mass, n, ml, (const float *)kv, a);
    } else if (g->dtype == KVM_BF16) {
        k_mass_ml<__nv_bfloat16><<<grid, 128, 0, S>>>(ml, (const __nv_bfloat16 *)kv, a);
        k_mass_add<__nv_bfloat16><<<nb, 128, 0, S>>>(mass, n, ml, (const __nv_bfloat16 *)kv, a);
    } else {
        k_mass_ml<__half><<<grid, 128, 0, S>>>(ml, (const __half *)kv, a);
        k_mass_add<__half><<<nb, 128, 0, S>>>(mass, n, ml, (const __half *)kv, a);
    }
    KVM_CU_LAUNCH("attention mass");
}
