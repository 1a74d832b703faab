/* prompt.h - prompt assembly over the shared KV store: the caller says WHAT an agent reads, kv/ + comm/
 * decide HOW its cache is built (dense, exact prefix, KVCOMM).  (L3)
 *
 * Objects (one set per model; everything is single-threaded per kvm_comm_t):
 *
 *   kvm_comm_t          the context: model, KV store (pool + prefix index + segments), KVCOMM anchor
 *                       pools (one per placeholder name), switches (kvm_kvcomm_config_t).
 *   kvm_template_t      one agent's template record (kvcomm.md §2.2): system text + a user message made
 *                       of fixed text pieces and placeholders, rendered in the model's chat format,
 *                       each text piece tokenized separately and prefilled once; validated at creation.
 *   kvm_segment_t       (kv/store.h) an immutable KV span with its token ids: user input, tool result,
 *                       state value, another agent's response. Bound to placeholders at request time.
 *   kvm_comm_request_t  one request (one run of the graph / one user question): anchor changes made
 *                       while it runs are staged and committed by kvm_comm_request_end().
 *   kvm_prepared_t      the result of assembling one prompt: a seq whose cache holds all but the last
 *                       prompt token(s), the remaining tokens to run, and the per-request report.
 *
 * One agent step (the agents layer):
 *
 *     kvm_comm_request_t *rq = kvm_comm_request_begin(comm, run_id);
 *     kvm_segment_t *in = NULL;
 *     kvm_comm_segment_text(comm, KVM_PRODUCER_INPUT, "input", question, strlen(question), &in);
 *     kvm_binding_t b[] = { { "input", in }, { "agent:planner:current", planner_out } };
 *     kvm_prompt_t p = { .tmpl = coder_tmpl, .bindings = b, .n_bindings = 2, .policy = KVM_KV_KVCOMM };
 *     kvm_prepared_t prep;
 *     kvm_comm_prepare(rq, &p, &prep);                       // prep.report says what was reused
 *     kvm_generate(model, &prep.seq, prep.rest_ids, prep.n_rest, &gp, cb, ud, &res);
 *     kvm_segment_t *coder_out = NULL;
 *     kvm_comm_complete(rq, &prep, &res, &coder_out);        // deltas (DENSE), prefix index, response segment
 *     kvm_prepared_release(&prep);
 *     ...
 *     kvm_comm_request_end(rq);                              // commit staged anchors
 *
 * Errors: functions return 0 or a negative KVM_E* code with a message (kvm_errmsg()); KVM_ENOMEM when
 * the KV budget cannot hold a request even after evicting unreferenced segments (nothing is changed),
 * KVM_EMODEL for a segment of another model, KVM_EFRAME for a segment in an unexpected frame,
 * KVM_EINVAL for a bad template or a missing binding. */
#ifndef KVM_COMM_PROMPT_H
#define KVM_COMM_PROMPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../kv/store.h"
#include "../model/generate.h"

/* ---- switches (kvcomm.md §8 "Ablation switches") ------------------------------------------------ */

enum kvm_kvcomm_weights { KVM_KVCOMM_W_L2 = 0, KVM_KVCOMM_W_NEAREST = 1 };
enum kvm_kvcomm_criterion { KVM_KVCOMM_CRIT_LENGTH_ENTROPY = 0, KVM_KVCOMM_CRIT_LENGTH = 1 };
enum kvm_kvcomm_dist_norm { KVM_KVCOMM_DIST_RAW = 0, KVM_KVCOMM_DIST_PER_ELEMENT = 1 };
enum kvm_kvcomm_pool_bound { KVM_KVCOMM_POOL_STRICT = 0, KVM_KVCOMM_POOL_REFERENCE = 1 };
enum kvm_kvcomm_no_anchor { KVM_KVCOMM_NOANCHOR_DENSE = 0, KVM_KVCOMM_NOANCHOR_NAIVE = 1 };
enum kvm_kvcomm_resp_last { KVM_KVCOMM_RESP_COMPUTE = 0, KVM_KVCOMM_RESP_DROP = 1 };

