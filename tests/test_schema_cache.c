/* test_schema_cache.c - the error-schema cache and blame (runtime/trace/trace_cache.c, trace_sig.c; docs/correct.md):
 * agent normalisation, error templates, retrieval and its exclusions, insert / merge / group thresholds, eviction
 * and its pins, the snapshot (round trip byte for byte, torn and corrupted files set aside), the triage's blame
 * shift, and a run's trace read as a failure. */
#include <math.h>
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

#include "runtime/core/core.h"
#include "runtime/core/rng.h"
#include "runtime/trace/trace.h"
#include "runtime/trace/trace_cache.h"
#include "runtime/trace/trace_sig.h"

static char root[256];

static int setup(void **s) {
    (void)s;
    snprintf(root, sizeof root, "%s/test_schema_cache_%d", KVM_BINARY_DIR, (int)getpid());
    return mkdir(root, 0755);
}

static int teardown(void **s) {
    (void)s;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    return system(cmd) == 0 ? 0 : 0;
}

/* A synthetic failure: n steps over agents a[], the words of topic in every step, an error at err_step (-1: none). */
typedef struct fx {
    kvm_failure_step_t steps[12];
    char text[12][512];
    char id[32];
    kvm_failure_t f;
} fx_t;

static void fx_make(fx_t *x, const char *id, const char *topic, int n, int gold, const char *extra_at_gold) {
    static const char *const agents[] = {"Planner", "Coder", "Computer_terminal", "Critic"};
    memset(x, 0, sizeof *x);
    snprintf(x->id, sizeof x->id, "%s", id);
    for (int t = 0; t < n; t++) {
        snprintf(x->text[t], sizeof x->text[t], "step about %s %s %s number %c%c then %s%s", topic, topic, agents[t % 4],
                 'a' + t, 'a' + (t * 7) % 26, topic, t == gold && extra_at_gold ? extra_at_gold : "");
        x->steps[t] = (kvm_failure_step_t){.agent = agents[t % 4], .content = x->text[t], .tool_result = t % 4 == 2};
    }
    x->f = (kvm_failure_t){.id = x->id, .question = topic, .steps = x->steps, .n_steps = n,
                           .gold_agent = agents[gold % 4], .gold_step = gold};
}

static kvm_schema_cache_t *mem_cache(void) {
    kvm_schema_cache_t *c = kvm_schema_cache_open(NULL, NULL);
    assert_non_null(c);
    return c;
}

/* ---- signatures ----------------------------------------------------------------------------------------- */

static void test_agent_labels_lose_their_suffix_and_case(void **s) {
    (void)s;
    char out[64];
    kvm_agent_normalize("Orchestrator (thought)", out, sizeof out);
    assert_string_equal(out, "orchestrator");
    kvm_agent_normalize("Orchestrator (-> WebSurfer)", out, sizeof out);
    assert_string_equal(out, "orchestrator");
    kvm_agent_normalize("  Websurfer ", out, sizeof out);
    assert_string_equal(out, "websurfer");
    kvm_agent_normalize("WebSurfer", out, sizeof out);
    assert_string_equal(out, "websurfer");
    kvm_agent_normalize("Excel_Expert", out, sizeof out);
    assert_string_equal(out, "excel_expert");
    kvm_agent_normalize(NULL, out, sizeof out);
    assert_string_equal(out, "");
}

static void test_error_templates_mask_numbers_paths_urls_quotes_and_hex(void **s) {
    (void)s;
    char *t = tsig_mask_line("TimeoutError: Page.goto: Timeout 60000ms exceeded.", 51);
    assert_string_equal(t, "TimeoutError: Page.goto: Timeout <N>ms exceeded.");
    kvm_free(t);
    const char *l = "FileNotFoundError: [Errno 2] No such file or directory: '/tmp/a.csv' at https://x.org/a?b=1 0xdeadBEEF";
    t = tsig_mask_line(l, strlen(l));
    assert_string_equal(t, "FileNotFoundError: [Errno <N>] No such file or directory: <S> at <URL> <HEX>");
    kvm_free(t);
    l = "open (/home/u/x.py) failed   id 9f3a0c1e22b4 v2 open(./x)";
    t = tsig_mask_line(l, strlen(l));
    assert_string_equal(t, "open (<PATH>) failed id <HEX> v<N> open(./x)"); /* a path is a whole token */
    kvm_free(t);
    /* an executor's output: the first line; a traceback: its last line */
    t = tsig_error_template("exitcode: 1 (execution failed)\nCode output: nothing", false);
    assert_string_equal(t, "exitcode: <N> (execution failed)");
    kvm_free(t);
    t = tsig_error_template("ran\nTraceback (most recent call last):\n  File \"x.py\", line 3\nKeyError: 'year'\n\n", false);
    assert_string_equal(t, "KeyError: <S>");
    kvm_free(t);
    assert_null(tsig_error_template("all good, 42 rows", false));
}

static void test_flags_mark_fabrication_repeats_and_ungrounded_numbers(void **s) {
    (void)s;
    kvm_failure_step_t st[] = {
        {.agent = "user", .content = "Sum the 12 values"},
        {.agent = "Planner", .content = "We use the 12 values"},
        {.agent = "Coder", .content = "Let us assume sample data: the total is 4711"},
        {.agent = "Coder", .content = "Let us assume sample data: the total is 4711"},
    };
    kvm_failure_t f = {.question = "Sum the 12 values", .steps = st, .n_steps = 4};
    tsig_minhash_fns_t fns;
    tsig_minhash_fns_default(&fns);
    tsig_t sig;
    assert_int_equal(tsig_build(&f, &fns, 512, &sig), 0);
    assert_false(sig.flags[1] & TSIG_UNGROUNDED); /* 12 is in the question */
    assert_true(sig.flags[2] & TSIG_UNGROUNDED);  /* 4711 is new */
    assert_true(sig.flags[2] & TSIG_FABRICATION);
    assert_false(sig.flags[2] & TSIG_REPEAT);
    assert_true(sig.flags[3] & TSIG_REPEAT);
    assert_false(sig.flags[3] & TSIG_UNGROUNDED); /* said before */
    assert_string_equal(sig.agent[1], "planner");
    tsig_free(&sig);
}

