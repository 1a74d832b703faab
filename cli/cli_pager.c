/* cli_pager.c - how the trace debugger's views reach a person: on a terminal, in colour and through a pager; piped
 * or redirected, plain text exactly as the library wrote it (cli_pager.h). */
#include "cli_pager.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define RED "\033[31m"
#define GREEN "\033[32m"
#define YELLOW "\033[33m"
#define BOLD "\033[1m"
#define RESET "\033[0m"

int cli_out_strip_args(int *argc, char **argv, cli_out_opts_t *o, const char *who) {
    int w = 0;
    for (int i = 0; i < *argc; i++) {
        const char *a = argv[i], *v = NULL;
        if (!strcmp(a, "--no-pager")) {
            o->no_pager = true;
            continue;
        }
        if (!strncmp(a, "--color=", 8) || !strncmp(a, "--colour=", 9)) v = strchr(a, '=') + 1;
        else if (!strcmp(a, "--color") || !strcmp(a, "--colour")) {
            if (i + 1 >= *argc) {
                fprintf(stderr, "%s: %s needs auto, always or never\n", who, a);
                return 2;
            }
            v = argv[++i];
        }
        if (v) {
            if (!strcmp(v, "auto")) o->color = CLI_COLOR_AUTO;
            else if (!strcmp(v, "always")) o->color = CLI_COLOR_ALWAYS;
            else if (!strcmp(v, "never")) o->color = CLI_COLOR_NEVER;
            else {
                fprintf(stderr, "%s: --color takes auto, always or never (got '%s')\n", who, v);
                return 2;
            }
            continue;
        }
        argv[w++] = argv[i];
    }
    *argc = w;
    argv[w] = NULL;
    return 0;
}

void cli_out_open(cli_out_t *out, const cli_out_opts_t *o) {
    memset(out, 0, sizeof *out);
    out->f = stdout;
    const bool tty = isatty(1);
    const char *nc = getenv("NO_COLOR"); /* https://no-color.org: set and non-empty turns colour off */
    out->color = o->color == CLI_COLOR_ALWAYS || (o->color == CLI_COLOR_AUTO && tty && !(nc && nc[0]));
    if (!tty || o->no_pager) return;
    const char *pager = getenv("KVMESH_PAGER");
    if (!pager) pager = getenv("PAGER");
    if (!pager) pager = "less -FRX"; /* quits when it fits one screen, keeps colours, leaves the text on screen */
    if (!pager[0] || !strcmp(pager, "cat")) return;
    fflush(stdout);
    FILE *p = popen(pager, "w");
    if (!p) return;
    signal(SIGPIPE, SIG_IGN); /* the reader quit the pager early: writes fail, the command ends normally */
    out->pipe = p;
    out->f = p;
}

/* Whether the word w (length n) at line[at] stands alone: not inside a longer word. */
static bool alone(const char *line, size_t at, size_t n, size_t len) {
    const char *ok = " \t()[]:,=|/";
    return (at == 0 || strchr(ok, line[at - 1])) && (at + n == len || strchr(ok, line[at + n]) || line[at + n] == '\n');
}

/* One line in colour: failures red, successes green, KV decisions of reuse yellow, section heads bold. */
static void color_line(FILE *f, const char *line, size_t len) {
    static const struct {
        const char *w, *c;
    } words[] = {{"ok", GREEN},     {"passed", GREEN},  {"PASS", GREEN},    {"error", RED},  {"FAILED", RED},
                 {"failed", RED},   {"FAIL", RED},      {"timeout", RED},   {"canceled", RED}, {"interrupted", YELLOW},
                 {"reuse", YELLOW}, {"given", YELLOW},  {"DIFF", RED},      {"first divergence", RED}};
    bool head = len && (!strncmp(line, "run ", 4) || !strncmp(line, "result:", 7) || !strncmp(line, "steps:", 6) ||
                        !strncmp(line, "== ", 3));
    if (head) fputs(BOLD, f);
    size_t i = 0;
    while (i < len) {
        bool done = false;
        if (!strncmp(line + i, "KVM_E", 5) && (i == 0 || strchr(" \t()[]:,=|/", line[i - 1]))) {
            size_t n = 5;
            while (i + n < len && ((line[i + n] >= 'A' && line[i + n] <= 'Z') || line[i + n] == '_')) n++;
            if (n > 5) {
                fprintf(f, RED "%.*s" RESET "%s", (int)n, line + i, head ? BOLD : "");
                i += n;
                continue;
            }
        }
        for (size_t k = 0; k < sizeof words / sizeof *words && !done; k++) {
            size_t n = strlen(words[k].w);
            if (i + n <= len && !strncmp(line + i, words[k].w, n) && alone(line, i, n, len)) {
                fprintf(f, "%s%.*s" RESET "%s", words[k].c, (int)n, line + i, head ? BOLD : "");
                i += n;
                done = true;
            }
        }
        if (!done) fputc(line[i++], f);
    }
    if (head) fputs(RESET, f);
}

void cli_out_text(cli_out_t *out, const char *text) {
    if (!out->color) {
        fputs(text, out->f);
        return;
    }
    for (const char *p = text; *p;) {
        const char *nl = strchr(p, '\n');
        size_t n = nl ? (size_t)(nl - p) : strlen(p);
        color_line(out->f, p, n);
        if (nl) fputc('\n', out->f);
        p += n + (nl ? 1 : 0);
    }
}

void cli_out_close(cli_out_t *out) {
    if (out->pipe) pclose(out->pipe);
    else fflush(out->f);
    out->pipe = NULL;
    out->f = stdout;
}
