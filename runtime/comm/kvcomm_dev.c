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
 *   - weights live on the device per sample, cached by anchor set like the host cache.
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
    kvm_segment_t *seg;   /* one reference */
    float *w;             /* [2][N][T] | [2][N][L][H][D], distances then weights (in place) */
    size_t w_cap;         /* floats */
    uint64_t *keys;       /* anchor keys of the cached weights */
    int n;                /* 0 = no cached weights */
};

struct comm_dev_ctx {
    int32_t *bt[2];       /* device block tables: 0 = the prompt's sequence, 1 = a segment */
    size_t bt_cap[2];
    float *pred;          /* [KVM_KVCOMM_MAX_ANCHORS] */
};

bool comm_dev_on(kvm_comm_t *c) {
    const kvm_ops_t *o = c->pool->ops;
    const char *e = getenv("KVM_KVCOMM_DEVICE");
    if (e && !strcmp(e, "0")) return false;
    if (!o->kvcomm_dist || !o->kvcomm_softmax || !o->kvcomm_apply) return false;
    const bool cpu = !strcmp(o->name, "cpu");
    if (cpu && !(e && !strcmp(e, "1"))) return false;
    if (c->cfg.frame != KVM_KVCOMM_FRAME_F0 || c->cfg.weights == KVM_KVCOMM_W_COSINE) return false;
    if (c->cfg.max_anchors + 1 > KVM_KVCOMM_MAX_ANCHORS) return false;
    const int D = c->g.D;
    if (!cpu && (D % 16 || D > 512 || ((D / 16) & (D / 16 - 1)))) return false;
    return true;
}

static struct comm_dev_ctx *ctx(kvm_comm_t *c) {
    if (!c->dev) c->dev = kvm_calloc(1, sizeof *c->dev);
    return c->dev;
}

