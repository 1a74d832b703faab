/* fuzz_safetensors.c - libFuzzer target: the safetensors header parser (runtime/model/safetensors.c).
 *
 * The input is a whole .safetensors image, parsed in memory (kvm_st_parse) with and without KVM_ST_EXACT.
 * Every tensor the parser accepts is checked against what safetensors.h promises: its data lies inside the
 * data area of the image, holds numel x dtype-size bytes, is aligned to its element size, and names are
 * sorted and unique; the first and last byte of each tensor are read (the image is the fuzzer's exact-size
 * heap copy, so a range past its end is an ASan report). */
#include "fuzz_util.h"

#include "runtime/model/safetensors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    fz_init_library();
    return 0;
}

#define CHECK(cond) FZ_CHECK("fuzz_safetensors", cond)

static volatile uint8_t g_sink;

static void check_index(const kvm_st_file_t *f, const uint8_t *data, size_t size) {
    CHECK(f->base == data && f->size == size);
    CHECK(f->data == data + 8 + f->header_bytes && f->data_bytes == size - 8 - f->header_bytes);
    for (int i = 0; i < f->n_tensors; i++) {
        const kvm_st_tensor_t *t = &f->tensors[i];
        size_t es = kvm_dtype_size(t->dtype);
        CHECK(t->ndim >= 0 && t->ndim <= KVM_ST_MAX_DIMS);
        CHECK(t->begin <= t->end && t->end <= f->data_bytes);
        CHECK(t->end - t->begin == kvm_st_numel(t) * es);
        CHECK((const uint8_t *)t->data == f->data + t->begin);
        CHECK((uintptr_t)t->data % es == 0);
        if (i) CHECK(strcmp(f->tensors[i - 1].name, t->name) < 0);
        CHECK(kvm_st_find(f, t->name) == t);
        if (t->end > t->begin) g_sink ^= ((const uint8_t *)t->data)[0] ^ ((const uint8_t *)t->data)[t->end - t->begin - 1];
        kvm_tensor_t view;
        int rc = kvm_st_view(t, &view, f->path);
        CHECK(rc == 0 ? t->ndim <= 4 && view.data == t->data : rc == KVM_EUNSUPPORTED && t->ndim > 4);
    }
    CHECK(kvm_st_find(f, "\x01 no such tensor") == NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    for (int flags = 0; flags <= KVM_ST_EXACT; flags += KVM_ST_EXACT) {
        kvm_st_file_t f;
        int rc = kvm_st_parse(&f, data, size, "fuzz.safetensors", flags);
        if (rc == 0) {
            check_index(&f, data, size);
        } else {
            CHECK(rc < 0 && *kvm_errmsg());
            CHECK(f.tensors == NULL && f.n_tensors == 0);
        }
        kvm_st_close(&f);
        kvm_errclear();
    }
    return 0;
}
