/* kvmesh.h - the public C API of kvmesh, a runtime for multi-agent LLM systems whose agents hand each
 * other KV caches instead of text.
 *
 * This is the one header a program needs: the kvmesh CLI, the examples and lab/ use nothing else
 * (lab/ adds kvmesh_lab.h for research switches and evaluation helpers). Everything here is stable in
 * the sense of KVM_API_VERSION: a change that breaks a caller bumps it.
 *
 * Objects (all opaque; each has a constructor that returns NULL and sets the message, and a _free):
 *
 *   kvm_model_t      a loaded model (weights, tokenizer, chat format, backend) for direct generation
 *   kvm_tokenizer_t  a tokenizer (a model's, or one loaded alone from tokenizer.json / tokenizer.bin)
 *   kvm_runtime_t    the long-lived runtime: settings, the models workflows name (loaded once), their KV
 *                    stores and KVCOMM anchor pools, shared by every workflow and run made from it
 *   kvm_workflow_t   a Lua 5.4 workflow script loaded into a runtime (checked at load)
 *   kvm_run_t        one run of a workflow: inputs, seed, outputs, status, trace
 *   kvm_trace_reader_t  a run trace opened for reading
 *
 * Conventions
 *   - Status: functions that can fail return int: 0 (KVM_OK) or a negative KVM_E* code, and leave a message
 *     for the calling thread (kvm_errmsg()). Constructors return NULL and set the message. Bad input (a
 *     file, a script, a JSON text, a parameter) is always an error, never a crash or an exit.
 *   - Parameters: every object with settings has kvm_<object>_default_params(), returned by value; change
 *     the fields you care about and pass it back by pointer (NULL means the defaults). Parameters are
 *     read during the call and not kept (strings in them are copied).
 *   - Memory: strings and arrays the API returns for the caller to own are freed with kvm_free(). Strings
 *     returned as `const char *` are owned by the object they came from and live as long as it does.
 *   - JSON crosses the API as UTF-8 text (inputs, outputs, statistics, trace records).
 *   - Threads: the per-thread message aside, an object is used by one thread at a time; distinct objects
 *     may be used from distinct threads, except that a runtime and everything made from it (workflows,
 *     runs) belong together to one thread at a time.
 *   - The library reads no environment variable: the CLI maps its documented variables onto parameters.
 */
#ifndef KVMESH_H
#define KVMESH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVM_API_VERSION 1

/* ================================================================================================
 * Status codes and messages
 * ================================================================================================ */

/* X(name, value, short description) */
#define KVM_STATUS_TABLE(X)                                                   \
    X(KVM_OK, 0, "ok")                                                        \
    X(KVM_EINVAL, -22, "invalid argument")                                    \
    X(KVM_ENOMEM, -12, "out of memory or KV budget exhausted")                \
    X(KVM_ENOENT, -2, "not found")                                            \
    X(KVM_EIO, -5, "input/output error")                                      \
    X(KVM_EFORMAT, -1001, "malformed file")                                   \
    X(KVM_ESHAPE, -1002, "tensor shape mismatch")                             \
    X(KVM_EDTYPE, -1003, "unsupported data type")                             \
    X(KVM_EUNSUPPORTED, -1004, "unsupported feature")                         \
    X(KVM_ERANGE, -1005, "value out of range")                                \
    X(KVM_EPROTO, -1006, "protocol error")                                    \
    X(KVM_EVERSION, -1007, "unsupported protocol version")                    \
    X(KVM_ESTALE, -1008, "stale handle")                                      \
    X(KVM_EBUSY, -1009, "busy")                                               \
    X(KVM_ELUA_SYNTAX, -1010, "Lua syntax error")                             \
    X(KVM_ELUA_RUNTIME, -1011, "Lua runtime error")                           \
    X(KVM_ELUA_MEMORY, -1012, "Lua memory limit reached")                     \
    X(KVM_EBUDGET, -1013, "step, token or time budget exhausted")             \
    X(KVM_ECANCELED, -1014, "canceled")                                       \
    X(KVM_ETIMEDOUT, -1015, "timed out")                                      \
    X(KVM_ESLOWCLIENT, -1016, "client too slow")                              \
    X(KVM_EMODEL, -1017, "model mismatch")                                    \
    X(KVM_EFRAME, -1018, "position frame mismatch")                           \
    X(KVM_EDEVICE, -1019, "device (GPU) error")                               \
    X(KVM_EINTERRUPTED, -1020, "interrupted: waiting for an answer")          \
    X(KVM_EINTERNAL, -1099, "internal error")

enum kvm_status {
#define KVM_X_ENUM(name, val, desc) name = val,
    KVM_STATUS_TABLE(KVM_X_ENUM)
#undef KVM_X_ENUM
};

/* Short description ("invalid argument") and name ("KVM_EINVAL") of a status code; never NULL. */
const char *kvm_strerror(int code);
const char *kvm_errname(int code);
/* The calling thread's last error message ("" if none) and its code; kvm_errclear() resets both. The
 * message names what failed and where (file, offset, tensor, Lua line, JSON field). */
const char *kvm_errmsg(void);
int kvm_errcode(void);
void kvm_errclear(void);

/* ================================================================================================
 * Library
 * ================================================================================================ */

/* "0.1.0" */
const char *kvm_version(void);
/* Frees memory the API handed to the caller (strings, id arrays). NULL is a no-op. */
void kvm_free(void *p);
/* Allocates memory the library will free (host functions' results); NULL when out of memory. */
void *kvm_malloc(size_t n);

enum kvm_log_level { KVM_LOG_DEBUG = 0, KVM_LOG_INFO = 1, KVM_LOG_WARN = 2, KVM_LOG_ERROR = 3, KVM_LOG_OFF = 4 };
/* Messages at or above level go to stderr (default KVM_LOG_WARN). Process-wide. */
void kvm_log_set_level(int level);
int kvm_log_get_level(void);
/* Parses "debug" | "info" | "warn" | "error" | "off" into *level; KVM_EINVAL names the accepted values. */
int kvm_log_level_parse(const char *name, int *level);
/* Threads of the CPU backend's kernels, process-wide: n >= 1, or 0 = all cores (the default). The kernels
 * run on the library's own pool of n - 1 workers beside the calling thread, started on first use and
 * restarted when n changes, joined at exit; it reads no environment variable. Kernels called from several
 * application threads at once run one call after the other. kvm_model_params_t.n_threads sets the same
 * when a model loads. */
void kvm_set_threads(int n);
int kvm_threads(void);

/* ================================================================================================
 * Models
 * ================================================================================================ */

typedef struct kvm_model kvm_model_t;
typedef struct kvm_tokenizer kvm_tokenizer_t;

/* How a model is loaded. Every string field is checked: an unknown value is KVM_EINVAL naming the field
 * and the accepted values. */
typedef struct kvm_model_params {
    const char *backend;        /* "auto" (default: CUDA when a GPU is present, else CPU), "cpu", "cuda" */
    const char *tokenizer_path; /* llama2.c checkpoints: tokenizer.bin (NULL: tokenizer.bin or tok<vocab>.bin
                                   beside the checkpoint); ignored for HF directories */
    const char *weight_dtype;   /* matrices on a GPU backend: "bf16" (default), "f16", "f32" (parity mode);
                                   NULL = default. The CPU backend reads the file's dtype in place. */
    const char *kv_dtype;       /* KV cache storage: "f32", "f16", "bf16"; NULL = the backend's default
                                   (f32 on the CPU, bf16 on a GPU) */
    int cuda_graphs;            /* CUDA graphs for decode steps: 0 = default (on), 1 = on, -1 = off */
    int n_threads;              /* CPU kernel threads (process-wide, kvm_set_threads): 0 = all cores */
    uint64_t synthetic_seed;    /* "synthetic:<name>" models: weight seed (0 = the fixed default, 1234) */
    bool quiet;                 /* no progress lines on stderr while loading */
} kvm_model_params_t;

kvm_model_params_t kvm_model_default_params(void);
/* 0 if every field holds one of its values; else KVM_EINVAL naming the field and the accepted values. */
int kvm_model_params_check(const kvm_model_params_t *params);

/* Loads a model from path:
 *   - a Hugging Face directory (config.json, model.safetensors or a sharded index, tokenizer.json,
 *     tokenizer_config.json, generation_config.json): Llama, Mistral, Qwen2, Qwen3; f32/f16/bf16;
 *   - a llama2.c checkpoint (.bin) with its tokenizer.bin;
 *   - "synthetic:<name>" (e.g. synthetic:llama-3.1-8b): random weights of a real model's shape, for
 *     benchmarks; no tokenizer.
 * Weights are mmapped (never copied on the CPU backend). NULL + message (file, tensor, expected and found
 * shape) on any error. Free with kvm_model_free(). */
