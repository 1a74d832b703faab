/* test_cublas_lazy.c - cuBLAS is loaded when the CUDA backend first needs it (kernels/cuda/cublas_lazy.c), not when
 * a process that links libkvmesh starts (linking it cost every kvmesh command and test ~0.35 s of start-up). Runs
 * where the CUDA backend is built (no GPU needed: loading the library does not touch one); skipped elsewhere. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#ifdef KVM_HAVE_CUDA
const char *kvm_cublas_load_error(void);
const char *kvm_cublas_soname(void);

static bool mapped(const char *lib) {
    FILE *f = fopen("/proc/self/maps", "r");
    assert_non_null(f);
    char line[4096];
    bool found = false;
    while (!found && fgets(line, sizeof line, f)) found = strstr(line, lib) != NULL;
    fclose(f);
    return found;
}

static void test_cublas_is_not_mapped_until_first_use_then_loads_from_the_toolkit(void **st) {
    (void)st;
    assert_false(mapped("libcublas")); /* neither libcublas nor libcublasLt at start */
    const char *err = kvm_cublas_load_error(); /* the first use */
    if (err) fprintf(stderr, "cannot load %s: %s\n", kvm_cublas_soname(), err);
    assert_null(err);
    assert_true(mapped(kvm_cublas_soname()));
    assert_null(kvm_cublas_load_error()); /* loaded once */
}
#else
static void test_cublas_is_not_mapped_until_first_use_then_loads_from_the_toolkit(void **st) {
    (void)st;
    fprintf(stderr, "SKIP: built without the CUDA backend (no cuBLAS to load)\n");
    skip();
}
#endif

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cublas_is_not_mapped_until_first_use_then_loads_from_the_toolkit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
