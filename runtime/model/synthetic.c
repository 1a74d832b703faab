/* synthetic.c - models with the real shapes of public checkpoints and seeded synthetic weights.
 *
 * Benchmarks need Llama-3.1-8B-sized weights but not their values (timings do not depend on them), and
 * 16 GB of files would not fit the machines we test on. A synthetic model is generated where it runs:
 * on a GPU backend the weights are written by a kernel straight into one device buffer (nothing is
 * uploaded), on the CPU into one host buffer; both use the generator of kernels/synthetic_gen.h, so the
 * two are the same model bit for bit. Every report built on these models must say that the weights are synthetic. */
#include "synthetic.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forward.h"

typedef struct synth_shape {
    const char *name;
    kvm_arch_t arch;
    const char *arch_name;
    int dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim, vocab, max_pos;
    bool tied, qkv_bias, qk_norm;
    double theta;
    float eps;
    kvm_rope_scaling_type_t scaling;
    double factor, low, high;
    int orig_max;
} synth_shape_t;

/* perf.md §2 (values from each model's config.json) */
static const synth_shape_t shapes[] = {
    {"llama-3.1-8b", KVM_ARCH_LLAMA, "LlamaForCausalLM", 4096, 32, 32, 8, 128, 14336, 128256, 131072, false, false, false,
     500000.0, 1e-5f, KVM_ROPE_SCALING_LLAMA3, 8.0, 1.0, 4.0, 8192},
    {"qwen2.5-7b", KVM_ARCH_QWEN2, "Qwen2ForCausalLM", 3584, 28, 28, 4, 128, 18944, 152064, 32768, false, true, false,
     1e6, 1e-6f, KVM_ROPE_SCALING_NONE, 0, 0, 0, 0},
    {"qwen3-0.6b", KVM_ARCH_QWEN3, "Qwen3ForCausalLM", 1024, 28, 16, 8, 128, 3072, 151936, 40960, true, false, true, 1e6,
     1e-6f, KVM_ROPE_SCALING_NONE, 0, 0, 0, 0},
    {"qwen2.5-0.5b", KVM_ARCH_QWEN2, "Qwen2ForCausalLM", 896, 24, 14, 2, 64, 4864, 151936, 32768, true, true, false, 1e6,
     1e-6f, KVM_ROPE_SCALING_NONE, 0, 0, 0, 0},
    {"llama-3.2-1b", KVM_ARCH_LLAMA, "LlamaForCausalLM", 2048, 16, 32, 8, 64, 8192, 128256, 131072, true, false, false,
     500000.0, 1e-5f, KVM_ROPE_SCALING_LLAMA3, 32.0, 1.0, 4.0, 8192},
    {"qwen3-8b", KVM_ARCH_QWEN3, "Qwen3ForCausalLM", 4096, 36, 32, 8, 128, 12288, 151936, 40960, false, false, true, 1e6,
     1e-6f, KVM_ROPE_SCALING_NONE, 0, 0, 0, 0},
    /* small shapes with the same features, for parity tests */
    {"tiny-llama", KVM_ARCH_LLAMA, "LlamaForCausalLM", 512, 3, 8, 2, 64, 1024, 1000, 4096, false, false, false, 500000.0,
     1e-5f, KVM_ROPE_SCALING_LLAMA3, 8.0, 1.0, 4.0, 256},
    {"tiny-qwen2", KVM_ARCH_QWEN2, "Qwen2ForCausalLM", 448, 2, 7, 1, 64, 896, 900, 4096, true, true, false, 1e6, 1e-6f,
     KVM_ROPE_SCALING_NONE, 0, 0, 0, 0},
    {"tiny-qwen3", KVM_ARCH_QWEN3, "Qwen3ForCausalLM", 256, 2, 4, 2, 128, 512, 800, 4096, true, false, true, 1e6, 1e-6f,
     KVM_ROPE_SCALING_NONE, 0, 0, 0, 0},
};

void kvm_synthetic_list(char *buf, size_t cap) {
    size_t n = 0;
    if (cap) buf[0] = 0;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0] && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s\n", shapes[i].name);
}

