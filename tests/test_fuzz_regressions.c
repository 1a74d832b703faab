/* test_fuzz_regressions.c - one test per bug the libFuzzer targets of fuzz/ found (docs/security.md,
 * "Fuzzing"). Each reproducer, minimized, is also kept in fuzz/regressions/<target>/, which scripts/fuzz.sh
 * replays under the sanitizers; these tests state the behaviour that was fixed, in the release build too. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <cmocka.h>

#include "runtime/core/core.h"
#include "runtime/model/model.h"
#include "test_common.h"

TC_TMPDIR_FIXTURE("kvm_fuzzreg")

static void write_file(const char *dir, const char *name, const void *data, size_t size) {
    char p[1024];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, size, f), size);
    assert_int_equal(fclose(f), 0);
}

static void write_text(const char *dir, const char *name, const char *text) { write_file(dir, name, text, strlen(text)); }

static const char *k_config = "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 4, \"intermediate_size\": 8, "
                              "\"num_hidden_layers\": 1, \"num_attention_heads\": 2, \"vocab_size\": 8, "
                              "\"max_position_embeddings\": 64%s}";

/* fuzz_config: "eos_token_id": 22147483647 was converted to int (undefined behaviour; UBSan:
 * "2.21475e+10 is outside the range of representable values of type 'int'"). */
static void test_config_eos_token_id_outside_int_range_is_a_format_error(void **st) {
    (void)st;
    const char *vals[] = {", \"eos_token_id\": 22147483647", ", \"eos_token_id\": [2, -1e300]"};
    for (size_t i = 0; i < sizeof vals / sizeof *vals; i++) {
        char text[512];
        snprintf(text, sizeof text, k_config, vals[i]);
        kvm_config_t c;
        assert_int_equal(kvm_config_parse_hf(&c, text, "config.json"), KVM_EFORMAT);
        assert_non_null(strstr(kvm_errmsg(), "eos_token_id"));
    }
}

/* fuzz_config: generation_config.json "top_k": 1e10 was converted to int the same way. */
static void test_generation_config_top_k_outside_int_range_is_a_format_error(void **st) {
    (void)st;
    char dir[512], text[512];
    snprintf(dir, sizeof dir, "%s/topk", g_dir);
    assert_int_equal(mkdir(dir, 0700), 0);
    snprintf(text, sizeof text, k_config, "");
    write_text(dir, "config.json", text);
    write_text(dir, "generation_config.json", "{\"top_k\": 1e10}");
    kvm_model_t *m = kvm_calloc(1, sizeof *m);
    assert_non_null(m);
    assert_int_equal(kvm_load_hf(m, dir), KVM_EFORMAT);
    assert_non_null(strstr(kvm_errmsg(), "generation_config.json"));
    assert_non_null(strstr(kvm_errmsg(), "top_k"));
    kvm_model_free(m);
}

/* Writes a llama2.c checkpoint of header h followed by n_floats zero floats, loads it with kvm_load_llama2c
 * and expects the status code and both message fragments. */
static void expect_llama2c_refused(const int32_t h[7], size_t n_floats, int code, const char *f1, const char *f2) {
    size_t size = 28 + 4 * n_floats;
    uint8_t *file = calloc(1, size);
    assert_non_null(file);
    memcpy(file, h, 28);
    write_file(g_dir, "l2c.bin", file, size);
    free(file);
    char path[512];
    snprintf(path, sizeof path, "%s/l2c.bin", g_dir);
    kvm_model_t *m = kvm_calloc(1, sizeof *m);
    assert_non_null(m);
    assert_int_equal(kvm_load_llama2c(m, path), code);
    assert_non_null(strstr(kvm_errmsg(), f1));
    assert_non_null(strstr(kvm_errmsg(), f2));
    kvm_model_free(m);
}

/* fuzz_llama2c: a header whose vocab_size is INT32_MIN was negated (signed overflow: undefined behaviour,
 * which UBSan reports and the ASan+UBSan build's ctest fails on; the release build happened to wrap). */
