/* generate.c - chat formats, prompt encoding and the generation loop. */
#include "generate.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- growable buffers -------------------------------------------------------------------------- */

/* Appends s[0..n) to the NUL-terminated buffer *p of *len bytes (capacity *cap). */
static int bytes_put(char **p, size_t *len, size_t *cap, const char *s, size_t n) {
    if (*len + n + 1 > *cap) {
        size_t nc = *cap ? *cap : 256;
        while (nc < *len + n + 1) nc *= 2;
        char *q = kvm_realloc(*p, nc);
        if (!q) return KVM_ENOMEM;
        *p = q;
        *cap = nc;
    }
    if (n) memcpy(*p + *len, s, n);
    *len += n;
    (*p)[*len] = 0;
    return 0;
}

static int ids_put(int32_t **a, int *n, int *cap, const int32_t *v, int k) {
    if (k <= 0) return 0;
    if (*n + k > *cap) {
        int nc = *cap ? *cap : 64;
        while (nc < *n + k) nc *= 2;
        int32_t *q = kvm_realloc(*a, (size_t)nc * sizeof *q);
        if (!q) return KVM_ENOMEM;
        *a = q;
        *cap = nc;
    }
    memcpy(*a + *n, v, (size_t)k * sizeof *v);
    *n += k;
    return 0;
}

typedef struct sbuf {
    char *p;
    size_t n, cap;
} sbuf_t;

static int sb_str(sbuf_t *b, const char *s) { return bytes_put(&b->p, &b->n, &b->cap, s, strlen(s)); }

/* ---- chat formats ------------------------------------------------------------------------------- */

const char *kvm_chat_format_name(kvm_chat_format_t f) {
    switch (f) {
    case KVM_CHAT_LLAMA3: return "llama3";
    case KVM_CHAT_CHATML: return "chatml";
    case KVM_CHAT_LLAMA2: return "llama2";
    default: return "none";
    }
}

/* Appends the strings of parts[0..n) that are not NULL, stopping at the first error. */
static int sb_strs(sbuf_t *b, const char *const *parts, int n) {
    int rc = 0;
    for (int i = 0; !rc && i < n; i++)
        if (parts[i]) rc = sb_str(b, parts[i]);
    return rc;
}

