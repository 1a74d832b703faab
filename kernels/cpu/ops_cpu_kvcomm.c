/* ops_cpu_kvcomm.c - the KVCOMM ops of ops.h on the CPU backend (kvcomm_dist, kvcomm_softmax, kvcomm_apply,
 * kvcomm_spread; kvcomm.md §3.6, §3.11): KVCOMM's production path on the CPU (runtime/comm/kvcomm_dev.c) and the
 * reference the CUDA kernels (kernels/cuda/kvcomm_kernels.cu) are tested against. Straightforward loops in
 * fp64/fp32 exactly as the contracts in ops.h read, parallel (kvm_cpu_parallel_for) above 2^18 elements. */
#include "../ops.h"

#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "../../runtime/core/core.h"
#include "cpu_pool.h"

int kvm_cpu_kvcomm_dist(const kvm_kvcomm_dist_args_t *a);
int kvm_cpu_kvcomm_softmax(float *w, const float *d, int n, size_t cols, int mode);
int kvm_cpu_kvcomm_apply(const kvm_kvcomm_apply_args_t *a);
int kvm_cpu_kvcomm_spread(const kvm_kvcomm_spread_args_t *a);
int kvm_cpu_kvcomm_diff(const kvm_kvcomm_diff_args_t *a);

/* Element index of (l, kv, h, r, d = 0) in a view (ops.h, kvm_kv_view_t). */
static size_t view_idx(const kvm_kv_geom_t *g, const kvm_kv_view_t *v, int l, int kv, int h, int r) {
    const int L = g->n_layers, H = g->n_kv_heads, D = g->head_dim;
    if (v->blocks) {
        int p = v->start + r;
        size_t b = (size_t)v->blocks[p / KVM_KV_BLOCK];
        return ((((b * L + l) * 2 + kv) * H + h) * KVM_KV_BLOCK + (size_t)(p % KVM_KV_BLOCK)) * D;
    }
    return (((((size_t)(l - v->l0)) * 2 + kv) * H + h) * (size_t)v->rows + (size_t)r) * D;
}

static void load_row(float *dst, const void *base, kvm_dtype_t dt, size_t idx, int D) {
    if (dt == KVM_F32) {
        memcpy(dst, (const float *)base + idx, (size_t)D * sizeof(float));
        return;
    }
    const uint16_t *s = (const uint16_t *)base + idx;
    for (int i = 0; i < D; i++) dst[i] = dt == KVM_BF16 ? kvm_bf16_to_f32(s[i]) : kvm_f16_to_f32(s[i]);
}

/* Row (l, kv, h, r) as fp32 for reading: the row itself in an fp32 view (no copy), else widened into buf. */
static const float *row_f32(float *buf, const void *base, kvm_dtype_t dt, size_t idx, int D) {
    if (dt == KVM_F32) return (const float *)base + idx;
    load_row(buf, base, dt, idx, D);
    return buf;
}

/* Row (l, kv, h, r) of view v as fp32 (ops.h: the geometry's dtype, or q8 when v->scale is set); see row_f32. */
static const float *view_row(float *buf, const kvm_kv_geom_t *g, const kvm_kv_view_t *v, int l, int kv, int h, int r) {
    const int D = g->head_dim;
    const size_t idx = view_idx(g, v, l, kv, h, r);
    if (!v->scale) return row_f32(buf, v->data, g->dtype, idx, D);
    const int8_t *q = (const int8_t *)v->data + idx;
    const float s = v->scale[idx / (size_t)D];
    for (int d = 0; d < D; d++) buf[d] = (float)q[d] * s;
    return buf;
}

static void store_row(void *base, kvm_dtype_t dt, size_t idx, const float *src, int D) {
    if (dt == KVM_F32) {
        memcpy((float *)base + idx, src, (size_t)D * sizeof(float));
        return;
    }
    uint16_t *d = (uint16_t *)base + idx;
    for (int i = 0; i < D; i++) d[i] = dt == KVM_BF16 ? kvm_f32_to_bf16(src[i]) : kvm_f32_to_f16(src[i]);
}

/* below this many elements a loop runs on one thread: for small models a parallel region costs more than the work,
 * especially on a loaded machine */
#define KVCOMM_PAR_MIN ((size_t)1 << 18)

