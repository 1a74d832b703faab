/* safetensors.c - validating safetensors reader over a mapping, and a small writer (see safetensors.h). */
#include "safetensors.h"

#include "../core/json.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- dtypes --------------------------------------------------------------------------------- */

bool kvm_st_dtype_parse(const char *s, kvm_dtype_t *out) {
    if (!strcmp(s, "F32")) *out = KVM_F32;
    else if (!strcmp(s, "F16")) *out = KVM_F16;
    else if (!strcmp(s, "BF16")) *out = KVM_BF16;
    else return false;
    return true;
}

const char *kvm_st_dtype_name(kvm_dtype_t t) { return kvm_dtype_name(t); }

uint64_t kvm_st_numel(const kvm_st_tensor_t *t) {
    uint64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= (uint64_t)t->shape[i];
    return n;
}

/* ---- parsing -------------------------------------------------------------------------------- */

/* A JSON number that is a non-negative integer exactly representable as a double (< 2^53). */
static bool st_json_uint(const cJSON *v, uint64_t *out) {
    if (!cJSON_IsNumber(v)) return false;
    double d = v->valuedouble;
    if (!(d >= 0) || d > 9007199254740992.0 || floor(d) != d) return false;
    *out = (uint64_t)d;
    return true;
}

static int st_cmp_name(const void *a, const void *b) {
    return strcmp(((const kvm_st_tensor_t *)a)->name, ((const kvm_st_tensor_t *)b)->name);
}

/* Orders tensor pointers by begin offset, then end (for the overlap scan). */
static int st_cmp_begin(const void *a, const void *b) {
    const kvm_st_tensor_t *x = *(const kvm_st_tensor_t *const *)a, *y = *(const kvm_st_tensor_t *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

static void st_free_index(kvm_st_file_t *f) {
    for (int i = 0; i < f->n_tensors; i++) kvm_free(f->tensors[i].name);
    kvm_free(f->tensors);
    kvm_free(f->path);
    f->tensors = NULL;
    f->n_tensors = 0;
    f->path = NULL;
}

/* Parses one header entry into t (name already set). Messages name path and tensor. */
static int st_parse_entry(kvm_st_file_t *f, kvm_st_tensor_t *t, const cJSON *e) {
    const char *path = f->path, *name = t->name;
    if (!cJSON_IsObject(e))
        return kvm_seterr(KVM_EFORMAT, "%s: header entry for tensor '%s' is not a JSON object", path, name);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(dt))
        return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s' has no \"dtype\" string", path, name);
    if (!cJSON_IsArray(sh))
        return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s' has no \"shape\" array", path, name);
    if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2)
        return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s' has no \"data_offsets\" array of two integers", path, name);
    if (!kvm_st_dtype_parse(dt->valuestring, &t->dtype))
        return kvm_seterr(KVM_EDTYPE, "%s: tensor '%s' has dtype %s; kvmesh reads F32, F16 and BF16 only", path, name,
                          dt->valuestring);
    int nd = cJSON_GetArraySize(sh);
    if (nd > KVM_ST_MAX_DIMS)
        return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s' has %d dimensions (at most %d are supported)", path, name, nd,
                          KVM_ST_MAX_DIMS);
    t->ndim = nd;
    uint64_t numel = 1;
    int i = 0;
    const cJSON *d;
    cJSON_ArrayForEach(d, sh) {
        uint64_t v;
        if (!st_json_uint(d, &v) || v > INT64_MAX)
            return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s': shape[%d] is not a non-negative integer", path, name, i);
        t->shape[i++] = (int64_t)v;
        if (__builtin_mul_overflow(numel, v, &numel))
            return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s': element count overflows", path, name);
    }
    uint64_t b, en;
    if (!st_json_uint(cJSON_GetArrayItem(off, 0), &b) || !st_json_uint(cJSON_GetArrayItem(off, 1), &en))
        return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s': data_offsets are not non-negative integers", path, name);
    if (b > en)
        return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s': data_offsets [%llu, %llu) begin after they end", path, name,
                          (unsigned long long)b, (unsigned long long)en);
    if (en > f->data_bytes)
        return kvm_seterr(KVM_EFORMAT,
                          "%s: tensor '%s': data_offsets [%llu, %llu) run past the end of the data area (%llu bytes)%s",
                          path, name, (unsigned long long)b, (unsigned long long)en, (unsigned long long)f->data_bytes,
                          en > f->data_bytes && b <= f->data_bytes ? ": the file is truncated or the offsets are wrong" : "");
    uint64_t want;
    if (__builtin_mul_overflow(numel, (uint64_t)kvm_dtype_size(t->dtype), &want) || en - b != want)
        return kvm_seterr(KVM_EFORMAT, "%s: tensor '%s': data_offsets [%llu, %llu) hold %llu bytes, but shape x %s needs %llu",
                          path, name, (unsigned long long)b, (unsigned long long)en, (unsigned long long)(en - b),
                          dt->valuestring, (unsigned long long)(numel * kvm_dtype_size(t->dtype)));
    t->begin = b;
    t->end = en;
    t->data = f->data + b;
    if (((uintptr_t)t->data) % kvm_dtype_size(t->dtype) != 0)
        return kvm_seterr(KVM_EFORMAT,
                          "%s: tensor '%s' data at file offset %llu is not aligned to its %zu-byte elements (header "
                          "length %llu should be padded to a multiple of 8)",
                          path, name, (unsigned long long)(8 + f->header_bytes + b), kvm_dtype_size(t->dtype),
                          (unsigned long long)f->header_bytes);
    return 0;
}

