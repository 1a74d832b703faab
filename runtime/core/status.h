/* status.h - kvmesh status codes and the per-thread error message.
 *
 * Convention (ARCHITECTURE.md): a function that can fail returns int, 0 = ok, a negative KVM_E* code
 * otherwise, and leaves a human-readable message that kvm_errmsg() returns. Constructors return NULL and
 * set the message. Messages carry the detail a user needs (file, offset, tensor name, shapes, line). */
#ifndef KVM_STATUS_H
#define KVM_STATUS_H

#include <stdarg.h>

/* The status table (enum kvm_status), kvm_strerror, kvm_errname, kvm_errmsg, kvm_errcode and kvm_errclear are
 * public: include/kvmesh.h; kvm_seterr and kvm_errctx are in include/kvmesh_lab.h (lab code sets errors too).
 * What follows is for the library's own code. */
#include <kvmesh.h>
#include <kvmesh_lab.h>

/* kvm_seterr with a va_list. */
int kvm_vseterr(int code, const char *fmt, va_list ap);

/* Invariant check: aborts through the assert hook. Never used for bad input (validate it instead). */
typedef void (*kvm_assert_hook_t)(const char *file, int line, const char *expr);
void kvm_set_assert_hook(kvm_assert_hook_t hook);
void kvm_assert_fail(const char *file, int line, const char *expr) __attribute__((noreturn));
#define KVM_ASSERT(e) ((e) ? (void)0 : kvm_assert_fail(__FILE__, __LINE__, #e))

#endif
