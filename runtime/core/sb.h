/* sb.h - a string builder: bytes appended to a growable, always NUL-terminated buffer (Redis's sds,
 * as a plain struct).
 *
 * Ownership: a kvm_sb_t owns `s` (counted memory from kvm_malloc). kvm_sb_free() releases it;
 * kvm_sb_take() hands it to the caller, who frees it with kvm_free(). The text may hold NUL bytes
 * (use len); s[len] is always 0 once anything was allocated, and kvm_sb_str() is never NULL.
 * Errors: an append that cannot grow returns KVM_ENOMEM (message set) and leaves the builder exactly
 * as it was (same text), still valid. Not thread-safe: one owner at a time.
 *
 *     kvm_sb_t b = KVM_SB_INIT;
 *     kvm_sb_puts(&b, "layer ");
 *     kvm_sb_printf(&b, "%d", 3);
 *     char *text = kvm_sb_take(&b);     // "layer 3", freed with kvm_free
 */
#ifndef KVM_SB_H
#define KVM_SB_H

#include <stdarg.h>
#include <stddef.h>

typedef struct kvm_sb {
    char *s;    /* [cap] bytes, s[len] == 0; NULL until the first append */
    size_t len; /* bytes of text, without the terminating NUL */
    size_t cap; /* bytes allocated, NUL included */
} kvm_sb_t;

#define KVM_SB_INIT {NULL, 0, 0}

/* Makes room for `extra` more bytes of text (and the NUL). 0 or KVM_ENOMEM. */
int kvm_sb_reserve(kvm_sb_t *b, size_t extra);
/* Appends n bytes (which may include NULs). 0 or KVM_ENOMEM. */
int kvm_sb_append(kvm_sb_t *b, const void *data, size_t n);
int kvm_sb_puts(kvm_sb_t *b, const char *str);
int kvm_sb_putc(kvm_sb_t *b, char c);
/* printf-style append. 0, KVM_ENOMEM, or KVM_EINVAL for a bad format. */
int kvm_sb_printf(kvm_sb_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int kvm_sb_vprintf(kvm_sb_t *b, const char *fmt, va_list ap);
/* The text so far ("" before the first append); valid until the next change of the builder. */
const char *kvm_sb_str(const kvm_sb_t *b);
/* Cuts the text to its first n bytes (n > len does nothing); memory kept. */
void kvm_sb_truncate(kvm_sb_t *b, size_t n);
/* Empties the text, memory kept. */
void kvm_sb_clear(kvm_sb_t *b);
/* Releases the memory; the builder is empty and reusable. */
void kvm_sb_free(kvm_sb_t *b);
/* Hands the NUL-terminated text to the caller (free with kvm_free) and stores its length in *len when
 * len is not NULL; the builder is left empty. Allocates "" when nothing was appended, so NULL means
 * KVM_ENOMEM (and then the builder is unchanged). */
char *kvm_sb_take(kvm_sb_t *b, size_t *len);

#endif
