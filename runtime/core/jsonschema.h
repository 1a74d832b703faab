/* jsonschema.h - a subset of JSON Schema (draft 2020-12 semantics) for the arguments of host tools: the schema a
 * tool is registered with is checked once (kvm_jsonschema_check), then every call's arguments are validated against
 * it before the tool runs (kvm_jsonschema_validate).
 *
 * Keywords that validate: type (a name or a list of names: "null", "boolean", "object", "array", "number",
 * "integer", "string"), properties, required, additionalProperties (a boolean or a schema), enum, items (one schema
 * for every element), minimum, maximum, minLength, maxLength (in Unicode code points), minItems, maxItems.
 * Annotations accepted and ignored: title, description, default, examples, $comment, $schema. Any other keyword
 * ($ref, pattern, oneOf, ...) is refused by kvm_jsonschema_check, so a schema never means less than it says. A
 * boolean schema (true / false) is allowed where a schema is. */
#ifndef KVM_JSONSCHEMA_H
#define KVM_JSONSCHEMA_H

#include <stddef.h>

#include <cjson/cJSON.h>

/* Nesting of schemas within schemas that kvm_jsonschema_check accepts. */
#define KVM_JSONSCHEMA_MAX_DEPTH 32

/* Checks that schema uses only the subset above, well formed (types of each keyword's value, known type names,
 * non-negative lengths, required naming strings, nesting at most KVM_JSONSCHEMA_MAX_DEPTH). what names the schema in
 * messages ("tool 'weather': schema"). 0, or KVM_EINVAL with a message naming the place:
 *   "tool 'weather': schema.properties.city: unsupported keyword 'pattern' (supported: type, properties, ...)". */
int kvm_jsonschema_check(const cJSON *schema, const char *what);

/* Validates value against schema (one kvm_jsonschema_check accepted). root names the value in messages ("args").
 * 0, or KVM_EINVAL with the first violation found, its path from root:
 *   "args.city: expected string, got number", "args: missing required property 'city'",
 *   "args.days[2]: 15 is above the maximum 14", "args: property 'x' is not allowed (additionalProperties)". */
int kvm_jsonschema_validate(const cJSON *schema, const cJSON *value, const char *root);

#endif
