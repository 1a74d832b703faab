/* c2c_run.c - C2C between two loaded models (../shared/spec/c2c.md §5, §6; include/kvmesh_lab.h): the fuser
 * opened for a model pair, the sectioned prefill (receiver and sharer prefill a section, the receiver's rows are
 * fused in place, the sharer's KV is freed, the receiver runs the rest over the fused cache), and the writer of
 * seeded, untrained fusers for a pair (tests and examples: no trained fuser exists for the bundled pair). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "c2c.h"
#include "../core/sha256.h"
#include "../kv/kv.h"
#include "../model/safetensors.h"

/* A synthetic model (kvm_model_load("synthetic:<name>"): seeded weights of a real shape, no tokenizer), paired for
 * timing benchmarks only. */
static bool c2c_synthetic(const kvm_model_t *m) {
    return !m->tok && m->path && !strncmp(m->path, "synthetic:", 10) && !strncmp(m->name, "synthetic:", 10);
}

/* The tokenizer file kvmesh loaded for m, whose SHA-256 pins the fuser's pair (spec §7.3): tokenizer.json of a
 * Hugging Face directory; "" for a synthetic model. */
static int c2c_tokenizer_file(const kvm_model_t *m, const char *role, char *buf, size_t cap) {
    struct stat sb;
    buf[0] = 0;
    if (c2c_synthetic(m)) return 0; /* no file: kvm_c2c_model_desc pins the synthetic shape by name */
    if (!m->path || stat(m->path, &sb) || !S_ISDIR(sb.st_mode))
        return kvm_seterr(KVM_EINVAL, "c2c: the %s '%s' is not a Hugging Face model directory (C2C pairs models by the "
                          "hash of their tokenizer.json, spec §7.3)", role, m->path ? m->path : m->name);
    snprintf(buf, cap, "%s/tokenizer.json", m->path);
    return 0;
}

static int c2c_pair_of(kvm_model_t *receiver, kvm_model_t *sharer, kvm_c2c_pair_t *p) {
    char tr[4096], ts[4096];
    int rc;
    if (!receiver || !sharer) return kvm_seterr(KVM_EINVAL, "c2c: a receiver and a sharer model are needed");
    if ((rc = c2c_tokenizer_file(receiver, "receiver", tr, sizeof tr)) ||
        (rc = c2c_tokenizer_file(sharer, "sharer", ts, sizeof ts)) ||
        (rc = kvm_c2c_model_desc(receiver, tr[0] ? tr : NULL, &p->receiver)) ||
        (rc = kvm_c2c_model_desc(sharer, ts[0] ? ts : NULL, &p->sharer)))
        return rc;
    return 0;
}

kvm_c2c_fuser_t *kvm_c2c_open(const char *json_path, kvm_model_t *receiver, kvm_model_t *sharer) {
    kvm_c2c_pair_t pair;
    if (!json_path) {
        kvm_seterr(KVM_EINVAL, "c2c: no fuser path");
        return NULL;
    }
    if (c2c_pair_of(receiver, sharer, &pair)) return NULL;
    if (receiver->ops != sharer->ops) {
        kvm_seterr(KVM_EINVAL, "%s: the receiver '%s' and the sharer '%s' run on different backends", json_path,
                   receiver->name, sharer->name);
        return NULL;
    }
    return kvm_c2c_load(json_path, &pair, receiver->ops);
}

int kvm_c2c_n_layers(const kvm_c2c_fuser_t *f) { return f ? f->cfg.receiver.n_layers : 0; }

bool kvm_c2c_gate_open(const kvm_c2c_fuser_t *f, int layer, int branch) {
    if (!f || layer < 0 || layer >= f->cfg.receiver.n_layers || (branch != KVM_C2C_K && branch != KVM_C2C_V)) return false;
    return f->layers[layer][branch].open;
}

/* The cache view of seq for the fuser: on the CPU the host block table is backend memory; elsewhere a copy is
 * uploaded (*dev, freed by the caller with ops->free). */
