/* test_cpu_pool.c - the CPU backend's thread pool (kernels/cpu/cpu_pool.h): every item visited once, the
 * tids in range and exclusive, the scratch, nested calls, calls from two application threads, changing
 * the thread count between calls, a chunk that sleeps; and it prints the cost of a call. Leaks of
 * the workers or the scratch show in the ASan build (the pool joins and frees them at exit). */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include <kvmesh.h>

#include "kernels/cpu/cpu_pool.h"
#include "test_common.h"

#define MAX_N 5000

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- a recording task: visit counts, chunk shapes, tids, exclusivity of a tid ---------------------- */

typedef struct {
    int n, grain;
    _Atomic int visits[MAX_N];
    _Atomic int busy[256];   /* 1 while a chunk with that tid runs */
    _Atomic int bad_chunk;   /* a chunk not [k*grain, min(n, (k+1)*grain)) */
    _Atomic int bad_tid;     /* tid out of [0, pool size) */
    _Atomic int shared_tid;  /* two running chunks with one tid */
    _Atomic int tids_seen;   /* bit per tid < 32 */
    int spin;                /* busy work per item, to make chunks overlap */
    _Atomic unsigned sink;
} rec_t;

static void rec_task(void *ctx, int i0, int i1, int tid) {
    rec_t *r = ctx;
    if (tid < 0 || tid >= kvm_cpu_pool_size() || tid >= 256) {
        atomic_store(&r->bad_tid, 1);
        return;
    }
    if (atomic_exchange(&r->busy[tid], 1)) atomic_store(&r->shared_tid, 1);
    if (i0 % r->grain != 0 || i1 != (i0 + r->grain < r->n ? i0 + r->grain : r->n)) atomic_store(&r->bad_chunk, 1);
    if (tid < 32) atomic_fetch_or(&r->tids_seen, 1 << tid);
    for (int i = i0; i < i1; i++) {
        unsigned acc = 0;
        for (int k = 0; k < r->spin; k++) acc = acc * 31u + (unsigned)k;
        atomic_fetch_add_explicit(&r->sink, acc, memory_order_relaxed); /* keeps the busy work */
        atomic_fetch_add(&r->visits[i], 1);
    }
    atomic_store(&r->busy[tid], 0);
}

static rec_t *rec_new(int n, int grain, int spin) {
    rec_t *r = calloc(1, sizeof *r);
    assert_non_null(r);
    r->n = n;
    r->grain = grain;
    r->spin = spin;
    return r;
}

/* runs one call and checks everything rec_task records */
static void check_call(int n, int grain, int spin) {
    rec_t *r = rec_new(n, grain, spin);
    kvm_cpu_parallel_for(n, grain, rec_task, r);
    for (int i = 0; i < n; i++) {
        if (atomic_load(&r->visits[i]) != 1) fail_msg("n=%d grain=%d threads=%d: item %d visited %d times", n, grain,
                                                      kvm_threads(), i, atomic_load(&r->visits[i]));
    }
    assert_int_equal(atomic_load(&r->bad_chunk), 0);
    assert_int_equal(atomic_load(&r->bad_tid), 0);
    assert_int_equal(atomic_load(&r->shared_tid), 0);
    free(r);
}

static void test_every_item_is_visited_exactly_once(void **st) {
    (void)st;
    const int threads[] = {1, 2, 3, 4};
    const int ns[] = {0, 1, 2, 7, 63, 64, 65, 1000, 4097};
    const int grains[] = {1, 3, 64, 100, 5000};
    for (size_t t = 0; t < sizeof threads / sizeof *threads; t++) {
        kvm_set_threads(threads[t]);
        for (size_t a = 0; a < sizeof ns / sizeof *ns; a++)
            for (size_t b = 0; b < sizeof grains / sizeof *grains; b++) check_call(ns[a], grains[b], 0);
    }
    kvm_set_threads(2);
}

static _Atomic int g_hits[256];

