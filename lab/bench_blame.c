/* bench_blame.c - `kvmesh bench blame`: failure attribution (docs/correct.md).
 *
 * 1. Who&When Algorithm-Generated (../shared/data/whowhen/Algorithm-Generated, Zhang et al., ICML 2025), leave-
 *    one-out over a bulk-loaded cache, no LLM: agent and step accuracy (strict equality, 0-based steps) of the
 *    prior, of label transfer from each retriever (correct.md §9.3) and of the triage with an empty and a warm
 *    cache, beside the expected accuracy of a random guess.
 * 2. Error injection into real runs: the bundled workflows (team, pipeline, revise) run on the bundled model (or
 *    --mock), traced; in each trace one agent output at a random step is corrupted (a fabricated number, a
 *    plausible but wrong line copied from the task, a premature final answer, an empty answer); blame over the
 *    corrupted trace, leave-one-out against a cache of the other corrupted runs, beside the baselines.
 * 3. Error injection: synthetic multi-agent failures in which one agent's output at a random step is corrupted
 *    (a fabricated number, a failed tool call, a premature final answer: the kinds CORRECT injects), three
 *    workflows; blame's step / agent accuracy with an empty and a warm cache beside random and "most active
 *    agent" baselines.
 * 4. Query latency at --entries schemata (default 10,000) on one thread: kvm_blame (signature + retrieval +
 *    triage) per query, on the LSH path (the default) and scoring every entry. */
#include <ctype.h>
#include <dirent.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <kvmesh.h>
#include <kvmesh_lab.h>

#include "bench.h"
#include "json_out.h"

/* ---- Who&When -------------------------------------------------------------------------------------------- */

typedef struct ww_trace {
    int file_no;
    cJSON *doc;                /* owns the strings */
    kvm_failure_step_t *steps;
    kvm_failure_t f;
} ww_trace_t;

static bool is_executor(const char *name) {
    return !strcmp(name, "Computer_terminal") || !strcmp(name, "CodeExecutor") || !strcmp(name, "ComputerTerminal");
}

static const char *jstr(const cJSON *o, const char *k) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(j) ? j->valuestring : NULL;
}

/* One Who&When AG file; false (said) when malformed. */
static bool ww_load(const char *path, int file_no, ww_trace_t *t) {
    memset(t, 0, sizeof *t);
    t->file_no = file_no;
    FILE *f = fopen(path, "rb");
    if (!f) return false;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = n > 0 && n < (64L << 20) ? malloc((size_t)n + 1) : NULL;
    bool ok = buf && fread(buf, 1, (size_t)n, f) == (size_t)n;
    fclose(f);
    if (ok) buf[n] = '\0', t->doc = cJSON_Parse(buf);
    free(buf);
    const cJSON *h = t->doc ? cJSON_GetObjectItemCaseSensitive(t->doc, "history") : NULL;
    const char *step = t->doc ? jstr(t->doc, "mistake_step") : NULL;
    int n_steps = cJSON_GetArraySize(h);
    if (!cJSON_IsArray(h) || n_steps < 1 || !step || !jstr(t->doc, "mistake_agent")) {
        fprintf(stderr, "kvmesh bench blame: %s: not a Who&When Algorithm-Generated log; skipped\n", path);
        cJSON_Delete(t->doc);
        t->doc = NULL;
        return false;
    }
    t->steps = calloc((size_t)n_steps, sizeof *t->steps);
    int i = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, h) {
        const char *name = jstr(m, "name");
        t->steps[i].agent = name ? name : "";
        t->steps[i].content = jstr(m, "content") ? jstr(m, "content") : "";
        t->steps[i].tool_result = name && is_executor(name);
        i++;
    }
    t->f = (kvm_failure_t){.id = jstr(t->doc, "question_ID"), .family = jstr(t->doc, "question_ID"),
                           .question = jstr(t->doc, "question"), .steps = t->steps, .n_steps = n_steps,
                           .gold_agent = jstr(t->doc, "mistake_agent"), .gold_step = atoi(step)};
    return true;
}

static int int_cmp(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

/* The AG logs of dir, in file-number order; returns how many (0: none, said). */
static int ww_load_dir(const char *dir, ww_trace_t **out) {
    *out = NULL;
    DIR *d = opendir(dir);
    if (!d) return 0;
    int nums[4096], n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 4096) {
        char *end = NULL;
        long v = strtol(e->d_name, &end, 10);
        if (end != e->d_name && !strcmp(end, ".json")) nums[n++] = (int)v;
    }
    closedir(d);
    qsort(nums, (size_t)n, sizeof *nums, int_cmp);
    ww_trace_t *t = calloc((size_t)(n ? n : 1), sizeof *t);
    int m = 0;
    for (int i = 0; i < n; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%d.json", dir, nums[i]);
        if (ww_load(path, nums[i], &t[m])) m++;
    }
    *out = t;
    return m;
}

