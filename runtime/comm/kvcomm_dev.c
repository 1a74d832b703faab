/* kvcomm_dev.c - KVCOMM on the backend's ops: prediction distances, offset weights and the REUSE assembly
 * through kernels/ops.h (kvcomm_dist, kvcomm_softmax, kvcomm_apply, kvcomm_spread), the anchors' materialization
 * (kvcomm_diff): the one path on every backend (kvcomm.md §3.4, §3.6, §3.7, §3.8, §3.11). On a GPU no KV crosses
 * PCIe on either the reuse or the dense path; the CPU backend runs the same ops on host memory.
 *
 * Data placement:
 *   - a sample's base X stays in its segment's pool blocks (a paged view); host fp32 X is read only by the
 *     tests' oracle (comm_dev_sample_x);
 *   - anchors live in backend memory in the pool dtype: the DENSE path's materialization writes the base (the
 *     sample's segment rows) and each consumer's deltas (its dense rows re-based to F0 minus the base, or minus
 *     the template's text rows) there with kvcomm_diff, at complete(), with no KV crossing to the host; on a
 *     host-memory backend with an fp32 pool that memory is the anchor's host fp32 arrays (kvm_malloc'd, owned by
 *     the anchor, aliased by the mirror). Anchors loaded from a state file arrive as host fp32 and are uploaded
 *     at insertion (comm_dev_anchor_sync); comm_anchor_host widens a copy back for the oracle and for saving;
 *   - template text segments P get a backend copy when the template is created (the same aliasing applies);
 *   - weights live in backend memory per sample, cached by anchor set; their buffers come from a small free list
 *     in the comm's context (returned there when the request's samples are freed), so a steady stream of requests
 *     allocates no backend memory on the reuse path.
 * Hot path (comm_dev_reuse): one upload of every block table the prompt needs, then the weights (dist + softmax,
 * only on a cache miss) and the fused apply of every piece are enqueued back to back with no host
 * synchronization in between, one sync at the end, then one small read-back of the placeholder key weights per
 * newly computed sample for the trace's top anchor. */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm_internal.h"
#include "../../kernels/cpu/cpu_pool.h"

struct comm_dev_anchor {
    const kvm_ops_t *o;
    bool alias;           /* base (an own copy) and deltas (unless q8) are the anchor's host arrays (host-memory
                             backend, fp32 pool) */
    bool q8;              /* a->q8, for the helpers that hold only the mirror: the deltas are q8 buffers of
                             kvm_q8_bytes (kernels/ops.h), never host arrays */
    /* The base is the sample's segment itself (seg: a reference, so the store keeps its blocks, which the KV budget
     * counts; seg_bt: its block table in backend memory), or a copy of its own (base: [L][2][H][T][D] dtype) while
     * the anchor is staged, after the store took the segment back, or when it was loaded from a state file. */
    kvm_segment_t *seg;
    int32_t *seg_bt;
    void *base;
    void **d_ph, **d_pf;  /* per a->deltas[i]: [L-1][2][H][T|S][D] dtype or q8 */
    int n, cap;
};

struct comm_dev_sample {
    const kvm_ops_t *o;
    kvm_segment_t *seg;   /* borrowed: the segment bound to the placeholder by the prepare (or complete) that uses
                             the sample, which holds it for the call; refreshed by every bind. Not a reference:
                             a request lives as long as its run, and pinning every segment a run ever bound
                             would fill the KV budget of many concurrent runs (the store may evict a segment
                             between two agent steps and the next binding brings the content back) */
    float *w;             /* [2][N][T] | [2][N][L][H][D], distances then weights (in place) */
    size_t w_cap;         /* floats */
    uint64_t *keys;       /* anchor keys of the cached weights */
    int n;                /* 0 = no cached weights */
    float *mean_w;        /* host [n]: mean placeholder key weight per anchor (trace), when mean_ok */
    bool mean_ok;
};

#define COMM_DEV_WFREE 8
/* weight buffers dev_warm puts on the free list: one per sample of a request with up to this many shared
 * segments (the TTFT bench's has 5: the input and four answers), so that no REUSE request allocates one */
#define COMM_DEV_WARM_BUFFERS COMM_DEV_WFREE
/* first capacity of a device block table: 4096 entries (64K tokens of tables) so that it does not grow in a
 * request (growing frees the old table, and a device free synchronizes) */
#define COMM_DEV_BT_FIRST 4096

struct comm_dev_ctx {
    int32_t *bt[2];       /* device block tables: 0 = everything one comm_dev_reuse needs, 1 = comm_dev_pred's segment */
    size_t bt_cap[2];
    int32_t *hbt;         /* host staging of slot 0 */
    size_t hbt_cap;
    float *pred;          /* [KVM_KVCOMM_MAX_ANCHORS] */
    float *score;         /* kvcomm_spread outputs of one reuse call (recompute_frac), grow-only */
    size_t score_cap;
    float *h_score;       /* their host copy */
    float *wfree[COMM_DEV_WFREE]; /* weight buffers of freed samples, for reuse */
    size_t wfree_cap[COMM_DEV_WFREE];
    int n_wfree;
    int n_wmade;          /* weight buffers allocated so far (comm_dev_weight_buffers_made) */
    bool warmed;          /* dev_warm ran */
};

void comm_dev_check(kvm_comm_t *c, char *buf, size_t cap) {
    const kvm_ops_t *o = c->pool->ops;
    buf[0] = 0;
    if (!o->kvcomm_dist || !o->kvcomm_softmax || !o->kvcomm_apply || !o->kvcomm_spread || !o->kvcomm_diff) {
        snprintf(buf, cap, "backend %s has no KVCOMM ops", o->name);
        return;
    }
    const int D = c->g.D;
    if (o != kvm_ops_cpu() && (D < 16 || D % 16 || D > 512))
        snprintf(buf, cap, "backend %s: the KVCOMM ops take a head_dim that is a multiple of 16 up to 512, not %d", o->name, D);
}

/* A host-memory backend with an fp32 pool: backend copies of host fp32 rows are the rows themselves. */
static bool host_f32(const kvm_comm_t *c) { return c->pool->ops == kvm_ops_cpu() && c->pool->geom.dtype == KVM_F32; }

static struct comm_dev_ctx *ctx(kvm_comm_t *c) {
    if (!c->dev) c->dev = kvm_calloc(1, sizeof *c->dev);
    return c->dev;
}

void comm_dev_ctx_free(kvm_comm_t *c) {
    if (!c->dev) return;
    const kvm_ops_t *o = c->pool->ops;
    for (int i = 0; i < 2; i++) o->free(c->dev->bt[i]);
    for (int i = 0; i < c->dev->n_wfree; i++) o->free(c->dev->wfree[i]);
    o->free(c->dev->pred);
    o->free(c->dev->score);
    kvm_free(c->dev->h_score);
    kvm_free(c->dev->hbt);
    kvm_free(c->dev);
    c->dev = NULL;
}

/* A device buffer of at least `need` floats for sample weights: the smallest fitting one of the free list, else
 * a new one (its capacity in *cap). Buffers on the free list may still be read by queued kernels; every use
 * is stream-ordered after them. */
