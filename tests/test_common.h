/* test_common.h - small helpers several test programs share: a temporary-directory fixture, the
 * relative difference of two float arrays, token ids read from a JSON array, main() running one group of
 * tests. Everything here is a macro or static inline, so a test program carries only what it uses. */
#ifndef KVM_TEST_COMMON_H
#define KVM_TEST_COMMON_H

#include <ftw.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <cjson/cJSON.h>

/* main() of a test program: runs the CMUnitTest entries given (cmocka_unit_test(...), ...) as one group with
 * the group fixtures setup and teardown (NULL for none). */
#define TC_MAIN(setup, teardown, ...)                                                                      \
    int main(void) {                                                                                       \
        const struct CMUnitTest tests[] = {__VA_ARGS__};                                                   \
        return cmocka_run_group_tests(tests, setup, teardown);                                             \
    }

/* Skips the calling cmocka test, saying why, unless this build has the wgmma prefill attention and its GPU runs it
 * (kvm_cuda_attn_wg_available, kvmesh_lab.h). */
#define TC_NEED_WGMMA()                                                                                    \
    do {                                                                                                   \
        if (!kvm_cuda_attn_wg_available()) {                                                               \
            printf("  SKIPPED: the wgmma kernel needs an sm_90a build (CMAKE_CUDA_ARCHITECTURES with 90a) " \
                   "on a Hopper GPU\n");                                                                   \
            skip();                                                                                        \
        }                                                                                                  \
    } while (0)

static inline int tc_rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

/* Defines the group fixture `setup` (creates a fresh directory /tmp/<prefix>_XXXXXX, its path in g_dir)
 * and `teardown` (removes it with all it holds), for cmocka_run_group_tests(tests, setup, teardown). */
#define TC_TMPDIR_FIXTURE(prefix)                                                                          \
    static char g_dir[256];                                                                                \
    static int setup(void **st) {                                                                          \
        (void)st;                                                                                          \
        snprintf(g_dir, sizeof g_dir, "/tmp/%s_XXXXXX", prefix);                                          \
        return mkdtemp(g_dir) ? 0 : -1;                                                                    \
    }                                                                                                      \
    static int teardown(void **st) {                                                                       \
        (void)st;                                                                                          \
        return nftw(g_dir, tc_rm_entry, 8, FTW_DEPTH | FTW_PHYS);                                          \
    }

/* max |a - b| / max |b| over n floats (the denominator 1 when b is all zeros). */
static inline float tc_max_rel(const float *a, const float *b, size_t n) {
    float md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        md = fmaxf(md, fabsf(a[i] - b[i]));
        mr = fmaxf(mr, fabsf(b[i]));
    }
    return md / (mr > 0 ? mr : 1);
}

/* The integers of a JSON array into out[0..cap); returns the array's length (which may exceed cap). */
static inline int tc_read_ids(const cJSON *arr, int32_t *out, int cap) {
    int n = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, arr) {
        if (n < cap) out[n] = (int32_t)v->valuedouble;
        n++;
    }
    return n;
}

#endif