static void ww_free(ww_trace_t *t, int n) {
    for (int i = 0; i < n; i++) {
        cJSON_Delete(t[i].doc);
        free(t[i].steps);
    }
    free(t);
}

typedef struct score {
    int n, agent, step, step1;
} score_t;

static void score_add(score_t *s, const kvm_failure_t *f, const kvm_blame_t *b) {
    char gold[64];
    kvm_agent_normalize(f->gold_agent, gold, sizeof gold);
    s->n++;
    s->agent += !strcmp(gold, b->agent);
    s->step += b->step == f->gold_step;
    s->step1 += b->step >= 0 && abs(b->step - f->gold_step) <= 1;
}

static void row(cJSON *arr, const char *name, const score_t *s, bool verbose) {
    double a = s->n ? 100.0 * s->agent / s->n : 0, st = s->n ? 100.0 * s->step / s->n : 0,
           st1 = s->n ? 100.0 * s->step1 / s->n : 0;
    if (verbose) printf("  %-44s %6.1f %6.1f %8.1f   (n=%d)\n", name, a, st, st1, s->n);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "method", name);
    lab_json_num_t nums[] = {{"n", s->n}, {"agent_pct", a}, {"step_pct", st}, {"step_pm1_pct", st1}};
    lab_json_add_nums(o, nums, sizeof nums / sizeof *nums);
    cJSON_AddItemToArray(arr, o);
}

/* Leave-one-out over traces[n] with one method; the cache bulk-loaded with every trace (no LOO leak: the query's
 * own entry and its family are excluded by kvm_blame). tfidf_max_terms < 0: no cache (an empty one). */
static int loo(const kvm_failure_t *const *fs, int n, kvm_blame_method_t m, kvm_blame_retriever_t r, int max_terms,
               score_t *s) {
    memset(s, 0, sizeof *s);
    kvm_schema_cache_t *c = NULL;
    if (max_terms >= 0) {
        kvm_schema_cache_params_t cp = kvm_schema_cache_default_params();
        cp.tfidf_max_terms = max_terms;
        if (!(c = kvm_schema_cache_open(NULL, &cp))) return -1;
        for (int i = 0; i < n; i++)
            if (kvm_schema_cache_insert(c, fs[i], true) < 0) {
                kvm_schema_cache_free(c);
                return -1;
            }
    }
    kvm_blame_params_t p = kvm_blame_default_params();
    p.method = m;
    p.retriever = r;
    p.count_hit = false;
    int rc = 0;
    for (int i = 0; !rc && i < n; i++) {
        kvm_blame_t b;
        rc = kvm_blame(c, fs[i], &p, &b);
        if (!rc) score_add(s, fs[i], &b);
    }
    kvm_schema_cache_free(c);
    return rc;
}

/* The expected accuracy of a uniform guess of agent (among the trace's agents) and step. */
static void random_row(const kvm_failure_t *const *fs, int n, cJSON *arr, bool verbose) {
    double a = 0, st = 0, st1 = 0;
    for (int i = 0; i < n; i++) {
        const kvm_failure_t *f = fs[i];
        char names[64][64];
        int k = 0;
        for (int t = 0; t < f->n_steps && k < 64; t++) {
            char x[64];
            kvm_agent_normalize(f->steps[t].agent, x, sizeof x);
            bool seen = false;
            for (int j = 0; j < k; j++) seen |= !strcmp(names[j], x);
            if (!seen) snprintf(names[k++], 64, "%s", x);
        }
        a += k ? 1.0 / k : 0;
        st += 1.0 / f->n_steps;
        int lo = f->gold_step > 0 ? f->gold_step - 1 : 0, hi = f->gold_step + 1 < f->n_steps ? f->gold_step + 1 : f->n_steps - 1;
        st1 += (double)(hi - lo + 1) / f->n_steps;
    }
    if (verbose)
        printf("  %-44s %6.1f %6.1f %8.1f   (expected)\n", "random guess", 100 * a / n, 100 * st / n, 100 * st1 / n);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "method", "random guess (expected)");
    lab_json_num_t nums[] = {{"n", n}, {"agent_pct", 100 * a / n}, {"step_pct", 100 * st / n}, {"step_pm1_pct", 100 * st1 / n}};
    lab_json_add_nums(o, nums, sizeof nums / sizeof *nums);
    cJSON_AddItemToArray(arr, o);
}

