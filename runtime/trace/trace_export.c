/* trace_export.c - a run's trace exported (include/kvmesh.h kvm_trace_export): OTLP/JSON spans after the
 * OpenTelemetry GenAI semantic conventions (interfaces.md §4.4), the Who&When conversation format, or the
 * complete records as stored. Everything is read through the trace reader (kvm_trace_read,
 * kvm_trace_reader_open, kvm_failure_from_trace), which never crashes on a torn or hostile file: a torn last
 * line is not exported, a bad line is the reader's KVM_EFORMAT naming path:line.
 *
 * Each OTLP span is built as a small cJSON tree and printed into the document's text at once, so memory holds the
 * read log, the text and one span. Every allocation failure is remembered in the builder (oom) and ends the export
 * with KVM_ENOMEM: a partial document is never returned. Strings of a hostile trace may hold bytes that are not
 * UTF-8: each tree is cleaned as the writer cleans records (trace_utf8_clean) before it is printed. */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "../core/core.h"
#include "../core/sb.h"
#include "trace.h"
#include "trace_internal.h"

#define EXPORT_CONTENT_MAX 4096 /* bytes per message in a truncated export (interfaces.md §4.4) */

kvm_trace_export_params_t kvm_trace_export_default_params(void) {
    return (kvm_trace_export_params_t){
        .format = KVM_TRACE_FORMAT_OTLP_JSON, .content = KVM_TRACE_CONTENT_TRUNCATED, .content_max = EXPORT_CONTENT_MAX};
}

static const char *const k_format_names[] = {[KVM_TRACE_FORMAT_OTLP_JSON] = "otlp-json", [KVM_TRACE_FORMAT_WHOWHEN] = "whowhen",
                                             [KVM_TRACE_FORMAT_JSONL] = "jsonl"};

const char *kvm_trace_format_name(int format) {
    return format >= KVM_TRACE_FORMAT_OTLP_JSON && format <= KVM_TRACE_FORMAT_JSONL ? k_format_names[format] : NULL;
}

int kvm_trace_format_from_name(const char *name) {
    for (int f = KVM_TRACE_FORMAT_OTLP_JSON; name && f <= KVM_TRACE_FORMAT_JSONL; f++)
        if (!strcmp(name, k_format_names[f])) return f;
    return kvm_seterr(KVM_EINVAL, "trace export: unknown format '%s' (otlp-json, whowhen or jsonl)", name ? name : "(none)");
}

/* ---- the OTLP builder ----------------------------------------------------------------------------------- */

typedef struct otlp {
    const kvm_trace_export_params_t *p;
    char trace_id[KVM_TRACE_ID_HEX];
    uint64_t id_base; /* span k's id is mix64(id_base + k): distinct for distinct k */
    bool oom;         /* an allocation failed: the export ends with KVM_ENOMEM */
    kvm_sb_t *out;    /* the document's text; spans are printed into it one by one */
    int n_spans;      /* printed so far */
} otlp_t;

/* cJSON results, the failure remembered. */
static cJSON *ck(otlp_t *x, cJSON *j) {
    if (!j) x->oom = true;
    return j;
}

/* obj[key] = v; false (v deleted: never use it after a failure) when out of memory. */
static bool add(otlp_t *x, cJSON *obj, const char *key, cJSON *v) {
    if (!v || !obj || !cJSON_AddItemToObject(obj, key, v)) {
        cJSON_Delete(v);
        x->oom = true;
        return false;
    }
    return true;
}

/* arr += v; false (v deleted) when out of memory. */
static bool push(otlp_t *x, cJSON *arr, cJSON *v) {
    if (!v || !arr || !cJSON_AddItemToArray(arr, v)) {
        cJSON_Delete(v);
        x->oom = true;
        return false;
    }
    return true;
}

/* j printed (its strings made valid UTF-8) and appended to x->out, then deleted; NULL or a failure: x->oom. */
static void print_to(otlp_t *x, cJSON *j) {
    char *t = j && !x->oom ? (trace_utf8_clean(j), cJSON_PrintUnformatted(j)) : NULL;
    if (!t || kvm_sb_puts(x->out, t)) x->oom = true;
    cJSON_free(t);
    cJSON_Delete(j);
}

/* One span of the spans array: printed as soon as it is built, so that memory holds one span's tree at a time
 * (a func may make 100,000 calls). */
static void emit(otlp_t *x, cJSON *span) {
    if (x->n_spans++ && !x->oom && kvm_sb_putc(x->out, ',')) x->oom = true;
    print_to(x, span);
}

static char *u64_text(uint64_t v, char buf[24]) {
    snprintf(buf, 24, "%" PRIu64, v);
    return buf;
}

