/* wf_exec.c - runs of a workflow: super-steps, agent steps through the engine, Lua nodes on
 * coroutines, reducers, edges and joins, budgets, and the trace of every step.
 *
 * Concurrency model: everything runs on the calling thread. A run's func/tool nodes run on their own
 * coroutines; an agent node (or ctx:call) submits a step to the engine and the node waits (a
 * coroutine yields). kvm_wf_drive() alternates between advancing runs whose super-step is complete
 * and one engine step (one forward pass per model over every waiting agent of every run). */
#include "wf_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { T_RUNNING = 0, T_WAIT, T_DONE };

typedef struct wf_task {
    int node;
    int status;
    int err;               /* 0 or KVM_E* */
    char *errmsg;
    lua_State *co;         /* func/tool nodes */
    int co_ref;
    uint64_t job;          /* engine job in flight (0 = none) */
    bool job_is_call;      /* a ctx:call from a func/tool node (resume the coroutine) */
    int call_agent;
    cJSON *pieces;         /* what the agent of the job in flight sees */
    uint64_t t_start;      /* wall ns */
    uint64_t t_job;        /* monotonic ns at submit */
    int out_ref;           /* output value (registry), LUA_NOREF = nil */
    char *out_text;        /* agent output text */
    /* ctx:map: several agent calls in flight at once */
    uint64_t *mjobs;       /* [n_m] engine jobs (0 once delivered) */
    cJSON **mpieces;       /* [n_m] what each call sees */
    int n_m, m_left;
    int m_agent;
    int m_ref;             /* results table (registry) */
} wf_task_t;

typedef struct wf_run {
    int idx;
    char id[KVM_TRACE_ID_HEX];
    uint64_t seed;
    bool finished;
    bool need_end;
    int err;
    char *errmsg;
    lua_State *th;
    int th_ref, state_ref, inputs_ref, last_ref;
    wf_account_t *acct;
    wf_budget_t budget;
    uint64_t rng[2];
    char **node_cur, **node_prev;   /* [n_nodes] latest / previous output text */
    bool *ready;                    /* [n_nodes] */
    bool *to_end;                   /* [n_nodes] routed to END (outputs) */
    bool **arrived;                 /* [n_joins][n_src] */
    int superstep;
    int step_idx;
    wf_task_t *tasks;
    int n_tasks, n_open;
    long tokens_in, tokens_out;
    int agent_calls;
    long *agent_tokens;             /* [n_agents] */
    uint64_t t0_mono;
    uint64_t t0_wall;
    kvm_trace_t *trace;
    cJSON *inputs, *outputs, *state;
} wf_run_t;

/* ---- small helpers ------------------------------------------------------------------------------- */

static char *xstrdup(const char *s) { return kvm_strdup(s ? s : ""); }

static double ms_since(uint64_t t0) { return (double)(kvm_now_ns() - t0) / 1e6; }

/* Makes run the executing one: its budget, account and RNG are charged from now on. */
static void enter(kvm_workflow_t *wf, wf_run_t *r) {
    wf->cur_run = r;
    wf->cur_budget = &r->budget;
    wf->cur_acct = r->acct;
    r->budget.slice_t0 = kvm_now_ns();
}

static void leave(kvm_workflow_t *wf, wf_run_t *r) {
    if (r->budget.slice_t0) r->budget.lua_ns += kvm_now_ns() - r->budget.slice_t0;
    r->budget.slice_t0 = 0;
    wf->cur_run = NULL;
    wf->cur_budget = NULL;
    wf->cur_acct = NULL;
}

/* Charges allocations to the run without running its code (no cap, no budget): C-side bookkeeping. */
static void book(kvm_workflow_t *wf, wf_run_t *r) {
    wf->cur_run = r;
    wf->cur_budget = NULL;
    wf->cur_acct = r->acct;
}

static void unbook(kvm_workflow_t *wf) {
    wf->cur_run = NULL;
    wf->cur_acct = NULL;
}

uint64_t *wf_current_rng(kvm_workflow_t *wf) { return wf->cur_run ? wf->cur_run->rng : wf->rng_load; }

static void trace_write(wf_run_t *r, cJSON *rec) {
    if (r->trace && kvm_trace_write(r->trace, rec) != 0) {
        KVM_LOGW("run %s: trace write failed (%s); tracing stops for this run", r->id, kvm_errmsg());
        kvm_trace_close(r->trace);
        r->trace = NULL;
    }
    cJSON_Delete(rec);
}

static cJSON *rec_new(const char *t) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "t", t);
    return o;
}

void wf_log(kvm_workflow_t *wf, const char *level, const char *msg) {
    wf_run_t *r = wf->cur_run;
    if (wf->o.echo_print || !r || !r->trace) {
        if (r) fprintf(stderr, "[run %d] %s\n", r->idx, msg);
        else fprintf(stderr, "%s\n", msg);
    }
    if (r && r->trace) {
        /* the trace write may allocate through cJSON, not Lua: safe inside a Lua call */
        cJSON *rec = rec_new("log");
        cJSON_AddStringToObject(rec, "level", level);
        cJSON_AddStringToObject(rec, "msg", msg);
        cJSON_AddNumberToObject(rec, "superstep", r->superstep);
        trace_write(r, rec);
    }
}

/* Error message + traceback of a failed coroutine or protected call; adds the first file:line of
 * the traceback in front when the message has none (memory errors carry no position). */
static char *error_text(lua_State *L, lua_State *co, int status, const char *fallback_where) {
    const char *msg = lua_tostring(co, -1);
    char buf[4096];
    if (!msg) msg = status == LUA_ERRMEM ? "not enough memory" : "(error object is not a string)";
    snprintf(buf, sizeof buf, "%s", msg);
    if (status == LUA_ERRMEM || !strchr(buf, ':')) {
        char where[512] = "";
        lua_Debug d;
        for (int lv = 0; lua_getstack(co, lv, &d); lv++)
            if (lua_getinfo(co, "Sl", &d) && d.currentline > 0) {
                snprintf(where, sizeof where, "%s:%d", d.short_src, d.currentline);
                break;
            }
        if (!where[0] && fallback_where) snprintf(where, sizeof where, "%s", fallback_where);
        if (where[0]) snprintf(buf, sizeof buf, "%s: %s", where, msg);
    }
    if (co != L && lua_checkstack(L, 2)) {
        luaL_traceback(L, co, buf, 0);
        char *r = xstrdup(lua_tostring(L, -1));
        lua_pop(L, 1);
        return r;
    }
    return xstrdup(buf);
}

static int status_code(wf_run_t *r, int st) {
    if (r->budget.killed) return r->budget.kill_code;
    return st == LUA_ERRMEM ? KVM_ELUA_MEMORY : st == LUA_ERRSYNTAX ? KVM_ELUA_SYNTAX : KVM_ELUA_RUNTIME;
}

/* Protected call on the run's thread: the function and nargs arguments are on r->th's stack. On
 * success nres results are left; on error nothing is left, *msg gets message + traceback. */
static int run_pcall(kvm_workflow_t *wf, wf_run_t *r, int nargs, int nres, char **msg, const char *where) {
    lua_State *L = r->th;
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, wf_lua_msgh);
    lua_insert(L, base);
    enter(wf, r);
    int st = lua_pcall(L, nargs, nres, base);
    leave(wf, r);
    lua_remove(L, base);
    if (st == LUA_OK) return 0;
    int code = status_code(r, st);
    const char *m = lua_tostring(L, -1);
    char buf[4096];
    if (!m || st == LUA_ERRMEM) {
        snprintf(buf, sizeof buf, "%s: %s", where ? where : "?", st == LUA_ERRMEM ? "not enough memory (the run hit its Lua memory cap)" : "error");
        m = buf;
    }
    if (msg) *msg = xstrdup(m);
    lua_pop(L, 1);
    return code;
}

/* ---- run state ----------------------------------------------------------------------------------- */

static const wf_key_t *find_key(const wf_graph_t *g, const char *k) {
    for (int i = 0; i < g->n_keys; i++)
        if (!strcmp(g->keys[i].name, k)) return &g->keys[i];
    return NULL;
}

static bool is_sequence(lua_State *L, int idx) {
    idx = lua_absindex(L, idx);
    if (lua_type(L, idx) != LUA_TTABLE) return false;
    lua_Unsigned len = lua_rawlen(L, idx), n = 0;
    if (len == 0) return false;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        n++;
        lua_pop(L, 1);
    }
    return n == len;
}

/* Applies key's reducer with the value on top of r->th's stack (popped). 0 or KVM_E* with *msg. */
static int reduce(kvm_workflow_t *wf, wf_run_t *r, const wf_key_t *k, const char *node, char **msg) {
    lua_State *L = r->th;
    int v = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->state_ref);
    int S = v + 1;
    int rc = 0;
    book(wf, r); /* allocations below are the run's */
    switch (k->reducer) {
    case WF_RED_REPLACE:
        lua_pushvalue(L, v);
        lua_setfield(L, S, k->name);
        break;
    case WF_RED_APPEND: {
        lua_getfield(L, S, k->name);
        if (lua_type(L, -1) != LUA_TTABLE) {
            lua_pop(L, 1);
            lua_newtable(L);
            lua_pushvalue(L, -1);
            lua_setfield(L, S, k->name);
        }
        int t = lua_gettop(L);
        lua_Integer n = (lua_Integer)lua_rawlen(L, t);
        if (is_sequence(L, v)) { /* a list extends the list */
            lua_Integer m = (lua_Integer)lua_rawlen(L, v);
            for (lua_Integer i = 1; i <= m; i++) {
                lua_rawgeti(L, v, i);
                lua_rawseti(L, t, n + i);
            }
        } else {
            lua_pushvalue(L, v);
            lua_rawseti(L, t, n + 1);
        }
        break;
    }
    case WF_RED_MERGE: {
        if (lua_type(L, v) != LUA_TTABLE) {
            rc = KVM_EINVAL;
            *msg = kvm_malloc(256);
            if (*msg) snprintf(*msg, 256, "node '%s': state key '%s' merges tables, got a %s", node, k->name, luaL_typename(L, v));
            break;
        }
        lua_getfield(L, S, k->name);
        if (lua_type(L, -1) != LUA_TTABLE) {
            lua_pop(L, 1);
            lua_newtable(L);
            lua_pushvalue(L, -1);
            lua_setfield(L, S, k->name);
        }
        int t = lua_gettop(L);
        lua_pushnil(L);
        while (lua_next(L, v)) {
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_rawset(L, t);
        }
        break;
    }
    case WF_RED_SUM:
    case WF_RED_MAX:
    case WF_RED_MIN: {
        lua_getfield(L, S, k->name);
        int old = lua_gettop(L);
        if (k->reducer == WF_RED_SUM) {
            if (!lua_isnumber(L, v) || !(lua_isnil(L, old) || lua_isnumber(L, old))) {
                rc = KVM_EINVAL;
                *msg = kvm_malloc(256);
                if (*msg) snprintf(*msg, 256, "node '%s': state key '%s' sums numbers, got a %s", node, k->name, luaL_typename(L, v));
                break;
            }
            if (lua_isnil(L, old)) lua_pushvalue(L, v);
            else {
                lua_pushvalue(L, old);
                lua_pushvalue(L, v);
                lua_arith(L, LUA_OPADD);
            }
        } else {
            bool take = lua_isnil(L, old);
            if (!take) {
                bool comparable = (lua_type(L, old) == LUA_TNUMBER && lua_type(L, v) == LUA_TNUMBER) ||
                                  (lua_type(L, old) == LUA_TSTRING && lua_type(L, v) == LUA_TSTRING);
                if (!comparable) {
                    rc = KVM_EINVAL;
                    *msg = kvm_malloc(256);
                    if (*msg) snprintf(*msg, 256, "node '%s': state key '%s' (max/min) got values that cannot be compared", node, k->name);
                    break;
                }
                take = k->reducer == WF_RED_MAX ? lua_compare(L, old, v, LUA_OPLT) : lua_compare(L, v, old, LUA_OPLT);
            }
            lua_pushvalue(L, take ? v : old);
        }
        lua_setfield(L, S, k->name);
        break;
    }
    default: /* custom function(old, new) -> value */
        unbook(wf);
        lua_rawgeti(L, LUA_REGISTRYINDEX, k->fn_ref);
        lua_getfield(L, S, k->name);
        lua_pushvalue(L, v);
        rc = run_pcall(wf, r, 2, 1, msg, NULL);
        book(wf, r);
        if (rc == 0) lua_setfield(L, S, k->name);
        break;
    }
    unbook(wf);
    lua_settop(L, v - 1);
    return rc;
}

