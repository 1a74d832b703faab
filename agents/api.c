/* api.c - the public runtime, workflow and run API of include/kvmesh.h over the agents layer (wf.h,
 * llm.h). A runtime holds one engine (models, their KV stores, schedulers and KVCOMM anchor pools) that
 * every workflow loaded into it borrows, so what the engine learns (anchors, the prefix index) lives
 * across workflows and runs. Run handles are small records owned by their workflow. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#include "../runtime/comm/prompt.h"
#include "../runtime/core/json.h"
#include "../runtime/core/map.h"
#include "../runtime/model/mock_model.h"
#include "llm.h"
#include "wf.h"
#include "wf_internal.h"

/* ---- KV policies ---------------------------------------------------------------------------------- */

const char *kvm_kv_policy_name(kvm_kv_policy_t p) {
    switch (p) {
    case KVM_KV_DENSE: return "dense";
    case KVM_KV_PREFIX: return "prefix";
    case KVM_KV_KVCOMM: return "kvcomm";
    }
    return "?";
}

int kvm_kv_policy_parse(const char *name, kvm_kv_policy_t *out) {
    static const kvm_kv_policy_t all[] = {KVM_KV_PREFIX, KVM_KV_DENSE, KVM_KV_KVCOMM};
    for (size_t i = 0; name && i < sizeof all / sizeof *all; i++)
        if (!strcmp(name, kvm_kv_policy_name(all[i]))) {
            *out = all[i];
            return 0;
        }
    return kvm_seterr(KVM_EINVAL, "kv policy '%s' is not one of dense, prefix, kvcomm", name ? name : "(null)");
}

/* ---- runtime ---------------------------------------------------------------------------------------- */

struct kvm_runtime {
    kvm_runtime_params_t p;   /* the parameters, every string pointing into strs */
    char **strs;              /* owned copies of the parameters' strings */
    int n_strs;
    const char **kvcomm;      /* [n_kvcomm] into strs */
    wf_llm_t *engine;
    int n_workflows;          /* loaded and not yet freed */
    kvm_workflow_t **wfs;     /* [n_workflows]: the ones loaded, for kvm_runtime_step */
    uint64_t wf_serial;       /* numbers workflows: the high bits of their engine tags (tag >> WF_TAG_SHIFT) */
    kvm_map_t watched;        /* run id -> kvm_run_t * of runs with an event callback that have not ended */
    wf_host_fn_t **fns;       /* kvm_runtime_add_function; each entry its own allocation, so that the scripts of
                                 loaded workflows keep valid pointers as more are added */
    int n_fns;
    wf_tools_t tools;         /* kvm_runtime_add_tool */
    kvm_schema_cache_t *schemas; /* the error-schema cache (kvm_runtime_schema_cache), opened on first use */
    struct gen_job *gens;     /* kvm_runtime_generate's jobs not yet ended, [n_gens] */
    int n_gens, cap_gens;
    uint64_t gen_serial;
    kvm_model_t *judge;          /* p.judge_model, loaded on first use (kvm_runtime_judge) */
};

/* A generation job (kvm_runtime_generate): an engine step of its own pseudo-run "gen-<id>", tagged GEN_TAG | id. */
typedef struct gen_job {
    uint64_t id;
    kvm_gen_event_fn fn;
    void *ud;
    char run_id[32];
    int cancel_code;          /* kvm_runtime_generate_cancel's code (0: not canceled) */
    char *cancel_msg;
} gen_job_t;

#define GEN_TAG (1ull << 63)

kvm_runtime_params_t kvm_runtime_default_params(void) {
    return (kvm_runtime_params_t){.model = kvm_model_default_params(), .kv_override = -1, .echo_print = true};
}

/* Copies *s into the runtime's string list (NULL stays NULL). */
static int keep_str(kvm_runtime_t *rt, const char **s) {
    if (!*s) return 0;
    char **n = kvm_realloc(rt->strs, (size_t)(rt->n_strs + 1) * sizeof *n);
    if (!n) return KVM_ENOMEM;
    rt->strs = n;
    if (!(n[rt->n_strs] = kvm_strdup(*s))) return KVM_ENOMEM;
    *s = n[rt->n_strs++];
    return 0;
}

static int runtime_check(const kvm_runtime_params_t *p) {
    int rc = kvm_model_params_check(&p->model);
    if (rc) return kvm_errctx(rc, "runtime parameter model");
    if (p->kv_override != -1 && (p->kv_override < KVM_KV_PREFIX || p->kv_override > KVM_KV_KVCOMM))
        return kvm_seterr(KVM_EINVAL, "runtime parameter kv_override: %d is not -1 or a kvm_kv_policy_t", p->kv_override);
    if (p->max_batch_tokens < 0 || p->max_active < 0 || p->n_kvcomm < 0 || (p->n_kvcomm > 0 && !p->kvcomm))
        return kvm_seterr(KVM_EINVAL, "runtime parameters: max_batch_tokens, max_active and n_kvcomm must be >= 0 "
                          "(and kvcomm set when n_kvcomm > 0)");
    if (p->state_dir && !*p->state_dir) return kvm_seterr(KVM_EINVAL, "runtime parameter state_dir: empty (NULL = none)");
    if (p->judge_model && !*p->judge_model) return kvm_seterr(KVM_EINVAL, "runtime parameter judge_model: empty (NULL = none)");
    if (p->run_lua_ms < 0) return kvm_seterr(KVM_EINVAL, "runtime parameter run_lua_ms: %g is negative", p->run_lua_ms);
    if (!(p->kv_wait_ms >= 0)) return kvm_seterr(KVM_EINVAL, "runtime parameter kv_wait_ms: %g is not >= 0", p->kv_wait_ms);
    /* the KVCOMM settings are applied to every model the engine opens: check them now, on a scratch config */
    kvm_kvcomm_config_t scratch;
    kvm_kvcomm_config_default(&scratch);
    for (int i = 0; i < p->n_kvcomm; i++) {
        const char *kv = p->kvcomm[i], *eq = kv ? strchr(kv, '=') : NULL;
        if (!eq) return kvm_seterr(KVM_EINVAL, "runtime parameter kvcomm[%d]: '%s' is not KEY=VALUE", i, kv ? kv : "(null)");
        char key[128];
        snprintf(key, sizeof key, "%.*s", (int)(eq - kv), kv);
        rc = kvm_kvcomm_config_set(&scratch, key, eq + 1);
        if (rc) return kvm_errctx(rc, "runtime parameter kvcomm[%d]", i);
    }
    return 0;
}

