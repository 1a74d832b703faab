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

int cmd_run(int argc, char **argv) {
    const char *script = NULL, *trace_root = NULL;
    char default_trace[64];
    bool no_trace = false, json = false;
    long n = 0, concurrency = 32;
    unsigned long long seed = 1;
    kvm_wf_opts_t o = {0};
    o.echo_print = true;
    progress_t prog = {0};
    const char *kvcomm_set[32];
    int n_kvcomm = 0;
    cJSON *inputs = cJSON_CreateObject();
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEED_ARG()                                                                        \
    do {                                                                                  \
        if (!v) {                                                                         \
            fprintf(stderr, "kvmesh run: %s needs a value (kvmesh run --help)\n", a);     \
            cJSON_Delete(inputs);                                                         \
            return 2;                                                                     \
        }                                                                                 \
        i++;                                                                              \
    } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            cJSON_Delete(inputs);
            return 0;
        } else if (!strcmp(a, "--input")) {
            NEED_ARG();
            const char *eq = strchr(v, '=');
            if (!eq || eq == v) {
                fprintf(stderr, "kvmesh run: --input takes KEY=VALUE (got '%s')\n", v);
                cJSON_Delete(inputs);
                return 2;
            }
            char key[256];
            snprintf(key, sizeof key, "%.*s", (int)(eq - v), v);
            cJSON_DeleteItemFromObjectCaseSensitive(inputs, key);
            cJSON_AddStringToObject(inputs, key, eq + 1);
        } else if (!strcmp(a, "--kv")) {
            NEED_ARG();
            o.kv_override = v;
        } else if (!strcmp(a, "--trace")) {
            NEED_ARG();
            trace_root = v;
        } else if (!strcmp(a, "--no-trace")) {
            no_trace = true;
        } else if (!strcmp(a, "--n")) {
            NEED_ARG();
            n = strtol(v, NULL, 10);
        } else if (!strcmp(a, "--seed")) {
            NEED_ARG();
            seed = strtoull(v, NULL, 10);
        } else if (!strcmp(a, "--concurrency")) {
            NEED_ARG();
            concurrency = strtol(v, NULL, 10);
        } else if (!strcmp(a, "--model")) {
            NEED_ARG();
            o.model_override = v;
        } else if (!strcmp(a, "--mock")) {
            o.mock = true;
        } else if (!strcmp(a, "--backend")) {
            NEED_ARG();
            o.llm.backend = v;
        } else if (!strcmp(a, "--max-rows")) {
            NEED_ARG();
            o.llm.max_rows = (int)strtol(v, NULL, 10);
        } else if (!strcmp(a, "--kvcomm")) {
            NEED_ARG();
            if (n_kvcomm < (int)(sizeof kvcomm_set / sizeof *kvcomm_set)) kvcomm_set[n_kvcomm++] = v;
        } else if (!strcmp(a, "--ablation")) {
            NEED_ARG();
            o.llm.kvcomm_ablation = v;
        } else if (!strcmp(a, "--kv-mb")) {
            NEED_ARG();
            o.llm.kv_bytes = (size_t)strtoul(v, NULL, 10) << 20;
        } else if (!strcmp(a, "--mem-mb")) {
            NEED_ARG();
            o.run_mem_cap_bytes = (size_t)strtoul(v, NULL, 10) << 20;
        } else if (!strcmp(a, "--instructions")) {
            NEED_ARG();
            o.max_instructions = (uint64_t)strtod(v, NULL);
        } else if (!strcmp(a, "--lua-ms")) {
            NEED_ARG();
            o.lua_cpu_ms = strtod(v, NULL);
        } else if (!strcmp(a, "--json")) {
            json = true;
        } else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) {
            prog.quiet = true;
        } else if (a[0] == '-') {
            fprintf(stderr, "kvmesh run: unknown option '%s' (kvmesh run --help)\n", a);
            cJSON_Delete(inputs);
            return 2;
        } else if (!script) {
            script = a;
        } else {
            fprintf(stderr, "kvmesh run: one workflow at a time ('%s' and '%s')\n", script, a);
            cJSON_Delete(inputs);
            return 2;
        }
