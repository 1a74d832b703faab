/* llm.h - the agents layer's one door to the models: "run one agent step" (L4, internal).
 *
 * An agent step is a prompt given as pieces (fixed text, and placeholders bound to content with their
 * KVCOMM placeholder names) plus generation settings; its result is the output text, what the model
 * saw (rendered prompt and ids), how the prompt's KV was obtained (exact / offset / naive / recomputed
 * counts, kvcomm.md §6) and timings. Steps are submitted, advanced together by wf_llm_step() (one
 * forward pass per model per call: continuous batching across agents and runs) and collected with
 * wf_llm_take(). Every model path goes through kvm_model_load, runtime/comm (dense prefill; prefix or
 * KVCOMM reuse) and runtime/sched (decoding and its stop rules); "mock:echo" / "mock:fail" are models
 * too (runtime/model/mock_model.h: one word per token, no KV to reuse, so their steps run dense). */
#ifndef KVM_AGENTS_LLM_H
#define KVM_AGENTS_LLM_H

#include <stdbool.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "../runtime/model/generate.h"
#include "../runtime/trace/trace.h"

/* "dense" | "prefix" | "kvcomm" -> kvm_kv_policy_t (include/kvmesh.h); -1 if unknown or NULL. */
int wf_kv_policy_parse(const char *s);

typedef struct wf_piece {
    bool is_slot;        /* a placeholder bound to content (else fixed template text) */
    const char *name;    /* slots: the KVCOMM placeholder name ("input", "agent:planner:current", ...) */
    const char *text;    /* fixed text, or the slot's content */
} wf_piece_t;

/* A turn after the user message, for a model-driven tool-call continuation (wf_tools.c): "assistant" (what the model
 * wrote) or "user" (the tool responses), and its text. */
typedef struct wf_turn {
    const char *role;
    const char *content;
} wf_turn_t;

typedef struct wf_llm_req {
    int model;                   /* from wf_llm_model_open */
    const char *agent;           /* agent name (anchor pools, logs) */
    const char *run_id;
    const char *system;          /* role text, may be NULL */
    const wf_piece_t *pieces;    /* the user message, in order */
    int n_pieces;
    kvm_sampler_params_t sampling;
    int max_tokens;
    const char *const *stop;     /* stop strings */
    int n_stop;
    kvm_kv_policy_t kv;
    bool ignore_eos;             /* generate exactly max_tokens unless a stop string hits */
    uint64_t tag;                /* returned in the result */
    double timeout_ms;           /* > 0: the call fails with KVM_ETIMEDOUT once this long has passed since it was
                                    submitted (or retried), checked at every generated token; its KV goes back at once */
    uint64_t run_deadline_ns;    /* > 0: the run's wall-time budget ends then (kvm_now_ns clock): the call stops at the
                                    next token and fails with KVM_EBUDGET */
    int retry_max;               /* attempts after the first when the call fails with a status in retry_on */
    double retry_backoff_ms;     /* wait before retry k (1-based): retry_backoff_ms * 2^(k-1) */
    unsigned retry_on;           /* WF_RETRY_* bits */
    const wf_turn_t *turns;      /* turns after the user message (NULL = none): the prompt is rendered whole in the
                                    model's chat format (ChatML only) and run dense; the mock model answers the last */
    int n_turns;
    kvm_account_t *acct;         /* the memory account the step's allocations are charged to (its run's; NULL: none):
                                    the engine enters it while it copies, prepares and decodes the step, and fails the
                                    step with KVM_ELUA_MEMORY when an allocation would pass its cap */
    int c2c;                     /* 1 + a fuser index from wf_llm_c2c_open (0 = none): the prompt's placeholder
                                    c2c_section is prefilled by the sharer and fused into this model's cache (C2C, spec
                                    §5-6, docs/c2c.md); the step runs with the TEXT policy otherwise */
    const char *c2c_section;     /* that placeholder's KVCOMM name (as in wf_piece_t.name) */
    const char *given_text;      /* non-NULL: the step's output is this text, not generated (a replay's edited or
                                    recorded output): it completes at once, with no model work and no KV (kv.mode
                                    "given", the prompt rendered plain) */
    const int32_t *prompt_ids;   /* non-NULL: the prompt is these n_prompt_ids ids exactly (a client's generate request,
                                    kvm_runtime_generate): nothing rendered, system / pieces / turns unused, run dense or
                                    with exact prefix hits (kv KVM_KV_PREFIX); copied */
    int n_prompt_ids;
} wf_llm_req_t;