static int runtime_keep_strings(kvm_runtime_t *rt) {
    kvm_runtime_params_t *p = &rt->p;
    const char **fields[] = {&p->model.backend, &p->model.tokenizer_path, &p->model.weight_dtype, &p->model.kv_dtype,
                             &p->trace_root, &p->model_override, &p->state_dir, &p->judge_model};
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++)
        if (keep_str(rt, fields[i])) return KVM_ENOMEM;
    if (p->n_kvcomm > 0) {
        rt->kvcomm = kvm_calloc((size_t)p->n_kvcomm, sizeof *rt->kvcomm);
        if (!rt->kvcomm) return KVM_ENOMEM;
        for (int i = 0; i < p->n_kvcomm; i++) {
            rt->kvcomm[i] = p->kvcomm[i];
            if (keep_str(rt, &rt->kvcomm[i])) return KVM_ENOMEM;
        }
    }
    p->kvcomm = rt->kvcomm;
    return 0;
}

static int on_token(void *ud, uint64_t tag, const char *run_id, const char *agent, int32_t id, const char *text, size_t len);

/* The state folder (docs/state.md): made if missing (with its parents; the folder itself 0700: it holds what was
 * learned from the prompts), and it must be a folder. */
static int state_dir_check(const char *dir) {
    bool made = !kvm_dir_exists(dir);
    int rc = made ? kvm_mkdirs(dir) : 0;
    if (rc) return kvm_errctx(rc, "runtime parameter state_dir");
    if (!kvm_dir_exists(dir)) return kvm_seterr(KVM_EINVAL, "runtime parameter state_dir: %s is not a folder", dir);
    if (made) chmod(dir, 0700);
    return 0;
}

kvm_runtime_t *kvm_runtime_create(const kvm_runtime_params_t *params) {
    const kvm_runtime_params_t def = kvm_runtime_default_params();
    if (!params) params = &def;
    if (runtime_check(params)) return NULL;
    kvm_runtime_t *rt = kvm_calloc(1, sizeof *rt);
    if (!rt) return NULL;
    rt->p = *params;
    kvm_map_init(&rt->watched, KVM_MAP_STR);
    int rc = runtime_keep_strings(rt);
    if (!rc && rt->p.state_dir) rc = state_dir_check(rt->p.state_dir);
    if (!rc) {
        wf_llm_opts_t lo = {.model = rt->p.model, .max_rows = rt->p.max_batch_tokens, .max_active = rt->p.max_active,
                            .kv_bytes = rt->p.kv_budget_bytes, .quiet = rt->p.quiet,
                            .kvcomm_set = rt->kvcomm, .n_kvcomm_set = rt->p.n_kvcomm, .state_dir = rt->p.state_dir,
                            .on_token = on_token, .on_token_ud = rt, .kv_wait_ms = rt->p.kv_wait_ms};
        if (!(rt->engine = wf_llm_create(&lo))) rc = kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    }
    if (rc) {
        if (rc == KVM_ENOMEM) kvm_seterr(rc, "out of memory creating a runtime");
        kvm_runtime_free(rt);
        return NULL;
    }
    return rt;
}

int kvm_runtime_save_state(kvm_runtime_t *rt) {
    if (!rt) return kvm_seterr(KVM_EINVAL, "save state: no runtime");
    int rc = wf_llm_save_state(rt->engine);
    int rc2 = rt->schemas ? kvm_schema_cache_save(rt->schemas) : 0;
    return rc ? rc : rc2;
}

kvm_schema_cache_t *kvm_runtime_schema_cache(kvm_runtime_t *rt) {
    if (!rt) {
        kvm_seterr(KVM_EINVAL, "schema cache: no runtime");
        return NULL;
    }
    if (!rt->schemas) rt->schemas = kvm_schema_cache_open(rt->p.state_dir, NULL);
    return rt->schemas;
}

kvm_model_t *kvm_runtime_judge(kvm_runtime_t *rt) {
    kvm_errclear();
    if (!rt || !rt->p.judge_model) return NULL;
    if (!rt->judge) {
        kvm_account_t *acct = kvm_account_enter(NULL); /* the runtime's, whoever asks */
        rt->judge = kvm_model_load(rt->p.judge_model, &rt->p.model);
        kvm_account_enter(acct);
        if (!rt->judge) kvm_errctx(kvm_errcode() ? kvm_errcode() : KVM_EIO, "runtime parameter judge_model '%s'", rt->p.judge_model);
    }
    return rt->judge;
}

void kvm_runtime_free(kvm_runtime_t *rt) {
    if (!rt) return;
    KVM_ASSERT(rt->n_workflows == 0); /* free every workflow first */
    if (rt->schemas && kvm_schema_cache_save(rt->schemas))
        kvm_log(KVM_LOG_WARN, "runtime: saving the schema cache failed: %s", kvm_errmsg());
    kvm_schema_cache_free(rt->schemas);
    kvm_model_free(rt->judge);
    wf_llm_free(rt->engine);
    for (int i = 0; i < rt->n_gens; i++) kvm_free(rt->gens[i].cancel_msg);
    kvm_free(rt->gens);
    kvm_free(rt->wfs);
    kvm_map_free(&rt->watched);
    for (int i = 0; i < rt->n_fns; i++) {
        kvm_free(rt->fns[i]->name);
        kvm_free(rt->fns[i]);
    }
    kvm_free(rt->fns);
    wf_tools_clear(&rt->tools);
    for (int i = 0; i < rt->n_strs; i++) kvm_free(rt->strs[i]);
    kvm_free(rt->strs);
    kvm_free(rt->kvcomm);
    kvm_free(rt);
}

/* Names the Lua API keeps for itself (kvmesh.<name> and the first segment of a dotted name). */
static bool builtin_name(const char *seg, size_t n) {
    static const char *const names[] = {"model", "agent", "graph", "json", "START", "END", "version", "reduce", "now_ms",
                                        "tool", "interrupt", "blame", NULL};
    for (int i = 0; names[i]; i++)
        if (strlen(names[i]) == n && !strncmp(names[i], seg, n)) return true;
    return false;
}

