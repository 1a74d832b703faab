/* wf_task.c - the Lua side of a run: which run's budget and account Lua work is charged to, protected
 * calls with tracebacks, reducers, the coroutines of func/tool nodes, ctx:call / ctx:map, the prompts
 * agents see (placeholders filled from the run), and engine results handed back to the waiting node.
 * The graph semantics that drive these are in wf_exec.c. */
#include "wf_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *xstrdup(const char *s) { return kvm_strdup(s ? s : ""); }

char *wf_strf(const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return kvm_strdup(buf);
}

/* ---- whose Lua is running ------------------------------------------------------------------------ */

void wf_enter(kvm_workflow_t *wf, wf_run_t *r) {
    wf->cur_run = r;
    wf->cur_budget = &r->budget;
    wf->cur_acct = r->acct;
    kvm_account_t *prev = kvm_account_enter(r->acct->mem);
    if (wf->mem_depth++ == 0) wf->mem_prev = prev;
    r->budget.slice_t0 = kvm_now_ns();
}

void wf_leave(kvm_workflow_t *wf, wf_run_t *r) {
    if (r->budget.slice_t0) r->budget.lua_ns += kvm_now_ns() - r->budget.slice_t0;
    r->budget.slice_t0 = 0;
    wf->cur_run = NULL;
    wf->cur_budget = NULL;
    wf->cur_acct = NULL;
    if (wf->mem_depth > 0 && --wf->mem_depth == 0) {
        kvm_account_enter(wf->mem_prev);
        wf->mem_prev = NULL;
    }
}

void wf_book(kvm_workflow_t *wf, wf_run_t *r) {
    wf->cur_run = r;
    wf->cur_budget = NULL;
    wf->cur_acct = r->acct;
}

void wf_unbook(kvm_workflow_t *wf) {
    wf->cur_run = NULL;
    wf->cur_acct = NULL;
}

/* ---- protected calls ----------------------------------------------------------------------------- */

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

int wf_run_pcall(kvm_workflow_t *wf, wf_run_t *r, int nargs, int nres, char **msg, const char *where) {
    lua_State *L = r->th;
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, wf_lua_msgh);
    lua_insert(L, base);
    wf_enter(wf, r);
    int st = lua_pcall(L, nargs, nres, base);
    wf_leave(wf, r);
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

int wf_run_call_state_fn(kvm_workflow_t *wf, wf_run_t *r, int fn_ref, char **msg, const char *where) {
    lua_State *L = r->th;
    lua_rawgeti(L, LUA_REGISTRYINDEX, fn_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->state_ref);
    wf_lua_push_proxy(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->last_ref);
    return wf_run_pcall(wf, r, 2, 1, msg, where);
}

/* ---- reducers ------------------------------------------------------------------------------------ */

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

/* Pushes state table S's field `name`, made an empty table first when it is not a table. */
static int push_table_field(lua_State *L, int S, const char *name) {
    lua_getfield(L, S, name);
    if (lua_type(L, -1) != LUA_TTABLE) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, S, name);
    }
    return lua_gettop(L);
}

/* append: a list extends the list, anything else is one more element. */
static void reduce_append(lua_State *L, int S, int v, const char *name) {
    int t = push_table_field(L, S, name);
    lua_Integer n = (lua_Integer)lua_rawlen(L, t);
    if (is_sequence(L, v)) {
        lua_Integer m = (lua_Integer)lua_rawlen(L, v);
        for (lua_Integer i = 1; i <= m; i++) {
            lua_rawgeti(L, v, i);
            lua_rawseti(L, t, n + i);
        }
    } else {
        lua_pushvalue(L, v);
        lua_rawseti(L, t, n + 1);
    }
}

static int reduce_merge(lua_State *L, int S, int v, const wf_key_t *k, const char *node, char **msg) {
    if (lua_type(L, v) != LUA_TTABLE) {
        *msg = wf_strf("node '%s': state key '%s' merges tables, got a %s", node, k->name, luaL_typename(L, v));
        return KVM_EINVAL;
    }
    int t = push_table_field(L, S, k->name);
    lua_pushnil(L);
    while (lua_next(L, v)) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, t);
    }
    return 0;
}

/* sum, max, min */
static int reduce_ordered(lua_State *L, int S, int v, const wf_key_t *k, const char *node, char **msg) {
    lua_getfield(L, S, k->name);
    int old = lua_gettop(L);
    if (k->reducer == WF_RED_SUM) {
        if (!lua_isnumber(L, v) || !(lua_isnil(L, old) || lua_isnumber(L, old))) {
            *msg = wf_strf("node '%s': state key '%s' sums numbers, got a %s", node, k->name, luaL_typename(L, v));
            return KVM_EINVAL;
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
                *msg = wf_strf("node '%s': state key '%s' (max/min) got values that cannot be compared", node, k->name);
                return KVM_EINVAL;
            }
            take = k->reducer == WF_RED_MAX ? lua_compare(L, old, v, LUA_OPLT) : lua_compare(L, v, old, LUA_OPLT);
        }
        lua_pushvalue(L, take ? v : old);
    }
    lua_setfield(L, S, k->name);
    return 0;
}

