/* test_template_grammar.c - the one template grammar (runtime/comm/template_parse.h): every form maps to
 * its KVCOMM placeholder name, literal braces stay text, and bad forms are KVM_EINVAL naming the offset. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "runtime/comm/prompt.h"
#include "runtime/comm/template_parse.h"
#include "runtime/core/core.h"
#include "test_common.h"

/* Parses text that must hold exactly one placeholder after "x " and checks what it maps to. */
static void check_form(const char *text, kvm_tpl_src_t src, const char *name, const char *source, const char *key) {
    kvm_tpl_part_t *p;
    int n;
    assert_int_equal(kvm_template_parse_parts(text, &p, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(p[0].src, KVM_TPL_TEXT);
    assert_string_equal(p[0].text, "x ");
    assert_int_equal(p[1].src, src);
    assert_string_equal(p[1].text, name);
    assert_string_equal(p[1].source, source);
    if (key) assert_string_equal(p[1].key, key);
    else assert_null(p[1].key);
    assert_int_equal(p[1].offset, 2);
    kvm_free(p);
}

static void test_each_form_maps_to_its_kvcomm_name(void **s) {
    (void)s;
    check_form("x {input}", KVM_TPL_INPUT, "input", "input", NULL);
    check_form("x {input.facts}", KVM_TPL_INPUT, "state:input.facts", "input.facts", "facts");
    check_form("x {agent.planner}", KVM_TPL_AGENT, "agent:planner:current", "agent.planner", "planner");
    check_form("x {agent.coder.prev}", KVM_TPL_AGENT_PREV, "agent:coder:prev", "agent.coder.prev", "coder");
    check_form("x {tool.search}", KVM_TPL_TOOL, "tool:search", "tool.search", "search");
    check_form("x {state.draft_2}", KVM_TPL_STATE, "state:draft_2", "state.draft_2", "draft_2");
}

static void test_a_colon_may_replace_the_dot(void **s) {
    (void)s;
    check_form("x {agent:planner}", KVM_TPL_AGENT, "agent:planner:current", "agent:planner", "planner");
    check_form("x {agent:coder:prev}", KVM_TPL_AGENT_PREV, "agent:coder:prev", "agent:coder:prev", "coder");
    check_form("x {tool:search}", KVM_TPL_TOOL, "tool:search", "tool:search", "search");
}

static void test_double_braces_are_literal_braces(void **s) {
    (void)s;
    kvm_tpl_part_t *p;
    int n;
    assert_int_equal(kvm_template_parse_parts("a {{input}} b }} {{{input}", &p, &n), 0);
    assert_int_equal(n, 2);
    assert_string_equal(p[0].text, "a {input} b } {");
    assert_string_equal(p[1].text, "input");
    assert_int_equal(p[1].offset, 19);
    kvm_free(p);
}

static void test_braces_that_are_not_a_placeholder_stay_text(void **s) {
    (void)s;
    kvm_tpl_part_t *p;
    int n;
    const char *t = "Answer as {\"ok\": true} or { x } then {input}";
    assert_int_equal(kvm_template_parse_parts(t, &p, &n), 0);
    assert_int_equal(n, 2);
    assert_string_equal(p[0].text, "Answer as {\"ok\": true} or { x } then ");
    assert_string_equal(p[1].text, "input");
    kvm_free(p);
}

static void test_text_without_placeholders_is_one_part_and_empty_text_none(void **s) {
    (void)s;
    kvm_tpl_part_t *p;
    int n;
    assert_int_equal(kvm_template_parse_parts("just text", &p, &n), 0);
    assert_int_equal(n, 1);
    assert_string_equal(p[0].text, "just text");
    kvm_free(p);
    assert_int_equal(kvm_template_parse_parts("", &p, &n), 0);
    assert_int_equal(n, 0);
    assert_null(p);
}

/* The text must be refused with KVM_EINVAL, and the message must name `what` and the offset. */
static void check_refused(const char *text, const char *what, const char *offset) {
    kvm_tpl_part_t *p = (kvm_tpl_part_t *)1;
    int n = 7;
    assert_int_equal(kvm_template_parse_parts(text, &p, &n), KVM_EINVAL);
    assert_null(p);
    assert_int_equal(n, 0);
    if (!strstr(kvm_errmsg(), what) || !strstr(kvm_errmsg(), offset))
        fail_msg("'%s': message '%s' lacks '%s' or '%s'", text, kvm_errmsg(), what, offset);
}

typedef struct refusal {
    const char *text, *what, *offset;
} refusal_t;

static void check_refusals(const refusal_t *r, size_t n) {
    for (size_t i = 0; i < n; i++) check_refused(r[i].text, r[i].what, r[i].offset);
}

static void test_unknown_placeholders_are_refused_naming_the_offset(void **s) {
    (void)s;
    static const refusal_t r[] = {{"Q: {who} here", "unknown placeholder '{who}'", "offset 3"},
                                  {"{inputs}", "unknown placeholder '{inputs}'", "offset 0"}};
    check_refusals(r, sizeof r / sizeof *r);
}

static void test_bad_forms_are_refused_naming_the_offset(void **s) {
    (void)s;
    static const refusal_t r[] = {{"ab {agent.}", "bad placeholder '{agent.}'", "offset 3"},
                                  {"ab {agent}", "bad placeholder '{agent}'", "offset 3"},
                                  {"ab {agent.x.next}", "bad placeholder '{agent.x.next}'", "offset 3"},
                                  {"ab {tool.a.prev}", "bad placeholder '{tool.a.prev}'", "offset 3"},
                                  {"ab {state}", "bad placeholder '{state}'", "offset 3"},
                                  {"ab {input.a.b}", "bad placeholder '{input.a.b}'", "offset 3"},
                                  {"ab {input..x}", "bad placeholder '{input..x}'", "offset 3"}};
    check_refusals(r, sizeof r / sizeof *r);
}

static void test_an_unclosed_placeholder_is_refused_naming_the_offset(void **s) {
    (void)s;
    static const refusal_t r[] = {{"Plan: {agent.planner and more", "'{agent.planner' at offset 6 is not closed", "offset 6"},
                                  {"Plan: {input.x", "'{input.x' at offset 6 is not closed", "offset 6"}};
    check_refusals(r, sizeof r / sizeof *r);
}

static void test_comm_pieces_carry_the_kvcomm_names(void **s) {
    (void)s;
    kvm_piece_t *p;
    int n;
    assert_int_equal(kvm_template_parse("F: {input.facts}\nA: {agent.finder}\n", &p, &n), 0);
    assert_int_equal(n, 5);
    assert_int_equal(p[1].kind, KVM_PIECE_PLACEHOLDER);
    assert_string_equal(p[1].text, "state:input.facts");
    assert_int_equal(p[2].kind, KVM_PIECE_TEXT);
    assert_string_equal(p[2].text, "\nA: ");
    assert_string_equal(p[3].text, "agent:finder:current");
    kvm_free(p);
    assert_int_equal(kvm_template_parse("bad {agent.} here", &p, &n), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "offset 4"));
}

TC_MAIN(NULL, NULL,
        cmocka_unit_test(test_each_form_maps_to_its_kvcomm_name),
        cmocka_unit_test(test_a_colon_may_replace_the_dot),
        cmocka_unit_test(test_double_braces_are_literal_braces),
        cmocka_unit_test(test_braces_that_are_not_a_placeholder_stay_text),
        cmocka_unit_test(test_text_without_placeholders_is_one_part_and_empty_text_none),
        cmocka_unit_test(test_unknown_placeholders_are_refused_naming_the_offset),
        cmocka_unit_test(test_bad_forms_are_refused_naming_the_offset),
        cmocka_unit_test(test_an_unclosed_placeholder_is_refused_naming_the_offset),
        cmocka_unit_test(test_comm_pieces_carry_the_kvcomm_names))