typedef struct method_row {
    const char *name;
    kvm_blame_method_t m;
    kvm_blame_retriever_t r;
    int max_terms; /* -1: no cache */
} method_row_t;

static const method_row_t rows[] = {
    {"prior: most active agent, its first step", KVM_BLAME_PRIOR, KVM_RETRIEVE_COMBINED, -1},
    {"knn, TF-IDF (512/256 term cuts)", KVM_BLAME_KNN, KVM_RETRIEVE_TFIDF, 512},
    {"knn, TF-IDF (no term cuts)", KVM_BLAME_KNN, KVM_RETRIEVE_TFIDF, 0},
    {"knn, MinHash", KVM_BLAME_KNN, KVM_RETRIEVE_MINHASH, 512},
    {"knn, structural", KVM_BLAME_KNN, KVM_RETRIEVE_STRUCT, 512},
    {"knn, combined S", KVM_BLAME_KNN, KVM_RETRIEVE_COMBINED, 512},
    {"triage, empty cache", KVM_BLAME_TRIAGE, KVM_RETRIEVE_COMBINED, -1},
    {"triage, warm cache (leave-one-out)", KVM_BLAME_TRIAGE, KVM_RETRIEVE_COMBINED, 512},
};

static int eval_set(const char *title, const kvm_failure_t *const *fs, int n, cJSON *out, bool verbose) {
    if (verbose) printf("%s (%d failures; strict scorer, %%)\n  %-44s %6s %6s %8s\n", title, n, "method", "agent", "step", "step+-1");
    cJSON *arr = cJSON_AddArrayToObject(out, "rows");
    random_row(fs, n, arr, verbose);
    for (size_t i = 0; i < sizeof rows / sizeof *rows; i++) {
        score_t s;
        if (loo(fs, n, rows[i].m, rows[i].r, rows[i].max_terms, &s)) return -1;
        row(arr, rows[i].name, &s, verbose);
    }
    return 0;
}

/* ---- synthetic failures (error injection, query latency) ---------------------------------------------------- */

static const char *const words[] = {
    "the", "result", "data", "table", "value", "check", "compute", "file", "answer", "step", "plan", "search", "page",
    "total", "sum", "count", "list", "item", "price", "year", "city", "name", "report", "source", "query", "number",
    "verify", "load", "parse", "column", "row", "average", "find", "return", "output", "input", "function", "code",
    "run", "test", "next", "then", "so", "we", "need", "to", "get", "use", "from", "with", "for", "and", "is", "of"};
#define N_WORDS (int)(sizeof words / sizeof *words)

/* One synthetic workflow: its agents (the first is the planner) and which of them call tools. */
typedef struct synth_wf {
    const char *name;
    const char *agents[4];
    int n_agents;
    int n_steps;
} synth_wf_t;

static const synth_wf_t wfs[] = {
    {"team (planner, coder, executor, critic)", {"Planner", "Coder", "Computer_terminal", "Critic"}, 4, 10},
    {"research (orchestrator, websurfer, assistant)", {"Orchestrator", "WebSurfer", "Assistant"}, 3, 12},
    {"debate (proposer, opponent, judge)", {"Proposer", "Opponent", "Judge"}, 3, 8},
};

typedef struct synth {
    char *text[16];
    kvm_failure_step_t steps[16];
    char question[256];
    char id[32];
    kvm_failure_t f;
} synth_t;

static void words_into(kvm_rng_t *r, char *buf, size_t cap, int n, int vocab) {
    size_t k = 0;
    for (int i = 0; i < n && k + 32 < cap; i++) {
        int w = (int)kvm_rng_below(r, (uint64_t)vocab);
        if (w < N_WORDS) k += (size_t)snprintf(buf + k, cap - k, "%s ", words[w]);
        else { /* a rarer word: w spelt in letters (digits would all tokenize to "0") */
            for (int x = w; x > 0 && k + 2 < cap; x /= 26) buf[k++] = (char)('a' + x % 26);
            buf[k++] = ' ';
        }
    }
    buf[k] = '\0';
}

/* The kinds of injected error. */
enum { INJ_FABRICATE, INJ_TOOL_FAIL, INJ_PREMATURE, INJ_N };

/* A failure of workflow w with an error of kind kind injected at a random agent step; steps grounded otherwise.
 * vocab: how many distinct words texts draw from (larger: more diverse traces). */
