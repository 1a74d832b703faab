/* bench_c2c_timing.c - `kvmesh bench c2c --timing` (placeholder while being written). */
#include <stdio.h>

#include <kvmesh.h>
#include <kvmesh_lab.h>

#include "bench.h"

int lab_bench_c2c_timing(int argc, char **argv, kvm_lab_params_fn fill) {
    (void)argc, (void)argv, (void)fill;
    fprintf(stderr, "kvmesh bench c2c --timing: not built yet\n");
    return 1;
}
