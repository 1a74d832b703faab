/* wf_trace.c - the workflow side of traces: fills the records of runtime/trace (trace.h,
 * docs/trace-format.md) from the workflow, its runs and their steps, and replays a traced run from its
 * trace (kvm_wf_replay). The field names are runtime/trace's: this file only maps the executor's
 * structures onto the record structs and back. A failed write stops tracing for that run with a
 * warning. */
#include "wf_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Stops tracing the run when a write failed. */
static void written(wf_run_t *r, int rc) {
    if (rc == 0 || !r->trace) return;
    KVM_LOGW("run %s: trace write failed (%s); tracing stops for this run", r->id, kvm_errmsg());
    if (!r->parent) kvm_trace_close(r->trace); /* a subgraph's run writes into its root's trace: the root closes it */
    r->trace = NULL;
}

/* A cJSON value as JSON text (cJSON_free), NULL for NULL. */
static char *json_text(const cJSON *j) { return j ? cJSON_PrintUnformatted(j) : NULL; }

/* The JSON text of the Lua value behind registry reference ref of the run (cJSON_free). */
static char *ref_json_text(wf_run_t *r, int ref) {
    lua_rawgeti(r->th, LUA_REGISTRYINDEX, ref);
    cJSON *j = wf_lua_to_json(r->th, -1);
    lua_pop(r->th, 1);
    if (!j) j = cJSON_CreateString(kvm_errmsg()); /* a value over the conversion bounds is recorded as why */
    char *s = json_text(j);
    cJSON_Delete(j);
    return s;
}

void wf_log(kvm_workflow_t *wf, const char *level, const char *msg) {
    wf_run_t *r = wf->cur_run;
    if (wf->o.echo_print || !r || !r->trace) {
        if (r) fprintf(stderr, "[run %d] %s\n", r->idx, msg);
        else fprintf(stderr, "%s\n", msg);
    }
    if (r && r->trace) { /* the write allocates through cJSON, not Lua: safe inside a Lua call */
        kvm_trace_log_rec_t rec = {.level = level, .msg = msg, .superstep = r->superstep};
        written(r, kvm_trace_write_log(r->trace, &rec));
    }
}

/* ---- run.start ------------------------------------------------------------------------------------- */

/* The graph's nodes, edges and joins as run.start lists them (arrays owned by the caller: kvm_free). */
static bool graph_records(const kvm_workflow_t *wf, kvm_trace_run_start_t *o) {
    static const char *const kinds[] = {"agent", "func", "tool", "subgraph"};
    const wf_graph_t *g = wf->g;
    kvm_trace_node_t *nodes = kvm_calloc((size_t)g->n_nodes + 1, sizeof *nodes);
    kvm_trace_edge_def_t *edges = kvm_calloc((size_t)g->n_edges + 1, sizeof *edges);
    kvm_trace_join_t *joins = kvm_calloc((size_t)g->n_joins + 1, sizeof *joins);
    o->nodes = nodes;
    o->edges = edges;
    o->joins = joins;
    if (!nodes || !edges || !joins) return false;
    for (int i = 0; i < g->n_nodes; i++) {
        const wf_node_t *n = &g->nodes[i];
        nodes[i] = (kvm_trace_node_t){.name = n->name, .kind = kinds[n->kind], .agent = n->agent >= 0 ? wf->agents[n->agent].name : NULL,
                                      .writes = n->writes, .router = n->router_ref != LUA_NOREF};
    }
    for (int i = 0; i < g->n_edges; i++)
        edges[i] = (kvm_trace_edge_def_t){.from = g->edges[i].from_name, .to = g->edges[i].to_name,
                                          .conditional = g->edges[i].when_ref != LUA_NOREF, .on_error = g->edges[i].on_error};
    for (int i = 0; i < g->n_joins; i++)
        joins[i] = (kvm_trace_join_t){.sources = (const char *const *)g->joins[i].src_names, .n_sources = g->joins[i].n_src,
                                      .target = g->joins[i].target_name, .all = g->joins[i].all};
    o->n_nodes = g->n_nodes;
    o->n_edges = g->n_edges;
    o->n_joins = g->n_joins;
    return true;
}

/* The agents with their parsed templates; parts of every agent in one array (both kvm_free). */
static bool agent_records(const kvm_workflow_t *wf, const wf_run_t *r, kvm_trace_run_start_t *o, kvm_trace_part_t **parts_out) {
    int n_parts = 0;
    for (int i = 0; i < wf->n_agents; i++) n_parts += wf->agents[i].n_parts;
    kvm_trace_agent_t *agents = kvm_calloc((size_t)wf->n_agents + 1, sizeof *agents);
    kvm_trace_part_t *parts = kvm_calloc((size_t)n_parts + 1, sizeof *parts);
    o->agents = agents;
    *parts_out = parts;
    if (!agents || !parts) return false;
    for (int i = 0, k = 0; i < wf->n_agents; i++) {
        const wf_agent_t *a = &wf->agents[i];
        agents[i] = (kvm_trace_agent_t){
            .name = a->name, .model = a->model, .role = a->role, .template_text = a->tmpl, .parts = parts + k, .n_parts = a->n_parts,
            .sampling = {.temperature = a->sampling.temperature, .top_k = a->sampling.top_k, .top_p = a->sampling.top_p,
                         .repetition_penalty = a->sampling.repetition_penalty},
            .max_tokens = a->max_tokens, .stop = (const char *const *)a->stop, .n_stop = a->n_stop, .budget_tokens = a->budget_tokens,
            .kv = kvm_kv_policy_name(wf_run_agent_kv(wf, r, a)), .where = a->where};
        for (int p = 0; p < a->n_parts; p++, k++) {
            const kvm_tpl_part_t *tp = &a->parts[p];
            parts[k] = tp->src == KVM_TPL_TEXT ? (kvm_trace_part_t){.text = tp->text} : (kvm_trace_part_t){.slot = tp->text, .src = tp->source};
        }
    }
    o->n_agents = wf->n_agents;
    return true;
}

