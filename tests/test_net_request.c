/* test_net_request.c - the daemon's request decoder (runtime/net/request.h): frames in, a validated request or a
 * structured error with the offending field path out. No sockets. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "runtime/net/request.h"
#include "runtime/core/core.h"

/* Decodes [""][header] (+ an optional payload frame). */
static int decode(const char *header, const char *payload, kvm_req_t *q, kvm_req_error_t *e) {
    kvm_req_frame_t f[3] = {{"", 0}, {header, strlen(header)}, {payload, payload ? strlen(payload) : 0}};
    return kvm_req_decode(f, payload ? 3 : 2, NULL, q, e);
}

static void test_a_run_start_with_every_field_decodes(void **st) {
    (void)st;
    kvm_req_t q;
    kvm_req_error_t e;
    int rc = decode("{\"v\":1,\"type\":\"run.start\",\"id\":\"r-1\",\"workflow\":\"team\",\"inputs\":{\"x\":[1,2]},"
                    "\"seed\":\"18446744073709551615\",\"stream\":[\"tokens\",\"kv\"],\"dataset\":true,\"deadline_ms\":250}",
                    NULL, &q, &e);
    assert_int_equal(rc, 0);
    assert_int_equal(q.type, KVM_REQ_RUN_START);
    assert_string_equal(q.id, "r-1");
    assert_string_equal(q.name, "team");
    assert_true(cJSON_IsObject(q.inputs));
    assert_true(q.seed == UINT64_MAX);
    assert_int_equal(q.stream, KVM_STREAM_TOKENS | KVM_STREAM_KV);
    assert_true(q.dataset);
    assert_int_equal(q.deadline_ms, 250);
    kvm_req_clear(&q);
}

static void test_a_nested_duplicate_key_is_named_by_its_path(void **st) {
    (void)st;
    kvm_req_t q;
    kvm_req_error_t e;
    int rc = decode("{\"v\":1,\"type\":\"run.start\",\"id\":\"d\",\"workflow\":\"w\",\"inputs\":{\"a\":{\"b\":[{\"c\":1,\"c\":2}]}}}",
                    NULL, &q, &e);
    assert_int_equal(rc, KVM_EINVAL);
    assert_string_equal(e.field, "inputs.a.b[0].c");
    assert_true(e.has_id);
    assert_string_equal(e.id, "d");
}

static void test_text_after_the_header_object_is_a_protocol_error(void **st) {
    (void)st;
    kvm_req_t q;
    kvm_req_error_t e;
    assert_int_equal(decode("{\"v\":1,\"type\":\"ping\",\"id\":\"p\"} {}", NULL, &q, &e), KVM_EPROTO);
    assert_non_null(strstr(e.message, "after the JSON object"));
    assert_int_equal(decode("{\"v\":1,\"type\":\"ping\",\"id\":\"p\"}  \r\n", NULL, &q, &e), 0); /* whitespace is fine */
    kvm_req_clear(&q);
}

static void test_an_unreadable_id_leaves_the_error_without_one(void **st) {
    (void)st;
    kvm_req_t q;
    kvm_req_error_t e;
    assert_int_equal(decode("{\"v\":1,\"type\":\"ping\",\"id\":17}", NULL, &q, &e), KVM_EINVAL);
    assert_false(e.has_id);
    assert_string_equal(e.field, "id");
}

static void test_a_workflow_source_comes_from_payload_frame_zero(void **st) {
    (void)st;
    kvm_req_t q;
    kvm_req_error_t e;
    int rc = decode("{\"v\":1,\"type\":\"workflow.load\",\"id\":\"l\",\"name\":\"w\",\"frames\":[{\"dtype\":\"u8\",\"shape\":[8]}]}",
                    "return 1", &q, &e);
    assert_int_equal(rc, 0);
    assert_int_equal(q.source_len, 8);
    assert_memory_equal(q.source, "return 1", 8);
    kvm_req_clear(&q);
    rc = decode("{\"v\":1,\"type\":\"workflow.load\",\"id\":\"l\",\"name\":\"w\",\"frames\":[{\"dtype\":\"i32\",\"shape\":[8]}]}",
                "return 1", &q, &e);
    assert_int_equal(rc, KVM_EPROTO); /* 32 bytes described, 8 sent */
    assert_string_equal(e.field, "frames[0]");
}

static void test_fields_a_type_does_not_take_are_refused(void **st) {
    (void)st;
    kvm_req_t q;
    kvm_req_error_t e;
    assert_int_equal(decode("{\"v\":1,\"type\":\"ping\",\"id\":\"p\",\"run_id\":\"x\"}", NULL, &q, &e), KVM_EINVAL);
    assert_string_equal(e.field, "run_id");
    assert_int_equal(decode("{\"v\":2,\"type\":\"ping\",\"id\":\"p\"}", NULL, &q, &e), KVM_EVERSION);
    assert_int_equal(decode("{\"v\":1,\"type\":\"run.start\",\"id\":\"p\",\"workflow\":\"w\",\"seed\":-1}", NULL, &q, &e), KVM_EINVAL);
    assert_string_equal(e.field, "seed");
}

