/* tokenizer.c - the tokenizer object, the llama2.c tokenizer.bin family, the BPE merge engine and the
 * public API of tokenizer.h. The HF tokenizer.json loader is tok_hf.c, its encode/decode pipeline
 * tok_pipeline.c, the Unicode classes tok_unicode.c.
 *
 * Merging (both families) runs on a doubly linked list of symbols with a binary heap of candidate pairs
 * ordered by (priority, position): llama2.c picks the highest-scoring adjacent pair whose concatenation
 * is a vocabulary piece (leftmost on ties, as run.c's scan does), HF BPE the lowest merge rank (leftmost
 * on ties, as tokenizers' BinaryHeap does). Stale heap entries are recognised by the symbol ids they
 * were made for. O(n log n) per word, so a long word (10 KB without a space) stays fast. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/core.h"
#include "../core/vec.h"
#include "tok_internal.h"

/* ==== small containers ============================================================================== */

int tok_ids_push(tok_ids_t *l, int32_t id) {
    int rc = kvm_array_reserve(&l->v, &l->cap, (size_t)l->n + 1, sizeof *l->v, 64);
    if (rc) return rc;
    l->v[l->n++] = id;
    return 0;
}

/* Both maps are core hash maps (runtime/core/map.h): vocab borrows its keys from pieces[] or the
 * file data, merges packs (left, right) into the key and (rank, merged) into the value. */
int tok_strmap_init(tok_strmap_t *m, size_t expected) {
    kvm_map_init(m, KVM_MAP_STR_REF);
    return kvm_map_reserve(m, expected);
}

void tok_strmap_free(tok_strmap_t *m) { kvm_map_free(m); }

int tok_strmap_put(tok_strmap_t *m, const char *key, size_t klen, int32_t val) {
    return kvm_map_put(m, key, klen, KVM_MAPVAL_I64(val));
}

int32_t tok_strmap_get(const tok_strmap_t *m, const char *key, size_t klen) {
    kvm_mapval_t v;
    return kvm_map_get(m, key, klen, &v) ? (int32_t)v.i64 : -1;
}

int tok_pairmap_init(tok_pairmap_t *m, size_t expected) {
    kvm_map_init(m, KVM_MAP_U64);
    return kvm_map_reserve(m, expected);
}

void tok_pairmap_free(tok_pairmap_t *m) { kvm_map_free(m); }

static uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t)(uint32_t)a << 32 | (uint32_t)b; }

int tok_pairmap_put(tok_pairmap_t *m, int32_t a, int32_t b, int32_t rank, int32_t merged) {
    uint64_t k = pair_key(a, b);
    if (kvm_map_get_u64(m, k, NULL)) return 0; /* the first (lowest) rank stays */
    return kvm_map_put_u64(m, k, KVM_MAPVAL_U64((uint64_t)(uint32_t)rank << 32 | (uint32_t)merged));
}

bool tok_pairmap_get(const tok_pairmap_t *m, int32_t a, int32_t b, int32_t *rank, int32_t *merged) {
    kvm_mapval_t v;
    if (!kvm_map_get_u64(m, pair_key(a, b), &v)) return false;
    *rank = (int32_t)(uint32_t)(v.u64 >> 32);
    *merged = (int32_t)(uint32_t)v.u64;
    return true;
}

/* ==== the GPT-2 byte <-> character map ================================================================ */

static char g_byte_char[256][3];
static uint8_t g_byte_char_len[256];
static int16_t g_char_byte[512]; /* code point (all < 0x144) -> byte */
static pthread_once_t g_byte_map_once = PTHREAD_ONCE_INIT;

/* Printable Latin-1 bytes map to themselves; the rest, in byte order, to U+0100, U+0101, ... */
static void byte_map_build(void) {
    int n = 0;
    for (int i = 0; i < 512; i++) g_char_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        uint32_t cp = printable ? (uint32_t)b : (uint32_t)(256 + n++);
        g_byte_char_len[b] = (uint8_t)tok_utf8_put(cp, g_byte_char[b]);
        g_char_byte[cp] = (int16_t)b;
    }
}

