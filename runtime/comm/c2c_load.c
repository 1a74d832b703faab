/* c2c_load.c - reading a C2C fuser (../shared/spec/c2c.md §7): the config JSON with every key and value checked,
 * the safetensors file with every tensor's name, shape and dtype computed from the config, the weights' SHA-256,
 * the pairing with the models given, and one copy of the weights to the backend (see c2c.h). */
#include "c2c.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/json.h"
#include "../core/sha256.h"
#include "../model/safetensors.h"

/* ---- config -------------------------------------------------------------------------------------- */

/* Every key of obj is in allowed[] and appears once (cJSON keeps duplicates); every key of required[] is
 * there. `where` is the path of obj in the config ("" for the top level, "receiver.", ...). */
static int cfg_keys(const cJSON *obj, const char *const *allowed, const char *const *required, const char *path,
                    const char *where) {
    const cJSON *c;
    cJSON_ArrayForEach(c, obj) {
        bool ok = false;
        for (const char *const *a = allowed; *a && !ok; a++) ok = !strcmp(*a, c->string);
        if (!ok) return kvm_seterr(KVM_EFORMAT, "%s: unknown config key '%s%s'", path, where, c->string);
        for (const cJSON *d = c->next; d; d = d->next)
            if (!strcmp(d->string, c->string))
                return kvm_seterr(KVM_EFORMAT, "%s: config key '%s%s' appears twice", path, where, c->string);
    }
    for (const char *const *r = required; *r; r++)
        if (!cJSON_GetObjectItemCaseSensitive(obj, *r))
            return kvm_seterr(KVM_EFORMAT, "%s: config key '%s%s' is missing", path, where, *r);
    return 0;
}

static int cfg_int(const cJSON *obj, const char *key, int lo, int hi, const char *path, const char *where, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsNumber(v) || floor(v->valuedouble) != v->valuedouble || v->valuedouble < lo || v->valuedouble > hi)
        return kvm_seterr(KVM_EFORMAT, "%s: config key '%s%s' must be an integer in [%d, %d]", path, where, key, lo, hi);
    *out = (int)v->valuedouble;
    return 0;
}

static int cfg_str(const cJSON *obj, const char *key, char *buf, size_t cap, const char *path, const char *where) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsString(v)) return kvm_seterr(KVM_EFORMAT, "%s: config key '%s%s' must be a string", path, where, key);
    if (strlen(v->valuestring) >= cap)
        return kvm_seterr(KVM_EFORMAT, "%s: config key '%s%s' is longer than %zu bytes", path, where, key, cap - 1);
    snprintf(buf, cap, "%s", v->valuestring);
    return 0;
}

/* A string that must be one of the NULL-terminated choices. */
static int cfg_enum(const cJSON *obj, const char *key, const char *const *choices, char *buf, size_t cap,
                    const char *path, const char *where) {
    int rc = cfg_str(obj, key, buf, cap, path, where);
    if (rc) return rc;
    for (const char *const *c = choices; *c; c++)
        if (!strcmp(*c, buf)) return 0;
    char list[160] = "";
    for (const char *const *c = choices; *c; c++)
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", c == choices ? "" : ", ", *c);
    return kvm_seterr(KVM_EFORMAT, "%s: config key '%s%s' is '%s', not one of %s", path, where, key, buf, list);
}

static int cfg_sha(const cJSON *obj, const char *key, char out[65], const char *path, const char *where) {
    int rc = cfg_str(obj, key, out, 65, path, where);
    if (rc) return rc;
    bool ok = strlen(out) == 64;
    for (int i = 0; ok && i < 64; i++) ok = (out[i] >= '0' && out[i] <= '9') || (out[i] >= 'a' && out[i] <= 'f');
    if (!ok) return kvm_seterr(KVM_EFORMAT, "%s: config key '%s%s' is not 64 lowercase hex digits", path, where, key);
    return 0;
}

