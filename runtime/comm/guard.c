/* guard.c - the fidelity guard of the blended policy (ours, issue 15; kvcomm.md §5.2 "The fidelity guard").
 *
 * KVCOMM's offset estimate keeps the answers on one model and not on another (minillama-2m vs miniqwen3-6m): how
 * much of a prompt must be recomputed is a property of the model and the agent's prompt, which a fixed
 * recompute_frac cannot know. The guard measures it online. For a deterministic sample of the REUSE calls of each
 * consumer (agent) of a comm context it compares
 *   - greedy decoding of up to KVM_GUARD_TOKENS tokens (to an end token) on the assembled cache (after the recompute
 *     pass) with
 *   - the same decoding after a dense prefill of the prompt on a scratch sequence (the exact prefix shared),
 *     the two decodings batched (one forward of two items per step)
 * (the first token alone misses most changed answers: names share their first pieces). On a disagreement the
 * consumer's recompute fraction moves up one step (f + (1 - f) / 2, and to 1 once that is within 0.05 of 1; 1 is the
 * dense cache). Two phases:
 *   - warm-up, the consumer's first KVM_GUARD_FIRST REUSE calls: each is checked in kvm_comm_prepare, before it is
 *     served, and a call that disagrees is served from the dense prefill (its answer is dense's);
 *   - after that, every KVM_GUARD_EVERY-th: the check runs in kvm_comm_complete, after the call's generation, on a
 *     copy-on-write fork of its assembled rows, so it adds nothing to the call's time to first token; a call that
 *     disagrees has been served from its reused cache, and the agent's later calls recompute more.
 * The state is kept per agent name (and with --state: comm_state.c) and the fraction never goes down within the
 * context's life. Deterministic for a given order of calls. A check that cannot run (the KV budget cannot hold the
 * dense copy, say) is skipped with a warning; the call keeps its cache. */
#include <stdio.h>
#include <string.h>

#include "comm_internal.h"

enum { KVM_GUARD_FIRST = 32, KVM_GUARD_EVERY = 8, KVM_GUARD_TOKENS = 8 };

static comm_guard_t *guard_get(kvm_comm_t *c, const char *agent) {
    for (int i = 0; i < c->n_guards; i++)
        if (!strcmp(c->guards[i].agent, agent)) return &c->guards[i];
    if (comm_reserve(&c->guards, &c->cap_guards, c->n_guards, sizeof *c->guards)) return NULL;
    comm_guard_t *g = &c->guards[c->n_guards++];
    memset(g, 0, sizeof *g);
    snprintf(g->agent, sizeof g->agent, "%s", agent);
    g->frac = c->cfg.recompute_frac;
    return g;
}

int comm_guard_restore(kvm_comm_t *c, const comm_guard_t *saved) {
    comm_guard_t *g = guard_get(c, saved->agent);
    if (!g) return KVM_ENOMEM;
    /* a context that already learned something keeps the larger of each figure: the fraction never goes down */
    if (saved->frac > g->frac) g->frac = saved->frac;
    if (saved->reused > g->reused) g->reused = saved->reused;
    if (saved->checked > g->checked) g->checked = saved->checked;
    if (saved->disagreed > g->disagreed) g->disagreed = saved->disagreed;
    return 0;
}

float comm_guard_frac(kvm_comm_t *c, const char *agent) {
    if (!c->cfg.guard) return c->cfg.recompute_frac;
    const comm_guard_t *g = guard_get(c, agent);
    return g ? g->frac : 1.0f; /* out of memory: the safe side */
}

static float guard_step(float f) {
    float n = f + (1.0f - f) / 2;
    return 1.0f - n < 0.05f ? 1.0f : n;
}

static bool is_eos(const kvm_model_t *m, int32_t id) {
    for (int i = 0; i < m->cfg.n_eos; i++)
        if (m->cfg.eos_ids[i] == id) return true;
    return false;
}

/* Greedy-decodes up to KVM_GUARD_TOKENS tokens on each of seq[0] and seq[1] (each holding N-1 prompt rows) from the
 * last prompt token, both in one batched forward per step (a sequence that emits an end token stops; the other goes
 * on alone), into out[i] (n[i] tokens); truncates both back to N-1 rows. 0 or < 0. */
