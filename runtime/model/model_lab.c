/* model_lab.c - the model-level parts of include/kvmesh_lab.h that are not the forward's or the generator's own:
 * backend facts for benchmarks, the engine's chat rendering, sequences as heap handles, timed forward steps. */
#include <stdio.h>
#include <string.h>

#include "../core/core.h"
#include "../kv/store.h"
#include "generate.h"

static const char *dtype_lower(kvm_dtype_t t) {
    return t == KVM_F32 ? "f32" : t == KVM_F16 ? "f16" : "bf16";
}

const char *kvm_model_device_dtype(const kvm_model_t *m) { return dtype_lower(m->device_dtype); }

const char *kvm_model_kv_dtype(const kvm_model_t *m) { return dtype_lower(kvm_model_kv_dtype_of(m)); }

bool kvm_model_has_graphs(const kvm_model_t *m) { return m->ops && m->ops->graph_begin != NULL; }

void kvm_model_device_describe(const kvm_model_t *m, char *buf, size_t cap) {
    if (cap == 0) return;
    snprintf(buf, cap, "cpu");
    if (m->ops && strcmp(m->ops->name, "cpu") != 0 && kvm_cuda_describe(buf, cap) != 0) snprintf(buf, cap, "%s", m->ops->name);
}

int kvm_model_chat_render(const kvm_model_t *m, const char *system, const char *user, char **text) {
    *text = NULL;
    if (m->cfg.chat_format == KVM_CHAT_NONE)
        return kvm_seterr(KVM_EINVAL, "model %s has no chat format", m->name);
    kvm_chat_msg_t msgs[2] = {{"system", system}, {"user", user}};
    return system ? kvm_chat_render(m->cfg.chat_format, msgs, 2, true, text)
                  : kvm_chat_render(m->cfg.chat_format, msgs + 1, 1, true, text);
}

kvm_seq_t *kvm_seq_create(kvm_kv_pool_t *pool) {
    kvm_seq_t *s = kvm_malloc(sizeof *s);
    if (s) kvm_seq_init(s, pool);
    return s;
}

void kvm_seq_destroy(kvm_seq_t *s) {
    if (!s) return;
    kvm_seq_free(s);
    kvm_free(s);
}

int kvm_seq_read_rows(const kvm_seq_t *s, int pos, int n, float *out) {
    if (pos < 0 || n < 0 || pos + n > s->n_tokens)
        return kvm_seterr(KVM_ERANGE, "rows [%d, %d) are not in a sequence of %d tokens", pos, pos + n, s->n_tokens);
    return kvm_kv_read_rows(s->pool, s->blocks, pos, n, out);
}

int kvm_forward_timed(kvm_model_t *m, kvm_batch_item_t *items, int n_items, double *device_ms, double *host_ms) {
    const kvm_ops_t *ops = m->ops;
    void *e0 = ops->event_record ? ops->event_record() : NULL;
    uint64_t h0 = kvm_now_ns();
    int rc = kvm_forward(m, items, n_items);
    uint64_t h1 = kvm_now_ns();
    void *e1 = ops->event_record ? ops->event_record() : NULL;
    const double host = (double)(h1 - h0) / 1e6;
    if (host_ms) *host_ms = host;
    if (device_ms) *device_ms = e0 && e1 ? ops->event_elapsed_ms(e0, e1) : host;
    if (ops->event_free) {
        ops->event_free(e0);
        ops->event_free(e1);
    }
    return rc;
}