int kvm_chat_render(kvm_chat_format_t fmt, const kvm_chat_msg_t *msgs, int n, bool add_gen, char **out) {
    sbuf_t b = {0};
    int rc = sb_str(&b, "");
    for (int i = 0; !rc && i < n; i++) {
        const char *role = msgs[i].role ? msgs[i].role : "user", *content = msgs[i].content ? msgs[i].content : "";
        switch (fmt) {
        case KVM_CHAT_LLAMA3:
            rc = sb_strs(&b, (const char *[]){"<|start_header_id|>", role, "<|end_header_id|>\n\n", content, "<|eot_id|>"}, 5);
            break;
        case KVM_CHAT_CHATML:
            rc = sb_strs(&b, (const char *[]){"<|im_start|>", role, "\n", content, "<|im_end|>\n"}, 5);
            break;
        case KVM_CHAT_LLAMA2: {
            /* [INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] answer </s><s>[INST] ... */
            bool after_sys = i > 0 && msgs[i - 1].role && !strcmp(msgs[i - 1].role, "system");
            if (!strcmp(role, "system")) rc = sb_strs(&b, (const char *[]){"[INST] <<SYS>>\n", content, "\n<</SYS>>\n\n"}, 3);
            else if (!strcmp(role, "assistant")) rc = sb_strs(&b, (const char *[]){" ", content, " </s><s>"}, 3);
            else rc = sb_strs(&b, (const char *[]){after_sys ? NULL : "[INST] ", content, " [/INST]"}, 3);
            break;
        }
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
    if (m->impl && m->impl->encode) return m->impl->encode(m, system, user, ids, n);
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

kvm_gen_params_t kvm_gen_default_params(void) {
    kvm_gen_params_t p = {0};
    p.max_tokens = KVM_GEN_MAX_TOKENS_DEFAULT;
    p.sampling.top_p = 1.0f;
    p.sampling.repetition_penalty = 1.0f;
    return p;
}

/* ---- decoding ----------------------------------------------------------------------------------- */

int kvm_decode_init(kvm_decode_t *d, const kvm_model_t *m, const kvm_gen_params_t *p, kvm_token_cb cb, void *ud) {
    memset(d, 0, sizeof *d);
    d->m = m;
    d->cb = cb;
    d->ud = ud;
    if (!m || !p) return kvm_seterr(KVM_EINVAL, "generate: no model or no parameters");
    if (p->max_tokens < 1)
        return kvm_seterr(KVM_EINVAL, "generate: max_tokens is %d; it must be at least 1 (KVM_GEN_MAX_TOKENS_DEFAULT = %d is "
                          "the usual cap)", p->max_tokens, KVM_GEN_MAX_TOKENS_DEFAULT);
    if (p->max_total_tokens < 0 || p->n_stop_strings < 0 || p->n_stop_ids < 0 ||
        (p->n_stop_strings > 0 && !p->stop_strings) || (p->n_stop_ids > 0 && !p->stop_ids))
        return kvm_seterr(KVM_EINVAL, "generate: max_total_tokens (%d), n_stop_strings (%d) and n_stop_ids (%d) must be >= 0 "
                          "with their arrays given", p->max_total_tokens, p->n_stop_strings, p->n_stop_ids);
    d->max_tokens = p->max_tokens;
    d->max_total_tokens = p->max_total_tokens;
    if (p->n_stop_strings > 0 && !(d->stop = kvm_calloc((size_t)p->n_stop_strings, sizeof *d->stop))) return KVM_ENOMEM;
    for (int i = 0; i < p->n_stop_strings; i++) {
        const char *ss = p->stop_strings[i];
        if (ss && *ss && !(d->stop[d->n_stop++] = kvm_strdup(ss))) return KVM_ENOMEM;
    }
    int cap = 0;
    if (!p->ignore_eos && ids_put(&d->stop_ids, &d->n_stop_ids, &cap, m->cfg.eos_ids, m->cfg.n_eos)) return KVM_ENOMEM;
    if (p->n_stop_ids > 0 && ids_put(&d->stop_ids, &d->n_stop_ids, &cap, p->stop_ids, p->n_stop_ids)) return KVM_ENOMEM;
    return bytes_put(&d->text, &d->text_len, &d->text_cap, "", 0);
}

int kvm_decode_context(kvm_decode_t *d, const int32_t *ids, int n) {
    if (n <= 0) return 0;
    if (d->n_hist > d->n_ctx) return kvm_seterr(KVM_EINVAL, "decode: context added after output");
    int rc = ids_put(&d->hist, &d->n_hist, &d->cap_hist, ids, n);
    if (!rc) d->n_ctx = d->n_hist;
    return rc;
}

/* The bytes token id adds to the text after prev: the model's own vocabulary (mock model), its
 * tokenizer, or, for a model without one (synthetic weights), the id as "<id>". Nothing (0) for an id
 * the tokenizer cannot show. */
static int token_text(const kvm_decode_t *d, int32_t prev, int32_t id, char *buf, size_t cap) {
    const kvm_model_t *m = d->m;
    int n;
    if (m->impl && m->impl->token_bytes) n = m->impl->token_bytes(m, prev, id, buf, cap);
    else if (m->tok) n = kvm_token_bytes(m->tok, prev, id, buf, cap);
    else n = snprintf(buf, cap, "%s<%d>", d->n_hist - d->n_ctx > 1 ? " " : "", (int)id);
    return n > 0 && (size_t)n < cap ? n : 0;
}

/* Length of the longest end of the text that is a proper beginning of some stop string (held back
 * from the stream until it is known whether it completes one). */
static size_t stop_holdback(const kvm_decode_t *d) {
    size_t best = 0;
    for (int i = 0; i < d->n_stop; i++) {
        size_t sl = strlen(d->stop[i]);
        for (size_t k = sl > 1 ? sl - 1 : 0; k > best; k--)
            if (k <= d->text_len && !memcmp(d->text + d->text_len - k, d->stop[i], k)) {
                best = k;
                break;
            }
    }
    return best;
}

/* Cuts the text at the first stop string that the last nb bytes completed; true if one did. */
static bool cut_stop_string(kvm_decode_t *d, size_t nb) {
    for (int i = 0; i < d->n_stop; i++) {
        /* an earlier occurrence would have stopped an earlier token: search where this one can end */
        size_t sl = strlen(d->stop[i]), from = d->text_len > sl + nb ? d->text_len - sl - nb : 0;
        char *hit = strstr(d->text + from, d->stop[i]);
        if (hit) {
            d->text_len = (size_t)(hit - d->text);
            d->text[d->text_len] = 0;
            return true;
        }
    }
    return false;
}

/* Gives the stream text[shown..upto); returns true if the callback asked to stop. */
static bool show(kvm_decode_t *d, int32_t id, size_t upto) {
    if (!d->cb || d->cb_stopped || upto <= d->shown) return false;
    size_t from = d->shown;
    d->shown = upto;
    d->cb_stopped = d->cb(d->ud, id, d->text + from, upto - from) != 0;
    return d->cb_stopped;
}

int kvm_decode_accept(kvm_decode_t *d, int32_t id, int n_cached, int *stop) {
    *stop = KVM_STOP_NONE;
    for (int i = 0; i < d->n_stop_ids; i++)
        if (d->stop_ids[i] == id) {
            *stop = KVM_STOP_EOS;
            show(d, -1, d->text_len);
            return 0;
        }
    int32_t prev = d->n_hist > 0 ? d->hist[d->n_hist - 1] : -1;
    if (ids_put(&d->hist, &d->n_hist, &d->cap_hist, &id, 1)) return kvm_seterr(KVM_ENOMEM, "decode: out of memory growing the output");
    char piece[256];
    int nb = token_text(d, prev, id, piece, sizeof piece);
    if (bytes_put(&d->text, &d->text_len, &d->text_cap, piece, (size_t)nb))
        return kvm_seterr(KVM_ENOMEM, "decode: out of memory growing the output text");
    bool cut = cut_stop_string(d, (size_t)nb);
    if (show(d, id, cut ? d->text_len : d->text_len - stop_holdback(d))) *stop = KVM_STOP_CALLBACK;
    else if (cut) *stop = KVM_STOP_STRING;
    else if (d->n_hist - d->n_ctx >= d->max_tokens) *stop = KVM_STOP_LENGTH;
    else if (d->max_total_tokens > 0 && n_cached >= d->max_total_tokens) *stop = KVM_STOP_LENGTH;
    else if (d->m->cfg.max_seq_len > 0 && n_cached + 1 > d->m->cfg.max_seq_len) *stop = KVM_STOP_CONTEXT;
    if (*stop == KVM_STOP_LENGTH || *stop == KVM_STOP_CONTEXT) show(d, -1, d->text_len);
    return 0;
}

void kvm_decode_restart(kvm_decode_t *d) {
    d->n_hist = d->n_ctx;
    d->text_len = 0;
    if (d->text) d->text[0] = 0;
}

int32_t *kvm_decode_take_ids(kvm_decode_t *d, int *n) {
    *n = d->n_hist - d->n_ctx;
    int32_t *ids = kvm_malloc((size_t)(*n > 0 ? *n : 1) * sizeof *ids);
    if (ids && *n > 0) memcpy(ids, d->hist + d->n_ctx, (size_t)*n * sizeof *ids);
    if (!ids) *n = 0;
    return ids;
}

char *kvm_decode_take_text(kvm_decode_t *d, size_t *len) {
    char *t = d->text ? d->text : kvm_strdup("");
    if (len) *len = d->text ? d->text_len : 0;
    d->text = NULL;
    d->text_len = d->text_cap = 0;
    return t;
}

void kvm_decode_free(kvm_decode_t *d) {
    if (!d) return;
    for (int i = 0; i < d->n_stop; i++) kvm_free(d->stop[i]);
    kvm_free(d->stop);
    kvm_free(d->stop_ids);
    kvm_free(d->hist);
    kvm_free(d->text);
    memset(d, 0, sizeof *d);
}