/* "receiver" / "sharer" (spec §7.3). */
static int cfg_model(const cJSON *root, const char *role, kvm_c2c_model_desc_t *m, const char *path) {
    static const char *const keys[] = {"model", "n_layers", "n_kv_heads", "head_dim", "rope", "tokenizer_sha256", NULL};
    static const char *const rkeys[] = {"layout", "theta", NULL};
    static const char *const layouts[] = {"half", "interleaved", NULL};
    char where[32], rwhere[40], layout[16];
    snprintf(where, sizeof where, "%s.", role);
    snprintf(rwhere, sizeof rwhere, "%s.rope.", role);
    const cJSON *o = cJSON_GetObjectItemCaseSensitive(root, role);
    if (!cJSON_IsObject(o)) return kvm_seterr(KVM_EFORMAT, "%s: config key '%s' must be an object", path, role);
    int rc;
    if ((rc = cfg_keys(o, keys, keys, path, where)) || (rc = cfg_str(o, "model", m->model, sizeof m->model, path, where)) ||
        (rc = cfg_int(o, "n_layers", 1, KVM_MAX_LAYERS, path, where, &m->n_layers)) ||
        (rc = cfg_int(o, "n_kv_heads", 1, 4096, path, where, &m->n_kv_heads)) ||
        (rc = cfg_int(o, "head_dim", 2, KVM_C2C_MAX_HEAD_DIM, path, where, &m->head_dim)) ||
        (rc = cfg_sha(o, "tokenizer_sha256", m->tokenizer_sha256, path, where)))
        return rc;
    if ((int64_t)m->n_kv_heads * m->head_dim > KVM_C2C_MAX_DIM)
        return kvm_seterr(KVM_EFORMAT, "%s: config '%s': n_kv_heads x head_dim is over %d", path, role, KVM_C2C_MAX_DIM);
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(o, "rope");
    if (!cJSON_IsObject(r)) return kvm_seterr(KVM_EFORMAT, "%s: config key '%srope' must be an object", path, where);
    if ((rc = cfg_keys(r, rkeys, rkeys, path, rwhere)) || (rc = cfg_enum(r, "layout", layouts, layout, sizeof layout, path, rwhere)))
        return rc;
    m->rope_layout = !strcmp(layout, "half") ? KVM_ROPE_HALF : KVM_ROPE_INTERLEAVED;
    const cJSON *th = cJSON_GetObjectItemCaseSensitive(r, "theta");
    if (!cJSON_IsNumber(th) || !(th->valuedouble > 0) || !isfinite(th->valuedouble))
        return kvm_seterr(KVM_EFORMAT, "%s: config key '%srope.theta' must be a positive number", path, where);
    m->rope_theta = th->valuedouble;
    m->vocab_size = 0;
    return 0;
}

/* layer_map and gates_open (the bools go to gk/gv, [receiver.n_layers]). */
static int cfg_layers(const cJSON *root, kvm_c2c_config_t *c, bool *gk, bool *gv, const char *path) {
    const int lr = c->receiver.n_layers, ls = c->sharer.n_layers;
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "layer_map");
    if (!cJSON_IsArray(map) || cJSON_GetArraySize(map) != lr)
        return kvm_seterr(KVM_EFORMAT, "%s: config key 'layer_map' must be an array of receiver.n_layers = %d integers", path, lr);
    int i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, map) {
        if (!cJSON_IsNumber(v) || floor(v->valuedouble) != v->valuedouble || v->valuedouble < 0 || v->valuedouble >= ls)
            return kvm_seterr(KVM_EFORMAT, "%s: config key 'layer_map[%d]' must be a sharer layer in [0, %d)", path, i, ls);
        c->layer_map[i++] = (int)v->valuedouble;
    }
    static const char *const gkeys[] = {"k", "v", NULL};
    const cJSON *g = cJSON_GetObjectItemCaseSensitive(root, "gates_open");
    if (!cJSON_IsObject(g)) return kvm_seterr(KVM_EFORMAT, "%s: config key 'gates_open' must be an object", path);
    int rc = cfg_keys(g, gkeys, gkeys, path, "gates_open.");
    if (rc) return rc;
    for (int b = 0; b < 2; b++) {
        const cJSON *a = cJSON_GetObjectItemCaseSensitive(g, gkeys[b]);
        if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) != lr)
            return kvm_seterr(KVM_EFORMAT, "%s: config key 'gates_open.%s' must be an array of %d booleans", path, gkeys[b], lr);
        i = 0;
        cJSON_ArrayForEach(v, a) {
            if (!cJSON_IsBool(v))
                return kvm_seterr(KVM_EFORMAT, "%s: config key 'gates_open.%s[%d]' is not a boolean", path, gkeys[b], i);
            (b ? gv : gk)[i++] = cJSON_IsTrue(v);
        }
    }
    return 0;
}

