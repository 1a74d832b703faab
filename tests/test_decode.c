/* test_decode.c - the one decode loop: every stop rule once (on the mock model, whose outputs are known
 * in advance), the stream never shows a forming stop string, kvm_generate is the scheduler with one
 * request, and the mock model runs through the same scheduler (no shared data needed). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "runtime/model/mock_model.h"
#include "runtime/sched/sched.h"

typedef struct fixture {
    kvm_model_t *m;
    kvm_kv_pool_t *pool;
} fixture_t;

static int setup(void **st) {
    static fixture_t f;
    f.m = kvm_model_load("mock:echo", NULL);
    if (!f.m) fprintf(stderr, "mock:echo: %s\n", kvm_errmsg());
    f.pool = f.m ? kvm_model_kv_pool(f.m, 0) : NULL;
    *st = &f;
    return f.pool ? 0 : -1;
}

static int teardown(void **st) {
    fixture_t *f = *st;
    kvm_kv_pool_free(f->pool);
    kvm_model_free(f->m);
    return 0;
}

/* What the stream was shown. */
typedef struct stream {
    char text[512];
    size_t n;
    int calls, stop_after; /* stop_after > 0: ask to stop on that call */
} stream_t;

static int on_token(void *ud, int32_t id, const char *bytes, size_t n) {
    (void)id;
    stream_t *s = ud;
    assert_true(s->n + n < sizeof s->text);
    memcpy(s->text + s->n, bytes, n);
    s->n += n;
    s->text[s->n] = 0;
    return ++s->calls == s->stop_after;
}

/* Generates from the user message `user` on the mock echo model. */
static int gen(fixture_t *f, const char *user, const kvm_gen_params_t *p, stream_t *s, kvm_gen_result_t *res) {
    int32_t *ids = NULL;
    int n = 0;
    assert_int_equal(kvm_prompt_encode(f->m, NULL, user, false, &ids, &n), 0);
    kvm_seq_t seq;
    kvm_seq_init(&seq, f->pool);
    int rc = kvm_generate(f->m, &seq, ids, n, p, s ? on_token : NULL, s, res);
    kvm_seq_free(&seq);
    kvm_free(ids);
    return rc;
}

/* Generates from `user` and checks the text and the stop reason; returns the number of new ids. */
static int expect(fixture_t *f, const char *user, const kvm_gen_params_t *p, stream_t *s, const char *text, int stop) {
    kvm_gen_result_t r;
    assert_int_equal(gen(f, user, p, s, &r), 0);
    assert_string_equal(r.text, text);
    assert_int_equal(r.stop_reason, stop);
    int n = r.n_ids;
    kvm_gen_result_free(&r);
    return n;
}

/* Default parameters with one stop string. */
static kvm_gen_params_t stop_at(const char *const *stop) {
    kvm_gen_params_t p = kvm_gen_default_params();
    p.stop_strings = stop;
    p.n_stop_strings = 1;
    return p;
}

static void test_model_eos_ends_generation(void **st) {
    assert_int_equal(expect(*st, "the quick fox", NULL, NULL, "the quick fox", KVM_STOP_EOS), 3);
}

static void test_ignore_eos_generates_up_to_max_tokens(void **st) {
    kvm_gen_params_t p = kvm_gen_default_params();
    p.ignore_eos = true;
    p.max_tokens = 5;
    /* three words, then EOS twice, kept as tokens */
    assert_int_equal(expect(*st, "the quick fox", &p, NULL, "the quick fox", KVM_STOP_LENGTH), 5);
}

static void test_extra_stop_id_ends_generation_before_that_token(void **st) {
    fixture_t *f = *st;
    int32_t *ids = NULL;
    int n = 0;
    assert_int_equal(kvm_prompt_encode(f->m, NULL, "quick", false, &ids, &n), 0);
    int32_t said_quick = ids[0] + 1; /* a user word's id + 1: the same word said */
    kvm_free(ids);
    kvm_gen_params_t p = kvm_gen_default_params();
    p.stop_ids = &said_quick;
    p.n_stop_ids = 1;
    assert_int_equal(expect(f, "the quick fox", &p, NULL, "the", KVM_STOP_EOS), 1);
}

static void test_stop_string_is_cut_from_the_text(void **st) {
    static const char *const stop[] = {"three"};
    kvm_gen_params_t p = stop_at(stop);
    /* the token that completed it is counted */
    assert_int_equal(expect(*st, "one two three four", &p, NULL, "one two ", KVM_STOP_STRING), 3);
}

static void test_stop_string_split_across_tokens_never_reaches_the_stream(void **st) {
    static const char *const stop[] = {"b c"}; /* the end of " ab" and the start of " cd" */
    kvm_gen_params_t p = stop_at(stop);
    stream_t s = {0};
    expect(*st, "x ab cd y", &p, &s, "x a", KVM_STOP_STRING);
    assert_string_equal(s.text, "x a"); /* "b" was held back, then dropped with the stop string */
}

