/* test_kv_admission.c - KV admission control (issue 19, docs/kv-store.md): agent steps that do not fit the KV
 * pool beside the running ones wait for them, in submit order, instead of failing; a step larger than the
 * whole pool fails at once with the numbers; a step that has waited kv_wait_ms fails naming the deadline.
 *
 * Real model (models/minillama-2m, 128 KV blocks by default = 4 contexts of 512 tokens), through the public
 * API. The 1,000-agent fan-out needs about 2 blocks per agent, 2,000 in all. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <kvmesh.h>
#include <kvmesh_lab.h>

#define MINILLAMA KVM_SOURCE_DIR "/models/minillama-2m"

/* N agent nodes, each its own template, all started by START: one super-step. */
static const char *k_fanout =
    "local kvm = kvmesh\n"
    "local m = kvm.model('minillama')\n"
    "local g = kvm.graph{ name = 'fan', limit = { lua_ms = 600000 } }\n"
    "local names = {}\n"
    "for i = 1, %d do\n"
    "  local n = string.format('a%%04d', i)\n"
    "  names[#names + 1] = n\n"
    "  g:agent(n, { model = m, kv = 'prefix', template = 'Agent ' .. i .. ' says about {input}:', max_tokens = 2 })\n"
    "end\n"
    "g:edge(kvm.START, names)\n"
    "return g\n";

static kvm_runtime_t *runtime_of(const char *model, size_t kv_bytes, double kv_wait_ms) {
    kvm_runtime_params_t p = kvm_runtime_default_params();
    p.model.backend = "cpu";
    p.model_override = model;
    p.kv_budget_bytes = kv_bytes;
    p.kv_wait_ms = kv_wait_ms;
    p.run_lua_ms = 600000; /* loading 1,000 agents on a loaded machine (ASan, -j2 builds beside) */
    p.quiet = true;
    p.echo_print = false;
    kvm_runtime_t *rt = kvm_runtime_create(&p);
    assert_non_null(rt);
    return rt;
}

static kvm_runtime_t *runtime(size_t kv_bytes, double kv_wait_ms) { return runtime_of(MINILLAMA, kv_bytes, kv_wait_ms); }

/* Runs src once with input; returns the run's status, its outputs JSON in *out (kvm_free) when it has them
 * and its message in msg. */
static int run_n(kvm_runtime_t *rt, const char *src, int n, const char *inputs, char **out, char *msg, size_t cap) {
    char text[2048];
    snprintf(text, sizeof text, src, n); /* the %d in src, if any */
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "wf.lua", text, strlen(text), NULL);
    if (!wf) fail_msg("load: %s", kvm_errmsg());
    kvm_run_params_t rp = kvm_run_default_params();
    rp.inputs_json = inputs;
    kvm_run_t *r = kvm_run_start(wf, &rp);
    assert_non_null(r);
    assert_int_equal(kvm_workflow_drive(wf), 0);
    const char *m = NULL;
    int st = kvm_run_status(r, &m);
    snprintf(msg, cap, "%s", m ? m : "");
    *out = st == 0 ? kvm_run_outputs_json(r) : NULL;
    kvm_workflow_free(wf);
    return st;
}

static int run_once(kvm_runtime_t *rt, const char *src, const char *inputs, char **out, char *msg, size_t cap) {
    return run_n(rt, src, 1000, inputs, out, msg, cap);
}

/* Under ASan (a Debug build) 1,000 agents on the model take over 5 minutes: there (KVM_SANITIZED=1) 48 agents
 * over a 6-block pool, the same ratio of agents to blocks; the mock test below runs 1,000 in both builds. */
static void test_a_fan_out_of_1000_agents_over_the_default_pool_completes_as_with_a_large_pool(void **st) {
    (void)st;
    char msg[2048];
    char *small = NULL, *large = NULL;
    bool asan = getenv("KVM_SANITIZED") != NULL;
    kvm_runtime_t *rt = runtime(asan ? 6 * 49152 : 0, 0);
    int n = asan ? 48 : 1000;
    int rc = run_n(rt, k_fanout, n, "{\"input\": \"cats\"}", &small, msg, sizeof msg);
    if (rc) fail_msg("default pool: %s (%s)", kvm_errname(rc), msg);
    kvm_runtime_free(rt);
    rt = runtime((size_t)256 << 20, 0);
    rc = run_n(rt, k_fanout, n, "{\"input\": \"cats\"}", &large, msg, sizeof msg);
    if (rc) fail_msg("large pool: %s (%s)", kvm_errname(rc), msg);
    kvm_runtime_free(rt);
    assert_non_null(strstr(small, asan ? "\"a0048\"" : "\"a1000\""));
    assert_string_equal(small, large);
    kvm_free(small);
    kvm_free(large);
}

