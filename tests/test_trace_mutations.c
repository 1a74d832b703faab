/* test_trace_mutations.c - 500 seeded mutations of a real trace (tests/fixtures/trace_v1): truncations, flipped
 * bytes, lost / doubled / swapped / garbage lines, wrong types, huge numbers, a damaged index.json. Every trace
 * reader and view (`kvmesh trace ls / show / steps / diff / blame / export` and the record reader) must answer each
 * one with text or with an error message, and never crash, hang or leak (the ASan build runs this too); an export
 * that succeeds is one strict JSON document of its format's shape (issue 13). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include <kvmesh.h>

#define FIXTURE KVM_SOURCE_DIR "/tests/fixtures/trace_v1"
#define N_MUTANTS 500

static uint64_t g_rng = 0x6b766d6573680001ULL;
static uint64_t rnd(void) { /* splitmix64 */
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static size_t below(size_t n) { return n ? (size_t)(rnd() % n) : 0; }

typedef struct buf {
    char *p;
    size_t n;
} buf_t;

static buf_t read_all(const char *path) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    buf_t b = {malloc(1 << 20), 0};
    b.n = fread(b.p, 1, 1 << 20, f);
    fclose(f);
    return b;
}

static void write_all(const char *path, const char *p, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    fclose(f);
}

/* Line k of b (0-based): its start and length (newline excluded); false past the end. */
static bool line_at(const buf_t *b, size_t k, size_t *start, size_t *len) {
    size_t s = 0;
    for (size_t i = 0; i < k; i++) {
        const char *nl = memchr(b->p + s, '\n', b->n - s);
        if (!nl) return false;
        s = (size_t)(nl - b->p) + 1;
    }
    if (s >= b->n) return false;
    const char *nl = memchr(b->p + s, '\n', b->n - s);
    *start = s;
    *len = nl ? (size_t)(nl - b->p) - s : b->n - s;
    return true;
}

static size_t n_lines(const buf_t *b) {
    size_t n = 0, s, l;
    while (line_at(b, n, &s, &l)) n++;
    return n;
}

/* out = b with [at, at + cut) replaced by ins[0..n_ins). */
static void splice(buf_t *out, const buf_t *b, size_t at, size_t cut, const char *ins, size_t n_ins) {
    out->n = 0;
    memcpy(out->p, b->p, at);
    memcpy(out->p + at, ins, n_ins);
    memcpy(out->p + at + n_ins, b->p + at + cut, b->n - at - cut);
    out->n = b->n - cut + n_ins;
}

static const char *const k_bad_lines[] = {
    "{\"t\":\"step\",\"v\":1,\"step\":\"x\",\"node\":7,\"tokens_in\":-5}",
    "{\"t\":\"run.start\",\"v\":999}",
    "{\"t\":\"step\",\"v\":1,\"step\":1e308,\"superstep\":-2147483649,\"tokens_in\":1e400}",
    "{\"t\":\"checkpoint\",\"v\":1,\"state\":[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]}",
    "[1,2,3]",
    "{\"t\":null}",
    "{\"t\":\"run.end\",\"v\":1,\"status\":{},\"outputs\":\"x\",\"usage\":[]}",
    "{\"t\":\"edge\",\"v\":1,\"from\":\"\",\"to\":\"\\u0000\"}",
    "\"just a string\"",
    "{\"t\":\"log\",\"v\":1,\"msg\":\"\\ud800\"}",
};

