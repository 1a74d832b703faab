/* trace_api.c - the public trace reader of include/kvmesh.h: a run's events.jsonl read through
 * kvm_trace_read (which never crashes on a torn or hostile file), each record handed out as one line of
 * JSON text with its type. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/core.h"
#include "trace.h"

struct kvm_trace_reader {
    int n;
    char **json;   /* [n] compact JSON of each record */
    char **type;   /* [n] its "t" field ("" when absent) */
    bool torn;
};

void kvm_trace_reader_free(kvm_trace_reader_t *t) {
    if (!t) return;
    for (int i = 0; i < t->n; i++) {
        kvm_free(t->json[i]);
        kvm_free(t->type[i]);
    }
    kvm_free(t->json);
    kvm_free(t->type);
    kvm_free(t);
}

/* The text of line `line` (1-based) of data[0..len), copied; NULL when out of memory or past the end. */
static char *line_copy(const char *data, size_t len, int line) {
    const char *p = data, *end = data + len;
    for (int l = 1; l < line && p < end; l++) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        p = nl ? nl + 1 : end;
    }
    if (p >= end) return NULL;
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    size_t n = (size_t)((nl ? nl : end) - p);
    char *s = kvm_malloc(n + 1);
    if (s) {
        memcpy(s, p, n);
        s[n] = '\0';
    }
    return s;
}

/* Records are checked by the typed reader (kvm_trace_read: torn tail, hostile lines, versions); each one is
 * then handed out as the line it was read from. */
kvm_trace_reader_t *kvm_trace_reader_open(const char *path) {
    if (!path) {
        kvm_seterr(KVM_EINVAL, "no trace path given");
        return NULL;
    }
    kvm_trace_log_t log = {0};
    if (kvm_trace_read(path, &log)) return NULL;
    char file[4096];
    int rc = kvm_dir_exists(path) ? kvm_path_join(file, sizeof file, path, "events.jsonl")
                                  : (snprintf(file, sizeof file, "%s", path), 0);
    char *data = NULL;
    size_t len = 0;
    if (!rc) rc = kvm_read_file(file, &data, &len, 0);
    kvm_trace_reader_t *t = rc ? NULL : kvm_calloc(1, sizeof *t);
    if (!rc && !t) rc = KVM_ENOMEM;
    if (!rc && log.n > 0) {
        t->json = kvm_calloc((size_t)log.n, sizeof *t->json);
        t->type = kvm_calloc((size_t)log.n, sizeof *t->type);
        if (!t->json || !t->type) rc = KVM_ENOMEM;
    }
    for (int i = 0; !rc && i < log.n; i++, t->n++) {
        t->json[i] = line_copy(data, len, log.recs[i].line);
        t->type[i] = kvm_strdup(log.recs[i].type_name ? log.recs[i].type_name : "");
        if (!t->json[i] || !t->type[i]) rc = KVM_ENOMEM;
    }
    if (t) t->torn = log.torn_tail;
    kvm_trace_log_free(&log);
    kvm_free(data);
    if (rc) {
        kvm_trace_reader_free(t);
        kvm_errctx(rc, "reading trace %s", path);
        return NULL;
    }
    return t;
}

int kvm_trace_reader_n_records(const kvm_trace_reader_t *t) { return t->n; }
bool kvm_trace_reader_torn(const kvm_trace_reader_t *t) { return t->torn; }

const char *kvm_trace_reader_record_json(const kvm_trace_reader_t *t, int i) {
    return i >= 0 && i < t->n ? t->json[i] : NULL;
}

const char *kvm_trace_reader_record_type(const kvm_trace_reader_t *t, int i) {
    return i >= 0 && i < t->n ? t->type[i] : NULL;
}

typedef struct list_cb {
    void (*fn)(void *ud, const char *run_dir);
    void *ud;
} list_cb_t;

static void list_one(const char *run_dir, void *ud) {
    list_cb_t *c = ud;
    c->fn(c->ud, run_dir);
}

int kvm_trace_list(const char *root, void (*fn)(void *ud, const char *run_dir), void *ud) {
    if (!root || !fn) return kvm_seterr(KVM_EINVAL, "kvm_trace_list needs a root and a callback");
    list_cb_t c = {fn, ud};
    return kvm_trace_find_runs(root, list_one, &c);
}
