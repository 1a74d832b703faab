/* gemm_cpu_x86.c - the matmul kernels of the AVX-512 and AVX2+FMA paths (contracts in gemm_cpu.h).
 *
 * Every function here carries its own target attribute; nothing runs unless kvm_cpu_kern() found the
 * instructions (__builtin_cpu_supports), so the file builds without -march flags.
 *
 * GEMM (prefill, batched decode): the weights are packed per panel of nr rows into [kc][nr] fp32 (bf16 widened
 * by a shift into the high half, f16 by F16C; a 16x16 in-register transpose on AVX-512), then a register tile of
 * mr tokens x nr rows accumulates x[t][k] (broadcast) * panel[k][:] with one FMA chain per output.
 * AVX-512: nr 32 (two zmm), mr 12: 24 accumulators. AVX2: nr 16 (two ymm), mr 6: 12 accumulators.
 * Small n (dot): rows in blocks of 4 against up to 4 tokens at a time, k along the lanes, the weight rows
 * read in their dtype and widened in-register (no packing pass), one horizontal sum per output. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "cpu_common.h"
#include "gemm_cpu.h"

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define T256 __attribute__((target("avx2,fma,f16c")))
#define INL __attribute__((always_inline)) inline

/* attn_cpu_x86.c */
void kvm_cpu_scores_avx512(float *s, const float *q, const float *kt, int d);
void kvm_cpu_softmax_pv_avx512(float *acc, float *m, float *l, const float *s, int nv, const float *vb, int d);
void kvm_cpu_scores_avx2(float *s, const float *q, const float *kt, int d);
void kvm_cpu_softmax_pv_avx2(float *acc, float *m, float *l, const float *s, int nv, const float *vb, int d);
/* gemm_cpu.c: the scalar pack (AVX2 path) */
void kvm_cpu_pack_scalar(float *dst, int nr, const void *w, kvm_dtype_t dt, int cols, int r0, int nrows, int k0, int kc);

/* ---- AVX-512 ------------------------------------------------------------------------------------ */