typedef struct kvm_kvcomm_config {
    bool enable;           /* kvcomm.enable: off = every placeholder dense ("Original") */
    bool rotate;           /* kvcomm.rotate: re-rotate keys to their new position */
    bool ph_offset;        /* kvcomm.ph_offset: add the placeholder offset */
    bool pf_offset;        /* kvcomm.pf_offset: add the text-segment (prefix) offset */
    int weights;           /* kvcomm.weights: l2 | nearest */
    int criterion;         /* kvcomm.criterion: length+entropy | length */
    float gamma;           /* kvcomm.gamma (0.3) */
    int max_anchors;       /* kvcomm.max_anchors, V (20; at most KVM_KVCOMM_MAX_ANCHORS - 1, the ops' limit) */
    int evict_window;      /* kvcomm.evict_window, W (5) */
    int dist_norm;         /* kvcomm.dist_norm: raw | per_element */
    int pool_bound;        /* kvcomm.pool_bound: strict | reference */
    int no_anchor;         /* kvcomm.no_anchor: dense | naive */
    int resp_last_token;   /* kvcomm.resp_last_token: compute | drop */
    bool force_reuse;      /* kvcomm.force_reuse: SHARE whenever >= 2 eligible anchors exist */
    size_t anchor_budget_bytes; /* host bytes all anchor pools may hold (0 = unlimited) */
    /* segment headers (kvcomm.md §2.3): lead-in text after the user-role header, per producer kind */
    const char *lead_input, *lead_tool, *lead_state; /* NULL = "The task is:\n\n", "Tool result:\n\n", "Value:\n\n" */
    /* kvcomm.recompute_below [our design, not in the spec]: in a REUSE prompt, a shared placeholder of fewer
     * than this many tokens and the text segment after it are recomputed (in place, behind the assembled KV)
     * instead of offset-corrected, by kvm_comm_prepare's recompute pass. 0 (default) = the spec. */
    int recompute_below;
    /* kvcomm.recompute_text [ours]: the text segment after a shared placeholder, if shorter than this many
     * tokens, is recomputed instead of offset-corrected (the same pass). 0 (default) = the spec. */
    int recompute_text;
    /* kvcomm.recompute_frac [ours, after CacheBlend's selective recompute]: this fraction (0..1) of the
     * offset-corrected placeholder rows of a REUSE prompt, those where the anchors' deltas disagree most around
     * the estimate (the weighted spread, kvcomm_spread), is recomputed in the same pass (each row attends to the
     * assembled cache up to its position, and to the other recomputed rows). 0 (default) = the spec. */
    float recompute_frac;
} kvm_kvcomm_config_t;

/* Fills the defaults of kvcomm.md §3.10 (enable, rotate, both offsets, l2, length+entropy, γ 0.3, V 20,
 * W 5, raw, strict, dense, compute). */
void kvm_kvcomm_config_default(kvm_kvcomm_config_t *c);
/* kvcomm.preset=blend [ours, kvcomm.md §5.2]: full KVCOMM, recompute_below 8, recompute_text 64 and this
 * recompute_frac. kvcomm.preset=spec restores the defaults. */
#define KVM_KVCOMM_BLEND_FRAC 0.5f

/* Sets one switch by its documented name ("kvcomm.gamma", "gamma", ...) from text ("0.3", "on", "l2",
 * "strict", ...); the key "ablation" applies kvm_kvcomm_ablation. KVM_EINVAL names the key and the accepted
 * values (also for the switches that were removed:
 * kvcomm.frame, kvcomm.align, kvcomm.recompute_select, weights=cosine; kvcomm.md §3). */
int kvm_kvcomm_config_set(kvm_kvcomm_config_t *c, const char *key, const char *value);
/* Applies a named ablation of the paper's Tab. 5: "rotation" (rotation only = naive reuse),
 * "rotation+ph" (rotation + placeholder offset), "rotation+pf", "full" (all three), "dense" (enable off). */
int kvm_kvcomm_ablation(kvm_kvcomm_config_t *c, const char *name);
/* One line "enable=on rotate=on ph_offset=on ... gamma=0.30 V=20" for traces. */
void kvm_kvcomm_config_str(const kvm_kvcomm_config_t *c, char *buf, size_t cap);

/* ---- context -------------------------------------------------------------------------------------- */

typedef struct kvm_comm kvm_comm_t;

typedef struct kvm_comm_opts {
    size_t kv_budget_bytes;     /* pool size (0 = the model's default: 4 full contexts) */
    kvm_kvcomm_config_t kvcomm; /* if kvcomm_set is false, defaults */
    bool kvcomm_set;
} kvm_comm_opts_t;

/* Creates the comm context of model m: a KV pool of the budget on m's backend, a store over it, empty
 * anchor pools. m must outlive it. NULL + message on error. Free with kvm_comm_free() after every
 * template, segment, request and prepared prompt made from it has been released. */