/* cos/sin of a rotation by delta positions (cs[0..D/2) cos, cs[D/2..D) sin): angle in fp64 reduced, cos/sin rounded to
 * fp32 (ops.h rope); computed once per call or anchor, since every row of it moves by the same delta */
static void rot_table(float *cs, int D, int32_t delta, const float *inv_freq) {
    for (int j = 0; j < D / 2; j++) {
        double ang = kvm_rope_angle((double)delta, inv_freq[j]);
        cs[j] = (float)cos(ang);
        cs[D / 2 + j] = (float)sin(ang);
    }
}

/* rotation of one head row with the table of rot_table */
static void rotate_row(float *v, int D, const float *cs, kvm_rope_layout_t layout) {
    const int half = D / 2;
    for (int j = 0; j < half; j++) {
        float c = cs[j], s = cs[half + j];
        float *x = layout == KVM_ROPE_HALF ? &v[j] : &v[2 * j];
        float *y = layout == KVM_ROPE_HALF ? &v[j + half] : &v[2 * j + 1];
        float a = *x, b = *y;
        *x = a * c - b * s;
        *y = a * s + b * c;
    }
}

static int check_geom(const kvm_kv_geom_t *g, const char *op) {
    if (g->n_layers <= 0 || g->n_kv_heads <= 0 || g->head_dim <= 0 || g->head_dim % 2)
        return kvm_seterr(KVM_EINVAL, "%s: bad geometry L=%d H=%d D=%d", op, g->n_layers, g->n_kv_heads, g->head_dim);
    return 0;
}

/* views in the geometry's dtype only (q8 is for anchor deltas), and q8 views contiguous */
static int check_q8(const kvm_kv_view_t *v, bool q8_ok, const char *op, const char *what) {
    if (v->scale && (!q8_ok || v->blocks))
        return kvm_seterr(KVM_EINVAL, "%s: %s is a %s q8 view (only contiguous anchor deltas may be q8)", op, what,
                          v->blocks ? "paged" : "contiguous");
    return 0;
}

/* the distances of anchor n (kvcomm_dist); x, y, cs: D floats, ss: D doubles of scratch */
static void dist_anchor(const kvm_kvcomm_dist_args_t *a, int n, float *x, float *y, float *cs, double *ss) {
    const kvm_kv_geom_t *g = &a->g;
    const int L = g->n_layers, H = g->n_kv_heads, D = g->head_dim, T = a->T, N = a->n;
    const kvm_kv_view_t *A = &a->a[n];
    const int off = a->a_rows[n] - T;
    if ((a->want & KVM_KVCOMM_WANT_PF) && off && a->rotate_tail) rot_table(cs, D, -off, a->inv_freq);
    if (a->want & KVM_KVCOMM_WANT_PH)
        for (int kv = 0; kv < 2; kv++)
            for (int t = 0; t < T; t++) {
                double acc = 0;
                for (int l = 0; l < L; l++)
                    for (int h = 0; h < H; h++) {
                        const float *xr = row_f32(x, a->x.data, g->dtype, view_idx(g, &a->x, l, kv, h, t), D);
                        const float *yr = row_f32(y, A->data, g->dtype, view_idx(g, A, l, kv, h, t), D);
                        for (int d = 0; d < D; d++) acc += fabs((double)xr[d] - (double)yr[d]);
                    }
                a->d_ph[((size_t)kv * N + n) * T + t] = (float)(acc / ((double)L * H * D));
            }
    if (a->want & KVM_KVCOMM_WANT_PF)
        for (int kv = 0; kv < 2; kv++)
            for (int l = 0; l < L; l++)
                for (int h = 0; h < H; h++) {
                    for (int d = 0; d < D; d++) ss[d] = 0;
                    const bool rot = kv == 0 && off && a->rotate_tail;
                    for (int t = 0; t < T; t++) {
                        const float *xr = row_f32(x, a->x.data, g->dtype, view_idx(g, &a->x, l, kv, h, t), D);
                        const float *yr = y;
                        if (rot) { /* rotated in a copy */
                            load_row(y, A->data, g->dtype, view_idx(g, A, l, kv, h, off + t), D);
                            rotate_row(y, D, cs, a->layout);
                        } else {
                            yr = row_f32(y, A->data, g->dtype, view_idx(g, A, l, kv, h, off + t), D);
                        }
                        for (int d = 0; d < D; d++) {
                            double df = (double)xr[d] - (double)yr[d];
                            ss[d] += df * df;
                        }
                    }
                    for (int d = 0; d < D; d++)
                        a->d_pf[((((size_t)kv * N + n) * L + l) * H + h) * D + d] = (float)sqrt(ss[d]);
                }
    if (a->want & KVM_KVCOMM_WANT_PRED) {
        double acc = 0;
        for (int l = 0; l < L; l++)
            for (int h = 0; h < H; h++)
                for (int t = 0; t < T; t++) {
                    const float *xr = row_f32(x, a->x.data, g->dtype, view_idx(g, &a->x, l, 1, h, t), D);
                    const float *yr = row_f32(y, A->data, g->dtype, view_idx(g, A, l, 1, h, t), D);
                    for (int d = 0; d < D; d++) {
                        double df = (double)xr[d] - (double)yr[d];
                        acc += df * df;
                    }
                }
        a->d_pred[n] = (float)sqrt(acc);
    }
}

