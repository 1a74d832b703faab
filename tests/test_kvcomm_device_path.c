/* test_kvcomm_device_path.c - the one KVCOMM path (runtime/comm/kvcomm_dev.c over the backend's ops) assembles
 * the REUSE cache the host fp32 reference (runtime/comm/kvcomm_ref.h, the tests' oracle) computes from the same
 * request's samples and anchors, and the recompute pass picks the rows the reference's spread scores rank first.
 *
 * On the CPU backend (the CPU ops on host memory) in CI; on a GPU machine the model runs on "auto" (CUDA ops,
 * backend anchor mirrors) with an fp32 and a bf16 KV cache; skipped loudly without a GPU. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "runtime/comm/kvcomm_ref.h"
#include "runtime/comm/prompt.h"
#include "test_kvcomm_common.h"

static kvm_load_opts_t g_kv = {0}; /* the KV cache dtype of model_on's models (kv_dtype_set: else the default) */

static kvm_model_t *model_on(const char *backend, kvm_rope_layout_t layout) {
    kvm_config_t c = kvcomm_test_cfg(layout); /* head_dim 16: the CUDA kernels take it */
    kvm_model_t *m = kvm_model_random(&c, 23, 4, backend);
    if (!m) fprintf(stderr, "model on %s: %s\n", backend, kvm_errmsg());
    assert_non_null(m);
    assert_int_equal(kvm_forward_configure(m, &g_kv), 0);
    return m;
}

static int32_t g_tids[4][3][40];

static kvm_template_t *make_tmpl(kvm_comm_t *c, int k, const char *agent, const char *ph1, const char *ph2, uint64_t seed) {
    fill_ids(g_tids[k][0], 40, seed);
    fill_ids(g_tids[k][1], 12, seed + 1);
    fill_ids(g_tids[k][2], 9, seed + 2);
    kvm_piece_t p[5] = {
        {.kind = KVM_PIECE_TEXT, .ids = g_tids[k][0], .n_ids = 27 + k},
        {.kind = KVM_PIECE_PLACEHOLDER, .text = ph1},
        {.kind = KVM_PIECE_TEXT, .ids = g_tids[k][1], .n_ids = 12},
        {.kind = KVM_PIECE_PLACEHOLDER, .text = ph2},
        {.kind = KVM_PIECE_TEXT, .ids = g_tids[k][2], .n_ids = 9},
    };
    kvm_template_desc_t d = {.agent = agent, .pieces = p, .n_pieces = ph2 ? 5 : 3, .raw = true};
    kvm_template_t *t = kvm_template_create(c, &d);
    if (!t) fprintf(stderr, "template: %s\n", kvm_errmsg());
    assert_non_null(t);
    return t;
}

/* prepares agent t with bindings b in request rq under c's switches; returns the cached KV (host fp32) and report */
static float *prepare_kv(kvm_comm_request_t *rq, kvm_template_t *t, kvm_binding_t *b, int nb, kvm_comm_report_t *rep,
                         int *n_cached) {
    kvm_comm_t *c = rq->c;
    kvm_prepared_t p;
    kvm_prompt_t pr = {.tmpl = t, .bindings = b, .n_bindings = nb, .policy = KVM_KV_KVCOMM};
    int rc = kvm_comm_prepare(rq, &pr, &p);
    if (rc) fprintf(stderr, "prepare: %s\n", kvm_errmsg());
    assert_int_equal(rc, 0);
    *rep = p.report;
    *n_cached = p.n_cached;
    float *kv = malloc(comm_rows_elems(&c->g, p.n_cached) * sizeof(float) + 4);
    assert_int_equal(kvm_kv_read_rows(p.seq.pool, p.seq.blocks, 0, p.n_cached, kv), 0);
    kvm_prepared_release(&p);
    return kv;
}

