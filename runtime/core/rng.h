/* rng.h - the one seeded pseudo-random generator of kvmesh: xoshiro256** (Blackman & Vigna) with its
 * state filled by splitmix64. It is the generator the minitasks data was made with, so its seeding
 * (several words folded through splitmix64) must never change: every accuracy figure of the project
 * depends on the exact stream.
 *
 * Ownership: a kvm_rng_t is a plain value (32 bytes, no heap); copy it to fork a stream. Not
 * thread-safe: one generator per thread or per consumer. No dependency beyond include/, so that
 * scripts/train can build the minitasks generator from a few files. */
#ifndef KVM_RNG_H
#define KVM_RNG_H

/* kvm_rng_t and its functions (seed_words, seed, next, double, below, range) and kvm_splitmix64_next are declared
 * in include/kvmesh_lab.h: the minitasks generator of lab/ draws from them. */
#include <kvmesh_lab.h>

#endif
