/* kvcomm.c - KVCOMM anchor pools: prediction (§3.4), matching (§3.5), offset estimation and application
 * (§3.6), delta materialization (§3.8), staged commit and eviction (§2.4, §3.9) of kvcomm.md.
 *
 * All anchor data lives in host fp32 (bases and deltas in F0). The math is the reference for a later
 * fused device kernel; on the CPU backend it is also the fast path. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm_internal.h"

/* below this many elements a loop runs on one thread: for tiny models the parallel region costs more
 * than the work, especially on a loaded machine */
#define COMM_PAR_MIN ((size_t)1 << 18)

/* ==== pools and anchors ============================================================================= */

comm_pool_t *comm_pool_get(kvm_comm_t *c, const char *name, bool create) {
    for (int i = 0; i < c->n_pools; i++)
        if (!strcmp(c->pools[i].name, name)) return &c->pools[i];
    if (!create) return NULL;
    if (c->n_pools == c->cap_pools) {
        int cap = c->cap_pools ? c->cap_pools * 2 : 8;
        comm_pool_t *np = kvm_realloc(c->pools, (size_t)cap * sizeof *np);
        if (!np) return NULL;
        c->pools = np;
        c->cap_pools = cap;
    }
    comm_pool_t *p = &c->pools[c->n_pools++];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    return p;
}

