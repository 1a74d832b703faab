/* request.h - the daemon's request decoder (docs/protocol.md, interfaces.md §3.2-3.4): the frames of one
 * message, as the ROUTER socket delivered them after the client's identity, become either a validated request
 * or a structured error naming the offending field. Pure: no sockets, no global state besides the library's
 * per-thread error message and allocator, so a fuzzer drives it (fuzz/fuzz_request.c).
 *
 * Ownership: a decoded request owns its parsed header (kvm_req_clear frees it); its string fields and
 * `inputs` point into that header, `payload` into the caller's frames (valid while they are).
 * Thread-safety: none needed (no shared state). */
#ifndef KVM_NET_REQUEST_H
#define KVM_NET_REQUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#define KVM_REQ_ID_MAX 64          /* bytes of a request id */
#define KVM_REQ_NAME_MAX 64        /* bytes of a workflow name */
#define KVM_REQ_HEADER_MAX 65536   /* bytes of the header frame */
#define KVM_REQ_STOP_MAX 8         /* generate: stop strings */
#define KVM_REQ_PATH_MAX 4096      /* model.load: bytes of the path */

enum kvm_req_type {
    KVM_REQ_HELLO = 1,
    KVM_REQ_PING,
    KVM_REQ_STATS,
    KVM_REQ_WORKFLOW_LOAD,
    KVM_REQ_WORKFLOW_LIST,
    KVM_REQ_WORKFLOW_DROP,
    KVM_REQ_RUN_START,
    KVM_REQ_RUN_CANCEL,
    KVM_REQ_RUN_STATUS,
    KVM_REQ_RUN_LIST,
    KVM_REQ_TRACE_GET,
    KVM_REQ_RUN_RESUME,
    KVM_REQ_TRACE_EXPORT,
    /* models, direct generation, failure attribution and the error-schema cache (request.c's decode_models) */
    KVM_REQ_MODEL_LOAD,
    KVM_REQ_MODEL_UNLOAD,
    KVM_REQ_MODEL_LIST,
    KVM_REQ_GENERATE,
    KVM_REQ_ATTRIBUTE,
    KVM_REQ_CACHE_STATS,
    KVM_REQ_CACHE_SHOW,
    KVM_REQ_CACHE_PIN,
    KVM_REQ_CACHE_EVICT,
    KVM_REQ_CACHE_LABEL,
    KVM_REQ_SEGMENT_PUT,
    KVM_REQ_SEGMENT_GET,
    KVM_REQ_SEGMENT_DROP,
    KVM_REQ_TOOL_REGISTER,
    KVM_REQ_TOOL_RESULT,
    KVM_REQ_GENERATE_CANCEL,        /* generate.cancel {request_id}: the id (in run_id) of a generate of the same client */
};

/* Streams a run.start asks for (`stream`). */
enum kvm_req_stream { KVM_STREAM_TOKENS = 1, KVM_STREAM_STEPS = 2, KVM_STREAM_KV = 4 };

/* One frame of a message: bytes, not NUL-terminated. */
typedef struct kvm_req_frame {
    const void *data;
    size_t len;
} kvm_req_frame_t;

typedef struct kvm_req_limits {
    size_t max_header;   /* header frame bytes (default KVM_REQ_HEADER_MAX) */
    size_t max_message;  /* all frames together (default 16 MiB) */
    size_t max_source;   /* workflow.load source bytes (default 1 MiB) */
} kvm_req_limits_t;

kvm_req_limits_t kvm_req_default_limits(void);

