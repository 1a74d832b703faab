/* config.c - Hugging Face config.json -> kvm_config_t, config validation, tensor shape checks.
 *
 * What is read (docs/formats.md has the full table): architectures (LlamaForCausalLM, MistralForCausalLM,
 * Qwen2ForCausalLM, Qwen3ForCausalLM), the sizes, rms_norm_eps, the RoPE settings in every place
 * transformers has put them over the years (top-level rope_theta + rope_scaling {type|rope_type}; since
 * transformers 5, rope_parameters {rope_type, rope_theta, ...}), tie_word_embeddings, bos/eos/pad ids and
 * torch_dtype/dtype. Anything that would change the computation and that kvmesh does not implement (another
 * activation, o_proj or MLP biases, sliding-window layers, yarn/dynamic/longrope RoPE) is refused with
 * KVM_EUNSUPPORTED naming the field, rather than silently computing a different model. */
#include "model.h"

#include "../core/json.h"
#include <math.h>
#include <stdio.h>
#include <string.h>

/* ---- JSON field helpers (messages name the file and the field) --------------------------------- */

static const char *cfg_json_type(const cJSON *v) {
    if (cJSON_IsNull(v)) return "null";
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsArray(v)) return "an array";
    if (cJSON_IsObject(v)) return "an object";
    return "invalid";
}

/* A present, non-null field, or NULL. */
static const cJSON *cfg_field(const cJSON *o, const char *key) {
    const cJSON *v = o ? cJSON_GetObjectItemCaseSensitive(o, key) : NULL;
    return cJSON_IsNull(v) ? NULL : v;
}

/* Reads a number field. Absent or null: *out = def and returns 0 when !required, else KVM_EFORMAT. */
static int cfg_num(const cJSON *o, const char *key, const char *prefix, bool required, double def, double *out,
                   const char *path) {
    const cJSON *v = cfg_field(o, key);
    if (!v) {
        if (required) return kvm_seterr(KVM_EFORMAT, "%s: required field '%s%s' is missing", path, prefix, key);
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v))
        return kvm_seterr(KVM_EFORMAT, "%s: field '%s%s' must be a number (found %s)", path, prefix, key, cfg_json_type(v));
    *out = v->valuedouble;
    return 0;
}

/* A JSON number that is a whole number in int range (a cast of anything else would wrap or be undefined). */
static bool cfg_is_int(const cJSON *v) {
    return cJSON_IsNumber(v) && floor(v->valuedouble) == v->valuedouble && fabs(v->valuedouble) <= 2147483647.0;
}

/* Reads an integer field as cfg_num does; a present value that is not a whole number in int range is
 * KVM_EFORMAT. */
static int cfg_int(const cJSON *o, const char *key, const char *prefix, bool required, int def, int *out,
                   const char *path) {
    const cJSON *v = cfg_field(o, key);
    if (v && !cfg_is_int(v))
        return kvm_seterr(KVM_EFORMAT, "%s: field '%s%s' must be an integer (found %s)", path, prefix, key,
                          cJSON_IsNumber(v) ? "a number that is not an integer in int range" : cfg_json_type(v));
    double d = 0;
    int rc = cfg_num(o, key, prefix, required, def, &d, path);
    if (!rc) *out = (int)d;
    return rc;
}

static int cfg_bool(const cJSON *o, const char *key, bool def, bool *out, const char *path) {
    const cJSON *v = cfg_field(o, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsBool(v))
        return kvm_seterr(KVM_EFORMAT, "%s: field '%s' must be true or false (found %s)", path, key, cfg_json_type(v));
    *out = cJSON_IsTrue(v);
    return 0;
}

/* ---- RoPE ------------------------------------------------------------------------------------- */

/* Reads the RoPE block. transformers 5 writes rope_parameters {rope_type, rope_theta, factor, ...}; older
 * configs write rope_theta at the top level and rope_scaling {type | rope_type, factor, ...} or null. */
