/* c2c.c - the C2C fuser's forward on the backend's op table and its application to a receiver's paged cache
 * (../shared/spec/c2c.md §2.2, §6; see c2c.h). Loading is c2c_load.c. */
#include "c2c.h"

#include <string.h>

/* h[n][H] = FFN blocks applied in place (spec §2.1): h += down . GELU(up . RMSNorm(h)). t [n][H] and
 * u [n][inner] are scratch. */
static void c2c_ffn_stack(const kvm_ops_t *o, const kvm_c2c_ffn_t *blk, int blocks, float *h, float *t, float *u, int n,
                          int H, float eps) {
    for (int j = 0; j < blocks; j++) {
        o->rmsnorm(t, h, blk[j].norm, n, H, eps);
        o->matmul(u, t, &blk[j].up, NULL, n);
        o->gelu_erf(u, (size_t)n * blk[j].up.rows);
        o->matmul(t, u, &blk[j].down, NULL, n);
        o->add(h, t, (size_t)n * H);
    }
}

int kvm_c2c_branch_forward(kvm_c2c_fuser_t *f, int layer, int branch, const float *x, int n, float *y, float *wlogit) {
    const kvm_c2c_config_t *g = &f->cfg;
    if (layer < 0 || layer >= g->receiver.n_layers || (branch != KVM_C2C_K && branch != KVM_C2C_V) || n < 0 ||
        n > KVM_C2C_CHUNK_ROWS)
        return kvm_seterr(KVM_EINVAL, "%s: c2c branch forward: layer %d, branch %d, %d rows (layers %d, at most %d rows)",
                          f->json_path, layer, branch, n, g->receiver.n_layers, KVM_C2C_CHUNK_ROWS);
    if (n == 0) return 0;
    const kvm_ops_t *o = f->ops;
    const kvm_c2c_branch_t *br = &f->layers[layer][branch];
    const int H = g->hidden, R = KVM_C2C_CHUNK_ROWS;
    /* scratch after the fuse buffers (x, y, wlogit of kvm_c2c_fuse_layer come first) */
    const size_t ct = (size_t)g->receiver.n_kv_heads * g->receiver.head_dim;
    const size_t cin = (size_t)g->sharer.n_kv_heads * g->sharer.head_dim + ct;
    float *h = f->ws + (size_t)R * (cin + ct + g->receiver.n_kv_heads);
    float *a = h + (size_t)R * H, *t = a + (size_t)R * H, *u = t + (size_t)R * H;
    o->matmul(h, x, &br->in, br->in_bias, n);
    c2c_ffn_stack(o, br->trunk, g->trunk_blocks, h, t, u, n, H, g->norm_eps);
    o->d2d(a, h, (size_t)n * H * sizeof(float));
    c2c_ffn_stack(o, br->proj, g->proj_blocks, a, t, u, n, H, g->norm_eps);
    o->matmul(y, a, &br->out, br->out_bias, n);
    c2c_ffn_stack(o, br->wgt, g->wgt_blocks, h, t, u, n, H, g->norm_eps);
    o->matmul(wlogit, h, &br->wgt_head, br->wgt_bias, n);
    return 0;
}

static int c2c_check_cache(const kvm_c2c_fuser_t *f, const kvm_c2c_cache_t *c, const kvm_c2c_model_desc_t *m,
                           const char *role, int pos0, int n) {
    const kvm_kv_geom_t *g = &c->view.g;
    if (!c->view.kv || !c->view.blocks || g->n_layers != m->n_layers || g->n_kv_heads != m->n_kv_heads ||
        g->head_dim != m->head_dim || kvm_dtype_check(g->dtype, "kv dtype"))
        return kvm_seterr(KVM_EINVAL, "%s: the %s cache (%d layers x %d KV heads x %d) does not match the fuser's %s (%d x %d x %d)",
                          f->json_path, role, g->n_layers, g->n_kv_heads, g->head_dim, role, m->n_layers, m->n_kv_heads,
                          m->head_dim);
    if (pos0 < 0 || n < 0 || (int64_t)pos0 + n > (int64_t)c->n_blocks * KVM_KV_BLOCK)
        return kvm_seterr(KVM_EINVAL, "%s: positions [%d, %d) are outside the %s's block table (%d blocks of %d)", f->json_path,
                          pos0, pos0 + n, role, c->n_blocks, KVM_KV_BLOCK);
    return 0;
}

int kvm_c2c_fuse_layer(kvm_c2c_fuser_t *f, int layer, const kvm_c2c_cache_t *recv, const kvm_c2c_cache_t *sharer,
                       int pos0, int n) {
    const kvm_c2c_config_t *g = &f->cfg;
    if (layer < 0 || layer >= g->receiver.n_layers)
        return kvm_seterr(KVM_EINVAL, "%s: receiver layer %d is not in [0, %d)", f->json_path, layer, g->receiver.n_layers);
    int rc;
    if ((rc = c2c_check_cache(f, recv, &g->receiver, "receiver", pos0, n)) ||
        (rc = c2c_check_cache(f, sharer, &g->sharer, "sharer", pos0, n)))
        return rc;
    const kvm_ops_t *o = f->ops;
    const int R = KVM_C2C_CHUNK_ROWS;
    const size_t ct = (size_t)g->receiver.n_kv_heads * g->receiver.head_dim;
    const size_t cin = (size_t)g->sharer.n_kv_heads * g->sharer.head_dim + ct;
    float *x = f->ws, *y = x + (size_t)R * cin, *wl = y + (size_t)R * ct;
    for (int b = 0; b < 2; b++) {
        if (!f->layers[layer][b].open) continue; /* closed gate: exact identity, nothing launched */
        for (int r0 = 0; r0 < n; r0 += R) {
            const int m = n - r0 < R ? n - r0 : R;
            kvm_c2c_gather_args_t ga = {.x = x, .n = m, .pos0 = pos0 + r0, .kv = b, .s = sharer->view, .r = recv->view,
                                        .s_layer = g->layer_map[layer], .r_layer = layer};
            if ((rc = o->c2c_gather(&ga)) || (rc = kvm_c2c_branch_forward(f, layer, b, x, m, y, wl))) return rc;
            kvm_c2c_residual_args_t ra = {.c = recv->view, .layer = layer, .kv = b, .pos0 = pos0 + r0, .n = m, .y = y, .wlogit = wl};
            if ((rc = o->c2c_residual(&ra))) return rc;
        }
    }
    return 0;
}

int kvm_c2c_fuse(kvm_c2c_fuser_t *f, const kvm_c2c_cache_t *recv, const kvm_c2c_cache_t *sharer, int pos0, int n) {
    int rc = 0;
    for (int l = 0; l < f->cfg.receiver.n_layers && !rc; l++) rc = kvm_c2c_fuse_layer(f, l, recv, sharer, pos0, n);
    return rc;
}
