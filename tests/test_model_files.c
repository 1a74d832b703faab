/* test_model_files.c - malformed model files (issue 19): llama2.c checkpoints whose header disagrees with
 * their size, error messages that must not echo the bytes of the file they complain about, errors of
 * generation_config.json named there, and truncations / mutations of models/minillama-2m's files.
 *
 * Files are written in a temporary directory from stories260K.bin and minillama-2m (copied, then broken
 * one way at a time). Every failure asserts the status code and the words a user needs. */
#include <ftw.h>
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "runtime/model/model.h"
#include "runtime/model/tokenizer.h"
#include "test_common.h"

TC_TMPDIR_FIXTURE("kvm_mfiles")

#define S260 KVM_SHARED_DIR "/models/stories260K/stories260K.bin"
#define MINILLAMA KVM_SOURCE_DIR "/models/minillama-2m"

/* ---- helpers ------------------------------------------------------------------------------------ */

static unsigned char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)sz + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)sz, f), (size_t)sz);
    fclose(f);
    b[sz] = 0;
    *n = (size_t)sz;
    return b;
}

static const char *write_bytes(const char *name, const void *data, size_t n) {
    static char p[1024];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    if (n) assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
    return p;
}

/* stories260K.bin with header field 5 (vocab size; negative = untied classifier) set to vocab, and extra
 * bytes appended (extra < 0: cut). */
static const char *l2c_variant(const char *name, int32_t vocab, long extra) {
    if (access(S260, R_OK) != 0) { /* the shared data is not everywhere: skipped loudly */
        fprintf(stderr, "SKIPPED: stories260K not found at %s\n", S260);
        skip();
    }
    size_t n;
    unsigned char *b = slurp(S260, &n);
    memcpy(b + 20, &vocab, 4);
    size_t len = extra < 0 ? n - (size_t)-extra : n;
    unsigned char *out = calloc(1, len + (extra > 0 ? (size_t)extra : 0) + 1);
    assert_non_null(out);
    memcpy(out, b, len);
    const char *p = write_bytes(name, out, len + (extra > 0 ? (size_t)extra : 0));
    free(out);
    free(b);
    return p;
}

static int load_fails(const char *path) {
    kvm_errclear();
    kvm_model_t *m = kvm_model_load_opts(path, NULL);
    if (m) {
        kvm_model_free(m);
        return 0;
    }
    if (getenv("KVM_TEST_VERBOSE")) fprintf(stderr, "%s: %s\n", path, kvm_errmsg());
    return kvm_errcode();
}

static void expect_msg(const char *f1, const char *f2, const char *f3) {
    const char *msg = kvm_errmsg();
    if ((f1 && !strstr(msg, f1)) || (f2 && !strstr(msg, f2)) || (f3 && !strstr(msg, f3)))
        fail_msg("message '%s' lacks '%s' / '%s' / '%s'", msg, f1 ? f1 : "", f2 ? f2 : "", f3 ? f3 : "");
}

/* The message echoes none of the file's bytes: no run of 5 of its printable characters, and no integer
 * read from its first 64 bytes (int32 / uint32 / uint64, little-endian, at every offset). */
static void expect_no_bytes_of(const unsigned char *data, size_t n) {
    const char *msg = kvm_errmsg();
    for (size_t i = 0; i + 5 <= n; i++) {
        char run[6];
        memcpy(run, data + i, 5);
        run[5] = 0;
        bool printable = true;
        for (int k = 0; k < 5; k++) printable &= run[k] > ' ' && run[k] < 127;
        if (printable && strstr(msg, run)) fail_msg("message '%s' echoes the file's bytes '%s' (offset %zu)", msg, run, i);
    }
    for (size_t i = 0; i + 8 <= n && i < 64; i++) {
        int32_t s32;
        uint32_t u32;
        uint64_t u64;
        memcpy(&s32, data + i, 4);
        memcpy(&u32, data + i, 4);
        memcpy(&u64, data + i, 8);
        char a[32], b[32], c[32];
        snprintf(a, sizeof a, "%" PRId32, s32);
        snprintf(b, sizeof b, "%" PRIu32, u32);
        snprintf(c, sizeof c, "%" PRIu64, u64);
        if (strlen(a) >= 6 && strstr(msg, a)) fail_msg("message '%s' echoes the int32 %s at offset %zu", msg, a, i);
        if (strlen(b) >= 6 && strstr(msg, b)) fail_msg("message '%s' echoes the uint32 %s at offset %zu", msg, b, i);
        if (strlen(c) >= 6 && strstr(msg, c)) fail_msg("message '%s' echoes the uint64 %s at offset %zu", msg, c, i);
    }
}

