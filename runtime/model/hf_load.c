/* hf_load.c - loads a Hugging Face model directory into a kvm_model_t (see model.h).
 *
 *   config.json                      required: architecture, sizes, RoPE (config.c)
 *   generation_config.json           optional: extra eos ids, sampling defaults
 *   tokenizer_config.json            optional: chat template -> chat format, bos/eos tokens, add_bos_token
 *   chat_template.jinja              optional: the chat template when tokenizer_config.json has none
 *   tokenizer.json                   optional: loaded into m->tok when present (a failure is an error)
 *   model.safetensors                the weights, or
 *   model.safetensors.index.json     {"weight_map": {tensor: shard file}} + the shards
 *
 * Weights are mmapped (m->maps, one mapping per file, each opened once) and the tensors point into the
 * mappings. Every tensor is checked against the shape the config implies; a disagreement names the config
 * field, the tensor, the expected and the found shape. Tensors the model would not use (weights of another
 * architecture, layers beyond num_hidden_layers) are errors too: silently skipping them would compute a
 * different model. Everything m receives (maps, layers, tokenizer) is released by kvm_model_free(), also
 * after a failed load. */
#include "model.h"
#include "safetensors.h"
#include "tokenizer.h"

#include "../core/json.h"
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* config.c */
int kvm__config_add_eos(kvm_config_t *c, const void *json_value, const char *field, const char *path);

#define HF_PATH 4096

typedef struct hf_ctx {
    kvm_model_t *m;
    const char *dir;
    kvm_st_file_t *files; /* [n_files], file i indexes m->maps[i] */
    int n_files;
    char weights_desc[HF_PATH]; /* the file that lists the weights, for "not found" messages */
    cJSON *tok_cfg;             /* tokenizer_config.json, or NULL */
} hf_ctx_t;

/* ---- small helpers ---------------------------------------------------------------------------- */

/* Reads and parses a JSON file. Absent and !required: *out = NULL, returns 0. */
static int hf_read_json(const char *path, bool required, cJSON **out) {
    *out = NULL;
    if (!kvm_file_exists(path)) {
        if (!required) return 0;
        return kvm_seterr(KVM_ENOENT, "%s: not found", path);
    }
    return kvm_json_read_object(path, 256u << 20, NULL, out);
}

static const cJSON *hf_field(const cJSON *o, const char *key) {
    const cJSON *v = o ? cJSON_GetObjectItemCaseSensitive(o, key) : NULL;
    return cJSON_IsNull(v) ? NULL : v;
}

/* An integer JSON number, or false. */
static bool hf_int(const cJSON *v, int *out) {
    if (!cJSON_IsNumber(v) || floor(v->valuedouble) != v->valuedouble || fabs(v->valuedouble) > 2147483647.0) return false;
    *out = (int)v->valuedouble;
    return true;
}

/* A token given as "text" or {"content": "text", ...} (tokenizer_config.json), or NULL. */
static const char *hf_token_text(const cJSON *v) {
    if (cJSON_IsString(v)) return v->valuestring;
    const cJSON *c = cJSON_IsObject(v) ? cJSON_GetObjectItemCaseSensitive(v, "content") : NULL;
    return cJSON_IsString(c) ? c->valuestring : NULL;
}

/* Id of a token text: the tokenizer's, else tokenizer_config.json added_tokens_decoder's; -1 if unknown. */
static int hf_token_id(hf_ctx_t *x, const char *piece) {
    if (!piece) return -1;
    if (x->m->tok) {
        int id = kvm_tokenizer_find(x->m->tok, piece);
        if (id >= 0) return id;
    }
    const cJSON *dec = hf_field(x->tok_cfg, "added_tokens_decoder"), *e;
    if (cJSON_IsObject(dec)) {
        cJSON_ArrayForEach(e, dec) {
            const char *t = hf_token_text(e);
            char *endp = NULL;
            long id = e->string ? strtol(e->string, &endp, 10) : -1;
            if (t && !strcmp(t, piece) && endp && !*endp && id >= 0 && id <= INT_MAX) return (int)id;
        }
    }
    return -1;
}

