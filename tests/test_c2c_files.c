/* test_c2c_files.c - malformed C2C fuser files (../shared/spec/c2c.md §7, §12 item 4; issue 14's acceptance):
 * each class of defect is refused by kvm_c2c_load with KVM_EFORMAT (KVM_EINVAL for a fuser of another model
 * pair) and a message that names the file and the tensor or config key. The files are written here from a valid
 * random fuser (tests/test_c2c_common.h), edited, and the config's weights_sha256 recomputed unless the test is
 * about that hash. */
#include <ftw.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <cjson/cJSON.h>

#include "runtime/core/core.h"
#include "test_c2c_common.h"
#include "test_common.h"

TC_TMPDIR_FIXTURE("kvm_c2c_files")

static char g_wp[512];

static const char *wpath(const char *name) {
    snprintf(g_wp, sizeof g_wp, "%s/%s.c2c.safetensors", g_dir, name);
    return g_wp;
}

/* kvm_c2c_load must fail with code and a message holding every non-NULL string given. */
static void expect_refused(const char *jp, const kvm_c2c_pair_t *pair, int code, const char *s1, const char *s2, const char *s3) {
    kvm_c2c_fuser_t *f = kvm_c2c_load(jp, pair, NULL);
    if (f) {
        kvm_c2c_free(f);
        fail_msg("%s was accepted", jp);
    }
    const char *m = kvm_errmsg();
    fprintf(stderr, "  refused (%s): %s\n", kvm_errname(kvm_errcode()), m);
    assert_int_equal(kvm_errcode(), code);
    if (s1 && !strstr(m, s1)) fail_msg("message lacks '%s': %s", s1, m);
    if (s2 && !strstr(m, s2)) fail_msg("message lacks '%s': %s", s2, m);
    if (s3 && !strstr(m, s3)) fail_msg("message lacks '%s': %s", s3, m);
}

/* Writes the tensors of t as <name>'s weights and a config with a matching hash; returns the config path. */
static const char *write_edited(const char *name, const tcc_spec_t *s, tcc_tensors_t *t) {
    assert_int_equal(kvm_st_write(wpath(name), t->e, t->n), 0);
    tcc_tensors_free(t);
    return tcc_write_json(g_dir, name, s, "");
}

static void drop(tcc_tensors_t *t, const char *name) {
    int i = tcc_find(t, name);
    assert_true(i >= 0);
    free((void *)t->e[i].name);
    free((void *)t->e[i].data);
    t->e[i] = t->e[--t->n];
}

static void test_valid_fuser_loads(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_BF16);
    kvm_c2c_fuser_t *f = kvm_c2c_load(tcc_write_fuser(g_dir, "ok", &s), NULL, NULL);
    if (!f) fail_msg("%s", kvm_errmsg());
    assert_int_equal(f->cfg.layer_map[0], 1);
    assert_int_equal(f->cfg.layer_map[1], 2);
    assert_true(f->layers[0][0].open && !f->layers[1][1].open);
    kvm_c2c_free(f);
}

static void test_wrong_shape_names_the_tensor(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    tcc_tensors_t t;
    tcc_make(&s, &t);
    kvm_st_entry_t *e = &t.e[tcc_find(&t, "layers.0.k.in.weight")];
    int64_t d0 = e->shape[0];
    e->shape[0] = e->shape[1], e->shape[1] = d0; /* same bytes, transposed shape */
    expect_refused(write_edited("shape", &s, &t), NULL, KVM_EFORMAT, wpath("shape"), "'layers.0.k.in.weight'", "expected [24, 32]");
}

static void test_wrong_dtype_names_the_tensor(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    tcc_tensors_t t;
    tcc_make(&s, &t);
    drop(&t, "layers.1.v.out.bias");
    unsigned r = 3;
    tcc_add(&t, "layers.1.v.out.bias", KVM_F16, s.ht * s.dt, 0, 0.1f, 0, &r);
    expect_refused(write_edited("dtype", &s, &t), NULL, KVM_EFORMAT, wpath("dtype"), "'layers.1.v.out.bias'", "F16");
}