void wf_trace_run_start(kvm_workflow_t *wf, wf_run_t *r) {
    if (!r->trace || r->parent) return;
    const wf_graph_t *g = wf->g;
    kvm_trace_run_start_t o = {
        .run_id = r->id, .run = r->idx, .workflow_path = wf->path, .graph = g->name, .source_hash = wf->source_hash,
        .source = wf->source, .seed = r->seed,
        .kv_override = r->kv_override >= 0 ? kvm_kv_policy_name((kvm_kv_policy_t)r->kv_override) : wf->o.kv_override, .mock = wf->o.mock,
        .limits = {.steps = g->lim_steps ? g->lim_steps : 50, .tokens = g->lim_tokens, .wall_ms = g->lim_wall_ms,
                   .instructions = (double)r->budget.max_instructions, .lua_ms = (double)r->budget.max_lua_ns / 1e6,
                   .memory_bytes = r->acct ? (double)r->acct->cap : 0},
        .build_version = KVM_VERSION, .build_lua = LUA_RELEASE, .build_cjson = cJSON_Version(),
        .resumed_run_id = r->resumed_from, .resumed_superstep = r->resumed_superstep};
    char *inputs = json_text(r->inputs), *replay = wf_replay_json(r);
    o.replay_json = replay;
    wf_llm_model_info_t *info = kvm_calloc((size_t)wf->n_models + 1, sizeof *info);
    kvm_trace_model_t *models = kvm_calloc((size_t)wf->n_models + 1, sizeof *models);
    kvm_trace_part_t *parts = NULL;
    bool ok = inputs && (replay || !r->replay) && info && models && agent_records(wf, r, &o, &parts) && graph_records(wf, &o);
    for (int i = 0; ok && i < wf->n_models; i++) {
        wf_llm_model_describe(wf->llm, wf->models[i].llm, &info[i]);
        models[i] = info[i].t;
        models[i].index = i;
        models[i].script_path = wf->models[i].path;
    }
    o.inputs_json = inputs;
    o.models = models;
    o.n_models = wf->n_models;
    written(r, ok ? kvm_trace_write_run_start(r->trace, &o) : kvm_seterr(KVM_ENOMEM, "out of memory building run.start"));
    cJSON_free(inputs);
    cJSON_free(replay);
    kvm_free(info);
    kvm_free(models);
    kvm_free(parts);
    kvm_free((void *)o.agents);
    kvm_free((void *)o.nodes);
    kvm_free((void *)o.edges);
    kvm_free((void *)o.joins);
}

/* ---- super-steps and edges ----------------------------------------------------------------------------- */

/* The names of the nodes marked in flags ([n_nodes]); *n their count. kvm_free. */
static const char **marked_nodes(const wf_graph_t *g, const bool *flags, int *n) {
    const char **v = kvm_calloc((size_t)g->n_nodes + 1, sizeof *v);
    *n = 0;
    for (int i = 0; v && i < g->n_nodes; i++)
        if (flags[i]) v[(*n)++] = g->nodes[i].name;
    return v;
}

/* A subgraph's run writes its steps (nested under its node's step), logs, checkpoints, interrupts and answers (with its
 * path) into its root's trace; its super-steps and edges are its own and not written. */
void wf_trace_superstep(kvm_workflow_t *wf, wf_run_t *r) {
    if (!r->trace || r->parent) return;
    kvm_trace_superstep_t o = {.superstep = r->superstep};
    const char **nodes = marked_nodes(r->g, r->ready, &o.n_nodes);
    o.nodes = nodes;
    written(r, nodes ? kvm_trace_write_superstep(r->trace, &o) : kvm_seterr(KVM_ENOMEM, "out of memory building a superstep record"));
    kvm_free(nodes);
}

void wf_trace_edge(wf_run_t *r, const char *from, const char *to, const char *kind) {
    if (!r->trace || r->parent) return;
    kvm_trace_edge_t o = {.superstep = r->superstep, .from = from, .to = to, .kind = kind};
    written(r, kvm_trace_write_edge(r->trace, &o));
}

