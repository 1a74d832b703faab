/* kv_store.c - the shared KV store: segments, prefix index, budget with LRU eviction, RoPE shifts.
 * Contract in store.h. */
#include "store.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../core/core.h"
#include "../core/vec.h"
#include "../../kernels/cpu/cpu_pool.h"
#include "../../kernels/rope.h"

/* ==== types ======================================================================================= */

struct kvm_segment {
    kvm_kv_store_t *store;   /* NULL once the store is gone (orphan: blocks already dropped) */
    kvm_segment_info_t info;
    int32_t *ids;
    char *producer_id;
    int32_t *blocks;
    int n_blocks;
    bool cached;             /* in the store's list (evictable when refcount 0 and not pinned) */
    uint64_t last_use;
    struct kvm_segment *prev, *next;
};

/* One registered full block of the prefix index. */
typedef struct px_entry {
    uint64_t hash;           /* chained, masked */
    int32_t parent;          /* entry index of the previous block, -1 for the first block */
    int32_t block;           /* pool block (the index holds one reference) */
    int32_t next;            /* next entry in the same bucket, -1 = end; free-list link when dead */
    int32_t n_children;
    bool alive;
    uint64_t last_use;
    int32_t tokens[KVM_KV_BLOCK];
} px_entry_t;

struct kvm_kv_store {
    kvm_kv_pool_t *pool;
    kvm_rope_params_t rope;
    float *inv_freq;         /* host copy */
    float *inv_freq_dev;     /* backend copy */
    /* shift scratch in backend memory: blk, slot, delta [cap] each */
    int32_t *d_shift;
    int shift_cap;
    int32_t *h_shift;
    int32_t *d_pub; /* backend copies of the two block tables of a device-side publish */
    int pub_cap;
    /* one block of staging in host memory */
    unsigned char *h_block;
    /* segments: LRU list, head = least recently used */
    kvm_segment_t *lru_head, *lru_tail;
    int n_segments;
    uint64_t next_id, tick;
    /* prefix index */
    px_entry_t *px;
    int px_n, px_free;
    size_t px_cap;
    int32_t *px_buckets;
    int px_nbuckets;
    int hash_bits;
    kvm_kv_store_stats_t st;
    int (*holder)(void *ctx); /* kvm_kv_store_set_holder */
    void *holder_ctx;
};

/* ==== helpers ====================================================================================== */

static inline size_t kv_elem(const kvm_kv_geom_t *g, int32_t blk, int layer, int kv, int h, int t) {
    return ((((size_t)blk * g->n_layers + layer) * 2 + kv) * g->n_kv_heads + h) * KVM_KV_BLOCK * (size_t)g->head_dim +
           (size_t)t * g->head_dim;
}

static inline float load_elem(const void *p, kvm_dtype_t dt, size_t i) {
    if (dt == KVM_F32) return ((const float *)p)[i];
    if (dt == KVM_BF16) return kvm_bf16_to_f32(((const uint16_t *)p)[i]);
    return kvm_f16_to_f32(((const uint16_t *)p)[i]);
}

static inline void store_elem(void *p, kvm_dtype_t dt, size_t i, float v) {
    if (dt == KVM_F32) ((float *)p)[i] = v;
    else if (dt == KVM_BF16) ((uint16_t *)p)[i] = kvm_f32_to_bf16(v);
    else ((uint16_t *)p)[i] = kvm_f32_to_f16(v);
}

const char *kvm_producer_kind_name(kvm_producer_kind_t k) {
    switch (k) {
    case KVM_PRODUCER_TEXT: return "text";
    case KVM_PRODUCER_INPUT: return "input";
    case KVM_PRODUCER_TOOL: return "tool";
    case KVM_PRODUCER_AGENT: return "agent";
    case KVM_PRODUCER_STATE: return "state";
    case KVM_PRODUCER_TEMPLATE: return "template";
    }
    return "?";
}

uint64_t kvm_ctx_hash(const int32_t *ids, int n) {
    uint64_t h = kvm_hash64(&n, sizeof n, KVM_HASH_SEED);
    return n > 0 ? kvm_hash64(ids, (size_t)n * sizeof(int32_t), h) : h;
}

static int store_reclaim_hook(void *ud, int n_blocks) { return kvm_kv_store_reclaim(ud, n_blocks); }

/* ==== store ========================================================================================= */

