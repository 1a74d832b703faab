/* cmd_run.c - `kvmesh run WORKFLOW.lua`: run a Lua workflow of agents, with live progress, the run's
 * outputs and a per-agent table; or, with --n, a seeded batch evaluation (accuracy, reuse rate). Written on
 * the public API (include/kvmesh.h): a runtime, a workflow loaded into it, its runs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <kvmesh.h>

#include "cli_env.h"
#include "cli_tools.h"
#include "cmd_replay.h"
#include "lab/lab.h"

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
            "  --kv-wait-ms N        how long an agent step waits for KV while none finishes (default 300000)\n"
            "  --kvcomm KEY=VALUE    a KVCOMM switch (docs/kvcomm.md), e.g. gamma=0.5, max_anchors=10 (repeatable);\n"
            "                        the default is preset=blend: ours, KVCOMM + a selective recompute, within\n"
            "                        a point of dense on the bundled model's team workload (docs/kvcomm.md, 5.2);\n"
            "                        preset=spec: the paper's policy (reuses more, loses answers)\n"
            "  --ablation NAME       KVCOMM ablation: rotation | rotation+ph | rotation+pf | full | dense\n"
            "  --mem-mb N            Lua memory cap per run (default 64)\n"
            "  --instructions N      Lua instruction budget per run (default 1e9)\n"
            "  --lua-ms N            Lua CPU budget per run in ms (default 5000)\n"
            "  --state DIR           keep what the runtime learns (KVCOMM anchors) in DIR across runs: loaded at\n"
            "                        start, saved at the end, so repeated runs build up reuse (docs/state.md)\n"
            "  --json                print outputs (and the batch summary) as JSON on stdout\n"
            "  --stream              print each agent's tokens on stdout as they come (\"agent> ...\"), one run\n"
            "  --resume TRACE_DIR    continue a failed or interrupted run from its last checkpoint (the script, inputs,\n"
            "                        seed and KV policy come from the trace; WORKFLOW.lua, if given, replaces the script)\n"
            "  --from-step N         with --resume: from the checkpoint after super-step N instead of the last\n"
            "  --answer VALUE        the answer (a string) to the next kvmesh.interrupt (repeatable: one per interrupt,\n"
            "                        in order); with --resume the first answers the traced run's pending interrupt.\n"
            "                        Without one the question is asked on the terminal; when stdin is no terminal\n"
            "                        the run stays parked: exit status 3 and the command that resumes it\n"
            "  --answer-json JSON    the same with a JSON value (true, 42, {\"ok\":true})\n"
            "  --tool NAME=COMMAND   a host tool for ctx:tool(NAME, args) (repeatable): each call runs COMMAND with\n"
            "                        /bin/sh, the arguments (a JSON object) on its stdin; its stdout (JSON) is the\n"
            "                        result, a non-zero exit an error with its stderr; killed at the run's wall-time\n"
            "                        budget (60 s without one). $KVMESH_TOOL, $KVMESH_RUN_ID, $KVMESH_NODE name the call\n"
            "  --tool-schema NAME=FILE  the JSON Schema the tool's arguments must pass (default {\"type\": \"object\"})\n"
            "  -q, --quiet           no live progress\n"
            "  -h, --help            this help\n\n"
            "example:\n"
            "  kvmesh run examples/pipeline.lua --input name=Mark --input corpus='Mark: 9442' --kv kvcomm\n"
            "  kvmesh run examples/team.lua --n 100 --seed 1 --kv dense\n"
            "  kvmesh run examples/team.lua --n 20 --kv kvcomm --state ~/.kvmesh/state\n"
            "  kvmesh run --resume traces/2026-12-06/<run_id> --answer yes\n"
            "  kvmesh run examples/host_tool.lua --input city=Oslo --tool weather=examples/tools/weather.sh \\\n"
            "      --tool-schema weather=examples/tools/weather.schema.json\n");
}

typedef struct progress {
    bool quiet, batch, stream; /* stream: agents' tokens go to stdout as they come (--stream) */
    int n_total;
    int done_steps;
} progress_t;

