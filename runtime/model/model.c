/* model.c - model loading dispatch, the RoPE frequency table, llama2.c checkpoints, model lifetime. */
#include "model.h"

#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forward.h"
#include "mock_model.h"
#include "tokenizer.h"

/* Synthetic models (runtime/model/synthetic.c): real shapes, seeded weights generated on the backend. */
kvm_model_t *kvm_model_synthetic(const char *name, const kvm_load_opts_t *opts);

int kvm_tensor_check_dims(const kvm_tensor_t *t, const char *name, int ndim, const int64_t *dims);

/* ---- RoPE frequencies ------------------------------------------------------------------------- */

/* Builds the scaled frequencies w'_j (kvcomm.md §3.3) in fp64, stored once as fp32: the same table is used
 * by the forward RoPE and by every KV shift, so shifts compose exactly with the forward rotation. */
int kvm_model_build_rope(kvm_model_t *m) {
    const kvm_config_t *c = &m->cfg;
    int half = c->head_dim / 2;
    kvm_free(m->inv_freq);
    kvm_free(m->inv_freq64);
    m->inv_freq = kvm_malloc((size_t)half * sizeof(float));
    m->inv_freq64 = kvm_malloc((size_t)half * sizeof(double));
    if (!m->inv_freq || !m->inv_freq64) return KVM_ENOMEM;
    for (int j = 0; j < half; j++) {
        double w = pow(c->rope_theta, -2.0 * j / (double)c->head_dim);
        if (c->rope_scaling == KVM_ROPE_SCALING_LINEAR) {
            w /= c->rope_factor;
        } else if (c->rope_scaling == KVM_ROPE_SCALING_LLAMA3) {
            double f = c->rope_factor, a = c->rope_low_freq_factor, b = c->rope_high_freq_factor;
            double L0 = c->rope_original_max_pos;
            double lambda = 2.0 * M_PI / w, lam_hi = L0 / b, lam_lo = L0 / a;
            if (lambda < lam_hi) {
                /* kept */
            } else if (lambda > lam_lo) {
                w = w / f;
            } else {
                double mu = (L0 / lambda - a) / (b - a);
                w = (1.0 - mu) * w / f + mu * w;
            }
        }
        m->inv_freq64[j] = w;
        m->inv_freq[j] = (float)w;
    }
    return 0;
}

/* ---- tensor checks ---------------------------------------------------------------------------- */

static void shape_str(char *buf, size_t cap, int ndim, const int64_t *d) {
    size_t o = 0;
    o += (size_t)snprintf(buf + o, cap - o, "[");
    for (int i = 0; i < ndim && o < cap; i++) o += (size_t)snprintf(buf + o, cap - o, i ? ", %lld" : "%lld", (long long)d[i]);
    if (o < cap) snprintf(buf + o, cap - o, "]");
}

int kvm_tensor_check_dims(const kvm_tensor_t *t, const char *name, int ndim, const int64_t *dims) {
    if (!t->data) return kvm_seterr(KVM_ENOENT, "tensor '%s' is missing", name);
    bool ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == dims[i];
    if (!ok) {
        char e[96], f[96];
        shape_str(e, sizeof e, ndim, dims);
        shape_str(f, sizeof f, t->ndim, t->shape);
        return kvm_seterr(KVM_ESHAPE, "tensor '%s' has shape %s, expected %s", name, f, e);
    }
    return 0;
}

int kvm_tensor_check(const kvm_tensor_t *t, const char *name, int ndim, int64_t d0, int64_t d1) {
    int64_t d[2] = {d0, d1};
    return kvm_tensor_check_dims(t, name, ndim, d);
}

/* ---- llama2.c checkpoints --------------------------------------------------------------------- */

static kvm_tensor_t l2c_take(const float **p, int64_t d0, int64_t d1) {
    kvm_tensor_t t = {.data = *p, .dtype = KVM_F32, .ndim = d1 ? 2 : 1, .shape = {d0, d1}};
    *p += d0 * (d1 ? d1 : 1);
    return t;
}

