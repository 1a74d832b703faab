/* test_kv_store.c - the shared KV store: prefix index, segments, budget/LRU, RoPE shifts (no shared data). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "runtime/core/core.h"
#include "runtime/kv/store.h"
#include "test_common.h"

#define L 3
#define H 2
#define D 8

static float g_inv_freq[D / 2];

static kvm_kv_pool_t *make_pool(int n_blocks, uint64_t model_id, kvm_dtype_t dt) {
    kvm_kv_geom_t g = {.n_layers = L, .n_kv_heads = H, .head_dim = D, .dtype = dt};
    return kvm_kv_pool_create(kvm_ops_cpu(), &g, n_blocks, model_id);
}

static kvm_kv_store_t *make_store(kvm_kv_pool_t *p, kvm_rope_layout_t layout) {
    for (int j = 0; j < D / 2; j++) g_inv_freq[j] = (float)pow(10000.0, -2.0 * j / D);
    kvm_rope_params_t r = {.inv_freq = g_inv_freq, .n_freq = D / 2, .layout = layout};
    return kvm_kv_store_create(p, &r);
}

static uint64_t g_rng = 0x1234567u;
static float frand(void) {
    g_rng = g_rng * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((g_rng >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f + 1e-3f;
}

/* Fills rows 0..n-1 of seq with random KV and the given ids (as if a forward had computed them). */
static void fill_seq(kvm_seq_t *s, const int32_t *ids, int n) {
    assert_int_equal(kvm_seq_reserve(s, s->n_tokens + n), 0);
    size_t e = (size_t)L * 2 * H * n * D;
    float *buf = malloc(e * sizeof(float));
    for (size_t i = 0; i < e; i++) buf[i] = frand();
    assert_int_equal(kvm_kv_write_rows(s->pool, s->blocks, s->n_tokens, n, buf), 0);
    assert_int_equal(kvm_seq_push_tokens(s, ids, n), 0);
    free(buf);
}

static void test_prefix_lookup_shares_the_registered_blocks(void **st) {
    (void)st;
    kvm_kv_pool_t *p = make_pool(32, 1, KVM_F32);
    kvm_kv_store_t *s = make_store(p, KVM_ROPE_HALF);
    int32_t ids[40];
    for (int i = 0; i < 40; i++) ids[i] = 100 + i;
    kvm_seq_t a, b;
    kvm_seq_init(&a, p);
    kvm_seq_init(&b, p);
    fill_seq(&a, ids, 40);
    assert_int_equal(kvm_prefix_index_insert(s, &a, 40), 2); /* two full blocks */
    assert_int_equal(kvm_prefix_index_lookup(s, ids, 40, 39, &b), 32);
    assert_int_equal(b.n_tokens, 32);
    assert_int_equal(b.blocks[0], a.blocks[0]);
    assert_int_equal(b.blocks[1], a.blocks[1]);
    assert_int_equal(p->refcount[a.blocks[0]], 3); /* a, the index, b */
    kvm_seq_free(&a);
    kvm_seq_free(&b);
    kvm_kv_store_free(s);
    assert_int_equal(p->n_free, 32);
    kvm_kv_pool_free(p);
}

