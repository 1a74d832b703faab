/* test_c2c_bench.c - what `kvmesh bench c2c` adds to the C2C runtime (include/kvmesh_lab.h, docs/c2c.md):
 * kvm_c2c_prefill_ex fuses from the sharer ids it is given (the blinded receiver of spec §9), returns the logits of
 * every row after the fused section, equal bit for bit to the same fusion done by hand; skipping the fuser and
 * closing every gate (kvm_c2c_close_gates) both leave the receiver's own computation, bit for bit (§9 (f) = (b));
 * synthetic models pair by a tokenizer hash that names their shape, and such a fuser is refused for real models.
 * CPU backend, the bundled pair and the tiny synthetic shapes. */
#include <ftw.h>
#include <math.h>
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

#include "runtime/comm/c2c.h"
#include "runtime/core/sha256.h"
#include "runtime/kv/kv.h"
#include "test_common.h"

TC_TMPDIR_FIXTURE("kvm_c2c_bench")

static kvm_model_t *g_r, *g_s; /* receiver minillama-2m, sharer miniqwen3-6m */

static kvm_model_t *load_model(const char *path) {
    kvm_load_opts_t opts = {.backend = "cpu", .quiet = true};
    kvm_model_t *m = kvm_model_load_opts(path, &opts);
    if (!m) fail_msg("load %s: %s", path, kvm_errmsg());
    return m;
}

static int group_setup(void **st) {
    if (setup(st)) return -1;
    g_r = load_model(KVM_SOURCE_DIR "/models/minillama-2m");
    g_s = load_model(KVM_SOURCE_DIR "/models/miniqwen3-6m");
    return 0;
}

static int group_teardown(void **st) {
    kvm_model_free(g_r), kvm_model_free(g_s);
    return teardown(st);
}

static kvm_c2c_fuser_t *untrained(const char *name, kvm_model_t *r, kvm_model_t *s) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s.c2c.json", g_dir, name);
    kvm_c2c_init_opts_t o = {.seed = 3};
    if (kvm_c2c_write_untrained(p, r, s, &o)) fail_msg("c2c init: %s", kvm_errmsg());
    kvm_c2c_fuser_t *f = kvm_c2c_open(p, r, s);
    if (!f) fail_msg("open: %s", kvm_errmsg());
    return f;
}

/* the receiver's prompt X (n ids) and the 3 teacher-forced ids after it; the sharer's Y differs in 6 places */
static const int32_t k_x[] = {1, 276, 201, 286, 223, 282, 16, 2, 201, 1, 274, 201, 411, 28, 223, 5, 5, 5, 5, 201,
                              379, 28, 223, 5, 5, 5, 5, 201, 292, 28, 223, 379, 2, 201, 1, 277, 201, 24, 21, 21};
#define N_X 37 /* prompt; k_x[37..39] are the answer's first digits */
static int32_t g_y[N_X];

static void make_y(void) {
    memcpy(g_y, k_x, sizeof g_y);
    const int pos[] = {15, 16, 17, 18, 23, 24};
    const int32_t val[] = {24, 27, 26, 26, 21, 27};
    for (int i = 0; i < 6; i++) g_y[pos[i]] = val[i];
}

/* The sectioned prefill with other sharer ids: R prefills X, S prefills Y, the fuser runs, the 4 rest rows' logits
 * equal those of the same steps done by hand (bit for bit); the sharer's ids matter (Y vs X give other logits); and
 * without sharer ids the last row is kvm_c2c_prefill's. */
