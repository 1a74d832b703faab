/* test_api.c - the public API (include/kvmesh.h) used the way an embedding program uses it: only the
 * public header is included. Default parameters, parameter checking with named errors, a workflow run
 * on the mock model with its outputs, agent figures and trace, bad inputs, and models and tokenizers
 * from the tree (models/minillama-2m). */
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

#include "tests/support/test_runtime.h"

#define MINI KVM_SOURCE_DIR "/models/minillama-2m"


static void test_default_params_are_usable_as_they_are(void **s) {
    (void)s;
    kvm_model_params_t mp = kvm_model_default_params();
    assert_string_equal(mp.backend, "auto");
    kvm_generate_params_t gp = kvm_generate_default_params();
    assert_true(gp.max_tokens > 0);
    assert_true(gp.top_p == 1.0f);
    kvm_runtime_params_t rp = kvm_runtime_default_params();
    assert_int_equal(rp.kv_override, -1);
    kvm_runtime_t *rt = kvm_runtime_create(&rp);
    assert_non_null(rt);
    kvm_runtime_free(rt);
    rt = kvm_runtime_create(NULL); /* NULL = the defaults */
    assert_non_null(rt);
    kvm_runtime_free(rt);
}

static void test_a_bad_runtime_parameter_is_an_error_naming_it(void **s) {
    (void)s;
    kvm_runtime_params_t p = kvm_runtime_default_params();
    p.model.kv_dtype = "bf61";
    assert_null(kvm_runtime_create(&p));
    assert_int_equal(kvm_errcode(), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "kv_dtype"));
    assert_non_null(strstr(kvm_errmsg(), "bf61"));

    p = kvm_runtime_default_params();
    const char *kv[] = {"gamma=0.5", "no_such_switch=1"};
    p.kvcomm = kv;
    p.n_kvcomm = 2;
    assert_null(kvm_runtime_create(&p));
    assert_non_null(strstr(kvm_errmsg(), "kvcomm[1]"));

    p = kvm_runtime_default_params();
    p.model.backend = "tpu";
    assert_null(kvm_runtime_create(&p));
    assert_non_null(strstr(kvm_errmsg(), "backend"));
}

static void test_kv_policy_names_round_trip(void **s) {
    (void)s;
    const kvm_kv_policy_t all[] = {KVM_KV_PREFIX, KVM_KV_DENSE, KVM_KV_KVCOMM};
    for (int i = 0; i < 3; i++) {
        kvm_kv_policy_t p;
        assert_int_equal(kvm_kv_policy_parse(kvm_kv_policy_name(all[i]), &p), 0);
        assert_int_equal(p, all[i]);
    }
    kvm_kv_policy_t p;
    assert_int_equal(kvm_kv_policy_parse("kvcom", &p), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "kvcom"));
}

/* Removes a test's temporary folder (made by mkdtemp: no quote in its name). */
static void remove_tree(const char *dir) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

static void count_step(void *ud, const kvm_step_event_t *e) {
    int *n = ud;
    assert_non_null(e->run);
    assert_non_null(e->node);
    (*n)++;
}

