/* test_kvcomm_common.h - helpers shared by the KVCOMM tests (test_kvcomm_core.c, test_kvcomm_device_path.c):
 * the small model's shape, max_rel, seeded token ids, the input segment their templates read and one agent's run. Include after <cmocka.h> and
 * runtime/comm/prompt.h. */
#ifndef KVM_TEST_KVCOMM_COMMON_H
#define KVM_TEST_KVCOMM_COMMON_H

/* The small random-weight model of the KVCOMM tests: 3 layers, dim 64, 4 heads, 2 KV heads of 16, vocabulary 101. */
static inline kvm_config_t kvcomm_test_cfg(kvm_rope_layout_t layout) {
    kvm_config_t c = {0};
    c.dim = 64;
    c.hidden_dim = 128;
    c.n_layers = 3;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 16;
    c.vocab_size = 101;
    c.max_seq_len = 1024;
    c.rope_theta = 10000;
    c.rope_layout = layout;
    c.rms_eps = 1e-5f;
    return c;
}

/* max |a - b| over max |b| (n elements) */
static inline float max_rel(const float *a, const float *b, size_t n) {
    double md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        md = fmax(md, fabs((double)a[i] - b[i]));
        mr = fmax(mr, fabs((double)b[i]));
    }
    return (float)(md / (mr > 0 ? mr : 1));
}

/* n token ids in [1, 99], a fixed LCG stream of seed */
static inline void fill_ids(int32_t *ids, int n, uint64_t seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        ids[i] = 1 + (int32_t)((seed >> 33) % 99);
    }
}

/* the published "input" segment: a fixed 6-token header and n (<= 64) content ids of seed */
static inline kvm_segment_t *input_segment(kvm_comm_t *c, uint64_t seed, int n) {
    int32_t hdr[6], content[64];
    fill_ids(hdr, 6, 999);
    fill_ids(content, n, seed);
    kvm_segment_t *g = NULL;
    assert_int_equal(kvm_comm_segment_ids(c, KVM_PRODUCER_INPUT, "input", hdr, 6, content, n, &g), 0);
    return g;
}

/* Runs one agent on model m (the request's): prepare under policy pol, greedy generation of max_tokens (EOS
 * ignored), complete (response segment into *resp when resp != NULL); the report into *rep when rep != NULL. 0 or
 * the first error. */
static inline int run_agent_on(kvm_model_t *m, kvm_comm_request_t *rq, kvm_template_t *t, kvm_binding_t *b, int nb,
                               kvm_kv_policy_t pol, kvm_comm_report_t *rep, kvm_segment_t **resp, int max_tokens) {
    kvm_prepared_t p;
    kvm_prompt_t pr = {.tmpl = t, .bindings = b, .n_bindings = nb, .policy = pol};
    if (rep) memset(rep, 0, sizeof *rep);
    int rc = kvm_comm_prepare(rq, &pr, &p);
    if (rc) return rc;
    kvm_gen_params_t gp = {.max_tokens = max_tokens, .ignore_eos = true};
    kvm_gen_result_t res;
    memset(&res, 0, sizeof res);
    rc = kvm_generate(m, &p.seq, p.rest_ids, p.n_rest, &gp, NULL, NULL, &res);
    if (!rc) rc = kvm_comm_complete(rq, &p, &res, resp);
    if (rep) *rep = p.report;
    kvm_gen_result_free(&res);
    kvm_prepared_release(&p);
    return rc;
}

#ifdef KVM_COMM_INTERNAL_H /* (it reads the request's context) */
static inline int run_agent(kvm_comm_request_t *rq, kvm_template_t *t, kvm_binding_t *b, int nb, kvm_kv_policy_t pol,
                     kvm_comm_report_t *rep, kvm_segment_t **resp, int max_tokens) {
    return run_agent_on(kvm_comm_model(rq->c), rq, t, b, nb, pol, rep, resp, max_tokens);
}
#endif

#endif
