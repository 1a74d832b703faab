/* blame_verify.c - blame confirmed by counterfactual replay (include/kvmesh.h kvm_blame_verify, docs/correct.md
 * "Verify by replay"), on the public API (and core.h's error setters): the traced workflow is loaded from the trace, each candidate step
 * is generated again in a replay (kvm_run_params_t.replay) and the replay's end and score say whether the run
 * passes now. */
#include <stdio.h>
#include <string.h>

#include <kvmesh.h>

#include <kvmesh_lab.h> /* kvm_now_ns */

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
static int replay_once(kvm_runtime_t *rt, kvm_workflow_t *wf, const char *run_dir, int step, const char *output, uint64_t seed,
                       const char *kv, double pass_score, uint64_t deadline_ns, bool *timed_out, kvm_verify_replay_t *o) {
    kvm_run_params_t p = kvm_run_default_params();
    p.resume_trace = run_dir;
    p.replay = true;
    p.replay_step = step;
    p.replay_output = output;
    p.replay_seed = seed;
    p.kv = output ? NULL : kv;
    kvm_run_t *r = kvm_run_start(wf, &p);
    if (!r) return kvm_errcode() ? kvm_errcode() : KVM_EINVAL;
    if (!deadline_ns) {
        if (kvm_workflow_drive(wf) < 0) return kvm_errcode() ? kvm_errcode() : KVM_EIO;
    } else { /* stepped here, so that the deadline can cancel it (it ends at its next token) */
        bool canceled = false;
        while (kvm_run_status(r, NULL) == KVM_EBUSY) {
            if (!canceled && kvm_now_ns() > deadline_ns) {
                kvm_run_cancel(r, KVM_ETIMEDOUT, "verify: the deadline passed");
                canceled = *timed_out = true;
            }
            int n = kvm_runtime_step(rt);
            if (n < 0) return kvm_errcode() ? kvm_errcode() : KVM_EIO;
            if (n == 0 && kvm_run_status(r, NULL) == KVM_EBUSY) { /* nothing can move it (a tool that answers later) */
                if (!canceled) kvm_run_cancel(r, KVM_ETIMEDOUT, "verify: the replay waits for something that does not come");
                canceled = true;
                kvm_runtime_step(rt);
                break;
            }
        }
    }
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
    if (!(p->timeout_ms >= 0)) return kvm_seterr(KVM_EINVAL, "kvm_blame_verify: timeout_ms %g is not >= 0", p->timeout_ms);
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
    uint64_t deadline = p->timeout_ms > 0 ? kvm_now_ns() + (uint64_t)(p->timeout_ms * 1e6) : 0;
    rc = replay_once(rt, wf, run_dir, n - 1, last->tool_result || last->error ? NULL : last->content, 0, NULL, p->pass_score,
                     deadline, &out->timed_out, &out->control);
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
    for (int i = 0; !rc && i < n_order && !out->timed_out; i++) {
        int t = order[i];
        if (deadline && kvm_now_ns() > deadline) { /* no replay starts after the deadline */
            out->timed_out = true;
            break;
        }
        kvm_verify_replay_t *o = &out->replay[out->n_replays++];
        o->step = t;
        kvm_agent_normalize(f->steps[t].agent, o->agent, sizeof o->agent);
        o->seed = fresh_seed(base, t);
        rc = replay_once(rt, wf, run_dir, t - 1, NULL, o->seed, p->kv, p->pass_score, deadline, &out->timed_out, o);
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
        kvm_model_t *judge = rc ? NULL : p->judge ? p->judge : kvm_runtime_judge(rt); /* the params', else the runtime's */
        if (!rc && !judge && kvm_errcode()) { /* the runtime's judge could not be loaded */
            out->judge_status = kvm_errcode();
            snprintf(out->judge_error, sizeof out->judge_error, "%s", kvm_errmsg());
        }
        if (judge) { /* the judge writes the entry's text; a judge that fails leaves the stub (said in judge_status) */
            out->judge_status = kvm_schema_distill(c, out->schema_id, &g, judge, p->judge_params);
            if (out->judge_status) snprintf(out->judge_error, sizeof out->judge_error, "%s", kvm_errmsg());
            out->distilled = out->judge_status == 0;
        }
    }
    return rc;
}

