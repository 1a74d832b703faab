/* test_run_kv.c - a run's own KV policy (kvm_run_params_t.kv): one runtime serves an A/B of one workflow, dense
 * beside prefix reuse, and the trace records the run's policy (issue 12), on the bundled model (in the repo). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include <kvmesh.h>

#define MODEL KVM_SOURCE_DIR "/models/minillama-2m"

typedef struct seen {
    int steps, reused;
} seen_t;

static void on_event(void *ud, const kvm_run_event_t *e) {
    seen_t *s = ud;
    if (e->kind != KVM_RUN_STEP || !e->step->agent) return;
    s->steps++;
    s->reused += e->step->kv_exact + e->step->kv_offset + e->step->kv_naive;
}

/* Runs wf once with policy kv (NULL = the agents' own); *seen gets its steps' reuse. */
static kvm_run_t *run(kvm_runtime_t *rt, kvm_workflow_t *wf, const char *kv, seen_t *seen) {
    kvm_run_params_t p = kvm_run_default_params();
    p.inputs_json = "{\"input\": \"Ann: 1234. Bob: 5678. Cleo: 9012. Dan: 3456.\"}";
    p.kv = kv;
    p.on_event = on_event;
    p.event_ud = seen;
    kvm_run_t *r = kvm_run_start(wf, &p);
    if (!r) fail_msg("run: %s", kvm_errmsg());
    while (kvm_runtime_step(rt) > 0) {
    }
    assert_int_equal(kvm_run_status(r, NULL), 0);
    return r;
}

static void test_a_runs_kv_policy_overrides_its_agents_and_is_traced(void **st) {
    (void)st;
    char root[] = "/tmp/kvm-run-kv-XXXXXX";
    assert_non_null(mkdtemp(root));
    kvm_runtime_params_t rp = kvm_runtime_default_params();
    rp.echo_print = false;
    rp.trace_root = root;
    kvm_runtime_t *rt = kvm_runtime_create(&rp);
    assert_non_null(rt);
    char src[1024];
    snprintf(src, sizeof src,
             "local g = kvmesh.graph{}\nlocal m = kvmesh.model('%s')\n"
             "g:agent('a', { model = m, kv = 'prefix', template = 'Facts: {input}\\nWho has 1234?', max_tokens = 2 })\n"
             "g:edge(kvmesh.START, 'a')\nreturn g\n",
             MODEL);
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "ab.lua", src, strlen(src), NULL);
    assert_non_null(wf);
    seen_t first = {0}, again = {0}, dense = {0};
    run(rt, wf, NULL, &first);               /* the agent's own policy: prefix */
    run(rt, wf, NULL, &again);               /* the same prompt: an exact prefix hit */
    kvm_run_t *d = run(rt, wf, "dense", &dense); /* the same prompt, dense for this run only */
    assert_int_equal(again.steps, 1);
    assert_true(again.reused > 0);
    assert_int_equal(dense.steps, 1);
    assert_int_equal(dense.reused, 0);
    /* the trace says so: a replay of it runs dense too */
    kvm_trace_reader_t *tr = kvm_trace_reader_open(kvm_run_trace_dir(d));
    assert_non_null(tr);
    const char *start = kvm_trace_reader_record_json(tr, 0);
    assert_non_null(strstr(start, "\"kv_override\":\"dense\""));
    kvm_trace_reader_free(tr);
    /* a policy that does not exist is refused by name */
    kvm_run_params_t p = kvm_run_default_params();
    p.kv = "fast";
    assert_null(kvm_run_start(wf, &p));
    assert_non_null(strstr(kvm_errmsg(), "fast"));
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    assert_int_equal(system(cmd), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_a_runs_kv_policy_overrides_its_agents_and_is_traced)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
