/* test_trace_jsonl.c - the trace schema of runtime/trace: every record type written by its writer reads
 * back equal; records are flushed one by one; the reader skips a torn last line, refuses a bad line, a
 * field of the wrong type or a newer major version naming file:line; version-1 traces of the previous
 * writer still read; a run's prompts can be rebuilt from its trace alone. (The views and the replay of the
 * public API: test_trace_view.c.) */
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

static kvm_trace_t *open_trace(const char *name) {
    kvm_trace_t *t = kvm_trace_open(root, name);
    assert_non_null(t);
    return t;
}

static void finish(kvm_trace_log_t *log, kvm_trace_t *t) {
    kvm_trace_log_free(log);
    kvm_trace_close(t);
}

/* Writes the text as the run's whole events.jsonl; returns the trace (closed by the caller). */
static kvm_trace_t *trace_with(const char *name, const char *text) {
    kvm_trace_t *t = open_trace(name);
    fputs(text, t->f);
    fflush(t->f);
    return t;
}

/* Reads back the single record the trace holds. */
static const kvm_trace_rec_t *only_record(kvm_trace_t *t, kvm_trace_log_t *log) {
    assert_int_equal(kvm_trace_read(t->dir, log), 0);
    assert_int_equal(log->n, 1);
    assert_false(log->torn_tail);
    assert_true(log->recs[0].ts > 0);
    return &log->recs[0];
}

/* ---- flushing and torn lines ------------------------------------------------------------------------ */

static void test_records_are_readable_while_the_file_is_open(void **s) {
    (void)s;
    kvm_trace_t *t = open_trace("live");
    for (int i = 0; i < 3; i++) {
        kvm_trace_log_rec_t r = {.level = "info", .msg = "hello", .superstep = i};
        assert_int_equal(kvm_trace_write_log(t, &r), 0);
    }
    kvm_trace_log_t log;
    assert_int_equal(kvm_trace_read(t->dir, &log), 0); /* no close: flushed per record */
    assert_int_equal(log.n, 3);
    assert_false(log.torn_tail);
    assert_int_equal(log.recs[2].type, KVM_TRACE_LOG);
    assert_int_equal(log.recs[2].log.superstep, 2);
    assert_int_equal(log.recs[2].line, 3);
    finish(&log, t);
}

static void test_torn_last_line_is_ignored(void **s) {
    (void)s;
    kvm_trace_t *t = open_trace("torn");
    kvm_trace_edge_t e = {.superstep = 1, .from = "START", .to = "a", .kind = "edge"};
    assert_int_equal(kvm_trace_write_edge(t, &e), 0);
    fputs("{\"t\":\"step\",\"idx\":0,\"pieces\":[{\"te", t->f); /* the writer died here */
    fflush(t->f);
    kvm_trace_log_t log;
    assert_int_equal(kvm_trace_read(t->path, &log), 0);
    assert_int_equal(log.n, 1);
    assert_true(log.torn_tail);
    finish(&log, t);
}

static void test_bad_middle_line_is_an_error_naming_the_line(void **s) {
    (void)s;
    kvm_trace_t *t = trace_with("bad", "{\"t\":\"log\"}\nnot json\n{\"t\":\"log\"}\n");
    kvm_trace_log_t log;
    assert_int_equal(kvm_trace_read(t->path, &log), KVM_EFORMAT);
    assert_non_null(strstr(kvm_errmsg(), "events.jsonl:2:"));
    assert_int_equal(log.n, 0);
    assert_null(log.recs);
    kvm_trace_close(t);
}

/* ---- hostile files ------------------------------------------------------------------------------------ */

/* The text must be refused with code, the message naming every string of want. */
static void check_refused(const char *name, const char *text, int code, const char *want1, const char *want2) {
    kvm_trace_t *t = trace_with(name, text);
    kvm_trace_log_t log;
    assert_int_equal(kvm_trace_read(t->path, &log), code);
    if (!strstr(kvm_errmsg(), want1) || (want2 && !strstr(kvm_errmsg(), want2)))
        fail_msg("message '%s' lacks '%s' / '%s'", kvm_errmsg(), want1, want2 ? want2 : "");
    assert_int_equal(log.n, 0);
    kvm_trace_close(t);
}

