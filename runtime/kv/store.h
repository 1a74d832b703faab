/* store.h - the shared KV store (L2): prefix index, segments, budget with LRU eviction, RoPE shifts.
 *
 * The store sits on one kvm_kv_pool_t (one model, one backend) and adds:
 *
 *   - a PREFIX INDEX: every full 16-token block of a sequence that starts at position 0 and whose KV
 *     was computed exactly is registered under a hash of its 16 ids chained on the previous block's
 *     hash. A lookup walks the chain and VERIFIES each hit (same ids and same parent entry), so a hash
 *     collision can never hand out blocks of other tokens. Hits are shared by block reference
 *     (vLLM-style automatic prefix caching). The index holds one reference per block it knows.
 *
 *   - SEGMENTS: published, immutable, refcounted KV spans (token ids + K/V of all layers) stored in
 *     pool blocks, token t at block t/16, slot t%16. A segment records its model id, its position
 *     frame (token t was rotated as if at position frame+t; F0 = frame 0 for every shared segment),
 *     its producer (kind + id), the hash of the context it was computed behind (producer_ctx_hash)
 *     and the header length that was dropped (drop_num, kvcomm.md §2.3).
 *
 *   - a BUDGET: the pool's blocks are the budget. When a reservation or a segment needs blocks that
 *     are not free, the store first evicts, in least-recently-used order, segments that nobody holds
 *     (refcount 0) and are not pinned, then prefix-index entries whose blocks only the index holds.
 *     If that is still not enough the call fails with KVM_ENOMEM and nothing is changed. The pool's
 *     reclaim hook (kv.h) points here, so kvm_seq_reserve (used by the forward) also evicts.
 *
 *   - SHIFTS: kvm_kv_shift() re-rotates keys of any token range of a block table by any offset through
 *     the backend's rope_shift op (one launch for all layers), with the model's fp32 frequency table
 *     and layout, so forward RoPE and shifts use the same numbers (kvcomm.md §3.3).
 *
 * Threading: a store is used from one thread at a time. */
#ifndef KVM_KV_STORE_H
#define KVM_KV_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kv.h"

typedef struct kvm_kv_store kvm_kv_store_t;
/* kvm_segment_t, kvm_producer_kind_t and kvm_segment_release: include/kvmesh_lab.h (via kv.h) */

/* RoPE parameters of the model whose KV the store holds (host pointers; the store keeps a backend copy
 * of the table). inv_freq is the model's ONE fp32 table (m->inv_freq), n_freq = head_dim / 2. */
typedef struct kvm_rope_params {
    const float *inv_freq;
    int n_freq;
    kvm_rope_layout_t layout;
} kvm_rope_params_t;

/* ---- store ---------------------------------------------------------------------------------- */

/* Creates a store over `pool` (not owned: free the pool after the store). Installs the pool's
 * reclaim hook. NULL + message on error. Free with kvm_kv_store_free(), which drops every cached
 * segment and index entry (segments still held by callers stay valid until released). */
kvm_kv_store_t *kvm_kv_store_create(kvm_kv_pool_t *pool, const kvm_rope_params_t *rope);
void kvm_kv_store_free(kvm_kv_store_t *s);
kvm_kv_pool_t *kvm_kv_store_pool(const kvm_kv_store_t *s);
const kvm_rope_params_t *kvm_kv_store_rope(const kvm_kv_store_t *s);
/* Backend copy of the frequency table (for ops->rope_shift). */
const float *kvm_kv_store_inv_freq_dev(const kvm_kv_store_t *s);

/* Frees at least n_blocks pool blocks by eviction (LRU unreferenced unpinned segments first, then
 * index-only prefix blocks). Returns 0 when the pool now has >= n_blocks free, else KVM_ENOMEM (after
 * evicting what it could: eviction only drops cached data nobody holds, so nothing is corrupted). */
