/* test_sched_batch.c - the step scheduler: requests batched into shared forward passes (with chunked
 * prefill) generate exactly what each generates alone; a failing request ends alone. Uses
 * stories260K from the shared folder (skipped loudly when absent). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "runtime/core/core.h"
#include "runtime/sched/sched.h"
#include "test_common.h"
#include "test_stories_common.h"

static const char *prompts[3] = {"Once upon a time", "The little dog ran to the park and saw a big red ball", "Lily"};

/* Steps s until every request has been taken; each completion goes to fn, then is cleared. */
static void drain(kvm_sched_t *s, int max_steps, void (*fn)(kvm_sched_done_t *d, void *ud), void *ud) {
    int guard = 0;
    while (kvm_sched_pending(s) > 0 && guard++ < max_steps) {
        assert_true(kvm_sched_step(s) >= 0);
        kvm_sched_done_t d;
        while (kvm_sched_take(s, &d) == 1) {
            fn(&d, ud);
            kvm_sched_done_clear(&d);
        }
    }
    assert_int_equal(kvm_sched_pending(s), 0);
}

static void same_as_alone(kvm_sched_done_t *d, void *ud) {
    const kvm_gen_result_t *alone = &((const kvm_gen_result_t *)ud)[d->tag];
    assert_int_equal(d->status, 0);
    assert_int_equal(d->n_ids, alone->n_ids);
    assert_memory_equal(d->ids, alone->ids, (size_t)d->n_ids * sizeof *d->ids);
    assert_string_equal(d->text, alone->text);
    assert_int_equal(d->batch_max_seqs, 3);
}

static void test_batched_requests_generate_what_each_generates_alone(void **st) {
    NEED_MODEL(st);
    kvm_model_t *m = *st;
    kvm_kv_pool_t *pool = kvm_model_kv_pool(m, 0);
    assert_non_null(pool);
    kvm_gen_result_t alone[3];
    int32_t *ids[3];
    int n[3];
    for (int i = 0; i < 3; i++) {
        assert_int_equal(kvm_prompt_encode(m, NULL, prompts[i], false, &ids[i], &n[i]), 0);
        kvm_seq_t seq;
        kvm_seq_init(&seq, pool);
        kvm_gen_params_t gp = {.max_tokens = 24};
        assert_int_equal(kvm_generate(m, &seq, ids[i], n[i], &gp, NULL, NULL, &alone[i]), 0);
        kvm_seq_free(&seq);
    }
    kvm_sched_opts_t so = {.max_rows = 8, .max_active = 8}; /* forces chunked prefill */
    kvm_sched_t *s = kvm_sched_create(m, &so);
    assert_non_null(s);
    kvm_seq_t seqs[3];
    for (int i = 0; i < 3; i++) {
        kvm_seq_init(&seqs[i], pool);
        kvm_sched_req_t r = {.seq = &seqs[i], .prompt = ids[i], .n_prompt = n[i], .tag = (uint64_t)i};
        r.gen.max_tokens = 24;
        assert_int_equal(kvm_sched_submit(s, &r), 0);
    }
    drain(s, 1000, same_as_alone, alone);
    assert_int_equal(kvm_sched_stats(s)->max_items, 3);
    for (int i = 0; i < 3; i++) {
        kvm_seq_free(&seqs[i]);
        kvm_gen_result_free(&alone[i]);
        kvm_free(ids[i]);
    }
    kvm_sched_free(s);
    kvm_kv_pool_free(pool);
}

static void one_fails_on_context(kvm_sched_done_t *d, void *ud) {
    int *counts = ud;
    if (d->tag == 1) {
        assert_int_equal(d->status, KVM_ERANGE);
        assert_non_null(strstr(d->error, "context"));
        counts[1]++;
    } else {
        assert_int_equal(d->status, 0);
        assert_int_equal(d->n_ids, 5);
        counts[0]++;
    }
}

