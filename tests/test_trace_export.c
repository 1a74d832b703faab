/* test_trace_export.c - kvm_trace_export (include/kvmesh.h; runtime/trace/trace_export.c) on traces written through
 * the trace writer: the OTLP/JSON tree (one trace id = the run id, 16-hex span ids, each distinct, parents that
 * resolve, an agent call made with ctx:call under its func's span, a chat span under each agent step, times
 * nested), the GenAI and kvmesh.kv.* attributes with their OTLP types, error status and exception events, message
 * content truncated on a UTF-8 boundary / whole / left out, the same text for the same trace; Who&When's history
 * equal to blame's steps; JSONL = the complete records (a torn tail left out, a bad line an error naming
 * file:line); the arguments; an allocation failing anywhere. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include <kvmesh.h>

#include "runtime/core/core.h"
#include "runtime/trace/trace.h"
#include "tests/support/test_dir.h"

#define RUN_ID "4bf92f3577b34da6a3ce929d0e0e4736"
#define LONG_N 6000 /* bytes of the long output: 2000 three-byte characters */

static char root[256];
static char long_text[LONG_N + 1];

static int setup(void **s) {
    (void)s;
    for (int i = 0; i < LONG_N; i += 3) memcpy(long_text + i, "\xE2\x82\xAC", 3); /* U+20AC, the euro sign */
    long_text[LONG_N] = '\0';
    return test_dir_make(root, sizeof root, "test_trace_export");
}

static int teardown(void **s) {
    (void)s;
    return test_dir_remove(root);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* A run of graph 'team': step 0 agent 'writer' (with a role, KV reuse, a long output), step 1 an agent call
 * 'helper' made by func 'ask' through ctx:call, step 2 func 'ask' itself, step 3 agent 'critic' that failed;
 * a log line; run.end with KVM_EBUDGET. Its directory in dir. */
static void write_run(const char *name, const char *run_id, bool with_end, char *dir, size_t cap) {
    kvm_trace_t *t = kvm_trace_open(root, name);
    assert_non_null(t);
    kvm_trace_agent_t agents[] = {{.name = "writer", .role = "You write.", .template_text = "write {input}"},
                                  {.name = "helper", .template_text = "help {input}"},
                                  {.name = "critic", .template_text = "judge {agent:writer}"}};
    kvm_trace_run_start_t rs = {.run_id = run_id, .inputs_json = "{\"input\":\"the task\"}", .source = "", .workflow_path = "team.lua",
                                .graph = "team", .seed = 7, .agents = agents, .n_agents = 3, .build_version = "0.1.0"};
    assert_int_equal(kvm_trace_write_run_start(t, &rs), 0);
    uint64_t t0 = now_ns();
    kvm_trace_part_t pieces[] = {{.text = "write "}, {.slot = "state:input", .src = "input", .text = "the task"}};
    kvm_trace_step_t w = {.idx = 0, .superstep = 1, .node = "writer", .agent = "writer", .op = "chat", .t_start = t0, .t_end = t0 + 1000,
                          .model = "mock:echo", .system = "You write.", .pieces = pieces, .n_pieces = 2, .prompt_tokens = 20,
                          .kv = {.exact = 4, .offset = 10, .naive = 1, .recomputed = 5, .fused = 0, .mode = "reuse", .anchors = 2},
                          .sampling = {.temperature = 0.5, .top_p = 0.9, .top_k = 40, .max_tokens = 64}, .output_text = long_text,
                          .output_tokens = 9, .stop = "eos", .timings = {.ttft_ms = 1.5}};
    kvm_trace_step_t h = {.idx = 1, .superstep = 2, .node = "ask", .agent = "helper", .op = "chat", .via = "ctx:call", .t_start = t0 + 2000,
                          .t_end = t0 + 3000, .model = "mock:echo", .prompt_tokens = 6, .kv = {.recomputed = 6, .mode = "dense"},
                          .output_text = "ok", .output_tokens = 1, .stop = "length"};
    kvm_trace_step_t f = {.idx = 2, .superstep = 2, .node = "ask", .op = "func", .t_start = t0 + 2500, .t_end = t0 + 2600,
                          .output_json = "{\"n\":1}"};
    kvm_trace_step_t c = {.idx = 3, .superstep = 3, .node = "critic", .agent = "critic", .op = "chat", .t_start = t0 + 4000, .t_end = t0 + 5000,
                          .model = "mock:echo", .prompt_tokens = 3, .kv = {.recomputed = 3, .mode = "dense"},
                          .error = {.code = KVM_EBUDGET, .message = "team.lua:9: token budget", .traceback = "stack traceback:\n\tteam.lua:9"}};
    kvm_trace_log_rec_t lg = {.level = "info", .msg = "halfway", .superstep = 2};
    assert_int_equal(kvm_trace_write_step(t, &w), 0);
    assert_int_equal(kvm_trace_write_step(t, &h), 0);
    assert_int_equal(kvm_trace_write_log(t, &lg), 0);
    assert_int_equal(kvm_trace_write_step(t, &f), 0);
    assert_int_equal(kvm_trace_write_step(t, &c), 0);
    if (with_end) {
        kvm_trace_run_end_t e = {.run_id = run_id, .error = {.code = KVM_EBUDGET, .message = "token budget"}, .input_tokens = 29, .output_tokens = 10};
        assert_int_equal(kvm_trace_write_run_end(t, &e), 0);
    }
    snprintf(dir, cap, "%s", t->dir);
    kvm_trace_close(t);
}

static cJSON *export_json(const char *dir, int format, int content, size_t content_max) {
    kvm_trace_export_params_t p = kvm_trace_export_default_params();
    p.format = format;
    p.content = content;
    if (content_max) p.content_max = content_max;
    char *text = NULL;
    size_t len = 0;
    if (kvm_trace_export(dir, &p, &text, &len)) fail_msg("export of %s: %s", dir, kvm_errmsg());
    assert_true(len > 0 && text[len - 1] == '\n' && strlen(text) == len);
    cJSON *j = cJSON_Parse(text);
    kvm_free(text);
    assert_non_null(j);
    return j;
}

static cJSON *spans_of(cJSON *doc) {
    cJSON *rs = cJSON_GetArrayItem(cJSON_GetObjectItem(doc, "resourceSpans"), 0);
    cJSON *ss = cJSON_GetArrayItem(cJSON_GetObjectItem(rs, "scopeSpans"), 0);
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(ss, "scope"), "name")->valuestring, "kvmesh");
    cJSON *spans = cJSON_GetObjectItem(ss, "spans");
    assert_true(cJSON_IsArray(spans));
    return spans;
}

