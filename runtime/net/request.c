/* request.c - the daemon's request decoder (request.h): framing, the header JSON, and every field of the
 * message types the daemon serves, checked before any work starts. */
#include "request.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "../core/core.h"
#include "../core/map.h"

kvm_req_limits_t kvm_req_default_limits(void) {
    return (kvm_req_limits_t){.max_header = KVM_REQ_HEADER_MAX, .max_message = 16u << 20, .max_source = 1u << 20};
}

/* ---- the schema --------------------------------------------------------------------------------------- */

enum kind { K_STR = 1, K_NUM, K_OBJ, K_ARR, K_BOOL, K_SEED /* number or decimal string */, K_ANY /* any JSON value */ };

typedef struct field {
    const char *name;
    int kind;
} field_t;

typedef struct schema {
    int type;
    const char *name;
    const field_t *fields; /* besides the common ones; {NULL} ends */
    int frames;            /* payload frames allowed at most (false = 0, true = 1) */
} schema_t;

static const field_t k_common[] = {{"v", K_NUM}, {"type", K_STR}, {"id", K_STR}, {"deadline_ms", K_NUM},
                                   {"trace", K_STR}, {"frames", K_ARR}, {NULL, 0}};
static const field_t k_none[] = {{NULL, 0}};
static const field_t k_hello[] = {{"client", K_STR}, {"versions", K_ARR}, {"want", K_ARR}, {NULL, 0}};
static const field_t k_wf_load[] = {{"name", K_STR}, {"source", K_STR}, {NULL, 0}};
static const field_t k_wf_name[] = {{"name", K_STR}, {NULL, 0}};
static const field_t k_run_start[] = {{"workflow", K_STR}, {"inputs", K_OBJ}, {"seed", K_SEED},
                                      {"dataset", K_BOOL}, {"stream", K_ARR}, {"kv", K_STR}, {NULL, 0}};
static const field_t k_run_id[] = {{"run_id", K_STR}, {NULL, 0}};
static const field_t k_request_id[] = {{"request_id", K_STR}, {NULL, 0}};
static const field_t k_trace_get[] = {{"run_id", K_STR}, {"format", K_STR}, {NULL, 0}};
static const field_t k_run_resume[] = {{"run_id", K_STR}, {"value", K_ANY}, {NULL, 0}};
static const field_t k_model_load[] = {{"name", K_STR}, {"path", K_STR}, {"backend", K_STR}, {NULL, 0}};
static const field_t k_model_name[] = {{"name", K_STR}, {NULL, 0}};
static const field_t k_generate[] = {{"model", K_STR}, {"prompt", K_STR}, {"max_tokens", K_NUM}, {"temperature", K_NUM},
                                     {"top_p", K_NUM}, {"seed", K_SEED}, {"stop", K_ARR}, {"chat", K_BOOL},
                                     {"ignore_eos", K_BOOL}, {NULL, 0}};
static const field_t k_attribute[] = {{"run_id", K_STR}, {"k", K_NUM}, {"verify", K_OBJ}, {"judge", K_STR}, {NULL, 0}};
static const field_t k_cache_show[] = {{"entry", K_NUM}, {NULL, 0}};
static const field_t k_cache_pin[] = {{"entry", K_NUM}, {"pinned", K_BOOL}, {NULL, 0}};
static const field_t k_seg_put[] = {{"segment_id", K_STR}, {"model", K_STR}, {"frame", K_NUM}, {"dtype", K_STR},
                                    {"layers", K_NUM}, {"kv_heads", K_NUM}, {"head_dim", K_NUM}, {NULL, 0}};
static const field_t k_seg_id[] = {{"segment_id", K_STR}, {NULL, 0}};
static const field_t k_cache_label[] = {{"run_id", K_STR}, {"agent", K_STR}, {"step", K_NUM}, {"human", K_BOOL}, {NULL, 0}};
static const field_t k_tool_register[] = {{"name", K_STR}, {"description", K_STR}, {"schema", K_OBJ}, {NULL, 0}};
static const field_t k_tool_result[] = {{"run_id", K_STR}, {"call_id", K_SEED}, {"result", K_ANY}, {"error", K_STR},
                                        {NULL, 0}};

static const schema_t k_schemas[] = {
    {KVM_REQ_HELLO, "hello", k_hello, false},
    {KVM_REQ_PING, "ping", k_none, false},
    {KVM_REQ_STATS, "stats", k_none, false},
    {KVM_REQ_WORKFLOW_LOAD, "workflow.load", k_wf_load, true},
    {KVM_REQ_WORKFLOW_LIST, "workflow.list", k_none, false},
    {KVM_REQ_WORKFLOW_DROP, "workflow.drop", k_wf_name, false},
    {KVM_REQ_RUN_START, "run.start", k_run_start, false},
    {KVM_REQ_RUN_CANCEL, "run.cancel", k_run_id, false},
    {KVM_REQ_RUN_STATUS, "run.status", k_run_id, false},
    {KVM_REQ_RUN_LIST, "run.list", k_none, false},
    {KVM_REQ_TRACE_GET, "trace.get", k_trace_get, false},
    {KVM_REQ_RUN_RESUME, "run.resume", k_run_resume, false},
    {KVM_REQ_TRACE_EXPORT, "trace.export", k_trace_get, false},
    {KVM_REQ_MODEL_LOAD, "model.load", k_model_load, false},
    {KVM_REQ_MODEL_UNLOAD, "model.unload", k_model_name, false},
    {KVM_REQ_MODEL_LIST, "model.list", k_none, false},
    {KVM_REQ_GENERATE, "generate", k_generate, true},
    {KVM_REQ_ATTRIBUTE, "attribute", k_attribute, false},
    {KVM_REQ_CACHE_STATS, "cache.stats", k_none, false},
    {KVM_REQ_CACHE_SHOW, "cache.show", k_cache_show, false},
    {KVM_REQ_CACHE_PIN, "cache.pin", k_cache_pin, false},
    {KVM_REQ_CACHE_EVICT, "cache.evict", k_cache_show, false},
    {KVM_REQ_CACHE_LABEL, "cache.label", k_cache_label, false},
    {KVM_REQ_SEGMENT_PUT, "segment.put", k_seg_put, 3},
    {KVM_REQ_SEGMENT_GET, "segment.get", k_seg_id, false},
    {KVM_REQ_SEGMENT_DROP, "segment.drop", k_seg_id, false},
    {KVM_REQ_TOOL_REGISTER, "tool.register", k_tool_register, false},
    {KVM_REQ_TOOL_RESULT, "tool.result", k_tool_result, false},
    {KVM_REQ_GENERATE_CANCEL, "generate.cancel", k_request_id, false},
};
#define N_SCHEMAS (sizeof k_schemas / sizeof k_schemas[0])

