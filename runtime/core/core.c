/* core.c - files, the counted allocator (with fault injection), one-time set-up, logging, hashing,
 * time, fp16/bf16, thread count. The containers are vec.c, sb.c, map.c; the PRNG is rng.c. */
#include "core.h"

#include <cjson/cJSON.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- files ---------------------------------------------------------------------------------- */

int kvm_mmap_open(kvm_mmap_t *m, const char *path) {
    memset(m, 0, sizeof *m);
    /* O_NONBLOCK: opening a FIFO named as a model would wait for a writer forever; a regular file ignores it */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return kvm_seterr(errno == ENOENT ? KVM_ENOENT : KVM_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return kvm_seterr(KVM_EIO, "%s: not a regular file", path);
    }
    m->size = (size_t)st.st_size;
    if (m->size > 0) {
        void *p = mmap(NULL, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            close(fd);
            return kvm_seterr(KVM_EIO, "%s: mmap failed: %s", path, strerror(errno));
        }
        m->data = p;
    }
    close(fd);
    m->path = kvm_strdup(path);
    if (!m->path) {
        if (m->data) munmap(m->data, m->size);
        memset(m, 0, sizeof *m);
        return kvm_seterr(KVM_ENOMEM, "%s: out of memory opening the mapping", path);
    }
    return 0;
}

void kvm_mmap_close(kvm_mmap_t *m) {
    if (!m) return;
    if (m->data) munmap(m->data, m->size);
    kvm_free(m->path);
    memset(m, 0, sizeof *m);
}

int kvm_read_file(const char *path, char **out, size_t *len, size_t max_bytes) {
    *out = NULL;
    if (len) *len = 0;
    if (max_bytes == 0) max_bytes = (size_t)1 << 30;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO would block the open (kvm_mmap_open) */
    FILE *f = fd >= 0 ? fdopen(fd, "rb") : NULL;
    if (!f) {
        int e = errno;
        if (fd >= 0) close(fd);
        return kvm_seterr(e == ENOENT ? KVM_ENOENT : KVM_EIO, "%s: cannot open: %s", path, strerror(e));
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return kvm_seterr(KVM_EIO, "%s: not a regular file", path);
    }
    if ((size_t)st.st_size > max_bytes) {
        fclose(f);
        return kvm_seterr(KVM_ERANGE, "%s: file is %lld bytes, more than the limit of %zu", path,
                          (long long)st.st_size, max_bytes);
    }
    size_t n = (size_t)st.st_size;
    char *buf = kvm_malloc(n + 1);
    if (!buf) {
        fclose(f);
        return kvm_seterr(KVM_ENOMEM, "%s: out of memory reading %zu bytes", path, n);
    }
    size_t got = fread(buf, 1, n, f);
    fclose(f);
    if (got != n) {
        kvm_free(buf);
        return kvm_seterr(KVM_EIO, "%s: short read (%zu of %zu bytes)", path, got, n);
    }
    buf[n] = 0;
    *out = buf;
    if (len) *len = n;
    return 0;
}

bool kvm_file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

bool kvm_dir_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* mkdir -p: creates every missing component of path (mode 0755). */
uint64_t kvm_host_mem_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (f) {
        char line[256];
        unsigned long long kb = 0;
        bool found = false;
        while (!found && fgets(line, sizeof line, f)) found = sscanf(line, "MemAvailable: %llu kB", &kb) == 1;
        fclose(f);
        if (found) return (uint64_t)kb * 1024u;
    }
    long pages = sysconf(_SC_AVPHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    return pages > 0 && size > 0 ? (uint64_t)pages * (uint64_t)size : 0;
}

int kvm_mkdirs(const char *path) {
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) return kvm_seterr(KVM_EINVAL, "bad directory path '%s'", path);
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] == '/' || buf[i] == '\0') {
            char c = buf[i];
            buf[i] = '\0';
            if (mkdir(buf, 0755) != 0 && errno != EEXIST)
                return kvm_seterr(KVM_EIO, "cannot create directory '%s': %s", buf, strerror(errno));
            buf[i] = c;
        }
    }
    return 0;
}

int kvm_path_join(char *buf, size_t cap, const char *dir, const char *name) {
    size_t dl = strlen(dir);
    int n = (dl > 0 && dir[dl - 1] == '/') ? snprintf(buf, cap, "%s%s", dir, name)
                                           : snprintf(buf, cap, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= cap) return kvm_seterr(KVM_ERANGE, "path too long: %s/%s", dir, name);
    return 0;
}

