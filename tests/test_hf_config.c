/* test_hf_config.c - Hugging Face config.json parsing and the HF directory loader.
 *
 * Configs are parsed from strings (real Llama-3.1 / Qwen2.5 / Qwen3 configs, in the transformers 4 and 5
 * layouts); model directories are synthesised in a temporary directory (config.json + model.safetensors
 * written with kvm_st_write from seeded values), then broken one way at a time. Every failure asserts the
 * exact status code and that the message names the file, tensor or field a user has to fix. */
#include <ftw.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "runtime/model/model.h"
#include "runtime/model/safetensors.h"
#include "runtime/model/tokenizer.h"
#include "test_common.h"

TC_TMPDIR_FIXTURE("kvm_hfcfg")

static void write_text(const char *dir, const char *name, const char *text) {
    char p[1024];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* Expects rc == code and every non-NULL fragment in the message. */
static void expect_err(int rc, int code, const char *f1, const char *f2, const char *f3) {
    const char *msg = kvm_errmsg();
    bool ok = rc == code && (!f1 || strstr(msg, f1)) && (!f2 || strstr(msg, f2)) && (!f3 || strstr(msg, f3));
    if (!ok || getenv("KVM_TEST_VERBOSE")) fprintf(stderr, "%s %d (%s): %s\n", ok ? "ok:" : "got", rc, kvm_errname(rc), msg);
    assert_int_equal(rc, code);
    if (f1) assert_non_null(strstr(msg, f1));
    if (f2) assert_non_null(strstr(msg, f2));
    if (f3) assert_non_null(strstr(msg, f3));
}

/* ---- config.json parsing ---------------------------------------------------------------------- */

static const char *k_llama31_v4 =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"attention_bias\":false,\"bos_token_id\":128000,"
    "\"eos_token_id\":[128001,128008,128009],\"hidden_act\":\"silu\",\"hidden_size\":4096,"
    "\"intermediate_size\":14336,\"max_position_embeddings\":131072,\"mlp_bias\":false,\"model_type\":\"llama\","
    "\"num_attention_heads\":32,\"num_hidden_layers\":32,\"num_key_value_heads\":8,\"rms_norm_eps\":1e-05,"
    "\"rope_scaling\":{\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,"
    "\"original_max_position_embeddings\":8192,\"rope_type\":\"llama3\"},\"rope_theta\":500000.0,"
    "\"tie_word_embeddings\":false,\"torch_dtype\":\"bfloat16\",\"vocab_size\":128256}";

static const char *k_llama31_v5 =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"bos_token_id\":128000,\"dtype\":\"bfloat16\",\"eos_token_id\":128001,"
    "\"head_dim\":128,\"hidden_act\":\"silu\",\"hidden_size\":4096,\"intermediate_size\":14336,"
    "\"max_position_embeddings\":131072,\"num_attention_heads\":32,\"num_hidden_layers\":32,"
    "\"num_key_value_heads\":8,\"pad_token_id\":null,\"rms_norm_eps\":1e-05,"
    "\"rope_parameters\":{\"factor\":8.0,\"high_freq_factor\":4.0,\"low_freq_factor\":1.0,"
    "\"original_max_position_embeddings\":8192,\"rope_theta\":500000.0,\"rope_type\":\"llama3\"},"
    "\"tie_word_embeddings\":false,\"vocab_size\":128256}\n";

static const char *k_qwen3 =
    "{\"architectures\":[\"Qwen3ForCausalLM\"],\"attention_bias\":false,\"bos_token_id\":151643,\"eos_token_id\":151645,"
    "\"head_dim\":128,\"hidden_act\":\"silu\",\"hidden_size\":1024,\"intermediate_size\":3072,"
    "\"max_position_embeddings\":40960,\"num_attention_heads\":16,\"num_hidden_layers\":28,\"num_key_value_heads\":8,"
    "\"rms_norm_eps\":1e-06,\"rope_scaling\":null,\"rope_theta\":1000000,\"sliding_window\":null,"
    "\"tie_word_embeddings\":true,\"torch_dtype\":\"bfloat16\",\"use_sliding_window\":false,\"vocab_size\":151936}";

static const char *k_qwen25 =
    "{\"architectures\":[\"Qwen2ForCausalLM\"],\"bos_token_id\":151643,\"eos_token_id\":151643,\"hidden_act\":\"silu\","
    "\"hidden_size\":3584,\"intermediate_size\":18944,\"max_position_embeddings\":131072,\"max_window_layers\":28,"
    "\"num_attention_heads\":28,\"num_hidden_layers\":28,\"num_key_value_heads\":4,\"rms_norm_eps\":1e-06,"
    "\"rope_theta\":1000000.0,\"sliding_window\":131072,\"tie_word_embeddings\":false,\"torch_dtype\":\"bfloat16\","
    "\"use_sliding_window\":false,\"vocab_size\":152064}";

static void test_llama31_config_in_transformers4_layout_is_read(void **st) {
    (void)st;
    kvm_config_t c;
    assert_int_equal(kvm_config_parse_hf(&c, k_llama31_v4, "config.json"), 0);
    assert_int_equal(c.arch, KVM_ARCH_LLAMA);
    assert_string_equal(c.arch_name, "LlamaForCausalLM");
    assert_int_equal(c.dim, 4096);
    assert_int_equal(c.hidden_dim, 14336);
    assert_int_equal(c.n_layers, 32);
    assert_int_equal(c.n_heads, 32);
    assert_int_equal(c.n_kv_heads, 8);
    assert_int_equal(c.head_dim, 128);
    assert_int_equal(c.vocab_size, 128256);
    assert_int_equal(c.max_seq_len, 131072);
    assert_true(fabsf(c.rms_eps - 1e-5f) < 1e-12f);
    assert_true(c.rope_theta == 500000.0);
    assert_int_equal(c.rope_layout, KVM_ROPE_HALF);
    assert_int_equal(c.rope_scaling, KVM_ROPE_SCALING_LLAMA3);
    assert_true(c.rope_factor == 8.0 && c.rope_low_freq_factor == 1.0 && c.rope_high_freq_factor == 4.0);
    assert_int_equal(c.rope_original_max_pos, 8192);
    assert_false(c.tied_embeddings);
    assert_false(c.qkv_bias);
    assert_false(c.qk_norm);
    assert_int_equal(c.bos_id, 128000);
    assert_int_equal(c.n_eos, 3);
    assert_int_equal(c.eos_ids[2], 128009);
    assert_int_equal(c.weight_dtype, KVM_BF16);
    assert_int_equal(kvm_config_validate(&c, "config.json"), 0);
}

static void test_llama31_config_in_transformers5_rope_parameters_layout_is_read_the_same(void **st) {
    (void)st;
    kvm_config_t a, b;
    assert_int_equal(kvm_config_parse_hf(&a, k_llama31_v4, "v4/config.json"), 0);
    assert_int_equal(kvm_config_parse_hf(&b, k_llama31_v5, "v5/config.json"), 0);
    assert_true(b.rope_theta == a.rope_theta);
    assert_int_equal(b.rope_scaling, KVM_ROPE_SCALING_LLAMA3);
    assert_true(b.rope_factor == a.rope_factor && b.rope_low_freq_factor == a.rope_low_freq_factor &&
                b.rope_high_freq_factor == a.rope_high_freq_factor);
    assert_int_equal(b.rope_original_max_pos, a.rope_original_max_pos);
    assert_int_equal(b.head_dim, a.head_dim);
    assert_int_equal(b.pad_id, -1);
    assert_int_equal(b.n_eos, 1);
}

static void test_qwen3_config_sets_qk_norm_tied_embeddings_and_its_own_head_dim(void **st) {
    (void)st;
    kvm_config_t c;
    assert_int_equal(kvm_config_parse_hf(&c, k_qwen3, "config.json"), 0);
    assert_int_equal(c.arch, KVM_ARCH_QWEN3);
    assert_true(c.qk_norm);
    assert_false(c.qkv_bias);
    assert_true(c.tied_embeddings);
    assert_int_equal(c.head_dim, 128); /* 16 x 128 = 2048 != hidden 1024 */
    assert_int_equal(c.rope_scaling, KVM_ROPE_SCALING_NONE);
    assert_true(c.rope_theta == 1e6);
    assert_int_equal(kvm_config_validate(&c, "config.json"), 0);
}

static void test_qwen25_config_sets_qkv_bias_and_default_head_dim(void **st) {
    (void)st;
    kvm_config_t c;
    assert_int_equal(kvm_config_parse_hf(&c, k_qwen25, "config.json"), 0);
    assert_int_equal(c.arch, KVM_ARCH_QWEN2);
    assert_true(c.qkv_bias);
    assert_false(c.qk_norm);
    assert_int_equal(c.head_dim, 128); /* 3584 / 28 */
    assert_int_equal(c.n_kv_heads, 4);
    assert_int_equal(c.n_eos, 1);
    assert_int_equal(c.eos_ids[0], 151643);
}

static void test_linear_rope_scaling_reads_its_factor(void **st) {
    (void)st;
    kvm_config_t c;
    const char *j = "{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
                    "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":100,"
                    "\"rope_scaling\":{\"type\":\"linear\",\"factor\":4.0}}";
    assert_int_equal(kvm_config_parse_hf(&c, j, "config.json"), 0);
    assert_int_equal(c.rope_scaling, KVM_ROPE_SCALING_LINEAR);
    assert_true(c.rope_factor == 4.0);
    assert_int_equal(c.n_kv_heads, 4); /* defaults to the query heads */
    assert_int_equal(c.head_dim, 16);
    assert_true(c.rope_theta == 10000.0);
}

static void test_config_that_is_not_json_names_file_and_line(void **st) {
    (void)st;
    kvm_config_t c;
    int rc = kvm_config_parse_hf(&c, "{\n\"hidden_size\": 64,\n\"vocab_size\": ,\n}", "/m/config.json");
    expect_err(rc, KVM_EFORMAT, "/m/config.json", "not valid JSON", "line 3");
}

static void test_unsupported_architecture_is_named(void **st) {
    (void)st;
    kvm_config_t c;
    int rc = kvm_config_parse_hf(&c, "{\"architectures\":[\"GemmaForCausalLM\"],\"hidden_size\":8}", "config.json");
    expect_err(rc, KVM_EUNSUPPORTED, "config.json", "GemmaForCausalLM", "not supported");
}

static void test_yarn_rope_scaling_is_unsupported_and_named(void **st) {
    (void)st;
    kvm_config_t c;
    char j[2048];
    snprintf(j, sizeof j, "%s", k_qwen25);
    j[strlen(j) - 1] = 0;
    strcat(j, ",\"rope_scaling\":{\"type\":\"yarn\",\"factor\":4.0,\"original_max_position_embeddings\":32768}}");
    int rc = kvm_config_parse_hf(&c, j, "config.json");
    expect_err(rc, KVM_EUNSUPPORTED, "config.json", "rope_scaling.rope_type 'yarn'", "not supported");
}

static void test_dynamic_rope_in_rope_parameters_is_unsupported_and_named(void **st) {
    (void)st;
    kvm_config_t c;
    const char *j = "{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
                    "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":100,"
                    "\"rope_parameters\":{\"rope_type\":\"dynamic\",\"factor\":2.0,\"rope_theta\":10000}}";
    expect_err(kvm_config_parse_hf(&c, j, "config.json"), KVM_EUNSUPPORTED, "rope_parameters.rope_type 'dynamic'", NULL, NULL);
}

static void test_llama3_rope_scaling_without_its_factors_names_the_missing_field(void **st) {
    (void)st;
    kvm_config_t c;
    const char *j = "{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
                    "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":100,"
                    "\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0}}";
    expect_err(kvm_config_parse_hf(&c, j, "config.json"), KVM_EFORMAT, "rope_scaling.low_freq_factor", "missing", NULL);
}

static void test_missing_required_field_is_named(void **st) {
    (void)st;
    kvm_config_t c;
    const char *j = "{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"num_hidden_layers\":2,"
                    "\"num_attention_heads\":4,\"vocab_size\":100}";
    expect_err(kvm_config_parse_hf(&c, j, "config.json"), KVM_EFORMAT, "'intermediate_size'", "missing", NULL);
}

static void test_field_of_the_wrong_type_is_named(void **st) {
    (void)st;
    kvm_config_t c;
    const char *j = "{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":\"64\",\"intermediate_size\":128,"
                    "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":100}";
    expect_err(kvm_config_parse_hf(&c, j, "config.json"), KVM_EFORMAT, "'hidden_size'", "integer", NULL);
}

