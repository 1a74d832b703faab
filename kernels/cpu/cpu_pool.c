/* cpu_pool.c - kvm_cpu_parallel_for (cpu_pool.h): the CPU backend's own thread pool.
 *
 * Why not OpenMP: on a busy machine (another CPU-bound process per core) libgomp's barriers make every
 * thread wait for the slowest one, which the scheduler may not run for milliseconds, and its idle
 * threads spin against the threads that have work: a 256-token prefill went from 86 ms to 1.2-2.3 s with
 * two threads. libgomp also reads OMP_* environment variables, and the library reads none.
 *
 * How it works:
 * - kvm_threads() - 1 workers (tids 1..), started by the first call that has more than one chunk,
 *   restarted when kvm_set_threads() changed the count, joined at exit. The caller is tid 0.
 * - One call at a time (call_mu): a second application thread waits for the first call to end. A call
 *   from inside fn (a nested call) runs inline with the tid of the chunk that made it.
 * - A job is published as a 64-bit ticket, generation << 32 | next chunk. Every thread, the caller
 *   included, claims the next chunk with a compare-and-swap on the ticket, so a worker that is not
 *   running takes nothing, and one that wakes late finds the ticket exhausted and goes back to sleep.
 *   The caller waits only for chunks already claimed (done == chunks), never for a worker to start.
 * - The job's fields are atomics read before the claiming CAS and validated by it: the caller writes
 *   the next job's fields only after it saw the ticket exhausted, and after moving the ticket to the new
 *   generation with no claimable chunk (then a release fence), so a late worker that read a mix of two
 *   jobs' fields fails its CAS (seqlock argument) and reads again.
 * - Waiting (workers for a job, the caller for claimed chunks): spin with a pause instruction for at
 *   most POOL_SPIN_NS, then sleep on a futex. */
#include "cpu_pool.h"

#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "../../runtime/core/core.h"

#define POOL_MAX_THREADS 256
/* how long a waiting thread spins before it sleeps: long enough to bridge the gap between two ops of a
 * forward pass on an idle machine, short enough not to take a busy core from the thread that has work */
#define POOL_SPIN_NS 20000

static struct {
    pthread_mutex_t call_mu; /* one top-level call at a time; guards the fields up to `hooks` */
    int n_workers;           /* running workers (tids 1..n_workers) */
    int target;              /* the worker count last asked for (-1: none yet) */
    pthread_t th[POOL_MAX_THREADS];
    bool hooks;              /* atexit and pthread_atfork handlers installed */
    /* the job: written only by the caller holding call_mu, while no chunk of the previous job is left */
    _Atomic(kvm_cpu_task_fn) fn;
    _Atomic(void *) ctx;
    _Atomic int n, grain, chunks;
    _Atomic uint64_t ticket;  /* generation << 32 | next unclaimed chunk */
    _Atomic int done;         /* chunks of the job finished; the caller's futex word */
    _Atomic int caller_sleeps;
    _Atomic int wake_seq;     /* bumped for every job and for stop; the workers' futex word */
    _Atomic int sleepers;     /* workers asleep (or about to be) on wake_seq */
    _Atomic bool stop;
} g = {.call_mu = PTHREAD_MUTEX_INITIALIZER, .target = -1};

/* -1 outside the pool; else the tid of the chunk this thread runs (workers: always their tid) */
static _Thread_local int tl_tid = -1;

static struct {
    void *p;
    size_t cap;
} g_scratch[POOL_MAX_THREADS];

