/* trace_cache.c - the error-schema cache and blame (include/kvmesh.h "Failure attribution"; docs/correct.md;
 * spec ../shared/spec/correct.md §4-§6).
 *
 * An entry is the structured signature of one labelled failure (trace_sig.h) with its gold label: the agent
 * class histogram, the relative position of the decisive step, the error templates and keyword phrases met at
 * that step, the key-text term counts (top tfidf_max_terms), MinHash, SimHash and structural counts, and usage
 * statistics. A query scores entries by S = .55 cos_tfidf + .20 J_minhash + .15 cos_struct + .10 [shared error
 * template]; TF-IDF weights are recomputed from the live document frequencies (an entry's normalised vector is
 * cached until N or df change). Up to bruteforce_max live entries every entry is scored; above, the candidates
 * are the MinHash-LSH buckets (32 bands x 4 rows) and the entries sharing an error template, at most 512.
 *
 * Persistence: dir/schemas.snap, a text file: a header line (magic, version, the MinHash functions, counters),
 * one JSON line per live entry, and a trailer line with the entry count and the FNV-1a-64 of every byte before
 * it. Saved by writing schemas.snap.tmp.<pid>, fsync, rename, fsync of the folder: a crash leaves the old or
 * the new file. An entry may also hold the LLM-written text of its failure (kvm_schema_cache_set_text; version 2 of
 * the file: its "text" object), whose terms are added to the entry's TF-IDF counts, so retrieval reads it; version 1
 * files (no text) still load. A file that fails any check is renamed schemas.snap.bad and the cache starts empty. (The
 * spec's WAL of every operation is not kept: what was learned since the last save is lost by a crash.) */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "../core/core.h"
#include "../core/json.h"
#include "../core/map.h"
#include "../core/sb.h"
#include "trace_cache.h"
#include "trace_sig.h"

#define SNAP_MAGIC "kvmesh-schemas"
#define SNAP_VERSION 2 /* 2: an entry may hold an LLM-written text ("text"); version 1 files still load */
#define TEXT_CAP 6144    /* bytes of an LLM-written text kept (correct.md §3.2) */
#define MAX_SRC 8        /* source traces kept per entry (a ring) */
#define MAX_HIST 8       /* agent classes kept per entry */
#define MAX_TMPL 8       /* error templates kept per entry */
#define LSH_BANDS 32
#define LSH_CAP 512      /* candidates above bruteforce_max */
#define MERGE_S 0.92
#define GROUP_S 0.60
#define HALF_LIFE_NS (7.0 * 24 * 3600 * 1e9)
#define HALF_LIFE_Q 1000.0

enum { F_PINNED = 1, F_HUMAN = 2 };

typedef struct entry {
    int id, group;
    unsigned flags;
    bool live;
    uint64_t created_ns;
    int support;
    char *src[MAX_SRC];
    int n_src, src_next;
    char *family;
    /* gold */
    struct {
        char name[TSIG_AGENT];
        int n;
    } hist[MAX_HIST];
    int n_hist;
    double pos_sum;     /* sum of rel positions in [0, 1] */
    int pos_n;
    int gold_step, n_steps; /* of the first source */
    char *tmpl[MAX_TMPL];   /* error templates at the decisive step and anywhere in the trace (first positions) */
    uint64_t tmpl_hash[MAX_TMPL];
    int n_tmpl;
    uint64_t phrases;       /* tsig_phrase bits met at the decisive step */
    unsigned gold_flags;
    /* keys */
    int *term;              /* [n_terms] dictionary ids */
    int *cnt;
    int n_terms;
    uint32_t minhash[TSIG_MINHASH];
    uint64_t simhash;
    tsig_feat_t *feats;
    int n_feats;
    double feats_norm;
    /* stats */
    char *text;             /* the LLM-written schema text (correct.md §3.2), NULL = none (the stub stands) */
    char *text_model;       /* the model that wrote it */
    double hits;
    int helpful, misleading;
    uint64_t last_hit_ns;
    long last_hit_q;
    /* the TF-IDF vector, valid while vec_gen == the cache's gen */
    int *vterm;
    float *vw;
    int n_v;
    uint64_t vec_gen;
} entry_t;

struct kvm_schema_cache {
    kvm_schema_cache_params_t p;
    char *dir;
    tsig_minhash_fns_t fns;
    entry_t **e;            /* [n_e] by id (ids are dense: entry id == index); evicted ones stay as tombstones */
    int n_e, cap_e;
    int n_live, next_group;
    long queries;
    uint64_t gen;           /* bumped when N or a df changes */
    /* term dictionary */
    kvm_map_t term_ids;     /* term -> id */
    char **terms;           /* [n_terms] */
    int *df;                /* [n_terms] live entries holding the term */
    int n_terms, cap_terms;
    float *qdense;          /* [cap_terms] scratch: the query's weights by term id */
    /* LSH: band key -> head entry id; chain next[id * LSH_BANDS + band] */
    kvm_map_t lsh;
    int *lsh_next;
    int cap_lsh;
    bool over_limits;
};

/* ---- entries and the dictionary -------------------------------------------------------------------- */

static void entry_free(entry_t *e) {
    if (!e) return;
    for (int i = 0; i < MAX_SRC; i++) kvm_free(e->src[i]);
    for (int i = 0; i < e->n_tmpl; i++) kvm_free(e->tmpl[i]);
    kvm_free(e->family);
    kvm_free(e->text);
    kvm_free(e->text_model);
    kvm_free(e->term);
    kvm_free(e->cnt);
    kvm_free(e->feats);
    kvm_free(e->vterm);
    kvm_free(e->vw);
    kvm_free(e);
}

static size_t entry_bytes(const entry_t *e) {
    size_t b = sizeof *e + (size_t)e->n_terms * (2 * sizeof(int) + sizeof(float) + sizeof(int)) +
               (size_t)e->n_feats * sizeof(tsig_feat_t);
    for (int i = 0; i < e->n_tmpl; i++) b += strlen(e->tmpl[i]) + 1;
    for (int i = 0; i < MAX_SRC; i++) b += e->src[i] ? strlen(e->src[i]) + 1 : 0;
    if (e->text) b += strlen(e->text) + 1 + (e->text_model ? strlen(e->text_model) + 1 : 0);
    return b;
}

/* The id of term s (added when add), -1 when absent (or no memory: *rc set). */
static int term_id(kvm_schema_cache_t *c, const char *s, bool add, int *rc) {
    kvm_mapval_t v;
    if (kvm_map_get_str(&c->term_ids, s, &v)) return (int)v.u64;
    if (!add) return -1;
    if (c->n_terms == c->cap_terms) {
        int cap = c->cap_terms ? 2 * c->cap_terms : 4096;
        char **t = kvm_realloc(c->terms, (size_t)cap * sizeof *t);
        if (t) c->terms = t;
        int *df = t ? kvm_realloc(c->df, (size_t)cap * sizeof *df) : NULL;
        if (df) c->df = df;
        float *q = df ? kvm_realloc(c->qdense, (size_t)cap * sizeof *q) : NULL;
        if (!q) {
            *rc = KVM_ENOMEM;
            return -1;
        }
        c->qdense = q;
        memset(q + c->cap_terms, 0, (size_t)(cap - c->cap_terms) * sizeof *q);
        c->cap_terms = cap;
    }
    char *copy = kvm_strdup(s);
    if (!copy || kvm_map_put_str(&c->term_ids, s, KVM_MAPVAL_U64((uint64_t)c->n_terms))) {
        kvm_free(copy);
        *rc = KVM_ENOMEM;
        return -1;
    }
    c->terms[c->n_terms] = copy;
    c->df[c->n_terms] = 0;
    return c->n_terms++;
}

static uint64_t band_key(const uint32_t *mh, int b) {
    unsigned char buf[17];
    for (int r = 0; r < 4; r++)
        for (int k = 0; k < 4; k++) buf[4 * r + k] = (unsigned char)(mh[4 * b + r] >> (8 * k));
    buf[16] = (unsigned char)b; /* bands never collide with each other */
    uint64_t h = tsig_fnv1a(buf, sizeof buf);
    return h ? h : 1;
}

static int lsh_add(kvm_schema_cache_t *c, const entry_t *e) {
    if ((e->id + 1) * LSH_BANDS > c->cap_lsh) {
        int cap = c->cap_lsh ? c->cap_lsh : 1024 * LSH_BANDS;
        while (cap < (e->id + 1) * LSH_BANDS) cap *= 2;
        int *n = kvm_realloc(c->lsh_next, (size_t)cap * sizeof *n);
        if (!n) return KVM_ENOMEM;
        c->lsh_next = n;
        c->cap_lsh = cap;
    }
    for (int b = 0; b < LSH_BANDS; b++) {
        uint64_t k = band_key(e->minhash, b);
        kvm_mapval_t v;
        c->lsh_next[e->id * LSH_BANDS + b] = kvm_map_get_u64(&c->lsh, k, &v) ? (int)v.i64 : -1;
        if (kvm_map_put_u64(&c->lsh, k, KVM_MAPVAL_I64(e->id))) return KVM_ENOMEM;
    }
    return 0;
}

/* Makes e live: df counts, LSH buckets, N. */
static int entry_attach(kvm_schema_cache_t *c, entry_t *e) {
    if (c->n_e == c->cap_e) {
        int cap = c->cap_e ? 2 * c->cap_e : 256;
        entry_t **n = kvm_realloc(c->e, (size_t)cap * sizeof *n);
        if (!n) return KVM_ENOMEM;
        c->e = n;
        c->cap_e = cap;
    }
    e->id = c->n_e;
    if (lsh_add(c, e)) return KVM_ENOMEM;
    c->e[c->n_e++] = e;
    for (int i = 0; i < e->n_terms; i++) c->df[e->term[i]]++;
    e->live = true;
    c->n_live++;
    c->gen++;
    return 0;
}

