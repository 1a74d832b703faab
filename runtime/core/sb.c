/* sb.c - the string builder (see sb.h for ownership and error behaviour). */
#include "sb.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "core.h"
#include "vec.h"

int kvm_sb_reserve(kvm_sb_t *b, size_t extra) {
    if (extra > SIZE_MAX - b->len - 1) return kvm_seterr(KVM_ENOMEM, "string of %zu + %zu bytes overflows", b->len, extra);
    return kvm_array_reserve(&b->s, &b->cap, b->len + extra + 1, 1, 64);
}

int kvm_sb_append(kvm_sb_t *b, const void *data, size_t n) {
    int rc = kvm_sb_reserve(b, n);
    if (rc) return rc;
    if (n) memcpy(b->s + b->len, data, n);
    b->len += n;
    b->s[b->len] = 0;
    return 0;
}

int kvm_sb_puts(kvm_sb_t *b, const char *str) { return kvm_sb_append(b, str, strlen(str)); }

int kvm_sb_putc(kvm_sb_t *b, char c) { return kvm_sb_append(b, &c, 1); }

int kvm_sb_vprintf(kvm_sb_t *b, const char *fmt, va_list ap) {
    va_list ap2;
    va_copy(ap2, ap);
    char small[256];
    int n = vsnprintf(small, sizeof small, fmt, ap2);
    va_end(ap2);
    if (n < 0) return kvm_seterr(KVM_EINVAL, "string builder: bad format '%s'", fmt);
    if ((size_t)n < sizeof small) return kvm_sb_append(b, small, (size_t)n);
    int rc = kvm_sb_reserve(b, (size_t)n);
    if (rc) return rc;
    vsnprintf(b->s + b->len, (size_t)n + 1, fmt, ap);
    b->len += (size_t)n;
    return 0;
}

int kvm_sb_printf(kvm_sb_t *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int rc = kvm_sb_vprintf(b, fmt, ap);
    va_end(ap);
    return rc;
}

const char *kvm_sb_str(const kvm_sb_t *b) { return b->s ? b->s : ""; }

void kvm_sb_truncate(kvm_sb_t *b, size_t n) {
    if (n >= b->len) return;
    b->len = n;
    b->s[n] = 0;
}

void kvm_sb_clear(kvm_sb_t *b) { kvm_sb_truncate(b, 0); }

void kvm_sb_free(kvm_sb_t *b) {
    kvm_free(b->s);
    *b = (kvm_sb_t)KVM_SB_INIT;
}

char *kvm_sb_take(kvm_sb_t *b, size_t *len) {
    if (!b->s) {
        if (kvm_sb_reserve(b, 0)) return NULL;
        b->s[0] = 0;
    }
    char *s = b->s;
    if (len) *len = b->len;
    *b = (kvm_sb_t)KVM_SB_INIT;
    return s;
}
