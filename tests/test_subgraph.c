/* test_subgraph.c - subgraphs (docs/lua-api.md "Subgraphs"): a graph used as a node of another graph, its state
 * mapped in and out through the parent's reducers, load-time checks of the maps and of cycles and nesting, failures and
 * budgets counted inside the parent's, nested trace steps, resume from the parent's checkpoints, kvmesh.interrupt inside a
 * subgraph (answered in the process, and from the trace where the resume continues inside the child), and replay of
 * a run with subgraphs from each of its steps. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include <kvmesh.h>

#include "tests/support/test_workflow.h"

/* Loading src must fail with a message that contains every one of the (NULL-ended) parts. */
static void load_fails(const char *src, ...) {
    kvm_runtime_t *rt = runtime();
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "g.lua", src, strlen(src), NULL);
    if (wf) fail_msg("loaded, but should not have:\n%s", src);
    const char *msg = kvm_errmsg();
    va_list ap;
    va_start(ap, src);
    for (const char *part; (part = va_arg(ap, const char *));)
        if (!strstr(msg, part)) fail_msg("message '%s' lacks '%s'", msg, part);
    va_end(ap);
    kvm_runtime_free(rt);
}

/* One run of wf with input `input` (and the seed), driven to its end. */
static kvm_run_t *run(kvm_runtime_t *rt, kvm_workflow_t *wf, const char *input, uint64_t seed) {
    kvm_run_params_t p = kvm_run_default_params();
    char in[256];
    snprintf(in, sizeof in, "{\"input\":\"%s\"}", input);
    p.inputs_json = in;
    p.seed = seed;
    kvm_run_t *r = kvm_run_start(wf, &p);
    if (!r) fail_msg("start: %s", kvm_errmsg());
    drive(rt);
    return r;
}

static cJSON *state_of(kvm_run_t *r) {
    char *s = kvm_run_state_json(r);
    cJSON *j = cJSON_Parse(s);
    kvm_free(s);
    assert_non_null(j);
    return j;
}

/* The child keeps notes (append) from the question it is given; the parent maps question -> q in and notes ->
 * findings out, where its own reducer (append, with an initial element) applies. */
#define RESEARCH                                                                                                           \
    "local kvm = kvmesh\nlocal m = kvm.model('mock:echo')\n"                                                              \
    "local research = kvm.graph{ name = 'research', state = { q = kvm.reduce.replace, notes = kvm.reduce.append } }\n"   \
    "research:agent('search', { model = m, template = 'Search {state.q}', max_tokens = 3, writes = 'notes' })\n"         \
    "research:func('pick', function(state) return { notes = 'picked ' .. #state.notes } end)\n"                         \
    "research:edge(kvm.START, 'search')\nresearch:edge('search', 'pick')\n"                                               \
    "local g = kvm.graph{ name = 'main', state = { question = kvm.reduce.replace,\n"                                      \
    "                     findings = { kvm.reduce.append, init = { 'first' } }, answer = kvm.reduce.replace } }\n"          \
    "g:func('ask', function(state, last, ctx) return { question = ctx.inputs.input } end)\n"

/* ... then the main graph asks, runs the subgraph node 'research' and writes. */
#define WRITE_AFTER                                                                                                        \
    "g:agent('write', { model = m, template = 'Answer {state.question}', max_tokens = 4, writes = 'answer' })\n"         \
    "g:edge(kvm.START, 'ask')\ng:edge('ask', 'research')\ng:edge('research', 'write')\nreturn g\n"

static void check_research_state(kvm_run_t *r) {
    const char *msg = NULL;
    if (kvm_run_status(r, &msg) != 0) fail_msg("run failed: %s", msg ? msg : "?");
    cJSON *st = state_of(r);
    char *f = cJSON_PrintUnformatted(cJSON_GetObjectItem(st, "findings"));
    assert_string_equal(f, "[\"first\",\"Search why sky\",\"picked 1\"]"); /* the parent's append extended by the child's list */
    cJSON_free(f);
    assert_null(cJSON_GetObjectItem(st, "notes")); /* the child's keys stay the child's */
    assert_string_equal(cJSON_GetObjectItem(st, "answer")->valuestring, "Answer why sky blue");
    cJSON_Delete(st);
}