/* The 7 int32 fields of a llama2.c header, their byte offsets and plausible ranges. */
static const struct {
    const char *name;
    int64_t lo, hi;
} k_l2c_fields[7] = {
    {"dim", 1, 1 << 16},       {"hidden_dim", 1, 1 << 18}, {"n_layers", 1, KVM_MAX_LAYERS}, {"n_heads", 1, 1 << 16},
    {"n_kv_heads", 1, 1 << 16}, {"vocab_size", 1, 1 << 22}, {"seq_len", 1, 1 << 22},
};

/* Reads and checks the 28-byte header into c. Messages name the field, its offset and the range it must be
 * in, never the value found: the file may be any file the process can read (issue 19, class 1). */
static int l2c_header(kvm_config_t *c, const kvm_mmap_t *mm, const char *path) {
    if (mm->size < 7 * sizeof(int32_t))
        return kvm_seterr(KVM_EFORMAT, "%s: file is %zu bytes, too short for the 28-byte llama2.c header", path, mm->size);
    int32_t h[7];
    memcpy(h, mm->data, sizeof h);
    for (int i = 0; i < 7; i++) {
        /* a negative vocab_size means an untied classifier: its magnitude is checked, in 64 bits */
        int64_t v = i == 5 && h[i] < 0 ? -(int64_t)h[i] : h[i];
        if (v < k_l2c_fields[i].lo || v > k_l2c_fields[i].hi)
            return kvm_seterr(KVM_EFORMAT, "%s: not a llama2.c checkpoint: header field %s (int32 at byte %d) is outside "
                              "%s%lld..%lld", path, k_l2c_fields[i].name, 4 * i, i == 5 ? "+/-" : "",
                              (long long)k_l2c_fields[i].lo, (long long)k_l2c_fields[i].hi);
    }
    if (h[0] % h[3] || h[3] % h[4] || (h[0] / h[3]) % 2)
        return kvm_seterr(KVM_EFORMAT, "%s: not a llama2.c checkpoint: header fields dim, n_heads and n_kv_heads (bytes "
                          "0, 12, 16) do not fit (dim must be an even multiple of n_heads, n_heads a multiple of "
                          "n_kv_heads)", path);
    memset(c, 0, sizeof *c);
    c->dim = h[0];
    c->hidden_dim = h[1];
    c->n_layers = h[2];
    c->n_heads = h[3];
    c->n_kv_heads = h[4];
    c->tied_embeddings = h[5] > 0;
    c->vocab_size = h[5] == INT32_MIN ? 0 : h[5] < 0 ? -h[5] : h[5]; /* INT32_MIN has no negation: implausible */
    c->max_seq_len = h[6];
    return 0;
}

/* The exact size in bytes of a llama2.c checkpoint with the header c: the header, the weights in their fixed
 * order, freq_cis_real/imag (max_seq_len x head_dim/2 each) and, untied, the classifier. */
static int64_t l2c_expected_size(const kvm_config_t *c) {
    const int64_t D = c->dim, L = c->n_layers, H = c->hidden_dim, V = c->vocab_size;
    const int64_t hs = c->dim / c->n_heads, KVD = (int64_t)c->n_kv_heads * hs;
    int64_t n_floats = V * D + L * D + L * D * D + 2 * L * KVD * D + L * D * D + L * D + 3 * L * H * D + D +
                       (int64_t)c->max_seq_len * hs;
    if (!c->tied_embeddings) n_floats += V * D;
    return 28 + n_floats * 4;
}

/* Reads a llama2.c "legacy" checkpoint (stories260K README): 7 int32 header, fp32 tensors in a fixed
 * order, negative vocab = untied classifier at the end. The file must have exactly the size its header
 * implies (a wrong size would load and compute garbage). Weights point into the mapping. */
