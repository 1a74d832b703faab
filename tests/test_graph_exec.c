/* test_graph_exec.c - the graph executor on the mock engine: fan-out runs in one super-step and one
 * batch, joins wait, conditional loops end by predicate or by the step budget, reducers, routers,
 * several runs share forward passes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "agents/llm.h"
#include "agents/wf.h"

#define HEAD_ECHO "local kvm = kvmesh\nlocal m = kvm.model('mock:echo')\n"

static kvm_workflow_t *load(const char *src) {
    kvm_wf_opts_t o = {0};
    kvm_workflow_t *wf = kvm_wf_load_string("g.lua", src, strlen(src), &o);
    if (!wf) fail_msg("load: %s", kvm_errmsg());
    return wf;
}

static int run1(kvm_workflow_t *wf, const char *input) {
    cJSON *in = cJSON_CreateObject();
    cJSON_AddStringToObject(in, "input", input);
    int run;
    assert_int_equal(kvm_wf_start(wf, in, 1, &run), 0);
    cJSON_Delete(in);
    return run;
}

/* Starts one run with the input, drives the workflow and checks the engine did not fail. */
static int drive1(kvm_workflow_t *wf, const char *input) {
    int run = run1(wf, input);
    assert_int_equal(kvm_wf_drive(wf), 0);
    return run;
}

/* The same, and the run must have ended ok. */
static int drive1_ok(kvm_workflow_t *wf, const char *input) {
    int run = drive1(wf, input);
    const char *msg = NULL;
    if (kvm_wf_run_status(wf, run, &msg) != 0) fail_msg("run failed: %s", msg ? msg : "?");
    return run;
}

static const cJSON *state_get(kvm_workflow_t *wf, int run, const char *k) {
    return cJSON_GetObjectItemCaseSensitive(kvm_wf_run_state(wf, run), k);
}

#define FANOUT4                                                                          \
    "local kvm = kvmesh\nlocal m = kvm.model('mock:echo')\n"                             \
    "local g = kvm.graph{ name = 'fan', state = { n = kvm.reduce.sum } }\n"              \
    "g:agent('lead', { model = m, template = 'Task: {input}', max_tokens = 3 })\n"       \
    "for i = 1, 4 do g:agent('w' .. i, { model = m, template = 'Worker ' .. i .. ': {agent.lead} and {input}', max_tokens = 5 }) end\n" \
    "g:func('sum', function(state, last) local c = 0 for k, v in pairs(last) do c = c + 1 end return { n = c } end)\n" \
    "g:edge(kvm.START, 'lead')\ng:edge('lead', { 'w1', 'w2', 'w3', 'w4' })\n"            \
    "g:join({ 'w1', 'w2', 'w3', 'w4' }, 'sum', { mode = 'all' })\n"

static void test_fan_out_of_four_agents_runs_in_one_batch(void **s) {
    (void)s;
    kvm_workflow_t *wf = load(FANOUT4 "return g\n");
    int run = drive1_ok(wf, "count the apples");
    int max_seqs = 0;
    wf_llm_counters(kvm_wf_llm(wf), NULL, NULL, &max_seqs);
    assert_int_equal(max_seqs, 4);
    /* the join fired once, with all four workers in `last` */
    assert_int_equal((int)state_get(wf, run, "n")->valuedouble, 4);
    kvm_wf_free(wf);
}

static void test_several_runs_share_forward_passes(void **s) {
    (void)s;
    kvm_workflow_t *wf = load(FANOUT4 "return g\n");
    for (int i = 0; i < 3; i++) run1(wf, "three runs at once");
    assert_int_equal(kvm_wf_drive(wf), 0);
    int max_seqs = 0;
    wf_llm_counters(kvm_wf_llm(wf), NULL, NULL, &max_seqs);
    assert_int_equal(max_seqs, 12);
    for (int i = 0; i < 3; i++) assert_int_equal(kvm_wf_run_status(wf, i, NULL), 0);
    kvm_wf_free(wf);
}