static void test_prefix_hit_never_returns_blocks_of_other_tokens_under_forced_collisions(void **st) {
    (void)st;
    kvm_kv_pool_t *p = make_pool(32, 1, KVM_F32);
    kvm_kv_store_t *s = make_store(p, KVM_ROPE_HALF);
    kvm_prefix_index_set_hash_bits(s, 0); /* every block hashes to 0 */
    int32_t x[32], y[32], z[32];
    for (int i = 0; i < 32; i++) {
        x[i] = i;
        y[i] = i + 1000;
        z[i] = i < 16 ? 1000 + i : i; /* second block equal to x's second block, behind another first block */
    }
    kvm_seq_t a, b, c;
    kvm_seq_init(&a, p);
    fill_seq(&a, x, 32);
    assert_int_equal(kvm_prefix_index_insert(s, &a, 32), 2);
    kvm_seq_init(&b, p);
    assert_int_equal(kvm_prefix_index_lookup(s, y, 32, 32, &b), 0);
    assert_int_equal(b.n_blocks, 0);
    /* a chain whose block tokens match but whose parent differs must not hit either */
    kvm_seq_init(&c, p);
    fill_seq(&c, z, 16);
    kvm_prefix_index_insert(s, &c, 16);
    kvm_seq_t d;
    kvm_seq_init(&d, p);
    int got = kvm_prefix_index_lookup(s, z, 32, 32, &d);
    assert_int_equal(got, 16);
    assert_int_equal(d.blocks[0], c.blocks[0]);
    for (int i = 0; i < got; i++) assert_int_equal(d.tokens[i], z[i]);
    kvm_kv_store_stats_t stt;
    kvm_kv_store_stats(s, &stt);
    assert_true(stt.index_collisions > 0);
    kvm_seq_free(&a);
    kvm_seq_free(&b);
    kvm_seq_free(&c);
    kvm_seq_free(&d);
    kvm_kv_store_free(s);
    kvm_kv_pool_free(p);
}

static void test_budget_exhaustion_fails_cleanly_and_corrupts_nothing(void **st) {
    (void)st;
    kvm_kv_pool_t *p = make_pool(4, 1, KVM_F32);
    kvm_kv_store_t *s = make_store(p, KVM_ROPE_HALF);
    int32_t ids[48];
    for (int i = 0; i < 48; i++) ids[i] = i + 1;
    kvm_seq_t a;
    kvm_seq_init(&a, p);
    fill_seq(&a, ids, 48); /* 3 blocks */
    float before[L * 2 * H * 48 * D];
    assert_int_equal(kvm_kv_read_rows(p, a.blocks, 0, 48, before), 0);
    kvm_segment_t *g = NULL;
    kvm_segment_info_t meta = {.producer_kind = KVM_PRODUCER_INPUT, .producer_id = "input"};
    /* a 32-token segment needs 2 blocks, only 1 is free and nothing is evictable */
    assert_int_equal(kvm_segment_publish(s, &a, 0, 32, 0, &meta, &g), KVM_ENOMEM);
    assert_null(g);
    assert_non_null(strstr(kvm_errmsg(), "KV budget exhausted"));
    assert_int_equal(p->n_free, 1);
    float after[L * 2 * H * 48 * D];
    assert_int_equal(kvm_kv_read_rows(p, a.blocks, 0, 48, after), 0);
    assert_memory_equal(before, after, sizeof before);
    kvm_seq_t b;
    kvm_seq_init(&b, p);
    assert_int_equal(kvm_seq_reserve(&b, 40), KVM_ENOMEM);
    assert_int_equal(b.n_blocks, 0);
    assert_int_equal(p->n_free, 1);
    kvm_seq_free(&a);
    kvm_seq_free(&b);
    kvm_kv_store_free(s);
    kvm_kv_pool_free(p);
}

