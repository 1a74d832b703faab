/* test_safetensors.c - the safetensors reader: a valid file is indexed in place, and every malformed file
 * is refused with the exact status code and a message that names the file and the tensor.
 * The files are written here, into a fresh temporary directory. */
#include <ftw.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "runtime/model/safetensors.h"
#include "test_common.h"

TC_TMPDIR_FIXTURE("kvm_st")

static const char *tmp_path(const char *name) {
    static char p[512];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    return p;
}

/* Writes [u64 header_len][header padded with spaces to pad_to][data]; header_len_override != 0 replaces
 * the length field (for lying headers). */
static void write_raw(const char *path, const char *header, size_t pad_to, const void *data, size_t n_data,
                      uint64_t header_len_override) {
    size_t hl = strlen(header);
    size_t padded = pad_to ? (hl + pad_to - 1) / pad_to * pad_to : hl;
    uint64_t n = header_len_override ? header_len_override : padded;
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    for (int i = 0; i < 8; i++) fputc((int)((n >> (8 * i)) & 0xff), f);
    fwrite(header, 1, hl, f);
    for (size_t i = hl; i < padded; i++) fputc(' ', f);
    if (n_data) fwrite(data, 1, n_data, f);
    fclose(f);
}

static float g_data[64];

static void fill_data(void) {
    uint32_t s = 12345;
    for (int i = 0; i < 64; i++) {
        s = s * 1664525u + 1013904223u;
        g_data[i] = (float)((int)(s >> 9) % 2000 - 1000) / 250.0f + 0.125f;
    }
}

/* Expects kvm_st_open to fail with code and a message containing every given fragment. */
static void expect_fail(const char *path, int flags, int code, const char *frag1, const char *frag2) {
    kvm_st_file_t f;
    int rc = kvm_st_open(&f, path, flags);
    bool ok = rc == code && strstr(kvm_errmsg(), frag1) && (!frag2 || strstr(kvm_errmsg(), frag2));
    if (!ok || getenv("KVM_TEST_VERBOSE")) fprintf(stderr, "%s %d (%s): %s\n", ok ? "ok:" : "got", rc, kvm_errname(rc), kvm_errmsg());
    assert_int_equal(rc, code);
    assert_non_null(strstr(kvm_errmsg(), frag1));
    if (frag2) assert_non_null(strstr(kvm_errmsg(), frag2));
    assert_null(f.tensors);
}

static void test_valid_file_is_indexed_in_place_without_copying(void **st) {
    (void)st;
    fill_data();
    const char *p = tmp_path("ok.safetensors");
    /* header order differs from data order; a metadata block is ignored */
    write_raw(p,
              "{\"__metadata__\":{\"format\":\"pt\"},"
              "\"b.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[16,40]},"
              "\"a.bias\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
              "\"c.half\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[40,48]}}",
              8, g_data, 48, 0);
    kvm_st_file_t f;
    assert_int_equal(kvm_st_open(&f, p, KVM_ST_EXACT), 0);
    assert_int_equal(f.n_tensors, 3);
    const kvm_st_tensor_t *a = kvm_st_find(&f, "a.bias"), *b = kvm_st_find(&f, "b.weight"), *c = kvm_st_find(&f, "c.half");
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(c);
    assert_null(kvm_st_find(&f, "__metadata__"));
    assert_null(kvm_st_find(&f, "missing"));
    /* pointers into the mapping, at 8 + N + begin */
    const uint8_t *base = f.map.data;
    assert_ptr_equal(b->data, base + 8 + f.header_bytes + 16);
    assert_ptr_equal(a->data, f.data);
    assert_int_equal(b->ndim, 2);
    assert_int_equal(b->shape[0], 2);
    assert_int_equal(b->shape[1], 3);
    assert_int_equal(c->dtype, KVM_BF16);
    assert_memory_equal(b->data, &g_data[4], 24);
    kvm_tensor_t v;
    assert_int_equal(kvm_st_view(b, &v, p), 0);
    assert_ptr_equal(v.data, b->data);
    assert_int_equal(kvm_tensor_check(&v, "b.weight", 2, 2, 3), 0);
    kvm_st_close(&f);
}