static int cfg_parse_rope(kvm_config_t *c, const cJSON *root, const char *path) {
    const cJSON *rp = cfg_field(root, "rope_parameters");
    const cJSON *rs = cfg_field(root, "rope_scaling");
    const char *where = "rope_parameters";
    const cJSON *blk = rp;
    if (blk && !cJSON_IsObject(blk))
        return kvm_seterr(KVM_EFORMAT, "%s: field 'rope_parameters' must be an object (found %s)", path, cfg_json_type(blk));
    if (!blk) {
        blk = rs;
        where = "rope_scaling";
        if (blk && !cJSON_IsObject(blk))
            return kvm_seterr(KVM_EFORMAT, "%s: field 'rope_scaling' must be an object or null (found %s)", path,
                              cfg_json_type(blk));
    }
    char prefix[32];
    snprintf(prefix, sizeof prefix, "%s.", where);
    /* theta: the block's own rope_theta (transformers 5) wins over the top-level one */
    int rc;
    double theta = 10000.0;
    if ((rc = cfg_num(root, "rope_theta", "", false, 10000.0, &theta, path))) return rc;
    if (blk && cfg_field(blk, "rope_theta") && (rc = cfg_num(blk, "rope_theta", prefix, true, 0, &theta, path))) return rc;
    c->rope_theta = theta;
    c->rope_scaling = KVM_ROPE_SCALING_NONE;
    c->rope_factor = 1.0;
    if (!blk) return 0;
    const cJSON *ty = cfg_field(blk, "rope_type");
    if (!ty) ty = cfg_field(blk, "type");
    if (!ty) {
        /* per-layer-type blocks ({"full_attention": {...}, "sliding_attention": {...}}) are not for our archs */
        const cJSON *ch;
        cJSON_ArrayForEach(ch, blk) {
            if (cJSON_IsObject(ch))
                return kvm_seterr(KVM_EUNSUPPORTED, "%s: per-layer-type RoPE settings ('%s%s') are not supported", path,
                                  prefix, ch->string);
        }
        return 0; /* only rope_theta: default RoPE */
    }
    if (!cJSON_IsString(ty))
        return kvm_seterr(KVM_EFORMAT, "%s: field '%srope_type' must be a string (found %s)", path, prefix, cfg_json_type(ty));
    const char *t = ty->valuestring;
    if (!strcmp(t, "default")) return 0;
    if (!strcmp(t, "linear")) {
        c->rope_scaling = KVM_ROPE_SCALING_LINEAR;
        return cfg_num(blk, "factor", prefix, true, 0, &c->rope_factor, path);
    }
    if (!strcmp(t, "llama3")) {
        c->rope_scaling = KVM_ROPE_SCALING_LLAMA3;
        if ((rc = cfg_num(blk, "factor", prefix, true, 0, &c->rope_factor, path))) return rc;
        if ((rc = cfg_num(blk, "low_freq_factor", prefix, true, 0, &c->rope_low_freq_factor, path))) return rc;
        if ((rc = cfg_num(blk, "high_freq_factor", prefix, true, 0, &c->rope_high_freq_factor, path))) return rc;
        return cfg_int(blk, "original_max_position_embeddings", prefix, true, 0, &c->rope_original_max_pos, path);
    }
    return kvm_seterr(KVM_EUNSUPPORTED,
                      "%s: %srope_type '%s' is not supported (kvmesh implements default, linear and llama3 RoPE)", path,
                      prefix, t);
}

/* ---- config.json ------------------------------------------------------------------------------ */

static int cfg_add_eos_json(kvm_config_t *c, const cJSON *v, const char *field, const char *path) {
    if (!v || cJSON_IsNull(v)) return 0;
    const cJSON *it;
    if (cJSON_IsArray(v)) {
        cJSON_ArrayForEach(it, v) {
            if (!cfg_is_int(it))
                return kvm_seterr(KVM_EFORMAT, "%s: field '%s' must be an integer or a list of integers (an item is %s)",
                                  path, field, cJSON_IsNumber(it) ? "not an integer in int range" : cfg_json_type(it));
            int id = (int)it->valuedouble;
            bool dup = false;
            for (int i = 0; i < c->n_eos; i++) dup |= c->eos_ids[i] == id;
            if (dup) continue;
            if (c->n_eos == KVM_MAX_EOS) {
                KVM_LOGW("%s: more than %d end-of-sequence ids; %d ignored", path, KVM_MAX_EOS, id);
                continue;
            }
            c->eos_ids[c->n_eos++] = id;
        }
        return 0;
    }
    if (!cfg_is_int(v))
        return kvm_seterr(KVM_EFORMAT, "%s: field '%s' must be an integer or a list of integers (found %s)", path, field,
                          cJSON_IsNumber(v) ? "a number that is not an integer in int range" : cfg_json_type(v));
    int id = (int)v->valuedouble;
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] == id) return 0;
    if (c->n_eos < KVM_MAX_EOS) c->eos_ids[c->n_eos++] = id;
    return 0;
}

