/* trace_view.c - the views of include/kvmesh.h (kvm_trace_view_*): the text `kvmesh trace ls|show|steps|replay`
 * prints, built from the typed records of the reader (trace.h), so that the CLI, the daemon and the debugger
 * show the same thing and only runtime/trace knows the schema. Each view appends to one string builder; the
 * first failure (an append, or reading a run while listing, out of memory) is kept and ends the view with
 * KVM_ENOMEM. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <cjson/cJSON.h>

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

/* Whether the run in dir made a step as agent (its log read; an unreadable log: no). */
static bool ran_agent(const char *dir, const char *agent) {
    kvm_trace_log_t log;
    if (kvm_trace_read(dir, &log)) return false;
    bool found = false;
    for (int from = 0; !found;) {
        const kvm_trace_rec_t *r = kvm_trace_log_next(&log, KVM_TRACE_STEP, &from);
        if (!r) break;
        found = r->step.agent && !strcmp(r->step.agent, agent);
    }
    kvm_trace_log_free(&log);
    return found;
}

typedef struct list_ctx {
    view_t v;
    const kvm_trace_filter_t *f;
    int listed;
} list_ctx_t;

/* Whether the run in dir passes the filter (its index.json when there is one; a run without it has not ended: it
 * counts as not ok, started at an unknown time, so a time window leaves it out). */
static bool passes(const kvm_trace_filter_t *f, const char *dir) {
    kvm_trace_log_t log;
    const bool have = kvm_trace_read_index(dir, &log) == 0;
    const kvm_trace_index_t *ix = have ? &log.recs[0].index : NULL;
    bool ok = true;
    if (f->workflow)
        ok = ix && ((ix->workflow && strstr(ix->workflow, f->workflow)) || (ix->graph && strstr(ix->graph, f->workflow)));
    if (ok && f->status) ok = (ix && !ix->error) == (f->status == 1);
    if (ok && (f->since_ns || f->until_ns))
        ok = ix && ix->started >= f->since_ns && (!f->until_ns || ix->started < f->until_ns);
    if (have) kvm_trace_log_free(&log);
    return ok && (!f->agent || ran_agent(dir, f->agent));
}

static void list_filtered(const char *dir, void *ud) {
    list_ctx_t *c = ud;
    if (c->v.rc || (c->f && !passes(c->f, dir))) return;
    list_one(dir, &c->v);
    c->listed++;
}

int kvm_trace_view_list_filtered(const char *root, const kvm_trace_filter_t *f, char **text) {
    *text = NULL;
    if (!root) return kvm_seterr(KVM_EINVAL, "kvm_trace_view_list: no trace root given");
    list_ctx_t c = {{KVM_SB_INIT, 0}, f, 0};
    int n = kvm_trace_find_runs(root, list_filtered, &c);
    if (n < 0) {
        kvm_sb_free(&c.v.b);
        return n;
    }
    int rc = view_end(&c.v, text);
    return rc ? rc : c.listed;
}

int kvm_trace_view_list(const char *root, char **text) { return kvm_trace_view_list_filtered(root, NULL, text); }

/* ---- search --------------------------------------------------------------------------------------------- */

#define SEARCH_MAX 1000
#define SEARCH_CONTEXT 60

typedef struct search_ctx {
    view_t v;
    const char *needle;
    int matches, unreadable;
    char run_id[40]; /* of the run being searched (its run.start record) */
} search_ctx_t;

static const char *find_nocase(const char *hay, const char *needle) {
    size_t n = strlen(needle);
    for (; *hay; hay++)
        if (!strncasecmp(hay, needle, n)) return hay;
    return NULL;
}

