/* cmd_c2c.c - `kvmesh c2c`: C2C fuser files (../shared/spec/c2c.md, docs/c2c.md).
 *   kvmesh c2c init --receiver DIR --sharer DIR -o NAME.c2c.json [--seed N] [--hidden H] [--dtype f32|bf16|f16]
 *                   [--closed k0,v5] [--align identity|first|longest]
 * writes a seeded, UNTRAINED fuser for the pair (kvm_c2c_write_untrained): it passes every loader check for these
 * models, so tests and examples can drive C2C without torch; it carries no information.
 *   kvmesh c2c docs --model DIR --n N --seed S [--facts LO-HI] [--split train|eval] [-o FILE.jsonl]
 * writes the blinded-receiver documents of spec §9 as JSON lines (lab/c2c_docs.h): the fuser's training data and
 * `kvmesh bench c2c --docs-file`'s input. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kvmesh.h>
#include <kvmesh_lab.h>

#include "c2c_docs.h"
#include "lab.h"

static void c2c_usage(FILE *f) {
    fprintf(f, "usage: kvmesh c2c init --receiver DIR --sharer DIR -o NAME.c2c.json [--seed N] [--hidden H]\n"
               "                      [--dtype f32|bf16|f16] [--closed k0,v5,...] [--align identity|first|longest]\n"
               "       kvmesh c2c docs --model DIR --n N [--seed S] [--facts LO-HI] [--split train|eval] [-o FILE.jsonl]\n\n"
               "Writes an UNTRAINED C2C fuser (random weights from --seed, default 0; every gate open except those in\n"
               "--closed) for the Hugging Face model directories given, with their tokenizer hashes: NAME.c2c.json and\n"
               "NAME.c2c.safetensors beside it (docs/c2c.md). For tests and examples only: it moves the receiver's\n"
               "cache by an arbitrary amount and carries no information from the sharer. --align sets the fuser's\n"
               "token_alignment (default identity; first / longest: the aligner of spec §4, fuse_tokens message_tokens).\n\n"
               "docs writes N blinded-receiver documents (spec section 9) as JSON lines to -o (default stdout):\n"
               "  {\"i\", \"facts\", \"n\", \"n_fuse\": n-1, \"sharer\": [ids], \"receiver\": [ids], \"answer\": [4 ids], \"answer_text\"}\n"
               "the minitasks recall item i (role value) of (--split, --seed) in the model's chat rendering, tokenized by its\n"
               "tokenizer; the receiver's ids have every digit of the fact values replaced by '#'. --facts (default 2-8) sets\n"
               "the number of facts; --split train (default) takes seeds < %u (default 1), eval seeds >= %u (default %u).\n",
            KVM_MT_EVAL_SEED_MIN, KVM_MT_EVAL_SEED_MIN, KVM_MT_DEFAULT_EVAL_SEED);
}

/* Parses "LO-HI" (2 <= LO <= HI <= 48) into lo, hi: 0, or -1 (said, naming the command). */
int lab_c2c_parse_facts(const char *cmd, const char *v, int *lo, int *hi) {
    char tail;
    if (sscanf(v, "%d-%d%c", lo, hi, &tail) != 2 || *lo < 2 || *hi < *lo || *hi > 48) {
        fprintf(stderr, "%s: --facts must be LO-HI with 2 <= LO <= HI <= 48, got '%s'\n", cmd, v);
        return -1;
    }
    return 0;
}

int lab_c2c_parse_u64(const char *cmd, const char *opt, const char *v, unsigned long long *out) {
    char *end = NULL;
    errno = 0;
    *out = strtoull(v, &end, 10);
    if (!*v || *end || *v == '-' || errno) {
        fprintf(stderr, "%s: %s '%s' is not a non-negative integer\n", cmd, opt, v);
        return -1;
    }
    return 0;
}

int lab_c2c_next_opt(const char *cmd, int argc, char **argv, int *i, const char **opt, const char **val,
                     void (*help)(FILE *)) {
    *opt = argv[*i];
    if (!strcmp(*opt, "--help") || !strcmp(*opt, "-h")) {
        help(stdout);
        return 0;
    }
    if (*i + 1 >= argc) {
        fprintf(stderr, "%s: option '%s' needs a value (or is unknown)\n", cmd, *opt);
        return -1;
    }
    *val = argv[++*i];
    return 1;
}