/* ---- prompts ------------------------------------------------------------------------------------- */

/* Text of one slot: from vars (ctx:call) if given, else from the run's inputs, node outputs or state. */
static int slot_text(kvm_workflow_t *wf, wf_run_t *r, const wf_agent_t *a, const wf_tpart_t *p, lua_State *VL, int vars,
                     char **out, bool *missing) {
    lua_State *L = r->th;
    *missing = false;
    if (VL && vars) {
        lua_getfield(VL, vars, p->text);
        if (!lua_isnil(VL, -1)) {
            *out = wf_lua_value_text(VL, -1);
            lua_pop(VL, 1);
            return *out ? 0 : KVM_ENOMEM;
        }
        lua_pop(VL, 1);
    }
    switch (p->src) {
    case WF_SRC_INPUT:
        lua_rawgeti(L, LUA_REGISTRYINDEX, r->inputs_ref);
        lua_getfield(L, -1, p->key ? p->key : "input");
        if (lua_isnil(L, -1)) {
            lua_pop(L, 2);
            return kvm_seterr(KVM_EINVAL, "%s: agent '%s': placeholder {%s} but the run has no input '%s' (give --input %s=...)",
                              a->where, a->name, p->text, p->key ? p->key : "input", p->key ? p->key : "input");
        }
        *out = wf_lua_value_text(L, -1);
        lua_pop(L, 2);
        break;
    case WF_SRC_AGENT:
    case WF_SRC_TOOL:
    case WF_SRC_AGENT_PREV: {
        int nd = p->node;
        const char *t = nd < 0 ? NULL : p->src == WF_SRC_AGENT_PREV ? r->node_prev[nd] : r->node_cur[nd];
        *missing = t == NULL;
        *out = xstrdup(t);
        break;
    }
    default:
        lua_rawgeti(L, LUA_REGISTRYINDEX, r->state_ref);
        lua_getfield(L, -1, p->key);
        *missing = lua_isnil(L, -1);
        *out = wf_lua_value_text(L, -1);
        lua_pop(L, 2);
        break;
    }
    (void)wf;
    return *out ? 0 : KVM_ENOMEM;
}

/* Builds the agent's pieces and submits the step. On success *pieces_json describes what it sees. */
static int submit_agent(kvm_workflow_t *wf, wf_run_t *r, int ai, lua_State *VL, int vars, uint64_t tag, cJSON **pieces_json) {
    const wf_agent_t *a = &wf->agents[ai];
    wf_piece_t *pieces = kvm_calloc((size_t)a->n_parts + 1, sizeof *pieces);
    char **texts = kvm_calloc((size_t)a->n_parts + 1, sizeof *texts);
    cJSON *pj = cJSON_CreateArray();
    int rc = pieces && texts && pj ? 0 : KVM_ENOMEM;
    for (int i = 0; rc == 0 && i < a->n_parts; i++) {
        const wf_tpart_t *p = &a->parts[i];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToArray(pj, o);
        if (!p->slot) {
            pieces[i] = (wf_piece_t){.is_slot = false, .text = p->text};
            cJSON_AddStringToObject(o, "text", p->text);
            continue;
        }
        bool missing;
        rc = slot_text(wf, r, a, p, VL, vars, &texts[i], &missing);
        if (rc) break;
        pieces[i] = (wf_piece_t){.is_slot = true, .name = p->ph_name, .text = texts[i]};
        cJSON_AddStringToObject(o, "slot", p->ph_name);
        cJSON_AddStringToObject(o, "src", p->text);
        cJSON_AddStringToObject(o, "text", texts[i]);
        if (missing) cJSON_AddTrueToObject(o, "missing");
    }
    if (rc == 0) {
        int kv = wf->o.kv_override ? wf_kv_policy_parse(wf->o.kv_override) : (int)a->kv;
        wf_llm_req_t req = {.model = wf->models[a->model].llm, .agent = a->name, .run_id = r->id, .system = a->role,
                            .pieces = pieces, .n_pieces = a->n_parts, .sampling = a->sampling, .max_tokens = a->max_tokens,
                            .stop = (const char *const *)a->stop, .n_stop = a->n_stop, .kv = kv < 0 ? WF_KV_KVCOMM : (wf_kv_policy_t)kv,
                            .ignore_eos = a->ignore_eos, .tag = tag};
        if (req.sampling.seed == 0) req.sampling.seed = r->seed * 1000003u + (uint64_t)r->step_idx + 1;
        rc = wf_llm_submit(wf->llm, &req);
        if (rc) rc = kvm_errctx(rc, "%s: agent '%s'", a->where, a->name);
    }
    for (int i = 0; texts && i < a->n_parts; i++) kvm_free(texts[i]);
    kvm_free(texts);
    kvm_free(pieces);
    if (rc) cJSON_Delete(pj);
    else *pieces_json = pj;
    return rc;
}

/* ---- trace records ------------------------------------------------------------------------------- */

static void trace_run_start(kvm_workflow_t *wf, wf_run_t *r) {
    if (!r->trace) return;
    const wf_graph_t *g = wf->g;
    cJSON *o = rec_new("run.start");
    cJSON_AddNumberToObject(o, "v", KVM_TRACE_VERSION);
    cJSON_AddStringToObject(o, "run_id", r->id);
    cJSON_AddNumberToObject(o, "run", r->idx);
    cJSON *w = cJSON_AddObjectToObject(o, "workflow");
    cJSON_AddStringToObject(w, "path", wf->path);
    cJSON_AddStringToObject(w, "graph", g->name);
    char h[24];
    snprintf(h, sizeof h, "%016llx", (unsigned long long)wf->source_hash);
    cJSON_AddStringToObject(w, "source_fnv64", h);
    cJSON_AddStringToObject(w, "source", wf->source);
    cJSON_AddItemToObject(o, "inputs", cJSON_Duplicate(r->inputs, 1));
    cJSON_AddItemToObject(o, "seed", kvm_json_u64(r->seed));
    cJSON *cfg = cJSON_AddObjectToObject(o, "config");
    cJSON_AddItemToObject(cfg, "kv_override", kvm_json_str_or_null(wf->o.kv_override));
    cJSON_AddBoolToObject(cfg, "mock", wf->o.mock);
    cJSON *lim = cJSON_AddObjectToObject(cfg, "limits");
    cJSON_AddNumberToObject(lim, "steps", g->lim_steps ? (double)g->lim_steps : 50);
    cJSON_AddNumberToObject(lim, "tokens", (double)g->lim_tokens);
    cJSON_AddNumberToObject(lim, "wall_ms", (double)g->lim_wall_ms);
    cJSON_AddNumberToObject(lim, "instructions", (double)r->budget.max_instructions);
    cJSON_AddNumberToObject(lim, "lua_ms", (double)r->budget.max_lua_ns / 1e6);
    cJSON_AddNumberToObject(lim, "memory_bytes", (double)r->acct->cap);
    cJSON *ms = cJSON_AddArrayToObject(o, "models");
    for (int i = 0; i < wf->n_models; i++) {
        cJSON *m = wf_llm_model_describe(wf->llm, wf->models[i].llm);
        cJSON_AddStringToObject(m, "script_path", wf->models[i].path);
        cJSON_AddNumberToObject(m, "index", i);
        cJSON_AddItemToArray(ms, m);
    }
    cJSON *as = cJSON_AddArrayToObject(o, "agents");
    for (int i = 0; i < wf->n_agents; i++) {
        const wf_agent_t *a = &wf->agents[i];
        cJSON *x = cJSON_CreateObject();
        cJSON_AddStringToObject(x, "name", a->name);
        cJSON_AddNumberToObject(x, "model", a->model);
        cJSON_AddItemToObject(x, "role", kvm_json_str_or_null(a->role));
        cJSON_AddStringToObject(x, "template", a->tmpl);
        cJSON *parts = cJSON_AddArrayToObject(x, "parts");
        for (int k = 0; k < a->n_parts; k++) {
            cJSON *p = cJSON_CreateObject();
            if (a->parts[k].slot) {
                cJSON_AddStringToObject(p, "slot", a->parts[k].ph_name);
                cJSON_AddStringToObject(p, "src", a->parts[k].text);
            } else
                cJSON_AddStringToObject(p, "text", a->parts[k].text);
            cJSON_AddItemToArray(parts, p);
        }
        cJSON *sm = cJSON_AddObjectToObject(x, "sampling");
        cJSON_AddNumberToObject(sm, "temperature", a->sampling.temperature);
        cJSON_AddNumberToObject(sm, "top_k", a->sampling.top_k);
        cJSON_AddNumberToObject(sm, "top_p", a->sampling.top_p);
        cJSON_AddNumberToObject(sm, "repetition_penalty", a->sampling.repetition_penalty);
        cJSON_AddNumberToObject(x, "max_tokens", a->max_tokens);
        cJSON *st = cJSON_AddArrayToObject(x, "stop");
        for (int k = 0; k < a->n_stop; k++) cJSON_AddItemToArray(st, cJSON_CreateString(a->stop[k]));
        cJSON_AddNumberToObject(x, "budget_tokens", (double)a->budget_tokens);
        int kv = wf->o.kv_override ? wf_kv_policy_parse(wf->o.kv_override) : (int)a->kv;
        cJSON_AddStringToObject(x, "kv", wf_kv_policy_name(kv < 0 ? a->kv : (wf_kv_policy_t)kv));
        cJSON_AddStringToObject(x, "where", a->where);
        cJSON_AddItemToArray(as, x);
    }
    cJSON *gj = cJSON_AddObjectToObject(o, "graph");
    cJSON *nodes = cJSON_AddArrayToObject(gj, "nodes");
    static const char *const kinds[] = {"agent", "func", "tool"};
    for (int i = 0; i < g->n_nodes; i++) {
        cJSON *n = cJSON_CreateObject();
        cJSON_AddStringToObject(n, "name", g->nodes[i].name);
        cJSON_AddStringToObject(n, "kind", kinds[g->nodes[i].kind]);
        if (g->nodes[i].agent >= 0) cJSON_AddStringToObject(n, "agent", wf->agents[g->nodes[i].agent].name);
        if (g->nodes[i].writes) cJSON_AddStringToObject(n, "writes", g->nodes[i].writes);
        cJSON_AddBoolToObject(n, "router", g->nodes[i].router_ref != LUA_NOREF);
        cJSON_AddItemToArray(nodes, n);
    }
    cJSON *edges = cJSON_AddArrayToObject(gj, "edges");
    for (int i = 0; i < g->n_edges; i++) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "from", g->edges[i].from_name);
        cJSON_AddStringToObject(e, "to", g->edges[i].to_name);
        cJSON_AddBoolToObject(e, "conditional", g->edges[i].when_ref != LUA_NOREF);
        if (g->edges[i].on_error) cJSON_AddTrueToObject(e, "on_error");
        cJSON_AddItemToArray(edges, e);
    }
    cJSON *joins = cJSON_AddArrayToObject(gj, "joins");
    for (int i = 0; i < g->n_joins; i++) {
        cJSON *j = cJSON_CreateObject();
        cJSON *src = cJSON_AddArrayToObject(j, "sources");
        for (int k = 0; k < g->joins[i].n_src; k++) cJSON_AddItemToArray(src, cJSON_CreateString(g->joins[i].src_names[k]));
        cJSON_AddStringToObject(j, "target", g->joins[i].target_name);
        cJSON_AddStringToObject(j, "mode", g->joins[i].all ? "all" : "any");
        cJSON_AddItemToArray(joins, j);
    }
    cJSON *b = cJSON_AddObjectToObject(o, "build");
    cJSON_AddStringToObject(b, "version", KVM_VERSION);
    cJSON_AddStringToObject(b, "lua", LUA_RELEASE);
    cJSON_AddStringToObject(b, "cjson", cJSON_Version());
    trace_write(r, o);
}

