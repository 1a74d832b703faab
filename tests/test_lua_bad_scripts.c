/* test_lua_bad_scripts.c - every kind of bad workflow script gives a clear message with file:line,
 * nothing crashes, and other runs of the same workflow started at the same time still finish. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "agents/wf.h"

static kvm_wf_opts_t opts(void) {
    kvm_wf_opts_t o = {0};
    o.max_instructions = 2000000;
    o.lua_cpu_ms = 2000;
    o.run_mem_cap_bytes = (size_t)8 << 20;
    return o;
}

static kvm_workflow_t *load(const char *src) {
    kvm_wf_opts_t o = opts();
    return kvm_wf_load_string("bad.lua", src, strlen(src), &o);
}

/* Starts a "bad" and two "good" runs (input mode) of src loaded with options o, drives them, and checks
 * the bad one failed with code and a message containing want, while the good ones finished ok. */
static void check_runs_opts(const char *src, const kvm_wf_opts_t *o, int code, const char *want) {
    kvm_workflow_t *wf = kvm_wf_load_string("bad.lua", src, strlen(src), o);
    if (!wf) fail_msg("load failed: %s", kvm_errmsg());
    int runs[3];
    const char *modes[3] = {"good", "bad", "good"};
    for (int i = 0; i < 3; i++) {
        cJSON *in = cJSON_CreateObject();
        cJSON_AddStringToObject(in, "mode", modes[i]);
        cJSON_AddStringToObject(in, "input", "what is 2 + 2");
        assert_int_equal(kvm_wf_start(wf, in, 7 + (uint64_t)i, &runs[i]), 0);
        cJSON_Delete(in);
    }
    assert_int_equal(kvm_wf_drive(wf), 0);
    const char *msg = NULL;
    assert_int_equal(kvm_wf_run_status(wf, runs[1], &msg), code);
    assert_non_null(msg);
    if (!strstr(msg, want)) fail_msg("message lacks '%s':\n%s", want, msg);
    assert_int_equal(kvm_wf_run_status(wf, runs[0], NULL), 0);
    assert_int_equal(kvm_wf_run_status(wf, runs[2], NULL), 0);
    kvm_wf_free(wf);
}

static void check_runs(const char *src, int code, const char *want) {
    kvm_wf_opts_t o = opts();
    check_runs_opts(src, &o, code, want);
}

#define HEAD                                                                                     \
    "local kvm = kvmesh\n"                                                                       \
    "local m = kvm.model('mock:echo')\n"                                                         \
    "local g = kvm.graph{ name = 't', state = { mode = kvm.reduce.replace, big = kvm.reduce.replace } }\n" \
    "g:agent('a', { model = m, template = 'Q: {input}', max_tokens = 4 })\n"

/* The script must be refused at load with code (0: any code), the message holding want1 and want2. */
static void check_refused(const char *src, int code, const char *want1, const char *want2) {
    kvm_workflow_t *wf = load(src);
    assert_null(wf);
    if (code) assert_int_equal(kvm_errcode(), code);
    if (!strstr(kvm_errmsg(), want1) || (want2 && !strstr(kvm_errmsg(), want2)))
        fail_msg("message lacks '%s' / '%s':\n%s", want1, want2 ? want2 : "", kvm_errmsg());
}

static void test_syntax_error_names_file_and_line(void **s) {
    (void)s;
    check_refused(HEAD "local x = = 1\nreturn g\n", KVM_ELUA_SYNTAX, "bad.lua:5:", NULL);
}

static void test_runtime_error_in_a_predicate_fails_only_that_run(void **s) {
    (void)s;
    check_runs(HEAD "g:func('check', function(st) return {} end)\n"
                    "g:edge(kvm.START, 'a')\n"
                    "g:edge('a', 'check', { when = function(st, last)\n"
                    "  if st.mode == 'bad' then local t = nil; return t.field end\n"
                    "  return true end })\n"
                    "return g\n",
               KVM_ELUA_RUNTIME, "bad.lua:8:");
}

static void test_unknown_agent_in_an_edge_is_refused_at_load(void **s) {
    (void)s;
    check_refused(HEAD "g:edge(kvm.START, 'a')\ng:edge('a', 'planr')\nreturn g\n", KVM_EINVAL, "bad.lua:6:", "unknown node 'planr'");
}

static void test_unknown_agent_in_a_placeholder_is_refused_at_load(void **s) {
    (void)s;
    check_refused(HEAD "g:agent('b', { model = m, template = 'P: {agent.plannr}' })\n"
                                   "g:edge(kvm.START, 'a')\ng:edge('a', 'b')\nreturn g\n", 0, "bad.lua:5:", "{agent.plannr}");
}

static void test_a_malformed_placeholder_is_refused_at_load_naming_line_and_offset(void **s) {
    (void)s;
    check_refused(HEAD "g:agent('b', { model = m, template = 'P: {agent.a.next}' })\nreturn g\n", KVM_ELUA_RUNTIME, "bad.lua:5:", "agent 'b': template: bad placeholder '{agent.a.next}' at offset 3");
}