/* ---- retrieval ----------------------------------------------------------------------------------------- */

static void test_a_query_retrieves_the_most_similar_failure_but_never_itself(void **s) {
    (void)s;
    kvm_schema_cache_t *c = mem_cache();
    const char *topics[] = {"invoices", "weather", "chess", "genome"};
    fx_t x;
    for (int i = 0; i < 4; i++) {
        char id[16];
        snprintf(id, sizeof id, "t%d", i);
        fx_make(&x, id, topics[i], 8, 1 + i, NULL);
        assert_int_equal(kvm_schema_cache_insert(c, &x.f, true), i);
    }
    fx_make(&x, "q", "chess", 8, 3, NULL); /* like t2 */
    kvm_blame_params_t p = kvm_blame_default_params();
    p.count_hit = false;
    kvm_blame_t b;
    assert_int_equal(kvm_blame(c, &x.f, &p, &b), 0);
    assert_true(b.n_schemata >= 1);
    assert_int_equal(b.schema_ids[0], 2);
    assert_true(b.schema_scores[0] > b.schema_scores[1]);
    fx_make(&x, "t2", "chess", 8, 3, NULL); /* t2 itself: excluded */
    assert_int_equal(kvm_blame(c, &x.f, &p, &b), 0);
    for (int i = 0; i < b.n_schemata; i++) assert_int_not_equal(b.schema_ids[i], 2);
    kvm_schema_cache_free(c);
}

static void test_the_same_task_family_is_never_retrieved(void **s) {
    (void)s;
    kvm_schema_cache_t *c = mem_cache();
    fx_t x;
    fx_make(&x, "a", "chess", 8, 2, NULL);
    x.f.family = "task7";
    assert_int_equal(kvm_schema_cache_insert(c, &x.f, true), 0);
    fx_make(&x, "b", "chess", 8, 2, NULL);
    x.f.family = "task7";
    kvm_blame_t b;
    assert_int_equal(kvm_blame(c, &x.f, NULL, &b), 0);
    assert_int_equal(b.n_schemata, 0);
    x.f.family = "task8";
    assert_int_equal(kvm_blame(c, &x.f, NULL, &b), 0);
    assert_int_equal(b.n_schemata, 1);
    kvm_schema_cache_free(c);
}

static void test_lsh_candidates_find_near_duplicates_above_the_bruteforce_size(void **s) {
    (void)s;
    kvm_schema_cache_params_t cp = kvm_schema_cache_default_params();
    cp.bruteforce_max = 4; /* the LSH path from 5 entries on */
    kvm_schema_cache_t *c = kvm_schema_cache_open(NULL, &cp);
    assert_non_null(c);
    const char *topics[] = {"invoices", "weather", "chess", "genome", "rivers", "poetry", "orbits", "tariffs"};
    fx_t x;
    for (int i = 0; i < 8; i++) {
        char id[16];
        snprintf(id, sizeof id, "t%d", i);
        fx_make(&x, id, topics[i], 10, 1, NULL);
        assert_true(kvm_schema_cache_insert(c, &x.f, true) >= 0);
    }
    fx_make(&x, "q", "orbits", 10, 1, NULL); /* a near-duplicate of t6 */
    kvm_blame_t b;
    assert_int_equal(kvm_blame(c, &x.f, NULL, &b), 0);
    assert_true(b.n_schemata >= 1);
    assert_int_equal(b.schema_ids[0], 6);
    kvm_schema_cache_free(c);
}

/* ---- insert / merge / group / evict ------------------------------------------------------------------------ */

static void test_near_duplicates_merge_and_a_novel_failure_starts_a_group(void **s) {
    (void)s;
    kvm_schema_cache_t *c = mem_cache();
    fx_t x;
    fx_make(&x, "a", "invoices", 8, 2, NULL);
    assert_int_equal(kvm_schema_cache_insert(c, &x.f, false), 0);
    fx_make(&x, "b", "invoices", 8, 2, NULL); /* the same text: SimHash distance 0 */
    assert_int_equal(kvm_schema_cache_insert(c, &x.f, false), 0);
    kvm_schema_cache_stats_t st;
    kvm_schema_cache_stats(c, &st);
    assert_int_equal(st.entries, 1);
    char *j = kvm_schema_cache_entry_json(c, 0);
    assert_non_null(strstr(j, "\"support\":\t2"));
    kvm_free(j);
    /* a novel failure: a new group */
    fx_make(&x, "c", "volcanic basalt eruption", 8, 2, NULL);
    int id = kvm_schema_cache_insert(c, &x.f, false);
    assert_int_equal(id, 1);
    kvm_schema_cache_stats(c, &st);
    assert_int_equal(st.entries, 2);
    assert_int_equal(st.groups, 2);
    /* one step reworded: S ~ 0.67, but the SimHash is within 3 bits: merged */
    fx_make(&x, "d", "invoices", 8, 2, NULL);
    strcat(x.text[0], " zebra yak xylophone walrus");
    assert_int_equal(kvm_schema_cache_insert(c, &x.f, false), 0);
    kvm_schema_cache_free(c);
}

