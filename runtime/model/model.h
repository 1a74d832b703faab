/* model.h - model configuration, weights, loading and the forward pass (L2).
 *
 * A model is loaded from either
 *   - "synthetic:<name>" (seeded weights of a known shape, synthetic.h), "mock:echo" / "mock:fail"
 *     (no weights, mock_model.h),
 *   - a llama2.c checkpoint (file, e.g. stories260K.bin) plus its tokenizer.bin, or
 *   - a Hugging Face directory: config.json + model.safetensors | model.safetensors.index.json (+ shards),
 *     tokenizer.json, tokenizer_config.json, generation_config.json.
 * Weights are mmapped and pointed into (never copied on the CPU backend). */
#ifndef KVM_MODEL_H
#define KVM_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../core/core.h"
#include "../../kernels/ops.h"

#define KVM_MAX_EOS 8
#define KVM_MAX_LAYERS 256

typedef enum kvm_arch {
    KVM_ARCH_LLAMA = 0, /* LlamaForCausalLM and llama2.c checkpoints */
    KVM_ARCH_MISTRAL,   /* MistralForCausalLM */
    KVM_ARCH_QWEN2,     /* Qwen2ForCausalLM: q/k/v biases */
    KVM_ARCH_QWEN3,     /* Qwen3ForCausalLM: per-head q_norm/k_norm before RoPE */
} kvm_arch_t;

typedef enum kvm_rope_scaling_type { KVM_ROPE_SCALING_NONE = 0, KVM_ROPE_SCALING_LINEAR, KVM_ROPE_SCALING_LLAMA3 } kvm_rope_scaling_type_t;

typedef enum kvm_chat_format {
    KVM_CHAT_NONE = 0, /* plain text (llama2.c stories) */
    KVM_CHAT_LLAMA3,   /* <|start_header_id|>role<|end_header_id|>\n\n ... <|eot_id|> */
    KVM_CHAT_CHATML,   /* <|im_start|>role\n ... <|im_end|>\n (Qwen) */
    KVM_CHAT_LLAMA2,   /* [INST] <<SYS>> ... <</SYS>> ... [/INST] */
} kvm_chat_format_t;

typedef struct kvm_config {
    kvm_arch_t arch;
    char arch_name[64];      /* "LlamaForCausalLM", ..., "llama2c" */
    int dim;                 /* hidden size */
    int hidden_dim;          /* FFN intermediate size */
    int n_layers;
    int n_heads;             /* query heads */
    int n_kv_heads;
    int head_dim;            /* may differ from dim / n_heads (Qwen3) */
    int vocab_size;
    int max_seq_len;
    float rms_eps;
    double rope_theta;
    kvm_rope_layout_t rope_layout;
    kvm_rope_scaling_type_t rope_scaling;
    double rope_factor;          /* linear and llama3 */
    double rope_low_freq_factor; /* llama3 */
    double rope_high_freq_factor;
    int rope_original_max_pos;
    bool tied_embeddings;
    bool qkv_bias;
    bool qk_norm;
    int bos_id;                  /* -1 if the model has none */
    bool add_bos;                /* prepend BOS when encoding a prompt */
    int eos_ids[KVM_MAX_EOS];    /* from config.json + generation_config.json (+ chat end token); llama2.c: 2 and BOS 1 */
    int n_eos;
    int pad_id;
    kvm_chat_format_t chat_format;
    kvm_dtype_t weight_dtype;    /* dtype of the stored matrices */
    /* defaults from generation_config.json (0 when absent) */
    float gen_temperature, gen_top_p;
    int gen_top_k;
    float gen_repetition_penalty;
} kvm_config_t;

/* A tensor view (host memory, usually inside an mmap). */
typedef struct kvm_tensor {
    const void *data;
    kvm_dtype_t dtype;
    int ndim;
    int64_t shape[4];
} kvm_tensor_t;