static void test_a_field_of_the_wrong_type_is_an_error_naming_line_and_field(void **s) {
    (void)s;
    check_refused("wrongtype", "{\"t\":\"log\",\"msg\":\"a\"}\n{\"t\":\"step\",\"idx\":1,\"agent\":\"a\",\"kv\":{\"exact\":\"many\"}}\n{\"t\":\"log\"}\n",
                  KVM_EFORMAT, "events.jsonl:2:", "'kv.exact' must be an integer");
    check_refused("wrongarr", "{\"t\":\"superstep\",\"nodes\":[\"a\",7]}\n", KVM_EFORMAT, ":1:", "'nodes' must be an array of strings");
    check_refused("hugeint", "{\"t\":\"edge\",\"superstep\":1e300}\n", KVM_EFORMAT, ":1:", "'superstep' must be an integer");
    check_refused("negseed", "{\"t\":\"run.start\",\"v\":1,\"seed\":\"-1\"}\n", KVM_EFORMAT, ":1:", "'seed' must be a string of digits");
    check_refused("badmode", "{\"t\":\"run.start\",\"v\":1,\"graph\":{\"joins\":[{\"mode\":\"some\"}]}}\n", KVM_EFORMAT, "'joins.mode'", NULL);
    check_refused("badids", "{\"t\":\"step\",\"agent\":\"a\",\"prompt\":{\"ids\":[1,2.5]}}\n", KVM_EFORMAT, "'prompt.ids'", NULL);
}

static void test_a_record_without_a_type_or_not_an_object_is_an_error(void **s) {
    (void)s;
    check_refused("notype", "{\"x\":1}\n{\"t\":\"log\"}\n", KVM_EFORMAT, ":1:", "field 't'");
    check_refused("array", "[1,2]\n{\"t\":\"log\"}\n", KVM_EFORMAT, ":1:", "not a JSON object");
}

static void test_a_newer_major_version_is_a_clear_error(void **s) {
    (void)s;
    check_refused("v2", "{\"t\":\"run.start\",\"v\":2,\"run_id\":{\"new\":\"shape\"}}\n", KVM_EVERSION, "version 2 is newer", ":1:");
}

static void test_unknown_records_and_fields_are_kept_or_ignored(void **s) {
    (void)s;
    kvm_trace_t *t = trace_with("unknown", "\n{\"t\":\"span.start\",\"span_id\":\"00f0\"}\n{\"t\":\"log\",\"msg\":\"m\",\"new_field\":[1]}\n");
    kvm_trace_log_t log;
    assert_int_equal(kvm_trace_read(t->path, &log), 0);
    assert_int_equal(log.n, 2);
    assert_int_equal(log.recs[0].type, KVM_TRACE_OTHER);
    assert_string_equal(log.recs[0].type_name, "span.start");
    assert_int_equal(log.recs[0].line, 2);
    assert_string_equal(log.recs[1].log.msg, "m");
    assert_null(log.recs[1].log.level);
    finish(&log, t);
}

/* ---- round trips ------------------------------------------------------------------------------------------ */

