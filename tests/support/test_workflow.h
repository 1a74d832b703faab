/* test_workflow.h - the run/resume fixture of the workflow tests of the public API (test_resume.c, test_subgraph.c):
 * a scratch trace root made by the group setup and removed by its teardown, a quiet runtime tracing into it, workflows
 * loaded from a string (chunk name "g.lua": load errors name "g.lua:LINE:"), the runtime driven until nothing is left
 * to do, JSON texts compared by value, and a run checked against the outputs and state it should end with.
 * Include after <cmocka.h>, <cjson/cJSON.h> and <kvmesh.h>. */
#ifndef KVM_TEST_WORKFLOW_H
#define KVM_TEST_WORKFLOW_H

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char g_root[256]; /* the trace root of the test program */

/* The group setup: makes g_root (/tmp/kvm_test_XXXXXX); 0, or -1 (the group does not start). */
static inline int workflow_root_setup(void **state) {
    (void)state;
    snprintf(g_root, sizeof g_root, "/tmp/kvm_test_XXXXXX");
    return mkdtemp(g_root) ? 0 : -1;
}

/* The group teardown: removes g_root and every trace in it. */
static inline int workflow_root_teardown(void **state) {
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_root);
    return system(cmd) == 0 ? 0 : -1;
}

/* A quiet runtime writing traces under g_root; fails the test when it cannot be made. */
static inline kvm_runtime_t *runtime(void) {
    kvm_runtime_params_t p = kvm_runtime_default_params();
    p.echo_print = false;
    p.quiet = true;
    p.trace_root = g_root;
    kvm_runtime_t *rt = kvm_runtime_create(&p);
    if (!rt) fail_msg("runtime: %s", kvm_errmsg());
    return rt;
}

/* The workflow of Lua source src ("g.lua"); fails the test with the load error. */
static inline kvm_workflow_t *load(kvm_runtime_t *rt, const char *src) {
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "g.lua", src, strlen(src), NULL);
    if (!wf) fail_msg("load: %s", kvm_errmsg());
    return wf;
}

/* Steps the runtime until no run has anything left to do. */
static inline void drive(kvm_runtime_t *rt) {
    while (kvm_runtime_step(rt) > 0) {
    }
}

/* The JSON texts a and b hold the same value (object keys in any order: a Lua table has no key order). */
static inline bool same_json(const char *a, const char *b) {
    cJSON *x = cJSON_Parse(a), *y = cJSON_Parse(b);
    bool same = x && y && cJSON_Compare(x, y, true);
    cJSON_Delete(x);
    cJSON_Delete(y);
    return same;
}

/* The run ended without error, with the outputs want_out and the state want_state; else the test fails naming what. */
static inline void assert_same_run(kvm_run_t *r, const char *want_out, const char *want_state, const char *what) {
    const char *msg = NULL;
    if (kvm_run_status(r, &msg) != 0) fail_msg("%s: %s", what, msg ? msg : "?");
    char *out = kvm_run_outputs_json(r), *st = kvm_run_state_json(r);
    if (!same_json(out, want_out) || !same_json(st, want_state))
        fail_msg("%s:\n outputs %s\n want    %s\n state %s\n want  %s", what, out, want_out, st, want_state);
    kvm_free(out);
    kvm_free(st);
}

#endif
