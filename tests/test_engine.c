/* test_engine.c - the CPU engine: KV pool, batched forward, sampler, chat formats (no shared data needed). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "runtime/kv/store.h"
#include "runtime/model/generate.h"
#include "test_common.h"

/* A small config; gqa_bias_norm: Qwen3-like (GQA, qkv bias, q/k norms, head_dim != dim / heads, half rope). */
static kvm_config_t small_cfg(bool gqa_bias_norm) {
    return (kvm_config_t){.dim = 48, .hidden_dim = 96, .n_layers = 2, .n_heads = 6, .n_kv_heads = gqa_bias_norm ? 2 : 6,
                          .head_dim = gqa_bias_norm ? 16 : 8, .vocab_size = 97, .max_seq_len = 256, .rope_theta = 10000,
                          .rope_layout = gqa_bias_norm ? KVM_ROPE_HALF : KVM_ROPE_INTERLEAVED, .qkv_bias = gqa_bias_norm,
                          .qk_norm = gqa_bias_norm, .rms_eps = 1e-6f};
}

/* A random CPU model of small_cfg(qwen_like) (its context cut to max_seq_len when > 0) from seed, its config
 * in *c and a KV pool for it in *pool; free both with small_model_free. */
static kvm_model_t *small_model(bool qwen_like, uint64_t seed, int max_seq_len, kvm_config_t *c, kvm_kv_pool_t **pool) {
    *c = small_cfg(qwen_like);
    if (max_seq_len > 0) c->max_seq_len = max_seq_len;
    kvm_model_t *m = kvm_model_random(c, seed, 1, "cpu");
    assert_non_null(m);
    *pool = kvm_model_kv_pool(m, 0);
    assert_non_null(*pool);
    return m;
}

static void small_model_free(kvm_model_t *m, kvm_kv_pool_t *pool) {
    kvm_kv_pool_free(pool);
    kvm_model_free(m);
}

static void test_kv_pool_reports_exhaustion_and_changes_nothing(void **st) {
    (void)st;
    kvm_kv_geom_t g = {.n_layers = 2, .n_kv_heads = 2, .head_dim = 8, .dtype = KVM_F32};
    kvm_kv_pool_t *p = kvm_kv_pool_create(kvm_ops_cpu(), &g, 3, 1);
    assert_non_null(p);
    kvm_seq_t s;
    kvm_seq_init(&s, p);
    assert_int_equal(kvm_seq_reserve(&s, 40), 0); /* 3 blocks */
    assert_int_equal(p->n_free, 0);
    kvm_seq_t s2;
    kvm_seq_init(&s2, p);
    assert_int_equal(kvm_seq_reserve(&s2, 1), KVM_ENOMEM);
    assert_non_null(strstr(kvm_errmsg(), "KV budget exhausted"));
    assert_int_equal(s2.n_blocks, 0);
    kvm_seq_free(&s);
    assert_int_equal(p->n_free, 3);
    kvm_seq_free(&s2);
    kvm_kv_pool_free(p);
}

static void test_shared_partial_block_is_copied_before_append(void **st) {
    (void)st;
    kvm_config_t c;
    kvm_kv_pool_t *pool;
    kvm_model_t *m = small_model(false, 7, 0, &c, &pool);
    kvm_seq_t a, b;
    kvm_seq_init(&a, pool);
    kvm_seq_init(&b, pool);
    int32_t toks[20];
    for (int i = 0; i < 20; i++) toks[i] = (i * 7 + 3) % c.vocab_size;
    kvm_batch_item_t it = {.seq = &a, .tokens = toks, .n_tokens = 20};
    assert_int_equal(kvm_forward(m, &it, 1), 0);
    /* b shares a's two blocks by reference */
    assert_int_equal(kvm_seq_reserve(&b, 0), 0);
    for (int i = 0; i < a.n_blocks; i++) kvm_kv_block_ref(pool, a.blocks[i]);
    b.blocks = kvm_malloc(8 * sizeof(int32_t));
    b.cap_blocks = 8;
    memcpy(b.blocks, a.blocks, (size_t)a.n_blocks * 4);
    b.n_blocks = a.n_blocks;
    kvm_seq_push_tokens(&b, toks, 20);
    int32_t shared_last = a.blocks[1];
    float snapshot[64];
    memcpy(snapshot, (char *)pool->data + (size_t)shared_last * pool->block_bytes, sizeof snapshot);
    int32_t more = 5;
    kvm_batch_item_t it2 = {.seq = &b, .tokens = &more, .n_tokens = 1};
    assert_int_equal(kvm_forward(m, &it2, 1), 0);
    assert_int_not_equal(b.blocks[1], shared_last);
    assert_memory_equal(snapshot, (char *)pool->data + (size_t)shared_last * pool->block_bytes, sizeof snapshot);
    kvm_seq_free(&a);
    kvm_seq_free(&b);
    assert_int_equal(pool->n_free, pool->n_blocks);
    small_model_free(m, pool);
}

