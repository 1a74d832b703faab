/* cmd_replay.c - `kvmesh trace replay RUN_DIR --from-step N [--kv P] [--edit-output FILE]`: a counterfactual replay
 * of a traced run (docs/correct.md "Replay"), through kvm_run_params_t.replay; and the runtime replays run on (also
 * `kvmesh trace blame --verify`'s). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <kvmesh.h>

#include "cli_env.h"
#include "cmd_replay.h"
#include "lab/lab.h"

bool cli_trace_was_mock(const char *dir) {
    kvm_trace_reader_t *t = kvm_trace_reader_open(dir);
    bool mock = false;
    for (int i = 0; t && i < kvm_trace_reader_n_records(t); i++)
        if (!strcmp(kvm_trace_reader_record_type(t, i), "run.start")) {
            cJSON *o = cJSON_Parse(kvm_trace_reader_record_json(t, i));
            mock = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "mock"));
            cJSON_Delete(o);
            break;
        }
    kvm_trace_reader_free(t);
    return mock;
}

kvm_runtime_t *cli_replay_runtime(const char *cmd, const char *run_dir, const char *model, bool mock, const char *trace_root) {
    static char root[4096]; /* the folder holding run_dir (one runtime per command) */
    if (!trace_root) {
        size_t n = strlen(run_dir);
        while (n > 1 && run_dir[n - 1] == '/') n--;
        while (n > 0 && run_dir[n - 1] != '/') n--;
        while (n > 1 && run_dir[n - 1] == '/') n--;
        snprintf(root, sizeof root, "%.*s", n ? (int)n : 1, n ? run_dir : ".");
        trace_root = root;
    }
    kvm_runtime_params_t rp = kvm_runtime_default_params();
    rp.model.backend = NULL; /* KVM_BACKEND, else the default */
    rp.model_override = mock || (!model && cli_trace_was_mock(run_dir)) ? "mock:echo" : model;
    rp.trace_root = trace_root;
    rp.quiet = true;
    rp.echo_print = false;
    kvm_runtime_t *rt = cli_env_model_params(&rp.model) == 0 ? kvm_runtime_create(&rp) : NULL;
    if (rt && kvm_lab_add_functions(rt)) kvm_runtime_free(rt), rt = NULL; /* the scripts' kvmesh.minitasks (lab.h) */
    if (!rt) fprintf(stderr, "kvmesh %s: %s\n", cmd, kvm_errmsg());
    return rt;
}

static void usage(FILE *f) {
    fprintf(f, "usage: kvmesh trace replay RUN_DIR --from-step N [--kv dense|prefix|kvcomm] [--seed S] [--edit-output FILE]\n"
               "                          [--model PATH | --mock] [--trace DIR]\n"
               "  re-runs the traced run from its step N (0-based, as `kvmesh trace steps` numbers them): the agent steps\n"
               "  before N are given their recorded outputs, step N is given FILE's text (one trailing newline dropped;\n"
               "  an agent step only) or generated again (under --kv, with sampling seed S, when given), the rest is\n"
               "  generated. The new run's trace (under DIR, default the folder holding RUN_DIR) names its origin.\n"
               "  Exit status 0 when the replay passes (it ends ok and g:score, if the graph has one, is >= 1), 1 when\n"
               "  it fails or cannot run, 2 usage.\n");
}

/* FILE's text with one trailing newline dropped (malloc), or NULL (said). */
static char *read_text(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return NULL;
    }
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    for (size_t k; buf && (k = fread(buf + n, 1, cap - n - 1, f)) > 0;) {
        n += k;
        if (n + 1 == cap) {
            char *b = n < (64u << 20) ? realloc(buf, cap *= 2) : NULL;
            if (!b) free(buf);
            buf = b;
        }
    }
    bool err = ferror(f);
    fclose(f);
    if (!buf || err) {
        fprintf(stderr, "%s: cannot read it (%s)\n", path, buf ? "read error" : "over 64 MiB or out of memory");
        free(buf);
        return NULL;
    }
    if (n > 0 && buf[n - 1] == '\n') n--;
    if (n > 0 && buf[n - 1] == '\r') n--;
    buf[n] = '\0';
    if (strlen(buf) != n) {
        fprintf(stderr, "%s: holds a NUL byte: not text\n", path);
        free(buf);
        return NULL;
    }
    return buf;
}

