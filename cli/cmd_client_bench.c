/* cmd_client_bench.c - `kvmesh client bench`: load on a `kvmesh serve` daemon from one process (the GPU machine has
 * no pyzmq, so the load client is C): N clients, each its own DEALER socket, all on one thread around zmq_poll. Each
 * sends one request at a time from a mix (runs of a workflow, run.status of its last run, ping, stats, workflow.list
 * and, with --generate MODEL, generate of --gen-tokens tokens from --prompt-ids random ids), waits for its terminal
 * reply (pinging every second while it waits, as any client must), and notes the latency. At the end: requests and
 * errors per type, client-side latency percentiles, and the daemon's own stats (overhead per request type, KV pool,
 * generate counters) as JSON lines on stdout. Exit 1 when any request failed. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <zmq.h>

enum { K_RUN, K_STATUS, K_PING, K_STATS, K_LIST, K_GEN, N_KINDS };
static const char *const kind_names[N_KINDS] = {"run.start", "run.status", "ping", "stats", "workflow.list", "generate"};

typedef struct lat {
    double *v;
    size_t n, cap;
    long errors;
} lat_t;

typedef struct bclient {
    void *sock;
    int n;             /* request ids */
    int kind;          /* the request waited for (-1: none) */
    char id[32];
    double t_send, last_send;
    char last_run[80];
    uint64_t rng;
} bclient_t;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t next_rand(uint64_t *s) { /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

static void lat_add(lat_t *l, double v) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 1024;
        double *nv = realloc(l->v, cap * sizeof *nv);
        if (!nv) return;
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = v;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(const lat_t *l, double p) {
    if (!l->n) return 0;
    size_t i = (size_t)(p * (double)l->n);
    return l->v[i < l->n ? i : l->n - 1];
}

/* Sends h (deleted) with a new id (c->id when track) and an optional payload frame; 0 or -1. */
static int bsend(bclient_t *c, int ci, cJSON *h, const void *pay, size_t plen, bool track) {
    char id[32];
    snprintf(id, sizeof id, "%s%d-%d", track ? "b" : "p", ci, ++c->n);
    cJSON_AddNumberToObject(h, "v", 1);
    cJSON_AddStringToObject(h, "id", id);
    char *txt = cJSON_PrintUnformatted(h);
    cJSON_Delete(h);
    if (!txt) return -1;
    int rc = zmq_send(c->sock, "", 0, ZMQ_SNDMORE) < 0 || zmq_send(c->sock, txt, strlen(txt), pay ? ZMQ_SNDMORE : 0) < 0 ||
             (pay && zmq_send(c->sock, pay, plen, 0) < 0);
    cJSON_free(txt);
    c->last_send = now_s();
    if (track) snprintf(c->id, sizeof c->id, "%s", id);
    return rc ? -1 : 0;
}

typedef struct opts {
    const char *workflow, *gen_model;
    int clients, gen_tokens, prompt_ids, vocab;
    double seconds;
    int w[N_KINDS];
} opts_t;

/* The next request of client c. */
static int start_next(bclient_t *c, int ci, const opts_t *o) {
    int total = 0;
    for (int k = 0; k < N_KINDS; k++) total += o->w[k];
    int r = (int)(next_rand(&c->rng) % (uint64_t)total), k = 0;
    while (r >= o->w[k]) r -= o->w[k++];
    if (k == K_STATUS && !c->last_run[0]) k = K_PING;
    c->kind = k;
    cJSON *h = cJSON_CreateObject();
    cJSON_AddStringToObject(h, "type", kind_names[k]);
    int32_t *ids = NULL;
    size_t plen = 0;
    if (k == K_RUN) {
        char in[64];
        snprintf(in, sizeof in, "task %u", (unsigned)(next_rand(&c->rng) % 1000));
        cJSON_AddStringToObject(h, "workflow", o->workflow);
        cJSON_AddItemToObject(cJSON_AddObjectToObject(h, "inputs"), "input", cJSON_CreateString(in));
        cJSON_AddItemToObject(h, "stream", cJSON_CreateStringArray((const char *[]){"tokens"}, 1));
    } else if (k == K_STATUS) {
        cJSON_AddStringToObject(h, "run_id", c->last_run);
    } else if (k == K_GEN) {
        ids = malloc((size_t)o->prompt_ids * sizeof *ids);
        if (!ids) return cJSON_Delete(h), -1;
        for (int i = 0; i < o->prompt_ids; i++) ids[i] = (int32_t)(1 + next_rand(&c->rng) % (uint64_t)(o->vocab - 1));
        plen = (size_t)o->prompt_ids * sizeof *ids;
        cJSON_AddStringToObject(h, "model", o->gen_model);
        cJSON_AddNumberToObject(h, "max_tokens", o->gen_tokens);
        cJSON_AddBoolToObject(h, "ignore_eos", true);
        cJSON *fd = cJSON_CreateObject();
        cJSON_AddStringToObject(fd, "name", "token_ids");
        cJSON_AddStringToObject(fd, "dtype", "i32");
        cJSON_AddItemToObject(fd, "shape", cJSON_CreateIntArray(&o->prompt_ids, 1));
        cJSON_AddItemToArray(cJSON_AddArrayToObject(h, "frames"), fd);
    }
    c->t_send = now_s();
    int rc = bsend(c, ci, h, ids, plen, true);
    free(ids);
    return rc;
}

static const char *jstr(const cJSON *o, const char *k) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(j) ? j->valuestring : "";
}