static void on_step(void *ud, const kvm_step_event_t *s) {
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
    if (p->stream) return; /* the stream showed the text and ends its line with the figures (on_stream) */
    char preview[61];
    size_t n = 0;
    for (const char *c = s->text ? s->text : ""; *c && n < 60; c++) preview[n++] = (*c == '\n' || *c == '\r') ? ' ' : *c;
    preview[n] = '\0';
    double tps = s->decode_ms > 0 && s->tokens_out > 1 ? (s->tokens_out - 1) / (s->decode_ms / 1e3) : 0;
    fprintf(stderr, "  [step %d] %-14s %4d tok in (%d reused) -> %3d out  ttft %7.1f ms  %6.1f tok/s  | %s%s\n", s->superstep,
            s->node, s->tokens_in, s->tokens_reused, s->tokens_out, s->ttft_ms, tps, preview,
            s->text && strlen(s->text) > 60 ? "..." : "");
}

/* --stream: each agent's tokens on stdout as they come, behind "agent> " whenever the speaker changes; a step's
 * end closes its line, with its figures on stderr. */
typedef struct streamer {
    char agent[128]; /* who spoke last ("" at the start of a line) */
    bool mid_line;
} streamer_t;

static void stream_break(streamer_t *s) {
    if (s->mid_line) fputc('\n', stdout);
    fflush(stdout);
    s->mid_line = false;
    s->agent[0] = '\0';
}

static void on_stream(void *ud, const kvm_run_event_t *e) {
    streamer_t *s = ud;
    if (e->kind == KVM_RUN_TOKEN) {
        const char *who = e->agent ? e->agent : "?";
        if (strcmp(s->agent, who)) {
            stream_break(s);
            printf("%s> ", who);
            snprintf(s->agent, sizeof s->agent, "%s", who);
        }
        fwrite(e->text, 1, e->len, stdout);
        fflush(stdout);
        s->mid_line = e->len == 0 || e->text[e->len - 1] != '\n';
        if (!s->mid_line) s->agent[0] = '\0';
    } else if (e->kind == KVM_RUN_STEP && e->step && e->step->agent) {
        stream_break(s);
        const kvm_step_event_t *st = e->step;
        fprintf(stderr, "  [%s: %d tok in (%d reused) -> %d out, ttft %.1f ms]\n", st->node, st->tokens_in, st->tokens_reused,
                st->tokens_out, st->ttft_ms);
    } else if (e->kind == KVM_RUN_END) {
        stream_break(s);
    }
}

static void print_agent_table(const kvm_workflow_t *wf, FILE *f) {
    fprintf(f, "\n%-14s %-8s %6s %9s %9s %10s %8s %9s %9s\n", "agent", "kv", "calls", "prompt", "reused", "recomputed", "output",
            "TTFT ms", "tok/s");
    kvm_agent_stats_t s;
    for (int i = 0; i < kvm_workflow_n_agents(wf); i++) {
        if (kvm_workflow_agent_stats(wf, i, &s) != 0 || s.calls == 0) continue;
        long reused = s.exact + s.offset + s.naive;
        double tps = s.decode_ms_sum > 0 ? s.decode_tokens / (s.decode_ms_sum / 1e3) : 0;
        fprintf(f, "%-14s %-8s %6d %9ld %9ld %10ld %8ld %9.1f %9.1f\n", s.name, s.kv, s.calls, s.prompt_tokens, reused,
                s.recomputed, s.output_tokens, s.ttft_ms_sum / s.calls, tps);
    }
    fflush(f);
}

