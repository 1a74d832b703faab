/* test_kvcomm_core.c - KVCOMM on small random models and hand-made anchor pools (kvcomm.md §8 items 3-11).
 * No shared data needed: random-weight models are fine for exactness and rules, not for fidelity. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "runtime/comm/kvcomm_oracle.h"
#include "runtime/comm/kvcomm_ref.h"
#include "runtime/comm/prompt.h"
#include "test_kvcomm_common.h"

/* ---- helpers ------------------------------------------------------------------------------------- */

static bool g_qwen_like = false; /* q/k/v biases and per-head QK-norm before RoPE (Qwen2/Qwen3) */
static bool g_llama3 = false;    /* llama3 RoPE scaling (Llama-3.1: theta 5e5, factor 8, 1/4, 8192) */

static kvm_model_t *small_model(kvm_rope_layout_t layout, uint64_t seed) {
    kvm_config_t c = kvcomm_test_cfg(layout);
    c.qk_norm = c.qkv_bias = g_qwen_like;
    if (g_llama3) {
        c.rope_theta = 500000.0;
        c.rope_scaling = KVM_ROPE_SCALING_LLAMA3;
        c.rope_factor = 8;
        c.rope_low_freq_factor = 1;
        c.rope_high_freq_factor = 4;
        c.rope_original_max_pos = 8192;
    }
    kvm_model_t *m = kvm_model_random(&c, seed, 4, "cpu");
    assert_non_null(m);
    return m;
}

/* A raw template: text(a) {ph} text(b) [{ph2} text(c)] */
typedef struct tmpl_ids {
    int32_t a[40], b[12], c[9];
} tmpl_ids_t;

static kvm_template_t *make_tmpl(kvm_comm_t *c, const char *agent, const char *ph1, const char *ph2, uint64_t seed,
                                 int na) {
    static tmpl_ids_t store[16];
    static int next = 0;
    tmpl_ids_t *t = &store[next++ % 16];
    fill_ids(t->a, 40, seed);
    fill_ids(t->b, 12, seed + 1);
    fill_ids(t->c, 9, seed + 2);
    kvm_piece_t p[5] = {
        {.kind = KVM_PIECE_TEXT, .ids = t->a, .n_ids = na},
        {.kind = KVM_PIECE_PLACEHOLDER, .text = ph1},
        {.kind = KVM_PIECE_TEXT, .ids = t->b, .n_ids = 12},
        {.kind = KVM_PIECE_PLACEHOLDER, .text = ph2},
        {.kind = KVM_PIECE_TEXT, .ids = t->c, .n_ids = 9},
    };
    kvm_template_desc_t d = {.agent = agent, .pieces = p, .n_pieces = ph2 ? 5 : 3, .raw = true};
    kvm_template_t *tt = kvm_template_create(c, &d);
    if (!tt) fprintf(stderr, "template: %s\n", kvm_errmsg());
    assert_non_null(tt);
    return tt;
}

/* Dense prefill of ids on a fresh sequence; returns host fp32 KV of all rows [L][2][H][n][D]. */
static float *dense_kv(kvm_comm_t *c, const int32_t *ids, int n) {
    kvm_model_t *m = kvm_comm_model(c);
    kvm_seq_t s;
    kvm_seq_init(&s, kvm_kv_store_pool(kvm_comm_store(c)));
    kvm_batch_item_t it = {.seq = &s, .tokens = ids, .n_tokens = n};
    assert_int_equal(kvm_forward(m, &it, 1), 0);
    comm_geom_t g = {m->cfg.n_layers, m->cfg.n_kv_heads, m->cfg.head_dim, 4};
    float *kv = malloc(comm_rows_elems(&g, n) * sizeof(float));
    assert_int_equal(kvm_kv_read_rows(s.pool, s.blocks, 0, n, kv), 0);
    kvm_seq_free(&s);
    return kv;
}

/* Frees what an end-to-end test made (NULLs are skipped): segments, templates, the comm context, the model. */
static void teardown(kvm_model_t *m, kvm_comm_t *c, kvm_template_t *t1, kvm_template_t *t2, kvm_segment_t *s1,
                     kvm_segment_t *s2) {
    kvm_segment_release(s1);
    kvm_segment_release(s2);
    kvm_template_free(t1);
    kvm_template_free(t2);
    kvm_comm_free(c);
    kvm_model_free(m);
}

/* ---- layer-0 exactness (§8 item 3) --------------------------------------------------------------------- */

static void layer0_exact(kvm_rope_layout_t layout) {
    kvm_model_t *m = small_model(layout, 5);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    assert_non_null(c);
    kvm_kvcomm_ablation(kvm_comm_config(c), "rotation"); /* naive reuse: keys only re-rotated */
    kvm_template_t *t = make_tmpl(c, "a", "input", NULL, 11, 37);
    kvm_segment_t *in = input_segment(c, 77, 29);
    kvm_binding_t b = {"input", in};
    kvm_comm_request_t *rq = kvm_comm_request_begin(c, 1);
    kvm_prompt_t pr = {.tmpl = t, .bindings = &b, .n_bindings = 1, .policy = KVM_KV_KVCOMM};
    kvm_prepared_t p;
    assert_int_equal(kvm_comm_prepare(rq, &pr, &p), 0);
    assert_int_equal(p.report.mode, KVM_COMM_REUSE);
    assert_int_equal(p.n_cached, p.n_prompt - 1);
    float *dense = dense_kv(c, p.prompt_ids, p.n_prompt);
    const comm_geom_t g = {m->cfg.n_layers, m->cfg.n_kv_heads, m->cfg.head_dim, 4};
    float *got = malloc(comm_rows_elems(&g, p.n_cached) * sizeof(float));
    assert_int_equal(kvm_kv_read_rows(p.seq.pool, p.seq.blocks, 0, p.n_cached, got), 0);
    /* layer 0, all heads, the placeholder rows (positions 37..65) */
    for (int kv = 0; kv < 2; kv++)
        for (int h = 0; h < g.H; h++) {
            const float *x = got + comm_idx(&g, p.n_cached, 0, kv, h, 37);
            const float *y = dense + comm_idx(&g, p.n_prompt, 0, kv, h, 37);
            float e = max_rel(x, y, (size_t)29 * g.D);
            if (e > 1e-5f) fprintf(stderr, "layer0 kv=%d h=%d rel err %g\n", kv, h, e);
            if (kv == 0) assert_true(e <= 1e-5f);
            else assert_true(e <= 1e-6f);
        }
    /* deeper layers differ (the context is different): the test can fail */
    float deep = max_rel(got + comm_idx(&g, p.n_cached, 2, 0, 0, 37), dense + comm_idx(&g, p.n_prompt, 2, 0, 0, 37),
                         (size_t)29 * g.D);
    assert_true(deep > 1e-4f);
    free(dense);
    free(got);
    kvm_prepared_release(&p);
    kvm_comm_request_abort(rq);
    teardown(m, c, t, NULL, in, NULL);
}

static void test_layer0_keys_after_shift_equal_dense_rotate_half(void **st) {
    (void)st;
    layer0_exact(KVM_ROPE_HALF);
}

static void test_layer0_keys_after_shift_equal_dense_interleaved(void **st) {
    (void)st;
    layer0_exact(KVM_ROPE_INTERLEAVED);
}

static void test_layer0_keys_after_shift_equal_dense_with_llama3_rope_scaling(void **st) {
    (void)st;
    g_llama3 = true;
    layer0_exact(KVM_ROPE_HALF);
    g_llama3 = false;
}

static void test_layer0_keys_after_shift_equal_dense_with_qk_norm_and_biases(void **st) {
    (void)st;
    g_qwen_like = true;
    layer0_exact(KVM_ROPE_HALF);
    g_qwen_like = false;
}

/* ---- identical prompts = prefix caching (§8 item 4) -------------------------------------------------------- */

/* kv = "dense" is the baseline: every row computed, the template's shared head included (issue 18: the run
 * table showed 53-74% 'reused' under --kv dense) */
static void test_dense_policy_computes_every_row_even_with_a_shared_template_head(void **st) {
    (void)st;
    kvm_model_t *m = small_model(KVM_ROPE_HALF, 9);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    kvm_template_t *t = make_tmpl(c, "a", "input", NULL, 21, 40);
    kvm_segment_t *in = input_segment(c, 78, 40);
    kvm_binding_t b = {"input", in};
    for (int call = 0; call < 2; call++) {
        kvm_comm_request_t *rq = kvm_comm_request_begin(c, (uint64_t)call + 1);
        kvm_prompt_t pr = {.tmpl = t, .bindings = &b, .n_bindings = 1, .policy = KVM_KV_DENSE};
        kvm_prepared_t p;
        assert_int_equal(kvm_comm_prepare(rq, &pr, &p), 0);
        assert_int_equal(p.n_cached, 0);
        assert_int_equal(p.report.exact_tokens, 0);
        assert_int_equal(p.report.recomputed_tokens, p.report.input_tokens);
        kvm_prepared_release(&p);
        kvm_comm_request_end(rq);
    }
    teardown(m, c, t, NULL, in, NULL);
}

static void test_identical_prompt_reuses_the_prefix_cache_bit_for_bit(void **st) {
    (void)st;
    kvm_model_t *m = small_model(KVM_ROPE_HALF, 9);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    kvm_template_t *t = make_tmpl(c, "a", "input", NULL, 21, 40);
    kvm_segment_t *in = input_segment(c, 78, 40);
    kvm_binding_t b = {"input", in};
    kvm_comm_request_t *rq = kvm_comm_request_begin(c, 1);
    kvm_prompt_t pr = {.tmpl = t, .bindings = &b, .n_bindings = 1, .policy = KVM_KV_PREFIX};
    kvm_gen_params_t gp = {.max_tokens = 6, .ignore_eos = true};
    /* first run: dense; registers the prompt blocks */
    kvm_prepared_t p1, p2;
    kvm_gen_result_t r1, r2;
    assert_int_equal(kvm_comm_prepare(rq, &pr, &p1), 0);
    /* template segment 0 is shared, but it was computed for this first use: it counts as computed */
    assert_int_equal(p1.report.exact_tokens, 0);
    assert_int_equal(p1.report.recomputed_tokens, p1.report.input_tokens);
    assert_int_equal(p1.n_cached, 40);
    assert_int_equal(kvm_generate(m, &p1.seq, p1.rest_ids, p1.n_rest, &gp, NULL, NULL, &r1), 0);
    assert_int_equal(kvm_comm_complete(rq, &p1, &r1, NULL), 0);
    /* second run: the whole prompt but its last partial block comes from the prefix index */
    pr.policy = KVM_KV_KVCOMM;
    assert_int_equal(kvm_comm_prepare(rq, &pr, &p2), 0);
    int N = p2.n_prompt;
    assert_int_equal(p2.report.exact_tokens + p2.report.recomputed_tokens, N);
    assert_true(p2.report.exact_tokens >= (N - 1) / 16 * 16);
    assert_int_equal(kvm_generate(m, &p2.seq, p2.rest_ids, p2.n_rest, &gp, NULL, NULL, &r2), 0);
    assert_int_equal(r1.n_ids, r2.n_ids);
    assert_memory_equal(r1.ids, r2.ids, (size_t)r1.n_ids * sizeof(int32_t));
    const comm_geom_t g = {m->cfg.n_layers, m->cfg.n_kv_heads, m->cfg.head_dim, 4};
    size_t e = comm_rows_elems(&g, N);
    float *x = malloc(e * 4), *y = malloc(e * 4);
    kvm_kv_read_rows(p1.seq.pool, p1.seq.blocks, 0, N, x);
    kvm_kv_read_rows(p2.seq.pool, p2.seq.blocks, 0, N, y);
    assert_memory_equal(x, y, e * 4);
    free(x);
    free(y);
    kvm_gen_result_free(&r1);
    kvm_gen_result_free(&r2);
    kvm_prepared_release(&p1);
    kvm_prepared_release(&p2);
    kvm_comm_request_abort(rq);
    teardown(m, c, t, NULL, in, NULL);
}

/* A request lives as long as its run. The segments its agents bound must not stay pinned by the request once the
 * agents that bound them are done: twenty runs in flight would otherwise fill the KV budget with the contents of
 * their finished steps (the store may evict those segments; a later binding brings the content back). */
