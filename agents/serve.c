/* serve.c - the daemon (include/kvmesh.h kvm_server_*; docs/protocol.md): one runtime, its workflows and runs
 * served to many clients over runtime/net's sockets. Requests are decoded by runtime/net/request.c; this file
 * answers them with the public API (workflows, runs, run events, kvm_runtime_step between socket reads). */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "../runtime/core/core.h"
#include "../runtime/core/map.h"
#include "../runtime/core/sb.h"
#include "../runtime/net/net.h"
#include "../runtime/net/request.h"
#include "serve_internal.h"

#define PEER_MAX 256

typedef struct sclient {
    uint8_t peer[PEER_MAX];
    size_t peer_len;
    uint64_t last_ns;        /* when it last sent anything */
    int n_going;             /* its runs going */
    char name[129];          /* hello.client */
} sclient_t;

/* One loaded instance of a named workflow. A workflow keeps every run it started until it is freed, so after
 * recycle_runs runs the server loads a fresh instance for new runs and frees the old one when its last run has
 * ended (memory and the per-round work stay flat under load). */
typedef struct swf {
    kvm_workflow_t *wf;
    char *name, *path, *source; /* what it was loaded from: a file, or source text */
    size_t len;
    int going, started;        /* runs going on this instance; started on it */
    long total;                /* runs started under the name, over its instances */
} swf_t;

typedef struct srun {
    struct kvm_server *s;
    swf_t *inst;             /* the workflow instance it runs on; NULL once that was freed */
    char *run_id, *workflow, *trace_dir;
    kvm_run_t *r;            /* NULL once its workflow was dropped */
    uint8_t peer[PEER_MAX];  /* the client that started it */
    size_t peer_len;
    char req_id[KVM_REQ_ID_MAX + 1];
    unsigned stream;         /* enum kvm_req_stream */
    uint64_t seq;            /* of the next reply to its request */
    uint64_t t0_ns, deadline_ns; /* deadline 0 = none */
    bool ended;
    int status;
    char *message;
    int cancel_code;         /* a cancel asked from inside an event (done after the round); 0 = none */
    const char *cancel_msg;
    cJSON *steps;            /* the figures of each step */
    long in, out, exact, offset, naive, recomputed, fused, anchors, agent_steps, reuse_steps;
    double first_ttft_ms;    /* -1 until the first agent step */
    double score;            /* g:score of the ended run; NaN = none */
    cJSON *outputs, *state;  /* after the end */
} srun_t;

struct kvm_server {
    kvm_runtime_t *rt;
    kvm_server_params_t p;
    kvm_req_limits_t lim;
    kvm_net_t *net;
    kvm_map_t wfs;           /* name -> swf_t * (the instance new runs start on) */
    swf_t **retired;         /* instances replaced by fresh ones, freed when their last run has ended */
    int n_retired, cap_retired;
    srun_t **runs;           /* every run remembered, oldest first */
    int n_runs, cap_runs;
    srun_t **going;          /* the runs not ended */
    int n_going, cap_going;
    kvm_map_t by_id;         /* run id -> srun_t * (keys borrowed from the srun) */
    kvm_map_t clients;       /* peer -> sclient_t * */
    serve_ext_t *ext;        /* models, generate, the overhead figures (serve_req.c) */
    struct stool **tools;    /* tools registered by clients (tool.register) */
    int n_tools, cap_tools;
    struct scall **calls;    /* their calls waiting for a tool.result */
    int n_calls, cap_calls;
    volatile sig_atomic_t stop;
    bool draining;
    uint64_t t_saved, runs_at_save; /* the last state save (kvm_runtime_save_state) and runs_started then */
    uint64_t t_heartbeat, runs_started, reloads, agent_steps, reuse_steps, tokens_in, tokens_exact, tokens_offset,
        tokens_recomputed, errors_sent, bad_requests;
};

kvm_server_params_t kvm_server_default_params(void) {
    return (kvm_server_params_t){.bind = "tcp://127.0.0.1:5555", .events = "tcp://127.0.0.1:5556",
                                 .max_message_bytes = 16u << 20, .max_source_bytes = 1u << 20, .max_runs = 256,
                                 .max_runs_per_client = 16, .client_timeout_ms = 3000, .idle_client_ms = 60000,
                                 .hwm = 10000, .client_queue = 4096, .drain_ms = 30000, .keep_runs = 10000,
                                 .recycle_runs = 1000, .save_state_ms = 60000};
}

static double ms_between(uint64_t a, uint64_t b) { return b > a ? (double)(b - a) / 1e6 : 0.0; }

/* ---- replies -------------------------------------------------------------------------------------------- */

static cJSON *hdr_new(const char *type, const char *id, uint64_t seq) {
    cJSON *h = cJSON_CreateObject();
    cJSON_AddNumberToObject(h, "v", 1);
    cJSON_AddStringToObject(h, "type", type);
    if (id) cJSON_AddStringToObject(h, "id", id);
    else cJSON_AddNullToObject(h, "id");
    cJSON_AddNumberToObject(h, "seq", (double)seq);
    return h;
}

static char *u64_str(uint64_t v, char buf[24]) {
    snprintf(buf, 24, "%llu", (unsigned long long)v);
    return buf;
}

/* Sends h (then deletes it) and n_pay payload frames; the net status (0, KVM_ESLOWCLIENT, KVM_ENOENT ...). */
static int send_frames(kvm_server_t *s, const uint8_t *peer, size_t peer_len, cJSON *h, const kvm_req_frame_t *pay,
                       int n_pay, bool terminal) {
    char *txt = h ? cJSON_PrintUnformatted(h) : NULL;
    cJSON_Delete(h);
    if (!txt) return KVM_ENOMEM;
    int rc = kvm_net_sendv(s->net, peer, peer_len, txt, pay, n_pay, terminal);
    cJSON_free(txt);
    return rc;
}

/* The same with an optional payload frame. */
static int send_hdr(kvm_server_t *s, const uint8_t *peer, size_t peer_len, cJSON *h, const void *payload, size_t plen,
                    bool terminal) {
    const kvm_req_frame_t f = {payload, plen};
    return send_frames(s, peer, peer_len, h, &f, payload || plen ? 1 : 0, terminal);
}

static int send_error(kvm_server_t *s, const uint8_t *peer, size_t peer_len, const char *id, uint64_t seq, int code,
                      const char *field, const char *message, int retry_after_ms, cJSON *extra) {
    cJSON *h = hdr_new("error", id, seq);
    cJSON_AddStringToObject(h, "code", kvm_errname(code));
    cJSON_AddNumberToObject(h, "errno", code);
    cJSON_AddStringToObject(h, "message", message && *message ? message : kvm_strerror(code));
    cJSON *d = cJSON_AddObjectToObject(h, "detail");
    if (field && *field) cJSON_AddStringToObject(d, "field", field);
    if (retry_after_ms >= 0) cJSON_AddNumberToObject(h, "retry_after_ms", retry_after_ms);
    else cJSON_AddNullToObject(h, "retry_after_ms");
    if (extra) cJSON_AddItemToObject(h, "run", extra);
    s->errors_sent++;
    return send_hdr(s, peer, peer_len, h, NULL, 0, true);
}

/* ---- clients -------------------------------------------------------------------------------------------- */

static sclient_t *client_of(kvm_server_t *s, const uint8_t *peer, size_t len, bool make) {
    kvm_mapval_t v;
    if (kvm_map_get(&s->clients, peer, len, &v)) return v.ptr;
    if (!make || len > PEER_MAX) return NULL;
    sclient_t *c = kvm_calloc(1, sizeof *c);
    if (!c) return NULL;
    memcpy(c->peer, peer, len);
    c->peer_len = len;
    if (kvm_map_put(&s->clients, peer, len, KVM_MAPVAL_PTR(c))) {
        kvm_free(c);
        return NULL;
    }
    return c;
}

/* ---- runs ----------------------------------------------------------------------------------------------- */

static void srun_free(srun_t *r) {
    if (!r) return;
    kvm_free(r->run_id);
    kvm_free(r->workflow);
    kvm_free(r->trace_dir);
    kvm_free(r->message);
    cJSON_Delete(r->steps);
    cJSON_Delete(r->outputs);
    cJSON_Delete(r->state);
    kvm_free(r);
}

static int push_ptr(void ***arr, int *n, int *cap, void *p) {
    if (*n == *cap) {
        int nc = *cap ? *cap * 2 : 16;
        void **na = kvm_realloc(*arr, (size_t)nc * sizeof *na);
        if (!na) return KVM_ENOMEM;
        *arr = na;
        *cap = nc;
    }
    (*arr)[(*n)++] = p;
    return 0;
}

