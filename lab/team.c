/* team.c - the KVCOMM fidelity workload (contract in team.h), on include/kvmesh_lab.h. */
#include "team.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "minitasks.h"
#include "stats.h"

void kvm_team_opts_default(kvm_team_opts_t *o) {
    memset(o, 0, sizeof *o);
    o->requests = 300;
    o->warm = 10;
    o->cos_samples = 32;
    o->max_tokens = 12;
    o->seed = KVM_MT_DEFAULT_EVAL_SEED;
    o->policy = KVM_KV_KVCOMM;
    kvm_kvcomm_config_default(&o->cfg);
}

void kvm_team_result_free(kvm_team_result_t *r) {
    if (!r) return;
    free(r->cos_k);
    free(r->outputs);
    free(r->ttft_ms);
    free(r->prep_cpu_ms);
    memset(r, 0, sizeof *r);
}

double kvm_team_accuracy(const kvm_team_result_t *r) {
    int c = 0, t = 0;
    for (int k = 0; k < KVM_TEAM_ROLES; k++) c += r->correct[k], t += r->total[k];
    return t ? 100.0 * c / t : 0;
}

/* process CPU time (all threads), ns */
static uint64_t cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* mean and median of the entries of v ([n_outputs], request-major, role-minor) of `role` (-1: all) that are >= 0 */
static void team_stat(const double *v0, int n_out, int role, double *mean_ms, double *p50_ms) {
    *mean_ms = *p50_ms = 0;
    int n = 0;
    double *v = v0 ? malloc((size_t)(n_out > 0 ? n_out : 1) * sizeof(double)) : NULL;
    for (int i = 0; v && i < n_out; i++)
        if ((role < 0 || i % KVM_TEAM_ROLES == role) && v0[i] >= 0) v[n++] = v0[i];
    lab_stats_t st = lab_stats_of(v, n);
    *mean_ms = st.mean;
    *p50_ms = st.med;
    free(v);
}

void kvm_team_ttft(const kvm_team_result_t *r, int role, double *mean_ms, double *p50_ms) {
    team_stat(r->ttft_ms, r->n_outputs, role, mean_ms, p50_ms);
}

void kvm_team_prep_cpu(const kvm_team_result_t *r, int role, double *mean_ms, double *p50_ms) {
    team_stat(r->prep_cpu_ms, r->n_outputs, role, mean_ms, p50_ms);
}

static void trim(char *s) {
    size_t n = strlen(s), a = 0;
    while (a < n && (s[a] == ' ' || s[a] == '\n' || s[a] == '\t' || s[a] == '\r')) a++;
    while (n > a && (s[n - 1] == ' ' || s[n - 1] == '\n' || s[n - 1] == '\t' || s[n - 1] == '\r')) n--;
    memmove(s, s + a, n - a);
    s[n - a] = 0;
}

/* Per-layer cosine and relative l2 of the reused cache rows [E, n_cached) against a dense prefill of the
 * same ids. */
