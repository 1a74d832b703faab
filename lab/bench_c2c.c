/* bench_c2c.c - `kvmesh bench c2c`: the blinded-receiver demonstration of C2C (../shared/spec/c2c.md §9, docs/c2c.md)
 * through the C runtime's sectioned prefill (kvm_c2c_prefill_ex, spec §5 standard inference: n_fuse = n - 1), and its
 * --timing mode (bench_c2c_timing.c). lab/, on include/kvmesh_lab.h.
 *
 * Every document (lab/c2c_docs.h) runs under the conditions of spec §9:
 *   (a) R reads the real document, no fusion        (b) R reads the blinded document, no fusion
 *   (c) S alone on the real document                 (d) R blinded + C2C from S reading the real document
 *   (e) as (d), S reads ANOTHER document of the same length (a fixed derangement within each length group)
 *   (f) as (d) with every gate closed: must equal (b) bit for bit (greedy outputs, logits, NLL)
 *   (g) R blinded + the "identical" R->R fuser, the sharer (R) blinded too (needs --identity-fuser)
 * (a), (b), (d)-(g) go through the same sectioned path (R prefills ids[0, n-1), the sharer prefills its ids of the same
 * positions, the fuser runs unless skipped, R runs the rest); (c) is a plain prefill of S. Each run scores the 4 answer
 * digits twice: greedy (the rest is the last prompt token, then 3 decode steps; exact match = the 4 greedy tokens are
 * the answer's) and teacher-forced (the rest is the last prompt token and answer digits 0..2, whose 4 logits rows give
 * the answer's NLL per digit, natural log). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <kvmesh.h>
#include <kvmesh_lab.h>

#include "bench.h"
#include "c2c_docs.h"
#include "json_out.h"

enum { C_A, C_B, C_C, C_D, C_E, C_F, C_G, C_N };
static const char *const cond_key[C_N] = {"a", "b", "c", "d", "e", "f", "g"};
static const char *const cond_desc[C_N] = {
    "R, real document",          "R blinded, no fusion",         "S alone, real document", "R blinded + C2C",
    "R blinded + C2C, S reads another document", "R blinded + C2C, all gates closed",
    "R blinded + identical R->R fuser, S blinded"};

#define BC_ROWS 7 /* logits rows of one run: 4 teacher-forced, 3 greedy steps */

typedef struct bc_acc {
    int n, em;
    double nll; /* sum over documents of the mean NLL per digit */
    int by_n[49], by_em[49];
    double by_nll[49];
} bc_acc_t;

typedef struct bc_out {
    int32_t tok[4]; /* greedy answer */
    double nll;     /* mean NLL per digit, teacher-forced */
    float *logits;  /* [BC_ROWS][vocab] */
} bc_out_t;

typedef struct bc {
    kvm_model_t *r, *s;
    kvm_c2c_fuser_t *f, *fclosed, *fid;
    kvm_kv_pool_t *rpool, *spool, *ipool; /* ipool: R's second pool, the sharer's of (g) */
    int vocab;                            /* R's */
    int32_t *ids, *sids;                  /* scratch */
    int cap;
} bc_t;

