/* wf_replay.c - counterfactual replay of a traced run from one of its steps (kvm_run_params_t.replay,
 * docs/correct.md "Replay").
 *
 * A replay is a fresh run of the workflow with the traced run's inputs, seed and KV policy, in which the agent
 * steps before step N are not generated but given their recorded outputs (the run's state before step N is rebuilt
 * exactly, func and tool nodes run again on it), step N is either given a new output (an edit) or generated again
 * (with a fresh sampling seed or another KV policy), and the steps after it are generated as usual. Edits recorded
 * by the traced run itself (it may be a replay too) stay where they were unless they are step N's: they are part of
 * the run's recipe, as an injected error is. Steps are matched by (super-step, node, agent, k-th call of that agent
 * in that node and super-step), so a step keeps its identity when the outputs before it change; a step of a
 * subgraph's run also by its "path" (the subgraph nodes down to it, each with the super-step it ran in, as
 * "review@2/check@1": wf_run_path), so the nested steps before step N are given their outputs too. The replay's
 * run.start records all of it under "replay" (its origin, the step, the edits, the step generated again). */
#include "wf_internal.h"

#include <stdio.h>
#include <string.h>

/* {"superstep", "node", "agent", "call"} of a step, and "path" for a subgraph's step (path not empty). */
static cJSON *step_key(const char *path, int superstep, const char *node, const char *agent, int call) {
    cJSON *k = cJSON_CreateObject();
    if (k && ((path && *path && !cJSON_AddStringToObject(k, "path", path)) || !cJSON_AddNumberToObject(k, "superstep", superstep) ||
              !cJSON_AddStringToObject(k, "node", node ? node : "") || !cJSON_AddStringToObject(k, "agent", agent ? agent : "") ||
              !cJSON_AddNumberToObject(k, "call", call))) {
        cJSON_Delete(k);
        return NULL;
    }
    return k;
}

static int key_int(const cJSON *k, const char *name) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(k, name);
    return cJSON_IsNumber(v) ? v->valueint : -1;
}

static const char *key_str(const cJSON *k, const char *name) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(k, name);
    return cJSON_IsString(v) ? v->valuestring : "";
}

static bool key_is(const cJSON *k, const char *path, int superstep, const char *node, const char *agent, int call) {
    return key_int(k, "superstep") == superstep && key_int(k, "call") == call && !strcmp(key_str(k, "node"), node) &&
           !strcmp(key_str(k, "agent"), agent) && !strcmp(key_str(k, "path"), path ? path : "");
}

static bool same_key(const cJSON *a, const cJSON *b) {
    return key_is(a, key_str(b, "path"), key_int(b, "superstep"), key_str(b, "node"), key_str(b, "agent"), key_int(b, "call"));
}

/* The entry of list whose key matches, or NULL. */
static const cJSON *find_key(const cJSON *list, const char *path, int superstep, const char *node, const char *agent, int call) {
    for (const cJSON *e = list ? list->child : NULL; e; e = e->next)
        if (key_is(e, path, superstep, node, agent, call)) return e;
    return NULL;
}

/* The path of step i's subgraph's run ("" for a step of the run's graph), from the steps of their subgraph nodes
 * (a nested step names its node's step by idx in "parent"); paths[i] is filled once (kvm_free each). NULL when out of
 * memory; "" when the trace does not hold the parent (a torn trace: matched as the run's own). */
static const char *step_path(const kvm_trace_step_t **steps, int n, char **paths, int i, int depth) {
    if (paths[i]) return paths[i];
    const kvm_trace_step_t *s = steps[i];
    int p = -1;
    for (int j = 0; s->depth > 0 && depth < 16 && j < n && p < 0; j++)
        if (steps[j]->idx == s->parent && j != i) p = j;
    if (p < 0) return paths[i] = kvm_strdup("");
    const char *up = step_path(steps, n, paths, p, depth + 1);
    if (!up) return NULL;
    size_t len = strlen(up) + strlen(steps[p]->node ? steps[p]->node : "") + 24;
    if ((paths[i] = kvm_malloc(len)))
        snprintf(paths[i], len, "%s%s%s@%d", up, *up ? "/" : "", steps[p]->node ? steps[p]->node : "", steps[p]->superstep);
    return paths[i];
}

