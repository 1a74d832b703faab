/* sampler.c - next-token selection: greedy, temperature, top-k, top-p, repetition penalty; seeded.
 * Order of the logits processors follows HF transformers: repetition penalty, temperature, top-k, top-p. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "generate.h"
#include "../core/rng.h"

struct kvm_sampler {
    kvm_sampler_params_t p;
    int vocab;
    uint64_t state;
    int32_t *idx; /* [vocab] scratch for sorting, made at the first sample that sorts (greedy steps never need it) */
};

/* uniform in [0, 1) with 53 random bits of the core PRNG's splitmix64 stream (the stream the sampler
 * always used, so seeded samples stay the same) */
static double rand01(uint64_t *s) { return (double)(kvm_splitmix64_next(s) >> 11) * (1.0 / 9007199254740992.0); }

kvm_sampler_t *kvm_sampler_create(const kvm_sampler_params_t *p, int vocab_size) {
    if (vocab_size <= 0) {
        kvm_seterr(KVM_EINVAL, "sampler: vocabulary size %d", vocab_size);
        return NULL;
    }
    if (p && (p->temperature < 0 || p->top_k < 0 || p->top_p < 0 || p->top_p > 1 || p->repetition_penalty < 0 ||
              !isfinite(p->temperature))) {
        kvm_seterr(KVM_EINVAL, "sampler: temperature must be >= 0, top_k >= 0, top_p in [0, 1], repetition_penalty >= 0 "
                   "(got %g, %d, %g, %g)", p->temperature, p->top_k, p->top_p, p->repetition_penalty);
        return NULL;
    }
    kvm_sampler_t *s = kvm_calloc(1, sizeof *s);
    if (!s) return NULL;
    if (p) s->p = *p;
    s->vocab = vocab_size;
    s->state = s->p.seed ^ 0x6a09e667f3bcc909ULL;
    return s;
}

void kvm_sampler_free(kvm_sampler_t *s) {
    if (!s) return;
    kvm_free(s->idx);
    kvm_free(s);
}

static int cmp_desc(const void *a, const void *b, void *ctx) {
    const float *lg = ctx;
    float x = lg[*(const int32_t *)a], y = lg[*(const int32_t *)b];
    if (x > y) return -1;
    if (x < y) return 1;
    return *(const int32_t *)a - *(const int32_t *)b;
}

int32_t kvm_sampler_sample(kvm_sampler_t *s, float *logits, const int32_t *history, int n_history) {
    const int V = s->vocab;
    float rp = s->p.repetition_penalty;
    if (rp > 0 && rp != 1.0f && history) {
        /* HF: each distinct token seen once is penalised once */
        for (int i = 0; i < n_history; i++) {
            int32_t t = history[i];
            if (t < 0 || t >= V) continue;
            bool seen = false;
            for (int j = 0; j < i && !seen; j++) seen = history[j] == t;
            if (seen) continue;
            logits[t] = logits[t] > 0 ? logits[t] / rp : logits[t] * rp;
        }
    }
    if (s->p.temperature <= 0) {
        int best = 0;
        for (int i = 1; i < V; i++)
            if (logits[i] > logits[best]) best = i;
        return best;
    }
    if (!s->idx && !(s->idx = kvm_malloc((size_t)V * sizeof(int32_t)))) return -1;
    for (int i = 0; i < V; i++) logits[i] /= s->p.temperature;
    /* candidates sorted by logit (only as many as needed) */
    int n = V;
    for (int i = 0; i < V; i++) s->idx[i] = i;
    bool need_sort = (s->p.top_k > 0 && s->p.top_k < V) || (s->p.top_p > 0 && s->p.top_p < 1);
    if (need_sort) {
        qsort_r(s->idx, (size_t)V, sizeof(int32_t), cmp_desc, logits);
        if (s->p.top_k > 0 && s->p.top_k < n) n = s->p.top_k;
    }
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) mx = fmaxf(mx, logits[s->idx[i]]);
    double sum = 0;
    for (int i = 0; i < n; i++) sum += exp((double)logits[s->idx[i]] - mx);
    if (need_sort && s->p.top_p > 0 && s->p.top_p < 1) {
        /* keep the smallest prefix whose probability mass reaches top_p (at least one token) */
        double cum = 0;
        int keep = n;
        for (int i = 0; i < n; i++) {
            cum += exp((double)logits[s->idx[i]] - mx) / sum;
            if (cum >= s->p.top_p) {
                keep = i + 1;
                break;
            }
        }
        n = keep;
        sum = 0;
        for (int i = 0; i < n; i++) sum += exp((double)logits[s->idx[i]] - mx);
    }
    double r = rand01(&s->state) * sum, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += exp((double)logits[s->idx[i]] - mx);
        if (r < acc) return s->idx[i];
    }
    return s->idx[n - 1];
}
