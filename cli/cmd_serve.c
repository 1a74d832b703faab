/* cmd_serve.c - `kvmesh serve`: one runtime behind the ZeroMQ protocol of docs/protocol.md (kvm_server_* of
 * include/kvmesh.h). Progress goes to stderr; SIGTERM / SIGINT drain and stop. */
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kvmesh.h>

#include "cli_env.h"
#include "lab/lab.h"

static void usage(FILE *f) {
    fprintf(f, "usage: kvmesh serve [options]\n\n"
               "Serves one runtime (models loaded once; KV stores, prefix store and KVCOMM anchors shared by every\n"
               "client and run) over ZeroMQ: requests on a ROUTER socket, events on a PUB socket (docs/protocol.md).\n\n"
               "options:\n"
               "  --bind EP             requests (default tcp://127.0.0.1:5555; tcp://127.0.0.1:* picks a free port)\n"
               "  --events EP           events (default tcp://127.0.0.1:5556); --no-events for none\n"
               "  --workflows DIR       load every DIR/*.lua at start, named after the file (team.lua: \"team\")\n"
               "  --model PATH          every kvmesh.model(...) of the workflows resolves to PATH\n"
               "  --mock                the mock echo model for every kvmesh.model(...) (no weights)\n"
               "  --kv POLICY           dense | prefix | kvcomm for every agent (default: each agent's own)\n"
               "  --kvcomm K=V          a KVCOMM switch (repeatable; docs/kvcomm.md); the default policy is\n"
               "                        preset=blend (keeps dense's answers), preset=spec is the paper's (lossy)\n"
               "  --trace DIR           write each run's trace under DIR (trace.get serves it); default none\n"
               "  --state DIR           keep what the daemon learns (KVCOMM anchors) in DIR: loaded at start, saved\n"
               "                        every 60 s while runs come and when it stops, so a restart keeps it\n"
               "  --backend B           auto | cpu | cuda (default auto)\n"
               "  --kv-mb N             KV budget per model in MiB\n"
               "  --max-runs N          runs going at once, all clients (default 256)\n"
               "  --max-client-runs N   runs going at once per client (default 16)\n"
               "  --client-timeout-ms N a client with runs going that sends nothing this long loses them (3000)\n"
               "  --max-message-mb N    largest request (default 16)\n"
               "  --drain-ms N          on SIGTERM, how long runs going may take to end (default 30000)\n"
               "  --recycle-runs N      load a workflow afresh after N runs, freeing the old runs' memory (1000; 0 never)\n"
               "  --hwm N               messages queued per client or event subscriber before ZeroMQ drops (10000)\n"
               "  --curve-secret FILE   CURVE: the server's secret key (Z85, mode 0600); then public binds are allowed\n"
               "  --curve-allow FILE    CURVE: the client public keys admitted (Z85, one per line)\n"
               "  --allow-public        permit a non-loopback bind without CURVE\n"
               "  -q, --quiet           no progress on stderr\n");
}

typedef struct serve_args {
    kvm_runtime_params_t rp;
    kvm_server_params_t sp;
    const char *workflows, *kv;
    const char *kvcomm[33];
    int n_kvcomm;
    bool mock;
} serve_args_t;

static int num_opt(const char *v, long lo, long hi, const char *opt, long *out) {
    char *end = NULL;
    long x = strtol(v, &end, 10);
    if (!*v || *end || x < lo || x > hi) {
        fprintf(stderr, "kvmesh serve: %s takes an integer in [%ld, %ld] (got '%s')\n", opt, lo, hi, v);
        return 2;
    }
    *out = x;
    return 0;
}

/* One option with a value; -1 if it is none of these, else 0 or the exit status of a bad value. */
static int valued_opt(serve_args_t *a, const char *arg, const char *v) {
    long x = 0;
    int rc = 0;
    if (!strcmp(arg, "--bind")) a->sp.bind = v;
    else if (!strcmp(arg, "--events")) a->sp.events = v;
    else if (!strcmp(arg, "--workflows")) a->workflows = v;
    else if (!strcmp(arg, "--model")) a->rp.model_override = v;
    else if (!strcmp(arg, "--kv")) a->kv = v;
    else if (!strcmp(arg, "--trace")) a->rp.trace_root = v;
    else if (!strcmp(arg, "--state")) a->rp.state_dir = v;
    else if (!strcmp(arg, "--curve-secret")) a->sp.curve_secret_file = v;
    else if (!strcmp(arg, "--curve-allow")) a->sp.curve_allow_file = v;
    else if (!strcmp(arg, "--backend")) a->rp.model.backend = v;
    else if (!strcmp(arg, "--kvcomm")) {
        if (a->n_kvcomm < 32) a->kvcomm[a->n_kvcomm++] = v;
    } else if (!strcmp(arg, "--kv-mb")) {
        if (!(rc = num_opt(v, 1, 1L << 30, arg, &x))) a->rp.kv_budget_bytes = (size_t)x << 20;
    } else if (!strcmp(arg, "--max-runs")) {
        if (!(rc = num_opt(v, 1, 1000000, arg, &x))) a->sp.max_runs = (int)x;
    } else if (!strcmp(arg, "--max-client-runs")) {
        if (!(rc = num_opt(v, 1, 1000000, arg, &x))) a->sp.max_runs_per_client = (int)x;
    } else if (!strcmp(arg, "--client-timeout-ms")) {
        if (!(rc = num_opt(v, 0, 86400000, arg, &x))) a->sp.client_timeout_ms = (int)x;
    } else if (!strcmp(arg, "--max-message-mb")) {
        if (!(rc = num_opt(v, 1, 4096, arg, &x))) a->sp.max_message_bytes = (size_t)x << 20;
    } else if (!strcmp(arg, "--recycle-runs")) {
        if (!(rc = num_opt(v, 0, 100000000, arg, &x))) a->sp.recycle_runs = (int)x;
    } else if (!strcmp(arg, "--hwm")) {
        if (!(rc = num_opt(v, 1, 10000000, arg, &x))) a->sp.hwm = (int)x;
    } else if (!strcmp(arg, "--drain-ms")) {
        if (!(rc = num_opt(v, 0, 86400000, arg, &x))) a->sp.drain_ms = (int)x;
    } else return -1;
    return rc;
}