const char *kvm_req_type_name(int type) {
    for (size_t i = 0; i < N_SCHEMAS; i++)
        if (k_schemas[i].type == type) return k_schemas[i].name;
    return NULL;
}

static const char *kind_name(int kind) {
    switch (kind) {
    case K_STR: return "a string";
    case K_NUM: return "a number";
    case K_OBJ: return "an object";
    case K_ARR: return "an array";
    case K_BOOL: return "a boolean";
    case K_ANY: return "a JSON value";
    default: return "an integer or a decimal string";
    }
}

static bool kind_ok(const cJSON *j, int kind) {
    switch (kind) {
    case K_STR: return cJSON_IsString(j);
    case K_NUM: return cJSON_IsNumber(j);
    case K_OBJ: return cJSON_IsObject(j);
    case K_ARR: return cJSON_IsArray(j);
    case K_BOOL: return cJSON_IsBool(j);
    case K_ANY: return !cJSON_IsInvalid(j);
    default: return cJSON_IsNumber(j) || cJSON_IsString(j);
    }
}

/* ---- errors ------------------------------------------------------------------------------------------- */

static int fail(kvm_req_error_t *e, int code, const char *field, const char *fmt, ...) {
    e->code = code;
    snprintf(e->field, sizeof e->field, "%s", field ? field : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return code;
}

/* ---- checks ------------------------------------------------------------------------------------------- */

/* Whether s is 1..max bytes of printable ASCII (ids, names: they go into logs, paths and topics). */
static bool printable(const char *s, size_t max) {
    size_t n = strlen(s);
    if (n == 0 || n > max) return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x21 || s[i] > 0x7e) return false;
    return true;
}

static bool name_ok(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > KVM_REQ_NAME_MAX || s[0] == '.') return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.'))
            return false;
    }
    return true;
}

/* An integral number in [lo, hi]. */
static bool int_in(const cJSON *j, double lo, double hi) {
    double d = j->valuedouble;
    return isfinite(d) && d == floor(d) && d >= lo && d <= hi;
}

/* Appends ".key" (or "key" at the top) or "[i]" to path[0..len); the new length. */
static size_t path_push(char *path, size_t cap, size_t len, const char *key, int i) {
    int n = key ? snprintf(path + len, cap - len, "%s%s", len ? "." : "", key) : snprintf(path + len, cap - len, "[%d]", i);
    size_t l = len + (n > 0 ? (size_t)n : 0);
    return l < cap ? l : cap - 1;
}

/* Duplicate keys anywhere in the tree (cJSON keeps them) and nesting deeper than 64: KVM_EINVAL with the path
 * (path[0..len) is the path of j), or KVM_ENOMEM. */
static int find_duplicate(const cJSON *j, char *path, size_t cap, size_t len, int depth) {
    if (depth > 64) return KVM_ERANGE;
    bool obj = cJSON_IsObject(j);
    if (!obj && !cJSON_IsArray(j)) return 0;
    kvm_map_t seen;
    kvm_map_init(&seen, KVM_MAP_STR_REF);
    int rc = 0, i = 0;
    for (const cJSON *c = j->child; c && !rc; c = c->next, i++) {
        const char *k = obj ? (c->string ? c->string : "") : NULL;
        size_t l = path_push(path, cap, len, k, i);
        if (obj && kvm_map_get_str(&seen, k, NULL)) rc = KVM_EINVAL;
        else if (obj && kvm_map_put_str(&seen, k, KVM_MAPVAL_U64(1))) rc = KVM_ENOMEM;
        else rc = find_duplicate(c, path, cap, l, depth + 1);
        if (!rc) path[len] = '\0';
    }
    kvm_map_free(&seen);
    return rc;
}

static const field_t *find_field(const field_t *fs, const char *k) {
    for (; fs->name; fs++)
        if (!strcmp(fs->name, k)) return fs;
    return NULL;
}

/* Every field is known to the type and of its kind. */
static int check_fields(const cJSON *h, const schema_t *s, kvm_req_error_t *e) {
    for (const cJSON *c = h->child; c; c = c->next) {
        const field_t *f = find_field(k_common, c->string);
        if (!f) f = find_field(s->fields, c->string);
        if (!f) return fail(e, KVM_EINVAL, c->string, "%s: unknown field '%s'", s->name, c->string);
        if (!kind_ok(c, f->kind))
            return fail(e, KVM_EINVAL, c->string, "%s: field '%s' must be %s", s->name, c->string, kind_name(f->kind));
    }
    return 0;
}

