/* tok_pipeline.c - the HF tokenizers encode and decode pipelines over a loaded tokenizer.json:
 *
 *   encode: added tokens split out of the raw text (longest match, lstrip/rstrip/single_word; special
 *           ones only with KVM_TOK_PARSE_SPECIAL) -> per remaining segment: normalizers -> pre-tokenizers
 *           (regex Split, ByteLevel, Digits, Metaspace, WhitespaceSplit) -> BPE per piece
 *           -> post-processor ids (KVM_TOK_ADD_BOS).
 *   decode: ids -> token strings (added tokens as their content) -> decoder steps, as tokenizers'
 *           decode_chain does (ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace).
 *
 * The pre-tokenizer regexes are hand-written matchers with the semantics of Oniguruma's leftmost,
 * first-alternative-wins backtracking search (the engine tokenizers uses), over the Unicode classes of
 * tok_unicode.c. */
#include <string.h>

#include "../core/core.h"
#include "../core/vec.h"
#include "tok_internal.h"

/* ---- pieces: a list of byte strings in one buffer -------------------------------------------------- */

typedef struct {
    kvm_sb_t buf;
    size_t *off, *len; /* [cap] each */
    int n;
    size_t cap;
    bool keep_empty; /* decoding keeps empty tokens (their positions matter to Metaspace/Strip) */
} pieces_t;

static void pieces_free(pieces_t *p) {
    kvm_sb_free(&p->buf);
    kvm_free(p->off);
    kvm_free(p->len);
    memset(p, 0, sizeof *p);
}

/* Appends a piece made of up to two parts (a, then b); empty pieces are dropped. */
static int pieces_add2(pieces_t *p, const char *a, size_t na, const char *b, size_t nb) {
    if (na + nb == 0 && !p->keep_empty) return 0;
    size_t need = (size_t)p->n + 1, cap_off = p->cap, cap_len = p->cap;
    if (kvm_array_reserve(&p->off, &cap_off, need, sizeof *p->off, 16) ||
        kvm_array_reserve(&p->len, &cap_len, need, sizeof *p->len, 16))
        return KVM_ENOMEM; /* a grown off[] alone is harmless: cap still says what both hold */
    p->cap = cap_len;
    p->off[p->n] = p->buf.len;
    if (kvm_sb_append(&p->buf, a, na) || kvm_sb_append(&p->buf, b, nb)) return KVM_ENOMEM;
    p->len[p->n++] = na + nb;
    return 0;
}

static int pieces_add(pieces_t *p, const char *s, size_t n) { return pieces_add2(p, s, n, NULL, 0); }

/* ---- character classes at a byte position --------------------------------------------------------- */

static inline uint32_t cp_at(const char *s, size_t n, size_t i, int *cl) {
    uint32_t cp;
    *cl = tok_utf8_next(s + i, n - i, &cp);
    return cp;
}

static inline bool is_other(uint32_t cp) { return !tok_is_space(cp) && !tok_is_letter(cp) && !tok_is_number(cp); }

typedef bool (*cls_fn)(uint32_t);

/* End of the run of class-f characters starting at i (i if none). */
static size_t run_of(const char *s, size_t n, size_t i, cls_fn f) {
    while (i < n) {
        int cl;
        if (!f(cp_at(s, n, i, &cl))) break;
        i += (size_t)cl;
    }
    return i;
}

/* At most max characters of class f from i. */
static size_t run_of_max(const char *s, size_t n, size_t i, cls_fn f, int max) {
    for (int k = 0; k < max && i < n; k++) {
        int cl;
        if (!f(cp_at(s, n, i, &cl))) break;
        i += (size_t)cl;
    }
    return i;
}