static void test_a_request_pins_no_segment_its_finished_agents_bound(void **st) {
    (void)st;
    kvm_model_t *m = small_model(KVM_ROPE_HALF, 9);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    kvm_template_t *t = make_tmpl(c, "a", "input", NULL, 21, 40);
    kvm_comm_request_t *rq = kvm_comm_request_begin(c, 1);
    for (uint64_t k = 0; k < 4; k++) { /* four contents, each prepared KVCOMM and completed, then let go */
        kvm_segment_t *in = input_segment(c, 100 + k, 40);
        kvm_binding_t b = {"input", in};
        assert_int_equal(run_agent(rq, t, &b, 1, KVM_KV_KVCOMM, NULL, NULL, 2), 0);
        kvm_segment_release(in);
    }
    /* the request is still open: every segment it saw can be evicted */
    kvm_kv_store_t *store = kvm_comm_store(c);
    kvm_kv_store_stats_t before, after;
    kvm_kv_store_stats(store, &before);
    assert_true(before.n_segments >= 4);
    assert_int_equal(kvm_kv_store_reclaim(store, before.n_blocks), KVM_ENOMEM); /* (more than the pool has) */
    kvm_kv_store_stats(store, &after);
    assert_int_equal(after.n_segments, 0);
    kvm_comm_request_abort(rq);
    teardown(m, c, t, NULL, NULL, NULL);
}

/* ---- one anchor reproduces dense (§8 item 5) ------------------------------------------------------------- */

/* deltas: kvcomm.deltas; tol: the largest relative error to dense (lo: the smallest largest one, so that q8 shows) */
static void single_anchor_case(int deltas, float tol, float lo) {
    kvm_model_t *m = small_model(KVM_ROPE_HALF, 13);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    kvm_comm_config(c)->deltas = deltas;
    kvm_template_t *t = make_tmpl(c, "a", "input", NULL, 31, 23);
    kvm_segment_t *in = input_segment(c, 79, 33);
    kvm_binding_t b = {"input", in};
    kvm_comm_request_t *rq = kvm_comm_request_begin(c, 1);
    kvm_comm_report_t rep;
    assert_int_equal(run_agent(rq, t, &b, 1, KVM_KV_KVCOMM, &rep, NULL, 2), 0);
    assert_int_equal(rep.mode, KVM_COMM_DENSE);
    assert_int_equal(rep.ph[0].decision, KVM_PH_NEW_ANCHOR);
    assert_true(rep.ph[0].materialized);
    assert_int_equal(rq->n_staged, 1);
    comm_sample_t *s = &rq->samples[0];
    comm_anchor_t *a = rq->staged[0];
    assert_null(s->X); /* the materialization runs on the backend: no KV read to the host */
    assert_int_equal(comm_dev_sample_x(c, s), 0); /* (the oracle's copy) */
    comm_ref_weights_t w;
    assert_int_equal(comm_ref_weights(c, s->X, s->T, &a, 1, &w), 0); /* one anchor: every weight is 1 */
    const comm_geom_t *g = &c->g;
    int T = s->T, S = t->te[1] - t->ts[1];
    float *xh = malloc(comm_rows_elems(g, T) * 4), *ph = malloc(comm_rows_elems(g, S) * 4);
    comm_ref_apply(c, s->X, &w, &a, "a", t->P[1], S, xh, ph, true, true);
    comm_ref_weights_free(&w);
    /* the dense KV of the same prompt, re-based to F0 */
    int N = t->te[0] + T + S;
    int32_t *ids = malloc((size_t)N * 4);
    memcpy(ids, t->ids, (size_t)t->te[0] * 4);
    memcpy(ids + t->te[0], kvm_segment_info(in)->ids, (size_t)T * 4);
    memcpy(ids + t->te[0] + T, t->ids + t->ts[1], (size_t)S * 4);
    float *dense = dense_kv(c, ids, N);
    float worst = 0;
    for (int l = 1; l < g->L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < g->H; h++) {
                float *want = malloc((size_t)T * g->D * 4);
                memcpy(want, dense + comm_idx(g, N, l, kv, h, t->te[0]), (size_t)T * g->D * 4);
                if (kv == 0) kvm_rope_rotate_rows(want, T, g->D, g->D, -t->te[0], NULL, m->inv_freq, m->cfg.rope_layout);
                const float e = max_rel(xh + comm_idx(g, T, l, kv, h, 0), want, (size_t)T * g->D);
                assert_true(e <= tol);
                worst = e > worst ? e : worst;
                free(want);
                want = malloc((size_t)S * g->D * 4);
                memcpy(want, dense + comm_idx(g, N, l, kv, h, t->te[0] + T), (size_t)S * g->D * 4);
                if (kv == 0)
                    kvm_rope_rotate_rows(want, S, g->D, g->D, -(t->te[0] + T), NULL, m->inv_freq, m->cfg.rope_layout);
                const float e2 = max_rel(ph + comm_idx(g, S, l, kv, h, 0), want, (size_t)S * g->D);
                assert_true(e2 <= tol);
                worst = e2 > worst ? e2 : worst;
                free(want);
            }
    printf("deltas=%s: largest relative error to dense %.3g\n", deltas == KVM_KVCOMM_DELTAS_Q8 ? "q8" : "kv", (double)worst);
    assert_true(worst >= lo);
    free(dense);
    free(ids);
    free(xh);
    free(ph);
    kvm_comm_request_abort(rq);
    teardown(m, c, t, NULL, in, NULL);
}

static void test_single_anchor_applied_to_its_own_sample_reproduces_dense(void **st) {
    (void)st;
    single_anchor_case(KVM_KVCOMM_DELTAS_KV, 1e-5f, 0.f);
}

/* q8 deltas (the default): within the encoding's error, 1/254 of a row's largest delta per element; a delta is at
 * most about twice the KV it corrects, so 1/100 of the largest element of a slab bounds it */
static void test_single_anchor_with_q8_deltas_is_dense_within_the_encoding(void **st) {
    (void)st;
    single_anchor_case(KVM_KVCOMM_DELTAS_Q8, 1e-2f, 1e-5f);
}

/* ---- anchor memory: bases shared with the store, given back under pressure (kvcomm.md "Anchor memory") ------- */

/* One request of the two-agent team of the test below on context c (input seed q); b's response ids into out_b
 * (max 8), its report into rb. */
static void team_request(kvm_comm_t *c, kvm_template_t *ta, kvm_template_t *tb, int q, int32_t *out_b,
                         kvm_comm_report_t *rb) {
    kvm_comm_request_t *rq = kvm_comm_request_begin(c, (uint64_t)q + 1);
    kvm_segment_t *in = input_segment(c, 100 + (uint64_t)q, 20 + (q < 2)), *out_a = NULL, *ob = NULL;
    kvm_binding_t ba = {"input", in};
    assert_int_equal(run_agent(rq, ta, &ba, 1, KVM_KV_KVCOMM, NULL, &out_a, 5), 0);
    kvm_binding_t bb[2] = {{"input", in}, {"agent:a:current", out_a}};
    assert_int_equal(run_agent(rq, tb, bb, 2, KVM_KV_KVCOMM, rb, &ob, 3), 0);
    memcpy(out_b, kvm_segment_info(ob)->ids, 3 * sizeof(int32_t));
    assert_int_equal(kvm_comm_request_end(rq), 0);
    kvm_segment_release(in);
    kvm_segment_release(out_a);
    kvm_segment_release(ob);
}

/* Committed anchors share their sample's segment as their base (no copy of their own); when the store needs the
 * blocks, each copies its base back and lets the segment go, and KVCOMM goes on exactly as before: the same
 * response ids as a context that kept its bases shared. */
static void test_anchor_bases_share_segments_and_give_them_back_when_the_store_needs_them(void **st) {
    (void)st;
    kvm_model_t *m = small_model(KVM_ROPE_HALF, 17);
    kvm_comm_t *c[2];
    kvm_template_t *ta[2], *tb[2];
    int32_t ids[2][3];
    kvm_comm_report_t rb;
    for (int k = 0; k < 2; k++) {
        c[k] = kvm_comm_create(m, NULL);
        kvm_comm_config(c[k])->force_reuse = true;
        ta[k] = make_tmpl(c[k], "a", "input", NULL, 41, 30);
        tb[k] = make_tmpl(c[k], "b", "input", "agent:a:current", 51, 21);
        for (int q = 0; q < 4; q++) team_request(c[k], ta[k], tb[k], q, ids[k], &rb);
    }
    kvm_comm_stats_t s0, s1;
    kvm_comm_stats(c[1], &s0);
    assert_true(s0.anchors_shared >= 2);
    assert_true(s0.shared_base_bytes > 0);
    assert_int_equal((int)s0.anchors_unshared, 0);
    kvm_kv_store_t *store = kvm_comm_store(c[1]);
    kvm_kv_store_stats_t ks;
    kvm_kv_store_stats(store, &ks);
    (void)kvm_kv_store_reclaim(store, ks.n_blocks); /* everything: the anchors give their segments back */
    kvm_comm_stats(c[1], &s1);
    kvm_kv_store_stats(store, &ks);
    assert_int_equal(s1.anchors_shared, 0);
    assert_int_equal((int)s1.anchors_unshared, s0.anchors_shared);
    assert_true(s1.anchor_bytes == s0.anchor_bytes + s0.shared_base_bytes); /* the bases are their own now */
    assert_int_equal(ks.n_segments, 0); /* (the templates' text rows keep their blocks) */
    for (int k = 0; k < 2; k++) {
        team_request(c[k], ta[k], tb[k], 4, ids[k], &rb);
        assert_int_equal(rb.mode, KVM_COMM_REUSE);
    }
    assert_memory_equal(ids[0], ids[1], sizeof ids[0]);
    for (int k = 0; k < 2; k++) {
        kvm_template_free(ta[k]);
        kvm_template_free(tb[k]);
        kvm_comm_free(c[k]);
    }
    kvm_model_free(m);
}

/* ---- end to end: anchors form, then agents reuse (§3.1, §3.7, §6) ----------------------------------------- */

static void test_after_two_anchors_agents_reuse_with_n_minus_1_cached_tokens(void **st) {
    (void)st;
    kvm_model_t *m = small_model(KVM_ROPE_HALF, 17);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    kvm_comm_config(c)->force_reuse = true;
    kvm_template_t *ta = make_tmpl(c, "a", "input", NULL, 41, 30);
    kvm_template_t *tb = make_tmpl(c, "b", "input", "agent:a:current", 51, 21);
    int reuse = 0, total = 0;
    for (int q = 0; q < 4; q++) {
        kvm_comm_request_t *rq = kvm_comm_request_begin(c, (uint64_t)q + 1);
        kvm_segment_t *in = input_segment(c, 100 + (uint64_t)q, 20 + (q < 2));
        kvm_segment_t *out_a = NULL;
        kvm_binding_t ba = {"input", in};
        kvm_comm_report_t ra, rb;
        assert_int_equal(run_agent(rq, ta, &ba, 1, KVM_KV_KVCOMM, &ra, &out_a, 5), 0);
        assert_non_null(out_a);
        assert_int_equal(kvm_segment_info(out_a)->frame, 0);
        kvm_binding_t bb[2] = {{"input", in}, {"agent:a:current", out_a}};
        assert_int_equal(run_agent(rq, tb, bb, 2, KVM_KV_KVCOMM, &rb, NULL, 3), 0);
        kvm_comm_report_t *rs[2] = {&ra, &rb};
        for (int k = 0; k < 2; k++) {
            kvm_comm_report_t *r = rs[k];
            assert_int_equal(r->exact_tokens + r->offset_tokens + r->naive_tokens + r->recomputed_tokens, r->input_tokens);
            total++;
            if (r->mode == KVM_COMM_REUSE) {
                reuse++;
                assert_int_equal(r->recomputed_tokens, 1);
                assert_true(r->offset_tokens > 0);
            }
        }
        if (q < 2) assert_int_equal(ra.mode, KVM_COMM_DENSE); /* pools hold <= 1 anchor */
        else assert_int_equal(ra.mode, KVM_COMM_REUSE);
        char js[4096];
        int jl = kvm_comm_report_json(&rb, js, sizeof js);
        assert_true(jl > 0 && (size_t)jl < sizeof js);
        assert_non_null(strstr(js, "\"placeholders\":[{"));
        assert_non_null(strstr(js, "\"selected_recomputed\":0,\"recompute_items\":0"));
        assert_int_equal(kvm_comm_request_end(rq), 0);
        kvm_segment_release(in);
        kvm_segment_release(out_a);
    }
    assert_true(reuse >= 3);
    kvm_comm_stats_t stt;
    kvm_comm_stats(c, &stt);
    assert_int_equal((int)stt.invocations, total);
    assert_int_equal((int)stt.reuse_invocations, reuse);
    assert_true(stt.anchor_bytes > 0);
    teardown(m, c, ta, tb, NULL, NULL);
}

