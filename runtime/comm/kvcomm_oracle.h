/* kvcomm_oracle.h - the fidelity oracle of KVCOMM (kvcomm.md §5.2): a diagnostic, not a policy. Not part of the
 * production library (CMake target kvmesh_comm_lab): the team workload's oracle* modes (lab/) and the tests use it.
 * Its contract (kvm_comm_prepare_oracle, KVM_ORACLE_PH / _PF / _ALL) is declared in include/kvmesh_lab.h. */
#ifndef KVM_COMM_KVCOMM_ORACLE_H
#define KVM_COMM_KVCOMM_ORACLE_H

#include <kvmesh_lab.h>

#include "prompt.h"

#endif
