/* test_c2c_common.h - what the C2C tests share: a writer of small random fusers in the layout of
 * ../shared/spec/c2c.md §7 (the tensors as a list the malformed-file tests can edit before writing), an fp64
 * reference of spec §2.2 that reads the weights by name from the safetensors file, and paged caches filled at
 * random. Everything static: a test program carries only what it uses. */
#ifndef KVM_TEST_C2C_COMMON_H
#define KVM_TEST_C2C_COMMON_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/comm/c2c.h"
#include "runtime/core/sha256.h"
#include "runtime/model/safetensors.h"

#define TCC_MAX_LAYERS 8
#define TCC_MAX_T 160

/* The shapes of a test fuser. */
typedef struct tcc_spec {
    int lr, ht, dt;          /* receiver layers, KV heads, head_dim */
    int ls, hs, ds;          /* sharer */
    int H, I, Iw, tb, pb, wb;
    kvm_dtype_t dtype;
    int layer_map[TCC_MAX_LAYERS];
    float gate[TCC_MAX_LAYERS][2]; /* logits, K then V */
    float scale;             /* weights ~ U(-scale, scale) / sqrt(fan_in) */
    unsigned seed;
} tcc_spec_t;

/* A default: receiver 2 layers, 2 KV heads x 8; sharer 3 layers, 1 KV head x 16; hidden 24, inner 20; one
 * block each; terminal layer map; every gate open except layer 1's V. */
static inline tcc_spec_t tcc_spec_default(kvm_dtype_t dt) {
    tcc_spec_t s = {.lr = 2, .ht = 2, .dt = 8, .ls = 3, .hs = 1, .ds = 16, .H = 24, .I = 20, .Iw = 24, .tb = 1, .pb = 1,
                    .wb = 1, .dtype = dt, .scale = 1.0f, .seed = 7};
    for (int l = 0; l < s.lr; l++) {
        int m = l + s.ls - s.lr;
        s.layer_map[l] = m < 0 ? 0 : m;
        s.gate[l][0] = 0.5f + l;
        s.gate[l][1] = 1.0f;
    }
    s.gate[1][1] = -0.25f;
    return s;
}

/* The tensors of a fuser, editable before writing (names and data owned here). */
typedef struct tcc_tensors {
    kvm_st_entry_t e[TCC_MAX_T];
    int n;
} tcc_tensors_t;

static inline float tcc_rand(unsigned *st) {
    *st = *st * 1664525u + 1013904223u;
    return ((*st >> 8) / 16777216.0f) * 2.0f - 1.0f;
}

/* Appends a tensor of shape [d0] or [d0, d1] filled with U(-amp, amp) (or `fill` when amp == 0). */
static inline void tcc_add(tcc_tensors_t *t, const char *name, kvm_dtype_t dt, int64_t d0, int64_t d1, float amp,
                           float fill, unsigned *rng) {
    kvm_st_entry_t *e = &t->e[t->n++];
    e->name = strdup(name);
    e->dtype = dt;
    e->ndim = d1 ? 2 : 1;
    e->shape[0] = d0;
    e->shape[1] = d1;
    size_t n = (size_t)d0 * (size_t)(d1 ? d1 : 1);
    void *p = calloc(n ? n : 1, kvm_dtype_size(dt));
    for (size_t i = 0; i < n; i++) {
        float v = amp ? amp * tcc_rand(rng) : fill;
        if (dt == KVM_F32) ((float *)p)[i] = v;
        else if (dt == KVM_BF16) ((uint16_t *)p)[i] = kvm_f32_to_bf16(v);
        else ((uint16_t *)p)[i] = kvm_f32_to_f16(v);
    }
    e->data = p;
}

static inline void tcc_tensors_free(tcc_tensors_t *t) {
    for (int i = 0; i < t->n; i++) {
        free((void *)t->e[i].name);
        free((void *)t->e[i].data);
    }
    t->n = 0;
}

/* Index of the tensor called name, or -1. */
static inline int tcc_find(const tcc_tensors_t *t, const char *name) {
    for (int i = 0; i < t->n; i++)
        if (!strcmp(t->e[i].name, name)) return i;
    return -1;
}