static void hf_add_eos(kvm_config_t *c, int id) {
    if (id < 0) return;
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] == id) return;
    if (c->n_eos < KVM_MAX_EOS) c->eos_ids[c->n_eos++] = id;
}

/* ---- generation_config.json and tokenizer_config.json ---------------------------------------- */

/* A sampling default of generation_config.json: absent or null leaves *out; otherwise a number in [lo, hi]
 * (integer: also whole and in int range), else an error naming the file and the field. */
static int hf_gen_num(const cJSON *g, const char *key, double lo, double hi, bool integer, double *out, const char *path) {
    const cJSON *v = hf_field(g, key);
    int i;
    if (!v) return 0;
    if (!cJSON_IsNumber(v) || (integer && !hf_int(v, &i)))
        return kvm_seterr(KVM_EFORMAT, "%s: field '%s' must be %s", path, key,
                          integer ? "an integer in int range" : "a number");
    if (!(v->valuedouble >= lo && v->valuedouble <= hi))
        return kvm_seterr(KVM_ERANGE, "%s: field '%s' (%g) is outside [%g, %g]", path, key, v->valuedouble, lo, hi);
    *out = v->valuedouble;
    return 0;
}

/* A token id field of generation_config.json (absent: *out unchanged): an integer inside the vocabulary
 * config.json declares. */
static int hf_gen_id(const cJSON *g, const char *key, int vocab, int *out, const char *path) {
    const cJSON *v = hf_field(g, key);
    if (!v) return 0;
    if (!hf_int(v, out)) return kvm_seterr(KVM_EFORMAT, "%s: field '%s' must be an integer in int range", path, key);
    if (*out < 0 || *out >= vocab)
        return kvm_seterr(KVM_ERANGE, "%s: field '%s' (%d) is outside the vocabulary (config.json vocab_size %d)", path,
                          key, *out, vocab);
    return 0;
}

/* Merges eos ids, a missing bos/pad id and the sampling defaults; every value is checked here, so that an
 * error names generation_config.json and the field (config.json has been validated before). do_sample:
 * false means greedy, which kvmesh spells temperature 0. */
static int hf_merge_generation(kvm_config_t *c, const cJSON *g, const char *path) {
    int n0 = c->n_eos;
    int rc = kvm__config_add_eos(c, hf_field(g, "eos_token_id"), "eos_token_id", path);
    for (int i = n0; !rc && i < c->n_eos; i++)
        if (c->eos_ids[i] < 0 || c->eos_ids[i] >= c->vocab_size)
            rc = kvm_seterr(KVM_ERANGE, "%s: field 'eos_token_id': id %d is outside the vocabulary (config.json "
                            "vocab_size %d)", path, c->eos_ids[i], c->vocab_size);
    int bos = c->bos_id, pad = c->pad_id;
    if (!rc) rc = hf_gen_id(g, "bos_token_id", c->vocab_size, &bos, path);
    if (!rc && hf_field(g, "pad_token_id") && !hf_int(hf_field(g, "pad_token_id"), &pad))
        rc = kvm_seterr(KVM_EFORMAT, "%s: field 'pad_token_id' must be an integer in int range", path);
    if (rc) return rc;
    if (c->bos_id < 0) c->bos_id = bos;
    if (c->pad_id < 0) c->pad_id = pad;
    double t = c->gen_temperature, p = c->gen_top_p, k = c->gen_top_k, r = c->gen_repetition_penalty;
    if ((rc = hf_gen_num(g, "temperature", 0, 1e6, false, &t, path))) return rc;
    if ((rc = hf_gen_num(g, "top_p", 0, 1, false, &p, path))) return rc;
    if ((rc = hf_gen_num(g, "top_k", 0, 2147483647.0, true, &k, path))) return rc;
    if ((rc = hf_gen_num(g, "repetition_penalty", 1e-6, 1e6, false, &r, path))) return rc;
    const cJSON *v = hf_field(g, "do_sample");
    if (v && !cJSON_IsBool(v)) return kvm_seterr(KVM_EFORMAT, "%s: field 'do_sample' must be true or false", path);
    c->gen_temperature = cJSON_IsFalse(v) ? 0.0f : (float)t;
    c->gen_top_p = (float)p;
    c->gen_top_k = (int)k;
    c->gen_repetition_penalty = (float)r;
    return 0;
}

