/* test_minitasks_parity.c - kvmesh's CPU logits for the bundled models (models/minillama-2m,
 * models/miniqwen3-6m) match transformers' logits, saved by scripts/train/train.py right after training
 * (tests/fixtures/bundled/<model>.json: fp32 on the CPU, eager attention, the exported bf16 weights
 * upcast to fp32 as kvmesh does). A team/checker prompt of ~130 tokens with its answer is run in one
 * forward; the last 8 rows are compared with max|ours - ref| / max|ref| <= 1e-4, and the argmax of
 * every row must agree wherever transformers' top two logits are not a near tie. Also runs the same
 * prompt in two chunks through the KV cache. Skips loudly when a model folder is absent. */
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

#include "runtime/model/forward.h"

#define PARITY_TOL 1e-4
#define MAX_IDS 512

typedef struct bundled_fixture {
    char model[256];
    int32_t ids[MAX_IDS];
    int n_ids;
    int vocab;
    int rows_from, n_rows;
    float *logits;          /* [n_rows][vocab] */
    int32_t argmax[MAX_IDS];/* transformers' argmax of every row */
} bundled_fixture_t;

/* Reads tests/fixtures/bundled/<name>.json; returns false when the fixture or the model is absent. */
static bool load_bundled(const char *name, bundled_fixture_t *fx) {
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/fixtures/bundled/%s.json", KVM_SOURCE_DIR, name);
    char *text = NULL;
    size_t len = 0;
    if (kvm_read_file(path, &text, &len, 0)) return false;
    cJSON *root = cJSON_Parse(text);
    kvm_free(text);
    assert_non_null(root);
    snprintf(fx->model, sizeof fx->model, "%s/%s", KVM_SOURCE_DIR, cJSON_GetObjectItem(root, "model")->valuestring);
    const cJSON *v;
    fx->n_ids = 0;
    cJSON_ArrayForEach(v, cJSON_GetObjectItem(root, "ids")) {
        assert_true(fx->n_ids < MAX_IDS);
        fx->ids[fx->n_ids++] = (int32_t)v->valuedouble;
    }
    int na = 0;
    cJSON_ArrayForEach(v, cJSON_GetObjectItem(root, "argmax_all")) {
        assert_true(na < MAX_IDS);
        fx->argmax[na++] = (int32_t)v->valuedouble;
    }
    assert_int_equal(na, fx->n_ids);
    fx->vocab = cJSON_GetObjectItem(root, "vocab")->valueint;
    fx->rows_from = cJSON_GetObjectItem(root, "rows_from")->valueint;
    const cJSON *rows = cJSON_GetObjectItem(root, "logits");
    fx->n_rows = cJSON_GetArraySize(rows);
    assert_int_equal(fx->rows_from + fx->n_rows, fx->n_ids);
    fx->logits = malloc((size_t)fx->n_rows * (size_t)fx->vocab * sizeof(float));
    int r = 0;
    const cJSON *row;
    cJSON_ArrayForEach(row, rows) {
        assert_int_equal(cJSON_GetArraySize(row), fx->vocab);
        int c = 0;
        cJSON_ArrayForEach(v, row) fx->logits[(size_t)r * fx->vocab + c++] = (float)v->valuedouble;
        r++;
    }
    cJSON_Delete(root);
    char cfg[1100];
    snprintf(cfg, sizeof cfg, "%s/config.json", fx->model);
    return kvm_file_exists(cfg);
}

/* max |a - ref| / max |ref| over n values */
static double rel_err(const float *a, const float *ref, size_t n) {
    double md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        md = fmax(md, fabs((double)a[i] - ref[i]));
        mr = fmax(mr, fabs((double)ref[i]));
    }
    return md / mr;
}

