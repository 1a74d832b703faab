/* comm_internal.h - structures shared by comm.c (templates, segments, prompt assembly) and kvcomm.c
 * (anchor pools, prediction, offset estimation). Not a public header. */
#ifndef KVM_COMM_INTERNAL_H
#define KVM_COMM_INTERNAL_H

#include "prompt.h"

/* KV geometry on the host: one tensor of n rows is fp32 [L][2][H][n][D] (K then V per layer). */
typedef struct comm_geom {
    int L, H, D;
    int esize; /* bytes of one stored anchor element: 4 on a host-fp32 backend, else the pool dtype's (0: 4) */
} comm_geom_t;

static inline size_t comm_rows_elems(const comm_geom_t *g, int n) { return (size_t)g->L * 2 * g->H * n * g->D; }
/* element (l, kv, h, t, d) of a tensor of n rows starting at layer l0 (deltas start at layer 1) */
static inline size_t comm_idx(const comm_geom_t *g, int n, int l, int kv, int h, int t) {
    return ((((size_t)l * 2 + kv) * g->H + h) * n + t) * g->D;
}

/* Per-consumer deltas of an anchor (kvcomm.md §2.4), F0, layers 1..L-1: [L-1][2][H][rows][D].
 * An anchor's data (base and deltas) lives in backend memory in the pool dtype (struct comm_dev_anchor,
 * kvcomm_dev.c). The host fp32 arrays below are that data itself on a host-fp32 backend (CPU, fp32 pool); on
 * any other backend they are NULL except while comm_anchor_host holds a widened copy (the oracle, saving state)
 * or an anchor loaded from a state file waits for its upload. */
typedef struct comm_delta {
    char consumer[KVM_COMM_NAME_MAX];
    uint64_t template_hash;
    float *d_ph; /* rows = anchor T (host fp32, see above) */
    float *d_pf; /* rows = S */
    int S;
} comm_delta_t;

typedef struct comm_anchor {
    int refs;
    uint64_t key;
    int T;
    float *base; /* [L][2][H][T][D] F0 (host fp32, see comm_delta_t) */
    comm_delta_t *deltas;
    int n_deltas, cap_deltas;
    uint32_t activation;
    uint64_t insert_seq;
    size_t bytes;
    bool q8; /* the backend's deltas are q8 (kvcomm.deltas when the anchor was made or loaded; kernels/ops.h) */
    bool base_shared; /* the base is the sample's segment in the store (its blocks, counted in the KV budget) */
    uint64_t seg_id;  /* the store segment the base was copied from (0: none, e.g. loaded from a state file) */
    struct comm_dev_anchor *dev; /* kvcomm_dev.c: backend mirror of base and deltas, or NULL */
} comm_anchor_t;

typedef struct comm_pool {
    char name[KVM_COMM_NAME_MAX];
    comm_anchor_t **a;
    int n, cap;
    uint64_t created, evicted, predictions, predicted_new;
} comm_pool_t;

/* The fidelity guard's state of one consumer (agent) of a comm context (guard.c). */
typedef struct comm_guard {
    char agent[KVM_COMM_NAME_MAX];
    float frac;                          /* the agent's recompute fraction now (starts at cfg.recompute_frac) */
    uint32_t reused, checked, disagreed; /* REUSE calls, of them checked against dense, of those that disagreed */
} comm_guard_t;

struct kvm_comm {
    kvm_model_t *m;
    kvm_kv_pool_t *pool;
    kvm_kv_store_t *store;
    kvm_kvcomm_config_t cfg;
    comm_geom_t g;
    comm_pool_t *pools;
    int n_pools, cap_pools;
    uint64_t insert_seq;
    size_t anchor_bytes;
    kvm_comm_stats_t st;
    int active_requests;
    struct comm_dev_ctx *dev;  /* kvcomm_dev.c: scratch of the op path, or NULL */
    char kvcomm_off[160];      /* why the backend cannot run KVCOMM (no ops, a shape it does not take), or "" */
    comm_guard_t *guards;      /* kvcomm.guard: per consumer (guard.c) */
    int n_guards, cap_guards;
    /* the selection oracle (kvm_comm_set_oracle_selection, kvmesh_comm_lab): replaces the positive row scores of a
     * REUSE call (rows [0, n_prompt - 1) of p) before the recompute pass picks from them; NULL in production */
    int (*score_hook)(kvm_comm_t *c, const kvm_prepared_t *p, float *row_score);
};

