/* test_cuda_ops.c - every op of the CUDA backend against the CPU reference op (kernels/cpu/ops_cpu.c).
 *
 * Random non-zero inputs (seeded), GPU outputs poisoned with NaN before each op, relative error
 * ||gpu - cpu|| / ||cpu|| <= 1e-5 in fp32 mode and <= 1e-2 where 16-bit operands are involved. Without a
 * usable GPU every test says why and is skipped. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "kernels/ops.h"
#include "runtime/core/core.h"
#include "runtime/model/synthetic.h"
#include "test_common.h"

static const kvm_ops_t *G; /* CUDA */
static const kvm_ops_t *C; /* CPU reference */

#define NEED_GPU()                                                                        \
    do {                                                                                  \
        if (!G) {                                                                         \
            printf("SKIPPED (no CUDA backend here): %s\n", skip_reason);                  \
            skip();                                                                       \
        }                                                                                 \
    } while (0)
static char skip_reason[512];

/* ---- helpers ---------------------------------------------------------------------------------- */

static uint64_t rng_state = 0x1234567ULL;
static float frand(void) { /* uniform in [-1, 1), never exactly 0 */
    uint64_t h = kvm_splitmix64(rng_state++);
    float v = (float)((double)(h >> 40) / 8388608.0 - 1.0);
    return v == 0.0f ? 0.5f : v;
}
static float *rand_vec(size_t n, float scale) {
    float *v = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) v[i] = frand() * scale;
    return v;
}
static void *dev_from(const void *h, size_t bytes) {
    void *d = G->alloc(bytes);
    assert_non_null(d);
    assert_int_equal(G->h2d(d, h, bytes), 0);
    return d;
}
static void *dev_poisoned(size_t n_floats) {
    float *h = malloc(n_floats * sizeof(float));
    for (size_t i = 0; i < n_floats; i++) h[i] = NAN;
    void *d = dev_from(h, n_floats * sizeof(float));
    free(h);
    return d;
}
static float *host_from(const void *d, size_t n_floats) {
    float *h = malloc(n_floats * sizeof(float));
    assert_int_equal(G->sync(), 0);
    assert_int_equal(G->d2h(h, d, n_floats * sizeof(float)), 0);
    return h;
}
/* ||a - b|| / ||b||; NaN anywhere fails */
static double rel_err(const float *a, const float *b, size_t n) {
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(b[i])) return INFINITY;
        d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        r += (double)b[i] * b[i];
    }
    return sqrt(d) / (r > 0 ? sqrt(r) : 1.0);
}
/* While g_soft is set, a check over its tolerance is counted in g_soft_fails instead of failing the test (the
 * probe of the wgmma kernel's descriptor readings, which reports every reading before it asserts). */
static bool g_soft;
static int g_soft_fails;
static void expect_close(const char *what, const float *gpu, const float *cpu, size_t n, double tol) {
    double e = rel_err(gpu, cpu, n);
    printf("  %-44s rel err %.3g (tol %.0e)\n", what, e, tol);
    if (g_soft) g_soft_fails += !(e <= tol);
    else if (!(e <= tol)) fail_msg("%s: relative error %.3g > %.0e", what, e, tol);
}
static void *to_dtype(const float *f, size_t n, kvm_dtype_t dt) {
    if (dt == KVM_F32) {
        float *o = malloc(n * 4);
        memcpy(o, f, n * 4);
        return o;
    }
    uint16_t *o = malloc(n * 2);
    for (size_t i = 0; i < n; i++) o[i] = dt == KVM_BF16 ? kvm_f32_to_bf16(f[i]) : kvm_f32_to_f16(f[i]);
    return o;
}

/* Sets one switch of the CUDA backend (ops.h, kvm_cuda_opts_t) for the checks that follow. */
static void cuda_switch(const char *key, const char *value) {
    kvm_cuda_opts_t o = kvm_cuda_get_opts();
    assert_int_equal(kvm_cuda_opts_parse(&o, key, value), 0);
    assert_int_equal(kvm_cuda_set_opts(&o), 0);
}

/* A bf16 matrix of `rows` x cols on the device for expect_rounded_copy, after one skinny GEMM with it (so that the
 * backend's 16-bit dtype is bf16, as in a bf16 model's step, and the producers make their copies in it). */
typedef struct {
    void *dw;
    kvm_wmat_t W;
    float *dy[2];
    int cols;
} probe_gemm_t;

static probe_gemm_t probe_gemm(int cols) {
    const int rows = 64;
    probe_gemm_t p = {.cols = cols};
    float *wf = rand_vec((size_t)rows * cols, 0.05f), *x = rand_vec((size_t)2 * cols, 1.0f);
    void *wh = to_dtype(wf, (size_t)rows * cols, KVM_BF16);
    p.dw = dev_from(wh, (size_t)rows * cols * 2);
    p.W = (kvm_wmat_t){.data = p.dw, .dtype = KVM_BF16, .rows = rows, .cols = cols};
    p.dy[0] = dev_poisoned((size_t)16 * rows), p.dy[1] = dev_poisoned((size_t)16 * rows);
    float *dx = dev_from(x, (size_t)2 * cols * 4);
    G->matmul(p.dy[0], dx, &p.W, NULL, 2); /* two rows: the skinny GEMM rounds its input, in bf16 */
    assert_int_equal(G->sync(), 0);
    G->free(dx);
    free(wf), free(x), free(wh);
    return p;
}

/* Right after an op that wrote dx[n][cols] (2..16 rows) and may have left its 16-bit copy for the skinny GEMM: the
 * GEMM on that copy and the GEMM after an unrelated op (which drops any copy: the input is rounded again) give
 * the same bits. */
static void expect_rounded_copy(probe_gemm_t *p, const float *dx, int n, const char *what) {
    G->matmul(p->dy[0], dx, &p->W, NULL, n);
    float *dz = dev_poisoned(4);
    G->add(dz, dz, 4); /* any op but a matmul: the copy is gone */
    G->matmul(p->dy[1], dx, &p->W, NULL, n);
    float *a = host_from(p->dy[0], (size_t)n * p->W.rows), *b = host_from(p->dy[1], (size_t)n * p->W.rows);
    printf("  %-44s %s\n", what, memcmp(a, b, (size_t)n * p->W.rows * 4) ? "DIFFERS" : "identical");
    assert_memory_equal(a, b, (size_t)n * p->W.rows * 4);
    G->free(dz);
    free(a), free(b);
}

static void probe_free(probe_gemm_t *p) { G->free(p->dw), G->free(p->dy[0]), G->free(p->dy[1]); }

/* ---- elementwise and norms -------------------------------------------------------------------- */

static void check_embed(kvm_dtype_t dt) {
    const int V = 300, D = 136, N = 9;
    float *tf = rand_vec((size_t)V * D, 1.0f);
    void *tab = to_dtype(tf, (size_t)V * D, dt);
    int32_t ids[9] = {0, 5, 299, 17, 17, 150, 3, 298, 1};
    float *ref = malloc((size_t)N * D * 4);
    C->embed(ref, tab, dt, ids, N, D);
    void *dtab = dev_from(tab, (size_t)V * D * kvm_dtype_size(dt));
    void *dids = dev_from(ids, sizeof ids);
    float *dout = dev_poisoned((size_t)N * D);
    G->embed(dout, dtab, dt, dids, N, D);
    float *out = host_from(dout, (size_t)N * D);
    char what[64];
    snprintf(what, sizeof what, "embed %s", kvm_dtype_name(dt));
    expect_close(what, out, ref, (size_t)N * D, 1e-6);
    G->free(dtab), G->free(dids), G->free(dout);
    free(tf), free(tab), free(ref), free(out);
}
static void test_embed_gathers_rows_of_every_dtype(void **st) {
    (void)st;
    NEED_GPU();
    check_embed(KVM_F32);
    check_embed(KVM_BF16);
    check_embed(KVM_F16);
}

static void test_rmsnorm_matches_cpu(void **st) {
    (void)st;
    NEED_GPU();
    const int N = 7, D = 4096;
    float *x = rand_vec((size_t)N * D, 3.0f), *w = rand_vec(D, 1.0f), *ref = malloc((size_t)N * D * 4);
    C->rmsnorm(ref, x, w, N, D, 1e-5f);
    float *dx = dev_from(x, (size_t)N * D * 4), *dw = dev_from(w, (size_t)D * 4), *dout = dev_poisoned((size_t)N * D);
    G->rmsnorm(dout, dx, dw, N, D, 1e-5f);
    float *out = host_from(dout, (size_t)N * D);
    expect_close("rmsnorm", out, ref, (size_t)N * D, 1e-5);
    G->rmsnorm(dx, dx, dw, N, D, 1e-5f); /* in place */
    float *out2 = host_from(dx, (size_t)N * D);
    expect_close("rmsnorm in place", out2, ref, (size_t)N * D, 1e-5);
    G->free(dx), G->free(dw), G->free(dout);
    free(x), free(w), free(ref), free(out), free(out2);
}

static void test_fused_add_rmsnorm_matches_add_then_rmsnorm(void **st) {
    (void)st;
    NEED_GPU();
    const int N = 5, D = 896;
    float *x = rand_vec((size_t)N * D, 2.0f), *y = rand_vec((size_t)N * D, 2.0f), *w = rand_vec(D, 1.0f);
    float *xr = malloc((size_t)N * D * 4), *ref = malloc((size_t)N * D * 4);
    memcpy(xr, x, (size_t)N * D * 4);
    C->add(xr, y, (size_t)N * D);
    C->rmsnorm(ref, xr, w, N, D, 1e-6f);
    float *dx = dev_from(x, (size_t)N * D * 4), *dy = dev_from(y, (size_t)N * D * 4), *dw = dev_from(w, (size_t)D * 4);
    G->add_rmsnorm(dx, dy, dy, dw, N, D, 1e-6f); /* out aliases y, as the forward uses it */
    float *gx = host_from(dx, (size_t)N * D), *gout = host_from(dy, (size_t)N * D);
    expect_close("add_rmsnorm: residual", gx, xr, (size_t)N * D, 1e-6);
    expect_close("add_rmsnorm: normed", gout, ref, (size_t)N * D, 1e-5);
    G->free(dx), G->free(dy), G->free(dw);
    free(x), free(y), free(w), free(xr), free(ref), free(gx), free(gout);
}

static void test_head_rmsnorm_matches_cpu(void **st) {
    (void)st;
    NEED_GPU();
    const int N = 6, H = 16, HD = 128;
    size_t n = (size_t)N * H * HD;
    float *x = rand_vec(n, 2.0f), *w = rand_vec(HD, 1.0f), *ref = malloc(n * 4);
    memcpy(ref, x, n * 4);
    C->head_rmsnorm(ref, w, N, H, HD, 1e-6f);
    float *dx = dev_from(x, n * 4), *dw = dev_from(w, HD * 4);
    G->head_rmsnorm(dx, dw, N, H, HD, 1e-6f);
    float *out = host_from(dx, n);
    expect_close("head_rmsnorm", out, ref, n, 1e-5);
    G->free(dx), G->free(dw);
    free(x), free(w), free(ref), free(out);
}

