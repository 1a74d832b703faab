/* test_host_tools.c - host tools through the public API (kvm_runtime_add_tool, ctx:tool): arguments checked
 * against the tool's schema before the call, the result back as Lua data, every failure a clear error of the run
 * (unknown tool, schema violation with its path, the tool's own error, a result that is not JSON), the run's
 * wall-time budget covering the callback, registration refusing bad names and unsupported schema keywords, and the
 * call recorded in the trace. Only the public header is included. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>

#include <kvmesh.h>

#include "test_common.h"
#include "tests/support/test_runtime.h"

TC_TMPDIR_FIXTURE("kvm_tools")

static const char *const WEATHER_SCHEMA =
    "{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\",\"minLength\":1},"
    "\"days\":{\"type\":\"integer\",\"minimum\":1,\"maximum\":7}},\"required\":[\"city\"],\"additionalProperties\":false}";

typedef struct calls {
    int n;
    char last_args[256];
    char last_node[64];
    double ms_left;
} calls_t;

static char *dup_text(const char *s) {
    char *p = kvm_malloc(strlen(s) + 1);
    if (p) strcpy(p, s);
    return p;
}

/* {"city": C, "days": D} -> {"city": C, "forecast": ["sun", ...] (D entries)}; the city "Atlantis" fails. */
static int weather(void *ud, const kvm_tool_call_t *call, char **result) {
    calls_t *c = ud;
    c->n++;
    snprintf(c->last_args, sizeof c->last_args, "%s", call->args_json);
    snprintf(c->last_node, sizeof c->last_node, "%s", call->node);
    c->ms_left = call->ms_left;
    if (strstr(call->args_json, "Atlantis")) {
        *result = dup_text("no weather under the sea");
        return KVM_ENOENT;
    }
    *result = dup_text("{\"forecast\":[\"sun\",\"rain\"],\"ok\":true}");
    return 0;
}

static int not_json(void *ud, const kvm_tool_call_t *call, char **result) {
    (void)ud;
    (void)call;
    *result = dup_text("{oops");
    return 0;
}

static int slow(void *ud, const kvm_tool_call_t *call, char **result) {
    (void)call;
    ((calls_t *)ud)->n++;
    struct timespec ts = {0, 80 * 1000000L};
    nanosleep(&ts, NULL);
    *result = NULL;
    return 0;
}

/* A one-node workflow whose node runs `body` (Lua, with state, last, ctx) and writes what it returns to 'out'. */
static kvm_workflow_t *load_node(kvm_runtime_t *rt, const char *body, const char *limit) {
    char src[2048];
    snprintf(src, sizeof src,
             "local kvm = kvmesh\n"
             "local g = kvm.graph{ name = 'tools', state = { out = kvm.reduce.replace } }\n"
             "%s\n"
             "g:func('ask', function(state, last, ctx)\n"
             "  %s\n"
             "end)\n"
             "g:edge(kvm.START, 'ask')\n"
             "g:output(function(state) return { out = state.out } end)\n"
             "return g\n",
             limit ? limit : "", body);
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "tools.lua", src, strlen(src), NULL);
    if (!wf) fail_msg("%s", kvm_errmsg());
    return wf;
}

/* Runs wf once; returns its status, the message in msg and the outputs in out (either may be NULL). */
static int run_once(kvm_workflow_t *wf, char *msg, size_t cap, char **out) {
    kvm_run_t *r = kvm_run_start(wf, NULL);
    assert_non_null(r);
    assert_int_equal(kvm_workflow_drive(wf), 0);
    const char *m = NULL;
    int st = kvm_run_status(r, &m);
    if (msg) snprintf(msg, cap, "%s", m ? m : "");
    if (out) *out = st == 0 ? kvm_run_outputs_json(r) : NULL;
    return st;
}