kvm_model_t *kvm_model_load(const char *path, const kvm_model_params_t *params);
void kvm_model_free(kvm_model_t *m);

typedef struct kvm_model_info {
    const char *name;          /* model id: directory or file base name */
    const char *arch;          /* "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                  "Qwen3ForCausalLM", "llama2c" */
    const char *backend;       /* "cpu" | "cuda" */
    const char *chat_format;   /* "llama3" | "chatml" | "llama2" | "none" */
    const char *tokenizer;     /* tokenizer kind ("bpe-bytelevel", "sentencepiece", ...) or "none" */
    const char *weight_dtype;  /* dtype of the stored matrices: "f32" | "f16" | "bf16" */
    int n_layers, dim, hidden_dim, n_heads, n_kv_heads, head_dim, vocab_size;
    int max_context;           /* tokens */
    int bos_id;                /* -1 if none */
    int n_eos;
    int eos_ids[8];            /* generation stops on any of these (config + generation_config + chat end) */
} kvm_model_info_t;

/* Fills *out (strings owned by m). */
void kvm_model_info(const kvm_model_t *m, kvm_model_info_t *out);
/* One line: "LlamaForCausalLM, 6 layers, dim 128, ... bf16 weights, cpu backend". */
void kvm_model_describe(const kvm_model_t *m, char *buf, size_t cap);
/* The model's tokenizer (owned by m), or NULL for models without one (synthetic). */
const kvm_tokenizer_t *kvm_model_tokenizer(const kvm_model_t *m);

/* ---- tokenizers --------------------------------------------------------------------------------- */

enum kvm_tokenize_flags {
    KVM_TOK_ADD_BOS = 1 << 0,       /* prepend BOS when the tokenizer has one and its config adds it */
    KVM_TOK_PARSE_SPECIAL = 1 << 1, /* special / added token strings in the text become their ids (as HF
                                       tokenizers does by default) */
};

/* Loads a tokenizer on its own: a tokenizer.json (its tokenizer_config.json beside it is read when
 * present), a model directory holding one, or a llama2.c tokenizer.bin (vocab_size 0 = count its
 * entries). NULL + message on error; free with kvm_tokenizer_free(). */
kvm_tokenizer_t *kvm_tokenizer_load(const char *path, int vocab_size);
void kvm_tokenizer_free(kvm_tokenizer_t *t);

/* Encodes text[0..len) into ids exactly as Hugging Face tokenizers does for this tokenizer; flags are
 * kvm_tokenize_flags. *ids (freed with kvm_free) holds *n ids. */
int kvm_tokenize(const kvm_tokenizer_t *t, const char *text, size_t len, int flags, int32_t **ids, int *n);
/* Decodes ids into text (*out NUL-terminated, *len bytes, freed with kvm_free); skip_special drops special
 * tokens. Ids out of range are KVM_ERANGE. */
int kvm_detokenize(const kvm_tokenizer_t *t, const int32_t *ids, int n, bool skip_special, char **out, size_t *len);
int kvm_tokenizer_vocab_size(const kvm_tokenizer_t *t);

/* ---- generation ----------------------------------------------------------------------------------- */

enum kvm_stop_reason {
    KVM_STOP_NONE = 0,     /* not stopped (or failed) */
    KVM_STOP_EOS,          /* an end-of-sequence or stop id */
    KVM_STOP_STRING,       /* a stop string (cut from the text) */
    KVM_STOP_LENGTH,       /* max_tokens or max_total_tokens */
    KVM_STOP_CONTEXT,      /* the model's context is full */
    KVM_STOP_CALLBACK,     /* the token callback asked to stop */
};
/* "eos", "stop_string", "length", "context", "callback", "none" */
const char *kvm_stop_reason_name(int reason);

typedef struct kvm_generate_params {
    int max_tokens;            /* new tokens at most (default 256); must be >= 1 */
    int max_total_tokens;      /* llama2.c `steps`: stop when prompt + output reach this many tokens (0 = off) */
    float temperature;         /* 0 = greedy; < 0 (default) = the model's generation_config, else greedy */
    int top_k;                 /* 0 = off */
    float top_p;               /* 1 = off */
    float repetition_penalty;  /* 1 = off; HF semantics over prompt + output */
    uint64_t seed;             /* sampling seed */
    const char *const *stop;   /* stop strings: generation stops when the output contains one (it is cut
                                  off, and never streamed while it forms) */
    int n_stop;
    bool ignore_eos;           /* keep generating past end-of-sequence ids */
    bool chat;                 /* render the prompt in the model's chat format (Llama-3, ChatML, Llama-2) */
    const char *system;        /* system message (with chat) */
} kvm_generate_params_t;

kvm_generate_params_t kvm_generate_default_params(void);

/* Called with each piece of output text as it becomes final (bytes, not NUL-terminated; a piece may be
 * empty while a stop string might be forming) and the id that produced it; return non-zero to stop. */
typedef int (*kvm_token_fn)(void *ud, int32_t id, const char *text, size_t len);

typedef struct kvm_generation {
    char *text;           /* the output (stop string removed), NUL-terminated */
    size_t text_len;
    int32_t *ids;         /* generated ids (stop id excluded) */
    int n_ids;
    int n_prompt;         /* prompt tokens */
    int stop_reason;      /* enum kvm_stop_reason */
    double ttft_ms;       /* call -> first token */
    double decode_ms;     /* first token -> end */
} kvm_generation_t;

/* Generates from a text prompt (chat-rendered when params->chat), streaming through fn (may be NULL).
 * *out is filled on success and on KVM_STOP_* ends; clear it with kvm_generation_clear(). */
int kvm_model_generate(kvm_model_t *m, const char *prompt, const kvm_generate_params_t *params, kvm_token_fn fn,
                       void *ud, kvm_generation_t *out);
/* The same from token ids (ids[0..n), each in [0, vocab_size); nothing added or rendered: params->chat and
 * params->system are ignored). out->n_prompt = n. KVM_EINVAL for no ids, KVM_ERANGE for an id out of range. */
int kvm_model_generate_ids(kvm_model_t *m, const int32_t *ids, int n, const kvm_generate_params_t *params, kvm_token_fn fn,
                           void *ud, kvm_generation_t *out);
void kvm_generation_clear(kvm_generation_t *g);

/* ================================================================================================
 * Runtime
 * ================================================================================================ */

typedef struct kvm_runtime kvm_runtime_t;

/* How agents obtain the KV of their prompts. */
typedef enum kvm_kv_policy {
    KVM_KV_PREFIX = 0, /* exact prefix hits (template prefixes, earlier prompts) shared by reference; the rest
                          computed */
    KVM_KV_DENSE = 1,  /* everything computed */
    KVM_KV_KVCOMM = 2, /* prefix + KVCOMM: shared segments (inputs, tool results, other agents' outputs)
                          reused behind different prefixes with re-rotated keys and anchor-estimated offsets */
} kvm_kv_policy_t;

/* "prefix" | "dense" | "kvcomm" */
const char *kvm_kv_policy_name(kvm_kv_policy_t p);
/* Parses a policy name; KVM_EINVAL names the accepted values. */
int kvm_kv_policy_parse(const char *name, kvm_kv_policy_t *out);

typedef struct kvm_runtime_params {
    kvm_model_params_t model;     /* how the models workflows name are loaded */
    size_t kv_budget_bytes;       /* KV pool per model (0 = the model's default: 4 full contexts) */
    int max_batch_tokens;         /* tokens per forward pass (default 256) */
    int max_active;               /* sequences in flight per model (default 64) */
    const char *trace_root;       /* each run writes <trace_root>/<run_id>/; NULL = no traces */
    int kv_override;              /* -1 (default): each agent's own policy; else a kvm_kv_policy_t for all */
    const char *const *kvcomm;    /* KVCOMM settings "key=value" (docs/kvcomm.md §switches), applied to every
                                     model, checked at creation: e.g. "preset=blend", "gamma=0.5" */
    int n_kvcomm;
    const char *model_override;   /* every kvmesh.model(...) in scripts resolves to this path; "mock:echo" is
                                     the mock model (dry runs, tests) */
    size_t lua_mem_bytes;         /* the whole Lua state (default 512 MiB) */
    size_t run_mem_bytes;         /* Lua memory of one run (default 64 MiB; a graph's limits.memory_mb may only lower it) */
    uint64_t run_instructions;    /* Lua instructions per run (default 1e9; a graph's limits may only lower it) */
    double run_lua_ms;            /* Lua CPU time per run, waits for agents excluded (default 5000; likewise) */
    bool echo_print;              /* print() in scripts also goes to stderr */
    bool quiet;                   /* no progress on stderr (model loading) */
    const char *state_dir;        /* what the runtime learns (KVCOMM anchors) is kept here across processes: loaded
                                     when a model opens, saved by kvm_runtime_save_state and kvm_runtime_free
                                     (docs/state.md); created if missing. NULL = nothing kept */
    /* KV admission control (docs/kv-store.md): an agent step that does not fit the KV pool beside the running
     * ones waits, in submit order, for them to finish; one that has waited this long while no step of its model
     * finished fails with KVM_ENOMEM. 0 = the default, 300000 ms (5 min). A step whose prompt needs more KV
     * than the whole pool fails at once. */
    double kv_wait_ms;
    /* The judge model (docs/correct.md, "The judge's text"): a path kvm_model_load opens (or "mock:echo") whose model
     * writes the schema text of every failure kvm_blame_verify confirms on this runtime (unless its params name
     * another judge). Loaded on first use (kvm_runtime_judge). NULL = no judge (schemata keep their stub). */
    const char *judge_model;
} kvm_runtime_params_t;