/* Adds {key..., "text": text} to list; false when out of memory. */
static bool add_given(cJSON *list, cJSON *key, const char *text) {
    if (!key) return false;
    if (!cJSON_AddStringToObject(key, "text", text ? text : "") || !cJSON_AddItemToArray(list, key)) {
        cJSON_Delete(key);
        return false;
    }
    return true;
}

/* The edits a traced replay recorded (its run.start "replay"."edits"), checked; NULL when none. */
static int origin_edits(const char *run_dir, const char *replay_json, cJSON **out) {
    *out = NULL;
    if (!replay_json) return 0;
    cJSON *r = cJSON_Parse(replay_json);
    cJSON *e = r ? cJSON_DetachItemFromObjectCaseSensitive(r, "edits") : NULL;
    cJSON_Delete(r);
    if (!e) return 0;
    if (!cJSON_IsArray(e)) {
        cJSON_Delete(e);
        return kvm_seterr(KVM_EFORMAT, "%s: run.start replay.edits is not an array", run_dir);
    }
    for (const cJSON *x = e->child; x; x = x->next)
        if (!cJSON_IsObject(x) || key_int(x, "superstep") < 0 || key_int(x, "call") < 0 ||
            !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(x, "node")) ||
            !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(x, "text"))) {
            cJSON_Delete(e);
            return kvm_seterr(KVM_EFORMAT, "%s: run.start replay.edits holds an entry that is not a step and its text", run_dir);
        }
    *out = e;
    return 0;
}