int kvm_load_llama2c(kvm_model_t *m, const char *path) {
    m->maps = kvm_calloc(1, sizeof(kvm_mmap_t));
    if (!m->maps) return KVM_ENOMEM;
    int rc = kvm_mmap_open(&m->maps[0], path);
    if (rc) return rc;
    m->n_maps = 1;
    const kvm_mmap_t *mm = &m->maps[0];
    kvm_config_t *c = &m->cfg;
    if ((rc = l2c_header(c, mm, path))) return rc;
    int64_t need = l2c_expected_size(c);
    if ((int64_t)mm->size != need)
        return kvm_seterr(KVM_EFORMAT, "%s: file is %zu bytes, but a llama2.c checkpoint with this header (%s "
                          "classifier) is %lld bytes%s", path, mm->size, c->tied_embeddings ? "tied" : "untied",
                          (long long)need, (int64_t)mm->size < need ? ": truncated" : ": trailing bytes");
    c->arch = KVM_ARCH_LLAMA;
    snprintf(c->arch_name, sizeof c->arch_name, "llama2c");
    c->head_dim = c->dim / c->n_heads;
    c->rms_eps = 1e-5f;
    c->rope_theta = 10000.0;
    c->rope_layout = KVM_ROPE_INTERLEAVED;
    c->bos_id = 1;
    c->add_bos = true;
    /* llama2.c ends a story with BOS (its run.c stops on token 1; EOS 2 is never sampled): both end
     * generation on every path */
    c->eos_ids[0] = 2;
    c->eos_ids[1] = 1;
    c->n_eos = 2;
    c->pad_id = -1;
    c->chat_format = KVM_CHAT_NONE;
    c->weight_dtype = KVM_F32;
    /* the fixed BOS/EOS ids must lie in the vocabulary (a vocab of 1 or 2 would embed past tok_emb) */
    if ((rc = kvm_config_validate(c, path))) return rc;

    const int64_t D = c->dim, L = c->n_layers, H = c->hidden_dim, V = c->vocab_size, KVD = (int64_t)c->n_kv_heads * c->head_dim;
    const int64_t hs = c->head_dim;
    m->w.layers = kvm_calloc((size_t)L, sizeof(kvm_layer_weights_t));
    if (!m->w.layers) return KVM_ENOMEM;
    const float *p = (const float *)((const char *)mm->data + 28);
    m->w.tok_emb = l2c_take(&p, V, D);
    kvm_tensor_t rms_att = l2c_take(&p, L, D), wq = l2c_take(&p, L, D * D), wk = l2c_take(&p, L, KVD * D),
                 wv = l2c_take(&p, L, KVD * D), wo = l2c_take(&p, L, D * D), rms_ffn = l2c_take(&p, L, D),
                 w1 = l2c_take(&p, L, H * D), w2 = l2c_take(&p, L, D * H), w3 = l2c_take(&p, L, H * D);
    m->w.final_norm = l2c_take(&p, D, 0);
    p += (int64_t)c->max_seq_len * hs; /* freq_cis_real + freq_cis_imag (unused) */
    m->w.lm_head = c->tied_embeddings ? m->w.tok_emb : l2c_take(&p, V, D);
    for (int64_t l = 0; l < L; l++) {
        kvm_layer_weights_t *lw = &m->w.layers[l];
#define SLICE(dst, src, d0, d1) \
    dst = (kvm_tensor_t){.data = (const float *)src.data + l * (d0) * ((d1) ? (d1) : 1), .dtype = KVM_F32, .ndim = (d1) ? 2 : 1, .shape = {d0, d1}}
        SLICE(lw->attn_norm, rms_att, D, 0);
        SLICE(lw->wq, wq, D, D);
        SLICE(lw->wk, wk, KVD, D);
        SLICE(lw->wv, wv, KVD, D);
        SLICE(lw->wo, wo, D, D);
        SLICE(lw->ffn_norm, rms_ffn, D, 0);
        SLICE(lw->w_gate, w1, H, D);
        SLICE(lw->w_down, w2, D, H);
        SLICE(lw->w_up, w3, H, D);
#undef SLICE
    }
    return 0;
}