static void hit_task(void *ctx, int i0, int i1, int tid) {
    (void)ctx, (void)tid;
    for (int i = i0; i < i1; i++) atomic_fetch_add_explicit(&g_hits[i], 1, memory_order_relaxed);
}

/* Jobs whose chunk counts alternate between few and many, back to back: a worker late from a job with few chunks
 * must not claim a chunk of the next, larger job against the old ticket (it did: the chunk ran twice, the count of
 * finished chunks passed the job's, and the caller waited for ever). */
static void test_back_to_back_jobs_of_growing_size_run_every_item_once(void **st) {
    (void)st;
    kvm_set_threads(2);
    alarm(120); /* the bug hung the caller: end the process (SIGALRM) rather than wait for ctest's timeout */
    for (int iter = 0; iter < 200000; iter++) {
        const int n = iter & 1 ? 2 + (iter >> 1) % 200 : 2;
        kvm_cpu_parallel_for(n, 1, hit_task, NULL);
        for (int i = 0; i < n; i++) {
            if (atomic_load(&g_hits[i]) != 1) fail_msg("job %d: item %d of %d ran %d times", iter, i, n, atomic_load(&g_hits[i]));
            atomic_store(&g_hits[i], 0);
        }
    }
    alarm(0);
    kvm_set_threads(0);
}

static void test_a_grain_below_one_means_one_item_per_chunk(void **st) {
    (void)st;
    kvm_set_threads(2);
    rec_t *r = rec_new(10, 1, 0);
    kvm_cpu_parallel_for(10, 0, rec_task, r);
    kvm_cpu_parallel_for(-3, 1, rec_task, r); /* no items: nothing runs */
    for (int i = 0; i < 10; i++) assert_int_equal(atomic_load(&r->visits[i]), 1);
    assert_int_equal(atomic_load(&r->bad_chunk), 0);
    free(r);
}

static void test_tids_are_in_range_and_never_shared_by_running_chunks(void **st) {
    (void)st;
    kvm_set_threads(4); /* more threads than this machine may have cores: tids still exclusive */
    for (int rep = 0; rep < 50; rep++) check_call(400, 1, 2000);
    kvm_set_threads(2);
    for (int rep = 0; rep < 50; rep++) check_call(400, 3, 2000);
}

typedef struct {
    pthread_t caller;
    int order[64], n_order;
    int off_caller;
} seq_t;

static void seq_task(void *ctx, int i0, int i1, int tid) {
    seq_t *s = ctx;
    if (!pthread_equal(pthread_self(), s->caller) || tid != 0) s->off_caller = 1;
    if (s->n_order < 64) s->order[s->n_order++] = i0;
    (void)i1;
}

static void test_one_thread_or_one_chunk_runs_in_order_on_the_caller(void **st) {
    (void)st;
    seq_t s = {.caller = pthread_self()};
    kvm_set_threads(1);
    kvm_cpu_parallel_for(20, 2, seq_task, &s);
    assert_int_equal(s.n_order, 10);
    for (int i = 0; i < 10; i++) assert_int_equal(s.order[i], 2 * i);
    kvm_set_threads(2);
    s.n_order = 0;
    kvm_cpu_parallel_for(20, 20, seq_task, &s); /* n <= grain */
    assert_int_equal(s.n_order, 1);
    assert_int_equal(s.off_caller, 0);
}

static void test_scratch_is_aligned_kept_and_grown(void **st) {
    (void)st;
    char *a = kvm_cpu_scratch(0, 100);
    assert_non_null(a);
    assert_int_equal((uintptr_t)a % 64, 0);
    memset(a, 7, 100);
    assert_ptr_equal(kvm_cpu_scratch(0, 50), a); /* smaller: the same buffer, contents kept */
    assert_int_equal(a[99], 7);
    char *b = kvm_cpu_scratch(0, (size_t)1 << 20);
    assert_non_null(b);
    assert_int_equal((uintptr_t)b % 64, 0);
    memset(b, 1, (size_t)1 << 20);
    char *c = kvm_cpu_scratch(1, 0);
    assert_non_null(c);
    assert_int_equal((uintptr_t)c % 64, 0);
    assert_ptr_not_equal(c, b);
    assert_null(kvm_cpu_scratch(-1, 8));
    assert_null(kvm_cpu_scratch(256, 8));
    assert_int_equal(kvm_errcode(), KVM_EINVAL);
}