/* The checkpoint's "nodes", "joins" and "usage.agents" (what is not Lua data) as JSON; false when out of memory. */
static bool ckpt_tables(const kvm_workflow_t *wf, const wf_run_t *r, cJSON *nodes, cJSON *joins, cJSON *agents) {
    const wf_graph_t *g = r->g;
    bool ok = nodes && joins && agents;
    for (int i = 0; ok && i < g->n_nodes; i++) {
        if (!r->node_cur[i] && !r->node_prev[i]) continue;
        cJSON *n = cJSON_AddObjectToObject(nodes, g->nodes[i].name);
        ok = n && (!r->node_cur[i] || cJSON_AddStringToObject(n, "cur", r->node_cur[i])) &&
             (!r->node_prev[i] || cJSON_AddStringToObject(n, "prev", r->node_prev[i]));
    }
    for (int j = 0; ok && j < g->n_joins; j++) {
        cJSON *a = cJSON_CreateArray();
        ok = a && cJSON_AddItemToArray(joins, a);
        if (!ok) cJSON_Delete(a);
        for (int k = 0; ok && k < g->joins[j].n_src; k++)
            if (r->arrived[j][k]) ok = cJSON_AddItemToArray(a, cJSON_CreateString(g->joins[j].src_names[k]));
    }
    for (int i = 0; ok && i < wf->n_agents; i++)
        if (r->agent_tokens[i]) ok = cJSON_AddNumberToObject(agents, wf->agents[i].name, (double)r->agent_tokens[i]) != NULL;
    return ok;
}

/* A subgraph's run writes its checkpoints too, with its path: a resume continues inside it (wf_subgraph.c). */
void wf_trace_checkpoint(kvm_workflow_t *wf, wf_run_t *r, bool restored) {
    if (!r->trace) return;
    char path[512];
    kvm_trace_checkpoint_t o = {.superstep = r->superstep, .rng0 = r->rng[0], .rng1 = r->rng[1], .input_tokens = r->tokens_in,
                                .output_tokens = r->tokens_out, .agent_calls = r->agent_calls, .steps = r->root->step_idx,
                                .resumable = true, .restored = restored, .path = r->parent ? wf_run_path(r, path, sizeof path) : NULL};
    cJSON *nodes = cJSON_CreateObject(), *joins = cJSON_CreateArray(), *agents = cJSON_CreateObject();
    bool ok = ckpt_tables(wf, r, nodes, joins, agents);
    char *state = ref_json_text(r, r->state_ref), *last = ref_json_text(r, r->last_ref);
    char *nodes_t = ok ? json_text(nodes) : NULL, *joins_t = ok ? json_text(joins) : NULL;
    char *agents_t = ok ? json_text(agents) : NULL, *outputs = json_text(r->outputs);
    const char **next = marked_nodes(r->g, r->ready, &o.n_next);
    o.state_json = state;
    o.last_json = last;
    o.nodes_json = nodes_t;
    o.joins_json = joins_t;
    o.agent_tokens_json = agents_t;
    o.outputs_json = outputs;
    o.next = next;
    ok = ok && state && last && nodes_t && joins_t && agents_t && (outputs || !r->outputs) && next;
    written(r, ok ? kvm_trace_write_checkpoint(r->trace, &o) : kvm_seterr(KVM_ENOMEM, "out of memory building a checkpoint"));
    cJSON_free(state);
    cJSON_free(last);
    cJSON_free(nodes_t);
    cJSON_free(joins_t);
    cJSON_free(agents_t);
    cJSON_free(outputs);
    cJSON_Delete(nodes);
    cJSON_Delete(joins);
    cJSON_Delete(agents);
    kvm_free(next);
}

void wf_trace_interrupt(wf_run_t *r, const char *node, const cJSON *payload, const cJSON *answers) {
    if (!r->trace) return;
    char *p = json_text(payload), *a = answers ? json_text(answers) : kvm_strdup("[]"), path[512];
    kvm_trace_interrupt_t o = {.superstep = r->superstep, .node = node, .payload_json = p, .answers_json = a,
                               .path = r->parent ? wf_run_path(r, path, sizeof path) : NULL};
    written(r, p && a ? kvm_trace_write_interrupt(r->trace, &o) : kvm_seterr(KVM_ENOMEM, "out of memory building an interrupt record"));
    cJSON_free(p);
    if (answers) cJSON_free(a);
    else kvm_free(a);
}

void wf_trace_resume_rec(wf_run_t *r, const char *node, const cJSON *value) {
    if (!r->trace) return;
    char *v = json_text(value), path[512];
    /* answered inside the super-step going on, or (a resumed run's answers) for the one after its checkpoint */
    kvm_trace_resume_t o = {.superstep = r->n_tasks > 0 ? r->superstep : r->superstep + 1, .node = node, .value_json = v,
                            .path = r->parent ? wf_run_path(r, path, sizeof path) : NULL};
    written(r, v ? kvm_trace_write_resume(r->trace, &o) : kvm_seterr(KVM_ENOMEM, "out of memory building a resume record"));
    cJSON_free(v);
}

void wf_trace_answers(kvm_workflow_t *wf, wf_run_t *r) {
    (void)wf;
    for (const cJSON *n = r->answers ? r->answers->child : NULL; n; n = n->next)
        for (const cJSON *v = n->child; v; v = v->next) wf_trace_resume_rec(r, n->string, v);
}

