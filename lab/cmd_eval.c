/* cmd_eval.c - `kvmesh eval minitasks` (lab/, on include/kvmesh.h): accuracy of a model on held-out minitasks items.
 *
 *   kvmesh eval minitasks --model PATH [--n N] [--seed S] [--task T|all] [--all-roles] [--max-tokens K]
 *                         [--backend B] [--show-wrong K] [--json]
 *
 * Items come from the eval split (seed 1000 by default, a content partition never used in training,
 * docs/minitasks.md); each is run greedily with the kvmesh engine and scored by exact match after
 * trimming whitespace. Content k of a task is asked under role k % n_roles, or under every role with
 * --all-roles, which also reports how often all roles of one content are right (the role-variant
 * check). A progress bar goes to stderr; the table (or one JSON object) to stdout. Exit 0 when the run
 * completed, whatever the accuracy. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <kvmesh.h>
#include <kvmesh_lab.h>

#include "lab.h"
#include "minitasks_eval.h"

static void eval_help(FILE *f) {
    fprintf(f,
            "usage: kvmesh eval minitasks --model PATH [options]\n\n"
            "Greedy exact-match accuracy on held-out minitasks items, per task and per role.\n\n"
            "  --model PATH      HF model directory (a bundled model: models/minillama-2m, models/miniqwen3-6m)\n"
            "  --n N             contents per task (default 100)\n"
            "  --seed S          eval seed (default %u; training uses seeds below %u)\n"
            "  --task T          recall, arithmetic, transform, team, story or all (default: all but story)\n"
            "  --all-roles       ask every content under every role of its task (role-variant check)\n"
            "  --max-tokens K    new tokens at most per answer (default 48; story 4x)\n"
            "  --backend B       auto (default), cpu or cuda\n"
            "  --show-wrong K    print up to K wrong answers per task on stderr\n"
            "  --json            print one JSON object instead of the table\n",
            KVM_MT_DEFAULT_EVAL_SEED, KVM_MT_EVAL_SEED_MIN);
}

typedef struct role_stat {
    int ok, n;
} role_stat_t;

typedef struct task_stat {
    int task;
    int ok, n;
    int contents, contents_all_ok;
    role_stat_t roles[KVM_MT_MAX_ROLES];
    double seconds;
} task_stat_t;

static void progress(const char *task, int done, int total, int ok) {
    if (!isatty(2) && done != total && done % 50) return;
    int width = 30, fill = total ? done * width / total : width;
    fprintf(stderr, "\r%-10s [", task);
    for (int i = 0; i < width; i++) fputc(i < fill ? '#' : '.', stderr);
    fprintf(stderr, "] %d/%d  acc %5.1f%%", done, total, done ? 100.0 * ok / done : 0.0);
    if (done == total) fputc('\n', stderr);
    fflush(stderr);
}

static int parse_int(const char *s, const char *opt, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "kvmesh eval: %s must be an integer in [%ld, %ld], got '%s'\n", opt, lo, hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int eval_minitasks(int argc, char **argv, kvm_lab_params_fn fill) {
    const char *model_path = NULL, *backend = NULL;
    long n = 100, seed = KVM_MT_DEFAULT_EVAL_SEED, max_tokens = 48, show_wrong = 0;
    int only_task = -1;
    bool all_roles = false, json = false, story = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            eval_help(stdout);
            return 0;
        } else if (!strcmp(a, "--all-roles")) {
            all_roles = true;
        } else if (!strcmp(a, "--json")) {
            json = true;
        } else if (i + 1 >= argc) {
            fprintf(stderr, "kvmesh eval: unknown option or missing value '%s' (see --help)\n", a);
            return 2;
        } else if (!strcmp(a, "--model")) {
            model_path = argv[++i];
        } else if (!strcmp(a, "--backend")) {
            backend = argv[++i];
        } else if (!strcmp(a, "--n")) {
            if (parse_int(argv[++i], a, 1, 1000000, &n)) return 2;
        } else if (!strcmp(a, "--seed")) {
            if (parse_int(argv[++i], a, 0, 0x7fffffffL, &seed)) return 2;
        } else if (!strcmp(a, "--max-tokens")) {
            if (parse_int(argv[++i], a, 1, 4096, &max_tokens)) return 2;
        } else if (!strcmp(a, "--show-wrong")) {
            if (parse_int(argv[++i], a, 0, 1000000, &show_wrong)) return 2;
        } else if (!strcmp(a, "--task")) {
            const char *t = argv[++i];
            if (strcmp(t, "all")) {
                only_task = kvm_mt_task_from_name(t);
                if (only_task < 0) {
                    fprintf(stderr, "kvmesh eval: unknown task '%s' (recall, arithmetic, transform, team, story, all)\n", t);
                    return 2;
                }
            }
        } else {
            fprintf(stderr, "kvmesh eval: unknown option '%s' (see --help)\n", a);
            return 2;
        }
    }
    if (!model_path) {
        fprintf(stderr, "kvmesh eval minitasks: --model is required (see --help)\n");
        return 2;
    }
    if (seed < (long)KVM_MT_EVAL_SEED_MIN)
        fprintf(stderr, "kvmesh eval: warning: seed %ld is in the training range (< %u); items still come from the "
                        "held-out content partition\n", seed, KVM_MT_EVAL_SEED_MIN);
    story = only_task == KVM_MT_STORY;
    kvm_model_params_t mp = {.backend = backend, .quiet = true};
    if ((fill && fill(&mp)) || kvm_model_params_check(&mp)) {
        fprintf(stderr, "kvmesh eval: %s\n", kvm_errmsg());
        return 2;
    }
    kvm_model_t *m = kvm_model_load(model_path, &mp);
    if (!m) {
        fprintf(stderr, "kvmesh eval: %s\n", kvm_errmsg());
        return 1;
    }
    kvm_model_info_t info;
    kvm_model_info(m, &info);
    kvm_mt_run_t run;
    if (kvm_mt_run_init(&run, m, (int)max_tokens)) {
        fprintf(stderr, "kvmesh eval: %s\n", kvm_errmsg());
        kvm_model_free(m);
        return 1;
    }
    static const int order[] = {KVM_MT_RECALL, KVM_MT_ARITH, KVM_MT_TRANSFORM, KVM_MT_TEAM, KVM_MT_STORY};
    task_stat_t stats[KVM_MT_N_TASKS];
    int n_stats = 0, rc = 0;
    for (size_t oi = 0; oi < sizeof order / sizeof order[0] && !rc; oi++) {
        int t = order[oi];
        if (only_task >= 0 ? t != only_task : (t == KVM_MT_STORY && !story)) continue;
        task_stat_t *st = &stats[n_stats++];
        memset(st, 0, sizeof *st);
        st->task = t;
        int nr = kvm_mt_n_roles(t);
        int total = (int)n * (all_roles ? nr : 1), done = 0, shown = 0;
        uint64_t t0 = kvm_now_ns();
        for (long k = 0; k < n && !rc; k++) {
            bool content_ok = true;
            for (int r = all_roles ? 0 : (int)(k % nr); r < (all_roles ? nr : (int)(k % nr) + 1); r++) {
                kvm_mt_item_t it;
                char *out = NULL;
                rc = kvm_mt_make(&it, t, KVM_MT_EVAL, (uint64_t)seed, (uint64_t)k, r);
                if (!rc) rc = kvm_mt_run_item(&run, &it, &out);
                if (rc) break;
                bool ok = kvm_mt_score(&it, out);
                st->ok += ok;
                st->n++;
                st->roles[r].ok += ok;
                st->roles[r].n++;
                content_ok = content_ok && ok;
                if (!ok && shown < show_wrong) {
                    shown++;
                    fprintf(stderr, "\nwrong %s: expected '%s', got '%s'\n", it.id, it.answer, out);
                }
                kvm_free(out);
                progress(kvm_mt_task_name(t), ++done, total, st->ok);
            }
            st->contents++;
            st->contents_all_ok += content_ok;
        }
        st->seconds = (double)(kvm_now_ns() - t0) / 1e9;
    }
    if (rc) {
        fprintf(stderr, "\nkvmesh eval: %s\n", kvm_errmsg());
        kvm_mt_run_free(&run);
        kvm_model_free(m);
        return 1;
    }
    if (json) {
        printf("{\"model\":\"%s\",\"seed\":%ld,\"n\":%ld,\"all_roles\":%s,\"tasks\":{", info.name, seed, n,
               all_roles ? "true" : "false");
        for (int i = 0; i < n_stats; i++) {
            task_stat_t *st = &stats[i];
            printf("%s\"%s\":{\"acc\":%.4f,\"items\":%d,\"seconds\":%.1f,\"roles\":{", i ? "," : "",
                   kvm_mt_task_name(st->task), st->n ? (double)st->ok / st->n : 0.0, st->n, st->seconds);
            for (int r = 0; r < kvm_mt_n_roles(st->task); r++)
                printf("%s\"%s\":%.4f", r ? "," : "", kvm_mt_role_name(st->task, r),
                       st->roles[r].n ? (double)st->roles[r].ok / st->roles[r].n : 0.0);
            printf("}");
            if (all_roles) printf(",\"all_roles_right\":%.4f", (double)st->contents_all_ok / st->contents);
            printf("}");
        }
        printf("}}\n");
    } else {
        printf("model %s, eval seed %ld, %ld contents per task%s\n", info.name, seed, n,
               all_roles ? ", every role" : ", role = content % roles");
        printf("%-11s %8s %7s  %s\n", "task", "accuracy", "items", "per role");
        for (int i = 0; i < n_stats; i++) {
            task_stat_t *st = &stats[i];
            printf("%-11s %7.1f%% %7d  ", kvm_mt_task_name(st->task), st->n ? 100.0 * st->ok / st->n : 0.0, st->n);
            for (int r = 0; r < kvm_mt_n_roles(st->task); r++)
                if (st->roles[r].n)
                    printf("%s %.1f%%  ", kvm_mt_role_name(st->task, r), 100.0 * st->roles[r].ok / st->roles[r].n);
            if (all_roles) printf("| all roles right %.1f%%", 100.0 * st->contents_all_ok / st->contents);
            printf(" (%.1fs)\n", st->seconds);
        }
    }
    kvm_mt_run_free(&run);
    kvm_model_free(m);
    return 0;
}

int kvm_lab_cmd_eval(int argc, char **argv, kvm_lab_params_fn fill) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fprintf(argc < 2 ? stderr : stdout, "usage: kvmesh eval minitasks --model PATH [options]  (kvmesh eval minitasks --help)\n");
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "minitasks")) return eval_minitasks(argc - 1, argv + 1, fill);
    fprintf(stderr, "kvmesh eval: unknown suite '%s' (available: minitasks)\n", argv[1]);
    return 2;
}