static inline void tcc_stack(tcc_tensors_t *t, const tcc_spec_t *s, const char *pre, const char *stack, int blocks, int inner,
                             unsigned *rng) {
    char nm[128];
    for (int j = 0; j < blocks; j++) {
        snprintf(nm, sizeof nm, "%s.%s.%d.norm", pre, stack, j);
        tcc_add(t, nm, s->dtype, s->H, 0, 0.5f, 0, rng);
        /* norm g around 1: shift after the fact */
        for (int i = 0; i < s->H; i++) {
            if (s->dtype == KVM_F32) ((float *)t->e[t->n - 1].data)[i] += 1.0f;
            else {
                uint16_t *p = (uint16_t *)t->e[t->n - 1].data;
                float v = (s->dtype == KVM_BF16 ? kvm_bf16_to_f32(p[i]) : kvm_f16_to_f32(p[i])) + 1.0f;
                p[i] = s->dtype == KVM_BF16 ? kvm_f32_to_bf16(v) : kvm_f32_to_f16(v);
            }
        }
        snprintf(nm, sizeof nm, "%s.%s.%d.up", pre, stack, j);
        tcc_add(t, nm, s->dtype, inner, s->H, s->scale / sqrtf((float)s->H), 0, rng);
        snprintf(nm, sizeof nm, "%s.%s.%d.down", pre, stack, j);
        tcc_add(t, nm, s->dtype, s->H, inner, s->scale / sqrtf((float)inner), 0, rng);
    }
}

/* Every tensor of spec §7.2 for s, in a fixed order, with random values. */
static inline void tcc_make(const tcc_spec_t *s, tcc_tensors_t *t) {
    unsigned rng = s->seed;
    memset(t, 0, sizeof *t);
    const int ct = s->ht * s->dt, cin = s->hs * s->ds + ct;
    char pre[32], nm[128];
    for (int l = 0; l < s->lr; l++)
        for (int b = 0; b < 2; b++) {
            snprintf(pre, sizeof pre, "layers.%d.%c", l, b ? 'v' : 'k');
#define TCC_T(suffix, d0, d1, amp) (snprintf(nm, sizeof nm, "%s.%s", pre, suffix), tcc_add(t, nm, s->dtype, d0, d1, amp, 0, &rng))
            TCC_T("in.weight", s->H, cin, s->scale / sqrtf((float)cin));
            TCC_T("in.bias", s->H, 0, 0.1f);
            tcc_stack(t, s, pre, "trunk", s->tb, s->I, &rng);
            tcc_stack(t, s, pre, "proj", s->pb, s->I, &rng);
            TCC_T("out.weight", ct, s->H, s->scale / sqrtf((float)s->H));
            TCC_T("out.bias", ct, 0, 0.1f);
            tcc_stack(t, s, pre, "wgt", s->wb, s->Iw, &rng);
            TCC_T("wgt_head.weight", s->ht, s->H, s->scale / sqrtf((float)s->H));
            TCC_T("wgt_head.bias", s->ht, 0, 0.5f);
#undef TCC_T
            snprintf(nm, sizeof nm, "%s.gate", pre);
            tcc_add(t, nm, KVM_F32, 1, 0, 0, s->gate[l][b], &rng);
        }
}

/* Writes dir/<name>.c2c.json for s naming <name>.c2c.safetensors, with weights_sha256 of that file as it is now,
 * and `extra` (a JSON fragment starting with ',' or "") appended to the top-level object. Returns the path in
 * a static buffer. The gates_open lists follow s->gate. */