static cJSON *agent_table_json(const kvm_workflow_t *wf) {
    cJSON *a = cJSON_CreateArray();
    kvm_agent_stats_t s;
    for (int i = 0; i < kvm_workflow_n_agents(wf); i++) {
        if (kvm_workflow_agent_stats(wf, i, &s) != 0) continue;
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "agent", s.name);
        cJSON_AddStringToObject(o, "kv", s.kv);
        cJSON_AddNumberToObject(o, "calls", s.calls);
        cJSON_AddNumberToObject(o, "errors", s.errors);
        cJSON_AddNumberToObject(o, "reuse_calls", s.reuse_calls);
        cJSON_AddNumberToObject(o, "prompt_tokens", (double)s.prompt_tokens);
        cJSON_AddNumberToObject(o, "reused_tokens", (double)(s.exact + s.offset + s.naive));
        cJSON_AddNumberToObject(o, "recomputed_tokens", (double)s.recomputed);
        cJSON_AddNumberToObject(o, "output_tokens", (double)s.output_tokens);
        cJSON_AddNumberToObject(o, "ttft_ms_mean", s.calls ? s.ttft_ms_sum / s.calls : 0);
        cJSON_AddNumberToObject(o, "tokens_per_s", s.decode_ms_sum > 0 ? s.decode_tokens / (s.decode_ms_sum / 1e3) : 0);
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

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Everything the command line says. */
typedef struct run_args {
    const char *script, *trace_root, *kv;
    char default_trace[64];
    bool no_trace, json, mock;
    long n, concurrency;
    unsigned long long seed;
    kvm_runtime_params_t rp;
    progress_t prog;
    const char *kvcomm_set[33];
    char ablation[96];
    int n_kvcomm;
    cJSON *inputs;
    const char *resume;        /* --resume TRACE_DIR */
    long from_step;
    cJSON *answers;            /* --answer / --answer-json, as JSON values in order */
    cli_tools_t *tools;        /* --tool / --tool-schema */
} run_args_t;

/* Parses the options into *a. -1 to go on, else the exit status (usage printed, or an error). */
static int parse_args(int argc, char **argv, run_args_t *a) {
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        static const char *const valued[] = {"--input", "--kv", "--trace", "--n", "--seed", "--concurrency", "--model", "--backend",
                                             "--max-rows", "--kvcomm", "--ablation", "--kv-mb", "--kv-wait-ms", "--mem-mb", "--instructions", "--lua-ms", "--state",
                                             "--resume", "--from-step", "--answer", "--answer-json", "--tool", "--tool-schema"};
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
        } else if (!strcmp(arg, "--answer") || !strcmp(arg, "--answer-json")) {
            cJSON *j = arg[8] ? cJSON_Parse(v) : cJSON_CreateString(v);
            if (!j) {
                fprintf(stderr, "kvmesh run: --answer-json takes a JSON value (got '%s'; a plain string goes with --answer)\n", v);
                return 2;
            }
            cJSON_AddItemToArray(a->answers, j);
        } else if (!strcmp(arg, "--tool") || !strcmp(arg, "--tool-schema")) {
            int rc = cli_tools_add(&a->tools, v, arg[6] != 0, "kvmesh run");
            if (rc) return rc;
        } else if (!strcmp(arg, "--resume")) a->resume = v;
        else if (!strcmp(arg, "--from-step")) {
            char *end = NULL;
            a->from_step = strtol(v, &end, 10);
            if (!*v || *end || a->from_step < 1) {
                fprintf(stderr, "kvmesh run: --from-step takes a super-step number >= 1 (got '%s')\n", v);
                return 2;
            }
        } else if (!strcmp(arg, "--kv")) a->kv = v;
        else if (!strcmp(arg, "--trace")) a->trace_root = v;
        else if (!strcmp(arg, "--state")) a->rp.state_dir = v;
        else if (!strcmp(arg, "--no-trace")) a->no_trace = true;
        else if (!strcmp(arg, "--n")) a->n = strtol(v, NULL, 10);
        else if (!strcmp(arg, "--seed")) a->seed = strtoull(v, NULL, 10);
        else if (!strcmp(arg, "--concurrency")) a->concurrency = strtol(v, NULL, 10);
        else if (!strcmp(arg, "--model")) a->rp.model_override = v;
        else if (!strcmp(arg, "--mock")) a->mock = true;
        else if (!strcmp(arg, "--backend")) a->rp.model.backend = v;
        else if (!strcmp(arg, "--max-rows")) a->rp.max_batch_tokens = (int)strtol(v, NULL, 10);
        else if (!strcmp(arg, "--kvcomm")) {
            if (a->n_kvcomm < 32) a->kvcomm_set[a->n_kvcomm++] = v;
        } else if (!strcmp(arg, "--ablation")) snprintf(a->ablation, sizeof a->ablation, "ablation=%s", v);
        else if (!strcmp(arg, "--kv-mb")) a->rp.kv_budget_bytes = (size_t)strtoul(v, NULL, 10) << 20;
        else if (!strcmp(arg, "--kv-wait-ms")) a->rp.kv_wait_ms = strtod(v, NULL);
        else if (!strcmp(arg, "--mem-mb")) a->rp.run_mem_bytes = (size_t)strtoul(v, NULL, 10) << 20;
        else if (!strcmp(arg, "--instructions")) a->rp.run_instructions = (uint64_t)strtod(v, NULL);
        else if (!strcmp(arg, "--lua-ms")) a->rp.run_lua_ms = strtod(v, NULL);
        else if (!strcmp(arg, "--json")) a->json = true;
        else if (!strcmp(arg, "--stream")) a->prog.stream = true;
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
    if (!a->script && !a->resume) {
        usage(stderr);
        return 2;
    }
    if (a->resume && a->n > 0) {
        fprintf(stderr, "kvmesh run: --resume continues one run: not with --n\n");
        return 2;
    }
    if (a->from_step && !a->resume) {
        fprintf(stderr, "kvmesh run: --from-step goes with --resume TRACE_DIR\n");
        return 2;
    }
    return -1;
}