kvm_comm_t *kvm_comm_create(kvm_model_t *m, const kvm_comm_opts_t *opts);
void kvm_comm_free(kvm_comm_t *c);
kvm_kv_store_t *kvm_comm_store(kvm_comm_t *c);
kvm_model_t *kvm_comm_model(kvm_comm_t *c);
/* The live switches; changes apply from the next kvm_comm_prepare(). */
kvm_kvcomm_config_t *kvm_comm_config(kvm_comm_t *c);

/* ---- templates (kvcomm.md §2.2) --------------------------------------------------------------------- */

typedef enum kvm_piece_kind { KVM_PIECE_TEXT = 0, KVM_PIECE_PLACEHOLDER = 1 } kvm_piece_kind_t;

/* A piece of an agent's user message: fixed text, or a placeholder NAME in KVCOMM form ("input",
 * "tool:<name>", "agent:<name>:current", "agent:<name>:prev", "state:<key>"). Each name has one
 * anchor pool shared by every template that contains it. */
typedef struct kvm_piece {
    kvm_piece_kind_t kind;
    const char *text; /* TEXT: the text; PLACEHOLDER: the name */
    /* TEXT pieces of a raw template may give token ids instead of text (models without a tokenizer,
     * benchmarks): then text may be NULL and the ids are used as they are. */
    const int32_t *ids;
    int n_ids;
} kvm_piece_t;

typedef struct kvm_template_desc {
    const char *agent;         /* consumer id (the agent's name; deltas are stored per consumer) */
    const char *system;        /* role text (system message); NULL or "" = none */
    const kvm_piece_t *pieces; /* the user message */
    int n_pieces;
    bool raw;                  /* false (default): render with the model's chat format (or plain
                                  concatenation for models without one) and append the assistant
                                  header; true: the pieces are the whole prompt text as is */
} kvm_template_desc_t;

typedef struct kvm_template kvm_template_t;

/* Builds the template record: renders, splits at placeholders, tokenizes each text piece on its own
 * (BOS on the first when the model adds one; special-token strings parsed), prefills the whole
 * template once with a dummy in each placeholder, keeps the text segments (segment 0 as an exact
 * prefix, the others re-based to F0) and records the spans and template_hash.
 * Rejected with KVM_EINVAL (message names the piece): no pieces, a placeholder first in a raw
 * template, two placeholders without text between them, a whitespace-only or empty text piece, a
 * placeholder without text after it, a bad placeholder name, more than KVM_COMM_MAX_PH placeholders.
 * NULL + message on error; free with kvm_template_free(). */
kvm_template_t *kvm_template_create(kvm_comm_t *c, const kvm_template_desc_t *d);
void kvm_template_free(kvm_template_t *t);
int kvm_template_n_placeholders(const kvm_template_t *t);
const char *kvm_template_placeholder(const kvm_template_t *t, int i);
uint64_t kvm_template_hash(const kvm_template_t *t);
int kvm_template_n_tokens(const kvm_template_t *t); /* with the dummies */
const char *kvm_template_agent(const kvm_template_t *t);

/* Parses template text in the one grammar of template_parse.h ("Task: {input}\nPlan:\n{agent.planner}\n...")
 * into pieces with KVCOMM names: {input} -> input, {input.k} -> state:input.k, {agent.x} -> agent:x:current,
 * {agent.x.prev} -> agent:x:prev, {tool.x} -> tool:x, {state.k} -> state:k. "{{" and "}}" are literal
 * braces. *pieces (one allocation holding the strings too) is freed with kvm_free. KVM_EINVAL names the
 * offset of a malformed or unknown placeholder. Implemented in template_parse.c. */
int kvm_template_parse(const char *text, kvm_piece_t **pieces, int *n_pieces);

/* ---- segments of shared content (kvcomm.md §2.3) -------------------------------------------------- */

/* Computes the base KV of user input / a tool result / a state value / fixed text: prefills
 * header ++ content (header = BOS + user-role header + lead-in for INPUT/TOOL/STATE; BOS only for
 * TEXT), keeps the content rows, re-bases them to F0 (shift by -drop_num) and publishes the segment
 * (one reference for the caller). The content ids are the tail of the joint tokenization when it
 * splits cleanly at the header, else the content tokenized alone (logged as tokenization_boundary). */
int kvm_comm_segment_text(kvm_comm_t *c, kvm_producer_kind_t kind, const char *producer_id, const char *text,
                          size_t len, kvm_segment_t **out);

