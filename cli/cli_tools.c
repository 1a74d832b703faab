/* cli_tools.c - host tools for `kvmesh run`: `--tool NAME=COMMAND` registers a tool (kvm_runtime_add_tool) whose
 * calls run COMMAND through /bin/sh with the arguments (a JSON object that passed the tool's schema) on its stdin;
 * what it prints on stdout (JSON) is the result, a non-zero exit status an error carrying its stderr.
 * `--tool-schema NAME=FILE` gives the tool's JSON Schema (default {"type": "object"}). The operator chooses the
 * commands; a script reaches only what was registered, with checked arguments passed as data, never as shell text.
 * (docs/lua-api.md, "Host tools"; docs/cli.md) */
#include "cli_tools.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#define TOOL_OUT_MAX (4u << 20)    /* bytes of stdout a tool may print */
#define TOOL_ERR_KEEP 400          /* bytes of its stderr kept for the error message */
#define TOOL_SCHEMA_MAX (256u << 10)
#define TOOL_DEFAULT_MS 60000.0    /* a call's time limit when the run has no wall-time budget */

typedef struct cli_tool {
    char *name, *cmd, *schema_file;
} cli_tool_t;

struct cli_tools {
    cli_tool_t *t;
    int n;
};

static cli_tool_t *find(cli_tools_t *ts, const char *name, size_t len) {
    for (int i = 0; i < ts->n; i++)
        if (strlen(ts->t[i].name) == len && !strncmp(ts->t[i].name, name, len)) return &ts->t[i];
    return NULL;
}