typedef struct kvm_layer_weights {
    kvm_tensor_t attn_norm;     /* (dim) */
    kvm_tensor_t wq;            /* (n_heads * head_dim, dim) */
    kvm_tensor_t wk;            /* (n_kv_heads * head_dim, dim) */
    kvm_tensor_t wv;            /* (n_kv_heads * head_dim, dim) */
    kvm_tensor_t wo;            /* (dim, n_heads * head_dim) */
    kvm_tensor_t bq, bk, bv;    /* (n_heads*head_dim), (n_kv_heads*head_dim) x2; Qwen2 only (data NULL otherwise) */
    kvm_tensor_t q_norm, k_norm;/* (head_dim); Qwen3 only */
    kvm_tensor_t ffn_norm;      /* (dim) */
    kvm_tensor_t w_gate;        /* (hidden_dim, dim)  llama2.c w1 */
    kvm_tensor_t w_down;        /* (dim, hidden_dim)  llama2.c w2 */
    kvm_tensor_t w_up;          /* (hidden_dim, dim)  llama2.c w3 */
} kvm_layer_weights_t;

typedef struct kvm_weights {
    kvm_tensor_t tok_emb;       /* (vocab, dim) */
    kvm_tensor_t final_norm;    /* (dim) */
    kvm_tensor_t lm_head;       /* (vocab, dim); == tok_emb when tied */
    kvm_layer_weights_t *layers;/* [n_layers] */
} kvm_weights_t;

struct kvm_tokenizer;
struct kvm_backend_model;
struct kvm_model;
struct kvm_batch_item;

/* A model whose steps are functions rather than a transformer (the mock model, mock_model.h):
 * kvm_forward hands it its batches, kvm_prompt_encode its prompts, and decoding asks it for the text
 * of its tokens. NULL for models read from files. */
typedef struct kvm_model_impl {
    int (*forward)(struct kvm_model *m, struct kvm_batch_item *items, int n_items);
    int (*encode)(const struct kvm_model *m, const char *system, const char *user, int32_t **ids, int *n);
    int (*token_bytes)(const struct kvm_model *m, int32_t prev, int32_t id, char *buf, size_t cap);
    void (*free)(struct kvm_model *m); /* frees impl_state */
} kvm_model_impl_t;

typedef struct kvm_model {
    kvm_config_t cfg;
    kvm_weights_t w;
    struct kvm_tokenizer *tok;
    kvm_mmap_t *maps;           /* weight files */
    int n_maps;
    void *owned;                /* buffers the loader allocated (synthetic weights); freed with the model */
    double *inv_freq64;         /* [head_dim/2] scaled RoPE frequencies (fp64 master) */
    float *inv_freq;            /* [head_dim/2] the same rounded to fp32: one table for forward and shifts */
    char *path;
    char name[128];             /* model id (directory or file base name) */
    uint64_t model_id;          /* hash of config + path; segments record it */
    const kvm_ops_t *ops;       /* backend the forward runs on */
    struct kvm_backend_model *bm; /* backend copies of weights + workspace (forward.c) */
    bool weights_on_device;     /* tensors already live in backend memory (synthetic models); then norm
                                   weights and biases must be F32 there, matrices any dtype */
    kvm_dtype_t device_dtype;   /* dtype of matrices uploaded to a GPU backend (BF16 default, F32 parity mode) */
    const kvm_model_impl_t *impl; /* NULL, or the functions of a model that is not a transformer */
    void *impl_state;           /* theirs; freed by impl->free in kvm_model_free */
} kvm_model_t;

/* How to load a model, parsed: what the public kvm_model_params_t (include/kvmesh.h, strings checked by
 * kvm_model_params_to_opts) becomes inside the library. Every field's zero is its default, so `{0}` or
 * designated initialisers work. The library reads no environment. */