static kvm_chat_format_t hf_chat_format(const char *tmpl) {
    if (!tmpl || !*tmpl) return KVM_CHAT_NONE;
    if (strstr(tmpl, "<|start_header_id|>")) return KVM_CHAT_LLAMA3;
    if (strstr(tmpl, "<|im_start|>")) return KVM_CHAT_CHATML;
    if (strstr(tmpl, "[INST]")) return KVM_CHAT_LLAMA2;
    return KVM_CHAT_NONE;
}

/* The chat template: tokenizer_config.json "chat_template" (a string, or a list of {name, template} where
 * "default" wins), else chat_template.jinja beside it. *owned is set when the text was read from a file. */
static int hf_chat_template(hf_ctx_t *x, const char **tmpl, char **owned) {
    *tmpl = NULL;
    *owned = NULL;
    const cJSON *ct = hf_field(x->tok_cfg, "chat_template"), *e;
    if (cJSON_IsString(ct)) {
        *tmpl = ct->valuestring;
        return 0;
    }
    if (cJSON_IsArray(ct)) {
        cJSON_ArrayForEach(e, ct) {
            const cJSON *n = cJSON_GetObjectItemCaseSensitive(e, "name"), *t = cJSON_GetObjectItemCaseSensitive(e, "template");
            if (!cJSON_IsString(t)) continue;
            if (!*tmpl || (cJSON_IsString(n) && !strcmp(n->valuestring, "default"))) *tmpl = t->valuestring;
        }
        if (*tmpl) return 0;
    }
    char p[HF_PATH];
    int rc = kvm_path_join(p, sizeof p, x->dir, "chat_template.jinja");
    if (rc) return rc;
    if (kvm_file_exists(p)) {
        size_t len;
        if ((rc = kvm_read_file(p, owned, &len, 16u << 20))) return rc;
        *tmpl = *owned;
    }
    return 0;
}

/* Tokenizer files, chat format, bos/eos resolution. */
static int hf_load_tokenizer_side(hf_ctx_t *x) {
    kvm_model_t *m = x->m;
    kvm_config_t *c = &m->cfg;
    char tc_path[HF_PATH], tj_path[HF_PATH];
    int rc;
    if ((rc = kvm_path_join(tc_path, sizeof tc_path, x->dir, "tokenizer_config.json"))) return rc;
    if ((rc = kvm_path_join(tj_path, sizeof tj_path, x->dir, "tokenizer.json"))) return rc;
    if ((rc = hf_read_json(tc_path, false, &x->tok_cfg))) return rc;
    if (kvm_file_exists(tj_path)) {
        m->tok = kvm_tokenizer_load_hf(tj_path, x->tok_cfg ? tc_path : NULL);
        if (!m->tok) {
            rc = kvm_errcode() ? kvm_errcode() : KVM_EFORMAT;
            if (!strstr(kvm_errmsg(), "tokenizer.json")) kvm_errctx(rc, "%s", tj_path);
            return rc;
        }
        int tv = kvm_tokenizer_vocab_size(m->tok);
        if (tv > c->vocab_size)
            return kvm_seterr(KVM_EMODEL, "%s has %d tokens, but config.json has vocab_size = %d: the tokenizer is not "
                              "this model's", tj_path, tv, c->vocab_size);
    }
    const char *tmpl;
    char *owned;
    if ((rc = hf_chat_template(x, &tmpl, &owned))) return rc;
    c->chat_format = hf_chat_format(tmpl);
    kvm_free(owned);

    /* BOS: tokenizer_config.json decides when it names one (null = none); Qwen has none even though its
     * config.json lists <|endoftext|> as bos_token_id. */
    const cJSON *tc = x->tok_cfg;
    const cJSON *bos = tc ? cJSON_GetObjectItemCaseSensitive(tc, "bos_token") : NULL;
    if (bos && cJSON_IsNull(bos)) {
        c->bos_id = -1;
    } else if (hf_token_text(bos)) {
        int id = hf_token_id(x, hf_token_text(bos));
        if (id >= 0) c->bos_id = id;
    } else if (c->arch == KVM_ARCH_QWEN2 || c->arch == KVM_ARCH_QWEN3) {
        c->bos_id = -1;
    }
    const cJSON *ab = hf_field(tc, "add_bos_token");
    if (ab && !cJSON_IsBool(ab)) return kvm_seterr(KVM_EFORMAT, "%s: field 'add_bos_token' must be true or false", tc_path);
    if (c->bos_id < 0) c->add_bos = false;
    else if (m->tok) c->add_bos = kvm_tokenizer_adds_bos(m->tok);
    else if (ab) c->add_bos = cJSON_IsTrue(ab);
    else c->add_bos = c->arch == KVM_ARCH_LLAMA || c->arch == KVM_ARCH_MISTRAL;

    /* EOS: the tokenizer's eos token and the chat format's end-of-turn token */
    hf_add_eos(c, hf_token_id(x, hf_token_text(hf_field(tc, "eos_token"))));
    if (c->chat_format == KVM_CHAT_LLAMA3) hf_add_eos(c, hf_token_id(x, "<|eot_id|>"));
    if (c->chat_format == KVM_CHAT_CHATML) hf_add_eos(c, hf_token_id(x, "<|im_end|>"));
    return 0;
}

