/* cmd_client.c - `kvmesh client`: talk to a `kvmesh serve` daemon (docs/protocol.md) from the command line: run a
 * workflow and stream its tokens, load / list / drop workflows, query runs, stats, ping; load / unload models and
 * generate from them. A DEALER socket; one
 * request at a time; pings every second while a run streams. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <kvmesh.h>
#include <zmq.h>

static void usage(FILE *f) {
    fprintf(f, "usage: kvmesh client [--connect EP] [--json] [--timeout-s N] COMMAND ...\n\n"
               "commands:\n"
               "  run WORKFLOW [--input K=V ...] [--inputs JSON] [--seed N] [--dataset] [--deadline-ms N] [--no-stream]\n"
               "                         run a workflow, streaming its tokens to stdout; a summary (run id, reuse,\n"
               "                         TTFT) goes to stderr (--json: the final reply on stdout instead)\n"
               "  load NAME FILE.lua     register a workflow        list      the workflows\n"
               "  drop NAME              drop a workflow            runs      the runs the daemon remembers\n"
               "  status RUN_ID          a run's state and figures  cancel RUN_ID   cancel a run\n"
               "  stats                  KV pool, anchors, reuse    ping      is the daemon there\n"
               "  resume RUN_ID VALUE    answer a run's kvmesh.interrupt with a string (resume-json RUN_ID JSON: any value)\n"
               "  model-load NAME PATH [--backend auto|cpu|cuda]   load a model for generate\n"
               "  model-unload NAME      free it                    models    the models loaded for generate\n"
               "  generate MODEL PROMPT [--max-tokens N] [--temperature T] [--top-p P] [--seed N] [--stop S]...\n"
               "           [--chat] [--ignore-eos] [--deadline-ms N]\n"
               "                         generate from a loaded model, streaming the text to stdout; a summary to\n"
               "                         stderr (--json: the final reply on stdout instead)\n\n"
               "  bench [--clients N] [--seconds S] [--workflow NAME] [--generate MODEL] [--mix R,S,P,T,L,G] ...\n"
               "                         load: N clients (default 64) send a mix of requests for S seconds; latency\n"
               "                         per request type and the daemon's stats as JSON lines (kvmesh client bench -h)\n\n"
               "  --connect EP           the daemon's request endpoint (default tcp://127.0.0.1:5555)\n");
}

typedef struct conn {
    void *ctx, *sock;
    int n;              /* request ids */
    double timeout_s;
    double last_send;
} conn_t;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Sends h (deleted) as a request with a new id, plus an optional payload frame; the id in id[32]. */
static int send_req(conn_t *c, cJSON *h, const void *payload, size_t plen, char id[32]) {
    snprintf(id, 32, "c-%d", ++c->n);
    cJSON_AddNumberToObject(h, "v", 1);
    cJSON_AddStringToObject(h, "id", id);
    char *txt = cJSON_PrintUnformatted(h);
    cJSON_Delete(h);
    if (!txt) return -1;
    int rc = zmq_send(c->sock, "", 0, ZMQ_SNDMORE) < 0 || zmq_send(c->sock, txt, strlen(txt), payload ? ZMQ_SNDMORE : 0) < 0 ||
             (payload && zmq_send(c->sock, payload, plen, 0) < 0);
    cJSON_free(txt);
    c->last_send = now_s();
    return rc ? -1 : 0;
}

/* The next reply (header parsed; any payload frame in *payload, freed by the caller), NULL on timeout. */
static cJSON *recv_reply(conn_t *c, int timeout_ms, char **payload, size_t *plen) {
    zmq_pollitem_t it = {c->sock, 0, ZMQ_POLLIN, 0};
    if (zmq_poll(&it, 1, timeout_ms) <= 0) return NULL;
    cJSON *h = NULL;
    for (int part = 0, more = 1; more; part++) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, c->sock, 0) < 0) {
            zmq_msg_close(&m);
            break;
        }
        more = zmq_msg_more(&m);
        if (part == 1) h = cJSON_ParseWithLength(zmq_msg_data(&m), zmq_msg_size(&m));
        if (part == 2 && payload) {
            *plen = zmq_msg_size(&m);
            *payload = malloc(*plen + 1);
            if (*payload) {
                memcpy(*payload, zmq_msg_data(&m), *plen);
                (*payload)[*plen] = '\0';
            }
        }
        zmq_msg_close(&m);
    }
    return h;
}