static int cos_vs_dense(kvm_model_t *m, kvm_comm_t *c, kvm_prepared_t *p, kvm_team_result_t *r) {
    kvm_model_info_t mi;
    kvm_model_info(m, &mi);
    const int L = mi.n_layers, H = mi.n_kv_heads, D = mi.head_dim;
    int E = kvm_prepared_report(p)->exact_tokens, n = kvm_prepared_n_cached(p), n_prompt;
    if (n - E <= 0) return 0;
    kvm_seq_t *s = kvm_seq_create(kvm_comm_pool(c));
    kvm_batch_item_t it = {.seq = s, .tokens = kvm_prepared_prompt(p, &n_prompt), .n_tokens = n};
    int rc = s ? kvm_forward(m, &it, 1) : KVM_ENOMEM;
    size_t e = (size_t)L * 2 * H * (n - E) * D;
    float *x = malloc(e * 4), *y = malloc(e * 4);
    if (!x || !y) rc = KVM_ENOMEM;
    if (!rc) rc = kvm_seq_read_rows(kvm_prepared_seq(p), E, n - E, x);
    if (!rc) rc = kvm_seq_read_rows(s, E, n - E, y);
    if (!rc) {
        size_t per = (size_t)H * (n - E) * D;
        for (int l = 0; l < L; l++)
            for (int kv = 0; kv < 2; kv++) {
                const float *a = x + ((size_t)l * 2 + kv) * per, *b = y + ((size_t)l * 2 + kv) * per;
                double ab = 0, aa = 0, bb = 0, dd = 0;
                for (size_t i = 0; i < per; i++) {
                    ab += (double)a[i] * b[i], aa += (double)a[i] * a[i], bb += (double)b[i] * b[i];
                    dd += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
                    r->max_abs_err = fmax(r->max_abs_err, fabs((double)a[i] - b[i]));
                    r->max_abs_dense = fmax(r->max_abs_dense, fabs((double)b[i]));
                }
                double cs = ab / (sqrt(aa * bb) + 1e-30), rl = sqrt(dd / (bb + 1e-30));
                if (kv) r->cos_v[l] += cs, r->l2_v[l] += rl;
                else r->cos_k[l] += cs, r->l2_k[l] += rl;
            }
        r->cos_n++;
    }
    free(x);
    free(y);
    kvm_seq_destroy(s);
    return rc;
}

void kvm_team_blend_policy(kvm_kvcomm_config_t *c) {
    kvm_kvcomm_config_set(c, "preset", "blend");
}

/* Scores one agent's trimmed output `out` (role `role` of request q; fout = the finder's output of this request) and
 * adds its prompt's report to the counts. */
static void team_account(kvm_team_result_t *r, const kvm_team_opts_t *o, const kvm_team_result_t *dense_ref, int q,
                         int role, const char *out, const kvm_mt_item_t *it, const char *fout, const kvm_comm_report_t *rp) {
    kvm_mt_item_t sc = it[role];
    if (role == 1) snprintf(sc.answer, sizeof sc.answer, "%s", !strcmp(fout, it[0].answer) ? "yes" : "no");
    if (role == 2) kvm_mt_reverse_str(fout, sc.answer, sizeof sc.answer);
    r->correct[role] += kvm_mt_score(&sc, out);
    r->total[role]++;
    size_t oi = (size_t)q * KVM_TEAM_ROLES + (size_t)role;
    snprintf(r->outputs[oi], sizeof r->outputs[oi], "%s", out);
    r->n_outputs = (int)oi + 1;
    if (dense_ref && (int)oi < dense_ref->n_outputs) {
        r->agree_n++;
        r->agree += !strcmp(out, dense_ref->outputs[oi]);
    }
    r->invocations++;
    r->reuse += rp->mode == KVM_COMM_REUSE;
    if (q >= o->warm) r->invocations_warm++, r->reuse_warm += rp->mode == KVM_COMM_REUSE;
    r->exact += (uint64_t)rp->exact_tokens, r->offset += (uint64_t)rp->offset_tokens;
    r->naive += (uint64_t)rp->naive_tokens, r->recomputed += (uint64_t)rp->recomputed_tokens;
    r->input += (uint64_t)rp->input_tokens;
    r->short_recomputed += rp->short_recomputed;
    r->selected_recomputed += rp->selected_recomputed;
    r->recompute_items += rp->recompute_items;
}

/* What one request's agents share: the comm context and its request, the templates, the prepared-prompt handle. */
typedef struct team_ctx {
    kvm_model_t *m;
    kvm_comm_t *c;
    kvm_template_t *tm[KVM_TEAM_ROLES];
    kvm_prepared_t *p;
    const kvm_team_opts_t *o;
    const kvm_team_result_t *dense_ref;
} team_ctx_t;

/* Runs agent `role` of request q: prepares its prompt (segments in, the finder's response bound), generates
 * greedily, completes (the finder's response segment into *finder), scores. fout holds the finder's output. */
