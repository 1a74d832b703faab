/* gemm_cpu_x86.c - the matmul kernels of the AVX-512 and AVX2+FMA paths (contracts in gemm_cpu.h), and the
 * AVX-512 transposed load of a key block for attn_cpu.c.
 *
 * Every function here carries its own target attribute; nothing runs unless kvm_cpu_kern() found the
 * instructions (__builtin_cpu_supports), so the file builds without -march flags.
 *
 * One arithmetic per output whatever the batch (the engine relies on it: a row recomputed alone, or beside
 * other rows, gives the bits of the dense prefill): k along the SIMD lanes, lane l accumulating k = l, l + 16,
 * ... in order (one FMA chain per lane), then a fixed reduction tree of the lanes, then the bias. The weight
 * rows are read in their dtype and widened in registers (bf16: a shift into the high half; f16: F16C), with no
 * packing pass. Register tiles of 16 accumulators: R rows x T tokens with R * T = 16 (T = 4, 2 or 1), reduced
 * together by one transposed 16-way reduction; a tile with fewer rows repeats its last row. AVX2: 8 lanes, tiles
 * of 8 accumulators (R x T = 8) and an 8-way transposed reduction. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "cpu_common.h"
#include "gemm_cpu.h"

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define T256 __attribute__((target("avx2,fma,f16c")))
#define INL __attribute__((always_inline)) inline

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

/* 16 sums: lane i of the result = the sum of the lanes of a[i] */
static INL T512 __m512 reduce16(const __m512 a[16]) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++)
        d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

/* the first n (< 16) weights at w + i widened to fp32, the other lanes zero */
static INL T512 __m512 w16_512_tail(const void *w, kvm_dtype_t dt, size_t i, int n) {
    const __mmask16 k = (__mmask16)((1u << n) - 1);
    if (dt == KVM_F32) return _mm512_maskz_loadu_ps(k, (const float *)w + i);
    __m256i h = _mm256_maskz_loadu_epi16(k, (const uint16_t *)w + i);
    if (dt == KVM_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

/* nr (<= 16 / T) rows (r ..) x T tokens (T = 4, 2 or 1): 16 accumulators with k along the lanes, acc[t * R + i]
 * for token t and row i (rows past nr repeat the last one), one transposed reduction for the 16 outputs, which
 * then lie as T runs of R consecutive outputs (one store per token) */
static INL T512 void dot512_tile(int T, kvm_dtype_t dt, float *y, int ldy, const float *x, int ldx, const void *w,
                                 int cols, int r, int nr, const float *bias) {
    const int R = 16 / T;
    size_t wr[16];
    for (int i = 0; i < R; i++) wr[i] = (size_t)(r + (i < nr ? i : nr - 1)) * cols;
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= cols; k += 16) {
        __m512 xv[4];
        for (int t = 0; t < T; t++) xv[t] = _mm512_loadu_ps(x + (size_t)t * ldx + k);
        for (int i = 0; i < R; i++) {
            __m512 wv = w16_512(w, dt, wr[i] + k);
            for (int t = 0; t < T; t++) acc[t * R + i] = _mm512_fmadd_ps(wv, xv[t], acc[t * R + i]);
        }
    }
    if (k < cols) {
        const __mmask16 km = (__mmask16)((1u << (cols - k)) - 1);
        __m512 xv[4];
        for (int t = 0; t < T; t++) xv[t] = _mm512_maskz_loadu_ps(km, x + (size_t)t * ldx + k);
        for (int i = 0; i < R; i++) {
            __m512 wv = w16_512_tail(w, dt, wr[i] + k, cols - k);
            for (int t = 0; t < T; t++) acc[t * R + i] = _mm512_fmadd_ps(wv, xv[t], acc[t * R + i]);
        }
    }
    __m512 s = reduce16(acc);
    const __mmask16 kr = (__mmask16)((1u << nr) - 1); /* nr <= R <= 16 */
    if (T == 1) {
        if (bias) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(nr >= 16 ? 0xFFFF : kr, bias + r));
        _mm512_mask_storeu_ps(y + r, nr >= 16 ? 0xFFFF : kr, s);
    } else if (T == 2) {
        if (bias) s = _mm512_add_ps(s, _mm512_broadcast_f32x8(_mm256_maskz_loadu_ps((__mmask8)kr, bias + r)));
        _mm256_mask_storeu_ps(y + r, (__mmask8)kr, _mm512_castps512_ps256(s));
        _mm256_mask_storeu_ps(y + (size_t)ldy + r, (__mmask8)kr, _mm512_extractf32x8_ps(s, 1));
    } else {
        if (bias) s = _mm512_add_ps(s, _mm512_broadcast_f32x4(_mm_maskz_loadu_ps((__mmask8)kr, bias + r)));
        _mm_mask_storeu_ps(y + r, (__mmask8)kr, _mm512_castps512_ps128(s));
        _mm_mask_storeu_ps(y + (size_t)ldy + r, (__mmask8)kr, _mm512_extractf32x4_ps(s, 1));
        _mm_mask_storeu_ps(y + 2 * (size_t)ldy + r, (__mmask8)kr, _mm512_extractf32x4_ps(s, 2));
        _mm_mask_storeu_ps(y + 3 * (size_t)ldy + r, (__mmask8)kr, _mm512_extractf32x4_ps(s, 3));
    }
}

