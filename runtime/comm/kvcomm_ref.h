/* kvcomm_ref.h - the host fp32 reference of KVCOMM's arithmetic (kvcomm.md §3.4, §3.6, §5.2): the tests' oracle
 * for the one path (kvcomm_dev.c over the backend's ops). Not part of the production library (CMake target
 * kvmesh_comm_lab); only tests (and lab/) include it: it is their one door to comm's internals (comm_internal.h),
 * which no file outside runtime/comm includes itself. Everything here is single-threaded per call and allocates
 * with the counted allocator.
 *
 * Tensors are host fp32 in comm's layout (comm_internal.h): [L][2][H][rows][D], deltas [L-1][2][H][rows][D]. */
#ifndef KVM_COMM_KVCOMM_REF_H
#define KVM_COMM_KVCOMM_REF_H

#include "comm_internal.h"

/* The four weight tensors of a sample over N anchors (§3.6): placeholder weights per (anchor, token) [N][T],
 * text-segment weights per (anchor, layer, head, channel) [N][L][H][D]; K then V. */
typedef struct comm_ref_weights {
    int N, T;
    float *kph, *vph, *kpf, *vpf;
} comm_ref_weights_t;

/* §3.4: the prediction distances of s (host s->X, read if needed) to the anchors' host bases (a comm_dist_fn). */
int comm_ref_pred_dist(kvm_comm_t *c, comm_sample_t *s, comm_anchor_t **E, int n, double *d);
/* §3.6: the weights of base X (T rows) over anchors A[0..N) under c's kvcomm.weights (l2 | nearest). Free with
 * comm_ref_weights_free. */
int comm_ref_weights(kvm_comm_t *c, const float *X, int T, comm_anchor_t **A, int N, comm_ref_weights_t *w);
void comm_ref_weights_free(comm_ref_weights_t *w);
/* §3.6 in F0 on layers 1..L-1: out_ph[T rows] = X + mix(consumer's d_ph), out_pf[S rows] = P + mix(d_pf); either
 * output may be NULL; layer 0 is copied. */
void comm_ref_apply(kvm_comm_t *c, const float *X, const comm_ref_weights_t *w, comm_anchor_t **A, const char *consumer,
                    const float *P, int S, float *out_ph, float *out_pf, bool ph_offset, bool pf_offset);
/* recompute_frac's score (kvcomm.md §5.2): per row t, the weighted spread of the anchors' placeholder deltas
 * around the offset comm_ref_apply added (xh - X), over |X|^2, layers 1..L-1 (out[T]). */
void comm_ref_spread(kvm_comm_t *c, const float *X, const comm_ref_weights_t *w, comm_anchor_t **A, const char *consumer,
                     const float *xh, float *out);
/* The rows a REUSE prepare (report *r of template t in request rq) assembled before its recompute pass, recomputed
 * on the host: rows [r0, N-1) at their prompt positions (keys rotated there), r0 = the first placeholder's start,
 * into rows (host [L][2][H][N-1-r0][D]); score (host [N] or NULL): the spread score of every offset-corrected
 * placeholder row of a piece of at least recompute_below tokens, 0 elsewhere. */
int comm_ref_reuse_rows(kvm_comm_request_t *rq, const kvm_template_t *t, const kvm_comm_report_t *r, float *rows,
                        float *score);

#endif
