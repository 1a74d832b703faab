/* test_jsonschema.c - the JSON Schema subset of runtime/core/jsonschema.h that host tools' arguments are checked
 * against: unsupported keywords refused at registration, and every validating keyword's violation reported with the
 * path of the value. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "runtime/core/core.h"
#include "runtime/core/json.h"
#include "runtime/core/jsonschema.h"
#include "test_common.h"

static cJSON *J(const char *text) {
    cJSON *j = NULL;
    assert_int_equal(kvm_json_parse(text, strlen(text), "test", &j), 0);
    return j;
}

/* Validates value against schema; returns the message ("" when it passes). */
static const char *check(const char *schema, const char *value) {
    static char msg[1024];
    cJSON *s = J(schema), *v = J(value);
    assert_int_equal(kvm_jsonschema_check(s, "t"), 0);
    int rc = kvm_jsonschema_validate(s, v, "args");
    snprintf(msg, sizeof msg, "%s", rc ? kvm_errmsg() : "");
    if (rc) assert_int_equal(rc, KVM_EINVAL);
    cJSON_Delete(s);
    cJSON_Delete(v);
    return msg;
}

/* The registration check's message for schema ("" when accepted). */
static const char *reg(const char *schema) {
    static char msg[1024];
    cJSON *s = J(schema);
    int rc = kvm_jsonschema_check(s, "tool 'w'");
    snprintf(msg, sizeof msg, "%s", rc ? kvm_errmsg() : "");
    cJSON_Delete(s);
    return msg;
}

static const char *WEATHER = "{\"type\":\"object\",\"description\":\"where\",\"properties\":{"
                             "\"city\":{\"type\":\"string\",\"minLength\":1,\"maxLength\":5},"
                             "\"days\":{\"type\":\"integer\",\"minimum\":1,\"maximum\":14},"
                             "\"unit\":{\"enum\":[\"C\",\"F\"]},"
                             "\"tags\":{\"type\":\"array\",\"items\":{\"type\":\"string\"},\"maxItems\":2},"
                             "\"opt\":{\"type\":[\"string\",\"null\"]}},"
                             "\"required\":[\"city\"],\"additionalProperties\":false}";

static void test_valid_arguments_pass(void **st) {
    (void)st;
    assert_string_equal(check(WEATHER, "{\"city\":\"Oslo\",\"days\":3,\"unit\":\"C\",\"tags\":[\"a\"],\"opt\":null}"), "");
    assert_string_equal(check(WEATHER, "{\"city\":\"Oslo\",\"days\":3.0}"), ""); /* 3.0 is an integer in JSON Schema */
    assert_string_equal(check("true", "[1,{}]"), "");
    assert_string_equal(check("{}", "\"anything\""), "");
}

static void test_a_wrong_type_names_the_path_and_both_types(void **st) {
    (void)st;
    assert_string_equal(check(WEATHER, "{\"city\":12}"), "args.city: expected string, got integer");
    assert_string_equal(check(WEATHER, "{\"city\":\"Oslo\",\"days\":2.5}"), "args.days: expected integer, got number");
    assert_string_equal(check(WEATHER, "{\"city\":\"Oslo\",\"opt\":true}"), "args.opt: expected string or null, got boolean");
    assert_string_equal(check(WEATHER, "[]"), "args: expected object, got array");
    assert_string_equal(check(WEATHER, "{\"city\":\"Oslo\",\"tags\":[\"a\",7]}"), "args.tags[1]: expected string, got integer");
}

static void test_required_and_additional_properties_are_enforced(void **st) {
    (void)st;
    assert_string_equal(check(WEATHER, "{\"days\":2}"), "args: missing required property 'city'");
    assert_string_equal(check(WEATHER, "{\"city\":\"Oslo\",\"zip\":1}"),
                        "args: property 'zip' is not allowed (additionalProperties is false)");
    assert_string_equal(check("{\"additionalProperties\":{\"type\":\"number\"}}", "{\"a\":1,\"b\":\"x\"}"),
                        "args.b: expected number, got string");
}

