/* test_core_vec.c - the growable array of runtime/core/vec.h: growth, copies, pop, steal, and an
 * allocation failure that leaves the vector as it was. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "runtime/core/core.h"
#include "runtime/core/vec.h"

static void test_pushed_elements_survive_many_growths(void **st) {
    (void)st;
    kvm_vec_t v = KVM_VEC_INIT(int32_t);
    for (int32_t i = 0; i < 10000; i++) assert_int_equal(kvm_vec_push(&v, &i), 0);
    assert_int_equal(v.len, 10000);
    assert_true(v.cap >= v.len);
    for (int32_t i = 0; i < 10000; i++) assert_int_equal(KVM_VEC_AT(&v, int32_t, i), i);
    kvm_vec_free(&v);
    assert_null(v.data);
    assert_int_equal(v.len, 0);
}

static void test_reserve_allocates_once_for_the_requested_room(void **st) {
    (void)st;
    kvm_vec_t v;
    kvm_vec_init(&v, sizeof(double));
    assert_int_equal(kvm_vec_reserve(&v, 100), 0);
    void *data = v.data;
    assert_true(v.cap >= 100);
    for (int i = 0; i < 100; i++) {
        double x = i * 0.5;
        assert_int_equal(kvm_vec_push(&v, &x), 0);
    }
    assert_ptr_equal(v.data, data);
    kvm_vec_free(&v);
}

static void test_append_copies_a_run_and_null_appends_zeros(void **st) {
    (void)st;
    kvm_vec_t v = KVM_VEC_INIT(uint16_t);
    uint16_t src[3] = {7, 8, 9};
    assert_int_equal(kvm_vec_append(&v, src, 3), 0);
    assert_int_equal(kvm_vec_append(&v, NULL, 2), 0);
    assert_int_equal(v.len, 5);
    uint16_t want[5] = {7, 8, 9, 0, 0};
    assert_memory_equal(v.data, want, sizeof want);
    assert_int_equal(kvm_vec_resize(&v, 1), 0);
    assert_int_equal(v.len, 1);
    assert_int_equal(kvm_vec_resize(&v, 3), 0);
    assert_int_equal(KVM_VEC_AT(&v, uint16_t, 2), 0);
    kvm_vec_free(&v);
}

static void test_pop_returns_the_last_element_and_false_when_empty(void **st) {
    (void)st;
    kvm_vec_t v = KVM_VEC_INIT(int);
    int a = 1, b = 2, out = 0;
    assert_false(kvm_vec_pop(&v, &out));
    kvm_vec_push(&v, &a);
    kvm_vec_push(&v, &b);
    assert_true(kvm_vec_pop(&v, &out));
    assert_int_equal(out, 2);
    assert_true(kvm_vec_pop(&v, NULL));
    assert_false(kvm_vec_pop(&v, &out));
    assert_int_equal(out, 2);
    kvm_vec_free(&v);
}

static void test_clear_keeps_the_memory_and_steal_hands_it_over(void **st) {
    (void)st;
    kvm_vec_t v = KVM_VEC_INIT(char);
    assert_int_equal(kvm_vec_append(&v, "abc", 3), 0);
    void *data = v.data;
    kvm_vec_clear(&v);
    assert_int_equal(v.len, 0);
    assert_ptr_equal(v.data, data);
    assert_int_equal(kvm_vec_append(&v, "xy", 2), 0);
    size_t len = 0;
    char *p = kvm_vec_steal(&v, &len);
    assert_int_equal(len, 2);
    assert_memory_equal(p, "xy", 2);
    assert_null(v.data);
    assert_int_equal(v.cap, 0);
    kvm_free(p);
    assert_null(kvm_vec_steal(&v, &len));
    assert_int_equal(len, 0);
}

static void test_failed_growth_leaves_the_vector_unchanged(void **st) {
    (void)st;
    size_t live = kvm_alloc_bytes_live();
    kvm_vec_t v = KVM_VEC_INIT(int64_t);
    for (int64_t i = 0; i < 8; i++) assert_int_equal(kvm_vec_push(&v, &i), 0);
    assert_int_equal(v.cap, 8);
    void *data = v.data;
    int64_t x = 99;
    kvm_alloc_fail_nth(1);
    assert_int_equal(kvm_vec_push(&v, &x), KVM_ENOMEM);
    assert_false(kvm_alloc_fail_pending());
    assert_true(strstr(kvm_errmsg(), "out of memory") != NULL);
    assert_ptr_equal(v.data, data);
    assert_int_equal(v.len, 8);
    assert_int_equal(v.cap, 8);
    for (int64_t i = 0; i < 8; i++) assert_int_equal(KVM_VEC_AT(&v, int64_t, i), i);
    assert_int_equal(kvm_vec_push(&v, &x), 0);
    assert_int_equal(KVM_VEC_AT(&v, int64_t, 8), 99);
    kvm_vec_free(&v);
    assert_int_equal(kvm_alloc_bytes_live(), live);
}

static void test_array_reserve_grows_a_caller_owned_pair(void **st) {
    (void)st;
    float *p = NULL;
    size_t cap = 0;
    assert_int_equal(kvm_array_reserve(&p, &cap, 5, sizeof *p, 4), 0);
    assert_int_equal(cap, 8);
    assert_int_equal(kvm_array_reserve(&p, &cap, 8, sizeof *p, 4), 0);
    assert_int_equal(cap, 8);
    kvm_alloc_fail_nth(1);
    assert_int_equal(kvm_array_reserve(&p, &cap, 9, sizeof *p, 4), KVM_ENOMEM);
    assert_int_equal(cap, 8);
    assert_non_null(p);
    assert_int_equal(kvm_array_reserve(&p, &cap, (size_t)-1 / 2, sizeof *p, 4), KVM_ENOMEM);
    assert_int_equal(cap, 8);
    kvm_free(p);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pushed_elements_survive_many_growths),
        cmocka_unit_test(test_reserve_allocates_once_for_the_requested_room),
        cmocka_unit_test(test_append_copies_a_run_and_null_appends_zeros),
        cmocka_unit_test(test_pop_returns_the_last_element_and_false_when_empty),
        cmocka_unit_test(test_clear_keeps_the_memory_and_steal_hands_it_over),
        cmocka_unit_test(test_failed_growth_leaves_the_vector_unchanged),
        cmocka_unit_test(test_array_reserve_grows_a_caller_owned_pair),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
