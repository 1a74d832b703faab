/* test_cpu_kernels.c - the CPU backend's matmul and attention (kvm_ops_cpu()) against scalar fp64 oracles
 * written here, on fresh random non-zero inputs: ragged shapes (rows, cols, tokens that are multiples of no
 * tile), F32/F16/BF16 weights, bias on and off, KV caches in F32/BF16/F16 with scattered block tables and
 * partial blocks, GQA groups 1/2/3, several sequences of different lengths, row positions (h_q_pos) set and
 * not; every instruction-set path the CPU has (kvm_cpu_force_isa: portable C, AVX2, AVX-512) with 1 and 2
 * threads.
 *
 * Tolerances (fp32 accumulation in another order than the oracle's fp64):
 *   matmul:    |got - ref| <= 1e-5 * (sum_k |x_k w_k| + |bias|) + 1e-7   (relative to the sum of magnitudes)
 *   attention: |got - ref| <= 2e-5 * max_p |v_p| + 1e-6                  (the output is a convex mix of v)
 * Outputs are poisoned (NaN) before each call, so an output left unwritten fails. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/ops.h"
#include "kernels/rope.h"
#include "runtime/core/core.h"
#include "test_common.h"

static uint64_t g_rng = 0x9e3779b97f4a7c15ULL;

static float rnd(void) { /* uniform in [-1, -0.05] U [0.05, 1]: non-zero */
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    float u = (float)((g_rng >> 40) & 0xFFFFFF) / 16777216.0f;
    float m = 0.05f + 0.95f * u;
    return (g_rng & 1) ? m : -m;
}

static int rnd_int(int n) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (int)((g_rng >> 33) % (uint64_t)n);
}

/* value v stored in dtype dt at element e of buf; returns what it reads back as */
static float put(void *buf, kvm_dtype_t dt, size_t e, float v) {
    if (dt == KVM_F32) return ((float *)buf)[e] = v;
    uint16_t h = dt == KVM_BF16 ? kvm_f32_to_bf16(v) : kvm_f32_to_f16(v);
    ((uint16_t *)buf)[e] = h;
    return dt == KVM_BF16 ? kvm_bf16_to_f32(h) : kvm_f16_to_f32(h);
}

static void poison(float *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = NAN;
}

static const char *isa_name(int isa) { return isa == 2 ? "avx512" : isa == 1 ? "avx2" : "portable"; }

/* runs check() (returns the number of failures) on every instruction-set path the CPU has, with 1 and 2
 * threads, and asserts none failed */
static void on_every_path(int (*check)(void), const char *what) {
    for (int isa = 0; isa <= 2; isa++) {
        if (kvm_cpu_force_isa(isa) != isa) continue;
        int bad = 0;
        for (int th = 1; th <= 2; th++) {
            kvm_set_threads(th);
            bad += check();
        }
        kvm_set_threads(0);
        if (bad) fprintf(stderr, "%s path: %d %s\n", isa_name(isa), bad, what);
        assert_int_equal(bad, 0);
    }
    kvm_cpu_force_isa(-1);
}

/* ---- matmul ------------------------------------------------------------------------------------------ */