static const char k_secret[] =
    "db_password=hunter2-correct-horse\napi_key=sk-live-0123456789abcdefghijklmnop\n"
    "# a file the process can read but a client must not see\n";

/* ---- llama2.c checkpoints ------------------------------------------------------------------------ */

static void test_llama2c_with_the_most_negative_vocab_size_is_refused_not_a_crash(void **st) {
    (void)st;
    assert_int_equal(load_fails(l2c_variant("negmin.bin", INT32_MIN, 0)), KVM_EFORMAT);
    expect_msg("negmin.bin", "vocab", NULL);
}

static void test_llama2c_with_a_huge_negative_vocab_size_is_refused(void **st) {
    (void)st;
    assert_int_equal(load_fails(l2c_variant("negbig.bin", -(1 << 30), 0)), KVM_EFORMAT);
    expect_msg("negbig.bin", "vocab", NULL);
}

static void test_llama2c_untied_header_on_a_tied_size_file_names_both_sizes(void **st) {
    (void)st;
    assert_int_equal(load_fails(l2c_variant("untied_short.bin", -512, 0)), KVM_EFORMAT);
    expect_msg("1056540 bytes", "1187612", "untied");
}

static void test_llama2c_untied_checkpoint_of_the_right_size_loads(void **st) {
    (void)st;
    const char *p = l2c_variant("untied_ok.bin", -512, 512 * 64 * 4);
    kvm_model_t *m = kvm_model_load_opts(p, NULL);
    assert_non_null(m);
    assert_false(m->cfg.tied_embeddings);
    assert_int_equal(m->cfg.vocab_size, 512);
    assert_ptr_not_equal(m->w.lm_head.data, m->w.tok_emb.data);
    kvm_model_free(m);
}

static void test_llama2c_file_longer_than_its_header_implies_is_refused_with_both_sizes(void **st) {
    (void)st;
    assert_int_equal(load_fails(l2c_variant("long.bin", 512, 1000)), KVM_EFORMAT);
    expect_msg("1057540 bytes", "1056540", NULL);
}

static void test_llama2c_tied_header_on_an_untied_size_file_is_refused_with_both_sizes(void **st) {
    (void)st;
    assert_int_equal(load_fails(l2c_variant("tied_long.bin", 512, 512 * 64 * 4)), KVM_EFORMAT);
    expect_msg("1187612 bytes", "1056540", "tied");
}

static void test_llama2c_truncated_by_one_float_is_refused_with_both_sizes(void **st) {
    (void)st;
    assert_int_equal(load_fails(l2c_variant("cut.bin", 512, -4)), KVM_EFORMAT);
    expect_msg("1056536 bytes", "1056540", NULL);
}

/* ---- error messages do not echo file contents ---------------------------------------------------- */

static void test_text_file_opened_as_a_model_is_named_without_echoing_its_bytes(void **st) {
    (void)st;
    const char *p = write_bytes("secret.txt", k_secret, sizeof k_secret - 1);
    assert_int_equal(load_fails(p), KVM_EFORMAT);
    expect_msg("secret.txt", "llama2.c", NULL);
    expect_no_bytes_of((const unsigned char *)k_secret, sizeof k_secret - 1);
}

static void test_text_file_opened_as_a_tokenizer_bin_is_named_without_echoing_its_bytes(void **st) {
    (void)st;
    const char *p = write_bytes("secret.tok", k_secret, sizeof k_secret - 1);
    kvm_errclear();
    kvm_tokenizer_t *t = kvm_tokenizer_load_bin(p, 32);
    assert_null(t);
    assert_int_equal(kvm_errcode(), KVM_EFORMAT);
    expect_msg("secret.tok", NULL, NULL);
    expect_no_bytes_of((const unsigned char *)k_secret, sizeof k_secret - 1);
}

/* A model directory whose model.safetensors is some other file: the safetensors header length (its first
 * 8 bytes) is not printed. */
static void test_text_file_as_model_safetensors_is_named_without_echoing_its_bytes(void **st) {
    (void)st;
    char dir[512], p[600];
    snprintf(dir, sizeof dir, "%s/st_secret", g_dir);
    assert_int_equal(mkdir(dir, 0755), 0);
    size_t n;
    unsigned char *cfg = slurp(MINILLAMA "/config.json", &n);
    snprintf(p, sizeof p, "%s/config.json", dir);
    FILE *f = fopen(p, "wb");
    fwrite(cfg, 1, n, f);
    fclose(f);
    free(cfg);
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    f = fopen(p, "wb");
    fwrite(k_secret, 1, sizeof k_secret - 1, f);
    fclose(f);
    assert_int_equal(load_fails(dir), KVM_EFORMAT);
    expect_msg("model.safetensors", NULL, NULL);
    expect_no_bytes_of((const unsigned char *)k_secret, sizeof k_secret - 1);
}