static void test_a_tool_gets_checked_arguments_and_returns_lua_data(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    calls_t c = {0};
    assert_int_equal(kvm_runtime_add_tool(rt, "weather", "Forecast for a city", WEATHER_SCHEMA, weather, &c), 0);
    kvm_workflow_t *wf = load_node(rt,
                                   "local r = ctx:tool('weather', { city = 'Oslo', days = 2 })\n"
                                   "  return { out = r.forecast[2] .. ' ' .. tostring(r.ok) .. ' ' .. #r.forecast }",
                                   NULL);
    char *out = NULL;
    assert_int_equal(run_once(wf, NULL, 0, &out), 0);
    assert_string_equal(out, "{\"out\":\"rain true 2\"}");
    kvm_free(out);
    assert_int_equal(c.n, 1);
    assert_non_null(strstr(c.last_args, "\"city\":\"Oslo\""));
    assert_non_null(strstr(c.last_args, "\"days\":2"));
    assert_string_equal(c.last_node, "ask");
    assert_true(c.ms_left < 0); /* no wall-time budget */
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

static void test_a_schema_violation_names_the_path_and_the_tool_does_not_run(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    calls_t c = {0};
    assert_int_equal(kvm_runtime_add_tool(rt, "weather", NULL, WEATHER_SCHEMA, weather, &c), 0);
    struct {
        const char *call, *want;
    } cases[] = {
        {"ctx:tool('weather', { city = 12 })", "ctx:tool: tool 'weather': args.city: expected string, got integer"},
        {"ctx:tool('weather', { days = 2 })", "ctx:tool: tool 'weather': args: missing required property 'city'"},
        {"ctx:tool('weather', { city = 'Oslo', days = 9 })", "ctx:tool: tool 'weather': args.days: 9 is above the maximum 7"},
        {"ctx:tool('weather', { city = 'Oslo', zip = 1 })", "args: property 'zip' is not allowed"},
        {"ctx:tool('weather', 'Oslo')", "ctx:tool: tool 'weather': the arguments must be a table (got string)"},
        {"ctx:tool('wether', { city = 'Oslo' })", "ctx:tool: no tool 'wether' is registered (tools: weather)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char body[256], msg[2048];
        snprintf(body, sizeof body, "return { out = %s }", cases[i].call);
        kvm_workflow_t *wf = load_node(rt, body, NULL);
        assert_int_equal(run_once(wf, msg, sizeof msg, NULL), KVM_ELUA_RUNTIME);
        if (!strstr(msg, cases[i].want)) fail_msg("case %zu: '%s' lacks '%s'", i, msg, cases[i].want);
        assert_non_null(strstr(msg, "tools.lua:5:")); /* the script's line */
        kvm_workflow_free(wf);
    }
    assert_int_equal(c.n, 0);
    kvm_runtime_free(rt);
}

static void test_a_failing_tool_is_a_lua_error_pcall_can_catch(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    calls_t c = {0};
    assert_int_equal(kvm_runtime_add_tool(rt, "weather", NULL, WEATHER_SCHEMA, weather, &c), 0);
    assert_int_equal(kvm_runtime_add_tool(rt, "broken", NULL, NULL, not_json, NULL), 0);
    kvm_workflow_t *wf = load_node(rt,
                                   "local ok, err = pcall(ctx.tool, ctx, 'weather', { city = 'Atlantis' })\n"
                                   "  return { out = tostring(ok) .. ' | ' .. err }",
                                   NULL);
    char *out = NULL;
    assert_int_equal(run_once(wf, NULL, 0, &out), 0);
    assert_non_null(strstr(out, "false | "));
    assert_non_null(strstr(out, "ctx:tool: tool 'weather': no weather under the sea"));
    kvm_free(out);
    kvm_workflow_free(wf);
    wf = load_node(rt, "return { out = ctx:tool('broken') }", NULL);
    char msg[1024];
    assert_int_equal(run_once(wf, msg, sizeof msg, NULL), KVM_ELUA_RUNTIME);
    assert_non_null(strstr(msg, "ctx:tool: tool 'broken': its result: not valid JSON"));
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

static void test_the_wall_time_budget_covers_the_callback(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    calls_t c = {0};
    assert_int_equal(kvm_runtime_add_tool(rt, "slow", NULL, NULL, slow, &c), 0);
    /* 80 ms a call against a 50 ms budget: the first call returns late and the run ends there */
    kvm_workflow_t *wf = load_node(rt, "for i = 1, 5 do ctx:tool('slow', {}) end\n  return { out = 'done' }",
                                   "g:limit{ wall_ms = 50 }");
    char msg[1024];
    assert_int_equal(run_once(wf, msg, sizeof msg, NULL), KVM_EBUDGET);
    assert_non_null(strstr(msg, "ctx:tool: tool 'slow' returned after graph 'tools' ran past its wall-time budget of 50 ms"));
    assert_int_equal(c.n, 1);
    kvm_workflow_free(wf);
    /* the callback's time is the run's wall time, not its Lua CPU time: 3 x 80 ms pass a 100 ms Lua budget */
    kvm_runtime_params_t p = kvm_runtime_default_params();
    p.model_override = "mock:echo";
    p.echo_print = false;
    p.run_lua_ms = 100;
    kvm_runtime_t *rt2 = kvm_runtime_create(&p);
    assert_non_null(rt2);
    c.n = 0;
    assert_int_equal(kvm_runtime_add_tool(rt2, "slow", NULL, NULL, slow, &c), 0);
    wf = load_node(rt2, "for i = 1, 3 do ctx:tool('slow') end\n  return { out = 'done' }", NULL);
    char *out = NULL;
    assert_int_equal(run_once(wf, msg, sizeof msg, &out), 0);
    assert_string_equal(out, "{\"out\":\"done\"}");
    kvm_free(out);
    assert_int_equal(c.n, 3);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt2);
    kvm_runtime_free(rt);
}

static void test_tools_are_only_for_a_nodes_own_code(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    calls_t c = {0};
    assert_int_equal(kvm_runtime_add_tool(rt, "weather", NULL, WEATHER_SCHEMA, weather, &c), 0);
    kvm_workflow_t *wf = load_node(rt,
                                   "local co = coroutine.wrap(function() return ctx:tool('weather', { city = 'Oslo' }) end)\n"
                                   "  return { out = co() }",
                                   NULL);
    char msg[1024];
    assert_int_equal(run_once(wf, msg, sizeof msg, NULL), KVM_ELUA_RUNTIME);
    assert_non_null(strstr(msg, "ctx:tool must be called from a func/tool node's own code"));
    assert_int_equal(c.n, 0);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

static void test_registration_checks_names_and_schemas(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    const char *bad_names[] = {"", "1x", "a b", "a/b", "x\n"};
    for (size_t i = 0; i < sizeof bad_names / sizeof *bad_names; i++) {
        assert_int_equal(kvm_runtime_add_tool(rt, bad_names[i], NULL, NULL, weather, NULL), KVM_EINVAL);
        assert_non_null(strstr(kvm_errmsg(), "tool name"));
    }
    assert_int_equal(kvm_runtime_add_tool(rt, "w", NULL, NULL, NULL, NULL), KVM_EINVAL);
    assert_int_equal(kvm_runtime_add_tool(rt, "w", NULL, "{\"type\":\"object\",\"properties\":{\"c\":{\"pattern\":\"x\"}}}",
                                          weather, NULL),
                     KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "tool 'w': schema.properties.c: unsupported keyword 'pattern'"));
    assert_int_equal(kvm_runtime_add_tool(rt, "w", NULL, "{\"type\":", weather, NULL), KVM_EFORMAT);
    assert_non_null(strstr(kvm_errmsg(), "tool 'w'"));
    assert_int_equal(kvm_runtime_add_tool(rt, "get_weather.v2-beta", NULL, NULL, weather, NULL), 0);
    assert_int_equal(kvm_runtime_add_tool(rt, "get_weather.v2-beta", NULL, NULL, weather, NULL), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "registered already"));
    kvm_runtime_free(rt);
}

static void test_a_call_is_recorded_in_the_trace(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(g_dir);
    calls_t c = {0};
    assert_int_equal(kvm_runtime_add_tool(rt, "weather", NULL, WEATHER_SCHEMA, weather, &c), 0);
    kvm_workflow_t *wf = load_node(rt, "return { out = ctx:tool('weather', { city = 'Oslo' }).ok }", NULL);
    kvm_run_t *r = kvm_run_start(wf, NULL);
    assert_int_equal(kvm_workflow_drive(wf), 0);
    assert_int_equal(kvm_run_status(r, NULL), 0);
    kvm_trace_reader_t *t = kvm_trace_reader_open(kvm_run_trace_dir(r));
    assert_non_null(t);
    bool seen = false;
    for (int i = 0; i < kvm_trace_reader_n_records(t); i++)
        seen = seen || strstr(kvm_trace_reader_record_json(t, i), "tool weather({\\\"city\\\":\\\"Oslo\\\"}) -> ") != NULL;
    assert_true(seen);
    kvm_trace_reader_free(t);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

/* ---- tools that answer later -------------------------------------------------------------------------------- */

typedef struct pending {
    int n;
    kvm_run_t *run[8];
    uint64_t id[8];
    char args[8][128];
} pending_t;

static int remote(void *ud, const kvm_tool_call_t *call, char **result) {
    pending_t *p = ud;
    assert_true(p->n < 8);
    assert_non_null(call->run);
    assert_true(call->call_id > 0);
    p->run[p->n] = call->run;
    p->id[p->n] = call->call_id;
    snprintf(p->args[p->n], sizeof p->args[0], "%s", call->args_json);
    p->n++;
    *result = NULL;
    return KVM_EBUSY;
}

/* A runtime with the 'remote' tool (it answers later) and a run whose two nodes of one super-step each called it: both
 * calls are out, the run waits. */
typedef struct waits {
    kvm_runtime_t *rt;
    kvm_workflow_t *wf;
    kvm_run_t *r;
    pending_t p;
} waits_t;

static void waits_start(waits_t *w, const char *limit) {
    memset(w, 0, sizeof *w);
    w->rt = mock_runtime(NULL);
    assert_int_equal(kvm_runtime_add_tool(w->rt, "remote", NULL, NULL, remote, &w->p), 0);
    char src[1024];
    snprintf(src, sizeof src,
             "local kvm = kvmesh\n"
             "local g = kvm.graph{ name = 'remote', state = { a = kvm.reduce.replace, b = kvm.reduce.replace } }\n"
             "%s\n"
             "g:func('a', function(s, l, ctx) return { a = ctx:tool('remote', { q = 'a' }).t } end)\n"
             "g:func('b', function(s, l, ctx) return { b = ctx:tool('remote', { q = 'b' }).t } end)\n"
             "g:edge(kvm.START, { 'a', 'b' })\n"
             "g:output(function(s) return { sum = s.a + s.b } end)\n"
             "return g\n",
             limit ? limit : "");
    w->wf = kvm_workflow_load_string(w->rt, "remote.lua", src, strlen(src), NULL);
    if (!w->wf) fail_msg("%s", kvm_errmsg());
    w->r = kvm_run_start(w->wf, NULL);
    assert_non_null(w->r);
    assert_int_equal(kvm_workflow_drive(w->wf), 0);
    assert_int_equal(w->p.n, 2);
    assert_int_equal(kvm_run_status(w->r, NULL), KVM_EBUSY);
}

static void waits_free(waits_t *w) {
    kvm_workflow_free(w->wf);
    kvm_runtime_free(w->rt);
}

static void test_a_tool_can_answer_later_while_the_run_waits(void **st) {
    (void)st;
    waits_t w;
    waits_start(&w, NULL);
    kvm_run_t *r = w.r;
    /* the run waits without counting as going (no busy rounds, no stall) */
    assert_int_equal(kvm_runtime_n_active(w.rt), 0);
    assert_int_equal(kvm_runtime_step(w.rt), 0);
    assert_int_equal(kvm_run_status(r, NULL), KVM_EBUSY);
    int ia = strstr(w.p.args[0], "\"a\"") ? 0 : 1, ib = 1 - ia;
    /* bad answers are refused and leave the call waiting */
    assert_int_equal(kvm_run_tool_result(r, w.p.id[ia], 0, "{oops"), KVM_EFORMAT);
    assert_int_equal(kvm_run_tool_result(r, 999999, 0, "{}"), KVM_ENOENT);
    /* answered in the other order */
    assert_int_equal(kvm_run_tool_result(r, w.p.id[ib], 0, "{\"t\": 30}"), 0);
    assert_int_equal(kvm_run_tool_result(r, w.p.id[ib], 0, "{\"t\": 30}"), KVM_ENOENT); /* once */
    assert_int_equal(kvm_workflow_drive(w.wf), 0);
    assert_int_equal(kvm_run_status(r, NULL), KVM_EBUSY);
    assert_int_equal(kvm_run_tool_result(r, w.p.id[ia], 0, "{\"t\": 12}"), 0);
    assert_int_equal(kvm_workflow_drive(w.wf), 0);
    const char *msg = NULL;
    assert_int_equal(kvm_run_status(r, &msg), 0);
    char *out = kvm_run_outputs_json(r);
    assert_string_equal(out, "{\"sum\":42}");
    kvm_free(out);
    waits_free(&w);
}

static void test_an_error_answer_fails_the_node_at_its_line(void **st) {
    (void)st;
    waits_t w;
    waits_start(&w, NULL);
    assert_int_equal(kvm_run_tool_result(w.r, w.p.id[0], KVM_ENOENT, "no such city"), 0);
    assert_int_equal(kvm_run_tool_result(w.r, w.p.id[1], 0, "{\"t\": 1}"), 0);
    assert_int_equal(kvm_workflow_drive(w.wf), 0);
    const char *msg = NULL;
    assert_int_equal(kvm_run_status(w.r, &msg), KVM_ELUA_RUNTIME);
    assert_non_null(strstr(msg, "ctx:tool: tool 'remote': no such city"));
    assert_non_null(strstr(msg, strstr(w.p.args[0], "\"a\"") ? "remote.lua:4:" : "remote.lua:5:"));
    waits_free(&w);
}

static void test_a_wait_past_the_wall_budget_ends_the_run(void **st) {
    (void)st;
    waits_t w;
    waits_start(&w, "g:limit{ wall_ms = 40 }");
    struct timespec ts = {0, 10 * 1000000L};
    int rounds = 0;
    while (kvm_run_status(w.r, NULL) == KVM_EBUSY && rounds++ < 100) { /* a daemon's loop: a round now and then */
        nanosleep(&ts, NULL);
        kvm_runtime_step(w.rt);
    }
    const char *msg = NULL;
    assert_int_equal(kvm_run_status(w.r, &msg), KVM_EBUDGET);
    assert_non_null(strstr(msg, "graph 'remote' ran past its wall-time budget of 40 ms waiting for tool 'remote' to answer"));
    assert_true(rounds >= 3 && rounds <= 20); /* about 40 ms of 10 ms rounds, not at once and not much later */
    assert_int_equal(kvm_run_tool_result(w.r, w.p.id[0], 0, "{}"), KVM_ESTALE);
    waits_free(&w);
}

static void test_a_waiting_run_can_be_canceled(void **st) {
    (void)st;
    waits_t w;
    waits_start(&w, NULL);
    assert_int_equal(kvm_run_cancel(w.r, 0, "the user left"), 0);
    const char *msg = NULL;
    assert_int_equal(kvm_run_status(w.r, &msg), KVM_ECANCELED);
    assert_string_equal(msg, "the user left");
    assert_int_equal(kvm_run_tool_result(w.r, w.p.id[1], 0, "{}"), KVM_ESTALE);
    waits_free(&w);
}

static void test_a_removed_tool_is_no_longer_callable(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    calls_t c = {0};
    assert_int_equal(kvm_runtime_add_tool(rt, "weather", NULL, WEATHER_SCHEMA, weather, &c), 0);
    kvm_workflow_t *wf = load_node(rt, "return { out = ctx:tool('weather', { city = 'Oslo' }).ok }", NULL);
    assert_int_equal(run_once(wf, NULL, 0, NULL), 0);
    assert_int_equal(kvm_runtime_remove_tool(rt, "weather"), 0);
    assert_int_equal(kvm_runtime_remove_tool(rt, "weather"), KVM_ENOENT);
    char msg[1024];
    assert_int_equal(run_once(wf, msg, sizeof msg, NULL), KVM_ELUA_RUNTIME);
    assert_non_null(strstr(msg, "ctx:tool: no tool 'weather' is registered (the program registered none)"));
    /* registered again after the workflow loaded: found at the call */
    assert_int_equal(kvm_runtime_add_tool(rt, "weather", NULL, WEATHER_SCHEMA, weather, &c), 0);
    assert_int_equal(run_once(wf, NULL, 0, NULL), 0);
    assert_int_equal(c.n, 2);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

/* A subgraph's node waits for a tool too: the parent run is idle meanwhile, the answer reaches the child's node, and
 * a wait past the subgraph's wall-time budget fails the subgraph node (routed by the parent's on_error edge). */
static const char *const SUB_WF =
    "local kvm = kvmesh\n"
    "local inner = kvm.graph{ name = 'inner', state = { t = kvm.reduce.replace } }\n"
    "inner:limit{ wall_ms = %d }\n"
    "inner:func('ask', function(s, l, ctx) return { t = ctx:tool('remote', { q = 'in' }).t } end)\n"
    "inner:edge(kvm.START, 'ask')\n"
    "local g = kvm.graph{ name = 'outer', state = { got = kvm.reduce.replace } }\n"
    "g:subgraph('sub', inner, { output = { t = 'got' } })\n"
    "g:func('fallback', function(s, last) return { got = 'failed: ' .. last.sub.error } end)\n"
    "g:edge(kvm.START, 'sub')\n"
    "g:edge('sub', 'fallback', { on_error = true })\n"
    "g:output(function(s) return { got = s.got } end)\n"
    "return g\n";

static void test_a_subgraph_node_waits_for_a_tool_answer(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    pending_t p = {0};
    assert_int_equal(kvm_runtime_add_tool(rt, "remote", NULL, NULL, remote, &p), 0);
    char src[2048];
    snprintf(src, sizeof src, SUB_WF, 100000);
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "sub.lua", src, strlen(src), NULL);
    if (!wf) fail_msg("%s", kvm_errmsg());
    kvm_run_t *r = kvm_run_start(wf, NULL);
    assert_int_equal(kvm_workflow_drive(wf), 0);
    assert_int_equal(p.n, 1);
    assert_int_equal(kvm_runtime_n_active(rt), 0);
    assert_int_equal(kvm_runtime_step(rt), 0); /* idle, not stalled */
    assert_int_equal(kvm_run_status(r, NULL), KVM_EBUSY);
    assert_int_equal(kvm_run_tool_result(r, p.id[0], 0, "{\"t\": 7}"), 0);
    assert_int_equal(kvm_workflow_drive(wf), 0);
    const char *msg = NULL;
    assert_int_equal(kvm_run_status(r, &msg), 0);
    char *out = kvm_run_outputs_json(r);
    assert_string_equal(out, "{\"got\":7}");
    kvm_free(out);
    kvm_workflow_free(wf);
    /* the subgraph's own wall-time budget passes while its node waits: the subgraph node fails, the parent goes on */
    p.n = 0;
    snprintf(src, sizeof src, SUB_WF, 30);
    wf = kvm_workflow_load_string(rt, "sub.lua", src, strlen(src), NULL);
    if (!wf) fail_msg("%s", kvm_errmsg());
    r = kvm_run_start(wf, NULL);
    assert_int_equal(kvm_workflow_drive(wf), 0);
    struct timespec ts = {0, 10 * 1000000L};
    for (int i = 0; i < 100 && kvm_run_status(r, NULL) == KVM_EBUSY; i++) {
        nanosleep(&ts, NULL);
        kvm_runtime_step(rt);
        kvm_workflow_drive(wf);
    }
    assert_int_equal(kvm_run_status(r, &msg), 0);
    out = kvm_run_outputs_json(r);
    assert_non_null(strstr(out, "failed: "));
    assert_non_null(strstr(out, "graph 'inner' ran past its wall-time budget of 30 ms waiting for tool 'remote' to answer"));
    kvm_free(out);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

/* ---- model-driven tool calls ---------------------------------------------------------------------------------
 * The mock model answers with its user message (and, in a continuation, with the last turn): a tool call written
 * in the input comes back as the model's own text, so the parse / check / call / continue loop runs for real. */

static const char *const MODEL_WF =
    "local kvm = kvmesh\n"
    "local m = kvm.model('mock:echo')\n"
    "local g = kvm.graph{ name = 'mtools' }\n"
    "g:agent('asker', { model = m, role = 'You help.', template = '{input}', max_tokens = 64, tools = { 'weather' }, tool_rounds = 1 })\n"
    "g:edge(kvm.START, 'asker')\n"
    "g:output(function(state, last) return { out = last.asker } end)\n"
    "return g\n";

/* Runs MODEL_WF with the input text; returns the status, the output text in out (cap bytes). */
static int model_run(kvm_runtime_t *rt, const char *input, char *out, size_t cap, char *msg, size_t mcap) {
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "mtools.lua", MODEL_WF, strlen(MODEL_WF), NULL);
    if (!wf) fail_msg("%s", kvm_errmsg());
    char in[1024];
    snprintf(in, sizeof in, "{\"input\": \"%s\"}", input);
    kvm_run_params_t rp = kvm_run_default_params();
    rp.inputs_json = in;
    kvm_run_t *r = kvm_run_start(wf, &rp);
    assert_non_null(r);
    assert_int_equal(kvm_workflow_drive(wf), 0);
    const char *m = NULL;
    int st = kvm_run_status(r, &m);
    snprintf(msg, mcap, "%s", m ? m : "");
    char *o = st == 0 ? kvm_run_outputs_json(r) : NULL;
    snprintf(out, cap, "%s", o ? o : "");
    kvm_free(o);
    kvm_workflow_free(wf);
    return st;
}

#define CALL(args) "<tool_call>{\\\"name\\\":\\\"weather\\\",\\\"arguments\\\":" args "}</tool_call>"

static void test_a_model_tool_call_runs_and_the_generation_goes_on(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(g_dir);
    calls_t c = {0};
    assert_int_equal(kvm_runtime_add_tool(rt, "weather", "Forecast for a city", WEATHER_SCHEMA, weather, &c), 0);
    char out[4096], msg[2048];
    assert_int_equal(model_run(rt, "Let me look. " CALL("{\\\"city\\\":\\\"Oslo\\\",\\\"days\\\":2}"), out, sizeof out, msg, sizeof msg), 0);
    assert_int_equal(c.n, 1);
    assert_non_null(strstr(c.last_args, "\"city\":\"Oslo\""));
    /* the second round answered the tool-response turn (the mock echoes it): the step's output */
    assert_non_null(strstr(out, "<tool_response>"));
    assert_non_null(strstr(out, "{\\\"forecast\\\":[\\\"sun\\\",\\\"rain\\\"],\\\"ok\\\":true}"));
    assert_null(strstr(out, "<tool_call>"));
    /* the model saw the tool in its system message, as Qwen's chat template shows tools */
    char *text = NULL;
    assert_true(kvm_trace_view_search(g_dir, "You help.\\n\\n# Tools\\n\\nYou may call one or more functions", &text) >= 1);
    kvm_free(text);
    assert_true(kvm_trace_view_search(g_dir, "<tools>\\n{\\\"type\\\": \\\"function\\\", \\\"function\\\": {\\\"name\\\": "
                                             "\\\"weather\\\", \\\"description\\\": \\\"Forecast for a city\\\", "
                                             "\\\"parameters\\\": {\\\"type\\\": \\\"object\\\"", &text) >= 1);
    kvm_free(text);
    kvm_runtime_free(rt);
}

static void test_bad_model_calls_are_answered_with_errors_the_model_can_read(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    calls_t c = {0};
    assert_int_equal(kvm_runtime_add_tool(rt, "weather", NULL, WEATHER_SCHEMA, weather, &c), 0);
    assert_int_equal(kvm_runtime_add_tool(rt, "secret", NULL, NULL, weather, &c), 0);
    char out[4096], msg[2048];
    /* arguments the schema refuses, a tool not offered to the agent, a block that is not JSON: one response each */
    assert_int_equal(model_run(rt,
                               CALL("{\\\"city\\\":7}") " <tool_call>{\\\"name\\\":\\\"secret\\\"}</tool_call>"
                               " <tool_call>{oops}</tool_call>",
                               out, sizeof out, msg, sizeof msg),
                     0);
    assert_int_equal(c.n, 0);
    assert_non_null(strstr(out, "arguments.city: expected string, got integer"));
    assert_non_null(strstr(out, "no tool 'secret' is offered to you"));
    assert_non_null(strstr(out, "the call: not valid JSON"));
    kvm_runtime_free(rt);
}

/* A tool whose result makes the mock call it again: the rounds are bounded. */
static int loops(void *ud, const kvm_tool_call_t *call, char **result) {
    (void)call;
    ((calls_t *)ud)->n++;
    *result = dup_text("\"<tool_call>{\\\"name\\\":\\\"weather\\\",\\\"arguments\\\":{\\\"city\\\":\\\"x\\\"}}</tool_call>\"");
    return 0;
}

static void test_tool_rounds_bound_a_model_that_keeps_calling(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    calls_t c = {0};
    assert_int_equal(kvm_runtime_add_tool(rt, "weather", NULL, NULL, loops, &c), 0);
    char out[4096], msg[2048];
    /* round 1 calls the tool; its answer, echoed, is a call again in round 2: past tool_rounds = 1 */
    assert_int_equal(model_run(rt, CALL("{}"), out, sizeof out, msg, sizeof msg), KVM_EBUDGET);
    assert_non_null(strstr(msg, "agent 'asker': the model still calls tools after tool_rounds = 1 rounds"));
    assert_int_equal(c.n, 1);
    kvm_runtime_free(rt);
}

static void test_bad_tools_options_are_refused_at_load(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    const char *bad[][2] = {{"tools = 'weather'", "tools must be a list of tool names (non-empty strings)"},
                            {"tools = { 'weather', 7 }", "tools must be a list of tool names (non-empty strings)"},
                            {"tools = { '' }", "tools must be a list of tool names (non-empty strings)"},
                            {"tools = { 'weather' }, tool_rounds = 0", "tool_rounds"},
                            {"tools = { 'weather' }, tool_rounds = 17", "tool_rounds"}};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char src[512];
        snprintf(src, sizeof src,
                 "local kvm = kvmesh\nlocal g = kvm.graph{ name = 'x' }\n"
                 "g:agent('a', { model = kvm.model('mock:echo'), template = '{input}', %s })\n"
                 "g:edge(kvm.START, 'a')\nreturn g\n", bad[i][0]);
        kvm_workflow_t *wf = kvm_workflow_load_string(rt, "bad.lua", src, strlen(src), NULL);
        if (wf) fail_msg("case %zu loaded", i);
        if (!strstr(kvm_errmsg(), bad[i][1]) || !strstr(kvm_errmsg(), "bad.lua:3:")) fail_msg("case %zu: %s", i, kvm_errmsg());
    }
    kvm_runtime_free(rt);
}

static void test_an_agent_naming_an_unregistered_tool_fails_its_step(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    char out[4096], msg[2048];
    assert_true(model_run(rt, "hello", out, sizeof out, msg, sizeof msg) < 0);
    assert_non_null(strstr(msg, "agent 'asker'"));
    assert_non_null(strstr(msg, "tools: no tool 'weather' is registered"));
    kvm_runtime_free(rt);
}

TC_MAIN(setup, teardown, cmocka_unit_test(test_a_subgraph_node_waits_for_a_tool_answer),
        cmocka_unit_test(test_a_model_tool_call_runs_and_the_generation_goes_on),
        cmocka_unit_test(test_bad_model_calls_are_answered_with_errors_the_model_can_read),
        cmocka_unit_test(test_tool_rounds_bound_a_model_that_keeps_calling),
        cmocka_unit_test(test_bad_tools_options_are_refused_at_load),
        cmocka_unit_test(test_an_agent_naming_an_unregistered_tool_fails_its_step), cmocka_unit_test(test_a_tool_can_answer_later_while_the_run_waits),
        cmocka_unit_test(test_an_error_answer_fails_the_node_at_its_line),
        cmocka_unit_test(test_a_wait_past_the_wall_budget_ends_the_run),
        cmocka_unit_test(test_a_waiting_run_can_be_canceled),
        cmocka_unit_test(test_a_removed_tool_is_no_longer_callable), cmocka_unit_test(test_a_tool_gets_checked_arguments_and_returns_lua_data),
        cmocka_unit_test(test_a_schema_violation_names_the_path_and_the_tool_does_not_run),
        cmocka_unit_test(test_a_failing_tool_is_a_lua_error_pcall_can_catch),
        cmocka_unit_test(test_the_wall_time_budget_covers_the_callback),
        cmocka_unit_test(test_tools_are_only_for_a_nodes_own_code),
        cmocka_unit_test(test_registration_checks_names_and_schemas),
        cmocka_unit_test(test_a_call_is_recorded_in_the_trace))