/* ---- waiting ---------------------------------------------------------------------------------- */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void futex_wait(_Atomic int *w, int val) {
    syscall(SYS_futex, (int *)w, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}
static void futex_wake(_Atomic int *w, int count) {
    syscall(SYS_futex, (int *)w, FUTEX_WAKE_PRIVATE, count, NULL, NULL, 0);
}

/* Returns once *w == val (until_equal) or *w != val (otherwise): spins at most POOL_SPIN_NS, then sleeps
 * on the futex of w, counted in *sleepers so that the thread that changes w knows to wake it. */
static void pool_wait(_Atomic int *w, int val, bool until_equal, _Atomic int *sleepers) {
    int64_t t0 = 0;
    for (int i = 1;; i++) {
        if ((atomic_load_explicit(w, memory_order_acquire) == val) == until_equal) return;
        cpu_relax();
        if ((i & 31) == 0) {
            int64_t t = now_ns();
            if (!t0) t0 = t;
            else if (t - t0 > POOL_SPIN_NS) break;
        }
    }
    atomic_fetch_add(sleepers, 1);
    for (;;) {
        int cur = atomic_load(w);
        if ((cur == val) == until_equal) break;
        futex_wait(w, cur);
    }
    atomic_fetch_sub(sleepers, 1);
}

/* ---- running chunks --------------------------------------------------------------------------- */

static void run_inline(int n, int grain, kvm_cpu_task_fn fn, void *ctx, int tid) {
    for (int i0 = 0; i0 < n; i0 = n - i0 > grain ? i0 + grain : n) fn(ctx, i0, n - i0 > grain ? i0 + grain : n, tid);
}

/* Claims and runs chunks of the current job until none is left. */
static void run_chunks(int tid) {
    for (;;) {
        uint64_t t = atomic_load_explicit(&g.ticket, memory_order_acquire);
        kvm_cpu_task_fn fn = atomic_load_explicit(&g.fn, memory_order_relaxed);
        void *ctx = atomic_load_explicit(&g.ctx, memory_order_relaxed);
        int n = atomic_load_explicit(&g.n, memory_order_relaxed);
        int grain = atomic_load_explicit(&g.grain, memory_order_relaxed);
        int chunks = atomic_load_explicit(&g.chunks, memory_order_relaxed);
        atomic_thread_fence(memory_order_acquire);
        const uint32_t c = (uint32_t)t; /* UINT32_MAX while the next job is being written */
        if (c >= (uint32_t)chunks) return;
        /* success means the ticket was still t, so the fields above were this job's (see the top) */
        if (!atomic_compare_exchange_weak_explicit(&g.ticket, &t, t + 1, memory_order_acq_rel, memory_order_relaxed))
            continue;
        int i0 = (int)c * grain;
        fn(ctx, i0, n - i0 > grain ? i0 + grain : n, tid);
        if (atomic_fetch_add(&g.done, 1) + 1 == chunks && atomic_load(&g.caller_sleeps)) futex_wake(&g.done, 1);
    }
}

static void *worker_main(void *arg) {
    const int tid = (int)(intptr_t)arg;
    tl_tid = tid;
    for (;;) {
        int seen = atomic_load(&g.wake_seq);
        if (atomic_load(&g.stop)) break;
        run_chunks(tid);
        pool_wait(&g.wake_seq, seen, false, &g.sleepers);
    }
    return NULL;
}

/* ---- starting and stopping the workers (call_mu held) ----------------------------------------- */

static void pool_stop(void) {
    if (g.n_workers == 0) return;
    atomic_store(&g.stop, true);
    atomic_fetch_add(&g.wake_seq, 1);
    futex_wake(&g.wake_seq, INT_MAX);
    for (int i = 0; i < g.n_workers; i++) pthread_join(g.th[i], NULL);
    g.n_workers = 0;
    atomic_store(&g.stop, false);
}

static void pool_free_scratch(void) {
    for (int i = 0; i < POOL_MAX_THREADS; i++) {
        free(g_scratch[i].p);
        g_scratch[i].p = NULL;
        g_scratch[i].cap = 0;
    }
}

/* At exit: join the workers and free the scratch, unless a call is running on another thread. */
static void pool_atexit(void) {
    if (pthread_mutex_trylock(&g.call_mu) != 0) return;
    pool_stop();
    g.target = -1;
    pool_free_scratch();
    pthread_mutex_unlock(&g.call_mu);
}

/* In a child of fork() the workers do not exist: forget them (the caller does every chunk until new
 * ones start). */
static void pool_after_fork_child(void) {
    pthread_mutex_init(&g.call_mu, NULL);
    g.n_workers = 0;
    g.target = -1;
    atomic_store(&g.sleepers, 0);
    atomic_store(&g.caller_sleeps, 0);
    atomic_store(&g.stop, false);
}

/* Runs `want` workers (fewer if the system refuses threads: the caller then does their share). */
static void pool_resize(int want) {
    pool_stop();
    g.target = want;
    if (want <= 0) return;
    if (!g.hooks) {
        atexit(pool_atexit);
        pthread_atfork(NULL, NULL, pool_after_fork_child);
        g.hooks = true;
    }
    /* workers take no signals: a process-directed signal goes to an application thread */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (int i = 0; i < want && i < POOL_MAX_THREADS - 1; i++) {
        if (pthread_create(&g.th[i], NULL, worker_main, (void *)(intptr_t)(i + 1)) != 0) {
            kvm_log(KVM_LOG_WARN, "cpu pool: could not start worker %d of %d; running with %d", i + 1, want, i);
            break;
        }
        g.n_workers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* ---- the interface ---------------------------------------------------------------------------- */

int kvm_cpu_pool_size(void) { return kvm_threads(); }

int kvm_cpu_pool_workers(void) {
    pthread_mutex_lock(&g.call_mu);
    int n = g.n_workers;
    pthread_mutex_unlock(&g.call_mu);
    return n;
}

void *kvm_cpu_scratch(int tid, size_t bytes) {
    if (tid < 0 || tid >= POOL_MAX_THREADS) {
        kvm_seterr(KVM_EINVAL, "cpu scratch: thread id %d is outside [0, %d)", tid, POOL_MAX_THREADS);
        return NULL;
    }
    if (g_scratch[tid].cap < bytes || !g_scratch[tid].p) {
        size_t cap = (bytes + 63) & ~(size_t)63;
        void *p = aligned_alloc(64, cap ? cap : 64);
        if (!p) {
            kvm_seterr(KVM_ENOMEM, "out of host memory allocating %zu bytes of kernel scratch", bytes);
            return NULL;
        }
        free(g_scratch[tid].p);
        g_scratch[tid].p = p;
        g_scratch[tid].cap = cap;
    }
    return g_scratch[tid].p;
}

void kvm_cpu_parallel_for(int n, int grain, kvm_cpu_task_fn fn, void *ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    if (tl_tid >= 0) { /* nested: inline, as the chunk that called */
        run_inline(n, grain, fn, ctx, tl_tid);
        return;
    }
    const int chunks = (n - 1) / grain + 1;
    pthread_mutex_lock(&g.call_mu);
    tl_tid = 0;
    int want = kvm_threads() - 1;
    if (want != g.target && (chunks > 1 || want < g.n_workers)) pool_resize(want);
    if (chunks == 1 || g.n_workers == 0) {
        run_inline(n, grain, fn, ctx, 0);
    } else {
        /* the previous job is exhausted (this thread saw it): publish the next (see the top). First the ticket
         * moves to the new generation with no chunk claimable (UINT32_MAX), so that a late worker which read the
         * old ticket and then some of the new fields cannot claim with the old ticket: its CAS fails. (Without
         * it, a worker claimed "chunk 8" of the new job against the old exhausted ticket, done was counted past
         * the chunk count, and the caller waited for done == chunks for ever: a hang seen in CI.) */
        const uint64_t gen = ((atomic_load_explicit(&g.ticket, memory_order_relaxed) >> 32) + 1) & 0xffffffffu;
        atomic_store_explicit(&g.ticket, gen << 32 | 0xffffffffu, memory_order_relaxed);
        atomic_thread_fence(memory_order_release);
        atomic_store_explicit(&g.fn, fn, memory_order_relaxed);
        atomic_store_explicit(&g.ctx, ctx, memory_order_relaxed);
        atomic_store_explicit(&g.n, n, memory_order_relaxed);
        atomic_store_explicit(&g.grain, grain, memory_order_relaxed);
        atomic_store_explicit(&g.chunks, chunks, memory_order_relaxed);
        atomic_store_explicit(&g.done, 0, memory_order_relaxed);
        atomic_store_explicit(&g.ticket, gen << 32, memory_order_release);
        atomic_fetch_add(&g.wake_seq, 1);
        if (atomic_load(&g.sleepers) > 0) futex_wake(&g.wake_seq, INT_MAX);
        run_chunks(0);
        pool_wait(&g.done, chunks, true, &g.caller_sleeps);
    }
    tl_tid = -1;
    pthread_mutex_unlock(&g.call_mu);
}