/* Prefill of T tokens, token-by-token decode, and a batch mixing two sequences give the same logits. */
static void check_forward_consistency(bool qwen_like) {
    kvm_config_t c;
    kvm_kv_pool_t *pool;
    kvm_model_t *m = small_model(qwen_like, 11, 0, &c, &pool);
    const int T = 37, V = c.vocab_size;
    int32_t toks[37], toks2[37];
    for (int i = 0; i < T; i++) {
        toks[i] = (i * 13 + 5) % V;
        toks2[i] = (i * 29 + 1) % V;
    }
    float *all = malloc((size_t)T * V * 4), *inc = malloc((size_t)V * 4), *b1 = malloc((size_t)V * 4),
          *b2 = malloc((size_t)V * 4), *ref2 = malloc((size_t)V * 4);
    kvm_seq_t s1, s2, s3;
    kvm_seq_init(&s1, pool);
    kvm_seq_init(&s2, pool);
    kvm_seq_init(&s3, pool);
    kvm_batch_item_t it = {.seq = &s1, .tokens = toks, .n_tokens = T, .logits = all, .all_logits = true};
    assert_int_equal(kvm_forward(m, &it, 1), 0);
    for (int t = 0; t < T; t++) {
        kvm_batch_item_t one = {.seq = &s2, .tokens = &toks[t], .n_tokens = 1, .logits = inc};
        assert_int_equal(kvm_forward(m, &one, 1), 0);
        assert_true(tc_max_rel(inc, all + (size_t)t * V, (size_t)V) < 1e-5f);
    }
    /* reference for the second sequence alone */
    kvm_batch_item_t r2 = {.seq = &s3, .tokens = toks2, .n_tokens = T, .logits = ref2};
    assert_int_equal(kvm_forward(m, &r2, 1), 0);
    kvm_seq_free(&s1);
    kvm_seq_free(&s3);
    kvm_seq_init(&s1, pool);
    kvm_seq_init(&s3, pool);
    /* batch: s1 prefill of T-1 tokens + its last token, together with s3's full prefill */
    kvm_batch_item_t pre = {.seq = &s1, .tokens = toks, .n_tokens = T - 1};
    assert_int_equal(kvm_forward(m, &pre, 1), 0);
    kvm_batch_item_t both[2] = {{.seq = &s1, .tokens = &toks[T - 1], .n_tokens = 1, .logits = b1},
                                {.seq = &s3, .tokens = toks2, .n_tokens = T, .logits = b2}};
    assert_int_equal(kvm_forward(m, both, 2), 0);
    assert_true(tc_max_rel(b1, all + (size_t)(T - 1) * V, (size_t)V) < 1e-5f);
    assert_true(tc_max_rel(b2, ref2, (size_t)V) < 1e-5f);
    kvm_seq_free(&s1);
    kvm_seq_free(&s2);
    kvm_seq_free(&s3);
    free(all);
    free(inc);
    free(b1);
    free(b2);
    free(ref2);
    small_model_free(m, pool);
}

static void test_prefill_decode_and_batch_agree_llama_interleaved(void **st) { (void)st; check_forward_consistency(false); }
static void test_prefill_decode_and_batch_agree_qwen3_like_gqa(void **st) { (void)st; check_forward_consistency(true); }

