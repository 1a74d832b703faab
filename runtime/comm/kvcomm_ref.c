/* kvcomm_ref.c - the host fp32 reference of KVCOMM's arithmetic, the tests' oracle (contract in kvcomm_ref.h).
 * Plain loops in fp64 sums / fp32 mixing, the formulas of kvcomm.md §3.4 and §3.6 as written. */
#include "kvcomm_ref.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* host fp32 copies of the anchors' data (kvcomm_dev.c: a no-op on a host-fp32 backend) */
static int ref_host(kvm_comm_t *c, comm_anchor_t **A, int n) {
    for (int i = 0; i < n; i++) {
        int rc = comm_anchor_host(c, A[i]);
        if (rc) return rc;
    }
    return 0;
}

int comm_ref_pred_dist(kvm_comm_t *c, comm_sample_t *s, comm_anchor_t **E, int n, double *d) {
    const comm_geom_t *g = &c->g;
    int rch = ref_host(c, E, n);
    if (rch) return rch;
    if (!s->X) {
        int rc = comm_dev_sample_x(c, s);
        if (rc) return rc;
    }
    for (int i = 0; i < n; i++) {
        double ss = 0;
        for (int l = 0; l < g->L; l++)
            for (int h = 0; h < g->H; h++)
                for (int t = 0; t < s->T; t++) {
                    const float *x = s->X + comm_idx(g, s->T, l, 1, h, t), *y = E[i]->base + comm_idx(g, E[i]->T, l, 1, h, t);
                    for (int k = 0; k < g->D; k++) ss += ((double)x[k] - y[k]) * ((double)x[k] - y[k]);
                }
        if (c->cfg.dist_norm == KVM_KVCOMM_DIST_PER_ELEMENT) ss /= (double)comm_rows_elems(g, s->T) / 2;
        d[i] = sqrt(ss);
    }
    return 0;
}

/* softmax of -sc over n entries (fp64), or one-hot on the first minimum (nearest) */
static void ref_softmax(const double *sc, int n, float *w, bool nearest) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (sc[i] < sc[best]) best = i;
    double sum = 0;
    for (int i = 0; i < n; i++) sum += exp(-(sc[i] - sc[best]));
    for (int i = 0; i < n; i++) w[i] = nearest ? (i == best ? 1.0f : 0.0f) : (float)(exp(-(sc[i] - sc[best])) / sum);
}

void comm_ref_weights_free(comm_ref_weights_t *w) {
    kvm_free(w->kph);
    kvm_free(w->kpf);
    memset(w, 0, sizeof *w);
}

int comm_ref_weights(kvm_comm_t *c, const float *X, int T, comm_anchor_t **A, int N, comm_ref_weights_t *w) {
    const comm_geom_t *g = &c->g;
    const int L = g->L, H = g->H, D = g->D;
    const size_t nph = (size_t)N * T, per = (size_t)L * H * D, npf = (size_t)N * per;
    memset(w, 0, sizeof *w);
    int rch = ref_host(c, A, N);
    if (rch) return rch;
    w->N = N, w->T = T;
    w->kph = kvm_malloc(2 * nph * sizeof(float) + 1);
    w->kpf = kvm_malloc(2 * npf * sizeof(float) + 1);
    double *sc = kvm_malloc((2 * nph + 2 * npf) * sizeof(double) + 1), *col = kvm_malloc((size_t)N * sizeof(double) + 1);
    float *tail = kvm_malloc((size_t)T * D * sizeof(float) + 1), *wc = kvm_malloc((size_t)N * sizeof(float) + 1);
    if (!w->kph || !w->kpf || !sc || !col || !tail || !wc) {
        comm_ref_weights_free(w);
        kvm_free(sc), kvm_free(col), kvm_free(tail), kvm_free(wc);
        return KVM_ENOMEM;
    }
    w->vph = w->kph + nph, w->vpf = w->kpf + npf;
    const kvm_rope_params_t *rp = kvm_kv_store_rope(c->store);
    double *sph = sc, *spf = sc + 2 * nph;
    for (int n = 0; n < N; n++) {
        const comm_anchor_t *a = A[n];
        for (int kv = 0; kv < 2; kv++) /* placeholder: per token, head-aligned, mean |x - y| over (l, h, d) */
            for (int t = 0; t < T; t++) {
                double acc = 0;
                for (int l = 0; l < L; l++)
                    for (int h = 0; h < H; h++) {
                        const float *x = X + comm_idx(g, T, l, kv, h, t), *y = a->base + comm_idx(g, a->T, l, kv, h, t);
                        for (int k = 0; k < D; k++) acc += fabs((double)x[k] - y[k]);
                    }
                sph[(size_t)kv * nph + (size_t)n * T + t] = acc / ((double)L * H * D);
            }
        const int off = a->T - T; /* text segment: per (l, h, d), tail-aligned, l2 over the T tokens */
        for (int kv = 0; kv < 2; kv++)
            for (int l = 0; l < L; l++)
                for (int h = 0; h < H; h++) {
                    for (int t = 0; t < T; t++)
                        memcpy(tail + (size_t)t * D, a->base + comm_idx(g, a->T, l, kv, h, off + t), (size_t)D * sizeof(float));
                    if (kv == 0 && off) kvm_rope_rotate_rows(tail, T, D, D, -off, NULL, rp->inv_freq, rp->layout);
                    for (int k = 0; k < D; k++) {
                        double ss = 0;
                        for (int t = 0; t < T; t++) {
                            double df = (double)X[comm_idx(g, T, l, kv, h, t) + k] - tail[(size_t)t * D + k];
                            ss += df * df;
                        }
                        spf[(size_t)kv * npf + (((size_t)n * L + l) * H + h) * D + k] = sqrt(ss);
                    }
                }
    }
    const bool nearest = c->cfg.weights == KVM_KVCOMM_W_NEAREST;
    for (int kv = 0; kv < 2; kv++) { /* softmax over anchors, per column */
        float *wph = kv ? w->vph : w->kph, *wpf = kv ? w->vpf : w->kpf;
        for (int t = 0; t < T; t++) {
            for (int n = 0; n < N; n++) col[n] = sph[(size_t)kv * nph + (size_t)n * T + t];
            ref_softmax(col, N, wc, nearest);
            for (int n = 0; n < N; n++) wph[(size_t)n * T + t] = wc[n];
        }
        for (size_t e = 0; e < per; e++) {
            for (int n = 0; n < N; n++) col[n] = spf[(size_t)kv * npf + (size_t)n * per + e];
            ref_softmax(col, N, wc, nearest);
            for (int n = 0; n < N; n++) wpf[(size_t)n * per + e] = wc[n];
        }
    }
    kvm_free(sc), kvm_free(col), kvm_free(tail), kvm_free(wc);
    return 0;
}