int wf_reduce(kvm_workflow_t *wf, wf_run_t *r, const wf_key_t *k, const char *node, char **msg) {
    lua_State *L = r->th;
    int v = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->state_ref);
    int S = v + 1;
    int rc = 0;
    wf_book(wf, r); /* allocations below are the run's */
    switch (k->reducer) {
    case WF_RED_REPLACE:
        lua_pushvalue(L, v);
        lua_setfield(L, S, k->name);
        break;
    case WF_RED_APPEND: reduce_append(L, S, v, k->name); break;
    case WF_RED_MERGE: rc = reduce_merge(L, S, v, k, node, msg); break;
    case WF_RED_SUM:
    case WF_RED_MAX:
    case WF_RED_MIN: rc = reduce_ordered(L, S, v, k, node, msg); break;
    default: /* custom function(old, new) -> value */
        wf_unbook(wf);
        lua_rawgeti(L, LUA_REGISTRYINDEX, k->fn_ref);
        lua_getfield(L, S, k->name);
        lua_pushvalue(L, v);
        rc = wf_run_pcall(wf, r, 2, 1, msg, NULL);
        wf_book(wf, r);
        if (rc == 0) lua_setfield(L, S, k->name);
        break;
    }
    wf_unbook(wf);
    lua_settop(L, v - 1);
    return rc;
}

static const wf_key_t *find_key(const wf_graph_t *g, const char *k) {
    for (int i = 0; i < g->n_keys; i++)
        if (!strcmp(g->keys[i].name, k)) return &g->keys[i];
    return NULL;
}

/* The smallest string key of the table at u, pushed (nil when the table is empty); *bad when a key is not
 * a string. Keys compare as byte strings of their full length. */
static void push_least_key(lua_State *L, int u, bool *bad) {
    *bad = false;
    lua_pushnil(L);
    int b = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, u)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) {
            *bad = true;
            lua_settop(L, b);
            return;
        }
        size_t lk = 0, lb = 0;
        const char *k = lua_tolstring(L, -1, &lk), *best = lua_isnil(L, b) ? NULL : lua_tolstring(L, b, &lb);
        int c = best ? memcmp(k, best, lk < lb ? lk : lb) : -1;
        if (c < 0 || (c == 0 && lk < lb)) {
            lua_pushvalue(L, -1);
            lua_replace(L, b);
        }
    }
}

int wf_apply_updates(kvm_workflow_t *wf, wf_run_t *r, const wf_task_t *t, char **msg) {
    lua_State *L = r->th;
    const wf_node_t *n = &r->g->nodes[t->node];
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->out_ref);
    int u = lua_gettop(L);
    if (lua_type(L, u) != LUA_TTABLE) {
        *msg = wf_strf("%s: func node '%s' must return a table of state updates or nothing (got %s)", n->where, n->name, luaL_typename(L, u));
        lua_settop(L, u - 1);
        return KVM_EINVAL;
    }
    /* iterate a shallow copy: the node's table stays intact for `last` and outputs */
    wf_book(wf, r);
    lua_newtable(L);
    lua_pushnil(L);
    while (lua_next(L, u)) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, u + 1);
    }
    lua_replace(L, u);
    wf_unbook(wf);
    int code = 0;
    for (;;) { /* keys in sorted order for determinism */
        bool bad;
        push_least_key(L, u, &bad);
        int kx = lua_gettop(L);
        if (bad) {
            *msg = wf_strf("%s: func node '%s' returned an update with a non-string key", n->where, n->name);
            code = KVM_EINVAL;
        }
        if (lua_isnil(L, kx)) break;
        const char *key = lua_tostring(L, kx); /* anchored at kx until the key is consumed */
        const wf_key_t *k = find_key(r->g, key);
        if (!k) {
            *msg = wf_strf("%s: func node '%s' updated state key '%.200s', which the graph does not declare", n->where, n->name, key);
            code = KVM_EINVAL;
            break;
        }
        lua_pushvalue(L, kx);
        lua_rawget(L, u);
        code = wf_reduce(wf, r, k, n->name, msg);
        lua_pushvalue(L, kx);
        lua_pushnil(L);
        lua_rawset(L, u); /* consumed (the node's own table) */
        lua_settop(L, kx - 1);
        if (code) break;
    }
    lua_settop(L, u - 1);
    return code;
}

/* Reduces an agent node's output into state key "msgs" as {node, agent, text}. */
int wf_reduce_message(kvm_workflow_t *wf, wf_run_t *r, const wf_task_t *t, char **msg) {
    lua_State *L = r->th;
    const wf_node_t *n = &r->g->nodes[t->node];
    wf_book(wf, r);
    lua_createtable(L, 0, 3);
    lua_pushstring(L, n->name);
    lua_setfield(L, -2, "node");
    lua_pushstring(L, wf->agents[n->agent].name);
    lua_setfield(L, -2, "agent");
    lua_pushstring(L, t->out_text ? t->out_text : "");
    lua_setfield(L, -2, "text");
    wf_unbook(wf);
    return wf_reduce(wf, r, find_key(r->g, "msgs"), n->name, msg);
}

/* Reduces the task's output into the state key its node writes (if any). */
int wf_reduce_writes(kvm_workflow_t *wf, wf_run_t *r, const wf_task_t *t, char **msg) {
    const wf_node_t *n = &r->g->nodes[t->node];
    if (!n->writes) return 0;
    wf_push_task_output(r, t, r->g);
    return wf_reduce(wf, r, find_key(r->g, n->writes), n->name, msg);
}

