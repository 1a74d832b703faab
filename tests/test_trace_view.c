/* test_trace_view.c - the trace views and the replay of include/kvmesh.h, used as a program uses them (only the
 * public header): the views of the version-1 fixture are exactly what `kvmesh trace` printed before they moved
 * into the library (tests/fixtures/trace_v1_views, written by commit 1475872); each view on a run made through
 * the API; torn, bad and newer traces give the reader's error (or say so) through the views; a traced run
 * replays with the same outputs, a changed output is noticed, and the replay uses the runtime's settings. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include <kvmesh.h>

#include "tests/support/test_runtime.h"

#define FIXTURE "tests/fixtures/trace_v1"
#define VIEWS "tests/fixtures/trace_v1_views"

static char root[256];

static int setup(void **s) {
    (void)s;
    snprintf(root, sizeof root, "%s/test_trace_view_%d", KVM_BINARY_DIR, (int)getpid());
    return mkdir(root, 0755);
}

static int teardown(void **s) {
    (void)s;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    return system(cmd) == 0 ? 0 : 0;
}

/* The whole file as a NUL-terminated string (free()). */
static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) fail_msg("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    assert_non_null(s);
    assert_int_equal(fread(s, 1, (size_t)n, f), (size_t)n);
    s[n] = '\0';
    fclose(f);
    return s;
}