void comm_ref_apply(kvm_comm_t *c, const float *X, const comm_ref_weights_t *w, comm_anchor_t **A, const char *consumer,
                    const float *P, int S, float *out_ph, float *out_pf, bool ph_offset, bool pf_offset) {
    const comm_geom_t *g = &c->g;
    const int L = g->L, H = g->H, D = g->D, T = w->T, N = w->N;
    const comm_geom_t gd = {L - 1, H, D, g->esize};
    if (out_ph) memcpy(out_ph, X, comm_rows_elems(g, T) * sizeof(float));
    if (out_pf) memcpy(out_pf, P, comm_rows_elems(g, S) * sizeof(float));
    if (ref_host(c, A, N)) return; /* (comm_ref_weights made the copies; only an allocation can fail here) */
    for (int n = 0; n < N; n++) {
        const comm_delta_t *dl = comm_anchor_delta(A[n], consumer);
        for (int l = 1; l < L; l++)
            for (int kv = 0; kv < 2; kv++)
                for (int h = 0; h < H; h++) {
                    for (int t = 0; out_ph && ph_offset && t < T; t++) {
                        float *o = out_ph + comm_idx(g, T, l, kv, h, t);
                        const float *d = dl->d_ph + comm_idx(&gd, A[n]->T, l - 1, kv, h, t);
                        const float wt = (kv ? w->vph : w->kph)[(size_t)n * T + t];
                        for (int k = 0; k < D; k++) o[k] += wt * d[k];
                    }
                    for (int r = 0; out_pf && pf_offset && r < S; r++) {
                        float *o = out_pf + comm_idx(g, S, l, kv, h, r);
                        const float *d = dl->d_pf + comm_idx(&gd, S, l - 1, kv, h, r);
                        const float *wc = (kv ? w->vpf : w->kpf) + (((size_t)n * L + l) * H + h) * D;
                        for (int k = 0; k < D; k++) o[k] += wc[k] * d[k];
                    }
                }
    }
}

void comm_ref_spread(kvm_comm_t *c, const float *X, const comm_ref_weights_t *w, comm_anchor_t **A, const char *consumer,
                     const float *xh, float *out) {
    const comm_geom_t *g = &c->g;
    const int L = g->L, H = g->H, D = g->D, T = w->T, N = w->N;
    const comm_geom_t gd = {L - 1, H, D, g->esize};
    if (ref_host(c, A, N)) return;
    for (int t = 0; t < T; t++) {
        double var = 0, xx = 0;
        for (int l = 1; l < L; l++)
            for (int kv = 0; kv < 2; kv++)
                for (int h = 0; h < H; h++) {
                    const float *x = X + comm_idx(g, T, l, kv, h, t), *y = xh + comm_idx(g, T, l, kv, h, t);
                    for (int k = 0; k < D; k++) xx += (double)x[k] * x[k];
                    for (int n = 0; n < N; n++) {
                        const float *d = comm_anchor_delta(A[n], consumer)->d_ph + comm_idx(&gd, A[n]->T, l - 1, kv, h, t);
                        const float wt = (kv ? w->vph : w->kph)[(size_t)n * T + t];
                        for (int k = 0; k < D; k++) {
                            double e = (double)d[k] - ((double)y[k] - x[k]);
                            var += wt * e * e;
                        }
                    }
                }
        out[t] = (float)(var / (xx + 1e-30)) + 1e-30f;
    }
}