int kvm_kv_store_reclaim(kvm_kv_store_t *s, int n_blocks);
/* A holder of long-lived segment references (the KVCOMM anchors, whose bases are segments): when eviction cannot
 * free enough blocks, kvm_kv_store_reclaim calls release_one(ctx), which drops one of its references and returns 1
 * (the store then evicts again), or returns 0 when it holds none it can drop. NULL = none. */
void kvm_kv_store_set_holder(kvm_kv_store_t *s, int (*release_one)(void *ctx), void *ctx);

typedef struct kvm_kv_store_stats {
    int n_blocks, n_free;                /* pool */
    int n_segments, n_segments_pinned;   /* cached segments */
    int segment_blocks;                  /* blocks held by cached segments */
    int index_entries, index_blocks_only;/* prefix entries; of them, blocks only the index holds */
    uint64_t index_lookups, index_hit_blocks, index_collisions;
    uint64_t evicted_segments, evicted_index_blocks;
} kvm_kv_store_stats_t;
void kvm_kv_store_stats(const kvm_kv_store_t *s, kvm_kv_store_stats_t *out);

/* ---- prefix index ----------------------------------------------------------------------------- */

/* Registers the full blocks of seq's first n_exact tokens (positions 0..n_exact-1 must hold exactly
 * computed KV of seq->tokens). Blocks already indexed under the same chain are left as they are.
 * Returns the number of blocks newly registered, or <0 on error (allocation). */
int kvm_prefix_index_insert(kvm_kv_store_t *s, const kvm_seq_t *seq, int n_exact);

/* Finds the longest verified full-block prefix of ids[0..n) (at most max_tokens tokens, rounded down
 * to whole blocks) and appends those blocks by reference to `seq`, which must be empty; seq->tokens
 * gets the ids. Returns the number of tokens reused (0 if none), or <0 on error. */
int kvm_prefix_index_lookup(kvm_kv_store_t *s, const int32_t *ids, int n, int max_tokens, kvm_seq_t *seq);

/* Test hook: keep only the low `bits` bits of every chained hash (0 = every block collides). 64 = off. */
void kvm_prefix_index_set_hash_bits(kvm_kv_store_t *s, int bits);

/* ---- sequences: sharing and copying ---------------------------------------------------------------- */

/* Appends the first n tokens of src to the EMPTY seq dst by block reference (a shared partial last
 * block is copied on dst's first write, kv_pool.c). */
int kvm_seq_share_prefix(kvm_seq_t *dst, const kvm_seq_t *src, int n);

/* ---- segments ----------------------------------------------------------------------------------- */

const char *kvm_producer_kind_name(kvm_producer_kind_t k);

typedef struct kvm_segment_info {
    uint64_t id;               /* unique in the store, never reused */
    uint64_t model_id;
    int32_t frame;             /* token t rotated as if at position frame + t (0 = F0) */
    int n_tokens;
    const int32_t *ids;        /* [n_tokens], owned by the segment */
    kvm_producer_kind_t producer_kind;
    const char *producer_id;   /* agent / tool / key name, or "" */
    uint64_t producer_ctx_hash;/* kvm_ctx_hash() of the ids in front of it when its KV was computed */
    int producer_pos;          /* position of its first token when computed (= length of that context) */
    int drop_num;              /* header tokens dropped (kvcomm.md §2.3) */
    int refcount;              /* caller references (the store's cache entry is not counted) */
    bool pinned;
    size_t bytes;              /* pool bytes it holds */
} kvm_segment_info_t;

/* Hash of a context (the ids in front of a segment); equal contexts give equal hashes. */
uint64_t kvm_ctx_hash(const int32_t *ids, int n);

/* Publishes a new segment from rows [first, first+n) of seq: copies their KV into new blocks and
 * re-bases the keys by `rebase` positions (the new frame is first + rebase; pass -first for F0).
 * The caller gets one reference (release with kvm_segment_release). KVM_ENOMEM if the budget cannot
 * hold it even after eviction (nothing changed). `meta` supplies kind, producer id, ctx hash,
 * producer_pos and drop_num; its id/model/frame/ids/refcount/bytes fields are ignored. */