static void test_run_start_reads_back_as_written(void **s) {
    (void)s;
    kvm_trace_t *t = open_trace("rt_start");
    kvm_trace_part_t parts[] = {{.text = "Q: "}, {.slot = "state:input.q", .src = "input.q"}};
    const char *stop[] = {"\n", "END"};
    kvm_trace_model_t models[] = {{.index = 0, .script_path = "mock:echo", .path = "mock:echo", .engine = "mock", .chat_format = "plain"},
                                  {.index = 1, .script_path = "m", .path = "/m", .engine = "model", .name = "mini", .arch = "Llama",
                                   .n_layers = 4, .dim = 128, .vocab_size = 512, .max_seq_len = 256, .model_id = "00ff", .describe = "d"}};
    kvm_trace_agent_t agents[] = {{.name = "a", .model = 1, .role = NULL, .template_text = "Q: {input.q}", .parts = parts, .n_parts = 2,
                                   .sampling = {.temperature = 0.5, .top_k = 3, .top_p = 0.9, .repetition_penalty = 1.1}, .max_tokens = 9,
                                   .stop = stop, .n_stop = 2, .budget_tokens = 100, .kv = "kvcomm", .where = "x.lua:3"}};
    kvm_trace_node_t nodes[] = {{.name = "a", .kind = "agent", .agent = "a"}, {.name = "f", .kind = "func", .writes = "k", .router = true}};
    kvm_trace_edge_def_t edges[] = {{.from = "__start__", .to = "a"}, {.from = "a", .to = "f", .conditional = true, .on_error = true}};
    const char *srcs[] = {"a", "f"};
    kvm_trace_join_t joins[] = {{.sources = srcs, .n_sources = 2, .target = "a", .all = false}};
    kvm_trace_run_start_t w = {.run_id = "0123", .run = 4, .workflow_path = "x.lua", .graph = "g", .source_hash = 0x0f1bec2b5fb8f8c1ULL,
                               .source = "return g", .inputs_json = "{\"q\":\"why\",\"n\":[1,2]}", .seed = 18446744073709551615ULL,
                               .kv_override = "dense", .mock = true,
                               .limits = {.steps = 50, .tokens = 7, .wall_ms = 8, .instructions = 1e9, .lua_ms = 5000, .memory_bytes = 64},
                               .models = models, .n_models = 2, .agents = agents, .n_agents = 1, .nodes = nodes, .n_nodes = 2,
                               .edges = edges, .n_edges = 2, .joins = joins, .n_joins = 1, .build_version = "0.1.0", .build_lua = "Lua 5.4",
                               .build_cjson = "1.7"};
    assert_int_equal(kvm_trace_write_run_start(t, &w), 0);
    kvm_trace_log_t log;
    const kvm_trace_run_start_t *r = &only_record(t, &log)->run_start;
    assert_int_equal(r->version, KVM_TRACE_VERSION);
    assert_string_equal(r->run_id, "0123");
    assert_int_equal(r->run, 4);
    assert_true(r->source_hash == w.source_hash && r->seed == w.seed);
    assert_string_equal(r->source, "return g");
    assert_string_equal(r->inputs_json, "{\"q\":\"why\",\"n\":[1,2]}");
    assert_string_equal(r->kv_override, "dense");
    assert_true(r->mock);
    assert_int_equal(r->limits.tokens, 7);
    assert_true(r->limits.instructions == 1e9);
    assert_int_equal(r->n_models, 2);
    assert_null(r->models[0].name);
    assert_string_equal(r->models[1].name, "mini");
    assert_int_equal(r->models[1].max_seq_len, 256);
    const kvm_trace_agent_t *a = &r->agents[0];
    assert_null(a->role);
    assert_int_equal(a->n_parts, 2);
    assert_string_equal(a->parts[0].text, "Q: ");
    assert_null(a->parts[0].slot);
    assert_string_equal(a->parts[1].slot, "state:input.q");
    assert_string_equal(a->parts[1].src, "input.q");
    assert_null(a->parts[1].text);
    assert_true(a->sampling.repetition_penalty == 1.1 && a->sampling.top_k == 3);
    assert_int_equal(a->n_stop, 2);
    assert_string_equal(a->stop[1], "END");
    assert_int_equal(a->budget_tokens, 100);
    assert_string_equal(r->nodes[0].agent, "a");
    assert_null(r->nodes[1].agent);
    assert_true(r->nodes[1].router);
    assert_string_equal(r->nodes[1].writes, "k");
    assert_true(r->edges[1].conditional && r->edges[1].on_error && !r->edges[0].on_error);
    assert_false(r->joins[0].all);
    assert_string_equal(r->joins[0].sources[1], "f");
    assert_string_equal(r->build_lua, "Lua 5.4");
    finish(&log, t);
}

