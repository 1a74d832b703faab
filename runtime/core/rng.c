/* rng.c - the seeded PRNG (see rng.h). Bit-exact with the generator lab/minitasks.c (runtime/eval/ then) had
 * before it moved here: tests/test_rng.c pins the first outputs. */
#include "rng.h"

uint64_t kvm_splitmix64_next(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

void kvm_rng_seed_words(kvm_rng_t *r, const uint64_t *words, size_t n) {
    uint64_t x = 0x243F6A8885A308D3ULL;
    for (size_t i = 0; i < n; i++) {
        x ^= words[i];
        x = kvm_splitmix64_next(&x);
    }
    for (int i = 0; i < 4; i++) r->s[i] = kvm_splitmix64_next(&x);
}

void kvm_rng_seed(kvm_rng_t *r, uint64_t seed) { kvm_rng_seed_words(r, &seed, 1); }

uint64_t kvm_rng_next(kvm_rng_t *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double kvm_rng_double(kvm_rng_t *r) { return (double)(kvm_rng_next(r) >> 11) * (1.0 / 9007199254740992.0); }

uint64_t kvm_rng_below(kvm_rng_t *r, uint64_t n) {
    if (n == 0) return 0;
    uint64_t lim = UINT64_MAX - UINT64_MAX % n;
    uint64_t v;
    do v = kvm_rng_next(r);
    while (v >= lim);
    return v % n;
}

int kvm_rng_range(kvm_rng_t *r, int lo, int hi) { return lo + (int)kvm_rng_below(r, (uint64_t)((int64_t)hi - lo + 1)); }