/* Evicts e: a tombstone (live false; keys freed). */
static void entry_detach(kvm_schema_cache_t *c, entry_t *e) {
    for (int i = 0; i < e->n_terms; i++) c->df[e->term[i]]--;
    e->live = false;
    c->n_live--;
    c->gen++;
}

/* ---- TF-IDF vectors ------------------------------------------------------------------------------------ */

typedef struct wterm {
    int id;           /* dictionary id, -1 for a query term the cache has not seen */
    const char *s;
    double w;
} wterm_t;

static int wterm_cmp(const void *a, const void *b) {
    const wterm_t *x = a, *y = b;
    if (x->w != y->w) return x->w > y->w ? -1 : 1;
    return strcmp(x->s, y->s);
}

static double idf(const kvm_schema_cache_t *c, int id) {
    int df = id >= 0 ? c->df[id] : 0;
    return log((1.0 + c->n_live) / (1.0 + df));
}

/* Weights (1 + ln tf) idf of w[n] (ids and counts set), the top keep by weight, L2-normalised in place; returns
 * how many are kept. */
static int weigh(const kvm_schema_cache_t *c, wterm_t *w, const int *counts, int n, int keep) {
    for (int i = 0; i < n; i++) w[i].w = (1.0 + log((double)counts[i])) * idf(c, w[i].id);
    qsort(w, (size_t)n, sizeof *w, wterm_cmp);
    if (keep > 0 && n > keep) n = keep;
    double sq = 0;
    for (int i = 0; i < n; i++) sq += w[i].w * w[i].w;
    double norm = sqrt(sq);
    for (int i = 0; i < n; i++) w[i].w = norm > 0 ? w[i].w / norm : 0;
    return n;
}

static int vec_keep(const kvm_schema_cache_t *c) { return c->p.tfidf_max_terms > 0 ? c->p.tfidf_max_terms / 2 : 0; }

static int entry_vector(kvm_schema_cache_t *c, entry_t *e) {
    if (e->vec_gen == c->gen && e->vw) return 0;
    wterm_t *w = kvm_malloc((size_t)(e->n_terms ? e->n_terms : 1) * sizeof *w);
    int *vt = kvm_realloc(e->vterm, (size_t)(e->n_terms ? e->n_terms : 1) * sizeof *vt);
    if (vt) e->vterm = vt;
    float *vw = vt ? kvm_realloc(e->vw, (size_t)(e->n_terms ? e->n_terms : 1) * sizeof *vw) : NULL;
    if (vw) e->vw = vw;
    if (!w || !vt || !vw) {
        kvm_free(w);
        return KVM_ENOMEM;
    }
    for (int i = 0; i < e->n_terms; i++) w[i] = (wterm_t){e->term[i], c->terms[e->term[i]], 0};
    e->n_v = weigh(c, w, e->cnt, e->n_terms, vec_keep(c));
    for (int i = 0; i < e->n_v; i++) e->vterm[i] = w[i].id, e->vw[i] = (float)w[i].w;
    kvm_free(w);
    e->vec_gen = c->gen;
    return 0;
}

/* ---- the query ------------------------------------------------------------------------------------------ */

typedef struct query {
    const kvm_failure_t *f;
    tsig_t sig;
    wterm_t *w;       /* [n_w] the normalised query vector */
    int n_w;
    uint64_t tmpl[64];
    int n_tmpl;
} query_t;

static void query_free(query_t *q) { /* may be called twice */
    tsig_free(&q->sig);
    kvm_free(q->w);
    q->w = NULL;
    q->n_w = 0;
}

static int query_build(kvm_schema_cache_t *c, const kvm_failure_t *f, query_t *q) {
    memset(q, 0, sizeof *q);
    q->f = f;
    int rc = tsig_build(f, &c->fns, c->p.tfidf_max_terms, &q->sig);
    if (rc) return rc;
    int n = q->sig.n_terms;
    q->w = kvm_malloc((size_t)(n ? n : 1) * sizeof *q->w);
    int *counts = kvm_malloc((size_t)(n ? n : 1) * sizeof *counts);
    if (!q->w || !counts) {
        kvm_free(counts);
        query_free(q);
        return kvm_seterr(KVM_ENOMEM, "out of memory building a cache query");
    }
    for (int i = 0; i < n; i++) {
        q->w[i] = (wterm_t){term_id(c, q->sig.terms[i].s, false, &rc), q->sig.terms[i].s, 0};
        counts[i] = q->sig.terms[i].n;
    }
    q->n_w = weigh(c, q->w, counts, n, vec_keep(c));
    kvm_free(counts);
    for (int t = 0; t < q->sig.n_steps && q->n_tmpl < 64; t++) {
        bool dup = false;
        for (int i = 0; i < q->n_tmpl; i++) dup |= q->tmpl[i] == q->sig.tmpl_hash[t];
        if (q->sig.tmpl_hash[t] && !dup) q->tmpl[q->n_tmpl++] = q->sig.tmpl_hash[t];
    }
    return 0;
}

typedef struct scored {
    int id;
    double s, cos, jac, st;
    bool err;
} scored_t;

static bool shares_tmpl(const entry_t *e, const query_t *q) {
    for (int i = 0; i < e->n_tmpl; i++)
        for (int j = 0; j < q->n_tmpl; j++)
            if (e->tmpl_hash[i] == q->tmpl[j]) return true;
    return false;
}

static double jaccard(const uint32_t *a, const uint32_t *b) {
    int eq = 0;
    for (int i = 0; i < TSIG_MINHASH; i++) eq += a[i] == b[i];
    bool empty_a = true, empty_b = true;
    for (int i = 0; i < TSIG_MINHASH; i++) empty_a &= a[i] == 0xFFFFFFFFu, empty_b &= b[i] == 0xFFFFFFFFu;
    return empty_a || empty_b ? 0 : (double)eq / TSIG_MINHASH;
}

static int score_entry(kvm_schema_cache_t *c, entry_t *e, const query_t *q, scored_t *out) {
    if (entry_vector(c, e)) return KVM_ENOMEM;
    double dot = 0;
    for (int i = 0; i < e->n_v; i++) dot += (double)c->qdense[e->vterm[i]] * e->vw[i];
    out->id = e->id;
    out->cos = dot;
    out->jac = jaccard(e->minhash, q->sig.minhash);
    out->st = tsig_feat_cosine(e->feats, e->n_feats, e->feats_norm, q->sig.feats, q->sig.n_feats, q->sig.feats_norm);
    out->err = shares_tmpl(e, q);
    out->s = 0.55 * out->cos + 0.20 * out->jac + 0.15 * out->st + 0.10 * (out->err ? 1 : 0);
    return 0;
}

static bool excluded(const entry_t *e, const kvm_failure_t *f) {
    for (int i = 0; f->id && i < MAX_SRC; i++)
        if (e->src[i] && !strcmp(e->src[i], f->id)) return true;
    return f->family && e->family && !strcmp(f->family, e->family);
}

/* The candidates' ids into ids (returns how many): every live entry up to bruteforce_max, else the LSH buckets
 * and the entries sharing an error template, pinned ones always, at most LSH_CAP. */
static int candidates(kvm_schema_cache_t *c, const query_t *q, int *ids) {
    int n = 0;
    if (c->n_live <= c->p.bruteforce_max) {
        for (int i = 0; i < c->n_e; i++)
            if (c->e[i]->live) ids[n++] = i;
        return n;
    }
    int *votes = kvm_calloc((size_t)c->n_e, sizeof *votes);
    if (!votes) return -1;
    for (int b = 0; b < LSH_BANDS; b++) {
        kvm_mapval_t v;
        if (!kvm_map_get_u64(&c->lsh, band_key(q->sig.minhash, b), &v)) continue;
        for (int id = (int)v.i64; id >= 0; id = c->lsh_next[id * LSH_BANDS + b])
            if (band_key(c->e[id]->minhash, b) == band_key(q->sig.minhash, b)) votes[id]++;
    }
    for (int i = 0; i < c->n_e; i++) {
        entry_t *e = c->e[i];
        if (!e->live) continue;
        if (e->flags & F_PINNED) ids[n++] = i;
        else if (votes[i] || (q->n_tmpl && shares_tmpl(e, q))) ids[n++] = i;
    }
    if (n > LSH_CAP) { /* pinned first, then by votes descending, then lower id: a partial selection sort */
        for (int k = 0; k < LSH_CAP; k++) {
            int best = k;
            for (int j = k + 1; j < n; j++) {
                const entry_t *a = c->e[ids[j]], *b = c->e[ids[best]];
                int pa = (a->flags & F_PINNED) != 0, pb = (b->flags & F_PINNED) != 0;
                if (pa != pb ? pa > pb : votes[ids[j]] != votes[ids[best]] ? votes[ids[j]] > votes[ids[best]] : ids[j] < ids[best])
                    best = j;
            }
            int t = ids[k];
            ids[k] = ids[best];
            ids[best] = t;
        }
        n = LSH_CAP;
    }
    kvm_free(votes);
    return n;
}

static int cmp_s_lowid(const void *a, const void *b) {
    const scored_t *x = a, *y = b;
    if (x->s != y->s) return x->s > y->s ? -1 : 1;
    return x->id - y->id;
}

static int cmp_s_highid(const void *a, const void *b) {
    const scored_t *x = a, *y = b;
    if (x->s != y->s) return x->s > y->s ? -1 : 1;
    return y->id - x->id;
}

