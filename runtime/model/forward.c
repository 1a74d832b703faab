/* forward.c - the backend-neutral transformer forward over batches of sequences.
 *
 * Llama-family block: x += Wo·attn(rope(norm(x)·Wq), rope(norm(x)·Wk), norm(x)·Wv);
 *                     x += Wdown·(silu(norm(x)·Wgate) * norm(x)·Wup); logits = norm(x)·lm_headᵀ.
 * Qwen2 adds q/k/v biases, Qwen3 an RMSNorm per head on q and k before RoPE. Every op goes through
 * the model's kvm_ops_t, so the same code runs on the CPU reference and on CUDA. */
#include "forward.h"
#include "../core/vec.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KVM_GRAPH_SLOTS 8 /* decode-step graphs kept per model (forward.c: graph_find) */

typedef struct kvm_backend_layer {
    kvm_wmat_t wq, wk, wv, wo, w_gate, w_up, w_down;
    float *attn_norm, *ffn_norm, *bq, *bk, *bv, *q_norm, *k_norm; /* fp32, backend memory */
} kvm_backend_layer_t;

typedef struct kvm_backend_model {
    int layer_limit; /* kvm_forward_layers: run only the first layer_limit layers (0 = all) */
    const kvm_ops_t *ops;
    kvm_backend_layer_t *layers;
    kvm_wmat_t tok_emb, lm_head;
    float *final_norm;
    float *inv_freq;           /* backend copy of m->inv_freq */
    void **owned;              /* backend allocations to free */
    int n_owned, cap_owned;
    /* workspace for max_rows rows */
    int max_rows, max_logit_rows;
    float *x, *xb, *q, *k, *v, *att, *hb, *hb2, *logits, *last;
    int32_t *ids, *pos, *row_start, *ctx_len, *block_table;
    int32_t *next_ids, *h_next_ids; /* [max_logit_rows] greedy tokens of the logits rows (backend, host) */
    int max_seqs, max_blocks_total;
    /* host staging */
    int32_t *h_ids, *h_pos, *h_row_start, *h_ctx_len, *h_block_table;
    /* CUDA graphs of the device part of decode steps (backends with graph ops), one per step shape, the least
     * recently used replaced: agents that take turns (each its own batch and context bucket, and a reused
     * prompt's 1-row first pass) each replay their own instead of evicting one another's. A shape is captured
     * the second time it is seen eagerly (warm: the last KVM_GRAPH_SLOTS eager shapes). */
    struct {
        void *graph;
        uint64_t key, used;
    } graphs[KVM_GRAPH_SLOTS];
    uint64_t warm[KVM_GRAPH_SLOTS];
    uint64_t graph_tick;
    int warm_next;
    bool graphs_off;      /* a capture failed once: decode runs eagerly from then on */
    bool graphs_disabled; /* kvm_load_opts_t.no_cuda_graphs / kvm_forward_set_graphs */
    bool kv_dtype_set;    /* kvm_load_opts_t.kv_dtype: the dtype of the model's KV pools */
    kvm_dtype_t kv_dtype;
    /* kvm_forward_attn_mass: while set, each layer's attention probabilities of the rows at positions >= mass_from
     * are added to mass[mass_n] (backend memory) by ops->attn_mass */
    float *mass;
    int mass_n, mass_from;
} kvm_backend_model_t;

static void *bm_alloc(kvm_backend_model_t *b, size_t bytes) {
    if (b->n_owned == b->cap_owned) {
        int cap = b->cap_owned ? b->cap_owned * 2 : 64;
        void **n = kvm_realloc(b->owned, (size_t)cap * sizeof(void *));
        if (!n) return NULL;
        b->owned = n;
        b->cap_owned = cap;
    }
    void *p = b->ops->alloc(bytes ? bytes : 1);
    if (p) b->owned[b->n_owned++] = p;
    return p;
}

static void bm_release(kvm_backend_model_t *b, void *p) {
    if (!p) return;
    for (int i = 0; i < b->n_owned; i++)
        if (b->owned[i] == p) {
            b->ops->free(p);
            b->owned[i] = b->owned[--b->n_owned];
            return;
        }
}

/* fp32 copy of a small tensor (norm weight, bias) in backend memory; NULL data -> NULL. */
static int upload_vec(kvm_backend_model_t *b, const kvm_model_t *m, const kvm_tensor_t *t, float **out) {
    *out = NULL;
    if (!t->data) return 0;
    size_t n = (size_t)t->shape[0];
    if (m->weights_on_device) {
        if (t->dtype != KVM_F32) return kvm_seterr(KVM_EINTERNAL, "device-resident norm/bias must be F32");
        *out = (float *)t->data;
        return 0;
    }
    float *h = kvm_malloc(n * sizeof(float));
    if (!h) return KVM_ENOMEM;
    for (size_t i = 0; i < n; i++) h[i] = kvm_tensor_get(t, i);
    float *d = bm_alloc(b, n * sizeof(float));
    int rc = d ? b->ops->h2d(d, h, n * sizeof(float)) : KVM_ENOMEM;
    kvm_free(h);
    if (rc) return rc;
    *out = d;
    return 0;
}

/* A matrix view in backend memory: the mapping itself on the CPU, an uploaded (converted) copy elsewhere. */
static int upload_mat(kvm_backend_model_t *b, const kvm_model_t *m, const kvm_tensor_t *t, kvm_wmat_t *out) {
    out->rows = (int)t->shape[0];
    out->cols = (int)t->shape[1];
    if (m->weights_on_device || b->ops == kvm_ops_cpu()) {
        out->data = t->data;
        out->dtype = t->dtype;
        return 0;
    }
    kvm_dtype_t dt = m->device_dtype;
    size_t n = (size_t)out->rows * out->cols;
    void *h = NULL;
    const void *src = t->data;
    if (dt != t->dtype) {
        h = kvm_malloc(n * kvm_dtype_size(dt));
        if (!h) return KVM_ENOMEM;
        for (size_t i = 0; i < n; i++) {
            float f = kvm_tensor_get(t, i);
            if (dt == KVM_F32) ((float *)h)[i] = f;
            else if (dt == KVM_BF16) ((uint16_t *)h)[i] = kvm_f32_to_bf16(f);
            else ((uint16_t *)h)[i] = kvm_f32_to_f16(f);
        }
        src = h;
    }
    void *d = bm_alloc(b, n * kvm_dtype_size(dt));
    int rc = d ? b->ops->h2d(d, src, n * kvm_dtype_size(dt)) : KVM_ENOMEM;
    kvm_free(h);
    if (rc) return rc;
    out->data = d;
    out->dtype = dt;
    return 0;
}