static float *wbuf_take(kvm_comm_t *c, size_t need, size_t *cap) {
    struct comm_dev_ctx *x = c->dev;
    int best = -1;
    for (int i = 0; x && i < x->n_wfree; i++)
        if (x->wfree_cap[i] >= need && (best < 0 || x->wfree_cap[i] < x->wfree_cap[best])) best = i;
    if (best >= 0) {
        float *p = x->wfree[best];
        *cap = x->wfree_cap[best];
        x->wfree[best] = x->wfree[x->n_wfree - 1];
        x->wfree_cap[best] = x->wfree_cap[x->n_wfree - 1];
        x->n_wfree--;
        return p;
    }
    size_t n = need < 4096 ? 4096 : need + need / 4; /* room for a few more anchors */
    float *p = c->pool->ops->alloc(n * sizeof(float));
    *cap = p ? n : 0;
    if (p && x) x->n_wmade++;
    return p;
}

int comm_dev_weight_buffers_made(const kvm_comm_t *c) { return c->dev ? c->dev->n_wmade : 0; }

/* Gives a weight buffer back to the free list (or frees it when the list is full or there is no context). */
static void wbuf_give(kvm_comm_t *c, const kvm_ops_t *o, float *p, size_t cap) {
    if (!p) return;
    struct comm_dev_ctx *x = c ? c->dev : NULL;
    if (x && x->n_wfree < COMM_DEV_WFREE) {
        x->wfree[x->n_wfree] = p;
        x->wfree_cap[x->n_wfree++] = cap;
        return;
    }
    o->free(p);
}

/* Uploads a block table into device slot `which` (grow-only). The copy is stream-ordered after earlier
 * kernels that read the slot, so reuse is safe. */
static const int32_t *upload_blocks(kvm_comm_t *c, int which, const int32_t *blocks, int n) {
    struct comm_dev_ctx *x = ctx(c);
    if (!x) return NULL;
    const kvm_ops_t *o = c->pool->ops;
    size_t need = (size_t)(n > 0 ? n : 1);
    if (x->bt_cap[which] < need) {
        o->free(x->bt[which]);
        size_t cap = need < COMM_DEV_BT_FIRST ? COMM_DEV_BT_FIRST : need * 2;
        x->bt[which] = o->alloc(cap * sizeof(int32_t));
        x->bt_cap[which] = x->bt[which] ? cap : 0;
        if (!x->bt[which]) return NULL;
    }
    if (n > 0 && o->h2d(x->bt[which], blocks, (size_t)n * sizeof(int32_t))) return NULL;
    return x->bt[which];
}

#define CONVERT_PIECE ((size_t)1 << 16)

typedef struct {
    uint16_t *dst;
    const float *src;
    size_t count;
    bool bf16;
} convert_task_t;

/* fp32 -> bf16/f16 over the pieces [i0, i1) of CONVERT_PIECE elements */
static void convert_task(void *ctx, int i0, int i1, int tid) {
    const convert_task_t *c = ctx;
    size_t e0 = (size_t)i0 * CONVERT_PIECE, e1 = (size_t)i1 * CONVERT_PIECE;
    if (e1 > c->count) e1 = c->count;
    if (c->bf16)
        for (size_t i = e0; i < e1; i++) c->dst[i] = kvm_f32_to_bf16(c->src[i]);
    else
        for (size_t i = e0; i < e1; i++) c->dst[i] = kvm_f32_to_f16(c->src[i]);
}

/* host fp32 [count] -> new backend buffer in dtype dt */
static void *upload_rows(const kvm_ops_t *o, kvm_dtype_t dt, const float *src, size_t count) {
    size_t bytes = count * kvm_dtype_size(dt);
    void *d = o->alloc(bytes ? bytes : 16);
    if (!d || !count) return d;
    const void *h = src;
    uint16_t *tmp = NULL;
    if (dt != KVM_F32) {
        tmp = kvm_malloc(bytes);
        if (!tmp) {
            o->free(d);
            return NULL;
        }
        convert_task_t c = {.dst = tmp, .src = src, .count = count, .bf16 = dt == KVM_BF16};
        /* pieces of 2^16 elements; one thread up to 2^18 */
        const int pieces = (int)((count + CONVERT_PIECE - 1) / CONVERT_PIECE);
        kvm_cpu_parallel_for(pieces, count > ((size_t)1 << 18) ? 1 : pieces, convert_task, &c);
        h = tmp;
    }
    int rc = o->h2d(d, h, bytes);
    kvm_free(tmp);
    if (rc) {
        o->free(d);
        return NULL;
    }
    return d;
}

/* ==== anchors ============================================================================================== */

static struct comm_dev_anchor *anchor_mirror(kvm_comm_t *c, comm_anchor_t *a);
static int mirror_reserve(struct comm_dev_anchor *m, int n);

static bool has_base(const struct comm_dev_anchor *m) { return m && (m->seg || m->base); }
static int base_copy(kvm_comm_t *c, comm_anchor_t *a, kvm_kv_view_t v);
static int seg_view(kvm_comm_t *c, const kvm_segment_t *seg, kvm_kv_view_t *v);

/* the view of anchor a's base (rows [0, a->T), all layers) */
static kvm_kv_view_t base_view(const kvm_comm_t *c, const comm_anchor_t *a) {
    const struct comm_dev_anchor *m = a->dev;
    if (m->seg) return (kvm_kv_view_t){.data = c->pool->data, .blocks = m->seg_bt, .start = 0};
    return (kvm_kv_view_t){.data = m->base, .rows = a->T, .l0 = 0};
}
static void *upload_delta(kvm_comm_t *c, const struct comm_dev_anchor *m, const float *src, int n);

/* Runs each KVCOMM op once on a few rows of the first committed anchor (dist with every output, softmax, an
 * apply into a scratch block), so that the backend's one-time costs (lazy kernel loading, the distance
 * scratch, the first COMM_DEV_WARM_BUFFERS weight buffers, which go to the free list) are paid at commit, off
 * the reuse path.
 * Failures are ignored: the reuse path does the same work later and reports its errors. */