/* relative l2 error of rows [r0, r1) of the cache kv (n rows) against rows [r0 - base, r1 - base) of ref (m rows) */
static double rows_err(const comm_geom_t *g, const float *kv, int n, const float *ref, int m, int base, int r0, int r1) {
    double num = 0, den = 0;
    for (int l = 0; l < g->L; l++)
        for (int kv2 = 0; kv2 < 2; kv2++)
            for (int h = 0; h < g->H; h++)
                for (int t = r0; t < r1; t++)
                    for (int k = 0; k < g->D; k++) {
                        double x = kv[comm_idx(g, n, l, kv2, h, t) + k], y = ref[comm_idx(g, m, l, kv2, h, t - base) + k];
                        num += isnan(x) ? INFINITY : (x - y) * (x - y);
                        den += y * y;
                    }
    return sqrt(num / (den + 1e-30));
}

static int cmp_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* With recompute_frac: the rows that the recompute pass changed (after vs before, n rows) are the
 * ceil(frac x candidates) rows of [E, n) with the largest reference spread scores. */
static void check_selection(const comm_geom_t *g, const float *before, const float *after, int n, int E,
                            const float *score, const kvm_comm_report_t *r, float frac) {
    float *cand = malloc((size_t)n * sizeof(float) + 4);
    int nc = 0;
    for (int t = E; t < n; t++)
        if (score[t] > 0) cand[nc++] = score[t];
    qsort(cand, (size_t)nc, sizeof(float), cmp_desc);
    const int k = (int)ceil((double)frac * nc);
    assert_true(k > 0 && k < nc);
    assert_int_equal(r->selected_recomputed, k);
    const float cut_hi = cand[k - 1], cut_lo = cand[k]; /* selected rows score >= cut_hi, the others <= cut_lo */
    int changed = 0;
    for (int t = E; t < n; t++) {
        bool same = true;
        for (int l = 0; l < g->L && same; l++)
            for (int kv = 0; kv < 2 && same; kv++)
                for (int h = 0; h < g->H && same; h++)
                    same = !memcmp(before + comm_idx(g, n, l, kv, h, t), after + comm_idx(g, n, l, kv, h, t),
                                   (size_t)g->D * sizeof(float));
        changed += !same;
        /* a tie at the cut may go either way; elsewhere the reference ranks the row as the op did */
        if (cut_hi > cut_lo * (1 + 1e-3f)) {
            if (!same) assert_true(score[t] >= cut_lo * (1 + 1e-3f) || score[t] >= cut_hi * (1 - 1e-3f));
            if (same) assert_true(score[t] <= cut_hi * (1 - 1e-3f) || score[t] <= cut_lo * (1 + 1e-3f));
        }
    }
    assert_int_equal(changed, k);
    free(cand);
}

/* Builds anchors with two DENSE rounds, then compares the REUSE of agent b on two new inputs with the host
 * reference (and, with g_frac, the rows the recompute pass picks with the reference's spread scores). */
static float g_frac = 0; /* kvcomm.recompute_frac of compare_with_reference */