/* The sizes, strings and enums of the top level (everything but the models and the layer arrays). */
static int cfg_top(const cJSON *root, kvm_c2c_config_t *c, const char *path) {
    static const char *const dtypes[] = {"bf16", "f16", "f32", NULL};
    static const char *const aligns[] = {"identity", "first", "longest", NULL};
    static const char *const fuses[] = {"prompt_except_last", "message_tokens", NULL};
    static const char *const acts[] = {"gelu_erf", NULL};
    static const char *const fmts[] = {"kvmesh.c2c", NULL};
    char buf[32];
    int version, rc;
    if ((rc = cfg_enum(root, "format", fmts, buf, sizeof buf, path, "")) || (rc = cfg_int(root, "version", 1, 1, path, "", &version)) ||
        (rc = cfg_int(root, "hidden", 1, KVM_C2C_MAX_DIM, path, "", &c->hidden)) ||
        (rc = cfg_int(root, "inner", 1, KVM_C2C_MAX_DIM, path, "", &c->inner)) ||
        (rc = cfg_int(root, "wgt_inner", 1, KVM_C2C_MAX_DIM, path, "", &c->wgt_inner)) ||
        (rc = cfg_int(root, "trunk_blocks", 0, KVM_C2C_MAX_BLOCKS, path, "", &c->trunk_blocks)) ||
        (rc = cfg_int(root, "proj_blocks", 0, KVM_C2C_MAX_BLOCKS, path, "", &c->proj_blocks)) ||
        (rc = cfg_int(root, "wgt_blocks", 0, KVM_C2C_MAX_BLOCKS, path, "", &c->wgt_blocks)) ||
        (rc = cfg_enum(root, "activation", acts, buf, sizeof buf, path, "")) ||
        (rc = cfg_enum(root, "dtype", dtypes, buf, sizeof buf, path, "")) ||
        (rc = cfg_enum(root, "token_alignment", aligns, c->token_alignment, sizeof c->token_alignment, path, "")) ||
        (rc = cfg_enum(root, "fuse_tokens", fuses, c->fuse_tokens, sizeof c->fuse_tokens, path, "")) ||
        (rc = cfg_str(root, "chat_template", c->chat_template, sizeof c->chat_template, path, "")) ||
        (rc = cfg_str(root, "weights_file", c->weights_file, sizeof c->weights_file, path, "")) ||
        (rc = cfg_sha(root, "weights_sha256", c->weights_sha256, path, "")))
        return rc;
    kvm_dtype_parse(buf, "dtype", &c->dtype);
    const cJSON *eps = cJSON_GetObjectItemCaseSensitive(root, "norm_eps");
    if (!cJSON_IsNumber(eps) || !(eps->valuedouble > 0) || !(eps->valuedouble < 1))
        return kvm_seterr(KVM_EFORMAT, "%s: config key 'norm_eps' must be a number in (0, 1)", path);
    c->norm_eps = (float)eps->valuedouble;
    if ((!strcmp(c->token_alignment, "identity")) != (!strcmp(c->fuse_tokens, "prompt_except_last")))
        return kvm_seterr(KVM_EFORMAT, "%s: config keys 'token_alignment' = '%s' and 'fuse_tokens' = '%s' disagree "
                          "(identity fuses prompt_except_last; an aligner fuses message_tokens)", path, c->token_alignment,
                          c->fuse_tokens);
    if (!c->weights_file[0] || c->weights_file[0] == '/' || strstr(c->weights_file, ".."))
        return kvm_seterr(KVM_EFORMAT, "%s: config key 'weights_file' must be a file name relative to the config's directory", path);
    const cJSON *prov = cJSON_GetObjectItemCaseSensitive(root, "provenance"), *p;
    if (prov && !cJSON_IsObject(prov)) return kvm_seterr(KVM_EFORMAT, "%s: config key 'provenance' must be an object", path);
    cJSON_ArrayForEach(p, prov) {
        if (!cJSON_IsString(p))
            return kvm_seterr(KVM_EFORMAT, "%s: config key 'provenance.%s' must be a string", path, p->string);
    }
    return 0;
}

