/* trace.c - trace files: run ids, the run directory, lines written and flushed one by one, the line
 * reader with its torn-tail rule, the storage of read records and the listing of runs. The schema of
 * the records is trace_schema.c's (see trace.h and docs/trace-format.md). */
#include "trace_internal.h"

#include <dirent.h>
#include <stddef.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../core/core.h"
#include "../core/json.h"

/* ---- ids -------------------------------------------------------------------------------------- */

void kvm_trace_new_id(char out[KVM_TRACE_ID_HEX]) {
    static uint64_t counter;
    uint8_t b[16];
    ssize_t got = getrandom(b, sizeof b, GRND_NONBLOCK);
    if (got != (ssize_t)sizeof b) {
        uint64_t a = kvm_wall_ns() ^ ((uint64_t)getpid() << 32), c = ++counter;
        uint64_t h1 = kvm_hash64(&a, sizeof a, KVM_HASH_SEED), h2 = kvm_hash64(&c, sizeof c, h1);
        memcpy(b, &h1, 8);
        memcpy(b + 8, &h2, 8);
    }
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        out[2 * i] = hex[b[i] >> 4];
        out[2 * i + 1] = hex[b[i] & 15];
    }
    out[32] = '\0';
}

/* ---- writer ----------------------------------------------------------------------------------- */

kvm_trace_t *kvm_trace_open(const char *root, const char *name) {
    if (!root || !name || !*name) {
        kvm_seterr(KVM_EINVAL, "trace: root and run name are required");
        return NULL;
    }
    char dir[4096], path[4096];
    if (kvm_path_join(dir, sizeof dir, root, name) != 0) return NULL;
    if (kvm_mkdirs(dir) != 0) return NULL;
    if (kvm_path_join(path, sizeof path, dir, "events.jsonl") != 0) return NULL;
    kvm_trace_t *t = kvm_calloc(1, sizeof *t);
    if (!t) return NULL;
    t->dir = kvm_strdup(dir);
    t->path = kvm_strdup(path);
    t->f = fopen(path, "a");
    if (!t->dir || !t->path || !t->f) {
        kvm_seterr(KVM_EIO, "trace: cannot open '%s' for appending: %s", path, strerror(errno));
        kvm_trace_close(t);
        return NULL;
    }
    t->t0_ns = kvm_wall_ns();
    return t;
}

int trace_write_json(kvm_trace_t *t, cJSON *rec) {
    char b[24];
    snprintf(b, sizeof b, "%llu", (unsigned long long)kvm_wall_ns());
    cJSON_AddStringToObject(rec, "ts", b);
    char *s = cJSON_PrintUnformatted(rec);
    if (!s) return kvm_seterr(KVM_ENOMEM, "trace: cannot serialise a record for '%s'", t->path);
    size_t n = strlen(s);
    /* One fwrite of line + newline, then a flush: a reader never sees half a record unless the process
     * dies inside the write, and then only the last line is torn. */
    s[n] = '\n';
    size_t w = fwrite(s, 1, n + 1, t->f);
    s[n] = '\0';
    cJSON_free(s);
    if (w != n + 1 || fflush(t->f) != 0) return kvm_seterr(KVM_EIO, "trace: write to '%s' failed: %s", t->path, strerror(errno));
    t->n_records++;
    return 0;
}

int trace_write_file_json(kvm_trace_t *t, const char *name, const cJSON *j) {
    char path[4096], tmp[4200];
    if (kvm_path_join(path, sizeof path, t->dir, name) != 0) return KVM_ERANGE;
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    char *s = cJSON_Print(j);
    if (!s) return kvm_seterr(KVM_ENOMEM, "trace: cannot serialise '%s'", path);
    FILE *f = fopen(tmp, "w");
    int rc = 0;
    if (!f || fputs(s, f) < 0 || fputc('\n', f) < 0) rc = kvm_seterr(KVM_EIO, "trace: cannot write '%s': %s", tmp, strerror(errno));
    if (f && fclose(f) != 0 && rc == 0) rc = kvm_seterr(KVM_EIO, "trace: cannot close '%s'", tmp);
    if (rc == 0 && rename(tmp, path) != 0) rc = kvm_seterr(KVM_EIO, "trace: cannot rename '%s': %s", tmp, strerror(errno));
    cJSON_free(s);
    return rc;
}

