/* trace.h - run traces: the trace schema, its writer and its reader (L3).
 *
 * runtime/trace owns the schema of docs/trace-format.md: one typed record struct per record type, one
 * writer function per type (the only place the field names are spelled), and a reader that gives the
 * records back as the same structs. Nothing outside runtime/trace builds or parses trace field names.
 *
 * One directory per run holds events.jsonl: one JSON object per line, written and flushed record by
 * record, so a crash loses nothing already written. The reader skips a torn (unterminated or
 * unparsable) LAST line and says so; a bad line anywhere else, or a field of the wrong type, is
 * KVM_EFORMAT naming file:line; a trace of a newer major version than KVM_TRACE_VERSION is
 * KVM_EVERSION. index.json (a summary written at run end) lets `kvmesh trace ls` list runs without
 * reading every log.
 *
 * Values that are free-form JSON (run inputs, outputs, state, a func node's result, runtime/comm's
 * reuse decisions) cross this interface as JSON text: the writer embeds the text as it is (it must be
 * valid JSON, as cJSON prints it), the reader prints the value back as compact text.
 *
 * Strings in records are borrowed: for writing, the caller's, valid during the call; for reading,
 * owned by the kvm_trace_log_t, valid until kvm_trace_log_free(). NULL strings are written as null
 * (or left out, where the format says so) and read back as NULL.
 *
 * Thread-safety: a kvm_trace_t is used by one thread at a time; logs are read-only after reading. */
#ifndef KVM_TRACE_H
#define KVM_TRACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define KVM_TRACE_VERSION 1  /* major version of the format (run.start "v"): fields are only ever added */
#define KVM_TRACE_ID_HEX 33  /* 32 hex chars + NUL */

/* ---- records ---------------------------------------------------------------------------------------- */

typedef enum kvm_trace_type {
    KVM_TRACE_OTHER = 0,  /* a record type this build does not know (kept, with its type name) */
    KVM_TRACE_RUN_START,
    KVM_TRACE_EDGE,
    KVM_TRACE_SUPERSTEP,
    KVM_TRACE_STEP,
    KVM_TRACE_LOG,
    KVM_TRACE_CHECKPOINT,
    KVM_TRACE_RUN_END,
    KVM_TRACE_INTERRUPT,  /* kvmesh.interrupt parked the run */
    KVM_TRACE_RESUME,     /* a parked run got its answer */
    KVM_TRACE_INDEX,      /* index.json (kvm_trace_read_index) */
} kvm_trace_type_t;

/* The record type's name in the file ("run.start", ...; "index" for KVM_TRACE_INDEX). */
const char *kvm_trace_type_name(kvm_trace_type_t t);

/* An error: code (KVM_E*), message (first line), traceback (the rest; NULL if none). Writing with
 * traceback NULL splits message at its first newline. code 0 = no error. */
typedef struct kvm_trace_error {
    int code;
    const char *message;
    const char *traceback;
} kvm_trace_error_t;

/* A template part (run.start agents[].parts) or what an agent saw (step pieces): fixed text (slot
 * NULL), or a placeholder with its KVCOMM name (slot), the text written inside the braces (src) and,
 * in a step, its content (text; "missing" when its producer had not run yet). */
typedef struct kvm_trace_part {
    const char *slot;
    const char *src;
    const char *text;
    bool missing;
} kvm_trace_part_t;

typedef struct kvm_trace_sampling {
    double temperature;
    int top_k;
    double top_p;
    double repetition_penalty; /* run.start agents only */
    int max_tokens;            /* steps only (agents carry their own max_tokens) */
} kvm_trace_sampling_t;

typedef struct kvm_trace_limits {
    long steps, tokens, wall_ms;
    double instructions, lua_ms, memory_bytes;
} kvm_trace_limits_t;

/* A model of the workflow (run.start models[]). */
typedef struct kvm_trace_model {
    int index;
    const char *script_path;   /* as the script wrote it */
    const char *path;          /* as opened */
    const char *engine;        /* "model" | "mock" */
    const char *name, *arch, *chat_format, *model_id, *describe, *kvcomm; /* NULL when not known */
    int n_layers, dim, vocab_size, max_seq_len;
} kvm_trace_model_t;