static cJSON *span_named(cJSON *spans, const char *name) {
    cJSON *s;
    cJSON_ArrayForEach(s, spans) if (!strcmp(cJSON_GetObjectItem(s, "name")->valuestring, name)) return s;
    fail_msg("no span '%s'", name);
    return NULL;
}

static cJSON *span_by_id(cJSON *spans, const char *id) {
    cJSON *s;
    cJSON_ArrayForEach(s, spans) if (!strcmp(cJSON_GetObjectItem(s, "spanId")->valuestring, id)) return s;
    return NULL;
}

/* The value object of attribute key ({"stringValue": ...}), NULL when absent. */
static cJSON *attr(cJSON *span, const char *key) {
    cJSON *a;
    cJSON_ArrayForEach(a, cJSON_GetObjectItem(span, "attributes")) if (!strcmp(cJSON_GetObjectItem(a, "key")->valuestring, key)) return cJSON_GetObjectItem(a, "value");
    return NULL;
}

static const char *attr_str(cJSON *span, const char *key) {
    cJSON *v = cJSON_GetObjectItem(attr(span, key), "stringValue");
    if (!cJSON_IsString(v)) fail_msg("attribute %s is not a stringValue", key);
    return v->valuestring;
}

static long long attr_int(cJSON *span, const char *key) {
    cJSON *v = cJSON_GetObjectItem(attr(span, key), "intValue");
    if (!cJSON_IsString(v)) fail_msg("attribute %s is not an intValue string", key);
    return atoll(v->valuestring);
}

static bool hex_of(const char *s, size_t n) {
    if (strlen(s) != n) return false;
    for (size_t i = 0; i < n; i++)
        if (!strchr("0123456789abcdef", s[i])) return false;
    return true;
}

static unsigned long long ns_of(cJSON *s, const char *f) {
    cJSON *v = cJSON_GetObjectItem(s, f);
    assert_true(cJSON_IsString(v));
    return strtoull(v->valuestring, NULL, 10);
}