static int cfg_parse(const cJSON *root, kvm_c2c_config_t *c, bool *gk, bool *gv, const char *path) {
    static const char *const keys[] = {"format", "version", "receiver", "sharer", "hidden", "inner", "trunk_blocks",
                                       "proj_blocks", "wgt_blocks", "wgt_inner", "norm_eps", "activation", "dtype",
                                       "layer_map", "gates_open", "token_alignment", "fuse_tokens", "chat_template",
                                       "weights_file", "weights_sha256", "provenance", NULL};
    static const char *const none[] = {NULL};
    int rc;
    if ((rc = cfg_keys(root, keys, none, path, "")) != 0) return rc;
    /* every key but provenance is required */
    for (const char *const *k = keys; *k; k++)
        if (strcmp(*k, "provenance") && !cJSON_GetObjectItemCaseSensitive(root, *k))
            return kvm_seterr(KVM_EFORMAT, "%s: config key '%s' is missing", path, *k);
    if ((rc = cfg_top(root, c, path)) || (rc = cfg_model(root, "receiver", &c->receiver, path)) ||
        (rc = cfg_model(root, "sharer", &c->sharer, path)))
        return rc;
    c->layer_map = kvm_calloc((size_t)c->receiver.n_layers, sizeof *c->layer_map);
    if (!c->layer_map) return KVM_ENOMEM;
    return cfg_layers(root, c, gk, gv, path);
}

/* ---- pairing (spec §7.3) ------------------------------------------------------------------------- */

static int pair_side(const kvm_c2c_model_desc_t *want, const kvm_c2c_model_desc_t *got, const char *role, const char *path) {
    if (want->n_layers != got->n_layers)
        return kvm_seterr(KVM_EINVAL, "%s: fuser is for a %s with %d layers; the model has %d (%s.n_layers)", path, role,
                          want->n_layers, got->n_layers, role);
    if (want->n_kv_heads != got->n_kv_heads)
        return kvm_seterr(KVM_EINVAL, "%s: fuser is for a %s with %d KV heads; the model has %d (%s.n_kv_heads)", path, role,
                          want->n_kv_heads, got->n_kv_heads, role);
    if (want->head_dim != got->head_dim)
        return kvm_seterr(KVM_EINVAL, "%s: fuser is for a %s with head_dim %d; the model has %d (%s.head_dim)", path, role,
                          want->head_dim, got->head_dim, role);
    if (want->rope_layout != got->rope_layout)
        return kvm_seterr(KVM_EINVAL, "%s: fuser is for a %s with RoPE layout %s; the model's is %s (%s.rope.layout)", path,
                          role, want->rope_layout == KVM_ROPE_HALF ? "half" : "interleaved",
                          got->rope_layout == KVM_ROPE_HALF ? "half" : "interleaved", role);
    if (fabs(want->rope_theta - got->rope_theta) > 1e-9 * fabs(want->rope_theta))
        return kvm_seterr(KVM_EINVAL, "%s: fuser is for a %s with RoPE theta %g; the model's is %g (%s.rope.theta)", path, role,
                          want->rope_theta, got->rope_theta, role);
    if (strcmp(want->tokenizer_sha256, got->tokenizer_sha256))
        return kvm_seterr(KVM_EINVAL, "%s: fuser is for a %s whose tokenizer has SHA-256 %.12s...; the model's tokenizer has "
                          "%.12s... (%s.tokenizer_sha256): another model pair", path, role, want->tokenizer_sha256,
                          got->tokenizer_sha256, role);
    return 0;
}

static int pair_check(const kvm_c2c_config_t *c, const kvm_c2c_pair_t *p, const char *path) {
    int rc;
    if ((rc = pair_side(&c->receiver, &p->receiver, "receiver", path)) || (rc = pair_side(&c->sharer, &p->sharer, "sharer", path)))
        return rc;
    if (!strcmp(c->token_alignment, "identity") && p->receiver.vocab_size > p->sharer.vocab_size)
        return kvm_seterr(KVM_EINVAL, "%s: token_alignment 'identity' passes receiver ids to the sharer, but the receiver's "
                          "vocabulary (%d) is larger than the sharer's (%d)", path, p->receiver.vocab_size, p->sharer.vocab_size);
    return 0;
}

