/* attn_cpu.c - the CPU backend's causal attention over the paged KV cache (contract: kvm_ops_t.attention).
 *
 * Work items are (sequence, KV head, tile of ATT_QT query rows): an item holds the rows' queries of every head of
 * the KV head's group (GQA, group = heads / n_kv_heads) and walks the keys in chunks of ATT_CB blocks of 16
 * positions. Each K block is read once per item, widened to fp32 and transposed to [head_dim][16] (the 16 scores
 * of a query are then one vector); each V block is read once (in place when the cache is F32). Per row and
 * chunk, for the G queries of the row together (each transposed key and value vector loaded once for the G):
 * the scores of the chunk, one online-softmax step per query (running max and sum; the accumulator rescaled
 * once per chunk) and P.V; a query's arithmetic is its own whatever G. Blocks past a row's position are skipped (causal), as are positions past it within its
 * last block. Items go through kvm_cpu_parallel_for, the tiles holding the latest rows (the most work) first.
 * Decode is the tile of one row. The arithmetic of a chunk is the instruction-set path's (gemm_cpu.h): fp32,
 * exp within 2e-7 relative of expf. */
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

#include "cpu_common.h"
#include "cpu_kernels.h"
#include "cpu_pool.h"
#include "gemm_cpu.h"

#define ATT_QT 16 /* query rows per tile */
#define ATT_CB 16 /* key blocks per chunk (256 positions) */

/* ---- the portable arithmetic of a chunk (contracts in gemm_cpu.h) ------------------------------------- */

static void scores1_portable(float *s, const float *q, const float *kt, int nblk, int d) {
    for (int b = 0; b < nblk; b++) {
        float a[KVM_KV_BLOCK] = {0};
        const float *k = kt + (size_t)b * d * KVM_KV_BLOCK;
        for (int i = 0; i < d; i++)
            for (int j = 0; j < KVM_KV_BLOCK; j++) a[j] += q[i] * k[(size_t)i * KVM_KV_BLOCK + j];
        memcpy(s + (size_t)b * KVM_KV_BLOCK, a, sizeof a);
    }
}

float kvm_cpu_softmax_portable(float *s, int nv, float *m, float *l) {
    float mb = *m;
    for (int i = 0; i < nv; i++) mb = s[i] > mb ? s[i] : mb;
    float corr = *m == -INFINITY ? 0.0f : expf(*m - mb), sum = 0;
    for (int i = 0; i < nv; i++) sum += (s[i] = expf(s[i] - mb));
    *l = *l * corr + sum;
    *m = mb;
    return corr;
}

static void pv1_portable(float *acc, const float *p, int nv, const float *const *v, int d, float corr) {
    for (int i = 0; i < d; i++) acc[i] *= corr;
    for (int j = 0; j < nv; j++) {
        const float *vr = v[j / KVM_KV_BLOCK] + (size_t)(j % KVM_KV_BLOCK) * d;
        for (int i = 0; i < d; i++) acc[i] += p[j] * vr[i];
    }
}

void kvm_cpu_scores_portable(float *s, int lds, const float *q, int nq, const float *kt, int nblk, int d) {
    for (int n = 0; n < nq; n++) scores1_portable(s + (size_t)n * lds, q + (size_t)n * d, kt, nblk, d);
}

void kvm_cpu_pv_portable(float *acc, const float *p, int lds, int nq, int nv, const float *const *v, int d,
                         const float *corr) {
    for (int n = 0; n < nq; n++) pv1_portable(acc + (size_t)n * d, p + (size_t)n * lds, nv, v, d, corr[n]);
}

void kvm_cpu_swiglu_portable(float *out, const float *gate, const float *up, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = (g / (1.0f + expf(-g))) * up[i];
    }
}

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

/* the keys of block blk (its first nv positions) transposed into kt[D][16]; returns its values as fp32 [16][D]:
 * the cache itself when it is F32, else converted into vbuf. A block's 16 rows of one (layer, K or V, KV head)
 * are contiguous in the cache. */
static const float *load_block(float *kt, float *vbuf, const attn_job_t *j, int kh, int32_t blk, int nv) {
    const int D = j->g->head_dim;
    const kvm_dtype_t dt = j->g->dtype;
    const size_t es = kvm_dtype_size(dt);
    const char *k = (const char *)j->kv + kv_index(j->g, blk, j->layer, 0, kh, 0) * es;
    const char *v = (const char *)j->kv + kv_index(j->g, blk, j->layer, 1, kh, 0) * es;
    j->k->load_kt(kt, k, dt, D, nv);
    if (dt == KVM_F32) return (const float *)v;
    j->k->widen(vbuf, v, dt, (size_t)nv * D);
    return vbuf;
}

/* scratch floats of one item of nq queries (G per row): kt [ATT_CB][D][16], vbuf [ATT_CB][16][D], qs and acc
 * [nq][D], m/l [nq][2], the scores of a row's G queries [G][ATT_CB * 16] and their corrections [G] */
static size_t item_floats(int D, int nq, int G) {
    return 2 * (size_t)ATT_CB * KVM_KV_BLOCK * D + 2 * (size_t)nq * D + 2 * (size_t)nq +
           (size_t)G * (ATT_CB * KVM_KV_BLOCK + 1);
}

