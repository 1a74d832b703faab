/* minitasks_eval.h - running minitasks items through a kvmesh model (lab/; needs the engine, unlike
 * minitasks.h which is libc only). On the public API: greedy generation with the model's chat rendering. */
#ifndef KVM_MINITASKS_EVAL_H
#define KVM_MINITASKS_EVAL_H

#include <kvmesh.h>

#include "minitasks.h"

typedef struct kvm_mt_run {
    kvm_model_t *model;     /* borrowed */
    int max_tokens;         /* new tokens at most for exact tasks (story gets 4x) */
} kvm_mt_run_t;

/* Prepares greedy runs of items on model m. Checks that the model's chat format renders an item exactly as the
 * generator's ChatML (what the bundled models were trained on): KVM_EMODEL with both texts in the message
 * otherwise. Free with kvm_mt_run_free(). */
int kvm_mt_run_init(kvm_mt_run_t *r, kvm_model_t *m, int max_tokens);
void kvm_mt_run_free(kvm_mt_run_t *r);

/* Greedy-generates the answer to one item (prompt = the model's chat rendering of system + user, with
 * the assistant header). *out is the decoded text (free with kvm_free). Returns 0 or a KVM_E* code. */
int kvm_mt_run_item(kvm_mt_run_t *r, const kvm_mt_item_t *it, char **out);

#endif