static INL T512 void dot512_dt(kvm_dtype_t dt, float *y, int ldy, const float *x, int ldx, const void *w, int cols, int r0,
                               int r1, int n, const float *bias) {
    for (int t0 = 0; t0 < n;) {
        const int T = n - t0 >= 4 ? 4 : n - t0 >= 2 ? 2 : 1, R = 16 / T;
        float *yt = y + (size_t)t0 * ldy;
        const float *xt = x + (size_t)t0 * ldx;
        for (int r = r0; r < r1; r += R) {
            const int nr = r1 - r < R ? r1 - r : R;
            switch (T) {
            case 1: dot512_tile(1, dt, yt, ldy, xt, ldx, w, cols, r, nr, bias); break;
            case 2: dot512_tile(2, dt, yt, ldy, xt, ldx, w, cols, r, nr, bias); break;
            default: dot512_tile(4, dt, yt, ldy, xt, ldx, w, cols, r, nr, bias); break;
            }
        }
        t0 += T;
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

/* dst[0..n) = src[0..n) (dtype dt) widened to fp32: exact, the bits of row_to_f32 */
static T512 void widen_avx512(float *dst, const void *src, kvm_dtype_t dt, size_t n) {
    size_t i = 0;
    if (dt == KVM_F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, w16_512(src, dt, i));
    if (i < n) _mm512_mask_storeu_ps(dst + i, (__mmask16)((1u << (n - i)) - 1), w16_512_tail(src, dt, i, (int)(n - i)));
}

/* kt[d][16] = the block's first nv keys (d a multiple of 16) transposed, 16 dimensions at a time */
static INL T512 void kt512_dt(kvm_dtype_t dt, float *kt, const void *k, int d, int nv) {
    for (int c = 0; c < d; c += 16) {
        __m512 r[16];
        for (int t = 0; t < 16; t++) r[t] = t < nv ? w16_512(k, dt, (size_t)t * d + c) : _mm512_setzero_ps();
        tr16x16(r);
        for (int i = 0; i < 16; i++) _mm512_storeu_ps(kt + (size_t)(c + i) * 16, r[i]);
    }
}

static T512 void load_kt_avx512(float *kt, const void *k, kvm_dtype_t dt, int d, int nv) {
    if (d % 16) { /* one gather of the nv keys per dimension (a 16-bit element is the low half of a 32-bit read,
                   * which stays inside the block: its values follow its keys) */
        const __mmask16 m = (__mmask16)(nv >= 16 ? 0xFFFF : (1u << nv) - 1);
        const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                _mm512_set1_epi32(d));
        for (int i = 0; i < d; i++) {
            const __m512i idx = _mm512_add_epi32(rows, _mm512_set1_epi32(i));
            __m512 v;
            if (dt == KVM_F32) {
                v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, k, 4);
            } else {
                __m512i h = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, k, 2);
                v = dt == KVM_BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(h, 16))
                                   : _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
            }
            _mm512_storeu_ps(kt + (size_t)i * 16, v);
        }
        return;
    }
    switch (dt * 2 + (nv >= 16)) { /* the dtype and a full block as constants: no branch per row */
    case KVM_F32 * 2: kt512_dt(KVM_F32, kt, k, d, nv); break;
    case KVM_F32 * 2 + 1: kt512_dt(KVM_F32, kt, k, d, 16); break;
    case KVM_BF16 * 2: kt512_dt(KVM_BF16, kt, k, d, nv); break;
    case KVM_BF16 * 2 + 1: kt512_dt(KVM_BF16, kt, k, d, 16); break;
    case KVM_F16 * 2: kt512_dt(KVM_F16, kt, k, d, nv); break;
    default: kt512_dt(KVM_F16, kt, k, d, 16); break;
    }
}

const cpu_kern_t kvm_cpu_kern_avx512 = {
    .name = "avx512",
    .dot = dot_avx512,
    .load_kt = load_kt_avx512,
    .widen = widen_avx512,
    .scores = kvm_cpu_scores_avx512,
    .softmax = kvm_cpu_softmax_avx512,
    .pv = kvm_cpu_pv_avx512,
    .swiglu = kvm_cpu_swiglu_avx512,
};

/* ---- AVX2 + FMA + F16C ---------------------------------------------------------------------------- */