kvm_runtime_params_t kvm_runtime_default_params(void);

/* Creates a runtime (no model is loaded until a workflow names one). NULL + message on a bad parameter.
 * Free with kvm_runtime_free() after every workflow made from it; with a state_dir it saves the state first
 * (an error is logged: nothing else can report it). */
kvm_runtime_t *kvm_runtime_create(const kvm_runtime_params_t *params);
void kvm_runtime_free(kvm_runtime_t *rt);
/* Writes what the runtime learned so far into params.state_dir, crash-safely (each file written beside its name,
 * synced, renamed over it: a crash leaves the previous save or this one). For programs that live long (a daemon
 * saves now and then, and on SIGTERM). 0 without a state_dir; else the first error (KVM_EIO naming the file). */
int kvm_runtime_save_state(kvm_runtime_t *rt);

/* A function of the embedding program that workflow scripts call as kvmesh.<name>(...). args_json is the call's
 * arguments as a JSON array ("[]" for none; Lua tables become objects or arrays). On success return 0 and set
 * *result_json to JSON text allocated with kvm_malloc (the library frees it; NULL = the call returns nil). On
 * failure return a KVM_E* code and set *result_json to a message allocated with kvm_malloc (or NULL): the script
 * gets the Lua error "kvmesh.<name>: <message>". Host functions run on the thread that drives the workflow,
 * outside the Lua budgets: they are trusted code of the program. */
typedef int (*kvm_host_fn)(void *ud, const char *args_json, char **result_json);

/* Registers fn as kvmesh.<name> for every workflow loaded into rt from now on. A dotted name makes nested
 * tables ("minitasks.item" is kvmesh.minitasks.item). KVM_EINVAL for a malformed name (segments of letters,
 * digits and '_', not starting with a digit), one already registered, or one that is a built-in of the Lua API
 * (kvmesh.model, kvmesh.graph, ...). */
int kvm_runtime_add_function(kvm_runtime_t *rt, const char *name, kvm_host_fn fn, void *ud);

/* Host tools (docs/lua-api.md, "Host tools"): functions of the program with a JSON Schema for their arguments,
 * called from a func/tool node as ctx:tool(name, args). The arguments (a Lua table, as a JSON object) are checked
 * against the schema before the call; a violation is a Lua error naming the path ("ctx:tool: tool 'weather':
 * args.city: expected string, got integer") and the tool does not run. One call of a tool: */
typedef struct kvm_tool_call {
    const char *tool;      /* the tool's name */
    const char *args_json; /* the arguments: a JSON object that passed the schema */
    struct kvm_run *run;   /* the calling run, a kvm_run_t (NULL in a replay, kvm_trace_replay) */
    const char *run_id;
    const char *node;      /* the node that called */
    uint64_t call_id;      /* numbers the runtime's tool calls: what kvm_run_tool_result names */
    double ms_left;        /* what is left of the run's wall-time budget (g:limit{wall_ms}) as the call begins; < 0 =
                              none. A tool that returns after it is spent ends the run with KVM_EBUDGET */
} kvm_tool_call_t;

/* On success return 0 and set *result_json to JSON text allocated with kvm_malloc (the library frees it; NULL = the
 * call returns nil). On failure return a KVM_E* code and set *result_json to a message allocated with kvm_malloc (or
 * NULL): the script gets the Lua error "ctx:tool: tool '<name>': <message>". To answer later (a tool served by
 * another process, as `kvmesh serve` does for its clients' tools), return KVM_EBUSY with *result_json NULL: the node
 * waits (the rest of the run goes on) until kvm_run_tool_result(call->run, call->call_id, ...) answers; the wait counts
 * against the run's wall-time budget (past it the run ends with KVM_EBUDGET), and kvm_run_cancel ends it. Pointers in
 * call are valid during the call. A tool runs on the thread that drives the workflow: its time counts against the
 * run's wall-time budget, not its Lua CPU budget. */
typedef int (*kvm_tool_fn)(void *ud, const kvm_tool_call_t *call, char **result_json);

/* Registers a tool for every workflow of rt (those loaded already too: ctx:tool looks tools up at each call). name:
 * letters, digits, '_', '-' and '.' (1 to 64 bytes, not starting with a digit), not registered now. description:
 * what the tool does, for people and for models shown the tool (NULL = none). schema_json: the JSON Schema of the
 * arguments (NULL = {"type": "object"}), of the subset docs/lua-api.md lists: type, properties, required,
 * additionalProperties, enum, items, minimum, maximum, minLength, maxLength, minItems, maxItems (and the annotations
 * title, description, default, examples); any other keyword is refused. 0, or KVM_EINVAL naming the tool and the
 * place in the schema ("tool 'weather': schema.properties.city: unsupported keyword 'pattern' (supported: ...)"). */
int kvm_runtime_add_tool(kvm_runtime_t *rt, const char *name, const char *description, const char *schema_json,
                         kvm_tool_fn fn, void *ud);
/* Removes a tool (later ctx:tool calls of it fail as for a name never registered; calls waiting for their answer go
 * on waiting for it). 0, or KVM_ENOENT. */
int kvm_runtime_remove_tool(kvm_runtime_t *rt, const char *name);

/* Counters of the runtime as a JSON object (freed with kvm_free): forward passes, sequences per pass, and
 * per model its KV store and KVCOMM statistics (anchors, pools, reuse). NULL + message on error. */
char *kvm_runtime_stats_json(const kvm_runtime_t *rt);

/* ================================================================================================
 * Workflows and runs (docs/lua-api.md)
 * ================================================================================================ */

typedef struct kvm_workflow kvm_workflow_t;
typedef struct kvm_run kvm_run_t;

/* One finished step of a run (an agent call, a func or a tool node), for live displays. Every pointer is
 * valid only during the callback. */
typedef struct kvm_step_event {
    kvm_run_t *run;
    const char *run_id;
    int superstep;
    const char *node;      /* a subgraph's nodes as the path of subgraph nodes to them: "research/search" */
    const char *agent;     /* NULL for func / tool / subgraph nodes */
    const char *op;        /* "chat" | "func" | "tool" | "subgraph" */
    int status;            /* 0 or KVM_E* */
    const char *error;     /* NULL if ok */
    int tokens_in, tokens_out, tokens_reused;
    double ttft_ms, decode_ms;
    const char *text;      /* the agent's output */
    /* agent steps: how the prompt's KV was obtained, a partition of tokens_in (docs/kvcomm.md §6); 0 / NULL for
     * func and tool nodes */
    int kv_exact, kv_offset, kv_naive, kv_recomputed, kv_fused;
    int kv_anchors;        /* anchors used (KVCOMM reuse) */
    const char *kv_mode;   /* "dense" | "prefix" | "reuse" | "c2c" (kv_fused rows from another model through a C2C
                              fuser: the agent option kv_from, docs/c2c.md) */
    double queue_ms;       /* submit -> first forward pass that included the step */
} kvm_step_event_t;

typedef void (*kvm_step_fn)(void *ud, const kvm_step_event_t *e);

typedef struct kvm_workflow_params {
    kvm_step_fn on_step;   /* called after every step of every run (may be NULL) */
    void *ud;
} kvm_workflow_params_t;

kvm_workflow_params_t kvm_workflow_default_params(void);

/* Loads a workflow script (a Lua 5.4 chunk that returns a graph) into rt: runs it once in a sandbox,
 * checks the graph and opens the models it names (through rt). NULL + message "file:line: ..." on any
 * error. Free with kvm_workflow_free(), which also frees its runs (runs still going end canceled first, without
 * events). */
