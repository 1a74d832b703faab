/* synthetic.h - models with real shapes and seeded synthetic weights (for benchmarks and parity tests).
 *
 * The weights come from the generator of kernels/synthetic_gen.h (host and device produce bit-identical
 * values, so a model generated on the GPU and the same model generated on the CPU are the same model).
 * Every report that uses these models must say that the weights are synthetic. */
#ifndef KVM_SYNTHETIC_H
#define KVM_SYNTHETIC_H

#include <stdint.h>

#include "../../kernels/synthetic_gen.h"
#include "model.h"

/* Names understood by kvm_model_synthetic ("llama-3.1-8b", "qwen2.5-7b", "qwen3-0.6b", "qwen2.5-0.5b",
 * "llama-3.2-1b", "qwen3-8b", and the small "tiny-llama", "tiny-qwen2", "tiny-qwen3" for tests), one per
 * line into buf. */
void kvm_synthetic_list(char *buf, size_t cap);

/* Fills cfg with the real shapes of the named model (perf.md §2). KVM_ENOENT for an unknown name. */
int kvm_synthetic_config(const char *name, kvm_config_t *cfg);

/* Builds a model of the named shape with seeded synthetic weights (seed opts->synthetic_seed when set, else
 * 1234). The weights are made directly in the backend's memory when the backend can generate them
 * (m->weights_on_device is then true and nothing is uploaded); otherwise on the host. The dtype is
 * opts->device_dtype when set (F32 = parity mode), else BF16; the other options as for kvm_model_load.
 * No tokenizer (m->tok == NULL). Returns NULL + message on error (bad options included); free with
 * kvm_model_free(). */
kvm_model_t *kvm_model_synthetic(const char *name, const kvm_load_opts_t *opts);

/* Generates n values of the stream (seed, tensor_id) into host memory in dtype dt (the same values the
 * device generator makes). */
void kvm_synthetic_fill_host(void *dst, kvm_dtype_t dt, size_t n, uint64_t seed, uint64_t tensor_id, float stddev,
                             float mean);

#endif