static cJSON *kv_json(const wf_llm_kv_t *kv) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "exact", kv->exact);
    cJSON_AddNumberToObject(o, "offset", kv->offset);
    cJSON_AddNumberToObject(o, "naive", kv->naive);
    cJSON_AddNumberToObject(o, "recomputed", kv->recomputed);
    cJSON_AddNumberToObject(o, "fused", kv->fused);
    cJSON_AddStringToObject(o, "mode", kv->mode[0] ? kv->mode : "dense");
    cJSON_AddNumberToObject(o, "anchors", kv->anchors);
    return o;
}

static cJSON *error_json(int code, const char *msg) {
    cJSON *e = cJSON_CreateObject();
    cJSON_AddStringToObject(e, "code", kvm_errname(code));
    /* message = first line; traceback = the rest */
    const char *nl = msg ? strchr(msg, '\n') : NULL;
    if (nl) {
        char *first = kvm_malloc((size_t)(nl - msg) + 1);
        if (first) {
            memcpy(first, msg, (size_t)(nl - msg));
            first[nl - msg] = '\0';
            cJSON_AddStringToObject(e, "message", first);
            kvm_free(first);
        }
        cJSON_AddStringToObject(e, "traceback", nl + 1);
    } else
        cJSON_AddStringToObject(e, "message", msg ? msg : kvm_strerror(code));
    return e;
}

/* ---- tasks --------------------------------------------------------------------------------------- */

/* The task waiting for engine job `job`; *map_index is its index in a ctx:map batch, or -1. */
static wf_task_t *find_task_by_job(kvm_workflow_t *wf, uint64_t job, wf_run_t **run, int *map_index) {
    for (int i = 0; i < wf->n_runs; i++) {
        wf_run_t *r = wf->runs[i];
        for (int k = 0; k < r->n_tasks; k++) {
            wf_task_t *t = &r->tasks[k];
            *map_index = -1;
            if (t->job == job) {
                *run = r;
                return t;
            }
            for (int m = 0; m < t->n_m; m++)
                if (t->mjobs[m] == job) {
                    *run = r;
                    *map_index = m;
                    return t;
                }
        }
    }
    return NULL;
}

static void task_fail(wf_task_t *t, int code, char *msg) {
    t->err = code;
    kvm_free(t->errmsg);
    t->errmsg = msg;
}

static void trace_lua_step(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t) {
    const wf_node_t *n = &wf->g->nodes[t->node];
    int idx = r->step_idx++;
    if (wf->o.on_step) {
        kvm_wf_step_info_t si = {.run = r->idx, .run_id = r->id, .superstep = r->superstep, .node = n->name,
                                 .op = n->kind == WF_NODE_TOOL ? "tool" : "func", .status = t->err, .error = t->errmsg};
        wf->o.on_step(wf->o.ud, &si);
    }
    if (!r->trace) return;
    cJSON *o = rec_new("step");
    cJSON_AddNumberToObject(o, "idx", idx);
    cJSON_AddNumberToObject(o, "superstep", r->superstep);
    cJSON_AddStringToObject(o, "node", n->name);
    cJSON_AddStringToObject(o, "op", n->kind == WF_NODE_TOOL ? "tool" : "func");
    cJSON_AddStringToObject(o, "status", t->err ? "error" : "ok");
    cJSON_AddItemToObject(o, "t_start", kvm_json_u64(t->t_start));
    cJSON_AddItemToObject(o, "t_end", kvm_json_u64(kvm_wall_ns()));
    if (t->err) cJSON_AddItemToObject(o, "error", error_json(t->err, t->errmsg));
    else if (t->out_ref != LUA_NOREF) {
        lua_rawgeti(r->th, LUA_REGISTRYINDEX, t->out_ref);
        cJSON_AddItemToObject(o, "output", wf_lua_to_json(r->th, -1));
        lua_pop(r->th, 1);
    } else
        cJSON_AddNullToObject(o, "output");
    trace_write(r, o);
}

static void task_done(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t) {
    t->status = T_DONE;
    if (wf->g->nodes[t->node].kind != WF_NODE_AGENT) trace_lua_step(wf, r, t);
    if (--r->n_open == 0) r->need_end = true;
}

/* Resumes a func/tool coroutine with nargs values on its stack and handles how it stops. */
static void resume_task(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, int nargs) {
    int nres = 0;
    enter(wf, r);
    int st = lua_resume(t->co, r->th, nargs, &nres);
    leave(wf, r);
    if (st == LUA_YIELD) {
        lua_pop(t->co, nres);
        if (t->job || t->m_left > 0) {
            t->status = T_WAIT;
            return;
        }
        char *m = kvm_malloc(512);
        if (m) snprintf(m, 512, "%s: node '%s' yielded outside ctx:call (coroutine.yield is for the script's own coroutines)",
                        wf->g->nodes[t->node].where, wf->g->nodes[t->node].name);
        task_fail(t, KVM_ELUA_RUNTIME, m);
    } else if (st == LUA_OK) {
        if (nres > 0) {
            lua_settop(t->co, lua_gettop(t->co) - nres + 1); /* keep the first result */
            book(wf, r);
            lua_xmove(t->co, r->th, 1);
            t->out_ref = luaL_ref(r->th, LUA_REGISTRYINDEX);
            unbook(wf);
        }
    } else {
        int code = status_code(r, st);
        task_fail(t, code, error_text(r->th, t->co, st, wf->g->nodes[t->node].where));
    }
    task_done(wf, r, t);
}

static void push_last(wf_run_t *r) { lua_rawgeti(r->th, LUA_REGISTRYINDEX, r->last_ref); }

static void push_state_proxy(wf_run_t *r) {
    lua_rawgeti(r->th, LUA_REGISTRYINDEX, r->state_ref);
    wf_lua_push_proxy(r->th);
}

static void start_task(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t) {
    const wf_node_t *n = &wf->g->nodes[t->node];
    t->t_start = kvm_wall_ns();
    t->out_ref = LUA_NOREF;
    t->co_ref = LUA_NOREF;
    if (n->kind == WF_NODE_AGENT) {
        t->job = ++wf->job_serial;
        t->job_is_call = false;
        t->t_job = kvm_now_ns();
        int rc = submit_agent(wf, r, n->agent, NULL, 0, t->job, &t->pieces);
        if (rc) {
            t->job = 0;
            task_fail(t, rc, xstrdup(kvm_errmsg()));
            task_done(wf, r, t);
            return;
        }
        t->status = T_WAIT;
        return;
    }
    /* func/tool: fn(state, last, ctx) on a fresh coroutine */
    lua_State *L = r->th;
    book(wf, r);
    if (!lua_checkstack(L, 8)) {
        unbook(wf);
        task_fail(t, KVM_ELUA_MEMORY, xstrdup("Lua stack overflow"));
        task_done(wf, r, t);
        return;
    }
    t->co = lua_newthread(L);
    t->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_rawgeti(t->co, LUA_REGISTRYINDEX, n->fn_ref);
    lua_rawgeti(t->co, LUA_REGISTRYINDEX, r->state_ref);
    wf_lua_push_proxy(t->co);
    lua_rawgeti(t->co, LUA_REGISTRYINDEX, r->last_ref);
    lua_newtable(t->co);
    lua_pushstring(t->co, r->id);
    lua_setfield(t->co, -2, "run_id");
    lua_pushinteger(t->co, (lua_Integer)r->seed);
    lua_setfield(t->co, -2, "seed");
    lua_pushstring(t->co, n->name);
    lua_setfield(t->co, -2, "node");
    lua_pushinteger(t->co, r->superstep);
    lua_setfield(t->co, -2, "superstep");
    lua_rawgeti(t->co, LUA_REGISTRYINDEX, r->inputs_ref);
    lua_setfield(t->co, -2, "inputs");
    lua_rawgeti(t->co, LUA_REGISTRYINDEX, wf->ctx_mt_ref);
    lua_setmetatable(t->co, -2);
    unbook(wf);
    t->status = T_RUNNING;
    resume_task(wf, r, t, 3);
}

/* The preamble of ctx:call and ctx:map (`what` names the method in messages): the workflow, the run, the
 * running task whose coroutine is L, and the agent named or given by argument 1. Raises a Lua error when
 * called outside a node's own coroutine or with an unknown agent. */
static void ctx_agent_call_target(lua_State *L, const char *what, kvm_workflow_t **wf_out, wf_run_t **r_out,
                                  wf_task_t **t_out, int *ai_out) {
    void *ud;
    lua_getallocf(L, &ud);
    kvm_workflow_t *wf = ud;
    wf_run_t *r = wf->cur_run;
    wf_task_t *t = NULL;
    for (int i = 0; r && i < r->n_tasks; i++)
        if (r->tasks[i].co == L && r->tasks[i].status == T_RUNNING) t = &r->tasks[i];
    if (!t || !lua_isyieldable(L))
        luaL_error(L, "%s must be called from a func/tool node's own code (not from a predicate, router, "
                      "reducer or a coroutine the script created)", what);
    int ai = -1;
    if (lua_type(L, 2) == LUA_TSTRING) {
        for (int i = 0; i < wf->n_agents; i++)
            if (!strcmp(wf->agents[i].name, lua_tostring(L, 2))) ai = i;
        if (ai < 0) luaL_error(L, "%s: unknown agent '%s'", what, lua_tostring(L, 2));
    } else if ((ai = wf_lua_test_agent(L, 2)) < 0) {
        luaL_error(L, "%s: argument 1 must be an agent (kvmesh.agent handle or name)", what);
    }
    *wf_out = wf;
    *r_out = r;
    *t_out = t;
    *ai_out = ai;
}