static void test_lru_eviction_drops_the_oldest_unreferenced_unpinned_segment(void **st) {
    (void)st;
    kvm_kv_pool_t *p = make_pool(6, 1, KVM_F32);
    kvm_kv_store_t *s = make_store(p, KVM_ROPE_HALF);
    int32_t ids[16];
    for (int i = 0; i < 16; i++) ids[i] = i + 7;
    kvm_seq_t a;
    kvm_seq_init(&a, p);
    fill_seq(&a, ids, 16); /* 1 block */
    kvm_segment_info_t meta = {.producer_kind = KVM_PRODUCER_TOOL, .producer_id = "t"};
    kvm_segment_t *g1, *g2, *g3, *g4;
    assert_int_equal(kvm_segment_publish(s, &a, 0, 16, 0, &meta, &g1), 0);
    assert_int_equal(kvm_segment_publish(s, &a, 0, 16, 0, &meta, &g2), 0);
    assert_int_equal(kvm_segment_publish(s, &a, 0, 16, 0, &meta, &g3), 0);
    uint64_t id1 = kvm_segment_info(g1)->id, id2 = kvm_segment_info(g2)->id, id3 = kvm_segment_info(g3)->id;
    kvm_segment_pin(g1, true);
    kvm_segment_release(g1); /* pinned: never evicted */
    kvm_segment_release(g2); /* unreferenced: evictable */
    kvm_segment_release(g3);
    kvm_segment_touch(g3);   /* g3 is more recent than g2 */
    /* 2 free; ask for 4 blocks: evicts g2 then g3, never g1 */
    kvm_seq_t b;
    kvm_seq_init(&b, p);
    assert_int_equal(kvm_seq_reserve(&b, 64), 0);
    assert_null(kvm_segment_get(s, id2));
    assert_int_equal(kvm_errcode(), KVM_ESTALE);
    assert_null(kvm_segment_get(s, id3));
    kvm_segment_t *again = kvm_segment_get(s, id1);
    assert_non_null(again);
    kvm_segment_release(again);
    /* a held segment survives pressure too */
    kvm_seq_free(&b);
    assert_int_equal(kvm_segment_publish(s, &a, 0, 16, 0, &meta, &g4), 0);
    kvm_seq_init(&b, p);
    assert_int_equal(kvm_seq_reserve(&b, 64), KVM_ENOMEM);
    assert_int_equal(kvm_segment_info(g4)->n_tokens, 16);
    kvm_segment_release(g4);
    kvm_seq_free(&a);
    kvm_seq_free(&b);
    kvm_kv_store_free(s);
    assert_int_equal(p->n_free, 6);
    kvm_kv_pool_free(p);
}

static void test_segment_of_another_model_is_rejected_with_emodel(void **st) {
    (void)st;
    kvm_kv_pool_t *p1 = make_pool(4, 1, KVM_F32), *p2 = make_pool(4, 2, KVM_F32);
    kvm_kv_store_t *s1 = make_store(p1, KVM_ROPE_HALF), *s2 = make_store(p2, KVM_ROPE_HALF);
    int32_t ids[5] = {1, 2, 3, 4, 5};
    kvm_seq_t a;
    kvm_seq_init(&a, p1);
    fill_seq(&a, ids, 5);
    kvm_segment_t *g;
    kvm_segment_info_t meta = {.producer_kind = KVM_PRODUCER_AGENT, .producer_id = "x"};
    assert_int_equal(kvm_segment_publish(s1, &a, 0, 5, 0, &meta, &g), 0);
    kvm_seq_t b;
    kvm_seq_init(&b, p2);
    int free_before = p2->n_free;
    assert_int_equal(kvm_seq_append_segment(&b, s2, g, -1), KVM_EMODEL);
    assert_non_null(strstr(kvm_errmsg(), "model"));
    assert_int_equal(b.n_tokens, 0);
    assert_int_equal(p2->n_free, free_before);
    kvm_segment_release(g);
    kvm_seq_free(&a);
    kvm_seq_free(&b);
    kvm_kv_store_free(s1);
    kvm_kv_store_free(s2);
    kvm_kv_pool_free(p1);
    kvm_kv_pool_free(p2);
}

static void test_frame_mismatch_is_eframe(void **st) {
    (void)st;
    kvm_kv_pool_t *p = make_pool(4, 1, KVM_F32);
    kvm_kv_store_t *s = make_store(p, KVM_ROPE_HALF);
    int32_t ids[5] = {1, 2, 3, 4, 5};
    kvm_seq_t a;
    kvm_seq_init(&a, p);
    fill_seq(&a, ids, 5);
    kvm_segment_t *g;
    kvm_segment_info_t meta = {.producer_kind = KVM_PRODUCER_AGENT, .producer_id = "x"};
    assert_int_equal(kvm_segment_publish(s, &a, 2, 3, 0, &meta, &g), 0); /* kept in frame 2 */
    assert_int_equal(kvm_segment_info(g)->frame, 2);
    assert_int_equal(kvm_segment_check(g, p, 0), KVM_EFRAME);
    assert_non_null(strstr(kvm_errmsg(), "frame 2"));
    assert_int_equal(kvm_segment_check(g, p, 2), 0);
    kvm_segment_release(g);
    kvm_seq_free(&a);
    kvm_kv_store_free(s);
    kvm_kv_pool_free(p);
}