/* Checks ranges pairwise after sorting by offset: no overlap; with KVM_ST_EXACT also no holes and full
 * coverage. Empty tensors occupy no bytes and cannot overlap anything. */
static int st_check_ranges(kvm_st_file_t *f, int flags) {
    int n = f->n_tensors;
    if (n == 0) {
        if ((flags & KVM_ST_EXACT) && f->data_bytes)
            return kvm_seterr(KVM_EFORMAT, "%s: %llu data bytes but no tensors", f->path, (unsigned long long)f->data_bytes);
        return 0;
    }
    kvm_st_tensor_t **ord = kvm_malloc((size_t)n * sizeof *ord);
    if (!ord) return KVM_ENOMEM;
    for (int i = 0; i < n; i++) ord[i] = &f->tensors[i];
    qsort(ord, (size_t)n, sizeof *ord, st_cmp_begin);
    int rc = 0;
    const kvm_st_tensor_t *last = NULL; /* the non-empty tensor with the largest end so far */
    uint64_t covered = 0;
    for (int i = 0; i < n && !rc; i++) {
        const kvm_st_tensor_t *t = ord[i];
        if (t->begin == t->end) continue;
        if (last && t->begin < last->end) {
            rc = kvm_seterr(KVM_EFORMAT, "%s: tensors '%s' [%llu, %llu) and '%s' [%llu, %llu) overlap", f->path,
                            last->name, (unsigned long long)last->begin, (unsigned long long)last->end, t->name,
                            (unsigned long long)t->begin, (unsigned long long)t->end);
        } else if ((flags & KVM_ST_EXACT) && t->begin != covered) {
            rc = kvm_seterr(KVM_EFORMAT, "%s: %llu unused bytes before tensor '%s' at data offset %llu", f->path,
                            (unsigned long long)(t->begin - covered), t->name, (unsigned long long)covered);
        }
        if (!last || t->end > last->end) last = t;
        covered = last->end;
    }
    if (!rc && (flags & KVM_ST_EXACT) && covered != f->data_bytes)
        rc = kvm_seterr(KVM_EFORMAT, "%s: %llu bytes after the last tensor's data", f->path,
                        (unsigned long long)(f->data_bytes - covered));
    kvm_free(ord);
    return rc;
}

