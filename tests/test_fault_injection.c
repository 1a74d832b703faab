/* test_fault_injection.c - SQLite's out-of-memory test, for kvmesh: every allocation of a model load,
 * of a workflow run and of the trace views is made to fail in turn (kvm_alloc_fail_nth(N) for N = 1,
 * 2, ... until the operation succeeds). Each failure must come back as an error with a message naming
 * what failed, or be absorbed (Lua retries after a collection) with the same result as a clean run;
 * nothing may leak (live bytes back to where they were; ASan checks the rest) and nothing may crash.
 * Every N is tried, in the release and the ASan build alike (about 9,000 operations, 3 s and 14 s). A workflow run
 * on a real model (minillama-2m, its load included) has too many attempts for that: there, the first attempt of each
 * allocation site (a call stack, recorded through kvm_alloc_set_observer) is failed (every third site's under
 * KVM_SANITIZED=1, where each operation costs 5x more); KVM_FAULT_REAL=1 tries every N.
 * Disk full while writing a trace: a traced run in a child process whose file size limit (RLIMIT_FSIZE)
 * cuts the trace at every 97th byte in turn; the run must go on with the same outputs, leak nothing, and
 * leave a trace that reads back.
 * Debugging: KVM_FAULT_TRACE=1 prints every N with its outcome; KVM_FAULT_FROM=N starts there. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <dirent.h>
#include <execinfo.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "agents/wf.h"
#include "runtime/core/core.h"
#include "runtime/model/model.h"
#include "runtime/trace/trace.h"

#define MINILLAMA KVM_SOURCE_DIR "/models/minillama-2m"
#define S260 KVM_SHARED_DIR "/models/stories260K"

/* One operation under test: 0 when it succeeded (and has released everything it made), <0 with the
 * message set when it failed. */
typedef int (*op_fn)(void *ud);

/* A failure must be reported as what it is: an out-of-memory code with a message of its own (not the
 * bare description of the code) saying what could not be allocated, or, where a script error carries
 * it (a Lua error raised by a C function of the API), a message that says it ran out of memory. */
static void expect_clear_message(const char *what, uint64_t n, int rc) {
    const char *msg = kvm_errmsg();
    bool memory = rc == KVM_ENOMEM || rc == KVM_ELUA_MEMORY;
    if (!msg[0] || !strcmp(msg, kvm_strerror(rc)) || !(memory || strstr(msg, "memory")))
        fail_msg("%s, allocation %llu failed: rc %d (%s), message '%s'", what, (unsigned long long)n, rc,
                 kvm_errname(rc), msg);
}

/* ---- allocation sites ----------------------------------------------------------------------------- */

/* Where each allocation attempt of one operation came from: a hash of the return addresses of its call stack (the
 * allocator's own frames, then its callers: SITE_DEPTH frames in all, so a site is a caller and a few of its callers).
 * Attempts numbered from the first of the operation. */
#define SITE_DEPTH 7
typedef struct sites {
    uint64_t c0;       /* kvm_alloc_count() before the operation */
    uint64_t *hash;    /* [n] (malloc: not counted memory, so the sweep's own bookkeeping changes nothing) */
    size_t n, cap;
} sites_t;

static pthread_mutex_t g_sites_lock = PTHREAD_MUTEX_INITIALIZER;