/* Forgets the oldest ended runs beyond keep_runs. */
static void trim_runs(kvm_server_t *s) {
    int i = 0;
    while (s->n_runs > s->p.keep_runs && i < s->n_runs) {
        srun_t *r = s->runs[i];
        if (!r->ended) {
            i++;
            continue;
        }
        kvm_map_remove_str(&s->by_id, r->run_id, NULL);
        memmove(&s->runs[i], &s->runs[i + 1], (size_t)(s->n_runs - i - 1) * sizeof *s->runs);
        s->n_runs--;
        srun_free(r);
    }
}

static const char *run_state(const srun_t *r) { return !r->ended ? "running" : r->status ? "error" : "done"; }

/* The figures replies share (docs/protocol.md), each added to o as an object and returned for more fields:
 * "usage" {input_tokens, output_tokens}; a step's "timings" {queue_ms, ttft_ms, decode_ms}; "kv", the partition of a
 * prompt's tokens {exact, offset, naive, recomputed, fused} and the anchors used. */
static cJSON *add_usage(cJSON *o, double in, double out) {
    cJSON *u = cJSON_AddObjectToObject(o, "usage");
    cJSON_AddNumberToObject(u, "input_tokens", in);
    cJSON_AddNumberToObject(u, "output_tokens", out);
    return u;
}

static cJSON *add_step_timings(cJSON *o, double queue_ms, double ttft_ms, double decode_ms) {
    cJSON *t = cJSON_AddObjectToObject(o, "timings");
    cJSON_AddNumberToObject(t, "queue_ms", queue_ms);
    cJSON_AddNumberToObject(t, "ttft_ms", ttft_ms);
    cJSON_AddNumberToObject(t, "decode_ms", decode_ms);
    return t;
}

static cJSON *add_kv(cJSON *o, double exact, double offset, double naive, double recomputed, double fused, double anchors) {
    cJSON *kv = cJSON_AddObjectToObject(o, "kv");
    cJSON_AddNumberToObject(kv, "exact", exact);
    cJSON_AddNumberToObject(kv, "offset", offset);
    cJSON_AddNumberToObject(kv, "naive", naive);
    cJSON_AddNumberToObject(kv, "recomputed", recomputed);
    cJSON_AddNumberToObject(kv, "fused", fused);
    cJSON_AddNumberToObject(kv, "anchors", anchors);
    return kv;
}

/* The run's figures: usage, timings, the KV partition, each step. */
static cJSON *run_figures(const srun_t *r, bool with_steps) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "run_id", r->run_id);
    cJSON_AddStringToObject(o, "workflow", r->workflow);
    cJSON_AddStringToObject(o, "state", run_state(r));
    cJSON_AddNumberToObject(add_usage(o, (double)r->in, (double)r->out), "agent_steps", (double)r->agent_steps);
    cJSON *t = cJSON_AddObjectToObject(o, "timings");
    cJSON_AddNumberToObject(t, "total_ms", ms_between(r->t0_ns, kvm_now_ns()));
    if (r->first_ttft_ms >= 0) cJSON_AddNumberToObject(t, "ttft_ms", r->first_ttft_ms);
    cJSON *kv = add_kv(o, (double)r->exact, (double)r->offset, (double)r->naive, (double)r->recomputed, (double)r->fused,
                       (double)r->anchors);
    cJSON_AddNumberToObject(kv, "reuse_steps", (double)r->reuse_steps);
    if (!isnan(r->score)) cJSON_AddNumberToObject(o, "score", r->score);
    if (with_steps && r->steps) cJSON_AddItemToObject(o, "steps", cJSON_Duplicate(r->steps, 1));
    return o;
}

/* Sends one stream message of a run; a client that cannot keep up or is gone gets its run canceled. */
static void run_send(srun_t *r, cJSON *h, bool terminal) {
    int rc = send_hdr(r->s, r->peer, r->peer_len, h, NULL, 0, terminal);
    if (r->ended || r->cancel_code) return;
    if (rc == KVM_ESLOWCLIENT) {
        r->cancel_code = KVM_ESLOWCLIENT;
        r->cancel_msg = "the client did not read its stream fast enough";
    } else if (rc == KVM_ENOENT) {
        r->cancel_code = KVM_ECANCELED;
        r->cancel_msg = "the client is gone";
    }
}

static void publish(kvm_server_t *s, const char *topic, cJSON *body) {
    char *txt = cJSON_PrintUnformatted(body);
    cJSON_Delete(body);
    if (txt) kvm_net_publish(s->net, topic, txt);
    cJSON_free(txt);
}

static void run_publish(srun_t *r, const char *type, cJSON *body) {
    char topic[96];
    snprintf(topic, sizeof topic, "run.%s", r->run_id);
    cJSON_AddStringToObject(body, "type", type);
    cJSON_AddStringToObject(body, "run_id", r->run_id);
    publish(r->s, topic, body);
}

static cJSON *step_figures(srun_t *r, const kvm_step_event_t *e) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "idx", cJSON_GetArraySize(r->steps));
    cJSON_AddNumberToObject(o, "superstep", e->superstep);
    cJSON_AddStringToObject(o, "node", e->node ? e->node : "");
    if (e->agent) cJSON_AddStringToObject(o, "agent", e->agent);
    cJSON_AddStringToObject(o, "op", e->op ? e->op : "");
    cJSON_AddStringToObject(o, "status", e->status ? kvm_errname(e->status) : "ok");
    if (e->status && e->error) cJSON_AddStringToObject(o, "error", e->error);
    add_usage(o, e->tokens_in, e->tokens_out);
    add_step_timings(o, e->queue_ms, e->ttft_ms, e->decode_ms);
    if (e->agent && e->kv_mode)
        cJSON_AddStringToObject(add_kv(o, e->kv_exact, e->kv_offset, e->kv_naive, e->kv_recomputed, e->kv_fused, e->kv_anchors),
                                "mode", e->kv_mode);
    return o;
}

static void count_step(srun_t *r, const kvm_step_event_t *e) {
    kvm_server_t *s = r->s;
    r->in += e->tokens_in;
    r->out += e->tokens_out;
    if (!e->agent || !e->kv_mode) return;
    bool reused = !strcmp(e->kv_mode, "reuse") || e->kv_anchors > 0;
    r->exact += e->kv_exact;
    r->offset += e->kv_offset;
    r->naive += e->kv_naive;
    r->recomputed += e->kv_recomputed;
    r->fused += e->kv_fused;
    r->anchors += e->kv_anchors;
    r->agent_steps++;
    r->reuse_steps += reused;
    if (r->first_ttft_ms < 0) r->first_ttft_ms = e->ttft_ms;
    s->agent_steps++;
    s->reuse_steps += reused;
    s->tokens_in += (uint64_t)e->tokens_in;
    s->tokens_exact += (uint64_t)e->kv_exact;
    s->tokens_offset += (uint64_t)e->kv_offset;
    s->tokens_recomputed += (uint64_t)e->kv_recomputed;
}

static void on_run_step(srun_t *r, const kvm_step_event_t *e) {
    cJSON *f = step_figures(r, e);
    count_step(r, e);
    if (r->stream & KVM_STREAM_STEPS) {
        cJSON *h = hdr_new("step", r->req_id, r->seq++);
        cJSON_AddItemToObject(h, "step", cJSON_Duplicate(f, 1));
        run_send(r, h, false);
    }
    if ((r->stream & KVM_STREAM_KV) && cJSON_GetObjectItemCaseSensitive(f, "kv")) {
        cJSON *h = hdr_new("kv", r->req_id, r->seq++);
        cJSON_AddNumberToObject(h, "idx", cJSON_GetArraySize(r->steps));
        cJSON_AddItemToObject(h, "kv", cJSON_Duplicate(cJSON_GetObjectItemCaseSensitive(f, "kv"), 1));
        run_send(r, h, false);
    }
    run_publish(r, "step", cJSON_Duplicate(f, 1));
    cJSON_AddItemToArray(r->steps, f);
}

static cJSON *parsed_or_null(char *txt) {
    cJSON *j = txt ? cJSON_Parse(txt) : NULL;
    kvm_free(txt);
    return j ? j : cJSON_CreateNull();
}