static void test_unknown_dtype_is_a_format_error(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    const char *jp = tcc_write_fuser(g_dir, "f64", &s);
    /* rewrite "F32" of the last gate as "F64" (same length; the loader reads no other dtypes) */
    FILE *fp = fopen(wpath("f64"), "r+b");
    char hdr[8192];
    size_t n = fread(hdr, 1, sizeof hdr, fp);
    char *g = strstr(hdr + 8, "\"layers.1.v.gate\":{\"dtype\":\"F32\"");
    assert_non_null(g);
    assert_true((size_t)(g - hdr) < n);
    fseek(fp, (long)(g - hdr) + (long)strlen("\"layers.1.v.gate\":{\"dtype\":\"F"), SEEK_SET);
    fputs("64", fp);
    fclose(fp);
    expect_refused(jp, NULL, KVM_EFORMAT, wpath("f64"), "'layers.1.v.gate'", "F64");
}

static void test_missing_tensor_is_named(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_BF16);
    tcc_tensors_t t;
    tcc_make(&s, &t);
    drop(&t, "layers.1.k.wgt.0.down");
    expect_refused(write_edited("missing", &s, &t), NULL, KVM_EFORMAT, wpath("missing"), "'layers.1.k.wgt.0.down'", "missing");
}

static void test_missing_closed_gate_branch_tensor_is_named(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_BF16); /* layer 1's V is closed: its tensors are still required */
    tcc_tensors_t t;
    tcc_make(&s, &t);
    drop(&t, "layers.1.v.proj.0.up");
    expect_refused(write_edited("closedmiss", &s, &t), NULL, KVM_EFORMAT, "'layers.1.v.proj.0.up'", "missing", NULL);
}

static void test_extra_tensor_is_named(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_BF16);
    tcc_tensors_t t;
    tcc_make(&s, &t);
    unsigned r = 1;
    tcc_add(&t, "layers.0.k.gate_temperature", KVM_BF16, 1, 0, 0, 1.0f, &r);
    expect_refused(write_edited("extra", &s, &t), NULL, KVM_EFORMAT, wpath("extra"), "unexpected tensor 'layers.0.k.gate_temperature'",
                   NULL);
}

static void test_duplicate_tensor_name_is_named(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    tcc_tensors_t t;
    tcc_make(&s, &t);
    unsigned r = 1;
    tcc_add(&t, "layers.0.v.in.bias", KVM_F32, s.H, 0, 0.1f, 0, &r);
    expect_refused(write_edited("dup", &s, &t), NULL, KVM_EFORMAT, wpath("dup"), "'layers.0.v.in.bias' appears twice", NULL);
}

/* Rewrites the header of a safetensors file with edit(), keeping the data area and padding to a multiple of 8;
 * extra_data bytes (zeros) are appended to the data area. */
static void rewrite_header(const char *path, void (*edit)(cJSON *), size_t extra_data) {
    char *buf;
    size_t len;
    assert_int_equal(kvm_read_file(path, &buf, &len, (size_t)1 << 26), 0);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | (uint8_t)buf[i];
    cJSON *h = cJSON_ParseWithLength(buf + 8, (size_t)n);
    assert_non_null(h);
    edit(h);
    char *txt = cJSON_PrintUnformatted(h);
    size_t tl = strlen(txt), pl = (tl + 7) / 8 * 8;
    FILE *fp = fopen(path, "wb");
    for (int i = 0; i < 8; i++) fputc((int)((pl >> (8 * i)) & 255), fp);
    fwrite(txt, 1, tl, fp);
    for (size_t i = tl; i < pl; i++) fputc(' ', fp);
    fwrite(buf + 8 + n, 1, len - 8 - (size_t)n, fp);
    for (size_t i = 0; i < extra_data; i++) fputc(0, fp);
    fclose(fp);
    cJSON_free(txt);
    cJSON_Delete(h);
    kvm_free(buf);
}

static void set_offsets(cJSON *h, const char *name, double b, double e) {
    cJSON *off = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(h, name), "data_offsets");
    cJSON_SetNumberValue(cJSON_GetArrayItem(off, 0), b);
    cJSON_SetNumberValue(cJSON_GetArrayItem(off, 1), e);
}

static double offset_of(cJSON *h, const char *name, int which) {
    cJSON *off = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(h, name), "data_offsets");
    return cJSON_GetArrayItem(off, which)->valuedouble;
}

/* layer 0 V's in.bias takes the bytes of layer 0 K's in.bias (same size): overlap (and a hole where it was) */
static void edit_overlap(cJSON *h) {
    set_offsets(h, "layers.0.v.in.bias", offset_of(h, "layers.0.k.in.bias", 0), offset_of(h, "layers.0.k.in.bias", 1));
}