static void test_state_is_mapped_in_and_out_through_the_parents_reducers(void **s) {
    (void)s;
    kvm_runtime_t *rt = runtime();
    kvm_workflow_t *wf = load(rt, RESEARCH
                              "g:subgraph('research', research, { input = { question = 'q' }, output = { notes = 'findings' } })\n"
                              WRITE_AFTER);
    check_research_state(run(rt, wf, "why sky blue", 1));
    kvm_workflow_free(wf);
    /* the same with g:node(name, {subgraph = ...}) */
    wf = load(rt, RESEARCH
              "g:node('research', { subgraph = research, input = { question = 'q' }, output = { notes = 'findings' } })\n"
              WRITE_AFTER);
    check_research_state(run(rt, wf, "why sky blue", 1));
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

static void test_bad_subgraphs_are_refused_at_load_naming_the_line(void **s) {
    (void)s;
    load_fails(RESEARCH "g:subgraph('research', research, { input = { qestion = 'q' } })\nreturn g\n", "g.lua:11:",
               "input maps 'qestion', which graph 'main' does not declare", "question", NULL);
    load_fails(RESEARCH "g:subgraph('research', research, { input = { question = 'qq' } })\nreturn g\n", "g.lua:11:",
               "maps 'question' to 'qq', which graph 'research' does not declare", NULL);
    load_fails(RESEARCH "g:subgraph('research', research, { output = { note = 'findings' } })\nreturn g\n", "g.lua:11:",
               "output maps 'note', which graph 'research' does not declare", NULL);
    load_fails(RESEARCH "g:subgraph('research', research, { output = { notes = 'finding' } })\nreturn g\n", "g.lua:11:",
               "which graph 'main' does not declare", NULL);
    load_fails(RESEARCH "g:subgraph('research', research, { output = { notes = 'findings', q = 'findings' } })\nreturn g\n",
               "g.lua:11:", "two keys to 'findings'", NULL);
    load_fails(RESEARCH "g:subgraph('research', research, { outputs = {} })\nreturn g\n", "g.lua:11:", "unknown field 'outputs'", NULL);
    load_fails(RESEARCH "g:subgraph('research', 'research')\nreturn g\n", "g.lua:11:", "must be a graph", NULL);
    load_fails(RESEARCH "g:subgraph('me', g)\nreturn g\n", "g.lua:11:", "cannot be a subgraph of itself", NULL);
    load_fails(RESEARCH "g:subgraph('research', research)\nresearch:subgraph('back', g)\nreturn g\n", "g.lua:12:",
               "graph 'main' already holds graph 'research'", "cycle", NULL);
    /* a cycle through a third graph */
    load_fails("local kvm = kvmesh\nlocal a, b, c = kvm.graph{ name = 'a' }, kvm.graph{ name = 'b' }, kvm.graph{ name = 'c' }\n"
               "a:subgraph('x', b)\nb:subgraph('y', c)\nc:subgraph('z', a)\nreturn a\n",
               "g.lua:5:", "graph 'a' already holds graph 'c'", NULL);
    /* nesting: 9 levels below the top are refused where the 9th is added */
    load_fails("local kvm = kvmesh\nlocal m = kvm.model('mock:echo')\nlocal gs = {}\n"
               "for i = 1, 10 do gs[i] = kvm.graph{ name = 'g' .. i } end\n"
               "for i = 1, 9 do gs[i]:subgraph('s', gs[i + 1]) end\nreturn gs[1]\n",
               "g.lua:5:", "subgraphs would nest 9 deep (at most 8)", NULL);
    /* the child graph is validated too: its own errors name its lines */
    load_fails(RESEARCH "research:edge('pick', 'nowhere')\ng:subgraph('research', research)\ng:edge(kvm.START, 'research')\nreturn g\n",
               "g.lua:11:", "unknown node 'nowhere'", NULL);
}

/* A child that fails fails its node: the parent routes it with on_error, or fails with the child's message. */
static void test_a_failing_subgraph_fails_its_node(void **s) {
    (void)s;
    kvm_runtime_t *rt = runtime();
    const char *src = "local kvm = kvmesh\n"
                      "local child = kvm.graph{ name = 'child' }\n"
                      "child:func('boom', function() error('child broke') end)\n"
                      "child:edge(kvm.START, 'boom')\n"
                      "local g = kvm.graph{ name = 'main', state = { why = kvm.reduce.replace } }\n"
                      "g:subgraph('sub', child)\n"
                      "g:func('catch', function(state, last) return { why = last.sub.error } end)\n"
                      "g:edge(kvm.START, 'sub')\ng:edge('sub', 'catch', { on_error = true })\nreturn g\n";
    kvm_workflow_t *wf = load(rt, src);
    kvm_run_t *r = run(rt, wf, "x", 1);
    assert_int_equal(kvm_run_status(r, NULL), 0);
    cJSON *st = state_of(r);
    const char *why = cJSON_GetObjectItem(st, "why")->valuestring;
    assert_non_null(strstr(why, "g.lua:6: subgraph node 'sub' (graph 'child')"));
    assert_non_null(strstr(why, "g.lua:3: child broke"));
    cJSON_Delete(st);
    kvm_workflow_free(wf);
    /* without on_error, the run fails with it */
    wf = load(rt, "local kvm = kvmesh\nlocal child = kvm.graph{ name = 'child' }\n"
                  "child:func('boom', function() error('child broke') end)\nchild:edge(kvm.START, 'boom')\n"
                  "local g = kvm.graph{ name = 'main' }\ng:subgraph('sub', child)\ng:edge(kvm.START, 'sub')\nreturn g\n");
    const char *msg = NULL;
    r = run(rt, wf, "x", 1);
    assert_int_equal(kvm_run_status(r, &msg), KVM_ELUA_RUNTIME);
    assert_non_null(strstr(msg, "subgraph node 'sub'"));
    assert_non_null(strstr(msg, "child broke"));
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

/* Hostile scripts: a graph cannot gain a subgraph once loaded (no recursion built at run time), a child looping forever
 * ends on its step budget, an endless Lua loop in a child ends on the parent's instruction budget, a child's tokens
 * count against the parent's token budget. */
static void test_hostile_subgraphs_end_with_clear_errors(void **s) {
    (void)s;
    kvm_runtime_t *rt = runtime();
    struct {
        const char *src;
        int code;
        const char *want;
    } cases[] = {
        {"local kvm = kvmesh\nlocal g = kvm.graph{ name = 'main' }\nlocal c = kvm.graph{ name = 'c' }\n"
         "c:func('f', function() end)\nc:edge(kvm.START, 'f')\n"
         "g:func('grow', function() g:subgraph('again', g) end)\ng:edge(kvm.START, 'grow')\nreturn g\n",
         KVM_ELUA_RUNTIME, "frozen"},
        {"local kvm = kvmesh\nlocal c = kvm.graph{ name = 'spin', state = { n = kvm.reduce.sum } }\n"
         "c:func('f', function() return { n = 1 } end)\nc:edge(kvm.START, 'f')\n"
         "c:route('f', function() return 'f' end, { 'f' })\nc:limit{ steps = 7 }\n"
         "local g = kvm.graph{ name = 'main' }\ng:subgraph('s', c)\ng:edge(kvm.START, 's')\nreturn g\n",
         KVM_EBUDGET, "graph 'spin' reached its step budget (7 super-steps)"},
        {"local kvm = kvmesh\nlocal c = kvm.graph{ name = 'c' }\n"
         "c:func('f', function() local x = 0 while true do x = x + 1 end end)\nc:edge(kvm.START, 'f')\n"
         "local g = kvm.graph{ name = 'main' }\ng:subgraph('s', c)\ng:edge(kvm.START, 's')\ng:limit{ instructions = 200000 }\nreturn g\n",
         KVM_EBUDGET, "instruction budget exceeded"},
        {"local kvm = kvmesh\nlocal m = kvm.model('mock:echo')\nlocal c = kvm.graph{ name = 'talk', state = { n = kvm.reduce.sum } }\n"
         "c:agent('a', { model = m, template = 'one two three four five {input}', max_tokens = 8 })\n"
         "c:func('count', function() return { n = 1 } end)\nc:edge(kvm.START, 'a')\nc:edge('a', 'count')\n"
         "c:route('count', function() return 'a' end, { 'a' })\nc:limit{ steps = 40 }\n"
         "local g = kvm.graph{ name = 'main' }\ng:subgraph('s', c)\ng:edge(kvm.START, 's')\ng:limit{ tokens = 60 }\nreturn g\n",
         KVM_EBUDGET, "graph 'main' used"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        kvm_workflow_t *wf = load(rt, cases[i].src);
        kvm_run_t *r = run(rt, wf, "go", 1);
        const char *msg = NULL;
        int code = kvm_run_status(r, &msg);
        if (code != cases[i].code || !msg || !strstr(msg, cases[i].want))
            fail_msg("case %zu: status %s, message '%s'; want %s with '%s'", i, kvm_errname(code), msg ? msg : "", kvm_errname(cases[i].code),
                     cases[i].want);
        kvm_workflow_free(wf);
    }
    kvm_runtime_free(rt);
}

/* The child's steps are in the run's trace, nested: graph, depth and the idx of their subgraph node's step. */
static void test_child_steps_are_traced_as_nested_steps(void **s) {
    (void)s;
    kvm_runtime_t *rt = runtime();
    kvm_workflow_t *wf = load(rt, RESEARCH
                              "g:subgraph('research', research, { input = { question = 'q' }, output = { notes = 'findings' } })\n"
                              WRITE_AFTER);
    kvm_run_t *r = run(rt, wf, "why sky blue", 1);
    assert_int_equal(kvm_run_status(r, NULL), 0);
    kvm_trace_reader_t *t = kvm_trace_reader_open(kvm_run_trace_dir(r));
    assert_non_null(t);
    int sub_idx = -1, nested = 0, top = 0, supersteps = 0;
    int parents[8];
    for (int i = 0; i < kvm_trace_reader_n_records(t); i++) {
        if (!strcmp(kvm_trace_reader_record_type(t, i), "superstep")) supersteps++;
        if (strcmp(kvm_trace_reader_record_type(t, i), "step")) continue;
        cJSON *o = cJSON_Parse(kvm_trace_reader_record_json(t, i));
        const cJSON *depth = cJSON_GetObjectItem(o, "depth");
        if (!strcmp(cJSON_GetObjectItem(o, "op")->valuestring, "subgraph")) {
            sub_idx = cJSON_GetObjectItem(o, "idx")->valueint;
            assert_null(depth);
            char *out = cJSON_PrintUnformatted(cJSON_GetObjectItem(o, "output"));
            assert_non_null(out);
            assert_non_null(strstr(out, "picked 1")); /* its output: the mapped keys */
            cJSON_free(out);
        } else if (depth) {
            assert_int_equal(depth->valueint, 1);
            assert_string_equal(cJSON_GetObjectItem(o, "graph")->valuestring, "research");
            parents[nested++] = cJSON_GetObjectItem(o, "parent")->valueint;
        } else
            top++;
        cJSON_Delete(o);
    }
    kvm_trace_reader_free(t);
    assert_int_equal(nested, 2); /* search, pick */
    assert_int_equal(top, 2);    /* ask, write */
    assert_int_equal(supersteps, 3); /* the parent's only: the child's are its own */
    assert_true(sub_idx >= 0);
    for (int i = 0; i < nested; i++) assert_int_equal(parents[i], sub_idx);
    /* kvmesh trace show lists them under their node */
    char *text = NULL;
    assert_int_equal(kvm_trace_view_run(kvm_run_trace_dir(r), &text), 0);
    assert_non_null(strstr(text, "research/search"));
    assert_non_null(strstr(text, "research/pick"));
    kvm_free(text);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

/* Resume at the parent's level: from every checkpoint of seeded runs whose subgraph draws math.random and calls the
 * model, the resumed outputs and state equal the uninterrupted ones. */
static void test_resume_from_the_parents_checkpoints_reproduces_the_run(void **s) {
    (void)s;
    const char *src =
        "local kvm = kvmesh\nlocal m = kvm.model('" KVM_SOURCE_DIR "/models/minillama-2m')\n"
        "local child = kvm.graph{ name = 'child', state = { topic = kvm.reduce.replace, drafts = kvm.reduce.append } }\n"
        "child:agent('draft', { model = m, template = 'Once upon a time {state.topic} said', max_tokens = 5, writes = 'drafts' })\n"
        "child:func('roll', function(state) return { drafts = 'roll ' .. math.random(1, 1000000) } end)\n"
        "child:agent('polish', { model = m, template = 'Then {agent.draft} and', max_tokens = 4, writes = 'drafts' })\n"
        "child:edge(kvm.START, 'draft')\nchild:edge('draft', { 'roll', 'polish' })\n"
        "local g = kvm.graph{ name = 'main', state = { topic = kvm.reduce.replace, story = kvm.reduce.append, n = kvm.reduce.sum } }\n"
        "g:func('start', function(state, last, ctx) return { topic = ctx.inputs.input, n = math.random(1, 9) } end)\n"
        "g:subgraph('write', child, { input = { topic = 'topic' }, output = { drafts = 'story' } })\n"
        "g:agent('end', { model = m, template = 'The end of {input}', max_tokens = 3, writes = 'story' })\n"
        "g:edge(kvm.START, 'start')\ng:edge('start', 'write')\ng:edge('write', 'end')\n"
        "g:dataset(function(seed) local w = { 'cat', 'dog', 'owl', 'fox' } return { input = w[seed % 4 + 1] } end)\n"
        "return g\n";
    kvm_runtime_t *rt = runtime();
    kvm_workflow_t *wf = load(rt, src);
    enum { N = 4 };
    kvm_run_t *runs[N];
    for (int i = 0; i < N; i++) {
        kvm_run_params_t p = kvm_run_default_params();
        p.seed = (uint64_t)i + 1;
        p.from_dataset = true;
        p.kv = "dense";
        assert_non_null(runs[i] = kvm_run_start(wf, &p));
    }
    drive(rt);
    int resumed = 0;
    for (int i = 0; i < N; i++) {
        const char *msg = NULL;
        if (kvm_run_status(runs[i], &msg) != 0) fail_msg("seed %d: %s", i + 1, msg ? msg : "?");
        char *want_out = kvm_run_outputs_json(runs[i]), *want_st = kvm_run_state_json(runs[i]);
        char dir[512];
        snprintf(dir, sizeof dir, "%s", kvm_run_trace_dir(runs[i]));
        for (int step = 1; step <= 3; step++) { /* a checkpoint after each of the parent's 3 super-steps */
            kvm_run_params_t q = kvm_run_default_params();
            q.resume_trace = dir;
            q.resume_step = step;
            kvm_run_t *r2 = kvm_run_start(wf, &q);
            if (!r2) fail_msg("resume seed %d after %d: %s", i + 1, step, kvm_errmsg());
            drive(rt);
            if (kvm_run_status(r2, &msg) != 0) fail_msg("resumed seed %d after %d: %s", i + 1, step, msg ? msg : "?");
            char *out = kvm_run_outputs_json(r2), *st = kvm_run_state_json(r2);
            cJSON *a = cJSON_Parse(out), *b = cJSON_Parse(want_out), *c = cJSON_Parse(st), *d = cJSON_Parse(want_st);
            if (!cJSON_Compare(a, b, true) || !cJSON_Compare(c, d, true))
                fail_msg("seed %d resumed after %d:\n %s\n %s\nwant\n %s\n %s", i + 1, step, out, st, want_out, want_st);
            cJSON_Delete(a);
            cJSON_Delete(b);
            cJSON_Delete(c);
            cJSON_Delete(d);
            kvm_free(out);
            kvm_free(st);
            resumed++;
        }
        kvm_free(want_out);
        kvm_free(want_st);
    }
    assert_int_equal(resumed, N * 3);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

/* ---- interrupts inside subgraphs ------------------------------------------------------------------------------- */

/* The child 'review' drafts (an agent), rolls math.random, asks (kvmesh.interrupt in its second super-step) and
 * polishes with the answer; the grandchild 'check' of 'audit' asks in its first super-step. The main graph starts,
 * reviews, audits, ends. */
static const char *ask_src =
    "local kvm = kvmesh\nlocal m = kvm.model('" KVM_SOURCE_DIR "/models/minillama-2m')\n"
    "local check = kvm.graph{ name = 'check', state = { ok = kvm.reduce.replace } }\n"
    "check:func('confirm', function(state) return { ok = kvm.interrupt({ q = 'sure?' }) } end)\n"
    "check:edge(kvm.START, 'confirm')\n"
    "local audit = kvm.graph{ name = 'audit', state = { ok = kvm.reduce.replace, note = kvm.reduce.replace } }\n"
    "audit:agent('look', { model = m, template = 'Look at {input}', max_tokens = 3, writes = 'note' })\n"
    "audit:subgraph('check', check, { output = { ok = 'ok' } })\n"
    "audit:edge(kvm.START, 'look')\naudit:edge('look', 'check')\n"
    "local review = kvm.graph{ name = 'review', state = { topic = kvm.reduce.replace, drafts = kvm.reduce.append,\n"
    "                         verdict = kvm.reduce.replace, roll = kvm.reduce.replace } }\n"
    "review:agent('draft', { model = m, template = 'Once upon a time {state.topic} said', max_tokens = 5, writes = 'drafts' })\n"
    "review:func('ask', function(state) return { roll = math.random(1, 1000000),\n"
    "  verdict = kvm.interrupt({ q = 'publish?', draft = state.drafts[1] }) } end)\n"
    "review:agent('polish', { model = m, template = 'Then {state.verdict} and {agent.draft}', max_tokens = 4, writes = 'drafts' })\n"
    "review:edge(kvm.START, 'draft')\nreview:edge('draft', 'ask')\nreview:edge('ask', 'polish')\n"
    "local g = kvm.graph{ name = 'main', state = { topic = kvm.reduce.replace, story = kvm.reduce.append, roll = kvm.reduce.replace,\n"
    "                     verdict = kvm.reduce.replace, ok = kvm.reduce.replace, n = kvm.reduce.sum } }\n"
    "g:func('start', function(state, last, ctx) return { topic = ctx.inputs.input, n = math.random(1, 9) } end)\n"
    "g:subgraph('review', review, { input = { topic = 'topic' }, output = { drafts = 'story', roll = 'roll', verdict = 'verdict' } })\n"
    "g:subgraph('audit', audit, { output = { ok = 'ok' } })\n"
    "g:agent('end', { model = m, template = 'The end of {input} was {state.verdict}', max_tokens = 3, writes = 'story' })\n"
    "g:edge(kvm.START, 'start')\ng:edge('start', 'review')\ng:edge('review', 'audit')\ng:edge('audit', 'end')\n"
    "return g\n";

/* Agent steps named `node` (as "trace show" names them, "review/draft") in the trace of dir. */
static int steps_of(const char *dir, const char *agent) {
    kvm_trace_reader_t *t = kvm_trace_reader_open(dir);
    assert_non_null(t);
    int n = 0;
    for (int i = 0; i < kvm_trace_reader_n_records(t); i++) {
        if (strcmp(kvm_trace_reader_record_type(t, i), "step")) continue;
        cJSON *o = cJSON_Parse(kvm_trace_reader_record_json(t, i));
        const cJSON *a = cJSON_GetObjectItem(o, "agent");
        n += cJSON_IsString(a) && !strcmp(a->valuestring, agent);
        cJSON_Delete(o);
    }
    kvm_trace_reader_free(t);
    return n;
}

/* Parks the run on the interrupt of node `want_node` (a subgraph's: "review/ask"); its payload contains want. */
static void assert_parked(kvm_run_t *r, const char *want_node, const char *want) {
    const char *msg = NULL;
    int st = kvm_run_status(r, &msg);
    if (st != KVM_EINTERRUPTED) fail_msg("not parked: %s %s", kvm_errname(st), msg ? msg : "");
    const char *node = NULL;
    char *payload = kvm_run_interrupt_json(r, &node);
    assert_non_null(payload);
    if (strcmp(node, want_node) || !strstr(payload, want)) fail_msg("parked on %s with %s; want %s with %s", node, payload, want_node, want);
    kvm_free(payload);
}

/* kvmesh.interrupt in a subgraph's node (and in a subgraph's subgraph) parks the whole run; kvm_run_resume answers it
 * where it stopped. From the trace of a run parked there, another process resumes with --answer: the resume continues
 * inside the child (its steps before the interrupt are not run again) and ends as the run answered in the process. */
static void test_interrupt_inside_a_subgraph_parks_the_run_and_resumes_inside_it(void **s) {
    (void)s;
    kvm_runtime_t *rt = runtime();
    kvm_workflow_t *wf = load(rt, ask_src);
    const char *words[] = {"cat", "owl", "fox"};
    for (int i = 0; i < 3; i++) {
        char in[64];
        snprintf(in, sizeof in, "{\"input\":\"%s\"}", words[i]);
        kvm_run_params_t p = kvm_run_default_params();
        p.inputs_json = in;
        p.seed = (uint64_t)i + 7;
        p.kv = "dense";
        kvm_run_t *r = kvm_run_start(wf, &p);
        assert_non_null(r);
        drive(rt);
        assert_int_equal(kvm_runtime_n_active(rt), 0);
        assert_parked(r, "review/ask", "\"q\":\"publish?\"");
        char dir1[512];
        snprintf(dir1, sizeof dir1, "%s", kvm_run_trace_dir(r));
        assert_int_equal(kvm_run_resume(r, "\"yes\""), 0);
        drive(rt);
        assert_parked(r, "audit/check/confirm", "\"q\":\"sure?\""); /* two levels down, in its first super-step */
        assert_int_equal(kvm_run_resume(r, "{\"sure\":true}"), 0);
        drive(rt);
        const char *msg = NULL;
        if (kvm_run_status(r, &msg) != 0) fail_msg("answered run: %s", msg ? msg : "?");
        char *want_out = kvm_run_outputs_json(r), *want_st = kvm_run_state_json(r);
        cJSON *st = cJSON_Parse(want_st);
        assert_string_equal(cJSON_GetObjectItem(st, "verdict")->valuestring, "yes");
        assert_true(cJSON_IsTrue(cJSON_GetObjectItem(cJSON_GetObjectItem(st, "ok"), "sure")));
        cJSON_Delete(st);

        /* the same run parked at the first question, in a process that stops there: resumed from its trace */
        kvm_run_t *r1 = kvm_run_start(wf, &p);
        drive(rt);
        assert_parked(r1, "review/ask", "publish?");
        char dir[512];
        snprintf(dir, sizeof dir, "%s", kvm_run_trace_dir(r1));
        kvm_run_cancel(r1, KVM_EINTERRUPTED, "parked"); /* as a CLI without an answer leaves it */
        kvm_run_params_t q = kvm_run_default_params();
        q.resume_trace = dir;
        q.answer_json = "\"yes\"";
        kvm_run_t *r2 = kvm_run_start(wf, &q);
        if (!r2) fail_msg("resume: %s", kvm_errmsg());
        drive(rt);
        assert_parked(r2, "audit/check/confirm", "sure?");
        char dir2[512];
        snprintf(dir2, sizeof dir2, "%s", kvm_run_trace_dir(r2));
        assert_int_equal(steps_of(dir2, "draft"), 0); /* continued inside 'review': its draft was not made again */
        assert_int_equal(steps_of(dir2, "polish"), 1);
        /* ... and that one parked again, two levels down: resumed from its own trace */
        kvm_run_cancel(r2, KVM_EINTERRUPTED, "parked");
        q.resume_trace = dir2;
        q.answer_json = "{\"sure\":true}";
        kvm_run_t *r3 = kvm_run_start(wf, &q);
        if (!r3) fail_msg("resume 2: %s", kvm_errmsg());
        drive(rt);
        assert_same_run(r3, want_out, want_st, "resumed twice from traces");
        assert_int_equal(steps_of(kvm_run_trace_dir(r3), "look"), 0); /* 'audit' continued after its look */
        assert_int_equal(steps_of(kvm_run_trace_dir(r3), "end"), 1);
        /* `kvmesh trace replay` of the twice-resumed run reproduces its step of the main graph ('end') */
        kvm_replay_t rep;
        assert_int_equal(kvm_trace_replay(rt, kvm_run_trace_dir(r3), &rep), 0);
        if (rep.status != 0 || rep.differ != 0 || rep.same != 1) fail_msg("replay: status %d, %d same, %d differ", rep.status, rep.same, rep.differ);
        kvm_replay_clear(&rep);
        assert_int_equal(kvm_trace_replay(rt, dir2, &rep), 0); /* the once-resumed one parks again where it did */
        if (rep.status != KVM_EINTERRUPTED || rep.differ != 0) fail_msg("replay 2: status %s, %d differ", kvm_errname(rep.status), rep.differ);
        kvm_replay_clear(&rep);
        /* without an answer, a resume asks the same question again */
        q.answer_json = NULL;
        kvm_run_t *r4 = kvm_run_start(wf, &q);
        drive(rt);
        assert_parked(r4, "audit/check/confirm", "sure?");
        kvm_run_cancel(r4, KVM_EINTERRUPTED, "parked");
        /* the first process's trace (answered in the process) resumes after the parent's super-step 2 to the same end:
           'audit' continues from its last checkpoint */
        q.resume_trace = dir1;
        q.resume_step = 2;
        kvm_run_t *r5 = kvm_run_start(wf, &q);
        drive(rt);
        assert_same_run(r5, want_out, want_st, "resumed from the trace of the run answered in the process");
        kvm_free(want_out);
        kvm_free(want_st);
    }
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

/* A subgraph's checkpoint that does not fit its graph (edited, or a script changed under it) fails the subgraph node
 * with a message naming the subgraph and the bad name; a garbled one is a clear read error; nothing crashes. */
static void test_a_bad_subgraph_checkpoint_is_a_clear_error(void **s) {
    (void)s;
    kvm_runtime_t *rt = runtime();
    kvm_workflow_t *wf = load(rt, ask_src);
    kvm_run_params_t p = kvm_run_default_params();
    p.inputs_json = "{\"input\":\"cat\"}";
    kvm_run_t *r = kvm_run_start(wf, &p);
    drive(rt);
    assert_parked(r, "review/ask", "publish?");
    char dir[512], path[600], bad[600], cmd[4096];
    snprintf(dir, sizeof dir, "%s", kvm_run_trace_dir(r));
    kvm_run_cancel(r, KVM_EINTERRUPTED, "parked");
    snprintf(path, sizeof path, "%s/events.jsonl", dir);
    struct {
        const char *sed, *want;
        int code;
    } cases[] = {
        {"/\"path\":\"review@2\"/s/\"next\":\\[\"ask\"\\]/\"next\":[\"nope\"]/", "checkpoint: next node 'nope' is not a node of graph 'review'",
         KVM_EINVAL},
        {"/\"t\":\"checkpoint\".*\"path\":\"review@2\"/s/\"v_resume\":true/\"v_resume\":false/", "written by a kvmesh without resume", KVM_EUNSUPPORTED},
        {"/\"t\":\"checkpoint\".*\"path\":\"review@2\"/s/\"state\":{/\"state\":[{/", NULL, 0}, /* garbled: not JSON any more */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        snprintf(bad, sizeof bad, "%s/bad%zu", g_root, i);
        snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s' && sed '%s' '%s' > '%s/events.jsonl'", bad, bad, cases[i].sed, path, bad);
        assert_int_equal(system(cmd), 0);
        kvm_run_params_t q = kvm_run_default_params();
        q.resume_trace = bad;
        q.answer_json = "\"yes\"";
        kvm_run_t *x = kvm_run_start(wf, &q);
        if (!cases[i].want) { /* the trace cannot be read: the start fails naming the line */
            if (x) {
                drive(rt);
                fail_msg("case %zu: a garbled checkpoint resumed (status %s)", i, kvm_errname(kvm_run_status(x, NULL)));
            }
            assert_non_null(strstr(kvm_errmsg(), "events.jsonl:"));
            continue;
        }
        if (!x) fail_msg("case %zu: %s", i, kvm_errmsg());
        drive(rt);
        const char *msg = NULL;
        int code = kvm_run_status(x, &msg);
        if (code != cases[i].code || !msg || !strstr(msg, cases[i].want) || !strstr(msg, "resuming subgraph 'review'"))
            fail_msg("case %zu: %s '%s'; want %s with '%s'", i, kvm_errname(code), msg ? msg : "", kvm_errname(cases[i].code), cases[i].want);
    }
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

/* ---- replay of runs with subgraphs ------------------------------------------------------------------------------ */

/* Agent steps at three levels (a subgraph's subgraph), a ctx:call from a child's func node, the same child run twice by
 * a loop of the main graph (its steps differ only by the parent's super-step) and math.random in a child. */
static const char *replay_src =
    "local kvm = kvmesh\nlocal m = kvm.model('" KVM_SOURCE_DIR "/models/minillama-2m')\n"
    "local inner = kvm.graph{ name = 'inner', state = { t = kvm.reduce.replace, notes = kvm.reduce.append } }\n"
    "inner:agent('deep', { model = m, template = 'Deep down {state.t} was', max_tokens = 3, writes = 'notes' })\n"
    "inner:edge(kvm.START, 'deep')\n"
    "local child = kvm.graph{ name = 'child', state = { topic = kvm.reduce.replace, drafts = kvm.reduce.append } }\n"
    "child:agent('draft', { model = m, template = 'Once upon a time {state.topic} said', max_tokens = 4, writes = 'drafts' })\n"
    "child:func('ask', function(state, last, ctx)\n"
    "  return { drafts = ctx:call('draft', { topic = 'x' }) .. ' ' .. math.random(1, 1000000) } end)\n"
    "child:subgraph('dig', inner, { input = { topic = 't' }, output = { notes = 'drafts' } })\n"
    "child:agent('polish', { model = m, template = 'Then {agent.draft} and', max_tokens = 3, writes = 'drafts' })\n"
    "child:edge(kvm.START, 'draft')\nchild:edge('draft', { 'ask', 'dig' })\nchild:edge('dig', 'polish')\n"
    "local g = kvm.graph{ name = 'main', state = { topic = kvm.reduce.replace, story = kvm.reduce.append, n = kvm.reduce.sum } }\n"
    "g:func('start', function(state, last, ctx) return { topic = ctx.inputs.input, n = 1 } end)\n"
    "g:subgraph('write', child, { input = { topic = 'topic' }, output = { drafts = 'story' } })\n"
    "g:func('count', function(state) return { n = 1 } end)\n"
    "g:agent('end', { model = m, template = 'The end of {input} came', max_tokens = 3, writes = 'story' })\n"
    "g:edge(kvm.START, 'start')\ng:edge('start', 'write')\ng:edge('write', 'count')\n"
    "g:route('count', function(state) return state.n < 4 and 'write' or 'end' end, { 'write', 'end' })\n"
    "g:limit{ steps = 20 }\nreturn g\n";

/* What a step record says: its agent (NULL for other nodes), its KV mode, its output text. */
typedef struct step_rec {
    char agent[64], mode[16], text[256];
} step_rec_t;

static int cmp_step(const void *a, const void *b) {
    const step_rec_t *x = a, *y = b;
    int c = strcmp(x->agent, y->agent);
    return c ? c : strcmp(x->text, y->text);
}

static int read_steps(const char *dir, step_rec_t *out, int cap) {
    kvm_trace_reader_t *t = kvm_trace_reader_open(dir);
    assert_non_null(t);
    int n = 0;
    for (int i = 0; i < kvm_trace_reader_n_records(t) && n < cap; i++) {
        if (strcmp(kvm_trace_reader_record_type(t, i), "step")) continue;
        cJSON *o = cJSON_Parse(kvm_trace_reader_record_json(t, i));
        const cJSON *a = cJSON_GetObjectItem(o, "agent"), *kv = cJSON_GetObjectItem(o, "kv");
        const cJSON *mode = kv ? cJSON_GetObjectItem(kv, "mode") : NULL, *text = cJSON_GetObjectItem(o, "output");
        if (cJSON_IsObject(text)) text = cJSON_GetObjectItem(text, "text");
        snprintf(out[n].agent, sizeof out[n].agent, "%s", cJSON_IsString(a) ? a->valuestring : "");
        snprintf(out[n].mode, sizeof out[n].mode, "%s", cJSON_IsString(mode) ? mode->valuestring : "");
        snprintf(out[n].text, sizeof out[n].text, "%s", cJSON_IsString(text) ? text->valuestring : "");
        n++;
        cJSON_Delete(o);
    }
    kvm_trace_reader_free(t);
    return n;
}

/* A replay from each step of a run with subgraphs (greedy, dense) reproduces the run: the agent steps before it, nested
 * ones included, are given their recorded outputs (KV mode "given"), and the steps from it on are generated again to
 * the same outputs. A nested step's output edited by a replay is what its step says in the replay. */
static void test_replay_from_every_step_of_a_subgraph_run_reproduces_it(void **s) {
    (void)s;
    kvm_runtime_t *rt = runtime();
    kvm_workflow_t *wf = load(rt, replay_src);
    kvm_run_params_t p = kvm_run_default_params();
    p.inputs_json = "{\"input\":\"owl\"}";
    p.seed = 5;
    p.kv = "dense";
    kvm_run_t *r = kvm_run_start(wf, &p);
    assert_non_null(r);
    drive(rt);
    const char *msg = NULL;
    if (kvm_run_status(r, &msg) != 0) fail_msg("run: %s", msg ? msg : "?");
    char *want_out = kvm_run_outputs_json(r), *want_st = kvm_run_state_json(r);
    char dir[512];
    snprintf(dir, sizeof dir, "%s", kvm_run_trace_dir(r));
    enum { CAP = 96 };
    step_rec_t *orig = calloc(CAP, sizeof *orig), *rep = calloc(CAP, sizeof *rep);
    int n = read_steps(dir, orig, CAP);
    int nested_agents = 0;
    for (int i = 0; i < n; i++) nested_agents += !strcmp(orig[i].agent, "deep") || !strcmp(orig[i].agent, "polish");
    assert_int_equal(nested_agents, 6); /* the child ran 3 times, each with its subgraph */
    assert_true(n > 20);
    step_rec_t *sorted = calloc(CAP, sizeof *sorted);
    memcpy(sorted, orig, CAP * sizeof *orig);
    qsort(sorted, (size_t)n, sizeof *sorted, cmp_step);
    kvm_workflow_t *wt = kvm_workflow_load_trace(rt, dir, NULL);
    assert_non_null(wt);
    for (int step = 0; step < n; step++) {
        kvm_run_params_t q = kvm_run_default_params();
        q.resume_trace = dir;
        q.replay = true;
        q.replay_step = step;
        kvm_run_t *x = kvm_run_start(wt, &q);
        if (!x) fail_msg("replay from %d: %s", step, kvm_errmsg());
        drive(rt);
        char what[64];
        snprintf(what, sizeof what, "replay from step %d", step);
        assert_same_run(x, want_out, want_st, what);
        int m = read_steps(kvm_run_trace_dir(x), rep, CAP);
        assert_int_equal(m, n);
        int given = 0, want_given = 0;
        for (int i = 0; i < n; i++) { /* the same steps (those of one super-step may be recorded in another order) */
            given += !strcmp(rep[i].mode, "given");
            want_given += i < step && *orig[i].agent;
        }
        qsort(rep, (size_t)n, sizeof *rep, cmp_step);
        for (int i = 0; i < n; i++)
            if (strcmp(rep[i].agent, sorted[i].agent) || strcmp(rep[i].text, sorted[i].text))
                fail_msg("%s: step %s '%s', want %s '%s'", what, rep[i].agent, rep[i].text, sorted[i].agent, sorted[i].text);
        if (given != want_given) fail_msg("%s: %d steps given, want %d", what, given, want_given);
    }
    /* an edited nested step: the third 'deep' step says the edit in the replay */
    int third = -1;
    for (int i = 0, k = 0; i < n && third < 0; i++)
        if (!strcmp(orig[i].agent, "deep") && ++k == 3) third = i;
    assert_true(third > 0);
    kvm_run_params_t q = kvm_run_default_params();
    q.resume_trace = dir;
    q.replay = true;
    q.replay_step = third;
    q.replay_output = "EDITED deep note";
    kvm_run_t *x = kvm_run_start(wt, &q);
    assert_non_null(x);
    drive(rt);
    assert_int_equal(kvm_run_status(x, NULL), 0);
    int m = read_steps(kvm_run_trace_dir(x), rep, CAP), edited = 0;
    for (int i = 0; i < m; i++) edited += !strcmp(rep[i].agent, "deep") && !strcmp(rep[i].text, "EDITED deep note");
    assert_int_equal(edited, 1);
    char *st = kvm_run_state_json(x);
    assert_non_null(strstr(st, "EDITED deep note")); /* mapped out to the parent's story */
    kvm_free(st);
    free(orig);
    free(rep);
    free(sorted);
    kvm_free(want_out);
    kvm_free(want_st);
    kvm_workflow_free(wt);
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_state_is_mapped_in_and_out_through_the_parents_reducers),
        cmocka_unit_test(test_bad_subgraphs_are_refused_at_load_naming_the_line),
        cmocka_unit_test(test_a_failing_subgraph_fails_its_node),
        cmocka_unit_test(test_hostile_subgraphs_end_with_clear_errors),
        cmocka_unit_test(test_child_steps_are_traced_as_nested_steps),
        cmocka_unit_test(test_resume_from_the_parents_checkpoints_reproduces_the_run),
        cmocka_unit_test(test_interrupt_inside_a_subgraph_parks_the_run_and_resumes_inside_it),
        cmocka_unit_test(test_a_bad_subgraph_checkpoint_is_a_clear_error),
        cmocka_unit_test(test_replay_from_every_step_of_a_subgraph_run_reproduces_it),
    };
    return cmocka_run_group_tests(tests, workflow_root_setup, workflow_root_teardown);
}
