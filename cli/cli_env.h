/* cli_env.h - the one place where the CLI turns its documented environment variables into library parameters.
 *
 * The library reads no environment (docs/cli.md lists every variable and its values). main() applies the
 * process-wide settings once; every subcommand that loads a model fills its kvm_load_opts_t here. Empty
 * variables count as unset; any other value that is not one of the variable's values is an error whose
 * message names the variable and the accepted values. The test programs apply the same mapping
 * (tests/support/test_env.c), so the variables work for them too. */
#ifndef KVM_CLI_ENV_H
#define KVM_CLI_ENV_H

#include <stdbool.h>

#include <kvmesh.h>

/* Applies KVM_LOG (kvm_log_set_level), KVM_THREADS (kvm_set_threads) and the CUDA backend's switches
 * KVM_CUDA_* and KVM_KVCOMM_DIST (kvm_cuda_set_opts). 0, or KVM_EINVAL with nothing applied from the bad
 * variable on; a KVM_CUDA_* variable that is no setting is an error too. */
int cli_env_apply(void);

/* Whether KVM_LOG sets the log level (commands that quieten the log by default leave it alone then). */
bool cli_env_log_given(void);

/* Fills what p leaves unset (NULL strings, zero numbers) from KVM_BACKEND, KVM_DEVICE_DTYPE (weight_dtype),
 * KVM_KV_DTYPE, KVM_CUDA_GRAPHS=0|1 and KVM_SYNTHETIC_SEED: flags the caller parsed first win. 0, or KVM_EINVAL
 * naming the variable and its values. */
int cli_env_model_params(kvm_model_params_t *p);

#endif
