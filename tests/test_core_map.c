/* test_core_map.c - the hash map of runtime/core/map.h: string and u64 keys, overwrite, removal
 * (backward shift keeps every other key reachable), iteration, borrowed keys, and allocation failures
 * that leave the map as it was. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "runtime/core/core.h"
#include "runtime/core/map.h"
#include "runtime/core/rng.h"
#include "test_common.h"

static void test_string_keys_map_to_their_values(void **st) {
    (void)st;
    kvm_map_t m;
    kvm_map_init(&m, KVM_MAP_STR);
    kvm_mapval_t v;
    assert_false(kvm_map_get_str(&m, "absent", &v));
    char key[32];
    for (int i = 0; i < 5000; i++) {
        snprintf(key, sizeof key, "key-%d", i);
        assert_int_equal(kvm_map_put_str(&m, key, KVM_MAPVAL_I64(i)), 0);
    }
    assert_int_equal(kvm_map_len(&m), 5000);
    for (int i = 0; i < 5000; i++) {
        snprintf(key, sizeof key, "key-%d", i);
        assert_true(kvm_map_get_str(&m, key, &v));
        assert_int_equal(v.i64, i);
    }
    assert_false(kvm_map_get_str(&m, "key-5000", NULL));
    kvm_map_free(&m);
}

static void test_put_of_a_present_key_overwrites_the_value(void **st) {
    (void)st;
    kvm_map_t m;
    kvm_map_init(&m, KVM_MAP_STR);
    int a = 1, b = 2;
    assert_int_equal(kvm_map_put_str(&m, "x", KVM_MAPVAL_PTR(&a)), 0);
    assert_int_equal(kvm_map_put_str(&m, "x", KVM_MAPVAL_PTR(&b)), 0);
    assert_int_equal(kvm_map_len(&m), 1);
    kvm_mapval_t v;
    assert_true(kvm_map_get_str(&m, "x", &v));
    assert_ptr_equal(v.ptr, &b);
    kvm_map_free(&m);
}

static void test_keys_are_byte_strings_with_lengths(void **st) {
    (void)st;
    kvm_map_t m;
    kvm_map_init(&m, KVM_MAP_STR);
    assert_int_equal(kvm_map_put(&m, "a\0b", 3, KVM_MAPVAL_U64(1)), 0);
    assert_int_equal(kvm_map_put(&m, "a", 1, KVM_MAPVAL_U64(2)), 0);
    assert_int_equal(kvm_map_put(&m, "", 0, KVM_MAPVAL_U64(3)), 0);
    kvm_mapval_t v;
    assert_true(kvm_map_get(&m, "a\0b", 3, &v));
    assert_int_equal(v.u64, 1);
    assert_true(kvm_map_get_str(&m, "a", &v));
    assert_int_equal(v.u64, 2);
    assert_true(kvm_map_get_str(&m, "", &v));
    assert_int_equal(v.u64, 3);
    kvm_map_free(&m);
}

/* Random inserts and removals checked against a plain array: every key not removed stays reachable. */
static void test_removal_keeps_all_other_keys_reachable(void **st) {
    (void)st;
    enum { N = 4096 };
    static int present[N];
    memset(present, 0, sizeof present);
    kvm_map_t m;
    kvm_map_init(&m, KVM_MAP_U64);
    kvm_rng_t r;
    kvm_rng_seed(&r, 11);
    for (int step = 0; step < 40000; step++) {
        uint64_t k = kvm_rng_below(&r, N);
        kvm_mapval_t v;
        if (kvm_rng_below(&r, 3)) {
            assert_int_equal(kvm_map_put_u64(&m, k * 0x10000, KVM_MAPVAL_U64(k + 1)), 0);
            present[k] = 1;
        } else {
            assert_int_equal(kvm_map_remove_u64(&m, k * 0x10000, &v), present[k]);
            if (present[k]) assert_int_equal(v.u64, k + 1);
            present[k] = 0;
        }
    }
    size_t n = 0;
    for (uint64_t k = 0; k < N; k++) {
        kvm_mapval_t v;
        assert_int_equal(kvm_map_get_u64(&m, k * 0x10000, &v), present[k]);
        if (present[k]) assert_int_equal(v.u64, k + 1);
        n += (size_t)present[k];
    }
    assert_int_equal(kvm_map_len(&m), n);
    kvm_map_free(&m);
}