static size_t dtype_size(const char *d) {
    static const struct {
        const char *name;
        size_t size;
    } k[] = {{"u8", 1}, {"i32", 4}, {"i64", 8}, {"f16", 2}, {"bf16", 2}, {"f32", 4}};
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++)
        if (!strcmp(k[i].name, d)) return k[i].size;
    return 0;
}

/* header.frames against the payload frames: the count, each descriptor, each length. */
static int check_frames(const cJSON *h, const schema_t *s, const kvm_req_frame_t *pay, int n_pay, kvm_req_error_t *e) {
    const cJSON *fr = cJSON_GetObjectItemCaseSensitive(h, "frames");
    int n_desc = fr ? cJSON_GetArraySize(fr) : 0;
    if (n_desc != n_pay)
        return fail(e, KVM_EPROTO, "frames", "%s: %d payload frame(s) but header.frames describes %d", s->name, n_pay, n_desc);
    if (n_desc > 0 && !s->frames) return fail(e, KVM_EPROTO, "frames", "%s: takes no payload frames", s->name);
    if (n_desc > s->frames) return fail(e, KVM_EPROTO, "frames", "%s: takes at most %d payload frame(s)", s->name, s->frames);
    int i = 0;
    char path[64];
    for (const cJSON *d = fr ? fr->child : NULL; d; d = d->next, i++) {
        snprintf(path, sizeof path, "frames[%d]", i);
        if (!cJSON_IsObject(d)) return fail(e, KVM_EPROTO, path, "%s: %s must be an object", s->name, path);
        const cJSON *dt = cJSON_GetObjectItemCaseSensitive(d, "dtype"), *sh = cJSON_GetObjectItemCaseSensitive(d, "shape");
        const cJSON *nm = cJSON_GetObjectItemCaseSensitive(d, "name");
        for (const cJSON *c = d->child; c; c = c->next)
            if (strcmp(c->string, "dtype") && strcmp(c->string, "shape") && strcmp(c->string, "name"))
                return fail(e, KVM_EPROTO, path, "%s: %s: unknown field '%s'", s->name, path, c->string);
        if (nm && !cJSON_IsString(nm)) return fail(e, KVM_EPROTO, path, "%s: %s.name must be a string", s->name, path);
        size_t esz = cJSON_IsString(dt) ? dtype_size(dt->valuestring) : 0;
        if (!esz) return fail(e, KVM_EPROTO, path, "%s: %s.dtype must be one of u8, i32, i64, f16, bf16, f32", s->name, path);
        if (!cJSON_IsArray(sh) || cJSON_GetArraySize(sh) < 1 || cJSON_GetArraySize(sh) > 8)
            return fail(e, KVM_EPROTO, path, "%s: %s.shape must be an array of 1 to 8 sizes", s->name, path);
        double bytes = (double)esz;
        for (const cJSON *x = sh->child; x; x = x->next) {
            if (!cJSON_IsNumber(x) || !int_in(x, 0, 1e12))
                return fail(e, KVM_EPROTO, path, "%s: %s.shape holds a size that is not a non-negative integer", s->name, path);
            bytes *= x->valuedouble;
        }
        if (bytes != (double)pay[i].len)
            return fail(e, KVM_EPROTO, path, "%s: %s: shape x dtype is %.0f bytes, the frame has %zu", s->name, path, bytes, pay[i].len);
    }
    return 0;
}

static const char *str_of(const cJSON *h, const char *k) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(h, k);
    return cJSON_IsString(j) ? j->valuestring : NULL;
}

/* A required string field that satisfies ok(). */
static int need_str(const cJSON *h, const char *k, bool (*ok)(const char *), const char *what, const char **out,
                    const char *type, kvm_req_error_t *e) {
    const char *s = str_of(h, k);
    if (!s) return fail(e, KVM_EINVAL, k, "%s: field '%s' is required", type, k);
    if (!ok(s)) return fail(e, KVM_EINVAL, k, "%s: field '%s' must be %s", type, k, what);
    *out = s;
    return 0;
}

static bool id_ok(const char *s) { return printable(s, KVM_REQ_ID_MAX); }

static int decode_hello(const cJSON *h, kvm_req_t *r, kvm_req_error_t *e) {
    r->client = str_of(h, "client");
    if (r->client && strlen(r->client) > 128) return fail(e, KVM_EINVAL, "client", "hello: field 'client' is longer than 128 bytes");
    const cJSON *vs = cJSON_GetObjectItemCaseSensitive(h, "versions");
    if (vs) {
        bool one = false;
        int i = 0;
        for (const cJSON *v = vs->child; v; v = v->next, i++) {
            char p[32];
            snprintf(p, sizeof p, "versions[%d]", i);
            if (!cJSON_IsNumber(v) || !int_in(v, 0, 1e6)) return fail(e, KVM_EINVAL, p, "hello: %s must be an integer", p);
            one |= v->valuedouble == 1;
        }
        if (!one) return fail(e, KVM_EVERSION, "versions", "hello: no version this daemon speaks (it speaks 1)");
    }
    const cJSON *w = cJSON_GetObjectItemCaseSensitive(h, "want");
    int i = 0;
    for (const cJSON *x = w ? w->child : NULL; x; x = x->next, i++) {
        char p[32];
        snprintf(p, sizeof p, "want[%d]", i);
        if (!cJSON_IsString(x)) return fail(e, KVM_EINVAL, p, "hello: %s must be a string", p);
    }
    return 0;
}

