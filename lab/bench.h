/* bench.h - the benchmarks of `kvmesh bench` (lab/): the dispatcher kvm_lab_cmd_bench (lab.h, bench_engine.c) runs
 * `bench engine` itself and hands `bench kvcomm` to bench_kvcomm.c. */
#ifndef KVM_LAB_BENCH_H
#define KVM_LAB_BENCH_H

#include <cjson/cJSON.h>

#include "lab.h"

/* `kvmesh bench kvcomm` (argv[0] = "kvcomm"): the TTFT and team workloads; the process exit status. */
int lab_bench_kvcomm(int argc, char **argv, kvm_lab_params_fn fill);

/* `kvmesh bench c2c` (argv[0] = "c2c"): the blinded-receiver demonstration of C2C (spec section 9) and, with
 * --timing, the fusion cost against the text hand-off (bench_c2c.c, bench_c2c_timing.c); the process exit status. */
int lab_bench_c2c(int argc, char **argv, kvm_lab_params_fn fill);
int lab_bench_c2c_timing(int argc, char **argv, kvm_lab_params_fn fill);

/* `kvmesh bench blame` (argv[0] = "blame"): failure attribution on Who&When, on injected errors, and the schema
 * cache's query latency (bench_blame.c); the process exit status. */
int lab_bench_blame(int argc, char **argv, kvm_lab_params_fn fill);

/* The corrupted text that replaces agent step t of f in bench blame's error injection (kind 0..3: a fabricated number,
 * a line of the task, a premature final answer, an empty answer), into buf[cap] (bench_blame.c). */
void lab_blame_corrupt(kvm_rng_t *r, const kvm_failure_t *f, int t, int kind, char *buf, size_t cap);
/* Removes the folder root and everything under it (bench_blame.c). */
void lab_rm_tree(const char *root);
/* A quiet runtime tracing under root, on the bundled model (or model, or mock), with lab's host functions; NULL +
 * message (bench_blame.c). */
kvm_runtime_t *lab_blame_runtime(kvm_lab_params_fn fill, bool mock, const char *model, const char *root);
/* The comma-separated paths of list into paths (at most 8); how many (bench_blame.c). */
int lab_split_list(const char *list, char paths[8][512]);

/* `kvmesh bench blame --verify`: errors injected into real runs of the workflows of list (comma-separated) by replays,
 * blamed without and with replays (budget per failure) beside the baselines; figures into out (bench_blame_verify.c).
 * 0, or -1 (said). */
int lab_bench_blame_verify(kvm_lab_params_fn fill, bool mock, const char *model, const char *list, int runs, uint64_t seed,
                           int budget, cJSON *out);

#endif