/* ---- the LLM-written schema text (correct.md §3.2) ----------------------------------------------------------- */

kvm_judge_params_t kvm_judge_default_params(void) {
    return (kvm_judge_params_t){.max_tokens = 512, .max_prompt_bytes = 8192, .temperature = 0.7f, .top_p = 0.95f};
}

/* Appends at most cap bytes of s to b (cut at a byte boundary; the scrub later makes stray bytes spaces). */
static void put_cut(char *b, size_t bcap, size_t *len, const char *s, size_t cap) {
    size_t n = s ? strlen(s) : 0;
    if (n > cap) n = cap;
    if (*len + n >= bcap) n = bcap - *len - 1;
    memcpy(b + *len, s, n);
    *len += n;
    b[*len] = '\0';
}

/* The judge's prompt: the instruction, the task, the label and the transcript ("Step i: agent: content"), the
 * transcript cut to budget bytes (each step to a share of it). New string or NULL (no memory). */
static char *judge_prompt(const kvm_failure_t *f, size_t budget) {
    static const char head[] =
        "You write an error schema: a note that helps recognise this kind of mistake in future multi-agent "
        "conversations. Do not explain how to fix the agents.\n";
    static const char tail[] =
        "\nWrite three sections with these headings: Error Signatures (tell-tale behaviours and markers of this "
        "error), Error Context Analysis (what happened before it), Detection Heuristics (concrete questions to ask "
        "and key phrases to look for).\n";
    size_t cap = sizeof head + sizeof tail + budget + 1024 + 256;
    char *b = kvm_malloc(cap);
    if (!b) return NULL;
    size_t len = 0;
    b[0] = '\0';
    put_cut(b, cap, &len, head, sizeof head);
    put_cut(b, cap, &len, "Task: ", 6);
    put_cut(b, cap, &len, f->question ? f->question : "", budget / 4 < 512 ? budget / 4 : 512);
    char line[160];
    snprintf(line, sizeof line, "\nThe decisive mistake: agent %.64s, step %d.\nConversation:\n", f->gold_agent ? f->gold_agent : "?",
             f->gold_step);
    put_cut(b, cap, &len, line, sizeof line);
    size_t per = f->n_steps > 0 ? budget / (size_t)f->n_steps : budget, used = 0;
    if (per < 64) per = 64;
    for (int i = 0; i < f->n_steps && used < budget; i++) {
        size_t before = len;
        snprintf(line, sizeof line, "Step %d: %.64s: ", i, f->steps[i].agent ? f->steps[i].agent : "?");
        put_cut(b, cap, &len, line, sizeof line);
        size_t room = budget - used < per ? budget - used : per;
        put_cut(b, cap, &len, f->steps[i].content ? f->steps[i].content : "", room);
        put_cut(b, cap, &len, "\n", 1);
        used += len - before;
    }
    put_cut(b, cap, &len, tail, sizeof tail);
    return b;
}

/* A hash of what a failure says (question, each step's agent, kind and content, the label), not of its id. */
static uint64_t failure_seed(const kvm_failure_t *f) {
    uint64_t h = kvm_hash64(f->question ? f->question : "", f->question ? strlen(f->question) : 0, KVM_HASH_SEED);
    for (int i = 0; i < f->n_steps; i++) {
        const kvm_failure_step_t *s = &f->steps[i];
        const char *a = s->agent ? s->agent : "", *t = s->content ? s->content : "";
        const unsigned char kind = (unsigned char)(s->tool_result | s->error << 1);
        h = kvm_hash64(a, strlen(a) + 1, h);
        h = kvm_hash64(&kind, 1, h);
        h = kvm_hash64(t, strlen(t) + 1, h);
    }
    h = kvm_hash64(f->gold_agent, strlen(f->gold_agent) + 1, h);
    h = kvm_hash64(&f->gold_step, sizeof f->gold_step, h);
    return (h ^ (h >> 11)) & ((1ull << 53) - 1); /* below 2^53, as every recorded seed */
}

