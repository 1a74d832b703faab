/* json.h - parsing JSON text with messages that say where it went wrong, for the library's file
 * readers (config.json, tokenizer.json, safetensors headers, traces). cJSON allocates through the
 * counted allocator (kvm_core_init), so an out-of-memory parse is told apart from bad text. */
#ifndef KVM_JSON_H
#define KVM_JSON_H

#include <stddef.h>

#include <cjson/cJSON.h>

/* Parses the one JSON value that text[0..len) holds (whitespace may follow it). Returns 0 and the
 * value in *out (the caller frees it with cJSON_Delete), or NULL in *out and
 *   KVM_ENOMEM   "<what>: out of memory parsing JSON",
 *   KVM_EFORMAT  "<what>: not valid JSON (error near line L, byte B)", or
 *   KVM_EFORMAT  "<what>: unexpected text after the JSON value at byte B". */
int kvm_json_parse(const char *text, size_t len, const char *what, cJSON **out);

/* Reads the file at path (at most max_bytes) and parses the JSON object it holds. Returns 0 and the
 * object in *out (the caller frees it with cJSON_Delete), or NULL in *out and kvm_read_file's error
 * (prefixed "<what>: " when what is not NULL), a kvm_json_parse error naming the path, or
 *   KVM_EFORMAT  "<path>: not a JSON object" when the value is not an object. */
int kvm_json_read_object(const char *path, size_t max_bytes, const char *what, cJSON **out);

/* After a cJSON call returned NULL: whether it ran out of memory (rather than meeting bad input).
 * Valid when kvm_errclear() was called just before the cJSON call. */
int kvm_json_failed_for_memory(void);

#endif