static void test_other_activation_and_sliding_window_are_refused(void **st) {
    (void)st;
    kvm_config_t c;
    const char *a = "{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64,\"intermediate_size\":128,"
                    "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"vocab_size\":100,\"hidden_act\":\"gelu\"}";
    expect_err(kvm_config_parse_hf(&c, a, "config.json"), KVM_EUNSUPPORTED, "hidden_act 'gelu'", NULL, NULL);
    char j[2048];
    snprintf(j, sizeof j, "%s", k_qwen3);
    char *p = strstr(j, "\"use_sliding_window\":false");
    memcpy(p, "\"use_sliding_window\":true ", 26);
    expect_err(kvm_config_parse_hf(&c, j, "config.json"), KVM_EUNSUPPORTED, "use_sliding_window", NULL, NULL);
}

static void test_validate_names_heads_not_divisible_by_kv_heads(void **st) {
    (void)st;
    kvm_config_t c;
    assert_int_equal(kvm_config_parse_hf(&c, k_qwen3, "config.json"), 0);
    c.n_kv_heads = 5;
    expect_err(kvm_config_validate(&c, "m/config.json"), KVM_EFORMAT, "m/config.json", "num_attention_heads (16)",
               "num_key_value_heads (5)");
}

static void test_validate_names_odd_head_dim_and_nonpositive_sizes(void **st) {
    (void)st;
    kvm_config_t c;
    assert_int_equal(kvm_config_parse_hf(&c, k_qwen3, "config.json"), 0);
    c.head_dim = 7;
    expect_err(kvm_config_validate(&c, "config.json"), KVM_EFORMAT, "head_dim (7)", "even", NULL);
    assert_int_equal(kvm_config_parse_hf(&c, k_qwen3, "config.json"), 0);
    c.hidden_dim = 0;
    expect_err(kvm_config_validate(&c, "config.json"), KVM_EFORMAT, "intermediate_size", "positive", NULL);
    assert_int_equal(kvm_config_parse_hf(&c, k_qwen3, "config.json"), 0);
    c.eos_ids[0] = 200000;
    expect_err(kvm_config_validate(&c, "config.json"), KVM_ERANGE, "eos_token_id 200000", "vocab_size 151936", NULL);
}