int kvm_c2c_model_desc(const kvm_model_t *m, const char *tokenizer_file, kvm_c2c_model_desc_t *out) {
    memset(out, 0, sizeof *out);
    snprintf(out->model, sizeof out->model, "%.63s", m->name);
    out->n_layers = m->cfg.n_layers;
    out->n_kv_heads = m->cfg.n_kv_heads;
    out->head_dim = m->cfg.head_dim;
    out->rope_layout = m->cfg.rope_layout;
    out->rope_theta = m->cfg.rope_theta;
    out->vocab_size = m->cfg.vocab_size;
    if (!tokenizer_file) { /* a synthetic model: the pin names its shape (c2c.h) */
        char text[128];
        uint8_t d[32];
        const int len = snprintf(text, sizeof text, "kvmesh synthetic model %.63s: no tokenizer", m->name);
        kvm_sha256(text, (size_t)len, d);
        kvm_sha256_hex(d, out->tokenizer_sha256);
        return 0;
    }
    return kvm_sha256_file_hex(tokenizer_file, out->tokenizer_sha256);
}

/* ---- tensors (spec §7.1, §7.2) ------------------------------------------------------------------- */

typedef struct ld_ctx {
    kvm_c2c_fuser_t *f;
    kvm_st_file_t st;
    bool upload;      /* false: check only; true: copy into f->params at `off` */
    size_t off;       /* next free byte of f->params */
    float *tmp;       /* host fp32 staging for norms and biases */
    size_t tmp_floats;
} ld_ctx_t;

#define LD_ALIGN 256

/* Checks tensor `name` (shape [d0] or [d0, d1], the config's dtype, finite values); with ctx->upload, copies it
 * into the parameter block: a matrix as stored into *W, a vector converted to fp32 into *vec. */
static int ld_tensor(ld_ctx_t *c, const char *name, int64_t d0, int64_t d1, kvm_wmat_t *W, float **vec) {
    kvm_c2c_fuser_t *f = c->f;
    const char *path = f->weights_path;
    const kvm_st_tensor_t *t = kvm_st_take(&c->st, name);
    const int nd = d1 ? 2 : 1;
    if (!t) return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s' is missing", path, name);
    if (t->dtype != f->cfg.dtype)
        return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s' has dtype %s; the config's dtype is %s", path, name,
                          kvm_st_dtype_name(t->dtype), kvm_st_dtype_name(f->cfg.dtype));
    if (t->ndim != nd || t->shape[0] != d0 || (nd == 2 && t->shape[1] != d1)) {
        char got[96] = "[";
        for (int i = 0; i < t->ndim; i++)
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", i ? ", " : "", (long long)t->shape[i]);
        strncat(got, "]", sizeof got - strlen(got) - 1);
        if (nd == 2)
            return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s' has shape %s, expected [%lld, %lld]", path, name, got, (long long)d0,
                              (long long)d1);
        return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s' has shape %s, expected [%lld]", path, name, got, (long long)d0);
    }
    const size_t numel = (size_t)kvm_st_numel(t), es = kvm_dtype_size(t->dtype);
    if (!c->upload) {
        kvm_tensor_t v = {.data = t->data, .dtype = t->dtype};
        for (size_t i = 0; i < numel; i++)
            if (!isfinite(kvm_tensor_get(&v, i)))
                return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s' holds a non-finite value (NaN or Inf) at element %zu", path,
                                  name, i);
        return 0;
    }
    char *dst = (char *)f->params + c->off;
    int rc;
    if (W) {
        rc = f->ops->h2d(dst, t->data, numel * es);
        *W = (kvm_wmat_t){.data = dst, .dtype = t->dtype, .rows = (int)d0, .cols = (int)d1};
        c->off += (numel * es + LD_ALIGN - 1) / LD_ALIGN * LD_ALIGN;
    } else {
        kvm_tensor_t v = {.data = t->data, .dtype = t->dtype};
        for (size_t i = 0; i < numel; i++) c->tmp[i] = kvm_tensor_get(&v, i);
        rc = f->ops->h2d(dst, c->tmp, numel * sizeof(float));
        *vec = (float *)dst;
        c->off += (numel * sizeof(float) + LD_ALIGN - 1) / LD_ALIGN * LD_ALIGN;
    }
    return rc ? kvm_errctx(rc, "%s: copying tensor '%s' to the %s backend", path, name, f->ops->name) : 0;
}