static void search_run(const char *dir, void *ud) {
    search_ctx_t *c = ud;
    if (c->v.rc || c->matches >= SEARCH_MAX) return;
    kvm_trace_reader_t *r = kvm_trace_reader_open(dir);
    if (!r) {
        c->unreadable++;
        return;
    }
    c->run_id[0] = '\0';
    for (int i = 0; i < kvm_trace_reader_n_records(r) && !c->v.rc && c->matches < SEARCH_MAX; i++) {
        const char *line = kvm_trace_reader_record_json(r, i), *type = kvm_trace_reader_record_type(r, i);
        if (!strcmp(type, "run.start")) { /* the id, for the lines that follow */
            const char *at = strstr(line, "\"run_id\":\"");
            snprintf(c->run_id, sizeof c->run_id, "%.32s", at ? at + 10 : "");
        }
        const char *hit = find_nocase(line, c->needle);
        if (!hit) continue;
        c->matches++;
        const char *from = hit - line > SEARCH_CONTEXT ? hit - SEARCH_CONTEXT : line;
        put(&c->v, "%-32s record %-4d %-10s ...", c->run_id, i, type);
        oneline(&c->v, from, (size_t)(hit - from) + strlen(c->needle) + SEARCH_CONTEXT);
        put(&c->v, "\n");
    }
    kvm_trace_reader_free(r);
}

int kvm_trace_view_search(const char *root, const char *needle, char **text) {
    *text = NULL;
    if (!root || !needle || !*needle) return kvm_seterr(KVM_EINVAL, "trace search: give a trace root and a non-empty text");
    search_ctx_t c = {.v = {KVM_SB_INIT, 0}, .needle = needle};
    int n = kvm_trace_find_runs(root, search_run, &c);
    if (n < 0) {
        kvm_sb_free(&c.v.b);
        return n;
    }
    if (c.matches >= SEARCH_MAX) put(&c.v, "(stopped at %d matches)\n", SEARCH_MAX);
    put(&c.v, "%d match%s in %d runs%s", c.matches, c.matches == 1 ? "" : "es", n, c.unreadable ? "" : "\n");
    if (c.unreadable) put(&c.v, " (%d unreadable runs skipped)\n", c.unreadable);
    int rc = view_end(&c.v, text);
    return rc ? rc : c.matches;
}

/* ---- a run ---------------------------------------------------------------------------------------------- */

/* The node of the step whose idx is `idx` in the log (NULL if none): a nested step's subgraph node. */
static const char *step_node_of(const kvm_trace_log_t *log, int idx) {
    for (int i = 0; i < log->n; i++)
        if (log->recs[i].type == KVM_TRACE_STEP && log->recs[i].step.idx == idx) return log->recs[i].step.node;
    return NULL;
}

/* A step's node as shown: a nested step (a subgraph's) as "subgraph_node/node" (its parent's name taken from the log),
 * indented by its depth. */
static const char *shown_node(const kvm_trace_log_t *log, const kvm_trace_step_t *st, char *buf, size_t cap) {
    if (st->depth <= 0 || !log) return or_empty(st->node);
    const char *p = step_node_of(log, st->parent);
    snprintf(buf, cap, "%*s%s/%s", 2 * (st->depth > 8 ? 8 : st->depth), "", p ? p : "?", or_empty(st->node));
    return buf;
}

