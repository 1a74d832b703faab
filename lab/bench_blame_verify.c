/* bench_blame_verify.c - `kvmesh bench blame --verify`: blame confirmed by counterfactual replay, on errors injected
 * into real runs (docs/correct.md).
 *
 * For each workflow and seed: a traced run on the bundled model (or --mock); a run that ends ok with a score above 0
 * gets one agent output at a random step replaced (the kinds of bench_blame.c: a fabricated number, a line of the
 * task, a premature final answer, an empty answer) by a replay (kvm_run_params_t.replay), so the steps after it see
 * the corrupted output; a replay whose score is then lower is an injected failure whose decisive step is known, and
 * a replay of it passes when it gets the old score back. Blame reads its
 * trace (no replay; with an empty cache, and with a warm one holding the other injected failures, leave-one-out);
 * kvm_blame_verify replays the candidates within the budget. Scored strictly (exact step, exact agent), beside the
 * random guess and the most active agent. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <kvmesh.h>
#include <kvmesh_lab.h>

#include "bench.h"
#include "json_out.h"

typedef struct vcase {
    kvm_failure_t *f;   /* the injected run's trace as a failure, gold set */
    char dir[512];      /* the injected run's trace */
    int workflow;
    double pass;        /* the score a run must reach to pass: the run's own before the injection */
} vcase_t;

typedef struct vscore {
    int n, agent, step, replays, confirmed;
} vscore_t;

static void vscore_add(vscore_t *s, const kvm_failure_t *f, int step, const char *agent) {
    char gold[64], got[64];
    kvm_agent_normalize(f->gold_agent, gold, sizeof gold);
    kvm_agent_normalize(agent, got, sizeof got);
    s->n++;
    s->step += step == f->gold_step;
    s->agent += !strcmp(gold, got);
}

/* Run r's score (1 without a scorer), or -1 when it did not end ok. */
static double run_score(kvm_workflow_t *wf, kvm_run_t *r) {
    double s = 0;
    if (kvm_run_status(r, NULL) != 0) return -1;
    return !kvm_workflow_has_score(wf) ? 1.0 : kvm_run_score(r, &s) == 1 ? s : -1;
}

/* Runs workflow `path` `runs` times; injects an error into each run that ended ok with a score above 0; appends
 * those whose score the error lowered to cs (the run then passes again when it reaches its old score). */
static int make_cases(kvm_runtime_t *rt, const char *path, int w, int runs, uint64_t seed, kvm_rng_t *rng, vcase_t *cs, int *n,
                      int *n_base_pass, int *n_masked) {
    kvm_workflow_t *wf = kvm_workflow_load(rt, path, NULL);
    if (!wf) return -1;
    int rc = 0;
    for (int i = 0; !rc && i < runs; i++) {
        kvm_run_params_t p = kvm_run_default_params();
        p.seed = seed + (uint64_t)i;
        p.from_dataset = kvm_workflow_has_dataset(wf);
        kvm_run_t *base = kvm_run_start(wf, &p);
        if (!base || kvm_workflow_drive(wf) < 0) {
            rc = -1;
            break;
        }
        double bscore = run_score(wf, base);
        if (bscore <= 0 || !kvm_run_trace_dir(base)) continue;
        (*n_base_pass)++;
        char bdir[512];
        snprintf(bdir, sizeof bdir, "%s", kvm_run_trace_dir(base));
        kvm_failure_t *bf = kvm_failure_from_trace(bdir);
        if (!bf) {
            rc = -1;
            break;
        }
        int elig[256], m = 0;
        for (int t = 1; t < bf->n_steps && m < 256; t++)
            if (!bf->steps[t].tool_result && !bf->steps[t].error) elig[m++] = t;
        int t = m ? elig[kvm_rng_below(rng, (uint64_t)m)] : -1, kind = (int)kvm_rng_below(rng, 4);
        char text[512], agent[64] = "";
        int occ = 0; /* step t is the occ-th step of its agent (steps of one super-step are traced as they end, so the
                        injected run, whose step t ends at once, may order them otherwise; an agent's own stay in order) */
        if (t > 0) {
            lab_blame_corrupt(rng, bf, t, kind, text, sizeof text);
            if (!strcmp(text, bf->steps[t].content)) snprintf(text, sizeof text, "The answer is %d.", 10000 + (int)kvm_rng_below(rng, 90000));
            snprintf(agent, sizeof agent, "%s", bf->steps[t].agent);
            for (int s = 1; s < t; s++) occ += !strcmp(bf->steps[s].agent, agent);
        }
        kvm_failure_free(bf);
        if (t < 0) continue;
        kvm_run_params_t ip = kvm_run_default_params();
        ip.resume_trace = bdir;
        ip.replay = true;
        ip.replay_step = t - 1;
        ip.replay_output = text;
        kvm_run_t *inj = kvm_run_start(wf, &ip);
        if (!inj || kvm_workflow_drive(wf) < 0) {
            rc = -1;
            break;
        }
        if (run_score(wf, inj) >= bscore || !kvm_run_trace_dir(inj)) {
            (*n_masked)++; /* the corruption did not make the run fail */
            continue;
        }
        vcase_t *c = &cs[*n];
        snprintf(c->dir, sizeof c->dir, "%s", kvm_run_trace_dir(inj));
        if (!(c->f = kvm_failure_from_trace(c->dir))) {
            rc = -1;
            break;
        }
        c->f->gold_step = -1;
        for (int s = 1, k = 0; s < c->f->n_steps && c->f->gold_step < 0; s++)
            if (!strcmp(c->f->steps[s].agent, agent) && k++ == occ) c->f->gold_step = s;
        if (c->f->gold_step < 0 || strcmp(c->f->steps[c->f->gold_step].content, text)) {
            fprintf(stderr, "kvmesh bench blame: %s: the injected step is not where it was put; skipped\n", c->dir);
            kvm_failure_free(c->f);
            continue;
        }
        c->f->gold_agent = c->f->steps[c->f->gold_step].agent;
        c->f->family = NULL;
        c->workflow = w;
        c->pass = bscore;
        (*n)++;
    }
    kvm_workflow_free(wf);
    return rc;
}

