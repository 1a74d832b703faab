/* kvmesh_lab.h - what evaluation and research code needs below the public API (as lauxlib is to lua.h).
 *
 * include/kvmesh.h is the stable API; this second header exposes the layers under it for lab/ (minitasks, the
 * team workload, the benchmarks) and for research programs: the error setters, the seeded PRNG, KV pools and
 * sequences on a model, batched forward steps and generation on a sequence, the KVCOMM layer (comm context,
 * templates, segments, requests, prompt assembly, its report and statistics, the switches), the fidelity
 * oracle, and the CUDA backend's research switches and profiling hooks. It is UNSTABLE: anything here may change
 * with the library, without a KVM_API_VERSION bump. The library's internal headers include it for the types and
 * functions that moved here, so that each is defined once.
 *
 * Conventions are those of kvmesh.h: functions that can fail return 0 or a negative KVM_E* code and leave a
 * message (kvm_errmsg()); constructors return NULL and set it; memory the caller owns is freed with kvm_free();
 * an object and everything made from it belong to one thread at a time. Handles are opaque unless a by-value
 * struct is what the caller really needs (settings, reports, statistics, batch items).
 *
 * Implemented by libkvmesh, except kvm_comm_prepare_oracle (CMake target kvmesh_comm_lab). */
#ifndef KVMESH_LAB_H
#define KVMESH_LAB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <kvmesh.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define KVM_LAB_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define KVM_LAB_PRINTF(f, a)
#endif

/* ================================================================================================
 * Errors and time
 * ================================================================================================ */

/* Sets the calling thread's last error message (printf-style) and returns code, so that
 * `return kvm_seterr(KVM_EINVAL, "field '%s' ...", f);` reads well. */
int kvm_seterr(int code, const char *fmt, ...) KVM_LAB_PRINTF(2, 3);
/* Prepends "context: " to the current message (for adding file names as errors travel up); returns code. */
int kvm_errctx(int code, const char *fmt, ...) KVM_LAB_PRINTF(2, 3);
/* Monotonic time in nanoseconds. */
uint64_t kvm_now_ns(void);

/* ================================================================================================
 * The seeded PRNG: xoshiro256** (Blackman & Vigna) with its state filled by splitmix64
 *
 * It is the generator the minitasks data was made with, so its seeding (several words folded through
 * splitmix64) must never change: every accuracy figure of the project depends on the exact stream.
 * A kvm_rng_t is a plain value (32 bytes, no heap); copy it to fork a stream. Not thread-safe: one generator per
 * thread or per consumer.
 * ================================================================================================ */

typedef struct kvm_rng {
    uint64_t s[4]; /* xoshiro256** state, never all zero */
} kvm_rng_t;

/* Seeds from n words (n may be 0): x starts at 0x243F6A8885A308D3; for each word, x ^= word and
 * x = splitmix64(x); then four more splitmix64 outputs of x fill the state. */
void kvm_rng_seed_words(kvm_rng_t *r, const uint64_t *words, size_t n);
/* kvm_rng_seed_words with one word. */
void kvm_rng_seed(kvm_rng_t *r, uint64_t seed);
/* Next 64 uniformly distributed bits. */
uint64_t kvm_rng_next(kvm_rng_t *r);
/* Uniform double in [0, 1) from the top 53 bits of one draw. */
double kvm_rng_double(kvm_rng_t *r);
/* Uniform integer in [0, n) without modulo bias (rejection); n == 0 gives 0 without drawing. */
uint64_t kvm_rng_below(kvm_rng_t *r, uint64_t n);
/* Uniform integer in [lo, hi] (lo <= hi). */
int kvm_rng_range(kvm_rng_t *r, int lo, int hi);
/* One splitmix64 step: advances *x by the golden-ratio increment and returns the mixed value. */
uint64_t kvm_splitmix64_next(uint64_t *x);

/* ================================================================================================
 * Models below the public API: backend facts, KV pools, sequences, forward steps, generation on a sequence
 * ================================================================================================ */

/* The dtype the backend holds the model's matrices in ("f32" | "f16" | "bf16"; kvm_model_info's weight_dtype
 * is the file's), and the dtype of the KV pools kvm_model_kv_pool makes for it. */
const char *kvm_model_device_dtype(const kvm_model_t *m);
const char *kvm_model_kv_dtype(const kvm_model_t *m);
/* Whether the model's backend replays decode steps as graphs (CUDA; kvm_forward_set_graphs switches it). */
bool kvm_model_has_graphs(const kvm_model_t *m);
/* One line naming the device the model runs on: "cpu", or the GPU (name, SMs, L2, memory, driver). */
void kvm_model_device_describe(const kvm_model_t *m, char *buf, size_t cap);
/* The model's chat rendering of a system message (NULL = none) and a user message with the assistant header
 * after them, as the engine renders prompts (*text freed with kvm_free). KVM_EINVAL for a model without a chat
 * format. */