static void record_site(void *ud, uint64_t attempt) {
    sites_t *s = ud;
    pthread_mutex_lock(&g_sites_lock);
    void *frames[SITE_DEPTH + 1];
    int k = backtrace(frames, SITE_DEPTH + 1);
    uint64_t h = 1469598103934665603ULL;
    for (int i = 1; i < k; i++) h = (h ^ (uint64_t)(uintptr_t)frames[i]) * 1099511628211ULL; /* frames[0]: this function */
    size_t i = (size_t)(attempt - s->c0 - 1);
    if (i >= s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 4096;
        while (cap <= i) cap *= 2;
        uint64_t *nh = realloc(s->hash, cap * sizeof *nh);
        if (!nh) abort();
        memset(nh + s->cap, 0, (cap - s->cap) * sizeof *nh);
        s->hash = nh;
        s->cap = cap;
    }
    s->hash[i] = h;
    if (i + 1 > s->n) s->n = i + 1;
    pthread_mutex_unlock(&g_sites_lock);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The attempts (1-based, in order) that are the first of their site in one run of op; *total gets every attempt. */
static uint64_t *first_of_each_site(op_fn op, void *ud, size_t *n_out, uint64_t *total) {
    static bool warmed;
    if (!warmed) { /* backtrace() loads libgcc once: not inside the recorded operation */
        void *f[2];
        backtrace(f, 2);
        warmed = true;
    }
    sites_t s = {.c0 = kvm_alloc_count()};
    kvm_alloc_set_observer(record_site, &s);
    int rc = op(ud);
    kvm_alloc_set_observer(NULL, NULL);
    assert_int_equal(rc, 0);
    *total = kvm_alloc_count() - s.c0;
    assert_true(s.n == *total);
    uint64_t *seen = malloc((s.n + 1) * sizeof *seen), *out = malloc((s.n + 1) * sizeof *out);
    assert_true(seen && out);
    size_t n_seen = 0, n = 0;
    for (size_t i = 0; i < s.n; i++) {
        uint64_t h = s.hash[i];
        if (n_seen && bsearch(&h, seen, n_seen, sizeof *seen, cmp_u64)) continue;
        seen[n_seen++] = h;
        qsort(seen, n_seen, sizeof *seen, cmp_u64);
        out[n++] = (uint64_t)i + 1;
    }
    free(seen);
    free(s.hash);
    *n_out = n;
    return out;
}

/* Runs op once to count its allocations, then fails each of them in turn; with by_site, only the first attempt of
 * each allocation site (the same code reached the same way fails the same way at its later attempts: a loop's). */
static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sweep_sites(const char *what, op_fn op, void *ud, bool by_site) {
    double t0 = cpu_s();
    size_t live0 = kvm_alloc_bytes_live();
    uint64_t c0 = kvm_alloc_count();
    assert_int_equal(op(ud), 0);
    uint64_t total = kvm_alloc_count() - c0;
    assert_int_equal(kvm_alloc_bytes_live(), live0);
    size_t n_sites = 0;
    uint64_t *only = NULL, total2 = 0;
    if (by_site) {
        only = first_of_each_site(op, ud, &n_sites, &total2);
        assert_true(total2 == total); /* the operation allocates the same way every time */
        assert_int_equal(kvm_alloc_bytes_live(), live0);
        if (getenv("KVM_SANITIZED")) { /* ASan (make test-asan): every third site, ~16 s of CPU instead of ~50 (the release
                                          build fails them all) */
            size_t k = 0;
            for (size_t i = 0; i < n_sites; i += 3) only[k++] = only[i];
            n_sites = k;
        }
    }
    uint64_t tried = 0, failed = 0;
    const char *from = getenv("KVM_FAULT_FROM"); /* debugging: start the sweep there */
    for (uint64_t k = 0, n = from ? strtoull(from, NULL, 10) : 1;; k++, n++) {
        if (only) {
            if (k >= n_sites) break;
            n = only[k];
        }
        kvm_errclear();
        kvm_alloc_fail_nth(n);
        int rc = op(ud);
        bool fired = !kvm_alloc_fail_pending();
        kvm_alloc_fail_nth(0);
        if (!fired) {
            assert_int_equal(rc, 0);
            assert_null(only); /* each site's attempt is reached */
            break;
        }
        tried++;
        if (getenv("KVM_FAULT_TRACE")) fprintf(stderr, "%s: allocation %llu failed: rc %d: %s\n", what, (unsigned long long)n, rc, rc ? kvm_errmsg() : "");
        if (rc != 0) {
            failed++;
            expect_clear_message(what, n, rc);
        }
        if (kvm_alloc_bytes_live() != live0)
            fail_msg("%s, allocation %llu failed: %zd bytes leaked", what, (unsigned long long)n,
                     (ssize_t)(kvm_alloc_bytes_live() - live0));
    }
    if (only) {
        fprintf(stderr, "%s: %llu allocations at %zu sites, the first of each site failed in turn: %llu gave an error, the others "
                "were absorbed (%.1f s of CPU)\n", what, (unsigned long long)total, n_sites, (unsigned long long)failed, cpu_s() - t0);
        assert_int_equal(tried, n_sites);
        free(only);
    } else {
        fprintf(stderr, "%s: %llu allocations, each failed in turn: %llu gave an error, the others were absorbed (%.1f s of CPU)\n",
                what, (unsigned long long)total, (unsigned long long)failed, cpu_s() - t0);
        assert_int_equal(tried, total);
    }
    assert_true(tried > 0);
}

static void sweep(const char *what, op_fn op, void *ud) { sweep_sites(what, op, ud, false); }

/* ---- model loads -------------------------------------------------------------------------------- */

typedef struct load_case {
    const char *path;
    kvm_model_params_t opts;
} load_case_t;

static int op_load(void *ud) {
    load_case_t *c = ud;
    kvm_model_t *m = kvm_model_load(c->path, &c->opts);
    if (!m) {
        int rc = kvm_errcode();
        return rc < 0 ? rc : KVM_EINTERNAL;
    }
    kvm_model_free(m);
    return 0;
}

static void test_every_failed_allocation_of_an_hf_model_load_is_a_clean_error(void **st) {
    (void)st;
    load_case_t c = {.path = MINILLAMA, .opts = {.backend = "cpu", .quiet = true}};
    sweep("minillama-2m load", op_load, &c);
}

static void test_every_failed_allocation_of_a_llama2c_model_load_is_a_clean_error(void **st) {
    (void)st;
    if (!kvm_file_exists(S260 "/stories260K.bin") || !kvm_file_exists(S260 "/tok512.bin")) {
        fprintf(stderr, "SKIPPED: %s/stories260K.bin or tok512.bin not found\n", S260);
        skip();
    }
    load_case_t c = {.path = S260 "/stories260K.bin", .opts = {.tokenizer_path = S260 "/tok512.bin", .backend = "cpu", .quiet = true}};
    sweep("stories260K load", op_load, &c);
}

/* ---- a workflow run ----------------------------------------------------------------------------- */

#define TWO_AGENTS                                                                                   \
    "local kvm = kvmesh\nlocal m = kvm.model('mock:echo')\n"                                          \
    "local g = kvm.graph{ name = 'pair', state = { ans = kvm.reduce.replace } }\n"                    \
    "g:agent('a', { model = m, template = 'alpha {input}', max_tokens = 4 })\n"                       \
    "g:agent('b', { model = m, template = 'beta {agent.a} then {input}', max_tokens = 6, writes = 'ans' })\n" \
    "g:edge(kvm.START, 'a')\ng:edge('a', 'b')\nreturn g\n"

typedef struct wf_case {
    char *want;             /* outputs of the clean run, as JSON text (counted memory) */
    const char *trace_root; /* NULL: no trace */
    const char *model;      /* NULL: the mock; else every kvmesh.model() opens this path */
} wf_case_t;

/* Load + start + drive + check; the status of a failure is the load's or the run's. */
static int op_workflow(void *ud) {
    wf_case_t *c = ud;
    kvm_wf_opts_t o = {.trace_root = c->trace_root, .model_override = c->model,
                       .llm = {.model = {.backend = "cpu", .quiet = true}}};
    kvm_workflow_t *wf = kvm_wf_load_string("pair.lua", TWO_AGENTS, strlen(TWO_AGENTS), &o);
    if (!wf) return kvm_errcode() < 0 ? kvm_errcode() : KVM_EINTERNAL;
    int rc = 0, run = -1;
    cJSON *in = cJSON_CreateObject();
    if (!in || !cJSON_AddStringToObject(in, "input", "gamma delta")) rc = kvm_seterr(KVM_ENOMEM, "test: out of memory building the inputs");
    if (!rc) rc = kvm_wf_start(wf, in, 1, &run);
    cJSON_Delete(in);
    if (!rc) rc = kvm_wf_drive(wf);
    const char *msg = NULL;
    if (!rc && (rc = kvm_wf_run_status(wf, run, &msg)) != 0) kvm_seterr(rc, "%s", msg ? msg : "");
    if (!rc) {
        char *got = cJSON_PrintUnformatted(kvm_wf_run_outputs(wf, run));
        if (!got) {
            rc = kvm_seterr(KVM_ENOMEM, "test: out of memory printing the outputs");
        } else if (!c->want) {
            c->want = kvm_strdup(got);
        } else if (strcmp(got, c->want) != 0) {
            fprintf(stderr, "outputs differ from the clean run:\n  got  %s\n  want %s\n", got, c->want);
            rc = kvm_seterr(KVM_EINTERNAL, "a run that reported success gave other outputs");
        }
        cJSON_free(got);
    }
    kvm_wf_free(wf);
    return rc;
}

static void test_every_failed_allocation_of_a_workflow_run_is_a_clean_error(void **st) {
    (void)st;
    wf_case_t c = {0};
    assert_int_equal(op_workflow(&c), 0); /* the reference outputs (and one-time set-up) */
    assert_non_null(c.want);
    sweep("two-agent workflow run", op_workflow, &c);
    kvm_free(c.want);
}

/* The same workflow on minillama-2m: its model load, the workflow load, templates, the KV store, prefix reuse, the
 * scheduler and admission control on a real model. Every allocation site is made to fail (the first attempt of each:
 * about 1/10 of the attempts); KVM_FAULT_REAL=1 fails every attempt instead (about 8,000 operations, 5 minutes in the
 * release build). */
static void test_every_allocation_site_of_a_workflow_run_on_a_real_model_fails_cleanly(void **st) {
    (void)st;
    if (!kvm_file_exists(MINILLAMA "/model.safetensors")) {
        fprintf(stderr, "SKIPPED: %s/model.safetensors not found\n", MINILLAMA);
        skip();
    }
    wf_case_t c = {.model = MINILLAMA};
    assert_int_equal(op_workflow(&c), 0);
    assert_non_null(c.want);
    sweep_sites("two-agent workflow run on minillama-2m", op_workflow, &c, !getenv("KVM_FAULT_REAL"));
    kvm_free(c.want);
}

/* ---- disk full while writing a trace ------------------------------------------------------------- */

/* Bytes of the files under dir (one level of run folders). */
static size_t trace_bytes(const char *root) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "du -sb --apparent-size '%s' | cut -f1", root);
    FILE *p = popen(cmd, "r");
    unsigned long long n = 0;
    if (p && fscanf(p, "%llu", &n) != 1) n = 0;
    if (p) pclose(p);
    return (size_t)n;
}

