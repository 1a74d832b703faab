/* kv_pool.c - the paged KV block pool and sequences (block tables). */
#include "kv.h"

#include <stdlib.h>
#include <string.h>

#include "../core/core.h"
#include "../core/vec.h"

size_t kvm_kv_block_bytes(const kvm_kv_geom_t *g) {
    return (size_t)g->n_layers * 2 * g->n_kv_heads * KVM_KV_BLOCK * g->head_dim * kvm_dtype_size(g->dtype);
}

int kvm_kv_blocks_for_bytes(const kvm_kv_geom_t *g, size_t bytes) {
    size_t bb = kvm_kv_block_bytes(g);
    size_t n = bb ? bytes / bb : 0;
    return n > (size_t)INT32_MAX ? INT32_MAX : (int)n;
}

kvm_kv_pool_t *kvm_kv_pool_create(const kvm_ops_t *ops, const kvm_kv_geom_t *g, int n_blocks, uint64_t model_id) {
    if (!ops || !g || n_blocks <= 0 || g->n_layers <= 0 || g->n_kv_heads <= 0 || g->head_dim <= 0) {
        kvm_seterr(KVM_EINVAL, "kv pool: invalid geometry or block count (%d blocks)", n_blocks);
        return NULL;
    }
    kvm_kv_pool_t *p = kvm_calloc(1, sizeof *p);
    if (!p) return NULL;
    p->ops = ops;
    p->geom = *g;
    p->n_blocks = n_blocks;
    p->block_bytes = kvm_kv_block_bytes(g);
    p->model_id = model_id;
    const size_t bytes = p->block_bytes * (size_t)n_blocks;
    p->data = ops->alloc_zeroed ? ops->alloc_zeroed(bytes) : ops->alloc(bytes);
    p->refcount = kvm_calloc((size_t)n_blocks, sizeof(int32_t));
    p->free_list = kvm_malloc((size_t)n_blocks * sizeof(int32_t));
    if (!p->data || !p->refcount || !p->free_list) {
        kvm_errctx(KVM_ENOMEM, "kv pool of %d blocks (%zu bytes)", n_blocks, bytes);
        kvm_kv_pool_free(p);
        return NULL;
    }
    if (!ops->alloc_zeroed) ops->memset0(p->data, bytes); /* unwritten slots read as 0, never as NaN */
    for (int i = 0; i < n_blocks; i++) p->free_list[i] = n_blocks - 1 - i;
    p->n_free = n_blocks;
    return p;
}

void kvm_kv_pool_free(kvm_kv_pool_t *p) {
    if (!p) return;
    if (p->data) p->ops->free(p->data);
    kvm_free(p->refcount);
    kvm_free(p->free_list);
    kvm_free(p);
}

int32_t kvm_kv_block_alloc(kvm_kv_pool_t *p) {
    if (p->n_free == 0 && p->reclaim) p->reclaim(p->reclaim_ud, 1);
    if (p->n_free == 0) {
        kvm_seterr(KVM_ENOMEM, "KV budget exhausted: all %d blocks of %d tokens are in use (%zu MiB); "
                   "raise the KV budget or free sequences", p->n_blocks, KVM_KV_BLOCK,
                   p->block_bytes * (size_t)p->n_blocks >> 20);
        return -1;
    }
    int32_t b = p->free_list[--p->n_free];
    p->refcount[b] = 1;
    return b;
}

void kvm_kv_block_ref(kvm_kv_pool_t *p, int32_t b) {
    KVM_ASSERT(b >= 0 && b < p->n_blocks && p->refcount[b] > 0);
    p->refcount[b]++;
}

void kvm_kv_block_unref(kvm_kv_pool_t *p, int32_t b) {
    KVM_ASSERT(b >= 0 && b < p->n_blocks && p->refcount[b] > 0);
    if (--p->refcount[b] == 0) p->free_list[p->n_free++] = b;
}

void kvm_seq_init(kvm_seq_t *s, kvm_kv_pool_t *pool) {
    memset(s, 0, sizeof *s);
    s->pool = pool;
}

void kvm_seq_free(kvm_seq_t *s) {
    if (!s) return;
    for (int i = 0; i < s->n_blocks; i++) kvm_kv_block_unref(s->pool, s->blocks[i]);
    kvm_free(s->blocks);
    kvm_free(s->tokens);
    kvm_kv_pool_t *pool = s->pool;
    memset(s, 0, sizeof *s);
    s->pool = pool;
}

int kvm_seq_reserve(kvm_seq_t *s, int n_total) {
    if (n_total < 0) return kvm_seterr(KVM_EINVAL, "kv: negative token count");
    int need = (n_total + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK;
    /* copy-on-write of a shared, partially filled last block that the new tokens will write into */
    /* the block the next token goes into (not necessarily the last one: blocks may be reserved ahead) */
    int wb = s->n_tokens / KVM_KV_BLOCK;
    bool cow = wb < s->n_blocks && (s->n_tokens % KVM_KV_BLOCK) != 0 && n_total > s->n_tokens &&
               s->pool->refcount[s->blocks[wb]] > 1;
    int extra = need > s->n_blocks ? need - s->n_blocks : 0;
    if (extra + (cow ? 1 : 0) > s->pool->n_free && s->pool->reclaim)
        s->pool->reclaim(s->pool->reclaim_ud, extra + (cow ? 1 : 0));
    if (extra + (cow ? 1 : 0) > s->pool->n_free)
        return kvm_seterr(KVM_ENOMEM, "KV budget exhausted: a sequence of %d tokens needs %d more blocks, %d of %d are free; "
                          "raise the KV budget or free sequences", n_total, extra + (cow ? 1 : 0), s->pool->n_free,
                          s->pool->n_blocks);
    int rc = kvm_array_reserve(&s->blocks, &s->cap_blocks, (size_t)need, sizeof *s->blocks, 4);
    if (rc) return rc;
    if (cow) {
        int32_t old = s->blocks[wb];
        int32_t nb = kvm_kv_block_alloc(s->pool);
        s->pool->ops->d2d((char *)s->pool->data + (size_t)nb * s->pool->block_bytes,
                          (char *)s->pool->data + (size_t)old * s->pool->block_bytes, s->pool->block_bytes);
        kvm_kv_block_unref(s->pool, old);
        s->blocks[wb] = nb;
    }
    while (s->n_blocks < need) s->blocks[s->n_blocks++] = kvm_kv_block_alloc(s->pool);
    return 0;
}

int kvm_seq_push_tokens(kvm_seq_t *s, const int32_t *ids, int n) {
    if (n <= 0) return 0; /* nothing to copy (and no memcpy of a NULL array) */
    int rc = kvm_array_reserve(&s->tokens, &s->cap_tokens, (size_t)s->n_tokens + (size_t)n, sizeof *s->tokens, 64);
    if (rc) return rc;
    memcpy(s->tokens + s->n_tokens, ids, (size_t)n * sizeof(int32_t));
    s->n_tokens += n;
    return 0;
}

void kvm_seq_truncate(kvm_seq_t *s, int n_keep) {
    if (n_keep < 0) n_keep = 0;
    if (n_keep >= s->n_tokens) return;
    int keep_blocks = (n_keep + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK;
    while (s->n_blocks > keep_blocks) kvm_kv_block_unref(s->pool, s->blocks[--s->n_blocks]);
    s->n_tokens = n_keep;
}
