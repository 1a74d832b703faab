/* prepare.c - prompt assembly (kvcomm.md §3.1, §3.2, §3.7, §3.8, §5, §6): kvm_comm_prepare in stages
 *
 *   bind      the template's placeholders get their segments; prompt ids and positions are laid out (§3.2)
 *   decide    per placeholder: exact context (§5), prediction (§3.4), usable anchors (§3.5); DENSE or REUSE
 *   exact     the longest exact prefix (prefix index or the template's segment 0)
 *   assemble  REUSE: offsets, shift and scatter of every piece on the backend's ops (kvcomm_dev.c), then the
 *             recompute pass of kvcomm.recompute_below / recompute_text / recompute_frac (ours, §5.2)
 *
 * and kvm_comm_complete (prefix index, delta materialization, response segment), the token accounting (one
 * place: row_cat) and the report. Contract in prompt.h. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm_internal.h"

static double ms_since(uint64_t t0) { return (double)(kvm_now_ns() - t0) / 1e6; }

typedef struct prep_priv {
    kvm_comm_request_t *rq;
    const kvm_template_t *tmpl;
    int n_ph;
    comm_piece_t ph[KVM_COMM_MAX_PH];
    int n_exact;        /* leading rows of the cache that are exact */
    float *row_score;   /* kvcomm.recompute_frac: [n_prompt] spread score of each offset-corrected placeholder row
                         * (0 elsewhere), or NULL */
    int guard;          /* kvcomm.guard's sample of this call (comm_guard_sample): 0, 1 now, 2 after generation */
    int own_from;       /* kvcomm.recompute_rank: rows [own_from, n_prompt - 1) ran the ranking pass (recomputed again) */
    kvm_seq_t check;    /* guard 2: a copy-on-write fork of the assembled rows, checked in kvm_comm_complete */
} prep_priv_t;

void kvm_prepared_release(kvm_prepared_t *p) {
    if (!p) return;
    if (p->seq.pool) kvm_seq_free(&p->seq);
    prep_priv_t *pv = p->priv;
    if (pv) {
        if (pv->check.pool) kvm_seq_free(&pv->check);
        for (int i = 0; i < pv->n_ph; i++) {
            kvm_segment_release(pv->ph[i].seg);
            kvm_free(pv->ph[i].usable);
        }
        kvm_free(pv->row_score);
        kvm_free(pv);
    }
    kvm_free(p->prompt_ids);
    memset(p, 0, sizeof *p);
}

/* ==== token accounting (§6) ============================================================================== */

enum { ROW_EXACT = 0, ROW_OFFSET = 1, ROW_NAIVE = 2 };

/* How the assembly placed prompt row `row` (at or past the exact prefix, before the last token) of a REUSE prompt. */
static int row_cat(const prep_priv_t *pv, const kvm_kvcomm_config_t *cfg, int row) {
    for (int j = 0; j < pv->n_ph; j++) {
        const comm_piece_t *q = &pv->ph[j];
        const bool shared = q->decision == KVM_PH_SHARED;
        if (row >= q->t_ph && row < q->t_ph + q->T)
            return shared ? (cfg->ph_offset ? ROW_OFFSET : ROW_NAIVE) : q->decision == KVM_PH_EXACT_CTX ? ROW_EXACT : ROW_NAIVE;
        if (row >= q->t_pf && row < q->t_pf + q->S) return shared && cfg->pf_offset ? ROW_OFFSET : ROW_NAIVE;
    }
    return ROW_EXACT; /* segment 0 (never past the exact prefix) */
}

/* Moves one row of a REUSE report from its assembly category to recomputed. */
static void account_recomputed(kvm_comm_report_t *r, int cat) {
    if (cat == ROW_EXACT) r->exact_tokens--;
    else if (cat == ROW_OFFSET) r->offset_tokens--;
    else r->naive_tokens--;
    r->recomputed_tokens++;
}

/* ==== bind (§3.2) ========================================================================================= */

/* Binds every placeholder of p->tmpl to its segment (checked: model, frame), lays out the prompt ids and the
 * pieces' positions, and starts the report. */