typedef struct kvm_req {
    int type;                       /* enum kvm_req_type */
    const char *type_name;          /* as sent ("run.start") */
    char id[KVM_REQ_ID_MAX + 1];
    int64_t deadline_ms;            /* -1 = none */
    cJSON *header;                  /* owned */
    /* hello */
    const char *client;             /* NULL = not given */
    /* workflow.load / workflow.drop (name); run.start (workflow) */
    const char *name;
    const char *source;             /* workflow.load: the Lua text, from `source` or payload frame 0 */
    size_t source_len;
    /* run.start */
    const cJSON *inputs;            /* an object, or NULL = {} */
    uint64_t seed;                  /* default 1 */
    bool dataset;                   /* inputs from the workflow's g:dataset(seed) */
    const char *kv;                 /* run.start: the run's KV policy ("dense" | "prefix" | "kvcomm"), or NULL */
    unsigned stream;                /* enum kvm_req_stream bits */
    /* run.cancel / run.status / trace.get / trace.export / run.resume */
    const char *run_id;
    /* run.resume: the answer (any JSON value; NULL = absent, which answers null); tool.result: the result */
    const cJSON *value;
    /* trace.export: "otlp-json" | "whowhen" | "jsonl" (checked); NULL = not given ("otlp-json") */
    const char *format;
    /* model.load (name = the model's name, path, backend) / model.unload (name); generate (model) */
    const char *model;
    const char *path;
    const char *backend;            /* "auto" | "cpu" | "cuda"; NULL = auto */
    /* generate: prompt text, or token_ids (i32 little-endian, payload frame 0, not aligned: memcpy them) */
    const char *prompt;
    const void *token_ids;
    int n_token_ids;
    int max_tokens;                 /* default 64 */
    double temperature;             /* default 0 (greedy) */
    double top_p;                   /* default 1 */
    const char *stop[KVM_REQ_STOP_MAX];
    int n_stop;
    bool chat;                      /* the prompt rendered in the model's chat format */
    bool ignore_eos;                /* generate past end-of-sequence ids (benchmarks) */
    /* attribute (run_id, k); cache.show / cache.pin / cache.evict (entry); cache.label (run_id, agent, step) */
    int k;                          /* attribute: schemata retrieved (default 5) */
    bool verify;                    /* attribute: "verify" given: blame is checked by replays (kvm_blame_verify) */
    int budget;                     /* attribute verify.budget: replays at most (0..16, default 3) */
    double pass_score;              /* attribute verify.pass: the score a replay must reach (default 1) */
    const char *judge;              /* attribute: the loaded model (model.load name) that writes the confirmed schema's text */
    int entry;                      /* -1 = none (cache.show lists the ids) */
    bool pinned;                    /* cache.pin: default true */
    const char *agent;
    int step;
    bool human;                     /* cache.label: a person's label (never evicted); default true */
    /* segment.put / segment.get / segment.drop (segment_id); put: model, frame, dtype, dimensions and the three
     * payload frames, checked against each other (the handler checks them against the model) */
    const char *segment_id;
    int frame;                      /* the RoPE frame: the position of the segment's first token (default 0) */
    const char *dtype;              /* "f32" | "f16" | "bf16" */
    int layers, kv_heads, head_dim, n_tokens;
    const void *seg_ids, *seg_k, *seg_v; /* into the payload frames (not aligned) */
    size_t seg_kv_bytes;            /* bytes of k (= of v) */
    /* tool.register (name, description, schema: an object or NULL) */
    const char *description;
    const cJSON *schema;
    /* tool.result (run_id, value or error) */
    uint64_t call_id;
    const char *error;              /* the tool failed: the message (NULL = it succeeded) */
} kvm_req_t;

/* A request that failed validation. */
typedef struct kvm_req_error {
    int code;                       /* KVM_EPROTO, KVM_EVERSION, KVM_EINVAL, KVM_ENOMEM */
    bool has_id;                    /* whether the request's id could be read (else the reply's id is null) */
    char id[KVM_REQ_ID_MAX + 1];
    char field[128];                /* the offending field's path ("inputs.task", "frames[1].shape"), "" = none */
    char message[256];
} kvm_req_error_t;

/* Decodes one message: frames[0] must be the empty delimiter, frames[1] the header JSON, the rest the payload
 * frames its `frames` field describes. Returns 0 and fills *out (kvm_req_clear it), or the error code with
 * *err filled (nothing to clear). lim NULL = the defaults. Never reads past a frame's length. */
int kvm_req_decode(const kvm_req_frame_t *frames, int n_frames, const kvm_req_limits_t *lim, kvm_req_t *out,
                   kvm_req_error_t *err);
void kvm_req_clear(kvm_req_t *r);

/* The request type names, for replies and docs; NULL for an unknown type. */
const char *kvm_req_type_name(int type);

#endif