static INL T256 __m256 w8_256(const void *w, kvm_dtype_t dt, size_t i) {
    if (dt == KVM_F32) return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    if (dt == KVM_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* 8 sums: lane i of the result = the sum of the lanes of a[i], one fixed tree for every input */
static INL T256 __m256 reduce8(const __m256 a[8]) {
    __m256 b[4], c[2];
    for (int i = 0; i < 4; i++)
        b[i] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        c[i] = _mm256_add_ps(_mm256_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm256_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    return _mm256_add_ps(_mm256_permute2f128_ps(c[0], c[1], 0x20), _mm256_permute2f128_ps(c[0], c[1], 0x31));
}

/* the first n (< 8) weights at w + i widened to fp32, the other lanes zero */
static INL T256 __m256 w8_256_tail(const void *w, kvm_dtype_t dt, size_t i, int n) {
    if (dt == KVM_F32) {
        float t[8] = {0};
        memcpy(t, (const float *)w + i, (size_t)n * sizeof(float));
        return _mm256_loadu_ps(t);
    }
    uint16_t h[8] = {0};
    memcpy(h, (const uint16_t *)w + i, (size_t)n * sizeof(uint16_t));
    return w8_256(h, dt, 0);
}

/* nr (<= 8 / T) rows (r ..) x T tokens (T = 4, 2 or 1): 8 accumulators with k along the lanes (rows past nr
 * repeat the last one), one transposed reduction for the 8 outputs */
static INL T256 void dot256_tile(int T, kvm_dtype_t dt, float *y, int ldy, const float *x, int ldx, const void *w,
                                 int cols, int r, int nr, const float *bias) {
    const int R = 8 / T;
    size_t wr[8];
    for (int i = 0; i < R; i++) wr[i] = (size_t)(r + (i < nr ? i : nr - 1)) * cols;
    __m256 acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= cols; k += 8) {
        __m256 xv[4];
        for (int t = 0; t < T; t++) xv[t] = _mm256_loadu_ps(x + (size_t)t * ldx + k);
        for (int i = 0; i < R; i++) {
            __m256 wv = w8_256(w, dt, wr[i] + k);
            for (int t = 0; t < T; t++) acc[i * T + t] = _mm256_fmadd_ps(wv, xv[t], acc[i * T + t]);
        }
    }
    if (k < cols) {
        __m256 xv[4];
        for (int t = 0; t < T; t++) xv[t] = w8_256_tail(x + (size_t)t * ldx, KVM_F32, (size_t)k, cols - k);
        for (int i = 0; i < R; i++) {
            __m256 wv = w8_256_tail(w, dt, wr[i] + k, cols - k);
            for (int t = 0; t < T; t++) acc[i * T + t] = _mm256_fmadd_ps(wv, xv[t], acc[i * T + t]);
        }
    }
    float o[8];
    _mm256_storeu_ps(o, reduce8(acc));
    for (int i = 0; i < nr; i++)
        for (int t = 0; t < T; t++) y[(size_t)t * ldy + r + i] = o[i * T + t] + (bias ? bias[r + i] : 0.0f);
}

static INL T256 void dot256_dt(kvm_dtype_t dt, float *y, int ldy, const float *x, int ldx, const void *w, int cols, int r0,
                               int r1, int n, const float *bias) {
    for (int t0 = 0; t0 < n;) {
        const int T = n - t0 >= 4 ? 4 : n - t0 >= 2 ? 2 : 1, R = 8 / T;
        float *yt = y + (size_t)t0 * ldy;
        const float *xt = x + (size_t)t0 * ldx;
        for (int r = r0; r < r1; r += R) {
            const int nr = r1 - r < R ? r1 - r : R;
            switch (T) {
            case 1: dot256_tile(1, dt, yt, ldy, xt, ldx, w, cols, r, nr, bias); break;
            case 2: dot256_tile(2, dt, yt, ldy, xt, ldx, w, cols, r, nr, bias); break;
            default: dot256_tile(4, dt, yt, ldy, xt, ldx, w, cols, r, nr, bias); break;
            }
        }
        t0 += T;
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

static T256 void widen_avx2(float *dst, const void *src, kvm_dtype_t dt, size_t n) {
    if (dt == KVM_F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, w8_256(src, dt, i));
    if (i < n) kvm_cpu_widen_portable(dst + i, (const uint16_t *)src + i, dt, n - i);
}

const cpu_kern_t kvm_cpu_kern_avx2 = {
    .name = "avx2",
    .dot = dot_avx2,
    .load_kt = kvm_cpu_load_kt_portable,
    .widen = widen_avx2,
    .scores = kvm_cpu_scores_avx2,
    .softmax = kvm_cpu_softmax_avx2,
    .pv = kvm_cpu_pv_avx2,
    .swiglu = kvm_cpu_swiglu_avx2,
};

#endif