static void test_prefill_ex_fuses_from_the_sharer_ids_and_returns_every_rest_row(void **st) {
    (void)st;
    make_y();
    kvm_c2c_fuser_t *f = untrained("ex", g_r, g_s);
    const int V = g_r->cfg.vocab_size, n = N_X, nf = N_X - 1, nr = n + 3 - nf;
    kvm_kv_pool_t *rp = kvm_model_kv_pool(g_r, 0), *sp = kvm_model_kv_pool(g_s, 0);
    float *la = malloc((size_t)nr * V * sizeof *la), *lb = malloc((size_t)nr * V * sizeof *lb);
    float *lc = malloc((size_t)nr * V * sizeof *lc), *ld = malloc((size_t)V * sizeof *ld);

    kvm_seq_t *ra = kvm_seq_create(rp);
    kvm_c2c_prefill_opts_t o = {.sharer_ids = g_y, .rest_logits = la};
    kvm_c2c_stats_t s;
    if (kvm_c2c_prefill_ex(f, g_r, ra, g_s, sp, k_x, n + 3, nf, NULL, &o, &s)) fail_msg("prefill_ex: %s", kvm_errmsg());
    assert_int_equal(ra->n_tokens, n + 3);
    assert_int_equal(s.fused_tokens, nf);

    /* by hand: R on X, S on Y, the fuser over the section, then the rest on R with every row's logits */
    kvm_seq_t *rb = kvm_seq_create(rp), *sb = kvm_seq_create(sp);
    kvm_batch_item_t ir = {.seq = rb, .tokens = k_x, .n_tokens = nf}, is = {.seq = sb, .tokens = g_y, .n_tokens = nf};
    assert_int_equal(kvm_forward(g_r, &ir, 1), 0);
    assert_int_equal(kvm_forward(g_s, &is, 1), 0);
    kvm_c2c_cache_t cr = {.view = {.kv = rp->data, .g = rp->geom, .blocks = rb->blocks}, .n_blocks = rb->n_blocks};
    kvm_c2c_cache_t cs = {.view = {.kv = sp->data, .g = sp->geom, .blocks = sb->blocks}, .n_blocks = sb->n_blocks};
    assert_int_equal(kvm_c2c_fuse(f, &cr, &cs, 0, nf), 0);
    kvm_batch_item_t rest = {.seq = rb, .tokens = k_x + nf, .n_tokens = nr, .logits = lb, .all_logits = true};
    assert_int_equal(kvm_forward(g_r, &rest, 1), 0);
    assert_memory_equal(la, lb, (size_t)nr * V * sizeof *la);

    /* the sharer reading X instead of Y moves the logits */
    kvm_seq_t *rc = kvm_seq_create(rp);
    o = (kvm_c2c_prefill_opts_t){.rest_logits = lc};
    assert_int_equal(kvm_c2c_prefill_ex(f, g_r, rc, g_s, sp, k_x, n + 3, nf, NULL, &o, NULL), 0);
    assert_true(memcmp(la, lc, (size_t)nr * V * sizeof *la) != 0);
    /* no options: kvm_c2c_prefill's last row (the prefill of X alone, its last token then) */
    kvm_seq_t *rd = kvm_seq_create(rp);
    assert_int_equal(kvm_c2c_prefill(f, g_r, rd, g_s, sp, k_x, n, nf, ld, NULL), 0);
    assert_memory_equal(ld, lc, (size_t)V * sizeof *ld);

    /* both logits and rest_logits, or rest_logits with nothing after the section: refused */
    kvm_seq_t *re = kvm_seq_create(rp);
    o = (kvm_c2c_prefill_opts_t){.rest_logits = lc};
    assert_int_equal(kvm_c2c_prefill_ex(f, g_r, re, g_s, sp, k_x, n, nf, ld, &o, NULL), KVM_EINVAL);
    assert_int_equal(kvm_c2c_prefill_ex(f, g_r, re, g_s, sp, k_x, n, n, NULL, &o, NULL), KVM_EINVAL);
    assert_int_equal(re->n_tokens, 0);

    kvm_seq_destroy(ra), kvm_seq_destroy(rb), kvm_seq_destroy(sb), kvm_seq_destroy(rc), kvm_seq_destroy(rd);
    kvm_seq_destroy(re);
    free(la), free(lb), free(lc), free(ld);
    kvm_kv_pool_free(rp), kvm_kv_pool_free(sp);
    kvm_c2c_free(f);
}

/* Spec §9 (f) = (b): the fuser skipped, and every gate closed, give the receiver's own rows and logits bit for bit
 * (the same as its plain prefill of the same sections); an open fuser does not. */
