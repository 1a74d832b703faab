/* team.h - (lab/, research code on include/kvmesh_lab.h, not the production library) the KVCOMM fidelity
 * workloads: small agent graphs on minitasks items (team, pipeline, revise, arith: kvm_team_workload_t below)
 * under one KV policy and KVCOMM configuration. Used by `kvmesh bench kvcomm --workload NAME` and by the
 * fidelity test on the bundled models.
 *
 * The team workload, per request q (items (team, eval, seed, q, role)): the facts + question become an INPUT
 * segment; the finder runs on {input}; its response (a segment) is bound to {agent:finder:current} of the three
 * others, whose expected answers follow from the finder's actual output (checker: "yes" iff it equals
 * the true value; reverser: its digits reversed; neighbour: independent of it). */
#ifndef KVM_LAB_TEAM_H
#define KVM_LAB_TEAM_H

#include <kvmesh.h>
#include <kvmesh_lab.h>

#define KVM_TEAM_ROLES 4 /* the most roles of a workload */

/* The workloads of `kvmesh bench kvcomm --workload NAME` (kvcomm.md §5.2), each a fixed agent graph on minitasks
 * eval items, greedy:
 *   team      finder, checker, reverser, neighbour: {input} = facts + "Ask: NAME"; the last three also read
 *             {agent:finder:current}
 *   pipeline  examples/pipeline.lua: extractor (the finder's role) on {tool:facts} "\nAsk: " {state:input.name},
 *             answerer (the reverser's role) on the same and "\nFinder: " {agent:extractor:current}
 *   revise    examples/revise.lua under greedy decoding: solver and reviser (the arithmetic "result" role) on the
 *             same {input} question (the reviser's prompt is the solver's: an exact prefix hit)
 *   arith     multi-step arithmetic ("a + b", "a - b" and the two-step chains "a + b - c", "a - b + c"): result and
 *             reverse roles reading one shared {input} question
 * Expected answers that follow from another agent's output (team's checker and reverser, pipeline's answerer) are
 * computed from that agent's actual output. */
typedef enum kvm_team_workload { KVM_WL_TEAM = 0, KVM_WL_PIPELINE, KVM_WL_REVISE, KVM_WL_ARITH, KVM_WL_N } kvm_team_workload_t;
/* "team", "pipeline", "revise", "arith" (NULL out of range) and back (-1 for an unknown name). */
const char *kvm_team_workload_name(int w);
int kvm_team_workload_from_name(const char *name);
/* The number of agents (roles) of a workload, and the name of one ("finder", "extractor", ...; NULL out of range). */
int kvm_team_n_roles(int w);
const char *kvm_team_role_name(int w, int role);
/* kvcomm.recompute_below of the improved policy (`--modes full+recompute`): the finder's answer (4 digits
 * and at most a few more tokens) is recomputed, the facts segment (>= 8 facts, ~100+ tokens) is reused */
#define KVM_TEAM_RECOMPUTE_BELOW 8

/* The blended policy (`--modes full+blend`, ours; kvcomm.md §5.2) = kvcomm.preset=blend: full KVCOMM (the
 * spec's position alignment), every shared piece shorter than KVM_KVCOMM_BLEND_BELOW tokens and every text segment
 * after a placeholder recomputed, and
 * KVM_KVCOMM_BLEND_FRAC of the offset-corrected facts rows (where the anchors' deltas disagree most:
 * the spread score) recomputed with them in one batched pass. */
void kvm_team_blend_policy(kvm_kvcomm_config_t *c);

typedef struct kvm_team_opts {
    int workload;            /* kvm_team_workload_t (KVM_WL_TEAM) */
    int requests;            /* team items (each runs the 4 agents) */
    int warm;                /* requests before "after warm-up" reuse counting starts */
    int cos_samples;         /* REUSE invocations whose per-layer K/V cosine to dense is measured */
    int max_tokens;          /* generation limit per agent (greedy) */
    uint64_t seed;           /* minitasks eval seed */
    kvm_kv_policy_t policy;  /* KVM_KV_PREFIX = the dense baseline, KVM_KV_KVCOMM */
    kvm_kvcomm_config_t cfg; /* switches (ablations) */
    size_t kv_budget_bytes;  /* 0 = the model's default pool */
    bool quiet;              /* no progress on stderr */
    int oracle;              /* KVM_ORACLE_* bits (kvmesh_lab.h): REUSE agents use the true deltas */
    const char *oracle_only; /* with oracle: only this placeholder name (NULL = every shared placeholder) */
    int oracle_select;       /* KVM_ORACLE_SELECT_*: the recompute pass picks its rows by their true error, the attention
                                they get or both (kvm_comm_set_oracle_selection); 0: the production ranking */
} kvm_team_opts_t;