void kvm_trace_close(kvm_trace_t *t) {
    if (!t) return;
    if (t->f) fclose(t->f);
    kvm_free(t->dir);
    kvm_free(t->path);
    kvm_free(t);
}

/* ---- storage of read records ------------------------------------------------------------------------ */

struct kvm_trace_mem {
    struct kvm_trace_mem *next;
    size_t cap, used;
    max_align_t data[]; /* cap bytes */
};

void *trace_mem_alloc(kvm_trace_mem_t **m, size_t n) {
    n = (n + sizeof(max_align_t) - 1) / sizeof(max_align_t) * sizeof(max_align_t);
    if (!*m || (*m)->cap - (*m)->used < n) {
        size_t cap = n > 60000 ? n : 60000;
        kvm_trace_mem_t *b = kvm_malloc(sizeof *b + cap);
        if (!b) return NULL;
        b->next = *m;
        b->cap = cap;
        b->used = 0;
        *m = b;
    }
    void *p = (char *)(*m)->data + (*m)->used;
    (*m)->used += n;
    return p;
}

void trace_mem_free(kvm_trace_mem_t *m) {
    while (m) {
        kvm_trace_mem_t *next = m->next;
        kvm_free(m);
        m = next;
    }
}

/* ---- reader ------------------------------------------------------------------------------------------ */

/* Adds the record of one parsed line to the log. */
static int add_line(kvm_trace_log_t *log, int *cap, const cJSON *o, const char *file, int line) {
    if (log->n == *cap) {
        int nc = *cap ? *cap * 2 : 64;
        kvm_trace_rec_t *nr = kvm_realloc(log->recs, (size_t)nc * sizeof *nr);
        if (!nr) return kvm_seterr(KVM_ENOMEM, "trace: out of memory reading '%s'", file);
        log->recs = nr;
        *cap = nc;
    }
    int rc = trace_rec_from_json(o, &log->recs[log->n], &log->mem, file, line);
    if (rc == 0) log->n++;
    return rc;
}

int kvm_trace_read(const char *path, kvm_trace_log_t *log) {
    kvm_core_init();
    memset(log, 0, sizeof *log);
    char file[4096];
    if (kvm_dir_exists(path)) {
        if (kvm_path_join(file, sizeof file, path, "events.jsonl") != 0) return KVM_ERANGE;
    } else {
        snprintf(file, sizeof file, "%s", path);
    }
    char *buf = NULL;
    size_t len = 0;
    int rc = kvm_read_file(file, &buf, &len, 0);
    if (rc != 0) return rc;
    size_t pos = 0;
    int line = 0, cap = 0;
    while (rc == 0 && pos < len) {
        line++;
        char *nl = memchr(buf + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - buf) : len;
        bool last = !nl || end + 1 >= len;
        buf[end] = '\0';
        const char *s = buf + pos;
        pos = end + 1;
        if (s[strspn(s, " \t\r")] == '\0') continue;
        kvm_errclear(); /* so that a failed parse can be told to be out of memory */
        cJSON *r = cJSON_Parse(s);
        if (!r && kvm_json_failed_for_memory()) {
            rc = kvm_seterr(KVM_ENOMEM, "%s:%d: out of memory parsing the record", file, line);
            break;
        }
        if (!r || !cJSON_IsObject(r) || !nl) {
            cJSON_Delete(r);
            if (last) { /* a torn tail: the writer died mid-record */
                log->torn_tail = true;
                break;
            }
            rc = kvm_seterr(KVM_EFORMAT, "%s:%d: not a JSON object record", file, line);
            break;
        }
        rc = add_line(log, &cap, r, file, line);
        cJSON_Delete(r);
    }
    kvm_free(buf);
    if (rc) kvm_trace_log_free(log);
    return rc;
}

