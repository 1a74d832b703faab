/* serve_req.c - the daemon's requests besides workflows and runs (docs/protocol.md): model.load / model.unload /
 * model.list, generate (a model's tokens streamed straight, no workflow: a job of the runtime's engine) and
 * generate.cancel, segment.put / get / drop (KV segments
 * kept by the daemon, checked against a loaded model, given back byte for byte), attribute (blame of an ended
 * run), the error-schema cache (cache.stats / show / pin / evict / label), and the daemon's own time per request
 * (the overhead histograms `stats` reports). Everything through the public API (include/kvmesh.h); the decoder
 * (runtime/net/request.c, decode_models) has checked every field before a handler runs. */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "../runtime/core/core.h"
#include "../runtime/core/map.h"
#include "serve_internal.h"

/* ---- the overhead histograms ------------------------------------------------------------------------------
 * Nanoseconds in log-linear buckets: exact below 64 ns, then 32 buckets per power of two (at most 1/32 = 3%
 * above the true value), up to 2^41 ns (~37 min). Percentiles report a bucket's upper bound; max is exact. */

#define HIST_SUB 32
#define HIST_TOP 41
#define HIST_N (64 + (HIST_TOP - 5) * HIST_SUB)
#define N_TYPES 64 /* enum kvm_req_type values (0: undecodable requests) */

typedef struct hist {
    uint64_t n, max_ns, sum_ns;
    uint64_t b[HIST_N];
} hist_t;

static int hist_bucket(uint64_t v) {
    if (v < 64) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    if (msb >= HIST_TOP) return HIST_N - 1;
    int shift = msb - 5; /* v >> shift in [32, 64) */
    return 64 + (shift - 1) * HIST_SUB + (int)((v >> shift) - HIST_SUB);
}

/* The largest value of bucket i. */
static uint64_t hist_upper(int i) {
    if (i < 64) return (uint64_t)i;
    int shift = (i - 64) / HIST_SUB + 1, sub = (i - 64) % HIST_SUB;
    return (((uint64_t)(HIST_SUB + sub + 1)) << shift) - 1;
}

static uint64_t hist_quantile(const hist_t *h, double q) {
    if (!h->n) return 0;
    uint64_t want = (uint64_t)(q * (double)h->n + 0.999999), seen = 0;
    if (want < 1) want = 1;
    for (int i = 0; i < HIST_N; i++)
        if ((seen += h->b[i]) >= want) return hist_upper(i) < h->max_ns ? hist_upper(i) : h->max_ns;
    return h->max_ns;
}

static void hist_add(hist_t *h, uint64_t ns) {
    h->n++;
    h->sum_ns += ns;
    if (ns > h->max_ns) h->max_ns = ns;
    h->b[hist_bucket(ns)]++;
}

/* ---- the extension's state ------------------------------------------------------------------------------ */

typedef struct smodel {
    kvm_model_t *m;
    char *name, *path;
    const char *kv_dtype; /* the KV cache's dtype: the backend's default (f32 on the CPU, bf16 on a GPU) */
    long generates;
    uint64_t tokens_out;
} smodel_t;

/* A KV segment put by a client: token ids and K / V, [layers][kv_heads][T][head_dim] each, in the model's cache
 * dtype, as they came (little-endian). */
typedef struct sseg {
    char *id, *model;
    int frame, layers, kv_heads, head_dim, n_tokens;
    const char *dtype;
    void *ids, *k, *v;       /* one allocation, at ids */
    size_t kv_bytes;
} sseg_t;

#define SEG_MAX_BYTES ((size_t)1 << 30) /* all segments together */

/* A generate going: a job of the runtime's engine, answered from its events. */
typedef struct sgen {
    kvm_server_t *s;
    serve_ext_t *e;
    uint8_t *peer;
    size_t peer_len;
    char req_id[KVM_REQ_ID_MAX + 1];
    char *model;             /* the model's name */
    uint64_t job, seq, t0;
    int stop_code;           /* set from a token event (the client gone or too slow): canceled at the next tick */
    const char *stop_msg;
    bool stop_sent;
    struct sgen *next;
} sgen_t;

static void sgen_free(sgen_t *g) {
    if (!g) return;
    kvm_free(g->peer);
    kvm_free(g->model);
    kvm_free(g);
}

struct serve_ext {
    kvm_map_t models;        /* name -> smodel_t * */
    kvm_map_t segs;          /* segment id -> sseg_t * */
    size_t seg_bytes;
    hist_t *hist[N_TYPES];   /* wall time per request type, made on first use */
    hist_t *cpu[N_TYPES];    /* the thread's CPU time, likewise */
    hist_t all, all_cpu;
    uint64_t generates, generate_tokens, generate_errors, generate_canceled, generate_timed_out;
    struct sgen *gens;       /* generates going (jobs of the runtime's engine) */
    int n_gens;
};

serve_ext_t *serve_ext_new(void) {
    serve_ext_t *e = kvm_calloc(1, sizeof *e);
    if (e) {
        kvm_map_init(&e->models, KVM_MAP_STR);
        kvm_map_init(&e->segs, KVM_MAP_STR);
    }
    return e;
}

static size_t sseg_bytes(const sseg_t *g) { return (size_t)g->n_tokens * 4 + 2 * g->kv_bytes; }

static void sseg_free(sseg_t *g) {
    if (!g) return;
    kvm_free(g->id);
    kvm_free(g->model);
    kvm_free(g->ids);
    kvm_free(g);
}

static void smodel_free(smodel_t *m) {
    if (!m) return;
    kvm_model_free(m->m);
    kvm_free(m->name);
    kvm_free(m->path);
    kvm_free(m);
}