static void test_otlp_spans_ids_parents_and_times(void **st) {
    (void)st;
    char dir[512];
    write_run("tree", RUN_ID, true, dir, sizeof dir);
    cJSON *doc = export_json(dir, KVM_TRACE_FORMAT_OTLP_JSON, KVM_TRACE_CONTENT_TRUNCATED, 0);
    cJSON *spans = spans_of(doc);
    assert_int_equal(cJSON_GetArraySize(spans), 1 + 2 * 3 + 1); /* the run, 3 agent steps with their chat, 1 func */
    cJSON *s;
    int roots = 0;
    cJSON_ArrayForEach(s, spans) {
        assert_string_equal(cJSON_GetObjectItem(s, "traceId")->valuestring, RUN_ID);
        const char *id = cJSON_GetObjectItem(s, "spanId")->valuestring;
        assert_true(hex_of(id, 16));
        cJSON *o;
        int same = 0;
        cJSON_ArrayForEach(o, spans) same += !strcmp(cJSON_GetObjectItem(o, "spanId")->valuestring, id);
        assert_int_equal(same, 1);
        assert_int_equal(cJSON_GetObjectItem(s, "kind")->valueint, 1);
        unsigned long long a = ns_of(s, "startTimeUnixNano"), b = ns_of(s, "endTimeUnixNano");
        assert_true(a > 0 && a <= b);
        cJSON *pid = cJSON_GetObjectItem(s, "parentSpanId");
        if (!pid) {
            roots++;
            continue;
        }
        cJSON *p = span_by_id(spans, pid->valuestring);
        assert_non_null(p);
        assert_true(ns_of(p, "startTimeUnixNano") <= a && b <= ns_of(p, "endTimeUnixNano")); /* nested in time */
    }
    assert_int_equal(roots, 1);
    cJSON *run = span_named(spans, "invoke_workflow team"), *ask = span_named(spans, "kvmesh.func ask");
    cJSON *writer = span_named(spans, "invoke_agent writer"), *helper = span_named(spans, "invoke_agent helper");
    const char *run_id = cJSON_GetObjectItem(run, "spanId")->valuestring;
    assert_string_equal(cJSON_GetObjectItem(writer, "parentSpanId")->valuestring, run_id);
    assert_string_equal(cJSON_GetObjectItem(ask, "parentSpanId")->valuestring, run_id);
    /* the ctx:call under its func, whose span was widened to hold it */
    assert_string_equal(cJSON_GetObjectItem(helper, "parentSpanId")->valuestring, cJSON_GetObjectItem(ask, "spanId")->valuestring);
    assert_true(ns_of(ask, "startTimeUnixNano") <= ns_of(helper, "startTimeUnixNano"));
    /* each agent step has one chat span under it */
    int chats = 0;
    cJSON_ArrayForEach(s, spans) if (!strncmp(cJSON_GetObjectItem(s, "name")->valuestring, "chat ", 5)) {
        chats++;
        cJSON *p = span_by_id(spans, cJSON_GetObjectItem(s, "parentSpanId")->valuestring);
        assert_non_null(p);
        assert_memory_equal(cJSON_GetObjectItem(p, "name")->valuestring, "invoke_agent ", 13);
        assert_string_equal(attr_str(s, "gen_ai.operation.name"), "chat");
    }
    assert_int_equal(chats, 3);
    /* the run: GenAI attributes, its error, a log event */
    assert_string_equal(attr_str(run, "gen_ai.operation.name"), "invoke_workflow");
    assert_string_equal(attr_str(run, "gen_ai.workflow.name"), "team");
    assert_string_equal(attr_str(run, "gen_ai.conversation.id"), RUN_ID);
    assert_string_equal(attr_str(run, "kvmesh.run.seed"), "7");
    assert_int_equal(attr_int(run, "gen_ai.usage.input_tokens"), 29);
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(run, "status"), "code")->valueint, 2);
    assert_string_equal(attr_str(run, "error.type"), "KVM_EBUDGET");
    bool log_event = false;
    cJSON_ArrayForEach(s, cJSON_GetObjectItem(run, "events")) log_event |= !strcmp(cJSON_GetObjectItem(s, "name")->valuestring, "kvmesh.log");
    assert_true(log_event);
    cJSON_Delete(doc);
}