/* Internal (hf_load.c): merges an eos_token_id value (int or list) into cfg. */
int kvm__config_add_eos(kvm_config_t *c, const void *json_value, const char *field, const char *path);
int kvm__config_add_eos(kvm_config_t *c, const void *json_value, const char *field, const char *path) {
    return cfg_add_eos_json(c, (const cJSON *)json_value, field, path);
}

static const struct {
    const char *name;
    kvm_arch_t arch;
    const char *model_type;
} k_archs[] = {
    {"LlamaForCausalLM", KVM_ARCH_LLAMA, "llama"},
    {"MistralForCausalLM", KVM_ARCH_MISTRAL, "mistral"},
    {"Qwen2ForCausalLM", KVM_ARCH_QWEN2, "qwen2"},
    {"Qwen3ForCausalLM", KVM_ARCH_QWEN3, "qwen3"},
};

static int cfg_parse_arch(kvm_config_t *c, const cJSON *root, const char *path) {
    const cJSON *a = cfg_field(root, "architectures");
    const char *name = NULL;
    if (a) {
        if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) < 1 || !cJSON_IsString(cJSON_GetArrayItem(a, 0)))
            return kvm_seterr(KVM_EFORMAT, "%s: field 'architectures' must be a list of class names", path);
        name = cJSON_GetArrayItem(a, 0)->valuestring;
        for (size_t i = 0; i < sizeof k_archs / sizeof k_archs[0]; i++) {
            if (!strcmp(name, k_archs[i].name)) {
                c->arch = k_archs[i].arch;
                snprintf(c->arch_name, sizeof c->arch_name, "%s", name);
                return 0;
            }
        }
    } else {
        const cJSON *mt = cfg_field(root, "model_type");
        if (!cJSON_IsString(mt))
            return kvm_seterr(KVM_EFORMAT, "%s: neither 'architectures' nor 'model_type' says what model this is", path);
        name = mt->valuestring;
        for (size_t i = 0; i < sizeof k_archs / sizeof k_archs[0]; i++) {
            if (!strcmp(name, k_archs[i].model_type)) {
                c->arch = k_archs[i].arch;
                snprintf(c->arch_name, sizeof c->arch_name, "%s", k_archs[i].name);
                return 0;
            }
        }
    }
    return kvm_seterr(KVM_EUNSUPPORTED,
                      "%s: architecture '%s' is not supported (kvmesh runs LlamaForCausalLM, MistralForCausalLM, "
                      "Qwen2ForCausalLM and Qwen3ForCausalLM)",
                      path, name);
}

/* Refuses settings that change the computation in ways kvmesh does not implement. */
static int cfg_check_unsupported(kvm_config_t *c, const cJSON *root, const char *path) {
    const cJSON *act = cfg_field(root, "hidden_act");
    if (act && (!cJSON_IsString(act) || (strcmp(act->valuestring, "silu") && strcmp(act->valuestring, "swish"))))
        return kvm_seterr(KVM_EUNSUPPORTED, "%s: hidden_act '%s' is not supported (only silu)", path,
                          cJSON_IsString(act) ? act->valuestring : cfg_json_type(act));
    bool b = false;
    int rc;
    if ((rc = cfg_bool(root, "attention_bias", false, &b, path))) return rc;
    if (b && c->arch != KVM_ARCH_QWEN2)
        return kvm_seterr(KVM_EUNSUPPORTED, "%s: attention_bias: true (biases on q/k/v/o projections) is not supported for %s",
                          path, c->arch_name);
    if ((rc = cfg_bool(root, "mlp_bias", false, &b, path))) return rc;
    if (b) return kvm_seterr(KVM_EUNSUPPORTED, "%s: mlp_bias: true is not supported", path);
    if ((rc = cfg_bool(root, "use_sliding_window", false, &b, path))) return rc;
    if (b && c->arch != KVM_ARCH_MISTRAL)
        return kvm_seterr(KVM_EUNSUPPORTED, "%s: use_sliding_window: true is not supported (kvmesh attends to the whole context)", path);
    const cJSON *lt = cfg_field(root, "layer_types"), *it;
    if (lt) {
        if (!cJSON_IsArray(lt)) return kvm_seterr(KVM_EFORMAT, "%s: field 'layer_types' must be a list", path);
        int i = 0;
        cJSON_ArrayForEach(it, lt) {
            if (!cJSON_IsString(it) || strcmp(it->valuestring, "full_attention"))
                return kvm_seterr(KVM_EUNSUPPORTED, "%s: layer_types[%d] is '%s'; only full_attention layers are supported",
                                  path, i, cJSON_IsString(it) ? it->valuestring : cfg_json_type(it));
            i++;
        }
    }
    if (c->arch == KVM_ARCH_MISTRAL) {
        /* A Mistral sliding window only changes attention beyond its length: cap the context there. */
        int sw = 0;
        if ((rc = cfg_int(root, "sliding_window", "", false, 0, &sw, path))) return rc;
        if (sw > 0 && sw < c->max_seq_len) {
            KVM_LOGW("%s: sliding_window %d: context limited to %d tokens (kvmesh attends to the whole context)", path, sw, sw);
            c->max_seq_len = sw;
        }
    }
    return 0;
}