static double decay(const entry_t *e, uint64_t now_ns, long q) {
    if (!e->last_hit_ns && !e->last_hit_q) return e->hits;
    double dt = now_ns > e->last_hit_ns ? (double)(now_ns - e->last_hit_ns) / HALF_LIFE_NS : 0;
    double dq = (double)(q - e->last_hit_q) / HALF_LIFE_Q;
    return e->hits * pow(2.0, -(dt > dq ? dt : dq));
}

/* Scores the candidates for q into *out (n_out of them, sorted best first). retriever picks the score; for a
 * single retriever ties go to the higher id (correct.md §9.3), else to the lower. self/family exclusions apply
 * when exclude. */
static int rank(kvm_schema_cache_t *c, const query_t *q, kvm_blame_retriever_t retriever, bool exclude, scored_t **out,
                int *n_out) {
    *out = NULL, *n_out = 0;
    if (!c || !c->n_live) return 0;
    int *ids = kvm_malloc((size_t)c->n_e * sizeof *ids);
    scored_t *sc = kvm_malloc((size_t)c->n_e * sizeof *sc);
    int n = ids && sc ? candidates(c, q, ids) : -1;
    int rc = n < 0 ? KVM_ENOMEM : 0;
    for (int i = 0; i < q->n_w; i++)
        if (q->w[i].id >= 0) c->qdense[q->w[i].id] = (float)q->w[i].w;
    int m = 0;
    for (int i = 0; !rc && i < n; i++) {
        entry_t *e = c->e[ids[i]];
        if (exclude && excluded(e, q->f)) continue;
        rc = score_entry(c, e, q, &sc[m]);
        if (retriever == KVM_RETRIEVE_TFIDF) sc[m].s = sc[m].cos;
        else if (retriever == KVM_RETRIEVE_MINHASH) sc[m].s = sc[m].jac;
        else if (retriever == KVM_RETRIEVE_STRUCT) sc[m].s = sc[m].st;
        m++;
    }
    for (int i = 0; i < q->n_w; i++)
        if (q->w[i].id >= 0) c->qdense[q->w[i].id] = 0;
    kvm_free(ids);
    if (rc) {
        kvm_free(sc);
        return kvm_seterr(KVM_ENOMEM, "out of memory in a cache query");
    }
    qsort(sc, (size_t)m, sizeof *sc, retriever == KVM_RETRIEVE_COMBINED ? cmp_s_lowid : cmp_s_highid);
    *out = sc, *n_out = m;
    return 0;
}

/* The top k of a ranking, at most 2 per group (combined retriever only) into top[] (returns how many). */
static int topk(const kvm_schema_cache_t *c, const scored_t *sc, int n, int k, bool group_cap, scored_t *top) {
    int m = 0;
    for (int i = 0; i < n && m < k; i++) {
        int same = 0;
        for (int j = 0; group_cap && j < m; j++) same += c->e[top[j].id]->group == c->e[sc[i].id]->group;
        if (same < 2) top[m++] = sc[i];
    }
    return m;
}

static void count_hits(kvm_schema_cache_t *c, const scored_t *top, int n) {
    uint64_t now = kvm_wall_ns();
    c->queries++;
    for (int i = 0; i < n; i++) {
        entry_t *e = c->e[top[i].id];
        e->hits = decay(e, now, c->queries) + 1;
        e->last_hit_ns = now;
        e->last_hit_q = c->queries;
    }
}

/* ---- insert, merge, evict -------------------------------------------------------------------------------- */

static void hist_add(entry_t *e, const char *agent, int n) {
    for (int i = 0; i < e->n_hist; i++)
        if (!strcmp(e->hist[i].name, agent)) {
            e->hist[i].n += n;
            return;
        }
    if (e->n_hist == MAX_HIST) return;
    snprintf(e->hist[e->n_hist].name, TSIG_AGENT, "%s", agent);
    e->hist[e->n_hist++].n = n;
}

static int src_add(entry_t *e, const char *id) {
    char *s = kvm_strdup(id ? id : "");
    if (!s) return KVM_ENOMEM;
    kvm_free(e->src[e->src_next]);
    e->src[e->src_next] = s;
    e->src_next = (e->src_next + 1) % MAX_SRC;
    if (e->n_src < MAX_SRC) e->n_src++;
    return 0;
}

static int tmpl_add(entry_t *e, const char *t, uint64_t h) {
    for (int i = 0; i < e->n_tmpl; i++)
        if (e->tmpl_hash[i] == h) return 0;
    if (e->n_tmpl == MAX_TMPL) return 0;
    if (!(e->tmpl[e->n_tmpl] = kvm_strdup(t))) return KVM_ENOMEM;
    e->tmpl_hash[e->n_tmpl++] = h;
    return 0;
}

static double rel_pos(int step, int n_steps) {
    return n_steps > 1 ? floor(255.0 * step / (n_steps - 1) + 0.5) / 255.0 : 0;
}

/* A new entry from a labelled failure and its signature. */
static entry_t *entry_from(kvm_schema_cache_t *c, const kvm_failure_t *f, const tsig_t *s, int *rc) {
    entry_t *e = kvm_calloc(1, sizeof *e);
    if (!e) {
        *rc = KVM_ENOMEM;
        return NULL;
    }
    e->created_ns = kvm_wall_ns();
    e->support = 1;
    e->flags = f->human_label ? F_HUMAN : 0;
    char ag[TSIG_AGENT];
    kvm_agent_normalize(f->gold_agent, ag, sizeof ag);
    hist_add(e, ag, 1);
    e->pos_sum = rel_pos(f->gold_step, f->n_steps);
    e->pos_n = 1;
    e->gold_step = f->gold_step;
    e->n_steps = f->n_steps;
    e->phrases = tsig_phrases_in(f->steps[f->gold_step].content);
    e->gold_flags = s->flags[f->gold_step];
    *rc = src_add(e, f->id);
    if (!*rc && f->family && !(e->family = kvm_strdup(f->family))) *rc = KVM_ENOMEM;
    /* the decisive step's template first, then the others by first position */
    if (!*rc && s->tmpl[f->gold_step]) *rc = tmpl_add(e, s->tmpl[f->gold_step], s->tmpl_hash[f->gold_step]);
    for (int t = 0; !*rc && t < s->n_steps; t++)
        if (s->tmpl[t]) *rc = tmpl_add(e, s->tmpl[t], s->tmpl_hash[t]);
    e->term = kvm_malloc((size_t)(s->n_terms ? s->n_terms : 1) * sizeof *e->term);
    e->cnt = kvm_malloc((size_t)(s->n_terms ? s->n_terms : 1) * sizeof *e->cnt);
    e->feats = kvm_malloc((size_t)(s->n_feats ? s->n_feats : 1) * sizeof *e->feats);
    if (!e->term || !e->cnt || !e->feats) *rc = KVM_ENOMEM;
    for (int i = 0; !*rc && i < s->n_terms; i++) {
        e->term[i] = term_id(c, s->terms[i].s, true, rc);
        e->cnt[i] = s->terms[i].n;
        e->n_terms = i + 1;
    }
    if (!*rc) {
        memcpy(e->feats, s->feats, (size_t)s->n_feats * sizeof *e->feats);
        e->n_feats = s->n_feats;
        e->feats_norm = s->feats_norm;
        memcpy(e->minhash, s->minhash, sizeof e->minhash);
        e->simhash = s->simhash;
    }
    if (*rc) {
        entry_free(e);
        return NULL;
    }
    return e;
}

static double evict_score(const entry_t *e, uint64_t now, long q) {
    return (decay(e, now, q) + 1) * (e->helpful + 1) / (double)(e->misleading + 1);
}

static size_t live_bytes(const kvm_schema_cache_t *c) {
    size_t b = 0;
    for (int i = 0; i < c->n_e; i++)
        if (c->e[i]->live) b += entry_bytes(c->e[i]);
    return b;
}

static void evict(kvm_schema_cache_t *c) {
    uint64_t now = kvm_wall_ns();
    c->over_limits = false;
    size_t bytes = live_bytes(c);
    while (c->n_live > c->p.max_entries || bytes > c->p.max_bytes) {
        entry_t *victim = NULL;
        double best = 0;
        for (int i = 0; i < c->n_e; i++) {
            entry_t *e = c->e[i];
            if (!e->live || (e->flags & (F_PINNED | F_HUMAN))) continue;
            double s = evict_score(e, now, c->queries);
            if (!victim || s < best) victim = e, best = s; /* ties: the lower id (met first) */
        }
        if (!victim) {
            c->over_limits = true;
            return;
        }
        bytes -= entry_bytes(victim);
        entry_detach(c, victim);
    }
}

int tcache_decide(double s_best, int hamming_best) {
    if (hamming_best <= 3 || s_best >= MERGE_S) return TCACHE_MERGE;
    return s_best >= GROUP_S ? TCACHE_SAME_GROUP : TCACHE_NEW_GROUP;
}

static int popcount64(uint64_t x) {
    int n = 0;
    for (; x; x &= x - 1) n++;
    return n;
}

