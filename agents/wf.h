/* wf.h - workflows: Lua 5.4 scripts that define agents and graphs, and the executor that runs them
 * (L4). The Lua API is documented in docs/lua-api.md; the trace each run writes in
 * docs/trace-format.md.
 *
 * Life cycle: kvm_wf_load() runs the script once in a sandboxed Lua state (it must return a graph),
 * validates the graph and opens the models; kvm_wf_start() starts runs (each a set of coroutines
 * with its own budgets, state and trace); kvm_wf_drive() interleaves all started runs on this thread,
 * batching their agents' model work step by step, until every run has finished. A bad run (script
 * error, budget, memory cap, model error) ends alone with its message; the others go on. */
#ifndef KVM_AGENTS_WF_H
#define KVM_AGENTS_WF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "llm.h"

typedef struct kvm_workflow kvm_workflow_t;

/* Progress of one finished step (agent call, func or tool node), for live displays. */
typedef struct kvm_wf_step_info {
    int run;               /* run index */
    const char *run_id;
    int superstep;
    const char *node;
    const char *agent;     /* NULL for func/tool nodes */
    const char *op;        /* "chat" | "func" | "tool" */
    int status;            /* 0 or KVM_E* */
    const char *error;     /* NULL if ok */
    int tokens_in, tokens_out, reused;
    double ttft_ms, decode_ms;
    const char *text;      /* agent output (may be long) */
    const wf_llm_kv_t *kv; /* agent steps: how the prompt's KV was obtained (NULL for func/tool nodes) */
    double queue_ms;
} kvm_wf_step_info_t;

/* A host function bound as kvmesh.<name> (kvm_runtime_add_function, include/kvmesh.h). */
typedef struct wf_host_fn {
    char *name;
    kvm_host_fn fn;
    void *ud;
} wf_host_fn_t;

/* A host tool (kvm_runtime_add_tool, include/kvmesh.h): a function of the program with a description and a JSON
 * Schema for its arguments (runtime/core/jsonschema.h), called from a node as ctx:tool(name, args) (wf_tools.c). */
typedef struct wf_tool {
    char *name;
    char *description;     /* "" when none */
    cJSON *schema;         /* checked at registration */
    kvm_tool_fn fn;
    void *ud;
} wf_tool_t;

/* The tools of a runtime: read at every ctx:tool call, so that a tool registered (or removed) after a workflow
 * loaded counts for it. */
typedef struct wf_tools {
    wf_tool_t **v;         /* [n], each its own allocation */
    int n;
    uint64_t next_call;    /* numbers the calls (kvm_tool_call_t.call_id) */
} wf_tools_t;

/* Adds a tool: checks the name (letters, digits, '_', '-', '.'; 1 to 64 bytes, not starting with a digit; not in ts
 * yet) and the schema (JSON text; NULL = {"type": "object"}). 0, or KVM_EINVAL / KVM_EFORMAT / KVM_ENOMEM with a
 * message naming the tool. */
int wf_tools_add(wf_tools_t *ts, const char *name, const char *description, const char *schema_json, kvm_tool_fn fn,
                 void *ud);
/* Removes the tool named name: 0, or KVM_ENOENT. Calls of it still waiting for their answer stay waiting. */
int wf_tools_remove(wf_tools_t *ts, const char *name);
void wf_tools_clear(wf_tools_t *ts);

typedef struct kvm_wf_opts {
    const char *kv_override;       /* NULL, or "dense" | "prefix" | "kvcomm": overrides every agent's kv */
    bool mock;                     /* every kvmesh.model() resolves to "mock:echo" (dry runs, tests) */
    const char *model_override;    /* NULL, or a model path every kvmesh.model() resolves to */
    const char *trace_root;        /* NULL = no traces; else each run writes <trace_root>/<run_id>/ */
    size_t mem_cap_bytes;          /* whole Lua state (default 512 MiB) */
    size_t run_mem_cap_bytes;      /* Lua memory of one run (default 64 MiB; graph limit memory_mb overrides) */
    uint64_t max_instructions;     /* Lua instructions per run (default 1e9; graph limit overrides) */
    double lua_cpu_ms;             /* Lua CPU time per run, excluding waits for agents (default 5000) */
    wf_llm_opts_t llm;             /* engine options (backend, batch rows, KV bytes) */
    wf_llm_t *engine;              /* borrowed engine shared with other workflows (a runtime's): models, KV
                                      stores and anchor pools live across workflows; NULL = an own engine
                                      made from llm */
    wf_host_fn_t *const *host_fns; /* kvmesh.<name> functions of the host program (read at load; each entry is
                                      borrowed and must outlive the workflow) */
    int n_host_fns;
    const wf_tools_t *tools;       /* ctx:tool(name, args) tools of the host program (borrowed; NULL = none) */
    void (*on_step)(void *ud, const kvm_wf_step_info_t *s);
    void *ud;
    bool echo_print;               /* print() in scripts also goes to stderr */
} kvm_wf_opts_t;