static inline const char *tcc_write_json(const char *dir, const char *name, const tcc_spec_t *s, const char *extra) {
    static char jp[512];
    char wp[512], hex[65] = "";
    snprintf(wp, sizeof wp, "%s/%s.c2c.safetensors", dir, name);
    snprintf(jp, sizeof jp, "%s/%s.c2c.json", dir, name);
    if (kvm_sha256_file_hex(wp, hex)) memset(hex, '0', 64), hex[64] = 0;
    FILE *fp = fopen(jp, "w");
    fprintf(fp, "{\"format\": \"kvmesh.c2c\", \"version\": 1,\n");
    fprintf(fp, " \"receiver\": {\"model\": \"r\", \"n_layers\": %d, \"n_kv_heads\": %d, \"head_dim\": %d, \"rope\": "
                "{\"layout\": \"half\", \"theta\": 10000}, \"tokenizer_sha256\": \"%064d\"},\n", s->lr, s->ht, s->dt, 1);
    fprintf(fp, " \"sharer\": {\"model\": \"s\", \"n_layers\": %d, \"n_kv_heads\": %d, \"head_dim\": %d, \"rope\": "
                "{\"layout\": \"half\", \"theta\": 500000}, \"tokenizer_sha256\": \"%064d\"},\n", s->ls, s->hs, s->ds, 2);
    fprintf(fp, " \"hidden\": %d, \"inner\": %d, \"trunk_blocks\": %d, \"proj_blocks\": %d, \"wgt_blocks\": %d, "
                "\"wgt_inner\": %d, \"norm_eps\": 1e-6, \"activation\": \"gelu_erf\", \"dtype\": \"%s\",\n", s->H, s->I,
            s->tb, s->pb, s->wb, s->Iw, s->dtype == KVM_F32 ? "f32" : s->dtype == KVM_BF16 ? "bf16" : "f16");
    fprintf(fp, " \"layer_map\": [");
    for (int l = 0; l < s->lr; l++) fprintf(fp, "%s%d", l ? ", " : "", s->layer_map[l]);
    fprintf(fp, "],\n \"gates_open\": {\"k\": [");
    for (int l = 0; l < s->lr; l++) fprintf(fp, "%s%s", l ? ", " : "", s->gate[l][0] > 0 ? "true" : "false");
    fprintf(fp, "], \"v\": [");
    for (int l = 0; l < s->lr; l++) fprintf(fp, "%s%s", l ? ", " : "", s->gate[l][1] > 0 ? "true" : "false");
    fprintf(fp, "]},\n \"token_alignment\": \"identity\", \"fuse_tokens\": \"prompt_except_last\", \"chat_template\": "
                "\"qwen3_no_think\", \"weights_file\": \"%s.c2c.safetensors\", \"weights_sha256\": \"%s\",\n", name, hex);
    fprintf(fp, " \"provenance\": {\"source\": \"tests (C generator)\"}%s}\n", extra ? extra : "");
    fclose(fp);
    return jp;
}

/* tcc_make + write both files; returns the config path (static buffer). */
static inline const char *tcc_write_fuser(const char *dir, const char *name, const tcc_spec_t *s) {
    tcc_tensors_t t;
    tcc_make(s, &t);
    char wp[512];
    snprintf(wp, sizeof wp, "%s/%s.c2c.safetensors", dir, name);
    int rc = kvm_st_write(wp, t.e, t.n);
    tcc_tensors_free(&t);
    return rc ? NULL : tcc_write_json(dir, name, s, "");
}

/* ---- the fp64 reference of spec §2.2, weights read by name ----------------------------------------- */

static inline double tcc_w(const kvm_st_file_t *st, const char *name, size_t i) {
    const kvm_st_tensor_t *t = kvm_st_find(st, name);
    if (!t) {
        fprintf(stderr, "reference: no tensor %s\n", name);
        abort();
    }
    kvm_tensor_t v = {.data = t->data, .dtype = t->dtype};
    return kvm_tensor_get(&v, i);
}

/* y[rows] = W[rows][cols] . x (+ b) */
static inline void tcc_lin(const kvm_st_file_t *st, const char *pre, const char *w, const char *b, const double *x, int rows,
                           int cols, double *y) {
    char nw[256], nb[256];
    snprintf(nw, sizeof nw, "%s.%s", pre, w);
    snprintf(nb, sizeof nb, "%s.%s", pre, b ? b : "");
    for (int r = 0; r < rows; r++) {
        double s = b ? tcc_w(st, nb, (size_t)r) : 0;
        for (int c = 0; c < cols; c++) s += tcc_w(st, nw, (size_t)r * cols + c) * x[c];
        y[r] = s;
    }
}

static inline void tcc_ffn(const kvm_st_file_t *st, const char *pre, const char *stack, int blocks, int H, int inner,
                           double eps, double *h) {
    double t[1024], u[1024];
    char nm[160];
    for (int j = 0; j < blocks; j++) {
        double ss = 0;
        for (int i = 0; i < H; i++) ss += h[i] * h[i];
        double inv = 1.0 / sqrt(ss / H + eps);
        snprintf(nm, sizeof nm, "%s.%s.%d.norm", pre, stack, j);
        for (int i = 0; i < H; i++) t[i] = h[i] * inv * tcc_w(st, nm, (size_t)i);
        snprintf(nm, sizeof nm, "%s.%s.%d", pre, stack, j);
        tcc_lin(st, nm, "up", NULL, t, inner, H, u);
        for (int i = 0; i < inner; i++) u[i] = 0.5 * u[i] * (1.0 + erf(u[i] / sqrt(2.0)));
        tcc_lin(st, nm, "down", NULL, u, H, inner, t);
        for (int i = 0; i < H; i++) h[i] += t[i];
    }
}