static void test_response_segment_drops_the_token_without_kv_or_computes_it_on_length_stop(void **st) {
    (void)st;
    kvm_model_t *m = small_model(KVM_ROPE_HALF, 19);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    kvm_template_t *t = make_tmpl(c, "a", "input", NULL, 61, 18);
    kvm_segment_t *in = input_segment(c, 80, 12);
    kvm_binding_t b = {"input", in};
    kvm_comm_request_t *rq = kvm_comm_request_begin(c, 1);
    kvm_segment_t *r1 = NULL, *r2 = NULL;
    assert_int_equal(run_agent(rq, t, &b, 1, KVM_KV_PREFIX, NULL, &r1, 7), 0);
    assert_int_equal(kvm_segment_info(r1)->n_tokens, 7); /* length stop, compute: all 7 */
    kvm_comm_config(c)->resp_last_token = KVM_KVCOMM_RESP_DROP;
    assert_int_equal(run_agent(rq, t, &b, 1, KVM_KV_PREFIX, NULL, &r2, 7), 0);
    assert_int_equal(kvm_segment_info(r2)->n_tokens, 6); /* reference: the last one dropped */
    assert_int_equal(kvm_segment_info(r2)->producer_kind, KVM_PRODUCER_AGENT);
    assert_int_equal(kvm_segment_info(r2)->frame, 0);
    kvm_segment_release(r1);
    kvm_segment_release(r2);
    kvm_comm_request_abort(rq);
    teardown(m, c, t, NULL, in, NULL);
}

/* ---- errors ------------------------------------------------------------------------------------------------ */

static void test_prepare_rejects_a_segment_of_another_model_and_a_wrong_frame(void **st) {
    (void)st;
    kvm_model_t *m1 = small_model(KVM_ROPE_HALF, 23), *m2 = small_model(KVM_ROPE_HALF, 24);
    m2->model_id = m1->model_id + 1;
    kvm_comm_t *c1 = kvm_comm_create(m1, NULL), *c2 = kvm_comm_create(m2, NULL);
    kvm_template_t *t = make_tmpl(c1, "a", "input", NULL, 71, 16);
    kvm_segment_t *foreign = input_segment(c2, 81, 10);
    kvm_binding_t b = {"input", foreign};
    kvm_comm_request_t *rq = kvm_comm_request_begin(c1, 1);
    kvm_prompt_t pr = {.tmpl = t, .bindings = &b, .n_bindings = 1, .policy = KVM_KV_KVCOMM};
    kvm_prepared_t p;
    int free_before = kvm_kv_store_pool(kvm_comm_store(c1))->n_free;
    assert_int_equal(kvm_comm_prepare(rq, &pr, &p), KVM_EMODEL);
    assert_int_equal(kvm_kv_store_pool(kvm_comm_store(c1))->n_free, free_before);
    /* a segment kept in its producer frame (not F0) */
    kvm_seq_t s;
    kvm_seq_init(&s, kvm_kv_store_pool(kvm_comm_store(c1)));
    int32_t ids[20];
    fill_ids(ids, 20, 5);
    kvm_batch_item_t it = {.seq = &s, .tokens = ids, .n_tokens = 20};
    assert_int_equal(kvm_forward(m1, &it, 1), 0);
    kvm_segment_t *framed = NULL;
    kvm_segment_info_t meta = {.producer_kind = KVM_PRODUCER_TOOL, .producer_id = "x"};
    assert_int_equal(kvm_segment_publish(kvm_comm_store(c1), &s, 4, 10, 0, &meta, &framed), 0);
    b.seg = framed;
    assert_int_equal(kvm_comm_prepare(rq, &pr, &p), KVM_EFRAME);
    assert_non_null(strstr(kvm_errmsg(), "frame"));
    kvm_seq_free(&s);
    kvm_segment_release(framed);
    kvm_comm_request_abort(rq);
    kvm_segment_release(foreign);
    kvm_template_free(t);
    kvm_comm_free(c1);
    kvm_model_free(m1);
    teardown(m2, c2, NULL, NULL, NULL, NULL);
}

static void test_prepare_fails_cleanly_when_the_kv_budget_cannot_hold_the_prompt(void **st) {
    (void)st;
    kvm_model_t *m = small_model(KVM_ROPE_HALF, 29);
    kvm_comm_opts_t o = {0};
    o.kv_budget_bytes = 12 * kvm_kv_block_bytes(&(kvm_kv_geom_t){3, 2, 16, KVM_F32});
    kvm_comm_t *c = kvm_comm_create(m, &o);
    assert_non_null(c);
    kvm_comm_config(c)->force_reuse = true;
    kvm_kvcomm_ablation(kvm_comm_config(c), "rotation");
    kvm_template_t *t = make_tmpl(c, "a", "input", NULL, 91, 40); /* holds 3 blocks (40 tokens + 1 partial) */
    kvm_segment_t *in = input_segment(c, 82, 60);                /* 4 blocks */
    kvm_segment_pin(in, true);
    kvm_seq_t hog; /* takes 2 of the 5 free blocks: the prompt needs 4 new blocks + 1 copy-on-write */
    kvm_seq_init(&hog, kvm_kv_store_pool(kvm_comm_store(c)));
    assert_int_equal(kvm_seq_reserve(&hog, 32), 0);
    kvm_binding_t b = {"input", in};
    kvm_comm_request_t *rq = kvm_comm_request_begin(c, 1);
    kvm_prompt_t pr = {.tmpl = t, .bindings = &b, .n_bindings = 1, .policy = KVM_KV_KVCOMM};
    kvm_prepared_t p;
    kvm_kv_pool_t *pool = kvm_kv_store_pool(kvm_comm_store(c));
    int free_before = pool->n_free;
    assert_int_equal(kvm_comm_prepare(rq, &pr, &p), KVM_ENOMEM);
    assert_non_null(strstr(kvm_errmsg(), "KV budget exhausted"));
    assert_int_equal(pool->n_free, free_before);
    assert_int_equal(kvm_segment_info(in)->n_tokens, 60);
    kvm_seq_free(&hog);
    kvm_comm_request_abort(rq);
    teardown(m, c, t, NULL, in, NULL);
}

/* ---- templates (§2.2, §8 item 11) ---------------------------------------------------------------------------- */

static void test_template_validation_rejects_whitespace_pieces_and_adjacent_placeholders(void **st) {
    (void)st;
    kvm_model_t *m = small_model(KVM_ROPE_HALF, 31);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    int32_t a[3] = {5, 6, 7};
    kvm_piece_t ws[3] = {{.kind = KVM_PIECE_TEXT, .ids = a, .n_ids = 3},
                         {.kind = KVM_PIECE_PLACEHOLDER, .text = "input"},
                         {.kind = KVM_PIECE_TEXT, .text = "  \n "}};
    kvm_template_desc_t d = {.agent = "x", .pieces = ws, .n_pieces = 3, .raw = true};
    assert_null(kvm_template_create(c, &d));
    assert_int_equal(kvm_errcode(), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "whitespace"));
    kvm_piece_t adj[4] = {{.kind = KVM_PIECE_TEXT, .ids = a, .n_ids = 3},
                          {.kind = KVM_PIECE_PLACEHOLDER, .text = "input"},
                          {.kind = KVM_PIECE_PLACEHOLDER, .text = "tool:search"},
                          {.kind = KVM_PIECE_TEXT, .ids = a, .n_ids = 3}};
    d.pieces = adj;
    d.n_pieces = 4;
    assert_null(kvm_template_create(c, &d));
    assert_non_null(strstr(kvm_errmsg(), "no text between"));
    kvm_piece_t first[2] = {{.kind = KVM_PIECE_PLACEHOLDER, .text = "input"}, {.kind = KVM_PIECE_TEXT, .ids = a, .n_ids = 3}};
    d.pieces = first;
    d.n_pieces = 2;
    assert_null(kvm_template_create(c, &d));
    kvm_piece_t badname[3] = {{.kind = KVM_PIECE_TEXT, .ids = a, .n_ids = 3},
                              {.kind = KVM_PIECE_PLACEHOLDER, .text = "agent:x"},
                              {.kind = KVM_PIECE_TEXT, .ids = a, .n_ids = 3}};
    d.pieces = badname;
    d.n_pieces = 3;
    assert_null(kvm_template_create(c, &d));
    assert_non_null(strstr(kvm_errmsg(), "bad placeholder name"));
    kvm_comm_free(c);
    kvm_model_free(m);
}

static void test_template_change_invalidates_deltas(void **st) {
    (void)st;
    kvm_model_t *m = small_model(KVM_ROPE_HALF, 37);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    kvm_comm_config(c)->force_reuse = true;
    kvm_template_t *t1 = make_tmpl(c, "a", "input", NULL, 101, 20);
    for (int q = 0; q < 2; q++) { /* two anchors with t1's deltas */
        kvm_comm_request_t *rq = kvm_comm_request_begin(c, (uint64_t)q + 1);
        kvm_segment_t *in = input_segment(c, 200 + (uint64_t)q, 15);
        kvm_binding_t b = {"input", in};
        assert_int_equal(run_agent(rq, t1, &b, 1, KVM_KV_KVCOMM, NULL, NULL, 2), 0);
        kvm_comm_request_end(rq);
        kvm_segment_release(in);
    }
    kvm_template_t *t2 = make_tmpl(c, "a", "input", NULL, 102, 20); /* same agent, new text */
    kvm_comm_request_t *rq = kvm_comm_request_begin(c, 9);
    kvm_segment_t *in = input_segment(c, 203, 15);
    kvm_binding_t b = {"input", in};
    kvm_comm_report_t r1, r2;
    assert_int_equal(run_agent(rq, t2, &b, 1, KVM_KV_KVCOMM, &r2, NULL, 2), 0);
    assert_int_equal(r2.mode, KVM_COMM_DENSE);
    assert_int_equal(r2.ph[0].decision, KVM_PH_NO_ANCHOR);
    assert_int_equal(run_agent(rq, t1, &b, 1, KVM_KV_KVCOMM, &r1, NULL, 2), 0);
    assert_int_equal(r1.mode, KVM_COMM_REUSE);
    kvm_comm_request_end(rq);
    teardown(m, c, t1, t2, in, NULL);
}

static void test_template_parse_maps_graph_placeholders_to_kvcomm_names(void **st) {
    (void)st;
    kvm_piece_t *p = NULL;
    int n = 0;
    assert_int_equal(kvm_template_parse("Task: {input}\nPlan:\n{agent.planner}\n{{x}} {agent.c.prev}!", &p, &n), 0);
    assert_int_equal(n, 7);
    assert_string_equal(p[0].text, "Task: ");
    assert_string_equal(p[1].text, "input");
    assert_int_equal(p[1].kind, KVM_PIECE_PLACEHOLDER);
    assert_string_equal(p[3].text, "agent:planner:current");
    assert_string_equal(p[4].text, "\n{x} ");
    assert_string_equal(p[5].text, "agent:c:prev");
    assert_string_equal(p[6].text, "!");
    kvm_free(p);
    assert_int_equal(kvm_template_parse("bad {who} here", &p, &n), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "{who}"));
}

static void test_no_anchor_naive_switch_reuses_without_offset(void **st) {
    (void)st;
    kvm_model_t *m = small_model(KVM_ROPE_HALF, 41);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    kvm_comm_config(c)->force_reuse = true;
    kvm_template_t *t1 = make_tmpl(c, "a", "input", NULL, 111, 20);
    for (int q = 0; q < 2; q++) {
        kvm_comm_request_t *rq = kvm_comm_request_begin(c, (uint64_t)q + 1);
        kvm_segment_t *in = input_segment(c, 300 + (uint64_t)q, 15);
        kvm_binding_t b = {"input", in};
        assert_int_equal(run_agent(rq, t1, &b, 1, KVM_KV_KVCOMM, NULL, NULL, 2), 0);
        kvm_comm_request_end(rq);
        kvm_segment_release(in);
    }
    kvm_template_t *t2 = make_tmpl(c, "b", "input", NULL, 112, 20); /* a consumer without deltas */
    kvm_comm_config(c)->no_anchor = KVM_KVCOMM_NOANCHOR_NAIVE;
    kvm_comm_request_t *rq = kvm_comm_request_begin(c, 9);
    kvm_segment_t *in = input_segment(c, 303, 15);
    kvm_binding_t b = {"input", in};
    kvm_comm_report_t r;
    assert_int_equal(run_agent(rq, t2, &b, 1, KVM_KV_KVCOMM, &r, NULL, 2), 0);
    assert_int_equal(r.mode, KVM_COMM_REUSE);
    assert_int_equal(r.ph[0].decision, KVM_PH_NAIVE);
    assert_int_equal(r.offset_tokens, 0);
    /* t2's first use: its head rows count as computed (recomputed_tokens = head + the last prompt token) */
    assert_int_equal(r.naive_tokens, r.input_tokens - r.exact_tokens - r.recomputed_tokens);
    assert_true(r.naive_tokens >= 15);
    kvm_comm_request_end(rq);
    teardown(m, c, t1, t2, in, NULL);
}

/* A backend that cannot run KVCOMM (no ops, or a head_dim its ops do not take: kvm_comm_create says why in
 * c->kvcomm_off) prepares KVCOMM prompts DENSE, every placeholder dense, and makes no anchors; a pool bound past the
 * ops' anchor limit set directly in the switches is refused by prepare. */
