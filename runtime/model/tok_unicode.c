/* tok_unicode.c - the little Unicode the tokenizers need: UTF-8 stepping, lossy repair, the
 * \p{L} / \p{N} / \s classes, and canonical normalization (NFC/NFD), all from generated tables
 * (scripts/fixtures/gen_tok_unicode.py). */
#include <string.h>

#include "../core/core.h"
#include "tok_internal.h"
#include "tok_unicode_norm.h"
#include "tok_unicode_tables.h"

int tok_utf8_lead_len(unsigned char b) {
    if (b < 0x80) return 1;
    if ((b & 0xE0) == 0xC0) return 2;
    if ((b & 0xF0) == 0xE0) return 3;
    if ((b & 0xF8) == 0xF0) return 4;
    return 1;
}

/* Strict decoding (no overlongs, no surrogates, <= U+10FFFF); anything else is one byte of U+FFFD. */
int tok_utf8_next(const char *s, size_t len, uint32_t *cp) {
    const unsigned char *u = (const unsigned char *)s;
    unsigned char b = u[0];
    if (b < 0x80) {
        *cp = b;
        return 1;
    }
    int n = tok_utf8_lead_len(b);
    if (n == 1 || (size_t)n > len) goto bad;
    uint32_t c = b & (0x7F >> n);
    for (int i = 1; i < n; i++) {
        if ((u[i] & 0xC0) != 0x80) goto bad;
        c = (c << 6) | (u[i] & 0x3F);
    }
    if ((n == 2 && c < 0x80) || (n == 3 && c < 0x800) || (n == 4 && (c < 0x10000 || c > 0x10FFFF)) ||
        (c >= 0xD800 && c <= 0xDFFF))
        goto bad;
    *cp = c;
    return n;
bad:
    *cp = 0xFFFD;
    return 1;
}

int tok_utf8_put(uint32_t cp, char out[4]) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Length of the longest prefix of s that could start a valid sequence (Rust's error_len rule: each
 * maximal such prefix of an invalid sequence becomes one U+FFFD). */
static size_t invalid_prefix_len(const unsigned char *u, size_t len) {
    unsigned char b = u[0];
    int n = tok_utf8_lead_len(b);
    if (n == 1 || b == 0xC0 || b == 0xC1 || b > 0xF4) return 1;
    size_t i = 1;
    for (; i < (size_t)n && i < len; i++) {
        unsigned char c = u[i];
        unsigned lo = 0x80, hi = 0xBF;
        if (i == 1) {
            if (b == 0xE0) lo = 0xA0;
            else if (b == 0xED) hi = 0x9F;
            else if (b == 0xF0) lo = 0x90;
            else if (b == 0xF4) hi = 0x8F;
        }
        if (c < lo || c > hi) break;
    }
    return i;
}

size_t tok_utf8_lossy(const char *s, size_t len, char *out) {
    size_t o = 0, i = 0;
    while (i < len) {
        uint32_t cp;
        int n = tok_utf8_next(s + i, len - i, &cp);
        if (cp == 0xFFFD && !(n == 3 && memcmp(s + i, "\xEF\xBF\xBD", 3) == 0)) {
            size_t k = invalid_prefix_len((const unsigned char *)s + i, len - i);
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i += k;
            continue;
        }
        memcpy(out + o, s + i, (size_t)n);
        o += (size_t)n;
        i += (size_t)n;
    }
    return o;
}

static bool in_ranges(const tok_range_t *r, size_t n, uint32_t cp) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < r[mid].lo) hi = mid;
        else if (cp > r[mid].hi) lo = mid + 1;
        else return true;
    }
    return false;
}

#define NRANGES(a) (sizeof(a) / sizeof((a)[0]))

bool tok_is_letter(uint32_t cp) {
    if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
    return in_ranges(tok_letter_ranges, NRANGES(tok_letter_ranges), cp);
}

bool tok_is_number(uint32_t cp) {
    if (cp < 0x80) return cp >= '0' && cp <= '9';
    return in_ranges(tok_number_ranges, NRANGES(tok_number_ranges), cp);
}

bool tok_is_space(uint32_t cp) {
    if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D);
    return in_ranges(tok_space_ranges, NRANGES(tok_space_ranges), cp);
}

/* ---- canonical normalization (NFC / NFD) -------------------------------------------------------- */

enum { HS_BASE = 0xAC00, HL_BASE = 0x1100, HV_BASE = 0x1161, HT_BASE = 0x11A7, HL_COUNT = 19, HV_COUNT = 21,
       HT_COUNT = 28, HN_COUNT = HV_COUNT * HT_COUNT, HS_COUNT = HL_COUNT * HN_COUNT };

static uint8_t ccc_of(uint32_t cp) {
    if (cp < 0x300) return 0;
    size_t lo = 0, hi = sizeof tok_ccc / sizeof tok_ccc[0];
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < tok_ccc[mid].lo) hi = mid;
        else if (cp > tok_ccc[mid].hi) lo = mid + 1;
        else return tok_ccc[mid].ccc;
    }
    return 0;
}

