/* test_runtime_step.c - serving many runs of many workflows on one thread through the public API
 * (include/kvmesh.h only): kvm_runtime_step rounds, per-run events (tokens, steps, the end) and
 * kvm_run_cancel, on the mock model. */
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


/* one agent that talks for long: 200 tokens of echo (ignore_eos), so a cancel lands mid-generation */
static const char *k_long =
    "local kvm = kvmesh\n"
    "local m = kvm.model('mock:echo')\n"
    "local g = kvm.graph{ name = 'long' }\n"
    "g:agent('talker', { model = m, template = 'say {input}', max_tokens = 200, ignore_eos = true })\n"
    "g:edge(kvm.START, 'talker')\n"
    "return g\n";

/* What a run's events said. */
typedef struct seen {
    int tokens, steps, ends;
    char text[4096];      /* the token pieces, concatenated */
    int end_status;
    int kv_sum_ok;        /* steps whose KV partition summed to tokens_in */
    int last_kind;
} seen_t;

static void record(void *ud, const kvm_run_event_t *e) {
    seen_t *s = ud;
    assert_non_null(e->run);
    assert_non_null(e->run_id);
    assert_int_equal(s->ends, 0); /* nothing after the end */
    s->last_kind = e->kind;
    if (e->kind == KVM_RUN_TOKEN) {
        s->tokens++;
        assert_non_null(e->agent);
        size_t have = strlen(s->text);
        if (have + e->len < sizeof s->text) {
            memcpy(s->text + have, e->text, e->len);
            s->text[have + e->len] = '\0';
        }
    } else if (e->kind == KVM_RUN_STEP) {
        s->steps++;
        const kvm_step_event_t *st = e->step;
        assert_non_null(st);
        assert_non_null(st->kv_mode);
        if (st->kv_exact + st->kv_offset + st->kv_naive + st->kv_recomputed + st->kv_fused == st->tokens_in) s->kv_sum_ok++;
    } else {
        assert_int_equal(e->kind, KVM_RUN_END);
        s->ends++;
        s->end_status = e->status;
    }
}

static kvm_run_t *start(kvm_workflow_t *wf, const char *inputs, seen_t *s) {
    kvm_run_params_t p = kvm_run_default_params();
    p.inputs_json = inputs;
    p.on_event = record;
    p.event_ud = s;
    kvm_run_t *r = kvm_run_start(wf, &p);
    if (!r) fail_msg("run: %s", kvm_errmsg());
    return r;
}

static int step_until_idle(kvm_runtime_t *rt) {
    int rounds = 0, n;
    while ((n = kvm_runtime_step(rt)) > 0) rounds++;
    assert_int_equal(n, 0);
    return rounds;
}

static void test_runs_of_two_workflows_go_together_in_runtime_rounds(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    kvm_workflow_t *a = kvm_workflow_load_string(rt, "a.lua", k_pair_wf, strlen(k_pair_wf), NULL);
    kvm_workflow_t *b = kvm_workflow_load_string(rt, "b.lua", k_pair_wf, strlen(k_pair_wf), NULL);
    assert_non_null(a);
    assert_non_null(b);
    seen_t sa = {0}, sb = {0};
    kvm_run_t *ra = start(a, "{\"input\": \"red fox\"}", &sa);
    kvm_run_t *rb = start(b, "{\"input\": \"blue whale\"}", &sb);
    assert_int_equal(kvm_runtime_n_active(rt), 2);
    step_until_idle(rt);
    assert_int_equal(kvm_run_status(ra, NULL), 0);
    assert_int_equal(kvm_run_status(rb, NULL), 0);
    char *oa = kvm_run_outputs_json(ra), *ob = kvm_run_outputs_json(rb);
    assert_non_null(strstr(oa, "red"));
    assert_null(strstr(oa, "blue")); /* each run got its own engine results */
    assert_non_null(strstr(ob, "blue"));
    kvm_free(oa);
    kvm_free(ob);
    /* both runs were in the same forward passes: fewer passes than steps run one after the other */
    char *stats = kvm_runtime_stats_json(rt);
    const char *mx = strstr(stats, "\"max_batch_seqs\":");
    assert_non_null(mx);
    assert_true(atoi(mx + strlen("\"max_batch_seqs\":")) >= 2);
    kvm_free(stats);
    kvm_workflow_free(a);
    kvm_workflow_free(b);
    kvm_runtime_free(rt);
}

