/* kvcomm.c - KVCOMM anchor pools: prediction (§3.4), matching (§3.5), delta materialization (§3.8), staged
 * commit and eviction (§2.4, §3.9) of kvcomm.md. The offsets are estimated and applied on the backend's ops
 * (kvcomm_dev.c); the host fp32 formulas are kept only as the tests' oracle (kvcomm_ref.c).
 *
 * Anchor data (bases and deltas in F0) lives in backend memory in the pool dtype, written there by the
 * materialization (kvcomm_dev.c: kvcomm_diff); see comm_delta_t for the host fp32 arrays. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm_internal.h"

/* ==== pools and anchors ============================================================================= */

int comm_reserve(void *pp, int *cap, int n, size_t elem) {
    if (n < *cap) return 0;
    int nc = *cap ? *cap * 2 : 8;
    while (nc <= n) nc *= 2;
    void *np = kvm_realloc(*(void **)pp, (size_t)nc * elem);
    if (!np) return KVM_ENOMEM;
    *(void **)pp = np;
    *cap = nc;
    return 0;
}

comm_pool_t *comm_pool_get(kvm_comm_t *c, const char *name, bool create) {
    for (int i = 0; i < c->n_pools; i++)
        if (!strcmp(c->pools[i].name, name)) return &c->pools[i];
    if (!create) return NULL;
    if (comm_reserve(&c->pools, &c->cap_pools, c->n_pools, sizeof *c->pools)) return NULL;
    comm_pool_t *p = &c->pools[c->n_pools++];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    return p;
}

size_t comm_anchor_bytes(const comm_geom_t *g, const comm_anchor_t *a) {
    const size_t es = g->esize > 0 ? (size_t)g->esize : sizeof(float);
    size_t b = a->base_shared ? 0 : comm_rows_elems(g, a->T) * es; /* a shared base is the store's */
    const comm_geom_t gd = {g->L - 1, g->H, g->D, g->esize};
    for (int i = 0; i < a->n_deltas; i++) {
        const size_t ph = comm_rows_elems(&gd, a->T), pf = comm_rows_elems(&gd, a->deltas[i].S);
        b += a->q8 ? kvm_q8_bytes(ph, g->D) + kvm_q8_bytes(pf, g->D) : (ph + pf) * es;
    }
    return b;
}

static void anchor_free(comm_anchor_t *a) {
    comm_dev_anchor_free(a); /* device mirror (kvcomm_dev.c) */
    for (int i = 0; i < a->n_deltas; i++) {
        kvm_free(a->deltas[i].d_ph);
        kvm_free(a->deltas[i].d_pf);
    }
    kvm_free(a->deltas);
    kvm_free(a->base);
    kvm_free(a);
}

void comm_anchor_unref(kvm_comm_t *c, comm_anchor_t *a) {
    (void)c;
    if (a && --a->refs == 0) anchor_free(a);
}

const comm_delta_t *comm_anchor_delta(const comm_anchor_t *a, const char *consumer) {
    for (int i = 0; i < a->n_deltas; i++)
        if (!strcmp(a->deltas[i].consumer, consumer)) return &a->deltas[i];
    return NULL;
}

comm_anchor_t **comm_snapshot(kvm_comm_request_t *rq, const char *name, int *n) {
    for (int i = 0; i < rq->n_snaps; i++)
        if (!strcmp(rq->c->pools[rq->snaps[i].pool].name, name)) {
            *n = rq->snaps[i].n;
            return rq->snaps[i].a;
        }
    *n = 0;
    return NULL;
}

/* ==== prediction (§3.4) ============================================================================== */

static int stage_bump(kvm_comm_request_t *rq, comm_anchor_t *a) {
    for (int i = 0; i < rq->n_bumps; i++)
        if (rq->bumps[i].a == a) {
            rq->bumps[i].count++;
            return 0;
        }
    if (comm_reserve(&rq->bumps, &rq->cap_bumps, rq->n_bumps, sizeof *rq->bumps)) return KVM_ENOMEM;
    a->refs++;
    rq->bumps[rq->n_bumps++] = (comm_bump_t){a, 1};
    return 0;
}

/* softmax of -d over n entries (fp32 result, fp64 accumulation) */
static void softmax_neg(const double *d, int n, float *w) {
    double mn = d[0];
    for (int i = 1; i < n; i++)
        if (d[i] < mn) mn = d[i];
    double sum = 0;
    for (int i = 0; i < n; i++) sum += exp(-(d[i] - mn));
    for (int i = 0; i < n; i++) w[i] = (float)(exp(-(d[i] - mn)) / sum);
}