static void test_a_workflow_runs_on_the_mock_model_and_reports_its_steps(void **s) {
    (void)s;
    char tmpl[] = "/tmp/kvm_api_XXXXXX";
    assert_non_null(mkdtemp(tmpl));
    kvm_runtime_t *rt = mock_runtime(tmpl);
    int steps = 0;
    kvm_workflow_params_t wp = kvm_workflow_default_params();
    wp.on_step = count_step;
    wp.ud = &steps;
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "pair.lua", k_pair_wf, strlen(k_pair_wf), &wp);
    assert_non_null(wf);
    assert_string_equal(kvm_workflow_name(wf), "pair");
    kvm_run_params_t rp = kvm_run_default_params();
    rp.inputs_json = "{\"input\": \"two plus two\"}";
    kvm_run_t *r = kvm_run_start(wf, &rp);
    assert_non_null(r);
    assert_int_equal(kvm_run_status(r, NULL), KVM_EBUSY);
    assert_int_equal(kvm_workflow_drive(wf), 0);
    const char *msg = NULL;
    assert_int_equal(kvm_run_status(r, &msg), 0);
    assert_int_equal(steps, 2);
    assert_int_equal(kvm_workflow_n_runs(wf), 1);
    assert_ptr_equal(kvm_workflow_run(wf, 0), r);
    char *out = kvm_run_outputs_json(r);
    assert_non_null(out);
    assert_non_null(strstr(out, "\"b\""));
    kvm_free(out);
    char *in = kvm_run_inputs_json(r);
    assert_non_null(strstr(in, "two plus two"));
    kvm_free(in);

    assert_int_equal(kvm_workflow_n_agents(wf), 2);
    kvm_agent_stats_t st;
    assert_int_equal(kvm_workflow_agent_stats(wf, 1, &st), 0);
    assert_string_equal(st.name, "b");
    assert_int_equal(st.calls, 1);
    assert_true(st.output_tokens > 0);
    assert_int_equal(kvm_workflow_agent_stats(wf, 2, &st), KVM_ERANGE);

    /* the run's trace reads back through the public reader */
    const char *dir = kvm_run_trace_dir(r);
    assert_non_null(dir);
    kvm_trace_reader_t *t = kvm_trace_reader_open(dir);
    assert_non_null(t);
    assert_true(kvm_trace_reader_n_records(t) > 2);
    assert_false(kvm_trace_reader_torn(t));
    assert_non_null(strstr(kvm_trace_reader_record_json(t, 0), "\"t\""));
    assert_true(strlen(kvm_trace_reader_record_type(t, 0)) > 0);
    assert_null(kvm_trace_reader_record_json(t, kvm_trace_reader_n_records(t)));
    kvm_trace_reader_free(t);

    char *stats = kvm_runtime_stats_json(rt);
    assert_non_null(strstr(stats, "forward_passes"));
    kvm_free(stats);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
    remove_tree(tmpl);
}

static void test_bad_run_inputs_name_the_offset_and_start_nothing(void **s) {
    (void)s;
    kvm_runtime_t *rt = mock_runtime(NULL);
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "pair.lua", k_pair_wf, strlen(k_pair_wf), NULL);
    assert_non_null(wf);
    kvm_run_params_t rp = kvm_run_default_params();
    rp.inputs_json = "{\"input\": tw";
    assert_null(kvm_run_start(wf, &rp));
    assert_int_equal(kvm_errcode(), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "offset"));
    rp.inputs_json = "[1, 2]";
    assert_null(kvm_run_start(wf, &rp));
    assert_non_null(strstr(kvm_errmsg(), "object"));
    assert_int_equal(kvm_workflow_n_runs(wf), 0);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

static void test_a_script_error_names_the_chunk_and_line(void **s) {
    (void)s;
    kvm_runtime_t *rt = mock_runtime(NULL);
    const char *bad = "local kvm = kvmesh\n\nlocal g = kvm.graph{ name = 'x' }\ng:nope()\nreturn g\n";
    assert_null(kvm_workflow_load_string(rt, "bad.lua", bad, strlen(bad), NULL));
    assert_non_null(strstr(kvm_errmsg(), "bad.lua:4"));
    kvm_runtime_free(rt);
}

