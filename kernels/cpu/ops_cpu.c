/* ops_cpu.c - the CPU reference backend. fp32 compute; weights F32/F16/BF16 converted on the fly;
 * parallel over output rows/heads with OpenMP (both cores of the CI machine). */
#include "../ops.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "../../runtime/core/core.h"
#include "../rope.h"

/* ---- memory: plain host memory -------------------------------------------------------------- */

static void *cpu_alloc(size_t n) {
    void *p = aligned_alloc(64, (n + 63) & ~(size_t)63);
    if (!p) kvm_seterr(KVM_ENOMEM, "out of host memory allocating %zu bytes", n);
    return p;
}
static void cpu_free(void *p) { free(p); }
static int cpu_copy(void *dst, const void *src, size_t n) {
    if (n) memmove(dst, src, n);
    return 0;
}
static int cpu_memset0(void *dst, size_t n) {
    if (n) memset(dst, 0, n);
    return 0;
}
static int cpu_sync(void) { return 0; }

/* ---- helpers ---------------------------------------------------------------------------------- */

static inline void row_to_f32(float *dst, const void *src, kvm_dtype_t dt, size_t n) {
    if (dt == KVM_F32) {
        memcpy(dst, src, n * 4);
    } else if (dt == KVM_BF16) {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] = kvm_bf16_to_f32(s[i]);
    } else {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] = kvm_f16_to_f32(s[i]);
    }
}

static inline float dot_f32(const float *a, const float *b, int n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        s0 += a[i] * b[i]; s1 += a[i + 1] * b[i + 1]; s2 += a[i + 2] * b[i + 2]; s3 += a[i + 3] * b[i + 3];
        s4 += a[i + 4] * b[i + 4]; s5 += a[i + 5] * b[i + 5]; s6 += a[i + 6] * b[i + 6]; s7 += a[i + 7] * b[i + 7];
    }
    float s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* ---- ops -------------------------------------------------------------------------------------- */

static void cpu_embed(float *out, const void *table, kvm_dtype_t dt, const int32_t *ids, int n, int dim) {
    size_t es = kvm_dtype_size(dt);
    for (int i = 0; i < n; i++)
        row_to_f32(out + (size_t)i * dim, (const char *)table + (size_t)ids[i] * dim * es, dt, (size_t)dim);
}

