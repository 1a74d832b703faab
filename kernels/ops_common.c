/* ops_common.c - backend selection, the validation of backend settings and math shared by all backends. */
#include "ops.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "../runtime/core/core.h"
#include "rope.h"

size_t kvm_dtype_size(kvm_dtype_t t) { return t == KVM_F32 ? 4 : 2; }

void kvm_q8_encode_row(int8_t *q, float *scale, const float *y, int D) {
    float m = 0.f;
    for (int d = 0; d < D; d++) m = fmaxf(m, fabsf(y[d]));
    const float s = m / KVM_Q8_MAX;
    *scale = s;
    for (int d = 0; d < D; d++) {
        const float v = s > 0.f ? y[d] / s : 0.f;
        q[d] = v > -KVM_Q8_MAX ? (v < KVM_Q8_MAX ? (int8_t)rintf(v) : 127) : v == v ? -127 : 0;
    }
}

size_t kvm_q8_bytes(size_t elems, int D) { return kvm_q8_data_bytes(elems) + elems / (size_t)D * sizeof(float); }

const char *kvm_dtype_name(kvm_dtype_t t) {
    switch (t) {
    case KVM_F32: return "F32";
    case KVM_F16: return "F16";
    case KVM_BF16: return "BF16";
    }
    return "?";
}

int kvm_dtype_parse(const char *name, const char *setting, kvm_dtype_t *out) {
    static const struct {
        const char *name;
        kvm_dtype_t t;
    } names[] = {{"f32", KVM_F32}, {"f16", KVM_F16}, {"bf16", KVM_BF16}};
    for (size_t i = 0; name && i < sizeof names / sizeof names[0]; i++)
        if (!strcasecmp(name, names[i].name)) {
            *out = names[i].t;
            return 0;
        }
    return kvm_seterr(KVM_EINVAL, "%s: '%s' is not one of f32, f16, bf16", setting, name ? name : "(null)");
}

int kvm_dtype_check(kvm_dtype_t t, const char *setting) {
    if (t == KVM_F32 || t == KVM_F16 || t == KVM_BF16) return 0;
    return kvm_seterr(KVM_EINVAL, "%s: %d is not one of KVM_F32, KVM_F16, KVM_BF16", setting, (int)t);
}

double kvm_rope_angle(double pos, float inv_freq) { return kvm_rope_angle_reduced(pos, inv_freq); }

static char g_fallback[256];

const char *kvm_ops_fallback_reason(void) { return g_fallback; }

int kvm_backend_check(const char *name) {
    if (!name || !*name || !strcmp(name, "auto") || !strcmp(name, "cpu") || !strcmp(name, "cuda")) return 0;
    return kvm_seterr(KVM_EINVAL, "backend: '%s' is not one of auto, cpu, cuda", name);
}

const kvm_ops_t *kvm_ops_select(const char *name) {
    if (kvm_backend_check(name)) return NULL;
    if (!name || !*name || !strcmp(name, "auto")) {
        const kvm_ops_t *c = kvm_ops_cuda();
        if (c) return c;
        snprintf(g_fallback, sizeof g_fallback, "%s", kvm_errmsg());
        kvm_errclear();
        return kvm_ops_cpu();
    }
    if (!strcmp(name, "cpu")) return kvm_ops_cpu();
    const kvm_ops_t *c = kvm_ops_cuda();
    if (!c) kvm_errctx(kvm_errcode() ? kvm_errcode() : KVM_EUNSUPPORTED, "backend cuda was asked for (use backend auto to "
                       "fall back to the CPU, or cpu)");
    return c;
}

/* ---- settings of the CUDA backend (validated here so that every build checks them the same way) ---- */

kvm_cuda_opts_t kvm_cuda_opts_default(void) {
    return (kvm_cuda_opts_t){.device = 0, .profile = false, .pdl = true, .prefetch = 2, .skinny = KVM_CUDA_SKINNY_AUTO,
                             .skinny_rows = 16, .attn_dec_mma = true, .no_mma_attn = false, .attn_wg = 0, .mma_occ = 3, .mma_load = false, .ffn = true,
                             .ffn_gemv = false, .qkv_fuse = true, .qkv16 = true, .norm16 = true, .y16 = true,
                             .norm_v = true, .kvcomm_dist = KVM_CUDA_DIST_V2};
}

typedef enum { OPT_BOOL, OPT_NUMBER, OPT_NAME, OPT_INDEX } opt_kind_t;

/* One field of kvm_cuda_opts_t: a bool (0 or 1), an int that is one of the numbers in `values`, an int that
 * is the index of one of the names in `values`, or an int >= 0 (OPT_INDEX). */
typedef struct cuda_opt_field {
    const char *key;
    opt_kind_t kind;
    size_t off;
    const char *values; /* comma-separated, as shown in messages */
} cuda_opt_field_t;