static void synth_make(kvm_rng_t *r, const synth_wf_t *w, int kind, int serial, int vocab, synth_t *s) {
    memset(s, 0, sizeof *s);
    int n = w->n_steps;
    snprintf(s->question, sizeof s->question, "Task %d: find the total of the %s column for year 20%02d", serial,
             words[kvm_rng_below(r, N_WORDS)], (int)kvm_rng_below(r, 30));
    snprintf(s->id, sizeof s->id, "synth-%d", serial);
    /* the decisive step: an agent turn (not the executor), not the first */
    int gold;
    do gold = 1 + (int)kvm_rng_below(r, (uint64_t)(n - 2));
    while (!strcmp(w->agents[gold % w->n_agents], "Computer_terminal"));
    if (kind == INJ_TOOL_FAIL && strcmp(w->agents[(gold + 1) % w->n_agents], "Computer_terminal") != 0)
        kind = INJ_FABRICATE; /* a failed tool call needs the executor right after the decisive step */
    for (int t = 0; t < n; t++) {
        const char *agent = w->agents[t % w->n_agents];
        char buf[2048];
        words_into(r, buf, sizeof buf, 30 + (int)kvm_rng_below(r, 40), vocab);
        size_t k = strlen(buf);
        bool exec = !strcmp(agent, "Computer_terminal");
        if (t == gold && kind == INJ_FABRICATE)
            snprintf(buf + k, sizeof buf - k, " Let us assume the sample data gives a total of %d.", 1000 + (int)kvm_rng_below(r, 9000));
        else if (t == gold && kind == INJ_PREMATURE)
            snprintf(buf + k, sizeof buf - k, " The result is confirmed correct. Final Answer: done. TERMINATE");
        else if (t == gold + 1 && kind == INJ_TOOL_FAIL && exec)
            snprintf(buf + k, sizeof buf - k, "\nexitcode: 1 (execution failed)\nTraceback (most recent call last):\n  File \"/tmp/x%d.py\", "
                     "line %d\nKeyError: 'col_%d'", serial, 3 + (int)kvm_rng_below(r, 50), (int)kvm_rng_below(r, 9));
        else if (exec) snprintf(buf + k, sizeof buf - k, "\nexitcode: 0 (execution succeeded)");
        s->text[t] = strdup(buf);
        s->steps[t] = (kvm_failure_step_t){.agent = agent, .content = s->text[t], .tool_result = exec};
    }
    s->f = (kvm_failure_t){.id = s->id, .question = s->question, .steps = s->steps, .n_steps = n,
                           .gold_agent = w->agents[gold % w->n_agents], .gold_step = gold};
}

static void synth_free(synth_t *s) {
    for (int i = 0; i < 16; i++) free(s->text[i]);
}

/* Error injection: n failures per workflow; the cache is warmed with warm labelled failures first (0 = empty). */
static int injection(int n_per_wf, int warm, uint64_t seed, cJSON *out, bool verbose) {
    int n_wf = (int)(sizeof wfs / sizeof *wfs);
    if (verbose)
        printf("error injection (%d workflows x %d failures, one corrupted agent output each; %%)\n  %-44s %6s %6s %8s\n", n_wf,
               n_per_wf, "method", "agent", "step", "step+-1");
    kvm_rng_t r;
    kvm_rng_seed(&r, seed);
    kvm_schema_cache_t *c = kvm_schema_cache_open(NULL, NULL);
    if (!c) return -1;
    int serial = 0, rc = 0;
    for (int i = 0; !rc && i < warm; i++) { /* labelled past failures */
        synth_t s;
        synth_make(&r, &wfs[i % n_wf], (int)kvm_rng_below(&r, INJ_N), serial++, 400, &s);
        s.f.family = "warm";
        if (kvm_schema_cache_insert(c, &s.f, false) < 0) rc = -1;
        synth_free(&s);
    }
    score_t prior = {0}, empty = {0}, warmed = {0}, knn = {0};
    double rnd_agent = 0, rnd_step = 0;
    kvm_blame_params_t p = kvm_blame_default_params();
    p.count_hit = false;
    for (int w = 0; !rc && w < n_wf; w++)
        for (int i = 0; !rc && i < n_per_wf; i++) {
            synth_t s;
            synth_make(&r, &wfs[w], (int)kvm_rng_below(&r, INJ_N), serial++, 400, &s);
            kvm_blame_t b;
            p.method = KVM_BLAME_PRIOR;
            rc |= kvm_blame(NULL, &s.f, &p, &b);
            score_add(&prior, &s.f, &b);
            p.method = KVM_BLAME_TRIAGE;
            rc |= kvm_blame(NULL, &s.f, &p, &b);
            score_add(&empty, &s.f, &b);
            rc |= kvm_blame(c, &s.f, &p, &b);
            score_add(&warmed, &s.f, &b);
            p.method = KVM_BLAME_KNN;
            rc |= kvm_blame(c, &s.f, &p, &b);
            score_add(&knn, &s.f, &b);
            rnd_agent += 1.0 / wfs[w].n_agents;
            rnd_step += 1.0 / s.f.n_steps;
            synth_free(&s);
        }
    int n = n_wf * n_per_wf;
    if (verbose) printf("  %-44s %6.1f %6.1f %8s   (expected)\n", "random guess", 100 * rnd_agent / n, 100 * rnd_step / n, "-");
    cJSON *arr = cJSON_AddArrayToObject(out, "rows");
    row(arr, "prior: most active agent, its first step", &prior, verbose);
    row(arr, "triage, empty cache", &empty, verbose);
    char name[64];
    snprintf(name, sizeof name, "triage, warm cache (%d labelled)", warm);
    row(arr, name, &warmed, verbose);
    snprintf(name, sizeof name, "knn, warm cache (%d labelled)", warm);
    row(arr, name, &knn, verbose);
    lab_json_num_t nums[] = {{"random_agent_pct", 100 * rnd_agent / n}, {"random_step_pct", 100 * rnd_step / n}};
    lab_json_add_nums(out, nums, 2);
    kvm_schema_cache_free(c);
    return rc;
}