int cli_tools_add(cli_tools_t **tsp, const char *spec, bool schema, const char *who) {
    const char *eq = strchr(spec, '=');
    if (!eq || eq == spec || !eq[1]) {
        fprintf(stderr, "%s: %s takes NAME=%s (got '%s')\n", who, schema ? "--tool-schema" : "--tool", schema ? "FILE" : "COMMAND", spec);
        return 2;
    }
    if (!*tsp && !(*tsp = calloc(1, sizeof **tsp))) return 1;
    cli_tools_t *ts = *tsp;
    cli_tool_t *t = find(ts, spec, (size_t)(eq - spec));
    if (!t) {
        cli_tool_t *g = realloc(ts->t, (size_t)(ts->n + 1) * sizeof *g);
        if (!g) return 1;
        ts->t = g;
        t = &ts->t[ts->n++];
        memset(t, 0, sizeof *t);
        t->name = strndup(spec, (size_t)(eq - spec));
        if (!t->name) return 1;
    }
    char **slot = schema ? &t->schema_file : &t->cmd;
    free(*slot);
    *slot = strdup(eq + 1);
    return *slot ? 0 : 1;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* *result_json = a kvm_malloc'd copy of s[0..n) (the library frees tool results with kvm_free). */
static int give(const char *s, size_t n, char **result_json) {
    char *p = kvm_malloc(n + 1);
    if (!p) return KVM_ENOMEM;
    memcpy(p, s, n);
    p[n] = 0;
    *result_json = p;
    return 0;
}

static int fail(char **result_json, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(char **result_json, int code, const char *fmt, ...) {
    char buf[768];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
    give(buf, (size_t)n, result_json);
    return code;
}

typedef struct buf {
    char *p;
    size_t n, cap;
} buf_t;

/* Reads what fd has into b (at most max bytes kept; *over set past it). 1 at EOF, 0 otherwise, -1 on error. */
static int drain(int fd, buf_t *b, size_t max, bool *over) {
    char tmp[16384];
    ssize_t k = read(fd, tmp, sizeof tmp);
    if (k == 0) return 1;
    if (k < 0) return errno == EINTR || errno == EAGAIN ? 0 : -1;
    size_t keep = (size_t)k;
    if (b->n + keep > max) {
        *over = true;
        keep = max > b->n ? max - b->n : 0;
    }
    if (b->n + keep + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + keep + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return -1;
        b->p = p, b->cap = cap;
    }
    memcpy(b->p + b->n, tmp, keep);
    b->n += keep;
    b->p[b->n] = 0;
    return 0;
}

/* The tool's stderr as one line for an error message: its last TOOL_ERR_KEEP bytes, newlines as "; ". */
static void err_line(const buf_t *e, char *out, size_t cap) {
    size_t n = e->n, s = n > TOOL_ERR_KEEP ? n - TOOL_ERR_KEEP : 0, o = 0;
    while (n > s && (e->p[n - 1] == '\n' || e->p[n - 1] == ' ')) n--;
    for (size_t i = s; i < n && o + 3 < cap; i++) {
        unsigned char c = (unsigned char)e->p[i];
        if (c == '\n') out[o++] = ';', out[o++] = ' ';
        else out[o++] = c < 0x20 ? ' ' : (char)c;
    }
    out[o] = 0;
}

/* One call: sh -c COMMAND, the arguments on stdin, the result from stdout, within the run's time budget. */
static int run_tool(void *ud, const kvm_tool_call_t *call, char **result_json) {
    const cli_tool_t *t = ud;
    const double limit = call->ms_left >= 0 ? call->ms_left : TOOL_DEFAULT_MS;
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
    if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) {
        int e = errno;
        for (int i = 0; i < 2; i++) {
            if (in[i] >= 0) close(in[i]);
            if (out[i] >= 0) close(out[i]);
            if (err[i] >= 0) close(err[i]);
        }
        return fail(result_json, KVM_EIO, "cannot make pipes for '%s': %s", t->cmd, strerror(e));
    }
    pid_t pid = fork();
    if (pid == 0) { /* the child: its own process group, so that a time-out kills what the command started too */
        setpgid(0, 0);
        dup2(in[0], 0), dup2(out[1], 1), dup2(err[1], 2);
        setenv("KVMESH_TOOL", call->tool, 1);
        if (call->run_id) setenv("KVMESH_RUN_ID", call->run_id, 1);
        if (call->node) setenv("KVMESH_NODE", call->node, 1);
        execl("/bin/sh", "sh", "-c", t->cmd, (char *)NULL);
        _exit(127);
    }
    close(in[0]), close(out[1]), close(err[1]);
    if (pid < 0) {
        int e = errno;
        close(in[1]), close(out[0]), close(err[0]);
        return fail(result_json, KVM_EIO, "cannot start '%s': %s", t->cmd, strerror(e));
    }
    fcntl(in[1], F_SETFL, O_NONBLOCK);
    const size_t args_n = strlen(call->args_json);
    size_t sent = 0;
    buf_t ob = {0}, eb = {0};
    bool o_eof = false, e_eof = false, over = false, eover = false, timed_out = false, io_err = false;
    const double t_end = now_ms() + limit;
    int wfd = in[1];
    while (!o_eof || !e_eof) {
        struct pollfd p[3];
        int np = 0, io = -1, ie = -1, iw = -1;
        if (!o_eof) io = np, p[np++] = (struct pollfd){.fd = out[0], .events = POLLIN};
        if (!e_eof) ie = np, p[np++] = (struct pollfd){.fd = err[0], .events = POLLIN};
        if (wfd >= 0) iw = np, p[np++] = (struct pollfd){.fd = wfd, .events = POLLOUT};
        double left = t_end - now_ms();
        if (left <= 0) {
            timed_out = true;
            break;
        }
        int r = poll(p, (nfds_t)np, left > 1000 ? 1000 : (int)left + 1);
        if (r < 0 && errno != EINTR) {
            io_err = true;
            break;
        }
        if (r <= 0) continue;
        if (iw >= 0 && p[iw].revents) {
            ssize_t k = (p[iw].revents & POLLOUT) ? write(wfd, call->args_json + sent, args_n - sent) : -1;
            if (k > 0) sent += (size_t)k;
            if (k < 0 && errno == EAGAIN) k = 0;
            if (k < 0 || sent == args_n) { /* all written, or the command closed its stdin (EPIPE: it needs none) */
                close(wfd);
                wfd = -1;
            }
        }
        if (io >= 0 && p[io].revents) {
            int d = drain(out[0], &ob, TOOL_OUT_MAX, &over);
            if (d) o_eof = true, io_err |= d < 0;
        }
        if (ie >= 0 && p[ie].revents) {
            int d = drain(err[0], &eb, 1u << 16, &eover);
            if (d) e_eof = true, io_err |= d < 0;
        }
    }
    if (wfd >= 0) close(wfd);
    close(out[0]), close(err[0]);
    int st = 0;
    if (timed_out || io_err) kill(-pid, SIGKILL);
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    char line[TOOL_ERR_KEEP * 2 + 8];
    err_line(&eb, line, sizeof line);
    int rc = 0;
    if (timed_out)
        rc = fail(result_json, KVM_ETIMEDOUT, "'%s' gave no answer within %.0f ms (killed)", t->cmd, limit);
    else if (io_err)
        rc = fail(result_json, KVM_EIO, "reading the output of '%s' failed", t->cmd);
    else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        rc = WIFEXITED(st) ? fail(result_json, KVM_EIO, "'%s' exited with status %d%s%s", t->cmd, WEXITSTATUS(st), line[0] ? ": " : "", line)
                           : fail(result_json, KVM_EIO, "'%s' was killed by signal %d", t->cmd, WTERMSIG(st));
    else if (over)
        rc = fail(result_json, KVM_ERANGE, "'%s' printed more than %u MiB", t->cmd, TOOL_OUT_MAX >> 20);
    else {
        size_t n = ob.n;
        while (n && (ob.p[n - 1] == '\n' || ob.p[n - 1] == '\r' || ob.p[n - 1] == ' ')) n--;
        if (n == 0) {
            *result_json = NULL; /* nothing printed: nil */
        } else {
            cJSON *j = cJSON_ParseWithLength(ob.p, n);
            if (!j)
                rc = fail(result_json, KVM_EFORMAT, "'%s' printed no JSON value on stdout (it begins '%.*s')", t->cmd,
                          (int)(n < 40 ? n : 40), ob.p);
            else rc = give(ob.p, n, result_json);
            cJSON_Delete(j);
        }
    }
    free(ob.p), free(eb.p);
    return rc;
}

static char *read_file(const char *path, const char *who, const char *name) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "%s: --tool-schema %s=%s: %s\n", who, name, path, strerror(errno));
        return NULL;
    }
    char *p = malloc(TOOL_SCHEMA_MAX + 1);
    size_t n = p ? fread(p, 1, TOOL_SCHEMA_MAX + 1, f) : 0;
    fclose(f);
    if (!p) return NULL;
    if (n > TOOL_SCHEMA_MAX) {
        fprintf(stderr, "%s: --tool-schema %s=%s: larger than %u KiB\n", who, name, path, TOOL_SCHEMA_MAX >> 10);
        free(p);
        return NULL;
    }
    p[n] = 0;
    return p;
}

int cli_tools_register(cli_tools_t *ts, kvm_runtime_t *rt, const char *who) {
    for (int i = 0; ts && i < ts->n; i++) {
        cli_tool_t *t = &ts->t[i];
        if (!t->cmd) {
            fprintf(stderr, "%s: --tool-schema %s=... names no tool (add --tool %s=COMMAND)\n", who, t->name, t->name);
            return 2;
        }
        char *schema = t->schema_file ? read_file(t->schema_file, who, t->name) : NULL;
        if (t->schema_file && !schema) return 2;
        if (kvm_runtime_add_tool(rt, t->name, NULL, schema ? schema : "{\"type\": \"object\"}", run_tool, t) != 0) {
            fprintf(stderr, "%s: --tool %s: %s\n", who, t->name, kvm_errmsg());
            free(schema);
            return 2;
        }
        free(schema);
    }
    if (ts && ts->n) signal(SIGPIPE, SIG_IGN); /* a command that exits before reading its arguments */
    return 0;
}

void cli_tools_free(cli_tools_t *ts) {
    if (!ts) return;
    for (int i = 0; i < ts->n; i++) free(ts->t[i].name), free(ts->t[i].cmd), free(ts->t[i].schema_file);
    free(ts->t);
    free(ts);
}