kvm_kv_store_t *kvm_kv_store_create(kvm_kv_pool_t *pool, const kvm_rope_params_t *rope) {
    if (!pool || !rope || !rope->inv_freq || rope->n_freq != pool->geom.head_dim / 2) {
        kvm_seterr(KVM_EINVAL, "kv store: need a pool and a RoPE table of head_dim/2 = %d entries (got %d)",
                   pool ? pool->geom.head_dim / 2 : -1, rope ? rope->n_freq : -1);
        return NULL;
    }
    if (pool->reclaim) {
        kvm_seterr(KVM_EBUSY, "kv store: the pool already has a store");
        return NULL;
    }
    kvm_kv_store_t *s = kvm_calloc(1, sizeof *s);
    if (!s) return NULL;
    s->pool = pool;
    s->rope = *rope;
    s->hash_bits = 64;
    s->next_id = 1;
    size_t fb = (size_t)rope->n_freq * sizeof(float);
    s->inv_freq = kvm_malloc(fb);
    s->inv_freq_dev = pool->ops->alloc(fb);
    s->h_block = kvm_malloc(pool->block_bytes);
    s->px_nbuckets = 1024;
    s->px_buckets = kvm_malloc((size_t)s->px_nbuckets * sizeof(int32_t));
    if (!s->inv_freq || !s->inv_freq_dev || !s->h_block || !s->px_buckets) {
        kvm_errctx(KVM_ENOMEM, "kv store");
        kvm_kv_store_free(s);
        return NULL;
    }
    memcpy(s->inv_freq, rope->inv_freq, fb);
    s->rope.inv_freq = s->inv_freq;
    if (pool->ops->h2d(s->inv_freq_dev, s->inv_freq, fb)) {
        kvm_kv_store_free(s);
        return NULL;
    }
    for (int i = 0; i < s->px_nbuckets; i++) s->px_buckets[i] = -1;
    s->px_free = -1;
    pool->reclaim = store_reclaim_hook;
    pool->reclaim_ud = s;
    return s;
}

static void lru_unlink(kvm_kv_store_t *s, kvm_segment_t *g) {
    if (g->prev) g->prev->next = g->next;
    else s->lru_head = g->next;
    if (g->next) g->next->prev = g->prev;
    else s->lru_tail = g->prev;
    g->prev = g->next = NULL;
}

static void lru_push_tail(kvm_kv_store_t *s, kvm_segment_t *g) {
    g->prev = s->lru_tail;
    g->next = NULL;
    if (s->lru_tail) s->lru_tail->next = g;
    else s->lru_head = g;
    s->lru_tail = g;
}

static void segment_drop_blocks(kvm_segment_t *g) {
    if (g->store)
        for (int i = 0; i < g->n_blocks; i++) kvm_kv_block_unref(g->store->pool, g->blocks[i]);
    g->n_blocks = 0;
}

static void segment_destroy(kvm_segment_t *g) {
    segment_drop_blocks(g);
    kvm_free(g->blocks);
    kvm_free(g->ids);
    kvm_free(g->producer_id);
    kvm_free(g);
}

/* Removes g from the store's cache; frees it when no caller holds it. */
static void segment_uncache(kvm_kv_store_t *s, kvm_segment_t *g) {
    if (!g->cached) return;
    lru_unlink(s, g);
    g->cached = false;
    s->n_segments--;
    if (g->info.refcount == 0) segment_destroy(g);
}

void kvm_kv_store_free(kvm_kv_store_t *s) {
    if (!s) return;
    kvm_kv_pool_t *pool = s->pool;
    while (s->lru_head) {
        kvm_segment_t *g = s->lru_head;
        lru_unlink(s, g);
        g->cached = false;
        if (g->info.refcount == 0) {
            segment_destroy(g);
        } else {
            segment_drop_blocks(g); /* orphan: the handle stays valid for info, its KV is gone */
            g->store = NULL;
        }
    }
    for (int i = 0; i < s->px_n; i++)
        if (s->px[i].alive) kvm_kv_block_unref(pool, s->px[i].block);
    kvm_free(s->px);
    kvm_free(s->px_buckets);
    if (s->inv_freq_dev) pool->ops->free(s->inv_freq_dev);
    if (s->d_shift) pool->ops->free(s->d_shift);
    kvm_free(s->h_shift);
    if (s->d_pub) pool->ops->free(s->d_pub);
    kvm_free(s->inv_freq);
    kvm_free(s->h_block);
    if (pool->reclaim_ud == s) {
        pool->reclaim = NULL;
        pool->reclaim_ud = NULL;
    }
    kvm_free(s);
}

kvm_kv_pool_t *kvm_kv_store_pool(const kvm_kv_store_t *s) { return s->pool; }
const kvm_rope_params_t *kvm_kv_store_rope(const kvm_kv_store_t *s) { return &s->rope; }
const float *kvm_kv_store_inv_freq_dev(const kvm_kv_store_t *s) { return s->inv_freq_dev; }

/* ==== prefix index ================================================================================== */