static void test_cycle_without_budget_is_refused_at_load(void **s) {
    (void)s;
    check_refused(HEAD "g:agent('b', { model = m, template = 'B: {agent.a}' })\n"
                                   "g:edge(kvm.START, 'a')\ng:edge('a', 'b')\n"
                                   "g:edge('b', 'a', { when = function(st) return true end })\nreturn g\n", KVM_EINVAL, "no step budget", "bad.lua:");
}

static void test_unconditional_cycle_is_refused_even_with_a_budget(void **s) {
    (void)s;
    check_refused(HEAD "g:agent('b', { model = m, template = 'B: {agent.a}' })\n"
                                   "g:edge(kvm.START, 'a')\ng:edge('a', 'b')\ng:edge('b', 'a')\n"
                                   "g:limit{ steps = 5 }\nreturn g\n", 0, "no conditional edge or router", NULL);
}

static void test_infinite_loop_is_killed_and_pcall_cannot_swallow_it(void **s) {
    (void)s;
    check_runs(HEAD "g:func('spin', function(st)\n"
                    "  if st.mode == 'bad' then\n"
                    "    while true do pcall(function() while true do end end) end\n"
                    "  end\n"
                    "  return {} end)\n"
                    "g:edge(kvm.START, 'a')\ng:edge('a', 'spin')\nreturn g\n",
               KVM_EBUDGET, "instruction budget exceeded");
}

static void test_memory_bomb_hits_the_run_cap(void **s) {
    (void)s;
    /* instruction and CPU budgets no loaded (sanitized, shared) machine reaches before the memory cap: the
     * operator's (a script cannot raise them) */
    kvm_wf_opts_t o = opts();
    o.max_instructions = 1000000000;
    o.lua_cpu_ms = 120000;
    check_runs_opts(HEAD "g:func('bomb', function(st)\n"
                    "  if st.mode == 'bad' then\n"
                    "    local t = {}\n"
                    "    for i = 1, 1e9 do t[i] = string.rep('x', 64) .. i end\n"
                    "  end\n"
                    "  return {} end)\n"
                    "g:edge(kvm.START, 'a')\ng:edge('a', 'bomb')\nreturn g\n",
                    &o, KVM_ELUA_MEMORY, "bad.lua:8:");
}

static void test_tool_that_errors_fails_its_run_with_a_traceback(void **s) {
    (void)s;
    check_runs(HEAD "g:tool('search', function(st)\n"
                    "  if st.mode == 'bad' then error('search index is missing') end\n"
                    "  return 'ok' end)\n"
                    "g:edge(kvm.START, 'a')\ng:edge('a', 'search')\nreturn g\n",
               KVM_ELUA_RUNTIME, "bad.lua:6: search index is missing");
}

static void test_script_must_return_a_graph(void **s) {
    (void)s;
    check_refused(HEAD "return 42\n", 0, "must end with 'return g'", NULL);
}

static void test_unknown_agent_field_is_named(void **s) {
    (void)s;
    check_refused("local m = kvmesh.model('mock:echo')\n"
                              "local a = kvmesh.agent{ name = 'x', model = m, template = 'hi', tempreature = 1 }\n", 0, "bad.lua:2:", "unknown field 'tempreature'");
}

static void test_undeclared_state_key_in_an_update_fails_the_run(void **s) {
    (void)s;
    check_runs(HEAD "g:func('upd', function(st)\n"
                    "  if st.mode == 'bad' then return { answr = 1 } end\n"
                    "  return { big = 1 } end)\n"
                    "g:edge(kvm.START, 'a')\ng:edge('a', 'upd')\nreturn g\n",
               KVM_EINVAL, "state key 'answr'");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_syntax_error_names_file_and_line),
        cmocka_unit_test(test_runtime_error_in_a_predicate_fails_only_that_run),
        cmocka_unit_test(test_unknown_agent_in_an_edge_is_refused_at_load),
        cmocka_unit_test(test_unknown_agent_in_a_placeholder_is_refused_at_load),
        cmocka_unit_test(test_a_malformed_placeholder_is_refused_at_load_naming_line_and_offset),
        cmocka_unit_test(test_cycle_without_budget_is_refused_at_load),
        cmocka_unit_test(test_unconditional_cycle_is_refused_even_with_a_budget),
        cmocka_unit_test(test_infinite_loop_is_killed_and_pcall_cannot_swallow_it),
        cmocka_unit_test(test_memory_bomb_hits_the_run_cap),
        cmocka_unit_test(test_tool_that_errors_fails_its_run_with_a_traceback),
        cmocka_unit_test(test_script_must_return_a_graph),
        cmocka_unit_test(test_unknown_agent_field_is_named),
        cmocka_unit_test(test_undeclared_state_key_in_an_update_fails_the_run),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
