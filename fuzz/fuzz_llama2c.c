/* fuzz_llama2c.c - libFuzzer target: the llama2.c checkpoint loader (runtime/model/model.c,
 * kvm_load_llama2c) and its tokenizer.bin (runtime/model/tokenizer.c, kvm_tokenizer_load_bin).
 *
 * The input is cut at FZ_SEP into the checkpoint, an optional tokenizer.bin and an optional text. A
 * checkpoint that loads must have a config that validates and weights that lie inside the file: the first
 * and last float of every tensor are read through the mapping's bounds (checked here, as ASan does not see
 * mmap). The tokenizer is loaded with the checkpoint's vocabulary size (512 when the checkpoint did not
 * load) and, when it loads, encodes the text (default "Once upon a time") and decodes the ids. */
#include "fuzz_util.h"

#include "runtime/core/core.h"
#include "runtime/model/model.h"
#include "runtime/model/tokenizer.h"

#include <string.h>

#define CHECK(cond) FZ_CHECK("fuzz_llama2c", cond)

static volatile float g_sink;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    fz_init_library();
    return 0;
}

static void touch(const kvm_model_t *m, const kvm_tensor_t *t) {
    CHECK(t->data && t->dtype == KVM_F32);
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    if (!n) return;
    const char *lo = (const char *)m->maps[0].data, *hi = lo + m->maps[0].size;
    const float *f = t->data;
    CHECK((const char *)f >= lo + 28 && (const char *)(f + n) <= hi);
    g_sink += f[0] + f[n - 1];
}

static void check_model(const kvm_model_t *m) {
    CHECK(kvm_config_validate(&m->cfg, "llama2.c") == 0);
    touch(m, &m->w.tok_emb);
    touch(m, &m->w.final_norm);
    touch(m, &m->w.lm_head);
    for (int l = 0; l < m->cfg.n_layers; l++) {
        const kvm_layer_weights_t *lw = &m->w.layers[l];
        const kvm_tensor_t *ts[] = {&lw->attn_norm, &lw->wq, &lw->wk, &lw->wv, &lw->wo,
                                    &lw->ffn_norm, &lw->w_gate, &lw->w_up, &lw->w_down};
        for (size_t i = 0; i < sizeof ts / sizeof *ts; i++) touch(m, ts[i]);
    }
}

static void check_tokenizer(const kvm_tokenizer_t *t, const char *text) {
    int32_t *ids = NULL;
    int n = 0;
    int rc = kvm_tokenize(t, text, strlen(text), KVM_TOK_ADD_BOS, &ids, &n);
    fz_report("kvm_tokenize", rc);
    if (rc) return;
    for (int i = 0; i < n; i++) CHECK(ids[i] >= 0 && ids[i] < kvm_tokenizer_vocab_size(t));
    char *out = NULL;
    size_t len = 0;
    CHECK(kvm_detokenize(t, ids, n, true, &out, &len) == 0);
    kvm_free(out);
    kvm_free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_part_t parts[3] = {{0}};
    int np = fz_split(data, size, parts, 3);
    char path[600], tpath[600];
    fz_write("model.bin", parts[0].data, parts[0].size, path, sizeof path);
    kvm_model_t *m = kvm_calloc(1, sizeof *m);
    if (!m) abort();
    int rc = kvm_load_llama2c(m, path);
    if (!rc) rc = kvm_model_build_rope(m);
    fz_report("kvm_load_llama2c", rc);
    if (!rc) check_model(m);
    else CHECK(rc < 0 && *kvm_errmsg());
    int vocab = rc ? 512 : m->cfg.vocab_size;
    kvm_model_free(m);
    kvm_errclear();
    if (np < 2) return 0;
    fz_write("tokenizer.bin", parts[1].data, parts[1].size, tpath, sizeof tpath);
    kvm_tokenizer_t *t = kvm_tokenizer_load_bin(tpath, vocab);
    fz_report("kvm_tokenizer_load_bin", t ? 0 : kvm_errcode());
    if (t) {
        char *text = np > 2 ? fz_cstr(parts[2].data, parts[2].size) : NULL;
        check_tokenizer(t, text ? text : "Once upon a time");
        free(text);
        kvm_tokenizer_free(t);
    } else {
        CHECK(*kvm_errmsg());
    }
    kvm_errclear();
    return 0;
}
