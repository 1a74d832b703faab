/* test_serve_lib.c - the two library calls the daemon's requests added to include/kvmesh.h: kvm_model_generate_ids
 * (generate from token ids; `generate` with a token_ids frame) and kvm_schema_cache_evict (`cache.evict`). Only the
 * public header. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include <kvmesh.h>

#define MINI KVM_SOURCE_DIR "/models/minillama-2m"

static kvm_model_t *mini(void) {
    kvm_model_params_t mp = kvm_model_default_params();
    mp.backend = "cpu";
    mp.quiet = true;
    kvm_model_t *m = kvm_model_load(MINI, &mp);
    assert_non_null(m);
    return m;
}

static void test_generating_from_the_prompts_ids_gives_what_the_text_gives(void **s) {
    (void)s;
    kvm_model_t *m = mini();
    kvm_generate_params_t gp = kvm_generate_default_params();
    gp.max_tokens = 12;
    gp.temperature = 0;
    gp.ignore_eos = true;
    kvm_generation_t a, b;
    assert_int_equal(kvm_model_generate(m, "Once upon a time", &gp, NULL, NULL, &a), 0);
    int32_t *ids = NULL;
    int n = 0;
    assert_int_equal(kvm_tokenize(kvm_model_tokenizer(m), "Once upon a time", 16, KVM_TOK_ADD_BOS, &ids, &n), 0);
    assert_int_equal(n, a.n_prompt);
    assert_int_equal(kvm_model_generate_ids(m, ids, n, &gp, NULL, NULL, &b), 0);
    assert_int_equal(b.n_prompt, n);
    assert_int_equal(b.n_ids, 12);
    assert_int_equal(a.n_ids, b.n_ids);
    assert_memory_equal(a.ids, b.ids, (size_t)a.n_ids * sizeof *a.ids);
    assert_string_equal(a.text, b.text);
    kvm_generation_clear(&a);
    kvm_generation_clear(&b);

    /* an id outside the vocabulary and no ids are errors naming what */
    kvm_model_info_t in;
    kvm_model_info(m, &in);
    ids[1] = in.vocab_size;
    assert_int_equal(kvm_model_generate_ids(m, ids, n, &gp, NULL, NULL, &b), KVM_ERANGE);
    assert_non_null(strstr(kvm_errmsg(), "index 1"));
    assert_int_equal(kvm_model_generate_ids(m, ids, 0, &gp, NULL, NULL, &b), KVM_EINVAL);
    assert_int_equal(b.n_ids, 0);
    kvm_free(ids);
    kvm_model_free(m);
}

static void test_an_entry_evicted_by_hand_leaves_a_tombstone_but_a_pinned_one_stays(void **s) {
    (void)s;
    kvm_schema_cache_t *c = kvm_schema_cache_open(NULL, NULL);
    assert_non_null(c);
    kvm_failure_step_t st[] = {{.agent = "user", .content = "sum the invoices"},
                               {.agent = "Planner", .content = "plan: read the invoices"},
                               {.agent = "Coder", .content = "KeyError: 'total'", .error = true}};
    kvm_failure_t f = {.id = "run-1", .question = "sum the invoices", .steps = st, .n_steps = 3, .gold_agent = "Coder",
                       .gold_step = 2};
    int id = kvm_schema_cache_insert(c, &f, false);
    assert_true(id >= 0);
    assert_int_equal(kvm_schema_cache_pin(c, id, true), 0);
    assert_int_equal(kvm_schema_cache_evict(c, id), KVM_EBUSY);
    assert_non_null(strstr(kvm_errmsg(), "pinned"));
    assert_int_equal(kvm_schema_cache_pin(c, id, false), 0);
    assert_int_equal(kvm_schema_cache_evict(c, id), 0);
    kvm_schema_cache_stats_t cs;
    kvm_schema_cache_stats(c, &cs);
    assert_int_equal(cs.entries, 0);
    assert_int_equal(cs.tombstones, 1);
    assert_null(kvm_schema_cache_entry_json(c, id));
    assert_int_equal(kvm_schema_cache_evict(c, id), KVM_ENOENT);
    assert_int_equal(kvm_schema_cache_evict(c, -1), KVM_ENOENT);
    /* a new entry takes a new id */
    f.id = "run-2";
    assert_true(kvm_schema_cache_insert(c, &f, false) > id);
    kvm_schema_cache_free(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_generating_from_the_prompts_ids_gives_what_the_text_gives),
        cmocka_unit_test(test_an_entry_evicted_by_hand_leaves_a_tombstone_but_a_pinned_one_stays),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