/* ---- nested calls ------------------------------------------------------------------------------ */

typedef struct {
    _Atomic int visits[64 * 16];
    _Atomic int wrong; /* an inner chunk on another thread or tid than its outer chunk */
} nest_t;

typedef struct {
    nest_t *nest;
    int outer, tid;
    pthread_t self;
} inner_t;

static void inner_task(void *ctx, int i0, int i1, int tid) {
    inner_t *in = ctx;
    if (tid != in->tid || !pthread_equal(pthread_self(), in->self)) atomic_store(&in->nest->wrong, 1);
    for (int i = i0; i < i1; i++) atomic_fetch_add(&in->nest->visits[in->outer * 16 + i], 1);
}

static void outer_task(void *ctx, int i0, int i1, int tid) {
    for (int o = i0; o < i1; o++) {
        inner_t in = {.nest = ctx, .outer = o, .tid = tid, .self = pthread_self()};
        kvm_cpu_parallel_for(16, 3, inner_task, &in);
    }
}

static void test_nested_calls_run_inline_with_the_outer_tid(void **st) {
    (void)st;
    kvm_set_threads(2);
    nest_t *nest = calloc(1, sizeof *nest);
    assert_non_null(nest);
    kvm_cpu_parallel_for(64, 1, outer_task, nest);
    for (int i = 0; i < 64 * 16; i++) assert_int_equal(atomic_load(&nest->visits[i]), 1);
    assert_int_equal(atomic_load(&nest->wrong), 0);
    free(nest);
}

/* ---- two application threads ------------------------------------------------------------------- */

static _Atomic int g_busy_any[256]; /* tid exclusivity across both application threads' calls */
static _Atomic int g_shared_any;

typedef struct {
    long long sum;
    _Atomic long long parts;
} sum_t;

static void sum_task(void *ctx, int i0, int i1, int tid) {
    sum_t *s = ctx;
    if (atomic_exchange(&g_busy_any[tid], 1)) atomic_store(&g_shared_any, 1);
    long long p = 0;
    for (int i = i0; i < i1; i++) p += i;
    atomic_fetch_add(&s->parts, p);
    atomic_store(&g_busy_any[tid], 0);
}

static void *app_thread(void *arg) {
    int *bad = arg;
    for (int rep = 0; rep < 300; rep++) {
        sum_t s = {0};
        kvm_cpu_parallel_for(1000, 7, sum_task, &s);
        if (atomic_load(&s.parts) != 999LL * 1000 / 2) *bad = 1;
    }
    return NULL;
}

static void test_two_application_threads_may_call_at_once(void **st) {
    (void)st;
    kvm_set_threads(2);
    pthread_t a, b;
    int bad_a = 0, bad_b = 0;
    assert_int_equal(pthread_create(&a, NULL, app_thread, &bad_a), 0);
    assert_int_equal(pthread_create(&b, NULL, app_thread, &bad_b), 0);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    assert_int_equal(bad_a, 0);
    assert_int_equal(bad_b, 0);
    assert_int_equal(atomic_load(&g_shared_any), 0);
}

/* ---- the thread count changes between calls ---------------------------------------------------- */

static void test_the_thread_count_can_change_between_calls(void **st) {
    (void)st;
    const long cores = sysconf(_SC_NPROCESSORS_ONLN);
    const int seq[] = {1, 2, 1, 0, 3, 1};
    for (size_t i = 0; i < sizeof seq / sizeof *seq; i++) {
        kvm_set_threads(seq[i]);
        check_call(1000, 10, 0);
        int want = (seq[i] ? seq[i] : (cores > 256 ? 256 : (int)cores)) - 1;
        assert_int_equal(kvm_cpu_pool_size(), want + 1);
        assert_int_equal(kvm_cpu_pool_workers(), want);
    }
    kvm_set_threads(2);
}