static void test_an_agent_step_reads_back_as_written(void **s) {
    (void)s;
    kvm_trace_t *t = open_trace("rt_step");
    kvm_trace_part_t pieces[] = {{.text = "Q: "}, {.slot = "agent:p:current", .src = "agent.p", .text = "", .missing = true}};
    int32_t ids[] = {1, 17, -3, 2147483647};
    kvm_trace_step_t w = {.idx = 3, .superstep = 2, .node = "c", .agent = "c", .op = "chat", .via = "ctx:call", .t_start = 1795702892276629979ULL,
                          .t_end = 1795702892276641506ULL, .error = {.code = KVM_EBUDGET, .message = "x.lua:3: over\nstack line 1\nline 2"},
                          .model = "m", .system = "You check.", .pieces = pieces, .n_pieces = 2, .prompt_text = "You check.\n\nQ: ",
                          .prompt_tokens = 4, .prompt_ids = ids, .n_prompt_ids = 4,
                          .kv = {.exact = 1, .offset = 2, .naive = 0, .recomputed = 1, .fused = 0, .mode = "reuse", .anchors = 3,
                                 .decisions_json = "{\"policy\":\"kvcomm\",\"report\":{\"x\":[1,true,null]}}"},
                          .sampling = {.temperature = 0, .top_k = 0, .top_p = 1, .max_tokens = 8}, .output_text = "yes", .output_tokens = 2,
                          .stop = "string", .timings = {.queue_ms = 0.1, .ttft_ms = 3.25, .decode_ms = 1, .total_ms = 4.5, .tokens_per_s = 909.5},
                          .batch = {.forwards = 3, .max_seqs = 3, .mean_seqs = 2.5, .max_rows = 9}};
    assert_int_equal(kvm_trace_write_step(t, &w), 0);
    kvm_trace_log_t log;
    const kvm_trace_step_t *r = &only_record(t, &log)->step;
    assert_int_equal(r->idx, 3);
    assert_string_equal(r->via, "ctx:call");
    assert_true(r->t_start == w.t_start && r->t_end == w.t_end);
    assert_int_equal(r->error.code, KVM_EBUDGET);
    assert_string_equal(r->error.message, "x.lua:3: over"); /* the first line; the rest is the traceback */
    assert_string_equal(r->error.traceback, "stack line 1\nline 2");
    assert_string_equal(r->system, "You check.");
    assert_int_equal(r->n_pieces, 2);
    assert_true(r->pieces[1].missing && !r->pieces[0].missing);
    assert_string_equal(r->pieces[1].src, "agent.p");
    assert_int_equal(r->n_prompt_ids, 4);
    assert_memory_equal(r->prompt_ids, ids, sizeof ids);
    assert_int_equal(r->kv.offset, 2);
    assert_string_equal(r->kv.mode, "reuse");
    assert_string_equal(r->kv.decisions_json, w.kv.decisions_json);
    assert_int_equal(r->sampling.max_tokens, 8);
    assert_string_equal(r->output_text, "yes");
    assert_string_equal(r->stop, "string");
    assert_true(r->timings.ttft_ms == 3.25 && r->timings.tokens_per_s == 909.5);
    assert_true(r->batch.mean_seqs == 2.5 && r->batch.max_rows == 9);
    assert_null(r->output_json);
    finish(&log, t);
}

static void test_func_steps_read_back_with_their_output_or_error(void **s) {
    (void)s;
    kvm_trace_t *t = open_trace("rt_func");
    kvm_trace_step_t ok = {.idx = 1, .superstep = 1, .node = "f", .op = "func", .output_json = "{\"verdict\":\"x\"}"};
    kvm_trace_step_t nil = {.idx = 2, .superstep = 1, .node = "g", .op = "tool"};
    kvm_trace_step_t bad = {.idx = 3, .superstep = 1, .node = "h", .op = "func", .error = {.code = KVM_ELUA_RUNTIME, .message = "boom"}};
    assert_int_equal(kvm_trace_write_step(t, &ok), 0);
    assert_int_equal(kvm_trace_write_step(t, &nil), 0);
    assert_int_equal(kvm_trace_write_step(t, &bad), 0);
    kvm_trace_log_t log;
    assert_int_equal(kvm_trace_read(t->dir, &log), 0);
    assert_int_equal(log.n, 3);
    assert_null(log.recs[0].step.agent);
    assert_string_equal(log.recs[0].step.output_json, "{\"verdict\":\"x\"}");
    assert_int_equal(log.recs[0].step.error.code, 0);
    assert_string_equal(log.recs[1].step.op, "tool");
    assert_null(log.recs[1].step.output_json);
    assert_int_equal(log.recs[2].step.error.code, KVM_ELUA_RUNTIME);
    assert_string_equal(log.recs[2].step.error.message, "boom");
    assert_null(log.recs[2].step.error.traceback);
    finish(&log, t);
}

