/* kvcomm_dev.c - the device path of KVCOMM: prediction distances, offset weights and the REUSE assembly
 * through the backend's optional ops (kernels/ops.h: kvcomm_dist, kvcomm_softmax, kvcomm_apply), so that
 * on a GPU no KV crosses PCIe on the reuse path (kvcomm.md §3.4, §3.6, §3.7, §3.11).
 *
 * Data placement:
 *   - a sample's base X stays in its segment's pool blocks (a paged view); host fp32 X is read only when the
 *     DENSE path needs it to materialize an anchor (comm_dev_sample_x);
 *   - anchors keep their host fp32 base and deltas (the reference, written by the DENSE path, off the reuse
 *     path) and get a device mirror in the pool dtype when they are committed (comm_dev_anchor_sync), freed
 *     with the anchor;
 *   - template text segments P get a device copy on first use (per template, kept until the template is freed);
 *   - weights live on the device per sample, cached by anchor set like the host cache; their buffers come from
 *     a small free list in the comm's device context (returned there when the request's samples are freed), so
 *     a steady stream of requests allocates no device memory on the reuse path.
 * Hot path (comm_dev_reuse): one upload of every block table the prompt needs, then the weights (dist +
 * softmax, only on a cache miss) and the fused apply of every piece are enqueued back to back with no host
 * synchronization in between, one sync at the end, then one small read-back of the placeholder key weights
 * per newly computed sample for the trace's top anchor.
 * Selection (comm_dev_on) is per request; the host path in kvcomm.c/comm.c stays the reference. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm_internal.h"

struct comm_dev_anchor {
    const kvm_ops_t *o;
    void *base;           /* [L][2][H][T][D] dtype */
    void **d_ph, **d_pf;  /* per a->deltas[i]: [L-1][2][H][T|S][D] dtype */
    int n, cap;
};

