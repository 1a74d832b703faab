/* test_settings.c - settings are parameters: the load options and the CUDA backend's switches are validated
 * where they enter, and a bad value is an error that names the setting and its values (no shared data). */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "runtime/model/forward.h"
#include "runtime/model/synthetic.h"

/* rc is KVM_EINVAL and the message contains want. */
static void assert_einval(int rc, const char *want) {
    if (!strstr(kvm_errmsg(), want)) fprintf(stderr, "message '%s' lacks '%s'\n", kvm_errmsg(), want);
    assert_int_equal(rc, KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), want));
}

/* ---- load options ---------------------------------------------------------------------------------- */

static void test_a_misspelt_kv_dtype_names_the_setting_and_its_values(void **st) {
    (void)st;
    kvm_dtype_t t = KVM_F32;
    assert_einval(kvm_dtype_parse("bf61", "kv_dtype", &t), "kv_dtype: 'bf61' is not one of f32, f16, bf16");
    assert_int_equal(t, KVM_F32);
}

static void test_dtype_names_parse_in_either_case(void **st) {
    (void)st;
    kvm_dtype_t t = KVM_F32;
    assert_int_equal(kvm_dtype_parse("bf16", "x", &t), 0);
    assert_int_equal(t, KVM_BF16);
    assert_int_equal(kvm_dtype_parse("F16", "x", &t), 0);
    assert_int_equal(t, KVM_F16);
    assert_int_equal(kvm_dtype_parse("f32", "x", &t), 0);
    assert_int_equal(t, KVM_F32);
}

/* kvm_model_load with these options fails with KVM_EINVAL and the message want, before it reads any file */
static void assert_load_rejects(kvm_load_opts_t o, const char *want) {
    assert_null(kvm_model_load_opts("/nonexistent/model.bin", &o));
    assert_einval(kvm_errcode(), want);
}

static void test_model_load_rejects_a_kv_dtype_out_of_range_before_reading_anything(void **st) {
    (void)st;
    assert_load_rejects((kvm_load_opts_t){.backend = "cpu", .kv_dtype = (kvm_dtype_t)7, .kv_dtype_set = true},
                        "kv_dtype: 7 is not one of KVM_F32, KVM_F16, KVM_BF16");
}

static void test_model_load_rejects_a_device_dtype_out_of_range(void **st) {
    (void)st;
    assert_load_rejects((kvm_load_opts_t){.backend = "cpu", .device_dtype = (kvm_dtype_t)-1, .device_dtype_set = true},
                        "device_dtype: -1 is not one of");
}

static void test_model_load_rejects_an_unknown_backend_naming_the_choices(void **st) {
    (void)st;
    assert_load_rejects((kvm_load_opts_t){.backend = "gpu"}, "backend: 'gpu' is not one of auto, cpu, cuda");
}

static void test_backend_selection_rejects_an_unknown_name(void **st) {
    (void)st;
    assert_null(kvm_ops_select("cpuu"));
    assert_einval(kvm_errcode(), "backend: 'cpuu' is not one of auto, cpu, cuda");
}

static void test_a_synthetic_model_rejects_a_bad_kv_dtype(void **st) {
    (void)st;
    kvm_load_opts_t o = {.backend = "cpu", .quiet = true, .kv_dtype = (kvm_dtype_t)3, .kv_dtype_set = true};
    assert_null(kvm_model_synthetic("tiny-qwen3", &o));
    assert_einval(kvm_errcode(), "kv_dtype: 3 is not one of");
}

static void test_no_options_are_valid_options(void **st) {
    (void)st;
    assert_int_equal(kvm_load_opts_check(NULL), 0);
    kvm_load_opts_t o = {0};
    assert_int_equal(kvm_load_opts_check(&o), 0);
}

static void test_the_kv_dtype_option_sets_the_dtype_of_the_models_kv_pools(void **st) {
    (void)st;
    kvm_load_opts_t o = {.backend = "cpu", .quiet = true, .kv_dtype = KVM_BF16, .kv_dtype_set = true};
    kvm_model_t *m = kvm_model_synthetic("tiny-qwen3", &o);
    assert_non_null(m);
    kvm_kv_pool_t *p = kvm_model_kv_pool(m, (size_t)1 << 20);
    assert_non_null(p);
    assert_int_equal(p->geom.dtype, KVM_BF16);
    kvm_kv_pool_free(p);
    /* and back to the CPU default (F32) when the option is unset */
    assert_int_equal(kvm_forward_configure(m, NULL), 0);
    p = kvm_model_kv_pool(m, (size_t)1 << 20);
    assert_non_null(p);
    assert_int_equal(p->geom.dtype, KVM_F32);
    kvm_kv_pool_free(p);
    kvm_model_free(m);
}