void comm_dev_ctx_free(kvm_comm_t *c) {
    if (!c->dev) return;
    const kvm_ops_t *o = c->pool->ops;
    for (int i = 0; i < 2; i++) o->free(c->dev->bt[i]);
    o->free(c->dev->pred);
    kvm_free(c->dev);
    c->dev = NULL;
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
        size_t cap = need < 256 ? 256 : need * 2;
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
        for (size_t i = 0; i < count; i++) tmp[i] = dt == KVM_BF16 ? kvm_f32_to_bf16(src[i]) : kvm_f32_to_f16(src[i]);
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

/* ==== samples ============================================================================================== */

int comm_dev_sample_bind(kvm_comm_t *c, comm_sample_t *s, const kvm_segment_t *seg) {
    s->dev = kvm_calloc(1, sizeof *s->dev);
    if (!s->dev) return KVM_ENOMEM;
    s->dev->o = c->pool->ops;
    s->dev->seg = (kvm_segment_t *)seg;
    kvm_segment_ref(s->dev->seg);
    return 0;
}

void comm_dev_sample_free(comm_sample_t *s) {
    struct comm_dev_sample *d = s->dev;
    if (!d) return;
    kvm_segment_release(d->seg);
    d->o->free(d->w);
    kvm_free(d->keys);
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

static int dev_weights(kvm_comm_t *c, comm_sample_t *s, comm_anchor_t **A, int N) {
    struct comm_dev_sample *ds = s->dev;
    const comm_geom_t *g = &c->g;
    const kvm_ops_t *o = c->pool->ops;
    if (ds->n == N && ds->keys) {
        bool same = true;
        for (int i = 0; i < N && same; i++) same = ds->keys[i] == A[i]->key;
        if (same) return 0;
    }
    ds->n = 0;
    const size_t nph = (size_t)2 * N * s->T, per = (size_t)g->L * g->H * g->D, need = nph + 2 * N * per;
    if (ds->w_cap < need) {
        o->free(ds->w);
        ds->w = o->alloc(need * sizeof(float));
        ds->w_cap = ds->w ? need : 0;
        if (!ds->w) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    }
    uint64_t *keys = kvm_realloc(ds->keys, (size_t)N * sizeof(uint64_t));
    if (!keys) return KVM_ENOMEM;
    ds->keys = keys;
    kvm_kv_view_t av[KVM_KVCOMM_MAX_ANCHORS];
    int rows[KVM_KVCOMM_MAX_ANCHORS];
    int rc = anchor_views(c, A, N, av, rows);
    float *wph = ds->w, *wpf = ds->w + nph;
    kvm_kvcomm_dist_args_t a = {.g = c->pool->geom, .T = s->T, .n = N, .a = av, .a_rows = rows,
                                .want = KVM_KVCOMM_WANT_PH | KVM_KVCOMM_WANT_PF, .rotate_tail = 1,
                                .inv_freq = kvm_kv_store_inv_freq_dev(c->store),
                                .layout = kvm_kv_store_rope(c->store)->layout, .d_ph = wph, .d_pf = wpf};
    if (!rc) rc = seg_view(c, ds->seg, &a.x);
    if (!rc) rc = o->kvcomm_dist(&a);
    const int mode = c->cfg.weights == KVM_KVCOMM_W_NEAREST ? KVM_KVCOMM_NEAREST : KVM_KVCOMM_SOFTMAX;
    for (int kv = 0; kv < 2 && !rc; kv++) {
        rc = o->kvcomm_softmax(wph + (size_t)kv * N * s->T, wph + (size_t)kv * N * s->T, N, (size_t)s->T, mode);
        if (!rc) rc = o->kvcomm_softmax(wpf + (size_t)kv * N * per, wpf + (size_t)kv * N * per, N, per, mode);
    }
    if (rc) return rc;
    for (int i = 0; i < N; i++) ds->keys[i] = A[i]->key;
    ds->n = N;
    return 0;
}

/* ==== REUSE assembly (§3.6, §3.7, §3.11) ===================================================================== */

static double ms_since(uint64_t t0) { return (double)(kvm_now_ns() - t0) / 1e6; }

int comm_dev_reuse(kvm_comm_request_t *rq, const kvm_template_t *tc, const comm_dev_ph_t *ph_all, kvm_prepared_t *out,
                   int E, int N) {
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
    int rc = 0;
    const int32_t *dbt = NULL;
    if (n_tail > 0) {
        rc = kvm_seq_reserve(&out->seq, N - 1);
        if (rc) return rc;
        dbt = upload_blocks(c, 0, out->seq.blocks, out->seq.n_blocks);
        if (!dbt) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    }
    double assemble = ms_since(ta);
    float *hw = NULL;
    for (int i = 0; i < t->n_ph && !rc; i++) {
        const comm_dev_ph_t *ph = &ph_all[i];
        kvm_comm_ph_report_t *pr = &r->ph[i];
        pr->decision = ph->decision;
        const int T = ph->T, S = ph->S;
        /* rows of this placeholder and its text segment that land in [E, N-1) (as the host path) */
        int a0 = ph->t_ph > E ? 0 : E - ph->t_ph, a1 = T;
        if (ph->t_ph + a1 > N - 1) a1 = N - 1 - ph->t_ph;
        int b0 = ph->t_pf > E ? 0 : E - ph->t_pf, b1 = S;
        if (ph->t_pf + b1 > N - 1) b1 = N - 1 - ph->t_pf;
        const int na = a1 > a0 ? a1 - a0 : 0, nb = b1 > b0 ? b1 - b0 : 0;
        const bool shared = ph->decision == KVM_PH_SHARED;
        const int NA = shared ? ph->n_usable : 0;
        comm_sample_t *s = shared ? &rq->samples[ph->sample] : NULL;
        kvm_kv_view_t dph[KVM_KVCOMM_MAX_ANCHORS], dpf[KVM_KVCOMM_MAX_ANCHORS];
        if (shared) {
            if (NA > KVM_KVCOMM_MAX_ANCHORS) {
                rc = kvm_seterr(KVM_EUNSUPPORTED, "kvcomm: %d usable anchors on the device path", NA);
                break;
            }
            uint64_t tw = kvm_now_ns();
            rc = dev_weights(c, s, ph->usable, NA);
            /* the anchor with the largest mean placeholder key weight, for the trace */
            if (!rc && !(hw = kvm_realloc(hw, (size_t)NA * T * sizeof(float)))) rc = KVM_ENOMEM;
            if (!rc) rc = o->d2h(hw, s->dev->w, (size_t)NA * T * sizeof(float));
            r->weights_ms += ms_since(tw);
            if (rc) break;
            for (int n = 0; n < NA; n++) {
                double mw = 0;
                for (int q = 0; q < T; q++) mw += hw[(size_t)n * T + q];
                mw /= T;
                if (mw > pr->top_weight) pr->top_weight = (float)mw, pr->top_anchor = ph->usable[n]->key;
            }
            for (int n = 0; n < NA; n++) {
                const comm_delta_t *dl = comm_anchor_delta(ph->usable[n], t->agent);
                int k = dl ? (int)(dl - ph->usable[n]->deltas) : 0;
                if (!dl || !ph->usable[n]->dev || k >= ph->usable[n]->dev->n) {
                    rc = kvm_seterr(KVM_EINTERNAL, "kvcomm: anchor %016llx has no device delta for '%s'",
                                    (unsigned long long)ph->usable[n]->key, t->agent);
                    break;
                }
                dph[n] = (kvm_kv_view_t){.data = ph->usable[n]->dev->d_ph[k], .rows = ph->usable[n]->T, .l0 = 1};
                dpf[n] = (kvm_kv_view_t){.data = ph->usable[n]->dev->d_pf[k], .rows = dl->S, .l0 = 1};
                if (dl->S != S) {
                    rc = kvm_seterr(KVM_EINTERNAL, "kvcomm: delta of '%s' has %d text rows, the template %d", t->agent,
                                    dl->S, S);
                    break;
                }
            }
            if (rc) break;
        }
        uint64_t to = kvm_now_ns();
        if (na > 0) {
            kvm_kvcomm_apply_args_t a = {.g = c->pool->geom,
                                         .n = shared && cfg->ph_offset ? NA : 0,
                                         .delta = dph,
                                         .w = shared ? s->dev->w : NULL,
                                         .per_channel = 0,
                                         .w_rows = T,
                                         .r0 = a0,
                                         .r1 = a1,
                                         .dst_kv = c->pool->data,
                                         .dst_blocks = dbt,
                                         .dst_pos = ph->t_ph + a0,
                                         .shift = cfg->rotate ? ph->t_ph : 0,
                                         .inv_freq = inv,
                                         .layout = layout};
            rc = seg_view(c, ph->seg, &a.src);
            if (!rc) rc = o->kvcomm_apply(&a);
        }
        if (!rc && nb > 0) {
            const void *P = template_P(t, i + 1);
            if (!P) {
                rc = kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
                break;
            }
            kvm_kvcomm_apply_args_t a = {.g = c->pool->geom,
                                         .src = {.data = P, .rows = S, .l0 = 0},
                                         .n = shared && cfg->pf_offset ? NA : 0,
                                         .delta = dpf,
                                         .w = shared ? s->dev->w + (size_t)2 * NA * T : NULL,
                                         .per_channel = 1,
                                         .w_rows = 0,
                                         .r0 = b0,
                                         .r1 = b1,
                                         .dst_kv = c->pool->data,
                                         .dst_blocks = dbt,
                                         .dst_pos = ph->t_pf + b0,
                                         .shift = cfg->rotate ? ph->t_pf : 0,
                                         .inv_freq = inv,
                                         .layout = layout};
            rc = o->kvcomm_apply(&a);
        }
        if (!rc) rc = o->sync();
        if (shared) r->offset_ms += ms_since(to);
        else assemble += ms_since(to);
        if (shared) {
            r->offset_tokens += (cfg->ph_offset ? na : 0) + (cfg->pf_offset ? nb : 0);
            r->naive_tokens += (cfg->ph_offset ? 0 : na) + (cfg->pf_offset ? 0 : nb);
        } else if (ph->decision == KVM_PH_EXACT_CTX) {
            r->exact_tokens += na;
            r->naive_tokens += nb;
        } else {
            r->naive_tokens += na + nb;
        }
    }
    kvm_free(hw);
    if (rc) return rc;
    uint64_t tp = kvm_now_ns();
    if (n_tail > 0) rc = kvm_seq_push_tokens(&out->seq, out->prompt_ids + E, n_tail);
    r->assemble_ms = assemble + ms_since(tp);
    return rc;
}