int comm_predict(kvm_comm_request_t *rq, comm_sample_t *s) { return comm_predict_by(rq, s, comm_dev_pred); }

int comm_predict_by(kvm_comm_request_t *rq, comm_sample_t *s, comm_dist_fn dist) {
    if (s->predicted) return 0;
    kvm_comm_t *c = rq->c;
    const kvm_kvcomm_config_t *cfg = &c->cfg;
    comm_pool_t *pl = comm_pool_get(c, s->name, true);
    if (!pl) return KVM_ENOMEM;
    pl->predictions++;
    s->predicted = true;
    s->is_new = true;
    s->entropy = 0;
    s->threshold = 0;
    int N = 0;
    comm_anchor_t **snap = comm_snapshot(rq, s->name, &N);
    s->n_pool = N;
    s->n_eligible = 0;
    if (N <= 1) {
        pl->predicted_new++;
        return 0;
    }
    comm_anchor_t **E = kvm_malloc((size_t)N * sizeof *E);
    double *d = kvm_malloc((size_t)N * sizeof(double));
    float *w = kvm_malloc((size_t)N * sizeof(float));
    int *order = kvm_malloc((size_t)N * sizeof(int));
    if (!E || !d || !w || !order) {
        kvm_free(E), kvm_free(d), kvm_free(w), kvm_free(order);
        return KVM_ENOMEM;
    }
    int ne = 0;
    for (int i = 0; i < N; i++)
        if (snap[i]->T >= s->T) E[ne++] = snap[i];
    s->n_eligible = ne;
    int rc = 0;
    if (ne <= 1) {
        pl->predicted_new++;
        goto out;
    }
    /* values only (position-free), first T tokens, Frobenius norm over all layers */
    if ((rc = dist(c, s, E, ne, d))) goto out;
    softmax_neg(d, ne, w);
    double Hb = 0;
    for (int n = 0; n < ne; n++)
        if (w[n] > 0) Hb -= (double)w[n] * log2((double)w[n]); /* 0 log 0 = 0 */
    s->entropy = (float)Hb;
    s->threshold = (float)(cfg->gamma * log2((double)ne));
    bool share = cfg->force_reuse || cfg->criterion == KVM_KVCOMM_CRIT_LENGTH || !(Hb > s->threshold);
    if (!share) {
        pl->predicted_new++;
        goto out;
    }
    s->is_new = false;
    /* LFU bookkeeping: top-p 0.9 with strict <; if the top weight >= 0.9 every eligible anchor is bumped */
    for (int n = 0; n < ne; n++) order[n] = n;
    for (int i = 1; i < ne; i++) { /* stable insertion sort by weight, descending */
        int k = order[i], j = i - 1;
        while (j >= 0 && w[order[j]] < w[k]) {
            order[j + 1] = order[j];
            j--;
        }
        order[j + 1] = k;
    }
    int cut = -1;
    double cum = 0;
    for (int j = 0; j < ne; j++) {
        cum += w[order[j]];
        if (cum < 0.9) cut = j;
        else break;
    }
    if (cut < 0) cut = ne - 1;
    for (int j = 0; j <= cut && !rc; j++) rc = stage_bump(rq, E[order[j]]);
out:
    kvm_free(E);
    kvm_free(d);
    kvm_free(w);
    kvm_free(order);
    return rc;
}

/* ==== matching (§3.5) ================================================================================= */

int comm_usable(kvm_comm_request_t *rq, const comm_sample_t *s, const char *consumer, uint64_t thash,
                comm_anchor_t ***out, int *n) {
    int N = 0;
    comm_anchor_t **snap = comm_snapshot(rq, s->name, &N);
    *out = NULL;
    *n = 0;
    if (!N) return 0;
    comm_anchor_t **u = kvm_malloc((size_t)N * sizeof *u);
    if (!u) return KVM_ENOMEM;
    int k = 0;
    for (int i = 0; i < N; i++) {
        if (snap[i]->T < s->T) continue;
        const comm_delta_t *dl = comm_anchor_delta(snap[i], consumer);
        if (!dl || dl->template_hash != thash) continue;
        u[k++] = snap[i];
    }
    if (!k) {
        kvm_free(u);
        return 0;
    }
    /* a fixed order (by key) so that the weight cache is keyed by the set */
    for (int i = 1; i < k; i++) {
        comm_anchor_t *x = u[i];
        int j = i - 1;
        while (j >= 0 && u[j]->key > x->key) {
            u[j + 1] = u[j];
            j--;
        }
        u[j + 1] = x;
    }
    *out = u;
    *n = k;
    return 0;
}

