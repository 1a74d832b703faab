/* trace_failure.c - a run's trace read as a failure for blame (include/kvmesh.h kvm_failure_from_trace): step 0
 * is the task (the run's inputs), then one step per traced step, in the order they were written. */
#include <string.h>

#include "../core/core.h"
#include "../core/sb.h"
#include "trace.h"

/* The failure and every string it points to, in one allocation owner. */
typedef struct owned_failure {
    kvm_failure_t f;       /* first: kvm_failure_free casts back */
    kvm_failure_step_t *steps;
    char **strs;
    int n_strs;
} owned_failure_t;

void kvm_failure_free(kvm_failure_t *f) {
    owned_failure_t *o = (owned_failure_t *)f;
    if (!o) return;
    for (int i = 0; i < o->n_strs; i++) kvm_free(o->strs[i]);
    kvm_free(o->strs);
    kvm_free(o->steps);
    kvm_free(o);
}

/* A copy of s kept by o (NULL when s is NULL or out of memory: *rc set). */
static const char *keep(owned_failure_t *o, const char *s, int *rc) {
    if (!s) return NULL;
    char *c = kvm_strdup(s);
    if (!c) {
        *rc = KVM_ENOMEM;
        return NULL;
    }
    o->strs[o->n_strs++] = c;
    return c;
}

kvm_failure_t *kvm_failure_from_trace(const char *run_dir) {
    if (!run_dir) {
        kvm_seterr(KVM_EINVAL, "blame: no run directory");
        return NULL;
    }
    kvm_trace_log_t log = {0};
    if (kvm_trace_read(run_dir, &log)) return NULL;
    const kvm_trace_rec_t *st = kvm_trace_log_next(&log, KVM_TRACE_RUN_START, NULL);
    if (!st) {
        kvm_trace_log_free(&log);
        kvm_seterr(KVM_EFORMAT, "%s: the trace has no run.start record", run_dir);
        return NULL;
    }
    int n = 1;
    for (int from = 0; kvm_trace_log_next(&log, KVM_TRACE_STEP, &from);) n++;
    owned_failure_t *o = kvm_calloc(1, sizeof *o);
    int rc = o ? 0 : KVM_ENOMEM;
    if (o) {
        o->steps = kvm_calloc((size_t)n, sizeof *o->steps);
        o->strs = kvm_calloc((size_t)(3 * n + 4), sizeof *o->strs);
        if (!o->steps || !o->strs) rc = KVM_ENOMEM;
    }
    if (!rc) {
        const char *in = st->run_start.inputs_json ? st->run_start.inputs_json : "{}";
        o->f.id = keep(o, st->run_start.run_id ? st->run_start.run_id : "", &rc);
        o->f.question = keep(o, in, &rc);
        o->f.gold_step = -1;
        o->steps[0] = (kvm_failure_step_t){.agent = "user", .content = o->f.question};
    }
    int k = 1;
    for (int from = 0; !rc && k < n; k++) {
        const kvm_trace_step_t *s = &kvm_trace_log_next(&log, KVM_TRACE_STEP, &from)->step;
        kvm_failure_step_t *fs = &o->steps[k];
        fs->agent = keep(o, s->agent ? s->agent : s->node ? s->node : "?", &rc);
        fs->tool_result = s->agent == NULL;
        fs->error = s->error.code != 0;
        if (fs->error) {
            kvm_sb_t b = KVM_SB_INIT;
            kvm_sb_printf(&b, "%s%s%s", s->error.message ? s->error.message : "error", s->error.traceback ? "\n" : "",
                          s->error.traceback ? s->error.traceback : "");
            fs->content = keep(o, b.s ? b.s : "error", &rc);
            kvm_sb_free(&b);
        } else fs->content = keep(o, s->agent ? s->output_text : s->output_json, &rc);
        if (!fs->content) fs->content = "";
    }
    kvm_trace_log_free(&log);
    if (rc) {
        kvm_failure_free(o ? &o->f : NULL);
        kvm_seterr(rc, "out of memory reading %s as a failure", run_dir);
        return NULL;
    }
    o->f.steps = o->steps;
    o->f.n_steps = n;
    return &o->f;
}