static void test_kvcomm_policy_prepares_dense_where_the_backend_cannot_run_it(void **st) {
    (void)st;
    kvm_model_t *m = small_model(KVM_ROPE_HALF, 47);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    assert_string_equal(c->kvcomm_off, ""); /* the CPU backend runs it */
    kvm_comm_config(c)->force_reuse = true;
    snprintf(c->kvcomm_off, sizeof c->kvcomm_off, "a backend without the KVCOMM ops");
    kvm_template_t *t = make_tmpl(c, "a", "input", NULL, 121, 20);
    kvm_segment_t *in = NULL;
    for (int q = 0; q < 4; q++) {
        kvm_comm_request_t *rq = kvm_comm_request_begin(c, (uint64_t)q + 1);
        kvm_segment_release(in);
        in = input_segment(c, 500 + (uint64_t)q, 15);
        kvm_binding_t b = {"input", in};
        kvm_comm_report_t r;
        assert_int_equal(run_agent(rq, t, &b, 1, KVM_KV_KVCOMM, &r, NULL, 2), 0);
        assert_int_equal(r.mode, KVM_COMM_DENSE);
        assert_int_equal(r.ph[0].decision, KVM_PH_DENSE);
        assert_int_equal(r.offset_tokens + r.naive_tokens, 0);
        assert_int_equal(kvm_comm_request_end(rq), 0);
    }
    kvm_comm_stats_t stt;
    kvm_comm_stats(c, &stt);
    assert_int_equal((int)stt.anchors_created, 0);
    c->kvcomm_off[0] = 0;
    kvm_comm_config(c)->max_anchors = KVM_KVCOMM_MAX_ANCHORS; /* past what set() takes: V + 1 would not fit */
    kvm_comm_request_t *rq = kvm_comm_request_begin(c, 9);
    kvm_binding_t b = {"input", in};
    kvm_prepared_t p;
    kvm_prompt_t pr = {.tmpl = t, .bindings = &b, .n_bindings = 1, .policy = KVM_KV_KVCOMM};
    assert_int_equal(kvm_comm_prepare(rq, &pr, &p), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "max_anchors"));
    kvm_comm_request_abort(rq);
    teardown(m, c, t, NULL, in, NULL);
}

static void test_prepare_ids_takes_the_exact_prefix_of_an_earlier_dense_prompt(void **st) {
    (void)st;
    kvm_model_t *m = small_model(KVM_ROPE_HALF, 43);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    int32_t ids[70];
    fill_ids(ids, 70, 4242);
    kvm_comm_request_t *rq = kvm_comm_request_begin(c, 1);
    kvm_gen_params_t gp = {.max_tokens = 2, .ignore_eos = true};
    kvm_prepared_t p;
    kvm_gen_result_t res;
    memset(&res, 0, sizeof res);
    assert_int_equal(kvm_comm_prepare_ids(c, ids, 70, KVM_KV_PREFIX, &p), 0);
    assert_int_equal(p.report.exact_tokens, 0);
    assert_int_equal(kvm_generate(m, &p.seq, p.rest_ids, p.n_rest, &gp, NULL, NULL, &res), 0);
    assert_int_equal(kvm_comm_complete(rq, &p, &res, NULL), 0);
    kvm_gen_result_free(&res);
    kvm_prepared_release(&p);
    assert_int_equal(kvm_comm_prepare_ids(c, ids, 70, KVM_KV_PREFIX, &p), 0);
    assert_int_equal(p.report.exact_tokens, 64);
    assert_int_equal(p.n_rest, 6);
    assert_int_equal(p.report.recomputed_tokens, 6);
    kvm_prepared_release(&p);
    assert_int_equal(kvm_comm_prepare_ids(c, ids, 70, KVM_KV_DENSE, &p), 0);
    assert_int_equal(p.n_rest, 70);
    kvm_prepared_release(&p);
    assert_int_equal(kvm_comm_prepare_ids(c, ids, 70, KVM_KV_KVCOMM, &p), KVM_EINVAL);
    kvm_comm_request_abort(rq);
    kvm_comm_free(c);
    kvm_model_free(m);
}

/* ---- oracle offsets and short-piece recompute (kvcomm.md §5.2) ------------------------------------------------ */

typedef struct oracle_run {
    float err_before, err;   /* max_rel of the cached rows [0, N-1) to a dense prefill: after prepare / at the end */
    kvm_comm_report_t rep;   /* the final report */
    float *before, *after;   /* the cached rows [0, N-1) after prepare and at the end (host fp32) */
    float *dense;            /* the dense prefill's rows [0, N-1) */
    float *mass;             /* with the attention oracles: the attention each row gets in a dense prefill of the whole
                                prompt from the rows after the last shared placeholder (kvm_forward_attn_mass) */
    int n;                   /* N - 1 */
} oracle_run_t;

/* Agent a reads {input} and answers 5 tokens; agent b reads {input} and a's answer (in the order given by
 * agent_first) behind its own prefix. Two dense requests make the anchors (force_reuse), then in request 3
 * agent b is prepared twice with an oracle (which, only; which = 0: a plain prepare): first with every recompute
 * switch off (`before`), then with recompute_below and the g_recompute_* switches (`after`, the one that runs), and
 * both caches are compared with a dense prefill of the same ids. */
static float g_recompute_frac = 0; /* kvcomm.recompute_frac and kvcomm.recompute_text of oracle_run's `after` */
static int g_recompute_text = 0;
static float g_recompute_spread = 0; /* kvcomm.recompute_spread of oracle_run's `after` */
static int g_recompute_rank = 0;     /* kvcomm.recompute_rank of oracle_run's `after` */
static int g_oracle_select = 0; /* kvm_comm_set_oracle_selection (KVM_ORACLE_SELECT_*) for oracle_run's context */

/* Runs a prepared prompt's rest and 3 more tokens, completes the step and releases p. */
static void generate_and_complete(kvm_model_t *m, kvm_comm_request_t *rq, kvm_prepared_t *p) {
    kvm_gen_params_t gp = {.max_tokens = 3, .ignore_eos = true};
    kvm_gen_result_t res;
    memset(&res, 0, sizeof res);
    assert_int_equal(kvm_generate(m, &p->seq, p->rest_ids, p->n_rest, &gp, NULL, NULL, &res), 0);
    assert_int_equal(kvm_comm_complete(rq, p, &res, NULL), 0);
    kvm_gen_result_free(&res);
    kvm_prepared_release(p);
}

static void prepare_b(kvm_comm_request_t *rq, kvm_prompt_t *pr, int which, const char *only, kvm_prepared_t *p) {
    int rc = which ? kvm_comm_prepare_oracle(rq, pr, which, only, p) : kvm_comm_prepare(rq, pr, p);
    if (rc) fprintf(stderr, "prepare: %s\n", kvm_errmsg());
    assert_int_equal(rc, 0);
    assert_int_equal(p->report.mode, KVM_COMM_REUSE);
    assert_int_equal(p->n_cached, p->n_prompt - 1);
    assert_int_equal(p->seq.n_tokens, p->n_cached);
    assert_memory_equal(p->seq.tokens, p->prompt_ids, (size_t)p->n_cached * sizeof(int32_t));
}

static void oracle_run(kvm_rope_layout_t layout, bool agent_first, int which, const char *only, int recompute_below,
                       oracle_run_t *out) {
    memset(out, 0, sizeof *out);
    kvm_model_t *m = small_model(layout, 23);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    kvm_kvcomm_config_t *cfg = kvm_comm_config(c);
    cfg->force_reuse = true;
    assert_int_equal(kvm_comm_set_oracle_selection(c, g_oracle_select), 0);
    kvm_template_t *ta = make_tmpl(c, "a", "input", NULL, 41, 30);
    kvm_template_t *tb = make_tmpl(c, "b", agent_first ? "agent:a:current" : "input",
                                   agent_first ? "input" : "agent:a:current", 51, 21);
    const comm_geom_t g = {m->cfg.n_layers, m->cfg.n_kv_heads, m->cfg.head_dim, 4};
    for (int q = 0; q < 4; q++) {
        kvm_comm_request_t *rq = kvm_comm_request_begin(c, (uint64_t)q + 1);
        kvm_segment_t *in = input_segment(c, 300 + (uint64_t)q, 20 + (q < 2)), *out_a = NULL;
        kvm_binding_t ba = {"input", in};
        assert_int_equal(run_agent(rq, ta, &ba, 1, KVM_KV_KVCOMM, NULL, &out_a, 5), 0);
        assert_non_null(out_a);
        kvm_binding_t bb[2] = {{"input", in}, {"agent:a:current", out_a}};
        if (q < 3) {
            assert_int_equal(run_agent(rq, tb, bb, 2, KVM_KV_KVCOMM, NULL, NULL, 3), 0);
        } else {
            kvm_prompt_t pr = {.tmpl = tb, .bindings = bb, .n_bindings = 2, .policy = KVM_KV_KVCOMM};
            kvm_prepared_t p;
            prepare_b(rq, &pr, which, only, &p); /* every recompute switch off */
            const int n = p.n_prompt - 1;
            float *dense = dense_kv(c, p.prompt_ids, n);
            size_t e = comm_rows_elems(&g, n);
            out->n = n;
            out->before = malloc(e * sizeof(float));
            out->after = malloc(e * sizeof(float));
            assert_int_equal(kvm_kv_read_rows(p.seq.pool, p.seq.blocks, 0, n, out->before), 0);
            out->err_before = max_rel(out->before, dense, e);
            kvm_prepared_release(&p);
            cfg->recompute_below = recompute_below, cfg->recompute_frac = g_recompute_frac;
            cfg->recompute_text = g_recompute_text, cfg->recompute_spread = g_recompute_spread;
            cfg->recompute_rank = g_recompute_rank;
            prepare_b(rq, &pr, which, only, &p); /* the same decisions (cached per sample), now recomputing */
            assert_int_equal(p.n_prompt - 1, n);
            assert_int_equal(kvm_kv_read_rows(p.seq.pool, p.seq.blocks, 0, n, out->after), 0);
            out->err = max_rel(out->after, dense, e);
            out->rep = p.report;
            out->dense = dense;
            if (g_oracle_select == KVM_ORACLE_SELECT_ATTENTION || g_oracle_select == KVM_ORACLE_SELECT_WEIGHTED) {
                int from = 0;
                for (int i = 0; i < p.report.n_placeholders; i++)
                    if (p.report.ph[i].decision == KVM_PH_SHARED && p.report.ph[i].start_pos + p.report.ph[i].tokens > from)
                        from = p.report.ph[i].start_pos + p.report.ph[i].tokens;
                out->mass = calloc((size_t)p.n_prompt, sizeof(float));
                kvm_seq_t d;
                kvm_seq_init(&d, kvm_kv_store_pool(kvm_comm_store(c)));
                kvm_batch_item_t it = {.seq = &d, .tokens = p.prompt_ids, .n_tokens = p.n_prompt};
                assert_int_equal(kvm_forward_attn_mass(m, &it, 1, out->mass, p.n_prompt, from), 0);
                kvm_seq_free(&d);
            }
            generate_and_complete(m, rq, &p);
        }
        assert_int_equal(kvm_comm_request_end(rq), 0);
        kvm_segment_release(in);
        kvm_segment_release(out_a);
    }
    teardown(m, c, ta, tb, NULL, NULL);
}

static void oracle_run_free(oracle_run_t *r) {
    free(r->before);
    free(r->after);
    free(r->dense);
    free(r->mass);
}

static void test_oracle_offsets_make_the_reused_cache_equal_dense_prefill_in_both_rope_layouts(void **st) {
    (void)st;
    kvm_rope_layout_t lay[2] = {KVM_ROPE_HALF, KVM_ROPE_INTERLEAVED};
    for (int k = 0; k < 2; k++) {
        oracle_run_t est, orc;
        oracle_run(lay[k], false, 0, NULL, 0, &est);        /* the anchors' estimate: visibly off */
        oracle_run(lay[k], false, KVM_ORACLE_ALL, NULL, 0, &orc);
        fprintf(stderr, "layout %d: max rel err to dense, estimated %.3g, oracle %.3g\n", k, est.err, orc.err);
        assert_true(est.err > 1e-3f);
        assert_true(orc.err <= 1e-5f);
        assert_int_equal(orc.rep.offset_tokens, est.rep.offset_tokens);
        assert_int_equal(orc.rep.recomputed_tokens, 1);
        oracle_run_free(&est);
        oracle_run_free(&orc);
    }
}

static void test_oracle_offsets_equal_dense_with_qk_norm_and_biases(void **st) {
    (void)st;
    g_qwen_like = true;
    oracle_run_t orc;
    oracle_run(KVM_ROPE_HALF, true, KVM_ORACLE_ALL, NULL, 0, &orc);
    g_qwen_like = false;
    assert_true(orc.err <= 1e-5f);
    oracle_run_free(&orc);
}