static void on_run_end(srun_t *r, const kvm_run_event_t *e) {
    kvm_server_t *s = r->s;
    r->ended = true;
    r->status = e->status;
    r->message = e->message ? kvm_strdup(e->message) : NULL;
    r->outputs = parsed_or_null(kvm_run_outputs_json(e->run));
    r->state = parsed_or_null(kvm_run_state_json(e->run));
    double sc;
    if (!e->status && kvm_run_score(e->run, &sc) == 1) r->score = sc; /* the workflow's g:score, if it has one */
    for (int i = 0; i < s->n_going; i++)
        if (s->going[i] == r) s->going[i] = s->going[--s->n_going];
    sclient_t *c = client_of(s, r->peer, r->peer_len, false);
    if (c && c->n_going > 0) c->n_going--;
    if (r->inst) r->inst->going--; /* a retired instance is freed by housekeeping, not inside the round */
    if (e->status) {
        send_error(s, r->peer, r->peer_len, r->req_id, r->seq++, e->status, "", e->message, -1, run_figures(r, true));
    } else {
        cJSON *h = hdr_new("done", r->req_id, r->seq++);
        cJSON *f = run_figures(r, true);
        for (cJSON *x = f->child; x; x = x->next) cJSON_AddItemToObject(h, x->string, cJSON_Duplicate(x, 1));
        cJSON_Delete(f);
        cJSON_AddItemToObject(h, "outputs", cJSON_Duplicate(r->outputs, 1));
        cJSON_AddItemToObject(h, "state", cJSON_Duplicate(r->state, 1));
        send_hdr(s, r->peer, r->peer_len, h, NULL, 0, true);
    }
    cJSON *b = run_figures(r, false);
    cJSON_AddNumberToObject(b, "status", e->status);
    run_publish(r, "end", b);
}

static void run_event(void *ud, const kvm_run_event_t *e) {
    srun_t *r = ud;
    if (!r->s) { /* a run the server could not remember (out of memory): it only ends */
        if (e->kind == KVM_RUN_END) srun_free(r);
        return;
    }
    if (e->kind == KVM_RUN_TOKEN) {
        if (!(r->stream & KVM_STREAM_TOKENS) || r->cancel_code) return;
        cJSON *h = hdr_new("token", r->req_id, r->seq++);
        char *t = kvm_strndup(e->text ? e->text : "", e->len);
        cJSON_AddStringToObject(h, "agent", e->agent ? e->agent : "");
        cJSON_AddStringToObject(h, "text", t ? t : "");
        cJSON_AddNumberToObject(h, "token_id", e->token_id);
        kvm_free(t);
        run_send(r, h, false);
    } else if (e->kind == KVM_RUN_STEP) {
        on_run_step(r, e->step);
    } else if (e->kind == KVM_RUN_INTERRUPT) { /* always streamed (interfaces.md §7): someone must answer */
        cJSON *payload = cJSON_ParseWithLength(e->text, e->len);
        cJSON *h = hdr_new("interrupt", r->req_id, r->seq++);
        cJSON_AddStringToObject(h, "run_id", r->run_id);
        cJSON_AddStringToObject(h, "node", e->node ? e->node : "");
        cJSON_AddItemToObject(h, "payload", payload ? cJSON_Duplicate(payload, 1) : cJSON_CreateNull());
        run_send(r, h, false);
        cJSON *b = cJSON_CreateObject();
        cJSON_AddStringToObject(b, "node", e->node ? e->node : "");
        cJSON_AddItemToObject(b, "payload", payload ? payload : cJSON_CreateNull());
        run_publish(r, "interrupt", b);
    } else if (e->kind == KVM_RUN_END) {
        on_run_end(r, e);
    }
}

/* ---- handlers ------------------------------------------------------------------------------------------- */


static int reply_ok(ctx_t *x, const char *type, cJSON *body) {
    cJSON *h = hdr_new(type, x->q->id, 0);
    while (body && body->child) { /* moved, not copied: a run.status body holds every step */
        cJSON *b = cJSON_DetachItemViaPointer(body, body->child);
        if (!cJSON_AddItemToObject(h, b->string, b)) cJSON_Delete(b);
    }
    cJSON_Delete(body);
    return send_hdr(x->s, x->m->peer, x->m->peer_len, h, NULL, 0, true);
}

static int reply_err(ctx_t *x, int code, const char *field, const char *msg, int retry_after_ms) {
    return send_error(x->s, x->m->peer, x->m->peer_len, x->q->id, 0, code, field, msg, retry_after_ms, NULL);
}

/* The "ok" reply of a request that acted on one thing: {key: value} (its run_id, name, segment_id). */
static int reply_ok_str(ctx_t *x, const char *key, const char *value) {
    cJSON *h = hdr_new("ok", x->q->id, 0);
    cJSON_AddStringToObject(h, key, value);
    return send_hdr(x->s, x->m->peer, x->m->peer_len, h, NULL, 0, true);
}

static int on_hello(ctx_t *x) {
    kvm_server_t *s = x->s;
    if (x->q->client) snprintf(x->c->name, sizeof x->c->name, "%s", x->q->client);
    cJSON *b = cJSON_CreateObject();
    cJSON_AddNumberToObject(b, "version", 1);
    cJSON *cap = cJSON_AddObjectToObject(b, "capabilities");
    cJSON *types = cJSON_AddArrayToObject(cap, "types");
    for (int t = 1; t < 256; t++) /* every type the decoder knows (request.c's schema table) */
        if (kvm_req_type_name(t)) cJSON_AddItemToArray(types, cJSON_CreateString(kvm_req_type_name(t)));
    static const char *const streams[] = {"tokens", "steps", "kv"};
    cJSON_AddItemToObject(cap, "streams", cJSON_CreateStringArray(streams, 3));
    cJSON_AddBoolToObject(cap, "events", kvm_server_endpoint(s, true)[0] != '\0');
    cJSON *l = cJSON_AddObjectToObject(b, "limits");
    cJSON_AddNumberToObject(l, "max_header", (double)s->lim.max_header);
    cJSON_AddNumberToObject(l, "max_message", (double)s->lim.max_message);
    cJSON_AddNumberToObject(l, "max_source", (double)s->lim.max_source);
    cJSON_AddNumberToObject(l, "max_runs", s->p.max_runs);
    cJSON_AddNumberToObject(l, "max_runs_per_client", s->p.max_runs_per_client);
    cJSON_AddNumberToObject(l, "client_timeout_ms", s->p.client_timeout_ms);
    cJSON *d = cJSON_AddObjectToObject(b, "daemon");
    cJSON_AddStringToObject(d, "build", kvm_version());
    cJSON_AddStringToObject(d, "events", kvm_server_endpoint(s, true));
    return reply_ok(x, "hello.ok", b);
}

static int on_ping(ctx_t *x) {
    char buf[24];
    cJSON *b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "t_ns", u64_str(kvm_now_ns(), buf));
    return reply_ok(x, "pong", b);
}

static cJSON *workflow_info(const swf_t *w) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "name", w->name);
    cJSON_AddStringToObject(o, "graph", kvm_workflow_name(w->wf));
    cJSON *ag = cJSON_AddArrayToObject(o, "agents");
    for (int i = 0; i < kvm_workflow_n_agents(w->wf); i++) {
        kvm_agent_stats_t st;
        if (kvm_workflow_agent_stats(w->wf, i, &st)) continue;
        cJSON *a = cJSON_CreateObject();
        cJSON_AddStringToObject(a, "name", st.name ? st.name : "");
        cJSON_AddStringToObject(a, "model", st.model ? st.model : "");
        cJSON_AddStringToObject(a, "kv", st.kv ? st.kv : "");
        cJSON_AddItemToArray(ag, a);
    }
    cJSON_AddBoolToObject(o, "dataset", kvm_workflow_has_dataset(w->wf));
    cJSON_AddBoolToObject(o, "score", kvm_workflow_has_score(w->wf));
    cJSON_AddNumberToObject(o, "runs", (double)w->total);
    return o;
}

static swf_t *workflow_named(const kvm_server_t *s, const char *name) {
    kvm_mapval_t v;
    return kvm_map_get_str(&s->wfs, name, &v) ? v.ptr : NULL;
}

/* Frees an instance; the runs remembered on it keep their summaries. */
static void swf_free(kvm_server_t *s, swf_t *w) {
    if (!w) return;
    for (int i = 0; i < s->n_runs; i++)
        if (s->runs[i]->inst == w) {
            s->runs[i]->inst = NULL;
            s->runs[i]->r = NULL;
        }
    kvm_workflow_free(w->wf);
    kvm_free(w->name);
    kvm_free(w->path);
    kvm_free(w->source);
    kvm_free(w);
}