static void test_request_past_the_context_fails_alone(void **st) {
    NEED_MODEL(st);
    kvm_model_t *m = *st;
    kvm_kv_pool_t *pool = kvm_model_kv_pool(m, 0);
    kvm_sched_t *s = kvm_sched_create(m, NULL);
    assert_non_null(s);
    int long_n = m->cfg.max_seq_len + 4;
    int32_t *long_ids = kvm_calloc((size_t)long_n, sizeof *long_ids);
    for (int i = 0; i < long_n; i++) long_ids[i] = 1 + (i * 7919) % (m->cfg.vocab_size - 1); /* seeded, non-zero */
    int32_t *ids;
    int n;
    assert_int_equal(kvm_prompt_encode(m, NULL, prompts[0], false, &ids, &n), 0);
    kvm_seq_t a, b;
    kvm_seq_init(&a, pool);
    kvm_seq_init(&b, pool);
    kvm_sched_req_t ra = {.seq = &a, .prompt = long_ids, .n_prompt = long_n, .tag = 1};
    kvm_sched_req_t rb = {.seq = &b, .prompt = ids, .n_prompt = n, .tag = 2};
    ra.gen.max_tokens = 5;
    rb.gen.max_tokens = 5;
    assert_int_equal(kvm_sched_submit(s, &ra), 0);
    assert_int_equal(kvm_sched_submit(s, &rb), 0);
    int counts[2] = {0, 0}; /* ok, failed */
    drain(s, 100, one_fails_on_context, counts);
    assert_int_equal(counts[0], 1);
    assert_int_equal(counts[1], 1);
    kvm_seq_free(&a);
    kvm_seq_free(&b);
    kvm_free(ids);
    kvm_free(long_ids);
    kvm_sched_free(s);
    kvm_kv_pool_free(pool);
}

typedef struct waiters {
    kvm_seq_t *seqs;
    int32_t first[30];
    int done;
} waiters_t;

static void same_and_released(kvm_sched_done_t *d, void *ud) {
    waiters_t *w = ud;
    if (d->status) fail_msg("request %d failed: %s", (int)d->tag, d->error);
    assert_int_equal(d->n_ids, 30);
    if (w->done++ == 0) memcpy(w->first, d->ids, sizeof w->first);
    else assert_memory_equal(w->first, d->ids, sizeof w->first); /* preemption does not change results */
    kvm_seq_free(&w->seqs[d->tag]); /* the owner releases its KV: the waiter goes on */
}

static void test_requests_wait_for_kv_memory_instead_of_failing(void **st) {
    NEED_MODEL(st);
    kvm_model_t *m = *st;
    /* room for about two sequences of 48 tokens: the third must wait for one to finish */
    kvm_kv_pool_t *big = kvm_model_kv_pool(m, 0);
    assert_non_null(big);
    size_t bb = big->block_bytes;
    kvm_kv_pool_free(big);
    kvm_kv_pool_t *pool = kvm_model_kv_pool(m, bb * 7); /* 7 blocks of 16 tokens */
    assert_non_null(pool);
    kvm_sched_t *s = kvm_sched_create(m, NULL);
    kvm_seq_t seqs[3];
    int32_t *ids[3];
    int n[3];
    for (int i = 0; i < 3; i++) {
        assert_int_equal(kvm_prompt_encode(m, NULL, prompts[1], false, &ids[i], &n[i]), 0);
        kvm_seq_init(&seqs[i], pool);
        kvm_sched_req_t r = {.seq = &seqs[i], .prompt = ids[i], .n_prompt = n[i], .tag = (uint64_t)i};
        r.gen.max_tokens = 30;
        r.gen.ignore_eos = true;
        assert_int_equal(kvm_sched_submit(s, &r), 0);
    }
    waiters_t w = {.seqs = seqs};
    drain(s, 2000, same_and_released, &w);
    assert_int_equal(w.done, 3);
    for (int i = 0; i < 3; i++) kvm_free(ids[i]);
    kvm_sched_free(s);
    kvm_kv_pool_free(pool);
}

TC_MAIN(stories_setup, stories_teardown,
        cmocka_unit_test(test_batched_requests_generate_what_each_generates_alone),
        cmocka_unit_test(test_request_past_the_context_fails_alone),
        cmocka_unit_test(test_requests_wait_for_kv_memory_instead_of_failing))