/* ctx:call(agent, vars) -> text, info | nil, err. Only on a node's own coroutine. */
int wf_ctx_call(lua_State *L) {
    kvm_workflow_t *wf;
    wf_run_t *r;
    wf_task_t *t;
    int ai;
    ctx_agent_call_target(L, "ctx:call", &wf, &r, &t, &ai);
    int vars = 0;
    if (lua_type(L, 3) == LUA_TTABLE) vars = 3;
    else if (!lua_isnoneornil(L, 3)) return luaL_error(L, "ctx:call: argument 2 must be a table of placeholder values");
    uint64_t job = ++wf->job_serial;
    cJSON *pj = NULL;
    if (submit_agent(wf, r, ai, L, vars, job, &pj) != 0) {
        lua_pushnil(L);
        lua_pushstring(L, kvm_errmsg());
        return 2;
    }
    t->job = job;
    t->job_is_call = true;
    t->call_agent = ai;
    cJSON_Delete(t->pieces);
    t->pieces = pj;
    t->t_job = kvm_now_ns();
    return lua_yield(L, 0);
}

/* ctx:map(agent, {vars1, vars2, ...}) -> {out1, out2, ...}: one call of the agent per element, all in
 * flight at once (they share forward passes); out_i is the text, or {error = msg} for a failed call.
 * An element may be a table of placeholder values (as ctx:call) or a string (the value of {input}). */
int wf_ctx_map(lua_State *L) {
    kvm_workflow_t *wf;
    wf_run_t *r;
    wf_task_t *t;
    int ai;
    ctx_agent_call_target(L, "ctx:map", &wf, &r, &t, &ai);
    luaL_checktype(L, 3, LUA_TTABLE);
    int n = (int)lua_rawlen(L, 3);
    if (n > 256) return luaL_error(L, "ctx:map: at most 256 calls at once (got %d)", n);
    lua_createtable(L, n, 0);
    int res = lua_gettop(L);
    if (n == 0) return 1;
    uint64_t *jobs = kvm_calloc((size_t)n, sizeof *jobs);
    cJSON **pieces = kvm_calloc((size_t)n, sizeof *pieces);
    if (!jobs || !pieces) {
        kvm_free(jobs);
        kvm_free(pieces);
        return luaL_error(L, "ctx:map: out of memory");
    }
    int left = 0;
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, 3, i + 1);
        if (lua_type(L, -1) == LUA_TSTRING) { /* a bare string is {input} */
            lua_createtable(L, 0, 1);
            lua_insert(L, -2);
            lua_setfield(L, -2, "input");
        } else if (lua_type(L, -1) != LUA_TTABLE) {
            lua_pop(L, 1);
            lua_createtable(L, 0, 0);
        }
        uint64_t job = ++wf->job_serial;
        if (submit_agent(wf, r, ai, L, lua_gettop(L), job, &pieces[i]) != 0) {
            lua_createtable(L, 0, 1);
            lua_pushstring(L, kvm_errmsg());
            lua_setfield(L, -2, "error");
            lua_rawseti(L, res, i + 1);
        } else {
            jobs[i] = job;
            left++;
        }
        lua_pop(L, 1);
    }
    if (left == 0) {
        kvm_free(jobs);
        kvm_free(pieces);
        return 1;
    }
    lua_pushvalue(L, res);
    t->m_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    t->mjobs = jobs;
    t->mpieces = pieces;
    t->n_m = n;
    t->m_left = left;
    t->m_agent = ai;
    t->t_job = kvm_now_ns();
    return lua_yield(L, 0);
}

/* Records an agent step and updates the figures. */
static void record_agent_step(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, int ai, const wf_llm_result_t *res, int status,
                              const char *err, bool via_call) {
    const wf_agent_t *a = &wf->agents[ai];
    const wf_node_t *n = &wf->g->nodes[t->node];
    kvm_wf_agent_stats_t *s = &wf->stats[ai];
    s->calls++;
    if (status) s->errors++;
    s->prompt_tokens += res->n_prompt;
    s->output_tokens += res->n_out;
    s->exact += res->kv.exact;
    s->offset += res->kv.offset;
    s->naive += res->kv.naive;
    s->recomputed += res->kv.recomputed;
    s->fused += res->kv.fused;
    if (!strcmp(res->kv.mode, "reuse")) s->reuse_calls++;
    s->ttft_ms_sum += res->ttft_ms;
    s->decode_ms_sum += res->decode_ms;
    s->decode_tokens += res->n_out > 1 ? res->n_out - 1 : 0;
    r->tokens_in += res->n_prompt;
    r->tokens_out += res->n_out;
    r->agent_calls++;
    int idx = r->step_idx++;
    if (wf->o.on_step) {
        kvm_wf_step_info_t si = {.run = r->idx, .run_id = r->id, .superstep = r->superstep, .node = n->name, .agent = a->name,
                                 .op = "chat", .status = status, .error = err, .tokens_in = res->n_prompt, .tokens_out = res->n_out,
                                 .reused = res->kv.exact + res->kv.offset + res->kv.naive, .ttft_ms = res->ttft_ms,
                                 .decode_ms = res->decode_ms, .text = res->text};
        wf->o.on_step(wf->o.ud, &si);
    }
    if (!r->trace) {
        cJSON_Delete(t->pieces);
        t->pieces = NULL;
        return;
    }
    cJSON *o = rec_new("step");
    cJSON_AddNumberToObject(o, "idx", idx);
    cJSON_AddNumberToObject(o, "superstep", r->superstep);
    cJSON_AddStringToObject(o, "node", n->name);
    cJSON_AddStringToObject(o, "agent", a->name);
    cJSON_AddStringToObject(o, "op", "chat");
    if (via_call) cJSON_AddStringToObject(o, "via", "ctx:call");
    cJSON_AddStringToObject(o, "status", status ? "error" : "ok");
    cJSON_AddItemToObject(o, "t_start", kvm_json_u64(t->t_start));
    cJSON_AddItemToObject(o, "t_end", kvm_json_u64(kvm_wall_ns()));
    cJSON_AddStringToObject(o, "model", wf->models[a->model].path);
    cJSON_AddItemToObject(o, "system", kvm_json_str_or_null(a->role));
    cJSON_AddItemToObject(o, "pieces", t->pieces ? t->pieces : cJSON_CreateArray());
    t->pieces = NULL;
    cJSON *p = cJSON_AddObjectToObject(o, "prompt");
    cJSON_AddItemToObject(p, "text", kvm_json_str_or_null(res->prompt_text));
    cJSON_AddNumberToObject(p, "tokens", res->n_prompt);
    if (res->prompt_ids && res->n_prompt > 0) cJSON_AddItemToObject(p, "ids", cJSON_CreateIntArray(res->prompt_ids, res->n_prompt));
    cJSON *kv = kv_json(&res->kv);
    if (res->kv_detail) cJSON_AddItemToObject(kv, "decisions", cJSON_Duplicate(res->kv_detail, 1));
    cJSON_AddItemToObject(o, "kv", kv);
    cJSON *sm = cJSON_AddObjectToObject(o, "sampling");
    cJSON_AddNumberToObject(sm, "temperature", a->sampling.temperature);
    cJSON_AddNumberToObject(sm, "top_k", a->sampling.top_k);
    cJSON_AddNumberToObject(sm, "top_p", a->sampling.top_p);
    cJSON_AddNumberToObject(sm, "max_tokens", a->max_tokens);
    cJSON *out = cJSON_AddObjectToObject(o, "output");
    cJSON_AddItemToObject(out, "text", kvm_json_str_or_null(res->text));
    cJSON_AddNumberToObject(out, "tokens", res->n_out);
    cJSON_AddStringToObject(out, "stop", kvm_stop_reason_name(res->stop_reason));
    cJSON *tm = cJSON_AddObjectToObject(o, "timings");
    cJSON_AddNumberToObject(tm, "queue_ms", res->queue_ms);
    cJSON_AddNumberToObject(tm, "ttft_ms", res->ttft_ms);
    cJSON_AddNumberToObject(tm, "decode_ms", res->decode_ms);
    cJSON_AddNumberToObject(tm, "total_ms", ms_since(t->t_job));
    cJSON_AddNumberToObject(tm, "tokens_per_s", res->decode_ms > 0 && res->n_out > 1 ? (res->n_out - 1) / (res->decode_ms / 1e3) : 0);
    cJSON *b = cJSON_AddObjectToObject(o, "batch");
    cJSON_AddNumberToObject(b, "forwards", res->n_forward);
    cJSON_AddNumberToObject(b, "max_seqs", res->batch_max_seqs);
    cJSON_AddNumberToObject(b, "mean_seqs", res->batch_mean_seqs);
    cJSON_AddNumberToObject(b, "max_rows", res->batch_max_rows);
    if (status) cJSON_AddItemToObject(o, "error", error_json(status, err));
    trace_write(r, o);
}

static void deliver(kvm_workflow_t *wf, wf_llm_result_t *res) {
    wf_run_t *r;
    int mi;
    wf_task_t *t = find_task_by_job(wf, res->tag, &r, &mi);
    if (!t) return; /* its run ended meanwhile */
    if (mi >= 0) { /* one call of a ctx:map batch */
        const wf_agent_t *a = &wf->agents[t->m_agent];
        char msg[1024] = "";
        if (res->status) snprintf(msg, sizeof msg, "%s: agent '%s': %s", a->where, a->name, res->error ? res->error : kvm_strerror(res->status));
        cJSON_Delete(t->pieces);
        t->pieces = t->mpieces[mi];
        t->mpieces[mi] = NULL;
        record_agent_step(wf, r, t, t->m_agent, res, res->status, res->status ? msg : NULL, true);
        t->mjobs[mi] = 0;
        book(wf, r);
        lua_State *L = r->th;
        lua_rawgeti(L, LUA_REGISTRYINDEX, t->m_ref);
        if (res->status) {
            lua_createtable(L, 0, 1);
            lua_pushstring(L, msg);
            lua_setfield(L, -2, "error");
        } else
            lua_pushstring(L, res->text ? res->text : "");
        lua_rawseti(L, -2, mi + 1);
        lua_pop(L, 1);
        unbook(wf);
        if (--t->m_left > 0) return;
        book(wf, r);
        lua_rawgeti(t->co, LUA_REGISTRYINDEX, t->m_ref);
        luaL_unref(L, LUA_REGISTRYINDEX, t->m_ref);
        unbook(wf);
        t->m_ref = LUA_NOREF;
        kvm_free(t->mjobs);
        t->mjobs = NULL;
        for (int k = 0; k < t->n_m; k++) cJSON_Delete(t->mpieces[k]);
        kvm_free(t->mpieces);
        t->mpieces = NULL;
        t->n_m = 0;
        t->status = T_RUNNING;
        resume_task(wf, r, t, 1);
        return;
    }
    t->job = 0;
    bool call = t->job_is_call;
    int ai = call ? t->call_agent : wf->g->nodes[t->node].agent;
    const wf_agent_t *a = &wf->agents[ai];
    int status = res->status;
    char msg[1024] = "";
    if (status) snprintf(msg, sizeof msg, "%s: agent '%s': %s", a->where, a->name, res->error ? res->error : kvm_strerror(status));
    if (!status && a->budget_tokens > 0) {
        r->agent_tokens[ai] += res->n_prompt + res->n_out;
        if (r->agent_tokens[ai] > a->budget_tokens) {
            status = KVM_EBUDGET;
            snprintf(msg, sizeof msg, "%s: agent '%s' used %ld tokens in this run, over its budget of %ld", a->where, a->name,
                     r->agent_tokens[ai], a->budget_tokens);
        }
    }
    record_agent_step(wf, r, t, ai, res, status, status ? msg : NULL, call);
    if (call) {
        lua_State *co = t->co;
        book(wf, r);
        int ok = lua_checkstack(co, 4);
        if (ok && !status) {
            lua_pushstring(co, res->text ? res->text : "");
            lua_createtable(co, 0, 8);
            lua_pushinteger(co, res->n_prompt);
            lua_setfield(co, -2, "tokens_in");
            lua_pushinteger(co, res->n_out);
            lua_setfield(co, -2, "tokens_out");
            lua_pushnumber(co, res->ttft_ms);
            lua_setfield(co, -2, "ttft_ms");
            lua_pushstring(co, res->kv.mode[0] ? res->kv.mode : "dense");
            lua_setfield(co, -2, "kv");
            lua_pushstring(co, kvm_stop_reason_name(res->stop_reason));
            lua_setfield(co, -2, "stop");
        } else if (ok) {
            lua_pushnil(co);
            lua_pushstring(co, msg);
        }
        unbook(wf);
        t->status = T_RUNNING;
        resume_task(wf, r, t, 2);
        return;
    }
    if (status) task_fail(t, status, xstrdup(msg));
    else if (!(t->out_text = xstrdup(res->text))) task_fail(t, KVM_ENOMEM, xstrdup("out of memory keeping the agent's output"));
    task_done(wf, r, t);
}