static void test_bounds_lengths_and_enums_are_enforced(void **st) {
    (void)st;
    assert_string_equal(check(WEATHER, "{\"city\":\"Oslo\",\"days\":15}"), "args.days: 15 is above the maximum 14");
    assert_string_equal(check(WEATHER, "{\"city\":\"Oslo\",\"days\":0}"), "args.days: 0 is below the minimum 1");
    assert_string_equal(check(WEATHER, "{\"city\":\"\"}"), "args.city: 0 characters, fewer than minLength 1");
    assert_string_equal(check(WEATHER, "{\"city\":\"Valparaiso\"}"), "args.city: 10 characters, more than maxLength 5");
    /* lengths count code points, not bytes: five two-byte letters fit maxLength 5 */
    assert_string_equal(check(WEATHER, "{\"city\":\"\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\"}"), "");
    assert_string_equal(check(WEATHER, "{\"city\":\"Oslo\",\"unit\":\"K\"}"),
                        "args.unit: not one of the allowed values [\"C\",\"F\"]");
    assert_string_equal(check(WEATHER, "{\"city\":\"Oslo\",\"tags\":[\"a\",\"b\",\"c\"]}"),
                        "args.tags: 3 items, more than maxItems 2");
    assert_string_equal(check("{\"properties\":{\"x\":false}}", "{\"x\":1}"), "args.x: no value is allowed here (the schema is false)");
}

static void test_unsupported_keywords_are_refused_at_registration(void **st) {
    (void)st;
    assert_string_equal(reg(WEATHER), "");
    const char *m = reg("{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\",\"pattern\":\"^[A-Z]\"}}}");
    assert_non_null(strstr(m, "tool 'w': schema.properties.city: unsupported keyword 'pattern' (supported: type,"));
    assert_non_null(strstr(reg("{\"$ref\":\"#/x\"}"), "schema: unsupported keyword '$ref'"));
    assert_non_null(strstr(reg("{\"oneOf\":[]}"), "unsupported keyword 'oneOf'"));
    assert_string_equal(reg("{\"type\":\"text\"}"),
                        "tool 'w': schema.type: unknown type 'text' (types: null, boolean, object, array, number, integer, string)");
    assert_string_equal(reg("{\"items\":[{}]}"), "tool 'w': schema.items: the list (tuple) form is not supported: give one schema");
    assert_string_equal(reg("{\"minLength\":-1}"), "tool 'w': schema.minLength: must be a non-negative integer");
    assert_string_equal(reg("{\"required\":[1]}"), "tool 'w': schema.required: must be a list of property names");
    assert_string_equal(reg("{\"minimum\":3,\"maximum\":2}"), "tool 'w': schema: minimum 3 is above maximum 2");
    assert_string_equal(reg("[]"), "tool 'w': schema: a schema must be an object (or true / false)");
    assert_string_equal(reg("{\"properties\":{\"a\":{\"items\":{\"type\":7}}}}"),
                        "tool 'w': schema.properties.a.items.type: must be a type name or a non-empty list of them");
}

static void test_deeply_nested_schemas_are_refused(void **st) {
    (void)st;
    char buf[4096] = "";
    for (int i = 0; i < 40; i++) strcat(buf, "{\"items\":");
    strcat(buf, "true");
    for (int i = 0; i < 40; i++) strcat(buf, "}");
    assert_non_null(strstr(reg(buf), "schemas nested deeper than 32"));
}

TC_MAIN(NULL, NULL, cmocka_unit_test(test_valid_arguments_pass),
        cmocka_unit_test(test_a_wrong_type_names_the_path_and_both_types),
        cmocka_unit_test(test_required_and_additional_properties_are_enforced),
        cmocka_unit_test(test_bounds_lengths_and_enums_are_enforced),
        cmocka_unit_test(test_unsupported_keywords_are_refused_at_registration),
        cmocka_unit_test(test_deeply_nested_schemas_are_refused))