static void test_iteration_visits_every_entry_once(void **st) {
    (void)st;
    kvm_map_t m;
    kvm_map_init(&m, KVM_MAP_STR);
    const char *keys[] = {"finder", "checker", "reverser", "neighbour"};
    for (int i = 0; i < 4; i++) assert_int_equal(kvm_map_put_str(&m, keys[i], KVM_MAPVAL_I64(i)), 0);
    assert_true(kvm_map_remove_str(&m, "checker", NULL));
    int seen[4] = {0};
    size_t it = 0;
    for (const kvm_map_entry_t *e; (e = kvm_map_next(&m, &it));) {
        assert_string_equal(e->key.str, keys[e->val.i64]);
        seen[e->val.i64]++;
    }
    assert_int_equal(seen[0], 1);
    assert_int_equal(seen[1], 0);
    assert_int_equal(seen[2], 1);
    assert_int_equal(seen[3], 1);
    kvm_map_free(&m);
}

static void test_borrowed_keys_are_not_copied(void **st) {
    (void)st;
    kvm_map_t m;
    kvm_map_init(&m, KVM_MAP_STR_REF);
    static const char word[] = "hello";
    assert_int_equal(kvm_map_put(&m, word, 5, KVM_MAPVAL_I64(7)), 0);
    size_t it = 0;
    const kvm_map_entry_t *e = kvm_map_next(&m, &it);
    assert_ptr_equal(e->key.str, word);
    kvm_mapval_t v;
    assert_true(kvm_map_get(&m, "hello", 5, &v));
    assert_int_equal(v.i64, 7);
    kvm_map_free(&m);
}

static void test_failed_insert_leaves_the_map_unchanged(void **st) {
    (void)st;
    size_t live = kvm_alloc_bytes_live();
    kvm_map_t m;
    kvm_map_init(&m, KVM_MAP_STR);
    char key[16];
    for (int i = 0; i < 12; i++) { /* 12 of 16 slots: the next insert must grow the table */
        snprintf(key, sizeof key, "k%d", i);
        assert_int_equal(kvm_map_put_str(&m, key, KVM_MAPVAL_I64(i)), 0);
    }
    assert_int_equal(m.cap, 16);
    kvm_alloc_fail_nth(1); /* the key copy */
    assert_int_equal(kvm_map_put_str(&m, "new", KVM_MAPVAL_I64(99)), KVM_ENOMEM);
    kvm_alloc_fail_nth(2); /* the larger table */
    assert_int_equal(kvm_map_put_str(&m, "new", KVM_MAPVAL_I64(99)), KVM_ENOMEM);
    assert_int_equal(kvm_map_len(&m), 12);
    assert_int_equal(m.cap, 16);
    assert_false(kvm_map_get_str(&m, "new", NULL));
    for (int i = 0; i < 12; i++) {
        snprintf(key, sizeof key, "k%d", i);
        kvm_mapval_t v;
        assert_true(kvm_map_get_str(&m, key, &v));
        assert_int_equal(v.i64, i);
    }
    assert_int_equal(kvm_map_put_str(&m, "new", KVM_MAPVAL_I64(99)), 0);
    assert_int_equal(kvm_map_len(&m), 13);
    kvm_map_free(&m);
    assert_int_equal(kvm_alloc_bytes_live(), live);
}

TC_MAIN(NULL, NULL,
        cmocka_unit_test(test_string_keys_map_to_their_values),
        cmocka_unit_test(test_put_of_a_present_key_overwrites_the_value),
        cmocka_unit_test(test_keys_are_byte_strings_with_lengths),
        cmocka_unit_test(test_removal_keeps_all_other_keys_reachable),
        cmocka_unit_test(test_iteration_visits_every_entry_once),
        cmocka_unit_test(test_borrowed_keys_are_not_copied),
        cmocka_unit_test(test_failed_insert_leaves_the_map_unchanged))