/* The failures a call can be retried on (wf_llm_req_t.retry_on). */
enum { WF_RETRY_TIMEOUT = 1u, WF_RETRY_KV = 2u, WF_RETRY_ERROR = 4u };

typedef struct wf_llm_kv {
    int exact, offset, naive, recomputed, fused; /* partition of the prompt tokens (kvcomm.md §6) */
    int anchors;                                 /* anchors used (kvcomm reuse) */
    char mode[16];                               /* "dense" | "prefix" | "reuse" */
} wf_llm_kv_t;

typedef struct wf_llm_result {
    uint64_t tag;
    int status;                  /* 0 or KVM_E*; error holds the message */
    char *error;
    char *text;                  /* output text (stop string removed) */
    int32_t *out_ids;            /* [n_out] output ids (stop id excluded) */
    int n_out;                   /* output tokens */
    int stop_reason;             /* enum kvm_stop_reason */
    char *prompt_text;           /* the prompt exactly as rendered for the model (chat markup included) */
    int32_t *prompt_ids;         /* [n_prompt] */
    int n_prompt;
    wf_llm_kv_t kv;
    cJSON *kv_detail;            /* per-placeholder decisions (owned; may be NULL) */
    double queue_ms, ttft_ms, decode_ms;
    int n_forward, batch_max_seqs, batch_max_rows;
    double batch_mean_seqs;
    int attempts;                /* 1 + the retries it took */
} wf_llm_result_t;

typedef struct wf_llm wf_llm_t;

typedef struct wf_llm_opts {
    kvm_model_params_t model; /* how models are loaded (backend, dtypes, threads); strings must outlive the engine */
    int max_rows;          /* tokens per forward pass (sched) */
    int max_active;        /* sequences in flight per model */
    size_t kv_bytes;       /* KV pool budget per model (0 = model default) */
    bool quiet;
    const char *const *kvcomm_set; /* "key=value" KVCOMM switches (kvcomm.md §8), applied to every model */
    int n_kvcomm_set;
    const char *kvcomm_ablation;   /* NULL, or "rotation" | "rotation+ph" | "rotation+pf" | "full" | "dense" */
    const char *state_dir;         /* anchors loaded from here when a model opens, saved here (NULL = none) */
    /* Called with each piece of a step's output text as it becomes final (from wf_llm_step), with the
     * step's tag, run and agent; non-zero stops that step (as a stop callback: KVM_STOP_CALLBACK). */
    int (*on_token)(void *ud, uint64_t tag, const char *run_id, const char *agent, int32_t id, const char *text,
                    size_t len);
    void *on_token_ud;
    double kv_wait_ms;     /* how long a step waits for KV memory while no step of its model finishes, before it
                              fails (<= 0: 300000) */
} wf_llm_opts_t;

/* Creates the engine (no models yet). NULL + message on error; free with wf_llm_free(). */
wf_llm_t *wf_llm_create(const wf_llm_opts_t *o);
void wf_llm_free(wf_llm_t *l);
/* Opens a model once per path (later calls with the same path share it) and returns its index. kvcomm[n_kvcomm]
 * (may be NULL) are the model's own "KEY=VALUE" KVCOMM switches (kvmesh.model{kvcomm = {...}}), applied over the
 * default policy (preset=blend) and under the engine's (wf_llm_opts_t.kvcomm_set, .kvcomm_ablation); a path that
 * is open already must come with the same resulting switches (KVM_EINVAL otherwise). On failure *idx tells what
 * failed: -1 nothing could be loaded from path (missing, unreadable, not a model: the message has the loader's
 * reason), -2 a model loaded but cannot serve agents (no tokenizer), -3 anything else (memory, settings). */
