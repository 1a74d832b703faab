/* test_c2c.c - the C2C fuser's forward (../shared/spec/c2c.md §2.2, §6, §12 items 1, 2, 3): small random fusers
 * written here (tests/test_c2c_common.h) are loaded and applied to paged caches on the CPU backend, and every
 * fused row is compared with an fp64 reference of the spec's math reading the same stored weights; closed gates
 * leave the cache bit-identical; a hand-checkable fuser; and, when tests/fixtures/c2c holds it, the fixture
 * written by PyTorch (scripts/train/c2c_fixture.py). */
#include <ftw.h>
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

#include "test_c2c_common.h"
#include "test_common.h"

TC_TMPDIR_FIXTURE("kvm_c2c")

/* Relative Frobenius error ||a - r|| / ||r|| (spec §12 item 1). */
typedef struct frob {
    double num, den;
} frob_t;
static double frob_rel(const frob_t *f) { return f->den > 0 ? sqrt(f->num / f->den) : sqrt(f->num); }

/* Fuses [pos0, pos0 + n) with a fuser for s on caches of dtype kvd and checks, per layer and branch:
 * (i) the residual of kvm_c2c_branch_forward and (ii) the stored fused rows against the fp64 reference within
 * tol; rows outside the range, other layers' rows and closed branches bit-identical. */
static void check_fuse(const tcc_spec_t *s, kvm_dtype_t kvd, int pos0, int n, double tol, const char *name) {
    const char *jp = tcc_write_fuser(g_dir, name, s);
    assert_non_null(jp);
    kvm_c2c_fuser_t *f = kvm_c2c_load(jp, NULL, NULL);
    if (!f) fail_msg("load: %s", kvm_errmsg());
    const kvm_c2c_config_t *c = &f->cfg;
    kvm_st_file_t st;
    assert_int_equal(kvm_st_open(&st, f->weights_path, KVM_ST_EXACT), 0);
    const int nb = (pos0 + n + 5 + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK;
    tcc_cache_t R, S;
    tcc_cache_make(&R, s->lr, s->ht, s->dt, kvd, nb, 11);
    tcc_cache_make(&S, s->ls, s->hs, s->ds, kvd, nb, 23);
    const size_t bytes = R.elems * kvm_dtype_size(kvd);
    void *before = malloc(bytes);
    memcpy(before, R.kv, bytes);
    assert_int_equal(kvm_c2c_fuse(f, &R.c, &S.c, pos0, n), 0);
    const int ct = s->ht * s->dt, cs = s->hs * s->ds;
    double *x = calloc((size_t)(cs + ct), sizeof *x), *res = calloc((size_t)ct, sizeof *res);
    float *xf = calloc((size_t)KVM_C2C_CHUNK_ROWS * (cs + ct), sizeof *xf);
    float *y = calloc((size_t)KVM_C2C_CHUNK_ROWS * ct, sizeof *y), *wl = calloc((size_t)KVM_C2C_CHUNK_ROWS * s->ht, sizeof *wl);
    for (int l = 0; l < s->lr; l++)
        for (int b = 0; b < 2; b++) {
            const bool open = f->layers[l][b].open;
            frob_t fi = {0, 0}, fii = {0, 0};
            const int m = n < KVM_C2C_CHUNK_ROWS ? n : KVM_C2C_CHUNK_ROWS;
            for (int t = 0; t < m; t++)
                for (int i = 0; i < cs + ct; i++) {
                    int h = i < cs ? i / s->ds : (i - cs) / s->dt, d = i < cs ? i % s->ds : (i - cs) % s->dt;
                    xf[(size_t)t * (cs + ct) + i] = i < cs ? tcc_cache_get(&S, S.kv, s->layer_map[l], b, h, pos0 + t, d)
                                                           : tcc_cache_get(&R, before, l, b, h, pos0 + t, d);
                }
            assert_int_equal(kvm_c2c_branch_forward(f, l, b, xf, m, y, wl), 0);
            for (int t = 0; t < n; t++) {
                const int p = pos0 + t;
                for (int h = 0; h < s->hs; h++)
                    for (int d = 0; d < s->ds; d++) x[h * s->ds + d] = tcc_cache_get(&S, S.kv, s->layer_map[l], b, h, p, d);
                for (int h = 0; h < s->ht; h++)
                    for (int d = 0; d < s->dt; d++) x[cs + h * s->dt + d] = tcc_cache_get(&R, before, l, b, h, p, d);
                tcc_ref_token(&st, c, l, b, x, res);
                for (int i = 0; i < ct; i++) {
                    const int h = i / s->dt, d = i % s->dt;
                    const double got = tcc_cache_get(&R, R.kv, l, b, h, p, d), old = x[cs + i];
                    if (!open) {
                        assert_true(got == old);
                        continue;
                    }
                    const double want = old + res[i];
                    fii.num += (got - want) * (got - want);
                    fii.den += want * want;
                    if (t < m) {
                        const double r = 1.0 / (1.0 + exp(-(double)wl[(size_t)t * s->ht + h])) * y[(size_t)t * ct + i];
                        fi.num += (r - res[i]) * (r - res[i]);
                        fi.den += res[i] * res[i];
                    }
                }
            }
            if (open) {
                fprintf(stderr, "%s layer %d %c: residual rel err %.3g, fused rel err %.3g\n", name, l, b ? 'v' : 'k',
                        frob_rel(&fi), frob_rel(&fii));
                if (frob_rel(&fi) > tol || frob_rel(&fii) > tol)
                    fail_msg("%s layer %d branch %d: residual rel err %.3g, fused rel err %.3g (tol %g)", name, l, b,
                             frob_rel(&fi), frob_rel(&fii), tol);
            }
        }
    /* everything outside [pos0, pos0 + n) and every closed branch: bit-identical */
    for (int l = 0; l < s->lr; l++)
        for (int b = 0; b < 2; b++)
            for (int h = 0; h < s->ht; h++)
                for (int p = 0; p < nb * KVM_KV_BLOCK; p++) {
                    if (p >= pos0 && p < pos0 + n && f->layers[l][b].open) continue;
                    for (int d = 0; d < s->dt; d++) {
                        float a = tcc_cache_get(&R, R.kv, l, b, h, p, d), o = tcc_cache_get(&R, before, l, b, h, p, d);
                        assert_memory_equal(&a, &o, sizeof a);
                    }
                }
    free(x), free(res), free(xf), free(y), free(wl), free(before);
    tcc_cache_free(&R), tcc_cache_free(&S);
    kvm_st_close(&st);
    kvm_c2c_free(f);
}

static void test_f32_fuser_matches_the_fp64_reference(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    check_fuse(&s, KVM_F32, 3, 37, 1e-5, "f32");
}

static void test_bf16_fuser_on_a_bf16_cache_matches_within_1e_2(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_BF16);
    check_fuse(&s, KVM_BF16, 0, 20, 1e-2, "bf16");
}

