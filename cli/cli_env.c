/* cli_env.c - environment variables -> library parameters (cli_env.h). */
#include "cli_env.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <kvmesh.h>
#include <kvmesh_lab.h> /* kvm_cuda_opts_t (the CUDA backend's research switches), kvm_seterr, kvm_errctx */


/* The value of a variable, or NULL when unset or empty. */
static const char *env(const char *name) {
    const char *v = getenv(name);
    return v && *v ? v : NULL;
}

static int bad(const char *var, const char *value, const char *values) {
    return kvm_seterr(KVM_EINVAL, "%s: '%s' is not one of %s", var, value, values);
}

/* A whole decimal number in [lo, hi] into *out. */
static int parse_u64(const char *var, const char *v, uint64_t lo, uint64_t hi, const char *values, uint64_t *out) {
    char *end = NULL;
    errno = 0;
    unsigned long long x = *v >= '0' && *v <= '9' ? strtoull(v, &end, 10) : 0;
    if (!end || *end || errno || x < lo || x > hi) return bad(var, v, values);
    *out = x;
    return 0;
}

bool cli_env_log_given(void) { return env("KVM_LOG") != NULL; }

static int apply_log(void) {
    static const struct {
        const char *name;
        int level;
    } levels[] = {{"debug", KVM_LOG_DEBUG}, {"info", KVM_LOG_INFO}, {"warn", KVM_LOG_WARN}, {"error", KVM_LOG_ERROR}};
    const char *v = env("KVM_LOG");
    if (!v) return 0;
    for (size_t i = 0; i < sizeof levels / sizeof levels[0]; i++)
        if (!strcmp(v, levels[i].name)) {
            kvm_log_set_level(levels[i].level);
            return 0;
        }
    return bad("KVM_LOG", v, "debug, info, warn, error");
}

/* KVM_CUDA_<KEY> (and KVM_KVCOMM_DIST) -> the field <key> of kvm_cuda_opts_t (ops.h documents each). */
static const struct {
    const char *var, *key;
} cuda_vars[] = {
    {"KVM_CUDA_DEVICE", "device"},
    {"KVM_CUDA_PROFILE", "profile"},
    {"KVM_CUDA_PDL", "pdl"},
    {"KVM_CUDA_PREFETCH", "prefetch"},
    {"KVM_CUDA_SKINNY", "skinny"},
    {"KVM_CUDA_SKINNY_ROWS", "skinny_rows"},
    {"KVM_CUDA_ATTN_DEC_MMA", "attn_dec_mma"},
    {"KVM_CUDA_NO_MMA_ATTN", "no_mma_attn"},
    {"KVM_CUDA_MMA_OCC", "mma_occ"},
    {"KVM_CUDA_ATTN_WG", "attn_wg"},
    {"KVM_CUDA_MMA_LOAD", "mma_load"},
    {"KVM_CUDA_FFN", "ffn"},
    {"KVM_CUDA_FFN_GEMV", "ffn_gemv"},
    {"KVM_CUDA_QKV_FUSE", "qkv_fuse"},
    {"KVM_CUDA_QKV16", "qkv16"},
    {"KVM_CUDA_NORM16", "norm16"},
    {"KVM_CUDA_Y16", "y16"},
    {"KVM_CUDA_NORM_V", "norm_v"},
    {"KVM_KVCOMM_DIST", "kvcomm_dist"},
};

extern char **environ;

/* A KVM_CUDA_* variable that is no setting (a misspelt switch would otherwise be ignored silently). */
static int check_cuda_names(void) {
    for (char **e = environ; e && *e; e++) {
        if (strncmp(*e, "KVM_CUDA_", 9)) continue;
        size_t n = strcspn(*e, "=");
        bool known = n == strlen("KVM_CUDA_GRAPHS") && !strncmp(*e, "KVM_CUDA_GRAPHS", n);
        for (size_t i = 0; !known && i < sizeof cuda_vars / sizeof cuda_vars[0]; i++)
            known = strlen(cuda_vars[i].var) == n && !strncmp(*e, cuda_vars[i].var, n);
        if (!known)
            return kvm_seterr(KVM_EINVAL, "%.*s: not a setting of the CUDA backend (docs/cli.md lists the KVM_CUDA_* "
                                          "variables)", (int)n, *e);
    }
    return 0;
}

int cli_env_apply(void) {
    int rc = apply_log();
    if (!rc) rc = check_cuda_names();
    const char *v = env("KVM_THREADS");
    uint64_t threads = 0;
    if (!rc && v) {
        rc = parse_u64("KVM_THREADS", v, 0, 256, "0 (all cores), 1, 2, ..., 256", &threads);
        if (!rc) kvm_set_threads((int)threads);
    }
    kvm_cuda_opts_t o = kvm_cuda_get_opts();
    bool any = false;
    for (size_t i = 0; !rc && i < sizeof cuda_vars / sizeof cuda_vars[0]; i++) {
        if (!(v = env(cuda_vars[i].var))) continue;
        rc = kvm_cuda_opts_parse(&o, cuda_vars[i].key, v);
        if (rc) kvm_errctx(rc, "%s", cuda_vars[i].var);
        any = true;
    }
    if (!rc && any) rc = kvm_cuda_set_opts(&o);
    return rc;
}

/* Puts the variable's value into *field unless the caller set it, and checks it through the public parameter
 * check, so that a bad value is an error naming the variable. */
static int take_str(const char *var, const char **field, kvm_model_params_t *p) {
    const char *v = env(var);
    if (*field || !v) return 0;
    *field = v;
    int rc = kvm_model_params_check(p);
    return rc ? kvm_errctx(rc, "%s", var) : 0;
}

int cli_env_model_params(kvm_model_params_t *p) {
    int rc = take_str("KVM_BACKEND", &p->backend, p);
    if (!rc) rc = take_str("KVM_DEVICE_DTYPE", &p->weight_dtype, p);
    if (!rc) rc = take_str("KVM_KV_DTYPE", &p->kv_dtype, p);
    const char *v;
    if (!rc && p->cuda_graphs == 0 && (v = env("KVM_CUDA_GRAPHS"))) {
        if (strcmp(v, "0") && strcmp(v, "1")) return bad("KVM_CUDA_GRAPHS", v, "0, 1");
        p->cuda_graphs = !strcmp(v, "0") ? -1 : 1;
    }
    if (!rc && p->synthetic_seed == 0 && (v = env("KVM_SYNTHETIC_SEED")))
        rc = parse_u64("KVM_SYNTHETIC_SEED", v, 0, UINT64_MAX, "0 (the default, 1234), 1, 2, ... (a decimal seed)",
                       &p->synthetic_seed);
    return rc;
}
