/* tokenizer.h - one interface over every tokenizer kvmesh reads (L2).
 *
 *   - llama2.c tokenizer.bin (SentencePiece-style scores, byte fallback <0xNN>);
 *   - HF tokenizer.json, model type BPE, in both families:
 *       byte-level (GPT-2, Llama-3, Qwen): pre-tokenizer regex split + byte-to-unicode map;
 *       SentencePiece-style (Llama-2, Mistral): metaspace "▁", byte fallback;
 *     with added tokens and special tokens.
 * Encoding equals HF `tokenizers` id for id (tests/tokenizer corpus). */
#ifndef KVM_TOKENIZER_H
#define KVM_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* kvm_tokenizer_t, the flags KVM_TOK_ADD_BOS / KVM_TOK_PARSE_SPECIAL (HF default: added tokens are always
 * matched; the flag controls *special* ones), kvm_tokenize, kvm_detokenize, kvm_tokenizer_free and
 * kvm_tokenizer_vocab_size are public (include/kvmesh.h). */
#include <kvmesh.h>

/* Loads a llama2.c tokenizer.bin with vocab_size entries. NULL + message on error. */
kvm_tokenizer_t *kvm_tokenizer_load_bin(const char *path, int vocab_size);
/* Loads an HF tokenizer.json; tokenizer_config_path (may be NULL) supplies bos/eos/add_bos_token and the
 * chat template name. NULL + message on error (the message names the JSON field). */
kvm_tokenizer_t *kvm_tokenizer_load_hf(const char *tokenizer_json_path, const char *tokenizer_config_path);
void kvm_tokenizer_free(kvm_tokenizer_t *t);

/* Encodes text[0..len) into a new array *ids (free with kvm_free) of *n ids. */
int kvm_tokenize(const kvm_tokenizer_t *t, const char *text, size_t len, int flags, int32_t **ids, int *n);
/* Decodes ids into a new NUL-terminated string *out (free with kvm_free); special tokens are rendered
 * as their content unless skip_special. */
int kvm_detokenize(const kvm_tokenizer_t *t, const int32_t *ids, int n, bool skip_special, char **out, size_t *len);
/* Streaming: the bytes that token `id` adds after token `prev` (-1 at the start) to the decoded text.
 * May be a partial UTF-8 sequence (byte-level BPE). Returns the byte count written (< cap), or <0. */
int kvm_token_bytes(const kvm_tokenizer_t *t, int32_t prev, int32_t id, char *buf, size_t cap);

int kvm_tokenizer_vocab_size(const kvm_tokenizer_t *t);
/* Id of an exact token string (e.g. "<|im_end|>"), or -1. */
int32_t kvm_tokenizer_find(const kvm_tokenizer_t *t, const char *piece);
/* BOS / EOS ids known to the tokenizer (-1 if none) and whether encode adds BOS by default. */
int32_t kvm_tokenizer_bos(const kvm_tokenizer_t *t);
int32_t kvm_tokenizer_eos(const kvm_tokenizer_t *t);
/* The HF BPE model's unk_token id (-1 if none, and for llama2.c tokenizers). */
int32_t kvm_tokenizer_unk(const kvm_tokenizer_t *t);
bool kvm_tokenizer_adds_bos(const kvm_tokenizer_t *t);
bool kvm_tokenizer_is_special(const kvm_tokenizer_t *t, int32_t id);
/* "llama2c", "bpe-bytelevel", "bpe-sentencepiece" */
const char *kvm_tokenizer_kind(const kvm_tokenizer_t *t);
/* chat template text from tokenizer_config.json ("" if none); used to pick the chat format */
const char *kvm_tokenizer_chat_template(const kvm_tokenizer_t *t);
/* A buffer of this many bytes holds what kvm_token_bytes writes for any token, the NUL included
 * (added by the tokenizer work; 129 for Qwen3, Llama-3 and GPT-2). */
int kvm_tokenizer_max_token_bytes(const kvm_tokenizer_t *t);

#endif