static void test_swiglu_and_add_match_cpu(void **st) {
    (void)st;
    NEED_GPU();
    const size_t n = 100003;
    float *g = rand_vec(n, 4.0f), *u = rand_vec(n, 2.0f), *ref = malloc(n * 4), *ref2 = malloc(n * 4);
    C->swiglu(ref, g, u, n);
    memcpy(ref2, g, n * 4);
    C->add(ref2, u, n);
    float *dg = dev_from(g, n * 4), *du = dev_from(u, n * 4), *dout = dev_poisoned(n);
    G->swiglu(dout, dg, du, n);
    float *out = host_from(dout, n);
    expect_close("swiglu", out, ref, n, 1e-5);
    G->add(dg, du, n);
    float *out2 = host_from(dg, n);
    expect_close("add", out2, ref2, n, 1e-7);
    G->free(dg), G->free(du), G->free(dout);
    free(g), free(u), free(ref), free(ref2), free(out), free(out2);
}

/* ---- matmul ------------------------------------------------------------------------------------ */

static void check_matmul(kvm_dtype_t dt, int rows, int cols, int n, bool bias, double tol) {
    float *wf = rand_vec((size_t)rows * cols, 0.05f), *x = rand_vec((size_t)n * cols, 1.0f);
    float *b = bias ? rand_vec(rows, 0.5f) : NULL;
    void *wh = to_dtype(wf, (size_t)rows * cols, dt);
    kvm_wmat_t W = {.data = wh, .dtype = dt, .rows = rows, .cols = cols};
    float *ref = malloc((size_t)n * rows * 4);
    C->matmul(ref, x, &W, b, n);
    void *dw = dev_from(wh, (size_t)rows * cols * kvm_dtype_size(dt));
    float *dx = dev_from(x, (size_t)n * cols * 4), *db = b ? dev_from(b, (size_t)rows * 4) : NULL;
    float *dy = dev_poisoned((size_t)n * rows);
    kvm_wmat_t GW = {.data = dw, .dtype = dt, .rows = rows, .cols = cols};
    G->matmul(dy, dx, &GW, db, n);
    float *y = host_from(dy, (size_t)n * rows);
    char what[96];
    snprintf(what, sizeof what, "matmul %s [%d x %d] x %d rows%s", kvm_dtype_name(dt), rows, cols, n, bias ? " +bias" : "");
    expect_close(what, y, ref, (size_t)n * rows, tol);
    G->free(dw), G->free(dx), G->free(dy);
    if (db) G->free(db);
    free(wf), free(x), free(b), free(wh), free(ref), free(y);
}

static void test_matmul_fp32_matches_cpu(void **st) {
    (void)st;
    NEED_GPU();
    check_matmul(KVM_F32, 256, 1024, 1, false, 1e-5);
    check_matmul(KVM_F32, 172, 64, 7, true, 1e-5);
    check_matmul(KVM_F32, 1000, 512, 37, true, 1e-5);
}

static void test_matmul_bf16_gemv_and_gemm_match_cpu(void **st) {
    (void)st;
    NEED_GPU();
    for (int n = 1; n <= 8; n++) check_matmul(KVM_BF16, 1024, 4096, n, n == 3, 1e-2); /* GEMV path */
    for (int n = 9; n <= 16; n++) check_matmul(KVM_BF16, 4864, 896, n, n == 11, 1e-2); /* skinny mma */
    check_matmul(KVM_BF16, 1000, 512, 16, true, 1e-2);  /* skinny mma, rows % 16 != 0 */
    check_matmul(KVM_BF16, 1000, 512, 17, true, 1e-2);  /* cuBLAS */
    check_matmul(KVM_BF16, 4864, 896, 67, false, 1e-2); /* cuBLAS */
    check_matmul(KVM_BF16, 333, 172, 2, false, 1e-2);   /* cols % 8 != 0: cuBLAS */
}

/* q, k and v (or gate and up) share their input: the 16-bit copy of it is reused, but never after an op
 * changed it. */
static void test_matmul_reuses_rounded_activations_only_while_unchanged(void **st) {
    (void)st;
    NEED_GPU();
    const int rows = 256, cols = 512, n = 40;
    float *wf = rand_vec((size_t)rows * cols, 0.05f), *x = rand_vec((size_t)n * cols, 1.0f), *x2 = rand_vec((size_t)n * cols, 1.0f);
    void *wh = to_dtype(wf, (size_t)rows * cols, KVM_BF16);
    kvm_wmat_t W = {.data = wh, .dtype = KVM_BF16, .rows = rows, .cols = cols};
    float *ref1 = malloc((size_t)n * rows * 4), *sum = malloc((size_t)n * cols * 4), *ref2 = malloc((size_t)n * rows * 4);
    C->matmul(ref1, x, &W, NULL, n);
    memcpy(sum, x, (size_t)n * cols * 4);
    C->add(sum, x2, (size_t)n * cols);
    C->matmul(ref2, sum, &W, NULL, n);
    void *dw = dev_from(wh, (size_t)rows * cols * 2);
    float *dx = dev_from(x, (size_t)n * cols * 4), *dx2 = dev_from(x2, (size_t)n * cols * 4);
    float *dy1 = dev_poisoned((size_t)n * rows), *dy2 = dev_poisoned((size_t)n * rows), *dy3 = dev_poisoned((size_t)n * rows);
    kvm_wmat_t GW = {.data = dw, .dtype = KVM_BF16, .rows = rows, .cols = cols};
    G->matmul(dy1, dx, &GW, NULL, n);
    G->matmul(dy2, dx, &GW, NULL, n); /* same input: reuse */
    G->add(dx, dx2, (size_t)n * cols); /* input changed in place */
    G->matmul(dy3, dx, &GW, NULL, n);
    float *y1 = host_from(dy1, (size_t)n * rows), *y2 = host_from(dy2, (size_t)n * rows), *y3 = host_from(dy3, (size_t)n * rows);
    expect_close("matmul, first use of an input", y1, ref1, (size_t)n * rows, 1e-2);
    expect_close("matmul, same input again", y2, ref1, (size_t)n * rows, 1e-2);
    expect_close("matmul, input changed in place", y3, ref2, (size_t)n * rows, 1e-2);
    /* a norm over many rows hands its output to the next matmul already rounded to 16 bits */
    float *nw = rand_vec(cols, 1.0f), *normed = malloc((size_t)n * cols * 4), *ref4 = malloc((size_t)n * rows * 4);
    C->rmsnorm(normed, sum, nw, n, cols, 1e-5f);
    C->matmul(ref4, normed, &W, NULL, n);
    float *dnw = dev_from(nw, (size_t)cols * 4), *dy4 = dev_poisoned((size_t)n * rows);
    G->rmsnorm(dx2, dx, dnw, n, cols, 1e-5f);
    G->matmul(dy4, dx2, &GW, NULL, n);
    float *y4 = host_from(dy4, (size_t)n * rows);
    expect_close("matmul after rmsnorm (rounded by the norm)", y4, ref4, (size_t)n * rows, 1e-2);
    /* and over 2..16 rows (the skinny GEMM's input): the copy is the rounding, the fp32 output is written too */
    probe_gemm_t pg = probe_gemm(cols);
    G->rmsnorm(dx2, dx, dnw, 7, cols, 1e-5f);
    expect_rounded_copy(&pg, dx2, 7, "skinny GEMM after rmsnorm of 7 rows");
    G->add_rmsnorm(dx, dx2, dx2, dnw, 16, cols, 1e-5f);
    expect_rounded_copy(&pg, dx2, 16, "skinny GEMM after add_rmsnorm of 16 rows");
    G->rmsnorm(dx2, dx, dnw, 5, cols, 1e-5f);
    float *n5 = host_from(dx2, (size_t)5 * cols), *r5 = malloc((size_t)5 * cols * 4), *xs = host_from(dx, (size_t)5 * cols);
    C->rmsnorm(r5, xs, nw, 5, cols, 1e-5f);
    expect_close("rmsnorm of 5 rows: fp32 output", n5, r5, (size_t)5 * cols, 1e-6);
    probe_free(&pg);
    free(n5), free(r5), free(xs);
    G->free(dnw), G->free(dy4);
    free(nw), free(normed), free(ref4), free(y4);
    G->free(dw), G->free(dx), G->free(dx2), G->free(dy1), G->free(dy2), G->free(dy3);
    free(wf), free(x), free(x2), free(wh), free(ref1), free(sum), free(ref2), free(y1), free(y2), free(y3);
}

static void test_matmul_f16_matches_cpu(void **st) {
    (void)st;
    NEED_GPU();
    check_matmul(KVM_F16, 512, 1024, 1, true, 1e-2);
    check_matmul(KVM_F16, 512, 1024, 13, false, 1e-2);
    check_matmul(KVM_F16, 512, 1024, 24, false, 1e-2);
}

static void check_matmul_multi(kvm_dtype_t dt, int n, double tol) {
    const int cols = 512, rows[3] = {512, 128, 96};
    float *x = rand_vec((size_t)n * cols, 1.0f);
    float *dx = dev_from(x, (size_t)n * cols * 4);
    kvm_wmat_t W[3], GW[3];
    const kvm_wmat_t *gws[3];
    float *dy[3], *db[3], *ref[3], *b[3];
    void *wh[3], *dw[3];
    const float *dbs[3];
    for (int i = 0; i < 3; i++) {
        float *wf = rand_vec((size_t)rows[i] * cols, 0.05f);
        wh[i] = to_dtype(wf, (size_t)rows[i] * cols, dt);
        free(wf);
        b[i] = i == 1 ? NULL : rand_vec(rows[i], 0.5f); /* one matrix without bias */
        W[i] = (kvm_wmat_t){.data = wh[i], .dtype = dt, .rows = rows[i], .cols = cols};
        ref[i] = malloc((size_t)n * rows[i] * 4);
        C->matmul(ref[i], x, &W[i], b[i], n);
        dw[i] = dev_from(wh[i], (size_t)rows[i] * cols * kvm_dtype_size(dt));
        GW[i] = (kvm_wmat_t){.data = dw[i], .dtype = dt, .rows = rows[i], .cols = cols};
        gws[i] = &GW[i];
        db[i] = b[i] ? dev_from(b[i], (size_t)rows[i] * 4) : NULL;
        dbs[i] = db[i];
        dy[i] = dev_poisoned((size_t)n * rows[i]);
    }
    G->matmul_multi(3, dy, gws, dbs, dx, n);
    for (int i = 0; i < 3; i++) {
        float *y = host_from(dy[i], (size_t)n * rows[i]);
        char what[96];
        snprintf(what, sizeof what, "matmul_multi %s matrix %d of 3, %d rows", kvm_dtype_name(dt), i, n);
        expect_close(what, y, ref[i], (size_t)n * rows[i], tol);
        free(y);
        G->free(dw[i]), G->free(dy[i]);
        if (db[i]) G->free(db[i]);
        free(wh[i]), free(b[i]), free(ref[i]);
    }
    G->free(dx);
    free(x);
}

static void test_fused_matmul_of_three_matrices_matches_three_cpu_matmuls(void **st) {
    (void)st;
    NEED_GPU();
    check_matmul_multi(KVM_BF16, 1, 1e-2);  /* GEMV */
    check_matmul_multi(KVM_BF16, 6, 1e-2);  /* skinny mma */
    check_matmul_multi(KVM_F16, 16, 1e-2);  /* skinny mma, two n-tiles */
    check_matmul_multi(KVM_BF16, 40, 1e-2); /* cuBLAS, one rounded input */
    check_matmul_multi(KVM_F32, 3, 1e-5);   /* fp32 */
}