static void test_a_run_streams_its_tokens_steps_and_one_end(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "pair.lua", k_pair_wf, strlen(k_pair_wf), NULL);
    assert_non_null(wf);
    seen_t s = {0};
    kvm_run_t *r = start(wf, "{\"input\": \"two plus two\"}", &s);
    step_until_idle(rt);
    assert_int_equal(kvm_run_status(r, NULL), 0);
    assert_int_equal(s.steps, 2);
    assert_int_equal(s.kv_sum_ok, 2);
    assert_int_equal(s.ends, 1);
    assert_int_equal(s.end_status, 0);
    assert_int_equal(s.last_kind, KVM_RUN_END);
    assert_true(s.tokens > 0);
    /* the streamed pieces are the agents' outputs */
    char *out = kvm_run_outputs_json(r);
    assert_non_null(strstr(s.text, "two"));
    assert_non_null(strstr(out, "two"));
    kvm_free(out);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

static void test_a_canceled_run_ends_canceled_and_the_other_run_completes(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "long.lua", k_long, strlen(k_long), NULL);
    assert_non_null(wf);
    seen_t s1 = {0}, s2 = {0};
    kvm_run_t *r1 = start(wf, "{\"input\": \"alpha beta gamma\"}", &s1);
    kvm_run_t *r2 = start(wf, "{\"input\": \"delta epsilon\"}", &s2);
    for (int i = 0; i < 10; i++) assert_int_equal(kvm_runtime_step(rt), 2);
    assert_true(s1.tokens > 0);
    int tokens_at_cancel = s1.tokens;
    assert_int_equal(kvm_run_cancel(r1, 0, NULL), 0);
    assert_int_equal(kvm_run_status(r1, NULL), KVM_ECANCELED);
    assert_int_equal(kvm_run_cancel(r1, 0, NULL), KVM_ESTALE); /* once */
    assert_int_equal(kvm_runtime_n_active(rt), 1);
    step_until_idle(rt);
    assert_int_equal(s1.ends, 1);
    assert_int_equal(s1.end_status, KVM_ECANCELED);
    assert_int_equal(s1.tokens, tokens_at_cancel); /* nothing streamed after the cancel */
    assert_int_equal(kvm_run_status(r2, NULL), 0);
    assert_int_equal(s2.end_status, 0);
    assert_int_equal(s2.steps, 1);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

static void test_a_deadline_cancel_carries_its_code_and_message(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "long.lua", k_long, strlen(k_long), NULL);
    seen_t s = {0};
    kvm_run_t *r = start(wf, "{\"input\": \"x\"}", &s);
    assert_int_equal(kvm_runtime_step(rt), 1);
    assert_int_equal(kvm_run_cancel(r, KVM_ETIMEDOUT, "deadline of 5 ms passed"), 0);
    const char *msg = NULL;
    assert_int_equal(kvm_run_status(r, &msg), KVM_ETIMEDOUT);
    assert_non_null(strstr(msg, "deadline"));
    assert_int_equal(kvm_run_cancel(r, 5, NULL), KVM_EINVAL); /* a positive code is no status */
    step_until_idle(rt);
    assert_int_equal(s.end_status, KVM_ETIMEDOUT);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

static void test_an_idle_runtime_step_does_nothing_and_returns_zero(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    assert_int_equal(kvm_runtime_step(rt), 0);
    assert_int_equal(kvm_runtime_n_active(rt), 0);
    assert_int_equal(kvm_runtime_step(NULL), KVM_EINVAL);
    kvm_runtime_free(rt);
}

