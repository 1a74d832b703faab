/* wf_subgraph.c - subgraphs: a graph used as a node of another graph (g:subgraph, docs/lua-api.md "Subgraphs").
 *
 * A subgraph node starts a child run of its graph when its super-step starts: the child has its own state (its
 * graph's initial values, then the parent's keys named by the node's `input` map), its own super-steps, edges and
 * joins, and the parent's run inputs. When the child ends, the child keys named by the `output` map become the node's
 * output, {parent_key = value}, which the parent's reducers apply as a func node's updates; a failed child fails the
 * node (its on_error edges route it). The child is driven by the parent's kvm_wf_advance pass (wf_run_advance) and its
 * agent calls share the engine's batches with every other run.
 *
 * Budgets: the child's token and wall-time budgets are its graph's, and the graphs above it are checked too (its
 * tokens count in every run above it as they are used); its instruction and Lua-time budgets are its graph's limits,
 * never above what the parent has left when it starts, and what it used is added to the parent's when it ends. Its
 * Lua memory is the parent's account (the run's cap holds for the whole tree).
 *
 * Trace: the child writes its steps into the root's trace with "graph", "depth" and "parent" (the idx of its node's
 * step, taken when the node starts), and its checkpoints with "path" (the subgraph nodes down to it, each with the
 * super-step it ran in: "write@3/check@2"); its super-steps and edges are not written. A resume starts from a root
 * checkpoint; in the super-step after it, a subgraph node whose child wrote checkpoints continues from the last one
 * (sub_resume), with the interrupt answers given after it, so an interrupt inside a subgraph resumes where it parked.
 *
 * Interrupts: kvmesh.interrupt in a child's node parks the node; the root waits while every open task of it waits
 * (parked, or a subgraph node whose child waits), and kvm_wf_run_resume answers the first parked node of the tree.
 *
 * Load time: the maps name declared keys of both graphs, a graph is never its own subgraph (directly or through
 * others) and subgraphs nest at most WF_SUB_MAX_DEPTH deep; each error names the g:subgraph line. */
#include "wf_internal.h"

#include <stdio.h>
#include <string.h>

/* ---- load time --------------------------------------------------------------------------------------------- */

static bool has_key(const wf_graph_t *g, const char *k) {
    for (int i = 0; i < g->n_keys; i++)
        if (!strcmp(g->keys[i].name, k)) return true;
    return false;
}

/* The declared keys of g as "a, b, c" into buf. */
static const char *key_list(const wf_graph_t *g, char *buf, size_t cap) {
    size_t l = 0;
    buf[0] = '\0';
    for (int i = 0; i < g->n_keys && l + 2 < cap; i++) l += (size_t)snprintf(buf + l, cap - l, "%s%s", i ? ", " : "", g->keys[i].name);
    return buf;
}

/* Whether graph `from` holds graph `want` as a subgraph node, directly or below (the relation is kept acyclic). */
static bool contains(const kvm_workflow_t *wf, const wf_graph_t *from, const wf_graph_t *want) {
    for (int i = 0; i < from->n_nodes; i++) {
        if (from->nodes[i].kind != WF_NODE_SUBGRAPH) continue;
        const wf_graph_t *c = wf->graphs[from->nodes[i].sub];
        if (c == want || contains(wf, c, want)) return true;
    }
    return false;
}

/* Levels of subgraphs below g (0 = none). */
static int height(const kvm_workflow_t *wf, const wf_graph_t *g) {
    int h = 0;
    for (int i = 0; i < g->n_nodes; i++)
        if (g->nodes[i].kind == WF_NODE_SUBGRAPH) {
            int c = 1 + height(wf, wf->graphs[g->nodes[i].sub]);
            if (c > h) h = c;
        }
    return h;
}