/* ---- super-steps --------------------------------------------------------------------------------- */

static void finish_run(kvm_workflow_t *wf, wf_run_t *r, int code, char *msg);

static void start_superstep(kvm_workflow_t *wf, wf_run_t *r) {
    const wf_graph_t *g = wf->g;
    int n_ready = 0;
    for (int i = 0; i < g->n_nodes; i++) n_ready += r->ready[i];
    if (n_ready == 0) {
        finish_run(wf, r, 0, NULL);
        return;
    }
    long lim_steps = g->lim_steps ? g->lim_steps : 50;
    char buf[512];
    if (r->superstep >= lim_steps) {
        snprintf(buf, sizeof buf, "%s: graph '%s' reached its step budget (%ld super-steps) with nodes still ready", g->where, g->name, lim_steps);
        finish_run(wf, r, KVM_EBUDGET, xstrdup(buf));
        return;
    }
    if (g->lim_tokens > 0 && r->tokens_in + r->tokens_out > g->lim_tokens) {
        snprintf(buf, sizeof buf, "%s: graph '%s' used %ld tokens, over its budget of %ld", g->where, g->name, r->tokens_in + r->tokens_out, g->lim_tokens);
        finish_run(wf, r, KVM_EBUDGET, xstrdup(buf));
        return;
    }
    if (g->lim_wall_ms > 0 && ms_since(r->t0_mono) > (double)g->lim_wall_ms) {
        snprintf(buf, sizeof buf, "%s: graph '%s' ran past its wall-time budget of %ld ms", g->where, g->name, g->lim_wall_ms);
        finish_run(wf, r, KVM_EBUDGET, xstrdup(buf));
        return;
    }
    r->superstep++;
    r->tasks = kvm_calloc((size_t)n_ready, sizeof *r->tasks);
    if (!r->tasks) {
        finish_run(wf, r, KVM_ENOMEM, xstrdup("out of memory starting a super-step"));
        return;
    }
    if (r->trace) {
        cJSON *o = rec_new("superstep");
        cJSON_AddNumberToObject(o, "superstep", r->superstep);
        cJSON *nodes = cJSON_AddArrayToObject(o, "nodes");
        for (int i = 0; i < g->n_nodes; i++)
            if (r->ready[i]) cJSON_AddItemToArray(nodes, cJSON_CreateString(g->nodes[i].name));
        trace_write(r, o);
    }
    r->n_tasks = 0;
    for (int i = 0; i < g->n_nodes; i++)
        if (r->ready[i]) {
            r->tasks[r->n_tasks].node = i;
            r->tasks[r->n_tasks].out_ref = LUA_NOREF;
            r->tasks[r->n_tasks].co_ref = LUA_NOREF;
            r->tasks[r->n_tasks].m_ref = LUA_NOREF;
            r->n_tasks++;
            r->ready[i] = false;
        }
    r->n_open = r->n_tasks;
    r->need_end = false;
    for (int i = 0; i < r->n_tasks && !r->finished; i++) start_task(wf, r, &r->tasks[i]);
}

static int cmp_task_name(const void *a, const void *b, void *g) {
    const wf_graph_t *gr = g;
    return strcmp(gr->nodes[((const wf_task_t *)a)->node].name, gr->nodes[((const wf_task_t *)b)->node].name);
}

static void free_tasks(wf_run_t *r) {
    for (int i = 0; i < r->n_tasks; i++) {
        wf_task_t *t = &r->tasks[i];
        if (t->co_ref != LUA_NOREF) {
#if LUA_VERSION_RELEASE_NUM >= 50406
            lua_closethread(t->co, r->th);
#elif LUA_VERSION_RELEASE_NUM == 50405
            lua_resetthread(t->co, r->th);
#else
            lua_resetthread(t->co);
#endif
            luaL_unref(r->th, LUA_REGISTRYINDEX, t->co_ref);
        }
        if (t->out_ref != LUA_NOREF) luaL_unref(r->th, LUA_REGISTRYINDEX, t->out_ref);
        kvm_free(t->errmsg);
        kvm_free(t->out_text);
        cJSON_Delete(t->pieces);
        for (int k = 0; k < t->n_m; k++) cJSON_Delete(t->mpieces[k]);
        kvm_free(t->mpieces);
        kvm_free(t->mjobs);
        if (t->n_m && t->m_ref != LUA_NOREF) luaL_unref(r->th, LUA_REGISTRYINDEX, t->m_ref);
    }
    kvm_free(r->tasks);
    r->tasks = NULL;
    r->n_tasks = r->n_open = 0;
}

static void push_task_output(wf_run_t *r, const wf_task_t *t, const wf_graph_t *g) {
    lua_State *L = r->th;
    if (t->err) {
        lua_createtable(L, 0, 2);
        lua_pushstring(L, t->errmsg ? t->errmsg : "");
        lua_setfield(L, -2, "error");
        lua_pushstring(L, kvm_errname(t->err));
        lua_setfield(L, -2, "code");
    } else if (g->nodes[t->node].kind == WF_NODE_AGENT) lua_pushstring(L, t->out_text ? t->out_text : "");
    else if (t->out_ref != LUA_NOREF) lua_rawgeti(L, LUA_REGISTRYINDEX, t->out_ref);
    else lua_pushnil(L);
}

static void trace_edge(wf_run_t *r, const char *from, const char *to, const char *kind) {
    if (!r->trace) return;
    cJSON *o = rec_new("edge");
    cJSON_AddNumberToObject(o, "superstep", r->superstep);
    cJSON_AddStringToObject(o, "from", from);
    cJSON_AddStringToObject(o, "to", to);
    cJSON_AddStringToObject(o, "kind", kind);
    trace_write(r, o);
}

static void take_target(kvm_workflow_t *wf, wf_run_t *r, int from, int to, const char *kind) {
    const wf_graph_t *g = wf->g;
    if (to == WF_END) r->to_end[from] = true;
    else r->ready[to] = true;
    trace_edge(r, g->nodes[from].name, to == WF_END ? "END" : g->nodes[to].name, kind);
}

/* Runs a router's result (on top of r->th) into targets: a name, a list of names, or END. */
static int route_targets(kvm_workflow_t *wf, wf_run_t *r, int from, char **msg) {
    lua_State *L = r->th;
    const wf_graph_t *g = wf->g;
    const wf_node_t *n = &g->nodes[from];
    int top = lua_gettop(L);
    int count = lua_type(L, top) == LUA_TTABLE ? (int)lua_rawlen(L, top) : 1;
    for (int i = 1; i <= count; i++) {
        if (lua_type(L, top) == LUA_TTABLE) lua_rawgeti(L, top, i);
        else lua_pushvalue(L, top);
        const char *name = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        int to = !name ? -3 : !strcmp(name, WF_END_NAME) ? WF_END : wf_graph_find(g, name);
        if (to == -3 || to == -1) {
            char buf[512];
            snprintf(buf, sizeof buf, "%s: router of '%s' returned %s%s%s, which names no node (return a node name, a list of them, or kvmesh.END)",
                     n->route_where, n->name, name ? "'" : "a ", name ? name : luaL_typename(L, -1), name ? "'" : "");
            *msg = xstrdup(buf);
            lua_settop(L, top - 1);
            return KVM_EINVAL;
        }
        if (n->route_declared) {
            bool ok = false;
            for (int k = 0; k < n->n_route_targets; k++)
                if (n->route_targets[k] == to) ok = true;
            if (!ok) {
                char buf[512];
                snprintf(buf, sizeof buf, "%s: router of '%s' returned '%s', which is not among its declared targets", n->route_where, n->name, name);
                *msg = xstrdup(buf);
                lua_settop(L, top - 1);
                return KVM_EINVAL;
            }
        }
        take_target(wf, r, from, to, "route");
        lua_pop(L, 1);
    }
    lua_settop(L, top - 1);
    return 0;
}

/* Adds the Lua value on top of L (popped) to the run's outputs as `name`; false when out of memory. */
static bool output_put(wf_run_t *r, lua_State *L, const char *name) {
    cJSON *j = wf_lua_to_json(L, -1);
    lua_pop(L, 1);
    if (j && cJSON_AddItemToObject(r->outputs, name, j)) return true;
    cJSON_Delete(j);
    return false;
}

static int outputs_nomem(char **msg) {
    kvm_free(*msg);
    *msg = xstrdup("out of memory collecting the run's outputs");
    return KVM_ENOMEM;
}