void wf_push_task_output(wf_run_t *r, const wf_task_t *t, const wf_graph_t *g) {
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

/* ---- prompts ------------------------------------------------------------------------------------- */

/* Text of placeholder `part` of agent a: from vars (ctx:call) if given, else from the run's inputs,
 * node outputs or state. */
/* One agent call's prompt may use at most this share of the run's memory cap (1/16: 4 MiB by default), so the
 * copies made for it, in the executor and in the engine, stay bounded per call. */
#define WF_PROMPT_SHARE 16

/* The text of the Lua value at idx of VL for placeholder p of agent a, or an error with a message: a string
 * over the per-call prompt limit is refused before it is copied. */
static int piece_text(wf_run_t *r, const wf_agent_t *a, const kvm_tpl_part_t *p, lua_State *VL, int idx, char **out) {
    size_t lim = r->acct->cap / WF_PROMPT_SHARE;
    *out = NULL;
    if (lua_type(VL, idx) == LUA_TSTRING && lua_rawlen(VL, idx) > lim)
        return kvm_seterr(KVM_ELUA_MEMORY, "%s: agent '%s': placeholder {%s} holds %zu bytes, over the per-call prompt limit of %zu bytes "
                                           "(1/%d of the run's memory cap)", a->where, a->name, p->source, (size_t)lua_rawlen(VL, idx), lim,
                          WF_PROMPT_SHARE);
    *out = wf_lua_value_text(VL, idx);
    if (*out) return 0;
    return kvm_errctx(kvm_errcode() == KVM_EBUDGET ? KVM_EBUDGET : KVM_ENOMEM, "%s: agent '%s': placeholder {%s}", a->where, a->name,
                      p->source);
}

static int slot_text(kvm_workflow_t *wf, wf_run_t *r, const wf_agent_t *a, int part, lua_State *VL, int vars, char **out,
                     bool *missing) {
    const kvm_tpl_part_t *p = &a->parts[part];
    lua_State *L = r->th;
    int rc;
    *missing = false;
    if (VL && vars && lua_type(VL, vars) == LUA_TSTRING) { /* ctx:map's bare string: the value of {input} */
        if (p->src == KVM_TPL_INPUT && !p->key) return piece_text(r, a, p, VL, vars, out);
    } else if (VL && vars) { /* read raw: no script code runs while the prompt is built */
        lua_pushstring(VL, p->source);
        lua_rawget(VL, vars);
        if (!lua_isnil(VL, -1)) {
            rc = piece_text(r, a, p, VL, lua_gettop(VL), out);
            lua_pop(VL, 1);
            return rc;
        }
        lua_pop(VL, 1);
    }
    switch (p->src) {
    case KVM_TPL_INPUT:
        lua_rawgeti(L, LUA_REGISTRYINDEX, r->inputs_ref);
        lua_getfield(L, -1, p->key ? p->key : "input");
        if (lua_isnil(L, -1)) {
            lua_pop(L, 2);
            return kvm_seterr(KVM_EINVAL, "%s: agent '%s': placeholder {%s} but the run has no input '%s' (give --input %s=...)",
                              a->where, a->name, p->source, p->key ? p->key : "input", p->key ? p->key : "input");
        }
        rc = piece_text(r, a, p, L, lua_gettop(L), out);
        lua_pop(L, 2);
        return rc;
    case KVM_TPL_AGENT:
    case KVM_TPL_TOOL:
    case KVM_TPL_AGENT_PREV: {
        int nd = a->part_node[part];
        const char *t = nd < 0 ? NULL : p->src == KVM_TPL_AGENT_PREV ? r->node_prev[nd] : r->node_cur[nd];
        *missing = t == NULL;
        *out = xstrdup(t);
        break;
    }
    default:
        lua_rawgeti(L, LUA_REGISTRYINDEX, r->state_ref);
        lua_getfield(L, -1, p->key);
        *missing = lua_isnil(L, -1);
        rc = piece_text(r, a, p, L, lua_gettop(L), out);
        lua_pop(L, 2);
        return rc;
    }
    (void)wf;
    return *out ? 0 : kvm_seterr(KVM_ENOMEM, "%s: agent '%s': out of memory copying placeholder {%s}", a->where, a->name, p->source);
}

void wf_seen_free(wf_seen_t *s) {
    if (!s) return;
    for (int i = 0; s->texts && i < s->n; i++) kvm_free(s->texts[i]);
    kvm_free(s->texts);
    kvm_free(s->parts);
    kvm_free(s);
}

/* What agent ai sees now: its template with the placeholders filled. Called with the run's memory account entered:
 * the copies count against its cap (an allocation that would pass it fails) for as long as they live. */
static int make_seen(kvm_workflow_t *wf, wf_run_t *r, int ai, lua_State *VL, int vars, wf_seen_t **out) {
    const wf_agent_t *a = &wf->agents[ai];
    const uint64_t refused0 = kvm_account_refusals(r->acct->mem);
    wf_seen_t *s = kvm_calloc(1, sizeof *s);
    if (s) {
        s->parts = kvm_calloc((size_t)a->n_parts + 1, sizeof *s->parts);
        s->texts = kvm_calloc((size_t)a->n_parts + 1, sizeof *s->texts);
        s->n = a->n_parts;
    }
    int rc = s && s->parts && s->texts ? 0 : kvm_seterr(KVM_ENOMEM, "agent '%s': out of memory building its prompt", a->name);
    for (int i = 0; rc == 0 && i < a->n_parts; i++) {
        const kvm_tpl_part_t *p = &a->parts[i];
        if (p->src == KVM_TPL_TEXT) {
            s->parts[i] = (kvm_trace_part_t){.text = p->text};
            continue;
        }
        bool missing;
        rc = slot_text(wf, r, a, i, VL, vars, &s->texts[i], &missing);
        s->parts[i] = (kvm_trace_part_t){.slot = p->text, .src = p->source, .text = s->texts[i], .missing = missing};
    }
    size_t bytes = sizeof *s + ((size_t)a->n_parts + 1) * (sizeof *s->parts + sizeof *s->texts);
    for (int i = 0; rc == 0 && i < a->n_parts; i++) bytes += s->texts[i] ? strlen(s->texts[i]) + 1 : 0;
    if (rc == 0 && bytes > r->acct->cap / WF_PROMPT_SHARE)
        rc = kvm_seterr(KVM_ELUA_MEMORY, "%s: agent '%s': its prompt pieces (%zu bytes) are over the per-call limit of %zu bytes (1/%d of the "
                                         "run's memory cap)", a->where, a->name, bytes, r->acct->cap / WF_PROMPT_SHARE, WF_PROMPT_SHARE);
    else if (rc && kvm_account_refusals(r->acct->mem) > refused0)
        rc = kvm_seterr(KVM_ELUA_MEMORY, "%s: agent '%s': its prompt pieces do not fit the run's memory cap (%zu MiB, %zu bytes in use)",
                        a->where, a->name, r->acct->cap >> 20, kvm_account_bytes(r->acct->mem));
    if (rc) {
        wf_seen_free(s);
        return rc;
    }
    s->bytes = bytes;
    *out = s;
    return 0;
}

/* Builds what agent ai sees and submits the step; on success *seen_out is what it sees. */
/* Submits the prompt s of agent ai for node `node` of run r (with the turns of a tool-call continuation, if any) as
 * engine job tag; a replay may give the step its output instead (node < 0: a continuation, never given). The caller
 * has entered the run's account. */
static int submit_seen(kvm_workflow_t *wf, wf_run_t *r, int node, int ai, const wf_seen_t *s, uint64_t tag, const wf_turn_t *turns,
                       int n_turns) {
    const wf_agent_t *a = &wf->agents[ai];
    int rc = 0;
    char *system = a->n_tools > 0 ? wf_tools_system(wf, a) : NULL; /* the tools shown to the model */
    if (a->n_tools > 0 && !system) return kvm_errctx(kvm_errcode() ? kvm_errcode() : KVM_ENOMEM, "%s: agent '%s'", a->where, a->name);
    wf_piece_t *pieces = kvm_calloc((size_t)s->n + 1, sizeof *pieces);
    if (!pieces) rc = kvm_seterr(KVM_ENOMEM, "agent '%s': out of memory building its prompt", a->name);
    for (int i = 0; pieces && i < s->n; i++)
        pieces[i] = (wf_piece_t){.is_slot = s->parts[i].slot != NULL, .name = s->parts[i].slot, .text = s->parts[i].text};
    if (rc == 0) {
        wf_llm_req_t req = {.model = wf->models[a->model].llm, .agent = a->name, .run_id = r->id,
                            .system = system ? system : a->role, .pieces = pieces, .n_pieces = s->n, .sampling = a->sampling,
                            .max_tokens = a->max_tokens, .stop = (const char *const *)a->stop, .n_stop = a->n_stop,
                            .kv = wf_run_agent_kv(wf, r, a), .ignore_eos = a->ignore_eos, .tag = tag, .timeout_ms = a->timeout_ms,
                            .retry_max = a->retry_max, .retry_backoff_ms = a->retry_backoff_ms, .retry_on = a->retry_on,
                            .turns = turns, .n_turns = n_turns, .acct = r->acct->mem, .c2c = a->c2c,
                            .c2c_section = a->c2c_section};
        /* the run's wall-time budget (and those of the graphs above a subgraph) also stops a generation under way */
        req.run_deadline_ns = wf_run_deadline_ns(r);
        if (req.sampling.seed == 0) req.sampling.seed = r->seed * 1000003u + (uint64_t)r->root->step_idx + 1;
        if (r->root->replay && node >= 0) wf_replay_apply(wf, r, node, ai, &req.given_text, &req.sampling.seed, &req.kv);
        rc = wf_llm_submit(wf->llm, &req);
        if (rc) rc = kvm_errctx(rc, "%s: agent '%s'", a->where, a->name);
    }
    kvm_free(pieces);
    kvm_free(system);
    return rc;
}

static int submit_agent(kvm_workflow_t *wf, wf_run_t *r, int node, int ai, lua_State *VL, int vars, uint64_t tag, wf_seen_t **seen_out) {
    wf_seen_t *s = NULL;
    kvm_account_t *prev = kvm_account_enter(r->acct->mem); /* the prompt and the engine's copies of it are the run's */
    int rc = make_seen(wf, r, ai, VL, vars, &s);
    if (!rc) rc = submit_seen(wf, r, node, ai, s, tag, NULL, 0);
    if (rc) wf_seen_free(s);
    else *seen_out = s;
    kvm_account_enter(prev);
    return rc;
}

int wf_agent_resubmit(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, int ai, uint64_t tag, const wf_turn_t *turns, int n_turns) {
    kvm_account_t *prev = kvm_account_enter(r->acct->mem);
    int rc = submit_seen(wf, r, -1, ai, t->seen, tag, turns, n_turns);
    kvm_account_enter(prev);
    return rc;
}

/* ---- tasks --------------------------------------------------------------------------------------- */

/* The task waiting for engine job `job`; *map_index is its index in a ctx:map batch, or -1. */
static wf_task_t *find_task_by_job(kvm_workflow_t *wf, uint64_t job, wf_run_t **run, int *map_index) {
    for (int i = 0; i < wf->n_runs; i++) {
        wf_task_t *t = wf_subgraph_find_job(wf->runs[i], job, run, map_index);
        if (t) return t;
    }
    return NULL;
}

static void task_fail(wf_task_t *t, int code, char *msg) {
    t->err = code;
    kvm_free(t->errmsg);
    t->errmsg = msg;
}

/* Resumes a func/tool coroutine with nargs values on its stack and handles how it stops. */
static void resume_task(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, int nargs) {
    int nres = 0;
    wf_enter(wf, r);
    int st = lua_resume(t->co, r->th, nargs, &nres);
    wf_leave(wf, r);
    if (st == LUA_YIELD) {
        lua_pop(t->co, nres);
        if (t->job || t->m_left > 0 || t->parked || t->tool_call) {
            t->status = WF_T_WAIT;
            return;
        }
        task_fail(t, KVM_ELUA_RUNTIME, wf_strf("%s: node '%s' yielded outside ctx:call (coroutine.yield is for the script's own coroutines)",
                                               r->g->nodes[t->node].where, r->g->nodes[t->node].name));
    } else if (st == LUA_OK) {
        if (nres > 0) {
            lua_settop(t->co, lua_gettop(t->co) - nres + 1); /* keep the first result */
            wf_book(wf, r);
            lua_xmove(t->co, r->th, 1);
            t->out_ref = luaL_ref(r->th, LUA_REGISTRYINDEX);
            wf_unbook(wf);
        }
    } else {
        task_fail(t, status_code(r, st), error_text(r->th, t->co, st, r->g->nodes[t->node].where));
    }
    wf_task_done(wf, r, t);
}

void wf_task_resume(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, int nargs) { resume_task(wf, r, t, nargs); }

/* Pushes the ctx table of a func/tool node on co: run_id, seed, node, superstep, inputs; ctx methods. */
static void push_ctx(kvm_workflow_t *wf, wf_run_t *r, lua_State *co, const wf_node_t *n) {
    lua_newtable(co);
    lua_pushstring(co, r->id);
    lua_setfield(co, -2, "run_id");
    lua_pushinteger(co, (lua_Integer)r->seed);
    lua_setfield(co, -2, "seed");
    lua_pushstring(co, n->name);
    lua_setfield(co, -2, "node");
    lua_pushinteger(co, r->superstep);
    lua_setfield(co, -2, "superstep");
    lua_rawgeti(co, LUA_REGISTRYINDEX, r->inputs_ref);
    lua_setfield(co, -2, "inputs");
    lua_rawgeti(co, LUA_REGISTRYINDEX, wf->ctx_mt_ref);
    lua_setmetatable(co, -2);
}

void wf_task_start(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t) {
    const wf_node_t *n = &r->g->nodes[t->node];
    t->t_start = kvm_wall_ns();
    t->out_ref = LUA_NOREF;
    t->co_ref = LUA_NOREF;
    if (n->kind == WF_NODE_SUBGRAPH) {
        wf_subgraph_start(wf, r, t);
        return;
    }
    if (n->kind == WF_NODE_AGENT) {
        t->job = ++wf->job_serial;
        t->job_is_call = false;
        t->t_job = kvm_now_ns();
        int rc = submit_agent(wf, r, t->node, n->agent, NULL, 0, t->job, &t->seen);
        if (rc) {
            t->job = 0;
            task_fail(t, rc, xstrdup(kvm_errmsg()));
            wf_task_done(wf, r, t);
            return;
        }
        t->status = WF_T_WAIT;
        return;
    }
    /* func/tool: fn(state, last, ctx) on a fresh coroutine */
    lua_State *L = r->th;
    wf_book(wf, r);
    if (!lua_checkstack(L, 8)) {
        wf_unbook(wf);
        task_fail(t, KVM_ELUA_MEMORY, xstrdup("Lua stack overflow"));
        wf_task_done(wf, r, t);
        return;
    }
    t->co = lua_newthread(L);
    t->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_rawgeti(t->co, LUA_REGISTRYINDEX, n->fn_ref);
    lua_rawgeti(t->co, LUA_REGISTRYINDEX, r->state_ref);
    wf_lua_push_proxy(t->co);
    lua_rawgeti(t->co, LUA_REGISTRYINDEX, r->last_ref);
    push_ctx(wf, r, t->co, n);
    wf_unbook(wf);
    t->status = WF_T_RUNNING;
    resume_task(wf, r, t, 3);
}

void wf_tasks_free(kvm_workflow_t *wf, wf_run_t *r) {
    for (int i = 0; i < r->n_tasks; i++) {
        wf_task_t *t = &r->tasks[i];
        if (t->co_ref != LUA_NOREF) {
            wf_enter(wf, r); /* pending __close handlers run here: under the run's budgets */
#if LUA_VERSION_RELEASE_NUM >= 50406
            lua_closethread(t->co, r->th);
#elif LUA_VERSION_RELEASE_NUM == 50405
            lua_resetthread(t->co, r->th);
#else
            lua_resetthread(t->co);
#endif
            wf_leave(wf, r);
            luaL_unref(r->th, LUA_REGISTRYINDEX, t->co_ref);
        }
        if (t->child) wf_subgraph_abort(wf, t);
        if (t->out_ref != LUA_NOREF) luaL_unref(r->th, LUA_REGISTRYINDEX, t->out_ref);
        kvm_free(t->errmsg);
        kvm_free(t->out_text);
        if (t->parked) wf_run_park(r, -1); /* its root is not parked in it any more */
        t->parked = false;
        cJSON_Delete(t->payload);
        kvm_free(t->ask_node);
        kvm_free(t->tool_name);
        cJSON_Delete(t->tool_value);
        kvm_free(t->tool_msg);
        cJSON_Delete(t->turns);
        wf_seen_free(t->seen);
        for (int k = 0; k < t->n_m; k++) wf_seen_free(t->mseen[k]);
        kvm_free(t->mseen);
        kvm_free(t->mjobs);
        if (t->n_m && t->m_ref != LUA_NOREF) luaL_unref(r->th, LUA_REGISTRYINDEX, t->m_ref);
    }
    kvm_free(r->tasks);
    r->tasks = NULL;
    r->n_tasks = r->n_open = 0;
}

/* ---- kvmesh.interrupt ------------------------------------------------------------------------------ */

int wf_interrupt(lua_State *L) {
    void *ud;
    lua_getallocf(L, &ud);
    kvm_workflow_t *wf = ud;
    wf_run_t *r = wf->cur_run;
    wf_task_t *t = NULL;
    for (int i = 0; r && i < r->n_tasks; i++)
        if (r->tasks[i].co == L && r->tasks[i].status == WF_T_RUNNING) t = &r->tasks[i];
    if (!t || !lua_isyieldable(L))
        return luaL_error(L, "kvmesh.interrupt must be called from a func/tool node's own code (not from a predicate, "
                             "router, reducer, the script's top level or a coroutine the script created)");
    const char *node = r->g->nodes[t->node].name;
    const cJSON *given = r->answers ? cJSON_GetObjectItemCaseSensitive(r->answers, node) : NULL;
    int k = t->n_interrupts++;
    if (k < cJSON_GetArraySize(given)) { /* answered already (a resumed run replays its answers in order) */
        wf_lua_push_json(L, cJSON_GetArrayItem(given, k));
        return 1;
    }
    lua_settop(L, 1);
    cJSON *payload = wf_lua_to_json(L, 1);
    if (!payload) return luaL_error(L, "kvmesh.interrupt: the payload: %s", kvm_errmsg());
    char path[512];
    kvm_free(t->ask_node);
    t->ask_node = r->parent ? kvm_strdup(wf_step_node_path(r, node, path, sizeof path)) : NULL; /* "write/ask" */
    t->parked = true;
    t->payload = payload;
    wf_run_park(r, +1); /* the whole run waits (a subgraph's run parks its root) */
    wf_trace_interrupt(r, node, payload, given);
    return lua_yield(L, 0);
}

void wf_task_answer(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, const cJSON *value) {
    t->parked = false;
    cJSON_Delete(t->payload);
    t->payload = NULL;
    kvm_free(t->ask_node);
    t->ask_node = NULL;
    t->status = WF_T_RUNNING;
    wf_book(wf, r);
    int ok = lua_checkstack(t->co, 4);
    if (ok) wf_lua_push_json(t->co, value); /* small (it was parsed from the caller's JSON); charged to the run */
    wf_unbook(wf);
    if (!ok) {
        task_fail(t, KVM_ELUA_MEMORY, xstrdup("Lua stack overflow answering kvmesh.interrupt"));
        wf_task_done(wf, r, t);
        return;
    }
    resume_task(wf, r, t, 1);
}

wf_task_t *wf_running_task(const kvm_workflow_t *wf, lua_State *L) {
    wf_run_t *r = wf->cur_run;
    for (int i = 0; r && i < r->n_tasks; i++)
        if (r->tasks[i].co == L && r->tasks[i].status == WF_T_RUNNING) return &r->tasks[i];
    return NULL;
}

/* ---- ctx:call and ctx:map -------------------------------------------------------------------------- */

/* Who calls ctx:call / ctx:map: the workflow, the run, the running task whose coroutine is L, and
 * the agent named or given by argument 1. */
typedef struct ctx_target {
    kvm_workflow_t *wf;
    wf_run_t *r;
    wf_task_t *t;
    int ai;
} ctx_target_t;

/* The preamble of ctx:call and ctx:map (`what` names the method in messages). Raises a Lua error when
 * called outside a node's own coroutine or with an unknown agent. */
static ctx_target_t ctx_agent_call_target(lua_State *L, const char *what) {
    void *ud;
    lua_getallocf(L, &ud);
    ctx_target_t c = {.wf = ud, .ai = -1};
    c.r = c.wf->cur_run;
    c.t = wf_running_task(c.wf, L);
    if (!c.t || !lua_isyieldable(L))
        luaL_error(L, "%s must be called from a func/tool node's own code (not from a predicate, router, "
                      "reducer or a coroutine the script created)", what);
    if (lua_type(L, 2) == LUA_TSTRING) {
        for (int i = 0; i < c.wf->n_agents; i++)
            if (!strcmp(c.wf->agents[i].name, lua_tostring(L, 2))) c.ai = i;
        if (c.ai < 0) luaL_error(L, "%s: unknown agent '%s'", what, lua_tostring(L, 2));
    } else if ((c.ai = wf_lua_test_agent(L, 2)) < 0) {
        luaL_error(L, "%s: argument 1 must be an agent (kvmesh.agent handle or name)", what);
    }
    /* engine work started from Lua is the run's: its token and wall-time budgets stop it here (a kill, as
     * the hook's), and every call is charged to its instruction budget */
    const wf_graph_t *g = c.r->g;
    long used = c.r->tokens_in + c.r->tokens_out;
    double ms = (double)(kvm_now_ns() - c.r->t0_mono) / 1e6;
    if (g->lim_tokens > 0 && used >= g->lim_tokens)
        wf_budget_kill(L, "%s: graph '%.40s' used %ld tokens, over its token budget of %ld", what, g->name, used, g->lim_tokens);
    if (g->lim_wall_ms > 0 && ms > (double)g->lim_wall_ms)
        wf_budget_kill(L, "%s: graph '%.40s' ran past its wall-time budget of %ld ms", what, g->name, g->lim_wall_ms);
    char *over = NULL;
    if (c.r->parent && wf_subgraph_budgets(c.r, &over)) { /* a subgraph's run: the budgets of the graphs above it too */
        char buf[512];
        snprintf(buf, sizeof buf, "%s", over ? over : "over the budget of a graph above this subgraph");
        kvm_free(over);
        wf_budget_kill(L, "%s: %s", what, buf);
    }
    wf_charge(L, WF_CALL_INSTRUCTIONS);
    return c;
}

/* ctx:call(agent, vars) -> text, info | nil, err. Only on a node's own coroutine. */
int wf_ctx_call(lua_State *L) {
    ctx_target_t c = ctx_agent_call_target(L, "ctx:call");
    kvm_workflow_t *wf = c.wf;
    wf_task_t *t = c.t;
    int vars = 0;
    if (lua_type(L, 3) == LUA_TTABLE) vars = 3;
    else if (!lua_isnoneornil(L, 3)) return luaL_error(L, "ctx:call: argument 2 must be a table of placeholder values");
    uint64_t job = ++wf->job_serial;
    wf_seen_t *seen = NULL;
    if (submit_agent(wf, c.r, c.t->node, c.ai, L, vars, job, &seen) != 0) {
        lua_pushnil(L);
        lua_pushstring(L, kvm_errmsg());
        return 2;
    }
    wf_charge(L, (double)seen->bytes); /* the prompt built in C */
    t->job = job;
    t->job_is_call = true;
    t->call_agent = c.ai;
    wf_seen_free(t->seen);
    t->seen = seen;
    t->t_job = kvm_now_ns();
    return lua_yield(L, 0);
}

/* Writes the messages of ctx:map calls that could not be submitted into the results table as {error = msg}
 * (run under lua_pcall: a memory error must not leak the batch). */
static int map_fill_errors(lua_State *L) {
    char **errs = lua_touserdata(L, 2);
    int n = (int)lua_tointeger(L, 3);
    for (int i = 0; i < n; i++) {
        if (!errs[i]) continue;
        lua_createtable(L, 0, 1);
        lua_pushstring(L, errs[i]);
        lua_setfield(L, -2, "error");
        lua_rawseti(L, 1, i + 1);
    }
    return 0;
}

/* Releases a ctx:map batch that was not handed to its task. */
static void map_batch_free(uint64_t *jobs, wf_seen_t **seen, char **errs, int n) {
    for (int i = 0; i < n; i++) {
        wf_seen_free(seen[i]);
        kvm_free(errs[i]);
    }
    kvm_free(jobs);
    kvm_free(seen);
    kvm_free(errs);
}

/* ctx:map(agent, {vars1, vars2, ...}) -> {out1, out2, ...}: one call of the agent per element, all in
 * flight at once (they share forward passes); out_i is the text, or {error = msg} for a failed call.
 * An element may be a table of placeholder values (as ctx:call) or a string (the value of {input}).
 * Nothing between the first C allocation and the hand-over to the task can raise: the prompts' copies are
 * charged to the run's memory cap and freed on every path. */
int wf_ctx_map(lua_State *L) {
    ctx_target_t c = ctx_agent_call_target(L, "ctx:map");
    kvm_workflow_t *wf = c.wf;
    wf_task_t *t = c.t;
    luaL_checktype(L, 3, LUA_TTABLE);
    int n = (int)lua_rawlen(L, 3);
    if (n > 256) return luaL_error(L, "ctx:map: at most 256 calls at once (got %d)", n);
    lua_createtable(L, n, 0);
    int res = lua_gettop(L);
    if (n == 0) return 1;
    luaL_checkstack(L, 8, "ctx:map");
    uint64_t *jobs = kvm_calloc((size_t)n, sizeof *jobs);
    wf_seen_t **seen = kvm_calloc((size_t)n, sizeof *seen);
    char **errs = kvm_calloc((size_t)n, sizeof *errs);
    if (!jobs || !seen || !errs) {
        kvm_free(jobs);
        kvm_free(seen);
        kvm_free(errs);
        return luaL_error(L, "ctx:map: out of memory");
    }
    int left = 0;
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, 3, i + 1);
        int ty = lua_type(L, -1), vars = ty == LUA_TSTRING || ty == LUA_TTABLE ? lua_gettop(L) : 0;
        uint64_t job = ++wf->job_serial;
        if (submit_agent(wf, c.r, c.t->node, c.ai, L, vars, job, &seen[i]) != 0) {
            seen[i] = NULL;
            if (!(errs[i] = kvm_strdup(kvm_errmsg()))) errs[i] = kvm_strdup("out of memory");
        } else {
            jobs[i] = job;
            left++;
            wf_charge(L, (double)seen[i]->bytes + WF_CALL_INSTRUCTIONS);
        }
        lua_pop(L, 1);
    }
    lua_pushcfunction(L, map_fill_errors);
    lua_pushvalue(L, res);
    lua_pushlightuserdata(L, errs);
    lua_pushinteger(L, n);
    int st = lua_pcall(L, 3, 0, 0);
    if (st != LUA_OK || left == 0) { /* results of calls already submitted find no task: they are dropped */
        map_batch_free(jobs, seen, errs, n);
        return st != LUA_OK ? lua_error(L) : 1;
    }
    for (int i = 0; i < n; i++) kvm_free(errs[i]);
    kvm_free(errs);
    lua_pushvalue(L, res);
    t->m_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    t->mjobs = jobs;
    t->mseen = seen;
    t->n_m = n;
    t->m_left = left;
    t->m_agent = c.ai;
    t->t_job = kvm_now_ns();
    return lua_yield(L, 0);
}

