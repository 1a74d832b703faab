/* json.c - JSON parsing with located messages (see json.h). */
#include "json.h"

#include "core.h"

int kvm_json_failed_for_memory(void) { return kvm_errcode() == KVM_ENOMEM; }

int kvm_json_parse(const char *text, size_t len, const char *what, cJSON **out) {
    kvm_core_init();
    kvm_errclear();
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    *out = NULL;
    if (!root) {
        if (kvm_json_failed_for_memory()) return kvm_seterr(KVM_ENOMEM, "%s: out of memory parsing JSON", what);
        size_t at = end && end >= text ? (size_t)(end - text) : 0;
        int line = 1;
        for (size_t i = 0; i < at && i < len; i++) line += text[i] == '\n';
        return kvm_seterr(KVM_EFORMAT, "%s: not valid JSON (error near line %d, byte %zu)", what, line, at);
    }
    for (const char *q = end; q < text + len; q++) {
        if (*q != ' ' && *q != '\t' && *q != '\n' && *q != '\r') {
            cJSON_Delete(root);
            return kvm_seterr(KVM_EFORMAT, "%s: unexpected text after the JSON value at byte %zu", what, (size_t)(q - text));
        }
    }
    *out = root;
    return 0;
}

int kvm_json_read_object(const char *path, size_t max_bytes, const char *what, cJSON **out) {
    *out = NULL;
    char *text = NULL;
    size_t len = 0;
    int rc = kvm_read_file(path, &text, &len, max_bytes);
    if (rc) return what ? kvm_errctx(rc, "%s", what) : rc;
    cJSON *root;
    rc = kvm_json_parse(text, len, path, &root);
    kvm_free(text);
    if (rc) return rc;
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return kvm_seterr(KVM_EFORMAT, "%s: not a JSON object", path);
    }
    *out = root;
    return 0;
}
