/* test_node_timeout.c - per-agent timeout_ms enforced inside generation and retry = {...} (issue 18), through the
 * public API (include/kvmesh.h) on the bundled model models/minillama-2m (in the repository). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include <kvmesh.h>

#define MODEL KVM_SOURCE_DIR "/models/minillama-2m"

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static kvm_runtime_t *runtime(void) {
    kvm_runtime_params_t p = kvm_runtime_default_params();
    p.echo_print = false;
    p.quiet = true;
    kvm_runtime_t *rt = kvm_runtime_create(&p);
    if (!rt) fail_msg("runtime: %s", kvm_errmsg());
    return rt;
}

/* A workflow with one agent 'talk' (options spliced in) whose failure routes to a func that records it. */
static kvm_workflow_t *load(kvm_runtime_t *rt, const char *agent_opts) {
    char src[2048];
    snprintf(src, sizeof src,
             "local g = kvmesh.graph{ state = { err = kvmesh.reduce.replace } }\n"
             "local m = kvmesh.model('%s')\n"
             "g:agent('talk', { model = m, template = 'Tell a long story about {input}.', %s })\n"
             "g:func('after', function(state, last, ctx) return { err = last.talk and last.talk.error } end)\n"
             "g:edge(kvmesh.START, 'talk')\n"
             "g:edge('talk', 'after', { on_error = true })\n"
             "g:output(function(state) return { err = state.err } end)\n"
             "return g\n",
             MODEL, agent_opts);
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "t.lua", src, strlen(src), NULL);
    if (!wf) fail_msg("load: %s", kvm_errmsg());
    return wf;
}

/* Starts a run of wf and drives the runtime until it is idle; *ms is the wall time. */
static kvm_run_t *drive_once(kvm_runtime_t *rt, kvm_workflow_t *wf, double *ms) {
    kvm_run_params_t p = kvm_run_default_params();
    p.inputs_json = "{\"input\": \"a cat\"}";
    double t0 = now_ms();
    kvm_run_t *r = kvm_run_start(wf, &p);
    assert_non_null(r);
    while (kvm_runtime_step(rt) > 0) {
    }
    *ms = now_ms() - t0;
    return r;
}

/* Runs wf once; returns its outputs JSON (kvm_free) and the wall time. */
static char *run_once(kvm_runtime_t *rt, kvm_workflow_t *wf, double *ms) {
    char *res = kvm_run_outputs_json(drive_once(rt, wf, ms));
    assert_non_null(res);
    return res;
}

static double model_stat(kvm_runtime_t *rt, const char *key) {
    char *text = kvm_runtime_stats_json(rt);
    cJSON *o = text ? cJSON_Parse(text) : NULL;
    kvm_free(text);
    const cJSON *m = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(o, "models"), 0);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(m, key);
    double d = cJSON_IsNumber(v) ? v->valuedouble : -1;
    cJSON_Delete(o);
    return d;
}