/* Builds the replay of run_dir's trace (log) from step: the spec run_new records and submit_agent follows. */
static int build_spec(const char *run_dir, const kvm_trace_log_t *log, const kvm_trace_run_start_t *st, int step,
                      const char *output, uint64_t seed, int kv, cJSON **out) {
    *out = NULL;
    int n = 0;
    for (int from = 0; kvm_trace_log_next(log, KVM_TRACE_STEP, &from);) n++;
    if (step < 0 || step >= n)
        return kvm_seterr(KVM_ERANGE, "%s: step %d is out of range: the run has %d step%s (0..%d, as `kvmesh trace steps` "
                                      "numbers them)", run_dir, step, n, n == 1 ? "" : "s", n - 1);
    const kvm_trace_step_t **steps = kvm_calloc((size_t)n, sizeof *steps);
    int *calls = kvm_calloc((size_t)n, sizeof *calls), *pos = kvm_calloc((size_t)n, sizeof *pos);
    char **paths = kvm_calloc((size_t)n, sizeof *paths);
    if (!steps || !calls || !pos || !paths) {
        kvm_free(steps);
        kvm_free(calls);
        kvm_free(pos);
        kvm_free(paths);
        return kvm_seterr(KVM_ENOMEM, "replay: out of memory");
    }
    int k = 0;
    for (int from = 0; k < n;) {
        steps[k] = &kvm_trace_log_next(log, KVM_TRACE_STEP, &from)->step;
        pos[k++] = from - 1; /* its record's index in the log */
    }
    bool nomem = false;
    for (int i = 0; i < n; i++) nomem |= !step_path(steps, n, paths, i, 0);
    for (int i = 0; i < n && !nomem; i++) /* the k-th call of this agent in this node and super-step (of this subgraph's run) */
        for (int j = 0; j < i; j++)
            calls[i] += steps[j]->superstep == steps[i]->superstep && !strcmp(steps[j]->node ? steps[j]->node : "", steps[i]->node ? steps[i]->node : "") &&
                        !strcmp(steps[j]->agent ? steps[j]->agent : "", steps[i]->agent ? steps[i]->agent : "") && !strcmp(paths[i], paths[j]);
    const kvm_trace_step_t *t = steps[step];
    int rc = nomem ? kvm_seterr(KVM_ENOMEM, "replay: out of memory") : 0;
    if (!rc && output && !t->agent)
        rc = kvm_seterr(KVM_EINVAL, "%s: step %d is the %s node '%s': only an agent's output can be replaced (replay it without "
                                    "an output to run the node again)", run_dir, step, t->op ? t->op : "func", t->node ? t->node : "?");
    for (int i = 0; !rc && i < log->n; i++) /* answers to interrupts before the step would have to be given again */
        if (log->recs[i].type == KVM_TRACE_INTERRUPT &&
            (i < pos[step] || (!log->recs[i].interrupt.path && !t->depth && log->recs[i].interrupt.superstep <= t->superstep)))
            rc = kvm_seterr(KVM_EUNSUPPORTED, "%s: the run waited in kvmesh.interrupt at super-step %d, before step %d: a replay "
                                              "does not give interrupt answers again (resume it instead: kvmesh run --resume)",
                            run_dir, log->recs[i].interrupt.superstep, step);
    cJSON *edits = NULL, *spec = NULL, *pins = NULL, *target = NULL;
    if (!rc) rc = origin_edits(run_dir, st->replay_json, &edits);
    if (!rc) {
        spec = cJSON_CreateObject();
        pins = cJSON_CreateArray();
        target = step_key(paths[step], t->superstep, t->node, t->agent, calls[step]);
        if (!edits) edits = cJSON_CreateArray();
        if (!spec || !pins || !target || !edits) rc = kvm_seterr(KVM_ENOMEM, "replay: out of memory");
    }
    /* the origin's edits stay, but step N's own (it gets the new output, or is generated again) */
    for (cJSON *e = edits ? edits->child : NULL, *next; !rc && e; e = next) {
        next = e->next;
        if (same_key(e, target)) cJSON_Delete(cJSON_DetachItemViaPointer(edits, e));
    }
    if (!rc && output && !add_given(edits, cJSON_Duplicate(target, 1), output)) rc = kvm_seterr(KVM_ENOMEM, "replay: out of memory");
    /* the agent steps before step N give their recorded outputs (a failed one is generated again): those recorded
       before it, nested steps included (a super-step's steps are recorded after the previous super-step's) */
    for (int i = 0; !rc && i < step; i++) {
        const kvm_trace_step_t *s = steps[i];
        if (!s->agent || s->error.code || find_key(edits, paths[i], s->superstep, s->node, s->agent, calls[i])) continue;
        if (!add_given(pins, step_key(paths[i], s->superstep, s->node, s->agent, calls[i]), s->output_text))
            rc = kvm_seterr(KVM_ENOMEM, "replay: out of memory");
    }
    if (!rc && !output) { /* step N generated again */
        if (seed) cJSON_AddNumberToObject(target, "seed", (double)seed);
        if (kv >= 0) cJSON_AddStringToObject(target, "kv", kvm_kv_policy_name((kvm_kv_policy_t)kv));
    }
    if (!rc && (!cJSON_AddStringToObject(spec, "of", st->run_id ? st->run_id : "") || !cJSON_AddStringToObject(spec, "of_dir", run_dir) ||
                !cJSON_AddNumberToObject(spec, "from_step", step) || !cJSON_AddStringToObject(spec, "change", output ? "output" : "regenerate")))
        rc = kvm_seterr(KVM_ENOMEM, "replay: out of memory");
    if (!rc) {
        cJSON_AddItemToObject(spec, "step", target);
        cJSON_AddItemToObject(spec, "edits", edits);
        cJSON_AddItemToObject(spec, "pins", pins);
        target = edits = pins = NULL;
        *out = spec;
        spec = NULL;
    }
    cJSON_Delete(spec);
    cJSON_Delete(pins);
    cJSON_Delete(target);
    cJSON_Delete(edits);
    for (int i = 0; i < n; i++) kvm_free(paths[i]);
    kvm_free(paths);
    kvm_free(pos);
    kvm_free(steps);
    kvm_free(calls);
    return rc;
}