/* ---- RoPE ----------------------------------------------------------------------------------------- */

static void check_rope(kvm_rope_layout_t layout, int hd) {
    const int N = 11, H = 5, half = hd / 2;
    size_t n = (size_t)N * H * hd;
    float *x = rand_vec(n, 1.0f), *ref = malloc(n * 4), *inv = malloc(half * 4);
    for (int j = 0; j < half; j++) inv[j] = (float)pow(500000.0, -2.0 * j / hd);
    int32_t pos[11] = {0, 1, 2, 17, 255, 1000, 4095, 8191, 32768, 100000, 131071};
    memcpy(ref, x, n * 4);
    C->rope(ref, N, H, hd, pos, inv, layout);
    float *dx = dev_from(x, n * 4), *dinv = dev_from(inv, half * 4);
    int32_t *dpos = dev_from(pos, sizeof pos);
    G->rope(dx, N, H, hd, dpos, dinv, layout);
    float *out = host_from(dx, n);
    char what[64];
    snprintf(what, sizeof what, "rope %s hd %d", layout == KVM_ROPE_HALF ? "rotate-half" : "interleaved", hd);
    expect_close(what, out, ref, n, 1e-6);
    G->free(dx), G->free(dinv), G->free(dpos);
    free(x), free(ref), free(inv), free(out);
}

static void test_rope_of_q_and_k_in_one_pass_matches_two_cpu_ropes(void **st) {
    (void)st;
    NEED_GPU();
    const int N = 7, HQ = 14, HK = 2, hd = 64, half = hd / 2;
    float *q = rand_vec((size_t)N * HQ * hd, 1.0f), *k = rand_vec((size_t)N * HK * hd, 1.0f), *inv = malloc(half * 4);
    for (int j = 0; j < half; j++) inv[j] = (float)pow(1e6, -2.0 * j / hd);
    int32_t pos[7] = {0, 3, 99, 1000, 5000, 32767, 40000};
    float *dq = dev_from(q, (size_t)N * HQ * hd * 4), *dk = dev_from(k, (size_t)N * HK * hd * 4), *dinv = dev_from(inv, half * 4);
    int32_t *dpos = dev_from(pos, sizeof pos);
    C->rope(q, N, HQ, hd, pos, inv, KVM_ROPE_HALF);
    C->rope(k, N, HK, hd, pos, inv, KVM_ROPE_HALF);
    G->rope_qk(dq, dk, N, HQ, HK, hd, dpos, dinv, KVM_ROPE_HALF);
    float *gq = host_from(dq, (size_t)N * HQ * hd), *gk = host_from(dk, (size_t)N * HK * hd);
    expect_close("rope_qk: q", gq, q, (size_t)N * HQ * hd, 1e-6);
    expect_close("rope_qk: k", gk, k, (size_t)N * HK * hd, 1e-6);
    G->free(dq), G->free(dk), G->free(dinv), G->free(dpos);
    free(q), free(k), free(inv), free(gq), free(gk);
}

/* rope of q and k then kv_write, fused, against the three CPU ops (decode-like batch: 3 sequences) */
static void check_rope_kv(int HQ, int HK, int hd, kvm_rope_layout_t layout, kvm_dtype_t dt) {
    const int L = 2, layer = 1, half = hd / 2, nb = 8;
    kvm_kv_geom_t g = {.n_layers = L, .n_kv_heads = HK, .head_dim = hd, .dtype = dt};
    int32_t rs[4] = {0, 1, 4, 5}, cl[3] = {17, 3, 40}, bt[3 * 3] = {5, 2, -1, 7, -1, -1, 0, 1, 3};
    int32_t pos[5] = {16, 0, 1, 2, 39};
    const int rows = 5;
    float *q = rand_vec((size_t)rows * HQ * hd, 1.0f), *k = rand_vec((size_t)rows * HK * hd, 1.0f);
    float *v = rand_vec((size_t)rows * HK * hd, 1.0f), *inv = malloc(half * 4);
    for (int j = 0; j < half; j++) inv[j] = (float)pow(10000.0, -2.0 * j / hd);
    size_t pool_elems = (size_t)nb * L * 2 * HK * KVM_KV_BLOCK * hd;
    const size_t es = kvm_dtype_size(dt);
    unsigned char *pool = calloc(pool_elems, es);
    float *dq = dev_from(q, (size_t)rows * HQ * hd * 4), *dk = dev_from(k, (size_t)rows * HK * hd * 4);
    float *dv = dev_from(v, (size_t)rows * HK * hd * 4), *dinv = dev_from(inv, half * 4);
    int32_t *dpos = dev_from(pos, sizeof pos);
    void *dpool = dev_from(pool, pool_elems * es);
    kvm_attn_batch_t cb = {.n_seqs = 3, .row_start = rs, .ctx_len = cl, .block_table = bt, .max_blocks = 3, .total_rows = rows,
                           .h_row_start = rs, .h_ctx_len = cl, .h_block_table = bt};
    kvm_attn_batch_t gb = cb;
    gb.row_start = dev_from(rs, sizeof rs);
    gb.ctx_len = dev_from(cl, sizeof cl);
    gb.block_table = dev_from(bt, sizeof bt);
    C->rope(q, rows, HQ, hd, pos, inv, layout);
    C->rope(k, rows, HK, hd, pos, inv, layout);
    C->kv_write(pool, &g, layer, k, v, &cb);
    G->rope_qk_kv_write(dq, dk, dv, HQ, hd, dpos, dinv, layout, dpool, &g, layer, &gb);
    float *gq = host_from(dq, (size_t)rows * HQ * hd);
    float *gk = host_from(dk, (size_t)rows * HK * hd);
    unsigned char *gp = malloc(pool_elems * es);
    assert_int_equal(G->d2h(gp, dpool, pool_elems * es), 0);
    char what[96];
    snprintf(what, sizeof what, "rope_qk_kv_write %d/%d x %d %s %s: q", HQ, HK, hd,
             layout == KVM_ROPE_HALF ? "half" : "interleaved", kvm_dtype_name(dt));
    expect_close(what, gq, q, (size_t)rows * HQ * hd, 1e-6);
    expect_close("  k", gk, k, (size_t)rows * HK * hd, 1e-6);
    printf("  %-44s %s\n", "  cache", memcmp(gp, pool, pool_elems * es) ? "DIFFERS" : "identical");
    assert_memory_equal(gp, pool, pool_elems * es);
    G->free(dq), G->free(dk), G->free(dv), G->free(dinv), G->free(dpos), G->free(dpool);
    G->free((void *)gb.row_start), G->free((void *)gb.ctx_len), G->free((void *)gb.block_table);
    free(q), free(k), free(v), free(inv), free(pool), free(gq), free(gk), free(gp);
}

/* a block per row and group of heads */
static void test_fused_rope_and_kv_write_match_cpu(void **st) {
    (void)st;
    NEED_GPU();
    check_rope_kv(8, 2, 64, KVM_ROPE_HALF, KVM_BF16);         /* 8 heads per block: a partial second group */
    check_rope_kv(32, 8, 128, KVM_ROPE_HALF, KVM_BF16);       /* Llama-3.1-8B's heads: 10 groups of 4 */
    check_rope_kv(12, 4, 128, KVM_ROPE_INTERLEAVED, KVM_F16);
    check_rope_kv(6, 3, 32, KVM_ROPE_INTERLEAVED, KVM_F32);   /* 16 pairs per head: 16 heads per block */
    check_rope_kv(4, 2, 576, KVM_ROPE_HALF, KVM_BF16);        /* 288 pairs per head: the block loops */
}

static void check_swiglu_matmul(kvm_dtype_t dt, int n, double tol) {
    const int rows = 256, cols = 1024;
    float *g = rand_vec((size_t)n * cols, 3.0f), *u = rand_vec((size_t)n * cols, 1.0f), *wf = rand_vec((size_t)rows * cols, 0.05f);
    void *wh = to_dtype(wf, (size_t)rows * cols, dt);
    kvm_wmat_t W = {.data = wh, .dtype = dt, .rows = rows, .cols = cols};
    float *act = malloc((size_t)n * cols * 4), *ref = malloc((size_t)n * rows * 4);
    C->swiglu(act, g, u, (size_t)n * cols);
    C->matmul(ref, act, &W, NULL, n);
    float *dg = dev_from(g, (size_t)n * cols * 4), *du = dev_from(u, (size_t)n * cols * 4), *dy = dev_poisoned((size_t)n * rows);
    void *dw = dev_from(wh, (size_t)rows * cols * kvm_dtype_size(dt));
    kvm_wmat_t GW = {.data = dw, .dtype = dt, .rows = rows, .cols = cols};
    G->swiglu_matmul(dy, dg, du, &GW, n);
    float *y = host_from(dy, (size_t)n * rows);
    char what[80];
    snprintf(what, sizeof what, "swiglu_matmul %s, %d rows", kvm_dtype_name(dt), n);
    expect_close(what, y, ref, (size_t)n * rows, tol);
    G->free(dg), G->free(du), G->free(dy), G->free(dw);
    free(g), free(u), free(wf), free(wh), free(act), free(ref), free(y);
}

static void test_swiglu_then_down_projection_matches_cpu(void **st) {
    (void)st;
    NEED_GPU();
    check_swiglu_matmul(KVM_BF16, 1, 1e-2);   /* fp32 swiglu + GEMV */
    check_swiglu_matmul(KVM_BF16, 16, 1e-2);  /* 16-bit activation + skinny mma */
    check_swiglu_matmul(KVM_F16, 100, 1e-2);  /* 16-bit activation + cuBLAS */
    check_swiglu_matmul(KVM_F32, 7, 1e-5);    /* fp32 mode */
}

/* ---- fused device blocks (ffn, add_rmsnorm_16) -------------------------------------------------- */

/* ops->ffn against the CPU's gate/up matmuls, swiglu and down matmul. adjacent: gate and up in one device
 * buffer (the one-GEMM path); in_place: y == x (as the forward calls it). */
