/* test_lab_functions.c - lab's host functions (lab/lab.h) as a program registers them on a runtime: what
 * kvmesh.minitasks.item returns is the generator's item, bad arguments are Lua errors naming the function, and a
 * runtime without lab's functions has no kvmesh.minitasks. Scripts check inside Lua; the test checks that they
 * load (the checks run at load time). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include <kvmesh.h>

#include "lab/lab.h"
#include "lab/minitasks.h"
#include "tests/support/test_runtime.h"

/* A graph around `checks` (Lua run at load time). */
static kvm_workflow_t *load_with(kvm_runtime_t *rt, const char *checks) {
    char src[4096];
    snprintf(src, sizeof src,
             "local kvm = kvmesh\n%s\n"
             "local g = kvm.graph{ name = 't' }\n"
             "g:agent('a', { model = kvm.model('mock:echo'), template = '{input}', max_tokens = 2 })\n"
             "g:edge(kvm.START, 'a')\n"
             "return g\n",
             checks);
    return kvm_workflow_load_string(rt, "t.lua", src, strlen(src), NULL);
}

/* The checks pass: the graph around them loads. */
static void assert_loads(kvm_runtime_t *rt, const char *checks) {
    kvm_workflow_t *wf = load_with(rt, checks);
    if (!wf) fail_msg("%s", kvm_errmsg());
    kvm_workflow_free(wf);
}

static void test_minitasks_item_returns_the_generators_item(void **s) {
    (void)s;
    kvm_mt_item_t it;
    assert_int_equal(kvm_mt_make(&it, KVM_MT_TEAM, KVM_MT_EVAL, 1000, 7, 2), 0);
    kvm_runtime_t *rt = mock_runtime(NULL);
    assert_int_equal(kvm_lab_add_functions(rt), 0);
    char checks[2048];
    snprintf(checks, sizeof checks,
             "local it = kvm.minitasks.item{ task = 'team', index = 7, role = 'reverser' }\n"
             "assert(it.id == [[%s]], it.id)\n"
             "assert(it.answer == [[%s]], it.answer)\n"
             "assert(it.system == [[%s]], it.system)\n"
             "assert(it.role == 2, it.role)\n"
             "assert(kvm.minitasks.item{ task = 'team', index = 7, role = 2, seed = 1000, split = 'eval' }.user == it.user)\n",
             it.id, it.answer, it.system);
    assert_loads(rt, checks);
    kvm_runtime_free(rt);
}

static void test_an_unknown_task_is_a_lua_error_naming_the_function(void **s) {
    (void)s;
    kvm_runtime_t *rt = mock_runtime(NULL);
    assert_int_equal(kvm_lab_add_functions(rt), 0);
    assert_null(load_with(rt, "kvmesh.minitasks.item{ task = 'nope' }"));
    assert_non_null(strstr(kvm_errmsg(), "kvmesh.minitasks.item: unknown task 'nope'"));
    assert_null(load_with(rt, "kvmesh.minitasks.item{ task = 'team', colour = 'red' }"));
    assert_non_null(strstr(kvm_errmsg(), "unknown field 'colour'"));
    assert_null(load_with(rt, "kvmesh.minitasks.item{ task = 'recall', role = 'sort' }"));
    assert_non_null(strstr(kvm_errmsg(), "unknown role 'sort'"));
    kvm_runtime_free(rt);
}

static void test_a_runtime_without_lab_has_no_minitasks(void **s) {
    (void)s;
    kvm_runtime_t *rt = mock_runtime(NULL);
    assert_loads(rt, "assert(kvmesh.minitasks == nil)");
    kvm_runtime_free(rt);
}

static void test_lab_functions_register_once_per_runtime(void **s) {
    (void)s;
    kvm_runtime_t *rt = mock_runtime(NULL);
    assert_int_equal(kvm_lab_add_functions(rt), 0);
    assert_int_equal(kvm_lab_add_functions(rt), KVM_EINVAL);
    kvm_runtime_free(rt);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_minitasks_item_returns_the_generators_item),
                                       cmocka_unit_test(test_an_unknown_task_is_a_lua_error_naming_the_function),
                                       cmocka_unit_test(test_a_runtime_without_lab_has_no_minitasks),
                                       cmocka_unit_test(test_lab_functions_register_once_per_runtime)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