/* Levels of graphs that hold g as a subgraph, above it (0 = none). */
static int above(const kvm_workflow_t *wf, const wf_graph_t *g) {
    int a = 0;
    for (int k = 0; k < wf->n_graphs; k++)
        for (int i = 0; i < wf->graphs[k]->n_nodes; i++)
            if (wf->graphs[k]->nodes[i].kind == WF_NODE_SUBGRAPH && wf->graphs[wf->graphs[k]->nodes[i].sub] == g) {
                int c = 1 + above(wf, wf->graphs[k]);
                if (c > a) a = c;
            }
    return a;
}

/* Checks a map table {from = to} at t (nil = none): strings, `from` declared in gf, `to` in gt, no `to` twice, at most
 * 256 pairs. Raises naming the node, the map and the key; allocates nothing. */
static void check_map(lua_State *L, int t, const char *call, const char *node, const char *map, const wf_graph_t *gf,
                      const wf_graph_t *gt) {
    char keys[512];
    if (lua_isnil(L, t)) return;
    bool in = !strcmp(map, "input");
    if (lua_type(L, t) != LUA_TTABLE)
        luaL_error(L, "%s: node '%s': '%s' must be a table of %s_key = %s_key (got %s)", call, node, map, in ? "parent" : "child",
                   in ? "child" : "parent", luaL_typename(L, t));
    int count = 0;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "%s: node '%s': '%s' maps state key names to state key names (strings); got %s = %s", call, node, map,
                       luaL_typename(L, -2), luaL_typename(L, -1));
        const char *f = lua_tostring(L, -2), *d = lua_tostring(L, -1);
        if (strlen(f) != lua_rawlen(L, -2) || strlen(d) != lua_rawlen(L, -1))
            luaL_error(L, "%s: node '%s': '%s': a key name contains a NUL byte", call, node, map);
        if (!has_key(gf, f))
            luaL_error(L, "%s: node '%s': %s maps '%s', which graph '%s' does not declare (its state keys: %s)", call, node, map, f,
                       gf->name, key_list(gf, keys, sizeof keys));
        if (!has_key(gt, d))
            luaL_error(L, "%s: node '%s': %s maps '%s' to '%s', which graph '%s' does not declare (its state keys: %s)", call, node, map,
                       f, d, gt->name, key_list(gt, keys, sizeof keys));
        lua_pop(L, 1);
        if (++count > 256) luaL_error(L, "%s: node '%s': '%s' maps more than 256 keys", call, node, map);
    }
    /* the same destination twice */
    lua_pushnil(L);
    while (lua_next(L, t)) {
        int here = lua_gettop(L);
        lua_pushnil(L);
        while (lua_next(L, t)) {
            if (!lua_rawequal(L, -2, here - 1) && lua_rawequal(L, -1, here))
                luaL_error(L, "%s: node '%s': %s maps two keys to '%s' (each key of graph '%s' is set once)", call, node, map,
                           lua_tostring(L, here), gt->name);
            lua_pop(L, 1);
        }
        lua_settop(L, here - 1);
    }
}

/* Copies a checked map at t into *from / *to (*n pairs); false when out of memory (nothing kept). Raises nothing. */
static bool copy_map(lua_State *L, int t, char ***from, char ***to, int *n) {
    *from = *to = NULL;
    *n = 0;
    if (lua_isnil(L, t)) return true;
    int count = 0;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        lua_pop(L, 1);
        count++;
    }
    char **vf = kvm_calloc((size_t)count + 1, sizeof *vf), **vt = kvm_calloc((size_t)count + 1, sizeof *vt);
    bool ok = vf && vt;
    int k = 0;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        if (ok && k < count) {
            vf[k] = kvm_strdup(lua_tostring(L, -2));
            vt[k] = kvm_strdup(lua_tostring(L, -1));
            ok = vf[k] && vt[k];
            k++;
        }
        lua_pop(L, 1);
    }
    if (!ok) {
        for (int i = 0; i < k; i++) {
            kvm_free(vf ? vf[i] : NULL);
            kvm_free(vt ? vt[i] : NULL);
        }
        kvm_free(vf);
        kvm_free(vt);
        return false;
    }
    *from = vf;
    *to = vt;
    *n = k;
    return true;
}

