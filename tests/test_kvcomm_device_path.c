/* test_kvcomm_device_path.c - the device path of KVCOMM (runtime/comm/kvcomm_dev.c) gives the same REUSE cache
 * and the same decisions as the host path (the reference).
 *
 * On the CPU backend the device path is forced (KVM_KVCOMM_DEVICE=1: the CPU reference ops run the same code
 * path on host memory), so CI checks the integration. On a GPU machine the model runs on "auto" (CUDA) and the
 * device path (CUDA ops, device anchor mirrors) is compared with the host path of the same model (KVM_KVCOMM_DEVICE=0),
 * with an fp32 and a bf16 KV cache; skipped loudly without a GPU. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "runtime/comm/comm_internal.h"
#include "runtime/comm/prompt.h"
#include "test_kvcomm_common.h"

static kvm_load_opts_t g_kv = {0}; /* the KV cache dtype of model_on's models (kv_dtype_set: else the default) */

static kvm_model_t *model_on(const char *backend, kvm_rope_layout_t layout) {
    kvm_config_t c = {0};
    c.dim = 64;
    c.hidden_dim = 128;
    c.n_layers = 3;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 16; /* a multiple of 16: the CUDA kernels take it */
    c.vocab_size = 101;
    c.max_seq_len = 1024;
    c.rope_theta = 10000;
    c.rope_layout = layout;
    c.rms_eps = 1e-5f;
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

static int run_agent(kvm_comm_request_t *rq, kvm_template_t *t, kvm_binding_t *b, int nb, kvm_comm_report_t *rep,
                     kvm_segment_t **resp, int max_tokens) {
    kvm_prepared_t p;
    kvm_prompt_t pr = {.tmpl = t, .bindings = b, .n_bindings = nb, .policy = KVM_KV_KVCOMM};
    int rc = kvm_comm_prepare(rq, &pr, &p);
    if (rc) return rc;
    kvm_gen_params_t gp = {.max_tokens = max_tokens, .ignore_eos = true};
    kvm_gen_result_t res;
    memset(&res, 0, sizeof res);
    rc = kvm_generate(kvm_comm_model(rq->c), &p.seq, p.rest_ids, p.n_rest, &gp, NULL, NULL, &res);
    if (!rc) rc = kvm_comm_complete(rq, &p, &res, resp);
    if (rep) *rep = p.report;
    kvm_gen_result_free(&res);
    kvm_prepared_release(&p);
    return rc;
}

/* prepares agent t with bindings b under the given KVM_KVCOMM_DEVICE value; returns the cached KV (host fp32)
 * and the report; the request is aborted (nothing staged) */
static float *prepare_kv(kvm_comm_t *c, uint64_t id, const char *dev, bool want_dev, kvm_template_t *t, kvm_binding_t *b,
                         int nb, kvm_comm_report_t *rep, int *n_cached) {
    setenv("KVM_KVCOMM_DEVICE", dev, 1);
    kvm_comm_request_t *rq = kvm_comm_request_begin(c, id);
    assert_non_null(rq);
    assert_int_equal(rq->dev, want_dev);
    kvm_prepared_t p;
    kvm_prompt_t pr = {.tmpl = t, .bindings = b, .n_bindings = nb, .policy = KVM_KV_KVCOMM};
    int rc = kvm_comm_prepare(rq, &pr, &p);
    if (!rc) rc = kvm_comm_recompute_short(c, &p); /* (a no-op unless a recompute switch is on) */
    if (rc) fprintf(stderr, "prepare (KVM_KVCOMM_DEVICE=%s): %s\n", dev, kvm_errmsg());
    assert_int_equal(rc, 0);
    *rep = p.report;
    *n_cached = p.n_cached;
    const comm_geom_t *g = &c->g;
    float *kv = malloc(comm_rows_elems(g, p.n_cached) * sizeof(float) + 4);
    assert_int_equal(kvm_kv_read_rows(p.seq.pool, p.seq.blocks, 0, p.n_cached, kv), 0);
    kvm_prepared_release(&p);
    kvm_comm_request_abort(rq);
    return kv;
}

/* Builds anchors with two DENSE rounds, then compares host and device REUSE of agent b on two new inputs. */
static float g_frac = 0; /* kvcomm.recompute_frac (select=spread) of compare_paths */

static void compare_paths(const char *backend, const char *dev_value, double tol, kvm_rope_layout_t layout) {
    kvm_model_t *m = model_on(backend, layout);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    assert_non_null(c);
    kvm_comm_config(c)->force_reuse = true;
    kvm_comm_config(c)->recompute_frac = g_frac;
    kvm_comm_config(c)->recompute_select = KVM_KVCOMM_SELECT_SPREAD;
    kvm_template_t *ta = make_tmpl(c, 0, "a", "input", NULL, 41);
    kvm_template_t *tb = make_tmpl(c, 1, "b", "input", "agent:a:current", 51);
    for (int q = 0; q < 3; q++) { /* anchors for a, then b sees a's response */
        setenv("KVM_KVCOMM_DEVICE", dev_value, 1);
        kvm_comm_request_t *rq = kvm_comm_request_begin(c, (uint64_t)q + 1);
        kvm_segment_t *in = input_segment(c, 100 + (uint64_t)q, 20 + (q < 2)), *out_a = NULL;
        kvm_binding_t ba = {"input", in};
        assert_int_equal(run_agent(rq, ta, &ba, 1, NULL, &out_a, 5), 0);
        kvm_binding_t bb[2] = {{"input", in}, {"agent:a:current", out_a}};
        assert_int_equal(run_agent(rq, tb, bb, 2, NULL, NULL, 3), 0);
        assert_int_equal(kvm_comm_request_end(rq), 0);
        kvm_segment_release(in);
        kvm_segment_release(out_a);
    }
    int compared = 0;
    for (int q = 3; q < 5; q++) {
        /* a's response for this input (run once, host path) */
        setenv("KVM_KVCOMM_DEVICE", "0", 1);
        kvm_comm_request_t *rq = kvm_comm_request_begin(c, (uint64_t)q + 1);
        kvm_segment_t *in = input_segment(c, 100 + (uint64_t)q, 20), *out_a = NULL;
        kvm_binding_t ba = {"input", in};
        assert_int_equal(run_agent(rq, ta, &ba, 1, NULL, &out_a, 5), 0);
        kvm_comm_request_abort(rq);
        kvm_binding_t bb[2] = {{"input", in}, {"agent:a:current", out_a}};
        kvm_comm_report_t rh, rd;
        int nh = 0, nd = 0;
        float *kh = prepare_kv(c, 1000 + (uint64_t)q, "0", false, tb, bb, 2, &rh, &nh);
        float *kd = prepare_kv(c, 1000 + (uint64_t)q, dev_value, true, tb, bb, 2, &rd, &nd);
        assert_int_equal(rh.mode, rd.mode);
        assert_int_equal(nh, nd);
        assert_int_equal(rh.exact_tokens, rd.exact_tokens);
        assert_int_equal(rh.offset_tokens, rd.offset_tokens);
        assert_int_equal(rh.naive_tokens, rd.naive_tokens);
        assert_int_equal(rh.recomputed_tokens, rd.recomputed_tokens);
        assert_int_equal(rh.selected_recomputed, rd.selected_recomputed);
        if (g_frac > 0 && rh.mode == KVM_COMM_REUSE) assert_true(rd.selected_recomputed > 0);
        for (int i = 0; i < rh.n_placeholders; i++) {
            assert_int_equal(rh.ph[i].decision, rd.ph[i].decision);
            assert_true(fabs(rh.ph[i].entropy - rd.ph[i].entropy) <= 1e-3 + 1e-3 * fabs(rh.ph[i].entropy));
            assert_true(rh.ph[i].top_anchor == rd.ph[i].top_anchor);
        }
        if (rh.mode == KVM_COMM_REUSE) {
            assert_true(rh.offset_tokens > 0);
            size_t n = comm_rows_elems(&c->g, nh);
            double num = 0, den = 0;
            for (size_t i = 0; i < n; i++) {
                double df = (double)kd[i] - kh[i];
                num += isnan(kd[i]) ? INFINITY : df * df;
                den += (double)kh[i] * kh[i];
            }
            double e = sqrt(num / den);
            fprintf(stderr, "  [%s, KV %s, %s] REUSE cache of %d tokens: device vs host rel err %.3g (tol %g)\n", backend,
                    kvm_dtype_name(c->pool->geom.dtype), layout == KVM_ROPE_HALF ? "rotate-half" : "interleaved", nh, e,
                    tol);
            assert_true(e <= tol);
            compared++;
        }
        free(kh), free(kd);
        kvm_segment_release(in);
        kvm_segment_release(out_a);
    }
    assert_true(compared >= 1);
    unsetenv("KVM_KVCOMM_DEVICE");
    kvm_template_free(ta);
    kvm_template_free(tb);
    kvm_comm_free(c);
    kvm_model_free(m);
}

static void test_forced_device_path_on_the_cpu_gives_the_host_reuse_cache(void **st) {
    (void)st;
    compare_paths("cpu", "1", 1e-5, KVM_ROPE_HALF);
    compare_paths("cpu", "1", 1e-5, KVM_ROPE_INTERLEAVED);
}

/* recompute_frac with recompute_select=spread on the device path: the spread scores come from the kvcomm_spread
 * op, the rows they pick are recomputed by the same pass; the cache equals the host path's */
static void test_forced_device_path_selects_and_recomputes_the_same_rows_as_the_host(void **st) {
    (void)st;
    g_frac = 0.3f;
    compare_paths("cpu", "1", 1e-5, KVM_ROPE_HALF);
    compare_paths("cpu", "1", 1e-5, KVM_ROPE_INTERLEAVED);
    g_frac = 0;
}

/* REUSE requests allocate no device weight buffers: the first anchor commit puts a few on the device context's
 * free list, samples take them and give them back at request end (CPU backend, device path forced). */
static void test_device_path_reuses_its_weight_buffers_across_requests(void **st) {
    (void)st;
    kvm_model_t *m = model_on("cpu", KVM_ROPE_HALF);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    assert_non_null(c);
    kvm_comm_config(c)->force_reuse = true;
    kvm_template_t *ta = make_tmpl(c, 0, "a", "input", NULL, 41);
    kvm_template_t *tb = make_tmpl(c, 1, "b", "input", "agent:a:current", 51);
    setenv("KVM_KVCOMM_DEVICE", "1", 1);
    int made[5] = {0}, reused = 0;
    for (int q = 0; q < 5; q++) { /* two rounds make the anchors, then three REUSE rounds */
        kvm_comm_request_t *rq = kvm_comm_request_begin(c, (uint64_t)q + 1);
        assert_non_null(rq);
        assert_true(rq->dev);
        kvm_segment_t *in = input_segment(c, 300 + (uint64_t)q, 20 + (q < 2)), *out_a = NULL;
        kvm_binding_t ba = {"input", in};
        kvm_comm_report_t rep;
        assert_int_equal(run_agent(rq, ta, &ba, 1, &rep, &out_a, 5), 0);
        kvm_binding_t bb[2] = {{"input", in}, {"agent:a:current", out_a}};
        assert_int_equal(run_agent(rq, tb, bb, 2, &rep, NULL, 3), 0);
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
    unsetenv("KVM_KVCOMM_DEVICE");
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

static void test_gpu_device_path_gives_the_host_reuse_cache_fp32_kv(void **st) {
    (void)st;
    if (!have_gpu()) {
        skip();
        return;
    }
    g_kv = (kvm_load_opts_t){.kv_dtype = KVM_F32, .kv_dtype_set = true};
    compare_paths("auto", "", 1e-4, KVM_ROPE_HALF);
    compare_paths("auto", "", 1e-4, KVM_ROPE_INTERLEAVED);
    g_kv = (kvm_load_opts_t){0};
}

static void test_gpu_device_path_selects_and_recomputes_the_same_rows_fp32_kv(void **st) {
    (void)st;
    if (!have_gpu()) {
        skip();
        return;
    }
    g_kv = (kvm_load_opts_t){.kv_dtype = KVM_F32, .kv_dtype_set = true};
    g_frac = 0.3f;
    compare_paths("auto", "", 1e-4, KVM_ROPE_HALF);
    g_frac = 0;
    g_kv = (kvm_load_opts_t){0};
}

static void test_gpu_device_path_gives_the_host_reuse_cache_bf16_kv(void **st) {
    (void)st;
    if (!have_gpu()) {
        skip();
        return;
    }
    g_kv = (kvm_load_opts_t){.kv_dtype = KVM_BF16, .kv_dtype_set = true};
    compare_paths("auto", "", 1e-2, KVM_ROPE_HALF);
    g_kv = (kvm_load_opts_t){0};
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forced_device_path_on_the_cpu_gives_the_host_reuse_cache),
        cmocka_unit_test(test_forced_device_path_selects_and_recomputes_the_same_rows_as_the_host),
        cmocka_unit_test(test_device_path_reuses_its_weight_buffers_across_requests),
        cmocka_unit_test(test_gpu_device_path_gives_the_host_reuse_cache_fp32_kv),
        cmocka_unit_test(test_gpu_device_path_selects_and_recomputes_the_same_rows_fp32_kv),
        cmocka_unit_test(test_gpu_device_path_gives_the_host_reuse_cache_bf16_kv),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