/* ---- error injection into traced runs of the bundled workflows ------------------------------------------------ */

static int rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

void lab_rm_tree(const char *root) { nftw(root, rm_one, 16, FTW_DEPTH | FTW_PHYS); }

/* A failure read from a run's trace with one agent output corrupted; the strings it points to are its own. */
typedef struct injected {
    kvm_failure_t *f;      /* from kvm_failure_from_trace */
    char *text;            /* the corrupted content (malloc) */
    char id[64];
} injected_t;

enum { RI_FABRICATE, RI_GROUNDED_WRONG, RI_PREMATURE, RI_EMPTY, RI_N };

void lab_blame_corrupt(kvm_rng_t *r, const kvm_failure_t *f, int t, int kind, char *buf, size_t cap) {
    if (kind == RI_FABRICATE) snprintf(buf, cap, "The answer is %d.", 10000 + (int)kvm_rng_below(r, 90000));
    else if (kind == RI_PREMATURE) snprintf(buf, cap, "%.200s\nFinal Answer: done. TERMINATE", f->steps[t].content);
    else if (kind == RI_EMPTY) buf[0] = '\0';
    else { /* a line of the task, plausible and grounded, but not the answer */
        const char *q = f->question ? f->question : "";
        int lines = 1;
        for (const char *p = q; *p; p++) lines += *p == '\n' || (p[0] == '\\' && p[1] == 'n');
        int want = (int)kvm_rng_below(r, (uint64_t)lines), k = 0;
        const char *b = q;
        for (const char *p = q; *p && k < want; p++)
            if (*p == '\n' || (p[0] == '\\' && p[1] == 'n')) k++, b = p + (*p == '\n' ? 1 : 2);
        size_t len = 0;
        while (b[len] && b[len] != '\n' && !(b[len] == '\\' && b[len + 1] == 'n') && len < 200) len++;
        snprintf(buf, cap, "%.*s", (int)len, b);
    }
}

/* Corrupts a random agent step of f (not the task, not a tool result); false when f has none. */
static bool inject(kvm_rng_t *r, injected_t *x, int workflow) {
    kvm_failure_t *f = x->f;
    int elig[256], n = 0;
    for (int t = 1; t < f->n_steps && n < 256; t++)
        if (!f->steps[t].tool_result) elig[n++] = t;
    if (!n) return false;
    int t = elig[kvm_rng_below(r, (uint64_t)n)], kind = (int)kvm_rng_below(r, RI_N);
    char buf[512];
    lab_blame_corrupt(r, f, t, kind, buf, sizeof buf);
    x->text = strdup(buf);
    ((kvm_failure_step_t *)f->steps)[t].content = x->text;
    f->gold_agent = f->steps[t].agent;
    f->gold_step = t;
    snprintf(x->id, sizeof x->id, "w%d-%s", workflow, f->id);
    f->id = x->id;
    f->family = NULL;
    return true;
}