/* the last tensor in the buffer (layer 1 V's gate, 4 bytes) moves 4 bytes on: a hole before it */
static void edit_hole(cJSON *h) {
    double b = offset_of(h, "layers.1.v.gate", 0);
    set_offsets(h, "layers.1.v.gate", b + 4, b + 8);
}

static void test_overlapping_ranges_are_named(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    assert_non_null(tcc_write_fuser(g_dir, "overlap", &s));
    rewrite_header(wpath("overlap"), edit_overlap, 0);
    const char *jp = tcc_write_json(g_dir, "overlap", &s, "");
    expect_refused(jp, NULL, KVM_EFORMAT, wpath("overlap"), "overlap", "layers.0.");
}

static void test_holey_ranges_are_named(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    assert_non_null(tcc_write_fuser(g_dir, "hole", &s));
    rewrite_header(wpath("hole"), edit_hole, 4);
    const char *jp = tcc_write_json(g_dir, "hole", &s, "");
    expect_refused(jp, NULL, KVM_EFORMAT, wpath("hole"), "unused bytes before tensor 'layers.1.v.gate'", NULL);
}

static void no_edit(cJSON *h) { (void)h; }

static void test_trailing_bytes_are_refused(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    assert_non_null(tcc_write_fuser(g_dir, "trail", &s));
    rewrite_header(wpath("trail"), no_edit, 8);
    expect_refused(tcc_write_json(g_dir, "trail", &s, ""), NULL, KVM_EFORMAT, wpath("trail"), "after the last tensor", NULL);
}

static void test_truncated_file_names_the_tensor(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    const char *jp = tcc_write_fuser(g_dir, "trunc", &s);
    char *buf;
    size_t len;
    assert_int_equal(kvm_read_file(wpath("trunc"), &buf, &len, (size_t)1 << 26), 0);
    FILE *fp = fopen(wpath("trunc"), "wb");
    fwrite(buf, 1, len - 100, fp);
    fclose(fp);
    kvm_free(buf);
    expect_refused(jp, NULL, KVM_EFORMAT, wpath("trunc"), "truncated", "tensor 'layers.1.v.");
}

static void test_header_length_past_eof_is_refused(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    const char *jp = tcc_write_fuser(g_dir, "hdr", &s);
    FILE *fp = fopen(wpath("hdr"), "r+b");
    uint8_t len8[8] = {0x00, 0x00, 0x10, 0, 0, 0, 0, 0}; /* 1 MiB: under the limit, past the end */
    fwrite(len8, 1, 8, fp);
    fclose(fp);
    expect_refused(jp, NULL, KVM_EFORMAT, wpath("hdr"), "runs past the end of the file", NULL);
    fp = fopen(wpath("hdr"), "r+b");
    uint8_t big[8] = {0x00, 0xc2, 0xeb, 0x0b, 0, 0, 0, 0}; /* 200,000,000 */
    fwrite(big, 1, 8, fp);
    fclose(fp);
    expect_refused(jp, NULL, KVM_EFORMAT, wpath("hdr"), "limit", NULL);
}

static void test_nan_gate_is_named(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_BF16);
    s.gate[0][1] = NAN;
    expect_refused(tcc_write_fuser(g_dir, "nangate", &s), NULL, KVM_EFORMAT, wpath("nangate"), "'layers.0.v.gate'", "not finite");
}

static void test_nan_weight_is_named(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    tcc_tensors_t t;
    tcc_make(&s, &t);
    ((float *)t.e[tcc_find(&t, "layers.1.k.trunk.0.up")].data)[17] = INFINITY;
    expect_refused(write_edited("naninf", &s, &t), NULL, KVM_EFORMAT, wpath("naninf"), "'layers.1.k.trunk.0.up'", "element 17");
}

static void test_gates_open_disagreeing_with_the_logit_is_named(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_BF16);
    assert_non_null(tcc_write_fuser(g_dir, "gates", &s));
    tcc_spec_t lie = s;
    lie.gate[1][1] = 1.0f; /* the config says open; the file's logit is -0.25 */
    const char *jp = tcc_write_json(g_dir, "gates", &lie, "");
    expect_refused(jp, NULL, KVM_EFORMAT, "gates.c2c.json", "gates_open.v[1]", "'layers.1.v.gate'");
}

static void test_layer_map_out_of_range_is_named(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_BF16);
    s.layer_map[1] = 3; /* the sharer has 3 layers */
    expect_refused(tcc_write_fuser(g_dir, "map", &s), NULL, KVM_EFORMAT, "map.c2c.json", "layer_map[1]", "[0, 3)");
}

