/* core.h - small services every layer uses: files, mmap, counted allocation, logging, hashing, time.
 * (status.h is separate because every file includes it.) */
#ifndef KVM_CORE_H
#define KVM_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include "status.h"

/* ---- files ---------------------------------------------------------------------------------- */

/* A read-only mapping of a whole file. kvm_mmap_open() fills *m; kvm_mmap_close() unmaps.
 * An empty file maps to data == NULL, size == 0. */
typedef struct kvm_mmap {
    void *data;
    size_t size;
    char *path; /* owned copy */
} kvm_mmap_t;
int kvm_mmap_open(kvm_mmap_t *m, const char *path);
void kvm_mmap_close(kvm_mmap_t *m);

/* Reads a whole file into a NUL-terminated buffer from kvm_malloc; the caller frees *out with
 * kvm_free(). Refuses files larger than max_bytes (0 = 1 GiB). On error *out is NULL. */
int kvm_read_file(const char *path, char **out, size_t *len, size_t max_bytes);
bool kvm_file_exists(const char *path);
bool kvm_dir_exists(const char *path);
/* Joins dir and name into buf (always NUL-terminated); returns KVM_ERANGE if it did not fit. */
int kvm_path_join(char *buf, size_t cap, const char *dir, const char *name);
/* mkdir -p: creates every missing component of path (mode 0755); KVM_EIO naming the component that failed. */
int kvm_mkdirs(const char *path);
/* Host memory the kernel reports as available to a new allocation without swapping (MemAvailable of
 * /proc/meminfo, else free pages), in bytes; 0 when unknown. */
uint64_t kvm_host_mem_available(void);

/* ---- counted allocation --------------------------------------------------------------------- */

/* The one allocator of the library (SQLite's model): every heap block the library, its cJSON objects
 * and its Lua states use comes from here, so that live bytes are known (leak checks, budgets) and a
 * test can make any single allocation fail. They return NULL and set KVM_ENOMEM on failure; a block
 * from one of them is freed with kvm_free() only (never free()). kvm_realloc(p, 0) frees p and
 * returns NULL; when kvm_realloc fails, p is untouched and still owned by the caller.
 * Thread-safe (the counters are atomic). */
void *kvm_malloc(size_t n);
void *kvm_calloc(size_t count, size_t size);
void *kvm_realloc(void *p, size_t n);
void kvm_free(void *p);
char *kvm_strdup(const char *s);
char *kvm_strndup(const char *s, size_t n); /* copies at most n bytes of s and NUL-terminates */
/* Bytes currently allocated (requested sizes, headers not counted). */
size_t kvm_alloc_bytes_live(void);
/* Allocation attempts made since the process started (kvm_malloc, kvm_calloc, kvm_strdup and
 * kvm_realloc to a non-zero size each count one, whether or not they succeed). */
uint64_t kvm_alloc_count(void);
/* Fault injection, for tests: the n-th allocation attempt from now fails (n = 1: the next one) as if
 * the system were out of memory; later attempts succeed again. n = 0 disarms. Process-wide: the
 * attempt may come from any thread. */
void kvm_alloc_fail_nth(uint64_t n);
/* True while an armed failure has not fired yet. */
bool kvm_alloc_fail_pending(void);
/* For tests: fn(ud, attempt) is called at every allocation attempt, with its number (kvm_alloc_count() once it is
 * counted), on the allocating thread, before fault injection decides; NULL removes it. A sweep uses it to find where
 * each attempt comes from (tests/test_fault_injection.c fails each allocation site once instead of every attempt). */
void kvm_alloc_set_observer(void (*fn)(void *ud, uint64_t attempt), void *ud);

/* ---- accounts: memory charged to an owner ------------------------------------------------------ */

/* An account is a count of bytes with a cap, charged by the one counted allocator: while a thread has
 * entered an account (kvm_account_enter), every block kvm_malloc/kvm_calloc/kvm_realloc/kvm_strdup makes on
 * that thread is charged to it with its footprint (kvm_alloc_footprint), and an allocation that would take
 * it past its cap fails as out of memory (KVM_ENOMEM, a message naming the cap). A block remembers its
 * account: kvm_free credits it whichever thread frees it and whatever account is entered then, and a
 * block grown by kvm_realloc charges the growth to its own account. The workflow layer charges a run's
 * Lua heap, its JSON conversions, its prompts and the engine's work for its agent calls to one account
 * (docs/security.md, "The budgets"): the run's memory cap.
 * Lifetime: refcounted. kvm_account_create gives the caller one reference; every block charged to the
 * account holds one more, so an account outlives its owner while blocks made for it are alive (an output
 * cached after its run ended); kvm_account_release drops a reference and frees the account at zero.
 * Thread-safe (atomic counts); the entered account is per thread. */