static void check_ffn(kvm_dtype_t dt, int n, bool adjacent, bool in_place, double tol) {
    const int D = 256, FF = 768;
    float *x = rand_vec((size_t)n * D, 1.0f);
    float *wg = rand_vec((size_t)FF * D, 0.08f), *wu = rand_vec((size_t)FF * D, 0.08f), *wd = rand_vec((size_t)D * FF, 0.05f);
    void *hg = to_dtype(wg, (size_t)FF * D, dt), *hu = to_dtype(wu, (size_t)FF * D, dt), *hd = to_dtype(wd, (size_t)D * FF, dt);
    kvm_wmat_t Wg = {.data = hg, .dtype = dt, .rows = FF, .cols = D}, Wu = {.data = hu, .dtype = dt, .rows = FF, .cols = D};
    kvm_wmat_t Wd = {.data = hd, .dtype = dt, .rows = D, .cols = FF};
    float *g = malloc((size_t)n * FF * 4), *u = malloc((size_t)n * FF * 4), *ref = malloc((size_t)n * D * 4);
    C->matmul(g, x, &Wg, NULL, n);
    C->matmul(u, x, &Wu, NULL, n);
    C->swiglu(g, g, u, (size_t)n * FF);
    C->matmul(ref, g, &Wd, NULL, n);
    const size_t es = kvm_dtype_size(dt), wb = (size_t)FF * D * es;
    unsigned char *dgu = G->alloc(2 * wb);
    assert_non_null(dgu);
    assert_int_equal(G->h2d(dgu, hg, wb), 0);
    void *dup = adjacent ? (void *)(dgu + wb) : dev_from(hu, wb);
    if (adjacent) assert_int_equal(G->h2d(dup, hu, wb), 0);
    void *dd = dev_from(hd, (size_t)D * FF * es);
    kvm_wmat_t GWg = {.data = dgu, .dtype = dt, .rows = FF, .cols = D}, GWu = {.data = dup, .dtype = dt, .rows = FF, .cols = D};
    kvm_wmat_t GWd = {.data = dd, .dtype = dt, .rows = D, .cols = FF};
    float *dx = dev_from(x, (size_t)n * D * 4), *dy = in_place ? dx : dev_poisoned((size_t)n * D);
    float *h1 = dev_poisoned((size_t)n * FF), *h2 = dev_poisoned((size_t)n * FF);
    G->ffn(dy, dx, &GWg, &GWu, &GWd, h1, h2, n);
    float *y = host_from(dy, (size_t)n * D);
    char what[96];
    snprintf(what, sizeof what, "ffn %s, %d rows%s%s", kvm_dtype_name(dt), n, adjacent ? ", gate|up adjacent" : "",
             in_place ? ", in place" : "");
    expect_close(what, y, ref, (size_t)n * D, tol);
    G->free(dgu), G->free(dd), G->free(h1), G->free(h2), G->free(dx);
    if (!adjacent) G->free(dup);
    if (!in_place) G->free(dy);
    free(x), free(wg), free(wu), free(wd), free(hg), free(hu), free(hd), free(g), free(u), free(ref), free(y);
}

/* The skinny GEMM with 32 and 64 weight rows per CTA (opts.skinny_rows): enough rows that the launch keeps them (a
 * CTA per SM at least: 8500 rows), rows that are not a multiple of the CTA's, one and two n-tiles, bias, f16; then
 * at 16 rows per CTA, wide and narrow. */
static void test_skinny_gemm_with_more_rows_per_cta_matches_cpu(void **st) {
    (void)st;
    NEED_GPU();
    const char *per[2] = {"32", "64"};
    for (int i = 0; i < 2; i++) {
        cuda_switch("skinny_rows", per[i]);
        check_matmul(KVM_BF16, 8500, 256, 5, true, 1e-2);
        check_matmul(KVM_BF16, 8500, 256, 16, false, 1e-2);
        check_matmul(KVM_F16, 8500, 512, 12, true, 1e-2);
        check_matmul(KVM_BF16, 1000, 512, 16, true, 1e-2); /* too few rows: back to 16 per CTA */
    }
    cuda_switch("skinny_rows", "16");
    check_matmul(KVM_BF16, 4100, 1024, 16, true, 1e-2);
    check_matmul(KVM_F16, 1000, 512, 3, false, 1e-2);
    check_matmul(KVM_BF16, 300, 160, 9, true, 1e-2); /* 5 column chunks: 3 of the 8 warps have none */
    check_matmul_multi(KVM_BF16, 7, 1e-2);
}

/* The batch-1 GEMV: a wide row (bias), f16, a width of 17 16-byte pieces, several matrices in one launch (as q/k/v
 * and gate/up are), and the last CTA's idle warps (rows not a multiple of the CTA's). */
static void test_gemv_on_odd_shapes_matches_cpu(void **st) {
    (void)st;
    NEED_GPU();
    check_matmul(KVM_BF16, 4099, 4096, 1, true, 1e-2);
    check_matmul(KVM_F16, 333, 1024, 1, false, 1e-2);
    check_matmul(KVM_BF16, 257, 136, 1, true, 1e-2); /* 136 = 17 x 8 */
    check_matmul_multi(KVM_BF16, 1, 1e-2);
    check_ffn(KVM_BF16, 1, false, false, 1e-2);
}

static void test_fused_ffn_matches_the_cpu_mlp_on_every_path(void **st) {
    (void)st;
    NEED_GPU();
    check_ffn(KVM_BF16, 1, false, false, 1e-2);  /* GEMV, SwiGLU, GEMV (the default for one row) */
    cuda_switch("ffn_gemv", "1");                /* gate+up GEMV with the SwiGLU epilogue, then GEMV */
    check_ffn(KVM_BF16, 1, false, false, 1e-2);
    check_ffn(KVM_BF16, 1, true, true, 1e-2);
    cuda_switch("ffn_gemv", "0");
    check_ffn(KVM_BF16, 9, false, false, 1e-2);  /* skinny mma (unfused path) */
    check_ffn(KVM_BF16, 100, true, true, 1e-2);  /* one cuBLAS GEMM to bf16, bf16 SwiGLU, cuBLAS down */
    check_ffn(KVM_BF16, 40, false, false, 1e-2); /* two GEMMs into the interleaved bf16 buffer */
    check_ffn(KVM_F16, 64, true, false, 1e-2);   /* f16: unfused */
    check_ffn(KVM_F16, 1, false, false, 1e-2);
    check_ffn(KVM_F32, 7, false, false, 1e-5);   /* fp32 mode: unfused, exact path */
    check_ffn(KVM_F32, 33, true, true, 1e-5);
}

static void test_add_rmsnorm_16_feeds_the_next_gemm_and_refuses_a_gemv(void **st) {
    (void)st;
    NEED_GPU();
    const int N = 40, D = 512, R = 384;
    float *x = rand_vec((size_t)N * D, 2.0f), *y = rand_vec((size_t)N * D, 2.0f), *w = rand_vec(D, 1.0f);
    float *wf = rand_vec((size_t)R * D, 0.05f);
    void *wh = to_dtype(wf, (size_t)R * D, KVM_BF16);
    kvm_wmat_t W = {.data = wh, .dtype = KVM_BF16, .rows = R, .cols = D};
    float *xr = malloc((size_t)N * D * 4), *nr = malloc((size_t)N * D * 4), *ref = malloc((size_t)N * R * 4);
    memcpy(xr, x, (size_t)N * D * 4);
    C->add(xr, y, (size_t)N * D);
    C->rmsnorm(nr, xr, w, N, D, 1e-5f);
    C->matmul(ref, nr, &W, NULL, N);
    float *dx = dev_from(x, (size_t)N * D * 4), *dy = dev_from(y, (size_t)N * D * 4), *dw = dev_from(w, (size_t)D * 4);
    void *dwh = dev_from(wh, (size_t)R * D * 2);
    kvm_wmat_t GW = {.data = dwh, .dtype = KVM_BF16, .rows = R, .cols = D};
    float *dz = dev_poisoned((size_t)N * R);
    G->matmul(dz, dy, &GW, NULL, N); /* the backend now knows the model's 16-bit dtype */
    assert_int_equal(G->sync(), 0);
    G->add_rmsnorm_16(dx, dy, dy, dw, N, D, 1e-5f);
    G->matmul(dz, dy, &GW, NULL, N);
    float *gx = host_from(dx, (size_t)N * D), *gz = host_from(dz, (size_t)N * R);
    expect_close("add_rmsnorm_16: residual", gx, xr, (size_t)N * D, 1e-6);
    expect_close("add_rmsnorm_16 -> bf16 GEMM", gz, ref, (size_t)N * R, 1e-2);
    /* the fp32 rows were never written: a GEMV on them must fail, not read them */
    G->add_rmsnorm_16(dx, dy, dy, dw, N, D, 1e-5f);
    G->matmul(dz, dy, &GW, NULL, 1);
    int rc = G->sync();
    printf("  GEMV on add_rmsnorm_16's output: rc %d (%s)\n", rc, kvm_errmsg());
    assert_int_not_equal(rc, 0);
    kvm_errclear();
    G->rmsnorm(dy, dx, dw, N, D, 1e-5f); /* written again: usable by any matmul */
    G->matmul(dz, dy, &GW, NULL, 1);
    assert_int_equal(G->sync(), 0);
    G->free(dx), G->free(dy), G->free(dw), G->free(dwh), G->free(dz);
    free(x), free(y), free(w), free(wf), free(wh), free(xr), free(nr), free(ref), free(gx), free(gz);
}

/* qkv_rope_kv (batch-1 decode) against matmul_multi + rope_qk_kv_write on the GPU (bit for bit: same dot-product
 * order) and against the CPU ops (bf16 weights: 1e-2); both layouts, biases, a cache slot inside block 3. */