static int team_agent(team_ctx_t *x, kvm_comm_request_t *rq, int q, int role, const kvm_mt_item_t *it,
                      kvm_segment_t *in, kvm_segment_t **finder, char *fout, size_t fout_cap, kvm_team_result_t *r) {
    const kvm_team_opts_t *o = x->o;
    if (role > 0 && !*finder) { /* the finder produced nothing with KV: fall back to its text */
        int rc = kvm_comm_segment_text(x->c, KVM_PRODUCER_AGENT, "finder", fout[0] ? fout : "?",
                                       strlen(fout[0] ? fout : "?"), finder);
        if (rc) return rc;
    }
    kvm_binding_t b[2] = {{"input", in}, {"agent:finder:current", *finder}};
    kvm_prompt_t pr = {.tmpl = x->tm[role], .bindings = b, .n_bindings = role == 0 ? 1 : 2, .policy = o->policy};
    kvm_prepared_t *p = x->p;
    const uint64_t t0 = kvm_now_ns(), c0 = cpu_ns();
    int rc = o->oracle ? kvm_comm_prepare_oracle(rq, &pr, o->oracle, o->oracle_only, p) : kvm_comm_prepare(rq, &pr, p);
    if (rc) return rc;
    const double prep_ms = (double)(kvm_now_ns() - t0) / 1e6, prep_cpu = (double)(cpu_ns() - c0) / 1e6;
    const kvm_comm_report_t *rp = kvm_prepared_report(p);
    if (rp->mode == KVM_COMM_REUSE && r->cos_n < o->cos_samples) rc = cos_vs_dense(x->m, x->c, p, r);
    kvm_generate_params_t gp = kvm_generate_default_params();
    gp.max_tokens = o->max_tokens;
    gp.temperature = 0; /* greedy */
    kvm_generation_t gr;
    int n_rest = 0;
    const int32_t *rest = kvm_prepared_rest(p, &n_rest);
    memset(&gr, 0, sizeof gr);
    if (!rc) rc = kvm_seq_generate(x->m, kvm_prepared_seq(p), rest, n_rest, &gp, NULL, NULL, &gr);
    const size_t oi = (size_t)q * KVM_TEAM_ROLES + (size_t)role;
    if (!rc) r->ttft_ms[oi] = prep_ms + gr.ttft_ms, r->prep_cpu_ms[oi] = prep_cpu;
    if (!rc) rc = kvm_comm_complete(rq, p, &gr, role == 0 ? finder : NULL);
    if (!rc) {
        char out[64];
        snprintf(out, sizeof out, "%s", gr.text ? gr.text : "");
        trim(out);
        if (role == 0) snprintf(fout, fout_cap, "%s", out);
        team_account(r, o, x->dense_ref, q, role, out, it, fout, rp);
    }
    kvm_generation_clear(&gr);
    kvm_prepared_release(p);
    return rc;
}

/* One request: the facts segment, then the four agents in order. */
static int team_request(team_ctx_t *x, int q, kvm_team_result_t *r) {
    kvm_mt_item_t it[KVM_TEAM_ROLES];
    int rc = 0;
    for (int role = 0; role < KVM_TEAM_ROLES && !rc; role++)
        rc = kvm_mt_make(&it[role], KVM_MT_TEAM, KVM_MT_EVAL, x->o->seed, (uint64_t)q, role);
    if (rc) return rc;
    kvm_comm_request_t *rq = kvm_comm_request_begin(x->c, (uint64_t)q + 1);
    if (!rq) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    kvm_segment_t *in = NULL, *finder = NULL;
    rc = kvm_comm_segment_text(x->c, KVM_PRODUCER_INPUT, "input", it[0].user, strlen(it[0].user), &in);
    char fout[64] = "";
    for (int role = 0; role < KVM_TEAM_ROLES && !rc; role++) rc = team_agent(x, rq, q, role, it, in, &finder, fout, sizeof fout, r);
    if (!rc) rc = kvm_comm_request_end(rq);
    else kvm_comm_request_abort(rq);
    kvm_segment_release(in);
    kvm_segment_release(finder);
    return rc;
}