/* ---- generation_config.json -------------------------------------------------------------------- */

/* minillama-2m in g_dir/name with `file` replaced by text (NULL: every file linked). Returns the directory. */
static const char *minillama_with(const char *name, const char *file, const char *text) {
    static char dir[512];
    snprintf(dir, sizeof dir, "%s/%s", g_dir, name);
    assert_int_equal(mkdir(dir, 0755), 0);
    const char *files[] = {"config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
                           "model.safetensors"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char src[600], dst[600];
        snprintf(src, sizeof src, "%s/%s", MINILLAMA, files[i]);
        snprintf(dst, sizeof dst, "%s/%s", dir, files[i]);
        if (!file || !text || strcmp(file, files[i])) {
            assert_int_equal(symlink(src, dst), 0);
            continue;
        }
        FILE *f = fopen(dst, "wb");
        assert_non_null(f);
        fputs(text, f);
        fclose(f);
    }
    return dir;
}

static const char *minillama_copy(const char *name, const char *gen) {
    return minillama_with(name, "generation_config.json", gen);
}

static void expect_gen_error(const char *name, const char *gen, int code, const char *field, const char *what) {
    const char *dir = minillama_copy(name, gen);
    assert_int_equal(load_fails(dir), code);
    expect_msg("generation_config.json", field, what);
    if (strstr(kvm_errmsg(), "/config.json")) fail_msg("'%s' blames config.json", kvm_errmsg());
}

static void test_minillama_copy_loads(void **st) {
    (void)st;
    kvm_model_t *m = kvm_model_load_opts(minillama_copy("copy_ok", NULL), NULL);
    assert_non_null(m);
    kvm_model_free(m);
}

static void test_generation_config_eos_outside_the_vocabulary_is_blamed_on_it(void **st) {
    (void)st;
    expect_gen_error("gen_eos_vocab", "{\"eos_token_id\": [2, 5000]}", KVM_ERANGE, "'eos_token_id'", "vocab");
}

static void test_generation_config_eos_beyond_int_range_is_not_wrapped(void **st) {
    (void)st;
    expect_gen_error("gen_eos_wrap", "{\"eos_token_id\": 4294967298}", KVM_EFORMAT, "'eos_token_id'", "integer");
    if (strstr(kvm_errmsg(), "-2147483648") || strstr(kvm_errmsg(), " 2 ")) fail_msg("wrapped value: %s", kvm_errmsg());
}

static void test_generation_config_bos_outside_the_vocabulary_is_blamed_on_it(void **st) {
    (void)st;
    expect_gen_error("gen_bos_vocab", "{\"bos_token_id\": 633}", KVM_ERANGE, "'bos_token_id'", "vocab");
}

static void test_generation_config_top_k_beyond_int_range_is_refused(void **st) {
    (void)st;
    expect_gen_error("gen_topk", "{\"top_k\": 1e30}", KVM_EFORMAT, "'top_k'", "integer");
}

static void test_generation_config_negative_temperature_is_refused(void **st) {
    (void)st;
    expect_gen_error("gen_temp", "{\"temperature\": -1}", KVM_ERANGE, "'temperature'", NULL);
}

static void test_generation_config_top_p_above_one_is_refused(void **st) {
    (void)st;
    expect_gen_error("gen_topp", "{\"top_p\": 1.5}", KVM_ERANGE, "'top_p'", NULL);
}

/* ---- tokenizer.json ------------------------------------------------------------------------------- */

/* Two tokens of model.vocab with one id: the second was silently left out of the vocabulary. */
static void test_tokenizer_json_giving_one_id_to_two_tokens_is_refused(void **st) {
    (void)st;
    size_t n;
    char *text = (char *)slurp(MINILLAMA "/tokenizer.json", &n);
    cJSON *root = cJSON_Parse(text);
    free(text);
    assert_non_null(root);
    cJSON *vocab = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "model"), "vocab");
    cJSON *a = cJSON_GetArrayItem(vocab, 100), *b = cJSON_GetArrayItem(vocab, 101);
    assert_non_null(b);
    cJSON_SetNumberValue(b, a->valuedouble);
    char *out = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    const char *dir = minillama_with("tok_dup", "tokenizer.json", out);
    cJSON_free(out);
    assert_int_equal(load_fails(dir), KVM_EFORMAT);
    expect_msg("tokenizer.json", "model.vocab", "two tokens");
}