static void test_the_insert_rule_crosses_at_0_60_and_0_92(void **s) {
    (void)s;
    assert_int_equal(tcache_decide(0.10, 64), TCACHE_NEW_GROUP);
    assert_int_equal(tcache_decide(0.5999, 4), TCACHE_NEW_GROUP);
    assert_int_equal(tcache_decide(0.60, 4), TCACHE_SAME_GROUP);
    assert_int_equal(tcache_decide(0.9199, 10), TCACHE_SAME_GROUP);
    assert_int_equal(tcache_decide(0.92, 10), TCACHE_MERGE);
    assert_int_equal(tcache_decide(0.10, 3), TCACHE_MERGE);
    assert_int_equal(tcache_decide(0.10, 0), TCACHE_MERGE);
}

static void test_eviction_keeps_pinned_and_human_labelled_entries(void **s) {
    (void)s;
    kvm_schema_cache_params_t cp = kvm_schema_cache_default_params();
    cp.max_entries = 3;
    kvm_schema_cache_t *c = kvm_schema_cache_open(NULL, &cp);
    assert_non_null(c);
    const char *topics[] = {"invoices", "weather", "chess", "genome", "rivers", "poetry"};
    fx_t x;
    for (int i = 0; i < 6; i++) {
        char id[16];
        snprintf(id, sizeof id, "t%d", i);
        fx_make(&x, id, topics[i], 8, 1, NULL);
        x.f.human_label = i == 0;
        int e = kvm_schema_cache_insert(c, &x.f, false);
        assert_int_equal(e, i);
        if (i == 1) assert_int_equal(kvm_schema_cache_pin(c, 1, true), 0);
    }
    int ids[8];
    assert_int_equal(kvm_schema_cache_ids(c, ids, 8), 3);
    assert_int_equal(ids[0], 0); /* human label */
    assert_int_equal(ids[1], 1); /* pinned */
    assert_int_equal(ids[2], 5); /* the newest (ties: the oldest goes first) */
    kvm_schema_cache_stats_t st;
    kvm_schema_cache_stats(c, &st);
    assert_int_equal(st.tombstones, 3);
    assert_false(st.over_limits);
    assert_int_equal(kvm_schema_cache_pin(c, 3, true), KVM_ENOENT); /* evicted */
    kvm_schema_cache_free(c);
}

static void test_an_unlabelled_failure_is_refused(void **s) {
    (void)s;
    kvm_schema_cache_t *c = mem_cache();
    fx_t x;
    fx_make(&x, "a", "chess", 8, 2, NULL);
    x.f.gold_step = 8;
    assert_int_equal(kvm_schema_cache_insert(c, &x.f, false), KVM_EINVAL);
    x.f.gold_step = 2, x.f.gold_agent = NULL;
    assert_int_equal(kvm_schema_cache_insert(c, &x.f, false), KVM_EINVAL);
    kvm_schema_cache_free(c);
}

/* ---- persistence ------------------------------------------------------------------------------------------ */

static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)len + 1);
    assert_int_equal(fread(b, 1, (size_t)len, f), (size_t)len);
    b[len] = '\0';
    fclose(f);
    *n = (size_t)len;
    return b;
}

static void fill(kvm_schema_cache_t *c) {
    const char *topics[] = {"invoices", "weather", "chess", "genome"};
    fx_t x;
    for (int i = 0; i < 4; i++) {
        char id[16];
        snprintf(id, sizeof id, "t%d", i);
        fx_make(&x, id, topics[i], 8, 1 + i, i == 2 ? "\nTraceback (most recent call last):\nKeyError: 'col_7'" : NULL);
        assert_true(kvm_schema_cache_insert(c, &x.f, false) >= 0);
    }
}

static void test_a_saved_cache_reopens_with_the_same_entries_and_bytes(void **s) {
    (void)s;
    char dir[512], path[600];
    snprintf(dir, sizeof dir, "%s/persist", root);
    snprintf(path, sizeof path, "%s/schemas.snap", dir);
    kvm_schema_cache_t *c = kvm_schema_cache_open(dir, NULL);
    assert_non_null(c);
    fill(c);
    fx_t q;
    fx_make(&q, "q", "chess", 8, 3, NULL);
    kvm_blame_params_t p = kvm_blame_default_params();
    p.count_hit = false;
    kvm_blame_t b1, b2;
    assert_int_equal(kvm_blame(c, &q.f, &p, &b1), 0);
    assert_int_equal(kvm_schema_cache_save(c), 0);
    kvm_schema_cache_free(c);
    size_t n1, n2;
    char *a = slurp(path, &n1);
    assert_non_null(a);
    c = kvm_schema_cache_open(dir, NULL);
    assert_non_null(c);
    kvm_schema_cache_stats_t st;
    kvm_schema_cache_stats(c, &st);
    assert_int_equal(st.entries, 4);
    assert_int_equal(kvm_blame(c, &q.f, &p, &b2), 0);
    assert_int_equal(b1.n_schemata, b2.n_schemata);
    for (int i = 0; i < b1.n_schemata; i++) {
        assert_int_equal(b1.schema_ids[i], b2.schema_ids[i]);
        assert_true(b1.schema_scores[i] == b2.schema_scores[i]);
    }
    assert_int_equal(b1.step, b2.step);
    assert_int_equal(kvm_schema_cache_save(c), 0); /* load + save: the same bytes */
    kvm_schema_cache_free(c);
    char *b = slurp(path, &n2);
    assert_int_equal(n1, n2);
    assert_memory_equal(a, b, n1);
    free(a);
    free(b);
}