static void check_qkv_rope_kv(kvm_rope_layout_t layout) {
    const int HQ = 8, HK = 2, hd = 64, D = 256, L = 2, layer = 1, half = hd / 2, nb = 6;
    kvm_kv_geom_t g = {.n_layers = L, .n_kv_heads = HK, .head_dim = hd, .dtype = KVM_BF16};
    int32_t rs[2] = {0, 1}, cl[1] = {40}, bt[3] = {4, 0, 3}, pos[1] = {39};
    float *x = rand_vec(D, 1.0f), *inv = malloc(half * 4);
    for (int j = 0; j < half; j++) inv[j] = (float)pow(10000.0, -2.0 * j / hd);
    const int rq = HQ * hd, rk = HK * hd;
    float *wf[3] = {rand_vec((size_t)rq * D, 0.06f), rand_vec((size_t)rk * D, 0.06f), rand_vec((size_t)rk * D, 0.06f)};
    float *bias[3] = {rand_vec(rq, 0.1f), rand_vec(rk, 0.1f), rand_vec(rk, 0.1f)};
    kvm_wmat_t CW[3], GW[3];
    void *wh[3], *dw[3];
    float *db[3];
    for (int i = 0; i < 3; i++) {
        const int r = i == 0 ? rq : rk;
        wh[i] = to_dtype(wf[i], (size_t)r * D, KVM_BF16);
        dw[i] = dev_from(wh[i], (size_t)r * D * 2);
        db[i] = dev_from(bias[i], (size_t)r * 4);
        CW[i] = (kvm_wmat_t){.data = wh[i], .dtype = KVM_BF16, .rows = r, .cols = D};
        GW[i] = (kvm_wmat_t){.data = dw[i], .dtype = KVM_BF16, .rows = r, .cols = D};
    }
    /* CPU reference */
    size_t pool_elems = (size_t)nb * L * 2 * HK * KVM_KV_BLOCK * hd;
    uint16_t *pool = calloc(pool_elems, 2);
    float *q = malloc((size_t)rq * 4), *k = malloc((size_t)rk * 4), *v = malloc((size_t)rk * 4);
    C->matmul(q, x, &CW[0], bias[0], 1);
    C->matmul(k, x, &CW[1], bias[1], 1);
    C->matmul(v, x, &CW[2], bias[2], 1);
    C->rope(q, 1, HQ, hd, pos, inv, layout);
    C->rope(k, 1, HK, hd, pos, inv, layout);
    kvm_attn_batch_t cb = {.n_seqs = 1, .row_start = rs, .ctx_len = cl, .block_table = bt, .max_blocks = 3, .total_rows = 1,
                           .h_row_start = rs, .h_ctx_len = cl, .h_block_table = bt};
    C->kv_write(pool, &g, layer, k, v, &cb);
    /* GPU: fused, and the separate ops */
    kvm_attn_batch_t gb = cb;
    gb.row_start = dev_from(rs, sizeof rs);
    gb.ctx_len = dev_from(cl, sizeof cl);
    gb.block_table = dev_from(bt, sizeof bt);
    float *dx = dev_from(x, (size_t)D * 4), *dinv = dev_from(inv, half * 4);
    int32_t *dpos = dev_from(pos, sizeof pos);
    float *dq[2] = {dev_poisoned(rq), dev_poisoned(rq)}, *dk[2] = {dev_poisoned(rk), dev_poisoned(rk)};
    float *dv[2] = {dev_poisoned(rk), dev_poisoned(rk)};
    void *dpool[2] = {dev_from(pool, pool_elems * 2), dev_from(pool, pool_elems * 2)};
    assert_int_equal(G->memset0(dpool[0], pool_elems * 2), 0);
    assert_int_equal(G->memset0(dpool[1], pool_elems * 2), 0);
    int rc = G->qkv_rope_kv(dq[0], dk[0], dv[0], dx, &GW[0], &GW[1], &GW[2], db[0], db[1], db[2], HQ, hd, dpos, dinv, layout,
                            dpool[0], &g, layer, &gb);
    assert_int_equal(rc, 0);
    float *ys[3] = {dq[1], dk[1], dv[1]};
    const kvm_wmat_t *ws[3] = {&GW[0], &GW[1], &GW[2]};
    const float *bs[3] = {db[0], db[1], db[2]};
    G->matmul_multi(3, ys, ws, bs, dx, 1);
    G->rope_qk_kv_write(dq[1], dk[1], dv[1], HQ, hd, dpos, dinv, layout, dpool[1], &g, layer, &gb);
    float *gq = host_from(dq[0], rq), *gq2 = host_from(dq[1], rq), *gv = host_from(dv[0], rk);
    uint16_t *gp = malloc(pool_elems * 2), *gp2 = malloc(pool_elems * 2);
    assert_int_equal(G->d2h(gp, dpool[0], pool_elems * 2), 0);
    assert_int_equal(G->d2h(gp2, dpool[1], pool_elems * 2), 0);
    const char *lay = layout == KVM_ROPE_HALF ? "rotate-half" : "interleaved";
    char what[96];
    snprintf(what, sizeof what, "qkv_rope_kv %s: q vs cpu", lay);
    expect_close(what, gq, q, rq, 1e-2);
    snprintf(what, sizeof what, "qkv_rope_kv %s: v vs cpu", lay);
    expect_close(what, gv, v, rk, 1e-2);
    /* the cache vs the CPU's: only this token's slots may hold values; compare them as floats */
    float *cf = malloc(pool_elems * 4), *gf = malloc(pool_elems * 4);
    for (size_t i = 0; i < pool_elems; i++) cf[i] = kvm_bf16_to_f32(pool[i]), gf[i] = kvm_bf16_to_f32(gp[i]);
    snprintf(what, sizeof what, "qkv_rope_kv %s: cache vs cpu", lay);
    expect_close(what, gf, cf, pool_elems, 1e-2);
    printf("  qkv_rope_kv %s vs separate GPU ops: q %s, cache %s\n", lay, memcmp(gq, gq2, (size_t)rq * 4) ? "DIFFER" : "identical",
           memcmp(gp, gp2, pool_elems * 2) ? "DIFFERS" : "identical");
    assert_memory_equal(gq, gq2, (size_t)rq * 4);
    assert_memory_equal(gp, gp2, pool_elems * 2);
    /* two rows: not this op's case, nothing enqueued */
    kvm_attn_batch_t gb2 = gb;
    gb2.total_rows = 2;
    assert_int_equal(G->qkv_rope_kv(dq[0], dk[0], dv[0], dx, &GW[0], &GW[1], &GW[2], NULL, NULL, NULL, HQ, hd, dpos, dinv,
                                    layout, dpool[0], &g, layer, &gb2),
                     KVM_EUNSUPPORTED);
    assert_int_equal(G->sync(), 0);
    for (int i = 0; i < 3; i++) G->free(dw[i]), G->free(db[i]), free(wf[i]), free(bias[i]), free(wh[i]);
    for (int i = 0; i < 2; i++) G->free(dq[i]), G->free(dk[i]), G->free(dv[i]), G->free(dpool[i]);
    G->free(dx), G->free(dinv), G->free(dpos);
    G->free((void *)gb.row_start), G->free((void *)gb.ctx_len), G->free((void *)gb.block_table);
    free(x), free(inv), free(pool), free(q), free(k), free(v), free(gq), free(gq2), free(gv), free(gp), free(gp2), free(cf),
        free(gf);
}

static void test_fused_qkv_rope_kv_write_matches_the_separate_ops(void **st) {
    (void)st;
    NEED_GPU();
    check_qkv_rope_kv(KVM_ROPE_HALF);
    check_qkv_rope_kv(KVM_ROPE_INTERLEAVED);
}

/* qkv_rope_kv on a prefill step (two sequences, 40 rows: bf16 q|k|v GEMM, then RoPE + KV write) against the
 * CPU ops (bf16 weights: 1e-2); adjacent: Wq|Wk|Wv in one device buffer (one GEMM), else three GEMMs. */
static void check_qkv_prefill(kvm_rope_layout_t layout, bool adjacent, bool with_bias, int hd) {
    const int HQ = 8, HK = 2, D = 256, L = 2, layer = 0, half = hd / 2, nb = 8, rows = 40;
    kvm_kv_geom_t g = {.n_layers = L, .n_kv_heads = HK, .head_dim = hd, .dtype = KVM_BF16};
    /* seq 0: 30 new tokens from position 0; seq 1: 10 new tokens after 40 cached ones */
    int32_t rs[3] = {0, 30, 40}, cl[2] = {30, 50}, bt[2 * 4] = {6, 1, -1, -1, 0, 2, 5, 7};
    int32_t pos[40];
    for (int i = 0; i < 30; i++) pos[i] = i;
    for (int i = 0; i < 10; i++) pos[30 + i] = 40 + i;
    float *x = rand_vec((size_t)rows * D, 1.0f), *inv = malloc(half * 4);
    for (int j = 0; j < half; j++) inv[j] = (float)pow(10000.0, -2.0 * j / hd);
    const int rq = HQ * hd, rk = HK * hd, rr[3] = {rq, rk, rk};
    float *wf[3], *bias[3];
    kvm_wmat_t CW[3], GW[3];
    void *wh[3];
    float *db[3] = {NULL, NULL, NULL};
    unsigned char *dall = G->alloc((size_t)(rq + 2 * rk) * D * 2);
    assert_non_null(dall);
    size_t off = 0;
    for (int i = 0; i < 3; i++) {
        wf[i] = rand_vec((size_t)rr[i] * D, 0.06f);
        bias[i] = with_bias ? rand_vec(rr[i], 0.1f) : NULL;
        wh[i] = to_dtype(wf[i], (size_t)rr[i] * D, KVM_BF16);
        void *dw = adjacent ? (void *)(dall + off) : dev_from(wh[i], (size_t)rr[i] * D * 2);
        if (adjacent) assert_int_equal(G->h2d(dw, wh[i], (size_t)rr[i] * D * 2), 0);
        off += (size_t)rr[i] * D * 2;
        if (with_bias) db[i] = dev_from(bias[i], (size_t)rr[i] * 4);
        CW[i] = (kvm_wmat_t){.data = wh[i], .dtype = KVM_BF16, .rows = rr[i], .cols = D};
        GW[i] = (kvm_wmat_t){.data = dw, .dtype = KVM_BF16, .rows = rr[i], .cols = D};
    }
    size_t pool_elems = (size_t)nb * L * 2 * HK * KVM_KV_BLOCK * hd;
    uint16_t *pool = calloc(pool_elems, 2);
    float *q = malloc((size_t)rows * rq * 4), *k = malloc((size_t)rows * rk * 4), *v = malloc((size_t)rows * rk * 4);
    C->matmul(q, x, &CW[0], bias[0], rows);
    C->matmul(k, x, &CW[1], bias[1], rows);
    C->matmul(v, x, &CW[2], bias[2], rows);
    C->rope(q, rows, HQ, hd, pos, inv, layout);
    C->rope(k, rows, HK, hd, pos, inv, layout);
    kvm_attn_batch_t cb = {.n_seqs = 2, .row_start = rs, .ctx_len = cl, .block_table = bt, .max_blocks = 4, .total_rows = rows,
                           .h_row_start = rs, .h_ctx_len = cl, .h_block_table = bt};
    C->kv_write(pool, &g, layer, k, v, &cb);
    kvm_attn_batch_t gb = cb;
    gb.row_start = dev_from(rs, sizeof rs);
    gb.ctx_len = dev_from(cl, sizeof cl);
    gb.block_table = dev_from(bt, sizeof bt);
    float *dx = dev_from(x, (size_t)rows * D * 4), *dinv = dev_from(inv, half * 4);
    int32_t *dpos = dev_from(pos, sizeof pos);
    float *dq = dev_poisoned((size_t)rows * rq), *dk = dev_poisoned((size_t)rows * rk), *dv = dev_poisoned((size_t)rows * rk);
    void *dpool = G->alloc(pool_elems * 2);
    assert_int_equal(G->memset0(dpool, pool_elems * 2), 0);
    int rc = G->qkv_rope_kv(dq, dk, dv, dx, &GW[0], &GW[1], &GW[2], db[0], db[1], db[2], HQ, hd, dpos, dinv, layout, dpool, &g,
                            layer, &gb);
    assert_int_equal(rc, 0);
    float *gq = host_from(dq, (size_t)rows * rq), *gk = host_from(dk, (size_t)rows * rk), *gv = host_from(dv, (size_t)rows * rk);
    uint16_t *gp = malloc(pool_elems * 2);
    assert_int_equal(G->d2h(gp, dpool, pool_elems * 2), 0);
    float *cf = malloc(pool_elems * 4), *gf = malloc(pool_elems * 4);
    for (size_t i = 0; i < pool_elems; i++) cf[i] = kvm_bf16_to_f32(pool[i]), gf[i] = kvm_bf16_to_f32(gp[i]);
    char what[112];
    const char *lay = layout == KVM_ROPE_HALF ? "rotate-half" : "interleaved";
    const char *how = adjacent ? "one GEMM" : "three GEMMs";
    snprintf(what, sizeof what, "qkv_rope_kv prefill hd %d %s, %s%s: q", hd, lay, how, with_bias ? ", bias" : "");
    expect_close(what, gq, q, (size_t)rows * rq, 1e-2);
    snprintf(what, sizeof what, "qkv_rope_kv prefill %s, %s%s: k", lay, how, with_bias ? ", bias" : "");
    expect_close(what, gk, k, (size_t)rows * rk, 1e-2);
    snprintf(what, sizeof what, "qkv_rope_kv prefill %s, %s%s: v", lay, how, with_bias ? ", bias" : "");
    expect_close(what, gv, v, (size_t)rows * rk, 1e-2);
    snprintf(what, sizeof what, "qkv_rope_kv prefill %s, %s%s: cache", lay, how, with_bias ? ", bias" : "");
    expect_close(what, gf, cf, pool_elems, 1e-2);
    /* nothing outside this step's slots was written */
    size_t stray = 0;
    for (size_t i = 0; i < pool_elems; i++) stray += pool[i] == 0 && gp[i] != 0;
    assert_int_equal(stray, 0);
    for (int i = 0; i < 3; i++) {
        if (!adjacent) G->free((void *)GW[i].data);
        if (db[i]) G->free(db[i]);
        free(wf[i]), free(bias[i]), free(wh[i]);
    }
    G->free(dall), G->free(dx), G->free(dinv), G->free(dpos), G->free(dq), G->free(dk), G->free(dv), G->free(dpool);
    G->free((void *)gb.row_start), G->free((void *)gb.ctx_len), G->free((void *)gb.block_table);
    free(x), free(inv), free(pool), free(q), free(k), free(v), free(gq), free(gk), free(gv), free(gp), free(cf), free(gf);
}