static int decode_wf_load(const cJSON *h, const kvm_req_frame_t *pay, int n_pay, const kvm_req_limits_t *lim,
                          kvm_req_t *r, kvm_req_error_t *e) {
    int rc = need_str(h, "name", name_ok, "1 to 64 letters, digits, '_', '-' or '.', not starting with '.'", &r->name,
                      "workflow.load", e);
    if (rc) return rc;
    const char *src = str_of(h, "source");
    if (src && n_pay) return fail(e, KVM_EINVAL, "source", "workflow.load: the source is either field 'source' or frame 0, not both");
    if (!src && !n_pay) return fail(e, KVM_EINVAL, "source", "workflow.load: field 'source' (or payload frame 0) is required");
    r->source = src ? src : pay[0].data;
    r->source_len = src ? strlen(src) : pay[0].len;
    if (r->source_len == 0) return fail(e, KVM_EINVAL, "source", "workflow.load: the source is empty");
    if (r->source_len > lim->max_source)
        return fail(e, KVM_EINVAL, "source", "workflow.load: the source is %zu bytes, over the limit of %zu", r->source_len, lim->max_source);
    if (memchr(r->source, 0, r->source_len)) return fail(e, KVM_EINVAL, "source", "workflow.load: the source holds a NUL byte");
    return 0;
}

static int decode_stream(const cJSON *st, kvm_req_t *r, kvm_req_error_t *e) {
    int i = 0;
    for (const cJSON *x = st ? st->child : NULL; x; x = x->next, i++) {
        char p[32];
        snprintf(p, sizeof p, "stream[%d]", i);
        unsigned bit = !cJSON_IsString(x) ? 0u
                       : !strcmp(x->valuestring, "tokens") ? (unsigned)KVM_STREAM_TOKENS
                       : !strcmp(x->valuestring, "steps")  ? (unsigned)KVM_STREAM_STEPS
                       : !strcmp(x->valuestring, "kv")     ? (unsigned)KVM_STREAM_KV
                                                           : 0u;
        if (!bit) return fail(e, KVM_EINVAL, p, "run.start: %s must be one of \"tokens\", \"steps\", \"kv\"", p);
        if (r->stream & bit) return fail(e, KVM_EINVAL, p, "run.start: %s repeats '%s'", p, x->valuestring);
        r->stream |= bit;
    }
    return 0;
}

static int decode_seed(const cJSON *s, kvm_req_t *r, kvm_req_error_t *e) {
    if (!s) {
        r->seed = 1;
        return 0;
    }
    if (cJSON_IsNumber(s)) {
        if (!int_in(s, 0, 9007199254740992.0))
            return fail(e, KVM_EINVAL, "seed", "%s: field 'seed' must be an integer in [0, 2^53] (larger ones as a decimal string)", r->type_name);
        r->seed = (uint64_t)s->valuedouble;
        return 0;
    }
    const char *t = s->valuestring;
    size_t n = strlen(t);
    uint64_t v = 0;
    bool ok = n > 0 && n <= 20;
    for (size_t i = 0; ok && i < n; i++) {
        ok = t[i] >= '0' && t[i] <= '9' && v <= (UINT64_MAX - (uint64_t)(t[i] - '0')) / 10;
        if (ok) v = v * 10 + (uint64_t)(t[i] - '0');
    }
    if (!ok) return fail(e, KVM_EINVAL, "seed", "%s: field 'seed' must be a decimal string of a 64-bit unsigned integer", r->type_name);
    r->seed = v;
    return 0;
}

static int decode_run_start(const cJSON *h, kvm_req_t *r, kvm_req_error_t *e) {
    int rc = need_str(h, "workflow", name_ok, "a workflow name (1 to 64 letters, digits, '_', '-' or '.')", &r->name, "run.start", e);
    if (!rc) rc = decode_seed(cJSON_GetObjectItemCaseSensitive(h, "seed"), r, e);
    if (!rc) rc = decode_stream(cJSON_GetObjectItemCaseSensitive(h, "stream"), r, e);
    if (rc) return rc;
    r->inputs = cJSON_GetObjectItemCaseSensitive(h, "inputs");
    r->dataset = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(h, "dataset"));
    r->kv = str_of(h, "kv");
    if (r->kv && strcmp(r->kv, "dense") && strcmp(r->kv, "prefix") && strcmp(r->kv, "kvcomm"))
        return fail(e, KVM_EINVAL, "kv", "run.start: field 'kv' must be \"dense\", \"prefix\" or \"kvcomm\"");
    return 0;
}

/* ---- models, generate, attribute, cache.* ---------------------------------------------------------------- */

#define NAME_RULE "1 to 64 letters, digits, '_', '-' or '.', not starting with '.'"

/* An optional integer field in [lo, hi] into *out (def when absent). */
static int opt_int(const cJSON *h, const char *k, double lo, double hi, int def, int *out, const char *type, kvm_req_error_t *e) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(h, k);
    *out = def;
    if (!j) return 0;
    if (!int_in(j, lo, hi)) return fail(e, KVM_EINVAL, k, "%s: field '%s' must be an integer in [%.0f, %.0f]", type, k, lo, hi);
    *out = (int)j->valuedouble;
    return 0;
}

static bool path_ok(const char *s) { return s[0] && strlen(s) <= KVM_REQ_PATH_MAX; }

static int decode_model_load(const cJSON *h, kvm_req_t *r, kvm_req_error_t *e) {
    int rc = need_str(h, "name", name_ok, NAME_RULE, &r->model, r->type_name, e);
    if (!rc) rc = need_str(h, "path", path_ok, "a path of 1 to 4096 bytes (or synthetic:NAME)", &r->path, r->type_name, e);
    if (rc) return rc;
    r->backend = str_of(h, "backend");
    if (r->backend && strcmp(r->backend, "auto") && strcmp(r->backend, "cpu") && strcmp(r->backend, "cuda"))
        return fail(e, KVM_EINVAL, "backend", "model.load: field 'backend' must be \"auto\", \"cpu\" or \"cuda\"");
    return 0;
}