static void test_a_node_timeout_stops_a_long_generation_near_its_deadline_and_frees_its_kv(void **st) {
    (void)st;
    kvm_runtime_t *rt = runtime();
    /* the generation runs to the model's context end (512 positions: ~490 tokens, about 50 ms on an idle core since
     * issue 16's kernels), far past the 10 ms timeout (a 60 ms timeout raced with that end and sometimes lost) */
    kvm_workflow_t *wf = load(rt, "max_tokens = 2000, ignore_eos = true, timeout_ms = 10");
    double free_before = -1;
    for (int k = 0; k < 3; k++) {
        double ms;
        char *res = run_once(rt, wf, &ms);
        const char *at = strstr(res, "timed out: its timeout_ms of 10 ms passed after ");
        if (!at) fail_msg("run %d (%.0f ms): no timeout in its outputs: %s", k, ms, res);
        int n_out = atoi(at + strlen("timed out: its timeout_ms of 10 ms passed after "));
        /* stopped well before the context's end; on a busy machine (CI runs the suites two at a time) the deadline
         * may pass before the first token, so 0 is a valid count */
        if (n_out < 0 || n_out >= 400) fail_msg("run %d: %d tokens out before the 10 ms timeout: %s", k, n_out, res);
        /* the bound leaves room for a busy CI machine (the 50 ms past the deadline is measured on a quiet
         * one: docs/lua-api.md); the first run also loads the model */
        if (k > 0) assert_true(ms < 10 + 1000);
        assert_int_equal((int)model_stat(rt, "steps_running"), 0);
        const double free_now = model_stat(rt, "kv_blocks_free");
        /* the store keeps the run's input segment (one block, evictable); the step's own blocks (prompt and
         * n_out generated tokens, 16 per block) are all back */
        if (free_before >= 0 && free_before - free_now > 1)
            fail_msg("call %d (%d tokens out) kept %g KV blocks", k, n_out, free_before - free_now);
        free_before = free_now;
        kvm_free(res);
    }
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

static void test_a_timed_out_call_is_retried_with_backoff_and_says_its_attempts(void **st) {
    (void)st;
    kvm_runtime_t *rt = runtime();
    kvm_workflow_t *wf =
        load(rt, "max_tokens = 2000, ignore_eos = true, timeout_ms = 10, retry = { max = 2, backoff_ms = 30 }");
    double ms;
    char *res = run_once(rt, wf, &ms);
    assert_non_null(strstr(res, "(attempt 3 of 3)"));
    assert_true(ms >= 3 * 10 + 30 + 60); /* three attempts, backoffs of 30 and 60 ms */
    kvm_free(res);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

static void test_a_call_that_succeeds_is_not_retried(void **st) {
    (void)st;
    kvm_runtime_t *rt = runtime();
    kvm_workflow_t *wf = load(rt, "max_tokens = 2, timeout_ms = 60000, retry = { max = 3 }");
    double ms;
    char *res = run_once(rt, wf, &ms);
    assert_null(strstr(res, "timed out"));
    assert_null(strstr(res, "attempt"));
    kvm_free(res);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

static void test_bad_retry_and_timeout_options_are_refused_at_load(void **st) {
    (void)st;
    kvm_runtime_t *rt = runtime();
    const char *bad[][2] = {{"timeout_ms = -1", "timeout_ms"},
                            {"retry = 3", "retry must be a table"},
                            {"retry = { max = 11 }", "max"},
                            {"retry = { tries = 2 }", "unknown field 'tries'"},
                            {"retry = { on = { 'timout' } }", "\"timeout\", \"kv\" or \"error\""}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char src[1024];
        snprintf(src, sizeof src,
                 "local g = kvmesh.graph{}\nlocal m = kvmesh.model('%s')\n"
                 "g:agent('talk', { model = m, template = '{input}', %s })\ng:edge(kvmesh.START, 'talk')\nreturn g\n",
                 MODEL, bad[i][0]);
        kvm_workflow_t *wf = kvm_workflow_load_string(rt, "bad.lua", src, strlen(src), NULL);
        assert_null(wf);
        if (!strstr(kvm_errmsg(), bad[i][1])) fail_msg("'%s': message '%s' lacks '%s'", bad[i][0], kvm_errmsg(), bad[i][1]);
    }
    kvm_runtime_free(rt);
}

static void test_the_runs_wall_time_budget_stops_a_generation_under_way(void **st) {
    (void)st;
    kvm_runtime_t *rt = runtime();
    char src[1024];
    snprintf(src, sizeof src,
             "local g = kvmesh.graph{ limit = { wall_ms = 40 } }\nlocal m = kvmesh.model('%s')\n"
             "g:agent('talk', { model = m, template = '{input}', max_tokens = 2000, ignore_eos = true })\n"
             "g:edge(kvmesh.START, 'talk')\nreturn g\n",
             MODEL);
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "wall.lua", src, strlen(src), NULL);
    assert_non_null(wf);
    for (int k = 0; k < 2; k++) { /* the second run: the model is loaded and warm */
        double ms;
        kvm_run_t *r = drive_once(rt, wf, &ms);
        const char *msg = NULL;
        assert_int_equal(kvm_run_status(r, &msg), KVM_EBUDGET);
        assert_non_null(strstr(msg, "the run's wall-time budget ended during generation, after"));
        if (k > 0) assert_true(ms < 40 + 1000); /* 2,000 tokens would take seconds */
    }
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_a_node_timeout_stops_a_long_generation_near_its_deadline_and_frees_its_kv),
        cmocka_unit_test(test_a_timed_out_call_is_retried_with_backoff_and_says_its_attempts),
        cmocka_unit_test(test_a_call_that_succeeds_is_not_retried),
        cmocka_unit_test(test_the_runs_wall_time_budget_stops_a_generation_under_way),
        cmocka_unit_test(test_bad_retry_and_timeout_options_are_refused_at_load)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
