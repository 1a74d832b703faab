/* bench_c2c_timing.c - `kvmesh bench c2c --timing` (issue 14 acceptance): what C2C costs per prompt against the text
 * hand-off it replaces (spec §6 "latency model"). For each prompt length P (ids drawn from a fixed sequence):
 *   C2C:  the sectioned prefill of kvm_c2c_prefill (receiver and sharer prefill P-1 tokens, the fuser runs over them,
 *         the receiver runs the last token over the fused cache) and the first token (argmax of its logits);
 *   text: the sharer prefills the P tokens and generates T tokens (greedy, EOS ignored, so exactly T), then the
 *         receiver prefills the P + T tokens and produces its first token.
 * Pairs: the bundled models (or --receiver / --sharer), and synthetic Qwen3-0.6B <- Qwen2.5-0.5B at real shapes
 * (--tiny: the small synthetic tiny-qwen3 <- tiny-qwen2, for CPU tests). The fuser is an UNTRAINED one written by
 * kvm_c2c_write_untrained into a temporary folder (or --fuser): the figures are timings only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <kvmesh.h>
#include <kvmesh_lab.h>

#include "bench.h"
#include "json_out.h"

#define T_MAX_PROMPTS 16

typedef struct t_row {
    int P;
    const char *skip; /* why this length did not run */
    /* medians over the reps, ms */
    double c2c_prefill, c2c_fuse, c2c_rest, c2c_wall, txt_sharer, txt_sharer_ttft, txt_recv, txt_wall;
} t_row_t;

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static double ms_since(uint64_t t0) { return (double)(kvm_now_ns() - t0) / 1e6; }

static int32_t argmax(const float *row, int vocab) {
    int32_t best = 0;
    for (int v = 1; v < vocab; v++)
        if (row[v] > row[best]) best = v;
    return best;
}

typedef struct t_ctx {
    kvm_model_t *r, *s;
    kvm_c2c_fuser_t *f;
    kvm_kv_pool_t *rpool, *spool;
    int vocab_r, T;
    float *logits;
} t_ctx_t;

/* One C2C run on ids[0, P): ms of its phases and the wall time. */
static int t_c2c(t_ctx_t *c, const int32_t *ids, int P, double out[4]) {
    uint64_t t0 = kvm_now_ns();
    kvm_seq_t *seq = kvm_seq_create(c->rpool);
    if (!seq) return kvm_seterr(KVM_ENOMEM, "timing: cannot make a sequence");
    kvm_c2c_stats_t st;
    int rc = kvm_c2c_prefill(c->f, c->r, seq, c->s, c->spool, ids, P, P - 1, c->logits, &st);
    if (!rc) (void)argmax(c->logits, c->vocab_r); /* the first token */
    const double wall = ms_since(t0);
    kvm_seq_destroy(seq);
    out[0] = st.prefill_ms, out[1] = st.fuse_ms, out[2] = st.rest_ms, out[3] = wall;
    return rc;
}

/* One text hand-off on ids[0, P): the sharer's prefill + T generated tokens (and its TTFT), the receiver's prefill of
 * the prompt and the message with its first token, the wall time. */
