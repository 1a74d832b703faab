/* test_core_rng.c - the one PRNG (runtime/core/rng.h): its stream is pinned to the generator the
 * minitasks data was made with, and its helpers stay in range. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "runtime/core/rng.h"
#include "test_common.h"

/* Values printed by the generator of runtime/eval/minitasks.c as it was at commit df22b09 (seeded
 * with the five words below, then four draws, then six draws below 1000). */
static void test_stream_matches_the_minitasks_generator(void **st) {
    (void)st;
    const uint64_t words[5] = {42, 1, 0x636f6e74, 7, 0};
    kvm_rng_t r;
    kvm_rng_seed_words(&r, words, 5);
    assert_true(kvm_rng_next(&r) == 0x2203641c90a1b04eULL);
    assert_true(kvm_rng_next(&r) == 0xb097c3e27f3a2b24ULL);
    assert_true(kvm_rng_next(&r) == 0x520676c0591e6ef5ULL);
    assert_true(kvm_rng_next(&r) == 0xb4faca215379d541ULL);
    const uint64_t below[6] = {600, 857, 615, 34, 630, 855};
    for (int i = 0; i < 6; i++) assert_int_equal(kvm_rng_below(&r, 1000), below[i]);
    const uint64_t w2[5] = {1, 2, 3, 4, 5};
    kvm_rng_seed_words(&r, w2, 5);
    assert_true(kvm_rng_next(&r) == 0xb8e5f776ad4e83c2ULL);
}

static void test_same_seed_same_stream_and_different_seed_different_stream(void **st) {
    (void)st;
    kvm_rng_t a, b, c;
    kvm_rng_seed(&a, 5);
    kvm_rng_seed(&b, 5);
    kvm_rng_seed(&c, 6);
    int differ = 0;
    for (int i = 0; i < 100; i++) {
        uint64_t x = kvm_rng_next(&a);
        assert_true(x == kvm_rng_next(&b));
        differ += x != kvm_rng_next(&c);
    }
    assert_true(differ > 90);
}

static void test_double_is_in_the_unit_interval_and_spread(void **st) {
    (void)st;
    kvm_rng_t r;
    kvm_rng_seed(&r, 3);
    int low = 0;
    for (int i = 0; i < 10000; i++) {
        double d = kvm_rng_double(&r);
        assert_true(d >= 0.0 && d < 1.0);
        low += d < 0.5;
    }
    assert_in_range(low, 4700, 5300);
}

static void test_bounded_ints_cover_exactly_their_range(void **st) {
    (void)st;
    kvm_rng_t r;
    kvm_rng_seed(&r, 9);
    int seen[7] = {0};
    for (int i = 0; i < 7000; i++) {
        int v = kvm_rng_range(&r, -3, 3);
        assert_in_range(v + 3, 0, 6);
        seen[v + 3]++;
    }
    for (int i = 0; i < 7; i++) assert_in_range(seen[i], 850, 1150);
    assert_int_equal(kvm_rng_below(&r, 1), 0);
    assert_int_equal(kvm_rng_below(&r, 0), 0);
    assert_int_equal(kvm_rng_range(&r, 4, 4), 4);
}

TC_MAIN(NULL, NULL,
        cmocka_unit_test(test_stream_matches_the_minitasks_generator),
        cmocka_unit_test(test_same_seed_same_stream_and_different_seed_different_stream),
        cmocka_unit_test(test_double_is_in_the_unit_interval_and_spread),
        cmocka_unit_test(test_bounded_ints_cover_exactly_their_range))