static void test_oracle_on_one_piece_leaves_the_other_estimated(void **st) {
    (void)st;
    oracle_run_t a, b, c;
    oracle_run(KVM_ROPE_HALF, false, KVM_ORACLE_ALL, "input", 0, &a);
    oracle_run(KVM_ROPE_HALF, false, KVM_ORACLE_PH, NULL, 0, &b);
    oracle_run(KVM_ROPE_HALF, false, KVM_ORACLE_PF, NULL, 0, &c);
    assert_true(a.err > 1e-3f);
    assert_true(b.err > 1e-3f);
    assert_true(c.err > 1e-3f);
    oracle_run_free(&a);
    oracle_run_free(&b);
    oracle_run_free(&c);
}

/* With the input exact (oracle) and the short answer recomputed, the whole cache is the dense one: the
 * recompute prefills the right ids at the right positions behind the assembled rows, and (answer first)
 * the later assembled rows are written back where they were. */
static void recompute_behind_oracle_input(bool agent_first) {
    oracle_run_t r;
    oracle_run(KVM_ROPE_HALF, agent_first, KVM_ORACLE_ALL, "input", 6, &r);
    fprintf(stderr, "answer %s: max rel err before %.3g, after the recompute %.3g\n", agent_first ? "first" : "last",
            r.err_before, r.err);
    assert_true(r.err_before > 1e-3f);
    assert_true(r.err <= 1e-5f);
    const kvm_comm_report_t *p = &r.rep;
    int ai = agent_first ? 0 : 1;
    int span = p->ph[ai].tokens + p->ph[ai].text_tokens - (agent_first ? 0 : 1); /* the last token is always computed */
    assert_int_equal(p->ph[ai].tokens, 5);
    assert_int_equal(p->short_recomputed, span);
    assert_int_equal(p->recomputed_tokens, 1 + span);
    assert_int_equal(p->exact_tokens + p->offset_tokens + p->naive_tokens + p->recomputed_tokens, p->input_tokens);
    assert_int_equal(p->mode, KVM_COMM_REUSE);
    oracle_run_free(&r);
}

static void test_recomputing_the_short_answer_behind_an_exact_input_gives_the_dense_cache(void **st) {
    (void)st;
    recompute_behind_oracle_input(false);
    recompute_behind_oracle_input(true);
}

static void test_recompute_below_keeps_every_other_row_bit_for_bit_and_is_off_by_default(void **st) {
    (void)st;
    oracle_run_t off, on;
    oracle_run(KVM_ROPE_HALF, true, 0, NULL, 0, &off);
    assert_memory_equal(off.before, off.after, comm_rows_elems(&(comm_geom_t){3, 2, 16, 4}, off.n) * sizeof(float));
    assert_int_equal(off.rep.short_recomputed, 0);
    assert_int_equal(off.rep.recomputed_tokens, 1);
    oracle_run(KVM_ROPE_HALF, true, 0, NULL, 6, &on); /* answer (5 tokens) first: its span sits in the middle */
    const comm_geom_t g = {3, 2, 16, 4};
    int a = on.rep.ph[0].start_pos, b = a + on.rep.ph[0].tokens + on.rep.ph[0].text_tokens;
    int changed_in = 0;
    double err_in_before = 0, err_in_after = 0, scale = 0;
    for (int l = 0; l < g.L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < g.H; h++)
                for (int t = 0; t < on.n; t++) {
                    size_t o = comm_idx(&g, on.n, l, kv, h, t);
                    const float *x = on.before + o, *y = on.after + o, *d = on.dense + o;
                    bool same = !memcmp(x, y, (size_t)g.D * sizeof(float));
                    if (t < a || t >= b) {
                        assert_true(same);
                        continue;
                    }
                    changed_in += !same;
                    for (int k = 0; k < g.D; k++) {
                        err_in_before = fmax(err_in_before, fabs((double)x[k] - d[k]));
                        err_in_after = fmax(err_in_after, fabs((double)y[k] - d[k]));
                        scale = fmax(scale, fabs((double)d[k]));
                    }
                }
    /* the span sits right behind the exact segment 0, so its recomputed rows are the dense ones, which its
     * estimated rows were not */
    assert_true(changed_in > 0);
    assert_true(err_in_before > 1e-3 * scale);
    assert_true(err_in_after <= 1e-5 * scale);
    assert_int_equal(on.rep.short_recomputed, b - a);
    oracle_run_free(&off);
    oracle_run_free(&on);
}

/* kvcomm.recompute_frac = 1 with every text segment recomputed too: each offset row is recomputed by the
 * batched 1-token views of the block table, so the cache is the dense one; nothing is left offset-corrected. */
static void test_recompute_frac_one_with_the_text_recomputed_gives_the_dense_cache(void **st) {
    (void)st;
    oracle_run_t r;
    g_recompute_frac = 1.0f, g_recompute_text = 1000;
    oracle_run(KVM_ROPE_HALF, false, 0, NULL, 0, &r);
    g_recompute_frac = 0, g_recompute_text = 0;
    fprintf(stderr, "recompute_frac=1: max rel err before %.3g, after %.3g; %d rows selected\n", r.err_before, r.err,
            r.rep.selected_recomputed);
    assert_true(r.err_before > 1e-3f);
    assert_true(r.err <= 1e-5f);
    assert_int_equal(r.rep.offset_tokens, 0);
    assert_int_equal(r.rep.selected_recomputed, r.rep.ph[0].tokens + r.rep.ph[1].tokens); /* input and answer */
    assert_int_equal(r.rep.short_recomputed, r.rep.ph[0].text_tokens + r.rep.ph[1].text_tokens - 1); /* not the last */
    assert_int_equal(r.rep.exact_tokens + r.rep.offset_tokens + r.rep.naive_tokens + r.rep.recomputed_tokens,
                     r.rep.input_tokens);
    assert_int_equal(r.rep.mode, KVM_COMM_REUSE);
    oracle_run_free(&r);
}

/* A fraction recomputes exactly ceil(frac x candidates) rows in place: those rows change, every other row stays
 * bit for bit (their estimates are kept; the text segments are not touched without recompute_text). */
static void test_recompute_frac_changes_only_the_selected_rows(void **st) {
    (void)st;
    oracle_run_t r;
    g_recompute_frac = 0.25f;
    oracle_run(KVM_ROPE_HALF, false, 0, NULL, 0, &r);
    g_recompute_frac = 0;
    const comm_geom_t g = {3, 2, 16, 4};
    int cand = r.rep.ph[0].tokens + r.rep.ph[1].tokens; /* both placeholders are offset-corrected here */
    int want = (int)ceil(0.25 * cand);
    assert_int_equal(r.rep.selected_recomputed, want);
    assert_int_equal(r.rep.recompute_items, 1); /* scattered rows, one positioned item */
    int changed = 0;
    for (int t = 0; t < r.n; t++) {
        bool same = true;
        for (int l = 0; l < g.L && same; l++)
            for (int kv = 0; kv < 2 && same; kv++)
                for (int h = 0; h < g.H && same; h++) {
                    size_t o = comm_idx(&g, r.n, l, kv, h, t);
                    same = !memcmp(r.before + o, r.after + o, (size_t)g.D * sizeof(float));
                }
        changed += !same;
    }
    assert_int_equal(changed, want);
    assert_true(r.err < r.err_before * 1.5f); /* the selected rows are computed from the model, not garbage */
    oracle_run_free(&r);
}

/* Whether row t of r changed between prepare and the end (the recompute pass took it), and its true error before
 * (the squared distance of its K and V, every layer and head, to the dense prefill) into *err. */
static bool row_recomputed(const oracle_run_t *r, const comm_geom_t *g, int t, double *err) {
    bool same = true;
    *err = 0;
    for (int l = 0; l < g->L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < g->H; h++) {
                size_t o = comm_idx(g, r->n, l, kv, h, t);
                same = same && !memcmp(r->before + o, r->after + o, (size_t)g->D * sizeof(float));
                for (int d = 0; d < g->D; d++)
                    *err += ((double)r->before[o + d] - r->dense[o + d]) * ((double)r->before[o + d] - r->dense[o + d]);
            }
    return !same;
}

/* The selection oracle (kvm_comm_set_oracle_selection): the fraction's rows are those whose assembled K/V are
 * furthest from a dense prefill's: every recomputed row's true error (before the pass) is at least every kept
 * placeholder row's, and the count is the fraction's. */
static void test_the_selection_oracle_recomputes_the_rows_furthest_from_dense(void **st) {
    (void)st;
    oracle_run_t r;
    g_recompute_frac = 0.25f, g_oracle_select = KVM_ORACLE_SELECT_ERROR;
    oracle_run(KVM_ROPE_HALF, false, 0, NULL, 0, &r);
    g_recompute_frac = 0, g_oracle_select = KVM_ORACLE_SELECT_OFF;
    const comm_geom_t g = {3, 2, 16, 4};
    const int cand = r.rep.ph[0].tokens + r.rep.ph[1].tokens;
    assert_int_equal(r.rep.selected_recomputed, (int)ceil(0.25 * cand));
    double min_changed = INFINITY, max_kept = 0;
    int changed = 0;
    for (int i = 0; i < 2; i++)
        for (int t = r.rep.ph[i].start_pos; t < r.rep.ph[i].start_pos + r.rep.ph[i].tokens && t < r.n; t++) {
            double err;
            const bool same = !row_recomputed(&r, &g, t, &err);
            if (same) max_kept = err > max_kept ? err : max_kept;
            else min_changed = err < min_changed ? err : min_changed, changed++;
        }
    fprintf(stderr, "selection oracle: %d rows recomputed, least true error among them %.6g, most among the kept %.6g\n",
            changed, min_changed, max_kept);
    assert_int_equal(changed, r.rep.selected_recomputed);
    assert_true(min_changed >= max_kept);
    oracle_run_free(&r);
}

/* The attention oracles (kvm_comm_set_oracle_selection): the fraction's rows are those that get the most attention from
 * the rows after the last shared placeholder in a dense prefill (ATTENTION), or the most of that attention times
 * their true error (WEIGHTED); a value outside KVM_ORACLE_SELECT_* is refused. */
static void test_the_attention_oracles_recompute_the_rows_the_agent_reads_most(void **st) {
    (void)st;
    const comm_geom_t g = {3, 2, 16, 4};
    for (int by = KVM_ORACLE_SELECT_ATTENTION; by <= KVM_ORACLE_SELECT_WEIGHTED; by++) {
        oracle_run_t r;
        g_recompute_frac = 0.25f, g_oracle_select = by;
        oracle_run(KVM_ROPE_HALF, false, 0, NULL, 0, &r);
        g_recompute_frac = 0, g_oracle_select = KVM_ORACLE_SELECT_OFF;
        assert_non_null(r.mass);
        const int cand = r.rep.ph[0].tokens + r.rep.ph[1].tokens;
        assert_int_equal(r.rep.selected_recomputed, (int)ceil(0.25 * cand));
        double min_changed = INFINITY, max_kept = 0, total = 0;
        int changed = 0;
        for (int i = 0; i < 2; i++)
            for (int t = r.rep.ph[i].start_pos; t < r.rep.ph[i].start_pos + r.rep.ph[i].tokens && t < r.n; t++) {
                double err;
                const bool same = !row_recomputed(&r, &g, t, &err);
                const double score = by == KVM_ORACLE_SELECT_ATTENTION ? r.mass[t] : err * r.mass[t];
                total += r.mass[t];
                if (same) max_kept = score > max_kept ? score : max_kept;
                else min_changed = score < min_changed ? score : min_changed, changed++;
            }
        fprintf(stderr, "attention oracle %d: %d rows recomputed, least score among them %.6g, most among the kept %.6g\n",
                by, changed, min_changed, max_kept);
        assert_true(total > 0);
        assert_int_equal(changed, r.rep.selected_recomputed);
        assert_true(min_changed >= max_kept * (1 - 1e-5)); /* the scores in float, here in double */
        oracle_run_free(&r);
    }
    kvm_model_t *m = small_model(KVM_ROPE_HALF, 23);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    assert_int_equal(kvm_comm_set_oracle_selection(c, KVM_ORACLE_SELECT_WEIGHTED + 1), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "KVM_ORACLE_SELECT_"));
    kvm_comm_free(c);
    kvm_model_free(m);
}

/* kvcomm.recompute_rank (ours, research): the ranking pass runs the rows after the last shared placeholder once over
 * the assembled cache, and the recompute pass computes them again: the same number of selected rows as the spread's
 * ranking, plus those rows (here the only short ones: recompute_below and recompute_text are off), a cache computed
 * from the model, and a selection other than the spread's. */
