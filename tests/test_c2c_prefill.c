/* test_c2c_prefill.c - C2C between the bundled models (../shared/spec/c2c.md §5, §6, §7; include/kvmesh_lab.h):
 * kvm_c2c_write_untrained writes a fuser for models/minillama-2m <- models/miniqwen3-6m that passes every loader
 * check for that pair (and is refused for another); the sectioned prefill (kvm_c2c_prefill) stores, row for row,
 * what the fuser's direct forward (kvm_c2c_branch_forward) computes on the same unfused rows, leaves rows before
 * the section and closed gates bit-identical, frees the sharer's KV, and runs the last token on the fused cache;
 * bad arguments and an aligner fuser are refused with messages. CPU backend. */
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

#include "runtime/comm/c2c.h"
#include "runtime/kv/kv.h"
#include "test_common.h"

TC_TMPDIR_FIXTURE("kvm_c2c_prefill")

static kvm_model_t *g_r, *g_s; /* receiver minillama-2m, sharer miniqwen3-6m */

static kvm_model_t *load_model(const char *name) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/models/%s", KVM_SOURCE_DIR, name);
    kvm_load_opts_t opts = {.backend = "cpu", .quiet = true};
    kvm_model_t *m = kvm_model_load_opts(dir, &opts);
    if (!m) fail_msg("load %s: %s", name, kvm_errmsg());
    return m;
}

static int group_setup(void **st) {
    if (setup(st)) return -1;
    g_r = load_model("minillama-2m");
    g_s = load_model("miniqwen3-6m");
    return 0;
}

static int group_teardown(void **st) {
    kvm_model_free(g_r), kvm_model_free(g_s);
    return teardown(st);
}

static const char *fuser_path(const char *name, const kvm_c2c_init_opts_t *o) {
    static char p[512];
    snprintf(p, sizeof p, "%s/%s.c2c.json", g_dir, name);
    if (kvm_c2c_write_untrained(p, g_r, g_s, o)) fail_msg("c2c init: %s", kvm_errmsg());
    return p;
}

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    b[n] = 0;
    fclose(f);
    *len = (size_t)n;
    return b;
}

/* The bundled pair shares one tokenizer file (so identity alignment is right for it, spec §4). */
static void test_the_bundled_pair_shares_one_tokenizer(void **st) {
    (void)st;
    kvm_c2c_model_desc_t r, s;
    char tr[1024], ts[1024];
    snprintf(tr, sizeof tr, "%s/models/minillama-2m/tokenizer.json", KVM_SOURCE_DIR);
    snprintf(ts, sizeof ts, "%s/models/miniqwen3-6m/tokenizer.json", KVM_SOURCE_DIR);
    assert_int_equal(kvm_c2c_model_desc(g_r, tr, &r), 0);
    assert_int_equal(kvm_c2c_model_desc(g_s, ts, &s), 0);
    assert_string_equal(r.tokenizer_sha256, s.tokenizer_sha256);
    assert_int_equal(r.vocab_size, s.vocab_size);
}

/* An untrained fuser passes every check of spec §7 for its pair; the seed decides its bytes; closed gates as
 * asked; the roles swapped or another receiver are refused naming the field. */