static int t_text(t_ctx_t *c, int32_t *buf, int P, double out[4]) {
    uint64_t t0 = kvm_now_ns();
    kvm_seq_t *ss = kvm_seq_create(c->spool), *rs = kvm_seq_create(c->rpool);
    int rc = ss && rs ? 0 : kvm_seterr(KVM_ENOMEM, "timing: cannot make a sequence");
    kvm_generate_params_t gp = kvm_generate_default_params();
    gp.max_tokens = c->T;
    gp.temperature = 0;
    gp.ignore_eos = true;
    kvm_generation_t g = {0};
    if (!rc) rc = kvm_seq_generate(c->s, ss, buf, P, &gp, NULL, NULL, &g);
    if (!rc && g.n_ids != c->T) rc = kvm_seterr(KVM_EINTERNAL, "timing: the sharer generated %d tokens, not %d", g.n_ids, c->T);
    const double t_sharer = ms_since(t0);
    /* the message goes to the receiver as it is (one tokenizer; for a synthetic pair of unequal vocabularies, an id
     * the receiver lacks is folded into its range: timing only) */
    for (int k = 0; !rc && k < c->T; k++) buf[P + k] = g.ids[k] % c->vocab_r;
    uint64_t t1 = kvm_now_ns();
    int32_t next = -1;
    kvm_batch_item_t it = {.seq = rs, .tokens = buf, .n_tokens = P + c->T, .next_token = &next};
    if (!rc) rc = kvm_forward(c->r, &it, 1);
    out[0] = t_sharer, out[1] = g.ttft_ms, out[2] = ms_since(t1), out[3] = ms_since(t0);
    kvm_generation_clear(&g);
    if (ss) kvm_seq_destroy(ss);
    if (rs) kvm_seq_destroy(rs);
    return rc;
}

static void t_usage_err(const char *msg, const char *v) {
    fprintf(stderr, "kvmesh bench c2c --timing: %s%s%s\n", msg, v ? v : "", v ? "'" : "");
}