/* ---- synthetic model directories -------------------------------------------------------------- */

typedef struct synth {
    const char *arch;
    int dim, ffn, layers, heads, kv, head_dim, vocab;
    bool tied;
    kvm_dtype_t dtype;
    /* config.json overrides and breakage */
    int cfg_vocab, cfg_layers, cfg_dim;
    const char *extra_cfg;      /* appended inside the config object, starting with ',' */
    const char *omit;           /* tensor not written */
    const char *reshape;        /* tensor whose first dimension is doubled */
    const char *extra_tensor;   /* an extra [4] tensor */
    int shards;                 /* 2 = split over two files + index */
} synth_t;

static synth_t synth_llama(void) {
    return (synth_t){.arch = "LlamaForCausalLM", .dim = 32, .ffn = 48, .layers = 2, .heads = 4, .kv = 2,
                     .head_dim = 8, .vocab = 40, .dtype = KVM_F32};
}

/* The value of element i of a tensor: seeded by the name, never zero. */
static float synth_value(const char *name, size_t i) {
    uint64_t h = kvm_hash64(name, strlen(name), KVM_HASH_SEED) ^ (i * 0x9E3779B97F4A7C15ULL);
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ULL;
    h ^= h >> 32;
    return (float)((double)(h % 20000) / 10000.0 - 1.0) + 0.01f;
}

typedef struct synth_files {
    kvm_st_entry_t e[64];
    void *bufs[64];
    int n;
} synth_files_t;

static void add_tensor(synth_files_t *sf, const synth_t *s, const char *name, int ndim, int64_t d0, int64_t d1) {
    if (s->omit && !strcmp(s->omit, name)) return;
    kvm_st_entry_t *e = &sf->e[sf->n];
    e->name = strdup(name);
    e->dtype = s->dtype;
    e->ndim = ndim;
    e->shape[0] = (s->reshape && !strcmp(s->reshape, name)) ? 2 * d0 : d0;
    e->shape[1] = d1;
    size_t n = (size_t)e->shape[0] * (ndim == 2 ? (size_t)d1 : 1);
    void *b = malloc(n * 4);
    for (size_t i = 0; i < n; i++) {
        float v = synth_value(name, i);
        if (s->dtype == KVM_F32) ((float *)b)[i] = v;
        else if (s->dtype == KVM_BF16) ((uint16_t *)b)[i] = kvm_f32_to_bf16(v);
        else ((uint16_t *)b)[i] = kvm_f32_to_f16(v);
    }
    e->data = b;
    sf->bufs[sf->n++] = b;
}