/* ---- resume from a trace ------------------------------------------------------------------------------------- */

/* Adds value to answers[node] (answers: {node: [values]}); false when out of memory. */
static bool add_answer(cJSON *answers, const char *node, cJSON *value) {
    cJSON *list = cJSON_GetObjectItemCaseSensitive(answers, node);
    if (!list && !cJSON_AddItemToObject(answers, node, list = cJSON_CreateArray())) return false;
    if (value && cJSON_AddItemToArray(list, value)) return true;
    cJSON_Delete(value);
    return false;
}

static bool add_text(cJSON *o, const char *name, const char *text) { return !text || cJSON_AddStringToObject(o, name, text); }

cJSON *wf_ckpt_to_json(const kvm_trace_checkpoint_t *c) {
    cJSON *o = cJSON_CreateObject(), *next = cJSON_CreateArray();
    char r0[24], r1[24];
    snprintf(r0, sizeof r0, "%016llx", (unsigned long long)c->rng0);
    snprintf(r1, sizeof r1, "%016llx", (unsigned long long)c->rng1);
    bool ok = o && next && cJSON_AddItemToObject(o, "next", next);
    if (!ok) cJSON_Delete(next);
    for (int i = 0; ok && i < c->n_next; i++) ok = cJSON_AddItemToArray(next, cJSON_CreateString(c->next[i]));
    ok = ok && cJSON_AddNumberToObject(o, "superstep", c->superstep) && add_text(o, "state", c->state_json) &&
         add_text(o, "last", c->last_json) && add_text(o, "nodes", c->nodes_json) && add_text(o, "joins", c->joins_json) &&
         add_text(o, "outputs", c->outputs_json) && add_text(o, "agents", c->agent_tokens_json) && cJSON_AddStringToObject(o, "rng0", r0) &&
         cJSON_AddStringToObject(o, "rng1", r1) && cJSON_AddNumberToObject(o, "input_tokens", (double)c->input_tokens) &&
         cJSON_AddNumberToObject(o, "output_tokens", (double)c->output_tokens) && cJSON_AddNumberToObject(o, "agent_calls", c->agent_calls) &&
         cJSON_AddNumberToObject(o, "steps", c->steps) && (!c->resumable || cJSON_AddTrueToObject(o, "v_resume"));
    if (!ok) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

static const char *opt_text(const cJSON *j, const char *name) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, name);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static double num_of(const cJSON *j, const char *name) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, name);
    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

int wf_ckpt_from_json(const cJSON *j, kvm_trace_checkpoint_t *c, const char ***next) {
    memset(c, 0, sizeof *c);
    const cJSON *nx = cJSON_GetObjectItemCaseSensitive(j, "next");
    int n = cJSON_GetArraySize(nx);
    *next = kvm_calloc((size_t)n + 1, sizeof **next);
    if (!*next) return kvm_seterr(KVM_ENOMEM, "out of memory restoring a checkpoint");
    for (const cJSON *x = nx ? nx->child : NULL; x; x = x->next) {
        if (!cJSON_IsString(x)) return kvm_seterr(KVM_EFORMAT, "checkpoint: 'next' must list node names");
        (*next)[c->n_next++] = x->valuestring;
    }
    c->next = *next;
    c->superstep = (int)num_of(j, "superstep");
    c->state_json = opt_text(j, "state");
    c->last_json = opt_text(j, "last");
    c->nodes_json = opt_text(j, "nodes");
    c->joins_json = opt_text(j, "joins");
    c->outputs_json = opt_text(j, "outputs");
    c->agent_tokens_json = opt_text(j, "agents");
    const char *r0 = opt_text(j, "rng0"), *r1 = opt_text(j, "rng1");
    c->rng0 = r0 ? strtoull(r0, NULL, 16) : 0;
    c->rng1 = r1 ? strtoull(r1, NULL, 16) : 0;
    c->input_tokens = (long)num_of(j, "input_tokens");
    c->output_tokens = (long)num_of(j, "output_tokens");
    c->agent_calls = (int)num_of(j, "agent_calls");
    c->steps = (int)num_of(j, "steps");
    c->resumable = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "v_resume"));
    return 0;
}

/* The entry of the resume tree for a subgraph's run at path ("write@3/check@2"; NULL = the run's own): {"answers": {},
 * "subs": {}, "ckpt": ...}, made when missing; NULL when out of memory. */
static cJSON *tree_entry(cJSON *tree, const char *path) {
    cJSON *e = tree;
    char seg[512];
    for (const char *p = path; e && p && *p;) {
        const char *slash = strchr(p, '/');
        size_t len = slash ? (size_t)(slash - p) : strlen(p);
        snprintf(seg, sizeof seg, "%.*s", (int)(len < sizeof seg ? len : sizeof seg - 1), p);
        p = slash ? slash + 1 : NULL;
        cJSON *subs = cJSON_GetObjectItemCaseSensitive(e, "subs");
        cJSON *x = subs ? cJSON_GetObjectItemCaseSensitive(subs, seg) : NULL;
        if (!x && subs && (x = cJSON_AddObjectToObject(subs, seg)) &&
            (!cJSON_AddObjectToObject(x, "answers") || !cJSON_AddObjectToObject(x, "subs")))
            x = NULL;
        e = x;
    }
    return e;
}