/* ---- a chunk that sleeps ----------------------------------------------------------------------- */

typedef struct {
    _Atomic int visits[200];
    _Atomic int slept;
} sleepy_t;

/* the first chunk a worker takes sleeps 200 ms: the caller must go on with the others meanwhile */
static void sleepy_task(void *ctx, int i0, int i1, int tid) {
    sleepy_t *s = ctx;
    if (tid != 0 && !atomic_exchange(&s->slept, 1)) usleep(200 * 1000);
    for (int i = i0; i < i1; i++) atomic_fetch_add(&s->visits[i], 1);
}

static void test_a_sleeping_chunk_does_not_hold_up_the_others(void **st) {
    (void)st;
    kvm_set_threads(2);
    for (int rep = 0; rep < 3; rep++) {
        sleepy_t *s = calloc(1, sizeof *s);
        assert_non_null(s);
        double t0 = now_s();
        kvm_cpu_parallel_for(200, 1, sleepy_task, s);
        double dt = now_s() - t0;
        for (int i = 0; i < 200; i++) assert_int_equal(atomic_load(&s->visits[i]), 1);
        /* the worker slept in at most one chunk: 200 sleeps would take 40 s */
        assert_true(dt < 5.0);
        free(s);
    }
}

/* ---- the cost of an empty call ----------------------------------------------------------------- */

static void empty_task(void *ctx, int i0, int i1, int tid) {
    (void)ctx, (void)i0, (void)i1, (void)tid;
}

/* about `us` microseconds of work per chunk */
static void work_task(void *ctx, int i0, int i1, int tid) {
    const double us = *(const double *)ctx;
    (void)tid;
    for (int i = i0; i < i1; i++) {
        double t0 = now_s();
        while ((now_s() - t0) * 1e6 < us) {
        }
    }
}

/* best time per call over 5 rounds of `calls` calls, in microseconds */
static double time_calls(int n, kvm_cpu_task_fn fn, void *ctx, int calls) {
    double best = 1e9;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now_s();
        for (int i = 0; i < calls; i++) kvm_cpu_parallel_for(n, 1, fn, ctx);
        double us = (now_s() - t0) / calls * 1e6;
        if (us < best) best = us;
    }
    return best;
}

static void test_the_cost_of_a_call_is_printed(void **st) {
    (void)st;
    const int threads[] = {1, 2};
    double work = 5.0;
    for (size_t t = 0; t < 2; t++) {
        kvm_set_threads(threads[t]);
        kvm_cpu_parallel_for(2, 1, empty_task, NULL); /* starts the workers */
        printf("kvm_cpu_parallel_for, %d thread(s), best of 5 rounds: empty, 2 chunks %.3f us per call; "
               "2 chunks of 5 us %.2f us; 16 chunks of 5 us %.2f us\n",
               threads[t], time_calls(2, empty_task, NULL, 20000), time_calls(2, work_task, &work, 2000),
               time_calls(16, work_task, &work, 500));
    }
    kvm_set_threads(2);
}

TC_MAIN(NULL, NULL, cmocka_unit_test(test_every_item_is_visited_exactly_once),
        cmocka_unit_test(test_a_grain_below_one_means_one_item_per_chunk),
        cmocka_unit_test(test_back_to_back_jobs_of_growing_size_run_every_item_once),
        cmocka_unit_test(test_tids_are_in_range_and_never_shared_by_running_chunks),
        cmocka_unit_test(test_one_thread_or_one_chunk_runs_in_order_on_the_caller),
        cmocka_unit_test(test_scratch_is_aligned_kept_and_grown),
        cmocka_unit_test(test_nested_calls_run_inline_with_the_outer_tid),
        cmocka_unit_test(test_two_application_threads_may_call_at_once),
        cmocka_unit_test(test_the_thread_count_can_change_between_calls),
        cmocka_unit_test(test_a_sleeping_chunk_does_not_hold_up_the_others),
        cmocka_unit_test(test_the_cost_of_a_call_is_printed))