static void dev_warm(kvm_comm_t *c, const comm_anchor_t *a) {
    const kvm_ops_t *o = c->pool->ops;
    struct comm_dev_ctx *x = ctx(c);
    if (!x || !has_base(a->dev) || a->T <= 0) return;
    const comm_geom_t *g = &c->g;
    const int T = a->T < KVM_KV_BLOCK ? a->T : KVM_KV_BLOCK;
    const int V = c->cfg.max_anchors <= 0                     ? 1
                  : c->cfg.max_anchors < KVM_KVCOMM_MAX_ANCHORS ? c->cfg.max_anchors
                                                                : KVM_KVCOMM_MAX_ANCHORS;
    const size_t per = (size_t)g->L * g->H * g->D;
    /* a buffer a sample of ~1K tokens with a full pool can take over from the free list */
    const size_t need = (size_t)2 * V * 1024 + 2 * (size_t)V * per;
    size_t cap = 0;
    /* buffers for the first REUSE request's samples, so that it allocates no device memory either */
    float *extra[COMM_DEV_WARM_BUFFERS - 1];
    size_t extra_cap[COMM_DEV_WARM_BUFFERS - 1];
    for (int i = 0; i < COMM_DEV_WARM_BUFFERS - 1; i++) extra[i] = wbuf_take(c, need, &extra_cap[i]);
    float *w = wbuf_take(c, need, &cap);
    for (int i = 0; i < COMM_DEV_WARM_BUFFERS - 1; i++) wbuf_give(c, o, extra[i], extra_cap[i]);
    if (!x->pred) x->pred = o->alloc(KVM_KVCOMM_MAX_ANCHORS * sizeof(float));
    const size_t blk_bytes = per * 2 * KVM_KV_BLOCK * kvm_dtype_size(c->pool->geom.dtype);
    void *dst = o->alloc(blk_bytes);
    const int32_t zero = 0;
    const int32_t *bt = upload_blocks(c, 0, &zero, 1);
    if (w && x->pred && dst && bt) {
        kvm_kv_view_t av = base_view(c, a);
        int rows = a->T;
        kvm_kvcomm_dist_args_t d = {.g = c->pool->geom, .x = av, .T = T, .n = 1, .a = &av, .a_rows = &rows,
                                    .want = KVM_KVCOMM_WANT_PH | KVM_KVCOMM_WANT_PF | KVM_KVCOMM_WANT_PRED,
                                    .rotate_tail = 1, .inv_freq = kvm_kv_store_inv_freq_dev(c->store),
                                    .layout = kvm_kv_store_rope(c->store)->layout, .d_ph = w, .d_pf = w + 2 * T,
                                    .d_pred = x->pred};
        /* first the size of a full pool (this anchor V times, up to 1024 of its rows): the backend's distance
         * scratch grows to it here, not in the first REUSE (growing it synchronizes and reallocates) */
        kvm_kv_view_t avs[KVM_KVCOMM_MAX_ANCHORS];
        int rows_v[KVM_KVCOMM_MAX_ANCHORS];
        for (int n = 0; n < V; n++) avs[n] = av, rows_v[n] = a->T;
        kvm_kvcomm_dist_args_t big = d;
        big.T = a->T < 1024 ? a->T : 1024;
        big.n = V, big.a = avs, big.a_rows = rows_v;
        big.d_pf = w + (size_t)2 * V * big.T;
        int rc = o->kvcomm_dist(&big);
        if (!rc) rc = o->kvcomm_dist(&d);
        if (!rc) rc = o->kvcomm_softmax(w, w, 1, (size_t)T, KVM_KVCOMM_SOFTMAX);
        kvm_kvcomm_apply_args_t ap = {.g = c->pool->geom, .src = av, .n = 0, .r0 = 0, .r1 = 1, .dst_kv = dst,
                                      .dst_blocks = bt, .dst_pos = 0, .shift = 1,
                                      .inv_freq = kvm_kv_store_inv_freq_dev(c->store),
                                      .layout = kvm_kv_store_rope(c->store)->layout, .dst_n_blocks = 1};
        if (!rc) rc = o->kvcomm_apply(&ap);
        if (!rc) rc = o->sync();
        if (rc) KVM_LOGW("kvcomm: warming the device ops failed (ignored): %s", kvm_errmsg());
    }
    wbuf_give(c, o, w, cap);
    o->free(dst);
}

int comm_dev_anchor_sync(kvm_comm_t *c, comm_anchor_t *a) {
    const kvm_ops_t *o = c->pool->ops;
    const kvm_dtype_t dt = c->pool->geom.dtype;
    const comm_geom_t *g = &c->g;
    struct comm_dev_anchor *m = anchor_mirror(c, a);
    if (!m) return KVM_ENOMEM;
    if (!has_base(m)) {
        m->base = m->alias ? a->base : upload_rows(o, dt, a->base, comm_rows_elems(g, a->T));
        if (!m->base) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    }
    if (mirror_reserve(m, a->n_deltas)) return KVM_ENOMEM;
    const bool own = !m->alias || m->q8; /* the deltas live in backend buffers of their own */
    while (m->n < a->n_deltas) {
        const comm_delta_t *dl = &a->deltas[m->n];
        void *ph = !own ? dl->d_ph : upload_delta(c, m, dl->d_ph, a->T);
        void *pf = !own ? dl->d_pf : ph ? upload_delta(c, m, dl->d_pf, dl->S) : NULL;
        if (!ph || !pf) {
            o->free(ph);
            return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
        }
        m->d_ph[m->n] = ph;
        m->d_pf[m->n] = pf;
        m->n++;
    }
    struct comm_dev_ctx *x = ctx(c);
    if (x && !x->warmed) {
        x->warmed = true;
        dev_warm(c, a);
    }
    return 0;
}

void comm_dev_anchor_free(comm_anchor_t *a) {
    struct comm_dev_anchor *m = a->dev;
    if (!m) return;
    for (int i = 0; i < m->n && (!m->alias || m->q8); i++) {
        m->o->free(m->d_ph[i]);
        m->o->free(m->d_pf[i]);
    }
    if (!m->alias) m->o->free(m->base);
    if (m->seg) kvm_segment_release(m->seg);
    m->o->free(m->seg_bt);
    kvm_free(m->d_ph);
    kvm_free(m->d_pf);
    kvm_free(m);
    a->dev = NULL;
}

/* Storage of n elements of anchor data: host fp32 (kvm_malloc, owned by the anchor's host arrays) on a host-fp32
 * backend, else backend memory in the pool dtype (owned by the mirror). */
static void *anchor_alloc(kvm_comm_t *c, size_t n) {
    if (host_f32(c)) return kvm_malloc(n * sizeof(float) + 1);
    return c->pool->ops->alloc(n ? n * kvm_dtype_size(c->pool->geom.dtype) : 16);
}

static void anchor_release(kvm_comm_t *c, void *p) {
    if (host_f32(c)) kvm_free(p);
    else c->pool->ops->free(p);
}

static struct comm_dev_anchor *anchor_mirror(kvm_comm_t *c, comm_anchor_t *a) {
    if (!a->dev) {
        a->dev = kvm_calloc(1, sizeof *a->dev);
        if (!a->dev) return NULL;
        a->dev->o = c->pool->ops;
        a->dev->alias = host_f32(c);
        a->dev->q8 = a->q8;
    }
    return a->dev;
}

/* ---- deltas: rows [L-1][2][H][n][D] in the pool dtype (anchor_alloc), or q8 ---- */

static size_t delta_elems(const kvm_comm_t *c, int n) {
    const comm_geom_t gd = {c->g.L - 1, c->g.H, c->g.D, c->g.esize};
    return comm_rows_elems(&gd, n);
}

static void *delta_alloc(kvm_comm_t *c, const struct comm_dev_anchor *m, int n) {
    if (!m->q8) return anchor_alloc(c, delta_elems(c, n));
    return c->pool->ops->alloc(kvm_q8_bytes(delta_elems(c, n), c->g.D));
}

static void delta_release(kvm_comm_t *c, const struct comm_dev_anchor *m, void *p) {
    if (!m->q8) anchor_release(c, p);
    else c->pool->ops->free(p);
}

/* the scales of a q8 delta buffer p of n rows */
static float *delta_scale(const kvm_comm_t *c, const struct comm_dev_anchor *m, const void *p, int n) {
    if (!m->q8) return NULL;
    return kvm_q8_scales(p, delta_elems(c, n));
}

/* the view kvcomm_apply and kvcomm_spread read delta buffer p of n rows through */
static kvm_kv_view_t delta_view(const kvm_comm_t *c, const struct comm_dev_anchor *m, const void *p, int n) {
    return (kvm_kv_view_t){.data = p, .rows = n, .l0 = 1, .scale = delta_scale(c, m, p, n)};
}