static void test_otlp_genai_and_kv_attributes(void **st) {
    (void)st;
    char dir[512];
    write_run("attrs", RUN_ID, true, dir, sizeof dir);
    cJSON *doc = export_json(dir, KVM_TRACE_FORMAT_OTLP_JSON, KVM_TRACE_CONTENT_FULL, 0);
    cJSON *spans = spans_of(doc);
    cJSON *w = span_named(spans, "invoke_agent writer");
    assert_string_equal(attr_str(w, "gen_ai.operation.name"), "invoke_agent");
    assert_string_equal(attr_str(w, "gen_ai.agent.name"), "writer");
    assert_string_equal(attr_str(w, "gen_ai.request.model"), "mock:echo");
    assert_int_equal(attr_int(w, "gen_ai.usage.input_tokens"), 20);
    assert_int_equal(attr_int(w, "gen_ai.usage.output_tokens"), 9);
    assert_int_equal(attr_int(w, "gen_ai.usage.cache_read.input_tokens"), 4 + 10 + 1); /* exact + offset + naive */
    assert_int_equal(attr_int(w, "kvmesh.kv.exact_tokens"), 4);
    assert_int_equal(attr_int(w, "kvmesh.kv.offset_tokens"), 10);
    assert_int_equal(attr_int(w, "kvmesh.kv.naive_tokens"), 1);
    assert_int_equal(attr_int(w, "kvmesh.kv.recomputed_tokens"), 5);
    assert_int_equal(attr_int(w, "kvmesh.kv.fused_tokens"), 0);
    assert_string_equal(attr_str(w, "kvmesh.kvcomm.mode"), "reuse");
    assert_int_equal(attr_int(w, "kvmesh.kvcomm.anchors"), 2);
    assert_int_equal(attr_int(w, "kvmesh.step.index"), 0);
    assert_true(cJSON_GetObjectItem(attr(w, "kvmesh.ttft_ms"), "doubleValue")->valuedouble == 1.5);
    cJSON *fr = cJSON_GetObjectItem(cJSON_GetObjectItem(attr(w, "gen_ai.response.finish_reasons"), "arrayValue"), "values");
    assert_int_equal(cJSON_GetArraySize(fr), 1);
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(fr, 0), "stringValue")->valuestring, "stop"); /* eos */
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(w, "status"), "code")->valueint, 1);
    cJSON *chat = span_named(spans, "chat mock:echo");
    assert_int_equal(attr_int(chat, "gen_ai.request.max_tokens"), 64);
    assert_true(cJSON_GetObjectItem(attr(chat, "gen_ai.request.temperature"), "doubleValue")->valuedouble == 0.5);
    assert_int_equal(attr_int(chat, "gen_ai.request.top_k"), 40);
    cJSON *in = cJSON_Parse(attr_str(chat, "gen_ai.input.messages"));
    assert_non_null(in);
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(in, 0), "role")->valuestring, "system");
    cJSON *user = cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetArrayItem(in, 1), "parts"), 0);
    assert_string_equal(cJSON_GetObjectItem(user, "content")->valuestring, "write the task"); /* the pieces, in order */
    cJSON_Delete(in);
    /* the failed agent: ERROR, error.type, an exception event with the message and the Lua traceback */
    cJSON *c = span_named(spans, "invoke_agent critic");
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(c, "status"), "code")->valueint, 2);
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(c, "status"), "message")->valuestring, "team.lua:9: token budget");
    assert_string_equal(attr_str(c, "error.type"), "KVM_EBUDGET");
    cJSON *ev = cJSON_GetArrayItem(cJSON_GetObjectItem(c, "events"), 0);
    assert_string_equal(cJSON_GetObjectItem(ev, "name")->valuestring, "exception");
    assert_string_equal(attr_str(ev, "exception.stacktrace"), "stack traceback:\n\tteam.lua:9");
    /* the func: its result, no GenAI operation; the helper went through ctx:call */
    cJSON *ask = span_named(spans, "kvmesh.func ask");
    assert_string_equal(attr_str(ask, "kvmesh.func.result"), "{\"n\":1}");
    assert_null(attr(ask, "gen_ai.operation.name"));
    assert_string_equal(attr_str(span_named(spans, "invoke_agent helper"), "kvmesh.step.via"), "ctx:call");
    cJSON_Delete(doc);
}