int kvm_schema_cache_insert(kvm_schema_cache_t *c, const kvm_failure_t *f, bool bulk) {
    if (!c || !f) return kvm_seterr(KVM_EINVAL, "schema cache insert: no cache or failure");
    if (!f->gold_agent || !*f->gold_agent || f->gold_step < 0 || f->gold_step >= f->n_steps)
        return kvm_seterr(KVM_EINVAL, "schema cache insert: the failure '%s' needs a gold agent and a gold step in [0, %d) "
                          "(got %d)", f->id ? f->id : "", f->n_steps, f->gold_step);
    query_t q;
    int rc = query_build(c, f, &q);
    if (rc) return rc;
    int target = -1, group = -1;
    if (!bulk && c->n_live > 0) {
        scored_t *sc = NULL;
        int n = 0;
        kvm_failure_t nox = *f;
        nox.id = NULL, nox.family = NULL;
        q.f = &nox;
        rc = rank(c, &q, KVM_RETRIEVE_COMBINED, false, &sc, &n);
        int ham_best = 65, ham_id = -1; /* the nearest SimHash (ties: higher S, then lower id: the rank order) */
        for (int i = 0; !rc && i < n; i++) {
            int h = popcount64(c->e[sc[i].id]->simhash ^ q.sig.simhash);
            if (h < ham_best) ham_best = h, ham_id = sc[i].id;
        }
        int d = !rc && n > 0 ? tcache_decide(sc[0].s, ham_best) : TCACHE_NEW_GROUP;
        if (d == TCACHE_MERGE) target = ham_best <= 3 ? ham_id : sc[0].id;
        else if (d == TCACHE_SAME_GROUP) group = c->e[sc[0].id]->group;
        kvm_free(sc);
    }
    if (!rc && target >= 0) { /* merge */
        entry_t *e = c->e[target];
        char ag[TSIG_AGENT];
        kvm_agent_normalize(f->gold_agent, ag, sizeof ag);
        hist_add(e, ag, 1);
        e->pos_sum += rel_pos(f->gold_step, f->n_steps);
        e->pos_n++;
        e->support++;
        e->phrases |= tsig_phrases_in(f->steps[f->gold_step].content);
        if (f->human_label) e->flags |= F_HUMAN;
        rc = src_add(e, f->id);
        if (!rc && q.sig.tmpl[f->gold_step]) rc = tmpl_add(e, q.sig.tmpl[f->gold_step], q.sig.tmpl_hash[f->gold_step]);
        query_free(&q);
        return rc ? kvm_seterr(rc, "out of memory merging into schema %d", target) : target;
    }
    entry_t *e = rc ? NULL : entry_from(c, f, &q.sig, &rc);
    query_free(&q);
    if (e) {
        e->group = group >= 0 ? group : c->next_group++;
        rc = entry_attach(c, e);
        if (rc) entry_free(e);
    }
    if (rc) return kvm_seterr(rc, "out of memory inserting a schema");
    if (!bulk) evict(c);
    return e->id;
}

/* ---- the public cache ------------------------------------------------------------------------------------- */

kvm_schema_cache_params_t kvm_schema_cache_default_params(void) {
    return (kvm_schema_cache_params_t){.max_entries = 4096, .max_bytes = (size_t)64 << 20, .bruteforce_max = 4096,
                                       .tfidf_max_terms = 512};
}

static int load(kvm_schema_cache_t *c);

kvm_schema_cache_t *kvm_schema_cache_open(const char *dir, const kvm_schema_cache_params_t *params) {
    kvm_schema_cache_params_t p = params ? *params : kvm_schema_cache_default_params();
    if (p.max_entries < 1 || p.max_bytes < 1 || p.bruteforce_max < 0 || p.tfidf_max_terms < 0) {
        kvm_seterr(KVM_EINVAL, "schema cache params: max_entries and max_bytes must be >= 1, bruteforce_max and "
                   "tfidf_max_terms >= 0");
        return NULL;
    }
    if (dir && !*dir) {
        kvm_seterr(KVM_EINVAL, "schema cache: empty folder name (NULL = in memory)");
        return NULL;
    }
    kvm_schema_cache_t *c = kvm_calloc(1, sizeof *c);
    if (!c) return NULL;
    c->p = p;
    c->gen = 1;
    kvm_map_init(&c->term_ids, KVM_MAP_STR);
    kvm_map_init(&c->lsh, KVM_MAP_U64);
    tsig_minhash_fns_default(&c->fns);
    if (dir && !(c->dir = kvm_strdup(dir))) {
        kvm_schema_cache_free(c);
        return NULL;
    }
    if (c->dir && load(c)) {
        kvm_schema_cache_free(c);
        return NULL;
    }
    return c;
}

void kvm_schema_cache_free(kvm_schema_cache_t *c) {
    if (!c) return;
    for (int i = 0; i < c->n_e; i++) entry_free(c->e[i]);
    for (int i = 0; i < c->n_terms; i++) kvm_free(c->terms[i]);
    kvm_free(c->e);
    kvm_free(c->terms);
    kvm_free(c->df);
    kvm_free(c->qdense);
    kvm_free(c->lsh_next);
    kvm_map_free(&c->term_ids);
    kvm_map_free(&c->lsh);
    kvm_free(c->dir);
    kvm_free(c);
}

void kvm_schema_cache_stats(const kvm_schema_cache_t *c, kvm_schema_cache_stats_t *out) {
    memset(out, 0, sizeof *out);
    if (!c) return;
    out->entries = c->n_live;
    out->tombstones = c->n_e - c->n_live;
    out->bytes = live_bytes(c);
    out->queries = c->queries;
    out->over_limits = c->over_limits;
    unsigned char *seen = c->next_group ? kvm_calloc((size_t)c->next_group, 1) : NULL;
    for (int i = 0; seen && i < c->n_e; i++)
        if (c->e[i]->live && c->e[i]->group < c->next_group && !seen[c->e[i]->group]) {
            seen[c->e[i]->group] = 1;
            out->groups++;
        }
    kvm_free(seen); /* out of memory: groups stays 0 */
}

int kvm_schema_cache_ids(const kvm_schema_cache_t *c, int *ids, int cap) {
    int n = 0;
    for (int i = 0; c && i < c->n_e; i++)
        if (c->e[i]->live) {
            if (n < cap) ids[n] = i;
            n++;
        }
    return n;
}

static entry_t *live_entry(const kvm_schema_cache_t *c, int id) {
    return c && id >= 0 && id < c->n_e && c->e[id]->live ? c->e[id] : NULL;
}

int kvm_schema_cache_pin(kvm_schema_cache_t *c, int id, bool pinned) {
    entry_t *e = live_entry(c, id);
    if (!e) return kvm_seterr(KVM_ENOENT, "schema cache: no entry %d", id);
    if (pinned) e->flags |= F_PINNED;
    else e->flags &= ~(unsigned)F_PINNED;
    return 0;
}

int kvm_schema_cache_evict(kvm_schema_cache_t *c, int id) {
    entry_t *e = live_entry(c, id);
    if (!e) return kvm_seterr(KVM_ENOENT, "schema cache: no entry %d", id);
    if (e->flags & F_PINNED) return kvm_seterr(KVM_EBUSY, "schema cache: entry %d is pinned (unpin it first)", id);
    entry_detach(c, e);
    return 0;
}

/* The post-processing of an LLM-written text (correct.md §3.2): <think>...</think> removed (an unclosed one: to the
 * end), every byte outside printable ASCII, newline and tab made a space, cut at TEXT_CAP bytes, trimmed. NULL when
 * out of memory. */
char *tcache_scrub_text(const char *in) {
    size_t n = strlen(in);
    char *o = kvm_malloc(n + 1);
    if (!o) return NULL;
    size_t k = 0;
    for (const char *p = in; *p && k < TEXT_CAP;) {
        if (!strncmp(p, "<think>", 7)) {
            const char *end = strstr(p + 7, "</think>");
            if (!end) break;
            p = end + 8;
            continue;
        }
        unsigned char ch = (unsigned char)*p++;
        o[k++] = (ch >= 32 && ch < 127) || ch == '\n' || ch == '\t' ? (char)ch : ' ';
    }
    while (k > 0 && (o[k - 1] == ' ' || o[k - 1] == '\n' || o[k - 1] == '\t')) k--;
    size_t s0 = 0;
    while (s0 < k && (o[s0] == ' ' || o[s0] == '\n' || o[s0] == '\t')) s0++;
    memmove(o, o + s0, k - s0);
    o[k - s0] = '\0';
    return o;
}

/* Adds (sign 1) or removes (sign -1) the term counts of text to a live entry's TF-IDF keys (document frequencies
 * follow). 0 or KVM_ENOMEM (nothing changed then only when the text could not be tokenised). */
static int text_terms(kvm_schema_cache_t *c, entry_t *e, const char *text, int sign) {
    tsig_term_t *t = NULL;
    int n = 0, rc = tsig_text_terms(text, &c->fns, &t, &n);
    if (rc) return rc;
    int *nt = kvm_realloc(e->term, (size_t)(e->n_terms + n + 1) * sizeof *nt);
    if (nt) e->term = nt;
    int *nc = nt ? kvm_realloc(e->cnt, (size_t)(e->n_terms + n + 1) * sizeof *nc) : NULL;
    if (nc) e->cnt = nc;
    if (!nc) rc = KVM_ENOMEM;
    for (int i = 0; !rc && i < n; i++) {
        int id = term_id(c, t[i].s, sign > 0, &rc), at = -1;
        for (int j = 0; id >= 0 && j < e->n_terms && at < 0; j++)
            if (e->term[j] == id) at = j;
        if (sign > 0 && at >= 0) e->cnt[at] += t[i].n;
        else if (sign > 0 && id >= 0) {
            e->term[e->n_terms] = id;
            e->cnt[e->n_terms++] = t[i].n;
            c->df[id]++;
        } else if (sign < 0 && at >= 0 && (e->cnt[at] -= t[i].n) <= 0) {
            c->df[id]--;
            e->term[at] = e->term[e->n_terms - 1];
            e->cnt[at] = e->cnt[--e->n_terms];
        }
    }
    for (int i = 0; i < n; i++) kvm_free(t[i].s);
    kvm_free(t);
    c->gen++; /* df and this entry's counts changed: every vector is recomputed */
    return rc;
}

