/* model_api.c - the public model, tokenizer and generation API of include/kvmesh.h over runtime/model:
 * model information, tokenizers loaded on their own, and one-call generation from a text prompt. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forward.h"
#include "generate.h"
#include "model.h"
#include "tokenizer.h"

/* ---- models ------------------------------------------------------------------------------------- */

void kvm_model_info(const kvm_model_t *m, kvm_model_info_t *out) {
    const kvm_config_t *c = &m->cfg;
    memset(out, 0, sizeof *out);
    *out = (kvm_model_info_t){.name = m->name, .arch = c->arch_name, .backend = m->ops ? m->ops->name : "none",
                              .chat_format = kvm_chat_format_name(c->chat_format),
                              .tokenizer = m->tok ? kvm_tokenizer_kind(m->tok) : "none",
                              .weight_dtype = c->weight_dtype == KVM_F32   ? "f32"
                                              : c->weight_dtype == KVM_F16 ? "f16"
                                                                           : "bf16",
                              .n_layers = c->n_layers, .dim = c->dim, .hidden_dim = c->hidden_dim,
                              .n_heads = c->n_heads, .n_kv_heads = c->n_kv_heads, .head_dim = c->head_dim,
                              .vocab_size = c->vocab_size, .max_context = c->max_seq_len, .bos_id = c->bos_id};
    int n = c->n_eos < (int)(sizeof out->eos_ids / sizeof *out->eos_ids) ? c->n_eos : (int)(sizeof out->eos_ids / sizeof *out->eos_ids);
    for (int i = 0; i < n; i++) out->eos_ids[i] = c->eos_ids[i];
    out->n_eos = n;
}

const kvm_tokenizer_t *kvm_model_tokenizer(const kvm_model_t *m) { return m->tok; }

/* ---- tokenizers loaded on their own -------------------------------------------------------------- */

static bool ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

/* Counts the entries of a llama2.c tokenizer.bin (they must end exactly at the end of the file); -1 if they
 * do not. */
static int count_bin_entries(const char *path) {
    kvm_mmap_t f;
    if (kvm_mmap_open(&f, path)) return -1;
    const unsigned char *data = f.data;
    size_t off = 4, size = f.size;
    int n = 0;
    while (off + 8 <= size) {
        int32_t len;
        memcpy(&len, data + off + 4, 4);
        if (len < 0 || (size_t)len > size - off - 8) break;
        off += 8 + (size_t)len;
        n++;
    }
    kvm_mmap_close(&f);
    return off == size ? n : -1;
}

/* The tokenizer_config.json beside a tokenizer.json, if there is one (buf receives the path). */
static const char *sibling_config(const char *json_path, char *buf, size_t cap) {
    const char *slash = strrchr(json_path, '/');
    size_t dl = slash ? (size_t)(slash - json_path) : 0;
    if (dl + 32 > cap) return NULL;
    if (slash) memcpy(buf, json_path, dl);
    snprintf(buf + dl, cap - dl, "%stokenizer_config.json", slash ? "/" : "");
    return kvm_file_exists(buf) ? buf : NULL;
}

kvm_tokenizer_t *kvm_tokenizer_load(const char *path, int vocab_size) {
    char jp[4096], cp[4096];
    if (!path || !*path) {
        kvm_seterr(KVM_EINVAL, "no tokenizer path given");
        return NULL;
    }
    if (kvm_dir_exists(path)) {
        if (kvm_path_join(jp, sizeof jp, path, "tokenizer.json")) return NULL;
        if (!kvm_file_exists(jp)) {
            kvm_seterr(KVM_ENOENT, "%s: no tokenizer.json in this model directory", path);
            return NULL;
        }
        return kvm_tokenizer_load_hf(jp, sibling_config(jp, cp, sizeof cp));
    }
    if (ends_with(path, ".json")) return kvm_tokenizer_load_hf(path, sibling_config(path, cp, sizeof cp));
    if (vocab_size < 0) {
        kvm_seterr(KVM_EINVAL, "%s: vocab_size %d is negative", path, vocab_size);
        return NULL;
    }
    if (vocab_size == 0 && (vocab_size = count_bin_entries(path)) <= 0) {
        kvm_seterr(KVM_EFORMAT, "%s: not a tokenizer.json, and its llama2.c tokenizer.bin entries cannot be counted "
                   "(give the vocabulary size)", path);
        return NULL;
    }
    return kvm_tokenizer_load_bin(path, vocab_size);
}

/* ---- generation ------------------------------------------------------------------------------------ */

kvm_generate_params_t kvm_generate_default_params(void) {
    return (kvm_generate_params_t){.max_tokens = 256, .temperature = -1.0f, .top_p = 1.0f, .repetition_penalty = 1.0f};
}

