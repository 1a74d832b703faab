/* test_trace_jsonl.c - JSONL traces: flushed records, a torn last line is ignored, a bad middle line
 * is an error, and a run's prompts can be rebuilt from its trace alone. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "agents/wf.h"
#include "runtime/core/core.h"
#include "runtime/trace/trace.h"

static char root[256];

static int setup(void **s) {
    (void)s;
    snprintf(root, sizeof root, "%s/test_trace_%d", KVM_BINARY_DIR, (int)getpid());
    return 0;
}

static int teardown(void **s) {
    (void)s;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    return system(cmd) == 0 ? 0 : 0;
}

static void test_records_are_readable_while_the_file_is_open(void **s) {
    (void)s;
    kvm_trace_t *t = kvm_trace_open(root, "live");
    assert_non_null(t);
    for (int i = 0; i < 3; i++) {
        cJSON *r = cJSON_CreateObject();
        cJSON_AddStringToObject(r, "t", "log");
        cJSON_AddNumberToObject(r, "i", i);
        assert_int_equal(kvm_trace_write(t, r), 0);
        cJSON_Delete(r);
    }
    kvm_trace_log_t log;
    assert_int_equal(kvm_trace_read(t->dir, &log), 0); /* no close: flushed per record */
    assert_int_equal(log.n, 3);
    assert_false(log.torn_tail);
    assert_non_null(cJSON_GetObjectItemCaseSensitive(log.recs[0], "ts"));
    kvm_trace_log_free(&log);
    kvm_trace_close(t);
}

static void test_torn_last_line_is_ignored(void **s) {
    (void)s;
    kvm_trace_t *t = kvm_trace_open(root, "torn");
    assert_non_null(t);
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "t", "run.start");
    assert_int_equal(kvm_trace_write(t, r), 0);
    cJSON_Delete(r);
    fputs("{\"t\":\"step\",\"idx\":0,\"pieces\":[{\"te", t->f); /* the writer died here */
    fflush(t->f);
    kvm_trace_log_t log;
    assert_int_equal(kvm_trace_read(t->path, &log), 0);
    assert_int_equal(log.n, 1);
    assert_true(log.torn_tail);
    kvm_trace_log_free(&log);
    kvm_trace_close(t);
}

static void test_bad_middle_line_is_an_error_naming_the_line(void **s) {
    (void)s;
    kvm_trace_t *t = kvm_trace_open(root, "bad");
    assert_non_null(t);
    fputs("{\"t\":\"a\"}\nnot json\n{\"t\":\"b\"}\n", t->f);
    fflush(t->f);
    kvm_trace_log_t log;
    assert_int_equal(kvm_trace_read(t->path, &log), KVM_EFORMAT);
    assert_non_null(strstr(kvm_errmsg(), ":2:"));
    kvm_trace_close(t);
}

static void found(const char *dir, void *ud) {
    (void)dir;
    ++*(int *)ud;
}

static const char *WF =
    "local kvm = kvmesh\nlocal m = kvm.model('mock:echo')\n"
    "local g = kvm.graph{ name = 'rebuild', state = { verdict = kvm.reduce.replace } }\n"
    "g:agent('planner', { model = m, role = 'You plan.', template = 'Task: {input}\\nFacts: {input.facts}\\nPlan:', max_tokens = 6 })\n"
    "g:agent('coder', { model = m, role = 'You code.', template = 'Plan:\\n{agent:planner}\\nPrev: {agent.coder.prev}\\nVerdict: {state.verdict}\\nCode:', max_tokens = 7 })\n"
    "g:func('judge', function(state, last) return { verdict = (state.verdict or '') .. 'x' } end)\n"
    "g:edge(kvm.START, 'planner')\ng:edge('planner', 'coder')\ng:edge('coder', 'judge')\n"
    "g:edge('judge', 'coder', { when = function(state) return #state.verdict < 2 end })\n"
    "g:limit{ steps = 10 }\nreturn g\n";

/* Rebuilds every agent step's prompt from the trace alone: the agent's role and template parts from
 * run.start, the slot contents from the step; compares with the prompt the engine ran. */