/* host fp32 delta rows -> a new backend delta buffer (encoded when q8) */
static void *upload_delta(kvm_comm_t *c, const struct comm_dev_anchor *m, const float *src, int n) {
    const kvm_ops_t *o = c->pool->ops;
    if (!m->q8) return upload_rows(o, c->pool->geom.dtype, src, delta_elems(c, n));
    const size_t elems = delta_elems(c, n), bytes = kvm_q8_bytes(elems, c->g.D);
    void *d = o->alloc(bytes ? bytes : 16);
    char *h = kvm_malloc(bytes + 1);
    if (d && h) {
        float *sc = kvm_q8_scales(h, elems);
        memset(h, 0, bytes);
        for (size_t r = 0; r < elems / (size_t)c->g.D; r++)
            kvm_q8_encode_row((int8_t *)h + r * c->g.D, sc + r, src + r * c->g.D, c->g.D);
    }
    int rc = d && h ? (bytes ? o->h2d(d, h, bytes) : 0) : KVM_ENOMEM;
    kvm_free(h);
    if (rc) {
        o->free(d);
        return NULL;
    }
    return d;
}

static int mirror_reserve(struct comm_dev_anchor *m, int n) {
    if (m->cap >= n) return 0;
    int cap = n + 4;
    void **p = kvm_realloc(m->d_ph, (size_t)cap * sizeof *p);
    if (!p) return KVM_ENOMEM;
    m->d_ph = p;
    void **f = kvm_realloc(m->d_pf, (size_t)cap * sizeof *f);
    if (!f) return KVM_ENOMEM;
    m->d_pf = f;
    m->cap = cap;
    return 0;
}

int comm_dev_anchor_base(kvm_comm_t *c, comm_anchor_t *a, comm_sample_t *s) {
    if (!s->dev || !s->dev->seg) return kvm_seterr(KVM_EINTERNAL, "kvcomm: sample '%s' has no segment", s->name);
    struct comm_dev_anchor *m = anchor_mirror(c, a);
    if (!m) return KVM_ENOMEM;
    if (has_base(m)) return 0;
    /* a copy while the anchor is staged (a request pins no segment: see comm_dev_sample), shared at commit */
    kvm_kv_view_t sv;
    int rc = seg_view(c, s->dev->seg, &sv);
    if (rc) return rc;
    rc = base_copy(c, a, sv);
    if (!rc) a->seg_id = kvm_segment_info(s->dev->seg)->id;
    return rc;
}

/* The anchor's base becomes its own copy of the rows of view v (the backend's data; aliased by a->base on a
 * host-fp32 backend). */
static int base_copy(kvm_comm_t *c, comm_anchor_t *a, kvm_kv_view_t v) {
    struct comm_dev_anchor *m = a->dev;
    void *buf = anchor_alloc(c, comm_rows_elems(&c->g, a->T));
    if (!buf) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    kvm_kvcomm_diff_args_t d = {.g = c->pool->geom, .a = v, .n = a->T, .l0 = 0, .out = buf};
    int rc = c->pool->ops->kvcomm_diff(&d);
    if (rc) {
        anchor_release(c, buf);
        return rc;
    }
    m->base = buf;
    if (m->alias) a->base = buf;
    return 0;
}

int comm_dev_anchor_share(kvm_comm_t *c, comm_anchor_t *a) {
    struct comm_dev_anchor *m = a->dev;
    if (!m || !m->base || m->seg || !a->seg_id) return 0;
    kvm_segment_t *seg = kvm_segment_get(c->store, a->seg_id); /* a new reference, or NULL: evicted */
    if (!seg) {
        kvm_errclear();
        return 0;
    }
    int nb = 0;
    const int32_t *b = kvm_segment_blocks(seg, &nb);
    const kvm_ops_t *o = c->pool->ops;
    int32_t *bt = kvm_segment_info(seg)->n_tokens >= a->T ? o->alloc((size_t)(nb > 0 ? nb : 1) * sizeof(int32_t)) : NULL;
    if (!bt || (nb > 0 && o->h2d(bt, b, (size_t)nb * sizeof(int32_t)))) {
        o->free(bt);
        kvm_segment_release(seg);
        return 0; /* the copy stays */
    }
    anchor_release(c, m->base);
    if (m->alias) a->base = NULL;
    m->base = NULL;
    m->seg = seg;
    m->seg_bt = bt;
    a->base_shared = true;
    return 1;
}

int comm_dev_anchor_unshare(kvm_comm_t *c, comm_anchor_t *a) {
    struct comm_dev_anchor *m = a->dev;
    if (!m || !m->seg) return 0;
    /* the anchor's own block table: no shared slot that a queued op may still need */
    int rc = base_copy(c, a, (kvm_kv_view_t){.data = c->pool->data, .blocks = m->seg_bt, .start = 0});
    if (rc) return rc;
    kvm_segment_release(m->seg);
    c->pool->ops->free(m->seg_bt);
    m->seg = NULL;
    m->seg_bt = NULL;
    a->base_shared = false;
    return 0;
}

static const void *template_P(kvm_template_t *t, int i);

int comm_dev_anchor_add_delta(kvm_comm_t *c, comm_anchor_t *a, kvm_template_t *t, int i, const kvm_seq_t *seq, int t_ph,
                              int t_pf, int S) {
    struct comm_dev_anchor *m = a->dev;
    if (!has_base(m)) return kvm_seterr(KVM_EINTERNAL, "kvcomm: anchor %016llx has no base", (unsigned long long)a->key);
    if (m->n != a->n_deltas) return kvm_seterr(KVM_EINTERNAL, "kvcomm: anchor %016llx: deltas not uploaded", (unsigned long long)a->key);
    const void *P = S > 0 ? template_P(t, i + 1) : NULL;
    if (S > 0 && !P) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    if (comm_reserve(&a->deltas, &a->cap_deltas, a->n_deltas, sizeof *a->deltas) || mirror_reserve(m, a->n_deltas + 1))
        return KVM_ENOMEM;
    const int32_t *bt = upload_blocks(c, 0, seq->blocks, seq->n_blocks);
    if (!bt) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    void *ph = delta_alloc(c, m, a->T), *pf = delta_alloc(c, m, S);
    int rc = ph && pf ? 0 : kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    const kvm_kv_view_t paged = {.data = c->pool->data, .blocks = bt};
    kvm_kvcomm_diff_args_t d = {.g = c->pool->geom, .a = paged, .b = base_view(c, a), .n = a->T,
                                .l0 = 1, .shift = -t_ph, .inv_freq = kvm_kv_store_inv_freq_dev(c->store),
                                .layout = kvm_kv_store_rope(c->store)->layout, .out = ph,
                                .out_scale = ph ? delta_scale(c, m, ph, a->T) : NULL};
    d.a.start = t_ph;
    if (!rc) rc = c->pool->ops->kvcomm_diff(&d);
    d.a.start = t_pf, d.shift = -t_pf, d.n = S, d.out = pf, d.out_scale = pf ? delta_scale(c, m, pf, S) : NULL;
    d.b = (kvm_kv_view_t){.data = P, .rows = S, .l0 = 0};
    if (!rc && S > 0) rc = c->pool->ops->kvcomm_diff(&d);
    if (rc) {
        delta_release(c, m, ph);
        delta_release(c, m, pf);
        return rc;
    }
    comm_delta_t dl;
    memset(&dl, 0, sizeof dl);
    snprintf(dl.consumer, sizeof dl.consumer, "%s", t->agent);
    dl.template_hash = t->hash;
    dl.S = S;
    if (m->alias && !m->q8) dl.d_ph = ph, dl.d_pf = pf;
    a->deltas[a->n_deltas++] = dl;
    m->d_ph[m->n] = ph;
    m->d_pf[m->n] = pf;
    m->n++;
    return 0;
}

