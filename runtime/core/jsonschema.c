/* jsonschema.c - the JSON Schema subset of jsonschema.h: a registration-time check that a schema says nothing this
 * code would ignore, and validation of a value with the path of the first violation. */
#include "jsonschema.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "status.h"

#define SUPPORTED                                                                                                      \
    "type, properties, required, additionalProperties, enum, items, minimum, maximum, minLength, maxLength, "         \
    "minItems, maxItems; annotations title, description, default, examples, $comment, $schema"

static const char *const TYPE_NAMES[] = {"null", "boolean", "object", "array", "number", "integer", "string"};

/* A path being built: "args.city[2]"; cut (with "...") when it does not fit. */
typedef struct path {
    char s[512];
    size_t n;
} path_t;

/* Appends a piece to the path; returns the length before, for path_pop. */
static size_t path_add(path_t *p, int k, size_t old) {
    if (k < 0 || (size_t)k >= sizeof p->s - p->n) { /* too deep or too long: the end of the path is "..." */
        p->n = sizeof p->s - 4;
        memcpy(p->s + p->n, "...", 4);
        p->n += 3;
    } else {
        p->n += (size_t)k;
    }
    return old;
}

static size_t path_push(path_t *p, const char *fmt, const char *name) {
    size_t old = p->n;
    return path_add(p, snprintf(p->s + p->n, sizeof p->s - p->n, fmt, name), old);
}

static size_t path_index(path_t *p, int index) {
    size_t old = p->n;
    return path_add(p, snprintf(p->s + p->n, sizeof p->s - p->n, "[%d]", index), old);
}

static void path_pop(path_t *p, size_t old) {
    p->n = old;
    p->s[old] = '\0';
}

static bool is_type_name(const char *s) {
    for (size_t i = 0; i < sizeof TYPE_NAMES / sizeof *TYPE_NAMES; i++)
        if (!strcmp(s, TYPE_NAMES[i])) return true;
    return false;
}

static bool is_count(const cJSON *v) {
    return cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble <= 1e15 && v->valuedouble == floor(v->valuedouble);
}

/* ---- the check at registration ------------------------------------------------------------------------------- */

static int check_at(const cJSON *s, path_t *p, int depth, const char *what);

static int check_type(const cJSON *t, const path_t *p, const char *what) {
    if (cJSON_IsString(t)) {
        if (!is_type_name(t->valuestring))
            return kvm_seterr(KVM_EINVAL, "%s%s.type: unknown type '%.64s' (types: null, boolean, object, array, number, "
                              "integer, string)", what, p->s, t->valuestring);
        return 0;
    }
    if (!cJSON_IsArray(t) || !t->child)
        return kvm_seterr(KVM_EINVAL, "%s%s.type: must be a type name or a non-empty list of them", what, p->s);
    for (const cJSON *c = t->child; c; c = c->next) {
        int rc = check_type(c, p, what);
        if (rc || !cJSON_IsString(c)) return rc ? rc : kvm_seterr(KVM_EINVAL, "%s%s.type: a list of type names", what, p->s);
    }
    return 0;
}

static int check_keyword(const cJSON *k, path_t *p, int depth, const char *what) {
    const char *key = k->string;
    if (!strcmp(key, "type")) return check_type(k, p, what);
    if (!strcmp(key, "properties")) {
        if (!cJSON_IsObject(k)) return kvm_seterr(KVM_EINVAL, "%s%s.properties: must be an object of schemas", what, p->s);
        for (const cJSON *c = k->child; c; c = c->next) {
            size_t old = path_push(p, ".properties.%s", c->string);
            int rc = check_at(c, p, depth + 1, what);
            path_pop(p, old);
            if (rc) return rc;
        }
        return 0;
    }
    if (!strcmp(key, "required")) {
        bool ok = cJSON_IsArray(k);
        for (const cJSON *c = ok ? k->child : NULL; c; c = c->next) ok = ok && cJSON_IsString(c);
        return ok ? 0 : kvm_seterr(KVM_EINVAL, "%s%s.required: must be a list of property names", what, p->s);
    }
    if (!strcmp(key, "additionalProperties") || !strcmp(key, "items")) {
        if (cJSON_IsArray(k))
            return kvm_seterr(KVM_EINVAL, "%s%s.%s: the list (tuple) form is not supported: give one schema", what, p->s, key);
        size_t old = path_push(p, ".%s", key);
        int rc = check_at(k, p, depth + 1, what);
        path_pop(p, old);
        return rc;
    }
    if (!strcmp(key, "enum")) {
        if (!cJSON_IsArray(k) || !k->child) return kvm_seterr(KVM_EINVAL, "%s%s.enum: must be a non-empty list of values", what, p->s);
        return 0;
    }
    if (!strcmp(key, "minimum") || !strcmp(key, "maximum")) {
        if (!cJSON_IsNumber(k)) return kvm_seterr(KVM_EINVAL, "%s%s.%s: must be a number", what, p->s, key);
        return 0;
    }
    if (!strcmp(key, "minLength") || !strcmp(key, "maxLength") || !strcmp(key, "minItems") || !strcmp(key, "maxItems")) {
        if (!is_count(k)) return kvm_seterr(KVM_EINVAL, "%s%s.%s: must be a non-negative integer", what, p->s, key);
        return 0;
    }
    static const char *const annotations[] = {"title", "description", "default", "examples", "$comment", "$schema"};
    for (size_t i = 0; i < sizeof annotations / sizeof *annotations; i++)
        if (!strcmp(key, annotations[i])) return 0;
    return kvm_seterr(KVM_EINVAL, "%s%s: unsupported keyword '%.64s' (supported: " SUPPORTED ")", what, p->s, key);
}