void serve_ext_free(serve_ext_t *e) {
    if (!e) return;
    while (e->gens) { /* only when the runtime could not end them (serve_gens_tick + kvm_runtime_step) */
        sgen_t *g = e->gens;
        e->gens = g->next;
        sgen_free(g);
    }
    size_t it = 0;
    for (const kvm_map_entry_t *x; (x = kvm_map_next(&e->models, &it));) smodel_free(x->val.ptr);
    kvm_map_free(&e->models);
    it = 0;
    for (const kvm_map_entry_t *x; (x = kvm_map_next(&e->segs, &it));) sseg_free(x->val.ptr);
    kvm_map_free(&e->segs);
    for (int i = 0; i < N_TYPES; i++) {
        kvm_free(e->hist[i]);
        kvm_free(e->cpu[i]);
    }
    kvm_free(e);
}

uint64_t serve_cpu_ns(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)) return 0;
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void serve_overhead_note(serve_ext_t *e, int type, uint64_t wall_ns, uint64_t cpu_ns) {
    if (!e || type < 0 || type >= N_TYPES) return;
    if (!e->hist[type]) e->hist[type] = kvm_calloc(1, sizeof(hist_t)); /* out of memory: only "all" counts it */
    if (!e->cpu[type]) e->cpu[type] = kvm_calloc(1, sizeof(hist_t));
    if (e->hist[type]) hist_add(e->hist[type], wall_ns);
    if (e->cpu[type]) hist_add(e->cpu[type], cpu_ns);
    hist_add(&e->all, wall_ns);
    hist_add(&e->all_cpu, cpu_ns);
}

static cJSON *hist_json(const hist_t *h, const hist_t *cpu) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "n", (double)h->n);
    cJSON_AddNumberToObject(o, "mean_us", h->n ? (double)h->sum_ns / (double)h->n / 1e3 : 0.0);
    cJSON_AddNumberToObject(o, "p50_us", (double)hist_quantile(h, 0.50) / 1e3);
    cJSON_AddNumberToObject(o, "p99_us", (double)hist_quantile(h, 0.99) / 1e3);
    cJSON_AddNumberToObject(o, "max_us", (double)h->max_ns / 1e3);
    if (cpu) {
        cJSON_AddNumberToObject(o, "cpu_p50_us", (double)hist_quantile(cpu, 0.50) / 1e3);
        cJSON_AddNumberToObject(o, "cpu_p99_us", (double)hist_quantile(cpu, 0.99) / 1e3);
        cJSON_AddNumberToObject(o, "cpu_max_us", (double)cpu->max_ns / 1e3);
    }
    return o;
}

static cJSON *model_info_json(const smodel_t *sm) {
    kvm_model_info_t in;
    kvm_model_info(sm->m, &in);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "name", sm->name);
    cJSON_AddStringToObject(o, "path", sm->path);
    cJSON_AddStringToObject(o, "arch", in.arch ? in.arch : "");
    cJSON_AddStringToObject(o, "backend", in.backend ? in.backend : "");
    cJSON_AddStringToObject(o, "chat_format", in.chat_format ? in.chat_format : "");
    cJSON_AddStringToObject(o, "weight_dtype", in.weight_dtype ? in.weight_dtype : "");
    cJSON_AddStringToObject(o, "kv_dtype", sm->kv_dtype);
    cJSON_AddNumberToObject(o, "n_layers", in.n_layers);
    cJSON_AddNumberToObject(o, "n_kv_heads", in.n_kv_heads);
    cJSON_AddNumberToObject(o, "head_dim", in.head_dim);
    cJSON_AddNumberToObject(o, "vocab_size", in.vocab_size);
    cJSON_AddNumberToObject(o, "max_context", in.max_context);
    cJSON_AddBoolToObject(o, "tokenizer", kvm_model_tokenizer(sm->m) != NULL);
    cJSON_AddNumberToObject(o, "generates", (double)sm->generates);
    cJSON_AddNumberToObject(o, "tokens_out", (double)sm->tokens_out);
    return o;
}

void serve_ext_stats(const serve_ext_t *e, cJSON *b) {
    if (!e) return;
    cJSON *o = cJSON_AddObjectToObject(b, "overhead");
    cJSON_AddStringToObject(o, "what", "daemon time per request outside model compute: decode, handler, encode, send "
                                       "(wall time; cpu_*: the daemon thread's CPU time)");
    cJSON_AddItemToObject(o, "all", hist_json(&e->all, &e->all_cpu));
    cJSON *by = cJSON_AddObjectToObject(o, "by_type");
    for (int t = 0; t < N_TYPES; t++)
        if (e->hist[t]) cJSON_AddItemToObject(by, t ? (kvm_req_type_name(t) ? kvm_req_type_name(t) : "?") : "(undecodable)", hist_json(e->hist[t], e->cpu[t]));
    cJSON *g = cJSON_AddObjectToObject(b, "generate");
    cJSON_AddNumberToObject(g, "requests", (double)e->generates);
    cJSON_AddNumberToObject(g, "tokens_out", (double)e->generate_tokens);
    cJSON_AddNumberToObject(g, "going", e->n_gens);
    cJSON_AddNumberToObject(g, "errors", (double)e->generate_errors);
    cJSON_AddNumberToObject(g, "canceled", (double)e->generate_canceled);
    cJSON_AddNumberToObject(g, "timed_out", (double)e->generate_timed_out);
    cJSON_AddNumberToObject(g, "models", (double)kvm_map_len(&e->models));
    cJSON *sg = cJSON_AddObjectToObject(b, "segments");
    cJSON_AddNumberToObject(sg, "count", (double)kvm_map_len(&e->segs));
    cJSON_AddNumberToObject(sg, "bytes", (double)e->seg_bytes);
    cJSON_AddNumberToObject(sg, "max_bytes", (double)SEG_MAX_BYTES);
}