/* One run of check_grouped_decode: N sequences of different lengths prefilled alone, then decode steps over
 * batches of several sizes (items asking for logits, the greedy token, both or neither), on `threads` threads
 * (2: the row groups of forward.c's run_step; 1: each op whole), or each item alone when `alone`. Writes every
 * step's logits and tokens and, at the end, each sequence's KV rows. */
enum { GD_N = 9, GD_STEPS = 4 };
static void grouped_decode_run(kvm_model_t *m, kvm_kv_pool_t *pool, int V, int threads, bool alone, float *logits,
                               int32_t *next, float *kv, size_t kv_per_seq) {
    static const int sizes[GD_STEPS] = {GD_N, 2, 5, 8};
    kvm_set_threads(threads);
    kvm_seq_t s[GD_N];
    for (int i = 0; i < GD_N; i++) {
        kvm_seq_init(&s[i], pool);
        int32_t toks[40];
        const int n = 3 + 4 * i;
        for (int t = 0; t < n; t++) toks[t] = (t * 17 + i * 5 + 1) % V;
        kvm_batch_item_t it = {.seq = &s[i], .tokens = toks, .n_tokens = n};
        assert_int_equal(kvm_forward(m, &it, 1), 0);
    }
    int32_t tok[GD_N];
    for (int i = 0; i < GD_N; i++) tok[i] = (i * 7 + 3) % V;
    for (int st = 0; st < GD_STEPS; st++) {
        kvm_batch_item_t items[GD_N];
        const int n = sizes[st];
        for (int i = 0; i < n; i++) {
            const int k = (st + i) % 4; /* logits, the greedy token, both, neither */
            float *lg = logits + ((size_t)st * GD_N + i) * V;
            items[i] = (kvm_batch_item_t){.seq = &s[i], .tokens = &tok[i], .n_tokens = 1, .logits = k == 0 || k == 2 ? lg : NULL,
                                          .next_token = k == 1 || k == 2 ? &next[st * GD_N + i] : NULL};
        }
        if (alone) {
            for (int i = 0; i < n; i++) assert_int_equal(kvm_forward(m, &items[i], 1), 0);
        } else {
            assert_int_equal(kvm_forward(m, items, n), 0);
        }
        for (int i = 0; i < n; i++) tok[i] = (tok[i] * 31 + st + 1) % V;
    }
    for (int i = 0; i < GD_N; i++) {
        assert_int_equal(kvm_seq_read_rows(&s[i], 0, s[i].n_tokens, kv + (size_t)i * kv_per_seq), 0);
        kvm_seq_free(&s[i]);
    }
    kvm_set_threads(0);
}

/* A decode batch gives every token the bits it gets alone, whether the step runs in row groups on two threads
 * or op by op on one: the logits, the greedy tokens and the KV written. */
static void check_grouped_decode(bool qwen_like) {
    kvm_config_t c;
    kvm_kv_pool_t *pool;
    kvm_model_t *m = small_model(qwen_like, 23, 0, &c, &pool);
    const int V = c.vocab_size;
    const size_t nl = (size_t)GD_STEPS * GD_N * V, kv_per = (size_t)c.n_layers * 2 * c.n_kv_heads * 64 * c.head_dim;
    float *lg[3], *kv[3];
    int32_t nx[3][GD_STEPS * GD_N];
    for (int r = 0; r < 3; r++) {
        lg[r] = calloc(nl, sizeof(float));
        kv[r] = calloc(kv_per * GD_N, sizeof(float));
        memset(nx[r], 0xff, sizeof nx[r]);
    }
    grouped_decode_run(m, pool, V, 2, false, lg[0], nx[0], kv[0], kv_per);
    grouped_decode_run(m, pool, V, 1, false, lg[1], nx[1], kv[1], kv_per);
    grouped_decode_run(m, pool, V, 1, true, lg[2], nx[2], kv[2], kv_per);
    bool some_logits = false;
    for (size_t i = 0; i < nl; i++) some_logits |= lg[0][i] != 0.0f;
    assert_true(some_logits);
    for (int r = 1; r < 3; r++) {
        assert_memory_equal(lg[0], lg[r], nl * sizeof(float));
        assert_memory_equal(nx[0], nx[r], sizeof nx[0]);
        assert_memory_equal(kv[0], kv[r], kv_per * GD_N * sizeof(float));
    }
    for (int r = 0; r < 3; r++) {
        free(lg[r]);
        free(kv[r]);
    }
    small_model_free(m, pool);
}