typedef struct kvm_account kvm_account_t;
/* A new account with cap_bytes (0 = no cap); NULL (KVM_ENOMEM) when out of memory. Made uncharged. */
kvm_account_t *kvm_account_create(size_t cap_bytes);
void kvm_account_retain(kvm_account_t *a);
void kvm_account_release(kvm_account_t *a); /* NULL is a no-op */
size_t kvm_account_bytes(const kvm_account_t *a);
size_t kvm_account_peak(const kvm_account_t *a);
size_t kvm_account_cap(const kvm_account_t *a);
void kvm_account_set_cap(kvm_account_t *a, size_t cap_bytes);
/* Allocations refused because they would have passed the cap, since the account was made. */
uint64_t kvm_account_refusals(const kvm_account_t *a);
/* Explicit charges, for memory an owner counts itself (a Lua heap): kvm_account_charge adds n bytes, or
 * refuses them (returns KVM_ENOMEM, nothing charged, no message set) when enforce is true and they would
 * pass the cap; kvm_account_credit takes n bytes back. */
int kvm_account_charge(kvm_account_t *a, size_t n, bool enforce);
void kvm_account_credit(kvm_account_t *a, size_t n);
/* Makes a (NULL: none) the account this thread's allocations are charged to; returns the one it replaces,
 * which the caller puts back when done (enter/leave nest). */
kvm_account_t *kvm_account_enter(kvm_account_t *a);
kvm_account_t *kvm_account_current(void);
/* What a block of n bytes costs the process, as accounts charge it: n plus the allocator headers in front of
 * it (the counted allocator's 16 bytes, the C allocator's 8), and under AddressSanitizer its redzones. */
size_t kvm_alloc_footprint(size_t n);

/* Library-wide one-time set-up (thread-safe through pthread_once; later calls are no-ops): points
 * cJSON's allocator at kvm_malloc/kvm_free, so that every cJSON object and every string cJSON prints
 * is counted memory, freed with cJSON_Delete/cJSON_free (never free()). The library's entry points
 * that reach cJSON (model, tokenizer and safetensors loading, comm and workflow creation, trace
 * reading) call it; it also runs before main through an ELF constructor in core.c, so that cJSON
 * objects a program makes before its first library call are never freed with the other allocator. */
void kvm_core_init(void);

/* ---- logging -------------------------------------------------------------------------------- */

/* enum kvm_log_level, kvm_log_set_level, kvm_log_get_level, kvm_log_level_parse: include/kvmesh.h */
void kvm_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define KVM_LOGD(...) kvm_log(KVM_LOG_DEBUG, __VA_ARGS__)
#define KVM_LOGI(...) kvm_log(KVM_LOG_INFO, __VA_ARGS__)
#define KVM_LOGW(...) kvm_log(KVM_LOG_WARN, __VA_ARGS__)
#define KVM_LOGE(...) kvm_log(KVM_LOG_ERROR, __VA_ARGS__)

/* ---- hashing and time ----------------------------------------------------------------------- */

/* 64-bit FNV-1a over bytes, chained from seed (use KVM_HASH_SEED to start). */
#define KVM_HASH_SEED 0xcbf29ce484222325ULL
uint64_t kvm_hash64(const void *data, size_t n, uint64_t seed);
/* Wall-clock time in ns since the Unix epoch (monotonic time, kvm_now_ns: include/kvmesh_lab.h). */
uint64_t kvm_wall_ns(void);

/* ---- numeric conversions -------------------------------------------------------------------- */

/* bf16 -> fp32 is a shift; inline so that conversion loops vectorise (hot in the CPU matmul) */
static inline float kvm_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}
uint16_t kvm_f32_to_bf16(float f); /* round to nearest even */
float kvm_f16_to_f32(uint16_t h);
uint16_t kvm_f32_to_f16(float f);

/* ---- threads -------------------------------------------------------------------------------- */

/* Number of worker threads the CPU kernels use: what kvm_set_threads() set, else all online cores
 * (at most 256). The library reads no environment: the CLI maps KVM_THREADS onto kvm_set_threads().
 * n <= 0 goes back to the default. */
int kvm_threads(void);
void kvm_set_threads(int n);

#endif