static int check_fn_name(const kvm_runtime_t *rt, const char *name) {
    size_t seg = 0;
    bool ok = name && *name;
    for (const char *c = name; ok && *c; c++) {
        if (*c == '.') ok = seg > 0, seg = 0;
        else ok = (*c == '_' || (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (seg > 0 && *c >= '0' && *c <= '9')),
             seg++;
    }
    if (!ok || seg == 0)
        return kvm_seterr(KVM_EINVAL, "host function name '%s': segments of letters, digits and '_' (not starting with a "
                          "digit) joined by '.'", name ? name : "(null)");
    if (builtin_name(name, strcspn(name, ".")))
        return kvm_seterr(KVM_EINVAL, "host function name '%s': kvmesh.%.*s is a built-in of the Lua API", name,
                          (int)strcspn(name, "."), name);
    for (int i = 0; i < rt->n_fns; i++) {
        const char *old = rt->fns[i]->name;
        size_t a = strlen(old), b = strlen(name), k = a < b ? a : b;
        /* "x" and "x.y" cannot both exist: one would be a function, the other a table */
        if (!strncmp(old, name, k) && (a == b || (a > b ? old[k] : name[k]) == '.'))
            return kvm_seterr(KVM_EINVAL, "host function name '%s': clashes with '%s', registered before", name, old);
    }
    return 0;
}

int kvm_runtime_add_function(kvm_runtime_t *rt, const char *name, kvm_host_fn fn, void *ud) {
    if (!rt || !fn) return kvm_seterr(KVM_EINVAL, "kvm_runtime_add_function needs a runtime and a function");
    int rc = check_fn_name(rt, name);
    if (rc) return rc;
    wf_host_fn_t **n = kvm_realloc(rt->fns, (size_t)(rt->n_fns + 1) * sizeof *n);
    if (!n) return KVM_ENOMEM;
    rt->fns = n;
    wf_host_fn_t *h = kvm_malloc(sizeof *h);
    char *copy = kvm_strdup(name);
    if (!h || !copy) {
        kvm_free(h);
        kvm_free(copy);
        return KVM_ENOMEM;
    }
    *h = (wf_host_fn_t){.name = copy, .fn = fn, .ud = ud};
    n[rt->n_fns++] = h;
    return 0;
}

int kvm_runtime_add_tool(kvm_runtime_t *rt, const char *name, const char *description, const char *schema_json,
                         kvm_tool_fn fn, void *ud) {
    if (!rt) return kvm_seterr(KVM_EINVAL, "kvm_runtime_add_tool needs a runtime");
    return wf_tools_add(&rt->tools, name, description, schema_json, fn, ud);
}

int kvm_runtime_remove_tool(kvm_runtime_t *rt, const char *name) {
    if (!rt || !name) return kvm_seterr(KVM_EINVAL, "kvm_runtime_remove_tool needs a runtime and a name");
    return wf_tools_remove(&rt->tools, name);
}

/* j as compact JSON text in memory the caller frees with kvm_free; NULL + message naming what. */
static char *json_text(const cJSON *j, const char *what) {
    if (!j) {
        kvm_seterr(KVM_EBUSY, "no %s yet", what);
        return NULL;
    }
    char *s = cJSON_PrintUnformatted(j);
    char *out = s ? kvm_strdup(s) : NULL;
    cJSON_free(s);
    if (!out) kvm_seterr(KVM_ENOMEM, "out of memory writing the %s as JSON", what);
    return out;
}

char *kvm_runtime_stats_json(const kvm_runtime_t *rt) {
    cJSON *o = wf_llm_stats_json(rt->engine);
    char *s = o ? json_text(o, "runtime statistics") : NULL;
    cJSON_Delete(o);
    return s;
}

/* ---- workflows ---------------------------------------------------------------------------------------- */

struct kvm_run {
    kvm_workflow_t *wf;
    int idx;
    kvm_run_event_fn on_event; /* NULL = none */
    void *event_ud;
    bool watched;              /* in rt->watched until its end event */
    bool told_parked;          /* its KVM_RUN_INTERRUPT event went out for the park going on */
};

/* Engine tags are (workflow serial << WF_TAG_SHIFT) + the workflow's job number: kvm_runtime_step hands each
 * result to its workflow. */
#define WF_TAG_SHIFT 40

struct wf_api {
    kvm_runtime_t *rt;
    uint64_t serial;
    kvm_workflow_params_t p;
    kvm_run_t **runs;        /* [n_runs] handles, index = run index */
    int n_runs;
};

kvm_workflow_params_t kvm_workflow_default_params(void) { return (kvm_workflow_params_t){0}; }

/* The handle of run idx, made on first use (runs started inside the library, e.g. by a dataset batch,
 * get theirs here). NULL on allocation failure. */
static kvm_run_t *run_handle(kvm_workflow_t *wf, int idx) {
    struct wf_api *a = wf->api;
    if (idx < 0 || idx >= kvm_wf_n_runs(wf)) return NULL;
    if (idx >= a->n_runs) {
        kvm_run_t **n = kvm_realloc(a->runs, (size_t)kvm_wf_n_runs(wf) * sizeof *n);
        if (!n) return NULL;
        memset(n + a->n_runs, 0, (size_t)(kvm_wf_n_runs(wf) - a->n_runs) * sizeof *n);
        a->runs = n;
        a->n_runs = kvm_wf_n_runs(wf);
    }
    if (!a->runs[idx]) {
        a->runs[idx] = kvm_malloc(sizeof **a->runs);
        if (!a->runs[idx]) return NULL;
        *a->runs[idx] = (kvm_run_t){.wf = wf, .idx = idx};
    }
    return a->runs[idx];
}

static void on_step(void *ud, const kvm_wf_step_info_t *s) {
    kvm_workflow_t *wf = ud;
    if (!wf || !wf->api) return;
    kvm_run_t *r = run_handle(wf, s->run);
    if (!wf->api->p.on_step && !(r && r->on_event)) return;
    kvm_step_event_t e = {.run = r, .run_id = s->run_id, .superstep = s->superstep, .node = s->node,
                          .agent = s->agent, .op = s->op, .status = s->status, .error = s->error,
                          .tokens_in = s->tokens_in, .tokens_out = s->tokens_out, .tokens_reused = s->reused,
                          .ttft_ms = s->ttft_ms, .decode_ms = s->decode_ms, .text = s->text, .queue_ms = s->queue_ms};
    if (s->kv) {
        e.kv_exact = s->kv->exact;
        e.kv_offset = s->kv->offset;
        e.kv_naive = s->kv->naive;
        e.kv_recomputed = s->kv->recomputed;
        e.kv_fused = s->kv->fused;
        e.kv_anchors = s->kv->anchors;
        e.kv_mode = s->kv->mode;
    }
    if (wf->api->p.on_step) wf->api->p.on_step(wf->api->p.ud, &e);
    if (r && r->on_event) r->on_event(r->event_ud, &(kvm_run_event_t){.kind = KVM_RUN_STEP, .run = r, .run_id = s->run_id,
                                                                          .agent = s->agent, .step = &e});
}

/* Whether the runtime's model_override is the mock model. */
static bool runtime_mock(const kvm_runtime_t *rt) {
    return rt->p.model_override && !strcmp(rt->p.model_override, "mock:echo");
}

static kvm_workflow_t *workflow_load(kvm_runtime_t *rt, const char *path, const char *name, const char *src, size_t len,
                                     const kvm_workflow_params_t *params) {
    if (!rt) {
        kvm_seterr(KVM_EINVAL, "no runtime given to load workflow '%s' into", path ? path : name);
        return NULL;
    }
    struct wf_api *a = kvm_calloc(1, sizeof *a);
    if (!a) return NULL;
    a->rt = rt;
    a->p = params ? *params : kvm_workflow_default_params();
    const kvm_runtime_params_t *p = &rt->p;
    bool mock = runtime_mock(rt);
    kvm_wf_opts_t o = {
        .kv_override = p->kv_override >= 0 ? kvm_kv_policy_name((kvm_kv_policy_t)p->kv_override) : NULL,
        .mock = mock, .model_override = mock ? NULL : p->model_override, .trace_root = p->trace_root,
        .mem_cap_bytes = p->lua_mem_bytes, .run_mem_cap_bytes = p->run_mem_bytes,
        .max_instructions = p->run_instructions, .lua_cpu_ms = p->run_lua_ms, .engine = rt->engine,
        .host_fns = rt->fns, .n_host_fns = rt->n_fns, .tools = &rt->tools,
        .on_step = on_step, .ud = NULL, .echo_print = p->echo_print};
    kvm_workflow_t *wf = path ? kvm_wf_load(path, &o) : kvm_wf_load_string(name, src, len, &o);
    if (!wf) {
        kvm_free(a);
        return NULL;
    }
    kvm_workflow_t **n = kvm_realloc(rt->wfs, (size_t)(rt->n_workflows + 1) * sizeof *n);
    if (!n) {
        kvm_free(a);
        kvm_wf_free(wf);
        kvm_seterr(KVM_ENOMEM, "out of memory loading workflow '%s'", path ? path : name);
        return NULL;
    }
    rt->wfs = n;
    wf->o.ud = wf; /* the step callback finds the handles through the workflow */
    wf->api = a;
    a->serial = ++rt->wf_serial;
    wf->job_serial = a->serial << WF_TAG_SHIFT; /* engine tags unique across the runtime's workflows */
    rt->wfs[rt->n_workflows++] = wf;
    return wf;
}

kvm_workflow_t *kvm_workflow_load(kvm_runtime_t *rt, const char *path, const kvm_workflow_params_t *params) {
    if (!path) {
        kvm_seterr(KVM_EINVAL, "no workflow path given");
        return NULL;
    }
    return workflow_load(rt, path, NULL, NULL, 0, params);
}

kvm_workflow_t *kvm_workflow_load_string(kvm_runtime_t *rt, const char *name, const char *source, size_t len,
                                         const kvm_workflow_params_t *params) {
    if (!source) {
        kvm_seterr(KVM_EINVAL, "no workflow source given");
        return NULL;
    }
    return workflow_load(rt, NULL, name ? name : "workflow", source, len, params);
}

void kvm_workflow_free(kvm_workflow_t *wf) {
    if (!wf) return;
    struct wf_api *a = wf->api;
    if (a) {
        kvm_runtime_t *rt = a->rt;
        /* runs still going end canceled (their engine steps stop, their KV and staged anchors go) */
        for (int i = 0; i < kvm_wf_n_runs(wf); i++) {
            const char *node = NULL;
            if (kvm_wf_run_parked(wf, i, &node, NULL)) { /* its trace keeps the interrupt: a resume with an answer goes on */
                char msg[512];
                snprintf(msg, sizeof msg, "parked in kvmesh.interrupt (node '%.200s') when its workflow was freed: resume it "
                                          "from its trace with an answer", node);
                kvm_wf_run_cancel(wf, i, KVM_EINTERRUPTED, msg);
            } else if (kvm_wf_run_status(wf, i, NULL) == KVM_EBUSY)
                kvm_wf_run_cancel(wf, i, KVM_ECANCELED, "its workflow was freed");
        }
        for (int i = 0; i < a->n_runs; i++) {
            if (a->runs[i] && a->runs[i]->watched) kvm_map_remove_str(&rt->watched, kvm_wf_run_id(wf, i), NULL);
            kvm_free(a->runs[i]);
        }
        kvm_free(a->runs);
        for (int i = 0; i < rt->n_workflows; i++)
            if (rt->wfs[i] == wf) rt->wfs[i] = rt->wfs[--rt->n_workflows];
        kvm_free(a);
        wf->api = NULL;
    }
    kvm_wf_free(wf);
}

kvm_workflow_t *kvm_workflow_load_trace(kvm_runtime_t *rt, const char *run_dir, const kvm_workflow_params_t *params) {
    if (!run_dir) {
        kvm_seterr(KVM_EINVAL, "no trace directory given");
        return NULL;
    }
    kvm_trace_log_t log;
    if (kvm_trace_read(run_dir, &log) != 0) return NULL;
    const kvm_trace_rec_t *st = kvm_trace_log_next(&log, KVM_TRACE_RUN_START, NULL);
    kvm_workflow_t *wf = NULL;
    if (!st || !st->run_start.source) kvm_seterr(KVM_EFORMAT, "%s has no run.start record with the script's source", run_dir);
    else
        wf = workflow_load(rt, NULL, st->run_start.workflow_path ? st->run_start.workflow_path : "resume.lua", st->run_start.source,
                           strlen(st->run_start.source), params);
    kvm_trace_log_free(&log);
    return wf;
}

const char *kvm_workflow_name(const kvm_workflow_t *wf) { return kvm_wf_name(wf); }
bool kvm_workflow_has_dataset(const kvm_workflow_t *wf) { return kvm_wf_has_dataset(wf); }
bool kvm_workflow_has_score(const kvm_workflow_t *wf) { return kvm_wf_has_score(wf); }
int kvm_workflow_drive(kvm_workflow_t *wf) {
    if (!wf || !wf->api) return kvm_seterr(KVM_EINVAL, "kvm_workflow_drive: no workflow");
    while (kvm_wf_n_active(wf) > 0) {
        int rc = kvm_runtime_step(wf->api->rt);
        if (rc < 0) return rc;
    }
    lua_gc(wf->L, LUA_GCCOLLECT);
    return 0;
}
int kvm_workflow_n_runs(const kvm_workflow_t *wf) { return kvm_wf_n_runs(wf); }
kvm_run_t *kvm_workflow_run(kvm_workflow_t *wf, int i) { return run_handle(wf, i); }
int kvm_workflow_n_agents(const kvm_workflow_t *wf) { return kvm_wf_n_agents(wf); }

int kvm_workflow_agent_stats(const kvm_workflow_t *wf, int i, kvm_agent_stats_t *out) {
    if (i < 0 || i >= kvm_wf_n_agents(wf)) return kvm_seterr(KVM_ERANGE, "agent %d of %d", i, kvm_wf_n_agents(wf));
    const kvm_wf_agent_stats_t *s = kvm_wf_agent_stats(wf, i);
    *out = (kvm_agent_stats_t){.name = s->name, .model = s->model, .kv = s->kv, .calls = s->calls, .errors = s->errors,
                               .reuse_calls = s->reuse_calls, .prompt_tokens = s->prompt_tokens,
                               .output_tokens = s->output_tokens, .exact = s->exact, .offset = s->offset,
                               .naive = s->naive, .recomputed = s->recomputed, .fused = s->fused,
                               .ttft_ms_sum = s->ttft_ms_sum, .decode_ms_sum = s->decode_ms_sum,
                               .decode_tokens = s->decode_tokens};
    return 0;
}

/* ---- runs ------------------------------------------------------------------------------------------------ */

kvm_run_params_t kvm_run_default_params(void) { return (kvm_run_params_t){.seed = 1}; }

/* ---- the runtime's rounds and run events ---------------------------------------------------------------- */

/* The workflow of engine tag `tag`, or NULL when it was freed meanwhile. */
static kvm_workflow_t *tag_workflow(const kvm_runtime_t *rt, uint64_t tag) {
    for (int i = 0; i < rt->n_workflows; i++)
        if (rt->wfs[i]->api->serial == tag >> WF_TAG_SHIFT) return rt->wfs[i];
    return NULL;
}

static kvm_run_t *watched_run(const kvm_runtime_t *rt, const char *run_id) {
    kvm_mapval_t v;
    return run_id && kvm_map_get_str(&rt->watched, run_id, &v) ? v.ptr : NULL;
}

static gen_job_t *gen_find(const kvm_runtime_t *rt, uint64_t id) {
    for (int i = 0; i < rt->n_gens; i++)
        if (rt->gens[i].id == id) return &rt->gens[i];
    return NULL;
}

static int on_token(void *ud, uint64_t tag, const char *run_id, const char *agent, int32_t id, const char *text, size_t len) {
    if (tag & GEN_TAG) {
        gen_job_t *g = gen_find(ud, tag & ~GEN_TAG);
        if (g && g->cancel_code) return 1;
        if (g && g->fn) g->fn(g->ud, &(kvm_gen_event_t){.kind = KVM_RUN_TOKEN, .job = g->id, .token_id = id, .text = text, .len = len});
        return 0;
    }
    kvm_run_t *r = watched_run(ud, run_id);
    if (!r) return 0;
    r->on_event(r->event_ud, &(kvm_run_event_t){.kind = KVM_RUN_TOKEN, .run = r, .run_id = run_id, .agent = agent,
                                                .token_id = id, .text = text, .len = len});
    return 0;
}

/* Sends the end event of every watched run that has finished, and stops watching it. */
static void notify_ends(kvm_runtime_t *rt) {
    size_t it = 0;
    for (const kvm_map_entry_t *e; (e = kvm_map_next(&rt->watched, &it));) {
        kvm_run_t *r = e->val.ptr;
        const char *msg = NULL;
        int st = kvm_wf_run_status(r->wf, r->idx, &msg);
        const char *node = NULL;
        const cJSON *payload = NULL;
        if (kvm_wf_run_parked(r->wf, r->idx, &node, &payload)) { /* parked: not the end */
            if (!r->told_parked) {
                char *text = cJSON_PrintUnformatted(payload);
                r->told_parked = true;
                r->on_event(r->event_ud, &(kvm_run_event_t){.kind = KVM_RUN_INTERRUPT, .run = r, .run_id = kvm_wf_run_id(r->wf, r->idx),
                                                            .node = node, .text = text ? text : "null", .len = strlen(text ? text : "null")});
                cJSON_free(text);
            }
            continue;
        }
        if (st == KVM_EBUSY) continue;
        r->watched = false;
        kvm_map_remove_str(&rt->watched, kvm_wf_run_id(r->wf, r->idx), NULL);
        r->on_event(r->event_ud, &(kvm_run_event_t){.kind = KVM_RUN_END, .run = r, .run_id = kvm_wf_run_id(r->wf, r->idx),
                                                    .status = st, .message = msg});
        it = 0; /* removal shifts entries back: start over (ends are few per round) */
    }
}

int kvm_runtime_n_active(const kvm_runtime_t *rt) {
    int n = 0;
    for (int i = 0; rt && i < rt->n_workflows; i++) n += kvm_wf_n_active(rt->wfs[i]);
    return n;
}

/* A generation job's end: its KVM_RUN_END event, then it is forgotten (its KV went back when the engine took it). */
static void gen_end(kvm_runtime_t *rt, const wf_llm_result_t *res) {
    gen_job_t *g = gen_find(rt, res->tag & ~GEN_TAG);
    if (!g) return;
    gen_job_t job = *g;
    *g = rt->gens[--rt->n_gens]; /* forgotten first: the callback may queue new jobs */
    int st = job.cancel_code ? job.cancel_code : res->status;
    const char *msg = job.cancel_code ? (job.cancel_msg ? job.cancel_msg : "canceled") : st ? (res->error ? res->error : kvm_strerror(st)) : NULL;
    if (job.fn)
        job.fn(job.ud, &(kvm_gen_event_t){.kind = KVM_RUN_END, .job = job.id, .text = st ? "" : res->text ? res->text : "",
                                          .len = st || !res->text ? 0 : strlen(res->text), .status = st, .message = msg,
                                          .ids = st ? NULL : res->out_ids, .n_ids = st ? 0 : res->n_out, .n_prompt = res->n_prompt,
                                          .kv_exact = res->kv.exact, .stop_reason = res->stop_reason, .queue_ms = res->queue_ms,
                                          .ttft_ms = res->ttft_ms, .decode_ms = res->decode_ms});
    kvm_free(job.cancel_msg);
}

int kvm_runtime_generate(kvm_runtime_t *rt, const kvm_gen_request_t *q, uint64_t *job) {
    if (!rt || !q || !job) return kvm_seterr(KVM_EINVAL, "kvm_runtime_generate: no runtime, request or job");
    *job = 0;
    if (!q->model || !*q->model) return kvm_seterr(KVM_EINVAL, "generate: model: no model path");
    if (!q->prompt == !q->ids) return kvm_seterr(KVM_EINVAL, "generate: give a prompt or token ids (one of them)");
    if (q->ids && q->n_ids < 1) return kvm_seterr(KVM_EINVAL, "generate: ids: n_ids is %d, must be at least 1", q->n_ids);
    const kvm_generate_params_t *p = &q->params;
    if (p->max_tokens < 1) return kvm_seterr(KVM_EINVAL, "generate: max_tokens: %d, must be at least 1", p->max_tokens);
    if (p->max_total_tokens) return kvm_seterr(KVM_EUNSUPPORTED, "generate: max_total_tokens: not supported by generation jobs (use max_tokens)");
    if (p->top_k < 0 || !(p->top_p > 0 && p->top_p <= 1) || !(p->repetition_penalty > 0))
        return kvm_seterr(KVM_EINVAL, "generate: top_k >= 0, top_p in (0, 1] and repetition_penalty > 0 (got %d, %g, %g)",
                          p->top_k, (double)p->top_p, (double)p->repetition_penalty);
    if (p->n_stop < 0 || (p->n_stop > 0 && !p->stop)) return kvm_seterr(KVM_EINVAL, "generate: n_stop: %d without stop strings", p->n_stop);
    if (!(q->deadline_ms >= 0)) return kvm_seterr(KVM_EINVAL, "generate: deadline_ms: %g is negative", q->deadline_ms);
    int idx = -1;
    int rc = wf_llm_model_open(rt->engine, q->model, NULL, 0, &idx);
    if (rc) return kvm_errctx(rc, "generate");
    const kvm_model_t *m = wf_llm_model(rt->engine, idx);
    int32_t *ids = NULL;
    int n = 0;
    if (q->prompt) {
        if (!m->tok && !kvm_model_is_mock(m)) return kvm_seterr(KVM_EINVAL, "generate: prompt: the model has no tokenizer: give token ids");
        rc = kvm_prompt_encode(m, p->system, q->prompt, p->chat, &ids, &n);
        if (rc) return kvm_errctx(rc, "generate: prompt");
        if (n < 1) {
            kvm_free(ids);
            return kvm_seterr(KVM_EINVAL, "generate: prompt: it encodes to no tokens");
        }
    } else
        for (int i = 0; i < q->n_ids; i++)
            if (q->ids[i] < 0 || q->ids[i] >= m->cfg.vocab_size)
                return kvm_seterr(KVM_ERANGE, "generate: ids: token id %d at index %d is outside [0, %d)", (int)q->ids[i], i, m->cfg.vocab_size);
    if (rt->n_gens == rt->cap_gens) {
        int cap = rt->cap_gens ? 2 * rt->cap_gens : 8;
        gen_job_t *ng = kvm_realloc(rt->gens, (size_t)cap * sizeof *ng);
        if (!ng) {
            kvm_free(ids);
            return kvm_seterr(KVM_ENOMEM, "generate: out of memory");
        }
        rt->gens = ng;
        rt->cap_gens = cap;
    }
    gen_job_t *g = &rt->gens[rt->n_gens];
    *g = (gen_job_t){.id = ++rt->gen_serial, .fn = q->on_event, .ud = q->ud};
    snprintf(g->run_id, sizeof g->run_id, "gen-%llu", (unsigned long long)g->id);
    float temp = p->temperature < 0 ? (m->cfg.gen_temperature > 0 ? m->cfg.gen_temperature : 0) : p->temperature;
    wf_llm_req_t r = {.model = idx, .agent = "generate", .run_id = g->run_id, .max_tokens = p->max_tokens,
                      .sampling = {.temperature = temp, .top_k = p->top_k, .top_p = p->top_p,
                                   .repetition_penalty = p->repetition_penalty, .seed = p->seed},
                      .stop = p->stop, .n_stop = p->n_stop, .kv = KVM_KV_PREFIX, .ignore_eos = p->ignore_eos,
                      .tag = GEN_TAG | g->id, .timeout_ms = q->deadline_ms,
                      .prompt_ids = ids ? ids : q->ids, .n_prompt_ids = ids ? n : q->n_ids};
    rc = wf_llm_submit(rt->engine, &r);
    kvm_free(ids);
    if (rc) return kvm_errctx(rc, "generate");
    rt->n_gens++;
    *job = g->id;
    return 0;
}

int kvm_runtime_generate_cancel(kvm_runtime_t *rt, uint64_t job, int code, const char *message) {
    if (!rt) return kvm_seterr(KVM_EINVAL, "kvm_runtime_generate_cancel: no runtime");
    if (code > 0) return kvm_seterr(KVM_EINVAL, "kvm_runtime_generate_cancel: code %d is not 0 or a KVM_E* status", code);
    gen_job_t *g = gen_find(rt, job);
    if (!g) return kvm_seterr(KVM_ENOENT, "kvm_runtime_generate_cancel: no generation job %llu going", (unsigned long long)job);
    if (g->cancel_code) return 0;
    g->cancel_code = code ? code : KVM_ECANCELED;
    g->cancel_msg = message ? kvm_strdup(message) : NULL;
    wf_llm_cancel_run(rt->engine, g->run_id);
    return 0;
}

int kvm_runtime_n_generating(const kvm_runtime_t *rt) { return rt ? rt->n_gens : 0; }

/* One engine pass over the model work of every run, its results handed to their workflows; 0 or the engine's
 * failure (<0; every run going then ended with it). */
static int engine_round(kvm_runtime_t *rt) {
    int n = wf_llm_step(rt->engine);
    if (n < 0) {
        char msg[512];
        snprintf(msg, sizeof msg, "engine: %s", kvm_errmsg());
        for (int i = 0; i < rt->n_workflows; i++) kvm_wf_fail_runs(rt->wfs[i], n, msg);
        while (rt->n_gens > 0) { /* the generation jobs end with it too (what the engine still holds is never taken) */
            gen_job_t job = rt->gens[--rt->n_gens];
            wf_llm_cancel_run(rt->engine, job.run_id);
            if (job.fn) job.fn(job.ud, &(kvm_gen_event_t){.kind = KVM_RUN_END, .job = job.id, .text = "", .status = n, .message = msg});
            kvm_free(job.cancel_msg);
        }
        return kvm_seterr(n, "%s", msg);
    }
    wf_llm_result_t res;
    while (wf_llm_take(rt->engine, &res) == 1) {
        if (res.tag & GEN_TAG) {
            gen_end(rt, &res);
            wf_llm_result_clear(&res);
            continue;
        }
        kvm_workflow_t *wf = tag_workflow(rt, res.tag);
        if (wf) wf_deliver(wf, &res);
        wf_llm_result_clear(&res);
    }
    return 0;
}

int kvm_runtime_step(kvm_runtime_t *rt) {
    if (!rt) return kvm_seterr(KVM_EINVAL, "kvm_runtime_step: no runtime");
    bool progress = false;
    int active = 0, rc = 0;
    for (int i = 0; i < rt->n_workflows; i++) active += kvm_wf_advance(rt->wfs[i], &progress);
    if (wf_llm_pending(rt->engine) > 0) {
        rc = engine_round(rt);
        progress = true;
    }
    if (active > 0 && !progress)
        for (int i = 0; i < rt->n_workflows; i++) kvm_wf_fail_stalled(rt->wfs[i]);
    notify_ends(rt);
    return rc < 0 ? rc : kvm_runtime_n_active(rt);
}

int kvm_run_cancel(kvm_run_t *r, int code, const char *message) {
    if (!r) return kvm_seterr(KVM_EINVAL, "kvm_run_cancel: no run");
    if (code > 0) return kvm_seterr(KVM_EINVAL, "kvm_run_cancel: code %d is not 0 or a KVM_E* status", code);
    return kvm_wf_run_cancel(r->wf, r->idx, code, message); /* its end event comes from the next round */
}

/* Parses inputs_json (NULL = an empty object); the message names the offset of a syntax error. */
static cJSON *parse_inputs(const char *text) {
    if (!text) return cJSON_CreateObject();
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithOpts(text, &end, 1);
    if (!j) {
        kvm_seterr(KVM_EINVAL, "run inputs: not valid JSON at offset %td", end ? end - text : (ptrdiff_t)0);
        return NULL;
    }
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        kvm_seterr(KVM_EINVAL, "run inputs: must be a JSON object");
        return NULL;
    }
    return j;
}