/* Loads an instance (from a path, or source text); NULL + message. */
static swf_t *swf_load(kvm_server_t *s, const char *name, const char *path, const char *src, size_t len) {
    swf_t *w = kvm_calloc(1, sizeof *w);
    if (!w || !(w->name = kvm_strdup(name)) || (path && !(w->path = kvm_strdup(path))) ||
        (!path && !(w->source = kvm_strndup(src, len)))) {
        swf_free(s, w);
        kvm_seterr(KVM_ENOMEM, "out of memory loading workflow '%s'", name);
        return NULL;
    }
    w->len = len;
    kvm_errclear();
    w->wf = path ? kvm_workflow_load(s->rt, path, NULL) : kvm_workflow_load_string(s->rt, name, src, len, NULL);
    if (!w->wf) {
        int code = kvm_errcode() ? kvm_errcode() : KVM_EINVAL;
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", kvm_errmsg());
        swf_free(s, w);
        kvm_seterr(code, "%s", msg);
        return NULL;
    }
    return w;
}

/* Loads a workflow (from a path, or source text) under name. 0 or the error with its message. */
static int add_workflow(kvm_server_t *s, const char *name, const char *path, const char *src, size_t len) {
    if (workflow_named(s, name)) return kvm_seterr(KVM_EINVAL, "workflow '%s' is loaded already (drop it first)", name);
    swf_t *w = swf_load(s, name, path, src, len);
    if (!w) return kvm_errcode() ? kvm_errcode() : KVM_EINVAL;
    if (kvm_map_put_str(&s->wfs, name, KVM_MAPVAL_PTR(w))) {
        swf_free(s, w);
        return KVM_ENOMEM;
    }
    return 0;
}

/* After recycle_runs runs on the current instance of w's name: a fresh one for new runs (the old one is freed
 * when its runs have ended). A failed reload keeps the old instance (and says so). The current instance. */
static swf_t *recycle(kvm_server_t *s, swf_t *w) {
    if (s->p.recycle_runs <= 0 || w->started < s->p.recycle_runs) return w;
    swf_t *n = swf_load(s, w->name, w->path, w->source, w->len);
    if (!n || push_ptr((void ***)&s->retired, &s->n_retired, &s->cap_retired, w)) {
        if (!s->p.quiet) fprintf(stderr, "kvmesh serve: reloading workflow '%s' failed (runs go on on the old one): %s\n", w->name, kvm_errmsg());
        swf_free(s, n);
        w->started = 0;
        return w;
    }
    n->total = w->total;
    kvm_map_put_str(&s->wfs, w->name, KVM_MAPVAL_PTR(n)); /* overwrites the entry: no allocation */
    s->reloads++;
    return n;
}

/* Frees the retired instances whose runs have all ended. */
static void free_retired(kvm_server_t *s) {
    for (int i = 0; i < s->n_retired;)
        if (s->retired[i]->going == 0) {
            swf_free(s, s->retired[i]);
            s->retired[i] = s->retired[--s->n_retired];
        } else {
            i++;
        }
}

static int on_wf_load(ctx_t *x) {
    int rc = add_workflow(x->s, x->q->name, NULL, x->q->source, x->q->source_len);
    if (rc) return reply_err(x, rc, rc == KVM_EINVAL && workflow_named(x->s, x->q->name) ? "name" : "source", kvm_errmsg(), -1);
    return reply_ok(x, "ok", workflow_info(workflow_named(x->s, x->q->name)));
}

static int on_wf_list(ctx_t *x) {
    cJSON *b = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(b, "workflows");
    size_t it = 0;
    for (const kvm_map_entry_t *e; (e = kvm_map_next(&x->s->wfs, &it));) cJSON_AddItemToArray(arr, workflow_info(e->val.ptr));
    return reply_ok(x, "ok", b);
}

static int on_wf_drop(ctx_t *x) {
    kvm_server_t *s = x->s;
    swf_t *w = workflow_named(s, x->q->name);
    if (!w) return reply_err(x, KVM_ENOENT, "name", "no workflow of that name", -1);
    for (int i = 0; i < s->n_going; i++)
        if (!strcmp(s->going[i]->workflow, x->q->name))
            return reply_err(x, KVM_EBUSY, "name", "the workflow has runs going (cancel them first)", 500);
    kvm_map_remove_str(&s->wfs, x->q->name, NULL);
    free_retired(s);
    swf_free(s, w);
    return reply_ok_str(x, "name", x->q->name);
}

/* Refusals of a run.start before anything starts: 0 = go. */
static int run_admit(ctx_t *x, swf_t **wf) {
    kvm_server_t *s = x->s;
    if (s->draining) return reply_err(x, KVM_EBUSY, "", "the daemon is stopping: no new runs", -1), 1;
    if (!(*wf = workflow_named(s, x->q->name))) return reply_err(x, KVM_ENOENT, "workflow", "no workflow of that name", -1), 1;
    for (int i = 0; i < s->n_going; i++)
        if (s->going[i]->peer_len == x->m->peer_len && !memcmp(s->going[i]->peer, x->m->peer, x->m->peer_len) &&
            !strcmp(s->going[i]->req_id, x->q->id))
            return reply_err(x, KVM_EINVAL, "id", "a request of this client with the same id is still going", -1), 1;
    if (s->n_going >= s->p.max_runs) return reply_err(x, KVM_EBUSY, "", "the daemon runs its maximum of runs", 100), 1;
    if (x->c->n_going >= s->p.max_runs_per_client)
        return reply_err(x, KVM_EBUSY, "", "this client runs its maximum of runs", 100), 1;
    if (x->q->dataset && !kvm_workflow_has_dataset((*wf)->wf))
        return reply_err(x, KVM_EINVAL, "dataset", "the workflow has no g:dataset", -1), 1;
    return 0;
}

static srun_t *srun_new(ctx_t *x) {
    srun_t *r = kvm_calloc(1, sizeof *r);
    if (!r) return NULL;
    r->s = x->s;
    memcpy(r->peer, x->m->peer, x->m->peer_len);
    r->peer_len = x->m->peer_len;
    memcpy(r->req_id, x->q->id, sizeof r->req_id);
    r->stream = x->q->stream;
    r->t0_ns = kvm_now_ns();
    r->deadline_ns = x->q->deadline_ms >= 0 ? r->t0_ns + (uint64_t)x->q->deadline_ms * 1000000u : 0;
    r->first_ttft_ms = -1;
    r->score = NAN;
    r->steps = cJSON_CreateArray();
    r->workflow = kvm_strdup(x->q->name);
    if (!r->steps || !r->workflow) {
        srun_free(r);
        return NULL;
    }
    return r;
}

/* Remembers a started run; 0 or KVM_ENOMEM (then the run is canceled). */
static int srun_keep(kvm_server_t *s, srun_t *r) {
    r->run_id = kvm_strdup(kvm_run_id(r->r));
    const char *td = kvm_run_trace_dir(r->r);
    r->trace_dir = td ? kvm_strdup(td) : NULL;
    if (!r->run_id || (td && !r->trace_dir) || push_ptr((void ***)&s->runs, &s->n_runs, &s->cap_runs, r)) return KVM_ENOMEM;
    if (push_ptr((void ***)&s->going, &s->n_going, &s->cap_going, r)) {
        s->n_runs--;
        return KVM_ENOMEM;
    }
    if (kvm_map_put_str(&s->by_id, r->run_id, KVM_MAPVAL_PTR(r))) {
        s->n_runs--;
        s->n_going--;
        return KVM_ENOMEM;
    }
    return 0;
}

static int on_run_start(ctx_t *x) {
    kvm_server_t *s = x->s;
    swf_t *w = NULL;
    if (run_admit(x, &w)) return 0;
    w = recycle(s, w);
    srun_t *r = srun_new(x);
    char *inputs = x->q->inputs ? cJSON_PrintUnformatted(x->q->inputs) : NULL;
    if (!r || (x->q->inputs && !inputs)) {
        srun_free(r);
        cJSON_free(inputs);
        return reply_err(x, KVM_ENOMEM, "", "out of memory starting the run", 100);
    }
    kvm_run_params_t rp = kvm_run_default_params();
    rp.inputs_json = inputs;
    rp.seed = x->q->seed;
    rp.from_dataset = x->q->dataset;
    rp.kv = x->q->kv;
    rp.on_event = run_event;
    rp.event_ud = r;
    r->r = kvm_run_start(w->wf, &rp);
    cJSON_free(inputs);
    if (!r->r) {
        srun_free(r);
        return reply_err(x, kvm_errcode() ? kvm_errcode() : KVM_EINVAL, "inputs", kvm_errmsg(), -1);
    }
    if (srun_keep(s, r)) {
        kvm_run_cancel(r->r, KVM_ENOMEM, "out of memory remembering the run");
        r->s = NULL; /* its end event frees it */
        return reply_err(x, KVM_ENOMEM, "", "out of memory starting the run", 100);
    }
    x->c->n_going++;
    s->runs_started++;
    r->inst = w;
    w->going++;
    w->started++;
    w->total++;
    cJSON *h = hdr_new("run.accepted", r->req_id, r->seq++);
    cJSON_AddStringToObject(h, "run_id", r->run_id);
    cJSON_AddStringToObject(h, "trace_id", r->run_id);
    cJSON_AddStringToObject(h, "workflow", r->workflow);
    run_send(r, h, false);
    cJSON *b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "workflow", r->workflow);
    run_publish(r, "start", b);
    trim_runs(s);
    return 0;
}

