/* test_core_alloc.c - the one counted allocator of runtime/core/core.h: live bytes and attempts are
 * counted, fault injection fails exactly the n-th attempt, a failed realloc keeps the block, kvm_read_file
 * and cJSON allocate through it, and accounts charge the blocks made while they are entered. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include <cjson/cJSON.h>

#include "runtime/core/core.h"

static void test_live_bytes_follow_malloc_realloc_and_free(void **st) {
    (void)st;
    size_t live = kvm_alloc_bytes_live();
    char *p = kvm_malloc(100);
    assert_non_null(p);
    assert_int_equal(kvm_alloc_bytes_live(), live + 100);
    p = kvm_realloc(p, 300);
    assert_non_null(p);
    assert_int_equal(kvm_alloc_bytes_live(), live + 300);
    int *z = kvm_calloc(10, sizeof *z);
    for (int i = 0; i < 10; i++) assert_int_equal(z[i], 0);
    assert_int_equal(kvm_alloc_bytes_live(), live + 300 + 10 * sizeof *z);
    kvm_free(z);
    assert_null(kvm_realloc(p, 0));
    assert_int_equal(kvm_alloc_bytes_live(), live);
}

static void test_every_allocating_call_counts_one_attempt(void **st) {
    (void)st;
    uint64_t n0 = kvm_alloc_count();
    void *a = kvm_malloc(1);
    void *b = kvm_calloc(2, 2);
    a = kvm_realloc(a, 50);
    char *s = kvm_strdup("abc");
    char *t = kvm_strndup("abcdef", 2);
    assert_string_equal(t, "ab");
    assert_int_equal(kvm_alloc_count() - n0, 5);
    kvm_free(a);
    kvm_free(b);
    kvm_free(s);
    kvm_free(t);
    assert_int_equal(kvm_alloc_count() - n0, 5);
}

static void test_fault_injection_fails_exactly_the_nth_attempt(void **st) {
    (void)st;
    kvm_alloc_fail_nth(3);
    assert_true(kvm_alloc_fail_pending());
    void *a = kvm_malloc(8), *b = kvm_malloc(8), *c = kvm_malloc(8), *d = kvm_malloc(8);
    assert_non_null(a);
    assert_non_null(b);
    assert_null(c);
    assert_int_equal(kvm_errcode(), KVM_ENOMEM);
    assert_true(strstr(kvm_errmsg(), "out of memory") != NULL);
    assert_non_null(d);
    assert_false(kvm_alloc_fail_pending());
    kvm_free(a);
    kvm_free(b);
    kvm_free(d);
}

static void test_disarmed_fault_injection_fails_nothing(void **st) {
    (void)st;
    kvm_alloc_fail_nth(2);
    kvm_alloc_fail_nth(0);
    assert_false(kvm_alloc_fail_pending());
    void *a = kvm_malloc(8), *b = kvm_malloc(8);
    assert_non_null(a);
    assert_non_null(b);
    kvm_free(a);
    kvm_free(b);
}

static void test_failed_realloc_keeps_the_old_block(void **st) {
    (void)st;
    size_t live = kvm_alloc_bytes_live();
    char *p = kvm_malloc(4);
    memcpy(p, "abc", 4);
    kvm_alloc_fail_nth(1);
    assert_null(kvm_realloc(p, 4096));
    assert_string_equal(p, "abc");
    assert_int_equal(kvm_alloc_bytes_live(), live + 4);
    kvm_free(p);
    assert_int_equal(kvm_alloc_bytes_live(), live);
}

static void test_overflowing_sizes_fail_cleanly(void **st) {
    (void)st;
    assert_null(kvm_malloc(SIZE_MAX));
    assert_null(kvm_calloc(SIZE_MAX / 2, 4));
    assert_int_equal(kvm_errcode(), KVM_ENOMEM);
}

static void test_an_account_charges_the_blocks_made_while_it_is_entered_and_refuses_past_its_cap(void **st) {
    (void)st;
    kvm_account_t *a = kvm_account_create(4096);
    assert_non_null(a);
    assert_null(kvm_account_enter(a));
    char *p = kvm_malloc(1000);
    assert_non_null(p);
    size_t one = kvm_account_bytes(a);
    assert_true(one >= 1000 + 16);                 /* the block and its header */
    char *q = kvm_malloc(4096);                    /* would pass the cap */
    assert_null(q);
    assert_int_equal(kvm_errcode(), KVM_ENOMEM);
    assert_non_null(strstr(kvm_errmsg(), "memory cap of 4096 bytes"));
    assert_int_equal(kvm_account_refusals(a), 1);
    assert_int_equal(kvm_account_bytes(a), one);   /* nothing charged for the refused block */
    assert_null(kvm_realloc(p, 8000));             /* growth is capped too; p is kept */
    p = kvm_realloc(p, 10);                        /* a shrink credits */
    assert_non_null(p);
    assert_true(kvm_account_bytes(a) < one);
    assert_ptr_equal(kvm_account_enter(NULL), a);
    char *free_one = kvm_malloc(100000);           /* no account entered: no cap */
    assert_non_null(free_one);
    kvm_free(free_one);
    kvm_free(p);                                   /* credited whatever is entered now */
    assert_int_equal(kvm_account_bytes(a), 0);
    assert_true(kvm_account_peak(a) >= one);
    kvm_account_release(a);
}