int kvm_schema_cache_set_text(kvm_schema_cache_t *c, int id, const char *text, const char *model) {
    entry_t *e = live_entry(c, id);
    if (!e) return kvm_seterr(KVM_ENOENT, "schema cache: no entry %d", id);
    char *t = text ? tcache_scrub_text(text) : NULL, *m = model ? kvm_strdup(model) : NULL;
    if ((text && !t) || (model && !m)) {
        kvm_free(t);
        kvm_free(m);
        return kvm_seterr(KVM_ENOMEM, "out of memory setting the text of schema %d", id);
    }
    if (t && !*t) { /* nothing left after the scrub: the stub stands */
        kvm_free(t);
        t = NULL;
    }
    int rc = e->text ? text_terms(c, e, e->text, -1) : 0;
    kvm_free(e->text);
    kvm_free(e->text_model);
    e->text = t;
    e->text_model = t ? m : (kvm_free(m), NULL);
    if (!rc && e->text) rc = text_terms(c, e, e->text, 1);
    return rc ? kvm_seterr(rc, "out of memory indexing the text of schema %d", id) : 0;
}

char *kvm_schema_cache_text(const kvm_schema_cache_t *c, int id) {
    const entry_t *e = live_entry(c, id);
    if (!e) {
        kvm_seterr(KVM_ENOENT, "schema cache: no entry %d", id);
        return NULL;
    }
    if (!e->text) {
        kvm_errclear(); /* no text: not an error */
        return NULL;
    }
    char *r = kvm_strdup(e->text);
    if (!r) kvm_seterr(KVM_ENOMEM, "out of memory");
    return r;
}

/* The stub text of an entry (correct.md §3.2): rendered from its signature. */
static void entry_stub(const entry_t *e, kvm_sb_t *b) {
    int top = 0;
    for (int i = 1; i < e->n_hist; i++)
        if (e->hist[i].n > e->hist[top].n) top = i;
    kvm_sb_printf(b, "Decisive agent class: %s; position ~ %.2f", e->n_hist ? e->hist[top].name : "?",
                  e->pos_n ? e->pos_sum / e->pos_n : 0);
    if (e->n_tmpl) kvm_sb_printf(b, "; error template: %s", e->tmpl[0]);
    for (int i = 0; i < TSIG_N_FLAGS; i++)
        if (e->gold_flags & (1u << i)) kvm_sb_printf(b, "; flag %s at the decisive step", tsig_flag_name(i));
    for (int i = 0; i < tsig_n_phrases(); i++)
        if (e->phrases & (1ULL << i)) kvm_sb_printf(b, "; phrase \"%s\"", tsig_phrase(i));
}

/* ---- persistence ------------------------------------------------------------------------------------------ */

static void hex64(char *out, uint64_t v) { snprintf(out, 17, "%016llx", (unsigned long long)v); }

static bool parse_hex64(const cJSON *j, uint64_t *out) {
    if (!cJSON_IsString(j) || strlen(j->valuestring) != 16) return false;
    char *end = NULL;
    *out = strtoull(j->valuestring, &end, 16);
    return end && !*end;
}

/* cJSON_AddItemToArray that frees the item when it cannot be added (out of memory: the array is NULL) */
static void arr_add(cJSON *a, cJSON *item) {
    if (!cJSON_AddItemToArray(a, item)) cJSON_Delete(item);
}

/* An entry as JSON. Out of memory leaves fields out, so callers check kvm_errcode() == KVM_ENOMEM after it (the
 * allocator sets it) before using the result. */
static cJSON *entry_json(const kvm_schema_cache_t *c, const entry_t *e, bool with_stub) {
    cJSON *o = cJSON_CreateObject();
    char h[17];
    cJSON_AddNumberToObject(o, "id", e->id);
    cJSON_AddNumberToObject(o, "group", e->group);
    cJSON *fl = cJSON_AddArrayToObject(o, "flags");
    if (e->flags & F_PINNED) arr_add(fl, cJSON_CreateString("PINNED"));
    if (e->flags & F_HUMAN) arr_add(fl, cJSON_CreateString("HUMAN_LABEL"));
    hex64(h, e->created_ns);
    cJSON_AddStringToObject(o, "created_ns", h);
    cJSON_AddNumberToObject(o, "support", e->support);
    cJSON *src = cJSON_AddArrayToObject(o, "source_traces");
    for (int k = 0; k < e->n_src; k++) { /* oldest first */
        int i = (e->src_next - e->n_src + k + MAX_SRC) % MAX_SRC;
        arr_add(src, cJSON_CreateString(e->src[i] ? e->src[i] : ""));
    }
    if (e->family) cJSON_AddStringToObject(o, "family", e->family);
    cJSON *g = cJSON_AddObjectToObject(o, "gold");
    cJSON *hist = cJSON_AddArrayToObject(g, "agents");
    for (int i = 0; i < e->n_hist; i++) {
        cJSON *p = cJSON_CreateArray();
        arr_add(p, cJSON_CreateString(e->hist[i].name));
        arr_add(p, cJSON_CreateNumber(e->hist[i].n));
        arr_add(hist, p);
    }
    cJSON_AddNumberToObject(g, "pos_sum", e->pos_sum);
    cJSON_AddNumberToObject(g, "pos_n", e->pos_n);
    cJSON_AddNumberToObject(g, "step", e->gold_step);
    cJSON_AddNumberToObject(g, "n_steps", e->n_steps);
    cJSON *sig = cJSON_AddObjectToObject(o, "sig");
    cJSON *tm = cJSON_AddArrayToObject(sig, "err_templates");
    for (int i = 0; i < e->n_tmpl; i++) arr_add(tm, cJSON_CreateString(e->tmpl[i]));
    cJSON *ph = cJSON_AddArrayToObject(sig, "phrases");
    for (int i = 0; i < tsig_n_phrases(); i++)
        if (e->phrases & (1ULL << i)) arr_add(ph, cJSON_CreateString(tsig_phrase(i)));
    cJSON *gf = cJSON_AddArrayToObject(sig, "flags_at_gold");
    for (int i = 0; i < TSIG_N_FLAGS; i++)
        if (e->gold_flags & (1u << i)) arr_add(gf, cJSON_CreateString(tsig_flag_name(i)));
    cJSON *keys = cJSON_AddObjectToObject(o, "keys");
    cJSON *tf = cJSON_AddArrayToObject(keys, "tf");
    for (int i = 0; i < e->n_terms; i++) {
        cJSON *p = cJSON_CreateArray();
        arr_add(p, cJSON_CreateString(c->terms[e->term[i]]));
        arr_add(p, cJSON_CreateNumber(e->cnt[i]));
        arr_add(tf, p);
    }
    char mh[TSIG_MINHASH * 8 + 1];
    for (int i = 0; i < TSIG_MINHASH; i++) snprintf(mh + 8 * i, 9, "%08x", e->minhash[i]);
    cJSON_AddStringToObject(keys, "minhash", mh);
    hex64(h, e->simhash);
    cJSON_AddStringToObject(keys, "simhash", h);
    cJSON *st = cJSON_AddArrayToObject(keys, "struct");
    for (int i = 0; i < e->n_feats; i++) {
        cJSON *p = cJSON_CreateArray();
        hex64(h, e->feats[i].key);
        arr_add(p, cJSON_CreateString(h));
        arr_add(p, cJSON_CreateNumber(e->feats[i].n));
        arr_add(st, p);
    }
    cJSON *s = cJSON_AddObjectToObject(o, "stats");
    cJSON_AddNumberToObject(s, "hits", e->hits);
    cJSON_AddNumberToObject(s, "helpful", e->helpful);
    cJSON_AddNumberToObject(s, "misleading", e->misleading);
    hex64(h, e->last_hit_ns);
    cJSON_AddStringToObject(s, "last_hit_ns", h);
    cJSON_AddNumberToObject(s, "last_hit_q", (double)e->last_hit_q);
    if (e->text) { /* the LLM-written text (its terms are already in keys.tf) */
        cJSON *t = cJSON_AddObjectToObject(o, "text");
        cJSON_AddStringToObject(t, "body", e->text);
        if (e->text_model) cJSON_AddStringToObject(t, "model", e->text_model);
        cJSON_AddBoolToObject(t, "stub", false);
    } else if (with_stub) {
        kvm_sb_t b = KVM_SB_INIT;
        entry_stub(e, &b);
        cJSON *t = cJSON_AddObjectToObject(o, "text");
        cJSON_AddStringToObject(t, "signatures", b.s ? b.s : "");
        cJSON_AddBoolToObject(t, "stub", true);
        kvm_sb_free(&b);
    }
    return o;
}

char *kvm_schema_cache_entry_json(const kvm_schema_cache_t *c, int id) {
    const entry_t *e = live_entry(c, id);
    if (!e) {
        kvm_seterr(KVM_ENOENT, "schema cache: no entry %d", id);
        return NULL;
    }
    kvm_errclear();
    cJSON *o = entry_json(c, e, true);
    char *s = o && kvm_errcode() != KVM_ENOMEM ? cJSON_Print(o) : NULL;
    cJSON_Delete(o);
    char *r = s ? kvm_strdup(s) : NULL;
    cJSON_free(s);
    if (!r) kvm_seterr(KVM_ENOMEM, "out of memory printing schema %d", id);
    return r;
}

static int snap_path(const kvm_schema_cache_t *c, char *out, size_t cap, const char *suffix) {
    char base[4096];
    if (kvm_path_join(base, sizeof base, c->dir, "schemas.snap")) return KVM_ERANGE;
    if ((size_t)snprintf(out, cap, "%s%s", base, suffix) >= cap) return kvm_seterr(KVM_ERANGE, "path too long: %s", base);
    return 0;
}

static int fsync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY);
    if (fd < 0) return -1;
    int r = fsync(fd);
    close(fd);
    return r;
}

