/* test_comm_state.c - KVCOMM anchors saved to a file and loaded back (runtime/comm/comm_state.c): the round trip
 * keeps every number, a context that loads them reuses at once, and a file that is torn, damaged or made by
 * another model changes nothing and says what is wrong. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "runtime/comm/kvcomm_ref.h" /* the tests' door to comm's internals (the guard state) */
#include "runtime/comm/prompt.h"
#include "runtime/model/model.h"
#include "test_kvcomm_common.h"

static kvm_model_t *model(uint64_t seed) {
    kvm_config_t c = kvcomm_test_cfg(KVM_ROPE_HALF);
    kvm_model_t *m = kvm_model_random(&c, seed, 4, "cpu");
    assert_non_null(m);
    return m;
}

static kvm_template_t *tmpl(kvm_comm_t *c, const char *agent, const char *ph, uint64_t seed) {
    int32_t a[30], b[10];
    fill_ids(a, 30, seed);
    fill_ids(b, 10, seed + 1);
    kvm_piece_t p[3] = {
        {.kind = KVM_PIECE_TEXT, .ids = a, .n_ids = 30},
        {.kind = KVM_PIECE_PLACEHOLDER, .text = ph},
        {.kind = KVM_PIECE_TEXT, .ids = b, .n_ids = 10},
    };
    kvm_template_desc_t d = {.agent = agent, .pieces = p, .n_pieces = 3, .raw = true};
    kvm_template_t *t = kvm_template_create(c, &d);
    assert_non_null(t);
    return t;
}

/* n requests of one agent over fresh inputs; returns how many prepared REUSE */
static int requests(kvm_comm_t *c, kvm_template_t *t, int first, int n) {
    int reuse = 0;
    for (int q = first; q < first + n; q++) {
        kvm_comm_request_t *rq = kvm_comm_request_begin(c, (uint64_t)q + 1);
        kvm_segment_t *in = input_segment(c, 500 + (uint64_t)q, 18 + q % 3);
        kvm_binding_t b = {"input", in};
        kvm_comm_report_t r = {0};
        assert_int_equal(run_agent_on(kvm_comm_model(c), rq, t, &b, 1, KVM_KV_KVCOMM, &r, NULL, 3), 0);
        reuse += r.mode == KVM_COMM_REUSE;
        assert_int_equal(kvm_comm_request_end(rq), 0);
        kvm_segment_release(in);
    }
    return reuse;
}

static char *tmp_path(const char *tag) {
    static char buf[4][256];
    static int k = 0;
    char *p = buf[k++ % 4];
    snprintf(p, 256, "/tmp/kvm_state_%s_%ld.kva", tag, (long)getpid());
    return p;
}

static void *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    void *b = malloc(*n ? *n : 1);
    assert_int_equal(fread(b, 1, *n, f), *n);
    fclose(f);
    return b;
}

static void spit(const char *path, const void *b, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, n, f), n);
    fclose(f);
}

/* A context with anchors learned from a few requests (force_reuse: REUSE as soon as two anchors exist). */
typedef struct fixture {
    kvm_model_t *m;
    kvm_comm_t *c;
    kvm_template_t *t;
} fixture_t;

static void fixture_open(fixture_t *f, uint64_t model_seed) {
    f->m = model(model_seed);
    f->c = kvm_comm_create(f->m, NULL);
    assert_non_null(f->c);
    kvm_comm_config(f->c)->force_reuse = true;
    f->t = tmpl(f->c, "solver", "input", 71);
}

static void fixture_close(fixture_t *f) {
    kvm_template_free(f->t);
    kvm_comm_free(f->c);
    kvm_model_free(f->m);
}

/* The bytes of a file saved by a context of `requests` requests on model seed; *z: a fresh context of the same model. */
static unsigned char *saved_file(uint64_t seed, int n_requests, fixture_t *z, size_t *n) {
    fixture_t a;
    fixture_open(&a, seed);
    requests(a.c, a.t, 0, n_requests);
    const char *p = tmp_path("saved");
    assert_int_equal(kvm_comm_save_anchors(a.c, p), 0);
    unsigned char *b = slurp(p, n);
    unlink(p);
    fixture_close(&a);
    fixture_open(z, seed);
    return b;
}