static uint64_t px_mask(const kvm_kv_store_t *s, uint64_t h) {
    return s->hash_bits >= 64 ? h : (s->hash_bits <= 0 ? 0 : (h & ((1ULL << s->hash_bits) - 1)));
}

static uint64_t px_chain(const kvm_kv_store_t *s, uint64_t parent_hash, const int32_t *tokens) {
    return px_mask(s, kvm_hash64(tokens, KVM_KV_BLOCK * sizeof(int32_t), parent_hash ^ 0x9e3779b97f4a7c15ULL));
}

/* Finds the verified entry for (hash, parent, tokens); counts collisions (same hash, other content). */
static int32_t px_find(kvm_kv_store_t *s, uint64_t h, int32_t parent, const int32_t *tokens, bool count) {
    for (int32_t e = s->px_buckets[h % (uint64_t)s->px_nbuckets]; e >= 0; e = s->px[e].next) {
        px_entry_t *x = &s->px[e];
        if (x->hash != h) continue;
        if (x->parent == parent && !memcmp(x->tokens, tokens, sizeof x->tokens)) return e;
        if (count) s->st.index_collisions++;
    }
    return -1;
}

static void px_unlink_bucket(kvm_kv_store_t *s, int32_t e) {
    int32_t *pp = &s->px_buckets[s->px[e].hash % (uint64_t)s->px_nbuckets];
    while (*pp >= 0 && *pp != e) pp = &s->px[*pp].next;
    if (*pp == e) *pp = s->px[e].next;
}

void kvm_prefix_index_set_hash_bits(kvm_kv_store_t *s, int bits) { s->hash_bits = bits; }

int kvm_prefix_index_insert(kvm_kv_store_t *s, const kvm_seq_t *seq, int n_exact) {
    if (!seq || seq->pool != s->pool) return kvm_seterr(KVM_EINVAL, "prefix index: sequence of another pool");
    if (n_exact > seq->n_tokens) n_exact = seq->n_tokens;
    int nb = n_exact / KVM_KV_BLOCK, added = 0;
    uint64_t ph = KVM_HASH_SEED;
    int32_t parent = -1;
    for (int b = 0; b < nb && b < seq->n_blocks; b++) {
        const int32_t *tok = seq->tokens + (size_t)b * KVM_KV_BLOCK;
        uint64_t h = px_chain(s, ph, tok);
        int32_t e = px_find(s, h, parent, tok, false);
        if (e < 0) {
            if (s->px_free >= 0) {
                e = s->px_free;
                s->px_free = s->px[e].next;
            } else {
                int rc = kvm_array_reserve(&s->px, &s->px_cap, (size_t)s->px_n + 1, sizeof *s->px, 256);
                if (rc) return rc;
                e = s->px_n++;
            }
            px_entry_t *x = &s->px[e];
            memset(x, 0, sizeof *x);
            x->hash = h;
            x->parent = parent;
            x->block = seq->blocks[b];
            x->alive = true;
            memcpy(x->tokens, tok, sizeof x->tokens);
            kvm_kv_block_ref(s->pool, x->block);
            uint64_t bi = h % (uint64_t)s->px_nbuckets;
            x->next = s->px_buckets[bi];
            s->px_buckets[bi] = e;
            if (parent >= 0) s->px[parent].n_children++;
            s->st.index_entries++;
            added++;
        }
        s->px[e].last_use = ++s->tick;
        parent = e;
        ph = h;
    }
    return added;
}

int kvm_prefix_index_lookup(kvm_kv_store_t *s, const int32_t *ids, int n, int max_tokens, kvm_seq_t *seq) {
    if (!seq || seq->pool != s->pool) return kvm_seterr(KVM_EINVAL, "prefix index: sequence of another pool");
    if (seq->n_tokens != 0 || seq->n_blocks != 0) return kvm_seterr(KVM_EINVAL, "prefix index: lookup needs an empty sequence");
    if (max_tokens > n) max_tokens = n;
    int nb = max_tokens / KVM_KV_BLOCK;
    s->st.index_lookups++;
    uint64_t ph = KVM_HASH_SEED;
    int32_t parent = -1;
    int hit = 0;
    int32_t *found = nb ? kvm_malloc((size_t)nb * sizeof(int32_t)) : NULL;
    if (nb && !found) return KVM_ENOMEM;
    for (int b = 0; b < nb; b++) {
        const int32_t *tok = ids + (size_t)b * KVM_KV_BLOCK;
        uint64_t h = px_chain(s, ph, tok);
        int32_t e = px_find(s, h, parent, tok, true);
        if (e < 0) break;
        found[hit++] = e;
        parent = e;
        ph = h;
    }
    if (hit) {
        int rc = kvm_array_reserve(&seq->blocks, &seq->cap_blocks, (size_t)hit, sizeof *seq->blocks, 4);
        if (!rc) rc = kvm_seq_push_tokens(seq, ids, hit * KVM_KV_BLOCK);
        if (rc) {
            kvm_free(found);
            return rc;
        }
        for (int b = 0; b < hit; b++) {
            px_entry_t *x = &s->px[found[b]];
            kvm_kv_block_ref(s->pool, x->block);
            seq->blocks[seq->n_blocks++] = x->block;
            x->last_use = ++s->tick;
        }
        s->st.index_hit_blocks += (uint64_t)hit;
    }
    kvm_free(found);
    return hit * KVM_KV_BLOCK;
}

