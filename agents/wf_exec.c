/* wf_exec.c - the graph semantics of workflow runs: super-steps (every ready node starts together),
 * updates reduced into the state in node-name order, edges, predicates, routers and joins, outputs,
 * step / token / wall-time budgets, and the run's end. The Lua stack work these need is in wf_task.c,
 * the trace records in wf_trace.c.
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

#include "../runtime/core/vec.h"

static char *xstrdup(const char *s) { return kvm_strdup(s ? s : ""); }

static double ms_since(uint64_t t0) { return (double)(kvm_now_ns() - t0) / 1e6; }

uint64_t *wf_current_rng(kvm_workflow_t *wf) { return wf->cur_run ? wf->cur_run->rng : wf->rng_load; }

kvm_kv_policy_t wf_agent_kv(const kvm_workflow_t *wf, const wf_agent_t *a) {
    int kv = wf->o.kv_override ? wf_kv_policy_parse(wf->o.kv_override) : -1; /* validated at load */
    return kv < 0 ? a->kv : (kvm_kv_policy_t)kv;
}

kvm_kv_policy_t wf_run_agent_kv(const kvm_workflow_t *wf, const wf_run_t *r, const wf_agent_t *a) {
    return r && r->kv_override >= 0 ? (kvm_kv_policy_t)r->kv_override : wf_agent_kv(wf, a);
}

static void finish_run(kvm_workflow_t *wf, wf_run_t *r, int code, char *msg);
static void end_superstep(kvm_workflow_t *wf, wf_run_t *r);

/* ---- steps --------------------------------------------------------------------------------------- */

void wf_task_done(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t) {
    t->status = WF_T_DONE;
    const wf_node_t *n = &r->g->nodes[t->node];
    if (n->kind != WF_NODE_AGENT) {
        int idx = n->kind == WF_NODE_SUBGRAPH ? t->step : r->root->step_idx++; /* a subgraph node took its idx when it started */
        if (wf->o.on_step) {
            static const char *const ops[] = {"chat", "func", "tool", "subgraph"};
            char path[512];
            kvm_wf_step_info_t si = {.run = r->idx, .run_id = r->id, .superstep = r->superstep,
                                     .node = wf_step_node_path(r, n->name, path, sizeof path),
                                     .op = ops[n->kind], .status = t->err, .error = t->errmsg};
            wf->o.on_step(wf->o.ud, &si);
        }
        wf_trace_lua_step(wf, r, t, idx);
    }
    if (--r->n_open == 0) r->need_end = true;
}

void wf_agent_step_done(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, int ai, const wf_llm_result_t *res, int status,
                        const char *err, bool via_call) {
    const wf_agent_t *a = &wf->agents[ai];
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
    for (wf_run_t *p = r; p; p = p->parent) { /* a subgraph's calls count in the runs above it too */
        p->tokens_in += res->n_prompt;
        p->tokens_out += res->n_out;
        p->agent_calls++;
    }
    int idx = r->root->step_idx++;
    if (wf->o.on_step) {
        char path[512];
        kvm_wf_step_info_t si = {.run = r->idx, .run_id = r->id, .superstep = r->superstep,
                                 .node = wf_step_node_path(r, r->g->nodes[t->node].name, path, sizeof path),
                                 .agent = a->name, .op = "chat", .status = status, .error = err, .tokens_in = res->n_prompt,
                                 .tokens_out = res->n_out, .reused = res->kv.exact + res->kv.offset + res->kv.naive,
                                 .ttft_ms = res->ttft_ms, .decode_ms = res->decode_ms, .text = res->text, .kv = &res->kv,
                                 .queue_ms = res->queue_ms};
        wf->o.on_step(wf->o.ud, &si);
    }
    wf_trace_agent_step(wf, r, t, idx, ai, res, status, err, via_call);
    wf_seen_free(t->seen);
    t->seen = NULL;
}

/* ---- super-steps --------------------------------------------------------------------------------- */

/* The run's budgets before a new super-step: 0, or KVM_EBUDGET with *msg. */
static int check_budgets(const wf_graph_t *g, const wf_run_t *r, char **msg) {
    long lim_steps = g->lim_steps ? g->lim_steps : 50;
    if (r->budget.killed) /* by the engine work of its agent calls (wf_task.c), between two of its Lua slices */
        *msg = wf_strf("%s: graph '%s': %s", g->where, g->name, r->budget.kill_msg);
    else if (r->superstep >= lim_steps)
        *msg = wf_strf("%s: graph '%s' reached its step budget (%ld super-steps) with nodes still ready", g->where, g->name, lim_steps);
    else if (g->lim_tokens > 0 && r->tokens_in + r->tokens_out > g->lim_tokens)
        *msg = wf_strf("%s: graph '%s' used %ld tokens, over its budget of %ld", g->where, g->name, r->tokens_in + r->tokens_out,
                       g->lim_tokens);
    else if (g->lim_wall_ms > 0 && ms_since(r->t0_mono) > (double)g->lim_wall_ms)
        *msg = wf_strf("%s: graph '%s' ran past its wall-time budget of %ld ms", g->where, g->name, g->lim_wall_ms);
    else
        return r->parent ? wf_subgraph_budgets(r, msg) : 0;
    return KVM_EBUDGET;
}

static int count_ready(const wf_graph_t *g, const wf_run_t *r) {
    int n = 0;
    for (int i = 0; i < g->n_nodes; i++) n += r->ready[i];
    return n;
}