/* Fills the runtime parameters that follow from the parsed arguments. 0, or the message of a bad value. */
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
        a->rp.trace_root = a->trace_root;
    }
    if (a->kv) {
        kvm_kv_policy_t p;
        if (kvm_kv_policy_parse(a->kv, &p) != 0) return KVM_EINVAL;
        a->rp.kv_override = (int)p;
    }
    if (a->resume && !a->mock && !a->rp.model_override && cli_trace_was_mock(a->resume)) a->mock = true;
    if (a->mock) a->rp.model_override = "mock:echo";
    if (a->ablation[0]) { /* the ablation first, the --kvcomm switches over it */
        memmove(&a->kvcomm_set[1], &a->kvcomm_set[0], (size_t)a->n_kvcomm * sizeof *a->kvcomm_set);
        a->kvcomm_set[0] = a->ablation;
        a->n_kvcomm++;
    }
    a->rp.kvcomm = a->kvcomm_set;
    a->rp.n_kvcomm = a->n_kvcomm;
    a->prog.batch = a->n > 0;

    a->prog.n_total = (int)a->n;
    a->rp.quiet = a->prog.quiet;
    if (a->prog.batch) {
        a->rp.echo_print = false;
        /* hundreds of runs: per-step warnings (also in the traces) would drown the summary */
        if (!cli_env_log_given()) kvm_log_set_level(KVM_LOG_ERROR);
    }
    return cli_env_model_params(&a->rp.model); /* --backend wins over KVM_BACKEND */
}

/* The engine's batching figures (forward passes, sequences per pass) from the runtime's statistics. */
static void counters(const kvm_runtime_t *rt, double *steps, double *mean_seqs, double *max_seqs) {
    char *text = kvm_runtime_stats_json(rt);
    cJSON *o = text ? cJSON_Parse(text) : NULL;
    kvm_free(text);
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, "forward_passes");
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(o, "mean_batch_seqs");
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(o, "max_batch_seqs");
    *steps = cJSON_IsNumber(a) ? a->valuedouble : 0;
    *mean_seqs = cJSON_IsNumber(b) ? b->valuedouble : 0;
    *max_seqs = cJSON_IsNumber(c) ? c->valuedouble : 0;
    cJSON_Delete(o);
}

static void add_counters_json(cJSON *o, const kvm_runtime_t *rt) {
    double steps, mean, max;
    counters(rt, &steps, &mean, &max);
    cJSON_AddNumberToObject(o, "forward_passes", steps);
    cJSON_AddNumberToObject(o, "mean_batch_seqs", mean);
    cJSON_AddNumberToObject(o, "max_batch_seqs", max);
}

static void print_json(cJSON *o) {
    char *s = cJSON_Print(o);
    printf("%s\n", s ? s : "{}");
    cJSON_free(s);
    cJSON_Delete(o);
}

/* A run's JSON text (outputs or state) parsed, or null. */
static cJSON *run_json(char *text) {
    cJSON *j = text ? cJSON_Parse(text) : NULL;
    kvm_free(text);
    return j ? j : cJSON_CreateNull();
}

/* The next answer to an interrupt as JSON text (cJSON_free): from --answer in order, else a line typed on the
 * terminal; NULL when there is none (no --answer left, stdin no terminal or at its end). */
static char *next_answer(run_args_t *a, int *used) {
    if (*used < cJSON_GetArraySize(a->answers)) return cJSON_PrintUnformatted(cJSON_GetArrayItem(a->answers, (*used)++));
    if (!isatty(0)) return NULL;
    fprintf(stderr, "answer> ");
    fflush(stderr);
    char line[4096];
    if (!fgets(line, sizeof line, stdin)) return NULL;
    line[strcspn(line, "\r\n")] = '\0';
    cJSON *j = cJSON_CreateString(line);
    char *text = j ? cJSON_PrintUnformatted(j) : NULL;
    cJSON_Delete(j);
    return text;
}