static void compare_with_reference(const char *backend, double tol, kvm_rope_layout_t layout) {
    kvm_model_t *m = model_on(backend, layout);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    assert_non_null(c);
    const comm_geom_t *g = &c->g;
    kvm_comm_config(c)->force_reuse = true;
    kvm_template_t *ta = make_tmpl(c, 0, "a", "input", NULL, 41);
    kvm_template_t *tb = make_tmpl(c, 1, "b", "input", "agent:a:current", 51);
    for (int q = 0; q < 3; q++) { /* anchors for a, then b sees a's response */
        kvm_comm_request_t *rq = kvm_comm_request_begin(c, (uint64_t)q + 1);
        kvm_segment_t *in = input_segment(c, 100 + (uint64_t)q, 20 + (q < 2)), *out_a = NULL;
        kvm_binding_t ba = {"input", in};
        assert_int_equal(run_agent(rq, ta, &ba, 1, KVM_KV_KVCOMM, NULL, &out_a, 5), 0);
        kvm_binding_t bb[2] = {{"input", in}, {"agent:a:current", out_a}};
        assert_int_equal(run_agent(rq, tb, bb, 2, KVM_KV_KVCOMM, NULL, NULL, 3), 0);
        assert_int_equal(kvm_comm_request_end(rq), 0);
        kvm_segment_release(in);
        kvm_segment_release(out_a);
    }
    int compared = 0;
    for (int q = 3; q < 5; q++) {
        kvm_comm_request_t *rq = kvm_comm_request_begin(c, (uint64_t)q + 1);
        kvm_segment_t *in = input_segment(c, 100 + (uint64_t)q, 20), *out_a = NULL;
        kvm_binding_t ba = {"input", in};
        assert_int_equal(run_agent(rq, ta, &ba, 1, KVM_KV_KVCOMM, NULL, &out_a, 5), 0);
        kvm_binding_t bb[2] = {{"input", in}, {"agent:a:current", out_a}};
        kvm_comm_report_t r, r2;
        int n = 0, n2 = 0;
        kvm_comm_config(c)->recompute_frac = 0;
        float *kv = prepare_kv(rq, tb, bb, 2, &r, &n);
        if (r.mode == KVM_COMM_REUSE) {
            assert_true(r.offset_tokens > 0);
            const int E = r.exact_tokens, r0 = r.ph[0].start_pos, m2 = r.input_tokens - 1 - r0;
            float *ref = malloc(comm_rows_elems(g, m2) * sizeof(float) + 4);
            float *score = malloc((size_t)r.input_tokens * sizeof(float));
            assert_int_equal(comm_ref_reuse_rows(rq, tb, &r, ref, score), 0);
            double e = rows_err(g, kv, n, ref, m2, r0, E, n);
            fprintf(stderr, "  [%s, KV %s, %s] REUSE rows %d..%d: one path vs host reference rel err %.3g (tol %g)\n",
                    backend, kvm_dtype_name(c->pool->geom.dtype), layout == KVM_ROPE_HALF ? "rotate-half" : "interleaved",
                    E, n, e, tol);
            assert_true(e <= tol);
            for (int i = 0; i < r.n_placeholders; i++) assert_int_equal(r.ph[i].decision, KVM_PH_SHARED);
            if (g_frac > 0) { /* the same prepare with the recompute pass */
                kvm_comm_config(c)->recompute_frac = g_frac;
                float *kv2 = prepare_kv(rq, tb, bb, 2, &r2, &n2);
                assert_int_equal(n2, n);
                check_selection(g, kv, kv2, n, E, score, &r2, g_frac);
                free(kv2);
            }
            free(ref);
            free(score);
            compared++;
        }
        free(kv);
        kvm_comm_request_abort(rq);
        kvm_segment_release(in);
        kvm_segment_release(out_a);
    }
    assert_true(compared >= 1);
    kvm_template_free(ta);
    kvm_template_free(tb);
    kvm_comm_free(c);
    kvm_model_free(m);
}

static void test_cpu_reuse_cache_equals_the_host_reference(void **st) {
    (void)st;
    compare_with_reference("cpu", 1e-5, KVM_ROPE_HALF);
    compare_with_reference("cpu", 1e-5, KVM_ROPE_INTERLEAVED);
}

/* recompute_frac: the spread scores come from the kvcomm_spread op, the rows they pick are recomputed by the
 * prepare's recompute pass; they are the rows the reference's scores rank first */
static void test_cpu_recompute_frac_picks_the_rows_the_reference_ranks_first(void **st) {
    (void)st;
    g_frac = 0.3f;
    compare_with_reference("cpu", 1e-5, KVM_ROPE_HALF);
    compare_with_reference("cpu", 1e-5, KVM_ROPE_INTERLEAVED);
    g_frac = 0;
}

/* REUSE requests allocate no backend weight buffers: the first anchor commit puts a few on the comm context's free
 * list, samples take them and give them back at request end (CPU backend). */