static void test_an_account_outlives_its_owner_while_blocks_charged_to_it_live(void **st) {
    (void)st;
    size_t live = kvm_alloc_bytes_live();
    kvm_account_t *a = kvm_account_create(0), *other = kvm_account_create(0);
    kvm_account_enter(a);
    char *p = kvm_strdup("kept after its run");
    kvm_account_enter(NULL);
    kvm_account_release(a);                        /* the owner is gone; p still holds the account */
    kvm_account_enter(other);
    p = kvm_realloc(p, 64);                        /* still charged to a, not to the account entered now */
    assert_int_equal(kvm_account_bytes(other), 0);
    kvm_free(p);                                   /* frees the account too (ASan/leak check: nothing left) */
    kvm_account_enter(NULL);
    kvm_account_release(other);
    assert_int_equal(kvm_alloc_bytes_live(), live);
}

static void test_read_file_returns_counted_memory(void **st) {
    (void)st;
    char path[] = "/tmp/kvm_alloc_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "hello", 5), 5);
    close(fd);
    size_t live = kvm_alloc_bytes_live(), len = 0;
    char *buf = NULL;
    assert_int_equal(kvm_read_file(path, &buf, &len, 0), 0);
    assert_string_equal(buf, "hello");
    assert_int_equal(kvm_alloc_bytes_live(), live + 6);
    kvm_free(buf);
    kvm_alloc_fail_nth(1);
    assert_int_equal(kvm_read_file(path, &buf, &len, 0), KVM_ENOMEM);
    assert_null(buf);
    assert_true(strstr(kvm_errmsg(), path) != NULL);
    unlink(path);
    assert_int_equal(kvm_alloc_bytes_live(), live);
}

static void test_cjson_allocates_through_the_counted_allocator(void **st) {
    (void)st;
    kvm_core_init();
    size_t live = kvm_alloc_bytes_live();
    cJSON *o = cJSON_Parse("{\"a\":[1,2,3],\"b\":\"text\"}");
    assert_non_null(o);
    assert_true(kvm_alloc_bytes_live() > live);
    char *s = cJSON_PrintUnformatted(o);
    assert_string_equal(s, "{\"a\":[1,2,3],\"b\":\"text\"}");
    cJSON_free(s);
    cJSON_Delete(o);
    assert_int_equal(kvm_alloc_bytes_live(), live);
    kvm_alloc_fail_nth(1);
    assert_null(cJSON_Parse("{\"a\":1}"));
}

static void test_thread_count_defaults_to_the_cores_and_can_be_set(void **st) {
    (void)st;
    kvm_set_threads(0);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    assert_int_equal(kvm_threads(), cores > 256 ? 256 : cores);
    kvm_set_threads(3);
    assert_int_equal(kvm_threads(), 3);
    kvm_set_threads(-1);
    assert_int_equal(kvm_threads(), cores > 256 ? 256 : cores);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_live_bytes_follow_malloc_realloc_and_free),
        cmocka_unit_test(test_every_allocating_call_counts_one_attempt),
        cmocka_unit_test(test_fault_injection_fails_exactly_the_nth_attempt),
        cmocka_unit_test(test_disarmed_fault_injection_fails_nothing),
        cmocka_unit_test(test_failed_realloc_keeps_the_old_block),
        cmocka_unit_test(test_overflowing_sizes_fail_cleanly),
        cmocka_unit_test(test_an_account_charges_the_blocks_made_while_it_is_entered_and_refuses_past_its_cap),
        cmocka_unit_test(test_an_account_outlives_its_owner_while_blocks_charged_to_it_live),
        cmocka_unit_test(test_read_file_returns_counted_memory),
        cmocka_unit_test(test_cjson_allocates_through_the_counted_allocator),
        cmocka_unit_test(test_thread_count_defaults_to_the_cores_and_can_be_set),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
