/* wf_internal.h - the structures shared by the files of the workflow layer. Not a public header.
 *
 *   wf_lua.c     the sandboxed Lua state, the kvmesh.* bindings, graph building and validation
 *   wf_exec.c    graph semantics: runs, super-steps, edges, routers, joins, outputs, budgets
 *   wf_task.c    Lua stack plumbing of a run: node coroutines, protected calls, reducers, ctx:call /
 *                ctx:map, prompts from placeholders, engine results delivered to the waiting node
 *   wf_trace.c   filling the trace records of runtime/trace from runs and steps; replaying a traced
 *                run from its trace and comparing the outputs (kvm_wf_replay) */
#ifndef KVM_AGENTS_WF_INTERNAL_H
#define KVM_AGENTS_WF_INTERNAL_H

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "../runtime/comm/template_parse.h"
#include "../runtime/trace/trace.h"
#include "wf.h"

#define WF_START (-1)
#define WF_END (-2)
#define WF_START_NAME "__start__"
#define WF_END_NAME "__end__"
#define WF_HOOK_COUNT 1000
#define WF_CALL_INSTRUCTIONS 100000 /* instructions each agent call from Lua (ctx:call, one ctx:map element) costs:
                                    the default budget allows 10,000 calls per run */
#define WF_TOKEN_INSTRUCTIONS 5000  /* and each token the engine generated for it (charged when it is delivered) */
#define WF_PROMPT_TOKEN_INSTRUCTIONS 50 /* and each token of its prompt */

/* ---- accounting --------------------------------------------------------------------------------- */

/* Bytes of Lua heap charged to one owner (a run, or the workflow for load-time data). Every Lua block
 * carries a pointer to its account, so frees are credited correctly whichever run is executing. An
 * account outlives its run while blocks still point at it. */
typedef struct wf_account {
    size_t bytes, peak, cap;
    bool closed;           /* owner gone: free the account when bytes reach 0 */
    kvm_account_t *mem;    /* a run's: its one memory account (runtime/core), capped at `cap`, to which its Lua heap is
                              charged here and every C allocation made for the run (JSON conversions, prompts, the
                              engine's work on its agent calls) by the counted allocator; NULL for the shared account */
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
    kvm_tpl_part_t *parts; /* the parsed template (one allocation, runtime/comm/template_parse.h) */
    int n_parts;
    int *part_node;        /* [n_parts] producer node of agent/tool placeholders (-1 until validation) */
    kvm_sampler_params_t sampling;
    int max_tokens;
    char **stop;
    int n_stop;
    long budget_tokens;    /* per run, prompt + output over all calls (0 = none) */
    bool ignore_eos;       /* generate exactly max_tokens (benchmarks) */
    kvm_kv_policy_t kv;
    double timeout_ms;     /* per call, enforced at every generated token (0 = none) */
    int retry_max;         /* retries of a failed call (retry = { max, backoff_ms, on }) */
    double retry_backoff_ms;
    unsigned retry_on;     /* WF_RETRY_* (llm.h) */
    char **tools;          /* host tools the model may call (tools = {...}; wf_tools.c) */
    int n_tools;
    int tool_rounds;       /* tool-call rounds at most per step (default 4) */
    /* kv_from = { agent, via = "c2c", fuser, section } (docs/c2c.md): placeholder c2c_section of the prompt is
     * prefilled by the sharer agent's model and fused into this agent's cache */
    int c2c;               /* 1 + the engine's fuser index (wf_llm_c2c_open); 0 = none (or a --mock run) */
    char *c2c_from;        /* the sharer agent's name */
    char *c2c_fuser;       /* the fuser config path as resolved */
    char *c2c_section;     /* the placeholder's KVCOMM name (wf_piece_t.name) */
    char *where;           /* "file:line" of the definition */
} wf_agent_t;

