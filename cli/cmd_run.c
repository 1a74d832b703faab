/* cmd_run.c - `kvmesh run WORKFLOW.lua`: run a Lua workflow of agents, with live progress, the run's
 * outputs and a per-agent table; or, with --n, a seeded batch evaluation (accuracy, reuse rate). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "agents/wf.h"
#include "cli_env.h"
#include "runtime/core/core.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvmesh run WORKFLOW.lua [options]\n\n"
            "Runs a Lua workflow of agents (docs/lua-api.md). Each run writes a trace (docs/trace-format.md).\n\n"
            "options:\n"
            "  --input KEY=VALUE     a run input (repeatable); {input} in templates is KEY 'input'\n"
            "  --kv MODE             dense | prefix | kvcomm: overrides every agent's KV policy\n"
            "  --trace DIR           trace root (default traces/<yyyy-mm-dd>); --no-trace for none\n"
            "  --n N                 seeded batch evaluation: N runs with inputs from g:dataset(seed)\n"
            "  --seed S              first seed (default 1); run i uses seed S+i\n"
            "  --concurrency C       runs in flight at once in a batch (default 32)\n"
            "  --model PATH          use this model for every kvmesh.model(...) (e.g. synthetic:llama-3.1-8b)\n"
            "  --mock                use the mock echo model for every kvmesh.model(...) (dry run)\n"
            "  --backend B           auto | cpu | cuda (default auto)\n"
            "  --max-rows N          tokens per forward pass (default 256)\n"
            "  --kv-mb N             KV cache budget per model in MiB (default: the model's, 4 full contexts)\n"
            "  --kvcomm KEY=VALUE    a KVCOMM switch (docs/kvcomm.md), e.g. gamma=0.5, max_anchors=10 (repeatable);\n"
            "                        preset=blend: ours, KVCOMM + a selective recompute, within 2 points of dense\n"
            "                        on the bundled models' examples (docs/kvcomm.md, 5.2)\n"
            "  --ablation NAME       KVCOMM ablation: rotation | rotation+ph | rotation+pf | full | dense\n"
            "  --mem-mb N            Lua memory cap per run (default 64)\n"
            "  --instructions N      Lua instruction budget per run (default 1e9)\n"
            "  --lua-ms N            Lua CPU budget per run in ms (default 5000)\n"
            "  --json                print outputs (and the batch summary) as JSON on stdout\n"
            "  -q, --quiet           no live progress\n"
            "  -h, --help            this help\n\n"
            "example:\n"
            "  kvmesh run examples/pipeline.lua --input question='Who has 4312?' --kv kvcomm\n"
            "  kvmesh run examples/team.lua --n 100 --seed 1 --kv dense\n");
}

typedef struct progress {
    bool quiet, batch;
    int n_total;
    int done_steps;
} progress_t;

static void on_step(void *ud, const kvm_wf_step_info_t *s) {
    progress_t *p = ud;
    p->done_steps++;
    if (p->quiet) return;
    if (p->batch) {
        if (isatty(2)) fprintf(stderr, "\r  %d agent steps done   ", p->done_steps);
        return;
    }
    if (s->status) {
        fprintf(stderr, "  [step %d] %-14s FAILED: %s\n", s->superstep, s->node, s->error ? s->error : "");
        return;
    }
    if (!s->agent) {
        fprintf(stderr, "  [step %d] %-14s (%s) ok\n", s->superstep, s->node, s->op);
        return;
    }
    char preview[61];
    size_t n = 0;
    for (const char *c = s->text ? s->text : ""; *c && n < 60; c++) preview[n++] = (*c == '\n' || *c == '\r') ? ' ' : *c;
    preview[n] = '\0';
    double tps = s->decode_ms > 0 && s->tokens_out > 1 ? (s->tokens_out - 1) / (s->decode_ms / 1e3) : 0;
    fprintf(stderr, "  [step %d] %-14s %4d tok in (%d reused) -> %3d out  ttft %7.1f ms  %6.1f tok/s  | %s%s\n", s->superstep,
            s->node, s->tokens_in, s->reused, s->tokens_out, s->ttft_ms, tps, preview, s->text && strlen(s->text) > 60 ? "..." : "");
}

static void print_agent_table(kvm_workflow_t *wf, FILE *f) {
    fprintf(f, "\n%-14s %-8s %6s %9s %9s %10s %8s %9s %9s\n", "agent", "kv", "calls", "prompt", "reused", "recomputed", "output",
            "TTFT ms", "tok/s");
    for (int i = 0; i < kvm_wf_n_agents(wf); i++) {
        const kvm_wf_agent_stats_t *s = kvm_wf_agent_stats(wf, i);
        if (s->calls == 0) continue;
        long reused = s->exact + s->offset + s->naive;
        double tps = s->decode_ms_sum > 0 ? s->decode_tokens / (s->decode_ms_sum / 1e3) : 0;
        fprintf(f, "%-14s %-8s %6d %9ld %9ld %10ld %8ld %9.1f %9.1f\n", s->name, s->kv, s->calls, s->prompt_tokens, reused,
                s->recomputed, s->output_tokens, s->ttft_ms_sum / s->calls, tps);
    }
    fflush(f);
}

static cJSON *agent_table_json(kvm_workflow_t *wf) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < kvm_wf_n_agents(wf); i++) {
        const kvm_wf_agent_stats_t *s = kvm_wf_agent_stats(wf, i);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "agent", s->name);
        cJSON_AddStringToObject(o, "kv", s->kv);
        cJSON_AddNumberToObject(o, "calls", s->calls);
        cJSON_AddNumberToObject(o, "errors", s->errors);
        cJSON_AddNumberToObject(o, "reuse_calls", s->reuse_calls);
        cJSON_AddNumberToObject(o, "prompt_tokens", (double)s->prompt_tokens);
        cJSON_AddNumberToObject(o, "reused_tokens", (double)(s->exact + s->offset + s->naive));
        cJSON_AddNumberToObject(o, "recomputed_tokens", (double)s->recomputed);
        cJSON_AddNumberToObject(o, "output_tokens", (double)s->output_tokens);
        cJSON_AddNumberToObject(o, "ttft_ms_mean", s->calls ? s->ttft_ms_sum / s->calls : 0);
        cJSON_AddNumberToObject(o, "tokens_per_s", s->decode_ms_sum > 0 ? s->decode_tokens / (s->decode_ms_sum / 1e3) : 0);
        cJSON_AddItemToArray(a, o);
    }
    return a;
}

static void print_value(const cJSON *v, FILE *f) {
    if (cJSON_IsString(v)) fprintf(f, "%s\n", v->valuestring);
    else {
        char *s = cJSON_PrintUnformatted(v);
        fprintf(f, "%s\n", s ? s : "?");
        cJSON_free(s);
    }
}

/* Everything the command line says. */
typedef struct run_args {
    const char *script, *trace_root;
    char default_trace[64];
    bool no_trace, json;
    long n, concurrency;
    unsigned long long seed;
    kvm_wf_opts_t o;
    progress_t prog;
    const char *kvcomm_set[32];
    int n_kvcomm;
    cJSON *inputs;
} run_args_t;

