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
    o->workload = KVM_WL_TEAM;
    kvm_kvcomm_config_default(&o->cfg);
}

/* ==== the workloads (team.h) ============================================================================== */

typedef struct wl_desc {
    const char *name;
    int task;                            /* minitasks task of the items */
    int n_roles;
    const char *agent[KVM_TEAM_ROLES];   /* agent (template) names */
    int mt_role[KVM_TEAM_ROLES];         /* minitasks role of each agent: its system prompt and expected answer */
} wl_desc_t;

static const wl_desc_t WL[KVM_WL_N] = {
    [KVM_WL_TEAM] = {"team", KVM_MT_TEAM, 4, {"finder", "checker", "reverser", "neighbour"}, {0, 1, 2, 3}},
    [KVM_WL_PIPELINE] = {"pipeline", KVM_MT_TEAM, 2, {"extractor", "answerer"}, {0, 2}},
    [KVM_WL_REVISE] = {"revise", KVM_MT_ARITH, 2, {"solver", "reviser"}, {0, 0}},
    [KVM_WL_ARITH] = {"arith", KVM_MT_ARITH, 2, {"result", "reverse"}, {0, 1}},
};

const char *kvm_team_workload_name(int w) { return w >= 0 && w < KVM_WL_N ? WL[w].name : NULL; }

int kvm_team_workload_from_name(const char *name) {
    for (int w = 0; name && w < KVM_WL_N; w++)
        if (!strcmp(name, WL[w].name)) return w;
    return -1;
}

int kvm_team_n_roles(int w) { return w >= 0 && w < KVM_WL_N ? WL[w].n_roles : 0; }

const char *kvm_team_role_name(int w, int role) {
    return w >= 0 && w < KVM_WL_N && role >= 0 && role < WL[w].n_roles ? WL[w].agent[role] : NULL;
}

/* The pieces of agent `role`'s template in workload w (team.h); returns their count. */
static int wl_pieces(int w, int role, kvm_piece_t *pc) {
    int n = 0;
    if (w == KVM_WL_PIPELINE) {
        pc[n++] = (kvm_piece_t){.kind = KVM_PIECE_PLACEHOLDER, .text = "tool:facts"};
        pc[n++] = (kvm_piece_t){.kind = KVM_PIECE_TEXT, .text = "\nAsk: "};
        pc[n++] = (kvm_piece_t){.kind = KVM_PIECE_PLACEHOLDER, .text = "state:input.name"};
    } else {
        pc[n++] = (kvm_piece_t){.kind = KVM_PIECE_PLACEHOLDER, .text = "input"};
    }
    if (role > 0 && (w == KVM_WL_TEAM || w == KVM_WL_PIPELINE)) {
        pc[n++] = (kvm_piece_t){.kind = KVM_PIECE_TEXT, .text = "\nFinder: "};
        pc[n++] = (kvm_piece_t){.kind = KVM_PIECE_PLACEHOLDER,
                                .text = w == KVM_WL_TEAM ? "agent:finder:current" : "agent:extractor:current"};
    }
    return n;
}

/* The expected answer of agent `role` (item it[role]; fout = the first agent's actual output) into ans. */
static void wl_expected(int w, int role, const kvm_mt_item_t *it, const char *fout, char *ans, size_t cap) {
    if (w == KVM_WL_TEAM && role == 1) snprintf(ans, cap, "%s", !strcmp(fout, it[0].answer) ? "yes" : "no");
    else if ((w == KVM_WL_TEAM && role == 2) || (w == KVM_WL_PIPELINE && role == 1)) kvm_mt_reverse_str(fout, ans, cap);
    else snprintf(ans, cap, "%s", it[role].answer);
}

double kvm_team_accuracy_except(const kvm_team_result_t *r, unsigned skip_mask) {
    int c = 0, t = 0;
    for (int k = 0; k < KVM_TEAM_ROLES; k++)
        if (!(skip_mask >> k & 1)) c += r->correct[k], t += r->total[k];
    return t ? 100.0 * c / t : 0;
}