/* ---- engine results ------------------------------------------------------------------------------- */

/* One call of a ctx:map batch finished: its result goes into the results table; the last one resumes
 * the node with the table. */
/* Charges the engine's work on an agent call made from Lua to the run's instruction budget (its tokens: a loop of calls
 * costs what the engine does for it, not only what Lua does). Over the budget, the run is killed as the hook kills it
 * (its Lua raises at its next instruction; the executor checks at the next super-step) and its steps still queued or
 * generating are canceled: the engine stops working for it at their next token. */
static void charge_engine_work(kvm_workflow_t *wf, wf_run_t *r, const wf_llm_result_t *res) {
    wf_budget_t *b = &r->budget;
    b->instructions += (uint64_t)(res->n_out > 0 ? res->n_out : 0) * WF_TOKEN_INSTRUCTIONS +
                       (uint64_t)(res->n_prompt > 0 ? res->n_prompt : 0) * WF_PROMPT_TOKEN_INSTRUCTIONS;
    if (b->killed || !b->max_instructions || b->instructions <= b->max_instructions) return;
    b->killed = true;
    b->kill_code = KVM_EBUDGET;
    snprintf(b->kill_msg, sizeof b->kill_msg, "instruction budget exceeded (%llu, agent calls' tokens included; the smaller of "
             "--instructions and g:limit{instructions = N})", (unsigned long long)b->max_instructions);
    if (!r->parent) wf_llm_cancel_run(wf->llm, r->id); /* a subgraph's run shares its root's id: it fails at its next super-step */
}