/* ---- counted allocation --------------------------------------------------------------------- */

/* Each block carries a 16-byte header: its size, so that free can subtract it, and the account it is
 * charged to (NULL: none). 16 keeps the payload as aligned as malloc's. */
#define KVM_HDR 16
typedef struct hdr {
    size_t size;
    kvm_account_t *acct;
} hdr_t;
_Static_assert(sizeof(hdr_t) <= KVM_HDR, "the block header fits its 16 bytes");

static atomic_size_t g_live;
static atomic_uint_least64_t g_attempts;
static atomic_uint_least64_t g_fail_countdown; /* 0 = disarmed; 1 = the next attempt fails */

struct kvm_account {
    atomic_size_t bytes, peak;
    atomic_size_t cap;               /* 0 = none */
    atomic_uint_least64_t refusals;
    atomic_uint_least64_t refs;      /* the owner's, plus one per block charged to it */
};
static _Thread_local kvm_account_t *t_acct;

size_t kvm_alloc_footprint(size_t n) {
#if defined(__SANITIZE_ADDRESS__)
    return n + KVM_HDR + 8 + n / 4 + 32;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
    return n + KVM_HDR + 8 + n / 4 + 32;
#else
    return n + KVM_HDR + 8;
#endif
#else
    return n + KVM_HDR + 8;
#endif
}

kvm_account_t *kvm_account_create(size_t cap_bytes) {
    kvm_account_t *prev = kvm_account_enter(NULL); /* the account itself is no one's block */
    kvm_account_t *a = kvm_calloc(1, sizeof *a);
    kvm_account_enter(prev);
    if (!a) return NULL;
    atomic_store(&a->cap, cap_bytes);
    atomic_store(&a->refs, 1);
    return a;
}

void kvm_account_retain(kvm_account_t *a) { atomic_fetch_add(&a->refs, 1); }

void kvm_account_release(kvm_account_t *a) {
    if (a && atomic_fetch_sub(&a->refs, 1) == 1) kvm_free(a);
}

size_t kvm_account_bytes(const kvm_account_t *a) { return atomic_load(&a->bytes); }
size_t kvm_account_peak(const kvm_account_t *a) { return atomic_load(&a->peak); }
size_t kvm_account_cap(const kvm_account_t *a) { return atomic_load(&a->cap); }
void kvm_account_set_cap(kvm_account_t *a, size_t cap_bytes) { atomic_store(&a->cap, cap_bytes); }
uint64_t kvm_account_refusals(const kvm_account_t *a) { return atomic_load(&a->refusals); }

int kvm_account_charge(kvm_account_t *a, size_t n, bool enforce) {
    size_t cap = atomic_load(&a->cap), cur = atomic_load(&a->bytes), next;
    do {
        next = cur + n;
        if (enforce && cap && (next < cur || next > cap)) {
            atomic_fetch_add(&a->refusals, 1);
            return KVM_ENOMEM;
        }
    } while (!atomic_compare_exchange_weak(&a->bytes, &cur, next));
    size_t pk = atomic_load(&a->peak);
    while (next > pk && !atomic_compare_exchange_weak(&a->peak, &pk, next)) {
    }
    return 0;
}

void kvm_account_credit(kvm_account_t *a, size_t n) { atomic_fetch_sub(&a->bytes, n); }

kvm_account_t *kvm_account_enter(kvm_account_t *a) {
    kvm_account_t *prev = t_acct;
    t_acct = a;
    return prev;
}

kvm_account_t *kvm_account_current(void) { return t_acct; }

static void (*_Atomic g_observer)(void *ud, uint64_t attempt);
static void *_Atomic g_observer_ud;

void kvm_alloc_set_observer(void (*fn)(void *ud, uint64_t attempt), void *ud) {
    atomic_store(&g_observer_ud, ud);
    atomic_store(&g_observer, fn);
}

/* Counts one allocation attempt; false when fault injection says this one fails. */
static bool alloc_attempt(void) {
    uint64_t n = atomic_fetch_add(&g_attempts, 1) + 1;
    void (*obs)(void *, uint64_t) = atomic_load(&g_observer);
    if (obs) obs(atomic_load(&g_observer_ud), n);
    uint64_t c = atomic_load(&g_fail_countdown);
    while (c > 0) {
        if (atomic_compare_exchange_weak(&g_fail_countdown, &c, c - 1)) return c != 1;
    }
    return true;
}