int lab_bench_c2c_timing(int argc, char **argv, kvm_lab_params_fn fill) {
    const char *pair = "bundled", *backend = "cpu", *json = NULL, *fuser = NULL, *prompts = "128,512,1024";
    const char *recv = NULL, *shr = NULL;
    int T = 16, reps = 3, hidden = 0;
    bool tiny = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--timing")) continue;
        if (!strcmp(a, "--tiny")) {
            tiny = true;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "kvmesh bench c2c --timing: option '%s' needs a value (or is unknown)\n", a);
            return 2;
        }
        const char *v = argv[++i];
        char *end = NULL;
        if (!strcmp(a, "--pair")) {
            if (strcmp(v, "bundled") && strcmp(v, "synthetic")) return t_usage_err("--pair must be bundled or synthetic, got '", v), 2;
            pair = v;
        } else if (!strcmp(a, "--backend")) {
            if (strcmp(v, "cpu") && strcmp(v, "cuda")) return t_usage_err("--backend must be cpu or cuda, got '", v), 2;
            backend = v;
        } else if (!strcmp(a, "--prompt")) prompts = v;
        else if (!strcmp(a, "--json")) json = v;
        else if (!strcmp(a, "--fuser")) fuser = v;
        else if (!strcmp(a, "--receiver")) recv = v;
        else if (!strcmp(a, "--sharer")) shr = v;
        else if (!strcmp(a, "--msg-tokens") || !strcmp(a, "--reps") || !strcmp(a, "--hidden")) {
            long x = strtol(v, &end, 10);
            const long max = a[2] == 'm' ? 4096 : a[2] == 'r' ? 1000 : 4096;
            if (!*v || *end || x < 1 || x > max) {
                fprintf(stderr, "kvmesh bench c2c --timing: %s '%s' is not an integer in [1, %ld]\n", a, v, max);
                return 2;
            }
            if (a[2] == 'm') T = (int)x;
            else if (a[2] == 'r') reps = (int)x;
            else hidden = (int)x;
        } else {
            fprintf(stderr, "kvmesh bench c2c --timing: unknown option '%s'\n", a);
            return 2;
        }
    }
    int Ps[T_MAX_PROMPTS], nP = 0;
    for (const char *p = prompts; *p;) {
        char *end;
        long x = strtol(p, &end, 10);
        if (end == p || x < 2 || x > 1000000 || (*end && *end != ',') || nP == T_MAX_PROMPTS)
            return t_usage_err("--prompt must be a comma list of at most 16 lengths >= 2, got '", prompts), 2;
        Ps[nP++] = (int)x;
        p = *end ? end + 1 : end;
    }
    if (!nP) return t_usage_err("--prompt is empty", NULL), 2;
    const bool synth = !strcmp(pair, "synthetic");
    if (synth && (recv || shr)) return t_usage_err("--receiver / --sharer are for --pair bundled", NULL), 2;
    if (tiny && !synth) return t_usage_err("--tiny is for --pair synthetic", NULL), 2;
    if (!recv) recv = synth ? (tiny ? "synthetic:tiny-qwen3" : "synthetic:qwen3-0.6b") : "models/minillama-2m";
    if (!shr) shr = synth ? (tiny ? "synthetic:tiny-qwen2" : "synthetic:qwen2.5-0.5b") : "models/miniqwen3-6m";
    if (!hidden) hidden = synth && !tiny ? 1024 : 64; /* real shapes: the released fuser's width (spec §2.3) */

    kvm_model_params_t mp = {.backend = backend, .quiet = true};
    if ((fill && fill(&mp)) || kvm_model_params_check(&mp)) {
        fprintf(stderr, "kvmesh bench c2c --timing: %s\n", kvm_errmsg());
        return 2;
    }
    mp.backend = backend;
    t_ctx_t c = {.T = T};
    t_row_t rows[T_MAX_PROMPTS] = {0};
    char dir[64] = "", jpath[128] = "", wpath[128] = "";
    int rc = 1, maxP = 0;
    int32_t *buf = NULL;
    cJSON *root = NULL;
    for (int k = 0; k < nP; k++) maxP = Ps[k] > maxP ? Ps[k] : maxP;
    fprintf(stderr, "kvmesh bench c2c --timing: loading %s and %s (%s backend)\n", recv, shr, backend);
    if (!(c.r = kvm_model_load(recv, &mp))) {
        fprintf(stderr, "kvmesh bench c2c --timing: receiver: %s\n", kvm_errmsg());
        goto done;
    }
    if (!(c.s = kvm_model_load(shr, &mp))) {
        fprintf(stderr, "kvmesh bench c2c --timing: sharer: %s\n", kvm_errmsg());
        goto done;
    }
    if (!fuser) {
        snprintf(dir, sizeof dir, "/tmp/kvmesh-c2c-timing-XXXXXX");
        if (!mkdtemp(dir)) {
            dir[0] = 0;
            fprintf(stderr, "kvmesh bench c2c --timing: cannot make a temporary folder under /tmp\n");
            goto done;
        }
        snprintf(jpath, sizeof jpath, "%s/untrained.c2c.json", dir);
        snprintf(wpath, sizeof wpath, "%s/untrained.c2c.safetensors", dir);
        kvm_c2c_init_opts_t io = {.seed = 1, .hidden = hidden, .dtype = "bf16"};
        fprintf(stderr, "kvmesh bench c2c --timing: writing an untrained fuser (hidden %d, bf16) for the pair\n", hidden);
        if (kvm_c2c_write_untrained(jpath, c.r, c.s, &io)) {
            fprintf(stderr, "kvmesh bench c2c --timing: %s\n", kvm_errmsg());
            goto done;
        }
        fuser = jpath;
    }
    if (!(c.f = kvm_c2c_open(fuser, c.r, c.s))) {
        fprintf(stderr, "kvmesh bench c2c --timing: fuser: %s\n", kvm_errmsg());
        goto done;
    }
    kvm_model_info_t ri, si;
    kvm_model_info(c.r, &ri);
    kvm_model_info(c.s, &si);
    c.vocab_r = ri.vocab_size;
    const int vmin = ri.vocab_size < si.vocab_size ? ri.vocab_size : si.vocab_size;
    c.rpool = kvm_model_kv_pool(c.r, 0);
    c.spool = kvm_model_kv_pool(c.s, 0);
    c.logits = malloc((size_t)ri.vocab_size * sizeof(float));
    buf = malloc((size_t)(maxP + T) * sizeof *buf);
    if (!c.rpool || !c.spool || !c.logits || !buf) {
        fprintf(stderr, "kvmesh bench c2c --timing: out of memory\n");
        goto done;
    }
    const int maxctx = ri.max_context < si.max_context ? ri.max_context : si.max_context;
    double *v[8];
    for (int k = 0; k < 8; k++) v[k] = calloc((size_t)reps, sizeof(double));
    for (int k = 0; k < 8; k++)
        if (!v[k]) {
            fprintf(stderr, "kvmesh bench c2c --timing: out of memory\n");
            for (int j = 0; j < 8; j++) free(v[j]);
            goto done;
        }
    int err = 0;
    for (int k = 0; k < nP && !err; k++) {
        const int P = Ps[k];
        rows[k].P = P;
        if (P + T > maxctx) {
            rows[k].skip = "prompt + message exceed the models' context";
            continue;
        }
        /* a fixed id sequence, clear of the lowest ids (special tokens of the bundled tokenizer) */
        for (int j = 0; j < P; j++) buf[j] = 3 + (int32_t)(((uint64_t)j * 2654435761u + 17) % (uint64_t)(vmin - 3));
        double o[4];
        /* one warm-up of each, then reps */
        if ((err = t_c2c(&c, buf, P, o)) || (err = t_text(&c, buf, P, o))) break;
        for (int r = 0; r < reps && !err; r++) {
            if ((err = t_c2c(&c, buf, P, o))) break;
            for (int j = 0; j < 4; j++) v[j][r] = o[j];
            if ((err = t_text(&c, buf, P, o))) break;
            for (int j = 0; j < 4; j++) v[4 + j][r] = o[j];
        }
        if (err) break;
        rows[k].c2c_prefill = median(v[0], reps), rows[k].c2c_fuse = median(v[1], reps);
        rows[k].c2c_rest = median(v[2], reps), rows[k].c2c_wall = median(v[3], reps);
        rows[k].txt_sharer = median(v[4], reps), rows[k].txt_sharer_ttft = median(v[5], reps);
        rows[k].txt_recv = median(v[6], reps), rows[k].txt_wall = median(v[7], reps);
        fprintf(stderr, "kvmesh bench c2c --timing: prompt %d done\n", P);
    }
    for (int j = 0; j < 8; j++) free(v[j]);
    if (err) {
        fprintf(stderr, "kvmesh bench c2c --timing: %s\n", kvm_errmsg());
        goto done;
    }

    char card[256];
    kvm_model_device_describe(c.r, card, sizeof card);
    char fdesc[600];
    if (dir[0]) snprintf(fdesc, sizeof fdesc, "an UNTRAINED fuser (hidden %d, bf16, written for the run)", hidden);
    else snprintf(fdesc, sizeof fdesc, "fuser %s", fuser);
    printf("C2C timing (issue 14): R %s <- S %s%s, %s; %s backend, device %s; median of %d after 1 warm-up\n", recv, shr,
           synth ? " (SYNTHETIC weights)" : "", fdesc, backend, card, reps);
    printf("C2C: R and S prefill P-1 tokens (one after the other), fusion, R runs the last token: 1 token out, 0 from S\n");
    printf("text: S prefills P and generates %d tokens (EOS ignored), R prefills P+%d and gives its first token\n\n", T, T);
    printf("%6s | %9s %8s %8s %9s %9s | %9s %9s %9s %9s | %7s\n", "prompt", "prefill", "fusion", "1st tok", "C2C wall",
           "fuse/tok", "S total", "(S TTFT)", "R pf+1st", "text wall", "text/C2C");
    printf("%6s | %9s %8s %8s %9s %9s | %9s %9s %9s %9s | %7s\n", "tokens", "ms", "ms", "ms", "ms", "us", "ms", "ms", "ms",
           "ms", "x");
    for (int k = 0; k < nP; k++) {
        const t_row_t *r = &rows[k];
        if (r->skip) {
            printf("%6d | skipped: %s (%d)\n", r->P, r->skip, maxctx);
            continue;
        }
        printf("%6d | %9.3f %8.3f %8.3f %9.3f %9.3f | %9.3f %9.3f %9.3f %9.3f | %7.2f\n", r->P, r->c2c_prefill, r->c2c_fuse,
               r->c2c_rest, r->c2c_wall, 1000.0 * r->c2c_fuse / (r->P - 1), r->txt_sharer, r->txt_sharer_ttft, r->txt_recv,
               r->txt_wall, r->c2c_wall > 0 ? r->txt_wall / r->c2c_wall : 0.0);
    }
    if (json) {
        root = cJSON_CreateObject();
        cJSON_AddStringToObject(root, "pair", pair);
        cJSON_AddStringToObject(root, "receiver", recv);
        cJSON_AddStringToObject(root, "sharer", shr);
        cJSON_AddBoolToObject(root, "synthetic_weights", synth);
        cJSON_AddStringToObject(root, "fuser", dir[0] ? "untrained (kvm_c2c_write_untrained, bf16)" : fuser);
        if (dir[0]) cJSON_AddNumberToObject(root, "fuser_hidden", hidden);
        cJSON_AddStringToObject(root, "backend", backend);
        cJSON_AddStringToObject(root, "device", card);
        const lab_json_num_t nums[] = {{"msg_tokens", T}, {"reps", reps}};
        lab_json_add_nums(root, nums, 2);
        cJSON *arr = cJSON_AddArrayToObject(root, "prompts");
        for (int k = 0; k < nP; k++) {
            const t_row_t *r = &rows[k];
            cJSON *o = cJSON_CreateObject();
            cJSON_AddItemToArray(arr, o);
            cJSON_AddNumberToObject(o, "prompt_tokens", r->P);
            if (r->skip) {
                cJSON_AddStringToObject(o, "skipped", r->skip);
                continue;
            }
            cJSON *a = cJSON_AddObjectToObject(o, "c2c");
            const lab_json_num_t cn[] = {{"prefill_ms", r->c2c_prefill}, {"fuse_ms", r->c2c_fuse},
                                         {"first_token_ms", r->c2c_rest}, {"wall_ms", r->c2c_wall},
                                         {"fused_tokens", r->P - 1}, {"fuse_us_per_token", 1000.0 * r->c2c_fuse / (r->P - 1)},
                                         {"tokens_generated_sharer", 0}, {"tokens_generated_receiver", 1}};
            lab_json_add_nums(a, cn, sizeof cn / sizeof cn[0]);
            cJSON *t = cJSON_AddObjectToObject(o, "text");
            const lab_json_num_t tn[] = {{"sharer_ms", r->txt_sharer}, {"sharer_ttft_ms", r->txt_sharer_ttft},
                                         {"receiver_prefill_first_token_ms", r->txt_recv}, {"wall_ms", r->txt_wall},
                                         {"receiver_prompt_tokens", r->P + T}, {"tokens_generated_sharer", T},
                                         {"tokens_generated_receiver", 1}};
            lab_json_add_nums(t, tn, sizeof tn / sizeof tn[0]);
            cJSON_AddNumberToObject(o, "text_over_c2c", r->c2c_wall > 0 ? r->txt_wall / r->c2c_wall : 0);
        }
        if (lab_json_write(root, json)) {
            fprintf(stderr, "kvmesh bench c2c --timing: cannot write '%s'\n", json);
            goto done;
        }
    }
    rc = 0;
done:
    cJSON_Delete(root);
    free(buf);
    free(c.logits);
    kvm_kv_pool_free(c.spool);
    kvm_kv_pool_free(c.rpool);
    kvm_c2c_free(c.f);
    kvm_model_free(c.s);
    kvm_model_free(c.r);
    if (dir[0]) {
        unlink(jpath);
        unlink(wpath);
        rmdir(dir);
    }
    return rc;
}