int kvm_team_run(kvm_model_t *m, const kvm_team_opts_t *o, const kvm_team_result_t *dense_ref, kvm_team_result_t *r) {
    memset(r, 0, sizeof *r);
    kvm_model_info_t mi;
    kvm_model_info(m, &mi);
    if (!kvm_model_tokenizer(m)) return kvm_seterr(KVM_EINVAL, "team workload: model %s has no tokenizer", mi.name);
    if (o->requests <= 0) return kvm_seterr(KVM_EINVAL, "team workload: no requests");
    kvm_comm_opts_t co = {.kv_budget_bytes = o->kv_budget_bytes, .kvcomm = o->cfg, .kvcomm_set = true};
    team_ctx_t x = {.m = m, .c = kvm_comm_create(m, &co), .o = o, .dense_ref = dense_ref};
    if (!x.c) return kvm_errcode() ? kvm_errcode() : KVM_EINTERNAL;
    const int L = mi.n_layers;
    r->n_layers = L;
    r->cos_k = calloc((size_t)L * 4, sizeof(double));
    r->outputs = calloc((size_t)o->requests * KVM_TEAM_ROLES, sizeof *r->outputs);
    r->ttft_ms = malloc((size_t)o->requests * KVM_TEAM_ROLES * sizeof(double));
    r->prep_cpu_ms = malloc((size_t)o->requests * KVM_TEAM_ROLES * sizeof(double));
    x.p = kvm_prepared_create();
    int rc = r->cos_k && r->outputs && r->ttft_ms && r->prep_cpu_ms && x.p ? 0 : KVM_ENOMEM;
    for (int i = 0; !rc && i < o->requests * KVM_TEAM_ROLES; i++) r->ttft_ms[i] = r->prep_cpu_ms[i] = -1;
    if (!rc) r->cos_v = r->cos_k + L, r->l2_k = r->cos_k + 2 * L, r->l2_v = r->cos_k + 3 * L;
    for (int role = 0; role < KVM_TEAM_ROLES && !rc; role++) {
        kvm_piece_t pc[3] = {{.kind = KVM_PIECE_PLACEHOLDER, .text = "input"},
                             {.kind = KVM_PIECE_TEXT, .text = "\nFinder: "},
                             {.kind = KVM_PIECE_PLACEHOLDER, .text = "agent:finder:current"}};
        kvm_template_desc_t d = {.agent = kvm_mt_role_name(KVM_MT_TEAM, role),
                                 .system = kvm_mt_role_system(KVM_MT_TEAM, role),
                                 .pieces = pc,
                                 .n_pieces = role == 0 ? 1 : 3};
        x.tm[role] = kvm_template_create(x.c, &d);
        if (!x.tm[role]) rc = kvm_errcode() ? kvm_errcode() : KVM_EINTERNAL;
    }
    double t0 = (double)kvm_now_ns() / 1e9, last = t0;
    bool tty = isatty(2);
    for (int q = 0; q < o->requests && !rc; q++) {
        rc = team_request(&x, q, r);
        double now = (double)kvm_now_ns() / 1e9;
        /* progress within a mode: every request on a terminal, else every 50 requests or 10 seconds */
        if (!o->quiet && (tty || (q + 1) % 50 == 0 || now - last >= 10 || q + 1 == o->requests)) {
            fprintf(stderr, "%steam: %d/%d requests, %.0f s%s", tty ? "\r" : "", q + 1, o->requests, now - t0,
                    tty && q + 1 < o->requests ? "" : "\n");
            last = now;
        }
    }
    kvm_comm_stats_t st;
    kvm_comm_stats(x.c, &st);
    for (int i = 0; i < st.n_pools; i++) {
        kvm_comm_pool_stats_t ps;
        if (!kvm_comm_pool_stats(x.c, i, &ps)) r->anchors += ps.n_anchors;
    }
    r->anchor_bytes = st.anchor_bytes;
    for (int role = 0; role < KVM_TEAM_ROLES; role++) kvm_template_free(x.tm[role]);
    kvm_prepared_free(x.p);
    kvm_comm_free(x.c);
    return rc;
}