static int decode_stop(const cJSON *st, kvm_req_t *r, kvm_req_error_t *e) {
    int i = 0;
    for (const cJSON *x = st ? st->child : NULL; x; x = x->next, i++) {
        char p[32];
        snprintf(p, sizeof p, "stop[%d]", i);
        if (i >= KVM_REQ_STOP_MAX) return fail(e, KVM_EINVAL, "stop", "generate: field 'stop' holds more than %d strings", KVM_REQ_STOP_MAX);
        if (!cJSON_IsString(x) || !x->valuestring[0] || strlen(x->valuestring) > 256)
            return fail(e, KVM_EINVAL, p, "generate: %s must be a string of 1 to 256 bytes", p);
        r->stop[r->n_stop++] = x->valuestring;
    }
    return 0;
}

static int decode_generate(const cJSON *h, const kvm_req_frame_t *pay, int n_pay, kvm_req_t *r, kvm_req_error_t *e) {
    int rc = need_str(h, "model", name_ok, "a model name (" NAME_RULE ")", &r->model, "generate", e);
    if (!rc) rc = decode_seed(cJSON_GetObjectItemCaseSensitive(h, "seed"), r, e);
    if (!rc) rc = opt_int(h, "max_tokens", 1, 4096, 64, &r->max_tokens, "generate", e);
    if (!rc) rc = decode_stop(cJSON_GetObjectItemCaseSensitive(h, "stop"), r, e);
    if (rc) return rc;
    r->prompt = str_of(h, "prompt");
    if (r->prompt && n_pay) return fail(e, KVM_EINVAL, "prompt", "generate: the prompt is either field 'prompt' or a token_ids frame, not both");
    if (!r->prompt && !n_pay) return fail(e, KVM_EINVAL, "prompt", "generate: field 'prompt' (or a token_ids frame) is required");
    if (n_pay) {
        const cJSON *d = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(h, "frames"), 0);
        const char *dt = str_of(d, "dtype"), *nm = str_of(d, "name");
        const cJSON *sh = cJSON_GetObjectItemCaseSensitive(d, "shape");
        if (nm && strcmp(nm, "token_ids")) return fail(e, KVM_EINVAL, "frames[0].name", "generate: frame 0 must be named \"token_ids\"");
        if (!dt || strcmp(dt, "i32") || cJSON_GetArraySize(sh) != 1)
            return fail(e, KVM_EINVAL, "frames[0]", "generate: the token_ids frame must be i32 of shape [T]");
        if (pay[0].len == 0 || pay[0].len / 4 > 1000000)
            return fail(e, KVM_EINVAL, "frames[0].shape", "generate: the token_ids frame must hold 1 to 1000000 ids");
        r->token_ids = pay[0].data;
        r->n_token_ids = (int)(pay[0].len / 4);
    } else if (!r->prompt[0]) {
        return fail(e, KVM_EINVAL, "prompt", "generate: field 'prompt' is empty");
    }
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(h, "temperature"), *p = cJSON_GetObjectItemCaseSensitive(h, "top_p");
    r->temperature = t ? t->valuedouble : 0;
    r->top_p = p ? p->valuedouble : 1;
    if (!isfinite(r->temperature) || r->temperature < 0 || r->temperature > 100)
        return fail(e, KVM_EINVAL, "temperature", "generate: field 'temperature' must be in [0, 100] (0 = greedy)");
    if (!isfinite(r->top_p) || r->top_p <= 0 || r->top_p > 1)
        return fail(e, KVM_EINVAL, "top_p", "generate: field 'top_p' must be in (0, 1]");
    r->chat = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(h, "chat"));
    r->ignore_eos = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(h, "ignore_eos"));
    return 0;
}

/* segment.put: token_ids (i32 [T]) then k and v (dtype [layers][kv_heads][T][head_dim]), in that order. */
static int decode_segment_put(const cJSON *h, const kvm_req_frame_t *pay, int n_pay, kvm_req_t *r, kvm_req_error_t *e) {
    int rc = need_str(h, "segment_id", name_ok, "a segment id (" NAME_RULE ")", &r->segment_id, "segment.put", e);
    if (!rc) rc = need_str(h, "model", name_ok, "a model name (" NAME_RULE ")", &r->model, "segment.put", e);
    if (!rc) rc = opt_int(h, "frame", 0, 1 << 24, 0, &r->frame, "segment.put", e);
    const char *dims[3] = {"layers", "kv_heads", "head_dim"};
    int *out[3] = {&r->layers, &r->kv_heads, &r->head_dim};
    for (int i = 0; i < 3 && !rc; i++) {
        if (!cJSON_GetObjectItemCaseSensitive(h, dims[i])) return fail(e, KVM_EINVAL, dims[i], "segment.put: field '%s' is required", dims[i]);
        rc = opt_int(h, dims[i], 1, 4096, 0, out[i], "segment.put", e);
    }
    if (rc) return rc;
    r->dtype = str_of(h, "dtype");
    if (!r->dtype || (strcmp(r->dtype, "f32") && strcmp(r->dtype, "f16") && strcmp(r->dtype, "bf16")))
        return fail(e, KVM_EINVAL, "dtype", "segment.put: field 'dtype' must be the model's cache dtype: \"f32\", \"f16\" or \"bf16\"");
    if (n_pay != 3) return fail(e, KVM_EPROTO, "frames", "segment.put: takes 3 payload frames (token_ids, k, v), not %d", n_pay);
    const cJSON *fr = cJSON_GetObjectItemCaseSensitive(h, "frames");
    static const char *const names[3] = {"token_ids", "k", "v"};
    int64_t T = -1;
    for (int i = 0; i < 3; i++) {
        const cJSON *d = cJSON_GetArrayItem(fr, i), *sh = cJSON_GetObjectItemCaseSensitive(d, "shape");
        const char *nm = str_of(d, "name"), *dt = str_of(d, "dtype");
        char p[32];
        snprintf(p, sizeof p, "frames[%d]", i);
        if (nm && strcmp(nm, names[i])) return fail(e, KVM_EINVAL, p, "segment.put: %s must be named \"%s\" (token_ids, k, v in that order)", p, names[i]);
        if (i == 0) {
            if (strcmp(dt, "i32") || cJSON_GetArraySize(sh) != 1 || pay[0].len < 4)
                return fail(e, KVM_EINVAL, p, "segment.put: the token_ids frame must be i32 of shape [T], T >= 1");
            T = (int64_t)(pay[0].len / 4);
            continue;
        }
        bool ok = !strcmp(dt, r->dtype) && cJSON_GetArraySize(sh) == 4;
        const double want[4] = {r->layers, r->kv_heads, (double)T, r->head_dim};
        for (int j = 0; ok && j < 4; j++) ok = cJSON_GetArrayItem(sh, j)->valuedouble == want[j];
        if (!ok)
            return fail(e, KVM_EINVAL, p, "segment.put: frame '%s' must be %s of shape [layers %d][kv_heads %d][T %lld][head_dim %d]",
                        names[i], r->dtype, r->layers, r->kv_heads, (long long)T, r->head_dim);
    }
    if (T > 1000000) return fail(e, KVM_EINVAL, "frames[0]", "segment.put: more than 1000000 tokens");
    r->n_tokens = (int)T;
    r->seg_ids = pay[0].data;
    r->seg_k = pay[1].data;
    r->seg_v = pay[2].data;
    r->seg_kv_bytes = pay[1].len;
    return 0;
}