/* Appends a JSON line to b and to the running checksum. */
static int put_line(kvm_sb_t *b, cJSON *o) {
    char *s = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!s) return KVM_ENOMEM;
    int rc = kvm_sb_puts(b, s) || kvm_sb_putc(b, '\n') ? KVM_ENOMEM : 0;
    cJSON_free(s);
    return rc;
}

/* The snapshot's bytes (every live entry, ids kept); KVM_ENOMEM when any part could not be made. */
static int snapshot(const kvm_schema_cache_t *c, kvm_sb_t *b) {
    kvm_errclear();
    cJSON *h = cJSON_CreateObject();
    char x[17];
    cJSON_AddStringToObject(h, "magic", SNAP_MAGIC);
    cJSON_AddNumberToObject(h, "version", SNAP_VERSION);
    cJSON_AddNumberToObject(h, "next_id", c->n_e);
    cJSON_AddNumberToObject(h, "next_group", c->next_group);
    cJSON_AddNumberToObject(h, "queries", (double)c->queries);
    cJSON *a = cJSON_AddArrayToObject(h, "minhash_a"), *bb = cJSON_AddArrayToObject(h, "minhash_b");
    for (int i = 0; i < TSIG_MINHASH; i++) {
        hex64(x, c->fns.a[i]);
        arr_add(a, cJSON_CreateString(x));
        hex64(x, c->fns.b[i]);
        arr_add(bb, cJSON_CreateString(x));
    }
    int rc = kvm_errcode() == KVM_ENOMEM ? KVM_ENOMEM : 0, n = 0;
    if (rc) cJSON_Delete(h);
    else rc = put_line(b, h);
    for (int i = 0; !rc && i < c->n_e; i++)
        if (c->e[i]->live) {
            cJSON *o = entry_json(c, c->e[i], false);
            if (kvm_errcode() == KVM_ENOMEM) {
                cJSON_Delete(o);
                return KVM_ENOMEM;
            }
            rc = put_line(b, o), n++;
        }
    if (rc) return rc;
    uint64_t sum = tsig_fnv1a(b->s, b->len);
    hex64(x, sum);
    return kvm_sb_printf(b, "{\"end\":%d,\"fnv1a\":\"%s\"}\n", n, x) ? KVM_ENOMEM : 0;
}

int kvm_schema_cache_save(kvm_schema_cache_t *c) {
    if (!c) return kvm_seterr(KVM_EINVAL, "schema cache save: no cache");
    if (!c->dir) return 0;
    char path[4200], tmp[4300];
    int rc = snap_path(c, path, sizeof path, "");
    if (rc) return rc;
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    kvm_sb_t b = KVM_SB_INIT;
    if (snapshot(c, &b)) {
        kvm_sb_free(&b);
        return kvm_seterr(KVM_ENOMEM, "out of memory writing %s", path);
    }
    FILE *f = fopen(tmp, "wb");
    if (!f || fwrite(b.s, 1, b.len, f) != b.len || fflush(f) != 0 || fsync(fileno(f)) != 0) rc = KVM_EIO;
    if (f && fclose(f) != 0) rc = KVM_EIO;
    if (!rc && rename(tmp, path) != 0) rc = KVM_EIO;
    int err = errno;
    kvm_sb_free(&b);
    if (rc) {
        remove(tmp);
        return kvm_seterr(KVM_EIO, "schema cache: cannot write %s: %s", path, strerror(err));
    }
    fsync_dir(c->dir);
    return 0;
}

static bool num_in(const cJSON *o, const char *k, double lo, double hi, double *out) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!cJSON_IsNumber(j) || !(j->valuedouble >= lo && j->valuedouble <= hi)) return false;
    *out = j->valuedouble;
    return true;
}

static const char *str_in(const cJSON *o, const char *k) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(j) ? j->valuestring : NULL;
}

/* One entry line back into an entry (not yet attached). 0 or KVM_EFORMAT / KVM_ENOMEM. */
static int entry_parse(kvm_schema_cache_t *c, const cJSON *o, entry_t **out) {
    entry_t *e = kvm_calloc(1, sizeof *e);
    if (!e) return KVM_ENOMEM;
    int rc = 0;
    double v;
    const cJSON *g = cJSON_GetObjectItemCaseSensitive(o, "gold"), *sig = cJSON_GetObjectItemCaseSensitive(o, "sig"),
                *keys = cJSON_GetObjectItemCaseSensitive(o, "keys"), *st = cJSON_GetObjectItemCaseSensitive(o, "stats");
    if (!num_in(o, "id", 0, 1e9, &v)) rc = KVM_EFORMAT;
    else e->id = (int)v;
    if (!rc && num_in(o, "group", 0, 1e9, &v)) e->group = (int)v;
    else rc = KVM_EFORMAT;
    if (!rc && num_in(o, "support", 1, 1e9, &v)) e->support = (int)v;
    else rc = KVM_EFORMAT;
    uint64_t u;
    if (!rc && parse_hex64(cJSON_GetObjectItemCaseSensitive(o, "created_ns"), &u)) e->created_ns = u;
    else rc = KVM_EFORMAT;
    const cJSON *it;
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(o, "flags")) {
        if (!cJSON_IsString(it)) rc = KVM_EFORMAT;
        else if (!strcmp(it->valuestring, "PINNED")) e->flags |= F_PINNED;
        else if (!strcmp(it->valuestring, "HUMAN_LABEL")) e->flags |= F_HUMAN;
    }
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(o, "source_traces")) {
        if (!cJSON_IsString(it)) rc = KVM_EFORMAT;
        else if (!rc) rc = src_add(e, it->valuestring);
    }
    const char *fam = str_in(o, "family");
    if (!rc && fam && !(e->family = kvm_strdup(fam))) rc = KVM_ENOMEM;
    if (!rc && (!cJSON_IsObject(g) || !cJSON_IsObject(sig) || !cJSON_IsObject(keys) || !cJSON_IsObject(st))) rc = KVM_EFORMAT;
    if (!rc) {
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(g, "agents")) {
            const cJSON *name = cJSON_GetArrayItem(it, 0), *n = cJSON_GetArrayItem(it, 1);
            if (!cJSON_IsString(name) || !cJSON_IsNumber(n) || n->valuedouble < 1) rc = KVM_EFORMAT;
            else hist_add(e, name->valuestring, (int)n->valuedouble);
        }
        if (!e->n_hist) rc = KVM_EFORMAT;
        if (!rc && num_in(g, "pos_sum", 0, 1e9, &v)) e->pos_sum = v;
        else rc = KVM_EFORMAT;
        if (!rc && num_in(g, "pos_n", 1, 1e9, &v)) e->pos_n = (int)v;
        else rc = KVM_EFORMAT;
        if (!rc && num_in(g, "step", 0, 1e9, &v)) e->gold_step = (int)v;
        else rc = KVM_EFORMAT;
        if (!rc && num_in(g, "n_steps", 1, 1e9, &v)) e->n_steps = (int)v;
        else rc = KVM_EFORMAT;
    }
    if (!rc) {
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(sig, "err_templates")) {
            if (!cJSON_IsString(it)) rc = KVM_EFORMAT;
            else if (!rc) rc = tmpl_add(e, it->valuestring, tsig_fnv1a(it->valuestring, strlen(it->valuestring)) | 1);
        }
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(sig, "phrases")) {
            for (int i = 0; cJSON_IsString(it) && i < tsig_n_phrases(); i++)
                if (!strcmp(it->valuestring, tsig_phrase(i))) e->phrases |= 1ULL << i;
        }
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(sig, "flags_at_gold")) {
            for (int i = 0; cJSON_IsString(it) && i < TSIG_N_FLAGS; i++)
                if (!strcmp(it->valuestring, tsig_flag_name(i))) e->gold_flags |= 1u << i;
        }
    }
    const cJSON *tf = rc ? NULL : cJSON_GetObjectItemCaseSensitive(keys, "tf");
    int n_tf = cJSON_GetArraySize(tf), n_st = 0;
    const cJSON *stj = rc ? NULL : cJSON_GetObjectItemCaseSensitive(keys, "struct");
    n_st = cJSON_GetArraySize(stj);
    if (!rc) {
        e->term = kvm_malloc((size_t)(n_tf ? n_tf : 1) * sizeof *e->term);
        e->cnt = kvm_malloc((size_t)(n_tf ? n_tf : 1) * sizeof *e->cnt);
        e->feats = kvm_malloc((size_t)(n_st ? n_st : 1) * sizeof *e->feats);
        if (!e->term || !e->cnt || !e->feats) rc = KVM_ENOMEM;
    }
    cJSON_ArrayForEach(it, tf) {
        if (rc) break;
        const cJSON *s = cJSON_GetArrayItem(it, 0), *n = cJSON_GetArrayItem(it, 1);
        if (!cJSON_IsString(s) || !cJSON_IsNumber(n) || n->valuedouble < 1 || n->valuedouble > 1e9) {
            rc = KVM_EFORMAT;
            break;
        }
        int id = term_id(c, s->valuestring, true, &rc);
        for (int i = 0; !rc && i < e->n_terms; i++)
            if (e->term[i] == id) rc = KVM_EFORMAT; /* a term twice would count twice in df */
        if (rc) break;
        e->term[e->n_terms] = id;
        e->cnt[e->n_terms++] = (int)n->valuedouble;
    }
    double sq = 0;
    cJSON_ArrayForEach(it, stj) {
        if (rc) break;
        const cJSON *n = cJSON_GetArrayItem(it, 1);
        uint64_t k;
        if (!parse_hex64(cJSON_GetArrayItem(it, 0), &k) || !cJSON_IsNumber(n) || n->valuedouble < 1 || n->valuedouble > 1e9 ||
            (e->n_feats && k <= e->feats[e->n_feats - 1].key)) {
            rc = KVM_EFORMAT;
            break;
        }
        e->feats[e->n_feats++] = (tsig_feat_t){k, (int)n->valuedouble};
        sq += n->valuedouble * n->valuedouble;
    }
    e->feats_norm = sqrt(sq);
    const char *mh = rc ? NULL : str_in(keys, "minhash");
    if (!rc && (!mh || strlen(mh) != TSIG_MINHASH * 8)) rc = KVM_EFORMAT;
    for (int i = 0; !rc && i < TSIG_MINHASH; i++) {
        char w[9];
        memcpy(w, mh + 8 * i, 8);
        w[8] = '\0';
        char *end = NULL;
        e->minhash[i] = (uint32_t)strtoul(w, &end, 16);
        if (!end || *end) rc = KVM_EFORMAT;
    }
    if (!rc && !parse_hex64(cJSON_GetObjectItemCaseSensitive(keys, "simhash"), &e->simhash)) rc = KVM_EFORMAT;
    const cJSON *tx = rc ? NULL : cJSON_GetObjectItemCaseSensitive(o, "text");
    if (tx) { /* version 2: an LLM-written text (its terms are in keys.tf already) */
        const char *body = str_in(tx, "body"), *model = str_in(tx, "model");
        if (!cJSON_IsObject(tx) || !body || strlen(body) > TEXT_CAP) rc = KVM_EFORMAT;
        else if (!(e->text = kvm_strdup(body)) || (model && !(e->text_model = kvm_strdup(model)))) rc = KVM_ENOMEM;
    }
    if (!rc) {
        if (num_in(st, "hits", 0, 1e12, &v)) e->hits = v;
        if (num_in(st, "helpful", 0, 1e9, &v)) e->helpful = (int)v;
        if (num_in(st, "misleading", 0, 1e9, &v)) e->misleading = (int)v;
        if (num_in(st, "last_hit_q", 0, 1e15, &v)) e->last_hit_q = (long)v;
        if (!parse_hex64(cJSON_GetObjectItemCaseSensitive(st, "last_hit_ns"), &e->last_hit_ns)) e->last_hit_ns = 0;
    }
    if (rc) {
        entry_free(e);
        return rc;
    }
    *out = e;
    return 0;
}