int kvm_synthetic_config(const char *name, kvm_config_t *c) {
    const synth_shape_t *s = NULL;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        if (name && !strcmp(name, shapes[i].name)) s = &shapes[i];
    if (!s) {
        char list[512];
        kvm_synthetic_list(list, sizeof list);
        for (char *p = list; *p; p++)
            if (*p == '\n') *p = p[1] ? ' ' : '\0';
        return kvm_seterr(KVM_ENOENT, "synthetic model '%s' is unknown (known: %s)", name ? name : "(null)", list);
    }
    *c = (kvm_config_t){.arch = s->arch, .dim = s->dim, .hidden_dim = s->hidden_dim, .n_layers = s->n_layers,
                        .n_heads = s->n_heads, .n_kv_heads = s->n_kv_heads, .head_dim = s->head_dim, .vocab_size = s->vocab,
                        .max_seq_len = s->max_pos, .rms_eps = s->eps, .rope_theta = s->theta, .rope_layout = KVM_ROPE_HALF,
                        .rope_scaling = s->scaling, .rope_factor = s->factor, .rope_low_freq_factor = s->low,
                        .rope_high_freq_factor = s->high, .rope_original_max_pos = s->orig_max, .tied_embeddings = s->tied,
                        .qkv_bias = s->qkv_bias, .qk_norm = s->qk_norm, .bos_id = -1, .pad_id = -1,
                        .chat_format = KVM_CHAT_NONE, .weight_dtype = KVM_BF16};
    snprintf(c->arch_name, sizeof c->arch_name, "%s", s->arch_name);
    return 0;
}

void kvm_synthetic_fill_host(void *dst, kvm_dtype_t dt, size_t n, uint64_t seed, uint64_t tensor_id, float stddev,
                             float mean) {
    uint64_t st = kvm_synthetic_stream(seed, tensor_id);
    for (size_t i = 0; i < n; i++) {
        float v = kvm_synthetic_value(st, i, stddev, mean);
        if (dt == KVM_F32) ((float *)dst)[i] = v;
        else if (dt == KVM_BF16) ((uint16_t *)dst)[i] = kvm_f32_to_bf16(v);
        else ((uint16_t *)dst)[i] = kvm_f32_to_f16(v);
    }
}

/* One tensor to make: where it goes, its shape, dtype and distribution. */
typedef struct synth_plan {
    kvm_tensor_t *t;
    int64_t d0, d1;
    kvm_dtype_t dt;
    float stddev, mean;
    uint64_t id;
    size_t offset;
} synth_plan_t;

static size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