static void check_bundled(const char *name, const char *arch) {
    bundled_fixture_t fx;
    memset(&fx, 0, sizeof fx);
    if (!load_bundled(name, &fx)) {
        fprintf(stderr, "SKIPPED: bundled model %s or its fixture is absent (models/%s, tests/fixtures/bundled/%s.json)\n",
                name, name, name);
        free(fx.logits);
        skip();
    }
    kvm_model_params_t opts = {.backend = "cpu", .quiet = true};
    kvm_model_t *m = kvm_model_load(fx.model, &opts);
    if (!m) fprintf(stderr, "%s: load failed: %s\n", name, kvm_errmsg());
    assert_non_null(m);
    assert_string_equal(m->cfg.arch_name, arch);
    assert_int_equal(m->cfg.vocab_size, fx.vocab);
    const int T = fx.n_ids, V = fx.vocab;
    kvm_kv_pool_t *pool = kvm_model_kv_pool(m, 0);
    assert_non_null(pool);

    float *logits = malloc((size_t)T * (size_t)V * sizeof(float));
    kvm_seq_t s;
    kvm_seq_init(&s, pool);
    kvm_batch_item_t it = {.seq = &s, .tokens = fx.ids, .n_tokens = T, .logits = logits, .all_logits = true};
    int rc = kvm_forward(m, &it, 1);
    if (rc) fprintf(stderr, "%s: forward failed: %s\n", name, kvm_errmsg());
    assert_int_equal(rc, 0);
    double rel = rel_err(logits + (size_t)fx.rows_from * V, fx.logits, (size_t)fx.n_rows * V);
    fprintf(stderr, "%s: last %d rows of %d, max|kvmesh-hf|/max|hf| = %.3e (tolerance %.0e)\n", name, fx.n_rows, T, rel,
            PARITY_TOL);
    assert_true(rel <= PARITY_TOL);

    /* argmax of every row agrees unless the reference's top two are within 1e-3 of each other */
    int disagree = 0;
    for (int t = 0; t < T; t++) {
        const float *row = logits + (size_t)t * V;
        int best = 0;
        for (int v = 1; v < V; v++)
            if (row[v] > row[best]) best = v;
        if (best != fx.argmax[t] && fabsf(row[best] - row[fx.argmax[t]]) > 1e-3f) disagree++;
    }
    assert_int_equal(disagree, 0);

    /* the same tokens in two chunks through the cache (the second crosses block boundaries) */
    kvm_seq_t s2;
    kvm_seq_init(&s2, pool);
    float *l2 = malloc((size_t)T * (size_t)V * sizeof(float));
    const int T1 = T / 3;
    kvm_batch_item_t c1 = {.seq = &s2, .tokens = fx.ids, .n_tokens = T1, .logits = l2, .all_logits = true};
    kvm_batch_item_t c2 = {.seq = &s2, .tokens = fx.ids + T1, .n_tokens = T - T1, .logits = l2 + (size_t)T1 * V,
                           .all_logits = true};
    assert_int_equal(kvm_forward(m, &c1, 1), 0);
    assert_int_equal(kvm_forward(m, &c2, 1), 0);
    double rel2 = rel_err(l2 + (size_t)fx.rows_from * V, fx.logits, (size_t)fx.n_rows * V);
    fprintf(stderr, "%s: chunked (%d + %d) rel err %.3e\n", name, T1, T - T1, rel2);
    assert_true(rel2 <= PARITY_TOL);

    kvm_seq_free(&s2);
    kvm_seq_free(&s);
    free(l2);
    free(logits);
    free(fx.logits);
    kvm_kv_pool_free(pool);
    kvm_model_free(m);
}

static void test_bundled_llama_logits_match_transformers(void **st) {
    (void)st;
    check_bundled("minillama-2m", "LlamaForCausalLM");
}

static void test_bundled_qwen3_logits_match_transformers(void **st) {
    (void)st;
    check_bundled("miniqwen3-6m", "Qwen3ForCausalLM");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bundled_llama_logits_match_transformers),
        cmocka_unit_test(test_bundled_qwen3_logits_match_transformers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