/* Whether path p is path `under` or below it (NULL = the run's own). */
static bool path_in(const char *p, const char *under) {
    if (!under) return true;
    size_t n = strlen(under);
    return p && !strncmp(p, under, n) && (p[n] == '\0' || p[n] == '/');
}

static bool same_path(const char *a, const char *b) { return (!a && !b) || (a && b && !strcmp(a, b)); }

/* Replaces e's field name by a new empty object; false when out of memory. */
static bool reset_field(cJSON *e, const char *name) {
    cJSON_DeleteItemFromObjectCaseSensitive(e, name);
    return cJSON_AddObjectToObject(e, name) != NULL;
}

/* The resume tree of a run resumed from its checkpoint record at (tree: {"answers": {}, "subs": {}}, filled; with
 * only_restored, a replay of a resumed run's trace: only the checkpoints its subgraphs' runs continued from): the
 * interrupts of the super-step after the checkpoint: the answers given then are given again (the nodes run again from
 * their start); an interrupt not answered is *pending. Inside the subgraph nodes of that super-step, each subgraph's
 * run continues from its last checkpoint with the answers given after it (a checkpoint of a subgraph's run makes what
 * was recorded below it before stale). 0 or KVM_ENOMEM. */
static int resume_tree(const kvm_trace_log_t *log, int at, bool only_restored, cJSON *tree, const kvm_trace_interrupt_t **pending) {
    int next_ss = log->recs[at].checkpoint.superstep + 1;
    *pending = NULL;
    for (int i = at + 1; i < log->n; i++) {
        const kvm_trace_rec_t *x = &log->recs[i];
        if (x->type == KVM_TRACE_CHECKPOINT) {
            if (!x->checkpoint.path) break;
            if (only_restored && !x->checkpoint.restored) continue;
            cJSON *e = tree_entry(tree, x->checkpoint.path), *c = wf_ckpt_to_json(&x->checkpoint);
            cJSON_DeleteItemFromObjectCaseSensitive(e, "ckpt");
            if (!e || !c || !cJSON_AddItemToObject(e, "ckpt", c) || !reset_field(e, "answers") || !reset_field(e, "subs")) {
                if (!e) cJSON_Delete(c);
                return kvm_seterr(KVM_ENOMEM, "resume: out of memory");
            }
            if (*pending && path_in((*pending)->path, x->checkpoint.path)) *pending = NULL;
            continue;
        }
        if (x->type == KVM_TRACE_INTERRUPT && (x->interrupt.path || x->interrupt.superstep == next_ss)) *pending = &x->interrupt;
        if (x->type == KVM_TRACE_RESUME && (x->resume.path || x->resume.superstep == next_ss) && x->resume.node) {
            cJSON *v = x->resume.value_json ? cJSON_Parse(x->resume.value_json) : cJSON_CreateNull();
            cJSON *e = tree_entry(tree, x->resume.path);
            if (!e || !add_answer(cJSON_GetObjectItemCaseSensitive(e, "answers"), x->resume.node, v)) {
                if (!e) cJSON_Delete(v);
                return kvm_seterr(KVM_ENOMEM, "resume: out of memory");
            }
            if (*pending && !strcmp((*pending)->node, x->resume.node) && same_path((*pending)->path, x->resume.path)) *pending = NULL;
        }
    }
    return 0;
}

/* A new resume tree {"answers": {}, "subs": {}}; NULL when out of memory. */
static cJSON *tree_new(void) {
    cJSON *t = cJSON_CreateObject();
    if (t && (!cJSON_AddObjectToObject(t, "answers") || !cJSON_AddObjectToObject(t, "subs"))) {
        cJSON_Delete(t);
        return NULL;
    }
    return t;
}

/* Drops every "answers" of the entries below subs (a replay gives the recorded answers in order instead). */
static void tree_drop_answers(cJSON *subs) {
    for (cJSON *e = subs ? subs->child : NULL; e; e = e->next) {
        cJSON_DeleteItemFromObjectCaseSensitive(e, "answers");
        tree_drop_answers(cJSON_GetObjectItemCaseSensitive(e, "subs"));
    }
}

