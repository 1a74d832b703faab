/* cmd_trace.c - `kvmesh trace ls|show|steps`: a debugger for run traces (docs/trace-format.md). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "agents/wf.h"
#include "runtime/core/core.h"
#include "runtime/trace/trace.h"

static void usage(FILE *f) {
    fprintf(f, "usage: kvmesh trace ls DIR...              list the runs under trace directories\n"
               "       kvmesh trace show RUN_DIR...        a run: header, steps (who, tokens, reuse, timings), edges, result\n"
               "       kvmesh trace steps RUN_DIR [--step N] [--full]\n"
               "                                           what each agent saw (pieces, placeholders) and said, and its KV\n"
               "       kvmesh trace replay RUN_DIR [--model PATH | --mock]\n"
               "                                           re-run the recorded script with the recorded inputs, seed and\n"
               "                                           switches; compare every agent's output with the trace\n\n"
               "RUN_DIR is a run's directory (holding events.jsonl), as printed by kvmesh run.\n");
}

static const char *str(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : "";
}
static double num(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}
static const cJSON *obj(const cJSON *o, const char *k) { return cJSON_GetObjectItemCaseSensitive(o, k); }

/* Prints text on one line, newlines shown as ⏎, cut at max bytes. */
static void oneline(const char *s, size_t max, FILE *f) {
    size_t n = 0;
    for (; s && *s && n < max; s++, n++) {
        if (*s == '\n') fputs("\\n", f);
        else fputc(*s, f);
    }
    if (s && *s) fputs("...", f);
}

/* ---- ls ------------------------------------------------------------------------------------------ */

static void ls_one(const char *dir, void *ud) {
    (void)ud;
    char p[4096];
    char *buf = NULL;
    size_t len = 0;
    cJSON *idx = NULL;
    if (kvm_path_join(p, sizeof p, dir, "index.json") == 0 && kvm_read_file(p, &buf, &len, 0) == 0) {
        idx = cJSON_Parse(buf);
        kvm_free(buf);
    }
    if (!idx) { /* run still going or crashed: summarise from the log */
        kvm_trace_log_t log;
        if (kvm_trace_read(dir, &log) != 0) {
            printf("%-34s (unreadable: %s)\n", dir, kvm_errmsg());
            return;
        }
        cJSON *st = kvm_trace_log_next(&log, "run.start", NULL);
        int steps = 0, from = 0;
        while (kvm_trace_log_next(&log, "step", &from)) steps++;
        printf("%-34s %-12s %-8s steps %3d%s\n", st ? str(st, "run_id") : dir, st ? str(obj(st, "workflow"), "graph") : "?",
               "running?", steps, log.torn_tail ? " (torn tail)" : "");
        kvm_trace_log_free(&log);
        return;
    }
    char when[32] = "";
    const char *started = str(idx, "started");
    if (*started) {
        time_t t = (time_t)(strtoull(started, NULL, 10) / 1000000000ULL);
        struct tm tmv;
        gmtime_r(&t, &tmv);
        strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tmv);
    }
    printf("%-34s %s  %-12s %-6s %-16s ssteps %3d  calls %4d  tok %6.0f/%-5.0f  %8.1f ms  %s\n", str(idx, "run_id"), when,
           str(idx, "graph"), str(idx, "status"), str(idx, "error"), (int)num(idx, "supersteps"), (int)num(idx, "agent_calls"),
           num(idx, "input_tokens"), num(idx, "output_tokens"), num(idx, "wall_ms"), dir);
    cJSON_Delete(idx);
}

/* ---- show ---------------------------------------------------------------------------------------- */

static void show_step(const cJSON *st, FILE *f) {
    const char *agent = str(st, "agent");
    fprintf(f, "  #%-3d s%-3d %-14s %-5s %-5s", (int)num(st, "idx"), (int)num(st, "superstep"), str(st, "node"), str(st, "op"),
            str(st, "status"));
    if (*agent) {
        const cJSON *kv = obj(st, "kv"), *tm = obj(st, "timings"), *b = obj(st, "batch"), *out = obj(st, "output");
        int in = (int)num(obj(st, "prompt"), "tokens");
        int reused = (int)(num(kv, "exact") + num(kv, "offset") + num(kv, "naive"));
        fprintf(f, " %5d in (%d reused: %d exact %d offset %d naive; %d recomputed; %s) -> %4d out  ttft %7.1f ms  %6.1f tok/s  batch<=%d  | ",
                in, reused, (int)num(kv, "exact"), (int)num(kv, "offset"), (int)num(kv, "naive"), (int)num(kv, "recomputed"),
                str(kv, "mode"), (int)num(out, "tokens"), num(tm, "ttft_ms"), num(tm, "tokens_per_s"), (int)num(b, "max_seqs"));
        oneline(str(out, "text"), 50, f);
    } else if (obj(st, "output")) {
        char *s = cJSON_PrintUnformatted(obj(st, "output"));
        fputs(" -> ", f);
        oneline(s, 60, f);
        cJSON_free(s);
    }
    if (!strcmp(str(st, "status"), "error")) {
        fputs("\n        error: ", f);
        fputs(str(obj(st, "error"), "message"), f);
    }
    fputc('\n', f);
}