kvm_workflow_t *kvm_workflow_load(kvm_runtime_t *rt, const char *path, const kvm_workflow_params_t *params);
/* The same from source text; name is the chunk name used in messages ("team.lua"). */
kvm_workflow_t *kvm_workflow_load_string(kvm_runtime_t *rt, const char *name, const char *source, size_t len,
                                         const kvm_workflow_params_t *params);
void kvm_workflow_free(kvm_workflow_t *wf);
/* Loads the workflow script a traced run ran (its source as recorded in the trace's run.start), for resuming
 * that run (kvm_run_params_t.resume_trace). NULL + message when the trace cannot be read or has no source. */
kvm_workflow_t *kvm_workflow_load_trace(kvm_runtime_t *rt, const char *run_dir, const kvm_workflow_params_t *params);
/* The graph's name (g = kvmesh.graph{name = ...}). */
const char *kvm_workflow_name(const kvm_workflow_t *wf);
/* Whether the graph defines g:dataset(seed) and g:score(result, inputs). */
bool kvm_workflow_has_dataset(const kvm_workflow_t *wf);
bool kvm_workflow_has_score(const kvm_workflow_t *wf);

/* What happens to one run, for a program that serves runs while they go (a daemon streaming to its clients).
 * Every pointer is valid only during the callback. Events come from inside kvm_runtime_step (and
 * kvm_workflow_drive, a loop of it); the callback must not free or cancel runs or workflows. */
enum kvm_run_event_kind {
    KVM_RUN_TOKEN = 1, /* a piece of an agent's output, as it becomes final (agent, token_id, text, len) */
    KVM_RUN_STEP = 2,  /* a step ended (step: the same record as kvm_workflow_params_t.on_step gets) */
    KVM_RUN_END = 3,   /* the run ended (status 0 or KVM_E*, message); the last event of the run */
    KVM_RUN_INTERRUPT = 4, /* a node called kvmesh.interrupt(payload): the run is parked until kvm_run_resume
                              (node; text/len: the payload as JSON). Once per park */
};

typedef struct kvm_run_event {
    int kind;              /* enum kvm_run_event_kind */
    kvm_run_t *run;
    const char *run_id;
    const char *agent;     /* TOKEN, STEP (NULL for func / tool steps) */
    int32_t token_id;      /* TOKEN */
    const char *text;      /* TOKEN: bytes, not NUL-terminated (a piece may be empty) */
    size_t len;
    const kvm_step_event_t *step; /* STEP */
    int status;            /* END */
    const char *message;   /* END: NULL if ok */
    const char *node;      /* INTERRUPT: the node that called kvmesh.interrupt */
} kvm_run_event_t;

typedef void (*kvm_run_event_fn)(void *ud, const kvm_run_event_t *e);

typedef struct kvm_run_params {
    const char *inputs_json;  /* a JSON object of inputs (strings, numbers, booleans, nested data); NULL = {} */
    uint64_t seed;            /* the run's seed (sampling, math.random) */
    bool from_dataset;        /* inputs from g:dataset(seed), with inputs_json merged over them */
    kvm_run_event_fn on_event; /* the run's events (NULL = none); KVM_RUN_END comes exactly once */
    void *event_ud;
    const char *kv;            /* "dense" | "prefix" | "kvcomm": the KV policy of every agent of this run (an A/B
                                  of one workflow from one runtime); NULL = the agents' own, or the runtime's
                                  kv_override. Recorded in the trace, so a replay uses it too */
    /* Resume (docs/lua-api.md, "Checkpoints and resume"): continue the run traced in resume_trace (a run
       directory) from a checkpoint instead of starting afresh. Its inputs, seed and KV policy come from the
       trace (inputs_json, seed, from_dataset and kv are ignored); the run gets a new id and a trace of its own
       whose run.start names the run it resumes. KV is rebuilt or reused through the normal paths. */
    const char *resume_trace;
    int resume_step;           /* the checkpoint written after this super-step; 0 = the last one */
    const char *answer_json;   /* the answer (JSON) to the interrupt the traced run was parked on after that
                                  checkpoint (kvmesh.interrupt returns it); NULL = none (the node asks again) */
    /* Counterfactual replay (docs/correct.md, "Replay"): with replay, the run traced in resume_trace runs again
       from its step replay_step (0-based, as `kvmesh trace steps` numbers them): the agent steps before it are
       given their recorded outputs (not generated; func and tool nodes run again), step replay_step is given
       replay_output (an agent step only) or, when that is NULL, generated again with sampling seed replay_seed
       (0 = the recorded one) and the KV policy kv (NULL = the recorded one); the steps after it are generated.
       Edits the traced run recorded (it may be a replay too) stay, except step replay_step's. The run gets a
       new id and a trace whose run.start "replay" names its origin. resume_step is not used and answer_json must
       be NULL (KVM_EINVAL); a run that waited in kvmesh.interrupt before the step, or that was itself resumed, is KVM_EUNSUPPORTED; a
       step out of range is KVM_ERANGE. The workflow is the traced one (kvm_workflow_load_trace). */
    bool replay;
    int replay_step;
    const char *replay_output;
    uint64_t replay_seed;
} kvm_run_params_t;

kvm_run_params_t kvm_run_default_params(void);

/* Starts a run; nothing executes until kvm_runtime_step() or kvm_workflow_drive(). The run belongs to wf
 * (valid until kvm_workflow_free). NULL + message on bad inputs (the JSON's error offset is named). */
kvm_run_t *kvm_run_start(kvm_workflow_t *wf, const kvm_run_params_t *params);
/* Runs every started run of wf to its end, interleaving them on this thread and batching their agents'
 * model work: a loop of kvm_runtime_step() until wf has no run going (runs of the runtime's other workflows
 * advance meanwhile too). A failing run ends alone with its status; the result is <0 only when the engine
 * itself failed. A run parked in kvmesh.interrupt, or whose nodes all wait for tools that answer later
 * (kvm_run_tool_result), is not going: drive returns with it still waiting. */
int kvm_workflow_drive(kvm_workflow_t *wf);

/* One round of the runtime, for programs that serve many runs of many workflows on one thread and do other
 * work between rounds (a daemon's network I/O): every started run of every workflow of rt advances (finished
 * super-steps end, the next ones start), then the engine runs one forward pass per model over the model work
 * of all of them together (continuous batching). Run events (kvm_run_params_t.on_event) are delivered from
 * inside this call. Returns the number of runs still going after the round (0 = idle: nothing to do until a
 * run starts), or <0 when the engine itself failed (every run going then ended with that error). */
int kvm_runtime_step(kvm_runtime_t *rt);
/* Runs started and not yet ended, over every workflow of rt. */
int kvm_runtime_n_active(const kvm_runtime_t *rt);
/* Generation jobs: a prompt generated on one of the runtime's models as a job of its engine, like an agent step
 * (batched with the runs' steps in the same forward passes, its KV taken from and given back to the model's pool,
 * reusing exact prefix hits), for programs that serve generation beside runs (the daemon's generate request). The
 * job advances inside kvm_runtime_step; its events come from there: a KVM_RUN_TOKEN per piece of output as it
 * becomes final, then exactly one KVM_RUN_END. Every pointer is valid only during the callback. */
typedef struct kvm_gen_event {
    int kind;                /* KVM_RUN_TOKEN or KVM_RUN_END */
    uint64_t job;            /* kvm_runtime_generate's *job */
    int32_t token_id;        /* TOKEN */
    const char *text;        /* TOKEN: bytes, not NUL-terminated (a piece may be empty); END: the output (stop string
                                removed), NUL-terminated, "" on an error */
    size_t len;
    int status;              /* END: 0, or KVM_ECANCELED (kvm_runtime_generate_cancel), KVM_ETIMEDOUT (deadline_ms),
                                KVM_ENOMEM (the KV pool cannot hold it), ... */
    const char *message;     /* END: NULL if ok */
    const int32_t *ids;      /* END: the generated ids (stop id excluded), n_ids of them */
    int n_ids;
    int n_prompt;            /* END: prompt tokens */
    int kv_exact;            /* END: prompt tokens whose KV was an exact prefix hit (not computed) */
    int stop_reason;         /* END: enum kvm_stop_reason */
    double queue_ms, ttft_ms, decode_ms; /* END */
} kvm_gen_event_t;

typedef void (*kvm_gen_event_fn)(void *ud, const kvm_gen_event_t *e);