static void test_untrained_fuser_loads_for_its_pair_only(void **st) {
    (void)st;
    kvm_c2c_init_opts_t o = {.seed = 5, .closed = "v0,k5"};
    kvm_c2c_fuser_t *f = kvm_c2c_open(fuser_path("a", &o), g_r, g_s);
    if (!f) fail_msg("open: %s", kvm_errmsg());
    assert_int_equal(kvm_c2c_n_layers(f), 6);
    assert_false(kvm_c2c_gate_open(f, 0, 1));
    assert_false(kvm_c2c_gate_open(f, 5, 0));
    assert_true(kvm_c2c_gate_open(f, 0, 0));
    assert_true(kvm_c2c_gate_open(f, 3, 1));
    assert_false(kvm_c2c_gate_open(f, 6, 0));
    for (int l = 0; l < 6; l++) assert_int_equal(f->cfg.layer_map[l], l); /* 6 <- 6 layers: terminal map is identity */
    assert_string_equal(f->cfg.token_alignment, "identity");
    kvm_c2c_free(f);
    /* same seed: same bytes; another seed: other weights */
    size_t la, lb, lc;
    fuser_path("b", &o);
    o.seed = 6;
    fuser_path("c", &o);
    char pa[512], pb[512], pc[512];
    snprintf(pa, sizeof pa, "%s/a.c2c.safetensors", g_dir);
    snprintf(pb, sizeof pb, "%s/b.c2c.safetensors", g_dir);
    snprintf(pc, sizeof pc, "%s/c.c2c.safetensors", g_dir);
    char *a = slurp(pa, &la), *b = slurp(pb, &lb), *c = slurp(pc, &lc);
    assert_int_equal(la, lb);
    assert_memory_equal(a, b, la);
    assert_int_equal(la, lc);
    assert_true(memcmp(a, c, la) != 0);
    free(a), free(b), free(c);
    /* roles swapped: the receiver minillama has 2 KV heads, miniqwen3 4 */
    snprintf(pa, sizeof pa, "%s/a.c2c.json", g_dir);
    assert_null(kvm_c2c_open(pa, g_s, g_r));
    assert_non_null(strstr(kvm_errmsg(), "receiver.n_kv_heads"));
    /* bad options */
    kvm_c2c_init_opts_t bad = {.closed = "q1"};
    snprintf(pa, sizeof pa, "%s/bad.c2c.json", g_dir);
    assert_int_equal(kvm_c2c_write_untrained(pa, g_r, g_s, &bad), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "'q1'"));
    bad.closed = "k6";
    assert_int_equal(kvm_c2c_write_untrained(pa, g_r, g_s, &bad), KVM_EINVAL);
    bad = (kvm_c2c_init_opts_t){.dtype = "f64"};
    assert_int_equal(kvm_c2c_write_untrained(pa, g_r, g_s, &bad), KVM_EINVAL);
    snprintf(pa, sizeof pa, "%s/bad.json", g_dir);
    assert_int_equal(kvm_c2c_write_untrained(pa, g_r, g_s, NULL), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), ".c2c.json"));
}

static const int32_t k_ids[] = {5, 17, 42, 99, 100, 230, 311, 7, 8, 9, 400, 512, 600, 3, 44, 45, 46, 47, 120, 121,
                                122, 200, 201, 202, 333, 334, 335, 17, 18, 19, 20, 21, 22, 23, 24};
#define N_IDS ((int)(sizeof k_ids / sizeof k_ids[0]))

static size_t rows_floats(const kvm_model_t *m, int n) {
    return (size_t)m->cfg.n_layers * 2 * m->cfg.n_kv_heads * (size_t)n * m->cfg.head_dim;
}
static float row_at(const kvm_model_t *m, const float *rows, int n, int l, int b, int h, int t, int d) {
    const int H = m->cfg.n_kv_heads, D = m->cfg.head_dim;
    return rows[((((size_t)l * 2 + b) * H + h) * n + t) * D + d];
}

/* Spec §12 item 5 (parity): the sectioned prefill's fused rows equal, within 1e-6 relative, the receiver's own rows
 * plus sigmoid(w) * y of the fuser's direct forward on the same unfused rows; closed gates and the last row are
 * the receiver's own; the last token's logits equal the same fusion done by hand followed by a one-token step. */