static void byte_map_init(void) { pthread_once(&g_byte_map_once, byte_map_build); }

const char *tok_byte_char(unsigned b, int *len) {
    byte_map_init();
    *len = g_byte_char_len[b & 0xFF];
    return g_byte_char[b & 0xFF];
}

int tok_char_byte(uint32_t cp) {
    byte_map_init();
    return cp < 512 ? g_char_byte[cp] : -1;
}

/* ==== object lifetime ============================================================================== */

kvm_tokenizer_t *tok_alloc(int kind, int vocab_size, const char *path) {
    byte_map_init();
    kvm_tokenizer_t *t = kvm_calloc(1, sizeof *t);
    if (!t) return NULL;
    t->kind = kind;
    t->vocab_size = vocab_size;
    t->bos = t->eos = t->unk = -1;
    for (int i = 0; i < 256; i++) t->byte_ids[i] = -1, t->added_by_byte[i] = -1;
    t->path = kvm_strdup(path ? path : "");
    t->chat_template = kvm_strdup("");
    t->pieces = kvm_calloc((size_t)vocab_size + 1, sizeof *t->pieces);
    t->piece_len = kvm_calloc((size_t)vocab_size + 1, sizeof *t->piece_len);
    t->special = kvm_calloc((size_t)vocab_size + 1, 1);
    if (!t->path || !t->chat_template || !t->pieces || !t->piece_len || !t->special ||
        tok_strmap_init(&t->vocab, (size_t)vocab_size)) {
        kvm_tokenizer_free(t);
        kvm_seterr(KVM_ENOMEM, "tokenizer: out of memory for %d tokens", vocab_size);
        return NULL;
    }
    return t;
}

int tok_set_piece(kvm_tokenizer_t *t, int32_t id, const char *s, size_t len, bool map_it) {
    if (id < 0 || id >= t->vocab_size) return kvm_seterr(KVM_ERANGE, "token id %d outside 0..%d", id, t->vocab_size - 1);
    if (!t->pieces[id]) {
        char *p = kvm_malloc(len + 1);
        if (!p) return KVM_ENOMEM;
        memcpy(p, s, len);
        p[len] = '\0';
        t->pieces[id] = p;
        t->piece_len[id] = (uint32_t)len;
    }
    if (map_it) return tok_strmap_put(&t->vocab, t->pieces[id], t->piece_len[id], id);
    return 0;
}

void kvm_tokenizer_free(kvm_tokenizer_t *t) {
    if (!t) return;
    if (t->pieces)
        for (int i = 0; i < t->vocab_size; i++) kvm_free(t->pieces[i]);
    kvm_free(t->pieces);
    kvm_free(t->piece_len);
    kvm_free(t->special);
    kvm_free(t->scores);
    tok_strmap_free(&t->vocab);
    tok_pairmap_free(&t->merges);
    for (int i = 0; i < t->n_added; i++) kvm_free(t->added[i].content);
    kvm_free(t->added);
    for (int i = 0; i < t->n_norm; i++) kvm_free(t->norm[i].a), kvm_free(t->norm[i].b);
    kvm_free(t->norm);
    for (int i = 0; i < t->n_pre; i++) kvm_free(t->pre[i].pattern);
    kvm_free(t->pre);
    for (int i = 0; i < t->n_dec; i++) kvm_free(t->dec[i].a), kvm_free(t->dec[i].b);
    kvm_free(t->dec);
    kvm_free(t->post_prefix);
    kvm_free(t->post_suffix);
    kvm_free(t->chat_template);
    kvm_free(t->path);
    kvm_free(t);
}

/* ==== the merge engine ============================================================================= */

typedef struct {
    int32_t id;
    int prev, next; /* symbol indexes, -1 at the ends */
    uint32_t len;   /* bytes of the word this symbol covers (llama2.c: for the concatenation) */
    uint32_t start; /* byte offset in the word */
    bool alive;
} sym_t;