static int c2c_view(const kvm_c2c_fuser_t *f, const kvm_seq_t *s, kvm_c2c_cache_t *c, int32_t **dev) {
    const kvm_ops_t *o = f->ops;
    *dev = NULL;
    memset(c, 0, sizeof *c);
    c->view.kv = s->pool->data;
    c->view.g = s->pool->geom;
    c->n_blocks = s->n_blocks;
    if (o == kvm_ops_cpu()) {
        c->view.blocks = s->blocks;
        return 0;
    }
    const size_t bytes = (size_t)(s->n_blocks ? s->n_blocks : 1) * sizeof(int32_t);
    int32_t *d = o->alloc(bytes);
    if (!d) return kvm_seterr(KVM_ENOMEM, "c2c: cannot allocate a block table of %d entries", s->n_blocks);
    int rc = o->h2d(d, s->blocks, (size_t)s->n_blocks * sizeof(int32_t));
    if (rc) {
        o->free(d);
        return rc;
    }
    *dev = d;
    c->view.blocks = d;
    return 0;
}

int kvm_c2c_seq_view(const kvm_c2c_fuser_t *f, const kvm_seq_t *s, kvm_c2c_cache_t *c, int32_t **dev) {
    return c2c_view(f, s, c, dev);
}

static double c2c_ms_since(uint64_t t0) { return (double)(kvm_now_ns() - t0) / 1e6; }

int kvm_c2c_close_gates(kvm_c2c_fuser_t *f) {
    if (!f) return kvm_seterr(KVM_EINVAL, "c2c: no fuser");
    for (int l = 0; l < f->cfg.receiver.n_layers; l++) f->layers[l][KVM_C2C_K].open = f->layers[l][KVM_C2C_V].open = false;
    return 0;
}

int kvm_c2c_prefill(kvm_c2c_fuser_t *f, kvm_model_t *receiver, kvm_seq_t *rseq, kvm_model_t *sharer, kvm_kv_pool_t *spool,
                    const int32_t *ids, int n, int n_fuse, float *logits, kvm_c2c_stats_t *st) {
    return kvm_c2c_prefill_ex(f, receiver, rseq, sharer, spool, ids, n, n_fuse, logits, NULL, st);
}