/* attribute's verify {budget, pass} and judge (a model name). */
static int decode_verify(const cJSON *h, kvm_req_t *r, kvm_req_error_t *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(h, "verify"), *it;
    r->verify = v != NULL;
    r->budget = 3;
    r->pass_score = 1.0;
    cJSON_ArrayForEach(it, v) {
        if (strcmp(it->string, "budget") && strcmp(it->string, "pass"))
            return fail(e, KVM_EINVAL, "verify", "attribute: field 'verify' takes 'budget' and 'pass', not '%.40s'", it->string);
    }
    int rc = v ? opt_int(v, "budget", 0, 16, 3, &r->budget, "attribute verify", e) : 0;
    const cJSON *ps = v ? cJSON_GetObjectItemCaseSensitive(v, "pass") : NULL;
    if (!rc && ps && (!cJSON_IsNumber(ps) || !(ps->valuedouble >= -1e9 && ps->valuedouble <= 1e9)))
        return fail(e, KVM_EINVAL, "verify.pass", "attribute: field 'verify.pass' must be a score (a number)");
    if (ps) r->pass_score = ps->valuedouble;
    if (rc) return rc;
    r->judge = str_of(h, "judge");
    if (r->judge && !name_ok(r->judge)) return fail(e, KVM_EINVAL, "judge", "attribute: field 'judge' must be a model name (" NAME_RULE ")");
    if (r->judge && !r->verify)
        return fail(e, KVM_EINVAL, "judge", "attribute: 'judge' writes the schema text of a failure that 'verify' confirms: give 'verify' too");
    return 0;
}

static int decode_models(const cJSON *h, const kvm_req_frame_t *pay, int n_pay, kvm_req_t *r, kvm_req_error_t *e) {
    const cJSON *pin = cJSON_GetObjectItemCaseSensitive(h, "pinned"), *hum = cJSON_GetObjectItemCaseSensitive(h, "human");
    int rc = 0;
    r->entry = -1;
    switch (r->type) {
    case KVM_REQ_MODEL_LOAD: return decode_model_load(h, r, e);
    case KVM_REQ_MODEL_UNLOAD: return need_str(h, "name", name_ok, "a model name (" NAME_RULE ")", &r->model, r->type_name, e);
    case KVM_REQ_GENERATE: return decode_generate(h, pay, n_pay, r, e);
    case KVM_REQ_ATTRIBUTE:
        rc = opt_int(h, "k", 1, 16, 5, &r->k, r->type_name, e);
        if (!rc) rc = need_str(h, "run_id", id_ok, "a run id (1 to 64 printable bytes)", &r->run_id, r->type_name, e);
        return rc ? rc : decode_verify(h, r, e);
    case KVM_REQ_CACHE_SHOW: return opt_int(h, "entry", 0, 2147483647.0, -1, &r->entry, r->type_name, e);
    case KVM_REQ_CACHE_PIN:
    case KVM_REQ_CACHE_EVICT:
        if (!cJSON_GetObjectItemCaseSensitive(h, "entry")) return fail(e, KVM_EINVAL, "entry", "%s: field 'entry' is required", r->type_name);
        r->pinned = !pin || cJSON_IsTrue(pin);
        return opt_int(h, "entry", 0, 2147483647.0, -1, &r->entry, r->type_name, e);
    case KVM_REQ_SEGMENT_PUT: return decode_segment_put(h, pay, n_pay, r, e);
    case KVM_REQ_SEGMENT_GET:
    case KVM_REQ_SEGMENT_DROP:
        return need_str(h, "segment_id", name_ok, "a segment id (" NAME_RULE ")", &r->segment_id, r->type_name, e);
    case KVM_REQ_CACHE_LABEL:
        if (!cJSON_GetObjectItemCaseSensitive(h, "step")) return fail(e, KVM_EINVAL, "step", "cache.label: field 'step' is required");
        rc = opt_int(h, "step", 0, 1000000, 0, &r->step, r->type_name, e);
        if (!rc) rc = need_str(h, "run_id", id_ok, "a run id (1 to 64 printable bytes)", &r->run_id, r->type_name, e);
        if (rc) return rc;
        r->agent = str_of(h, "agent");
        if (!r->agent || !r->agent[0] || strlen(r->agent) > 63)
            return fail(e, KVM_EINVAL, "agent", "cache.label: field 'agent' (the responsible agent) must be 1 to 63 bytes");
        r->human = !hum || cJSON_IsTrue(hum);
        return 0;
    default: return 0;
    }
}