static void test_decode_batch_in_row_groups_gives_each_token_its_bits_llama(void **st) { (void)st; check_grouped_decode(false); }
static void test_decode_batch_in_row_groups_gives_each_token_its_bits_qwen3_like(void **st) { (void)st; check_grouped_decode(true); }

/* kvm_forward_attn_mass: each (row from from_pos, head, layer) adds a probability distribution, so the sums add up to
 * rows x heads x layers; the forward's logits are those of kvm_forward; a decode batch (the row-group path) and a
 * call without a mass array are handled (the batch in one order, the call refused). */
static void test_forward_attn_mass_sums_every_layer_and_head(void **st) {
    (void)st;
    kvm_config_t c;
    kvm_kv_pool_t *pool;
    kvm_model_t *m = small_model(true, 5, 0, &c, &pool);
    const int T = 40, FROM = 25, V = c.vocab_size;
    int32_t toks[40];
    for (int i = 0; i < T; i++) toks[i] = (i * 11 + 2) % V;
    float mass[40], *l1 = malloc((size_t)V * 4), *l2 = malloc((size_t)V * 4);
    kvm_seq_t a, b;
    kvm_seq_init(&a, pool);
    kvm_seq_init(&b, pool);
    kvm_batch_item_t ia = {.seq = &a, .tokens = toks, .n_tokens = T, .logits = l1};
    assert_int_equal(kvm_forward_attn_mass(m, &ia, 1, mass, T, FROM), 0);
    double sum = 0;
    for (int p = 0; p < T; p++) sum += mass[p];
    assert_true(fabs(sum - (double)(T - FROM) * c.n_heads * c.n_layers) < 1e-3 * (T - FROM) * c.n_heads * c.n_layers);
    kvm_batch_item_t ib = {.seq = &b, .tokens = toks, .n_tokens = T, .logits = l2};
    assert_int_equal(kvm_forward(m, &ib, 1), 0);
    assert_memory_equal(l1, l2, (size_t)V * 4);
    /* a decode step of two sequences, two threads: one token each, both counted */
    kvm_set_threads(2);
    int32_t one[2] = {3, 4};
    kvm_batch_item_t two[2] = {{.seq = &a, .tokens = &one[0], .n_tokens = 1}, {.seq = &b, .tokens = &one[1], .n_tokens = 1}};
    float m2[41];
    assert_int_equal(kvm_forward_attn_mass(m, two, 2, m2, T + 1, 0), 0);
    kvm_set_threads(0);
    sum = 0;
    for (int p = 0; p <= T; p++) sum += m2[p];
    assert_true(fabs(sum - 2.0 * c.n_heads * c.n_layers) < 1e-3 * 2 * c.n_heads * c.n_layers);
    assert_int_equal(kvm_forward_attn_mass(m, &ia, 1, NULL, T, 0), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "mass"));
    kvm_seq_free(&a);
    kvm_seq_free(&b);
    free(l1), free(l2);
    small_model_free(m, pool);
}

/* A forward of toks[n] into a fresh sequence of a small model (context max_seq_len; 0: the default) is refused
 * with KVM_ERANGE and a message naming `what`; with `keeps`, the sequence holds no token and no block after. */
static void expect_forward_out_of_range(int max_seq_len, int32_t *toks, int n, const char *what, bool keeps) {
    kvm_config_t c;
    kvm_kv_pool_t *pool;
    kvm_model_t *m = small_model(false, 3, max_seq_len, &c, &pool);
    kvm_seq_t s;
    kvm_seq_init(&s, pool);
    kvm_batch_item_t it = {.seq = &s, .tokens = toks, .n_tokens = n};
    assert_int_equal(kvm_forward(m, &it, 1), KVM_ERANGE);
    assert_non_null(strstr(kvm_errmsg(), what));
    if (keeps) {
        assert_int_equal(s.n_tokens, 0);
        assert_int_equal(pool->n_free, pool->n_blocks);
    }
    kvm_seq_free(&s);
    small_model_free(m, pool);
}