static void drop_graph(kvm_backend_model_t *b) {
    for (int i = 0; i < KVM_GRAPH_SLOTS; i++) {
        if (b->graphs[i].graph && b->ops->graph_free) b->ops->graph_free(b->graphs[i].graph);
        b->graphs[i].graph = NULL;
        b->graphs[i].key = b->graphs[i].used = 0;
        b->warm[i] = 0;
    }
}

/* The slot holding the graph of step shape key, or -1. */
static int graph_find(const kvm_backend_model_t *b, uint64_t key) {
    for (int i = 0; i < KVM_GRAPH_SLOTS; i++)
        if (b->graphs[i].graph && b->graphs[i].key == key) return i;
    return -1;
}

static bool graph_warm(const kvm_backend_model_t *b, uint64_t key) {
    for (int i = 0; i < KVM_GRAPH_SLOTS; i++)
        if (b->warm[i] == key) return true;
    return false;
}

/* The slot a new graph goes to: an empty one, else the least recently used (its graph freed). */
static int graph_victim(kvm_backend_model_t *b) {
    int v = 0;
    for (int i = 0; i < KVM_GRAPH_SLOTS; i++) {
        if (!b->graphs[i].graph) return i;
        if (b->graphs[i].used < b->graphs[v].used) v = i;
    }
    b->ops->graph_free(b->graphs[v].graph);
    b->graphs[v].graph = NULL;
    b->graphs[v].key = 0;
    return v;
}

static void free_workspace(kvm_backend_model_t *b) {
    drop_graph(b); /* the graph points into the workspace */
    void *bufs[] = {b->x, b->xb, b->q, b->k, b->v, b->att, b->hb, b->hb2, b->logits, b->last,
                    b->ids, b->pos, b->row_start, b->ctx_len, b->block_table};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) bm_release(b, bufs[i]);
    b->x = b->xb = b->q = b->k = b->v = b->att = b->hb = b->hb2 = b->logits = b->last = NULL;
    b->ids = b->pos = b->row_start = b->ctx_len = b->block_table = NULL;
    bm_release(b, b->next_ids);
    b->next_ids = NULL;
    kvm_free(b->h_next_ids);
    b->h_next_ids = NULL;
    kvm_free(b->h_ids);
    kvm_free(b->h_pos);
    kvm_free(b->h_row_start);
    kvm_free(b->h_ctx_len);
    kvm_free(b->h_block_table);
    b->h_ids = b->h_pos = b->h_row_start = b->h_ctx_len = b->h_block_table = NULL;
    b->max_rows = b->max_logit_rows = b->max_seqs = b->max_blocks_total = 0;
}

/* Sizes the workspace for rows tokens per step, seqs sequences, blocks block-table entries, logit_rows
 * rows of logits. Only grows. */
/* Values per row of the workspace's xb: the model width or the q width, whichever is larger */
static size_t xb_width(const kvm_config_t *c) {
    const size_t qd = (size_t)c->n_heads * c->head_dim;
    return (size_t)c->dim > qd ? (size_t)c->dim : qd;
}

static int ensure_workspace(kvm_model_t *m, int rows, int seqs, int blocks, int logit_rows) {
    kvm_backend_model_t *b = m->bm;
    const kvm_config_t *c = &m->cfg;
    if (rows <= b->max_rows && seqs <= b->max_seqs && blocks <= b->max_blocks_total && logit_rows <= b->max_logit_rows)
        return 0;
    int R = rows > b->max_rows ? rows : b->max_rows;
    int S = seqs > b->max_seqs ? seqs : b->max_seqs;
    int B = blocks > b->max_blocks_total ? blocks : b->max_blocks_total;
    int LR = logit_rows > b->max_logit_rows ? logit_rows : b->max_logit_rows;
    if (R < 16) R = 16;
    if (S < 8) S = 8;
    if (B < 64) B = 64;
    if (LR < 8) LR = 8;
    free_workspace(b);
    const size_t qd = (size_t)c->n_heads * c->head_dim, kd = (size_t)c->n_kv_heads * c->head_dim, dmax = xb_width(c);
    b->x = bm_alloc(b, (size_t)R * c->dim * 4);
    b->xb = bm_alloc(b, (size_t)R * dmax * 4);
    b->q = bm_alloc(b, (size_t)R * qd * 4);
    b->k = bm_alloc(b, (size_t)R * kd * 4);
    b->v = bm_alloc(b, (size_t)R * kd * 4);
    b->att = bm_alloc(b, (size_t)R * qd * 4);
    b->hb = bm_alloc(b, (size_t)R * c->hidden_dim * 4);
    b->hb2 = bm_alloc(b, (size_t)R * c->hidden_dim * 4);
    b->logits = bm_alloc(b, (size_t)LR * c->vocab_size * 4);
    b->last = bm_alloc(b, (size_t)LR * c->dim * 4);
    b->ids = bm_alloc(b, (size_t)R * 4);
    b->pos = bm_alloc(b, (size_t)R * 4);
    b->row_start = bm_alloc(b, (size_t)(S + 1) * 4);
    b->ctx_len = bm_alloc(b, (size_t)S * 4);
    b->block_table = bm_alloc(b, (size_t)B * 4);
    b->next_ids = bm_alloc(b, (size_t)LR * 4);
    b->h_next_ids = kvm_malloc((size_t)LR * 4);
    b->h_ids = kvm_malloc((size_t)R * 4);
    b->h_pos = kvm_malloc((size_t)R * 4);
    b->h_row_start = kvm_malloc((size_t)(S + 1) * 4);
    b->h_ctx_len = kvm_malloc((size_t)S * 4);
    b->h_block_table = kvm_malloc((size_t)B * 4);
    if (!b->x || !b->xb || !b->q || !b->k || !b->v || !b->att || !b->hb || !b->hb2 || !b->logits || !b->last ||
        !b->ids || !b->pos || !b->row_start || !b->ctx_len || !b->block_table || !b->h_ids || !b->h_pos ||
        !b->h_row_start || !b->h_ctx_len || !b->h_block_table || !b->next_ids || !b->h_next_ids) {
        free_workspace(b);
        return kvm_seterr(KVM_ENOMEM, "forward: out of memory allocating the workspace for %d rows on the %s backend", R, b->ops->name);
    }
    b->max_rows = R;
    b->max_seqs = S;
    b->max_blocks_total = B;
    b->max_logit_rows = LR;
    return 0;
}