#undef NEED_ARG
    }
    if (!script) {
        usage(stderr);
        cJSON_Delete(inputs);
        return 2;
    }
    if (concurrency < 1) concurrency = 1;
    if (!no_trace) {
        if (!trace_root) {
            time_t now = time(NULL);
            struct tm tmv;
            gmtime_r(&now, &tmv);
            strftime(default_trace, sizeof default_trace, "traces/%Y-%m-%d", &tmv);
            trace_root = default_trace;
        }
        o.trace_root = trace_root;
    }
    o.llm.load.backend = o.llm.backend; /* --backend wins over KVM_BACKEND */
    if (cli_env_load_opts(&o.llm.load)) {
        fprintf(stderr, "kvmesh run: %s\n", kvm_errmsg());
        cJSON_Delete(inputs);
        return 2;
    }
    o.llm.backend = o.llm.load.backend;
    o.llm.kvcomm_set = kvcomm_set;
    o.llm.n_kvcomm_set = n_kvcomm;
    prog.batch = n > 0;
    prog.n_total = (int)n;
    o.on_step = on_step;
    o.ud = &prog;
    o.llm.quiet = prog.quiet;
    if (prog.batch) {
        o.echo_print = false;
        /* hundreds of runs: per-step warnings (also in the traces) would drown the summary */
        if (!cli_env_log_given()) kvm_log_set_level(KVM_LOG_ERROR);
    }
    kvm_workflow_t *wf = kvm_wf_load(script, &o);
    if (!wf) {
        fprintf(stderr, "kvmesh run: %s\n", kvm_errmsg());
        cJSON_Delete(inputs);
        return 1;
    }
    int rc = 0;
    uint64_t t0 = kvm_now_ns();
    if (!prog.batch) {
        int run;
        if (!prog.quiet) fprintf(stderr, "kvmesh run: %s (graph '%s')%s\n", script, kvm_wf_name(wf), o.mock ? " [mock model]" : "");
        if (kvm_wf_start(wf, inputs, seed, &run) != 0 || kvm_wf_drive(wf) != 0) {
            fprintf(stderr, "kvmesh run: %s\n", kvm_errmsg());
            kvm_wf_free(wf);
            cJSON_Delete(inputs);
            return 1;
        }
        const char *msg = NULL;
        int st = kvm_wf_run_status(wf, run, &msg);
        const cJSON *outs = kvm_wf_run_outputs(wf, run);
        if (json) {
            cJSON *o2 = cJSON_CreateObject();
            cJSON_AddStringToObject(o2, "run_id", kvm_wf_run_id(wf, run));
            cJSON_AddStringToObject(o2, "status", st ? kvm_errname(st) : "ok");
            if (st) cJSON_AddStringToObject(o2, "error", msg ? msg : "");
            cJSON_AddItemToObject(o2, "outputs", cJSON_Duplicate(outs, 1));
            cJSON_AddItemToObject(o2, "state", cJSON_Duplicate(kvm_wf_run_state(wf, run), 1));
            cJSON_AddItemToObject(o2, "agents", agent_table_json(wf));
            uint64_t steps = 0, seqs = 0;
            int max_seqs = 0;
            wf_llm_counters(kvm_wf_llm(wf), &steps, &seqs, &max_seqs);
            cJSON_AddNumberToObject(o2, "wall_ms", (double)(kvm_now_ns() - t0) / 1e6);
            cJSON_AddNumberToObject(o2, "forward_passes", (double)steps);
            cJSON_AddNumberToObject(o2, "mean_batch_seqs", steps ? (double)seqs / (double)steps : 0);
            cJSON_AddNumberToObject(o2, "max_batch_seqs", max_seqs);
            char *s = cJSON_Print(o2);
            printf("%s\n", s ? s : "{}");
            cJSON_free(s);
            cJSON_Delete(o2);
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
        if (st) {
            fprintf(stderr, "\nkvmesh run: run failed (%s): %s\n", kvm_errname(st), msg ? msg : "");
            rc = 1;
        }
        if (!prog.quiet && kvm_wf_run_trace_dir(wf, run)) fprintf(stderr, "trace: %s\n", kvm_wf_run_trace_dir(wf, run));
    } else {
        if (!kvm_wf_has_dataset(wf)) {
            fprintf(stderr, "kvmesh run: --n needs the workflow to define g:dataset(function(seed) ... end)\n");
            kvm_wf_free(wf);
            cJSON_Delete(inputs);
            return 2;
        }
        if (!prog.quiet) fprintf(stderr, "kvmesh run: %s, %ld seeded runs from seed %llu, kv %s%s\n", script, n, seed,
                                 o.kv_override ? o.kv_override : "(per agent)", o.mock ? " [mock model]" : "");
        for (long first = 0; first < n && rc == 0; first += concurrency) {
            long last = first + concurrency < n ? first + concurrency : n;
            for (long i = first; i < last; i++) {
                int run;
                if (kvm_wf_start_seeded(wf, seed + (uint64_t)i, inputs, &run) != 0) {
                    fprintf(stderr, "kvmesh run: seed %llu: %s\n", seed + (unsigned long long)i, kvm_errmsg());
                    rc = 1;
                    break;
                }
            }
            if (kvm_wf_drive(wf) != 0) {
                fprintf(stderr, "kvmesh run: %s\n", kvm_errmsg());
                rc = 1;
            }
            if (!prog.quiet) fprintf(stderr, "%s  runs %ld/%ld\n", isatty(2) ? "\r" : "", last, n);
        }
        double wall_s = (double)(kvm_now_ns() - t0) / 1e9;
        int failed = 0, scored = 0;
        double score_sum = 0;
        for (int r = 0; r < kvm_wf_n_runs(wf); r++) {
            const char *msg = NULL;
            int st = kvm_wf_run_status(wf, r, &msg);
            if (st) {
                if (failed < 3) fprintf(stderr, "  run %d failed (%s): %s\n", r, kvm_errname(st), msg ? msg : "");
                failed++;
            }
            double sc;
            int k = kvm_wf_run_score(wf, r, &sc);
            if (k == 1) {
                scored++;
                score_sum += sc;
            } else if (k < 0) {
                fprintf(stderr, "  run %d: %s\n", r, kvm_errmsg());
            }
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
        uint64_t steps = 0, seqs = 0;
        int max_seqs = 0;
        wf_llm_counters(kvm_wf_llm(wf), &steps, &seqs, &max_seqs);
        if (json) {
            cJSON *o2 = cJSON_CreateObject();
            cJSON_AddStringToObject(o2, "workflow", script);
            cJSON_AddStringToObject(o2, "kv", o.kv_override ? o.kv_override : "per-agent");
            cJSON_AddNumberToObject(o2, "runs", (double)kvm_wf_n_runs(wf));
            cJSON_AddNumberToObject(o2, "failed", failed);
            cJSON_AddNumberToObject(o2, "scored", scored);
            cJSON_AddNumberToObject(o2, "accuracy", scored ? score_sum / scored : 0);
            cJSON_AddNumberToObject(o2, "reuse_rate", calls ? (double)reuse_calls / calls : 0);
            cJSON_AddNumberToObject(o2, "reused_token_fraction", prompt ? (double)reused / (double)prompt : 0);
            cJSON_AddNumberToObject(o2, "forward_passes", (double)steps);
            cJSON_AddNumberToObject(o2, "mean_batch_seqs", steps ? (double)seqs / (double)steps : 0);
            cJSON_AddNumberToObject(o2, "max_batch_seqs", max_seqs);
            cJSON_AddNumberToObject(o2, "wall_s", wall_s);
            cJSON_AddItemToObject(o2, "agents", agent_table_json(wf));
            char *s = cJSON_Print(o2);
            printf("%s\n", s ? s : "{}");
            cJSON_free(s);
            cJSON_Delete(o2);
        } else {
            printf("\nruns: %d (%d failed) in %.1f s\n", kvm_wf_n_runs(wf), failed, wall_s);
            if (scored) printf("accuracy: %.1f%% (%d scored)\n", 100.0 * score_sum / scored, scored);
            printf("reuse rate: %.1f%% of agent calls (%d/%d); %.1f%% of prompt tokens reused\n", calls ? 100.0 * reuse_calls / calls : 0,
                   reuse_calls, calls, prompt ? 100.0 * (double)reused / (double)prompt : 0);
            printf("batching: %llu forward passes, %.2f sequences per pass on average, at most %d\n", (unsigned long long)steps,
                   steps ? (double)seqs / (double)steps : 0, max_seqs);
            print_agent_table(wf, stdout);
        }
        if (failed) rc = 1;
        if (!prog.quiet && trace_root && !no_trace) fprintf(stderr, "traces: %s/<run_id>/\n", trace_root);
    }
    kvm_wf_free(wf);
    cJSON_Delete(inputs);
    return rc;
}