static void test_writer_output_reads_back_exactly(void **st) {
    (void)st;
    fill_data();
    uint16_t h[6];
    for (int i = 0; i < 6; i++) h[i] = kvm_f32_to_f16(g_data[i]);
    kvm_st_entry_t e[3] = {
        {.name = "x", .dtype = KVM_F32, .ndim = 2, .shape = {3, 5}, .data = g_data},
        {.name = "y", .dtype = KVM_F16, .ndim = 1, .shape = {6}, .data = h},
        {.name = "s", .dtype = KVM_F32, .ndim = 0, .data = &g_data[20]},
    };
    const char *p = tmp_path("written.safetensors");
    assert_int_equal(kvm_st_write(p, e, 3), 0);
    kvm_st_file_t f;
    assert_int_equal(kvm_st_open(&f, p, KVM_ST_EXACT), 0);
    assert_int_equal(f.header_bytes % 8, 0);
    assert_memory_equal(kvm_st_find(&f, "x")->data, g_data, 60);
    assert_memory_equal(kvm_st_find(&f, "y")->data, h, 12);
    assert_int_equal(kvm_st_find(&f, "s")->ndim, 0);
    assert_int_equal(kvm_st_numel(kvm_st_find(&f, "s")), 1);
    kvm_st_close(&f);
}

static void test_file_shorter_than_the_length_field_is_rejected(void **st) {
    (void)st;
    const char *p = tmp_path("short.safetensors");
    FILE *f = fopen(p, "wb");
    fwrite("abc", 1, 3, f);
    fclose(f);
    expect_fail(p, 0, KVM_EFORMAT, p, "too short");
}

static void test_header_length_past_end_of_file_is_rejected(void **st) {
    (void)st;
    const char *p = tmp_path("hdrlen.safetensors");
    write_raw(p, "{}", 8, NULL, 0, 4096);
    expect_fail(p, 0, KVM_EFORMAT, p, "runs past the end of the file");
}

static void test_header_length_over_the_format_limit_is_rejected(void **st) {
    (void)st;
    const char *p = tmp_path("huge.safetensors");
    write_raw(p, "{}", 8, NULL, 0, 200000000ULL);
    expect_fail(p, 0, KVM_EFORMAT, p, "limit");
}

static void test_header_that_is_not_json_is_rejected(void **st) {
    (void)st;
    const char *p = tmp_path("notjson.safetensors");
    write_raw(p, "{\"a\":{\"dtype\":\"F32\",", 8, g_data, 16, 0);
    expect_fail(p, 0, KVM_EFORMAT, p, "not valid JSON");
}

static void test_garbage_after_the_header_json_is_rejected(void **st) {
    (void)st;
    const char *p = tmp_path("trailing.safetensors");
    write_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}xx", 8, g_data, 16, 0);
    expect_fail(p, 0, KVM_EFORMAT, p, "unexpected bytes after the header");
}

static void test_truncated_file_names_the_tensor_that_runs_past_the_end(void **st) {
    (void)st;
    const char *p = tmp_path("trunc.safetensors");
    write_raw(p,
              "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
              "\"b\":{\"dtype\":\"F32\",\"shape\":[8],\"data_offsets\":[16,48]}}",
              8, g_data, 30, 0);
    expect_fail(p, 0, KVM_EFORMAT, "tensor 'b'", "truncated");
}

static void test_offsets_beyond_the_data_area_are_rejected(void **st) {
    (void)st;
    const char *p = tmp_path("range.safetensors");
    write_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[1000,1016]}}", 8, g_data, 64, 0);
    expect_fail(p, 0, KVM_EFORMAT, "tensor 'a'", "past the end of the data area");
}

static void test_offsets_that_begin_after_they_end_are_rejected(void **st) {
    (void)st;
    const char *p = tmp_path("inverted.safetensors");
    write_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[16,0]}}", 8, g_data, 64, 0);
    expect_fail(p, 0, KVM_EFORMAT, "tensor 'a'", "begin after they end");
}