/* ---- weight files ----------------------------------------------------------------------------- */

/* A shard name from weight_map must stay inside the model directory. */
static bool hf_safe_name(const char *s) {
    return *s && s[0] != '/' && s[0] != '.' && !strstr(s, "/") && !strstr(s, "\\");
}

static int hf_open_one(hf_ctx_t *x, int i, const char *name) {
    char p[HF_PATH];
    int rc = kvm_path_join(p, sizeof p, x->dir, name);
    if (rc) return rc;
    if ((rc = kvm_mmap_open(&x->m->maps[i], p))) return rc;
    x->m->n_maps = i + 1;
    rc = kvm_st_parse(&x->files[i], x->m->maps[i].data, x->m->maps[i].size, p, 0);
    if (rc) return rc;
    x->n_files = i + 1;
    return 0;
}

static int hf_open_sharded(hf_ctx_t *x, const char *index_path) {
    cJSON *idx = NULL;
    int rc = hf_read_json(index_path, true, &idx);
    if (rc) return rc;
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(idx, "weight_map"), *e;
    const char **names = NULL;
    int n = 0;
    if (!cJSON_IsObject(wm) || !wm->child) {
        rc = kvm_seterr(KVM_EFORMAT, "%s: no 'weight_map' object naming the shard of each tensor", index_path);
        goto out;
    }
    names = kvm_calloc((size_t)cJSON_GetArraySize(wm), sizeof *names);
    if (!names) { rc = KVM_ENOMEM; goto out; }
    cJSON_ArrayForEach(e, wm) {
        if (!cJSON_IsString(e) || !hf_safe_name(e->valuestring)) {
            rc = kvm_seterr(KVM_EFORMAT, "%s: weight_map entry for tensor '%s' must be a file name in the model directory",
                            index_path, e->string ? e->string : "?");
            goto out;
        }
        bool seen = false;
        for (int i = 0; i < n && !seen; i++) seen = !strcmp(names[i], e->valuestring);
        if (!seen) names[n++] = e->valuestring;
    }
    x->m->maps = kvm_calloc((size_t)n, sizeof *x->m->maps);
    x->files = kvm_calloc((size_t)n, sizeof *x->files);
    if (!x->m->maps || !x->files) { rc = KVM_ENOMEM; goto out; }
    for (int i = 0; i < n; i++) {
        if ((rc = hf_open_one(x, i, names[i]))) {
            if (rc == KVM_ENOENT) kvm_errctx(rc, "%s names shard %s", index_path, names[i]);
            goto out;
        }
    }
    /* the index and the shards must agree, and a tensor lives in one shard only */
    cJSON_ArrayForEach(e, wm) {
        int s = 0;
        while (strcmp(names[s], e->valuestring)) s++;
        if (!kvm_st_find(&x->files[s], e->string)) {
            rc = kvm_seterr(KVM_EFORMAT, "%s: weight_map puts tensor '%s' in %s, which does not contain it", index_path,
                            e->string, names[s]);
            goto out;
        }
    }
    for (int i = 1; i < x->n_files; i++) {
        for (int k = 0; k < x->files[i].n_tensors; k++) {
            for (int j = 0; j < i; j++) {
                if (kvm_st_find(&x->files[j], x->files[i].tensors[k].name)) {
                    rc = kvm_seterr(KVM_EFORMAT, "%s: tensor '%s' is in two shards, %s and %s", index_path,
                                    x->files[i].tensors[k].name, x->files[j].path, x->files[i].path);
                    goto out;
                }
            }
        }
    }
out:
    kvm_free(names);
    cJSON_Delete(idx);
    return rc;
}

