/* test_kvcomm_ops.c - the optional KVCOMM ops of kernels/ops.h (kvcomm_dist, kvcomm_softmax, kvcomm_apply).
 *
 * 1. The CPU reference ops against a re-derivation written here from kvcomm.md §3.4/§3.6/§3.11 (plain
 *    loops over logical fp64 tensors), on paged and contiguous views, both RoPE layouts, fp32 and bf16.
 * 2. The ops of kvm_ops_select("auto") (CUDA on a GPU machine) against the CPU reference on the same
 *    bytes: fp32 <= 1e-5 relative norm, bf16 outputs <= 1e-2 (distances are fp32 in both: <= 1e-5).
 *    Skipped loudly when "auto" is the CPU.
 *    Extra backend shapes run the distance kernel over several row chunks with anchors of different lengths.
 * 3. Destination block tables: the bench's table covers its last scattered row (the N = 20 KVM_EDEVICE was this
 *    table one entry short), and kvcomm_apply with dst_n_blocks refuses a piece past the table, writing nothing
 *    (CPU always, the backend when there is a GPU).
 * 4. KVM_KVCOMM_OPS_BENCH=1: times dist + softmax + apply at Llama-3.1-8B shapes (L=32, H=8, D=128, bf16,
 *    T=1024 placeholder, S=512 text segment, N anchors from KVM_KVCOMM_OPS_BENCH_N, default 20) with backend
 *    events, measures the device copy bandwidth, and prints the bandwidth floor (perf.md §4) and the ratios.
 *    KVM_KVCOMM_DIST=v1|v2u4 selects another distance kernel (kvcomm_kernels.cu). Skipped otherwise. */
#include <float.h>
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

#define KPI 3.141592653589793238462643383279