static void test_two_workflows_share_the_runtime_engine(void **s) {
    (void)s;
    kvm_runtime_t *rt = mock_runtime(NULL);
    kvm_workflow_t *a = kvm_workflow_load_string(rt, "a.lua", k_pair_wf, strlen(k_pair_wf), NULL);
    kvm_workflow_t *b = kvm_workflow_load_string(rt, "b.lua", k_pair_wf, strlen(k_pair_wf), NULL);
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(kvm_run_start(a, NULL));
    assert_int_equal(kvm_workflow_drive(a), 0);
    assert_non_null(kvm_run_start(b, NULL));
    assert_int_equal(kvm_workflow_drive(b), 0);
    /* one engine: one model entry, forward passes of both workflows counted together */
    char *stats = kvm_runtime_stats_json(rt);
    assert_non_null(stats);
    const char *first = strstr(stats, "\"path\":\"mock:echo\"");
    assert_non_null(first);
    assert_null(strstr(first + 1, "\"path\":"));
    kvm_free(stats);
    kvm_workflow_free(a);
    kvm_workflow_free(b);
    kvm_runtime_free(rt);
}

static void test_a_model_loads_tokenizes_and_generates(void **s) {
    (void)s;
    kvm_model_params_t mp = kvm_model_default_params();
    mp.backend = "cpu";
    mp.quiet = true;
    kvm_model_t *m = kvm_model_load(MINI, &mp);
    assert_non_null(m);
    kvm_model_info_t info;
    kvm_model_info(m, &info);
    assert_string_equal(info.name, "minillama-2m");
    assert_string_equal(info.backend, "cpu");
    assert_string_equal(info.chat_format, "chatml");
    assert_int_equal(info.n_layers, 6);
    const kvm_tokenizer_t *tok = kvm_model_tokenizer(m);
    assert_non_null(tok);
    int32_t *ids = NULL;
    int n = 0;
    assert_int_equal(kvm_tokenize(tok, "Mark: 9442", 10, KVM_TOK_PARSE_SPECIAL, &ids, &n), 0);
    assert_true(n > 0);
    char *text = NULL;
    size_t len = 0;
    assert_int_equal(kvm_detokenize(tok, ids, n, false, &text, &len), 0);
    assert_string_equal(text, "Mark: 9442");
    kvm_free(text);
    kvm_free(ids);

    kvm_generate_params_t gp = kvm_generate_default_params();
    gp.max_tokens = 6;
    gp.chat = true;
    gp.system = "Answer with the number.";
    kvm_generation_t g;
    assert_int_equal(kvm_model_generate(m, "Mark: 9442\nAnn: 3742\nAsk: Mark", &gp, NULL, NULL, &g), 0);
    assert_true(g.n_ids >= 1 && g.n_ids <= 6);
    assert_true(g.n_prompt > 10);
    assert_non_null(g.text);
    kvm_generation_clear(&g);

    gp.max_tokens = 0;
    assert_int_equal(kvm_model_generate(m, "x", &gp, NULL, NULL, &g), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "max_tokens"));
    kvm_model_free(m);
}

/* Generation jobs (kvm_runtime_generate): what a job streams and ends with. */
typedef struct genlog {
    int tokens, ends, status, n_ids;
    int32_t ids[64];
    char text[512];
    size_t streamed;
    char streamed_text[512];
} genlog_t;

static void on_gen(void *ud, const kvm_gen_event_t *e) {
    genlog_t *g = ud;
    if (e->kind == KVM_RUN_TOKEN) {
        g->tokens++;
        if (g->streamed + e->len < sizeof g->streamed_text) memcpy(g->streamed_text + g->streamed, e->text, e->len), g->streamed += e->len;
        return;
    }
    g->ends++;
    g->status = e->status;
    g->n_ids = e->n_ids < 64 ? e->n_ids : 64;
    if (e->ids) memcpy(g->ids, e->ids, (size_t)g->n_ids * sizeof *g->ids);
    snprintf(g->text, sizeof g->text, "%s", e->text ? e->text : "");
}