static void deliver_map(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, int mi, const wf_llm_result_t *res) {
    const wf_agent_t *a = &wf->agents[t->m_agent];
    char msg[1024] = "";
    if (res->status) snprintf(msg, sizeof msg, "%s: agent '%s': %s", a->where, a->name, res->error ? res->error : kvm_strerror(res->status));
    wf_seen_free(t->seen);
    t->seen = t->mseen[mi];
    t->mseen[mi] = NULL;
    wf_agent_step_done(wf, r, t, t->m_agent, res, res->status, res->status ? msg : NULL, true);
    t->mjobs[mi] = 0;
    lua_State *L = r->th;
    wf_book(wf, r);
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->m_ref);
    if (res->status) {
        lua_createtable(L, 0, 1);
        lua_pushstring(L, msg);
        lua_setfield(L, -2, "error");
    } else
        lua_pushstring(L, res->text ? res->text : "");
    lua_rawseti(L, -2, mi + 1);
    lua_pop(L, 1);
    if (--t->m_left > 0) {
        wf_unbook(wf);
        return;
    }
    lua_rawgeti(t->co, LUA_REGISTRYINDEX, t->m_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, t->m_ref);
    wf_unbook(wf);
    t->m_ref = LUA_NOREF;
    kvm_free(t->mjobs);
    t->mjobs = NULL;
    for (int k = 0; k < t->n_m; k++) wf_seen_free(t->mseen[k]);
    kvm_free(t->mseen);
    t->mseen = NULL;
    t->n_m = 0;
    t->status = WF_T_RUNNING;
    resume_task(wf, r, t, 1);
}