static srun_t *run_named(const kvm_server_t *s, const char *id) {
    kvm_mapval_t v;
    return kvm_map_get_str(&s->by_id, id, &v) ? v.ptr : NULL;
}

/* Whether the run has not ended: going, or parked in kvmesh.interrupt (a parked run can be canceled too). */
static bool run_going(const srun_t *r) {
    int st = kvm_run_status(r->r, NULL);
    return !r->ended && (st == KVM_EBUSY || st == KVM_EINTERRUPTED);
}

/* run.resume {run_id, value}: the answer to a run parked in kvmesh.interrupt; its stream goes on. */
static int on_run_resume(ctx_t *x) {
    srun_t *r = run_named(x->s, x->q->run_id);
    if (!r) return reply_err(x, KVM_ENOENT, "run_id", "no run of that id", -1);
    if (r->ended || !r->r) return reply_err(x, KVM_ESTALE, "run_id", "the run has ended", -1);
    if (kvm_run_status(r->r, NULL) != KVM_EINTERRUPTED)
        return reply_err(x, KVM_EINVAL, "run_id", "the run is not waiting for an answer (no kvmesh.interrupt pending)", -1);
    char *v = x->q->value ? cJSON_PrintUnformatted(x->q->value) : NULL;
    if (x->q->value && !v) return reply_err(x, KVM_ENOMEM, "", "out of memory", 100);
    int rc = kvm_run_resume(r->r, v ? v : "null");
    cJSON_free(v);
    if (rc) return reply_err(x, rc, "value", kvm_errmsg(), -1);
    return reply_ok_str(x, "run_id", r->run_id);
}

static int on_run_cancel(ctx_t *x) {
    srun_t *r = run_named(x->s, x->q->run_id);
    if (!r) return reply_err(x, KVM_ENOENT, "run_id", "no run of that id", -1);
    if (r->ended || !r->r || !run_going(r)) return reply_err(x, KVM_ESTALE, "run_id", "the run has ended", -1);
    int rc = kvm_run_cancel(r->r, KVM_ECANCELED, "canceled by a client");
    if (rc) return reply_err(x, rc, "run_id", kvm_errmsg(), -1);
    return reply_ok_str(x, "run_id", r->run_id);
}

static int on_run_status(ctx_t *x) {
    srun_t *r = run_named(x->s, x->q->run_id);
    if (!r) return reply_err(x, KVM_ENOENT, "run_id", "no run of that id", -1);
    cJSON *b = run_figures(r, true);
    if (r->ended) {
        cJSON_AddStringToObject(b, "code", r->status ? kvm_errname(r->status) : "KVM_OK");
        if (r->message) cJSON_AddStringToObject(b, "message", r->message);
        cJSON_AddItemToObject(b, "outputs", cJSON_Duplicate(r->outputs, 1));
    }
    return reply_ok(x, "ok", b);
}

static int on_run_list(ctx_t *x) {
    cJSON *b = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(b, "runs");
    for (int i = 0; i < x->s->n_runs; i++) {
        const srun_t *r = x->s->runs[i];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "run_id", r->run_id);
        cJSON_AddStringToObject(o, "workflow", r->workflow);
        cJSON_AddStringToObject(o, "state", run_state(r));
        cJSON_AddBoolToObject(o, "mine", r->peer_len == x->m->peer_len && !memcmp(r->peer, x->m->peer, r->peer_len));
        cJSON_AddItemToArray(arr, o);
    }
    return reply_ok(x, "ok", b);
}

static int on_trace_get(ctx_t *x) {
    srun_t *r = run_named(x->s, x->q->run_id);
    if (!r) return reply_err(x, KVM_ENOENT, "run_id", "no run of that id", -1);
    if (!r->trace_dir) return reply_err(x, KVM_ENOENT, "run_id", "the daemon keeps no traces (start it with --trace DIR)", -1);
    kvm_trace_reader_t *t = kvm_trace_reader_open(r->trace_dir);
    if (!t) return reply_err(x, kvm_errcode() ? kvm_errcode() : KVM_EIO, "run_id", kvm_errmsg(), -1);
    kvm_sb_t sb = {0};
    int n = kvm_trace_reader_n_records(t);
    for (int i = 0; i < n; i++) {
        kvm_sb_puts(&sb, kvm_trace_reader_record_json(t, i));
        kvm_sb_putc(&sb, '\n');
    }
    cJSON *h = hdr_new("ok", x->q->id, 0);
    cJSON_AddStringToObject(h, "run_id", r->run_id);
    cJSON_AddStringToObject(h, "format", "jsonl");
    cJSON_AddNumberToObject(h, "records", n);
    cJSON_AddBoolToObject(h, "torn", kvm_trace_reader_torn(t));
    cJSON *fd = cJSON_CreateObject();
    cJSON_AddStringToObject(fd, "name", "events.jsonl");
    cJSON_AddStringToObject(fd, "dtype", "u8");
    cJSON_AddItemToObject(fd, "shape", cJSON_CreateIntArray((const int[]){(int)sb.len}, 1));
    cJSON_AddItemToArray(cJSON_AddArrayToObject(h, "frames"), fd);
    kvm_trace_reader_free(t);
    int rc = send_hdr(x->s, x->m->peer, x->m->peer_len, h, sb.s ? sb.s : "", sb.len, true);
    kvm_sb_free(&sb);
    return rc;
}

/* trace.export: the run's trace as OTLP/JSON, Who&When or JSONL (kvm_trace_export), in one u8 frame. */
static int on_trace_export(ctx_t *x) {
    srun_t *r = run_named(x->s, x->q->run_id);
    if (!r) return reply_err(x, KVM_ENOENT, "run_id", "no run of that id", -1);
    if (!r->trace_dir) return reply_err(x, KVM_ENOENT, "run_id", "the daemon keeps no traces (start it with --trace DIR)", -1);
    kvm_trace_export_params_t p = kvm_trace_export_default_params();
    const char *fmt = x->q->format ? x->q->format : "otlp-json";
    p.format = kvm_trace_format_from_name(fmt); /* the decoder checked the name */
    char *text = NULL;
    size_t len = 0;
    if (p.format < 0 || kvm_trace_export(r->trace_dir, &p, &text, &len))
        return reply_err(x, kvm_errcode() ? kvm_errcode() : KVM_EIO, "run_id", kvm_errmsg(), -1);
    cJSON *h = hdr_new("ok", x->q->id, 0);
    cJSON_AddStringToObject(h, "run_id", r->run_id);
    cJSON_AddStringToObject(h, "format", fmt);
    cJSON *fd = cJSON_CreateObject();
    cJSON_AddStringToObject(fd, "name", p.format == KVM_TRACE_FORMAT_JSONL ? "events.jsonl" : p.format == KVM_TRACE_FORMAT_WHOWHEN ? "whowhen.json" : "otlp.json");
    cJSON_AddStringToObject(fd, "dtype", "u8");
    cJSON_AddItemToObject(fd, "shape", cJSON_CreateIntArray((const int[]){(int)len}, 1));
    cJSON_AddItemToArray(cJSON_AddArrayToObject(h, "frames"), fd);
    int rc = send_hdr(x->s, x->m->peer, x->m->peer_len, h, text, len, true);
    kvm_free(text);
    return rc;
}

