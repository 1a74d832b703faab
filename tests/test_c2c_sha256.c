/* test_c2c_sha256.c - SHA-256 (runtime/core/sha256.c) against the FIPS 180-4 / NIST CAVP example vectors,
 * one-shot and fed in odd-sized pieces, and the file digest. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "runtime/core/sha256.h"
#include "runtime/core/status.h"

static void hex_of(const void *p, size_t n, char out[65]) {
    uint8_t d[32];
    kvm_sha256(p, n, d);
    kvm_sha256_hex(d, out);
}

static void test_nist_short_vectors_match(void **st) {
    (void)st;
    char h[65];
    hex_of("", 0, h);
    assert_string_equal(h, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    hex_of("abc", 3, h);
    assert_string_equal(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *m448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    hex_of(m448, strlen(m448), h);
    assert_string_equal(h, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    const char *m896 = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrst"
                       "nopqrstu";
    hex_of(m896, strlen(m896), h);
    assert_string_equal(h, "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
}

static void test_one_million_a_in_odd_pieces_matches(void **st) {
    (void)st;
    kvm_sha256_t s;
    kvm_sha256_init(&s);
    char chunk[997];
    memset(chunk, 'a', sizeof chunk);
    size_t left = 1000000;
    while (left) {
        size_t n = left < sizeof chunk ? left : sizeof chunk;
        kvm_sha256_update(&s, chunk, n);
        left -= n;
    }
    uint8_t d[32];
    char h[65];
    kvm_sha256_final(&s, d);
    kvm_sha256_hex(d, h);
    assert_string_equal(h, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

static void test_every_length_around_a_block_agrees_with_byte_by_byte(void **st) {
    (void)st;
    uint8_t buf[200];
    for (int i = 0; i < 200; i++) buf[i] = (uint8_t)(i * 37 + 1);
    for (size_t n = 50; n < 140; n++) {
        uint8_t a[32], b[32];
        kvm_sha256(buf, n, a);
        kvm_sha256_t s;
        kvm_sha256_init(&s);
        for (size_t i = 0; i < n; i++) kvm_sha256_update(&s, buf + i, 1);
        kvm_sha256_final(&s, b);
        assert_memory_equal(a, b, 32);
    }
}

static void test_file_digest_matches_and_missing_file_is_named(void **st) {
    (void)st;
    char path[] = "/tmp/kvm_sha_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *fp = fdopen(fd, "wb");
    fputs("abc", fp);
    fclose(fp);
    char h[65];
    assert_int_equal(kvm_sha256_file_hex(path, h), 0);
    assert_string_equal(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    remove(path);
    assert_int_equal(kvm_sha256_file_hex(path, h), KVM_ENOENT);
    assert_non_null(strstr(kvm_errmsg(), path));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nist_short_vectors_match),
        cmocka_unit_test(test_one_million_a_in_odd_pieces_matches),
        cmocka_unit_test(test_every_length_around_a_block_agrees_with_byte_by_byte),
        cmocka_unit_test(test_file_digest_matches_and_missing_file_is_named),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