static void usage(FILE *f) {
    fprintf(f,
            "usage: kvmesh bench c2c --receiver DIR --sharer DIR --fuser F.c2c.json [--identity-fuser G.c2c.json]\n"
            "                        [--docs N | --docs-file FILE.jsonl] [--seed S] [--facts LO-HI] [--backend cpu|cuda]\n"
            "                        [--json FILE]\n"
            "       kvmesh bench c2c --timing [--pair bundled|synthetic [--tiny]] [--prompt 128,512,1024] [--msg-tokens T]\n"
            "                        [--reps R] [--hidden H | --fuser F] [--receiver DIR --sharer DIR] [--backend cpu|cuda]\n"
            "                        [--json FILE]\n\n"
            "The blinded-receiver demonstration of C2C (spec section 9, docs/c2c.md): documents of `kvmesh c2c docs`\n"
            "(generated from the eval split, --docs N (default 2000), --seed (default 1000), --facts (default 2-8); or\n"
            "read from --docs-file) run through the sectioned prefill, greedy, under the conditions\n"
            "  (a) R, real document   (b) R blinded, no fusion   (c) S alone   (d) R blinded + C2C\n"
            "  (e) (d) with S reading another document of the same length   (f) (d) with every gate closed: = (b) bit for bit\n"
            "  (g) R blinded + the identical R->R fuser of --identity-fuser, S blinded too (skipped without it)\n"
            "Prints 4-digit exact match, mean answer NLL per digit (nats, teacher-forced), the recovery ratio\n"
            "(d-b)/(a-b), EM by number of facts, the open gates per layer and the section 9 verdict per criterion;\n"
            "--json writes every figure. Exit status 1 when (f) differs from (b) or a run fails, 2 on a usage error.\n\n"
            "--timing: per prompt length, the C2C path (receiver + sharer prefill, fusion, first token) against the\n"
            "text hand-off it replaces (the sharer prefills the prompt and generates --msg-tokens T (default 16) tokens,\n"
            "the receiver prefills prompt + message and produces its first token); --pair bundled (the bundled models,\n"
            "or --receiver / --sharer) or synthetic (Qwen3-0.6B <- Qwen2.5-0.5B shapes, random weights; --tiny: 2-layer\n"
            "models of small width, for CPU tests), with an UNTRAINED fuser written for the run (width --hidden, default\n"
            "1024 at real shapes, else 64) or --fuser F: timing only. One warm-up, then the median of --reps (default 3).\n");
}

/* ---- one run ------------------------------------------------------------------------------------------------- */

static double row_nll(const float *row, int vocab, int32_t target) {
    double mx = row[0];
    for (int v = 1; v < vocab; v++) mx = row[v] > mx ? row[v] : mx;
    double z = 0;
    for (int v = 0; v < vocab; v++) z += exp((double)row[v] - mx);
    return -((double)row[target] - mx - log(z));
}

static int32_t row_argmax(const float *row, int vocab) {
    int32_t best = 0;
    for (int v = 1; v < vocab; v++)
        if (row[v] > row[best]) best = v;
    return best;
}

/* After the prompt's KV is in seq (seq holds n tokens, the teacher-forced rows are out->logits[0..4)): the greedy
 * answer, 3 single-token steps from row 0. */
static int bc_greedy(kvm_model_t *m, kvm_seq_t *seq, int vocab, bc_out_t *out) {
    out->tok[0] = row_argmax(out->logits, vocab);
    for (int k = 1; k < 4; k++) {
        float *row = out->logits + (size_t)(3 + k) * vocab;
        kvm_batch_item_t it = {.seq = seq, .tokens = &out->tok[k - 1], .n_tokens = 1, .logits = row};
        int rc = kvm_forward(m, &it, 1);
        if (rc) return rc;
        out->tok[k] = row_argmax(row, vocab);
    }
    return 0;
}

static void bc_nll(const lab_c2c_doc_t *d, int vocab, bc_out_t *out) {
    double s = 0;
    for (int k = 0; k < 4; k++) s += row_nll(out->logits + (size_t)k * vocab, vocab, d->answer[k]);
    out->nll = s / 4;
}

static int bc_scratch(bc_t *b, int n) {
    if (n <= b->cap) return 0;
    int32_t *a = realloc(b->ids, (size_t)n * sizeof *a), *c = a ? realloc(b->sids, (size_t)n * sizeof *c) : NULL;
    if (a) b->ids = a;
    if (c) b->sids = c;
    if (!a || !c) return kvm_seterr(KVM_ENOMEM, "bench c2c: out of memory");
    b->cap = n;
    return 0;
}

/* A receiver-side condition through the sectioned path: R reads rids, the sharer (model sm on pool sp, fuser f)
 * prefills sids at the same positions; skip: no fusion. */