static void test_agent_reads_the_output_of_its_producer(void **s) {
    (void)s;
    kvm_workflow_t *wf = load(HEAD_ECHO
                              "local g = kvm.graph{ state = { ans = kvm.reduce.replace } }\n"
                              "g:agent('a', { model = m, template = 'alpha {input}', max_tokens = 2 })\n"
                              "g:agent('b', { model = m, template = 'beta {agent.a}', max_tokens = 3, writes = 'ans' })\n"
                              "g:edge(kvm.START, 'a')\ng:edge('a', 'b')\nreturn g\n");
    int run = drive1_ok(wf, "gamma delta");
    /* a echoes "alpha gamma"; b sees "beta alpha gamma" and echoes it */
    assert_string_equal(state_get(wf, run, "ans")->valuestring, "beta alpha gamma");
    const cJSON *msgs = state_get(wf, run, "msgs");
    assert_int_equal(cJSON_GetArraySize(msgs), 2);
    kvm_wf_free(wf);
}

static void test_conditional_loop_ends_when_its_predicate_says_so(void **s) {
    (void)s;
    kvm_workflow_t *wf = load("local kvm = kvmesh\n"
                              "local g = kvm.graph{ state = { i = kvm.reduce.sum, log = kvm.reduce.append } }\n"
                              "g:func('inc', function(state) return { i = 1, log = 'x' } end)\n"
                              "g:edge(kvm.START, 'inc')\n"
                              "g:edge('inc', 'inc', { when = function(state) return state.i < 5 end })\n"
                              "g:edge('inc', kvm.END, { when = function(state) return state.i >= 5 end })\n"
                              "g:limit{ steps = 20 }\nreturn g\n");
    int run = drive1_ok(wf, "");
    assert_int_equal((int)state_get(wf, run, "i")->valuedouble, 5);
    assert_int_equal(cJSON_GetArraySize(state_get(wf, run, "log")), 5);
    kvm_wf_free(wf);
}

static void test_step_budget_ends_an_endless_loop(void **s) {
    (void)s;
    kvm_workflow_t *wf = load("local kvm = kvmesh\n"
                              "local g = kvm.graph{ state = { i = kvm.reduce.sum } }\n"
                              "g:func('inc', function(state) return { i = 1 } end)\n"
                              "g:edge(kvm.START, 'inc')\n"
                              "g:edge('inc', 'inc', { when = function(state) return true end })\n"
                              "g:limit{ steps = 7 }\nreturn g\n");
    int run = drive1(wf, "");
    const char *msg;
    assert_int_equal(kvm_wf_run_status(wf, run, &msg), KVM_EBUDGET);
    assert_non_null(strstr(msg, "step budget (7"));
    assert_int_equal((int)state_get(wf, run, "i")->valuedouble, 7); /* the last state is kept */
    kvm_wf_free(wf);
}

static void test_router_picks_the_next_node_or_end(void **s) {
    (void)s;
    kvm_workflow_t *wf = load("local kvm = kvmesh\n"
                              "local g = kvm.graph{ state = { path = kvm.reduce.append } }\n"
                              "g:func('start', function(state) return { path = 'start' } end)\n"
                              "g:func('left', function(state) return { path = 'left' } end)\n"
                              "g:func('right', function(state) return { path = 'right' } end)\n"
                              "g:route('start', function(state, last) return state.path[1] == 'start' and 'right' or kvm.END end, { 'left', 'right', kvm.END })\n"
                              "g:edge(kvm.START, 'start')\nreturn g\n");
    int run = drive1_ok(wf, "");
    const cJSON *p = state_get(wf, run, "path");
    assert_int_equal(cJSON_GetArraySize(p), 2);
    assert_string_equal(cJSON_GetArrayItem(p, 1)->valuestring, "right");
    kvm_wf_free(wf);
}