static void test_byte_count_that_disagrees_with_the_shape_is_rejected(void **st) {
    (void)st;
    const char *p = tmp_path("size.safetensors");
    write_raw(p, "{\"w\":{\"dtype\":\"F16\",\"shape\":[3,4],\"data_offsets\":[0,48]}}", 8, g_data, 48, 0);
    expect_fail(p, 0, KVM_EFORMAT, "tensor 'w'", "needs 24");
}

static void test_overlapping_tensors_are_rejected_naming_both(void **st) {
    (void)st;
    const char *p = tmp_path("overlap.safetensors");
    write_raw(p,
              "{\"first\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
              "\"second\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}",
              8, g_data, 24, 0);
    expect_fail(p, 0, KVM_EFORMAT, "'first'", "'second' [8, 24) overlap");
}

static void test_integer_dtype_is_refused_naming_tensor_and_dtype(void **st) {
    (void)st;
    const char *p = tmp_path("i64.safetensors");
    write_raw(p, "{\"position_ids\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]}}", 8, g_data, 16, 0);
    expect_fail(p, 0, KVM_EDTYPE, "tensor 'position_ids'", "I64");
}

static void test_fp8_dtype_is_refused_naming_tensor_and_dtype(void **st) {
    (void)st;
    const char *p = tmp_path("fp8.safetensors");
    write_raw(p, "{\"q.weight\":{\"dtype\":\"F8_E4M3\",\"shape\":[16],\"data_offsets\":[0,16]}}", 8, g_data, 16, 0);
    expect_fail(p, 0, KVM_EDTYPE, "tensor 'q.weight'", "F8_E4M3");
}

static void test_duplicate_tensor_names_are_rejected(void **st) {
    (void)st;
    const char *p = tmp_path("dup.safetensors");
    write_raw(p,
              "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
              "\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
              8, g_data, 16, 0);
    expect_fail(p, 0, KVM_EFORMAT, "tensor 'w'", "twice");
}

static void test_data_misaligned_for_its_dtype_is_rejected(void **st) {
    (void)st;
    const char *p = tmp_path("align.safetensors");
    /* header length 8 + N with N odd: the F32 data would start at an odd address */
    char hdr[128];
    snprintf(hdr, sizeof hdr, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}");
    while (strlen(hdr) % 4 != 1) strcat(hdr, " ");
    write_raw(p, hdr, 0, g_data, 8, 0);
    expect_fail(p, 0, KVM_EFORMAT, "tensor 'w'", "not aligned");
}

static void test_shape_with_a_negative_dimension_is_rejected(void **st) {
    (void)st;
    const char *p = tmp_path("neg.safetensors");
    write_raw(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, g_data, 8, 0);
    expect_fail(p, 0, KVM_EFORMAT, "tensor 'w'", "shape[0]");
}

static void test_exact_mode_rejects_holes_and_trailing_data(void **st) {
    (void)st;
    const char *hole = tmp_path("hole.safetensors");
    write_raw(hole,
              "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
              "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]}}",
              8, g_data, 24, 0);
    expect_fail(hole, KVM_ST_EXACT, KVM_EFORMAT, "unused bytes before tensor 'b'", hole);
    kvm_st_file_t f;
    assert_int_equal(kvm_st_open(&f, hole, 0), 0); /* a hole alone is harmless for model weights */
    kvm_st_close(&f);
    const char *tail = tmp_path("tail.safetensors");
    write_raw(tail, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, g_data, 20, 0);
    expect_fail(tail, KVM_ST_EXACT, KVM_EFORMAT, "bytes after the last tensor", tail);
}

static void test_missing_file_is_not_found(void **st) {
    (void)st;
    kvm_st_file_t f;
    assert_int_equal(kvm_st_open(&f, tmp_path("nope.safetensors"), 0), KVM_ENOENT);
    assert_non_null(strstr(kvm_errmsg(), "nope.safetensors"));
}

/* Seeded random corruption of a valid file's header and length field: every result is either a clean
 * index whose tensors lie inside the buffer, or an error code with a message; never a crash (ASan build). */