int kvm_trace_read_index(const char *run_dir, kvm_trace_log_t *log) {
    memset(log, 0, sizeof *log);
    char file[4096];
    if (kvm_path_join(file, sizeof file, run_dir, "index.json") != 0) return KVM_ERANGE;
    char *buf = NULL;
    size_t len = 0;
    int rc = kvm_read_file(file, &buf, &len, 0); /* no stat first: `trace ls` reads 10,000 of these */
    if (rc == KVM_ENOENT) return kvm_seterr(KVM_ENOENT, "trace: '%s' has no index.json (the run is going on, or it died)", run_dir);
    if (rc != 0) return rc;
    kvm_errclear();
    cJSON *o = cJSON_Parse(buf);
    kvm_free(buf);
    bool oom = !o && kvm_json_failed_for_memory();
    log->recs = o ? kvm_malloc(sizeof *log->recs) : NULL;
    if (oom) rc = kvm_seterr(KVM_ENOMEM, "%s: out of memory parsing JSON", file);
    else if (!o) rc = kvm_seterr(KVM_EFORMAT, "%s: not JSON", file);
    else if (!log->recs) rc = kvm_seterr(KVM_ENOMEM, "trace: out of memory reading '%s'", file);
    else rc = trace_index_from_json(o, log->recs, &log->mem, file);
    cJSON_Delete(o);
    if (rc) kvm_trace_log_free(log);
    else log->n = 1;
    return rc;
}

void kvm_trace_log_free(kvm_trace_log_t *log) {
    if (!log) return;
    kvm_free(log->recs);
    trace_mem_free(log->mem);
    memset(log, 0, sizeof *log);
}

const kvm_trace_rec_t *kvm_trace_log_next(const kvm_trace_log_t *log, kvm_trace_type_t type, int *from) {
    for (int i = from ? *from : 0; i < log->n; i++)
        if (log->recs[i].type == type) {
            if (from) *from = i + 1;
            return &log->recs[i];
        }
    if (from) *from = log->n;
    return NULL;
}

/* ---- listing ---------------------------------------------------------------------------------- */

typedef struct {
    char **v;
    int n, cap;
} strvec;

static int strvec_push(strvec *sv, const char *s) {
    if (sv->n == sv->cap) {
        int nc = sv->cap ? sv->cap * 2 : 32;
        char **nv = kvm_realloc(sv->v, (size_t)nc * sizeof *nv);
        if (!nv) return KVM_ENOMEM;
        sv->v = nv;
        sv->cap = nc;
    }
    if (!(sv->v[sv->n] = kvm_strdup(s))) return KVM_ENOMEM;
    sv->n++;
    return 0;
}

/* Adds dir, or the run directories under it, to out. 0, or KVM_ENOMEM. A folder that cannot be read
 * below the root is skipped (the root is opened by kvm_trace_find_runs, which reports it). */
static int collect(const char *dir, int depth, strvec *out) {
    char p[4096];
    if (kvm_path_join(p, sizeof p, dir, "events.jsonl") == 0 && kvm_file_exists(p)) return strvec_push(out, dir);
    if (depth >= 3) return 0;
    DIR *d = opendir(dir);
    if (!d) return 0;
    int rc = 0;
    for (struct dirent *e; rc == 0 && (e = readdir(d)) != NULL;) {
        if (e->d_name[0] == '.') continue;
        if (e->d_type != DT_DIR && e->d_type != DT_UNKNOWN && e->d_type != DT_LNK) continue; /* files: no stat */
        if (kvm_path_join(p, sizeof p, dir, e->d_name) != 0) continue;
        if (e->d_type == DT_DIR || kvm_dir_exists(p)) rc = collect(p, depth + 1, out);
    }
    closedir(d);
    return rc;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int kvm_trace_find_runs(const char *root, void (*fn)(const char *run_dir, void *ud), void *ud) {
    if (!root || !kvm_dir_exists(root)) return kvm_seterr(KVM_ENOENT, "trace: '%s' is not a directory", root ? root : "(null)");
    DIR *d = opendir(root);
    if (!d) return kvm_seterr(KVM_EIO, "trace: cannot read the directory '%s': %s", root, strerror(errno));
    closedir(d);
    strvec sv = {0};
    int rc = collect(root, 0, &sv);
    if (rc == 0 && sv.n > 1) qsort(sv.v, (size_t)sv.n, sizeof *sv.v, cmp_str); /* sv.v is NULL when none */
    for (int i = 0; i < sv.n; i++) {
        if (rc == 0) fn(sv.v[i], ud);
        kvm_free(sv.v[i]);
    }
    kvm_free(sv.v);
    return rc ? kvm_seterr(rc, "trace: out of memory listing the runs under '%s'", root) : sv.n;
}
