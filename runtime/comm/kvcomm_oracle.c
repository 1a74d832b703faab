/* kvcomm_oracle.c - the fidelity oracle (contract in kvcomm_oracle.h). */
#include "kvcomm_oracle.h"

#include <stdio.h>
#include <string.h>

#include "comm_internal.h"

_Static_assert((int)KVM_ORACLE_PH == (int)COMM_FORCE_PH && (int)KVM_ORACLE_PF == (int)COMM_FORCE_PF, "oracle bits = assemble hook bits");

/* The oracle anchor of shared placeholder pr: base = the sample's own base, the consumer's delta = the dense rows
 * (F0) minus the base and minus the template's text segment P. Mirrored on the backend. */
static int oracle_anchor(kvm_comm_request_t *rq, const kvm_template_t *t, int i, const kvm_comm_ph_report_t *pr,
                         const kvm_seq_t *dense, comm_anchor_t **out) {
    kvm_comm_t *c = rq->c;
    comm_sample_t *s = NULL;
    for (int k = 0; k < rq->n_samples && !s; k++)
        if (rq->samples[k].key == pr->sample_key && !strcmp(rq->samples[k].name, pr->name)) s = &rq->samples[k];
    if (!s) return kvm_seterr(KVM_EINTERNAL, "prepare_oracle: no sample for placeholder '%s'", pr->name);
    comm_anchor_t *a = kvm_calloc(1, sizeof *a);
    int rc = a ? 0 : KVM_ENOMEM;
    if (!rc) {
        a->refs = 1;
        a->key = pr->sample_key ^ 0x6f7261636c65ULL; /* never an anchor of the pool */
        a->T = pr->tokens;
        rc = comm_dev_anchor_base(c, a, s);
    }
    if (!rc)
        rc = comm_dev_anchor_add_delta(c, a, (kvm_template_t *)t, i, dense, pr->start_pos, pr->start_pos + pr->tokens,
                                       pr->text_tokens);
    if (rc && a) comm_anchor_unref(c, a);
    *out = rc ? NULL : a;
    return rc;
}

/* A backend buffer of n floats of 1. */
static float *ones(const kvm_ops_t *o, size_t n) {
    float *h = kvm_malloc(n * sizeof(float)), *d = o->alloc(n * sizeof(float));
    int rc = h && d ? 0 : KVM_ENOMEM;
    for (size_t k = 0; !rc && k < n; k++) h[k] = 1.0f;
    if (!rc) rc = o->h2d(d, h, n * sizeof(float));
    kvm_free(h);
    if (rc && d) o->free(d);
    return rc ? NULL : d;
}

int kvm_comm_prepare_oracle(kvm_comm_request_t *rq, const kvm_prompt_t *p, int which, const char *only,
                            kvm_prepared_t *out) {
    memset(out, 0, sizeof *out);
    if (!rq || !p || !p->tmpl) return kvm_seterr(KVM_EINVAL, "prepare_oracle: request and template are required");
    if (which & ~KVM_ORACLE_ALL) return kvm_seterr(KVM_EINVAL, "prepare_oracle: which=%d is not a KVM_ORACLE_* set", which);
    kvm_comm_t *c = rq->c;
    const kvm_template_t *t = p->tmpl;
    /* the decisions and the prompt ids (predictions and weights are cached per sample: the second prepare below
     * decides the same) */
    int rc = kvm_comm_prepare(rq, p, out);
    if (rc || out->report.mode != KVM_COMM_REUSE || !which) return rc;
    const kvm_comm_report_t r = out->report;
    /* the dense prefill of the same ids: the truth every offset estimates */
    kvm_seq_t dense;
    kvm_seq_init(&dense, c->pool);
    rc = comm_prefill(c, &dense, out->prompt_ids, out->n_prompt);
    comm_forced_t forced[KVM_COMM_MAX_PH];
    memset(forced, 0, sizeof forced);
    size_t n_ones = (size_t)2 * c->g.L * c->g.H * c->g.D;
    for (int i = 0; i < r.n_placeholders && !rc; i++) {
        const kvm_comm_ph_report_t *pr = &r.ph[i];
        if (pr->decision != KVM_PH_SHARED || (only && strcmp(only, pr->name))) continue;
        forced[i].which = which;
        rc = oracle_anchor(rq, t, i, pr, &dense, &forced[i].anchor);
        if ((size_t)2 * pr->tokens > n_ones) n_ones = (size_t)2 * pr->tokens;
    }
    kvm_seq_free(&dense);
    kvm_prepared_release(out);
    const kvm_ops_t *o = c->pool->ops;
    float *one = rc ? NULL : ones(o, n_ones);
    if (!rc && !one) rc = kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    for (int i = 0; i < r.n_placeholders; i++) forced[i].ones = one;
    if (!rc) rc = comm_prepare_run(rq, p, forced, out);
    for (int i = 0; i < r.n_placeholders; i++) comm_anchor_unref(c, forced[i].anchor);
    if (one) o->free(one);
    return rc;
}

/* ---- the selection oracle ------------------------------------------------------------------------------------- */

