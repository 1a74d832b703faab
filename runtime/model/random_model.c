/* random_model.c - in-memory models with seeded random weights (tests, examples, fixtures). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forward.h"
#include "model.h"
#include "../core/rng.h"

/* Box-Muller over the core PRNG's splitmix64 stream (the stream these weights were always drawn from). */
static float rm_normal(uint64_t *s) {
    double u1 = ((kvm_splitmix64_next(s) >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    double u2 = (kvm_splitmix64_next(s) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static kvm_tensor_t take(float **p, int64_t d0, int64_t d1, uint64_t *s, float std, float mean) {
    kvm_tensor_t t = {.data = *p, .dtype = KVM_F32, .ndim = d1 ? 2 : 1, .shape = {d0, d1}};
    int64_t n = d0 * (d1 ? d1 : 1);
    for (int64_t i = 0; i < n; i++) (*p)[i] = mean + std * rm_normal(s);
    *p += n;
    return t;
}

kvm_model_t *kvm_model_random(const kvm_config_t *cfg_in, uint64_t seed, float scale, const char *backend) {
    kvm_config_t c = *cfg_in;
    if (c.dim <= 0 || c.n_layers <= 0 || c.n_heads <= 0 || c.vocab_size <= 0 || c.hidden_dim <= 0) {
        kvm_seterr(KVM_EINVAL, "random model: sizes must be positive");
        return NULL;
    }
    if (!c.n_kv_heads) c.n_kv_heads = c.n_heads;
    if (!c.head_dim) c.head_dim = c.dim / c.n_heads;
    if (c.n_heads % c.n_kv_heads || c.head_dim % 2) {
        kvm_seterr(KVM_EINVAL, "random model: heads must be a multiple of kv heads and head_dim even");
        return NULL;
    }
    if (!c.rms_eps) c.rms_eps = 1e-5f;
    if (!c.rope_theta) c.rope_theta = 10000.0;
    if (!c.max_seq_len) c.max_seq_len = 2048;
    if (!c.arch_name[0]) strcpy(c.arch_name, "random");
    c.weight_dtype = KVM_F32;
    c.bos_id = c.bos_id ? c.bos_id : -1;
    if (scale <= 0) scale = 1;
    const int64_t D = c.dim, L = c.n_layers, F = c.hidden_dim, V = c.vocab_size, QD = (int64_t)c.n_heads * c.head_dim,
                  KD = (int64_t)c.n_kv_heads * c.head_dim, HD = c.head_dim;
    int64_t per_layer = 2 * D + QD * D + 2 * KD * D + D * QD + 3 * F * D + (c.qkv_bias ? QD + 2 * KD : 0) +
                        (c.qk_norm ? 2 * HD : 0);
    int64_t total = V * D + D + L * per_layer + (c.tied_embeddings ? 0 : V * D);
    kvm_model_t *m = kvm_calloc(1, sizeof *m);
    if (!m) return NULL;
    m->cfg = c;
    m->owned = kvm_malloc((size_t)total * sizeof(float));
    m->w.layers = kvm_calloc((size_t)L, sizeof(kvm_layer_weights_t));
    if (!m->owned || !m->w.layers) {
        kvm_seterr(KVM_ENOMEM, "random model: out of memory for %lld weights", (long long)total);
        kvm_model_free(m);
        return NULL;
    }
    uint64_t s = seed;
    float *p = m->owned;
    float sd = 0.02f * scale;
    m->w.tok_emb = take(&p, V, D, &s, 1.0f * scale, 0);
    for (int64_t l = 0; l < L; l++) {
        kvm_layer_weights_t *w = &m->w.layers[l];
        w->attn_norm = take(&p, D, 0, &s, 0.1f, 1.0f);
        w->wq = take(&p, QD, D, &s, sd * 4, 0);
        w->wk = take(&p, KD, D, &s, sd * 4, 0);
        w->wv = take(&p, KD, D, &s, sd * 4, 0);
        w->wo = take(&p, D, QD, &s, sd * 4, 0);
        if (c.qkv_bias) {
            w->bq = take(&p, QD, 0, &s, 0.1f, 0);
            w->bk = take(&p, KD, 0, &s, 0.1f, 0);
            w->bv = take(&p, KD, 0, &s, 0.1f, 0);
        }
        if (c.qk_norm) {
            w->q_norm = take(&p, HD, 0, &s, 0.1f, 1.0f);
            w->k_norm = take(&p, HD, 0, &s, 0.1f, 1.0f);
        }
        w->ffn_norm = take(&p, D, 0, &s, 0.1f, 1.0f);
        w->w_gate = take(&p, F, D, &s, sd * 4, 0);
        w->w_down = take(&p, D, F, &s, sd * 4, 0);
        w->w_up = take(&p, F, D, &s, sd * 4, 0);
    }
    m->w.final_norm = take(&p, D, 0, &s, 0.1f, 1.0f);
    m->w.lm_head = c.tied_embeddings ? m->w.tok_emb : take(&p, V, D, &s, sd * 4, 0);
    snprintf(m->name, sizeof m->name, "random-%llu", (unsigned long long)seed);
    m->model_id = seed ^ 0x5bd1e995ULL ^ ((uint64_t)D << 32) ^ (uint64_t)L;
    int rc = kvm_model_build_rope(m);
    if (!rc) {
        m->ops = kvm_ops_select(backend ? backend : "cpu");
        if (!m->ops) rc = kvm_errcode();
    }
    if (!rc) rc = kvm_forward_init(m, 0);
    if (rc) {
        kvm_model_free(m);
        return NULL;
    }
    return m;
}