kvm_run_t *kvm_run_start(kvm_workflow_t *wf, const kvm_run_params_t *params) {
    const kvm_run_params_t def = kvm_run_default_params();
    if (!params) params = &def;
    cJSON *in = parse_inputs(params->inputs_json);
    if (!in) return NULL;
    int idx = -1;
    kvm_kv_policy_t kv = (kvm_kv_policy_t)-1;
    if (params->kv && kvm_kv_policy_parse(params->kv, &kv) != 0) {
        cJSON_Delete(in);
        return NULL;
    }
    cJSON *answer = NULL;
    int rc = 0;
    if (params->answer_json && !params->resume_trace)
        rc = kvm_seterr(KVM_EINVAL, "run parameters: answer_json answers a traced run's interrupt: it needs resume_trace");
    else if (params->answer_json && !(answer = cJSON_Parse(params->answer_json)))
        rc = kvm_seterr(KVM_EINVAL, "run parameters: answer_json is not valid JSON");
    else if (params->replay && !params->resume_trace)
        rc = kvm_seterr(KVM_EINVAL, "run parameters: replay re-runs a traced run: it needs resume_trace");
    else if (params->replay && params->answer_json)
        rc = kvm_seterr(KVM_EINVAL, "run parameters: a replay gives no interrupt answer (answer_json is for a resume)");
    else if (params->replay)
        rc = kvm_wf_start_replay(wf, params->resume_trace, params->replay_step, params->replay_output, params->replay_seed,
                                 params->kv ? (int)kv : -1, &idx);
    else if (params->resume_trace) rc = kvm_wf_start_resume(wf, params->resume_trace, params->resume_step, answer, &idx);
    else rc = params->from_dataset ? kvm_wf_start_seeded_kv(wf, params->seed, in, (int)kv, &idx)
                                   : kvm_wf_start_kv(wf, in, params->seed, (int)kv, &idx);
    cJSON_Delete(answer);
    cJSON_Delete(in);
    if (rc) return NULL;
    kvm_run_t *r = run_handle(wf, idx);
    if (!r) {
        kvm_seterr(KVM_ENOMEM, "out of memory making a run handle");
        return NULL;
    }
    if (params->on_event) {
        r->on_event = params->on_event;
        r->event_ud = params->event_ud;
        if (kvm_map_put_str(&wf->api->rt->watched, kvm_wf_run_id(wf, idx), KVM_MAPVAL_PTR(r)) != 0) {
            kvm_wf_run_cancel(wf, idx, KVM_ENOMEM, "out of memory watching the run");
            kvm_seterr(KVM_ENOMEM, "out of memory watching a run for its events");
            return NULL;
        }
        r->watched = true; /* a run that failed at its start ends at the next kvm_runtime_step */
    }
    return r;
}