static void check_parity(const char *closed, int p0) {
    kvm_c2c_init_opts_t o = {.seed = 11, .closed = closed};
    kvm_c2c_fuser_t *f = kvm_c2c_open(fuser_path("par", &o), g_r, g_s);
    if (!f) fail_msg("open: %s", kvm_errmsg());
    const int N = N_IDS - p0, V = g_r->cfg.vocab_size;
    const int32_t *ids = k_ids + p0;
    kvm_kv_pool_t *rp = kvm_model_kv_pool(g_r, 0), *sp = kvm_model_kv_pool(g_s, 0);
    assert_non_null(rp), assert_non_null(sp);
    const int sp_free = sp->n_free;

    /* A: the sectioned prefill (after a receiver-only prefix of p0 tokens) */
    kvm_seq_t *ra = kvm_seq_create(rp);
    if (p0) {
        kvm_batch_item_t it = {.seq = ra, .tokens = k_ids, .n_tokens = p0};
        assert_int_equal(kvm_forward(g_r, &it, 1), 0);
    }
    float *la = malloc((size_t)V * sizeof *la), *lb = malloc((size_t)V * sizeof *lb);
    kvm_c2c_stats_t stt;
    int rc = kvm_c2c_prefill(f, g_r, ra, g_s, sp, ids, N, N - 1, la, &stt);
    if (rc) fail_msg("prefill: %s", kvm_errmsg());
    assert_int_equal(ra->n_tokens, p0 + N);
    assert_int_equal(stt.pos0, p0);
    assert_int_equal(stt.fused_tokens, N - 1);
    assert_int_equal(sp->n_free, sp_free); /* the sharer's KV is freed */
    const int T = p0 + N;
    float *fa = malloc(rows_floats(g_r, T) * sizeof *fa);
    assert_int_equal(kvm_seq_read_rows(ra, 0, T, fa), 0);

    /* B: unfused receiver and sharer rows of the same tokens (the sharer reads the prefix too) */
    kvm_seq_t *rb = kvm_seq_create(rp), *sb = kvm_seq_create(sp);
    kvm_batch_item_t ib = {.seq = rb, .tokens = k_ids, .n_tokens = T - 1}, is = {.seq = sb, .tokens = k_ids, .n_tokens = T - 1};
    assert_int_equal(kvm_forward(g_r, &ib, 1), 0);
    assert_int_equal(kvm_forward(g_s, &is, 1), 0);
    float *r0 = malloc(rows_floats(g_r, T - 1) * sizeof *r0), *s0 = malloc(rows_floats(g_s, T - 1) * sizeof *s0);
    assert_int_equal(kvm_seq_read_rows(rb, 0, T - 1, r0), 0);
    assert_int_equal(kvm_seq_read_rows(sb, 0, T - 1, s0), 0);
    const int Ht = g_r->cfg.n_kv_heads, Dt = g_r->cfg.head_dim, Hs = g_s->cfg.n_kv_heads, Ds = g_s->cfg.head_dim;
    const int ct = Ht * Dt, cs = Hs * Ds, n = N - 1;
    assert_true(n <= KVM_C2C_CHUNK_ROWS);
    float *x = malloc((size_t)n * (cs + ct) * sizeof *x), *y = malloc((size_t)n * ct * sizeof *y);
    float *wl = malloc((size_t)n * Ht * sizeof *wl);
    double maxrel = 0, moved = 0;
    int open_branches = 0;
    for (int l = 0; l < 6; l++)
        for (int b = 0; b < 2; b++) {
            const bool open = kvm_c2c_gate_open(f, l, b);
            open_branches += open;
            for (int t = 0; t < n; t++)
                for (int i = 0; i < cs + ct; i++)
                    x[(size_t)t * (cs + ct) + i] =
                        i < cs ? row_at(g_s, s0, T - 1, f->cfg.layer_map[l], b, i / Ds, p0 + t, i % Ds)
                               : row_at(g_r, r0, T - 1, l, b, (i - cs) / Dt, p0 + t, (i - cs) % Dt);
            assert_int_equal(kvm_c2c_branch_forward(f, l, b, x, n, y, wl), 0);
            for (int h = 0; h < Ht; h++)
                for (int t = 0; t < T; t++)
                    for (int d = 0; d < Dt; d++) {
                        const float got = row_at(g_r, fa, T, l, b, h, t, d);
                        if (t == T - 1) continue; /* the last token ran on the fused cache: checked by the logits */
                        const float own = row_at(g_r, r0, T - 1, l, b, h, t, d);
                        if (!open || t < p0) {
                            assert_memory_equal(&got, &own, sizeof got);
                            continue;
                        }
                        const int r = t - p0;
                        const float w = 1.0f / (1.0f + expf(-wl[(size_t)r * Ht + h]));
                        const float want = own + w * y[(size_t)r * ct + h * Dt + d];
                        const double rel = fabs((double)got - want) / (fabs(want) > 1e-3 ? fabs(want) : 1e-3);
                        if (rel > maxrel) maxrel = rel;
                        moved += fabs((double)got - own);
                    }
        }
    fprintf(stderr, "c2c prefill parity (closed %s, prefix %d): %d open branches, max rel err %.3g, sum |moved| %.3g\n",
            closed ? closed : "none", p0, open_branches, maxrel, moved);
    assert_true(maxrel <= 1e-6);
    assert_true(moved > 0); /* the fuser did change the open branches' rows */
    assert_int_equal(stt.gates_k_open + stt.gates_v_open, open_branches);

    /* the same fusion by hand on B, then the last token: the same logits, bit for bit */
    kvm_c2c_cache_t cr = {.view = {.kv = rp->data, .g = rp->geom, .blocks = rb->blocks}, .n_blocks = rb->n_blocks};
    kvm_c2c_cache_t cs_ = {.view = {.kv = sp->data, .g = sp->geom, .blocks = sb->blocks}, .n_blocks = sb->n_blocks};
    assert_int_equal(kvm_c2c_fuse(f, &cr, &cs_, p0, n), 0);
    kvm_batch_item_t last = {.seq = rb, .tokens = k_ids + T - 1, .n_tokens = 1, .logits = lb};
    assert_int_equal(kvm_forward(g_r, &last, 1), 0);
    assert_memory_equal(la, lb, (size_t)V * sizeof *la);

    free(x), free(y), free(wl), free(r0), free(s0), free(fa), free(la), free(lb);
    kvm_seq_destroy(ra), kvm_seq_destroy(rb), kvm_seq_destroy(sb);
    kvm_kv_pool_free(rp), kvm_kv_pool_free(sp);
    kvm_c2c_free(f);
}