static void vrow(cJSON *arr, const char *name, double agent, double step, int n, double replays, bool verbose) {
    if (verbose) {
        printf("  %-48s %6.1f %6.1f", name, agent, step);
        if (replays >= 0) printf("  %8.2f", replays);
        else printf("  %8s", "-");
        printf("   (n=%d)\n", n);
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "method", name);
    lab_json_num_t nums[] = {{"n", n}, {"agent_pct", agent}, {"step_pct", step}, {"replays_per_run", replays}};
    lab_json_add_nums(o, nums, sizeof nums / sizeof *nums);
    cJSON_AddItemToArray(arr, o);
}

int lab_bench_blame_verify(kvm_lab_params_fn fill, bool mock, const char *model, const char *list, int runs, uint64_t seed, int budget,
                           cJSON *out) {
    char root[] = "/tmp/kvmesh-bench-verify-XXXXXX";
    if (!mkdtemp(root)) {
        fprintf(stderr, "kvmesh bench blame: cannot make a temporary folder\n");
        return -1;
    }
    kvm_runtime_t *rt = lab_blame_runtime(fill, mock, model, root);
    char paths[8][512];
    int n_wf = lab_split_list(list, paths);
    vcase_t *cs = calloc((size_t)(n_wf * runs + 1), sizeof *cs);
    kvm_rng_t rng;
    kvm_rng_seed(&rng, seed);
    int n = 0, rc = rt && cs ? 0 : -1;
    for (int w = 0; !rc && w < n_wf; w++) {
        int before = n, pass = 0, masked = 0;
        rc = make_cases(rt, paths[w], w, runs, seed * 1000 + 7, &rng, cs, &n, &pass, &masked);
        if (rc) fprintf(stderr, "kvmesh bench blame: %s: %s\n", paths[w], kvm_errmsg());
        else
            printf("  %s: %d runs, %d scored above 0, %d injected errors lowered the score (%d did not)\n", paths[w], runs, pass, n - before,
                   masked);
    }
    /* blame without replay (empty cache; warm: the other failures, labelled), and verified */
    kvm_schema_cache_t *warm = rc ? NULL : kvm_schema_cache_open(NULL, NULL);
    for (int i = 0; warm && i < n; i++)
        if (kvm_schema_cache_insert(warm, cs[i].f, true) < 0) rc = -1;
    vscore_t prior = {0}, empty = {0}, warmed = {0}, v_empty = {0}, v_warm = {0};
    double rnd_a = 0, rnd_s = 0;
    int per_n[8] = {0}, per_ok[2][8] = {{0}}; /* per workflow: failures, verified steps right (empty, warm cache) */
    kvm_blame_params_t bp = kvm_blame_default_params();
    bp.count_hit = false;
    kvm_verify_params_t vp = kvm_verify_default_params();
    vp.budget = budget;
    for (int i = 0; !rc && i < n; i++) {
        const kvm_failure_t *f = cs[i].f;
        kvm_blame_t b, bw;
        bp.method = KVM_BLAME_PRIOR;
        rc |= kvm_blame(NULL, f, &bp, &b);
        vscore_add(&prior, f, b.step, b.agent);
        bp.method = KVM_BLAME_TRIAGE;
        rc |= kvm_blame(NULL, f, &bp, &b);
        vscore_add(&empty, f, b.step, b.agent);
        rc |= kvm_blame(warm, f, &bp, &bw);
        vscore_add(&warmed, f, bw.step, bw.agent);
        char names[64][64];
        int k = 0;
        for (int t = 0; t < f->n_steps && k < 64; t++) { /* the random guess: uniform over agents, and over steps */
            char x[64];
            kvm_agent_normalize(f->steps[t].agent, x, sizeof x);
            bool seen = false;
            for (int j = 0; j < k; j++) seen |= !strcmp(names[j], x);
            if (!seen) snprintf(names[k++], 64, "%s", x);
        }
        rnd_a += k ? 1.0 / k : 0;
        rnd_s += 1.0 / f->n_steps;
        per_n[cs[i].workflow]++;
        for (int c = 0; !rc && c < 2; c++) {
            const kvm_blame_t *x = c ? &bw : &b;
            vscore_t *s = c ? &v_warm : &v_empty;
            kvm_verify_t v;
            vp.pass_score = cs[i].pass;
            if (kvm_blame_verify(rt, NULL, cs[i].dir, f, x, &vp, &v)) {
                fprintf(stderr, "kvmesh bench blame: %s\n", kvm_errmsg());
                rc = -1;
                break;
            }
            s->replays += v.n_replays;
            s->confirmed += v.step >= 0;
            int got = v.step >= 0 ? v.step : x->step;
            if (v.step >= 0) vscore_add(s, f, v.step, v.agent); /* confirmed */
            else vscore_add(s, f, x->step, x->agent);           /* nothing flipped the run: blame's answer */
            per_ok[c][cs[i].workflow] += got == f->gold_step;
        }
        if ((i + 1) % 50 == 0) fprintf(stderr, "  ... %d of %d verified\n", i + 1, n);
    }
    if (!rc && n > 0) {
        printf("blame verified by replay: %d failures injected into real runs of %d workflows (%s model), budget %d; %%\n"
               "  %-48s %6s %6s  %8s\n", n, n_wf, mock ? "mock" : "bundled", budget, "method", "agent", "step", "replays");
        cJSON *arr = cJSON_AddArrayToObject(out, "rows");
        vrow(arr, "random guess (expected)", 100 * rnd_a / n, 100 * rnd_s / n, n, -1, true);
        const struct { const char *name; const vscore_t *s; bool v; } rows[] = {
            {"prior: most active agent, its first step", &prior, false}, {"triage, empty cache (no replay)", &empty, false},
            {"triage, warm cache (no replay, leave-one-out)", &warmed, false}, {"--verify, empty cache", &v_empty, true},
            {"--verify, warm cache (leave-one-out)", &v_warm, true}};
        for (size_t i = 0; i < sizeof rows / sizeof *rows; i++)
            vrow(arr, rows[i].name, 100.0 * rows[i].s->agent / n, 100.0 * rows[i].s->step / n, n,
                 rows[i].v ? (double)rows[i].s->replays / n : -1, true);
        printf("  confirmed by a replay: %d of %d (empty cache), %d of %d (warm)\n", v_empty.confirmed, n, v_warm.confirmed, n);
        cJSON *per = cJSON_AddArrayToObject(out, "per_workflow");
        for (int w = 0; w < n_wf; w++) {
            printf("  --verify step right, %s: %d of %d (empty cache), %d (warm)\n", paths[w], per_ok[0][w], per_n[w], per_ok[1][w]);
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "workflow", paths[w]);
            lab_json_num_t pn[] = {{"failures", per_n[w]}, {"verify_step_right_empty", per_ok[0][w]}, {"verify_step_right_warm", per_ok[1][w]}};
            lab_json_add_nums(o, pn, sizeof pn / sizeof *pn);
            cJSON_AddItemToArray(per, o);
        }
        lab_json_num_t nums[] = {{"failures", n}, {"budget", budget}, {"confirmed_empty", v_empty.confirmed}, {"confirmed_warm", v_warm.confirmed}};
        lab_json_add_nums(out, nums, sizeof nums / sizeof *nums);
    }
    kvm_schema_cache_free(warm);
    for (int i = 0; i < n; i++) kvm_failure_free(cs[i].f);
    free(cs);
    kvm_runtime_free(rt);
    lab_rm_tree(root);
    return rc;
}