static const char *str(const cJSON *o, const char *k) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(j) ? j->valuestring : "";
}

static double num(const cJSON *o, const char *k) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(j) ? j->valuedouble : 0;
}

static bool terminal(const cJSON *h) {
    const char *t = str(h, "type");
    return !strcmp(t, "ok") || !strcmp(t, "hello.ok") || !strcmp(t, "pong") || !strcmp(t, "done") || !strcmp(t, "error");
}

/* Prints an error reply; 1. */
static int print_error(const cJSON *h) {
    const cJSON *d = cJSON_GetObjectItemCaseSensitive(h, "detail");
    const char *field = str(d, "field");
    fprintf(stderr, "kvmesh client: %s: %s%s%s%s\n", str(h, "code"), str(h, "message"), *field ? " (field " : "", field,
            *field ? ")" : "");
    return 1;
}

/* Waits for the terminal reply of request id, calling each(h) on every message of it (NULL: none); pings every
 * second. Returns the terminal reply (caller deletes) or NULL on timeout. */
static cJSON *wait_for(conn_t *c, const char *id, void (*each)(const cJSON *h, void *ud), void *ud, char **payload, size_t *plen) {
    double end = now_s() + c->timeout_s;
    while (now_s() < end) {
        if (now_s() - c->last_send >= 1.0) { /* a client with a run going sends something every second */
            cJSON *ping = cJSON_CreateObject();
            cJSON_AddStringToObject(ping, "type", "ping");
            char pid[32];
            send_req(c, ping, NULL, 0, pid);
        }
        cJSON *h = recv_reply(c, 200, payload, plen);
        if (!h) continue;
        if (!strcmp(str(h, "id"), id)) {
            if (terminal(h)) return h;
            if (each) each(h, ud);
        }
        cJSON_Delete(h);
    }
    return NULL;
}

/* One request with a single terminal reply, printed as JSON (or its error). The exit status. */
static int simple(conn_t *c, cJSON *h, const void *payload, size_t plen) {
    char id[32];
    if (send_req(c, h, payload, plen, id)) return fprintf(stderr, "kvmesh client: cannot send: %s\n", zmq_strerror(zmq_errno())), 1;
    cJSON *r = wait_for(c, id, NULL, NULL, NULL, NULL);
    if (!r) return fprintf(stderr, "kvmesh client: no reply in %.0f s (is the daemon running?)\n", c->timeout_s), 1;
    int rc = !strcmp(str(r, "type"), "error") ? print_error(r) : 0;
    if (!rc) {
        char *txt = cJSON_Print(r);
        printf("%s\n", txt ? txt : "{}");
        cJSON_free(txt);
    }
    cJSON_Delete(r);
    return rc;
}

static void on_stream(const cJSON *h, void *ud) {
    (void)ud;
    const char *t = str(h, "type");
    if (!strcmp(t, "token")) {
        fputs(str(h, "text"), stdout);
        fflush(stdout);
    } else if (!strcmp(t, "step")) {
        const cJSON *s = cJSON_GetObjectItemCaseSensitive(h, "step");
        const cJSON *kv = cJSON_GetObjectItemCaseSensitive(s, "kv");
        fprintf(stderr, "\n[%s: %s, %g tokens in, ttft %.1f ms%s]\n", str(s, "node"), str(s, "status"),
                num(cJSON_GetObjectItemCaseSensitive(s, "usage"), "input_tokens"),
                num(cJSON_GetObjectItemCaseSensitive(s, "timings"), "ttft_ms"), kv && !strcmp(str(kv, "mode"), "reuse") ? ", KV reused" : "");
    } else if (!strcmp(t, "run.accepted")) {
        fprintf(stderr, "run %s\n", str(h, "run_id"));
    } else if (!strcmp(t, "interrupt")) {
        char *p = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(h, "payload"));
        fprintf(stderr, "\ninterrupt from node '%s': %s\n(answer: kvmesh client resume %s VALUE)\n", str(h, "node"), p ? p : "null",
                str(h, "run_id"));
        cJSON_free(p);
    }
}