static int on_stats(ctx_t *x) {
    kvm_server_t *s = x->s;
    cJSON *b = cJSON_CreateObject();
    cJSON_AddItemToObject(b, "runtime", parsed_or_null(kvm_runtime_stats_json(s->rt)));
    cJSON *sv = cJSON_AddObjectToObject(b, "server");
    cJSON_AddNumberToObject(sv, "clients", (double)kvm_map_len(&s->clients));
    cJSON_AddNumberToObject(sv, "workflows", (double)kvm_map_len(&s->wfs));
    cJSON_AddNumberToObject(sv, "runs_going", s->n_going);
    cJSON_AddNumberToObject(sv, "runs_started", (double)s->runs_started);
    cJSON_AddNumberToObject(sv, "runs_kept", s->n_runs);
    cJSON_AddNumberToObject(sv, "workflow_reloads", (double)s->reloads);
    cJSON_AddNumberToObject(sv, "workflows_retired", s->n_retired);
    cJSON_AddNumberToObject(sv, "errors_sent", (double)s->errors_sent);
    cJSON_AddNumberToObject(sv, "bad_requests", (double)s->bad_requests);
    cJSON *r = cJSON_AddObjectToObject(b, "reuse");
    cJSON_AddNumberToObject(r, "agent_steps", (double)s->agent_steps);
    cJSON_AddNumberToObject(r, "reuse_steps", (double)s->reuse_steps);
    cJSON_AddNumberToObject(r, "rate", s->agent_steps ? (double)s->reuse_steps / (double)s->agent_steps : 0.0);
    cJSON_AddNumberToObject(r, "tokens_in", (double)s->tokens_in);
    cJSON_AddNumberToObject(r, "tokens_exact", (double)s->tokens_exact);
    cJSON_AddNumberToObject(r, "tokens_offset", (double)s->tokens_offset);
    cJSON_AddNumberToObject(r, "tokens_recomputed", (double)s->tokens_recomputed);
    kvm_net_stats_t ns;
    kvm_net_stats(s->net, &ns);
    cJSON *n = cJSON_AddObjectToObject(b, "net");
    cJSON_AddNumberToObject(n, "received", (double)ns.received);
    cJSON_AddNumberToObject(n, "sent", (double)ns.sent);
    cJSON_AddNumberToObject(n, "queued", (double)ns.queued);
    cJSON_AddNumberToObject(n, "queued_now", ns.queued_now);
    cJSON_AddNumberToObject(n, "dropped_replies", (double)ns.dropped_replies);
    cJSON_AddNumberToObject(n, "dropped_events", (double)ns.dropped_events);
    cJSON_AddNumberToObject(n, "subscriptions", ns.subscriptions);
    cJSON_AddNumberToObject(n, "curve_denied", (double)ns.curve_denied);
    char buf[24];
    cJSON_AddStringToObject(n, "next_seq", u64_str(ns.next_seq, buf));
    serve_ext_stats(s->ext, b);
    return reply_ok(x, "ok", b);
}

/* ---- client tools (tool.register / tool.result) --------------------------------------------------------------
 * A client registers a tool (a name, a description, a JSON Schema) into the runtime; when a run calls it, the
 * daemon sends that client a `tool.call` message (id: the tool.register request's) and the node waits until the
 * client answers with a `tool.result` request. The wait ends with an error in the run when the run's wall-time
 * budget passes, when the run is canceled, or when the client is gone (silent for client_timeout_ms with calls
 * waiting, or forgotten as idle): its tools are removed then. */

typedef struct stool {
    kvm_server_t *s;
    char name[KVM_REQ_NAME_MAX + 1];
    uint8_t peer[PEER_MAX];  /* the client that serves it */
    size_t peer_len;
    char req_id[KVM_REQ_ID_MAX + 1]; /* its tool.register request: the id of its tool.call messages */
} stool_t;

typedef struct scall {
    uint64_t call_id;
    char run_id[KVM_REQ_ID_MAX + 1];
    stool_t *tool;
} scall_t;

static char *text_dup(const char *s) { return kvm_strdup(s); }

/* The runtime's tool callback for a client's tool: sends the call to the client and leaves it pending. */
static int client_tool(void *ud, const kvm_tool_call_t *call, char **result) {
    stool_t *t = ud;
    kvm_server_t *s = t->s;
    scall_t *c = kvm_calloc(1, sizeof *c);
    cJSON *args = cJSON_Parse(call->args_json);
    cJSON *h = hdr_new("tool.call", t->req_id, 0);
    if (!c || !args || !h || push_ptr((void ***)&s->calls, &s->n_calls, &s->cap_calls, c)) {
        kvm_free(c);
        cJSON_Delete(args);
        cJSON_Delete(h);
        *result = text_dup("out of memory sending the call to its client");
        return KVM_ENOMEM;
    }
    char buf[24];
    c->call_id = call->call_id;
    snprintf(c->run_id, sizeof c->run_id, "%s", call->run_id);
    c->tool = t;
    cJSON_AddStringToObject(h, "tool", t->name);
    cJSON_AddStringToObject(h, "call_id", u64_str(call->call_id, buf));
    cJSON_AddStringToObject(h, "run_id", call->run_id);
    cJSON_AddStringToObject(h, "node", call->node);
    cJSON_AddItemToObject(h, "args", args);
    if (call->ms_left >= 0) cJSON_AddNumberToObject(h, "ms_left", floor(call->ms_left));
    else cJSON_AddNullToObject(h, "ms_left");
    int rc = send_hdr(s, t->peer, t->peer_len, h, NULL, 0, true);
    if (rc) {
        s->n_calls--;
        kvm_free(c);
        char msg[256];
        snprintf(msg, sizeof msg, "the client serving it cannot be reached (%s)", kvm_errname(rc));
        *result = text_dup(msg);
        return KVM_EIO;
    }
    *result = NULL;
    return KVM_EBUSY;
}

/* Removes call i from the list (order kept). */
static void call_drop(kvm_server_t *s, int i) {
    kvm_free(s->calls[i]);
    memmove(&s->calls[i], &s->calls[i + 1], (size_t)(s->n_calls - i - 1) * sizeof *s->calls);
    s->n_calls--;
}

/* Ends every call of tool t waiting with msg, and unregisters t (its client is gone). */
static void tool_drop(kvm_server_t *s, int ti, const char *why) {
    stool_t *t = s->tools[ti];
    char msg[256];
    snprintf(msg, sizeof msg, "the client serving it %s", why);
    for (int i = 0; i < s->n_calls;) {
        if (s->calls[i]->tool != t) {
            i++;
            continue;
        }
        srun_t *r = run_named(s, s->calls[i]->run_id);
        if (r && r->r && !r->ended) kvm_run_tool_result(r->r, s->calls[i]->call_id, KVM_ECANCELED, msg);
        call_drop(s, i);
    }
    kvm_runtime_remove_tool(s->rt, t->name);
    kvm_free(t);
    memmove(&s->tools[ti], &s->tools[ti + 1], (size_t)(s->n_tools - ti - 1) * sizeof *s->tools);
    s->n_tools--;
}

/* Housekeeping of client tools: calls whose run ended are forgotten; the tools of a client forgotten as idle, or
 * silent for client_timeout_ms while calls of its tools wait, are removed (their waiting calls fail). */
static void tools_housekeeping(kvm_server_t *s, uint64_t now) {
    for (int i = 0; i < s->n_calls;) {
        srun_t *r = run_named(s, s->calls[i]->run_id);
        if (!r || r->ended || !r->r) call_drop(s, i);
        else i++;
    }
    for (int ti = 0; ti < s->n_tools;) {
        stool_t *t = s->tools[ti];
        sclient_t *c = client_of(s, t->peer, t->peer_len, false);
        bool waited = false;
        for (int i = 0; i < s->n_calls && !waited; i++) waited = s->calls[i]->tool == t;
        if (!c) tool_drop(s, ti, "is gone (forgotten after idle_client_ms)");
        else if (waited && s->p.client_timeout_ms > 0 && now - c->last_ns > (uint64_t)s->p.client_timeout_ms * 1000000u)
            tool_drop(s, ti, "sent nothing (not even a ping) for client_timeout_ms");
        else ti++;
    }
}

/* tool.register {name, description, schema}: the tool is the runtime's until its client is gone. */
static int on_tool_register(ctx_t *x) {
    kvm_server_t *s = x->s;
    stool_t *t = kvm_calloc(1, sizeof *t);
    if (!t || push_ptr((void ***)&s->tools, &s->n_tools, &s->cap_tools, t)) {
        kvm_free(t);
        return reply_err(x, KVM_ENOMEM, "", "out of memory", 100);
    }
    s->n_tools--; /* in the list only once registered */
    t->s = s;
    snprintf(t->name, sizeof t->name, "%s", x->q->name);
    memcpy(t->peer, x->m->peer, x->m->peer_len);
    t->peer_len = x->m->peer_len;
    snprintf(t->req_id, sizeof t->req_id, "%.64s", x->q->id);
    char *schema = x->q->schema ? cJSON_PrintUnformatted(x->q->schema) : NULL;
    if (x->q->schema && !schema) {
        kvm_free(t);
        return reply_err(x, KVM_ENOMEM, "", "out of memory", 100);
    }
    int rc = kvm_runtime_add_tool(s->rt, t->name, x->q->description, schema, client_tool, t);
    cJSON_free(schema);
    if (rc) {
        kvm_free(t);
        return reply_err(x, rc, strstr(kvm_errmsg(), ": schema") ? "schema" : "name", kvm_errmsg(), -1);
    }
    s->tools[s->n_tools++] = t;
    return reply_ok_str(x, "name", t->name);
}