/* Replaces the first `from` in the config file by `to`. */
static void edit_config(const char *jp, const char *from, const char *to) {
    char *buf;
    size_t len;
    assert_int_equal(kvm_read_file(jp, &buf, &len, 1 << 20), 0);
    char *at = strstr(buf, from);
    assert_non_null(at);
    FILE *fp = fopen(jp, "wb");
    fwrite(buf, 1, (size_t)(at - buf), fp);
    fputs(to, fp);
    fputs(at + strlen(from), fp);
    fclose(fp);
    kvm_free(buf);
}

static void test_unknown_config_keys_are_named(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_BF16);
    assert_non_null(tcc_write_fuser(g_dir, "keys", &s));
    expect_refused(tcc_write_json(g_dir, "keys", &s, ", \"temperature\": 1"), NULL, KVM_EFORMAT, "keys.c2c.json",
                   "unknown config key 'temperature'", NULL);
    const char *jp = tcc_write_json(g_dir, "keys", &s, "");
    edit_config(jp, "\"head_dim\": 8,", "\"head_dim\": 8, \"rope_theta\": 1,");
    expect_refused(jp, NULL, KVM_EFORMAT, "keys.c2c.json", "unknown config key 'receiver.rope_theta'", NULL);
    jp = tcc_write_json(g_dir, "keys", &s, "");
    edit_config(jp, "\"hidden\": 24, ", "");
    expect_refused(jp, NULL, KVM_EFORMAT, "keys.c2c.json", "'hidden' is missing", NULL);
    jp = tcc_write_json(g_dir, "keys", &s, "");
    edit_config(jp, "\"activation\": \"gelu_erf\"", "\"activation\": \"gelu_tanh\"");
    expect_refused(jp, NULL, KVM_EFORMAT, "keys.c2c.json", "'activation'", "gelu_tanh");
}

static void test_wrong_format_or_version_is_named(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_BF16);
    assert_non_null(tcc_write_fuser(g_dir, "ver", &s));
    const char *jp = tcc_write_json(g_dir, "ver", &s, "");
    edit_config(jp, "\"version\": 1", "\"version\": 2");
    expect_refused(jp, NULL, KVM_EFORMAT, "ver.c2c.json", "'version'", NULL);
    jp = tcc_write_json(g_dir, "ver", &s, "");
    edit_config(jp, "\"kvmesh.c2c\"", "\"rosetta\"");
    expect_refused(jp, NULL, KVM_EFORMAT, "ver.c2c.json", "'format'", "rosetta");
}

static void test_weights_sha256_mismatch_is_named(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    const char *jp = tcc_write_fuser(g_dir, "sha", &s);
    char *buf;
    size_t len;
    assert_int_equal(kvm_read_file(wpath("sha"), &buf, &len, (size_t)1 << 26), 0);
    buf[len - 40] ^= 1; /* a low mantissa bit of some weight: still finite, still well-formed */
    FILE *fp = fopen(wpath("sha"), "wb");
    fwrite(buf, 1, len, fp);
    fclose(fp);
    kvm_free(buf);
    expect_refused(jp, NULL, KVM_EFORMAT, "sha.c2c.json", "weights_sha256", wpath("sha"));
}

/* The pair the default config states (tcc_write_json): tokenizer hashes "0..01" and "0..02". */
static kvm_c2c_pair_t pair_of(const tcc_spec_t *s) {
    kvm_c2c_pair_t p;
    memset(&p, 0, sizeof p);
    p.receiver = (kvm_c2c_model_desc_t){.n_layers = s->lr, .n_kv_heads = s->ht, .head_dim = s->dt, .rope_layout = KVM_ROPE_HALF,
                                        .rope_theta = 10000, .vocab_size = 512};
    p.sharer = (kvm_c2c_model_desc_t){.n_layers = s->ls, .n_kv_heads = s->hs, .head_dim = s->ds, .rope_layout = KVM_ROPE_HALF,
                                      .rope_theta = 500000, .vocab_size = 512};
    snprintf(p.receiver.tokenizer_sha256, 65, "%064d", 1);
    snprintf(p.sharer.tokenizer_sha256, 65, "%064d", 2);
    return p;
}