/* Writes dir/config.json and the weights of s; returns the directory path (static buffer). */
static const char *write_model(const char *name, const synth_t *s) {
    static char dir[512];
    snprintf(dir, sizeof dir, "%s/%s", g_dir, name);
    assert_int_equal(mkdir(dir, 0755), 0);
    char cfg[2048];
    snprintf(cfg, sizeof cfg,
             "{\"architectures\":[\"%s\"],\"hidden_size\":%d,\"intermediate_size\":%d,\"num_hidden_layers\":%d,"
             "\"num_attention_heads\":%d,\"num_key_value_heads\":%d,\"head_dim\":%d,\"vocab_size\":%d,"
             "\"max_position_embeddings\":256,\"rms_norm_eps\":1e-5,\"rope_theta\":10000.0,"
             "\"tie_word_embeddings\":%s,\"bos_token_id\":1,\"eos_token_id\":2%s}",
             s->arch, s->cfg_dim ? s->cfg_dim : s->dim, s->ffn, s->cfg_layers ? s->cfg_layers : s->layers, s->heads,
             s->kv, s->head_dim, s->cfg_vocab ? s->cfg_vocab : s->vocab, s->tied ? "true" : "false",
             s->extra_cfg ? s->extra_cfg : "");
    write_text(dir, "config.json", cfg);

    synth_files_t sf = {0};
    const int64_t D = s->dim, F = s->ffn, V = s->vocab, QD = s->heads * s->head_dim, KD = s->kv * s->head_dim;
    bool qwen2 = !strcmp(s->arch, "Qwen2ForCausalLM"), qwen3 = !strcmp(s->arch, "Qwen3ForCausalLM");
    add_tensor(&sf, s, "model.embed_tokens.weight", 2, V, D);
    char nm[128];
    for (int l = 0; l < s->layers; l++) {
#define T(suffix, nd, a, b)                                                   \
        snprintf(nm, sizeof nm, "model.layers.%d.%s", l, suffix);           \
        add_tensor(&sf, s, nm, nd, a, b)
        T("input_layernorm.weight", 1, D, 0);
        T("self_attn.q_proj.weight", 2, QD, D);
        T("self_attn.k_proj.weight", 2, KD, D);
        T("self_attn.v_proj.weight", 2, KD, D);
        T("self_attn.o_proj.weight", 2, D, QD);
        if (qwen2) {
            T("self_attn.q_proj.bias", 1, QD, 0);
            T("self_attn.k_proj.bias", 1, KD, 0);
            T("self_attn.v_proj.bias", 1, KD, 0);
        }
        if (qwen3) {
            T("self_attn.q_norm.weight", 1, s->head_dim, 0);
            T("self_attn.k_norm.weight", 1, s->head_dim, 0);
        }
        T("post_attention_layernorm.weight", 1, D, 0);
        T("mlp.gate_proj.weight", 2, F, D);
        T("mlp.up_proj.weight", 2, F, D);
        T("mlp.down_proj.weight", 2, D, F);
#undef T
    }
    add_tensor(&sf, s, "model.norm.weight", 1, D, 0);
    if (!s->tied) add_tensor(&sf, s, "lm_head.weight", 2, V, D);
    if (s->extra_tensor) add_tensor(&sf, s, s->extra_tensor, 1, 4, 0);

    char p[600];
    if (s->shards == 2) {
        int half = sf.n / 2;
        snprintf(p, sizeof p, "%s/model-00001-of-00002.safetensors", dir);
        assert_int_equal(kvm_st_write(p, sf.e, half), 0);
        snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", dir);
        assert_int_equal(kvm_st_write(p, sf.e + half, sf.n - half), 0);
        char *idx = malloc(65536);
        size_t o = (size_t)snprintf(idx, 65536, "{\"metadata\":{\"total_size\":0},\"weight_map\":{");
        for (int i = 0; i < sf.n; i++)
            o += (size_t)snprintf(idx + o, 65536 - o, "%s\"%s\":\"model-0000%d-of-00002.safetensors\"", i ? "," : "",
                                  sf.e[i].name, i < half ? 1 : 2);
        snprintf(idx + o, 65536 - o, "}}");
        write_text(dir, "model.safetensors.index.json", idx);
        free(idx);
    } else {
        snprintf(p, sizeof p, "%s/model.safetensors", dir);
        assert_int_equal(kvm_st_write(p, sf.e, sf.n), 0);
    }
    for (int i = 0; i < sf.n; i++) {
        free((void *)sf.e[i].name);
        free(sf.bufs[i]);
    }
    return dir;
}

static kvm_model_t *new_model(void) {
    kvm_model_t *m = kvm_calloc(1, sizeof *m);
    assert_non_null(m);
    return m;
}

/* True if p lies inside one of the model's mappings. */
static bool in_maps(const kvm_model_t *m, const void *p) {
    for (int i = 0; i < m->n_maps; i++) {
        const char *b = m->maps[i].data;
        if ((const char *)p >= b && (const char *)p < b + m->maps[i].size) return true;
    }
    return false;
}

