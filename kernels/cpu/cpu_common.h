/* cpu_common.h - small inline helpers shared by the CPU backend's kernel files (kernels/cpu). */
#ifndef KVM_CPU_COMMON_H
#define KVM_CPU_COMMON_H

#include <stdint.h>
#include <string.h>

#include "../../runtime/core/core.h"
#include "../ops.h"

static inline void row_to_f32(float *dst, const void *src, kvm_dtype_t dt, size_t n) {
    if (dt == KVM_F32) {
        memcpy(dst, src, n * 4);
    } else if (dt == KVM_BF16) {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] = kvm_bf16_to_f32(s[i]);
    } else {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] = kvm_f16_to_f32(s[i]);
    }
}

static inline float dot_f32(const float *a, const float *b, int n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        s0 += a[i] * b[i]; s1 += a[i + 1] * b[i + 1]; s2 += a[i + 2] * b[i + 2]; s3 += a[i + 3] * b[i + 3];
        s4 += a[i + 4] * b[i + 4]; s5 += a[i + 5] * b[i + 5]; s6 += a[i + 6] * b[i + 6]; s7 += a[i + 7] * b[i + 7];
    }
    float s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline size_t kv_index(const kvm_kv_geom_t *g, int32_t blk, int layer, int kv, int h, int t) {
    return ((((size_t)blk * g->n_layers + layer) * 2 + kv) * g->n_kv_heads + h) * KVM_KV_BLOCK * (size_t)g->head_dim +
           (size_t)t * g->head_dim;
}

static inline void kv_store(void *kv, const kvm_kv_geom_t *g, size_t idx, const float *src) {
    if (g->dtype == KVM_F32) {
        memcpy((float *)kv + idx, src, (size_t)g->head_dim * 4);
    } else {
        uint16_t *d = (uint16_t *)kv + idx;
        for (int i = 0; i < g->head_dim; i++) d[i] = g->dtype == KVM_BF16 ? kvm_f32_to_bf16(src[i]) : kvm_f32_to_f16(src[i]);
    }
}

static inline void kv_load(float *dst, const void *kv, const kvm_kv_geom_t *g, size_t idx) {
    if (g->dtype == KVM_F32) memcpy(dst, (const float *)kv + idx, (size_t)g->head_dim * 4);
    else row_to_f32(dst, (const uint16_t *)kv + idx, g->dtype, (size_t)g->head_dim);
}

#endif