static void test_fused_qkv_rope_kv_write_on_a_prefill_step_matches_cpu(void **st) {
    (void)st;
    NEED_GPU();
    check_qkv_prefill(KVM_ROPE_HALF, true, false, 64);
    check_qkv_prefill(KVM_ROPE_HALF, false, true, 128);
    check_qkv_prefill(KVM_ROPE_INTERLEAVED, true, true, 64);
    check_qkv_prefill(KVM_ROPE_HALF, true, true, 72);
    check_qkv_prefill(KVM_ROPE_INTERLEAVED, false, false, 40);
}

/* matmul_add_rmsnorm_16 and ffn_add_rmsnorm_16 (the projection's output reaches the residual norm in 16 bits):
 * the residual against the CPU's matmul + add (1e-2: the projection is rounded to bf16), and the normalized rows
 * through the next GEMM (which must use the 16-bit copy) against the CPU's rmsnorm + matmul. */
static void check_proj_add_norm(bool ffn, kvm_dtype_t dt, int N, double tol) {
    const int D = 256, K = ffn ? 256 : 512, FF = 512, R = 128;
    float *x = rand_vec((size_t)N * D, 1.0f), *in = rand_vec((size_t)N * K, 1.0f), *w = rand_vec(D, 1.0f);
    float *wo = rand_vec((size_t)D * K, 0.06f), *wg = rand_vec((size_t)FF * K, 0.08f), *wu = rand_vec((size_t)FF * K, 0.08f);
    float *wd = rand_vec((size_t)D * FF, 0.05f), *wn = rand_vec((size_t)R * D, 0.06f);
    void *ho = to_dtype(wo, (size_t)D * K, dt), *hg = to_dtype(wg, (size_t)FF * K, dt), *hu = to_dtype(wu, (size_t)FF * K, dt);
    void *hd = to_dtype(wd, (size_t)D * FF, dt), *hn = to_dtype(wn, (size_t)R * D, dt);
    const size_t es = kvm_dtype_size(dt);
    kvm_wmat_t Wo = {.data = ho, .dtype = dt, .rows = D, .cols = K}, Wg = {.data = hg, .dtype = dt, .rows = FF, .cols = K};
    kvm_wmat_t Wu = {.data = hu, .dtype = dt, .rows = FF, .cols = K}, Wd = {.data = hd, .dtype = dt, .rows = D, .cols = FF};
    kvm_wmat_t Wn = {.data = hn, .dtype = dt, .rows = R, .cols = D};
    /* CPU */
    float *y = malloc((size_t)N * D * 4), *xr = malloc((size_t)N * D * 4), *nr = malloc((size_t)N * D * 4);
    float *ref = malloc((size_t)N * R * 4);
    if (ffn) {
        float *g = malloc((size_t)N * FF * 4), *u = malloc((size_t)N * FF * 4);
        C->matmul(g, in, &Wg, NULL, N);
        C->matmul(u, in, &Wu, NULL, N);
        C->swiglu(g, g, u, (size_t)N * FF);
        C->matmul(y, g, &Wd, NULL, N);
        free(g), free(u);
    } else {
        C->matmul(y, in, &Wo, NULL, N);
    }
    memcpy(xr, x, (size_t)N * D * 4);
    C->add(xr, y, (size_t)N * D);
    C->rmsnorm(nr, xr, w, N, D, 1e-5f);
    C->matmul(ref, nr, &Wn, NULL, N);
    /* GPU */
    float *dx = dev_from(x, (size_t)N * D * 4), *dw = dev_from(w, (size_t)D * 4), *dz = dev_poisoned((size_t)N * R);
    float *din = dev_from(in, (size_t)N * K * 4), *dout = dev_poisoned((size_t)N * (ffn ? K : D));
    float *h1 = dev_poisoned((size_t)N * FF), *h2 = dev_poisoned((size_t)N * FF);
    kvm_wmat_t GWo = {.data = dev_from(ho, (size_t)D * K * es), .dtype = dt, .rows = D, .cols = K};
    kvm_wmat_t GWg = {.data = dev_from(hg, (size_t)FF * K * es), .dtype = dt, .rows = FF, .cols = K};
    kvm_wmat_t GWu = {.data = dev_from(hu, (size_t)FF * K * es), .dtype = dt, .rows = FF, .cols = K};
    kvm_wmat_t GWd = {.data = dev_from(hd, (size_t)D * FF * es), .dtype = dt, .rows = D, .cols = FF};
    kvm_wmat_t GWn = {.data = dev_from(hn, (size_t)R * D * es), .dtype = dt, .rows = R, .cols = D};
    G->matmul(dz, dx, &GWn, NULL, N); /* the backend learns the model's 16-bit dtype */
    assert_int_equal(G->sync(), 0);
    if (ffn) {
        assert_int_equal(G->h2d(dout, in, (size_t)N * K * 4), 0); /* in place, as the forward calls it */
        G->ffn_add_rmsnorm_16(dx, dout, &GWg, &GWu, &GWd, h1, h2, dout, dw, N, D, 1e-5f);
    } else {
        G->matmul_add_rmsnorm_16(dx, din, &GWo, dout, dw, N, D, 1e-5f);
    }
    G->matmul(dz, dout, &GWn, NULL, N);
    float *gx = host_from(dx, (size_t)N * D), *gz = host_from(dz, (size_t)N * R);
    char what[96];
    snprintf(what, sizeof what, "%s %s, %d rows: residual", ffn ? "ffn_add_rmsnorm_16" : "matmul_add_rmsnorm_16",
             kvm_dtype_name(dt), N);
    expect_close(what, gx, xr, (size_t)N * D, tol);
    snprintf(what, sizeof what, "%s %s, %d rows: norm -> GEMM", ffn ? "ffn_add_rmsnorm_16" : "matmul_add_rmsnorm_16",
             kvm_dtype_name(dt), N);
    expect_close(what, gz, ref, (size_t)N * R, tol == 1e-5 ? 1e-5 : 1e-2);
    G->free(dx), G->free(dw), G->free(dz), G->free(din), G->free(dout), G->free(h1), G->free(h2);
    G->free((void *)GWo.data), G->free((void *)GWg.data), G->free((void *)GWu.data), G->free((void *)GWd.data);
    G->free((void *)GWn.data);
    free(x), free(in), free(w), free(wo), free(wg), free(wu), free(wd), free(wn), free(ho), free(hg), free(hu), free(hd),
        free(hn), free(y), free(xr), free(nr), free(ref), free(gx), free(gz);
}

static void test_projections_into_the_residual_norm_match_cpu(void **st) {
    (void)st;
    NEED_GPU();
    check_proj_add_norm(false, KVM_BF16, 40, 1e-2); /* bf16 GEMM output read by the norm */
    check_proj_add_norm(true, KVM_BF16, 40, 1e-2);
    check_proj_add_norm(false, KVM_F16, 24, 1e-2);  /* fallback: matmul + add_rmsnorm_16 */
    check_proj_add_norm(true, KVM_F16, 24, 1e-2);
    check_proj_add_norm(false, KVM_F32, 20, 1e-5);  /* fp32 weights: the exact separate ops */
    check_proj_add_norm(true, KVM_F32, 20, 1e-5);
}

static void test_rope_matches_cpu_in_both_layouts_at_large_positions(void **st) {
    (void)st;
    NEED_GPU();
    check_rope(KVM_ROPE_HALF, 128);
    check_rope(KVM_ROPE_INTERLEAVED, 8);
    check_rope(KVM_ROPE_INTERLEAVED, 64);
}

/* ---- KV cache and attention ----------------------------------------------------------------------- */

typedef struct attn_case {
    int n_seqs;
    int rows[4];  /* new rows of each sequence */
    int ctx[4];   /* tokens in the cache after this step */
} attn_case_t;

/* Builds a pool with shuffled block tables, fills the history with random keys/values through the CPU
 * kv_write, then runs this step's kv_write + attention on both backends. */