/* -1 to go on, else the exit status. */
static int parse_args(int argc, char **argv, serve_args_t *a) {
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
            usage(stdout);
            return 0;
        }
        int rc = i + 1 < argc ? valued_opt(a, arg, argv[i + 1]) : -1;
        if (rc > 0) return rc;
        if (rc == 0) i++;
        else if (!strcmp(arg, "--mock")) a->mock = true;
        else if (!strcmp(arg, "--no-events")) a->sp.events = NULL;
        else if (!strcmp(arg, "--allow-public")) a->sp.allow_public = true;
        else if (!strcmp(arg, "-q") || !strcmp(arg, "--quiet")) a->sp.quiet = a->rp.quiet = true;
        else {
            fprintf(stderr, "kvmesh serve: unknown option or missing value '%s' (kvmesh serve --help)\n", arg);
            return 2;
        }
    }
    if (a->kv) {
        kvm_kv_policy_t p;
        if (kvm_kv_policy_parse(a->kv, &p)) {
            fprintf(stderr, "kvmesh serve: --kv: %s\n", kvm_errmsg());
            return 2;
        }
        a->rp.kv_override = (int)p;
    }
    if (a->mock) a->rp.model_override = "mock:echo";
    a->rp.kvcomm = a->kvcomm;
    a->rp.n_kvcomm = a->n_kvcomm;
    a->rp.echo_print = false;
    if (cli_env_model_params(&a->rp.model)) {
        fprintf(stderr, "kvmesh serve: %s\n", kvm_errmsg());
        return 2;
    }
    return -1;
}

/* Loads every .lua file of DIR, each named after its file. 0 or the first failure (printed). */
static int load_dir(kvm_server_t *s, const char *dir, bool quiet) {
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "kvmesh serve: --workflows %s: cannot open the folder\n", dir);
        return 1;
    }
    int rc = 0;
    for (struct dirent *e; !rc && (e = readdir(d));) {
        size_t n = strlen(e->d_name);
        if (n < 5 || strcmp(e->d_name + n - 4, ".lua") || e->d_name[0] == '.') continue;
        char name[256], path[4096];
        snprintf(name, sizeof name, "%.*s", (int)(n - 4), e->d_name);
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        rc = kvm_server_load_workflow(s, name, path);
        if (rc) fprintf(stderr, "kvmesh serve: %s: %s\n", path, kvm_errmsg());
        else if (!quiet) fprintf(stderr, "kvmesh serve: workflow '%s' from %s\n", name, path);
    }
    closedir(d);
    return rc ? 1 : 0;
}

static kvm_server_t *g_server; /* for the signal handler */

static void on_signal(int sig) {
    (void)sig;
    kvm_server_stop(g_server);
}

int cmd_serve(int argc, char **argv) {
    serve_args_t a = {.rp = kvm_runtime_default_params(), .sp = kvm_server_default_params()};
    int rc = parse_args(argc, argv, &a);
    if (rc >= 0) return rc;
    kvm_runtime_t *rt = kvm_runtime_create(&a.rp);
    if (rt && kvm_lab_add_functions(rt)) { /* kvmesh.minitasks.item (lab/lab.h) for the bundled examples */
        kvm_runtime_free(rt);
        rt = NULL;
    }
    kvm_server_t *s = rt ? kvm_server_create(rt, &a.sp) : NULL;
    if (!s) {
        fprintf(stderr, "kvmesh serve: %s\n", kvm_errmsg());
        kvm_runtime_free(rt);
        return 1;
    }
    rc = a.workflows ? load_dir(s, a.workflows, a.sp.quiet) : 0;
    if (!rc) {
        g_server = s;
        struct sigaction sa = {0};
        sa.sa_handler = on_signal;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
        /* one line tests and scripts wait for: the endpoints, ports resolved */
        fprintf(stderr, "kvmesh serve: listening on %s events %s\n", kvm_server_endpoint(s, false),
                kvm_server_endpoint(s, true)[0] ? kvm_server_endpoint(s, true) : "(none)");
        fflush(stderr);
        rc = kvm_server_run(s) ? 1 : 0;
        if (rc) fprintf(stderr, "kvmesh serve: %s\n", kvm_errmsg());
        else if (!a.sp.quiet) fprintf(stderr, "kvmesh serve: stopped\n");
    }
    kvm_server_free(s);
    kvm_runtime_free(rt);
    return rc;
}
