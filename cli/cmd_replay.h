/* cmd_replay.h - counterfactual replays for the CLI (`kvmesh trace replay --from-step`, `kvmesh trace blame
 * --verify`; docs/correct.md): the runtime a replay runs on, and the command. */
#ifndef KVM_CLI_CMD_REPLAY_H
#define KVM_CLI_CMD_REPLAY_H

#include <stdbool.h>

#include <kvmesh.h>

/* Whether the run traced in dir used the mock model (a resume or a replay uses it too unless --model says
 * otherwise). */
bool cli_trace_was_mock(const char *dir);

/* A runtime for replaying the run traced in run_dir: the model of the trace (mock when the trace was, unless model
 * is given), mock forces it; replays are traced under trace_root (NULL: the folder holding run_dir); the scripts'
 * host functions (kvmesh.minitasks). NULL + message (printed, prefixed by cmd). */
kvm_runtime_t *cli_replay_runtime(const char *cmd, const char *run_dir, const char *model, bool mock, const char *trace_root);

/* `kvmesh trace replay RUN_DIR --from-step N [--kv P] [--seed S] [--edit-output FILE] [--model PATH | --mock]
 * [--trace DIR]`. */
int cmd_trace_replay_from(int argc, char **argv);

#endif