static int hf_open_weights(hf_ctx_t *x) {
    char single[HF_PATH], index[HF_PATH], pt[HF_PATH];
    int rc;
    if ((rc = kvm_path_join(single, sizeof single, x->dir, "model.safetensors"))) return rc;
    if ((rc = kvm_path_join(index, sizeof index, x->dir, "model.safetensors.index.json"))) return rc;
    if (kvm_file_exists(single)) {
        snprintf(x->weights_desc, sizeof x->weights_desc, "%s", single);
        x->m->maps = kvm_calloc(1, sizeof *x->m->maps);
        x->files = kvm_calloc(1, sizeof *x->files);
        if (!x->m->maps || !x->files) return KVM_ENOMEM;
        return hf_open_one(x, 0, "model.safetensors");
    }
    if (kvm_file_exists(index)) {
        snprintf(x->weights_desc, sizeof x->weights_desc, "%s", index);
        return hf_open_sharded(x, index);
    }
    if ((rc = kvm_path_join(pt, sizeof pt, x->dir, "pytorch_model.bin"))) return rc;
    if (kvm_file_exists(pt))
        return kvm_seterr(KVM_EUNSUPPORTED, "%s: PyTorch pickle weights are not read; save the model with safetensors "
                          "(save_pretrained(..., safe_serialization=True))", pt);
    return kvm_seterr(KVM_ENOENT, "%s: no model.safetensors or model.safetensors.index.json", x->dir);
}

/* The tensor called name in any weight file (marked used), and the index of its file. */
static kvm_st_tensor_t *hf_take(hf_ctx_t *x, const char *name, int *file) {
    for (int i = 0; i < x->n_files; i++) {
        kvm_st_tensor_t *t = kvm_st_take(&x->files[i], name);
        if (t) {
            *file = i;
            return t;
        }
    }
    return NULL;
}

/* Fetches tensor name into *out and checks it has shape [d0] or [d0, d1], where f0/f1 say which config
 * fields give the expected sizes. A missing tensor is KVM_ENOENT (hint says why it is needed); a shape that
 * disagrees is KVM_ESHAPE naming the config field, the tensor, expected and found shapes. */
