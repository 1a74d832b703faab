/* kv.h - paged KV block pool and sequences (L2).
 *
 * One pool per model and backend. A block holds KVM_KV_BLOCK tokens of K and V for all layers
 * (layout in kernels/ops.h). Blocks are refcounted; sequences are block tables plus their token ids,
 * and position == index in the sequence. Sharing is by block reference; a sequence that appends into
 * a shared last block first copies it (copy on write). */
#ifndef KVM_KV_H
#define KVM_KV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <kvmesh_lab.h>

#include "../../kernels/ops.h"

/* kvm_kv_pool_t, kvm_seq_t (typedefs), kvm_model_kv_pool, kvm_kv_pool_free, kvm_seq_truncate and the heap sequences
 * of lab code (kvm_seq_create / kvm_seq_destroy / kvm_seq_read_rows): include/kvmesh_lab.h */
struct kvm_kv_pool {
    const kvm_ops_t *ops;
    kvm_kv_geom_t geom;
    int n_blocks;              /* capacity */
    size_t block_bytes;        /* bytes of one block (all layers, K and V) */
    void *data;                /* backend memory: [n_blocks][block] */
    int32_t *refcount;         /* [n_blocks] host */
    int32_t *free_list;        /* [n_blocks] host stack of free block ids */
    int n_free;
    uint64_t model_id;
    /* Optional eviction hook (set by the KV store, kv/store.h): called when an allocation needs
     * n_blocks free blocks and fewer are free; returns 0 when n_free >= n_blocks after it. NULL = none. */
    int (*reclaim)(void *ud, int n_blocks);
    void *reclaim_ud;
};

/* Makes a pool of n_blocks blocks in the backend's memory. Free with kvm_kv_pool_free(). */
kvm_kv_pool_t *kvm_kv_pool_create(const kvm_ops_t *ops, const kvm_kv_geom_t *g, int n_blocks, uint64_t model_id);
/* Blocks needed to hold `bytes` of KV (for sizing pools from a byte budget). */
int kvm_kv_blocks_for_bytes(const kvm_kv_geom_t *g, size_t bytes);
size_t kvm_kv_block_bytes(const kvm_kv_geom_t *g);

/* Takes one free block (refcount 1) or returns -1 (KVM_ENOMEM, message says how many are in use). */
int32_t kvm_kv_block_alloc(kvm_kv_pool_t *p);
void kvm_kv_block_ref(kvm_kv_pool_t *p, int32_t b);
void kvm_kv_block_unref(kvm_kv_pool_t *p, int32_t b);

struct kvm_seq {
    kvm_kv_pool_t *pool;
    int32_t *blocks;    /* [cap_blocks] host block table */
    int n_blocks;
    size_t cap_blocks;
    int32_t *tokens;    /* [cap_tokens] ids of the cached tokens (token i at position i) */
    int n_tokens;
    size_t cap_tokens;
};

void kvm_seq_init(kvm_seq_t *s, kvm_kv_pool_t *pool);
/* Releases all blocks and memory; the seq may be re-initialised. */
void kvm_seq_free(kvm_seq_t *s);
/* Ensures blocks for n_total tokens, copying a shared partial last block first. KVM_ENOMEM with a
 * clear message when the pool cannot hold it (nothing is changed then). */
int kvm_seq_reserve(kvm_seq_t *s, int n_total);
/* Records that tokens ids[0..n) now occupy positions n_tokens.. (after the forward wrote their KV). */
int kvm_seq_push_tokens(kvm_seq_t *s, const int32_t *ids, int n);

#endif
