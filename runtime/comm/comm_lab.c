/* comm_lab.c - the parts of include/kvmesh_lab.h that open comm's objects to lab code: a context's KV pool and
 * the prepared prompt as a handle with accessors (the library's own code uses struct kvm_prepared of prompt.h). */
#include "prompt.h"

#include "../core/core.h"

kvm_kv_pool_t *kvm_comm_pool(kvm_comm_t *c) { return kvm_kv_store_pool(kvm_comm_store(c)); }

kvm_prepared_t *kvm_prepared_create(void) { return kvm_calloc(1, sizeof(kvm_prepared_t)); }

void kvm_prepared_free(kvm_prepared_t *p) {
    if (!p) return;
    kvm_prepared_release(p);
    kvm_free(p);
}

kvm_seq_t *kvm_prepared_seq(kvm_prepared_t *p) { return &p->seq; }

int kvm_prepared_n_cached(const kvm_prepared_t *p) { return p->n_cached; }

const int32_t *kvm_prepared_rest(const kvm_prepared_t *p, int *n) {
    *n = p->n_rest;
    return p->rest_ids;
}

const int32_t *kvm_prepared_prompt(const kvm_prepared_t *p, int *n) {
    *n = p->n_prompt;
    return p->prompt_ids;
}

const kvm_comm_report_t *kvm_prepared_report(const kvm_prepared_t *p) { return &p->report; }