int cmd_trace_replay_from(int argc, char **argv) {
    const char *dir = NULL, *kv = NULL, *edit = NULL, *model = NULL, *trace = NULL, *step_s = NULL, *seed_s = NULL;
    bool mock = false;
    for (int i = 2; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(o, "-h") || !strcmp(o, "--help")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(o, "--mock")) {
            mock = true;
            continue;
        }
        const char **slot = !strcmp(o, "--from-step") ? &step_s : !strcmp(o, "--kv") ? &kv : !strcmp(o, "--edit-output") ? &edit
                          : !strcmp(o, "--model") ? &model : !strcmp(o, "--trace") ? &trace : !strcmp(o, "--seed") ? &seed_s : NULL;
        if (slot && !v) {
            fprintf(stderr, "kvmesh trace replay: %s needs a value (kvmesh trace replay --from-step 0 --help)\n", o);
            return 2;
        }
        if (slot) *slot = v, i++;
        else if (o[0] == '-') {
            fprintf(stderr, "kvmesh trace replay: unknown option '%s' (kvmesh trace replay --from-step 0 --help)\n", o);
            return 2;
        } else if (!dir) dir = o;
        else {
            fprintf(stderr, "kvmesh trace replay: one argument too many: '%s'\n", o);
            return 2;
        }
    }
    char *end = NULL;
    long step = step_s ? strtol(step_s, &end, 10) : -1;
    if (!dir || !step_s || !*step_s || *end || step < 0 || step > 1000000) {
        fprintf(stderr, "kvmesh trace replay: give RUN_DIR and --from-step N (a step number >= 0, as `kvmesh trace steps` "
                        "prints%s%s)\n", step_s ? "; got " : "", step_s ? step_s : "");
        return 2;
    }
    unsigned long long seed = seed_s ? strtoull(seed_s, &end, 10) : 0;
    if (seed_s && (!*seed_s || *end || seed_s[0] == '-' || seed >= (1ULL << 53))) {
        fprintf(stderr, "kvmesh trace replay: --seed takes a number below 2^53 (got '%s')\n", seed_s);
        return 2;
    }
    kvm_kv_policy_t pol;
    if (kv && kvm_kv_policy_parse(kv, &pol) != 0) {
        fprintf(stderr, "kvmesh trace replay: --kv is dense, prefix or kvcomm (got '%s')\n", kv);
        return 2;
    }
    if ((kv || seed_s) && edit) {
        fprintf(stderr, "kvmesh trace replay: --kv and --seed are for a step generated again; --edit-output gives the step its text\n");
        return 2;
    }
    char *text = NULL;
    if (edit && !(text = read_text(edit))) {
        fprintf(stderr, "kvmesh trace replay: cannot use --edit-output %s\n", edit);
        return 1;
    }
    kvm_runtime_t *rt = cli_replay_runtime("trace replay", dir, model, mock, trace);
    kvm_workflow_t *wf = rt ? kvm_workflow_load_trace(rt, dir, NULL) : NULL;
    if (rt && !wf) fprintf(stderr, "kvmesh trace replay: %s\n", kvm_errmsg());
    kvm_run_params_t p = kvm_run_default_params();
    p.resume_trace = dir;
    p.replay = true;
    p.replay_step = (int)step;
    p.replay_output = text;
    p.kv = kv;
    p.replay_seed = seed;
    kvm_run_t *r = wf ? kvm_run_start(wf, &p) : NULL;
    int rc = 1;
    if (wf && !r) fprintf(stderr, "kvmesh trace replay: %s\n", kvm_errmsg());
    else if (r && kvm_workflow_drive(wf) < 0) fprintf(stderr, "kvmesh trace replay: %s\n", kvm_errmsg());
    else if (r) {
        const char *msg = NULL;
        int st = kvm_run_status(r, &msg);
        double score = 0;
        bool scored = st == 0 && kvm_workflow_has_score(wf) && kvm_run_score(r, &score) == 1;
        bool passed = st == 0 && (!kvm_workflow_has_score(wf) || (scored && score >= 1.0));
        printf("replay of %s from step %ld: %s\n", dir, step, text ? "its output given from --edit-output" : "generated again");
        if (kv) printf("  step %ld under kv %s\n", step, kv);
        if (seed) printf("  step %ld with sampling seed %llu\n", step, seed);
        printf("run %s: %s%s%s", kvm_run_id(r), st ? kvm_errname(st) : "ok", st && msg ? ": " : "", st && msg ? msg : "");
        if (scored) printf(", score %.3f", score);
        printf(" -> %s\n", passed ? "passed" : "failed");
        if (kvm_run_trace_dir(r)) printf("trace: %s\n", kvm_run_trace_dir(r));
        rc = passed ? 0 : 1;
    }
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
    free(text);
    return rc;
}