bool wf_lua_is_subgraph_spec(lua_State *L, int idx) {
    if (lua_type(L, idx) != LUA_TTABLE) return false;
    lua_pushstring(L, "subgraph");
    bool yes = lua_rawget(L, idx) != LUA_TNIL;
    lua_pop(L, 1);
    return yes;
}

/* g:subgraph(name, child [, {input = {parent_key = child_key, ...}, output = {child_key = parent_key, ...}}]) and
 * g:node(name, {subgraph = child, input = ..., output = ...}). */
int wf_lua_g_subgraph(lua_State *L) {
    void *ud;
    lua_getallocf(L, &ud);
    kvm_workflow_t *wf = ud;
    bool as_node = wf_lua_is_subgraph_spec(L, 3);
    const char *call = as_node ? "g:node" : "g:subgraph";
    wf_graph_t *g = wf_lua_check_graph(L, 1, call);
    const char *name = wf_lua_check_name(L, 2, call);
    int spec = 0, ci;
    if (as_node) {
        static const char *const nf[] = {"subgraph", "input", "output", NULL};
        spec = 3;
        wf_lua_check_fields(L, spec, call, nf);
        lua_pushstring(L, "subgraph");
        lua_rawget(L, spec);
        ci = wf_lua_graph_index(L, -1);
        lua_pop(L, 1);
        if (ci < 0) return luaL_error(L, "%s: node '%s': field 'subgraph' must be a graph (kvmesh.graph{...})", call, name);
    } else {
        static const char *const sf[] = {"input", "output", NULL};
        ci = wf_lua_graph_index(L, 3);
        if (ci < 0) return luaL_error(L, "%s: node '%s': argument 2 must be a graph (kvmesh.graph{...}), got %s", call, name, luaL_typename(L, 3));
        if (!lua_isnoneornil(L, 4)) {
            luaL_checktype(L, 4, LUA_TTABLE);
            spec = 4;
            wf_lua_check_fields(L, spec, call, sf);
        }
    }
    const wf_graph_t *child = wf->graphs[ci];
    if (child == g) return luaL_error(L, "%s: node '%s': graph '%s' cannot be a subgraph of itself", call, name, g->name);
    if (contains(wf, child, g))
        return luaL_error(L, "%s: node '%s': graph '%s' already holds graph '%s' as a subgraph: subgraphs may not form a cycle", call, name,
                          child->name, g->name);
    int depth = above(wf, g) + 1 + height(wf, child);
    if (depth > WF_SUB_MAX_DEPTH)
        return luaL_error(L, "%s: node '%s': subgraphs would nest %d deep (at most %d)", call, name, depth, WF_SUB_MAX_DEPTH);
    int top = lua_gettop(L);
    if (spec) {
        lua_pushstring(L, "input");
        lua_rawget(L, spec);
        lua_pushstring(L, "output");
        lua_rawget(L, spec);
    } else {
        lua_pushnil(L);
        lua_pushnil(L);
    }
    check_map(L, top + 1, call, name, "input", g, child);
    check_map(L, top + 2, call, name, "output", child, g);
    wf_node_t *n = wf_lua_add_node(L, g, name, WF_NODE_SUBGRAPH); /* may raise: before the maps are copied */
    n->sub = ci;
    if (!copy_map(L, top + 1, &n->in_from, &n->in_to, &n->n_in) || !copy_map(L, top + 2, &n->out_from, &n->out_to, &n->n_out))
        return luaL_error(L, "out of memory");
    lua_settop(L, 1);
    return 1;
}

int wf_subgraph_shared_agent(const wf_agent_t *a, const char *src, const wf_graph_t *g) {
    return kvm_seterr(KVM_EINVAL, "%s: agent '%s' is a node of graph '%s' and of another graph, where its placeholder {%s} names another "
                                  "node: give each graph its own agent", a->where, a->name, g->name, src);
}

