/* attn_cpu_x86.c - the per-block attention arithmetic of the AVX-512 and AVX2 paths (contracts in gemm_cpu.h,
 * the portable versions in attn_cpu.c), and SwiGLU's silu, which uses the same exp. The exp is Cephes' expf polynomial (relative error below 2e-7 on
 * [-87, 0]; inputs below -87.3 give about 1e-38 instead of 0, masked lanes are 0). */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "gemm_cpu.h"

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define T256 __attribute__((target("avx2,fma,f16c")))
#define INL __attribute__((always_inline)) inline
#define BLK KVM_KV_BLOCK

/* ---- AVX-512 ------------------------------------------------------------------------------------ */

static INL T512 __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.33f));
    __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, fx);
}

/* the 16 scores of one block for QN (1..4) queries (query qn at q + qn * d, its scores at s + qn * lds): 4 FMA
 * chains per query by i mod 4 (the tail of d in chain 0), summed (0 + 1) + (2 + 3); each row of kt is loaded once
 * for the QN queries */
static INL T512 void scores_qn(int QN, float *s, int lds, const float *q, int d, const float *k) {
    __m512 a[4][4];
    for (int n = 0; n < QN; n++)
        for (int u = 0; u < 4; u++) a[n][u] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 4 <= d; i += 4)
        for (int u = 0; u < 4; u++) {
            const __m512 kv = _mm512_loadu_ps(k + (size_t)(i + u) * BLK);
            for (int n = 0; n < QN; n++) a[n][u] = _mm512_fmadd_ps(_mm512_set1_ps(q[(size_t)n * d + i + u]), kv, a[n][u]);
        }
    for (; i < d; i++) {
        const __m512 kv = _mm512_loadu_ps(k + (size_t)i * BLK);
        for (int n = 0; n < QN; n++) a[n][0] = _mm512_fmadd_ps(_mm512_set1_ps(q[(size_t)n * d + i]), kv, a[n][0]);
    }
    for (int n = 0; n < QN; n++)
        _mm512_storeu_ps(s + (size_t)n * lds, _mm512_add_ps(_mm512_add_ps(a[n][0], a[n][1]), _mm512_add_ps(a[n][2], a[n][3])));
}

T512 void kvm_cpu_scores_avx512(float *s, int lds, const float *q, int nq, const float *kt, int nblk, int d) {
    for (int b = 0; b < nblk; b++) {
        const float *k = kt + (size_t)b * d * BLK;
        for (int n0 = 0; n0 < nq; n0 += 4) {
            float *sb = s + (size_t)n0 * lds + (size_t)b * BLK;
            const float *qn = q + (size_t)n0 * d;
            switch (nq - n0 >= 4 ? 4 : nq - n0) {
            case 1: scores_qn(1, sb, lds, qn, d, k); break;
            case 2: scores_qn(2, sb, lds, qn, d, k); break;
            case 3: scores_qn(3, sb, lds, qn, d, k); break;
            default: scores_qn(4, sb, lds, qn, d, k); break;
            }
        }
    }
}

static INL T512 __mmask16 mask_of(int n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

T512 float kvm_cpu_softmax_avx512(float *s, int nv, float *m, float *l) {
    __m512 mx = _mm512_set1_ps(*m);
    for (int i = 0; i < nv; i += 16) mx = _mm512_mask_max_ps(mx, mask_of(nv - i), mx, _mm512_loadu_ps(s + i));
    const float mn = _mm512_reduce_max_ps(mx);
    const float corr = *m == -INFINITY ? 0.0f : expf(*m - mn);
    const __m512 vm = _mm512_set1_ps(mn);
    __m512 sum0 = _mm512_setzero_ps(), sum1 = sum0;
    int i = 0;
    for (; i + 32 <= nv; i += 32) {
        __m512 p0 = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i), vm));
        __m512 p1 = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i + 16), vm));
        _mm512_storeu_ps(s + i, p0);
        _mm512_storeu_ps(s + i + 16, p1);
        sum0 = _mm512_add_ps(sum0, p0);
        sum1 = _mm512_add_ps(sum1, p1);
    }
    for (; i < nv; i += 16) {
        const __mmask16 k = mask_of(nv - i);
        __m512 p = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), vm)));
        _mm512_mask_storeu_ps(s + i, k, p);
        sum0 = _mm512_add_ps(sum0, p);
    }
    *l = *l * corr + _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
    *m = mn;
    return corr;
}

/* QN (1..3) queries x NC (1..2) chunks of 16 lanes of acc from lane i0, the last one masked by mt (query n: acc
 * at acc + n * d, probabilities at p + n * lds, correction corr[n]); keys block by block, 4 at a time into 4 sets
 * of accumulators (independent FMA chains, the tail of a block in set 0), summed (0 + 1) + (2 + 3); each value
 * vector is loaded once for the QN queries. A lane's arithmetic depends on nothing but its query and keys. */
