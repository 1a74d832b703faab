/* attn_cpu.c - the CPU backend's causal attention over the paged KV cache. */
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

#include "cpu_common.h"
#include "cpu_pool.h"

void kvm_cpu_attention(float *out, const float *q, const void *kv, const kvm_kv_geom_t *g, int layer, int heads,
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