static void test_recompute_rank_by_attention_takes_the_rows_the_agent_reads(void **st) {
    (void)st;
    oracle_run_t sp, at;
    g_recompute_frac = 0.25f;
    oracle_run(KVM_ROPE_HALF, false, 0, NULL, 0, &sp);
    g_recompute_rank = 1;
    oracle_run(KVM_ROPE_HALF, false, 0, NULL, 0, &at);
    g_recompute_frac = 0, g_recompute_rank = 0;
    const int cand = sp.rep.ph[0].tokens + sp.rep.ph[1].tokens;
    assert_int_equal(sp.rep.selected_recomputed, (int)ceil(0.25 * cand));
    assert_int_equal(at.rep.selected_recomputed, sp.rep.selected_recomputed);
    /* b's prompt ends with the agent's own text after its last placeholder: the pass's rows, recomputed again */
    const int own = at.n - (at.rep.ph[1].start_pos + at.rep.ph[1].tokens);
    assert_true(own > 0);
    assert_int_equal(sp.rep.short_recomputed, 0);
    assert_int_equal(at.rep.short_recomputed, own);
    assert_true(at.err < at.err_before * 1.5f); /* computed from the model, not garbage */
    /* the selection differs from the spread's on this model (a ranking that changed nothing would pass the counts) */
    const comm_geom_t g = {3, 2, 16, 4};
    int differ = 0;
    for (int i = 0; i < 2; i++)
        for (int t = at.rep.ph[i].start_pos; t < at.rep.ph[i].start_pos + at.rep.ph[i].tokens && t < at.n; t++) {
            double e;
            differ += row_recomputed(&at, &g, t, &e) != row_recomputed(&sp, &g, t, &e);
        }
    fprintf(stderr, "recompute_rank=attention: %d of %d candidate rows chosen differently from the spread\n", differ, cand);
    assert_true(differ > 0);
    oracle_run_free(&sp);
    oracle_run_free(&at);
}

/* kvcomm.recompute_spread (ours): the gate on the predicted offset error. A gate every candidate passes (scores are
 * > 0) recomputes every offset row, as recompute_frac = 1 does; a gate none passes recomputes none; in between, the
 * rows it takes are exactly those the scores of a fraction-only run would rank first. */
static void test_recompute_spread_gate_recomputes_the_rows_whose_predicted_error_passes_it(void **st) {
    (void)st;
    oracle_run_t all, none, half;
    g_recompute_spread = 1e-35f;
    oracle_run(KVM_ROPE_HALF, false, 0, NULL, 0, &all);
    g_recompute_spread = 1e30f;
    oracle_run(KVM_ROPE_HALF, false, 0, NULL, 0, &none);
    const int cand = all.rep.ph[0].tokens + all.rep.ph[1].tokens;
    assert_int_equal(all.rep.selected_recomputed, cand);
    assert_true(all.err < all.err_before * 1.5f); /* computed from the model, not garbage */
    assert_int_equal(none.rep.selected_recomputed, 0);
    assert_memory_equal(none.before, none.after, comm_rows_elems(&(comm_geom_t){3, 2, 16, 4}, none.n) * sizeof(float));
    /* a fraction and a gate together: the gate can only add rows to the fraction's */
    g_recompute_spread = 1e30f, g_recompute_frac = 0.25f;
    oracle_run(KVM_ROPE_HALF, false, 0, NULL, 0, &half);
    g_recompute_spread = 0, g_recompute_frac = 0;
    assert_int_equal(half.rep.selected_recomputed, (int)ceil(0.25 * cand));
    oracle_run_free(&all);
    oracle_run_free(&none);
    oracle_run_free(&half);
}

/* ---- hand-made pools: prediction and eviction (§8 items 6-8) ------------------------------------------------- */

typedef struct fake {
    kvm_comm_t c;
    kvm_comm_request_t rq;
} fake_t;

static comm_anchor_t *mk_anchor(const comm_geom_t *g, int T, uint64_t key, float base_v) {
    comm_anchor_t *a = kvm_calloc(1, sizeof *a);
    a->refs = 1;
    a->key = key;
    a->T = T;
    a->base = kvm_malloc(comm_rows_elems(g, T) * sizeof(float));
    for (size_t i = 0; i < comm_rows_elems(g, T); i++) a->base[i] = base_v;
    return a;
}

static void fake_init(fake_t *f, int n, const int *T, const float *v) {
    memset(f, 0, sizeof *f);
    kvm_kvcomm_config_default(&f->c.cfg);
    snprintf(f->c.kvcomm_off, sizeof f->c.kvcomm_off, "a hand-made pool: no backend to mirror anchors on");
    f->c.g = (comm_geom_t){2, 1, 4, 4};
    comm_pool_t *p = comm_pool_get(&f->c, "input", true);
    p->a = kvm_malloc(sizeof(comm_anchor_t *) * 32);
    p->cap = 32;
    for (int i = 0; i < n; i++) {
        p->a[p->n] = mk_anchor(&f->c.g, T[i], 100 + (uint64_t)i, v[i]);
        p->a[p->n]->insert_seq = (uint64_t)i + 1;
        p->n++;
    }
    f->c.insert_seq = (uint64_t)n;
    f->rq.c = &f->c;
    f->rq.snaps = kvm_calloc(1, sizeof *f->rq.snaps);
    f->rq.n_snaps = 1;
    f->rq.snaps[0].a = kvm_malloc(sizeof(comm_anchor_t *) * 32);
    for (int i = 0; i < p->n; i++) {
        p->a[i]->refs++;
        f->rq.snaps[0].a[i] = p->a[i];
    }
    f->rq.snaps[0].n = p->n;
}

static void fake_free(fake_t *f) {
    comm_request_free_state(&f->rq);
    for (int i = 0; i < f->c.n_pools; i++) {
        for (int k = 0; k < f->c.pools[i].n; k++) comm_anchor_unref(&f->c, f->c.pools[i].a[k]);
        kvm_free(f->c.pools[i].a);
    }
    kvm_free(f->c.pools);
}

static comm_sample_t mk_sample(const comm_geom_t *g, int T, float v) {
    comm_sample_t s;
    memset(&s, 0, sizeof s);
    snprintf(s.name, sizeof s.name, "input");
    s.T = T;
    s.X = kvm_malloc(comm_rows_elems(g, T) * sizeof(float));
    for (size_t i = 0; i < comm_rows_elems(g, T); i++) s.X[i] = v;
    return s;
}

static void test_prediction_is_new_with_at_most_one_anchor_or_one_eligible(void **st) {
    (void)st;
    fake_t f;
    int T1[1] = {8};
    float v1[1] = {0};
    fake_init(&f, 1, T1, v1);
    comm_sample_t s = mk_sample(&f.c.g, 8, 0);
    assert_int_equal(comm_predict_by(&f.rq, &s, comm_ref_pred_dist), 0);
    assert_true(s.is_new);
    kvm_free(s.X);
    fake_free(&f);
    int T3[3] = {8, 4, 3}; /* only the first is long enough (>= 5) */
    float v3[3] = {0, 0, 0};
    fake_init(&f, 3, T3, v3);
    s = mk_sample(&f.c.g, 5, 0);
    assert_int_equal(comm_predict_by(&f.rq, &s, comm_ref_pred_dist), 0);
    assert_true(s.is_new);
    assert_int_equal(s.n_eligible, 1);
    kvm_free(s.X);
    fake_free(&f);
}

static void test_prediction_counts_anchors_of_equal_length_as_eligible(void **st) {
    (void)st;
    fake_t f;
    int T[2] = {6, 6};
    float v[2] = {0.0f, 5.0f};
    fake_init(&f, 2, T, v);
    comm_sample_t s = mk_sample(&f.c.g, 6, 0.0f); /* equal to anchor 0 */
    assert_int_equal(comm_predict_by(&f.rq, &s, comm_ref_pred_dist), 0);
    assert_int_equal(s.n_eligible, 2);
    assert_false(s.is_new);
    kvm_free(s.X);
    fake_free(&f);
}

static void test_equidistant_anchors_have_maximal_entropy_and_predict_new(void **st) {
    (void)st;
    fake_t f;
    int T[4] = {6, 6, 7, 9};
    float v[4] = {1, 1, 1, 1};
    fake_init(&f, 4, T, v);
    comm_sample_t s = mk_sample(&f.c.g, 6, 0.0f);
    assert_int_equal(comm_predict_by(&f.rq, &s, comm_ref_pred_dist), 0);
    assert_true(fabsf(s.entropy - 2.0f) < 1e-5f); /* log2(4) */
    assert_true(s.is_new);                          /* 2 > 0.3 * 2 */
    assert_int_equal(f.rq.n_bumps, 0);
    kvm_free(s.X);
    fake_free(&f);
}

static void test_clear_nearest_anchor_shares_and_the_top_p_quirk_bumps_all_eligible(void **st) {
    (void)st;
    fake_t f;
    int T[3] = {6, 6, 3};
    float v[3] = {0.0f, 3.0f, 0.0f}; /* anchor 2 is too short */
    fake_init(&f, 3, T, v);
    comm_sample_t s = mk_sample(&f.c.g, 6, 0.0f);
    assert_int_equal(comm_predict_by(&f.rq, &s, comm_ref_pred_dist), 0);
    assert_false(s.is_new);
    assert_true(s.entropy < 1e-3f);
    /* the top weight is >= 0.9, so J is empty and every eligible anchor gets a bump (reference quirk) */
    assert_int_equal(f.rq.n_bumps, 2);
    /* bumps are staged: the committed counters change only at commit */
    assert_int_equal(f.c.pools[0].a[0]->activation, 0u);
    assert_int_equal(comm_commit(&f.rq), 0);
    assert_int_equal(f.c.pools[0].a[0]->activation, 1u);
    assert_int_equal(f.c.pools[0].a[1]->activation, 1u);
    assert_int_equal(f.c.pools[0].a[2]->activation, 0u);
    kvm_free(s.X);
    fake_free(&f);
}

static void test_top_p_bumps_only_the_anchors_below_the_cumulative_cut(void **st) {
    (void)st;
    fake_t f;
    /* distances chosen so the weights are about 0.6, 0.25, 0.1, 0.05 */
    int T[4] = {4, 4, 4, 4};
    /* d = |v| * sqrt(L*H*T*D) = |v| * sqrt(32): want d = 0, 0.875, 1.79, 2.48 */
    float v[4] = {0.0f, 0.875f / 5.656854f, 1.792f / 5.656854f, 2.485f / 5.656854f};
    fake_init(&f, 4, T, v);
    f.c.cfg.force_reuse = true;
    comm_sample_t s = mk_sample(&f.c.g, 4, 0.0f);
    assert_int_equal(comm_predict_by(&f.rq, &s, comm_ref_pred_dist), 0);
    assert_false(s.is_new);
    /* cumulative: 0.6 (<0.9), 0.85 (<0.9), 0.95 -> cut = 1: the two best are bumped */
    assert_int_equal(f.rq.n_bumps, 2);
    assert_int_equal(comm_commit(&f.rq), 0);
    assert_int_equal(f.c.pools[0].a[0]->activation, 1u);
    assert_int_equal(f.c.pools[0].a[1]->activation, 1u);
    assert_int_equal(f.c.pools[0].a[2]->activation, 0u);
    kvm_free(s.X);
    fake_free(&f);
}

static void test_entropy_treats_underflowed_weights_as_zero_not_nan(void **st) {
    (void)st;
    fake_t f;
    int T[3] = {6, 6, 6};
    float v[3] = {0.0f, 500.0f, 900.0f}; /* exp(-distance) underflows to exactly 0 for the far anchors */
    fake_init(&f, 3, T, v);
    comm_sample_t s = mk_sample(&f.c.g, 6, 0.0f);
    assert_int_equal(comm_predict_by(&f.rq, &s, comm_ref_pred_dist), 0);
    assert_false(isnan(s.entropy));
    assert_true(s.entropy == 0.0f);
    assert_false(s.is_new);
    kvm_free(s.X);
    fake_free(&f);
}

static void stage_new(fake_t *f, uint64_t key) {
    comm_anchor_t *a = mk_anchor(&f->c.g, 4, key, 0);
    if (f->rq.n_staged == f->rq.cap_staged) {
        f->rq.cap_staged = f->rq.cap_staged ? f->rq.cap_staged * 2 : 8;
        f->rq.staged = kvm_realloc(f->rq.staged, (size_t)f->rq.cap_staged * sizeof *f->rq.staged);
        f->rq.staged_pool = kvm_realloc(f->rq.staged_pool, (size_t)f->rq.cap_staged * sizeof *f->rq.staged_pool);
    }
    snprintf(f->rq.staged_pool[f->rq.n_staged], KVM_COMM_NAME_MAX, "input");
    f->rq.staged[f->rq.n_staged++] = a;
}

static bool pool_has(const comm_pool_t *p, uint64_t key) {
    for (int i = 0; i < p->n; i++)
        if (p->a[i]->key == key) return true;
    return false;
}

