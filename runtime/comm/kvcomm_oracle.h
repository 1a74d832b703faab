/* kvcomm_oracle.h - the fidelity oracle of KVCOMM (kvcomm.md §5.2): a diagnostic, not a policy. Not part of the
 * production library (CMake target kvmesh_comm_lab): the team workload's oracle* modes and the tests use it.
 *
 * kvm_comm_prepare_oracle prepares like kvm_comm_prepare, but where the agent runs REUSE the estimated offset of
 * every SHARED placeholder (or only of the one named `only`) is replaced by the true delta of this very prompt: a
 * dense prefill of the same ids is computed, and an anchor made of the sample's own base and the dense rows
 * (re-based to F0) becomes, with weight 1, the only anchor of that piece on the one path (kvcomm_dev.c), which so
 * adds exactly the true offset (placeholder rows if which & KVM_ORACLE_PH, the text segment after it if
 * which & KVM_ORACLE_PF; layer 0 never, as always). Decisions, frames, rotation, assembly and the recompute pass
 * are the production ones: with which = KVM_ORACLE_ALL the assembled cache equals the dense prefill (to float
 * rounding) unless positions, frames or the assembly are wrong. DENSE agents are prepared as usual. On error *out
 * is released. Single-threaded per comm context, like kvm_comm_prepare. */
#ifndef KVM_COMM_KVCOMM_ORACLE_H
#define KVM_COMM_KVCOMM_ORACLE_H

#include "prompt.h"

/* Which estimates the oracle replaces (the same bits as the assemble stage's COMM_FORCE_*). */
enum { KVM_ORACLE_PH = 1, KVM_ORACLE_PF = 2, KVM_ORACLE_ALL = 3 };

int kvm_comm_prepare_oracle(kvm_comm_request_t *rq, const kvm_prompt_t *p, int which, const char *only,
                            kvm_prepared_t *out);

#endif
