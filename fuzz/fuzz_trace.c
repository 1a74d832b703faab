/* fuzz_trace.c - libFuzzer target: the trace reader and the views over it (runtime/trace/trace.c,
 * trace_schema.c, trace_view.c, through include/kvmesh.h).
 *
 * The input is cut at FZ_SEP into a run's events.jsonl and an optional index.json, written into a run
 * directory of a trace root. The run is read with kvm_trace_reader_open (every record's JSON and type
 * fetched) and through the views `kvmesh trace ls|show|steps` print: kvm_trace_view_list of the root,
 * kvm_trace_view_run, kvm_trace_view_steps (every step cut, and step 0 in full). Each call must succeed or
 * fail with a message; a text it returns is NUL-terminated. Replay (which runs the stored script) is the
 * Lua target's ground, not this one's. */
#include "fuzz_util.h"

#include <kvmesh.h>

#include <string.h>

#define CHECK(cond) FZ_CHECK("fuzz_trace", cond)

static char g_root[512], g_run[600];
static volatile size_t g_sink;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    fz_init_library();
    fz_mkdir("traces", g_root, sizeof g_root);
    fz_mkdir("traces/run", g_run, sizeof g_run);
    return 0;
}

/* Checks a view's result and frees its text. */
static void view_done(const char *what, int rc, char *text) {
    fz_report(what, rc < 0 ? rc : 0);
    if (rc >= 0) {
        CHECK(text != NULL);
        g_sink += strlen(text);
    } else {
        CHECK(*kvm_errmsg());
    }
    kvm_free(text);
    kvm_errclear();
}

static void read_records(void) {
    kvm_trace_reader_t *r = kvm_trace_reader_open(g_run);
    fz_report("kvm_trace_reader_open", r ? 0 : kvm_errcode());
    if (!r) {
        CHECK(*kvm_errmsg());
        kvm_errclear();
        return;
    }
    int n = kvm_trace_reader_n_records(r);
    CHECK(n >= 0);
    for (int i = 0; i < n; i++) {
        const char *json = kvm_trace_reader_record_json(r, i), *type = kvm_trace_reader_record_type(r, i);
        CHECK(json && type);
        g_sink += strlen(json) + strlen(type);
    }
    CHECK(kvm_trace_reader_record_json(r, n) == NULL);
    (void)kvm_trace_reader_torn(r);
    kvm_trace_reader_free(r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_part_t parts[2] = {{0}};
    int n = fz_split(data, size, parts, 2);
    char path[700];
    fz_write("traces/run/events.jsonl", parts[0].data, parts[0].size, path, sizeof path);
    if (n > 1) fz_write("traces/run/index.json", parts[1].data, parts[1].size, path, sizeof path);
    else fz_unlink("traces/run/index.json");

    read_records();
    char *text = NULL;
    int rc = kvm_trace_view_list(g_root, &text);
    view_done("kvm_trace_view_list", rc, text);
    text = NULL;
    rc = kvm_trace_view_run(g_run, &text);
    view_done("kvm_trace_view_run", rc, text);
    text = NULL;
    rc = kvm_trace_view_steps(g_run, NULL, &text);
    view_done("kvm_trace_view_steps", rc, text);
    kvm_trace_view_params_t p = kvm_trace_view_default_params();
    p.step = 0;
    p.full = true;
    text = NULL;
    rc = kvm_trace_view_steps(g_run, &p, &text);
    view_done("kvm_trace_view_steps(0, full)", rc, text);
    return 0;
}