int kvm_model_chat_render(const kvm_model_t *m, const char *system, const char *user, char **text);

/* ---- KV pools and sequences ------------------------------------------------------------------------- */

/* A pool of KV blocks on a model's backend; sequences are block tables over it (position = index). */
typedef struct kvm_kv_pool kvm_kv_pool_t;
typedef struct kvm_seq kvm_seq_t;

/* A KV pool sized for this model on its backend (kv_bytes of budget; 0 = enough for 4 full contexts). NULL +
 * message on error. Free with kvm_kv_pool_free() after every sequence on it. */
kvm_kv_pool_t *kvm_model_kv_pool(kvm_model_t *m, size_t kv_bytes);
void kvm_kv_pool_free(kvm_kv_pool_t *p);

/* An empty sequence on pool (NULL when out of memory). kvm_seq_destroy releases its blocks and frees it. */
kvm_seq_t *kvm_seq_create(kvm_kv_pool_t *pool);
void kvm_seq_destroy(kvm_seq_t *s);
/* Drops tokens from position n_keep on (releases whole blocks past it). */
void kvm_seq_truncate(kvm_seq_t *s, int n_keep);
/* Reads the K/V of rows [pos, pos+n) into host fp32 out[n_layers][2][n_kv_heads][n][head_dim] (K then V per
 * layer). KVM_ERANGE when the rows are not all in s. */
int kvm_seq_read_rows(const kvm_seq_t *s, int pos, int n, float *out);

/* ---- forward steps ---------------------------------------------------------------------------------------- */

typedef struct kvm_batch_item {
    kvm_seq_t *seq;          /* new tokens go at the positions after the tokens seq holds */
    const int32_t *tokens;   /* [n_tokens] host */
    int n_tokens;
    float *logits;           /* host; [vocab] for the last token, or [n_tokens][vocab] when all_logits;
                                NULL = no logits wanted */
    bool all_logits;
    int32_t *next_token;     /* host; when set, the greedy next token (argmax of the last logits row, computed
                                on the backend: no logits need to travel) is written here */
    const int32_t *positions; /* host [n_tokens] or NULL. When set, the item RECOMPUTES rows already in seq at
                                these positions (strictly increasing, each < seq->n_tokens): every layer writes
                                their K/V there before its attention, and each row attends to positions [0, its
                                own]; seq keeps its length and tokens. Their blocks must be the sequence's own
                                (refcount 1). (KVCOMM's selective recompute: scattered rows in one item, so the
                                context is read once per query tile.) */
} kvm_batch_item_t;

/* Prepares the backend copy of the weights and the workspace for up to max_rows tokens per step.
 * Called by kvm_model_load; safe to call again with a larger max_rows (before timed loops, say). */
int kvm_forward_init(kvm_model_t *m, int max_rows);
/* Turns the replay of decode steps as graphs on or off (off drops a captured graph; on takes effect where the
 * backend has graphs and no capture failed). For benchmarks that compare both on one model. */
void kvm_forward_set_graphs(kvm_model_t *m, bool on);
/* Runs one step. On success every item's seq has grown by its n_tokens. On error (KV budget, bad
 * token id, rows beyond the context) no sequence is changed and the message says which item. */
int kvm_forward(kvm_model_t *m, kvm_batch_item_t *items, int n_items);
/* kvm_forward, and into mass[0..n) (host) the attention probabilities that the rows at positions >= from_pos give
 * each key position, summed over heads and layers (kvm_ops_t.attn_mass; the CPU has it, KVM_EUNSUPPORTED where a
 * backend does not). kvcomm.recompute_rank and the attention oracles rank rows by it. */
int kvm_forward_attn_mass(kvm_model_t *m, kvm_batch_item_t *items, int n_items, float *mass, int n, int from_pos);
/* kvm_forward timed: *device_ms from events recorded on the backend's stream around the step where the backend
 * has them (else the host time), *host_ms from the monotonic clock around the call; either may be NULL. */
int kvm_forward_timed(kvm_model_t *m, kvm_batch_item_t *items, int n_items, double *device_ms, double *host_ms);

/* ---- generation on a sequence ------------------------------------------------------------------------------ */

/* Generates as kvm_model_generate does (params: NULL = the defaults; chat, system and the sampling defaults
 * included), from token ids: runs prompt[0..n_prompt) (the tokens not yet in seq, which may hold a prefix), then
 * decodes into seq until a stop rule. *out as kvm_model_generate's (out->n_prompt = n_prompt); clear it with
 * kvm_generation_clear. */
int kvm_seq_generate(kvm_model_t *m, kvm_seq_t *seq, const int32_t *prompt, int n_prompt,
                     const kvm_generate_params_t *params, kvm_token_fn fn, void *ud, kvm_generation_t *out);