/* ==== budget / eviction ============================================================================= */

int kvm_kv_store_reclaim(kvm_kv_store_t *s, int n_blocks) {
    kvm_kv_pool_t *p = s->pool;
    while (p->n_free < n_blocks) {
        /* 1. the least recently used segment nobody holds */
        kvm_segment_t *victim = NULL;
        for (kvm_segment_t *g = s->lru_head; g; g = g->next)
            if (g->info.refcount == 0 && !g->info.pinned) {
                victim = g;
                break;
            }
        if (victim) {
            KVM_LOGD("kv store: evicting segment %llu (%d tokens, %s)", (unsigned long long)victim->info.id,
                     victim->info.n_tokens, kvm_producer_kind_name(victim->info.producer_kind));
            s->st.evicted_segments++;
            segment_uncache(s, victim);
            continue;
        }
        /* 2. the least recently used prefix leaf whose block only the index holds */
        int32_t best = -1;
        for (int32_t e = 0; e < s->px_n; e++) {
            px_entry_t *x = &s->px[e];
            if (!x->alive || x->n_children || p->refcount[x->block] != 1) continue;
            if (best < 0 || x->last_use < s->px[best].last_use) best = e;
        }
        if (best < 0) {
            /* 3. a holder of segments lets one go (then 1 and 2 again) */
            if (s->holder && s->holder(s->holder_ctx) > 0) continue;
            break;
        }
        px_entry_t *x = &s->px[best];
        px_unlink_bucket(s, best);
        if (x->parent >= 0) s->px[x->parent].n_children--;
        kvm_kv_block_unref(p, x->block);
        x->alive = false;
        x->next = s->px_free;
        s->px_free = best;
        s->st.index_entries--;
        s->st.evicted_index_blocks++;
    }
    if (p->n_free >= n_blocks) return 0;
    return kvm_seterr(KVM_ENOMEM, "KV budget exhausted: %d blocks needed, %d of %d free after evicting every "
                      "unreferenced segment and prefix block; raise the KV budget or release segments",
                      n_blocks, p->n_free, p->n_blocks);
}

void kvm_kv_store_stats(const kvm_kv_store_t *s, kvm_kv_store_stats_t *out) {
    *out = s->st;
    out->n_blocks = s->pool->n_blocks;
    out->n_free = s->pool->n_free;
    out->n_segments = s->n_segments;
    out->n_segments_pinned = 0;
    out->segment_blocks = 0;
    for (kvm_segment_t *g = s->lru_head; g; g = g->next) {
        out->segment_blocks += g->n_blocks;
        if (g->info.pinned) out->n_segments_pinned++;
    }
    out->index_blocks_only = 0;
    for (int e = 0; e < s->px_n; e++)
        if (s->px[e].alive && s->pool->refcount[s->px[e].block] == 1) out->index_blocks_only++;
}

/* ==== raw rows ====================================================================================== */

/* Rows [pos, pos+n) touch blocks pos/16 .. (pos+n-1)/16; on a device backend they are staged whole in
 * host memory (one copy per block), then converted in parallel over (block, layer). */
static int rows_stage(const kvm_kv_pool_t *p, const int32_t *blocks, int b0, int nb, bool load, int pos, int n,
                      unsigned char **stage) {
    *stage = NULL;
    if (p->ops == kvm_ops_cpu()) return 0;
    unsigned char *st = kvm_malloc((size_t)nb * p->block_bytes);
    if (!st) return KVM_ENOMEM;
    for (int i = 0; i < nb; i++) {
        int first = (b0 + i) * KVM_KV_BLOCK, last = first + KVM_KV_BLOCK;
        bool whole = first >= pos && last <= pos + n;
        if (!load && whole) continue; /* fully overwritten */
        int rc = p->ops->d2h(st + (size_t)i * p->block_bytes, (const char *)p->data + (size_t)blocks[b0 + i] * p->block_bytes,
                             p->block_bytes);
        if (rc) {
            kvm_free(st);
            return rc;
        }
    }
    *stage = st;
    return 0;
}

