/* attn_cpu.c - the CPU backend's causal attention over the paged KV cache (contract: kvm_ops_t.attention).
 *
 * Work items are (sequence, KV head, tile of ATT_QT query rows): an item holds the rows' queries of every head of
 * the KV head's group (GQA, group = heads / n_kv_heads), reads each K/V block of 16 positions once (K widened to
 * fp32 and transposed to [head_dim][16] so that the 16 scores of a query are one vector), and runs an online
 * softmax (running max and sum, rescaled when the max grows) per query. Blocks past a row's position are skipped
 * (causal), as are positions past it within its last block. Items go through kvm_cpu_parallel_for, the tiles
 * holding the latest rows (the most work) first. Decode is the tile of one row. The per-block arithmetic (scores,
 * softmax and P.V) is the instruction-set path's (gemm_cpu.h): fp32, exp within 2e-7 relative of expf. */
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

#include "cpu_common.h"
#include "cpu_kernels.h"
#include "cpu_pool.h"
#include "gemm_cpu.h"

#define ATT_QT 16 /* query rows per tile */

/* ---- the portable per-block arithmetic ---------------------------------------------------------------- */

void kvm_cpu_scores_portable(float *s, const float *q, const float *kt, int d);
void kvm_cpu_scores_portable(float *s, const float *q, const float *kt, int d) {
    float a[KVM_KV_BLOCK] = {0};
    for (int i = 0; i < d; i++)
        for (int j = 0; j < KVM_KV_BLOCK; j++) a[j] += q[i] * kt[(size_t)i * KVM_KV_BLOCK + j];
    memcpy(s, a, sizeof a);
}

void kvm_cpu_softmax_pv_portable(float *acc, float *m, float *l, const float *s, int nv, const float *vb, int d);
void kvm_cpu_softmax_pv_portable(float *acc, float *m, float *l, const float *s, int nv, const float *vb, int d) {
    float mb = s[0];
    for (int j = 1; j < nv; j++) mb = s[j] > mb ? s[j] : mb;
    if (mb > *m) {
        float corr = expf(*m - mb);
        *l *= corr;
        for (int i = 0; i < d; i++) acc[i] *= corr;
        *m = mb;
    }
    float p[KVM_KV_BLOCK], sum = 0;
    for (int j = 0; j < nv; j++) {
        p[j] = expf(s[j] - *m);
        sum += p[j];
    }
    *l += sum;
    for (int j = 0; j < nv; j++)
        for (int i = 0; i < d; i++) acc[i] += p[j] * vb[(size_t)j * d + i];
}

void kvm_cpu_load_kt_portable(float *kt, const void *k, kvm_dtype_t dt, int d, int nv);
void kvm_cpu_load_kt_portable(float *kt, const void *k, kvm_dtype_t dt, int d, int nv) {
    for (int t = 0; t < KVM_KV_BLOCK; t++)
        for (int i = 0; i < d; i++) {
            size_t e = (size_t)t * d + i;
            kt[(size_t)i * KVM_KV_BLOCK + t] = t >= nv ? 0.0f
                                               : dt == KVM_F32 ? ((const float *)k)[e]
                                               : dt == KVM_BF16 ? kvm_bf16_to_f32(((const uint16_t *)k)[e])
                                                                : kvm_f16_to_f32(((const uint16_t *)k)[e]);
        }
}

/* ---- the driver ------------------------------------------------------------------------------------------ */

typedef struct attn_job {
    float *out;             /* [rows][heads][D] */
    const float *q;         /* [rows][heads][D] */
    const void *kv;
    const kvm_kv_geom_t *g;
    const kvm_attn_batch_t *b;
    int layer, heads, group, maxt; /* maxt: the most tiles of any sequence */
    float scale;
    const cpu_kern_t *k;
} attn_job_t;

static inline int row_pos(const kvm_attn_batch_t *b, int s, int r) {
    int r0 = b->h_row_start[s], r1 = b->h_row_start[s + 1];
    return b->h_q_pos ? b->h_q_pos[r] : b->h_ctx_len[s] - (r1 - r0) + (r - r0);
}

/* K of the first nv positions of block blk transposed to kt[D][16] (the rest zero) and V as vb[16][D] fp32: vb
 * points into the cache itself when it is F32, else at vbuf (converted). A block's 16 rows of one (layer, K or V,
 * KV head) are contiguous in the cache. */
static const float *load_block(float *kt, float *vbuf, const attn_job_t *j, int kh, int32_t blk, int nv) {
    const int D = j->g->head_dim;
    const kvm_dtype_t dt = j->g->dtype;
    const size_t es = kvm_dtype_size(dt);
    const char *k = (const char *)j->kv + kv_index(j->g, blk, j->layer, 0, kh, 0) * es;
    const char *v = (const char *)j->kv + kv_index(j->g, blk, j->layer, 1, kh, 0) * es;
    j->k->load_kt(kt, k, dt, D, nv);
    if (dt == KVM_F32) return (const float *)v;
    row_to_f32(vbuf, v, dt, (size_t)nv * D);
    return vbuf;
}