/* ================================================================================================
 * KVCOMM: prompt assembly over a shared KV store (docs/kvcomm.md)
 *
 * The caller says WHAT an agent reads, the store and KVCOMM decide HOW its cache is built (dense, exact prefix,
 * KVCOMM). Objects (one set per model; everything single-threaded per kvm_comm_t):
 *   kvm_comm_t          the context: model, KV store (pool + prefix index + segments), KVCOMM anchor pools (one
 *                       per placeholder name), switches (kvm_kvcomm_config_t).
 *   kvm_template_t      one agent's template record (kvcomm.md §2.2): system text + a user message made of fixed
 *                       text pieces and placeholders, rendered in the model's chat format, each text piece
 *                       tokenized separately and prefilled once; validated at creation.
 *   kvm_segment_t       an immutable KV span with its token ids: user input, tool result, state value, another
 *                       agent's response. Bound to placeholders at request time.
 *   kvm_comm_request_t  one request (one run of the graph / one user question): anchor changes made while it
 *                       runs are staged and committed by kvm_comm_request_end().
 *   kvm_prepared_t      the result of assembling one prompt: a seq whose cache holds all but the last prompt
 *                       token(s), the remaining tokens to run, and the per-request report.
 *
 * One agent step:
 *     kvm_comm_request_t *rq = kvm_comm_request_begin(comm, run_id);
 *     kvm_comm_segment_text(comm, KVM_PRODUCER_INPUT, "input", question, strlen(question), &in);
 *     kvm_binding_t b[] = { { "input", in }, { "agent:planner:current", planner_out } };
 *     kvm_prompt_t p = { .tmpl = coder_tmpl, .bindings = b, .n_bindings = 2, .policy = KVM_KV_KVCOMM };
 *     kvm_comm_prepare(rq, &p, prep);                        // kvm_prepared_report(prep) says what was reused
 *     kvm_seq_generate(model, kvm_prepared_seq(prep), rest, n_rest, &gp, NULL, NULL, &res);
 *     kvm_comm_complete(rq, prep, &res, &coder_out);          // deltas (DENSE), prefix index, response segment
 *     kvm_prepared_release(prep);
 *     ...
 *     kvm_comm_request_end(rq);                               // commit staged anchors
 *
 * Errors: KVM_ENOMEM when the KV budget cannot hold a request even after evicting unreferenced segments (nothing
 * is changed), KVM_EMODEL for a segment of another model, KVM_EFRAME for a segment in an unexpected frame,
 * KVM_EINVAL for a bad template or a missing binding.
 * ================================================================================================ */

/* ---- switches (kvcomm.md §8 "Ablation switches") ------------------------------------------------ */

enum kvm_kvcomm_weights { KVM_KVCOMM_W_L2 = 0, KVM_KVCOMM_W_NEAREST = 1 };
enum kvm_kvcomm_criterion { KVM_KVCOMM_CRIT_LENGTH_ENTROPY = 0, KVM_KVCOMM_CRIT_LENGTH = 1 };
enum kvm_kvcomm_dist_norm { KVM_KVCOMM_DIST_RAW = 0, KVM_KVCOMM_DIST_PER_ELEMENT = 1 };
enum kvm_kvcomm_pool_bound { KVM_KVCOMM_POOL_STRICT = 0, KVM_KVCOMM_POOL_REFERENCE = 1 };
enum kvm_kvcomm_no_anchor { KVM_KVCOMM_NOANCHOR_DENSE = 0, KVM_KVCOMM_NOANCHOR_NAIVE = 1 };
enum kvm_kvcomm_resp_last { KVM_KVCOMM_RESP_COMPUTE = 0, KVM_KVCOMM_RESP_DROP = 1 };
enum kvm_kvcomm_deltas { KVM_KVCOMM_DELTAS_Q8 = 0, KVM_KVCOMM_DELTAS_KV = 1 };

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
    /* kvcomm.deltas [ours, issue 17]: how new anchors store their per-consumer deltas. q8 (default): int8 with one
     * fp32 scale per head row (kernels/ops.h, KVM_Q8_MAX), a quarter of fp32 and about half of the KV dtype; kv:
     * the KV cache's dtype (fp32 on a CPU fp32 pool). Anchors keep the form they were made in. */
    int deltas;
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
    /* kvcomm.recompute_spread [ours]: the offset-corrected placeholder rows whose spread score (the anchors'
     * weighted variance around the estimate over the row's squared norm: a predicted relative squared error of the
     * offset, kvcomm_spread) is at least this are recomputed in the same pass, on top of recompute_frac's share: a
     * per-row gate on the predicted offset error, so a call with agreeing anchors keeps more rows. 0 (default) = off. */
    float recompute_spread;
    /* kvcomm.recompute_rank [ours, issue 15; a research switch]: how recompute_frac's rows are ranked. spread (0,
     * default): the anchors' spread. attention (1): the attention the rows after the last shared placeholder (the
     * agent's own text and the chat suffix) and the last prompt row give each row, estimated by one positioned pass
     * of those rows over the assembled cache (they are then computed again: by the recompute pass, and the last row by
     * the generation's first step). attention_spread (2): the spread times that attention. Needs a backend with
     * kvm_ops_t.attn_mass (the CPU and CUDA; elsewhere the prepare fails, naming the switch). */
    int recompute_rank;
    /* kvcomm.guard [ours, issue 15; on in preset=blend]: the fidelity guard. For a deterministic sample of each
     * consumer's REUSE calls (its first 32, then every 8th) the greedy next token of the assembled cache is compared
     * with a dense prefill's; on a disagreement that consumer's recompute fraction moves up one step (f + (1-f)/2,
     * 1 within 0.05 of 1) for the rest of the comm context's life and the call is served from the dense prefill.
     * false (default) = off. */
    bool guard;
} kvm_kvcomm_config_t;