typedef struct {
    double prio; /* lower pops first */
    int pos;     /* left symbol index (= its original position: ties go leftmost) */
    int32_t left, right;
    int32_t merged;
} cand_t;

/* A binary heap of a fixed capacity (merge_symbols sizes it: a word of n symbols pushes at most 3n candidates). */
typedef struct {
    cand_t *v;
    int n;
    size_t cap;
} heap_t;

static bool cand_less(const cand_t *a, const cand_t *b) {
    return a->prio < b->prio || (a->prio == b->prio && a->pos < b->pos);
}

static void heap_push(heap_t *h, cand_t c) {
    int i = h->n++; /* < cap: see heap_t */
    h->v[i] = c;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!cand_less(&h->v[i], &h->v[p])) break;
        cand_t tmp = h->v[i];
        h->v[i] = h->v[p];
        h->v[p] = tmp;
        i = p;
    }
}

static cand_t heap_pop(heap_t *h) {
    cand_t top = h->v[0];
    h->v[0] = h->v[--h->n];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < h->n && cand_less(&h->v[l], &h->v[m])) m = l;
        if (r < h->n && cand_less(&h->v[r], &h->v[m])) m = r;
        if (m == i) break;
        cand_t tmp = h->v[i];
        h->v[i] = h->v[m];
        h->v[m] = tmp;
        i = m;
    }
    return top;
}

/* The candidate for merging symbols a and b (adjacent), if any. word: the bytes (llama2.c concatenates
 * them to look the piece up). */
static bool pair_candidate(const kvm_tokenizer_t *t, const sym_t *s, int a, int b, const char *word, cand_t *c) {
    if (t->kind == TOK_LLAMA2C) {
        int32_t id = tok_strmap_get(&t->vocab, word + s[a].start, s[a].len + s[b].len);
        if (id < 0) return false;
        c->prio = -(double)t->scores[id];
        c->merged = id;
    } else {
        int32_t rank, merged;
        if (!tok_pairmap_get(&t->merges, s[a].id, s[b].id, &rank, &merged)) return false;
        c->prio = (double)rank;
        c->merged = merged;
    }
    c->pos = a;
    c->left = s[a].id;
    c->right = s[b].id;
    return true;
}

/* Merges the symbols in place until no candidate is left; appends the surviving ids to out. The candidates: n - 1 at
 * first, then at most 2 per merge, and a merge retires a symbol: fewer than 3n in all, in a stack buffer for the
 * short words that most text is made of (a word a token or two long: no allocation). */
static int merge_symbols(const kvm_tokenizer_t *t, sym_t *s, int n, const char *word, tok_ids_t *out) {
    cand_t local[48];
    heap_t h = {.v = local, .cap = sizeof local / sizeof local[0]};
    if ((size_t)n * 3 > h.cap) {
        h.cap = (size_t)n * 3;
        if (!(h.v = kvm_malloc(h.cap * sizeof *h.v))) return KVM_ENOMEM;
    }
    int rc = 0;
    cand_t c;
    for (int i = 0; i + 1 < n; i++)
        if (pair_candidate(t, s, i, i + 1, word, &c)) heap_push(&h, c);
    while (h.n > 0) {
        c = heap_pop(&h);
        int a = c.pos, b = s[a].next;
        if (!s[a].alive || b < 0 || s[a].id != c.left || s[b].id != c.right) continue; /* stale */
        s[a].id = c.merged;
        s[a].len += s[b].len;
        s[a].next = s[b].next;
        if (s[b].next >= 0) s[s[b].next].prev = a;
        s[b].alive = false;
        if (s[a].prev >= 0 && pair_candidate(t, s, s[a].prev, a, word, &c)) heap_push(&h, c);
        if (s[a].next >= 0 && pair_candidate(t, s, a, s[a].next, word, &c)) heap_push(&h, c);
    }
    for (int i = 0; i < n && !rc; i++)
        if (s[i].alive) rc = tok_ids_push(out, s[i].id);
    if (h.v != local) kvm_free(h.v);
    return rc;
}