static int check_at(const cJSON *s, path_t *p, int depth, const char *what) {
    if (depth > KVM_JSONSCHEMA_MAX_DEPTH)
        return kvm_seterr(KVM_EINVAL, "%s%s: schemas nested deeper than %d", what, p->s, KVM_JSONSCHEMA_MAX_DEPTH);
    if (cJSON_IsBool(s)) return 0;
    if (!cJSON_IsObject(s)) return kvm_seterr(KVM_EINVAL, "%s%s: a schema must be an object (or true / false)", what, p->s);
    for (const cJSON *k = s->child; k; k = k->next) {
        int rc = check_keyword(k, p, depth, what);
        if (rc) return rc;
    }
    const cJSON *lo = cJSON_GetObjectItemCaseSensitive(s, "minimum"), *hi = cJSON_GetObjectItemCaseSensitive(s, "maximum");
    if (lo && hi && lo->valuedouble > hi->valuedouble)
        return kvm_seterr(KVM_EINVAL, "%s%s: minimum %g is above maximum %g", what, p->s, lo->valuedouble, hi->valuedouble);
    return 0;
}

int kvm_jsonschema_check(const cJSON *schema, const char *what) {
    if (!schema) return kvm_seterr(KVM_EINVAL, "%s: no schema", what ? what : "schema");
    path_t p = {.n = 0};
    char prefix[160];
    /* messages read "<what>: schema.properties.x: ..." */
    snprintf(prefix, sizeof prefix, "%s: ", what ? what : "");
    path_push(&p, "%s", "schema");
    return check_at(schema, &p, 0, what ? prefix : "");
}

/* ---- validation ----------------------------------------------------------------------------------------------- */

static bool is_integer(const cJSON *v) {
    return cJSON_IsNumber(v) && isfinite(v->valuedouble) && v->valuedouble == floor(v->valuedouble);
}

static const char *type_of(const cJSON *v) {
    if (cJSON_IsNull(v)) return "null";
    if (cJSON_IsBool(v)) return "boolean";
    if (cJSON_IsObject(v)) return "object";
    if (cJSON_IsArray(v)) return "array";
    if (cJSON_IsNumber(v)) return is_integer(v) ? "integer" : "number";
    if (cJSON_IsString(v)) return "string";
    return "?";
}

static bool has_type(const cJSON *v, const char *name) {
    if (!strcmp(name, "number")) return cJSON_IsNumber(v);
    if (!strcmp(name, "integer")) return is_integer(v);
    return !strcmp(name, type_of(v));
}

/* Unicode code points of a UTF-8 string (a byte that starts no sequence counts as one). */
static size_t utf8_len(const char *s) {
    size_t n = 0;
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) n += (*c & 0xC0) != 0x80;
    return n;
}

static int validate_at(const cJSON *s, const cJSON *v, path_t *p);

static int validate_object(const cJSON *s, const cJSON *v, path_t *p) {
    const cJSON *props = cJSON_GetObjectItemCaseSensitive(s, "properties");
    const cJSON *req = cJSON_GetObjectItemCaseSensitive(s, "required");
    const cJSON *extra = cJSON_GetObjectItemCaseSensitive(s, "additionalProperties");
    for (const cJSON *r = req ? req->child : NULL; r; r = r->next)
        if (!cJSON_GetObjectItemCaseSensitive(v, r->valuestring))
            return kvm_seterr(KVM_EINVAL, "%s: missing required property '%.64s'", p->s, r->valuestring);
    for (const cJSON *c = v->child; c; c = c->next) {
        const cJSON *sub = props ? cJSON_GetObjectItemCaseSensitive(props, c->string) : NULL;
        if (!sub && cJSON_IsFalse(extra))
            return kvm_seterr(KVM_EINVAL, "%s: property '%.64s' is not allowed (additionalProperties is false)", p->s, c->string);
        if (!sub) sub = extra;
        if (!sub) continue;
        size_t old = path_push(p, ".%s", c->string);
        int rc = validate_at(sub, c, p);
        path_pop(p, old);
        if (rc) return rc;
    }
    return 0;
}