int kvm_config_parse_hf(kvm_config_t *cfg, const char *json, const char *path) {
    if (!path) path = "config.json";
    memset(cfg, 0, sizeof *cfg);
    if (!json) return kvm_seterr(KVM_EINVAL, "%s: no text", path);
    cJSON *root;
    int rc = kvm_json_parse(json, strlen(json), path, &root);
    if (rc) return rc;
    if (!cJSON_IsObject(root)) {
        rc = kvm_seterr(KVM_EFORMAT, "%s: not a JSON object", path);
        goto out;
    }
    kvm_config_t *c = cfg;
    if ((rc = cfg_parse_arch(c, root, path))) goto out;
    if ((rc = cfg_int(root, "hidden_size", "", true, 0, &c->dim, path))) goto out;
    if ((rc = cfg_int(root, "intermediate_size", "", true, 0, &c->hidden_dim, path))) goto out;
    if ((rc = cfg_int(root, "num_hidden_layers", "", true, 0, &c->n_layers, path))) goto out;
    if ((rc = cfg_int(root, "num_attention_heads", "", true, 0, &c->n_heads, path))) goto out;
    if ((rc = cfg_int(root, "num_key_value_heads", "", false, c->n_heads, &c->n_kv_heads, path))) goto out;
    if ((rc = cfg_int(root, "head_dim", "", false, c->n_heads > 0 ? c->dim / c->n_heads : 0, &c->head_dim, path))) goto out;
    if (!cfg_field(root, "head_dim") && c->n_heads > 0 && c->dim % c->n_heads) {
        rc = kvm_seterr(KVM_EFORMAT, "%s: hidden_size %d is not a multiple of num_attention_heads %d and no head_dim is given",
                        path, c->dim, c->n_heads);
        goto out;
    }
    if ((rc = cfg_int(root, "vocab_size", "", true, 0, &c->vocab_size, path))) goto out;
    if (!cfg_field(root, "max_position_embeddings")) KVM_LOGW("%s: no max_position_embeddings; assuming 2048", path);
    if ((rc = cfg_int(root, "max_position_embeddings", "", false, 2048, &c->max_seq_len, path))) goto out;
    double eps;
    if ((rc = cfg_num(root, "rms_norm_eps", "", false, 1e-6, &eps, path))) goto out;
    c->rms_eps = (float)eps;
    if ((rc = cfg_parse_rope(c, root, path))) goto out;
    c->rope_layout = KVM_ROPE_HALF; /* every HF checkpoint of these archs stores q/k for rotate-half */
    if ((rc = cfg_bool(root, "tie_word_embeddings", false, &c->tied_embeddings, path))) goto out;
    c->qkv_bias = c->arch == KVM_ARCH_QWEN2;
    c->qk_norm = c->arch == KVM_ARCH_QWEN3;
    if ((rc = cfg_int(root, "bos_token_id", "", false, -1, &c->bos_id, path))) goto out;
    if ((rc = cfg_int(root, "pad_token_id", "", false, -1, &c->pad_id, path))) goto out;
    if ((rc = cfg_add_eos_json(c, cfg_field(root, "eos_token_id"), "eos_token_id", path))) goto out;
    c->add_bos = c->bos_id >= 0 && (c->arch == KVM_ARCH_LLAMA || c->arch == KVM_ARCH_MISTRAL);
    c->chat_format = KVM_CHAT_NONE;
    c->weight_dtype = KVM_BF16;
    const cJSON *dt = cfg_field(root, "dtype");
    if (!dt) dt = cfg_field(root, "torch_dtype");
    if (cJSON_IsString(dt)) {
        if (!strcmp(dt->valuestring, "float32")) c->weight_dtype = KVM_F32;
        else if (!strcmp(dt->valuestring, "float16")) c->weight_dtype = KVM_F16;
    }
    if ((rc = cfg_check_unsupported(c, root, path))) goto out;
out:
    cJSON_Delete(root);
    return rc;
}