static void test_edge_superstep_log_and_checkpoint_read_back_as_written(void **s) {
    (void)s;
    kvm_trace_t *t = open_trace("rt_small");
    const char *nodes[] = {"b", "c"};
    kvm_trace_edge_t e = {.superstep = 2, .from = "a", .to = "END", .kind = "route"};
    kvm_trace_superstep_t ss = {.superstep = 3, .nodes = nodes, .n_nodes = 2};
    kvm_trace_log_rec_t lg = {.level = "warn", .msg = "careful \"quoted\"\n", .superstep = 3};
    kvm_trace_checkpoint_t cp = {.superstep = 3, .state_json = "{\"msgs\":[],\"k\":1.5}", .next = nodes, .n_next = 1};
    assert_int_equal(kvm_trace_write_edge(t, &e), 0);
    assert_int_equal(kvm_trace_write_superstep(t, &ss), 0);
    assert_int_equal(kvm_trace_write_log(t, &lg), 0);
    assert_int_equal(kvm_trace_write_checkpoint(t, &cp), 0);
    kvm_trace_log_t log;
    assert_int_equal(kvm_trace_read(t->dir, &log), 0);
    assert_int_equal(log.n, 4);
    assert_int_equal(log.recs[0].type, KVM_TRACE_EDGE);
    assert_string_equal(log.recs[0].edge.to, "END");
    assert_string_equal(log.recs[0].edge.kind, "route");
    assert_int_equal(log.recs[1].superstep.n_nodes, 2);
    assert_string_equal(log.recs[1].superstep.nodes[1], "c");
    assert_string_equal(log.recs[2].log.msg, lg.msg);
    assert_string_equal(log.recs[3].checkpoint.state_json, "{\"msgs\":[],\"k\":1.5}");
    assert_int_equal(log.recs[3].checkpoint.n_next, 1);
    int from = 0;
    assert_ptr_equal(kvm_trace_log_next(&log, KVM_TRACE_LOG, &from), &log.recs[2]);
    assert_int_equal(from, 3);
    assert_null(kvm_trace_log_next(&log, KVM_TRACE_LOG, &from));
    finish(&log, t);
}

static void test_run_end_and_index_read_back_as_written(void **s) {
    (void)s;
    kvm_trace_t *t = open_trace("rt_end");
    kvm_trace_run_end_t w = {.run_id = "ab", .error = {.code = KVM_EBUDGET, .message = "over budget"}, .outputs_json = "{}",
                             .state_json = "{\"a\":\"b\"}", .input_tokens = 412, .output_tokens = 96, .agent_calls = 15, .wall_ms = 812.5,
                             .lua_ms = 0.5, .steps = 9, .tokens = 508, .instructions = 41000, .lua_bytes_peak = 48211};
    assert_int_equal(kvm_trace_write_run_end(t, &w), 0);
    kvm_trace_index_t ix = {.run_id = "ab", .workflow = "x.lua", .graph = "g", .error = KVM_EBUDGET, .started = 1795702892276629979ULL,
                            .wall_ms = 31.25, .supersteps = 3, .steps = 5, .agent_calls = 4, .input_tokens = 705, .output_tokens = 12, .seed = 7};
    assert_int_equal(kvm_trace_write_index(t, &ix), 0);
    kvm_trace_log_t log;
    const kvm_trace_run_end_t *r = &only_record(t, &log)->run_end;
    assert_int_equal(r->error.code, KVM_EBUDGET);
    assert_string_equal(r->error.message, "over budget");
    assert_string_equal(r->state_json, "{\"a\":\"b\"}");
    assert_int_equal(r->output_tokens, 96);
    assert_true(r->wall_ms == 812.5 && r->lua_bytes_peak == 48211);
    assert_int_equal(r->steps, 9);
    kvm_trace_log_free(&log);
    assert_int_equal(kvm_trace_read_index(t->dir, &log), 0);
    const kvm_trace_index_t *x = &log.recs[0].index;
    assert_int_equal(log.recs[0].type, KVM_TRACE_INDEX);
    assert_int_equal(x->error, KVM_EBUDGET);
    assert_true(x->started == ix.started && x->seed == 7 && x->wall_ms == 31.25);
    assert_string_equal(x->workflow, "x.lua");
    assert_int_equal(x->input_tokens, 705);
    finish(&log, t);
}