/* ---- run time ---------------------------------------------------------------------------------------------- */

/* Deep copy of the Lua value at idx of L onto L's top (through JSON: the child's state never shares a table with its
 * parent's, whose reducers may change it in place). May raise. */
static void push_copy(lua_State *L, int idx) {
    cJSON *v = wf_lua_to_json(L, idx);
    if (!v) luaL_error(L, "%s", kvm_errmsg());
    wf_lua_push_json(L, v); /* plain data, bounded by the conversion; a memory error here leaks v (the run fails) */
    cJSON_Delete(v);
}

/* The Lua side of a child run (on wf->L, charged to the parent's account): its thread, its state (its graph's initial
 * values, then the parent's keys of the input map), the parent's inputs and an empty `last`. */
static int child_setup_protected(lua_State *L) {
    wf_run_t *c = lua_touserdata(L, 1);
    const wf_run_t *p = c->parent;
    const wf_node_t *n = &p->g->nodes[c->parent_node];
    c->th = lua_newthread(L);
    c->th_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->g->init_ref);
    push_copy(L, lua_gettop(L));
    lua_remove(L, -2);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
    }
    int st = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->state_ref);
    int ps = lua_gettop(L);
    for (int i = 0; i < n->n_in; i++) {
        lua_getfield(L, ps, n->in_from[i]);
        if (!lua_isnil(L, -1)) {
            push_copy(L, lua_gettop(L));
            lua_setfield(L, st, n->in_to[i]);
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    c->state_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->inputs_ref);
    c->inputs_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_newtable(L);
    c->last_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* Releases a child run's Lua objects (its account is its parent's: nothing to close). */
static void child_release_lua(kvm_workflow_t *wf, wf_run_t *c) {
    lua_State *L = wf->L;
    int *refs[] = {&c->state_ref, &c->last_ref, &c->inputs_ref, &c->th_ref};
    if (c->th) lua_settop(c->th, 0);
    for (size_t i = 0; i < sizeof refs / sizeof *refs; i++) {
        luaL_unref(L, LUA_REGISTRYINDEX, *refs[i]);
        *refs[i] = LUA_NOREF;
    }
    c->th = NULL;
}

/* A child run of the subgraph node of task t, not yet at START; NULL with kvm_errmsg when it cannot be made. */
static wf_run_t *child_new(kvm_workflow_t *wf, wf_run_t *p, const wf_task_t *t) {
    const wf_node_t *n = &p->g->nodes[t->node];
    const wf_graph_t *g = wf->graphs[n->sub];
    wf_run_t *c = kvm_calloc(1, sizeof *c);
    if (!c) {
        kvm_seterr(KVM_ENOMEM, "out of memory starting subgraph '%s'", g->name);
        return NULL;
    }
    c->g = g;
    c->parent = p;
    c->root = p->root;
    c->parent_node = t->node;
    c->parent_step = t->step;
    c->depth = p->depth + 1;
    c->idx = p->idx;
    memcpy(c->id, p->id, sizeof c->id); /* the engine's calls of the whole tree are the run's (cancel, KV anchors) */
    c->seed = p->seed;
    c->kv_override = p->kv_override;
    uint64_t salt = p->seed ^ ((uint64_t)(t->step + 1) * 0x9e3779b97f4a7c15ULL); /* math.random: per node step, replayable */
    c->rng[0] = salt ^ 0xd1b54a32d192ed03ULL;
    c->rng[1] = kvm_hash64(&salt, sizeof salt, KVM_HASH_SEED) | 1;
    c->t0_mono = kvm_now_ns();
    c->t0_wall = kvm_wall_ns();
    c->state_ref = c->inputs_ref = c->last_ref = c->th_ref = LUA_NOREF;
    c->acct = p->acct;
    c->trace = p->trace;
    if (!wf_run_arrays(wf, c)) {
        wf_run_free(wf, c);
        kvm_seterr(KVM_ENOMEM, "out of memory starting subgraph '%s'", g->name);
        return NULL;
    }
    /* its instruction and Lua-time budgets: its graph's limits, never above what the parent has left */
    const wf_budget_t *pb = &p->budget;
    c->budget.max_instructions = pb->max_instructions > pb->instructions ? pb->max_instructions - pb->instructions : 1;
    if (g->lim_instructions && g->lim_instructions < c->budget.max_instructions) c->budget.max_instructions = g->lim_instructions;
    c->budget.max_lua_ns = pb->max_lua_ns > pb->lua_ns ? pb->max_lua_ns - pb->lua_ns : 1;
    if (g->lim_lua_ms > 0 && g->lim_lua_ms * 1e6 < (double)c->budget.max_lua_ns) c->budget.max_lua_ns = (uint64_t)(g->lim_lua_ms * 1e6);
    wf->cur_acct = c->acct;
    lua_pushcfunction(wf->L, child_setup_protected);
    lua_pushlightuserdata(wf->L, c);
    int st = lua_pcall(wf->L, 1, 0, 0);
    wf->cur_acct = NULL;
    if (st != LUA_OK) {
        kvm_seterr(st == LUA_ERRMEM ? KVM_ELUA_MEMORY : KVM_EINVAL, "%s: subgraph node '%s': its input: %s", n->where, n->name,
                   lua_tostring(wf->L, -1) ? lua_tostring(wf->L, -1) : "not enough memory");
        lua_pop(wf->L, 1);
        child_release_lua(wf, c);
        wf_run_free(wf, c);
        return NULL;
    }
    return c;
}