/* One agent template record (kvcomm.md §2.2). */
struct kvm_template {
    kvm_comm_t *c;
    char *agent;
    uint64_t hash;
    int n_ph;
    char ph_name[KVM_COMM_MAX_PH][KVM_COMM_NAME_MAX];
    int32_t *ids;                     /* template ids with dummies */
    int n_ids;
    int ts[KVM_COMM_MAX_PH + 1], te[KVM_COMM_MAX_PH + 1]; /* text segment i = [ts[i], te[i]) */
    int ps[KVM_COMM_MAX_PH], pe[KVM_COMM_MAX_PH];          /* placeholder i (0-based) = [ps[i], pe[i]) */
    kvm_seq_t seq;                    /* segment 0, exact, shared by reference */
    float *P[KVM_COMM_MAX_PH + 1];    /* text segments 1..n in F0, host fp32 */
    void *dev_P[KVM_COMM_MAX_PH + 1]; /* kvcomm_dev.c: device copies of P in the pool dtype, or NULL */
    bool used;                        /* a request has shared seq (its first one was charged for computing it) */
};

/* One sample (placeholder name, content) seen in a request. */
typedef struct comm_sample {
    char name[KVM_COMM_NAME_MAX];
    uint64_t key;
    int T;
    float *X;           /* F0 base [L][2][H][T][D] (host), read only when needed (materialization), else NULL */
    bool predicted, is_new;
    float entropy, threshold;
    int n_pool, n_eligible;
    comm_anchor_t *staged; /* anchor (name, key) created in this request, or NULL */
    struct comm_dev_sample *dev; /* kvcomm_dev.c: the bound segment and the sample's weights in backend memory */
} comm_sample_t;

typedef struct comm_bump {
    comm_anchor_t *a;
    uint32_t count;
} comm_bump_t;

/* A snapshot of one pool: the anchors in it when the request began (each with a reference). */
typedef struct comm_snap {
    int pool;               /* index in c->pools */
    comm_anchor_t **a;
    int n;
} comm_snap_t;

struct kvm_comm_request {
    kvm_comm_t *c;
    uint64_t id;
    comm_snap_t *snaps;
    int n_snaps;
    comm_sample_t *samples;
    int n_samples, cap_samples;
    comm_bump_t *bumps;
    int n_bumps, cap_bumps;
    /* staged new anchors, in creation order, with their pool name */
    comm_anchor_t **staged;
    char (*staged_pool)[KVM_COMM_NAME_MAX];
    int n_staged, cap_staged;
};

/* ---- comm.c ---- */
/* runs ids through the model on seq (no logits), in chunks */
int comm_prefill(kvm_comm_t *c, kvm_seq_t *seq, const int32_t *ids, int n);
/* reads rows [pos, pos+n) of seq into host fp32 [L][2][H][n][D] with the keys re-based to F0 (shift by -pos) */
int comm_read_f0(kvm_comm_t *c, const kvm_seq_t *seq, int pos, int n, float *out);

/* ---- kvcomm.c ---- */
/* Makes room for element n of the array *pp (capacity *cap elements of elem bytes; doubling, 8 first). pp is the
 * address of the array pointer. 0 or KVM_ENOMEM (then *pp and *cap are unchanged). */