typedef struct kvm_trace_agent {
    const char *name;
    int model;                 /* index into models */
    const char *role;          /* NULL = none */
    const char *template_text;
    const kvm_trace_part_t *parts;
    int n_parts;
    kvm_trace_sampling_t sampling;
    int max_tokens;
    const char *const *stop;
    int n_stop;
    long budget_tokens;
    const char *kv;            /* effective policy */
    const char *where;
} kvm_trace_agent_t;

typedef struct kvm_trace_node {
    const char *name;
    const char *kind;          /* "agent" | "func" | "tool" */
    const char *agent;         /* agent nodes; else NULL */
    const char *writes;        /* NULL = none */
    bool router;
} kvm_trace_node_t;

typedef struct kvm_trace_edge_def {
    const char *from, *to;
    bool conditional, on_error;
} kvm_trace_edge_def_t;

typedef struct kvm_trace_join {
    const char *const *sources;
    int n_sources;
    const char *target;
    bool all;                  /* mode "all" (else "any") */
} kvm_trace_join_t;

/* run.start: everything a replay needs (the script source, inputs, seed, switches, limits). */
typedef struct kvm_trace_run_start {
    int version;               /* written as KVM_TRACE_VERSION; read: the file's */
    const char *run_id;
    int run;
    const char *workflow_path, *graph;
    uint64_t source_hash;      /* "source_fnv64" */
    const char *source;
    const char *inputs_json;   /* JSON object text */
    uint64_t seed;
    const char *kv_override;   /* NULL = none */
    bool mock;
    kvm_trace_limits_t limits;
    const kvm_trace_model_t *models;
    int n_models;
    const kvm_trace_agent_t *agents;
    int n_agents;
    const kvm_trace_node_t *nodes;
    int n_nodes;
    const kvm_trace_edge_def_t *edges;
    int n_edges;
    const kvm_trace_join_t *joins;
    int n_joins;
    const char *build_version, *build_lua, *build_cjson;
    /* a run resumed from another run's checkpoint ("resumed_from"; NULL / 0 = a fresh run) */
    const char *resumed_run_id;
    int resumed_superstep;
    /* a counterfactual replay of another run ("replay": JSON object text, NULL = none): {of, of_dir, from_step,
       change: "output" | "regenerate", step: {superstep, node, agent, call[, seed, kv]}, edits: [{superstep, node,
       agent, call, text}]} (docs/trace-format.md) */
    const char *replay_json;
} kvm_trace_run_start_t;

/* edge: an edge taken at the end of a super-step. kind: edge | when | route | on_error | join_all |
 * join_any; from "START" for the first, to "END" for kvmesh.END. */
typedef struct kvm_trace_edge {
    int superstep;
    const char *from, *to, *kind;
} kvm_trace_edge_t;

/* superstep: the nodes that start together. */
typedef struct kvm_trace_superstep {
    int superstep;
    const char *const *nodes;
    int n_nodes;
} kvm_trace_superstep_t;

typedef struct kvm_trace_kv {
    int exact, offset, naive, recomputed, fused; /* partition of the prompt tokens (kvcomm.md §6) */
    const char *mode;          /* "reuse" | "prefix" | "dense" */
    int anchors;
    const char *decisions_json; /* runtime/comm's decisions (JSON object text); NULL if none */
} kvm_trace_kv_t;

typedef struct kvm_trace_timings {
    double queue_ms, ttft_ms, decode_ms, total_ms, tokens_per_s;
} kvm_trace_timings_t;

typedef struct kvm_trace_batch {
    int forwards, max_seqs, max_rows;
    double mean_seqs;
} kvm_trace_batch_t;

/* step: one agent call (agent != NULL, op "chat") or one func/tool node (agent NULL). */
typedef struct kvm_trace_step {
    int idx, superstep;
    const char *node;
    const char *agent;         /* NULL for func/tool nodes */
    const char *op;            /* "chat" | "func" | "tool" */
    const char *via;           /* "ctx:call" when a func/tool node made the call; else NULL */
    uint64_t t_start, t_end;   /* wall ns */
    kvm_trace_error_t error;   /* code 0 = status ok */
    /* agent calls */
    const char *model;
    const char *system;        /* NULL = no role */
    const kvm_trace_part_t *pieces;
    int n_pieces;
    const char *prompt_text;
    int prompt_tokens;
    const int32_t *prompt_ids; /* [n_prompt_ids]; NULL if not recorded */
    int n_prompt_ids;
    kvm_trace_kv_t kv;
    kvm_trace_sampling_t sampling;
    const char *output_text;
    int output_tokens;
    const char *stop;          /* eos | string | length | context */
    kvm_trace_timings_t timings;
    kvm_trace_batch_t batch;
    /* func/tool nodes: the returned value (JSON text; NULL = null; left out on error) */
    const char *output_json;
    /* steps of a subgraph's run (depth > 0; written only then): the subgraph's graph name, how deep it is nested (1 = a
       subgraph node of the run's graph), and the idx of the step of its subgraph node (written after its nested steps) */
    const char *graph;
    int depth, parent;
} kvm_trace_step_t;

