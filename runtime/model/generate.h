/* generate.h - sampling, chat formats and the generation loop (L2). */
#ifndef KVM_GENERATE_H
#define KVM_GENERATE_H

#include "forward.h"
#include "tokenizer.h"

/* ---- sampler -------------------------------------------------------------------------------- */

typedef struct kvm_sampler_params {
    float temperature;        /* 0 = greedy */
    int top_k;                /* 0 = off */
    float top_p;              /* 1 (or 0) = off */
    float repetition_penalty; /* 1 (or 0) = off; HF semantics: logit>0 ? /p : *p, over the history */
    uint64_t seed;
} kvm_sampler_params_t;

typedef struct kvm_sampler kvm_sampler_t;
/* Creates a sampler for vocab_size logits; free with kvm_sampler_free. */
kvm_sampler_t *kvm_sampler_create(const kvm_sampler_params_t *p, int vocab_size);
void kvm_sampler_free(kvm_sampler_t *s);
/* Picks the next token from logits[vocab] (modified in place); history = ids seen so far (prompt + output). */
int32_t kvm_sampler_sample(kvm_sampler_t *s, float *logits, const int32_t *history, int n_history);

/* ---- chat formats ----------------------------------------------------------------------------- */

typedef struct kvm_chat_msg {
    const char *role;    /* "system", "user", "assistant" */
    const char *content;
} kvm_chat_msg_t;

/* Renders messages in the model's built-in chat format (Llama-3, ChatML, Llama-2) into a new string
 * (free with kvm_free) that contains the special-token strings; encode it with KVM_TOK_PARSE_SPECIAL.
 * With add_generation_prompt the assistant header is appended. KVM_CHAT_NONE concatenates contents. */
int kvm_chat_render(kvm_chat_format_t fmt, const kvm_chat_msg_t *msgs, int n, bool add_generation_prompt, char **out);
const char *kvm_chat_format_name(kvm_chat_format_t fmt);

/* Encodes a whole prompt as the model expects it: chat-rendered when chat is set (system may be NULL),
 * BOS as the model's tokenizer adds it. *ids freed with kvm_free. */
int kvm_prompt_encode(const kvm_model_t *m, const char *system, const char *user, bool chat, int32_t **ids, int *n);

/* ---- generation ------------------------------------------------------------------------------- */

/* enum kvm_stop_reason and kvm_stop_reason_name: include/kvmesh.h */

typedef struct kvm_gen_params {
    int max_tokens;            /* new tokens at most (default 256 when 0) */
    kvm_sampler_params_t sampling;
    const char *const *stop_strings; /* generation stops when the output text ends with one (it is cut off) */
    int n_stop_strings;
    bool ignore_eos;
    /* llama2.c `steps`: stop once this many positions have been run through the model (prompt, BOS
     * included, plus generated tokens; the token sampled at the last position is still emitted); 0 = off */
    int max_total_tokens;
    /* extra stop token ids besides the model's EOS ids (e.g. llama2.c BOS=1) */
    const int32_t *stop_ids;
    int n_stop_ids;
} kvm_gen_params_t;

/* Called for every generated token with the bytes it adds to the text; return non-zero to stop. */
typedef int (*kvm_token_cb)(void *ud, int32_t id, const char *bytes, size_t n);

typedef struct kvm_gen_result {
    int32_t *ids;       /* generated ids (stop token excluded); kvm_free */
    int n_ids;
    char *text;         /* decoded output (stop string removed); kvm_free */
    size_t text_len;
    int n_prompt;       /* prompt tokens forwarded by this call */
    int stop_reason;
    double ttft_ms;     /* from the call to the first token id on the host */
    double decode_ms;   /* after the first token to the end */
} kvm_gen_result_t;
void kvm_gen_result_free(kvm_gen_result_t *r);

/* Runs prompt[0..n_prompt) (the tokens not yet in seq's cache; seq may already hold a prefix) and
 * generates. The seq keeps the KV of the prompt and of every generated token except the last. */
int kvm_generate(kvm_model_t *m, kvm_seq_t *seq, const int32_t *prompt, int n_prompt, const kvm_gen_params_t *p,
                 kvm_token_cb cb, void *ud, kvm_gen_result_t *res);

#endif