typedef struct {
    const kvm_kv_pool_t *p;
    const int32_t *blocks;
    unsigned char *stage; /* the blocks b0.. staged in host memory, or NULL (the pool is host memory) */
    int pos, n, b0;
    float *rows;
    bool read;
} rows_task_t;

/* rows_copy over the (block, layer) pairs [i0, i1), block b0 + i / L */
static void rows_task(void *ctx, int i0, int i1, int tid) {
    const rows_task_t *c = ctx;
    const kvm_kv_pool_t *p = c->p;
    const kvm_kv_geom_t *g = &p->geom;
    const int L = g->n_layers, H = g->n_kv_heads, D = g->head_dim, pos = c->pos, n = c->n;
    const kvm_dtype_t dt = g->dtype;
    for (int i = i0; i < i1; i++) {
        const int bi = i / L, l = i % L;
        int first = (c->b0 + bi) * KVM_KV_BLOCK;
        int s0 = first < pos ? pos - first : 0;
        int s1 = first + KVM_KV_BLOCK > pos + n ? pos + n - first : KVM_KV_BLOCK;
        void *base = c->stage ? (void *)(c->stage + (size_t)bi * p->block_bytes) : p->data;
        int32_t sblk = c->stage ? 0 : c->blocks[c->b0 + bi];
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < H; h++)
                for (int sl = s0; sl < s1; sl++) {
                    size_t ei = kv_elem(g, sblk, l, kv, h, sl);
                    int t = first + sl - pos;
                    float *r = c->rows + ((((size_t)l * 2 + kv) * H + h) * n + t) * D;
                    if (c->read && dt == KVM_F32) memcpy(r, (const float *)base + ei, (size_t)D * sizeof(float));
                    else if (c->read)
                        for (int d = 0; d < D; d++) r[d] = load_elem(base, dt, ei + d);
                    else if (dt == KVM_F32) memcpy((float *)base + ei, r, (size_t)D * sizeof(float));
                    else
                        for (int d = 0; d < D; d++) store_elem(base, dt, ei + d, r[d]);
                }
    }
}

/* Copies rows [pos, pos+n) between the pool and `rows` ([L][2][H][n][D] floats): out of the pool into
 * `rows` when `read`, otherwise from `rows` into the pool (then `rows` is only read). */
static int rows_copy(const kvm_kv_pool_t *p, const int32_t *blocks, int pos, int n, float *rows, bool read) {
    if (n <= 0) return 0;
    const kvm_kv_geom_t *g = &p->geom;
    const int L = g->n_layers, H = g->n_kv_heads, D = g->head_dim;
    const int b0 = pos / KVM_KV_BLOCK, nb = (pos + n - 1) / KVM_KV_BLOCK - b0 + 1;
    unsigned char *stage = NULL;
    int rc = rows_stage(p, blocks, b0, nb, read, pos, n, &stage);
    if (rc) return rc;
    rows_task_t c = {.p = p, .blocks = blocks, .stage = stage, .pos = pos, .n = n, .b0 = b0, .rows = rows, .read = read};
    /* one thread below 2^18 elements: a small copy is done before a second thread would start */
    const bool par = (size_t)n * L * H * D > ((size_t)1 << 18);
    kvm_cpu_parallel_for(nb * L, par ? 1 : nb * L, rows_task, &c);
    for (int bi = 0; stage && !read && bi < nb && !rc; bi++)
        rc = p->ops->h2d((char *)p->data + (size_t)blocks[b0 + bi] * p->block_bytes, stage + (size_t)bi * p->block_bytes,
                         p->block_bytes);
    kvm_free(stage);
    return rc;
}

int kvm_kv_read_rows(const kvm_kv_pool_t *p, const int32_t *blocks, int pos, int n, float *out) {
    return rows_copy(p, blocks, pos, n, out, true);
}

int kvm_kv_write_rows(kvm_kv_pool_t *p, const int32_t *blocks, int pos, int n, const float *in) {
    return rows_copy(p, blocks, pos, n, (float *)in, false); /* not written through: read == false */
}

/* ==== shifts ======================================================================================== */