static void test_reducers_max_min_merge_and_custom(void **s) {
    (void)s;
    kvm_workflow_t *wf = load("local kvm = kvmesh\n"
                              "local g = kvm.graph{ state = { hi = kvm.reduce.max, lo = kvm.reduce.min, m = kvm.reduce.merge,\n"
                              "  cat = { function(old, new) return (old or '') .. new end, init = '>' } } }\n"
                              "g:func('a', function() return { hi = 3, lo = 3, m = { x = 1 }, cat = 'a' } end)\n"
                              "g:func('b', function() return { hi = 9, lo = 1, m = { y = 2 }, cat = 'b' } end)\n"
                              "g:edge(kvm.START, { 'a', 'b' })\nreturn g\n");
    int run = drive1_ok(wf, "");
    assert_int_equal((int)state_get(wf, run, "hi")->valuedouble, 9);
    assert_int_equal((int)state_get(wf, run, "lo")->valuedouble, 1);
    assert_int_equal(cJSON_GetArraySize(state_get(wf, run, "m")), 2);
    /* updates apply in ascending node-name order whatever the completion order */
    assert_string_equal(state_get(wf, run, "cat")->valuestring, ">ab");
    kvm_wf_free(wf);
}

static void test_join_any_fires_on_the_first_source(void **s) {
    (void)s;
    kvm_workflow_t *wf = load(HEAD_ECHO
                              "local g = kvm.graph{ state = { seen = kvm.reduce.append } }\n"
                              "g:agent('fast', { model = m, template = 'one', max_tokens = 1 })\n"
                              "g:func('slow1', function() return {} end)\n"
                              "g:func('slow2', function() return {} end)\n"
                              "g:func('done', function(state, last) local k = {} for n in pairs(last) do k[#k + 1] = n end table.sort(k) return { seen = table.concat(k, ',') } end)\n"
                              "g:edge(kvm.START, { 'fast', 'slow1' })\ng:edge('slow1', 'slow2')\n"
                              "g:join({ 'fast', 'slow2' }, 'done', { mode = 'any' })\nreturn g\n");
    int run = drive1_ok(wf, "");
    const cJSON *seen = state_get(wf, run, "seen");
    assert_true(cJSON_GetArraySize(seen) >= 1);
    assert_string_equal(cJSON_GetArrayItem(seen, 0)->valuestring, "fast,slow1");
    kvm_wf_free(wf);
}

static void test_ctx_call_yields_and_returns_the_agent_text(void **s) {
    (void)s;
    kvm_workflow_t *wf = load(HEAD_ECHO
                              "local g = kvm.graph{ state = { out = kvm.reduce.replace } }\n"
                              "local echo = kvm.agent{ name = 'echo', model = m, template = 'say {input}', max_tokens = 4 }\n"
                              "g:func('f', function(state, last, ctx)\n"
                              "  local a = ctx:call(echo, { input = 'one' })\n"
                              "  local b, info = ctx:call('echo', { input = 'two' })\n"
                              "  return { out = a .. '|' .. b .. '|' .. info.tokens_out } end)\n"
                              "g:edge(kvm.START, 'f')\nreturn g\n");
    int run = drive1_ok(wf, "");
    assert_string_equal(state_get(wf, run, "out")->valuestring, "say one|say two|2");
    kvm_wf_free(wf);
}

static void test_ctx_map_runs_its_calls_in_one_batch_and_keeps_their_order(void **s) {
    (void)s;
    kvm_workflow_t *wf = load(HEAD_ECHO
                              "local g = kvm.graph{ state = { out = kvm.reduce.replace } }\n"
                              "local echo = kvm.agent{ name = 'echo', model = m, template = 'say {input}', max_tokens = 4 }\n"
                              "g:func('f', function(state, last, ctx)\n"
                              "  local outs = ctx:map(echo, { 'a', 'b b', { input = 'c' }, 'd' })\n"
                              "  return { out = table.concat(outs, '|') } end)\n"
                              "g:edge(kvm.START, 'f')\nreturn g\n");
    int run = drive1_ok(wf, "");
    assert_string_equal(state_get(wf, run, "out")->valuestring, "say a|say b b|say c|say d");
    int max_seqs = 0;
    wf_llm_counters(kvm_wf_llm(wf), NULL, NULL, &max_seqs);
    assert_int_equal(max_seqs, 4);
    assert_int_equal(kvm_wf_agent_stats(wf, 0)->calls, 4);
    kvm_wf_free(wf);
}