/* backend rows of n elements in the pool dtype -> new host fp32 array */
static float *download_f32(kvm_comm_t *c, const void *src, size_t n) {
    const kvm_ops_t *o = c->pool->ops;
    const kvm_dtype_t dt = c->pool->geom.dtype;
    float *out = kvm_malloc(n * sizeof(float) + 1);
    if (!out) return NULL;
    int rc = 0;
    if (dt == KVM_F32) {
        rc = n ? o->d2h(out, src, n * sizeof(float)) : 0;
    } else {
        uint16_t *tmp = kvm_malloc(n * sizeof(uint16_t) + 1);
        rc = tmp ? (n ? o->d2h(tmp, src, n * sizeof(uint16_t)) : 0) : KVM_ENOMEM;
        for (size_t k = 0; !rc && k < n; k++) out[k] = dt == KVM_BF16 ? kvm_bf16_to_f32(tmp[k]) : kvm_f16_to_f32(tmp[k]);
        kvm_free(tmp);
    }
    if (rc) {
        kvm_free(out);
        return NULL;
    }
    return out;
}

/* a backend delta buffer of n rows -> new host fp32 array (decoded when q8) */
static float *download_delta(kvm_comm_t *c, const struct comm_dev_anchor *m, const void *src, int n) {
    const size_t elems = delta_elems(c, n);
    if (!m->q8) return download_f32(c, src, elems);
    const size_t bytes = kvm_q8_bytes(elems, c->g.D);
    char *h = kvm_malloc(bytes + 1);
    float *out = h ? kvm_malloc(elems * sizeof(float) + 1) : NULL;
    int rc = out ? (bytes ? c->pool->ops->d2h(h, src, bytes) : 0) : KVM_ENOMEM;
    if (!rc) {
        const float *sc = kvm_q8_scales(h, elems);
        for (size_t k = 0; k < elems; k++) out[k] = (float)((const int8_t *)h)[k] * sc[k / (size_t)c->g.D];
    }
    kvm_free(h);
    if (rc) {
        kvm_free(out);
        return NULL;
    }
    return out;
}

int comm_anchor_host(kvm_comm_t *c, comm_anchor_t *a) {
    struct comm_dev_anchor *m = a->dev;
    if (!m) return 0; /* no mirror: host arrays only */
    if (!a->base && m->seg) {
        a->base = kvm_malloc(comm_rows_elems(&c->g, a->T) * sizeof(float) + 1);
        if (!a->base) return KVM_ENOMEM;
        int rc = kvm_segment_read_f32(m->seg, 0, a->T, a->base);
        if (rc) {
            kvm_free(a->base);
            a->base = NULL;
            return rc;
        }
    }
    if (!a->base && !(a->base = download_f32(c, m->base, comm_rows_elems(&c->g, a->T)))) return KVM_ENOMEM;
    if (m->alias && !m->q8) return 0; /* host-fp32 backend: the host deltas are the data */
    for (int i = 0; i < a->n_deltas && i < m->n; i++) {
        comm_delta_t *dl = &a->deltas[i];
        if (!dl->d_ph && !(dl->d_ph = download_delta(c, m, m->d_ph[i], a->T))) return KVM_ENOMEM;
        if (!dl->d_pf && !(dl->d_pf = download_delta(c, m, m->d_pf[i], dl->S))) return KVM_ENOMEM;
    }
    return 0;
}

void comm_anchor_host_drop(kvm_comm_t *c, comm_anchor_t *a) {
    (void)c;
    struct comm_dev_anchor *m = a->dev;
    if (!has_base(m) || m->n < a->n_deltas) return; /* only copies of data the backend holds */
    if (!m->alias || m->seg) { /* the host base is a copy */
        kvm_free(a->base);
        a->base = NULL;
    }
    if (m->alias && !m->q8) return; /* the host deltas are the data */
    for (int i = 0; i < a->n_deltas; i++) {
        kvm_free(a->deltas[i].d_ph);
        kvm_free(a->deltas[i].d_pf);
        a->deltas[i].d_ph = a->deltas[i].d_pf = NULL;
    }
}

/* ==== templates ============================================================================================= */

void comm_dev_template_free(kvm_template_t *t) {
    if (!t->c) return;
    const kvm_ops_t *o = t->c->pool->ops;
    for (int i = 0; i <= KVM_COMM_MAX_PH; i++) {
        if (t->dev_P[i] && t->dev_P[i] != (void *)t->P[i]) o->free(t->dev_P[i]); /* (else the host copy itself) */
        t->dev_P[i] = NULL;
    }
}

/* backend copy of text segment i (1..n_ph) of t, rows S = te[i] - ts[i] */
static const void *template_P(kvm_template_t *t, int i) {
    if (!t->dev_P[i]) {
        kvm_comm_t *c = t->c;
        int S = t->te[i] - t->ts[i];
        t->dev_P[i] = host_f32(c) ? (void *)t->P[i]
                                  : upload_rows(c->pool->ops, c->pool->geom.dtype, t->P[i], comm_rows_elems(&c->g, S));
    }
    return t->dev_P[i];
}

/* Makes the backend copies of all text segments of t (at template creation, so that the first REUSE of the
 * template does not pay the upload); 0 or a KVM_E*. */
int comm_dev_template_prepare(kvm_template_t *t) {
    for (int i = 1; i <= t->n_ph; i++)
        if (t->te[i] > t->ts[i] && !template_P(t, i)) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    return 0;
}

/* ==== samples ============================================================================================== */

int comm_dev_sample_bind(kvm_comm_t *c, comm_sample_t *s, const kvm_segment_t *seg) {
    s->dev = kvm_calloc(1, sizeof *s->dev);
    if (!s->dev) return KVM_ENOMEM;
    s->dev->o = c->pool->ops;
    s->dev->seg = (kvm_segment_t *)seg;
    return 0;
}

void comm_dev_sample_rebind(comm_sample_t *s, const kvm_segment_t *seg) {
    if (s->dev) s->dev->seg = (kvm_segment_t *)seg;
}

void comm_dev_sample_free(kvm_comm_t *c, comm_sample_t *s) {
    struct comm_dev_sample *d = s->dev;
    if (!d) return;
    wbuf_give(c, d->o, d->w, d->w_cap);
    kvm_free(d->keys);
    kvm_free(d->mean_w);
    kvm_free(d);
    s->dev = NULL;
}

int comm_dev_sample_x(kvm_comm_t *c, comm_sample_t *s) {
    if (s->X) return 0;
    if (!s->dev || !s->dev->seg) return kvm_seterr(KVM_EINTERNAL, "kvcomm: sample '%s' has neither a base nor a segment", s->name);
    s->X = kvm_malloc(comm_rows_elems(&c->g, s->T) * sizeof(float));
    if (!s->X) return KVM_ENOMEM;
    int rc = kvm_segment_read_f32(s->dev->seg, 0, s->T, s->X);
    if (rc) {
        kvm_free(s->X);
        s->X = NULL;
    }
    return rc;
}

/* the paged view of the sample's segment (block table uploaded into slot 1) */
static int seg_view(kvm_comm_t *c, const kvm_segment_t *seg, kvm_kv_view_t *v) {
    int nb = 0;
    const int32_t *b = kvm_segment_blocks(seg, &nb);
    const int32_t *db = upload_blocks(c, 1, b, nb);
    if (!db) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    *v = (kvm_kv_view_t){.data = c->pool->data, .blocks = db, .start = 0};
    return 0;
}