/* Reads one message of client c; handles its terminal reply. */
static void on_message(bclient_t *c, int ci, lat_t *lat, const opts_t *o, bool going, long *shown) {
    cJSON *h = NULL;
    for (int part = 0, more = 1; more; part++) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, c->sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            break;
        }
        more = zmq_msg_more(&m);
        if (part == 1) h = cJSON_ParseWithLength(zmq_msg_data(&m), zmq_msg_size(&m));
        zmq_msg_close(&m);
    }
    if (!h) return;
    const char *t = jstr(h, "type");
    bool term = !strcmp(t, "ok") || !strcmp(t, "pong") || !strcmp(t, "done") || !strcmp(t, "error");
    if (c->kind >= 0 && term && !strcmp(jstr(h, "id"), c->id)) {
        lat_t *l = &lat[c->kind];
        if (!strcmp(t, "error")) {
            l->errors++;
            if ((*shown)++ < 10) fprintf(stderr, "kvmesh client bench: %s: %s: %s\n", kind_names[c->kind], jstr(h, "code"), jstr(h, "message"));
        } else
            lat_add(l, now_s() - c->t_send);
        if (c->kind == K_RUN && !strcmp(t, "done")) snprintf(c->last_run, sizeof c->last_run, "%s", jstr(h, "run_id"));
        c->kind = -1;
        if (going && start_next(c, ci, o)) l->errors++;
    }
    cJSON_Delete(h);
}

static int bench_usage(void) {
    fprintf(stderr, "usage: kvmesh client [--connect EP] bench [--clients N] [--seconds S] [--workflow NAME]\n"
                    "       [--generate MODEL [--gen-tokens N] [--prompt-ids N] [--vocab N]] [--mix R,S,P,T,L,G]\n"
                    "  N clients (default 64) send requests for S seconds (default 120): runs of WORKFLOW (default pair),\n"
                    "  run.status, ping, stats, workflow.list and generate (a model.load name) in the weights of --mix\n"
                    "  (default 4,2,6,1,1,1; generate 0 without --generate). Prints JSON lines: per request type n, errors,\n"
                    "  p50 / p99 / max latency in ms, then the daemon's stats. Exit 1 on any error.\n");
    return 2;
}