static int check_generate_params(const kvm_generate_params_t *p) {
    if (p->max_tokens < 1) return kvm_seterr(KVM_EINVAL, "max_tokens: %d, must be at least 1", p->max_tokens);
    if (p->max_total_tokens < 0) return kvm_seterr(KVM_EINVAL, "max_total_tokens: %d is negative", p->max_total_tokens);
    if (p->top_k < 0) return kvm_seterr(KVM_EINVAL, "top_k: %d is negative", p->top_k);
    if (!(p->top_p > 0 && p->top_p <= 1)) return kvm_seterr(KVM_EINVAL, "top_p: %g is not in (0, 1]", (double)p->top_p);
    if (!(p->repetition_penalty > 0)) return kvm_seterr(KVM_EINVAL, "repetition_penalty: %g must be > 0", (double)p->repetition_penalty);
    if (p->n_stop < 0 || (p->n_stop > 0 && !p->stop)) return kvm_seterr(KVM_EINVAL, "n_stop: %d without stop strings", p->n_stop);
    return 0;
}

typedef struct gen_stream {
    kvm_token_fn fn;
    void *ud;
} gen_stream_t;

static int stream_cb(void *ud, int32_t id, const char *bytes, size_t n) {
    gen_stream_t *s = ud;
    return s->fn ? s->fn(s->ud, id, bytes, n) : 0;
}

int kvm_seq_generate(kvm_model_t *m, kvm_seq_t *seq, const int32_t *prompt, int n_prompt,
                     const kvm_generate_params_t *params, kvm_token_fn fn, void *ud, kvm_generation_t *out) {
    const kvm_generate_params_t def = kvm_generate_default_params();
    const kvm_generate_params_t *p = params ? params : &def;
    memset(out, 0, sizeof *out);
    int rc = check_generate_params(p);
    if (rc) return rc;
    kvm_gen_params_t gp = {.max_tokens = p->max_tokens, .max_total_tokens = p->max_total_tokens,
                           .sampling = {.temperature = p->temperature, .top_k = p->top_k, .top_p = p->top_p,
                                        .repetition_penalty = p->repetition_penalty, .seed = p->seed},
                           .stop_strings = p->stop, .n_stop_strings = p->n_stop, .ignore_eos = p->ignore_eos};
    if (gp.sampling.temperature < 0) gp.sampling.temperature = m->cfg.gen_temperature > 0 ? m->cfg.gen_temperature : 0;
    gen_stream_t s = {fn, ud};
    return kvm_generate(m, seq, prompt, n_prompt, &gp, fn ? stream_cb : NULL, &s, out);
}

int kvm_model_generate(kvm_model_t *m, const char *prompt, const kvm_generate_params_t *params, kvm_token_fn fn,
                       void *ud, kvm_generation_t *out) {
    const kvm_generate_params_t def = kvm_generate_default_params();
    const kvm_generate_params_t *p = params ? params : &def;
    memset(out, 0, sizeof *out);
    if (!prompt) return kvm_seterr(KVM_EINVAL, "no prompt given");
    int rc = check_generate_params(p);
    if (rc) return rc;
    int32_t *ids = NULL;
    int n = 0;
    rc = kvm_prompt_encode(m, p->system, prompt, p->chat, &ids, &n);
    kvm_kv_pool_t *pool = rc ? NULL : kvm_model_kv_pool(m, 0);
    if (!rc && !pool) rc = kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    if (!rc) {
        kvm_seq_t seq;
        kvm_seq_init(&seq, pool);
        rc = kvm_seq_generate(m, &seq, ids, n, p, fn, ud, out);
        kvm_seq_free(&seq);
        out->n_prompt = n;
    }
    kvm_free(ids);
    kvm_kv_pool_free(pool);
    return rc;
}

int kvm_model_generate_ids(kvm_model_t *m, const int32_t *ids, int n, const kvm_generate_params_t *params, kvm_token_fn fn,
                           void *ud, kvm_generation_t *out) {
    memset(out, 0, sizeof *out);
    if (!m || !ids || n < 1) return kvm_seterr(KVM_EINVAL, "kvm_model_generate_ids: no model or no token ids");
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m->cfg.vocab_size)
            return kvm_seterr(KVM_ERANGE, "token id %d at index %d is outside [0, %d)", (int)ids[i], i, m->cfg.vocab_size);
    kvm_kv_pool_t *pool = kvm_model_kv_pool(m, 0);
    if (!pool) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    kvm_seq_t seq;
    kvm_seq_init(&seq, pool);
    int rc = kvm_seq_generate(m, &seq, ids, n, params, fn, ud, out);
    out->n_prompt = n;
    kvm_seq_free(&seq);
    kvm_kv_pool_free(pool);
    return rc;
}

void kvm_generation_clear(kvm_generation_t *g) { kvm_gen_result_free(g); }