static void test_held_back_text_is_shown_when_generation_ends_otherwise(void **st) {
    static const char *const stop[] = {"b c"};
    kvm_gen_params_t p = stop_at(stop);
    stream_t s = {0};
    expect(*st, "x ab", &p, &s, "x ab", KVM_STOP_EOS);
    assert_string_equal(s.text, "x ab");
}

static void test_max_tokens_caps_the_new_tokens(void **st) {
    kvm_gen_params_t p = kvm_gen_default_params();
    p.max_tokens = 2;
    expect(*st, "one two three", &p, NULL, "one two", KVM_STOP_LENGTH);
}

static void test_max_total_tokens_counts_the_prompt_positions(void **st) {
    kvm_gen_params_t p = kvm_gen_default_params();
    p.max_total_tokens = 4; /* 3 prompt positions + 1 generated: the token sampled at the 4th still comes */
    assert_int_equal(expect(*st, "one two three", &p, NULL, "one two", KVM_STOP_LENGTH), 2);
}

static void test_context_limit_stops_generation(void **st) {
    fixture_t *f = *st;
    int keep = f->m->cfg.max_seq_len;
    f->m->cfg.max_seq_len = 5; /* 4 prompt positions + 1: the token sampled at the last one still comes */
    kvm_gen_result_t r;
    int rc = gen(f, "a b c d e f", NULL, NULL, &r);
    f->m->cfg.max_seq_len = keep;
    assert_int_equal(rc, KVM_ERANGE); /* 6 prompt tokens do not fit */
    f->m->cfg.max_seq_len = 5;
    expect(f, "a b c d", NULL, NULL, "a b", KVM_STOP_CONTEXT);
    f->m->cfg.max_seq_len = keep;
}

static void test_callback_stop_ends_the_request_and_is_not_called_again(void **st) {
    stream_t s = {.stop_after = 2};
    assert_int_equal(expect(*st, "one two three four", NULL, &s, "one two", KVM_STOP_CALLBACK), 2);
    assert_int_equal(s.calls, 2);
    assert_string_equal(s.text, "one two");
}

static void test_max_tokens_zero_is_rejected_naming_the_field(void **st) {
    kvm_gen_params_t p = kvm_gen_default_params();
    p.max_tokens = 0;
    kvm_gen_result_t r;
    assert_int_equal(gen(*st, "one two", &p, NULL, &r), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "max_tokens is 0"));
    assert_null(r.text);
}

static void test_default_params_cap_at_the_documented_default(void **st) {
    (void)st;
    kvm_gen_params_t p = kvm_gen_default_params();
    assert_int_equal(p.max_tokens, KVM_GEN_MAX_TOKENS_DEFAULT);
    assert_true(p.sampling.top_p == 1.0f && p.sampling.repetition_penalty == 1.0f && p.sampling.temperature == 0);
}

/* Runs every request of s to completion; done[tag] gets its completion. */
static void drain(kvm_sched_t *s, kvm_sched_done_t *done, int n) {
    int guard = 0;
    while (kvm_sched_pending(s) > 0 && guard++ < 10000) {
        assert_true(kvm_sched_step(s) >= 0);
        kvm_sched_done_t d;
        while (kvm_sched_take(s, &d) == 1) {
            assert_true(d.tag < (uint64_t)n);
            done[d.tag] = d;
        }
    }
    assert_int_equal(kvm_sched_pending(s), 0);
}

static void test_generation_equals_the_scheduler_alone_and_batched(void **st) {
    (void)st;
    kvm_config_t c = {.dim = 32, .hidden_dim = 64, .n_layers = 2, .n_heads = 4, .vocab_size = 61, .max_seq_len = 128};
    kvm_model_t *m = kvm_model_random(&c, 7, 4.0f, "cpu");
    assert_non_null(m);
    kvm_kv_pool_t *pool = kvm_model_kv_pool(m, 0);
    int32_t prompts[3][9] = {{3, 14, 15, 9, 2, 6, 5, 35, 8}, {27, 18, 28}, {1, 41, 42, 13, 56}};
    const int np[3] = {9, 3, 5};
    kvm_gen_params_t p = kvm_gen_default_params();
    p.max_tokens = 12;
    kvm_gen_result_t alone[3];
    for (int i = 0; i < 3; i++) {
        kvm_seq_t seq;
        kvm_seq_init(&seq, pool);
        assert_int_equal(kvm_generate(m, &seq, prompts[i], np[i], &p, NULL, NULL, &alone[i]), 0);
        assert_int_equal(alone[i].n_ids, 12);
        kvm_seq_free(&seq);
    }
    kvm_sched_opts_t so = {.max_rows = 4, .max_active = 8}; /* chunked prefill beside decoding */
    kvm_sched_t *s = kvm_sched_create(m, &so);
    assert_non_null(s);
    kvm_seq_t seqs[3];
    for (int i = 0; i < 3; i++) {
        kvm_seq_init(&seqs[i], pool);
        kvm_sched_req_t r = {.seq = &seqs[i], .prompt = prompts[i], .n_prompt = np[i], .gen = p, .tag = (uint64_t)i};
        assert_int_equal(kvm_sched_submit(s, &r), 0);
    }
    kvm_sched_done_t done[3];
    drain(s, done, 3);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(done[i].status, 0);
        assert_int_equal(done[i].n_ids, alone[i].n_ids);
        assert_memory_equal(done[i].ids, alone[i].ids, (size_t)alone[i].n_ids * sizeof(int32_t));
        assert_string_equal(done[i].text, alone[i].text); /* no tokenizer: ids shown as "<id>" */
        kvm_sched_done_clear(&done[i]);
        kvm_gen_result_free(&alone[i]);
        kvm_seq_free(&seqs[i]);
    }
    assert_true(kvm_sched_stats(s)->max_items >= 2);
    kvm_sched_free(s);
    kvm_kv_pool_free(pool);
    kvm_model_free(m);
}