/* splitmix64's finaliser: a bijection of 64-bit words, so distinct span numbers give distinct span ids. */
static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void span_id(const otlp_t *x, int k, char out[17]) {
    uint64_t v = mix64(x->id_base + (uint64_t)k);
    snprintf(out, 17, "%016" PRIx64, v ? v : 1); /* the all-zero id is invalid in OTLP */
}

static bool is_trace_id(const char *s) {
    if (!s || strlen(s) != 32) return false;
    bool nonzero = false;
    for (int i = 0; i < 32; i++) {
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return false;
        nonzero |= s[i] != '0';
    }
    return nonzero;
}

/* An attribute {"key": k, "value": {kind: v}} appended to attrs. */
static void attr(otlp_t *x, cJSON *attrs, const char *key, const char *kind, cJSON *v) {
    cJSON *a = ck(x, cJSON_CreateObject()), *val = ck(x, cJSON_CreateObject());
    if (a) add(x, a, "key", ck(x, cJSON_CreateString(key)));
    if (val) add(x, val, kind, v);
    else cJSON_Delete(v);
    if (a) add(x, a, "value", val);
    else cJSON_Delete(val);
    push(x, attrs, a);
}

static void attr_str(otlp_t *x, cJSON *attrs, const char *key, const char *v) {
    if (v) attr(x, attrs, key, "stringValue", ck(x, cJSON_CreateString(v)));
}

static void attr_int(otlp_t *x, cJSON *attrs, const char *key, int64_t v) {
    char buf[24];
    snprintf(buf, sizeof buf, "%" PRId64, v);
    attr(x, attrs, key, "intValue", ck(x, cJSON_CreateString(buf)));
}

static void attr_dbl(otlp_t *x, cJSON *attrs, const char *key, double v) {
    if (isfinite(v)) attr(x, attrs, key, "doubleValue", ck(x, cJSON_CreateNumber(v)));
}

static void attr_bool(otlp_t *x, cJSON *attrs, const char *key, bool v) { attr(x, attrs, key, "boolValue", ck(x, cJSON_CreateBool(v))); }

static void attr_strs(otlp_t *x, cJSON *attrs, const char *key, const char *const *v, int n) {
    cJSON *arr = ck(x, cJSON_CreateObject()), *vals = ck(x, cJSON_CreateArray());
    for (int i = 0; vals && i < n; i++) {
        cJSON *e = ck(x, cJSON_CreateObject());
        if (e) add(x, e, "stringValue", ck(x, cJSON_CreateString(v[i] ? v[i] : "")));
        push(x, vals, e);
    }
    if (arr) add(x, arr, "values", vals);
    else cJSON_Delete(vals);
    attr(x, attrs, key, "arrayValue", arr);
}

/* s as the export carries content: whole, or cut to content_max bytes on a UTF-8 character boundary (a copy, or
 * NULL when out of memory: x->oom). */
static char *content(otlp_t *x, const char *s) {
    size_t n = strlen(s);
    if (x->p->content == KVM_TRACE_CONTENT_TRUNCATED && n > x->p->content_max) {
        n = x->p->content_max;
        while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80) n--;
    }
    char *c = kvm_strndup(s, n);
    if (!c) x->oom = true;
    return c;
}

/* A span: traceId, spanId, parentSpanId (k_parent < 0: none), name, kind INTERNAL, times; its attributes array in
 * *attrs. NULL when out of memory (x->oom). */
static cJSON *span_new(otlp_t *x, int k, int k_parent, const char *name, uint64_t t0, uint64_t t1, cJSON **attrs) {
    char id[17], buf[24];
    cJSON *s = ck(x, cJSON_CreateObject());
    *attrs = NULL;
    if (!s) return NULL;
    add(x, s, "traceId", ck(x, cJSON_CreateString(x->trace_id)));
    span_id(x, k, id);
    add(x, s, "spanId", ck(x, cJSON_CreateString(id)));
    if (k_parent >= 0) {
        span_id(x, k_parent, id);
        add(x, s, "parentSpanId", ck(x, cJSON_CreateString(id)));
    }
    add(x, s, "name", ck(x, cJSON_CreateString(name)));
    add(x, s, "kind", ck(x, cJSON_CreateNumber(1)));
    add(x, s, "startTimeUnixNano", ck(x, cJSON_CreateString(u64_text(t0, buf))));
    add(x, s, "endTimeUnixNano", ck(x, cJSON_CreateString(u64_text(t1, buf))));
    cJSON *a = ck(x, cJSON_CreateArray());
    if (add(x, s, "attributes", a)) *attrs = a;
    return s;
}