/* First weights of the synthetic tiny-qwen3 built with these options. */
static float first_weight(const kvm_load_opts_t *o, uint64_t *model_id) {
    kvm_model_t *m = kvm_model_synthetic("tiny-qwen3", o);
    assert_non_null(m);
    float w = kvm_tensor_get(&m->w.layers[0].wq, 0);
    *model_id = m->model_id;
    kvm_model_free(m);
    return w;
}

static void test_the_synthetic_seed_option_chooses_the_weights(void **st) {
    (void)st;
    uint64_t id_def, id_1234, id_7;
    kvm_load_opts_t def = {.backend = "cpu", .quiet = true};
    kvm_load_opts_t s1234 = {.backend = "cpu", .quiet = true, .synthetic_seed = 1234, .synthetic_seed_set = true};
    kvm_load_opts_t s7 = {.backend = "cpu", .quiet = true, .synthetic_seed = 7, .synthetic_seed_set = true};
    float w_def = first_weight(&def, &id_def), w_1234 = first_weight(&s1234, &id_1234), w_7 = first_weight(&s7, &id_7);
    assert_true(w_def == w_1234); /* 1234 is the default */
    assert_true(id_def == id_1234);
    assert_true(w_7 != w_def);
    assert_true(id_7 != id_def);
}

/* ---- the CUDA backend's switches ------------------------------------------------------------------- */

static bool opts_equal(const kvm_cuda_opts_t *a, const kvm_cuda_opts_t *b) {
#define SAME(f) (a->f == b->f)
    return SAME(device) && SAME(profile) && SAME(pdl) && SAME(prefetch) && SAME(skinny) &&
           SAME(skinny_rows) && SAME(attn_dec_mma) && SAME(no_mma_attn) && SAME(attn_wg) && SAME(mma_load) &&
           SAME(mma_occ) && SAME(ffn) && SAME(ffn_gemv) && SAME(qkv_fuse) &&
           SAME(qkv16) && SAME(norm16) && SAME(y16) && SAME(norm_v) && SAME(kvcomm_dist);
#undef SAME
}

static void test_every_cuda_switch_rejects_a_value_outside_its_list_naming_the_switch(void **st) {
    (void)st;
    static const struct {
        const char *key, *bad, *want;
    } cases[] = {
        {"device", "-1", "cuda device: '-1' is not one of 0, 1, ..."},
        {"profile", "yes", "cuda profile: 'yes' is not one of 0, 1"},
        {"pdl", "2", "cuda pdl: '2' is not one of 0, 1"},
        {"prefetch", "5", "cuda prefetch: '5' is not one of 0, 1, 2"},
        {"skinny", "gemm", "cuda skinny: 'gemm' is not one of auto, gemv, mma"},
        {"skinny_rows", "48", "cuda skinny_rows: '48' is not one of 16, 32, 64"},
        {"attn_wg", "2", "cuda attn_wg: '2' is not one of 0, 1, 5, 6, 7, 8"},
        {"attn_dec_mma", "", "cuda attn_dec_mma: '' is not one of 0, 1"},
        {"no_mma_attn", "true", "cuda no_mma_attn: 'true' is not one of 0, 1"},
        {"mma_occ", "2", "cuda mma_occ: '2' is not one of 1, 3"},
        {"attn_dec_mma", "on", "cuda attn_dec_mma: 'on' is not one of 0, 1"},
        {"ffn", "01", "cuda ffn: '01' is not one of 0, 1"},
        {"ffn_gemv", "1 ", "cuda ffn_gemv: '1 ' is not one of 0, 1"},
        {"qkv_fuse", "-0", "cuda qkv_fuse: '-0' is not one of 0, 1"},
        {"qkv16", "x", "cuda qkv16: 'x' is not one of 0, 1"},
        {"norm16", "off", "cuda norm16: 'off' is not one of 0, 1"},
        {"y16", "10", "cuda y16: '10' is not one of 0, 1"},
        {"norm_v", "0.0", "cuda norm_v: '0.0' is not one of 0, 1"},
        {"kvcomm_dist", "v3", "cuda kvcomm_dist: 'v3' is not one of v2, v1, v2u4"},
    };
    const kvm_cuda_opts_t def = kvm_cuda_opts_default();
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kvm_cuda_opts_t o = def;
        assert_einval(kvm_cuda_opts_parse(&o, cases[i].key, cases[i].bad), cases[i].want);
        assert_true(opts_equal(&o, &def)); /* unchanged */
    }
}

