/* mock_model.h - a model without weights, for tests and dry runs (L2).
 *
 * A kvm_model_t like any other: the scheduler, the stop rules, batching and the counters treat it as
 * a transformer, but its forward pass is a function (kvm_model_impl_t) that yields deterministic
 * logits (0 for the one token it means, -1e9 for every other), and it brings its own vocabulary:
 *   - a token is a word (whitespace-separated); words are numbered as prompts first use them, up to
 *     KVM_MOCK_MAX_WORDS per model. Each word has three ids: as a word of the system message, of the
 *     user message, and as a word the model said; id 0 is BOS (the prompt of an empty message), id 1
 *     EOS;
 *   - kvm_prompt_encode(m, system, user, ...) gives the system words, then the user words (no BOS);
 *   - the text of a said word is the word, after a space when the previous token was a said word too.
 * Specs (kvm_model_load("mock:<spec>")):
 *   "echo" - answers with the user message, word by word (one token per forward), then EOS;
 *   "fail" - every forward fails with KVM_EIO.
 * It keeps KV blocks in its pool as a real model does (1 layer, 1 head of dimension 2), so budgets and
 * preemption behave the same. Not thread-safe: encoding adds words to the model (one thread uses a
 * model at a time, as the scheduler does). */
#ifndef KVM_MOCK_MODEL_H
#define KVM_MOCK_MODEL_H

#include <stdbool.h>

#include "model.h"

#define KVM_MOCK_MAX_WORDS 16384

/* A mock model for spec ("echo" or "fail"); NULL + message (KVM_EINVAL naming the spec) otherwise.
 * Free with kvm_model_free. */
kvm_model_t *kvm_model_mock(const char *spec);
/* Whether m is a mock model (its KV holds nothing to reuse). */
bool kvm_model_is_mock(const kvm_model_t *m);

#endif