/* HF BPE (model.type "BPE") over one word: ignore_merges shortcut, characters to ids with byte fallback
 * or (fused) unk, then merges by rank. A character with neither is dropped, as tokenizers does. */
int tok_bpe_word(const kvm_tokenizer_t *t, const char *w, size_t len, tok_ids_t *out) {
    if (len == 0) return 0;
    if (t->ignore_merges) {
        int32_t id = tok_strmap_get(&t->vocab, w, len);
        if (id >= 0) return tok_ids_push(out, id);
    }
    sym_t local[32], *s = local; /* a char may become up to 4 byte symbols; short words need no allocation */
    if (len * 4 + 1 > sizeof local / sizeof local[0] && !(s = kvm_malloc((len * 4 + 1) * sizeof *s))) return KVM_ENOMEM;
    int n = 0;
    bool prev_unk = false;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        int cl = tok_utf8_next(w + i, len - i, &cp);
        int32_t id = tok_strmap_get(&t->vocab, w + i, (size_t)cl);
        if (id >= 0) {
            s[n++] = (sym_t){.id = id, .len = (uint32_t)cl, .start = (uint32_t)i};
            prev_unk = false;
        } else {
            bool all = t->byte_fallback;
            for (int k = 0; k < cl && all; k++) all = t->byte_ids[(unsigned char)w[i + k]] >= 0;
            if (all) {
                for (int k = 0; k < cl; k++)
                    s[n++] = (sym_t){.id = t->byte_ids[(unsigned char)w[i + k]], .len = 1, .start = (uint32_t)(i + k)};
                prev_unk = false;
            } else if (t->unk >= 0) {
                if (t->fuse_unk && prev_unk) {
                    s[n - 1].len += (uint32_t)cl;
                } else {
                    s[n++] = (sym_t){.id = t->unk, .len = (uint32_t)cl, .start = (uint32_t)i};
                }
                prev_unk = true;
            }
        }
        i += (size_t)cl;
    }
    for (int i = 0; i < n; i++) {
        s[i].prev = i - 1;
        s[i].next = i + 1 < n ? i + 1 : -1;
        s[i].alive = true;
    }
    int rc = merge_symbols(t, s, n, w, out);
    if (s != local) kvm_free(s);
    return rc;
}

/* ==== llama2.c tokenizer.bin ========================================================================= */

/* Reads the file named in the header (int32 max_token_length, then per token: f32 score, i32 len,
 * bytes). Every length and count is checked against the file size. */