/* The same from token ids (models without a tokenizer, benchmarks): prefills header ++ content and
 * keeps the content rows, re-based to F0. n_header may be 0 (then the content sits at position 0). */
int kvm_comm_segment_ids(kvm_comm_t *c, kvm_producer_kind_t kind, const char *producer_id, const int32_t *header,
                         int n_header, const int32_t *content, int n_content, kvm_segment_t **out);

/* ---- requests ---------------------------------------------------------------------------------------- */

typedef struct kvm_comm_request kvm_comm_request_t;

/* Starts a request. Pools are read through a snapshot taken now; anchor creations and activation bumps
 * are staged. NULL + message on error. */
kvm_comm_request_t *kvm_comm_request_begin(kvm_comm_t *c, uint64_t request_id);
/* Commits the staged anchor changes (strict pool bound: bumps first, then inserts in creation order,
 * evicting the lowest activation among the W oldest when the pool holds >= V) and frees rq. */
int kvm_comm_request_end(kvm_comm_request_t *rq);
/* Discards the staged changes and frees rq. */
void kvm_comm_request_abort(kvm_comm_request_t *rq);

/* ---- prompt assembly ---------------------------------------------------------------------------------- */

/* kvm_kv_policy_t (KVM_KV_PREFIX = 0, the default: exact prefix hits only, the rest computed; KVM_KV_DENSE:
 * everything computed; KVM_KV_KVCOMM: exact prefix + KVCOMM for placeholders) is public: include/kvmesh.h. */

typedef struct kvm_binding {
    const char *name;   /* placeholder name as in the template */
    kvm_segment_t *seg; /* the content (not consumed: the caller keeps its reference) */
} kvm_binding_t;

typedef struct kvm_prompt {
    const kvm_template_t *tmpl;
    const kvm_binding_t *bindings; /* one per placeholder name of the template, any order */
    int n_bindings;
    kvm_kv_policy_t policy;
} kvm_prompt_t;

#define KVM_COMM_MAX_PH 16
#define KVM_COMM_NAME_MAX 64

enum kvm_comm_mode { KVM_COMM_DENSE = 0, KVM_COMM_REUSE = 1 };

/* What happened to one placeholder. */
enum kvm_ph_decision {
    KVM_PH_DENSE = 0,      /* computed (policy text/exact, or the agent ran DENSE) */
    KVM_PH_SHARED = 1,     /* KVCOMM: offsets from the anchor pool */
    KVM_PH_NEW_ANCHOR = 2, /* predicted new anchor: DENSE, deltas materialized for this consumer */
    KVM_PH_NO_ANCHOR = 3,  /* no usable anchor for this consumer: DENSE (no_anchor=dense), deltas filled */
    KVM_PH_NAIVE = 4,      /* shifted without offset (rotation-only ablation or no_anchor=naive) */
    KVM_PH_EXACT_CTX = 5,  /* producer context equals the consumer's: used as is (kvcomm.md §5) */
};
const char *kvm_ph_decision_name(int d);

typedef struct kvm_comm_ph_report {
    char name[KVM_COMM_NAME_MAX];
    uint64_t segment_id;
    uint64_t sample_key;   /* hash(request id, content ids) */
    int tokens;            /* content tokens */
    int start_pos;         /* where they sit in the prompt */
    int text_tokens;       /* tokens of the text segment after it */
    int decision;          /* enum kvm_ph_decision */
    bool predicted_new;    /* prediction result for (name, sample) in this request */
    int n_pool, n_eligible;/* anchors in the pool snapshot / eligible (T_a >= tokens and usable) */
    float entropy, threshold; /* of the prediction (bits); threshold = gamma * log2(|E|) */
    uint64_t top_anchor;   /* key of the anchor with the largest mean weight (0 if none) */
    float top_weight;
    bool materialized;     /* this consumer filled deltas of anchor (name, sample) */
} kvm_comm_ph_report_t;

typedef struct kvm_comm_report {
    int mode;              /* enum kvm_comm_mode */
    int policy;            /* kvm_kv_policy_t */
    int input_tokens;      /* prompt length N */
    /* a partition of the prompt (kvcomm.md §6): */
    int exact_tokens;      /* exact-prefix blocks and §5 hits */
    int offset_tokens;     /* placeholder and text segments under KVCOMM offsets */
    int naive_tokens;      /* shifted, no offset */
    int recomputed_tokens; /* computed by this invocation's forward passes, incl. the last prompt token */
    int fused_tokens;      /* C2C (0 here) */
    int n_placeholders;
    kvm_comm_ph_report_t ph[KVM_COMM_MAX_PH];
    double predict_ms, weights_ms, offset_ms, assemble_ms; /* "KVCOMM" time = sum */
    int anchors_staged;    /* new anchors this request staged so far (after this step) */
    uint64_t template_hash;
    int short_recomputed;  /* rows moved from offset/naive to recomputed by recompute_below / recompute_text */
    int selected_recomputed; /* rows moved from offset to recomputed by kvcomm.recompute_frac */
    int recompute_items;     /* batch items of the recompute pass: 1 (kvm_batch_item_t.positions), 0 without one */
} kvm_comm_report_t;