static void test_an_unknown_cuda_switch_is_rejected_listing_the_switches(void **st) {
    (void)st;
    kvm_cuda_opts_t o = kvm_cuda_opts_default();
    assert_einval(kvm_cuda_opts_parse(&o, "prefetchh", "1"), "cuda: 'prefetchh' is not a setting (one of device, profile,");
    assert_non_null(strstr(kvm_errmsg(), "kvcomm_dist)"));
}

static void test_cuda_switches_parse_into_their_fields(void **st) {
    (void)st;
    kvm_cuda_opts_t o = kvm_cuda_opts_default();
    assert_int_equal(kvm_cuda_opts_parse(&o, "skinny", "mma"), 0);
    assert_int_equal(o.skinny, KVM_CUDA_SKINNY_MMA);
    assert_int_equal(kvm_cuda_opts_parse(&o, "kvcomm_dist", "v2u4"), 0);
    assert_int_equal(o.kvcomm_dist, KVM_CUDA_DIST_V2U4);
    assert_int_equal(kvm_cuda_opts_parse(&o, "pdl", "0"), 0);
    assert_false(o.pdl);
    assert_int_equal(kvm_cuda_opts_parse(&o, "mma_occ", "1"), 0);
    assert_int_equal(o.mma_occ, 1);
    assert_int_equal(kvm_cuda_opts_parse(&o, "attn_wg", "7"), 0);
    assert_int_equal(o.attn_wg, 7);
    assert_int_equal(kvm_cuda_opts_parse(&o, "dec_merge", "1"), KVM_EINVAL); /* removed after the H100 call */
    assert_int_equal(kvm_cuda_opts_parse(&o, "pdl_chain", "1"), KVM_EINVAL); /* removed after the H100 call */
    assert_int_equal(kvm_cuda_opts_parse(&o, "device", "3"), 0);
    assert_int_equal(o.device, 3);
    assert_int_equal(kvm_cuda_opts_check(&o), 0);
}

static void test_the_cuda_backend_refuses_bad_settings_and_keeps_its_own(void **st) {
    (void)st;
    const kvm_cuda_opts_t before = kvm_cuda_get_opts();
    kvm_cuda_opts_t o = kvm_cuda_opts_default();
    o.prefetch = 5;
    assert_einval(kvm_cuda_set_opts(&o), "cuda prefetch: 5 is not one of 0, 1, 2");
    o = kvm_cuda_opts_default();
    o.skinny = 9;
    assert_einval(kvm_cuda_set_opts(&o), "cuda skinny: 9 is not one of auto, gemv, mma");
    kvm_cuda_opts_t now = kvm_cuda_get_opts();
    assert_true(opts_equal(&now, &before));
}

static void test_the_cuda_backend_keeps_good_settings(void **st) {
    (void)st;
    const kvm_cuda_opts_t before = kvm_cuda_get_opts();
    kvm_cuda_opts_t o = before;
    o.ffn_gemv = !o.ffn_gemv;
    assert_int_equal(kvm_cuda_set_opts(&o), 0);
    kvm_cuda_opts_t now = kvm_cuda_get_opts();
    assert_int_equal(now.ffn_gemv, o.ffn_gemv);
    assert_int_equal(kvm_cuda_set_opts(&before), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_a_misspelt_kv_dtype_names_the_setting_and_its_values),
        cmocka_unit_test(test_dtype_names_parse_in_either_case),
        cmocka_unit_test(test_model_load_rejects_a_kv_dtype_out_of_range_before_reading_anything),
        cmocka_unit_test(test_model_load_rejects_a_device_dtype_out_of_range),
        cmocka_unit_test(test_model_load_rejects_an_unknown_backend_naming_the_choices),
        cmocka_unit_test(test_backend_selection_rejects_an_unknown_name),
        cmocka_unit_test(test_a_synthetic_model_rejects_a_bad_kv_dtype),
        cmocka_unit_test(test_no_options_are_valid_options),
        cmocka_unit_test(test_the_kv_dtype_option_sets_the_dtype_of_the_models_kv_pools),
        cmocka_unit_test(test_the_synthetic_seed_option_chooses_the_weights),
        cmocka_unit_test(test_every_cuda_switch_rejects_a_value_outside_its_list_naming_the_switch),
        cmocka_unit_test(test_an_unknown_cuda_switch_is_rejected_listing_the_switches),
        cmocka_unit_test(test_cuda_switches_parse_into_their_fields),
        cmocka_unit_test(test_the_cuda_backend_refuses_bad_settings_and_keeps_its_own),
        cmocka_unit_test(test_the_cuda_backend_keeps_good_settings),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