static void test_eviction_takes_the_least_activated_of_the_five_oldest_ties_to_the_oldest(void **st) {
    (void)st;
    fake_t f;
    int T[20];
    float v[20];
    for (int i = 0; i < 20; i++) T[i] = 4, v[i] = 0;
    fake_init(&f, 20, T, v);
    comm_pool_t *p = &f.c.pools[0];
    /* oldest five: keys 100..104; activations 3, 1, 2, 1, 5; key 110 (not in the window) has 0 */
    uint32_t act[5] = {3, 1, 2, 1, 5};
    for (int i = 0; i < 5; i++) p->a[i]->activation = act[i];
    for (int i = 5; i < 20; i++) p->a[i]->activation = 9;
    p->a[10]->activation = 0;
    stage_new(&f, 500);
    assert_int_equal(comm_commit(&f.rq), 0);
    assert_int_equal(p->n, 20); /* strict: V holds */
    assert_false(pool_has(p, 101)); /* activation 1, older than 103 */
    assert_true(pool_has(p, 103));
    assert_true(pool_has(p, 110));
    assert_true(pool_has(p, 500));
    fake_free(&f);
}

static void test_anchor_byte_budget_evicts_until_under_budget(void **st) {
    (void)st;
    fake_t f;
    int T[6];
    float v[6];
    for (int i = 0; i < 6; i++) T[i] = 4, v[i] = 0;
    fake_init(&f, 6, T, v);
    size_t one = comm_anchor_bytes(&f.c.g, f.c.pools[0].a[0]);
    for (int i = 0; i < 6; i++) f.c.pools[0].a[i]->bytes = one;
    f.c.anchor_bytes = 6 * one;
    f.c.cfg.anchor_budget_bytes = 3 * one; /* room for three */
    stage_new(&f, 700);
    assert_int_equal(comm_commit(&f.rq), 0);
    assert_int_equal(f.c.pools[0].n, 3);
    assert_true(pool_has(&f.c.pools[0], 700)); /* the new one is kept */
    assert_true(f.c.anchor_bytes <= 3 * one);
    fake_free(&f);
}

static void test_reference_pool_bound_reaches_v_plus_one(void **st) {
    (void)st;
    fake_t f;
    int T[20];
    float v[20];
    for (int i = 0; i < 20; i++) T[i] = 4, v[i] = 0;
    fake_init(&f, 20, T, v);
    f.c.cfg.pool_bound = KVM_KVCOMM_POOL_REFERENCE;
    stage_new(&f, 600);
    assert_int_equal(comm_commit(&f.rq), 0);
    assert_int_equal(f.c.pools[0].n, 21);
    fake_free(&f);
}

/* recompute_frac's score (the kvcomm_spread op of the CPU backend, on the one path): a row where the anchors' deltas
 * agree scores ~0, a row where they disagree scores the weighted spread around the estimate over |X|^2. Two anchors
 * of equal base, weights 1/2 each. */
static void test_spread_score_is_zero_where_anchors_agree_and_grows_where_they_disagree(void **st) {
    (void)st;
    fake_t f;
    int T[2] = {2, 2};
    float v[2] = {0.5f, 0.5f};
    fake_init(&f, 2, T, v);
    const comm_geom_t *g = &f.c.g; /* L 2, H 1, D 4 */
    comm_sample_t s = mk_sample(g, 2, 1.0f);
    const comm_geom_t gd = {1, 1, 4, 4};
    comm_anchor_t **A = f.c.pools[0].a;
    kvm_kv_view_t dv[2];
    for (int n = 0; n < 2; n++) { /* row 0: both deltas 0.3; row 1 (V only): +1 and -1 */
        float *d = kvm_calloc(comm_rows_elems(&gd, 2), sizeof(float));
        for (int kv = 0; kv < 2; kv++)
            for (int k = 0; k < 4; k++) d[comm_idx(&gd, 2, 0, kv, 0, 0) + k] = 0.3f;
        for (int k = 0; k < 4; k++) d[comm_idx(&gd, 2, 0, 1, 0, 1) + k] = n ? -1.0f : 1.0f;
        A[n]->deltas = kvm_calloc(1, sizeof *A[n]->deltas);
        A[n]->n_deltas = A[n]->cap_deltas = 1;
        A[n]->deltas[0].d_ph = d;
        dv[n] = (kvm_kv_view_t){.data = d, .rows = 2, .l0 = 1};
    }
    float w[2 * 2 * 2], sc[2];
    for (int i = 0; i < 8; i++) w[i] = 0.5f;
    kvm_kvcomm_spread_args_t a = {.g = {2, 1, 4, KVM_F32}, .x = {.data = s.X, .rows = 2, .l0 = 0}, .n = 2, .delta = dv,
                                  .w = w, .w_rows = 2, .r0 = 0, .r1 = 2, .out = sc};
    assert_int_equal(kvm_ops_cpu()->kvcomm_spread(&a), 0);
    /* |X|^2 over layer 1 (K and V, 4 channels each, all 1) = 8; spread of row 1: 4 channels x (1/2 + 1/2) x 1 = 4 */
    assert_true(sc[0] < 1e-6f);
    assert_float_equal(sc[1], 0.5f, 1e-5);
    kvm_free(s.X);
    fake_free(&f);
}

/* The two-agent setup of the guard tests: a (input) then b (input, a's answer) on a random model, KVCOMM forced to
 * reuse, the guard on from recompute_frac 0; `restore` (or NULL) is a guard state to start b from. */
typedef struct guard_pair {
    kvm_model_t *m;
    kvm_comm_t *c;
    kvm_template_t *ta, *tb;
    comm_geom_t g;
} guard_pair_t;

static guard_pair_t guard_pair_open(const comm_guard_t *restore) {
    guard_pair_t gp;
    gp.m = small_model(KVM_ROPE_HALF, 17);
    gp.c = kvm_comm_create(gp.m, NULL);
    kvm_kvcomm_config_t *cfg = kvm_comm_config(gp.c);
    cfg->force_reuse = true;
    assert_int_equal(kvm_kvcomm_config_set(cfg, "guard", "on"), 0);
    cfg->recompute_frac = 0.0f;
    if (restore) assert_int_equal(comm_guard_restore(gp.c, restore), 0);
    gp.ta = make_tmpl(gp.c, "a", "input", NULL, 41, 30);
    gp.tb = make_tmpl(gp.c, "b", "input", "agent:a:current", 51, 21);
    gp.g = (comm_geom_t){gp.m->cfg.n_layers, gp.m->cfg.n_kv_heads, gp.m->cfg.head_dim, 4};
    return gp;
}

/* One request of the guard tests: an input of n_in tokens (content seed), agent a run to the end, agent b's prompt
 * prepared under KVCOMM into *p; guard_call_end ends the request and drops the segments. */
typedef struct guard_call {
    kvm_comm_request_t *rq;
    kvm_segment_t *in, *out_a;
} guard_call_t;

static guard_call_t guard_call_prepare(const guard_pair_t *pair, int q, uint64_t seed, int n_in, kvm_prepared_t *p) {
    guard_call_t gc = {.rq = kvm_comm_request_begin(pair->c, (uint64_t)q + 1)};
    gc.in = input_segment(pair->c, seed, n_in);
    kvm_binding_t ba = {"input", gc.in};
    assert_int_equal(run_agent(gc.rq, pair->ta, &ba, 1, KVM_KV_KVCOMM, NULL, &gc.out_a, 5), 0);
    kvm_binding_t bb[2] = {{"input", gc.in}, {"agent:a:current", gc.out_a}};
    kvm_prompt_t pr = {.tmpl = pair->tb, .bindings = bb, .n_bindings = 2, .policy = KVM_KV_KVCOMM};
    assert_int_equal(kvm_comm_prepare(gc.rq, &pr, p), 0);
    return gc;
}

static void guard_call_end(guard_call_t *gc) {
    assert_int_equal(kvm_comm_request_end(gc->rq), 0);
    kvm_segment_release(gc->in);
    kvm_segment_release(gc->out_a);
}

/* kvcomm.guard (ours, issue 15): every REUSE call of a consumer's first 32 is checked against a dense prefill; a call
 * whose greedy tokens differ is served from the dense cache (bit for bit here) and raises that consumer's recompute
 * fraction, which the later calls' recompute pass shows; the guard's decoding leaves the cache at N-1 rows. Here the
 * fraction starts at 0 on a random model, so the offsets alone change the tokens. */
static void test_guard_serves_a_disagreeing_call_dense_and_raises_the_agents_recompute_fraction(void **st) {
    (void)st;
    guard_pair_t pair = guard_pair_open(NULL);
    kvm_model_t *m = pair.m;
    kvm_comm_t *c = pair.c;
    kvm_template_t *ta = pair.ta, *tb = pair.tb;
    const comm_geom_t g = pair.g;
    int checked = 0, served_dense = 0, selected_after = 0;
    for (int q = 0; q < 10; q++) {
        kvm_prepared_t p;
        guard_call_t gc = guard_call_prepare(&pair, q, 700 + (uint64_t)q, 20 + (q < 2), &p);
        const kvm_comm_report_t *r = &p.report;
        assert_int_equal(r->exact_tokens + r->offset_tokens + r->naive_tokens + r->recomputed_tokens, r->input_tokens);
        if (r->mode == KVM_COMM_REUSE) {
            const int n = p.n_prompt - 1;
            assert_int_equal(p.seq.n_tokens, n); /* the guard's decoding is undone */
            assert_memory_equal(p.seq.tokens, p.prompt_ids, (size_t)n * sizeof(int32_t));
            if (served_dense && r->guard != 2) selected_after += r->selected_recomputed > 0;
            if (r->guard) {
                checked++;
                assert_true(r->guard_tokens >= 2 && r->guard_tokens <= n + 16); /* the exact prefix is shared */
            }
            if (r->guard == 2) {
                served_dense++;
                assert_int_equal(r->offset_tokens + r->naive_tokens, 0);
                float *dense = dense_kv(c, p.prompt_ids, n);
                size_t e = comm_rows_elems(&g, n);
                float *got = malloc(e * sizeof(float));
                assert_int_equal(kvm_kv_read_rows(p.seq.pool, p.seq.blocks, 0, n, got), 0);
                assert_true(max_rel(got, dense, e) < 1e-6f);
                free(got);
                free(dense);
            }
        }
        generate_and_complete(m, gc.rq, &p);
        guard_call_end(&gc);
    }
    fprintf(stderr, "guard: %d checked, %d served dense, %d later calls recomputed selected rows\n", checked,
            served_dense, selected_after);
    assert_true(checked >= 3);
    assert_true(served_dense >= 1);  /* offsets alone change a random model's tokens */
    assert_true(selected_after >= 1); /* and agent b's fraction is above 0 from then on */
    teardown(m, c, ta, tb, NULL, NULL);
}

/* kvcomm.guard after its warm-up (an agent's first 32 REUSE calls): every 8th REUSE call is checked after its
 * generation, on a copy-on-write fork of its assembled rows, so it is served from its reused cache (mode REUSE, guard
 * 0 until complete, the served rows untouched by the check) and a difference raises the agent's fraction for its
 * next calls (guard 3). The warm-up is taken as done by a restored guard state (as after a restart on --state). */
static void test_guard_after_its_warmup_checks_after_the_generation_and_serves_the_reused_cache(void **st) {
    (void)st;
    comm_guard_t warm = {.frac = 0.0f, .reused = 100, .checked = 32};
    snprintf(warm.agent, sizeof warm.agent, "b");
    guard_pair_t pair = guard_pair_open(&warm);
    kvm_model_t *m = pair.m;
    kvm_comm_t *c = pair.c;
    kvm_template_t *ta = pair.ta, *tb = pair.tb;
    const comm_geom_t g = pair.g;
    int reused = 0, checked = 0, differed = 0;
    for (int q = 0; q < 20; q++) {
        kvm_prepared_t p;
        guard_call_t gc = guard_call_prepare(&pair, q, 900 + (uint64_t)q, 20, &p);
        const kvm_comm_report_t *r = &p.report;
        const int n = p.n_prompt - 1;
        assert_int_equal(r->guard, 0); /* nothing is checked before serving after the warm-up */
        const bool reuse = r->mode == KVM_COMM_REUSE;
        reused += reuse;
        const float frac_before = comm_guard_frac(c, "b");
        size_t e = comm_rows_elems(&g, n);
        float *before = malloc(e * sizeof(float)), *after = malloc(e * sizeof(float));
        if (reuse) assert_int_equal(kvm_kv_read_rows(p.seq.pool, p.seq.blocks, 0, n, before), 0);
        kvm_gen_params_t gp = {.max_tokens = 3, .ignore_eos = true};
        kvm_gen_result_t res;
        memset(&res, 0, sizeof res);
        assert_int_equal(kvm_generate(m, &p.seq, p.rest_ids, p.n_rest, &gp, NULL, NULL, &res), 0);
        assert_int_equal(kvm_comm_complete(gc.rq, &p, &res, NULL), 0);
        if (reuse) { /* the check ran on its fork */
            assert_int_equal(kvm_kv_read_rows(p.seq.pool, p.seq.blocks, 0, n, after), 0);
            assert_memory_equal(after, before, e * sizeof(float));
        }
        if (r->guard) {
            assert_true(reuse);
            assert_true(r->guard == 1 || r->guard == 3);
            assert_true(r->guard_tokens >= 2);
            checked++;
            if (r->guard == 3) {
                differed++;
                assert_true(comm_guard_frac(c, "b") > frac_before);
            }
        }
        free(before);
        free(after);
        kvm_gen_result_free(&res);
        kvm_prepared_release(&p);
        guard_call_end(&gc);
    }
    fprintf(stderr, "guard after warm-up: %d calls reused, %d checked after generation, %d differed\n", reused, checked,
            differed);
    assert_true(reused >= 16);
    assert_true(checked >= 2 && checked <= reused / 8 + 1); /* every 8th */
    assert_true(differed >= 1); /* offsets alone change a random model's tokens */
    teardown(m, c, ta, tb, NULL, NULL);
}