/* In a child process whose files may grow to `limit` bytes (RLIMIT_FSIZE; SIGXFSZ ignored, so a write past it
 * fails with EFBIG as on a full disk): the traced run gives the clean run's outputs (tracing stops with a
 * warning), nothing leaks, and what was written reads back (a torn last record at most). The child's exit
 * status says which check failed (0: none). */
static int traced_run_in_child(size_t limit, const char *root, wf_case_t *c) {
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid > 0) {
        int st = 0;
        waitpid(pid, &st, 0);
        return WIFEXITED(st) ? WEXITSTATUS(st) : 100 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    }
    struct rlimit rl = {.rlim_cur = limit, .rlim_max = limit};
    signal(SIGXFSZ, SIG_IGN);
    if (setrlimit(RLIMIT_FSIZE, &rl) != 0) _exit(2);
    kvm_log_set_level(KVM_LOG_ERROR); /* the expected "trace write failed ... tracing stops" warnings */
    size_t live0 = kvm_alloc_bytes_live();
    wf_case_t tc = {.want = c->want, .trace_root = root};
    if (op_workflow(&tc) != 0) {
        fprintf(stderr, "limit %zu: %s\n", limit, kvm_errmsg());
        _exit(3);
    }
    if (kvm_alloc_bytes_live() != live0) _exit(4);
    DIR *d = opendir(root);
    for (struct dirent *e; d && (e = readdir(d)) != NULL;) {
        if (e->d_name[0] == '.') continue;
        char run[700];
        snprintf(run, sizeof run, "%s/%s", root, e->d_name);
        kvm_trace_log_t log;
        int rc = kvm_trace_read(run, &log);
        if (rc != 0 && rc != KVM_ENOENT) {
            fprintf(stderr, "limit %zu: %s\n", limit, kvm_errmsg());
            _exit(5);
        }
        kvm_trace_log_free(&log);
    }
    if (d) closedir(d);
    _exit(0);
}

