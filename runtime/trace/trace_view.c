/* trace_view.c - the views of include/kvmesh.h (kvm_trace_view_*): the text `kvmesh trace ls|show|steps|replay`
 * prints, built from the typed records of the reader (trace.h), so that the CLI, the daemon and the debugger
 * show the same thing and only runtime/trace knows the schema. Each view appends to one string builder; the
 * first failure (an append, or reading a run while listing, out of memory) is kept and ends the view with
 * KVM_ENOMEM. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "../core/core.h"
#include "../core/sb.h"
#include "trace.h"

#define VIEW_CUT 400        /* bytes of a text shown by `steps` without --full */
#define VIEW_CUT_SHOW 50    /* an agent's output on its `show` line */
#define VIEW_CUT_VALUE 60   /* a func / tool node's value on its `show` line */
#define VIEW_CUT_TMPL 70    /* an agent's template in the `show` header */
#define VIEW_CUT_REPLAY 120 /* each output of a step that differs */

typedef struct view {
    kvm_sb_t b;
    int rc; /* the first failure (KVM_ENOMEM); later appends do nothing */
} view_t;

static void put(view_t *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(view_t *v, const char *fmt, ...) {
    if (v->rc) return;
    va_list ap;
    va_start(ap, fmt);
    v->rc = kvm_sb_vprintf(&v->b, fmt, ap);
    va_end(ap);
}

/* Appends s on one line, newlines shown as \n, cut after max bytes with "..." (NULL: nothing). */
static void oneline(view_t *v, const char *s, size_t max) {
    size_t n = 0;
    for (; s && *s && n < max && !v->rc; s++, n++) v->rc = *s == '\n' ? kvm_sb_puts(&v->b, "\\n") : kvm_sb_putc(&v->b, *s);
    if (s && *s) put(v, "...");
}

/* Hands the text over (0), or frees it and returns the failure's code (its message kept, in context). */
static int view_end(view_t *v, char **text) {
    *text = v->rc ? NULL : kvm_sb_take(&v->b, NULL);
    if (!v->rc && !*text) v->rc = KVM_ENOMEM;
    kvm_sb_free(&v->b);
    return v->rc ? kvm_errctx(v->rc, "writing a trace view") : 0;
}

static const char *or_empty(const char *s) { return s ? s : ""; }
static const char *status_word(int code) { return code ? "error" : "ok"; }

kvm_trace_view_params_t kvm_trace_view_default_params(void) { return (kvm_trace_view_params_t){.step = -1}; }

/* ---- list ---------------------------------------------------------------------------------------------- */

/* A run without index.json (going on, or died): summarised from its log. */
static void list_running(view_t *v, const char *dir) {
    kvm_trace_log_t log;
    int rc = kvm_trace_read(dir, &log);
    if (rc == KVM_ENOMEM) { /* the view fails: the run is not unreadable */
        v->rc = rc;
        return;
    }
    if (rc) {
        put(v, "%-34s (unreadable: %s)\n", dir, kvm_errmsg());
        return;
    }
    const kvm_trace_rec_t *st = kvm_trace_log_next(&log, KVM_TRACE_RUN_START, NULL);
    int steps = 0, from = 0;
    while (kvm_trace_log_next(&log, KVM_TRACE_STEP, &from)) steps++;
    put(v, "%-34s %-12s %-8s steps %3d%s\n", st ? or_empty(st->run_start.run_id) : dir, st ? or_empty(st->run_start.graph) : "?",
        "running?", steps, log.torn_tail ? " (torn tail)" : "");
    kvm_trace_log_free(&log);
}

static void list_one(const char *dir, void *ud) {
    view_t *v = ud;
    kvm_trace_log_t log;
    int rc = v->rc ? v->rc : kvm_trace_read_index(dir, &log);
    if (rc == KVM_ENOMEM) v->rc = rc;
    if (v->rc) return;
    if (rc) { /* no index.json (or a malformed one): summarised from the log */
        list_running(v, dir);
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
    put(v, "%-34s %s  %-12s %-6s %-16s ssteps %3d  calls %4d  tok %6ld/%-5ld  %8.1f ms  %s\n", or_empty(ix->run_id), when,
        or_empty(ix->graph), status_word(ix->error), ix->error ? kvm_errname(ix->error) : "", ix->supersteps, ix->agent_calls,
        ix->input_tokens, ix->output_tokens, ix->wall_ms, dir);
    kvm_trace_log_free(&log);
}

int kvm_trace_view_list(const char *root, char **text) {
    *text = NULL;
    if (!root) return kvm_seterr(KVM_EINVAL, "kvm_trace_view_list: no trace root given");
    view_t v = {KVM_SB_INIT, 0};
    int n = kvm_trace_find_runs(root, list_one, &v);
    if (n < 0) {
        kvm_sb_free(&v.b);
        return n;
    }
    int rc = view_end(&v, text);
    return rc ? rc : n;
}

/* ---- a run ---------------------------------------------------------------------------------------------- */

static void run_step(view_t *v, const kvm_trace_step_t *st) {
    put(v, "  #%-3d s%-3d %-14s %-5s %-5s", st->idx, st->superstep, or_empty(st->node), or_empty(st->op), status_word(st->error.code));
    if (st->agent) {
        const kvm_trace_kv_t *kv = &st->kv;
        put(v, " %5d in (%d reused: %d exact %d offset %d naive; %d recomputed; %s) -> %4d out  ttft %7.1f ms  %6.1f tok/s  batch<=%d  | ",
            st->prompt_tokens, kv->exact + kv->offset + kv->naive, kv->exact, kv->offset, kv->naive, kv->recomputed, or_empty(kv->mode),
            st->output_tokens, st->timings.ttft_ms, st->timings.tokens_per_s, st->batch.max_seqs);
        oneline(v, st->output_text, VIEW_CUT_SHOW);
    } else if (!st->error.code) {
        put(v, " -> ");
        oneline(v, st->output_json ? st->output_json : "null", VIEW_CUT_VALUE);
    }
    if (st->error.code) put(v, "\n        error: %s", or_empty(st->error.message));
    put(v, "\n");
}

static void run_header(view_t *v, const kvm_trace_run_start_t *s) {
    put(v, "run %s  workflow %s (graph '%s')  seed %llu\n", or_empty(s->run_id), or_empty(s->workflow_path), or_empty(s->graph),
        (unsigned long long)s->seed);
    put(v, "inputs: %s\n", s->inputs_json ? s->inputs_json : "{}");
    for (int i = 0; i < s->n_models; i++)
        put(v, "model %d: %s (%s)\n", s->models[i].index, or_empty(s->models[i].script_path), or_empty(s->models[i].engine));
    for (int i = 0; i < s->n_agents; i++) {
        const kvm_trace_agent_t *a = &s->agents[i];
        put(v, "agent %-12s kv %-7s max_tokens %-4d template: ", or_empty(a->name), or_empty(a->kv), a->max_tokens);
        oneline(v, a->template_text, VIEW_CUT_TMPL);
        put(v, "\n");
    }
}

static void run_result(view_t *v, const kvm_trace_log_t *log) {
    const kvm_trace_rec_t *end = kvm_trace_log_next(log, KVM_TRACE_RUN_END, NULL);
    if (!end) {
        put(v, "\nresult: no run.end record (the run is going on, or the process died)%s\n", log->torn_tail ? "; last line torn" : "");
        return;
    }
    const kvm_trace_run_end_t *e = &end->run_end;
    put(v, "\nresult: %s", status_word(e->error.code));
    if (e->error.code) put(v, " (%s) %s", kvm_errname(e->error.code), or_empty(e->error.message));
    put(v, "\noutputs: %s\n", e->outputs_json ? e->outputs_json : "{}");
    put(v, "usage: %d agent calls, %ld input + %ld output tokens, %.1f ms wall, %.1f ms Lua\n", e->agent_calls, e->input_tokens,
        e->output_tokens, e->wall_ms, e->lua_ms);
}

static void count_run(const char *run_dir, void *ud) {
    (void)run_dir;
    (*(int *)ud)++;
}

/* Reads one run for a view. A folder that holds no events.jsonl but runs below it (a trace root, as `kvmesh run`
 * prints it) is named as such, with the command that lists its runs. */
static int read_run(const char *what, const char *run_dir, kvm_trace_log_t *log) {
    if (!run_dir) return kvm_seterr(KVM_EINVAL, "%s: no run directory given", what);
    int rc = kvm_trace_read(run_dir, log);
    int runs = 0;
    if (rc == KVM_ENOENT && kvm_dir_exists(run_dir) && kvm_trace_find_runs(run_dir, count_run, &runs) > 0 && runs > 0)
        rc = kvm_seterr(KVM_EINVAL, "%s is a folder of %d run%s, not a run: `kvmesh trace ls %s` lists them; name one of "
                        "them", run_dir, runs, runs == 1 ? "" : "s", run_dir);
    return rc;
}

int kvm_trace_view_run(const char *run_dir, char **text) {
    *text = NULL;
    kvm_trace_log_t log;
    int rc = read_run("kvm_trace_view_run", run_dir, &log);
    if (rc) return rc;
    view_t v = {KVM_SB_INIT, 0};
    const kvm_trace_rec_t *st = kvm_trace_log_next(&log, KVM_TRACE_RUN_START, NULL);
    if (st) run_header(&v, &st->run_start);
    put(&v, "\nsteps:\n");
    for (int i = 0; i < log.n; i++) {
        const kvm_trace_rec_t *r = &log.recs[i];
        if (r->type == KVM_TRACE_STEP) run_step(&v, &r->step);
        else if (r->type == KVM_TRACE_EDGE) put(&v, "        edge %s -> %s (%s)\n", or_empty(r->edge.from), or_empty(r->edge.to), or_empty(r->edge.kind));
        else if (r->type == KVM_TRACE_LOG) put(&v, "        log [%s] %s\n", or_empty(r->log.level), or_empty(r->log.msg));
    }
    run_result(&v, &log);
    kvm_trace_log_free(&log);
    return view_end(&v, text);
}

/* ---- steps ---------------------------------------------------------------------------------------------- */

/* What the agent saw: its system message and its user message as pieces. */
static void step_seen(view_t *v, const kvm_trace_step_t *st, size_t cut) {
    if (st->system) {
        put(v, "  system: ");
        oneline(v, st->system, cut);
        put(v, "\n");
    }
    put(v, "  saw:\n");
    for (int i = 0; i < st->n_pieces; i++) {
        const kvm_trace_part_t *p = &st->pieces[i];
        if (p->slot) {
            put(v, "    {%s} = ", or_empty(p->src));
            oneline(v, p->text, cut);
            put(v, "   [placeholder %s%s]\n", p->slot, p->missing ? ", not produced yet" : "");
        } else {
            put(v, "    text: ");
            oneline(v, p->text, cut);
            put(v, "\n");
        }
    }
}

static void step_agent(view_t *v, const kvm_trace_step_t *st, size_t cut) {
    step_seen(v, st, cut);
    const kvm_trace_kv_t *kv = &st->kv;
    const kvm_trace_timings_t *tm = &st->timings;
    put(v, "  prompt: %d tokens; KV %s: %d exact, %d offset-corrected, %d naive, %d recomputed, %d fused; anchors %d\n", st->prompt_tokens,
        or_empty(kv->mode), kv->exact, kv->offset, kv->naive, kv->recomputed, kv->fused, kv->anchors);
    if (kv->decisions_json) put(v, "  reuse decisions: %s\n", kv->decisions_json);
    put(v, "  timings: queue %.1f ms, TTFT %.1f ms, decode %.1f ms (%.1f tok/s); %d forward passes, batch up to %d sequences (mean %.2f)\n",
        tm->queue_ms, tm->ttft_ms, tm->decode_ms, tm->tokens_per_s, st->batch.forwards, st->batch.max_seqs, st->batch.mean_seqs);
    put(v, "  said (%d tokens, stop %s): ", st->output_tokens, or_empty(st->stop));
    oneline(v, st->output_text, cut);
    put(v, "\n");
}

static void step_one(view_t *v, const kvm_trace_step_t *st, size_t cut) {
    put(v, "== step %d (super-step %d) node '%s'", st->idx, st->superstep, or_empty(st->node));
    if (st->agent) put(v, " agent '%s' on %s%s", st->agent, or_empty(st->model), st->via ? " via ctx:call" : "");
    put(v, " [%s]\n", status_word(st->error.code));
    if (st->agent) step_agent(v, st, cut);
    else {
        put(v, "  returned: ");
        oneline(v, st->error.code ? NULL : st->output_json ? st->output_json : "null", cut);
        put(v, "\n");
    }
    if (st->error.code) {
        put(v, "  error %s: %s\n", kvm_errname(st->error.code), or_empty(st->error.message));
        if (st->error.traceback && *st->error.traceback) put(v, "  %s\n", st->error.traceback);
    }
}

int kvm_trace_view_steps(const char *run_dir, const kvm_trace_view_params_t *params, char **text) {
    *text = NULL;
    const kvm_trace_view_params_t def = kvm_trace_view_default_params();
    if (!params) params = &def;
    kvm_trace_log_t log;
    int rc = read_run("kvm_trace_view_steps", run_dir, &log);
    if (rc) return rc;
    view_t v = {KVM_SB_INIT, 0};
    size_t cut = params->full ? (size_t)-1 : VIEW_CUT;
    int from = 0;
    for (const kvm_trace_rec_t *r; (r = kvm_trace_log_next(&log, KVM_TRACE_STEP, &from)) != NULL;)
        if (params->step < 0 || r->step.idx == params->step) step_one(&v, &r->step, cut);
    kvm_trace_log_free(&log);
    return view_end(&v, text);
}

/* ---- replay --------------------------------------------------------------------------------------------- */

int kvm_trace_view_replay(const kvm_replay_t *r, char **text) {
    *text = NULL;
    if (!r) return kvm_seterr(KVM_EINVAL, "kvm_trace_view_replay: no replay given");
    view_t v = {KVM_SB_INIT, 0};
    for (int i = 0; i < r->n_steps; i++) {
        const kvm_replay_step_t *s = &r->steps[i];
        put(&v, "  #%-3d %-14s %s", s->idx, or_empty(s->node), s->same ? "same" : "DIFFERS");
        if (!s->same) {
            put(&v, "\n       trace:  ");
            oneline(&v, s->was, VIEW_CUT_REPLAY);
            put(&v, "\n       replay: ");
            oneline(&v, s->now ? s->now : "(no such step in the replay)", VIEW_CUT_REPLAY);
        }
        put(&v, "\n");
    }
    put(&v, "replay of %s: %d agent outputs the same, %d different; status %s (trace: %s)\n", r->run_id, r->same, r->differ,
        r->status ? kvm_errname(r->status) : "ok", r->trace_ended ? status_word(r->trace_status) : "no run.end");
    return view_end(&v, text);
}
