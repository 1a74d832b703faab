/* minitasks_eval.c - greedy runs of minitasks items on a kvmesh model (see minitasks_eval.h). */
#include "minitasks_eval.h"

#include <string.h>

int kvm_mt_run_init(kvm_mt_run_t *r, kvm_model_t *m, int max_tokens) {
    memset(r, 0, sizeof *r);
    if (!m || !m->tok) return kvm_seterr(KVM_EINVAL, "minitasks eval: the model has no tokenizer");
    if (m->cfg.chat_format != KVM_CHAT_CHATML)
        return kvm_seterr(KVM_EMODEL, "minitasks eval: model %s uses the %s chat format; minitasks prompts are ChatML",
                          m->name, kvm_chat_format_name(m->cfg.chat_format));
    /* the engine's rendering must be byte-identical to the training rendering */
    kvm_mt_item_t it;
    int rc = kvm_mt_make(&it, KVM_MT_TEAM, KVM_MT_EVAL, 1, 0, 1);
    if (rc) return rc;
    kvm_chat_msg_t msgs[2] = {{"system", it.system}, {"user", it.user}};
    char *engine = NULL;
    rc = kvm_chat_render(m->cfg.chat_format, msgs, 2, true, &engine);
    if (rc) return rc;
    char mine[4096];
    rc = kvm_mt_render_chatml(&it, false, mine, sizeof mine);
    if (rc >= 0 && strcmp(mine, engine))
        rc = kvm_seterr(KVM_EMODEL, "minitasks eval: the engine renders prompts differently from the generator:\n%s\nvs\n%s",
                        engine, mine);
    kvm_free(engine);
    if (rc < 0) return rc;
    r->model = m;
    r->max_tokens = max_tokens > 0 ? max_tokens : 48;
    r->pool = kvm_model_kv_pool(m, 0);
    if (!r->pool) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    return 0;
}

void kvm_mt_run_free(kvm_mt_run_t *r) {
    if (!r) return;
    kvm_kv_pool_free(r->pool);
    memset(r, 0, sizeof *r);
}

int kvm_mt_run_item(kvm_mt_run_t *r, const kvm_mt_item_t *it, char **out) {
    *out = NULL;
    int32_t *ids = NULL;
    int n = 0;
    int rc = kvm_prompt_encode(r->model, it->system, it->user, true, &ids, &n);
    if (rc) return kvm_errctx(rc, "minitasks item %s", it->id);
    kvm_seq_t seq;
    kvm_seq_init(&seq, r->pool);
    kvm_gen_params_t gp = {0};
    gp.max_tokens = it->exact ? r->max_tokens : 4 * r->max_tokens;
    int room = r->model->cfg.max_seq_len - n;
    if (room < 1) {
        kvm_free(ids);
        kvm_seq_free(&seq);
        return kvm_seterr(KVM_ERANGE, "minitasks item %s: %d prompt tokens leave no room in a %d-token context", it->id, n,
                          r->model->cfg.max_seq_len);
    }
    if (gp.max_tokens > room) gp.max_tokens = room;
    gp.sampling.top_p = 1.0f;
    gp.sampling.repetition_penalty = 1.0f;
    kvm_gen_result_t res;
    rc = kvm_generate(r->model, &seq, ids, n, &gp, NULL, NULL, &res);
    kvm_free(ids);
    kvm_seq_free(&seq);
    if (rc) {
        kvm_gen_result_free(&res);
        return kvm_errctx(rc, "minitasks item %s", it->id);
    }
    *out = res.text;
    res.text = NULL;
    kvm_gen_result_free(&res);
    return 0;
}