static void test_f16_fuser_on_an_f16_cache_matches_within_1e_2(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F16);
    check_fuse(&s, KVM_F16, 5, 11, 1e-2, "f16");
}

/* A sharer shallower than the receiver (clamped map), GQA shapes and Hs*Ds != Ht*Dt, two blocks per stack. */
static void test_shallower_sharer_and_other_widths_match(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    s.lr = 4, s.ht = 4, s.dt = 4, s.ls = 2, s.hs = 3, s.ds = 8, s.H = 16, s.I = 12, s.Iw = 16, s.tb = 2, s.pb = 0, s.wb = 2;
    int map[4] = {0, 0, 0, 1};
    for (int l = 0; l < 4; l++) {
        s.layer_map[l] = map[l];
        s.gate[l][0] = 1, s.gate[l][1] = l == 2 ? 0.0f : 2;
    }
    check_fuse(&s, KVM_F32, 16, 16, 1e-5, "shallow");
}

/* A sharer deeper than the receiver, and more rows than one chunk of the fuser's scratch. */
static void test_deeper_sharer_and_several_chunks_match(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    s.lr = 1, s.ls = 5, s.layer_map[0] = 4;
    check_fuse(&s, KVM_F32, 1, KVM_C2C_CHUNK_ROWS + 44, 1e-5, "deep");
}