/* ==== materialization (§3.8) =========================================================================== */

int comm_materialize(kvm_comm_request_t *rq, comm_sample_t *s, kvm_template_t *t, int i, const kvm_seq_t *seq,
                     int t_ph, int t_pf, int S) {
    kvm_comm_t *c = rq->c;
    comm_anchor_t *a = s->staged;
    if (!a) {
        a = kvm_calloc(1, sizeof *a);
        if (!a) return KVM_ENOMEM;
        a->refs = 1; /* the request's staged list */
        a->key = s->key;
        a->T = s->T;
        a->q8 = c->cfg.deltas == KVM_KVCOMM_DELTAS_Q8;
        int rc = comm_dev_anchor_base(c, a, s);
        int cap = rq->cap_staged; /* two arrays of one capacity */
        if (!rc && (comm_reserve(&rq->staged, &cap, rq->n_staged, sizeof *rq->staged) ||
                    comm_reserve(&rq->staged_pool, &rq->cap_staged, rq->n_staged, sizeof *rq->staged_pool)))
            rc = KVM_ENOMEM;
        if (rc) {
            anchor_free(a);
            return rc;
        }
        snprintf(rq->staged_pool[rq->n_staged], KVM_COMM_NAME_MAX, "%s", s->name);
        rq->staged[rq->n_staged++] = a;
        s->staged = a;
    }
    if (comm_anchor_delta(a, t->agent)) return 0; /* first materialization wins */
    if (a->T != s->T) {
        KVM_LOGW("kvcomm: anchor %016llx of '%s' has %d rows, the sample %d: delta update discarded",
                 (unsigned long long)a->key, s->name, a->T, s->T);
        return 0;
    }
    int rc = comm_dev_anchor_add_delta(c, a, t, i, seq, t_ph, t_pf, S);
    if (!rc) a->bytes = comm_anchor_bytes(&c->g, a);
    return rc;
}

/* ==== commit and eviction (§2.4, §3.9) ================================================================= */

/* Drops anchor idx of pool p (an eviction). */
static void pool_remove(kvm_comm_t *c, comm_pool_t *p, int idx) {
    comm_anchor_t *a = p->a[idx];
    KVM_LOGD("kvcomm: pool '%s' evicts anchor %016llx (activation %u, seq %llu)", p->name, (unsigned long long)a->key,
             a->activation, (unsigned long long)a->insert_seq);
    memmove(p->a + idx, p->a + idx + 1, (size_t)(p->n - idx - 1) * sizeof *p->a);
    p->n--;
    p->evicted++;
    c->st.anchors_evicted++;
    c->anchor_bytes -= a->bytes;
    comm_anchor_unref(c, a);
}

int comm_reclaim_anchor(void *ctx) {
    kvm_comm_t *c = ctx;
    comm_pool_t *bp = NULL;
    int best = -1;
    for (int i = 0; i < c->n_pools; i++)
        for (int k = 0; k < c->pools[i].n; k++) {
            const comm_anchor_t *a = c->pools[i].a[k];
            if (a->base_shared && (!bp || a->insert_seq < bp->a[best]->insert_seq)) bp = &c->pools[i], best = k;
        }
    if (!bp) return 0;
    comm_anchor_t *a = bp->a[best];
    KVM_LOGD("kvcomm: the KV budget is full: anchor %016llx of pool '%s' takes its own copy of its base",
             (unsigned long long)a->key, bp->name);
    if (comm_dev_anchor_unshare(c, a)) {
        KVM_LOGW("kvcomm: copying the base of anchor %016llx failed (%s): the anchor is dropped",
                 (unsigned long long)a->key, kvm_errmsg());
        kvm_errclear(); /* the store goes on evicting; its caller sees its own result */
        pool_remove(c, bp, best);
        return 1;
    }
    c->st.anchors_unshared++;
    c->anchor_bytes -= a->bytes;
    a->bytes = comm_anchor_bytes(&c->g, a);
    c->anchor_bytes += a->bytes;
    return 1;
}