int comm_reserve(void *pp, int *cap, int n, size_t elem);
comm_pool_t *comm_pool_get(kvm_comm_t *c, const char *name, bool create);
void comm_anchor_unref(kvm_comm_t *c, comm_anchor_t *a);
const comm_delta_t *comm_anchor_delta(const comm_anchor_t *a, const char *consumer);
/* the snapshot of pool `name` for this request (n = 0 when the pool did not exist at begin) */
comm_anchor_t **comm_snapshot(kvm_comm_request_t *rq, const char *name, int *n);
/* §3.4: distances d[n] of sample s to anchors E[0..n) (the raw, or per element, Frobenius distance of the values) */
typedef int (*comm_dist_fn)(kvm_comm_t *c, comm_sample_t *s, comm_anchor_t **E, int n, double *d);
/* §3.4: runs the prediction of sample s against the snapshot (once per sample); stages bumps. comm_predict
 * measures with the backend's kvcomm_dist op (comm_dev_pred); comm_predict_by with `dist` (tests: hand-made
 * pools measured on the host). */
int comm_predict(kvm_comm_request_t *rq, comm_sample_t *s);
int comm_predict_by(kvm_comm_request_t *rq, comm_sample_t *s, comm_dist_fn dist);
/* §3.5: the usable anchors of s for consumer/template_hash (T_a >= T, deltas present) */
int comm_usable(kvm_comm_request_t *rq, const comm_sample_t *s, const char *consumer, uint64_t thash,
                comm_anchor_t ***out, int *n);
/* §3.8: fills the deltas of anchor (s->name, s->key) for template t's agent from the dense rows of seq
 * (placeholder i: rows [t_ph, t_ph + s->T), its text segment rows [t_pf, t_pf + S)); creates the staged anchor
 * (base = the sample's segment rows) if needed. All on the backend (kvcomm_diff): no KV crosses to the host. */
int comm_materialize(kvm_comm_request_t *rq, comm_sample_t *s, kvm_template_t *t, int i, const kvm_seq_t *seq,
                     int t_ph, int t_pf, int S);
/* Puts anchor a (one reference, moved to the pool) into pool p, evicting first so that p holds at most V anchors
 * (§3.9) and the anchor budget holds; a->insert_seq 0 = the next of c (else kept: anchors loaded from a state
 * file). Mirrors a into backend memory. 0 or KVM_ENOMEM (then a still belongs to the caller). */
int comm_pool_insert(kvm_comm_t *c, comm_pool_t *p, comm_anchor_t *a);
/* The store's holder hook (store.h, kvm_kv_store_set_holder): when the KV budget is full after every eviction the
 * store can make, the oldest anchor whose base shares a segment takes its own copy and lets the segment go (counted
 * in anchors_unshared; when even the copy fails, the anchor is dropped). 1 = let one go, 0 = none left. */
int comm_reclaim_anchor(void *ctx);
/* commit at request end (§2.4 visibility, §3.9 eviction) */
int comm_commit(kvm_comm_request_t *rq);
void comm_request_free_state(kvm_comm_request_t *rq);
size_t comm_anchor_bytes(const comm_geom_t *g, const comm_anchor_t *a);

/* ---- prepare.c: one placeholder of a prompt being prepared and the text segment after it ---- */
typedef struct comm_piece {
    int decision;            /* enum kvm_ph_decision */
    int sample;              /* index in rq->samples, -1 if none */
    int t_ph, t_pf, T, S;    /* prompt positions and lengths of the placeholder and of its text segment */
    kvm_segment_t *seg;      /* the bound segment (one reference) */
    comm_anchor_t **usable;  /* SHARED: the usable anchors, sorted by key (owned array) */
    int n_usable;
} comm_piece_t;

/* Rows of piece q that land in the assembled span [E, N-1): placeholder rows [*a0, *a1), text rows [*b0, *b1)
 * (relative to the piece's starts; empty when *a1 <= *a0). */
static inline void comm_piece_rows(const comm_piece_t *q, int E, int N, int *a0, int *a1, int *b0, int *b1) {
    *a0 = q->t_ph > E ? 0 : E - q->t_ph, *a1 = q->T;
    if (q->t_ph + *a1 > N - 1) *a1 = N - 1 - q->t_ph;
    *b0 = q->t_pf > E ? 0 : E - q->t_pf, *b1 = q->S;
    if (q->t_pf + *b1 > N - 1) *b1 = N - 1 - q->t_pf;
}