static int anchor_views(kvm_comm_t *c, comm_anchor_t **A, int N, kvm_kv_view_t *av, int *rows) {
    for (int n = 0; n < N; n++) {
        int rc = comm_dev_anchor_sync(c, A[n]);
        if (rc) return rc;
        av[n] = base_view(c, A[n]);
        rows[n] = A[n]->T;
    }
    return 0;
}

/* ==== prediction distances (§3.4) =========================================================================== */

int comm_dev_pred(kvm_comm_t *c, comm_sample_t *s, comm_anchor_t **E, int n, double *d) {
    if (n <= 0) return 0;
    if (n > KVM_KVCOMM_MAX_ANCHORS)
        return kvm_seterr(KVM_EUNSUPPORTED, "kvcomm: %d eligible anchors (the ops take %d)", n, KVM_KVCOMM_MAX_ANCHORS);
    const kvm_ops_t *o = c->pool->ops;
    struct comm_dev_ctx *x = ctx(c);
    if (!x) return KVM_ENOMEM;
    if (!x->pred && !(x->pred = o->alloc(KVM_KVCOMM_MAX_ANCHORS * sizeof(float)))) return kvm_errcode();
    kvm_kv_view_t av[KVM_KVCOMM_MAX_ANCHORS];
    int rows[KVM_KVCOMM_MAX_ANCHORS];
    int rc = anchor_views(c, E, n, av, rows);
    kvm_kvcomm_dist_args_t a = {.g = c->pool->geom, .T = s->T, .n = n, .a = av, .a_rows = rows,
                                .want = KVM_KVCOMM_WANT_PRED, .d_pred = x->pred};
    if (!rc) rc = seg_view(c, s->dev->seg, &a.x);
    if (!rc) rc = o->kvcomm_dist(&a);
    float h[KVM_KVCOMM_MAX_ANCHORS];
    if (!rc) rc = o->d2h(h, x->pred, (size_t)n * sizeof(float));
    if (rc) return rc;
    const double cnt = (double)comm_rows_elems(&c->g, s->T) / 2;
    for (int i = 0; i < n; i++)
        d[i] = c->cfg.dist_norm == KVM_KVCOMM_DIST_PER_ELEMENT ? (double)h[i] / sqrt(cnt) : (double)h[i];
    return 0;
}

/* ==== weights (§3.6) ======================================================================================= */

/* Enqueues the weights of sample s over anchors A[0..N) (distances, then softmax in place) unless the sample's
 * cached weights are for the same anchors; xv is the sample's base (a paged view). Sets *computed. No sync. */
static int dev_weights(kvm_comm_t *c, comm_sample_t *s, comm_anchor_t **A, int N, const kvm_kv_view_t *xv, bool *computed) {
    struct comm_dev_sample *ds = s->dev;
    const comm_geom_t *g = &c->g;
    const kvm_ops_t *o = c->pool->ops;
    *computed = false;
    if (ds->n == N && ds->keys) {
        bool same = true;
        for (int i = 0; i < N && same; i++) same = ds->keys[i] == A[i]->key;
        if (same) return 0;
    }
    ds->n = 0;
    ds->mean_ok = false;
    const size_t nph = (size_t)2 * N * s->T, per = (size_t)g->L * g->H * g->D, need = nph + 2 * N * per;
    if (ds->w_cap < need) {
        wbuf_give(c, o, ds->w, ds->w_cap);
        ds->w = wbuf_take(c, need, &ds->w_cap);
        if (!ds->w) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    }
    uint64_t *keys = kvm_realloc(ds->keys, (size_t)N * sizeof(uint64_t));
    if (!keys) return KVM_ENOMEM;
    ds->keys = keys;
    float *mw = kvm_realloc(ds->mean_w, (size_t)N * sizeof(float));
    if (!mw) return KVM_ENOMEM;
    ds->mean_w = mw;
    kvm_kv_view_t av[KVM_KVCOMM_MAX_ANCHORS];
    int rows[KVM_KVCOMM_MAX_ANCHORS];
    int rc = anchor_views(c, A, N, av, rows);
    float *wph = ds->w, *wpf = ds->w + nph;
    kvm_kvcomm_dist_args_t a = {.g = c->pool->geom, .x = *xv, .T = s->T, .n = N, .a = av, .a_rows = rows,
                                .want = KVM_KVCOMM_WANT_PH | KVM_KVCOMM_WANT_PF, .rotate_tail = 1,
                                .inv_freq = kvm_kv_store_inv_freq_dev(c->store),
                                .layout = kvm_kv_store_rope(c->store)->layout, .d_ph = wph, .d_pf = wpf};
    if (!rc) rc = o->kvcomm_dist(&a);
    const int mode = c->cfg.weights == KVM_KVCOMM_W_NEAREST ? KVM_KVCOMM_NEAREST : KVM_KVCOMM_SOFTMAX;
    for (int kv = 0; kv < 2 && !rc; kv++) {
        rc = o->kvcomm_softmax(wph + (size_t)kv * N * s->T, wph + (size_t)kv * N * s->T, N, (size_t)s->T, mode);
        if (!rc) rc = o->kvcomm_softmax(wpf + (size_t)kv * N * per, wpf + (size_t)kv * N * per, N, per, mode);
    }
    if (rc) return rc;
    for (int i = 0; i < N; i++) ds->keys[i] = A[i]->key;
    ds->n = N;
    *computed = true;
    return 0;
}

/* Reads back the placeholder key weights [N][T] of s (after a sync) and keeps their mean per anchor. */
static int dev_mean_weights(kvm_comm_t *c, comm_sample_t *s) {
    struct comm_dev_sample *ds = s->dev;
    if (ds->mean_ok || ds->n <= 0) return 0;
    const int N = ds->n, T = s->T;
    float *hw = kvm_malloc((size_t)N * T * sizeof(float));
    if (!hw) return KVM_ENOMEM;
    int rc = c->pool->ops->d2h(hw, ds->w, (size_t)N * T * sizeof(float));
    for (int n = 0; n < N && !rc; n++) {
        double mw = 0;
        for (int q = 0; q < T; q++) mw += hw[(size_t)n * T + q];
        ds->mean_w[n] = (float)(mw / T);
    }
    kvm_free(hw);
    if (!rc) ds->mean_ok = true;
    return rc;
}

/* ==== REUSE assembly (§3.6, §3.7, §3.11) ===================================================================== */

static double ms_since(uint64_t t0) { return (double)(kvm_now_ns() - t0) / 1e6; }

/* the distinct segments of one reuse call and where their block tables sit in device slot 0 */
typedef struct {
    const kvm_segment_t *seg[2 * KVM_COMM_MAX_PH];
    size_t off[2 * KVM_COMM_MAX_PH];
    int n;
    size_t total; /* entries so far */
} seg_tables_t;

static int seg_tables_add(seg_tables_t *st, const kvm_segment_t *g) {
    for (int i = 0; i < st->n; i++)
        if (st->seg[i] == g) return i;
    int nb = 0;
    kvm_segment_blocks(g, &nb);
    st->seg[st->n] = g;
    st->off[st->n] = st->total;
    st->total += (size_t)nb;
    return st->n++;
}

