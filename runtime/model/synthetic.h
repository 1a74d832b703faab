/* synthetic.h - models with real shapes and seeded synthetic weights (for benchmarks and parity tests).
 *
 * Weight element i of tensor t is  mean + stddev * z,  z = (u1 + u2 + u3 + u4 - 2) * sqrt(3), where the
 * u are 24-bit uniforms from splitmix64(seed ^ (t * 0x9E37...) + 4 i + k). The generator is written so
 * that the host (C) and the device (CUDA) produce bit-identical values, so a model generated on the GPU
 * and the same model generated on the CPU are the same model. Every report that uses these models must
 * say that the weights are synthetic. */
#ifndef KVM_SYNTHETIC_H
#define KVM_SYNTHETIC_H

#include <stdint.h>

#ifdef __CUDACC__
#define KVM_HD __host__ __device__ __forceinline__
#else
#define KVM_HD static inline
#endif

KVM_HD uint64_t kvm_splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* The i-th synthetic value of the stream `seed` (already mixed with the tensor id), in fp32. */
KVM_HD float kvm_synthetic_value(uint64_t seed, uint64_t i, float stddev, float mean) {
    uint64_t h0 = kvm_splitmix64(seed + 4 * i), h1 = kvm_splitmix64(seed + 4 * i + 1);
    uint64_t h2 = kvm_splitmix64(seed + 4 * i + 2), h3 = kvm_splitmix64(seed + 4 * i + 3);
    /* each u is an exact multiple of 2^-24, so the fp64 sum is exact on every machine */
    double s = (double)(h0 >> 40) + (double)(h1 >> 40) + (double)(h2 >> 40) + (double)(h3 >> 40);
    double z = (s * (1.0 / 16777216.0) - 2.0) * 1.7320508075688772;
    return (float)((double)mean + (double)stddev * z);
}

/* The stream seed of tensor `tensor_id` of a model generated with `seed`. */
KVM_HD uint64_t kvm_synthetic_stream(uint64_t seed, uint64_t tensor_id) {
    return kvm_splitmix64(seed ^ (tensor_id * 0xD1B54A32D192ED03ULL));
}

#ifndef __CUDACC__
#include "model.h"

/* Names understood by kvm_model_synthetic ("llama-3.1-8b", "qwen2.5-7b", "qwen3-0.6b", "qwen2.5-0.5b",
 * "llama-3.2-1b", "qwen3-8b", and the small "tiny-llama", "tiny-qwen2", "tiny-qwen3" for tests), one per
 * line into buf. */
void kvm_synthetic_list(char *buf, size_t cap);

/* Fills cfg with the real shapes of the named model (perf.md §2). KVM_ENOENT for an unknown name. */
int kvm_synthetic_config(const char *name, kvm_config_t *cfg);

/* Builds a model of the named shape with seeded synthetic weights (seed from KVM_SYNTHETIC_SEED, else 1234).
 * The weights are made directly in the backend's memory when the backend can generate them
 * (m->weights_on_device is then true and nothing is uploaded); otherwise on the host. The dtype is
 * opts->weight_dtype when set ("f32" = parity mode), else BF16. No tokenizer (m->tok == NULL).
 * Returns NULL + message on error; free with kvm_model_free(). */
kvm_model_t *kvm_model_synthetic(const char *name, const kvm_model_params_t *opts);

/* Generates n values of the stream (seed, tensor_id) into host memory in dtype dt (the same values the
 * device generator makes). */
void kvm_synthetic_fill_host(void *dst, kvm_dtype_t dt, size_t n, uint64_t seed, uint64_t tensor_id, float stddev,
                             float mean);
#endif

#endif