static void test_fuser_for_another_model_pair_is_refused(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_BF16);
    const char *jp = tcc_write_fuser(g_dir, "pair", &s);
    kvm_c2c_pair_t p = pair_of(&s);
    kvm_c2c_fuser_t *f = kvm_c2c_load(jp, &p, NULL);
    if (!f) fail_msg("the right pair was refused: %s", kvm_errmsg());
    kvm_c2c_free(f);
    p.receiver.n_kv_heads = 4;
    expect_refused(jp, &p, KVM_EINVAL, "pair.c2c.json", "receiver.n_kv_heads", NULL);
    p = pair_of(&s);
    p.sharer.n_layers = 24;
    expect_refused(jp, &p, KVM_EINVAL, "pair.c2c.json", "sharer.n_layers", NULL);
    p = pair_of(&s);
    p.sharer.rope_theta = 1e6;
    expect_refused(jp, &p, KVM_EINVAL, "pair.c2c.json", "sharer.rope.theta", NULL);
    p = pair_of(&s);
    p.receiver.rope_layout = KVM_ROPE_INTERLEAVED;
    expect_refused(jp, &p, KVM_EINVAL, "pair.c2c.json", "receiver.rope.layout", NULL);
    p = pair_of(&s);
    p.sharer.tokenizer_sha256[63] = '3';
    expect_refused(jp, &p, KVM_EINVAL, "pair.c2c.json", "sharer.tokenizer_sha256", "another model pair");
    p = pair_of(&s);
    p.receiver.vocab_size = 600; /* identity: receiver ids must be sharer ids */
    expect_refused(jp, &p, KVM_EINVAL, "pair.c2c.json", "identity", "600");
}

/* Every allocation of a load made to fail in turn (kvm_alloc_fail_nth): an error, never a crash, nothing leaked. */
static void test_every_failed_allocation_of_a_load_is_an_error_without_leaks(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_BF16);
    kvm_c2c_pair_t p = pair_of(&s);
    const char *jp = tcc_write_fuser(g_dir, "oom", &s);
    const size_t live0 = kvm_alloc_bytes_live();
    int failed = 0;
    for (uint64_t n = 1;; n++) {
        kvm_errclear();
        kvm_alloc_fail_nth(n);
        kvm_c2c_fuser_t *f = kvm_c2c_load(jp, &p, NULL);
        const bool fired = !kvm_alloc_fail_pending();
        kvm_alloc_fail_nth(0);
        if (!fired) {
            if (!f) fail_msg("allocation %llu: no failure injected, but: %s", (unsigned long long)n, kvm_errmsg());
            kvm_c2c_free(f);
            break;
        }
        if (f) kvm_c2c_free(f);
        else {
            failed++;
            assert_int_equal(kvm_errcode(), KVM_ENOMEM);
        }
        if (kvm_alloc_bytes_live() != live0) fail_msg("allocation %llu failed: %zd bytes leaked", (unsigned long long)n,
                                                      (ssize_t)(kvm_alloc_bytes_live() - live0));
    }
    fprintf(stderr, "  %d injected allocation failures, each an error without leaks\n", failed);
    assert_true(failed > 5);
}

TC_MAIN(setup, teardown, cmocka_unit_test(test_valid_fuser_loads), cmocka_unit_test(test_wrong_shape_names_the_tensor),
        cmocka_unit_test(test_wrong_dtype_names_the_tensor), cmocka_unit_test(test_unknown_dtype_is_a_format_error),
        cmocka_unit_test(test_missing_tensor_is_named), cmocka_unit_test(test_missing_closed_gate_branch_tensor_is_named),
        cmocka_unit_test(test_extra_tensor_is_named), cmocka_unit_test(test_duplicate_tensor_name_is_named),
        cmocka_unit_test(test_overlapping_ranges_are_named), cmocka_unit_test(test_holey_ranges_are_named),
        cmocka_unit_test(test_trailing_bytes_are_refused), cmocka_unit_test(test_truncated_file_names_the_tensor),
        cmocka_unit_test(test_header_length_past_eof_is_refused), cmocka_unit_test(test_nan_gate_is_named),
        cmocka_unit_test(test_nan_weight_is_named), cmocka_unit_test(test_gates_open_disagreeing_with_the_logit_is_named),
        cmocka_unit_test(test_layer_map_out_of_range_is_named), cmocka_unit_test(test_unknown_config_keys_are_named),
        cmocka_unit_test(test_wrong_format_or_version_is_named), cmocka_unit_test(test_weights_sha256_mismatch_is_named),
        cmocka_unit_test(test_fuser_for_another_model_pair_is_refused),
        cmocka_unit_test(test_every_failed_allocation_of_a_load_is_an_error_without_leaks))