/* A resumed run's subgraph node whose child wrote checkpoints (entry e of r->sub_resume): the child continues from the
 * last one, its usage counted in the runs above it, with the answers given after it and what its own subgraph nodes
 * continue from; it writes that checkpoint again (its trace can be resumed too). A checkpoint that does not fit the
 * graph fails the child with the reason. */
static void continue_child(kvm_workflow_t *wf, wf_run_t *r, wf_run_t *c, cJSON *e) {
    const cJSON *ck = cJSON_GetObjectItemCaseSensitive(e, "ckpt");
    c->answers = cJSON_DetachItemFromObjectCaseSensitive(e, "answers");
    c->sub_resume = cJSON_DetachItemFromObjectCaseSensitive(e, "subs");
    if (!ck) {
        wf_run_at_start(wf, c);
        wf_trace_answers(wf, c);
        return;
    }
    kvm_trace_checkpoint_t cp;
    const char **next = NULL;
    char *msg = NULL;
    int code = wf_ckpt_from_json(ck, &cp, &next);
    if (code) msg = wf_strf("%s", kvm_errmsg());
    else code = wf_run_restore(wf, c, &cp, &msg);
    kvm_free(next);
    if (code) {
        char *m = wf_strf("resuming subgraph '%s' from its checkpoint after its super-step %d: %s", c->g->name, cp.superstep, msg ? msg : "?");
        kvm_free(msg);
        wf_run_finish(wf, c, code, m);
        return;
    }
    for (wf_run_t *p = r; p; p = p->parent) { /* the child's usage before its checkpoint is theirs too */
        p->tokens_in += c->tokens_in;
        p->tokens_out += c->tokens_out;
        p->agent_calls += c->agent_calls;
    }
    if (cp.steps > r->root->step_idx) r->root->step_idx = cp.steps;
    wf_trace_checkpoint(wf, c, true);
    wf_trace_answers(wf, c);
}