kvm_runtime_t *lab_blame_runtime(kvm_lab_params_fn fill, bool mock, const char *model, const char *root) {
    kvm_runtime_params_t rp = kvm_runtime_default_params();
    rp.model.backend = NULL;
    rp.model_override = mock ? "mock:echo" : model;
    rp.trace_root = root;
    rp.quiet = true;
    rp.echo_print = false;
    kvm_runtime_t *rt = fill(&rp.model) == 0 ? kvm_runtime_create(&rp) : NULL;
    if (rt && kvm_lab_add_functions(rt)) kvm_runtime_free(rt), rt = NULL;
    return rt;
}

int lab_split_list(const char *list, char paths[8][512]) {
    int n = 0;
    for (const char *p = list; *p && n < 8;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        snprintf(paths[n++], 512, "%.*s", (int)len, p);
        p += len + (e ? 1 : 0);
    }
    return n;
}

/* Runs the workflow n times (seeds seed..seed+n-1, inputs from its dataset) with traces under root; reads each
 * trace back as a failure with one injected error into out[*n_out]. */
static int run_and_inject(kvm_lab_params_fn fill, bool mock, const char *model, const char *path, int n, uint64_t seed, const char *root,
                          kvm_rng_t *r, int workflow, injected_t *out, int *n_out) {
    kvm_runtime_t *rt = lab_blame_runtime(fill, mock, model, root);
    kvm_workflow_t *wf = rt ? kvm_workflow_load(rt, path, NULL) : NULL;
    int rc = wf ? 0 : -1;
    for (int i = 0; !rc && i < n; i++) {
        kvm_run_params_t p = kvm_run_default_params();
        p.seed = seed + (uint64_t)i;
        p.from_dataset = kvm_workflow_has_dataset(wf);
        if (!kvm_run_start(wf, &p) || kvm_workflow_drive(wf) < 0) rc = -1; /* one at a time: a small KV budget */
    }
    for (int i = 0; !rc && i < kvm_workflow_n_runs(wf); i++) {
        const char *dir = kvm_run_trace_dir(kvm_workflow_run(wf, i));
        injected_t *x = &out[*n_out];
        memset(x, 0, sizeof *x);
        if (!dir || !(x->f = kvm_failure_from_trace(dir))) continue;
        if (inject(r, x, workflow)) (*n_out)++;
        else kvm_failure_free(x->f);
    }
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
    return rc;
}

static int real_injection(kvm_lab_params_fn fill, bool mock, const char *model, const char *list, int runs, uint64_t seed, cJSON *out) {
    char root[] = "/tmp/kvmesh-bench-blame-XXXXXX";
    if (!mkdtemp(root)) return kvm_seterr(KVM_EIO, "bench blame: cannot make a temporary folder");
    char paths[8][512];
    int n_wf = lab_split_list(list, paths);
    injected_t *x = calloc((size_t)(n_wf * runs + 1), sizeof *x);
    int n = 0, rc = 0;
    kvm_rng_t r;
    kvm_rng_seed(&r, seed);
    for (int w = 0; !rc && w < n_wf; w++) {
        int before = n;
        rc = run_and_inject(fill, mock, model, paths[w], runs, seed * 1000 + 1, root, &r, w, x, &n);
        if (rc) fprintf(stderr, "kvmesh bench blame: %s: %s\n", paths[w], kvm_errmsg());
        else printf("  %s: %d traced runs, one error injected in each\n", paths[w], n - before);
    }
    lab_rm_tree(root);
    if (!rc && n) {
        const kvm_failure_t **fs = calloc((size_t)n, sizeof *fs);
        for (int i = 0; i < n; i++) fs[i] = x[i].f;
        char title[160];
        snprintf(title, sizeof title, "error injection into %d traced runs of %d workflows (%s model), leave-one-out", n, n_wf,
                 mock ? "mock" : "bundled");
        rc = eval_set(title, fs, n, out, true);
        free(fs);
    }
    for (int i = 0; i < n; i++) {
        kvm_failure_free(x[i].f);
        free(x[i].text);
    }
    free(x);
    return rc;
}

