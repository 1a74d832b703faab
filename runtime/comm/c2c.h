/* c2c.h - C2C (Cache-to-Cache, Fu et al., arXiv:2510.03215): a trained fuser that projects a sharer model's
 * KV cache into a receiver model's cache of the same prompt at the same positions (L3, beside KVCOMM).
 * The contract is ../shared/spec/c2c.md; docs/c2c.md says what kvmesh builds of it.
 *
 * A fuser is two files (spec §7): <name>.c2c.json (the config) and the .c2c.safetensors it names. kvm_c2c_load
 * reads both with every check of spec §7 (keys and values of the config, every tensor's name, shape and dtype,
 * no missing or extra tensors, gate signs, the weights' SHA-256, and, given the models, the pairing), then copies
 * the weights to a backend once. kvm_c2c_fuse_layer / kvm_c2c_fuse apply it to a receiver's paged cache in place
 * (spec §6): per receiver layer and branch (K, V) whose gate is open, the sharer's rows of layer layer_map[l] and
 * the receiver's rows are gathered, run through the fuser (spec §2.2: in -> trunk FFN -> {proj FFN -> out,
 * wgt FFN -> wgt_head -> sigmoid}), and receiver += w * y is stored rounded once to the cache dtype. A closed gate
 * (logit <= 0) is an exact identity: nothing is read, launched or written for that branch.
 *
 * Every computation runs on the backend's op table (matmul, rmsnorm, add, and the C2C ops c2c_gather,
 * gelu_erf, c2c_residual), so the CPU path is the reference of the CUDA one. fp32 activations, weights in the
 * file's dtype (bf16 / f16 / f32), norms and biases fp32.
 *
 * Threads: a fuser is used by one thread at a time (its scratch is shared by its calls). */
#ifndef KVM_COMM_C2C_H
#define KVM_COMM_C2C_H

#include <stdbool.h>
#include <stdint.h>

#include "../../kernels/ops.h"
#include <kvmesh_lab.h>

#include "../model/model.h"

#define KVM_C2C_CHUNK_ROWS 256     /* tokens fused per pass of the fuser (its scratch holds this many rows) */
#define KVM_C2C_MAX_DIM (1 << 16)  /* bound on every width in a config (hidden, inner, heads x head_dim) */
#define KVM_C2C_MAX_HEAD_DIM 1024
#define KVM_C2C_MAX_BLOCKS 16      /* FFN blocks per stack (trunk, proj, wgt) */

enum { KVM_C2C_K = 0, KVM_C2C_V = 1 };

/* One model of a pair as the config states it (spec §7.3 "receiver" / "sharer"), or as a loaded model is
 * (kvm_c2c_model_desc). */
typedef struct kvm_c2c_model_desc {
    char model[64];              /* informative name (config only) */
    int n_layers, n_kv_heads, head_dim;
    kvm_rope_layout_t rope_layout;
    double rope_theta;
    int vocab_size;              /* embedding rows (loaded models only; 0 in a config) */
    char tokenizer_sha256[65];   /* lowercase hex SHA-256 of the tokenizer file's bytes */
} kvm_c2c_model_desc_t;

/* The models a fuser is being paired with: kvm_c2c_load checks the config against them (spec §7.3). */
typedef struct kvm_c2c_pair {
    kvm_c2c_model_desc_t receiver, sharer;
} kvm_c2c_pair_t;

/* Fills *out from a loaded model and the tokenizer file kvmesh loaded for it (hashed here). 0, or the
 * hashing error naming the file. tokenizer_file NULL is for synthetic models only (synthetic:<name>, no tokenizer:
 * timing benchmarks): their tokenizer_sha256 is the SHA-256 of the text "kvmesh synthetic model synthetic:<name>: no
 * tokenizer", which pins the shape and can never equal the hash of a real tokenizer.json's bytes in practice. */
int kvm_c2c_model_desc(const kvm_model_t *m, const char *tokenizer_file, kvm_c2c_model_desc_t *out);

/* One FFN block (spec §2.1): x + down . GELU(up . RMSNorm(x; norm)). */
typedef struct kvm_c2c_ffn {
    float *norm;     /* [H] fp32, backend memory */
    kvm_wmat_t up;   /* [I][H] */
    kvm_wmat_t down; /* [H][I] */
} kvm_c2c_ffn_t;

/* One branch (K or V) of one receiver layer. Matrices are in backend memory in the file's dtype; biases fp32. */
typedef struct kvm_c2c_branch {
    float gate_logit;            /* as read (fp32) */
    bool open;                   /* gate_logit > 0 (the fuser's gates_open agrees, checked at load) */
    kvm_wmat_t in;               /* [H][Hs*Ds + Ht*Dt]: columns 0..Hs*Ds-1 read the sharer */
    float *in_bias;              /* [H] */
    kvm_c2c_ffn_t *trunk, *proj, *wgt; /* [trunk_blocks], [proj_blocks], [wgt_blocks] (host array) */
    kvm_wmat_t out;              /* [Ht*Dt][H] */
    float *out_bias;             /* [Ht*Dt] */
    kvm_wmat_t wgt_head;         /* [Ht][H] */
    float *wgt_bias;             /* [Ht] */
} kvm_c2c_branch_t;