kvm_tokenizer_t *kvm_tokenizer_load_bin(const char *path, int vocab_size) {
    if (!path) {
        kvm_seterr(KVM_EINVAL, "kvm_tokenizer_load_bin: path is NULL");
        return NULL;
    }
    if (vocab_size <= 3 || vocab_size > (1 << 24)) {
        kvm_seterr(KVM_EINVAL, "%s: vocab_size %d out of range (4..16777216)", path, vocab_size);
        return NULL;
    }
    kvm_errclear();
    char *data = NULL;
    size_t size = 0;
    int rc = kvm_read_file(path, &data, &size, 256u << 20);
    if (rc) {
        kvm_errctx(rc, "tokenizer");
        return NULL;
    }
    kvm_tokenizer_t *t = tok_alloc(TOK_LLAMA2C, vocab_size, path);
    if (!t) goto fail_nomsg;
    t->scores = kvm_calloc((size_t)vocab_size, sizeof *t->scores);
    if (!t->scores) goto fail_nomsg;
    size_t off = 4;
    if (size < 4) {
        kvm_seterr(KVM_EFORMAT, "%s: %zu bytes, too short for the max_token_length header", path, size);
        goto fail;
    }
    for (int i = 0; i < vocab_size; i++) {
        int32_t len;
        float score;
        if (off + 8 > size) {
            kvm_seterr(KVM_EFORMAT, "%s: truncated at token %d of %d (offset %zu of %zu bytes)", path, i, vocab_size,
                       off, size);
            goto fail;
        }
        memcpy(&score, data + off, 4);
        memcpy(&len, data + off + 4, 4);
        off += 8;
        if (len < 0 || (size_t)len > size - off) {
            kvm_seterr(KVM_EFORMAT, "%s: token %d: its length (int32 at byte %zu) is negative or runs past the end of "
                       "the file (%zu bytes)", path, i, off - 4, size);
            goto fail;
        }
        if (!isfinite(score)) {
            kvm_seterr(KVM_EFORMAT, "%s: token %d has a non-finite score", path, i);
            goto fail;
        }
        t->scores[i] = score;
        if (tok_set_piece(t, i, data + off, (size_t)len, false)) goto fail_nomsg;
        off += (size_t)len;
    }
    /* The map points at the pieces; the first id of a repeated piece wins (run.c's bsearch finds one). */
    for (int i = vocab_size - 1; i >= 0; i--)
        if (tok_strmap_put(&t->vocab, t->pieces[i], t->piece_len[i], i)) goto fail_nomsg;
    for (int b = 0; b < 256 && b + 3 < vocab_size; b++) t->byte_ids[b] = b + 3;
    t->bos = 1;
    t->eos = 2;
    t->adds_bos = true;
    t->special[0] = t->special[1] = t->special[2] = 1;
    kvm_free(data);
    return t;
fail_nomsg:
    if (kvm_errcode() == 0) kvm_seterr(KVM_ENOMEM, "%s: out of memory", path);
fail:
    kvm_free(data);
    kvm_tokenizer_free(t);
    return NULL;
}

/* run.c's encode: dummy-prefix " ", UTF-8 characters (at most 4 bytes, grouped by continuation bytes)
 * looked up whole or as byte tokens, then score-greedy merges of the whole text. */
static int llama2c_encode(const kvm_tokenizer_t *t, const char *text, size_t len, int flags, tok_ids_t *out) {
    int rc;
    if ((flags & KVM_TOK_ADD_BOS) && (rc = tok_ids_push(out, t->bos))) return rc;
    if (len == 0) return 0;
    kvm_sb_t word = {0};
    sym_t *s = kvm_malloc((len + 2) * sizeof *s);
    if (!s) return KVM_ENOMEM;
    int n = 0;
    int32_t sp = tok_strmap_get(&t->vocab, " ", 1);
    if (sp >= 0) {
        if ((rc = kvm_sb_append(&word, " ", 1))) goto done;
        s[n++] = (sym_t){.id = sp, .len = 1, .start = 0};
    }
    for (size_t i = 0; i < len;) {
        size_t cl = 1;
        while (i + cl < len && cl < 4 && ((unsigned char)text[i + cl] & 0xC0) == 0x80) cl++;
        int32_t id = tok_strmap_get(&t->vocab, text + i, cl);
        uint32_t at = (uint32_t)word.len;
        if ((rc = kvm_sb_append(&word, text + i, cl))) goto done;
        if (id >= 0) {
            s[n++] = (sym_t){.id = id, .len = (uint32_t)cl, .start = at};
        } else {
            for (size_t k = 0; k < cl; k++) {
                int32_t bid = t->byte_ids[(unsigned char)text[i + k]];
                if (bid < 0) bid = 0; /* tiny vocabularies without byte tokens: <unk> */
                s[n++] = (sym_t){.id = bid, .len = 1, .start = at + (uint32_t)k};
            }
        }
        i += cl;
    }
    for (int i = 0; i < n; i++) {
        s[i].prev = i - 1;
        s[i].next = i + 1 < n ? i + 1 : -1;
        s[i].alive = true;
    }
    rc = merge_symbols(t, s, n, word.s, out);
done:
    kvm_free(s);
    kvm_sb_free(&word);
    return rc;
}