/* score_hook: each positive score becomes the row's squared distance to a dense prefill, over every layer and head
 * (plus a tiny amount, so that a row the estimate got exactly right stays a candidate) */
static int oracle_scores(kvm_comm_t *c, const kvm_prepared_t *p, float *row_score) {
    const int n = p->n_prompt - 1;
    const size_t LH2 = (size_t)c->g.L * 2 * c->g.H, D = (size_t)c->g.D, e = LH2 * (size_t)n * D;
    kvm_seq_t dense;
    kvm_seq_init(&dense, c->pool);
    int rc = comm_prefill(c, &dense, p->prompt_ids, n);
    float *A = kvm_malloc(e * sizeof(float)), *B = kvm_malloc(e * sizeof(float)); /* [L][2][H][n][D] */
    if (!rc && (!A || !B)) rc = KVM_ENOMEM;
    if (!rc) rc = kvm_kv_read_rows(c->pool, p->seq.blocks, 0, n, A);
    if (!rc) rc = kvm_kv_read_rows(c->pool, dense.blocks, 0, n, B);
    for (int r = 0; r < n && !rc; r++) {
        if (!(row_score[r] > 0)) continue;
        double err = 0;
        for (size_t k = 0; k < LH2; k++)
            for (size_t d = 0, o = (k * (size_t)n + (size_t)r) * D; d < D; d++)
                err += ((double)A[o + d] - B[o + d]) * ((double)A[o + d] - B[o + d]);
        row_score[r] = (float)err + 1e-30f;
    }
    kvm_free(A), kvm_free(B);
    kvm_seq_free(&dense);
    return rc;
}

/* The attention each row of p's prompt gets in a dense prefill of it from the rows after the last shared placeholder
 * (the agent's own text and the chat suffix, whose last row picks the first token), summed over layers and heads,
 * into mass[n_prompt]. */
static int attention_mass(kvm_comm_t *c, const kvm_prepared_t *p, float *mass) {
    const int own = comm_own_rows_from(&p->report), from = own > 0 ? own : 0;
    kvm_seq_t dense;
    kvm_seq_init(&dense, c->pool);
    int rc = comm_prefill(c, &dense, p->prompt_ids, from); /* then the rows whose attention counts, in pieces */
    float *part = rc ? NULL : kvm_malloc((size_t)p->n_prompt * sizeof(float));
    if (!rc && !part) rc = KVM_ENOMEM;
    for (int i = from; i < p->n_prompt && !rc; i += 1024) {
        const int k = p->n_prompt - i < 1024 ? p->n_prompt - i : 1024;
        kvm_batch_item_t it = {.seq = &dense, .tokens = p->prompt_ids + i, .n_tokens = k};
        rc = kvm_forward_attn_mass(c->m, &it, 1, part, p->n_prompt, from);
        for (int j = 0; j < p->n_prompt && !rc; j++) mass[j] += part[j];
    }
    kvm_free(part);
    kvm_seq_free(&dense);
    return rc;
}

/* score_hook: each positive score becomes the attention the row gets (attention_mass; plus a tiny amount, as
 * above) */
static int oracle_attention_scores(kvm_comm_t *c, const kvm_prepared_t *p, float *row_score) {
    float *mass = kvm_calloc((size_t)p->n_prompt, sizeof(float));
    int rc = mass ? attention_mass(c, p, mass) : KVM_ENOMEM;
    for (int r = 0; r < p->n_prompt - 1 && !rc; r++)
        if (row_score[r] > 0) row_score[r] = mass[r] + 1e-30f;
    kvm_free(mass);
    return rc;
}

/* score_hook: each positive score becomes the row's true error (oracle_scores) times the attention it gets
 * (attention_mass): how much of the error the agent's own rows read */
static int oracle_weighted_scores(kvm_comm_t *c, const kvm_prepared_t *p, float *row_score) {
    float *mass = kvm_calloc((size_t)p->n_prompt, sizeof(float));
    int rc = mass ? attention_mass(c, p, mass) : KVM_ENOMEM;
    if (!rc) rc = oracle_scores(c, p, row_score);
    for (int r = 0; r < p->n_prompt - 1 && !rc; r++)
        if (row_score[r] > 0) row_score[r] = row_score[r] * mass[r] + 1e-30f;
    kvm_free(mass);
    return rc;
}

int kvm_comm_set_oracle_selection(kvm_comm_t *c, int by) {
    if (!c) return kvm_seterr(KVM_EINVAL, "set_oracle_selection: no comm context");
    static int (*const hooks[])(kvm_comm_t *, const kvm_prepared_t *, float *) = {
        [KVM_ORACLE_SELECT_OFF] = NULL, [KVM_ORACLE_SELECT_ERROR] = oracle_scores,
        [KVM_ORACLE_SELECT_ATTENTION] = oracle_attention_scores, [KVM_ORACLE_SELECT_WEIGHTED] = oracle_weighted_scores};
    if (by < KVM_ORACLE_SELECT_OFF || by > KVM_ORACLE_SELECT_WEIGHTED)
        return kvm_seterr(KVM_EINVAL, "set_oracle_selection: %d is not a KVM_ORACLE_SELECT_* value", by);
    c->score_hook = hooks[by];
    return 0;
}
