/* test_stories260k.c - greedy generation with the real stories260K model reproduces the llama2.c
 * golden outputs byte for byte (../shared/models/stories260K; skipped loudly when absent). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>
#include <cmocka.h>

#include "runtime/model/generate.h"
#include "test_stories_common.h"

/* llama2.c convention (README of stories260K): BOS + prompt, greedy until the sequence reaches `steps`
 * or BOS is produced; the file holds the decoded prompt + output. */
static void check_golden(kvm_model_t *m, const char *prompt, int steps, const char *golden_file) {
    char *golden = NULL;
    size_t glen = 0;
    assert_int_equal(kvm_read_file(golden_file, &golden, &glen, 0), 0);
    int32_t *ids = NULL;
    int n = 0;
    assert_int_equal(kvm_prompt_encode(m, NULL, prompt, false, &ids, &n), 0);
    assert_int_equal(ids[0], 1);
    char *ptext = NULL;
    size_t plen = 0;
    assert_int_equal(kvm_detokenize(m->tok, ids, n, true, &ptext, &plen), 0);
    kvm_kv_pool_t *pool = kvm_model_kv_pool(m, 0);
    kvm_seq_t seq;
    kvm_seq_init(&seq, pool);
    kvm_gen_params_t gp = {.max_tokens = steps, .max_total_tokens = steps}; /* BOS stops it: the loader's rule */
    kvm_gen_result_t res;
    assert_int_equal(kvm_generate(m, &seq, ids, n, &gp, NULL, NULL, &res), 0);
    size_t tl = plen + res.text_len;
    char *text = malloc(tl + 1);
    memcpy(text, ptext, plen);
    memcpy(text + plen, res.text, res.text_len);
    text[tl] = 0;
    if (tl != glen || memcmp(text, golden, glen)) fprintf(stderr, "ours (%zu bytes):\n[%s]\ngolden (%zu bytes):\n[%s]\n", tl, text, glen, golden);
    assert_int_equal(tl, glen);
    assert_memory_equal(text, golden, glen);
    free(text);
    kvm_free(ptext);
    kvm_free(ids);
    kvm_gen_result_free(&res);
    kvm_seq_free(&seq);
    kvm_kv_pool_free(pool);
    kvm_free(golden);
}

static void test_greedy_once_upon_a_time_matches_llama2c_golden(void **st) {
    NEED_MODEL(st);
    check_golden(*st, "Once upon a time", 256, S260 "/golden-once-upon-a-time.txt");
}

static void test_greedy_tim_and_lily_matches_llama2c_golden(void **st) {
    NEED_MODEL(st);
    check_golden(*st, "Tim and Lily went to the park", 200, S260 "/golden-tim-and-lily.txt");
}

static void test_llama2c_checkpoint_stops_on_bos_without_being_told(void **st) {
    NEED_MODEL(st);
    kvm_model_t *m = *st;
    int32_t *ids = NULL;
    int n = 0;
    assert_int_equal(kvm_prompt_encode(m, NULL, "Lily", false, &ids, &n), 0);
    kvm_kv_pool_t *pool = kvm_model_kv_pool(m, 0);
    kvm_seq_t seq;
    kvm_seq_init(&seq, pool);
    kvm_gen_params_t gp = kvm_gen_default_params();
    gp.max_tokens = 400;
    kvm_gen_result_t res;
    assert_int_equal(kvm_generate(m, &seq, ids, n, &gp, NULL, NULL, &res), 0);
    assert_int_equal(res.stop_reason, KVM_STOP_EOS); /* greedy "Lily" ends its story with BOS after 223 tokens */
    assert_int_equal(res.n_ids, 223);
    for (int i = 0; i < res.n_ids; i++) assert_int_not_equal(res.ids[i], 1);
    kvm_gen_result_free(&res);
    kvm_seq_free(&seq);
    kvm_kv_pool_free(pool);
    kvm_free(ids);
}

static void test_truncated_checkpoint_is_rejected_with_sizes(void **st) {
    (void)st;
    if (!kvm_file_exists(S260 "/stories260K.bin")) {
        fprintf(stderr, "SKIPPED: stories260K not found at %s\n", S260);
        skip();
    }
    kvm_mmap_t mm;
    assert_int_equal(kvm_mmap_open(&mm, S260 "/stories260K.bin"), 0);
    char path[] = "/tmp/kvm_trunc_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "wb");
    fwrite(mm.data, 1, mm.size / 2, f);
    fclose(f);
    kvm_mmap_close(&mm);
    kvm_model_params_t o = {.backend = "cpu"};
    assert_null(kvm_model_load(path, &o));
    assert_non_null(strstr(kvm_errmsg(), "truncated"));
    assert_non_null(strstr(kvm_errmsg(), path));
    unlink(path);
}

static void test_garbage_header_is_rejected(void **st) {
    (void)st;
    char path[] = "/tmp/kvm_garbage_XXXXXX";
    int fd = mkstemp(path);
    int32_t h[7] = {64, 172, -5, 8, 4, 512, 512};
    assert_int_equal(write(fd, h, sizeof h), (ssize_t)sizeof h);
    close(fd);
    kvm_model_params_t o = {.backend = "cpu"};
    assert_null(kvm_model_load(path, &o));
    assert_int_equal(kvm_errcode(), KVM_EFORMAT);
    assert_non_null(strstr(kvm_errmsg(), "not a llama2.c checkpoint: header field n_layers (int32 at byte 8)"));
    unlink(path);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_once_upon_a_time_matches_llama2c_golden),
        cmocka_unit_test(test_greedy_tim_and_lily_matches_llama2c_golden),
        cmocka_unit_test(test_llama2c_checkpoint_stops_on_bos_without_being_told),
        cmocka_unit_test(test_truncated_checkpoint_is_rejected_with_sizes),
        cmocka_unit_test(test_garbage_header_is_rejected),
    };
    return cmocka_run_group_tests_name("stories260k", tests, stories_setup, stories_teardown);
}