/* Parses the snapshot text; 0, KVM_EFORMAT (with the reason in *why) or KVM_ENOMEM. */
static int load_text(kvm_schema_cache_t *c, char *data, size_t len, const char **why) {
    *why = "no trailer (torn or truncated)";
    if (!len || data[len - 1] != '\n') return KVM_EFORMAT;
    char *last = data + len - 1;
    while (last > data && last[-1] != '\n') last--;
    cJSON *tr = NULL;
    int prc = kvm_json_parse(last, (size_t)(data + len - last), "schemas.snap trailer", &tr);
    if (prc) return prc == KVM_ENOMEM ? prc : KVM_EFORMAT;
    double n_end;
    uint64_t sum;
    bool ok = num_in(tr, "end", 0, 1e9, &n_end) && parse_hex64(cJSON_GetObjectItemCaseSensitive(tr, "fnv1a"), &sum);
    cJSON_Delete(tr);
    if (!ok) return KVM_EFORMAT;
    *why = "checksum mismatch";
    if (tsig_fnv1a(data, (size_t)(last - data)) != sum) return KVM_EFORMAT;
    int rc = 0, n = 0, line = 0;
    double v;
    for (char *p = data; !rc && p < last; line++) {
        char *nl = memchr(p, '\n', (size_t)(last - p));
        cJSON *o = NULL;
        *why = "a malformed line";
        int lrc = nl ? kvm_json_parse(p, (size_t)(nl - p), "schemas.snap line", &o) : KVM_EFORMAT;
        if (lrc) rc = lrc == KVM_ENOMEM ? lrc : KVM_EFORMAT;
        if (!rc && line == 0) {
            const char *magic = str_in(o, "magic");
            const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, "minhash_a"), *b = cJSON_GetObjectItemCaseSensitive(o, "minhash_b");
            *why = "not a kvmesh schema snapshot of version 1 or 2";
            if (!magic || strcmp(magic, SNAP_MAGIC) || !num_in(o, "version", 1, SNAP_VERSION, &v) || v != floor(v) ||
                cJSON_GetArraySize(a) != TSIG_MINHASH || cJSON_GetArraySize(b) != TSIG_MINHASH)
                rc = KVM_EFORMAT;
            for (int i = 0; !rc && i < TSIG_MINHASH; i++)
                if (!parse_hex64(cJSON_GetArrayItem(a, i), &c->fns.a[i]) || !parse_hex64(cJSON_GetArrayItem(b, i), &c->fns.b[i]) ||
                    c->fns.a[i] == 0 || c->fns.a[i] >= ((1ULL << 61) - 1) || c->fns.b[i] >= ((1ULL << 61) - 1))
                    rc = KVM_EFORMAT;
            if (!rc && num_in(o, "next_group", 0, 1e9, &v)) c->next_group = (int)v;
            if (!rc && num_in(o, "queries", 0, 1e15, &v)) c->queries = (long)v;
        } else if (!rc) {
            entry_t *e = NULL;
            rc = entry_parse(c, o, &e);
            *why = "a malformed entry";
            int id = e ? e->id : 0;
            if (!rc && id < c->n_e) rc = KVM_EFORMAT; /* ids ascend */
            while (!rc && c->n_e < id) { /* evicted ids in between: tombstones */
                entry_t *t = kvm_calloc(1, sizeof *t);
                if (!t) rc = KVM_ENOMEM;
                else if ((rc = entry_attach(c, t)) == 0) entry_detach(c, t);
                else entry_free(t);
            }
            if (!rc) rc = entry_attach(c, e);
            if (rc) entry_free(e);
            else {
                if (e->group >= c->next_group) c->next_group = e->group + 1;
                n++;
            }
        }
        cJSON_Delete(o);
        p = nl ? nl + 1 : last;
    }
    if (!rc && n != (int)n_end) *why = "entry count differs from the trailer", rc = KVM_EFORMAT;
    return rc;
}

static void reset(kvm_schema_cache_t *c) {
    for (int i = 0; i < c->n_e; i++) entry_free(c->e[i]);
    for (int i = 0; i < c->n_terms; i++) kvm_free(c->terms[i]);
    c->n_e = c->n_live = c->n_terms = c->next_group = 0;
    c->queries = 0;
    c->gen++;
    kvm_map_free(&c->term_ids);
    kvm_map_free(&c->lsh);
    kvm_map_init(&c->term_ids, KVM_MAP_STR);
    kvm_map_init(&c->lsh, KVM_MAP_U64);
    tsig_minhash_fns_default(&c->fns);
}

static int load(kvm_schema_cache_t *c) {
    char path[4200], bad[4300];
    int rc = snap_path(c, path, sizeof path, "");
    if (rc) return rc;
    if (!kvm_dir_exists(c->dir) && (rc = kvm_mkdirs(c->dir))) return kvm_errctx(rc, "schema cache folder");
    if (!kvm_file_exists(path)) return 0;
    char *data = NULL;
    size_t len = 0;
    if ((rc = kvm_read_file(path, &data, &len, 0))) return kvm_errctx(rc, "schema cache");
    const char *why = "";
    rc = load_text(c, data, len, &why);
    kvm_free(data);
    if (rc == KVM_EFORMAT) { /* set aside, start empty */
        reset(c);
        snprintf(bad, sizeof bad, "%s.bad", path);
        rename(path, bad);
        kvm_log(KVM_LOG_WARN, "schema cache: %s: %s; set aside as %s, starting empty", path, why, bad);
        return 0;
    }
    return rc ? kvm_seterr(rc, "out of memory loading %s", path) : 0;
}

/* ---- blame ------------------------------------------------------------------------------------------------ */

kvm_blame_params_t kvm_blame_default_params(void) {
    return (kvm_blame_params_t){.k = 5, .method = KVM_BLAME_TRIAGE, .retriever = KVM_RETRIEVE_COMBINED, .count_hit = true};
}

static bool is_user(const char *a) { return !strcmp(a, "human") || !strcmp(a, "user"); }

/* The query's most frequent agent other than the user and the code executor (ties: the earliest first seen);
 * -1 when there is none. Returns the step of its first appearance. */
static int prior_agent(const tsig_t *s) {
    int best = -1, best_n = 0;
    for (int t = 0; t < s->n_steps; t++) {
        const char *a = s->agent[t];
        if (is_user(a) || !strcmp(a, "computer_terminal")) continue;
        bool earlier = false;
        for (int u = 0; u < t && !earlier; u++) earlier = !strcmp(s->agent[u], a);
        if (earlier) continue;
        int n = 0;
        for (int u = t; u < s->n_steps; u++) n += !strcmp(s->agent[u], a);
        if (n > best_n) best = t, best_n = n;
    }
    return best;
}

static const char *top_class(const entry_t *e) {
    int top = 0;
    for (int i = 1; i < e->n_hist; i++)
        if (e->hist[i].n > e->hist[top].n) top = i;
    return e->n_hist ? e->hist[top].name : "";
}

static void set_answer(kvm_blame_t *out, const tsig_t *s, int step, double score, const char *ev) {
    out->step = step;
    snprintf(out->agent, sizeof out->agent, "%s", step >= 0 ? s->agent[step] : "");
    if (out->n_cand < KVM_BLAME_MAX_CAND && step >= 0) {
        out->cand[out->n_cand].step = step;
        snprintf(out->cand[out->n_cand].agent, sizeof out->cand[0].agent, "%s", s->agent[step]);
        out->cand[out->n_cand].score = score;
        snprintf(out->cand[out->n_cand].evidence, sizeof out->cand[0].evidence, "%s", ev);
        out->n_cand++;
    }
}