/* The layer map is read from the file, never recomputed (spec §3): a non-terminal, non-monotonic map. */
static void test_layer_map_is_taken_from_the_file(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    s.layer_map[0] = 2, s.layer_map[1] = 0; /* terminal alignment would be [1, 2] */
    check_fuse(&s, KVM_F32, 0, 9, 1e-5, "map");
}

/* Logits <= 0 (exactly 0 included) are closed: the cache is bit-identical. */
static void test_closed_gates_leave_the_cache_bit_identical(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_BF16);
    s.gate[0][0] = 0.0f, s.gate[0][1] = -1.0f, s.gate[1][0] = -0.0f, s.gate[1][1] = -3.0f;
    const char *jp = tcc_write_fuser(g_dir, "closed", &s);
    kvm_c2c_fuser_t *f = kvm_c2c_load(jp, NULL, NULL);
    if (!f) fail_msg("load: %s", kvm_errmsg());
    tcc_cache_t R, S;
    tcc_cache_make(&R, s.lr, s.ht, s.dt, KVM_BF16, 3, 1);
    tcc_cache_make(&S, s.ls, s.hs, s.ds, KVM_BF16, 3, 2);
    void *before = malloc(R.elems * 2);
    memcpy(before, R.kv, R.elems * 2);
    assert_int_equal(kvm_c2c_fuse(f, &R.c, &S.c, 0, 47), 0);
    assert_memory_equal(before, R.kv, R.elems * 2);
    free(before);
    tcc_cache_free(&R), tcc_cache_free(&S);
    kvm_c2c_free(f);
}

/* in.weight = 0, FFN down = 0 (blocks are identities), out.weight = 0, out.bias = c, wgt_head = 0: the fuser
 * adds sigmoid(0) * c = c / 2 to every fused element, exactly. */
static void test_constant_fuser_adds_half_its_out_bias(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    s.gate[1][1] = 1;
    tcc_tensors_t t;
    tcc_make(&s, &t);
    for (int i = 0; i < t.n; i++) {
        kvm_st_entry_t *e = &t.e[i];
        float *p = (float *)e->data;
        size_t n = (size_t)e->shape[0] * (e->ndim == 2 ? (size_t)e->shape[1] : 1);
        if (strstr(e->name, ".gate")) continue;
        const bool zero = strstr(e->name, "in.weight") || strstr(e->name, ".down") || strstr(e->name, "out.weight") ||
                          strstr(e->name, "wgt_head");
        if (zero) memset(p, 0, n * sizeof *p);
        if (strstr(e->name, "out.bias"))
            for (size_t j = 0; j < n; j++) p[j] = 0.25f * (float)(j + 1);
    }
    char wp[512];
    snprintf(wp, sizeof wp, "%s/const.c2c.safetensors", g_dir);
    assert_int_equal(kvm_st_write(wp, t.e, t.n), 0);
    tcc_tensors_free(&t);
    kvm_c2c_fuser_t *f = kvm_c2c_load(tcc_write_json(g_dir, "const", &s, ""), NULL, NULL);
    if (!f) fail_msg("load: %s", kvm_errmsg());
    tcc_cache_t R, S;
    tcc_cache_make(&R, s.lr, s.ht, s.dt, KVM_F32, 1, 5);
    tcc_cache_make(&S, s.ls, s.hs, s.ds, KVM_F32, 1, 6);
    float *before = malloc(R.elems * 4);
    memcpy(before, R.kv, R.elems * 4);
    assert_int_equal(kvm_c2c_fuse(f, &R.c, &S.c, 2, 3), 0);
    for (int l = 0; l < s.lr; l++)
        for (int b = 0; b < 2; b++)
            for (int h = 0; h < s.ht; h++)
                for (int p = 0; p < KVM_KV_BLOCK; p++)
                    for (int d = 0; d < s.dt; d++) {
                        float add = p >= 2 && p < 5 ? 0.125f * (float)(h * s.dt + d + 1) : 0.0f;
                        assert_true(tcc_cache_get(&R, R.kv, l, b, h, p, d) == tcc_cache_get(&R, before, l, b, h, p, d) + add);
                    }
    free(before);
    tcc_cache_free(&R), tcc_cache_free(&S);
    kvm_c2c_free(f);
}