/* tool.result {run_id, call_id, result | error}: the answer of the client a call was sent to. */
static int on_tool_result(ctx_t *x) {
    kvm_server_t *s = x->s;
    int i = 0;
    while (i < s->n_calls && !(s->calls[i]->call_id == x->q->call_id && !strcmp(s->calls[i]->run_id, x->q->run_id))) i++;
    if (i == s->n_calls)
        return reply_err(x, KVM_ENOENT, "call_id", "no call of that id waits in that run (answered already, or its run ended)", -1);
    const stool_t *t = s->calls[i]->tool;
    if (t->peer_len != x->m->peer_len || memcmp(t->peer, x->m->peer, t->peer_len))
        return reply_err(x, KVM_EINVAL, "call_id", "the call was sent to another client", -1);
    srun_t *r = run_named(s, x->q->run_id);
    uint64_t id = s->calls[i]->call_id;
    call_drop(s, i);
    if (!r || r->ended || !r->r) return reply_err(x, KVM_ESTALE, "run_id", "the run has ended", -1);
    char *v = x->q->value ? cJSON_PrintUnformatted(x->q->value) : NULL;
    if (x->q->value && !v) return reply_err(x, KVM_ENOMEM, "", "out of memory", 100);
    int rc = x->q->error ? kvm_run_tool_result(r->r, id, KVM_EIO, x->q->error) : kvm_run_tool_result(r->r, id, 0, v);
    cJSON_free(v);
    if (rc) return reply_err(x, rc, "call_id", kvm_errmsg(), -1);
    char buf[24];
    cJSON *b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "run_id", r->run_id);
    cJSON_AddStringToObject(b, "call_id", u64_str(id, buf));
    return reply_ok(x, "ok", b);
}

static int dispatch(ctx_t *x) {
    switch (x->q->type) {
    case KVM_REQ_HELLO: return on_hello(x);
    case KVM_REQ_PING: return on_ping(x);
    case KVM_REQ_STATS: return on_stats(x);
    case KVM_REQ_WORKFLOW_LOAD: return on_wf_load(x);
    case KVM_REQ_WORKFLOW_LIST: return on_wf_list(x);
    case KVM_REQ_WORKFLOW_DROP: return on_wf_drop(x);
    case KVM_REQ_RUN_START: return on_run_start(x);
    case KVM_REQ_RUN_CANCEL: return on_run_cancel(x);
    case KVM_REQ_RUN_RESUME: return on_run_resume(x);
    case KVM_REQ_RUN_STATUS: return on_run_status(x);
    case KVM_REQ_RUN_LIST: return on_run_list(x);
    case KVM_REQ_TRACE_GET: return on_trace_get(x);
    case KVM_REQ_TRACE_EXPORT: return on_trace_export(x);
    case KVM_REQ_TOOL_REGISTER: return on_tool_register(x);
    case KVM_REQ_TOOL_RESULT: return on_tool_result(x);
    default: return serve_req_dispatch(x);
    }
}

/* One message: decoded, then answered (exactly one terminal reply, now or at the run's end). */
static void serve_message(kvm_server_t *s, const kvm_net_msg_t *m) {
    uint64_t t0 = kvm_now_ns(), c0 = serve_cpu_ns();
    sclient_t *c = client_of(s, m->peer, m->peer_len, true);
    if (c) c->last_ns = kvm_now_ns();
    kvm_req_t q;
    kvm_req_error_t e;
    int rc = m->n_frames > KVM_NET_MAX_FRAMES
                 ? (e = (kvm_req_error_t){.code = KVM_EPROTO}, snprintf(e.message, sizeof e.message, "framing: more than %d frames", KVM_NET_MAX_FRAMES), KVM_EPROTO)
                 : kvm_req_decode(m->frames, m->n_frames, &s->lim, &q, &e);
    if (rc) {
        s->bad_requests++;
        send_error(s, m->peer, m->peer_len, e.has_id ? e.id : NULL, 0, e.code, e.field, e.message, -1, NULL);
        serve_overhead_note(s->ext, 0, kvm_now_ns() - t0, serve_cpu_ns() - c0);
        return;
    }
    uint64_t compute_ns = 0, compute_cpu_ns = 0;
    if (!c) {
        send_error(s, m->peer, m->peer_len, q.id, 0, KVM_ENOMEM, "", "out of memory tracking the client", 100, NULL);
    } else {
        ctx_t x = {s, m, c, &q, 0, 0};
        dispatch(&x);
        compute_ns = x.compute_ns;
        compute_cpu_ns = x.compute_cpu_ns;
    }
    int type = q.type;
    kvm_req_clear(&q);
    uint64_t ns = kvm_now_ns() - t0, cpu = serve_cpu_ns() - c0;
    serve_overhead_note(s->ext, type, ns > compute_ns ? ns - compute_ns : 0, cpu > compute_cpu_ns ? cpu - compute_cpu_ns : 0);
}

/* ---- the loop ------------------------------------------------------------------------------------------- */

static void cancel_run(srun_t *r, int code, const char *msg) {
    if (r->r && run_going(r)) kvm_run_cancel(r->r, code, msg);
}

/* Cancels asked from inside events, deadlines passed, clients gone silent, idle clients forgotten. */
static void housekeeping(kvm_server_t *s) {
    uint64_t now = kvm_now_ns();
    free_retired(s);
    for (int i = 0; i < s->n_going; i++) {
        srun_t *r = s->going[i];
        sclient_t *c = client_of(s, r->peer, r->peer_len, false);
        if (r->cancel_code) cancel_run(r, r->cancel_code, r->cancel_msg);
        else if (r->deadline_ns && now > r->deadline_ns) cancel_run(r, KVM_ETIMEDOUT, "deadline_ms passed");
        else if (s->p.client_timeout_ms > 0 && c && now - c->last_ns > (uint64_t)s->p.client_timeout_ms * 1000000u)
            cancel_run(r, KVM_ECANCELED, "the client sent nothing (not even a ping) for client_timeout_ms");
    }
    size_t it = 0;
    for (const kvm_map_entry_t *e; (e = kvm_map_next(&s->clients, &it));) {
        sclient_t *c = e->val.ptr;
        if (c->n_going || now - c->last_ns < (uint64_t)s->p.idle_client_ms * 1000000u) continue;
        kvm_net_forget(s->net, c->peer, c->peer_len);
        kvm_map_remove(&s->clients, c->peer, c->peer_len, NULL);
        kvm_free(c);
        it = 0; /* removal moves entries */
    }
    tools_housekeeping(s, now);
    if (now - s->t_heartbeat >= 1000000000u) {
        s->t_heartbeat = now;
        kvm_net_stats_t ns;
        kvm_net_stats(s->net, &ns);
        char buf[24];
        cJSON *b = cJSON_CreateObject();
        cJSON_AddNumberToObject(b, "v", 1);
        cJSON_AddStringToObject(b, "type", "heartbeat");
        cJSON_AddStringToObject(b, "seq", u64_str(ns.next_seq, buf));
        cJSON_AddStringToObject(b, "t_ns", u64_str(now, buf));
        cJSON_AddNumberToObject(b, "runs_going", s->n_going);
        publish(s, "heartbeat", b);
    }
}

/* Reads and answers the requests waiting (the first wait up to timeout_ms); <0 on a socket error. */
static int serve_requests(kvm_server_t *s, int timeout_ms) {
    for (int k = 0; k < 256; k++) {
        kvm_net_msg_t m;
        int rc = kvm_net_recv(s->net, k ? 0 : timeout_ms, &m);
        if (rc <= 0) return rc;
        serve_message(s, &m);
    }
    return 0;
}

/* Saves the runtime's state (a no-op without a state_dir) when runs started since the last save and save_state_ms
 * passed, or at the end (final). A failure is reported and serving goes on. */
static void save_state(kvm_server_t *s, bool final) {
    uint64_t now = kvm_now_ns();
    if (!s->t_saved) s->t_saved = now;
    bool due = s->p.save_state_ms > 0 && now - s->t_saved >= (uint64_t)s->p.save_state_ms * 1000000u;
    if (s->runs_started == s->runs_at_save || (!final && !due)) return;
    if (kvm_runtime_save_state(s->rt)) fprintf(stderr, "kvmesh serve: saving the state failed: %s\n", kvm_errmsg());
    s->t_saved = kvm_now_ns();
    s->runs_at_save = s->runs_started;
}