/* status {code: 1 OK | 2 ERROR, message}; on error also error.type and an `exception` event at t. */
static void span_status(otlp_t *x, cJSON *s, cJSON *attrs, const kvm_trace_error_t *e, uint64_t t) {
    cJSON *st = ck(x, cJSON_CreateObject());
    if (st) add(x, st, "code", ck(x, cJSON_CreateNumber(e->code ? 2 : 1)));
    if (st && e->code && e->message) add(x, st, "message", ck(x, cJSON_CreateString(e->message)));
    add(x, s, "status", st);
    if (!e->code) return;
    attr_str(x, attrs, "error.type", kvm_errname(e->code));
    char buf[24];
    cJSON *ev = ck(x, cJSON_CreateObject()), *evs = ck(x, cJSON_CreateArray()), *ea = ck(x, cJSON_CreateArray());
    attr_str(x, ea, "exception.type", kvm_errname(e->code));
    attr_str(x, ea, "exception.message", e->message ? e->message : kvm_strerror(e->code));
    attr_str(x, ea, "exception.stacktrace", e->traceback);
    if (ev) {
        add(x, ev, "timeUnixNano", ck(x, cJSON_CreateString(u64_text(t, buf))));
        add(x, ev, "name", ck(x, cJSON_CreateString("exception")));
        add(x, ev, "attributes", ea);
    } else cJSON_Delete(ea);
    push(x, evs, ev);
    add(x, s, "events", evs);
}

/* One event {timeUnixNano, name, attributes} on the events array *evs (made on first use). */
static cJSON *event_new(otlp_t *x, cJSON **evs, const char *name, uint64_t t) {
    char buf[24];
    if (!*evs) *evs = ck(x, cJSON_CreateArray());
    cJSON *ev = ck(x, cJSON_CreateObject()), *ea = ck(x, cJSON_CreateArray());
    bool kept = false;
    if (ev) {
        add(x, ev, "timeUnixNano", ck(x, cJSON_CreateString(u64_text(t, buf))));
        add(x, ev, "name", ck(x, cJSON_CreateString(name)));
        kept = add(x, ev, "attributes", ea);
    } else cJSON_Delete(ea);
    return push(x, *evs, ev) && kept ? ea : NULL; /* ea is ev's: gone with it when push failed */
}

/* One message of gen_ai.input.messages / gen_ai.output.messages: {"role", "parts": [{"type": "text", "content"}]}
 * (and "finish_reason" for output), the content as the export carries it. */
static void message(otlp_t *x, cJSON *msgs, const char *role, const char *text, const char *finish) {
    char *c = content(x, text ? text : "");
    cJSON *m = ck(x, cJSON_CreateObject()), *parts = ck(x, cJSON_CreateArray()), *part = ck(x, cJSON_CreateObject());
    if (part) {
        add(x, part, "type", ck(x, cJSON_CreateString("text")));
        add(x, part, "content", ck(x, cJSON_CreateString(c ? c : "")));
    }
    push(x, parts, part);
    if (m) {
        add(x, m, "role", ck(x, cJSON_CreateString(role)));
        add(x, m, "parts", parts);
        if (finish) add(x, m, "finish_reason", ck(x, cJSON_CreateString(finish)));
    } else cJSON_Delete(parts);
    push(x, msgs, m);
    kvm_free(c);
}

/* attrs[key] = the JSON text of msgs (which is consumed). */
static void attr_json(otlp_t *x, cJSON *attrs, const char *key, cJSON *msgs) {
    char *t = msgs && !x->oom ? cJSON_PrintUnformatted(msgs) : NULL;
    if (!t) x->oom = true;
    else attr_str(x, attrs, key, t);
    cJSON_free(t);
    cJSON_Delete(msgs);
}

/* kvmesh's stop reasons as the conventions' finish reasons. */
static const char *finish_reason(const char *stop) {
    if (!stop) return NULL;
    if (!strcmp(stop, "eos") || !strcmp(stop, "string")) return "stop";
    if (!strcmp(stop, "length") || !strcmp(stop, "context")) return "length";
    return stop;
}

/* A step's times: [t_start, t_end], falling back on the record's time; never ending before it starts. */
static void step_times(const kvm_trace_rec_t *r, uint64_t *t0, uint64_t *t1) {
    *t0 = r->step.t_start ? r->step.t_start : r->ts;
    *t1 = r->step.t_end > *t0 ? r->step.t_end : *t0;
}

typedef struct step_span {
    const kvm_trace_rec_t *rec;
    int parent;       /* index into the step_span array of the func / tool step that made this call; -1 = the run */
    uint64_t t0, t1;  /* widened to hold the calls it made */
} step_span_t;