int kvm_wf_start_resume(kvm_workflow_t *wf, const char *run_dir, int step, const cJSON *answer, int *run) {
    if (!run_dir) return kvm_seterr(KVM_EINVAL, "resume: no trace directory given");
    if (step < 0) return kvm_seterr(KVM_EINVAL, "resume: super-step %d (0 = the last checkpoint)", step);
    kvm_trace_log_t log;
    int rc = kvm_trace_read(run_dir, &log);
    if (rc) return rc;
    const kvm_trace_rec_t *st = kvm_trace_log_next(&log, KVM_TRACE_RUN_START, NULL);
    int at = -1, n_ck = 0, last_ss = 0;
    for (int i = 0; i < log.n; i++)
        if (log.recs[i].type == KVM_TRACE_CHECKPOINT && !log.recs[i].checkpoint.path) { /* the run's, not a subgraph's */
            n_ck++;
            last_ss = log.recs[i].checkpoint.superstep;
            if (step == 0 || log.recs[i].checkpoint.superstep == step) at = i;
        }
    cJSON *inputs = NULL, *tree = tree_new();
    const kvm_trace_interrupt_t *pending = NULL;
    if (!st) rc = kvm_seterr(KVM_EFORMAT, "%s has no run.start record", run_dir);
    else if (at < 0 && n_ck == 0)
        rc = kvm_seterr(KVM_ENOENT, "%s has no checkpoint: the run ended before its first super-step did (run it again)", run_dir);
    else if (at < 0)
        rc = kvm_seterr(KVM_ENOENT, "%s has no checkpoint after super-step %d (its last is after super-step %d)", run_dir, step, last_ss);
    else if (!tree)
        rc = kvm_seterr(KVM_ENOMEM, "resume: out of memory");
    else if (!(inputs = st->run_start.inputs_json ? cJSON_Parse(st->run_start.inputs_json) : cJSON_CreateObject()))
        rc = kvm_seterr(KVM_EFORMAT, "%s: run.start inputs are not JSON", run_dir);
    int next_ss = at >= 0 ? log.recs[at].checkpoint.superstep + 1 : 0;
    if (!rc) rc = resume_tree(&log, at, false, tree, &pending);
    if (!rc && answer && !pending)
        rc = kvm_seterr(KVM_EINVAL, "%s: the run was not parked on kvmesh.interrupt after super-step %d: nothing to answer", run_dir,
                        next_ss - 1);
    if (!rc && answer) {
        cJSON *e = tree_entry(tree, pending->path);
        if (!e || !add_answer(cJSON_GetObjectItemCaseSensitive(e, "answers"), pending->node, cJSON_Duplicate(answer, 1)))
            rc = kvm_seterr(KVM_ENOMEM, "resume: out of memory");
    }
    int kv = -1;
    kvm_kv_policy_t p;
    if (!rc && st->run_start.kv_override && kvm_kv_policy_parse(st->run_start.kv_override, &p) == 0) kv = (int)p;
    if (!rc) {
        cJSON *answers = cJSON_DetachItemFromObjectCaseSensitive(tree, "answers"), *subs = cJSON_DetachItemFromObjectCaseSensitive(tree, "subs");
        if (answers && !answers->child) {
            cJSON_Delete(answers);
            answers = NULL;
        }
        if (subs && !subs->child) {
            cJSON_Delete(subs);
            subs = NULL;
        }
        rc = wf_run_resume_from(wf, inputs, st->run_start.seed, kv, st->run_start.run_id, &log.recs[at].checkpoint, answers, subs, run);
        if (rc) rc = kvm_errctx(rc, "resuming %s after super-step %d", run_dir, next_ss - 1);
    }
    cJSON_Delete(tree);
    cJSON_Delete(inputs);
    kvm_trace_log_free(&log);
    return rc;
}

/* ---- steps --------------------------------------------------------------------------------------------- */

void wf_trace_agent_step(kvm_workflow_t *wf, wf_run_t *r, const wf_task_t *t, int idx, int ai, const wf_llm_result_t *res,
                         int status, const char *err, bool via_call) {
    if (!r->trace) return;
    const wf_agent_t *a = &wf->agents[ai];
    char *decisions = json_text(res->kv_detail);
    kvm_trace_step_t o = {
        .idx = idx, .superstep = r->superstep, .node = r->g->nodes[t->node].name, .agent = a->name, .op = "chat",
        .via = via_call ? "ctx:call" : NULL, .t_start = t->t_start, .t_end = kvm_wall_ns(), .error = {.code = status, .message = err},
        .model = wf->models[a->model].path, .system = a->role, .pieces = t->seen ? t->seen->parts : NULL,
        .n_pieces = t->seen ? t->seen->n : 0, .prompt_text = res->prompt_text, .prompt_tokens = res->n_prompt,
        .prompt_ids = res->n_prompt > 0 ? res->prompt_ids : NULL, .n_prompt_ids = res->prompt_ids ? res->n_prompt : 0,
        .kv = {.exact = res->kv.exact, .offset = res->kv.offset, .naive = res->kv.naive, .recomputed = res->kv.recomputed,
               .fused = res->kv.fused, .mode = res->kv.mode[0] ? res->kv.mode : "dense", .anchors = res->kv.anchors,
               .decisions_json = decisions},
        .sampling = {.temperature = a->sampling.temperature, .top_k = a->sampling.top_k, .top_p = a->sampling.top_p,
                     .max_tokens = a->max_tokens},
        .output_text = res->text, .output_tokens = res->n_out, .stop = kvm_stop_reason_name(res->stop_reason),
        .timings = {.queue_ms = res->queue_ms, .ttft_ms = res->ttft_ms, .decode_ms = res->decode_ms,
                    .total_ms = (double)(kvm_now_ns() - t->t_job) / 1e6,
                    .tokens_per_s = res->decode_ms > 0 && res->n_out > 1 ? (res->n_out - 1) / (res->decode_ms / 1e3) : 0},
        .batch = {.forwards = res->n_forward, .max_seqs = res->batch_max_seqs, .mean_seqs = res->batch_mean_seqs,
                  .max_rows = res->batch_max_rows},
        .graph = r->parent ? r->g->name : NULL, .depth = r->depth, .parent = r->parent_step};
    written(r, kvm_trace_write_step(r->trace, &o));
    cJSON_free(decisions);
}