/* ---- truncations of minillama-2m's files --------------------------------------------------------- */

/* minillama-2m in g_dir/name with `file` cut to n bytes (the others linked). */
static const char *minillama_cut(const char *name, const char *file, size_t n) {
    static char dir[512];
    char p[700], src[700];
    snprintf(dir, sizeof dir, "%s/%s", g_dir, name);
    mkdir(dir, 0755);
    const char *files[] = {"config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
                           "model.safetensors"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        snprintf(src, sizeof src, "%s/%s", MINILLAMA, files[i]);
        unlink(p);
        if (strcmp(files[i], file)) {
            assert_int_equal(symlink(src, p), 0);
            continue;
        }
        size_t len;
        unsigned char *b = slurp(src, &len);
        FILE *f = fopen(p, "wb");
        assert_non_null(f);
        if (n) assert_int_equal(fwrite(b, 1, n < len ? n : len, f), n < len ? n : len);
        fclose(f);
        free(b);
    }
    return dir;
}

/* Cuts `file` at `steps` points spread over its length (and at every byte of its last 16): every cut fails to
 * load with a format error naming a file of the model, none crashes (ASan) or loads. */
static void expect_every_cut_refused(const char *file, int steps) {
    char src[600];
    snprintf(src, sizeof src, "%s/%s", MINILLAMA, file);
    size_t len;
    unsigned char *b = slurp(src, &len);
    while (len > 0 && (b[len - 1] == '\n' || b[len - 1] == ' ')) len--; /* trailing white space is no cut */
    free(b);
    for (int k = 0; k < steps + 16; k++) {
        size_t n = k < steps ? len * (size_t)k / (size_t)steps : len - 1 - (size_t)(k - steps);
        int rc = load_fails(minillama_cut("cut", file, n));
        if (rc != KVM_EFORMAT && rc != KVM_ESHAPE && rc != KVM_ENOENT)
            fail_msg("%s cut to %zu of %zu bytes: %s (%s)", file, n, len, rc ? kvm_errname(rc) : "loaded", kvm_errmsg());
    }
}

static void test_every_cut_of_model_safetensors_is_refused(void **st) {
    (void)st;
    expect_every_cut_refused("model.safetensors", 64);
}

static void test_every_cut_of_config_json_is_refused(void **st) {
    (void)st;
    expect_every_cut_refused("config.json", 64);
}

static void test_every_cut_of_tokenizer_json_is_refused(void **st) {
    (void)st;
    expect_every_cut_refused("tokenizer.json", 64);
}

TC_MAIN(setup, teardown,
        cmocka_unit_test(test_llama2c_with_the_most_negative_vocab_size_is_refused_not_a_crash),
        cmocka_unit_test(test_llama2c_with_a_huge_negative_vocab_size_is_refused),
        cmocka_unit_test(test_llama2c_untied_header_on_a_tied_size_file_names_both_sizes),
        cmocka_unit_test(test_llama2c_untied_checkpoint_of_the_right_size_loads),
        cmocka_unit_test(test_llama2c_file_longer_than_its_header_implies_is_refused_with_both_sizes),
        cmocka_unit_test(test_llama2c_tied_header_on_an_untied_size_file_is_refused_with_both_sizes),
        cmocka_unit_test(test_llama2c_truncated_by_one_float_is_refused_with_both_sizes),
        cmocka_unit_test(test_text_file_opened_as_a_model_is_named_without_echoing_its_bytes),
        cmocka_unit_test(test_text_file_opened_as_a_tokenizer_bin_is_named_without_echoing_its_bytes),
        cmocka_unit_test(test_text_file_as_model_safetensors_is_named_without_echoing_its_bytes),
        cmocka_unit_test(test_minillama_copy_loads),
        cmocka_unit_test(test_generation_config_eos_outside_the_vocabulary_is_blamed_on_it),
        cmocka_unit_test(test_generation_config_eos_beyond_int_range_is_not_wrapped),
        cmocka_unit_test(test_generation_config_bos_outside_the_vocabulary_is_blamed_on_it),
        cmocka_unit_test(test_generation_config_top_k_beyond_int_range_is_refused),
        cmocka_unit_test(test_generation_config_negative_temperature_is_refused),
        cmocka_unit_test(test_generation_config_top_p_above_one_is_refused),
        cmocka_unit_test(test_tokenizer_json_giving_one_id_to_two_tokens_is_refused),
        cmocka_unit_test(test_every_cut_of_model_safetensors_is_refused),
        cmocka_unit_test(test_every_cut_of_config_json_is_refused),
        cmocka_unit_test(test_every_cut_of_tokenizer_json_is_refused))