static INL T512 void pv512_q(int QN, int NC, float *acc, const float *p, int lds, int nv, const float *const *v, int d,
                             int i0, __mmask16 mt, const float *corr) {
    __m512 a[3][4][2];
    for (int n = 0; n < QN; n++)
        for (int c = 0; c < NC; c++) {
            a[n][0][c] = _mm512_mul_ps(_mm512_maskz_loadu_ps(c == NC - 1 ? mt : 0xFFFF, acc + (size_t)n * d + i0 + 16 * c),
                                       _mm512_set1_ps(corr[n]));
            a[n][1][c] = a[n][2][c] = a[n][3][c] = _mm512_setzero_ps();
        }
    for (int j0 = 0; j0 < nv; j0 += BLK) {
        const float *vb = v[j0 / BLK] + i0, *pb = p + j0;
        const int nk = nv - j0 < BLK ? nv - j0 : BLK;
        int j = 0;
        for (; j + 4 <= nk; j += 4)
            for (int u = 0; u < 4; u++)
                for (int c = 0; c < NC; c++) {
                    const __m512 vv = _mm512_maskz_loadu_ps(c == NC - 1 ? mt : 0xFFFF, vb + (size_t)(j + u) * d + 16 * c);
                    for (int n = 0; n < QN; n++)
                        a[n][u][c] = _mm512_fmadd_ps(_mm512_set1_ps(pb[(size_t)n * lds + j + u]), vv, a[n][u][c]);
                }
        for (; j < nk; j++)
            for (int c = 0; c < NC; c++) {
                const __m512 vv = _mm512_maskz_loadu_ps(c == NC - 1 ? mt : 0xFFFF, vb + (size_t)j * d + 16 * c);
                for (int n = 0; n < QN; n++) a[n][0][c] = _mm512_fmadd_ps(_mm512_set1_ps(pb[(size_t)n * lds + j]), vv, a[n][0][c]);
            }
    }
    for (int n = 0; n < QN; n++)
        for (int c = 0; c < NC; c++)
            _mm512_mask_storeu_ps(acc + (size_t)n * d + i0 + 16 * c, c == NC - 1 ? mt : 0xFFFF,
                                  _mm512_add_ps(_mm512_add_ps(a[n][0][c], a[n][1][c]), _mm512_add_ps(a[n][2][c], a[n][3][c])));
}

T512 void kvm_cpu_pv_avx512(float *acc, const float *p, int lds, int nq, int nv, const float *const *v, int d,
                            const float *corr) {
    for (int i0 = 0; i0 < d; i0 += 32) {
        const int left = d - i0, nc = left > 16 ? 2 : 1;
        const __mmask16 mt = mask_of(left - 16 * (nc - 1));
        for (int n0 = 0; n0 < nq; n0 += 3) {
            float *an = acc + (size_t)n0 * d;
            const float *pn = p + (size_t)n0 * lds;
            const int qn = nq - n0 >= 3 ? 3 : nq - n0;
            switch (qn * 2 + nc - 1) {
            case 2: pv512_q(1, 1, an, pn, lds, nv, v, d, i0, mt, corr + n0); break;
            case 3: pv512_q(1, 2, an, pn, lds, nv, v, d, i0, mt, corr + n0); break;
            case 4: pv512_q(2, 1, an, pn, lds, nv, v, d, i0, mt, corr + n0); break;
            case 5: pv512_q(2, 2, an, pn, lds, nv, v, d, i0, mt, corr + n0); break;
            case 6: pv512_q(3, 1, an, pn, lds, nv, v, d, i0, mt, corr + n0); break;
            default: pv512_q(3, 2, an, pn, lds, nv, v, d, i0, mt, corr + n0); break;
            }
        }
    }
}

/* out[i] = gate[i] / (1 + exp(-gate[i])) * up[i] */
T512 void kvm_cpu_swiglu_avx512(float *out, const float *gate, const float *up, size_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 g = _mm512_maskz_loadu_ps(k, gate + i);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(k, up + i)));
    }
}

/* ---- AVX2 ------------------------------------------------------------------------------------------ */

static INL T256 __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.33f));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static T256 void scores1_avx2(float *s, const float *q, const float *kt, int nblk, int d) {
    for (int b = 0; b < nblk; b++) {
        const float *k = kt + (size_t)b * d * BLK;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
        int i = 0;
        for (; i + 2 <= d; i += 2) {
            __m256 q0 = _mm256_set1_ps(q[i]), q1 = _mm256_set1_ps(q[i + 1]);
            a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k + (size_t)i * BLK), a0);
            a1 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k + (size_t)i * BLK + 8), a1);
            b0 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(k + (size_t)(i + 1) * BLK), b0);
            b1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(k + (size_t)(i + 1) * BLK + 8), b1);
        }
        if (i < d) {
            __m256 q0 = _mm256_set1_ps(q[i]);
            a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k + (size_t)i * BLK), a0);
            a1 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k + (size_t)i * BLK + 8), a1);
        }
        _mm256_storeu_ps(s + (size_t)b * BLK, _mm256_add_ps(a0, b0));
        _mm256_storeu_ps(s + (size_t)b * BLK + 8, _mm256_add_ps(a1, b1));
    }
}