static int guard_decode2(kvm_comm_t *c, kvm_seq_t *seq[2], int32_t last, int N, int32_t out[2][KVM_GUARD_TOKENS],
                         int n[2]) {
    int32_t in[2] = {last, last};
    bool live[2] = {true, true};
    int rc = 0;
    n[0] = n[1] = 0;
    for (int step = 0; step < KVM_GUARD_TOKENS && (live[0] || live[1]) && !rc; step++) {
        kvm_batch_item_t it[2];
        int k = 0, who[2];
        for (int i = 0; i < 2; i++)
            if (live[i]) {
                it[k] = (kvm_batch_item_t){.seq = seq[i], .tokens = &in[i], .n_tokens = 1, .next_token = &out[i][n[i]]};
                who[k++] = i;
            }
        if ((rc = kvm_forward(c->m, it, k))) break;
        for (int j = 0; j < k; j++) {
            const int i = who[j];
            in[i] = out[i][n[i]++];
            if (is_eos(c->m, in[i])) live[i] = false;
        }
    }
    kvm_seq_truncate(seq[0], N - 1);
    kvm_seq_truncate(seq[1], N - 1);
    return rc;
}

int comm_guard_sample(kvm_comm_t *c, const char *agent) {
    if (!c->cfg.guard) return 0;
    comm_guard_t *g = guard_get(c, agent);
    if (!g) return KVM_ENOMEM;
    g->reused++;
    if (g->frac >= 1.0f) return 0; /* the dense cache already: nothing to check */
    if (g->reused <= KVM_GUARD_FIRST) return 1;
    return g->reused % KVM_GUARD_EVERY == 0 ? 2 : 0;
}

/* Greedy tokens of `reuse` (N-1 rows of the REUSE assembly of ids, of which the first E are exact) against a dense
 * prefill's on a scratch sequence (E's whole blocks shared from reuse, the rest computed); counts the check and
 * raises the fraction on a difference. Returns 0 not run (warned), 1 agreed, 2 differed, or < 0; *dense_out (when
 * not NULL) receives the dense sequence on a difference (the caller frees it), else it is freed here. */
static int guard_compare(kvm_comm_t *c, const char *agent, kvm_seq_t *reuse, const int32_t *ids, int N, int E,
                         kvm_comm_report_t *r, kvm_seq_t *dense_out) {
    comm_guard_t *g = guard_get(c, agent);
    if (!g) return KVM_ENOMEM;
    kvm_seq_t d;
    kvm_seq_init(&d, c->pool);
    const int shared = E / KVM_KV_BLOCK * KVM_KV_BLOCK; /* exact rows in whole blocks: nothing writes into them */
    int rc = kvm_seq_share_prefix(&d, reuse, shared);
    if (!rc) rc = comm_prefill(c, &d, ids + shared, N - 1 - shared);
    int32_t tok[2][KVM_GUARD_TOKENS];
    int nt[2];
    kvm_seq_t *both[2] = {reuse, &d}; /* [0] the reused path, [1] dense */
    if (!rc) rc = guard_decode2(c, both, ids[N - 1], N, tok, nt);
    if (rc) { /* e.g. a KV budget too small for a second copy of the prompt: skipped, not an error; the call goes on
               * with its cache (back at N-1 rows) */
        kvm_seq_free(&d);
        KVM_LOGW("kvcomm guard: agent '%s': no check of this call (%d tokens): %s", agent, N, kvm_errmsg());
        return 0;
    }
    const int nr = nt[0], nd = nt[1];
    g->checked++;
    r->guard_tokens = N - 1 - shared + nd + nr;
    int verdict = 1;
    if (nr != nd || memcmp(tok[0], tok[1], (size_t)nr * sizeof(int32_t))) {
        g->disagreed++;
        const float before = g->frac;
        g->frac = guard_step(g->frac);
        KVM_LOGI("kvcomm guard: agent '%s' greedy tokens differ from dense on check %u: recompute_frac %.3f -> %.3f",
                 agent, g->checked, (double)before, (double)g->frac);
        verdict = 2;
    }
    if (verdict == 2 && dense_out) *dense_out = d;
    else kvm_seq_free(&d);
    r->guard = verdict;
    return verdict;
}

int comm_guard_check(kvm_comm_t *c, const char *agent, kvm_prepared_t *p, int E) {
    kvm_seq_t d;
    memset(&d, 0, sizeof d);
    kvm_comm_report_t *r = &p->report;
    const int v = guard_compare(c, agent, &p->seq, p->prompt_ids, p->n_prompt, E, r, &d);
    if (v != 2) return v < 0 ? v : 0;
    kvm_seq_t t = p->seq; /* serve this call from the dense prefill */
    p->seq = d;
    kvm_seq_free(&t);
    r->exact_tokens = E;
    r->offset_tokens = r->naive_tokens = 0;
    r->recomputed_tokens = p->n_prompt - E;
    return 0;
}

int comm_guard_check_after(kvm_comm_t *c, const char *agent, kvm_seq_t *reuse, const int32_t *ids, int N, int E,
                           kvm_comm_report_t *r) {
    const int v = guard_compare(c, agent, reuse, ids, N, E, r, NULL);
    if (v == 2) r->guard = 3; /* served from the reused cache; the next calls recompute more */
    return v < 0 ? v : 0;
}