/* 16 weights at w + i (element index) widened to fp32 */
static INL T512 __m512 w16_512(const void *w, kvm_dtype_t dt, size_t i) {
    if (dt == KVM_F32) return _mm512_loadu_ps((const float *)w + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    if (dt == KVM_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

/* r[i] = column i of the 16x16 block whose rows are r[0..16) */
static INL T512 void tr16x16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < 4; i++) {
            t[8 * h + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
            t[8 * h + 4 + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0xDD);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
    }
}

static INL T512 void pack512_dt(float *dst, const void *w, kvm_dtype_t dt, int cols, int r0, int nrows, int k0, int kc) {
    enum { NR = 32 };
    int k = 0;
    for (; k + 16 <= kc; k += 16)
        for (int half = 0; half < 2; half++) {
            __m512 r[16];
            for (int j = 0; j < 16; j++) {
                int row = half * 16 + j;
                r[j] = row < nrows ? w16_512(w, dt, (size_t)(r0 + row) * cols + k0 + k) : _mm512_setzero_ps();
            }
            tr16x16(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + (size_t)(k + i) * NR + half * 16, r[i]);
        }
    if (k < kc) kvm_cpu_pack_scalar(dst + (size_t)k * NR, NR, w, dt, cols, r0, nrows, k0 + k, kc - k);
}

static T512 void pack_avx512(float *dst, const void *w, kvm_dtype_t dt, int cols, int r0, int nrows, int k0, int kc) {
    switch (dt) {
    case KVM_F32: pack512_dt(dst, w, KVM_F32, cols, r0, nrows, k0, kc); break;
    case KVM_BF16: pack512_dt(dst, w, KVM_BF16, cols, r0, nrows, k0, kc); break;
    default: pack512_dt(dst, w, KVM_F16, cols, r0, nrows, k0, kc); break;
    }
}

static INL T512 void tile512_m(int M, float *y, int ldy, const float *x, int ldx, const float *pw, int kc, int nv,
                               const float *bias, int acc) {
    __m512 c0[12], c1[12];
    for (int i = 0; i < M; i++) c0[i] = c1[i] = _mm512_setzero_ps();
    for (int k = 0; k < kc; k++) {
        __m512 b0 = _mm512_loadu_ps(pw + (size_t)k * 32), b1 = _mm512_loadu_ps(pw + (size_t)k * 32 + 16);
        for (int i = 0; i < M; i++) {
            __m512 a = _mm512_set1_ps(x[(size_t)i * ldx + k]);
            c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
        }
    }
    __mmask16 m0 = nv >= 16 ? 0xFFFF : (__mmask16)((1u << nv) - 1);
    __mmask16 m1 = nv >= 32 ? 0xFFFF : nv <= 16 ? 0 : (__mmask16)((1u << (nv - 16)) - 1);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    if (!acc && bias) {
        a0 = _mm512_maskz_loadu_ps(m0, bias);
        a1 = _mm512_maskz_loadu_ps(m1, bias + 16);
    }
    for (int i = 0; i < M; i++) {
        float *yy = y + (size_t)i * ldy;
        if (acc) {
            a0 = _mm512_maskz_loadu_ps(m0, yy);
            a1 = _mm512_maskz_loadu_ps(m1, yy + 16);
        }
        _mm512_mask_storeu_ps(yy, m0, _mm512_add_ps(a0, c0[i]));
        _mm512_mask_storeu_ps(yy + 16, m1, _mm512_add_ps(a1, c1[i]));
    }
}

static T512 void tile_avx512(float *y, int ldy, const float *x, int ldx, const float *pw, int kc, int m, int nv,
                             const float *bias, int acc) {
    switch (m) {
#define CASE(M) case M: tile512_m(M, y, ldy, x, ldx, pw, kc, nv, bias, acc); break;
    CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11)
    default: tile512_m(12, y, ldy, x, ldx, pw, kc, nv, bias, acc); break;
#undef CASE
    }
}

/* R rows (r .. r + R) x T tokens, k along the lanes; the tail k of cols % 16 in scalar */
static INL T512 void dot512_rt(int R, int T, kvm_dtype_t dt, float *y, int ldy, const float *x, int ldx, const void *w,
                               int cols, int r, const float *bias) {
    __m512 acc[4][4];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++) acc[i][t] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= cols; k += 16) {
        __m512 wv[4];
        for (int i = 0; i < R; i++) wv[i] = w16_512(w, dt, (size_t)(r + i) * cols + k);
        for (int t = 0; t < T; t++) {
            __m512 xv = _mm512_loadu_ps(x + (size_t)t * ldx + k);
            for (int i = 0; i < R; i++) acc[i][t] = _mm512_fmadd_ps(wv[i], xv, acc[i][t]);
        }
    }
    for (int i = 0; i < R; i++) {
        float wt[16];
        int nt = cols - k;
        for (int j = 0; j < nt; j++) {
            size_t e = (size_t)(r + i) * cols + k + j;
            wt[j] = dt == KVM_F32 ? ((const float *)w)[e]
                    : dt == KVM_BF16 ? kvm_bf16_to_f32(((const uint16_t *)w)[e])
                                     : kvm_f16_to_f32(((const uint16_t *)w)[e]);
        }
        for (int t = 0; t < T; t++) {
            float s = _mm512_reduce_add_ps(acc[i][t]);
            for (int j = 0; j < nt; j++) s += x[(size_t)t * ldx + k + j] * wt[j];
            y[(size_t)t * ldy + r + i] = s + (bias ? bias[r + i] : 0.0f);
        }
    }
}