static void test_skipped_fuser_and_closed_gates_are_the_receiver_alone(void **st) {
    (void)st;
    make_y();
    kvm_c2c_fuser_t *f = untrained("gates", g_r, g_s), *fc = untrained("gates", g_r, g_s);
    assert_int_equal(kvm_c2c_close_gates(fc), 0);
    for (int l = 0; l < kvm_c2c_n_layers(fc); l++) assert_false(kvm_c2c_gate_open(fc, l, 0) || kvm_c2c_gate_open(fc, l, 1));
    assert_true(kvm_c2c_gate_open(f, 0, 0)); /* the other copy is untouched */
    assert_int_equal(kvm_c2c_close_gates(NULL), KVM_EINVAL);
    const int V = g_r->cfg.vocab_size, nf = N_X - 1, nr = 4;
    kvm_kv_pool_t *rp = kvm_model_kv_pool(g_r, 0), *sp = kvm_model_kv_pool(g_s, 0);
    float *l[4];
    for (int i = 0; i < 4; i++) l[i] = malloc((size_t)nr * V * sizeof(float));
    kvm_seq_t *s[4];
    for (int i = 0; i < 4; i++) s[i] = kvm_seq_create(rp);
    kvm_c2c_prefill_opts_t skip = {.sharer_ids = g_y, .rest_logits = l[0], .skip_fuse = true};
    kvm_c2c_prefill_opts_t closed = {.sharer_ids = g_y, .rest_logits = l[1]};
    kvm_c2c_prefill_opts_t open = {.sharer_ids = g_y, .rest_logits = l[2]};
    kvm_c2c_stats_t stc;
    assert_int_equal(kvm_c2c_prefill_ex(f, g_r, s[0], g_s, sp, k_x, N_X + 3, nf, NULL, &skip, NULL), 0);
    assert_int_equal(kvm_c2c_prefill_ex(fc, g_r, s[1], g_s, sp, k_x, N_X + 3, nf, NULL, &closed, &stc), 0);
    assert_int_equal(stc.gates_k_open + stc.gates_v_open, 0);
    assert_int_equal(kvm_c2c_prefill_ex(f, g_r, s[2], g_s, sp, k_x, N_X + 3, nf, NULL, &open, NULL), 0);
    kvm_batch_item_t a = {.seq = s[3], .tokens = k_x, .n_tokens = nf};
    kvm_batch_item_t b = {.seq = s[3], .tokens = k_x + nf, .n_tokens = nr, .logits = l[3], .all_logits = true};
    assert_int_equal(kvm_forward(g_r, &a, 1), 0);
    assert_int_equal(kvm_forward(g_r, &b, 1), 0);
    const size_t bytes = (size_t)nr * V * sizeof(float);
    assert_memory_equal(l[0], l[1], bytes);
    assert_memory_equal(l[0], l[3], bytes);
    assert_true(memcmp(l[0], l[2], bytes) != 0);
    /* the caches too: every row of every layer */
    const size_t rows = (size_t)g_r->cfg.n_layers * 2 * g_r->cfg.n_kv_heads * (N_X + 3) * g_r->cfg.head_dim;
    float *k0 = malloc(rows * sizeof *k0), *k1 = malloc(rows * sizeof *k1);
    assert_int_equal(kvm_seq_read_rows(s[0], 0, N_X + 3, k0), 0);
    assert_int_equal(kvm_seq_read_rows(s[1], 0, N_X + 3, k1), 0);
    assert_memory_equal(k0, k1, rows * sizeof *k0);
    free(k0), free(k1);
    for (int i = 0; i < 4; i++) kvm_seq_destroy(s[i]), free(l[i]);
    kvm_kv_pool_free(rp), kvm_kv_pool_free(sp);
    kvm_c2c_free(f), kvm_c2c_free(fc);
}

/* Synthetic models (no tokenizer) pair by the hash of a text naming their shape: an untrained fuser for
 * synthetic:tiny-qwen3 <- synthetic:tiny-qwen2 loads and runs; it is refused for the bundled models and a bundled
 * fuser is refused for the synthetic ones (the tokenizer hash check still holds for real directories). */
static void test_synthetic_models_pair_by_a_hash_naming_their_shape(void **st) {
    (void)st;
    kvm_model_t *r = load_model("synthetic:tiny-qwen3"), *s = load_model("synthetic:tiny-qwen2");
    kvm_c2c_fuser_t *f = untrained("synth", r, s);
    uint8_t d[32];
    char hex[65];
    const char *text = "kvmesh synthetic model synthetic:tiny-qwen3: no tokenizer";
    kvm_sha256(text, strlen(text), d);
    kvm_sha256_hex(d, hex);
    assert_string_equal(f->cfg.receiver.tokenizer_sha256, hex);
    assert_string_not_equal(f->cfg.sharer.tokenizer_sha256, hex);
    /* a prefill on the pair */
    kvm_kv_pool_t *rp = kvm_model_kv_pool(r, 0), *sp = kvm_model_kv_pool(s, 0);
    kvm_seq_t *q = kvm_seq_create(rp);
    float *lg = malloc((size_t)r->cfg.vocab_size * sizeof *lg);
    const int32_t ids[] = {5, 9, 300, 41, 77, 12, 640, 8};
    kvm_c2c_stats_t stt;
    if (kvm_c2c_prefill(f, r, q, s, sp, ids, 8, 7, lg, &stt)) fail_msg("synthetic prefill: %s", kvm_errmsg());
    assert_int_equal(stt.fused_tokens, 7);
    assert_true(isfinite(lg[0]) && isfinite(lg[r->cfg.vocab_size - 1]));
    kvm_seq_destroy(q);
    kvm_kv_pool_free(rp), kvm_kv_pool_free(sp);
    free(lg);
    /* the synthetic fuser for real models, and a real fuser for synthetic models: refused */
    char p[512];
    snprintf(p, sizeof p, "%s/synth.c2c.json", g_dir);
    assert_null(kvm_c2c_open(p, g_r, g_s));
    kvm_c2c_free(untrained("real", g_r, g_s));
    snprintf(p, sizeof p, "%s/real.c2c.json", g_dir);
    assert_null(kvm_c2c_open(p, r, s));
    /* a synthetic receiver with a real sharer: the synthetic side's hash cannot match the fuser's real one */
    assert_null(kvm_c2c_open(p, r, g_s));
    kvm_c2c_free(f);
    kvm_model_free(r), kvm_model_free(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prefill_ex_fuses_from_the_sharer_ids_and_returns_every_rest_row),
        cmocka_unit_test(test_skipped_fuser_and_closed_gates_are_the_receiver_alone),
        cmocka_unit_test(test_synthetic_models_pair_by_a_hash_naming_their_shape),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