/* ---- models ---------------------------------------------------------------------------------------------- */

static smodel_t *model_named(serve_ext_t *e, const char *name) {
    kvm_mapval_t v;
    return kvm_map_get_str(&e->models, name, &v) ? v.ptr : NULL;
}

static int on_model_load(ctx_t *x) {
    serve_ext_t *e = serve_ext(x->s);
    const kvm_req_t *q = x->q;
    if (model_named(e, q->model)) return serve_reply_err(x, KVM_EINVAL, "name", "a model of that name is loaded (unload it first)", -1);
    kvm_model_params_t mp = kvm_model_default_params();
    mp.backend = q->backend ? q->backend : "auto";
    mp.quiet = true;
    smodel_t *sm = kvm_calloc(1, sizeof *sm);
    if (!sm || !(sm->name = kvm_strdup(q->model)) || !(sm->path = kvm_strdup(q->path))) {
        smodel_free(sm);
        return serve_reply_err(x, KVM_ENOMEM, "", "out of memory", 100);
    }
    uint64_t t0 = kvm_now_ns(), c0 = serve_cpu_ns();
    kvm_errclear();
    sm->m = kvm_model_load(q->path, &mp);
    x->compute_ns = kvm_now_ns() - t0; /* reading weights is model work, not the daemon's overhead */
    x->compute_cpu_ns = serve_cpu_ns() - c0;
    if (!sm->m) {
        int code = kvm_errcode() ? kvm_errcode() : KVM_EIO;
        char msg[512];
        snprintf(msg, sizeof msg, "model.load '%s': %s", q->path, kvm_errmsg());
        smodel_free(sm);
        return serve_reply_err(x, code, "path", msg, -1);
    }
    kvm_model_info_t in;
    kvm_model_info(sm->m, &in);
    sm->kv_dtype = in.backend && !strcmp(in.backend, "cpu") ? "f32" : "bf16";
    if (kvm_map_put_str(&e->models, sm->name, KVM_MAPVAL_PTR(sm))) {
        smodel_free(sm);
        return serve_reply_err(x, KVM_ENOMEM, "", "out of memory", 100);
    }
    return serve_reply_ok(x, "ok", model_info_json(sm));
}

/* A model with generates going is not unloaded (KVM_EBUSY: cancel them or wait). The engine's instance of the model
 * (what generates run on, shared with workflows naming its path) stays open until the daemon exits. */
static int on_model_unload(ctx_t *x) {
    serve_ext_t *e = serve_ext(x->s);
    smodel_t *sm = model_named(e, x->q->model);
    if (!sm) return serve_reply_err(x, KVM_ENOENT, "name", "no model of that name (model.list lists them)", -1);
    for (sgen_t *g = e->gens; g; g = g->next)
        if (!strcmp(g->model, sm->name))
            return serve_reply_err(x, KVM_EBUSY, "name", "generates of the model are going (generate.cancel them, or wait)", 100);
    kvm_map_remove_str(&e->models, x->q->model, NULL);
    int dropped = 0; /* its segments go with it (another model may take the name) */
    for (size_t it = 0;;) {
        const kvm_map_entry_t *m = kvm_map_next(&e->segs, &it);
        if (!m) break;
        sseg_t *g = m->val.ptr;
        if (strcmp(g->model, sm->name)) continue;
        e->seg_bytes -= sseg_bytes(g);
        kvm_map_remove_str(&e->segs, g->id, NULL);
        sseg_free(g);
        dropped++;
        it = 0; /* removal moves entries */
    }
    cJSON *b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "name", sm->name);
    cJSON_AddNumberToObject(b, "generates", (double)sm->generates);
    cJSON_AddNumberToObject(b, "segments_dropped", dropped);
    smodel_free(sm);
    return serve_reply_ok(x, "ok", b);
}

static int on_model_list(ctx_t *x) {
    serve_ext_t *e = serve_ext(x->s);
    cJSON *b = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(b, "models");
    size_t it = 0;
    for (const kvm_map_entry_t *m; (m = kvm_map_next(&e->models, &it));) cJSON_AddItemToArray(arr, model_info_json(m->val.ptr));
    return serve_reply_ok(x, "ok", b);
}

/* ---- generate --------------------------------------------------------------------------------------------
 * A generate is a job of the runtime's engine (kvm_runtime_generate): batched with the runs' agent steps, its KV from
 * the model's pool, advanced by kvm_runtime_step in the daemon's loop, so the daemon keeps serving while it runs. Its
 * tokens and its end come back as events (gen_event); a generate.cancel, a deadline, a client gone or too slow end it,
 * and its KV goes back at once. */

static void gen_unlink(serve_ext_t *e, sgen_t *g) {
    for (sgen_t **p = &e->gens; *p; p = &(*p)->next)
        if (*p == g) {
            *p = g->next;
            e->n_gens--;
            return;
        }
}