void wf_trace_lua_step(kvm_workflow_t *wf, wf_run_t *r, const wf_task_t *t, int idx) {
    if (!r->trace) return;
    const wf_node_t *n = &r->g->nodes[t->node];
    static const char *const ops[] = {"chat", "func", "tool", "subgraph"};
    kvm_trace_step_t o = {.idx = idx, .superstep = r->superstep, .node = n->name, .op = ops[n->kind], .t_start = t->t_start,
                          .t_end = kvm_wall_ns(), .error = {.code = t->err, .message = t->errmsg},
                          .graph = r->parent ? r->g->name : NULL, .depth = r->depth, .parent = r->parent_step};
    char *out = !t->err && t->out_ref != LUA_NOREF ? ref_json_text(r, t->out_ref) : NULL;
    o.output_json = out;
    written(r, kvm_trace_write_step(r->trace, &o));
    cJSON_free(out);
}

/* ---- run.end and index.json ------------------------------------------------------------------------------ */

void wf_trace_run_end(kvm_workflow_t *wf, wf_run_t *r, double wall_ms) {
    if (!r->trace || r->parent) return;
    char *outputs = json_text(r->outputs), *state = json_text(r->state);
    kvm_trace_run_end_t o = {
        .run_id = r->id, .error = {.code = r->err, .message = r->errmsg}, .outputs_json = outputs, .state_json = state,
        .input_tokens = r->tokens_in, .output_tokens = r->tokens_out, .agent_calls = r->agent_calls, .wall_ms = wall_ms,
        .lua_ms = (double)r->budget.lua_ns / 1e6, .steps = r->superstep, .tokens = r->tokens_in + r->tokens_out,
        .instructions = (double)r->budget.instructions, .lua_bytes_peak = (double)r->acct->peak};
    written(r, outputs && state ? kvm_trace_write_run_end(r->trace, &o) : kvm_seterr(KVM_ENOMEM, "out of memory building run.end"));
    cJSON_free(outputs);
    cJSON_free(state);
    kvm_trace_index_t idx = {.run_id = r->id, .workflow = wf->path, .graph = r->g->name, .error = r->err, .started = r->t0_wall,
                             .wall_ms = wall_ms, .supersteps = r->superstep, .steps = r->step_idx, .agent_calls = r->agent_calls,
                             .input_tokens = r->tokens_in, .output_tokens = r->tokens_out, .seed = r->seed};
    if (r->trace && kvm_trace_write_index(r->trace, &idx) != 0) KVM_LOGW("run %s: %s", r->id, kvm_errmsg());
    kvm_trace_close(r->trace);
    r->trace = NULL;
}

/* ---- replay ------------------------------------------------------------------------------------------------ */

/* A traced step that replay compares: an agent node's own call that succeeded. */
static bool compared(const kvm_trace_step_t *s) { return s->agent && !s->via && s->depth == 0 && s->error.code == 0; }

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

/* How many messages of node msgs holds. */
static int n_messages(const cJSON *msgs, const char *node) {
    int n = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, msgs) {
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(m, "node");
        n += cJSON_IsString(x) && !strcmp(x->valuestring, node);
    }
    return n;
}

/* Compares the traced agent-node steps with the replayed run's messages, in order per node; base: the messages
 * the run started with (a resumed run's checkpoint), which come first in msgs. */