static void test_switches_parse_and_reject_unknown_values(void **st) {
    (void)st;
    kvm_kvcomm_config_t c;
    kvm_kvcomm_config_default(&c);
    assert_int_equal(kvm_kvcomm_config_set(&c, "kvcomm.gamma", "0.5"), 0);
    assert_true(fabsf(c.gamma - 0.5f) < 1e-6f);
    assert_int_equal(kvm_kvcomm_config_set(&c, "weights", "nearest"), 0);
    assert_int_equal(c.weights, KVM_KVCOMM_W_NEAREST);
    assert_int_equal(kvm_kvcomm_config_set(&c, "weights", "cosine"), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "l2|nearest"));
    assert_int_equal(kvm_kvcomm_config_set(&c, "kvcomm.pool_bound", "sideways"), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "strict|reference"));
    assert_int_equal(kvm_kvcomm_config_set(&c, "kvcomm.nope", "1"), KVM_EINVAL);
    assert_int_equal(kvm_kvcomm_config_set(&c, "max_anchors", "31"), 0);
    assert_int_equal(kvm_kvcomm_config_set(&c, "max_anchors", "32"), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "max_anchors"));
    assert_int_equal(c.max_anchors, 31);
    assert_int_equal(kvm_kvcomm_ablation(&c, "rotation+ph"), 0);
    assert_true(c.ph_offset && !c.pf_offset && c.rotate);
    assert_int_equal(c.recompute_rank, 0); /* the spread by default */
    assert_int_equal(kvm_kvcomm_config_set(&c, "recompute_rank", "attention_spread"), 0);
    assert_int_equal(c.recompute_rank, 2);
    char rb[512];
    kvm_kvcomm_config_str(&c, rb, sizeof rb);
    assert_non_null(strstr(rb, " recompute_rank=attention_spread"));
    assert_int_equal(kvm_kvcomm_config_set(&c, "recompute_rank", "error"), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "spread|attention|attention_spread"));
    assert_int_equal(kvm_kvcomm_config_set(&c, "recompute_rank", "spread"), 0);
    assert_int_equal(c.recompute_below, 0); /* the spec by default */
    assert_int_equal(kvm_kvcomm_config_set(&c, "kvcomm.recompute_below", "8"), 0);
    assert_int_equal(c.recompute_below, 8);
    assert_int_equal(kvm_kvcomm_config_set(&c, "recompute_below", "-1"), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "recompute_below"));
    assert_int_equal(kvm_kvcomm_config_set(&c, "recompute_below", "8x"), KVM_EINVAL);
    assert_int_equal(c.recompute_below, 8);
    /* an empty value is no number (it read as 0, switching a recompute off or a gamma to 0, until 2026-12-07) */
    static const char *numeric[] = {"gamma", "max_anchors", "recompute_below", "recompute_text", "recompute_frac",
                                    "recompute_spread"};
    for (size_t i = 0; i < sizeof numeric / sizeof numeric[0]; i++) {
        const kvm_kvcomm_config_t was = c;
        assert_int_equal(kvm_kvcomm_config_set(&c, numeric[i], ""), KVM_EINVAL);
        assert_non_null(strstr(kvm_errmsg(), numeric[i]));
        assert_memory_equal(&c, &was, sizeof c);
    }
    char buf[512];
    kvm_kvcomm_config_str(&c, buf, sizeof buf);
    assert_non_null(strstr(buf, "recompute_below=8"));
    assert_non_null(strstr(buf, "pf_offset=off"));
    /* ours: the other recompute switches */
    assert_int_equal(kvm_kvcomm_config_set(&c, "kvcomm.recompute_text", "16"), 0);
    assert_int_equal(c.recompute_text, 16);
    assert_int_equal(kvm_kvcomm_config_set(&c, "recompute_frac", "0.3"), 0);
    assert_true(fabsf(c.recompute_frac - 0.3f) < 1e-6f);
    assert_int_equal(kvm_kvcomm_config_set(&c, "recompute_frac", "1.5"), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "[0, 1]"));
    kvm_kvcomm_config_str(&c, buf, sizeof buf);
    assert_null(strstr(buf, "recompute_spread")); /* printed only when on */
    assert_int_equal(kvm_kvcomm_config_set(&c, "recompute_spread", "0.05"), 0);
    assert_true(fabsf(c.recompute_spread - 0.05f) < 1e-7f);
    kvm_kvcomm_config_str(&c, buf, sizeof buf);
    assert_non_null(strstr(buf, "recompute_spread=0.05"));
    assert_int_equal(kvm_kvcomm_config_set(&c, "recompute_spread", "-1"), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "recompute_spread"));
    assert_int_equal(kvm_kvcomm_config_set(&c, "recompute_spread", "0"), 0);
    /* the switches of the removed host path say so */
    const char *gone[] = {"kvcomm.frame", "align", "align_window", "recompute_select"};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(kvm_kvcomm_config_set(&c, gone[i], "reference"), KVM_EINVAL);
        assert_non_null(strstr(kvm_errmsg(), "was removed"));
    }
    assert_int_equal(kvm_kvcomm_config_set(&c, "preset", "fast"), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "spec|blend"));
    kvm_kvcomm_config_str(&c, buf, sizeof buf);
    assert_non_null(strstr(buf, "recompute_frac=0.30"));
    assert_int_equal(kvm_kvcomm_config_set(&c, "preset", "blend"), 0);
    assert_true(c.ph_offset && c.pf_offset && c.recompute_below == KVM_KVCOMM_BLEND_BELOW && c.recompute_text == 64);
    assert_true(c.recompute_frac == KVM_KVCOMM_BLEND_FRAC && c.guard);
    kvm_kvcomm_config_str(&c, buf, sizeof buf);
    assert_non_null(strstr(buf, "guard=on"));
    assert_int_equal(kvm_kvcomm_config_set(&c, "preset", "spec"), 0);
    assert_true(c.recompute_frac == 0 && c.recompute_below == 0 && c.gamma == 0.3f && !c.guard);
    kvm_kvcomm_config_str(&c, buf, sizeof buf);
    assert_null(strstr(buf, "guard")); /* printed only when on */
    /* the anchors' delta storage (issue 17): q8 by default, printed only when not */
    assert_int_equal(c.deltas, KVM_KVCOMM_DELTAS_Q8);
    assert_null(strstr(buf, "deltas"));
    assert_int_equal(kvm_kvcomm_config_set(&c, "kvcomm.deltas", "kv"), 0);
    assert_int_equal(c.deltas, KVM_KVCOMM_DELTAS_KV);
    kvm_kvcomm_config_str(&c, buf, sizeof buf);
    assert_non_null(strstr(buf, "deltas=kv"));
    assert_int_equal(kvm_kvcomm_config_set(&c, "deltas", "int8"), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "q8|kv"));
    assert_int_equal(c.deltas, KVM_KVCOMM_DELTAS_KV);
    assert_int_equal(kvm_kvcomm_config_set(&c, "guard", "maybe"), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "kvcomm.guard"));
    assert_int_equal(kvm_kvcomm_config_set(&c, "kvcomm.guard", "on"), 0);
    assert_true(c.guard);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layer0_keys_after_shift_equal_dense_rotate_half),
        cmocka_unit_test(test_layer0_keys_after_shift_equal_dense_interleaved),
        cmocka_unit_test(test_layer0_keys_after_shift_equal_dense_with_qk_norm_and_biases),
        cmocka_unit_test(test_layer0_keys_after_shift_equal_dense_with_llama3_rope_scaling),
        cmocka_unit_test(test_dense_policy_computes_every_row_even_with_a_shared_template_head),
        cmocka_unit_test(test_identical_prompt_reuses_the_prefix_cache_bit_for_bit),
        cmocka_unit_test(test_a_request_pins_no_segment_its_finished_agents_bound),
        cmocka_unit_test(test_single_anchor_applied_to_its_own_sample_reproduces_dense),
        cmocka_unit_test(test_single_anchor_with_q8_deltas_is_dense_within_the_encoding),
        cmocka_unit_test(test_anchor_bases_share_segments_and_give_them_back_when_the_store_needs_them),
        cmocka_unit_test(test_after_two_anchors_agents_reuse_with_n_minus_1_cached_tokens),
        cmocka_unit_test(test_response_segment_drops_the_token_without_kv_or_computes_it_on_length_stop),
        cmocka_unit_test(test_prepare_rejects_a_segment_of_another_model_and_a_wrong_frame),
        cmocka_unit_test(test_prepare_fails_cleanly_when_the_kv_budget_cannot_hold_the_prompt),
        cmocka_unit_test(test_template_validation_rejects_whitespace_pieces_and_adjacent_placeholders),
        cmocka_unit_test(test_template_change_invalidates_deltas),
        cmocka_unit_test(test_template_parse_maps_graph_placeholders_to_kvcomm_names),
        cmocka_unit_test(test_prediction_is_new_with_at_most_one_anchor_or_one_eligible),
        cmocka_unit_test(test_prediction_counts_anchors_of_equal_length_as_eligible),
        cmocka_unit_test(test_equidistant_anchors_have_maximal_entropy_and_predict_new),
        cmocka_unit_test(test_clear_nearest_anchor_shares_and_the_top_p_quirk_bumps_all_eligible),
        cmocka_unit_test(test_top_p_bumps_only_the_anchors_below_the_cumulative_cut),
        cmocka_unit_test(test_entropy_treats_underflowed_weights_as_zero_not_nan),
        cmocka_unit_test(test_eviction_takes_the_least_activated_of_the_five_oldest_ties_to_the_oldest),
        cmocka_unit_test(test_reference_pool_bound_reaches_v_plus_one),
        cmocka_unit_test(test_anchor_byte_budget_evicts_until_under_budget),
        cmocka_unit_test(test_no_anchor_naive_switch_reuses_without_offset),
        cmocka_unit_test(test_kvcomm_policy_prepares_dense_where_the_backend_cannot_run_it),
        cmocka_unit_test(test_prepare_ids_takes_the_exact_prefix_of_an_earlier_dense_prompt),
        cmocka_unit_test(test_guard_serves_a_disagreeing_call_dense_and_raises_the_agents_recompute_fraction),
        cmocka_unit_test(test_guard_after_its_warmup_checks_after_the_generation_and_serves_the_reused_cache),
        cmocka_unit_test(test_switches_parse_and_reject_unknown_values),
        cmocka_unit_test(test_recompute_frac_one_with_the_text_recomputed_gives_the_dense_cache),
        cmocka_unit_test(test_recompute_frac_changes_only_the_selected_rows),
        cmocka_unit_test(test_recompute_spread_gate_recomputes_the_rows_whose_predicted_error_passes_it),
        cmocka_unit_test(test_the_selection_oracle_recomputes_the_rows_furthest_from_dense),
        cmocka_unit_test(test_the_attention_oracles_recompute_the_rows_the_agent_reads_most),
        cmocka_unit_test(test_recompute_rank_by_attention_takes_the_rows_the_agent_reads),
        cmocka_unit_test(test_spread_score_is_zero_where_anchors_agree_and_grows_where_they_disagree),
        cmocka_unit_test(test_oracle_offsets_make_the_reused_cache_equal_dense_prefill_in_both_rope_layouts),
        cmocka_unit_test(test_oracle_offsets_equal_dense_with_qk_norm_and_biases),
        cmocka_unit_test(test_oracle_on_one_piece_leaves_the_other_estimated),
        cmocka_unit_test(test_recomputing_the_short_answer_behind_an_exact_input_gives_the_dense_cache),
        cmocka_unit_test(test_recompute_below_keeps_every_other_row_bit_for_bit_and_is_off_by_default),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