static void start_superstep(kvm_workflow_t *wf, wf_run_t *r) {
    const wf_graph_t *g = r->g;
    int n_ready = count_ready(g, r);
    if (n_ready == 0) {
        finish_run(wf, r, 0, NULL);
        return;
    }
    char *msg = NULL;
    int code = check_budgets(g, r, &msg);
    if (code) {
        finish_run(wf, r, code, msg);
        return;
    }
    r->superstep++;
    r->tasks = kvm_calloc((size_t)n_ready, sizeof *r->tasks);
    if (!r->tasks) {
        finish_run(wf, r, KVM_ENOMEM, xstrdup("out of memory starting a super-step"));
        return;
    }
    wf_trace_superstep(wf, r);
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
    for (int i = 0; i < r->n_tasks && !r->finished; i++) wf_task_start(wf, r, &r->tasks[i]);
}

static int cmp_task_name(const void *a, const void *b, void *g) {
    const wf_graph_t *gr = g;
    return strcmp(gr->nodes[((const wf_task_t *)a)->node].name, gr->nodes[((const wf_task_t *)b)->node].name);
}

static void take_target(kvm_workflow_t *wf, wf_run_t *r, int from, int to, const char *kind) {
    const wf_graph_t *g = r->g;
    if (to == WF_END) r->to_end[from] = true;
    else r->ready[to] = true;
    wf_trace_edge(r, g->nodes[from].name, to == WF_END ? "END" : g->nodes[to].name, kind);
}

/* Runs a router's result (on top of r->th) into targets: a name, a list of names, or END. */
static int route_targets(kvm_workflow_t *wf, wf_run_t *r, int from, char **msg) {
    lua_State *L = r->th;
    const wf_graph_t *g = r->g;
    const wf_node_t *n = &g->nodes[from];
    int top = lua_gettop(L);
    int count = lua_type(L, top) == LUA_TTABLE ? (int)lua_rawlen(L, top) : 1;
    int code = 0;
    for (int i = 1; i <= count && !code; i++) {
        if (lua_type(L, top) == LUA_TTABLE) lua_rawgeti(L, top, i);
        else lua_pushvalue(L, top);
        const char *name = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        int to = !name ? -3 : !strcmp(name, WF_END_NAME) ? WF_END : wf_graph_find(g, name);
        bool declared = !n->route_declared;
        for (int k = 0; !declared && k < n->n_route_targets; k++) declared = n->route_targets[k] == to;
        if (to == -3 || to == -1) {
            *msg = wf_strf("%s: router of '%s' returned %s%s%s, which names no node (return a node name, a list of them, or kvmesh.END)",
                           n->route_where, n->name, name ? "'" : "a ", name ? name : luaL_typename(L, -1), name ? "'" : "");
            code = KVM_EINVAL;
        } else if (!declared) {
            *msg = wf_strf("%s: router of '%s' returned '%s', which is not among its declared targets", n->route_where, n->name, name);
            code = KVM_EINVAL;
        } else
            take_target(wf, r, from, to, "route");
        lua_pop(L, 1);
    }
    lua_settop(L, top - 1);
    return code;
}

/* A run that cannot keep its outputs must fail: a missing output would read as "not produced yet". The
 * conversion's message says why (a value over the conversion bounds, or out of memory). */
static int outputs_nomem(char **msg) {
    int code = kvm_errcode() == KVM_EBUDGET ? KVM_EBUDGET : KVM_ENOMEM;
    kvm_free(*msg);
    *msg = code == KVM_EBUDGET ? wf_strf("collecting the run's outputs: %s", kvm_errmsg())
                               : kvm_strdup("out of memory collecting the run's outputs");
    return code;
}

/* Step 1 of a super-step's end: each completed node's output becomes its {agent.x} / {tool.x} text
 * and is reduced into the state (messages, `writes`, a func node's updates). */
static int apply_outputs(kvm_workflow_t *wf, wf_run_t *r, char **msg) {
    const wf_graph_t *g = r->g;
    lua_State *L = r->th;
    int code = 0;
    for (int i = 0; i < r->n_tasks && !code; i++) {
        wf_task_t *t = &r->tasks[i];
        const wf_node_t *n = &g->nodes[t->node];
        if (t->err) continue;
        if (n->kind == WF_NODE_AGENT || n->kind == WF_NODE_TOOL) {
            wf_book(wf, r);
            wf_push_task_output(r, t, g);
            char *text = wf_lua_value_text(L, -1);
            lua_pop(L, 1);
            wf_unbook(wf);
            if (!text) {
                code = outputs_nomem(msg);
                break;
            }
            kvm_free(r->node_prev[t->node]);
            r->node_prev[t->node] = r->node_cur[t->node];
            r->node_cur[t->node] = text;
        }
        if (n->kind == WF_NODE_AGENT) code = wf_reduce_message(wf, r, t, msg);
        if (!code) code = wf_reduce_writes(wf, r, t, msg);
        if (!code && (n->kind == WF_NODE_FUNC || n->kind == WF_NODE_SUBGRAPH) && t->out_ref != LUA_NOREF)
            code = wf_apply_updates(wf, r, t, msg); /* a subgraph node's: its output map, through this graph's reducers */
    }
    return code;
}

/* Step 2: `last` = the outputs of this super-step by node name. */
static void set_last(kvm_workflow_t *wf, wf_run_t *r) {
    lua_State *L = r->th;
    wf_book(wf, r);
    lua_newtable(L);
    for (int i = 0; i < r->n_tasks; i++) {
        wf_push_task_output(r, &r->tasks[i], r->g);
        lua_setfield(L, -2, r->g->nodes[r->tasks[i].node].name);
    }
    luaL_unref(L, LUA_REGISTRYINDEX, r->last_ref);
    r->last_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    wf_unbook(wf);
}

/* Step 3, for one completed task: its on_error edges if it failed (or the run fails), else its edges,
 * predicates and router; then it counts as arrived at the joins it feeds. */
