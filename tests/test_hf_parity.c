/* test_hf_parity.c - the acceptance test of the engine: tiny random-weight models with the shapes of
 * Llama-3.1-8B (bf16 storage, llama3 RoPE scaling, GQA 4:1, untied), Qwen2.5-7B (f16, q/k/v biases, GQA 7:1)
 * and Qwen3-0.6B (f32, q_norm/k_norm, head_dim != hidden/heads, tied) are loaded from their HF directories
 * (tests/fixtures/hf, made by scripts/fixtures/make_hf_fixtures.py with transformers 5.17 in float32) and
 * must reproduce transformers:
 *   - the logits of every prompt position: max |ours - ref| / max |ref| <= 1e-4;
 *   - 32 greedy tokens (argmax of the last logits, fed back one by one): identical ids.
 * Runs on the CPU backend (KVM_PARITY_BACKEND=cuda: on the GPU, fp32 weights). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <cjson/cJSON.h>

#include "kernels/ops.h"
#include "runtime/model/forward.h"
#include "test_common.h"

#define PARITY_TOL 1e-4

typedef struct fixture {
    int32_t prompt[64];
    int n_prompt;
    int32_t greedy[64];
    int n_greedy;
    int vocab;
    float *logits; /* [n_prompt][vocab] */
} fixture_t;

static void load_fixture(const char *dir, fixture_t *fx) {
    char path[1100];
    char *text = NULL;
    size_t len = 0;
    snprintf(path, sizeof path, "%s/fixture.json", dir);
    assert_int_equal(kvm_read_file(path, &text, &len, 0), 0);
    cJSON *root = cJSON_Parse(text);
    kvm_free(text);
    assert_non_null(root);
    fx->n_prompt = tc_read_ids(cJSON_GetObjectItem(root, "prompt"), fx->prompt, 64);
    fx->n_greedy = tc_read_ids(cJSON_GetObjectItem(root, "greedy"), fx->greedy, 64);
    fx->vocab = cJSON_GetObjectItem(root, "vocab_size")->valueint;
    cJSON_Delete(root);
    assert_true(fx->n_prompt > 0 && fx->n_prompt <= 64);
    assert_true(fx->n_greedy > 0 && fx->n_greedy <= 64);
    snprintf(path, sizeof path, "%s/logits.bin", dir);
    char *raw = NULL;
    assert_int_equal(kvm_read_file(path, &raw, &len, 0), 0);
    assert_int_equal(len, (size_t)fx->n_prompt * (size_t)fx->vocab * sizeof(float));
    fx->logits = malloc(len);
    memcpy(fx->logits, raw, len); /* little-endian f32, as on every host kvmesh runs on */
    kvm_free(raw);
}

/* The greedy pick: the CPU backend's argmax (first maximum). */
static int argmax(const float *x, int n) { return kvm_ops_cpu()->argmax(x, n); }