typedef struct {
    const kvm_kvcomm_dist_args_t *a;
    _Atomic int fail;
} dist_task_t;

static void dist_task(void *ctx, int i0, int i1, int tid) {
    dist_task_t *t = ctx;
    const int D = t->a->g.head_dim;
    float *x = malloc((size_t)D * sizeof(float)), *y = malloc((size_t)D * sizeof(float)), *cs = malloc((size_t)D * sizeof(float));
    double *ss = malloc((size_t)D * sizeof(double));
    if (!x || !y || !ss || !cs) atomic_store(&t->fail, 1);
    else
        for (int n = i0; n < i1; n++) dist_anchor(t->a, n, x, y, cs, ss);
    free(x), free(y), free(ss), free(cs);
}

/* kvcomm_dist (contract in ops.h). fp64 sums; O(N * L * H * T * D). */
int kvm_cpu_kvcomm_dist(const kvm_kvcomm_dist_args_t *a) {
    if (!a) return kvm_seterr(KVM_EINVAL, "kvcomm_dist: no arguments");
    int rc = check_geom(&a->g, "kvcomm_dist");
    if (rc) return rc;
    const kvm_kv_geom_t *g = &a->g;
    const int L = g->n_layers, H = g->n_kv_heads, D = g->head_dim, T = a->T, N = a->n;
    if (T <= 0 || N < 0) return kvm_seterr(KVM_EINVAL, "kvcomm_dist: T=%d, N=%d", T, N);
    for (int n = 0; n < N; n++)
        if (a->a_rows[n] < T)
            return kvm_seterr(KVM_EINVAL, "kvcomm_dist: anchor %d has %d rows, fewer than T=%d", n, a->a_rows[n], T);
    if ((a->want & KVM_KVCOMM_WANT_PF) && a->rotate_tail && !a->inv_freq)
        return kvm_seterr(KVM_EINVAL, "kvcomm_dist: rotate_tail needs inv_freq");
    if ((rc = check_q8(&a->x, false, "kvcomm_dist", "the candidate"))) return rc;
    for (int n = 0; n < N; n++)
        if ((rc = check_q8(&a->a[n], false, "kvcomm_dist", "an anchor"))) return rc;
    const bool par = (size_t)N * L * 2 * H * T * D > KVCOMM_PAR_MIN;
    dist_task_t t = {.a = a};
    kvm_cpu_parallel_for(N, par ? 1 : N, dist_task, &t);
    if (atomic_load(&t.fail)) return kvm_seterr(KVM_ENOMEM, "kvcomm_dist: out of host memory");
    return 0;
}

/* kvcomm_softmax (contract in ops.h). */
int kvm_cpu_kvcomm_softmax(float *w, const float *d, int n, size_t cols, int mode) {
    if (n <= 0) return kvm_seterr(KVM_EINVAL, "kvcomm_softmax: %d anchors", n);
    for (size_t c = 0; c < cols; c++) {
        if (mode == KVM_KVCOMM_NEAREST) {
            int best = 0;
            for (int i = 1; i < n; i++)
                if (d[(size_t)i * cols + c] < d[(size_t)best * cols + c]) best = i;
            for (int i = 0; i < n; i++) w[(size_t)i * cols + c] = i == best ? 1.0f : 0.0f;
            continue;
        }
        double mn = d[c];
        for (int i = 1; i < n; i++)
            if (d[(size_t)i * cols + c] < mn) mn = d[(size_t)i * cols + c];
        double sum = 0;
        for (int i = 0; i < n; i++) sum += exp(-((double)d[(size_t)i * cols + c] - mn));
        for (int i = 0; i < n; i++) w[(size_t)i * cols + c] = (float)(exp(-((double)d[(size_t)i * cols + c] - mn)) / sum);
    }
    return 0;
}