static int take_edges(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, char **msg) {
    const wf_graph_t *g = r->g;
    const wf_node_t *n = &g->nodes[t->node];
    int code = 0;
    if (t->err) {
        bool handled = false;
        for (int k = 0; k < g->n_edges; k++)
            if (g->edges[k].from == t->node && g->edges[k].on_error) {
                take_target(wf, r, t->node, g->edges[k].to, "on_error");
                handled = true;
            }
        if (!handled) {
            *msg = t->errmsg;
            t->errmsg = NULL;
            return t->err;
        }
        return 0;
    }
    for (int k = 0; k < g->n_edges && !code; k++) {
        const wf_edge_t *e = &g->edges[k];
        if (e->from != t->node || e->on_error) continue;
        if (e->when_ref == LUA_NOREF) {
            take_target(wf, r, t->node, e->to, "edge");
            continue;
        }
        code = wf_run_call_state_fn(wf, r, e->when_ref, msg, e->where);
        if (code) break;
        bool yes = lua_toboolean(r->th, -1);
        lua_pop(r->th, 1);
        if (yes) take_target(wf, r, t->node, e->to, "when");
    }
    if (!code && n->router_ref != LUA_NOREF) {
        code = wf_run_call_state_fn(wf, r, n->router_ref, msg, n->route_where);
        if (!code) code = route_targets(wf, r, t->node, msg);
    }
    for (int j = 0; j < g->n_joins; j++)
        for (int k = 0; k < g->joins[j].n_src; k++)
            if (g->joins[j].src[k] == t->node) r->arrived[j][k] = true;
    return code;
}

/* Step 4: joins whose sources have arrived ("all": every one, "any": at least one) make their target ready. */
static void fire_joins(kvm_workflow_t *wf, wf_run_t *r) {
    const wf_graph_t *g = r->g;
    for (int j = 0; j < g->n_joins; j++) {
        const wf_join_t *jn = &g->joins[j];
        int got = 0;
        for (int k = 0; k < jn->n_src; k++) got += r->arrived[j][k];
        if ((jn->all && got == jn->n_src) || (!jn->all && got > 0)) {
            r->ready[jn->target] = true;
            for (int k = 0; k < jn->n_src; k++) {
                if (r->arrived[j][k]) wf_trace_edge(r, g->nodes[jn->src[k]].name, g->nodes[jn->target].name, jn->all ? "join_all" : "join_any");
                r->arrived[j][k] = false;
            }
        }
    }
}

/* The outputs of the tasks selected by `only` ([n_nodes] flags, NULL = every task) into r->outputs; 0, or
 * KVM_ENOMEM with *msg set when one cannot be kept. */
static int collect_outputs(kvm_workflow_t *wf, wf_run_t *r, const bool *only, char **msg) {
    const wf_graph_t *g = r->g;
    if (!r->outputs && !(r->outputs = cJSON_CreateObject())) return outputs_nomem(msg);
    for (int i = 0; i < r->n_tasks; i++) {
        const char *name = g->nodes[r->tasks[i].node].name;
        if (only && !only[r->tasks[i].node]) continue;
        wf_push_task_output(r, &r->tasks[i], g);
        cJSON_DeleteItemFromObjectCaseSensitive(r->outputs, name);
        cJSON *j = wf_lua_to_json(r->th, -1);
        lua_pop(r->th, 1);
        if (!j || !cJSON_AddItemToObject(r->outputs, name, j)) {
            cJSON_Delete(j);
            return outputs_nomem(msg);
        }
    }
    return 0;
}

/* Ends a super-step once all its tasks are done: state updates, `last`, edges, joins, outputs, the
 * checkpoint record; then the next super-step can start (or the run ends). */