struct comm_dev_sample {
    const kvm_ops_t *o;
    kvm_comm_t *c;        /* whose device context takes w back */
    kvm_segment_t *seg;   /* one reference */
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

bool comm_dev_on(kvm_comm_t *c) {
    const kvm_ops_t *o = c->pool->ops;
    const char *e = getenv("KVM_KVCOMM_DEVICE");
    if (e && !strcmp(e, "0")) return false;
    if (!o->kvcomm_dist || !o->kvcomm_softmax || !o->kvcomm_apply) return false;
    const bool cpu = !strcmp(o->name, "cpu");
    if (cpu && !(e && !strcmp(e, "1"))) return false;
    if (c->cfg.frame != KVM_KVCOMM_FRAME_F0 || c->cfg.weights == KVM_KVCOMM_W_COSINE) return false;
    /* ours: content alignment runs on the host path only; of the selective recompute's row scores the device
     * has the spread (kvcomm_spread) */
    if (c->cfg.align != KVM_KVCOMM_ALIGN_POSITION) return false;
    if (c->cfg.recompute_frac > 0 && (c->cfg.recompute_select != KVM_KVCOMM_SELECT_SPREAD || !o->kvcomm_spread))
        return false;
    if (c->cfg.max_anchors + 1 > KVM_KVCOMM_MAX_ANCHORS) return false;
    const int D = c->g.D;
    if (!cpu && (D % 16 || D > 512 || ((D / 16) & (D / 16 - 1)))) return false;
    return true;
}

/* KVM_KVCOMM_DEV_TIMING=1: one line per reuse call and per prediction on stderr (where the time goes) */
static bool dev_timing(void) {
    static int on = -1;
    if (on < 0) {
        const char *e = getenv("KVM_KVCOMM_DEV_TIMING");
        on = e && *e && strcmp(e, "0") != 0;
    }
    return on == 1;
}

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
        const long long cnt = (long long)count;
        if (dt == KVM_BF16) {
#pragma omp parallel for schedule(static) if (cnt > (1 << 18))
            for (long long i = 0; i < cnt; i++) tmp[i] = kvm_f32_to_bf16(src[i]);
        } else {
#pragma omp parallel for schedule(static) if (cnt > (1 << 18))
            for (long long i = 0; i < cnt; i++) tmp[i] = kvm_f32_to_f16(src[i]);
        }
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

/* Runs each KVCOMM op once on a few rows of the first committed anchor (dist with every output, softmax, an
 * apply into a scratch block), so that the backend's one-time costs (lazy kernel loading, the distance
 * scratch, the first COMM_DEV_WARM_BUFFERS weight buffers, which go to the free list) are paid at commit, off
 * the reuse path.
 * Failures are ignored: the reuse path does the same work later and reports its errors. */
static void dev_warm(kvm_comm_t *c, const comm_anchor_t *a) {
    const kvm_ops_t *o = c->pool->ops;
    struct comm_dev_ctx *x = ctx(c);
    if (!x || !a->dev || !a->dev->base || a->T <= 0) return;
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
        kvm_kv_view_t av = {.data = a->dev->base, .rows = a->T, .l0 = 0};
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
    const comm_geom_t gd = {g->L - 1, g->H, g->D};
    if (!a->dev) {
        a->dev = kvm_calloc(1, sizeof *a->dev);
        if (!a->dev) return KVM_ENOMEM;
        a->dev->o = o;
    }
    struct comm_dev_anchor *m = a->dev;
    if (!m->base) {
        m->base = upload_rows(o, dt, a->base, comm_rows_elems(g, a->T));
        if (!m->base) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    }
    if (m->cap < a->n_deltas) {
        int cap = a->n_deltas + 4;
        void **p = kvm_realloc(m->d_ph, (size_t)cap * sizeof *p);
        if (!p) return KVM_ENOMEM;
        m->d_ph = p;
        void **f = kvm_realloc(m->d_pf, (size_t)cap * sizeof *f);
        if (!f) return KVM_ENOMEM;
        m->d_pf = f;
        m->cap = cap;
    }
    while (m->n < a->n_deltas) {
        const comm_delta_t *dl = &a->deltas[m->n];
        void *ph = upload_rows(o, dt, dl->d_ph, comm_rows_elems(&gd, a->T));
        void *pf = ph ? upload_rows(o, dt, dl->d_pf, comm_rows_elems(&gd, dl->S)) : NULL;
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
    for (int i = 0; i < m->n; i++) {
        m->o->free(m->d_ph[i]);
        m->o->free(m->d_pf[i]);
    }
    m->o->free(m->base);
    kvm_free(m->d_ph);
    kvm_free(m->d_pf);
    kvm_free(m);
    a->dev = NULL;
}

/* ==== templates ============================================================================================= */

void comm_dev_template_free(kvm_template_t *t) {
    if (!t->c) return;
    const kvm_ops_t *o = t->c->pool->ops;
    for (int i = 0; i <= KVM_COMM_MAX_PH; i++) {
        if (t->dev_P[i]) o->free(t->dev_P[i]);
        t->dev_P[i] = NULL;
    }
}

/* device copy of text segment i (1..n_ph) of t, rows S = te[i] - ts[i] */
static const void *template_P(kvm_template_t *t, int i) {
    if (!t->dev_P[i]) {
        kvm_comm_t *c = t->c;
        int S = t->te[i] - t->ts[i];
        t->dev_P[i] = upload_rows(c->pool->ops, c->pool->geom.dtype, t->P[i], comm_rows_elems(&c->g, S));
    }
    return t->dev_P[i];
}

/* Makes the device copies of all text segments of t now (comm.c may call it when a template is created and
 * comm_dev_on(c) holds, so that the first REUSE of the template does not pay the upload); 0 or a KVM_E*. */
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
    s->dev->c = c;
    s->dev->seg = (kvm_segment_t *)seg;
    kvm_segment_ref(s->dev->seg);
    return 0;
}

void comm_dev_sample_free(comm_sample_t *s) {
    struct comm_dev_sample *d = s->dev;
    if (!d) return;
    kvm_segment_release(d->seg);
    wbuf_give(d->c, d->o, d->w, d->w_cap);
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
        av[n] = (kvm_kv_view_t){.data = A[n]->dev->base, .rows = A[n]->T, .l0 = 0};
        rows[n] = A[n]->T;
    }
    return 0;
}

/* ==== prediction distances (§3.4) =========================================================================== */

