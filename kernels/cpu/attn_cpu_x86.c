/* attn_cpu_x86.c - the per-block attention arithmetic of the AVX-512 and AVX2 paths (contracts in gemm_cpu.h,
 * the portable versions in attn_cpu.c). The exp is Cephes' expf polynomial (relative error below 2e-7 on
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

void kvm_cpu_scores_avx512(float *s, const float *q, const float *kt, int d);
void kvm_cpu_softmax_pv_avx512(float *acc, float *m, float *l, const float *s, int nv, const float *vb, int d);
void kvm_cpu_scores_avx2(float *s, const float *q, const float *kt, int d);
void kvm_cpu_softmax_pv_avx2(float *acc, float *m, float *l, const float *s, int nv, const float *vb, int d);

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

T512 void kvm_cpu_scores_avx512(float *s, const float *q, const float *kt, int d) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 4 <= d; i += 4) {
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(q[i]), _mm512_loadu_ps(kt + (size_t)i * BLK), a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(q[i + 1]), _mm512_loadu_ps(kt + (size_t)(i + 1) * BLK), a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(q[i + 2]), _mm512_loadu_ps(kt + (size_t)(i + 2) * BLK), a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(q[i + 3]), _mm512_loadu_ps(kt + (size_t)(i + 3) * BLK), a3);
    }
    for (; i < d; i++) a0 = _mm512_fmadd_ps(_mm512_set1_ps(q[i]), _mm512_loadu_ps(kt + (size_t)i * BLK), a0);
    _mm512_storeu_ps(s, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

T512 void kvm_cpu_softmax_pv_avx512(float *acc, float *m, float *l, const float *s, int nv, const float *vb, int d) {
    const __mmask16 mk = nv >= 16 ? 0xFFFF : (__mmask16)((1u << nv) - 1);
    __m512 sv = _mm512_maskz_loadu_ps(mk, s);
    float mb = _mm512_mask_reduce_max_ps(mk, sv);
    float corr = 1.0f;
    if (mb > *m) {
        corr = *m == -INFINITY ? 0.0f : _mm512_cvtss_f32(exp512(_mm512_set1_ps(*m - mb)));
        *l *= corr;
        *m = mb;
    }
    __m512 p = _mm512_maskz_mov_ps(mk, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(*m))));
    *l += _mm512_reduce_add_ps(p);
    float pj[16];
    _mm512_storeu_ps(pj, p);
    const __m512 cv = _mm512_set1_ps(corr);
    for (int i = 0; i < d; i += 16) {
        const __mmask16 md = d - i >= 16 ? 0xFFFF : (__mmask16)((1u << (d - i)) - 1);
        __m512 a0 = _mm512_mul_ps(_mm512_maskz_loadu_ps(md, acc + i), cv), a1 = _mm512_setzero_ps();
        int j = 0;
        for (; j + 2 <= nv; j += 2) {
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(pj[j]), _mm512_maskz_loadu_ps(md, vb + (size_t)j * d + i), a0);
            a1 = _mm512_fmadd_ps(_mm512_set1_ps(pj[j + 1]), _mm512_maskz_loadu_ps(md, vb + (size_t)(j + 1) * d + i), a1);
        }
        if (j < nv) a0 = _mm512_fmadd_ps(_mm512_set1_ps(pj[j]), _mm512_maskz_loadu_ps(md, vb + (size_t)j * d + i), a0);
        _mm512_mask_storeu_ps(acc + i, md, _mm512_add_ps(a0, a1));
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

T256 void kvm_cpu_scores_avx2(float *s, const float *q, const float *kt, int d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    int i = 0;
    for (; i + 2 <= d; i += 2) {
        __m256 q0 = _mm256_set1_ps(q[i]), q1 = _mm256_set1_ps(q[i + 1]);
        a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(kt + (size_t)i * BLK), a0);
        a1 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(kt + (size_t)i * BLK + 8), a1);
        b0 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(kt + (size_t)(i + 1) * BLK), b0);
        b1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(kt + (size_t)(i + 1) * BLK + 8), b1);
    }
    if (i < d) {
        __m256 q0 = _mm256_set1_ps(q[i]);
        a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(kt + (size_t)i * BLK), a0);
        a1 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(kt + (size_t)i * BLK + 8), a1);
    }
    _mm256_storeu_ps(s, _mm256_add_ps(a0, b0));
    _mm256_storeu_ps(s + 8, _mm256_add_ps(a1, b1));
}

T256 void kvm_cpu_softmax_pv_avx2(float *acc, float *m, float *l, const float *s, int nv, const float *vb, int d) {
    float mb = s[0];
    for (int j = 1; j < nv; j++) mb = s[j] > mb ? s[j] : mb;
    float corr = 1.0f;
    if (mb > *m) {
        corr = *m == -INFINITY ? 0.0f : _mm256_cvtss_f32(exp256(_mm256_set1_ps(*m - mb)));
        *l *= corr;
        *m = mb;
    }
    float pj[16];
    const __m256 mv = _mm256_set1_ps(*m);
    _mm256_storeu_ps(pj, exp256(_mm256_sub_ps(_mm256_loadu_ps(s), mv)));
    _mm256_storeu_ps(pj + 8, exp256(_mm256_sub_ps(_mm256_loadu_ps(s + 8), mv)));
    float sum = 0;
    for (int j = 0; j < nv; j++) sum += pj[j];
    *l += sum;
    const __m256 cv = _mm256_set1_ps(corr);
    int i = 0;
    for (; i + 8 <= d; i += 8) {
        __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(acc + i), cv), a1 = _mm256_setzero_ps();
        int j = 0;
        for (; j + 2 <= nv; j += 2) {
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(pj[j]), _mm256_loadu_ps(vb + (size_t)j * d + i), a0);
            a1 = _mm256_fmadd_ps(_mm256_set1_ps(pj[j + 1]), _mm256_loadu_ps(vb + (size_t)(j + 1) * d + i), a1);
        }
        if (j < nv) a0 = _mm256_fmadd_ps(_mm256_set1_ps(pj[j]), _mm256_loadu_ps(vb + (size_t)j * d + i), a0);
        _mm256_storeu_ps(acc + i, _mm256_add_ps(a0, a1));
    }
    for (; i < d; i++) {
        float a = acc[i] * corr;
        for (int j = 0; j < nv; j++) a += pj[j] * vb[(size_t)j * d + i];
        acc[i] = a;
    }
}

#endif