static void spit(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* Makes root/<name>/ with events.jsonl holding text; its path in dir. */
static void run_dir_with(const char *name, const char *text, char *dir, size_t cap) {
    char path[600];
    snprintf(dir, cap, "%s/%s", root, name);
    assert_int_equal(mkdir(dir, 0755), 0);
    snprintf(path, sizeof path, "%s/events.jsonl", dir);
    spit(path, text);
}

static void assert_contains(const char *text, const char *want) {
    if (!text || !strstr(text, want)) fail_msg("'%s' not in:\n%s", want, text ? text : "(null)");
}

/* ---- the fixture: the views print what kvmesh trace printed ----------------------------------------------- */

static void assert_same_as_file(char *text, const char *path) {
    char *want = slurp(path);
    assert_non_null(text);
    assert_string_equal(text, want);
    free(want);
    kvm_free(text);
}

static void test_the_run_view_of_the_fixture_is_what_trace_show_printed(void **s) {
    (void)s;
    char *text = NULL;
    assert_int_equal(kvm_trace_view_run(FIXTURE, &text), 0);
    assert_contains(text, "run ad3da736a616af3179717ef40a0a2532  workflow examples/pipeline.lua (graph 'pipeline')  seed 1\n");
    assert_same_as_file(text, VIEWS "/run.txt");
}

static void test_the_steps_view_of_the_fixture_is_what_trace_steps_printed(void **s) {
    (void)s;
    char *text = NULL;
    assert_int_equal(kvm_trace_view_steps(FIXTURE, NULL, &text), 0);
    assert_contains(text, "    {agent.extractor} = Mark: 9442 Ask: Mark   [placeholder agent:extractor:current]\n");
    assert_same_as_file(text, VIEWS "/steps.txt");
}

static void test_the_list_view_of_the_fixtures_is_what_trace_ls_printed(void **s) {
    (void)s;
    char *text = NULL;
    assert_int_equal(kvm_trace_view_list("tests/fixtures", &text), 1); /* one run under the fixtures */
    assert_contains(text, " pipeline     ok ");
    assert_same_as_file(text, VIEWS "/list.txt");
}

static void test_the_steps_view_keeps_only_the_asked_step(void **s) {
    (void)s;
    kvm_trace_view_params_t p = kvm_trace_view_default_params();
    assert_int_equal(p.step, -1);
    assert_false(p.full);
    p.step = 2;
    char *text = NULL;
    assert_int_equal(kvm_trace_view_steps(FIXTURE, &p, &text), 0);
    assert_true(strncmp(text, "== step 2 (super-step 3) node 'answerer'", 40) == 0);
    assert_null(strstr(text, "== step 1"));
    kvm_free(text);
    p.step = 9; /* no such step: nothing */
    assert_int_equal(kvm_trace_view_steps(FIXTURE, &p, &text), 0);
    assert_string_equal(text, "");
    kvm_free(text);
}

/* ---- runs made through the API -------------------------------------------------------------------------------- */

static const char *WF =
    "local kvm = kvmesh\nlocal m = kvm.model('mock:echo')\n"
    "local g = kvm.graph{ name = 'views', state = { verdict = kvm.reduce.replace } }\n"
    "g:agent('planner', { model = m, role = 'You plan.', template = 'Task: {input}\\nPlan:', max_tokens = 600 })\n"
    "g:agent('coder', { model = m, template = 'Plan:\\n{agent.planner}\\nVerdict: {state.verdict}\\nCode:', max_tokens = 7 })\n"
    "g:func('judge', function(state, last) return { verdict = (state.verdict or '') .. 'x' } end)\n"
    "g:edge(kvm.START, 'planner')\ng:edge('planner', 'coder')\ng:edge('coder', 'judge')\n"
    "g:edge('judge', 'coder', { when = function(state) return #state.verdict < 2 end })\n"
    "g:limit{ steps = 10 }\nreturn g\n";

/* Runs source once on the mock model with a trace under root/<sub>, inputs {"input": input}; the run's trace
 * directory in dir. */
static void traced_run(const char *sub, const char *source, const char *input, char *dir, size_t cap) {
    char tr[400];
    snprintf(tr, sizeof tr, "%s/%s", root, sub);
    kvm_runtime_t *rt = mock_runtime(tr);
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "views.lua", source, strlen(source), NULL);
    if (!wf) fail_msg("%s", kvm_errmsg());
    char in[2048];
    snprintf(in, sizeof in, "{\"input\": \"%s\"}", input);
    kvm_run_params_t rp = kvm_run_default_params();
    rp.inputs_json = in;
    kvm_run_t *r = kvm_run_start(wf, &rp);
    assert_non_null(r);
    assert_int_equal(kvm_workflow_drive(wf), 0);
    assert_int_equal(kvm_run_status(r, NULL), 0);
    snprintf(dir, cap, "%s", kvm_run_trace_dir(r));
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

static void test_the_run_view_shows_every_step_and_the_result(void **s) {
    (void)s;
    char dir[512], *text = NULL;
    traced_run("show", WF, "sort the list", dir, sizeof dir);
    assert_int_equal(kvm_trace_view_run(dir, &text), 0);
    assert_contains(text, "(graph 'views')");
    assert_contains(text, "inputs: {\"input\":\"sort the list\"}\n");
    assert_contains(text, "agent coder        kv ");
    assert_contains(text, "  #0   s1   planner        chat  ok ");
    assert_contains(text, "  #2   s3   judge          func  ok    -> {\"verdict\":\"x\"}\n");
    assert_contains(text, "        edge judge -> coder (when)\n");
    assert_contains(text, "\nresult: ok\n");
    assert_contains(text, "usage: 3 agent calls");
    kvm_free(text);
}

static void test_the_steps_view_cuts_long_texts_unless_full(void **s) {
    (void)s;
    char dir[512], long_input[1001], *cut = NULL, *full = NULL;
    memset(long_input, 'a', 1000);
    long_input[1000] = '\0';
    traced_run("cut", WF, long_input, dir, sizeof dir);
    kvm_trace_view_params_t p = kvm_trace_view_default_params();
    p.step = 0;
    assert_int_equal(kvm_trace_view_steps(dir, &p, &cut), 0);
    p.full = true;
    assert_int_equal(kvm_trace_view_steps(dir, &p, &full), 0);
    assert_contains(cut, "    {input} = ");
    char a400[401];
    memset(a400, 'a', 400);
    a400[400] = '\0';
    char want[440];
    snprintf(want, sizeof want, "= %s...   [placeholder", a400); /* cut after 400 bytes */
    assert_contains(cut, want);
    assert_null(strstr(full, "..."));
    assert_contains(full, long_input);
    assert_true(strlen(full) >= strlen(cut) + 600 - 3); /* at least the placeholder's 600 bytes past the cut */
    kvm_free(cut);
    kvm_free(full);
}

static void test_the_list_view_lists_each_run_once(void **s) {
    (void)s;
    char dir[512], tr[400], *text = NULL;
    traced_run("list", WF, "one", dir, sizeof dir);
    traced_run("list", WF, "two", dir, sizeof dir);
    snprintf(tr, sizeof tr, "%s/list", root);
    assert_int_equal(kvm_trace_view_list(tr, &text), 2);
    const char *second = strchr(text, '\n');
    assert_non_null(second);
    assert_non_null(strchr(second + 1, '\n'));
    assert_string_equal(strchr(second + 1, '\n') + 1, ""); /* two lines */
    assert_contains(text, " views        ok ");
    assert_contains(text, dir);
    kvm_free(text);
}

/* ---- torn, bad and newer traces ------------------------------------------------------------------------------ */

static const char *START = "{\"t\":\"run.start\",\"v\":1,\"run_id\":\"r1\",\"workflow\":{\"graph\":\"g\"}}\n";

static void test_a_run_without_index_is_listed_as_running_and_a_torn_tail_said(void **s) {
    (void)s;
    char dir[512], text_in[1024], *text = NULL;
    snprintf(text_in, sizeof text_in, "%s{\"t\":\"step\",\"idx\":0,\"node\":\"a\",\"op\":\"func\"}\n{\"t\":\"step\",\"idx\":1,\"pie",
             START);
    run_dir_with("torn", text_in, dir, sizeof dir);
    assert_int_equal(kvm_trace_view_list(dir, &text), 1); /* a run directory lists itself */
    assert_contains(text, "r1                                 g            running? steps   1 (torn tail)\n");
    kvm_free(text);
    assert_int_equal(kvm_trace_view_run(dir, &text), 0);
    assert_contains(text, "result: no run.end record (the run is going on, or the process died); last line torn\n");
    kvm_free(text);
}

/* Every view of the run gives the reader's error (no text); the list view says so on the run's line. */
static void check_views_refuse(const char *name, const char *events, int code, const char *want) {
    char dir[512], *text = (char *)"untouched";
    run_dir_with(name, events, dir, sizeof dir);
    assert_int_equal(kvm_trace_view_run(dir, &text), code);
    assert_null(text);
    assert_contains(kvm_errmsg(), want);
    text = (char *)"untouched";
    assert_int_equal(kvm_trace_view_steps(dir, NULL, &text), code);
    assert_null(text);
    assert_contains(kvm_errmsg(), want);
    kvm_replay_t r;
    kvm_runtime_t *rt = mock_runtime(NULL);
    assert_int_equal(kvm_trace_replay(rt, dir, &r), code);
    assert_contains(kvm_errmsg(), want);
    assert_null(r.steps);
    kvm_runtime_free(rt);
    assert_int_equal(kvm_trace_view_list(dir, &text), 1);
    assert_contains(text, "(unreadable: ");
    assert_contains(text, want);
    kvm_free(text);
}

static void test_a_bad_line_is_the_readers_error_through_every_view(void **s) {
    (void)s;
    check_views_refuse("bad", "{\"t\":\"log\"}\nnot json\n{\"t\":\"log\"}\n", KVM_EFORMAT, "events.jsonl:2:");
    check_views_refuse("wrongtype", "{\"t\":\"step\",\"idx\":1,\"agent\":\"a\",\"kv\":{\"exact\":\"many\"}}\n{\"t\":\"log\"}\n",
                       KVM_EFORMAT, "events.jsonl:1: field 'kv.exact' must be an integer");
}

static void test_a_newer_format_is_refused_by_the_views(void **s) {
    (void)s;
    check_views_refuse("v2", "{\"t\":\"run.start\",\"v\":2}\n", KVM_EVERSION, "version 2 is newer");
}

static void test_a_missing_root_or_run_is_an_error(void **s) {
    (void)s;
    char *text = (char *)"untouched";
    assert_int_equal(kvm_trace_view_list("/nonexistent/traces", &text), KVM_ENOENT);
    assert_null(text);
    assert_contains(kvm_errmsg(), "'/nonexistent/traces' is not a directory");
    assert_true(kvm_trace_view_run("/nonexistent/run", &text) < 0);
    assert_contains(kvm_errmsg(), "/nonexistent/run");
    assert_int_equal(kvm_trace_view_steps(NULL, NULL, &text), KVM_EINVAL);
}

/* ---- replay ------------------------------------------------------------------------------------------------------ */

static void test_a_run_replays_through_the_api_with_the_same_outputs(void **s) {
    (void)s;
    char dir[512], *text = NULL;
    traced_run("replay", WF, "sort the list", dir, sizeof dir);
    kvm_runtime_t *rt = mock_runtime(NULL);
    kvm_replay_t r;
    assert_int_equal(kvm_trace_replay(rt, dir, &r), 0);
    assert_int_equal(r.n_steps, 3); /* planner, coder, coder again after the judge */
    assert_int_equal(r.same, 3);
    assert_int_equal(r.differ, 0);
    assert_int_equal(r.status, 0);
    assert_true(r.trace_ended);
    assert_string_equal(r.steps[1].node, "coder");
    assert_string_equal(r.steps[2].was, r.steps[2].now);
    assert_int_equal(kvm_trace_view_replay(&r, &text), 0);
    assert_contains(text, "  #1   coder          same\n");
    assert_contains(text, ": 3 agent outputs the same, 0 different; status ok (trace: ok)\n");
    kvm_free(text);
    kvm_replay_clear(&r);
    assert_null(r.steps);
    kvm_runtime_free(rt);
}

static void test_a_replay_notices_a_changed_output(void **s) {
    (void)s;
    char dir[512], path[600], *text = NULL;
    traced_run("changed", WF, "sort the list", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/events.jsonl", dir);
    char *events = slurp(path);
    char *out = strstr(events, "\"output\":{\"text\":\"");
    assert_non_null(out);
    out[strlen("\"output\":{\"text\":\"")] ^= 1; /* the first agent step's output, changed in place */
    spit(path, events);
    free(events);
    kvm_runtime_t *rt = mock_runtime(NULL);
    kvm_replay_t r;
    assert_int_equal(kvm_trace_replay(rt, dir, &r), 0);
    assert_int_equal(r.differ, 1);
    assert_false(r.steps[0].same);
    assert_non_null(r.steps[0].now);
    assert_int_equal(kvm_trace_view_replay(&r, &text), 0);
    assert_contains(text, "  #0   planner        DIFFERS\n       trace:  Uask: sort the list Plan:\n");
    assert_contains(text, "\n       replay: Task: sort the list Plan:\n");
    assert_contains(text, "1 different");
    kvm_free(text);
    kvm_replay_clear(&r);
    kvm_runtime_free(rt);
}

static void test_a_replay_of_a_trace_without_run_start_is_an_error(void **s) {
    (void)s;
    char dir[512];
    run_dir_with("nostart", "{\"t\":\"log\",\"msg\":\"m\"}\n", dir, sizeof dir);
    kvm_runtime_t *rt = mock_runtime(NULL);
    kvm_replay_t r;
    assert_int_equal(kvm_trace_replay(rt, dir, &r), KVM_EFORMAT);
    assert_contains(kvm_errmsg(), "no run.start");
    assert_null(r.steps);
    assert_int_equal(kvm_trace_replay(NULL, dir, &r), KVM_EINVAL);
    kvm_runtime_free(rt);
}

static int tag(void *ud, const char *args_json, char **result_json) {
    (void)ud;
    (void)args_json;
    *result_json = kvm_malloc(8);
    strcpy(*result_json, "\"tag\"");
    return 0;
}

/* The traced script calls a host function: the replay runs with the runtime's functions. */
static void test_a_replay_calls_the_runtimes_host_functions(void **s) {
    (void)s;
    static const char *src = "local kvm = kvmesh\nlocal m = kvm.model('mock:echo')\nlocal g = kvm.graph{ name = 'host', state = { note = kvm.reduce.replace } }\n"
                             "g:func('f', function(state) return { note = kvm.util.tag() } end)\n"
                             "g:agent('a', { model = m, template = 'Note: {state.note}', max_tokens = 4 })\n"
                             "g:edge(kvm.START, 'f')\ng:edge('f', 'a')\nreturn g\n";
    char tr[400], dir[512];
    snprintf(tr, sizeof tr, "%s/host", root);
    kvm_runtime_t *rt = mock_runtime(tr);
    assert_int_equal(kvm_runtime_add_function(rt, "util.tag", tag, NULL), 0);
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "host.lua", src, strlen(src), NULL);
    if (!wf) fail_msg("%s", kvm_errmsg());
    kvm_run_t *run = kvm_run_start(wf, NULL);
    assert_int_equal(kvm_workflow_drive(wf), 0);
    assert_int_equal(kvm_run_status(run, NULL), 0);
    snprintf(dir, sizeof dir, "%s", kvm_run_trace_dir(run));
    kvm_workflow_free(wf);
    kvm_replay_t r;
    assert_int_equal(kvm_trace_replay(rt, dir, &r), 0);
    assert_int_equal(r.status, 0);
    assert_int_equal(r.same, 1);
    kvm_replay_clear(&r);
    kvm_runtime_free(rt);
    rt = mock_runtime(NULL); /* without the function the replayed run fails */
    assert_int_equal(kvm_trace_replay(rt, dir, &r), 0);
    assert_int_not_equal(r.status, 0);
    kvm_replay_clear(&r);
    kvm_runtime_free(rt);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_the_run_view_of_the_fixture_is_what_trace_show_printed),
        cmocka_unit_test(test_the_steps_view_of_the_fixture_is_what_trace_steps_printed),
        cmocka_unit_test(test_the_list_view_of_the_fixtures_is_what_trace_ls_printed),
        cmocka_unit_test(test_the_steps_view_keeps_only_the_asked_step),
        cmocka_unit_test(test_the_run_view_shows_every_step_and_the_result),
        cmocka_unit_test(test_the_steps_view_cuts_long_texts_unless_full),
        cmocka_unit_test(test_the_list_view_lists_each_run_once),
        cmocka_unit_test(test_a_run_without_index_is_listed_as_running_and_a_torn_tail_said),
        cmocka_unit_test(test_a_bad_line_is_the_readers_error_through_every_view),
        cmocka_unit_test(test_a_newer_format_is_refused_by_the_views),
        cmocka_unit_test(test_a_missing_root_or_run_is_an_error),
        cmocka_unit_test(test_a_run_replays_through_the_api_with_the_same_outputs),
        cmocka_unit_test(test_a_replay_notices_a_changed_output),
        cmocka_unit_test(test_a_replay_of_a_trace_without_run_start_is_an_error),
        cmocka_unit_test(test_a_replay_calls_the_runtimes_host_functions),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
