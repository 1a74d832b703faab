/* forward.h - the transformer forward pass over batches of sequences (L2).
 *
 * One call runs the new tokens of several sequences through the model together: the linear layers see
 * all rows at once (continuous batching), attention reads each sequence's cache through its block
 * table, so reused and computed tokens look the same to it. */
#ifndef KVM_FORWARD_H
#define KVM_FORWARD_H

#include "model.h"
#include "../kv/kv.h"

typedef struct kvm_batch_item {
    kvm_seq_t *seq;          /* new tokens go at positions seq->n_tokens .. +n_tokens-1 */
    const int32_t *tokens;   /* [n_tokens] host */
    int n_tokens;
    float *logits;           /* host; [vocab] for the last token, or [n_tokens][vocab] when all_logits;
                                NULL = no logits wanted */
    bool all_logits;
    int32_t *next_token;     /* host; when set, the greedy next token (argmax of the last logits row, computed
                                on the backend: no logits need to travel) is written here */
    const int32_t *positions; /* host [n_tokens] or NULL. When set, the item RECOMPUTES rows already in seq at
                                these positions (strictly increasing, each < seq->n_tokens): every layer writes
                                their K/V there before its attention, and each row attends to positions [0, its
                                own]; seq keeps its length and tokens. Their blocks must be the sequence's own
                                (refcount 1). (KVCOMM's selective recompute: scattered rows in one item, so the
                                context is read once per query tile.) */
} kvm_batch_item_t;

/* Prepares the backend copy of the weights and the workspace for up to max_rows tokens per step.
 * Called by kvm_model_load; safe to call again with a larger max_rows. */
int kvm_forward_init(kvm_model_t *m, int max_rows);
void kvm_forward_free(kvm_model_t *m);
/* Applies the forward's part of the load options (checked first, kvm_load_opts_check; NULL = defaults): the
 * dtype of the KV pools kvm_model_kv_pool makes from now on (kv_dtype) and whether decode steps are replayed
 * as graphs (no_cuda_graphs). The loaders call it after kvm_forward_init. */
int kvm_forward_configure(kvm_model_t *m, const kvm_load_opts_t *o);
/* Turns the replay of decode steps as graphs on or off (off drops a captured graph; on takes effect where the
 * backend has graphs and no capture failed). For benchmarks that compare both on one model. */
void kvm_forward_set_graphs(kvm_model_t *m, bool on);
/* Hands a backend allocation (e.g. the device buffer of synthetic weights) to the model's backend state,
 * which frees it in kvm_forward_free. */
int kvm_forward_adopt(kvm_model_t *m, void *backend_ptr);

/* Runs one step. On success every item's seq has grown by its n_tokens. On error (KV budget, bad
 * token id, rows beyond the context) no sequence is changed and the message says which item. */
int kvm_forward(kvm_model_t *m, kvm_batch_item_t *items, int n_items);

/* The same step through the first n_layers layers only: their K/V of the new tokens are written, the
 * sequences grow as in kvm_forward; no item may ask for logits. (KVCOMM's layer-1 check, kvcomm.md §5.2.) */
int kvm_forward_layers(kvm_model_t *m, kvm_batch_item_t *items, int n_items, int n_layers);

/* A KV pool sized for this model on its backend (kv_bytes of budget; 0 = enough for 4 full contexts). */
kvm_kv_pool_t *kvm_model_kv_pool(kvm_model_t *m, size_t kv_bytes);

#endif
