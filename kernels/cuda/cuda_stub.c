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