void wf_subgraph_start(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t) {
    const wf_node_t *n = &r->g->nodes[t->node];
    t->step = r->root->step_idx++; /* before its child's steps, which name it as their parent */
    wf_run_t *c = r->depth + 1 > WF_SUB_MAX_DEPTH ? NULL : child_new(wf, r, t);
    if (!c) {
        t->err = r->depth + 1 > WF_SUB_MAX_DEPTH ? KVM_EINVAL : kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
        t->errmsg = r->depth + 1 > WF_SUB_MAX_DEPTH ? wf_strf("%s: subgraph node '%s': subgraphs nested more than %d deep", n->where, n->name,
                                                              WF_SUB_MAX_DEPTH)
                                                    : kvm_strdup(kvm_errmsg());
        wf_task_done(wf, r, t);
        return;
    }
    t->child = c;
    t->status = WF_T_WAIT;
    char key[300];
    snprintf(key, sizeof key, "%.250s@%d", n->name, r->superstep);
    cJSON *e = r->sub_resume ? cJSON_DetachItemFromObjectCaseSensitive(r->sub_resume, key) : NULL;
    if (!e) {
        wf_run_at_start(wf, c); /* its first super-step starts at the next pass of kvm_wf_advance */
        return;
    }
    continue_child(wf, r, c, e);
    cJSON_Delete(e);
}

/* The child's instructions and Lua time are the parent's too: added when it ends; over the parent's budget, the parent
 * is killed as the hook kills it (it fails at its next super-step). */
static void merge_budget(kvm_workflow_t *wf, wf_run_t *p, const wf_run_t *c) {
    wf_budget_t *b = &p->budget;
    b->instructions += c->budget.instructions;
    b->lua_ns += c->budget.lua_ns;
    if (b->killed) return;
    bool ins = b->max_instructions && b->instructions > b->max_instructions, cpu = b->max_lua_ns && b->lua_ns > b->max_lua_ns;
    if (!ins && !cpu) return;
    b->killed = true;
    b->kill_code = KVM_EBUDGET;
    if (ins)
        snprintf(b->kill_msg, sizeof b->kill_msg, "instruction budget exceeded (%llu, subgraph '%.40s' included)",
                 (unsigned long long)b->max_instructions, c->g->name);
    else
        snprintf(b->kill_msg, sizeof b->kill_msg, "Lua CPU budget exceeded (%.0f ms, subgraph '%.40s' included)", (double)b->max_lua_ns / 1e6,
                 c->g->name);
    if (!p->parent) wf_llm_cancel_run(wf->llm, p->id);
}

void wf_subgraph_done(kvm_workflow_t *wf, wf_run_t *c) {
    wf_run_t *p = c->parent;
    wf_task_t *t = NULL;
    for (int i = 0; i < p->n_tasks && !t; i++)
        if (p->tasks[i].child == c) t = &p->tasks[i];
    merge_budget(wf, p, c);
    const wf_node_t *n = &p->g->nodes[c->parent_node];
    if (!t) { /* cannot happen: a child ends before its node's super-step does */
        child_release_lua(wf, c);
        return;
    }
    if (c->err) {
        const char *m = c->errmsg ? c->errmsg : kvm_strerror(c->err);
        size_t len = strlen(m) + strlen(n->where) + strlen(n->name) + strlen(c->g->name) + 64;
        t->err = c->err;
        if ((t->errmsg = kvm_malloc(len))) snprintf(t->errmsg, len, "%s: subgraph node '%s' (graph '%s'): %s", n->where, n->name, c->g->name, m);
    } else { /* its output: {parent_key = the child's value} */
        lua_State *L = p->th;
        wf_book(wf, p);
        if (lua_checkstack(L, 4)) {
            lua_createtable(L, 0, n->n_out);
            lua_rawgeti(L, LUA_REGISTRYINDEX, c->state_ref);
            for (int i = 0; i < n->n_out; i++) {
                lua_getfield(L, -1, n->out_from[i]);
                lua_setfield(L, -3, n->out_to[i]);
            }
            lua_pop(L, 1);
            t->out_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        } else {
            t->err = KVM_ELUA_MEMORY;
            t->errmsg = kvm_strdup("Lua stack overflow collecting a subgraph's output");
        }
        wf_unbook(wf);
    }
    child_release_lua(wf, c);
    wf_task_done(wf, p, t); /* the child stays in t->child until the parent's super-step is freed */
}