/* Fills the defaults of kvcomm.md §3.10 (enable, rotate, both offsets, l2, length+entropy, γ 0.3, V 20,
 * W 5, raw, strict, dense, compute). */
void kvm_kvcomm_config_default(kvm_kvcomm_config_t *c);
/* kvcomm.preset=blend [ours, kvcomm.md §5.2; the runtime's default policy]: full KVCOMM, recompute_below
 * KVM_KVCOMM_BLEND_BELOW, recompute_text 64, recompute_frac KVM_KVCOMM_BLEND_FRAC and guard on (the fidelity guard
 * raises an agent's fraction where it changes answers). kvcomm.preset=spec restores the defaults above (the paper's
 * policy). Issue 15 (300 requests per workload): without the guard, 0.7 and 32 kept every role of the team, pipeline,
 * revise and arith workloads within 1 point of dense on models/minillama-2m but not on models/miniqwen3-6m (team
 * -8.2, pipeline -7.5); with the guard, starting at 0.5, every role is within 1 point on both models (kvcomm.md §5.2
 * "The fidelity guard"). The fraction is where each agent's guard starts. */
#define KVM_KVCOMM_BLEND_FRAC 0.5f
#define KVM_KVCOMM_BLEND_BELOW 32

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
/* The KV pool of the context's store (owned by c): sequences made on it can be compared with prepared ones. */
kvm_kv_pool_t *kvm_comm_pool(kvm_comm_t *c);
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

/* ---- segments of shared content (kvcomm.md §2.3) -------------------------------------------------- */

typedef struct kvm_segment kvm_segment_t;

typedef enum kvm_producer_kind {
    KVM_PRODUCER_TEXT = 0,     /* fixed text (system prompts, kvm.segment.text) */
    KVM_PRODUCER_INPUT = 1,    /* the run's user input */
    KVM_PRODUCER_TOOL = 2,     /* a tool result */
    KVM_PRODUCER_AGENT = 3,    /* an agent's response */
    KVM_PRODUCER_STATE = 4,    /* a state value */
    KVM_PRODUCER_TEMPLATE = 5, /* a text segment of an agent template (kvcomm.md §2.2) */
} kvm_producer_kind_t;

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

/* Drops one caller reference (NULL is a no-op). The segment stays cached (evictable, LRU) until the store
 * evicts it or is freed. */
void kvm_segment_release(kvm_segment_t *g);

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

/* Policies: kvm_kv_policy_t of kvmesh.h (KVM_KV_PREFIX = 0, the default: exact prefix hits only, the rest
 * computed; KVM_KV_DENSE: everything computed; KVM_KV_KVCOMM: exact prefix + KVCOMM for placeholders). */

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
    int guard;               /* kvcomm.guard: 0 not checked; 1 checked, greedy tokens agreed with dense; 2 they did
                                not, found before serving (the guard's warm-up): the call was served from the dense
                                prefill, its rows count as recomputed; 3 they did not, found after the call's
                                generation (kvm_comm_complete sets 1 or 3): served reused, the agent's next calls
                                recompute more */
    int guard_tokens;        /* tokens the guard's check computed besides the call's own (0 unchecked) */
} kvm_comm_report_t;

/* Writes the report as one JSON object (no newline) into buf; returns the length it needed. */
int kvm_comm_report_json(const kvm_comm_report_t *r, char *buf, size_t cap);

/* An assembled prompt (kvm_comm_prepare fills it; reusable after kvm_prepared_release). */
typedef struct kvm_prepared kvm_prepared_t;