static void test_mock_model_runs_through_the_scheduler_in_one_batch(void **st) {
    fixture_t *f = *st;
    const char *users[3] = {"alpha beta", "gamma delta epsilon", "zeta"};
    const int n_prompt[3] = {4, 5, 3}; /* the system's two words are prompt tokens too */
    kvm_sched_t *s = kvm_sched_create(f->m, NULL);
    assert_non_null(s);
    kvm_seq_t seqs[3];
    int32_t *ids[3];
    stream_t streams[3];
    memset(streams, 0, sizeof streams);
    for (int i = 0; i < 3; i++) {
        int n = 0;
        assert_int_equal(kvm_prompt_encode(f->m, "you echo", users[i], false, &ids[i], &n), 0);
        assert_int_equal(n, n_prompt[i]);
        kvm_seq_init(&seqs[i], f->pool);
        kvm_sched_req_t r = {.seq = &seqs[i], .prompt = ids[i], .n_prompt = n, .gen = kvm_gen_default_params(),
                             .tag = (uint64_t)i, .on_token = on_token, .on_token_ud = &streams[i]};
        assert_int_equal(kvm_sched_submit(s, &r), 0);
    }
    kvm_sched_done_t done[3];
    drain(s, done, 3);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(done[i].status, 0);
        assert_string_equal(done[i].text, users[i]);
        assert_string_equal(streams[i].text, users[i]);
        assert_int_equal(done[i].stop_reason, KVM_STOP_EOS);
        assert_int_equal(done[i].batch_max_seqs, 3);
        kvm_sched_done_clear(&done[i]);
        kvm_seq_free(&seqs[i]);
        kvm_free(ids[i]);
    }
    kvm_sched_free(s);
}

static void test_mock_fail_fails_every_request_with_its_message(void **st) {
    (void)st;
    kvm_model_t *m = kvm_model_load("mock:fail", NULL);
    assert_non_null(m);
    kvm_kv_pool_t *pool = kvm_model_kv_pool(m, 0);
    int32_t *ids = NULL;
    int n = 0;
    assert_int_equal(kvm_prompt_encode(m, NULL, "anything", false, &ids, &n), 0);
    kvm_seq_t seq;
    kvm_seq_init(&seq, pool);
    kvm_gen_result_t r;
    assert_int_equal(kvm_generate(m, &seq, ids, n, NULL, NULL, NULL, &r), KVM_EIO);
    assert_non_null(strstr(kvm_errmsg(), "mock:fail"));
    kvm_seq_free(&seq);
    kvm_free(ids);
    kvm_kv_pool_free(pool);
    kvm_model_free(m);
}

static void test_unknown_mock_spec_is_an_error_naming_it(void **st) {
    (void)st;
    assert_null(kvm_model_load("mock:ehco", NULL));
    assert_int_equal(kvm_errcode(), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "mock:ehco"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_model_eos_ends_generation),
        cmocka_unit_test(test_ignore_eos_generates_up_to_max_tokens),
        cmocka_unit_test(test_extra_stop_id_ends_generation_before_that_token),
        cmocka_unit_test(test_stop_string_is_cut_from_the_text),
        cmocka_unit_test(test_stop_string_split_across_tokens_never_reaches_the_stream),
        cmocka_unit_test(test_held_back_text_is_shown_when_generation_ends_otherwise),
        cmocka_unit_test(test_max_tokens_caps_the_new_tokens),
        cmocka_unit_test(test_max_total_tokens_counts_the_prompt_positions),
        cmocka_unit_test(test_context_limit_stops_generation),
        cmocka_unit_test(test_callback_stop_ends_the_request_and_is_not_called_again),
        cmocka_unit_test(test_max_tokens_zero_is_rejected_naming_the_field),
        cmocka_unit_test(test_default_params_cap_at_the_documented_default),
        cmocka_unit_test(test_generation_equals_the_scheduler_alone_and_batched),
        cmocka_unit_test(test_mock_model_runs_through_the_scheduler_in_one_batch),
        cmocka_unit_test(test_mock_fail_fails_every_request_with_its_message),
        cmocka_unit_test(test_unknown_mock_spec_is_an_error_naming_it),
    };
    return cmocka_run_group_tests_name("decode", tests, setup, teardown);
}
