/* stats.c - order statistics and the id mix of the benchmarks (stats.h). */
#include "stats.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <kvmesh_lab.h>

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

lab_stats_t lab_stats_of(const double *v, int n) {
    lab_stats_t s = {0};
    double *t = n > 0 ? malloc((size_t)n * sizeof(double)) : NULL;
    if (!t) return s;
    memcpy(t, v, (size_t)n * sizeof(double));
    qsort(t, (size_t)n, sizeof(double), cmp_d);
    s.n = n;
    s.med = n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
    s.p10 = t[(int)floor(0.1 * (n - 1))];
    s.p90 = t[(int)ceil(0.9 * (n - 1))];
    for (int i = 0; i < n; i++) s.mean += t[i];
    s.mean /= n;
    free(t);
    return s;
}

double lab_median(const double *v, int n) { return lab_stats_of(v, n).med; }

uint64_t lab_mix64(uint64_t x) { return kvm_splitmix64_next(&x); }
