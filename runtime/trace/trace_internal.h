/* trace_internal.h - what trace.c (files, lines, listing) and trace_schema.c (the record schema) share.
 * Not a public header. */
#ifndef KVM_TRACE_INTERNAL_H
#define KVM_TRACE_INTERNAL_H

#include <cjson/cJSON.h>

#include "trace.h"

/* ---- trace.c ---------------------------------------------------------------------------------------- */

/* Appends rec (with "ts" added) as one line and flushes. rec stays the caller's. */
int trace_write_json(kvm_trace_t *t, cJSON *rec);
/* Writes t->dir/name atomically (temp file + rename) with the JSON of j. */
int trace_write_file_json(kvm_trace_t *t, const char *name, const cJSON *j);

/* Storage of read records: blocks that live as long as the log. NULL on out of memory. */
void *trace_mem_alloc(kvm_trace_mem_t **m, size_t n);
void trace_mem_free(kvm_trace_mem_t *m);

/* ---- trace_schema.c ----------------------------------------------------------------------------------- */

/* Fills rec from a parsed record object (the record type from "t"); strings and arrays go to *mem.
 * KVM_EFORMAT naming file:line and the field; KVM_EVERSION for a newer major version. */
int trace_rec_from_json(const cJSON *o, kvm_trace_rec_t *rec, kvm_trace_mem_t **mem, const char *file, int line);
/* The same for index.json. */
int trace_index_from_json(const cJSON *o, kvm_trace_rec_t *rec, kvm_trace_mem_t **mem, const char *file);

/* Makes every string of j and its children (keys, values, raw values) valid UTF-8, bytes that are not replaced by
 * U+FFFD: what the writer does to each record, for other JSON made from records (trace_export.c). */
void trace_utf8_clean(cJSON *j);

#endif
