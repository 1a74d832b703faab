/* json_out.h - what the benchmarks' JSON reports share: numbers added from a table, a report written to a file. */
#ifndef KVM_LAB_JSON_OUT_H
#define KVM_LAB_JSON_OUT_H

#include <stddef.h>

#include <cjson/cJSON.h>

typedef struct lab_json_num {
    const char *key;
    double v;
} lab_json_num_t;

/* Adds every nums[i] to the object o as key: number. */
void lab_json_add_nums(cJSON *o, const lab_json_num_t *nums, size_t n);
/* Writes root, pretty-printed, and a newline to path: 0, or -1 when it cannot (the caller says so). */
int lab_json_write(const cJSON *root, const char *path);

#endif