static void test_random_corruptions_are_rejected_or_indexed_safely(void **st) {
    (void)st;
    fill_data();
    kvm_st_entry_t e[3] = {
        {.name = "model.embed_tokens.weight", .dtype = KVM_F32, .ndim = 2, .shape = {4, 4}, .data = g_data},
        {.name = "model.norm.weight", .dtype = KVM_BF16, .ndim = 1, .shape = {8}, .data = g_data},
        {.name = "lm_head.weight", .dtype = KVM_F16, .ndim = 2, .shape = {2, 8}, .data = g_data},
    };
    const char *p = tmp_path("fuzz.safetensors");
    assert_int_equal(kvm_st_write(p, e, 3), 0);
    char *orig = NULL;
    size_t n = 0;
    assert_int_equal(kvm_read_file(p, &orig, &n, 0), 0);
    uint8_t *buf = malloc(n);
    uint32_t s = 0x2545F491u;
    int ok = 0, rejected = 0;
    for (int iter = 0; iter < 3000; iter++) {
        memcpy(buf, orig, n);
        int flips = 1 + iter % 4;
        for (int k = 0; k < flips; k++) {
            s = s * 1664525u + 1013904223u;
            size_t at = (s >> 8) % (iter % 5 == 0 ? 8 : (n - 64)); /* length field, or the header */
            s = s * 1664525u + 1013904223u;
            static const char alphabet[] = "{}[]\",:0123456789-. eE\x00\xff" "FBI";
            buf[at] = iter % 3 ? (uint8_t)alphabet[(s >> 10) % (sizeof alphabet - 1)] : (uint8_t)(s >> 16);
        }
        size_t len = iter % 7 == 0 ? n - (s >> 12) % 40 : n; /* sometimes truncated as well */
        kvm_st_file_t f;
        int rc = kvm_st_parse(&f, buf, len, "fuzz", iter % 2 ? KVM_ST_EXACT : 0);
        if (rc == 0) {
            ok++;
            for (int i = 0; i < f.n_tensors; i++) {
                const kvm_st_tensor_t *t = &f.tensors[i];
                assert_true((const uint8_t *)t->data >= buf && t->end <= f.data_bytes);
                assert_true((const uint8_t *)t->data + (t->end - t->begin) <= buf + len);
            }
            kvm_st_close(&f);
        } else {
            rejected++;
            assert_true(rc == KVM_EFORMAT || rc == KVM_EDTYPE);
            assert_true(strlen(kvm_errmsg()) > 0);
            assert_null(f.tensors);
        }
    }
    fprintf(stderr, "random corruptions: %d indexed, %d rejected\n", ok, rejected);
    assert_true(rejected > 1000);
    free(buf);
    kvm_free(orig);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_file_is_indexed_in_place_without_copying),
        cmocka_unit_test(test_writer_output_reads_back_exactly),
        cmocka_unit_test(test_file_shorter_than_the_length_field_is_rejected),
        cmocka_unit_test(test_header_length_past_end_of_file_is_rejected),
        cmocka_unit_test(test_header_length_over_the_format_limit_is_rejected),
        cmocka_unit_test(test_header_that_is_not_json_is_rejected),
        cmocka_unit_test(test_garbage_after_the_header_json_is_rejected),
        cmocka_unit_test(test_truncated_file_names_the_tensor_that_runs_past_the_end),
        cmocka_unit_test(test_offsets_beyond_the_data_area_are_rejected),
        cmocka_unit_test(test_offsets_that_begin_after_they_end_are_rejected),
        cmocka_unit_test(test_byte_count_that_disagrees_with_the_shape_is_rejected),
        cmocka_unit_test(test_overlapping_tensors_are_rejected_naming_both),
        cmocka_unit_test(test_integer_dtype_is_refused_naming_tensor_and_dtype),
        cmocka_unit_test(test_fp8_dtype_is_refused_naming_tensor_and_dtype),
        cmocka_unit_test(test_duplicate_tensor_names_are_rejected),
        cmocka_unit_test(test_data_misaligned_for_its_dtype_is_rejected),
        cmocka_unit_test(test_shape_with_a_negative_dimension_is_rejected),
        cmocka_unit_test(test_exact_mode_rejects_holes_and_trailing_data),
        cmocka_unit_test(test_missing_file_is_not_found),
        cmocka_unit_test(test_random_corruptions_are_rejected_or_indexed_safely),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
