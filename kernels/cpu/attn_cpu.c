/* attn_cpu.c - the CPU backend's causal attention over the paged KV cache. */
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

#include "cpu_common.h"
#include "cpu_pool.h"

typedef struct {
    float *out;
    const float *q;
    const void *kv;
    const kvm_kv_geom_t *g;
    const kvm_attn_batch_t *b;
    int layer, heads, s; /* s: the sequence */
    float scale;
} attn_task_t;

/* the (row, head) pairs [w0, w1) of sequence s */
static void attn_task(void *ctx, int w0, int w1, int tid) {
    const attn_task_t *a = ctx;
    const kvm_kv_geom_t *g = a->g;
    const kvm_attn_batch_t *b = a->b;
    const int H = g->n_kv_heads, D = g->head_dim, heads = a->heads, group = heads / H, layer = a->layer, s = a->s;
    const int r0 = b->h_row_start[s], r1 = b->h_row_start[s + 1];
    const int ctx_len = b->h_ctx_len[s];
    const int first_pos = ctx_len - (r1 - r0);
    const int32_t *bt = b->h_block_table + (size_t)s * b->max_blocks;
    float *att = kvm_cpu_scratch(tid, ((size_t)ctx_len + 2 * (size_t)D) * sizeof(float));
    KVM_ASSERT(att);
    float *tmp = att + ctx_len, *acc = tmp + D;
    for (int w = w0; w < w1; w++) {
        int r = r0 + w / heads, h = w % heads, kh = h / group;
        int pos = b->h_q_pos ? b->h_q_pos[r] : first_pos + (r - r0);
        const float *qv = a->q + ((size_t)r * heads + h) * D;
        float mx = -INFINITY;
        for (int p = 0; p <= pos; p++) {
            kv_load(tmp, a->kv, g, kv_index(g, bt[p / KVM_KV_BLOCK], layer, 0, kh, p % KVM_KV_BLOCK));
            float sc = dot_f32(qv, tmp, D) * a->scale;
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
            kv_load(tmp, a->kv, g, kv_index(g, bt[p / KVM_KV_BLOCK], layer, 1, kh, p % KVM_KV_BLOCK));
            float pa = att[p] * inv;
            for (int d = 0; d < D; d++) acc[d] += pa * tmp[d];
        }
        memcpy(a->out + ((size_t)r * heads + h) * D, acc, (size_t)D * sizeof(float));
    }
}

void kvm_cpu_attention(float *out, const float *q, const void *kv, const kvm_kv_geom_t *g, int layer, int heads,
                          const kvm_attn_batch_t *b, float scale) {
    const int D = g->head_dim;
    attn_task_t a = {.out = out, .q = q, .kv = kv, .g = g, .b = b, .layer = layer, .heads = heads, .scale = scale};
    for (int s = 0; s < b->n_seqs; s++) {
        int nwork = (b->h_row_start[s + 1] - b->h_row_start[s]) * heads;
        const bool par = (double)nwork * b->h_ctx_len[s] * D > 65536.0;
        a.s = s;
        kvm_cpu_parallel_for(nwork, par ? 1 : nwork, attn_task, &a);
    }
}