/* A cache whose geometry is not the config's, and positions past the block table, are refused unwritten. */
static void test_mismatched_cache_and_range_are_refused(void **st) {
    (void)st;
    tcc_spec_t s = tcc_spec_default(KVM_F32);
    kvm_c2c_fuser_t *f = kvm_c2c_load(tcc_write_fuser(g_dir, "geom", &s), NULL, NULL);
    assert_non_null(f);
    tcc_cache_t R, S, bad;
    tcc_cache_make(&R, s.lr, s.ht, s.dt, KVM_F32, 2, 1);
    tcc_cache_make(&S, s.ls, s.hs, s.ds, KVM_F32, 2, 2);
    tcc_cache_make(&bad, s.ls, s.hs, s.ds * 2, KVM_F32, 2, 3);
    assert_int_equal(kvm_c2c_fuse(f, &R.c, &bad.c, 0, 4), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "sharer"));
    assert_int_equal(kvm_c2c_fuse(f, &R.c, &S.c, 30, 3), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "block table"));
    assert_int_equal(kvm_c2c_fuse_layer(f, 2, &R.c, &S.c, 0, 1), KVM_EINVAL);
    tcc_cache_free(&R), tcc_cache_free(&S), tcc_cache_free(&bad);
    kvm_c2c_free(f);
}

/* ---- the PyTorch fixture (scripts/train/c2c_fixture.py) ------------------------------------------ */

/* fixture <variant>: <variant>.c2c.json + .c2c.safetensors (the fuser) and <variant>.io.safetensors:
 * sharer.{k,v} [Ls][Hs][N][Ds], receiver.{k,v} [Lr][Ht][N][Dt], fused.{k,v} [Lr][Ht][N][Dt] (F32; what PyTorch
 * computed from the stored weights, every prompt row fused, closed gates copied). */