/* 's|'t|'re|'ve|'m|'ll|'d, optionally ASCII-case-insensitive. Returns the end or 0. */
static size_t match_contraction(const char *s, size_t n, size_t i, bool ci) {
    static const char *suf[] = {"s", "t", "re", "ve", "m", "ll", "d"};
    if (s[i] != '\'') return 0;
    for (int k = 0; k < 7; k++) {
        size_t l = strlen(suf[k]);
        if (i + 1 + l > n) continue;
        bool ok = true;
        for (size_t j = 0; j < l && ok; j++) {
            char c = s[i + 1 + j];
            if (ci && c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
            ok = c == suf[k][j];
        }
        if (ok) return i + 1 + l;
    }
    return 0;
}

/* ` ?X+`: an optional ASCII space, then one or more X. */
static size_t match_opt_space_run(const char *s, size_t n, size_t i, cls_fn f) {
    int cl;
    size_t j = i;
    if (s[j] == ' ' && j + 1 < n && f(cp_at(s, n, j + 1, &cl))) j++;
    size_t e = run_of(s, n, j, f);
    return e > j ? e : 0;
}

/* `\s+(?!\S)` then `\s+`: a whitespace run, leaving its last character to the next piece when a
 * non-space follows and the run has more than one character. */
static size_t match_space_tail(const char *s, size_t n, size_t i) {
    size_t j = i, last = i;
    int cl;
    while (j < n && tok_is_space(cp_at(s, n, j, &cl))) {
        last = j;
        j += (size_t)cl;
    }
    if (j == i) return 0;
    if (j == n) return j;
    if (last > i) return last; /* \s+(?!\S) */
    return j;                  /* \s+ */
}

static bool is_crlf(uint32_t cp) { return cp == '\r' || cp == '\n'; }

/* One regex match starting exactly at i, or 0 (no match starts here). */
static size_t regex_match_at(int re, const char *s, size_t n, size_t i) {
    int cl;
    uint32_t c0 = cp_at(s, n, i, &cl);
    size_t e;
    if (re == TOK_RE_GPT2) {
        if ((e = match_contraction(s, n, i, false))) return e;
        if ((e = match_opt_space_run(s, n, i, tok_is_letter))) return e;
        if ((e = match_opt_space_run(s, n, i, tok_is_number))) return e;
        if ((e = match_opt_space_run(s, n, i, is_other))) return e;
        return match_space_tail(s, n, i);
    }
    /* Llama-3 / Qwen2 */
    if ((e = match_contraction(s, n, i, true))) return e;
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (!is_crlf(c0) && !tok_is_letter(c0) && !tok_is_number(c0) && i + (size_t)cl < n) {
        size_t r = run_of(s, n, i + (size_t)cl, tok_is_letter);
        if (r > i + (size_t)cl) return r;
    }
    if (tok_is_letter(c0)) return run_of(s, n, i, tok_is_letter);
    /* \p{N}{1,3} | \p{N} */
    if (tok_is_number(c0)) return run_of_max(s, n, i, tok_is_number, re == TOK_RE_LLAMA3 ? 3 : 1);
    /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
    if ((e = match_opt_space_run(s, n, i, is_other))) return run_of(s, n, e, is_crlf);
    /* \s*[\r\n]+ : up to the last CR/LF of the whitespace run */
    if (tok_is_space(c0)) {
        size_t j = i, last_nl = 0;
        bool have = false;
        while (j < n) {
            uint32_t c = cp_at(s, n, j, &cl);
            if (!tok_is_space(c)) break;
            if (is_crlf(c)) last_nl = j, have = true;
            j += (size_t)cl;
        }
        if (have) return last_nl + 1;
    }
    return match_space_tail(s, n, i);
}

/* ---- splitting with HF's SplitDelimiterBehavior ------------------------------------------------------- */

typedef struct {
    size_t s, e;
    bool match;
} seg_t;

typedef struct {
    seg_t *v;
    int n;
    size_t cap;
} segs_t;

static int segs_push(segs_t *l, size_t s, size_t e, bool match) {
    if (e <= s) return 0;
    int rc = kvm_array_reserve(&l->v, &l->cap, (size_t)l->n + 1, sizeof *l->v, 32);
    if (rc) return rc;
    l->v[l->n++] = (seg_t){s, e, match};
    return 0;
}

/* Applies the behaviour to the alternating (gap, match) segments of piece s and appends the results. */
static int emit_split(pieces_t *out, const char *s, segs_t *g, int behavior, bool invert) {
    if (invert)
        for (int i = 0; i < g->n; i++) g->v[i].match = !g->v[i].match;
    /* build merged [start, end) ranges in place, as tokenizers' fold does */
    int m = 0;
    bool prev_match = false;
    switch (behavior) {
    case TOK_SPLIT_REMOVED:
        for (int i = 0; i < g->n; i++)
            if (!g->v[i].match) g->v[m++] = g->v[i];
        break;
    case TOK_SPLIT_ISOLATED:
        m = g->n;
        break;
    case TOK_SPLIT_MERGED_PREV:
        for (int i = 0; i < g->n; i++) {
            if (g->v[i].match && !prev_match && m > 0) g->v[m - 1].e = g->v[i].e;
            else g->v[m++] = g->v[i];
            prev_match = g->v[i].match;
        }
        break;
    case TOK_SPLIT_MERGED_NEXT: {
        /* right to left: a match joins the piece on its right unless that one was a match */
        int w = g->n;
        for (int i = g->n - 1; i >= 0; i--) {
            seg_t cur = g->v[i];
            if (cur.match && !prev_match && w < g->n) g->v[w].s = cur.s;
            else g->v[--w] = cur;
            prev_match = cur.match;
        }
        for (int i = w; i < g->n; i++) g->v[m++] = g->v[i];
        break;
    }
    case TOK_SPLIT_CONTIGUOUS:
        for (int i = 0; i < g->n; i++) {
            if (m > 0 && g->v[i].match == prev_match) g->v[m - 1].e = g->v[i].e;
            else g->v[m++] = g->v[i];
            prev_match = g->v[i].match;
        }
        break;
    }
    for (int i = 0; i < m; i++) {
        int rc = pieces_add(out, s + g->v[i].s, g->v[i].e - g->v[i].s);
        if (rc) return rc;
    }
    return 0;
}

/* Cuts piece s[0..n) into gap/match segments for one pre-tokenizer step. */
static int find_matches(const tok_pre_t *p, const char *s, size_t n, segs_t *g) {
    g->n = 0;
    size_t gap = 0, i = 0;
    int rc = 0;
    while (i < n && !rc) {
        size_t e = 0;
        int cl;
        uint32_t cp = cp_at(s, n, i, &cl);
        switch (p->type) {
        case TOK_PRE_SPLIT_REGEX: e = regex_match_at(p->regex, s, n, i); break;
        case TOK_PRE_SPLIT_STRING: {
            size_t pl = strlen(p->pattern);
            if (i + pl <= n && memcmp(s + i, p->pattern, pl) == 0) e = i + pl;
            break;
        }
        case TOK_PRE_BYTELEVEL: e = regex_match_at(TOK_RE_GPT2, s, n, i); break;
        case TOK_PRE_DIGITS: e = (cp >= '0' && cp <= '9') ? i + 1 : 0; break;
        case TOK_PRE_METASPACE: {
            size_t pl = strlen(p->pattern);
            if (i + pl <= n && memcmp(s + i, p->pattern, pl) == 0) e = i + pl;
            break;
        }
        case TOK_PRE_WSPLIT: e = tok_is_space(cp) ? i + (size_t)cl : 0; break;
        }
        if (e > i) {
            if ((rc = segs_push(g, gap, i, false)) || (rc = segs_push(g, i, e, true))) break;
            i = gap = e;
        } else {
            i += (size_t)cl;
        }
    }
    if (!rc) rc = segs_push(g, gap, n, false);
    return rc;
}

/* Replaces every occurrence of pat in s[0..n) by rep, appending to out. */
static int replace_all(kvm_sb_t *out, const char *s, size_t n, const char *pat, const char *rep) {
    size_t pl = strlen(pat), rl = strlen(rep), i = 0, from = 0;
    int rc = 0;
    while (i + pl <= n && !rc) {
        if (memcmp(s + i, pat, pl) == 0) {
            if (!(rc = kvm_sb_append(out, s + from, i - from))) rc = kvm_sb_append(out, rep, rl);
            i += pl;
            from = i;
        } else {
            i++;
        }
    }
    if (!rc) rc = kvm_sb_append(out, s + from, n - from);
    return rc;
}

/* One pre-tokenizer step over every piece of in, into out. at_start: the segment begins the text
 * (Metaspace prepend_scheme "first"). */
static int pretok_step(const tok_pre_t *p, const pieces_t *in, pieces_t *out, bool at_start) {
    segs_t g = {0};
    kvm_sb_t tmp = {0}, mapped = {0};
    int rc = 0;
    for (int k = 0; k < in->n && !rc; k++) {
        const char *s = in->buf.s + in->off[k];
        size_t n = in->len[k];
        switch (p->type) {
        case TOK_PRE_SPLIT_REGEX:
        case TOK_PRE_SPLIT_STRING:
            if (!(rc = find_matches(p, s, n, &g))) rc = emit_split(out, s, &g, p->behavior, p->invert);
            break;
        case TOK_PRE_DIGITS:
            if (!(rc = find_matches(p, s, n, &g)))
                rc = emit_split(out, s, &g, p->flag ? TOK_SPLIT_ISOLATED : TOK_SPLIT_CONTIGUOUS, false);
            break;
        case TOK_PRE_WSPLIT:
            if (!(rc = find_matches(p, s, n, &g))) rc = emit_split(out, s, &g, TOK_SPLIT_REMOVED, false);
            break;
        case TOK_PRE_BYTELEVEL: {
            tmp.len = 0;
            if (p->flag && (n == 0 || s[0] != ' ') && (rc = kvm_sb_append(&tmp, " ", 1))) break;
            if ((rc = kvm_sb_append(&tmp, s, n))) break;
            pieces_t parts = {0};
            if (p->use_regex) {
                if (!(rc = find_matches(p, tmp.s, tmp.len, &g))) rc = emit_split(&parts, tmp.s, &g, TOK_SPLIT_ISOLATED, false);
            } else {
                rc = pieces_add(&parts, tmp.s, tmp.len);
            }
            for (int j = 0; j < parts.n && !rc; j++) {
                mapped.len = 0;
                for (size_t b = 0; b < parts.len[j] && !rc; b++) {
                    int cl;
                    const char *ch = tok_byte_char((unsigned char)parts.buf.s[parts.off[j] + b], &cl);
                    rc = kvm_sb_append(&mapped, ch, (size_t)cl);
                }
                if (!rc) rc = pieces_add(out, mapped.s, mapped.len);
            }
            pieces_free(&parts);
            break;
        }
        case TOK_PRE_METASPACE: {
            tmp.len = 0;
            if ((rc = kvm_sb_append(&tmp, "", 0)) || (rc = replace_all(&tmp, s, n, " ", p->pattern))) break;
            size_t rl = strlen(p->pattern);
            bool starts = tmp.len >= rl && memcmp(tmp.s, p->pattern, rl) == 0;
            bool prepend = !starts && (p->prepend == TOK_PREPEND_ALWAYS || (p->prepend == TOK_PREPEND_FIRST && at_start && k == 0));
            mapped.len = 0;
            if ((rc = kvm_sb_append(&mapped, prepend ? p->pattern : "", prepend ? rl : 0)) || (rc = kvm_sb_append(&mapped, tmp.s, tmp.len))) break;
            if (p->flag) {
                if (!(rc = find_matches(p, mapped.s, mapped.len, &g))) rc = emit_split(out, mapped.s, &g, TOK_SPLIT_MERGED_NEXT, false);
            } else {
                rc = pieces_add(out, mapped.s, mapped.len);
            }
            break;
        }
        }
    }
    kvm_free(g.v);
    kvm_sb_free(&tmp);
    kvm_sb_free(&mapped);
    return rc;
}

/* Normalizers, pre-tokenizers and the model over one text segment between added tokens. */
static int encode_segment(const kvm_tokenizer_t *t, const char *s, size_t n, bool at_start, tok_ids_t *out) {
    if (n == 0) return 0;
    kvm_sb_t norm = {0}, tmp = {0};
    pieces_t a = {0}, b = {0};
    int rc = kvm_sb_append(&norm, s, n);
    for (int i = 0; i < t->n_norm && !rc; i++) {
        const tok_norm_t *nm = &t->norm[i];
        if (nm->type == TOK_NORM_PREPEND) {
            if (norm.len == 0) continue;
            tmp.len = 0;
            if (!(rc = kvm_sb_append(&tmp, nm->a, strlen(nm->a)))) rc = kvm_sb_append(&tmp, norm.s, norm.len);
        } else if (nm->type == TOK_NORM_REPLACE) {
            tmp.len = 0;
            if (!(rc = kvm_sb_append(&tmp, "", 0))) rc = replace_all(&tmp, norm.s, norm.len, nm->a, nm->b);
        } else if (nm->type == TOK_NORM_NFC || nm->type == TOK_NORM_NFD) {
            tmp.len = 0;
            if (!(rc = kvm_sb_append(&tmp, "", 0))) rc = tok_normalize_nf(norm.s, norm.len, nm->type == TOK_NORM_NFC, &tmp);
        } else {
            continue;
        }
        kvm_sb_t sw = norm;
        norm = tmp;
        tmp = sw;
    }
    if (!rc) rc = pieces_add(&a, norm.s, norm.len);
    for (int i = 0; i < t->n_pre && !rc; i++) {
        b.n = 0;
        b.buf.len = 0;
        rc = pretok_step(&t->pre[i], &a, &b, at_start);
        pieces_t sw = a;
        a = b;
        b = sw;
    }
    for (int k = 0; k < a.n && !rc; k++) rc = tok_bpe_word(t, a.buf.s + a.off[k], a.len[k], out);
    kvm_sb_free(&norm);
    kvm_sb_free(&tmp);
    pieces_free(&a);
    pieces_free(&b);
    return rc;
}

static bool is_word_char(uint32_t cp) { return cp == '_' || tok_is_letter(cp) || tok_is_number(cp); }

/* Code point ending just before byte i (i > 0). */
static uint32_t cp_before(const char *s, size_t i) {
    size_t j = i - 1;
    while (j > 0 && ((unsigned char)s[j] & 0xC0) == 0x80 && i - j < 4) j--;
    uint32_t cp;
    tok_utf8_next(s + j, i - j, &cp);
    return cp;
}

/* The added token matching at text[i..], longest first, honouring special/single_word; -1 if none. */
static int added_at(const kvm_tokenizer_t *t, const char *text, size_t len, size_t i, int flags) {
    int k = t->added_by_byte[(unsigned char)text[i]];
    if (k < 0) return -1;
    for (; k < t->n_added && t->added[k].content[0] == text[i]; k++) {
        const tok_added_t *a = &t->added[k];
        if (a->special && !(flags & KVM_TOK_PARSE_SPECIAL)) continue;
        if (i + a->len > len || memcmp(text + i, a->content, a->len) != 0) continue;
        if (a->single_word) {
            int cl;
            if (i > 0 && is_word_char(cp_before(text, i))) continue;
            if (i + a->len < len && is_word_char(cp_at(text, len, i + a->len, &cl))) continue;
        }
        return k;
    }
    return -1;
}

int tok_hf_encode(const kvm_tokenizer_t *t, const char *text, size_t len, int flags, tok_ids_t *out) {
    int rc = 0;
    if (flags & KVM_TOK_ADD_BOS)
        for (int i = 0; i < t->n_post_prefix && !rc; i++) rc = tok_ids_push(out, t->post_prefix[i]);
    size_t seg = 0, i = 0;
    while (i < len && !rc) {
        int k = added_at(t, text, len, i, flags);
        if (k < 0) {
            i++;
            continue;
        }
        const tok_added_t *a = &t->added[k];
        size_t ms = i, me = i + a->len;
        int cl;
        if (a->lstrip)
            while (ms > seg && tok_is_space(cp_before(text, ms))) {
                uint32_t cp = cp_before(text, ms);
                char tmp[4];
                ms -= (size_t)tok_utf8_put(cp, tmp);
            }
        if (a->rstrip)
            while (me < len && tok_is_space(cp_at(text, len, me, &cl))) me += (size_t)cl;
        if (!(rc = encode_segment(t, text + seg, ms - seg, seg == 0, out))) rc = tok_ids_push(out, a->id);
        seg = i = me;
    }
    if (!rc) rc = encode_segment(t, text + seg, len - seg, seg == 0, out);
    if (flags & KVM_TOK_ADD_BOS)
        for (int i2 = 0; i2 < t->n_post_suffix && !rc; i2++) rc = tok_ids_push(out, t->post_suffix[i2]);
    return rc;
}

/* ---- decoding ------------------------------------------------------------------------------------- */

static bool valid_utf8(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int cl = tok_utf8_next(s + i, n - i, &cp);
        if (cp == 0xFFFD && !(cl == 3 && memcmp(s + i, "\xEF\xBF\xBD", 3) == 0)) return false;
        i += (size_t)cl;
    }
    return true;
}

