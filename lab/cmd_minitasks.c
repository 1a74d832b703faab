/* cmd_minitasks.c - `kvmesh minitasks`: print minitasks items (training / evaluation data).
 *
 *   kvmesh minitasks gen --seed S --n N [--task T|all] [--split train|eval] [--role R|all] [--start K]
 *   kvmesh minitasks roles
 *
 * `gen` prints one JSON object per line: {"task","role","system","user","answer","id"}. --role all
 * prints every role of each content (the role-variant pairs). Only libc + lab/minitasks.c (and the status module
 * and PRNG of the core), so scripts/train/ can build this command as a standalone static generator. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kvmesh.h>

#include "lab.h"
#include "minitasks.h"

static void mt_usage(FILE *f) {
    fprintf(f,
            "usage: kvmesh minitasks gen --seed S --n N [--task T|all] [--split train|eval] [--role R|all] [--start K]\n"
            "                            [--facts LO-HI]\n"
            "       kvmesh minitasks roles\n\n"
            "  gen    print N items as JSON lines {task, role, system, user, answer, id}\n"
            "         --task all (default) draws tasks from the training mixture; --role all prints\n"
            "         every role of each item; --facts sets the number of facts of recall/team items\n"
            "         (training curriculum; default 8-48 / 8-32); seeds: training uses 1..999, evaluation >= %u\n"
            "  roles  list the tasks, their roles and system prompts\n",
            KVM_MT_EVAL_SEED_MIN);
}

static int mt_parse_u64(const char *s, const char *what, unsigned long long *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-') {
        fprintf(stderr, "kvmesh minitasks: %s must be a non-negative integer, got '%s'\n", what, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int mt_cmd_roles(void) {
    for (int t = 0; t < KVM_MT_N_TASKS; t++)
        for (int r = 0; r < kvm_mt_n_roles(t); r++)
            printf("%-11s %-10s %s\n", kvm_mt_task_name(t), kvm_mt_role_name(t, r), kvm_mt_role_system(t, r));
    return 0;
}

static int mt_cmd_gen(int argc, char **argv) {
    unsigned long long seed = 1, n = 10, start = 0;
    int task = -1, split = KVM_MT_TRAIN;
    const char *role_arg = NULL;
    bool seed_set = false;
    kvm_mt_opts_t opts = {0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            mt_usage(stdout);
            return 0;
        }
        if (!v) {
            fprintf(stderr, "kvmesh minitasks gen: unknown or incomplete option '%s'\n", a);
            return 2;
        }
        i++;
        if (!strcmp(a, "--seed")) {
            if (mt_parse_u64(v, "--seed", &seed)) return 2;
            seed_set = true;
        } else if (!strcmp(a, "--n")) {
            if (mt_parse_u64(v, "--n", &n)) return 2;
        } else if (!strcmp(a, "--start")) {
            if (mt_parse_u64(v, "--start", &start)) return 2;
        } else if (!strcmp(a, "--task")) {
            task = strcmp(v, "all") ? kvm_mt_task_from_name(v) : -1;
            if (strcmp(v, "all") && task < 0) {
                fprintf(stderr, "kvmesh minitasks gen: unknown task '%s' (recall, arithmetic, transform, story, team, all)\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--split")) {
            if (!strcmp(v, "train")) split = KVM_MT_TRAIN;
            else if (!strcmp(v, "eval")) split = KVM_MT_EVAL;
            else {
                fprintf(stderr, "kvmesh minitasks gen: --split must be train or eval, got '%s'\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--role")) {
            role_arg = v;
        } else if (!strcmp(a, "--facts")) {
            if (sscanf(v, "%d-%d", &opts.min_facts, &opts.max_facts) != 2 || opts.min_facts < 2 ||
                opts.max_facts < opts.min_facts || opts.max_facts > 48) {
                fprintf(stderr, "kvmesh minitasks gen: --facts must be LO-HI with 2 <= LO <= HI <= 48, got '%s'\n", v);
                return 2;
            }
        } else {
            fprintf(stderr, "kvmesh minitasks gen: unknown option '%s'\n", a);
            return 2;
        }
    }
    if (!seed_set && split == KVM_MT_EVAL) seed = KVM_MT_DEFAULT_EVAL_SEED;
    bool all_roles = role_arg && !strcmp(role_arg, "all");
    int role = -1;
    if (role_arg && !all_roles) {
        if (task < 0) {
            fprintf(stderr, "kvmesh minitasks gen: --role needs --task\n");
            return 2;
        }
        role = kvm_mt_role_from_name(task, role_arg);
        if (role < 0) {
            fprintf(stderr, "kvmesh minitasks gen: task '%s' has no role '%s' (see `kvmesh minitasks roles`)\n",
                    kvm_mt_task_name(task), role_arg);
            return 2;
        }
    }
    kvm_mt_item_t it;
    for (unsigned long long k = start; k < start + n; k++) {
        if (all_roles) {
            /* resolve the task first so that every role shares the content */
            int rc = kvm_mt_make_ex(&it, task, split, seed, k, 0, &opts);
            int t = it.task;
            for (int r = 0; rc == 0 && r < kvm_mt_n_roles(t); r++) {
                rc = kvm_mt_make_ex(&it, t, split, seed, k, r, &opts);
                if (rc == 0) rc = kvm_mt_write_jsonl(stdout, &it);
            }
            if (rc) {
                fprintf(stderr, "kvmesh minitasks gen: %s\n", kvm_errmsg());
                return 1;
            }
            continue;
        }
        int rc = kvm_mt_make_ex(&it, task, split, seed, k, role, &opts);
        if (rc == 0) rc = kvm_mt_write_jsonl(stdout, &it);
        if (rc) {
            fprintf(stderr, "kvmesh minitasks gen: %s\n", kvm_errmsg());
            return 1;
        }
    }
    return fflush(stdout) == 0 ? 0 : 1;
}

int kvm_lab_cmd_minitasks(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        mt_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "gen")) return mt_cmd_gen(argc - 1, argv + 1);
    if (!strcmp(argv[1], "roles")) return mt_cmd_roles();
    fprintf(stderr, "kvmesh minitasks: unknown subcommand '%s'\n", argv[1]);
    mt_usage(stderr);
    return 2;
}