/* The plan of one comm_dev_reuse call: per piece the rows that land in [E, N-1) (comm_piece_rows), the slot-0
 * table index of its source and sample segments, and where its spread scores go; the uploaded tables. */
typedef struct {
    int a0, a1, b0, b1, na, nb, src, smp, NA;
    bool shared, scored;
    size_t score_off;
} piece_plan_t;

typedef struct {
    piece_plan_t pl[KVM_COMM_MAX_PH];
    seg_tables_t st;
    const int32_t *dbt; /* slot 0: the prompt's table, then every segment's */
    size_t n_score;
} reuse_plan_t;

/* The delta of `consumer` in anchor an (its index in an->deltas), checked against the backend mirror and S. */
static const comm_delta_t *dev_delta(const comm_anchor_t *an, const char *consumer, int S, int *k) {
    const comm_delta_t *dl = comm_anchor_delta(an, consumer);
    *k = dl ? (int)(dl - an->deltas) : 0;
    if (!dl || !an->dev || *k >= an->dev->n) {
        kvm_seterr(KVM_EINTERNAL, "kvcomm: anchor %016llx has no backend delta for '%s'", (unsigned long long)an->key,
                   consumer);
        return NULL;
    }
    if (dl->S != S) {
        kvm_seterr(KVM_EINTERNAL, "kvcomm: delta of '%s' has %d text rows, the template %d", consumer, dl->S, S);
        return NULL;
    }
    return dl;
}

/* Step 1 of comm_dev_reuse: plans every piece, checks the anchors' backend deltas, uploads the block tables and
 * sizes the spread-score buffer. */
static int reuse_plan(kvm_comm_request_t *rq, kvm_template_t *t, const comm_piece_t *pcs, const comm_forced_t *forced,
                      kvm_prepared_t *out, int E, int N, bool scores, reuse_plan_t *rp) {
    kvm_comm_t *c = rq->c;
    struct comm_dev_ctx *x = c->dev;
    const int n_tail = N - 1 - E;
    rp->st = (seg_tables_t){.n = 0, .total = n_tail > 0 ? (size_t)out->seq.n_blocks : 0};
    rp->n_score = 0;
    for (int i = 0; i < t->n_ph; i++) {
        const comm_piece_t *ph = &pcs[i];
        piece_plan_t *q = &rp->pl[i];
        comm_piece_rows(ph, E, N, &q->a0, &q->a1, &q->b0, &q->b1);
        q->na = q->a1 > q->a0 ? q->a1 - q->a0 : 0, q->nb = q->b1 > q->b0 ? q->b1 - q->b0 : 0;
        q->shared = ph->decision == KVM_PH_SHARED;
        q->NA = q->shared ? ph->n_usable : 0;
        q->src = q->smp = -1;
        if (q->NA > KVM_KVCOMM_MAX_ANCHORS)
            return kvm_seterr(KVM_EUNSUPPORTED, "kvcomm: %d usable anchors (at most %d)", q->NA, KVM_KVCOMM_MAX_ANCHORS);
        if (q->na > 0) q->src = seg_tables_add(&rp->st, ph->seg);
        if (q->shared) q->smp = seg_tables_add(&rp->st, rq->samples[ph->sample].dev->seg);
        int k = 0;
        for (int n = 0; n < q->NA; n++)
            if (!dev_delta(ph->usable[n], t->agent, ph->S, &k)) return KVM_EINTERNAL;
        if (q->shared && forced && forced[i].anchor && !dev_delta(forced[i].anchor, t->agent, ph->S, &k))
            return KVM_EINTERNAL;
        if (q->nb > 0 && !template_P(t, i + 1)) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
        /* recompute_frac: the offset-corrected rows of every shared placeholder that is not recomputed whole */
        q->scored = scores && q->shared && q->na > 0 && ph->T >= c->cfg.recompute_below;
        q->score_off = rp->n_score;
        if (q->scored) rp->n_score += (size_t)q->na;
    }
    if (rp->st.total > x->hbt_cap) {
        size_t cap = rp->st.total < 1024 ? 1024 : rp->st.total * 2;
        int32_t *h = kvm_realloc(x->hbt, cap * sizeof(int32_t));
        if (!h) return KVM_ENOMEM;
        x->hbt = h;
        x->hbt_cap = cap;
    }
    if (n_tail > 0) memcpy(x->hbt, out->seq.blocks, (size_t)out->seq.n_blocks * sizeof(int32_t));
    for (int i = 0; i < rp->st.n; i++) {
        int nb = 0;
        const int32_t *b = kvm_segment_blocks(rp->st.seg[i], &nb);
        memcpy(x->hbt + rp->st.off[i], b, (size_t)nb * sizeof(int32_t));
    }
    rp->dbt = upload_blocks(c, 0, x->hbt, (int)rp->st.total);
    if (!rp->dbt) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    if (rp->n_score > x->score_cap) {
        const kvm_ops_t *o = c->pool->ops;
        size_t cap = rp->n_score < 4096 ? 4096 : rp->n_score * 2;
        o->free(x->score);
        kvm_free(x->h_score);
        x->score = o->alloc(cap * sizeof(float));
        x->h_score = kvm_malloc(cap * sizeof(float));
        x->score_cap = x->score && x->h_score ? cap : 0;
        if (!x->score_cap) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    }
    return 0;
}

/* The anchor views and weights one piece mixes: its placeholder rows (ph) or its text rows (pf). The estimate: the
 * usable anchors' deltas with the sample's weights; the diagnostics hook: the forced anchor's delta, weight 1. */
typedef struct {
    kvm_kv_view_t d[KVM_KVCOMM_MAX_ANCHORS];
    int n;
    const float *w;
    int w_rows;
} piece_mix_t;

static void piece_mix(const kvm_comm_t *c, const comm_piece_t *ph, const comm_sample_t *s, const comm_forced_t *f,
                      const char *consumer, int NA, bool pf, piece_mix_t *m) {
    const int bit = pf ? COMM_FORCE_PF : COMM_FORCE_PH;
    const bool forced = s && f && f->anchor && (f->which & bit); /* (only a SHARED piece has a sample) */
    comm_anchor_t *const *A = forced ? &f->anchor : ph->usable;
    m->n = forced ? 1 : NA;
    m->w = forced ? f->ones : s ? s->dev->w + (pf ? (size_t)2 * NA * ph->T : 0) : NULL;
    m->w_rows = pf ? 0 : ph->T;
    for (int n = 0; n < m->n; n++) {
        const comm_anchor_t *an = A[n];
        const comm_delta_t *dl = comm_anchor_delta(an, consumer);
        const int k = (int)(dl - an->deltas);
        m->d[n] = pf ? delta_view(c, an->dev, an->dev->d_pf[k], dl->S) : delta_view(c, an->dev, an->dev->d_ph[k], an->T);
    }
}

/* Step 2 of comm_dev_reuse for piece i: enqueues its weights (on a cache miss), the fused apply of its placeholder
 * rows, their spread scores and the apply of its text rows. *w_ms gets the weights' host wall time; ev: events
 * around the weights (or NULLs). No sync. */