static void test_a_disk_full_while_writing_a_trace_stops_tracing_and_the_run_goes_on(void **st) {
    (void)st;
    char root[256], cmd[600];
    snprintf(root, sizeof root, "%s/fault_trace_%d", KVM_BINARY_DIR, (int)getpid());
    wf_case_t c = {.trace_root = root};
    assert_int_equal(op_workflow(&c), 0); /* the reference outputs, and the size of a whole trace */
    size_t full = trace_bytes(root);
    assert_true(full > 1000);
    int tried = 0;
    for (size_t limit = 0; limit < full + 512; limit += 97, tried++) {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
        assert_int_equal(system(cmd), 0);
        int rc = traced_run_in_child(limit, root, &c);
        if (rc != 0) fail_msg("file size limit %zu (a whole trace is %zu bytes): check %d failed", limit, full, rc);
    }
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    assert_int_equal(system(cmd), 0);
    fprintf(stderr, "disk full: %d file size limits from 0 to %zu bytes, each a clean run with its trace cut\n", tried,
            full + 512);
    kvm_free(c.want);
}

/* ---- trace views ---------------------------------------------------------------------------------- */

/* Every view of the version-1 fixture trace (kvm_trace_view_*), each text freed. */
static int trace_views(void *ud) {
    (void)ud;
    char *text = NULL;
    int rc = kvm_trace_view_run(KVM_SOURCE_DIR "/tests/fixtures/trace_v1", &text);
    kvm_free(text);
    text = NULL;
    if (rc == 0) rc = kvm_trace_view_steps(KVM_SOURCE_DIR "/tests/fixtures/trace_v1", NULL, &text);
    kvm_free(text);
    text = NULL;
    if (rc == 0) {
        int n = kvm_trace_view_list(KVM_SOURCE_DIR "/tests/fixtures", &text);
        rc = n < 0 ? n : n == 1 ? 0 : kvm_seterr(KVM_EINTERNAL, "listed %d runs, not 1", n);
    }
    kvm_free(text);
    return rc;
}

static void test_every_failed_allocation_of_a_trace_view_is_a_clean_error(void **st) {
    (void)st;
    sweep("trace views", trace_views, NULL);
}

int main(void) {
    kvm_set_threads(2);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_failed_allocation_of_an_hf_model_load_is_a_clean_error),
        cmocka_unit_test(test_every_failed_allocation_of_a_llama2c_model_load_is_a_clean_error),
        cmocka_unit_test(test_every_failed_allocation_of_a_workflow_run_is_a_clean_error),
        cmocka_unit_test(test_every_allocation_site_of_a_workflow_run_on_a_real_model_fails_cleanly),
        cmocka_unit_test(test_every_failed_allocation_of_a_trace_view_is_a_clean_error),
        cmocka_unit_test(test_a_disk_full_while_writing_a_trace_stops_tracing_and_the_run_goes_on),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
