/* cuda_stub.c - stands in for the CUDA backend when the build has no nvcc. */
#include "../ops.h"
#include "../../runtime/core/status.h"

#include <stddef.h>

const kvm_ops_t *kvm_ops_cuda(void) {
    kvm_seterr(KVM_EUNSUPPORTED, "this kvmesh was built without the CUDA backend (nvcc was not found at build time)");
    return NULL;
}

int kvm_cuda_describe(char *buf, size_t cap) {
    if (cap) buf[0] = 0;
    return kvm_seterr(KVM_EUNSUPPORTED, "this kvmesh was built without the CUDA backend (nvcc was not found at build time)");
}

void kvm_cuda_profile_begin(void) {}
double kvm_cuda_profile_end(FILE *f, const char *title) {
    (void)f;
    (void)title;
    return 0;
}

/* The settings are validated and kept as on a CUDA build; nothing reads them. */
static kvm_cuda_opts_t g_opts;
static bool g_opts_set;

int kvm_cuda_set_opts(const kvm_cuda_opts_t *o) {
    int rc = kvm_cuda_opts_check(o);
    if (rc) return rc;
    g_opts = *o;
    g_opts_set = true;
    return 0;
}

kvm_cuda_opts_t kvm_cuda_get_opts(void) { return g_opts_set ? g_opts : kvm_cuda_opts_default(); }

bool kvm_cuda_attn_wg_available(void) { return false; }