/* CPU time of the calling thread in ns: on a shared machine the wall clock also counts other processes. */
static uint64_t thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int dbl_cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Query latency at n_entries schemata; bruteforce: score every entry. */
static int latency(int n_entries, int n_queries, bool bruteforce, cJSON *out, bool verbose) {
    kvm_schema_cache_params_t cp = kvm_schema_cache_default_params();
    cp.max_entries = n_entries + 1;
    if (bruteforce) cp.bruteforce_max = n_entries + 1;
    kvm_schema_cache_t *c = kvm_schema_cache_open(NULL, &cp);
    if (!c) return -1;
    kvm_rng_t r;
    kvm_rng_seed(&r, 7);
    int rc = 0, n_wf = (int)(sizeof wfs / sizeof *wfs);
    uint64_t t0 = kvm_now_ns();
    for (int i = 0; !rc && i < n_entries; i++) {
        synth_t s;
        synth_make(&r, &wfs[i % n_wf], (int)kvm_rng_below(&r, INJ_N), i, 20000, &s);
        if (kvm_schema_cache_insert(c, &s.f, true) < 0) rc = -1;
        synth_free(&s);
    }
    double load_s = (double)(kvm_now_ns() - t0) / 1e9;
    double *ms = calloc((size_t)n_queries, sizeof *ms), *cpu = calloc((size_t)n_queries, sizeof *cpu);
    kvm_blame_params_t p = kvm_blame_default_params();
    p.count_hit = false;
    for (int i = 0; !rc && i < n_queries; i++) {
        synth_t s;
        synth_make(&r, &wfs[i % n_wf], (int)kvm_rng_below(&r, INJ_N), n_entries + i, 20000, &s);
        kvm_blame_t b;
        uint64_t q0 = kvm_now_ns(), c0 = thread_cpu_ns();
        rc = kvm_blame(c, &s.f, &p, &b);
        ms[i] = (double)(kvm_now_ns() - q0) / 1e6;
        cpu[i] = (double)(thread_cpu_ns() - c0) / 1e6;
        synth_free(&s);
    }
    if (!rc) {
        double sum = 0, csum = 0;
        for (int i = 0; i < n_queries; i++) sum += ms[i], csum += cpu[i];
        qsort(ms, (size_t)n_queries, sizeof *ms, dbl_cmp);
        qsort(cpu, (size_t)n_queries, sizeof *cpu, dbl_cmp);
        double mean = sum / n_queries, p50 = ms[n_queries / 2], p99 = ms[(int)(0.99 * (n_queries - 1))], mx = ms[n_queries - 1];
        double cmean = csum / n_queries, cp50 = cpu[n_queries / 2], cp99 = cpu[(int)(0.99 * (n_queries - 1))];
        kvm_schema_cache_stats_t st;
        kvm_schema_cache_stats(c, &st);
        if (verbose)
            printf("query latency, %d schemata (%.1f MB), %s, %d queries:\n"
                   "  thread CPU mean %.2f ms, p50 %.2f, p99 %.2f; wall mean %.2f ms, p50 %.2f, p99 %.2f, max %.2f (bulk load %.1f s)\n",
                   st.entries, st.bytes / 1e6, bruteforce ? "every entry scored" : "LSH + template candidates", n_queries, cmean,
                   cp50, cp99, mean, p50, p99, mx, load_s);
        lab_json_num_t nums[] = {{"entries", st.entries}, {"bytes", (double)st.bytes}, {"queries", n_queries},
                                 {"mean_ms", mean},      {"p50_ms", p50},              {"p99_ms", p99},
                                 {"max_ms", mx},         {"load_s", load_s},            {"cpu_mean_ms", cmean},
                                 {"cpu_p50_ms", cp50},   {"cpu_p99_ms", cp99}};
        lab_json_add_nums(out, nums, sizeof nums / sizeof *nums);
        cJSON_AddBoolToObject(out, "bruteforce", bruteforce);
    }
    free(ms);
    free(cpu);
    kvm_schema_cache_free(c);
    return rc;
}

/* ---- the command ------------------------------------------------------------------------------------------- */

static void help(FILE *f) {
    fprintf(f, "usage: kvmesh bench blame [--whowhen DIR] [--workflows A.lua,B.lua,...] [--runs N] [--mock]\n"
               "                          [--model PATH] [--inject N] [--warm N] [--entries N] [--queries N] [--seed S] [--json PATH]\n"
               "  --whowhen DIR  Who&When Algorithm-Generated logs (default ../shared/data/whowhen/Algorithm-Generated;\n"
               "                 skipped, said, when absent)\n"
               "  --workflows L  workflows run (traced) for error injection (default examples/team.lua,\n"
               "                 examples/pipeline.lua,examples/revise.lua), on the bundled model or --model / --mock\n"
               "  --runs N       runs per workflow, one error injected into each trace (default 70; 0 = skip)\n"
               "  --inject N     synthetic injected failures per workflow, 3 workflows (default 100; 0 = skip)\n"
               "  --warm N       labelled failures in the warm cache of the synthetic benchmark (default 300)\n"
               "  --entries N    schemata in the latency benchmark (default 10000; 0 = skip)\n"
               "  --queries N    queries timed (default 200)\n"
               "  --verify       instead of the above: errors injected into real runs of --workflows by replays (--runs\n"
               "                 runs each; those that pass get one agent output replaced), blamed without replay and\n"
               "                 with trace blame --verify (--budget replays per failure, default 3)\n");
}

