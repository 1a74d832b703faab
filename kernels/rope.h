/* rope.h - RoPE math with one definition for every backend, so that all of them rotate by the same
 * angles: the angle (pos * inv_freq in fp64, reduced with fmod to [-pi, pi), kvcomm.md §3.3) for the CPU
 * ops (kvm_rope_angle, ops_common.c) and the CUDA kernels (kvm_rope_angle_dev, cuda_internal.cuh), and,
 * in C only, the rotation of one head vector (the CPU ops, the KV store's host rows). */
#ifndef KVM_ROPE_H
#define KVM_ROPE_H

#include <math.h>

#ifdef __CUDACC__
#define KVM_ROPE_FN __host__ __device__ __forceinline__
#else
#define KVM_ROPE_FN static inline
#endif

KVM_ROPE_FN double kvm_rope_angle_reduced(double pos, float inv_freq) {
    double a = pos * (double)inv_freq;
    const double two_pi = 6.283185307179586476925286766559;
    a = fmod(a, two_pi);
    if (a >= 3.141592653589793238462643383279) a -= two_pi;
    else if (a < -3.141592653589793238462643383279) a += two_pi;
    return a;
}

#undef KVM_ROPE_FN

#ifndef __CUDACC__
#include "ops.h"

/* Rotates the pair (*a, *b) by the angle whose cosine and sine (rounded to float) are c and s; the product is
 * computed in float, as every CPU path does. */
static inline void kvm_rope_rotate_pair(float *a, float *b, float c, float s) {
    float x = *a, y = *b;
    *a = x * c - y * s;
    *b = x * s + y * c;
}

/* The rotation of pair j at position pos: c[j] = cos, s[j] = sin of its reduced angle, rounded to float, for
 * j < half. A token's heads (q and k alike) share one position: the CPU ops compute these once per token. */
static inline void kvm_rope_cos_sin(float *c, float *s, int half, double pos, const float *inv_freq) {
    for (int j = 0; j < half; j++) {
        double ang = kvm_rope_angle_reduced(pos, inv_freq[j]);
        c[j] = (float)cos(ang);
        s[j] = (float)sin(ang);
    }
}

/* Rotates the hd/2 pairs of one head vector v[0..hd) (pairs as `layout` says) by the angles c, s of
 * kvm_rope_cos_sin. */
static inline void kvm_rope_apply(float *v, int hd, const float *c, const float *s, kvm_rope_layout_t layout) {
    const int half = hd / 2;
    for (int j = 0; j < half; j++) {
        if (layout == KVM_ROPE_HALF) kvm_rope_rotate_pair(&v[j], &v[j + half], c[j], s[j]);
        else kvm_rope_rotate_pair(&v[2 * j], &v[2 * j + 1], c[j], s[j]);
    }
}

/* Rotates the hd/2 pairs of one head vector v[0..hd) to position pos (the same bits as kvm_rope_cos_sin then
 * kvm_rope_apply, without their buffers). */
static inline void kvm_rope_rotate_vec(float *v, int hd, double pos, const float *inv_freq, kvm_rope_layout_t layout) {
    const int half = hd / 2;
    for (int j = 0; j < half; j++) {
        float c, s;
        kvm_rope_cos_sin(&c, &s, 1, pos, &inv_freq[j]);
        if (layout == KVM_ROPE_HALF) kvm_rope_rotate_pair(&v[j], &v[j + half], c, s);
        else kvm_rope_rotate_pair(&v[2 * j], &v[2 * j + 1], c, s);
    }
}
#endif

#endif