int kvm_st_parse(kvm_st_file_t *f, const void *buf, size_t size, const char *path, int flags) {
    kvm_core_init();
    memset(f, 0, sizeof *f);
    f->path = kvm_strdup(path ? path : "(safetensors)");
    if (!f->path) return KVM_ENOMEM;
    path = f->path;
    const uint8_t *p = buf;
    f->base = p;
    f->size = size;
    int rc = 0;
    cJSON *root = NULL;
    if (size < 8) {
        rc = kvm_seterr(KVM_EFORMAT, "%s: file is %zu bytes, too short to hold the 8-byte header length", path, size);
        goto fail;
    }
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | p[i];
    f->header_bytes = n;
    if (n > KVM_ST_MAX_HEADER_BYTES) {
        rc = kvm_seterr(KVM_EFORMAT, "%s: the header length (uint64 at byte 0) is over the safetensors limit of %llu "
                        "bytes: not a safetensors file", path, KVM_ST_MAX_HEADER_BYTES);
        goto fail;
    }
    if (n > size - 8) {
        rc = kvm_seterr(KVM_EFORMAT, "%s: the header length (uint64 at byte 0) runs past the end of the file (%zu "
                        "bytes): truncated or not a safetensors file", path, size);
        goto fail;
    }
    f->data = p + 8 + n;
    f->data_bytes = size - 8 - n;
    const char *hdr = (const char *)p + 8, *end = NULL;
    kvm_errclear();
    root = cJSON_ParseWithLengthOpts(hdr, (size_t)n, &end, 0);
    if (!root && kvm_json_failed_for_memory()) {
        rc = kvm_seterr(KVM_ENOMEM, "%s: out of memory parsing the header JSON (%llu bytes)", path, (unsigned long long)n);
        goto fail;
    }
    if (!root) {
        size_t at = end && end >= hdr ? (size_t)(end - hdr) : 0;
        rc = kvm_seterr(KVM_EFORMAT, "%s: header is not valid JSON (error near header byte %zu)", path, at);
        goto fail;
    }
    for (const char *q = end; q < hdr + n; q++) {
        if (*q != ' ' && *q != '\t' && *q != '\n' && *q != '\r') {
            rc = kvm_seterr(KVM_EFORMAT, "%s: unexpected bytes after the header JSON at header byte %zu (only space padding is allowed)",
                            path, (size_t)(q - hdr));
            goto fail;
        }
    }
    if (!cJSON_IsObject(root)) {
        rc = kvm_seterr(KVM_EFORMAT, "%s: header is not a JSON object", path);
        goto fail;
    }
    int cap = cJSON_GetArraySize(root);
    f->tensors = kvm_calloc(cap > 0 ? (size_t)cap : 1, sizeof *f->tensors);
    if (!f->tensors) { rc = KVM_ENOMEM; goto fail; }
    const cJSON *e;
    cJSON_ArrayForEach(e, root) {
        if (!e->string) { rc = kvm_seterr(KVM_EFORMAT, "%s: header entry without a name", path); goto fail; }
        if (!strcmp(e->string, "__metadata__")) {
            if (!cJSON_IsObject(e)) { rc = kvm_seterr(KVM_EFORMAT, "%s: __metadata__ is not a JSON object", path); goto fail; }
            const cJSON *kv;
            cJSON_ArrayForEach(kv, e) {
                if (!cJSON_IsString(kv)) {
                    rc = kvm_seterr(KVM_EFORMAT, "%s: __metadata__ value '%s' is not a string", path, kv->string ? kv->string : "?");
                    goto fail;
                }
            }
            continue;
        }
        kvm_st_tensor_t *t = &f->tensors[f->n_tensors];
        t->name = kvm_strdup(e->string);
        if (!t->name) { rc = KVM_ENOMEM; goto fail; }
        f->n_tensors++;
        if ((rc = st_parse_entry(f, t, e))) goto fail;
    }
    qsort(f->tensors, (size_t)f->n_tensors, sizeof *f->tensors, st_cmp_name);
    for (int i = 1; i < f->n_tensors; i++) {
        if (!strcmp(f->tensors[i - 1].name, f->tensors[i].name)) {
            rc = kvm_seterr(KVM_EFORMAT, "%s: tensor '%s' appears twice in the header", path, f->tensors[i].name);
            goto fail;
        }
    }
    if ((rc = st_check_ranges(f, flags))) goto fail;
    cJSON_Delete(root);
    return 0;
fail:
    cJSON_Delete(root);
    st_free_index(f);
    memset(f, 0, sizeof *f);
    return rc;
}