/* Evicts the anchor with the smallest activation among the W oldest of pool p (ties: the oldest). */
static void pool_evict_one(kvm_comm_t *c, comm_pool_t *p, const comm_anchor_t *keep) {
    int W = c->cfg.evict_window > 0 ? c->cfg.evict_window : 1;
    /* the W oldest by insert_seq */
    int *idx = malloc((size_t)(p->n ? p->n : 1) * sizeof(int));
    int k = 0;
    for (int i = 0; i < p->n; i++)
        if (p->a[i] != keep) idx[k++] = i;
    for (int i = 1; i < k; i++) {
        int x = idx[i], j = i - 1;
        while (j >= 0 && p->a[idx[j]]->insert_seq > p->a[x]->insert_seq) {
            idx[j + 1] = idx[j];
            j--;
        }
        idx[j + 1] = x;
    }
    if (k == 0) {
        free(idx);
        return;
    }
    int win = k < W ? k : W, best = idx[0];
    for (int i = 1; i < win; i++)
        if (p->a[idx[i]]->activation < p->a[best]->activation) best = idx[i];
    free(idx);
    pool_remove(c, p, best);
}

int comm_pool_insert(kvm_comm_t *c, comm_pool_t *p, comm_anchor_t *a) {
    const int V = c->cfg.max_anchors > 0 ? c->cfg.max_anchors : 1;
    if (c->cfg.pool_bound == KVM_KVCOMM_POOL_REFERENCE) {
        for (int k = 0; k < (a->n_deltas ? a->n_deltas : 1); k++)
            if (p->n > V) pool_evict_one(c, p, NULL);
    } else {
        while (p->n >= V) pool_evict_one(c, p, NULL);
    }
    if (comm_reserve(&p->a, &p->cap, p->n, sizeof *p->a)) return KVM_ENOMEM;
    if (!a->insert_seq) a->insert_seq = ++c->insert_seq;
    else if (a->insert_seq > c->insert_seq) c->insert_seq = a->insert_seq;
    a->bytes = comm_anchor_bytes(&c->g, a);
    p->a[p->n++] = a; /* the caller's reference moves to the pool */
    if (!c->kvcomm_off[0]) {
        if (comm_dev_anchor_sync(c, a)) KVM_LOGW("kvcomm: uploading an anchor failed: %s", kvm_errmsg());
        else comm_anchor_host_drop(c, a); /* a loaded anchor's host copy, now on the backend */
        if (comm_dev_anchor_share(c, a)) a->bytes = comm_anchor_bytes(&c->g, a);
    }
    c->anchor_bytes += a->bytes;
    while (c->cfg.anchor_budget_bytes && c->anchor_bytes > c->cfg.anchor_budget_bytes && p->n > 1)
        pool_evict_one(c, p, a);
    return 0;
}

int comm_commit(kvm_comm_request_t *rq) {
    kvm_comm_t *c = rq->c;
    for (int i = 0; i < rq->n_bumps; i++) rq->bumps[i].a->activation += rq->bumps[i].count;
    for (int i = 0; i < rq->n_staged; i++) {
        comm_anchor_t *a = rq->staged[i];
        comm_pool_t *p = comm_pool_get(c, rq->staged_pool[i], true);
        if (!p) return KVM_ENOMEM;
        a->insert_seq = 0; /* the next of this context */
        int rc = comm_pool_insert(c, p, a);
        if (rc) return rc;
        rq->staged[i] = NULL;
        p->created++;
        c->st.anchors_created++;
    }
    return 0;
}

void comm_request_free_state(kvm_comm_request_t *rq) {
    kvm_comm_t *c = rq->c;
    for (int i = 0; i < rq->n_samples; i++) {
        comm_sample_t *s = &rq->samples[i];
        kvm_free(s->X);
        comm_dev_sample_free(c, s);
    }
    kvm_free(rq->samples);
    for (int i = 0; i < rq->n_snaps; i++) {
        for (int k = 0; k < rq->snaps[i].n; k++) comm_anchor_unref(c, rq->snaps[i].a[k]);
        kvm_free(rq->snaps[i].a);
    }
    kvm_free(rq->snaps);
    for (int i = 0; i < rq->n_bumps; i++) comm_anchor_unref(c, rq->bumps[i].a);
    kvm_free(rq->bumps);
    for (int i = 0; i < rq->n_staged; i++)
        if (rq->staged[i]) comm_anchor_unref(c, rq->staged[i]);
    kvm_free(rq->staged);
    kvm_free(rq->staged_pool);
}
