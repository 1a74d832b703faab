/* synthetic_gen.h - the synthetic-weight generator, shared by the host (C) and the device (CUDA) (L0).
 *
 * Weight element i of tensor t is  mean + stddev * z,  z = (u1 + u2 + u3 + u4 - 2) * sqrt(3), where the
 * u are 24-bit uniforms from splitmix64(stream + 4 i + k) and stream = kvm_synthetic_stream(seed, t).
 * The functions are written so that the host and the device produce bit-identical values, so a model
 * generated on the GPU and the same model generated on the CPU are the same model (kernels/cuda's
 * fill_synthetic op and runtime/model/synthetic.c both use this header). Header-only; no state. */
#ifndef KVM_SYNTHETIC_GEN_H
#define KVM_SYNTHETIC_GEN_H

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

#endif