/* ---- lifetime --------------------------------------------------------------------------------- */

static void set_name(kvm_model_t *m, const char *path) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s", path);
    size_t n = strlen(tmp);
    while (n > 1 && tmp[n - 1] == '/') tmp[--n] = 0;
    snprintf(m->name, sizeof m->name, "%s", basename(tmp));
}

static int load_llama2c_tokenizer(kvm_model_t *m, const char *path, const kvm_load_opts_t *o) {
    char cand[4096];
    const char *tp = o && o->tokenizer_path ? o->tokenizer_path : NULL;
    if (!tp) {
        char d[4096];
        snprintf(d, sizeof d, "%s", path);
        char *dir = dirname(d);
        snprintf(cand, sizeof cand, "%s/tokenizer.bin", dir);
        if (!kvm_file_exists(cand)) snprintf(cand, sizeof cand, "%s/tok%d.bin", dir, m->cfg.vocab_size);
        if (!kvm_file_exists(cand)) return 0; /* no tokenizer: ids-only use */
        tp = cand;
    }
    m->tok = kvm_tokenizer_load_bin(tp, m->cfg.vocab_size);
    return m->tok ? 0 : kvm_errcode() ? kvm_errcode() : KVM_EFORMAT;
}

/* ---- parameters ------------------------------------------------------------------------------------ */

kvm_model_params_t kvm_model_default_params(void) { return (kvm_model_params_t){.backend = "auto"}; }

int kvm_model_params_to_opts(const kvm_model_params_t *p, kvm_load_opts_t *o) {
    *o = (kvm_load_opts_t){.tokenizer_path = p->tokenizer_path, .backend = p->backend, .quiet = p->quiet,
                           .no_cuda_graphs = p->cuda_graphs < 0, .synthetic_seed = p->synthetic_seed,
                           .synthetic_seed_set = p->synthetic_seed != 0};
    int rc = p->backend ? kvm_backend_check(p->backend) : 0;
    if (!rc && p->weight_dtype) {
        rc = kvm_dtype_parse(p->weight_dtype, "weight_dtype", &o->device_dtype);
        o->device_dtype_set = true;
    }
    if (!rc && p->kv_dtype) {
        rc = kvm_dtype_parse(p->kv_dtype, "kv_dtype", &o->kv_dtype);
        o->kv_dtype_set = true;
    }
    if (!rc && (p->cuda_graphs < -1 || p->cuda_graphs > 1))
        rc = kvm_seterr(KVM_EINVAL, "cuda_graphs: %d is not one of 0 (default: on), 1 (on), -1 (off)", p->cuda_graphs);
    if (!rc && (p->n_threads < 0 || p->n_threads > 256))
        rc = kvm_seterr(KVM_EINVAL, "n_threads: %d is not one of 0 (all cores), 1, ..., 256", p->n_threads);
    return rc;
}

int kvm_model_params_check(const kvm_model_params_t *p) {
    kvm_load_opts_t o;
    return p ? kvm_model_params_to_opts(p, &o) : 0;
}

kvm_model_t *kvm_model_load(const char *path, const kvm_model_params_t *params) {
    const kvm_model_params_t def = kvm_model_default_params();
    if (!params) params = &def;
    kvm_load_opts_t o;
    if (kvm_model_params_to_opts(params, &o)) {
        kvm_errctx(kvm_errcode(), "loading model %s", path ? path : "(null)");
        return NULL;
    }
    if (params->n_threads > 0) kvm_set_threads(params->n_threads);
    return kvm_model_load_opts(path, &o);
}

/* ---- loading ---------------------------------------------------------------------------------------- */