int kvm_segment_publish(kvm_kv_store_t *s, const kvm_seq_t *seq, int first, int n, int rebase,
                        const kvm_segment_info_t *meta, kvm_segment_t **out);
/* Publishes a segment from host fp32 KV kv[L][2][H][n][D] (K then V per layer) already in `frame`. */
int kvm_segment_publish_f32(kvm_kv_store_t *s, const float *kv, const int32_t *ids, int n, int32_t frame,
                            const kvm_segment_info_t *meta, kvm_segment_t **out);

void kvm_segment_ref(kvm_segment_t *g);
/* kvm_segment_release (drops one caller reference; pinned segments are never evicted): include/kvmesh_lab.h */
/* Looks a cached segment up by id and returns it with a new reference; NULL + KVM_ESTALE if it was
 * evicted (or never existed). */
kvm_segment_t *kvm_segment_get(kvm_kv_store_t *s, uint64_t id);
void kvm_segment_pin(kvm_segment_t *g, bool pinned);
const kvm_segment_info_t *kvm_segment_info(const kvm_segment_t *g);
kvm_kv_store_t *kvm_segment_store(const kvm_segment_t *g);
/* Marks a use (moves it to the most-recently-used end of the LRU). */
void kvm_segment_touch(kvm_segment_t *g);

/* Checks that g may be placed into a sequence of `pool` with keys expected in `frame`:
 * KVM_EMODEL when the segment comes from another model, KVM_EFRAME when its frame differs. */
int kvm_segment_check(const kvm_segment_t *g, const kvm_kv_pool_t *pool, int32_t frame);

/* Reads the segment's KV (all layers) into host fp32 out[L][2][H][n][D] (rows [first, first+n)). */
int kvm_segment_read_f32(const kvm_segment_t *g, int first, int n, float *out);
/* The segment's block table ([n_blocks]) for backend kernels. */
const int32_t *kvm_segment_blocks(const kvm_segment_t *g, int *n_blocks);

/* Copies the segment's rows [0, n) into seq at positions pos.. (seq must already have n_tokens == pos,
 * it is reserved and grown by n) and shifts the keys by (pos - frame) so they sit in their new
 * position. The tokens are pushed. KVM_EMODEL / KVM_ENOMEM as above; on error seq is unchanged. */
int kvm_seq_append_segment(kvm_seq_t *seq, kvm_kv_store_t *s, const kvm_segment_t *g, int n);

/* ---- raw KV access (host fp32 staging, used by comm/) -------------------------------------------- */

/* Reads rows [pos, pos+n) of a block table into host fp32 out[L][2][H][n][D]. */
int kvm_kv_read_rows(const kvm_kv_pool_t *p, const int32_t *blocks, int pos, int n, float *out);
/* Writes host fp32 in[L][2][H][n][D] into rows [pos, pos+n) of a block table (whole-block transfers;
 * partially covered blocks are read, modified and written back). The blocks must be writable
 * (not shared). */
int kvm_kv_write_rows(kvm_kv_pool_t *p, const int32_t *blocks, int pos, int n, const float *in);

/* Re-rotates the keys of rows [pos, pos+n) of a block table by delta positions (per row delta[i] if
 * deltas != NULL, else the scalar `delta`) through ops->rope_shift: one launch for all layers. */
int kvm_kv_shift(kvm_kv_store_t *s, const int32_t *blocks, int pos, int n, int32_t delta, const int32_t *deltas);

/* Host fp32 rotation of x[n][D] rows (one head) by delta[i] (or `delta`), with the same fp64 angle
 * reduction as the backends: the reference math for tests and host-side KVCOMM. */
void kvm_rope_rotate_rows(float *x, int n, int D, int row_stride, int32_t delta, const int32_t *deltas,
                          const float *inv_freq, kvm_rope_layout_t layout);

#endif