static void test_forward_rejects_bad_token_and_keeps_sequence(void **st) {
    (void)st;
    int32_t bad[2] = {1, 5000};
    expect_forward_out_of_range(0, bad, 2, "5000", true);
}

static void test_forward_beyond_context_is_an_error(void **st) {
    (void)st;
    int32_t t[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    expect_forward_out_of_range(8, t, 9, "context", false);
}

/* kvm_batch_item_t.positions: rows of a prefilled sequence overwritten with garbage at scattered positions are
 * recomputed in place by one positioned item, and the cache is the dense prefill's again, bit for bit (each
 * recomputed row attends to the fresh rows before it); the sequence keeps its length and tokens. Bad positions
 * are refused and change nothing. */
static void check_positioned_recompute(bool qwen_like) {
    kvm_config_t c;
    kvm_kv_pool_t *pool;
    kvm_model_t *m = small_model(qwen_like, 17, 0, &c, &pool);
    enum { T = 53, NP = 12 };
    int32_t toks[T];
    for (int i = 0; i < T; i++) toks[i] = (i * 31 + 7) % c.vocab_size;
    const int32_t P[NP] = {0, 3, 4, 5, 16, 17, 30, 31, 32, 40, 47, 52};
    kvm_seq_t s;
    kvm_seq_init(&s, pool);
    kvm_batch_item_t pre = {.seq = &s, .tokens = toks, .n_tokens = T};
    assert_int_equal(kvm_forward(m, &pre, 1), 0);
    const size_t row = (size_t)c.n_layers * 2 * c.n_kv_heads * c.head_dim, e = row * T;
    float *dense = malloc(e * 4), *got = malloc(e * 4), *junk = malloc(row * 4);
    assert_int_equal(kvm_kv_read_rows(pool, s.blocks, 0, T, dense), 0);
    for (size_t i = 0; i < row; i++) junk[i] = 3.0f + (float)(i % 7);
    for (int i = 0; i < NP; i++) assert_int_equal(kvm_kv_write_rows(pool, s.blocks, P[i], 1, junk), 0);
    int32_t ptok[NP];
    for (int i = 0; i < NP; i++) ptok[i] = toks[P[i]];
    /* refused: not increasing, past the sequence; nothing changes */
    int32_t bad1[3] = {4, 3, 5}, bad2[2] = {5, T};
    kvm_batch_item_t b1 = {.seq = &s, .tokens = ptok, .n_tokens = 3, .positions = bad1};
    kvm_batch_item_t b2 = {.seq = &s, .tokens = ptok, .n_tokens = 2, .positions = bad2};
    assert_int_equal(kvm_forward(m, &b1, 1), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "positions must increase"));
    assert_int_equal(kvm_forward(m, &b2, 1), KVM_EINVAL);
    /* a row in a block another sequence also holds is refused (it would change theirs) */
    kvm_kv_block_ref(pool, s.blocks[P[4] / KVM_KV_BLOCK]);
    kvm_batch_item_t b3 = {.seq = &s, .tokens = ptok, .n_tokens = NP, .positions = P};
    assert_int_equal(kvm_forward(m, &b3, 1), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "shared"));
    kvm_kv_block_unref(pool, s.blocks[P[4] / KVM_KV_BLOCK]);
    assert_int_equal(s.n_tokens, T);
    assert_int_equal(kvm_kv_read_rows(pool, s.blocks, 0, T, got), 0);
    assert_true(memcmp(got, dense, e * 4) != 0); /* the junk is still there */
    float *lg = malloc((size_t)c.vocab_size * 4);
    kvm_batch_item_t it = {.seq = &s, .tokens = ptok, .n_tokens = NP, .positions = P, .logits = lg};
    assert_int_equal(kvm_forward(m, &it, 1), 0);
    assert_int_equal(s.n_tokens, T);
    assert_memory_equal(s.tokens, toks, sizeof toks);
    assert_int_equal(kvm_kv_read_rows(pool, s.blocks, 0, T, got), 0);
    assert_memory_equal(got, dense, e * 4);
    kvm_seq_free(&s);
    free(dense), free(got), free(junk), free(lg);
    small_model_free(m, pool);
}