int kvm_wf_start_replay(kvm_workflow_t *wf, const char *run_dir, int step, const char *output, uint64_t seed, int kv, int *run) {
    if (!run_dir) return kvm_seterr(KVM_EINVAL, "replay: no trace directory given");
    if (kv != -1 && (kv < KVM_KV_PREFIX || kv > KVM_KV_KVCOMM))
        return kvm_seterr(KVM_EINVAL, "replay: the step's KV policy must be dense, prefix or kvcomm (got %d)", kv);
    kvm_trace_log_t log;
    int rc = kvm_trace_read(run_dir, &log);
    if (rc) return rc;
    const kvm_trace_rec_t *st = kvm_trace_log_next(&log, KVM_TRACE_RUN_START, NULL);
    cJSON *inputs = NULL, *spec = NULL;
    if (!st) rc = kvm_seterr(KVM_EFORMAT, "%s has no run.start record", run_dir);
    else if (st->run_start.resumed_run_id)
        rc = kvm_seterr(KVM_EUNSUPPORTED, "%s resumed run %s from a checkpoint: its trace does not hold the steps before it "
                                          "(replay run %s instead)", run_dir, st->run_start.resumed_run_id, st->run_start.resumed_run_id);
    else if (!(inputs = st->run_start.inputs_json ? cJSON_Parse(st->run_start.inputs_json) : cJSON_CreateObject()))
        rc = kvm_seterr(KVM_EFORMAT, "%s: run.start inputs are not JSON", run_dir);
    if (!rc) rc = build_spec(run_dir, &log, &st->run_start, step, output, seed, kv, &spec);
    int run_kv = -1;
    kvm_kv_policy_t p;
    if (!rc && st->run_start.kv_override && kvm_kv_policy_parse(st->run_start.kv_override, &p) == 0) run_kv = (int)p;
    if (!rc) {
        wf->next_replay = spec; /* run_new takes it */
        spec = NULL;
        rc = kvm_wf_start_kv(wf, inputs, st->run_start.seed, run_kv, run);
        cJSON_Delete(wf->next_replay); /* still here when the start failed before run_new */
        wf->next_replay = NULL;
        if (rc) rc = kvm_errctx(rc, "replaying %s from step %d", run_dir, step);
    }
    cJSON_Delete(spec);
    cJSON_Delete(inputs);
    kvm_trace_log_free(&log);
    return rc;
}

void wf_replay_apply(kvm_workflow_t *wf, wf_run_t *r, int node, int ai, const char **given, uint64_t *seed, kvm_kv_policy_t *kv) {
    *given = NULL;
    wf_run_t *root = r->root;
    if (!root->replay) return;
    const char *nname = r->g->nodes[node].name, *aname = wf->agents[ai].name;
    char name[1200], path[512];
    wf_run_path(r, path, sizeof path);
    snprintf(name, sizeof name, "%s|%d/%.200s/%.200s", path, r->superstep, nname, aname);
    if (!root->replay_calls) root->replay_calls = cJSON_CreateObject();
    cJSON *c = root->replay_calls ? cJSON_GetObjectItemCaseSensitive(root->replay_calls, name) : NULL;
    int call = c ? c->valueint : 0;
    if (c) cJSON_SetNumberValue(c, call + 1);
    else if (root->replay_calls) cJSON_AddNumberToObject(root->replay_calls, name, 1);
    const cJSON *e = find_key(cJSON_GetObjectItemCaseSensitive(root->replay, "edits"), path, r->superstep, nname, aname, call);
    if (!e) e = find_key(cJSON_GetObjectItemCaseSensitive(root->replay, "pins"), path, r->superstep, nname, aname, call);
    if (e) {
        *given = key_str(e, "text");
        return;
    }
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(root->replay, "step");
    if (!t || !key_is(t, path, r->superstep, nname, aname, call)) return;
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(t, "seed"), *k = cJSON_GetObjectItemCaseSensitive(t, "kv");
    if (cJSON_IsNumber(s) && s->valuedouble > 0) *seed = (uint64_t)s->valuedouble;
    kvm_kv_policy_t p;
    if (cJSON_IsString(k) && kvm_kv_policy_parse(k->valuestring, &p) == 0) *kv = p;
}

char *wf_replay_json(const wf_run_t *r) {
    if (!r->replay) return NULL;
    cJSON *copy = cJSON_Duplicate(r->replay, 1);
    if (!copy) return NULL;
    cJSON_DeleteItemFromObjectCaseSensitive(copy, "pins"); /* the recorded outputs: in the steps already */
    char *s = cJSON_PrintUnformatted(copy);
    cJSON_Delete(copy);
    return s;
}