static int show(const char *dir) {
    kvm_trace_log_t log;
    if (kvm_trace_read(dir, &log) != 0) {
        fprintf(stderr, "kvmesh trace: %s\n", kvm_errmsg());
        return 1;
    }
    const cJSON *st = kvm_trace_log_next(&log, "run.start", NULL);
    if (st) {
        printf("run %s  workflow %s (graph '%s')  seed %s\n", str(st, "run_id"), str(obj(st, "workflow"), "path"),
               str(obj(st, "workflow"), "graph"), str(st, "seed"));
        char *in = cJSON_PrintUnformatted(obj(st, "inputs"));
        printf("inputs: %s\n", in ? in : "{}");
        cJSON_free(in);
        const cJSON *m;
        cJSON_ArrayForEach(m, obj(st, "models")) printf("model %d: %s (%s)\n", (int)num(m, "index"), str(m, "script_path"), str(m, "engine"));
        const cJSON *a;
        cJSON_ArrayForEach(a, obj(st, "agents")) {
            printf("agent %-12s kv %-7s max_tokens %-4d template: ", str(a, "name"), str(a, "kv"), (int)num(a, "max_tokens"));
            oneline(str(a, "template"), 70, stdout);
            putchar('\n');
        }
    }
    printf("\nsteps:\n");
    for (int i = 0; i < log.n; i++) {
        const char *t = str(log.recs[i], "t");
        if (!strcmp(t, "step")) show_step(log.recs[i], stdout);
        else if (!strcmp(t, "edge")) printf("        edge %s -> %s (%s)\n", str(log.recs[i], "from"), str(log.recs[i], "to"), str(log.recs[i], "kind"));
        else if (!strcmp(t, "log")) printf("        log [%s] %s\n", str(log.recs[i], "level"), str(log.recs[i], "msg"));
    }
    const cJSON *end = kvm_trace_log_next(&log, "run.end", NULL);
    if (end) {
        printf("\nresult: %s", str(end, "status"));
        if (obj(end, "error")) printf(" (%s) %s", str(obj(end, "error"), "code"), str(obj(end, "error"), "message"));
        char *o = cJSON_PrintUnformatted(obj(end, "outputs"));
        printf("\noutputs: %s\n", o ? o : "{}");
        cJSON_free(o);
        const cJSON *u = obj(end, "usage"), *tm = obj(end, "timings");
        printf("usage: %d agent calls, %.0f input + %.0f output tokens, %.1f ms wall, %.1f ms Lua\n", (int)num(u, "agent_calls"),
               num(u, "input_tokens"), num(u, "output_tokens"), num(tm, "wall_ms"), num(tm, "lua_ms"));
    } else
        printf("\nresult: no run.end record (the run is going on, or the process died)%s\n", log.torn_tail ? "; last line torn" : "");
    kvm_trace_log_free(&log);
    return 0;
}

/* ---- steps --------------------------------------------------------------------------------------- */