static int stage_bind(kvm_comm_request_t *rq, const kvm_prompt_t *p, prep_priv_t *pv, kvm_prepared_t *out) {
    kvm_comm_t *c = rq->c;
    const kvm_template_t *t = p->tmpl;
    kvm_comm_report_t *r = &out->report;
    r->policy = p->policy;
    r->template_hash = t->hash;
    r->n_placeholders = t->n_ph;
    int N = t->n_ids;
    for (int i = 0; i < t->n_ph; i++) {
        comm_piece_t *ph = &pv->ph[i];
        ph->sample = -1;
        kvm_segment_t *seg = NULL;
        for (int b = 0; b < p->n_bindings; b++)
            if (p->bindings[b].name && !strcmp(p->bindings[b].name, t->ph_name[i])) seg = p->bindings[b].seg;
        if (!seg)
            return kvm_seterr(KVM_EINVAL, "prepare: template '%s' needs a segment for placeholder '%s'", t->agent,
                              t->ph_name[i]);
        int rc = kvm_segment_check(seg, c->pool, 0);
        if (rc) return kvm_errctx(rc, "prepare: template '%s', placeholder '%s'", t->agent, t->ph_name[i]);
        kvm_segment_ref(seg);
        ph->seg = seg;
        ph->T = kvm_segment_info(seg)->n_tokens;
        ph->S = t->te[i + 1] - t->ts[i + 1];
        N += ph->T - (t->pe[i] - t->ps[i]);
    }
    out->prompt_ids = kvm_malloc((size_t)N * sizeof(int32_t));
    if (!out->prompt_ids) return KVM_ENOMEM;
    int at = t->te[0];
    memcpy(out->prompt_ids, t->ids, (size_t)t->te[0] * sizeof(int32_t));
    for (int i = 0; i < t->n_ph; i++) {
        comm_piece_t *ph = &pv->ph[i];
        kvm_comm_ph_report_t *pr = &r->ph[i];
        ph->t_ph = at;
        memcpy(out->prompt_ids + at, kvm_segment_info(ph->seg)->ids, (size_t)ph->T * sizeof(int32_t));
        at += ph->T;
        ph->t_pf = at;
        memcpy(out->prompt_ids + at, t->ids + t->ts[i + 1], (size_t)ph->S * sizeof(int32_t));
        at += ph->S;
        snprintf(pr->name, sizeof pr->name, "%s", t->ph_name[i]);
        pr->segment_id = kvm_segment_info(ph->seg)->id;
        pr->tokens = ph->T;
        pr->start_pos = ph->t_ph;
        pr->text_tokens = ph->S;
        pr->decision = KVM_PH_DENSE;
    }
    KVM_ASSERT(at == N);
    out->n_prompt = N;
    r->input_tokens = N;
    return 0;
}

/* ==== decide (§3.1 step 2, §3.4, §3.5, §5) ================================================================= */

/* The sample (name, content of g) of this request, created on first use (its base stays in g's blocks). */
static int get_sample(kvm_comm_request_t *rq, const char *name, const kvm_segment_t *g, int *out) {
    const kvm_segment_info_t *gi = kvm_segment_info(g);
    uint64_t key = kvm_hash64(gi->ids, (size_t)gi->n_tokens * sizeof(int32_t), kvm_hash64(&rq->id, 8, KVM_HASH_SEED));
    for (int i = 0; i < rq->n_samples; i++)
        if (rq->samples[i].key == key && !strcmp(rq->samples[i].name, name)) {
            comm_dev_sample_rebind(&rq->samples[i], g); /* this call's binding holds it now */
            *out = i;
            return 0;
        }
    if (comm_reserve(&rq->samples, &rq->cap_samples, rq->n_samples, sizeof *rq->samples)) return KVM_ENOMEM;
    comm_sample_t *s = &rq->samples[rq->n_samples];
    memset(s, 0, sizeof *s);
    snprintf(s->name, sizeof s->name, "%s", name);
    s->key = key;
    s->T = gi->n_tokens;
    int rc = comm_dev_sample_bind(rq->c, s, g);
    if (rc) return rc;
    *out = rq->n_samples++;
    return 0;
}

