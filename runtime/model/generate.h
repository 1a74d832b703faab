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
/* Picks the next token from logits[vocab] (modified in place); history = ids seen so far (prompt + output).
 * -1 (KVM_ENOMEM set) when the scratch a non-greedy sample sorts in cannot be allocated. */
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
 * BOS as the model's tokenizer adds it; a model with its own vocabulary (mock model) encodes system
 * and user its way. *ids freed with kvm_free. */
int kvm_prompt_encode(const kvm_model_t *m, const char *system, const char *user, bool chat, int32_t **ids, int *n);

/* ---- generation ------------------------------------------------------------------------------- */

/* enum kvm_stop_reason and kvm_stop_reason_name: include/kvmesh.h */

/* The usual cap on new tokens (kvm_gen_default_params, `kvmesh generate` without --max-tokens). */
#define KVM_GEN_MAX_TOKENS_DEFAULT 256

typedef struct kvm_gen_params {
    int max_tokens;            /* new tokens at most, >= 1 (0 is rejected with KVM_EINVAL: it never means a default) */
    kvm_sampler_params_t sampling;
    const char *const *stop_strings; /* generation stops when the output text contains one (it is cut off there);
                                        empty strings are ignored */
    int n_stop_strings;
    bool ignore_eos;           /* the model's EOS ids do not stop generation (stop_ids still do) */
    /* llama2.c `steps`: stop once this many positions have been run through the model (prompt, BOS
     * included, plus generated tokens; the token sampled at the last position is still emitted); 0 = off */
    int max_total_tokens;
    /* extra stop token ids besides the model's EOS ids */
    const int32_t *stop_ids;
    int n_stop_ids;
} kvm_gen_params_t;

/* Defaults: max_tokens KVM_GEN_MAX_TOKENS_DEFAULT, greedy, top_p 1, repetition_penalty 1, no stops. */
kvm_gen_params_t kvm_gen_default_params(void);

/* Streaming: called with text that is safe to show (a stop string still forming is held back, and
 * never shown if it completes), as tokens make it so; id is the token that did, or -1 for text
 * released at the end. Return non-zero to stop (KVM_STOP_CALLBACK); it is not called again then. */
typedef int (*kvm_token_cb)(void *ud, int32_t id, const char *bytes, size_t n);

/* The result of a generation is the public kvm_generation_t (include/kvmesh.h: ids and text owned, kvm_free;
 * n_prompt = the prompt tokens forwarded by this call; ttft_ms from the call to the first token id on the host;
 * decode_ms after the first token to the end), so that lab code (kvm_seq_generate, kvm_comm_complete in
 * include/kvmesh_lab.h) and the library share one type. kvm_gen_result_free = kvm_generation_clear. */
typedef kvm_generation_t kvm_gen_result_t;
void kvm_gen_result_free(kvm_gen_result_t *r);

/* Runs prompt[0..n_prompt) (the tokens not yet in seq's cache; seq may already hold a prefix) and
 * generates: the scheduler (runtime/sched/sched.c, where this is implemented) with one request, so
 * generation and batched requests give the same ids. p NULL = kvm_gen_default_params(). The seq keeps
 * the KV of the prompt and of every generated token except the last. On error *res is empty. */
int kvm_generate(kvm_model_t *m, kvm_seq_t *seq, const int32_t *prompt, int n_prompt, const kvm_gen_params_t *p,
                 kvm_token_cb cb, void *ud, kvm_gen_result_t *res);

/* ---- decoding: the stop rules, in one place ----------------------------------------------------- */

/* The output side of one request: the history the sampler sees (context, then output), the output
 * text, what the stream has been shown, and every stop rule: the model's EOS ids (unless ignore_eos),
 * extra stop ids, stop strings (held back from the stream while forming, cut from the text),
 * max_tokens, max_total_tokens, the model's context and the stream's callback. The scheduler keeps one
 * per request; nothing else decides when generation ends. Not thread-safe. */
typedef struct kvm_decode {
    const kvm_model_t *m;
    int max_tokens, max_total_tokens;
    char **stop;              /* [n_stop] copies of the non-empty stop strings */
    int n_stop;
    int32_t *stop_ids;        /* [n_stop_ids] the model's EOS ids (unless ignore_eos) and the extra ones */
    int n_stop_ids;
    kvm_token_cb cb;
    void *ud;
    int32_t *hist;            /* [n_hist] context ids, then output ids */
    int n_ctx, n_hist, cap_hist;
    char *text;               /* [text_len] output text, NUL-terminated */
    size_t text_len, text_cap;
    size_t shown;             /* bytes of text given to cb (kept across kvm_decode_restart) */
    bool cb_stopped;
} kvm_decode_t;

/* Checks p (max_tokens >= 1, max_total_tokens >= 0, counts >= 0: KVM_EINVAL naming the field) and
 * copies its stop rules; cb may be NULL. Free with kvm_decode_free (also after an error). */
int kvm_decode_init(kvm_decode_t *d, const kvm_model_t *m, const kvm_gen_params_t *p, kvm_token_cb cb, void *ud);
/* Appends ids to the context (what the sequence holds before the first new token). */
int kvm_decode_context(kvm_decode_t *d, const int32_t *ids, int n);
/* Takes one sampled id; n_cached = positions the sequence has run (the id not included). Sets *stop to
 * KVM_STOP_NONE (run the id next) or the reason to stop; the stream gets what became safe to show,
 * and at a stop other than a stop string or the callback the text still held back. 0 or KVM_ENOMEM. */
int kvm_decode_accept(kvm_decode_t *d, int32_t id, int n_cached, int *stop);
/* Forgets the output (a preempted request starts again); the stream is not shown text twice. */
void kvm_decode_restart(kvm_decode_t *d);
/* The output ids as a new array of *n (kvm_free; NULL when out of memory). */
int32_t *kvm_decode_take_ids(kvm_decode_t *d, int *n);
/* The output text, handed to the caller (kvm_free); the decode state keeps none. */
char *kvm_decode_take_text(kvm_decode_t *d, size_t *len);
void kvm_decode_free(kvm_decode_t *d);

#endif