static int piece_enqueue(kvm_comm_request_t *rq, kvm_template_t *t, const comm_piece_t *ph, const comm_forced_t *f,
                         const reuse_plan_t *rp, int i, kvm_prepared_t *out, double *w_ms, void **ev) {
    kvm_comm_t *c = rq->c;
    const kvm_ops_t *o = c->pool->ops;
    const kvm_kvcomm_config_t *cfg = &c->cfg;
    const piece_plan_t *q = &rp->pl[i];
    comm_sample_t *s = q->shared ? &rq->samples[ph->sample] : NULL;
    const float *inv = kvm_kv_store_inv_freq_dev(c->store);
    const kvm_rope_layout_t layout = kvm_kv_store_rope(c->store)->layout;
    int rc = 0;
    if (q->shared) {
        uint64_t tw = kvm_now_ns();
        const kvm_kv_view_t xv = {.data = c->pool->data, .blocks = rp->dbt + rp->st.off[q->smp], .start = 0};
        bool computed = false;
        if (ev) ev[0] = o->event_record();
        rc = dev_weights(c, s, ph->usable, q->NA, &xv, &computed);
        if (ev) ev[1] = o->event_record();
        *w_ms += ms_since(tw);
        if (rc) return rc;
    }
    piece_mix_t mph, mpf;
    piece_mix(c, ph, s, f, t->agent, q->NA, false, &mph);
    piece_mix(c, ph, s, f, t->agent, q->NA, true, &mpf);
    kvm_kvcomm_apply_args_t a = {.g = c->pool->geom, .dst_kv = c->pool->data, .dst_blocks = rp->dbt, .inv_freq = inv,
                                 .layout = layout, .dst_n_blocks = out->seq.n_blocks};
    if (q->na > 0) {
        a.src = (kvm_kv_view_t){.data = c->pool->data, .blocks = rp->dbt + rp->st.off[q->src], .start = 0};
        a.n = q->shared && cfg->ph_offset ? mph.n : 0, a.delta = mph.d, a.w = mph.w, a.per_channel = 0;
        a.w_rows = mph.w_rows, a.r0 = q->a0, a.r1 = q->a1, a.dst_pos = ph->t_ph + q->a0;
        a.shift = cfg->rotate ? ph->t_ph : 0;
        rc = o->kvcomm_apply(&a);
    }
    if (!rc && q->scored) {
        kvm_kvcomm_spread_args_t sp = {.g = c->pool->geom,
                                       .x = {.data = c->pool->data, .blocks = rp->dbt + rp->st.off[q->smp], .start = 0},
                                       .n = mph.n, .delta = mph.d, .w = mph.w, .w_rows = mph.w_rows, .r0 = q->a0,
                                       .r1 = q->a1, .out = c->dev->score + q->score_off};
        rc = o->kvcomm_spread(&sp);
    }
    if (!rc && q->nb > 0) {
        a.src = (kvm_kv_view_t){.data = t->dev_P[i + 1], .rows = ph->S, .l0 = 0};
        a.n = q->shared && cfg->pf_offset ? mpf.n : 0, a.delta = mpf.d, a.w = mpf.w, a.per_channel = 1, a.w_rows = 0;
        a.r0 = q->b0, a.r1 = q->b1, a.dst_pos = ph->t_pf + q->b0, a.shift = cfg->rotate ? ph->t_pf : 0;
        rc = o->kvcomm_apply(&a);
    }
    return rc;
}

/* weights_ms: device time of the weight kernels (events ev[i][0..1], freed here) or their host wall time w_wall
 * (synchronous backends), at most the enqueue-to-sync window dev_wall. */
static double weights_time(const kvm_ops_t *o, void *ev[][2], int n, double w_wall, double dev_wall, bool ok) {
    if (!o->event_record || !o->event_elapsed_ms || !o->event_free) return w_wall;
    double w_ms = 0;
    for (int i = 0; i < n; i++)
        if (ev[i][0] && ev[i][1]) {
            if (ok) {
                float e = o->event_elapsed_ms(ev[i][0], ev[i][1]);
                if (e > 0) w_ms += e;
            }
            o->event_free(ev[i][0]), o->event_free(ev[i][1]);
        }
    return w_ms > dev_wall ? dev_wall : w_ms;
}

int comm_dev_reuse(kvm_comm_request_t *rq, const kvm_template_t *tc, const comm_piece_t *pcs, const comm_forced_t *forced,
                   kvm_prepared_t *out, int E, int N, float *row_score) {
    kvm_comm_t *c = rq->c;
    kvm_template_t *t = (kvm_template_t *)tc; /* for its lazily made backend copies of P */
    const kvm_ops_t *o = c->pool->ops;
    kvm_comm_report_t *r = &out->report;
    const int n_tail = N - 1 - E;
    uint64_t ta = kvm_now_ns();
    if (!ctx(c)) return KVM_ENOMEM;
    int rc = 0;
    if (n_tail > 0 && (rc = kvm_seq_reserve(&out->seq, N - 1))) return rc;
    /* 1. plan every piece, upload the block tables */
    reuse_plan_t rp;
    memset(&rp, 0, sizeof rp);
    const bool scores = row_score && comm_wants_scores(&c->cfg) && c->cfg.ph_offset;
    if ((rc = reuse_plan(rq, t, pcs, forced, out, E, N, scores, &rp))) return rc;
    const double assemble = ms_since(ta);
    /* 2. weights and applies of every piece, enqueued back to back; one sync */
    const bool ev = o->event_record && o->event_elapsed_ms && o->event_free;
    void *evw[KVM_COMM_MAX_PH][2];
    memset(evw, 0, sizeof evw);
    double w_wall = 0;
    uint64_t td = kvm_now_ns();
    for (int i = 0; i < t->n_ph && !rc; i++)
        rc = piece_enqueue(rq, t, &pcs[i], forced ? &forced[i] : NULL, &rp, i, out, &w_wall, ev ? evw[i] : NULL);
    if (!rc) rc = o->sync();
    if (!rc && rp.n_score > 0) { /* the scores, to the rows of the prompt (the recompute stage picks from them) */
        rc = o->d2h(c->dev->h_score, c->dev->score, rp.n_score * sizeof(float));
        for (int i = 0; i < t->n_ph && !rc; i++)
            if (rp.pl[i].scored)
                memcpy(row_score + pcs[i].t_ph + rp.pl[i].a0, c->dev->h_score + rp.pl[i].score_off,
                       (size_t)rp.pl[i].na * sizeof(float));
    }
    const double dev_wall = ms_since(td);
    const double w_ms = weights_time(o, evw, t->n_ph, w_wall, dev_wall, rc == 0);
    if (rc) return rc;
    /* 3. the trace's top anchor of every shared placeholder */
    uint64_t tm = kvm_now_ns();
    for (int i = 0; i < t->n_ph && !rc; i++) {
        kvm_comm_ph_report_t *pr = &r->ph[i];
        if (!rp.pl[i].shared) continue;
        comm_sample_t *s = &rq->samples[pcs[i].sample];
        rc = dev_mean_weights(c, s);
        for (int n = 0; n < rp.pl[i].NA && !rc && s->dev->n == rp.pl[i].NA; n++) /* (the sample's last anchor set) */
            if (s->dev->mean_w[n] > pr->top_weight) pr->top_weight = s->dev->mean_w[n], pr->top_anchor = pcs[i].usable[n]->key;
    }
    r->weights_ms += w_ms + ms_since(tm);
    r->offset_ms += dev_wall - w_ms;
    if (rc) return rc;
    uint64_t tp = kvm_now_ns();
    if (n_tail > 0) rc = kvm_seq_push_tokens(&out->seq, out->prompt_ids + E, n_tail);
    r->assemble_ms = assemble + ms_since(tp);
    return rc;
}