static uint64_t g_rng = 0x9e3779b97f4a7c15ULL;
static float frand(void) { /* uniform in [-1, 1), never exactly 0 */
    g_rng = g_rng * 6364136223846793005ULL + 1442695040888963407ULL;
    float v = (float)((g_rng >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f;
    return v == 0.0f ? 1e-3f : v;
}

/* ---- a case: logical tensors and their packed bytes ------------------------------------------------------ */

#define MAXN 6
typedef struct kcase {
    int L, H, D, T, S, N;
    kvm_dtype_t dt;
    kvm_rope_layout_t layout;
    int Tn[MAXN];
    /* logical fp32 (dtype-representable) tensors [L][2][H][rows][D] (deltas [L-1][...]) */
    float *X, *P, *A[MAXN], *dph[MAXN], *dpf[MAXN];
    float *inv_freq;
    /* packed: the pool (X paged at block table xblk, start xs; P paged at pblk), contiguous anchors and deltas */
    int n_blocks;
    void *pool;
    int32_t *xblk, *pblk, *oblk;
    int xs, ps, n_xblk, n_pblk, n_oblk;
    void *Ab[MAXN], *dphb[MAXN], *dpfb[MAXN];
    /* q8 (case_q8): the deltas encoded (kvm_q8_bytes buffers); dph/dpf then hold their decoded values */
    void *dphq[MAXN], *dpfq[MAXN];
} kcase_t;

static size_t esz(kvm_dtype_t dt) { return dt == KVM_F32 ? 4 : 2; }
static float round_dt(float v, kvm_dtype_t dt) {
    if (dt == KVM_BF16) return kvm_bf16_to_f32(kvm_f32_to_bf16(v));
    if (dt == KVM_F16) return kvm_f16_to_f32(kvm_f32_to_f16(v));
    return v;
}
static void put(void *base, kvm_dtype_t dt, size_t i, float v) {
    if (dt == KVM_F32) ((float *)base)[i] = v;
    else ((uint16_t *)base)[i] = dt == KVM_BF16 ? kvm_f32_to_bf16(v) : kvm_f32_to_f16(v);
}
static float get(const void *base, kvm_dtype_t dt, size_t i) {
    if (dt == KVM_F32) return ((const float *)base)[i];
    uint16_t u = ((const uint16_t *)base)[i];
    return dt == KVM_BF16 ? kvm_bf16_to_f32(u) : kvm_f16_to_f32(u);
}
static size_t lidx(const kcase_t *k, int nl, int rows, int l, int kv, int h, int t, int d) {
    (void)nl;
    return ((((size_t)l * 2 + kv) * k->H + h) * rows + t) * k->D + d;
}
static size_t pool_idx(const kcase_t *k, int32_t b, int l, int kv, int h, int slot, int d) {
    return ((((size_t)b * k->L + l) * 2 + kv) * k->H + h) * KVM_KV_BLOCK * k->D + (size_t)slot * k->D + d;
}
static float *rand_tensor(const kcase_t *k, int nl, int rows, float scale) {
    size_t n = (size_t)nl * 2 * k->H * rows * k->D;
    float *x = malloc(n * sizeof(float) + 4);
    for (size_t i = 0; i < n; i++) x[i] = round_dt(frand() * scale, k->dt);
    return x;
}
static void pack_paged(const kcase_t *k, const float *x, int rows, const int32_t *blk, int start) {
    for (int l = 0; l < k->L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < k->H; h++)
                for (int t = 0; t < rows; t++) {
                    int p = start + t;
                    for (int d = 0; d < k->D; d++)
                        put(k->pool, k->dt, pool_idx(k, blk[p / KVM_KV_BLOCK], l, kv, h, p % KVM_KV_BLOCK, d),
                            x[lidx(k, k->L, rows, l, kv, h, t, d)]);
                }
}
static void *pack_contig(const kcase_t *k, const float *x, int nl, int rows) {
    size_t n = (size_t)nl * 2 * k->H * rows * k->D;
    void *b = aligned_alloc(64, (n * esz(k->dt) + 63) & ~(size_t)63);
    for (size_t i = 0; i < n; i++) put(b, k->dt, i, x[i]);
    return b;
}
/* distinct shuffled block ids from [0, n_blocks) */
static void take_blocks(int32_t *out, int n, int *perm, int *used) {
    for (int i = 0; i < n; i++) out[i] = perm[(*used)++];
}

static kcase_t *case_make(int L, int H, int D, int T, int S, int N, const int *Tn, kvm_dtype_t dt, kvm_rope_layout_t lay) {
    kcase_t *k = calloc(1, sizeof *k);
    k->L = L, k->H = H, k->D = D, k->T = T, k->S = S, k->N = N, k->dt = dt, k->layout = lay;
    k->inv_freq = malloc((size_t)D / 2 * sizeof(float));
    for (int j = 0; j < D / 2; j++) k->inv_freq[j] = (float)pow(10000.0, -2.0 * j / D);
    k->X = rand_tensor(k, L, T, 1.0f);
    k->P = rand_tensor(k, L, S, 1.0f);
    for (int n = 0; n < N; n++) {
        k->Tn[n] = Tn[n];
        k->A[n] = rand_tensor(k, L, Tn[n], 1.0f);
        k->dph[n] = rand_tensor(k, L - 1, Tn[n], 0.25f);
        k->dpf[n] = rand_tensor(k, L - 1, S, 0.25f);
        k->Ab[n] = pack_contig(k, k->A[n], L, Tn[n]);
        k->dphb[n] = pack_contig(k, k->dph[n], L - 1, Tn[n]);
        k->dpfb[n] = pack_contig(k, k->dpf[n], L - 1, S);
    }
    /* token-granular starts inside blocks */
    k->xs = 5, k->ps = 11;
    k->n_xblk = (k->xs + T + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK;
    k->n_pblk = (k->ps + S + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK;
    k->n_oblk = (7 + T + S + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK + 1;
    k->n_blocks = k->n_xblk + k->n_pblk + k->n_oblk + 3;
    int *perm = malloc((size_t)k->n_blocks * sizeof(int));
    for (int i = 0; i < k->n_blocks; i++) perm[i] = i;
    for (int i = k->n_blocks - 1; i > 0; i--) {
        g_rng = g_rng * 6364136223846793005ULL + 1442695040888963407ULL;
        int j = (int)((g_rng >> 33) % (uint64_t)(i + 1)), tmp = perm[i];
        perm[i] = perm[j], perm[j] = tmp;
    }
    int used = 0;
    k->xblk = malloc((size_t)k->n_xblk * sizeof(int32_t));
    k->pblk = malloc((size_t)k->n_pblk * sizeof(int32_t));
    k->oblk = malloc((size_t)k->n_oblk * sizeof(int32_t));
    take_blocks(k->xblk, k->n_xblk, perm, &used);
    take_blocks(k->pblk, k->n_pblk, perm, &used);
    take_blocks(k->oblk, k->n_oblk, perm, &used);
    free(perm);
    size_t pool_elems = (size_t)k->n_blocks * L * 2 * H * KVM_KV_BLOCK * D;
    k->pool = aligned_alloc(64, (pool_elems * esz(dt) + 63) & ~(size_t)63);
    for (size_t i = 0; i < pool_elems; i++) put(k->pool, dt, i, frand()); /* garbage everywhere else */
    pack_paged(k, k->X, T, k->xblk, k->xs);
    pack_paged(k, k->P, S, k->pblk, k->ps);
    return k;
}

static void case_free(kcase_t *k) {
    free(k->X), free(k->P), free(k->inv_freq), free(k->pool), free(k->xblk), free(k->pblk), free(k->oblk);
    for (int n = 0; n < k->N; n++) {
        free(k->A[n]), free(k->dph[n]), free(k->dpf[n]);
        free(k->Ab[n]), free(k->dphb[n]), free(k->dpfb[n]);
        free(k->dphq[n]), free(k->dpfq[n]);
    }
    free(k);
}

/* a delta of `rows` rows q8-encoded (ops.h); x replaced by the decoded values when `decode` */
static void *q8_encode(const kcase_t *k, float *x, int rows, int decode) {
    const size_t elems = (size_t)(k->L - 1) * 2 * k->H * rows * k->D;
    char *q = calloc(1, kvm_q8_bytes(elems, k->D) + 16);
    float *sc = kvm_q8_scales(q, elems);
    for (size_t r = 0; r < elems / (size_t)k->D; r++) {
        kvm_q8_encode_row((int8_t *)q + r * k->D, sc + r, x + r * k->D, k->D);
        for (int d = 0; decode && d < k->D; d++) x[r * k->D + d] = (float)((int8_t *)q)[r * k->D + d] * sc[r];
    }
    return q;
}

/* makes the case's deltas q8: the encoded buffers, and (decode) the logical tensors and their packed copies decoded,
 * so that the references give what the ops should compute from the q8 views */
static void case_q8(kcase_t *k, int decode) {
    for (int n = 0; n < k->N; n++) {
        k->dphq[n] = q8_encode(k, k->dph[n], k->Tn[n], decode);
        k->dpfq[n] = q8_encode(k, k->dpf[n], k->S, decode);
        if (!decode) continue;
        free(k->dphb[n]), free(k->dpfb[n]);
        k->dphb[n] = pack_contig(k, k->dph[n], k->L - 1, k->Tn[n]);
        k->dpfb[n] = pack_contig(k, k->dpf[n], k->L - 1, k->S);
    }
}
static size_t q8_size(const kcase_t *k, int rows) {
    return kvm_q8_bytes((size_t)(k->L - 1) * 2 * k->H * rows * k->D, k->D);
}

static kvm_kv_geom_t case_geom(const kcase_t *k) {
    kvm_kv_geom_t g = {.n_layers = k->L, .n_kv_heads = k->H, .head_dim = k->D, .dtype = k->dt};
    return g;
}

/* ---- the re-derivation (kvcomm.md formulas, fp64) ----------------------------------------------------- */

static void ref_rotate(double *v, int D, int delta, const float *inv_freq, kvm_rope_layout_t lay) {
    for (int j = 0; j < D / 2; j++) {
        double a = fmod((double)delta * (double)inv_freq[j], 2 * KPI);
        if (a >= KPI) a -= 2 * KPI;
        else if (a < -KPI) a += 2 * KPI;
        double c = (float)cos(a), s = (float)sin(a);
        int i0 = lay == KVM_ROPE_HALF ? j : 2 * j, i1 = lay == KVM_ROPE_HALF ? j + D / 2 : 2 * j + 1;
        double x = v[i0], y = v[i1];
        v[i0] = x * c - y * s;
        v[i1] = x * s + y * c;
    }
}

/* dph [2][N][T], dpf [2][N][L][H][D], pred [N] */
static void ref_dist(const kcase_t *k, double *dph, double *dpf, double *pred) {
    const int L = k->L, H = k->H, D = k->D, T = k->T, N = k->N;
    double *row = malloc((size_t)D * sizeof(double));
    for (int n = 0; n < N; n++) {
        const int Tn = k->Tn[n], off = Tn - T;
        for (int kv = 0; kv < 2; kv++)
            for (int t = 0; t < T; t++) {
                double s = 0;
                for (int l = 0; l < L; l++)
                    for (int h = 0; h < H; h++)
                        for (int d = 0; d < D; d++)
                            s += fabs((double)k->X[lidx(k, L, T, l, kv, h, t, d)] - k->A[n][lidx(k, L, Tn, l, kv, h, t, d)]);
                dph[((size_t)kv * N + n) * T + t] = s / ((double)L * H * D);
            }
        for (int kv = 0; kv < 2; kv++)
            for (int l = 0; l < L; l++)
                for (int h = 0; h < H; h++)
                    for (int d = 0; d < D; d++) dpf[((((size_t)kv * N + n) * L + l) * H + h) * D + d] = 0;
        for (int kv = 0; kv < 2; kv++)
            for (int l = 0; l < L; l++)
                for (int h = 0; h < H; h++)
                    for (int t = 0; t < T; t++) {
                        for (int d = 0; d < D; d++) row[d] = k->A[n][lidx(k, L, Tn, l, kv, h, off + t, d)];
                        if (kv == 0 && off) ref_rotate(row, D, -off, k->inv_freq, k->layout);
                        for (int d = 0; d < D; d++) {
                            double df = k->X[lidx(k, L, T, l, kv, h, t, d)] - row[d];
                            dpf[((((size_t)kv * N + n) * L + l) * H + h) * D + d] += df * df;
                        }
                    }
        for (size_t i = 0; i < (size_t)L * H * D; i++) {
            dpf[(size_t)n * L * H * D + i] = sqrt(dpf[(size_t)n * L * H * D + i]);
            dpf[((size_t)N + n) * L * H * D + i] = sqrt(dpf[((size_t)N + n) * L * H * D + i]);
        }
        double ss = 0;
        for (int l = 0; l < L; l++)
            for (int h = 0; h < H; h++)
                for (int t = 0; t < T; t++)
                    for (int d = 0; d < D; d++) {
                        double df = (double)k->X[lidx(k, L, T, l, 1, h, t, d)] - k->A[n][lidx(k, L, Tn, l, 1, h, t, d)];
                        ss += df * df;
                    }
        pred[n] = sqrt(ss);
    }
    free(row);
}

/* the piece y[L][2][H][r1-r0][D] of §3.6 application + shift, in fp64 */
static double *ref_apply(const kcase_t *k, int pf, const float *w, int r0, int r1, int shift) {
    const int L = k->L, H = k->H, D = k->D, N = k->N, rows = pf ? k->S : k->T, nr = r1 - r0;
    double *y = malloc((size_t)L * 2 * H * nr * D * sizeof(double));
    double *row = malloc((size_t)D * sizeof(double));
    for (int l = 0; l < L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < H; h++)
                for (int r = r0; r < r1; r++) {
                    for (int d = 0; d < D; d++) {
                        double v = (pf ? k->P : k->X)[lidx(k, L, rows, l, kv, h, r, d)];
                        for (int n = 0; l >= 1 && n < N; n++) {
                            double wn = pf ? w[((((size_t)kv * N + n) * L + l) * H + h) * D + d] : w[((size_t)kv * N + n) * k->T + r];
                            double dl = pf ? k->dpf[n][lidx(k, L - 1, k->S, l - 1, kv, h, r, d)]
                                           : k->dph[n][lidx(k, L - 1, k->Tn[n], l - 1, kv, h, r, d)];
                            v += wn * dl;
                        }
                        row[d] = v;
                    }
                    if (kv == 0 && shift) ref_rotate(row, D, shift, k->inv_freq, k->layout);
                    memcpy(y + lidx(k, L, nr, l, kv, h, r - r0, 0), row, (size_t)D * sizeof(double));
                }
    free(row);
    return y;
}

/* kvcomm_spread's formula in fp64 over the logical tensors (ops.h), rows [0, T) */
static double *ref_spread(const kcase_t *k, const float *w) {
    const int L = k->L, H = k->H, D = k->D, N = k->N, T = k->T;
    double *out = malloc((size_t)T * sizeof(double));
    for (int r = 0; r < T; r++) {
        double S = 0, X = 0;
        for (int l = 1; l < L; l++)
            for (int kv = 0; kv < 2; kv++)
                for (int h = 0; h < H; h++)
                    for (int d = 0; d < D; d++) {
                        double est = 0;
                        for (int n = 0; n < N; n++)
                            est += (double)w[((size_t)kv * N + n) * T + r] * k->dph[n][lidx(k, L - 1, k->Tn[n], l - 1, kv, h, r, d)];
                        for (int n = 0; n < N; n++) {
                            double e = k->dph[n][lidx(k, L - 1, k->Tn[n], l - 1, kv, h, r, d)] - est;
                            S += w[((size_t)kv * N + n) * T + r] * e * e;
                        }
                        double x = k->X[lidx(k, L, T, l, kv, h, r, d)];
                        X += x * x;
                    }
        out[r] = S / (X + 1e-30) + 1e-30;
    }
    return out;
}

/* ---- running an op table on a case (host or device memory) -------------------------------------------- */

typedef struct devcase {
    const kvm_ops_t *o;
    void *pool;
    int32_t *xblk, *pblk, *oblk;
    void *Ab[MAXN], *dphb[MAXN], *dpfb[MAXN];
    void *dphq[MAXN], *dpfq[MAXN]; /* a q8 case's encoded deltas */
    int q8;                        /* apply and spread read the q8 deltas */
    float *inv_freq;
} devcase_t;

/* the delta view of anchor n (pf: the text rows) */
static kvm_kv_view_t delta_view(const devcase_t *dc, const kcase_t *k, int pf, int n) {
    const int rows = pf ? k->S : k->Tn[n];
    if (!dc->q8) return (kvm_kv_view_t){.data = pf ? dc->dpfb[n] : dc->dphb[n], .rows = rows, .l0 = 1};
    const char *q = pf ? dc->dpfq[n] : dc->dphq[n];
    const size_t elems = (size_t)(k->L - 1) * 2 * k->H * rows * k->D;
    return (kvm_kv_view_t){.data = q, .rows = rows, .l0 = 1, .scale = kvm_q8_scales(q, elems)};
}

static void *up(const kvm_ops_t *o, const void *src, size_t bytes) {
    void *d = o->alloc(bytes + 16);
    assert_non_null(d);
    assert_int_equal(o->h2d(d, src, bytes), 0);
    return d;
}

static devcase_t dev_make(const kvm_ops_t *o, const kcase_t *k) {
    devcase_t dc;
    memset(&dc, 0, sizeof dc);
    dc.o = o;
    size_t pool_bytes = (size_t)k->n_blocks * k->L * 2 * k->H * KVM_KV_BLOCK * k->D * esz(k->dt);
    dc.pool = up(o, k->pool, pool_bytes);
    dc.xblk = up(o, k->xblk, (size_t)k->n_xblk * 4);
    dc.pblk = up(o, k->pblk, (size_t)k->n_pblk * 4);
    dc.oblk = up(o, k->oblk, (size_t)k->n_oblk * 4);
    dc.inv_freq = up(o, k->inv_freq, (size_t)k->D / 2 * 4);
    for (int n = 0; n < k->N; n++) {
        dc.Ab[n] = up(o, k->Ab[n], (size_t)k->L * 2 * k->H * k->Tn[n] * k->D * esz(k->dt));
        dc.dphb[n] = up(o, k->dphb[n], (size_t)(k->L - 1) * 2 * k->H * k->Tn[n] * k->D * esz(k->dt));
        dc.dpfb[n] = up(o, k->dpfb[n], (size_t)(k->L - 1) * 2 * k->H * k->S * k->D * esz(k->dt));
        if (k->dphq[n]) dc.dphq[n] = up(o, k->dphq[n], q8_size(k, k->Tn[n]));
        if (k->dpfq[n]) dc.dpfq[n] = up(o, k->dpfq[n], q8_size(k, k->S));
    }
    return dc;
}

static void dev_free(devcase_t *dc, const kcase_t *k) {
    const kvm_ops_t *o = dc->o;
    o->free(dc->pool), o->free(dc->xblk), o->free(dc->pblk), o->free(dc->oblk), o->free(dc->inv_freq);
    for (int n = 0; n < k->N; n++) o->free(dc->Ab[n]), o->free(dc->dphb[n]), o->free(dc->dpfb[n]), o->free(dc->dphq[n]), o->free(dc->dpfq[n]);
}

/* runs kvcomm_dist (+ softmax into host w_ph [2][N][T], w_pf [2][N][L][H][D]); distances to host */
static void run_dist(const devcase_t *dc, const kcase_t *k, float *dph, float *dpf, float *pred, float *wph, float *wpf,
                     int mode) {
    const kvm_ops_t *o = dc->o;
    const int N = k->N, T = k->T;
    const size_t nph = (size_t)2 * N * T, npf = (size_t)2 * N * k->L * k->H * k->D;
    float *d_ph = o->alloc(nph * 4), *d_pf = o->alloc(npf * 4), *d_pred = o->alloc((size_t)N * 4);
    float *w_ph = o->alloc(nph * 4), *w_pf = o->alloc(npf * 4);
    /* poison */
    size_t nmax = npf > nph ? npf : nph;
    float *nanbuf = malloc(nmax * 4);
    for (size_t i = 0; i < nmax; i++) nanbuf[i] = NAN;
    o->h2d(d_ph, nanbuf, nph * 4), o->h2d(d_pf, nanbuf, npf * 4), o->h2d(d_pred, nanbuf, (size_t)N * 4);
    kvm_kv_view_t av[MAXN];
    for (int n = 0; n < N; n++) av[n] = (kvm_kv_view_t){.data = dc->Ab[n], .rows = k->Tn[n], .l0 = 0};
    kvm_kvcomm_dist_args_t a = {.g = case_geom(k),
                                .x = {.data = dc->pool, .blocks = dc->xblk, .start = k->xs},
                                .T = T,
                                .n = N,
                                .a = av,
                                .a_rows = k->Tn,
                                .want = KVM_KVCOMM_WANT_PH | KVM_KVCOMM_WANT_PF | KVM_KVCOMM_WANT_PRED,
                                .rotate_tail = 1,
                                .inv_freq = dc->inv_freq,
                                .layout = k->layout,
                                .d_ph = d_ph,
                                .d_pf = d_pf,
                                .d_pred = d_pred};
    int rc = o->kvcomm_dist(&a);
    if (rc) fprintf(stderr, "kvcomm_dist(%s): %s\n", o->name, kvm_errmsg());
    assert_int_equal(rc, 0);
    assert_int_equal(o->kvcomm_softmax(w_ph, d_ph, N, (size_t)T, mode), 0);
    assert_int_equal(o->kvcomm_softmax(w_ph + (size_t)N * T, d_ph + (size_t)N * T, N, (size_t)T, mode), 0);
    size_t per = (size_t)k->L * k->H * k->D;
    assert_int_equal(o->kvcomm_softmax(w_pf, d_pf, N, per, mode), 0);
    assert_int_equal(o->kvcomm_softmax(w_pf + N * per, d_pf + N * per, N, per, mode), 0);
    assert_int_equal(o->sync(), 0);
    o->d2h(dph, d_ph, nph * 4), o->d2h(dpf, d_pf, npf * 4), o->d2h(pred, d_pred, (size_t)N * 4);
    o->d2h(wph, w_ph, nph * 4), o->d2h(wpf, w_pf, npf * 4);
    o->free(d_ph), o->free(d_pf), o->free(d_pred), o->free(w_ph), o->free(w_pf);
    free(nanbuf);
}

/* runs kvcomm_apply of one piece with host weights w; returns the output rows read back as fp32
 * [L][2][H][r1-r0][D] from the output block table at position opos */
static float *run_apply_n(const devcase_t *dc, const kcase_t *k, int pf, const float *w, int r0, int r1, int opos,
                          int shift, int N) {
    const kvm_ops_t *o = dc->o;
    const int L = k->L, H = k->H, D = k->D;
    size_t nw = pf ? (size_t)2 * N * L * H * D : (size_t)2 * N * k->T;
    float *dw = up(o, w, nw * 4);
    kvm_kv_view_t dv[MAXN];
    for (int n = 0; n < N; n++) dv[n] = delta_view(dc, k, pf, n);
    kvm_kvcomm_apply_args_t a = {.g = case_geom(k),
                                 .src = {.data = dc->pool, .blocks = pf ? dc->pblk : dc->xblk, .start = pf ? k->ps : k->xs},
                                 .n = N,
                                 .delta = dv,
                                 .w = dw,
                                 .per_channel = pf,
                                 .w_rows = k->T,
                                 .r0 = r0,
                                 .r1 = r1,
                                 .dst_kv = dc->pool,
                                 .dst_blocks = dc->oblk,
                                 .dst_pos = opos,
                                 .shift = shift,
                                 .inv_freq = dc->inv_freq,
                                 .layout = k->layout};
    int rc = o->kvcomm_apply(&a);
    if (rc) fprintf(stderr, "kvcomm_apply(%s): %s\n", o->name, kvm_errmsg());
    assert_int_equal(rc, 0);
    assert_int_equal(o->sync(), 0);
    size_t pool_bytes = (size_t)k->n_blocks * L * 2 * H * KVM_KV_BLOCK * D * esz(k->dt);
    void *hp = malloc(pool_bytes);
    assert_int_equal(o->d2h(hp, dc->pool, pool_bytes), 0);
    const int nr = r1 - r0;
    float *y = malloc((size_t)L * 2 * H * (nr ? nr : 1) * D * sizeof(float));
    for (int l = 0; l < L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < H; h++)
                for (int r = 0; r < nr; r++) {
                    int p = opos + r;
                    for (int d = 0; d < D; d++)
                        y[lidx(k, L, nr, l, kv, h, r, d)] =
                            get(hp, k->dt, pool_idx(k, k->oblk[p / KVM_KV_BLOCK], l, kv, h, p % KVM_KV_BLOCK, d));
                }
    free(hp);
    o->free(dw);
    return y;
}

/* runs kvcomm_spread of the placeholder rows [0, T) with host weights w [2][N][T]; returns the scores */
static float *run_spread(const devcase_t *dc, const kcase_t *k, const float *w) {
    const kvm_ops_t *o = dc->o;
    const int N = k->N, T = k->T;
    float *dw = up(o, w, (size_t)2 * N * T * 4);
    float *dout = o->alloc((size_t)T * 4 + 16);
    assert_non_null(dout);
    kvm_kv_view_t dv[MAXN];
    for (int n = 0; n < N; n++) dv[n] = delta_view(dc, k, 0, n);
    kvm_kvcomm_spread_args_t a = {.g = case_geom(k),
                                  .x = {.data = dc->pool, .blocks = dc->xblk, .start = k->xs},
                                  .n = N,
                                  .delta = dv,
                                  .w = dw,
                                  .w_rows = T,
                                  .r0 = 0,
                                  .r1 = T,
                                  .out = dout};
    assert_non_null(o->kvcomm_spread);
    int rc = o->kvcomm_spread(&a);
    if (rc) fprintf(stderr, "kvcomm_spread(%s): %s\n", o->name, kvm_errmsg());
    assert_int_equal(rc, 0);
    assert_int_equal(o->sync(), 0);
    float *y = malloc((size_t)T * 4);
    assert_int_equal(o->d2h(y, dout, (size_t)T * 4), 0);
    o->free(dw), o->free(dout);
    return y;
}

/* ... with all the case's anchors */
static float *run_apply(const devcase_t *dc, const kcase_t *k, int pf, const float *w, int r0, int r1, int opos,
                        int shift) {
    return run_apply_n(dc, k, pf, w, r0, r1, opos, shift, k->N);
}

static double rel_err_fd(const float *a, const double *ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(a[i])) return INFINITY;
        num += (a[i] - ref[i]) * (a[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return sqrt(num / (den > 0 ? den : 1e-300));
}
static double rel_err_ff(const float *a, const float *ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(ref[i])) return INFINITY;
        num += ((double)a[i] - ref[i]) * ((double)a[i] - ref[i]);
        den += (double)ref[i] * ref[i];
    }
    return sqrt(num / (den > 0 ? den : 1e-300));
}

/* ---- kvcomm_diff (anchor materialization) ------------------------------------------------------------------ */

/* The three uses of kvcomm_diff: 0 = an anchor's base (the candidate X, paged, copied: l0 0, no b); 1 = a
 * placeholder delta (X paged, keys re-based by -shift, minus anchor 0's contiguous base, layers 1..); 2 = a text
 * delta (anchor 0's contiguous rows minus the text segment P, paged, layers 1..). Rows: T, T, S. */
static int diff_rows(const kcase_t *k, int use) { return use == 2 ? k->S : k->T; }
static int diff_l0(int use) { return use ? 1 : 0; }

/* q8 (uses 1 and 2): the output is q8, its raw bytes in *raw (kvm_q8_bytes) and its decoded values returned */
static float *run_diff_q8(const devcase_t *dc, const kcase_t *k, int use, int shift, int q8, char **raw) {
    const kvm_ops_t *o = dc->o;
    const int n = diff_rows(k, use), l0 = diff_l0(use);
    const size_t cnt = (size_t)(k->L - l0) * 2 * k->H * n * k->D, qb = kvm_q8_bytes(cnt, k->D);
    void *out = o->alloc((q8 ? qb : cnt * esz(k->dt)) + 16);
    assert_non_null(out);
    const kvm_kv_view_t xv = {.data = dc->pool, .blocks = dc->xblk, .start = k->xs};
    const kvm_kv_view_t pv = {.data = dc->pool, .blocks = dc->pblk, .start = k->ps};
    const kvm_kv_view_t av = {.data = dc->Ab[0], .rows = k->Tn[0], .l0 = 0};
    kvm_kvcomm_diff_args_t a = {.g = case_geom(k), .n = n, .l0 = l0, .inv_freq = dc->inv_freq, .layout = k->layout,
                                .out = out};
    if (use == 0) a.a = xv;
    if (use == 1) a.a = xv, a.b = av, a.shift = shift;
    if (use == 2) a.a = av, a.b = pv;
    if (q8) a.out_scale = kvm_q8_scales(out, cnt);
    assert_int_equal(o->kvcomm_diff(&a), 0);
    assert_int_equal(o->sync(), 0);
    if (q8) {
        char *h = malloc(qb + 16);
        assert_int_equal(o->d2h(h, out, qb), 0);
        const float *sc = kvm_q8_scales(h, cnt);
        float *y = malloc(cnt * sizeof(float) + 4);
        for (size_t i = 0; i < cnt; i++) y[i] = (float)((int8_t *)h)[i] * sc[i / (size_t)k->D];
        o->free(out);
        *raw = h;
        return y;
    }
    void *h = malloc(cnt * esz(k->dt) + 16);
    assert_int_equal(o->d2h(h, out, cnt * esz(k->dt)), 0);
    float *y = malloc(cnt * sizeof(float) + 4);
    for (size_t i = 0; i < cnt; i++) y[i] = get(h, k->dt, i);
    free(h);
    o->free(out);
    return y;
}
static float *run_diff(const devcase_t *dc, const kcase_t *k, int use, int shift) {
    return run_diff_q8(dc, k, use, shift, 0, NULL);
}

/* kvcomm_diff's formula in fp64 over the logical tensors */
static double *ref_diff(const kcase_t *k, int use, int shift) {
    const int L = k->L, H = k->H, D = k->D, n = diff_rows(k, use), l0 = diff_l0(use);
    double *y = malloc((size_t)(L - l0) * 2 * H * n * D * sizeof(double)), *row = malloc((size_t)D * sizeof(double));
    for (int l = l0; l < L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < H; h++)
                for (int r = 0; r < n; r++) {
                    for (int d = 0; d < D; d++)
                        row[d] = use == 2 ? k->A[0][lidx(k, L, k->Tn[0], l, kv, h, r, d)] : k->X[lidx(k, L, k->T, l, kv, h, r, d)];
                    if (use == 1 && kv == 0 && shift) ref_rotate(row, D, shift, k->inv_freq, k->layout);
                    for (int d = 0; d < D; d++) {
                        if (use == 1) row[d] -= k->A[0][lidx(k, L, k->Tn[0], l, kv, h, r, d)];
                        if (use == 2) row[d] -= k->P[lidx(k, L, k->S, l, kv, h, r, d)];
                    }
                    memcpy(y + lidx(k, L - l0, n, l - l0, kv, h, r, 0), row, (size_t)D * sizeof(double));
                }
    free(row);
    return y;
}

/* the three uses on backend dc against the formula; the worst relative error */
static double diff_err(const devcase_t *dc, const kcase_t *k, int shift) {
    double worst = 0;
    for (int use = 0; use < 3; use++) {
        float *y = run_diff(dc, k, use, shift);
        double *ry = ref_diff(k, use, shift);
        double e = rel_err_fd(y, ry, (size_t)(k->L - diff_l0(use)) * 2 * k->H * diff_rows(k, use) * k->D);
        if (use == 0 && e != 0) e = INFINITY; /* a copy of representable values is exact */
        fprintf(stderr, "  [%s %s D=%d] kvcomm_diff use %d rel err %.3g\n", dc->o->name, kvm_dtype_name(k->dt), k->D, use, e);
        if (e > worst) worst = e;
        free(y), free(ry);
    }
    return worst;
}

static void ref_softmax(const double *d, int N, size_t cols, double *w) {
    for (size_t c = 0; c < cols; c++) {
        double mn = d[c], s = 0;
        for (int n = 1; n < N; n++) mn = fmin(mn, d[(size_t)n * cols + c]);
        for (int n = 0; n < N; n++) s += exp(-(d[(size_t)n * cols + c] - mn));
        for (int n = 0; n < N; n++) w[(size_t)n * cols + c] = exp(-(d[(size_t)n * cols + c] - mn)) / s;
    }
}

/* ---- 1. CPU reference vs the formulas -------------------------------------------------------------------- */

static void check_cpu_case(kvm_dtype_t dt, kvm_rope_layout_t lay, int D) {
    const int Tn[3] = {20, 27, 33};
    kcase_t *k = case_make(3, 2, D, 20, 13, 3, Tn, dt, lay);
    const kvm_ops_t *o = kvm_ops_cpu();
    assert_non_null(o->kvcomm_dist);
    devcase_t dc = dev_make(o, k);
    const int N = k->N, T = k->T;
    const size_t nph = (size_t)2 * N * T, per = (size_t)k->L * k->H * k->D, npf = 2 * N * per;
    float *dph = malloc(nph * 4), *dpf = malloc(npf * 4), *pred = malloc(N * 4), *wph = malloc(nph * 4), *wpf = malloc(npf * 4);
    run_dist(&dc, k, dph, dpf, pred, wph, wpf, KVM_KVCOMM_SOFTMAX);
    double *rph = malloc(nph * 8), *rpf = malloc(npf * 8), *rpred = malloc(N * 8), *rw = malloc(npf * 8);
    ref_dist(k, rph, rpf, rpred);
    double tol = 1e-5;
    assert_true(rel_err_fd(dph, rph, nph) <= tol);
    assert_true(rel_err_fd(dpf, rpf, npf) <= tol);
    assert_true(rel_err_fd(pred, rpred, N) <= tol);
    ref_softmax(rph, N, (size_t)T, rw);
    ref_softmax(rph + (size_t)N * T, N, (size_t)T, rw + (size_t)N * T);
    assert_true(rel_err_fd(wph, rw, nph) <= tol);
    ref_softmax(rpf, N, per, rw);
    ref_softmax(rpf + N * per, N, per, rw + N * per);
    assert_true(rel_err_fd(wpf, rw, npf) <= tol);
    /* apply: the placeholder rows [2, T) at position 7, shifted by 1000; the text segment rows [0, S) right after */
    const double tol_out = dt == KVM_F32 ? 1e-5 : 1e-2;
    float *y = run_apply(&dc, k, 0, wph, 2, T, 7, 1000);
    double *ry = ref_apply(k, 0, wph, 2, T, 1000);
    size_t ny = (size_t)k->L * 2 * k->H * (T - 2) * k->D;
    double e1 = rel_err_fd(y, ry, ny);
    free(y), free(ry);
    y = run_apply(&dc, k, 1, wpf, 0, k->S, 7 + T - 2, 1000 + T);
    ry = ref_apply(k, 1, wpf, 0, k->S, 1000 + T);
    double e2 = rel_err_fd(y, ry, (size_t)k->L * 2 * k->H * k->S * k->D);
    free(y), free(ry);
    if (e1 > tol_out || e2 > tol_out) fprintf(stderr, "apply rel err ph %.3g pf %.3g (tol %.g)\n", e1, e2, tol_out);
    assert_true(e1 <= tol_out);
    assert_true(e2 <= tol_out);
    /* diff (anchor materialization) against its formula: one rounding of an fp32 difference */
    assert_true(diff_err(&dc, k, -(k->xs + 37)) <= (dt == KVM_F32 ? 1e-6 : 1e-2));
    /* spread (ours): the CPU op against its formula */
    {
        float *sp = run_spread(&dc, k, wph);
        double *rs = ref_spread(k, wph);
        double es = rel_err_fd(sp, rs, (size_t)T);
        if (es > 1e-5) fprintf(stderr, "spread rel err %.3g\n", es);
        assert_true(es <= 1e-5);
        free(sp), free(rs);
    }
    /* and the offsets matter: without them the result differs from the reference */
    float *w0 = calloc(npf, 4);
    y = run_apply(&dc, k, 1, w0, 0, k->S, 7 + T - 2, 1000 + T);
    ry = ref_apply(k, 1, wpf, 0, k->S, 1000 + T);
    assert_true(rel_err_fd(y, ry, (size_t)k->L * 2 * k->H * k->S * k->D) > 3 * tol_out);
    free(y), free(ry), free(w0);
    dev_free(&dc, k);
    free(dph), free(dpf), free(pred), free(wph), free(wpf), free(rph), free(rpf), free(rpred), free(rw);
    case_free(k);
}

static void test_cpu_ops_match_the_formulas_fp32_rotate_half(void **st) {
    (void)st;
    check_cpu_case(KVM_F32, KVM_ROPE_HALF, 16);
}
static void test_cpu_ops_match_the_formulas_bf16_interleaved(void **st) {
    (void)st;
    check_cpu_case(KVM_BF16, KVM_ROPE_INTERLEAVED, 32);
}
static void test_cpu_ops_match_the_formulas_fp32_interleaved_odd_head_dim(void **st) {
    (void)st;
    check_cpu_case(KVM_F32, KVM_ROPE_INTERLEAVED, 6);
}

/* q8 deltas on the CPU (the reference of every backend): apply and spread read them as their decoded values (the
 * references over the decoded tensors), and kvcomm_diff's q8 output is the encoding of the formula's values: per
 * row, the scale is max |y| / 127, some element is +-127, and every decoded value is within half a scale of y. */
static void check_cpu_q8_case(kvm_dtype_t dt, kvm_rope_layout_t lay, int D) {
    const int Tn[3] = {20, 27, 33};
    kcase_t *k = case_make(3, 2, D, 20, 13, 3, Tn, dt, lay);
    case_q8(k, 1);
    const kvm_ops_t *o = kvm_ops_cpu();
    devcase_t dc = dev_make(o, k);
    dc.q8 = 1;
    const int N = k->N, T = k->T;
    const size_t nph = (size_t)2 * N * T, npf = (size_t)2 * N * k->L * k->H * k->D;
    float *dph = malloc(nph * 4), *dpf = malloc(npf * 4), *pred = malloc(N * 4), *wph = malloc(nph * 4), *wpf = malloc(npf * 4);
    run_dist(&dc, k, dph, dpf, pred, wph, wpf, KVM_KVCOMM_SOFTMAX);
    const double tol = dt == KVM_F32 ? 1e-5 : 1e-2;
    float *y = run_apply(&dc, k, 0, wph, 2, T, 7, 1000);
    double *ry = ref_apply(k, 0, wph, 2, T, 1000);
    const double e1 = rel_err_fd(y, ry, (size_t)k->L * 2 * k->H * (T - 2) * k->D);
    free(y), free(ry);
    y = run_apply(&dc, k, 1, wpf, 0, k->S, 7 + T - 2, 1000 + T);
    ry = ref_apply(k, 1, wpf, 0, k->S, 1000 + T);
    const double e2 = rel_err_fd(y, ry, (size_t)k->L * 2 * k->H * k->S * k->D);
    free(y), free(ry);
    float *sp = run_spread(&dc, k, wph);
    double *rs = ref_spread(k, wph);
    const double e3 = rel_err_fd(sp, rs, (size_t)T);
    free(sp), free(rs);
    fprintf(stderr, "  [cpu q8 %s D=%d] apply ph %.3g pf %.3g spread %.3g (tol %g)\n", kvm_dtype_name(dt), D, e1, e2, e3, tol);
    assert_true(e1 <= tol && e2 <= tol && e3 <= 1e-5);
    for (int use = 1; use < 3; use++) {
        char *raw = NULL;
        float *yq = run_diff_q8(&dc, k, use, -(k->xs + 37), 1, &raw);
        double *yr = ref_diff(k, use, -(k->xs + 37));
        const size_t cnt = (size_t)(k->L - 1) * 2 * k->H * diff_rows(k, use) * D;
        const float *sc = kvm_q8_scales(raw, cnt);
        for (size_t r = 0; r < cnt / (size_t)D; r++) {
            double m = 0;
            int qm = 0;
            for (int d = 0; d < D; d++) {
                m = fmax(m, fabs(yr[r * D + d]));
                qm = abs(((int8_t *)raw)[r * D + d]) > qm ? abs(((int8_t *)raw)[r * D + d]) : qm;
            }
            assert_true(fabs(sc[r] - m / 127) <= 1e-6 * m);
            assert_int_equal(qm, 127);
            for (int d = 0; d < D; d++) assert_true(fabs(yq[r * D + d] - yr[r * D + d]) <= 0.5 * sc[r] + 1e-6 * m);
        }
        free(yq), free(yr), free(raw);
    }
    dev_free(&dc, k);
    free(dph), free(dpf), free(pred), free(wph), free(wpf);
    case_free(k);
}

static void test_cpu_ops_read_and_write_q8_deltas(void **st) {
    (void)st;
    check_cpu_q8_case(KVM_F32, KVM_ROPE_HALF, 16);
    check_cpu_q8_case(KVM_BF16, KVM_ROPE_INTERLEAVED, 32);
    check_cpu_q8_case(KVM_F32, KVM_ROPE_INTERLEAVED, 6);
}

/* The q8 encoding of rows a hostile state file or a diverged model may hold: a zero row, NaN, infinities, values at
 * the rounding ties. Every q stays in [-127, 127] and nothing traps (UBSan: no float-to-int overflow). */
static void test_q8_encoding_of_edge_rows(void **st) {
    (void)st;
    int8_t q[4];
    float s = -1;
    const float zero[4] = {0, 0, 0, 0};
    kvm_q8_encode_row(q, &s, zero, 4);
    assert_true(s == 0.0f);
    for (int i = 0; i < 4; i++) assert_int_equal(q[i], 0);
    const float ties[4] = {127.0f, 0.5f, 1.5f, -2.5f}; /* s = 1: ties to even */
    kvm_q8_encode_row(q, &s, ties, 4);
    assert_true(s == 1.0f);
    assert_int_equal(q[0], 127), assert_int_equal(q[1], 0), assert_int_equal(q[2], 2), assert_int_equal(q[3], -2);
    const float bad[4] = {NAN, 1.0f, -3.0f, 2.0f}; /* NaN is ignored by the max and encodes as 0 */
    kvm_q8_encode_row(q, &s, bad, 4);
    assert_true(s == 3.0f / 127.0f);
    assert_int_equal(q[0], 0), assert_int_equal(q[2], -127);
    const float inf[4] = {INFINITY, 1.0f, -INFINITY, FLT_MAX};
    kvm_q8_encode_row(q, &s, inf, 4);
    for (int i = 0; i < 4; i++) assert_true(q[i] >= -127 && q[i] <= 127);
}

/* a q8 view anywhere but an anchor delta, or a paged one, is refused */
static void test_q8_views_only_for_contiguous_deltas(void **st) {
    (void)st;
    const int Tn[3] = {20, 27, 33};
    kcase_t *k = case_make(3, 2, 16, 20, 13, 3, Tn, KVM_F32, KVM_ROPE_HALF);
    const kvm_ops_t *o = kvm_ops_cpu();
    devcase_t dc = dev_make(o, k);
    float sc[64] = {1};
    kvm_kv_view_t dv = {.data = dc.dphb[0], .blocks = dc.xblk, .rows = k->Tn[0], .l0 = 1, .scale = sc};
    float w[2 * 20] = {1};
    kvm_kvcomm_spread_args_t a = {.g = case_geom(k), .x = {.data = dc.pool, .blocks = dc.xblk, .start = k->xs}, .n = 1,
                                  .delta = &dv, .w = w, .w_rows = k->T, .r0 = 0, .r1 = 2, .out = sc};
    assert_int_equal(o->kvcomm_spread(&a), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "q8"));
    dv.blocks = NULL;
    a.x.scale = sc;
    assert_int_equal(o->kvcomm_spread(&a), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "candidate"));
    dev_free(&dc, k);
    case_free(k);
}

static void test_nearest_softmax_is_one_hot_on_the_first_minimum(void **st) {
    (void)st;
    const float d[3 * 2] = {0.5f, 2.0f, 0.25f, 1.0f, 0.25f, 1.0f};
    float w[6];
    assert_int_equal(kvm_ops_cpu()->kvcomm_softmax(w, d, 3, 2, KVM_KVCOMM_NEAREST), 0);
    const float want[6] = {0, 0, 1, 1, 0, 0};
    for (int i = 0; i < 6; i++) assert_true(w[i] == want[i]);
}

/* ---- 2. the selected backend vs the CPU reference ---------------------------------------------------------- */

static const kvm_ops_t *gpu_ops_or_skip(void) {
    const kvm_ops_t *o = kvm_ops_select("auto");
    if (!o || !strcmp(o->name, "cpu")) {
        fprintf(stderr, "SKIPPED: no GPU backend (auto = cpu: %s); the CUDA KVCOMM ops are not compared here\n",
                kvm_ops_fallback_reason());
        return NULL;
    }
    if (!o->kvcomm_dist || !o->kvcomm_apply || !o->kvcomm_softmax) {
        fprintf(stderr, "SKIPPED: backend %s has no KVCOMM ops\n", o->name);
        return NULL;
    }
    return o;
}

static void check_backend_case(const kvm_ops_t *o, int L, int H, int D, int T, int S, int N, const int *Tn, kvm_dtype_t dt,
                               kvm_rope_layout_t lay) {
    kcase_t *k = case_make(L, H, D, T, S, N, Tn, dt, lay);
    case_q8(k, 0); /* the deltas also as q8 buffers, for the q8 passes below */
    devcase_t cc = dev_make(kvm_ops_cpu(), k), gc = dev_make(o, k);
    const size_t nph = (size_t)2 * N * T, per = (size_t)L * H * D, npf = 2 * N * per;
    float *b[2][5];
    for (int i = 0; i < 2; i++) {
        b[i][0] = malloc(nph * 4), b[i][1] = malloc(npf * 4), b[i][2] = malloc(N * 4), b[i][3] = malloc(nph * 4);
        b[i][4] = malloc(npf * 4);
        run_dist(i ? &gc : &cc, k, b[i][0], b[i][1], b[i][2], b[i][3], b[i][4], KVM_KVCOMM_SOFTMAX);
    }
    const char *names[5] = {"d_ph", "d_pf", "d_pred", "w_ph", "w_pf"};
    const size_t cnt[5] = {nph, npf, (size_t)N, nph, npf};
    int bad = 0;
    for (int j = 0; j < 5; j++) {
        double e = rel_err_ff(b[1][j], b[0][j], cnt[j]);
        fprintf(stderr, "  [%s L=%d H=%d D=%d T=%d N=%d %s] %-6s rel err %.3g\n", o->name, L, H, D, T, N,
                kvm_dtype_name(dt), names[j], e);
        if (!(e <= 1e-5)) bad = 1;
    }
    /* apply and spread with the CPU weights on both (so the comparison isolates them), with the deltas in the KV
     * dtype, then q8 (kvcomm.deltas=q8) */
    const double tol = dt == KVM_F32 ? 1e-5 : 1e-2;
    for (int q8 = 0; q8 < 2; q8++) {
        cc.q8 = gc.q8 = q8;
        const char *form = q8 ? "q8 " : "";
        for (int pf = 0; pf < 2; pf++) {
            int r0 = pf ? 0 : 3, r1 = pf ? S : T, pos = pf ? 9 + T - 3 : 9, shift = pf ? 4000 + T : 4000;
            float *yc = run_apply(&cc, k, pf, pf ? b[0][4] : b[0][3], r0, r1, pos, shift);
            float *yg = run_apply(&gc, k, pf, pf ? b[0][4] : b[0][3], r0, r1, pos, shift);
            double e = rel_err_ff(yg, yc, (size_t)L * 2 * H * (r1 - r0) * D);
            fprintf(stderr, "  [%s L=%d H=%d D=%d T=%d N=%d %s] %sapply %s rel err %.3g (tol %g)\n", o->name, L, H, D, T,
                    N, kvm_dtype_name(dt), form, pf ? "pf" : "ph", e, tol);
            if (!(e <= tol)) bad = 1;
            free(yc), free(yg);
        }
        float *sc = run_spread(&cc, k, b[0][3]), *sg = run_spread(&gc, k, b[0][3]);
        double e = rel_err_ff(sg, sc, (size_t)T);
        fprintf(stderr, "  [%s L=%d H=%d D=%d T=%d N=%d %s] %sspread rel err %.3g (tol 1e-4)\n", o->name, L, H, D, T, N,
                kvm_dtype_name(dt), form, e);
        if (!(e <= 1e-4)) bad = 1;
        free(sc), free(sg);
    }
    cc.q8 = gc.q8 = 0;
    /* diff (anchor materialization): each use on both, against each other */
    for (int use = 0; use < 3; use++) {
        float *yc = run_diff(&cc, k, use, -(T + 41)), *yg = run_diff(&gc, k, use, -(T + 41));
        double e = rel_err_ff(yg, yc, (size_t)(L - diff_l0(use)) * 2 * H * diff_rows(k, use) * D);
        fprintf(stderr, "  [%s L=%d H=%d D=%d T=%d %s] kvcomm_diff use %d rel err %.3g (tol 1e-6)\n", o->name, L, H, D, T,
                kvm_dtype_name(dt), use, e);
        if (!(e <= 1e-6)) bad = 1;
        free(yc), free(yg);
    }
    /* no anchors: copy and re-rotate only (kvm_segment_publish's one op), by a negative shift into frame 0 */
    {
        float *yc = run_apply_n(&cc, k, 0, b[0][3], 0, T, 5, -(T + 3), 0);
        float *yg = run_apply_n(&gc, k, 0, b[0][3], 0, T, 5, -(T + 3), 0);
        double e = rel_err_ff(yg, yc, (size_t)L * 2 * H * T * D);
        fprintf(stderr, "  [%s L=%d H=%d D=%d T=%d %s] apply shift-only rel err %.3g (tol %g)\n", o->name, L, H, D, T,
                kvm_dtype_name(dt), e, tol);
        if (!(e <= tol)) bad = 1;
        free(yc), free(yg);
    }
    /* q8 deltas: diff writes the same bytes on both */
    for (int use = 1; use < 3; use++) {
        char *rc_ = NULL, *rg_ = NULL;
        float *yc = run_diff_q8(&cc, k, use, -(T + 41), 1, &rc_), *yg = run_diff_q8(&gc, k, use, -(T + 41), 1, &rg_);
        const size_t qb = kvm_q8_bytes((size_t)(L - 1) * 2 * H * diff_rows(k, use) * D, D);
        size_t differ = 0;
        for (size_t i = 0; i < qb; i++) differ += rc_[i] != rg_[i];
        fprintf(stderr, "  [%s L=%d H=%d D=%d T=%d %s] q8 kvcomm_diff use %d: %zu of %zu bytes differ (want 0)\n", o->name,
                L, H, D, T, kvm_dtype_name(dt), use, differ, qb);
        if (differ) bad = 1;
        free(yc), free(yg), free(rc_), free(rg_);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 5; j++) free(b[i][j]);
    dev_free(&cc, k), dev_free(&gc, k);
    case_free(k);
    assert_false(bad);
}

static void test_backend_ops_match_the_cpu_reference(void **st) {
    (void)st;
    const kvm_ops_t *o = gpu_ops_or_skip();
    if (!o) {
        skip();
        return;
    }
    const int Tn1[3] = {20, 27, 33}, Tn2[5] = {100, 100, 131, 100, 164};
    check_backend_case(o, 3, 2, 16, 20, 13, 3, Tn1, KVM_F32, KVM_ROPE_HALF);
    check_backend_case(o, 3, 2, 32, 20, 13, 3, Tn1, KVM_BF16, KVM_ROPE_INTERLEAVED);
    check_backend_case(o, 4, 2, 128, 100, 77, 5, Tn2, KVM_BF16, KVM_ROPE_HALF);
    check_backend_case(o, 4, 2, 128, 100, 77, 5, Tn2, KVM_F32, KVM_ROPE_HALF);
    check_backend_case(o, 2, 3, 64, 45, 30, 5, Tn2, KVM_F16, KVM_ROPE_INTERLEAVED);
    /* several row chunks of the one-pass distance kernel (128 rows of bf16 / 64 of fp32 at D=128), a partial last
     * chunk, and anchors with different tail offsets (a different rotation per anchor) */
    const int Tn3[4] = {300, 333, 300, 517};
    check_backend_case(o, 2, 2, 128, 300, 40, 4, Tn3, KVM_BF16, KVM_ROPE_HALF);
    check_backend_case(o, 2, 2, 128, 300, 40, 4, Tn3, KVM_F32, KVM_ROPE_INTERLEAVED);
    const int Tn4[4] = {1100, 1100, 1203, 1100}; /* D = 16: 1024 rows per chunk */
    check_backend_case(o, 2, 1, 16, 1100, 20, 4, Tn4, KVM_F32, KVM_ROPE_HALF);
    /* head_dim 48 (miniqwen3-6m): 3 chunks of 16 on 4 lanes per row, one lane idle; 80 = 5 chunks on 8 lanes */
    check_backend_case(o, 3, 2, 48, 100, 77, 5, Tn2, KVM_BF16, KVM_ROPE_HALF);
    check_backend_case(o, 2, 2, 48, 300, 40, 4, Tn3, KVM_F32, KVM_ROPE_INTERLEAVED);
    check_backend_case(o, 2, 3, 80, 45, 30, 5, Tn2, KVM_F16, KVM_ROPE_HALF);
}

/* ---- destination block tables ------------------------------------------------------------------------------ */

/* Blocks the ops bench's destination table needs: it scatters the placeholder rows [0, T) at positions
 * [pos0, pos0 + T) and the text rows [0, S - 1) right after them (the last prompt token is recomputed).
 * The first version of the bench sized the table (T + S) / KVM_KV_BLOCK + 2 = 98 blocks, one short for
 * pos0 = 37, T = 1024, S = 512: the last 4 text rows landed on entry 98, past the table, so the apply kernel
 * took a block id from uninitialized device memory and wrote wherever it pointed (the KVM_EDEVICE at the
 * N = 20 bench). */
static int bench_dst_blocks(int pos0, int T, int S) { return (pos0 + T + (S - 1) - 1) / KVM_KV_BLOCK + 1; }

static void test_bench_block_table_covers_the_last_scattered_row(void **st) {
    (void)st;
    const int pos[4] = {0, 15, 16, 37}, TS[3][2] = {{1024, 512}, {1000, 17}, {1, 2}};
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 3; j++) {
            const int T = TS[j][0], S = TS[j][1], last = pos[i] + T + S - 2, nb = bench_dst_blocks(pos[i], T, S);
            assert_true(last / KVM_KV_BLOCK < nb);        /* covered */
            assert_true(last / KVM_KV_BLOCK == nb - 1);   /* and tight */
        }
    assert_true((37 + 1024 + 512 - 2) / KVM_KV_BLOCK >= (1024 + 512) / KVM_KV_BLOCK + 2); /* the old size was short */
}

/* kvcomm_apply with dst_n_blocks refuses a piece whose last position is past the table, and writes nothing */
static void check_short_table_refused(const kvm_ops_t *o) {
    const int Tn[2] = {20, 20};
    kcase_t *k = case_make(2, 2, 16, 20, 13, 2, Tn, KVM_F32, KVM_ROPE_HALF);
    devcase_t dc = dev_make(o, k);
    const size_t pool_bytes = (size_t)k->n_blocks * k->L * 2 * k->H * KVM_KV_BLOCK * k->D * esz(k->dt);
    void *before = malloc(pool_bytes), *after = malloc(pool_bytes);
    assert_int_equal(o->d2h(before, dc.pool, pool_bytes), 0);
    float *w = calloc((size_t)2 * k->N * k->T, sizeof(float));
    float *dw = up(o, w, (size_t)2 * k->N * k->T * 4);
    kvm_kv_view_t dv[2];
    for (int n = 0; n < 2; n++) dv[n] = (kvm_kv_view_t){.data = dc.dphb[n], .rows = k->Tn[n], .l0 = 1};
    /* rows [0, 20) at positions [7, 27): blocks 0 and 1 */
    kvm_kvcomm_apply_args_t a = {.g = case_geom(k), .src = {.data = dc.pool, .blocks = dc.xblk, .start = k->xs},
                                 .n = 2, .delta = dv, .w = dw, .w_rows = k->T, .r0 = 0, .r1 = 20,
                                 .dst_kv = dc.pool, .dst_blocks = dc.oblk, .dst_pos = 7, .inv_freq = dc.inv_freq,
                                 .layout = k->layout, .dst_n_blocks = 1};
    assert_int_equal(o->kvcomm_apply(&a), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "block 1"));
    assert_int_equal(o->sync(), 0);
    assert_int_equal(o->d2h(after, dc.pool, pool_bytes), 0);
    assert_memory_equal(before, after, pool_bytes);
    a.dst_n_blocks = 2;
    assert_int_equal(o->kvcomm_apply(&a), 0);
    assert_int_equal(o->sync(), 0);
    o->free(dw);
    free(w), free(before), free(after);
    dev_free(&dc, k);
    case_free(k);
}

