/* kvmesh.c - the `kvmesh` command: a thin dispatcher over the subcommands in cli/cmd_*.c and, for bench, eval and
 * minitasks, in lab/ (lab/lab.h: the CLI links kvmesh_lab and hands them its environment mapping).
 * Each subcommand is `int cmd_<name>(int argc, char **argv)` (argv[0] = subcommand name) returning the
 * process exit status. Subcommands not linked in (weak symbols) say so. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kvmesh.h>

#include "cli_env.h"
#include "lab/lab.h"

typedef int (*cmd_fn)(int, char **);
#define KVM_WEAK __attribute__((weak))
KVM_WEAK int cmd_generate(int, char **);
KVM_WEAK int cmd_tokenize(int, char **);
KVM_WEAK int cmd_run(int, char **);
KVM_WEAK int cmd_serve(int, char **);
KVM_WEAK int cmd_client(int, char **);
KVM_WEAK int cmd_trace(int, char **);
KVM_WEAK int cmd_info(int, char **);

static int cmd_bench(int argc, char **argv) { return kvm_lab_cmd_bench(argc, argv, cli_env_model_params); }
static int cmd_eval(int argc, char **argv) { return kvm_lab_cmd_eval(argc, argv, cli_env_model_params); }
static int cmd_minitasks(int argc, char **argv) { return kvm_lab_cmd_minitasks(argc, argv); }
static int cmd_c2c(int argc, char **argv) { return kvm_lab_cmd_c2c(argc, argv, cli_env_model_params); }

static const struct {
    const char *name;
    cmd_fn *fn;
    const char *help;
} cmds[] = {
    {"generate", (cmd_fn *)0, "generate text from a prompt, streaming tokens"},
    {"tokenize", (cmd_fn *)0, "print the token ids of a text as a JSON array"},
    {"info", (cmd_fn *)0, "describe a model and the backend that would run it"},
    {"eval", (cmd_fn *)0, "evaluate a model on a task suite (minitasks)"},
    {"minitasks", (cmd_fn *)0, "generate minitasks items (training / evaluation data)"},
    {"run", (cmd_fn *)0, "run a Lua workflow of agents"},
    {"serve", (cmd_fn *)0, "serve a runtime over ZeroMQ (docs/protocol.md)"},
    {"client", (cmd_fn *)0, "talk to a kvmesh serve daemon: run workflows, stream tokens"},
    {"trace", (cmd_fn *)0, "inspect run traces"},
    {"bench", (cmd_fn *)0, "run a benchmark (engine, kvcomm, ...)"},
    {"c2c", (cmd_fn *)0, "C2C fuser files: write an untrained fuser for a model pair (tests, examples)"},
};

static cmd_fn lookup(const char *name) {
    if (!strcmp(name, "generate")) return cmd_generate;
    if (!strcmp(name, "tokenize")) return cmd_tokenize;
    if (!strcmp(name, "info")) return cmd_info;
    if (!strcmp(name, "eval")) return cmd_eval;
    if (!strcmp(name, "minitasks")) return cmd_minitasks;
    if (!strcmp(name, "run")) return cmd_run;
    if (!strcmp(name, "serve")) return cmd_serve;
    if (!strcmp(name, "client")) return cmd_client;
    if (!strcmp(name, "trace")) return cmd_trace;
    if (!strcmp(name, "bench")) return cmd_bench;
    if (!strcmp(name, "c2c")) return cmd_c2c;
    return NULL;
}

static void usage(FILE *f) {
    fprintf(f, "kvmesh %s - a runtime for multi-agent LLM systems that share KV caches\n\n", kvm_version());
    fprintf(f, "usage: kvmesh <command> [options]    (kvmesh <command> --help for its options)\n\ncommands:\n");
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
        cmd_fn fn = lookup(cmds[i].name);
        fprintf(f, "  %-10s %s%s\n", cmds[i].name, cmds[i].help, fn ? "" : " (not in this build)");
    }
    fprintf(f, "\nenvironment: KVM_THREADS=N (CPU threads), KVM_BACKEND=auto|cpu|cuda, KVM_LOG=debug|info|warn|error,\n"
               "  KVM_DEVICE_DTYPE, KVM_KV_DTYPE=f32|f16|bf16, KVM_CUDA_GRAPHS=0|1, KVM_SYNTHETIC_SEED=N, KVM_CUDA_*\n"
               "  (every variable and its values: docs/cli.md)\n");
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("kvmesh %s\n", kvm_version());
        return 0;
    }
    /* the process-wide settings of the environment (cli_env.h); per-model ones are read by each subcommand */
    if (cli_env_apply()) {
        fprintf(stderr, "kvmesh: %s\n", kvm_errmsg());
        return 2;
    }
    cmd_fn fn = lookup(argv[1]);
    if (!fn) {
        for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
            if (!strcmp(cmds[i].name, argv[1])) {
                fprintf(stderr, "kvmesh: '%s' is not part of this build yet\n", argv[1]);
                return 2;
            }
        fprintf(stderr, "kvmesh: unknown command '%s'\n\n", argv[1]);
        usage(stderr);
        return 2;
    }
    return fn(argc - 1, argv + 1);
}