/* An empty prepared prompt (NULL when out of memory); kvm_prepared_free releases and frees it (NULL: no-op). */
kvm_prepared_t *kvm_prepared_create(void);
void kvm_prepared_free(kvm_prepared_t *p);
/* Its sequence: the KV of prompt tokens 0..n_cached-1, ready for kvm_seq_generate (owned by p). */
kvm_seq_t *kvm_prepared_seq(kvm_prepared_t *p);
int kvm_prepared_n_cached(const kvm_prepared_t *p);
/* The prompt tokens still to run (>= 1; pass them to kvm_seq_generate) and the whole prompt (the concatenated
 * piece ids, never re-tokenized), owned by p; *n receives the count. */
const int32_t *kvm_prepared_rest(const kvm_prepared_t *p, int *n);
const int32_t *kvm_prepared_prompt(const kvm_prepared_t *p, int *n);
/* What the assembly did (owned by p). */
const kvm_comm_report_t *kvm_prepared_report(const kvm_prepared_t *p);

/* Assembles the prompt of p->tmpl with its bindings under p->policy and fills *out (zeroed first: release what it
 * held before), in one call:
 *   TEXT:   out's seq is empty, rest = the whole prompt.
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

/* After generation ran p's rest on p's seq: registers exactly computed prompt blocks in the prefix
 * index, fills the deltas of new anchors for this consumer (DENSE), and, if response != NULL, publishes
 * the generated tokens as a segment (keys re-based to F0; the trailing token without KV is dropped, or
 * computed with one extra step when generation stopped on length and resp_last_token=compute) with
 * producer AGENT / the template's agent name, and returns it with one reference (NULL if no token has
 * KV). res may be NULL when nothing was generated (then no response). */
int kvm_comm_complete(kvm_comm_request_t *rq, kvm_prepared_t *p, const kvm_generation_t *res,
                      kvm_segment_t **response);
/* Frees the seq and buffers of p, which stays usable (idempotent). */
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
    size_t anchor_bytes;        /* the anchors' own storage (deltas; bases loaded from a state file) */
    uint64_t anchors_created, anchors_evicted;
    /* anchors whose base shared its segment's KV blocks in the store (counted in the KV budget) until the store
     * needed the blocks: the base moved into the anchor's own storage (docs/kvcomm.md, "Anchor memory") */
    uint64_t anchors_unshared;
    int anchors_shared;        /* anchors in the pools now whose base is their segment's blocks in the store */
    size_t shared_base_bytes;  /* the KV bytes of those bases (the store's, in the KV budget; not in anchor_bytes) */
} kvm_comm_stats_t;
void kvm_comm_stats(const kvm_comm_t *c, kvm_comm_stats_t *out);

/* Anchors across processes (docs/kvcomm.md "Anchors across processes"). kvm_comm_save_anchors writes every anchor
 * pool of c to path crash-safely (a file beside it, synced, renamed over it): a crash leaves the old file or the
 * new one. kvm_comm_load_anchors adds the anchors of such a file to c's pools (evicting as a commit does) only
 * when the whole file checks out: KVM_ENOENT (no file), KVM_EFORMAT (not an anchor file, torn, a checksum that
 * does not match, naming the byte), KVM_EMODEL (made by another model, weights, backend or KV dtype: the numbers
 * would not fit); nothing is changed then. *n_loaded (may be NULL): anchors read. Not while requests are open. */
int kvm_comm_save_anchors(const kvm_comm_t *c, const char *path);
int kvm_comm_load_anchors(kvm_comm_t *c, const char *path, int *n_loaded);
/* Stats of pool i (0..n_pools-1); KVM_ERANGE past the end. */
int kvm_comm_pool_stats(const kvm_comm_t *c, int i, kvm_comm_pool_stats_t *out);

/* ---- the fidelity oracle (kvcomm.md §5.2; CMake target kvmesh_comm_lab, not in libkvmesh) ---------------------
 * A diagnostic, not a policy. kvm_comm_prepare_oracle prepares like kvm_comm_prepare, but where the agent runs
 * REUSE the estimated offset of every SHARED placeholder (or only of the one named `only`) is replaced by the true
 * delta of this very prompt: a dense prefill of the same ids is computed, and an anchor made of the sample's own
 * base and the dense rows (re-based to F0) becomes, with weight 1, the only anchor of that piece on the one path,
 * which so adds exactly the true offset (placeholder rows if which & KVM_ORACLE_PH, the text segment after it if
 * which & KVM_ORACLE_PF; layer 0 never, as always). Decisions, frames, rotation, assembly and the recompute pass
 * are the production ones: with which = KVM_ORACLE_ALL the assembled cache equals the dense prefill (to float
 * rounding) unless positions, frames or the assembly are wrong. DENSE agents are prepared as usual. On error *out
 * is released. Single-threaded per comm context, like kvm_comm_prepare. */

