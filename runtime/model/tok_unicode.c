/* tok_unicode.c - the little Unicode the tokenizers need: UTF-8 stepping, lossy repair, and the
 * \p{L} / \p{N} / \s classes from generated range tables (scripts/fixtures/gen_tok_unicode.py). */
#include <string.h>

#include "tok_internal.h"
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