typedef struct kvm_gen_request {
    const char *model;       /* the model's path, opened through the runtime as a workflow's kvmesh.model(path) is (the
                                same model, KV pool and engine as the workflows naming that path) */
    const char *prompt;      /* a text prompt (params.chat renders it in the model's chat format, with params.system);
                                the model needs a tokenizer */
    const int32_t *ids;      /* or the prompt as token ids, each in [0, vocab_size), nothing added (copied) */
    int n_ids;
    kvm_generate_params_t params; /* max_tokens, temperature (< 0: the model's generation_config), top_k, top_p,
                                     repetition_penalty, seed, stop strings, ignore_eos, chat, system; max_total_tokens
                                     must stay 0 (KVM_EUNSUPPORTED otherwise) */
    double deadline_ms;      /* > 0: the job ends with KVM_ETIMEDOUT once this long has passed since it was submitted
                                (checked at every generated token; its KV goes back at once); 0 = none */
    kvm_gen_event_fn on_event; /* may be NULL */
    void *ud;
} kvm_gen_request_t;

/* Queues a generation job; *job receives its id (> 0). Nothing executes until kvm_runtime_step. KVM_EINVAL naming
 * the field for a bad request (no model, no prompt or both, bad params), KVM_ERANGE for an id out of range, the
 * model's error when it cannot be opened. */
int kvm_runtime_generate(kvm_runtime_t *rt, const kvm_gen_request_t *req, uint64_t *job);
/* Ends a job with code (0 = KVM_ECANCELED) and message (NULL = "canceled"): one waiting for KV ends now, one being
 * decoded stops at its next token (a prompt being prefilled finishes its prefill first); its KV goes back to the
 * pool when it ends, at the next kvm_runtime_step, which delivers its KVM_RUN_END with that code. 0; KVM_ENOENT for
 * no such job going. Not from inside an event callback. */
int kvm_runtime_generate_cancel(kvm_runtime_t *rt, uint64_t job, int code, const char *message);
/* Generation jobs queued and not yet ended. */
int kvm_runtime_n_generating(const kvm_runtime_t *rt);

/* Ends a run now with code (0 = KVM_ECANCELED; KVM_ETIMEDOUT for a deadline) and message (NULL = the
 * code's description): its agent steps in flight stop at their next token (one still prefilling finishes
 * its prefill) and give their KV back, anchors it staged are dropped, its trace ends with the status. Its
 * KVM_RUN_END event comes from the next kvm_runtime_step. 0; KVM_ESTALE when it had ended already. Not from
 * inside an event callback. */
int kvm_run_cancel(kvm_run_t *r, int code, const char *message);

/* Interrupts (human in the loop). A func/tool node that calls kvmesh.interrupt(payload) parks its run: the rest
 * of the super-step finishes, then the run waits (kvm_run_status gives KVM_EINTERRUPTED, kvm_runtime_step does not
 * count it as going; a KVM_RUN_INTERRUPT event comes once). kvm_run_interrupt_json gives the payload as JSON text
 * (kvm_free) and *node (owned by the run, may be NULL) the node that asked (in a subgraph: its path from the run's
 * graph, "review/approve"; the whole run parks); NULL + KVM_EINVAL when the run is not
 * parked. kvm_run_resume answers: value_json (JSON text; NULL = null) becomes kvmesh.interrupt's result and the node
 * goes on from there at the next kvm_runtime_step; the time parked does not count against the run's wall budget.
 * 0; KVM_EINVAL when the run is not parked or the value is not JSON. A parked run whose workflow is freed ends with
 * KVM_EINTERRUPTED, its trace keeping the interrupt: kvm_run_params_t.resume_trace + answer_json resume it later
 * (the node then runs again from its start and kvmesh.interrupt returns the answer). Not from inside an event
 * callback. */
char *kvm_run_interrupt_json(const kvm_run_t *r, const char **node);
int kvm_run_resume(kvm_run_t *r, const char *value_json);

/* Answers a tool call that its tool left pending (it returned KVM_EBUSY): status 0 and result_json (JSON text; NULL =
 * nil) is what ctx:tool returns; a KVM_E* status and result_json a message (NULL = the code's description) make
 * ctx:tool raise "ctx:tool: tool '<name>': <message>". The node goes on at the next kvm_runtime_step. 0; KVM_EFORMAT
 * for result text that is not JSON (the call stays pending), KVM_ESTALE when the run has ended (canceled, past its
 * budget), KVM_ENOENT when no call call_id waits in the run. Not from inside an event callback. */
int kvm_run_tool_result(kvm_run_t *r, uint64_t call_id, int status, const char *result_json);

/* Runs started on wf so far, in order; kvm_workflow_run(wf, i) for i in [0, n). */
int kvm_workflow_n_runs(const kvm_workflow_t *wf);
kvm_run_t *kvm_workflow_run(kvm_workflow_t *wf, int i);

/* The run's status: 0 ok, or KVM_E*; *message (may be NULL) receives the error with file:line and
 * traceback (owned by the run). Before the run finished: KVM_EBUSY, or KVM_EINTERRUPTED while it is parked in
 * kvmesh.interrupt (kvm_run_resume). */
int kvm_run_status(const kvm_run_t *r, const char **message);
const char *kvm_run_id(const kvm_run_t *r);
/* The run's trace directory, or NULL when tracing is off. */
const char *kvm_run_trace_dir(const kvm_run_t *r);
/* The run's final outputs, final state and inputs as JSON text (freed with kvm_free); NULL + message
 * before the run has them. */
char *kvm_run_outputs_json(const kvm_run_t *r);
char *kvm_run_state_json(const kvm_run_t *r);
char *kvm_run_inputs_json(const kvm_run_t *r);
/* Calls g:score(result, inputs) for a finished run: 1 and *score set (true = 1, false = 0, or the number
 * returned), 0 if the graph has no scorer, <0 on a script error. */
int kvm_run_score(kvm_run_t *r, double *score);

/* Per-agent figures summed over every run of the workflow. Strings owned by the workflow. */
typedef struct kvm_agent_stats {
    const char *name;
    const char *model;
    const char *kv;                /* effective policy name ("c2c" for an agent with kv_from via c2c) */
    int calls, errors, reuse_calls;
    long prompt_tokens, output_tokens;
    long exact, offset, naive, recomputed, fused; /* partition of the prompt tokens (docs/kvcomm.md §6) */
    double ttft_ms_sum, decode_ms_sum;
    long decode_tokens;            /* output tokens after the first (for tokens/s) */
} kvm_agent_stats_t;

int kvm_workflow_n_agents(const kvm_workflow_t *wf);
/* KVM_ERANGE for i outside [0, n_agents). */
int kvm_workflow_agent_stats(const kvm_workflow_t *wf, int i, kvm_agent_stats_t *out);

/* ================================================================================================
 * Traces (docs/trace-format.md)
 * ================================================================================================ */

typedef struct kvm_trace_reader kvm_trace_reader_t;

/* Opens a run's trace for reading: a run directory or its events.jsonl. A torn last line (a crash while
 * writing) is skipped and reported by kvm_trace_reader_torn(); any other bad line is KVM_EFORMAT naming
 * path:line. NULL + message on error; free with kvm_trace_reader_free(). */
kvm_trace_reader_t *kvm_trace_reader_open(const char *path);
void kvm_trace_reader_free(kvm_trace_reader_t *t);
int kvm_trace_reader_n_records(const kvm_trace_reader_t *t);
/* Record i as one line of JSON text and its type (the "t" field), both owned by t; NULL outside
 * [0, n_records). */
const char *kvm_trace_reader_record_json(const kvm_trace_reader_t *t, int i);
const char *kvm_trace_reader_record_type(const kvm_trace_reader_t *t, int i);
bool kvm_trace_reader_torn(const kvm_trace_reader_t *t);
/* Calls fn(ud, run_dir) for every run directory under root (depth <= 3), in sorted order. Returns how
 * many were found, or <0 when root cannot be read. */
int kvm_trace_list(const char *root, void (*fn)(void *ud, const char *run_dir), void *ud);

/* ---- views: what `kvmesh trace` prints, as text ----------------------------------------------------
 * Each view reads the trace through the same reader (a torn last line is skipped and said so; a bad line is
 * KVM_EFORMAT naming path:line; a newer format KVM_EVERSION) and returns UTF-8 text in *text, lines ending in
 * '\n', freed with kvm_free. On error *text is NULL and the message is the reader's. The text is for people:
 * its layout may change between versions (the records, kvm_trace_reader_*, are the stable form). Views touch
 * no shared state: any thread may call them. */

typedef struct kvm_trace_view_params {
    int step;   /* kvm_trace_view_steps: only the step with this index; -1 (default) = every step */
    bool full;  /* texts whole; false (default) = each cut to 400 bytes, "..." marking the cut */
} kvm_trace_view_params_t;

kvm_trace_view_params_t kvm_trace_view_default_params(void);

/* One line per run under root (depth <= 3, sorted by path): from index.json its id, start time (UTC), graph,
 * status, super-steps, agent calls, tokens in/out, wall time and directory; a run without index.json (going
 * on, or died) is summarised from its log as "running?" with its step count; a run whose log cannot be read
 * gets a line "(unreadable: <why>)". Returns the number of runs (>= 0), or <0 when root is no readable
 * directory. */
