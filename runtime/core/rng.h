/* rng.h - the one seeded pseudo-random generator of kvmesh: xoshiro256** (Blackman & Vigna) with its
 * state filled by splitmix64. It is the generator the minitasks data was made with, so its seeding
 * (several words folded through splitmix64) must never change: every accuracy figure of the project
 * depends on the exact stream.
 *
 * Ownership: a kvm_rng_t is a plain value (32 bytes, no heap); copy it to fork a stream. Not
 * thread-safe: one generator per thread or per consumer. No dependency beyond <stdint.h>, so that
 * scripts/train can build the minitasks generator from a few files. */
#ifndef KVM_RNG_H
#define KVM_RNG_H

#include <stddef.h>
#include <stdint.h>

typedef struct kvm_rng {
    uint64_t s[4]; /* xoshiro256** state, never all zero */
} kvm_rng_t;

/* Seeds from n words (n may be 0): x starts at 0x243F6A8885A308D3; for each word, x ^= word and
 * x = splitmix64(x); then four more splitmix64 outputs of x fill the state. */
void kvm_rng_seed_words(kvm_rng_t *r, const uint64_t *words, size_t n);
/* kvm_rng_seed_words with one word. */
void kvm_rng_seed(kvm_rng_t *r, uint64_t seed);
/* Next 64 uniformly distributed bits. */
uint64_t kvm_rng_next(kvm_rng_t *r);
/* Uniform double in [0, 1) from the top 53 bits of one draw. */
double kvm_rng_double(kvm_rng_t *r);
/* Uniform integer in [0, n) without modulo bias (rejection); n == 0 gives 0 without drawing. */
uint64_t kvm_rng_below(kvm_rng_t *r, uint64_t n);
/* Uniform integer in [lo, hi] (lo <= hi). */
int kvm_rng_range(kvm_rng_t *r, int lo, int hi);

/* One splitmix64 step: advances *x by the golden-ratio increment and returns the mixed value. */
uint64_t kvm_splitmix64_next(uint64_t *x);

#endif