/* one matmul of the op table against the oracle; returns the number of outputs out of tolerance */
static int check_matmul(int rows, int cols, int n, kvm_dtype_t dt, int with_bias) {
    const kvm_ops_t *ops = kvm_ops_cpu();
    void *w = malloc((size_t)rows * cols * kvm_dtype_size(dt) + 1);
    double *wd = malloc((size_t)rows * cols * sizeof(double) + 1);
    float *x = malloc((size_t)n * cols * sizeof(float) + 1), *y = malloc((size_t)n * rows * sizeof(float));
    float *bias = with_bias ? malloc((size_t)rows * sizeof(float)) : NULL;
    for (size_t e = 0; e < (size_t)rows * cols; e++) wd[e] = put(w, dt, e, rnd());
    for (size_t e = 0; e < (size_t)n * cols; e++) x[e] = rnd();
    for (int r = 0; r < rows && bias; r++) bias[r] = rnd();
    poison(y, (size_t)n * rows);
    kvm_wmat_t W = {.data = w, .dtype = dt, .rows = rows, .cols = cols};
    ops->matmul(y, x, &W, bias, n);
    int bad = 0;
    for (int t = 0; t < n; t++)
        for (int r = 0; r < rows; r++) {
            double ref = bias ? bias[r] : 0, mag = bias ? fabs(bias[r]) : 0;
            for (int k = 0; k < cols; k++) {
                double p = (double)x[(size_t)t * cols + k] * wd[(size_t)r * cols + k];
                ref += p;
                mag += fabs(p);
            }
            double got = y[(size_t)t * rows + r];
            if (!(fabs(got - ref) <= 1e-5 * mag + 1e-7)) {
                if (bad++ < 3)
                    fprintf(stderr, "matmul %dx%d n=%d %s bias=%d: y[%d][%d] = %.8g, oracle %.8g\n", rows, cols, n,
                            kvm_dtype_name(dt), with_bias, t, r, got, ref);
            }
        }
    free(w);
    free(wd);
    free(x);
    free(y);
    free(bias);
    return bad;
}

static const int g_shapes[][3] = { /* rows, cols, n */
    {1, 1, 1},     {3, 17, 1},    {17, 63, 2},   {63, 65, 3},    {65, 129, 4},  {129, 200, 5},  {200, 17, 8},
    {33, 300, 9},  {17, 520, 13}, {64, 192, 17}, {192, 192, 63}, {65, 3, 65},   {200, 129, 129}, {31, 16, 12},
    {32, 32, 24},  {96, 257, 25}, {1, 300, 33},  {48, 64, 200},  {5, 1, 7},     {640, 33, 3},
};

static void run_matmul_sweep(int isa) {
    int bad = 0, cases = 0;
    for (int th = 1; th <= 2; th++) {
        kvm_set_threads(th);
        for (size_t s = 0; s < sizeof g_shapes / sizeof g_shapes[0]; s++)
            for (int dt = 0; dt < 3; dt++) {
                bad += check_matmul(g_shapes[s][0], g_shapes[s][1], g_shapes[s][2], (kvm_dtype_t)dt, (int)(s + dt) & 1);
                cases++;
            }
    }
    kvm_set_threads(0);
    if (bad) fprintf(stderr, "%s path: %d outputs out of tolerance over %d matmuls\n", isa_name(isa), bad, cases);
    assert_int_equal(bad, 0);
}

static void test_matmul_matches_the_oracle_on_every_path(void **st) {
    (void)st;
    int best = kvm_cpu_force_isa(-1);
    for (int isa = 0; isa <= 2; isa++) {
        if (kvm_cpu_force_isa(isa) != isa) {
            fprintf(stderr, "note: this CPU has no %s path (best is %s): not tested here\n", isa_name(isa), isa_name(best));
            continue;
        }
        run_matmul_sweep(isa);
    }
    kvm_cpu_force_isa(-1);
}

/* a token's outputs are the same bits whether it is computed alone, in a small batch or in a large one, at any
 * offset (the engine's positioned recompute and prefix reuse compare KV rows bit for bit) */
