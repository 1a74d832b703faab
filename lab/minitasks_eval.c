/* minitasks_eval.c - greedy runs of minitasks items on a kvmesh model (see minitasks_eval.h). */
#include "minitasks_eval.h"

#include <string.h>

#include <kvmesh_lab.h>

int kvm_mt_run_init(kvm_mt_run_t *r, kvm_model_t *m, int max_tokens) {
    memset(r, 0, sizeof *r);
    if (!m || !kvm_model_tokenizer(m)) return kvm_seterr(KVM_EINVAL, "minitasks eval: the model has no tokenizer");
    kvm_model_info_t info;
    kvm_model_info(m, &info);
    if (strcmp(info.chat_format, "chatml"))
        return kvm_seterr(KVM_EMODEL, "minitasks eval: model %s uses the %s chat format; minitasks prompts are ChatML",
                          info.name, info.chat_format);
    /* the engine's rendering must be byte-identical to the training rendering */
    kvm_mt_item_t it;
    int rc = kvm_mt_make(&it, KVM_MT_TEAM, KVM_MT_EVAL, 1, 0, 1);
    if (rc) return rc;
    char *engine = NULL;
    rc = kvm_model_chat_render(m, it.system, it.user, &engine);
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
    return 0;
}

void kvm_mt_run_free(kvm_mt_run_t *r) {
    if (r) memset(r, 0, sizeof *r);
}

int kvm_mt_run_item(kvm_mt_run_t *r, const kvm_mt_item_t *it, char **out) {
    *out = NULL;
    kvm_generate_params_t gp = kvm_generate_default_params();
    gp.max_tokens = it->exact ? r->max_tokens : 4 * r->max_tokens;
    gp.temperature = 0; /* greedy; top_p and repetition_penalty stay off (1) */
    gp.chat = true;
    gp.system = it->system;
    kvm_generation_t g;
    int rc = kvm_model_generate(r->model, it->user, &gp, NULL, NULL, &g);
    if (rc) {
        kvm_generation_clear(&g);
        return kvm_errctx(rc, "minitasks item %s", it->id);
    }
    *out = g.text;
    g.text = NULL;
    kvm_generation_clear(&g);
    return 0;
}