/* Per-agent figures summed over every run of the workflow. */
typedef struct kvm_wf_agent_stats {
    const char *name;
    const char *model;
    const char *kv;                /* effective policy */
    int calls, errors, reuse_calls;
    long prompt_tokens, output_tokens;
    long exact, offset, naive, recomputed, fused;
    double ttft_ms_sum, decode_ms_sum;
    long decode_tokens;            /* output tokens after the first (for tokens/s) */
} kvm_wf_agent_stats_t;

/* Loads and validates a workflow script. NULL + message ("file:line: ...") on any error. Free with
 * kvm_wf_free(). */
kvm_workflow_t *kvm_wf_load(const char *path, const kvm_wf_opts_t *o);
/* The same from a string; name is the chunk name used in messages (e.g. "team.lua"). */
kvm_workflow_t *kvm_wf_load_string(const char *name, const char *src, size_t len, const kvm_wf_opts_t *o);
void kvm_wf_free(kvm_workflow_t *wf);
const char *kvm_wf_name(const kvm_workflow_t *wf);

/* Starts a run with inputs (a JSON object; values strings, numbers, booleans or nested data; may be
 * NULL) and a seed. Nothing runs until kvm_wf_drive(). *run receives the run index. */
int kvm_wf_start(kvm_workflow_t *wf, const cJSON *inputs, uint64_t seed, int *run);
/* Whether the graph has a dataset (g:dataset) and a scorer (g:score). */
bool kvm_wf_has_dataset(const kvm_workflow_t *wf);
bool kvm_wf_has_score(const kvm_workflow_t *wf);
/* Calls g:dataset(seed) and starts a run with its inputs (merged over `extra`, which may be NULL). */
int kvm_wf_start_seeded(kvm_workflow_t *wf, uint64_t seed, const cJSON *extra, int *run);
/* The same with a KV policy for every agent of the run (a kvm_kv_policy_t; -1 = the agents' own, or the
 * workflow's override); it is recorded as the run's kv_override in its trace, so a replay uses it too. */
int kvm_wf_start_kv(kvm_workflow_t *wf, const cJSON *inputs, uint64_t seed, int kv, int *run);
int kvm_wf_start_seeded_kv(kvm_workflow_t *wf, uint64_t seed, const cJSON *extra, int kv, int *run);
/* Runs every started run to its end. Returns 0 (per-run failures are in the runs), or <0 when the
 * engine itself failed. A loop of kvm_wf_advance and one engine step, for a workflow whose engine no other
 * workflow drives (a runtime of several workflows steps its shared engine itself: kvm_runtime_step). */
int kvm_wf_drive(kvm_workflow_t *wf);
/* The run side of one round: every unfinished run whose super-step is complete ends it and starts the next
 * (or finishes). Sets *progress when anything changed; returns the number of runs unfinished before. */
int kvm_wf_advance(kvm_workflow_t *wf, bool *progress);
/* Runs started and not finished. */
int kvm_wf_n_active(const kvm_workflow_t *wf);
/* Ends every unfinished run with code and msg (an engine failure). */
void kvm_wf_fail_runs(kvm_workflow_t *wf, int code, const char *msg);
/* Ends every unfinished run as stalled (KVM_EINTERNAL): for a round with no progress and no engine work. */
void kvm_wf_fail_stalled(kvm_workflow_t *wf);
/* Ends run `run` now with code (0 = KVM_ECANCELED) and msg: its engine steps in flight are canceled
 * (wf_llm_cancel_run; their results are ignored when delivered), its staged anchors dropped, its trace
 * ended. 0; KVM_EINVAL for no such run; KVM_ESTALE when it had finished. */
int kvm_wf_run_cancel(kvm_workflow_t *wf, int run, int code, const char *msg);

/* ---- checkpoints, resume and interrupts (wf_exec.c, wf_trace.c) ------------------------------------------ */

/* Starts a run that continues the run traced in run_dir from its checkpoint after super-step `step` (0 = the
 * last): the trace's inputs, seed and KV policy, the checkpoint's state, outputs, pending nodes, joins, texts,
 * counters and RNG. answer (may be NULL) answers the interrupt the traced run was parked on after that
 * checkpoint. The script is the workflow's (its node names must cover the checkpoint's). 0 and *run, or KVM_E*
 * with a message (no such checkpoint, a checkpoint written before resume existed, a name the graph lacks). */
int kvm_wf_start_resume(kvm_workflow_t *wf, const char *run_dir, int step, const cJSON *answer, int *run);
/* Starts a counterfactual replay of the run traced in run_dir from its trace step `step` (0-based, in the order the
 * trace holds them): the steps before it are given their recorded outputs, step `step` is given `output` (non-NULL)
 * or generated again (seed: its sampling seed, 0 = as recorded; kv: its KV policy, -1 = as recorded). wf_replay.c. */
