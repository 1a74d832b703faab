/* cmd_blame.c - `kvmesh trace blame|label|cache`: failure attribution over run traces with the error-schema cache
 * (docs/correct.md), on include/kvmesh.h only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kvmesh.h>

#include "cmd_replay.h"

int cmd_trace_blame(int argc, char **argv); /* cmd_trace.c dispatches to it */

static void usage(FILE *f) {
    fprintf(f, "usage: kvmesh trace blame RUN_DIR [--state DIR] [--k N] [--method triage|knn|prior]\n"
               "                          [--verify [--budget N] [--pass S] [--kv P] [--model PATH | --mock] [--trace DIR]\n"
               "                                    [--judge MODEL [--judge-tokens N]]]\n"
               "                                           the agent and the step (0 = the task, then one per traced step)\n"
               "                                           that most likely made the run fail, with two runner-ups and the\n"
               "                                           past failures (schemata) that informed it; --verify replays the\n"
               "                                           candidates (each generated again, fresh seed, --kv dense) up to\n"
               "                                           N times (3) and confirms the first that makes the run pass (ends\n"
               "                                           ok, g:score >= S, default 1); a confirmed step goes into the cache;\n"
               "                                           --judge MODEL (a model path, mock:echo) writes its schema's text\n"
               "                                           (at most N tokens, 512; a tiny model writes poor text)\n"
               "       kvmesh trace label RUN_DIR --agent A --step N --state DIR [--judge MODEL [--judge-tokens N]]\n"
               "                                           record the confirmed cause of a failed run in the schema cache\n"
               "       kvmesh trace cache stats|ls --state DIR\n"
               "       kvmesh trace cache show|pin|unpin ID --state DIR\n"
               "                                           inspect the error-schema cache kept in DIR/schemas.snap\n");
}

typedef struct blame_args {
    const char *dir, *state, *agent, *id;
    int k, step;
    kvm_blame_method_t method;
    bool verify, mock;                  /* --verify and its options */
    int budget;
    double pass;
    const char *kv, *model, *trace;
    const char *judge;                  /* --judge MODEL: writes the confirmed failure's schema text */
    int judge_tokens;
} blame_args_t;

/* Parses the options after argv[2]; 0 or 2 (usage, said). */
static int parse(int argc, char **argv, int first, blame_args_t *a) {
    *a = (blame_args_t){.k = 5, .step = -1, .budget = 3, .pass = 1.0, .kv = "dense", .judge_tokens = 512};
    for (int i = first; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool valued = !strcmp(o, "--state") || !strcmp(o, "--k") || !strcmp(o, "--method") || !strcmp(o, "--agent") ||
                      !strcmp(o, "--step") || !strcmp(o, "--budget") || !strcmp(o, "--pass") || !strcmp(o, "--kv") ||
                      !strcmp(o, "--model") || !strcmp(o, "--trace") || !strcmp(o, "--judge") || !strcmp(o, "--judge-tokens");
        if (valued && !v) {
            fprintf(stderr, "kvmesh trace %s: %s needs a value (kvmesh trace blame --help)\n", argv[1], o);
            return 2;
        }
        if (valued) i++;
        char *end = NULL;
        if (!strcmp(o, "--state")) a->state = v;
        else if (!strcmp(o, "--agent")) a->agent = v;
        else if (!strcmp(o, "--verify")) a->verify = true;
        else if (!strcmp(o, "--mock")) a->mock = true;
        else if (!strcmp(o, "--model")) a->model = v;
        else if (!strcmp(o, "--trace")) a->trace = v;
        else if (!strcmp(o, "--judge")) a->judge = v;
        else if (!strcmp(o, "--judge-tokens")) {
            a->judge_tokens = (int)strtol(v, &end, 10);
            if (!*v || *end || a->judge_tokens < 1 || a->judge_tokens > 4096) {
                fprintf(stderr, "kvmesh trace %s: --judge-tokens takes 1..4096 (got '%s')\n", argv[1], v);
                return 2;
            }
        }
        else if (!strcmp(o, "--kv")) {
            kvm_kv_policy_t p;
            if (kvm_kv_policy_parse(v, &p) != 0) {
                fprintf(stderr, "kvmesh trace blame: --kv is dense, prefix or kvcomm (got '%s')\n", v);
                return 2;
            }
            a->kv = v;
        } else if (!strcmp(o, "--budget")) {
            a->budget = (int)strtol(v, &end, 10);
            if (!*v || *end || a->budget < 0 || a->budget > KVM_VERIFY_MAX) {
                fprintf(stderr, "kvmesh trace blame: --budget takes 0..%d replays (got '%s')\n", KVM_VERIFY_MAX, v);
                return 2;
            }
        } else if (!strcmp(o, "--pass")) {
            a->pass = strtod(v, &end);
            if (!*v || *end) {
                fprintf(stderr, "kvmesh trace blame: --pass takes a score (got '%s')\n", v);
                return 2;
            }
        }
        else if (!strcmp(o, "--k")) {
            a->k = (int)strtol(v, &end, 10);
            if (!*v || *end || a->k < 0 || a->k > KVM_BLAME_MAX_K) {
                fprintf(stderr, "kvmesh trace blame: --k takes 0..%d (got '%s')\n", KVM_BLAME_MAX_K, v);
                return 2;
            }
        } else if (!strcmp(o, "--step")) {
            a->step = (int)strtol(v, &end, 10);
            if (!*v || *end || a->step < 0) {
                fprintf(stderr, "kvmesh trace label: --step takes a step number >= 0 (got '%s')\n", v);
                return 2;
            }
        } else if (!strcmp(o, "--method")) {
            if (!strcmp(v, "triage")) a->method = KVM_BLAME_TRIAGE;
            else if (!strcmp(v, "knn")) a->method = KVM_BLAME_KNN;
            else if (!strcmp(v, "prior")) a->method = KVM_BLAME_PRIOR;
            else {
                fprintf(stderr, "kvmesh trace blame: --method is triage, knn or prior (got '%s')\n", v);
                return 2;
            }
        } else if (o[0] == '-') {
            fprintf(stderr, "kvmesh trace %s: unknown option '%s' (kvmesh trace blame --help)\n", argv[1], o);
            return 2;
        } else if (!a->dir) a->dir = o;
        else {
            fprintf(stderr, "kvmesh trace %s: one argument too many: '%s'\n", argv[1], o);
            return 2;
        }
    }
    return 0;
}

