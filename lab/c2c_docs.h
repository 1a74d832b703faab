/* c2c_docs.h - the blinded-receiver documents of the C2C demonstration (../shared/spec/c2c.md §9, docs/c2c.md): a
 * minitasks `recall` item (role "value") as token ids for the sharer, the same ids with every digit of the fact
 * VALUES replaced by '#' for the receiver, and the 4 answer digits. `kvmesh c2c docs` writes them as JSON lines (the
 * fuser's training data); `kvmesh bench c2c` evaluates on them (generated, or read back from such a file).
 *
 * One JSON object per line:
 *   {"i":k, "facts":r, "n":n, "n_fuse":n-1, "sharer":[ids], "receiver":[ids], "answer":[ids], "answer_text":"3236"}
 * The prompt is the model's chat rendering of the item (system, user, generation prompt; the ChatML of minitasks,
 * checked as `kvmesh eval minitasks` checks it), tokenized by the model's tokenizer. */
#ifndef KVM_LAB_C2C_DOCS_H
#define KVM_LAB_C2C_DOCS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include <kvmesh.h>

#include "minitasks.h"

/* The generator: the tokenizer of a model and the ids that blinding uses. */
typedef struct lab_c2c_docgen {
    kvm_model_t *model;     /* borrowed */
    const kvm_tokenizer_t *tok;
    int split;              /* KVM_MT_TRAIN / KVM_MT_EVAL */
    uint64_t seed;
    kvm_mt_opts_t opts;     /* fact range */
    int32_t hash_id;        /* '#' */
    int32_t digit_id[10];   /* '0'..'9' */
    int bos_id;             /* the model's BOS (-1: none) */
} lab_c2c_docgen_t;

/* One document. */
typedef struct lab_c2c_doc {
    uint64_t i;             /* index in (split, seed) */
    int facts;              /* facts of the item */
    int n;                  /* prompt tokens (sharer and receiver alike) */
    int32_t *sharer;        /* [n] the real prompt */
    int32_t *receiver;      /* [n] the blinded prompt */
    int32_t answer[4];      /* the answer digits' ids */
    char answer_text[8];    /* the answer ("3236") */
} lab_c2c_doc_t;

/* Prepares documents of (split, seed) with lo..hi facts (2 <= lo <= hi <= 48) for model m: checks that the model
 * renders minitasks prompts as the generator does (kvm_mt_run_init) and that '#' and each digit 0-9 are single
 * tokens of its tokenizer. 0, or a KVM_E* code with a message. */
int lab_c2c_docgen_init(lab_c2c_docgen_t *g, kvm_model_t *m, int split, uint64_t seed, int lo, int hi);

/* Makes document i (d->sharer / d->receiver allocated; free with lab_c2c_doc_clear). Fails (KVM_EMODEL, with the
 * item id) when the blinded text does not tokenize to the same ids with '#' at exactly the value digits. */
int lab_c2c_doc_make(const lab_c2c_docgen_t *g, uint64_t i, lab_c2c_doc_t *d);
void lab_c2c_doc_clear(lab_c2c_doc_t *d);

/* Writes d as one JSON line (format above). 0 or KVM_EIO. */
int lab_c2c_doc_write(FILE *f, const lab_c2c_doc_t *d);

/* Parses one JSON line of that format into d (allocated; lab_c2c_doc_clear). Checks every field: types, n == the
 * length of both id lists, n_fuse == n - 1, 4 answer ids matching answer_text's digits, ids in [0, vocab) when
 * vocab > 0, the two prompts differing only where the receiver has hash_id (when hash_id >= 0). KVM_EFORMAT with a
 * message naming the field otherwise (the caller adds file:line). */
int lab_c2c_doc_parse(const char *line, int vocab, int32_t hash_id, lab_c2c_doc_t *d);

/* Option parsing shared by `kvmesh c2c` and `kvmesh bench c2c` (lab/cmd_c2c.c); messages go to stderr, naming cmd.
 * lab_c2c_parse_facts: the value "LO-HI" (2 <= LO <= HI <= 48) of --facts: 0, or -1 after a message.
 * lab_c2c_parse_u64: v as a non-negative integer: 0, or -1 after a message naming the option.
 * lab_c2c_next_opt: the option at argv[*i] and its value (*i moves past it), for commands whose options all take a
 * value: 1; 0 when it is --help / -h (help(stdout) printed: exit 0); -1 after a message when the value is missing. */
int lab_c2c_parse_facts(const char *cmd, const char *v, int *lo, int *hi);
int lab_c2c_parse_u64(const char *cmd, const char *opt, const char *v, unsigned long long *out);
int lab_c2c_next_opt(const char *cmd, int argc, char **argv, int *i, const char **opt, const char **val,
                     void (*help)(FILE *));

#endif
