/* json_out.c - the benchmarks' JSON reports (json_out.h). */
#include "json_out.h"

#include <stdio.h>

void lab_json_add_nums(cJSON *o, const lab_json_num_t *nums, size_t n) {
    for (size_t i = 0; i < n; i++) cJSON_AddNumberToObject(o, nums[i].key, nums[i].v);
}

int lab_json_write(const cJSON *root, const char *path) {
    char *text = cJSON_Print(root); /* the library's cJSON hooks allocate it: cJSON_free */
    FILE *f = text ? fopen(path, "w") : NULL;
    int rc = f && fputs(text, f) >= 0 && fputc('\n', f) != EOF ? 0 : -1;
    if (f && fclose(f) != 0) rc = -1;
    cJSON_free(text);
    return rc;
}