/* One decoder step: in -> out (token lists). fused: an earlier Fuse made the list the whole text. */
static int decode_step(const tok_dec_t *d, const pieces_t *in, pieces_t *out, bool raw, bool first, bool *fused) {
    kvm_sb_t tmp = {0};
    int rc = 0;
    switch (d->type) {
    case TOK_DEC_BYTELEVEL: {
        for (int k = 0; k < in->n && !rc; k++) {
            const char *s = in->buf.s + in->off[k];
            size_t n = in->len[k], mark = tmp.len;
            bool all = true;
            for (size_t i = 0; i < n && !rc;) {
                int cl, b = tok_char_byte(cp_at(s, n, i, &cl));
                if (b < 0) {
                    all = false;
                    break;
                }
                char c = (char)b;
                rc = kvm_sb_append(&tmp, &c, 1);
                i += (size_t)cl;
            }
            if (!all) {
                tmp.len = mark;
                rc = kvm_sb_append(&tmp, s, n);
            }
        }
        if (rc) break;
        if (raw) {
            rc = pieces_add(out, tmp.s, tmp.len);
        } else {
            char *fixed = kvm_malloc(tmp.len * 3 + 1);
            if (!fixed) {
                rc = KVM_ENOMEM;
                break;
            }
            size_t fl = tok_utf8_lossy(tmp.s, tmp.len, fixed);
            rc = pieces_add(out, fixed, fl);
            kvm_free(fixed);
        }
        *fused = true;
        break;
    }
    case TOK_DEC_REPLACE:
    case TOK_DEC_METASPACE:
        for (int k = 0; k < in->n && !rc; k++) {
            const char *s = in->buf.s + in->off[k];
            size_t n = in->len[k];
            tmp.len = 0;
            if ((rc = kvm_sb_append(&tmp, "", 0))) break;
            if (d->type == TOK_DEC_REPLACE) rc = replace_all(&tmp, s, n, d->a, d->b);
            else rc = replace_all(&tmp, s, n, d->a, (k == 0 && first && d->prepend) ? "" : " ");
            if (!rc) rc = pieces_add(out, tmp.s, tmp.len);
        }
        break;
    case TOK_DEC_BYTEFALLBACK: {
        int run = 0;
        for (int k = 0; k <= in->n && !rc; k++) {
            const char *s = k < in->n ? in->buf.s + in->off[k] : "";
            size_t n = k < in->n ? in->len[k] : 0;
            int b = k < in->n ? tok_parse_byte_piece(s, n) : -1;
            if (b >= 0) {
                char c = (char)b;
                rc = kvm_sb_append(&tmp, &c, 1);
                run++;
                continue;
            }
            if (run) {
                if (raw || valid_utf8(tmp.s, tmp.len)) rc = pieces_add(out, tmp.s, tmp.len);
                else
                    for (int r = 0; r < run && !rc; r++) rc = pieces_add(out, "\xEF\xBF\xBD", 3);
                tmp.len = 0;
                run = 0;
            }
            if (k < in->n && !rc) rc = pieces_add(out, s, n);
        }
        break;
    }
    case TOK_DEC_FUSE:
        for (int k = 0; k < in->n && !rc; k++) rc = kvm_sb_append(&tmp, in->buf.s + in->off[k], in->len[k]);
        if (!rc) rc = pieces_add(out, kvm_sb_str(&tmp), tmp.len);
        *fused = true;
        break;
    case TOK_DEC_STRIP: {
        size_t cl = strlen(d->a);
        for (int k = 0; k < in->n && !rc; k++) {
            const char *s = in->buf.s + in->off[k];
            size_t n = in->len[k];
            /* after a Fuse the one token is the whole text: its start is only ours when first */
            bool do_start = !*fused || (first && k == 0);
            bool do_stop = !*fused || !raw;
            for (int r = 0; do_start && r < d->start && n >= cl && memcmp(s, d->a, cl) == 0; r++) s += cl, n -= cl;
            for (int r = 0; do_stop && r < d->stop && n >= cl && memcmp(s + n - cl, d->a, cl) == 0; r++) n -= cl;
            rc = pieces_add(out, s, n);
        }
        break;
    }
    }
    kvm_sb_free(&tmp);
    return rc;
}

int tok_hf_decode(const kvm_tokenizer_t *t, const int32_t *ids, int n, bool skip_special, bool raw, bool first,
                  kvm_sb_t *out) {
    pieces_t a = {.keep_empty = true}, b = {.keep_empty = true};
    int rc = 0;
    for (int i = 0; i < n && !rc; i++) {
        if (skip_special && t->special[ids[i]]) continue;
        rc = pieces_add(&a, t->pieces[ids[i]], t->piece_len[ids[i]]);
    }
    bool fused = false;
    for (int s = 0; s < t->n_dec && !rc; s++) {
        b.n = 0;
        b.buf.len = 0;
        rc = decode_step(&t->dec[s], &a, &b, raw, first, &fused);
        pieces_t sw = a;
        a = b;
        b = sw;
    }
    for (int k = 0; k < a.n && !rc; k++) {
        if (t->n_dec == 0 && (k > 0 || !first) && (rc = kvm_sb_append(out, " ", 1))) break; /* no decoder: joined by spaces */
        rc = kvm_sb_append(out, a.buf.s + a.off[k], a.len[k]);
    }
    pieces_free(&a);
    pieces_free(&b);
    return rc;
}
