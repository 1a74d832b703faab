/* trace.h - run traces as append-only JSONL (L3).
 *
 * One directory per run holds events.jsonl: one JSON object per line, written and flushed record by
 * record, so a crash loses nothing already written. Readers ignore a torn (unterminated or unparsable)
 * LAST line; a bad line anywhere else is an error naming the line. index.json (a summary written at run
 * end) lets `kvmesh trace ls` list runs without reading every log. The record types and fields are
 * specified in docs/trace-format.md. */
#ifndef KVM_TRACE_H
#define KVM_TRACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <cjson/cJSON.h>

#define KVM_TRACE_VERSION 1
#define KVM_TRACE_ID_HEX 33 /* 32 hex chars + NUL */

typedef struct kvm_trace {
    char *dir;       /* the run's directory (owned) */
    char *path;      /* dir/events.jsonl (owned) */
    FILE *f;
    uint64_t n_records;
    uint64_t t0_ns;  /* wall clock at open */
} kvm_trace_t;

/* Fills out[33] with 32 random lowercase hex characters (16 bytes from the OS entropy source, with a
 * time/counter fallback) and a NUL. */
void kvm_trace_new_id(char out[KVM_TRACE_ID_HEX]);

/* Creates root/<name>/ (and missing parents) and opens events.jsonl in it for appending. Returns NULL
 * and sets the message (naming the path) on error. Free with kvm_trace_close(). */
kvm_trace_t *kvm_trace_open(const char *root, const char *name);
/* Appends one record: adds "ts" (wall-clock ns since the epoch, as a string) unless present, writes
 * it as one line and flushes. rec stays owned by the caller. */
int kvm_trace_write(kvm_trace_t *t, cJSON *rec);
/* Writes dir/index.json (atomically: temp file + rename). idx stays owned by the caller. */
int kvm_trace_write_index(kvm_trace_t *t, const cJSON *idx);
/* Flushes and closes; NULL is a no-op. */
void kvm_trace_close(kvm_trace_t *t);

/* A parsed events.jsonl. */
typedef struct kvm_trace_log {
    cJSON **recs;    /* [n] parsed records (owned) */
    int n;
    bool torn_tail;  /* the last line was incomplete or unparsable and was skipped */
} kvm_trace_log_t;

/* Reads path (an events.jsonl, or a run directory holding one). A torn last line is skipped and
 * reported in log->torn_tail; any other bad line gives KVM_EFORMAT naming path:line. Free with
 * kvm_trace_log_free(). */
int kvm_trace_read(const char *path, kvm_trace_log_t *log);
void kvm_trace_log_free(kvm_trace_log_t *log);
/* First record with "t" == type at or after index *from (updated to the index after it); NULL if none. */
cJSON *kvm_trace_log_next(const kvm_trace_log_t *log, const char *type, int *from);

/* Calls fn(run_dir, ud) for every directory under root (depth <= 3) that holds an events.jsonl, in
 * sorted path order. Returns the number found, or <0 on error (root unreadable). */
int kvm_trace_find_runs(const char *root, void (*fn)(const char *run_dir, void *ud), void *ud);

/* cJSON helpers used by every trace writer: a uint64 as a decimal string (JSON numbers lose
 * precision past 2^53), and a string-or-null. */
cJSON *kvm_json_u64(uint64_t v);
cJSON *kvm_json_str_or_null(const char *s);

#endif