static void test_llama2c_header_with_vocab_int32_min_is_implausible(void **st) {
    (void)st;
    const int32_t h[7] = {8, 16, 1, 2, 1, INT32_MIN, 4};
    expect_llama2c_refused(h, 16, KVM_EFORMAT, "not a llama2.c checkpoint", "vocab_size");
}

/* fuzz_llama2c: a header with vocab_size 1 (or 2) loaded, with BOS 1 and EOS 2 outside the vocabulary:
 * the first embedding lookup of a prompt read past tok_emb. The loader now validates its config. */
static void test_llama2c_vocab_smaller_than_its_fixed_special_ids_is_refused(void **st) {
    (void)st;
    for (int32_t vocab = 1; vocab <= 2; vocab++) {
        const int32_t h[7] = {8, 16, 1, 2, 1, vocab, 16}; /* dim 8, ffn 16, 1 layer, 2 heads, 1 kv head, seq 16 */
        size_t n_floats = (size_t)vocab * 8 + 8 * (2 + 2 * 8 + 2 * 4 + 3 * 16) + 8 + 16 * 4;
        expect_llama2c_refused(h, n_floats, KVM_ERANGE, "outside the vocabulary", "vocab_size");
    }
}

/* fuzz_lua: agent fields and graph limits were converted from Lua numbers to C integers unchecked:
 * seed = -1 (UBSan: "-1 is outside the range of representable values of type 'unsigned long'"), top_k,
 * budget or a limit of 1e300 were undefined conversions too. Each is now a load error naming the field. */
static void test_lua_numbers_outside_their_integer_range_fail_the_load_naming_the_field(void **st) {
    (void)st;
    kvm_runtime_params_t p = kvm_runtime_default_params();
    p.model_override = "mock:echo";
    p.quiet = true;
    p.echo_print = false;
    kvm_runtime_t *rt = kvm_runtime_create(&p);
    assert_non_null(rt);
    const char *cases[][2] = {{"seed = -1", "'seed'"}, {"top_k = 1e300", "'top_k'"}, {"budget = 1e300", "'budget'"},
                              {"max_tokens = 0/0", "max_tokens"}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char src[512];
        snprintf(src, sizeof src, "local m = kvmesh.model('mock:echo')\nlocal g = kvmesh.graph{ name = 'r' }\n"
                                  "g:agent('a', { model = m, template = 'x', %s })\ng:edge(kvmesh.START, 'a')\nreturn g\n",
                 cases[i][0]);
        kvm_workflow_t *wf = kvm_workflow_load_string(rt, "reg.lua", src, strlen(src), NULL);
        if (wf || !strstr(kvm_errmsg(), cases[i][1])) fprintf(stderr, "%s: %s\n", cases[i][0], kvm_errmsg());
        assert_null(wf);
        assert_non_null(strstr(kvm_errmsg(), cases[i][1]));
    }
    const char *lim = "local g = kvmesh.graph{ name = 'r', limit = { memory_mb = 1e300 } }\n"
                      "g:func('f', function() end)\ng:edge(kvmesh.START, 'f')\nreturn g\n";
    assert_null(kvm_workflow_load_string(rt, "reg.lua", lim, strlen(lim), NULL));
    assert_non_null(strstr(kvm_errmsg(), "'memory_mb'"));
    kvm_runtime_free(rt);
}

TC_MAIN(setup, teardown, cmocka_unit_test(test_config_eos_token_id_outside_int_range_is_a_format_error),
        cmocka_unit_test(test_generation_config_top_k_outside_int_range_is_a_format_error),
        cmocka_unit_test(test_llama2c_header_with_vocab_int32_min_is_implausible),
        cmocka_unit_test(test_llama2c_vocab_smaller_than_its_fixed_special_ids_is_refused),
        cmocka_unit_test(test_lua_numbers_outside_their_integer_range_fail_the_load_naming_the_field))