/* Which estimates the oracle replaces (the same bits as the assemble stage's COMM_FORCE_*). */
enum { KVM_ORACLE_PH = 1, KVM_ORACLE_PF = 2, KVM_ORACLE_ALL = 3 };

int kvm_comm_prepare_oracle(kvm_comm_request_t *rq, const kvm_prompt_t *p, int which, const char *only,
                            kvm_prepared_t *out);

/* The oracles of the recompute pass's selection (issue 15): every REUSE call of c ranks the rows that
 * kvcomm.recompute_frac chooses from by
 *   KVM_ORACLE_SELECT_ERROR: their true error, the squared distance of their assembled K and V (every layer and
 *     head) to a dense prefill of the same prompt: how far any selector of rows by their error could take a
 *     fraction;
 *   KVM_ORACLE_SELECT_ATTENTION: the attention they get in a dense prefill of the same prompt from the rows after
 *     the last shared placeholder (the agent's own text and the chat suffix, whose last row picks the first token),
 *     summed over layers and heads (kvm_forward_attn_mass): how far a selector of the rows this agent reads could
 *     take it;
 *   KVM_ORACLE_SELECT_WEIGHTED: the true error times that attention (how much of the error the agent reads);
 * instead of by the anchors' spread (KVM_ORACLE_SELECT_OFF, the production ranking); the share recomputed, the pass
 * itself and everything else stay the production ones. Diagnostics, not policies (each call costs a dense prefill). */
enum { KVM_ORACLE_SELECT_OFF = 0, KVM_ORACLE_SELECT_ERROR = 1, KVM_ORACLE_SELECT_ATTENTION = 2, KVM_ORACLE_SELECT_WEIGHTED = 3 };
int kvm_comm_set_oracle_selection(kvm_comm_t *c, int by);

/* ================================================================================================
 * The CUDA backend's research switches and profiling hooks
 *
 * Research and tuning switches of the CUDA kernels (docs/cuda.md lists what each changes and why it exists).
 * The CUDA backend is one process-wide context, so these are process-wide too: kvm_cuda_set_opts validates
 * and stores them in that context; ops enqueued afterwards follow them (a decode graph captured before keeps
 * the kernels it was captured with). `device` counts only before the backend's first use. Not thread-safe:
 * set them before running models. Without the CUDA backend the setter still validates and stores (so the
 * same settings fail the same way everywhere) and nothing reads them. Defaults: kvm_cuda_opts_default().
 * Set them by key=value (kvm_cuda_opts_parse, the keys are the field names below) on a copy of
 * kvm_cuda_get_opts(), then kvm_cuda_set_opts(): all of a set applies, or none of it.
 * ================================================================================================ */

typedef enum kvm_cuda_skinny { KVM_CUDA_SKINNY_AUTO = 0, KVM_CUDA_SKINNY_GEMV = 1, KVM_CUDA_SKINNY_MMA = 2 } kvm_cuda_skinny_t;
typedef enum kvm_cuda_dist { KVM_CUDA_DIST_V2 = 0, KVM_CUDA_DIST_V1 = 1, KVM_CUDA_DIST_V2U4 = 2 } kvm_cuda_dist_t;
typedef struct kvm_cuda_opts {
    int device;               /* device: GPU index (0) */
    bool profile;             /* profile: time every op from the start, as kvm_cuda_profile_begin (false) */
    bool pdl;                 /* pdl: programmatic dependent launch (true) */
    int prefetch;             /* prefetch: what decode GEMMs read before the PDL wait: 0 nothing, 1 an L2
                                 prefetch, 2 their first loads into registers (2) */
    int skinny;               /* skinny: kvm_cuda_skinny_t, the kernel of few-row matmuls: auto (GEMV for 1 row,
                                 tensor cores for 2..16), gemv, mma (auto) */
    int skinny_rows;          /* skinny_rows: weight rows per CTA of the tensor-core skinny GEMM: 16, 32 or 64
                                 (fewer where the launch would not fill the GPU); the activations cross L2 once
                                 per CTA (16) */
    bool attn_dec_mma;        /* attn_dec_mma: decode attention of 16-bit caches (head_dim 64, 128) on the
                                 tensor cores; 0: the generic split-K kernel (true) */
    bool no_mma_attn;         /* no_mma_attn: prefill attention through the split-K kernel (false) */
    int attn_wg;              /* attn_wg: prefill attention by warpgroup MMAs (wgmma) where sm_90a code was built
                                 and the GPU is a Hopper (kvm_cuda_attn_wg_available): 0 off; 1 no-swizzle tiles,
                                 two stages of K and V; 5 one stage of V (3 CTAs per SM); 6 three stages and S of
                                 the next tile during the softmax; 7 128-byte-swizzled tiles, one stage of V; 8 as 7
                                 with V's descriptor offsets read the other way (7 and 8 not yet run on a GPU). 1, 5
                                 and 6 ran 9-20% slower than k_attn_mma on the H100 (docs/perf/engine.md) (0) */
    int mma_occ;              /* mma_occ: CTAs per SM the prefill attention's registers are capped for: 3, or 1
                                 (no cap) (3) */
    bool mma_load;            /* mma_load: k_attn_mma copies its K/V tiles from four block bases per tile, one add per
                                 copy (the same bytes in the same places; written after the 2026-12-08 device time
                                 was spent: false until measured) */
    bool ffn;                 /* ffn: the fused MLP op (true) */
    bool ffn_gemv;            /* ffn_gemv: batch-1 gate+up GEMV with the SwiGLU in its epilogue (false) */
    bool qkv_fuse;            /* qkv_fuse: q/k/v + RoPE + KV write fused (true) */
    bool qkv16;               /* qkv16: prefill q/k/v as one bf16 GEMM (true) */
    bool norm16;              /* norm16: add_rmsnorm_16 skips the fp32 output (true) */
    bool y16;                 /* y16: prefill o / down projections hand 16-bit outputs to the norm (true) */
    bool norm_v;              /* norm_v: the vectorised RMSNorm kernel (true) */
    int kvcomm_dist;          /* kvcomm_dist: kvm_cuda_dist_t, the KVCOMM distance kernel: v2, v1, v2u4 (v2) */
} kvm_cuda_opts_t;