int kvm_wf_start_replay(kvm_workflow_t *wf, const char *run_dir, int step, const char *output, uint64_t seed, int kv, int *run);
/* Whether run is parked in kvmesh.interrupt; *node and *payload (may be NULL) get the first parked node's
 * name and payload (owned by the run). */
bool kvm_wf_run_parked(const kvm_workflow_t *wf, int run, const char **node, const cJSON **payload);
/* Answers the first parked node of run with value (copied): kvmesh.interrupt returns it. 0; KVM_EINVAL when not
 * parked. */
int kvm_wf_run_resume(kvm_workflow_t *wf, int run, const cJSON *value);

/* Answers the tool call call_id of run (one whose tool returned KVM_EBUSY: it answers later): status 0 and value
 * (ctx:tool returns it; NULL = nil), or a KVM_E* status and msg (ctx:tool raises "ctx:tool: tool 'x': msg"). The node
 * goes on at once. 0; KVM_EINVAL for no such run, KVM_ESTALE when the run has ended, KVM_ENOENT when no call of
 * that id waits in it. */
int kvm_wf_tool_result(kvm_workflow_t *wf, int run, uint64_t call_id, int status, const cJSON *value, const char *msg);

int kvm_wf_n_runs(const kvm_workflow_t *wf);
/* The run's status: 0 ok, or KVM_E*; *msg (may be NULL) gets the message with file:line + traceback. */
int kvm_wf_run_status(const kvm_workflow_t *wf, int run, const char **msg);
const char *kvm_wf_run_id(const kvm_workflow_t *wf, int run);
/* The run's trace directory, or NULL when tracing is off. */
const char *kvm_wf_run_trace_dir(const kvm_workflow_t *wf, int run);
/* Final outputs / state / inputs as JSON (owned by the workflow; valid until kvm_wf_free). */
const cJSON *kvm_wf_run_outputs(const kvm_workflow_t *wf, int run);
const cJSON *kvm_wf_run_state(const kvm_workflow_t *wf, int run);
const cJSON *kvm_wf_run_inputs(const kvm_workflow_t *wf, int run);
/* Calls g:score(result, inputs) for a finished run: 1 and *score set (true = 1, false = 0, or the
 * number returned), 0 if there is no scorer, <0 on a script error. */
int kvm_wf_run_score(kvm_workflow_t *wf, int run, double *score);
/* Lua heap statistics. */
size_t kvm_wf_lua_bytes(const kvm_workflow_t *wf);

int kvm_wf_n_agents(const kvm_workflow_t *wf);
const kvm_wf_agent_stats_t *kvm_wf_agent_stats(const kvm_workflow_t *wf, int i);
/* The engine, for counters (forward passes, batch sizes). */
wf_llm_t *kvm_wf_llm(kvm_workflow_t *wf);

/* ---- replay (wf_trace.c) ---------------------------------------------------------------------------- */

typedef struct kvm_wf_replay_opts {
    const char *model_override;    /* NULL, or a model path every kvmesh.model() resolves to */
    bool mock;                     /* the mock echo model for every kvmesh.model() (also when the trace says so) */
    kvm_model_params_t model;      /* how models are loaded (backend, dtypes); zero = defaults */
    wf_host_fn_t *const *host_fns; /* kvmesh.<name> functions the script may call (borrowed, as in kvm_wf_opts_t) */
    int n_host_fns;
    const wf_tools_t *tools;       /* ctx:tool tools the script may call (borrowed; NULL = none) */
    /* the operator's limits for the replayed run (0 = kvmesh's defaults: 1e9 instructions, 5000 ms, 64 MiB); the
       limits recorded in the trace can only lower them, as a script's g:limit can */
    uint64_t max_instructions;
    double lua_cpu_ms;
    size_t run_mem_cap_bytes;
} kvm_wf_replay_opts_t;

/* kvm_trace_replay (include/kvmesh.h) with the settings spelled out: re-runs a traced run from its trace alone
 * (the script source, inputs, seed, KV override, mock switch and limits recorded in run.start, the limits
 * capped by the operator's: a crafted trace cannot raise them; the script runs in the same sandbox; no trace is
 * written; an engine of its own) and compares every agent output with the traced one into *out (the public
 * kvm_replay_t, cleared with kvm_replay_clear). 0 also when the replayed run failed (out->status), or KVM_E*
 * with a message (unreadable trace, no run.start, script or engine failure) and *out empty. o may be NULL. */
int kvm_wf_replay(const char *run_dir, const kvm_wf_replay_opts_t *o, kvm_replay_t *out);

#endif