static void test_device_path_reuses_its_weight_buffers_across_requests(void **st) {
    (void)st;
    kvm_model_t *m = model_on("cpu", KVM_ROPE_HALF);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    assert_non_null(c);
    kvm_comm_config(c)->force_reuse = true;
    kvm_template_t *ta = make_tmpl(c, 0, "a", "input", NULL, 41);
    kvm_template_t *tb = make_tmpl(c, 1, "b", "input", "agent:a:current", 51);
    int made[5] = {0}, reused = 0;
    for (int q = 0; q < 5; q++) { /* two rounds make the anchors, then three REUSE rounds */
        kvm_comm_request_t *rq = kvm_comm_request_begin(c, (uint64_t)q + 1);
        assert_non_null(rq);
        kvm_segment_t *in = input_segment(c, 300 + (uint64_t)q, 20 + (q < 2)), *out_a = NULL;
        kvm_binding_t ba = {"input", in};
        kvm_comm_report_t rep;
        assert_int_equal(run_agent(rq, ta, &ba, 1, KVM_KV_KVCOMM, &rep, &out_a, 5), 0);
        kvm_binding_t bb[2] = {{"input", in}, {"agent:a:current", out_a}};
        assert_int_equal(run_agent(rq, tb, bb, 2, KVM_KV_KVCOMM, &rep, NULL, 3), 0);
        reused += q >= 2 && rep.mode == KVM_COMM_REUSE;
        assert_int_equal(kvm_comm_request_end(rq), 0);
        kvm_segment_release(in);
        kvm_segment_release(out_a);
        made[q] = comm_dev_weight_buffers_made(c);
    }
    fprintf(stderr, "  weight buffers made after each request: %d %d %d %d %d (REUSE rounds: %d)\n", made[0], made[1],
            made[2], made[3], made[4], reused);
    assert_true(reused >= 2);
    assert_true(made[1] >= 1);           /* made at the first anchor commit (dev_warm) */
    assert_int_equal(made[4], made[1]); /* and none by the REUSE requests */
    kvm_template_free(ta);
    kvm_template_free(tb);
    kvm_comm_free(c);
    kvm_model_free(m);
}

static bool have_gpu(void) {
    const kvm_ops_t *o = kvm_ops_select("auto");
    if (!o || !strcmp(o->name, "cpu") || !o->kvcomm_apply) {
        fprintf(stderr, "SKIPPED: no GPU backend with KVCOMM ops (auto = cpu: %s)\n", kvm_ops_fallback_reason());
        return false;
    }
    return true;
}

/* the GPU twin of a CPU case: KV dtype kv_dtype, recompute_frac frac, the layouts given */
static void gpu_case(const char *kv_dtype, float frac, double tol, int n_layouts) {
    if (!have_gpu()) {
        skip();
        return;
    }
    g_kv = (kvm_load_opts_t){.kv_dtype_set = true};
    assert_int_equal(kvm_dtype_parse(kv_dtype, "kv_dtype", &g_kv.kv_dtype), 0);
    g_frac = frac;
    const kvm_rope_layout_t lay[2] = {KVM_ROPE_HALF, KVM_ROPE_INTERLEAVED};
    for (int i = 0; i < n_layouts; i++) compare_with_reference("auto", tol, lay[i]);
    g_frac = 0;
    g_kv = (kvm_load_opts_t){0};
}

static void test_gpu_reuse_cache_equals_the_host_reference_fp32_kv(void **st) {
    (void)st;
    gpu_case("f32", 0, 1e-4, 2);
}

static void test_gpu_recompute_frac_picks_the_rows_the_reference_ranks_first_fp32_kv(void **st) {
    (void)st;
    gpu_case("f32", 0.3f, 1e-4, 1);
}

static void test_gpu_reuse_cache_equals_the_host_reference_bf16_kv(void **st) {
    (void)st;
    gpu_case("bf16", 0, 1e-2, 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cpu_reuse_cache_equals_the_host_reference),
        cmocka_unit_test(test_cpu_recompute_frac_picks_the_rows_the_reference_ranks_first),
        cmocka_unit_test(test_device_path_reuses_its_weight_buffers_across_requests),
        cmocka_unit_test(test_gpu_reuse_cache_equals_the_host_reference_fp32_kv),
        cmocka_unit_test(test_gpu_recompute_frac_picks_the_rows_the_reference_ranks_first_fp32_kv),
        cmocka_unit_test(test_gpu_reuse_cache_equals_the_host_reference_bf16_kv),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