int wf_llm_model_open(wf_llm_t *l, const char *path, const char *const *kvcomm, int n_kvcomm, int *idx);
/* Opens the C2C fuser at path (<name>.c2c.json) for receiver model `receiver` and sharer model `sharer` (indices of
 * wf_llm_model_open), once per (path, receiver, sharer): every file check and the pairing checks against both models
 * (docs/c2c.md). *idx receives the index to pass (plus one) as wf_llm_req_t.c2c. 0 or KVM_E* with the message. */
int wf_llm_c2c_open(wf_llm_t *l, const char *path, int receiver, int sharer, int *idx);

/* Saves the anchors of every open model into the state folder (a no-op without one); wf_llm_free does it too.
 * 0, or the first error (the other models are still saved). */
int wf_llm_save_state(wf_llm_t *l);
/* A description of model idx for traces (path, engine, name, arch, layers, dim, vocab, chat format,
 * id, KVCOMM switches); index and script_path are the caller's to fill. Strings point into the engine
 * (valid while it lives) or into the buffers of *out. */
typedef struct wf_llm_model_info {
    kvm_trace_model_t t;
    char model_id[24], describe[512], kvcomm[512];
} wf_llm_model_info_t;
void wf_llm_model_describe(const wf_llm_t *l, int idx, wf_llm_model_info_t *out);
const char *wf_llm_model_name(const wf_llm_t *l, int idx);
/* The engine's model idx itself (kvm_runtime_generate encodes prompts and checks ids with it); NULL if out of range. */
const kvm_model_t *wf_llm_model(const wf_llm_t *l, int idx);
/* Queues a step. Pieces, strings and stop lists are copied. */
int wf_llm_submit(wf_llm_t *l, const wf_llm_req_t *r);
/* Advances all queued work by one forward pass per model. Returns the number of sequences advanced. */
int wf_llm_step(wf_llm_t *l);
/* Takes one finished step into *out (free with wf_llm_result_clear); 1 if taken, 0 if none. */
int wf_llm_take(wf_llm_t *l, wf_llm_result_t *out);
/* Steps submitted and not yet taken. */
int wf_llm_pending(const wf_llm_t *l);
void wf_llm_result_clear(wf_llm_result_t *r);
/* Abandons the steps of run_id: one waiting for KV completes now with KVM_ECANCELED; one in the scheduler
 * stops at its next token (a prompt being prefilled finishes its prefill first) and gives its KV back when
 * taken. Their results still come out of wf_llm_take. Returns how many steps were canceled. */
int wf_llm_cancel_run(wf_llm_t *l, const char *run_id);
/* Ends a run: commits its KVCOMM request (staged anchors) and drops the segments bound for it. */
int wf_llm_run_end(wf_llm_t *l, const char *run_id);
/* Forward passes and sequences run so far, over all models. */
void wf_llm_counters(const wf_llm_t *l, uint64_t *steps, uint64_t *seqs, int *max_seqs);
/* The engine's counters and, per model, its KV store and KVCOMM statistics, as a new JSON object
 * (cJSON_Delete); NULL on allocation failure. */
cJSON *wf_llm_stats_json(const wf_llm_t *l);

/* Renders the prompt text the way the engine does for a model without a tokenizer (mock, synthetic): system and
 * pieces joined as "<system>\n\n<pieces...>". Used by trace replay to check prompts. New string,
 * kvm_free. */
char *wf_llm_render_plain(const char *system, const wf_piece_t *pieces, int n);

#endif