/* The output message's content in the chat span of agent 'writer'. */
static char *writer_output(cJSON *doc) {
    cJSON *spans = spans_of(doc), *w = span_named(spans, "invoke_agent writer"), *s;
    cJSON_ArrayForEach(s, spans) {
        cJSON *p = cJSON_GetObjectItem(s, "parentSpanId");
        if (p && !strcmp(p->valuestring, cJSON_GetObjectItem(w, "spanId")->valuestring)) {
            cJSON *v = attr(s, "gen_ai.output.messages");
            if (!v) return NULL;
            cJSON *m = cJSON_Parse(cJSON_GetObjectItem(v, "stringValue")->valuestring);
            cJSON *part = cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetArrayItem(m, 0), "parts"), 0);
            char *t = strdup(cJSON_GetObjectItem(part, "content")->valuestring);
            cJSON_Delete(m);
            return t;
        }
    }
    fail_msg("no chat span under writer");
    return NULL;
}

static void test_otlp_content_truncated_on_a_character_boundary_full_or_none(void **st) {
    (void)st;
    char dir[512];
    write_run("content", RUN_ID, true, dir, sizeof dir);
    cJSON *doc = export_json(dir, KVM_TRACE_FORMAT_OTLP_JSON, KVM_TRACE_CONTENT_TRUNCATED, 0); /* 4096 bytes */
    char *out = writer_output(doc);
    assert_int_equal(strlen(out), 4095);                  /* 1365 whole euro signs: the 1366th would pass 4096 */
    assert_memory_equal(out, long_text, 4095);
    free(out);
    cJSON_Delete(doc);
    doc = export_json(dir, KVM_TRACE_FORMAT_OTLP_JSON, KVM_TRACE_CONTENT_TRUNCATED, 10);
    out = writer_output(doc);
    assert_int_equal(strlen(out), 9);
    free(out);
    cJSON_Delete(doc);
    doc = export_json(dir, KVM_TRACE_FORMAT_OTLP_JSON, KVM_TRACE_CONTENT_FULL, 0);
    out = writer_output(doc);
    assert_string_equal(out, long_text);
    free(out);
    cJSON_Delete(doc);
    doc = export_json(dir, KVM_TRACE_FORMAT_OTLP_JSON, KVM_TRACE_CONTENT_NONE, 0);
    assert_null(writer_output(doc));
    assert_null(attr(span_named(spans_of(doc), "kvmesh.func ask"), "kvmesh.func.result"));
    cJSON_Delete(doc);
}

static void test_otlp_is_the_same_text_for_the_same_trace_and_handles_odd_run_ids(void **st) {
    (void)st;
    char dir[512];
    write_run("same", RUN_ID, false, dir, sizeof dir);
    char *a = NULL, *b = NULL;
    assert_int_equal(kvm_trace_export(dir, NULL, &a, NULL), 0);
    assert_int_equal(kvm_trace_export(dir, NULL, &b, NULL), 0);
    assert_string_equal(a, b);
    kvm_free(a);
    kvm_free(b);
    /* a run that never ended: the run's span is UNSET and says so */
    cJSON *doc = export_json(dir, KVM_TRACE_FORMAT_OTLP_JSON, KVM_TRACE_CONTENT_NONE, 0);
    cJSON *run = span_named(spans_of(doc), "invoke_workflow team");
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(run, "status"), "code")->valueint, 0);
    assert_false(cJSON_IsTrue(cJSON_GetObjectItem(attr(run, "kvmesh.run.ended"), "boolValue")));
    cJSON_Delete(doc);
    /* a run id that is no trace id (an old or hand-made trace): a 32-hex trace id derived from it */
    write_run("odd", "run-1", true, dir, sizeof dir);
    doc = export_json(dir, KVM_TRACE_FORMAT_OTLP_JSON, KVM_TRACE_CONTENT_NONE, 0);
    cJSON *s;
    const char *tid = NULL;
    cJSON_ArrayForEach(s, spans_of(doc)) {
        const char *t = cJSON_GetObjectItem(s, "traceId")->valuestring;
        assert_true(hex_of(t, 32) && strcmp(t, "00000000000000000000000000000000"));
        if (tid) assert_string_equal(t, tid);
        tid = t;
    }
    assert_string_equal(attr_str(span_named(spans_of(doc), "invoke_workflow team"), "gen_ai.conversation.id"), "run-1");
    cJSON_Delete(doc);
}