static void test_a_generation_job_matches_direct_generation_and_can_be_canceled(void **s) {
    (void)s;
    kvm_runtime_params_t rp = kvm_runtime_default_params();
    rp.model.backend = "cpu";
    rp.quiet = true;
    kvm_runtime_t *rt = kvm_runtime_create(&rp);
    assert_non_null(rt);
    /* bad requests are refused, naming what */
    uint64_t job = 99;
    kvm_gen_request_t bad = {.model = MINI, .params = kvm_generate_default_params()};
    assert_int_equal(kvm_runtime_generate(rt, &bad, &job), KVM_EINVAL); /* no prompt */
    assert_int_equal(job, 0);
    const int32_t far[2] = {1, 1 << 20};
    bad.ids = far;
    bad.n_ids = 2;
    assert_int_equal(kvm_runtime_generate(rt, &bad, &job), KVM_ERANGE);
    assert_non_null(strstr(kvm_errmsg(), "index 1"));
    bad.params.max_total_tokens = 10;
    bad.ids = far;
    bad.n_ids = 1;
    assert_int_equal(kvm_runtime_generate(rt, &bad, &job), KVM_EUNSUPPORTED);
    assert_int_equal(kvm_runtime_n_generating(rt), 0);

    /* greedy: the job gives what kvm_model_generate gives, streamed and at its end */
    kvm_model_params_t mp = kvm_model_default_params();
    mp.backend = "cpu";
    mp.quiet = true;
    kvm_model_t *m = kvm_model_load(MINI, &mp);
    assert_non_null(m);
    kvm_generate_params_t gp = kvm_generate_default_params();
    gp.max_tokens = 12;
    gp.temperature = 0;
    kvm_generation_t direct;
    assert_int_equal(kvm_model_generate(m, "Once upon a time", &gp, NULL, NULL, &direct), 0);
    genlog_t g = {0};
    kvm_gen_request_t rq = {.model = MINI, .prompt = "Once upon a time", .params = gp, .on_event = on_gen, .ud = &g};
    assert_int_equal(kvm_runtime_generate(rt, &rq, &job), 0);
    assert_true(job > 0);
    assert_int_equal(kvm_runtime_n_generating(rt), 1);
    for (int i = 0; i < 10000 && kvm_runtime_n_generating(rt) > 0; i++) assert_true(kvm_runtime_step(rt) >= 0);
    assert_int_equal(g.ends, 1);
    assert_int_equal(g.status, 0);
    assert_int_equal(g.n_ids, direct.n_ids);
    assert_memory_equal(g.ids, direct.ids, (size_t)direct.n_ids * sizeof *direct.ids);
    assert_string_equal(g.text, direct.text);
    assert_true(g.tokens >= 1);
    assert_int_equal(g.streamed, strlen(direct.text));
    kvm_generation_clear(&direct);
    kvm_model_free(m);

    /* a long job canceled: its end carries the code; an ended job cannot be canceled */
    genlog_t c = {0};
    const int32_t ids[4] = {1, 5, 9, 13};
    kvm_gen_request_t lq = {.model = MINI, .ids = ids, .n_ids = 4, .params = kvm_generate_default_params(), .on_event = on_gen, .ud = &c};
    lq.params.max_tokens = 400;
    lq.params.ignore_eos = true;
    assert_int_equal(kvm_runtime_generate(rt, &lq, &job), 0);
    for (int i = 0; i < 5; i++) kvm_runtime_step(rt);
    assert_int_equal(c.ends, 0);
    assert_int_equal(kvm_runtime_generate_cancel(rt, job, 0, "enough"), 0);
    for (int i = 0; i < 100 && kvm_runtime_n_generating(rt) > 0; i++) kvm_runtime_step(rt);
    assert_int_equal(c.ends, 1);
    assert_int_equal(c.status, KVM_ECANCELED);
    assert_true(c.tokens < 400);
    assert_int_equal(kvm_runtime_generate_cancel(rt, job, 0, NULL), KVM_ENOENT);
    kvm_runtime_free(rt);
}

static void test_a_missing_model_is_an_error_naming_the_path(void **s) {
    (void)s;
    assert_null(kvm_model_load("/nonexistent/model-dir", NULL));
    assert_int_equal(kvm_errcode(), KVM_ENOENT);
    assert_non_null(strstr(kvm_errmsg(), "/nonexistent/model-dir"));
}