/* Builds the run.start request from the arguments after "run WORKFLOW". NULL (message printed) on a bad one. */
static cJSON *run_request(int argc, char **argv, const char *wf, bool *stream) {
    cJSON *h = cJSON_CreateObject(), *in = cJSON_CreateObject();
    cJSON_AddStringToObject(h, "type", "run.start");
    cJSON_AddStringToObject(h, "workflow", wf);
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--dataset")) cJSON_AddBoolToObject(h, "dataset", true);
        else if (!strcmp(a, "--no-stream")) *stream = false;
        else if (v && !strcmp(a, "--seed") && ++i) cJSON_AddStringToObject(h, "seed", v);
        else if (v && !strcmp(a, "--deadline-ms") && ++i) cJSON_AddNumberToObject(h, "deadline_ms", atof(v));
        else if (v && !strcmp(a, "--inputs") && ++i) {
            cJSON *j = cJSON_Parse(v);
            if (!cJSON_IsObject(j)) {
                fprintf(stderr, "kvmesh client: --inputs takes a JSON object\n");
                cJSON_Delete(j);
                goto bad;
            }
            for (cJSON *x = j->child; x; x = x->next) cJSON_AddItemToObject(in, x->string, cJSON_Duplicate(x, 1));
            cJSON_Delete(j);
        } else if (v && !strcmp(a, "--input") && ++i) {
            const char *eq = strchr(v, '=');
            if (!eq || eq == v) {
                fprintf(stderr, "kvmesh client: --input takes KEY=VALUE (got '%s')\n", v);
                goto bad;
            }
            char key[256];
            snprintf(key, sizeof key, "%.*s", (int)(eq - v), v);
            cJSON_DeleteItemFromObjectCaseSensitive(in, key);
            cJSON_AddStringToObject(in, key, eq + 1);
        } else {
            fprintf(stderr, "kvmesh client run: unknown option or missing value '%s'\n", a);
            goto bad;
        }
    }
    cJSON_AddItemToObject(h, "inputs", in);
    if (*stream) cJSON_AddItemToObject(h, "stream", cJSON_CreateStringArray((const char *const[]){"tokens", "steps"}, 2));
    return h;
bad:
    cJSON_Delete(h);
    cJSON_Delete(in);
    return NULL;
}

/* Sends h (deleted), passes each message of its stream to each, and returns its terminal reply (printed as JSON
 * with json, its error printed), *rc the exit status; NULL (said) when it cannot send or no end came. */
static cJSON *stream_request(conn_t *c, cJSON *h, void (*each)(const cJSON *h, void *ud), const char *what, bool json, int *rc) {
    char id[32];
    *rc = 1;
    if (send_req(c, h, NULL, 0, id)) return fprintf(stderr, "kvmesh client: cannot send\n"), NULL;
    cJSON *r = wait_for(c, id, each, NULL, NULL, NULL);
    if (!r) return fprintf(stderr, "kvmesh client: no end of the %s in %.0f s\n", what, c->timeout_s), NULL;
    *rc = !strcmp(str(r, "type"), "error") ? print_error(r) : 0;
    if (json) {
        char *txt = cJSON_Print(r);
        printf("%s\n", txt ? txt : "{}");
        cJSON_free(txt);
    }
    return r;
}

static int cmd_run_wf(conn_t *c, int argc, char **argv, bool json) {
    if (argc < 1) return usage(stderr), 2;
    bool stream = !json;
    cJSON *h = run_request(argc - 1, argv + 1, argv[0], &stream);
    if (!h) return 2;
    int rc;
    cJSON *r = stream_request(c, h, on_stream, "run", json, &rc);
    if (!r) return rc;
    if (!json && !rc) {
        const cJSON *u = cJSON_GetObjectItemCaseSensitive(r, "usage"), *kv = cJSON_GetObjectItemCaseSensitive(r, "kv");
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(r, "timings");
        fprintf(stderr, "\nrun %s done: %g agent steps, %g reused through anchors; prompt tokens %g (exact %g, offset %g, "
                        "recomputed %g); first TTFT %.1f ms, total %.1f ms\n",
                str(r, "run_id"), num(u, "agent_steps"), num(kv, "reuse_steps"), num(u, "input_tokens"), num(kv, "exact"),
                num(kv, "offset"), num(kv, "recomputed"), num(t, "ttft_ms"), num(t, "total_ms"));
    }
    cJSON_Delete(r);
    return rc;
}