/* One FFN stack (trunk, proj or wgt) of a branch: blocks x {norm [H], up [inner, H], down [H, inner]}. */
static int ld_stack(ld_ctx_t *c, const char *pre, const char *stack, int blocks, int inner, kvm_c2c_ffn_t *ffn) {
    const int H = c->f->cfg.hidden;
    char name[160];
    int rc = 0;
    for (int j = 0; j < blocks && !rc; j++) {
        snprintf(name, sizeof name, "%s.%s.%d.norm", pre, stack, j);
        if ((rc = ld_tensor(c, name, H, 0, NULL, &ffn[j].norm))) break;
        snprintf(name, sizeof name, "%s.%s.%d.up", pre, stack, j);
        if ((rc = ld_tensor(c, name, inner, H, &ffn[j].up, NULL))) break;
        snprintf(name, sizeof name, "%s.%s.%d.down", pre, stack, j);
        rc = ld_tensor(c, name, H, inner, &ffn[j].down, NULL);
    }
    return rc;
}

/* Layer l, branch b: every tensor of spec §7.2, then the gate (F32 [1], finite, sign = gates_open). */
static int ld_branch(ld_ctx_t *c, int l, int b, bool want_open) {
    kvm_c2c_fuser_t *f = c->f;
    const kvm_c2c_config_t *g = &f->cfg;
    kvm_c2c_branch_t *br = &f->layers[l][b];
    const int H = g->hidden, ht = g->receiver.n_kv_heads, ct = ht * g->receiver.head_dim;
    const int cin = g->sharer.n_kv_heads * g->sharer.head_dim + ct;
    char pre[48], name[160];
    snprintf(pre, sizeof pre, "layers.%d.%c", l, b ? 'v' : 'k');
    int rc;
#define LD_T(suffix, d0, d1, W, vec) (snprintf(name, sizeof name, "%s.%s", pre, suffix), ld_tensor(c, name, d0, d1, W, vec))
    if ((rc = LD_T("in.weight", H, cin, &br->in, NULL)) || (rc = LD_T("in.bias", H, 0, NULL, &br->in_bias)) ||
        (rc = ld_stack(c, pre, "trunk", g->trunk_blocks, g->inner, br->trunk)) ||
        (rc = ld_stack(c, pre, "proj", g->proj_blocks, g->inner, br->proj)) ||
        (rc = LD_T("out.weight", ct, H, &br->out, NULL)) || (rc = LD_T("out.bias", ct, 0, NULL, &br->out_bias)) ||
        (rc = ld_stack(c, pre, "wgt", g->wgt_blocks, g->wgt_inner, br->wgt)) ||
        (rc = LD_T("wgt_head.weight", ht, H, &br->wgt_head, NULL)) || (rc = LD_T("wgt_head.bias", ht, 0, NULL, &br->wgt_bias)))
        return rc;
#undef LD_T
    if (c->upload) return 0;
    snprintf(name, sizeof name, "%s.gate", pre);
    const kvm_st_tensor_t *t = kvm_st_take(&c->st, name);
    const char *path = f->weights_path;
    if (!t) return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s' is missing", path, name);
    if (t->dtype != KVM_F32 || t->ndim != 1 || t->shape[0] != 1)
        return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s' must be F32 of shape [1] (found %s, %d dimension(s))", path, name,
                          kvm_st_dtype_name(t->dtype), t->ndim);
    float logit;
    memcpy(&logit, t->data, sizeof logit);
    if (!isfinite(logit)) return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s' (the gate logit) is not finite", path, name);
    if ((logit > 0) != want_open)
        return kvm_seterr(KVM_EFORMAT, "%s: config key 'gates_open.%c[%d]' is %s, but tensor '%s' in %s holds %g (open iff > 0)",
                          f->json_path, b ? 'v' : 'k', l, want_open ? "true" : "false", name, path, (double)logit);
    br->gate_logit = logit;
    br->open = logit > 0;
    return 0;
}

