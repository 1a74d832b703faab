/* serve_internal.h - what agents/serve.c (the daemon's loop and run requests) shares with agents/serve_req.c (the
 * model, generate, attribute and cache.* requests, and the daemon's overhead figures). Not public. */
#ifndef KVM_AGENTS_SERVE_INTERNAL_H
#define KVM_AGENTS_SERVE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "../include/kvmesh.h"
#include "../runtime/net/net.h"
#include "../runtime/net/request.h"

struct sclient;
typedef struct serve_ext serve_ext_t;

/* What a handler needs of the request being served. */
typedef struct ctx {
    kvm_server_t *s;
    const kvm_net_msg_t *m;
    struct sclient *c;
    kvm_req_t *q;
    uint64_t compute_ns;     /* model compute inside the handler (generate, model.load), left out of the overhead */
    uint64_t compute_cpu_ns; /* the same in the thread's CPU time */
} ctx_t;

/* serve.c: replies (each sends and frees h / body) */
cJSON *serve_hdr_new(const char *type, const char *id, uint64_t seq);
int serve_send_hdr(kvm_server_t *s, const uint8_t *peer, size_t peer_len, cJSON *h, const void *payload, size_t plen,
                   bool terminal);
/* The same with n_pay payload frames (h's "frames" describes them). */
int serve_send_frames(kvm_server_t *s, const uint8_t *peer, size_t peer_len, cJSON *h, const kvm_req_frame_t *pay,
                      int n_pay, bool terminal);
int serve_reply_ok(ctx_t *x, const char *type, cJSON *body);
/* The "ok" reply {key: value} of a request that acted on one thing (its run_id, name, segment_id). */
int serve_reply_ok_str(ctx_t *x, const char *key, const char *value);
/* Figures added to a reply (docs/protocol.md), each object returned for more fields: "usage" {input_tokens,
 * output_tokens}; "timings" {queue_ms, ttft_ms, decode_ms}. */
cJSON *serve_add_usage(cJSON *o, double in, double out);
cJSON *serve_add_step_timings(cJSON *o, double queue_ms, double ttft_ms, double decode_ms);
/* The terminal error of a request that streamed replies before it (seq: the next one). */
int serve_send_error(ctx_t *x, uint64_t seq, int code, const char *field, const char *message);
int serve_reply_err(ctx_t *x, int code, const char *field, const char *msg, int retry_after_ms);
kvm_runtime_t *serve_runtime(kvm_server_t *s);
/* Whether the daemon is stopping (no new runs or generates). */
bool serve_draining(const kvm_server_t *s);
serve_ext_t *serve_ext(kvm_server_t *s);
/* A remembered run's trace directory (NULL: the daemon keeps no traces) and whether it ended; KVM_ENOENT for no
 * run of that id. */
int serve_run_trace(kvm_server_t *s, const char *run_id, const char **trace_dir, bool *ended);

/* serve_req.c */
serve_ext_t *serve_ext_new(void);
void serve_ext_free(serve_ext_t *e);
/* Answers the request types of serve_req.c (exactly one terminal reply); KVM_EINTERNAL reply for any other. */
int serve_req_dispatch(ctx_t *x);
/* Notes the daemon's own time for one request of type (enum kvm_req_type; 0 = undecodable): wall time and the
 * thread's CPU time (what is left when the wall time also holds waits for the CPU on a loaded machine). */
void serve_overhead_note(serve_ext_t *e, int type, uint64_t wall_ns, uint64_t cpu_ns);
/* The calling thread's CPU time in ns. */
uint64_t serve_cpu_ns(void);
/* Generates going (jobs of the runtime's engine). */
int serve_gens_going(const serve_ext_t *e);
/* Cancels the generates whose client is gone or too slow (noted by their token events), or all of them (cancel_all,
 * with message why); their ends come from the next kvm_runtime_step. */
void serve_gens_tick(kvm_server_t *s, bool cancel_all, const char *why);
/* stats: {"overhead": {...}, "models": [...]} fields added to b. */
void serve_ext_stats(const serve_ext_t *e, cJSON *b);

#endif