int kvm_schema_distill(kvm_schema_cache_t *c, int id, const kvm_failure_t *f, kvm_model_t *judge, const kvm_judge_params_t *params) {
    if (!c || !f || !judge) return kvm_seterr(KVM_EINVAL, "kvm_schema_distill: a cache, a failure and a judge model are needed");
    const kvm_judge_params_t def = kvm_judge_default_params();
    const kvm_judge_params_t *p = params ? params : &def;
    if (p->max_tokens < 1 || p->max_tokens > 4096 || p->max_prompt_bytes < 256 || p->max_prompt_bytes > (1u << 20))
        return kvm_seterr(KVM_EINVAL, "kvm_schema_distill: max_tokens must be in 1..4096 (got %d) and max_prompt_bytes in "
                          "256..1048576 (got %zu)", p->max_tokens, p->max_prompt_bytes);
    if (!f->gold_agent || f->gold_step < 0 || f->gold_step >= f->n_steps)
        return kvm_seterr(KVM_EINVAL, "kvm_schema_distill: the failure '%s' is not labelled (gold agent and step)", f->id ? f->id : "");
    char *have = kvm_schema_cache_text(c, id); /* also: KVM_ENOENT for an unknown id */
    if (!have && kvm_errcode() == KVM_ENOENT) return KVM_ENOENT;
    kvm_free(have);
    kvm_model_info_t info;
    kvm_model_info(judge, &info);
    const kvm_tokenizer_t *tok = kvm_model_tokenizer(judge);
    kvm_generate_params_t gp = kvm_generate_default_params();
    gp.max_tokens = p->max_tokens;
    if (info.max_context > 0 && gp.max_tokens > info.max_context / 2) gp.max_tokens = info.max_context / 2 > 0 ? info.max_context / 2 : 1;
    gp.temperature = p->temperature;
    gp.top_p = p->top_p;
    gp.chat = info.chat_format && strcmp(info.chat_format, "none") != 0;
    /* the prompt, cut until it fits the judge's context beside its answer */
    char *prompt = NULL;
    int n = 0;
    for (size_t budget = p->max_prompt_bytes;; budget /= 2) {
        kvm_free(prompt);
        if (!(prompt = judge_prompt(f, budget))) return kvm_seterr(KVM_ENOMEM, "out of memory writing the judge's prompt");
        int32_t *ids = NULL;
        n = 0;
        if (!tok || info.max_context <= 0) break;
        if (kvm_tokenize(tok, prompt, strlen(prompt), KVM_TOK_ADD_BOS, &ids, &n)) break;
        kvm_free(ids);
        if (n + gp.max_tokens + 64 <= info.max_context || budget == 0) break; /* 64: the chat markup */
    }
    if (tok && info.max_context > 0) { /* what is left of the context is the answer's */
        int room = info.max_context - n - 64;
        if (room < 16) {
            kvm_free(prompt);
            return kvm_seterr(KVM_ERANGE, "the judge %s: its context of %d tokens cannot hold the prompt (%d tokens with no "
                              "transcript) and an answer", info.name, info.max_context, n);
        }
        if (gp.max_tokens > room) gp.max_tokens = room;
    }
    /* The seed: the caller's, else one derived from what the failure says — its question, steps and label, not its id
     * (a run id is fresh for every run), so the same failure gets the same text. A sample that leaves nothing after the
     * scrub (a small judge that ends at once, or writes only markup) is drawn again, twice at most, with the next
     * seeds; then the stub stands. */
    const uint64_t base = p->seed ? p->seed : failure_seed(f) ^ ((uint64_t)(unsigned)id * 0x9E3779B97F4A7C15ull);
    int rc = 0;
    for (int attempt = 0; attempt < 3; attempt++) {
        kvm_generation_t g = {0};
        gp.seed = base + (uint64_t)attempt;
        rc = kvm_model_generate(judge, prompt, &gp, NULL, NULL, &g);
        if (rc) {
            kvm_generation_clear(&g);
            rc = kvm_errctx(rc, "the judge %s writing the text of schema %d", info.name, id);
            break;
        }
        rc = kvm_schema_cache_set_text(c, id, g.text ? g.text : "", info.name);
        kvm_generation_clear(&g);
        char *t = rc ? NULL : kvm_schema_cache_text(c, id);
        bool usable = t != NULL;
        kvm_free(t);
        if (rc || usable) break;
    }
    kvm_free(prompt);
    return rc;
}