int kvm_trace_view_list(const char *root, char **text);
/* Which runs kvm_trace_view_list_filtered lists (each field NULL / 0 = any). */
typedef struct kvm_trace_filter {
    const char *workflow;        /* a substring of the workflow path or of the graph name */
    int status;                  /* 1 = runs that ended ok, 2 = runs that failed (or never ended), 0 = any */
    const char *agent;           /* runs in which this agent made a step (reads each run's log: slower) */
    uint64_t since_ns, until_ns; /* runs started in [since, until) (wall clock, ns since 1970) */
} kvm_trace_filter_t;
/* kvm_trace_view_list of the runs that pass every given field of f (NULL = all). Returns how many were
 * listed (>= 0), or <0 when root is no readable directory. */
int kvm_trace_view_list_filtered(const char *root, const kvm_trace_filter_t *f, char **text);
/* Every record of every run under root whose JSON text contains needle (case-insensitive; at most 1,000
 * matches): one line each with the run id, the record (step index, node, agent) and the text around the
 * match; unreadable runs are skipped and counted at the end. Returns the number of matches (>= 0), or <0
 * when root is no readable directory. */
int kvm_trace_view_search(const char *root, const char *needle, char **text);
/* A run (a run directory or its events.jsonl): header (id, workflow, seed, inputs, models, agents with their
 * policy and template), every step on one line (node, op, status, tokens in and how many were reused,
 * TTFT, tok/s, batch size, output), edges and log lines in order, and the result (status, outputs, usage).
 * 0 or KVM_E*. */
int kvm_trace_view_run(const char *run_dir, char **text);
/* Every step of a run (or params->step alone) in full: what the agent saw (its system message, the fixed
 * text and each placeholder with its content), its prompt's KV partition and reuse decisions, timings and
 * batch, and what it said; a func / tool node's returned value; errors with their traceback. params NULL =
 * the defaults. 0 or KVM_E*. */
int kvm_trace_view_steps(const char *run_dir, const kvm_trace_view_params_t *params, char **text);
/* Two runs side by side (e.g. dense and kvcomm of the same seed): steps aligned by node and occurrence (the k-th
 * time a node ran in one run against the k-th in the other), one line each with how each side obtained its KV and
 * whether the output is the same ("same"; "same*" from another prompt; "OUTPUT": the same prompt, another output;
 * "INPUT": another prompt and output; "only in A|B"), the first divergence (the first step, in A's order, whose
 * output differs under the same prompt: where the runs part) and whether the outputs differ. Returns the number
 * of steps whose output differs (0 = the runs agree), or <0 (KVM_E*: a run unreadable). */
int kvm_trace_view_diff(const char *run_a, const char *run_b, char **text);

/* ---- replay -------------------------------------------------------------------------------------------- */

/* One traced agent-node step (successful, not made through ctx:call) against the replay: the k-th output
 * of a node in the trace is compared with the k-th output of that node in the replay. */
typedef struct kvm_replay_step {
    int idx;          /* the step's index in the trace */
    char *node;
    char *was;        /* the traced output */
    char *now;        /* the replay's output; NULL when the replay has no such step */
    bool same;
} kvm_replay_step_t;

typedef struct kvm_replay {
    char run_id[33];          /* the traced run */
    kvm_replay_step_t *steps; /* [n_steps], in trace order */
    int n_steps;
    int same, differ;         /* steps whose outputs are the same / differ */
    int status;               /* the replayed run's status: 0 or KVM_E* */
    bool trace_ended;         /* the trace has its run.end record */
    int trace_status;         /* the traced run's status then: 0 or KVM_E* */
} kvm_replay_t;

/* Re-runs a traced run from its trace alone (the script source, inputs, seed, KV override, mock switch and
 * limits its run.start recorded; no trace is written) and compares every agent output with the traced one.
 * The runtime gives the settings: its model parameters, its model_override ("mock:echo", or a path every
 * kvmesh.model() resolves to; the mock model is used anyway when the trace was a mock run) and its host
 * functions. The replay runs on models and KV stores of its own (loaded for it, empty anchor pools, freed
 * at its end): it neither uses nor changes the runtime's. Greedy agents on the same model and backend
 * reproduce exactly; sampled ones too, their seeds being derived from the run seed. 0 with *out filled
 * (clear it with kvm_replay_clear) also when the replayed run failed (out->status); KVM_E* with a message
 * when it could not run (unreadable trace, no run.start, script or engine failure), *out then empty. */
int kvm_trace_replay(kvm_runtime_t *rt, const char *run_dir, kvm_replay_t *out);
void kvm_replay_clear(kvm_replay_t *r);
/* The comparison as `kvmesh trace replay` prints it: one line per compared step ("same", or "DIFFERS" with
 * both outputs on one line each, cut to 120 bytes) and a summary line. 0, or KVM_ENOMEM. */
int kvm_trace_view_replay(const kvm_replay_t *r, char **text);

/* ---- export ------------------------------------------------------------------------------------------ */

/* What kvm_trace_export writes (docs/trace-format.md, "Export"). */
typedef enum kvm_trace_format {
    KVM_TRACE_FORMAT_OTLP_JSON = 1, /* "otlp-json": OTLP/JSON spans after the OpenTelemetry GenAI conventions */
    KVM_TRACE_FORMAT_WHOWHEN,       /* "whowhen": the Who&When conversation format (history = blame's steps) */
    KVM_TRACE_FORMAT_JSONL,         /* "jsonl": the complete records as stored, one per line */
} kvm_trace_format_t;

/* How much message content an OTLP export carries (gen_ai.input.messages / gen_ai.output.messages,
 * gen_ai.tool.call.result). */
typedef enum kvm_trace_content {
    KVM_TRACE_CONTENT_TRUNCATED = 0, /* each message cut to content_max bytes (default) */
    KVM_TRACE_CONTENT_NONE,          /* no content attributes */
    KVM_TRACE_CONTENT_FULL,          /* whole */
} kvm_trace_content_t;

typedef struct kvm_trace_export_params {
    int format;          /* kvm_trace_format_t (KVM_TRACE_FORMAT_OTLP_JSON) */
    int content;         /* kvm_trace_content_t (KVM_TRACE_CONTENT_TRUNCATED) */
    size_t content_max;  /* bytes per message when truncated (4096); cut on a UTF-8 character boundary */
} kvm_trace_export_params_t;

kvm_trace_export_params_t kvm_trace_export_default_params(void);
/* "otlp-json" | "whowhen" | "jsonl" as a kvm_trace_format_t; KVM_EINVAL (message naming the choices) otherwise. */
int kvm_trace_format_from_name(const char *name);
/* The name of a kvm_trace_format_t ("otlp-json", ...); NULL for an unknown one. */
const char *kvm_trace_format_name(int format);
/* Exports a run's trace (a run directory or its events.jsonl), read through the same reader as the views: only
 * complete records (a torn last line is skipped), a bad line KVM_EFORMAT naming path:line. *text (freed with
 * kvm_free) is UTF-8 ending in '\n', *len (may be NULL) its length. otlp-json: one JSON document, trace id = run
 * id, one span for the run, one per step (invoke_agent, execute_tool, or kvmesh.func; an agent call made with
 * ctx:call under its func / tool node's span) and one chat span under each agent step; span ids are derived from
 * the run id, so the same trace always exports the same text. whowhen: one JSON document whose history[i] is step i
 * of kvm_failure_from_trace. otlp-json and whowhen need the trace's run.start (else KVM_EFORMAT). params NULL =
 * the defaults. 0 or KVM_E*, *text then NULL. */
int kvm_trace_export(const char *run_dir, const kvm_trace_export_params_t *params, char **text, size_t *len);

/* ================================================================================================
 * Failure attribution: the error-schema cache and blame (docs/correct.md; spec: CORRECT, arXiv:2509.24088)
 * ================================================================================================
 * A failed run is seen as a list of steps (Who&When convention: step t = the t-th message of the run's shared
 * conversation, 0-based; a kvmesh trace's step 0 is the task, its inputs). Blame names the agent and the step of
 * the decisive mistake: a deterministic triage (no LLM) helped by an error-schema cache that keeps a structured
 * signature of every labelled failure and retrieves those of similar past failures (TF-IDF, MinHash,
 * structural keys). */

/* One step of a failure. Strings are borrowed (the caller's, valid during the call). */
typedef struct kvm_failure_step {
    const char *agent;    /* the raw agent label ("Orchestrator (thought)"); normalised inside */
    const char *content;  /* what the step said (NULL = "") */
    bool tool_result;     /* the output of a tool / code executor, not an agent turn */
    bool error;           /* the step failed (status error) */
} kvm_failure_step_t;

