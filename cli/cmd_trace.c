/* cmd_trace.c - `kvmesh trace ls|show|steps|replay`: a debugger for run traces (docs/trace-format.md).
 * It parses arguments and prints: the records come typed from runtime/trace's reader, the replay from
 * kvm_wf_replay (agents/wf_trace.c). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "agents/wf.h"
#include "cli_env.h"
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

/* Prints text on one line, newlines shown as \n, cut at max bytes. */
static void oneline(const char *s, size_t max, FILE *f) {
    size_t n = 0;
    for (; s && *s && n < max; s++, n++) {
        if (*s == '\n') fputs("\\n", f);
        else fputc(*s, f);
    }
    if (s && *s) fputs("...", f);
}

static const char *or_empty(const char *s) { return s ? s : ""; }
static const char *status_word(int code) { return code ? "error" : "ok"; }

/* Reads a run's events.jsonl; prints the error on failure. */
static int read_log(const char *dir, kvm_trace_log_t *log) {
    if (kvm_trace_read(dir, log) == 0) return 0;
    fprintf(stderr, "kvmesh trace: %s\n", kvm_errmsg());
    return 1;
}

/* ---- ls ------------------------------------------------------------------------------------------ */

static void ls_one(const char *dir, void *ud) {
    (void)ud;
    kvm_trace_log_t log;
    if (kvm_trace_read_index(dir, &log) != 0) { /* run still going or crashed: summarise from the log */
        if (kvm_trace_read(dir, &log) != 0) {
            printf("%-34s (unreadable: %s)\n", dir, kvm_errmsg());
            return;
        }
        const kvm_trace_rec_t *st = kvm_trace_log_next(&log, KVM_TRACE_RUN_START, NULL);
        int steps = 0, from = 0;
        while (kvm_trace_log_next(&log, KVM_TRACE_STEP, &from)) steps++;
        printf("%-34s %-12s %-8s steps %3d%s\n", st ? or_empty(st->run_start.run_id) : dir, st ? or_empty(st->run_start.graph) : "?",
               "running?", steps, log.torn_tail ? " (torn tail)" : "");
        kvm_trace_log_free(&log);
        return;
    }
    const kvm_trace_index_t *ix = &log.recs[0].index;
    char when[32] = "";
    if (ix->started) {
        time_t t = (time_t)(ix->started / 1000000000ULL);
        struct tm tmv;
        gmtime_r(&t, &tmv);
        strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tmv);
    }
    printf("%-34s %s  %-12s %-6s %-16s ssteps %3d  calls %4d  tok %6ld/%-5ld  %8.1f ms  %s\n", or_empty(ix->run_id), when,
           or_empty(ix->graph), status_word(ix->error), ix->error ? kvm_errname(ix->error) : "", ix->supersteps, ix->agent_calls,
           ix->input_tokens, ix->output_tokens, ix->wall_ms, dir);
    kvm_trace_log_free(&log);
}

/* ---- show ---------------------------------------------------------------------------------------- */

static void show_step(const kvm_trace_step_t *st, FILE *f) {
    fprintf(f, "  #%-3d s%-3d %-14s %-5s %-5s", st->idx, st->superstep, or_empty(st->node), or_empty(st->op), status_word(st->error.code));
    if (st->agent) {
        const kvm_trace_kv_t *kv = &st->kv;
        fprintf(f, " %5d in (%d reused: %d exact %d offset %d naive; %d recomputed; %s) -> %4d out  ttft %7.1f ms  %6.1f tok/s  batch<=%d  | ",
                st->prompt_tokens, kv->exact + kv->offset + kv->naive, kv->exact, kv->offset, kv->naive, kv->recomputed, or_empty(kv->mode),
                st->output_tokens, st->timings.ttft_ms, st->timings.tokens_per_s, st->batch.max_seqs);
        oneline(st->output_text, 50, f);
    } else if (!st->error.code) {
        fputs(" -> ", f);
        oneline(st->output_json ? st->output_json : "null", 60, f);
    }
    if (st->error.code) {
        fputs("\n        error: ", f);
        fputs(or_empty(st->error.message), f);
    }
    fputc('\n', f);
}