unsigned kvm_team_degenerate_roles(const kvm_team_result_t *d, char (*why)[96]) {
    unsigned mask = 0;
    const int R = d->n_roles > 0 ? d->n_roles : KVM_TEAM_ROLES, nq = (d->n_outputs + KVM_TEAM_ROLES - 1) / KVM_TEAM_ROLES;
    for (int k = 0; k < R; k++) {
        if (why) why[k][0] = 0;
        if (!d->total[k]) continue;
        bool same = nq > 1;
        for (int q = 1; same && q < nq; q++) same = !strcmp(d->outputs[(size_t)q * KVM_TEAM_ROLES + k], d->outputs[k]);
        const double acc = 100.0 * d->correct[k] / d->total[k];
        if (acc > 0 && !same) continue;
        mask |= 1u << k;
        if (why) {
            if (same) snprintf(why[k], 96, "dense %.1f%%, always '%.40s'", acc, d->outputs[k]);
            else snprintf(why[k], 96, "dense %.1f%%", acc);
        }
    }
    return mask;
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
    wl_expected(o->workload, role, it, fout, sc.answer, sizeof sc.answer);
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
    r->guard_checked += rp->guard > 0;
    r->guard_dense += rp->guard == 2;
    r->guard_late += rp->guard == 3;
    r->guard_tokens += (uint64_t)rp->guard_tokens;
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

/* The shared segments of one request: the input ones and the first agent's response. */
typedef struct team_segs {
    kvm_binding_t in[2];   /* name -> segment: {input}, or {tool:facts} and {state:input.name} */
    int n_in;
    kvm_segment_t *first;  /* the first agent's response segment */
    char first_name[64];   /* its placeholder, "agent:NAME:current" */
} team_segs_t;

/* Runs agent `role` of request q: prepares its prompt (the request's segments and the first agent's response
 * bound), generates greedily, completes (the first agent's response segment into sg->first), scores. fout holds
 * the first agent's output. */
static int team_agent(team_ctx_t *x, kvm_comm_request_t *rq, int q, int role, const kvm_mt_item_t *it,
                      team_segs_t *sg, char *fout, size_t fout_cap, kvm_team_result_t *r) {
    const kvm_team_opts_t *o = x->o;
    const char *first = WL[o->workload].agent[0];
    kvm_piece_t pc[8];
    kvm_binding_t b[8];
    int nb = 0;
    const int np = wl_pieces(o->workload, role, pc);
    for (int i = 0; i < np; i++) {
        if (pc[i].kind != KVM_PIECE_PLACEHOLDER) continue;
        if (!strcmp(pc[i].text, sg->first_name)) {
            if (!sg->first) { /* the first agent produced nothing with KV: fall back to its text */
                int rc = kvm_comm_segment_text(x->c, KVM_PRODUCER_AGENT, first, fout[0] ? fout : "?",
                                               strlen(fout[0] ? fout : "?"), &sg->first);
                if (rc) return rc;
            }
            b[nb++] = (kvm_binding_t){sg->first_name, sg->first};
        }
        for (int k = 0; k < sg->n_in; k++)
            if (!strcmp(pc[i].text, sg->in[k].name)) b[nb++] = sg->in[k];
    }
    kvm_prompt_t pr = {.tmpl = x->tm[role], .bindings = b, .n_bindings = nb, .policy = o->policy};
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
    if (!rc) rc = kvm_comm_complete(rq, p, &gr, role == 0 ? &sg->first : NULL);
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

/* One request: the input segments, then the agents in order. */
static int team_request(team_ctx_t *x, int q, kvm_team_result_t *r) {
    const wl_desc_t *wd = &WL[x->o->workload];
    kvm_mt_item_t it[KVM_TEAM_ROLES];
    int rc = 0;
    for (int role = 0; role < wd->n_roles && !rc; role++)
        rc = kvm_mt_make(&it[role], wd->task, KVM_MT_EVAL, x->o->seed, (uint64_t)q, wd->mt_role[role]);
    if (rc) return rc;
    kvm_comm_request_t *rq = kvm_comm_request_begin(x->c, (uint64_t)q + 1);
    if (!rq) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    team_segs_t sg = {0};
    snprintf(sg.first_name, sizeof sg.first_name, "agent:%s:current", wd->agent[0]);
    if (x->o->workload == KVM_WL_PIPELINE) { /* the retriever's facts (a tool result) and the asked name (an input) */
        const char *u = it[0].user, *ask = strstr(u, "\nAsk: ");
        if (!ask) rc = kvm_seterr(KVM_EINTERNAL, "pipeline workload: item %s has no 'Ask:' line", it[0].id);
        sg.in[0].name = "tool:facts", sg.in[1].name = "state:input.name", sg.n_in = 2;
        if (!rc) rc = kvm_comm_segment_text(x->c, KVM_PRODUCER_TOOL, "tool:facts", u, (size_t)(ask - u), &sg.in[0].seg);
        if (!rc) rc = kvm_comm_segment_text(x->c, KVM_PRODUCER_INPUT, "state:input.name", ask + 6, strlen(ask + 6), &sg.in[1].seg);
    } else {
        sg.in[0].name = "input", sg.n_in = 1;
        rc = kvm_comm_segment_text(x->c, KVM_PRODUCER_INPUT, "input", it[0].user, strlen(it[0].user), &sg.in[0].seg);
    }
    char fout[64] = "";
    for (int role = 0; role < wd->n_roles && !rc; role++) rc = team_agent(x, rq, q, role, it, &sg, fout, sizeof fout, r);
    if (!rc) rc = kvm_comm_request_end(rq);
    else kvm_comm_request_abort(rq);
    for (int k = 0; k < sg.n_in; k++) kvm_segment_release(sg.in[k].seg);
    kvm_segment_release(sg.first);
    return rc;
}

int kvm_team_run(kvm_model_t *m, const kvm_team_opts_t *o, const kvm_team_result_t *dense_ref, kvm_team_result_t *r) {
    memset(r, 0, sizeof *r);
    kvm_model_info_t mi;
    kvm_model_info(m, &mi);
    if (!kvm_model_tokenizer(m)) return kvm_seterr(KVM_EINVAL, "team workload: model %s has no tokenizer", mi.name);
    if (o->requests <= 0) return kvm_seterr(KVM_EINVAL, "team workload: no requests");
    if (o->workload < 0 || o->workload >= KVM_WL_N) return kvm_seterr(KVM_EINVAL, "team workload: unknown workload %d", o->workload);
    kvm_comm_opts_t co = {.kv_budget_bytes = o->kv_budget_bytes, .kvcomm = o->cfg, .kvcomm_set = true};
    team_ctx_t x = {.m = m, .c = kvm_comm_create(m, &co), .o = o, .dense_ref = dense_ref};
    if (!x.c) return kvm_errcode() ? kvm_errcode() : KVM_EINTERNAL;
    if (o->oracle_select) kvm_comm_set_oracle_selection(x.c, o->oracle_select);
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
    const wl_desc_t *wd = &WL[o->workload];
    r->workload = o->workload, r->n_roles = wd->n_roles;
    for (int role = 0; role < wd->n_roles && !rc; role++) {
        kvm_piece_t pc[8];
        kvm_template_desc_t d = {.agent = wd->agent[role],
                                 .system = kvm_mt_role_system(wd->task, wd->mt_role[role]),
                                 .pieces = pc,
                                 .n_pieces = wl_pieces(o->workload, role, pc)};
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
            fprintf(stderr, "%s%s: %d/%d requests, %.0f s%s", tty ? "\r" : "", WL[o->workload].name, q + 1, o->requests, now - t0,
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