static void gen_event(void *ud, const kvm_gen_event_t *ev) {
    sgen_t *g = ud;
    serve_ext_t *e = g->e;
    if (ev->kind == KVM_RUN_TOKEN) {
        if (g->stop_code) return;
        cJSON *h = serve_hdr_new("token", g->req_id, g->seq++);
        char *t = kvm_strndup(ev->text ? ev->text : "", ev->len);
        cJSON_AddStringToObject(h, "agent", g->model);
        cJSON_AddStringToObject(h, "text", t ? t : "");
        cJSON_AddNumberToObject(h, "token_id", ev->token_id);
        kvm_free(t);
        int rc = serve_send_hdr(g->s, g->peer, g->peer_len, h, NULL, 0, false);
        if (rc == KVM_ESLOWCLIENT) g->stop_code = KVM_ESLOWCLIENT, g->stop_msg = "the client did not read its stream fast enough";
        else if (rc == KVM_ENOENT) g->stop_code = KVM_ECANCELED, g->stop_msg = "the client is gone";
        return;
    }
    gen_unlink(e, g);
    smodel_t *sm = model_named(e, g->model);
    if (sm) sm->generates++;
    e->generates++;
    uint64_t t1 = kvm_now_ns();
    if (ev->status) {
        e->generate_errors++;
        if (ev->status == KVM_ECANCELED) e->generate_canceled++;
        if (ev->status == KVM_ETIMEDOUT) e->generate_timed_out++;
        ctx_t x = {.s = g->s};
        kvm_net_msg_t m = {0};
        m.peer = g->peer;
        m.peer_len = g->peer_len;
        kvm_req_t q = {0};
        snprintf(q.id, sizeof q.id, "%s", g->req_id);
        x.m = &m;
        x.q = &q;
        serve_send_error(&x, g->seq, ev->status, "", ev->message ? ev->message : kvm_strerror(ev->status));
        sgen_free(g);
        return;
    }
    if (sm) sm->tokens_out += (uint64_t)ev->n_ids;
    e->generate_tokens += (uint64_t)ev->n_ids;
    cJSON *h = serve_hdr_new("done", g->req_id, g->seq++);
    cJSON_AddStringToObject(h, "model", g->model);
    cJSON_AddStringToObject(h, "text", ev->text ? ev->text : "");
    cJSON_AddItemToObject(h, "token_ids", cJSON_CreateIntArray(ev->ids ? ev->ids : (const int[]){0}, ev->ids ? ev->n_ids : 0));
    cJSON_AddStringToObject(h, "stop_reason", kvm_stop_reason_name(ev->stop_reason));
    cJSON_AddNumberToObject(serve_add_usage(h, ev->n_prompt, ev->n_ids), "input_tokens_reused", ev->kv_exact);
    cJSON_AddNumberToObject(serve_add_step_timings(h, ev->queue_ms, ev->ttft_ms, ev->decode_ms), "total_ms",
                            (double)(t1 - g->t0) / 1e6);
    serve_send_hdr(g->s, g->peer, g->peer_len, h, NULL, 0, true);
    sgen_free(g);
}

static int on_generate(ctx_t *x) {
    serve_ext_t *e = serve_ext(x->s);
    const kvm_req_t *q = x->q;
    if (serve_draining(x->s)) return serve_reply_err(x, KVM_EBUSY, "", "the daemon is stopping: no new generates", -1);
    smodel_t *sm = model_named(e, q->model);
    if (!sm) return serve_reply_err(x, KVM_ENOENT, "model", "no model of that name (load it with model.load)", -1);
    if (q->prompt && !kvm_model_tokenizer(sm->m))
        return serve_reply_err(x, KVM_EINVAL, "prompt", "the model has no tokenizer: send a token_ids frame", -1);
    for (sgen_t *o = e->gens; o; o = o->next)
        if (o->peer_len == x->m->peer_len && !memcmp(o->peer, x->m->peer, o->peer_len) && !strcmp(o->req_id, q->id))
            return serve_reply_err(x, KVM_EINVAL, "id", "a generate of this id is going (ids name a client's generates for generate.cancel)", -1);
    int32_t *ids = NULL;
    if (q->token_ids) {
        ids = kvm_malloc((size_t)q->n_token_ids * sizeof *ids);
        if (!ids) return serve_reply_err(x, KVM_ENOMEM, "", "out of memory", 100);
        memcpy(ids, q->token_ids, (size_t)q->n_token_ids * sizeof *ids); /* the frame is not aligned; little-endian host */
    }
    sgen_t *g = kvm_calloc(1, sizeof *g);
    if (!g || !(g->peer = kvm_malloc(x->m->peer_len ? x->m->peer_len : 1)) || !(g->model = kvm_strdup(sm->name))) {
        kvm_free(ids);
        sgen_free(g);
        return serve_reply_err(x, KVM_ENOMEM, "", "out of memory", 100);
    }
    memcpy(g->peer, x->m->peer, x->m->peer_len);
    g->peer_len = x->m->peer_len;
    snprintf(g->req_id, sizeof g->req_id, "%s", q->id);
    g->s = x->s;
    g->e = e;
    g->t0 = kvm_now_ns();
    kvm_gen_request_t r = {.model = sm->path, .prompt = ids ? NULL : q->prompt, .ids = ids, .n_ids = ids ? q->n_token_ids : 0,
                           .params = kvm_generate_default_params(), .deadline_ms = q->deadline_ms > 0 ? (double)q->deadline_ms : 0,
                           .on_event = gen_event, .ud = g};
    r.params.max_tokens = q->max_tokens;
    r.params.temperature = (float)q->temperature;
    r.params.top_p = (float)q->top_p;
    r.params.seed = q->seed;
    r.params.stop = q->stop;
    r.params.n_stop = q->n_stop;
    r.params.chat = q->chat;
    r.params.ignore_eos = q->ignore_eos;
    kvm_errclear();
    uint64_t t0 = kvm_now_ns(), c0 = serve_cpu_ns();
    int rc = kvm_runtime_generate(serve_runtime(x->s), &r, &g->job);
    x->compute_ns = kvm_now_ns() - t0; /* opening the model in the engine (first generate) and encoding the prompt */
    x->compute_cpu_ns = serve_cpu_ns() - c0;
    kvm_free(ids);
    if (rc) {
        sgen_free(g);
        const char *field = rc == KVM_ERANGE || rc == KVM_EINVAL ? (q->token_ids ? "frames[0]" : "prompt") : "";
        return serve_reply_err(x, rc, field, kvm_errmsg(), -1);
    }
    g->next = e->gens;
    e->gens = g;
    e->n_gens++;
    return 0; /* answered by its events */
}

