/* map.h - a hash map from string (byte-string) keys or u64 keys to a pointer or a u64 value (Redis's
 * dict, smaller): open addressing with linear probing and backward-shift deletion, so no tombstones;
 * the table doubles when three quarters full.
 *
 * Ownership: the map owns its table (counted memory). Keys of a KVM_MAP_STR map are copied in and
 * freed with the map; keys of a KVM_MAP_STR_REF map are borrowed: the caller keeps them alive and
 * unchanged while they are in the map. Values are never freed by the map (free what they point to
 * yourself, e.g. while iterating, before kvm_map_free).
 * Errors: an insert that cannot allocate returns KVM_ENOMEM (message set) and leaves the map exactly
 * as it was (no partial entry), still valid. Not thread-safe: concurrent readers are fine only while
 * nobody writes.
 *
 *     kvm_map_t m;
 *     kvm_map_init(&m, KVM_MAP_STR);
 *     if (kvm_map_put_str(&m, "finder", KVM_MAPVAL_PTR(agent))) ...
 *     kvm_mapval_t v;
 *     if (kvm_map_get_str(&m, "finder", &v)) use(v.ptr);
 *     size_t it = 0;
 *     for (const kvm_map_entry_t *e; (e = kvm_map_next(&m, &it));) printf("%s\n", e->key.str);
 *     kvm_map_free(&m);
 */
#ifndef KVM_MAP_H
#define KVM_MAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum kvm_map_keys {
    KVM_MAP_U64 = 0,     /* uint64_t keys */
    KVM_MAP_STR = 1,     /* byte-string keys, copied in (NUL-terminated copies) */
    KVM_MAP_STR_REF = 2, /* byte-string keys, borrowed from the caller */
};

typedef union kvm_mapval {
    void *ptr;
    uint64_t u64;
    int64_t i64;
} kvm_mapval_t;
#define KVM_MAPVAL_PTR(p) ((kvm_mapval_t){.ptr = (p)})
#define KVM_MAPVAL_U64(x) ((kvm_mapval_t){.u64 = (x)})
#define KVM_MAPVAL_I64(x) ((kvm_mapval_t){.i64 = (x)})

typedef struct kvm_map_entry {
    uint64_t hash; /* 0 = empty slot */
    union {
        const char *str; /* string maps: klen bytes (a copy is NUL-terminated) */
        uint64_t u64;    /* KVM_MAP_U64 */
    } key;
    size_t klen;
    kvm_mapval_t val;
} kvm_map_entry_t;

typedef struct kvm_map {
    kvm_map_entry_t *slots; /* [cap], cap a power of two or 0 */
    size_t cap, len;
    int keys;               /* enum kvm_map_keys */
} kvm_map_t;

/* An empty map (allocates nothing). */
void kvm_map_init(kvm_map_t *m, int keys);
/* Sizes the table for n entries without further growth. 0 or KVM_ENOMEM. */
int kvm_map_reserve(kvm_map_t *m, size_t n);
/* Releases the table and the copied keys; the map is empty and reusable. */
void kvm_map_free(kvm_map_t *m);
static inline size_t kvm_map_len(const kvm_map_t *m) { return m->len; }

/* String maps. put inserts or overwrites (a key already present keeps its stored copy); get and
 * remove return whether the key was there and copy its value to *out when out is not NULL. */
int kvm_map_put(kvm_map_t *m, const void *key, size_t klen, kvm_mapval_t val);
bool kvm_map_get(const kvm_map_t *m, const void *key, size_t klen, kvm_mapval_t *out);
bool kvm_map_remove(kvm_map_t *m, const void *key, size_t klen, kvm_mapval_t *out);
int kvm_map_put_str(kvm_map_t *m, const char *key, kvm_mapval_t val);
bool kvm_map_get_str(const kvm_map_t *m, const char *key, kvm_mapval_t *out);
bool kvm_map_remove_str(kvm_map_t *m, const char *key, kvm_mapval_t *out);

/* u64 maps, the same contract. */
int kvm_map_put_u64(kvm_map_t *m, uint64_t key, kvm_mapval_t val);
bool kvm_map_get_u64(const kvm_map_t *m, uint64_t key, kvm_mapval_t *out);
bool kvm_map_remove_u64(kvm_map_t *m, uint64_t key, kvm_mapval_t *out);

/* Iteration in table order: start with *it = 0; returns the next entry or NULL at the end. The map
 * must not change during the iteration. */
const kvm_map_entry_t *kvm_map_next(const kvm_map_t *m, size_t *it);

#endif