/* The decision of placeholder i under KVCOMM; sets *dense when the agent must run DENSE. */
static int decide_one(kvm_comm_request_t *rq, const kvm_template_t *t, kvm_prepared_t *out, comm_piece_t *ph,
                      kvm_comm_ph_report_t *pr, const char *name, bool *dense) {
    const kvm_kvcomm_config_t *cfg = &rq->c->cfg;
    const kvm_segment_info_t *gi = kvm_segment_info(ph->seg);
    if (gi->producer_ctx_hash == kvm_ctx_hash(out->prompt_ids, ph->t_ph) && gi->producer_pos == ph->t_ph) {
        ph->decision = KVM_PH_EXACT_CTX; /* §5: same context, same place: as is */
        return 0;
    }
    if (!cfg->ph_offset && !cfg->pf_offset) { /* rotation only */
        ph->decision = KVM_PH_NAIVE;
        return 0;
    }
    if (ph->T < cfg->recompute_below) {
        /* ours (kvcomm.md §5.2): a REUSE prompt recomputes a piece this short and the text after it anyway (mark_rows),
         * so no offset is predicted for it: it neither asks for a new anchor nor sends the whole call DENSE (a
         * one-token question failing the entropy gate kept the team's long shared facts from being reused) */
        ph->decision = KVM_PH_NAIVE;
        return 0;
    }
    int rc = get_sample(rq, name, ph->seg, &ph->sample);
    if (rc) return rc;
    comm_sample_t *s = &rq->samples[ph->sample];
    if ((rc = comm_predict(rq, s))) return rc;
    pr->sample_key = s->key;
    pr->predicted_new = s->is_new;
    pr->n_pool = s->n_pool;
    pr->n_eligible = s->n_eligible;
    pr->entropy = s->entropy;
    pr->threshold = s->threshold;
    if (s->is_new) {
        ph->decision = KVM_PH_NEW_ANCHOR;
        *dense = true;
        return 0;
    }
    if ((rc = comm_usable(rq, s, t->agent, t->hash, &ph->usable, &ph->n_usable))) return rc;
    pr->n_eligible = ph->n_usable;
    if (ph->n_usable > 0) ph->decision = KVM_PH_SHARED;
    else if (cfg->no_anchor == KVM_KVCOMM_NOANCHOR_NAIVE) ph->decision = KVM_PH_NAIVE;
    else ph->decision = KVM_PH_NO_ANCHOR, *dense = true;
    return 0;
}

/* Decides every placeholder; *dense: the agent runs DENSE (policy, KVCOMM off, or a placeholder that needs it). */
static int stage_decide(kvm_comm_request_t *rq, const kvm_prompt_t *p, prep_priv_t *pv, kvm_prepared_t *out,
                        bool *dense) {
    kvm_comm_t *c = rq->c;
    const kvm_template_t *t = p->tmpl;
    const bool kv = p->policy == KVM_KV_KVCOMM && c->cfg.enable && t->n_ph > 0 && !c->kvcomm_off[0];
    if (kv && c->cfg.max_anchors >= KVM_KVCOMM_MAX_ANCHORS)
        return kvm_seterr(KVM_EINVAL, "prepare: kvcomm.max_anchors %d; the KVCOMM ops take pools of at most %d (V + 1)",
                          c->cfg.max_anchors, KVM_KVCOMM_MAX_ANCHORS);
    *dense = !kv;
    uint64_t tp = kvm_now_ns();
    for (int i = 0; kv && i < t->n_ph; i++) {
        int rc = decide_one(rq, t, out, &pv->ph[i], &out->report.ph[i], t->ph_name[i], dense);
        if (rc) return rc;
    }
    out->report.predict_ms = ms_since(tp);
    return 0;
}

/* ==== exact prefix (§5) ==================================================================================== */

/* Longest exact prefix of ids[0..n) (at most max_tokens): the prefix index or, if longer, the template's
 * segment 0 (when ids start with it). seq must be empty. Returns the rows now in seq. */
static int exact_prefix(kvm_comm_t *c, const kvm_template_t *t, const int32_t *ids, int n, int max_tokens,
                        kvm_seq_t *seq) {
    int hit = kvm_prefix_index_lookup(c->store, ids, n, max_tokens, seq);
    if (hit < 0) return hit;
    int s0 = t ? t->seq.n_tokens : 0;
    if (s0 > max_tokens) s0 = max_tokens;
    if (t && s0 > hit && s0 <= n && !memcmp(ids, t->seq.tokens, (size_t)s0 * sizeof(int32_t))) {
        kvm_seq_free(seq);
        kvm_seq_init(seq, c->pool);
        int rc = kvm_seq_share_prefix(seq, &t->seq, s0);
        if (rc) return rc;
        hit = s0;
    }
    return hit;
}

int kvm_comm_prepare_ids(kvm_comm_t *c, const int32_t *ids, int n, kvm_kv_policy_t policy, kvm_prepared_t *out) {
    memset(out, 0, sizeof *out);
    if (!ids || n <= 0) return kvm_seterr(KVM_EINVAL, "prepare: empty prompt");
    if (policy == KVM_KV_KVCOMM)
        return kvm_seterr(KVM_EINVAL, "prepare: a prompt given as ids has no placeholders; use EXACT or TEXT");
    kvm_seq_init(&out->seq, c->pool);
    out->prompt_ids = kvm_malloc((size_t)n * sizeof(int32_t));
    prep_priv_t *pv = kvm_calloc(1, sizeof *pv);
    out->priv = pv;
    if (!out->prompt_ids || !pv) {
        kvm_prepared_release(out);
        return KVM_ENOMEM;
    }
    memcpy(out->prompt_ids, ids, (size_t)n * sizeof(int32_t));
    out->n_prompt = n;
    int e = policy == KVM_KV_PREFIX ? exact_prefix(c, NULL, ids, n, n - 1, &out->seq) : 0;
    if (e < 0) {
        kvm_prepared_release(out);
        return e;
    }
    out->n_cached = e;
    out->rest_ids = out->prompt_ids + e;
    out->n_rest = n - e;
    kvm_comm_report_t *r = &out->report;
    r->mode = KVM_COMM_DENSE;
    r->policy = policy;
    r->input_tokens = n;
    r->exact_tokens = e;
    r->recomputed_tokens = n - e;
    pv->n_exact = e;
    return 0;
}

