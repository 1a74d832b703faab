/* test_stories_common.h - a test group's fixture: stories260K from the shared folder, loaded once on the
 * CPU (a test that needs it is skipped loudly when the folder is absent). */
#ifndef KVM_TEST_STORIES_COMMON_H
#define KVM_TEST_STORIES_COMMON_H

#include <stdio.h>

#include "runtime/core/core.h"
#include "runtime/model/generate.h"

#define S260 KVM_SHARED_DIR "/models/stories260K"

/* *st = the model, or NULL when the shared folder lacks it (then tests skip through NEED_MODEL). */
static int stories_setup(void **st) {
    *st = NULL;
    if (!kvm_file_exists(S260 "/stories260K.bin") || !kvm_file_exists(S260 "/tok512.bin")) return 0;
    kvm_model_params_t o = {.tokenizer_path = S260 "/tok512.bin", .backend = "cpu", .quiet = true};
    *st = kvm_model_load(S260 "/stories260K.bin", &o);
    if (!*st) fprintf(stderr, "load failed: %s\n", kvm_errmsg());
    return *st ? 0 : -1;
}

static int stories_teardown(void **st) {
    kvm_model_free(*st);
    return 0;
}

#define NEED_MODEL(st)                                                                                     \
    do {                                                                                                   \
        if (!*(st)) {                                                                                      \
            fprintf(stderr, "SKIPPED: stories260K not found at %s (the shared models folder is absent)\n", S260); \
            skip();                                                                                        \
        }                                                                                                  \
    } while (0)

#endif