static void test_positioned_item_recomputes_scattered_rows_exactly_llama(void **st) { (void)st; check_positioned_recompute(false); }
static void test_positioned_item_recomputes_scattered_rows_exactly_qwen3_like(void **st) { (void)st; check_positioned_recompute(true); }

static void test_sampler_greedy_topk1_and_tiny_topp_pick_the_argmax(void **st) {
    (void)st;
    float base[50];
    for (int i = 0; i < 50; i++) base[i] = sinf((float)i * 1.7f) * 3;
    int best = 0;
    for (int i = 1; i < 50; i++)
        if (base[i] > base[best]) best = i;
    kvm_sampler_params_t ps[3] = {{.temperature = 0}, {.temperature = 1.0f, .top_k = 1, .seed = 4},
                                  {.temperature = 0.7f, .top_p = 1e-6f, .seed = 9}};
    for (int k = 0; k < 3; k++) {
        kvm_sampler_t *s = kvm_sampler_create(&ps[k], 50);
        float l[50];
        memcpy(l, base, sizeof l);
        assert_int_equal(kvm_sampler_sample(s, l, NULL, 0), best);
        kvm_sampler_free(s);
    }
}

static void test_sampler_is_reproducible_for_a_seed_and_varies_across_seeds(void **st) {
    (void)st;
    int seq_a[40], seq_b[40], seq_c[40];
    int *outs[3] = {seq_a, seq_b, seq_c};
    uint64_t seeds[3] = {1, 1, 2};
    for (int k = 0; k < 3; k++) {
        kvm_sampler_params_t p = {.temperature = 1.0f, .top_p = 0.95f, .top_k = 40, .seed = seeds[k]};
        kvm_sampler_t *s = kvm_sampler_create(&p, 64);
        for (int i = 0; i < 40; i++) {
            float l[64];
            for (int j = 0; j < 64; j++) l[j] = cosf((float)(j * 3 + i));
            outs[k][i] = kvm_sampler_sample(s, l, NULL, 0);
        }
        kvm_sampler_free(s);
    }
    assert_memory_equal(seq_a, seq_b, sizeof seq_a);
    assert_memory_not_equal(seq_a, seq_c, sizeof seq_a);
}

static void test_repetition_penalty_follows_hf_semantics(void **st) {
    (void)st;
    kvm_sampler_params_t p = {.temperature = 0, .repetition_penalty = 2.0f};
    kvm_sampler_t *s = kvm_sampler_create(&p, 4);
    float l[4] = {3.0f, 2.0f, -1.0f, 1.0f};
    int32_t hist[3] = {0, 0, 2};
    /* 0: 3/2 = 1.5 ; 2: -1*2 = -2 ; so argmax becomes 1 (2.0) */
    assert_int_equal(kvm_sampler_sample(s, l, hist, 3), 1);
    assert_true(fabsf(l[0] - 1.5f) < 1e-6f);
    assert_true(fabsf(l[2] + 2.0f) < 1e-6f);
    kvm_sampler_free(s);
}

static void test_sampler_rejects_bad_parameters(void **st) {
    (void)st;
    kvm_sampler_params_t p = {.temperature = -1};
    assert_null(kvm_sampler_create(&p, 10));
    assert_int_equal(kvm_errcode(), KVM_EINVAL);
    kvm_sampler_params_t q = {.top_p = 1.5f};
    assert_null(kvm_sampler_create(&q, 10));
}

