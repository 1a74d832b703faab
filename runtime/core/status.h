/* status.h - kvmesh status codes and the per-thread error message.
 *
 * Convention (ARCHITECTURE.md): a function that can fail returns int, 0 = ok, a negative KVM_E* code
 * otherwise, and leaves a human-readable message that kvm_errmsg() returns. Constructors return NULL and
 * set the message. Messages carry the detail a user needs (file, offset, tensor name, shapes, line). */
#ifndef KVM_STATUS_H
#define KVM_STATUS_H

#include <stdarg.h>

/* X(name, value, short description) */
#define KVM_STATUS_TABLE(X)                                                   \
    X(KVM_OK, 0, "ok")                                                        \
    X(KVM_EINVAL, -22, "invalid argument")                                    \
    X(KVM_ENOMEM, -12, "out of memory or KV budget exhausted")                \
    X(KVM_ENOENT, -2, "not found")                                            \
    X(KVM_EIO, -5, "input/output error")                                      \
    X(KVM_EFORMAT, -1001, "malformed file")                                   \
    X(KVM_ESHAPE, -1002, "tensor shape mismatch")                             \
    X(KVM_EDTYPE, -1003, "unsupported data type")                             \
    X(KVM_EUNSUPPORTED, -1004, "unsupported feature")                         \
    X(KVM_ERANGE, -1005, "value out of range")                                \
    X(KVM_EPROTO, -1006, "protocol error")                                    \
    X(KVM_EVERSION, -1007, "unsupported protocol version")                    \
    X(KVM_ESTALE, -1008, "stale handle")                                      \
    X(KVM_EBUSY, -1009, "busy")                                               \
    X(KVM_ELUA_SYNTAX, -1010, "Lua syntax error")                             \
    X(KVM_ELUA_RUNTIME, -1011, "Lua runtime error")                           \
    X(KVM_ELUA_MEMORY, -1012, "Lua memory limit reached")                     \
    X(KVM_EBUDGET, -1013, "step, token or time budget exhausted")             \
    X(KVM_ECANCELED, -1014, "canceled")                                       \
    X(KVM_ETIMEDOUT, -1015, "timed out")                                      \
    X(KVM_ESLOWCLIENT, -1016, "client too slow")                              \
    X(KVM_EMODEL, -1017, "model mismatch")                                    \
    X(KVM_EFRAME, -1018, "position frame mismatch")                           \
    X(KVM_EDEVICE, -1019, "device (GPU) error")                               \
    X(KVM_EINTERNAL, -1099, "internal error")

enum kvm_status {
#define KVM_X_ENUM(name, val, desc) name = val,
    KVM_STATUS_TABLE(KVM_X_ENUM)
#undef KVM_X_ENUM
};

/* Name ("KVM_EINVAL") and description of a status code; never NULL. */
const char *kvm_strerror(int code);
const char *kvm_errname(int code);

/* Sets the calling thread's last error message (printf-style) and returns code, so that
 * `return kvm_seterr(KVM_EINVAL, "field '%s' ...", f);` reads well. */
int kvm_seterr(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int kvm_vseterr(int code, const char *fmt, va_list ap);
/* Prepends "context: " to the current message (for adding file names as errors travel up). */
int kvm_errctx(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The calling thread's last message ("" if none) and code. */
const char *kvm_errmsg(void);
int kvm_errcode(void);
void kvm_errclear(void);

/* Invariant check: aborts through the assert hook. Never used for bad input (validate it instead). */
typedef void (*kvm_assert_hook_t)(const char *file, int line, const char *expr);
void kvm_set_assert_hook(kvm_assert_hook_t hook);
void kvm_assert_fail(const char *file, int line, const char *expr) __attribute__((noreturn));
#define KVM_ASSERT(e) ((e) ? (void)0 : kvm_assert_fail(__FILE__, __LINE__, #e))

#endif