/* Copies the F0 tensor src (n rows) into rows [d0, d0 + n) of dst (dn rows), keys rotated by `shift`. */
static void place_rows(kvm_comm_t *c, const float *src, int n, int shift, float *dst, int dn, int d0) {
    const comm_geom_t *g = &c->g;
    const kvm_rope_params_t *rp = kvm_kv_store_rope(c->store);
    for (int l = 0; l < g->L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < g->H; h++) {
                float *o = dst + comm_idx(g, dn, l, kv, h, d0);
                memcpy(o, src + comm_idx(g, n, l, kv, h, 0), (size_t)n * g->D * sizeof(float));
                if (kv == 0 && shift) kvm_rope_rotate_rows(o, n, g->D, g->D, shift, NULL, rp->inv_freq, rp->layout);
            }
}

/* Piece i of a REUSE report: its placeholder rows (xh, T) and text rows (pf, S) in F0, as the assembly mixes them;
 * score: the spread scores of its rows (or NULL). */
static int ref_piece(kvm_comm_request_t *rq, const kvm_template_t *t, const kvm_comm_ph_report_t *pr, int i, float *xh,
                     float *pf, float *score) {
    kvm_comm_t *c = rq->c;
    const kvm_kvcomm_config_t *cfg = &c->cfg;
    const int T = pr->tokens, S = pr->text_tokens;
    comm_sample_t *s = NULL;
    for (int k = 0; k < rq->n_samples && !s; k++)
        if (rq->samples[k].key == pr->sample_key && !strcmp(rq->samples[k].name, pr->name)) s = &rq->samples[k];
    if (pr->decision != KVM_PH_SHARED || !s) { /* used as is (exact context, naive): the segment's F0 rows */
        kvm_segment_t *seg = kvm_segment_get(kvm_comm_store(c), pr->segment_id);
        int rc = seg ? kvm_segment_read_f32(seg, 0, T, xh) : KVM_EINTERNAL;
        kvm_segment_release(seg);
        memcpy(pf, t->P[i + 1], comm_rows_elems(&c->g, S) * sizeof(float));
        return rc;
    }
    comm_anchor_t **A = NULL;
    int N = 0, rc = comm_usable(rq, s, t->agent, t->hash, &A, &N);
    if (!rc) rc = comm_dev_sample_x(c, s);
    comm_ref_weights_t w;
    if (!rc) rc = comm_ref_weights(c, s->X, T, A, N, &w);
    if (!rc) {
        comm_ref_apply(c, s->X, &w, A, t->agent, t->P[i + 1], S, xh, pf, cfg->ph_offset, cfg->pf_offset);
        if (score && cfg->ph_offset && T >= cfg->recompute_below) comm_ref_spread(c, s->X, &w, A, t->agent, xh, score);
        comm_ref_weights_free(&w);
    }
    kvm_free(A);
    return rc;
}

int comm_ref_reuse_rows(kvm_comm_request_t *rq, const kvm_template_t *t, const kvm_comm_report_t *r, float *rows,
                        float *score) {
    kvm_comm_t *c = rq->c;
    const comm_geom_t *g = &c->g;
    const int N = r->input_tokens, r0 = r->n_placeholders ? r->ph[0].start_pos : N - 1, n = N - 1 - r0;
    if (score) memset(score, 0, (size_t)N * sizeof(float));
    int rc = 0;
    for (int i = 0; i < r->n_placeholders && !rc; i++) {
        const kvm_comm_ph_report_t *pr = &r->ph[i];
        const int T = pr->tokens, S = pr->text_tokens, t_pf = pr->start_pos + T;
        float *xh = kvm_malloc(comm_rows_elems(g, T) * sizeof(float) + 1), *pf = kvm_malloc(comm_rows_elems(g, S) * sizeof(float) + 1);
        rc = xh && pf ? ref_piece(rq, t, pr, i, xh, pf, score ? score + pr->start_pos : NULL) : KVM_ENOMEM;
        const int shift_ph = c->cfg.rotate ? pr->start_pos : 0, shift_pf = c->cfg.rotate ? t_pf : 0;
        if (!rc) place_rows(c, xh, T, shift_ph, rows, n, pr->start_pos - r0);
        if (!rc) { /* the last prompt token (the last text row) is not assembled */
            const int s_in = t_pf + S > N - 1 ? N - 1 - t_pf : S;
            float *cut = kvm_malloc(comm_rows_elems(g, s_in) * sizeof(float) + 1);
            if (!cut) rc = KVM_ENOMEM;
            for (int l = 0; !rc && l < g->L; l++)
                for (int kv = 0; kv < 2; kv++)
                    for (int h = 0; h < g->H; h++)
                        memcpy(cut + comm_idx(g, s_in, l, kv, h, 0), pf + comm_idx(g, S, l, kv, h, 0),
                               (size_t)s_in * g->D * sizeof(float));
            if (!rc) place_rows(c, cut, s_in, shift_pf, rows, n, t_pf - r0);
            kvm_free(cut);
        }
        kvm_free(xh);
        kvm_free(pf);
    }
    return rc;
}