int lab_bench_blame(int argc, char **argv, kvm_lab_params_fn fill) {
    const char *ww = "../shared/data/whowhen/Algorithm-Generated", *json = NULL,
               *workflows = "examples/team.lua,examples/pipeline.lua,examples/revise.lua", *model = NULL;
    long inject = 100, warm = 300, entries = 10000, queries = 200, seed = 13, runs = 70, budget = 3;
    bool mock = false, verify = false;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(o, "-h") || !strcmp(o, "--help")) {
            help(stdout);
            return 0;
        }
        if (!strcmp(o, "--mock") || !strcmp(o, "--verify")) {
            *(o[2] == 'm' ? &mock : &verify) = true;
            continue;
        }
        long *num = !strcmp(o, "--runs") ? &runs : !strcmp(o, "--inject") ? &inject : !strcmp(o, "--warm") ? &warm : !strcmp(o, "--entries") ? &entries
                  : !strcmp(o, "--queries") ? &queries : !strcmp(o, "--seed") ? &seed : !strcmp(o, "--budget") ? &budget : NULL;
        if (!v || (!num && strcmp(o, "--whowhen") && strcmp(o, "--json") && strcmp(o, "--workflows") && strcmp(o, "--model"))) {
            fprintf(stderr, "kvmesh bench blame: %s '%s' (kvmesh bench blame --help)\n", v ? "unknown option" : "missing value for", o);
            return 2;
        }
        i++;
        if (!strcmp(o, "--whowhen")) ww = v;
        else if (!strcmp(o, "--workflows")) workflows = v;
        else if (!strcmp(o, "--model")) model = v;
        else if (!strcmp(o, "--json")) json = v;
        else {
            char *end = NULL;
            *num = strtol(v, &end, 10);
            if (!*v || *end || *num < 0 || *num > 10000000 || (num == &queries && *num < 1)) {
                fprintf(stderr, "kvmesh bench blame: %s takes a count (got '%s')\n", o, v);
                return 2;
            }
        }
    }
    if (budget > KVM_VERIFY_MAX) {
        fprintf(stderr, "kvmesh bench blame: --budget takes 0..%d replays\n", KVM_VERIFY_MAX);
        return 2;
    }
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "bench", "blame");
    int rc = 0;
    if (verify) { /* the replay benchmark alone (bench_blame_verify.c) */
        rc = lab_bench_blame_verify(fill, mock, model, workflows, (int)runs, (uint64_t)seed, (int)budget,
                                    cJSON_AddObjectToObject(root, "verify"));
        if (!rc && json && lab_json_write(root, json)) {
            fprintf(stderr, "kvmesh bench blame: cannot write %s\n", json);
            rc = 1;
        }
        cJSON_Delete(root);
        return rc ? 1 : 0;
    }
    ww_trace_t *t = NULL;
    int n = ww_load_dir(ww, &t);
    if (!n) printf("Who&When: no logs in %s; skipped (give --whowhen DIR)\n", ww);
    else {
        const kvm_failure_t **fs = calloc((size_t)n, sizeof *fs);
        for (int i = 0; i < n; i++) fs[i] = &t[i].f;
        rc = eval_set("Who&When Algorithm-Generated, leave-one-out, no LLM", fs, n, cJSON_AddObjectToObject(root, "whowhen_ag"), true);
        free(fs);
    }
    ww_free(t, n);
    if (!rc && runs > 0 && *workflows)
        rc = real_injection(fill, mock, model, workflows, (int)runs, (uint64_t)seed, cJSON_AddObjectToObject(root, "injection_runs"));
    if (!rc && inject > 0) rc = injection((int)inject, (int)warm, (uint64_t)seed, cJSON_AddObjectToObject(root, "injection"), true);
    if (!rc && entries > 0) {
        rc = latency((int)entries, (int)queries, false, cJSON_AddObjectToObject(root, "latency_lsh"), true);
        if (!rc) rc = latency((int)entries, (int)queries, true, cJSON_AddObjectToObject(root, "latency_bruteforce"), true);
    }
    if (rc) fprintf(stderr, "kvmesh bench blame: %s\n", kvm_errmsg());
    if (!rc && json && lab_json_write(root, json)) {
        fprintf(stderr, "kvmesh bench blame: cannot write %s\n", json);
        rc = 1;
    }
    cJSON_Delete(root);
    return rc ? 1 : 0;
}