static int bc_run_c2c(bc_t *b, kvm_c2c_fuser_t *f, kvm_model_t *sm, kvm_kv_pool_t *sp, const lab_c2c_doc_t *d,
                      const int32_t *rids, const int32_t *sids, bool skip, bc_out_t *out) {
    const int n = d->n;
    int rc = bc_scratch(b, n + 3);
    if (rc) return rc;
    memcpy(b->ids, rids, (size_t)n * sizeof *b->ids);
    for (int k = 0; k < 3; k++) b->ids[n + k] = d->answer[k];
    kvm_seq_t *seq = kvm_seq_create(b->rpool);
    if (!seq) return kvm_seterr(KVM_ENOMEM, "bench c2c: cannot make a sequence");
    kvm_c2c_prefill_opts_t o = {.sharer_ids = sids, .rest_logits = out->logits, .skip_fuse = skip};
    rc = kvm_c2c_prefill_ex(f, b->r, seq, sm, sp, b->ids, n + 3, n - 1, NULL, &o, NULL);
    if (!rc) {
        kvm_seq_truncate(seq, n);
        rc = bc_greedy(b->r, seq, b->vocab, out);
    }
    kvm_seq_destroy(seq);
    if (!rc) bc_nll(d, b->vocab, out);
    return rc;
}

/* (c): S alone, a plain prefill of the real document. */
static int bc_run_alone(bc_t *b, const lab_c2c_doc_t *d, bc_out_t *out) {
    const int n = d->n;
    int rc = bc_scratch(b, n + 3);
    if (rc) return rc;
    memcpy(b->ids, d->sharer, (size_t)n * sizeof *b->ids);
    for (int k = 0; k < 3; k++) b->ids[n + k] = d->answer[k];
    kvm_seq_t *seq = kvm_seq_create(b->spool);
    if (!seq) return kvm_seterr(KVM_ENOMEM, "bench c2c: cannot make a sequence");
    kvm_batch_item_t p = {.seq = seq, .tokens = b->ids, .n_tokens = n - 1};
    kvm_batch_item_t t = {.seq = seq, .tokens = b->ids + n - 1, .n_tokens = 4, .logits = out->logits, .all_logits = true};
    if (!(rc = kvm_forward(b->s, &p, 1)) && !(rc = kvm_forward(b->s, &t, 1))) {
        kvm_seq_truncate(seq, n);
        rc = bc_greedy(b->s, seq, b->vocab, out);
    }
    kvm_seq_destroy(seq);
    if (!rc) bc_nll(d, b->vocab, out);
    return rc;
}

static void bc_add(bc_acc_t *a, const lab_c2c_doc_t *d, const bc_out_t *o) {
    const bool em = !memcmp(o->tok, d->answer, sizeof o->tok);
    const int r = d->facts < 49 ? d->facts : 48;
    a->n++, a->em += em, a->nll += o->nll;
    a->by_n[r]++, a->by_em[r] += em, a->by_nll[r] += o->nll;
}

/* ---- documents ----------------------------------------------------------------------------------------------- */

static void docs_free(lab_c2c_doc_t *d, int n) {
    for (int i = 0; i < n; i++) lab_c2c_doc_clear(&d[i]);
    free(d);
}

/* Reads every line of path (a `kvmesh c2c docs` file): the documents, or NULL after a message naming path:line. */
static lab_c2c_doc_t *docs_read(const char *path, int vocab, int32_t hash_id, int *n_out) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "kvmesh bench c2c: cannot read the documents file '%s'\n", path);
        return NULL;
    }
    lab_c2c_doc_t *d = NULL;
    int n = 0, cap = 0, lineno = 0;
    char *line = NULL;
    size_t lcap = 0;
    bool bad = false;
    while (getline(&line, &lcap, f) >= 0) {
        lineno++;
        if (line[strspn(line, " \t\r\n")] == 0) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 256;
            lab_c2c_doc_t *nd = realloc(d, (size_t)cap * sizeof *d);
            if (!nd) {
                fprintf(stderr, "kvmesh bench c2c: out of memory\n");
                bad = true;
                break;
            }
            d = nd;
        }
        if (lab_c2c_doc_parse(line, vocab, hash_id, &d[n])) {
            fprintf(stderr, "kvmesh bench c2c: %s:%d: %s\n", path, lineno, kvm_errmsg());
            bad = true;
            break;
        }
        n++;
    }
    free(line);
    fclose(f);
    if (!bad && n == 0) {
        fprintf(stderr, "kvmesh bench c2c: the documents file '%s' holds no document\n", path);
        bad = true;
    }
    if (bad) {
        docs_free(d, n);
        return NULL;
    }
    *n_out = n;
    return d;
}