static int c2c_docs(int argc, char **argv, kvm_lab_params_fn fill) {
    const char *model = NULL, *out = NULL, *cmd = "kvmesh c2c docs";
    unsigned long long n = 0, seed = 0;
    bool have_n = false, have_seed = false;
    int split = KVM_MT_TRAIN, lo = 2, hi = 8;
    for (int i = 2; i < argc; i++) {
        const char *a, *v;
        const int k = lab_c2c_next_opt(cmd, argc, argv, &i, &a, &v, c2c_usage);
        if (k <= 0) return k ? 2 : 0;
        if (!strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "-o") || !strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--n") || !strcmp(a, "--seed")) {
            unsigned long long x;
            if (lab_c2c_parse_u64(cmd, a, v, &x)) return 2;
            if (a[2] == 'n') n = x, have_n = true;
            else seed = x, have_seed = true;
        } else if (!strcmp(a, "--split")) {
            if (!strcmp(v, "train")) split = KVM_MT_TRAIN;
            else if (!strcmp(v, "eval")) split = KVM_MT_EVAL;
            else {
                fprintf(stderr, "%s: --split must be train or eval, got '%s'\n", cmd, v);
                return 2;
            }
        } else if (!strcmp(a, "--facts")) {
            if (lab_c2c_parse_facts(cmd, v, &lo, &hi)) return 2;
        } else {
            fprintf(stderr, "%s: unknown option '%s'\n", cmd, a);
            return 2;
        }
    }
    if (!model || !have_n) {
        fprintf(stderr, "%s: --model and --n are required\n", cmd);
        return 2;
    }
    if (n < 1) {
        fprintf(stderr, "%s: --n must be at least 1\n", cmd);
        return 2;
    }
    if (!have_seed) seed = split == KVM_MT_EVAL ? KVM_MT_DEFAULT_EVAL_SEED : 1;
    if (split == KVM_MT_TRAIN && seed >= KVM_MT_EVAL_SEED_MIN) {
        fprintf(stderr, "%s: --seed %llu is an evaluation seed: the train split takes seeds < %u\n", cmd, seed,
                KVM_MT_EVAL_SEED_MIN);
        return 2;
    }
    if (split == KVM_MT_EVAL && seed < KVM_MT_EVAL_SEED_MIN) {
        fprintf(stderr, "%s: --seed %llu is a training seed: the eval split takes seeds >= %u\n", cmd, seed,
                KVM_MT_EVAL_SEED_MIN);
        return 2;
    }
    kvm_model_params_t mp = {.backend = "cpu", .quiet = true};
    if ((fill && fill(&mp)) || kvm_model_params_check(&mp)) {
        fprintf(stderr, "%s: %s\n", cmd, kvm_errmsg());
        return 1;
    }
    mp.backend = "cpu"; /* only the tokenizer and chat format are used */
    kvm_model_t *m = kvm_model_load(model, &mp);
    if (!m) {
        fprintf(stderr, "%s: %s\n", cmd, kvm_errmsg());
        return 1;
    }
    lab_c2c_docgen_t g;
    int rc = lab_c2c_docgen_init(&g, m, split, seed, lo, hi);
    FILE *f = stdout;
    if (!rc && out && !(f = fopen(out, "w"))) {
        fprintf(stderr, "%s: cannot write '%s'\n", cmd, out);
        kvm_model_free(m);
        return 1;
    }
    for (unsigned long long k = 0; !rc && k < n; k++) {
        lab_c2c_doc_t d;
        rc = lab_c2c_doc_make(&g, k, &d);
        if (!rc) rc = lab_c2c_doc_write(f, &d);
        lab_c2c_doc_clear(&d);
    }
    if (rc) fprintf(stderr, "%s: %s\n", cmd, kvm_errmsg());
    if (f != stdout && fclose(f) != 0 && !rc) {
        fprintf(stderr, "%s: writing '%s' failed\n", cmd, out);
        rc = 1;
    }
    if (f == stdout && fflush(stdout) != 0 && !rc) rc = 1;
    kvm_model_free(m);
    return rc ? 1 : 0;
}

int kvm_lab_cmd_c2c(int argc, char **argv, kvm_lab_params_fn fill) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        c2c_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "docs")) return c2c_docs(argc, argv, fill);
    if (strcmp(argv[1], "init")) {
        fprintf(stderr, "kvmesh c2c: unknown subcommand '%s' (init, docs)\n", argv[1]);
        return 2;
    }
    const char *recv = NULL, *shr = NULL, *out = NULL;
    kvm_c2c_init_opts_t o = {0};
    for (int i = 2; i < argc; i++) {
        const char *a, *v;
        const int k = lab_c2c_next_opt("kvmesh c2c init", argc, argv, &i, &a, &v, c2c_usage);
        if (k <= 0) return k ? 2 : 0;
        char *end = NULL;
        if (!strcmp(a, "--receiver")) recv = v;
        else if (!strcmp(a, "--sharer")) shr = v;
        else if (!strcmp(a, "-o") || !strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--dtype")) o.dtype = v;
        else if (!strcmp(a, "--closed")) o.closed = v;
        else if (!strcmp(a, "--align")) o.token_alignment = v;
        else if (!strcmp(a, "--seed")) {
            unsigned long long x;
            if (lab_c2c_parse_u64("kvmesh c2c init", a, v, &x)) return 2;
            o.seed = x;
        } else if (!strcmp(a, "--hidden")) {
            long h = strtol(v, &end, 10);
            if (!*v || *end || h < 1 || h > 4096) {
                fprintf(stderr, "kvmesh c2c init: --hidden '%s' is not an integer in [1, 4096]\n", v);
                return 2;
            }
            o.hidden = (int)h;
        } else {
            fprintf(stderr, "kvmesh c2c init: unknown option '%s'\n", a);
            return 2;
        }
    }
    if (!recv || !shr || !out) {
        fprintf(stderr, "kvmesh c2c init: --receiver, --sharer and -o are required\n");
        return 2;
    }
    kvm_model_params_t mp = {.backend = "cpu", .quiet = true};
    if ((fill && fill(&mp)) || kvm_model_params_check(&mp)) {
        fprintf(stderr, "kvmesh c2c init: %s\n", kvm_errmsg());
        return 1;
    }
    mp.backend = "cpu"; /* only the shapes and tokenizers are read */
    kvm_model_t *r = kvm_model_load(recv, &mp);
    if (!r) {
        fprintf(stderr, "kvmesh c2c init: receiver: %s\n", kvm_errmsg());
        return 1;
    }
    kvm_model_t *s = kvm_model_load(shr, &mp);
    if (!s) {
        fprintf(stderr, "kvmesh c2c init: sharer: %s\n", kvm_errmsg());
        kvm_model_free(r);
        return 1;
    }
    int rc = kvm_c2c_write_untrained(out, r, s, &o);
    if (rc) fprintf(stderr, "kvmesh c2c init: %s\n", kvm_errmsg());
    else printf("wrote %s (UNTRAINED fuser, seed %llu)\n", out, (unsigned long long)o.seed);
    kvm_model_free(s);
    kvm_model_free(r);
    return rc ? 1 : 0;
}
