/* test_graph_model.c - workflows on a real model (stories260K from the shared folder; skipped loudly
 * when absent): agent steps go through runtime/comm and the scheduler, fan-outs share forward
 * passes, kvcomm reuses KV across runs, and the trace records what each agent saw. */
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
#include "test_common.h"

#define S260 KVM_SHARED_DIR "/models/stories260K/stories260K.bin"

#define NEED_MODEL()                                                                                       \
    do {                                                                                                   \
        if (!kvm_file_exists(S260)) {                                                                      \
            fprintf(stderr, "SKIPPED: stories260K not found at %s (the shared models folder is absent)\n", S260); \
            skip();                                                                                        \
        }                                                                                                  \
    } while (0)

static const char *WF =
    "local kvm = kvmesh\n"
    "local m = kvm.model('" S260 "')\n"
    "local g = kvm.graph{ name = 'stories' }\n"
    "g:agent('teller', { model = m, template = 'Once upon a time, {input}. One day,', max_tokens = 8 })\n"
    "g:agent('a', { model = m, template = 'Story: {agent.teller} The dog', max_tokens = 4 })\n"
    "g:agent('b', { model = m, template = 'Tale: {agent.teller} The cat', max_tokens = 4 })\n"
    "g:agent('c', { model = m, template = 'Note: {input}. {agent.teller} The bird', max_tokens = 4 })\n"
    "g:edge(kvm.START, 'teller')\ng:edge('teller', { 'a', 'b', 'c' })\n"
    "local names = { 'Lily', 'Tom', 'Sue', 'Max', 'Ben', 'Amy', 'Tim', 'Sam' }\n"
    "g:dataset(function(seed) return { input = 'a child named ' .. names[seed % #names + 1] } end)\n"
    "return g\n";

static kvm_workflow_t *run_batch(const char *kv, int n, const char *trace_root) {
    kvm_wf_opts_t o = {0};
    o.kv_override = kv;
    o.trace_root = trace_root;
    o.llm.model.backend = "cpu";
    o.llm.quiet = true;
    /* share whenever two eligible anchors exist: reuse must then appear, whatever gamma's default */
    static const char *const sw[] = {"force_reuse=on"};
    o.llm.kvcomm_set = sw;
    o.llm.n_kvcomm_set = 1;
    kvm_workflow_t *wf = kvm_wf_load_string("stories.lua", WF, strlen(WF), &o);
    if (!wf) fail_msg("%s", kvm_errmsg());
    int run;
    for (int i = 0; i < n; i++) {
        assert_int_equal(kvm_wf_start_seeded(wf, (uint64_t)i + 1, NULL, &run), 0);
        if (i % 3 == 2) assert_int_equal(kvm_wf_drive(wf), 0); /* a few requests at a time: anchors build up */
    }
    assert_int_equal(kvm_wf_drive(wf), 0);
    for (int i = 0; i < n; i++) {
        const char *msg;
        if (kvm_wf_run_status(wf, i, &msg) != 0) fail_msg("run %d: %s", i, msg);
    }
    return wf;
}

static void test_fan_out_shares_forward_passes_on_a_real_model(void **s) {
    (void)s;
    NEED_MODEL();
    kvm_workflow_t *wf = run_batch("dense", 1, NULL);
    int max_seqs = 0;
    wf_llm_counters(kvm_wf_llm(wf), NULL, NULL, &max_seqs);
    assert_int_equal(max_seqs, 3);
    kvm_wf_free(wf);
}

static void test_kvcomm_reuses_kv_across_runs_and_dense_does_not(void **s) {
    (void)s;
    NEED_MODEL();
    kvm_workflow_t *wf = run_batch("kvcomm", 6, NULL);
    int reuse = 0, calls = 0;
    for (int i = 0; i < kvm_wf_n_agents(wf); i++) {
        reuse += kvm_wf_agent_stats(wf, i)->reuse_calls;
        calls += kvm_wf_agent_stats(wf, i)->calls;
    }
    assert_int_equal(calls, 24);
    assert_true(reuse > 0);
    kvm_wf_free(wf);
    wf = run_batch("dense", 3, NULL);
    for (int i = 0; i < kvm_wf_n_agents(wf); i++) {
        assert_int_equal(kvm_wf_agent_stats(wf, i)->reuse_calls, 0);
        assert_int_equal(kvm_wf_agent_stats(wf, i)->offset, 0);
    }
    kvm_wf_free(wf);
}

static void test_trace_steps_hold_prompt_ids_and_a_token_partition(void **s) {
    (void)s;
    NEED_MODEL();
    char root[256];
    snprintf(root, sizeof root, "%s/test_graph_model_%d", KVM_BINARY_DIR, (int)getpid());
    kvm_workflow_t *wf = run_batch("kvcomm", 1, root);
    char dir[512];
    snprintf(dir, sizeof dir, "%s", kvm_wf_run_trace_dir(wf, 0));
    kvm_wf_free(wf);
    kvm_trace_log_t log;
    assert_int_equal(kvm_trace_read(dir, &log), 0);
    int from = 0, steps = 0;
    for (const kvm_trace_rec_t *rec; (rec = kvm_trace_log_next(&log, KVM_TRACE_STEP, &from)) != NULL; steps++) {
        const kvm_trace_step_t *st = &rec->step;
        assert_int_equal(st->n_prompt_ids, st->prompt_tokens);
        const kvm_trace_kv_t *kv = &st->kv;
        assert_int_equal(kv->exact + kv->offset + kv->naive + kv->recomputed + kv->fused, st->prompt_tokens); /* kvcomm.md §6 */
        /* every placeholder's content is in the text the model saw */
        for (int i = 0; i < st->n_pieces; i++) {
            if (!st->pieces[i].slot) continue;
            const char *content = st->pieces[i].text;
            char head[12];
            snprintf(head, sizeof head, "%s", content + strspn(content, " "));
            if (!strstr(st->prompt_text, head)) fail_msg("prompt text lacks placeholder content '%s':\n%s", head, st->prompt_text);
        }
    }
    assert_int_equal(steps, 4);
    kvm_trace_log_free(&log);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    assert_int_equal(system(cmd), 0);
}

TC_MAIN(NULL, NULL,
        cmocka_unit_test(test_fan_out_shares_forward_passes_on_a_real_model),
        cmocka_unit_test(test_kvcomm_reuses_kv_across_runs_and_dense_does_not),
        cmocka_unit_test(test_trace_steps_hold_prompt_ids_and_a_token_partition))