static void test_a_run_without_an_index_says_so(void **s) {
    (void)s;
    kvm_trace_t *t = open_trace("noindex");
    kvm_trace_log_t log;
    assert_int_equal(kvm_trace_read_index(t->dir, &log), KVM_ENOENT);
    assert_non_null(strstr(kvm_errmsg(), "no index.json"));
    kvm_trace_close(t);
}

/* A trace written by the writer before the schema moved to runtime/trace (commit df22b09, `kvmesh run
 * examples/pipeline.lua --mock`): version 1 reads with every record typed. */
static void test_a_version_1_trace_of_the_previous_writer_reads(void **s) {
    (void)s;
    kvm_trace_log_t log;
    assert_int_equal(kvm_trace_read("tests/fixtures/trace_v1", &log), 0);
    assert_false(log.torn_tail);
    const kvm_trace_rec_t *st = kvm_trace_log_next(&log, KVM_TRACE_RUN_START, NULL);
    assert_non_null(st);
    assert_int_equal(st->run_start.version, 1);
    assert_true(st->run_start.n_agents > 0 && st->run_start.agents[0].n_parts > 0);
    int from = 0, agent_steps = 0;
    for (const kvm_trace_rec_t *r; (r = kvm_trace_log_next(&log, KVM_TRACE_STEP, &from)) != NULL;)
        if (r->step.agent) {
            agent_steps++;
            assert_non_null(r->step.prompt_text);
            assert_true(r->step.n_pieces > 0);
        }
    assert_true(agent_steps > 0);
    const kvm_trace_rec_t *end = kvm_trace_log_next(&log, KVM_TRACE_RUN_END, NULL);
    assert_non_null(end);
    assert_int_equal(end->run_end.error.code, 0);
    kvm_trace_log_free(&log);
    assert_int_equal(kvm_trace_read_index("tests/fixtures/trace_v1", &log), 0);
    assert_true(log.recs[0].index.started > 0);
    kvm_trace_log_free(&log);
}

/* ---- runs ----------------------------------------------------------------------------------------------- */

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

/* Runs WF once with a trace under root/<sub>; returns the run's trace directory in dir. */
static void traced_run(const char *sub, char *dir, size_t cap) {
    kvm_wf_opts_t o = {0};
    char rb[300];
    snprintf(rb, sizeof rb, "%s/%s", root, sub);
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
    snprintf(dir, cap, "%s", kvm_wf_run_trace_dir(wf, run));
    kvm_wf_free(wf);
}

/* Rebuilds every agent step's prompt from the trace alone: the agent's role and template parts from
 * run.start, the slot contents from the step; compares with the prompt the engine ran. */
static void test_prompts_rebuild_from_the_trace_alone(void **s) {
    (void)s;
    char dir[512];
    traced_run("rebuild", dir, sizeof dir);
    kvm_trace_log_t log;
    assert_int_equal(kvm_trace_read(dir, &log), 0);
    int from = 0;
    const kvm_trace_rec_t *start = kvm_trace_log_next(&log, KVM_TRACE_RUN_START, &from);
    assert_non_null(start);
    int n_steps = 0;
    for (const kvm_trace_rec_t *rec; (rec = kvm_trace_log_next(&log, KVM_TRACE_STEP, &from)) != NULL;) {
        const kvm_trace_step_t *st = &rec->step;
        if (!st->agent) continue;
        const kvm_trace_agent_t *a = NULL;
        for (int i = 0; i < start->run_start.n_agents; i++)
            if (!strcmp(start->run_start.agents[i].name, st->agent)) a = &start->run_start.agents[i];
        assert_non_null(a);
        assert_int_equal(st->n_pieces, a->n_parts);
        wf_piece_t pc[16];
        for (int i = 0; i < a->n_parts; i++) {
            if (a->parts[i].slot) { /* the content comes from the step, bound to the template's placeholder */
                assert_string_equal(st->pieces[i].slot, a->parts[i].slot);
                pc[i] = (wf_piece_t){.is_slot = true, .name = a->parts[i].slot, .text = st->pieces[i].text};
            } else /* fixed text comes from the template alone */
                pc[i] = (wf_piece_t){.text = a->parts[i].text};
        }
        char *rebuilt = wf_llm_render_plain(a->role, pc, a->n_parts);
        assert_string_equal(rebuilt, st->prompt_text);
        kvm_free(rebuilt);
        n_steps++;
    }
    assert_int_equal(n_steps, 3); /* planner, coder, coder again after the judge */
    assert_non_null(kvm_trace_log_next(&log, KVM_TRACE_RUN_END, NULL));
    kvm_trace_log_free(&log);
    int runs = 0;
    char rb[300];
    snprintf(rb, sizeof rb, "%s/rebuild", root);
    assert_int_equal(kvm_trace_find_runs(rb, found, &runs), 1);
    assert_int_equal(runs, 1);
}