static void end_superstep(kvm_workflow_t *wf, wf_run_t *r) {
    const wf_graph_t *g = wf->g;
    lua_State *L = r->th;
    qsort_r(r->tasks, (size_t)r->n_tasks, sizeof *r->tasks, cmp_task_name, (void *)g);
    int code = 0;
    char *msg = NULL;
    /* 1. updates, ascending node name */
    for (int i = 0; i < r->n_tasks && !code; i++) {
        wf_task_t *t = &r->tasks[i];
        const wf_node_t *n = &g->nodes[t->node];
        if (t->err) continue;
        if (n->kind == WF_NODE_AGENT || n->kind == WF_NODE_TOOL) {
            book(wf, r);
            push_task_output(r, t, g);
            char *text = wf_lua_value_text(L, -1);
            lua_pop(L, 1);
            unbook(wf);
            if (!text) { /* a missing output would read as "not produced yet" */
                code = outputs_nomem(&msg);
                break;
            }
            kvm_free(r->node_prev[t->node]);
            r->node_prev[t->node] = r->node_cur[t->node];
            r->node_cur[t->node] = text;
        }
        if (n->kind == WF_NODE_AGENT) {
            book(wf, r);
            lua_createtable(L, 0, 3);
            lua_pushstring(L, n->name);
            lua_setfield(L, -2, "node");
            lua_pushstring(L, wf->agents[n->agent].name);
            lua_setfield(L, -2, "agent");
            lua_pushstring(L, t->out_text ? t->out_text : "");
            lua_setfield(L, -2, "text");
            unbook(wf);
            code = reduce(wf, r, find_key(g, "msgs"), n->name, &msg);
        }
        if (!code && n->writes) {
            push_task_output(r, t, g);
            code = reduce(wf, r, find_key(g, n->writes), n->name, &msg);
        }
        if (!code && n->kind == WF_NODE_FUNC && t->out_ref != LUA_NOREF) {
            lua_rawgeti(L, LUA_REGISTRYINDEX, t->out_ref);
            int u = lua_gettop(L);
            if (lua_type(L, u) != LUA_TTABLE) {
                char buf[512];
                snprintf(buf, sizeof buf, "%s: func node '%s' must return a table of state updates or nothing (got %s)", n->where, n->name, luaL_typename(L, u));
                msg = xstrdup(buf);
                code = KVM_EINVAL;
            }
            if (!code) { /* iterate a shallow copy: the node's table stays intact for `last` and outputs */
                book(wf, r);
                lua_newtable(L);
                lua_pushnil(L);
                while (lua_next(L, u)) {
                    lua_pushvalue(L, -2);
                    lua_insert(L, -2);
                    lua_rawset(L, u + 1);
                }
                lua_replace(L, u);
                unbook(wf);
            }
            /* keys in sorted order for determinism */
            while (!code) {
                const char *best = NULL;
                lua_pushnil(L);
                while (lua_next(L, u)) {
                    lua_pop(L, 1);
                    if (lua_type(L, -1) != LUA_TSTRING) {
                        code = KVM_EINVAL;
                        break;
                    }
                    const char *k = lua_tostring(L, -1);
                    if (!best || strcmp(k, best) < 0) best = k;
                }
                if (code) {
                    lua_settop(L, u);
                    char buf[512];
                    snprintf(buf, sizeof buf, "%s: func node '%s' returned an update with a non-string key", n->where, n->name);
                    msg = xstrdup(buf);
                    break;
                }
                if (!best) break;
                char key[256];
                snprintf(key, sizeof key, "%s", best);
                const wf_key_t *k = find_key(g, key);
                if (!k) {
                    char buf[512];
                    snprintf(buf, sizeof buf, "%s: func node '%s' updated state key '%s', which the graph does not declare", n->where, n->name, key);
                    msg = xstrdup(buf);
                    code = KVM_EINVAL;
                    break;
                }
                lua_getfield(L, u, key);
                code = reduce(wf, r, k, n->name, &msg);
                lua_pushnil(L);
                lua_setfield(L, u, key); /* consumed (the node's own table) */
            }
            lua_settop(L, u - 1);
        }
    }
    /* 2. last = outputs of this super-step */
    book(wf, r);
    lua_newtable(L);
    for (int i = 0; i < r->n_tasks; i++) {
        push_task_output(r, &r->tasks[i], g);
        lua_setfield(L, -2, g->nodes[r->tasks[i].node].name);
    }
    luaL_unref(L, LUA_REGISTRYINDEX, r->last_ref);
    r->last_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    unbook(wf);
    for (int i = 0; i < g->n_nodes; i++) r->to_end[i] = false;
    /* 3. edges of completed nodes, same order */
    for (int i = 0; i < r->n_tasks && !code; i++) {
        wf_task_t *t = &r->tasks[i];
        const wf_node_t *n = &g->nodes[t->node];
        if (t->err) {
            bool handled = false;
            for (int k = 0; k < g->n_edges; k++)
                if (g->edges[k].from == t->node && g->edges[k].on_error) {
                    take_target(wf, r, t->node, g->edges[k].to, "on_error");
                    handled = true;
                }
            if (!handled) {
                code = t->err;
                msg = t->errmsg;
                t->errmsg = NULL;
            }
            continue;
        }
        for (int k = 0; k < g->n_edges && !code; k++) {
            const wf_edge_t *e = &g->edges[k];
            if (e->from != t->node || e->on_error) continue;
            if (e->when_ref == LUA_NOREF) {
                take_target(wf, r, t->node, e->to, "edge");
                continue;
            }
            lua_rawgeti(L, LUA_REGISTRYINDEX, e->when_ref);
            push_state_proxy(r);
            push_last(r);
            code = run_pcall(wf, r, 2, 1, &msg, e->where);
            if (code) break;
            bool yes = lua_toboolean(L, -1);
            lua_pop(L, 1);
            if (yes) take_target(wf, r, t->node, e->to, "when");
        }
        if (!code && n->router_ref != LUA_NOREF) {
            lua_rawgeti(L, LUA_REGISTRYINDEX, n->router_ref);
            push_state_proxy(r);
            push_last(r);
            code = run_pcall(wf, r, 2, 1, &msg, n->route_where);
            if (!code) code = route_targets(wf, r, t->node, &msg);
        }
        for (int j = 0; j < g->n_joins; j++)
            for (int k = 0; k < g->joins[j].n_src; k++)
                if (g->joins[j].src[k] == t->node) r->arrived[j][k] = true;
    }
    /* 4. joins */
    for (int j = 0; j < g->n_joins && !code; j++) {
        const wf_join_t *jn = &g->joins[j];
        int got = 0;
        for (int k = 0; k < jn->n_src; k++) got += r->arrived[j][k];
        if ((jn->all && got == jn->n_src) || (!jn->all && got > 0)) {
            r->ready[jn->target] = true;
            for (int k = 0; k < jn->n_src; k++) {
                if (r->arrived[j][k]) trace_edge(r, g->nodes[jn->src[k]].name, g->nodes[jn->target].name, jn->all ? "join_all" : "join_any");
                r->arrived[j][k] = false;
            }
        }
    }
    /* 5. outputs of nodes that reached END */
    if (!code) {
        bool any = false;
        for (int i = 0; i < g->n_nodes; i++) any |= r->to_end[i];
        if (any) {
            if (!r->outputs) r->outputs = cJSON_CreateObject();
            for (int i = 0; i < r->n_tasks && !code; i++)
                if (r->to_end[r->tasks[i].node]) {
                    push_task_output(r, &r->tasks[i], g);
                    cJSON_DeleteItemFromObjectCaseSensitive(r->outputs, g->nodes[r->tasks[i].node].name);
                    if (!output_put(r, L, g->nodes[r->tasks[i].node].name)) code = outputs_nomem(&msg);
                }
        }
    }
    if (r->trace) {
        cJSON *o = rec_new("checkpoint");
        cJSON_AddNumberToObject(o, "superstep", r->superstep);
        lua_rawgeti(L, LUA_REGISTRYINDEX, r->state_ref);
        cJSON_AddItemToObject(o, "state", wf_lua_to_json(L, -1));
        lua_pop(L, 1);
        cJSON *nx = cJSON_AddArrayToObject(o, "next");
        for (int i = 0; i < g->n_nodes; i++)
            if (r->ready[i]) cJSON_AddItemToArray(nx, cJSON_CreateString(g->nodes[i].name));
        trace_write(r, o);
    }
    /* the last super-step's outputs are the run's outputs when nothing reached END */
    if (!code) {
        int n_ready = 0;
        for (int i = 0; i < g->n_nodes; i++) n_ready += r->ready[i];
        if (n_ready == 0 && !r->outputs) {
            r->outputs = cJSON_CreateObject();
            for (int i = 0; i < r->n_tasks && !code; i++) {
                push_task_output(r, &r->tasks[i], g);
                if (!output_put(r, L, g->nodes[r->tasks[i].node].name)) code = outputs_nomem(&msg);
            }
        }
    }
    free_tasks(r);
    r->need_end = false;
    if (code) finish_run(wf, r, code, msg);
}

/* Ends a run: outputs (g:output if defined), final state, run.end record, index.json; releases its
 * coroutines and closes its memory account. msg is taken over. */
static void finish_run(kvm_workflow_t *wf, wf_run_t *r, int code, char *msg) {
    if (r->finished) {
        kvm_free(msg);
        return;
    }
    const wf_graph_t *g = wf->g;
    lua_State *L = r->th;
    if (!code && g->output_ref != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, g->output_ref);
        push_state_proxy(r);
        push_last(r);
        char *m = NULL;
        int rc = run_pcall(wf, r, 2, 1, &m, g->where);
        if (rc) {
            code = rc;
            msg = m;
        } else {
            cJSON_Delete(r->outputs);
            r->outputs = wf_lua_to_json(L, -1);
            lua_pop(L, 1);
            if (!r->outputs) code = outputs_nomem(&msg);
        }
    }
    if (!r->outputs) r->outputs = cJSON_CreateObject();
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->state_ref);
    cJSON_Delete(r->state);
    r->state = wf_lua_to_json(L, -1);
    lua_pop(L, 1);
    r->err = code;
    r->errmsg = msg;
    r->finished = true;
    double wall_ms = ms_since(r->t0_mono);
    if (r->trace) {
        cJSON *o = rec_new("run.end");
        cJSON_AddStringToObject(o, "run_id", r->id);
        cJSON_AddStringToObject(o, "status", code ? "error" : "ok");
        if (code) cJSON_AddItemToObject(o, "error", error_json(code, msg));
        cJSON_AddItemToObject(o, "outputs", cJSON_Duplicate(r->outputs, 1));
        cJSON_AddItemToObject(o, "state", cJSON_Duplicate(r->state, 1));
        cJSON *u = cJSON_AddObjectToObject(o, "usage");
        cJSON_AddNumberToObject(u, "input_tokens", (double)r->tokens_in);
        cJSON_AddNumberToObject(u, "output_tokens", (double)r->tokens_out);
        cJSON_AddNumberToObject(u, "agent_calls", r->agent_calls);
        cJSON *tm = cJSON_AddObjectToObject(o, "timings");
        cJSON_AddNumberToObject(tm, "wall_ms", wall_ms);
        cJSON_AddNumberToObject(tm, "lua_ms", (double)r->budget.lua_ns / 1e6);
        cJSON *bu = cJSON_AddObjectToObject(o, "budget_used");
        cJSON_AddNumberToObject(bu, "steps", r->superstep);
        cJSON_AddNumberToObject(bu, "tokens", (double)(r->tokens_in + r->tokens_out));
        cJSON_AddNumberToObject(bu, "instructions", (double)r->budget.instructions);
        cJSON_AddNumberToObject(bu, "lua_bytes_peak", (double)r->acct->peak);
        trace_write(r, o);
        cJSON *idx = cJSON_CreateObject();
        cJSON_AddStringToObject(idx, "run_id", r->id);
        cJSON_AddStringToObject(idx, "workflow", wf->path);
        cJSON_AddStringToObject(idx, "graph", g->name);
        cJSON_AddStringToObject(idx, "status", code ? "error" : "ok");
        if (code) cJSON_AddStringToObject(idx, "error", kvm_errname(code));
        cJSON_AddItemToObject(idx, "started", kvm_json_u64(r->t0_wall));
        cJSON_AddNumberToObject(idx, "wall_ms", wall_ms);
        cJSON_AddNumberToObject(idx, "supersteps", r->superstep);
        cJSON_AddNumberToObject(idx, "steps", r->step_idx);
        cJSON_AddNumberToObject(idx, "agent_calls", r->agent_calls);
        cJSON_AddNumberToObject(idx, "input_tokens", (double)r->tokens_in);
        cJSON_AddNumberToObject(idx, "output_tokens", (double)r->tokens_out);
        cJSON_AddItemToObject(idx, "seed", kvm_json_u64(r->seed));
        kvm_trace_write_index(r->trace, idx);
        cJSON_Delete(idx);
        kvm_trace_close(r->trace);
        r->trace = NULL;
    }
    free_tasks(r);
    if (wf_llm_run_end(wf->llm, r->id) != 0) KVM_LOGW("run %s: committing its KV anchors failed: %s", r->id, kvm_errmsg());
    /* drop the run's Lua objects; the account goes when its last block is freed */
    luaL_unref(L, LUA_REGISTRYINDEX, r->state_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, r->last_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, r->inputs_ref);
    r->state_ref = r->last_ref = r->inputs_ref = LUA_NOREF;
    lua_settop(L, 0);
    luaL_unref(wf->L, LUA_REGISTRYINDEX, r->th_ref);
    r->th = NULL;
    r->th_ref = LUA_NOREF;
    wf_account_charge_close(wf, r->acct);
    r->acct = NULL;
    lua_gc(wf->L, LUA_GCSTEP, 0);
}

