/* trace_cache.h - what the tests see of the error-schema cache (trace_cache.c; the API is include/kvmesh.h). */
#ifndef KVM_TRACE_CACHE_H
#define KVM_TRACE_CACHE_H

enum { TCACHE_MERGE, TCACHE_SAME_GROUP, TCACHE_NEW_GROUP };

/* The insert rule (correct.md §6): merge when the nearest SimHash is within 3 bits or the best S >= 0.92, a new
 * entry of the best entry's group when S >= 0.60, else a new group. */
int tcache_decide(double s_best, int hamming_best);

/* The post-processing of an LLM-written schema text (correct.md §3.2): <think>...</think> removed, bytes outside
 * printable ASCII (newline and tab kept) made spaces, cut at 6,144 bytes, trimmed. New string (kvm_free), NULL when
 * out of memory. */
char *tcache_scrub_text(const char *in);

#endif