/* Parses the options into *a. -1 to go on, else the exit status (usage printed, or an error). */
static int parse_args(int argc, char **argv, run_args_t *a) {
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        static const char *const valued[] = {"--input", "--kv", "--trace", "--n", "--seed", "--concurrency", "--model", "--backend",
                                             "--max-rows", "--kvcomm", "--ablation", "--kv-mb", "--mem-mb", "--instructions", "--lua-ms"};
        bool needs_value = false;
        for (size_t k = 0; k < sizeof valued / sizeof *valued; k++) needs_value |= !strcmp(arg, valued[k]);
        if (needs_value && !v) {
            fprintf(stderr, "kvmesh run: %s needs a value (kvmesh run --help)\n", arg);
            return 2;
        }
        if (needs_value) i++;
        if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(arg, "--input")) {
            const char *eq = strchr(v, '=');
            if (!eq || eq == v) {
                fprintf(stderr, "kvmesh run: --input takes KEY=VALUE (got '%s')\n", v);
                return 2;
            }
            char key[256];
            snprintf(key, sizeof key, "%.*s", (int)(eq - v), v);
            cJSON_DeleteItemFromObjectCaseSensitive(a->inputs, key);
            cJSON_AddStringToObject(a->inputs, key, eq + 1);
        } else if (!strcmp(arg, "--kv")) a->o.kv_override = v;
        else if (!strcmp(arg, "--trace")) a->trace_root = v;
        else if (!strcmp(arg, "--no-trace")) a->no_trace = true;
        else if (!strcmp(arg, "--n")) a->n = strtol(v, NULL, 10);
        else if (!strcmp(arg, "--seed")) a->seed = strtoull(v, NULL, 10);
        else if (!strcmp(arg, "--concurrency")) a->concurrency = strtol(v, NULL, 10);
        else if (!strcmp(arg, "--model")) a->o.model_override = v;
        else if (!strcmp(arg, "--mock")) a->o.mock = true;
        else if (!strcmp(arg, "--backend")) a->o.llm.model.backend = v;
        else if (!strcmp(arg, "--max-rows")) a->o.llm.max_rows = (int)strtol(v, NULL, 10);
        else if (!strcmp(arg, "--kvcomm")) {
            if (a->n_kvcomm < (int)(sizeof a->kvcomm_set / sizeof *a->kvcomm_set)) a->kvcomm_set[a->n_kvcomm++] = v;
        } else if (!strcmp(arg, "--ablation")) a->o.llm.kvcomm_ablation = v;
        else if (!strcmp(arg, "--kv-mb")) a->o.llm.kv_bytes = (size_t)strtoul(v, NULL, 10) << 20;
        else if (!strcmp(arg, "--mem-mb")) a->o.run_mem_cap_bytes = (size_t)strtoul(v, NULL, 10) << 20;
        else if (!strcmp(arg, "--instructions")) a->o.max_instructions = (uint64_t)strtod(v, NULL);
        else if (!strcmp(arg, "--lua-ms")) a->o.lua_cpu_ms = strtod(v, NULL);
        else if (!strcmp(arg, "--json")) a->json = true;
        else if (!strcmp(arg, "-q") || !strcmp(arg, "--quiet")) a->prog.quiet = true;
        else if (arg[0] == '-') {
            fprintf(stderr, "kvmesh run: unknown option '%s' (kvmesh run --help)\n", arg);
            return 2;
        } else if (!a->script) a->script = arg;
        else {
            fprintf(stderr, "kvmesh run: one workflow at a time ('%s' and '%s')\n", a->script, arg);
            return 2;
        }
    }
    if (!a->script) {
        usage(stderr);
        return 2;
    }
    return -1;
}

