/* test_core_sb.c - the string builder of runtime/core/sb.h: appends, printf growth past the small
 * buffer, embedded NULs, take, and an allocation failure that leaves the text as it was. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "runtime/core/core.h"
#include "runtime/core/sb.h"
#include "test_common.h"

static void test_an_empty_builder_reads_as_the_empty_string(void **st) {
    (void)st;
    kvm_sb_t b = KVM_SB_INIT;
    assert_string_equal(kvm_sb_str(&b), "");
    assert_int_equal(b.len, 0);
    kvm_sb_free(&b);
}

static void test_appends_and_printf_concatenate_in_order(void **st) {
    (void)st;
    kvm_sb_t b = KVM_SB_INIT;
    assert_int_equal(kvm_sb_puts(&b, "layer "), 0);
    assert_int_equal(kvm_sb_printf(&b, "%d of %s", 3, "8"), 0);
    assert_int_equal(kvm_sb_putc(&b, '!'), 0);
    assert_int_equal(kvm_sb_append(&b, "xyz", 2), 0);
    assert_string_equal(kvm_sb_str(&b), "layer 3 of 8!xy");
    assert_int_equal(b.len, strlen("layer 3 of 8!xy"));
    kvm_sb_free(&b);
}

static void test_printf_longer_than_the_stack_buffer_is_whole(void **st) {
    (void)st;
    char big[3000];
    memset(big, 'q', sizeof big - 1);
    big[sizeof big - 1] = 0;
    kvm_sb_t b = KVM_SB_INIT;
    assert_int_equal(kvm_sb_puts(&b, "<"), 0);
    assert_int_equal(kvm_sb_printf(&b, "%s>%d", big, 42), 0);
    assert_int_equal(b.len, 1 + 2999 + 3);
    assert_int_equal(b.s[0], '<');
    assert_int_equal(b.s[2999], 'q');
    assert_string_equal(b.s + 3000, ">42");
    kvm_sb_free(&b);
}

static void test_embedded_nul_bytes_are_kept(void **st) {
    (void)st;
    kvm_sb_t b = KVM_SB_INIT;
    assert_int_equal(kvm_sb_append(&b, "a\0b", 3), 0);
    assert_int_equal(b.len, 3);
    assert_memory_equal(b.s, "a\0b", 4);
    kvm_sb_free(&b);
}

static void test_truncate_and_clear_cut_the_text(void **st) {
    (void)st;
    kvm_sb_t b = KVM_SB_INIT;
    kvm_sb_puts(&b, "hello world");
    kvm_sb_truncate(&b, 5);
    assert_string_equal(kvm_sb_str(&b), "hello");
    kvm_sb_truncate(&b, 50);
    assert_string_equal(kvm_sb_str(&b), "hello");
    kvm_sb_clear(&b);
    assert_string_equal(kvm_sb_str(&b), "");
    assert_non_null(b.s);
    kvm_sb_free(&b);
}

static void test_take_hands_over_the_text_and_empties_the_builder(void **st) {
    (void)st;
    kvm_sb_t b = KVM_SB_INIT;
    kvm_sb_puts(&b, "abc");
    size_t len = 0;
    char *s = kvm_sb_take(&b, &len);
    assert_string_equal(s, "abc");
    assert_int_equal(len, 3);
    assert_null(b.s);
    kvm_free(s);
    s = kvm_sb_take(&b, &len);
    assert_non_null(s);
    assert_string_equal(s, "");
    assert_int_equal(len, 0);
    kvm_free(s);
}

static void test_failed_append_leaves_the_text_unchanged(void **st) {
    (void)st;
    size_t live = kvm_alloc_bytes_live();
    kvm_sb_t b = KVM_SB_INIT;
    assert_int_equal(kvm_sb_puts(&b, "keep"), 0);
    char big[500];
    memset(big, 'z', sizeof big);
    kvm_alloc_fail_nth(1);
    assert_int_equal(kvm_sb_append(&b, big, sizeof big), KVM_ENOMEM);
    assert_string_equal(kvm_sb_str(&b), "keep");
    assert_int_equal(b.len, 4);
    kvm_alloc_fail_nth(1);
    assert_int_equal(kvm_sb_printf(&b, "%.*s", 400, big), KVM_ENOMEM);
    assert_string_equal(kvm_sb_str(&b), "keep");
    kvm_sb_t e = KVM_SB_INIT;
    kvm_alloc_fail_nth(1);
    assert_null(kvm_sb_take(&e, NULL));
    assert_null(e.s);
    assert_int_equal(kvm_sb_append(&b, big, sizeof big), 0);
    assert_int_equal(b.len, 504);
    kvm_sb_free(&b);
    assert_int_equal(kvm_alloc_bytes_live(), live);
}

TC_MAIN(NULL, NULL,
        cmocka_unit_test(test_an_empty_builder_reads_as_the_empty_string),
        cmocka_unit_test(test_appends_and_printf_concatenate_in_order),
        cmocka_unit_test(test_printf_longer_than_the_stack_buffer_is_whole),
        cmocka_unit_test(test_embedded_nul_bytes_are_kept),
        cmocka_unit_test(test_truncate_and_clear_cut_the_text),
        cmocka_unit_test(test_take_hands_over_the_text_and_empties_the_builder),
        cmocka_unit_test(test_failed_append_leaves_the_text_unchanged))