static void shift_roundtrip(kvm_rope_layout_t layout) {
    kvm_kv_pool_t *p = make_pool(8, 1, KVM_F32);
    kvm_kv_store_t *s = make_store(p, layout);
    int32_t ids[37];
    for (int i = 0; i < 37; i++) ids[i] = i;
    kvm_seq_t a;
    kvm_seq_init(&a, p);
    fill_seq(&a, ids, 37);
    size_t e = (size_t)L * 2 * H * 37 * D;
    float *x0 = malloc(e * 4), *x1 = malloc(e * 4);
    assert_int_equal(kvm_kv_read_rows(p, a.blocks, 0, 37, x0), 0);
    assert_int_equal(kvm_kv_shift(s, a.blocks, 3, 30, 4093, NULL), 0);
    assert_int_equal(kvm_kv_read_rows(p, a.blocks, 0, 37, x1), 0);
    assert_true(tc_max_rel(x1, x0, e) > 1e-2); /* it did move */
    assert_int_equal(kvm_kv_shift(s, a.blocks, 3, 30, -4093, NULL), 0);
    assert_int_equal(kvm_kv_read_rows(p, a.blocks, 0, 37, x1), 0);
    assert_true(tc_max_rel(x1, x0, e) <= 1e-6);
    /* values never move */
    for (int l = 0; l < L; l++)
        assert_memory_equal(x1 + ((size_t)l * 2 + 1) * H * 37 * D, x0 + ((size_t)l * 2 + 1) * H * 37 * D, (size_t)H * 37 * D * 4);
    free(x0);
    free(x1);
    kvm_seq_free(&a);
    kvm_kv_store_free(s);
    kvm_kv_pool_free(p);
}

static void test_shift_by_d_then_minus_d_is_identity_rotate_half(void **st) {
    (void)st;
    shift_roundtrip(KVM_ROPE_HALF);
}

static void test_shift_by_d_then_minus_d_is_identity_interleaved(void **st) {
    (void)st;
    shift_roundtrip(KVM_ROPE_INTERLEAVED);
}

/* shift(rope(k, p), d) == rope(k, p + d) for random pre-RoPE k */
static void shift_matches_fresh(kvm_rope_layout_t layout) {
    kvm_kv_pool_t *p = make_pool(2, 1, KVM_F32);
    kvm_kv_store_t *s = make_store(p, layout);
    const int n = 5, pos0 = 17, dl = 8000 - 17;
    size_t e = (size_t)L * 2 * H * n * D;
    float *raw = malloc(e * 4), *at_p = malloc(e * 4), *want = malloc(e * 4), *got = malloc(e * 4);
    for (size_t i = 0; i < e; i++) raw[i] = frand();
    memcpy(at_p, raw, e * 4);
    memcpy(want, raw, e * 4);
    int32_t pp[5], pw[5];
    for (int i = 0; i < n; i++) {
        pp[i] = pos0 + i;
        pw[i] = pos0 + dl + i;
    }
    for (int l = 0; l < L; l++)
        for (int h = 0; h < H; h++) {
            size_t off = (((size_t)l * 2 + 0) * H + h) * n * D;
            kvm_rope_rotate_rows(at_p + off, n, D, D, 0, pp, g_inv_freq, layout);
            kvm_rope_rotate_rows(want + off, n, D, D, 0, pw, g_inv_freq, layout);
        }
    kvm_seq_t a;
    kvm_seq_init(&a, p);
    assert_int_equal(kvm_seq_reserve(&a, n), 0);
    assert_int_equal(kvm_kv_write_rows(p, a.blocks, 0, n, at_p), 0);
    assert_int_equal(kvm_kv_shift(s, a.blocks, 0, n, dl, NULL), 0);
    assert_int_equal(kvm_kv_read_rows(p, a.blocks, 0, n, got), 0);
    assert_true(tc_max_rel(got, want, e) <= 1e-5);
    free(raw);
    free(at_p);
    free(want);
    free(got);
    kvm_seq_free(&a);
    kvm_kv_store_free(s);
    kvm_kv_pool_free(p);
}