/* ---- runs ---------------------------------------------------------------------------------------- */

static void run_free(kvm_workflow_t *wf, wf_run_t *r) {
    const wf_graph_t *g = wf->g;
    for (int i = 0; g && i < g->n_nodes; i++) { /* either array may be missing after a failed start */
        if (r->node_cur) kvm_free(r->node_cur[i]);
        if (r->node_prev) kvm_free(r->node_prev[i]);
    }
    kvm_free(r->node_cur);
    kvm_free(r->node_prev);
    kvm_free(r->ready);
    kvm_free(r->to_end);
    for (int j = 0; g && r->arrived && j < g->n_joins; j++) kvm_free(r->arrived[j]);
    kvm_free(r->arrived);
    kvm_free(r->agent_tokens);
    kvm_free(r->errmsg);
    kvm_free(r->tasks);
    kvm_trace_close(r->trace);
    cJSON_Delete(r->inputs);
    cJSON_Delete(r->outputs);
    cJSON_Delete(r->state);
    kvm_free(r);
}

void wf_runs_free(kvm_workflow_t *wf) {
    for (int i = 0; i < wf->n_runs; i++) run_free(wf, wf->runs[i]);
    kvm_free(wf->runs);
    wf->runs = NULL;
    wf->n_runs = wf->cap_runs = 0;
}

/* Sets up the run's Lua side (thread, inputs, state) under its own account; raises on memory. */
static int run_setup_protected(lua_State *L) {
    kvm_workflow_t *wf;
    lua_getallocf(L, (void **)&wf);
    wf_run_t *r = lua_touserdata(L, 1);
    const wf_graph_t *g = wf->g;
    r->th = lua_newthread(L);
    r->th_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    wf_lua_push_json(L, r->inputs);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
    }
    int in = lua_gettop(L);
    /* state: declared initial values (deep-copied through JSON), then inputs of declared keys */
    lua_rawgeti(L, LUA_REGISTRYINDEX, g->init_ref);
    cJSON *init = wf_lua_to_json(L, -1);
    lua_pop(L, 1);
    if (!init) return luaL_error(L, "not enough memory"); /* the state would miss its initial values */
    wf_lua_push_json(L, init);
    cJSON_Delete(init);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
    }
    int st = lua_gettop(L);
    for (int i = 0; i < g->n_keys; i++) {
        lua_getfield(L, in, g->keys[i].name);
        if (!lua_isnil(L, -1)) lua_setfield(L, st, g->keys[i].name);
        else lua_pop(L, 1);
    }
    r->state_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    r->inputs_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_newtable(L);
    r->last_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

int kvm_wf_start(kvm_workflow_t *wf, const cJSON *inputs, uint64_t seed, int *run) {
    const wf_graph_t *g = wf->g;
    if (inputs && !cJSON_IsObject(inputs)) return kvm_seterr(KVM_EINVAL, "run inputs must be a JSON object");
    if (wf->n_runs == wf->cap_runs) {
        int nc = wf->cap_runs ? wf->cap_runs * 2 : 16;
        wf_run_t **nr = kvm_realloc(wf->runs, (size_t)nc * sizeof *nr);
        if (!nr) return KVM_ENOMEM;
        wf->runs = nr;
        wf->cap_runs = nc;
    }
    wf_run_t *r = kvm_calloc(1, sizeof *r);
    if (!r) return KVM_ENOMEM;
    r->idx = wf->n_runs;
    r->seed = seed;
    r->rng[0] = seed ^ 0x9e3779b97f4a7c15ULL;
    r->rng[1] = kvm_hash64(&seed, sizeof seed, KVM_HASH_SEED) | 1;
    kvm_trace_new_id(r->id);
    r->t0_mono = kvm_now_ns();
    r->t0_wall = kvm_wall_ns();
    r->state_ref = r->inputs_ref = r->last_ref = r->th_ref = LUA_NOREF;
    r->inputs = inputs ? cJSON_Duplicate(inputs, 1) : cJSON_CreateObject();
    r->node_cur = kvm_calloc((size_t)g->n_nodes, sizeof *r->node_cur);
    r->node_prev = kvm_calloc((size_t)g->n_nodes, sizeof *r->node_prev);
    r->ready = kvm_calloc((size_t)g->n_nodes, sizeof *r->ready);
    r->to_end = kvm_calloc((size_t)g->n_nodes, sizeof *r->to_end);
    r->arrived = kvm_calloc((size_t)g->n_joins + 1, sizeof *r->arrived);
    r->agent_tokens = kvm_calloc((size_t)wf->n_agents + 1, sizeof *r->agent_tokens);
    r->acct = kvm_calloc(1, sizeof *r->acct);
    bool ok = r->inputs && r->node_cur && r->node_prev && r->ready && r->to_end && r->arrived && r->agent_tokens && r->acct;
    for (int j = 0; ok && j < g->n_joins; j++) ok = (r->arrived[j] = kvm_calloc((size_t)g->joins[j].n_src, sizeof **r->arrived)) != NULL;
    if (!ok) {
        kvm_free(r->acct);
        r->acct = NULL;
        run_free(wf, r);
        return kvm_seterr(KVM_ENOMEM, "out of memory starting a run");
    }
    r->acct->cap = g->lim_memory_mb > 0 ? (size_t)g->lim_memory_mb << 20 : wf->o.run_mem_cap_bytes;
    r->budget.max_instructions = g->lim_instructions ? g->lim_instructions : wf->o.max_instructions;
    r->budget.max_lua_ns = (uint64_t)((g->lim_lua_ms > 0 ? g->lim_lua_ms : wf->o.lua_cpu_ms) * 1e6);
    wf->runs[wf->n_runs++] = r;
    *run = r->idx;
    /* Lua side, charged to the run */
    wf->cur_acct = r->acct;
    lua_pushcfunction(wf->L, run_setup_protected);
    lua_pushlightuserdata(wf->L, r);
    int st = lua_pcall(wf->L, 1, 0, 0);
    wf->cur_acct = NULL;
    if (wf->o.trace_root) {
        r->trace = kvm_trace_open(wf->o.trace_root, r->id);
        if (!r->trace) KVM_LOGW("run %d: no trace (%s)", r->idx, kvm_errmsg());
    }
    if (st != LUA_OK || !r->th) {
        lua_pop(wf->L, 1);
        trace_run_start(wf, r);
        if (!r->th) { /* nothing Lua-side to release */
            r->finished = true;
            r->err = KVM_ELUA_MEMORY;
            r->errmsg = xstrdup("out of Lua memory starting the run (inputs too large for the run's memory cap?)");
            wf_account_charge_close(wf, r->acct);
            r->acct = NULL;
            return 0;
        }
        finish_run(wf, r, KVM_ELUA_MEMORY, xstrdup("out of Lua memory starting the run (inputs too large for the run's memory cap?)"));
        return 0;
    }
    trace_run_start(wf, r);
    for (int i = 0; i < g->n_edges; i++)
        if (g->edges[i].from == WF_START && g->edges[i].to >= 0) {
            r->ready[g->edges[i].to] = true;
            trace_edge(r, "START", g->nodes[g->edges[i].to].name, "edge");
        }
    return 0;
}

bool kvm_wf_has_dataset(const kvm_workflow_t *wf) { return wf->g->dataset_ref != LUA_NOREF; }
bool kvm_wf_has_score(const kvm_workflow_t *wf) { return wf->g->score_ref != LUA_NOREF; }

/* Calls a workflow-level function (dataset, score) on a scratch thread with a scratch budget. The
 * function and nargs arguments are on wf->L. On success the single result is converted to JSON. */
static int call_scratch(kvm_workflow_t *wf, int nargs, cJSON **out, const char *what) {
    lua_State *L = wf->L;
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, wf_lua_msgh);
    lua_insert(L, base);
    wf_budget_t b = {.max_instructions = wf->o.max_instructions, .max_lua_ns = (uint64_t)(wf->o.lua_cpu_ms * 1e6)};
    b.slice_t0 = kvm_now_ns();
    wf->cur_budget = &b;
    wf->cur_acct = wf->acct_shared;
    int st = lua_pcall(L, nargs, 1, base);
    wf->cur_budget = NULL;
    wf->cur_acct = NULL;
    int rc = 0;
    if (st != LUA_OK) {
        rc = kvm_seterr(b.killed ? KVM_EBUDGET : st == LUA_ERRMEM ? KVM_ELUA_MEMORY : KVM_ELUA_RUNTIME, "%s: %s", what,
                        lua_tostring(L, -1) ? lua_tostring(L, -1) : "not enough memory");
    } else
        *out = wf_lua_to_json(L, -1);
    lua_settop(L, base - 1);
    return rc;
}

int kvm_wf_start_seeded(kvm_workflow_t *wf, uint64_t seed, const cJSON *extra, int *run) {
    if (!kvm_wf_has_dataset(wf)) return kvm_seterr(KVM_EINVAL, "%s: the graph has no dataset (g:dataset(function(seed) ... end))", wf->path);
    wf->rng_load[0] = seed ^ 0x9e3779b97f4a7c15ULL;
    wf->rng_load[1] = kvm_hash64(&seed, sizeof seed, KVM_HASH_SEED) | 1;
    lua_rawgeti(wf->L, LUA_REGISTRYINDEX, wf->g->dataset_ref);
    lua_pushinteger(wf->L, (lua_Integer)seed);
    cJSON *in = NULL;
    int rc = call_scratch(wf, 1, &in, "dataset");
    if (rc) return rc;
    if (!cJSON_IsObject(in)) {
        cJSON_Delete(in);
        return kvm_seterr(KVM_EINVAL, "%s: g:dataset must return a table of inputs", wf->path);
    }
    for (const cJSON *c = extra ? extra->child : NULL; c; c = c->next) {
        cJSON_DeleteItemFromObjectCaseSensitive(in, c->string);
        cJSON_AddItemToObject(in, c->string, cJSON_Duplicate(c, 1));
    }
    rc = kvm_wf_start(wf, in, seed, run);
    cJSON_Delete(in);
    return rc;
}