int kvm_kv_shift(kvm_kv_store_t *s, const int32_t *blocks, int pos, int n, int32_t delta, const int32_t *deltas) {
    if (n <= 0) return 0;
    if (n > s->shift_cap) {
        int cap = s->shift_cap ? s->shift_cap : 256;
        while (cap < n) cap *= 2;
        int32_t *h = kvm_realloc(s->h_shift, (size_t)cap * 3 * sizeof(int32_t));
        if (!h) return KVM_ENOMEM;
        s->h_shift = h;
        int32_t *d = s->pool->ops->alloc((size_t)cap * 3 * sizeof(int32_t));
        if (!d) return kvm_errctx(KVM_ENOMEM, "kv shift scratch");
        if (s->d_shift) s->pool->ops->free(s->d_shift);
        s->d_shift = d;
        s->shift_cap = cap;
    }
    int32_t *hb = s->h_shift, *hs = hb + n, *hd = hb + 2 * (size_t)n;
    bool any = false;
    for (int i = 0; i < n; i++) {
        int p = pos + i;
        hb[i] = blocks[p / KVM_KV_BLOCK];
        hs[i] = p % KVM_KV_BLOCK;
        hd[i] = deltas ? deltas[i] : delta;
        any |= hd[i] != 0;
    }
    if (!any) return 0;
    int rc = s->pool->ops->h2d(s->d_shift, s->h_shift, (size_t)n * 3 * sizeof(int32_t));
    if (rc) return rc;
    s->pool->ops->rope_shift(s->pool->data, &s->pool->geom, s->d_shift, s->d_shift + n, s->d_shift + 2 * (size_t)n, n,
                             s->inv_freq_dev, s->rope.layout);
    return 0;
}

void kvm_rope_rotate_rows(float *x, int n, int D, int row_stride, int32_t delta, const int32_t *deltas,
                          const float *inv_freq, kvm_rope_layout_t layout) {
    for (int i = 0; i < n; i++) {
        int32_t dl = deltas ? deltas[i] : delta;
        if (dl) kvm_rope_rotate_vec(x + (size_t)i * row_stride, D, (double)dl, inv_freq, layout);
    }
}

/* ==== sequences ===================================================================================== */