static void attn_item(const attn_job_t *j, int s, int kh, int tile, float *buf) {
    const kvm_attn_batch_t *b = j->b;
    const cpu_kern_t *K = j->k;
    const int D = j->g->head_dim, G = j->group, heads = j->heads;
    const int r0 = b->h_row_start[s], r1 = b->h_row_start[s + 1];
    const int ra = r0 + tile * ATT_QT, rb = ra + ATT_QT < r1 ? ra + ATT_QT : r1;
    if (ra >= rb) return;
    const int nq = (rb - ra) * G, maxpos = row_pos(b, s, rb - 1), nkb = maxpos / KVM_KV_BLOCK + 1;
    const int32_t *bt = b->h_block_table + (size_t)s * b->max_blocks;
    const size_t kblk = (size_t)KVM_KV_BLOCK * D; /* floats of one block of K or V */
    float *kt = buf, *vbuf = kt + ATT_CB * kblk, *qs = vbuf + ATT_CB * kblk;
    float *acc = qs + (size_t)nq * D, *ml = acc + (size_t)nq * D, *sc = ml + 2 * (size_t)nq;
    float *corr = sc + (size_t)G * ATT_CB * KVM_KV_BLOCK;
    const int lds = ATT_CB * KVM_KV_BLOCK;
    const float *vrows[ATT_CB];
    for (int r = ra; r < rb; r++)
        for (int hh = 0; hh < G; hh++) {
            int qi = (r - ra) * G + hh;
            const float *qv = j->q + ((size_t)r * heads + kh * G + hh) * D;
            for (int i = 0; i < D; i++) qs[(size_t)qi * D + i] = qv[i] * j->scale;
            memset(acc + (size_t)qi * D, 0, (size_t)D * sizeof(float));
            ml[2 * qi] = -INFINITY;
            ml[2 * qi + 1] = 0.0f;
        }
    for (int c0 = 0; c0 < nkb; c0 += ATT_CB) {
        const int c1 = c0 + ATT_CB < nkb ? c0 + ATT_CB : nkb, p0 = c0 * KVM_KV_BLOCK;
        for (int kb = c0; kb < c1; kb++) {
            int nvb = maxpos - kb * KVM_KV_BLOCK + 1 < KVM_KV_BLOCK ? maxpos - kb * KVM_KV_BLOCK + 1 : KVM_KV_BLOCK;
            vrows[kb - c0] = load_block(kt + (kb - c0) * kblk, vbuf + (kb - c0) * kblk, j, kh, bt[kb], nvb);
        }
        for (int r = rb - 1; r >= ra; r--) { /* positions increase with r: stop at the first row before the chunk */
            const int pos = row_pos(b, s, r);
            if (pos < p0) break;
            const int nv = pos - p0 + 1 < (c1 - c0) * KVM_KV_BLOCK ? pos - p0 + 1 : (c1 - c0) * KVM_KV_BLOCK;
            const int q0 = (r - ra) * G; /* the row's G queries: one pass over the chunk's keys and values */
            K->scores(sc, lds, qs + (size_t)q0 * D, G, kt, (nv + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK, D);
            for (int hh = 0; hh < G; hh++)
                corr[hh] = K->softmax(sc + (size_t)hh * lds, nv, &ml[2 * (q0 + hh)], &ml[2 * (q0 + hh) + 1]);
            K->pv(acc + (size_t)q0 * D, sc, lds, G, nv, vrows, D, corr);
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
    const int H = j->g->n_kv_heads, D = j->g->head_dim;
    float *buf = kvm_cpu_scratch(tid, item_floats(D, ATT_QT * j->group, j->group) * sizeof(float));
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

/* kvm_ops_t.attn_mass on the CPU: fp64 scores and softmax per (row, head) over the row's keys (widened from the
 * cache), the heads and rows added in order on the calling thread. It serves a ranking pass of a few rows, so it
 * is plain C. */
void kvm_cpu_attn_mass(float *mass, int n, int from_pos, const float *q, const void *kv, const kvm_kv_geom_t *g,
                       int layer, int heads, const kvm_attn_batch_t *b, float scale) {
    const int D = g->head_dim, G = heads / g->n_kv_heads;
    int maxpos = -1;
    for (int s = 0; s < b->n_seqs; s++)
        for (int r = b->h_row_start[s]; r < b->h_row_start[s + 1]; r++) maxpos = row_pos(b, s, r) > maxpos ? row_pos(b, s, r) : maxpos;
    if (maxpos < from_pos) return;
    double *sc = malloc((size_t)(maxpos + 1) * sizeof(double));
    float *k = malloc((size_t)D * sizeof(float));
    if (!sc || !k) { /* out of memory: the error is set; the sums miss these rows */
        kvm_seterr(KVM_ENOMEM, "attention mass: out of host memory for %d keys", maxpos + 1);
        free(sc), free(k);
        return;
    }
    for (int s = 0; s < b->n_seqs; s++) {
        const int32_t *bt = b->h_block_table + (size_t)s * b->max_blocks;
        for (int r = b->h_row_start[s]; r < b->h_row_start[s + 1]; r++) {
            const int pos = row_pos(b, s, r);
            if (pos < from_pos) continue;
            for (int h = 0; h < heads; h++) {
                const float *qv = q + ((size_t)r * heads + h) * D;
                double mx = -INFINITY, sum = 0;
                for (int p = 0; p <= pos; p++) {
                    kv_load(k, kv, g, kv_index(g, bt[p / KVM_KV_BLOCK], layer, 0, h / G, p % KVM_KV_BLOCK));
                    double d0 = 0;
                    for (int d = 0; d < D; d++) d0 += (double)qv[d] * k[d];
                    sc[p] = d0 * scale;
                    mx = sc[p] > mx ? sc[p] : mx;
                }
                for (int p = 0; p <= pos; p++) sum += (sc[p] = exp(sc[p] - mx));
                for (int p = 0; p <= pos && p < n; p++) mass[p] += (float)(sc[p] / sum);
            }
        }
    }
    free(sc);
    free(k);
}