/* The defaults (the fastest measured paths). */
kvm_cuda_opts_t kvm_cuda_opts_default(void);
/* 0 if every field holds one of its values; else KVM_EINVAL naming the first bad field and its values
 * ("cuda prefetch: 5 is not one of 0, 1, 2"). */
int kvm_cuda_opts_check(const kvm_cuda_opts_t *o);
/* Sets the field named `key` (the names above, e.g. "prefetch") from text ("0"/"1" for booleans, a number,
 * or a value's name such as "gemv"); KVM_EINVAL naming the key and its values, or listing the keys when
 * the key is unknown. o is left unchanged on error. */
int kvm_cuda_opts_parse(kvm_cuda_opts_t *o, const char *key, const char *value);
/* Validates o (kvm_cuda_opts_check) and makes it the CUDA backend's settings; KVM_EINVAL when a field is bad
 * or `device` changes after the backend started (nothing changed then). */
int kvm_cuda_set_opts(const kvm_cuda_opts_t *o);
/* The CUDA backend's current settings. */
kvm_cuda_opts_t kvm_cuda_get_opts(void);
/* Whether this build has the wgmma prefill attention (sm_90a code) and the backend's GPU runs it (compute
 * capability 9.0); starts the backend. */
bool kvm_cuda_attn_wg_available(void);

/* One line describing the GPU the CUDA backend uses (name, SMs, L2, memory, driver); error if none. */
int kvm_cuda_describe(char *buf, size_t cap);
/* Per-op GPU profile: begin starts timing every CUDA op (eager steps only; graphs are not timed), end
 * prints the ops summed per name to f (if not NULL) and returns the total ms. No-ops without CUDA. */
void kvm_cuda_profile_begin(void);
double kvm_cuda_profile_end(FILE *f, const char *title);

#ifdef __cplusplus
}
#endif

/* ================================================================================================
 * C2C (Cache-to-Cache, ../shared/spec/c2c.md; docs/c2c.md): a fuser projects a sharer model's KV cache of a
 * prompt section into a receiver model's cache at the same positions. runtime/comm/c2c_run.c.
 * ================================================================================================ */

typedef struct kvm_c2c_fuser kvm_c2c_fuser_t;

/* Loads the fuser whose config is json_path (<name>.c2c.json) on the receiver's backend, with every check of spec
 * §7 and the pairing checks against both loaded models (layer counts, KV heads, head dims, RoPE, the hashes of
 * their tokenizer.json files, vocabulary). Both models must be Hugging Face directories on one backend, or synthetic
 * models ("synthetic:<name>", no tokenizer: timing only), whose tokenizer hash is that of the text "kvmesh synthetic
 * model synthetic:<name>: no tokenizer". NULL + message (naming the file and the field) on error. Free with
 * kvm_c2c_free. */
kvm_c2c_fuser_t *kvm_c2c_open(const char *json_path, kvm_model_t *receiver, kvm_model_t *sharer);
void kvm_c2c_free(kvm_c2c_fuser_t *f);
/* The fuser's receiver layer count, and whether layer l's K (branch 0) or V (branch 1) gate is open (false for a
 * bad l / branch). */
int kvm_c2c_n_layers(const kvm_c2c_fuser_t *f);
bool kvm_c2c_gate_open(const kvm_c2c_fuser_t *f, int layer, int branch);