static void test_valid_synthetic_llama_loads_with_tensors_pointing_into_the_mapping(void **st) {
    (void)st;
    synth_t s = synth_llama();
    const char *dir = write_model("llama_ok", &s);
    kvm_model_t *m = new_model();
    int rc = kvm_load_hf(m, dir);
    if (rc) fprintf(stderr, "%s\n", kvm_errmsg());
    assert_int_equal(rc, 0);
    assert_string_equal(m->name, "llama_ok");
    assert_int_equal(m->n_maps, 1);
    assert_null(m->tok); /* no tokenizer.json: the caller decides */
    assert_int_equal(m->cfg.weight_dtype, KVM_F32);
    assert_int_equal(m->cfg.n_layers, 2);
    assert_true(in_maps(m, m->w.tok_emb.data));
    assert_true(in_maps(m, m->w.lm_head.data));
    assert_ptr_not_equal(m->w.lm_head.data, m->w.tok_emb.data);
    assert_true(in_maps(m, m->w.final_norm.data));
    for (int l = 0; l < 2; l++) {
        const kvm_layer_weights_t *lw = &m->w.layers[l];
        const kvm_tensor_t *all[] = {&lw->attn_norm, &lw->wq, &lw->wk, &lw->wv, &lw->wo, &lw->ffn_norm, &lw->w_gate, &lw->w_up, &lw->w_down};
        for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) assert_true(in_maps(m, all[i]->data));
        assert_null(lw->bq.data);
        assert_null(lw->q_norm.data);
    }
    /* values are the written ones: the pointer leads to the right tensor */
    assert_true(kvm_tensor_get(&m->w.layers[1].wk, 17) == synth_value("model.layers.1.self_attn.k_proj.weight", 17));
    assert_int_equal(m->w.layers[1].wo.shape[0], 32);
    assert_int_equal(m->w.layers[1].wo.shape[1], 32);
    assert_int_equal(m->cfg.bos_id, 1);
    assert_true(m->cfg.add_bos);
    kvm_model_free(m);
}

static void test_tied_embeddings_share_the_embedding_as_lm_head(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.tied = true;
    const char *dir = write_model("llama_tied", &s);
    kvm_model_t *m = new_model();
    assert_int_equal(kvm_load_hf(m, dir), 0);
    assert_ptr_equal(m->w.lm_head.data, m->w.tok_emb.data);
    kvm_model_free(m);
}

static void test_qwen2_biases_and_qwen3_qk_norms_load_in_bf16_and_f16(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.arch = "Qwen2ForCausalLM";
    s.dtype = KVM_F16;
    const char *dir = write_model("qwen2_ok", &s);
    kvm_model_t *m = new_model();
    int rc = kvm_load_hf(m, dir);
    if (rc) fprintf(stderr, "%s\n", kvm_errmsg());
    assert_int_equal(rc, 0);
    assert_int_equal(m->cfg.weight_dtype, KVM_F16);
    assert_true(in_maps(m, m->w.layers[0].bk.data));
    assert_int_equal(m->w.layers[0].bk.shape[0], 16);
    assert_int_equal(m->cfg.bos_id, -1); /* Qwen has no BOS */
    assert_false(m->cfg.add_bos);
    kvm_model_free(m);

    s.arch = "Qwen3ForCausalLM";
    s.dtype = KVM_BF16;
    s.head_dim = 16; /* 4 x 16 = 64 != hidden 32 */
    dir = write_model("qwen3_ok", &s);
    m = new_model();
    rc = kvm_load_hf(m, dir);
    if (rc) fprintf(stderr, "%s\n", kvm_errmsg());
    assert_int_equal(rc, 0);
    assert_int_equal(m->cfg.weight_dtype, KVM_BF16);
    assert_int_equal(m->w.layers[1].q_norm.shape[0], 16);
    assert_int_equal(m->w.layers[0].wq.shape[0], 64);
    float want = kvm_bf16_to_f32(kvm_f32_to_bf16(synth_value("model.layers.1.self_attn.k_norm.weight", 3)));
    assert_true(kvm_tensor_get(&m->w.layers[1].k_norm, 3) == want);
    kvm_model_free(m);
}

static void test_sharded_model_maps_each_shard_once(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.shards = 2;
    const char *dir = write_model("sharded", &s);
    kvm_model_t *m = new_model();
    int rc = kvm_load_hf(m, dir);
    if (rc) fprintf(stderr, "%s\n", kvm_errmsg());
    assert_int_equal(rc, 0);
    assert_int_equal(m->n_maps, 2);
    const char *b0 = m->maps[0].data, *b1 = m->maps[1].data;
    const char *emb = m->w.tok_emb.data, *head = m->w.lm_head.data;
    assert_true(emb >= b0 && emb < b0 + m->maps[0].size);   /* first tensor written: shard 1 */
    assert_true(head >= b1 && head < b1 + m->maps[1].size); /* last: shard 2 */
    assert_true(kvm_tensor_get(&m->w.lm_head, 5) == synth_value("lm_head.weight", 5));
    kvm_model_free(m);
}

static void test_shard_named_in_the_index_but_absent_is_not_found(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.shards = 2;
    const char *dir = write_model("shard_missing", &s);
    char p[600];
    snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", dir);
    assert_int_equal(remove(p), 0);
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_ENOENT, "model.safetensors.index.json", "model-00002-of-00002.safetensors", NULL);
    kvm_model_free(m);
}

static void test_index_that_disagrees_with_its_shards_is_rejected(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.shards = 2;
    const char *dir = write_model("shard_lies", &s);
    char p[600], *text;
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    assert_int_equal(kvm_read_file(p, &text, NULL, 0), 0);
    /* move lm_head (in shard 2) to shard 1 in the index */
    char *at = strstr(text, "\"lm_head.weight\":\"model-00002");
    assert_non_null(at);
    at[strlen("\"lm_head.weight\":\"model-0000")] = '1';
    write_text(dir, "model.safetensors.index.json", text);
    kvm_free(text);
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_EFORMAT, "weight_map puts tensor 'lm_head.weight'", "does not contain it", NULL);
    kvm_model_free(m);
}