/* Answers the run's interrupts until it ends (or stays parked): 0, 3 when parked with no answer, 1 on an error. */
static int answer_interrupts(kvm_workflow_t *wf, kvm_run_t *run, run_args_t *a, int *used) {
    while (kvm_run_status(run, NULL) == KVM_EINTERRUPTED) {
        const char *node = NULL;
        char *payload = kvm_run_interrupt_json(run, &node);
        cJSON *pj = payload ? cJSON_Parse(payload) : NULL;
        fprintf(stderr, "\ninterrupt from node '%s': %s\n", node ? node : "?", cJSON_IsString(pj) ? pj->valuestring : payload ? payload : "?");
        cJSON_Delete(pj);
        kvm_free(payload);
        char *value = next_answer(a, used);
        if (!value) {
            fprintf(stderr, "kvmesh run: the run is parked waiting for an answer (no --answer left, and stdin is no terminal)\n");
            if (kvm_run_trace_dir(run)) fprintf(stderr, "resume it with: kvmesh run --resume %s --answer VALUE\n", kvm_run_trace_dir(run));
            return 3;
        }
        if (!a->prog.quiet) fprintf(stderr, "  answer: %s\n", value);
        int rc = kvm_run_resume(run, value);
        cJSON_free(value);
        if (rc != 0 || kvm_workflow_drive(wf) != 0) {
            fprintf(stderr, "kvmesh run: %s\n", kvm_errmsg());
            return 1;
        }
    }
    return 0;
}

/* One run with the given inputs (or resumed from a trace): live progress, interrupts answered, the outputs and the
 * per-agent table. */