typedef struct kvm_failure {
    const char *id;         /* the trace's id (run id, file name): an entry is never retrieved for itself */
    const char *family;     /* task family: entries of one family are never retrieved for each other; NULL = none */
    const char *question;   /* the task (NULL = "") */
    const kvm_failure_step_t *steps;
    int n_steps;
    const char *gold_agent; /* the label, when known: the responsible agent and its step; NULL / -1 = unlabelled */
    int gold_step;
    bool human_label;       /* labelled by a person: the entry is never evicted */
} kvm_failure_t;

/* Reads a run's trace (a run directory) as a failure: step 0 = the task (the run's inputs, agent "user"), then
 * one step per traced step in order (agent steps under the agent's name, func / tool nodes as tool results
 * under the node's name, a failed step's error as its content). id = the run id, question = the inputs. Free
 * with kvm_failure_free(). NULL + message when the trace cannot be read or has no run.start. */
kvm_failure_t *kvm_failure_from_trace(const char *run_dir);
void kvm_failure_free(kvm_failure_t *f);

typedef struct kvm_schema_cache kvm_schema_cache_t;

typedef struct kvm_schema_cache_params {
    int max_entries;      /* eviction above this many live entries (4096) */
    size_t max_bytes;     /* ... or above this many bytes of entries (64 MiB) */
    int bruteforce_max;   /* up to this many live entries a query scores every one; above, MinHash-LSH and
                             error-template candidates, at most 512 (4096) */
    int tfidf_max_terms;  /* terms kept per entry (the vector keeps half of them); 0 = no cut (512) */
} kvm_schema_cache_params_t;

kvm_schema_cache_params_t kvm_schema_cache_default_params(void);

/* Opens the cache kept in dir/schemas.snap (dir NULL: in memory only, never saved). A missing file is an empty
 * cache; a damaged one (torn, bad checksum, foreign) is set aside as schemas.snap.bad, said in the log, and the
 * cache starts empty. NULL + message on bad params or no memory. Free with kvm_schema_cache_free() (which
 * does not save). One thread at a time. */
kvm_schema_cache_t *kvm_schema_cache_open(const char *dir, const kvm_schema_cache_params_t *params);
void kvm_schema_cache_free(kvm_schema_cache_t *c);
/* Writes dir/schemas.snap crash-safely (temp file, fsync, rename, fsync of dir). 0 without a dir. */
int kvm_schema_cache_save(kvm_schema_cache_t *c);
/* Inserts a labelled failure (gold_agent and gold_step set; gold_step in [0, n_steps)): merged into a near-
 * duplicate entry, a new entry of a known group, or a new group (docs/correct.md); then evicts over the
 * limits. bulk: one new entry, no merge, no eviction (evaluations). Returns the id of the entry that holds it
 * (>= 0), or <0 (KVM_EINVAL for an unlabelled or malformed failure). */
int kvm_schema_cache_insert(kvm_schema_cache_t *c, const kvm_failure_t *f, bool bulk);
/* Live entries, groups and bytes. */
typedef struct kvm_schema_cache_stats {
    int entries, groups, tombstones;
    size_t bytes;
    long queries;
    bool over_limits; /* only pinned / human-labelled entries are left and they exceed the limits */
} kvm_schema_cache_stats_t;
void kvm_schema_cache_stats(const kvm_schema_cache_t *c, kvm_schema_cache_stats_t *out);
/* Entry ids (live, ascending) into ids[cap]; returns how many there are. */
int kvm_schema_cache_ids(const kvm_schema_cache_t *c, int *ids, int cap);
/* Entry id as JSON text (its signature, gold label, support, stats and stub text); freed with kvm_free. NULL +
 * KVM_ENOENT for an unknown id. */
char *kvm_schema_cache_entry_json(const kvm_schema_cache_t *c, int id);
/* Sets the LLM-written text of an entry (correct.md §3.2; kvm_schema_distill writes it with a judge model): scrubbed
 * (<think>...</think> removed, non-ASCII bytes made spaces, cut at 6,144 bytes), kept beside the structured signature,
 * shown by kvm_schema_cache_entry_json ("text": {"body", "model", "stub": false}), saved with the cache, and its terms
 * added to the entry's TF-IDF keys (retrieval reads it). It replaces an earlier text; NULL (or a text empty after the
 * scrub) removes it (the stub rendered from the signature stands again). model: who wrote it (NULL = unnamed).
 * KVM_ENOENT for an unknown id. */
int kvm_schema_cache_set_text(kvm_schema_cache_t *c, int id, const char *text, const char *model);
/* The entry's LLM-written text (kvm_free), NULL when it has none (kvm_errcode() 0) or for an unknown id (KVM_ENOENT). */
char *kvm_schema_cache_text(const kvm_schema_cache_t *c, int id);
/* Pins (never evicted) or unpins an entry. KVM_ENOENT for an unknown id. */
int kvm_schema_cache_pin(kvm_schema_cache_t *c, int id, bool pinned);
/* Evicts an entry now (as the limits would: its id stays a tombstone). KVM_ENOENT for an unknown or evicted id,
 * KVM_EBUSY for a pinned one (unpin it first). */
int kvm_schema_cache_evict(kvm_schema_cache_t *c, int id);

typedef enum kvm_blame_method {
    KVM_BLAME_TRIAGE = 0, /* deterministic triage over the retrieved schemata (the default) */
    KVM_BLAME_KNN,        /* label transfer from the nearest entries (correct.md §9.3) */
    KVM_BLAME_PRIOR,      /* the most active agent (not a tool / the user), its first step: a baseline */
} kvm_blame_method_t;

typedef enum kvm_blame_retriever {
    KVM_RETRIEVE_COMBINED = 0, /* S = .55 TF-IDF + .20 MinHash + .15 structure + .10 error template */
    KVM_RETRIEVE_TFIDF,        /* one similarity alone (KVM_BLAME_KNN evaluations) */
    KVM_RETRIEVE_MINHASH,
    KVM_RETRIEVE_STRUCT,
} kvm_blame_retriever_t;

typedef struct kvm_blame_params {
    int k;                       /* schemata retrieved (5) */
    kvm_blame_method_t method;
    kvm_blame_retriever_t retriever;
    bool count_hit;              /* the query counts as a cache hit for the retrieved entries (true) */
} kvm_blame_params_t;

kvm_blame_params_t kvm_blame_default_params(void);

#define KVM_BLAME_MAX_CAND 3
#define KVM_BLAME_MAX_K 16
typedef struct kvm_blame {
    int step;                          /* the decisive step, 0-based (-1 when the failure has no eligible step) */
    char agent[64];                    /* its agent, normalised */
    int n_cand;                        /* candidates, best first */
    struct {
        int step;
        char agent[64];
        double score;
        char evidence[256];
    } cand[KVM_BLAME_MAX_CAND];
    int n_schemata;                    /* retrieved entries, best first */
    int schema_ids[KVM_BLAME_MAX_K];
    double schema_scores[KVM_BLAME_MAX_K];
} kvm_blame_t;

/* Localises the decisive mistake of f (its label, if any, is ignored) with the cache's help (c may be NULL:
 * no schemata). 0, or KVM_EINVAL for a malformed failure / params, KVM_ENOMEM. */
int kvm_blame(kvm_schema_cache_t *c, const kvm_failure_t *f, const kvm_blame_params_t *params, kvm_blame_t *out);
/* Feedback once the cause of a failure is confirmed (a label, a replay): each entry blame showed for it (shown, as
 * kvm_blame filled it) counts as helpful when its gold agent class is the confirmed agent or it holds the error
 * template of the confirmed step, else as misleading (eviction keeps helpful entries longer). Entries evicted
 * since are skipped. Returns how many were helpful (>= 0), or KVM_EINVAL for an unlabelled failure. */
int kvm_schema_cache_feedback(kvm_schema_cache_t *c, const kvm_blame_t *shown, const kvm_failure_t *confirmed);
/* The normalised agent name of a raw label (a trailing "(...)" removed, trimmed, ASCII lower case) into
 * out[cap]. */
void kvm_agent_normalize(const char *raw, char *out, size_t cap);

/* The LLM-written text of a schema (correct.md §3.2): a judge model (any model kvm_model_load opens, e.g. a bundled
 * one; a tiny model writes poor text) is shown a bounded prompt (the instruction, the task, the label, the transcript as
 * "Step i: agent: content" cut to max_prompt_bytes, then cut further until it fits the model's context beside the
 * answer) and writes at most max_tokens; its answer, scrubbed, becomes the entry's text (kvm_schema_cache_set_text). */