int kvm_forward_init(kvm_model_t *m, int max_rows) {
    if (m->impl) return 0; /* its forward is its own (mock_model.h) */
    if (m->bm) return ensure_workspace(m, max_rows, 0, 0, 0);
    if (!m->ops) m->ops = kvm_ops_cpu();
    kvm_backend_model_t *b = kvm_calloc(1, sizeof *b);
    if (!b) return KVM_ENOMEM;
    b->ops = m->ops;
    m->bm = b;
    const kvm_config_t *c = &m->cfg;
    int rc = 0;
    b->layers = kvm_calloc((size_t)c->n_layers, sizeof *b->layers);
    if (!b->layers) rc = KVM_ENOMEM;
    for (int l = 0; !rc && l < c->n_layers; l++) {
        const kvm_layer_weights_t *w = &m->w.layers[l];
        kvm_backend_layer_t *bl = &b->layers[l];
        if (!m->cfg.n_layers || kvm_log_get_level() <= KVM_LOG_INFO) KVM_LOGI("uploading layer %d/%d", l + 1, c->n_layers);
        rc = upload_mat(b, m, &w->wq, &bl->wq);
        if (!rc) rc = upload_mat(b, m, &w->wk, &bl->wk);
        if (!rc) rc = upload_mat(b, m, &w->wv, &bl->wv);
        if (!rc) rc = upload_mat(b, m, &w->wo, &bl->wo);
        if (!rc) rc = upload_mat(b, m, &w->w_gate, &bl->w_gate);
        if (!rc) rc = upload_mat(b, m, &w->w_up, &bl->w_up);
        if (!rc) rc = upload_mat(b, m, &w->w_down, &bl->w_down);
        if (!rc) rc = upload_vec(b, m, &w->attn_norm, &bl->attn_norm);
        if (!rc) rc = upload_vec(b, m, &w->ffn_norm, &bl->ffn_norm);
        if (!rc) rc = upload_vec(b, m, &w->bq, &bl->bq);
        if (!rc) rc = upload_vec(b, m, &w->bk, &bl->bk);
        if (!rc) rc = upload_vec(b, m, &w->bv, &bl->bv);
        if (!rc) rc = upload_vec(b, m, &w->q_norm, &bl->q_norm);
        if (!rc) rc = upload_vec(b, m, &w->k_norm, &bl->k_norm);
    }
    if (!rc) rc = upload_mat(b, m, &m->w.tok_emb, &b->tok_emb);
    if (!rc) {
        if (m->w.lm_head.data == m->w.tok_emb.data) b->lm_head = b->tok_emb;
        else rc = upload_mat(b, m, &m->w.lm_head, &b->lm_head);
    }
    if (!rc) rc = upload_vec(b, m, &m->w.final_norm, &b->final_norm);
    if (!rc) {
        size_t n = (size_t)c->head_dim / 2 * sizeof(float);
        b->inv_freq = bm_alloc(b, n);
        rc = b->inv_freq ? b->ops->h2d(b->inv_freq, m->inv_freq, n) : KVM_ENOMEM;
    }
    if (!rc) rc = ensure_workspace(m, max_rows > 0 ? max_rows : 64, 8, 256, 8);
    if (rc) {
        kvm_forward_free(m);
        return rc;
    }
    return 0;
}

int kvm_forward_adopt(kvm_model_t *m, void *p) {
    kvm_backend_model_t *b = m ? m->bm : NULL;
    if (!b || !p) return kvm_seterr(KVM_EINVAL, "forward: adopt needs an initialised model and a buffer");
    if (b->n_owned == b->cap_owned) {
        int cap = b->cap_owned ? b->cap_owned * 2 : 64;
        void **n = kvm_realloc(b->owned, (size_t)cap * sizeof(void *));
        if (!n) return KVM_ENOMEM;
        b->owned = n;
        b->cap_owned = cap;
    }
    b->owned[b->n_owned++] = p;
    return 0;
}

int kvm_load_opts_check(const kvm_load_opts_t *o) {
    if (!o) return 0;
    int rc = kvm_backend_check(o->backend);
    if (!rc && o->device_dtype_set) rc = kvm_dtype_check(o->device_dtype, "device_dtype");
    if (!rc && o->kv_dtype_set) rc = kvm_dtype_check(o->kv_dtype, "kv_dtype");
    return rc;
}

int kvm_forward_configure(kvm_model_t *m, const kvm_load_opts_t *o) {
    kvm_backend_model_t *b = m ? m->bm : NULL;
    if (!b) return kvm_seterr(KVM_EINVAL, "forward: configure needs an initialised model");
    int rc = kvm_load_opts_check(o);
    if (rc) return rc;
    b->kv_dtype_set = o && o->kv_dtype_set;
    b->kv_dtype = b->kv_dtype_set ? o->kv_dtype : KVM_F32;
    kvm_forward_set_graphs(m, !(o && o->no_cuda_graphs));
    return 0;
}