static kvm_schema_cache_t *open_cache(const char *cmd, const char *state) {
    kvm_schema_cache_t *c = kvm_schema_cache_open(state, NULL);
    if (!c) fprintf(stderr, "kvmesh trace %s: %s\n", cmd, kvm_errmsg());
    return c;
}

/* The --judge model (NULL without one, or when it cannot be loaded: said). */
static kvm_model_t *load_judge(const char *cmd, const blame_args_t *a, bool *failed) {
    *failed = false;
    if (!a->judge) return NULL;
    kvm_model_t *m = kvm_model_load(a->judge, NULL);
    if (!m) {
        fprintf(stderr, "kvmesh trace %s: --judge %s: %s\n", cmd, a->judge, kvm_errmsg());
        *failed = true;
    }
    return m;
}

/* Prints what the judge wrote into schema id. */
static void said_judge(kvm_schema_cache_t *c, int id, const char *judge) {
    char *t = kvm_schema_cache_text(c, id);
    if (t) printf("judge: %s wrote the text of schema #%d (%zu bytes; `kvmesh trace cache show %d` prints it)\n", judge, id,
                  strlen(t), id);
    else printf("judge: %s wrote nothing usable for schema #%d (its stub stands)\n", judge, id);
    kvm_free(t);
}

/* --verify: replays blame's candidates; prints what each replay did and the confirmed step. 0, or -1 (said). */
static int verify(const blame_args_t *a, kvm_schema_cache_t *c, const kvm_failure_t *f, const kvm_blame_t *b) {
    kvm_runtime_t *rt = cli_replay_runtime("trace blame --verify", a->dir, a->model, a->mock, a->trace);
    if (!rt) return -1;
    kvm_verify_params_t p = kvm_verify_default_params();
    p.budget = a->budget;
    p.pass_score = a->pass;
    p.kv = a->kv;
    bool judge_failed;
    kvm_model_t *judge = load_judge("blame", a, &judge_failed);
    if (judge_failed) {
        kvm_runtime_free(rt);
        return -1;
    }
    kvm_judge_params_t jp = kvm_judge_default_params();
    jp.max_tokens = a->judge_tokens;
    p.judge = judge;
    p.judge_params = &jp;
    kvm_verify_t v;
    int rc = kvm_blame_verify(rt, c, a->dir, f, b, &p, &v);
    if (rc) fprintf(stderr, "kvmesh trace blame: %s\n", kvm_errmsg());
    else if (v.control.passed) {
        printf("verify: the run re-made from its recorded outputs passes (status ok");
        if (v.control.scored) printf(", score %.3f", v.control.score);
        printf("): it did not fail, nothing to verify\n");
    } else {
        printf("verify: %d replay%s (budget %d), each step generated again (kv %s, fresh seed), the steps before it as "
               "recorded\n", v.n_replays, v.n_replays == 1 ? "" : "s", a->budget, a->kv);
        for (int i = 0; i < v.n_replays; i++) {
            const kvm_verify_replay_t *o = &v.replay[i];
            printf("  step %-3d %-16s %s", o->step, o->agent, o->status ? kvm_errname(o->status) : "ok");
            if (o->scored) printf(", score %.3f", o->score);
            printf(" -> %s  (kvmesh trace replay %s --from-step %d --kv %s --seed %llu; trace %s)\n", o->passed ? "passed" : "failed",
                   a->dir, o->step - 1, a->kv, (unsigned long long)o->seed, o->run_dir[0] ? o->run_dir : "-");
        }
        if (v.step >= 0)
            printf("confirmed: agent %s, step %d\n", v.agent, v.step);
        else printf("not confirmed: no replay within the budget made the run pass\n");
        if (v.schema_id >= 0) printf("cache: the confirmed failure is in schema #%d\n", v.schema_id);
        if (v.schema_id >= 0 && judge && v.distilled) said_judge(c, v.schema_id, a->judge);
        else if (v.schema_id >= 0 && judge) printf("judge: %s failed (%s); schema #%d keeps its stub\n", a->judge, v.judge_error, v.schema_id);
    }
    kvm_model_free(judge);
    kvm_runtime_free(rt);
    return rc ? -1 : 0;
}