/* The agent step's two spans: invoke_agent (k) and chat (k + 1) under it. */
static void agent_spans(otlp_t *x, const step_span_t *ss, int k, int k_parent) {
    const kvm_trace_step_t *s = &ss->rec->step;
    const char *agent = s->agent ? s->agent : "?";
    kvm_sb_t name = KVM_SB_INIT;
    if (kvm_sb_printf(&name, "invoke_agent %s", agent)) x->oom = true;
    cJSON *attrs, *sp = span_new(x, k, k_parent, kvm_sb_str(&name), ss->t0, ss->t1, &attrs);
    const char *fr = finish_reason(s->stop);
    attr_str(x, attrs, "gen_ai.operation.name", "invoke_agent");
    attr_str(x, attrs, "gen_ai.provider.name", "kvmesh");
    attr_str(x, attrs, "gen_ai.agent.name", agent);
    attr_str(x, attrs, "gen_ai.agent.id", agent);
    attr_str(x, attrs, "gen_ai.request.model", s->model);
    attr_int(x, attrs, "gen_ai.usage.input_tokens", s->prompt_tokens);
    attr_int(x, attrs, "gen_ai.usage.output_tokens", s->output_tokens);
    attr_int(x, attrs, "gen_ai.usage.cache_read.input_tokens", (int64_t)s->kv.exact + s->kv.offset + s->kv.naive);
    if (fr) attr_strs(x, attrs, "gen_ai.response.finish_reasons", &fr, 1);
    attr_int(x, attrs, "kvmesh.step.index", s->idx);
    attr_int(x, attrs, "kvmesh.step.superstep", s->superstep);
    attr_str(x, attrs, "kvmesh.node", s->node);
    attr_str(x, attrs, "kvmesh.step.via", s->via);
    attr_int(x, attrs, "kvmesh.kv.exact_tokens", s->kv.exact);
    attr_int(x, attrs, "kvmesh.kv.offset_tokens", s->kv.offset);
    attr_int(x, attrs, "kvmesh.kv.naive_tokens", s->kv.naive);
    attr_int(x, attrs, "kvmesh.kv.recomputed_tokens", s->kv.recomputed);
    attr_int(x, attrs, "kvmesh.kv.fused_tokens", s->kv.fused);
    attr_str(x, attrs, "kvmesh.kvcomm.mode", s->kv.mode);
    attr_int(x, attrs, "kvmesh.kvcomm.anchors", s->kv.anchors);
    attr_dbl(x, attrs, "kvmesh.ttft_ms", s->timings.ttft_ms);
    attr_dbl(x, attrs, "kvmesh.queue_ms", s->timings.queue_ms);
    attr_dbl(x, attrs, "kvmesh.decode_ms", s->timings.decode_ms);
    if (sp) span_status(x, sp, attrs, &s->error, ss->t1);
    emit(x, sp);

    /* the model call under it */
    kvm_sb_clear(&name);
    if (kvm_sb_printf(&name, "chat %s", s->model ? s->model : "?")) x->oom = true;
    cJSON *ca, *cs = span_new(x, k + 1, k, kvm_sb_str(&name), ss->t0, ss->t1, &ca);
    kvm_sb_free(&name);
    attr_str(x, ca, "gen_ai.operation.name", "chat");
    attr_str(x, ca, "gen_ai.provider.name", "kvmesh");
    attr_str(x, ca, "gen_ai.request.model", s->model);
    if (s->sampling.max_tokens > 0) attr_int(x, ca, "gen_ai.request.max_tokens", s->sampling.max_tokens);
    attr_dbl(x, ca, "gen_ai.request.temperature", s->sampling.temperature);
    attr_dbl(x, ca, "gen_ai.request.top_p", s->sampling.top_p);
    if (s->sampling.top_k > 0) attr_int(x, ca, "gen_ai.request.top_k", s->sampling.top_k);
    if (fr) attr_strs(x, ca, "gen_ai.response.finish_reasons", &fr, 1);
    attr_int(x, ca, "gen_ai.usage.input_tokens", s->prompt_tokens);
    attr_int(x, ca, "gen_ai.usage.output_tokens", s->output_tokens);
    if (x->p->content != KVM_TRACE_CONTENT_NONE) {
        cJSON *in = ck(x, cJSON_CreateArray());
        if (s->system) message(x, in, "system", s->system, NULL);
        kvm_sb_t user = KVM_SB_INIT; /* the user message: its pieces in order */
        for (int i = 0; i < s->n_pieces; i++)
            if (s->pieces[i].text && kvm_sb_puts(&user, s->pieces[i].text)) x->oom = true;
        message(x, in, "user", s->n_pieces ? kvm_sb_str(&user) : s->prompt_text, NULL);
        kvm_sb_free(&user);
        attr_json(x, ca, "gen_ai.input.messages", in);
        if (!s->error.code) {
            cJSON *out = ck(x, cJSON_CreateArray());
            message(x, out, "assistant", s->output_text, fr ? fr : "stop");
            attr_json(x, ca, "gen_ai.output.messages", out);
        }
    }
    if (cs) span_status(x, cs, ca, &s->error, ss->t1);
    emit(x, cs);
}