/* Fills the workflow options that follow from the parsed arguments. */
static int finish_opts(run_args_t *a) {
    if (a->concurrency < 1) a->concurrency = 1;
    if (!a->no_trace) {
        if (!a->trace_root) {
            time_t now = time(NULL);
            struct tm tmv;
            gmtime_r(&now, &tmv);
            strftime(a->default_trace, sizeof a->default_trace, "traces/%Y-%m-%d", &tmv);
            a->trace_root = a->default_trace;
        }
        a->o.trace_root = a->trace_root;
    }
    a->o.llm.kvcomm_set = a->kvcomm_set;
    a->o.llm.n_kvcomm_set = a->n_kvcomm;
    a->prog.batch = a->n > 0;
    a->prog.n_total = (int)a->n;
    a->o.on_step = on_step;
    a->o.ud = &a->prog;
    a->o.llm.quiet = a->prog.quiet;
    if (a->prog.batch) {
        a->o.echo_print = false;
        /* hundreds of runs: per-step warnings (also in the traces) would drown the summary */
        if (!cli_env_log_given()) kvm_log_set_level(KVM_LOG_ERROR);
    }
    return cli_env_model_params(&a->o.llm.model); /* --backend wins over KVM_BACKEND */
}

/* The engine's batching figures, added to a JSON summary. */
static void add_counters_json(cJSON *o, kvm_workflow_t *wf) {
    uint64_t steps = 0, seqs = 0;
    int max_seqs = 0;
    wf_llm_counters(kvm_wf_llm(wf), &steps, &seqs, &max_seqs);
    cJSON_AddNumberToObject(o, "forward_passes", (double)steps);
    cJSON_AddNumberToObject(o, "mean_batch_seqs", steps ? (double)seqs / (double)steps : 0);
    cJSON_AddNumberToObject(o, "max_batch_seqs", max_seqs);
}

