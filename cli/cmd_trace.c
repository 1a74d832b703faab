/* cmd_trace.c - `kvmesh trace ls|show|steps|diff|replay|export`: a debugger for run traces (docs/trace-format.md) on
 * include/kvmesh.h. It parses arguments and prints: the views are the library's (kvm_trace_view_*), the replay
 * is kvm_trace_replay on a runtime made from the CLI's settings. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <kvmesh.h>

#include "cli_env.h"
#include "cli_pager.h"
#include "cmd_replay.h"
#include "lab/lab.h"

int cmd_trace_blame(int argc, char **argv); /* cmd_blame.c: blame, label, cache */

static void usage(FILE *f) {
    fprintf(f, "usage: kvmesh trace ls DIR... [--workflow W] [--status ok|error] [--agent A] [--since T] [--until T]\n"
               "                                           list the runs under trace directories: those whose workflow\n"
               "                                           path or graph contains W, that ended ok / failed, in which agent\n"
               "                                           A made a step, started in [since, until) (T: YYYY-MM-DD or\n"
               "                                           YYYY-MM-DDTHH:MM[:SS], UTC)\n"
               "       kvmesh trace search TEXT DIR...     every record of every run that contains TEXT (any case)\n"
               "       kvmesh trace show RUN_DIR...        a run: header, steps (who, tokens, reuse, timings), edges, result\n"
               "       kvmesh trace steps RUN_DIR [--step N] [--full]\n"
               "                                           what each agent saw (pieces, placeholders) and said, and its KV\n"
               "       kvmesh trace diff RUN_A RUN_B        two runs step by step (e.g. dense and kvcomm of one seed): how each\n"
               "                                           step got its KV, which outputs differ, where the runs first part;\n"
               "                                           exit status 1 when an output differs\n"
               "       kvmesh trace replay RUN_DIR [--model PATH | --mock]\n"
               "                                           re-run the recorded script with the recorded inputs, seed and\n"
               "                                           switches; compare every agent's output with the trace\n"
               "       kvmesh trace export RUN_DIR [--otlp-json | --whowhen | --jsonl] [--content truncated|none|full]\n"
               "                           [-o FILE]       the run's trace as OTLP/JSON spans (OpenTelemetry GenAI\n"
               "                                           conventions; the default), as a Who&When log, or as its complete\n"
               "                                           records; --content: message content in OTLP (truncated: 4 KiB\n"
               "                                           per message, the default); -o: to FILE instead of stdout\n"
               "       kvmesh trace replay RUN_DIR --from-step N [--kv P] [--edit-output FILE]\n"
               "                                           re-run from step N with its output replaced or generated\n"
               "                                           again (kvmesh trace replay --from-step 0 --help)\n"
               "       kvmesh trace blame|label|cache ...  which agent and step made a run fail; the error-schema\n"
               "                                           cache (kvmesh trace blame --help)\n\n"
               "RUN_DIR is a run's directory (holding events.jsonl), as printed by kvmesh run.\n\n"
               "On a terminal the views (ls, search, show, steps, diff) are in colour and go through a pager\n"
               "($KVMESH_PAGER, else $PAGER, else less -FRX; cat for none); piped, plain text.\n"
               "  --color auto|always|never   colour (default auto: on a terminal, unless NO_COLOR is set)\n"
               "  --no-pager                   write to the terminal directly\n");
}

static cli_out_opts_t g_out_opts; /* --color / --no-pager of this command */
static cli_out_t g_out;           /* opened at the first view printed, closed at the end of cmd_trace */

/* Prints a view's text (0), or the error (1). On a terminal in colour and through a pager (cli_pager.h). */
static int print_view(const char *cmd, int rc, char *text) {
    if (rc < 0 || !text) {
        fprintf(stderr, "kvmesh %s: %s\n", cmd, kvm_errmsg());
        return 1;
    }
    if (!g_out.f) cli_out_open(&g_out, &g_out_opts);
    cli_out_text(&g_out, text);
    kvm_free(text);
    return 0;
}

/* Replays dir on a runtime of the CLI's settings and prints the comparison; exit status 0 when every output
 * matches. */
static int replay(const char *dir, const char *model, bool mock) {
    kvm_runtime_params_t rp = kvm_runtime_default_params();
    rp.model.backend = NULL; /* KVM_BACKEND, else the default */
    rp.model_override = mock ? "mock:echo" : model;
    rp.quiet = true;
    kvm_runtime_t *rt = cli_env_model_params(&rp.model) == 0 ? kvm_runtime_create(&rp) : NULL;
    if (rt && kvm_lab_add_functions(rt)) kvm_runtime_free(rt), rt = NULL; /* the scripts' kvmesh.minitasks (lab.h) */
    kvm_replay_t r = {0};
    char *text = NULL;
    int rc = rt ? kvm_trace_replay(rt, dir, &r) : -1;
    if (rc == 0 && (rc = kvm_trace_view_replay(&r, &text)) == 0) {
        fputs(text, stdout);
        rc = r.differ == 0 ? 0 : 1;
    } else {
        fprintf(stderr, "kvmesh trace replay: %s\n", kvm_errmsg());
        rc = 1;
    }
    kvm_free(text);
    kvm_replay_clear(&r);
    kvm_runtime_free(rt);
    return rc;
}