int tok_parse_byte_piece(const char *p, size_t len) {
    if (len != 6 || memcmp(p, "<0x", 3) != 0 || p[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = p[i];
        int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* run.c's decode(prev, token): a leading space after BOS is dropped, "<0xNN>" becomes the raw byte. */
static int llama2c_piece(const kvm_tokenizer_t *t, int32_t prev, int32_t id, kvm_sb_t *out) {
    const char *p = t->pieces[id];
    size_t len = t->piece_len[id];
    if (prev == t->bos && len > 0 && p[0] == ' ') p++, len--;
    int b = tok_parse_byte_piece(p, len);
    if (b >= 0) {
        char c = (char)b;
        return kvm_sb_append(out, &c, 1);
    }
    return kvm_sb_append(out, p, len);
}

/* ==== public API ===================================================================================== */

static int check_ids(const kvm_tokenizer_t *t, const int32_t *ids, int n) {
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= t->vocab_size || !t->pieces[ids[i]])
            return kvm_seterr(KVM_ERANGE, "%s: token id %d (position %d) is not in the vocabulary (size %d)", t->path,
                              ids[i], i, t->vocab_size);
    return 0;
}

int kvm_tokenize(const kvm_tokenizer_t *t, const char *text, size_t len, int flags, int32_t **ids, int *n) {
    if (!t || (!text && len) || !ids || !n) return kvm_seterr(KVM_EINVAL, "kvm_tokenize: NULL argument");
    if (len > (size_t)1 << 30) return kvm_seterr(KVM_ERANGE, "kvm_tokenize: text of %zu bytes is too long", len);
    *ids = NULL;
    *n = 0;
    tok_ids_t out = {0};
    int rc = t->kind == TOK_LLAMA2C ? llama2c_encode(t, text ? text : "", len, flags, &out)
                                    : tok_hf_encode(t, text ? text : "", len, flags, &out);
    if (rc) {
        kvm_free(out.v);
        if (rc == KVM_ENOMEM && kvm_errcode() != KVM_ENOMEM) kvm_seterr(rc, "kvm_tokenize: out of memory");
        return rc;
    }
    if (!out.v && !(out.v = kvm_malloc(sizeof(int32_t)))) return KVM_ENOMEM; /* never hand back NULL */
    *ids = out.v;
    *n = out.n;
    return 0;
}

int kvm_detokenize(const kvm_tokenizer_t *t, const int32_t *ids, int n, bool skip_special, char **out, size_t *len) {
    if (!t || (!ids && n) || n < 0 || !out) return kvm_seterr(KVM_EINVAL, "kvm_detokenize: bad argument");
    *out = NULL;
    if (len) *len = 0;
    int rc = check_ids(t, ids, n);
    if (rc) return rc;
    kvm_sb_t b = {0};
    if ((rc = kvm_sb_append(&b, "", 0))) return rc;
    if (t->kind == TOK_LLAMA2C) {
        int32_t prev = -1;
        for (int i = 0; i < n && !rc; i++) {
            if (!(skip_special && t->special[ids[i]])) rc = llama2c_piece(t, prev, ids[i], &b);
            prev = ids[i];
        }
    } else {
        rc = tok_hf_decode(t, ids, n, skip_special, false, true, &b);
    }
    if (rc) {
        kvm_sb_free(&b);
        return rc;
    }
    *out = b.s;
    if (len) *len = b.len;
    return 0;
}

int kvm_token_bytes(const kvm_tokenizer_t *t, int32_t prev, int32_t id, char *buf, size_t cap) {
    if (!t || !buf || cap == 0) return kvm_seterr(KVM_EINVAL, "kvm_token_bytes: bad argument");
    int rc = check_ids(t, &id, 1);
    if (rc) return rc;
    kvm_sb_t b = {0};
    if (t->kind == TOK_LLAMA2C) {
        rc = llama2c_piece(t, prev, id, &b);
    } else {
        /* The decoder's start-of-text rules (Strip, Metaspace) apply to the first token of the text,
         * which is also the first one after a BOS that decoding would skip. */
        bool first = prev < 0 || (prev == t->bos && t->bos >= 0);
        rc = tok_hf_decode(t, &id, 1, false, true, first, &b);
    }
    if (rc) {
        kvm_sb_free(&b);
        return rc;
    }
    if (b.len >= cap) {
        size_t need = b.len;
        kvm_sb_free(&b);
        return kvm_seterr(KVM_ERANGE, "kvm_token_bytes: token %d needs %zu bytes, buffer holds %zu", id, need + 1, cap);
    }
    memcpy(buf, kvm_sb_str(&b), b.len);
    buf[b.len] = '\0';
    int n = (int)b.len;
    kvm_sb_free(&b);
    return n;
}

int kvm_tokenizer_vocab_size(const kvm_tokenizer_t *t) { return t ? t->vocab_size : 0; }

int32_t kvm_tokenizer_find(const kvm_tokenizer_t *t, const char *piece) {
    if (!t || !piece) return -1;
    size_t len = strlen(piece);
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].len == len && memcmp(t->added[i].content, piece, len) == 0) return t->added[i].id;
    return tok_strmap_get(&t->vocab, piece, len);
}