/* Mutant m of the events (and maybe of the index) into out / idx_out. */
static void mutate(int m, const buf_t *ev, const buf_t *idx, buf_t *out, buf_t *idx_out) {
    memcpy(idx_out->p, idx->p, idx->n);
    idx_out->n = idx->n;
    const size_t lines = n_lines(ev);
    size_t s = 0, l = 0, s2 = 0, l2 = 0;
    char garbage[64], ins[256];
    switch (m % 10) {
    case 0: /* truncated anywhere (a crash mid-write, or worse) */
        out->n = below(ev->n);
        memcpy(out->p, ev->p, out->n);
        break;
    case 1: /* flipped bytes */
        memcpy(out->p, ev->p, ev->n);
        out->n = ev->n;
        for (int k = 0, n = 1 + (int)below(8); k < n; k++) out->p[below(out->n)] ^= (char)(1 + below(255));
        break;
    case 2: /* a lost line */
        line_at(ev, below(lines), &s, &l);
        splice(out, ev, s, l + 1 <= ev->n - s ? l + 1 : l, "", 0);
        break;
    case 3: /* a doubled line */
        line_at(ev, below(lines), &s, &l);
        splice(out, ev, s, 0, ev->p + s, l + 1 <= ev->n - s ? l + 1 : l);
        break;
    case 4: { /* two lines swapped (order broken) */
        size_t a = below(lines), b = below(lines);
        if (a > b) {
            size_t t = a;
            a = b;
            b = t;
        }
        line_at(ev, a, &s, &l);
        line_at(ev, b, &s2, &l2);
        if (a == b) {
            memcpy(out->p, ev->p, ev->n);
            out->n = ev->n;
            break;
        }
        out->n = 0;
        memcpy(out->p, ev->p, s);
        memcpy(out->p + s, ev->p + s2, l2);
        memcpy(out->p + s + l2, ev->p + s + l, s2 - (s + l));
        memcpy(out->p + s2 - l + l2, ev->p + s, l);
        memcpy(out->p + s2 + l2, ev->p + s2 + l2, ev->n - s2 - l2);
        out->n = ev->n;
        break;
    }
    case 5: /* a line of random bytes (NUL included) */
        for (size_t k = 0; k < sizeof garbage; k++) garbage[k] = (char)below(256);
        line_at(ev, below(lines), &s, &l);
        splice(out, ev, s, l, garbage, sizeof garbage);
        break;
    case 6: /* a record with wrong types, or another version: in place of a line, or inserted before one */
    case 7: {
        const char *bad = k_bad_lines[below(sizeof k_bad_lines / sizeof *k_bad_lines)];
        line_at(ev, below(lines), &s, &l);
        if (m % 10 == 6) splice(out, ev, s, l, bad, strlen(bad));
        else splice(out, ev, s, 0, ins, (size_t)snprintf(ins, sizeof ins, "%s\n", bad));
        break;
    }
    case 8: /* a damaged index.json beside intact events */
        memcpy(out->p, ev->p, ev->n);
        out->n = ev->n;
        idx_out->n = below(idx->n);
        if (m & 16) idx_out->p[below(idx_out->n + 1) % (idx_out->n ? idx_out->n : 1)] = '{';
        break;
    default: /* a structural byte removed: '}', '"', ':' or ',' */
        memcpy(out->p, ev->p, ev->n);
        out->n = ev->n;
        for (int tries = 0; tries < 64; tries++) {
            size_t at = below(out->n);
            if (strchr("}\":,", out->p[at]) && out->p[at]) {
                memmove(out->p + at, out->p + at + 1, out->n - at - 1);
                out->n--;
                break;
            }
        }
        break;
    }
}

/* A view's answer: text (>= 0) or an error with a message (< 0), never both or neither. */
static void check_answer(int rc, char *text, const char *what, int m) {
    if (rc >= 0 && !text) fail_msg("mutant %d: %s returned %d without text", m, what, rc);
    if (rc < 0 && text) fail_msg("mutant %d: %s failed (%d) but gave text", m, what, rc);
    if (rc < 0 && !kvm_errmsg()[0]) fail_msg("mutant %d: %s failed (%d) without a message", m, what, rc);
    kvm_free(text);
}