/* generate.cancel {request_id}: a generate of the same client, by the id of its request. */
static int on_generate_cancel(ctx_t *x) {
    serve_ext_t *e = serve_ext(x->s);
    for (sgen_t *g = e->gens; g; g = g->next) {
        if (g->peer_len != x->m->peer_len || memcmp(g->peer, x->m->peer, g->peer_len) || strcmp(g->req_id, x->q->run_id)) continue;
        int rc = kvm_runtime_generate_cancel(serve_runtime(x->s), g->job, KVM_ECANCELED, "canceled by generate.cancel");
        if (rc) return serve_reply_err(x, rc, "request_id", kvm_errmsg(), -1);
        cJSON *b = cJSON_CreateObject();
        cJSON_AddStringToObject(b, "request_id", g->req_id);
        cJSON_AddBoolToObject(b, "canceled", true);
        return serve_reply_ok(x, "ok", b);
    }
    return serve_reply_err(x, KVM_ENOENT, "request_id", "no generate of that id going for this client", -1);
}

int serve_gens_going(const serve_ext_t *e) { return e ? e->n_gens : 0; }

void serve_gens_tick(kvm_server_t *s, bool cancel_all, const char *why) {
    serve_ext_t *e = serve_ext(s);
    for (sgen_t *g = e ? e->gens : NULL; g; g = g->next) {
        if (g->stop_sent || !(g->stop_code || cancel_all)) continue;
        g->stop_sent = true;
        kvm_runtime_generate_cancel(serve_runtime(s), g->job, g->stop_code ? g->stop_code : KVM_ECANCELED, g->stop_code ? g->stop_msg : why);
    }
}

/* ---- segments --------------------------------------------------------------------------------------------- */

static sseg_t *seg_named(serve_ext_t *e, const char *id) {
    kvm_mapval_t v;
    return kvm_map_get_str(&e->segs, id, &v) ? v.ptr : NULL;
}

/* segment.put: the decoder checked the frames against the header; here the header against the model. */
static int on_segment_put(ctx_t *x) {
    serve_ext_t *e = serve_ext(x->s);
    const kvm_req_t *q = x->q;
    if (seg_named(e, q->segment_id)) return serve_reply_err(x, KVM_EINVAL, "segment_id", "a segment of that id exists (segment.drop it first)", -1);
    smodel_t *sm = model_named(e, q->model);
    if (!sm) return serve_reply_err(x, KVM_ENOENT, "model", "no model of that name (load it with model.load)", -1);
    kvm_model_info_t in;
    kvm_model_info(sm->m, &in);
    char msg[256];
    const struct {
        const char *field;
        int got, want;
    } dims[] = {{"layers", q->layers, in.n_layers}, {"kv_heads", q->kv_heads, in.n_kv_heads}, {"head_dim", q->head_dim, in.head_dim}};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
        if (dims[i].got != dims[i].want) {
            snprintf(msg, sizeof msg, "segment.put: %s is %d, model '%s' has %d", dims[i].field, dims[i].got, sm->name, dims[i].want);
            return serve_reply_err(x, KVM_ESHAPE, dims[i].field, msg, -1);
        }
    if (strcmp(q->dtype, sm->kv_dtype)) {
        snprintf(msg, sizeof msg, "segment.put: dtype %s, but model '%s' keeps its KV in %s", q->dtype, sm->name, sm->kv_dtype);
        return serve_reply_err(x, KVM_EDTYPE, "dtype", msg, -1);
    }
    if ((int64_t)q->frame + q->n_tokens > in.max_context) {
        snprintf(msg, sizeof msg, "segment.put: frame %d + %d tokens is past the model's context of %d", q->frame, q->n_tokens, in.max_context);
        return serve_reply_err(x, KVM_ERANGE, "frame", msg, -1);
    }
    for (int i = 0; i < q->n_tokens; i++) {
        int32_t id;
        memcpy(&id, (const uint8_t *)q->seg_ids + (size_t)i * 4, 4);
        if (id < 0 || id >= in.vocab_size) {
            snprintf(msg, sizeof msg, "segment.put: token id %d at index %d is outside [0, %d)", (int)id, i, in.vocab_size);
            return serve_reply_err(x, KVM_ERANGE, "frames[0]", msg, -1);
        }
    }
    size_t bytes = (size_t)q->n_tokens * 4 + 2 * q->seg_kv_bytes;
    if (e->seg_bytes + bytes > SEG_MAX_BYTES) {
        snprintf(msg, sizeof msg, "segment.put: the segments would take %zu bytes, over the daemon's %zu (drop some)", e->seg_bytes + bytes, SEG_MAX_BYTES);
        return serve_reply_err(x, KVM_ENOMEM, "", msg, -1);
    }
    sseg_t *g = kvm_calloc(1, sizeof *g);
    if (!g || !(g->id = kvm_strdup(q->segment_id)) || !(g->model = kvm_strdup(sm->name)) || !(g->ids = kvm_malloc(bytes)) ||
        kvm_map_put_str(&e->segs, g->id, KVM_MAPVAL_PTR(g))) {
        sseg_free(g);
        return serve_reply_err(x, KVM_ENOMEM, "", "out of memory keeping the segment", 100);
    }
    g->frame = q->frame;
    g->layers = q->layers;
    g->kv_heads = q->kv_heads;
    g->head_dim = q->head_dim;
    g->n_tokens = q->n_tokens;
    g->dtype = sm->kv_dtype;
    g->kv_bytes = q->seg_kv_bytes;
    g->k = (uint8_t *)g->ids + (size_t)q->n_tokens * 4;
    g->v = (uint8_t *)g->k + g->kv_bytes;
    memcpy(g->ids, q->seg_ids, (size_t)q->n_tokens * 4);
    memcpy(g->k, q->seg_k, g->kv_bytes);
    memcpy(g->v, q->seg_v, g->kv_bytes);
    e->seg_bytes += bytes;
    cJSON *b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "segment_id", g->id);
    cJSON_AddStringToObject(b, "model", g->model);
    cJSON_AddNumberToObject(b, "tokens", g->n_tokens);
    cJSON_AddNumberToObject(b, "bytes", (double)bytes);
    return serve_reply_ok(x, "ok", b);
}