typedef struct kvm_load_opts {
    const char *tokenizer_path; /* llama2.c: tokenizer.bin (default: tokenizer.bin or tok<vocab>.bin beside it) */
    const char *backend;        /* "auto" (default; also NULL), "cpu", "cuda" */
    bool quiet;                 /* no progress on stderr */
    kvm_dtype_t device_dtype;   /* GPU weight dtype when device_dtype_set (default BF16; F32 = parity mode); also
                                   the dtype of synthetic weights on every backend */
    bool device_dtype_set;
    kvm_dtype_t kv_dtype;       /* KV cache dtype when kv_dtype_set (default: F32 on the CPU and for F32 device
                                   weights, else the device weights' 16-bit dtype) */
    bool kv_dtype_set;
    bool no_cuda_graphs;        /* decode steps run eagerly (default: replayed as graphs where the backend can) */
    uint64_t synthetic_seed;    /* seed of synthetic:<name> weights when synthetic_seed_set (default 1234) */
    bool synthetic_seed_set;
} kvm_load_opts_t;

/* 0 if every field of o holds one of its values (backend name, dtypes); else KVM_EINVAL naming the field and
 * its values ("kv_dtype: 7 is not one of KVM_F32, KVM_F16, KVM_BF16"). NULL = defaults (0). The loaders call it
 * before reading anything. */
int kvm_load_opts_check(const kvm_load_opts_t *o);

/* The public parameters as load options: every string checked (KVM_EINVAL naming the field and its
 * values, "kv_dtype: 'bf61' is not one of f32, f16, bf16"); n_threads is applied by kvm_model_load. */
int kvm_model_params_to_opts(const kvm_model_params_t *p, kvm_load_opts_t *o);

/* Loads a model (see the header comment) from parsed options; kvm_model_load (public) is this after
 * kvm_model_params_to_opts. Returns NULL and sets the message on any error (bad options included, see
 * kvm_load_opts_check); the model is freed with kvm_model_free(). */
kvm_model_t *kvm_model_load_opts(const char *path, const kvm_load_opts_t *opts);

/* Loader entry points (model.c dispatches). Each fills m->cfg, m->w, m->maps; errors name file and tensor. */
int kvm_load_llama2c(kvm_model_t *m, const char *path);
int kvm_load_hf(kvm_model_t *m, const char *dir);
/* Parses HF config.json text into cfg (generation/tokenizer configs are merged by kvm_load_hf). */
int kvm_config_parse_hf(kvm_config_t *cfg, const char *json, const char *path_for_errors);
/* Validates cfg itself (positive sizes, divisibility, supported rope) */
int kvm_config_validate(const kvm_config_t *cfg, const char *where);
/* Builds m->inv_freq{,64} from cfg (rope scaling included). */
int kvm_model_build_rope(kvm_model_t *m);
/* Checks one tensor's presence, dtype and shape; the message names the tensor, expected and found. */
int kvm_tensor_check(const kvm_tensor_t *t, const char *name, int ndim, int64_t d0, int64_t d1);

/* Element i of a tensor as fp32. */
static inline float kvm_tensor_get(const kvm_tensor_t *t, size_t i) {
    switch (t->dtype) {
    case KVM_F32: return ((const float *)t->data)[i];
    case KVM_F16: return kvm_f16_to_f32(((const uint16_t *)t->data)[i]);
    default: return kvm_bf16_to_f32(((const uint16_t *)t->data)[i]);
    }
}

/* A model with seeded random F32 weights (normal, std 0.02 x scale) for the given config, on the given
 * backend ("cpu" when NULL); no tokenizer. For tests and examples. Fill cfg's sizes, arch flags, rope
 * fields; the rest gets defaults. NULL + message on error. Free with kvm_model_free. */
kvm_model_t *kvm_model_random(const kvm_config_t *cfg, uint64_t seed, float scale, const char *backend);

/* Human-readable one-line summary ("LlamaForCausalLM, 2 layers, dim 64, ... bf16"). */
void kvm_model_describe(const kvm_model_t *m, char *buf, size_t cap);

#endif