typedef struct {
    const kvm_kvcomm_apply_args_t *a;
    kvm_kv_view_t dst; /* the destination as a view: row r at position dst_pos + (r - r0) = dst.start + r */
    const float *cs;   /* the rotation of a shift, or NULL */
    _Atomic int fail;
} apply_task_t;

/* kvcomm_apply over the (layer, head) pairs [i0, i1) */
static void apply_task(void *ctx, int i0, int i1, int tid) {
    apply_task_t *t = ctx;
    const kvm_kvcomm_apply_args_t *a = t->a;
    const kvm_kv_geom_t *g = &a->g;
    const int L = g->n_layers, H = g->n_kv_heads, D = g->head_dim, N = a->n;
    float *y = malloc((size_t)D * sizeof(float)), *dl = malloc((size_t)D * sizeof(float));
    if (!y || !dl) {
        free(y), free(dl);
        atomic_store(&t->fail, 1);
        return;
    }
    for (int i = i0; i < i1; i++) {
        const int l = i / H, h = i % H;
        for (int kv = 0; kv < 2; kv++)
            for (int r = a->r0; r < a->r1; r++) {
                load_row(y, a->src.data, g->dtype, view_idx(g, &a->src, l, kv, h, r), D);
                for (int j = 0; l >= 1 && j < N; j++) {
                    const float *dr = view_row(dl, g, &a->delta[j], l, kv, h, r);
                    if (a->per_channel) {
                        const float *w = a->w + ((((size_t)kv * N + j) * L + l) * H + h) * D;
                        for (int d = 0; d < D; d++) y[d] += w[d] * dr[d];
                    } else {
                        float w = a->w[((size_t)kv * N + j) * a->w_rows + r];
                        for (int d = 0; d < D; d++) y[d] += w * dr[d];
                    }
                }
                if (kv == 0 && t->cs) rotate_row(y, D, t->cs, a->layout);
                store_row(a->dst_kv, g->dtype, view_idx(g, &t->dst, l, kv, h, r), y, D);
            }
    }
    free(y), free(dl);
}

/* kvcomm_apply (contract in ops.h). */
int kvm_cpu_kvcomm_apply(const kvm_kvcomm_apply_args_t *a) {
    if (!a) return kvm_seterr(KVM_EINVAL, "kvcomm_apply: no arguments");
    int rc = check_geom(&a->g, "kvcomm_apply");
    if (rc) return rc;
    const kvm_kv_geom_t *g = &a->g;
    const int L = g->n_layers, H = g->n_kv_heads, D = g->head_dim, N = a->n;
    if (a->r0 < 0 || a->r1 < a->r0 || N < 0 || (N > 0 && (!a->w || !a->delta)) || !a->dst_blocks || !a->dst_kv)
        return kvm_seterr(KVM_EINVAL, "kvcomm_apply: rows [%d, %d), N=%d", a->r0, a->r1, N);
    if (a->shift && !a->inv_freq) return kvm_seterr(KVM_EINVAL, "kvcomm_apply: a shift needs inv_freq");
    if ((rc = check_q8(&a->src, false, "kvcomm_apply", "the source"))) return rc;
    for (int j = 0; j < N; j++)
        if ((rc = check_q8(&a->delta[j], true, "kvcomm_apply", "a delta"))) return rc;
    if (a->dst_n_blocks > 0 && a->r1 > a->r0 && (a->dst_pos + (a->r1 - a->r0) - 1) / KVM_KV_BLOCK >= a->dst_n_blocks)
        return kvm_seterr(KVM_EINVAL, "kvcomm_apply: positions [%d, %d) need block %d, the table has %d", a->dst_pos,
                          a->dst_pos + (a->r1 - a->r0), (a->dst_pos + (a->r1 - a->r0) - 1) / KVM_KV_BLOCK, a->dst_n_blocks);
    float *cs = a->shift ? malloc((size_t)D * sizeof(float)) : NULL;
    if (a->shift && !cs) return kvm_seterr(KVM_ENOMEM, "kvcomm_apply: out of host memory");
    if (cs) rot_table(cs, D, a->shift, a->inv_freq);
    apply_task_t t = {.a = a, .dst = {.data = a->dst_kv, .blocks = a->dst_blocks, .start = a->dst_pos - a->r0}, .cs = cs};
    const bool par = (size_t)(N + 1) * L * 2 * H * (size_t)(a->r1 - a->r0) * D > KVCOMM_PAR_MIN;
    kvm_cpu_parallel_for(L * H, par ? 1 : L * H, apply_task, &t);
    free(cs);
    if (atomic_load(&t.fail)) return kvm_seterr(KVM_ENOMEM, "kvcomm_apply: out of host memory");
    return 0;
}