uint64_t kvm_alloc_count(void) { return atomic_load(&g_attempts); }
void kvm_alloc_fail_nth(uint64_t n) { atomic_store(&g_fail_countdown, n); }
bool kvm_alloc_fail_pending(void) { return atomic_load(&g_fail_countdown) > 0; }

/* Charges a block of n bytes to account a (none: 0); KVM_ENOMEM with a message when it would pass its cap. */
static int account_block(kvm_account_t *a, size_t n, const char *what) {
    if (!a) return 0;
    if (kvm_account_charge(a, kvm_alloc_footprint(n), true) != 0)
        return kvm_seterr(KVM_ENOMEM, "out of memory: %s of %zu bytes would pass the memory cap of %zu bytes (%zu in use)", what, n,
                          kvm_account_cap(a), kvm_account_bytes(a));
    kvm_account_retain(a);
    return 0;
}

static void unaccount_block(kvm_account_t *a, size_t n) {
    if (!a) return;
    kvm_account_credit(a, kvm_alloc_footprint(n));
    kvm_account_release(a);
}

/* zero: from calloc, which leaves a fresh mapping (every large block) untouched instead of writing its pages */
static void *alloc_block_z(size_t n, const char *what, bool zero) {
    if (n > SIZE_MAX / 2 - KVM_HDR) {
        alloc_attempt();
        kvm_seterr(KVM_ENOMEM, "%s of %zu bytes overflows", what, n);
        return NULL;
    }
    kvm_account_t *a = t_acct;
    if (!alloc_attempt()) { kvm_seterr(KVM_ENOMEM, "out of memory (%s of %zu bytes)", what, n); return NULL; }
    if (account_block(a, n, what) != 0) return NULL;
    unsigned char *p = zero ? calloc(1, n + KVM_HDR) : malloc(n + KVM_HDR);
    if (!p) {
        unaccount_block(a, n);
        kvm_seterr(KVM_ENOMEM, "out of memory (%s of %zu bytes)", what, n);
        return NULL;
    }
    hdr_t h = {.size = n, .acct = a};
    memcpy(p, &h, sizeof h);
    atomic_fetch_add(&g_live, n);
    return p + KVM_HDR;
}

static void *alloc_block(size_t n, const char *what) { return alloc_block_z(n, what, false); }

void *kvm_malloc(size_t n) { return alloc_block(n, "allocation"); }

void *kvm_calloc(size_t count, size_t size) {
    if (size && count > SIZE_MAX / size) {
        alloc_attempt();
        kvm_seterr(KVM_ENOMEM, "calloc(%zu, %zu) overflows", count, size);
        return NULL;
    }
    return alloc_block_z(count * size, "zeroed allocation", true);
}

void *kvm_realloc(void *p, size_t n) {
    if (!p) return alloc_block(n, "allocation");
    if (n == 0) { kvm_free(p); return NULL; }
    unsigned char *base = (unsigned char *)p - KVM_HDR;
    hdr_t h;
    memcpy(&h, base, sizeof h);
    if (n > SIZE_MAX / 2 - KVM_HDR) {
        alloc_attempt();
        kvm_seterr(KVM_ENOMEM, "reallocation to %zu bytes overflows", n);
        return NULL;
    }
    if (!alloc_attempt()) {
        kvm_seterr(KVM_ENOMEM, "out of memory (reallocation from %zu to %zu bytes)", h.size, n);
        return NULL;
    }
    /* the block stays charged to its own account: growth is charged (and capped) there, a shrink credited */
    size_t fo = kvm_alloc_footprint(h.size), fn = kvm_alloc_footprint(n);
    if (h.acct && fn > fo && kvm_account_charge(h.acct, fn - fo, true) != 0) {
        kvm_seterr(KVM_ENOMEM, "out of memory: growing a block from %zu to %zu bytes would pass the memory cap of %zu bytes (%zu in use)",
                   h.size, n, kvm_account_cap(h.acct), kvm_account_bytes(h.acct));
        return NULL;
    }
    unsigned char *q = realloc(base, n + KVM_HDR);
    if (!q) {
        if (h.acct && fn > fo) kvm_account_credit(h.acct, fn - fo);
        kvm_seterr(KVM_ENOMEM, "out of memory (reallocation from %zu to %zu bytes)", h.size, n);
        return NULL;
    }
    if (h.acct && fn < fo) kvm_account_credit(h.acct, fo - fn);
    size_t old = h.size;
    h.size = n;
    memcpy(q, &h, sizeof h);
    atomic_fetch_sub(&g_live, old);
    atomic_fetch_add(&g_live, n);
    return q + KVM_HDR;
}