/* A func / tool node's span (k): execute_tool {node} for a tool, kvmesh.func {node} for a func. */
static void node_span(otlp_t *x, const step_span_t *ss, int k) {
    const kvm_trace_step_t *s = &ss->rec->step;
    bool tool = s->op && !strcmp(s->op, "tool");
    kvm_sb_t name = KVM_SB_INIT;
    if (kvm_sb_printf(&name, "%s %s", tool ? "execute_tool" : "kvmesh.func", s->node ? s->node : "?")) x->oom = true;
    cJSON *attrs, *sp = span_new(x, k, 0, kvm_sb_str(&name), ss->t0, ss->t1, &attrs);
    kvm_sb_free(&name);
    if (tool) {
        char id[128];
        snprintf(id, sizeof id, "%s-%d", x->trace_id, s->idx);
        attr_str(x, attrs, "gen_ai.operation.name", "execute_tool");
        attr_str(x, attrs, "gen_ai.tool.name", s->node);
        attr_str(x, attrs, "gen_ai.tool.call.id", id);
    }
    attr_int(x, attrs, "kvmesh.step.index", s->idx);
    attr_int(x, attrs, "kvmesh.step.superstep", s->superstep);
    attr_str(x, attrs, "kvmesh.node", s->node);
    attr_str(x, attrs, "kvmesh.step.op", s->op);
    if (x->p->content != KVM_TRACE_CONTENT_NONE && !s->error.code) {
        char *c = content(x, s->output_json ? s->output_json : "null");
        attr_str(x, attrs, tool ? "gen_ai.tool.call.result" : "kvmesh.func.result", c);
        kvm_free(c);
    }
    if (sp) span_status(x, sp, attrs, &s->error, ss->t1);
    emit(x, sp);
}

/* A func / tool step (not itself a call) by super-step and node, sorted: where ctx:call steps find their node. */
typedef struct node_key {
    int superstep;
    const char *node;
    int pos; /* index into the step_span array */
} node_key_t;

static int node_key_cmp(const void *a, const void *b) {
    const node_key_t *x = a, *y = b;
    if (x->superstep != y->superstep) return x->superstep < y->superstep ? -1 : 1;
    int c = strcmp(x->node, y->node);
    return c ? c : (x->pos > y->pos) - (x->pos < y->pos);
}

/* Sets each step's parent: for a ctx:call, the first func / tool step of the same node and super-step (one lookup
 * each: a func may make 100,000 calls); -1 (the run) otherwise. false when out of memory. */
static bool call_parents(step_span_t *ss, int n) {
    int m = 0;
    for (int i = 0; i < n; i++) {
        const kvm_trace_step_t *s = &ss[i].rec->step;
        ss[i].parent = -1;
        m += !s->agent && !s->via && s->node;
    }
    node_key_t *k = m ? kvm_malloc((size_t)m * sizeof *k) : NULL;
    if (m && !k) return false;
    for (int i = 0, j = 0; i < n; i++) {
        const kvm_trace_step_t *s = &ss[i].rec->step;
        if (!s->agent && !s->via && s->node) k[j++] = (node_key_t){s->superstep, s->node, i};
    }
    if (m) qsort(k, (size_t)m, sizeof *k, node_key_cmp);
    for (int i = 0; i < n; i++) {
        const kvm_trace_step_t *c = &ss[i].rec->step;
        if (!c->via || !c->node || !c->agent) continue;
        node_key_t want = {c->superstep, c->node, -1};
        int lo = 0, hi = m;
        while (lo < hi) { /* the first key not below want */
            int mid = lo + (hi - lo) / 2;
            if (node_key_cmp(&k[mid], &want) < 0) lo = mid + 1;
            else hi = mid;
        }
        if (lo < m && k[lo].superstep == c->superstep && !strcmp(k[lo].node, c->node)) ss[i].parent = k[lo].pos;
    }
    kvm_free(k);
    return true;
}