void wf_subgraph_abort(kvm_workflow_t *wf, wf_task_t *t) {
    wf_run_t *c = t->child;
    t->child = NULL;
    if (!c->finished) { /* its parent ended first (failed, canceled): its calls in flight find no task and are dropped */
        c->finished = true;
        wf_tasks_free(wf, c);
        child_release_lua(wf, c);
    }
    wf_run_free(wf, c);
}

bool wf_subgraph_advance(kvm_workflow_t *wf, wf_run_t *r) {
    bool progress = false;
    for (int i = 0; i < r->n_tasks; i++)
        if (r->tasks[i].child && wf_run_advance(wf, r->tasks[i].child)) progress = true;
    return progress;
}

int wf_subgraph_budgets(const wf_run_t *r, char **msg) {
    const char *sub = r->g->name;
    for (const wf_run_t *p = r->parent; p; p = p->parent) {
        const wf_graph_t *g = p->g;
        long used = p->tokens_in + p->tokens_out;
        if (g->lim_tokens > 0 && used > g->lim_tokens) {
            *msg = wf_strf("%s: graph '%s' used %ld tokens (subgraph '%s' included), over its budget of %ld", g->where, g->name, used, sub,
                           g->lim_tokens);
            return KVM_EBUDGET;
        }
        if (g->lim_wall_ms > 0 && (double)(kvm_now_ns() - p->t0_mono) / 1e6 > (double)g->lim_wall_ms) {
            *msg = wf_strf("%s: graph '%s' ran past its wall-time budget of %ld ms (in subgraph '%s')", g->where, g->name, g->lim_wall_ms, sub);
            return KVM_EBUDGET;
        }
        if (p->budget.killed) {
            *msg = wf_strf("%s: graph '%s': %s", g->where, g->name, p->budget.kill_msg);
            return KVM_EBUDGET;
        }
    }
    return 0;
}

uint64_t wf_run_deadline_ns(const wf_run_t *r) {
    uint64_t d = 0;
    for (; r; r = r->parent)
        if (r->g->lim_wall_ms > 0) {
            uint64_t x = r->t0_mono + (uint64_t)r->g->lim_wall_ms * 1000000u;
            if (!d || x < d) d = x;
        }
    return d;
}

wf_task_t *wf_subgraph_find_job(wf_run_t *r, uint64_t job, wf_run_t **run, int *map_index) {
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
        if (t->child && !t->child->finished) {
            wf_task_t *x = wf_subgraph_find_job(t->child, job, run, map_index);
            if (x) return x;
        }
    }
    return NULL;
}

const char *wf_step_node_path(const wf_run_t *r, const char *node, char *buf, size_t cap) {
    if (!r->parent) return node;
    const char *names[WF_SUB_MAX_DEPTH + 2];
    int n = 0;
    names[n++] = node;
    for (const wf_run_t *c = r; c->parent && n < WF_SUB_MAX_DEPTH + 2; c = c->parent) names[n++] = c->parent->g->nodes[c->parent_node].name;
    size_t l = 0;
    buf[0] = '\0';
    for (int i = n - 1; i >= 0 && l < cap; i--) l += (size_t)snprintf(buf + l, cap - l, "%s%s", names[i], i ? "/" : "");
    return buf;
}

const char *wf_run_path(const wf_run_t *r, char *buf, size_t cap) {
    const wf_run_t *chain[WF_SUB_MAX_DEPTH + 2];
    int n = 0;
    for (const wf_run_t *c = r; c->parent && n < WF_SUB_MAX_DEPTH + 2; c = c->parent) chain[n++] = c;
    size_t l = 0;
    buf[0] = '\0';
    for (int i = n - 1; i >= 0 && l < cap; i--)
        l += (size_t)snprintf(buf + l, cap - l, "%s%s@%d", i == n - 1 ? "" : "/", chain[i]->parent->g->nodes[chain[i]->parent_node].name,
                              chain[i]->parent->superstep);
    return buf;
}
