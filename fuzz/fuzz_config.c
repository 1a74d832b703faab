/* fuzz_config.c - libFuzzer target: a Hugging Face model directory's JSON files (runtime/model/config.c,
 * hf_load.c).
 *
 * The input is up to four files cut at FZ_SEP ("\n@@\n"): config.json, generation_config.json,
 * tokenizer_config.json and model.safetensors; an empty (or missing) part means the file is absent. The
 * config text is parsed alone (kvm_config_parse_hf + kvm_config_validate), then the directory is loaded as
 * kvm_model_load does it (kvm_load_hf, the rope tables), so the checks of the weights against the config are
 * reached too (fuzz/seeds.py writes tiny models whose weights match). A load that succeeds must hand out a
 * config that validates and tensors whose every element is readable. */
#include "fuzz_util.h"

#include "runtime/core/core.h"
#include "runtime/model/model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const k_files[FZ_MAX_PARTS] = {"config.json", "generation_config.json", "tokenizer_config.json",
                                                  "model.safetensors"};
static char g_dir[512];
static volatile float g_sink;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    fz_init_library();
    fz_mkdir("hf", g_dir, sizeof g_dir);
    return 0;
}

#define CHECK(cond) FZ_CHECK("fuzz_config", cond)

static void touch_tensor(const kvm_tensor_t *t) {
    if (!t->data) return;
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    if (n) g_sink += kvm_tensor_get(t, 0) + kvm_tensor_get(t, n - 1);
}

static void check_loaded(const kvm_model_t *m) {
    CHECK(kvm_config_validate(&m->cfg, "loaded") == 0);
    CHECK(m->cfg.n_eos >= 0 && m->cfg.n_eos <= KVM_MAX_EOS);
    touch_tensor(&m->w.tok_emb);
    touch_tensor(&m->w.final_norm);
    touch_tensor(&m->w.lm_head);
    for (int l = 0; l < m->cfg.n_layers; l++) {
        const kvm_layer_weights_t *lw = &m->w.layers[l];
        const kvm_tensor_t *ts[] = {&lw->attn_norm, &lw->wq, &lw->wk, &lw->wv, &lw->wo, &lw->bq, &lw->bk, &lw->bv,
                                    &lw->q_norm, &lw->k_norm, &lw->ffn_norm, &lw->w_gate, &lw->w_up, &lw->w_down};
        for (size_t i = 0; i < sizeof ts / sizeof *ts; i++) touch_tensor(ts[i]);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_part_t parts[FZ_MAX_PARTS] = {{0}};
    int n = fz_split(data, size, parts, FZ_MAX_PARTS);

    char *text = fz_cstr(parts[0].data, parts[0].size);
    kvm_config_t cfg;
    if (kvm_config_parse_hf(&cfg, text, "config.json") == 0) (void)kvm_config_validate(&cfg, "config.json");
    else CHECK(*kvm_errmsg());
    free(text);
    kvm_errclear();

    char path[600];
    for (int i = 0; i < FZ_MAX_PARTS; i++) {
        char name[64];
        snprintf(name, sizeof name, "hf/%s", k_files[i]);
        if (i < n && parts[i].size) fz_write(name, parts[i].data, parts[i].size, path, sizeof path);
        else fz_unlink(name);
    }
    kvm_model_t *m = kvm_calloc(1, sizeof *m);
    if (!m) abort();
    int rc = kvm_load_hf(m, g_dir);
    if (!rc) rc = kvm_model_build_rope(m);
    fz_report("kvm_load_hf", rc);
    if (!rc) check_loaded(m);
    else CHECK(rc < 0 && *kvm_errmsg());
    kvm_model_free(m);
    kvm_errclear();
    return 0;
}
