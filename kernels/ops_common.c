/* ops_common.c - backend selection and math shared by all backends. */
#include "ops.h"

#include <math.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "../runtime/core/core.h"

size_t kvm_dtype_size(kvm_dtype_t t) { return t == KVM_F32 ? 4 : 2; }

const char *kvm_dtype_name(kvm_dtype_t t) {
    switch (t) {
    case KVM_F32: return "F32";
    case KVM_F16: return "F16";
    case KVM_BF16: return "BF16";
    }
    return "?";
}

double kvm_rope_angle(double pos, float inv_freq) {
    double a = pos * (double)inv_freq;
    /* reduce to [-pi, pi) in fp64 (kvcomm.md §3.3) */
    const double two_pi = 6.283185307179586476925286766559;
    a = fmod(a, two_pi);
    if (a >= 3.141592653589793238462643383279) a -= two_pi;
    else if (a < -3.141592653589793238462643383279) a += two_pi;
    return a;
}

static char g_fallback[256];

const char *kvm_ops_fallback_reason(void) { return g_fallback; }

const kvm_ops_t *kvm_ops_select(const char *name) {
    if (!name || !*name) name = getenv("KVM_BACKEND");
    if (!name || !*name || !strcmp(name, "auto")) {
        const kvm_ops_t *c = kvm_ops_cuda();
        if (c) return c;
        snprintf(g_fallback, sizeof g_fallback, "%s", kvm_errmsg());
        kvm_errclear();
        return kvm_ops_cpu();
    }
    if (!strcmp(name, "cpu")) return kvm_ops_cpu();
    if (!strcmp(name, "cuda")) return kvm_ops_cuda();
    kvm_seterr(KVM_EINVAL, "unknown backend '%s' (expected auto, cpu or cuda)", name);
    return NULL;
}