static void test_failing_agent_routes_through_on_error(void **s) {
    (void)s;
    kvm_workflow_t *wf = load("local kvm = kvmesh\nlocal bad = kvm.model('mock:fail')\n"
                              "local g = kvm.graph{ state = { handled = kvm.reduce.replace } }\n"
                              "g:agent('a', { model = bad, template = 'x' })\n"
                              "g:func('h', function(state, last) return { handled = last.a.code } end)\n"
                              "g:edge(kvm.START, 'a')\ng:edge('a', 'h', { on_error = true })\nreturn g\n");
    int run = drive1_ok(wf, "");
    assert_string_equal(state_get(wf, run, "handled")->valuestring, "KVM_EIO");
    kvm_wf_free(wf);
}

static void test_agent_token_budget_fails_the_node(void **s) {
    (void)s;
    kvm_workflow_t *wf = load(HEAD_ECHO
                              "local g = kvm.graph{}\n"
                              "g:agent('a', { model = m, template = 'one two three four five six', max_tokens = 8, budget = 5 })\n"
                              "g:edge(kvm.START, 'a')\nreturn g\n");
    int run = drive1(wf, "");
    const char *msg;
    assert_int_equal(kvm_wf_run_status(wf, run, &msg), KVM_EBUDGET);
    assert_non_null(strstr(msg, "over its budget of 5"));
    kvm_wf_free(wf);
}

static void test_dataset_and_score_drive_seeded_runs(void **s) {
    (void)s;
    kvm_workflow_t *wf = load(HEAD_ECHO
                              "local g = kvm.graph{ state = { ans = kvm.reduce.replace } }\n"
                              "g:agent('a', { model = m, template = '{input.n}', max_tokens = 2, writes = 'ans' })\n"
                              "g:edge(kvm.START, 'a')\n"
                              "g:dataset(function(seed) return { n = tostring(seed % 2) } end)\n"
                              "g:score(function(result, inputs) return result.state.ans == '1' end)\nreturn g\n");
    int run;
    for (uint64_t seed = 10; seed < 14; seed++) assert_int_equal(kvm_wf_start_seeded(wf, seed, NULL, &run), 0);
    assert_int_equal(kvm_wf_drive(wf), 0);
    double total = 0, sc;
    for (int r = 0; r < 4; r++) {
        assert_int_equal(kvm_wf_run_score(wf, r, &sc), 1);
        total += sc;
    }
    assert_true(total == 2.0);
    kvm_wf_free(wf);
}

/* kv = "kvcomm" runs the default policy (preset=blend, within a point of dense: docs/kvcomm.md §5.2); the paper's
 * policy is a model's switch, kvmesh.model{kvcomm = {preset = "spec"}}, and the engine's switches win over it. */
static kvm_workflow_t *load_model_line(const char *model_line, const char *const *sets, int n_sets) {
    char src[1024];
    snprintf(src, sizeof src, "local kvm = kvmesh\nlocal m = %s\nlocal g = kvm.graph{ name = 'k' }\n"
             "g:agent('a', { model = m, template = 'Q: {input}', max_tokens = 2 })\ng:edge(kvm.START, 'a')\nreturn g\n",
             model_line);
    kvm_wf_opts_t o = {0};
    o.llm.kvcomm_set = sets;
    o.llm.n_kvcomm_set = n_sets;
    return kvm_wf_load_string("k.lua", src, strlen(src), &o);
}

static void model_switches(kvm_workflow_t *wf, char *out, size_t cap) {
    wf_llm_model_info_t mi;
    wf_llm_model_describe(kvm_wf_llm(wf), 0, &mi);
    snprintf(out, cap, "%s", mi.kvcomm);
}