static void test_sectioned_prefill_equals_the_direct_fuser_forward(void **st) {
    (void)st;
    check_parity(NULL, 0);
}

static void test_closed_gates_and_a_receiver_prefix_stay_bit_identical(void **st) {
    (void)st;
    check_parity("k0,v0,v3,k5", 9);
}

/* Bad calls are refused with a message and leave the receiver's sequence as it was; a fuser that needs the
 * aligner of spec §4 is refused naming the section. */
static void test_bad_prefills_are_refused(void **st) {
    (void)st;
    const char *jp = fuser_path("bad", NULL);
    kvm_c2c_fuser_t *f = kvm_c2c_open(jp, g_r, g_s);
    assert_non_null(f);
    kvm_kv_pool_t *rp = kvm_model_kv_pool(g_r, 0), *sp = kvm_model_kv_pool(g_s, 0);
    kvm_seq_t *r = kvm_seq_create(rp);
    float *lg = malloc((size_t)g_r->cfg.vocab_size * sizeof *lg);
    assert_int_equal(kvm_c2c_prefill(f, g_r, r, g_s, sp, k_ids, 4, 0, lg, NULL), KVM_EINVAL);
    assert_int_equal(kvm_c2c_prefill(f, g_r, r, g_s, sp, k_ids, 4, 4, lg, NULL), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "n_fuse < n"));
    /* the sharer's pool given as the receiver's: another model */
    assert_int_equal(kvm_c2c_prefill(f, g_r, r, g_s, rp, k_ids, 4, 3, lg, NULL), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "another model"));
    /* a token id past the vocabulary: the forward's error, the receiver truncated back */
    int32_t bad[3] = {1, 2, 100000};
    assert_int_not_equal(kvm_c2c_prefill(f, g_r, r, g_s, sp, bad, 3, 2, lg, NULL), 0);
    assert_int_equal(kvm_c2c_prefill(f, g_r, r, g_s, sp, bad, 3, 1, lg, NULL) != 0, 1);
    assert_int_equal(r->n_tokens, 0);
    /* every token fused, no logits: fine */
    assert_int_equal(kvm_c2c_prefill(f, g_r, r, g_s, sp, k_ids, 4, 4, NULL, NULL), 0);
    assert_int_equal(r->n_tokens, 4);
    kvm_c2c_free(f);
    /* an aligner fuser (token_alignment first, fuse_tokens message_tokens): loads, but the prefill refuses it */
    size_t len;
    char *txt = slurp(jp, &len);
    char *p = strstr(txt, "\"identity\", \"fuse_tokens\": \"prompt_except_last\"");
    assert_non_null(p);
    char out[65536];
    snprintf(out, sizeof out, "%.*s\"first\", \"fuse_tokens\": \"message_tokens\"%s", (int)(p - txt), txt,
             p + strlen("\"identity\", \"fuse_tokens\": \"prompt_except_last\""));
    char ap[512];
    snprintf(ap, sizeof ap, "%s/aligned.c2c.json", g_dir);
    FILE *fp = fopen(ap, "w");
    fputs(out, fp);
    fclose(fp);
    /* the weights file is the one of bad.c2c.json, named inside */
    f = kvm_c2c_open(ap, g_r, g_s);
    if (!f) fail_msg("open aligned: %s", kvm_errmsg());
    assert_int_equal(kvm_c2c_prefill(f, g_r, r, g_s, sp, k_ids, 4, 3, lg, NULL), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "spec §4"));
    assert_int_equal(r->n_tokens, 4);
    kvm_c2c_free(f);
    free(txt), free(lg);
    kvm_seq_destroy(r);
    kvm_kv_pool_free(rp), kvm_kv_pool_free(sp);
}

/* ---- the graph face through the public API (kvm_workflow_load_string, run events) ----------------------------- */

typedef struct c2c_seen {
    int steps, fused[3], reused[3], recomputed[3], tokens_in[3];
    char mode[3][16];
} c2c_seen_t;