static void test_a_tokenizer_loads_on_its_own(void **s) {
    (void)s;
    kvm_tokenizer_t *t = kvm_tokenizer_load(MINI, 0);
    assert_non_null(t);
    assert_true(kvm_tokenizer_vocab_size(t) > 100);
    kvm_tokenizer_free(t);
    assert_null(kvm_tokenizer_load(KVM_SOURCE_DIR "/README.md", 0));
    assert_int_equal(kvm_errcode(), KVM_EFORMAT);
}

/* kvmesh.util.add(a, b): the arguments arrive as a JSON array; a negative sum is refused. */
static int host_add(void *ud, const char *args, char **result) {
    int *calls = ud;
    (*calls)++;
    double a = 0, b = 0;
    if (sscanf(args, "[%lf,%lf]", &a, &b) != 2) {
        *result = kvm_malloc(64);
        snprintf(*result, 64, "expected two numbers, got %s", args);
        return KVM_EINVAL;
    }
    if (a + b < 0) {
        *result = NULL;
        return KVM_ERANGE;
    }
    *result = kvm_malloc(64);
    snprintf(*result, 64, "{\"sum\": %g}", a + b);
    return 0;
}

static const char *k_host_wf =
    "local kvm = kvmesh\n"
    "local g = kvm.graph{ name = 'host', state = { x = kvm.reduce.replace, s = kvm.reduce.replace } }\n"
    "g:func('f', function(state, last) return { s = kvm.util.add(state.x, 2).sum } end)\n"
    "g:edge(kvm.START, 'f')\n"
    "g:output(function(state) return { s = state.s } end)\n"
    "return g\n";

static void test_a_host_function_is_callable_from_scripts(void **s) {
    (void)s;
    kvm_runtime_t *rt = mock_runtime(NULL);
    int calls = 0;
    assert_int_equal(kvm_runtime_add_function(rt, "util.add", host_add, &calls), 0);
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "host.lua", k_host_wf, strlen(k_host_wf), NULL);
    if (!wf) fail_msg("%s", kvm_errmsg());
    kvm_run_params_t rp = kvm_run_default_params();
    rp.inputs_json = "{\"x\": 40}";
    kvm_run_t *ok = kvm_run_start(wf, &rp);
    rp.inputs_json = "{\"x\": -7}";
    kvm_run_t *bad = kvm_run_start(wf, &rp);
    assert_int_equal(kvm_workflow_drive(wf), 0);
    const char *msg = NULL;
    assert_int_equal(kvm_run_status(ok, &msg), 0);
    char *out = kvm_run_outputs_json(ok);
    assert_string_equal(out, "{\"s\":42}");
    kvm_free(out);
    assert_true(kvm_run_status(bad, &msg) < 0);
    assert_non_null(strstr(msg, "kvmesh.util.add"));
    assert_non_null(strstr(msg, kvm_strerror(KVM_ERANGE)));
    assert_int_equal(calls, 2);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

static void test_host_function_names_are_checked(void **s) {
    (void)s;
    kvm_runtime_t *rt = mock_runtime(NULL);
    int calls = 0;
    const char *bad[] = {"", "1x", "a..b", "a.", ".a", "a-b", "model", "graph.x", "reduce"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        assert_int_equal(kvm_runtime_add_function(rt, bad[i], host_add, &calls), KVM_EINVAL);
        assert_non_null(strstr(kvm_errmsg(), "host function name"));
    }
    assert_int_equal(kvm_runtime_add_function(rt, "a.b", host_add, &calls), 0);
    assert_int_equal(kvm_runtime_add_function(rt, "a.b", host_add, &calls), KVM_EINVAL);
    assert_int_equal(kvm_runtime_add_function(rt, "a", host_add, &calls), KVM_EINVAL);
    assert_int_equal(kvm_runtime_add_function(rt, "a.b.c", host_add, &calls), KVM_EINVAL);
    assert_int_equal(kvm_runtime_add_function(rt, "a.c", host_add, &calls), 0);
    /* scripts cannot replace them: the tables are read-only like the rest of kvmesh */
    const char *src = "kvmesh.a.b = nil\nreturn kvmesh.graph{ name = 'x' }\n";
    assert_null(kvm_workflow_load_string(rt, "ro.lua", src, strlen(src), NULL));
    kvm_runtime_free(rt);
}

