/* status.c - status table and per-thread error messages. */
#include "status.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KVM_ERRMSG_MAX 1024

static _Thread_local char tl_msg[KVM_ERRMSG_MAX];
static _Thread_local int tl_code;
static kvm_assert_hook_t g_assert_hook;

const char *kvm_strerror(int code) {
    switch (code) {
#define KVM_X_DESC(name, val, desc) case val: return desc;
        KVM_STATUS_TABLE(KVM_X_DESC)
#undef KVM_X_DESC
    default: return "unknown error";
    }
}

const char *kvm_errname(int code) {
    switch (code) {
#define KVM_X_NAME(name, val, desc) case val: return #name;
        KVM_STATUS_TABLE(KVM_X_NAME)
#undef KVM_X_NAME
    default: return "KVM_EUNKNOWN";
    }
}

int kvm_vseterr(int code, const char *fmt, va_list ap) {
    tl_code = code;
    vsnprintf(tl_msg, sizeof tl_msg, fmt, ap);
    return code;
}

int kvm_seterr(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    kvm_vseterr(code, fmt, ap);
    va_end(ap);
    return code;
}

int kvm_errctx(int code, const char *fmt, ...) {
    char ctx[512], old[KVM_ERRMSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx, sizeof ctx, fmt, ap);
    va_end(ap);
    memcpy(old, tl_msg, sizeof old);
    const char *rest = old[0] ? old : kvm_strerror(code);
    size_t cl = strlen(ctx);
    memcpy(tl_msg, ctx, cl);
    tl_msg[cl] = ':';
    tl_msg[cl + 1] = ' ';
    size_t room = sizeof tl_msg - cl - 3;
    size_t rl = strlen(rest);
    if (rl > room) rl = room;
    memcpy(tl_msg + cl + 2, rest, rl);
    tl_msg[cl + 2 + rl] = 0;
    tl_code = code;
    return code;
}

const char *kvm_errmsg(void) { return tl_msg[0] ? tl_msg : kvm_strerror(tl_code); }
int kvm_errcode(void) { return tl_code; }
void kvm_errclear(void) { tl_msg[0] = 0; tl_code = 0; }

void kvm_set_assert_hook(kvm_assert_hook_t hook) { g_assert_hook = hook; }

void kvm_assert_fail(const char *file, int line, const char *expr) {
    if (g_assert_hook) g_assert_hook(file, line, expr);
    fprintf(stderr, "kvmesh: internal invariant failed at %s:%d: %s\n", file, line, expr);
    abort();
}