static void test_every_trace_view_answers_500_mutated_traces_without_crashing(void **st) {
    (void)st;
    buf_t ev = read_all(FIXTURE "/events.jsonl"), idx = read_all(FIXTURE "/index.json");
    char root[] = "/tmp/kvm-trace-mut-XXXXXX";
    assert_non_null(mkdtemp(root));
    char dir[512], evp[600], idxp[600];
    snprintf(dir, sizeof dir, "%s/2026-01-01/run", root);
    snprintf(evp, sizeof evp, "%s/events.jsonl", dir);
    snprintf(idxp, sizeof idxp, "%s/index.json", dir);
    char mid[512];
    snprintf(mid, sizeof mid, "%s/2026-01-01", root);
    assert_int_equal(mkdir(mid, 0700), 0);
    assert_int_equal(mkdir(dir, 0700), 0);
    buf_t out = {malloc(1 << 20), 0}, idx_out = {malloc(1 << 16), 0};
    int failed_reads = 0, exported = 0;
    for (int m = 0; m < N_MUTANTS; m++) {
        mutate(m, &ev, &idx, &out, &idx_out);
        write_all(evp, out.p, out.n);
        write_all(idxp, idx_out.p, idx_out.n);
        kvm_trace_reader_t *r = kvm_trace_reader_open(dir);
        if (r) {
            for (int i = 0; i < kvm_trace_reader_n_records(r); i++) {
                assert_non_null(kvm_trace_reader_record_json(r, i));
                assert_non_null(kvm_trace_reader_record_type(r, i));
            }
            kvm_trace_reader_free(r);
        } else {
            failed_reads++;
            assert_true(kvm_errmsg()[0] != '\0');
        }
        char *text = NULL;
        int rc = kvm_trace_view_run(dir, &text);
        check_answer(rc, text, "view_run", m);
        kvm_trace_view_params_t p = kvm_trace_view_default_params();
        p.full = m & 1;
        p.step = m % 3 == 0 ? (int)below(12) - 1 : -1;
        rc = kvm_trace_view_steps(dir, &p, &text);
        check_answer(rc, text, "view_steps", m);
        rc = kvm_trace_view_diff(FIXTURE, dir, &text);
        check_answer(rc, text, "view_diff", m);
        rc = kvm_trace_view_list(root, &text);
        check_answer(rc, text, "view_list", m);
        assert_int_equal(rc, 1); /* the one run is listed, readable or not */
        for (int fmt = KVM_TRACE_FORMAT_OTLP_JSON; fmt <= KVM_TRACE_FORMAT_JSONL; fmt++) { /* `trace export` */
            kvm_trace_export_params_t xp = kvm_trace_export_default_params();
            xp.format = fmt;
            xp.content = m % 3;
            rc = kvm_trace_export(dir, &xp, &text, NULL);
            if (rc == 0 && fmt != KVM_TRACE_FORMAT_JSONL) { /* one strict JSON document of the format's shape */
                const char *end = NULL;
                cJSON *j = cJSON_ParseWithOpts(text, &end, 0);
                if (!j || strspn(end, "\n") != strlen(end)) fail_msg("mutant %d: export %d is not one JSON document", m, fmt);
                const char *top = fmt == KVM_TRACE_FORMAT_OTLP_JSON ? "resourceSpans" : "history";
                if (!cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(j, top))) fail_msg("mutant %d: export %d has no %s", m, fmt, top);
                cJSON_Delete(j);
            }
            exported += rc == 0;
            check_answer(rc < 0 ? rc : 0, text, "export", m);
        }
        kvm_failure_t *f = kvm_failure_from_trace(dir); /* `trace blame`: the failure, then blame on it */
        if (f) {
            kvm_blame_t b;
            assert_int_equal(kvm_blame(NULL, f, NULL, &b), 0);
            assert_true(b.step < f->n_steps);
            kvm_failure_free(f);
        } else assert_true(kvm_errmsg()[0] != '\0');
    }
    /* the mutations did reach the parser: many mutants are refused, some still read */
    assert_true(failed_reads > N_MUTANTS / 10);
    assert_true(failed_reads < N_MUTANTS);
    assert_true(exported > N_MUTANTS / 2); /* most mutants still export (in one format or more) */
    unlink(evp);
    unlink(idxp);
    rmdir(dir);
    rmdir(mid);
    rmdir(root);
    free(ev.p);
    free(idx.p);
    free(out.p);
    free(idx_out.p);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_every_trace_view_answers_500_mutated_traces_without_crashing)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
