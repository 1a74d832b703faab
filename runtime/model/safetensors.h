/* safetensors.h - a validating reader of .safetensors files over a read-only mapping (L2).
 *
 * Layout (https://huggingface.co/docs/safetensors):
 *   bytes [0, 8)      u64 little-endian N = header length
 *   bytes [8, 8+N)    UTF-8 JSON object, optionally right-padded with spaces:
 *                     { "<name>": {"dtype": "F32"|"F16"|"BF16", "shape": [d0, ...], "data_offsets": [begin, end]},
 *                       ..., "__metadata__": {"<str>": "<str>"} }
 *   bytes [8+N, EOF)  the data area; offsets are relative to its start; row-major, little-endian.
 *
 * Everything a file says is checked before a pointer into it is handed out: the header length against the
 * file size and the 100,000,000-byte safetensors limit, the JSON (no trailing bytes other than spaces), each
 * tensor's dtype, shape and data_offsets (begin <= end, inside the data area, end - begin = numel x dtype
 * size), duplicate names, overlapping ranges, and the alignment of each tensor's data to its element size
 * (kvmesh reads the data in place). Tensor data is never copied: kvm_st_tensor_t.data points into the
 * mapping, which must outlive every pointer taken from it.
 *
 * Errors: KVM_EFORMAT (structure; the message names the file and, where there is one, the tensor),
 * KVM_EDTYPE (a dtype kvmesh does not read, named with its tensor), KVM_ENOENT/KVM_EIO (opening). */
#ifndef KVM_SAFETENSORS_H
#define KVM_SAFETENSORS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model.h"

#define KVM_ST_MAX_DIMS 8
#define KVM_ST_MAX_HEADER_BYTES 100000000ULL /* the safetensors format's own limit */

typedef struct kvm_st_tensor {
    char *name;                      /* owned by the file's index */
    kvm_dtype_t dtype;
    int ndim;                        /* 0 = scalar (one element) */
    int64_t shape[KVM_ST_MAX_DIMS];
    uint64_t begin, end;             /* byte range relative to the data area */
    const void *data;                /* points into the mapping (data area + begin) */
    bool used;                       /* for consumers that check every tensor was taken (kvm_st_take) */
} kvm_st_tensor_t;

typedef struct kvm_st_file {
    char *path;                      /* owned copy, for messages */
    const uint8_t *base;             /* the whole file */
    size_t size;
    uint64_t header_bytes;           /* N */
    const uint8_t *data;             /* base + 8 + N */
    uint64_t data_bytes;
    kvm_st_tensor_t *tensors;        /* [n_tensors], sorted by name */
    int n_tensors;
    kvm_mmap_t map;                  /* the mapping, when kvm_st_open made it */
    bool owns_map;
} kvm_st_file_t;

enum {
    /* the tensors' ranges must tile the data area exactly: no holes, nothing after the last one (the
     * official writer always does this; kvmesh's own formats require it) */
    KVM_ST_EXACT = 1 << 0,
};

/* Indexes a safetensors image buf[0..size) that the caller keeps mapped (the index points into it).
 * path names the file in messages. On error *f is left empty (nothing to close). */
int kvm_st_parse(kvm_st_file_t *f, const void *buf, size_t size, const char *path, int flags);
/* Maps the file at path and indexes it; kvm_st_close() unmaps. */
int kvm_st_open(kvm_st_file_t *f, const char *path, int flags);
/* Frees the index (and the mapping if kvm_st_open made it). Safe on a zeroed or closed file. */
void kvm_st_close(kvm_st_file_t *f);

/* The tensor called name, or NULL. */
kvm_st_tensor_t *kvm_st_find(const kvm_st_file_t *f, const char *name);
/* kvm_st_find that also marks the tensor used. */
kvm_st_tensor_t *kvm_st_take(const kvm_st_file_t *f, const char *name);
/* Fills a kvm_tensor_t view of t (KVM_EUNSUPPORTED if it has more than 4 dimensions). */
int kvm_st_view(const kvm_st_tensor_t *t, kvm_tensor_t *out, const char *path);

/* Number of elements of a tensor (1 for a scalar). */
uint64_t kvm_st_numel(const kvm_st_tensor_t *t);
/* "F32", "F16", "BF16" -> dtype; returns false for anything else. */
bool kvm_st_dtype_parse(const char *s, kvm_dtype_t *out);
/* The safetensors name of a dtype ("F32", "F16", "BF16"). */
const char *kvm_st_dtype_name(kvm_dtype_t t);

/* Writes a safetensors file from n tensors given by name, dtype, shape and data (each numel x dtype size
 * bytes), contiguous in the given order, header padded with spaces to a multiple of 8. For tests and tools. */
typedef struct kvm_st_entry {
    const char *name;
    kvm_dtype_t dtype;
    int ndim;
    int64_t shape[KVM_ST_MAX_DIMS];
    const void *data;
} kvm_st_entry_t;
int kvm_st_write(const char *path, const kvm_st_entry_t *entries, int n);

#endif