int kvm_seq_share_prefix(kvm_seq_t *dst, const kvm_seq_t *src, int n) {
    if (dst->pool != src->pool) return kvm_seterr(KVM_EINVAL, "kv: cannot share blocks across pools");
    if (dst->n_tokens || dst->n_blocks) return kvm_seterr(KVM_EINVAL, "kv: share_prefix needs an empty sequence");
    if (n < 0 || n > src->n_tokens)
        return kvm_seterr(KVM_ERANGE, "kv: share of %d tokens from a sequence of %d", n, src->n_tokens);
    int nb = (n + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK;
    int rc = kvm_array_reserve(&dst->blocks, &dst->cap_blocks, (size_t)(nb ? nb : 1), sizeof *dst->blocks, 4);
    if (rc) return rc;
    rc = kvm_seq_push_tokens(dst, src->tokens, n);
    if (rc) return rc;
    for (int i = 0; i < nb; i++) {
        kvm_kv_block_ref(dst->pool, src->blocks[i]);
        dst->blocks[dst->n_blocks++] = src->blocks[i];
    }
    return 0;
}

/* ==== segments ====================================================================================== */

static kvm_segment_t *segment_new(kvm_kv_store_t *s, const int32_t *ids, int n, int32_t frame,
                                  const kvm_segment_info_t *meta) {
    kvm_segment_t *g = kvm_calloc(1, sizeof *g);
    if (!g) return NULL;
    g->store = s;
    int nb = (n + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK;
    g->ids = kvm_malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    g->blocks = kvm_malloc((size_t)(nb ? nb : 1) * sizeof(int32_t));
    g->producer_id = kvm_strdup(meta && meta->producer_id ? meta->producer_id : "");
    if (!g->ids || !g->blocks || !g->producer_id) {
        segment_destroy(g);
        return NULL;
    }
    if (n) memcpy(g->ids, ids, (size_t)n * sizeof(int32_t));
    if (meta) g->info = *meta;
    g->info.id = 0;
    g->info.model_id = s->pool->model_id;
    g->info.frame = frame;
    g->info.n_tokens = n;
    g->info.ids = g->ids;
    g->info.producer_id = g->producer_id;
    g->info.refcount = 1;
    g->info.pinned = false;
    g->info.bytes = (size_t)nb * s->pool->block_bytes;
    /* blocks: reclaim first so that an exhausted budget fails cleanly before anything is taken */
    if (nb > s->pool->n_free && kvm_kv_store_reclaim(s, nb) != 0) {
        kvm_errctx(KVM_ENOMEM, "segment of %d tokens (%s '%s')", n, kvm_producer_kind_name(g->info.producer_kind),
                   g->producer_id);
        segment_destroy(g);
        return NULL;
    }
    for (int i = 0; i < nb; i++) g->blocks[g->n_blocks++] = kvm_kv_block_alloc(s->pool);
    return g;
}

static void segment_cache(kvm_kv_store_t *s, kvm_segment_t *g) {
    g->info.id = s->next_id++;
    g->cached = true;
    g->last_use = ++s->tick;
    lru_push_tail(s, g);
    s->n_segments++;
}

/* Rows [first, first + n) of seq into the segment's blocks from position 0, keys re-rotated by `rebase`. With the
 * backend's kvcomm_apply (no anchors: shift and scatter only, the same numerics as rope_shift) this is one kernel
 * on the backend's memory; without it, a host round trip (read as fp32, write back, shift in place). On a GPU
 * the round trip costs ~200 ms for 1K tokens of an 8B model (one small copy per (block, layer, K/V, head)). */
static int publish_rows(kvm_kv_store_t *s, const kvm_seq_t *seq, int first, int n, int rebase, kvm_segment_t *g) {
    const kvm_ops_t *o = s->pool->ops;
    if (o->kvcomm_apply && (!rebase || s->inv_freq_dev)) {
        const int nb_src = (first + n + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK, nb_dst = g->n_blocks;
        if (nb_src + nb_dst > s->pub_cap) {
            int cap = s->pub_cap ? s->pub_cap : 1024;
            while (cap < nb_src + nb_dst) cap *= 2;
            int32_t *d = o->alloc((size_t)cap * sizeof(int32_t));
            if (!d) return kvm_errctx(KVM_ENOMEM, "segment publish: block tables");
            if (s->d_pub) o->free(s->d_pub);
            s->d_pub = d;
            s->pub_cap = cap;
        }
        int rc = o->h2d(s->d_pub, seq->blocks, (size_t)nb_src * sizeof(int32_t));
        if (!rc) rc = o->h2d(s->d_pub + nb_src, g->blocks, (size_t)nb_dst * sizeof(int32_t));
        kvm_kvcomm_apply_args_t a = {.g = s->pool->geom,
                                     .src = {.data = s->pool->data, .blocks = s->d_pub, .start = first},
                                     .n = 0,
                                     .r0 = 0,
                                     .r1 = n,
                                     .dst_kv = s->pool->data,
                                     .dst_blocks = s->d_pub + nb_src,
                                     .dst_pos = 0,
                                     .shift = rebase,
                                     .inv_freq = s->inv_freq_dev,
                                     .layout = s->rope.layout,
                                     .dst_n_blocks = nb_dst};
        if (!rc) rc = o->kvcomm_apply(&a);
        return rc;
    }
    size_t elems = (size_t)s->pool->geom.n_layers * 2 * s->pool->geom.n_kv_heads * n * s->pool->geom.head_dim;
    float *buf = kvm_malloc(elems * sizeof(float));
    int rc = buf ? kvm_kv_read_rows(s->pool, seq->blocks, first, n, buf) : KVM_ENOMEM;
    if (!rc) rc = kvm_kv_write_rows(s->pool, g->blocks, 0, n, buf);
    kvm_free(buf);
    if (!rc && rebase) rc = kvm_kv_shift(s, g->blocks, 0, n, rebase, NULL);
    return rc;
}

int kvm_segment_publish(kvm_kv_store_t *s, const kvm_seq_t *seq, int first, int n, int rebase,
                        const kvm_segment_info_t *meta, kvm_segment_t **out) {
    *out = NULL;
    if (!seq || seq->pool != s->pool) return kvm_seterr(KVM_EINVAL, "segment publish: sequence of another pool");
    if (first < 0 || n <= 0 || first + n > seq->n_tokens)
        return kvm_seterr(KVM_ERANGE, "segment publish: rows [%d, %d) outside the sequence's %d tokens", first, first + n,
                          seq->n_tokens);
    kvm_segment_t *g = segment_new(s, seq->tokens + first, n, first + rebase, meta);
    if (!g) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    int rc = publish_rows(s, seq, first, n, rebase, g);
    if (rc) {
        segment_destroy(g);
        return rc;
    }
    segment_cache(s, g);
    *out = g;
    return 0;
}

int kvm_segment_publish_f32(kvm_kv_store_t *s, const float *kv, const int32_t *ids, int n, int32_t frame,
                            const kvm_segment_info_t *meta, kvm_segment_t **out) {
    *out = NULL;
    if (n <= 0) return kvm_seterr(KVM_EINVAL, "segment publish: empty segment");
    kvm_segment_t *g = segment_new(s, ids, n, frame, meta);
    if (!g) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    int rc = kvm_kv_write_rows(s->pool, g->blocks, 0, n, kv);
    if (rc) {
        segment_destroy(g);
        return rc;
    }
    segment_cache(s, g);
    *out = g;
    return 0;
}

void kvm_segment_ref(kvm_segment_t *g) { g->info.refcount++; }

void kvm_kv_store_set_holder(kvm_kv_store_t *s, int (*release_one)(void *ctx), void *ctx) {
    s->holder = release_one;
    s->holder_ctx = ctx;
}

void kvm_segment_release(kvm_segment_t *g) {
    if (!g) return;
    KVM_ASSERT(g->info.refcount > 0);
    if (--g->info.refcount == 0 && !g->cached) segment_destroy(g);
}

kvm_segment_t *kvm_segment_get(kvm_kv_store_t *s, uint64_t id) {
    for (kvm_segment_t *g = s->lru_head; g; g = g->next)
        if (g->info.id == id) {
            g->info.refcount++;
            return g;
        }
    kvm_seterr(KVM_ESTALE, "segment %llu is not in the KV store (evicted or never published)", (unsigned long long)id);
    return NULL;
}

void kvm_segment_pin(kvm_segment_t *g, bool pinned) { g->info.pinned = pinned; }
const kvm_segment_info_t *kvm_segment_info(const kvm_segment_t *g) { return &g->info; }
kvm_kv_store_t *kvm_segment_store(const kvm_segment_t *g) { return g->store; }

void kvm_segment_touch(kvm_segment_t *g) {
    kvm_kv_store_t *s = g->store;
    if (!s || !g->cached) return;
    g->last_use = ++s->tick;
    lru_unlink(s, g);
    lru_push_tail(s, g);
}

int kvm_segment_check(const kvm_segment_t *g, const kvm_kv_pool_t *pool, int32_t frame) {
    if (!g) return kvm_seterr(KVM_EINVAL, "segment: NULL handle");
    if (!g->store) return kvm_seterr(KVM_ESTALE, "segment %llu: its KV store was freed", (unsigned long long)g->info.id);
    if (g->info.model_id != pool->model_id)
        return kvm_seterr(KVM_EMODEL, "segment %llu (%s '%s') was computed by model %016llx, not by this model %016llx",
                          (unsigned long long)g->info.id, kvm_producer_kind_name(g->info.producer_kind),
                          g->info.producer_id, (unsigned long long)g->info.model_id,
                          (unsigned long long)pool->model_id);
    if (g->store->pool != pool)
        return kvm_seterr(KVM_EMODEL, "segment %llu lives in another KV pool (same model id, other backend or store)",
                          (unsigned long long)g->info.id);
    if (g->info.frame != frame)
        return kvm_seterr(KVM_EFRAME, "segment %llu (%s '%s') has keys in frame %d, expected frame %d",
                          (unsigned long long)g->info.id, kvm_producer_kind_name(g->info.producer_kind),
                          g->info.producer_id, g->info.frame, frame);
    return 0;
}

int kvm_segment_read_f32(const kvm_segment_t *g, int first, int n, float *out) {
    if (!g->store) return kvm_seterr(KVM_ESTALE, "segment %llu: its KV store was freed", (unsigned long long)g->info.id);
    if (first < 0 || n < 0 || first + n > g->info.n_tokens)
        return kvm_seterr(KVM_ERANGE, "segment %llu: rows [%d, %d) of %d", (unsigned long long)g->info.id, first,
                          first + n, g->info.n_tokens);
    return kvm_kv_read_rows(g->store->pool, g->blocks, first, n, out);
}

const int32_t *kvm_segment_blocks(const kvm_segment_t *g, int *n_blocks) {
    if (n_blocks) *n_blocks = g->n_blocks;
    return g->blocks;
}

int kvm_seq_append_segment(kvm_seq_t *seq, kvm_kv_store_t *s, const kvm_segment_t *g, int n) {
    int rc = kvm_segment_check(g, seq->pool, g->info.frame);
    if (rc) return rc;
    if (g->store != s) return kvm_seterr(KVM_EMODEL, "segment %llu belongs to another KV store", (unsigned long long)g->info.id);
    if (n < 0 || n > g->info.n_tokens) n = g->info.n_tokens;
    int pos = seq->n_tokens;
    size_t elems = (size_t)s->pool->geom.n_layers * 2 * s->pool->geom.n_kv_heads * n * s->pool->geom.head_dim;
    float *buf = kvm_malloc(elems * sizeof(float));
    if (!buf) return KVM_ENOMEM;
    int old_blocks = seq->n_blocks;
    rc = kvm_kv_read_rows(s->pool, g->blocks, 0, n, buf);
    if (!rc) rc = kvm_seq_reserve(seq, pos + n);
    if (!rc) rc = kvm_kv_write_rows(s->pool, seq->blocks, pos, n, buf);
    if (!rc) rc = kvm_kv_shift(s, seq->blocks, pos, n, pos - g->info.frame, NULL);
    if (!rc) rc = kvm_seq_push_tokens(seq, g->ids, n);
    kvm_free(buf);
    if (rc) {
        while (seq->n_blocks > old_blocks) kvm_kv_block_unref(seq->pool, seq->blocks[--seq->n_blocks]);
        return rc;
    }
    kvm_segment_touch((kvm_segment_t *)g);
    return 0;
}