enum wf_node_kind { WF_NODE_AGENT = 0, WF_NODE_FUNC, WF_NODE_TOOL, WF_NODE_SUBGRAPH };
#define WF_SUB_MAX_DEPTH 8 /* subgraphs nested at most this deep (a graph is depth 0) */
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
    /* subgraph nodes (g:subgraph, wf_subgraph.c): the child graph and its state maps */
    int sub;               /* index in wf->graphs (-1 = not a subgraph node) */
    char **in_from, **in_to;   /* [n_in] parent state key -> child state key (set before the child starts) */
    int n_in;
    char **out_from, **out_to; /* [n_out] child state key -> parent state key (reduced by the parent's reducers) */
    int n_out;
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
    bool validated;        /* validate() has resolved it (a subgraph used by several nodes is validated once) */
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
    kvm_account_t *mem_prev;     /* the memory account entered before the outermost wf_enter() entered the run's */
    int mem_depth;               /* wf_enter() calls not yet left */
    struct wf_run *cur_run;      /* run whose Lua is executing (NULL at load) */
    cJSON *next_replay;          /* the replay spec the next run_new takes over (wf_replay.c), or NULL */
    wf_budget_t load_budget;
    uint64_t rng_load[2];
    wf_model_t *models;
    int n_models;
    wf_agent_t *agents;
    int n_agents;
    wf_graph_t **graphs;         /* every kvmesh.graph{} made by the script */
    int n_graphs;
    wf_graph_t *g;               /* the one the script returned */
    bool frozen;                 /* the script has loaded: models, agents and graphs can no longer change */
    int env_ref;                 /* the script's (frozen) globals */
    int ctx_mt_ref;              /* metatable of ctx objects */
    wf_llm_t *llm;
    struct wf_run **runs;
    int n_runs, cap_runs;
    kvm_wf_agent_stats_t *stats; /* [n_agents] */
    struct wf_api *api;          /* agents/api.c: the public handles (runs) made for this workflow */
    uint64_t job_serial;
};

/* kvmesh.blame(run_id, k) (agents/api.c): blame (no verify) of an ended run of wf's runtime, found by id among the
 * runs of every workflow loaded into it (never a path), from its trace, with the runtime's schema cache (no hit
 * counted). 0 (*out, *n_steps filled), or KVM_E* with the reason in why: KVM_ENOENT an unknown run or one without a
 * trace, KVM_EBUSY a run going (the caller's own included), or the trace's error. */
int wf_api_blame(kvm_workflow_t *wf, const char *run_id, int k, kvm_blame_t *out, int *n_steps, char *why, size_t cap);

/* ---- wf_lua.c ----------------------------------------------------------------------------------- */

/* Opens the sandboxed state (allocator, libraries, freezing, kvmesh table). 0 or KVM_E*. */
int wf_lua_open(kvm_workflow_t *wf);
/* Runs the script; it must return a graph. Validates it. 0 or KVM_ELUA_* / KVM_EINVAL with message. */
int wf_lua_load_script(kvm_workflow_t *wf, const char *chunkname, const char *src, size_t len);
/* Converts the Lua value at idx to JSON (plain data; handles and functions become descriptive
 * strings). Depth-limited and bounded: at most 2^20 values (a table reached twice counts twice, so a
 * table DAG costs what it expands to) and a quarter of the run memory cap in tree nodes and string bytes (the C
 * side of a conversion stays under the cap); the values visited are
 * charged to the instruction budget of the Lua executing now. Never raises. NULL with a message when over
 * those bounds (KVM_EBUDGET) or out of memory (KVM_ENOMEM); nothing half-built is left. */
cJSON *wf_lua_to_json(lua_State *L, int idx);
/* Pushes a JSON value as Lua data (objects -> tables, arrays -> sequences, null -> nil). May raise
 * a memory error: call inside a protected context or with room. */
void wf_lua_push_json(lua_State *L, const cJSON *j);
/* Text of a value for a {state.key} placeholder: strings as is, numbers/booleans via tostring,
 * tables as compact JSON, nil as "". New string (kvm_free); NULL with a message as wf_lua_to_json. */
char *wf_lua_value_text(lua_State *L, int idx);
/* The message handler used for every protected call: message + traceback. */
int wf_lua_msgh(lua_State *L);
/* Replaces the table at the top of the stack by a read-only proxy of it (pairs() still works). */
void wf_lua_push_proxy(lua_State *L);
/* Index of the agent handle at idx, or -1 if it is not one. */
int wf_lua_test_agent(lua_State *L, int idx);
void wf_account_charge_close(kvm_workflow_t *wf, wf_account_t *a);
uint64_t wf_rng_next(uint64_t s[2]);
/* Finds a node by name (-1 if none). */
int wf_graph_find(const wf_graph_t *g, const char *name);
/* Frees an array of n strings and the array (NULL is a no-op). */
void wf_free_strs(char **v, int n);