static void test_kvcomm_default_is_the_blend_and_a_model_can_ask_for_the_spec(void **s) {
    (void)s;
    char sw[512];
    kvm_workflow_t *wf = load_model_line("kvm.model('mock:echo')", NULL, 0);
    if (!wf) fail_msg("load: %s", kvm_errmsg());
    model_switches(wf, sw, sizeof sw);
    if (!strstr(sw, "recompute_below=32 recompute_text=64 recompute_frac=0.50 guard=on"))
        fail_msg("default is not the blend: %s", sw);
    drive1_ok(wf, "hello");
    kvm_wf_free(wf);
    wf = load_model_line("kvm.model{ path = 'mock:echo', kvcomm = { preset = 'spec', gamma = 0.5 } }", NULL, 0);
    if (!wf) fail_msg("load: %s", kvm_errmsg());
    model_switches(wf, sw, sizeof sw);
    if (!strstr(sw, "recompute_below=0 recompute_text=0 recompute_frac=0.00") || !strstr(sw, "gamma=0.50"))
        fail_msg("preset=spec not applied: %s", sw);
    kvm_wf_free(wf);
    /* the engine's switches (CLI --kvcomm, the API's runtime parameters, kvmesh serve) are applied after the model's */
    static const char *const over[] = {"recompute_frac=0.25"};
    wf = load_model_line("kvm.model{ path = 'mock:echo', kvcomm = { preset = 'spec' } }", over, 1);
    if (!wf) fail_msg("load: %s", kvm_errmsg());
    model_switches(wf, sw, sizeof sw);
    if (!strstr(sw, "recompute_frac=0.25")) fail_msg("the engine's switch did not win: %s", sw);
    kvm_wf_free(wf);
}

static void test_bad_model_kvcomm_switches_are_refused_with_their_name(void **s) {
    (void)s;
    static const char *const lines[][2] = {
        {"kvm.model{ path = 'mock:echo', kvcomm = { preset = 'fast' } }", "preset: 'fast' is not one of spec|blend"},
        {"kvm.model{ path = 'mock:echo', kvcomm = { nosuch = 1 } }", "unknown KVCOMM switch 'nosuch'"},
        {"kvm.model{ path = 'mock:echo', kvcomm = 'spec' }", "field 'kvcomm' must be a table"},
        {"kvm.model{ path = 'mock:echo', kvcomm = { gamma = {} } }", "kvcomm.gamma must be a string, number or boolean"},
        {"kvm.model('mock:echo') m = kvm.model{ path = 'mock:echo', kvcomm = { preset = 'spec' } }",
         "already open with other KVCOMM switches"},
    };
    for (size_t i = 0; i < sizeof lines / sizeof lines[0]; i++) {
        kvm_workflow_t *wf = load_model_line(lines[i][0], NULL, 0);
        if (wf) fail_msg("loaded: %s", lines[i][0]);
        if (!strstr(kvm_errmsg(), lines[i][1])) fail_msg("message lacks '%s':\n%s", lines[i][1], kvm_errmsg());
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fan_out_of_four_agents_runs_in_one_batch),
        cmocka_unit_test(test_several_runs_share_forward_passes),
        cmocka_unit_test(test_agent_reads_the_output_of_its_producer),
        cmocka_unit_test(test_conditional_loop_ends_when_its_predicate_says_so),
        cmocka_unit_test(test_step_budget_ends_an_endless_loop),
        cmocka_unit_test(test_router_picks_the_next_node_or_end),
        cmocka_unit_test(test_reducers_max_min_merge_and_custom),
        cmocka_unit_test(test_join_any_fires_on_the_first_source),
        cmocka_unit_test(test_ctx_call_yields_and_returns_the_agent_text),
        cmocka_unit_test(test_ctx_map_runs_its_calls_in_one_batch_and_keeps_their_order),
        cmocka_unit_test(test_failing_agent_routes_through_on_error),
        cmocka_unit_test(test_agent_token_budget_fails_the_node),
        cmocka_unit_test(test_dataset_and_score_drive_seeded_runs),
        cmocka_unit_test(test_kvcomm_default_is_the_blend_and_a_model_can_ask_for_the_spec),
        cmocka_unit_test(test_bad_model_kvcomm_switches_are_refused_with_their_name),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
