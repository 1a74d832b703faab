/* trace_cache.h - what the tests see of the error-schema cache (trace_cache.c; the API is include/kvmesh.h). */
#ifndef KVM_TRACE_CACHE_H
#define KVM_TRACE_CACHE_H

enum { TCACHE_MERGE, TCACHE_SAME_GROUP, TCACHE_NEW_GROUP };

/* The insert rule (correct.md §6): merge when the nearest SimHash is within 3 bits or the best S >= 0.92, a new
 * entry of the best entry's group when S >= 0.60, else a new group. */
int tcache_decide(double s_best, int hamming_best);

#endif