/* The instruction/CPU hook of every Lua thread (wf_lua.c). */
void wf_hook(lua_State *L, lua_Debug *ar);

/* ---- wf_sandbox.c: C work done on a script's behalf, bounded by the run's budgets ----------------- */

/* Charges `units` instructions of C work to the budget of the Lua executing now, and checks its CPU time:
 * when either is over, the hook of thread L kills the run at its next instruction. */
void wf_charge(lua_State *L, double units);
/* Kills the run executing now with KVM_EBUDGET (as the hook does: pcall cannot swallow it) and raises
 * "kvmesh: <message>" at the script's line. Does not return. */
int wf_budget_kill(lua_State *L, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Replaces the library functions whose C work depends on their arguments (patterns, string.rep, table
 * ranges, byte scans, setmetatable) by wrappers that bound and charge it. G: the global table's index. */
void wf_sandbox_wrap_libs(lua_State *L, int G);

/* ---- runs ---------------------------------------------------------------------------------------- */

enum wf_task_status { WF_T_RUNNING = 0, WF_T_WAIT, WF_T_DONE };

/* What one agent call sees: its user message as trace parts (fixed text and placeholders with their
 * contents). Slot names and fixed text point into the agent's template; contents are owned. */
typedef struct wf_seen {
    kvm_trace_part_t *parts; /* [n] */
    char **texts;            /* [n] owned placeholder contents (NULL for fixed text) */
    int n;
    size_t bytes;            /* what was built in C for it (charged to the instruction budget) */
} wf_seen_t;

/* One node of a super-step. */
typedef struct wf_task {
    int node;
    int status;            /* enum wf_task_status */
    int err;               /* 0 or KVM_E* */
    char *errmsg;
    lua_State *co;         /* func/tool nodes */
    int co_ref;
    uint64_t job;          /* engine job in flight (0 = none) */
    bool job_is_call;      /* a ctx:call from a func/tool node (resume the coroutine) */
    int call_agent;
    wf_seen_t *seen;       /* what the agent of the job in flight sees */
    uint64_t t_start;      /* wall ns */
    uint64_t t_job;        /* monotonic ns at submit */
    int out_ref;           /* output value (registry), LUA_NOREF = nil */
    char *out_text;        /* agent output text */
    /* ctx:map: several agent calls in flight at once */
    uint64_t *mjobs;       /* [n_m] engine jobs (0 once delivered) */
    wf_seen_t **mseen;     /* [n_m] what each call sees */
    int n_m, m_left;
    int m_agent;
    int m_ref;             /* results table (registry) */
    /* kvmesh.interrupt */
    bool parked;           /* waiting for kvm_run_resume (its coroutine suspended in kvmesh.interrupt) */
    int n_interrupts;      /* kvmesh.interrupt calls so far: the k-th takes the k-th recorded answer */
    cJSON *payload;        /* the pending interrupt's payload */
    char *ask_node;        /* a subgraph's node: its path as kvm_wf_run_parked names it ("write/ask"); NULL otherwise */
    /* ctx:tool answered later (wf_tools.c) */
    uint64_t tool_call;    /* the call waiting for kvm_wf_tool_result (0 = none) */
    char *tool_name;       /* its tool */
    bool tool_answered;    /* its answer came: the next round resumes the node with it */
    int tool_status;       /* 0, or KVM_E* with tool_msg */
    cJSON *tool_value;     /* the result (NULL = nil) */
    char *tool_msg;
    /* model-driven tool calls of the agent step in flight (wf_tools.c) */
    cJSON *turns;          /* [{role, content}] after the user message so far (NULL = none) */
    int tool_rounds;       /* rounds done */
    /* subgraph nodes */
    struct wf_run *child;  /* the child run going on (NULL = none) */
    int step;              /* the node's step idx, taken when it starts (its child's steps name it as their parent) */
} wf_task_t;

typedef struct wf_run {
    const wf_graph_t *g;   /* the graph it runs: wf->g, or a subgraph for a child run */
    struct wf_run *parent; /* child runs (a subgraph node's): the run of the parent graph; NULL for a run */
    struct wf_run *root;   /* the run at the top (itself for a run): its trace, step counter, id and seed are shared */
    int parent_node;       /* child runs: the subgraph node of the parent graph */
    int parent_step;       /* child runs: that node's step idx */
    int depth;             /* 0 for a run, 1 for its subgraphs' runs, ... */
    int kv_override;       /* the run's KV policy for every agent (kvm_run_params_t.kv), or -1 */
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
    /* interrupts: answers given in this super-step, per node ({node: [values]}; NULL = none); cleared when the
       super-step ends. A resumed run starts with those of the trace it resumes. */
    cJSON *answers;
    int n_parked;                   /* tasks parked in kvmesh.interrupt */
    int n_parked_tree;              /* the same in its subgraphs' runs too (time parked is not the run's) */
    uint64_t parked_ns;             /* monotonic time the run parked */
    /* a resumed run, and a subgraph's run restored from its checkpoint: what the subgraph nodes of its first super-step
       continue from ({"<node>@<superstep>": {"ckpt": {...}, "answers": {node: [values]}, "subs": {...}}}; NULL =
       none; wf_subgraph.c); cleared when that super-step ends */
    cJSON *sub_resume;
    /* the run this one resumes (trace run.start "resumed_from") */
    char *resumed_from;
    int resumed_superstep;
    /* a counterfactual replay of a traced run (wf_replay.c; NULL = none): what its steps are given or how they are
       generated again, and its agent calls so far per "superstep/node/agent" */
    cJSON *replay;
    cJSON *replay_calls;
} wf_run_t;

/* ---- wf_exec.c ---------------------------------------------------------------------------------- */

void wf_runs_free(kvm_workflow_t *wf);
/* The RNG of the run executing now (or the load-time one). */
uint64_t *wf_current_rng(kvm_workflow_t *wf);
/* The agent's KV policy in effect (the --kv override, else its own). */
kvm_kv_policy_t wf_agent_kv(const kvm_workflow_t *wf, const wf_agent_t *a);
/* In run r: the run's own policy (kvm_run_params_t.kv) when it has one, else wf_agent_kv. */
kvm_kv_policy_t wf_run_agent_kv(const kvm_workflow_t *wf, const struct wf_run *r, const wf_agent_t *a);
/* A task has finished (its output or error is set): records a func/tool step, closes the super-step
 * when it was the last open task. */
void wf_task_done(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t);
/* Counts a finished agent call (run and agent figures, on_step) and records its step. */
/* Starts a run that continues from checkpoint c of a traced run (from_id) with the traced inputs, seed and KV
 * policy; answers ({node: [values]}, may be NULL; taken over) are those of the interrupts of the super-step after
 * it; subs (may be NULL; taken over) what the subgraph nodes of that super-step continue from (wf_run_t.sub_resume).
 * 0 and *run, or KVM_E* when the checkpoint does not fit the workflow. */
int wf_run_resume_from(kvm_workflow_t *wf, const cJSON *inputs, uint64_t seed, int kv, const char *from_id,
                       const kvm_trace_checkpoint_t *c, cJSON *answers, cJSON *subs, int *run);
void wf_agent_step_done(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, int ai, const wf_llm_result_t *res, int status,
                        const char *err, bool via_call);

/* ---- wf_replay.c -------------------------------------------------------------------------------- */

/* For an agent call of run r (node, agent ai) about to be submitted: *given the text it is given instead of being
 * generated (NULL = generated), *seed and *kv changed when it is the step a replay generates again. */
void wf_replay_apply(kvm_workflow_t *wf, wf_run_t *r, int node, int ai, const char **given, uint64_t *seed, kvm_kv_policy_t *kv);
/* The run's replay spec as recorded in run.start (without the recorded outputs it gives); NULL when none
 * (cJSON_free). */
char *wf_replay_json(const wf_run_t *r);

/* ---- wf_task.c ---------------------------------------------------------------------------------- */

/* A formatted message (at most 1 KiB) as a new string (kvm_free); NULL when out of memory. */
char *wf_strf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Makes run r the executing one: its budget, account and RNG are charged until wf_leave(); the C allocations made
 * meanwhile are charged to its memory account (r->acct->mem). */
void wf_enter(kvm_workflow_t *wf, wf_run_t *r);
void wf_leave(kvm_workflow_t *wf, wf_run_t *r);
/* Charges allocations to run r without running its code (no cap, no budget) until wf_unbook(). */
void wf_book(kvm_workflow_t *wf, wf_run_t *r);
void wf_unbook(kvm_workflow_t *wf);
/* Protected call on the run's thread: the function and nargs arguments are on r->th's stack. On
 * success nres results are left; on error nothing is left and *msg gets message + traceback. */
int wf_run_pcall(kvm_workflow_t *wf, wf_run_t *r, int nargs, int nres, char **msg, const char *where);
/* Calls fn(state proxy, last) of the run and leaves its one result on r->th. 0 or KVM_E* with *msg. */
int wf_run_call_state_fn(kvm_workflow_t *wf, wf_run_t *r, int fn_ref, char **msg, const char *where);
/* Applies key's reducer with the value on top of r->th's stack (popped). 0 or KVM_E* with *msg. */
int wf_reduce(kvm_workflow_t *wf, wf_run_t *r, const wf_key_t *k, const char *node, char **msg);
/* Applies a func node's returned table of updates, key by key in sorted order. 0 or KVM_E* with *msg. */
int wf_apply_updates(kvm_workflow_t *wf, wf_run_t *r, const wf_task_t *t, char **msg);
/* Reduces an agent node's output into state key "msgs" as {node, agent, text}. */
int wf_reduce_message(kvm_workflow_t *wf, wf_run_t *r, const wf_task_t *t, char **msg);
/* Reduces a task's output into the state key its node writes (none: 0). */
int wf_reduce_writes(kvm_workflow_t *wf, wf_run_t *r, const wf_task_t *t, char **msg);
/* Pushes a task's output on r->th: agent text, the func/tool value, or {error=, code=}. */
void wf_push_task_output(wf_run_t *r, const wf_task_t *t, const wf_graph_t *g);
/* Starts a task: submits an agent node's call, or starts a func/tool node's coroutine. */
void wf_task_start(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t);
/* Hands an engine result to the task waiting for it (agent node, ctx:call or one call of ctx:map). */
void wf_deliver(kvm_workflow_t *wf, wf_llm_result_t *res);
/* Releases the super-step's tasks (coroutines, references, texts). A coroutine left suspended or failed
 * is closed under the run's budgets: its pending __close handlers are script code. */
void wf_tasks_free(kvm_workflow_t *wf, wf_run_t *r);
/* Sets up the run's Lua side (thread, inputs, state) under its own account. 0 or a Lua status. */
int wf_run_setup(kvm_workflow_t *wf, wf_run_t *r);
/* Calls a workflow-level function (dataset, score) with nargs arguments on wf->L on a scratch budget;
 * its result as JSON. */
int wf_call_scratch(kvm_workflow_t *wf, int nargs, cJSON **out, const char *what);
void wf_seen_free(wf_seen_t *s);
/* The C functions behind ctx:call and ctx:map (registered by wf_lua.c in the ctx metatable). */
int wf_ctx_call(lua_State *L);
/* The task of the run executing now whose coroutine is L (a func/tool node's own code), or NULL (wf_task.c). */
wf_task_t *wf_running_task(const kvm_workflow_t *wf, lua_State *L);
/* ctx:tool(name, args): a host tool (wf_tools.c). */
int wf_ctx_tool(lua_State *L);
/* Nodes of r waiting for a tool's answer that has not come, directly or in the runs of their subgraphs (wf_tools.c). */
int wf_run_tool_waits(const wf_run_t *r);
/* Whether r has nothing to do until a tool answers (it does not count as going, and a round without progress is no
 * stall for it); first ends it (or the subgraph run concerned) when a wait passed a wall-time budget (wf_tools.c). */
bool wf_run_tool_idle(kvm_workflow_t *wf, wf_run_t *r);
/* The same, without the deadline check. */
bool wf_run_tool_only(const wf_run_t *r);
/* The system message of agent a with the tools it may call (Qwen / Hermes convention), new string; NULL + message
 * (a tool not registered) (wf_tools.c). */
char *wf_tools_system(kvm_workflow_t *wf, const wf_agent_t *a);
/* After agent a's generation res for task t: the <tool_call> blocks it wrote run (each answered in a tool-response
 * turn, errors included) and the generation goes on with those turns: 1 (a new job in flight), 0 (no tool call:
 * res is the step's output), or <0 with msg (tool_rounds exhausted, a resubmission failed) (wf_tools.c). */
int wf_tools_model_round(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, int ai, const wf_llm_result_t *res, char *msg, size_t cap);
/* Submits agent ai's prompt of task t again with the turns of a tool-call continuation as job tag (wf_task.c). */
int wf_agent_resubmit(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, int ai, uint64_t tag, const wf_turn_t *turns, int n_turns);
/* Resumes the tasks of r whose tool answer came (kvm_wf_tool_result); whether there was one. */
bool wf_run_tool_deliver(kvm_workflow_t *wf, wf_run_t *r);
/* Resumes a func/tool task's coroutine with nargs values pushed on it (wf_task.c). */
void wf_task_resume(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, int nargs);
/* The public handle of run idx (agents/api.c); NULL for a workflow made without the API (a replay). */
kvm_run_t *wf_api_run(kvm_workflow_t *wf, int idx);
/* kvmesh.interrupt(payload): returns the recorded answer of this call, or parks the node's coroutine. */
int wf_interrupt(lua_State *L);
/* Resumes parked task t with value (its kvmesh.interrupt's result); the caller has counted it out of r->n_parked. */
void wf_task_answer(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t, const cJSON *value);
int wf_ctx_map(lua_State *L);

/* ---- wf_subgraph.c ------------------------------------------------------------------------------ */

/* g:subgraph(name, child_graph, {input = {parent_key = child_key}, output = {child_key = parent_key}}) (registered by
 * wf_lua.c); g:node(name, {subgraph = child, input = ..., output = ...}) comes here too. */
int wf_lua_g_subgraph(lua_State *L);
/* True when the g:node spec at idx is a subgraph node's ({subgraph = ...}). */
bool wf_lua_is_subgraph_spec(lua_State *L, int idx);
/* The load-time error of an agent that is a node of two graphs where its placeholder `src` names different nodes. */
int wf_subgraph_shared_agent(const wf_agent_t *a, const char *src, const wf_graph_t *g);
/* wf_lua.c's binding helpers, for g:subgraph: the graph handle at i (raises when frozen or not one), the index of the
 * graph handle at i (-1 if none), a name argument, a spec's fields against a list, a new node of g. All may raise. */
wf_graph_t *wf_lua_check_graph(lua_State *L, int i, const char *call);
int wf_lua_graph_index(lua_State *L, int i);
const char *wf_lua_check_name(lua_State *L, int idx, const char *what);
void wf_lua_check_fields(lua_State *L, int t, const char *what, const char *const *allowed);
wf_node_t *wf_lua_add_node(lua_State *L, wf_graph_t *g, const char *name, int kind);
/* The name on_step reports for a node of run r: the node, or for a subgraph's run the path of subgraph nodes down to it
 * ("research/search"), written into buf. */
const char *wf_step_node_path(const wf_run_t *r, const char *node, char *buf, size_t cap);
/* Starts a subgraph node's task: its child run, with the mapped keys of the parent's state. */
void wf_subgraph_start(kvm_workflow_t *wf, wf_run_t *r, wf_task_t *t);
/* A child run has finished (wf_exec.c's finish_run): its mapped outputs (or its error) become its node's result. */
void wf_subgraph_done(kvm_workflow_t *wf, wf_run_t *child);
/* Advances the child runs of r's super-step (kvm_wf_advance); true when one made progress. */
bool wf_subgraph_advance(kvm_workflow_t *wf, wf_run_t *r);
/* The token and wall-time budgets of the graphs above child run r: 0, or KVM_EBUDGET with *msg (wf_strf). */
int wf_subgraph_budgets(const wf_run_t *r, char **msg);
/* The earliest wall-time deadline (monotonic ns) of r's graph and the graphs above it; 0 = none. */
uint64_t wf_run_deadline_ns(const wf_run_t *r);
/* The task of r whose engine job is `job` (in r's super-step or a child run's); *run, *map_index as find_task_by_job. */
wf_task_t *wf_subgraph_find_job(wf_run_t *r, uint64_t job, wf_run_t **run, int *map_index);
/* Releases a child run that has not finished (its parent ends first): its Lua side, tasks and memory. */
void wf_subgraph_abort(kvm_workflow_t *wf, wf_task_t *t);
/* The path of run r's graph from the run's ("" for the run itself; "write@3" for a subgraph node 'write' that started
 * in super-step 3, "write@3/check@2" below it), written into buf. */
const char *wf_run_path(const wf_run_t *r, char *buf, size_t cap);
/* Tasks of r parked in kvmesh.interrupt, or subgraph nodes whose run waits for an answer (wf_exec.c). */
int wf_run_parked_tasks(const wf_run_t *r);
/* A kvmesh.interrupt in run r parked (+1) or was answered (-1): the time parked is not r's nor its parents'. */
void wf_run_park(wf_run_t *r, int delta);
/* A checkpoint record as JSON (the sub_resume "ckpt" form), and back (strings point into j; *next: kvm_free). */
cJSON *wf_ckpt_to_json(const kvm_trace_checkpoint_t *c);
int wf_ckpt_from_json(const cJSON *j, kvm_trace_checkpoint_t *c, const char ***next);
/* Restores checkpoint c into the fresh run r (of r->g, its Lua side set up): 0, or KVM_E* with *msg (wf_exec.c). */
int wf_run_restore(kvm_workflow_t *wf, wf_run_t *r, const kvm_trace_checkpoint_t *c, char **msg);
/* ---- wf_exec.c: what wf_subgraph.c needs of runs ---------------------------------------------------------- */

/* Allocates run r's per-node, per-join and per-agent arrays for its graph r->g; false when out of memory (run_free
 * frees what was made). */
bool wf_run_arrays(const kvm_workflow_t *wf, wf_run_t *r);
/* Makes the nodes after START ready in a new run of r->g. */
void wf_run_at_start(kvm_workflow_t *wf, wf_run_t *r);
/* Ends run r (a child run too) with code and msg (taken over). */
void wf_run_finish(kvm_workflow_t *wf, wf_run_t *r, int code, char *msg);
/* Frees a run's memory (after it finished). */
void wf_run_free(kvm_workflow_t *wf, wf_run_t *r);
/* One pass of kvm_wf_advance over run r; true when it made progress. */
bool wf_run_advance(kvm_workflow_t *wf, wf_run_t *r);

/* ---- wf_trace.c --------------------------------------------------------------------------------- */

/* Each writes one record to the run's trace (a no-op when the run has none); a failed write stops
 * tracing for that run with a warning. */
void wf_trace_run_start(kvm_workflow_t *wf, wf_run_t *r);
void wf_trace_superstep(kvm_workflow_t *wf, wf_run_t *r);
void wf_trace_edge(wf_run_t *r, const char *from, const char *to, const char *kind);
void wf_trace_agent_step(kvm_workflow_t *wf, wf_run_t *r, const wf_task_t *t, int idx, int ai, const wf_llm_result_t *res,
                         int status, const char *err, bool via_call);
void wf_trace_lua_step(kvm_workflow_t *wf, wf_run_t *r, const wf_task_t *t, int idx);
void wf_trace_checkpoint(kvm_workflow_t *wf, wf_run_t *r, bool restored); /* restored: the one a resumed run starts from */
void wf_trace_interrupt(wf_run_t *r, const char *node, const cJSON *payload, const cJSON *answers);
void wf_trace_resume_rec(wf_run_t *r, const char *node, const cJSON *value);
/* A resume record for every answer a resumed run starts with (r->answers). */
void wf_trace_answers(kvm_workflow_t *wf, wf_run_t *r);
/* run.end and index.json; closes the trace. */
void wf_trace_run_end(kvm_workflow_t *wf, wf_run_t *r, double wall_ms);
/* print() target: a log record in the current run's trace (and stderr when asked or untraced). */
void wf_log(kvm_workflow_t *wf, const char *level, const char *msg);

#endif