/* Diagnostics hook of the assemble stage (kvcomm_oracle.c; kvm_comm_prepare never sets it): for a SHARED
 * placeholder i, forced[i].anchor's delta for the consumer replaces the anchor estimate of the placeholder rows
 * (which & COMM_FORCE_PH) and/or of the text segment (which & COMM_FORCE_PF), with weight 1 (`ones`: backend
 * memory holding at least max(2 T, 2 L H D) floats of 1). The anchor must have its backend mirror. */
enum { COMM_FORCE_PH = 1, COMM_FORCE_PF = 2 };
typedef struct comm_forced {
    comm_anchor_t *anchor;   /* NULL: the estimate */
    int which;               /* COMM_FORCE_* bits */
    const float *ones;
} comm_forced_t;

/* kvm_comm_prepare with the hook above (forced: [n placeholders] or NULL = kvm_comm_prepare). */
int comm_prepare_run(kvm_comm_request_t *rq, const kvm_prompt_t *p, const comm_forced_t *forced, kvm_prepared_t *out);

/* ---- kvcomm_dev.c: KVCOMM on the backend's ops (kernels/ops.h kvcomm_dist / softmax / apply / spread / diff) ----
 * The one path on every backend (the CPU backend implements the ops on host memory). Anchors live in backend
 * memory in the pool dtype, written there by the DENSE path's materialization (kvcomm_diff); on a host-memory
 * backend with an fp32 pool that memory is the host fp32 arrays of comm_anchor_t. Neither path moves KV
 * between host and device. */
/* "" when c's backend runs KVCOMM (the ops are there and take c's shapes), else why not (written into buf) */
void comm_dev_check(kvm_comm_t *c, char *buf, size_t cap);
void comm_dev_ctx_free(kvm_comm_t *c);
/* uploads host arrays that have no backend data yet (anchors loaded from a state file or made by a test) */
int comm_dev_anchor_sync(kvm_comm_t *c, comm_anchor_t *a);
/* Anchor memory (docs/kvcomm.md, "Anchor memory"): a staged anchor's base is a copy of its sample's segment rows; at
 * commit, comm_dev_anchor_share swaps the copy for a reference to that segment when the store still holds it (1:
 * shared, 0: the copy stays), so the base costs nothing beyond the segment the store keeps anyway, inside the KV
 * budget. When the store needs the blocks (comm_reclaim_anchor), comm_dev_anchor_unshare copies them back into the
 * anchor's own storage and lets the segment go (0 or a KVM_E*). */
int comm_dev_anchor_share(kvm_comm_t *c, comm_anchor_t *a);
int comm_dev_anchor_unshare(kvm_comm_t *c, comm_anchor_t *a);
void comm_dev_anchor_free(comm_anchor_t *a);
/* A new anchor's base from sample s's segment rows [0, a->T) (a->T set); 0 or a KVM_E*. */
int comm_dev_anchor_base(kvm_comm_t *c, comm_anchor_t *a, comm_sample_t *s);
/* Adds t's agent's delta to anchor a from the dense rows of seq (see comm_materialize; P = t's text segment
 * i + 1, S rows). */
int comm_dev_anchor_add_delta(kvm_comm_t *c, comm_anchor_t *a, kvm_template_t *t, int i, const kvm_seq_t *seq, int t_ph,
                              int t_pf, int S);
/* Host fp32 copies of a's base and deltas (the test oracle, saving state): a no-op on a host-fp32 backend, else
 * downloaded and widened; comm_anchor_host_drop frees them again (never the host-fp32 backend's data). */
int comm_anchor_host(kvm_comm_t *c, comm_anchor_t *a);
void comm_anchor_host_drop(kvm_comm_t *c, comm_anchor_t *a);
void comm_dev_template_free(kvm_template_t *t);
/* makes the backend copies of t's text segments (at template creation, so that no REUSE pays the upload) */
int comm_dev_template_prepare(kvm_template_t *t);
/* weight buffers allocated so far by c's op path (a steady stream of requests reuses them) */
int comm_dev_weight_buffers_made(const kvm_comm_t *c);
/* The sample's base is the bound segment's blocks, borrowed (not referenced) for the call that binds it:
 * comm_dev_sample_rebind points a known sample at the segment the current call bound. */