void kvm_forward_set_graphs(kvm_model_t *m, bool on) {
    kvm_backend_model_t *b = m ? m->bm : NULL;
    if (!b) return;
    if (!on) drop_graph(b);
    b->graphs_disabled = !on;
}

int kvm_forward_graph_count(const kvm_model_t *m) {
    const kvm_backend_model_t *b = m ? m->bm : NULL;
    int n = 0;
    for (int i = 0; b && i < KVM_GRAPH_SLOTS; i++) n += b->graphs[i].graph != NULL;
    return n;
}

void kvm_forward_free(kvm_model_t *m) {
    kvm_backend_model_t *b = m ? m->bm : NULL;
    if (!b) return;
    free_workspace(b);
    for (int i = 0; i < b->n_owned; i++) b->ops->free(b->owned[i]);
    kvm_free(b->owned);
    kvm_free(b->layers);
    kvm_free(b);
    m->bm = NULL;
}

kvm_dtype_t kvm_model_kv_dtype_of(const kvm_model_t *m) {
    if (m->bm && m->bm->kv_dtype_set) return m->bm->kv_dtype;
    return m->ops == kvm_ops_cpu() || m->device_dtype == KVM_F32 ? KVM_F32
           : m->device_dtype == KVM_F16                          ? KVM_F16
                                                                 : KVM_BF16;
}