/* The config (spec §7.3), as read and checked. */
typedef struct kvm_c2c_config {
    kvm_c2c_model_desc_t receiver, sharer;
    int hidden, inner, wgt_inner;          /* H, I, Iw */
    int trunk_blocks, proj_blocks, wgt_blocks;
    float norm_eps;
    kvm_dtype_t dtype;                     /* every tensor but the gates */
    int *layer_map;                        /* [receiver.n_layers] sharer layer of each receiver layer */
    char token_alignment[16];              /* "identity" | "first" | "longest" */
    char fuse_tokens[24];                  /* "prompt_except_last" | "message_tokens" */
    char chat_template[64];
    char weights_file[256];                /* as written (relative to the config's directory) */
    char weights_sha256[65];
} kvm_c2c_config_t;

/* kvm_c2c_fuser_t (typedef), kvm_c2c_free and the model-pair face (kvm_c2c_open, kvm_c2c_prefill,
 * kvm_c2c_write_untrained): include/kvmesh_lab.h */
struct kvm_c2c_fuser {
    char *json_path;                       /* owned, for messages */
    char *weights_path;                    /* owned: directory of json_path + weights_file */
    kvm_c2c_config_t cfg;
    kvm_c2c_branch_t (*layers)[2];         /* [receiver.n_layers][KVM_C2C_K | KVM_C2C_V] */
    const kvm_ops_t *ops;                  /* backend the weights live on */
    void *params;                          /* one backend block holding every tensor (the branches point in) */
    size_t params_bytes;
    float *ws;                             /* backend scratch for KVM_C2C_CHUNK_ROWS rows (kvm_c2c_branch_forward) */
    size_t ws_floats;
};

/* Loads the fuser whose config is at json_path onto the backend ops (NULL: the CPU backend). With pair != NULL,
 * also checks that the fuser was made for these models (layer counts, KV heads, head dims, RoPE layout and base,
 * tokenizer hashes, and with "identity" alignment that every receiver id is a sharer id): a mismatch is
 * KVM_EINVAL naming the config and the field. Everything wrong with the files themselves is KVM_EFORMAT naming
 * the file and the key or tensor (KVM_ENOENT / KVM_EIO when one cannot be read). Returns NULL with the message
 * set on error. The caller frees the result with kvm_c2c_free (the weights file is not kept mapped). */
kvm_c2c_fuser_t *kvm_c2c_load(const char *json_path, const kvm_c2c_pair_t *pair, const kvm_ops_t *ops);
/* Frees the fuser and its backend memory; NULL is a no-op. */
void kvm_c2c_free(kvm_c2c_fuser_t *f);

/* The fuser network of one branch on n <= KVM_C2C_CHUNK_ROWS input rows (spec §2.2, gate not applied):
 *   x      [n][Hs*Ds + Ht*Dt]  fp32 backend memory (sharer columns first), read only
 *   y      [n][Ht*Dt]          out: out(FFN_proj(h))
 *   wlogit [n][Ht]             out: wgt_head(FFN_wgt(h)) (before the sigmoid)
 * with h = FFN_trunk(in(x)). Uses the fuser's scratch. 0, or KVM_EINVAL for a bad layer / branch / n. */
int kvm_c2c_branch_forward(kvm_c2c_fuser_t *f, int layer, int branch, const float *x, int n, float *y, float *wlogit);

/* A sequence's paged cache on the fuser's backend: the pool, its geometry, the block table (backend memory)
 * and how many entries it has (positions < n_blocks * KVM_KV_BLOCK are addressable). */
typedef struct kvm_c2c_cache {
    kvm_c2c_cache_view_t view;
    int n_blocks;
} kvm_c2c_cache_t;

/* Fuses positions [pos0, pos0 + n) of receiver layer `layer` in place (spec §6): for each branch whose gate is
 * open, the rows of sharer layer layer_map[layer] and of the receiver are gathered, run through the fuser in
 * chunks of KVM_C2C_CHUNK_ROWS, and receiver += sigmoid(wlogit) * y is stored rounded once. Both caches hold the
 * same tokens at the same positions (the caller's contract); the receiver's blocks must be writable (copy on
 * write is the caller's). KVM_EINVAL (nothing written) when a geometry does not match the config or a position
 * is outside a block table. With both gates closed nothing is touched. */
int kvm_c2c_fuse_layer(kvm_c2c_fuser_t *f, int layer, const kvm_c2c_cache_t *recv, const kvm_c2c_cache_t *sharer,
                       int pos0, int n);
/* The cache view of a sequence for the fuser's backend: on the CPU the sequence's host block table; elsewhere an
 * uploaded copy in *dev (the caller frees it with f->ops->free). 0 or KVM_ENOMEM / the upload's error. */
int kvm_c2c_seq_view(const kvm_c2c_fuser_t *f, const kvm_seq_t *s, kvm_c2c_cache_t *c, int32_t **dev);

/* kvm_c2c_fuse_layer for every receiver layer, in order (stops at the first error). */
int kvm_c2c_fuse(kvm_c2c_fuser_t *f, const kvm_c2c_cache_t *recv, const kvm_c2c_cache_t *sharer, int pos0, int n);

#endif
