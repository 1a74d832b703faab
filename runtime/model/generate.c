/* generate.c - chat formats, prompt encoding and the generation loop. */
#include "generate.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- growable byte buffer --------------------------------------------------------------------- */

typedef struct sbuf {
    char *p;
    size_t n, cap;
} sbuf_t;

static int sb_put(sbuf_t *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *q = kvm_realloc(b->p, cap);
        if (!q) return KVM_ENOMEM;
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}
static int sb_str(sbuf_t *b, const char *s) { return sb_put(b, s, strlen(s)); }

/* ---- chat formats ------------------------------------------------------------------------------- */

const char *kvm_chat_format_name(kvm_chat_format_t f) {
    switch (f) {
    case KVM_CHAT_LLAMA3: return "llama3";
    case KVM_CHAT_CHATML: return "chatml";
    case KVM_CHAT_LLAMA2: return "llama2";
    default: return "none";
    }
}

int kvm_chat_render(kvm_chat_format_t fmt, const kvm_chat_msg_t *msgs, int n, bool add_gen, char **out) {
    sbuf_t b = {0};
    int rc = sb_str(&b, "");
    for (int i = 0; !rc && i < n; i++) {
        const char *role = msgs[i].role ? msgs[i].role : "user", *content = msgs[i].content ? msgs[i].content : "";
        switch (fmt) {
        case KVM_CHAT_LLAMA3:
            rc = sb_str(&b, "<|start_header_id|>");
            if (!rc) rc = sb_str(&b, role);
            if (!rc) rc = sb_str(&b, "<|end_header_id|>\n\n");
            if (!rc) rc = sb_str(&b, content);
            if (!rc) rc = sb_str(&b, "<|eot_id|>");
            break;
        case KVM_CHAT_CHATML:
            rc = sb_str(&b, "<|im_start|>");
            if (!rc) rc = sb_str(&b, role);
            if (!rc) rc = sb_str(&b, "\n");
            if (!rc) rc = sb_str(&b, content);
            if (!rc) rc = sb_str(&b, "<|im_end|>\n");
            break;
        case KVM_CHAT_LLAMA2:
            /* [INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] answer </s><s>[INST] ... */
            if (!strcmp(role, "system")) {
                rc = sb_str(&b, "[INST] <<SYS>>\n");
                if (!rc) rc = sb_str(&b, content);
                if (!rc) rc = sb_str(&b, "\n<</SYS>>\n\n");
            } else if (!strcmp(role, "assistant")) {
                rc = sb_str(&b, " ");
                if (!rc) rc = sb_str(&b, content);
                if (!rc) rc = sb_str(&b, " </s><s>");
            } else {
                bool after_sys = i > 0 && msgs[i - 1].role && !strcmp(msgs[i - 1].role, "system");
                if (!after_sys) rc = sb_str(&b, "[INST] ");
                if (!rc) rc = sb_str(&b, content);
                if (!rc) rc = sb_str(&b, " [/INST]");
            }
            break;
        default:
            rc = sb_str(&b, content);
            break;
        }
    }
    if (!rc && add_gen) {
        if (fmt == KVM_CHAT_LLAMA3) rc = sb_str(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        else if (fmt == KVM_CHAT_CHATML) rc = sb_str(&b, "<|im_start|>assistant\n");
    }
    if (rc) {
        kvm_free(b.p);
        return rc;
    }
    *out = b.p;
    return 0;
}

int kvm_prompt_encode(const kvm_model_t *m, const char *system, const char *user, bool chat, int32_t **ids, int *n) {
    if (!m->tok) return kvm_seterr(KVM_EINVAL, "model %s has no tokenizer: give one with --tokenizer", m->name);
    int flags = m->cfg.add_bos ? KVM_TOK_ADD_BOS : 0;
    if (!chat) return kvm_tokenize(m->tok, user, strlen(user), flags, ids, n);
    if (m->cfg.chat_format == KVM_CHAT_NONE)
        return kvm_seterr(KVM_EUNSUPPORTED, "model %s has no chat format (its tokenizer_config.json names no known chat template)",
                          m->name);
    kvm_chat_msg_t msgs[2];
    int k = 0;
    if (system && *system) msgs[k++] = (kvm_chat_msg_t){"system", system};
    msgs[k++] = (kvm_chat_msg_t){"user", user};
    char *text = NULL;
    int rc = kvm_chat_render(m->cfg.chat_format, msgs, k, true, &text);
    if (rc) return rc;
    rc = kvm_tokenize(m->tok, text, strlen(text), flags | KVM_TOK_PARSE_SPECIAL, ids, n);
    kvm_free(text);
    return rc;
}

/* ---- generation --------------------------------------------------------------------------------- */

const char *kvm_stop_reason_name(int r) {
    switch (r) {
    case KVM_STOP_EOS: return "eos";
    case KVM_STOP_STRING: return "stop_string";
    case KVM_STOP_LENGTH: return "length";
    case KVM_STOP_CONTEXT: return "context";
    case KVM_STOP_CALLBACK: return "callback";
    default: return "none";
    }
}

void kvm_gen_result_free(kvm_gen_result_t *r) {
    if (!r) return;
    kvm_free(r->ids);
    kvm_free(r->text);
    memset(r, 0, sizeof *r);
}

static bool is_stop_id(const kvm_model_t *m, const kvm_gen_params_t *p, int32_t id) {
    if (!p->ignore_eos)
        for (int i = 0; i < m->cfg.n_eos; i++)
            if (m->cfg.eos_ids[i] == id) return true;
    for (int i = 0; i < p->n_stop_ids; i++)
        if (p->stop_ids[i] == id) return true;
    return false;
}

/* Length of the longest suffix of text[0..n) that is a proper prefix of some stop string (held back
 * from streaming until we know whether it completes a stop string). */
static size_t stop_holdback(const char *text, size_t n, const kvm_gen_params_t *p) {
    size_t best = 0;
    for (int i = 0; i < p->n_stop_strings; i++) {
        size_t sl = strlen(p->stop_strings[i]);
        for (size_t k = sl > 1 ? sl - 1 : 0; k > best; k--)
            if (k <= n && !memcmp(text + n - k, p->stop_strings[i], k)) {
                best = k;
                break;
            }
    }
    return best;
}

/* Chunked prefill of tokens into seq; logits of the last token into `logits`. */
static int prefill(kvm_model_t *m, kvm_seq_t *seq, const int32_t *toks, int n, float *logits) {
    /* GPUs want long chunks (GEMM efficiency); on the CPU shorter ones keep the workspace small */
    const int chunk = m->ops == kvm_ops_cpu() ? 512 : 4096;
    for (int off = 0; off < n; off += chunk) {
        int k = n - off < chunk ? n - off : chunk;
        kvm_batch_item_t it = {.seq = seq, .tokens = toks + off, .n_tokens = k, .logits = off + k == n ? logits : NULL};
        int rc = kvm_forward(m, &it, 1);
        if (rc) return rc;
    }
    return 0;
}

int kvm_generate(kvm_model_t *m, kvm_seq_t *seq, const int32_t *prompt, int n_prompt, const kvm_gen_params_t *p,
                 kvm_token_cb cb, void *ud, kvm_gen_result_t *res) {
    memset(res, 0, sizeof *res);
    kvm_gen_params_t defp = {0};
    if (!p) p = &defp;
    if (n_prompt <= 0) return kvm_seterr(KVM_EINVAL, "generate: the prompt is empty (at least one token must be run)");
    if (!m->tok && cb) return kvm_seterr(KVM_EINVAL, "generate: model %s has no tokenizer to decode with", m->name);
    const int V = m->cfg.vocab_size;
    int max_new = p->max_tokens > 0 ? p->max_tokens : 256;
    uint64_t t0 = kvm_now_ns(), t1 = 0;
    float *logits = kvm_malloc((size_t)V * sizeof(float));
    kvm_sampler_t *smp = kvm_sampler_create(&p->sampling, V);
    int32_t *hist = kvm_malloc((size_t)(seq->n_tokens + n_prompt + max_new + 1) * sizeof(int32_t));
    res->ids = kvm_malloc((size_t)(max_new + 1) * sizeof(int32_t));
    sbuf_t text = {0};
    int rc = (!logits || !smp || !hist || !res->ids) ? kvm_errcode() ? kvm_errcode() : KVM_ENOMEM : sb_str(&text, "");
    int n_hist = 0;
    if (!rc) {
        if (seq->n_tokens > 0) memcpy(hist, seq->tokens, (size_t)seq->n_tokens * sizeof(int32_t));
        memcpy(hist + seq->n_tokens, prompt, (size_t)n_prompt * sizeof(int32_t));
        n_hist = seq->n_tokens + n_prompt;
        res->n_prompt = n_prompt;
        rc = prefill(m, seq, prompt, n_prompt, logits);
    }
    size_t emitted = 0;
    int32_t prev = n_prompt > 0 ? prompt[n_prompt - 1] : -1;
    while (!rc) {
        int32_t next = kvm_sampler_sample(smp, logits, hist, n_hist);
        if (!t1) {
            t1 = kvm_now_ns();
            res->ttft_ms = (double)(t1 - t0) / 1e6;
        }
        if (is_stop_id(m, p, next)) {
            res->stop_reason = KVM_STOP_EOS;
            break;
        }
        res->ids[res->n_ids++] = next;
        hist[n_hist++] = next;
        if (m->tok) {
            char piece[256];
            int nb = kvm_token_bytes(m->tok, prev, next, piece, sizeof piece);
            if (nb > 0) rc = sb_put(&text, piece, (size_t)nb);
            if (rc) break;
        }
        prev = next;
        /* stop strings: cut at the first occurrence */
        bool stopped = false;
        for (int i = 0; i < p->n_stop_strings && !stopped; i++) {
            const char *hit = strstr(text.p + (emitted > 64 ? emitted - 64 : 0), p->stop_strings[i]);
            if (hit) {
                text.n = (size_t)(hit - text.p);
                text.p[text.n] = 0;
                stopped = true;
            }
        }
        size_t safe = stopped ? text.n : text.n - stop_holdback(text.p, text.n, p);
        if (cb && safe > emitted) {
            if (cb(ud, next, text.p + emitted, safe - emitted)) {
                emitted = safe;
                res->stop_reason = KVM_STOP_CALLBACK;
                break;
            }
            emitted = safe;
        }
        if (stopped) {
            res->stop_reason = KVM_STOP_STRING;
            break;
        }
        if (res->n_ids >= max_new) {
            res->stop_reason = KVM_STOP_LENGTH;
            break;
        }
        if (p->max_total_tokens > 0 && seq->n_tokens >= p->max_total_tokens) {
            res->stop_reason = KVM_STOP_LENGTH;
            break;
        }
        if (m->cfg.max_seq_len > 0 && seq->n_tokens + 1 > m->cfg.max_seq_len) {
            res->stop_reason = KVM_STOP_CONTEXT;
            break;
        }
        kvm_batch_item_t it = {.seq = seq, .tokens = &next, .n_tokens = 1, .logits = logits};
        rc = kvm_forward(m, &it, 1);
    }
    if (!rc && cb && text.n > emitted) cb(ud, -1, text.p + emitted, text.n - emitted);
    uint64_t t2 = kvm_now_ns();
    if (t1) res->decode_ms = (double)(t2 - t1) / 1e6;
    res->text = text.p;
    res->text_len = text.n;
    kvm_free(logits);
    kvm_free(hist);
    kvm_sampler_free(smp);
    if (rc) {
        kvm_free(res->text);
        res->text = NULL;
        kvm_free(res->ids);
        res->ids = NULL;
        res->n_ids = 0;
    }
    return rc;
}