typedef struct {
    const kvm_kvcomm_spread_args_t *a;
    _Atomic int fail;
} spread_task_t;

/* kvcomm_spread over the rows r0 + [i0, i1) */
static void spread_task(void *ctx, int i0, int i1, int tid) {
    spread_task_t *t = ctx;
    const kvm_kvcomm_spread_args_t *a = t->a;
    const kvm_kv_geom_t *g = &a->g;
    const int L = g->n_layers, H = g->n_kv_heads, D = g->head_dim, N = a->n;
    float *x = malloc((size_t)D * sizeof(float)), *dl = malloc((size_t)N * D * sizeof(float));
    if (!x || !dl) {
        free(x), free(dl);
        atomic_store(&t->fail, 1);
        return;
    }
    for (int r = a->r0 + i0; r < a->r0 + i1; r++) {
        double S = 0, X = 0;
        for (int l = 1; l < L; l++)
            for (int kv = 0; kv < 2; kv++)
                for (int h = 0; h < H; h++) {
                    const float *xr = row_f32(x, a->x.data, g->dtype, view_idx(g, &a->x, l, kv, h, r), D);
                    const float *dr[KVM_KVCOMM_MAX_ANCHORS];
                    for (int i = 0; i < N; i++)
                        dr[i] = view_row(dl + (size_t)i * D, g, &a->delta[i], l, kv, h, r);
                    for (int d = 0; d < D; d++) {
                        float est = 0;
                        for (int i = 0; i < N; i++) est += a->w[((size_t)kv * N + i) * a->w_rows + r] * dr[i][d];
                        for (int i = 0; i < N; i++) {
                            double e = (double)dr[i][d] - est;
                            S += a->w[((size_t)kv * N + i) * a->w_rows + r] * e * e;
                        }
                        X += (double)xr[d] * xr[d];
                    }
                }
        a->out[r - a->r0] = (float)(S / (X + 1e-30)) + 1e-30f;
    }
    free(x), free(dl);
}

/* kvcomm_spread (contract in ops.h). */
int kvm_cpu_kvcomm_spread(const kvm_kvcomm_spread_args_t *a) {
    if (!a) return kvm_seterr(KVM_EINVAL, "kvcomm_spread: no arguments");
    int rc = check_geom(&a->g, "kvcomm_spread");
    if (rc) return rc;
    const kvm_kv_geom_t *g = &a->g;
    const int L = g->n_layers, H = g->n_kv_heads, D = g->head_dim, N = a->n;
    if (a->r0 < 0 || a->r1 < a->r0 || N < 1 || N > KVM_KVCOMM_MAX_ANCHORS || !a->w || !a->delta || !a->out)
        return kvm_seterr(KVM_EINVAL, "kvcomm_spread: rows [%d, %d), N=%d", a->r0, a->r1, N);
    if ((rc = check_q8(&a->x, false, "kvcomm_spread", "the candidate"))) return rc;
    for (int i = 0; i < N; i++)
        if ((rc = check_q8(&a->delta[i], true, "kvcomm_spread", "a delta"))) return rc;
    const int rows = a->r1 - a->r0;
    const bool par = (size_t)(N + 1) * (L - 1) * 2 * H * (size_t)rows * D > KVCOMM_PAR_MIN;
    spread_task_t t = {.a = a};
    kvm_cpu_parallel_for(rows, par ? 1 : rows, spread_task, &t);
    if (atomic_load(&t.fail)) return kvm_seterr(KVM_ENOMEM, "kvcomm_spread: out of host memory");
    return 0;
}