int kvm_c2c_prefill_ex(kvm_c2c_fuser_t *f, kvm_model_t *receiver, kvm_seq_t *rseq, kvm_model_t *sharer, kvm_kv_pool_t *spool,
                       const int32_t *ids, int n, int n_fuse, float *logits, const kvm_c2c_prefill_opts_t *opts,
                       kvm_c2c_stats_t *st) {
    static const kvm_c2c_prefill_opts_t no_opts = {0};
    if (!opts) opts = &no_opts;
    if (!f || !receiver || !rseq || !sharer || !spool || !ids)
        return kvm_seterr(KVM_EINVAL, "c2c prefill: a fuser, both models, the receiver's sequence, the sharer's pool "
                          "and the ids are needed");
    if (n_fuse < 1 || n_fuse > n)
        return kvm_seterr(KVM_EINVAL, "c2c prefill: %d tokens to fuse out of %d (need 1 <= n_fuse <= n)", n_fuse, n);
    if (opts->rest_logits && logits)
        return kvm_seterr(KVM_EINVAL, "c2c prefill: both logits and rest_logits given (rest_logits holds the last row too)");
    if (n_fuse == n && (logits || opts->rest_logits))
        return kvm_seterr(KVM_EINVAL, "c2c prefill: logits asked for, but every token is fused (the last token runs on "
                          "the receiver alone, spec §5: n_fuse < n)");
    if (strcmp(f->cfg.token_alignment, "identity"))
        return kvm_seterr(KVM_EINVAL, "%s: token_alignment '%s' needs the aligner of spec §4: align the conversation "
                          "(kvm_c2c_align_models) and prefill it with kvm_c2c_prefill_aligned; kvm_c2c_prefill takes "
                          "one id list for both models ('identity')", f->json_path, f->cfg.token_alignment);
    if (receiver->ops != f->ops || sharer->ops != f->ops)
        return kvm_seterr(KVM_EINVAL, "%s: the fuser and both models must be on one backend", f->json_path);
    if (rseq->pool->model_id != receiver->model_id || spool->model_id != sharer->model_id)
        return kvm_seterr(KVM_EINVAL, "%s: the receiver's sequence or the sharer's pool belongs to another model",
                          f->json_path);
    const int p0 = rseq->n_tokens;
    kvm_c2c_stats_t s = {.pos0 = p0, .fused_tokens = n_fuse, .n_layers = f->cfg.receiver.n_layers};
    for (int l = 0; l < s.n_layers; l++) s.gates_k_open += f->layers[l][0].open, s.gates_v_open += f->layers[l][1].open;

    /* 1-2. both prefills of the section, at the same positions (the sharer re-reads the receiver's prefix) */
    uint64_t t0 = kvm_now_ns();
    kvm_seq_t *sseq = kvm_seq_create(spool);
    if (!sseq) return kvm_seterr(KVM_ENOMEM, "c2c prefill: cannot make the sharer's sequence");
    int32_t *sids = malloc((size_t)(p0 + n_fuse) * sizeof *sids);
    int32_t *rdev = NULL, *sdev = NULL;
    int rc = 0;
    if (!sids) {
        rc = kvm_seterr(KVM_ENOMEM, "c2c prefill: out of memory");
        goto out;
    }
    if (p0) memcpy(sids, rseq->tokens, (size_t)p0 * sizeof *sids);
    memcpy(sids + p0, opts->sharer_ids ? opts->sharer_ids : ids, (size_t)n_fuse * sizeof *sids);
    kvm_batch_item_t ri = {.seq = rseq, .tokens = ids, .n_tokens = n_fuse};
    kvm_batch_item_t si = {.seq = sseq, .tokens = sids, .n_tokens = p0 + n_fuse};
    if ((rc = kvm_forward(receiver, &ri, 1))) {
        kvm_errctx(rc, "c2c prefill: receiver '%s'", receiver->name);
        goto out;
    }
    if ((rc = kvm_forward(sharer, &si, 1))) {
        kvm_errctx(rc, "c2c prefill: sharer '%s'", sharer->name);
        goto out;
    }
    if (f->ops->sync) f->ops->sync();
    s.prefill_ms = c2c_ms_since(t0);

    /* 3. fuse rows [p0, p0 + n_fuse) in place: they are the receiver's own blocks (the forward copied a shared
     * partial block before writing into it) */
    for (int b = p0 / KVM_KV_BLOCK; b <= (p0 + n_fuse - 1) / KVM_KV_BLOCK; b++)
        if (rseq->pool->refcount[rseq->blocks[b]] != 1) {
            rc = kvm_seterr(KVM_EINVAL, "c2c prefill: block %d of the receiver's sequence is shared; cannot fuse in place", b);
            goto out;
        }
    t0 = kvm_now_ns();
    kvm_c2c_cache_t rc_view, sc_view;
    if ((rc = c2c_view(f, rseq, &rc_view, &rdev)) || (rc = c2c_view(f, sseq, &sc_view, &sdev)) ||
        (rc = opts->skip_fuse ? 0 : kvm_c2c_fuse(f, &rc_view, &sc_view, p0, n_fuse)))
        goto out;
    if (f->ops->sync) f->ops->sync();
    s.fuse_ms = c2c_ms_since(t0);

    /* 4. the sharer's KV is not needed after the fusion */
    kvm_seq_destroy(sseq);
    sseq = NULL;

    /* 5. the rest, receiver only, over the fused cache */
    if (n_fuse < n) {
        t0 = kvm_now_ns();
        kvm_batch_item_t li = {.seq = rseq, .tokens = ids + n_fuse, .n_tokens = n - n_fuse,
                               .logits = opts->rest_logits ? opts->rest_logits : logits, .all_logits = opts->rest_logits != NULL};
        if ((rc = kvm_forward(receiver, &li, 1))) {
            kvm_errctx(rc, "c2c prefill: receiver '%s' after the fused section", receiver->name);
            goto out;
        }
        s.rest_ms = c2c_ms_since(t0);
    }
out:
    if (rdev) f->ops->free(rdev);
    if (sdev) f->ops->free(sdev);
    if (sseq) kvm_seq_destroy(sseq);
    free(sids);
    if (rc) kvm_seq_truncate(rseq, p0);
    else if (st) *st = s;
    return rc;
}

