/* comm_internal.h - structures shared by comm.c (templates, segments, prompt assembly) and kvcomm.c
 * (anchor pools, prediction, offset estimation). Not a public header. */
#ifndef KVM_COMM_INTERNAL_H
#define KVM_COMM_INTERNAL_H

#include "prompt.h"

/* KV geometry on the host: one tensor of n rows is fp32 [L][2][H][n][D] (K then V per layer). */
typedef struct comm_geom {
    int L, H, D;
} comm_geom_t;

static inline size_t comm_rows_elems(const comm_geom_t *g, int n) { return (size_t)g->L * 2 * g->H * n * g->D; }
/* element (l, kv, h, t, d) of a tensor of n rows starting at layer l0 (deltas start at layer 1) */
static inline size_t comm_idx(const comm_geom_t *g, int n, int l, int kv, int h, int t) {
    return ((((size_t)l * 2 + kv) * g->H + h) * n + t) * g->D;
}

/* Per-consumer deltas of an anchor (kvcomm.md §2.4), F0, layers 1..L-1: fp32 [L-1][2][H][rows][D]. */
typedef struct comm_delta {
    char consumer[KVM_COMM_NAME_MAX];
    uint64_t template_hash;
    float *d_ph; /* rows = anchor T */
    float *d_pf; /* rows = S */
    int S;
    int ph_src_start, pf_src_start;
} comm_delta_t;

typedef struct comm_anchor {
    int refs;
    uint64_t key;
    int T;
    float *base; /* [L][2][H][T][D] F0 */
    int src_start;
    comm_delta_t *deltas;
    int n_deltas, cap_deltas;
    uint32_t activation;
    uint64_t insert_seq;
    size_t bytes;
    struct comm_dev_anchor *dev; /* kvcomm_dev.c: device mirror of base and deltas, or NULL */
} comm_anchor_t;

typedef struct comm_pool {
    char name[KVM_COMM_NAME_MAX];
    comm_anchor_t **a;
    int n, cap;
    uint64_t created, evicted, predictions, predicted_new;
} comm_pool_t;

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
    struct comm_dev_ctx *dev;  /* kvcomm_dev.c: device scratch, or NULL */
    /* kvcomm.c, kvm_comm_prepare_oracle: true per-request rows that replace the estimated offsets of the
     * matching (consumer, placeholder, sample) inside comm_apply; set only for the duration of one prepare */
    struct comm_oracle *oracle;
    int n_oracle;
};

/* One oracle entry (fidelity diagnostics): the real F0 rows of a placeholder and of the text segment after
 * it in one consumer's dense prefill. which = KVM_ORACLE_PH | KVM_ORACLE_PF (prompt.h) says which of the two
 * replace the estimate. */
typedef struct comm_oracle {
    char consumer[KVM_COMM_NAME_MAX];
    char name[KVM_COMM_NAME_MAX];
    uint64_t key;
    int T, S, which;
    float *ph; /* [L][2][H][T][D] F0 */
    float *pf; /* [L][2][H][S][D] F0 */
} comm_oracle_t;

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
};

/* One sample (placeholder name, content) seen in a request. */
typedef struct comm_sample {
    char name[KVM_COMM_NAME_MAX];
    uint64_t key;
    int T;
    float *X;           /* F0 base [L][2][H][T][D] (host) */
    bool predicted, is_new;
    float entropy, threshold;
    int n_pool, n_eligible;
    comm_anchor_t *staged; /* anchor (name, key) created in this request, or NULL */
    /* weight cache: the usable anchor keys (sorted) and their four tensors */
    uint64_t *w_keys;
    int32_t *w_u;         /* kvcomm.align=content: [N][T] the anchor row each row takes its delta from (inside
                           * the w_keys allocation), else NULL */
    int w_n;
    float *w_kph, *w_vph; /* [N][T] */
    float *w_kpf, *w_vpf; /* [N][L][H][D] */
    struct comm_dev_sample *dev; /* kvcomm_dev.c: segment, device weights (X stays NULL until needed) */
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
    bool dev;               /* KVCOMM math on the backend for this request (kvcomm_dev.c) */
};

/* ---- kvcomm.c ---- */
comm_pool_t *comm_pool_get(kvm_comm_t *c, const char *name, bool create);
void comm_anchor_unref(kvm_comm_t *c, comm_anchor_t *a);
const comm_delta_t *comm_anchor_delta(const comm_anchor_t *a, const char *consumer);
/* the snapshot of pool `name` for this request (n = 0 when the pool did not exist at begin) */
comm_anchor_t **comm_snapshot(kvm_comm_request_t *rq, const char *name, int *n);
/* §3.4: runs the prediction of sample s against the snapshot (once per sample); stages bumps */
int comm_predict(kvm_comm_request_t *rq, comm_sample_t *s);
/* §3.5: the usable anchors of s for consumer/template_hash (T_a >= T, deltas present) */
int comm_usable(kvm_comm_request_t *rq, const comm_sample_t *s, const char *consumer, uint64_t thash,
                comm_anchor_t ***out, int *n);