/* tool.result: run_id, call_id (an integer or a decimal string, > 0), and either result or error. */
static int decode_tool_result(const cJSON *h, kvm_req_t *r, kvm_req_error_t *e) {
    int rc = need_str(h, "run_id", id_ok, "a run id (1 to 64 printable bytes)", &r->run_id, r->type_name, e);
    if (rc) return rc;
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(h, "call_id");
    if (!c) return fail(e, KVM_EINVAL, "call_id", "tool.result: field 'call_id' is required");
    uint64_t v = 0;
    bool ok = true;
    if (cJSON_IsNumber(c)) {
        ok = int_in(c, 1, 9007199254740992.0);
        v = ok ? (uint64_t)c->valuedouble : 0;
    } else {
        size_t n = strlen(c->valuestring);
        ok = n > 0 && n <= 20;
        for (size_t i = 0; ok && i < n; i++) {
            ok = c->valuestring[i] >= '0' && c->valuestring[i] <= '9' && v <= (UINT64_MAX - (uint64_t)(c->valuestring[i] - '0')) / 10;
            if (ok) v = v * 10 + (uint64_t)(c->valuestring[i] - '0');
        }
        ok = ok && v > 0;
    }
    if (!ok) return fail(e, KVM_EINVAL, "call_id", "tool.result: field 'call_id' must be the call's id (a positive integer, or its decimal string)");
    r->call_id = v;
    r->value = cJSON_GetObjectItemCaseSensitive(h, "result");
    r->error = str_of(h, "error");
    if (r->value && r->error) return fail(e, KVM_EINVAL, "error", "tool.result: give 'result' or 'error', not both");
    return 0;
}

static int decode_body(const cJSON *h, const kvm_req_frame_t *pay, int n_pay, const kvm_req_limits_t *lim, kvm_req_t *r,
                       kvm_req_error_t *e) {
    const char *fmt = NULL;
    switch (r->type) {
    case KVM_REQ_HELLO: return decode_hello(h, r, e);
    case KVM_REQ_WORKFLOW_LOAD: return decode_wf_load(h, pay, n_pay, lim, r, e);
    case KVM_REQ_WORKFLOW_DROP:
        return need_str(h, "name", name_ok, "a workflow name (1 to 64 letters, digits, '_', '-' or '.')", &r->name, r->type_name, e);
    case KVM_REQ_RUN_START: return decode_run_start(h, r, e);
    case KVM_REQ_TRACE_EXPORT:
        r->format = str_of(h, "format");
        if (r->format && strcmp(r->format, "otlp-json") && strcmp(r->format, "whowhen") && strcmp(r->format, "jsonl"))
            return fail(e, KVM_EINVAL, "format", "trace.export: field 'format' must be \"otlp-json\", \"whowhen\" or \"jsonl\"");
        return need_str(h, "run_id", id_ok, "a run id (1 to 64 printable bytes)", &r->run_id, r->type_name, e);
    case KVM_REQ_TOOL_REGISTER:
        r->description = str_of(h, "description");
        r->schema = cJSON_GetObjectItemCaseSensitive(h, "schema");
        return need_str(h, "name", name_ok, "a tool name (1 to 64 letters, digits, '_', '-' or '.')", &r->name, r->type_name, e);
    case KVM_REQ_TOOL_RESULT: return decode_tool_result(h, r, e);
    case KVM_REQ_GENERATE_CANCEL:
        return need_str(h, "request_id", id_ok, "the id of a generate request of this client", &r->run_id, r->type_name, e);
    case KVM_REQ_TRACE_GET:
        fmt = str_of(h, "format");
        if (fmt && strcmp(fmt, "jsonl")) return fail(e, KVM_EINVAL, "format", "trace.get: field 'format' must be \"jsonl\"");
        /* fall through */
    case KVM_REQ_RUN_RESUME: r->value = cJSON_GetObjectItemCaseSensitive(h, "value"); /* fall through */
    case KVM_REQ_RUN_CANCEL:
    case KVM_REQ_RUN_STATUS: return need_str(h, "run_id", id_ok, "a run id (1 to 64 printable bytes)", &r->run_id, r->type_name, e);
    default: return decode_models(h, pay, n_pay, r, e);
    }
}