static void test_shift_matches_fresh_rope_rotate_half(void **st) {
    (void)st;
    shift_matches_fresh(KVM_ROPE_HALF);
}

static void test_shift_matches_fresh_rope_interleaved(void **st) {
    (void)st;
    shift_matches_fresh(KVM_ROPE_INTERLEAVED);
}

static void test_segment_is_rebased_to_f0_and_placed_back_exactly(void **st) {
    (void)st;
    kvm_kv_pool_t *p = make_pool(8, 1, KVM_F32);
    kvm_kv_store_t *s = make_store(p, KVM_ROPE_HALF);
    int32_t ids[30];
    for (int i = 0; i < 30; i++) ids[i] = i + 3;
    kvm_seq_t a;
    kvm_seq_init(&a, p);
    fill_seq(&a, ids, 30);
    kvm_segment_t *g;
    kvm_segment_info_t meta = {.producer_kind = KVM_PRODUCER_INPUT, .producer_id = "input"};
    assert_int_equal(kvm_segment_publish(s, &a, 11, 19, -11, &meta, &g), 0);
    assert_int_equal(kvm_segment_info(g)->frame, 0);
    assert_memory_equal(kvm_segment_info(g)->ids, ids + 11, 19 * sizeof(int32_t));
    /* place it at position 11 of a new sequence: equals the original rows */
    kvm_seq_t b;
    kvm_seq_init(&b, p);
    fill_seq(&b, ids, 11);
    assert_int_equal(kvm_seq_append_segment(&b, s, g, -1), 0);
    assert_int_equal(b.n_tokens, 30);
    size_t e = (size_t)L * 2 * H * 19 * D;
    float *x = malloc(e * 4), *y = malloc(e * 4);
    kvm_kv_read_rows(p, a.blocks, 11, 19, x);
    kvm_kv_read_rows(p, b.blocks, 11, 19, y);
    assert_true(tc_max_rel(y, x, e) <= 1e-6);
    free(x);
    free(y);
    kvm_segment_release(g);
    kvm_seq_free(&a);
    kvm_seq_free(&b);
    kvm_kv_store_free(s);
    kvm_kv_pool_free(p);
}

/* kvm_segment_publish copies and re-rotates in one backend op (kvcomm_apply with no anchors) when the backend has
 * it, else through the host; both give the same rows bit for bit (16-bit and fp32 pools, both layouts, a start in
 * the middle of a block, a shift into and out of frame 0). */