/* The run's span (0) with its attributes, status and events (log lines, interrupts, resumes). */
static void run_span(otlp_t *x, const kvm_trace_log_t *log, const kvm_trace_run_start_t *st,
                     const kvm_trace_rec_t *end, uint64_t t0, uint64_t t1) {
    const char *wf = st->graph ? st->graph : st->workflow_path ? st->workflow_path : "?";
    kvm_sb_t name = KVM_SB_INIT;
    if (kvm_sb_printf(&name, "invoke_workflow %s", wf)) x->oom = true;
    cJSON *attrs, *sp = span_new(x, 0, -1, kvm_sb_str(&name), t0, t1, &attrs);
    kvm_sb_free(&name);
    char buf[24];
    attr_str(x, attrs, "gen_ai.operation.name", "invoke_workflow");
    attr_str(x, attrs, "gen_ai.workflow.name", wf);
    attr_str(x, attrs, "gen_ai.conversation.id", st->run_id);
    attr_str(x, attrs, "gen_ai.provider.name", "kvmesh");
    attr_str(x, attrs, "kvmesh.workflow.path", st->workflow_path);
    attr_str(x, attrs, "kvmesh.run.seed", u64_text(st->seed, buf));
    attr_str(x, attrs, "kvmesh.kv.override", st->kv_override);
    attr_bool(x, attrs, "kvmesh.mock", st->mock);
    attr_str(x, attrs, "kvmesh.resumed_from", st->resumed_run_id);
    attr_bool(x, attrs, "kvmesh.trace.torn_tail", log->torn_tail);
    attr_bool(x, attrs, "kvmesh.run.ended", end != NULL);
    if (end) {
        attr_int(x, attrs, "gen_ai.usage.input_tokens", end->run_end.input_tokens);
        attr_int(x, attrs, "gen_ai.usage.output_tokens", end->run_end.output_tokens);
        attr_int(x, attrs, "kvmesh.run.agent_calls", end->run_end.agent_calls);
        attr_dbl(x, attrs, "kvmesh.run.wall_ms", end->run_end.wall_ms);
        if (sp) span_status(x, sp, attrs, &end->run_end.error, t1);
    } else if (sp) { /* never ended (going on, or died): status UNSET */
        cJSON *s0 = ck(x, cJSON_CreateObject());
        if (s0) add(x, s0, "code", ck(x, cJSON_CreateNumber(0)));
        add(x, sp, "status", s0);
    }
    cJSON *evs = sp ? cJSON_GetObjectItemCaseSensitive(sp, "events") : NULL;
    bool had = evs != NULL;
    for (int i = 0; sp && i < log->n; i++) {
        const kvm_trace_rec_t *r = &log->recs[i];
        uint64_t t = r->ts < t0 ? t0 : r->ts > t1 ? t1 : r->ts;
        cJSON *ea = NULL;
        if (r->type == KVM_TRACE_LOG) {
            ea = event_new(x, &evs, "kvmesh.log", t);
            attr_str(x, ea, "kvmesh.log.level", r->log.level);
            if (x->p->content != KVM_TRACE_CONTENT_NONE) {
                char *c = content(x, r->log.msg ? r->log.msg : "");
                attr_str(x, ea, "kvmesh.log.message", c);
                kvm_free(c);
            }
        } else if (r->type == KVM_TRACE_INTERRUPT || r->type == KVM_TRACE_RESUME) {
            bool intr = r->type == KVM_TRACE_INTERRUPT;
            ea = event_new(x, &evs, intr ? "kvmesh.interrupt" : "kvmesh.resume", t);
            attr_str(x, ea, "kvmesh.node", intr ? r->interrupt.node : r->resume.node);
            attr_int(x, ea, "kvmesh.step.superstep", intr ? r->interrupt.superstep : r->resume.superstep);
        }
    }
    if (evs && !had) add(x, sp, "events", evs);
    emit(x, sp);
}