void kvm_free(void *p) {
    if (!p) return;
    unsigned char *base = (unsigned char *)p - KVM_HDR;
    hdr_t h;
    memcpy(&h, base, sizeof h);
    atomic_fetch_sub(&g_live, h.size);
    free(base);
    unaccount_block(h.acct, h.size); /* may free the account itself (a block of no account) */
}

char *kvm_strdup(const char *s) { return kvm_strndup(s, SIZE_MAX); }

char *kvm_strndup(const char *s, size_t n) {
    size_t len = strnlen(s, n);
    char *p = alloc_block(len + 1, "string copy");
    if (p) {
        memcpy(p, s, len);
        p[len] = 0;
    }
    return p;
}

size_t kvm_alloc_bytes_live(void) { return atomic_load(&g_live); }

/* ---- one-time set-up ------------------------------------------------------------------------ */

static pthread_once_t g_init_once = PTHREAD_ONCE_INIT;

static void core_init_once(void) {
    cJSON_Hooks hooks = {.malloc_fn = kvm_malloc, .free_fn = kvm_free};
    cJSON_InitHooks(&hooks);
}

void kvm_core_init(void) { pthread_once(&g_init_once, core_init_once); }

/* Runs before main, so that cJSON objects a program makes before its first library call use the same
 * allocator as the library's (see core.h). */
__attribute__((constructor)) static void core_init_at_load(void) { kvm_core_init(); }

/* ---- logging -------------------------------------------------------------------------------- */

static int g_log_level = KVM_LOG_WARN;
void kvm_log_set_level(int level) { g_log_level = level; }
int kvm_log_get_level(void) { return g_log_level; }

int kvm_log_level_parse(const char *name, int *level) {
    static const char *const names[] = {"debug", "info", "warn", "error", "off"};
    for (int i = 0; name && i < 5; i++)
        if (!strcmp(name, names[i])) {
            *level = i;
            return 0;
        }
    return kvm_seterr(KVM_EINVAL, "log level '%s' is not one of debug, info, warn, error, off", name ? name : "(null)");
}

const char *kvm_version(void) { return KVM_VERSION; }

void kvm_log(int level, const char *fmt, ...) {
    if (level < g_log_level) return;
    static const char *names[] = {"debug", "info", "warning", "error"};
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "kvmesh %s: %s\n", names[level < 0 ? 0 : level > 3 ? 3 : level], buf);
}

/* ---- hashing and time ----------------------------------------------------------------------- */

uint64_t kvm_hash64(const void *data, size_t n, uint64_t seed) {
    const unsigned char *p = data;
    uint64_t h = seed;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

uint64_t kvm_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

uint64_t kvm_wall_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ---- numeric conversions -------------------------------------------------------------------- */

uint16_t kvm_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float kvm_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalize */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t kvm_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    int32_t exp = (int32_t)((u >> 23) & 0xff) - 127 + 15;
    uint32_t man = u & 0x7fffffu;
    if (((u >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = sign | ((uint32_t)exp << 10) | (man >> 13);
    uint32_t rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (uint16_t)h;
}

/* ---- threads -------------------------------------------------------------------------------- */

/* read by the CPU pool on every parallel call, possibly on another thread than the one setting it */
static _Atomic int g_threads;
static _Atomic int g_cores; /* online cores, counted once (sysconf reads a file under /sys) */

int kvm_threads(void) {
    int t = atomic_load_explicit(&g_threads, memory_order_relaxed);
    if (t > 0) return t;
    int n = atomic_load_explicit(&g_cores, memory_order_relaxed);
    if (n > 0) return n;
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    n = c > 0 ? (c > 256 ? 256 : (int)c) : 1;
    atomic_store_explicit(&g_cores, n, memory_order_relaxed);
    return n;
}

void kvm_set_threads(int n) {
    atomic_store_explicit(&g_threads, n > 0 ? (n > 256 ? 256 : n) : 0, memory_order_relaxed);
}