/* A func node that made 10,000 agent calls (as tests/cli/trace_kill.sh's loop does), its own step written last: every
 * call hangs under it, and the two funcs of another super-step or node keep theirs. */
static void test_a_func_with_ten_thousand_calls_holds_them_all(void **st) {
    (void)st;
    enum { CALLS = 10000 };
    kvm_trace_t *t = kvm_trace_open(root, "many");
    assert_non_null(t);
    kvm_trace_run_start_t rs = {.run_id = RUN_ID, .inputs_json = "{}", .source = "", .workflow_path = "loop.lua", .graph = "loop"};
    assert_int_equal(kvm_trace_write_run_start(t, &rs), 0);
    uint64_t t0 = now_ns();
    for (int i = 0; i < CALLS; i++) {
        kvm_trace_step_t c = {.idx = i, .superstep = 1, .node = i % 2 ? "loop" : "other", .agent = "talker", .op = "chat",
                              .via = "ctx:call", .t_start = t0 + (uint64_t)i, .t_end = t0 + (uint64_t)i + 1, .model = "mock:echo"};
        assert_int_equal(kvm_trace_write_step(t, &c), 0);
    }
    kvm_trace_step_t other = {.idx = CALLS, .superstep = 1, .node = "other", .op = "func", .t_start = t0, .t_end = t0 + 1};
    kvm_trace_step_t loop2 = {.idx = CALLS + 1, .superstep = 2, .node = "loop", .op = "func", .t_start = t0, .t_end = t0 + 1};
    kvm_trace_step_t loop = {.idx = CALLS + 2, .superstep = 1, .node = "loop", .op = "func", .t_start = t0, .t_end = t0 + 1};
    assert_int_equal(kvm_trace_write_step(t, &other), 0);
    assert_int_equal(kvm_trace_write_step(t, &loop2), 0);
    assert_int_equal(kvm_trace_write_step(t, &loop), 0);
    char dir[512];
    snprintf(dir, sizeof dir, "%s", t->dir);
    kvm_trace_close(t);
    cJSON *doc = export_json(dir, KVM_TRACE_FORMAT_OTLP_JSON, KVM_TRACE_CONTENT_NONE, 0);
    cJSON *spans = spans_of(doc), *s;
    assert_int_equal(cJSON_GetArraySize(spans), 1 + 2 * CALLS + 3);
    const char *loop_id = NULL, *other_id = NULL;
    cJSON_ArrayForEach(s, spans) {
        const char *name = cJSON_GetObjectItem(s, "name")->valuestring;
        if (!strcmp(name, "kvmesh.func loop") && attr_int(s, "kvmesh.step.superstep") == 1) loop_id = cJSON_GetObjectItem(s, "spanId")->valuestring;
        if (!strcmp(name, "kvmesh.func other")) {
            other_id = cJSON_GetObjectItem(s, "spanId")->valuestring;
            assert_int_equal(ns_of(s, "endTimeUnixNano"), t0 + CALLS - 1); /* widened to its last call's end */
        }
    }
    assert_non_null(loop_id);
    assert_non_null(other_id);
    int under_loop = 0, under_other = 0;
    cJSON_ArrayForEach(s, spans) if (!strcmp(cJSON_GetObjectItem(s, "name")->valuestring, "invoke_agent talker")) {
        const char *p = cJSON_GetObjectItem(s, "parentSpanId")->valuestring;
        int idx = (int)attr_int(s, "kvmesh.step.index");
        assert_string_equal(p, idx % 2 ? loop_id : other_id);
        under_loop += !strcmp(p, loop_id);
        under_other += !strcmp(p, other_id);
    }
    assert_int_equal(under_loop, CALLS / 2);
    assert_int_equal(under_other, CALLS / 2);
    cJSON_Delete(doc);
}