static void on_gen_token(const cJSON *h, void *ud) {
    (void)ud;
    if (!strcmp(str(h, "type"), "token")) {
        fputs(str(h, "text"), stdout);
        fflush(stdout);
    }
}

/* generate MODEL PROMPT [options]: the text streams to stdout. */
static int cmd_generate_remote(conn_t *c, int argc, char **argv, bool json) {
    if (argc < 2) return usage(stderr), 2;
    cJSON *h = cJSON_CreateObject(), *stop = cJSON_CreateArray();
    cJSON_AddStringToObject(h, "type", "generate");
    cJSON_AddStringToObject(h, "model", argv[0]);
    cJSON_AddStringToObject(h, "prompt", argv[1]);
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (!strcmp(a, "--chat")) cJSON_AddBoolToObject(h, "chat", true);
        else if (!strcmp(a, "--ignore-eos")) cJSON_AddBoolToObject(h, "ignore_eos", true);
        else if (v && !strcmp(a, "--seed") && ++i) cJSON_AddStringToObject(h, "seed", v);
        else if (v && !strcmp(a, "--stop") && ++i) cJSON_AddItemToArray(stop, cJSON_CreateString(v));
        else if (v && (!strcmp(a, "--max-tokens") || !strcmp(a, "--temperature") || !strcmp(a, "--top-p") ||
                       !strcmp(a, "--deadline-ms")) && ++i) {
            double d = strtod(v, &end);
            if (end == v || *end) {
                fprintf(stderr, "kvmesh client generate: %s takes a number (got '%s')\n", a, v);
                goto bad;
            }
            cJSON_AddNumberToObject(h, !strcmp(a, "--max-tokens") ? "max_tokens" : !strcmp(a, "--temperature") ? "temperature"
                                       : !strcmp(a, "--top-p") ? "top_p" : "deadline_ms", d);
        } else {
            fprintf(stderr, "kvmesh client generate: unknown option or missing value '%s'\n", a);
            goto bad;
        }
    }
    if (cJSON_GetArraySize(stop)) cJSON_AddItemToObject(h, "stop", stop);
    else cJSON_Delete(stop);
    int rc;
    cJSON *r = stream_request(c, h, json ? NULL : on_gen_token, "generation", json, &rc);
    if (!r) return rc;
    if (!json && !rc) {
        const cJSON *u = cJSON_GetObjectItemCaseSensitive(r, "usage"), *t = cJSON_GetObjectItemCaseSensitive(r, "timings");
        fprintf(stderr, "\n[%g prompt tokens, %g generated, stop: %s; TTFT %.1f ms, total %.1f ms]\n", num(u, "input_tokens"),
                num(u, "output_tokens"), str(r, "stop_reason"), num(t, "ttft_ms"), num(t, "total_ms"));
    }
    cJSON_Delete(r);
    return rc;
bad:
    cJSON_Delete(h);
    cJSON_Delete(stop);
    return 2;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = NULL;
    size_t cap = 0;
    *len = 0;
    for (size_t n;; *len += n) {
        if (*len + 4096 > cap) {
            char *nb = realloc(buf, cap = cap * 2 + 8192);
            if (!nb) break;
            buf = nb;
        }
        if ((n = fread(buf + *len, 1, cap - *len, f)) == 0) break;
    }
    fclose(f);
    return buf;
}

static cJSON *typed(const char *type, const char *key, const char *val) {
    cJSON *h = cJSON_CreateObject();
    cJSON_AddStringToObject(h, "type", type);
    if (key) cJSON_AddStringToObject(h, key, val);
    return h;
}

int client_bench(void *ctx, const char *ep, int argc, char **argv); /* cmd_client_bench.c */