int comm_dev_sample_bind(kvm_comm_t *c, comm_sample_t *s, const kvm_segment_t *seg);
void comm_dev_sample_rebind(comm_sample_t *s, const kvm_segment_t *seg);
void comm_dev_sample_free(kvm_comm_t *c, comm_sample_t *s);
/* reads the sample's F0 base to host fp32 s->X if it is not there (the test oracle needs it) */
int comm_dev_sample_x(kvm_comm_t *c, comm_sample_t *s);
/* §3.4 distances (a comm_dist_fn) */
int comm_dev_pred(kvm_comm_t *c, comm_sample_t *s, comm_anchor_t **E, int n, double *d);
/* §3.6/§3.7 REUSE assembly of rows [E, N-1) of out->seq (weights, offsets, shift, scatter of every piece; fills
 * the report's top anchors and times); forced: the diagnostics hook or NULL; row_score (host [N] or NULL): with
 * recompute_frac, the spread score of every offset-corrected placeholder row (kvcomm_spread) at its position */
/* whether a REUSE call needs the spread scores: kvcomm.recompute_frac or kvcomm.recompute_spread is on */
/* The first row after the last shared placeholder of a REUSE report: the agent's own text and the chat suffix start
 * there (kvcomm.recompute_rank's ranking pass, the attention oracles); -1 when no placeholder is shared. */
static inline int comm_own_rows_from(const kvm_comm_report_t *r) {
    int from = -1;
    for (int i = 0; i < r->n_placeholders; i++)
        if (r->ph[i].decision == KVM_PH_SHARED && r->ph[i].start_pos + r->ph[i].tokens > from)
            from = r->ph[i].start_pos + r->ph[i].tokens;
    return from;
}
static inline bool comm_wants_scores(const kvm_kvcomm_config_t *cfg) {
    return cfg->recompute_frac > 0 || cfg->recompute_spread > 0 || cfg->guard; /* the guard may raise the fraction */
}
/* kvcomm.guard (guard.c): the recompute fraction of consumer `agent` (cfg.recompute_frac when the guard is off). */
float comm_guard_frac(kvm_comm_t *c, const char *agent);
/* A REUSE call of `agent`: counts it; 0 unchecked (or the guard off), 1 checked now (the guard's warm-up:
 * comm_guard_check before the call is served), 2 checked after its generation (comm_guard_check_after), or
 * KVM_ENOMEM. */
int comm_guard_sample(kvm_comm_t *c, const char *agent);
/* The check of one assembled REUSE prompt (after its recompute pass; E = its exact rows) against a dense prefill; on a
 * difference the call is served from the dense rows (p->seq replaced, its rows counted as recomputed). */
int comm_guard_check(kvm_comm_t *c, const char *agent, kvm_prepared_t *p, int E);
/* The same check after the call's generation, on `reuse`: a fork of the served assembled rows (N-1 of ids, E exact;
 * decoded on and truncated back, never the served sequence); r->guard 1 agreed, 3 differed (the fraction went up). */
int comm_guard_check_after(kvm_comm_t *c, const char *agent, kvm_seq_t *reuse, const int32_t *ids, int N, int E,
                           kvm_comm_report_t *r);
/* Merges a consumer's guard state read from a state file (comm_state.c) into c: each figure becomes the larger of the
 * two (the fraction never goes down). 0 or KVM_ENOMEM. */
int comm_guard_restore(kvm_comm_t *c, const comm_guard_t *saved);
int comm_dev_reuse(kvm_comm_request_t *rq, const kvm_template_t *t, const comm_piece_t *pcs, const comm_forced_t *forced,
                   kvm_prepared_t *out, int E, int N, float *row_score);

#endif