static void show_header(const kvm_trace_run_start_t *s) {
    printf("run %s  workflow %s (graph '%s')  seed %llu\n", or_empty(s->run_id), or_empty(s->workflow_path), or_empty(s->graph),
           (unsigned long long)s->seed);
    printf("inputs: %s\n", s->inputs_json ? s->inputs_json : "{}");
    for (int i = 0; i < s->n_models; i++)
        printf("model %d: %s (%s)\n", s->models[i].index, or_empty(s->models[i].script_path), or_empty(s->models[i].engine));
    for (int i = 0; i < s->n_agents; i++) {
        const kvm_trace_agent_t *a = &s->agents[i];
        printf("agent %-12s kv %-7s max_tokens %-4d template: ", or_empty(a->name), or_empty(a->kv), a->max_tokens);
        oneline(a->template_text, 70, stdout);
        putchar('\n');
    }
}

static int show(const char *dir) {
    kvm_trace_log_t log;
    if (read_log(dir, &log)) return 1;
    const kvm_trace_rec_t *st = kvm_trace_log_next(&log, KVM_TRACE_RUN_START, NULL);
    if (st) show_header(&st->run_start);
    printf("\nsteps:\n");
    for (int i = 0; i < log.n; i++) {
        const kvm_trace_rec_t *r = &log.recs[i];
        if (r->type == KVM_TRACE_STEP) show_step(&r->step, stdout);
        else if (r->type == KVM_TRACE_EDGE) printf("        edge %s -> %s (%s)\n", or_empty(r->edge.from), or_empty(r->edge.to), or_empty(r->edge.kind));
        else if (r->type == KVM_TRACE_LOG) printf("        log [%s] %s\n", or_empty(r->log.level), or_empty(r->log.msg));
    }
    const kvm_trace_rec_t *end = kvm_trace_log_next(&log, KVM_TRACE_RUN_END, NULL);
    if (end) {
        const kvm_trace_run_end_t *e = &end->run_end;
        printf("\nresult: %s", status_word(e->error.code));
        if (e->error.code) printf(" (%s) %s", kvm_errname(e->error.code), or_empty(e->error.message));
        printf("\noutputs: %s\n", e->outputs_json ? e->outputs_json : "{}");
        printf("usage: %d agent calls, %ld input + %ld output tokens, %.1f ms wall, %.1f ms Lua\n", e->agent_calls, e->input_tokens,
               e->output_tokens, e->wall_ms, e->lua_ms);
    } else
        printf("\nresult: no run.end record (the run is going on, or the process died)%s\n", log.torn_tail ? "; last line torn" : "");
    kvm_trace_log_free(&log);
    return 0;
}

/* ---- steps --------------------------------------------------------------------------------------- */

static void print_seen(const kvm_trace_step_t *st, size_t cut) {
    if (st->system) {
        printf("  system: ");
        oneline(st->system, cut, stdout);
        putchar('\n');
    }
    printf("  saw:\n");
    for (int i = 0; i < st->n_pieces; i++) {
        const kvm_trace_part_t *p = &st->pieces[i];
        if (p->slot) {
            printf("    {%s} = ", or_empty(p->src));
            oneline(p->text, cut, stdout);
            printf("   [placeholder %s%s]\n", p->slot, p->missing ? ", not produced yet" : "");
        } else {
            printf("    text: ");
            oneline(p->text, cut, stdout);
            putchar('\n');
        }
    }
}

static void print_agent_step(const kvm_trace_step_t *st, size_t cut) {
    print_seen(st, cut);
    const kvm_trace_kv_t *kv = &st->kv;
    const kvm_trace_timings_t *tm = &st->timings;
    printf("  prompt: %d tokens; KV %s: %d exact, %d offset-corrected, %d naive, %d recomputed, %d fused; anchors %d\n", st->prompt_tokens,
           or_empty(kv->mode), kv->exact, kv->offset, kv->naive, kv->recomputed, kv->fused, kv->anchors);
    if (kv->decisions_json) printf("  reuse decisions: %s\n", kv->decisions_json);
    printf("  timings: queue %.1f ms, TTFT %.1f ms, decode %.1f ms (%.1f tok/s); %d forward passes, batch up to %d sequences (mean %.2f)\n",
           tm->queue_ms, tm->ttft_ms, tm->decode_ms, tm->tokens_per_s, st->batch.forwards, st->batch.max_seqs, st->batch.mean_seqs);
    printf("  said (%d tokens, stop %s): ", st->output_tokens, or_empty(st->stop));
    oneline(st->output_text, cut, stdout);
    putchar('\n');
}