static void test_a_run_resume_carries_any_json_value(void **st) {
    (void)st;
    kvm_req_t q;
    kvm_req_error_t e;
    assert_int_equal(decode("{\"v\":1,\"type\":\"run.resume\",\"id\":\"a\",\"run_id\":\"r1\",\"value\":{\"ok\":[true]}}", NULL, &q, &e), 0);
    assert_int_equal(q.type, KVM_REQ_RUN_RESUME);
    assert_string_equal(q.run_id, "r1");
    assert_true(cJSON_IsObject(q.value));
    kvm_req_clear(&q);
    assert_int_equal(decode("{\"v\":1,\"type\":\"run.resume\",\"id\":\"a\",\"run_id\":\"r1\"}", NULL, &q, &e), 0);
    assert_null(q.value); /* absent: the answer is null */
    kvm_req_clear(&q);
    assert_int_equal(decode("{\"v\":1,\"type\":\"run.resume\",\"id\":\"a\",\"value\":1}", NULL, &q, &e), KVM_EINVAL);
    assert_string_equal(e.field, "run_id");
    assert_int_equal(decode("{\"v\":1,\"type\":\"run.resume\",\"id\":\"a\",\"run_id\":\"r1\",\"answer\":1}", NULL, &q, &e), KVM_EINVAL);
    assert_string_equal(e.field, "answer");
}

static void test_a_trace_export_names_one_of_three_formats(void **st) {
    (void)st;
    kvm_req_t q;
    kvm_req_error_t e;
    assert_int_equal(decode("{\"v\":1,\"type\":\"trace.export\",\"id\":\"x\",\"run_id\":\"r1\",\"format\":\"whowhen\"}", NULL, &q, &e), 0);
    assert_int_equal(q.type, KVM_REQ_TRACE_EXPORT);
    assert_string_equal(q.run_id, "r1");
    assert_string_equal(q.format, "whowhen");
    kvm_req_clear(&q);
    assert_int_equal(decode("{\"v\":1,\"type\":\"trace.export\",\"id\":\"x\",\"run_id\":\"r1\"}", NULL, &q, &e), 0);
    assert_null(q.format); /* not given: otlp-json */
    kvm_req_clear(&q);
    assert_int_equal(decode("{\"v\":1,\"type\":\"trace.export\",\"id\":\"x\",\"run_id\":\"r1\",\"format\":\"otlp\"}", NULL, &q, &e), KVM_EINVAL);
    assert_string_equal(e.field, "format");
    assert_int_equal(decode("{\"v\":1,\"type\":\"trace.export\",\"id\":\"x\",\"run_id\":\"r1\",\"format\":3}", NULL, &q, &e), KVM_EINVAL);
    assert_string_equal(e.field, "format");
    assert_int_equal(decode("{\"v\":1,\"type\":\"trace.export\",\"id\":\"x\",\"format\":\"jsonl\"}", NULL, &q, &e), KVM_EINVAL);
    assert_string_equal(e.field, "run_id");
    assert_string_equal(kvm_req_type_name(KVM_REQ_TRACE_EXPORT), "trace.export");
}

static void test_framing_errors_are_protocol_errors(void **st) {
    (void)st;
    kvm_req_t q;
    kvm_req_error_t e;
    kvm_req_frame_t no_delim[1] = {{"{}", 2}};
    assert_int_equal(kvm_req_decode(no_delim, 1, NULL, &q, &e), KVM_EPROTO);
    kvm_req_frame_t only_delim[1] = {{"", 0}};
    assert_int_equal(kvm_req_decode(only_delim, 1, NULL, &q, &e), KVM_EPROTO);
    kvm_req_limits_t lim = kvm_req_default_limits();
    lim.max_header = 16;
    const char *h = "{\"v\":1,\"type\":\"ping\",\"id\":\"p\"}";
    kvm_req_frame_t big[2] = {{"", 0}, {h, strlen(h)}};
    assert_int_equal(kvm_req_decode(big, 2, &lim, &q, &e), KVM_EPROTO);
    assert_non_null(strstr(e.message, "over the limit"));
    const char ctl[] = "{\"v\":1,\"type\":\"ping\",\x01\"id\":\"p\"}";
    assert_int_equal(decode(ctl, NULL, &q, &e), KVM_EPROTO); /* cJSON would skip the control byte */
}

static void test_decoding_leaks_nothing_on_any_path(void **st) {
    (void)st;
    const char *cases[] = {"{\"v\":1,\"type\":\"run.start\",\"id\":\"a\",\"workflow\":\"w\",\"inputs\":{\"a\":1,\"a\":2}}",
                           "{\"v\":1,\"type\":\"hello\",\"id\":\"a\",\"versions\":[3]}", "[1]", "{\"v\":1,"};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        kvm_req_t q;
        kvm_req_error_t e;
        assert_int_not_equal(decode(cases[i], NULL, &q, &e), 0); /* ASan's leak check sees the rest */
        assert_true(e.message[0] != '\0');
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_a_run_start_with_every_field_decodes),
        cmocka_unit_test(test_a_nested_duplicate_key_is_named_by_its_path),
        cmocka_unit_test(test_text_after_the_header_object_is_a_protocol_error),
        cmocka_unit_test(test_an_unreadable_id_leaves_the_error_without_one),
        cmocka_unit_test(test_a_workflow_source_comes_from_payload_frame_zero),
        cmocka_unit_test(test_fields_a_type_does_not_take_are_refused),
        cmocka_unit_test(test_a_run_resume_carries_any_json_value),
        cmocka_unit_test(test_a_trace_export_names_one_of_three_formats),
        cmocka_unit_test(test_framing_errors_are_protocol_errors),
        cmocka_unit_test(test_decoding_leaks_nothing_on_any_path),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