/* Bytes of the parameter block: every tensor rounded up to LD_ALIGN, vectors as fp32. */
static size_t ld_params_bytes(const kvm_c2c_config_t *g, size_t *max_vec) {
    const size_t es = kvm_dtype_size(g->dtype), H = (size_t)g->hidden, ht = (size_t)g->receiver.n_kv_heads;
    const size_t ct = ht * (size_t)g->receiver.head_dim, cin = (size_t)g->sharer.n_kv_heads * g->sharer.head_dim + ct;
#define LD_M(n) (((n) * es + LD_ALIGN - 1) / LD_ALIGN * LD_ALIGN)
#define LD_V(n) (((n) * 4 + LD_ALIGN - 1) / LD_ALIGN * LD_ALIGN)
    size_t per = LD_M(H * cin) + LD_V(H) + LD_M(ct * H) + LD_V(ct) + LD_M(ht * H) + LD_V(ht);
    per += (size_t)(g->trunk_blocks + g->proj_blocks) * (LD_V(H) + 2 * LD_M(H * (size_t)g->inner));
    per += (size_t)g->wgt_blocks * (LD_V(H) + 2 * LD_M(H * (size_t)g->wgt_inner));
#undef LD_M
#undef LD_V
    *max_vec = H > ct ? H : ct;
    return per * 2 * (size_t)g->receiver.n_layers;
}

/* Indexes the weights file, checks every tensor against the config (and no tensor beyond them) and the
 * file's SHA-256, then copies the tensors into one backend block. */
static int ld_weights(kvm_c2c_fuser_t *f, const bool *gk, const bool *gv) {
    const kvm_c2c_config_t *g = &f->cfg;
    ld_ctx_t c = {.f = f};
    int rc = kvm_st_open(&c.st, f->weights_path, KVM_ST_EXACT);
    if (rc == KVM_EDTYPE) { /* a dtype outside BF16/F16/F32 is a malformed fuser (spec §7.1) */
        char msg[512];
        snprintf(msg, sizeof msg, "%s", kvm_errmsg());
        return kvm_seterr(KVM_EFORMAT, "%s", msg);
    }
    if (rc) return rc;
    const int lr = g->receiver.n_layers;
    for (int l = 0; l < lr && !rc; l++)
        for (int b = 0; b < 2 && !rc; b++) rc = ld_branch(&c, l, b, b ? gv[l] : gk[l]);
    for (int i = 0; i < c.st.n_tensors && !rc; i++)
        if (!c.st.tensors[i].used)
            rc = kvm_seterr(KVM_EFORMAT, "%s: unexpected tensor '%s' (not a name of spec §7.2 for this config)", f->weights_path,
                            c.st.tensors[i].name);
    if (!rc) {
        uint8_t d[32];
        char hex[65];
        kvm_sha256(c.st.base, c.st.size, d);
        kvm_sha256_hex(d, hex);
        if (strcmp(hex, g->weights_sha256))
            rc = kvm_seterr(KVM_EFORMAT, "%s: config key 'weights_sha256' is %.16s..., but %s hashes to %.16s...: the weights "
                            "file was changed or belongs to another fuser", f->json_path, g->weights_sha256, f->weights_path, hex);
    }
    size_t max_vec = 0;
    if (!rc) {
        f->params_bytes = ld_params_bytes(g, &max_vec);
        f->params = f->ops->alloc(f->params_bytes);
        c.tmp = kvm_malloc(max_vec * sizeof(float));
        if (!f->params || !c.tmp) rc = kvm_errctx(KVM_ENOMEM, "%s: %zu bytes of fuser weights", f->weights_path, f->params_bytes);
    }
    c.upload = true;
    for (int l = 0; l < lr && !rc; l++)
        for (int b = 0; b < 2 && !rc; b++) rc = ld_branch(&c, l, b, b ? gv[l] : gk[l]);
    kvm_free(c.tmp);
    kvm_st_close(&c.st);
    return rc;
}