/* Writes the first n bytes of data as path. */
static void write_bytes(const char *path, const char *data, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

static void test_a_torn_or_corrupted_snapshot_is_set_aside_and_the_cache_starts_empty(void **s) {
    (void)s;
    char dir[512], path[600], bad[700];
    snprintf(dir, sizeof dir, "%s/torn", root);
    snprintf(path, sizeof path, "%s/schemas.snap", dir);
    snprintf(bad, sizeof bad, "%s.bad", path);
    kvm_schema_cache_t *c = kvm_schema_cache_open(dir, NULL);
    fill(c);
    assert_int_equal(kvm_schema_cache_save(c), 0);
    kvm_schema_cache_free(c);
    size_t n;
    char *good = slurp(path, &n);
    kvm_log_set_level(KVM_LOG_OFF); /* the warnings are expected */
    /* cut at several points (a crash without the rename would never leave this, a disk fault could) */
    size_t cuts[] = {0, 1, n / 3, n / 2, n - 2, n - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof *cuts; i++) {
        write_bytes(path, good, cuts[i]);
        remove(bad);
        c = kvm_schema_cache_open(dir, NULL);
        assert_non_null(c);
        kvm_schema_cache_stats_t st;
        kvm_schema_cache_stats(c, &st);
        assert_int_equal(st.entries, 0);
        assert_true(cuts[i] == 0 || access(bad, F_OK) == 0); /* an empty file is set aside too, when it exists */
        kvm_schema_cache_free(c);
    }
    /* one flipped byte in an entry: the checksum */
    char *flip = malloc(n);
    memcpy(flip, good, n);
    char *hit = strstr(flip, "invoices");
    assert_non_null(hit);
    hit[0] = 'I';
    write_bytes(path, flip, n);
    remove(bad);
    c = kvm_schema_cache_open(dir, NULL);
    kvm_schema_cache_stats_t st;
    kvm_schema_cache_stats(c, &st);
    assert_int_equal(st.entries, 0);
    assert_int_equal(access(bad, F_OK), 0);
    assert_int_equal(access(path, F_OK), -1);
    kvm_schema_cache_free(c);
    /* the intact file loads */
    write_bytes(path, good, n);
    c = kvm_schema_cache_open(dir, NULL);
    kvm_schema_cache_stats(c, &st);
    assert_int_equal(st.entries, 4);
    kvm_schema_cache_free(c);
    kvm_log_set_level(KVM_LOG_WARN);
    free(flip);
    free(good);
}

/* ---- blame ------------------------------------------------------------------------------------------------ */

static void test_triage_blames_the_step_whose_tool_call_failed_and_never_the_task(void **s) {
    (void)s;
    kvm_failure_step_t st[] = {
        {.agent = "user", .content = "Find the year column total; TERMINATE when done. 9999 77"},
        {.agent = "Planner", .content = "Plan: load the table and sum it"},
        {.agent = "Coder", .content = "df['yr'].sum()"},
        {.agent = "Computer_terminal", .content = "exitcode: 1 (execution failed)\nKeyError: 'yr'", .tool_result = true},
        {.agent = "Critic", .content = "The code failed on the column name"},
    };
    kvm_failure_t f = {.id = "x", .question = "Find the year column total", .steps = st, .n_steps = 5};
    kvm_blame_t b;
    assert_int_equal(kvm_blame(NULL, &f, NULL, &b), 0);
    assert_int_equal(b.step, 2);
    assert_string_equal(b.agent, "coder");
    assert_int_equal(b.n_cand, 3);
    assert_non_null(strstr(b.cand[0].evidence, "the next tool result failed"));
    for (int i = 0; i < b.n_cand; i++) assert_int_not_equal(b.cand[i].step, 0);
    /* the prior baseline: the most active agent (not the executor, not the user), its first step */
    kvm_blame_params_t p = kvm_blame_default_params();
    p.method = KVM_BLAME_PRIOR;
    assert_int_equal(kvm_blame(NULL, &f, &p, &b), 0);
    assert_int_equal(b.step, 1);
    assert_string_equal(b.agent, "planner");
    /* bad params and an empty failure */
    p.k = KVM_BLAME_MAX_K + 1;
    assert_int_equal(kvm_blame(NULL, &f, &p, &b), KVM_EINVAL);
    kvm_failure_t none = {.id = "n"};
    assert_int_equal(kvm_blame(NULL, &none, NULL, &b), 0);
    assert_int_equal(b.step, -1);
}

static void test_a_warm_cache_moves_the_blame_to_the_known_error_kind(void **s) {
    (void)s;
    /* two fabrication-like steps and an UNGROUNDED one; the cache knows that "placeholder" marks the culprit */
    kvm_schema_cache_t *c = mem_cache();
    fx_t x;
    for (int i = 0; i < 5; i++) {
        char id[16];
        snprintf(id, sizeof id, "p%d", i);
        fx_make(&x, id, "ledger", 8, 5, " we fill in a placeholder here");
        assert_true(kvm_schema_cache_insert(c, &x.f, true) >= 0);
    }
    fx_make(&x, "q", "ledger", 8, 5, " we fill in a placeholder here");
    snprintf(x.text[1], sizeof x.text[1], "the amount is 123456 by my count"); /* ungrounded, earlier */
    kvm_blame_t cold, warm;
    assert_int_equal(kvm_blame(NULL, &x.f, NULL, &cold), 0);
    assert_int_equal(cold.step, 1);
    assert_int_equal(kvm_blame(c, &x.f, NULL, &warm), 0);
    assert_int_equal(warm.step, 5);
    assert_int_equal(warm.n_schemata, 5);
    /* confirmed: every schema shown blamed the coder: helpful; a confirmation of another agent: misleading */
    assert_int_equal(kvm_schema_cache_feedback(c, &warm, &x.f), 5);
    x.f.gold_step = 0, x.f.gold_agent = "Planner";
    assert_int_equal(kvm_schema_cache_feedback(c, &warm, &x.f), 0);
    char *j = kvm_schema_cache_entry_json(c, warm.schema_ids[0]);
    assert_non_null(strstr(j, "\"helpful\":\t1"));
    assert_non_null(strstr(j, "\"misleading\":\t1"));
    kvm_free(j);
    x.f.gold_agent = NULL;
    assert_int_equal(kvm_schema_cache_feedback(c, &warm, &x.f), KVM_EINVAL);
    kvm_schema_cache_free(c);
}

static void test_a_traced_run_reads_as_a_failure_with_the_task_at_step_0(void **s) {
    (void)s;
    kvm_trace_t *t = kvm_trace_open(root, "run1");
    assert_non_null(t);
    kvm_trace_run_start_t rs = {.run_id = "abc", .inputs_json = "{\"q\":\"sum it\"}", .source = "", .workflow_path = "w.lua"};
    assert_int_equal(kvm_trace_write_run_start(t, &rs), 0);
    kvm_trace_step_t a = {.idx = 0, .node = "planner", .agent = "planner", .op = "chat", .output_text = "plan A"};
    kvm_trace_step_t b = {.idx = 1, .node = "calc", .op = "tool", .error = {.code = KVM_ELUA_RUNTIME, .message = "boom"}};
    assert_int_equal(kvm_trace_write_step(t, &a), 0);
    assert_int_equal(kvm_trace_write_step(t, &b), 0);
    char dir[512];
    snprintf(dir, sizeof dir, "%s", t->dir);
    kvm_trace_close(t);
    kvm_failure_t *f = kvm_failure_from_trace(dir);
    assert_non_null(f);
    assert_int_equal(f->n_steps, 3);
    assert_string_equal(f->id, "abc");
    assert_string_equal(f->steps[0].agent, "user");
    assert_string_equal(f->steps[0].content, "{\"q\":\"sum it\"}");
    assert_string_equal(f->steps[1].agent, "planner");
    assert_string_equal(f->steps[1].content, "plan A");
    assert_false(f->steps[1].tool_result);
    assert_string_equal(f->steps[2].agent, "calc");
    assert_true(f->steps[2].tool_result);
    assert_true(f->steps[2].error);
    assert_string_equal(f->steps[2].content, "boom");
    kvm_failure_free(f);
    char nope[600];
    snprintf(nope, sizeof nope, "%s/nope", root);
    assert_null(kvm_failure_from_trace(nope));
}


/* ---- hostile snapshots and out of memory ------------------------------------------------------------------- */

/* Rewrites the trailer of a snapshot text (its last line) for the bytes before it, so that a mutation reaches the
 * parser instead of the checksum. Returns the new length. */
static size_t fix_trailer(char *buf, size_t n, size_t cap) {
    size_t body = n;
    if (body && buf[body - 1] == '\n') body--;
    while (body > 0 && buf[body - 1] != '\n') body--;
    int entries = 0;
    for (size_t i = 0; i < body; i++) entries += buf[i] == '\n';
    char tr[96];
    int k = snprintf(tr, sizeof tr, "{\"end\":%d,\"fnv1a\":\"%016llx\"}\n", entries > 0 ? entries - 1 : 0,
                     (unsigned long long)tsig_fnv1a(buf, body));
    if (body + (size_t)k > cap) return n;
    memcpy(buf + body, tr, (size_t)k);
    return body + (size_t)k;
}

static void test_mutated_snapshots_with_valid_checksums_never_crash_the_loader(void **s) {
    (void)s;
    char dir[512], path[600];
    snprintf(dir, sizeof dir, "%s/mut", root);
    snprintf(path, sizeof path, "%s/schemas.snap", dir);
    kvm_schema_cache_t *c = kvm_schema_cache_open(dir, NULL);
    fill(c);
    assert_int_equal(kvm_schema_cache_save(c), 0);
    kvm_schema_cache_free(c);
    size_t n;
    char *good = slurp(path, &n);
    size_t cap = n + 4096;
    char *buf = malloc(cap);
    uint64_t st = 1234;
    kvm_log_set_level(KVM_LOG_OFF);
    int loaded = 0, set_aside = 0;
    fx_t q;
    fx_make(&q, "q", "chess", 8, 3, NULL);
    for (int i = 0; i < 500; i++) {
        memcpy(buf, good, n);
        size_t len = n;
        int edits = 1 + (int)(kvm_splitmix64_next(&st) % 4);
        for (int e = 0; e < edits; e++) {
            size_t at = kvm_splitmix64_next(&st) % len;
            static const char alphabet[] = "0123456789-.eE\"{}[]:,\\ nul\x01\xff";
            switch (kvm_splitmix64_next(&st) % 3) {
            case 0: buf[at] = alphabet[kvm_splitmix64_next(&st) % (sizeof alphabet - 1)]; break;
            case 1: memmove(buf + at, buf + at + 1, len - at - 1), len--; break; /* delete a byte */
            default: /* a digit run made huge or negative */
                if (len + 12 < cap) {
                    memmove(buf + at + 12, buf + at, len - at);
                    memcpy(buf + at, "-99999999999", 12);
                    len += 12;
                }
            }
        }
        len = fix_trailer(buf, len, cap);
        write_bytes(path, buf, len);
        c = kvm_schema_cache_open(dir, NULL);
        assert_non_null(c);
        kvm_schema_cache_stats_t stc;
        kvm_schema_cache_stats(c, &stc);
        if (stc.entries) loaded++;
        else set_aside++;
        kvm_blame_t b; /* whatever loaded must be usable */
        assert_int_equal(kvm_blame(c, &q.f, NULL, &b), 0);
        if (i % 50 == 0) assert_int_equal(kvm_schema_cache_save(c), 0); /* and what loaded saves (fsync: not every time) */
        kvm_schema_cache_free(c);
        char badp[700];
        snprintf(badp, sizeof badp, "%s.bad", path);
        remove(badp);
    }
    kvm_log_set_level(KVM_LOG_WARN);
    assert_true(loaded > 0);    /* some mutations (inside strings) still load */
    assert_true(set_aside > 0); /* most do not */
    free(buf);
    free(good);
}

/* Every allocation of open (with a snapshot) + insert + blame + save made to fail in turn: an error or the clean
 * result, never a crash or a leak, and the snapshot on disk stays loadable. */
static int oom_op(const char *dir) {
    kvm_schema_cache_t *c = kvm_schema_cache_open(dir, NULL);
    if (!c) return kvm_errcode() ? kvm_errcode() : -1;
    fx_t x;
    fx_make(&x, "new", "weather", 8, 2, "\nTraceback (most recent call last):\nValueError: bad 'x' at 0x1f");
    int rc = kvm_schema_cache_insert(c, &x.f, false);
    kvm_blame_t b;
    if (rc >= 0) rc = kvm_blame(c, &x.f, NULL, &b);
    if (rc >= 0) rc = kvm_schema_cache_feedback(c, &b, &x.f);
    if (rc >= 0) rc = kvm_schema_cache_save(c);
    kvm_schema_cache_free(c);
    return rc < 0 ? rc : 0;
}

static void test_out_of_memory_anywhere_is_an_error_without_a_leak(void **s) {
    (void)s;
    char dir[512], path[600];
    snprintf(dir, sizeof dir, "%s/oom", root);
    snprintf(path, sizeof path, "%s/schemas.snap", dir);
    kvm_schema_cache_t *c = kvm_schema_cache_open(dir, NULL);
    fill(c);
    assert_int_equal(kvm_schema_cache_save(c), 0);
    kvm_schema_cache_free(c);
    size_t n;
    char *good = slurp(path, &n);
    size_t live0 = kvm_alloc_bytes_live();
    int failed = 0;
    for (uint64_t k = 1;; k++) {
        write_bytes(path, good, n);
        kvm_alloc_fail_nth(k);
        int rc = oom_op(dir);
        bool fired = !kvm_alloc_fail_pending();
        kvm_alloc_fail_nth(0);
        if (!fired) {
            assert_int_equal(rc, 0);
            break;
        }
        if (rc) {
            failed++;
            assert_int_equal(rc, KVM_ENOMEM);
        }
        if (kvm_alloc_bytes_live() != live0) fail_msg("allocation %llu failed: %zd bytes leaked", (unsigned long long)k,
                                                      (ssize_t)(kvm_alloc_bytes_live() - live0));
        /* the file is never set aside for a lack of memory */
        assert_int_equal(access(path, F_OK), 0);
    }
    fprintf(stderr, "out of memory: %d of the allocations failed in turn gave an error, the others were absorbed\n", failed);
    assert_true(failed > 100);
    free(good);
}

static void test_a_runtime_keeps_its_schema_cache_in_its_state_folder(void **s) {
    (void)s;
    char dir[512];
    snprintf(dir, sizeof dir, "%s/state", root);
    kvm_runtime_params_t p = kvm_runtime_default_params();
    p.model_override = "mock:echo";
    p.state_dir = dir;
    p.quiet = true;
    kvm_runtime_t *rt = kvm_runtime_create(&p);
    assert_non_null(rt);
    kvm_schema_cache_t *c = kvm_runtime_schema_cache(rt);
    assert_non_null(c);
    assert_ptr_equal(kvm_runtime_schema_cache(rt), c); /* one cache per runtime: every run shares it */
    fx_t x;
    fx_make(&x, "a", "chess", 8, 2, NULL);
    assert_int_equal(kvm_schema_cache_insert(c, &x.f, false), 0);
    kvm_runtime_free(rt); /* saves */
    rt = kvm_runtime_create(&p);
    assert_non_null(rt);
    kvm_schema_cache_stats_t st;
    kvm_schema_cache_stats(kvm_runtime_schema_cache(rt), &st);
    assert_int_equal(st.entries, 1);
    assert_int_equal(kvm_runtime_save_state(rt), 0);
    kvm_runtime_free(rt);
    assert_null(kvm_runtime_schema_cache(NULL));
}

/* ---- the LLM-written text (correct.md §3.2) ---------------------------------------------------------------- */

static void test_a_judge_text_is_scrubbed_kept_beside_the_signature_and_retrieved(void **s) {
    (void)s;
    char dir[512], path[600];
    snprintf(dir, sizeof dir, "%s/text", root);
    snprintf(path, sizeof path, "%s/schemas.snap", dir);
    kvm_schema_cache_t *c = kvm_schema_cache_open(dir, NULL);
    assert_non_null(c);
    fill(c);
    /* a query that only the text of entry 1 speaks of */
    fx_t q;
    fx_make(&q, "q", "quokka marmot", 8, 3, NULL);
    kvm_blame_params_t p = kvm_blame_default_params();
    p.count_hit = false;
    kvm_blame_t before, after;
    assert_int_equal(kvm_blame(c, &q.f, &p, &before), 0);
    double s_before = -1;
    for (int i = 0; i < before.n_schemata; i++)
        if (before.schema_ids[i] == 1) s_before = before.schema_scores[i];
    assert_null(kvm_schema_cache_text(c, 1));
    assert_int_equal(kvm_schema_cache_set_text(c, 1, "<think>hidden plan</think>Error Signatures: the quokka marmot "
                                                     "\xc3\xa9 mix-up\n", "judge-x"), 0);
    char *t = kvm_schema_cache_text(c, 1);
    assert_non_null(t);
    assert_string_equal(t, "Error Signatures: the quokka marmot    mix-up");
    kvm_free(t);
    char *j = kvm_schema_cache_entry_json(c, 1);
    assert_non_null(strstr(j, "\"body\":"));
    assert_non_null(strstr(j, "\"model\":\t\"judge-x\""));
    assert_non_null(strstr(j, "\"stub\":\tfalse"));
    kvm_free(j);
    assert_int_equal(kvm_blame(c, &q.f, &p, &after), 0);
    assert_int_equal(after.schema_ids[0], 1); /* the text's terms are keys now */
    assert_true(after.schema_scores[0] > s_before);
    /* saved and loaded: the text, the scores and the bytes stay */
    assert_int_equal(kvm_schema_cache_save(c), 0);
    kvm_schema_cache_free(c);
    size_t n1, n2;
    char *a = slurp(path, &n1);
    assert_non_null(strstr(a, "\"version\":2"));
    c = kvm_schema_cache_open(dir, NULL);
    assert_non_null(c);
    t = kvm_schema_cache_text(c, 1);
    assert_string_equal(t, "Error Signatures: the quokka marmot    mix-up");
    kvm_free(t);
    kvm_blame_t again;
    assert_int_equal(kvm_blame(c, &q.f, &p, &again), 0);
    assert_int_equal(again.schema_ids[0], 1);
    assert_true(again.schema_scores[0] == after.schema_scores[0]);
    assert_int_equal(kvm_schema_cache_save(c), 0);
    char *b = slurp(path, &n2);
    assert_int_equal(n1, n2);
    assert_memory_equal(a, b, n1);
    free(a);
    free(b);
    /* removed: the keys are the signature's again */
    assert_int_equal(kvm_schema_cache_set_text(c, 1, NULL, NULL), 0);
    assert_null(kvm_schema_cache_text(c, 1));
    kvm_blame_t gone;
    assert_int_equal(kvm_blame(c, &q.f, &p, &gone), 0);
    assert_int_equal(gone.n_schemata, before.n_schemata);
    for (int i = 0; i < gone.n_schemata; i++) {
        assert_int_equal(gone.schema_ids[i], before.schema_ids[i]);
        assert_true(fabs(gone.schema_scores[i] - before.schema_scores[i]) < 1e-9);
    }
    j = kvm_schema_cache_entry_json(c, 1);
    assert_non_null(strstr(j, "\"stub\":\ttrue"));
    kvm_free(j);
    assert_int_equal(kvm_schema_cache_set_text(c, 99, "x", NULL), KVM_ENOENT);
    assert_null(kvm_schema_cache_text(c, 99));
    assert_int_equal(kvm_errcode(), KVM_ENOENT);
    kvm_schema_cache_free(c);
}

static void test_the_scrub_drops_think_blocks_non_ascii_and_caps_the_length(void **s) {
    (void)s;
    char *t = tcache_scrub_text("  a<think>x</think>b<think>never closed");
    assert_string_equal(t, "ab");
    kvm_free(t);
    char *big = malloc(20001);
    memset(big, 'z', 20000);
    big[20000] = '\0';
    big[5] = '\x01';
    t = tcache_scrub_text(big);
    assert_int_equal(strlen(t), 6144);
    assert_int_equal(t[5], ' ');
    kvm_free(t);
    free(big);
}

/* Rewrites the snapshot at path with its header's "version":2 set to v, the trailer's checksum made valid again. */
static void snapshot_as_version(const char *path, int v) {
    size_t n;
    char *a = slurp(path, &n);
    char *ver = strstr(a, "\"version\":2");
    assert_non_null(ver);
    ver[10] = (char)('0' + v);
    char *last = a + n - 1;
    while (last > a && last[-1] != '\n') last--;
    char trailer[128];
    int cnt = 0;
    assert_int_equal(sscanf(last, "{\"end\":%d", &cnt), 1);
    snprintf(trailer, sizeof trailer, "{\"end\":%d,\"fnv1a\":\"%016llx\"}\n", cnt,
             (unsigned long long)tsig_fnv1a(a, (size_t)(last - a)));
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fwrite(a, 1, (size_t)(last - a), f);
    fputs(trailer, f);
    fclose(f);
    free(a);
}

static void test_a_version_1_snapshot_still_loads_and_a_future_version_is_set_aside(void **s) {
    (void)s;
    char dir[512], path[600], bad[700];
    snprintf(dir, sizeof dir, "%s/v1", root);
    snprintf(path, sizeof path, "%s/schemas.snap", dir);
    snprintf(bad, sizeof bad, "%s.bad", path);
    kvm_schema_cache_t *c = kvm_schema_cache_open(dir, NULL);
    assert_non_null(c);
    fill(c);
    assert_int_equal(kvm_schema_cache_save(c), 0);
    kvm_schema_cache_free(c);
    snapshot_as_version(path, 1); /* what a kvmesh before the judge's text wrote */
    c = kvm_schema_cache_open(dir, NULL);
    kvm_schema_cache_stats_t st;
    kvm_schema_cache_stats(c, &st);
    assert_int_equal(st.entries, 4);
    assert_int_equal(access(bad, F_OK), -1);
    assert_int_equal(kvm_schema_cache_save(c), 0); /* saved again: version 2 */
    kvm_schema_cache_free(c);
    snapshot_as_version(path, 3);
    c = kvm_schema_cache_open(dir, NULL);
    kvm_schema_cache_stats(c, &st);
    assert_int_equal(st.entries, 0);
    assert_int_equal(access(bad, F_OK), 0);
    kvm_schema_cache_free(c);
}

static void test_a_judge_model_writes_the_text_of_a_labelled_failure(void **s) {
    (void)s;
    kvm_schema_cache_t *c = mem_cache();
    fill(c);
    kvm_model_t *m = kvm_model_load("mock:echo", NULL);
    assert_non_null(m);
    fx_t x;
    fx_make(&x, "t0", "invoices", 8, 1, NULL);
    kvm_judge_params_t jp = kvm_judge_default_params();
    jp.max_tokens = 24;
    assert_int_equal(kvm_schema_distill(c, 0, &x.f, m, &jp), 0);
    char *t = kvm_schema_cache_text(c, 0);
    assert_non_null(t);
    assert_true(strlen(t) > 0 && strlen(t) <= 6144);
    kvm_free(t);
    char *j = kvm_schema_cache_entry_json(c, 0);
    assert_non_null(strstr(j, "\"model\":\t\"mock:echo\""));
    kvm_free(j);
    /* hostile use: named errors, nothing written */
    assert_int_equal(kvm_schema_distill(c, 42, &x.f, m, &jp), KVM_ENOENT);
    assert_int_equal(kvm_schema_distill(c, 0, &x.f, NULL, &jp), KVM_EINVAL);
    jp.max_tokens = 0;
    assert_int_equal(kvm_schema_distill(c, 0, &x.f, m, &jp), KVM_EINVAL);
    jp = kvm_judge_default_params();
    x.f.gold_agent = NULL;
    assert_int_equal(kvm_schema_distill(c, 1, &x.f, m, &jp), KVM_EINVAL);
    assert_null(kvm_schema_cache_text(c, 1));
    kvm_model_free(m);
    kvm_schema_cache_free(c);
}

static void test_a_runtime_loads_its_judge_once_and_names_a_bad_one(void **s) {
    (void)s;
    kvm_runtime_params_t p = kvm_runtime_default_params();
    p.model_override = "mock:echo";
    p.quiet = true;
    kvm_runtime_t *rt = kvm_runtime_create(&p);
    assert_non_null(rt);
    assert_null(kvm_runtime_judge(rt)); /* none configured: not an error */
    assert_int_equal(kvm_errcode(), 0);
    kvm_runtime_free(rt);
    p.judge_model = "mock:echo";
    rt = kvm_runtime_create(&p);
    kvm_model_t *j = kvm_runtime_judge(rt);
    assert_non_null(j);
    assert_ptr_equal(kvm_runtime_judge(rt), j);
    kvm_schema_cache_t *c = kvm_runtime_schema_cache(rt);
    fill(c);
    fx_t x;
    fx_make(&x, "t1", "weather", 8, 2, NULL);
    assert_int_equal(kvm_schema_distill(c, 1, &x.f, j, NULL), 0);
    char *t = kvm_schema_cache_text(c, 1);
    assert_non_null(t);
    kvm_free(t);
    kvm_runtime_free(rt);
    p.judge_model = "/nonexistent/judge-model";
    rt = kvm_runtime_create(&p);
    assert_null(kvm_runtime_judge(rt));
    assert_int_not_equal(kvm_errcode(), 0);
    assert_non_null(strstr(kvm_errmsg(), "judge_model '/nonexistent/judge-model'"));
    kvm_runtime_free(rt);
    p.judge_model = "";
    assert_null(kvm_runtime_create(&p));
    assert_non_null(strstr(kvm_errmsg(), "judge_model"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_agent_labels_lose_their_suffix_and_case),
        cmocka_unit_test(test_error_templates_mask_numbers_paths_urls_quotes_and_hex),
        cmocka_unit_test(test_flags_mark_fabrication_repeats_and_ungrounded_numbers),
        cmocka_unit_test(test_a_query_retrieves_the_most_similar_failure_but_never_itself),
        cmocka_unit_test(test_the_same_task_family_is_never_retrieved),
        cmocka_unit_test(test_lsh_candidates_find_near_duplicates_above_the_bruteforce_size),
        cmocka_unit_test(test_near_duplicates_merge_and_a_novel_failure_starts_a_group),
        cmocka_unit_test(test_the_insert_rule_crosses_at_0_60_and_0_92),
        cmocka_unit_test(test_eviction_keeps_pinned_and_human_labelled_entries),
        cmocka_unit_test(test_an_unlabelled_failure_is_refused),
        cmocka_unit_test(test_a_saved_cache_reopens_with_the_same_entries_and_bytes),
        cmocka_unit_test(test_a_torn_or_corrupted_snapshot_is_set_aside_and_the_cache_starts_empty),
        cmocka_unit_test(test_mutated_snapshots_with_valid_checksums_never_crash_the_loader),
        cmocka_unit_test(test_out_of_memory_anywhere_is_an_error_without_a_leak),
        cmocka_unit_test(test_triage_blames_the_step_whose_tool_call_failed_and_never_the_task),
        cmocka_unit_test(test_a_warm_cache_moves_the_blame_to_the_known_error_kind),
        cmocka_unit_test(test_a_traced_run_reads_as_a_failure_with_the_task_at_step_0),
        cmocka_unit_test(test_a_runtime_keeps_its_schema_cache_in_its_state_folder),
        cmocka_unit_test(test_a_judge_text_is_scrubbed_kept_beside_the_signature_and_retrieved),
        cmocka_unit_test(test_the_scrub_drops_think_blocks_non_ascii_and_caps_the_length),
        cmocka_unit_test(test_a_version_1_snapshot_still_loads_and_a_future_version_is_set_aside),
        cmocka_unit_test(test_a_judge_model_writes_the_text_of_a_labelled_failure),
        cmocka_unit_test(test_a_runtime_loads_its_judge_once_and_names_a_bad_one),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