/* trace ls of a folder with no runs (issue 19): an empty folder, one of files and nested folders that are no
 * runs, and a dangling link list nothing and are no error (the sort of zero paths was undefined behaviour). */
static void test_a_folder_without_runs_lists_none(void **st) {
    (void)st;
    char d[300], cmd[2000];
    snprintf(d, sizeof d, "%s/no_runs", root);
    snprintf(cmd, sizeof cmd, "mkdir -p '%s/empty' '%s/other/a/b/c/d' && touch '%s/other/x.jsonl' '%s/other/a/index.json' "
             "&& ln -sf /nonexistent '%s/other/dangling'", d, d, d, d, d);
    assert_int_equal(system(cmd), 0);
    int runs = 0;
    char p[500];
    snprintf(p, sizeof p, "%s/empty", d);
    assert_int_equal(kvm_trace_find_runs(p, found, &runs), 0);
    snprintf(p, sizeof p, "%s/other", d);
    assert_int_equal(kvm_trace_find_runs(p, found, &runs), 0);
    assert_int_equal(runs, 0);
    char *text = NULL;
    assert_int_equal(kvm_trace_view_list(d, &text), 0);
    assert_non_null(text);
    assert_string_equal(text, "");
    kvm_free(text);
}

static void test_an_unreadable_trace_root_is_an_error_naming_it(void **st) {
    (void)st;
    if (geteuid() == 0) skip(); /* root reads every folder */
    char d[300], cmd[1200];
    snprintf(d, sizeof d, "%s/unreadable", root);
    snprintf(cmd, sizeof cmd, "mkdir -p '%s/run' && touch '%s/run/events.jsonl' && chmod 000 '%s'", d, d, d);
    assert_int_equal(system(cmd), 0);
    int runs = 0;
    int rc = kvm_trace_find_runs(d, found, &runs);
    snprintf(cmd, sizeof cmd, "chmod 755 '%s'", d);
    assert_int_equal(system(cmd), 0);
    assert_int_equal(rc, KVM_EIO);
    assert_non_null(strstr(kvm_errmsg(), d));
    assert_int_equal(runs, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_records_are_readable_while_the_file_is_open),
        cmocka_unit_test(test_torn_last_line_is_ignored),
        cmocka_unit_test(test_bad_middle_line_is_an_error_naming_the_line),
        cmocka_unit_test(test_a_field_of_the_wrong_type_is_an_error_naming_line_and_field),
        cmocka_unit_test(test_a_record_without_a_type_or_not_an_object_is_an_error),
        cmocka_unit_test(test_a_newer_major_version_is_a_clear_error),
        cmocka_unit_test(test_unknown_records_and_fields_are_kept_or_ignored),
        cmocka_unit_test(test_run_start_reads_back_as_written),
        cmocka_unit_test(test_an_agent_step_reads_back_as_written),
        cmocka_unit_test(test_func_steps_read_back_with_their_output_or_error),
        cmocka_unit_test(test_edge_superstep_log_and_checkpoint_read_back_as_written),
        cmocka_unit_test(test_run_end_and_index_read_back_as_written),
        cmocka_unit_test(test_a_run_without_an_index_says_so),
        cmocka_unit_test(test_a_version_1_trace_of_the_previous_writer_reads),
        cmocka_unit_test(test_prompts_rebuild_from_the_trace_alone),
        cmocka_unit_test(test_a_folder_without_runs_lists_none),
        cmocka_unit_test(test_an_unreadable_trace_root_is_an_error_naming_it),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
