/* cmd_c2c.c - `kvmesh c2c`: C2C fuser files (../shared/spec/c2c.md, docs/c2c.md).
 *   kvmesh c2c init --receiver DIR --sharer DIR -o NAME.c2c.json [--seed N] [--hidden H] [--dtype f32|bf16|f16]
 *                   [--closed k0,v5] [--align identity|first|longest]
 * writes a seeded, UNTRAINED fuser for the pair (kvm_c2c_write_untrained): it passes every loader check for these
 * models, so tests and examples can drive C2C without torch; it carries no information. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kvmesh.h>
#include <kvmesh_lab.h>

#include "lab.h"

static void c2c_usage(FILE *f) {
    fprintf(f, "usage: kvmesh c2c init --receiver DIR --sharer DIR -o NAME.c2c.json [--seed N] [--hidden H]\n"
               "                      [--dtype f32|bf16|f16] [--closed k0,v5,...] [--align identity|first|longest]\n\n"
               "Writes an UNTRAINED C2C fuser (random weights from --seed, default 0; every gate open except those in\n"
               "--closed) for the Hugging Face model directories given, with their tokenizer hashes: NAME.c2c.json and\n"
               "NAME.c2c.safetensors beside it (docs/c2c.md). For tests and examples only: it moves the receiver's\n"
               "cache by an arbitrary amount and carries no information from the sharer. --align sets the fuser's\n"
               "token_alignment (default identity; first / longest: the aligner of spec §4, fuse_tokens message_tokens).\n");
}

int kvm_lab_cmd_c2c(int argc, char **argv, kvm_lab_params_fn fill) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        c2c_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "init")) {
        fprintf(stderr, "kvmesh c2c: unknown subcommand '%s' (init)\n", argv[1]);
        return 2;
    }
    const char *recv = NULL, *shr = NULL, *out = NULL;
    kvm_c2c_init_opts_t o = {0};
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            c2c_usage(stdout);
            return 0;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "kvmesh c2c init: option '%s' needs a value (or is unknown)\n", a);
            return 2;
        }
        const char *v = argv[++i];
        char *end = NULL;
        if (!strcmp(a, "--receiver")) recv = v;
        else if (!strcmp(a, "--sharer")) shr = v;
        else if (!strcmp(a, "-o") || !strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--dtype")) o.dtype = v;
        else if (!strcmp(a, "--closed")) o.closed = v;
        else if (!strcmp(a, "--align")) o.token_alignment = v;
        else if (!strcmp(a, "--seed")) {
            o.seed = strtoull(v, &end, 10);
            if (!*v || *end || *v == '-') {
                fprintf(stderr, "kvmesh c2c init: --seed '%s' is not a non-negative integer\n", v);
                return 2;
            }
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