int kvm_run_tool_result(kvm_run_t *r, uint64_t call_id, int status, const char *result_json) {
    if (!r) return kvm_seterr(KVM_EINVAL, "kvm_run_tool_result: no run");
    if (status > 0) return kvm_seterr(KVM_EINVAL, "kvm_run_tool_result: status %d is not 0 or a KVM_E* code", status);
    cJSON *v = NULL;
    if (status == 0 && result_json) {
        int rc = kvm_json_parse(result_json, strlen(result_json), "the tool's result", &v);
        if (rc) return rc;
    }
    int rc = kvm_wf_tool_result(r->wf, r->idx, call_id, status, v, status ? result_json : NULL);
    cJSON_Delete(v);
    return rc;
}

kvm_run_t *wf_api_run(kvm_workflow_t *wf, int idx) { return wf->api ? run_handle(wf, idx) : NULL; }

int kvm_run_status(const kvm_run_t *r, const char **message) { return kvm_wf_run_status(r->wf, r->idx, message); }
const char *kvm_run_id(const kvm_run_t *r) { return kvm_wf_run_id(r->wf, r->idx); }
const char *kvm_run_trace_dir(const kvm_run_t *r) { return kvm_wf_run_trace_dir(r->wf, r->idx); }
int kvm_run_score(kvm_run_t *r, double *score) { return kvm_wf_run_score(r->wf, r->idx, score); }