/* Host arrays of the branches and their FFN blocks, and the backend scratch. */
static int ld_alloc(kvm_c2c_fuser_t *f) {
    const kvm_c2c_config_t *g = &f->cfg;
    const int lr = g->receiver.n_layers, per = g->trunk_blocks + g->proj_blocks + g->wgt_blocks;
    f->layers = kvm_calloc((size_t)lr, sizeof *f->layers);
    kvm_c2c_ffn_t *ffn = kvm_calloc((size_t)lr * 2 * (size_t)(per ? per : 1), sizeof *ffn);
    if (!f->layers || !ffn) {
        kvm_free(ffn);
        return KVM_ENOMEM;
    }
    for (int l = 0; l < lr; l++)
        for (int b = 0; b < 2; b++) {
            kvm_c2c_branch_t *br = &f->layers[l][b];
            br->trunk = ffn + ((size_t)l * 2 + b) * per;
            br->proj = br->trunk + g->trunk_blocks;
            br->wgt = br->proj + g->proj_blocks;
        }
    const size_t H = (size_t)g->hidden, ct = (size_t)g->receiver.n_kv_heads * g->receiver.head_dim;
    const size_t cin = (size_t)g->sharer.n_kv_heads * g->sharer.head_dim + ct;
    const size_t mi = (size_t)(g->inner > g->wgt_inner ? g->inner : g->wgt_inner);
    f->ws_floats = (size_t)KVM_C2C_CHUNK_ROWS * (cin + ct + g->receiver.n_kv_heads + 3 * H + mi);
    f->ws = f->ops->alloc(f->ws_floats * sizeof(float));
    return f->ws ? 0 : kvm_errctx(KVM_ENOMEM, "fuser scratch");
}

kvm_c2c_fuser_t *kvm_c2c_load(const char *json_path, const kvm_c2c_pair_t *pair, const kvm_ops_t *ops) {
    kvm_core_init();
    if (!ops) ops = kvm_ops_cpu();
    if (!json_path) {
        kvm_seterr(KVM_EINVAL, "kvm_c2c_load: no config path");
        return NULL;
    }
    if (!ops->c2c_gather || !ops->gelu_erf || !ops->c2c_residual) {
        kvm_seterr(KVM_EUNSUPPORTED, "%s: the %s backend has no C2C ops", json_path, ops->name);
        return NULL;
    }
    kvm_c2c_fuser_t *f = kvm_calloc(1, sizeof *f);
    cJSON *root = NULL;
    bool *gk = NULL;
    int rc = f ? 0 : KVM_ENOMEM;
    if (!rc) {
        f->ops = ops;
        f->json_path = kvm_strdup(json_path);
        rc = f->json_path ? kvm_json_read_object(json_path, (size_t)1 << 20, "c2c config", &root) : KVM_ENOMEM;
    }
    if (!rc) {
        int lr = 0;
        const cJSON *r = cJSON_GetObjectItemCaseSensitive(root, "receiver");
        const cJSON *nl = r ? cJSON_GetObjectItemCaseSensitive(r, "n_layers") : NULL;
        lr = cJSON_IsNumber(nl) && nl->valuedouble >= 1 && nl->valuedouble <= KVM_MAX_LAYERS ? (int)nl->valuedouble : 1;
        gk = kvm_calloc(2 * (size_t)lr, sizeof *gk);
        rc = gk ? cfg_parse(root, &f->cfg, gk, gk + lr, json_path) : KVM_ENOMEM;
    }
    if (!rc && pair) rc = pair_check(&f->cfg, pair, json_path);
    if (!rc) {
        const char *slash = strrchr(json_path, '/');
        int dl = slash ? (int)(slash - json_path) + 1 : 0;
        size_t n = (size_t)dl + strlen(f->cfg.weights_file) + 1;
        f->weights_path = kvm_malloc(n);
        if (f->weights_path) snprintf(f->weights_path, n, "%.*s%s", dl, json_path, f->cfg.weights_file);
        rc = f->weights_path ? ld_alloc(f) : KVM_ENOMEM;
    }
    if (!rc) rc = ld_weights(f, gk, gk + f->cfg.receiver.n_layers);
    cJSON_Delete(root);
    kvm_free(gk);
    if (rc) {
        if (rc == KVM_ENOMEM && !strstr(kvm_errmsg(), json_path)) kvm_errctx(rc, "%s", json_path);
        kvm_c2c_free(f);
        return NULL;
    }
    return f;
}

void kvm_c2c_free(kvm_c2c_fuser_t *f) {
    if (!f) return;
    if (f->params) f->ops->free(f->params);
    if (f->ws) f->ops->free(f->ws);
    if (f->layers) kvm_free(f->layers[0][0].trunk);
    kvm_free(f->layers);
    kvm_free(f->cfg.layer_map);
    kvm_free(f->json_path);
    kvm_free(f->weights_path);
    kvm_free(f);
}