static int dispatch(conn_t *c, int argc, char **argv, bool json) {
    const char *cmd = argv[0];
    if (!strcmp(cmd, "run")) return cmd_run_wf(c, argc - 1, argv + 1, json);
    if (!strcmp(cmd, "generate")) return cmd_generate_remote(c, argc - 1, argv + 1, json);
    if (!strcmp(cmd, "models") && argc == 1) return simple(c, typed("model.list", NULL, NULL), NULL, 0);
    if (!strcmp(cmd, "model-unload") && argc == 2) return simple(c, typed("model.unload", "name", argv[1]), NULL, 0);
    if (!strcmp(cmd, "model-load") && (argc == 3 || (argc == 5 && !strcmp(argv[3], "--backend")))) {
        cJSON *h = typed("model.load", "name", argv[1]);
        cJSON_AddStringToObject(h, "path", argv[2]);
        if (argc == 5) cJSON_AddStringToObject(h, "backend", argv[4]);
        return simple(c, h, NULL, 0);
    }
    if (!strcmp(cmd, "ping") && argc == 1) return simple(c, typed("ping", NULL, NULL), NULL, 0);
    if (!strcmp(cmd, "stats") && argc == 1) return simple(c, typed("stats", NULL, NULL), NULL, 0);
    if (!strcmp(cmd, "list") && argc == 1) return simple(c, typed("workflow.list", NULL, NULL), NULL, 0);
    if (!strcmp(cmd, "runs") && argc == 1) return simple(c, typed("run.list", NULL, NULL), NULL, 0);
    if (!strcmp(cmd, "drop") && argc == 2) return simple(c, typed("workflow.drop", "name", argv[1]), NULL, 0);
    if (!strcmp(cmd, "status") && argc == 2) return simple(c, typed("run.status", "run_id", argv[1]), NULL, 0);
    if (!strcmp(cmd, "cancel") && argc == 2) return simple(c, typed("run.cancel", "run_id", argv[1]), NULL, 0);
    if ((!strcmp(cmd, "resume") || !strcmp(cmd, "resume-json")) && argc == 3) {
        cJSON *v = cmd[6] ? cJSON_Parse(argv[2]) : cJSON_CreateString(argv[2]);
        if (!v) return fprintf(stderr, "kvmesh client: resume-json takes a JSON value (got '%s')\n", argv[2]), 2;
        cJSON *h = typed("run.resume", "run_id", argv[1]);
        cJSON_AddItemToObject(h, "value", v);
        return simple(c, h, NULL, 0);
    }
    if (!strcmp(cmd, "load") && argc == 3) {
        size_t len = 0;
        char *src = read_file(argv[2], &len);
        if (!src) return fprintf(stderr, "kvmesh client: cannot read %s\n", argv[2]), 1;
        cJSON *h = typed("workflow.load", "name", argv[1]);
        cJSON *fd = cJSON_CreateObject();
        cJSON_AddStringToObject(fd, "name", "source");
        cJSON_AddStringToObject(fd, "dtype", "u8");
        cJSON_AddItemToObject(fd, "shape", cJSON_CreateIntArray((const int[]){(int)len}, 1));
        cJSON_AddItemToArray(cJSON_AddArrayToObject(h, "frames"), fd);
        int rc = simple(c, h, src, len);
        free(src);
        return rc;
    }
    usage(stderr);
    return 2;
}

int cmd_client(int argc, char **argv) {
    const char *ep = "tcp://127.0.0.1:5555";
    bool json = false;
    conn_t c = {.timeout_s = 600};
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) return usage(stdout), 0;
        if (!strcmp(argv[i], "--json")) json = true;
        else if (!strcmp(argv[i], "--connect") && i + 1 < argc) ep = argv[++i];
        else if (!strcmp(argv[i], "--timeout-s") && i + 1 < argc) c.timeout_s = atof(argv[++i]);
        else return fprintf(stderr, "kvmesh client: unknown option '%s' (kvmesh client --help)\n", argv[i]), 2;
    }
    if (i >= argc) return usage(stderr), 2;
    c.ctx = zmq_ctx_new();
    c.sock = c.ctx ? zmq_socket(c.ctx, ZMQ_DEALER) : NULL;
    int linger = 0;
    if (!c.sock || zmq_setsockopt(c.sock, ZMQ_LINGER, &linger, sizeof linger) || zmq_connect(c.sock, ep)) {
        fprintf(stderr, "kvmesh client: cannot connect to %s: %s\n", ep, zmq_strerror(zmq_errno()));
        if (c.ctx) zmq_ctx_term(c.ctx);
        return 1;
    }
    int rc = !strcmp(argv[i], "bench") ? client_bench(c.ctx, ep, argc - i - 1, argv + i + 1) : dispatch(&c, argc - i, argv + i, json);
    zmq_close(c.sock);
    zmq_ctx_term(c.ctx);
    return rc;
}
