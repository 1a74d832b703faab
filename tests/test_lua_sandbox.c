/* test_lua_sandbox.c - the workflow Lua sandbox: no io/os/debug/package/load, locked string
 * metatable and libraries, text chunks only, frozen globals, per-run math.random. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "agents/wf.h"

/* Runs a one-node workflow whose func node runs `body` and returns {r = <value>}; returns the
 * run's status and copies the state's r (as JSON text) into out. */
static int run_body(const char *body, uint64_t seed, char *out, size_t cap, char *msg, size_t mcap) {
    char src[4096];
    snprintf(src, sizeof src,
             "local g = kvmesh.graph{ state = { r = kvmesh.reduce.replace } }\n"
             "g:func('f', function(state, last, ctx)\n%s\nend)\n"
             "g:edge(kvmesh.START, 'f')\nreturn g\n",
             body);
    kvm_wf_opts_t o = {0};
    o.max_instructions = 1000000;
    kvm_workflow_t *wf = kvm_wf_load_string("sb.lua", src, strlen(src), &o);
    if (!wf) {
        snprintf(msg, mcap, "%s", kvm_errmsg());
        return kvm_errcode();
    }
    int run;
    assert_int_equal(kvm_wf_start(wf, NULL, seed, &run), 0);
    assert_int_equal(kvm_wf_drive(wf), 0);
    const char *m = NULL;
    int st = kvm_wf_run_status(wf, run, &m);
    snprintf(msg, mcap, "%s", m ? m : "");
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(kvm_wf_run_state(wf, run), "r");
    char *s = r ? cJSON_PrintUnformatted(r) : NULL;
    snprintf(out, cap, "%s", s ? s : "null");
    cJSON_free(s);
    kvm_wf_free(wf);
    return st;
}

/* The last expect_body's r (as JSON text) and message. */
static char g_out[256], g_msg[2048];

/* Runs body with seed 1 and asserts the run's status and, when out is not NULL, its r (JSON text). */
static void expect_body(const char *body, int status, const char *out) {
    assert_int_equal(run_body(body, 1, g_out, sizeof g_out, g_msg, sizeof g_msg), status);
    if (out) assert_string_equal(g_out, out);
}

static void test_dangerous_libraries_are_absent(void **s) {
    (void)s;
    expect_body("return { r = tostring(io) .. tostring(os) .. tostring(debug) .. tostring(package) .. "
                "tostring(load) .. tostring(dofile) .. tostring(loadfile) .. tostring(require) }",
                0, "\"nilnilnilnilnilnilnilnil\"");
}

static void test_string_metatable_is_locked(void **s) { (void)s; expect_body("return { r = getmetatable('') }", 0, "\"locked\""); }

static void test_library_tables_are_read_only(void **s) {
    (void)s;
    expect_body("string.upper = function() return 'x' end return {}", KVM_ELUA_RUNTIME, NULL);
    assert_non_null(strstr(g_msg, "read-only"));
    assert_non_null(strstr(g_msg, "sb.lua:3:"));
}

static void test_rawset_cannot_write_a_locked_table(void **s) {
    (void)s;
    expect_body("rawset(string, 'upper', 1) return {}", KVM_ELUA_RUNTIME, NULL);
    assert_non_null(strstr(g_msg, "read-only"));
}

static void test_globals_are_frozen_after_load(void **s) {
    (void)s;
    expect_body("counter = 1 return {}", KVM_ELUA_RUNTIME, NULL);
    assert_non_null(strstr(g_msg, "globals are read-only"));
}

static void test_binary_chunk_is_rejected(void **s) {
    (void)s;
    const char src[] = "\x1bLua\x54\x00 garbage";
    kvm_workflow_t *wf = kvm_wf_load_string("bin.lua", src, sizeof src - 1, NULL);
    assert_null(wf);
    assert_int_equal(kvm_errcode(), KVM_ELUA_SYNTAX);
}

static void test_string_dump_is_removed(void **s) { (void)s; expect_body("return { r = tostring(string.dump) }", 0, "\"nil\""); }

static void test_collectgarbage_only_counts(void **s) {
    (void)s;
    expect_body("collectgarbage('stop') return {}", KVM_ELUA_RUNTIME, NULL);
    expect_body("return { r = collectgarbage('count') > 0 }", 0, "true");
}

static void test_math_random_is_per_run_and_seeded(void **s) {
    (void)s;
    char a[256], b[256], c[256], msg[1024];
    const char *body = "return { r = math.random(1, 1000000) * 1000 + math.random(1, 999) }";
    assert_int_equal(run_body(body, 42, a, sizeof a, msg, sizeof msg), 0);
    assert_int_equal(run_body(body, 42, b, sizeof b, msg, sizeof msg), 0);
    assert_int_equal(run_body(body, 43, c, sizeof c, msg, sizeof msg), 0);
    assert_string_equal(a, b);
    assert_string_not_equal(a, c);
}

static void test_budget_cannot_be_caught_by_pcall(void **s) {
    (void)s;
    expect_body("for i = 1, 100 do pcall(function() while true do end end) end return { r = 'escaped' }", KVM_EBUDGET,
                NULL);
    assert_string_not_equal(g_out, "\"escaped\"");
}

static void test_ctx_call_outside_a_node_coroutine_is_refused(void **s) {
    (void)s;
    expect_body("local co = coroutine.create(function() return ctx:call('x') end)\n"
                "local ok, err = coroutine.resume(co)\n"
                "return { r = err }",
                0, NULL);
    assert_non_null(strstr(g_out, "ctx:call must be called from"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dangerous_libraries_are_absent),
        cmocka_unit_test(test_string_metatable_is_locked),
        cmocka_unit_test(test_library_tables_are_read_only),
        cmocka_unit_test(test_rawset_cannot_write_a_locked_table),
        cmocka_unit_test(test_globals_are_frozen_after_load),
        cmocka_unit_test(test_binary_chunk_is_rejected),
        cmocka_unit_test(test_string_dump_is_removed),
        cmocka_unit_test(test_collectgarbage_only_counts),
        cmocka_unit_test(test_math_random_is_per_run_and_seeded),
        cmocka_unit_test(test_budget_cannot_be_caught_by_pcall),
        cmocka_unit_test(test_ctx_call_outside_a_node_coroutine_is_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