static void test_status_names_and_log_levels(void **s) {
    (void)s;
    assert_string_equal(kvm_errname(KVM_ENOMEM), "KVM_ENOMEM");
    assert_string_equal(kvm_strerror(KVM_OK), "ok");
    int lv = -1;
    assert_int_equal(kvm_log_level_parse("error", &lv), 0);
    assert_int_equal(lv, KVM_LOG_ERROR);
    assert_int_equal(kvm_log_level_parse("loud", &lv), KVM_EINVAL);
    assert_non_null(kvm_version());
}

/* kvmesh.blame from a workflow: an ended run of the same runtime, by id, ranked from the runtime's schema cache;
 * hostile use (its own run, an unknown id, a path, a huge k, no argument) is nil + a reason or a Lua error. */
static const char *const k_asker_wf =
    "local kvm = kvmesh\n"
    "local g = kvm.graph{ name = 'asker', state = { out = kvm.reduce.replace } }\n"
    "g:func('ask', function(state, last, ctx)\n"
    "  local b, err = kvm.blame(ctx.inputs.target, 3)\n"
    "  if not b then return { out = { err = err } } end\n"
    "  local own, own_err = kvm.blame(ctx.run_id)\n"
    "  local unk, unk_err = kvm.blame('0123456789abcdef0123456789abcdef')\n"
    "  local p, path_err = kvm.blame('../../etc/passwd')\n"
    "  local ok_huge, huge = pcall(kvm.blame, ctx.inputs.target, 1000000000)\n"
    "  local ok_none, none = pcall(kvm.blame)\n"
    "  return { out = { agent = b.agent, step = b.step, steps = b.steps, run_id = b.run_id,\n"
    "    n_cand = #b.candidates, c1 = b.candidates[1].agent, c1_step = b.candidates[1].step,\n"
    "    c1_score = b.candidates[1].score, n_schemata = #b.schemata, s1 = b.schemata[1] and b.schemata[1].id or -1,\n"
    "    own = own == nil and own_err or 'x', unk = unk == nil and unk_err or 'x', path = p == nil and path_err or 'x',\n"
    "    huge = (not ok_huge) and huge or 'x', none = (not ok_none) and none or 'x' } }\n"
    "end)\n"
    "g:edge(kvm.START, 'ask')\n"
    "g:output(function(state) return state.out end)\n"
    "return g\n";

static char *run_once(kvm_workflow_t *wf, const char *inputs, char *id, size_t cap) {
    kvm_run_params_t rp = kvm_run_default_params();
    rp.inputs_json = inputs;
    kvm_run_t *r = kvm_run_start(wf, &rp);
    assert_non_null(r);
    assert_int_equal(kvm_workflow_drive(wf), 0);
    assert_int_equal(kvm_run_status(r, NULL), 0);
    snprintf(id, cap, "%s", kvm_run_id(r));
    return kvm_run_outputs_json(r);
}