/* Resumes a ctx:call with (text, info) or (nil, message). */
static void resume_call(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, const wf_llm_result_t *res, int status, const char *msg) {
    lua_State *co = t->co;
    wf_book(wf, r);
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
    wf_unbook(wf);
    t->status = WF_T_RUNNING;
    resume_task(wf, r, t, 2);
}

void wf_deliver(kvm_workflow_t *wf, wf_llm_result_t *res) {
    wf_run_t *r;
    int mi;
    wf_task_t *t = find_task_by_job(wf, res->tag, &r, &mi);
    if (!t) return; /* its run ended meanwhile */
    if (mi >= 0 || t->job_is_call) charge_engine_work(wf, r, res);
    if (mi >= 0) {
        deliver_map(wf, r, t, mi, res);
        return;
    }
    t->job = 0;
    bool call = t->job_is_call;
    int ai = call ? t->call_agent : r->g->nodes[t->node].agent;
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
    if (!status && a->n_tools > 0) { /* the model may have called tools: they run and the generation goes on */
        int rc = wf_tools_model_round(wf, r, t, ai, res, msg, sizeof msg);
        if (rc == 1) return; /* the next round is in flight */
        if (rc < 0) status = rc;
    }
    cJSON_Delete(t->turns);
    t->turns = NULL;
    t->tool_rounds = 0;
    wf_agent_step_done(wf, r, t, ai, res, status, status ? msg : NULL, call);
    if (call) {
        resume_call(wf, r, t, res, status, msg);
        return;
    }
    if (status) task_fail(t, status, xstrdup(msg));
    else if (!(t->out_text = xstrdup(res->text))) task_fail(t, KVM_ENOMEM, xstrdup("out of memory keeping the agent's output"));
    wf_task_done(wf, r, t);
}