static void test_saved_anchors_load_into_a_fresh_context_that_reuses_at_once_and_saves_the_same_bytes(void **st) {
    (void)st;
    fixture_t a, b;
    fixture_open(&a, 3);
    requests(a.c, a.t, 0, 4);
    int n_a = kvm_comm_n_anchors(a.c);
    assert_true(n_a >= 2);
    const char *p1 = tmp_path("one"), *p2 = tmp_path("two");
    assert_int_equal(kvm_comm_save_anchors(a.c, p1), 0);

    fixture_open(&b, 3);
    int n = -1;
    assert_int_equal(requests(b.c, b.t, 10, 1), 0); /* cold: nothing to reuse */
    fixture_close(&b);
    fixture_open(&b, 3);
    assert_int_equal(kvm_comm_load_anchors(b.c, p1, &n), 0);
    assert_int_equal(n, n_a);
    assert_int_equal(kvm_comm_n_anchors(b.c), n_a);
    assert_int_equal(kvm_comm_save_anchors(b.c, p2), 0);
    size_t n1, n2;
    void *b1 = slurp(p1, &n1), *b2 = slurp(p2, &n2);
    assert_int_equal(n1, n2);
    assert_memory_equal(b1, b2, n1); /* every number, activation and order kept */
    free(b1);
    free(b2);
    /* the loaded context reuses on its first request, as the saving one does on its next */
    assert_int_equal(requests(b.c, b.t, 21, 1), 1); /* 18 input rows: every anchor is long enough */
    assert_int_equal(requests(a.c, a.t, 21, 1), 1);
    unlink(p1);
    unlink(p2);
    fixture_close(&a);
    fixture_close(&b);
}

static void expect_refused(kvm_comm_t *c, const char *path, int code, const char *needle) {
    int n = 99, before = kvm_comm_n_anchors(c);
    int rc = kvm_comm_load_anchors(c, path, &n);
    if (rc != code || !strstr(kvm_errmsg(), needle)) fail_msg("load: %d '%s' (wanted %d with '%s')", rc, kvm_errmsg(), code, needle);
    assert_int_equal(n, 0);
    assert_int_equal(kvm_comm_n_anchors(c), before); /* nothing changed */
}

static void test_a_torn_file_is_refused_at_every_length_and_changes_nothing(void **st) {
    (void)st;
    fixture_t z;
    size_t n;
    unsigned char *b = saved_file(4, 3, &z, &n);
    const char *q = tmp_path("cut");
    /* every length below a record boundary region, and a spread of lengths through the data */
    for (size_t len = 0; len < n; len += len < 256 ? 1 : (n / 97 + 1)) {
        spit(q, b, len);
        int k = 99;
        int rc = kvm_comm_load_anchors(z.c, q, &k);
        if (rc != KVM_EFORMAT) fail_msg("length %zu of %zu: %d '%s'", len, n, rc, kvm_errmsg());
        assert_int_equal(kvm_comm_n_anchors(z.c), 0);
    }
    spit(q, b, n - 1);
    expect_refused(z.c, q, KVM_EFORMAT, "torn");
    free(b);
    unlink(q);
    fixture_close(&z);
}

static void test_a_flipped_byte_anywhere_fails_a_checksum_or_a_check_and_changes_nothing(void **st) {
    (void)st;
    fixture_t z;
    size_t n;
    unsigned char *b = saved_file(5, 3, &z, &n);
    const char *q = tmp_path("flipped");
    kvm_rng_t r;
    kvm_rng_seed(&r, 99);
    for (int i = 0; i < 64; i++) {
        size_t at = i < 16 ? (size_t)i * 8 : (size_t)kvm_rng_below(&r, n);
        b[at] ^= (unsigned char)(1u << (i % 8));
        spit(q, b, n);
        int rc = kvm_comm_load_anchors(z.c, q, NULL);
        if (rc != KVM_EFORMAT && rc != KVM_EMODEL) fail_msg("byte %zu flipped: %d '%s'", at, rc, kvm_errmsg());
        assert_int_equal(kvm_comm_n_anchors(z.c), 0);
        b[at] ^= (unsigned char)(1u << (i % 8));
    }
    expect_refused(z.c, "/nonexistent/kvm/anchors.kva", KVM_ENOENT, "cannot open");
    spit(q, "not an anchor file, just text\n", 30);
    expect_refused(z.c, q, KVM_EFORMAT, "shorter than a header");
    free(b);
    unlink(q);
    fixture_close(&z);
}

static void test_anchors_of_another_model_are_refused_by_fingerprint_and_named_by_file(void **st) {
    (void)st;
    fixture_t a, other;
    fixture_open(&a, 6);
    requests(a.c, a.t, 0, 3);
    const char *p = tmp_path("model");
    assert_int_equal(kvm_comm_save_anchors(a.c, p), 0);
    fixture_open(&other, 7); /* same shape, other weights seed: another model id */
    char na[160], nb[160];
    kvm_comm_anchors_file_name(a.c, na, sizeof na);
    kvm_comm_anchors_file_name(other.c, nb, sizeof nb);
    assert_string_not_equal(na, nb);
    assert_true(strncmp(na, "anchors-", 8) == 0 && strstr(na, ".kva"));
    expect_refused(other.c, p, KVM_EMODEL, "another model");
    unlink(p);
    fixture_close(&a);
    fixture_close(&other);
}