static void test_apply_refuses_a_destination_past_its_block_table(void **st) {
    (void)st;
    check_short_table_refused(kvm_ops_cpu());
}

static void test_backend_apply_refuses_a_destination_past_its_block_table(void **st) {
    (void)st;
    const kvm_ops_t *o = gpu_ops_or_skip();
    if (!o) {
        skip();
        return;
    }
    check_short_table_refused(o);
}

/* ---- 3. timing at Llama-3.1-8B shapes --------------------------------------------------------------------- */

static int cmpd(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void test_bench_llama_shapes_when_asked(void **st) {
    (void)st;
    const char *e = getenv("KVM_KVCOMM_OPS_BENCH");
    if (!e || !*e || !strcmp(e, "0")) {
        fprintf(stderr, "SKIPPED: set KVM_KVCOMM_OPS_BENCH=1 to time the KVCOMM ops at Llama-3.1-8B shapes\n");
        skip();
        return;
    }
    const kvm_ops_t *o = gpu_ops_or_skip();
    if (!o || !o->event_record) {
        skip();
        return;
    }
    const int L = 32, H = 8, D = 128, T = 1024, S = 512;
    int N = getenv("KVM_KVCOMM_OPS_BENCH_N") ? atoi(getenv("KVM_KVCOMM_OPS_BENCH_N")) : 20;
    if (N < 1 || N > KVM_KVCOMM_MAX_ANCHORS) N = 20;
    const kvm_kv_geom_t g = {.n_layers = L, .n_kv_heads = H, .head_dim = D, .dtype = KVM_BF16};
    const size_t row = (size_t)2 * H * D * 2; /* bytes per token per layer, K+V bf16 */
    const size_t tok = row * L;                /* 128 KiB */
    /* 2 rotating input sets (each far larger than L2) of: candidate (contiguous), N bases, N ph deltas, N pf deltas, P */
    const int NSET = 2;
    void *X[2], *P[2], *A[2][KVM_KVCOMM_MAX_ANCHORS], *DPH[2][KVM_KVCOMM_MAX_ANCHORS], *DPF[2][KVM_KVCOMM_MAX_ANCHORS];
    for (int s = 0; s < NSET; s++) {
        X[s] = o->alloc(tok * T), P[s] = o->alloc(tok * S);
        assert_non_null(X[s]), assert_non_null(P[s]);
        assert_int_equal(o->fill_synthetic ? o->fill_synthetic(X[s], KVM_BF16, tok * T / 2, 11 + s, 1.0f, 0.f) : 0, 0);
        assert_int_equal(o->fill_synthetic ? o->fill_synthetic(P[s], KVM_BF16, tok * S / 2, 21 + s, 1.0f, 0.f) : 0, 0);
        for (int n = 0; n < N; n++) {
            A[s][n] = o->alloc(tok * T);
            DPH[s][n] = o->alloc(tok * T / L * (L - 1));
            DPF[s][n] = o->alloc(tok * S / L * (L - 1));
            assert_true(A[s][n] && DPH[s][n] && DPF[s][n]);
            o->fill_synthetic(A[s][n], KVM_BF16, tok * T / 2, 100 + n + 1000 * s, 1.0f, 0.f);
            o->fill_synthetic(DPH[s][n], KVM_BF16, tok * T / L * (L - 1) / 2, 200 + n + 1000 * s, 0.1f, 0.f);
            o->fill_synthetic(DPF[s][n], KVM_BF16, tok * S / L * (L - 1) / 2, 300 + n + 1000 * s, 0.1f, 0.f);
        }
    }
    const int pos0 = 37, nb = bench_dst_blocks(pos0, T, S);
    size_t pool_bytes = (size_t)nb * KVM_KV_BLOCK * tok;
    void *pool = o->alloc(pool_bytes);
    int32_t *hb = malloc((size_t)nb * 4);
    for (int i = 0; i < nb; i++) hb[i] = nb - 1 - i;
    int32_t *blk = up(o, hb, (size_t)nb * 4);
    float invf[64];
    for (int j = 0; j < 64; j++) invf[j] = (float)pow(500000.0, -2.0 * j / D);
    float *dinv = up(o, invf, sizeof invf);
    const size_t nph = (size_t)2 * N * T, npf = (size_t)2 * N * L * H * D;
    float *d_ph = o->alloc(nph * 4), *d_pf = o->alloc(npf * 4), *d_pred = o->alloc(64 * 4);
    float *w_ph = o->alloc(nph * 4), *w_pf = o->alloc(npf * 4);
    int rows[KVM_KVCOMM_MAX_ANCHORS];
    for (int n = 0; n < N; n++) rows[n] = T;
    const int reps = 20, warm = 3;
    double t_d[20], t_dist[20], t_all[20];
    for (int it = 0; it < warm + reps; it++) {
        int s = it % NSET;
        kvm_kv_view_t av[KVM_KVCOMM_MAX_ANCHORS], dv[KVM_KVCOMM_MAX_ANCHORS], fv[KVM_KVCOMM_MAX_ANCHORS];
        for (int n = 0; n < N; n++) {
            av[n] = (kvm_kv_view_t){.data = A[s][n], .rows = T};
            dv[n] = (kvm_kv_view_t){.data = DPH[s][n], .rows = T, .l0 = 1};
            fv[n] = (kvm_kv_view_t){.data = DPF[s][n], .rows = S, .l0 = 1};
        }
        kvm_kvcomm_dist_args_t da = {.g = g, .x = {.data = X[s], .rows = T}, .T = T, .n = N, .a = av, .a_rows = rows,
                                     .want = KVM_KVCOMM_WANT_PH | KVM_KVCOMM_WANT_PF, .rotate_tail = 1,
                                     .inv_freq = dinv, .layout = KVM_ROPE_HALF, .d_ph = d_ph, .d_pf = d_pf, .d_pred = d_pred};
        kvm_kvcomm_apply_args_t aph = {.g = g, .src = {.data = X[s], .rows = T}, .n = N, .delta = dv, .w = w_ph,
                                       .per_channel = 0, .w_rows = T, .r0 = 0, .r1 = T, .dst_kv = pool,
                                       .dst_blocks = blk, .dst_pos = pos0, .shift = pos0, .inv_freq = dinv,
                                       .layout = KVM_ROPE_HALF, .dst_n_blocks = nb};
        kvm_kvcomm_apply_args_t apf = aph;
        apf.src = (kvm_kv_view_t){.data = P[s], .rows = S};
        apf.delta = fv;
        apf.w = w_pf;
        apf.per_channel = 1;
        apf.r1 = S - 1; /* the last prompt token is recomputed */
        apf.dst_pos = pos0 + T;
        apf.shift = pos0 + T;
        void *e0 = o->event_record();
        assert_int_equal(o->kvcomm_dist(&da), 0);
        void *ed = o->event_record();
        assert_int_equal(o->kvcomm_softmax(w_ph, d_ph, N, (size_t)T, 0), 0);
        assert_int_equal(o->kvcomm_softmax(w_ph + (size_t)N * T, d_ph + (size_t)N * T, N, (size_t)T, 0), 0);
        assert_int_equal(o->kvcomm_softmax(w_pf, d_pf, N, npf / 2 / N, 0), 0);
        assert_int_equal(o->kvcomm_softmax(w_pf + npf / 2, d_pf + npf / 2, N, npf / 2 / N, 0), 0);
        void *e1 = o->event_record();
        assert_int_equal(o->kvcomm_apply(&aph), 0);
        assert_int_equal(o->kvcomm_apply(&apf), 0);
        void *e2 = o->event_record();
        int rc = o->sync();
        if (rc) fprintf(stderr, "iteration %d: %s\n", it, kvm_errmsg());
        assert_int_equal(rc, 0);
        if (it >= warm) {
            t_d[it - warm] = o->event_elapsed_ms(e0, ed);
            t_dist[it - warm] = o->event_elapsed_ms(e0, e1);
            t_all[it - warm] = o->event_elapsed_ms(e0, e2);
        }
        o->event_free(e0), o->event_free(ed), o->event_free(e1), o->event_free(e2);
    }
    qsort(t_d, reps, sizeof(double), cmpd);
    qsort(t_dist, reps, sizeof(double), cmpd);
    qsort(t_all, reps, sizeof(double), cmpd);
    /* the device's copy bandwidth in this process (read + write bytes of a 128 MiB d2d copy, median of 10) */
    double t_cp[10];
    for (int it = 0; it < 12; it++) {
        void *c0 = o->event_record();
        assert_int_equal(o->d2d(A[1][0], A[0][0], tok * T), 0);
        void *c1 = o->event_record();
        assert_int_equal(o->sync(), 0);
        if (it >= 2) t_cp[it - 2] = o->event_elapsed_ms(c0, c1);
        o->event_free(c0), o->event_free(c1);
    }
    qsort(t_cp, 10, sizeof(double), cmpd);
    const double bw_meas = 2.0 * tok * T / (t_cp[5] * 1e-3) / 1e12;
    /* floor (perf.md §4): weights read candidate + N bases over T; apply reads base + N deltas (layers 1..L-1)
     * and writes the KV, for T + S - 1 rows */
    double bw = getenv("KVM_BW_TBS") ? atof(getenv("KVM_BW_TBS")) : 2.99;
    double b_dist = (double)(N + 1) * T * tok;
    double b_apply = (double)(T + S - 1) * (2.0 * tok + N * (double)tok * (L - 1) / L);
    double f_dist = b_dist / (bw * 1e12) * 1e3, f_all = (b_dist + b_apply) / (bw * 1e12) * 1e3;
    double per1k = 1024.0 / (T + S - 1);
    printf("kvcomm_ops bench (%s, bf16, L=%d H=%d D=%d, T=%d S=%d N=%d, %d reps, median [p10 p90])\n", o->name, L, H, D,
           T, S, N, reps);
    printf("  device copy bandwidth measured here: %.3f TB/s (read + write); floors below at %.2f TB/s\n", bw_meas, bw);
    printf("  dist alone: %.3f ms [%.3f %.3f] (%s kernel)\n", t_d[reps / 2], t_d[2], t_d[reps - 3],
           getenv("KVM_KVCOMM_DIST") && !strcmp(getenv("KVM_KVCOMM_DIST"), "v1") ? "v1" : "v2");
    printf("  weights (dist+softmax): %.3f ms [%.3f %.3f]  floor %.3f ms  ratio %.2f\n", t_dist[reps / 2], t_dist[2],
           t_dist[reps - 3], f_dist, t_dist[reps / 2] / f_dist);
    double ta = t_all[reps / 2] - t_dist[reps / 2];
    printf("  apply (ph+pf, fused offset+shift+scatter): %.3f ms  floor %.3f ms  ratio %.2f\n", ta, f_all - f_dist,
           ta / (f_all - f_dist));
    printf("  total: %.3f ms [%.3f %.3f]  floor %.3f ms  ratio %.2f  (GB moved %.2f at %.2f TB/s)\n", t_all[reps / 2],
           t_all[2], t_all[reps - 3], f_all, t_all[reps / 2] / f_all, (b_dist + b_apply) / 1e9, bw);
    printf("  per 1K tokens: %.3f ms, floor %.3f ms (at the measured copy bandwidth: floor %.3f ms, ratio %.2f)\n",
           t_all[reps / 2] * per1k, f_all * per1k, f_all * per1k * bw / bw_meas, t_all[reps / 2] / (f_all * bw / bw_meas));
    printf("KVCOMM_OPS_JSON {\"device\":\"%s\",\"N\":%d,\"T\":%d,\"S\":%d,\"dist_ms\":%.4f,\"weights_ms\":%.4f,"
           "\"total_ms\":%.4f,\"floor_ms\":%.4f,\"weights_floor_ms\":%.4f,\"ratio\":%.3f,\"bw_tbs\":%.3f,"
           "\"copy_bw_tbs\":%.3f}\n",
           o->name, N, T, S, t_d[reps / 2], t_dist[reps / 2], t_all[reps / 2], f_all, f_dist, t_all[reps / 2] / f_all, bw,
           bw_meas);
    for (int s = 0; s < NSET; s++) {
        o->free(X[s]), o->free(P[s]);
        for (int n = 0; n < N; n++) o->free(A[s][n]), o->free(DPH[s][n]), o->free(DPF[s][n]);
    }
    o->free(pool), o->free(blk), o->free(dinv), o->free(d_ph), o->free(d_pf), o->free(d_pred), o->free(w_ph), o->free(w_pf);
    free(hb);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cpu_ops_match_the_formulas_fp32_rotate_half),
        cmocka_unit_test(test_cpu_ops_match_the_formulas_bf16_interleaved),
        cmocka_unit_test(test_cpu_ops_match_the_formulas_fp32_interleaved_odd_head_dim),
        cmocka_unit_test(test_nearest_softmax_is_one_hot_on_the_first_minimum),
        cmocka_unit_test(test_cpu_ops_read_and_write_q8_deltas),
        cmocka_unit_test(test_q8_views_only_for_contiguous_deltas),
        cmocka_unit_test(test_q8_encoding_of_edge_rows),
        cmocka_unit_test(test_bench_block_table_covers_the_last_scattered_row),
        cmocka_unit_test(test_apply_refuses_a_destination_past_its_block_table),
        cmocka_unit_test(test_backend_ops_match_the_cpu_reference),
        cmocka_unit_test(test_backend_apply_refuses_a_destination_past_its_block_table),
        cmocka_unit_test(test_bench_llama_shapes_when_asked),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