static void test_whowhen_history_is_blames_steps(void **st) {
    (void)st;
    char dir[512];
    write_run("ww", RUN_ID, true, dir, sizeof dir);
    cJSON *d = export_json(dir, KVM_TRACE_FORMAT_WHOWHEN, KVM_TRACE_CONTENT_TRUNCATED, 0);
    kvm_failure_t *f = kvm_failure_from_trace(dir);
    assert_non_null(f);
    cJSON *h = cJSON_GetObjectItem(d, "history");
    assert_int_equal(cJSON_GetArraySize(h), f->n_steps);
    assert_int_equal(f->n_steps, 5); /* the task, then the four steps */
    for (int i = 0; i < f->n_steps; i++) {
        cJSON *m = cJSON_GetArrayItem(h, i);
        assert_string_equal(cJSON_GetObjectItem(m, "name")->valuestring, f->steps[i].agent);
        assert_string_equal(cJSON_GetObjectItem(m, "content")->valuestring, f->steps[i].content);
        assert_string_equal(cJSON_GetObjectItem(m, "role")->valuestring, i == 0 ? "user" : f->steps[i].tool_result ? "tool" : "assistant");
    }
    assert_string_equal(cJSON_GetObjectItem(d, "question_ID")->valuestring, RUN_ID);
    assert_string_equal(cJSON_GetObjectItem(d, "question")->valuestring, "{\"input\":\"the task\"}");
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(d, "is_correct")));
    assert_string_equal(cJSON_GetObjectItem(d, "run_status")->valuestring, "KVM_EBUDGET");
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(d, "system_prompt"), "writer")->valuestring, "You write.");
    kvm_failure_free(f);
    cJSON_Delete(d);
}

/* events.jsonl of dir replaced by text. */
static void rewrite(const char *dir, const char *text) {
    char p[600];
    snprintf(p, sizeof p, "%s/events.jsonl", dir);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_jsonl_complete_records_torn_tail_and_bad_lines(void **st) {
    (void)st;
    char dir[512], p[600];
    write_run("jl", RUN_ID, true, dir, sizeof dir);
    snprintf(p, sizeof p, "%s/events.jsonl", dir);
    FILE *f = fopen(p, "rb");
    assert_non_null(f);
    static char stored[1 << 16];
    size_t n = fread(stored, 1, sizeof stored - 1, f);
    fclose(f);
    stored[n] = '\0';
    kvm_trace_export_params_t jp = kvm_trace_export_default_params();
    jp.format = KVM_TRACE_FORMAT_JSONL;
    char *text = NULL;
    size_t len = 0;
    assert_int_equal(kvm_trace_export(dir, &jp, &text, &len), 0);
    assert_int_equal(len, n);
    assert_string_equal(text, stored); /* the records as stored */
    kvm_free(text);
    /* torn: the last record cut; the others exported, in every format */
    stored[n - 7] = '\0';
    rewrite(dir, stored);
    assert_int_equal(kvm_trace_export(dir, &jp, &text, &len), 0);
    int lines = 0;
    for (size_t i = 0; i < len; i++) lines += text[i] == '\n';
    assert_int_equal(lines, 6); /* run.start, 4 steps, the log; run.end torn */
    kvm_free(text);
    assert_int_equal(kvm_trace_export(dir, NULL, &text, NULL), 0);
    assert_non_null(strstr(text, "\"kvmesh.trace.torn_tail\",\"value\":{\"boolValue\":true}"));
    kvm_free(text);
    /* a bad line in the middle: KVM_EFORMAT naming file:line, no text */
    char bad[1 << 16];
    char *nl = strchr(stored, '\n');
    snprintf(bad, sizeof bad, "%.*s{\"t\":\"step\",\"idx\":\"two\"}\n%s", (int)(nl - stored + 1), stored, nl + 1);
    rewrite(dir, bad);
    for (int fmt = KVM_TRACE_FORMAT_OTLP_JSON; fmt <= KVM_TRACE_FORMAT_JSONL; fmt++) {
        jp.format = fmt;
        text = (char *)"x";
        assert_int_equal(kvm_trace_export(dir, &jp, &text, NULL), KVM_EFORMAT);
        assert_null(text);
        assert_non_null(strstr(kvm_errmsg(), "events.jsonl:2"));
    }
    /* no run.start: JSONL exports what there is, OTLP and Who&When say what is missing */
    rewrite(dir, nl + 1);
    jp.format = KVM_TRACE_FORMAT_JSONL;
    assert_int_equal(kvm_trace_export(dir, &jp, &text, NULL), 0);
    kvm_free(text);
    assert_int_equal(kvm_trace_export(dir, NULL, &text, NULL), KVM_EFORMAT);
    assert_non_null(strstr(kvm_errmsg(), "run.start"));
    jp.format = KVM_TRACE_FORMAT_WHOWHEN;
    assert_int_equal(kvm_trace_export(dir, &jp, &text, NULL), KVM_EFORMAT);
}

static void test_formats_and_arguments(void **st) {
    (void)st;
    assert_int_equal(kvm_trace_format_from_name("otlp-json"), KVM_TRACE_FORMAT_OTLP_JSON);
    assert_int_equal(kvm_trace_format_from_name("whowhen"), KVM_TRACE_FORMAT_WHOWHEN);
    assert_int_equal(kvm_trace_format_from_name("jsonl"), KVM_TRACE_FORMAT_JSONL);
    assert_int_equal(kvm_trace_format_from_name("otlp"), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "otlp-json, whowhen or jsonl"));
    assert_int_equal(kvm_trace_format_from_name(NULL), KVM_EINVAL);
    assert_string_equal(kvm_trace_format_name(KVM_TRACE_FORMAT_WHOWHEN), "whowhen");
    assert_null(kvm_trace_format_name(0));
    char *text = NULL;
    kvm_trace_export_params_t p = kvm_trace_export_default_params();
    assert_int_equal(p.format, KVM_TRACE_FORMAT_OTLP_JSON);
    assert_int_equal(p.content_max, 4096);
    assert_int_equal(kvm_trace_export(NULL, NULL, &text, NULL), KVM_EINVAL);
    assert_int_equal(kvm_trace_export(root, NULL, NULL, NULL), KVM_EINVAL);
    p.format = 99;
    assert_int_equal(kvm_trace_export(root, &p, &text, NULL), KVM_EINVAL);
    p = kvm_trace_export_default_params();
    p.content = 7;
    assert_int_equal(kvm_trace_export(root, &p, &text, NULL), KVM_EINVAL);
    char missing[400];
    snprintf(missing, sizeof missing, "%s/no-such-run", root);
    assert_true(kvm_trace_export(missing, NULL, &text, NULL) < 0);
    assert_null(text);
    assert_non_null(strstr(kvm_errmsg(), "no-such-run"));
}

