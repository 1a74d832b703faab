/* cpu_pool.h - the CPU backend's parallel loops (internal to kernels/cpu and the library's host code).
 *
 * kvm_cpu_parallel_for(n, grain, fn, ctx) splits the items [0, n) into chunks of at most `grain` items
 * and calls fn(ctx, i0, i1, tid) once per chunk, on the calling thread and the pool's workers; it returns
 * when every chunk is done. tid is in [0, kvm_cpu_pool_size()) and is unique among the calls running at
 * one time, so kernels index per-thread scratch with it. With one thread, or n <= grain, every chunk runs
 * on the calling thread in order. Calls do not nest: fn must not call kvm_cpu_parallel_for (a nested call
 * runs inline, serially, with the tid of the chunk that made it, so it shares that tid's scratch: a
 * buffer taken before the nested call may move if the nested fn asks for a larger one). Calls from several
 * application threads are safe: they run one after the other. Chunks are handed out one at a time to
 * whichever thread asks first, the caller included, so a worker the system does not run takes no work
 * (cpu_pool.c says how).
 *
 * kvm_cpu_scratch(tid, bytes) gives the thread tid a 64-byte aligned buffer of at least `bytes`, kept and
 * grown across calls (NULL, with the error set, when out of memory); valid until the next call with the
 * same tid. */
#ifndef KVM_CPU_POOL_H
#define KVM_CPU_POOL_H

#include <stddef.h>

typedef void (*kvm_cpu_task_fn)(void *ctx, int i0, int i1, int tid);

void kvm_cpu_parallel_for(int n, int grain, kvm_cpu_task_fn fn, void *ctx);
int kvm_cpu_pool_size(void);
void *kvm_cpu_scratch(int tid, size_t bytes);
/* Workers running now (kvm_cpu_pool_size() - 1 once a call has needed them; 0 before): for tests; not
 * from inside fn (it waits for the running call to end). */
int kvm_cpu_pool_workers(void);

#endif