typedef struct kvm_judge_params {
    int max_tokens;          /* the answer's tokens at most (512; 1..4096; at most half the judge's context) */
    size_t max_prompt_bytes; /* the transcript's bytes in the prompt at most (8192; 256..1 MiB) */
    float temperature;       /* 0.7 (correct.md §3.2); 0 = greedy */
    float top_p;             /* 0.95 */
    uint64_t seed;           /* sampling seed (0: derived from the failure); a sample that leaves nothing after the
                                scrub is drawn again with the next seeds, 3 samples at most */
} kvm_judge_params_t;

kvm_judge_params_t kvm_judge_default_params(void);
/* Has judge write the text of cache entry id from f, the failure it holds, labelled (gold_agent, gold_step). Runs the
 * model to its end in the calling thread (CPU models: seconds). 0; KVM_EINVAL for an unlabelled failure or bad
 * params, KVM_ENOENT for an unknown id, or the model's error (named). */
int kvm_schema_distill(kvm_schema_cache_t *c, int id, const kvm_failure_t *f, kvm_model_t *judge, const kvm_judge_params_t *params);

/* Verifying blame by replay (docs/correct.md, "Verify by replay"): the top candidates of a blame (then the other agent
 * steps in order; func / tool steps skipped), as many as the budget, are replayed earliest first, each step generated
 * again (a fresh sampling seed, the KV policy kv) with the steps before it given their recorded outputs
 * (kvm_run_params_t.replay); the first whose replay passes is the confirmed decisive step. A
 * run passes when it ended ok and g:score(result, inputs) >= pass_score (a graph without g:score: when it ended ok).
 * A control replay first re-makes the run from its recorded outputs alone (no model work, not counted in the
 * budget): when it passes, the run did not fail and nothing is replayed. */
typedef struct kvm_verify_params {
    int budget;          /* candidate replays at most (3); candidates beyond blame's come in step order */
    double pass_score;   /* 1.0 */
    const char *kv;      /* the policy a candidate step is generated again under ("dense"; NULL = the recorded one) */
    uint64_t seed;       /* the fresh sampling seeds derive from it (0: from the run id) */
    kvm_model_t *judge;  /* with a cache: the confirmed failure's text is written by this model (kvm_schema_distill);
                            NULL = the runtime's judge (kvm_runtime_params_t.judge_model), if any */
    const kvm_judge_params_t *judge_params; /* NULL = kvm_judge_default_params() */
    double timeout_ms;   /* > 0: verify ends within about this long (a daemon's request deadline): no replay starts
                            after it, and the replay going then is canceled (KVM_ETIMEDOUT, not passed) and stepped to its
                            end; 0 = none (kvm_workflow_drive runs each replay to its end) */
} kvm_verify_params_t;

kvm_verify_params_t kvm_verify_default_params(void);

#define KVM_VERIFY_MAX 16
typedef struct kvm_verify_replay {
    int step;            /* the step generated again (blame's numbering: 0 = the task) */
    char agent[64];
    uint64_t seed;       /* its sampling seed in the replay */
    int status;          /* the replay's end: 0 or KVM_E* */
    bool scored;         /* the graph has g:score and it ran */
    double score;
    bool passed;
    char run_dir[512];   /* the replay's trace ("" without tracing) */
} kvm_verify_replay_t;

typedef struct kvm_verify {
    kvm_verify_replay_t control; /* the run re-made from its recorded outputs (step -1) */
    int n_replays;
    kvm_verify_replay_t replay[KVM_VERIFY_MAX];
    int step;            /* the confirmed decisive step (blame's numbering), -1 when no replay passed */
    char agent[64];      /* its agent, normalised */
    int schema_id;       /* the cache entry the confirmed failure went into (-1: none, or no cache) */
    bool timed_out;      /* timeout_ms passed: a replay was canceled or not started */
    bool distilled;      /* the judge wrote that entry's text */
    int judge_status;    /* 0, or why the judge could not (the confirmation stands; the entry keeps its stub) */
    char judge_error[256];
} kvm_verify_t;

/* Verifies blame b of the run traced in run_dir (f: kvm_failure_from_trace(run_dir)) by replays on rt (its models
 * and host functions; replays are traced under its trace_root). With a cache c, a confirmed failure gets its
 * feedback and goes in (as a label does; the caller saves). 0 (out filled, out->step -1 when nothing flipped the
 * run), or KVM_E* when the trace cannot be replayed (named). */
int kvm_blame_verify(kvm_runtime_t *rt, kvm_schema_cache_t *c, const char *run_dir, const kvm_failure_t *f, const kvm_blame_t *b,
                     const kvm_verify_params_t *params, kvm_verify_t *out);

/* The runtime's error-schema cache: opened on its state_dir (or in memory), shared by every run of the
 * runtime, saved by kvm_runtime_save_state. NULL + message when it cannot be opened. */
kvm_schema_cache_t *kvm_runtime_schema_cache(kvm_runtime_t *rt);
/* The runtime's judge model (kvm_runtime_params_t.judge_model), loaded on first use and kept until kvm_runtime_free.
 * NULL with kvm_errcode() 0 when none is configured, or NULL + a message naming the path when it cannot be loaded
 * (tried again at the next call). */
kvm_model_t *kvm_runtime_judge(kvm_runtime_t *rt);

/* ================================================================================================
 * The daemon: a runtime served over ZeroMQ (docs/protocol.md, `kvmesh serve`)
 * ================================================================================================ */

typedef struct kvm_server kvm_server_t;

typedef struct kvm_server_params {
    const char *bind;            /* requests and replies (ROUTER); default "tcp://127.0.0.1:5555"; a port "*" picks
                                    a free one (kvm_server_endpoint tells which) */
    const char *events;          /* events (XPUB); default "tcp://127.0.0.1:5556"; NULL = no event socket */
    bool allow_public;           /* permit a non-loopback tcp:// bind without CURVE (refused otherwise) */
    const char *curve_secret_file; /* CURVE: the server's secret key (40 Z85 characters, file mode 0600); NULL =
                                    no CURVE. Then a non-loopback bind is allowed */
    const char *curve_allow_file;  /* CURVE: the client public keys admitted (Z85, one per line, '#' comments) */
    size_t max_message_bytes;    /* one request, all frames (default 16 MiB; larger: structured error) */
    size_t max_source_bytes;     /* a workflow's Lua source (default 1 MiB) */
    int max_runs;                /* runs going at once, all clients (default 256; more: KVM_EBUSY) */
    int max_runs_per_client;     /* runs going at once per client (default 16) */
    int client_timeout_ms;       /* a client with runs going that sends nothing this long loses them (3000) */
    int idle_client_ms;          /* a client with nothing going is forgotten after this long (60000) */
    int hwm;                     /* ZeroMQ high-water marks (default 10000) */
    int client_queue;            /* replies queued for a client whose pipe is full (4096), then KVM_ESLOWCLIENT */
    int drain_ms;                /* after kvm_server_stop: how long runs going may take to end (30000) */
    int keep_runs;               /* ended runs remembered for run.status / run.list / trace.get (10000) */
    int recycle_runs;            /* after this many runs a workflow is loaded afresh for new runs and the old
                                    instance (which keeps every run it started) freed when its runs end, so that
                                    memory stays flat (default 1000; 0 = never) */
    int save_state_ms;           /* with the runtime's state_dir (docs/state.md): what it learned is saved this
                                    often while new runs come (default 60000; 0 = only when the server ends), and
                                    always when kvm_server_run returns */
    bool quiet;                  /* no progress on stderr */
} kvm_server_params_t;

kvm_server_params_t kvm_server_default_params(void);

/* Binds the sockets and serves rt (not owned; free it after the server). NULL + message on a bad parameter or
 * endpoint. One thread: create, run and free it on the same one. */
kvm_server_t *kvm_server_create(kvm_runtime_t *rt, const kvm_server_params_t *params);
/* Loads a workflow file into the server under name (what run.start names), as workflow.load does with a
 * source. KVM_EINVAL for a bad or taken name, or the load's error. */
int kvm_server_load_workflow(kvm_server_t *s, const char *name, const char *path);
/* The bound address of the requests (events = false) or events socket; "" for none. */
const char *kvm_server_endpoint(const kvm_server_t *s, bool events);
/* Serves until kvm_server_stop: requests, runs (kvm_runtime_step between reads), events. Then drains: no new
 * run starts, runs going get drain_ms to end (the rest are canceled), and it returns 0 (<0: a socket error). */
int kvm_server_run(kvm_server_t *s);
/* Asks kvm_server_run to drain and return. Async-signal-safe (a SIGTERM handler calls it). */
void kvm_server_stop(kvm_server_t *s);
/* Frees the server and the workflows it loaded (its runs canceled). */
void kvm_server_free(kvm_server_t *s);

#ifdef __cplusplus
}
#endif

#endif