#define OPT(k, kind, vals) {#k, kind, offsetof(kvm_cuda_opts_t, k), vals}
static const cuda_opt_field_t cuda_fields[] = {
    OPT(device, OPT_INDEX, "0, 1, ..."),    OPT(profile, OPT_BOOL, "0, 1"),
    OPT(pdl, OPT_BOOL, "0, 1"),             OPT(prefetch, OPT_NUMBER, "0, 1, 2"),
    OPT(skinny, OPT_NAME, "auto, gemv, mma"), OPT(skinny_rows, OPT_NUMBER, "16, 32, 64"),
    OPT(attn_dec_mma, OPT_BOOL, "0, 1"),
    OPT(no_mma_attn, OPT_BOOL, "0, 1"),     OPT(mma_occ, OPT_NUMBER, "1, 3"),
    OPT(attn_wg, OPT_NUMBER, "0, 1, 5, 6, 7, 8"), OPT(mma_load, OPT_BOOL, "0, 1"),
    OPT(ffn, OPT_BOOL, "0, 1"),
    OPT(ffn_gemv, OPT_BOOL, "0, 1"),        OPT(qkv_fuse, OPT_BOOL, "0, 1"),
    OPT(qkv16, OPT_BOOL, "0, 1"),           OPT(norm16, OPT_BOOL, "0, 1"),
    OPT(y16, OPT_BOOL, "0, 1"),             OPT(norm_v, OPT_BOOL, "0, 1"),
    OPT(kvcomm_dist, OPT_NAME, "v2, v1, v2u4"),
};
#undef OPT
#define N_CUDA_FIELDS (sizeof cuda_fields / sizeof cuda_fields[0])

/* Index of `item` in the comma-separated list (", " between items), or -1. */
static int list_index(const char *list, const char *item) {
    size_t n = strlen(item);
    for (int i = 0; *list; i++) {
        const char *end = strchr(list, ',');
        size_t len = end ? (size_t)(end - list) : strlen(list);
        if (n && len == n && !strncmp(list, item, n)) return i;
        if (!end) break;
        list = end + 2;
    }
    return -1;
}

/* Number of items of a comma-separated list. */
static int list_count(const char *list) {
    int n = 1;
    for (const char *p = list; *p; p++) n += *p == ',';
    return n;
}

static int field_get(const kvm_cuda_opts_t *o, const cuda_opt_field_t *f) {
    const char *p = (const char *)o + f->off;
    if (f->kind == OPT_BOOL) return *(const unsigned char *)p; /* a bool's byte: 0 or 1 unless corrupted */
    return *(const int *)p;
}

static void field_set(kvm_cuda_opts_t *o, const cuda_opt_field_t *f, int v) {
    char *p = (char *)o + f->off;
    if (f->kind == OPT_BOOL) *(bool *)p = v != 0;
    else *(int *)p = v;
}

/* Whether v is a value of field f. */
static bool field_ok(const cuda_opt_field_t *f, int v) {
    char num[16];
    switch (f->kind) {
    case OPT_BOOL: return v == 0 || v == 1;
    case OPT_INDEX: return v >= 0;
    case OPT_NAME: return v >= 0 && v < list_count(f->values);
    case OPT_NUMBER: snprintf(num, sizeof num, "%d", v); return list_index(f->values, num) >= 0;
    }
    return false;
}

int kvm_cuda_opts_check(const kvm_cuda_opts_t *o) {
    if (!o) return kvm_seterr(KVM_EINVAL, "cuda: no settings given");
    for (size_t i = 0; i < N_CUDA_FIELDS; i++) {
        const cuda_opt_field_t *f = &cuda_fields[i];
        int v = field_get(o, f);
        if (!field_ok(f, v))
            return kvm_seterr(KVM_EINVAL, "cuda %s: %d is not one of %s%s", f->key, v, f->values,
                              f->kind == OPT_NAME ? " (0, 1, ... in that order)" : "");
    }
    return 0;
}

int kvm_cuda_opts_parse(kvm_cuda_opts_t *o, const char *key, const char *value) {
    const cuda_opt_field_t *f = NULL;
    for (size_t i = 0; key && i < N_CUDA_FIELDS; i++)
        if (!strcmp(key, cuda_fields[i].key)) f = &cuda_fields[i];
    if (!f) {
        char keys[512];
        size_t n = 0;
        keys[0] = 0;
        for (size_t i = 0; i < N_CUDA_FIELDS && n < sizeof keys; i++)
            n += (size_t)snprintf(keys + n, sizeof keys - n, "%s%s", i ? ", " : "", cuda_fields[i].key);
        return kvm_seterr(KVM_EINVAL, "cuda: '%s' is not a setting (one of %s)", key ? key : "(null)", keys);
    }
    const char *v = value ? value : "";
    int x = -1;
    if (f->kind == OPT_NAME) {
        x = list_index(f->values, v);
    } else if (f->kind == OPT_INDEX) {
        char *end = NULL;
        long l = *v >= '0' && *v <= '9' ? strtol(v, &end, 10) : -1;
        x = end && !*end && l <= 1 << 20 ? (int)l : -1;
    } else if (list_index(f->values, v) >= 0) { /* OPT_BOOL, OPT_NUMBER: one of the listed numbers */
        x = atoi(v);
    }
    if (x < 0 || !field_ok(f, x)) return kvm_seterr(KVM_EINVAL, "cuda %s: '%s' is not one of %s", f->key, v, f->values);
    field_set(o, f, x);
    return 0;
}