/* Label transfer from the nearest entries (correct.md §9.3). */
static void blame_knn(const kvm_schema_cache_t *c, const tsig_t *s, const scored_t *top, int n, kvm_blame_t *out) {
    int agent_step = -1; /* a step of the predicted agent */
    char agent[TSIG_AGENT] = "";
    int best_votes = 0;
    for (int i = 0; i < n && i < 5; i++) {
        const char *cls = top_class(c->e[top[i].id]);
        int in_query = -1;
        for (int t = 0; t < s->n_steps && in_query < 0; t++)
            if (!strcmp(s->agent[t], cls)) in_query = t;
        if (in_query < 0) continue;
        int votes = 0;
        for (int j = 0; j < n && j < 5; j++) votes += !strcmp(top_class(c->e[top[j].id]), cls);
        if (votes > best_votes) best_votes = votes, agent_step = in_query, snprintf(agent, sizeof agent, "%s", cls);
    }
    if (agent_step < 0) agent_step = prior_agent(s);
    if (agent_step >= 0) snprintf(agent, sizeof agent, "%s", s->agent[agent_step]);
    double rel = 0;
    if (n > 0) {
        const entry_t *e = c->e[top[0].id];
        rel = e->pos_n > 1 ? e->pos_sum / e->pos_n : (double)e->gold_step / (e->n_steps > 1 ? e->n_steps - 1 : 1);
    }
    double g = rint(rel * (s->n_steps > 1 ? s->n_steps - 1 : 0));
    bool any = false;
    for (int t = 0; t < s->n_steps; t++) any |= !strcmp(s->agent[t], agent);
    int best = -1;
    for (int t = 0; t < s->n_steps; t++) {
        if (any && strcmp(s->agent[t], agent)) continue;
        if (best < 0 || fabs(t - g) < fabs(best - g)) best = t;
    }
    char ev[256];
    snprintf(ev, sizeof ev, "knn: %d of the top neighbours blame %s; nearest decisive position %.2f", best_votes, agent, rel);
    set_answer(out, s, best, 0, ev);
    if (best >= 0) snprintf(out->agent, sizeof out->agent, "%s", agent);
}

/* The deterministic triage (correct.md §5.1). */
static int blame_triage(const kvm_schema_cache_t *c, const tsig_t *s, const scored_t *top, int k, kvm_blame_t *out) {
    const double w1 = 1.0, w2 = 0.5, w3 = 0.5, w4 = 1.5, w5 = 0.75, w6 = 1.0, w7 = 2.0;
    int n = s->n_steps;
    double *score = kvm_calloc((size_t)n + 1, sizeof *score);
    if (!score) return kvm_seterr(KVM_ENOMEM, "out of memory in blame");
    uint64_t phrases = 0;
    for (int i = 0; i < k; i++) phrases |= c->e[top[i].id]->phrases;
    int first_repeat = -1, first_end = -1;
    for (int t = 0; t < n; t++) {
        if (first_repeat < 0 && (s->flags[t] & TSIG_REPEAT)) first_repeat = t;
        if (first_end < 0 && (s->flags[t] & TSIG_TERMINATES)) first_end = t;
    }
    for (int t = 0; t < n; t++) {
        double prior = 0, pos = 0, x = n > 1 ? (double)t / (n - 1) : 0;
        for (int i = 0; i < k; i++) {
            const entry_t *e = c->e[top[i].id];
            int tot = 0;
            for (int h = 0; h < e->n_hist; h++) tot += e->hist[h].n;
            for (int h = 0; h < e->n_hist; h++)
                if (!strcmp(e->hist[h].name, s->agent[t])) prior += (double)e->hist[h].n / tot / k;
            double p = e->pos_sum / e->pos_n;
            pos += exp(-(x - p) * (x - p) / (2 * 0.1 * 0.1)) / k;
        }
        int ph = popcount64(s->phrases[t] & phrases);
        score[t] = w1 * prior + w2 * pos + w3 * (ph < 2 ? ph : 2);
        bool err = false;
        for (int i = 0; s->tmpl_hash[t] && i < k && !err; i++) {
            const entry_t *e = c->e[top[i].id];
            for (int j = 0; j < e->n_tmpl; j++) err |= e->tmpl_hash[j] == s->tmpl_hash[t];
        }
        score[t] += w4 * err;
        int fl = !!(s->flags[t] & TSIG_UNGROUNDED) + !!(s->flags[t] & TSIG_PREMATURE_END) +
                 !!(s->flags[t] & TSIG_UNVERIFIED_CLAIM) + (t == first_repeat);
        score[t] += w5 * fl;
        if (t + 1 < n && s->tool[t + 1] && s->error[t + 1] && !s->tool[t]) score[t] += w6;
        if (first_end >= 0 && t > first_end) score[t] -= w7;
    }
    /* top 3 eligible steps, ties to the earlier */
    for (int r = 0; r < KVM_BLAME_MAX_CAND; r++) {
        int best = -1;
        for (int t = 0; t < n; t++) {
            if (is_user(s->agent[t])) continue;
            bool taken = false;
            for (int j = 0; j < out->n_cand; j++) taken |= out->cand[j].step == t;
            if (!taken && (best < 0 || score[t] > score[best])) best = t;
        }
        if (best < 0) break;
        char ev[256];
        int m = snprintf(ev, sizeof ev, "score %.3f", score[best]);
        for (int b = 0; b < TSIG_N_FLAGS && m < (int)sizeof ev; b++)
            if (s->flags[best] & (1u << b)) m += snprintf(ev + m, sizeof ev - (size_t)m, "; %s", tsig_flag_name(b));
        if (s->tmpl[best] && m < (int)sizeof ev) m += snprintf(ev + m, sizeof ev - (size_t)m, "; error: %.80s", s->tmpl[best]);
        if (best + 1 < n && s->tool[best + 1] && s->error[best + 1] && !s->tool[best] && m < (int)sizeof ev)
            snprintf(ev + m, sizeof ev - (size_t)m, "; the next tool result failed");
        set_answer(out, s, best, score[best], ev);
        if (r > 0) out->step = out->cand[0].step, snprintf(out->agent, sizeof out->agent, "%s", out->cand[0].agent);
    }
    kvm_free(score);
    return 0;
}

int kvm_blame(kvm_schema_cache_t *c, const kvm_failure_t *f, const kvm_blame_params_t *params, kvm_blame_t *out) {
    kvm_blame_params_t p = params ? *params : kvm_blame_default_params();
    memset(out, 0, sizeof *out);
    out->step = -1;
    if (!f) return kvm_seterr(KVM_EINVAL, "blame: no failure");
    if (p.k < 0 || p.k > KVM_BLAME_MAX_K || p.method < KVM_BLAME_TRIAGE || p.method > KVM_BLAME_PRIOR ||
        p.retriever < KVM_RETRIEVE_COMBINED || p.retriever > KVM_RETRIEVE_STRUCT)
        return kvm_seterr(KVM_EINVAL, "blame params: k in [0, %d], a known method and retriever", KVM_BLAME_MAX_K);
    kvm_schema_cache_t *empty = NULL;
    if (!c && !(c = empty = kvm_schema_cache_open(NULL, NULL))) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    query_t q;
    int rc = query_build(c, f, &q);
    scored_t *sc = NULL, top[KVM_BLAME_MAX_K];
    int n = 0, k = 0;
    if (!rc && p.method != KVM_BLAME_PRIOR) rc = rank(c, &q, p.retriever, true, &sc, &n);
    if (!rc) {
        k = topk(c, sc, n, p.k, p.retriever == KVM_RETRIEVE_COMBINED, top);
        if (p.count_hit && p.method != KVM_BLAME_PRIOR) count_hits(c, top, k);
        out->n_schemata = k;
        for (int i = 0; i < k; i++) out->schema_ids[i] = top[i].id, out->schema_scores[i] = top[i].s;
        if (p.method == KVM_BLAME_PRIOR) {
            int t = prior_agent(&q.sig);
            set_answer(out, &q.sig, t, 0, "prior: the most active agent's first step");
        } else if (p.method == KVM_BLAME_KNN) blame_knn(c, &q.sig, top, k, out);
        else rc = blame_triage(c, &q.sig, top, k, out);
    }
    kvm_free(sc);
    query_free(&q);
    kvm_schema_cache_free(empty);
    return rc;
}

int kvm_schema_cache_feedback(kvm_schema_cache_t *c, const kvm_blame_t *shown, const kvm_failure_t *f) {
    if (!c || !shown || !f || !f->gold_agent || f->gold_step < 0 || f->gold_step >= f->n_steps || !f->steps)
        return kvm_seterr(KVM_EINVAL, "schema feedback: a cache, the blame shown and a labelled failure are needed");
    char agent[TSIG_AGENT];
    kvm_agent_normalize(f->gold_agent, agent, sizeof agent);
    const kvm_failure_step_t *st = &f->steps[f->gold_step];
    char *tmpl = tsig_error_template(st->content, st->error);
    uint64_t h = tmpl ? tsig_fnv1a(tmpl, strlen(tmpl)) | 1 : 0;
    kvm_free(tmpl);
    int helpful = 0;
    for (int i = 0; i < shown->n_schemata && i < KVM_BLAME_MAX_K; i++) {
        entry_t *e = live_entry(c, shown->schema_ids[i]);
        if (!e) continue;
        bool match = !strcmp(top_class(e), agent);
        for (int j = 0; h && j < e->n_tmpl; j++) match |= e->tmpl_hash[j] == h;
        if (match) e->helpful++, helpful++;
        else e->misleading++;
    }
    return helpful;
}