typedef struct kvm_team_result {
    int workload, n_roles;   /* of the run; correct/total/outputs use roles 0..n_roles-1 */
    int correct[KVM_TEAM_ROLES], total[KVM_TEAM_ROLES];
    int invocations, reuse, invocations_warm, reuse_warm;
    int agree, agree_n;      /* greedy outputs equal to the dense reference run's */
    uint64_t exact, offset, naive, recomputed, input;
    int n_layers, cos_n;
    double *cos_k, *cos_v, *l2_k, *l2_v; /* [n_layers] sums over cos_n samples (divide by cos_n) */
    int anchors;
    size_t anchor_bytes;
    char (*outputs)[64];     /* [requests * 4] trimmed outputs (request q, role k at q * 4 + k) */
    int n_outputs;
    double max_abs_err;      /* max |reused - dense| over every K/V element of the cos_n measured invocations */
    double max_abs_dense;    /* max |dense| over the same elements (the scale of max_abs_err) */
    int short_recomputed;    /* rows recomputed by kvcomm.recompute_below / recompute_text */
    int selected_recomputed; /* rows recomputed by kvcomm.recompute_frac */
    int recompute_items;     /* batch items of the recompute passes (one per REUSE call that recomputed rows) */
    int guard_checked, guard_dense; /* kvcomm.guard: calls checked against dense, of them served dense (disagreed) */
    int guard_late;                 /* of them disagreeing after their generation (served reused; kvm_comm_report_t) */
    uint64_t guard_tokens;   /* tokens the guard's checks computed besides the calls' own */
    double *ttft_ms;         /* [requests * 4] per invocation (request q, role k at q * 4 + k): host wall time from
                              * the agent's prepare call to its first output id (prepare + recompute + the forward
                              * of the remaining prompt tokens + sampling), ms; < 0 where the invocation did not run */
    double *prep_cpu_ms;     /* [requests * 4] likewise: process CPU time (all threads) of the prepare call alone
                              * (KVCOMM and the recompute pass), ms: the part that depends on the KVCOMM code, and a
                              * figure that a loaded machine disturbs less than wall time */
} kvm_team_result_t;

/* Defaults: 300 requests, warm 10, 32 cosine samples, 12 tokens, seed 1000, KVCOMM, default switches. */
void kvm_team_opts_default(kvm_team_opts_t *o);
/* Runs the workload on m with a fresh comm context. dense_ref (may be NULL) is a finished run whose
 * outputs are compared for agreement. Fills *out (free with kvm_team_result_free). */
int kvm_team_run(kvm_model_t *m, const kvm_team_opts_t *o, const kvm_team_result_t *dense_ref, kvm_team_result_t *out);
void kvm_team_result_free(kvm_team_result_t *r);
/* Overall accuracy in percent (every role). */
double kvm_team_accuracy(const kvm_team_result_t *r);
/* Accuracy in percent over the roles whose bit is clear in `skip_mask` (bit k = role k), calls pooled. */
double kvm_team_accuracy_except(const kvm_team_result_t *r, unsigned skip_mask);
/* The degenerate roles of a dense reference run: a role whose dense accuracy is 0% or whose dense output is the
 * same on every request (the team checker, whose dense answer is always "no") says nothing about how a KV policy
 * changes answers and is left out of the headline. Returns the mask (bit k = role k); why[k] (may be NULL, each
 * 96 bytes) gets a reason such as "dense 0.0%, always 'no'". */
unsigned kvm_team_degenerate_roles(const kvm_team_result_t *dense, char (*why)[96]);
/* Time to first token over the invocations of `role` (0..KVM_TEAM_ROLES-1, or -1 for all): mean and median in ms
 * (0 when none ran). */
void kvm_team_ttft(const kvm_team_result_t *r, int role, double *mean_ms, double *p50_ms);
/* The same over prep_cpu_ms. */
void kvm_team_prep_cpu(const kvm_team_result_t *r, int role, double *mean_ms, double *p50_ms);

#endif