static void test_kvmesh_blame_ranks_an_ended_run_of_the_runtime_and_refuses_the_rest(void **s) {
    (void)s;
    char tmpl[] = "/tmp/kvm_api_blame_XXXXXX";
    assert_non_null(mkdtemp(tmpl));
    kvm_runtime_t *rt = mock_runtime(tmpl);
    kvm_workflow_t *pair = kvm_workflow_load_string(rt, "pair.lua", k_pair_wf, strlen(k_pair_wf), NULL);
    kvm_workflow_t *asker = kvm_workflow_load_string(rt, "asker.lua", k_asker_wf, strlen(k_asker_wf), NULL);
    assert_non_null(pair);
    assert_non_null(asker);
    char r1[64], r2[64], me[64], in[200];
    kvm_free(run_once(pair, "{\"input\": \"two plus two\"}", r1, sizeof r1));
    kvm_free(run_once(pair, "{\"input\": \"three plus three\"}", r2, sizeof r2));
    /* r2's failure, labelled, is in the runtime's cache: r1's blame is shown it */
    char dir[512];
    snprintf(dir, sizeof dir, "%s/%s", tmpl, r2);
    kvm_failure_t *f = kvm_failure_from_trace(dir);
    assert_non_null(f);
    f->gold_agent = "b";
    f->gold_step = 2;
    int entry = kvm_schema_cache_insert(kvm_runtime_schema_cache(rt), f, false);
    assert_int_equal(entry, 0);
    kvm_failure_free(f);
    kvm_schema_cache_stats_t before;
    kvm_schema_cache_stats(kvm_runtime_schema_cache(rt), &before);
    snprintf(in, sizeof in, "{\"target\": \"%s\"}", r1);
    char *out = run_once(asker, in, me, sizeof me);
    assert_non_null(out);
    char want[200];
    snprintf(want, sizeof want, "\"run_id\":\"%s\"", r1);
    assert_non_null(strstr(out, want));
    assert_non_null(strstr(out, "\"steps\":3"));           /* the task, a, b */
    assert_non_null(strstr(out, "\"n_schemata\":1"));
    assert_non_null(strstr(out, "\"s1\":0"));
    assert_null(strstr(out, "\"err\""));
    assert_non_null(strstr(out, "\"own\":\"kvmesh.blame: run "));
    assert_non_null(strstr(out, "is the run calling kvmesh.blame: it has not ended"));
    assert_non_null(strstr(out, "\"unk\":\"kvmesh.blame: no run 0123456789abcdef0123456789abcdef in this runtime\""));
    assert_non_null(strstr(out, "kvmesh.blame takes no path"));
    assert_non_null(strstr(out, "k must be in 0..16"));
    assert_non_null(strstr(out, "\"none\":\""));           /* no argument: a Lua error, caught */
    assert_null(strstr(out, "\"huge\":\"x\""));
    /* a script's question counts no hit */
    kvm_schema_cache_stats_t after;
    kvm_schema_cache_stats(kvm_runtime_schema_cache(rt), &after);
    assert_int_equal(after.queries, before.queries);
    kvm_free(out);
    kvm_workflow_free(asker);
    kvm_workflow_free(pair);
    kvm_runtime_free(rt);
    remove_tree(tmpl);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kvmesh_blame_ranks_an_ended_run_of_the_runtime_and_refuses_the_rest),
        cmocka_unit_test(test_default_params_are_usable_as_they_are),
        cmocka_unit_test(test_a_bad_runtime_parameter_is_an_error_naming_it),
        cmocka_unit_test(test_kv_policy_names_round_trip),
        cmocka_unit_test(test_a_workflow_runs_on_the_mock_model_and_reports_its_steps),
        cmocka_unit_test(test_bad_run_inputs_name_the_offset_and_start_nothing),
        cmocka_unit_test(test_a_script_error_names_the_chunk_and_line),
        cmocka_unit_test(test_two_workflows_share_the_runtime_engine),
        cmocka_unit_test(test_a_model_loads_tokenizes_and_generates),
        cmocka_unit_test(test_a_generation_job_matches_direct_generation_and_can_be_canceled),
        cmocka_unit_test(test_a_missing_model_is_an_error_naming_the_path),
        cmocka_unit_test(test_a_tokenizer_loads_on_its_own),
        cmocka_unit_test(test_a_host_function_is_callable_from_scripts),
        cmocka_unit_test(test_host_function_names_are_checked),
        cmocka_unit_test(test_status_names_and_log_levels),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