static int blame(const blame_args_t *a) {
    if (a->judge && !a->verify) {
        fprintf(stderr, "kvmesh trace blame: --judge writes the text of a confirmed failure: give --verify too "
                        "(or `kvmesh trace label --judge`)\n");
        return 2;
    }
    kvm_failure_t *f = kvm_failure_from_trace(a->dir);
    if (!f) {
        fprintf(stderr, "kvmesh trace blame: %s\n", kvm_errmsg());
        return 1;
    }
    kvm_schema_cache_t *c = open_cache("blame", a->state);
    kvm_blame_params_t p = kvm_blame_default_params();
    p.k = a->k;
    p.method = a->method;
    kvm_blame_t b;
    int rc = c ? kvm_blame(c, f, &p, &b) : -1;
    if (c && rc) fprintf(stderr, "kvmesh trace blame: %s\n", kvm_errmsg());
    if (!rc) {
        printf("run %s: %d steps (step 0 is the task)\n", f->id, f->n_steps);
        if (b.step < 0) printf("blame: no agent step to blame\n");
        else printf("blame: agent %s, step %d\n", b.agent, b.step);
        for (int i = 0; i < b.n_cand; i++) {
            int t = b.cand[i].step;
            const char *c0 = f->steps[t].content;
            printf("  %d. step %-3d %-16s %s\n      said: %.100s%s\n", i + 1, t, b.cand[i].agent, b.cand[i].evidence, c0,
                   strlen(c0) > 100 ? "..." : "");
        }
        kvm_schema_cache_stats_t st;
        kvm_schema_cache_stats(c, &st);
        printf("schemata: %d of %d in the cache", b.n_schemata, st.entries);
        for (int i = 0; i < b.n_schemata; i++) printf("%s#%d (S %.3f)", i ? ", " : ": ", b.schema_ids[i], b.schema_scores[i]);
        printf("\n");
        if (a->verify && verify(a, c, f, &b)) rc = -1;
        if (!rc && a->state && kvm_schema_cache_save(c)) { /* the hit counts, a confirmed failure */
            fprintf(stderr, "kvmesh trace blame: %s\n", kvm_errmsg());
            rc = -1;
        }
    }
    kvm_schema_cache_free(c);
    kvm_failure_free(f);
    return rc ? 1 : 0;
}

