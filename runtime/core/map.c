/* map.c - the hash map (see map.h for ownership and error behaviour). */
#include "map.h"

#include <string.h>

#include "core.h"

/* Never 0: 0 marks an empty slot. */
static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x | 1;
}

static uint64_t hash_bytes(const void *key, size_t klen) { return kvm_hash64(key, klen, KVM_HASH_SEED) | 1; }

static bool str_keys(const kvm_map_t *m) { return m->keys != KVM_MAP_U64; }

static bool same_key(const kvm_map_t *m, const kvm_map_entry_t *e, uint64_t h, const void *key, size_t klen, uint64_t ukey) {
    if (e->hash != h) return false;
    if (!str_keys(m)) return e->key.u64 == ukey;
    return e->klen == klen && (klen == 0 || memcmp(e->key.str, key, klen) == 0);
}

/* Slot of the key, or of the empty slot where it would go. m->cap > 0. */
static size_t find_slot(const kvm_map_t *m, uint64_t h, const void *key, size_t klen, uint64_t ukey) {
    size_t mask = m->cap - 1, i = (size_t)h & mask;
    while (m->slots[i].hash && !same_key(m, &m->slots[i], h, key, klen, ukey)) i = (i + 1) & mask;
    return i;
}

void kvm_map_init(kvm_map_t *m, int keys) { *m = (kvm_map_t){.keys = keys}; }

static int map_rehash(kvm_map_t *m, size_t cap) {
    kvm_map_entry_t *s = kvm_calloc(cap, sizeof *s);
    if (!s) return KVM_ENOMEM;
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->slots[i].hash) continue;
        size_t j = (size_t)m->slots[i].hash & (cap - 1);
        while (s[j].hash) j = (j + 1) & (cap - 1);
        s[j] = m->slots[i];
    }
    kvm_free(m->slots);
    m->slots = s;
    m->cap = cap;
    return 0;
}

int kvm_map_reserve(kvm_map_t *m, size_t n) {
    size_t cap = m->cap ? m->cap : 16;
    while (n * 4 > cap * 3) {
        if (cap > SIZE_MAX / 2 / sizeof(kvm_map_entry_t)) return kvm_seterr(KVM_ENOMEM, "hash map of %zu entries overflows", n);
        cap *= 2;
    }
    return cap == m->cap ? 0 : map_rehash(m, cap);
}

void kvm_map_free(kvm_map_t *m) {
    if (m->keys == KVM_MAP_STR)
        for (size_t i = 0; i < m->cap; i++)
            if (m->slots[i].hash) kvm_free((void *)m->slots[i].key.str);
    kvm_free(m->slots);
    kvm_map_init(m, m->keys);
}

static int map_put(kvm_map_t *m, uint64_t h, const void *key, size_t klen, uint64_t ukey, kvm_mapval_t val) {
    if (m->cap) {
        size_t i = find_slot(m, h, key, klen, ukey);
        if (m->slots[i].hash) {
            m->slots[i].val = val;
            return 0;
        }
    }
    char *copy = NULL;
    if (m->keys == KVM_MAP_STR) {
        copy = kvm_malloc(klen + 1);
        if (!copy) return KVM_ENOMEM;
        if (klen) memcpy(copy, key, klen);
        copy[klen] = 0;
    }
    int rc = kvm_map_reserve(m, m->len + 1);
    if (rc) {
        kvm_free(copy);
        return rc;
    }
    kvm_map_entry_t *e = &m->slots[find_slot(m, h, key, klen, ukey)];
    e->hash = h;
    e->klen = klen;
    if (str_keys(m)) e->key.str = copy ? copy : key;
    else e->key.u64 = ukey;
    e->val = val;
    m->len++;
    return 0;
}

static const kvm_map_entry_t *map_get(const kvm_map_t *m, uint64_t h, const void *key, size_t klen, uint64_t ukey) {
    if (!m->cap) return NULL;
    const kvm_map_entry_t *e = &m->slots[find_slot(m, h, key, klen, ukey)];
    return e->hash ? e : NULL;
}

/* Backward-shift deletion: entries after the hole that probed past it move back into it. */
static bool map_remove(kvm_map_t *m, uint64_t h, const void *key, size_t klen, uint64_t ukey, kvm_mapval_t *out) {
    if (!m->cap) return false;
    size_t mask = m->cap - 1, i = find_slot(m, h, key, klen, ukey);
    if (!m->slots[i].hash) return false;
    if (out) *out = m->slots[i].val;
    if (m->keys == KVM_MAP_STR) kvm_free((void *)m->slots[i].key.str);
    for (size_t j = (i + 1) & mask; m->slots[j].hash; j = (j + 1) & mask) {
        size_t home = (size_t)m->slots[j].hash & mask;
        /* j's entry may fill the hole i unless its home lies cyclically in (i, j] */
        bool stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (stays) continue;
        m->slots[i] = m->slots[j];
        i = j;
    }
    m->slots[i] = (kvm_map_entry_t){0};
    m->len--;
    return true;
}

static bool copy_out(const kvm_map_entry_t *e, kvm_mapval_t *out) {
    if (e && out) *out = e->val;
    return e != NULL;
}

int kvm_map_put(kvm_map_t *m, const void *key, size_t klen, kvm_mapval_t val) {
    KVM_ASSERT(str_keys(m));
    return map_put(m, hash_bytes(key, klen), key, klen, 0, val);
}

bool kvm_map_get(const kvm_map_t *m, const void *key, size_t klen, kvm_mapval_t *out) {
    if (!m->cap) return false; /* also a zeroed, never initialised map */
    KVM_ASSERT(str_keys(m));
    return copy_out(map_get(m, hash_bytes(key, klen), key, klen, 0), out);
}

bool kvm_map_remove(kvm_map_t *m, const void *key, size_t klen, kvm_mapval_t *out) {
    if (!m->cap) return false; /* also a zeroed, never initialised map */
    KVM_ASSERT(str_keys(m));
    return map_remove(m, hash_bytes(key, klen), key, klen, 0, out);
}

int kvm_map_put_str(kvm_map_t *m, const char *key, kvm_mapval_t val) { return kvm_map_put(m, key, strlen(key), val); }
bool kvm_map_get_str(const kvm_map_t *m, const char *key, kvm_mapval_t *out) { return kvm_map_get(m, key, strlen(key), out); }
bool kvm_map_remove_str(kvm_map_t *m, const char *key, kvm_mapval_t *out) { return kvm_map_remove(m, key, strlen(key), out); }

int kvm_map_put_u64(kvm_map_t *m, uint64_t key, kvm_mapval_t val) {
    KVM_ASSERT(!str_keys(m));
    return map_put(m, hash_u64(key), NULL, 0, key, val);
}

bool kvm_map_get_u64(const kvm_map_t *m, uint64_t key, kvm_mapval_t *out) {
    if (!m->cap) return false; /* also a zeroed, never initialised map */
    KVM_ASSERT(!str_keys(m));
    return copy_out(map_get(m, hash_u64(key), NULL, 0, key), out);
}

bool kvm_map_remove_u64(kvm_map_t *m, uint64_t key, kvm_mapval_t *out) {
    if (!m->cap) return false; /* also a zeroed, never initialised map */
    KVM_ASSERT(!str_keys(m));
    return map_remove(m, hash_u64(key), NULL, 0, key, out);
}

const kvm_map_entry_t *kvm_map_next(const kvm_map_t *m, size_t *it) {
    while (*it < m->cap) {
        const kvm_map_entry_t *e = &m->slots[(*it)++];
        if (e->hash) return e;
    }
    return NULL;
}