/* ---- validation ------------------------------------------------------------------------------- */

int kvm_config_validate(const kvm_config_t *c, const char *where) {
    const char *w = where ? where : "config";
#define POS(field, name)                                                                                         \
    if (c->field <= 0) return kvm_seterr(KVM_EFORMAT, "%s: %s must be positive (found %d)", w, name, (int)c->field)
    POS(dim, "hidden_size");
    POS(hidden_dim, "intermediate_size");
    POS(n_layers, "num_hidden_layers");
    POS(n_heads, "num_attention_heads");
    POS(n_kv_heads, "num_key_value_heads");
    POS(head_dim, "head_dim");
    POS(vocab_size, "vocab_size");
    POS(max_seq_len, "max_position_embeddings");
#undef POS
    if (c->n_layers > KVM_MAX_LAYERS)
        return kvm_seterr(KVM_ERANGE, "%s: num_hidden_layers %d is more than the %d kvmesh supports", w, c->n_layers,
                          KVM_MAX_LAYERS);
    if (c->n_heads % c->n_kv_heads)
        return kvm_seterr(KVM_EFORMAT, "%s: num_attention_heads (%d) is not a multiple of num_key_value_heads (%d)", w,
                          c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2)
        return kvm_seterr(KVM_EFORMAT, "%s: head_dim (%d) must be even for RoPE", w, c->head_dim);
    if ((int64_t)c->n_heads * c->head_dim > (1 << 24))
        return kvm_seterr(KVM_ERANGE, "%s: num_attention_heads x head_dim (%lld) is implausibly large", w,
                          (long long)c->n_heads * c->head_dim);
    if (!(c->rms_eps > 0) || !isfinite(c->rms_eps) || c->rms_eps >= 1)
        return kvm_seterr(KVM_ERANGE, "%s: rms_norm_eps (%g) must be in (0, 1)", w, (double)c->rms_eps);
    if (!(c->rope_theta > 0) || !isfinite(c->rope_theta))
        return kvm_seterr(KVM_ERANGE, "%s: rope_theta (%g) must be a positive number", w, c->rope_theta);
    if (c->rope_scaling != KVM_ROPE_SCALING_NONE && (!(c->rope_factor > 0) || !isfinite(c->rope_factor)))
        return kvm_seterr(KVM_ERANGE, "%s: rope scaling factor (%g) must be positive", w, c->rope_factor);
    if (c->rope_scaling == KVM_ROPE_SCALING_LLAMA3) {
        if (!(c->rope_low_freq_factor > 0) || !(c->rope_high_freq_factor > c->rope_low_freq_factor))
            return kvm_seterr(KVM_ERANGE, "%s: llama3 rope scaling needs 0 < low_freq_factor (%g) < high_freq_factor (%g)", w,
                              c->rope_low_freq_factor, c->rope_high_freq_factor);
        if (c->rope_original_max_pos <= 0)
            return kvm_seterr(KVM_ERANGE, "%s: llama3 rope scaling needs original_max_position_embeddings > 0 (found %d)", w,
                              c->rope_original_max_pos);
    }
    if (c->bos_id < -1 || c->bos_id >= c->vocab_size)
        return kvm_seterr(KVM_ERANGE, "%s: bos_token_id %d is outside the vocabulary (vocab_size %d)", w, c->bos_id,
                          c->vocab_size);
    if (c->n_eos < 0 || c->n_eos > KVM_MAX_EOS) return kvm_seterr(KVM_ERANGE, "%s: %d eos ids", w, c->n_eos);
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] < 0 || c->eos_ids[i] >= c->vocab_size)
            return kvm_seterr(KVM_ERANGE, "%s: eos_token_id %d is outside the vocabulary (vocab_size %d)", w, c->eos_ids[i],
                              c->vocab_size);
    return 0;
}

/* kvm_tensor_check() lives in model.c (the lead wrote it there first; same contract as model.h states). */