static int run_single(kvm_runtime_t *rt, kvm_workflow_t *wf, run_args_t *a, double t0) {
    if (!a->prog.quiet && a->resume)
        fprintf(stderr, "kvmesh run: resuming %s (graph '%s') from %s%s\n", a->resume, kvm_workflow_name(wf),
                a->from_step ? "a chosen checkpoint" : "its last checkpoint", a->mock ? " [mock model]" : "");
    else if (!a->prog.quiet)
        fprintf(stderr, "kvmesh run: %s (graph '%s')%s\n", a->script, kvm_workflow_name(wf), a->mock ? " [mock model]" : "");
    char *in = cJSON_PrintUnformatted(a->inputs);
    kvm_run_params_t p = kvm_run_default_params();
    p.inputs_json = in;
    p.seed = a->seed;
    int used = 0;
    char *first = NULL;
    if (a->resume) {
        p.resume_trace = a->resume;
        p.resume_step = (int)a->from_step;
        if (cJSON_GetArraySize(a->answers) > 0) p.answer_json = first = next_answer(a, &used);
    }
    streamer_t streamer = {0};
    if (a->prog.stream) {
        p.on_event = on_stream;
        p.event_ud = &streamer;
    }
    kvm_run_t *run = in ? kvm_run_start(wf, &p) : NULL;
    cJSON_free(in);
    cJSON_free(first);
    if (!run || kvm_workflow_drive(wf) != 0) {
        fprintf(stderr, "kvmesh run: %s\n", kvm_errmsg());
        return 1;
    }
    int parked = answer_interrupts(wf, run, a, &used);
    if (parked == 1) return 1;
    const char *msg = NULL;
    int st = kvm_run_status(run, &msg);
    cJSON *outs = run_json(kvm_run_outputs_json(run));
    if (a->json) {
        cJSON *o2 = cJSON_CreateObject();
        cJSON_AddStringToObject(o2, "run_id", kvm_run_id(run));
        cJSON_AddStringToObject(o2, "status", st ? kvm_errname(st) : "ok");
        if (st && !parked) cJSON_AddStringToObject(o2, "error", msg ? msg : "");
        if (parked) { /* the pending interrupt */
            const char *node = NULL;
            char *payload = kvm_run_interrupt_json(run, &node);
            cJSON *i = cJSON_AddObjectToObject(o2, "interrupt");
            cJSON_AddStringToObject(i, "node", node ? node : "");
            cJSON_AddItemToObject(i, "payload", payload ? cJSON_Parse(payload) : cJSON_CreateNull());
            kvm_free(payload);
        }
        cJSON_AddItemToObject(o2, "outputs", outs);
        outs = NULL;
        cJSON_AddItemToObject(o2, "state", run_json(kvm_run_state_json(run)));
        cJSON_AddItemToObject(o2, "agents", agent_table_json(wf));
        cJSON_AddNumberToObject(o2, "wall_ms", (now_s() - t0) * 1e3);
        add_counters_json(o2, rt);
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
    cJSON_Delete(outs);
    fflush(stdout);
    if (st && !parked) fprintf(stderr, "\nkvmesh run: run failed (%s): %s\n", kvm_errname(st), msg ? msg : "");
    if (!a->prog.quiet && kvm_run_trace_dir(run)) fprintf(stderr, "trace: %s\n", kvm_run_trace_dir(run));
    return parked ? parked : st ? 1 : 0;
}

/* Starts and drives the seeded runs in waves of --concurrency. */
static int run_waves(kvm_workflow_t *wf, const run_args_t *a) {
    char *in = cJSON_PrintUnformatted(a->inputs);
    if (!in) return 1;
    int rc = 0;
    for (long first = 0; first < a->n && rc == 0; first += a->concurrency) {
        long last = first + a->concurrency < a->n ? first + a->concurrency : a->n;
        for (long i = first; i < last; i++) {
            kvm_run_params_t p = {.inputs_json = in, .seed = a->seed + (uint64_t)i, .from_dataset = true};
            if (!kvm_run_start(wf, &p)) {
                fprintf(stderr, "kvmesh run: seed %llu: %s\n", a->seed + (unsigned long long)i, kvm_errmsg());
                rc = 1;
                break;
            }
        }
        if (kvm_workflow_drive(wf) != 0) {
            fprintf(stderr, "kvmesh run: %s\n", kvm_errmsg());
            rc = 1;
        }
        if (!a->prog.quiet) fprintf(stderr, "%s  runs %ld/%ld\n", isatty(2) ? "\r" : "", last, a->n);
    }
    cJSON_free(in);
    return rc;
}

/* The batch's figures: failed runs, scores, reuse. */
typedef struct batch_sum {
    int failed, scored, calls, reuse_calls;
    double score_sum;
    long prompt, reused;
} batch_sum_t;

static batch_sum_t summarise(kvm_workflow_t *wf) {
    batch_sum_t b = {0};
    for (int r = 0; r < kvm_workflow_n_runs(wf); r++) {
        kvm_run_t *run = kvm_workflow_run(wf, r);
        const char *msg = NULL;
        int st = run ? kvm_run_status(run, &msg) : KVM_ENOMEM;
        if (st && b.failed++ < 3) fprintf(stderr, "  run %d failed (%s): %s\n", r, kvm_errname(st), msg ? msg : "");
        double sc;
        int k = run ? kvm_run_score(run, &sc) : 0;
        if (k == 1) {
            b.scored++;
            b.score_sum += sc;
        } else if (k < 0)
            fprintf(stderr, "  run %d: %s\n", r, kvm_errmsg());
    }
    kvm_agent_stats_t s;
    for (int i = 0; i < kvm_workflow_n_agents(wf); i++) {
        if (kvm_workflow_agent_stats(wf, i, &s) != 0) continue;
        b.calls += s.calls;
        b.reuse_calls += s.reuse_calls;
        b.prompt += s.prompt_tokens;
        b.reused += s.exact + s.offset + s.naive;
    }
    return b;
}

/* --n N: a seeded batch evaluation; prints accuracy, reuse rate, batching and the per-agent table. */
static int run_batch(kvm_runtime_t *rt, kvm_workflow_t *wf, run_args_t *a, double t0) {
    if (!kvm_workflow_has_dataset(wf)) {
        fprintf(stderr, "kvmesh run: --n needs the workflow to define g:dataset(function(seed) ... end)\n");
        return 2;
    }
    if (!a->prog.quiet)
        fprintf(stderr, "kvmesh run: %s, %ld seeded runs from seed %llu, kv %s%s\n", a->script, a->n, a->seed,
                a->kv ? a->kv : "(per agent)", a->mock ? " [mock model]" : "");
    int rc = run_waves(wf, a);
    double wall_s = now_s() - t0;
    batch_sum_t b = summarise(wf);
    int n_runs = kvm_workflow_n_runs(wf);
    if (a->json) {
        cJSON *o2 = cJSON_CreateObject();
        cJSON_AddStringToObject(o2, "workflow", a->script);
        cJSON_AddStringToObject(o2, "kv", a->kv ? a->kv : "per-agent");
        cJSON_AddNumberToObject(o2, "runs", n_runs);
        cJSON_AddNumberToObject(o2, "failed", b.failed);
        cJSON_AddNumberToObject(o2, "scored", b.scored);
        cJSON_AddNumberToObject(o2, "accuracy", b.scored ? b.score_sum / b.scored : 0);
        cJSON_AddNumberToObject(o2, "reuse_rate", b.calls ? (double)b.reuse_calls / b.calls : 0);
        cJSON_AddNumberToObject(o2, "reused_token_fraction", b.prompt ? (double)b.reused / (double)b.prompt : 0);
        add_counters_json(o2, rt);
        cJSON_AddNumberToObject(o2, "wall_s", wall_s);
        cJSON_AddItemToObject(o2, "agents", agent_table_json(wf));
        print_json(o2);
    } else {
        double steps, mean, max;
        counters(rt, &steps, &mean, &max);
        printf("\nruns: %d (%d failed) in %.1f s\n", n_runs, b.failed, wall_s);
        if (b.scored) printf("accuracy: %.1f%% (%d scored)\n", 100.0 * b.score_sum / b.scored, b.scored);
        printf("reuse rate: %.1f%% of agent calls (%d/%d); %.1f%% of prompt tokens reused\n",
               b.calls ? 100.0 * b.reuse_calls / b.calls : 0, b.reuse_calls, b.calls,
               b.prompt ? 100.0 * (double)b.reused / (double)b.prompt : 0);
        printf("batching: %.0f forward passes, %.2f sequences per pass on average, at most %.0f\n", steps, mean, max);
        print_agent_table(wf, stdout);
    }
    if (!a->prog.quiet && a->trace_root && !a->no_trace) fprintf(stderr, "traces: %s/<run_id>/\n", a->trace_root);
    return rc || b.failed ? 1 : 0;
}

int cmd_run(int argc, char **argv) {
    run_args_t a = {.concurrency = 32, .seed = 1, .rp = kvm_runtime_default_params(), .inputs = cJSON_CreateObject(),
                    .answers = cJSON_CreateArray()};
    int rc = parse_args(argc, argv, &a);
    if (rc < 0 && a.prog.stream && (a.n > 0 || a.json)) {
        fprintf(stderr, "kvmesh run: --stream shows one run as text: not with --n or --json (a program follows many "
                        "runs' tokens through the daemon's event stream, docs/protocol.md)\n");
        rc = 2;
    }
    if (rc < 0 && finish_opts(&a) != 0) {
        fprintf(stderr, "kvmesh run: %s\n", kvm_errmsg());
        rc = 2;
    }
    kvm_runtime_t *rt = rc < 0 ? kvm_runtime_create(&a.rp) : NULL;
    if (rt && kvm_lab_add_functions(rt)) { /* kvmesh.minitasks.item (lab/lab.h) for the scripts' datasets */
        kvm_runtime_free(rt);
        rt = NULL;
    }
    if (rc < 0 && !rt) {
        fprintf(stderr, "kvmesh run: %s\n", kvm_errmsg());
        rc = 2;
    }
    if (rc < 0) {
        int trc = cli_tools_register(a.tools, rt, "kvmesh run");
        if (trc) rc = trc;
    }
    kvm_workflow_params_t wp = {.on_step = on_step, .ud = &a.prog};
    kvm_workflow_t *wf = rc < 0 ? (a.script ? kvm_workflow_load(rt, a.script, &wp) : kvm_workflow_load_trace(rt, a.resume, &wp)) : NULL;
    if (rc < 0 && !wf) {
        fprintf(stderr, "kvmesh run: %s\n", kvm_errmsg());
        rc = 1;
    }
    if (rc < 0) {
        double t0 = now_s();
        rc = a.prog.batch ? run_batch(rt, wf, &a, t0) : run_single(rt, wf, &a, t0);
    }
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
    cJSON_Delete(a.inputs);
    cJSON_Delete(a.answers);
    cli_tools_free(a.tools);
    return rc;
}
