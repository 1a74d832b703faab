/* blame_verify.c - blame confirmed by counterfactual replay (include/kvmesh.h kvm_blame_verify, docs/correct.md
 * "Verify by replay"), on the public API (and core.h's error setters): the traced workflow is loaded from the trace, each candidate step
 * is generated again in a replay (kvm_run_params_t.replay) and the replay's end and score say whether the run
 * passes now. */
#include <stdio.h>
#include <string.h>

#include <kvmesh.h>

#include "../runtime/core/core.h" /* kvm_seterr, kvm_errctx */

kvm_verify_params_t kvm_verify_default_params(void) { return (kvm_verify_params_t){.budget = 3, .pass_score = 1.0, .kv = "dense"}; }

/* A fresh sampling seed for step t (below 2^53: the replay records it as a JSON number). */
static uint64_t fresh_seed(uint64_t base, int t) {
    uint64_t z = base + 0x9e3779b97f4a7c15ULL * (uint64_t)(t + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return (z & ((1ULL << 53) - 1)) | 1;
}

static uint64_t fnv(const char *s) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; s && *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return h;
}

/* One replay of run_dir from trace step `step` (output NULL: generated again with seed under kv); its end and score
 * into *o. 0, or KVM_E* when the replay could not start (a run that fails is a result, not an error). */
static int replay_once(kvm_workflow_t *wf, const char *run_dir, int step, const char *output, uint64_t seed, const char *kv,
                       double pass_score, kvm_verify_replay_t *o) {
    kvm_run_params_t p = kvm_run_default_params();
    p.resume_trace = run_dir;
    p.replay = true;
    p.replay_step = step;
    p.replay_output = output;
    p.replay_seed = seed;
    p.kv = output ? NULL : kv;
    kvm_run_t *r = kvm_run_start(wf, &p);
    if (!r) return kvm_errcode() ? kvm_errcode() : KVM_EINVAL;
    if (kvm_workflow_drive(wf) < 0) return kvm_errcode() ? kvm_errcode() : KVM_EIO;
    o->status = kvm_run_status(r, NULL);
    const char *dir = kvm_run_trace_dir(r);
    snprintf(o->run_dir, sizeof o->run_dir, "%s", dir ? dir : "");
    o->scored = o->status == 0 && kvm_workflow_has_score(wf) && kvm_run_score(r, &o->score) == 1;
    o->passed = o->status == 0 && (!kvm_workflow_has_score(wf) || (o->scored && o->score >= pass_score));
    return 0;
}

int kvm_blame_verify(kvm_runtime_t *rt, kvm_schema_cache_t *c, const char *run_dir, const kvm_failure_t *f, const kvm_blame_t *b,
                     const kvm_verify_params_t *params, kvm_verify_t *out) {
    if (!rt || !run_dir || !f || !b || !out) return kvm_seterr(KVM_EINVAL, "kvm_blame_verify: a runtime, a run, its failure and a blame are needed");
    const kvm_verify_params_t def = kvm_verify_default_params();
    const kvm_verify_params_t *p = params ? params : &def;
    if (p->budget < 0 || p->budget > KVM_VERIFY_MAX)
        return kvm_seterr(KVM_EINVAL, "kvm_blame_verify: budget %d is outside 0..%d", p->budget, KVM_VERIFY_MAX);
    memset(out, 0, sizeof *out);
    out->step = out->schema_id = -1;
    out->control.step = -1;
    kvm_workflow_t *wf = kvm_workflow_load_trace(rt, run_dir, NULL);
    if (!wf) return kvm_errcode() ? kvm_errcode() : KVM_EINVAL;
    int n = f->n_steps - 1, rc = 0; /* traced steps: blame's step t is trace step t - 1 */
    if (n < 1) {
        kvm_workflow_free(wf);
        return kvm_seterr(KVM_EINVAL, "%s: the run has no traced step to replay", run_dir);
    }
    /* the control: every agent step given its recorded output (the last step: given too, or run again when a node) */
    const kvm_failure_step_t *last = &f->steps[n];
    rc = replay_once(wf, run_dir, n - 1, last->tool_result || last->error ? NULL : last->content, 0, NULL, p->pass_score, &out->control);
    if (rc) rc = kvm_errctx(rc, "verifying %s: the control replay (recorded outputs)", run_dir);
    if (rc || out->control.passed) {
        kvm_workflow_free(wf);
        return rc;
    }
    /* the candidates: blame's, then the other agent steps in order, as many as the budget (a func / tool node is
       deterministic: running it again changes nothing); replayed earliest first, so that the first that passes is the
       earliest step whose change makes the run pass (Who&When's decisive error) */
    int order[KVM_VERIFY_MAX], n_order = 0;
    for (int i = 0; i <= b->n_cand + n && n_order < p->budget; i++) {
        int t = i < b->n_cand ? b->cand[i].step : i - b->n_cand;
        bool seen = t < 1 || t > n || f->steps[t].tool_result;
        for (int j = 0; j < n_order; j++) seen |= order[j] == t;
        if (!seen) order[n_order++] = t;
    }
    for (int i = 1; i < n_order; i++) /* insertion sort: a few steps */
        for (int j = i; j > 0 && order[j - 1] > order[j]; j--) {
            int x = order[j];
            order[j] = order[j - 1];
            order[j - 1] = x;
        }
    uint64_t base = p->seed ? p->seed : fnv(f->id);
    for (int i = 0; !rc && i < n_order; i++) {
        int t = order[i];
        kvm_verify_replay_t *o = &out->replay[out->n_replays++];
        o->step = t;
        kvm_agent_normalize(f->steps[t].agent, o->agent, sizeof o->agent);
        o->seed = fresh_seed(base, t);
        rc = replay_once(wf, run_dir, t - 1, NULL, o->seed, p->kv, p->pass_score, o);
        if (rc) rc = kvm_errctx(rc, "verifying %s: replaying step %d", run_dir, t);
        else if (o->passed) {
            out->step = t;
            snprintf(out->agent, sizeof out->agent, "%s", o->agent);
        }
        if (out->step >= 0) break;
    }
    kvm_workflow_free(wf);
    if (!rc && c && out->step >= 0) { /* a confirmed attribution feeds the cache, as a label does */
        kvm_failure_t g = *f;
        g.gold_agent = out->agent;
        g.gold_step = out->step;
        g.human_label = false;
        if (kvm_schema_cache_feedback(c, b, &g) < 0 || (out->schema_id = kvm_schema_cache_insert(c, &g, false)) < 0)
            rc = kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    }
    return rc;
}