static void test_missing_tensor_is_named(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.omit = "model.layers.1.mlp.up_proj.weight";
    const char *dir = write_model("missing", &s);
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_ENOENT, "model.safetensors", "tensor 'model.layers.1.mlp.up_proj.weight' not found",
               NULL);
    kvm_model_free(m);
}

static void test_missing_qwen2_bias_says_why_it_is_needed(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.arch = "Qwen2ForCausalLM";
    s.omit = "model.layers.0.self_attn.v_proj.bias";
    const char *dir = write_model("missing_bias", &s);
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_ENOENT, "'model.layers.0.self_attn.v_proj.bias' not found", "q/k/v projection biases",
               NULL);
    kvm_model_free(m);
}

static void test_untied_model_without_lm_head_names_tie_word_embeddings(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.omit = "lm_head.weight";
    const char *dir = write_model("no_head", &s);
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_ENOENT, "'lm_head.weight' not found", "tie_word_embeddings", NULL);
    kvm_model_free(m);
}

static void test_wrong_shape_names_tensor_expected_and_found(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.reshape = "model.layers.0.self_attn.k_proj.weight";
    const char *dir = write_model("wrong_shape", &s);
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_ESHAPE, "tensor 'model.layers.0.self_attn.k_proj.weight' has shape [32, 32]",
               "[num_key_value_heads*head_dim, hidden_size] = [16, 32]", "num_key_value_heads*head_dim = 16 disagrees");
    kvm_model_free(m);
}

static void test_vocab_size_contradicting_the_embedding_names_both(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.cfg_vocab = 64;
    const char *dir = write_model("vocab_mismatch", &s);
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_ESHAPE, "config.json vocab_size = 64 disagrees",
               "'model.embed_tokens.weight' has shape [40, 32]", "dimension 0 (40)");
    kvm_model_free(m);
}

static void test_hidden_size_contradicting_the_weights_names_both(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.cfg_dim = 48; /* head_dim is explicit, so only the weights can disagree */
    const char *dir = write_model("dim_mismatch", &s);
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_ESHAPE, "config.json hidden_size = 48 disagrees", "model.embed_tokens.weight", NULL);
    kvm_model_free(m);
}

static void test_norm_length_contradicting_hidden_size_is_named(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.reshape = "model.norm.weight";
    const char *dir = write_model("norm_mismatch", &s);
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_ESHAPE, "'model.norm.weight' has shape [64]", "config.json hidden_size = 32 disagrees",
               NULL);
    kvm_model_free(m);
}

static void test_fewer_layers_in_config_than_in_weights_is_named(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.layers = 3;
    s.cfg_layers = 2;
    const char *dir = write_model("extra_layers", &s);
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_EMODEL, "model.layers.2.", "num_hidden_layers = 2", NULL);
    kvm_model_free(m);
}

static void test_more_layers_in_config_than_in_weights_names_the_missing_tensor(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.cfg_layers = 3;
    const char *dir = write_model("fewer_layers", &s);
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_ENOENT, "'model.layers.2.input_layernorm.weight' not found", "num_hidden_layers = 3",
               NULL);
    kvm_model_free(m);
}

static void test_weights_of_another_architecture_are_refused(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.extra_tensor = "model.layers.0.self_attn.q_norm.weight"; /* Qwen3 weights under a Llama config */
    const char *dir = write_model("wrong_arch", &s);
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_EMODEL, "'model.layers.0.self_attn.q_norm.weight'", "LlamaForCausalLM", NULL);
    kvm_model_free(m);
}

static void test_unknown_dtype_in_the_weights_is_named(void **st) {
    (void)st;
    synth_t s = synth_llama();
    const char *dir = write_model("i64", &s);
    char p[600];
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    /* replace the whole file with one that holds an I64 tensor */
    FILE *f = fopen(p, "wb");
    const char *h = "{\"model.embed_tokens.weight\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]}}";
    uint64_t n = (strlen(h) + 7) / 8 * 8;
    for (int i = 0; i < 8; i++) fputc((int)((n >> (8 * i)) & 0xff), f);
    fputs(h, f);
    for (size_t i = strlen(h); i < n; i++) fputc(' ', f);
    for (int i = 0; i < 16; i++) fputc(1, f);
    fclose(f);
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_EDTYPE, "model.safetensors", "'model.embed_tokens.weight'", "I64");
    kvm_model_free(m);
}

static void test_directory_without_config_json_is_not_a_model(void **st) {
    (void)st;
    char dir[512];
    snprintf(dir, sizeof dir, "%s/empty", g_dir);
    assert_int_equal(mkdir(dir, 0755), 0);
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_ENOENT, "no config.json", dir, NULL);
    kvm_model_free(m);
}

static void test_pytorch_bin_weights_are_refused_with_the_fix(void **st) {
    (void)st;
    synth_t s = synth_llama();
    const char *dir = write_model("pt_only", &s);
    char p[600], q[600];
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    snprintf(q, sizeof q, "%s/pytorch_model.bin", dir);
    assert_int_equal(rename(p, q), 0);
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_EUNSUPPORTED, "pytorch_model.bin", "safetensors", NULL);
    kvm_model_free(m);
}

static void test_config_json_that_is_not_json_fails_the_load_naming_it(void **st) {
    (void)st;
    synth_t s = synth_llama();
    const char *dir = write_model("bad_json", &s);
    write_text(dir, "config.json", "{\"architectures\": [\"LlamaForCausalLM\"],,}");
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_EFORMAT, "bad_json/config.json", "not valid JSON", NULL);
    kvm_model_free(m);
}