static cJSON *frame_desc(const char *name, const char *dtype, const int *shape, int n) {
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "name", name);
    cJSON_AddStringToObject(d, "dtype", dtype);
    cJSON_AddItemToObject(d, "shape", cJSON_CreateIntArray(shape, n));
    return d;
}

static int on_segment_get(ctx_t *x) {
    sseg_t *g = seg_named(serve_ext(x->s), x->q->segment_id);
    if (!g) return serve_reply_err(x, KVM_ENOENT, "segment_id", "no segment of that id", -1);
    cJSON *h = serve_hdr_new("ok", x->q->id, 0);
    cJSON_AddStringToObject(h, "segment_id", g->id);
    cJSON_AddStringToObject(h, "model", g->model);
    cJSON_AddNumberToObject(h, "frame", g->frame);
    cJSON_AddStringToObject(h, "dtype", g->dtype);
    cJSON_AddNumberToObject(h, "layers", g->layers);
    cJSON_AddNumberToObject(h, "kv_heads", g->kv_heads);
    cJSON_AddNumberToObject(h, "head_dim", g->head_dim);
    cJSON_AddNumberToObject(h, "tokens", g->n_tokens);
    const int kv_shape[4] = {g->layers, g->kv_heads, g->n_tokens, g->head_dim};
    cJSON *fr = cJSON_AddArrayToObject(h, "frames");
    cJSON_AddItemToArray(fr, frame_desc("token_ids", "i32", &g->n_tokens, 1));
    cJSON_AddItemToArray(fr, frame_desc("k", g->dtype, kv_shape, 4));
    cJSON_AddItemToArray(fr, frame_desc("v", g->dtype, kv_shape, 4));
    const kvm_req_frame_t pay[3] = {{g->ids, (size_t)g->n_tokens * 4}, {g->k, g->kv_bytes}, {g->v, g->kv_bytes}};
    return serve_send_frames(x->s, x->m->peer, x->m->peer_len, h, pay, 3, true);
}

static int on_segment_drop(ctx_t *x) {
    serve_ext_t *e = serve_ext(x->s);
    sseg_t *g = seg_named(e, x->q->segment_id);
    if (!g) return serve_reply_err(x, KVM_ENOENT, "segment_id", "no segment of that id", -1);
    kvm_map_remove_str(&e->segs, g->id, NULL);
    e->seg_bytes -= sseg_bytes(g);
    sseg_free(g);
    return serve_reply_ok_str(x, "segment_id", x->q->segment_id);
}

/* ---- attribute and the error-schema cache ----------------------------------------------------------------- */

/* The failure of an ended, traced run (its trace folder into *dir_out when not NULL: the daemon's, valid while the run
 * is known); NULL after an error reply. */
static kvm_failure_t *run_failure(ctx_t *x, const char **dir_out) {
    const char *dir = NULL;
    bool ended = false;
    if (serve_run_trace(x->s, x->q->run_id, &dir, &ended))
        return serve_reply_err(x, KVM_ENOENT, "run_id", "no run of that id", -1), NULL;
    if (!ended) return serve_reply_err(x, KVM_EBUSY, "run_id", "the run is going: ask again when it has ended", 500), NULL;
    if (!dir) return serve_reply_err(x, KVM_ENOENT, "run_id", "the daemon keeps no traces (start it with --trace DIR)", -1), NULL;
    kvm_errclear();
    kvm_failure_t *f = kvm_failure_from_trace(dir);
    if (!f) serve_reply_err(x, kvm_errcode() ? kvm_errcode() : KVM_EIO, "run_id", kvm_errmsg(), -1);
    if (dir_out) *dir_out = dir;
    return f;
}

static kvm_schema_cache_t *cache_of(ctx_t *x) {
    kvm_schema_cache_t *c = kvm_runtime_schema_cache(serve_runtime(x->s));
    if (!c) serve_reply_err(x, kvm_errcode() ? kvm_errcode() : KVM_EIO, "", kvm_errmsg(), -1);
    return c;
}

/* The default bound of attribute's verify when the request has no deadline_ms: the daemon's loop waits for it. */
#define VERIFY_DEFAULT_MS 60000