static void publish_paths_agree(kvm_dtype_t dt, kvm_rope_layout_t layout, int first, int n, int rebase) {
    kvm_ops_t no_apply = *kvm_ops_cpu();
    no_apply.kvcomm_apply = NULL;
    kvm_kv_geom_t geo = {.n_layers = L, .n_kv_heads = H, .head_dim = D, .dtype = dt};
    kvm_kv_pool_t *pa = kvm_kv_pool_create(kvm_ops_cpu(), &geo, 8, 1), *pb = kvm_kv_pool_create(&no_apply, &geo, 8, 1);
    kvm_kv_store_t *sa = make_store(pa, layout), *sb = make_store(pb, layout);
    int32_t ids[48];
    for (int i = 0; i < 48; i++) ids[i] = 7 + i;
    kvm_seq_t a, b;
    kvm_seq_init(&a, pa);
    kvm_seq_init(&b, pb);
    uint64_t rng = g_rng;
    fill_seq(&a, ids, first + n);
    g_rng = rng; /* the same random rows in both pools */
    fill_seq(&b, ids, first + n);
    kvm_segment_info_t meta = {.producer_kind = KVM_PRODUCER_INPUT, .producer_id = "input"};
    kvm_segment_t *ga, *gb;
    assert_int_equal(kvm_segment_publish(sa, &a, first, n, rebase, &meta, &ga), 0);
    assert_int_equal(kvm_segment_publish(sb, &b, first, n, rebase, &meta, &gb), 0);
    assert_int_equal(kvm_segment_info(ga)->frame, first + rebase);
    size_t e = (size_t)L * 2 * H * n * D;
    float *x = malloc(e * 4), *y = malloc(e * 4), *src = malloc(e * 4);
    int nb = 0;
    assert_int_equal(kvm_kv_read_rows(pa, kvm_segment_blocks(ga, &nb), 0, n, x), 0);
    assert_int_equal(kvm_kv_read_rows(pb, kvm_segment_blocks(gb, &nb), 0, n, y), 0);
    assert_memory_equal(x, y, e * sizeof(float));
    /* and it did move the keys when asked to (values are copied unchanged) */
    assert_int_equal(kvm_kv_read_rows(pa, a.blocks, first, n, src), 0);
    size_t kdiff = 0, vdiff = 0;
    for (int l = 0; l < L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (size_t i = 0; i < (size_t)H * n * D; i++) {
                size_t k = ((size_t)(l * 2 + kv)) * H * n * D + i;
                if (x[k] != src[k]) *(kv ? &vdiff : &kdiff) += 1;
            }
    assert_int_equal(vdiff, 0);
    if (rebase) assert_true(kdiff > 0);
    else assert_int_equal(kdiff, 0);
    free(x), free(y), free(src);
    kvm_segment_release(ga);
    kvm_segment_release(gb);
    kvm_seq_free(&a);
    kvm_seq_free(&b);
    kvm_kv_store_free(sa);
    kvm_kv_store_free(sb);
    kvm_kv_pool_free(pa);
    kvm_kv_pool_free(pb);
}

static void test_publish_in_one_backend_op_equals_the_host_round_trip(void **st) {
    (void)st;
    publish_paths_agree(KVM_BF16, KVM_ROPE_HALF, 11, 30, -11);
    publish_paths_agree(KVM_BF16, KVM_ROPE_INTERLEAVED, 5, 37, -5);
    publish_paths_agree(KVM_F32, KVM_ROPE_HALF, 16, 17, -16);
    publish_paths_agree(KVM_F16, KVM_ROPE_INTERLEAVED, 3, 20, 9);
    publish_paths_agree(KVM_F32, KVM_ROPE_HALF, 2, 25, 0);
}

static void test_shared_partial_prefix_block_is_copied_on_write(void **st) {
    (void)st;
    kvm_kv_pool_t *p = make_pool(8, 1, KVM_F32);
    kvm_kv_store_t *s = make_store(p, KVM_ROPE_HALF);
    int32_t ids[20];
    for (int i = 0; i < 20; i++) ids[i] = i;
    kvm_seq_t a, b;
    kvm_seq_init(&a, p);
    kvm_seq_init(&b, p);
    fill_seq(&a, ids, 20);
    size_t e = (size_t)L * 2 * H * 20 * D;
    float *x = malloc(e * 4), *y = malloc(e * 4);
    kvm_kv_read_rows(p, a.blocks, 0, 20, x);
    assert_int_equal(kvm_seq_share_prefix(&b, &a, 18), 0);
    assert_int_equal(b.blocks[1], a.blocks[1]);
    fill_seq(&b, ids, 2); /* writes slot 2 of the shared second block: must copy it first */
    assert_int_not_equal(b.blocks[1], a.blocks[1]);
    assert_int_equal(b.blocks[0], a.blocks[0]);
    kvm_kv_read_rows(p, a.blocks, 0, 20, y);
    assert_memory_equal(x, y, e * 4);
    free(x);
    free(y);
    kvm_seq_free(&a);
    kvm_seq_free(&b);
    kvm_kv_store_free(s);
    kvm_kv_pool_free(p);
}

static void test_bf16_pool_rows_round_trip_within_bf16(void **st) {
    (void)st;
    kvm_kv_pool_t *p = make_pool(4, 1, KVM_BF16);
    int n = 21;
    size_t e = (size_t)L * 2 * H * n * D;
    float *x = malloc(e * 4), *y = malloc(e * 4);
    for (size_t i = 0; i < e; i++) x[i] = frand();
    kvm_seq_t a;
    kvm_seq_init(&a, p);
    assert_int_equal(kvm_seq_reserve(&a, n), 0);
    assert_int_equal(kvm_kv_write_rows(p, a.blocks, 0, n, x), 0);
    assert_int_equal(kvm_kv_read_rows(p, a.blocks, 0, n, y), 0);
    assert_true(tc_max_rel(y, x, e) <= 1.0f / 128);
    free(x);
    free(y);
    kvm_seq_free(&a);
    kvm_kv_pool_free(p);
}

/* A backend that is not the CPU one (a copy of its table) makes the store stage rows through host
 * buffers as it does for a GPU: the result must be the same. */
static void test_staged_row_transfers_match_direct_access(void **st) {
    (void)st;
    static kvm_ops_t fake;
    fake = *kvm_ops_cpu();
    fake.name = "fake-device";
    kvm_kv_geom_t g = {.n_layers = L, .n_kv_heads = H, .head_dim = D, .dtype = KVM_BF16};
    kvm_kv_pool_t *dev = kvm_kv_pool_create(&fake, &g, 6, 1), *host = kvm_kv_pool_create(kvm_ops_cpu(), &g, 6, 1);
    int32_t blocks[6] = {5, 2, 0, 4, 1, 3};
    int n = 53, pos = 7;
    size_t e = (size_t)L * 2 * H * n * D;
    float *x = malloc(e * 4), *a = malloc(e * 4), *b = malloc(e * 4);
    for (size_t i = 0; i < e; i++) x[i] = frand();
    assert_int_equal(kvm_kv_write_rows(dev, blocks, pos, n, x), 0);
    assert_int_equal(kvm_kv_write_rows(host, blocks, pos, n, x), 0);
    assert_memory_equal(dev->data, host->data, dev->block_bytes * 6);
    assert_int_equal(kvm_kv_read_rows(dev, blocks, pos + 3, n - 5, a), 0);
    assert_int_equal(kvm_kv_read_rows(host, blocks, pos + 3, n - 5, b), 0);
    assert_memory_equal(a, b, (size_t)L * 2 * H * (n - 5) * D * 4);
    free(x);
    free(a);
    free(b);
    kvm_kv_pool_free(dev);
    kvm_kv_pool_free(host);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prefix_lookup_shares_the_registered_blocks),
        cmocka_unit_test(test_prefix_hit_never_returns_blocks_of_other_tokens_under_forced_collisions),
        cmocka_unit_test(test_budget_exhaustion_fails_cleanly_and_corrupts_nothing),
        cmocka_unit_test(test_lru_eviction_drops_the_oldest_unreferenced_unpinned_segment),
        cmocka_unit_test(test_segment_of_another_model_is_rejected_with_emodel),
        cmocka_unit_test(test_frame_mismatch_is_eframe),
        cmocka_unit_test(test_shift_by_d_then_minus_d_is_identity_rotate_half),
        cmocka_unit_test(test_shift_by_d_then_minus_d_is_identity_interleaved),
        cmocka_unit_test(test_shift_matches_fresh_rope_rotate_half),
        cmocka_unit_test(test_shift_matches_fresh_rope_interleaved),
        cmocka_unit_test(test_segment_is_rebased_to_f0_and_placed_back_exactly),
        cmocka_unit_test(test_publish_in_one_backend_op_equals_the_host_round_trip),
        cmocka_unit_test(test_shared_partial_prefix_block_is_copied_on_write),
        cmocka_unit_test(test_bf16_pool_rows_round_trip_within_bf16),
        cmocka_unit_test(test_staged_row_transfers_match_direct_access),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