/* §3.6: computes (or takes from the cache) the four weight tensors of s over anchors[0..n) */
int comm_weights(kvm_comm_t *c, comm_sample_t *s, comm_anchor_t **anchors, int n);
/* §3.6 application in F0 on layers 1..L-1: out_ph[T rows] = X + mix(d_ph), out_pf[S rows] = P + mix(d_pf);
 * either output may be NULL. Both outputs are full fp32 [L][2][H][rows][D] tensors (layer 0 copied). */
void comm_apply(kvm_comm_t *c, const comm_sample_t *s, comm_anchor_t **anchors, int n, const char *consumer,
                const float *P, int S, float *out_ph, float *out_pf, bool ph_offset, bool pf_offset);
/* kvcomm.frame = reference: the released code's frames (candidate rotated to t_ph, anchor bases to their
 * src_start, this consumer's deltas to its ph/pf_src_start, template text to t_pf); outputs are already at
 * their target positions (no shift afterwards). */
int comm_mix_reference(kvm_comm_t *c, const comm_sample_t *s, comm_anchor_t **A, int N, const char *consumer,
                       const float *P, int S, int t_ph, int t_pf, float *out_ph, float *out_pf, bool ph_offset,
                       bool pf_offset);
/* §3.8: fills the deltas of anchor (s->name, s->key) for consumer from the real (F0) rows; creates the
 * staged anchor if needed */
int comm_materialize(kvm_comm_request_t *rq, comm_sample_t *s, const char *consumer, uint64_t thash,
                     const float *real_ph, const float *real_pf, const float *P, int S, int ph_start, int pf_start);
/* commit at request end (§2.4 visibility, §3.9 eviction) */
int comm_commit(kvm_comm_request_t *rq);
void comm_request_free_state(kvm_comm_request_t *rq);
size_t comm_anchor_bytes(const comm_geom_t *g, const comm_anchor_t *a);

/* ---- kvcomm_dev.c: the device path (kernels/ops.h kvcomm_dist / kvcomm_softmax / kvcomm_apply) ----
 * Chosen per request (rq->dev) when the backend has the ops and is not the CPU (KVM_KVCOMM_DEVICE=1 forces it
 * on the CPU backend too, for tests; =0 turns it off), kvcomm.frame = f0 and kvcomm.weights != cosine.
 * Anchors keep their host fp32 data (the reference, filled by the DENSE path) and get a device mirror in the
 * pool dtype when committed; the REUSE path then reads only device memory. */
typedef struct comm_dev_ph {
    int decision, sample, t_ph, t_pf, T, S;
    kvm_segment_t *seg;
    comm_anchor_t **usable;
    int n_usable;
} comm_dev_ph_t;
bool comm_dev_on(kvm_comm_t *c);
void comm_dev_ctx_free(kvm_comm_t *c);
int comm_dev_anchor_sync(kvm_comm_t *c, comm_anchor_t *a);
void comm_dev_anchor_free(comm_anchor_t *a);
void comm_dev_template_free(kvm_template_t *t);
/* uploads the device copies of t's text segments now instead of at its first REUSE (not yet called by comm.c) */
int comm_dev_template_prepare(kvm_template_t *t);
/* device weight buffers allocated so far by c's device path (a steady stream of requests reuses them) */
int comm_dev_weight_buffers_made(const kvm_comm_t *c);
int comm_dev_sample_bind(kvm_comm_t *c, comm_sample_t *s, const kvm_segment_t *seg);
void comm_dev_sample_free(comm_sample_t *s);
/* reads the sample's F0 base to host fp32 s->X if it is not there (the DENSE path needs it) */
int comm_dev_sample_x(kvm_comm_t *c, comm_sample_t *s);
/* §3.4 distances d[n] (raw or per element, as the host loop) of s to anchors E[0..n) */
int comm_dev_pred(kvm_comm_t *c, comm_sample_t *s, comm_anchor_t **E, int n, double *d);
/* §3.6/§3.7 REUSE assembly of rows [E, N-1) of out->seq on the backend (fills the report's counts and times);
 * row_score (host [N] or NULL): with recompute_frac and recompute_select=spread, the spread score of every
 * offset-corrected placeholder row is written at its position (as the host path's comm_spread_scores) */
int comm_dev_reuse(kvm_comm_request_t *rq, const kvm_template_t *t, const comm_dev_ph_t *ph, kvm_prepared_t *out,
                   int E, int N, float *row_score);

/* kvcomm.c, recompute_select=spread: per row t of the sample (out[T]), the weighted spread of the anchors'
 * placeholder deltas around the offset comm_apply added (xh - X), over |X|^2, layers 1..L-1. */
void comm_spread_scores(kvm_comm_t *c, const comm_sample_t *s, comm_anchor_t **A, int N, const char *consumer,
                        const float *xh, float *out);
/* kvcomm.c: how kvm_comm_prepare counted row `row` of a REUSE prompt: 0 exact, 1 offset, 2 naive. */
int comm_reuse_row_cat(const kvm_comm_report_t *r, const kvm_kvcomm_config_t *cfg, int row);

#endif