static void run_step(view_t *v, const kvm_trace_step_t *st, const kvm_trace_log_t *log) {
    char name[256];
    put(v, "  #%-3d s%-3d %-14s %-5s %-5s", st->idx, st->superstep, shown_node(log, st, name, sizeof name), or_empty(st->op),
        status_word(st->error.code));
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
    if (st && st->run_start.resumed_run_id)
        put(&v, "resumed from run %s after super-step %d\n", st->run_start.resumed_run_id, st->run_start.resumed_superstep);
    cJSON *rp = st && st->run_start.replay_json ? cJSON_Parse(st->run_start.replay_json) : NULL;
    if (rp) { /* a counterfactual replay (docs/correct.md) */
        const cJSON *of = cJSON_GetObjectItemCaseSensitive(rp, "of"), *from = cJSON_GetObjectItemCaseSensitive(rp, "from_step"),
                    *ch = cJSON_GetObjectItemCaseSensitive(rp, "change"), *ed = cJSON_GetObjectItemCaseSensitive(rp, "edits");
        put(&v, "replay of run %s from step %d (%s), %d edited output%s\n", cJSON_IsString(of) ? of->valuestring : "?",
            cJSON_IsNumber(from) ? from->valueint : -1, cJSON_IsString(ch) ? ch->valuestring : "?", cJSON_GetArraySize(ed),
            cJSON_GetArraySize(ed) == 1 ? "" : "s");
        cJSON_Delete(rp);
    }
    put(&v, "\nsteps:\n");
    for (int i = 0; i < log.n; i++) {
        const kvm_trace_rec_t *r = &log.recs[i];
        if (r->type == KVM_TRACE_STEP) run_step(&v, &r->step, &log);
        else if (r->type == KVM_TRACE_EDGE) put(&v, "        edge %s -> %s (%s)\n", or_empty(r->edge.from), or_empty(r->edge.to), or_empty(r->edge.kind));
        else if (r->type == KVM_TRACE_LOG) put(&v, "        log [%s] %s\n", or_empty(r->log.level), or_empty(r->log.msg));
        else if (r->type == KVM_TRACE_INTERRUPT)
            put(&v, "        interrupt from %s: %s\n", or_empty(r->interrupt.node), or_empty(r->interrupt.payload_json));
        else if (r->type == KVM_TRACE_RESUME) put(&v, "        answer to %s: %s\n", or_empty(r->resume.node), or_empty(r->resume.value_json));
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

/* The fields of a decision object other than those already printed, as key=value (numbers, booleans, strings);
 * zeros and false left out. */
static void decision_fields(view_t *v, const cJSON *o, const char *const *skip, int n_skip) {
    for (const cJSON *f = o ? o->child : NULL; f; f = f->next) {
        bool skipped = false;
        for (int i = 0; i < n_skip; i++) skipped |= !strcmp(f->string, skip[i]);
        if (skipped || cJSON_IsFalse(f) || (cJSON_IsNumber(f) && f->valuedouble == 0)) continue;
        if (cJSON_IsTrue(f)) put(v, " %s", f->string);
        else if (cJSON_IsNumber(f)) put(v, " %s=%g", f->string, f->valuedouble);
        else if (cJSON_IsString(f) && strspn(f->valuestring, "0") != strlen(f->valuestring)) put(v, " %s=%s", f->string, f->valuestring);
    }
}

/* A C2C step's fusion (llm.c, docs/c2c.md): what was fused from which sharer, the open gates per branch (receiver
 * layers), and the times. */
static void step_c2c(view_t *v, const cJSON *c) {
    if (!cJSON_IsObject(c)) return;
    const cJSON *sec = cJSON_GetObjectItemCaseSensitive(c, "section"), *at = cJSON_GetObjectItemCaseSensitive(c, "start");
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(c, "fused"), *sh = cJSON_GetObjectItemCaseSensitive(c, "sharer");
    const cJSON *fu = cJSON_GetObjectItemCaseSensitive(c, "fuser");
    put(v, "  c2c: %d tokens of {%s} at %d fused from %s (fuser %s)\n", cJSON_IsNumber(n) ? n->valueint : 0,
        cJSON_IsString(sec) ? sec->valuestring : "?", cJSON_IsNumber(at) ? at->valueint : 0,
        cJSON_IsString(sh) ? sh->valuestring : "?", cJSON_IsString(fu) ? fu->valuestring : "?");
    const cJSON *al = cJSON_GetObjectItemCaseSensitive(c, "aligned");
    if (cJSON_IsObject(al)) { /* aligned mode (spec §4): the two tokenizations side by side */
        const char *k[5] = {"alignment", "sharer_head_tokens", "sharer_pads", "mapped_several", "mapped_empty"};
        const cJSON *x[5];
        for (int i = 0; i < 5; i++) x[i] = cJSON_GetObjectItemCaseSensitive(al, k[i]);
        put(v, "    aligned (%s): the sharer's own rendering before the section %d tokens + %d pads; section tokens "
               "mapped to several %d, to none %d\n", cJSON_IsString(x[0]) ? x[0]->valuestring : "?",
            cJSON_IsNumber(x[1]) ? x[1]->valueint : 0, cJSON_IsNumber(x[2]) ? x[2]->valueint : 0,
            cJSON_IsNumber(x[3]) ? x[3]->valueint : 0, cJSON_IsNumber(x[4]) ? x[4]->valueint : 0);
    }
    for (int b = 0; b < 2; b++) {
        const cJSON *g = cJSON_GetObjectItemCaseSensitive(c, b ? "gates_v" : "gates_k"), *e;
        if (!cJSON_IsArray(g)) g = NULL;
        int open = 0, total = 0;
        put(v, "    gates %c open at layers [", b ? 'V' : 'K');
        cJSON_ArrayForEach(e, g) {
            if (cJSON_IsTrue(e)) put(v, "%s%d", open++ ? " " : "", total);
            total++;
        }
        put(v, "] (%d of %d)\n", open, total);
    }
    const cJSON *pm = cJSON_GetObjectItemCaseSensitive(c, "prefill_ms"), *fm = cJSON_GetObjectItemCaseSensitive(c, "fuse_ms");
    const cJSON *xm = cJSON_GetObjectItemCaseSensitive(c, "prefix_ms");
    put(v, "    times: prefix %.2f ms, section prefill (receiver + sharer) %.2f ms, fusion %.2f ms\n",
        cJSON_IsNumber(xm) ? xm->valuedouble : 0, cJSON_IsNumber(pm) ? pm->valuedouble : 0, cJSON_IsNumber(fm) ? fm->valuedouble : 0);
}

/* runtime/comm's reuse decisions (a JSON object the trace carries as it is), one line per placeholder: what it
 * held, where, what was decided and the figures behind it. The raw JSON too with --full, or when it is not an
 * object of the expected shape. */
static void step_decisions(view_t *v, const char *json, bool full) {
    cJSON *d = cJSON_Parse(json);
    const cJSON *rep = cJSON_GetObjectItemCaseSensitive(d, "report");
    const cJSON *phs = cJSON_GetObjectItemCaseSensitive(rep, "placeholders");
    if (cJSON_IsObject(rep)) {
        const cJSON *pol = cJSON_GetObjectItemCaseSensitive(d, "policy"), *mode = cJSON_GetObjectItemCaseSensitive(rep, "mode");
        put(v, "  reuse decisions: policy %s, mode %s;", cJSON_IsString(pol) ? pol->valuestring : "?",
            cJSON_IsString(mode) ? mode->valuestring : "?");
        static const char *const rskip[] = {"policy", "mode", "placeholders", "input_tokens", "exact", "offset", "naive", "recomputed", "fused"};
        decision_fields(v, rep, rskip, 9);
        put(v, "\n");
    }
    const cJSON *ph, *list = cJSON_IsArray(phs) ? phs : NULL;
    cJSON_ArrayForEach(ph, list) {
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(ph, "name"), *dec = cJSON_GetObjectItemCaseSensitive(ph, "decision");
        const cJSON *tok = cJSON_GetObjectItemCaseSensitive(ph, "tokens"), *at = cJSON_GetObjectItemCaseSensitive(ph, "start");
        put(v, "    %-24s %4d tokens at %-4d %-12s", cJSON_IsString(name) ? name->valuestring : "?", cJSON_IsNumber(tok) ? tok->valueint : 0,
            cJSON_IsNumber(at) ? at->valueint : 0, cJSON_IsString(dec) ? dec->valuestring : "?");
        static const char *const pskip[] = {"name", "decision", "tokens", "start", "segment", "sample"};
        decision_fields(v, ph, pskip, 6);
        put(v, "\n");
    }
    step_c2c(v, cJSON_GetObjectItemCaseSensitive(d, "c2c"));
    if (full || !cJSON_IsObject(rep)) put(v, "  reuse decisions (JSON): %s\n", json);
    cJSON_Delete(d);
}

static void step_agent(view_t *v, const kvm_trace_step_t *st, size_t cut) {
    step_seen(v, st, cut);
    const kvm_trace_kv_t *kv = &st->kv;
    const kvm_trace_timings_t *tm = &st->timings;
    put(v, "  prompt: %d tokens; KV %s: %d exact, %d offset-corrected, %d naive, %d recomputed, %d fused; anchors %d\n", st->prompt_tokens,
        or_empty(kv->mode), kv->exact, kv->offset, kv->naive, kv->recomputed, kv->fused, kv->anchors);
    if (kv->decisions_json) step_decisions(v, kv->decisions_json, cut == (size_t)-1);
    put(v, "  timings: queue %.1f ms, TTFT %.1f ms, decode %.1f ms (%.1f tok/s); %d forward passes, batch up to %d sequences (mean %.2f)\n",
        tm->queue_ms, tm->ttft_ms, tm->decode_ms, tm->tokens_per_s, st->batch.forwards, st->batch.max_seqs, st->batch.mean_seqs);
    put(v, "  said (%d tokens, stop %s): ", st->output_tokens, or_empty(st->stop));
    oneline(v, st->output_text, cut);
    put(v, "\n");
}

static void step_one(view_t *v, const kvm_trace_step_t *st, size_t cut) {
    put(v, "== step %d (super-step %d) node '%s'", st->idx, st->superstep, or_empty(st->node));
    if (st->depth > 0) put(v, " in subgraph '%s' (depth %d, of step %d)", or_empty(st->graph), st->depth, st->parent);
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

/* ---- diff ----------------------------------------------------------------------------------------------- */

/* A step's place for alignment: its node and which time this node ran in its run (a node that runs in a loop
 * or a map is matched occurrence by occurrence, whatever order concurrent nodes were logged in). */
typedef struct diff_step {
    const kvm_trace_step_t *st;
    int occurrence;
    int match; /* index into the other run's steps, or -1 */
} diff_step_t;

typedef struct diff_run {
    kvm_trace_log_t log;
    const kvm_trace_run_start_t *start;
    const kvm_trace_run_end_t *end;
    diff_step_t *steps;
    int n;
} diff_run_t;

static const char *step_out(const kvm_trace_step_t *s) { return s->agent ? or_empty(s->output_text) : s->output_json ? s->output_json : "null"; }
static bool str_same(const char *a, const char *b) { return !strcmp(or_empty(a), or_empty(b)); }

/* JSON values equal as values (an object's keys in any order: a Lua table's order is not its content); text
 * that is not JSON compared as text. */
static bool json_same(const char *a, const char *b) {
    if (str_same(a, b)) return true;
    cJSON *x = cJSON_Parse(or_empty(a)), *y = x ? cJSON_Parse(or_empty(b)) : NULL;
    bool same = x && y && cJSON_Compare(x, y, true);
    cJSON_Delete(x);
    cJSON_Delete(y);
    return same;
}

/* A step's output as the other side's: text for agents, a JSON value for func and tool nodes. */
static bool out_same(const kvm_trace_step_t *a, const kvm_trace_step_t *b) {
    if (a->error.code != b->error.code) return false;
    return a->agent ? str_same(a->output_text, b->output_text) : json_same(step_out(a), step_out(b));
}

static int diff_load(const char *run_dir, diff_run_t *r) {
    memset(r, 0, sizeof *r);
    int rc = read_run("kvm_trace_view_diff", run_dir, &r->log);
    if (rc) return rc;
    const kvm_trace_rec_t *st = kvm_trace_log_next(&r->log, KVM_TRACE_RUN_START, NULL);
    const kvm_trace_rec_t *en = kvm_trace_log_next(&r->log, KVM_TRACE_RUN_END, NULL);
    r->start = st ? &st->run_start : NULL;
    r->end = en ? &en->run_end : NULL;
    r->steps = kvm_calloc((size_t)(r->log.n ? r->log.n : 1), sizeof *r->steps);
    if (!r->steps) return KVM_ENOMEM;
    int from = 0;
    for (const kvm_trace_rec_t *x; (x = kvm_trace_log_next(&r->log, KVM_TRACE_STEP, &from)) != NULL;) {
        diff_step_t *d = &r->steps[r->n];
        d->st = &x->step;
        d->match = -1;
        for (int k = 0; k < r->n; k++) d->occurrence += str_same(r->steps[k].st->node, x->step.node);
        r->n++;
    }
    return 0;
}

static void diff_free(diff_run_t *r) {
    kvm_free(r->steps);
    kvm_trace_log_free(&r->log);
}

static void diff_align(diff_run_t *a, diff_run_t *b) {
    for (int i = 0; i < a->n; i++)
        for (int k = 0; k < b->n; k++)
            if (b->steps[k].match < 0 && b->steps[k].occurrence == a->steps[i].occurrence &&
                str_same(b->steps[k].st->node, a->steps[i].st->node)) {
                a->steps[i].match = k;
                b->steps[k].match = i;
                break;
            }
}

/* How a step's prompt KV was obtained, in a few words. */
static void diff_kv(view_t *v, const kvm_trace_step_t *s) {
    if (!s->agent) {
        put(v, "%-22s", s->op ? s->op : "func");
        return;
    }
    char b[64];
    snprintf(b, sizeof b, "%s %de/%do/%dr", or_empty(s->kv.mode), s->kv.exact, s->kv.offset + s->kv.naive, s->kv.recomputed);
    put(v, "%-22s", b);
}

static void diff_header(view_t *v, const char *tag, const char *dir, const diff_run_t *r) {
    const kvm_trace_run_start_t *s = r->start;
    put(v, "%s: %s  %s seed %llu kv %s  %s\n", tag, s ? or_empty(s->run_id) : dir, s ? or_empty(s->graph) : "?",
        s ? (unsigned long long)s->seed : 0ULL, s && s->kv_override ? s->kv_override : "per agent",
        r->end ? (r->end->error.code ? kvm_errname(r->end->error.code) : "ok") : "no run.end");
}

/* One aligned pair (b may be NULL: only in A); returns whether it differs, and what: 1 output, 2 prompt. */
static int diff_pair(view_t *v, const kvm_trace_step_t *a, const kvm_trace_step_t *b, bool a_side) {
    const kvm_trace_step_t *x = a ? a : b;
    put(v, "  s%-3d %-16s ", x->superstep, or_empty(x->node));
    if (!a || !b) {
        put(v, "only in %s: ", a_side ? "A" : "B");
        oneline(v, step_out(x), VIEW_CUT_SHOW);
        put(v, "\n");
        return 1;
    }
    bool same_prompt = str_same(a->prompt_text, b->prompt_text) && a->prompt_tokens == b->prompt_tokens;
    bool same_out = out_same(a, b);
    put(v, "%-8s ", same_out ? (same_prompt ? "same" : "same*") : same_prompt ? "OUTPUT" : "INPUT");
    diff_kv(v, a);
    put(v, " | ");
    diff_kv(v, b);
    put(v, " | ");
    oneline(v, step_out(a), VIEW_CUT_SHOW / 2);
    if (!same_out) {
        put(v, "  vs  ");
        oneline(v, step_out(b), VIEW_CUT_SHOW / 2);
    }
    put(v, "\n");
    return same_out ? (same_prompt ? 0 : 2) : same_prompt ? 1 : 3;
}

/* The first step of A (in log order) whose output differs from B's with the same prompt: where the runs part. */
static void diff_first(view_t *v, const diff_run_t *a, const diff_run_t *b, int first_any) {
    for (int i = 0; i < a->n; i++) {
        const diff_step_t *d = &a->steps[i];
        if (d->match < 0) continue;
        const kvm_trace_step_t *x = d->st, *y = b->steps[d->match].st;
        if (!str_same(x->prompt_text, y->prompt_text) || out_same(x, y)) continue;
        put(v, "\nfirst divergence: super-step %d, node '%s' (A step %d, B step %d): the same prompt, another output.\n",
            x->superstep, or_empty(x->node), x->idx, y->idx);
        put(v, "  A (kv ");
        diff_kv(v, x);
        put(v, ") said: ");
        oneline(v, step_out(x), VIEW_CUT);
        put(v, "\n  B (kv ");
        diff_kv(v, y);
        put(v, ") said: ");
        oneline(v, step_out(y), VIEW_CUT);
        put(v, "\n  every later difference follows from it or from the inputs (`kvmesh trace steps RUN --step N` shows both)\n");
        return;
    }
    if (first_any >= 0)
        put(v, "\nfirst difference: A step %d ('%s'); no step with the same prompt answers differently (the inputs, the "
            "graph's path or a step missing on one side differ)\n", a->steps[first_any].st->idx, or_empty(a->steps[first_any].st->node));
}

int kvm_trace_view_diff(const char *run_a, const char *run_b, char **text) {
    *text = NULL;
    diff_run_t a, b;
    int rc = diff_load(run_a, &a);
    if (!rc) rc = diff_load(run_b, &b);
    else memset(&b, 0, sizeof b);
    if (rc) {
        diff_free(&a);
        diff_free(&b);
        return rc;
    }
    diff_align(&a, &b);
    view_t v = {KVM_SB_INIT, 0};
    diff_header(&v, "A", run_a, &a);
    diff_header(&v, "B", run_b, &b);
    if (a.start && b.start && !json_same(a.start->inputs_json, b.start->inputs_json)) put(&v, "inputs differ\n");
    if (a.start && b.start && a.start->source_hash != b.start->source_hash) put(&v, "the workflow scripts differ\n");
    put(&v, "\n  step node             diff     %-22s | %-22s | output (A  vs  B)\n", "A kv", "B kv");
    put(&v, "  (kv: mode, then prompt tokens exact / offset-corrected / recomputed)\n");
    int differ = 0, first_any = -1;
    for (int i = 0; i < a.n; i++) {
        const diff_step_t *d = &a.steps[i];
        int what = diff_pair(&v, d->st, d->match >= 0 ? b.steps[d->match].st : NULL, true);
        if (what & 1) differ++;
        if (what && first_any < 0) first_any = i;
    }
    for (int k = 0; k < b.n; k++)
        if (b.steps[k].match < 0) differ += diff_pair(&v, NULL, b.steps[k].st, false) & 1;
    if (differ || first_any >= 0) diff_first(&v, &a, &b, first_any);
    const char *oa = a.end ? a.end->outputs_json : NULL, *ob = b.end ? b.end->outputs_json : NULL;
    bool same = json_same(oa, ob);
    put(&v, "\nresult: %s\n", same ? "the same outputs" : "the outputs differ");
    if (!same) {
        put(&v, "  A: ");
        oneline(&v, oa ? oa : "(none)", VIEW_CUT);
        put(&v, "\n  B: ");
        oneline(&v, ob ? ob : "(none)", VIEW_CUT);
        put(&v, "\n");
    }
    put(&v, "%d of %d aligned steps answer differently (same* = same output from another prompt)\n", differ, a.n > b.n ? a.n : b.n);
    diff_free(&a);
    diff_free(&b);
    rc = view_end(&v, text);
    return rc ? rc : differ;
}
