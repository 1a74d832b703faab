/* wf_replay.c - re-runs a traced run from its trace alone and compares every agent output with the
 * traced one (kvm_wf_replay in wf.h; `kvmesh trace replay` prints the result). */
#include "wf_internal.h"

#include <stdio.h>
#include <string.h>

/* A traced step that replay compares: an agent node's own call that succeeded. */
static bool compared(const kvm_trace_step_t *s) { return s->agent && !s->via && s->error.code == 0; }

/* The want-th message (0-based) of node in the replayed run's state.msgs; NULL if none. */
static const char *nth_message(const cJSON *msgs, const char *node, int want) {
    const cJSON *m;
    int seen = 0;
    cJSON_ArrayForEach(m, msgs) {
        const cJSON *n = cJSON_GetObjectItemCaseSensitive(m, "node"), *t = cJSON_GetObjectItemCaseSensitive(m, "text");
        if (cJSON_IsString(n) && !strcmp(n->valuestring, node) && seen++ == want) return cJSON_IsString(t) ? t->valuestring : NULL;
    }
    return NULL;
}

/* Compares the traced agent-node steps with the replayed run's messages, in order per node. */
static int compare(const kvm_trace_log_t *log, const cJSON *msgs, kvm_wf_replay_t *out) {
    int n = 0, from = 0;
    for (const kvm_trace_rec_t *rec; (rec = kvm_trace_log_next(log, KVM_TRACE_STEP, &from)) != NULL;) n += compared(&rec->step);
    out->steps = kvm_calloc((size_t)n + 1, sizeof *out->steps);
    if (!out->steps) return kvm_seterr(KVM_ENOMEM, "replay: out of memory");
    from = 0;
    for (const kvm_trace_rec_t *rec; (rec = kvm_trace_log_next(log, KVM_TRACE_STEP, &from)) != NULL;) {
        const kvm_trace_step_t *s = &rec->step;
        if (!compared(s)) continue;
        int want = 0; /* this is the want-th compared step of its node in the trace */
        for (int k = 0; k < out->n_steps; k++) want += !strcmp(out->steps[k].node, s->node);
        const char *now = nth_message(msgs, s->node, want), *was = s->output_text ? s->output_text : "";
        kvm_wf_replay_step_t *st = &out->steps[out->n_steps++];
        st->idx = s->idx;
        st->node = kvm_strdup(s->node);
        st->was = kvm_strdup(was);
        st->now = now ? kvm_strdup(now) : NULL;
        st->same = now && !strcmp(now, was);
        if (!st->node || !st->was || (now && !st->now)) return kvm_seterr(KVM_ENOMEM, "replay: out of memory");
        out->same += st->same;
        out->differ += !st->same;
    }
    return 0;
}

/* The workflow options a traced run ran with (the log must outlive the workflow: strings point into it). */
static kvm_wf_opts_t traced_opts(const kvm_trace_run_start_t *s, const kvm_wf_replay_opts_t *o) {
    kvm_wf_opts_t w = {0};
    w.kv_override = s->kv_override;
    w.mock = (o && o->mock) || s->mock;
    w.model_override = o ? o->model_override : NULL;
    w.llm.quiet = true;
    if (s->limits.instructions > 0) w.max_instructions = (uint64_t)s->limits.instructions;
    if (s->limits.lua_ms > 0) w.lua_cpu_ms = s->limits.lua_ms;
    if (s->limits.memory_bytes > 0) w.run_mem_cap_bytes = (size_t)s->limits.memory_bytes;
    return w;
}

int kvm_wf_replay(const char *run_dir, const kvm_wf_replay_opts_t *o, kvm_wf_replay_t *out) {
    memset(out, 0, sizeof *out);
    kvm_trace_log_t log;
    int rc = kvm_trace_read(run_dir, &log);
    if (rc) return rc;
    const kvm_trace_rec_t *st = kvm_trace_log_next(&log, KVM_TRACE_RUN_START, NULL);
    const kvm_trace_rec_t *end = kvm_trace_log_next(&log, KVM_TRACE_RUN_END, NULL);
    if (!st || !st->run_start.source) {
        kvm_trace_log_free(&log);
        return kvm_seterr(KVM_EFORMAT, "%s has no run.start record with the script's source", run_dir);
    }
    const kvm_trace_run_start_t *s = &st->run_start;
    snprintf(out->run_id, sizeof out->run_id, "%s", s->run_id ? s->run_id : "");
    out->trace_ended = end != NULL;
    out->trace_status = end ? end->run_end.error.code : 0;
    kvm_wf_opts_t wo = traced_opts(s, o);
    cJSON *inputs = s->inputs_json ? cJSON_Parse(s->inputs_json) : NULL;
    kvm_workflow_t *wf = kvm_wf_load_string(s->workflow_path ? s->workflow_path : "replay.lua", s->source, strlen(s->source), &wo);
    int run = 0;
    if (!wf) rc = kvm_errcode() ? kvm_errcode() : KVM_EINVAL;
    else if ((rc = kvm_wf_start(wf, inputs, s->seed, &run)) == 0 && (rc = kvm_wf_drive(wf)) == 0) {
        out->status = kvm_wf_run_status(wf, run, NULL);
        rc = compare(&log, cJSON_GetObjectItemCaseSensitive(kvm_wf_run_state(wf, run), "msgs"), out);
    }
    char msg[1024] = "";
    if (rc) snprintf(msg, sizeof msg, "%s", kvm_errmsg());
    kvm_wf_free(wf);
    cJSON_Delete(inputs);
    kvm_trace_log_free(&log);
    if (rc) {
        kvm_wf_replay_free(out);
        kvm_seterr(rc, "%s", msg);
    }
    return rc;
}

void kvm_wf_replay_free(kvm_wf_replay_t *r) {
    if (!r) return;
    for (int i = 0; i < r->n_steps; i++) {
        kvm_free(r->steps[i].node);
        kvm_free(r->steps[i].was);
        kvm_free(r->steps[i].now);
    }
    kvm_free(r->steps);
    memset(r, 0, sizeof *r);
}