/* The same fan-out on the mock model (no templates; it keeps KV blocks of 256 bytes) over a 64-block pool. */
static void test_a_fan_out_of_1000_mock_agents_over_a_64_block_pool_completes_as_with_a_large_pool(void **st) {
    (void)st;
    char msg[2048];
    char *small = NULL, *large = NULL;
    kvm_runtime_t *rt = runtime_of("mock:echo", 64 * 256, 0);
    int rc = run_once(rt, k_fanout, "{\"input\": \"cats\"}", &small, msg, sizeof msg);
    if (rc) fail_msg("64 blocks: %s (%s)", kvm_errname(rc), msg);
    kvm_runtime_free(rt);
    rt = runtime_of("mock:echo", (size_t)64 << 20, 0);
    rc = run_once(rt, k_fanout, "{\"input\": \"cats\"}", &large, msg, sizeof msg);
    if (rc) fail_msg("large pool: %s (%s)", kvm_errname(rc), msg);
    kvm_runtime_free(rt);
    assert_non_null(strstr(small, "\"a1000\""));
    assert_string_equal(small, large);
    kvm_free(small);
    kvm_free(large);
}

/* A dense step whose prompt alone needs more blocks than a 4-block pool: no waiting, the numbers named. */
static void test_a_step_larger_than_the_whole_pool_fails_at_once_with_the_numbers(void **st) {
    (void)st;
    const char *src = "local kvm = kvmesh\nlocal m = kvm.model('minillama')\nlocal g = kvm.graph{ name = 'big' }\n"
                      "g:agent('a', { model = m, kv = 'dense', template = 'Say: {input}', max_tokens = 2 })\n"
                      "g:edge(kvm.START, 'a')\nreturn g\n";
    char input[4096] = "{\"input\": \"";
    for (int i = 0; i < 150; i++) strcat(input, "cat ");
    strcat(input, "\"}");
    char msg[2048];
    char *out = NULL;
    kvm_runtime_t *rt = runtime(4 * 49152, 60000);
    uint64_t t0 = kvm_now_ns();
    int rc = run_once(rt, src, input, &out, msg, sizeof msg);
    double ms = (double)(kvm_now_ns() - t0) / 1e6;
    kvm_runtime_free(rt);
    /* refused by the scheduler's admission ("can never fit") or, as here, when its input's KV is computed */
    if (rc != KVM_ENOMEM || !(strstr(msg, "can never fit") || strstr(msg, "even with nothing else running")) ||
        !(strstr(msg, " of 4 ") || strstr(msg, "pool has 4")))
        fail_msg("%s: %s", kvm_errname(rc), msg);
    assert_true(ms < 30000); /* at once, not after the 60 s wait */
}

/* 40 agents over an 8-block pool with a wait of 1 ms: those that wait longer fail, naming kv_wait_ms. */
static void test_a_step_that_waits_past_kv_wait_ms_fails_naming_the_deadline(void **st) {
    (void)st;
    const char *src = "local kvm = kvmesh\nlocal m = kvm.model('minillama')\nlocal g = kvm.graph{ name = 'wait' }\n"
                      "local names = {}\nfor i = 1, 40 do\n  names[i] = 'w' .. i\n"
                      "  g:agent(names[i], { model = m, kv = 'dense', template = 'Agent ' .. i .. ': {input}', max_tokens = 24 })\n"
                      "end\ng:edge(kvm.START, names)\nreturn g\n";
    char msg[2048];
    char *out = NULL;
    kvm_runtime_t *rt = runtime(8 * 49152, 1);
    int rc = run_once(rt, src, "{\"input\": \"a story about a cat and a dog\"}", &out, msg, sizeof msg);
    kvm_runtime_free(rt);
    if (rc != KVM_ENOMEM || !strstr(msg, "kv_wait_ms") || !strstr(msg, "waited")) fail_msg("%s: %s", kvm_errname(rc), msg);
}

static void test_a_negative_kv_wait_is_refused(void **st) {
    (void)st;
    kvm_runtime_params_t p = kvm_runtime_default_params();
    p.kv_wait_ms = -1;
    assert_null(kvm_runtime_create(&p));
    assert_int_equal(kvm_errcode(), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "kv_wait_ms"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_a_fan_out_of_1000_agents_over_the_default_pool_completes_as_with_a_large_pool),
        cmocka_unit_test(test_a_fan_out_of_1000_mock_agents_over_a_64_block_pool_completes_as_with_a_large_pool),
        cmocka_unit_test(test_a_step_larger_than_the_whole_pool_fails_at_once_with_the_numbers),
        cmocka_unit_test(test_a_step_that_waits_past_kv_wait_ms_fails_naming_the_deadline),
        cmocka_unit_test(test_a_negative_kv_wait_is_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