kvm_model_t *kvm_model_synthetic(const char *name, const kvm_load_opts_t *opts) {
    kvm_config_t c;
    const kvm_load_opts_t def = {0};
    const kvm_load_opts_t *o = opts ? opts : &def;
    if (kvm_load_opts_check(o)) {
        kvm_errctx(kvm_errcode(), "building synthetic model %s", name ? name : "(null)");
        return NULL;
    }
    if (kvm_synthetic_config(name, &c)) return NULL;
    const kvm_dtype_t wdt = o->device_dtype_set ? o->device_dtype : KVM_BF16;
    const uint64_t seed = o->synthetic_seed_set ? o->synthetic_seed : 1234;
    c.weight_dtype = wdt;

    kvm_model_t *m = kvm_calloc(1, sizeof *m);
    if (!m) return NULL;
    m->cfg = c;
    snprintf(m->name, sizeof m->name, "synthetic:%s", name);
    m->path = kvm_strdup(m->name);
    m->w.layers = kvm_calloc((size_t)c.n_layers, sizeof(kvm_layer_weights_t));
    int rc = m->w.layers && m->path ? 0 : KVM_ENOMEM;
    if (!rc) rc = kvm_config_validate(&m->cfg, m->name);
    if (!rc) rc = kvm_model_build_rope(m);
    if (!rc) {
        m->ops = kvm_ops_select(o->backend);
        if (!m->ops) rc = kvm_errcode() ? kvm_errcode() : KVM_EUNSUPPORTED;
    }
    const int nplan_max = 16 * c.n_layers + 8;
    synth_plan_t *plan = rc ? NULL : kvm_calloc((size_t)nplan_max, sizeof *plan);
    if (!rc && !plan) rc = KVM_ENOMEM;
    void *buf = NULL;
    bool on_dev = false;
    if (!rc) {
        const int64_t D = c.dim, F = c.hidden_dim, V = c.vocab_size, QD = (int64_t)c.n_heads * c.head_dim,
                      KD = (int64_t)c.n_kv_heads * c.head_dim, HD = c.head_dim;
        int np = 0;
        size_t off = 0;
#define PLAN(tp, a, b, dt_, sd, mn, tid)                                                                             \
    do {                                                                                                             \
        plan[np] = (synth_plan_t){.t = (tp), .d0 = (a), .d1 = (b), .dt = (dt_), .stddev = (sd), .mean = (mn),        \
                                  .id = (tid), .offset = off};                                                       \
        off += align256((size_t)(a) * (size_t)((b) ? (b) : 1) * kvm_dtype_size(dt_));                                \
        np++;                                                                                                        \
    } while (0)
        const float sd = 0.02f;
        PLAN(&m->w.tok_emb, V, D, wdt, 1.0f, 0.0f, 1);
        PLAN(&m->w.final_norm, D, 0, KVM_F32, 0.0f, 1.0f, 2);
        if (!c.tied_embeddings) PLAN(&m->w.lm_head, V, D, wdt, sd, 0.0f, 3);
        for (int l = 0; l < c.n_layers; l++) {
            kvm_layer_weights_t *w = &m->w.layers[l];
            uint64_t b = 16 + (uint64_t)l * 16;
            PLAN(&w->attn_norm, D, 0, KVM_F32, 0.0f, 1.0f, b + 0);
            PLAN(&w->wq, QD, D, wdt, sd, 0.0f, b + 1);
            PLAN(&w->wk, KD, D, wdt, sd, 0.0f, b + 2);
            PLAN(&w->wv, KD, D, wdt, sd, 0.0f, b + 3);
            PLAN(&w->wo, D, QD, wdt, sd, 0.0f, b + 4);
            PLAN(&w->ffn_norm, D, 0, KVM_F32, 0.0f, 1.0f, b + 5);
            PLAN(&w->w_gate, F, D, wdt, sd, 0.0f, b + 6);
            PLAN(&w->w_up, F, D, wdt, sd, 0.0f, b + 7);
            PLAN(&w->w_down, D, F, wdt, sd, 0.0f, b + 8);
            if (c.qkv_bias) {
                PLAN(&w->bq, QD, 0, KVM_F32, sd, 0.0f, b + 9);
                PLAN(&w->bk, KD, 0, KVM_F32, sd, 0.0f, b + 10);
                PLAN(&w->bv, KD, 0, KVM_F32, sd, 0.0f, b + 11);
            }
            if (c.qk_norm) {
                PLAN(&w->q_norm, HD, 0, KVM_F32, 0.0f, 1.0f, b + 12);
                PLAN(&w->k_norm, HD, 0, KVM_F32, 0.0f, 1.0f, b + 13);
            }
        }
#undef PLAN
        on_dev = m->ops != kvm_ops_cpu() && m->ops->fill_synthetic != NULL;
        if (on_dev) {
            buf = m->ops->alloc(off);
        } else {
            /* the available memory is checked first: filling an overcommitted buffer would end in the OOM killer */
            const uint64_t avail = kvm_host_mem_available();
            const bool short_mem = avail && off > avail / 10 * 9;
            buf = short_mem ? NULL : kvm_malloc(off);
            char why[64];
            snprintf(why, sizeof why, short_mem ? "only %.1f GB is available" : "allocating it failed", (double)avail / 1e9);
            if (!buf)
                kvm_seterr(KVM_ENOMEM,
                           "%s needs %.1f GB of host memory for its weights on the %s backend and %s: "
                           "use a GPU (backend cuda) or a smaller synthetic model (tiny-*, qwen2.5-0.5b, qwen3-0.6b)",
                           m->name, (double)off / 1e9, m->ops->name, why);
            m->owned = buf;
        }
        if (!buf) rc = kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
        for (int i = 0; !rc && i < np; i++) {
            synth_plan_t *p = &plan[i];
            char *dst = (char *)buf + p->offset;
            size_t n = (size_t)p->d0 * (size_t)(p->d1 ? p->d1 : 1);
            *p->t = (kvm_tensor_t){.data = dst, .dtype = p->dt, .ndim = p->d1 ? 2 : 1, .shape = {p->d0, p->d1}};
            if (on_dev) rc = m->ops->fill_synthetic(dst, p->dt, n, kvm_synthetic_stream(seed, p->id), p->stddev, p->mean);
            else kvm_synthetic_fill_host(dst, p->dt, n, seed, p->id, p->stddev, p->mean);
        }
        if (!rc && c.tied_embeddings) m->w.lm_head = m->w.tok_emb;
        if (!rc && on_dev) rc = m->ops->sync();
        if (!rc && !o->quiet)
            KVM_LOGI("%s: %.2f GB of synthetic %s weights made on the %s backend (seed %llu)", m->name, (double)off / 1e9,
                     kvm_dtype_name(wdt), m->ops->name, (unsigned long long)seed);
    }
    kvm_free(plan);
    if (!rc) {
        char desc[256];
        snprintf(desc, sizeof desc, "%s|%d|%d|%d|%d|%d|%d|%llu", m->name, c.dim, c.n_layers, c.n_heads, c.n_kv_heads,
                 c.head_dim, c.vocab_size, (unsigned long long)seed);
        m->model_id = kvm_hash64(desc, strlen(desc), KVM_HASH_SEED);
        m->weights_on_device = on_dev;
        m->device_dtype = wdt;
        rc = kvm_forward_init(m, 0);
        /* from here the backend state owns the device buffer (freed by kvm_forward_free) */
        if (!rc && on_dev) rc = kvm_forward_adopt(m, buf);
        if (!rc) buf = NULL;
        if (!rc) rc = kvm_forward_configure(m, o);
    }
    if (rc) {
        if (on_dev && buf) m->ops->free(buf);
        kvm_errctx(rc, "building synthetic model %s", name);
        kvm_model_free(m);
        return NULL;
    }
    return m;
}