kvm_model_t *kvm_model_load_opts(const char *path, const kvm_load_opts_t *opts) {
    kvm_core_init();
    kvm_load_opts_t def = {0};
    const kvm_load_opts_t *o = opts ? opts : &def;
    if (!path || !*path) {
        kvm_seterr(KVM_EINVAL, "no model path given");
        return NULL;
    }
    if (kvm_load_opts_check(o)) {
        kvm_errctx(kvm_errcode(), "loading model %s", path);
        return NULL;
    }
    if (!strncmp(path, "synthetic:", 10)) {
        return kvm_model_synthetic(path + 10, o);
    }
    if (!strncmp(path, "mock:", 5)) return kvm_model_mock(path + 5);
    kvm_model_t *m = kvm_calloc(1, sizeof *m);
    if (!m) return NULL;
    m->path = kvm_strdup(path);
    set_name(m, path);
    int rc = m->path ? 0 : KVM_ENOMEM;
    if (rc) {
        /* the message is the allocator's */
    } else if (kvm_dir_exists(path)) {
        rc = kvm_load_hf(m, path);
    } else if (kvm_file_exists(path)) {
        rc = kvm_load_llama2c(m, path);
        if (!rc) rc = load_llama2c_tokenizer(m, path, o);
    } else {
        rc = kvm_seterr(KVM_ENOENT, "%s: no such model file or directory", path);
    }
    if (!rc) rc = kvm_model_build_rope(m);
    if (!rc) {
        char desc[256];
        snprintf(desc, sizeof desc, "%s|%d|%d|%d|%d|%d|%d", m->name, m->cfg.dim, m->cfg.n_layers, m->cfg.n_heads,
                 m->cfg.n_kv_heads, m->cfg.head_dim, m->cfg.vocab_size);
        m->model_id = kvm_hash64(desc, strlen(desc), KVM_HASH_SEED);
        m->ops = kvm_ops_select(o->backend);
        if (!m->ops) rc = kvm_errcode() ? kvm_errcode() : KVM_EUNSUPPORTED;
    }
    if (!rc) {
        m->device_dtype = o->device_dtype_set ? o->device_dtype : KVM_BF16;
        rc = kvm_forward_init(m, 0);
        if (!rc) rc = kvm_forward_configure(m, o);
    }
    if (rc) {
        kvm_errctx(rc, "loading model %s", path);
        kvm_model_free(m);
        return NULL;
    }
    return m;
}

void kvm_model_free(kvm_model_t *m) {
    if (!m) return;
    if (m->impl && m->impl->free) m->impl->free(m);
    kvm_forward_free(m);
    if (m->tok) kvm_tokenizer_free(m->tok);
    for (int i = 0; i < m->n_maps; i++) kvm_mmap_close(&m->maps[i]);
    kvm_free(m->maps);
    kvm_free(m->w.layers);
    kvm_free(m->inv_freq);
    kvm_free(m->inv_freq64);
    kvm_free(m->path);
    kvm_free(m->owned);
    kvm_free(m);
}

void kvm_model_describe(const kvm_model_t *m, char *buf, size_t cap) {
    const kvm_config_t *c = &m->cfg;
    snprintf(buf, cap, "%s (%s): %d layers, dim %d, ffn %d, %d heads / %d kv heads x %d, vocab %d, %s weights, rope %s theta %g%s, backend %s",
             m->name, c->arch_name, c->n_layers, c->dim, c->hidden_dim, c->n_heads, c->n_kv_heads, c->head_dim,
             c->vocab_size, kvm_dtype_name(c->weight_dtype), c->rope_layout == KVM_ROPE_HALF ? "rotate-half" : "interleaved",
             c->rope_theta,
             c->rope_scaling == KVM_ROPE_SCALING_LLAMA3 ? " (llama3 scaling)" : c->rope_scaling == KVM_ROPE_SCALING_LINEAR ? " (linear scaling)" : "",
             m->ops ? m->ops->name : "none");
    const char *why = kvm_ops_fallback_reason();
    if (m->ops == kvm_ops_cpu() && why[0]) {
        size_t n = strlen(buf);
        if (n < cap) snprintf(buf + n, cap - n, " (CUDA not used: %s)", why);
    }
}