static void cpu_rmsnorm(float *out, const float *x, const float *w, int n, int dim, float eps) {
    for (int r = 0; r < n; r++) {
        const float *xr = x + (size_t)r * dim;
        float *o = out + (size_t)r * dim;
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
        float inv = 1.0f / sqrtf((float)(ss / dim) + eps);
        for (int i = 0; i < dim; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

static void cpu_head_rmsnorm(float *x, const float *w, int n, int heads, int hd, float eps) {
    cpu_rmsnorm(x, x, w, n * heads, hd, eps);
}

static void cpu_matmul(float *y, const float *x, const kvm_wmat_t *W, const float *bias, int n) {
    const int rows = W->rows, cols = W->cols;
    const size_t es = kvm_dtype_size(W->dtype);
    /* small products are faster on one thread than the fork/join of a parallel region */
    const bool par = (double)rows * cols * n > 131072.0;
#pragma omp parallel if (par)
    {
        float *wrow = NULL;
        if (W->dtype != KVM_F32) wrow = malloc((size_t)cols * sizeof(float));
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) {
            const float *w;
            if (W->dtype == KVM_F32) {
                w = (const float *)W->data + (size_t)r * cols;
            } else {
                row_to_f32(wrow, (const char *)W->data + (size_t)r * cols * es, W->dtype, (size_t)cols);
                w = wrow;
            }
            float b = bias ? bias[r] : 0.0f;
            for (int t = 0; t < n; t++) y[(size_t)t * rows + r] = dot_f32(x + (size_t)t * cols, w, cols) + b;
        }
        free(wrow);
    }
}

static void cpu_rope(float *x, int n, int heads, int hd, const int32_t *pos, const float *inv_freq, kvm_rope_layout_t layout) {
    for (int t = 0; t < n; t++)
        for (int h = 0; h < heads; h++) kvm_rope_rotate_vec(x + ((size_t)t * heads + h) * hd, hd, (double)pos[t], inv_freq, layout);
}

static void cpu_swiglu(float *out, const float *gate, const float *up, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = (g / (1.0f + expf(-g))) * up[i];
    }
}

static void cpu_add(float *x, const float *y, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

static inline size_t kv_index(const kvm_kv_geom_t *g, int32_t blk, int layer, int kv, int h, int t) {
    return ((((size_t)blk * g->n_layers + layer) * 2 + kv) * g->n_kv_heads + h) * KVM_KV_BLOCK * (size_t)g->head_dim +
           (size_t)t * g->head_dim;
}

static inline void kv_store(void *kv, const kvm_kv_geom_t *g, size_t idx, const float *src) {
    if (g->dtype == KVM_F32) {
        memcpy((float *)kv + idx, src, (size_t)g->head_dim * 4);
    } else {
        uint16_t *d = (uint16_t *)kv + idx;
        for (int i = 0; i < g->head_dim; i++) d[i] = g->dtype == KVM_BF16 ? kvm_f32_to_bf16(src[i]) : kvm_f32_to_f16(src[i]);
    }
}

static inline void kv_load(float *dst, const void *kv, const kvm_kv_geom_t *g, size_t idx) {
    if (g->dtype == KVM_F32) memcpy(dst, (const float *)kv + idx, (size_t)g->head_dim * 4);
    else row_to_f32(dst, (const uint16_t *)kv + idx, g->dtype, (size_t)g->head_dim);
}

static void cpu_kv_write(void *kv, const kvm_kv_geom_t *g, int layer, const float *k, const float *v, const kvm_attn_batch_t *b) {
    const int H = g->n_kv_heads, D = g->head_dim;
    for (int s = 0; s < b->n_seqs; s++) {
        int r0 = b->h_row_start[s], r1 = b->h_row_start[s + 1];
        int first_pos = b->h_ctx_len[s] - (r1 - r0);
        for (int r = r0; r < r1; r++) {
            int pos = b->h_q_pos ? b->h_q_pos[r] : first_pos + (r - r0);
            int32_t blk = b->h_block_table[(size_t)s * b->max_blocks + pos / KVM_KV_BLOCK];
            int t = pos % KVM_KV_BLOCK;
            for (int h = 0; h < H; h++) {
                kv_store(kv, g, kv_index(g, blk, layer, 0, h, t), k + ((size_t)r * H + h) * D);
                kv_store(kv, g, kv_index(g, blk, layer, 1, h, t), v + ((size_t)r * H + h) * D);
            }
        }
    }
}

static void cpu_attention(float *out, const float *q, const void *kv, const kvm_kv_geom_t *g, int layer, int heads,
                          const kvm_attn_batch_t *b, float scale) {
    const int H = g->n_kv_heads, D = g->head_dim, group = heads / H;
    for (int s = 0; s < b->n_seqs; s++) {
        int r0 = b->h_row_start[s], r1 = b->h_row_start[s + 1];
        int ctx = b->h_ctx_len[s];
        int first_pos = ctx - (r1 - r0);
        const int32_t *bt = b->h_block_table + (size_t)s * b->max_blocks;
        int nwork = (r1 - r0) * heads;
        const bool par = (double)nwork * ctx * D > 65536.0;
#pragma omp parallel if (par)
        {
            float *att = malloc((size_t)ctx * sizeof(float));
            float *tmp = malloc((size_t)D * sizeof(float));
            float *acc = malloc((size_t)D * sizeof(float));
#pragma omp for schedule(dynamic, 1)
            for (int w = 0; w < nwork; w++) {
                int r = r0 + w / heads, h = w % heads, kh = h / group;
                int pos = b->h_q_pos ? b->h_q_pos[r] : first_pos + (r - r0);
                const float *qv = q + ((size_t)r * heads + h) * D;
                float mx = -INFINITY;
                for (int p = 0; p <= pos; p++) {
                    kv_load(tmp, kv, g, kv_index(g, bt[p / KVM_KV_BLOCK], layer, 0, kh, p % KVM_KV_BLOCK));
                    float sc = dot_f32(qv, tmp, D) * scale;
                    att[p] = sc;
                    if (sc > mx) mx = sc;
                }
                float sum = 0;
                for (int p = 0; p <= pos; p++) {
                    att[p] = expf(att[p] - mx);
                    sum += att[p];
                }
                float inv = 1.0f / sum;
                memset(acc, 0, (size_t)D * sizeof(float));
                for (int p = 0; p <= pos; p++) {
                    kv_load(tmp, kv, g, kv_index(g, bt[p / KVM_KV_BLOCK], layer, 1, kh, p % KVM_KV_BLOCK));
                    float a = att[p] * inv;
                    for (int d = 0; d < D; d++) acc[d] += a * tmp[d];
                }
                memcpy(out + ((size_t)r * heads + h) * D, acc, (size_t)D * sizeof(float));
            }
            free(att);
            free(tmp);
            free(acc);
        }
    }
}

static void cpu_rope_shift(void *kv, const kvm_kv_geom_t *g, const int32_t *blk, const int32_t *slot, const int32_t *delta,
                           int n, const float *inv_freq, kvm_rope_layout_t layout) {
    const int D = g->head_dim;
    float *tmp = malloc((size_t)D * sizeof(float));
    for (int i = 0; i < n; i++) {
        if (delta[i] == 0) continue;
        for (int l = 0; l < g->n_layers; l++)
            for (int h = 0; h < g->n_kv_heads; h++) {
                size_t idx = kv_index(g, blk[i], l, 0, h, slot[i]);
                kv_load(tmp, kv, g, idx);
                kvm_rope_rotate_vec(tmp, D, (double)delta[i], inv_freq, layout);
                kv_store(kv, g, idx, tmp);
            }
    }
    free(tmp);
}

static int cpu_argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* ops_cpu_kvcomm.c */
int kvm_cpu_kvcomm_dist(const kvm_kvcomm_dist_args_t *a);
int kvm_cpu_kvcomm_softmax(float *w, const float *d, int n, size_t cols, int mode);
int kvm_cpu_kvcomm_apply(const kvm_kvcomm_apply_args_t *a);
int kvm_cpu_kvcomm_spread(const kvm_kvcomm_spread_args_t *a);

static const kvm_ops_t cpu_ops = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .h2d = cpu_copy,
    .d2h = cpu_copy,
    .d2d = cpu_copy,
    .memset0 = cpu_memset0,
    .sync = cpu_sync,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .head_rmsnorm = cpu_head_rmsnorm,
    .matmul = cpu_matmul,
    .rope = cpu_rope,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
    .kv_write = cpu_kv_write,
    .attention = cpu_attention,
    .rope_shift = cpu_rope_shift,
    .argmax = cpu_argmax,
    .kvcomm_dist = kvm_cpu_kvcomm_dist,
    .kvcomm_softmax = kvm_cpu_kvcomm_softmax,
    .kvcomm_apply = kvm_cpu_kvcomm_apply,
    .kvcomm_spread = kvm_cpu_kvcomm_spread,
};

const kvm_ops_t *kvm_ops_cpu(void) { return &cpu_ops; }