static void check_parity(const char *name) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/tests/fixtures/hf/%s", KVM_SOURCE_DIR, name);
    fixture_t fx = {0};
    load_fixture(dir, &fx);
    /* KVM_PARITY_BACKEND=cuda runs the same check on the GPU, weights in fp32 (parity mode) */
    const char *backend = getenv("KVM_PARITY_BACKEND") ? getenv("KVM_PARITY_BACKEND") : "cpu";
    kvm_load_opts_t opts = {.backend = backend, .quiet = true, .device_dtype = KVM_F32, .device_dtype_set = true};
    kvm_model_t *m = kvm_model_load_opts(dir, &opts);
    if (!m) fprintf(stderr, "%s: load failed: %s\n", name, kvm_errmsg());
    assert_non_null(m);
    assert_int_equal(m->cfg.vocab_size, fx.vocab);
    const int T = fx.n_prompt, V = fx.vocab;

    kvm_kv_pool_t *pool = kvm_model_kv_pool(m, 0);
    assert_non_null(pool);
    kvm_seq_t s;
    kvm_seq_init(&s, pool);
    float *logits = malloc((size_t)T * (size_t)V * sizeof(float));
    kvm_batch_item_t it = {.seq = &s, .tokens = fx.prompt, .n_tokens = T, .logits = logits, .all_logits = true};
    int rc = kvm_forward(m, &it, 1);
    if (rc) fprintf(stderr, "%s: forward failed: %s\n", name, kvm_errmsg());
    assert_int_equal(rc, 0);

    double max_diff = 0, max_ref = 0;
    int worst_t = 0;
    for (int t = 0; t < T; t++) {
        for (int v = 0; v < V; v++) {
            double d = fabs((double)logits[(size_t)t * V + v] - fx.logits[(size_t)t * V + v]);
            if (d > max_diff) {
                max_diff = d;
                worst_t = t;
            }
            max_ref = fmax(max_ref, fabs(fx.logits[(size_t)t * V + v]));
        }
    }
    double rel = max_diff / max_ref;
    fprintf(stderr, "%s [%s]: prompt logits max|ours-ref|/max|ref| = %.3e (worst at position %d; tolerance %.0e)\n", name,
            m->ops->name, rel, worst_t, PARITY_TOL);
    if (rel > PARITY_TOL) {
        for (int t = 0; t < T; t++) {
            double dt = 0;
            for (int v = 0; v < V; v++)
                dt = fmax(dt, fabs((double)logits[(size_t)t * V + v] - fx.logits[(size_t)t * V + v]));
            fprintf(stderr, "  position %2d: max abs diff %.3e\n", t, dt);
        }
    }

    /* the same prompt in two chunks (12 + 8 tokens: the second attends to cached keys across a block
     * boundary) must give the same logits */
    double chunk_rel = 0;
    {
        kvm_seq_t s2;
        kvm_seq_init(&s2, pool);
        float *l2 = malloc((size_t)T * (size_t)V * sizeof(float));
        const int T1 = 12;
        kvm_batch_item_t c1 = {.seq = &s2, .tokens = fx.prompt, .n_tokens = T1, .logits = l2, .all_logits = true};
        kvm_batch_item_t c2 = {.seq = &s2, .tokens = fx.prompt + T1, .n_tokens = T - T1,
                               .logits = l2 + (size_t)T1 * V, .all_logits = true};
        assert_int_equal(kvm_forward(m, &c1, 1), 0);
        assert_int_equal(kvm_forward(m, &c2, 1), 0);
        double md = 0;
        for (size_t i = 0; i < (size_t)T * V; i++) md = fmax(md, fabs((double)l2[i] - fx.logits[i]));
        chunk_rel = md / max_ref;
        fprintf(stderr, "%s: chunked prefill (%d + %d) logits rel err %.3e\n", name, T1, T - T1, chunk_rel);
        kvm_seq_free(&s2);
        free(l2);
    }

    /* greedy: argmax of the last prompt logits, then one token at a time */
    int32_t ours[64];
    int32_t next = argmax(logits + (size_t)(T - 1) * V, V);
    int first_bad = -1;
    for (int i = 0; i < fx.n_greedy; i++) {
        ours[i] = next;
        if (first_bad < 0 && ours[i] != fx.greedy[i]) first_bad = i;
        if (i + 1 == fx.n_greedy) break;
        kvm_batch_item_t one = {.seq = &s, .tokens = &ours[i], .n_tokens = 1, .logits = logits};
        rc = kvm_forward(m, &one, 1);
        if (rc) fprintf(stderr, "%s: decode step %d failed: %s\n", name, i, kvm_errmsg());
        assert_int_equal(rc, 0);
        next = argmax(logits, V);
    }
    if (first_bad >= 0) {
        fprintf(stderr, "%s: greedy ids differ first at step %d (ours %d, transformers %d)\n  ours:", name, first_bad,
                ours[first_bad], fx.greedy[first_bad]);
        for (int i = 0; i < fx.n_greedy; i++) fprintf(stderr, " %d", ours[i]);
        fprintf(stderr, "\n  ref: ");
        for (int i = 0; i < fx.n_greedy; i++) fprintf(stderr, " %d", fx.greedy[i]);
        fprintf(stderr, "\n");
    } else {
        fprintf(stderr, "%s: %d greedy ids identical to transformers\n", name, fx.n_greedy);
    }
    kvm_seq_free(&s);
    kvm_kv_pool_free(pool);
    kvm_model_free(m);
    free(logits);
    free(fx.logits);
    assert_true(rel <= PARITY_TOL);
    assert_true(chunk_rel <= PARITY_TOL);
    assert_int_equal(first_bad, -1);
}

static void test_llama31_8b_shape_bf16_matches_transformers(void **st) {
    (void)st;
    check_parity("llama3.1-8b-tiny");
}

static void test_qwen25_7b_shape_f16_with_qkv_bias_matches_transformers(void **st) {
    (void)st;
    check_parity("qwen2.5-7b-tiny");
}

static void test_qwen3_06b_shape_f32_with_qk_norm_and_tied_embeddings_matches_transformers(void **st) {
    (void)st;
    check_parity("qwen3-0.6b-tiny");
}

TC_MAIN(NULL, NULL,
        cmocka_unit_test(test_llama31_8b_shape_bf16_matches_transformers),
        cmocka_unit_test(test_qwen25_7b_shape_f16_with_qkv_bias_matches_transformers),
        cmocka_unit_test(test_qwen3_06b_shape_f32_with_qk_norm_and_tied_embeddings_matches_transformers))