char *kvm_run_interrupt_json(const kvm_run_t *r, const char **node) {
    const cJSON *payload = NULL;
    if (node) *node = NULL;
    if (!r || !kvm_wf_run_parked(r->wf, r->idx, node, &payload)) {
        kvm_seterr(KVM_EINVAL, "run %s is not parked in kvmesh.interrupt", r ? kvm_wf_run_id(r->wf, r->idx) : "(null)");
        return NULL;
    }
    return json_text(payload, "interrupt payload");
}

int kvm_run_resume(kvm_run_t *r, const char *value_json) {
    if (!r) return kvm_seterr(KVM_EINVAL, "kvm_run_resume: no run");
    cJSON *v = value_json ? cJSON_Parse(value_json) : cJSON_CreateNull();
    if (!v) return kvm_seterr(KVM_EINVAL, "kvm_run_resume: the value is not valid JSON");
    int rc = kvm_wf_run_resume(r->wf, r->idx, v);
    cJSON_Delete(v);
    if (!rc) r->told_parked = false;
    return rc;
}

char *kvm_run_outputs_json(const kvm_run_t *r) { return json_text(kvm_wf_run_outputs(r->wf, r->idx), "run outputs"); }
char *kvm_run_state_json(const kvm_run_t *r) { return json_text(kvm_wf_run_state(r->wf, r->idx), "run state"); }
char *kvm_run_inputs_json(const kvm_run_t *r) { return json_text(kvm_wf_run_inputs(r->wf, r->idx), "run inputs"); }

