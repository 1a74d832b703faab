/* wf_internal.h - the structures shared by wf_lua.c (sandbox, bindings, graph building) and
 * wf_exec.c (runs, super-steps, traces). Not a public header. */
#ifndef KVM_AGENTS_WF_INTERNAL_H
#define KVM_AGENTS_WF_INTERNAL_H

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "../runtime/trace/trace.h"
#include "wf.h"

#define WF_START (-1)
#define WF_END (-2)
#define WF_START_NAME "__start__"
#define WF_END_NAME "__end__"
#define WF_HOOK_COUNT 1000

/* ---- accounting --------------------------------------------------------------------------------- */

/* Bytes of Lua heap charged to one owner (a run, or the workflow for load-time data). Every Lua block
 * carries a pointer to its account, so frees are credited correctly whichever run is executing. An
 * account outlives its run while blocks still point at it. */
typedef struct wf_account {
    size_t bytes, peak, cap;
    bool closed;           /* owner gone: free the account when bytes reach 0 */
} wf_account_t;

/* Instruction and CPU budget of whatever Lua is executing (a run, or the script's load). */
typedef struct wf_budget {
    uint64_t instructions, max_instructions;
    uint64_t lua_ns, max_lua_ns;
    uint64_t slice_t0;     /* start of the current Lua slice (0 = not in Lua) */
    bool killed;
    int kill_code;         /* KVM_EBUDGET */
    char kill_msg[160];
} wf_budget_t;

/* ---- definitions (built by the script at load, immutable afterwards) ------------------------------ */

enum wf_src { WF_SRC_INPUT = 0, WF_SRC_AGENT, WF_SRC_AGENT_PREV, WF_SRC_TOOL, WF_SRC_STATE };

typedef struct wf_tpart {
    bool slot;
    char *text;            /* fixed text; for slots the source text inside the braces ("agent:planner") */
    int src;               /* enum wf_src */
    char *key;             /* input key (NULL = the whole {input}), node name, or state key */
    char *ph_name;         /* KVCOMM placeholder name */
    int node;              /* resolved producer node for agent/tool slots (-1 until validation) */
} wf_tpart_t;

typedef struct wf_model {
    char *path;            /* as given by the script */
    int llm;               /* engine index */
    char *where;
} wf_model_t;

typedef struct wf_agent {
    char *name;
    int model;
    char *role;
    char *tmpl;
    wf_tpart_t *parts;
    int n_parts;
    kvm_sampler_params_t sampling;
    int max_tokens;
    char **stop;
    int n_stop;
    long budget_tokens;    /* per run, prompt + output over all calls (0 = none) */
    bool ignore_eos;       /* generate exactly max_tokens (benchmarks) */
    wf_kv_policy_t kv;
    char *where;           /* "file:line" of the definition */
} wf_agent_t;

enum wf_node_kind { WF_NODE_AGENT = 0, WF_NODE_FUNC, WF_NODE_TOOL };
enum wf_reducer { WF_RED_REPLACE = 0, WF_RED_APPEND, WF_RED_MERGE, WF_RED_SUM, WF_RED_MAX, WF_RED_MIN, WF_RED_FUNC };

typedef struct wf_node {
    char *name;
    int kind;
    int agent;             /* agent nodes */
    int fn_ref;            /* func/tool nodes: registry ref */
    char *writes;          /* state key the node's output is reduced into (NULL = none) */
    char *where;
    int router_ref;        /* LUA_NOREF if none */
    int *route_targets;    /* declared router targets (WF_END allowed) */
    int n_route_targets;
    char **route_names;    /* as written (resolved at validation) */
    bool route_declared;
    char *route_where;
} wf_node_t;

typedef struct wf_edge {
    int from, to;          /* node indices, WF_START / WF_END (resolved at validation) */
    char *from_name, *to_name;
    int when_ref;          /* LUA_NOREF = unconditional */
    bool on_error;
    char *where;
} wf_edge_t;

typedef struct wf_join {
    int *src;
    char **src_names;
    int n_src;
    int target;
    char *target_name;
    bool all;
    char *where;
} wf_join_t;

typedef struct wf_key {
    char *name;
    int reducer;
    int fn_ref;            /* WF_RED_FUNC */
} wf_key_t;