static void check_torch_fixture(const char *variant, double tol) {
    char jp[512], io[512];
    snprintf(jp, sizeof jp, "tests/fixtures/c2c/%s.c2c.json", variant);
    snprintf(io, sizeof io, "tests/fixtures/c2c/%s.io.safetensors", variant);
    if (access(jp, R_OK) || access(io, R_OK)) {
        fprintf(stderr, "SKIP test_c2c: %s or %s is absent: run python3 scripts/train/c2c_fixture.py --out tests/fixtures/c2c "
                        "(PyTorch) to make the fixture\n", jp, io);
        skip();
    }
    kvm_c2c_fuser_t *f = kvm_c2c_load(jp, NULL, NULL);
    if (!f) fail_msg("load %s: %s", jp, kvm_errmsg());
    kvm_st_file_t st;
    assert_int_equal(kvm_st_open(&st, io, KVM_ST_EXACT), 0);
    const kvm_c2c_config_t *c = &f->cfg;
    const kvm_st_tensor_t *rk = kvm_st_find(&st, "receiver.k");
    assert_non_null(rk);
    assert_int_equal(rk->ndim, 4);
    const int N = (int)rk->shape[2], nb = (N + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK;
    tcc_cache_t R, S;
    tcc_cache_make(&R, c->receiver.n_layers, c->receiver.n_kv_heads, c->receiver.head_dim, KVM_F32, nb, 1);
    tcc_cache_make(&S, c->sharer.n_layers, c->sharer.n_kv_heads, c->sharer.head_dim, KVM_F32, nb, 2);
    tcc_cache_t *caches[2] = {&S, &R};
    const char *names[2] = {"sharer", "receiver"};
    for (int w = 0; w < 2; w++)
        for (int b = 0; b < 2; b++) {
            char nm[32];
            snprintf(nm, sizeof nm, "%s.%c", names[w], b ? 'v' : 'k');
            const kvm_st_tensor_t *t = kvm_st_find(&st, nm);
            assert_non_null(t);
            const kvm_kv_geom_t *g = &caches[w]->c.view.g;
            for (int l = 0; l < g->n_layers; l++)
                for (int h = 0; h < g->n_kv_heads; h++)
                    for (int p = 0; p < N; p++) {
                        size_t dst = ((((size_t)caches[w]->blocks[p / KVM_KV_BLOCK] * g->n_layers + l) * 2 + b) * g->n_kv_heads + h) *
                                         KVM_KV_BLOCK * g->head_dim + (size_t)(p % KVM_KV_BLOCK) * g->head_dim;
                        memcpy((float *)caches[w]->kv + dst, (const float *)t->data + (((size_t)l * g->n_kv_heads + h) * N + p) * g->head_dim,
                               (size_t)g->head_dim * sizeof(float));
                    }
        }
    assert_int_equal(kvm_c2c_fuse(f, &R.c, &S.c, 0, N), 0);
    for (int b = 0; b < 2; b++) {
        const kvm_st_tensor_t *t = kvm_st_find(&st, b ? "fused.v" : "fused.k");
        assert_non_null(t);
        const float *want = t->data;
        for (int l = 0; l < c->receiver.n_layers; l++) {
            frob_t e = {0, 0};
            for (int h = 0; h < c->receiver.n_kv_heads; h++)
                for (int p = 0; p < N; p++)
                    for (int d = 0; d < c->receiver.head_dim; d++) {
                        double g = tcc_cache_get(&R, R.kv, l, b, h, p, d);
                        double r = want[(((size_t)l * c->receiver.n_kv_heads + h) * N + p) * c->receiver.head_dim + d];
                        e.num += (g - r) * (g - r), e.den += r * r;
                    }
            fprintf(stderr, "torch fixture %s layer %d %c (gate %s): rel err %.3g\n", variant, l, b ? 'v' : 'k',
                    f->layers[l][b].open ? "open" : "closed", frob_rel(&e));
            if (frob_rel(&e) > tol) fail_msg("%s layer %d branch %d: rel err %.3g > %g", variant, l, b, frob_rel(&e), tol);
            if (!f->layers[l][b].open) assert_true(e.num == 0);
        }
    }
    tcc_cache_free(&R), tcc_cache_free(&S);
    kvm_st_close(&st);
    kvm_c2c_free(f);
}

static void test_torch_fixture_f32_matches_within_1e_5(void **st) {
    (void)st;
    check_torch_fixture("f32", 1e-5);
}

static void test_torch_fixture_bf16_matches_within_1e_2(void **st) {
    (void)st;
    check_torch_fixture("bf16", 1e-2);
}

/* ---- CPU vs CUDA (spec §12 item 1): the same fuser and caches on both backends ------------------------- */

/* A copy of a host cache in backend memory (pool and block table). */
static kvm_c2c_cache_t to_backend(const kvm_ops_t *o, const tcc_cache_t *h, void **kv, int32_t **blocks) {
    const size_t bytes = h->elems * kvm_dtype_size(h->c.view.g.dtype);
    *kv = o->alloc(bytes);
    *blocks = o->alloc((size_t)h->c.n_blocks * sizeof(int32_t));
    assert_non_null(*kv);
    assert_non_null(*blocks);
    assert_int_equal(o->h2d(*kv, h->kv, bytes), 0);
    assert_int_equal(o->h2d(*blocks, h->blocks, (size_t)h->c.n_blocks * sizeof(int32_t)), 0);
    kvm_c2c_cache_t c = h->c;
    c.view.kv = *kv;
    c.view.blocks = *blocks;
    return c;
}

static void check_cuda_matches_cpu(kvm_dtype_t wdt, kvm_dtype_t kvd, int n, double tol, const char *name) {
    const kvm_ops_t *cu = kvm_ops_cuda();
    if (!cu) {
        fprintf(stderr, "SKIP test_c2c CPU vs CUDA (%s): no CUDA backend here (%s)\n", name, kvm_errmsg());
        skip();
    }
    tcc_spec_t s = tcc_spec_default(wdt);
    const char *jp = tcc_write_fuser(g_dir, name, &s);
    kvm_c2c_fuser_t *fc = kvm_c2c_load(jp, NULL, NULL), *fg = kvm_c2c_load(jp, NULL, cu);
    if (!fc || !fg) fail_msg("load: %s", kvm_errmsg());
    const int nb = (n + 2 + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK;
    tcc_cache_t R, S;
    tcc_cache_make(&R, s.lr, s.ht, s.dt, kvd, nb, 31);
    tcc_cache_make(&S, s.ls, s.hs, s.ds, kvd, nb, 37);
    void *rkv, *skv;
    int32_t *rb, *sb;
    kvm_c2c_cache_t gr = to_backend(cu, &R, &rkv, &rb), gs = to_backend(cu, &S, &skv, &sb);
    const size_t bytes = R.elems * kvm_dtype_size(kvd);
    void *before = malloc(bytes), *gpu = malloc(bytes);
    memcpy(before, R.kv, bytes);
    assert_int_equal(kvm_c2c_fuse(fc, &R.c, &S.c, 1, n), 0);
    assert_int_equal(kvm_c2c_fuse(fg, &gr, &gs, 1, n), 0);
    assert_int_equal(cu->sync(), 0);
    assert_int_equal(cu->d2h(gpu, rkv, bytes), 0);
    for (int l = 0; l < s.lr; l++)
        for (int b = 0; b < 2; b++) {
            frob_t e = {0, 0}, r = {0, 0};
            for (int h = 0; h < s.ht; h++)
                for (int p = 0; p < nb * KVM_KV_BLOCK; p++)
                    for (int d = 0; d < s.dt; d++) {
                        double c = tcc_cache_get(&R, R.kv, l, b, h, p, d), g = tcc_cache_get(&R, gpu, l, b, h, p, d);
                        double o = tcc_cache_get(&R, before, l, b, h, p, d);
                        if (p < 1 || p >= 1 + n || !fc->layers[l][b].open) {
                            assert_true(g == o); /* untouched rows and closed gates: bit-identical on the GPU too */
                            continue;
                        }
                        e.num += (g - c) * (g - c), e.den += c * c;
                        r.num += (g - c) * (g - c), r.den += (c - o) * (c - o); /* against the residual's size */
                    }
            if (fc->layers[l][b].open) {
                fprintf(stderr, "%s layer %d %c: CUDA vs CPU fused rel err %.3g (residual-relative %.3g)\n", name, l,
                        b ? 'v' : 'k', frob_rel(&e), frob_rel(&r));
                if (frob_rel(&e) > tol) fail_msg("%s: CUDA vs CPU rel err %.3g > %g", name, frob_rel(&e), tol);
            }
        }
    cu->free(rkv), cu->free(skv), cu->free(rb), cu->free(sb);
    free(before), free(gpu);
    tcc_cache_free(&R), tcc_cache_free(&S);
    kvm_c2c_free(fc), kvm_c2c_free(fg);
}

static void test_cuda_f32_fuser_matches_the_cpu_within_1e_5(void **st) {
    (void)st;
    check_cuda_matches_cpu(KVM_F32, KVM_F32, 300, 1e-5, "cuda_f32");
}

static void test_cuda_bf16_fuser_matches_the_cpu_within_1e_2(void **st) {
    (void)st;
    check_cuda_matches_cpu(KVM_BF16, KVM_BF16, 40, 1e-2, "cuda_bf16");
}

TC_MAIN(setup, teardown, cmocka_unit_test(test_f32_fuser_matches_the_fp64_reference),
        cmocka_unit_test(test_bf16_fuser_on_a_bf16_cache_matches_within_1e_2),
        cmocka_unit_test(test_f16_fuser_on_an_f16_cache_matches_within_1e_2),
        cmocka_unit_test(test_shallower_sharer_and_other_widths_match),
        cmocka_unit_test(test_deeper_sharer_and_several_chunks_match),
        cmocka_unit_test(test_layer_map_is_taken_from_the_file),
        cmocka_unit_test(test_closed_gates_leave_the_cache_bit_identical),
        cmocka_unit_test(test_constant_fuser_adds_half_its_out_bias),
        cmocka_unit_test(test_mismatched_cache_and_range_are_refused),
        cmocka_unit_test(test_torch_fixture_f32_matches_within_1e_5), cmocka_unit_test(test_torch_fixture_bf16_matches_within_1e_2),
        cmocka_unit_test(test_cuda_f32_fuser_matches_the_cpu_within_1e_5),
        cmocka_unit_test(test_cuda_bf16_fuser_matches_the_cpu_within_1e_2))