/* ==== recompute (ours, kvcomm.md §5.2) ====================================================================== */

static int cmp_score_desc(const void *a, const void *b) {
    float x = ((const float *)a)[0], y = ((const float *)b)[0];
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Marks the rows [E, N-1) of a REUSE prompt to recompute: 2 = the span of a short shared piece (recompute_below)
 * or a short text segment after a shared piece (recompute_text), 1 = one of the recompute_frac share of the other
 * offset-corrected placeholder rows with the largest spread score. Returns the number of marked rows or < 0. */
static int mark_rows(const prep_priv_t *pv, const kvm_kvcomm_config_t *cfg, float frac, int E, int N, char *mark) {
    const bool select = pv->row_score && comm_wants_scores(cfg);
    for (int j = 0; j < pv->n_ph; j++) {
        const comm_piece_t *q = &pv->ph[j];
        if (q->decision != KVM_PH_SHARED && q->decision != KVM_PH_NAIVE) continue;
        int a = q->t_ph, b = q->t_pf + q->S;
        if (q->T >= cfg->recompute_below) {
            if (cfg->recompute_text <= 0 || q->S <= 0 || q->S >= cfg->recompute_text) continue;
            a = q->t_pf;
        }
        for (int row = a > E ? a : E; row < b && row < N - 1; row++) mark[row] = 2;
    }
    for (int row = pv->own_from > 0 ? pv->own_from : N - 1; row < N - 1; row++) mark[row] = 2; /* the ranking pass's */
    int nc = 0, n2 = 0;
    float *cand = select ? kvm_malloc((size_t)2 * N * sizeof(float)) : NULL;
    if (select && !cand) return KVM_ENOMEM;
    for (int row = E; row < N - 1; row++) {
        n2 += mark[row] == 2;
        if (select && !mark[row] && pv->row_score[row] > 0)
            cand[2 * nc] = pv->row_score[row], cand[2 * nc + 1] = (float)row, nc++;
    }
    int k = select ? (int)ceil((double)frac * nc) : 0;
    if (k > nc) k = nc;
    if (select && nc > 0) qsort(cand, (size_t)nc, 2 * sizeof(float), cmp_score_desc);
    if (select && cfg->recompute_spread > 0) /* and every row whose predicted error passes the gate */
        while (k < nc && cand[2 * k] >= cfg->recompute_spread) k++;
    for (int i = 0; i < k; i++) mark[(int)cand[2 * i + 1]] = 1;
    kvm_free(cand);
    return k + n2;
}

/* One forward of the nb prompt rows at positions pos, in place in p's assembled sequence (a view of its blocks that
 * holds n_view tokens, so that those positions are in it), as one positioned batch item; with mass, their attention
 * is summed into it from position mass_from on (kvm_forward_attn_mass). */
static int positioned_pass(kvm_comm_t *c, kvm_prepared_t *p, const int32_t *pos, int nb, int n_view, float *mass,
                           int mass_from) {
    const int N = p->n_prompt;
    int32_t *buf = kvm_malloc((size_t)(N + nb) * sizeof(int32_t));
    if (!buf) return KVM_ENOMEM;
    int32_t *scratch = buf, *tok = buf + N; /* scratch: the view's token bookkeeping */
    memcpy(scratch, p->prompt_ids, (size_t)N * sizeof(int32_t));
    for (int i = 0; i < nb; i++) tok[i] = p->prompt_ids[pos[i]];
    kvm_seq_t view = {.pool = c->pool, .blocks = p->seq.blocks, .n_blocks = p->seq.n_blocks,
                      .cap_blocks = p->seq.n_blocks, .tokens = scratch, .n_tokens = n_view, .cap_tokens = N};
    kvm_batch_item_t item = {.seq = &view, .tokens = tok, .n_tokens = nb, .positions = pos};
    const int rc = mass ? kvm_forward_attn_mass(c->m, &item, 1, mass, N, mass_from) : kvm_forward(c->m, &item, 1);
    kvm_free(buf);
    return rc;
}

/* The recompute pass of a REUSE prompt (kvcomm.recompute_below / recompute_text / recompute_frac; all 0 = off):
 * the marked rows are recomputed in place by one forward of one positioned batch item on a view of the assembled
 * sequence. At every layer all of them write their K/V before the layer's attention, and row t attends to rows
 * [0, t], so each row sees the fresh K/V of every recomputed row before it (a contiguous span comes out as a
 * prefill of it would); the other assembled rows keep their estimates bit for bit. One item, not one per row: an
 * attention kernel reads the context once per query tile. The report moves the rows to recomputed_tokens. */
static int stage_recompute(kvm_comm_t *c, prep_priv_t *pv, kvm_prepared_t *p) {
    kvm_comm_report_t *r = &p->report;
    const kvm_kvcomm_config_t *cfg = &c->cfg;
    const int N = p->n_prompt, E = pv->n_exact;
    if (!(pv->row_score && comm_wants_scores(cfg)) && cfg->recompute_below <= 0 && cfg->recompute_text <= 0) return 0;
    for (int row = E; row < N - 1; row++)
        if (c->pool->refcount[p->seq.blocks[row / KVM_KV_BLOCK]] != 1)
            return kvm_seterr(KVM_EINTERNAL, "recompute: assembled row %d sits in a shared block", row);
    char *mark = kvm_calloc((size_t)N, 1);
    if (!mark) return KVM_ENOMEM;
    const int nb = mark_rows(pv, cfg, comm_guard_frac(c, pv->tmpl->agent), E, N, mark);
    int32_t *pos = nb > 0 ? kvm_malloc((size_t)nb * sizeof(int32_t)) : NULL;
    int rc = nb < 0 ? nb : nb > 0 && !pos ? KVM_ENOMEM : 0;
    if (!rc && nb > 0) {
        int i = 0;
        for (int row = E; row < N - 1; row++)
            if (mark[row]) pos[i++] = row;
        r->recompute_items = 1;
        rc = positioned_pass(c, p, pos, nb, N - 1, NULL, 0);
        for (int k = 0; k < nb && !rc; k++) {
            account_recomputed(r, row_cat(pv, cfg, pos[k]));
            if (mark[pos[k]] == 2) r->short_recomputed++;
            else r->selected_recomputed++;
        }
    }
    kvm_free(mark);
    kvm_free(pos);
    KVM_ASSERT(rc || p->seq.n_tokens == N - 1);
    return rc;
}

/* kvcomm.recompute_rank (ours, a research switch): the rows after the last shared placeholder (the agent's own text
 * and the chat suffix) and the last prompt row run once, positioned, over the assembled cache, summing their attention
 * (kvm_forward_attn_mass); the attention they give each assembled row (summed over layers and heads) becomes its
 * score (attention) or multiplies its spread (attention_spread). Their K/V now come from the estimated context, so
 * the recompute pass computes them again (pv->own_from), and the generation's first step the last row. Nothing
 * after the last placeholder: the spread stays. A backend without kvm_ops_t.attn_mass fails the call, naming the
 * switch. */
static int stage_rank(kvm_comm_t *c, prep_priv_t *pv, kvm_prepared_t *p, int E) { /* rows [E, N - 1) assembled */
    const int N = p->n_prompt, from = comm_own_rows_from(&p->report);
    if (from <= E || from >= N - 1) return 0;
    /* the last prompt row too (it picks the first token): its block is reserved ahead; the generation's first step
     * writes that row again */
    const int nb = N - from;
    float *mass = kvm_calloc((size_t)N, sizeof(float));
    int32_t *pos = kvm_malloc((size_t)nb * sizeof(int32_t));
    int rc = mass && pos ? kvm_seq_reserve(&p->seq, N) : KVM_ENOMEM;
    if (!rc) {
        for (int i = 0; i < nb; i++) pos[i] = from + i;
        rc = positioned_pass(c, p, pos, nb, N, mass, from);
    }
    if (rc) kvm_errctx(rc, "kvcomm.recompute_rank=%s", c->cfg.recompute_rank == 1 ? "attention" : "attention_spread");
    for (int row = E; row < from && !rc; row++)
        if (pv->row_score[row] > 0)
            pv->row_score[row] = (c->cfg.recompute_rank == 1 ? mass[row] : pv->row_score[row] * mass[row]) + 1e-30f;
    if (!rc) pv->own_from = from;
    kvm_free(mass);
    kvm_free(pos);
    return rc;
}

/* ==== assemble (§3.6, §3.7) ================================================================================= */

/* REUSE: rows [E, N-1) from the segments with offsets in F0, one shift, one scatter (kvcomm_dev.c), accounted,
 * then the recompute pass; the last prompt token is left to run. */
static int stage_assemble(kvm_comm_request_t *rq, const kvm_template_t *t, const comm_forced_t *forced, prep_priv_t *pv,
                          kvm_prepared_t *out, int E) {
    kvm_comm_t *c = rq->c;
    const kvm_kvcomm_config_t *cfg = &c->cfg;
    kvm_comm_report_t *r = &out->report;
    const int N = out->n_prompt;
    r->mode = KVM_COMM_REUSE;
    for (int i = 0; i < t->n_ph; i++) r->ph[i].decision = pv->ph[i].decision;
    if (comm_wants_scores(cfg) && !(pv->row_score = kvm_calloc((size_t)N, sizeof(float)))) return KVM_ENOMEM;
    int rc = comm_dev_reuse(rq, t, pv->ph, forced, out, E, N, pv->row_score);
    if (!rc && pv->row_score && c->score_hook) rc = c->score_hook(c, out, pv->row_score);
    else if (!rc && pv->row_score && cfg->recompute_rank) rc = stage_rank(c, pv, out, E);
    if (rc) return rc;
    r->exact_tokens = E;
    for (int row = E; row < N - 1; row++) {
        const int cat = row_cat(pv, cfg, row);
        if (cat == ROW_EXACT) r->exact_tokens++;
        else if (cat == ROW_OFFSET) r->offset_tokens++;
        else r->naive_tokens++;
    }
    r->recomputed_tokens = 1;
    out->n_cached = N - 1;
    pv->n_exact = E;
    rc = stage_recompute(c, pv, out);
    if (rc || !pv->guard) return rc;
    if (pv->guard == 1) return comm_guard_check(c, t->agent, out, E);
    /* checked after the generation: the fork keeps these rows (the generation copies the shared last block) */
    kvm_seq_init(&pv->check, c->pool);
    if (kvm_seq_share_prefix(&pv->check, &out->seq, out->seq.n_tokens)) {
        KVM_LOGW("kvcomm guard: agent '%s': no check of this call (its fork): %s", t->agent, kvm_errmsg());
        kvm_seq_free(&pv->check);
        pv->guard = 0;
    }
    return 0;
}

int comm_prepare_run(kvm_comm_request_t *rq, const kvm_prompt_t *p, const comm_forced_t *forced, kvm_prepared_t *out) {
    memset(out, 0, sizeof *out);
    if (!rq || !p || !p->tmpl) return kvm_seterr(KVM_EINVAL, "prepare: request and template are required");
    kvm_comm_t *c = rq->c;
    const kvm_template_t *t = p->tmpl;
    if (t->c != c) return kvm_seterr(KVM_EINVAL, "prepare: template '%s' belongs to another comm context", t->agent);
    kvm_seq_init(&out->seq, c->pool);
    prep_priv_t *pv = kvm_calloc(1, sizeof *pv);
    if (!pv) return KVM_ENOMEM;
    out->priv = pv;
    pv->rq = rq;
    pv->tmpl = t;
    pv->n_ph = t->n_ph;
    kvm_comm_report_t *r = &out->report;
    bool dense = true;
    int rc = stage_bind(rq, p, pv, out);
    if (!rc) rc = stage_decide(rq, p, pv, out, &dense);
    if (!rc && !dense && (pv->guard = comm_guard_sample(c, t->agent)) < 0) rc = pv->guard; /* kvcomm.guard */
    /* DENSE computes every row (the baseline that the other policies are measured against) */
    const int E = rc || p->policy == KVM_KV_DENSE ? 0
                                                 : exact_prefix(c, t, out->prompt_ids, out->n_prompt, out->n_prompt - 1, &out->seq);
    if (!rc && E < 0) rc = E;
    /* the template's first use: its head rows were computed for this request (when the template compiled), so
     * they count as computed, not reused */
    int fresh = 0;
    if (!rc && E > 0 && !t->used) {
        fresh = E < t->seq.n_tokens ? E : t->seq.n_tokens;
        ((kvm_template_t *)t)->used = true; /* a flag of the comm context's own object, which it mutates */
    }
    if (!rc && dense) {
        r->mode = KVM_COMM_DENSE;
        for (int i = 0; i < t->n_ph; i++) {
            int d = pv->ph[i].decision;
            if (d != KVM_PH_NEW_ANCHOR && d != KVM_PH_NO_ANCHOR) pv->ph[i].decision = KVM_PH_DENSE;
            r->ph[i].decision = pv->ph[i].decision;
        }
        out->n_cached = pv->n_exact = E;
        r->exact_tokens = E - fresh;
        r->recomputed_tokens = out->n_prompt - E + fresh;
    } else if (!rc) {
        rc = stage_assemble(rq, t, forced, pv, out, E);
        r->exact_tokens -= fresh;
        r->recomputed_tokens += fresh;
    }
    if (rc) {
        kvm_prepared_release(out);
        return rc;
    }
    out->rest_ids = out->prompt_ids + out->n_cached;
    out->n_rest = out->n_prompt - out->n_cached;
    r->anchors_staged = rq->n_staged;
    KVM_ASSERT(r->exact_tokens + r->offset_tokens + r->naive_tokens + r->recomputed_tokens + r->fused_tokens ==
               out->n_prompt);
    return 0;
}

int kvm_comm_prepare(kvm_comm_request_t *rq, const kvm_prompt_t *p, kvm_prepared_t *out) {
    return comm_prepare_run(rq, p, NULL, out);
}

/* ==== complete (§3.8, §2.3) ================================================================================== */

/* DENSE: fills this consumer's deltas of every new anchor (and of every anchor without one for it) from the
 * computed rows, on the backend. */
static int materialize_all(kvm_comm_request_t *rq, const prep_priv_t *pv, kvm_prepared_t *p) {
    kvm_template_t *t = (kvm_template_t *)pv->tmpl; /* the backend copies of its text rows may be made here */
    int rc = 0;
    for (int i = 0; t && i < pv->n_ph && !rc; i++) {
        const comm_piece_t *ph = &pv->ph[i];
        if (ph->decision != KVM_PH_NEW_ANCHOR && ph->decision != KVM_PH_NO_ANCHOR) continue;
        rc = comm_materialize(rq, &rq->samples[ph->sample], t, i, &p->seq, ph->t_ph, ph->t_pf, ph->S);
        if (!rc) p->report.ph[i].materialized = true;
    }
    return rc;
}

int kvm_comm_complete(kvm_comm_request_t *rq, kvm_prepared_t *p, const kvm_gen_result_t *res, kvm_segment_t **response) {
    if (response) *response = NULL;
    prep_priv_t *pv = p ? p->priv : NULL;
    if (!pv) return kvm_seterr(KVM_EINVAL, "complete: not a prepared prompt");
    kvm_comm_t *c = rq ? rq->c : NULL;
    if (!c) return kvm_seterr(KVM_EINVAL, "complete: a request is required");
    const kvm_template_t *t = pv->tmpl;
    const int N = p->n_prompt;
    if (p->seq.n_tokens < N)
        return kvm_seterr(KVM_EINVAL, "complete: the sequence holds %d tokens, fewer than the %d-token prompt (run "
                          "kvm_generate on rest_ids first)", p->seq.n_tokens, N);
    kvm_comm_report_t *r = &p->report;
    /* ---- kvcomm.guard: a check sampled after the generation, on the fork of the served rows ---- */
    if (pv->guard == 2 && pv->check.pool) {
        int rc = comm_guard_check_after(c, t->agent, &pv->check, p->prompt_ids, N, pv->n_exact, r);
        kvm_seq_free(&pv->check);
        if (rc) return rc;
    }
    /* ---- DENSE: register the exact prompt blocks; fill deltas of new anchors (§3.8) ---- */
    if (r->mode == KVM_COMM_DENSE) {
        kvm_prefix_index_insert(c->store, &p->seq, N);
        int rc = materialize_all(rq, pv, p);
        r->anchors_staged = rq->n_staged;
        if (rc) return rc;
    }
    /* ---- statistics ---- */
    c->st.invocations++;
    if (r->mode == KVM_COMM_REUSE) c->st.reuse_invocations++;
    c->st.exact_tokens += (uint64_t)r->exact_tokens;
    c->st.offset_tokens += (uint64_t)r->offset_tokens;
    c->st.naive_tokens += (uint64_t)r->naive_tokens;
    c->st.recomputed_tokens += (uint64_t)r->recomputed_tokens;
    c->st.input_tokens += (uint64_t)r->input_tokens;
    /* ---- the response segment (§2.3) ---- */
    if (!response || !res || res->n_ids <= 0) return 0;
    int rows = p->seq.n_tokens - N;
    if (res->stop_reason == KVM_STOP_LENGTH && c->cfg.resp_last_token == KVM_KVCOMM_RESP_COMPUTE && rows < res->n_ids) {
        kvm_batch_item_t it = {.seq = &p->seq, .tokens = &res->ids[res->n_ids - 1], .n_tokens = 1};
        int rc = kvm_forward(c->m, &it, 1);
        if (rc) return rc;
        rows++;
    }
    if (rows <= 0) return 0;
    kvm_segment_info_t meta = {.producer_kind = KVM_PRODUCER_AGENT,
                               .producer_id = t ? t->agent : "",
                               .producer_ctx_hash = kvm_ctx_hash(p->seq.tokens, N),
                               .producer_pos = N};
    return kvm_segment_publish(c->store, &p->seq, N, rows, -N, &meta, response);
}

/* ==== report / stats ==================================================================================== */

int kvm_comm_report_json(const kvm_comm_report_t *r, char *buf, size_t cap) {
    size_t at = 0;
#define PUT(...)                                                                                              \
    do {                                                                                                      \
        int k_ = snprintf(buf ? buf + (at < cap ? at : cap) : NULL, at < cap ? cap - at : 0, __VA_ARGS__);   \
        if (k_ > 0) at += (size_t)k_;                                                                         \
    } while (0)
    if (!buf) cap = 0;
    PUT("{\"mode\":\"%s\",\"policy\":\"%s\",\"input_tokens\":%d,\"exact\":%d,\"offset\":%d,\"naive\":%d,"
        "\"recomputed\":%d,\"fused\":%d,\"template_hash\":\"%016llx\",\"predict_ms\":%.3f,\"weights_ms\":%.3f,"
        "\"offset_ms\":%.3f,\"assemble_ms\":%.3f,\"anchors_staged\":%d,\"short_recomputed\":%d,"
        "\"selected_recomputed\":%d,\"recompute_items\":%d,\"guard\":%d,\"guard_tokens\":%d,\"placeholders\":[",
        r->mode == KVM_COMM_REUSE ? "reuse" : "dense",
        r->policy == KVM_KV_KVCOMM ? "kvcomm" : r->policy == KVM_KV_DENSE ? "text" : "exact", r->input_tokens,
        r->exact_tokens, r->offset_tokens, r->naive_tokens, r->recomputed_tokens, r->fused_tokens,
        (unsigned long long)r->template_hash, r->predict_ms, r->weights_ms, r->offset_ms, r->assemble_ms,
        r->anchors_staged, r->short_recomputed, r->selected_recomputed, r->recompute_items, r->guard, r->guard_tokens);
    for (int i = 0; i < r->n_placeholders && i < KVM_COMM_MAX_PH; i++) {
        const kvm_comm_ph_report_t *p = &r->ph[i];
        PUT("%s{\"name\":\"%s\",\"segment\":%llu,\"sample\":\"%016llx\",\"tokens\":%d,\"start\":%d,\"text_tokens\":%d,"
            "\"decision\":\"%s\",\"predicted_new\":%s,\"pool\":%d,\"eligible\":%d,\"entropy\":%.4f,\"threshold\":%.4f,"
            "\"top_anchor\":\"%016llx\",\"top_weight\":%.4f,\"materialized\":%s}",
            i ? "," : "", p->name, (unsigned long long)p->segment_id, (unsigned long long)p->sample_key, p->tokens,
            p->start_pos, p->text_tokens, kvm_ph_decision_name(p->decision), p->predicted_new ? "true" : "false",
            p->n_pool, p->n_eligible, p->entropy, p->threshold, (unsigned long long)p->top_anchor, p->top_weight,
            p->materialized ? "true" : "false");
    }
    PUT("]}");
#undef PUT
    return (int)at;
}

void kvm_comm_stats(const kvm_comm_t *c, kvm_comm_stats_t *out) {
    *out = c->st;
    out->n_pools = c->n_pools;
    out->anchor_bytes = c->anchor_bytes;
    out->anchors_shared = 0;
    out->shared_base_bytes = 0;
    const size_t row = comm_rows_elems(&c->g, 1) * kvm_dtype_size(c->pool->geom.dtype);
    for (int i = 0; i < c->n_pools; i++)
        for (int k = 0; k < c->pools[i].n; k++)
            if (c->pools[i].a[k]->base_shared) {
                out->anchors_shared++;
                out->shared_base_bytes += row * (size_t)c->pools[i].a[k]->T;
            }
}

int kvm_comm_pool_stats(const kvm_comm_t *c, int i, kvm_comm_pool_stats_t *out) {
    if (i < 0 || i >= c->n_pools) return kvm_seterr(KVM_ERANGE, "comm: pool %d of %d", i, c->n_pools);
    const comm_pool_t *p = &c->pools[i];
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "%s", p->name);
    out->n_anchors = p->n;
    out->created = p->created;
    out->evicted = p->evicted;
    out->predictions = p->predictions;
    out->predicted_new = p->predicted_new;
    for (int k = 0; k < p->n; k++) out->bytes += p->a[k]->bytes;
    return 0;
}