/* ---- kvcomm_diff (anchor materialization) ------------------------------------------------------------------ */

typedef struct {
    const kvm_kvcomm_diff_args_t *a;
    kvm_kv_view_t out;
    const float *cs;
    _Atomic int fail;
} diff_task_t;

/* kvcomm_diff over the (layer - l0, head) slabs [i0, i1) */
static void diff_task(void *ctx, int i0, int i1, int tid) {
    (void)tid;
    diff_task_t *t = ctx;
    const kvm_kvcomm_diff_args_t *a = t->a;
    const kvm_kv_geom_t *g = &a->g;
    const int H = g->n_kv_heads, D = g->head_dim;
    float *x = malloc((size_t)D * sizeof(float)), *y = malloc((size_t)D * sizeof(float));
    if (!x || !y) {
        free(x), free(y);
        atomic_store(&t->fail, 1);
        return;
    }
    for (int i = i0; i < i1; i++) {
        const int l = a->l0 + i / H, h = i % H;
        for (int kv = 0; kv < 2; kv++)
            for (int r = 0; r < a->n; r++) {
                load_row(x, a->a.data, g->dtype, view_idx(g, &a->a, l, kv, h, r), D);
                if (kv == 0 && t->cs) rotate_row(x, D, t->cs, a->layout);
                if (a->b.data) {
                    load_row(y, a->b.data, g->dtype, view_idx(g, &a->b, l, kv, h, r), D);
                    for (int d = 0; d < D; d++) x[d] -= y[d];
                }
                const size_t o = view_idx(g, &t->out, l, kv, h, r);
                if (a->out_scale) kvm_q8_encode_row((int8_t *)a->out + o, a->out_scale + o / (size_t)D, x, D);
                else store_row(a->out, g->dtype, o, x, D);
            }
    }
    free(x), free(y);
}

int kvm_cpu_kvcomm_diff(const kvm_kvcomm_diff_args_t *a) {
    if (!a) return kvm_seterr(KVM_EINVAL, "kvcomm_diff: no arguments");
    int rc = check_geom(&a->g, "kvcomm_diff");
    if (rc) return rc;
    const kvm_kv_geom_t *g = &a->g;
    const int L = g->n_layers, H = g->n_kv_heads, D = g->head_dim;
    if (a->n < 0 || a->l0 < 0 || a->l0 > 1 || a->l0 >= L || !a->out || !a->a.data)
        return kvm_seterr(KVM_EINVAL, "kvcomm_diff: n=%d l0=%d (L=%d), out %p, a %p", a->n, a->l0, L, a->out, a->a.data);
    if (a->shift && !a->inv_freq) return kvm_seterr(KVM_EINVAL, "kvcomm_diff: a shift needs inv_freq");
    for (int k = 0; k < 2; k++) {
        const kvm_kv_view_t *v = k ? &a->b : &a->a;
        if ((rc = check_q8(v, false, "kvcomm_diff", k ? "view b" : "view a"))) return rc;
        if (v->data && !v->blocks && (v->l0 > a->l0 || v->rows < a->n))
            return kvm_seterr(KVM_EINVAL, "kvcomm_diff: view %c holds layers from %d and %d rows (need %d and %d)",
                              k ? 'b' : 'a', v->l0, v->rows, a->l0, a->n);
    }
    if (!a->n) return 0;
    float *cs = a->shift ? malloc((size_t)D * sizeof(float)) : NULL;
    if (a->shift && !cs) return kvm_seterr(KVM_ENOMEM, "kvcomm_diff: out of host memory");
    if (cs) rot_table(cs, D, a->shift, a->inv_freq);
    diff_task_t t = {.a = a, .out = {.data = a->out, .rows = a->n, .l0 = a->l0}, .cs = cs};
    const int slabs = (L - a->l0) * H;
    const bool par = (size_t)slabs * 2 * (size_t)a->n * D > KVCOMM_PAR_MIN;
    kvm_cpu_parallel_for(slabs, par ? 1 : slabs, diff_task, &t);
    free(cs);
    if (atomic_load(&t.fail)) return kvm_seterr(KVM_ENOMEM, "kvcomm_diff: out of host memory");
    return 0;
}