/* ---- replay ---------------------------------------------------------------------------------------------- */

int kvm_trace_replay(kvm_runtime_t *rt, const char *run_dir, kvm_replay_t *out) {
    if (!out) return kvm_seterr(KVM_EINVAL, "kvm_trace_replay: no result given");
    memset(out, 0, sizeof *out);
    if (!rt || !run_dir) return kvm_seterr(KVM_EINVAL, "kvm_trace_replay needs a runtime and a run directory");
    bool mock = runtime_mock(rt);
    kvm_wf_replay_opts_t o = {.model_override = mock ? NULL : rt->p.model_override, .mock = mock, .model = rt->p.model,
                              .host_fns = rt->fns, .n_host_fns = rt->n_fns, .tools = &rt->tools,
                              .max_instructions = rt->p.run_instructions,
                              .lua_cpu_ms = rt->p.run_lua_ms, .run_mem_cap_bytes = rt->p.run_mem_bytes};
    return kvm_wf_replay(run_dir, &o, out);
}

/* ---- kvmesh.blame (wf_lua.c): blame of an ended run of the same runtime ------------------------------------ */

int wf_api_blame(kvm_workflow_t *wf, const char *run_id, int k, kvm_blame_t *out, int *n_steps, char *why, size_t cap) {
    kvm_runtime_t *rt = wf->api ? wf->api->rt : NULL;
    if (!rt) return snprintf(why, cap, "the workflow has no runtime"), KVM_EINVAL;
    const wf_run_t *cur = wf->cur_run ? wf->cur_run->root : NULL;
    if (cur && !strcmp(cur->id, run_id))
        return snprintf(why, cap, "run %s is the run calling kvmesh.blame: it has not ended", run_id), KVM_EBUSY;
    const kvm_workflow_t *owner = NULL;
    int idx = -1;
    for (int i = 0; i < rt->n_workflows && idx < 0; i++)
        for (int j = 0; j < rt->wfs[i]->n_runs && idx < 0; j++)
            if (!rt->wfs[i]->runs[j]->parent && !strcmp(rt->wfs[i]->runs[j]->id, run_id)) owner = rt->wfs[i], idx = j;
    if (idx < 0) return snprintf(why, cap, "no run %.40s in this runtime", run_id), KVM_ENOENT;
    int st = kvm_wf_run_status(owner, idx, NULL);
    if (st == KVM_EBUSY || st == KVM_EINTERRUPTED)
        return snprintf(why, cap, "run %s has not ended (ask again once it has)", run_id), KVM_EBUSY;
    const char *d = kvm_wf_run_trace_dir(owner, idx);
    if (!d) return snprintf(why, cap, "run %s has no trace (the runtime keeps none: trace_root)", run_id), KVM_ENOENT;
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", d);
    kvm_errclear();
    kvm_failure_t *f = kvm_failure_from_trace(dir); /* charged to the calling run (freed below) */
    /* the cache is the runtime's: what it allocates (opening, cached vectors) is charged to no run */
    kvm_account_t *acct = kvm_account_enter(NULL);
    kvm_schema_cache_t *c = f ? kvm_runtime_schema_cache(rt) : NULL;
    int rc = f && c ? 0 : kvm_errcode() ? kvm_errcode() : KVM_EIO;
    if (!rc) {
        kvm_blame_params_t p = kvm_blame_default_params();
        p.k = k;
        p.count_hit = false; /* a script's question leaves the cache as it was */
        rc = kvm_blame(c, f, &p, out);
        *n_steps = f->n_steps;
    }
    kvm_account_enter(acct);
    if (rc) snprintf(why, cap, "run %s: %s", run_id, kvm_errmsg());
    kvm_failure_free(f);
    return rc;
}