int client_bench(void *ctx, const char *ep, int argc, char **argv) {
    opts_t o = {.workflow = "pair", .clients = 64, .gen_tokens = 16, .prompt_ids = 32, .vocab = 1000, .seconds = 120,
                .w = {4, 2, 6, 1, 1, 1}};
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) return bench_usage(), 0;
        if (!v) return bench_usage();
        i++;
        if (!strcmp(a, "--clients")) o.clients = atoi(v);
        else if (!strcmp(a, "--seconds")) o.seconds = atof(v);
        else if (!strcmp(a, "--workflow")) o.workflow = v;
        else if (!strcmp(a, "--generate")) o.gen_model = v;
        else if (!strcmp(a, "--gen-tokens")) o.gen_tokens = atoi(v);
        else if (!strcmp(a, "--prompt-ids")) o.prompt_ids = atoi(v);
        else if (!strcmp(a, "--vocab")) o.vocab = atoi(v);
        else if (!strcmp(a, "--mix")) {
            if (sscanf(v, "%d,%d,%d,%d,%d,%d", &o.w[0], &o.w[1], &o.w[2], &o.w[3], &o.w[4], &o.w[5]) != 6)
                return fprintf(stderr, "kvmesh client bench: --mix takes 6 weights R,S,P,T,L,G (got '%s')\n", v), 2;
        } else
            return fprintf(stderr, "kvmesh client bench: unknown option '%s'\n", a), bench_usage();
    }
    if (!o.gen_model) o.w[K_GEN] = 0;
    int total = 0;
    for (int k = 0; k < N_KINDS; k++) total += o.w[k] >= 0 ? o.w[k] : -1000000;
    if (o.clients < 1 || o.clients > 1024 || !(o.seconds > 0) || o.gen_tokens < 1 || o.prompt_ids < 1 || o.vocab < 2 || total < 1)
        return fprintf(stderr, "kvmesh client bench: --clients 1..1024, --seconds > 0, --gen-tokens, --prompt-ids >= 1, "
                               "--vocab >= 2 and --mix weights >= 0 with one > 0\n"), 2;
    bclient_t *cs = calloc((size_t)o.clients, sizeof *cs);
    zmq_pollitem_t *items = calloc((size_t)o.clients, sizeof *items);
    lat_t lat[N_KINDS] = {{0}};
    int rc = 0, linger = 0;
    long shown = 0;
    if (!cs || !items) return fprintf(stderr, "kvmesh client bench: out of memory\n"), 1;
    for (int i = 0; i < o.clients; i++) {
        cs[i].kind = -1;
        cs[i].rng = 0x9E3779B97F4A7C15ull * (uint64_t)(i + 1);
        cs[i].sock = zmq_socket(ctx, ZMQ_DEALER);
        if (!cs[i].sock || zmq_setsockopt(cs[i].sock, ZMQ_LINGER, &linger, sizeof linger) || zmq_connect(cs[i].sock, ep)) {
            fprintf(stderr, "kvmesh client bench: cannot connect client %d to %s: %s\n", i, ep, zmq_strerror(zmq_errno()));
            rc = 1;
            goto out;
        }
        items[i] = (zmq_pollitem_t){cs[i].sock, 0, ZMQ_POLLIN, 0};
    }
    double t0 = now_s(), end = t0 + o.seconds;
    for (int i = 0; i < o.clients; i++)
        if (start_next(&cs[i], i, &o)) lat[cs[i].kind].errors++;
    for (;;) {
        double now = now_s();
        bool going = now < end;
        int waiting = 0;
        for (int i = 0; i < o.clients; i++) {
            waiting += cs[i].kind >= 0;
            if (cs[i].kind >= 0 && now - cs[i].last_send >= 1.0) { /* a client waiting long says it is there */
                cJSON *p = cJSON_CreateObject();
                cJSON_AddStringToObject(p, "type", "ping");
                bsend(&cs[i], i, p, NULL, 0, false);
            }
        }
        if (!waiting) break;
        if (now > end + 600) {
            fprintf(stderr, "kvmesh client bench: %d request(s) unanswered 600 s after the end\n", waiting);
            for (int i = 0; i < o.clients; i++)
                if (cs[i].kind >= 0) lat[cs[i].kind].errors++;
            break;
        }
        if (zmq_poll(items, o.clients, 100) < 0) break;
        for (int i = 0; i < o.clients; i++)
            if (items[i].revents & ZMQ_POLLIN) on_message(&cs[i], i, lat, &o, going, &shown);
    }
    double wall = now_s() - t0;
    long n_all = 0, err_all = 0;
    for (int k = 0; k < N_KINDS; k++) {
        lat_t *l = &lat[k];
        if (!l->n && !l->errors) continue;
        qsort(l->v, l->n, sizeof *l->v, cmp_d);
        printf("{\"type\":\"%s\",\"n\":%zu,\"errors\":%ld,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f}\n", kind_names[k], l->n,
               l->errors, 1e3 * pct(l, 0.5), 1e3 * pct(l, 0.99), 1e3 * (l->n ? l->v[l->n - 1] : 0));
        n_all += (long)l->n;
        err_all += l->errors;
    }
    printf("{\"type\":\"all\",\"clients\":%d,\"seconds\":%.1f,\"n\":%ld,\"errors\":%ld,\"per_s\":%.1f}\n", o.clients, wall, n_all,
           err_all, (double)n_all / wall);
    /* the daemon's own figures */
    cJSON *h = cJSON_CreateObject();
    cJSON_AddStringToObject(h, "type", "stats");
    cs[0].kind = K_STATS;
    bsend(&cs[0], 0, h, NULL, 0, true);
    for (double stop = now_s() + 30; now_s() < stop;) {
        if (zmq_poll(items, 1, 200) <= 0) continue;
        cJSON *r = NULL;
        for (int part = 0, more = 1; more; part++) {
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, cs[0].sock, 0) < 0) {
                zmq_msg_close(&m);
                break;
            }
            more = zmq_msg_more(&m);
            if (part == 1) r = cJSON_ParseWithLength(zmq_msg_data(&m), zmq_msg_size(&m));
            zmq_msg_close(&m);
        }
        if (r && !strcmp(jstr(r, "id"), cs[0].id)) {
            char *txt = cJSON_PrintUnformatted(r);
            printf("{\"type\":\"daemon_stats\",\"stats\":%s}\n", txt ? txt : "null");
            cJSON_free(txt);
            cJSON_Delete(r);
            break;
        }
        cJSON_Delete(r);
    }
    rc = err_all ? 1 : 0;
out:
    for (int i = 0; i < o.clients; i++)
        if (cs[i].sock) zmq_close(cs[i].sock);
    for (int k = 0; k < N_KINDS; k++) free(lat[k].v);
    free(cs);
    free(items);
    return rc;
}
