/* tokenizer.c - STUB until the tokenizer work lands (replaced by the real implementation). */
#include "tokenizer.h"
#include "../core/core.h"

kvm_tokenizer_t *kvm_tokenizer_load_bin(const char *path, int vocab_size) { kvm_seterr(KVM_EUNSUPPORTED, "tokenizer not implemented"); return NULL; }
kvm_tokenizer_t *kvm_tokenizer_load_hf(const char *a, const char *b) { kvm_seterr(KVM_EUNSUPPORTED, "tokenizer not implemented"); return NULL; }
void kvm_tokenizer_free(kvm_tokenizer_t *t) { (void)t; }
int kvm_tokenize(const kvm_tokenizer_t *t, const char *text, size_t len, int flags, int32_t **ids, int *n) { return KVM_EUNSUPPORTED; }
int kvm_detokenize(const kvm_tokenizer_t *t, const int32_t *ids, int n, bool skip_special, char **out, size_t *len) { return KVM_EUNSUPPORTED; }
int kvm_token_bytes(const kvm_tokenizer_t *t, int32_t prev, int32_t id, char *buf, size_t cap) { return KVM_EUNSUPPORTED; }
int kvm_tokenizer_vocab_size(const kvm_tokenizer_t *t) { return 0; }
int32_t kvm_tokenizer_find(const kvm_tokenizer_t *t, const char *piece) { return -1; }
int32_t kvm_tokenizer_bos(const kvm_tokenizer_t *t) { return -1; }
int32_t kvm_tokenizer_eos(const kvm_tokenizer_t *t) { return -1; }
bool kvm_tokenizer_adds_bos(const kvm_tokenizer_t *t) { return false; }
bool kvm_tokenizer_is_special(const kvm_tokenizer_t *t, int32_t id) { return false; }
const char *kvm_tokenizer_kind(const kvm_tokenizer_t *t) { return "none"; }
const char *kvm_tokenizer_chat_template(const kvm_tokenizer_t *t) { return ""; }