static void attn_item(const attn_job_t *j, int s, int kh, int tile, float *buf) {
    const kvm_attn_batch_t *b = j->b;
    const int D = j->g->head_dim, G = j->group, heads = j->heads;
    const int r0 = b->h_row_start[s], r1 = b->h_row_start[s + 1];
    const int ra = r0 + tile * ATT_QT, rb = ra + ATT_QT < r1 ? ra + ATT_QT : r1;
    if (ra >= rb) return;
    const int nq = (rb - ra) * G, maxpos = row_pos(b, s, rb - 1);
    const int32_t *bt = b->h_block_table + (size_t)s * b->max_blocks;
    float *kt = buf, *vb = kt + (size_t)KVM_KV_BLOCK * D, *qs = vb + (size_t)KVM_KV_BLOCK * D;
    float *acc = qs + (size_t)nq * D, *ml = acc + (size_t)nq * D, *sc = ml + 2 * (size_t)nq;
    for (int r = ra; r < rb; r++)
        for (int hh = 0; hh < G; hh++) {
            int qi = (r - ra) * G + hh;
            const float *qv = j->q + ((size_t)r * heads + kh * G + hh) * D;
            for (int i = 0; i < D; i++) qs[(size_t)qi * D + i] = qv[i] * j->scale;
            memset(acc + (size_t)qi * D, 0, (size_t)D * sizeof(float));
            ml[2 * qi] = -INFINITY;
            ml[2 * qi + 1] = 0.0f;
        }
    for (int kb = 0; kb <= maxpos / KVM_KV_BLOCK; kb++) {
        const int p0 = kb * KVM_KV_BLOCK;
        const float *v = load_block(kt, vb, j, kh, bt[kb], maxpos - p0 + 1 < KVM_KV_BLOCK ? maxpos - p0 + 1 : KVM_KV_BLOCK);
        for (int r = rb - 1; r >= ra; r--) { /* positions increase with r: stop at the first row before the block */
            int pos = row_pos(b, s, r);
            if (pos < p0) break;
            int nv = pos - p0 + 1 < KVM_KV_BLOCK ? pos - p0 + 1 : KVM_KV_BLOCK;
            for (int hh = 0; hh < G; hh++) {
                int qi = (r - ra) * G + hh;
                j->k->scores(sc, qs + (size_t)qi * D, kt, D);
                j->k->softmax_pv(acc + (size_t)qi * D, &ml[2 * qi], &ml[2 * qi + 1], sc, nv, v, D);
            }
        }
    }
    for (int r = ra; r < rb; r++)
        for (int hh = 0; hh < G; hh++) {
            int qi = (r - ra) * G + hh;
            float inv = 1.0f / ml[2 * qi + 1];
            float *o = j->out + ((size_t)r * heads + kh * G + hh) * D;
            for (int i = 0; i < D; i++) o[i] = acc[(size_t)qi * D + i] * inv;
        }
}

static void attn_task(void *ctx, int i0, int i1, int tid) {
    const attn_job_t *j = ctx;
    const int H = j->g->n_kv_heads, D = j->g->head_dim, nq = ATT_QT * j->group;
    size_t floats = 2 * (size_t)KVM_KV_BLOCK * D + 2 * (size_t)nq * D + 2 * (size_t)nq + KVM_KV_BLOCK;
    float *buf = kvm_cpu_scratch(tid, floats * sizeof(float));
    for (int it = i0; it < i1; it++) {
        int s = it / (H * j->maxt), rem = it % (H * j->maxt);
        int tile = j->maxt - 1 - rem / H, kh = rem % H; /* the latest tiles (most work) first */
        if (buf) {
            attn_item(j, s, kh, tile, buf);
            continue;
        }
        /* no scratch (out of memory, the error is set): the rows read NaN rather than stale values */
        const kvm_attn_batch_t *b = j->b;
        int ra = b->h_row_start[s] + tile * ATT_QT, rb = b->h_row_start[s + 1];
        for (int r = ra; r < rb && r < ra + ATT_QT; r++)
            for (int h = kh * j->group; h < (kh + 1) * j->group; h++)
                for (int i = 0; i < D; i++) j->out[((size_t)r * j->heads + h) * D + i] = NAN;
    }
}

void kvm_cpu_attention(float *out, const float *q, const void *kv, const kvm_kv_geom_t *g, int layer, int heads,
                       const kvm_attn_batch_t *b, float scale) {
    const int H = g->n_kv_heads;
    attn_job_t j = {.out = out, .q = q, .kv = kv, .g = g, .b = b, .layer = layer, .heads = heads, .group = heads / H,
                    .scale = scale, .k = kvm_cpu_kern()};
    double work = 0; /* query-key pairs x head_dim, for the grain */
    for (int s = 0; s < b->n_seqs; s++) {
        int nr = b->h_row_start[s + 1] - b->h_row_start[s], t = (nr + ATT_QT - 1) / ATT_QT;
        if (t > j.maxt) j.maxt = t;
        work += (double)nr * b->h_ctx_len[s] * heads * g->head_dim;
    }
    int items = b->n_seqs * H * j.maxt;
    if (items <= 0) return;
    int grain = kvm_cpu_pool_size() <= 1 || work < 131072.0 ? items : 1;
    kvm_cpu_parallel_for(items, grain, attn_task, &j);
}