static int export_otlp(const char *run_dir, const kvm_trace_export_params_t *p, kvm_sb_t *out) {
    kvm_trace_log_t log = {0};
    int rc = kvm_trace_read(run_dir, &log);
    if (rc) return rc;
    const kvm_trace_rec_t *st = kvm_trace_log_next(&log, KVM_TRACE_RUN_START, NULL), *end = NULL;
    if (!st) {
        kvm_trace_log_free(&log);
        return kvm_seterr(KVM_EFORMAT, "%s: the trace has no run.start record", run_dir);
    }
    for (int from = 0; kvm_trace_log_next(&log, KVM_TRACE_RUN_END, &from);) end = &log.recs[from - 1]; /* the last */
    otlp_t x = {.p = p};
    const char *rid = st->run_start.run_id ? st->run_start.run_id : "";
    uint64_t h = kvm_hash64(rid, strlen(rid), 0x6b766d657368ULL);
    if (is_trace_id(rid)) snprintf(x.trace_id, sizeof x.trace_id, "%s", rid);
    else snprintf(x.trace_id, sizeof x.trace_id, "%016" PRIx64 "%016" PRIx64, mix64(h) | 1, mix64(h + 1)); /* a run id of an old or odd trace */
    x.id_base = h;

    /* the steps, their parents and times; the run's span holds them all */
    int n = 0;
    for (int from = 0; kvm_trace_log_next(&log, KVM_TRACE_STEP, &from);) n++;
    step_span_t *ss = n ? kvm_calloc((size_t)n, sizeof *ss) : NULL;
    if (n && !ss) x.oom = true;
    uint64_t t0 = st->ts, t1 = end ? end->ts : st->ts;
    for (int i = 0; i < log.n; i++) t1 = log.recs[i].ts > t1 ? log.recs[i].ts : t1;
    for (int i = 0, from = 0; ss && i < n; i++) {
        ss[i].rec = kvm_trace_log_next(&log, KVM_TRACE_STEP, &from);
        step_times(ss[i].rec, &ss[i].t0, &ss[i].t1);
    }
    if (ss && !call_parents(ss, n)) x.oom = true;
    for (int i = 0; ss && i < n; i++) {
        step_span_t *pa = ss[i].parent >= 0 ? &ss[ss[i].parent] : NULL;
        if (pa && ss[i].t0 < pa->t0) pa->t0 = ss[i].t0;
        if (pa && ss[i].t1 > pa->t1) pa->t1 = ss[i].t1;
    }
    for (int i = 0; ss && i < n; i++) {
        if (!t0 || ss[i].t0 < t0) t0 = ss[i].t0;
        if (ss[i].t1 > t1) t1 = ss[i].t1;
    }
    if (t1 < t0) t1 = t0;

    /* {"resourceSpans":[{"resource":{...},"scopeSpans":[{"scope":{...},"spans":[ span, ... ]}]}]} */
    x.out = out;
    cJSON *res = ck(&x, cJSON_CreateObject()), *rattrs = ck(&x, cJSON_CreateArray());
    char host[256] = "";
    if (gethostname(host, sizeof host - 1)) snprintf(host, sizeof host, "unknown");
    attr_str(&x, rattrs, "service.name", "kvmesh");
    attr_str(&x, rattrs, "service.version", st->run_start.build_version ? st->run_start.build_version : kvm_version());
    attr_str(&x, rattrs, "host.name", host);
    if (res) add(&x, res, "attributes", rattrs);
    else cJSON_Delete(rattrs);
    cJSON *scope = ck(&x, cJSON_CreateObject());
    if (scope) {
        add(&x, scope, "name", ck(&x, cJSON_CreateString("kvmesh")));
        add(&x, scope, "version", ck(&x, cJSON_CreateString(kvm_version())));
    }
    if (kvm_sb_puts(out, "{\"resourceSpans\":[{\"resource\":")) x.oom = true;
    print_to(&x, res);
    if (!x.oom && kvm_sb_puts(out, ",\"scopeSpans\":[{\"scope\":")) x.oom = true;
    print_to(&x, scope);
    if (!x.oom && kvm_sb_puts(out, ",\"spans\":[")) x.oom = true;
    run_span(&x, &log, &st->run_start, end, t0, t1);
    /* span numbers: 0 the run; step i: 1 + 2i (its invoke_agent / node span) and 2 + 2i (its chat span) */
    for (int i = 0; ss && i < n && !x.oom; i++) {
        int k = 1 + 2 * i, kp = ss[i].parent >= 0 ? 1 + 2 * ss[i].parent : 0;
        if (ss[i].rec->step.agent) agent_spans(&x, &ss[i], k, kp);
        else node_span(&x, &ss[i], k);
    }
    kvm_free(ss);
    kvm_trace_log_free(&log);
    if (!x.oom && kvm_sb_puts(out, "]}]}]}\n")) x.oom = true;
    return x.oom ? kvm_seterr(KVM_ENOMEM, "trace export: out of memory exporting %s", run_dir) : 0;
}

/* ---- Who&When ------------------------------------------------------------------------------------------- */

/* {"question_ID", "question", "is_correct", "history": [{"content", "role", "name"}], "system_prompt": {agent:
 * role}, "workflow", "run_status"}: history[i] is step i of kvm_failure_from_trace (0 the task), the indexing of
 * blame and of the Who&When logs. */