static cJSON *replay_json(const kvm_verify_replay_t *o) {
    cJSON *r = cJSON_CreateObject();
    cJSON_AddNumberToObject(r, "step", o->step);
    if (o->step >= 0) cJSON_AddStringToObject(r, "agent", o->agent);
    cJSON_AddStringToObject(r, "status", o->status ? kvm_errname(o->status) : "ok");
    if (o->scored) cJSON_AddNumberToObject(r, "score", o->score);
    cJSON_AddBoolToObject(r, "passed", o->passed);
    if (o->step >= 0) cJSON_AddNumberToObject(r, "seed", (double)o->seed);
    if (o->run_dir[0]) cJSON_AddStringToObject(r, "trace", o->run_dir);
    return r;
}

/* attribute's verify: blame b of the run traced in dir checked by replays on the daemon's runtime, bounded by the
 * request's deadline (else VERIFY_DEFAULT_MS); the judge (a loaded model) writes a confirmed schema's text. The reply's
 * "verify" object into b_json; 0, or an error reply sent (<0 not: the caller returns 0 then). */
static int attribute_verify(ctx_t *x, kvm_schema_cache_t *c, const char *dir, const kvm_failure_t *f, const kvm_blame_t *b,
                            cJSON *b_json, bool *replied) {
    const kvm_req_t *q = x->q;
    smodel_t *judge = NULL;
    if (q->judge && !(judge = model_named(serve_ext(x->s), q->judge))) {
        *replied = true;
        return serve_reply_err(x, KVM_ENOENT, "judge", "no model of that name (load it with model.load)", -1);
    }
    kvm_verify_params_t vp = kvm_verify_default_params();
    vp.budget = q->budget;
    vp.pass_score = q->pass_score;
    vp.timeout_ms = q->deadline_ms >= 0 ? (double)q->deadline_ms : VERIFY_DEFAULT_MS;
    kvm_judge_params_t jp = kvm_judge_default_params();
    vp.judge = judge ? judge->m : NULL;
    vp.judge_params = &jp;
    kvm_verify_t v;
    int rc = kvm_blame_verify(serve_runtime(x->s), c, dir, f, b, &vp, &v);
    if (rc) {
        *replied = true;
        return serve_reply_err(x, rc, "verify", kvm_errmsg(), -1);
    }
    cJSON *o = cJSON_AddObjectToObject(b_json, "verify");
    cJSON_AddNumberToObject(o, "budget", q->budget);
    cJSON_AddItemToObject(o, "control", replay_json(&v.control));
    cJSON *rs = cJSON_AddArrayToObject(o, "replays");
    for (int i = 0; i < v.n_replays; i++) cJSON_AddItemToArray(rs, replay_json(&v.replay[i]));
    cJSON_AddBoolToObject(o, "failed", !v.control.passed);
    cJSON_AddBoolToObject(o, "confirmed", v.step >= 0);
    if (v.step >= 0) {
        cJSON_AddStringToObject(o, "agent", v.agent);
        cJSON_AddNumberToObject(o, "step", v.step);
    }
    cJSON_AddBoolToObject(o, "timed_out", v.timed_out);
    if (v.schema_id >= 0) cJSON_AddNumberToObject(o, "schema_id", v.schema_id);
    if (judge && v.schema_id >= 0) {
        cJSON *j = cJSON_AddObjectToObject(o, "judge");
        cJSON_AddStringToObject(j, "model", judge->name);
        cJSON_AddBoolToObject(j, "written", v.distilled);
        if (!v.distilled) cJSON_AddStringToObject(j, "error", v.judge_error);
    }
    return 0;
}

static int on_attribute(ctx_t *x) {
    const char *dir = NULL;
    kvm_failure_t *f = run_failure(x, &dir);
    if (!f) return 0;
    kvm_schema_cache_t *c = cache_of(x);
    if (!c) return kvm_failure_free(f), 0;
    kvm_blame_params_t bp = kvm_blame_default_params();
    bp.k = x->q->k;
    kvm_blame_t out;
    int rc = kvm_blame(c, f, &bp, &out);
    int n_steps = f->n_steps;
    if (rc) {
        kvm_failure_free(f);
        return serve_reply_err(x, rc, "run_id", kvm_errmsg(), -1);
    }
    cJSON *b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "run_id", x->q->run_id);
    cJSON_AddStringToObject(b, "agent", out.agent);
    cJSON_AddNumberToObject(b, "step", out.step);
    cJSON_AddNumberToObject(b, "steps", n_steps);
    cJSON_AddNumberToObject(b, "score", out.n_cand ? out.cand[0].score : 0.0);
    cJSON *ev = cJSON_AddArrayToObject(b, "evidence"), *cand = cJSON_AddArrayToObject(b, "candidates");
    for (int i = 0; i < out.n_cand; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "agent", out.cand[i].agent);
        cJSON_AddNumberToObject(o, "step", out.cand[i].step);
        cJSON_AddNumberToObject(o, "score", out.cand[i].score);
        cJSON_AddStringToObject(o, "evidence", out.cand[i].evidence);
        cJSON_AddItemToArray(cand, o);
        cJSON_AddItemToArray(ev, cJSON_CreateString(out.cand[i].evidence));
    }
    cJSON *ids = cJSON_AddArrayToObject(b, "schema_ids"), *sc = cJSON_AddArrayToObject(b, "schema_scores");
    for (int i = 0; i < out.n_schemata; i++) {
        cJSON_AddItemToArray(ids, cJSON_CreateNumber(out.schema_ids[i]));
        cJSON_AddItemToArray(sc, cJSON_CreateNumber(out.schema_scores[i]));
    }
    if (x->q->verify) {
        char run_dir[4096];
        snprintf(run_dir, sizeof run_dir, "%s", dir); /* the replays start runs: keep our own copy */
        bool replied = false;
        attribute_verify(x, c, run_dir, f, &out, b, &replied);
        if (replied) {
            kvm_failure_free(f);
            cJSON_Delete(b);
            return 0;
        }
    }
    kvm_failure_free(f);
    return serve_reply_ok(x, "ok", b);
}

