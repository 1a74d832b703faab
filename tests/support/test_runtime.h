/* test_runtime.h - what the tests of the public API (include/kvmesh.h) share: a runtime on the mock model.
 * Include after <cmocka.h> and <kvmesh.h>. */
#ifndef KVM_TEST_RUNTIME_H
#define KVM_TEST_RUNTIME_H

/* A runtime whose every kvmesh.model() is the mock echo model, writing traces under trace_root (NULL: none),
 * quiet; fails the test when it cannot be made. Free with kvm_runtime_free(). */
static inline kvm_runtime_t *mock_runtime(const char *trace_root) {
    kvm_runtime_params_t p = kvm_runtime_default_params();
    p.model_override = "mock:echo";
    p.trace_root = trace_root;
    p.echo_print = false;
    kvm_runtime_t *rt = kvm_runtime_create(&p);
    if (!rt) fail_msg("runtime: %s", kvm_errmsg());
    return rt;
}

/* A two-agent workflow on the mock model: 'a' answers {input}, 'b' reads a's answer. */
static const char *const k_pair_wf =
    "local kvm = kvmesh\n"
    "local m = kvm.model('mock:echo')\n"
    "local g = kvm.graph{ name = 'pair' }\n"
    "g:agent('a', { model = m, template = 'Q: {input}\\nA:', max_tokens = 4 })\n"
    "g:agent('b', { model = m, template = 'Q: {input}\\nA: {agent.a}\\nB:', max_tokens = 6 })\n"
    "g:edge(kvm.START, 'a')\n"
    "g:edge('a', 'b')\n"
    "return g\n";

#endif