static int cmp_len_index(const void *a, const void *b, void *ctx) {
    const lab_c2c_doc_t *d = ctx;
    const int i = *(const int *)a, j = *(const int *)b;
    if (d[i].n != d[j].n) return d[i].n < d[j].n ? -1 : 1;
    return i < j ? -1 : i > j;
}

/* (e)'s partner of each document: the next one of its length group in document order (a cyclic shift: no document is
 * its own partner); -1 for a document alone in its group. How many are left out. */
static int docs_derange(const lab_c2c_doc_t *d, int n, int *partner) {
    int *ord = malloc((size_t)(n ? n : 1) * sizeof *ord), left = 0;
    if (!ord) return -1;
    for (int i = 0; i < n; i++) ord[i] = i;
    /* insertion sort by (length, index): stable and portable (no qsort_r) */
    for (int i = 1; i < n; i++) {
        int x = ord[i], j = i - 1;
        while (j >= 0 && cmp_len_index(&ord[j], &x, (void *)d) > 0) ord[j + 1] = ord[j], j--;
        ord[j + 1] = x;
    }
    for (int g0 = 0; g0 < n;) {
        int g1 = g0;
        while (g1 < n && d[ord[g1]].n == d[ord[g0]].n) g1++;
        if (g1 - g0 == 1) partner[ord[g0]] = -1, left++;
        else
            for (int k = g0; k < g1; k++) partner[ord[k]] = ord[k + 1 < g1 ? k + 1 : g0];
        g0 = g1;
    }
    free(ord);
    return left;
}

/* ---- report -------------------------------------------------------------------------------------------------- */

static double pct(int k, int n) { return n ? 100.0 * k / n : 0; }

typedef struct bc_verdict {
    const char *key, *criterion;
    int state; /* 1 pass, 0 fail, -1 skipped / not measured */
    char detail[160];
} bc_verdict_t;

static void verdict_low(bc_verdict_t *v, const char *key, const char *crit, const bc_acc_t *a, bool ran) {
    v->key = key, v->criterion = crit;
    if (!ran || !a->n) {
        v->state = -1;
        snprintf(v->detail, sizeof v->detail, "skipped");
        return;
    }
    const double em = pct(a->em, a->n), nll = a->nll / a->n;
    v->state = em <= 1.0 && nll >= log(10.0) - 0.1;
    snprintf(v->detail, sizeof v->detail, "EM %.2f%%, NLL %.3f nats/digit", em, nll);
}

