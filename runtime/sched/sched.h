/* sched.h - the step scheduler: continuous batching of many sequences on one model (L3).
 *
 * Callers submit requests (tokens to prefill into a sequence, then generation parameters). Each call
 * to kvm_sched_step() runs ONE kvm_forward over the work of every active request: one decode token for
 * each request that is generating, plus prompt chunks of requests still prefilling, up to max_rows
 * tokens. Requests join and leave between steps, so agents that become ready at different times share
 * forward passes (continuous batching). Finished requests are collected with kvm_sched_take().
 *
 * Every request decodes through a kvm_decode_t (generate.h), where the stop rules live; kvm_generate
 * is this scheduler with one request.
 *
 * The scheduler never frees the caller's sequence: on completion the sequence holds the KV of the
 * prompt and of every generated token except the last.
 *
 * KV memory (admission control, docs/kv-store.md): a queued request is admitted only when the pool can hold
 * its prompt and one more block beside what the running requests reserved (the store's unreferenced cache
 * is evicted for it first); otherwise it and every request queued after it wait, in submit order, for
 * running requests to finish. The first request is always admitted. A request whose prompt needs more
 * blocks than the whole pool fails at once (KVM_ENOMEM, kv_never_fits, the numbers in the message).
 * A running request that finds the KV budget full (decoding past its reservation) waits until another
 * request finishes (its owner then releases that sequence). When every request in flight is waiting, the
 * youngest one holding computed KV is preempted: its sequence goes back to what the caller gave and it
 * restarts from its prompt later (recompute, as vLLM; nothing was delivered yet and its sampler restarts
 * from its seed, so results do not change). A request that cannot fit even alone fails with KVM_ENOMEM. */
#ifndef KVM_SCHED_H
#define KVM_SCHED_H

#include <stdbool.h>
#include <stdint.h>

#include "../model/generate.h"

typedef struct kvm_sched_opts {
    int max_rows;    /* tokens per forward pass (default 256) */
    int max_active;  /* requests in flight at once; further ones queue (default 64) */
} kvm_sched_opts_t;

typedef struct kvm_sched_req {
    kvm_seq_t *seq;          /* caller-owned; may already hold a reused prefix; must outlive the request */
    const int32_t *prompt;   /* [n_prompt] ids to compute after seq's tokens (copied); n_prompt >= 1 */
    int n_prompt;
    kvm_gen_params_t gen;    /* max_tokens (>= 1), sampling, stop strings and ids (copied) */
    uint64_t tag;            /* returned in the completion */
    kvm_token_cb on_token;   /* may be NULL: streams the request's text as it becomes safe to show
                                (generate.h), called from kvm_sched_step; non-zero stops the request */
    void *on_token_ud;
} kvm_sched_req_t;

typedef struct kvm_sched_done {
    uint64_t tag;
    int status;              /* 0 or KVM_E*; error holds the message */
    bool kv_never_fits;      /* status KVM_ENOMEM because the prompt needs more KV blocks than the whole pool
                                (waiting cannot help) */
    char error[512];
    int32_t *ids;            /* generated ids (stop token excluded); kvm_free */
    int n_ids;
    char *text;              /* decoded output (stop string cut off); kvm_free */
    int stop_reason;         /* enum kvm_stop_reason */
    int n_prompt;            /* prompt tokens computed by this request */
    double queue_ms;         /* submit -> first forward that included it */
    double ttft_ms;          /* submit -> first generated id on the host */
    double decode_ms;        /* first id -> end */
    int n_forward;           /* forward passes that included this request */
    int batch_max_seqs;      /* most sequences in one of those passes */
    double batch_mean_seqs;  /* mean sequences per pass over those passes */
    int batch_max_rows;      /* most tokens in one of those passes */
} kvm_sched_done_t;

typedef struct kvm_sched_stats {
    uint64_t steps;          /* forward passes run */
    uint64_t rows;           /* tokens run in them */
    uint64_t items;          /* sequence-items run in them */
    int max_items;           /* most sequences in one pass */
    double forward_ms;       /* time inside kvm_forward */
} kvm_sched_stats_t;

typedef struct kvm_sched kvm_sched_t;

/* Creates a scheduler for model m (borrowed; must outlive it). Calls kvm_forward_init(m, max_rows).
 * NULL + message on error; free with kvm_sched_free(). */
kvm_sched_t *kvm_sched_create(kvm_model_t *m, const kvm_sched_opts_t *o);
/* Frees the scheduler; requests still in flight are dropped (their sequences are left as they are). */
void kvm_sched_free(kvm_sched_t *s);
/* Queues a request. KVM_EINVAL (message names the field) for an empty prompt, a missing seq, or
 * generation parameters kvm_decode_init refuses (max_tokens 0 among them). The memory account the calling
 * thread has entered (core.h) is kept with the request: its copies and its output, as it grows at every
 * token, are charged there (an output that would pass the account's cap fails the request with KVM_ENOMEM);
 * the logits row is the model's scratch and charged to none. */
int kvm_sched_submit(kvm_sched_t *s, const kvm_sched_req_t *r);
/* Runs one forward pass over all active work. Returns the number of sequences in it (0 = idle). A
 * failing request (KV budget, context) completes with its error; the others go on. */
int kvm_sched_step(kvm_sched_t *s);
/* Moves one completion into *out (caller frees with kvm_sched_done_clear); returns 1, or 0 if none. */
int kvm_sched_take(kvm_sched_t *s, kvm_sched_done_t *out);
/* Admits queued requests now (as kvm_sched_step does first); true when the head of the queue waits for KV
 * blocks (admission control), so that a caller holding more requests keeps them back rather than
 * allocating KV for them. */
bool kvm_sched_admit(kvm_sched_t *s);
/* Requests submitted and not yet taken. */
int kvm_sched_pending(const kvm_sched_t *s);
void kvm_sched_done_clear(kvm_sched_done_t *d);
const kvm_sched_stats_t *kvm_sched_stats(const kvm_sched_t *s);

#endif