static int hf_get(hf_ctx_t *x, kvm_tensor_t *out, const char *name, int ndim, int64_t d0, const char *f0, int64_t d1,
                  const char *f1, const char *hint) {
    int fi = 0;
    memset(out, 0, sizeof *out);
    kvm_st_tensor_t *t = hf_take(x, name, &fi);
    if (!t)
        return kvm_seterr(KVM_ENOENT, "%s: tensor '%s' not found%s%s%s", x->weights_desc, name, hint ? " (" : "",
                          hint ? hint : "", hint ? ")" : "");
    const char *file = x->files[fi].path;
    int rc = kvm_st_view(t, out, file);
    if (rc) return rc;
    rc = kvm_tensor_check(out, name, ndim, d0, d1);
    if (rc != KVM_ESHAPE) return rc ? kvm_errctx(rc, "%s", file) : 0;
    char found[96];
    size_t n = (size_t)snprintf(found, sizeof found, "[");
    for (int i = 0; i < t->ndim && n < sizeof found; i++)
        n += (size_t)snprintf(found + n, sizeof found - n, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (n < sizeof found) snprintf(found + n, sizeof found - n, "]");
    char expect[160];
    if (ndim == 1) snprintf(expect, sizeof expect, "[%s] = [%lld]", f0, (long long)d0);
    else snprintf(expect, sizeof expect, "[%s, %s] = [%lld, %lld]", f0, f1, (long long)d0, (long long)d1);
    if (t->ndim != ndim)
        return kvm_seterr(KVM_ESHAPE, "%s: tensor '%s' has shape %s, but config.json implies %s", file, name, found, expect);
    int k = t->shape[0] != d0 ? 0 : 1;
    return kvm_seterr(KVM_ESHAPE,
                      "%s: tensor '%s' has shape %s, but config.json implies %s: config.json %s = %lld disagrees with "
                      "the tensor's dimension %d (%lld)",
                      file, name, found, expect, k ? f1 : f0, (long long)(k ? d1 : d0), k, (long long)t->shape[k]);
}

/* ---- the weights ------------------------------------------------------------------------------ */

static int hf_map_weights(hf_ctx_t *x) {
    kvm_model_t *m = x->m;
    const kvm_config_t *c = &m->cfg;
    const int64_t D = c->dim, F = c->hidden_dim, V = c->vocab_size, QD = (int64_t)c->n_heads * c->head_dim,
                  KD = (int64_t)c->n_kv_heads * c->head_dim, HD = c->head_dim;
    int rc;
    if ((rc = hf_get(x, &m->w.tok_emb, "model.embed_tokens.weight", 2, V, "vocab_size", D, "hidden_size", NULL))) return rc;
    if ((rc = hf_get(x, &m->w.final_norm, "model.norm.weight", 1, D, "hidden_size", 0, NULL, NULL))) return rc;
    if (c->tied_embeddings) {
        int fi;
        if (hf_take(x, "lm_head.weight", &fi))
            KVM_LOGD("%s: lm_head.weight ignored: tie_word_embeddings is true (as in transformers)", x->dir);
        m->w.lm_head = m->w.tok_emb;
    } else if ((rc = hf_get(x, &m->w.lm_head, "lm_head.weight", 2, V, "vocab_size", D, "hidden_size",
                            "config.json has tie_word_embeddings: false"))) {
        return rc;
    }
    m->w.layers = kvm_calloc((size_t)c->n_layers, sizeof *m->w.layers);
    if (!m->w.layers) return KVM_ENOMEM;
    char hint[96], nm[160];
    snprintf(hint, sizeof hint, "config.json has num_hidden_layers = %d", c->n_layers);
    const char *qd = "num_attention_heads*head_dim", *kd = "num_key_value_heads*head_dim";
    for (int l = 0; l < c->n_layers; l++) {
        kvm_layer_weights_t *lw = &m->w.layers[l];
#define GET(field, suffix, nd, a, fa, b, fb, h)                                                                  \
        snprintf(nm, sizeof nm, "model.layers.%d.%s", l, suffix);                                                 \
        if ((rc = hf_get(x, &lw->field, nm, nd, a, fa, b, fb, h))) return rc
        GET(attn_norm, "input_layernorm.weight", 1, D, "hidden_size", 0, NULL, hint);
        GET(wq, "self_attn.q_proj.weight", 2, QD, qd, D, "hidden_size", hint);
        GET(wk, "self_attn.k_proj.weight", 2, KD, kd, D, "hidden_size", hint);
        GET(wv, "self_attn.v_proj.weight", 2, KD, kd, D, "hidden_size", hint);
        GET(wo, "self_attn.o_proj.weight", 2, D, "hidden_size", QD, qd, hint);
        if (c->qkv_bias) {
            const char *bh = "Qwen2ForCausalLM has q/k/v projection biases";
            GET(bq, "self_attn.q_proj.bias", 1, QD, qd, 0, NULL, bh);
            GET(bk, "self_attn.k_proj.bias", 1, KD, kd, 0, NULL, bh);
            GET(bv, "self_attn.v_proj.bias", 1, KD, kd, 0, NULL, bh);
        }
        if (c->qk_norm) {
            const char *nh = "Qwen3ForCausalLM has per-head q_norm/k_norm";
            GET(q_norm, "self_attn.q_norm.weight", 1, HD, "head_dim", 0, NULL, nh);
            GET(k_norm, "self_attn.k_norm.weight", 1, HD, "head_dim", 0, NULL, nh);
        }
        GET(ffn_norm, "post_attention_layernorm.weight", 1, D, "hidden_size", 0, NULL, hint);
        GET(w_gate, "mlp.gate_proj.weight", 2, F, "intermediate_size", D, "hidden_size", hint);
        GET(w_up, "mlp.up_proj.weight", 2, F, "intermediate_size", D, "hidden_size", hint);
        GET(w_down, "mlp.down_proj.weight", 2, D, "hidden_size", F, "intermediate_size", hint);
#undef GET
    }
    /* Whatever is left over means the config describes another model than the weights. */
    for (int i = 0; i < x->n_files; i++) {
        for (int k = 0; k < x->files[i].n_tensors; k++) {
            const kvm_st_tensor_t *t = &x->files[i].tensors[k];
            if (t->used) continue;
            size_t nl = strlen(t->name);
            if (nl >= 19 && !strcmp(t->name + nl - 19, "rotary_emb.inv_freq")) continue; /* old checkpoints */
            int l;
            if (sscanf(t->name, "model.layers.%d.", &l) == 1 && l >= c->n_layers)
                return kvm_seterr(KVM_EMODEL, "%s: holds tensor '%s', but config.json has num_hidden_layers = %d",
                                  x->files[i].path, t->name, c->n_layers);
            return kvm_seterr(KVM_EMODEL,
                              "%s: tensor '%s' is not part of a %s model: config.json's architectures (or attention_bias, "
                              "tie_word_embeddings) disagree with the weights",
                              x->files[i].path, t->name, c->arch_name);
        }
    }
    m->cfg.weight_dtype = m->w.layers[0].wq.dtype;
    return 0;
}

/* ---- entry point ------------------------------------------------------------------------------ */

static void hf_set_name(kvm_model_t *m, const char *dir) {
    char buf[HF_PATH];
    const char *p = dir;
    if (realpath(dir, buf)) p = buf;
    size_t n = strlen(p);
    while (n > 1 && p[n - 1] == '/') n--;
    size_t b = n;
    while (b > 0 && p[b - 1] != '/') b--;
    size_t len = n - b < sizeof m->name - 1 ? n - b : sizeof m->name - 1;
    memcpy(m->name, p + b, len);
    m->name[len] = 0;
}

int kvm_load_hf(kvm_model_t *m, const char *dir) {
    hf_ctx_t x = {.m = m, .dir = dir};
    char path[HF_PATH];
    cJSON *gen = NULL;
    int rc;
    if (!kvm_dir_exists(dir)) return kvm_seterr(KVM_ENOENT, "%s: not a directory", dir);
    hf_set_name(m, dir);
    if ((rc = kvm_path_join(path, sizeof path, dir, "config.json"))) return rc;
    if (!kvm_file_exists(path))
        return kvm_seterr(KVM_ENOENT, "%s: no config.json, so this is not a Hugging Face model directory", dir);
    char *text = NULL;
    if ((rc = kvm_read_file(path, &text, NULL, 16u << 20))) return rc;
    rc = kvm_config_parse_hf(&m->cfg, text, path);
    kvm_free(text);
    if (rc) return rc;

    if ((rc = kvm_config_validate(&m->cfg, path))) return rc; /* config.json's own values, blamed on it */
    if ((rc = kvm_path_join(path, sizeof path, dir, "generation_config.json"))) goto out;
    if ((rc = hf_read_json(path, false, &gen))) goto out;
    if (gen && (rc = hf_merge_generation(&m->cfg, gen, path))) goto out;
    if ((rc = hf_load_tokenizer_side(&x))) goto out;
    /* only the bos/eos ids tokenizer_config.json gave can have changed since config.json was validated */
    if ((rc = kvm_path_join(path, sizeof path, dir, "tokenizer_config.json"))) goto out;
    if ((rc = kvm_config_validate(&m->cfg, path))) goto out;
    if ((rc = hf_open_weights(&x))) goto out;
    if ((rc = hf_map_weights(&x))) goto out;
out:
    for (int i = 0; i < x.n_files; i++) kvm_st_close(&x.files[i]); /* the index only: m->maps keeps the mappings */
    kvm_free(x.files);
    cJSON_Delete(gen);
    cJSON_Delete(x.tok_cfg);
    return rc;
}