static int validate_array(const cJSON *s, const cJSON *v, path_t *p) {
    const cJSON *lo = cJSON_GetObjectItemCaseSensitive(s, "minItems"), *hi = cJSON_GetObjectItemCaseSensitive(s, "maxItems");
    const cJSON *items = cJSON_GetObjectItemCaseSensitive(s, "items");
    int n = cJSON_GetArraySize(v);
    if (lo && n < lo->valuedouble) return kvm_seterr(KVM_EINVAL, "%s: %d items, fewer than minItems %.0f", p->s, n, lo->valuedouble);
    if (hi && n > hi->valuedouble) return kvm_seterr(KVM_EINVAL, "%s: %d items, more than maxItems %.0f", p->s, n, hi->valuedouble);
    int i = 0;
    for (const cJSON *c = items ? v->child : NULL; c; c = c->next, i++) {
        size_t old = path_index(p, i);
        int rc = validate_at(items, c, p);
        path_pop(p, old);
        if (rc) return rc;
    }
    return 0;
}

static int validate_at(const cJSON *s, const cJSON *v, path_t *p) {
    if (cJSON_IsTrue(s)) return 0;
    if (cJSON_IsFalse(s)) return kvm_seterr(KVM_EINVAL, "%s: no value is allowed here (the schema is false)", p->s);
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(s, "type");
    if (t) {
        bool ok = false;
        if (cJSON_IsString(t)) ok = has_type(v, t->valuestring);
        for (const cJSON *c = cJSON_IsArray(t) ? t->child : NULL; c && !ok; c = c->next) ok = has_type(v, c->valuestring);
        if (!ok) {
            char want[128] = "";
            if (cJSON_IsString(t)) snprintf(want, sizeof want, "%s", t->valuestring);
            for (const cJSON *c = cJSON_IsArray(t) ? t->child : NULL; c; c = c->next) {
                size_t n = strlen(want);
                snprintf(want + n, sizeof want - n, "%s%s", n ? " or " : "", c->valuestring);
            }
            return kvm_seterr(KVM_EINVAL, "%s: expected %s, got %s", p->s, want, type_of(v));
        }
    }
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(s, "enum");
    if (e) {
        bool ok = false;
        for (const cJSON *c = e->child; c && !ok; c = c->next) ok = cJSON_Compare(c, v, true);
        if (!ok) {
            char *allowed = cJSON_PrintUnformatted(e);
            int rc = kvm_seterr(KVM_EINVAL, "%s: not one of the allowed values %.200s", p->s, allowed ? allowed : "(enum)");
            cJSON_free(allowed);
            return rc;
        }
    }
    if (cJSON_IsNumber(v)) {
        const cJSON *lo = cJSON_GetObjectItemCaseSensitive(s, "minimum"), *hi = cJSON_GetObjectItemCaseSensitive(s, "maximum");
        if (lo && v->valuedouble < lo->valuedouble)
            return kvm_seterr(KVM_EINVAL, "%s: %g is below the minimum %g", p->s, v->valuedouble, lo->valuedouble);
        if (hi && v->valuedouble > hi->valuedouble)
            return kvm_seterr(KVM_EINVAL, "%s: %g is above the maximum %g", p->s, v->valuedouble, hi->valuedouble);
    } else if (cJSON_IsString(v)) {
        const cJSON *lo = cJSON_GetObjectItemCaseSensitive(s, "minLength"), *hi = cJSON_GetObjectItemCaseSensitive(s, "maxLength");
        size_t n = (lo || hi) ? utf8_len(v->valuestring) : 0;
        if (lo && (double)n < lo->valuedouble)
            return kvm_seterr(KVM_EINVAL, "%s: %zu characters, fewer than minLength %.0f", p->s, n, lo->valuedouble);
        if (hi && (double)n > hi->valuedouble)
            return kvm_seterr(KVM_EINVAL, "%s: %zu characters, more than maxLength %.0f", p->s, n, hi->valuedouble);
    } else if (cJSON_IsObject(v)) {
        return validate_object(s, v, p);
    } else if (cJSON_IsArray(v)) {
        return validate_array(s, v, p);
    }
    return 0;
}

int kvm_jsonschema_validate(const cJSON *schema, const cJSON *value, const char *root) {
    if (!schema || !value) return kvm_seterr(KVM_EINVAL, "%s: nothing to validate", root ? root : "value");
    path_t p = {.n = 0};
    path_push(&p, "%s", root ? root : "value");
    return validate_at(schema, value, &p);
}