/* Options of `steps` and `replay`: one run directory plus flags. */
typedef struct dir_args {
    const char *dir, *model;
    int only;
    bool full, mock;
} dir_args_t;

static dir_args_t parse_dir_args(int argc, char **argv) {
    dir_args_t a = {.only = -1};
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--step") && i + 1 < argc) a.only = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--model") && i + 1 < argc) a.model = argv[++i];
        else if (!strcmp(argv[i], "--full")) a.full = true;
        else if (!strcmp(argv[i], "--mock")) a.mock = true;
        else a.dir = argv[i];
    }
    return a;
}

/* `trace export RUN_DIR [--otlp-json|--whowhen|--jsonl] [--content C] [-o FILE]`: 0, 1 (the run unreadable, FILE
 * not written) or 2 (usage). */
static int trace_export(int argc, char **argv) {
    kvm_trace_export_params_t p = kvm_trace_export_default_params();
    const char *dir = NULL, *file = NULL;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(a, "--otlp-json") || !strcmp(a, "--whowhen") || !strcmp(a, "--jsonl")) {
            p.format = kvm_trace_format_from_name(a + 2);
        } else if (!strcmp(a, "-o") || !strcmp(a, "--content")) {
            if (!v) {
                fprintf(stderr, "kvmesh trace export: %s needs a value (kvmesh trace --help)\n", a);
                return 2;
            }
            i++;
            if (a[1] == 'o') file = v;
            else if (!strcmp(v, "truncated") || !strcmp(v, "none") || !strcmp(v, "full"))
                p.content = v[0] == 't' ? KVM_TRACE_CONTENT_TRUNCATED : v[0] == 'n' ? KVM_TRACE_CONTENT_NONE : KVM_TRACE_CONTENT_FULL;
            else {
                fprintf(stderr, "kvmesh trace export: --content is truncated, none or full (got '%s')\n", v);
                return 2;
            }
        } else if (a[0] == '-' || dir) {
            fprintf(stderr, "kvmesh trace export: %s '%s' (kvmesh trace --help)\n", a[0] == '-' ? "unknown option" : "one run directory only, got also", a);
            return 2;
        } else dir = a;
    }
    if (!dir) {
        fprintf(stderr, "kvmesh trace export: give a run directory (kvmesh trace --help)\n");
        return 2;
    }
    char *text = NULL;
    size_t len = 0;
    if (kvm_trace_export(dir, &p, &text, &len)) {
        fprintf(stderr, "kvmesh trace export: %s\n", kvm_errmsg());
        return 1;
    }
    FILE *f = file ? fopen(file, "wb") : stdout;
    bool ok = f && fwrite(text, 1, len, f) == len;
    if (file && f) ok = fclose(f) == 0 && ok;
    else if (f) ok = fflush(f) == 0 && ok;
    int err = errno;
    kvm_free(text);
    if (!ok) {
        fprintf(stderr, "kvmesh trace export: cannot write '%s': %s\n", file ? file : "(stdout)", strerror(err));
        return 1;
    }
    return 0;
}

/* "YYYY-MM-DD[THH:MM[:SS]]" (UTC) as ns since 1970; false when malformed. */
static bool parse_when(const char *s, uint64_t *ns) {
    struct tm tmv = {0};
    int y, mo, d, h = 0, mi = 0, sec = 0, used = 0;
    int n = sscanf(s, "%4d-%2d-%2d%n", &y, &mo, &d, &used);
    if (n != 3) return false;
    if (s[used] == 'T' || s[used] == ' ') {
        int used2 = 0;
        if (sscanf(s + used + 1, "%2d:%2d%n", &h, &mi, &used2) != 2) return false;
        used += 1 + used2;
        if (s[used] == ':') {
            int used3 = 0;
            if (sscanf(s + used + 1, "%2d%n", &sec, &used3) != 1) return false;
            used += 1 + used3;
        }
    }
    if (s[used] || mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60) return false;
    tmv.tm_year = y - 1900, tmv.tm_mon = mo - 1, tmv.tm_mday = d, tmv.tm_hour = h, tmv.tm_min = mi, tmv.tm_sec = sec;
    time_t t = timegm(&tmv);
    if (t < 0) return false;
    *ns = (uint64_t)t * 1000000000ULL;
    return true;
}