/* ---- untrained fusers (spec §7 layout, random weights) ------------------------------------------------------ */

typedef struct c2c_w {
    kvm_st_entry_t *e;
    int n, cap;
    kvm_dtype_t dt;
    kvm_rng_t rng;
    int rc;
} c2c_w_t;

/* Appends tensor `name` of shape [d0] or [d0, d1]: U(-amp, amp) + base. */
static void c2c_w_add(c2c_w_t *w, const char *name, kvm_dtype_t dt, int64_t d0, int64_t d1, double amp, double base) {
    if (w->rc) return;
    if (w->n == w->cap) {
        int cap = w->cap ? 2 * w->cap : 64;
        kvm_st_entry_t *e = realloc(w->e, (size_t)cap * sizeof *e);
        if (!e) {
            w->rc = kvm_seterr(KVM_ENOMEM, "c2c init: out of memory");
            return;
        }
        w->e = e, w->cap = cap;
    }
    const size_t cnt = (size_t)d0 * (size_t)(d1 ? d1 : 1);
    void *p = malloc(cnt * kvm_dtype_size(dt));
    char *nm = strdup(name);
    if (!p || !nm) {
        free(p), free(nm);
        w->rc = kvm_seterr(KVM_ENOMEM, "c2c init: out of memory");
        return;
    }
    for (size_t i = 0; i < cnt; i++) {
        const float v = (float)(base + amp * (2.0 * kvm_rng_double(&w->rng) - 1.0));
        if (dt == KVM_F32) ((float *)p)[i] = v;
        else if (dt == KVM_BF16) ((uint16_t *)p)[i] = kvm_f32_to_bf16(v);
        else ((uint16_t *)p)[i] = kvm_f32_to_f16(v);
    }
    kvm_st_entry_t *e = &w->e[w->n++];
    memset(e, 0, sizeof *e);
    e->name = nm, e->dtype = dt, e->ndim = d1 ? 2 : 1, e->shape[0] = d0, e->shape[1] = d1, e->data = p;
}

static void c2c_w_stack(c2c_w_t *w, const char *pre, const char *stack, int H) {
    char nm[96];
    snprintf(nm, sizeof nm, "%s.%s.0.norm", pre, stack);
    c2c_w_add(w, nm, w->dt, H, 0, 0.1, 1.0);
    snprintf(nm, sizeof nm, "%s.%s.0.up", pre, stack);
    c2c_w_add(w, nm, w->dt, H, H, 1.0 / sqrt(H), 0);
    snprintf(nm, sizeof nm, "%s.%s.0.down", pre, stack);
    c2c_w_add(w, nm, w->dt, H, H, 1.0 / sqrt(H), 0);
}

/* Parses o->closed ("k0,v5") into closed[l][b]. */
static int c2c_closed(const char *spec, int lr, bool (*closed)[2]) {
    for (const char *p = spec; p && *p;) {
        const char *e = strchr(p, ',');
        const size_t len = e ? (size_t)(e - p) : strlen(p);
        char item[16], *end;
        if (len == 0 || len >= sizeof item)
            return kvm_seterr(KVM_EINVAL, "c2c init: closed gates '%s': each item is k<layer> or v<layer>", spec);
        memcpy(item, p, len), item[len] = 0;
        long l = strtol(item + 1, &end, 10);
        if ((item[0] != 'k' && item[0] != 'v') || end == item + 1 || *end || l < 0 || l >= lr)
            return kvm_seterr(KVM_EINVAL, "c2c init: closed gate '%s' is not k<layer> or v<layer> with a layer in [0, %d)",
                              item, lr);
        closed[l][item[0] == 'v'] = true;
        p = e ? e + 1 : p + len;
    }
    return 0;
}