typedef struct wf_graph {
    char *name;
    char *where;
    wf_node_t *nodes;
    int n_nodes;
    wf_edge_t *edges;
    int n_edges;
    wf_join_t *joins;
    int n_joins;
    wf_key_t *keys;
    int n_keys;
    int init_ref;          /* table of initial state values */
    long lim_steps;        /* 0 = not set (default 50) */
    long lim_tokens, lim_wall_ms, lim_memory_mb;
    double lim_lua_ms;
    uint64_t lim_instructions;
    int output_ref, dataset_ref, score_ref;
} wf_graph_t;

struct wf_run;

struct kvm_workflow {
    lua_State *L;
    kvm_wf_opts_t o;
    char *path;
    char *name;
    char *source;
    size_t source_len;
    uint64_t source_hash;
    size_t total_bytes, total_cap;
    wf_account_t *acct_shared;
    wf_account_t *cur_acct;      /* account charged for new blocks */
    wf_budget_t *cur_budget;     /* budget charged by the hook (NULL = none) */
    struct wf_run *cur_run;      /* run whose Lua is executing (NULL at load) */
    wf_budget_t load_budget;
    uint64_t rng_load[2];
    wf_model_t *models;
    int n_models;
    wf_agent_t *agents;
    int n_agents;
    wf_graph_t **graphs;         /* every kvmesh.graph{} made by the script */
    int n_graphs;
    wf_graph_t *g;               /* the one the script returned */
    int env_ref;                 /* the script's (frozen) globals */
    int ctx_mt_ref;              /* metatable of ctx objects */
    wf_llm_t *llm;
    struct wf_run **runs;
    int n_runs, cap_runs;
    kvm_wf_agent_stats_t *stats; /* [n_agents] */
    uint64_t job_serial;
};

/* ---- wf_lua.c ----------------------------------------------------------------------------------- */

/* Opens the sandboxed state (allocator, libraries, freezing, kvmesh table). 0 or KVM_E*. */
int wf_lua_open(kvm_workflow_t *wf);
/* Runs the script; it must return a graph. Validates it. 0 or KVM_ELUA_* / KVM_EINVAL with message. */
int wf_lua_load_script(kvm_workflow_t *wf, const char *chunkname, const char *src, size_t len);
/* Converts the Lua value at idx to JSON (plain data; handles and functions become descriptive
 * strings). Depth-limited; never raises. NULL only when out of memory (nothing half-built is left). */
cJSON *wf_lua_to_json(lua_State *L, int idx);
/* Pushes a JSON value as Lua data (objects -> tables, arrays -> sequences, null -> nil). May raise
 * a memory error: call inside a protected context or with room. */
void wf_lua_push_json(lua_State *L, const cJSON *j);
/* Text of a value for a {state:key} placeholder: strings as is, numbers/booleans via tostring,
 * tables as compact JSON, nil as "". New string (kvm_free). */
char *wf_lua_value_text(lua_State *L, int idx);
/* The message handler used for every protected call: message + traceback. */
int wf_lua_msgh(lua_State *L);
/* Replaces the table at the top of the stack by a read-only proxy of it (pairs() still works). */
void wf_lua_push_proxy(lua_State *L);
/* Index of the agent handle at idx, or -1 if it is not one. */
int wf_lua_test_agent(lua_State *L, int idx);
void wf_account_charge_close(kvm_workflow_t *wf, wf_account_t *a);
uint64_t wf_rng_next(uint64_t s[2]);
/* Parses a template into parts; message names the agent and the bad placeholder. */
int wf_template_parse(const char *agent, const char *tmpl, wf_tpart_t **parts, int *n);
void wf_template_free(wf_tpart_t *parts, int n);
/* Finds a node by name (-1 if none). */
int wf_graph_find(const wf_graph_t *g, const char *name);

/* ---- wf_exec.c ---------------------------------------------------------------------------------- */

void wf_runs_free(kvm_workflow_t *wf);
/* The C function behind ctx:call (registered by wf_lua.c in the ctx metatable). */
int wf_ctx_call(lua_State *L);
int wf_ctx_map(lua_State *L);
/* The RNG of the run executing now (or the load-time one). */
uint64_t *wf_current_rng(kvm_workflow_t *wf);
/* print() target: a log record in the current run's trace. */
void wf_log(kvm_workflow_t *wf, const char *level, const char *msg);

#endif
