/* ops_cpu_c2c.c - the CPU reference of the C2C ops (kernels/ops.h: c2c_gather, gelu_erf, c2c_residual):
 * gathering the fuser's input rows from two paged caches, the exact-erf GELU, and the gated residual add
 * into the receiver's cache (../shared/spec/c2c.md §2.2). fp32 throughout; the cache value is rounded once. */
#include <math.h>
#include <stdlib.h>

#include "../ops.h"
#include "cpu_common.h"
#include "cpu_pool.h"

int kvm_cpu_c2c_gather(const kvm_c2c_gather_args_t *a);
void kvm_cpu_gelu_erf(float *x, size_t n);
int kvm_cpu_c2c_residual(const kvm_c2c_residual_args_t *a);

/* rows [t0, t1) of a gather (one row per token: the sharer's heads, then the receiver's) */
static void gather_rows(void *ctx, int t0, int t1, int tid) {
    (void)tid;
    const kvm_c2c_gather_args_t *a = ctx;
    const kvm_kv_geom_t *sg = &a->s.g, *rg = &a->r.g;
    const int cs = sg->n_kv_heads * sg->head_dim, cr = rg->n_kv_heads * rg->head_dim;
    for (int t = t0; t < t1; t++) {
        const int p = a->pos0 + t;
        float *row = a->x + (size_t)t * (cs + cr);
        const int32_t sb = a->s.blocks[p / KVM_KV_BLOCK], rb = a->r.blocks[p / KVM_KV_BLOCK];
        for (int h = 0; h < sg->n_kv_heads; h++)
            kv_load(row + (size_t)h * sg->head_dim, a->s.kv, sg, kv_index(sg, sb, a->s_layer, a->kv, h, p % KVM_KV_BLOCK));
        for (int h = 0; h < rg->n_kv_heads; h++)
            kv_load(row + cs + (size_t)h * rg->head_dim, a->r.kv, rg,
                    kv_index(rg, rb, a->r_layer, a->kv, h, p % KVM_KV_BLOCK));
    }
}

int kvm_cpu_c2c_gather(const kvm_c2c_gather_args_t *a) {
    kvm_cpu_parallel_for(a->n, 64, gather_rows, (void *)a); /* fewer than 64 rows: on this thread */
    return 0;
}

void kvm_cpu_gelu_erf(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}

/* rows [t0, t1) of the gated residual add */
static void residual_rows(void *ctx, int t0, int t1, int tid) {
    (void)tid;
    const kvm_c2c_residual_args_t *a = ctx;
    const kvm_kv_geom_t *g = &a->c.g;
    const int H = g->n_kv_heads, D = g->head_dim;
    for (int t = t0; t < t1; t++) {
        float row[1024]; /* head_dim <= 1024 (checked by the caller) */
        const int p = a->pos0 + t;
        const int32_t blk = a->c.blocks[p / KVM_KV_BLOCK];
        for (int h = 0; h < H; h++) {
            size_t idx = kv_index(g, blk, a->layer, a->kv, h, p % KVM_KV_BLOCK);
            kv_load(row, a->c.kv, g, idx);
            const float w = 1.0f / (1.0f + expf(-a->wlogit[(size_t)t * H + h]));
            const float *y = a->y + ((size_t)t * H + h) * D;
            for (int d = 0; d < D; d++) row[d] += w * y[d];
            kv_store(a->c.kv, g, idx, row);
        }
    }
}

int kvm_cpu_c2c_residual(const kvm_c2c_residual_args_t *a) {
    kvm_cpu_parallel_for(a->n, 64, residual_rows, (void *)a);
    return 0;
}