static void test_loading_more_anchors_than_a_pool_holds_keeps_the_pool_bound(void **st) {
    (void)st;
    fixture_t a, z;
    fixture_open(&a, 8);
    requests(a.c, a.t, 0, 6);
    int n_a = kvm_comm_n_anchors(a.c);
    assert_true(n_a >= 4);
    const char *p = tmp_path("bound");
    assert_int_equal(kvm_comm_save_anchors(a.c, p), 0);
    fixture_open(&z, 8);
    kvm_comm_config(z.c)->max_anchors = 2;
    int n = 0;
    assert_int_equal(kvm_comm_load_anchors(z.c, p, &n), 0);
    assert_int_equal(n, n_a);
    assert_true(kvm_comm_n_anchors(z.c) <= 2);
    unlink(p);
    fixture_close(&a);
    fixture_close(&z);
}

static void test_a_save_into_a_missing_folder_fails_naming_the_file_and_leaves_nothing(void **st) {
    (void)st;
    fixture_t a;
    fixture_open(&a, 9);
    requests(a.c, a.t, 0, 2);
    assert_int_equal(kvm_comm_save_anchors(a.c, "/nonexistent/kvm/anchors.kva"), KVM_EIO);
    assert_non_null(strstr(kvm_errmsg(), "/nonexistent/kvm/anchors.kva"));
    fixture_close(&a);
}

/* The fidelity guard's per-agent state (guard.c) goes into the file beside the anchors and comes back: a restarted
 * runtime neither checks an agent's first calls again nor lowers a fraction the guard raised; an impossible state
 * with a valid checksum is refused and changes nothing. */
static void test_the_guard_state_is_saved_and_loaded_with_the_anchors(void **st) {
    (void)st;
    fixture_t a, z;
    fixture_open(&a, 10);
    kvm_comm_config(a.c)->guard = true;
    requests(a.c, a.t, 0, 5);
    assert_int_equal(a.c->n_guards, 1);
    comm_guard_t *g = &a.c->guards[0];
    assert_string_equal(g->agent, "solver");
    assert_true(g->reused >= 1 && g->checked >= 1);
    g->frac = 0.875f; /* as after two disagreements */
    g->disagreed = 1;
    const char *p = tmp_path("guard");
    assert_int_equal(kvm_comm_save_anchors(a.c, p), 0);

    fixture_open(&z, 10);
    kvm_comm_config(z.c)->guard = true;
    assert_int_equal(kvm_comm_load_anchors(z.c, p, NULL), 0);
    assert_int_equal(z.c->n_guards, 1);
    assert_memory_equal(&z.c->guards[0], g, sizeof *g);
    assert_true(comm_guard_frac(z.c, "solver") == 0.875f);
    fixture_close(&z);

    /* a context whose guard already went further keeps its larger figures */
    fixture_open(&z, 10);
    kvm_comm_config(z.c)->guard = true;
    comm_guard_t more = *g;
    more.frac = 0.9375f;
    more.reused = g->reused + 100;
    assert_int_equal(comm_guard_restore(z.c, &more), 0);
    assert_int_equal(kvm_comm_load_anchors(z.c, p, NULL), 0);
    assert_true(z.c->guards[0].frac == 0.9375f);
    assert_int_equal(z.c->guards[0].reused, g->reused + 100);
    fixture_close(&z);

    /* the guard record is the last before the 16-byte trailer: 16 header + 80 payload + 8 checksum bytes */
    size_t n;
    unsigned char *b = slurp(p, &n);
    const size_t off = n - 16 - 8 - (KVM_COMM_NAME_MAX + 16) - 16;
    assert_memory_equal(b + off, "GRD1", 4);
    unsigned char *pay = b + off + 16;
    uint32_t checked;
    memcpy(&checked, pay + KVM_COMM_NAME_MAX + 8, 4);
    uint32_t disagreed = checked + 1; /* more disagreements than checks */
    memcpy(pay + KVM_COMM_NAME_MAX + 12, &disagreed, 4);
    uint64_t check = kvm_hash64(pay, KVM_COMM_NAME_MAX + 16, KVM_HASH_SEED);
    memcpy(pay + KVM_COMM_NAME_MAX + 16, &check, 8);
    const char *q = tmp_path("guard-bad");
    spit(q, b, n);
    fixture_open(&z, 10);
    expect_refused(z.c, q, KVM_EFORMAT, "impossible");
    assert_int_equal(z.c->n_guards, 0);
    fixture_close(&z);
    free(b);
    unlink(p);
    unlink(q);
    fixture_close(&a);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_saved_anchors_load_into_a_fresh_context_that_reuses_at_once_and_saves_the_same_bytes),
        cmocka_unit_test(test_a_torn_file_is_refused_at_every_length_and_changes_nothing),
        cmocka_unit_test(test_a_flipped_byte_anywhere_fails_a_checksum_or_a_check_and_changes_nothing),
        cmocka_unit_test(test_anchors_of_another_model_are_refused_by_fingerprint_and_named_by_file),
        cmocka_unit_test(test_loading_more_anchors_than_a_pool_holds_keeps_the_pool_bound),
        cmocka_unit_test(test_a_save_into_a_missing_folder_fails_naming_the_file_and_leaves_nothing),
        cmocka_unit_test(test_the_guard_state_is_saved_and_loaded_with_the_anchors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