static int steps(const char *dir, int only, bool full) {
    kvm_trace_log_t log;
    if (read_log(dir, &log)) return 1;
    size_t cut = full ? (size_t)-1 : 400;
    int from = 0;
    for (const kvm_trace_rec_t *r; (r = kvm_trace_log_next(&log, KVM_TRACE_STEP, &from)) != NULL;) {
        const kvm_trace_step_t *st = &r->step;
        if (only >= 0 && st->idx != only) continue;
        printf("== step %d (super-step %d) node '%s'", st->idx, st->superstep, or_empty(st->node));
        if (st->agent) printf(" agent '%s' on %s%s", st->agent, or_empty(st->model), st->via ? " via ctx:call" : "");
        printf(" [%s]\n", status_word(st->error.code));
        if (st->agent) print_agent_step(st, cut);
        else {
            printf("  returned: ");
            oneline(st->error.code ? NULL : st->output_json ? st->output_json : "null", cut, stdout);
            putchar('\n');
        }
        if (st->error.code) {
            printf("  error %s: %s\n", kvm_errname(st->error.code), or_empty(st->error.message));
            if (st->error.traceback && *st->error.traceback) printf("  %s\n", st->error.traceback);
        }
    }
    kvm_trace_log_free(&log);
    return 0;
}

/* ---- replay --------------------------------------------------------------------------------------- */

/* Prints kvm_wf_replay's comparison; exit status 0 when every output matches. */
static int replay(const char *dir, const char *model, bool mock) {
    kvm_wf_replay_opts_t o = {.model_override = model, .mock = mock};
    kvm_wf_replay_t rp;
    if (cli_env_model_params(&o.model) != 0 || kvm_wf_replay(dir, &o, &rp) != 0) {
        fprintf(stderr, "kvmesh trace replay: %s\n", kvm_errmsg());
        return 1;
    }
    for (int i = 0; i < rp.n_steps; i++) {
        const kvm_wf_replay_step_t *s = &rp.steps[i];
        printf("  #%-3d %-14s %s", s->idx, s->node, s->same ? "same" : "DIFFERS");
        if (!s->same) {
            printf("\n       trace:  ");
            oneline(s->was, 120, stdout);
            printf("\n       replay: ");
            oneline(s->now ? s->now : "(no such step in the replay)", 120, stdout);
        }
        putchar('\n');
    }
    printf("replay of %s: %d agent outputs the same, %d different; status %s (trace: %s)\n", rp.run_id, rp.same, rp.differ,
           rp.status ? kvm_errname(rp.status) : "ok", rp.trace_ended ? status_word(rp.trace_status) : "no run.end");
    int rc = rp.differ == 0 ? 0 : 1;
    kvm_wf_replay_free(&rp);
    return rc;
}

/* Options of `steps` and `replay`: one run directory plus flags. */
typedef struct dir_args {
    const char *dir, *model;
    int only;
    bool full, mock;
} dir_args_t;

static dir_args_t parse_dir_args(int argc, char **argv) {
    dir_args_t a = {.only = -1};
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--step") && i + 1 < argc) a.only = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--model") && i + 1 < argc) a.model = argv[++i];
        else if (!strcmp(argv[i], "--full")) a.full = true;
        else if (!strcmp(argv[i], "--mock")) a.mock = true;
        else a.dir = argv[i];
    }
    return a;
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
        return rc;
    }
    if (!strcmp(sub, "show")) {
        for (int i = 2; i < argc; i++) rc |= show(argv[i]);
        return rc;
    }
    if (strcmp(sub, "steps") != 0 && strcmp(sub, "replay") != 0) {
        fprintf(stderr, "kvmesh trace: unknown subcommand '%s' (ls, show, steps, replay)\n", sub);
        return 2;
    }
    dir_args_t a = parse_dir_args(argc, argv);
    if (!a.dir) {
        fprintf(stderr, "kvmesh trace %s: give a run directory\n", sub);
        return 2;
    }
    return !strcmp(sub, "steps") ? steps(a.dir, a.only, a.full) : replay(a.dir, a.model, a.mock);
}