static INL T512 void dot512_dt(kvm_dtype_t dt, float *y, int ldy, const float *x, int ldx, const void *w, int cols, int r0,
                               int r1, int n, const float *bias) {
    for (int t0 = 0; t0 < n; t0 += 4) {
        int T = n - t0 < 4 ? n - t0 : 4;
        float *yt = y + (size_t)t0 * ldy;
        const float *xt = x + (size_t)t0 * ldx;
        int r = r0;
        for (; r + 4 <= r1; r += 4) {
            switch (T) {
            case 1: dot512_rt(4, 1, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            case 2: dot512_rt(4, 2, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            case 3: dot512_rt(4, 3, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            default: dot512_rt(4, 4, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            }
        }
        for (; r < r1; r++) {
            switch (T) {
            case 1: dot512_rt(1, 1, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            case 2: dot512_rt(1, 2, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            case 3: dot512_rt(1, 3, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            default: dot512_rt(1, 4, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            }
        }
    }
}

static T512 void dot_avx512(float *y, int ldy, const float *x, int ldx, const void *w, kvm_dtype_t dt, int cols, int r0,
                            int r1, int n, const float *bias) {
    switch (dt) {
    case KVM_F32: dot512_dt(KVM_F32, y, ldy, x, ldx, w, cols, r0, r1, n, bias); break;
    case KVM_BF16: dot512_dt(KVM_BF16, y, ldy, x, ldx, w, cols, r0, r1, n, bias); break;
    default: dot512_dt(KVM_F16, y, ldy, x, ldx, w, cols, r0, r1, n, bias); break;
    }
}

void kvm_cpu_load_kt_portable(float *kt, const void *k, kvm_dtype_t dt, int d, int nv);

static T512 void load_kt_avx512(float *kt, const void *k, kvm_dtype_t dt, int d, int nv) {
    if (d % 16) {
        kvm_cpu_load_kt_portable(kt, k, dt, d, nv);
        return;
    }
    for (int c = 0; c < d; c += 16) {
        __m512 r[16];
        for (int t = 0; t < 16; t++) r[t] = t < nv ? w16_512(k, dt, (size_t)t * d + c) : _mm512_setzero_ps();
        tr16x16(r);
        for (int i = 0; i < 16; i++) _mm512_storeu_ps(kt + (size_t)(c + i) * 16, r[i]);
    }
}

const cpu_kern_t kvm_cpu_kern_avx512 = {
    .name = "avx512",
    .nr = 32,
    .mr = 12,
    .kc_max = 256,
    .pack = pack_avx512,
    .tile = tile_avx512,
    .dot = dot_avx512,
    .softmax_pv = kvm_cpu_softmax_pv_avx512,
    .scores = kvm_cpu_scores_avx512,
    .load_kt = load_kt_avx512,
};

/* ---- AVX2 + FMA + F16C ---------------------------------------------------------------------------- */

static INL T256 __m256 w8_256(const void *w, kvm_dtype_t dt, size_t i) {
    if (dt == KVM_F32) return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    if (dt == KVM_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

static T256 void pack_avx2(float *dst, const void *w, kvm_dtype_t dt, int cols, int r0, int nrows, int k0, int kc) {
    kvm_cpu_pack_scalar(dst, 16, w, dt, cols, r0, nrows, k0, kc);
}

static INL T256 void tile256_m(int M, float *y, int ldy, const float *x, int ldx, const float *pw, int kc, int nv,
                               const float *bias, int acc) {
    __m256 c0[6], c1[6];
    for (int i = 0; i < M; i++) c0[i] = c1[i] = _mm256_setzero_ps();
    for (int k = 0; k < kc; k++) {
        __m256 b0 = _mm256_loadu_ps(pw + (size_t)k * 16), b1 = _mm256_loadu_ps(pw + (size_t)k * 16 + 8);
        for (int i = 0; i < M; i++) {
            __m256 a = _mm256_broadcast_ss(x + (size_t)i * ldx + k);
            c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
        }
    }
    float out[16];
    for (int i = 0; i < M; i++) {
        float *yy = y + (size_t)i * ldy;
        _mm256_storeu_ps(out, c0[i]);
        _mm256_storeu_ps(out + 8, c1[i]);
        for (int j = 0; j < nv; j++) yy[j] = (acc ? yy[j] : bias ? bias[j] : 0.0f) + out[j];
    }
}

static T256 void tile_avx2(float *y, int ldy, const float *x, int ldx, const float *pw, int kc, int m, int nv,
                           const float *bias, int acc) {
    switch (m) {
    case 1: tile256_m(1, y, ldy, x, ldx, pw, kc, nv, bias, acc); break;
    case 2: tile256_m(2, y, ldy, x, ldx, pw, kc, nv, bias, acc); break;
    case 3: tile256_m(3, y, ldy, x, ldx, pw, kc, nv, bias, acc); break;
    case 4: tile256_m(4, y, ldy, x, ldx, pw, kc, nv, bias, acc); break;
    case 5: tile256_m(5, y, ldy, x, ldx, pw, kc, nv, bias, acc); break;
    default: tile256_m(6, y, ldy, x, ldx, pw, kc, nv, bias, acc); break;
    }
}

static INL T256 float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static INL T256 void dot256_rt(int R, int T, kvm_dtype_t dt, float *y, int ldy, const float *x, int ldx, const void *w,
                               int cols, int r, const float *bias) {
    __m256 acc[4][4];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++) acc[i][t] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= cols; k += 8) {
        __m256 wv[4];
        for (int i = 0; i < R; i++) wv[i] = w8_256(w, dt, (size_t)(r + i) * cols + k);
        for (int t = 0; t < T; t++) {
            __m256 xv = _mm256_loadu_ps(x + (size_t)t * ldx + k);
            for (int i = 0; i < R; i++) acc[i][t] = _mm256_fmadd_ps(wv[i], xv, acc[i][t]);
        }
    }
    for (int i = 0; i < R; i++) {
        float wt[8];
        int nt = cols - k;
        for (int j = 0; j < nt; j++) {
            size_t e = (size_t)(r + i) * cols + k + j;
            wt[j] = dt == KVM_F32 ? ((const float *)w)[e]
                    : dt == KVM_BF16 ? kvm_bf16_to_f32(((const uint16_t *)w)[e])
                                     : kvm_f16_to_f32(((const uint16_t *)w)[e]);
        }
        for (int t = 0; t < T; t++) {
            float s = hsum256(acc[i][t]);
            for (int j = 0; j < nt; j++) s += x[(size_t)t * ldx + k + j] * wt[j];
            y[(size_t)t * ldy + r + i] = s + (bias ? bias[r + i] : 0.0f);
        }
    }
}

static INL T256 void dot256_dt(kvm_dtype_t dt, float *y, int ldy, const float *x, int ldx, const void *w, int cols, int r0,
                               int r1, int n, const float *bias) {
    for (int t0 = 0; t0 < n; t0 += 4) {
        int T = n - t0 < 4 ? n - t0 : 4;
        float *yt = y + (size_t)t0 * ldy;
        const float *xt = x + (size_t)t0 * ldx;
        int r = r0;
        for (; r + 4 <= r1; r += 4) {
            switch (T) {
            case 1: dot256_rt(4, 1, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            case 2: dot256_rt(4, 2, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            case 3: dot256_rt(4, 3, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            default: dot256_rt(4, 4, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            }
        }
        for (; r < r1; r++) {
            switch (T) {
            case 1: dot256_rt(1, 1, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            case 2: dot256_rt(1, 2, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            case 3: dot256_rt(1, 3, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            default: dot256_rt(1, 4, dt, yt, ldy, xt, ldx, w, cols, r, bias); break;
            }
        }
    }
}

static T256 void dot_avx2(float *y, int ldy, const float *x, int ldx, const void *w, kvm_dtype_t dt, int cols, int r0,
                          int r1, int n, const float *bias) {
    switch (dt) {
    case KVM_F32: dot256_dt(KVM_F32, y, ldy, x, ldx, w, cols, r0, r1, n, bias); break;
    case KVM_BF16: dot256_dt(KVM_BF16, y, ldy, x, ldx, w, cols, r0, r1, n, bias); break;
    default: dot256_dt(KVM_F16, y, ldy, x, ldx, w, cols, r0, r1, n, bias); break;
    }
}

const cpu_kern_t kvm_cpu_kern_avx2 = {
    .name = "avx2",
    .nr = 16,
    .mr = 6,
    .kc_max = 256,
    .pack = pack_avx2,
    .tile = tile_avx2,
    .dot = dot_avx2,
    .softmax_pv = kvm_cpu_softmax_pv_avx2,
    .scores = kvm_cpu_scores_avx2,
    .load_kt = kvm_cpu_load_kt_portable,
};

#endif