int comm_dev_pred(kvm_comm_t *c, comm_sample_t *s, comm_anchor_t **E, int n, double *d) {
    if (n <= 0) return 0;
    if (n > KVM_KVCOMM_MAX_ANCHORS) return kvm_seterr(KVM_EUNSUPPORTED, "kvcomm: %d eligible anchors on the device path", n);
    const kvm_ops_t *o = c->pool->ops;
    struct comm_dev_ctx *x = ctx(c);
    if (!x) return KVM_ENOMEM;
    if (!x->pred && !(x->pred = o->alloc(KVM_KVCOMM_MAX_ANCHORS * sizeof(float)))) return kvm_errcode();
    const uint64_t t0 = kvm_now_ns();
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
    if (dev_timing())
        fprintf(stderr, "kvcomm_dev pred '%s': T=%d, %d anchors, %.3f ms\n", s->name, s->T, n,
                (double)(kvm_now_ns() - t0) / 1e6);
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

/* Per-piece plan of comm_dev_reuse: rows of the placeholder [a0, a1) and of its text segment [b0, b1) that land
 * in [E, N-1) (as the host path), and the slot-0 table index of its source and sample segments. */
typedef struct {
    int a0, a1, b0, b1, na, nb, src, smp, NA;
    bool shared;
} piece_plan_t;

int comm_dev_reuse(kvm_comm_request_t *rq, const kvm_template_t *tc, const comm_dev_ph_t *ph_all, kvm_prepared_t *out,
                   int E, int N, float *row_score) {
    kvm_comm_t *c = rq->c;
    kvm_template_t *t = (kvm_template_t *)tc; /* for its lazily made device copies of P */
    const kvm_ops_t *o = c->pool->ops;
    const kvm_kvcomm_config_t *cfg = &c->cfg;
    kvm_comm_report_t *r = &out->report;
    const float *inv = kvm_kv_store_inv_freq_dev(c->store);
    const kvm_rope_layout_t layout = kvm_kv_store_rope(c->store)->layout;
    const int n_tail = N - 1 - E;
    r->exact_tokens = E;
    uint64_t ta = kvm_now_ns();
    struct comm_dev_ctx *x = ctx(c);
    if (!x) return KVM_ENOMEM;
    int rc = 0;
    if (n_tail > 0 && (rc = kvm_seq_reserve(&out->seq, N - 1))) return rc;

    /* 1. plan every piece, check the anchors' device deltas, collect the block tables */
    piece_plan_t pl[KVM_COMM_MAX_PH];
    seg_tables_t st = {.n = 0, .total = n_tail > 0 ? (size_t)out->seq.n_blocks : 0};
    for (int i = 0; i < t->n_ph; i++) {
        const comm_dev_ph_t *ph = &ph_all[i];
        piece_plan_t *q = &pl[i];
        const int T = ph->T, S = ph->S;
        q->a0 = ph->t_ph > E ? 0 : E - ph->t_ph, q->a1 = T;
        if (ph->t_ph + q->a1 > N - 1) q->a1 = N - 1 - ph->t_ph;
        q->b0 = ph->t_pf > E ? 0 : E - ph->t_pf, q->b1 = S;
        if (ph->t_pf + q->b1 > N - 1) q->b1 = N - 1 - ph->t_pf;
        q->na = q->a1 > q->a0 ? q->a1 - q->a0 : 0, q->nb = q->b1 > q->b0 ? q->b1 - q->b0 : 0;
        q->shared = ph->decision == KVM_PH_SHARED;
        q->NA = q->shared ? ph->n_usable : 0;
        q->src = q->smp = -1;
        if (q->NA > KVM_KVCOMM_MAX_ANCHORS)
            return kvm_seterr(KVM_EUNSUPPORTED, "kvcomm: %d usable anchors on the device path", q->NA);
        if (q->na > 0) q->src = seg_tables_add(&st, ph->seg);
        if (q->shared) q->smp = seg_tables_add(&st, rq->samples[ph->sample].dev->seg);
        for (int n = 0; n < q->NA; n++) {
            const comm_anchor_t *an = ph->usable[n];
            const comm_delta_t *dl = comm_anchor_delta(an, t->agent);
            int k = dl ? (int)(dl - an->deltas) : 0;
            if (!dl || !an->dev || k >= an->dev->n)
                return kvm_seterr(KVM_EINTERNAL, "kvcomm: anchor %016llx has no device delta for '%s'",
                                  (unsigned long long)an->key, t->agent);
            if (dl->S != S)
                return kvm_seterr(KVM_EINTERNAL, "kvcomm: delta of '%s' has %d text rows, the template %d", t->agent, dl->S,
                                  S);
        }
        if (q->nb > 0 && !template_P(t, i + 1)) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    }
    if (st.total > x->hbt_cap) {
        size_t cap = st.total < 1024 ? 1024 : st.total * 2;
        int32_t *h = kvm_realloc(x->hbt, cap * sizeof(int32_t));
        if (!h) return KVM_ENOMEM;
        x->hbt = h;
        x->hbt_cap = cap;
    }
    if (n_tail > 0) memcpy(x->hbt, out->seq.blocks, (size_t)out->seq.n_blocks * sizeof(int32_t));
    for (int i = 0; i < st.n; i++) {
        int nb = 0;
        const int32_t *b = kvm_segment_blocks(st.seg[i], &nb);
        memcpy(x->hbt + st.off[i], b, (size_t)nb * sizeof(int32_t));
    }
    const int32_t *dbt = upload_blocks(c, 0, x->hbt, (int)st.total);
    if (!dbt) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    /* recompute_frac (select=spread): every shared piece's rows get their spread score, in one device buffer */
    const bool scores = row_score && cfg->recompute_frac > 0 && cfg->ph_offset && cfg->recompute_select == KVM_KVCOMM_SELECT_SPREAD;
    size_t score_off[KVM_COMM_MAX_PH], n_score = 0;
    bool scored[KVM_COMM_MAX_PH]; /* the pieces whose rows get a score (the host path's rule) */
    for (int i = 0; i < t->n_ph; i++) {
        score_off[i] = n_score;
        scored[i] = scores && pl[i].shared && pl[i].na > 0 && ph_all[i].T >= cfg->recompute_below;
        if (scored[i]) n_score += (size_t)pl[i].na;
    }
    if (n_score > x->score_cap) {
        size_t cap = n_score < 4096 ? 4096 : n_score * 2;
        o->free(x->score);
        kvm_free(x->h_score);
        x->score = o->alloc(cap * sizeof(float));
        x->h_score = kvm_malloc(cap * sizeof(float));
        x->score_cap = x->score && x->h_score ? cap : 0;
        if (!x->score_cap) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    }
    double assemble = ms_since(ta);

    /* 2. weights and applies of every piece, enqueued back to back */
    const bool ev = o->event_record && o->event_elapsed_ms && o->event_free;
    void *evw[KVM_COMM_MAX_PH][2];
    memset(evw, 0, sizeof evw);
    double w_wall = 0;
    uint64_t td = kvm_now_ns();
    for (int i = 0; i < t->n_ph && !rc; i++) {
        const comm_dev_ph_t *ph = &ph_all[i];
        const piece_plan_t *q = &pl[i];
        const int T = ph->T, S = ph->S;
        comm_sample_t *s = q->shared ? &rq->samples[ph->sample] : NULL;
        kvm_kv_view_t dph[KVM_KVCOMM_MAX_ANCHORS], dpf[KVM_KVCOMM_MAX_ANCHORS];
        if (q->shared) {
            uint64_t tw = kvm_now_ns();
            const kvm_kv_view_t xv = {.data = c->pool->data, .blocks = dbt + st.off[q->smp], .start = 0};
            if (ev) evw[i][0] = o->event_record();
            bool computed = false;
            rc = dev_weights(c, s, ph->usable, q->NA, &xv, &computed);
            if (ev) evw[i][1] = o->event_record();
            w_wall += ms_since(tw);
            if (rc) break;
            for (int n = 0; n < q->NA; n++) {
                const comm_anchor_t *an = ph->usable[n];
                const comm_delta_t *dl = comm_anchor_delta(an, t->agent);
                const int k = (int)(dl - an->deltas);
                dph[n] = (kvm_kv_view_t){.data = an->dev->d_ph[k], .rows = an->T, .l0 = 1};
                dpf[n] = (kvm_kv_view_t){.data = an->dev->d_pf[k], .rows = dl->S, .l0 = 1};
            }
        }
        if (q->na > 0) {
            kvm_kvcomm_apply_args_t a = {.g = c->pool->geom,
                                         .src = {.data = c->pool->data, .blocks = dbt + st.off[q->src], .start = 0},
                                         .n = q->shared && cfg->ph_offset ? q->NA : 0,
                                         .delta = dph,
                                         .w = q->shared ? s->dev->w : NULL,
                                         .per_channel = 0,
                                         .w_rows = T,
                                         .r0 = q->a0,
                                         .r1 = q->a1,
                                         .dst_kv = c->pool->data,
                                         .dst_blocks = dbt,
                                         .dst_pos = ph->t_ph + q->a0,
                                         .shift = cfg->rotate ? ph->t_ph : 0,
                                         .inv_freq = inv,
                                         .layout = layout,
                                         .dst_n_blocks = out->seq.n_blocks};
            rc = o->kvcomm_apply(&a);
        }
        if (!rc && scored[i]) {
            kvm_kvcomm_spread_args_t a = {.g = c->pool->geom,
                                          .x = {.data = c->pool->data, .blocks = dbt + st.off[q->smp], .start = 0},
                                          .n = q->NA,
                                          .delta = dph,
                                          .w = s->dev->w,
                                          .w_rows = T,
                                          .r0 = q->a0,
                                          .r1 = q->a1,
                                          .out = x->score + score_off[i]};
            rc = o->kvcomm_spread(&a);
        }
        if (!rc && q->nb > 0) {
            kvm_kvcomm_apply_args_t a = {.g = c->pool->geom,
                                         .src = {.data = t->dev_P[i + 1], .rows = S, .l0 = 0},
                                         .n = q->shared && cfg->pf_offset ? q->NA : 0,
                                         .delta = dpf,
                                         .w = q->shared ? s->dev->w + (size_t)2 * q->NA * T : NULL,
                                         .per_channel = 1,
                                         .w_rows = 0,
                                         .r0 = q->b0,
                                         .r1 = q->b1,
                                         .dst_kv = c->pool->data,
                                         .dst_blocks = dbt,
                                         .dst_pos = ph->t_pf + q->b0,
                                         .shift = cfg->rotate ? ph->t_pf : 0,
                                         .inv_freq = inv,
                                         .layout = layout,
                                         .dst_n_blocks = out->seq.n_blocks};
            rc = o->kvcomm_apply(&a);
        }
    }
    const double enqueue = ms_since(td);
    if (!rc) rc = o->sync();
    if (!rc && n_score > 0) { /* the scores, to the rows of the prompt (kvm_comm_recompute_short picks from them) */
        rc = o->d2h(x->h_score, x->score, n_score * sizeof(float));
        for (int i = 0; i < t->n_ph && !rc; i++)
            if (scored[i])
                memcpy(row_score + ph_all[i].t_ph + pl[i].a0, x->h_score + score_off[i], (size_t)pl[i].na * sizeof(float));
    }
    const double dev_wall = ms_since(td);
    /* weights_ms: device time of the weight kernels (events) or their wall time (synchronous backends);
     * offset_ms: the rest of the enqueue-to-sync window (applies: offsets, shift, scatter of every piece) */
    double w_ms = w_wall;
    if (ev) {
        w_ms = 0;
        for (int i = 0; i < t->n_ph; i++)
            if (evw[i][0] && evw[i][1]) {
                if (!rc) {
                    float e = o->event_elapsed_ms(evw[i][0], evw[i][1]);
                    if (e > 0) w_ms += e;
                }
                o->event_free(evw[i][0]), o->event_free(evw[i][1]);
            }
        if (w_ms > dev_wall) w_ms = dev_wall;
    }
    if (rc) return rc;

    /* 3. the trace's top anchor of every shared placeholder, and the token accounting */
    uint64_t tm = kvm_now_ns();
    for (int i = 0; i < t->n_ph && !rc; i++) {
        const comm_dev_ph_t *ph = &ph_all[i];
        const piece_plan_t *q = &pl[i];
        kvm_comm_ph_report_t *pr = &r->ph[i];
        pr->decision = ph->decision;
        if (q->shared) {
            comm_sample_t *s = &rq->samples[ph->sample];
            rc = dev_mean_weights(c, s);
            for (int n = 0; n < q->NA && !rc && s->dev->n == q->NA; n++) /* (the sample's last anchor set) */
                if (s->dev->mean_w[n] > pr->top_weight) pr->top_weight = s->dev->mean_w[n], pr->top_anchor = ph->usable[n]->key;
            r->offset_tokens += (cfg->ph_offset ? q->na : 0) + (cfg->pf_offset ? q->nb : 0);
            r->naive_tokens += (cfg->ph_offset ? 0 : q->na) + (cfg->pf_offset ? 0 : q->nb);
        } else if (ph->decision == KVM_PH_EXACT_CTX) {
            r->exact_tokens += q->na;
            r->naive_tokens += q->nb;
        } else {
            r->naive_tokens += q->na + q->nb;
        }
    }
    const double readback = ms_since(tm);
    r->weights_ms += w_ms + readback;
    r->offset_ms += dev_wall - w_ms;
    if (rc) return rc;
    uint64_t tp = kvm_now_ns();
    if (n_tail > 0) rc = kvm_seq_push_tokens(&out->seq, out->prompt_ids + E, n_tail);
    r->assemble_ms = assemble + ms_since(tp);
    if (dev_timing())
        fprintf(stderr,
                "kvcomm_dev reuse '%s': %d pieces, rows %d..%d; tables+plan %.3f ms, enqueue %.3f ms, enqueue-to-sync %.3f ms "
                "(weights on the device %.3f ms), top-anchor read-back %.3f ms, push %.3f ms\n",
                t->agent, t->n_ph, E, N - 1, assemble, enqueue, dev_wall, w_ms, readback,
                ms_since(tp));
    return rc;
}