int lab_bench_c2c(int argc, char **argv, kvm_lab_params_fn fill) {
    const char *recv = NULL, *shr = NULL, *fuser = NULL, *idf = NULL, *docs_file = NULL, *backend = "cpu", *json = NULL;
    unsigned long long n_docs = 2000, seed = KVM_MT_DEFAULT_EVAL_SEED;
    bool have_docs = false, have_gen = false;
    int lo = 2, hi = 8;
    const char *cmd = "kvmesh bench c2c";
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--timing")) return lab_bench_c2c_timing(argc, argv, fill);
    for (int i = 1; i < argc; i++) {
        const char *a, *v;
        const int k = lab_c2c_next_opt(cmd, argc, argv, &i, &a, &v, usage);
        if (k <= 0) return k ? 2 : 0;
        if (!strcmp(a, "--receiver")) recv = v;
        else if (!strcmp(a, "--sharer")) shr = v;
        else if (!strcmp(a, "--fuser")) fuser = v;
        else if (!strcmp(a, "--identity-fuser")) idf = v;
        else if (!strcmp(a, "--docs-file")) docs_file = v;
        else if (!strcmp(a, "--json")) json = v;
        else if (!strcmp(a, "--backend")) {
            if (strcmp(v, "cpu") && strcmp(v, "cuda")) {
                fprintf(stderr, "%s: --backend must be cpu or cuda, got '%s'\n", cmd, v);
                return 2;
            }
            backend = v;
        } else if (!strcmp(a, "--docs") || !strcmp(a, "--seed")) {
            unsigned long long x;
            if (lab_c2c_parse_u64(cmd, a, v, &x)) return 2;
            if (a[2] == 'd') n_docs = x, have_docs = true;
            else seed = x, have_gen = true;
        } else if (!strcmp(a, "--facts")) {
            if (lab_c2c_parse_facts(cmd, v, &lo, &hi)) return 2;
            have_gen = true;
        } else {
            fprintf(stderr, "%s: unknown option '%s'\n", cmd, a);
            return 2;
        }
    }
    if (!recv || !shr || !fuser) {
        fprintf(stderr, "%s: --receiver, --sharer and --fuser are required (see --help)\n", cmd);
        return 2;
    }
    if ((have_docs || have_gen) && docs_file) {
        fprintf(stderr, "%s: --docs-file excludes --docs, --seed and --facts (they make the documents)\n", cmd);
        return 2;
    }
    if (!docs_file && (n_docs < 1 || n_docs > 1000000)) {
        fprintf(stderr, "%s: --docs must be in [1, 1000000], got %llu\n", cmd, n_docs);
        return 2;
    }
    if (!docs_file && seed < KVM_MT_EVAL_SEED_MIN) {
        fprintf(stderr, "%s: --seed %llu is a training seed: the bench evaluates on the eval split (seeds >= %u)\n", cmd,
                seed, KVM_MT_EVAL_SEED_MIN);
        return 2;
    }

    kvm_model_params_t mp = {.backend = backend, .quiet = true};
    if ((fill && fill(&mp)) || kvm_model_params_check(&mp)) {
        fprintf(stderr, "%s: %s\n", cmd, kvm_errmsg());
        return 2;
    }
    mp.backend = backend;
    bc_t b = {0};
    lab_c2c_doc_t *docs = NULL;
    int nd = 0, rc = 1, *partner = NULL;
    bc_out_t out[C_N] = {0};
    cJSON *root = NULL;
    uint64_t t_start = kvm_now_ns();
    if (!(b.r = kvm_model_load(recv, &mp))) {
        fprintf(stderr, "%s: receiver: %s\n", cmd, kvm_errmsg());
        goto done;
    }
    if (!(b.s = kvm_model_load(shr, &mp))) {
        fprintf(stderr, "%s: sharer: %s\n", cmd, kvm_errmsg());
        goto done;
    }
    if (!(b.f = kvm_c2c_open(fuser, b.r, b.s)) || !(b.fclosed = kvm_c2c_open(fuser, b.r, b.s)) || kvm_c2c_close_gates(b.fclosed)) {
        fprintf(stderr, "%s: fuser: %s\n", cmd, kvm_errmsg());
        goto done;
    }
    if (idf && !(b.fid = kvm_c2c_open(idf, b.r, b.r))) {
        fprintf(stderr, "%s: identity fuser (receiver -> receiver): %s\n", cmd, kvm_errmsg());
        goto done;
    }
    kvm_model_info_t ri, si;
    kvm_model_info(b.r, &ri);
    kvm_model_info(b.s, &si);
    b.vocab = ri.vocab_size;
    if (si.vocab_size != ri.vocab_size) {
        fprintf(stderr, "%s: the receiver's vocabulary (%d) and the sharer's (%d) differ: the documents need one "
                "tokenizer\n", cmd, ri.vocab_size, si.vocab_size);
        goto done;
    }
    lab_c2c_docgen_t g;
    if (lab_c2c_docgen_init(&g, b.r, KVM_MT_EVAL, seed, lo, hi)) {
        fprintf(stderr, "%s: %s\n", cmd, kvm_errmsg());
        goto done;
    }
    if (docs_file) {
        if (!(docs = docs_read(docs_file, b.vocab, g.hash_id, &nd))) goto done;
    } else {
        nd = (int)n_docs;
        if (!(docs = calloc((size_t)nd, sizeof *docs))) goto done;
        for (int i = 0; i < nd; i++)
            if (lab_c2c_doc_make(&g, (uint64_t)i, &docs[i])) {
                fprintf(stderr, "%s: %s\n", cmd, kvm_errmsg());
                goto done;
            }
    }
    b.rpool = kvm_model_kv_pool(b.r, 0);
    b.spool = kvm_model_kv_pool(b.s, 0);
    b.ipool = b.fid ? kvm_model_kv_pool(b.r, 0) : NULL;
    partner = malloc((size_t)nd * sizeof *partner);
    for (int c = 0; c < C_N; c++) out[c].logits = malloc((size_t)BC_ROWS * b.vocab * sizeof(float));
    bool oom = !b.rpool || !b.spool || (b.fid && !b.ipool) || !partner;
    for (int c = 0; c < C_N; c++) oom |= !out[c].logits;
    if (oom) {
        fprintf(stderr, "%s: %s\n", cmd, kvm_errmsg()[0] ? kvm_errmsg() : "out of memory");
        goto done;
    }
    const int left_out = docs_derange(docs, nd, partner);
    if (left_out < 0) {
        fprintf(stderr, "%s: out of memory\n", cmd);
        goto done;
    }

    fprintf(stderr, "%s: %d documents (%s), conditions a-%s, %s backend\n", cmd, nd, docs_file ? docs_file : "eval split",
            b.fid ? "g" : "f", backend);
    bc_acc_t acc[C_N] = {0};
    int f_diff = 0, f_first = -1;
    int err = 0;
    for (int i = 0; i < nd && !err; i++) {
        const lab_c2c_doc_t *d = &docs[i];
        if ((err = bc_run_c2c(&b, b.f, b.s, b.spool, d, d->sharer, d->sharer, true, &out[C_A])) ||
            (err = bc_run_c2c(&b, b.f, b.s, b.spool, d, d->receiver, d->sharer, true, &out[C_B])) ||
            (err = bc_run_alone(&b, d, &out[C_C])) ||
            (err = bc_run_c2c(&b, b.f, b.s, b.spool, d, d->receiver, d->sharer, false, &out[C_D])) ||
            (err = bc_run_c2c(&b, b.fclosed, b.s, b.spool, d, d->receiver, d->sharer, false, &out[C_F])))
            break;
        if (partner[i] >= 0 &&
            (err = bc_run_c2c(&b, b.f, b.s, b.spool, d, d->receiver, docs[partner[i]].sharer, false, &out[C_E])))
            break;
        if (b.fid && (err = bc_run_c2c(&b, b.fid, b.r, b.ipool, d, d->receiver, d->receiver, false, &out[C_G]))) break;
        for (int c = 0; c < C_N; c++)
            if ((c != C_E || partner[i] >= 0) && (c != C_G || b.fid)) bc_add(&acc[c], d, &out[c]);
        if (memcmp(out[C_F].tok, out[C_B].tok, sizeof out[C_B].tok) || out[C_F].nll != out[C_B].nll ||
            memcmp(out[C_F].logits, out[C_B].logits, (size_t)BC_ROWS * b.vocab * sizeof(float))) {
            if (f_first < 0) f_first = i;
            f_diff++;
        }
        if ((i + 1) % 200 == 0 || i + 1 == nd)
            fprintf(stderr, "%s: %d/%d documents, %.1f s\n", cmd, i + 1, nd, (double)(kvm_now_ns() - t_start) / 1e9);
    }
    if (err) {
        fprintf(stderr, "%s: %s\n", cmd, kvm_errmsg());
        goto done;
    }

    /* ---- table ---- */
    printf("C2C blinded receiver (spec section 9): R %s <- S %s, fuser %s\n", ri.name, si.name, fuser);
    printf("%d documents (%s), %s backend, %.1f s\n\n", nd, docs_file ? docs_file : "eval split", backend,
           (double)(kvm_now_ns() - t_start) / 1e9);
    printf("%-4s %-44s %6s %8s %10s\n", "", "condition", "docs", "EM %", "NLL/digit");
    for (int c = 0; c < C_N; c++) {
        if (c == C_G && !b.fid) {
            printf("(%s)  %-44s %s\n", cond_key[c], cond_desc[c], "skipped: no --identity-fuser (the R->R control fuser)");
            continue;
        }
        printf("(%s)  %-44s %6d %8.2f %10.4f\n", cond_key[c], cond_desc[c], acc[c].n, pct(acc[c].em, acc[c].n),
               acc[c].n ? acc[c].nll / acc[c].n : 0.0);
    }
    const double ema = pct(acc[C_A].em, acc[C_A].n), emb = pct(acc[C_B].em, acc[C_B].n), emd = pct(acc[C_D].em, acc[C_D].n);
    const bool have_rec = ema != emb;
    if (have_rec) printf("\nrecovery ratio (EM_d - EM_b) / (EM_a - EM_b): %.4f\n", (emd - emb) / (ema - emb));
    else printf("\nrecovery ratio: undefined (EM_a = EM_b)\n");
    printf("(e): %d documents paired within equal-length groups, %d left out (alone in their length)\n", acc[C_E].n, left_out);
    printf("\nEM %% by number of facts:\nfacts  docs");
    for (int c = 0; c < C_N; c++)
        if (c != C_G || b.fid) printf("  %6s", cond_key[c]);
    printf("\n");
    for (int r = 0; r < 49; r++) {
        if (!acc[C_A].by_n[r]) continue;
        printf("%5d %5d", r, acc[C_A].by_n[r]);
        for (int c = 0; c < C_N; c++)
            if (c != C_G || b.fid) printf("  %6.1f", pct(acc[c].by_em[r], acc[c].by_n[r]));
        printf("\n");
    }
    const int L = kvm_c2c_n_layers(b.f);
    int open_k = 0, open_v = 0;
    for (int br = 0; br < 2; br++) {
        printf("%sgates %c open at layers [", br ? "" : "\n", br ? 'V' : 'K');
        int k = 0;
        for (int l = 0; l < L; l++)
            if (kvm_c2c_gate_open(b.f, l, br)) printf("%s%d", k++ ? " " : "", l);
        printf("] (%d of %d)\n", k, L);
        if (br) open_v = k;
        else open_k = k;
    }

    bc_verdict_t vd[5];
    vd[0] = (bc_verdict_t){.key = "d", .criterion = "(d) >= 90% EM", .state = emd >= 90.0};
    snprintf(vd[0].detail, sizeof vd[0].detail, "EM %.2f%%", emd);
    verdict_low(&vd[1], "b", "(b) <= 1% EM, NLL >= ln 10 - 0.1", &acc[C_B], true);
    verdict_low(&vd[2], "e", "(e) <= 1% EM, NLL >= ln 10 - 0.1", &acc[C_E], acc[C_E].n > 0);
    verdict_low(&vd[3], "g", "(g) <= 1% EM, NLL >= ln 10 - 0.1", &acc[C_G], b.fid != NULL);
    vd[4] = (bc_verdict_t){.key = "f", .criterion = "(f) = (b) bit for bit", .state = f_diff == 0};
    if (f_diff) snprintf(vd[4].detail, sizeof vd[4].detail, "%d documents differ, the first is document %d", f_diff, f_first);
    else snprintf(vd[4].detail, sizeof vd[4].detail, "%d documents: greedy outputs, %d logits rows each, NLL", nd, BC_ROWS);
    printf("\nverdict (spec section 9):\n");
    for (int k = 0; k < 5; k++)
        printf("  %-36s %-8s %s\n", vd[k].criterion, vd[k].state < 0 ? "SKIPPED" : vd[k].state ? "PASS" : "FAIL",
               vd[k].detail);
    printf("  %-36s %-8s %s\n", "(h) C runtime vs PyTorch", "n/a", "not measured by this bench (scripts/train)");

    if (json) {
        root = cJSON_CreateObject();
        cJSON_AddStringToObject(root, "receiver", recv);
        cJSON_AddStringToObject(root, "sharer", shr);
        cJSON_AddStringToObject(root, "fuser", fuser);
        if (idf) cJSON_AddStringToObject(root, "identity_fuser", idf);
        cJSON_AddStringToObject(root, "docs_source", docs_file ? docs_file : "eval split");
        if (!docs_file) {
            cJSON_AddNumberToObject(root, "seed", (double)seed);
            char fr[16];
            snprintf(fr, sizeof fr, "%d-%d", lo, hi);
            cJSON_AddStringToObject(root, "facts", fr);
        }
        cJSON_AddStringToObject(root, "backend", backend);
        const lab_json_num_t nums[] = {{"docs", nd}, {"e_left_out", left_out}, {"f_differing_docs", f_diff},
                                       {"seconds", (double)(kvm_now_ns() - t_start) / 1e9}, {"gates_k_open", open_k},
                                       {"gates_v_open", open_v}, {"n_layers", L}};
        lab_json_add_nums(root, nums, sizeof nums / sizeof nums[0]);
        if (have_rec) cJSON_AddNumberToObject(root, "recovery_ratio", (emd - emb) / (ema - emb));
        else cJSON_AddNullToObject(root, "recovery_ratio");
        cJSON_AddBoolToObject(root, "f_identical_to_b", f_diff == 0);
        cJSON *conds = cJSON_AddObjectToObject(root, "conditions");
        for (int c = 0; c < C_N; c++) {
            cJSON *o = cJSON_AddObjectToObject(conds, cond_key[c]);
            cJSON_AddStringToObject(o, "condition", cond_desc[c]);
            if (c == C_G && !b.fid) {
                cJSON_AddStringToObject(o, "skipped", "no --identity-fuser");
                continue;
            }
            const lab_json_num_t cn[] = {{"docs", acc[c].n}, {"em", acc[c].n ? (double)acc[c].em / acc[c].n : 0},
                                         {"nll_per_digit", acc[c].n ? acc[c].nll / acc[c].n : 0}};
            lab_json_add_nums(o, cn, sizeof cn / sizeof cn[0]);
            cJSON *by = cJSON_AddObjectToObject(o, "by_facts");
            for (int r = 0; r < 49; r++) {
                if (!acc[c].by_n[r]) continue;
                char key[16]; /* room for any int: -O1's format check sees r's type, not its 0..48 */
                snprintf(key, sizeof key, "%d", r);
                cJSON *x = cJSON_AddObjectToObject(by, key);
                const lab_json_num_t bn[] = {{"docs", acc[c].by_n[r]}, {"em", (double)acc[c].by_em[r] / acc[c].by_n[r]},
                                             {"nll_per_digit", acc[c].by_nll[r] / acc[c].by_n[r]}};
                lab_json_add_nums(x, bn, sizeof bn / sizeof bn[0]);
            }
        }
        cJSON *gates = cJSON_AddObjectToObject(root, "gates_open");
        for (int br = 0; br < 2; br++) {
            cJSON *arr = cJSON_AddArrayToObject(gates, br ? "v" : "k");
            for (int l = 0; l < L; l++) cJSON_AddItemToArray(arr, cJSON_CreateBool(kvm_c2c_gate_open(b.f, l, br)));
        }
        cJSON *ver = cJSON_AddObjectToObject(root, "verdict");
        for (int k = 0; k < 5; k++) {
            cJSON *o = cJSON_AddObjectToObject(ver, vd[k].key);
            cJSON_AddStringToObject(o, "criterion", vd[k].criterion);
            cJSON_AddStringToObject(o, "result", vd[k].state < 0 ? "skipped" : vd[k].state ? "pass" : "fail");
            cJSON_AddStringToObject(o, "detail", vd[k].detail);
        }
        cJSON *h = cJSON_AddObjectToObject(ver, "h");
        cJSON_AddStringToObject(h, "result", "not measured");
        if (lab_json_write(root, json)) {
            fprintf(stderr, "%s: cannot write '%s'\n", cmd, json);
            goto done;
        }
    }
    if (f_diff) {
        fprintf(stderr, "%s: (f) all gates closed differs from (b) on %d documents (the first: document %d): the closed "
                "gates are not an exact identity\n", cmd, f_diff, f_first);
        goto done;
    }
    rc = 0;
done:
    cJSON_Delete(root);
    for (int c = 0; c < C_N; c++) free(out[c].logits);
    free(partner);
    free(b.ids);
    free(b.sids);
    if (docs) docs_free(docs, nd);
    kvm_kv_pool_free(b.ipool);
    kvm_kv_pool_free(b.spool);
    kvm_kv_pool_free(b.rpool);
    kvm_c2c_free(b.fid);
    kvm_c2c_free(b.fclosed);
    kvm_c2c_free(b.f);
    kvm_model_free(b.s);
    kvm_model_free(b.r);
    return rc;
}