static void test_chat_formats_render_exactly(void **st) {
    (void)st;
    kvm_chat_msg_t msgs[2] = {{"system", "Be brief."}, {"user", "Hi"}};
    char *out = NULL;
    assert_int_equal(kvm_chat_render(KVM_CHAT_CHATML, msgs, 2, true, &out), 0);
    assert_string_equal(out, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    kvm_free(out);
    assert_int_equal(kvm_chat_render(KVM_CHAT_LLAMA3, msgs, 2, true, &out), 0);
    assert_string_equal(out, "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
                             "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    kvm_free(out);
    assert_int_equal(kvm_chat_render(KVM_CHAT_LLAMA2, msgs, 2, true, &out), 0);
    assert_string_equal(out, "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]");
    kvm_free(out);
}

static void test_llama2_chat_closes_each_answer_and_opens_the_next_turn(void **st) {
    (void)st;
    kvm_chat_msg_t msgs[3] = {{"user", "Hi"}, {"assistant", "Yo"}, {"user", "Again"}};
    char *out = NULL;
    assert_int_equal(kvm_chat_render(KVM_CHAT_LLAMA2, msgs, 3, true, &out), 0);
    assert_string_equal(out, "[INST] Hi [/INST] Yo </s><s>[INST] Again [/INST]");
    kvm_free(out);
}

static void test_llama3_rope_scaling_matches_reference_frequencies(void **st) {
    (void)st;
    /* kvcomm.md §3.3 reference values (transformers 5.17 inv_freq), Llama-3.1-8B */
    kvm_config_t c = {.dim = 4096, .hidden_dim = 64, .n_layers = 1, .n_heads = 32, .n_kv_heads = 8, .head_dim = 128,
                      .vocab_size = 8, .rope_theta = 500000, .rope_scaling = KVM_ROPE_SCALING_LLAMA3, .rope_factor = 8,
                      .rope_low_freq_factor = 1, .rope_high_freq_factor = 4, .rope_original_max_pos = 8192};
    kvm_model_t m = {0};
    m.cfg = c;
    assert_int_equal(kvm_model_build_rope(&m), 0);
    const struct { int j; double w; } ref[] = {{0, 1.0}, {1, 0.81461722}, {28, 3.2114461e-3}, {29, 2.1665706e-3},
                                                {30, 1.3718938e-3}, {34, 1.7850779e-4}, {35, 9.5562122e-5}, {63, 3.0689259e-7}};
    for (size_t i = 0; i < sizeof ref / sizeof ref[0]; i++) assert_true(fabs(m.inv_freq[ref[i].j] - ref[i].w) / ref[i].w < 1e-6);
    kvm_free(m.inv_freq);
    kvm_free(m.inv_freq64);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kv_pool_reports_exhaustion_and_changes_nothing),
        cmocka_unit_test(test_shared_partial_block_is_copied_before_append),
        cmocka_unit_test(test_prefill_decode_and_batch_agree_llama_interleaved),
        cmocka_unit_test(test_prefill_decode_and_batch_agree_qwen3_like_gqa),
        cmocka_unit_test(test_decode_batch_in_row_groups_gives_each_token_its_bits_llama),
        cmocka_unit_test(test_decode_batch_in_row_groups_gives_each_token_its_bits_qwen3_like),
        cmocka_unit_test(test_forward_attn_mass_sums_every_layer_and_head),
        cmocka_unit_test(test_forward_rejects_bad_token_and_keeps_sequence),
        cmocka_unit_test(test_forward_beyond_context_is_an_error),
        cmocka_unit_test(test_positioned_item_recomputes_scattered_rows_exactly_llama),
        cmocka_unit_test(test_positioned_item_recomputes_scattered_rows_exactly_qwen3_like),
        cmocka_unit_test(test_sampler_greedy_topk1_and_tiny_topp_pick_the_argmax),
        cmocka_unit_test(test_sampler_is_reproducible_for_a_seed_and_varies_across_seeds),
        cmocka_unit_test(test_repetition_penalty_follows_hf_semantics),
        cmocka_unit_test(test_sampler_rejects_bad_parameters),
        cmocka_unit_test(test_chat_formats_render_exactly),
        cmocka_unit_test(test_llama2_chat_closes_each_answer_and_opens_the_next_turn),
        cmocka_unit_test(test_llama3_rope_scaling_matches_reference_frequencies),
    };
    return cmocka_run_group_tests_name("engine", tests, NULL, NULL);
}