static int steps(const char *dir, int only, bool full) {
    kvm_trace_log_t log;
    if (kvm_trace_read(dir, &log) != 0) {
        fprintf(stderr, "kvmesh trace: %s\n", kvm_errmsg());
        return 1;
    }
    size_t cut = full ? (size_t)-1 : 400;
    int from = 0;
    for (const cJSON *st; (st = kvm_trace_log_next(&log, "step", &from)) != NULL;) {
        if (only >= 0 && (int)num(st, "idx") != only) continue;
        printf("== step %d (super-step %d) node '%s'", (int)num(st, "idx"), (int)num(st, "superstep"), str(st, "node"));
        if (*str(st, "agent")) printf(" agent '%s' on %s%s", str(st, "agent"), str(st, "model"), *str(st, "via") ? " via ctx:call" : "");
        printf(" [%s]\n", str(st, "status"));
        if (*str(st, "agent")) {
            const cJSON *sys = obj(st, "system");
            if (cJSON_IsString(sys)) {
                printf("  system: ");
                oneline(sys->valuestring, cut, stdout);
                putchar('\n');
            }
            printf("  saw:\n");
            const cJSON *p;
            cJSON_ArrayForEach(p, obj(st, "pieces")) {
                if (obj(p, "slot")) {
                    printf("    {%s} = ", str(p, "src"));
                    oneline(str(p, "text"), cut, stdout);
                    printf("   [placeholder %s%s]\n", str(p, "slot"), cJSON_IsTrue(obj(p, "missing")) ? ", not produced yet" : "");
                } else {
                    printf("    text: ");
                    oneline(str(p, "text"), cut, stdout);
                    putchar('\n');
                }
            }
            const cJSON *kv = obj(st, "kv"), *tm = obj(st, "timings"), *b = obj(st, "batch");
            printf("  prompt: %d tokens; KV %s: %d exact, %d offset-corrected, %d naive, %d recomputed, %d fused; anchors %d\n",
                   (int)num(obj(st, "prompt"), "tokens"), str(kv, "mode"), (int)num(kv, "exact"), (int)num(kv, "offset"),
                   (int)num(kv, "naive"), (int)num(kv, "recomputed"), (int)num(kv, "fused"), (int)num(kv, "anchors"));
            if (obj(kv, "decisions")) {
                char *d = cJSON_PrintUnformatted(obj(kv, "decisions"));
                printf("  reuse decisions: %s\n", d ? d : "");
                cJSON_free(d);
            }
            printf("  timings: queue %.1f ms, TTFT %.1f ms, decode %.1f ms (%.1f tok/s); %d forward passes, batch up to %d sequences (mean %.2f)\n",
                   num(tm, "queue_ms"), num(tm, "ttft_ms"), num(tm, "decode_ms"), num(tm, "tokens_per_s"), (int)num(b, "forwards"),
                   (int)num(b, "max_seqs"), num(b, "mean_seqs"));
            printf("  said (%d tokens, stop %s): ", (int)num(obj(st, "output"), "tokens"), str(obj(st, "output"), "stop"));
            oneline(str(obj(st, "output"), "text"), cut, stdout);
            putchar('\n');
        } else {
            char *o = cJSON_PrintUnformatted(obj(st, "output"));
            printf("  returned: ");
            oneline(o, cut, stdout);
            putchar('\n');
            cJSON_free(o);
        }
        if (obj(st, "error")) {
            printf("  error %s: %s\n", str(obj(st, "error"), "code"), str(obj(st, "error"), "message"));
            if (*str(obj(st, "error"), "traceback")) printf("  %s\n", str(obj(st, "error"), "traceback"));
        }
    }
    kvm_trace_log_free(&log);
    return 0;
}

/* ---- replay --------------------------------------------------------------------------------------- */

/* Re-runs a traced run from the trace alone (the script source, inputs, seed and switches recorded in
 * run.start) and compares each agent's output, in step order per node, with the recorded one. Greedy
 * agents on the same model and backend reproduce exactly; sampled ones do too, their seeds being
 * derived from the run seed. Exit status 0 when every output matches. */