static int label(const blame_args_t *a) {
    if (!a->state || !a->agent || a->step < 0) {
        fprintf(stderr, "kvmesh trace label: give RUN_DIR, --agent, --step and --state (kvmesh trace blame --help)\n");
        return 2;
    }
    kvm_failure_t *f = kvm_failure_from_trace(a->dir);
    if (!f) {
        fprintf(stderr, "kvmesh trace label: %s\n", kvm_errmsg());
        return 1;
    }
    bool known = false;
    char want[64], have[64];
    kvm_agent_normalize(a->agent, want, sizeof want);
    for (int t = 0; t < f->n_steps; t++) {
        kvm_agent_normalize(f->steps[t].agent, have, sizeof have);
        known |= !strcmp(want, have);
    }
    if (!known || a->step >= f->n_steps) {
        fprintf(stderr, "kvmesh trace label: %s: %s%s%s (the run has %d steps)\n", a->dir, known ? "" : "no agent named ",
                known ? "" : a->agent, a->step >= f->n_steps ? " step out of range" : "", f->n_steps);
        kvm_failure_free(f);
        return 2;
    }
    f->gold_agent = a->agent;
    f->gold_step = a->step;
    f->human_label = true;
    kvm_schema_cache_t *c = open_cache("label", a->state);
    /* the schemata blame would have shown get their feedback, then the failure goes in */
    kvm_blame_params_t p = kvm_blame_default_params();
    p.count_hit = false;
    kvm_blame_t shown;
    int helpful = c && kvm_blame(c, f, &p, &shown) == 0 ? kvm_schema_cache_feedback(c, &shown, f) : -1;
    bool judge_failed = false; /* loaded first: a judge that cannot be loaded changes nothing */
    kvm_model_t *judge = c && helpful >= 0 ? load_judge("label", a, &judge_failed) : NULL;
    int id = c && helpful >= 0 && !judge_failed ? kvm_schema_cache_insert(c, f, false) : -1;
    int jrc = 0;
    if (judge && id >= 0) {
        kvm_judge_params_t jp = kvm_judge_default_params();
        jp.max_tokens = a->judge_tokens;
        if ((jrc = kvm_schema_distill(c, id, f, judge, &jp)) != 0)
            fprintf(stderr, "kvmesh trace label: --judge %s: %s (schema #%d keeps its stub)\n", a->judge, kvm_errmsg(), id);
    }
    int rc = id >= 0 ? kvm_schema_cache_save(c) : -1;
    if (c && rc && !judge_failed) fprintf(stderr, "kvmesh trace label: %s\n", kvm_errmsg());
    else if (!rc)
        printf("labelled %s: agent %s, step %d -> schema #%d (feedback: %d of %d schemata shown were helpful)\n", f->id, want,
               a->step, id, helpful, shown.n_schemata);
    if (!rc && judge && !jrc) said_judge(c, id, a->judge);
    kvm_model_free(judge);
    if (!rc && jrc) rc = -1;
    kvm_schema_cache_free(c);
    kvm_failure_free(f);
    return rc ? 1 : 0;
}

static int cache(int argc, char **argv) {
    if (argc < 3) {
        usage(stderr);
        return 2;
    }
    const char *sub = argv[2];
    blame_args_t a;
    if (parse(argc, argv, 3, &a)) return 2;
    if (!a.state) {
        fprintf(stderr, "kvmesh trace cache: give --state DIR\n");
        return 2;
    }
    bool needs_id = !strcmp(sub, "show") || !strcmp(sub, "pin") || !strcmp(sub, "unpin");
    if (!needs_id && strcmp(sub, "stats") && strcmp(sub, "ls")) {
        fprintf(stderr, "kvmesh trace cache: unknown subcommand '%s' (stats, ls, show, pin, unpin)\n", sub);
        return 2;
    }
    char *end = NULL;
    long id = a.dir ? strtol(a.dir, &end, 10) : -1;
    if (needs_id && (!a.dir || !*a.dir || *end || id < 0)) {
        fprintf(stderr, "kvmesh trace cache %s: give a schema id (a number, as `cache ls` prints)\n", sub);
        return 2;
    }
    kvm_schema_cache_t *c = open_cache("cache", a.state);
    if (!c) return 1;
    int rc = 0;
    kvm_schema_cache_stats_t st;
    kvm_schema_cache_stats(c, &st);
    if (!strcmp(sub, "stats")) {
        printf("entries %d, groups %d, tombstones %d, bytes %zu, queries %ld%s\n", st.entries, st.groups, st.tombstones,
               st.bytes, st.queries, st.over_limits ? " (over its limits: only pinned / human-labelled entries left)" : "");
    } else if (!strcmp(sub, "ls")) {
        int *ids = kvm_malloc((size_t)(st.entries ? st.entries : 1) * sizeof *ids);
        int n = ids ? kvm_schema_cache_ids(c, ids, st.entries) : 0;
        for (int i = 0; i < n; i++) printf("%d\n", ids[i]);
        kvm_free(ids);
    } else if (!strcmp(sub, "show")) {
        char *j = kvm_schema_cache_entry_json(c, (int)id);
        if (j) printf("%s\n", j);
        else rc = 1, fprintf(stderr, "kvmesh trace cache show: %s\n", kvm_errmsg());
        kvm_free(j);
    } else {
        rc = kvm_schema_cache_pin(c, (int)id, !strcmp(sub, "pin"));
        if (!rc) rc = kvm_schema_cache_save(c);
        if (rc) fprintf(stderr, "kvmesh trace cache %s: %s\n", sub, kvm_errmsg());
        rc = rc ? 1 : 0;
    }
    kvm_schema_cache_free(c);
    return rc;
}

/* argv[1] is "blame", "label" or "cache". */
int cmd_trace_blame(int argc, char **argv) {
    for (int i = 2; i < argc; i++)
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(stdout);
            return 0;
        }
    if (!strcmp(argv[1], "cache")) return cache(argc, argv);
    blame_args_t a;
    if (parse(argc, argv, 2, &a)) return 2;
    if (!a.dir) {
        fprintf(stderr, "kvmesh trace %s: give a run directory\n", argv[1]);
        return 2;
    }
    return !strcmp(argv[1], "blame") ? blame(&a) : label(&a);
}