int kvm_st_open(kvm_st_file_t *f, const char *path, int flags) {
    memset(f, 0, sizeof *f);
    kvm_mmap_t map;
    int rc = kvm_mmap_open(&map, path);
    if (rc) return rc;
    rc = kvm_st_parse(f, map.data, map.size, path, flags);
    if (rc) {
        kvm_mmap_close(&map);
        return rc;
    }
    f->map = map;
    f->owns_map = true;
    return 0;
}

void kvm_st_close(kvm_st_file_t *f) {
    if (!f) return;
    st_free_index(f);
    if (f->owns_map) kvm_mmap_close(&f->map);
    memset(f, 0, sizeof *f);
}

kvm_st_tensor_t *kvm_st_find(const kvm_st_file_t *f, const char *name) {
    if (!f->n_tensors) return NULL;
    kvm_st_tensor_t key = {.name = (char *)name};
    return bsearch(&key, f->tensors, (size_t)f->n_tensors, sizeof *f->tensors, st_cmp_name);
}

kvm_st_tensor_t *kvm_st_take(const kvm_st_file_t *f, const char *name) {
    kvm_st_tensor_t *t = kvm_st_find(f, name);
    if (t) t->used = true;
    return t;
}

int kvm_st_view(const kvm_st_tensor_t *t, kvm_tensor_t *out, const char *path) {
    memset(out, 0, sizeof *out);
    if (t->ndim > 4)
        return kvm_seterr(KVM_EUNSUPPORTED, "%s: tensor '%s' has %d dimensions; kvmesh uses at most 4", path ? path : "?",
                          t->name, t->ndim);
    out->data = t->data;
    out->dtype = t->dtype;
    out->ndim = t->ndim;
    for (int i = 0; i < t->ndim; i++) out->shape[i] = t->shape[i];
    return 0;
}

/* ---- writing -------------------------------------------------------------------------------- */

int kvm_st_write(const char *path, const kvm_st_entry_t *entries, int n) {
    kvm_core_init();
    cJSON *root = cJSON_CreateObject();
    if (!root) return kvm_seterr(KVM_ENOMEM, "%s: out of memory building the header", path);
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        const kvm_st_entry_t *e = &entries[i];
        uint64_t numel = 1;
        for (int d = 0; d < e->ndim; d++) numel *= (uint64_t)e->shape[d];
        uint64_t bytes = numel * kvm_dtype_size(e->dtype);
        cJSON *t = cJSON_AddObjectToObject(root, e->name);
        cJSON_AddStringToObject(t, "dtype", kvm_dtype_name(e->dtype));
        cJSON *sh = cJSON_AddArrayToObject(t, "shape");
        for (int d = 0; d < e->ndim; d++) cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)e->shape[d]));
        cJSON *o = cJSON_AddArrayToObject(t, "data_offsets");
        cJSON_AddItemToArray(o, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(o, cJSON_CreateNumber((double)(off + bytes)));
        off += bytes;
    }
    char *hdr = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!hdr) return kvm_seterr(KVM_ENOMEM, "%s: out of memory printing the header", path);
    size_t hl = strlen(hdr), padded = (hl + 7) / 8 * 8;
    FILE *fp = fopen(path, "wb");
    if (!fp) {
        cJSON_free(hdr);
        return kvm_seterr(KVM_EIO, "%s: cannot create", path);
    }
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    bool ok = fwrite(len8, 1, 8, fp) == 8 && fwrite(hdr, 1, hl, fp) == hl;
    for (size_t i = hl; ok && i < padded; i++) ok = fputc(' ', fp) != EOF;
    for (int i = 0; ok && i < n; i++) {
        const kvm_st_entry_t *e = &entries[i];
        uint64_t numel = 1;
        for (int d = 0; d < e->ndim; d++) numel *= (uint64_t)e->shape[d];
        size_t bytes = (size_t)(numel * kvm_dtype_size(e->dtype));
        ok = bytes == 0 || fwrite(e->data, 1, bytes, fp) == bytes;
    }
    cJSON_free(hdr);
    if (fclose(fp) != 0) ok = false;
    return ok ? 0 : kvm_seterr(KVM_EIO, "%s: write failed", path);
}
