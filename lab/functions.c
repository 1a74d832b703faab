/* functions.c - lab's host functions for workflow scripts (kvm_lab_add_functions, lab.h): kvmesh.minitasks.item. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <kvmesh.h>

#include "lab.h"
#include "minitasks.h"

/* A failure of a host function: code, with the message in *msg (kvm_malloc'd; the script sees
 * "kvmesh.minitasks.item: <message>"). */
static int fail(char **msg, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char buf[512];
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    *msg = kvm_malloc(strlen(buf) + 1);
    if (*msg) memcpy(*msg, buf, strlen(buf) + 1);
    return code;
}

/* The fields of a kvmesh.minitasks.item{...} call, checked. NULL strings = absent. */
typedef struct item_args {
    const char *task, *split, *role_name;
    double seed, index, role_num;
    bool has_role_num;
} item_args_t;

static int read_args(const cJSON *t, item_args_t *a, char **msg) {
    static const char *const known = "task, seed, index, role, split";
    *a = (item_args_t){.seed = KVM_MT_DEFAULT_EVAL_SEED};
    if (!cJSON_IsObject(t)) return fail(msg, KVM_EINVAL, "expects a table {task, seed, index, role, split}");
    const cJSON *f;
    cJSON_ArrayForEach(f, t) {
        const char *k = f->string;
        if (!strcmp(k, "task") || !strcmp(k, "split")) {
            if (!cJSON_IsString(f)) return fail(msg, KVM_EINVAL, "field '%s' must be a string", k);
            *(k[0] == 't' ? &a->task : &a->split) = f->valuestring;
        } else if (!strcmp(k, "seed") || !strcmp(k, "index")) {
            if (!cJSON_IsNumber(f)) return fail(msg, KVM_EINVAL, "field '%s' must be a number", k);
            *(k[0] == 's' ? &a->seed : &a->index) = f->valuedouble;
        } else if (!strcmp(k, "role")) {
            if (cJSON_IsString(f)) a->role_name = f->valuestring;
            else if (cJSON_IsNumber(f)) a->role_num = f->valuedouble, a->has_role_num = true;
        } else {
            return fail(msg, KVM_EINVAL, "unknown field '%s' (known: %s)", k, known);
        }
    }
    return 0;
}

/* The item as the JSON object {system, user, answer, id, role} (kvm_malloc'd text), or NULL when out of memory. */
static char *item_json(const kvm_mt_item_t *it) {
    cJSON *o = cJSON_CreateObject();
    bool ok = o && cJSON_AddStringToObject(o, "system", it->system) && cJSON_AddStringToObject(o, "user", it->user) &&
              cJSON_AddStringToObject(o, "answer", it->answer) && cJSON_AddStringToObject(o, "id", it->id) &&
              cJSON_AddNumberToObject(o, "role", it->role);
    char *text = ok ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    char *out = text ? kvm_malloc(strlen(text) + 1) : NULL;
    if (out) memcpy(out, text, strlen(text) + 1);
    cJSON_free(text);
    return out;
}

/* kvmesh.minitasks.item{task = "team", seed = 1000, index = i, role = 0 | "finder", split = "eval"}
 * -> {system, user, answer, id, role} */
static int mt_item(void *ud, const char *args_json, char **result) {
    (void)ud;
    *result = NULL;
    cJSON *args = cJSON_Parse(args_json);
    item_args_t a = {0};
    int rc = args && cJSON_GetArraySize(args) == 1 ? read_args(cJSON_GetArrayItem(args, 0), &a, result)
                                                    : fail(result, KVM_EINVAL, "expects one table argument");
    int task = -1, role = -1;
    if (!rc && a.task && (task = kvm_mt_task_from_name(a.task)) < 0) rc = fail(result, KVM_EINVAL, "unknown task '%s'", a.task);
    if (!rc && a.role_name && (role = task >= 0 ? kvm_mt_role_from_name(task, a.role_name) : -1) < 0)
        rc = fail(result, KVM_EINVAL, "unknown role '%s'", a.role_name);
    if (!rc && a.has_role_num) role = (int)a.role_num;
    kvm_mt_item_t it;
    const int split = a.split && !strcmp(a.split, "train") ? KVM_MT_TRAIN : KVM_MT_EVAL;
    if (!rc && kvm_mt_make(&it, task, split, (uint64_t)a.seed, (uint64_t)a.index, role) != 0)
        rc = fail(result, kvm_errcode(), "%s", kvm_errmsg());
    if (!rc && !(*result = item_json(&it))) rc = KVM_ENOMEM;
    cJSON_Delete(args);
    return rc;
}

int kvm_lab_add_functions(kvm_runtime_t *rt) { return kvm_runtime_add_function(rt, "minitasks.item", mt_item, NULL); }
