/* test_env.c - linked into every C test: applies the environment as the kvmesh command does (cli/cli_env.h)
 * before main, so that KVM_THREADS (CMake gives the tests KVM_THREADS=2), KVM_LOG and the CUDA switches
 * (KVM_CUDA_*, KVM_KVCOMM_DIST: scripts/gpu runs tests with them) work for the tests too. The library itself
 * reads no environment. A bad value stops the test program with the message (exit 2). */
#include <stdio.h>
#include <stdlib.h>

#include "cli/cli_env.h"

__attribute__((constructor)) static void kvm_test_env(void) {
    if (cli_env_apply()) {
        fprintf(stderr, "test environment: %s\n", kvm_errmsg());
        exit(2);
    }
}
