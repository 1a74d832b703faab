/* test_tool_requests.c - the daemon's decoding of the client-tool requests (runtime/net/request.h): tool.register
 * (name, description, schema) and tool.result (run_id, call_id as a number or a decimal string, result or error),
 * each refusal naming its field. No sockets. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "runtime/core/core.h"
#include "runtime/net/request.h"

/* Decodes [""][header]; 0 or the error code with *e filled. */
static int decode(const char *header, kvm_req_t *q, kvm_req_error_t *e) {
    kvm_req_frame_t f[2] = {{"", 0}, {header, strlen(header)}};
    return kvm_req_decode(f, 2, NULL, q, e);
}

static void test_a_tool_register_decodes_name_description_and_schema(void **st) {
    (void)st;
    kvm_req_t q;
    kvm_req_error_t e;
    assert_int_equal(decode("{\"v\":1,\"type\":\"tool.register\",\"id\":\"t-1\",\"name\":\"get_weather.v2\",\"description\":\"d\","
                            "\"schema\":{\"type\":\"object\"}}", &q, &e), 0);
    assert_int_equal(q.type, KVM_REQ_TOOL_REGISTER);
    assert_string_equal(q.name, "get_weather.v2");
    assert_string_equal(q.description, "d");
    assert_true(cJSON_IsObject(q.schema));
    kvm_req_clear(&q);
    assert_int_equal(decode("{\"v\":1,\"type\":\"tool.register\",\"id\":\"t-2\",\"name\":\"w\"}", &q, &e), 0);
    assert_null(q.schema);
    assert_null(q.description);
    kvm_req_clear(&q);
    assert_string_equal(kvm_req_type_name(KVM_REQ_TOOL_REGISTER), "tool.register");
    assert_string_equal(kvm_req_type_name(KVM_REQ_TOOL_RESULT), "tool.result");
}

static void test_bad_tool_registers_name_the_field(void **st) {
    (void)st;
    kvm_req_t q;
    kvm_req_error_t e;
    assert_int_equal(decode("{\"v\":1,\"type\":\"tool.register\",\"id\":\"t\"}", &q, &e), KVM_EINVAL);
    assert_string_equal(e.field, "name");
    assert_int_equal(decode("{\"v\":1,\"type\":\"tool.register\",\"id\":\"t\",\"name\":\"a b\"}", &q, &e), KVM_EINVAL);
    assert_string_equal(e.field, "name");
    assert_int_equal(decode("{\"v\":1,\"type\":\"tool.register\",\"id\":\"t\",\"name\":\"w\",\"schema\":[1]}", &q, &e), KVM_EINVAL);
    assert_string_equal(e.field, "schema");
    assert_int_equal(decode("{\"v\":1,\"type\":\"tool.register\",\"id\":\"t\",\"name\":\"w\",\"run_id\":\"x\"}", &q, &e), KVM_EINVAL);
    assert_string_equal(e.field, "run_id"); /* a field tool.register does not take */
}

static void test_a_tool_result_decodes_its_call_and_result_or_error(void **st) {
    (void)st;
    kvm_req_t q;
    kvm_req_error_t e;
    assert_int_equal(decode("{\"v\":1,\"type\":\"tool.result\",\"id\":\"r\",\"run_id\":\"abc\",\"call_id\":\"18446744073709551615\","
                            "\"result\":{\"sky\":\"sunny\"}}", &q, &e), 0);
    assert_int_equal(q.type, KVM_REQ_TOOL_RESULT);
    assert_string_equal(q.run_id, "abc");
    assert_true(q.call_id == UINT64_MAX);
    assert_true(cJSON_IsObject(q.value));
    assert_null(q.error);
    kvm_req_clear(&q);
    assert_int_equal(decode("{\"v\":1,\"type\":\"tool.result\",\"id\":\"r\",\"run_id\":\"abc\",\"call_id\":7,\"error\":\"boom\"}",
                            &q, &e), 0);
    assert_true(q.call_id == 7);
    assert_string_equal(q.error, "boom");
    assert_null(q.value);
    kvm_req_clear(&q);
    assert_int_equal(decode("{\"v\":1,\"type\":\"tool.result\",\"id\":\"r\",\"run_id\":\"abc\",\"call_id\":7,\"result\":null}", &q, &e), 0);
    assert_true(cJSON_IsNull(q.value)); /* null is a result (nil), not an absent one */
    kvm_req_clear(&q);
}

static void test_bad_tool_results_name_the_field(void **st) {
    (void)st;
    kvm_req_t q;
    kvm_req_error_t e;
    const struct {
        const char *hdr, *field;
    } bad[] = {
        {"{\"v\":1,\"type\":\"tool.result\",\"id\":\"r\",\"call_id\":1}", "run_id"},
        {"{\"v\":1,\"type\":\"tool.result\",\"id\":\"r\",\"run_id\":\"a\"}", "call_id"},
        {"{\"v\":1,\"type\":\"tool.result\",\"id\":\"r\",\"run_id\":\"a\",\"call_id\":0}", "call_id"},
        {"{\"v\":1,\"type\":\"tool.result\",\"id\":\"r\",\"run_id\":\"a\",\"call_id\":1.5}", "call_id"},
        {"{\"v\":1,\"type\":\"tool.result\",\"id\":\"r\",\"run_id\":\"a\",\"call_id\":\"12x\"}", "call_id"},
        {"{\"v\":1,\"type\":\"tool.result\",\"id\":\"r\",\"run_id\":\"a\",\"call_id\":\"99999999999999999999\"}", "call_id"},
        {"{\"v\":1,\"type\":\"tool.result\",\"id\":\"r\",\"run_id\":\"a\",\"call_id\":1,\"result\":1,\"error\":\"x\"}", "error"},
        {"{\"v\":1,\"type\":\"tool.result\",\"id\":\"r\",\"run_id\":\"a\",\"call_id\":1,\"error\":5}", "error"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        int rc = decode(bad[i].hdr, &q, &e);
        if (rc == 0) {
            kvm_req_clear(&q);
            fail_msg("case %zu decoded", i);
        }
        assert_int_equal(rc, KVM_EINVAL);
        if (strcmp(e.field, bad[i].field)) fail_msg("case %zu: field '%s', not '%s' (%s)", i, e.field, bad[i].field, e.message);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_a_tool_register_decodes_name_description_and_schema),
        cmocka_unit_test(test_bad_tool_registers_name_the_field),
        cmocka_unit_test(test_a_tool_result_decodes_its_call_and_result_or_error),
        cmocka_unit_test(test_bad_tool_results_name_the_field),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