static void end_superstep(kvm_workflow_t *wf, wf_run_t *r) {
    const wf_graph_t *g = r->g;
    qsort_r(r->tasks, (size_t)r->n_tasks, sizeof *r->tasks, cmp_task_name, (void *)g);
    char *msg = NULL;
    int code = apply_outputs(wf, r, &msg); /* 1. updates, ascending node name */
    set_last(wf, r);                       /* 2. last */
    for (int i = 0; i < g->n_nodes; i++) r->to_end[i] = false;
    for (int i = 0; i < r->n_tasks && !code; i++) code = take_edges(wf, r, &r->tasks[i], &msg); /* 3. edges, same order */
    if (!code) fire_joins(wf, r);          /* 4. joins */
    bool any_end = false;
    for (int i = 0; i < g->n_nodes; i++) any_end |= r->to_end[i];
    if (!code && any_end) code = collect_outputs(wf, r, r->to_end, &msg); /* 5. outputs of nodes that reached END */
    /* the last super-step's outputs are the run's outputs when nothing reached END */
    if (!code && count_ready(g, r) == 0 && !r->outputs) code = collect_outputs(wf, r, NULL, &msg);
    if (!code) wf_trace_checkpoint(wf, r, false); /* 6. a super-step that failed leaves the previous one as the last */
    cJSON_Delete(r->answers);              /* answers to interrupts hold within their super-step */
    r->answers = NULL;
    cJSON_Delete(r->sub_resume);           /* and what its subgraph nodes continue from (a resumed run's) */
    r->sub_resume = NULL;
    wf_tasks_free(wf, r);
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
    const wf_graph_t *g = r->g;
    lua_State *L = r->th;
    if (!code && !r->parent && g->output_ref != LUA_NOREF) { /* a subgraph's outputs are its node's output map */
        char *m = NULL;
        int rc = wf_run_call_state_fn(wf, r, g->output_ref, &m, g->where);
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
    if (!r->state) { /* kept as {} : the run fails with the reason, unless it failed already */
        if (!code) {
            code = kvm_errcode() == KVM_EBUDGET ? KVM_EBUDGET : KVM_ENOMEM;
            msg = wf_strf("%s: the run's final state: %s", g->where, kvm_errmsg());
        }
        r->state = cJSON_CreateObject();
    }
    r->err = code;
    r->errmsg = msg;
    r->finished = true;
    if (r->parent) { /* a subgraph's run: its node gets the result; the trace, the KV anchors and the account are its root's */
        wf_tasks_free(wf, r);
        wf_subgraph_done(wf, r);
        return;
    }
    wf_trace_run_end(wf, r, ms_since(r->t0_mono));
    wf_tasks_free(wf, r);
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

void wf_run_finish(kvm_workflow_t *wf, wf_run_t *r, int code, char *msg) { finish_run(wf, r, code, msg); }

static void run_free(kvm_workflow_t *wf, wf_run_t *r) {
    const wf_graph_t *g = r->g;
    if (r->parent) r->trace = NULL; /* its root's */
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
    cJSON_Delete(r->answers);
    cJSON_Delete(r->sub_resume);
    kvm_free(r->resumed_from);
    cJSON_Delete(r->replay);
    cJSON_Delete(r->replay_calls);
    kvm_free(r);
}

void wf_run_free(kvm_workflow_t *wf, wf_run_t *r) { run_free(wf, r); }

void wf_runs_free(kvm_workflow_t *wf) {
    for (int i = 0; i < wf->n_runs; i++) run_free(wf, wf->runs[i]);
    kvm_free(wf->runs);
    wf->runs = NULL;
    wf->n_runs = wf->cap_runs = 0;
}

bool wf_run_arrays(const kvm_workflow_t *wf, wf_run_t *r) {
    const wf_graph_t *g = r->g;
    r->node_cur = kvm_calloc((size_t)g->n_nodes, sizeof *r->node_cur);
    r->node_prev = kvm_calloc((size_t)g->n_nodes, sizeof *r->node_prev);
    r->ready = kvm_calloc((size_t)g->n_nodes, sizeof *r->ready);
    r->to_end = kvm_calloc((size_t)g->n_nodes, sizeof *r->to_end);
    r->arrived = kvm_calloc((size_t)g->n_joins + 1, sizeof *r->arrived);
    r->agent_tokens = kvm_calloc((size_t)wf->n_agents + 1, sizeof *r->agent_tokens);
    bool ok = r->node_cur && r->node_prev && r->ready && r->to_end && r->arrived && r->agent_tokens;
    for (int j = 0; ok && j < g->n_joins; j++) ok = (r->arrived[j] = kvm_calloc((size_t)g->joins[j].n_src, sizeof **r->arrived)) != NULL;
    return ok;
}

int kvm_wf_start(kvm_workflow_t *wf, const cJSON *inputs, uint64_t seed, int *run) {
    return kvm_wf_start_kv(wf, inputs, seed, -1, run);
}

/* Makes a run (not yet at START) and writes its run.start; resumed_from (may be NULL) names the run it resumes at
 * resumed_step. 0 and *out (a run that could not set up its Lua side has finished with the reason), or KVM_E*. */
static int run_new(kvm_workflow_t *wf, const cJSON *inputs, uint64_t seed, int kv, const char *resumed_from, int resumed_step,
                   int *run, wf_run_t **out) {
    const wf_graph_t *g = wf->g;
    *out = NULL;
    if (inputs && !cJSON_IsObject(inputs)) return kvm_seterr(KVM_EINVAL, "run inputs must be a JSON object");
    if (kv != -1 && (kv < KVM_KV_PREFIX || kv > KVM_KV_KVCOMM))
        return kvm_seterr(KVM_EINVAL, "a run's KV policy must be dense, prefix or kvcomm (got %d)", kv);
    size_t cap = (size_t)wf->cap_runs;
    int rc = kvm_array_reserve(&wf->runs, &cap, (size_t)wf->n_runs + 1, sizeof *wf->runs, 16);
    if (rc) return rc;
    wf->cap_runs = (int)cap;
    wf_run_t *r = kvm_calloc(1, sizeof *r);
    if (!r) return KVM_ENOMEM;
    r->g = g;
    r->root = r;
    r->idx = wf->n_runs;
    r->seed = seed;
    r->kv_override = kv;
    r->rng[0] = seed ^ 0x9e3779b97f4a7c15ULL;
    r->rng[1] = kvm_hash64(&seed, sizeof seed, KVM_HASH_SEED) | 1;
    kvm_trace_new_id(r->id);
    r->t0_mono = kvm_now_ns();
    r->t0_wall = kvm_wall_ns();
    r->state_ref = r->inputs_ref = r->last_ref = r->th_ref = LUA_NOREF;
    r->inputs = inputs ? cJSON_Duplicate(inputs, 1) : cJSON_CreateObject();
    r->acct = kvm_calloc(1, sizeof *r->acct);
    r->resumed_from = resumed_from ? kvm_strdup(resumed_from) : NULL;
    r->resumed_superstep = resumed_step;
    r->replay = wf->next_replay; /* a replay's spec (kvm_wf_start_replay), recorded in run.start */
    wf->next_replay = NULL;
    bool ok = wf_run_arrays(wf, r) && (!resumed_from || r->resumed_from) && r->inputs && r->acct;
    if (!ok) {
        kvm_free(r->acct);
        r->acct = NULL;
        run_free(wf, r);
        return kvm_seterr(KVM_ENOMEM, "out of memory starting a run");
    }
    /* every limit is the smaller of the operator's and the script's (g:limit may lower, never raise) */
    r->acct->cap = wf->o.run_mem_cap_bytes;
    if (g->lim_memory_mb > 0 && (uint64_t)g->lim_memory_mb < (r->acct->cap >> 20)) r->acct->cap = (size_t)g->lim_memory_mb << 20;
    if (!(r->acct->mem = kvm_account_create(r->acct->cap))) {
        kvm_free(r->acct);
        r->acct = NULL;
        run_free(wf, r);
        return kvm_seterr(KVM_ENOMEM, "out of memory starting a run");
    }
    r->budget.max_instructions = wf->o.max_instructions;
    if (g->lim_instructions && g->lim_instructions < r->budget.max_instructions) r->budget.max_instructions = g->lim_instructions;
    r->budget.max_lua_ns = (uint64_t)((g->lim_lua_ms > 0 && g->lim_lua_ms < wf->o.lua_cpu_ms ? g->lim_lua_ms : wf->o.lua_cpu_ms) * 1e6);
    wf->runs[wf->n_runs++] = r;
    *run = r->idx;
    *out = r;
    int st = wf_run_setup(wf, r); /* the Lua side, charged to the run */
    if (wf->o.trace_root) {
        r->trace = kvm_trace_open(wf->o.trace_root, r->id);
        if (!r->trace) KVM_LOGW("run %d: no trace (%s)", r->idx, kvm_errmsg());
    }
    if (st != LUA_OK || !r->th) {
        wf_trace_run_start(wf, r);
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
    wf_trace_run_start(wf, r);
    return 0;
}

void wf_run_at_start(kvm_workflow_t *wf, wf_run_t *r) {
    (void)wf;
    const wf_graph_t *g = r->g;
    for (int i = 0; i < g->n_edges; i++)
        if (g->edges[i].from == WF_START && g->edges[i].to >= 0) {
            r->ready[g->edges[i].to] = true;
            wf_trace_edge(r, "START", g->nodes[g->edges[i].to].name, "edge");
        }
}

int kvm_wf_start_kv(kvm_workflow_t *wf, const cJSON *inputs, uint64_t seed, int kv, int *run) {
    wf_run_t *r = NULL;
    int rc = run_new(wf, inputs, seed, kv, NULL, 0, run, &r);
    if (rc || r->finished) return rc;
    wf_run_at_start(wf, r);
    return 0;
}

/* ---- resume from a checkpoint ------------------------------------------------------------------------ */

/* A checkpoint's JSON fields, parsed. */
typedef struct ckpt_json {
    cJSON *state, *last, *nodes, *joins, *outputs, *agents;
} ckpt_json_t;

static void ckpt_json_free(ckpt_json_t *j) {
    cJSON_Delete(j->state);
    cJSON_Delete(j->last);
    cJSON_Delete(j->nodes);
    cJSON_Delete(j->joins);
    cJSON_Delete(j->outputs);
    cJSON_Delete(j->agents);
}

/* Parses field `name` (JSON text; NULL = absent) into *out; it must have type `want` (cJSON_Object / cJSON_Array)
 * unless absent and optional. */
static int ckpt_field(const char *text, const char *name, int want, bool optional, cJSON **out) {
    *out = NULL;
    if (!text || !strcmp(text, "null")) return optional ? 0 : kvm_seterr(KVM_EFORMAT, "checkpoint: field '%s' is missing", name);
    *out = cJSON_Parse(text);
    if (!*out) return kvm_seterr(KVM_EFORMAT, "checkpoint: field '%s' is not valid JSON", name);
    if (((*out)->type & 0xFF) != want)
        return kvm_seterr(KVM_EFORMAT, "checkpoint: field '%s' must be %s", name, want == cJSON_Object ? "an object" : "an array");
    return 0;
}

/* The index of source `name` in join j, or -1. */
static int join_src(const wf_join_t *jn, const char *name) {
    for (int k = 0; k < jn->n_src; k++)
        if (!strcmp(jn->src_names[k], name)) return k;
    return -1;
}

/* Parses a checkpoint and checks every name in it against the graph, before a run is made for it. */
static int ckpt_parse(const kvm_workflow_t *wf, const wf_graph_t *g, const kvm_trace_checkpoint_t *c, ckpt_json_t *j) {
    if (!c->resumable)
        return kvm_seterr(KVM_EUNSUPPORTED, "the checkpoint after super-step %d was written by a kvmesh without resume (no "
                                            "'v_resume'): its run cannot be resumed", c->superstep);
    int rc = ckpt_field(c->state_json, "state", cJSON_Object, false, &j->state);
    if (!rc) rc = ckpt_field(c->last_json, "last", cJSON_Object, false, &j->last);
    if (!rc) rc = ckpt_field(c->nodes_json, "nodes", cJSON_Object, false, &j->nodes);
    if (!rc) rc = ckpt_field(c->joins_json, "joins", cJSON_Array, false, &j->joins);
    if (!rc) rc = ckpt_field(c->outputs_json, "outputs", cJSON_Object, true, &j->outputs);
    if (!rc) rc = ckpt_field(c->agent_tokens_json, "usage.agents", cJSON_Object, true, &j->agents);
    if (rc) return rc;
    for (int i = 0; i < c->n_next; i++)
        if (wf_graph_find(g, c->next[i]) < 0)
            return kvm_seterr(KVM_EINVAL, "checkpoint: next node '%s' is not a node of graph '%s'", c->next[i], g->name);
    for (const cJSON *n = j->nodes->child; n; n = n->next) {
        if (wf_graph_find(g, n->string) < 0)
            return kvm_seterr(KVM_EINVAL, "checkpoint: node '%s' is not a node of graph '%s'", n->string, g->name);
        const cJSON *cur = cJSON_GetObjectItemCaseSensitive(n, "cur"), *prev = cJSON_GetObjectItemCaseSensitive(n, "prev");
        if ((cur && !cJSON_IsString(cur)) || (prev && !cJSON_IsString(prev)))
            return kvm_seterr(KVM_EFORMAT, "checkpoint: nodes.%s.cur / .prev must be strings", n->string);
    }
    if (cJSON_GetArraySize(j->joins) != g->n_joins)
        return kvm_seterr(KVM_EINVAL, "checkpoint: %d joins, graph '%s' has %d", cJSON_GetArraySize(j->joins), g->name, g->n_joins);
    int jx = 0;
    for (const cJSON *a = j->joins->child; a; a = a->next, jx++) {
        if (!cJSON_IsArray(a)) return kvm_seterr(KVM_EFORMAT, "checkpoint: joins[%d] must be an array of node names", jx);
        for (const cJSON *n = a->child; n; n = n->next)
            if (!cJSON_IsString(n) || join_src(&g->joins[jx], n->valuestring) < 0)
                return kvm_seterr(KVM_EINVAL, "checkpoint: joins[%d] names a node that is not a source of the join to '%s'", jx,
                                  g->joins[jx].target_name);
    }
    for (const cJSON *a = j->agents ? j->agents->child : NULL; a; a = a->next) {
        bool known = false;
        for (int i = 0; i < wf->n_agents; i++) known |= !strcmp(wf->agents[i].name, a->string);
        if (!known || !cJSON_IsNumber(a)) return kvm_seterr(KVM_EINVAL, "checkpoint: usage.agents.%s: no such agent, or not a number", a->string);
    }
    return 0;
}

typedef struct restore_lua {
    wf_run_t *r;
    const cJSON *state, *last;
} restore_lua_t;

/* The Lua side of a restore (may raise on memory): state and `last` replace the fresh run's. */
static int restore_protected(lua_State *L) {
    restore_lua_t *x = lua_touserdata(L, 1);
    wf_lua_push_json(L, x->state);
    lua_rawseti(L, LUA_REGISTRYINDEX, x->r->state_ref);
    wf_lua_push_json(L, x->last);
    lua_rawseti(L, LUA_REGISTRYINDEX, x->r->last_ref);
    return 0;
}

/* Puts the checkpoint into the fresh run r (its Lua side set up). 0, or KVM_E* with *msg. */
static int restore(kvm_workflow_t *wf, wf_run_t *r, const kvm_trace_checkpoint_t *c, ckpt_json_t *j, char **msg) {
    const wf_graph_t *g = r->g;
    r->superstep = c->superstep;
    r->step_idx = c->steps;
    r->tokens_in = c->input_tokens;
    r->tokens_out = c->output_tokens;
    r->agent_calls = c->agent_calls;
    r->rng[0] = c->rng0;
    r->rng[1] = c->rng1;
    for (int i = 0; i < c->n_next; i++) r->ready[wf_graph_find(g, c->next[i])] = true;
    for (const cJSON *n = j->nodes->child; n; n = n->next) {
        int i = wf_graph_find(g, n->string);
        const cJSON *cur = cJSON_GetObjectItemCaseSensitive(n, "cur"), *prev = cJSON_GetObjectItemCaseSensitive(n, "prev");
        if ((cur && !(r->node_cur[i] = kvm_strdup(cur->valuestring))) || (prev && !(r->node_prev[i] = kvm_strdup(prev->valuestring)))) {
            *msg = xstrdup("out of memory restoring a checkpoint");
            return KVM_ENOMEM;
        }
    }
    int jx = 0;
    for (const cJSON *a = j->joins->child; a; a = a->next, jx++)
        for (const cJSON *n = a->child; n; n = n->next) r->arrived[jx][join_src(&g->joins[jx], n->valuestring)] = true;
    for (int i = 0; i < wf->n_agents; i++) {
        const cJSON *t = j->agents ? cJSON_GetObjectItemCaseSensitive(j->agents, wf->agents[i].name) : NULL;
        if (t) r->agent_tokens[i] = (long)t->valuedouble;
    }
    if (j->outputs) {
        cJSON_Delete(r->outputs);
        r->outputs = j->outputs;
        j->outputs = NULL;
    }
    restore_lua_t x = {.r = r, .state = j->state, .last = j->last};
    wf->cur_acct = r->acct;
    lua_pushcfunction(wf->L, restore_protected);
    lua_pushlightuserdata(wf->L, &x);
    int st = lua_pcall(wf->L, 1, 0, 0);
    wf->cur_acct = NULL;
    if (st != LUA_OK) {
        lua_pop(wf->L, 1);
        *msg = xstrdup("out of Lua memory restoring the checkpoint's state (over the run's memory cap?)");
        return KVM_ELUA_MEMORY;
    }
    return 0;
}

int wf_run_resume_from(kvm_workflow_t *wf, const cJSON *inputs, uint64_t seed, int kv, const char *from_id,
                       const kvm_trace_checkpoint_t *c, cJSON *answers, cJSON *subs, int *run) {
    ckpt_json_t j = {0};
    wf_run_t *r = NULL;
    int rc = ckpt_parse(wf, wf->g, c, &j);
    if (!rc) rc = run_new(wf, inputs, seed, kv, from_id, c->superstep, run, &r);
    if (!rc && !r->finished) {
        char *msg = NULL;
        int code = restore(wf, r, c, &j, &msg);
        if (code) {
            finish_run(wf, r, code, msg);
        } else {
            r->answers = answers;
            answers = NULL;
            r->sub_resume = subs;
            subs = NULL;
            wf_trace_checkpoint(wf, r, true); /* the resumed run's trace starts where it resumed, and can be resumed too */
            wf_trace_answers(wf, r);
        }
    }
    cJSON_Delete(answers);
    cJSON_Delete(subs);
    ckpt_json_free(&j);
    return rc;
}

int wf_run_restore(kvm_workflow_t *wf, wf_run_t *r, const kvm_trace_checkpoint_t *c, char **msg) {
    ckpt_json_t j = {0};
    int rc = ckpt_parse(wf, r->g, c, &j);
    if (rc) {
        *msg = wf_strf("%s", kvm_errmsg());
        ckpt_json_free(&j);
        return rc;
    }
    rc = restore(wf, r, c, &j, msg);
    ckpt_json_free(&j);
    return rc;
}

bool kvm_wf_has_dataset(const kvm_workflow_t *wf) { return wf->g->dataset_ref != LUA_NOREF; }
bool kvm_wf_has_score(const kvm_workflow_t *wf) { return wf->g->score_ref != LUA_NOREF; }

int kvm_wf_start_seeded(kvm_workflow_t *wf, uint64_t seed, const cJSON *extra, int *run) {
    return kvm_wf_start_seeded_kv(wf, seed, extra, -1, run);
}

int kvm_wf_start_seeded_kv(kvm_workflow_t *wf, uint64_t seed, const cJSON *extra, int kv, int *run) {
    if (!kvm_wf_has_dataset(wf)) return kvm_seterr(KVM_EINVAL, "%s: the graph has no dataset (g:dataset(function(seed) ... end))", wf->path);
    wf->rng_load[0] = seed ^ 0x9e3779b97f4a7c15ULL;
    wf->rng_load[1] = kvm_hash64(&seed, sizeof seed, KVM_HASH_SEED) | 1;
    lua_rawgeti(wf->L, LUA_REGISTRYINDEX, wf->g->dataset_ref);
    lua_pushinteger(wf->L, (lua_Integer)seed);
    cJSON *in = NULL;
    int rc = wf_call_scratch(wf, 1, &in, "dataset");
    if (rc) return rc;
    if (!cJSON_IsObject(in)) {
        cJSON_Delete(in);
        return kvm_seterr(KVM_EINVAL, "%s: g:dataset must return a table of inputs", wf->path);
    }
    for (const cJSON *c = extra ? extra->child : NULL; c; c = c->next) {
        cJSON_DeleteItemFromObjectCaseSensitive(in, c->string);
        cJSON_AddItemToObject(in, c->string, cJSON_Duplicate(c, 1));
    }
    rc = kvm_wf_start_kv(wf, in, seed, kv, run);
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
    int rc = wf_call_scratch(wf, 2, &out, "score");
    if (rc) return rc;
    *score = cJSON_IsBool(out) ? (cJSON_IsTrue(out) ? 1.0 : 0.0) : cJSON_IsNumber(out) ? out->valuedouble : 0.0;
    cJSON_Delete(out);
    return 1;
}

static bool run_waiting(const wf_run_t *r);

/* Tasks of r parked in kvmesh.interrupt, or subgraph nodes whose run waits for an answer. */
int wf_run_parked_tasks(const wf_run_t *r) {
    int n = 0;
    for (int i = 0; !r->finished && i < r->n_tasks; i++)
        n += r->tasks[i].parked || (r->tasks[i].child && r->tasks[i].status == WF_T_WAIT && run_waiting(r->tasks[i].child));
    return n;
}

/* A run parked in kvmesh.interrupt (in one of its nodes, or in a node of a subgraph's run) with nothing else of its
 * super-step going: it waits for kvm_wf_run_resume. */
static bool run_waiting(const wf_run_t *r) {
    if (r->finished || r->n_parked_tree == 0 || r->need_end) return false;
    int n = wf_run_parked_tasks(r);
    return n > 0 && r->n_open <= n;
}

void wf_run_park(wf_run_t *r, int delta) {
    uint64_t now = kvm_now_ns();
    if (delta > 0) r->n_parked++;
    else r->n_parked--;
    for (wf_run_t *p = r; p; p = p->parent) {
        if (delta > 0 && p->n_parked_tree++ == 0) p->parked_ns = now;
        else if (delta < 0 && --p->n_parked_tree == 0) p->t0_mono += now - p->parked_ns;
    }
}

bool wf_run_advance(kvm_workflow_t *wf, wf_run_t *r) {
    bool progress = false;
    if (r->finished || run_waiting(r)) return false;
    if (r->need_end) {
        end_superstep(wf, r);
        progress = true;
    }
    if (!r->finished && r->n_open == 0 && !r->need_end) {
        start_superstep(wf, r);
        progress = true;
    }
    if (!r->finished && wf_subgraph_advance(wf, r)) progress = true; /* the runs of its subgraph nodes */
    return progress;
}

int kvm_wf_advance(kvm_workflow_t *wf, bool *progress) {
    int active = 0;
    for (int i = 0; i < wf->n_runs; i++) {
        wf_run_t *r = wf->runs[i];
        if (!r->finished && wf_run_tool_deliver(wf, r)) *progress = true; /* answers of tools that answer later */
        if (r->finished || run_waiting(r) || wf_run_tool_idle(wf, r)) continue;
        if (wf_run_advance(wf, r)) *progress = true;
        active++;
    }
    return active;
}

int kvm_wf_n_active(const kvm_workflow_t *wf) {
    int n = 0;
    for (int i = 0; i < wf->n_runs; i++) n += !wf->runs[i]->finished && !run_waiting(wf->runs[i]) && !wf_run_tool_only(wf->runs[i]);
    return n;
}

void kvm_wf_fail_runs(kvm_workflow_t *wf, int code, const char *msg) {
    for (int i = 0; i < wf->n_runs; i++) finish_run(wf, wf->runs[i], code, xstrdup(msg));
}

void kvm_wf_fail_stalled(kvm_workflow_t *wf) {
    for (int i = 0; i < wf->n_runs; i++)
        if (!wf->runs[i]->finished && !run_waiting(wf->runs[i]) && !wf_run_tool_waits(wf->runs[i])) {
            bool waiting = false;
            for (int k = 0; k < wf->runs[i]->n_tasks; k++) waiting |= wf->runs[i]->tasks[k].status != WF_T_DONE;
            finish_run(wf, wf->runs[i], KVM_EINTERNAL,
                       xstrdup(waiting ? "run stalled: a node waits for an engine step that never comes" : "run stalled"));
        }
}

int kvm_wf_run_cancel(kvm_workflow_t *wf, int run, int code, const char *msg) {
    if (run < 0 || run >= wf->n_runs) return kvm_seterr(KVM_EINVAL, "no run %d", run);
    wf_run_t *r = wf->runs[run];
    if (r->finished) return kvm_seterr(KVM_ESTALE, "run %s has finished already", r->id);
    wf_llm_cancel_run(wf->llm, r->id); /* its steps in flight stop and give their KV back */
    finish_run(wf, r, code ? code : KVM_ECANCELED, xstrdup(msg ? msg : kvm_strerror(code ? code : KVM_ECANCELED)));
    return 0;
}

int kvm_wf_drive(kvm_workflow_t *wf) {
    for (;;) {
        bool progress = false;
        if (kvm_wf_advance(wf, &progress) == 0) break;
        if (wf_llm_pending(wf->llm) > 0) {
            int n = wf_llm_step(wf->llm);
            if (n < 0) {
                char msg[512];
                snprintf(msg, sizeof msg, "engine: %s", kvm_errmsg());
                kvm_wf_fail_runs(wf, n, msg);
                return n;
            }
            wf_llm_result_t res;
            while (wf_llm_take(wf->llm, &res) == 1) {
                wf_deliver(wf, &res);
                wf_llm_result_clear(&res);
            }
            progress = true;
        }
        if (!progress) kvm_wf_fail_stalled(wf);
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
    return r->finished ? r->err : run_waiting(r) ? KVM_EINTERRUPTED : KVM_EBUSY;
}

/* The first task of r parked in kvmesh.interrupt, in r or in the runs of its subgraph nodes (*in: its run), or NULL. */
static wf_task_t *first_parked(const wf_run_t *r, wf_run_t **in) {
    for (int i = 0; r && !r->finished && i < r->n_tasks; i++) {
        if (r->tasks[i].parked) {
            *in = (wf_run_t *)r;
            return &r->tasks[i];
        }
        wf_task_t *t = r->tasks[i].child ? first_parked(r->tasks[i].child, in) : NULL;
        if (t) return t;
    }
    return NULL;
}

bool kvm_wf_run_parked(const kvm_workflow_t *wf, int run, const char **node, const cJSON **payload) {
    const wf_run_t *r = get_run(wf, run);
    wf_run_t *in = NULL;
    const wf_task_t *t = r && run_waiting(r) ? first_parked(r, &in) : NULL;
    if (node) *node = t ? t->ask_node ? t->ask_node : in->g->nodes[t->node].name : NULL;
    if (payload) *payload = t ? t->payload : NULL;
    return t != NULL;
}

int kvm_wf_run_resume(kvm_workflow_t *wf, int run, const cJSON *value) {
    wf_run_t *root = run >= 0 && run < wf->n_runs ? wf->runs[run] : NULL, *r = NULL;
    wf_task_t *t = root && run_waiting(root) ? first_parked(root, &r) : NULL;
    if (!t) return kvm_seterr(KVM_EINVAL, "run %s is not parked in kvmesh.interrupt", root ? root->id : "?");
    const char *node = r->g->nodes[t->node].name;
    /* kept for the rest of the super-step: a resume from the trace replays it to the node's same call */
    if (!r->answers && !(r->answers = cJSON_CreateObject())) return kvm_seterr(KVM_ENOMEM, "out of memory keeping an answer");
    cJSON *list = cJSON_GetObjectItemCaseSensitive(r->answers, node);
    if (!list && !cJSON_AddItemToObject(r->answers, node, list = cJSON_CreateArray())) return kvm_seterr(KVM_ENOMEM, "out of memory keeping an answer");
    cJSON *v = value ? cJSON_Duplicate(value, 1) : cJSON_CreateNull();
    if (!v || !cJSON_AddItemToArray(list, v)) {
        cJSON_Delete(v);
        return kvm_seterr(KVM_ENOMEM, "out of memory keeping an answer");
    }
    wf_trace_resume_rec(r, node, v);
    wf_run_park(r, -1); /* time parked is not the run's */
    wf_task_answer(wf, r, t, v);
    return 0;
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
    s->kv = wf->agents[i].c2c ? "c2c" : kvm_kv_policy_name(wf_agent_kv(wf, &wf->agents[i])); /* kv_from: its own */
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
        wf_free_strs(n->route_names, n->n_route_targets);
        kvm_free(n->route_where);
        wf_free_strs(n->in_from, n->n_in);
        wf_free_strs(n->in_to, n->n_in);
        wf_free_strs(n->out_from, n->n_out);
        wf_free_strs(n->out_to, n->n_out);
    }
    kvm_free(g->nodes);
    for (int i = 0; i < g->n_edges; i++) {
        kvm_free(g->edges[i].from_name);
        kvm_free(g->edges[i].to_name);
        kvm_free(g->edges[i].where);
    }
    kvm_free(g->edges);
    for (int i = 0; i < g->n_joins; i++) {
        wf_free_strs(g->joins[i].src_names, g->joins[i].n_src);
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
        kvm_free(a->parts);
        kvm_free(a->part_node);
        wf_free_strs(a->stop, a->n_stop);
        wf_free_strs(a->tools, a->n_tools);
        kvm_free(a->where);
        kvm_free(a->c2c_from);
        kvm_free(a->c2c_fuser);
        kvm_free(a->c2c_section);
    }
    kvm_free(wf->agents);
    kvm_free(wf->stats);
    for (int i = 0; i < wf->n_models; i++) {
        kvm_free(wf->models[i].path);
        kvm_free(wf->models[i].where);
    }
    kvm_free(wf->models);
    if (!wf->o.engine) wf_llm_free(wf->llm);
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
    wf->llm = wf->o.engine ? wf->o.engine : wf_llm_create(&wf->o.llm);
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