/* `trace ls DIR... [filters]`: 0, 1 (a directory unreadable) or 2 (usage). */
static int trace_ls(int argc, char **argv) {
    kvm_trace_filter_t f = {0};
    const char *dirs[64];
    int n_dirs = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool valued = !strcmp(a, "--workflow") || !strcmp(a, "--status") || !strcmp(a, "--agent") || !strcmp(a, "--since") ||
                      !strcmp(a, "--until");
        if (valued && !v) {
            fprintf(stderr, "kvmesh trace ls: %s needs a value (kvmesh trace --help)\n", a);
            return 2;
        }
        if (valued) i++;
        if (!strcmp(a, "--workflow")) f.workflow = v;
        else if (!strcmp(a, "--agent")) f.agent = v;
        else if (!strcmp(a, "--status")) {
            f.status = !strcmp(v, "ok") ? 1 : !strcmp(v, "error") ? 2 : -1;
            if (f.status < 0) {
                fprintf(stderr, "kvmesh trace ls: --status is ok or error (got '%s')\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--since") || !strcmp(a, "--until")) {
            if (!parse_when(v, a[2] == 's' ? &f.since_ns : &f.until_ns)) {
                fprintf(stderr, "kvmesh trace ls: %s takes YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] in UTC (got '%s')\n", a, v);
                return 2;
            }
        } else if (a[0] == '-') {
            fprintf(stderr, "kvmesh trace ls: unknown option '%s' (kvmesh trace --help)\n", a);
            return 2;
        } else if (n_dirs < 64) dirs[n_dirs++] = a;
    }
    if (!n_dirs) {
        fprintf(stderr, "kvmesh trace ls: give at least one directory (kvmesh trace --help)\n");
        return 2;
    }
    int rc = 0;
    for (int i = 0; i < n_dirs; i++) {
        char *text = NULL;
        int n = kvm_trace_view_list_filtered(dirs[i], &f, &text);
        rc |= print_view("trace ls", n, text);
    }
    return rc;
}

static int cmd_trace_views(int argc, char **argv);

int cmd_trace(int argc, char **argv) {
    if (cli_out_strip_args(&argc, argv, &g_out_opts, "kvmesh trace")) return 2;
    int rc = cmd_trace_views(argc, argv);
    if (g_out.f) cli_out_close(&g_out);
    return rc;
}

static int cmd_trace_views(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *sub = argv[1];
    if (!strcmp(sub, "blame") || !strcmp(sub, "label") || !strcmp(sub, "cache")) return cmd_trace_blame(argc, argv);
    if (argc < 3) {
        fprintf(stderr, "kvmesh trace %s: give at least one directory (kvmesh trace --help)\n", sub);
        return 2;
    }
    int rc = 0;
    if (!strcmp(sub, "ls")) return trace_ls(argc, argv);
    if (!strcmp(sub, "export")) return trace_export(argc, argv);
    if (!strcmp(sub, "search")) {
        if (argc < 4) {
            fprintf(stderr, "kvmesh trace search: give the text and at least one directory (kvmesh trace --help)\n");
            return 2;
        }
        for (int i = 3; i < argc; i++) {
            char *text = NULL;
            int n = kvm_trace_view_search(argv[i], argv[2], &text);
            rc |= print_view("trace search", n, text);
        }
        return rc;
    }
    if (!strcmp(sub, "show")) {
        for (int i = 2; i < argc; i++) {
            char *text = NULL;
            int vrc = kvm_trace_view_run(argv[i], &text);
            rc |= print_view("trace", vrc, text);
        }
        return rc;
    }
    if (!strcmp(sub, "diff")) {
        if (argc != 4) {
            fprintf(stderr, "kvmesh trace diff: give two run directories (kvmesh trace --help)\n");
            return 2;
        }
        char *text = NULL;
        int n = kvm_trace_view_diff(argv[2], argv[3], &text);
        if (print_view("trace diff", n, text)) return 2;
        return n > 0 ? 1 : 0;
    }
    if (strcmp(sub, "steps") != 0 && strcmp(sub, "replay") != 0) {
        fprintf(stderr, "kvmesh trace: unknown subcommand '%s' (ls, search, show, steps, diff, replay, export, blame, label, cache)\n", sub);
        return 2;
    }
    for (int i = 2; !strcmp(sub, "replay") && i < argc; i++)
        if (!strcmp(argv[i], "--from-step")) return cmd_trace_replay_from(argc, argv); /* cmd_replay.c */
    dir_args_t a = parse_dir_args(argc, argv);
    if (!a.dir) {
        fprintf(stderr, "kvmesh trace %s: give a run directory\n", sub);
        return 2;
    }
    if (strcmp(sub, "steps") != 0) return replay(a.dir, a.model, a.mock);
    kvm_trace_view_params_t vp = kvm_trace_view_default_params();
    vp.step = a.only;
    vp.full = a.full;
    char *text = NULL;
    int vrc = kvm_trace_view_steps(a.dir, &vp, &text);
    return print_view("trace", vrc, text);
}