/* One token of one branch: x = [xs | xr] (length Hs*Ds + Ht*Dt) -> residual res[Ht*Dt] = w[h] * y (no gate). */
static inline void tcc_ref_token(const kvm_st_file_t *st, const kvm_c2c_config_t *c, int l, int b, const double *x,
                                 double *res) {
    const int H = c->hidden, ht = c->receiver.n_kv_heads, dt = c->receiver.head_dim, ct = ht * dt;
    const int cin = c->sharer.n_kv_heads * c->sharer.head_dim + ct;
    char pre[32];
    snprintf(pre, sizeof pre, "layers.%d.%c", l, b ? 'v' : 'k');
    double h[1024], a[1024], y[1024], w[64];
    tcc_lin(st, pre, "in.weight", "in.bias", x, H, cin, h);
    tcc_ffn(st, pre, "trunk", c->trunk_blocks, H, c->inner, c->norm_eps, h);
    memcpy(a, h, sizeof(double) * H);
    tcc_ffn(st, pre, "proj", c->proj_blocks, H, c->inner, c->norm_eps, a);
    tcc_lin(st, pre, "out.weight", "out.bias", a, ct, H, y);
    tcc_ffn(st, pre, "wgt", c->wgt_blocks, H, c->wgt_inner, c->norm_eps, h);
    tcc_lin(st, pre, "wgt_head.weight", "wgt_head.bias", h, ht, H, w);
    for (int hh = 0; hh < ht; hh++) {
        double sg = 1.0 / (1.0 + exp(-w[hh]));
        for (int d = 0; d < dt; d++) res[hh * dt + d] = sg * y[hh * dt + d];
    }
}

/* ---- paged caches on the CPU backend ------------------------------------------------------------- */

typedef struct tcc_cache {
    kvm_c2c_cache_t c;
    int32_t *blocks;
    void *kv;
    size_t elems;
} tcc_cache_t;

/* A pool of nb blocks for L x H x D in dtype dt, filled with U(-1, 1); the sequence's block table uses the
 * blocks in reverse order (so that a wrong block lookup shows). */
static inline void tcc_cache_make(tcc_cache_t *t, int L, int H, int D, kvm_dtype_t dt, int nb, unsigned seed) {
    t->elems = (size_t)nb * L * 2 * H * KVM_KV_BLOCK * D;
    t->kv = calloc(t->elems, kvm_dtype_size(dt));
    t->blocks = calloc((size_t)nb, sizeof(int32_t));
    for (int i = 0; i < nb; i++) t->blocks[i] = nb - 1 - i;
    for (size_t i = 0; i < t->elems; i++) {
        float v = tcc_rand(&seed);
        if (dt == KVM_F32) ((float *)t->kv)[i] = v;
        else if (dt == KVM_BF16) ((uint16_t *)t->kv)[i] = kvm_f32_to_bf16(v);
        else ((uint16_t *)t->kv)[i] = kvm_f32_to_f16(v);
    }
    t->c.view = (kvm_c2c_cache_view_t){.kv = t->kv, .g = {.n_layers = L, .n_kv_heads = H, .head_dim = D, .dtype = dt},
                                       .blocks = t->blocks};
    t->c.n_blocks = nb;
}

static inline void tcc_cache_free(tcc_cache_t *t) {
    free(t->kv);
    free(t->blocks);
}

/* Element (l, kv, h, p, d) of a cache as fp32. */
static inline float tcc_cache_get(const tcc_cache_t *t, const void *kv, int l, int b, int h, int p, int d) {
    const kvm_kv_geom_t *g = &t->c.view.g;
    size_t i = ((((size_t)t->blocks[p / KVM_KV_BLOCK] * g->n_layers + l) * 2 + b) * g->n_kv_heads + h) * KVM_KV_BLOCK * g->head_dim +
               (size_t)(p % KVM_KV_BLOCK) * g->head_dim + d;
    kvm_tensor_t v = {.data = kv, .dtype = g->dtype};
    return kvm_tensor_get(&v, i);
}

#endif