static int replay(const char *dir, const char *model, bool mock) {
    kvm_trace_log_t log;
    if (kvm_trace_read(dir, &log) != 0) {
        fprintf(stderr, "kvmesh trace replay: %s\n", kvm_errmsg());
        return 1;
    }
    const cJSON *st = kvm_trace_log_next(&log, "run.start", NULL);
    if (!st) {
        fprintf(stderr, "kvmesh trace replay: %s has no run.start record\n", dir);
        kvm_trace_log_free(&log);
        return 1;
    }
    const cJSON *w = obj(st, "workflow"), *cfg = obj(st, "config");
    const char *src = str(w, "source");
    kvm_wf_opts_t o = {0};
    const cJSON *kvo = obj(cfg, "kv_override");
    o.kv_override = cJSON_IsString(kvo) ? kvo->valuestring : NULL;
    o.mock = mock || cJSON_IsTrue(obj(cfg, "mock"));
    o.model_override = model;
    o.llm.quiet = true;
    const cJSON *lim = obj(cfg, "limits");
    if (num(lim, "instructions") > 0) o.max_instructions = (uint64_t)num(lim, "instructions");
    if (num(lim, "lua_ms") > 0) o.lua_cpu_ms = num(lim, "lua_ms");
    if (num(lim, "memory_bytes") > 0) o.run_mem_cap_bytes = (size_t)num(lim, "memory_bytes");
    kvm_workflow_t *wf = kvm_wf_load_string(str(w, "path"), src, strlen(src), &o);
    int rc = 1;
    if (!wf) {
        fprintf(stderr, "kvmesh trace replay: %s\n", kvm_errmsg());
        kvm_trace_log_free(&log);
        return 1;
    }
    int run;
    if (kvm_wf_start(wf, obj(st, "inputs"), strtoull(str(st, "seed"), NULL, 10), &run) != 0 || kvm_wf_drive(wf) != 0) {
        fprintf(stderr, "kvmesh trace replay: %s\n", kvm_errmsg());
        kvm_wf_free(wf);
        kvm_trace_log_free(&log);
        return 1;
    }
    /* the replayed run's messages (state.msgs) against the trace's agent-node steps, in order */
    const cJSON *msgs = obj(kvm_wf_run_state(wf, run), "msgs");
    int from = 0, same = 0, differ = 0;
    for (const cJSON *step; (step = kvm_trace_log_next(&log, "step", &from)) != NULL;) {
        if (!*str(step, "agent") || *str(step, "via") || strcmp(str(step, "status"), "ok") != 0) continue;
        const char *was = str(obj(step, "output"), "text");
        /* this is the want-th ok step of its node in the trace: compare with the want-th message of
         * that node in the replay */
        int want = 0, seen = 0, from2 = 0;
        for (const cJSON *s2; (s2 = kvm_trace_log_next(&log, "step", &from2)) != NULL && s2 != step;)
            if (!strcmp(str(s2, "node"), str(step, "node")) && *str(s2, "agent") && !*str(s2, "via") && !strcmp(str(s2, "status"), "ok"))
                want++;
        const cJSON *m = NULL, *c;
        cJSON_ArrayForEach(c, msgs) if (!strcmp(str(c, "node"), str(step, "node")) && seen++ == want) m = c;
        const char *now = m ? str(m, "text") : NULL;
        bool ok = now && !strcmp(now, was);
        same += ok;
        differ += !ok;
        printf("  #%-3d %-14s %s", (int)num(step, "idx"), str(step, "node"), ok ? "same" : "DIFFERS");
        if (!ok) {
            printf("\n       trace:  ");
            oneline(was, 120, stdout);
            printf("\n       replay: ");
            oneline(now ? now : "(no such step in the replay)", 120, stdout);
        }
        putchar('\n');
    }
    const char *msg = NULL;
    int status = kvm_wf_run_status(wf, run, &msg);
    const cJSON *end = kvm_trace_log_next(&log, "run.end", NULL);
    printf("replay of %s: %d agent outputs the same, %d different; status %s (trace: %s)\n", str(st, "run_id"), same, differ,
           status ? kvm_errname(status) : "ok", end ? str(end, "status") : "no run.end");
    rc = differ == 0 ? 0 : 1;
    kvm_wf_free(wf);
    kvm_trace_log_free(&log);
    return rc;
}

int cmd_trace(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *sub = argv[1];
    if (argc < 3) {
        fprintf(stderr, "kvmesh trace %s: give at least one directory (kvmesh trace --help)\n", sub);
        return 2;
    }
    int rc = 0;
    if (!strcmp(sub, "ls")) {
        for (int i = 2; i < argc; i++)
            if (kvm_trace_find_runs(argv[i], ls_one, NULL) < 0) {
                fprintf(stderr, "kvmesh trace ls: %s\n", kvm_errmsg());
                rc = 1;
            }
    } else if (!strcmp(sub, "show")) {
        for (int i = 2; i < argc; i++) rc |= show(argv[i]);
    } else if (!strcmp(sub, "steps")) {
        int only = -1;
        bool full = false;
        const char *dir = NULL;
        for (int i = 2; i < argc; i++) {
            if (!strcmp(argv[i], "--step") && i + 1 < argc) only = atoi(argv[++i]);
            else if (!strcmp(argv[i], "--full")) full = true;
            else dir = argv[i];
        }
        if (!dir) {
            fprintf(stderr, "kvmesh trace steps: give a run directory\n");
            return 2;
        }
        rc = steps(dir, only, full);
    } else if (!strcmp(sub, "replay")) {
        const char *dir = NULL, *model = NULL;
        bool mock = false;
        for (int i = 2; i < argc; i++) {
            if (!strcmp(argv[i], "--model") && i + 1 < argc) model = argv[++i];
            else if (!strcmp(argv[i], "--mock")) mock = true;
            else dir = argv[i];
        }
        if (!dir) {
            fprintf(stderr, "kvmesh trace replay: give a run directory\n");
            return 2;
        }
        rc = replay(dir, model, mock);
    } else {
        fprintf(stderr, "kvmesh trace: unknown subcommand '%s' (ls, show, steps, replay)\n", sub);
        return 2;
    }
    return rc;
}