int32_t kvm_tokenizer_bos(const kvm_tokenizer_t *t) { return t ? t->bos : -1; }
int32_t kvm_tokenizer_eos(const kvm_tokenizer_t *t) { return t ? t->eos : -1; }
int32_t kvm_tokenizer_unk(const kvm_tokenizer_t *t) { return t && t->kind != TOK_LLAMA2C ? t->unk : -1; }
bool kvm_tokenizer_adds_bos(const kvm_tokenizer_t *t) { return t && t->adds_bos; }

bool kvm_tokenizer_is_special(const kvm_tokenizer_t *t, int32_t id) {
    return t && id >= 0 && id < t->vocab_size && t->special[id];
}

const char *kvm_tokenizer_kind(const kvm_tokenizer_t *t) {
    if (!t) return "none";
    switch (t->kind) {
    case TOK_LLAMA2C: return "llama2c";
    case TOK_BPE_BYTELEVEL: return "bpe-bytelevel";
    default: return "bpe-sentencepiece";
    }
}

const char *kvm_tokenizer_chat_template(const kvm_tokenizer_t *t) { return t && t->chat_template ? t->chat_template : ""; }

/* Decoding never lengthens a piece (ByteLevel, "▁" -> " ", "<0xNN>" -> byte, Strip), except a Replace
 * decoder whose content is longer than its pattern: scale by that ratio. */
int kvm_tokenizer_max_token_bytes(const kvm_tokenizer_t *t) {
    if (!t) return 0;
    size_t max_len = 1, grow = 1;
    bool bytelevel = false;
    for (int i = 0; i < t->n_dec; i++) bytelevel |= t->dec[i].type == TOK_DEC_BYTELEVEL;
    for (int i = 0; i < t->vocab_size; i++) {
        if (!t->pieces[i]) continue;
        size_t len = t->piece_len[i];
        if (bytelevel) { /* one byte per mapped character (a piece with unmapped ones is copied as is) */
            size_t chars = 0;
            bool all = true;
            for (size_t k = 0; k < len && all;) {
                uint32_t cp;
                int cl = tok_utf8_next(t->pieces[i] + k, len - k, &cp);
                all = tok_char_byte(cp) >= 0;
                k += (size_t)cl;
                chars++;
            }
            if (all) len = chars;
        }
        if (len > max_len) max_len = len;
    }
    for (int i = 0; i < t->n_dec; i++)
        if (t->dec[i].type == TOK_DEC_REPLACE) {
            size_t pl = strlen(t->dec[i].a), cl = strlen(t->dec[i].b);
            if (pl && (cl + pl - 1) / pl > grow) grow = (cl + pl - 1) / pl;
        }
    if (t->n_dec == 0 && grow < 2) grow = 2; /* joined by spaces: one more byte */
    return (int)(max_len * grow + 1);
}