static void print_json(cJSON *o) {
    char *s = cJSON_Print(o);
    printf("%s\n", s ? s : "{}");
    cJSON_free(s);
    cJSON_Delete(o);
}

/* One run with the given inputs: live progress, the outputs and the per-agent table. */
static int run_single(kvm_workflow_t *wf, run_args_t *a, uint64_t t0) {
    int run;
    if (!a->prog.quiet) fprintf(stderr, "kvmesh run: %s (graph '%s')%s\n", a->script, kvm_wf_name(wf), a->o.mock ? " [mock model]" : "");
    if (kvm_wf_start(wf, a->inputs, a->seed, &run) != 0 || kvm_wf_drive(wf) != 0) {
        fprintf(stderr, "kvmesh run: %s\n", kvm_errmsg());
        return 1;
    }
    const char *msg = NULL;
    int st = kvm_wf_run_status(wf, run, &msg);
    const cJSON *outs = kvm_wf_run_outputs(wf, run);
    if (a->json) {
        cJSON *o2 = cJSON_CreateObject();
        cJSON_AddStringToObject(o2, "run_id", kvm_wf_run_id(wf, run));
        cJSON_AddStringToObject(o2, "status", st ? kvm_errname(st) : "ok");
        if (st) cJSON_AddStringToObject(o2, "error", msg ? msg : "");
        cJSON_AddItemToObject(o2, "outputs", cJSON_Duplicate(outs, 1));
        cJSON_AddItemToObject(o2, "state", cJSON_Duplicate(kvm_wf_run_state(wf, run), 1));
        cJSON_AddItemToObject(o2, "agents", agent_table_json(wf));
        cJSON_AddNumberToObject(o2, "wall_ms", (double)(kvm_now_ns() - t0) / 1e6);
        add_counters_json(o2, wf);
        print_json(o2);
    } else {
        if (outs && outs->child) {
            printf("\noutputs:\n");
            for (const cJSON *c = outs->child; c; c = c->next) {
                printf("  %s: ", c->string);
                print_value(c, stdout);
            }
        }
        print_agent_table(wf, stdout);
    }
    fflush(stdout);
    if (st) fprintf(stderr, "\nkvmesh run: run failed (%s): %s\n", kvm_errname(st), msg ? msg : "");
    if (!a->prog.quiet && kvm_wf_run_trace_dir(wf, run)) fprintf(stderr, "trace: %s\n", kvm_wf_run_trace_dir(wf, run));
    return st ? 1 : 0;
}

/* Starts and drives the seeded runs in waves of --concurrency. */
static int run_waves(kvm_workflow_t *wf, const run_args_t *a) {
    int rc = 0;
    for (long first = 0; first < a->n && rc == 0; first += a->concurrency) {
        long last = first + a->concurrency < a->n ? first + a->concurrency : a->n;
        for (long i = first; i < last; i++) {
            int run;
            if (kvm_wf_start_seeded(wf, a->seed + (uint64_t)i, a->inputs, &run) != 0) {
                fprintf(stderr, "kvmesh run: seed %llu: %s\n", a->seed + (unsigned long long)i, kvm_errmsg());
                rc = 1;
                break;
            }
        }
        if (kvm_wf_drive(wf) != 0) {
            fprintf(stderr, "kvmesh run: %s\n", kvm_errmsg());
            rc = 1;
        }
        if (!a->prog.quiet) fprintf(stderr, "%s  runs %ld/%ld\n", isatty(2) ? "\r" : "", last, a->n);
    }
    return rc;
}