/* ---- run set-up and workflow-level calls ------------------------------------------------------------ */

/* Sets up the run's Lua side (thread, inputs, state) under its own account; raises on memory. */
static int run_setup_protected(lua_State *L) {
    kvm_workflow_t *wf;
    lua_getallocf(L, (void **)&wf);
    wf_run_t *r = lua_touserdata(L, 1);
    const wf_graph_t *g = r->g;
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
    if (!init) return luaL_error(L, "initial state: %s", kvm_errmsg()); /* the state would miss its initial values */
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

int wf_run_setup(kvm_workflow_t *wf, wf_run_t *r) {
    wf->cur_acct = r->acct;
    lua_pushcfunction(wf->L, run_setup_protected);
    lua_pushlightuserdata(wf->L, r);
    int st = lua_pcall(wf->L, 1, 0, 0);
    wf->cur_acct = NULL;
    if (st != LUA_OK) lua_pop(wf->L, 1);
    return st;
}

int wf_call_scratch(kvm_workflow_t *wf, int nargs, cJSON **out, const char *what) {
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
    } else if (!(*out = wf_lua_to_json(L, -1)))
        rc = kvm_errctx(kvm_errcode() ? kvm_errcode() : KVM_ENOMEM, "%s", what);
    lua_settop(L, base - 1);
    return rc;
}