static void test_generation_and_tokenizer_configs_are_merged(void **st) {
    (void)st;
    synth_t s = synth_llama();
    s.arch = "Qwen3ForCausalLM";
    const char *dir = write_model("qwen_chat", &s);
    write_text(dir, "generation_config.json",
               "{\"bos_token_id\":1,\"eos_token_id\":[2,3],\"pad_token_id\":4,\"do_sample\":true,"
               "\"temperature\":0.6,\"top_k\":20,\"top_p\":0.95,\"repetition_penalty\":1.1}");
    write_text(dir, "tokenizer_config.json",
               "{\"add_bos_token\":false,\"bos_token\":null,\"eos_token\":\"<|im_end|>\","
               "\"added_tokens_decoder\":{\"5\":{\"content\":\"<|im_start|>\",\"special\":true},"
               "\"6\":{\"content\":\"<|im_end|>\",\"special\":true}},"
               "\"chat_template\":\"{% for m in messages %}<|im_start|>{{ m.role }}\\n{{ m.content }}<|im_end|>\\n{% endfor %}\"}");
    kvm_model_t *m = new_model();
    int rc = kvm_load_hf(m, dir);
    if (rc) fprintf(stderr, "%s\n", kvm_errmsg());
    assert_int_equal(rc, 0);
    const kvm_config_t *c = &m->cfg;
    assert_int_equal(c->chat_format, KVM_CHAT_CHATML);
    assert_int_equal(c->bos_id, -1);
    assert_false(c->add_bos);
    assert_int_equal(c->n_eos, 3); /* 2 (config), 3 (generation config), 6 = <|im_end|> */
    assert_int_equal(c->eos_ids[0], 2);
    assert_int_equal(c->eos_ids[1], 3);
    assert_int_equal(c->eos_ids[2], 6);
    assert_int_equal(c->pad_id, 4);
    assert_true(fabsf(c->gen_temperature - 0.6f) < 1e-6f);
    assert_int_equal(c->gen_top_k, 20);
    assert_true(fabsf(c->gen_top_p - 0.95f) < 1e-6f);
    assert_true(fabsf(c->gen_repetition_penalty - 1.1f) < 1e-6f);
    kvm_model_free(m);
}

static void test_llama3_chat_template_in_jinja_file_adds_eot_to_eos(void **st) {
    (void)st;
    synth_t s = synth_llama();
    const char *dir = write_model("llama_chat", &s);
    write_text(dir, "tokenizer_config.json",
               "{\"bos_token\":\"<|begin_of_text|>\",\"added_tokens_decoder\":{\"0\":{\"content\":\"<|begin_of_text|>\"},"
               "\"9\":{\"content\":\"<|eot_id|>\"}}}");
    write_text(dir, "chat_template.jinja", "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>' }}");
    write_text(dir, "generation_config.json", "{\"do_sample\":false,\"temperature\":0.6}");
    kvm_model_t *m = new_model();
    int rc = kvm_load_hf(m, dir);
    if (rc) fprintf(stderr, "%s\n", kvm_errmsg());
    assert_int_equal(rc, 0);
    assert_int_equal(m->cfg.chat_format, KVM_CHAT_LLAMA3);
    assert_int_equal(m->cfg.bos_id, 0);
    assert_true(m->cfg.add_bos);
    assert_int_equal(m->cfg.n_eos, 2);
    assert_int_equal(m->cfg.eos_ids[1], 9);
    assert_true(m->cfg.gen_temperature == 0.0f); /* do_sample false = greedy */
    kvm_model_free(m);
}

static void test_generation_config_that_is_not_json_is_named(void **st) {
    (void)st;
    synth_t s = synth_llama();
    const char *dir = write_model("bad_gen", &s);
    write_text(dir, "generation_config.json", "{\"eos_token_id\": [1, 2}");
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_EFORMAT, "generation_config.json", "not valid JSON", NULL);
    kvm_model_free(m);
}

static void test_broken_tokenizer_json_fails_the_load_naming_it(void **st) {
    (void)st;
    synth_t s = synth_llama();
    const char *dir = write_model("bad_tok", &s);
    write_text(dir, "tokenizer.json", "{\"model\": ");
    kvm_model_t *m = new_model();
    int rc = kvm_load_hf(m, dir);
    if (rc == 0 || !strstr(kvm_errmsg(), "tokenizer.json")) fprintf(stderr, "got %d: %s\n", rc, kvm_errmsg());
    assert_true(rc < 0);
    assert_non_null(strstr(kvm_errmsg(), "tokenizer.json"));
    assert_null(m->tok);
    kvm_model_free(m);
}

/* The real Llama 3 tokenizer (fetched by scripts/fetch-tokenizers.sh into build-deps/tokenizers). */
static bool llama3_tokenizer(char *tj, char *tc, size_t cap) {
    snprintf(tj, cap, "%s/build-deps/tokenizers/llama3/tokenizer.json", KVM_SOURCE_DIR);
    snprintf(tc, cap, "%s/build-deps/tokenizers/llama3/tokenizer_config.json", KVM_SOURCE_DIR);
    if (kvm_file_exists(tj) && kvm_file_exists(tc)) return true;
    fprintf(stderr, "SKIPPED: %s not found (run scripts/fetch-tokenizers.sh)\n", tj);
    return false;
}

static void link_into(const char *dir, const char *target, const char *name) {
    char p[700];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    assert_int_equal(symlink(target, p), 0);
}