T256 float kvm_cpu_softmax_avx2(float *s, int nv, float *m, float *l) {
    const int nv8 = (nv + 7) & ~7;
    for (int i = nv; i < nv8; i++) s[i] = -INFINITY; /* the tail of the last vector (the buffer holds whole blocks) */
    __m256 mx = _mm256_set1_ps(*m);
    for (int i = 0; i < nv8; i += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + i));
    float t[8], mn = *m;
    _mm256_storeu_ps(t, mx);
    for (int i = 0; i < 8; i++) mn = t[i] > mn ? t[i] : mn;
    const float corr = *m == -INFINITY ? 0.0f : expf(*m - mn);
    const __m256 vm = _mm256_set1_ps(mn);
    __m256 sum = _mm256_setzero_ps();
    for (int i = 0; i < nv8; i += 8) {
        __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
        if (nv8 - i == 8 && nv < nv8) { /* zero the tail lanes */
            const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            p = _mm256_and_ps(p, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(nv - i), lane)));
        }
        _mm256_storeu_ps(s + i, p);
        sum = _mm256_add_ps(sum, p);
    }
    _mm256_storeu_ps(t, sum);
    float tot = 0;
    for (int i = 0; i < 8; i++) tot += t[i];
    *l = *l * corr + tot;
    *m = mn;
    return corr;
}

static T256 void pv1_avx2(float *acc, const float *p, int nv, const float *const *v, int d, float corr) {
    const __m256 cv = _mm256_set1_ps(corr);
    int i = 0;
    for (; i + 16 <= d; i += 16) {
        __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(acc + i), cv), a1 = _mm256_mul_ps(_mm256_loadu_ps(acc + i + 8), cv);
        __m256 b0 = _mm256_setzero_ps(), b1 = b0;
        int j = 0;
        for (; j + 2 <= nv; j += 2) {
            const float *v0 = v[j / BLK] + (size_t)(j % BLK) * d + i, *v1 = v0 + d;
            const __m256 p0 = _mm256_set1_ps(p[j]), p1 = _mm256_set1_ps(p[j + 1]);
            a0 = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0), a0);
            a1 = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0 + 8), a1);
            b0 = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v1), b0);
            b1 = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v1 + 8), b1);
        }
        if (j < nv) {
            const float *v0 = v[j / BLK] + (size_t)(j % BLK) * d + i;
            const __m256 p0 = _mm256_set1_ps(p[j]);
            a0 = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0), a0);
            a1 = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0 + 8), a1);
        }
        _mm256_storeu_ps(acc + i, _mm256_add_ps(a0, b0));
        _mm256_storeu_ps(acc + i + 8, _mm256_add_ps(a1, b1));
    }
    for (; i < d; i++) {
        float a = acc[i] * corr;
        for (int j = 0; j < nv; j++) a += p[j] * v[j / BLK][(size_t)(j % BLK) * d + i];
        acc[i] = a;
    }
}

T256 void kvm_cpu_swiglu_avx2(float *out, const float *gate, const float *up, size_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i); /* exp256 has no overflow check: exp(88) is near FLT_MAX */
        const __m256 e = exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(88.0f)));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    if (i < n) { /* the tail through a padded vector: the same arithmetic per element */
        float g8[8] = {0}, u8[8] = {0}, o8[8];
        memcpy(g8, gate + i, (n - i) * sizeof(float));
        memcpy(u8, up + i, (n - i) * sizeof(float));
        kvm_cpu_swiglu_avx2(o8, g8, u8, 8);
        memcpy(out + i, o8, (n - i) * sizeof(float));
    }
}

/* the multi-query forms: each query on its own */
T256 void kvm_cpu_scores_avx2(float *s, int lds, const float *q, int nq, const float *kt, int nblk, int d) {
    for (int n = 0; n < nq; n++) scores1_avx2(s + (size_t)n * lds, q + (size_t)n * d, kt, nblk, d);
}

T256 void kvm_cpu_pv_avx2(float *acc, const float *p, int lds, int nq, int nv, const float *const *v, int d,
                          const float *corr) {
    for (int n = 0; n < nq; n++) pv1_avx2(acc + (size_t)n * d, p + (size_t)n * lds, nv, v, d, corr[n]);
}

#endif
