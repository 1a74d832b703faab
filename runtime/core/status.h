/* status.h - kvmesh status codes and the per-thread error message.
 *
 * Convention (ARCHITECTURE.md): a function that can fail returns int, 0 = ok, a negative KVM_E* code
 * otherwise, and leaves a human-readable message that kvm_errmsg() returns. Constructors return NULL and
 * set the message. Messages carry the detail a user needs (file, offset, tensor name, shapes, line). */
#ifndef KVM_STATUS_H
#define KVM_STATUS_H

#include <stdarg.h>

/* The status table (enum kvm_status), kvm_strerror, kvm_errname, kvm_errmsg, kvm_errcode and kvm_errclear are
 * public: include/kvmesh.h. What follows is for the library's own code. */
#include <kvmesh.h>

/* Sets the calling thread's last error message (printf-style) and returns code, so that
 * `return kvm_seterr(KVM_EINVAL, "field '%s' ...", f);` reads well. */
int kvm_seterr(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int kvm_vseterr(int code, const char *fmt, va_list ap);
/* Prepends "context: " to the current message (for adding file names as errors travel up). */
int kvm_errctx(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Invariant check: aborts through the assert hook. Never used for bad input (validate it instead). */
typedef void (*kvm_assert_hook_t)(const char *file, int line, const char *expr);
void kvm_set_assert_hook(kvm_assert_hook_t hook);
void kvm_assert_fail(const char *file, int line, const char *expr) __attribute__((noreturn));
#define KVM_ASSERT(e) ((e) ? (void)0 : kvm_assert_fail(__FILE__, __LINE__, #e))

#endif