kvm_kv_pool_t *kvm_model_kv_pool(kvm_model_t *m, size_t kv_bytes) {
    kvm_kv_geom_t g = {.n_layers = m->cfg.n_layers, .n_kv_heads = m->cfg.n_kv_heads, .head_dim = m->cfg.head_dim,
                       .dtype = kvm_model_kv_dtype_of(m)};
    int n_blocks;
    if (kv_bytes == 0) {
        int ctx = m->cfg.max_seq_len > 0 && m->cfg.max_seq_len < 8192 ? m->cfg.max_seq_len : 8192;
        n_blocks = 4 * ((ctx + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK);
    } else {
        n_blocks = kvm_kv_blocks_for_bytes(&g, kv_bytes);
    }
    if (n_blocks <= 0) {
        kvm_seterr(KVM_EINVAL, "KV budget of %zu bytes holds no block of %zu bytes", kv_bytes, kvm_kv_block_bytes(&g));
        return NULL;
    }
    return kvm_kv_pool_create(m->ops, &g, n_blocks, m->model_id);
}

static inline float *rowp(float *base, int row, int width) { return base + (size_t)row * width; }

/* The workspace rows one run_device_step works on: the whole step's, or a group's (run_step) */
typedef struct step_bufs {
    float *x, *xb, *q, *k, *v, *att, *hb, *hb2, *logits, *last;
    int32_t *ids, *pos, *next_ids;
} step_bufs_t;

/* b's workspace from row r0 and logits row lr0 on (the row widths of ensure_workspace) */
static step_bufs_t step_bufs_at(const kvm_model_t *m, int r0, int lr0) {
    const kvm_config_t *c = &m->cfg;
    const kvm_backend_model_t *b = m->bm;
    const size_t qd = (size_t)c->n_heads * c->head_dim, kd = (size_t)c->n_kv_heads * c->head_dim;
    const size_t dmax = xb_width(c), r = (size_t)r0;
    return (step_bufs_t){.x = b->x + r * c->dim, .xb = b->xb + r * dmax, .q = b->q + r * qd, .k = b->k + r * kd,
                         .v = b->v + r * kd, .att = b->att + r * qd, .hb = b->hb + r * c->hidden_dim,
                         .hb2 = b->hb2 + r * c->hidden_dim, .logits = b->logits + (size_t)lr0 * c->vocab_size,
                         .last = b->last + (size_t)lr0 * c->dim, .ids = b->ids + r, .pos = b->pos + r,
                         .next_ids = b->next_ids + lr0};
}

/* q/k/v projections, the per-head norms (Qwen3), RoPE and the KV write of layer l through the separate ops. */
static void run_qkv_rope_kv(kvm_model_t *m, const step_bufs_t *w, const kvm_backend_layer_t *L, kvm_kv_pool_t *pool,
                            int l, const kvm_attn_batch_t *ab, int rows) {
    const kvm_config_t *c = &m->cfg;
    kvm_backend_model_t *b = m->bm;
    const kvm_ops_t *ops = b->ops;
    const int HD = c->head_dim;
    if (ops->matmul_multi) { /* q, k, v in one launch where the backend can */
        float *ys[3] = {w->q, w->k, w->v};
        const kvm_wmat_t *ws[3] = {&L->wq, &L->wk, &L->wv};
        const float *bs[3] = {L->bq, L->bk, L->bv};
        ops->matmul_multi(3, ys, ws, bs, w->xb, rows);
    } else {
        ops->matmul(w->q, w->xb, &L->wq, L->bq, rows);
        ops->matmul(w->k, w->xb, &L->wk, L->bk, rows);
        ops->matmul(w->v, w->xb, &L->wv, L->bv, rows);
    }
    if (L->q_norm) ops->head_rmsnorm(w->q, L->q_norm, rows, c->n_heads, HD, c->rms_eps);
    if (L->k_norm) ops->head_rmsnorm(w->k, L->k_norm, rows, c->n_kv_heads, HD, c->rms_eps);
    /* every item shares one pool (one pool per model and backend) */
    if (ops->rope_qk_kv_write) {
        ops->rope_qk_kv_write(w->q, w->k, w->v, c->n_heads, HD, w->pos, b->inv_freq, c->rope_layout, pool->data,
                              &pool->geom, l, ab);
    } else {
        if (ops->rope_qk) {
            ops->rope_qk(w->q, w->k, rows, c->n_heads, c->n_kv_heads, HD, w->pos, b->inv_freq, c->rope_layout);
        } else {
            ops->rope(w->q, rows, c->n_heads, HD, w->pos, b->inv_freq, c->rope_layout);
            ops->rope(w->k, rows, c->n_kv_heads, HD, w->pos, b->inv_freq, c->rope_layout);
        }
        ops->kv_write(pool->data, &pool->geom, l, w->k, w->v, ab);
    }
}

/* The device part of one step (no host synchronisation inside, so a decode step can be captured into a
 * graph) on the workspace rows w: embedding, the layers, and the logits of the rows that want them into
 * w->logits. Uses the fused add+RMSNorm when the backend has it (the CPU reference runs the separate ops). */
static void run_device_step(kvm_model_t *m, const step_bufs_t *w, kvm_batch_item_t *items, int n_items,
                            const kvm_attn_batch_t *abp, kvm_kv_pool_t *pool, int rows, int logit_rows) {
    const kvm_config_t *c = &m->cfg;
    kvm_backend_model_t *b = m->bm;
    const kvm_ops_t *ops = b->ops;
    const kvm_attn_batch_t ab = *abp;
    const int D = c->dim, HD = c->head_dim, FF = c->hidden_dim;
    const float scale = 1.0f / sqrtf((float)HD);
    const bool fuse = ops->add_rmsnorm != NULL;
    /* prefill with 16-bit weights on a backend that keeps the GEMM input in 16 bits: the fused norms need not
     * write their fp32 output (only the GEMMs read it, through the 16-bit copy) */
    const bool w16 = b->layers[0].wq.dtype != KVM_F32 && b->layers[0].w_gate.dtype != KVM_F32;
    void (*add_norm)(float *, const float *, float *, const float *, int, int, float) =
        fuse && ops->add_rmsnorm_16 && rows > 16 && w16 ? ops->add_rmsnorm_16 : ops->add_rmsnorm;
    /* ... and then the o / down projections may hand their output to that norm in 16 bits too */
    const bool y16 = fuse && ops->add_rmsnorm_16 && add_norm == ops->add_rmsnorm_16;

    ops->embed(w->x, b->tok_emb.data, b->tok_emb.dtype, w->ids, rows, D);
    if (fuse) ops->rmsnorm(w->xb, w->x, b->layers[0].attn_norm, rows, D, c->rms_eps);
    const int n_run = b->layer_limit > 0 && b->layer_limit < c->n_layers ? b->layer_limit : c->n_layers;
    for (int l = 0; l < n_run; l++) {
        const kvm_backend_layer_t *L = &b->layers[l];
        if (!fuse) ops->rmsnorm(w->xb, w->x, L->attn_norm, rows, D, c->rms_eps);
        /* q/k/v, RoPE and the KV write fused where the backend can (CUDA: batch-1 decode, prefill) */
        if (ops->qkv_rope_kv && !L->q_norm && !L->k_norm &&
            ops->qkv_rope_kv(w->q, w->k, w->v, w->xb, &L->wq, &L->wk, &L->wv, L->bq, L->bk, L->bv, c->n_heads, HD, w->pos,
                             b->inv_freq, c->rope_layout, pool->data, &pool->geom, l, &ab) == 0) {
            /* done: q rotated, this token's K/V in the cache */
        } else {
            run_qkv_rope_kv(m, w, L, pool, l, &ab, rows);
        }
        ops->attention(w->att, w->q, pool->data, &pool->geom, l, c->n_heads, &ab, scale);
        if (b->mass) ops->attn_mass(b->mass, b->mass_n, b->mass_from, w->q, pool->data, &pool->geom, l, c->n_heads, &ab, scale);
        const bool last = l + 1 == c->n_layers;
        if (y16 && ops->matmul_add_rmsnorm_16) { /* o projection straight into the residual norm */
            ops->matmul_add_rmsnorm_16(w->x, w->att, &L->wo, w->xb, L->ffn_norm, rows, D, c->rms_eps);
        } else {
            ops->matmul(w->xb, w->att, &L->wo, NULL, rows);
            if (fuse) {
                add_norm(w->x, w->xb, w->xb, L->ffn_norm, rows, D, c->rms_eps);
            } else {
                ops->add(w->x, w->xb, (size_t)rows * D);
                ops->rmsnorm(w->xb, w->x, L->ffn_norm, rows, D, c->rms_eps);
            }
        }
        if (y16 && !last && ops->ffn_add_rmsnorm_16) { /* the MLP straight into the next layer's norm */
            ops->ffn_add_rmsnorm_16(w->x, w->xb, &L->w_gate, &L->w_up, &L->w_down, w->hb, w->hb2, w->xb,
                                    b->layers[l + 1].attn_norm, rows, D, c->rms_eps);
            continue;
        }
        if (ops->ffn) {
            ops->ffn(w->xb, w->xb, &L->w_gate, &L->w_up, &L->w_down, w->hb, w->hb2, rows);
        } else if (ops->matmul_multi) {
            float *ys[2] = {w->hb, w->hb2};
            const kvm_wmat_t *ws[2] = {&L->w_gate, &L->w_up};
            ops->matmul_multi(2, ys, ws, NULL, w->xb, rows);
        } else {
            ops->matmul(w->hb, w->xb, &L->w_gate, NULL, rows);
            ops->matmul(w->hb2, w->xb, &L->w_up, NULL, rows);
        }
        if (ops->ffn) {
            /* done above */
        } else if (ops->swiglu_matmul) {
            ops->swiglu_matmul(w->xb, w->hb, w->hb2, &L->w_down, rows);
        } else {
            ops->swiglu(w->hb, w->hb, w->hb2, (size_t)rows * FF);
            ops->matmul(w->xb, w->hb, &L->w_down, NULL, rows);
        }
        if (fuse && !last) add_norm(w->x, w->xb, w->xb, b->layers[l + 1].attn_norm, rows, D, c->rms_eps);
        else ops->add(w->x, w->xb, (size_t)rows * D);
    }
    /* logits only for the rows that want them */
    if (logit_rows > 0) {
        int lr = 0;
        bool want_ids = false;
        int run_dst = 0, run_src = 0, run_n = 0; /* contiguous rows (a decode batch) go in one copy */
        for (int i = 0; i < n_items; i++) {
            kvm_batch_item_t *it = &items[i];
            if (!it->logits && !it->next_token) continue;
            bool all = it->all_logits && it->logits;
            int first = all ? ab.h_row_start[i] : ab.h_row_start[i + 1] - 1;
            int n = all ? it->n_tokens : 1;
            if (run_n > 0 && first == run_src + run_n && lr == run_dst + run_n) {
                run_n += n;
            } else {
                if (run_n > 0) ops->d2d(rowp(w->last, run_dst, D), rowp(w->x, run_src, D), (size_t)run_n * D * 4);
                run_dst = lr;
                run_src = first;
                run_n = n;
            }
            if (it->next_token) want_ids = true;
            lr += n;
        }
        if (run_n > 0) ops->d2d(rowp(w->last, run_dst, D), rowp(w->x, run_src, D), (size_t)run_n * D * 4);
        ops->rmsnorm(w->last, w->last, b->final_norm, logit_rows, D, c->rms_eps);
        ops->matmul(w->logits, w->last, &b->lm_head, NULL, logit_rows);
        if (want_ids && ops->argmax_rows) ops->argmax_rows(w->next_ids, w->logits, logit_rows, c->vocab_size);
    }
}

/* A decode step (one token per item, no positions) on a backend with a thread pool runs in groups of rows,
 * each group's whole step (every layer, then its logits) on one thread. The rows of such a step are independent
 * (each attends to its own sequence's cache), so the groups need no barrier between ops, where splitting each op
 * costs one hand-off per op: ~60 per step of a small model, about what they split (docs/perf/cpu.md). A token's
 * arithmetic does not depend on the rows beside it (gemm_cpu.c, attn_cpu.c), so the outputs are the bits of the
 * unsplit step. Groups of at most STEP_GROUP_ROWS rows (the matmul's register tile holds 4 tokens), at least one
 * per thread; the pool hands them to whichever thread asks first, so a thread the system does not run takes none. */
#define STEP_GROUP_ROWS 4

typedef struct step_group_job {
    kvm_model_t *m;
    kvm_batch_item_t *items;
    const kvm_attn_batch_t *ab;
    kvm_kv_pool_t *pool;
    int n_items, n_groups;
} step_group_job_t;

static void step_group_task(void *ctx, int g0, int g1, int tid) {
    (void)tid;
    const step_group_job_t *j = ctx;
    for (int g = g0; g < g1; g++) {
        const int i0 = (int)((long long)g * j->n_items / j->n_groups);
        const int i1 = (int)((long long)(g + 1) * j->n_items / j->n_groups), n = i1 - i0;
        int lr0 = 0, lr = 0; /* the logits rows before the group, and its own */
        for (int i = 0; i < i1; i++) {
            const int want = j->items[i].logits || j->items[i].next_token;
            if (i < i0) lr0 += want;
            else lr += want;
        }
        kvm_attn_batch_t ab = *j->ab;
        ab.n_seqs = n;
        ab.total_rows = n;
        ab.ctx_len += i0;
        ab.h_ctx_len += i0;
        ab.block_table += (size_t)i0 * ab.max_blocks;
        ab.h_block_table += (size_t)i0 * ab.max_blocks;
        /* row_start: the step's rows are 0, 1, ... in item order, so its first n + 1 entries serve every group */
        step_bufs_t w = step_bufs_at(j->m, i0, lr0);
        run_device_step(j->m, &w, j->items + i0, n, &ab, j->pool, n, lr);
    }
}

/* The eager device part of a step: in row groups where the backend and the step allow it (above), else whole. */
static void run_step(kvm_model_t *m, kvm_batch_item_t *items, int n_items, const kvm_attn_batch_t *ab,
                     kvm_kv_pool_t *pool, int rows, int logit_rows, bool positioned) {
    const kvm_ops_t *ops = m->bm->ops;
    const int threads = ops->parallel_for && !m->bm->mass ? kvm_threads() : 1; /* the mass sums in one order */
    if (threads > 1 && rows == n_items && n_items > 1 && !positioned) {
        int groups = (n_items + STEP_GROUP_ROWS - 1) / STEP_GROUP_ROWS;
        if (groups < threads) groups = threads < n_items ? threads : n_items;
        step_group_job_t j = {.m = m, .items = items, .ab = ab, .pool = pool, .n_items = n_items, .n_groups = groups};
        ops->parallel_for(groups, 1, step_group_task, &j);
        return;
    }
    step_bufs_t w = step_bufs_at(m, 0, 0);
    run_device_step(m, &w, items, n_items, ab, pool, rows, logit_rows);
}

int kvm_forward_attn_mass(kvm_model_t *m, kvm_batch_item_t *items, int n_items, float *mass, int n, int from_pos) {
    kvm_backend_model_t *b = m ? m->bm : NULL;
    if (!b) return kvm_seterr(KVM_EINVAL, "forward_attn_mass: model has no backend state");
    if (!mass || n <= 0) return kvm_seterr(KVM_EINVAL, "forward_attn_mass: no mass array (n = %d)", n);
    if (!b->ops->attn_mass)
        return kvm_seterr(KVM_EUNSUPPORTED, "forward_attn_mass: the %s backend cannot sum attention probabilities (the CPU "
                          "can)", b->ops->name);
    float *dev = b->ops->alloc((size_t)n * sizeof(float));
    int rc = dev ? b->ops->memset0(dev, (size_t)n * sizeof(float)) : KVM_ENOMEM;
    if (!rc) {
        b->mass = dev, b->mass_n = n, b->mass_from = from_pos;
        rc = kvm_forward(m, items, n_items);
        b->mass = NULL;
    }
    if (!rc) rc = b->ops->d2h(mass, dev, (size_t)n * sizeof(float));
    if (dev) b->ops->free(dev);
    return rc;
}

int kvm_forward_layers(kvm_model_t *m, kvm_batch_item_t *items, int n_items, int n_layers) {
    kvm_backend_model_t *b = m ? m->bm : NULL;
    if (!b) return kvm_seterr(KVM_EINVAL, "forward: model has no backend state");
    if (n_layers < 1) return kvm_seterr(KVM_EINVAL, "forward_layers: %d layers (at least 1)", n_layers);
    for (int i = 0; i < n_items; i++)
        if (items[i].logits || items[i].next_token)
            return kvm_seterr(KVM_EINVAL, "forward_layers: batch item %d asks for logits, which a partial pass has not", i);
    b->layer_limit = n_layers;
    int rc = kvm_forward(m, items, n_items);
    b->layer_limit = 0;
    return rc;
}

/* Checks every item of a step (tokens, pool, positions, context) and counts its rows and logits rows. */
static int check_batch(const kvm_model_t *m, const kvm_batch_item_t *items, int n_items, int *rows_out,
                       int *logit_rows_out) {
    const kvm_config_t *c = &m->cfg;
    int rows = 0, logit_rows = 0;
    for (int i = 0; i < n_items; i++) {
        const kvm_batch_item_t *it = &items[i];
        if (!it->seq || it->n_tokens <= 0 || !it->tokens)
            return kvm_seterr(KVM_EINVAL, "forward: batch item %d has no tokens or no sequence", i);
        if (it->seq->pool != items[0].seq->pool)
            return kvm_seterr(KVM_EINVAL, "forward: batch item %d uses another KV pool than item 0 (one pool per model)", i);
        if (it->seq->pool->model_id != m->model_id)
            return kvm_seterr(KVM_EMODEL, "forward: batch item %d's KV pool belongs to another model", i);
        for (int t = 0; t < it->n_tokens; t++)
            if (it->tokens[t] < 0 || it->tokens[t] >= c->vocab_size)
                return kvm_seterr(KVM_ERANGE, "forward: batch item %d token %d has id %d, outside the vocabulary [0, %d)", i,
                                  t, it->tokens[t], c->vocab_size);
        if (it->positions) {
            for (int t = 0; t < it->n_tokens; t++)
                if (it->positions[t] < 0 || it->positions[t] >= it->seq->n_tokens ||
                    (t > 0 && it->positions[t] <= it->positions[t - 1]))
                    return kvm_seterr(KVM_EINVAL,
                                      "forward: batch item %d position %d is %d: positions must increase and lie in the "
                                      "sequence's %d tokens",
                                      i, t, it->positions[t], it->seq->n_tokens);
                else if (it->seq->pool->refcount[it->seq->blocks[it->positions[t] / KVM_KV_BLOCK]] != 1)
                    return kvm_seterr(KVM_EINVAL,
                                      "forward: batch item %d position %d sits in a block shared with another sequence "
                                      "(recomputing it would change theirs too)",
                                      i, it->positions[t]);
        }
        int total = it->seq->n_tokens + (it->positions ? 0 : it->n_tokens);
        if (c->max_seq_len > 0 && total > c->max_seq_len)
            return kvm_seterr(KVM_ERANGE, "forward: batch item %d would reach %d tokens, beyond the model's context of %d", i,
                              total, c->max_seq_len);
        for (int j = 0; j < i; j++)
            if (items[j].seq == it->seq) return kvm_seterr(KVM_EINVAL, "forward: sequence appears twice in one batch");
        rows += it->n_tokens;
        if (it->logits || it->next_token) logit_rows += it->all_logits && it->logits ? it->n_tokens : 1;
    }
    *rows_out = rows;
    *logit_rows_out = logit_rows;
    return 0;
}

/* Copies the step's outputs to the host: each item's logits rows and greedy next token. */
static void fetch_outputs(kvm_model_t *m, kvm_batch_item_t *items, int n_items, int logit_rows) {
    kvm_backend_model_t *b = m->bm;
    const kvm_ops_t *ops = b->ops;
    const int V = m->cfg.vocab_size;
    int lr = 0;
    bool ids_fetched = false;
    for (int i = 0; i < n_items; i++) {
        kvm_batch_item_t *it = &items[i];
        if (!it->logits && !it->next_token) continue;
        int n = it->all_logits && it->logits ? it->n_tokens : 1;
        if (it->logits) ops->d2h(it->logits, rowp(b->logits, lr, V), (size_t)n * V * 4);
        if (it->next_token) {
            if (ops->argmax_rows) {
                if (!ids_fetched) ops->d2h(b->h_next_ids, b->next_ids, (size_t)logit_rows * 4);
                ids_fetched = true;
                *it->next_token = b->h_next_ids[lr + n - 1];
            } else {
                *it->next_token = ops->argmax(rowp(b->logits, lr + n - 1, V), V);
            }
        }
        lr += n;
    }
}

int kvm_forward(kvm_model_t *m, kvm_batch_item_t *items, int n_items) {
    if (m->impl) return m->impl->forward(m, items, n_items);
    kvm_backend_model_t *b = m->bm;
    if (!b) return kvm_seterr(KVM_EINVAL, "forward: model has no backend state");
    if (n_items <= 0) return 0;
    const kvm_ops_t *ops = b->ops;
    int rows = 0, logit_rows = 0, blocks = 0;
    int crc = check_batch(m, items, n_items, &rows, &logit_rows);
    if (crc) return crc;
    /* reserve KV for everyone first; on failure give back what this call took */
    int *old_n = kvm_malloc((size_t)n_items * sizeof(int));
    if (!old_n) return KVM_ENOMEM;
    for (int i = 0; i < n_items; i++) old_n[i] = items[i].seq->n_tokens;
    bool positioned = false;
    for (int i = 0; i < n_items; i++) positioned |= items[i].positions != NULL;
    for (int i = 0; i < n_items; i++) {
        int rc = items[i].positions ? 0 : kvm_seq_reserve(items[i].seq, old_n[i] + items[i].n_tokens);
        if (rc) {
            for (int j = 0; j <= i; j++) {
                kvm_seq_t *s = items[j].seq;
                int keep = (old_n[j] + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK;
                while (s->n_blocks > keep) kvm_kv_block_unref(s->pool, s->blocks[--s->n_blocks]);
            }
            kvm_free(old_n);
            return kvm_errctx(rc, "forward: batch item %d", i);
        }
    }
    int max_blocks = 0;
    for (int i = 0; i < n_items; i++)
        if (items[i].seq->n_blocks > max_blocks) max_blocks = items[i].seq->n_blocks;
    /* a decode step (one token per item) on a backend with graphs replays one captured graph; its block
     * table width is rounded up (to 64 blocks = 1024 tokens) so the graph stays valid as contexts grow */
    bool decode = rows == n_items && ops->graph_begin != NULL && !b->graphs_disabled;
    if (b->graphs_off || b->layer_limit || positioned || b->mass) decode = false; /* nor a partial, positioned or mass pass */
    if (decode) max_blocks = (max_blocks + 63) / 64 * 64;
    blocks = max_blocks * n_items;
    int rc = ensure_workspace(m, rows, n_items, blocks, logit_rows);
    if (rc) {
        kvm_free(old_n);
        return rc;
    }
    /* host-side plan */
    int r = 0;
    for (int i = 0; i < n_items; i++) {
        kvm_batch_item_t *it = &items[i];
        b->h_row_start[i] = r;
        b->h_ctx_len[i] = old_n[i] + (it->positions ? 0 : it->n_tokens);
        for (int t = 0; t < it->n_tokens; t++, r++) {
            b->h_ids[r] = it->tokens[t];
            b->h_pos[r] = it->positions ? it->positions[t] : old_n[i] + t;
        }
        memcpy(b->h_block_table + (size_t)i * max_blocks, it->seq->blocks, (size_t)it->seq->n_blocks * 4);
        for (int k = it->seq->n_blocks; k < max_blocks; k++) b->h_block_table[(size_t)i * max_blocks + k] = -1;
    }
    b->h_row_start[n_items] = rows;
    ops->h2d(b->ids, b->h_ids, (size_t)rows * 4);
    ops->h2d(b->pos, b->h_pos, (size_t)rows * 4);
    ops->h2d(b->row_start, b->h_row_start, (size_t)(n_items + 1) * 4);
    ops->h2d(b->ctx_len, b->h_ctx_len, (size_t)n_items * 4);
    ops->h2d(b->block_table, b->h_block_table, (size_t)blocks * 4);
    kvm_attn_batch_t ab = {.n_seqs = n_items, .row_start = b->row_start, .ctx_len = b->ctx_len,
                           .block_table = b->block_table, .max_blocks = max_blocks, .total_rows = rows,
                           .h_row_start = b->h_row_start, .h_ctx_len = b->h_ctx_len, .h_block_table = b->h_block_table};
    if (positioned) ab.q_pos = b->pos, ab.h_q_pos = b->h_pos; /* else: every sequence's rows are its last ones */
    kvm_kv_pool_t *pool = items[0].seq->pool;

    uint64_t key = 0;
    if (decode) {
        /* the shape of this step: everything the captured launches depend on */
        uint64_t kd[6] = {(uint64_t)n_items, (uint64_t)max_blocks, (uint64_t)logit_rows, (uint64_t)(uintptr_t)pool->data,
                          (uint64_t)(uintptr_t)b->x, 0};
        for (int i = 0; i < n_items; i++) kd[5] = kd[5] * 31 + (items[i].logits ? 1 : 0) + (items[i].next_token ? 2 : 0);
        key = kvm_hash64(kd, sizeof kd, KVM_HASH_SEED) | 1;
    }
    int frc = 0, slot = decode ? graph_find(b, key) : -1;
    if (slot >= 0) {
        b->graphs[slot].used = ++b->graph_tick;
        frc = ops->graph_launch(b->graphs[slot].graph);
    } else if (decode && graph_warm(b, key)) {
        /* seen this shape before (so every buffer the step needs exists): capture it, then replay */
        slot = graph_victim(b);
        frc = ops->graph_begin();
        if (!frc) {
            step_bufs_t w = step_bufs_at(m, 0, 0);
            run_device_step(m, &w, items, n_items, &ab, pool, rows, logit_rows);
            frc = ops->graph_end(&b->graphs[slot].graph);
        }
        if (!frc) {
            b->graphs[slot].key = key;
            b->graphs[slot].used = ++b->graph_tick;
            frc = ops->graph_launch(b->graphs[slot].graph);
        }
    } else {
        run_step(m, items, n_items, &ab, pool, rows, logit_rows, positioned);
        if (decode) {
            b->warm[b->warm_next] = key;
            b->warm_next = (b->warm_next + 1) % KVM_GRAPH_SLOTS;
        }
    }
    if (frc) {
        /* the step was not run (a failed capture enqueues nothing): run it eagerly, and stop capturing */
        KVM_LOGW("forward: CUDA graph capture/replay failed (%s); decoding without graphs from now on", kvm_errmsg());
        kvm_errclear();
        drop_graph(b);
        b->graphs_off = true;
        run_step(m, items, n_items, &ab, pool, rows, logit_rows, positioned);
    }
    if (logit_rows > 0) fetch_outputs(m, items, n_items, logit_rows);
    int src = ops->sync(); /* reports a failure of any op of this step (GPU backends) */
    if (src) {
        kvm_free(old_n);
        return kvm_errctx(src, "forward");
    }
    /* room for every item's ids first, so that the step records all of them or none (a push that failed
     * silently left a sequence without the ids of the KV it holds) */
    for (int i = 0; i < n_items; i++) {
        kvm_seq_t *sq = items[i].seq;
        if (!items[i].positions &&
            kvm_array_reserve(&sq->tokens, &sq->cap_tokens, (size_t)sq->n_tokens + (size_t)items[i].n_tokens, sizeof *sq->tokens, 64)) {
            kvm_free(old_n);
            return kvm_seterr(KVM_ENOMEM, "forward: out of memory recording the ids of batch item %d (%d tokens)", i,
                              items[i].n_tokens);
        }
    }
    for (int i = 0; i < n_items; i++)
        if (!items[i].positions) kvm_seq_push_tokens(items[i].seq, items[i].tokens, items[i].n_tokens); /* has room */
    kvm_free(old_n);
    return 0;
}
