/* stats.h - small helpers the benchmarks and the team workload share: order statistics of timings and the
 * stateless mix of seeded random token ids. */
#ifndef KVM_LAB_STATS_H
#define KVM_LAB_STATS_H

#include <stdint.h>

/* Median, 10th and 90th percentile (nearest rank, floor / ceil) and mean of v[0..n); zeros when n <= 0. v is not
 * changed (sorted in a copy); a copy that cannot be allocated gives zeros too. */
typedef struct lab_stats {
    double med, p10, p90, mean;
    int n;
} lab_stats_t;
lab_stats_t lab_stats_of(const double *v, int n);
/* The median alone. */
double lab_median(const double *v, int n);

/* splitmix64's output for x (a stateless mix: the same x gives the same bits on every machine). */
uint64_t lab_mix64(uint64_t x);

#endif