static void on_event(void *ud, const kvm_run_event_t *e) {
    c2c_seen_t *s = ud;
    if (e->kind != KVM_RUN_STEP || !e->step->agent) return;
    const int i = !strcmp(e->step->agent, "reader") ? 0 : !strcmp(e->step->agent, "answerer") ? 1 : 2;
    s->steps++;
    s->fused[i] = e->step->kv_fused;
    s->reused[i] = e->step->kv_exact + e->step->kv_offset + e->step->kv_naive;
    s->recomputed[i] = e->step->kv_recomputed;
    s->tokens_in[i] = e->step->tokens_in;
    snprintf(s->mode[i], sizeof s->mode[i], "%s", e->step->kv_mode ? e->step->kv_mode : "");
}

/* kv_from: the answerer's {input.docs} rows are fused (its step's kv partition says so: fused + recomputed = the
 * prompt, mode "c2c"), the reader's are not; a later agent on the receiver's model with the same prompt under the
 * prefix policy finds no prefix in the first run (a fused cache is never published as one). Two runs. */
static void test_kv_from_fuses_the_section_and_publishes_nothing(void **st) {
    (void)st;
    const char *fp = fuser_path("graph", NULL);
    kvm_runtime_params_t rp = kvm_runtime_default_params();
    rp.echo_print = false;
    rp.trace_root = g_dir;
    kvm_runtime_t *rt = kvm_runtime_create(&rp);
    assert_non_null(rt);
    char src[2048];
    snprintf(src, sizeof src,
             "local q = kvmesh.model('%s/models/miniqwen3-6m')\nlocal l = kvmesh.model('%s/models/minillama-2m')\n"
             "local g = kvmesh.graph{}\n"
             "g:agent('reader', { model = q, max_tokens = 2, template = '{input.docs}\\nAsk: {input.q}' })\n"
             "g:agent('answerer', { model = l, max_tokens = 2, template = '{input.docs}\\nAsk: {input.q}',\n"
             "  kv_from = { agent = 'reader', via = 'c2c', fuser = '%s', section = 'input.docs' } })\n"
             "g:agent('plain', { model = l, kv = 'prefix', max_tokens = 2, template = '{input.docs}\\nAsk: {input.q}' })\n"
             "g:edge(kvmesh.START, 'reader')\ng:edge('reader', 'answerer')\ng:edge('answerer', 'plain')\nreturn g\n",
             KVM_SOURCE_DIR, KVM_SOURCE_DIR, fp);
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "c2c.lua", src, strlen(src), NULL);
    if (!wf) fail_msg("load: %s", kvm_errmsg());
    for (int k = 0; k < 2; k++) {
        c2c_seen_t s = {0};
        kvm_run_params_t p = kvm_run_default_params();
        p.inputs_json = "{\"docs\": \"Ann: 1234. Bob: 5678. Cleo: 9012. Dan: 3456. Eve: 7890. Fay: 2345. Gus: 6789.\", "
                        "\"q\": \"Bob\"}";
        p.on_event = on_event;
        p.event_ud = &s;
        kvm_run_t *r = kvm_run_start(wf, &p);
        if (!r) fail_msg("run: %s", kvm_errmsg());
        while (kvm_runtime_step(rt) > 0) {
        }
        assert_int_equal(kvm_run_status(r, NULL), 0);
        fprintf(stderr, "run %d: answerer %d in, %d fused, %d recomputed (%s); plain reused %d; reader fused %d\n", k,
                s.tokens_in[1], s.fused[1], s.recomputed[1], s.mode[1], s.reused[2], s.fused[0]);
        assert_int_equal(s.steps, 3);
        assert_int_equal(s.fused[0], 0);
        assert_true(s.fused[1] > 20);
        assert_int_equal(s.fused[1] + s.recomputed[1], s.tokens_in[1]);
        assert_int_equal(s.reused[1], 0);
        assert_string_equal(s.mode[1], "c2c");
        assert_int_equal(s.fused[2], 0);
        /* run 0: nothing on the receiver's model was published before plain but the answerer's fused cache, which must
         * not be (run 1: plain reuses its own run-0 prefix) */
        if (k == 0) assert_int_equal(s.reused[2], 0);
    }
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_the_bundled_pair_shares_one_tokenizer),
        cmocka_unit_test(test_untrained_fuser_loads_for_its_pair_only),
        cmocka_unit_test(test_sectioned_prefill_equals_the_direct_fuser_forward),
        cmocka_unit_test(test_closed_gates_and_a_receiver_prefix_stay_bit_identical),
        cmocka_unit_test(test_bad_prefills_are_refused),
        cmocka_unit_test(test_kv_from_fuses_the_section_and_publishes_nothing),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