static void test_driving_one_workflow_loses_no_result_of_another(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    kvm_workflow_t *a = kvm_workflow_load_string(rt, "a.lua", k_pair_wf, strlen(k_pair_wf), NULL);
    kvm_workflow_t *b = kvm_workflow_load_string(rt, "b.lua", k_pair_wf, strlen(k_pair_wf), NULL);
    kvm_run_params_t p = kvm_run_default_params();
    p.inputs_json = "{\"input\": \"one\"}";
    kvm_run_t *ra = kvm_run_start(a, &p);
    kvm_run_t *rb = kvm_run_start(b, &p);
    assert_int_equal(kvm_workflow_drive(a), 0);
    assert_int_equal(kvm_run_status(ra, NULL), 0);
    assert_int_equal(kvm_workflow_drive(b), 0);
    assert_int_equal(kvm_run_status(rb, NULL), 0); /* not stalled: its steps were delivered to it */
    kvm_workflow_free(a);
    kvm_workflow_free(b);
    kvm_runtime_free(rt);
}

static void test_freeing_a_workflow_with_a_watched_run_going_is_clean(void **st) {
    (void)st;
    kvm_runtime_t *rt = mock_runtime(NULL);
    kvm_workflow_t *a = kvm_workflow_load_string(rt, "long.lua", k_long, strlen(k_long), NULL);
    kvm_workflow_t *b = kvm_workflow_load_string(rt, "pair.lua", k_pair_wf, strlen(k_pair_wf), NULL);
    seen_t sa = {0}, sb = {0};
    start(a, "{\"input\": \"x y\"}", &sa);
    kvm_run_t *rb = start(b, "{\"input\": \"z\"}", &sb);
    assert_int_equal(kvm_runtime_step(rt), 2);
    kvm_workflow_free(a); /* its step in flight is dropped when delivered */
    step_until_idle(rt);
    assert_int_equal(kvm_run_status(rb, NULL), 0);
    assert_int_equal(sb.ends, 1);
    kvm_workflow_free(b);
    kvm_runtime_free(rt);
}

static void test_a_state_dir_is_made_and_a_file_is_refused(void **st) {
    (void)st;
    char dir[] = "/tmp/kvm_state_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char sub[64], file[64];
    snprintf(sub, sizeof sub, "%s/state", dir);
    snprintf(file, sizeof file, "%s/file", dir);
    kvm_runtime_params_t p = kvm_runtime_default_params();
    p.model_override = "mock:echo";
    p.state_dir = sub;
    kvm_runtime_t *rt = kvm_runtime_create(&p);
    assert_non_null(rt);
    struct stat sb;
    assert_int_equal(stat(sub, &sb), 0);
    assert_true(S_ISDIR(sb.st_mode));
    kvm_runtime_free(rt);
    FILE *f = fopen(file, "w");
    assert_non_null(f);
    fclose(f);
    p.state_dir = file;
    assert_null(kvm_runtime_create(&p));
    assert_int_equal(kvm_errcode(), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "state_dir"));
    remove(file);
    rmdir(sub);
    rmdir(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_runs_of_two_workflows_go_together_in_runtime_rounds),
        cmocka_unit_test(test_a_run_streams_its_tokens_steps_and_one_end),
        cmocka_unit_test(test_a_canceled_run_ends_canceled_and_the_other_run_completes),
        cmocka_unit_test(test_a_deadline_cancel_carries_its_code_and_message),
        cmocka_unit_test(test_an_idle_runtime_step_does_nothing_and_returns_zero),
        cmocka_unit_test(test_driving_one_workflow_loses_no_result_of_another),
        cmocka_unit_test(test_freeing_a_workflow_with_a_watched_run_going_is_clean),
        cmocka_unit_test(test_a_state_dir_is_made_and_a_file_is_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
