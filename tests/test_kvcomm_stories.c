/* test_kvcomm_stories.c - the KV store and KVCOMM on the real stories260K model (interleaved RoPE, a
 * llama2.c tokenizer, no chat format): text templates, text segments, layer-0 exactness after the shift,
 * and identical prompts served from the prefix cache bit for bit. Skipped loudly without ../shared. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "runtime/comm/prompt.h"
#include "test_kvcomm_common.h"
#include "test_stories_common.h"

static kvm_template_t *story_template(kvm_comm_t *c, const char *agent, const char *lead) {
    kvm_piece_t p[3] = {{.kind = KVM_PIECE_TEXT, .text = lead},
                        {.kind = KVM_PIECE_PLACEHOLDER, .text = "input"},
                        {.kind = KVM_PIECE_TEXT, .text = " Then they went home and"}};
    kvm_template_desc_t d = {.agent = agent, .system = "Once upon a time there was a little girl.", .pieces = p,
                             .n_pieces = 3};
    kvm_template_t *t = kvm_template_create(c, &d);
    if (!t) fprintf(stderr, "template: %s\n", kvm_errmsg());
    assert_non_null(t);
    return t;
}

static void test_layer0_keys_of_a_text_segment_placed_by_kvcomm_equal_dense(void **st) {
    NEED_MODEL(st);
    kvm_model_t *m = *st;
    assert_int_equal(m->cfg.rope_layout, KVM_ROPE_INTERLEAVED);
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    assert_non_null(c);
    kvm_kvcomm_ablation(kvm_comm_config(c), "rotation");
    kvm_template_t *t = story_template(c, "teller", "She liked to play in the park with her dog.");
    const char *story = "Tim and Lily found a big red ball under the old tree.";
    kvm_segment_t *in = NULL;
    assert_int_equal(kvm_comm_segment_text(c, KVM_PRODUCER_INPUT, "input", story, strlen(story), &in), 0);
    assert_int_equal(kvm_segment_info(in)->frame, 0);
    assert_true(kvm_segment_info(in)->drop_num > 0);
    kvm_binding_t b = {"input", in};
    kvm_comm_request_t *rq = kvm_comm_request_begin(c, 1);
    kvm_prompt_t pr = {.tmpl = t, .bindings = &b, .n_bindings = 1, .policy = KVM_KV_KVCOMM};
    kvm_prepared_t p;
    assert_int_equal(kvm_comm_prepare(rq, &pr, &p), 0);
    assert_int_equal(p.report.mode, KVM_COMM_REUSE);
    assert_int_equal(p.report.ph[0].decision, KVM_PH_NAIVE);
    int s = p.report.ph[0].start_pos, T = p.report.ph[0].tokens;
    /* dense prefill of the same ids */
    kvm_kv_pool_t *pool = kvm_kv_store_pool(kvm_comm_store(c));
    kvm_seq_t d;
    kvm_seq_init(&d, pool);
    kvm_batch_item_t it = {.seq = &d, .tokens = p.prompt_ids, .n_tokens = p.n_prompt};
    assert_int_equal(kvm_forward(m, &it, 1), 0);
    const int H = m->cfg.n_kv_heads, D = m->cfg.head_dim, L = m->cfg.n_layers;
    size_t e = (size_t)L * 2 * H * T * D;
    float *x = malloc(e * 4), *y = malloc(e * 4);
    assert_int_equal(kvm_kv_read_rows(pool, p.seq.blocks, s, T, x), 0);
    assert_int_equal(kvm_kv_read_rows(pool, d.blocks, s, T, y), 0);
    size_t per = (size_t)H * T * D;
    assert_true(max_rel(x, y, per) <= 1e-5f);            /* layer 0 K */
    assert_true(max_rel(x + per, y + per, per) <= 1e-6f); /* layer 0 V */
    assert_true(max_rel(x + 2 * per * (L - 1), y + 2 * per * (L - 1), per) > 1e-4f); /* the last layer: context */
    free(x);
    free(y);
    kvm_seq_free(&d);
    kvm_prepared_release(&p);
    kvm_comm_request_abort(rq);
    kvm_segment_release(in);
    kvm_template_free(t);
    kvm_comm_free(c);
}

static void test_identical_story_prompts_share_the_prefix_cache_and_generate_the_same(void **st) {
    NEED_MODEL(st);
    kvm_model_t *m = *st;
    kvm_comm_t *c = kvm_comm_create(m, NULL);
    kvm_template_t *t = story_template(c, "teller", "Every day she went to the park to see the ducks and the swans.");
    const char *story = "One day, a little bird came down and sat next to her on the bench.";
    kvm_segment_t *in = NULL;
    assert_int_equal(kvm_comm_segment_text(c, KVM_PRODUCER_INPUT, "input", story, strlen(story), &in), 0);
    kvm_binding_t b = {"input", in};
    kvm_comm_request_t *rq = kvm_comm_request_begin(c, 1);
    kvm_gen_params_t gp = {.max_tokens = 12};
    char *texts[2] = {0};
    int exact[2] = {0};
    for (int k = 0; k < 2; k++) {
        kvm_prompt_t pr = {.tmpl = t, .bindings = &b, .n_bindings = 1, .policy = KVM_KV_PREFIX};
        kvm_prepared_t p;
        kvm_gen_result_t r;
        memset(&r, 0, sizeof r);
        assert_int_equal(kvm_comm_prepare(rq, &pr, &p), 0);
        exact[k] = p.report.exact_tokens;
        assert_int_equal(kvm_generate(m, &p.seq, p.rest_ids, p.n_rest, &gp, NULL, NULL, &r), 0);
        assert_int_equal(kvm_comm_complete(rq, &p, &r, NULL), 0);
        texts[k] = kvm_strdup(r.text ? r.text : "");
        kvm_gen_result_free(&r);
        kvm_prepared_release(&p);
    }
    assert_true(exact[1] > exact[0]);
    assert_string_equal(texts[0], texts[1]);
    kvm_free(texts[0]);
    kvm_free(texts[1]);
    kvm_comm_request_abort(rq);
    kvm_segment_release(in);
    kvm_template_free(t);
    kvm_comm_free(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layer0_keys_of_a_text_segment_placed_by_kvcomm_equal_dense),
        cmocka_unit_test(test_identical_story_prompts_share_the_prefix_cache_and_generate_the_same),
    };
    return cmocka_run_group_tests(tests, stories_setup, stories_teardown);
}