/* What one sectioned prefill did (kvm_c2c_prefill). */
typedef struct kvm_c2c_stats {
    int pos0;              /* first fused position (the receiver's length before the call) */
    int fused_tokens;      /* rows fused: n_fuse */
    int n_layers;          /* receiver layers */
    int gates_k_open, gates_v_open; /* branches that ran (a closed gate is an exact identity) */
    double prefill_ms;     /* receiver + sharer prefill of the fused section */
    double fuse_ms;        /* the fuser over every open branch */
    double rest_ms;        /* the receiver-only tokens after the section */
} kvm_c2c_stats_t;

/* The sectioned prefill of spec §5-6 (identity token alignment: the ids go to both models unchanged; a fuser with
 * token_alignment first / longest is refused, spec §4 is not built). With p0 = rseq's length:
 *   1. the receiver prefills ids[0, n_fuse) at positions p0.. on rseq;
 *   2. the sharer prefills rseq's tokens [0, p0) and ids[0, n_fuse) on a fresh sequence of spool (same positions);
 *   3. rows [p0, p0 + n_fuse) of every receiver layer are fused in place (spec §6; open gates only);
 *   4. the sharer's sequence is freed;
 *   5. the receiver runs ids[n_fuse, n) (receiver only) over the fused cache; logits (host [vocab], may be NULL)
 *      get the last row. n_fuse == n runs nothing after the fusion (logits must then be NULL).
 * Standard inference (spec §5) is n_fuse = n - 1. 1 <= n_fuse <= n. On error rseq is truncated back to p0.
 * st may be NULL. */
int kvm_c2c_prefill(kvm_c2c_fuser_t *f, kvm_model_t *receiver, kvm_seq_t *rseq, kvm_model_t *sharer, kvm_kv_pool_t *spool,
                    const int32_t *ids, int n, int n_fuse, float *logits, kvm_c2c_stats_t *st);

/* What kvm_c2c_prefill_ex adds (every zero: kvm_c2c_prefill). */
typedef struct kvm_c2c_prefill_opts {
    const int32_t *sharer_ids; /* [n_fuse] what the sharer prefills in place of ids[0, n_fuse) (same positions; e.g. the
                                  real document while the receiver reads a blinded one, spec §9); NULL = ids */
    float *rest_logits;        /* host [n - n_fuse][vocab]: the logits of EVERY row of ids[n_fuse, n) (then the
                                  logits argument must be NULL); NULL = only `logits` */
    bool skip_fuse;            /* both prefills run, the fuser is not called (spec §9 (b): the same path, no fusion) */
} kvm_c2c_prefill_opts_t;
/* kvm_c2c_prefill with opts (NULL = none): the one implementation, kvm_c2c_prefill calls it. */
int kvm_c2c_prefill_ex(kvm_c2c_fuser_t *f, kvm_model_t *receiver, kvm_seq_t *rseq, kvm_model_t *sharer, kvm_kv_pool_t *spool,
                       const int32_t *ids, int n, int n_fuse, float *logits, const kvm_c2c_prefill_opts_t *opts,
                       kvm_c2c_stats_t *st);
/* Closes every gate of the loaded fuser f (in memory; the files are untouched): f becomes the exact identity, no
 * branch runs (spec §9 (f)). 0, or KVM_EINVAL for a NULL f. */
int kvm_c2c_close_gates(kvm_c2c_fuser_t *f);

/* Options of kvm_c2c_write_untrained (every zero is the default). */
typedef struct kvm_c2c_init_opts {
    uint64_t seed;          /* weights ~ U(-1, 1) / sqrt(fan_in) from this seed (default 0) */
    int hidden;             /* fuser width (default 64) */
    const char *dtype;      /* "f32" (default), "bf16", "f16" */
    const char *closed;     /* NULL, or gates to close: a comma list of "k<l>" / "v<l>" (e.g. "v0,k5") */
    const char *token_alignment; /* NULL / "identity" (fuse_tokens prompt_except_last, the default), or "first" /
                                    "longest" (fuse_tokens message_tokens: the aligner of spec §4) */
} kvm_c2c_init_opts_t;

/* Writes an UNTRAINED fuser for the pair (random weights, every gate open but those in o->closed, terminal layer map
 * of spec §3, o->token_alignment's alignment): json_path (must end in ".c2c.json") and <name>.c2c.safetensors beside it, with
 * both models' tokenizer hashes, so that kvm_c2c_open accepts it for this pair. For tests and examples: it moves
 * the receiver's cache by an arbitrary amount and carries no information. 0 or a KVM_E* code with a message. */
int kvm_c2c_write_untrained(const char *json_path, kvm_model_t *receiver, kvm_model_t *sharer,
                            const kvm_c2c_init_opts_t *o);

#endif