static int check_matmul_batch_invariance(int rows, int cols, kvm_dtype_t dt, int n) {
    const kvm_ops_t *ops = kvm_ops_cpu();
    void *w = malloc((size_t)rows * cols * kvm_dtype_size(dt));
    float *x = malloc((size_t)n * cols * sizeof(float)), *bias = malloc((size_t)rows * sizeof(float));
    float *all = malloc((size_t)n * rows * sizeof(float)), *part = malloc((size_t)n * rows * sizeof(float));
    for (size_t e = 0; e < (size_t)rows * cols; e++) put(w, dt, e, rnd());
    for (size_t e = 0; e < (size_t)n * cols; e++) x[e] = rnd();
    for (int r = 0; r < rows; r++) bias[r] = rnd();
    kvm_wmat_t W = {.data = w, .dtype = dt, .rows = rows, .cols = cols};
    ops->matmul(all, x, &W, bias, n);
    int bad = 0;
    const int cuts[] = {1, 2, 3, 5, 16, 17};
    for (size_t c = 0; c < sizeof cuts / sizeof cuts[0]; c++)
        for (int t0 = 0; t0 < n; t0 += cuts[c]) { /* the batch cut into pieces of cuts[c] tokens */
            int m = n - t0 < cuts[c] ? n - t0 : cuts[c];
            ops->matmul(part, x + (size_t)t0 * cols, &W, bias, m);
            if (memcmp(part, all + (size_t)t0 * rows, (size_t)m * rows * sizeof(float)) && bad++ < 3)
                fprintf(stderr, "matmul %dx%d %s: tokens %d..%d computed %d at a time differ from the batch of %d\n", rows,
                        cols, kvm_dtype_name(dt), t0, t0 + m - 1, cuts[c], n);
        }
    free(w);
    free(x);
    free(bias);
    free(all);
    free(part);
    return bad;
}

static int matmul_batch_invariance_cases(void) {
    return check_matmul_batch_invariance(200, 129, KVM_BF16, 67) + check_matmul_batch_invariance(64, 192, KVM_F32, 53) +
           check_matmul_batch_invariance(7, 17, KVM_F16, 40);
}

static void test_matmul_gives_a_token_the_same_bits_in_any_batch(void **st) {
    (void)st;
    on_every_path(matmul_batch_invariance_cases, "batch-dependent matmul results");
}

/* ---- attention ------------------------------------------------------------------------------------------ */

typedef struct att_case {
    int n_kv_heads, group, head_dim;
    kvm_dtype_t dt;
    int n_seqs;
    int ctx[4], rows[4]; /* per sequence: tokens in the cache, query rows */
    int scattered;       /* rows at scattered positions (h_q_pos) instead of the last ones */
} att_case_t;