static int export_whowhen(const char *run_dir, kvm_sb_t *out) {
    kvm_failure_t *f = kvm_failure_from_trace(run_dir);
    if (!f) return kvm_errcode() ? kvm_errcode() : KVM_EFORMAT;
    kvm_trace_log_t log = {0};
    int rc = kvm_trace_read(run_dir, &log);
    if (rc) {
        kvm_failure_free(f);
        return rc;
    }
    const kvm_trace_rec_t *st = kvm_trace_log_next(&log, KVM_TRACE_RUN_START, NULL), *end = NULL;
    for (int from = 0; kvm_trace_log_next(&log, KVM_TRACE_RUN_END, &from);) end = &log.recs[from - 1]; /* the last */
    otlp_t x = {0};
    cJSON *d = ck(&x, cJSON_CreateObject());
    add(&x, d, "question_ID", ck(&x, cJSON_CreateString(f->id ? f->id : "")));
    add(&x, d, "question", ck(&x, cJSON_CreateString(f->question ? f->question : "")));
    add(&x, d, "is_correct", ck(&x, end ? cJSON_CreateBool(end->run_end.error.code == 0) : cJSON_CreateNull()));
    if (st) add(&x, d, "workflow", ck(&x, cJSON_CreateString(st->run_start.graph ? st->run_start.graph : "")));
    add(&x, d, "run_status", ck(&x, cJSON_CreateString(!end ? "unfinished" : end->run_end.error.code ? kvm_errname(end->run_end.error.code) : "ok")));
    cJSON *h = ck(&x, cJSON_CreateArray());
    for (int i = 0; h && i < f->n_steps; i++) {
        const kvm_failure_step_t *s = &f->steps[i];
        cJSON *m = ck(&x, cJSON_CreateObject());
        add(&x, m, "content", ck(&x, cJSON_CreateString(s->content ? s->content : "")));
        add(&x, m, "role", ck(&x, cJSON_CreateString(i == 0 ? "user" : s->tool_result ? "tool" : "assistant")));
        add(&x, m, "name", ck(&x, cJSON_CreateString(s->agent ? s->agent : "")));
        push(&x, h, m);
    }
    add(&x, d, "history", h);
    cJSON *sp = ck(&x, cJSON_CreateObject());
    for (int i = 0; st && sp && i < st->run_start.n_agents; i++) {
        const kvm_trace_agent_t *a = &st->run_start.agents[i];
        if (a->name && !cJSON_GetObjectItemCaseSensitive(sp, a->name))
            add(&x, sp, a->name, ck(&x, cJSON_CreateString(a->role ? a->role : "")));
    }
    add(&x, d, "system_prompt", sp);
    kvm_trace_log_free(&log);
    kvm_failure_free(f);
    if (!x.oom) trace_utf8_clean(d);
    char *text = x.oom ? NULL : cJSON_PrintUnformatted(d);
    cJSON_Delete(d);
    rc = text ? kvm_sb_puts(out, text) : KVM_ENOMEM;
    if (!rc) rc = kvm_sb_putc(out, '\n');
    cJSON_free(text);
    return rc ? kvm_seterr(KVM_ENOMEM, "trace export: out of memory exporting %s", run_dir) : 0;
}

/* ---- JSONL ---------------------------------------------------------------------------------------------- */

static int export_jsonl(const char *run_dir, kvm_sb_t *out) {
    kvm_trace_reader_t *t = kvm_trace_reader_open(run_dir);
    if (!t) return kvm_errcode() ? kvm_errcode() : KVM_EIO;
    int rc = 0;
    for (int i = 0; !rc && i < kvm_trace_reader_n_records(t); i++) {
        rc = kvm_sb_puts(out, kvm_trace_reader_record_json(t, i));
        if (!rc) rc = kvm_sb_putc(out, '\n');
    }
    kvm_trace_reader_free(t);
    return rc ? kvm_seterr(KVM_ENOMEM, "trace export: out of memory exporting %s", run_dir) : 0;
}

int kvm_trace_export(const char *run_dir, const kvm_trace_export_params_t *params, char **text, size_t *len) {
    if (text) *text = NULL;
    if (len) *len = 0;
    if (!run_dir || !text) return kvm_seterr(KVM_EINVAL, "trace export: no run directory or no place for the text");
    kvm_trace_export_params_t p = params ? *params : kvm_trace_export_default_params();
    if (!kvm_trace_format_name(p.format)) return kvm_seterr(KVM_EINVAL, "trace export: unknown format %d", p.format);
    if (p.content < KVM_TRACE_CONTENT_TRUNCATED || p.content > KVM_TRACE_CONTENT_FULL)
        return kvm_seterr(KVM_EINVAL, "trace export: unknown content setting %d (truncated, none or full)", p.content);
    kvm_sb_t b = KVM_SB_INIT;
    int rc = p.format == KVM_TRACE_FORMAT_OTLP_JSON ? export_otlp(run_dir, &p, &b)
             : p.format == KVM_TRACE_FORMAT_WHOWHEN ? export_whowhen(run_dir, &b)
                                                    : export_jsonl(run_dir, &b);
    if (!rc && !(*text = kvm_sb_take(&b, len))) rc = kvm_seterr(KVM_ENOMEM, "trace export: out of memory");
    kvm_sb_free(&b);
    return rc;
}