/* The common header fields: v, type, id, deadline_ms, trace. */
static int decode_common(const cJSON *h, kvm_req_t *r, const schema_t **sch, kvm_req_error_t *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(h, "v");
    if (!v) return fail(e, KVM_EPROTO, "v", "header: field 'v' (the protocol version) is required");
    if (!cJSON_IsNumber(v)) return fail(e, KVM_EPROTO, "v", "header: field 'v' must be a number");
    if (v->valuedouble != 1) return fail(e, KVM_EVERSION, "v", "header: protocol version %g is not supported (this daemon speaks 1)", v->valuedouble);
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(h, "type");
    if (!t) return fail(e, KVM_EPROTO, "type", "header: field 'type' is required");
    if (!cJSON_IsString(t)) return fail(e, KVM_EPROTO, "type", "header: field 'type' must be a string");
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(h, "id");
    if (!id) return fail(e, KVM_EPROTO, "id", "header: field 'id' is required");
    if (!cJSON_IsString(id) || !id_ok(id->valuestring))
        return fail(e, KVM_EINVAL, "id", "header: field 'id' must be a string of 1 to %d printable bytes", KVM_REQ_ID_MAX);
    *sch = NULL;
    for (size_t i = 0; i < N_SCHEMAS; i++)
        if (!strcmp(k_schemas[i].name, t->valuestring)) *sch = &k_schemas[i];
    if (!*sch) return fail(e, KVM_EINVAL, "type", "header: unknown type '%.64s'", t->valuestring);
    r->type = (*sch)->type;
    r->type_name = (*sch)->name;
    int rc = check_fields(h, *sch, e);
    if (rc) return rc;
    const cJSON *dl = cJSON_GetObjectItemCaseSensitive(h, "deadline_ms");
    r->deadline_ms = -1;
    if (dl) {
        if (!int_in(dl, 0, 86400000)) return fail(e, KVM_EINVAL, "deadline_ms", "header: field 'deadline_ms' must be an integer in [0, 86400000]");
        r->deadline_ms = (int64_t)dl->valuedouble;
    }
    const char *tr = str_of(h, "trace");
    if (tr && strlen(tr) > 128) return fail(e, KVM_EINVAL, "trace", "header: field 'trace' is longer than 128 bytes");
    return 0;
}

/* Framing and the header's JSON; *out the parsed object. */
static int parse_header(const kvm_req_frame_t *frames, int n, const kvm_req_limits_t *lim, cJSON **out, kvm_req_error_t *e) {
    if (n < 1 || frames[0].len != 0)
        return fail(e, KVM_EPROTO, "", "framing: the first frame after the identity must be the empty delimiter");
    if (n < 2) return fail(e, KVM_EPROTO, "", "framing: no header frame after the delimiter");
    size_t total = 0;
    for (int i = 0; i < n; i++) total += frames[i].len;
    if (total > lim->max_message) return fail(e, KVM_EPROTO, "", "framing: the message is %zu bytes, over the limit of %zu", total, lim->max_message);
    const kvm_req_frame_t *hf = &frames[1];
    if (hf->len > lim->max_header) return fail(e, KVM_EPROTO, "", "header: %zu bytes, over the limit of %zu", hf->len, lim->max_header);
    if (hf->len == 0) return fail(e, KVM_EPROTO, "", "header: the header frame is empty");
    const char *txt = hf->data, *end = NULL;
    /* JSON allows no control byte but \t \n \r, even inside strings; cJSON would skip them as whitespace */
    for (size_t i = 0; i < hf->len; i++) {
        unsigned char ch = (unsigned char)txt[i];
        if (ch < 0x20 && ch != '\t' && ch != '\n' && ch != '\r')
            return fail(e, KVM_EPROTO, "", "header: control byte 0x%02x at byte %zu", ch, i);
    }
    kvm_errclear();
    cJSON *h = cJSON_ParseWithLengthOpts(txt, hf->len, &end, 0);
    if (!h) {
        if (kvm_errcode() == KVM_ENOMEM) return fail(e, KVM_ENOMEM, "", "header: out of memory parsing it");
        size_t at = end && end >= txt && end <= txt + hf->len ? (size_t)(end - txt) : 0;
        return fail(e, KVM_EPROTO, "", "header: not valid JSON (near byte %zu)", at);
    }
    for (const char *p = end; p && p < txt + hf->len; p++)
        if (*p != ' ' && *p != '\t' && *p != '\r' && *p != '\n') {
            cJSON_Delete(h);
            return fail(e, KVM_EPROTO, "", "header: unexpected text after the JSON object at byte %zu", (size_t)(p - txt));
        }
    if (!cJSON_IsObject(h)) {
        cJSON_Delete(h);
        return fail(e, KVM_EPROTO, "", "header: not a JSON object");
    }
    *out = h;
    return 0;
}

int kvm_req_decode(const kvm_req_frame_t *frames, int n_frames, const kvm_req_limits_t *lim, kvm_req_t *out,
                   kvm_req_error_t *err) {
    const kvm_req_limits_t def = kvm_req_default_limits();
    if (!lim) lim = &def;
    memset(out, 0, sizeof *out);
    memset(err, 0, sizeof *err);
    cJSON *h = NULL;
    int rc = parse_header(frames, n_frames, lim, &h, err);
    if (rc) return rc;
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(h, "id");
    if (cJSON_IsString(id) && id_ok(id->valuestring)) {
        err->has_id = true;
        snprintf(err->id, sizeof err->id, "%s", id->valuestring);
        snprintf(out->id, sizeof out->id, "%s", id->valuestring);
    }
    char dup[128] = "";
    rc = find_duplicate(h, dup, sizeof dup, 0, 0);
    if (rc == KVM_ENOMEM) rc = fail(err, KVM_ENOMEM, "", "header: out of memory checking it");
    else if (rc == KVM_ERANGE) rc = fail(err, KVM_EINVAL, dup, "header: nested deeper than 64 levels");
    else if (rc) rc = fail(err, KVM_EINVAL, dup, "header: duplicate key '%s'", dup);
    const schema_t *sch = NULL;
    if (!rc) rc = decode_common(h, out, &sch, err);
    if (!rc) rc = check_frames(h, sch, frames + 2, n_frames - 2, err);
    if (!rc) rc = decode_body(h, frames + 2, n_frames - 2, lim, out, err);
    if (rc) {
        cJSON_Delete(h);
        memset(out, 0, sizeof *out);
        return rc;
    }
    out->header = h;
    return 0;
}

void kvm_req_clear(kvm_req_t *r) {
    if (!r) return;
    cJSON_Delete(r->header);
    memset(r, 0, sizeof *r);
}