static const tok_decomp_t *decomp_of(uint32_t cp) {
    size_t lo = 0, hi = sizeof tok_decomp / sizeof tok_decomp[0];
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < tok_decomp[mid].cp) hi = mid;
        else if (cp > tok_decomp[mid].cp) lo = mid + 1;
        else return &tok_decomp[mid];
    }
    return NULL;
}

/* The primary composite of a + b, or 0. */
static uint32_t compose_pair(uint32_t a, uint32_t b) {
    if (a >= HL_BASE && a < HL_BASE + HL_COUNT && b >= HV_BASE && b < HV_BASE + HV_COUNT)
        return HS_BASE + ((a - HL_BASE) * HV_COUNT + (b - HV_BASE)) * HT_COUNT;
    if (a >= HS_BASE && a < HS_BASE + HS_COUNT && (a - HS_BASE) % HT_COUNT == 0 && b > HT_BASE && b < HT_BASE + HT_COUNT)
        return a + (b - HT_BASE);
    size_t lo = 0, hi = sizeof tok_comp / sizeof tok_comp[0];
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        const tok_comp_t *c = &tok_comp[mid];
        if (a < c->a || (a == c->a && b < c->b)) hi = mid;
        else if (a > c->a || b > c->b) lo = mid + 1;
        else return c->cp;
    }
    return 0;
}

/* Appends the full canonical decomposition of cp (Hangul by arithmetic; depth is bounded by the data). */
static size_t decompose_into(uint32_t cp, uint32_t *out) {
    if (cp >= HS_BASE && cp < HS_BASE + HS_COUNT) {
        uint32_t s = cp - HS_BASE, t = s % HT_COUNT;
        out[0] = HL_BASE + s / HN_COUNT;
        out[1] = HV_BASE + (s % HN_COUNT) / HT_COUNT;
        if (t) out[2] = HT_BASE + t;
        return t ? 3 : 2;
    }
    const tok_decomp_t *d = cp >= 0xC0 ? decomp_of(cp) : NULL;
    if (!d) {
        out[0] = cp;
        return 1;
    }
    size_t n = decompose_into(d->a, out);
    if (d->b) n += decompose_into(d->b, out + n);
    return n;
}

/* Is s plainly unchanged: every code point below U+0300 for NFC (nothing there composes with what
 * precedes it; lead bytes below 0xCC), below U+00C0 for NFD (the first decomposable; lead bytes below 0xC3)? */
static bool trivially_normal(const char *s, size_t len, bool compose) {
    unsigned char limit = compose ? 0xCC : 0xC3;
    for (size_t i = 0; i < len; i++) {
        unsigned char b = (unsigned char)s[i];
        if (b >= limit && (b & 0xC0) != 0x80) return false;
    }
    return true;
}

int tok_normalize_nf(const char *s, size_t len, bool compose, kvm_sb_t *out) {
    if (trivially_normal(s, len, compose)) return kvm_sb_append(out, s, len);
    /* invalid UTF-8 is passed through untouched (HF only ever sees valid text) */
    size_t n = 0;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        int cl = tok_utf8_next(s + i, len - i, &cp);
        if (cp == 0xFFFD && !(cl == 3 && memcmp(s + i, "\xEF\xBF\xBD", 3) == 0)) return kvm_sb_append(out, s, len);
        i += (size_t)cl;
        n++;
    }
    uint32_t *cps = kvm_malloc((n * 4 + 4) * sizeof *cps); /* a code point decomposes to at most 4 */
    if (!cps) return KVM_ENOMEM;
    size_t m = 0;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        i += (size_t)tok_utf8_next(s + i, len - i, &cp);
        m += decompose_into(cp, cps + m);
    }
    /* canonical ordering: stable sort of each run of non-starters by combining class */
    for (size_t i = 1; i < m; i++) {
        uint8_t c = ccc_of(cps[i]);
        if (!c) continue;
        for (size_t j = i; j > 0 && ccc_of(cps[j - 1]) > c; j--) {
            uint32_t tmp = cps[j];
            cps[j] = cps[j - 1];
            cps[j - 1] = tmp;
        }
    }
    if (compose && m > 0) {
        /* canonical composition: each character joins the last starter unless a character between them
         * is a starter or has a combining class >= its own */
        size_t w = 0, starter = (size_t)-1;
        int prev_ccc = -1; /* -1: nothing since the starter */
        for (size_t i = 0; i < m; i++) {
            uint32_t c = cps[i];
            int cc = ccc_of(c);
            if (starter != (size_t)-1 && (prev_ccc == -1 || (prev_ccc != 0 && prev_ccc < cc))) {
                uint32_t p = compose_pair(cps[starter], c);
                if (p) {
                    cps[starter] = p;
                    continue;
                }
            }
            if (cc == 0) {
                starter = w;
                prev_ccc = -1;
            } else {
                prev_ccc = cc;
            }
            cps[w++] = c;
        }
        m = w;
    }
    int rc = 0;
    char u[4];
    for (size_t i = 0; i < m && !rc; i++) rc = kvm_sb_append(out, u, (size_t)tok_utf8_put(cps[i], u));
    kvm_free(cps);
    return rc;
}