static void check_attention(kvm_dtype_t dt, int heads, int kvh, int hd, const attn_case_t *ac, double tol,
                            const char *label) {
    const int L = 2, layer = 1;
    kvm_kv_geom_t g = {.n_layers = L, .n_kv_heads = kvh, .head_dim = hd, .dtype = dt};
    int max_blocks = 0, total_blocks = 0, total_rows = 0;
    for (int s = 0; s < ac->n_seqs; s++) {
        int nb = (ac->ctx[s] + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK;
        if (nb > max_blocks) max_blocks = nb;
        total_blocks += nb;
        total_rows += ac->rows[s];
    }
    max_blocks += 3; /* unused, -1 entries past the end (as the forward pads them) */
    int n_pool = total_blocks + 5;
    size_t block_elems = (size_t)L * 2 * kvh * KVM_KV_BLOCK * hd;
    size_t pool_bytes = (size_t)n_pool * block_elems * kvm_dtype_size(dt);
    void *pool = calloc(1, pool_bytes);
    /* a shuffled permutation of block ids */
    int32_t *perm = malloc((size_t)n_pool * 4);
    for (int i = 0; i < n_pool; i++) perm[i] = i;
    for (int i = n_pool - 1; i > 0; i--) {
        int j = (int)(kvm_splitmix64(rng_state++) % (uint64_t)(i + 1));
        int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    int32_t *bt = malloc((size_t)ac->n_seqs * max_blocks * 4);
    int used = 0;
    for (int s = 0; s < ac->n_seqs; s++) {
        int nb = (ac->ctx[s] + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK;
        for (int k = 0; k < max_blocks; k++) bt[(size_t)s * max_blocks + k] = k < nb ? perm[used + k] : -1;
        used += nb;
    }
    /* history: every layer, positions before this step */
    for (int s = 0; s < ac->n_seqs; s++) {
        int hist = ac->ctx[s] - ac->rows[s];
        if (hist <= 0) continue;
        int32_t rs[2] = {0, hist}, cl[1] = {hist};
        kvm_attn_batch_t hb = {.n_seqs = 1, .max_blocks = max_blocks, .total_rows = hist, .h_row_start = rs,
                               .h_ctx_len = cl, .h_block_table = bt + (size_t)s * max_blocks};
        float *k = rand_vec((size_t)hist * kvh * hd, 1.0f), *v = rand_vec((size_t)hist * kvh * hd, 1.0f);
        for (int l = 0; l < L; l++) C->kv_write(pool, &g, l, k, v, &hb);
        free(k), free(v);
    }
    /* this step */
    int32_t rs[5], cl[4];
    rs[0] = 0;
    for (int s = 0; s < ac->n_seqs; s++) {
        rs[s + 1] = rs[s] + ac->rows[s];
        cl[s] = ac->ctx[s];
    }
    float *k = rand_vec((size_t)total_rows * kvh * hd, 1.0f), *v = rand_vec((size_t)total_rows * kvh * hd, 1.0f);
    float *q = rand_vec((size_t)total_rows * heads * hd, 1.0f);
    void *dpool = dev_from(pool, pool_bytes);
    kvm_attn_batch_t cb = {.n_seqs = ac->n_seqs, .row_start = rs, .ctx_len = cl, .block_table = bt, .max_blocks = max_blocks,
                           .total_rows = total_rows, .h_row_start = rs, .h_ctx_len = cl, .h_block_table = bt};
    C->kv_write(pool, &g, layer, k, v, &cb);
    float *ref = malloc((size_t)total_rows * heads * hd * 4);
    const float scale = 1.0f / sqrtf((float)hd);
    C->attention(ref, q, pool, &g, layer, heads, &cb, scale);

    kvm_attn_batch_t gb = cb;
    gb.row_start = dev_from(rs, sizeof rs);
    gb.ctx_len = dev_from(cl, sizeof cl);
    gb.block_table = dev_from(bt, (size_t)ac->n_seqs * max_blocks * 4);
    float *dk = dev_from(k, (size_t)total_rows * kvh * hd * 4), *dv = dev_from(v, (size_t)total_rows * kvh * hd * 4);
    float *dq = dev_from(q, (size_t)total_rows * heads * hd * 4);
    float *dout = dev_poisoned((size_t)total_rows * heads * hd);
    G->kv_write(dpool, &g, layer, dk, dv, &gb);
    /* 2..16 rows of a 16-bit cache: the decode kernels' merge may leave the output's 16-bit copy for the o projection */
    const bool probe = total_rows >= 2 && total_rows <= 16 && dt != KVM_F32 && (heads * hd) % 32 == 0;
    probe_gemm_t pg = {0};
    if (probe) pg = probe_gemm(heads * hd);
    G->attention(dout, dq, dpool, &g, layer, heads, &gb, scale);
    if (probe) {
        expect_rounded_copy(&pg, dout, total_rows, "skinny GEMM after decode attention");
        probe_free(&pg);
    }
    float *out = host_from(dout, (size_t)total_rows * heads * hd);
    /* the cache itself must be identical after the writes */
    void *gpool = malloc(pool_bytes);
    assert_int_equal(G->d2h(gpool, dpool, pool_bytes), 0);
    char what[128];
    snprintf(what, sizeof what, "kv_write %s (%s)", kvm_dtype_name(dt), label);
    printf("  %-44s %s\n", what, memcmp(gpool, pool, pool_bytes) ? "DIFFERS" : "identical");
    assert_memory_equal(gpool, pool, pool_bytes);
    snprintf(what, sizeof what, "attention %s %d/%d x %d (%s)", kvm_dtype_name(dt), heads, kvh, hd, label);
    expect_close(what, out, ref, (size_t)total_rows * heads * hd, tol);
    /* kvm_ops_t.attn_mass on the same step: the probabilities of the rows from the middle position on, per key */
    int n_mass = 0;
    for (int s = 0; s < ac->n_seqs; s++) n_mass = ac->ctx[s] > n_mass ? ac->ctx[s] : n_mass;
    float *mref = calloc((size_t)n_mass, sizeof(float)), *dmass = dev_poisoned((size_t)n_mass);
    assert_int_equal(G->memset0(dmass, (size_t)n_mass * 4), 0);
    C->attn_mass(mref, n_mass, n_mass / 2, q, pool, &g, layer, heads, &cb, scale);
    G->attn_mass(dmass, n_mass, n_mass / 2, dq, dpool, &g, layer, heads, &gb, scale);
    float *mass = host_from(dmass, (size_t)n_mass);
    snprintf(what, sizeof what, "attention mass %s %d/%d x %d (%s)", kvm_dtype_name(dt), heads, kvh, hd, label);
    expect_close(what, mass, mref, (size_t)n_mass, 1e-4);
    G->free(dmass), free(mref), free(mass);
    G->free(dpool), G->free((void *)gb.row_start), G->free((void *)gb.ctx_len), G->free((void *)gb.block_table);
    G->free(dk), G->free(dv), G->free(dq), G->free(dout);
    free(pool), free(perm), free(bt), free(k), free(v), free(q), free(ref), free(out), free(gpool);
}

static const attn_case_t MIXED = {3, {40, 1, 5}, {40, 300, 77}};      /* prefill, decode, chunked prefill */
static const attn_case_t DECODE = {4, {1, 1, 1, 1}, {1, 17, 1024, 333}};
static const attn_case_t DECODE_LONG = {3, {1, 1, 1}, {4000, 65, 2049}}; /* several tiles per split */
static const attn_case_t PREFILL = {2, {130, 64}, {130, 200}};        /* 200: 136 cached + 64 new */
static const attn_case_t FEW_ROWS = {3, {5, 1, 15}, {77, 300, 1200}};  /* under 16 rows: the decode kernels */

static void test_attention_fp32_matches_cpu_on_mixed_batches(void **st) {
    (void)st;
    NEED_GPU();
    check_attention(KVM_F32, 8, 2, 64, &MIXED, 1e-5, "mixed");
    check_attention(KVM_F32, 8, 4, 8, &MIXED, 1e-5, "mixed, stories260K heads");
    check_attention(KVM_F32, 32, 8, 128, &DECODE, 1e-5, "decode");
    check_attention(KVM_F32, 4, 2, 128, &PREFILL, 1e-5, "prefill");
}

/* One attention setting of a case list: cache dtype, heads over KV heads, head_dim, the batch, its name. */
typedef struct attn_setting {
    kvm_dtype_t dt;
    int heads, kvh, hd;
    const attn_case_t *ac;
    const char *what;
} attn_setting_t;

/* check_attention of each of the n settings at tolerance tol, labelled "what, how". */
static void check_settings(const attn_setting_t *cs, size_t n, double tol, const char *how) {
    for (size_t i = 0; i < n; i++) {
        char label[112];
        snprintf(label, sizeof label, "%s, %s", cs[i].what, how);
        check_attention(cs[i].dt, cs[i].heads, cs[i].kvh, cs[i].hd, cs[i].ac, tol, label);
    }
}

/* The tensor-core decode kernel on decode batches (4 single rows: the merge leaves the 16-bit copy for the o
 * projection), long contexts, 16 and 20 heads per KV head, and a few rows per sequence; `how` names the setting. */
static void check_dec_cases(const char *how) {
    static const attn_setting_t cs[] = {{KVM_BF16, 32, 8, 128, &DECODE, "decode"},
                                        {KVM_F16, 14, 2, 64, &DECODE, "decode"},
                                        {KVM_BF16, 32, 8, 128, &DECODE_LONG, "long decode"},
                                        {KVM_BF16, 16, 1, 128, &DECODE_LONG, "long decode, 16 heads per KV head"},
                                        {KVM_BF16, 20, 1, 64, &DECODE_LONG, "long decode, 20 heads: two chunks"},
                                        {KVM_BF16, 8, 2, 128, &FEW_ROWS, "a few rows per sequence"},
                                        {KVM_F16, 8, 2, 64, &FEW_ROWS, "a few rows per sequence"}};
    check_settings(cs, sizeof cs / sizeof cs[0], 1e-5, how);
}

static void test_attention_16bit_decode_kernels_match_cpu_on_decode_batches(void **st) {
    (void)st;
    NEED_GPU();
    /* the tensor-core kernel: Q and P as hi + lo 16-bit pairs keep the CUDA-core kernels' tolerance */
    const kvm_cuda_opts_t before = kvm_cuda_get_opts();
    cuda_switch("attn_dec_mma", "1");
    check_dec_cases("tensor cores");
    cuda_switch("attn_dec_mma", "0"); /* the generic split-K kernel */
    check_attention(KVM_BF16, 32, 8, 128, &DECODE, 1e-5, "decode, split-K");
    check_attention(KVM_F16, 14, 2, 64, &DECODE_LONG, 1e-5, "long decode, split-K");
    check_attention(KVM_BF16, 8, 2, 128, &FEW_ROWS, 1e-5, "a few rows per sequence, split-K");
    check_attention(KVM_BF16, 12, 1, 96, &DECODE, 1e-5, "decode, head_dim 96 (split-K at any setting)");
    assert_int_equal(kvm_cuda_set_opts(&before), 0);
}

static const attn_case_t PREFILL_LONG = {2, {1000, 300}, {1000, 1100}}; /* tiles wholly below the diagonal */

/* The prefill kernels' cases: short and long prompts, cached prefixes, tiles below every row's diagonal (no mask),
 * bf16 and f16, head_dim 64 and 128; `how` names the kernel and setting. */
static void check_prefill_cases(const char *how) {
    static const attn_setting_t cs[] = {{KVM_BF16, 4, 2, 128, &PREFILL, "prefill"},
                                        {KVM_BF16, 8, 2, 64, &PREFILL, "prefill"},
                                        {KVM_BF16, 8, 2, 64, &MIXED, "mixed"},
                                        {KVM_F16, 16, 8, 128, &MIXED, "mixed"},
                                        {KVM_BF16, 8, 2, 128, &PREFILL_LONG, "long prefill"},
                                        {KVM_F16, 4, 4, 64, &PREFILL_LONG, "long prefill"}};
    check_settings(cs, sizeof cs / sizeof cs[0], 1e-2, how);
}

static void test_attention_bf16_tensor_core_prefill_matches_cpu(void **st) {
    (void)st;
    NEED_GPU();
    check_prefill_cases("mma");
    /* the tiles copied from four block bases per tile (opts.mma_load): the same bytes in the same places */
    const kvm_cuda_opts_t before = kvm_cuda_get_opts();
    cuda_switch("mma_load", "1");
    check_prefill_cases("mma, mma_load");
    assert_int_equal(kvm_cuda_set_opts(&before), 0);
}

/* The warpgroup-MMA prefill kernel (opts.attn_wg; sm_90a build on a compute-capability-9.0 GPU) on the cases of the
 * mma.sync kernel: attn_wg 1, 5 and 6 (no-swizzle tiles; checked on the H100), or the one setting g_wg_setting names
 * (`test_cuda_ops '*wgmma*' N`), which only reports its failures: 7 and 8, the 128-byte swizzle with V's descriptor
 * offsets read one way or the other, until a GPU run has told which is right (a wrong reading may read past the
 * CTA's shared memory and end the CUDA context, so they run one per process). */
static int g_wg_setting = 0;
static void test_attention_wgmma_prefill_matches_cpu(void **st) {
    (void)st;
    NEED_GPU();
    TC_NEED_WGMMA();
    const kvm_cuda_opts_t before = kvm_cuda_get_opts();
    const int runs[3] = {g_wg_setting ? g_wg_setting : 1, g_wg_setting ? 0 : 5, g_wg_setting ? 0 : 6};
    for (int i = 0; i < 3 && runs[i]; i++) {
        char val[16];
        snprintf(val, sizeof val, "%d", runs[i]);
        cuda_switch("attn_wg", val);
        printf("  -- attn_wg %d\n", runs[i]);
        g_soft = g_wg_setting != 0, g_soft_fails = 0;
        check_prefill_cases("wgmma");
        if (g_soft) printf("  attn_wg %d (probe): %d of 6 cases over tolerance\n", runs[i], g_soft_fails);
        g_soft = false;
    }
    assert_int_equal(kvm_cuda_set_opts(&before), 0);
}

static void check_rope_shift(kvm_dtype_t dt, kvm_rope_layout_t layout, double tol) {
    const int L = 3, H = 2, hd = 64, NB = 4, half = hd / 2;
    kvm_kv_geom_t g = {.n_layers = L, .n_kv_heads = H, .head_dim = hd, .dtype = dt};
    size_t elems = (size_t)NB * L * 2 * H * KVM_KV_BLOCK * hd;
    float *pf = rand_vec(elems, 1.0f);
    void *pool = to_dtype(pf, elems, dt);
    float *inv = malloc(half * 4);
    for (int j = 0; j < half; j++) inv[j] = (float)pow(10000.0, -2.0 * j / hd);
    int32_t blk[6] = {0, 3, 2, 2, 1, 0}, slot[6] = {0, 15, 7, 8, 3, 9}, delta[6] = {5, -300, 0, 1024, -1, 70000};
    void *dpool = dev_from(pool, elems * kvm_dtype_size(dt));
    float *dinv = dev_from(inv, half * 4);
    int32_t *dblk = dev_from(blk, sizeof blk), *dslot = dev_from(slot, sizeof slot), *ddel = dev_from(delta, sizeof delta);
    C->rope_shift(pool, &g, blk, slot, delta, 6, inv, layout);
    G->rope_shift(dpool, &g, dblk, dslot, ddel, 6, dinv, layout);
    void *gp = malloc(elems * kvm_dtype_size(dt));
    assert_int_equal(G->sync(), 0);
    assert_int_equal(G->d2h(gp, dpool, elems * kvm_dtype_size(dt)), 0);
    float *a = malloc(elems * 4), *b = malloc(elems * 4);
    for (size_t i = 0; i < elems; i++) {
        if (dt == KVM_F32) {
            a[i] = ((float *)gp)[i];
            b[i] = ((float *)pool)[i];
        } else if (dt == KVM_BF16) {
            a[i] = kvm_bf16_to_f32(((uint16_t *)gp)[i]);
            b[i] = kvm_bf16_to_f32(((uint16_t *)pool)[i]);
        } else {
            a[i] = kvm_f16_to_f32(((uint16_t *)gp)[i]);
            b[i] = kvm_f16_to_f32(((uint16_t *)pool)[i]);
        }
    }
    char what[64];
    snprintf(what, sizeof what, "rope_shift %s %s", kvm_dtype_name(dt), layout == KVM_ROPE_HALF ? "half" : "interleaved");
    expect_close(what, a, b, elems, tol);
    G->free(dpool), G->free(dinv), G->free(dblk), G->free(dslot), G->free(ddel);
    free(pf), free(pool), free(inv), free(gp), free(a), free(b);
}

static void test_rope_shift_matches_cpu_for_all_layers(void **st) {
    (void)st;
    NEED_GPU();
    check_rope_shift(KVM_F32, KVM_ROPE_HALF, 1e-6);
    check_rope_shift(KVM_F32, KVM_ROPE_INTERLEAVED, 1e-6);
    check_rope_shift(KVM_BF16, KVM_ROPE_HALF, 1e-2);
}

/* ---- argmax, generator, graphs ------------------------------------------------------------------------ */

static void test_argmax_finds_the_first_maximum(void **st) {
    (void)st;
    NEED_GPU();
    const int V = 151936, R = 3;
    float *x = rand_vec((size_t)V * R, 10.0f);
    x[77777] = 50.0f; /* row 0: unique max */
    x[V + 5] = 60.0f; /* row 1: tie, first wins */
    x[V + 150000] = 60.0f;
    x[2 * V + V - 1] = 70.0f; /* row 2: the last element */
    float *dx = dev_from(x, (size_t)V * R * 4);
    assert_int_equal(G->argmax(dx, V), C->argmax(x, V));
    assert_int_equal(G->argmax(dx, V), 77777);
    int32_t *dout = G->alloc(R * 4), out[3];
    G->argmax_rows(dout, dx, R, V);
    assert_int_equal(G->sync(), 0);
    assert_int_equal(G->d2h(out, dout, sizeof out), 0);
    assert_int_equal(out[0], 77777);
    assert_int_equal(out[1], 5);
    assert_int_equal(out[2], V - 1);
    G->free(dx), G->free(dout);
    free(x);
}

static void test_device_generator_matches_the_host_generator_bit_for_bit(void **st) {
    (void)st;
    NEED_GPU();
    const size_t n = 1000003;
    kvm_dtype_t dts[3] = {KVM_F32, KVM_BF16, KVM_F16};
    for (int k = 0; k < 3; k++) {
        size_t bytes = n * kvm_dtype_size(dts[k]);
        void *h = malloc(bytes), *g = malloc(bytes), *d = G->alloc(bytes);
        kvm_synthetic_fill_host(h, dts[k], n, 1234, 77, 0.02f, 0.0f);
        assert_int_equal(G->fill_synthetic(d, dts[k], n, kvm_synthetic_stream(1234, 77), 0.02f, 0.0f), 0);
        assert_int_equal(G->sync(), 0);
        assert_int_equal(G->d2h(g, d, bytes), 0);
        printf("  synthetic %s: %s\n", kvm_dtype_name(dts[k]), memcmp(h, g, bytes) ? "DIFFERS" : "identical");
        assert_memory_equal(h, g, bytes);
        G->free(d);
        free(h), free(g);
    }
}

static void test_captured_graph_replays_the_same_result(void **st) {
    (void)st;
    NEED_GPU();
    const int N = 3, D = 1024;
    float *x = rand_vec((size_t)N * D, 1.0f), *w = rand_vec(D, 1.0f);
    float *dx = dev_from(x, (size_t)N * D * 4), *dw = dev_from(w, D * 4), *dy = dev_poisoned((size_t)N * D);
    G->rmsnorm(dy, dx, dw, N, D, 1e-5f);
    G->add(dy, dx, (size_t)N * D);
    float *eager = host_from(dy, (size_t)N * D);
    void *graph = NULL;
    assert_int_equal(G->graph_begin(), 0);
    G->rmsnorm(dy, dx, dw, N, D, 1e-5f);
    G->add(dy, dx, (size_t)N * D);
    assert_int_equal(G->graph_end(&graph), 0);
    assert_non_null(graph);
    float *nan = rand_vec((size_t)N * D, 0.0f);
    for (int i = 0; i < N * D; i++) nan[i] = NAN;
    assert_int_equal(G->h2d(dy, nan, (size_t)N * D * 4), 0);
    assert_int_equal(G->graph_launch(graph), 0);
    float *replay = host_from(dy, (size_t)N * D);
    assert_memory_equal(eager, replay, (size_t)N * D * 4);
    G->graph_free(graph);
    G->free(dx), G->free(dw), G->free(dy);
    free(x), free(w), free(eager), free(nan), free(replay);
}

static void test_backend_without_gpu_says_why(void **st) {
    (void)st;
    if (G) {
        char d[256];
        assert_int_equal(kvm_cuda_describe(d, sizeof d), 0);
        printf("  GPU: %s\n", d);
        return;
    }
    /* no GPU: the reason must be a readable sentence and auto selection must fall back to the CPU */
    assert_true(strlen(skip_reason) > 10);
    const kvm_ops_t *a = kvm_ops_select("auto");
    assert_non_null(a);
    assert_string_equal(a->name, "cpu");
    assert_null(kvm_ops_select("cuda"));
}

/* test_cuda_ops [FILTER [ATTN_WG]]: FILTER selects tests by name (cmocka's pattern, e.g. '*wgmma*'); ATTN_WG the one
 * attn_wg setting the wgmma test probes (see test_attention_wgmma_prefill_matches_cpu). */
int main(int argc, char **argv) {
    if (argc > 1) cmocka_set_test_filter(argv[1]);
    if (argc > 2) {
        g_wg_setting = atoi(argv[2]);
        kvm_cuda_opts_t o = kvm_cuda_opts_default();
        if (g_wg_setting <= 0 || kvm_cuda_opts_parse(&o, "attn_wg", argv[2])) {
            fprintf(stderr, "test_cuda_ops: ATTN_WG must be a non-zero attn_wg setting, not '%s'\n", argv[2]);
            return 2;
        }
    }
    C = kvm_ops_cpu();
    G = kvm_ops_cuda();
    if (!G) snprintf(skip_reason, sizeof skip_reason, "%s", kvm_errmsg());
    if (!G) printf("test_cuda_ops: every GPU test is SKIPPED: %s\n", skip_reason);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_backend_without_gpu_says_why),
        cmocka_unit_test(test_embed_gathers_rows_of_every_dtype),
        cmocka_unit_test(test_rmsnorm_matches_cpu),
        cmocka_unit_test(test_fused_add_rmsnorm_matches_add_then_rmsnorm),
        cmocka_unit_test(test_head_rmsnorm_matches_cpu),
        cmocka_unit_test(test_swiglu_and_add_match_cpu),
        cmocka_unit_test(test_matmul_fp32_matches_cpu),
        cmocka_unit_test(test_matmul_bf16_gemv_and_gemm_match_cpu),
        cmocka_unit_test(test_matmul_reuses_rounded_activations_only_while_unchanged),
        cmocka_unit_test(test_matmul_f16_matches_cpu),
        cmocka_unit_test(test_fused_matmul_of_three_matrices_matches_three_cpu_matmuls),
        cmocka_unit_test(test_rope_of_q_and_k_in_one_pass_matches_two_cpu_ropes),
        cmocka_unit_test(test_fused_rope_and_kv_write_match_cpu),
        cmocka_unit_test(test_swiglu_then_down_projection_matches_cpu),
        cmocka_unit_test(test_skinny_gemm_with_more_rows_per_cta_matches_cpu),
        cmocka_unit_test(test_gemv_on_odd_shapes_matches_cpu),
        cmocka_unit_test(test_fused_ffn_matches_the_cpu_mlp_on_every_path),
        cmocka_unit_test(test_add_rmsnorm_16_feeds_the_next_gemm_and_refuses_a_gemv),
        cmocka_unit_test(test_fused_qkv_rope_kv_write_matches_the_separate_ops),
        cmocka_unit_test(test_fused_qkv_rope_kv_write_on_a_prefill_step_matches_cpu),
        cmocka_unit_test(test_projections_into_the_residual_norm_match_cpu),
        cmocka_unit_test(test_rope_matches_cpu_in_both_layouts_at_large_positions),
        cmocka_unit_test(test_attention_fp32_matches_cpu_on_mixed_batches),
        cmocka_unit_test(test_attention_16bit_decode_kernels_match_cpu_on_decode_batches),
        cmocka_unit_test(test_attention_bf16_tensor_core_prefill_matches_cpu),
        cmocka_unit_test(test_attention_wgmma_prefill_matches_cpu),
        cmocka_unit_test(test_rope_shift_matches_cpu_for_all_layers),
        cmocka_unit_test(test_argmax_finds_the_first_maximum),
        cmocka_unit_test(test_device_generator_matches_the_host_generator_bit_for_bit),
        cmocka_unit_test(test_captured_graph_replays_the_same_result),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
