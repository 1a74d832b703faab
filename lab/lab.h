/* lab.h - what lab/ (CMake target kvmesh_lab) offers the programs that link it: the `kvmesh` command's research
 * subcommands (bench, eval, minitasks) and the host functions that give workflow scripts the minitasks data.
 *
 * lab/ is evaluation and research code on top of the library: it includes only <kvmesh.h>, <kvmesh_lab.h>, its own
 * headers and libc / cJSON (tests/cli/lab_includes.sh checks it), and the runtime library links none of it.
 * Everything here runs on the calling thread; messages go to stderr, results to stdout. */
#ifndef KVM_LAB_H
#define KVM_LAB_H

#include <kvmesh.h>

/* Registers lab's host functions on rt (kvm_runtime_add_function), for every workflow loaded into it afterwards:
 *   kvmesh.minitasks.item{task = "team", seed = 1000, index = i, role = 0 | "finder", split = "eval"}
 *     -> {system, user, answer, id, role}: an item of the minitasks suite (lab/minitasks.h; every field optional:
 *        task and role drawn as kvm_mt_make does, seed KVM_MT_DEFAULT_EVAL_SEED, index 0, split "eval").
 * 0, or the KVM_E* code of kvm_runtime_add_function (e.g. a name registered before). */
int kvm_lab_add_functions(kvm_runtime_t *rt);

/* Completes model parameters that the command line left unset (NULL strings, zero numbers), e.g. from the
 * program's environment (the kvmesh command passes cli_env_model_params); 0 or a KVM_E* code with a message. */
typedef int (*kvm_lab_params_fn)(kvm_model_params_t *p);

/* The subcommands, as mains: argv[0] is the subcommand's name ("bench", "eval", "minitasks"); the result is the
 * process exit status (0 ok, 1 failure, 2 usage error). fill may be NULL. Options and output: docs/cli.md. */
int kvm_lab_cmd_bench(int argc, char **argv, kvm_lab_params_fn fill);
int kvm_lab_cmd_eval(int argc, char **argv, kvm_lab_params_fn fill);
int kvm_lab_cmd_minitasks(int argc, char **argv);
/* `kvmesh c2c init`: writes an untrained C2C fuser for a model pair; `kvmesh c2c docs`: the blinded-receiver documents
 * of spec §9 (lab/cmd_c2c.c, lab/c2c_docs.c). */
int kvm_lab_cmd_c2c(int argc, char **argv, kvm_lab_params_fn fill);

#endif