static int on_cache_stats(ctx_t *x) {
    kvm_schema_cache_t *c = cache_of(x);
    if (!c) return 0;
    kvm_schema_cache_stats_t st;
    kvm_schema_cache_stats(c, &st);
    cJSON *b = cJSON_CreateObject();
    cJSON_AddNumberToObject(b, "entries", st.entries);
    cJSON_AddNumberToObject(b, "groups", st.groups);
    cJSON_AddNumberToObject(b, "tombstones", st.tombstones);
    cJSON_AddNumberToObject(b, "bytes", (double)st.bytes);
    cJSON_AddNumberToObject(b, "queries", (double)st.queries);
    cJSON_AddBoolToObject(b, "over_limits", st.over_limits);
    return serve_reply_ok(x, "ok", b);
}

static int on_cache_show(ctx_t *x) {
    kvm_schema_cache_t *c = cache_of(x);
    if (!c) return 0;
    cJSON *b = cJSON_CreateObject();
    if (x->q->entry >= 0) {
        char *j = kvm_schema_cache_entry_json(c, x->q->entry);
        cJSON *o = j ? cJSON_Parse(j) : NULL;
        kvm_free(j);
        if (!o) {
            cJSON_Delete(b);
            return serve_reply_err(x, KVM_ENOENT, "entry", "no live entry of that id (cache.show without entry lists them)", -1);
        }
        cJSON_AddNumberToObject(b, "entry", x->q->entry);
        cJSON_AddItemToObject(b, "schema", o); /* not "id": the reply's own */
        return serve_reply_ok(x, "ok", b);
    }
    enum { CAP = 10000 };
    int *ids = kvm_malloc(CAP * sizeof *ids);
    if (!ids) return cJSON_Delete(b), serve_reply_err(x, KVM_ENOMEM, "", "out of memory", 100);
    int n = kvm_schema_cache_ids(c, ids, CAP);
    cJSON_AddItemToObject(b, "ids", cJSON_CreateIntArray(ids, n < CAP ? n : CAP));
    cJSON_AddNumberToObject(b, "entries", n);
    kvm_free(ids);
    return serve_reply_ok(x, "ok", b);
}

static int on_cache_pin_evict(ctx_t *x) {
    kvm_schema_cache_t *c = cache_of(x);
    if (!c) return 0;
    bool pin = x->q->type == KVM_REQ_CACHE_PIN;
    int rc = pin ? kvm_schema_cache_pin(c, x->q->entry, x->q->pinned) : kvm_schema_cache_evict(c, x->q->entry);
    if (rc) return serve_reply_err(x, rc, "entry", kvm_errmsg(), -1);
    cJSON *b = cJSON_CreateObject();
    cJSON_AddNumberToObject(b, "entry", x->q->entry);
    if (pin) cJSON_AddBoolToObject(b, "pinned", x->q->pinned);
    else cJSON_AddBoolToObject(b, "evicted", true);
    return serve_reply_ok(x, "ok", b);
}

/* cache.label {run_id, agent, step, human?}: the run's trace, labelled, goes into the cache. */
static int on_cache_label(ctx_t *x) {
    kvm_failure_t *f = run_failure(x, NULL);
    if (!f) return 0;
    kvm_schema_cache_t *c = cache_of(x);
    if (!c) return kvm_failure_free(f), 0;
    if (x->q->step >= f->n_steps) {
        char msg[160];
        snprintf(msg, sizeof msg, "cache.label: step %d is past the run's last step (%d steps, 0-based)", x->q->step, f->n_steps);
        kvm_failure_free(f);
        return serve_reply_err(x, KVM_EINVAL, "step", msg, -1);
    }
    f->gold_agent = x->q->agent;
    f->gold_step = x->q->step;
    f->human_label = x->q->human;
    int id = kvm_schema_cache_insert(c, f, false);
    kvm_failure_free(f);
    if (id < 0) return serve_reply_err(x, id, "", kvm_errmsg(), -1);
    cJSON *b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "run_id", x->q->run_id);
    cJSON_AddNumberToObject(b, "entry", id);
    return serve_reply_ok(x, "ok", b);
}

int serve_req_dispatch(ctx_t *x) {
    switch (x->q->type) {
    case KVM_REQ_MODEL_LOAD: return on_model_load(x);
    case KVM_REQ_MODEL_UNLOAD: return on_model_unload(x);
    case KVM_REQ_MODEL_LIST: return on_model_list(x);
    case KVM_REQ_GENERATE: return on_generate(x);
    case KVM_REQ_GENERATE_CANCEL: return on_generate_cancel(x);
    case KVM_REQ_ATTRIBUTE: return on_attribute(x);
    case KVM_REQ_CACHE_STATS: return on_cache_stats(x);
    case KVM_REQ_CACHE_SHOW: return on_cache_show(x);
    case KVM_REQ_CACHE_PIN:
    case KVM_REQ_CACHE_EVICT: return on_cache_pin_evict(x);
    case KVM_REQ_CACHE_LABEL: return on_cache_label(x);
    case KVM_REQ_SEGMENT_PUT: return on_segment_put(x);
    case KVM_REQ_SEGMENT_GET: return on_segment_get(x);
    case KVM_REQ_SEGMENT_DROP: return on_segment_drop(x);
    default: return serve_reply_err(x, KVM_EINTERNAL, "type", "no handler", -1);
    }
}
