/* forward.h - the transformer forward pass over batches of sequences (L2).
 *
 * One call runs the new tokens of several sequences through the model together: the linear layers see
 * all rows at once (continuous batching), attention reads each sequence's cache through its block
 * table, so reused and computed tokens look the same to it. */
#ifndef KVM_FORWARD_H
#define KVM_FORWARD_H

#include "model.h"
#include "../kv/kv.h"

/* kvm_batch_item_t, kvm_forward_init, kvm_forward_set_graphs, kvm_forward, kvm_forward_timed and
 * kvm_model_kv_pool: include/kvmesh_lab.h (via kv.h) */

void kvm_forward_free(kvm_model_t *m);
/* Applies the forward's part of the load options (checked first, kvm_load_opts_check; NULL = defaults): the
 * dtype of the KV pools kvm_model_kv_pool makes from now on (kv_dtype) and whether decode steps are replayed
 * as graphs (no_cuda_graphs). The loaders call it after kvm_forward_init. */
int kvm_forward_configure(kvm_model_t *m, const kvm_load_opts_t *o);
/* Hands a backend allocation (e.g. the device buffer of synthetic weights) to the model's backend state,
 * which frees it in kvm_forward_free. */
int kvm_forward_adopt(kvm_model_t *m, void *backend_ptr);

/* The same step through the first n_layers layers only: their K/V of the new tokens are written, the
 * sequences grow as in kvm_forward; no item may ask for logits. (KVCOMM's layer-1 check, kvcomm.md §5.2.) */
int kvm_forward_layers(kvm_model_t *m, kvm_batch_item_t *items, int n_items, int n_layers);

/* The decode-step graphs m's backend holds now (at most 8, one per step shape; 0 without graph ops). */
int kvm_forward_graph_count(const kvm_model_t *m);

/* The dtype of m's KV pools (kvm_model_kv_pool): kvm_load_opts_t.kv_dtype when given (any backend), else f32 on the
 * CPU and the device dtype of the weights on a GPU. */
kvm_dtype_t kvm_model_kv_dtype_of(const kvm_model_t *m);

#endif