typedef struct kvm_trace_log_rec {
    const char *level, *msg;
    int superstep;
} kvm_trace_log_rec_t;

/* checkpoint: everything a resume needs after a super-step (docs/trace-format.md). The JSON fields are
 * text; absent in traces older than resume (then NULL / 0, and the checkpoint cannot be resumed). */
typedef struct kvm_trace_checkpoint {
    int superstep;
    const char *state_json;
    const char *const *next;
    int n_next;
    const char *last_json;         /* `last` of the next super-step: outputs by node name */
    const char *nodes_json;        /* {node: {"cur": text, "prev": text}}: what {agent:x} / {agent:x:prev} read */
    const char *joins_json;        /* [[source names arrived], ...] per join, in graph order */
    const char *outputs_json;      /* outputs collected so far (nodes that reached END); NULL = none */
    const char *agent_tokens_json; /* {agent: tokens used} (per-agent budgets) */
    uint64_t rng0, rng1;           /* the run's PRNG state (math.random) */
    long input_tokens, output_tokens;
    int agent_calls, steps;        /* steps: step records written so far (the next step's idx; seeds sampling) */
    bool resumable;                /* written as "v_resume": 1 (a checkpoint with the fields above) */
    bool restored;                 /* written as "restored": 1 by a resumed run (or a subgraph's run continued) for the
                                      checkpoint it starts from, before it runs anything */
    const char *path;              /* NULL: the run's; else a subgraph's run, as the subgraph nodes down to it with the
                                      super-step each ran in ("write@3" or "write@3/check@2"); its superstep, state, next,
                                      last, nodes, joins and usage are its own, "steps" is the run's step count */
} kvm_trace_checkpoint_t;

/* interrupt: kvmesh.interrupt(payload) in a func/tool node parked the run. */
typedef struct kvm_trace_interrupt {
    int superstep;
    const char *node;
    const char *payload_json;
    const char *answers_json;      /* answers this node got before, in this super-step (a JSON array) */
    const char *path;              /* NULL, or the subgraph's run the node is in (as kvm_trace_checkpoint_t.path): then
                                      superstep is that run's */
} kvm_trace_interrupt_t;

/* resume: the answer to a parked node (kvm_run_resume, or a resume from a trace with an answer). */
typedef struct kvm_trace_resume {
    int superstep;
    const char *node;
    const char *value_json;
    const char *path;              /* as kvm_trace_interrupt_t.path */
} kvm_trace_resume_t;

typedef struct kvm_trace_run_end {
    const char *run_id;
    kvm_trace_error_t error;   /* code 0 = status ok */
    const char *outputs_json, *state_json;
    long input_tokens, output_tokens;
    int agent_calls;
    double wall_ms, lua_ms;
    int steps;                 /* budget used: super-steps */
    long tokens;
    double instructions, lua_bytes_peak;
} kvm_trace_run_end_t;

/* index.json */
typedef struct kvm_trace_index {
    const char *run_id, *workflow, *graph;
    int error;                 /* 0 = status ok, else the KVM_E* code */
    uint64_t started;          /* wall ns */
    double wall_ms;
    int supersteps, steps, agent_calls;
    long input_tokens, output_tokens;
    uint64_t seed;
} kvm_trace_index_t;

/* One record as read. */
typedef struct kvm_trace_rec {
    kvm_trace_type_t type;
    const char *type_name;     /* as written ("t") */
    int line;                  /* 1-based line in the file */
    uint64_t ts;               /* wall ns when written (0 if absent) */
    union {
        kvm_trace_run_start_t run_start;
        kvm_trace_edge_t edge;
        kvm_trace_superstep_t superstep;
        kvm_trace_step_t step;
        kvm_trace_log_rec_t log;
        kvm_trace_checkpoint_t checkpoint;
        kvm_trace_interrupt_t interrupt;
        kvm_trace_resume_t resume;
        kvm_trace_run_end_t run_end;
        kvm_trace_index_t index;
    };
} kvm_trace_rec_t;

