/* trace_sig.h - the deterministic signature of a failure (spec: ../shared/spec/correct.md §3.1, §4.1).
 *
 * One pass over a kvm_failure_t (include/kvmesh.h) gives, per step, the normalised agent, the keyword flags
 * (FABRICATION ... UNGROUNDED) and the masked error template; per failure, the key-text terms with their counts
 * (TF-IDF input), the MinHash slots, the SimHash and the structural feature counts. The error-schema cache
 * (trace_cache.c) keeps these for every labelled failure and computes them for every query; no LLM is involved.
 *
 * Ownership: a tsig_t owns every array and string it points to; tsig_free() releases them. */
#ifndef KVM_TRACE_SIG_H
#define KVM_TRACE_SIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <kvmesh.h>

#define TSIG_MINHASH 128   /* MinHash slots (32 LSH bands x 4 rows) */
#define TSIG_AGENT 64      /* bytes of a normalised agent name, NUL included */

enum tsig_flag {
    TSIG_FABRICATION = 1u << 0,
    TSIG_PREMATURE_END = 1u << 1,
    TSIG_UNVERIFIED_CLAIM = 1u << 2,
    TSIG_TOOL_FAIL = 1u << 3,
    TSIG_HEDGE = 1u << 4,
    TSIG_REPEAT = 1u << 5,
    TSIG_UNGROUNDED = 1u << 6,
    TSIG_TERMINATES = 1u << 7, /* the content says TERMINATE / TASK_COMPLETE / Final Answer (the w7 term) */
};
#define TSIG_N_FLAGS 8
/* "FABRICATION", ... for bit i. */
const char *tsig_flag_name(int bit);

/* A term of the key text and its raw count. */
typedef struct tsig_term {
    char *s;
    int n;
} tsig_term_t;

/* A structural feature (a hash of its namespaced name) and its count, sorted by key. */
typedef struct tsig_feat {
    uint64_t key;
    int n;
} tsig_feat_t;

typedef struct tsig {
    int n_steps;
    char (*agent)[TSIG_AGENT]; /* [n_steps] normalised */
    unsigned *flags;           /* [n_steps] enum tsig_flag bits */
    char **tmpl;               /* [n_steps] masked error template, NULL when the step has none */
    uint64_t *tmpl_hash;       /* [n_steps] its hash, 0 when none */
    bool *tool;                /* [n_steps] tool results */
    bool *error;               /* [n_steps] steps that failed or carry an error template */
    uint64_t *phrases;         /* [n_steps] tsig_phrase bits found in the content */
    tsig_term_t *terms;        /* [n_terms] by count descending, then bytes ascending; cut to max_terms (0 = all) */
    int n_terms;
    uint32_t minhash[TSIG_MINHASH];
    uint64_t simhash;
    tsig_feat_t *feats;        /* [n_feats] sorted by key */
    int n_feats;
    double feats_norm;         /* L2 norm of the feature counts */
} tsig_t;

/* The MinHash functions h_i(x) = (a_i x + b_i) mod (2^61 - 1). */
typedef struct tsig_minhash_fns {
    uint64_t a[TSIG_MINHASH], b[TSIG_MINHASH];
} tsig_minhash_fns_t;
/* The fixed functions (splitmix64 from a fixed seed). */
void tsig_minhash_fns_default(tsig_minhash_fns_t *fns);

/* Builds the signature of f. max_terms cuts the stored terms (0 = no cut). 0, KVM_ENOMEM or KVM_EINVAL (a
 * malformed failure). On error *s is empty. */
int tsig_build(const kvm_failure_t *f, const tsig_minhash_fns_t *fns, int max_terms, tsig_t *s);
void tsig_free(tsig_t *s);
/* The term counts of a free text (a schema's LLM-written text), tokenised as the key text is, unsorted: *out[*n]
 * (each s and the array kvm_free'd by the caller; NULL / 0 for none). 0 or KVM_ENOMEM. */
int tsig_text_terms(const char *text, const tsig_minhash_fns_t *fns, tsig_term_t **out, int *n);

/* The §3.1 error template of a line (masked URLs, quoted strings, paths, hex, numbers; whitespace collapsed),
 * malloc'd (kvm_free); NULL when out of memory. */
char *tsig_mask_line(const char *line, size_t len);
/* The template of a step's content when it is an error (a traceback, "exitcode: [1-9]", or error = true):
 * the masked last traceback line or first non-empty line; NULL when the step is no error (or no memory). */
char *tsig_error_template(const char *content, bool error);

/* Cosine of two structural vectors. */
double tsig_feat_cosine(const tsig_feat_t *a, int na, double norm_a, const tsig_feat_t *b, int nb, double norm_b);
/* FNV-1a-64 of n bytes. */
uint64_t tsig_fnv1a(const void *p, size_t n);
/* The keyword phrases (of the flag lists) found in content, as a bit set over tsig_phrase(i). */
uint64_t tsig_phrases_in(const char *content);
int tsig_n_phrases(void);
const char *tsig_phrase(int i);

#endif