static void test_real_llama3_tokenizer_sets_bos_chat_format_and_end_of_turn(void **st) {
    (void)st;
    char tj[600], tc[600];
    if (!llama3_tokenizer(tj, tc, sizeof tj)) skip();
    synth_t s = {.arch = "LlamaForCausalLM", .dim = 8, .ffn = 8, .layers = 1, .heads = 2, .kv = 1, .head_dim = 4,
                 .vocab = 128256, .tied = true, .dtype = KVM_BF16};
    const char *dir = write_model("llama3_tok", &s);
    link_into(dir, tj, "tokenizer.json");
    link_into(dir, tc, "tokenizer_config.json");
    kvm_model_t *m = new_model();
    int rc = kvm_load_hf(m, dir);
    if (rc) fprintf(stderr, "%s\n", kvm_errmsg());
    assert_int_equal(rc, 0);
    assert_non_null(m->tok);
    const kvm_config_t *c = &m->cfg;
    assert_int_equal(c->chat_format, KVM_CHAT_LLAMA3);
    assert_int_equal(c->bos_id, 128000);
    /* the tokenizer decides (this npm copy's post_processor adds no BOS, unlike Meta's file) */
    assert_int_equal(c->add_bos, kvm_tokenizer_adds_bos(m->tok));
    bool eot = false, eot_text = false;
    for (int i = 0; i < c->n_eos; i++) {
        eot |= c->eos_ids[i] == 128009;
        eot_text |= c->eos_ids[i] == 128001;
    }
    assert_true(eot);
    assert_true(eot_text);
    kvm_model_free(m);
}

static void test_tokenizer_larger_than_the_vocabulary_is_refused(void **st) {
    (void)st;
    char tj[600], tc[600];
    if (!llama3_tokenizer(tj, tc, sizeof tj)) skip();
    synth_t s = synth_llama();
    const char *dir = write_model("small_vocab_tok", &s);
    link_into(dir, tj, "tokenizer.json");
    kvm_model_t *m = new_model();
    expect_err(kvm_load_hf(m, dir), KVM_EMODEL, "tokenizer.json has 128256 tokens", "vocab_size = 40", NULL);
    kvm_model_free(m);
}

int main(void) {
    kvm_log_set_level(KVM_LOG_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama31_config_in_transformers4_layout_is_read),
        cmocka_unit_test(test_llama31_config_in_transformers5_rope_parameters_layout_is_read_the_same),
        cmocka_unit_test(test_qwen3_config_sets_qk_norm_tied_embeddings_and_its_own_head_dim),
        cmocka_unit_test(test_qwen25_config_sets_qkv_bias_and_default_head_dim),
        cmocka_unit_test(test_linear_rope_scaling_reads_its_factor),
        cmocka_unit_test(test_config_that_is_not_json_names_file_and_line),
        cmocka_unit_test(test_unsupported_architecture_is_named),
        cmocka_unit_test(test_yarn_rope_scaling_is_unsupported_and_named),
        cmocka_unit_test(test_dynamic_rope_in_rope_parameters_is_unsupported_and_named),
        cmocka_unit_test(test_llama3_rope_scaling_without_its_factors_names_the_missing_field),
        cmocka_unit_test(test_missing_required_field_is_named),
        cmocka_unit_test(test_field_of_the_wrong_type_is_named),
        cmocka_unit_test(test_other_activation_and_sliding_window_are_refused),
        cmocka_unit_test(test_validate_names_heads_not_divisible_by_kv_heads),
        cmocka_unit_test(test_validate_names_odd_head_dim_and_nonpositive_sizes),
        cmocka_unit_test(test_valid_synthetic_llama_loads_with_tensors_pointing_into_the_mapping),
        cmocka_unit_test(test_tied_embeddings_share_the_embedding_as_lm_head),
        cmocka_unit_test(test_qwen2_biases_and_qwen3_qk_norms_load_in_bf16_and_f16),
        cmocka_unit_test(test_sharded_model_maps_each_shard_once),
        cmocka_unit_test(test_shard_named_in_the_index_but_absent_is_not_found),
        cmocka_unit_test(test_index_that_disagrees_with_its_shards_is_rejected),
        cmocka_unit_test(test_missing_tensor_is_named),
        cmocka_unit_test(test_missing_qwen2_bias_says_why_it_is_needed),
        cmocka_unit_test(test_untied_model_without_lm_head_names_tie_word_embeddings),
        cmocka_unit_test(test_wrong_shape_names_tensor_expected_and_found),
        cmocka_unit_test(test_vocab_size_contradicting_the_embedding_names_both),
        cmocka_unit_test(test_hidden_size_contradicting_the_weights_names_both),
        cmocka_unit_test(test_norm_length_contradicting_hidden_size_is_named),
        cmocka_unit_test(test_fewer_layers_in_config_than_in_weights_is_named),
        cmocka_unit_test(test_more_layers_in_config_than_in_weights_names_the_missing_tensor),
        cmocka_unit_test(test_weights_of_another_architecture_are_refused),
        cmocka_unit_test(test_unknown_dtype_in_the_weights_is_named),
        cmocka_unit_test(test_directory_without_config_json_is_not_a_model),
        cmocka_unit_test(test_pytorch_bin_weights_are_refused_with_the_fix),
        cmocka_unit_test(test_config_json_that_is_not_json_fails_the_load_naming_it),
        cmocka_unit_test(test_generation_and_tokenizer_configs_are_merged),
        cmocka_unit_test(test_llama3_chat_template_in_jinja_file_adds_eot_to_eos),
        cmocka_unit_test(test_generation_config_that_is_not_json_is_named),
        cmocka_unit_test(test_broken_tokenizer_json_fails_the_load_naming_it),
        cmocka_unit_test(test_real_llama3_tokenizer_sets_bos_chat_format_and_end_of_turn),
        cmocka_unit_test(test_tokenizer_larger_than_the_vocabulary_is_refused),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