size_t comm_anchor_bytes(const comm_geom_t *g, const comm_anchor_t *a) {
    size_t b = comm_rows_elems(g, a->T) * sizeof(float);
    size_t per_row_delta = (size_t)(g->L - 1) * 2 * g->H * g->D * sizeof(float);
    for (int i = 0; i < a->n_deltas; i++) b += per_row_delta * (size_t)(a->T + a->deltas[i].S);
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
    if (rq->n_bumps == rq->cap_bumps) {
        int cap = rq->cap_bumps ? rq->cap_bumps * 2 : 16;
        comm_bump_t *nb = kvm_realloc(rq->bumps, (size_t)cap * sizeof *nb);
        if (!nb) return KVM_ENOMEM;
        rq->bumps = nb;
        rq->cap_bumps = cap;
    }
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

int comm_predict(kvm_comm_request_t *rq, comm_sample_t *s) {
    if (s->predicted) return 0;
    kvm_comm_t *c = rq->c;
    const comm_geom_t *g = &c->g;
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
    const bool big = comm_rows_elems(g, s->T) > COMM_PAR_MIN;
    if (rq->dev && (rc = comm_dev_pred(c, s, E, ne, d))) goto out; /* device path (kvcomm_dev.c) */
    for (int n = 0; n < ne && !rq->dev; n++) {
        const comm_anchor_t *a = E[n];
        double ss = 0;
#pragma omp parallel for reduction(+ : ss) collapse(2) schedule(static) if (big)
        for (int l = 0; l < g->L; l++)
            for (int h = 0; h < g->H; h++)
                for (int t = 0; t < s->T; t++) {
                    const float *x = s->X + comm_idx(g, s->T, l, 1, h, t);
                    const float *y = a->base + comm_idx(g, a->T, l, 1, h, t);
                    for (int k = 0; k < g->D; k++) {
                        double df = (double)x[k] - y[k];
                        ss += df * df;
                    }
                }
        if (cfg->dist_norm == KVM_KVCOMM_DIST_PER_ELEMENT) ss /= (double)comm_rows_elems(g, s->T) / 2;
        d[n] = sqrt(ss);
    }
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

/* ==== offset estimation (§3.6) ======================================================================== */

static void weights_from_scores(const double *sc, int n, float *w, int mode) {
    /* sc: distances for l2/nearest (smaller = closer), similarities for cosine */
    if (mode == KVM_KVCOMM_W_NEAREST) {
        int best = 0;
        for (int i = 1; i < n; i++)
            if (sc[i] < sc[best]) best = i;
        for (int i = 0; i < n; i++) w[i] = i == best ? 1.0f : 0.0f;
    } else if (mode == KVM_KVCOMM_W_COSINE) {
        double *tmp = malloc((size_t)n * sizeof(double));
        if (!tmp) return;
        for (int i = 0; i < n; i++) tmp[i] = -sc[i];
        softmax_neg(tmp, n, w);
        free(tmp);
    } else {
        softmax_neg(sc, n, w);
    }
}

/* kvcomm.align=content [ours]: row x (one head, D channels) of K or V measured at row u, as seen from row t: a
 * key is re-rotated by t - u into buf, a value (or an unmoved row, or buf NULL) is x itself. */
static const float *moved_row(const kvm_rope_params_t *rp, const float *x, int D, int kv, int u, int t, float *buf) {
    if (kv != 0 || u == t || !buf) return x;
    memcpy(buf, x, (size_t)D * sizeof(float));
    kvm_rope_rotate_rows(buf, 1, D, D, t - u, NULL, rp->inv_freq, rp->layout);
    return buf;
}

/* kvcomm.align=content [ours]: for every row t of X (T rows), the row u of Y (Ta rows) whose values over all
 * layers are nearest in squared l2, among rows |u - t| <= win (win 0: all rows). Ties go to the lower u. */
static void align_rows(const comm_geom_t *g, const float *X, int T, const float *Y, int Ta, int win, int32_t *u,
                       bool par) {
    const int L = g->L, H = g->H, D = g->D;
#pragma omp parallel for schedule(static) if (par)
    for (int t = 0; t < T; t++) {
        int lo = 0, hi = Ta;
        if (win > 0) {
            lo = t - win > 0 ? t - win : 0;
            hi = t + win + 1 < Ta ? t + win + 1 : Ta;
            if (lo >= hi) lo = Ta - 1, hi = Ta;
        }
        int best = lo;
        double bd = INFINITY;
        for (int v = lo; v < hi; v++) {
            double d = 0;
            for (int l = 0; l < L && d < bd; l++)
                for (int h = 0; h < H; h++) {
                    const float *x = X + comm_idx(g, T, l, 1, h, t), *y = Y + comm_idx(g, Ta, l, 1, h, v);
                    for (int k = 0; k < D; k++) d += ((double)x[k] - y[k]) * ((double)x[k] - y[k]);
                }
            if (d < bd) bd = d, best = v;
        }
        u[t] = best;
    }
}

int comm_weights(kvm_comm_t *c, comm_sample_t *s, comm_anchor_t **A, int N) {
    const comm_geom_t *g = &c->g;
    const int L = g->L, H = g->H, D = g->D, T = s->T;
    const int mode = c->cfg.weights;
    if (s->w_n == N && s->w_keys) {
        bool same = true;
        for (int i = 0; i < N && same; i++) same = s->w_keys[i] == A[i]->key;
        if (same) return 0;
    }
    kvm_free(s->w_keys);
    kvm_free(s->w_kph);
    kvm_free(s->w_kpf);
    s->w_keys = NULL;
    s->w_u = NULL;
    s->w_kph = s->w_kpf = s->w_vph = s->w_vpf = NULL;
    s->w_n = 0;
    size_t nph = (size_t)N * T, npf = (size_t)N * L * H * D;
    const bool content = c->cfg.align == KVM_KVCOMM_ALIGN_CONTENT && c->cfg.frame == KVM_KVCOMM_FRAME_F0;
    s->w_keys = kvm_malloc((size_t)N * sizeof(uint64_t) + (content ? nph * sizeof(int32_t) : 0));
    s->w_kph = kvm_malloc(2 * nph * sizeof(float));
    s->w_kpf = kvm_malloc(2 * npf * sizeof(float));
    double *sph = kvm_malloc(2 * nph * sizeof(double));
    double *spf = kvm_malloc(2 * npf * sizeof(double));
    if (!s->w_keys || !s->w_kph || !s->w_kpf || !sph || !spf) {
        kvm_free(sph);
        kvm_free(spf);
        return KVM_ENOMEM;
    }
    s->w_vph = s->w_kph + nph;
    s->w_vpf = s->w_kpf + npf;
    for (int i = 0; i < N; i++) s->w_keys[i] = A[i]->key;
    if (content) s->w_u = (int32_t *)(s->w_keys + N);
    const bool rot = c->cfg.frame == KVM_KVCOMM_FRAME_F0;
    const bool big = comm_rows_elems(g, T) > COMM_PAR_MIN;
    const kvm_rope_params_t *rp = kvm_kv_store_rope(c->store);
    for (int n = 0; n < N; n++) {
        const comm_anchor_t *a = A[n];
        int32_t *un = content ? s->w_u + (size_t)n * T : NULL;
        if (un) align_rows(g, s->X, T, a->base, a->T, c->cfg.align_window, un, big);
        /* placeholder scores: per token, head-aligned, over (l, h, d); with content alignment against the
         * anchor's row un[t], its key re-rotated to t */
#pragma omp parallel for schedule(static) if (big)
        for (int t = 0; t < T; t++) {
            const int ut = un ? un[t] : t;
            float *rk = ut != t ? malloc((size_t)D * sizeof(float)) : NULL;
            for (int kv = 0; kv < 2; kv++) {
                double acc = 0, xy = 0, xx = 0, yy = 0;
                for (int l = 0; l < L; l++)
                    for (int h = 0; h < H; h++) {
                        const float *x = s->X + comm_idx(g, T, l, kv, h, t);
                        const float *y = moved_row(rp, a->base + comm_idx(g, a->T, l, kv, h, ut), D, kv, ut, t, rk);
                        for (int k = 0; k < D; k++) {
                            acc += fabs((double)x[k] - y[k]);
                            xy += (double)x[k] * y[k];
                            xx += (double)x[k] * x[k];
                            yy += (double)y[k] * y[k];
                        }
                    }
                double v = mode == KVM_KVCOMM_W_COSINE ? xy / (sqrt(xx * yy) + 1e-30) : acc / ((double)L * H * D);
                sph[(size_t)kv * nph + (size_t)n * T + t] = v;
            }
            free(rk);
        }
        /* text-segment scores: per (l, h, d), tail-aligned, over the T tokens */
        const int off = a->T - T;
#pragma omp parallel for collapse(2) schedule(static) if (big)
        for (int l = 0; l < L; l++)
            for (int h = 0; h < H; h++) {
                float *tail = malloc((size_t)T * D * sizeof(float));
                for (int kv = 0; kv < 2; kv++) {
                    for (int t = 0; t < T; t++)
                        memcpy(tail + (size_t)t * D, a->base + comm_idx(g, a->T, l, kv, h, off + t), (size_t)D * sizeof(float));
                    if (kv == 0 && off && rot)
                        kvm_rope_rotate_rows(tail, T, D, D, -off, NULL, rp->inv_freq, rp->layout);
                    for (int k = 0; k < D; k++) {
                        double ss = 0, xy = 0, xx = 0, yy = 0;
                        for (int t = 0; t < T; t++) {
                            double x = s->X[comm_idx(g, T, l, kv, h, t) + k], y = tail[(size_t)t * D + k];
                            ss += (x - y) * (x - y);
                            xy += x * y;
                            xx += x * x;
                            yy += y * y;
                        }
                        double v = mode == KVM_KVCOMM_W_COSINE ? xy / (sqrt(xx * yy) + 1e-30) : sqrt(ss);
                        spf[(size_t)kv * npf + (((size_t)n * L + l) * H + h) * D + k] = v;
                    }
                }
                free(tail);
            }
    }
    /* softmax over anchors */
    double *col = kvm_malloc((size_t)N * sizeof(double));
    float *wc = kvm_malloc((size_t)N * sizeof(float));
    if (!col || !wc) {
        kvm_free(col), kvm_free(wc), kvm_free(sph), kvm_free(spf);
        return KVM_ENOMEM;
    }
    for (int kv = 0; kv < 2; kv++) {
        float *wph = kv ? s->w_vph : s->w_kph, *wpf = kv ? s->w_vpf : s->w_kpf;
        for (int t = 0; t < T; t++) {
            for (int n = 0; n < N; n++) col[n] = sph[(size_t)kv * nph + (size_t)n * T + t];
            weights_from_scores(col, N, wc, mode);
            for (int n = 0; n < N; n++) wph[(size_t)n * T + t] = wc[n];
        }
        size_t per = (size_t)L * H * D;
        for (size_t e = 0; e < per; e++) {
            for (int n = 0; n < N; n++) col[n] = spf[(size_t)kv * npf + (size_t)n * per + e];
            weights_from_scores(col, N, wc, mode);
            for (int n = 0; n < N; n++) wpf[(size_t)n * per + e] = wc[n];
        }
    }
    kvm_free(col);
    kvm_free(wc);
    kvm_free(sph);
    kvm_free(spf);
    s->w_n = N;
    return 0;
}

/* ==== oracle offsets (fidelity diagnostics, kvcomm.md §5.2) ============================================= */

/* The oracle entry of (consumer, sample) while an oracle prepare runs, else NULL. */
static const comm_oracle_t *oracle_find(const kvm_comm_t *c, const char *consumer, const comm_sample_t *s) {
    for (int i = 0; i < c->n_oracle; i++) {
        const comm_oracle_t *o = &c->oracle[i];
        if (o->key == s->key && !strcmp(o->name, s->name) && !strcmp(o->consumer, consumer)) return o;
    }
    return NULL;
}

/* out = base + (real - base) on layers 1..L-1 (layer 0 keeps the base, as every offset does): the delta a
 * perfect estimate would add, applied with the same fp32 arithmetic as the anchor mix. */
static void oracle_add(const comm_geom_t *g, float *out, const float *real, int n) {
    for (int l = 1; l < g->L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < g->H; h++) {
                float *o = out + comm_idx(g, n, l, kv, h, 0);
                const float *r = real + comm_idx(g, n, l, kv, h, 0);
                for (size_t k = 0; k < (size_t)n * g->D; k++) {
                    float d = r[k] - o[k];
                    o[k] += d;
                }
            }
}

static void oracle_clear(kvm_comm_t *c) {
    for (int i = 0; i < c->n_oracle; i++) {
        kvm_free(c->oracle[i].ph);
        kvm_free(c->oracle[i].pf);
    }
    kvm_free(c->oracle);
    c->oracle = NULL;
    c->n_oracle = 0;
}

/* Reads rows [pos, pos+n) of seq into host fp32 with the keys re-based to F0 (shift by -pos). */
static int oracle_read_f0(kvm_comm_t *c, const kvm_seq_t *seq, int pos, int n, float *out) {
    int rc = kvm_kv_read_rows(c->pool, seq->blocks, pos, n, out);
    if (rc || !pos) return rc;
    const comm_geom_t *g = &c->g;
    const kvm_rope_params_t *rp = kvm_kv_store_rope(c->store);
    for (int l = 0; l < g->L; l++)
        for (int h = 0; h < g->H; h++)
            kvm_rope_rotate_rows(out + comm_idx(g, n, l, 0, h, 0), n, g->D, g->D, -pos, NULL, rp->inv_freq, rp->layout);
    return 0;
}

int kvm_comm_prepare_oracle(kvm_comm_request_t *rq, const kvm_prompt_t *p, int which, const char *only,
                            kvm_prepared_t *out) {
    memset(out, 0, sizeof *out);
    if (!rq || !p || !p->tmpl) return kvm_seterr(KVM_EINVAL, "prepare_oracle: request and template are required");
    kvm_comm_t *c = rq->c;
    if (rq->dev) return kvm_seterr(KVM_EINVAL, "prepare_oracle: the oracle runs on the host path only (KVM_KVCOMM_DEVICE=0)");
    if (c->cfg.frame != KVM_KVCOMM_FRAME_F0)
        return kvm_seterr(KVM_EINVAL, "prepare_oracle: the oracle needs kvcomm.frame=f0");
    if (which & ~KVM_ORACLE_ALL) return kvm_seterr(KVM_EINVAL, "prepare_oracle: which=%d is not a KVM_ORACLE_* set", which);
    int rc = kvm_comm_prepare(rq, p, out);
    if (rc || out->report.mode != KVM_COMM_REUSE || !which) return rc;
    /* the dense prefill of the same ids: the truth every offset estimates */
    const comm_geom_t *g = &c->g;
    const kvm_comm_report_t *r = &out->report;
    kvm_seq_t dense;
    kvm_seq_init(&dense, c->pool);
    for (int i = 0; i < out->n_prompt && !rc; i += 1024) {
        int k = out->n_prompt - i < 1024 ? out->n_prompt - i : 1024;
        kvm_batch_item_t it = {.seq = &dense, .tokens = out->prompt_ids + i, .n_tokens = k};
        rc = kvm_forward(c->m, &it, 1);
    }
    int n_sh = 0;
    for (int i = 0; i < r->n_placeholders; i++) n_sh += r->ph[i].decision == KVM_PH_SHARED;
    if (!rc && n_sh) {
        c->oracle = kvm_calloc((size_t)n_sh, sizeof *c->oracle);
        if (!c->oracle) rc = KVM_ENOMEM;
    }
    for (int i = 0; i < r->n_placeholders && !rc; i++) {
        const kvm_comm_ph_report_t *pr = &r->ph[i];
        if (pr->decision != KVM_PH_SHARED || (only && strcmp(only, pr->name))) continue;
        comm_oracle_t *o = &c->oracle[c->n_oracle++];
        snprintf(o->consumer, sizeof o->consumer, "%s", kvm_template_agent(p->tmpl));
        snprintf(o->name, sizeof o->name, "%s", pr->name);
        o->key = pr->sample_key;
        o->T = pr->tokens;
        o->S = pr->text_tokens;
        o->which = which;
        o->ph = kvm_malloc(comm_rows_elems(g, o->T) * sizeof(float) + 1);
        o->pf = kvm_malloc(comm_rows_elems(g, o->S) * sizeof(float) + 1);
        if (!o->ph || !o->pf) rc = KVM_ENOMEM;
        if (!rc) rc = oracle_read_f0(c, &dense, pr->start_pos, o->T, o->ph);
        if (!rc) rc = oracle_read_f0(c, &dense, pr->start_pos + o->T, o->S, o->pf);
    }
    kvm_seq_free(&dense);
    /* the same prepare again (predictions and weights are cached per sample, so the decisions are the
     * same), now with the true deltas in comm_apply */
    kvm_prepared_release(out);
    if (!rc) rc = kvm_comm_prepare(rq, p, out);
    oracle_clear(c);
    return rc;
}

void comm_apply(kvm_comm_t *c, const comm_sample_t *s, comm_anchor_t **A, int N, const char *consumer,
                const float *P, int S, float *out_ph, float *out_pf, bool ph_offset, bool pf_offset) {
    const comm_geom_t *g = &c->g;
    const int L = g->L, H = g->H, D = g->D, T = s->T;
    const comm_geom_t gd = {L - 1, H, D};
    const kvm_rope_params_t *rp = kvm_kv_store_rope(c->store);
    const comm_delta_t **dl = malloc((size_t)(N ? N : 1) * sizeof *dl);
    for (int n = 0; n < N; n++) dl[n] = comm_anchor_delta(A[n], consumer);
    /* oracle diagnostics (kvm_comm_prepare_oracle): the true delta replaces the estimate */
    const comm_oracle_t *orc = oracle_find(c, consumer, s);
    const bool o_ph = orc && (orc->which & KVM_ORACLE_PH) && orc->T == T;
    const bool o_pf = orc && (orc->which & KVM_ORACLE_PF) && orc->S == S;
    if (out_ph && o_ph) {
        memcpy(out_ph, s->X, comm_rows_elems(g, T) * sizeof(float));
        if (ph_offset) oracle_add(g, out_ph, orc->ph, T);
        out_ph = NULL;
    }
    if (out_pf && o_pf) {
        memcpy(out_pf, P, comm_rows_elems(g, S) * sizeof(float));
        if (pf_offset) oracle_add(g, out_pf, orc->pf, S);
        out_pf = NULL;
    }
    if (out_ph) {
        memcpy(out_ph, s->X, comm_rows_elems(g, T) * sizeof(float));
        if (ph_offset && N > 0) {
#pragma omp parallel for collapse(3) schedule(static) if (comm_rows_elems(g, T) * (size_t)N > COMM_PAR_MIN)
            for (int l = 1; l < L; l++)
                for (int kv = 0; kv < 2; kv++)
                    for (int h = 0; h < H; h++) {
                        const float *W = kv ? s->w_vph : s->w_kph;
                        float *rk = s->w_u && kv == 0 ? malloc((size_t)D * sizeof(float)) : NULL;
                        for (int t = 0; t < T; t++) {
                            float *o = out_ph + comm_idx(g, T, l, kv, h, t);
                            for (int n = 0; n < N; n++) {
                                float w = W[(size_t)n * T + t];
                                if (w == 0.0f) continue;
                                const int u = s->w_u ? s->w_u[(size_t)n * T + t] : t; /* kvcomm.align */
                                const float *d =
                                    moved_row(rp, dl[n]->d_ph + comm_idx(&gd, A[n]->T, l - 1, kv, h, u), D, kv, u, t, rk);
                                for (int k = 0; k < D; k++) o[k] += w * d[k];
                            }
                        }
                        free(rk);
                    }
        }
    }
    if (out_pf) {
        memcpy(out_pf, P, comm_rows_elems(g, S) * sizeof(float));
        if (pf_offset && N > 0) {
#pragma omp parallel for collapse(3) schedule(static) if (comm_rows_elems(g, S) * (size_t)N > COMM_PAR_MIN)
            for (int l = 1; l < L; l++)
                for (int kv = 0; kv < 2; kv++)
                    for (int h = 0; h < H; h++) {
                        const float *W = (kv ? s->w_vpf : s->w_kpf);
                        for (int r = 0; r < S; r++) {
                            float *o = out_pf + comm_idx(g, S, l, kv, h, r);
                            for (int n = 0; n < N; n++) {
                                const float *w = W + (((size_t)n * L + l) * H + h) * D;
                                const float *d = dl[n]->d_pf + comm_idx(&gd, S, l - 1, kv, h, r);
                                for (int k = 0; k < D; k++) o[k] += w[k] * d[k];
                            }
                        }
                    }
        }
    }
    free(dl);
}

void comm_spread_scores(kvm_comm_t *c, const comm_sample_t *s, comm_anchor_t **A, int N, const char *consumer,
                        const float *xh, float *out) {
    const comm_geom_t *g = &c->g;
    const int L = g->L, H = g->H, D = g->D, T = s->T;
    const comm_geom_t gd = {L - 1, H, D};
    const kvm_rope_params_t *rp = kvm_kv_store_rope(c->store);
#pragma omp parallel for schedule(static) if (comm_rows_elems(g, T) * (size_t)N > COMM_PAR_MIN)
    for (int t = 0; t < T; t++) {
        double var = 0, xx = 0;
        float *rk = s->w_u ? malloc((size_t)D * sizeof(float)) : NULL;
        for (int l = 1; l < L; l++)
            for (int kv = 0; kv < 2; kv++)
                for (int h = 0; h < H; h++) {
                    const float *x = s->X + comm_idx(g, T, l, kv, h, t), *y = xh + comm_idx(g, T, l, kv, h, t);
                    const float *W = kv ? s->w_vph : s->w_kph;
                    for (int k = 0; k < D; k++) xx += (double)x[k] * x[k];
                    for (int n = 0; n < N; n++) {
                        const comm_delta_t *dl = comm_anchor_delta(A[n], consumer);
                        float w = W[(size_t)n * T + t];
                        if (!dl || w == 0.0f) continue;
                        const int u = s->w_u ? s->w_u[(size_t)n * T + t] : t;
                        const float *d = moved_row(rp, dl->d_ph + comm_idx(&gd, A[n]->T, l - 1, kv, h, u), D, kv, u, t, rk);
                        for (int k = 0; k < D; k++) {
                            double e = (double)d[k] - ((double)y[k] - x[k]);
                            var += w * e * e;
                        }
                    }
                }
        free(rk);
        out[t] = (float)(var / (xx + 1e-30)) + 1e-30f;
    }
}

/* ==== materialization (§3.8) =========================================================================== */

int comm_materialize(kvm_comm_request_t *rq, comm_sample_t *s, const char *consumer, uint64_t thash,
                     const float *real_ph, const float *real_pf, const float *P, int S, int ph_start, int pf_start) {
    kvm_comm_t *c = rq->c;
    const comm_geom_t *g = &c->g;
    comm_anchor_t *a = s->staged;
    if (!a) {
        a = kvm_calloc(1, sizeof *a);
        if (!a) return KVM_ENOMEM;
        a->refs = 1; /* the request's staged list */
        a->key = s->key;
        a->T = s->T;
        a->base = kvm_malloc(comm_rows_elems(g, s->T) * sizeof(float));
        if (!a->base) {
            kvm_free(a);
            return KVM_ENOMEM;
        }
        memcpy(a->base, s->X, comm_rows_elems(g, s->T) * sizeof(float));
        if (rq->n_staged == rq->cap_staged) {
            int cap = rq->cap_staged ? rq->cap_staged * 2 : 8;
            comm_anchor_t **ns = kvm_realloc(rq->staged, (size_t)cap * sizeof *ns);
            char(*nn)[KVM_COMM_NAME_MAX] = ns ? kvm_realloc(rq->staged_pool, (size_t)cap * sizeof *nn) : NULL;
            if (ns) rq->staged = ns;
            if (!ns || !nn) {
                anchor_free(a);
                return KVM_ENOMEM;
            }
            rq->staged_pool = nn;
            rq->cap_staged = cap;
        }
        snprintf(rq->staged_pool[rq->n_staged], KVM_COMM_NAME_MAX, "%s", s->name);
        rq->staged[rq->n_staged++] = a;
        s->staged = a;
    }
    if (comm_anchor_delta(a, consumer)) return 0; /* first materialization wins */
    if (a->T != s->T) {
        KVM_LOGW("kvcomm: anchor %016llx of '%s' has %d rows, the sample %d: delta update discarded",
                 (unsigned long long)a->key, s->name, a->T, s->T);
        return 0;
    }
    if (a->n_deltas == a->cap_deltas) {
        int cap = a->cap_deltas ? a->cap_deltas * 2 : 4;
        comm_delta_t *nd = kvm_realloc(a->deltas, (size_t)cap * sizeof *nd);
        if (!nd) return KVM_ENOMEM;
        a->deltas = nd;
        a->cap_deltas = cap;
    }
    comm_delta_t dl;
    memset(&dl, 0, sizeof dl);
    snprintf(dl.consumer, sizeof dl.consumer, "%s", consumer);
    dl.template_hash = thash;
    dl.S = S;
    dl.ph_src_start = ph_start;
    dl.pf_src_start = pf_start;
    const comm_geom_t gd = {g->L - 1, g->H, g->D};
    dl.d_ph = kvm_malloc(comm_rows_elems(&gd, s->T) * sizeof(float) + 1);
    dl.d_pf = kvm_malloc(comm_rows_elems(&gd, S) * sizeof(float) + 1);
    if (!dl.d_ph || !dl.d_pf) {
        kvm_free(dl.d_ph);
        kvm_free(dl.d_pf);
        return KVM_ENOMEM;
    }
    for (int l = 1; l < g->L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < g->H; h++) {
                for (int t = 0; t < s->T; t++) {
                    const float *r = real_ph + comm_idx(g, s->T, l, kv, h, t), *b = s->X + comm_idx(g, s->T, l, kv, h, t);
                    float *o = dl.d_ph + comm_idx(&gd, s->T, l - 1, kv, h, t);
                    for (int k = 0; k < g->D; k++) o[k] = r[k] - b[k];
                }
                for (int t = 0; t < S; t++) {
                    const float *r = real_pf + comm_idx(g, S, l, kv, h, t), *b = P + comm_idx(g, S, l, kv, h, t);
                    float *o = dl.d_pf + comm_idx(&gd, S, l - 1, kv, h, t);
                    for (int k = 0; k < g->D; k++) o[k] = r[k] - b[k];
                }
            }
    a->src_start = ph_start;
    a->deltas[a->n_deltas++] = dl;
    a->bytes = comm_anchor_bytes(g, a);
    return 0;
}

/* ==== commit and eviction (§2.4, §3.9) ================================================================= */

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
    comm_anchor_t *a = p->a[best];
    KVM_LOGD("kvcomm: pool '%s' evicts anchor %016llx (activation %u, seq %llu)", p->name, (unsigned long long)a->key,
             a->activation, (unsigned long long)a->insert_seq);
    memmove(p->a + best, p->a + best + 1, (size_t)(p->n - best - 1) * sizeof *p->a);
    p->n--;
    p->evicted++;
    c->st.anchors_evicted++;
    c->anchor_bytes -= a->bytes;
    comm_anchor_unref(c, a);
}

int comm_commit(kvm_comm_request_t *rq) {
    kvm_comm_t *c = rq->c;
    const int V = c->cfg.max_anchors > 0 ? c->cfg.max_anchors : 1;
    for (int i = 0; i < rq->n_bumps; i++) rq->bumps[i].a->activation += rq->bumps[i].count;
    for (int i = 0; i < rq->n_staged; i++) {
        comm_anchor_t *a = rq->staged[i];
        comm_pool_t *p = comm_pool_get(c, rq->staged_pool[i], true);
        if (!p) return KVM_ENOMEM;
        if (c->cfg.pool_bound == KVM_KVCOMM_POOL_REFERENCE) {
            for (int k = 0; k < (a->n_deltas ? a->n_deltas : 1); k++)
                if (p->n > V) pool_evict_one(c, p, NULL);
        } else if (p->n >= V) {
            pool_evict_one(c, p, NULL);
        }
        if (p->n == p->cap) {
            int cap = p->cap ? p->cap * 2 : 8;
            comm_anchor_t **na = kvm_realloc(p->a, (size_t)cap * sizeof *na);
            if (!na) return KVM_ENOMEM;
            p->a = na;
            p->cap = cap;
        }
        a->insert_seq = ++c->insert_seq;
        a->bytes = comm_anchor_bytes(&c->g, a);
        p->a[p->n++] = a; /* the staged reference moves to the pool */
        if (rq->dev && comm_dev_anchor_sync(c, a)) KVM_LOGW("kvcomm: device mirror of an anchor failed: %s", kvm_errmsg());
        rq->staged[i] = NULL;
        p->created++;
        c->st.anchors_created++;
        c->anchor_bytes += a->bytes;
        while (c->cfg.anchor_budget_bytes && c->anchor_bytes > c->cfg.anchor_budget_bytes && p->n > 1)
            pool_evict_one(c, p, a);
    }
    return 0;
}

void comm_request_free_state(kvm_comm_request_t *rq) {
    kvm_comm_t *c = rq->c;
    for (int i = 0; i < rq->n_samples; i++) {
        comm_sample_t *s = &rq->samples[i];
        kvm_free(s->X);
        comm_dev_sample_free(s);
        kvm_free(s->w_keys);
        kvm_free(s->w_kph);
        kvm_free(s->w_kpf);
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

/* ==== reference frame (kvcomm.frame = reference, §3.6 "Frames", §4 item 1) ============================== */

/* Rotates the keys of a tensor of n rows (geometry g, layer l0 first) by delta positions, in place. */
static void rotate_keys(kvm_comm_t *c, const comm_geom_t *g, float *x, int n, int delta) {
    if (!delta || n <= 0) return;
    const kvm_rope_params_t *rp = kvm_kv_store_rope(c->store);
#pragma omp parallel for collapse(2) schedule(static) if (comm_rows_elems(g, n) > COMM_PAR_MIN)
    for (int l = 0; l < g->L; l++)
        for (int h = 0; h < g->H; h++)
            kvm_rope_rotate_rows(x + comm_idx(g, n, l, 0, h, 0), n, g->D, g->D, delta, NULL, rp->inv_freq, rp->layout);
}

static float *dup_rows(const comm_geom_t *g, const float *x, int n) {
    size_t b = comm_rows_elems(g, n) * sizeof(float);
    float *y = kvm_malloc(b + 1);
    if (y && b) memcpy(y, x, b);
    return y;
}

int comm_mix_reference(kvm_comm_t *c, const comm_sample_t *s, comm_anchor_t **A, int N, const char *consumer,
                       const float *P, int S, int t_ph, int t_pf, float *out_ph, float *out_pf, bool ph_offset,
                       bool pf_offset) {
    const comm_geom_t *g = &c->g;
    const comm_geom_t gd = {g->L - 1, g->H, g->D};
    comm_sample_t rs;
    memset(&rs, 0, sizeof rs);
    memcpy(rs.name, s->name, sizeof rs.name);
    rs.key = s->key;
    rs.T = s->T;
    comm_anchor_t *tmp = kvm_calloc((size_t)(N ? N : 1), sizeof *tmp);
    comm_delta_t *dl = kvm_calloc((size_t)(N ? N : 1), sizeof *dl);
    comm_anchor_t **tp = kvm_calloc((size_t)(N ? N : 1), sizeof *tp);
    float *P_ref = dup_rows(g, P, S);
    int rc = 0;
    rs.X = dup_rows(g, s->X, s->T);
    if (!tmp || !dl || !tp || !P_ref || !rs.X) rc = KVM_ENOMEM;
    /* the candidate at its target; each anchor base at its src_start; this consumer's deltas in the frames
     * the reference stored them in; nothing is re-expressed afterwards */
    if (!rc) {
        rotate_keys(c, g, rs.X, s->T, t_ph);
        rotate_keys(c, g, P_ref, S, t_pf);
    }
    for (int n = 0; n < N && !rc; n++) {
        const comm_delta_t *src = comm_anchor_delta(A[n], consumer);
        tmp[n] = *A[n];
        tmp[n].base = dup_rows(g, A[n]->base, A[n]->T);
        dl[n] = *src;
        dl[n].d_ph = dup_rows(&gd, src->d_ph, A[n]->T);
        dl[n].d_pf = dup_rows(&gd, src->d_pf, src->S);
        tmp[n].deltas = &dl[n];
        tmp[n].n_deltas = 1;
        tp[n] = &tmp[n];
        if (!tmp[n].base || !dl[n].d_ph || !dl[n].d_pf) {
            rc = KVM_ENOMEM;
            break;
        }
        rotate_keys(c, g, tmp[n].base, A[n]->T, A[n]->src_start);
        rotate_keys(c, &gd, dl[n].d_ph, A[n]->T, src->ph_src_start);
        rotate_keys(c, &gd, dl[n].d_pf, src->S, src->pf_src_start);
    }
    if (!rc) rc = comm_weights(c, &rs, tp, N);
    if (!rc) comm_apply(c, &rs, tp, N, consumer, P_ref, S, out_ph, out_pf, ph_offset, pf_offset);
    for (int n = 0; n < N; n++) {
        if (tmp && tmp[n].base) kvm_free(tmp[n].base);
        if (dl) kvm_free(dl[n].d_ph), kvm_free(dl[n].d_pf);
    }
    kvm_free(tmp);
    kvm_free(dl);
    kvm_free(tp);
    kvm_free(P_ref);
    kvm_free(rs.X);
    kvm_free(rs.w_keys);
    kvm_free(rs.w_kph);
    kvm_free(rs.w_kpf);
    return rc;
}

/* ==== recomputed spans and rows (kvcomm.recompute_*, our design; kvcomm.md §5.2; the pass is in comm.c) ====== */

/* How kvm_comm_prepare counted prompt row `row` (>= the exact prefix, < N-1) of a REUSE prompt:
 * 0 exact (§5 exact_ctx), 1 offset, 2 naive. */
int comm_reuse_row_cat(const kvm_comm_report_t *r, const kvm_kvcomm_config_t *cfg, int row) {
    for (int j = 0; j < r->n_placeholders; j++) {
        const kvm_comm_ph_report_t *ph = &r->ph[j];
        int a = ph->start_pos, b = a + ph->tokens, e = b + ph->text_tokens;
        if (row >= a && row < b)
            return ph->decision == KVM_PH_SHARED ? (cfg->ph_offset ? 1 : 2) : ph->decision == KVM_PH_EXACT_CTX ? 0 : 2;
        if (row >= b && row < e) return ph->decision == KVM_PH_SHARED && cfg->pf_offset ? 1 : 2;
    }
    return 0;
}