int kvm_wf_run_score(kvm_workflow_t *wf, int run, double *score) {
    if (run < 0 || run >= wf->n_runs) return kvm_seterr(KVM_EINVAL, "no run %d", run);
    if (!kvm_wf_has_score(wf)) return 0;
    wf_run_t *r = wf->runs[run];
    lua_State *L = wf->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, wf->g->score_ref);
    cJSON *res = cJSON_CreateObject();
    cJSON_AddItemToObject(res, "outputs", cJSON_Duplicate(r->outputs, 1));
    cJSON_AddItemToObject(res, "state", cJSON_Duplicate(r->state, 1));
    cJSON_AddStringToObject(res, "status", r->err ? kvm_errname(r->err) : "ok");
    wf->cur_acct = wf->acct_shared;
    wf_lua_push_json(L, res); /* small; the shared account has room */
    wf_lua_push_json(L, r->inputs);
    wf->cur_acct = NULL;
    cJSON_Delete(res);
    cJSON *out = NULL;
    int rc = call_scratch(wf, 2, &out, "score");
    if (rc) return rc;
    *score = cJSON_IsBool(out) ? (cJSON_IsTrue(out) ? 1.0 : 0.0) : cJSON_IsNumber(out) ? out->valuedouble : 0.0;
    cJSON_Delete(out);
    return 1;
}

int kvm_wf_drive(kvm_workflow_t *wf) {
    for (;;) {
        bool active = false, progress = false;
        for (int i = 0; i < wf->n_runs; i++) {
            wf_run_t *r = wf->runs[i];
            if (r->finished) continue;
            active = true;
            if (r->need_end) {
                end_superstep(wf, r);
                progress = true;
            }
            if (!r->finished && r->n_open == 0 && !r->need_end) {
                start_superstep(wf, r);
                progress = true;
            }
        }
        if (!active) break;
        if (wf_llm_pending(wf->llm) > 0) {
            int n = wf_llm_step(wf->llm);
            if (n < 0) {
                char msg[512];
                snprintf(msg, sizeof msg, "engine: %s", kvm_errmsg());
                for (int i = 0; i < wf->n_runs; i++) finish_run(wf, wf->runs[i], n, xstrdup(msg));
                return n;
            }
            wf_llm_result_t res;
            while (wf_llm_take(wf->llm, &res) == 1) {
                deliver(wf, &res);
                wf_llm_result_clear(&res);
            }
            progress = true;
        }
        if (!progress) {
            for (int i = 0; i < wf->n_runs; i++)
                if (!wf->runs[i]->finished) {
                    bool waiting = false;
                    for (int k = 0; k < wf->runs[i]->n_tasks; k++) waiting |= wf->runs[i]->tasks[k].status != T_DONE;
                    finish_run(wf, wf->runs[i], KVM_EINTERNAL,
                               xstrdup(waiting ? "run stalled: a node waits for an engine step that never comes" : "run stalled"));
                }
        }
    }
    lua_gc(wf->L, LUA_GCCOLLECT);
    return 0;
}

/* ---- accessors ----------------------------------------------------------------------------------- */

int kvm_wf_n_runs(const kvm_workflow_t *wf) { return wf->n_runs; }

static const wf_run_t *get_run(const kvm_workflow_t *wf, int run) { return run >= 0 && run < wf->n_runs ? wf->runs[run] : NULL; }

int kvm_wf_run_status(const kvm_workflow_t *wf, int run, const char **msg) {
    const wf_run_t *r = get_run(wf, run);
    if (!r) return KVM_EINVAL;
    if (msg) *msg = r->errmsg;
    return r->finished ? r->err : KVM_EBUSY;
}

const char *kvm_wf_run_id(const kvm_workflow_t *wf, int run) {
    const wf_run_t *r = get_run(wf, run);
    return r ? r->id : NULL;
}

const char *kvm_wf_run_trace_dir(const kvm_workflow_t *wf, int run) {
    static __thread char buf[4096];
    const wf_run_t *r = get_run(wf, run);
    if (!r || !wf->o.trace_root) return NULL;
    if (kvm_path_join(buf, sizeof buf, wf->o.trace_root, r->id) != 0) return NULL;
    return buf;
}

const cJSON *kvm_wf_run_outputs(const kvm_workflow_t *wf, int run) {
    const wf_run_t *r = get_run(wf, run);
    return r ? r->outputs : NULL;
}
const cJSON *kvm_wf_run_state(const kvm_workflow_t *wf, int run) {
    const wf_run_t *r = get_run(wf, run);
    return r ? r->state : NULL;
}
const cJSON *kvm_wf_run_inputs(const kvm_workflow_t *wf, int run) {
    const wf_run_t *r = get_run(wf, run);
    return r ? r->inputs : NULL;
}

size_t kvm_wf_lua_bytes(const kvm_workflow_t *wf) { return wf->total_bytes; }
int kvm_wf_n_agents(const kvm_workflow_t *wf) { return wf->n_agents; }

const kvm_wf_agent_stats_t *kvm_wf_agent_stats(const kvm_workflow_t *wf, int i) {
    if (i < 0 || i >= wf->n_agents) return NULL;
    kvm_wf_agent_stats_t *s = &wf->stats[i];
    s->name = wf->agents[i].name;
    s->model = wf->models[wf->agents[i].model].path;
    int kv = wf->o.kv_override ? wf_kv_policy_parse(wf->o.kv_override) : (int)wf->agents[i].kv;
    s->kv = wf_kv_policy_name(kv < 0 ? wf->agents[i].kv : (wf_kv_policy_t)kv);
    return s;
}

wf_llm_t *kvm_wf_llm(kvm_workflow_t *wf) { return wf->llm; }
const char *kvm_wf_name(const kvm_workflow_t *wf) { return wf->g ? wf->g->name : wf->name; }

/* ---- load / free --------------------------------------------------------------------------------- */

static void graph_free(wf_graph_t *g) {
    if (!g) return;
    for (int i = 0; i < g->n_nodes; i++) {
        wf_node_t *n = &g->nodes[i];
        kvm_free(n->name);
        kvm_free(n->writes);
        kvm_free(n->where);
        kvm_free(n->route_targets);
        for (int k = 0; n->route_names && k < n->n_route_targets; k++) kvm_free(n->route_names[k]);
        kvm_free(n->route_names);
        kvm_free(n->route_where);
    }
    kvm_free(g->nodes);
    for (int i = 0; i < g->n_edges; i++) {
        kvm_free(g->edges[i].from_name);
        kvm_free(g->edges[i].to_name);
        kvm_free(g->edges[i].where);
    }
    kvm_free(g->edges);
    for (int i = 0; i < g->n_joins; i++) {
        for (int k = 0; g->joins[i].src_names && k < g->joins[i].n_src; k++) kvm_free(g->joins[i].src_names[k]);
        kvm_free(g->joins[i].src_names);
        kvm_free(g->joins[i].src);
        kvm_free(g->joins[i].target_name);
        kvm_free(g->joins[i].where);
    }
    kvm_free(g->joins);
    for (int i = 0; i < g->n_keys; i++) kvm_free(g->keys[i].name);
    kvm_free(g->keys);
    kvm_free(g->name);
    kvm_free(g->where);
    kvm_free(g);
}

void kvm_wf_free(kvm_workflow_t *wf) {
    if (!wf) return;
    wf_runs_free(wf);
    if (wf->L) lua_close(wf->L);
    kvm_free(wf->acct_shared);
    for (int i = 0; i < wf->n_graphs; i++) graph_free(wf->graphs[i]);
    kvm_free(wf->graphs);
    for (int i = 0; i < wf->n_agents; i++) {
        wf_agent_t *a = &wf->agents[i];
        kvm_free(a->name);
        kvm_free(a->role);
        kvm_free(a->tmpl);
        wf_template_free(a->parts, a->n_parts);
        for (int k = 0; k < a->n_stop; k++) kvm_free(a->stop[k]);
        kvm_free(a->stop);
        kvm_free(a->where);
    }
    kvm_free(wf->agents);
    kvm_free(wf->stats);
    for (int i = 0; i < wf->n_models; i++) {
        kvm_free(wf->models[i].path);
        kvm_free(wf->models[i].where);
    }
    kvm_free(wf->models);
    wf_llm_free(wf->llm);
    kvm_free(wf->path);
    kvm_free(wf->name);
    kvm_free(wf->source);
    kvm_free(wf);
}

kvm_workflow_t *kvm_wf_load_string(const char *name, const char *src, size_t len, const kvm_wf_opts_t *o) {
    kvm_core_init();
    kvm_workflow_t *wf = kvm_calloc(1, sizeof *wf);
    if (!wf) return NULL;
    if (o) wf->o = *o;
    if (!wf->o.mem_cap_bytes) wf->o.mem_cap_bytes = (size_t)512 << 20;
    if (!wf->o.run_mem_cap_bytes) wf->o.run_mem_cap_bytes = (size_t)64 << 20;
    if (!wf->o.max_instructions) wf->o.max_instructions = 1000000000ULL;
    if (wf->o.lua_cpu_ms <= 0) wf->o.lua_cpu_ms = 5000;
    if (wf->o.kv_override && wf_kv_policy_parse(wf->o.kv_override) < 0) {
        kvm_seterr(KVM_EINVAL, "--kv must be dense, prefix or kvcomm (got '%s')", wf->o.kv_override);
        kvm_free(wf);
        return NULL;
    }
    wf->total_cap = wf->o.mem_cap_bytes;
    wf->path = kvm_strdup(name);
    wf->name = kvm_strdup(name);
    wf->source = kvm_malloc(len + 1);
    wf->env_ref = wf->ctx_mt_ref = LUA_NOREF;
    wf->rng_load[0] = 0x9e3779b97f4a7c15ULL;
    wf->rng_load[1] = 1;
    if (!wf->path || !wf->name || !wf->source) {
        kvm_wf_free(wf);
        kvm_seterr(KVM_ENOMEM, "out of memory loading '%s'", name);
        return NULL;
    }
    memcpy(wf->source, src, len);
    wf->source[len] = '\0';
    wf->source_len = len;
    wf->source_hash = kvm_hash64(src, len, KVM_HASH_SEED);
    wf->llm = wf_llm_create(&wf->o.llm);
    if (!wf->llm || wf_lua_open(wf) != 0) {
        int c = kvm_errcode();
        char m[1024];
        snprintf(m, sizeof m, "%s", kvm_errmsg());
        kvm_wf_free(wf);
        kvm_seterr(c ? c : KVM_ENOMEM, "%s", m);
        return NULL;
    }
    char chunk[4200];
    snprintf(chunk, sizeof chunk, "@%s", name);
    if (wf_lua_load_script(wf, chunk, src, len) != 0) {
        int c = kvm_errcode();
        char m[4096];
        snprintf(m, sizeof m, "%s", kvm_errmsg());
        kvm_wf_free(wf);
        kvm_seterr(c, "%s", m);
        return NULL;
    }
    return wf;
}

kvm_workflow_t *kvm_wf_load(const char *path, const kvm_wf_opts_t *o) {
    char *src = NULL;
    size_t len = 0;
    if (kvm_read_file(path, &src, &len, (size_t)1 << 20) != 0) {
        kvm_errctx(kvm_errcode() ? kvm_errcode() : KVM_EIO, "workflow");
        return NULL;
    }
    kvm_workflow_t *wf = kvm_wf_load_string(path, src, len, o);
    kvm_free(src);
    return wf;
}