/* ---- writer ----------------------------------------------------------------------------------------- */

typedef struct kvm_trace {
    char *dir;       /* the run's directory (owned) */
    char *path;      /* dir/events.jsonl (owned) */
    FILE *f;
    uint64_t n_records;
    uint64_t t0_ns;  /* wall clock at open */
} kvm_trace_t;

/* Fills out[33] with 32 random lowercase hex characters (16 bytes from the OS entropy source, with a
 * time/counter fallback) and a NUL. */
void kvm_trace_new_id(char out[KVM_TRACE_ID_HEX]);

/* Creates root/<name>/ (and missing parents) and opens events.jsonl in it for appending. Returns NULL
 * and sets the message (naming the path) on error. Free with kvm_trace_close(). */
kvm_trace_t *kvm_trace_open(const char *root, const char *name);
/* Flushes and closes; NULL is a no-op. */
void kvm_trace_close(kvm_trace_t *t);

/* One writer per record type: appends the record as one line with "t" and "ts" (now) and flushes. 0,
 * or KVM_EIO / KVM_ENOMEM with a message naming the file. The record stays the caller's. */
int kvm_trace_write_run_start(kvm_trace_t *t, const kvm_trace_run_start_t *r);
int kvm_trace_write_edge(kvm_trace_t *t, const kvm_trace_edge_t *r);
int kvm_trace_write_superstep(kvm_trace_t *t, const kvm_trace_superstep_t *r);
int kvm_trace_write_step(kvm_trace_t *t, const kvm_trace_step_t *r);
int kvm_trace_write_log(kvm_trace_t *t, const kvm_trace_log_rec_t *r);
int kvm_trace_write_checkpoint(kvm_trace_t *t, const kvm_trace_checkpoint_t *r);
int kvm_trace_write_interrupt(kvm_trace_t *t, const kvm_trace_interrupt_t *r);
int kvm_trace_write_resume(kvm_trace_t *t, const kvm_trace_resume_t *r);
int kvm_trace_write_run_end(kvm_trace_t *t, const kvm_trace_run_end_t *r);
/* Writes dir/index.json (atomically: temp file + rename). */
int kvm_trace_write_index(kvm_trace_t *t, const kvm_trace_index_t *r);

/* ---- reader ----------------------------------------------------------------------------------------- */

typedef struct kvm_trace_mem kvm_trace_mem_t;

/* A read events.jsonl (or index.json). */
typedef struct kvm_trace_log {
    kvm_trace_rec_t *recs; /* [n] (owned, with every string they point to) */
    int n;
    bool torn_tail;        /* the last line was incomplete or unparsable and was skipped */
    kvm_trace_mem_t *mem;  /* storage of the records' strings and arrays */
} kvm_trace_log_t;

/* Reads path (an events.jsonl, or a run directory holding one). A torn last line is skipped and
 * reported in log->torn_tail; any other bad line, or a known field of the wrong type, gives
 * KVM_EFORMAT naming path:line (and the field); a run.start of a newer major version gives
 * KVM_EVERSION. Unknown fields are ignored; unknown record types are kept as KVM_TRACE_OTHER. On
 * error *log is empty. Free with kvm_trace_log_free(). */
int kvm_trace_read(const char *path, kvm_trace_log_t *log);
/* Reads run_dir/index.json into a log of one KVM_TRACE_INDEX record; KVM_ENOENT if there is none
 * (the run is going on, or it died), KVM_EFORMAT if it is malformed. Free with kvm_trace_log_free(). */
int kvm_trace_read_index(const char *run_dir, kvm_trace_log_t *log);
void kvm_trace_log_free(kvm_trace_log_t *log);
/* First record of the type at or after index *from (updated to the index after it; from may be NULL
 * to search from the start); NULL if none. */
const kvm_trace_rec_t *kvm_trace_log_next(const kvm_trace_log_t *log, kvm_trace_type_t type, int *from);

/* Calls fn(run_dir, ud) for every directory under root (depth <= 3) that holds an events.jsonl, in
 * sorted path order. Returns the number found (0 for a folder without runs), or <0 on error: KVM_ENOENT
 * when root is no directory, KVM_EIO when it cannot be read. Folders below root that cannot be read are
 * skipped. */
int kvm_trace_find_runs(const char *root, void (*fn)(const char *run_dir, void *ud), void *ud);

#endif