/* Writes the report as one JSON object (no newline) into buf; returns the length it needed. */
int kvm_comm_report_json(const kvm_comm_report_t *r, char *buf, size_t cap);

typedef struct kvm_prepared {
    kvm_seq_t seq;        /* KV of prompt tokens 0..n_cached-1, ready for kvm_generate */
    int n_cached;
    const int32_t *rest_ids; /* prompt tokens still to run (>= 1): pass to kvm_generate */
    int n_rest;
    int32_t *prompt_ids;  /* [n_prompt] the whole prompt (concatenated piece ids, never re-tokenized) */
    int n_prompt;
    kvm_comm_report_t report;
    void *priv;           /* comm/'s bookkeeping for kvm_comm_complete */
} kvm_prepared_t;

/* Assembles the prompt of p->tmpl with its bindings under p->policy and fills *out (zeroed first), in one call:
 *   TEXT:   out->seq is empty, rest = the whole prompt.
 *   EXACT:  the longest verified prefix from the prefix index (always < N), rest = the remainder.
 *   KVCOMM: segment 0 exact; placeholders and their following text segments by KVCOMM (kvcomm.md §3) on the
 *           backend's ops when every placeholder is shareable (REUSE: the cache holds N-1 tokens, rest = the last
 *           token; the recompute pass of kvcomm.recompute_below / recompute_text / recompute_frac has run, its rows
 *           counted in recomputed_tokens), else DENSE (like EXACT; kvm_comm_complete then fills the new anchors'
 *           deltas). On a backend that cannot run KVCOMM (kvm_comm_create logged why) KVCOMM prepares DENSE.
 * Checks every bound segment (KVM_EMODEL, KVM_EFRAME for frame != 0). On error *out is released. */
int kvm_comm_prepare(kvm_comm_request_t *rq, const kvm_prompt_t *p, kvm_prepared_t *out);

/* The same for a prompt given as ids (no template): EXACT or TEXT only. */
int kvm_comm_prepare_ids(kvm_comm_t *c, const int32_t *ids, int n, kvm_kv_policy_t policy, kvm_prepared_t *out);

/* After kvm_generate ran p->rest_ids on p->seq: registers exactly computed prompt blocks in the prefix
 * index, fills the deltas of new anchors for this consumer (DENSE), and, if response != NULL, publishes
 * the generated tokens as a segment (keys re-based to F0; the trailing token without KV is dropped, or
 * computed with one extra step when generation stopped on length and resp_last_token=compute) with
 * producer AGENT / the template's agent name, and returns it with one reference (NULL if no token has
 * KV). res may be NULL when nothing was generated (then no response). */
int kvm_comm_complete(kvm_comm_request_t *rq, kvm_prepared_t *p, const kvm_gen_result_t *res,
                      kvm_segment_t **response);
/* Frees the seq and buffers of p (idempotent). */
void kvm_prepared_release(kvm_prepared_t *p);

/* ---- statistics ------------------------------------------------------------------------------------ */

typedef struct kvm_comm_pool_stats {
    char name[KVM_COMM_NAME_MAX];
    int n_anchors;
    uint64_t created, evicted, predictions, predicted_new;
    size_t bytes;
} kvm_comm_pool_stats_t;

typedef struct kvm_comm_stats {
    uint64_t invocations, reuse_invocations;     /* reuse rate = reuse / invocations (paper §4.1) */
    uint64_t exact_tokens, offset_tokens, naive_tokens, recomputed_tokens, input_tokens;
    int n_pools;
    size_t anchor_bytes;
    uint64_t anchors_created, anchors_evicted;
} kvm_comm_stats_t;
void kvm_comm_stats(const kvm_comm_t *c, kvm_comm_stats_t *out);
/* Stats of pool i (0..n_pools-1); KVM_ERANGE past the end. */
int kvm_comm_pool_stats(const kvm_comm_t *c, int i, kvm_comm_pool_stats_t *out);

#endif