static int check_attention(const att_case_t *c) {
    const kvm_ops_t *ops = kvm_ops_cpu();
    const int L = 2, layer = 1, H = c->n_kv_heads, D = c->head_dim, heads = H * c->group;
    kvm_kv_geom_t g = {.n_layers = L, .n_kv_heads = H, .head_dim = D, .dtype = c->dt};
    int max_blocks = 0, total_rows = 0, n_blocks = 0;
    for (int s = 0; s < c->n_seqs; s++) {
        int nb = (c->ctx[s] + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK;
        max_blocks = nb > max_blocks ? nb : max_blocks;
        n_blocks += nb;
        total_rows += c->rows[s];
    }
    n_blocks += 3; /* spare blocks, never referenced */
    const size_t blk_elems = (size_t)L * 2 * H * KVM_KV_BLOCK * D, es = kvm_dtype_size(c->dt);
    void *kv = malloc((size_t)n_blocks * blk_elems * es);
    double *kvd = malloc((size_t)n_blocks * blk_elems * sizeof(double));
    /* NaN everywhere first: slots past a sequence's context and unreferenced blocks must never be read */
    for (size_t e = 0; e < (size_t)n_blocks * blk_elems; e++) kvd[e] = put(kv, c->dt, e, NAN);
    int32_t *bt = calloc((size_t)c->n_seqs * max_blocks, sizeof(int32_t));
    int32_t *perm = malloc((size_t)n_blocks * sizeof(int32_t));
    for (int i = 0; i < n_blocks; i++) perm[i] = i;
    for (int i = n_blocks - 1; i > 0; i--) { /* scattered block ids */
        int k = rnd_int(i + 1);
        int32_t t = perm[i];
        perm[i] = perm[k];
        perm[k] = t;
    }
    int32_t row_start[5] = {0}, ctx_len[4], *qpos = malloc((size_t)total_rows * sizeof(int32_t));
    int used = 0;
    for (int s = 0; s < c->n_seqs; s++) {
        row_start[s + 1] = row_start[s] + c->rows[s];
        ctx_len[s] = c->ctx[s];
        for (int b = 0; b < (c->ctx[s] + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK; b++) bt[(size_t)s * max_blocks + b] = perm[used++];
        for (int p = 0; p < c->ctx[s]; p++) {
            int32_t blk = bt[(size_t)s * max_blocks + p / KVM_KV_BLOCK];
            for (int l = 0; l < L; l++)
                for (int kvi = 0; kvi < 2; kvi++)
                    for (int h = 0; h < H; h++)
                        for (int d = 0; d < D; d++) {
                            size_t e = ((((size_t)blk * L + l) * 2 + kvi) * H + h) * KVM_KV_BLOCK * D +
                                       (size_t)(p % KVM_KV_BLOCK) * D + d;
                            kvd[e] = put(kv, c->dt, e, rnd());
                        }
        }
        /* positions: the last rows, or increasing scattered ones ending anywhere below ctx */
        int n = c->rows[s];
        for (int j = 0; j < n; j++) qpos[row_start[s] + j] = c->ctx[s] - n + j;
        if (c->scattered) {
            int p = c->ctx[s];
            for (int j = n - 1; j >= 0; j--) {
                int room = p - j; /* positions j..p-1 are free for row j */
                p = j + rnd_int(room);
                qpos[row_start[s] + j] = p;
            }
        }
    }
    float *q = malloc((size_t)total_rows * heads * D * sizeof(float)), *out = malloc((size_t)total_rows * heads * D * sizeof(float));
    for (size_t e = 0; e < (size_t)total_rows * heads * D; e++) q[e] = rnd();
    poison(out, (size_t)total_rows * heads * D);
    const float scale = 1.0f / sqrtf((float)D);
    kvm_attn_batch_t ab = {.n_seqs = c->n_seqs, .row_start = row_start, .ctx_len = ctx_len, .block_table = bt,
                           .max_blocks = max_blocks, .total_rows = total_rows, .h_row_start = row_start,
                           .h_ctx_len = ctx_len, .h_block_table = bt, .q_pos = c->scattered ? qpos : NULL,
                           .h_q_pos = c->scattered ? qpos : NULL};
    ops->attention(out, q, kv, &g, layer, heads, &ab, scale);

    int bad = 0;
    double *sc = malloc((size_t)(max_blocks * KVM_KV_BLOCK + 1) * sizeof(double));
    for (int s = 0; s < c->n_seqs; s++)
        for (int r = row_start[s]; r < row_start[s + 1]; r++)
            for (int h = 0; h < heads; h++) {
                int kh = h / c->group, pos = qpos[r];
                const float *qv = q + ((size_t)r * heads + h) * D;
                double mx = -INFINITY, sum = 0, vmax = 0;
                for (int p = 0; p <= pos; p++) {
                    int32_t blk = bt[(size_t)s * max_blocks + p / KVM_KV_BLOCK];
                    size_t e = ((((size_t)blk * L + layer) * 2 + 0) * H + kh) * KVM_KV_BLOCK * D + (size_t)(p % KVM_KV_BLOCK) * D;
                    double d0 = 0;
                    for (int d = 0; d < D; d++) d0 += (double)qv[d] * kvd[e + d];
                    sc[p] = d0 * scale;
                    mx = sc[p] > mx ? sc[p] : mx;
                }
                for (int p = 0; p <= pos; p++) sum += (sc[p] = exp(sc[p] - mx));
                for (int d = 0; d < D; d++) {
                    double o = 0;
                    for (int p = 0; p <= pos; p++) {
                        int32_t blk = bt[(size_t)s * max_blocks + p / KVM_KV_BLOCK];
                        size_t e = ((((size_t)blk * L + layer) * 2 + 1) * H + kh) * KVM_KV_BLOCK * D +
                                   (size_t)(p % KVM_KV_BLOCK) * D + d;
                        o += sc[p] / sum * kvd[e];
                        vmax = fabs(kvd[e]) > vmax ? fabs(kvd[e]) : vmax;
                    }
                    double got = out[((size_t)r * heads + h) * D + d];
                    if (!(fabs(got - o) <= 2e-5 * vmax + 1e-6) && bad++ < 3)
                        fprintf(stderr, "attention H=%d group=%d D=%d %s seq %d row %d (pos %d) head %d d %d: %.8g, oracle %.8g\n",
                                H, c->group, D, kvm_dtype_name(c->dt), s, r, pos, h, d, got, o);
                }
            }
    free(sc);
    free(kv);
    free(kvd);
    free(bt);
    free(perm);
    free(qpos);
    free(q);
    free(out);
    return bad;
}

static const att_case_t g_att[] = {
    /* decode: one row per sequence */
    {2, 3, 32, KVM_F32, 4, {256, 1, 17, 33}, {1, 1, 1, 1}, 0},
    {1, 1, 16, KVM_BF16, 3, {5, 16, 100}, {1, 1, 1}, 0},
    {2, 2, 64, KVM_F16, 2, {48, 77}, {1, 1}, 0},
    /* prefill: all rows of one or more sequences, partial last blocks */
    {2, 3, 32, KVM_F32, 1, {200}, {200}, 0},
    {1, 2, 24, KVM_BF16, 2, {37, 15}, {37, 15}, 0},
    {3, 1, 8, KVM_F16, 3, {65, 1, 40}, {65, 1, 40}, 0},
    /* chunked prefill: the last rows of longer contexts, mixed with decodes */
    {2, 3, 32, KVM_BF16, 4, {130, 64, 9, 300}, {33, 1, 9, 17}, 0},
    {1, 3, 80, KVM_F32, 2, {90, 31}, {20, 31}, 0},
    /* scattered rows (h_q_pos) */
    {2, 2, 32, KVM_F32, 2, {150, 40}, {19, 7}, 1},
    {1, 3, 3, KVM_BF16, 3, {70, 20, 5}, {35, 1, 5}, 1},
    {2, 1, 48, KVM_F16, 1, {120}, {40}, 1},
};

static void run_attention_sweep(int isa) {
    int bad = 0;
    for (int th = 1; th <= 2; th++) {
        kvm_set_threads(th);
        for (size_t i = 0; i < sizeof g_att / sizeof g_att[0]; i++) bad += check_attention(&g_att[i]);
    }
    kvm_set_threads(0);
    if (bad) fprintf(stderr, "%s path: %d attention outputs out of tolerance\n", isa_name(isa), bad);
    assert_int_equal(bad, 0);
}

static void test_attention_matches_the_oracle_on_every_path(void **st) {
    (void)st;
    for (int isa = 0; isa <= 2; isa++) {
        if (kvm_cpu_force_isa(isa) != isa) continue;
        run_attention_sweep(isa);
    }
    kvm_cpu_force_isa(-1);
}

/* a row's attention output is the same bits computed among all rows of its sequence (prefill) or alone at its
 * position (decode, a positioned recompute) */
static int check_attention_row_invariance(kvm_dtype_t dt) {
    const kvm_ops_t *ops = kvm_ops_cpu();
    enum { L = 1, H = 2, G = 3, D = 32, CTX = 290, NB = (CTX + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK };
    const int heads = H * G;
    kvm_kv_geom_t g = {.n_layers = L, .n_kv_heads = H, .head_dim = D, .dtype = dt};
    const size_t elems = (size_t)NB * L * 2 * H * KVM_KV_BLOCK * D;
    void *kv = malloc(elems * kvm_dtype_size(dt));
    for (size_t e = 0; e < elems; e++) put(kv, dt, e, rnd());
    int32_t bt[NB], rs_all[2] = {0, CTX}, rs_one[2] = {0, 1}, ctx[1] = {CTX}, pos[1];
    for (int b = 0; b < NB; b++) bt[b] = NB - 1 - b;
    float *q = malloc((size_t)CTX * heads * D * sizeof(float)), *all = malloc((size_t)CTX * heads * D * sizeof(float));
    float one[6 * 32];
    for (size_t e = 0; e < (size_t)CTX * heads * D; e++) q[e] = rnd();
    kvm_attn_batch_t ab = {.n_seqs = 1, .row_start = rs_all, .ctx_len = ctx, .block_table = bt, .max_blocks = NB,
                           .total_rows = CTX, .h_row_start = rs_all, .h_ctx_len = ctx, .h_block_table = bt};
    ops->attention(all, q, kv, &g, 0, heads, &ab, 0.17f);
    int bad = 0;
    const int rows[] = {0, 1, 15, 16, 17, 100, 255, 256, 257, CTX - 1};
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        pos[0] = rows[i];
        kvm_attn_batch_t a1 = {.n_seqs = 1, .row_start = rs_one, .ctx_len = ctx, .block_table = bt, .max_blocks = NB,
                               .total_rows = 1, .h_row_start = rs_one, .h_ctx_len = ctx, .h_block_table = bt,
                               .q_pos = pos, .h_q_pos = pos};
        ops->attention(one, q + (size_t)rows[i] * heads * D, kv, &g, 0, heads, &a1, 0.17f);
        if (memcmp(one, all + (size_t)rows[i] * heads * D, sizeof one) && bad++ < 3)
            fprintf(stderr, "attention %s: row %d alone differs from the same row in the prefill\n", kvm_dtype_name(dt), rows[i]);
    }
    free(kv);
    free(q);
    free(all);
    return bad;
}

static int attention_row_invariance_cases(void) {
    return check_attention_row_invariance(KVM_F32) + check_attention_row_invariance(KVM_BF16);
}

static void test_attention_gives_a_row_the_same_bits_alone_or_in_the_prefill(void **st) {
    (void)st;
    on_every_path(attention_row_invariance_cases, "attention rows differ alone and in the prefill");
}

/* kvm_ops_t.attn_mass on the CPU: over a prefill of 290 rows of a paged cache (blocks out of order; f32 and bf16),
 * mass[p] gains the sum over the rows from from_pos and every head of their probability of key p (fp64 oracle on the
 * same widened keys, 1e-5 relative), on top of what mass held; rows before from_pos add nothing. */
static void test_attention_mass_sums_the_probabilities_of_the_rows_asked(void **st) {
    (void)st;
    const kvm_ops_t *ops = kvm_ops_cpu();
    enum { H = 2, G = 3, D = 32, CTX = 290, FROM = 250, NB = (CTX + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK };
    const int heads = H * G;
    const float scale = 0.3f;
    for (int di = 0; di < 2; di++) {
        const kvm_dtype_t dt = di ? KVM_BF16 : KVM_F32;
        kvm_kv_geom_t g = {.n_layers = 1, .n_kv_heads = H, .head_dim = D, .dtype = dt};
        const size_t elems = (size_t)NB * 2 * H * KVM_KV_BLOCK * D;
        void *kv = malloc(elems * kvm_dtype_size(dt));
        float *kvd = malloc(elems * sizeof(float)), *q = malloc((size_t)CTX * heads * D * sizeof(float));
        for (size_t e = 0; e < elems; e++) kvd[e] = put(kv, dt, e, 2.0f * rnd());
        for (size_t e = 0; e < (size_t)CTX * heads * D; e++) q[e] = 2.0f * rnd();
        int32_t bt[NB], rs[2] = {0, CTX}, ctx[1] = {CTX};
        for (int b = 0; b < NB; b++) bt[b] = NB - 1 - b;
        kvm_attn_batch_t ab = {.n_seqs = 1, .row_start = rs, .ctx_len = ctx, .block_table = bt, .max_blocks = NB,
                               .total_rows = CTX, .h_row_start = rs, .h_ctx_len = ctx, .h_block_table = bt};
        double *ref = calloc(CTX, sizeof(double)), *sc = malloc(CTX * sizeof(double));
        for (int r = FROM; r < CTX; r++)
            for (int h = 0; h < heads; h++) {
                double mx = -INFINITY, sum = 0;
                for (int p = 0; p <= r; p++) {
                    const float *k = kvd + (((size_t)bt[p / KVM_KV_BLOCK] * 2 + 0) * H + h / G) * KVM_KV_BLOCK * D +
                                     (size_t)(p % KVM_KV_BLOCK) * D;
                    double d0 = 0;
                    for (int d = 0; d < D; d++) d0 += (double)q[((size_t)r * heads + h) * D + d] * k[d];
                    sc[p] = d0 * scale;
                    mx = sc[p] > mx ? sc[p] : mx;
                }
                for (int p = 0; p <= r; p++) sum += (sc[p] = exp(sc[p] - mx));
                for (int p = 0; p <= r; p++) ref[p] += sc[p] / sum;
            }
        float mass[CTX];
        for (int p = 0; p < CTX; p++) mass[p] = 1.0f; /* the sums add to what is there */
        ops->attn_mass(mass, CTX, FROM, q, kv, &g, 0, heads, &ab, scale);
        int bad = 0;
        for (int p = 0; p < CTX; p++)
            if (!(fabs(mass[p] - 1.0 - ref[p]) <= 1e-5 * (1.0 + ref[p])) && bad++ < 3)
                fprintf(stderr, "attention mass %s, key %d: %.8g, oracle %.8g\n", kvm_dtype_name(dt), p, mass[p] - 1.0, ref[p]);
        assert_int_equal(bad, 0);
        assert_true(ref[0] > 0 && ref[CTX - 1] > 0);
        for (int p = 0; p < CTX; p++) mass[p] = 0.0f; /* rows before from_pos add nothing */
        ops->attn_mass(mass, CTX, CTX, q, kv, &g, 0, heads, &ab, scale);
        for (int p = 0; p < CTX; p++) assert_true(mass[p] == 0.0f);
        free(kv), free(kvd), free(q), free(ref), free(sc);
    }
}

/* ---- SwiGLU -------------------------------------------------------------------------------------------- */

/* swiglu against silu(g) * u in fp64, ragged lengths (vector tails, several pieces), gates from -100 to 100
 * (exp overflow one way, underflow the other), out in place of gate: |got - ref| <= 1e-6 * |ref| + 1e-30 */
static int check_swiglu(void) {
    const kvm_ops_t *ops = kvm_ops_cpu();
    const size_t lens[] = {1, 7, 16, 17, 4096 + 13, 3 * 4096 + 1};
    int bad = 0;
    for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
        const size_t n = lens[li];
        float *g = malloc(n * sizeof(float)), *u = malloc(n * sizeof(float)), *g0 = malloc(n * sizeof(float));
        for (size_t i = 0; i < n; i++) {
            g0[i] = g[i] = i % 5 == 4 ? 100.0f * rnd() : 8.0f * rnd();
            u[i] = rnd();
        }
        ops->swiglu(g, g, u, n);
        for (size_t i = 0; i < n; i++) {
            double x = g0[i], ref = x / (1.0 + exp(-x)) * u[i];
            if (!(fabs(g[i] - ref) <= 1e-6 * fabs(ref) + 1e-30) && bad++ < 3)
                fprintf(stderr, "swiglu n=%zu i=%zu gate %.8g up %.8g: %.9g, oracle %.9g\n", n, i, g0[i], u[i], g[i], ref);
        }
        free(g), free(u), free(g0);
    }
    return bad;
}

static void test_swiglu_matches_the_oracle_on_every_path(void **st) {
    (void)st;
    on_every_path(check_swiglu, "swiglu outputs out of tolerance");
}

/* ---- RoPE ------------------------------------------------------------------------------------------------- */

/* rope_qk (one table of angles per token for its q and k heads) gives the bits of rotating each head vector on
 * its own (kvm_rope_rotate_vec), for both pair layouts, a head_dim past the table (the per-head path) and
 * scattered positions; rope (q only) too */
static int check_rope_qk_per_head(void) {
    const kvm_ops_t *ops = kvm_ops_cpu();
    const int hds[] = {2, 32, 80, 514};
    int bad = 0;
    for (size_t hi = 0; hi < sizeof hds / sizeof hds[0]; hi++)
        for (int lay = 0; lay < 2; lay++) {
            const int hd = hds[hi], n = 7, hq = 3, hk = 2;
            const kvm_rope_layout_t layout = lay ? KVM_ROPE_HALF : KVM_ROPE_INTERLEAVED;
            float *inv = malloc((size_t)hd / 2 * sizeof(float));
            float *q = malloc((size_t)n * hq * hd * sizeof(float)), *k = malloc((size_t)n * hk * hd * sizeof(float));
            float *qr = malloc((size_t)n * hq * hd * sizeof(float)), *kr = malloc((size_t)n * hk * hd * sizeof(float));
            float *q1 = malloc((size_t)n * hq * hd * sizeof(float));
            int32_t pos[7];
            for (int j = 0; j < hd / 2; j++) inv[j] = powf(10000.0f, -2.0f * j / hd);
            for (int t = 0; t < n; t++) pos[t] = rnd_int(5000);
            for (int e = 0; e < n * hq * hd; e++) q1[e] = qr[e] = q[e] = rnd();
            for (int e = 0; e < n * hk * hd; e++) kr[e] = k[e] = rnd();
            for (int t = 0; t < n; t++) {
                for (int h = 0; h < hq; h++) kvm_rope_rotate_vec(qr + ((size_t)t * hq + h) * hd, hd, pos[t], inv, layout);
                for (int h = 0; h < hk; h++) kvm_rope_rotate_vec(kr + ((size_t)t * hk + h) * hd, hd, pos[t], inv, layout);
            }
            ops->rope_qk(q, k, n, hq, hk, hd, pos, inv, layout);
            ops->rope(q1, n, hq, hd, pos, inv, layout);
            if (memcmp(q, qr, (size_t)n * hq * hd * sizeof(float)) || memcmp(k, kr, (size_t)n * hk * hd * sizeof(float)) ||
                memcmp(q1, qr, (size_t)n * hq * hd * sizeof(float))) {
                fprintf(stderr, "rope_qk hd %d layout %d: differs from rotating each head alone\n", hd, lay);
                bad++;
            }
            free(inv), free(q), free(k), free(qr), free(kr), free(q1);
        }
    return bad;
}

static void test_rope_qk_gives_the_bits_of_rotating_each_head_alone(void **st) {
    (void)st;
    on_every_path(check_rope_qk_per_head, "rope cases differ from the per-head rotation");
}

static void test_forcing_a_path_the_cpu_lacks_clamps_to_the_best(void **st) {
    (void)st;
    int best = kvm_cpu_force_isa(-1);
    assert_true(best >= 0 && best <= 2);
    assert_int_equal(kvm_cpu_force_isa(99), best);
    assert_int_equal(kvm_cpu_force_isa(0), 0);
    assert_int_equal(kvm_cpu_force_isa(-1), best);
}

TC_MAIN(NULL, NULL, cmocka_unit_test(test_matmul_matches_the_oracle_on_every_path),
        cmocka_unit_test(test_matmul_gives_a_token_the_same_bits_in_any_batch),
        cmocka_unit_test(test_attention_matches_the_oracle_on_every_path),
        cmocka_unit_test(test_attention_gives_a_row_the_same_bits_alone_or_in_the_prefill),
        cmocka_unit_test(test_attention_mass_sums_the_probabilities_of_the_rows_asked),
        cmocka_unit_test(test_swiglu_matches_the_oracle_on_every_path),
        cmocka_unit_test(test_rope_qk_gives_the_bits_of_rotating_each_head_alone),
        cmocka_unit_test(test_forcing_a_path_the_cpu_lacks_clamps_to_the_best))