static int compare(const kvm_trace_log_t *log, const cJSON *msgs, const cJSON *base, kvm_replay_t *out) {
    int n = 0, from = 0;
    for (const kvm_trace_rec_t *rec; (rec = kvm_trace_log_next(log, KVM_TRACE_STEP, &from)) != NULL;) n += compared(&rec->step);
    out->steps = kvm_calloc((size_t)n + 1, sizeof *out->steps);
    if (!out->steps) return kvm_seterr(KVM_ENOMEM, "replay: out of memory");
    from = 0;
    for (const kvm_trace_rec_t *rec; (rec = kvm_trace_log_next(log, KVM_TRACE_STEP, &from)) != NULL;) {
        const kvm_trace_step_t *s = &rec->step;
        if (!compared(s)) continue;
        int want = n_messages(base, s->node); /* this is the want-th compared step of its node in the trace */
        for (int k = 0; k < out->n_steps; k++) want += !strcmp(out->steps[k].node, s->node);
        const char *now = nth_message(msgs, s->node, want), *was = s->output_text ? s->output_text : "";
        kvm_replay_step_t *st = &out->steps[out->n_steps++];
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

/* A limit recorded in a trace, used only when it is a number in (0, operator's); else the operator's. */
static double lower_limit(double traced, double op) { return traced > 0 && traced < op ? traced : op; }

/* The workflow options a traced run ran with (the log must outlive the workflow: strings point into it). */
static kvm_wf_opts_t traced_opts(const kvm_trace_run_start_t *s, const kvm_wf_replay_opts_t *o) {
    kvm_wf_opts_t w = {0};
    w.kv_override = s->kv_override;
    w.mock = (o && o->mock) || s->mock;
    w.model_override = o ? o->model_override : NULL;
    if (o) {
        w.llm.model = o->model;
        w.host_fns = o->host_fns;
        w.n_host_fns = o->n_host_fns;
        w.tools = o->tools;
    }
    w.llm.quiet = true;
    /* the trace is input, not the operator: its limits only lower the operator's (NaN, infinities and
       absurd values fall back to them) */
    double ins = o && o->max_instructions ? (double)o->max_instructions : 1e9, ms = o && o->lua_cpu_ms > 0 ? o->lua_cpu_ms : 5000;
    double mem = o && o->run_mem_cap_bytes ? (double)o->run_mem_cap_bytes : (double)((size_t)64 << 20);
    w.max_instructions = (uint64_t)lower_limit(s->limits.instructions, ins);
    w.lua_cpu_ms = lower_limit(s->limits.lua_ms, ms);
    w.run_mem_cap_bytes = (size_t)lower_limit(s->limits.memory_bytes, mem);
    return w;
}

int kvm_wf_replay(const char *run_dir, const kvm_wf_replay_opts_t *o, kvm_replay_t *out) {
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
    /* a resumed run replays from the checkpoint its trace starts with */
    const kvm_trace_rec_t *ck = s->resumed_run_id ? kvm_trace_log_next(&log, KVM_TRACE_CHECKPOINT, NULL) : NULL;
    cJSON *base = ck && ck->checkpoint.state_json ? cJSON_Parse(ck->checkpoint.state_json) : NULL;
    if (!wf) rc = kvm_errcode() ? kvm_errcode() : KVM_EINVAL;
    else if (s->resumed_run_id && !ck) rc = kvm_seterr(KVM_EFORMAT, "%s: a resumed run without its checkpoint", run_dir);
    else if (ck) { /* its subgraph nodes continue from their checkpoints as in the resumed run (answers: below) */
        cJSON *tree = tree_new(), *subs = NULL;
        const kvm_trace_interrupt_t *pending = NULL;
        rc = tree ? resume_tree(&log, (int)(ck - log.recs), true, tree, &pending) : kvm_seterr(KVM_ENOMEM, "replay: out of memory");
        if (!rc) {
            subs = cJSON_DetachItemFromObjectCaseSensitive(tree, "subs");
            tree_drop_answers(subs);
        }
        cJSON_Delete(tree);
        if (subs && !subs->child) {
            cJSON_Delete(subs);
            subs = NULL;
        }
        if (!rc) rc = wf_run_resume_from(wf, inputs, s->seed, -1, s->resumed_run_id, &ck->checkpoint, NULL, subs, &run);
        else cJSON_Delete(subs);
    }
    else {
        /* a counterfactual replay's trace: its edits and its changed step again (the steps before it are generated,
           as they were in its origin) */
        wf->next_replay = s->replay_json ? cJSON_Parse(s->replay_json) : NULL;
        rc = kvm_wf_start(wf, inputs, s->seed, &run);
        cJSON_Delete(wf->next_replay);
        wf->next_replay = NULL;
    }
    if (!rc) rc = kvm_wf_drive(wf);
    /* interrupts get the answers the trace recorded, in order */
    for (int from = 0; !rc && kvm_wf_run_parked(wf, run, NULL, NULL);) {
        const kvm_trace_rec_t *a = kvm_trace_log_next(&log, KVM_TRACE_RESUME, &from);
        if (!a) break; /* the traced run stayed parked here too */
        cJSON *v = a->resume.value_json ? cJSON_Parse(a->resume.value_json) : NULL;
        rc = kvm_wf_run_resume(wf, run, v);
        cJSON_Delete(v);
        if (!rc) rc = kvm_wf_drive(wf);
    }
    if (!rc && kvm_wf_run_parked(wf, run, NULL, NULL)) /* ends it: its state (and messages) as they are */
        kvm_wf_run_cancel(wf, run, KVM_EINTERRUPTED, "parked in kvmesh.interrupt with no answer in the trace");
    if (!rc) {
        out->status = kvm_wf_run_status(wf, run, NULL);
        rc = compare(&log, cJSON_GetObjectItemCaseSensitive(kvm_wf_run_state(wf, run), "msgs"),
                     cJSON_GetObjectItemCaseSensitive(base, "msgs"), out);
    }
    cJSON_Delete(base);
    char msg[1024] = "";
    if (rc) snprintf(msg, sizeof msg, "%s", kvm_errmsg());
    kvm_wf_free(wf);
    cJSON_Delete(inputs);
    kvm_trace_log_free(&log);
    if (rc) {
        kvm_replay_clear(out);
        kvm_seterr(rc, "%s", msg);
    }
    return rc;
}

void kvm_replay_clear(kvm_replay_t *r) {
    if (!r) return;
    for (int i = 0; i < r->n_steps; i++) {
        kvm_free(r->steps[i].node);
        kvm_free(r->steps[i].was);
        kvm_free(r->steps[i].now);
    }
    kvm_free(r->steps);
    memset(r, 0, sizeof *r);
}