static const char *c2c_layout(kvm_rope_layout_t l) { return l == KVM_ROPE_HALF ? "half" : "interleaved"; }

static void c2c_json_model(FILE *fp, const char *role, const kvm_c2c_model_desc_t *m) {
    fprintf(fp, "  \"%s\": {\"model\": \"", role);
    for (const char *c = m->model; *c; c++)
        if (*c != '"' && *c != '\\' && (unsigned char)*c >= 0x20) fputc(*c, fp);
    fprintf(fp, "\", \"n_layers\": %d, \"n_kv_heads\": %d, \"head_dim\": %d, \"rope\": {\"layout\": \"%s\", "
                "\"theta\": %.17g}, \"tokenizer_sha256\": \"%s\"},\n",
            m->n_layers, m->n_kv_heads, m->head_dim, c2c_layout(m->rope_layout), m->rope_theta, m->tokenizer_sha256);
}

int kvm_c2c_write_untrained(const char *json_path, kvm_model_t *receiver, kvm_model_t *sharer,
                            const kvm_c2c_init_opts_t *o) {
    static const kvm_c2c_init_opts_t defaults = {0};
    if (!o) o = &defaults;
    const char *suffix = ".c2c.json";
    const size_t jl = json_path ? strlen(json_path) : 0;
    if (jl <= strlen(suffix) || strcmp(json_path + jl - strlen(suffix), suffix))
        return kvm_seterr(KVM_EINVAL, "c2c init: the output '%s' must be a path ending in .c2c.json", json_path ? json_path : "");
    kvm_c2c_pair_t pair;
    int rc = c2c_pair_of(receiver, sharer, &pair);
    if (rc) return rc;
    const int H = o->hidden ? o->hidden : 64;
    if (H < 1 || H > 4096) return kvm_seterr(KVM_EINVAL, "c2c init: hidden %d is not in [1, 4096]", H);
    const char *dts = o->dtype ? o->dtype : "f32";
    kvm_dtype_t dt;
    if (!strcmp(dts, "f32")) dt = KVM_F32;
    else if (!strcmp(dts, "bf16")) dt = KVM_BF16;
    else if (!strcmp(dts, "f16")) dt = KVM_F16;
    else return kvm_seterr(KVM_EINVAL, "c2c init: dtype '%s' is not one of f32, bf16, f16", dts);
    const char *align = o->token_alignment ? o->token_alignment : "identity";
    if (strcmp(align, "identity") && strcmp(align, "first") && strcmp(align, "longest"))
        return kvm_seterr(KVM_EINVAL, "c2c init: token_alignment '%s' is not one of identity, first, longest", align);
    const kvm_c2c_model_desc_t *R = &pair.receiver, *S = &pair.sharer;
    const int lr = R->n_layers, ls = S->n_layers;
    bool(*closed)[2] = calloc((size_t)lr, sizeof *closed);
    if (!closed) return kvm_seterr(KVM_ENOMEM, "c2c init: out of memory");
    if ((rc = c2c_closed(o->closed, lr, closed))) {
        free(closed);
        return rc;
    }

    /* the weights file beside the config: <name>.c2c.safetensors */
    const size_t stem = jl - strlen(suffix);
    char *wpath = malloc(stem + 32);
    const char *slash = strrchr(json_path, '/');
    const char *base = slash ? slash + 1 : json_path;
    const int base_len = (int)(json_path + stem - base);
    c2c_w_t w = {.dt = dt};
    kvm_rng_seed(&w.rng, o->seed);
    if (!wpath) rc = kvm_seterr(KVM_ENOMEM, "c2c init: out of memory");
    else snprintf(wpath, stem + 32, "%.*s.c2c.safetensors", (int)stem, json_path);
    const int ct = R->n_kv_heads * R->head_dim, cin = S->n_kv_heads * S->head_dim + ct;
    char pre[32], nm[96];
    for (int l = 0; l < lr && !rc; l++)
        for (int b = 0; b < 2; b++) {
            snprintf(pre, sizeof pre, "layers.%d.%c", l, b ? 'v' : 'k');
#define C2C_T(suffix_, d0, d1, amp, base_) \
    (snprintf(nm, sizeof nm, "%s.%s", pre, suffix_), c2c_w_add(&w, nm, dt, d0, d1, amp, base_))
            C2C_T("in.weight", H, cin, 1.0 / sqrt(cin), 0);
            C2C_T("in.bias", H, 0, 0.1, 0);
            c2c_w_stack(&w, pre, "trunk", H);
            c2c_w_stack(&w, pre, "proj", H);
            C2C_T("out.weight", ct, H, 1.0 / sqrt(H), 0);
            C2C_T("out.bias", ct, 0, 0.1, 0);
            c2c_w_stack(&w, pre, "wgt", H);
            C2C_T("wgt_head.weight", R->n_kv_heads, H, 1.0 / sqrt(H), 0);
            C2C_T("wgt_head.bias", R->n_kv_heads, 0, 0.5, 0);
#undef C2C_T
            snprintf(nm, sizeof nm, "%s.gate", pre);
            c2c_w_add(&w, nm, KVM_F32, 1, 0, 0, closed[l][b] ? -1.0 : 1.0);
        }
    if (!rc) rc = w.rc;
    if (!rc) rc = kvm_st_write(wpath, w.e, w.n);
    char hex[65] = "";
    if (!rc) rc = kvm_sha256_file_hex(wpath, hex);
    FILE *fp = NULL;
    if (!rc && !(fp = fopen(json_path, "w"))) rc = kvm_seterr(KVM_EIO, "c2c init: cannot write '%s'", json_path);
    if (!rc) {
        fprintf(fp, "{\n  \"format\": \"kvmesh.c2c\", \"version\": 1,\n");
        c2c_json_model(fp, "receiver", R);
        c2c_json_model(fp, "sharer", S);
        fprintf(fp, "  \"hidden\": %d, \"inner\": %d, \"trunk_blocks\": 1, \"proj_blocks\": 1, \"wgt_blocks\": 1, "
                    "\"wgt_inner\": %d,\n  \"norm_eps\": 1e-6, \"activation\": \"gelu_erf\", \"dtype\": \"%s\",\n  \"layer_map\": [",
                H, H, H, dts);
        for (int l = 0; l < lr; l++) {
            int m = l + ls - lr;
            fprintf(fp, "%s%d", l ? ", " : "", m < 0 ? 0 : m > ls - 1 ? ls - 1 : m);
        }
        fprintf(fp, "],\n  \"gates_open\": {\"k\": [");
        for (int l = 0; l < lr; l++) fprintf(fp, "%s%s", l ? ", " : "", closed[l][0] ? "false" : "true");
        fprintf(fp, "], \"v\": [");
        for (int l = 0; l < lr; l++) fprintf(fp, "%s%s", l ? ", " : "", closed[l][1] ? "false" : "true");
        fprintf(fp, "]},\n  \"token_alignment\": \"%s\", \"fuse_tokens\": \"%s\", "
                    "\"chat_template\": \"receiver\",\n  \"weights_file\": \"%.*s.c2c.safetensors\", \"weights_sha256\": \"%s\",\n",
                align, strcmp(align, "identity") ? "message_tokens" : "prompt_except_last", base_len, base, hex);
        fprintf(fp, "  \"provenance\": {\"source\": \"kvmesh c2c init: UNTRAINED random weights (seed %llu); carries no "
                    "information\"}\n}\n", (unsigned long long)o->seed);
        if (fclose(fp)) rc = kvm_seterr(KVM_EIO, "c2c init: cannot write '%s'", json_path);
    }
    for (int i = 0; i < w.n; i++) free((void *)w.e[i].name), free((void *)w.e[i].data);
    free(w.e);
    free(wpath);
    free(closed);
    return rc;
}