/* --n N: a seeded batch evaluation; prints accuracy, reuse rate, batching and the per-agent table. */
static int run_batch(kvm_workflow_t *wf, run_args_t *a, uint64_t t0) {
    if (!kvm_wf_has_dataset(wf)) {
        fprintf(stderr, "kvmesh run: --n needs the workflow to define g:dataset(function(seed) ... end)\n");
        return 2;
    }
    if (!a->prog.quiet)
        fprintf(stderr, "kvmesh run: %s, %ld seeded runs from seed %llu, kv %s%s\n", a->script, a->n, a->seed,
                a->o.kv_override ? a->o.kv_override : "(per agent)", a->o.mock ? " [mock model]" : "");
    int rc = run_waves(wf, a);
    double wall_s = (double)(kvm_now_ns() - t0) / 1e9;
    int failed = 0, scored = 0;
    double score_sum = 0;
    for (int r = 0; r < kvm_wf_n_runs(wf); r++) {
        const char *msg = NULL;
        int st = kvm_wf_run_status(wf, r, &msg);
        if (st && failed++ < 3) fprintf(stderr, "  run %d failed (%s): %s\n", r, kvm_errname(st), msg ? msg : "");
        double sc;
        int k = kvm_wf_run_score(wf, r, &sc);
        if (k == 1) {
            scored++;
            score_sum += sc;
        } else if (k < 0)
            fprintf(stderr, "  run %d: %s\n", r, kvm_errmsg());
    }
    int calls = 0, reuse_calls = 0;
    long prompt = 0, reused = 0;
    for (int i = 0; i < kvm_wf_n_agents(wf); i++) {
        const kvm_wf_agent_stats_t *s = kvm_wf_agent_stats(wf, i);
        calls += s->calls;
        reuse_calls += s->reuse_calls;
        prompt += s->prompt_tokens;
        reused += s->exact + s->offset + s->naive;
    }
    if (a->json) {
        cJSON *o2 = cJSON_CreateObject();
        cJSON_AddStringToObject(o2, "workflow", a->script);
        cJSON_AddStringToObject(o2, "kv", a->o.kv_override ? a->o.kv_override : "per-agent");
        cJSON_AddNumberToObject(o2, "runs", (double)kvm_wf_n_runs(wf));
        cJSON_AddNumberToObject(o2, "failed", failed);
        cJSON_AddNumberToObject(o2, "scored", scored);
        cJSON_AddNumberToObject(o2, "accuracy", scored ? score_sum / scored : 0);
        cJSON_AddNumberToObject(o2, "reuse_rate", calls ? (double)reuse_calls / calls : 0);
        cJSON_AddNumberToObject(o2, "reused_token_fraction", prompt ? (double)reused / (double)prompt : 0);
        add_counters_json(o2, wf);
        cJSON_AddNumberToObject(o2, "wall_s", wall_s);
        cJSON_AddItemToObject(o2, "agents", agent_table_json(wf));
        print_json(o2);
    } else {
        uint64_t steps = 0, seqs = 0;
        int max_seqs = 0;
        wf_llm_counters(kvm_wf_llm(wf), &steps, &seqs, &max_seqs);
        printf("\nruns: %d (%d failed) in %.1f s\n", kvm_wf_n_runs(wf), failed, wall_s);
        if (scored) printf("accuracy: %.1f%% (%d scored)\n", 100.0 * score_sum / scored, scored);
        printf("reuse rate: %.1f%% of agent calls (%d/%d); %.1f%% of prompt tokens reused\n", calls ? 100.0 * reuse_calls / calls : 0,
               reuse_calls, calls, prompt ? 100.0 * (double)reused / (double)prompt : 0);
        printf("batching: %llu forward passes, %.2f sequences per pass on average, at most %d\n", (unsigned long long)steps,
               steps ? (double)seqs / (double)steps : 0, max_seqs);
        print_agent_table(wf, stdout);
    }
    if (!a->prog.quiet && a->trace_root && !a->no_trace) fprintf(stderr, "traces: %s/<run_id>/\n", a->trace_root);
    return rc || failed ? 1 : 0;
}

int cmd_run(int argc, char **argv) {
    run_args_t a = {.concurrency = 32, .seed = 1, .o.echo_print = true, .inputs = cJSON_CreateObject()};
    int rc = parse_args(argc, argv, &a);
    if (rc >= 0) {
        cJSON_Delete(a.inputs);
        return rc;
    }
    if (finish_opts(&a)) {
        fprintf(stderr, "kvmesh run: %s\n", kvm_errmsg());
        cJSON_Delete(a.inputs);
        return 2;
    }
    kvm_workflow_t *wf = kvm_wf_load(a.script, &a.o);
    if (!wf) {
        fprintf(stderr, "kvmesh run: %s\n", kvm_errmsg());
        cJSON_Delete(a.inputs);
        return 1;
    }
    uint64_t t0 = kvm_now_ns();
    rc = a.prog.batch ? run_batch(wf, &a, t0) : run_single(wf, &a, t0);
    kvm_wf_free(wf);
    cJSON_Delete(a.inputs);
    return rc;
}