static void test_prompts_rebuild_from_the_trace_alone(void **s) {
    (void)s;
    kvm_wf_opts_t o = {0};
    char rb[300];
    snprintf(rb, sizeof rb, "%s/rebuild", root);
    o.trace_root = rb;
    kvm_workflow_t *wf = kvm_wf_load_string("rebuild.lua", WF, strlen(WF), &o);
    if (!wf) fail_msg("%s", kvm_errmsg());
    cJSON *in = cJSON_CreateObject();
    cJSON_AddStringToObject(in, "input", "sort the list");
    cJSON_AddStringToObject(in, "facts", "3 1 2");
    int run;
    assert_int_equal(kvm_wf_start(wf, in, 5, &run), 0);
    cJSON_Delete(in);
    assert_int_equal(kvm_wf_drive(wf), 0);
    assert_int_equal(kvm_wf_run_status(wf, run, NULL), 0);
    char dir[512];
    snprintf(dir, sizeof dir, "%s", kvm_wf_run_trace_dir(wf, run));
    kvm_wf_free(wf);

    kvm_trace_log_t log;
    assert_int_equal(kvm_trace_read(dir, &log), 0);
    int from = 0;
    cJSON *start = kvm_trace_log_next(&log, "run.start", &from);
    assert_non_null(start);
    cJSON *agents = cJSON_GetObjectItemCaseSensitive(start, "agents");
    int n_steps = 0;
    for (cJSON *st; (st = kvm_trace_log_next(&log, "step", &from)) != NULL;) {
        const cJSON *an = cJSON_GetObjectItemCaseSensitive(st, "agent");
        if (!an) continue;
        const cJSON *a = NULL;
        cJSON_ArrayForEach(a, agents) if (!strcmp(cJSON_GetObjectItemCaseSensitive(a, "name")->valuestring, an->valuestring)) break;
        assert_non_null(a);
        const cJSON *parts = cJSON_GetObjectItemCaseSensitive(a, "parts"), *pieces = cJSON_GetObjectItemCaseSensitive(st, "pieces");
        int n = cJSON_GetArraySize(parts);
        assert_int_equal(cJSON_GetArraySize(pieces), n);
        wf_piece_t pc[16];
        for (int i = 0; i < n; i++) {
            const cJSON *part = cJSON_GetArrayItem(parts, i), *piece = cJSON_GetArrayItem(pieces, i);
            const cJSON *slot = cJSON_GetObjectItemCaseSensitive(part, "slot");
            if (slot) { /* the content comes from the step, bound to the template's placeholder */
                assert_string_equal(cJSON_GetObjectItemCaseSensitive(piece, "slot")->valuestring, slot->valuestring);
                pc[i] = (wf_piece_t){.is_slot = true, .name = slot->valuestring,
                                     .text = cJSON_GetObjectItemCaseSensitive(piece, "text")->valuestring};
            } else /* fixed text comes from the template alone */
                pc[i] = (wf_piece_t){.text = cJSON_GetObjectItemCaseSensitive(part, "text")->valuestring};
        }
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(a, "role");
        char *rebuilt = wf_llm_render_plain(cJSON_IsString(role) ? role->valuestring : NULL, pc, n);
        const cJSON *ran = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(st, "prompt"), "text");
        assert_string_equal(rebuilt, ran->valuestring);
        kvm_free(rebuilt);
        n_steps++;
    }
    assert_int_equal(n_steps, 3); /* planner, coder, coder again after the judge */
    /* the step records carry the placeholder values that changed between the two coder steps */
    assert_non_null(kvm_trace_log_next(&log, "run.end", NULL));
    kvm_trace_log_free(&log);
    int runs = 0;
    assert_int_equal(kvm_trace_find_runs(rb, found, &runs), 1);
    assert_int_equal(runs, 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_records_are_readable_while_the_file_is_open),
        cmocka_unit_test(test_torn_last_line_is_ignored),
        cmocka_unit_test(test_bad_middle_line_is_an_error_naming_the_line),
        cmocka_unit_test_setup_teardown(test_prompts_rebuild_from_the_trace_alone, setup, teardown),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