/* Every allocation of an export failing in turn: an error, never a crash, a leak or a partial text. */
static void test_out_of_memory_at_every_allocation(void **st) {
    (void)st;
    char dir[512];
    write_run("oom", RUN_ID, true, dir, sizeof dir);
    for (int fmt = KVM_TRACE_FORMAT_OTLP_JSON; fmt <= KVM_TRACE_FORMAT_JSONL; fmt++) {
        kvm_trace_export_params_t p = kvm_trace_export_default_params();
        p.format = fmt;
        int failed = 0;
        size_t live = kvm_alloc_bytes_live();
        for (uint64_t k = 1; k < 100000; k++) {
            char *text = NULL;
            kvm_alloc_fail_nth(k);
            int rc = kvm_trace_export(dir, &p, &text, NULL);
            bool fired = !kvm_alloc_fail_pending();
            kvm_alloc_fail_nth(0);
            if (!fired) { /* every allocation passed */
                assert_int_equal(rc, 0);
                kvm_free(text);
                break;
            }
            if (rc == 0) kvm_free(text); /* a failure the reader absorbed (none expected, but allowed) */
            else {
                assert_null(text);
                failed++;
            }
            if (kvm_alloc_bytes_live() != live) fail_msg("format %d, allocation %d failing: %zu bytes left (rc %d: %s)", fmt, (int)k, kvm_alloc_bytes_live() - live, rc, kvm_errmsg());
        }
        assert_true(failed > 10);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_otlp_spans_ids_parents_and_times),
        cmocka_unit_test(test_otlp_genai_and_kv_attributes),
        cmocka_unit_test(test_otlp_content_truncated_on_a_character_boundary_full_or_none),
        cmocka_unit_test(test_otlp_is_the_same_text_for_the_same_trace_and_handles_odd_run_ids),
        cmocka_unit_test(test_a_func_with_ten_thousand_calls_holds_them_all),
        cmocka_unit_test(test_whowhen_history_is_blames_steps),
        cmocka_unit_test(test_jsonl_complete_records_torn_tail_and_bad_lines),
        cmocka_unit_test(test_formats_and_arguments),
        cmocka_unit_test(test_out_of_memory_at_every_allocation),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