int kvm_server_run(kvm_server_t *s) {
    if (!s) return kvm_seterr(KVM_EINVAL, "kvm_server_run: no server");
    uint64_t drain_end = 0;
    for (;;) {
        if (s->stop && !s->draining) {
            s->draining = true;
            drain_end = kvm_now_ns() + (uint64_t)s->p.drain_ms * 1000000u;
            if (!s->p.quiet) fprintf(stderr, "kvmesh serve: stopping; %d run(s) going get %d ms to end\n", s->n_going, s->p.drain_ms);
        }
        int gens = serve_gens_going(s->ext);
        if (s->draining && s->n_going == 0 && gens == 0) break;
        if (s->draining && kvm_now_ns() > drain_end) {
            for (int i = 0; i < s->n_going; i++) cancel_run(s->going[i], KVM_ECANCELED, "the daemon is stopping");
            serve_gens_tick(s, true, "the daemon is stopping");
        }
        for (int i = 0; s->draining && i < s->n_going; i++) /* no answer will come: the trace keeps the question */
            if (s->going[i]->r && kvm_run_status(s->going[i]->r, NULL) == KVM_EINTERRUPTED)
                cancel_run(s->going[i], KVM_EINTERRUPTED, "the daemon stopped while the run waited for an answer: resume it "
                                                          "from its trace (kvmesh run --resume TRACE_DIR --answer VALUE)");
        /* runs parked in kvmesh.interrupt need no rounds until an answer comes: wait for requests then */
        int rc = serve_requests(s, kvm_runtime_n_active(s->rt) || kvm_runtime_n_generating(s->rt) ? 0 : 50);
        if (rc < 0) return rc;
        housekeeping(s); /* right after reading: a long engine round does not make clients look silent */
        serve_gens_tick(s, false, NULL);
        if ((s->n_going > 0 || kvm_runtime_n_generating(s->rt) > 0) && kvm_runtime_step(s->rt) < 0 && !s->p.quiet)
            fprintf(stderr, "kvmesh serve: engine failure (its runs ended with it): %s\n", kvm_errmsg());
        if (!s->n_going) save_state(s, false); /* between runs: a save does not hold up a run's tokens */
    }
    save_state(s, true);
    /* the last replies out of the queues, for up to a second */
    for (int i = 0; i < 100; i++) {
        kvm_net_stats_t ns;
        kvm_net_stats(s->net, &ns);
        if (!ns.queued_now) break;
        kvm_net_msg_t m;
        kvm_net_recv(s->net, 10, &m);
    }
    return 0;
}

void kvm_server_stop(kvm_server_t *s) {
    if (s) s->stop = 1;
}

kvm_server_t *kvm_server_create(kvm_runtime_t *rt, const kvm_server_params_t *params) {
    const kvm_server_params_t def = kvm_server_default_params();
    if (!params) params = &def;
    if (!rt) {
        kvm_seterr(KVM_EINVAL, "kvm_server_create: no runtime");
        return NULL;
    }
    if (params->max_runs < 1 || params->max_runs_per_client < 1 || params->keep_runs < 1 || params->drain_ms < 0) {
        kvm_seterr(KVM_EINVAL, "kvm_server_create: max_runs, max_runs_per_client and keep_runs must be >= 1, drain_ms >= 0");
        return NULL;
    }
    kvm_server_t *s = kvm_calloc(1, sizeof *s);
    if (!s) return NULL;
    s->rt = rt;
    s->p = *params;
    s->lim = kvm_req_default_limits();
    if (s->p.max_message_bytes) s->lim.max_message = s->p.max_message_bytes;
    if (s->p.max_source_bytes) s->lim.max_source = s->p.max_source_bytes;
    kvm_map_init(&s->wfs, KVM_MAP_STR);
    kvm_map_init(&s->by_id, KVM_MAP_STR_REF);
    kvm_map_init(&s->clients, KVM_MAP_STR);
    kvm_net_params_t np = {.bind = s->p.bind, .events = s->p.events, .allow_public = s->p.allow_public, .hwm = s->p.hwm,
                           .client_queue = s->p.client_queue, .curve_secret_file = s->p.curve_secret_file,
                           .curve_allow_file = s->p.curve_allow_file};
    s->net = kvm_net_create(&np);
    s->ext = s->net ? serve_ext_new() : NULL;
    if (!s->net || !s->ext) {
        kvm_server_free(s);
        return NULL;
    }
    return s;
}

int kvm_server_load_workflow(kvm_server_t *s, const char *name, const char *path) {
    if (!s || !name || !path) return kvm_seterr(KVM_EINVAL, "kvm_server_load_workflow: no server, name or path");
    size_t n = strlen(name);
    bool ok = n > 0 && n <= KVM_REQ_NAME_MAX && name[0] != '.';
    for (size_t i = 0; ok && i < n; i++) ok = strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.", name[i]) != NULL;
    if (!ok) return kvm_seterr(KVM_EINVAL, "workflow name '%s': 1 to 64 letters, digits, '_', '-' or '.', not starting with '.'", name);
    return add_workflow(s, name, path, NULL, 0);
}

const char *kvm_server_endpoint(const kvm_server_t *s, bool events) { return s ? kvm_net_endpoint(s->net, events) : ""; }

void kvm_server_free(kvm_server_t *s) {
    if (!s) return;
    /* generates still going end now (their events point at the server): canceled, they stop at their next token */
    serve_gens_tick(s, true, "the daemon is stopping");
    for (int i = 0; i < 100000 && kvm_runtime_n_generating(s->rt) > 0; i++)
        if (kvm_runtime_step(s->rt) < 0) break;
    size_t it = 0;
    for (const kvm_map_entry_t *e; (e = kvm_map_next(&s->wfs, &it));) swf_free(s, e->val.ptr);
    kvm_map_free(&s->wfs);
    for (int i = 0; i < s->n_retired; i++) swf_free(s, s->retired[i]);
    kvm_free(s->retired);
    for (int i = 0; i < s->n_runs; i++) srun_free(s->runs[i]);
    kvm_free(s->runs);
    kvm_free(s->going);
    kvm_map_free(&s->by_id);
    it = 0;
    for (const kvm_map_entry_t *e; (e = kvm_map_next(&s->clients, &it));) kvm_free(e->val.ptr);
    kvm_map_free(&s->clients);
    for (int i = 0; i < s->n_calls; i++) kvm_free(s->calls[i]);
    kvm_free(s->calls);
    for (int i = 0; i < s->n_tools; i++) {
        kvm_runtime_remove_tool(s->rt, s->tools[i]->name);
        kvm_free(s->tools[i]);
    }
    kvm_free(s->tools);
    kvm_net_free(s->net);
    serve_ext_free(s->ext);
    kvm_free(s);
}

/* ---- for serve_req.c (serve_internal.h) ------------------------------------------------------------------ */

cJSON *serve_hdr_new(const char *type, const char *id, uint64_t seq) { return hdr_new(type, id, seq); }

int serve_send_hdr(kvm_server_t *s, const uint8_t *peer, size_t peer_len, cJSON *h, const void *payload, size_t plen,
                   bool terminal) {
    return send_hdr(s, peer, peer_len, h, payload, plen, terminal);
}

int serve_send_frames(kvm_server_t *s, const uint8_t *peer, size_t peer_len, cJSON *h, const kvm_req_frame_t *pay,
                      int n_pay, bool terminal) {
    return send_frames(s, peer, peer_len, h, pay, n_pay, terminal);
}

int serve_send_error(ctx_t *x, uint64_t seq, int code, const char *field, const char *message) {
    return send_error(x->s, x->m->peer, x->m->peer_len, x->q->id, seq, code, field, message, -1, NULL);
}

int serve_reply_ok(ctx_t *x, const char *type, cJSON *body) { return reply_ok(x, type, body); }
int serve_reply_ok_str(ctx_t *x, const char *key, const char *value) { return reply_ok_str(x, key, value); }
cJSON *serve_add_usage(cJSON *o, double in, double out) { return add_usage(o, in, out); }

cJSON *serve_add_step_timings(cJSON *o, double queue_ms, double ttft_ms, double decode_ms) {
    return add_step_timings(o, queue_ms, ttft_ms, decode_ms);
}

int serve_reply_err(ctx_t *x, int code, const char *field, const char *msg, int retry_after_ms) {
    return reply_err(x, code, field, msg, retry_after_ms);
}

kvm_runtime_t *serve_runtime(kvm_server_t *s) { return s->rt; }
bool serve_draining(const kvm_server_t *s) { return s->draining; }

serve_ext_t *serve_ext(kvm_server_t *s) { return s->ext; }

int serve_run_trace(kvm_server_t *s, const char *run_id, const char **trace_dir, bool *ended) {
    const srun_t *r = run_named(s, run_id);
    if (!r) return KVM_ENOENT;
    *trace_dir = r->trace_dir;
    *ended = r->ended;
    return 0;
}
