/* bench_kvcomm.c - `kvmesh bench kvcomm`: the KVCOMM benchmarks (lab/, on include/kvmesh_lab.h).
 *
 *   --workload ttft (default)  the paper's TTFT setting (kvcomm.md §7 Tab. 2): A fully connected agents
 *        (agent i reads the shared input and the responses of agents 0..i-1), each behind its own
 *        P-token prefix, an I-token input, O-token forced outputs. Per agent: dense TTFT (full prefill of
 *        the same ids) and reused TTFT (KVCOMM, force_reuse) with the paper's breakdown, reuse rate,
 *        alignment time per 1K reused tokens beside its bandwidth floor, anchor memory.
 *   --workload team|pipeline|revise|arith   the fidelity workloads (lab/team.h), e.g. the minitasks "team" task (finder, checker,
 *        reverser, neighbour reading one shared facts segment and the finder's answer) under dense
 *        prefill, full KVCOMM and the ablations; accuracy, reuse rate after warm-up, per-layer K/V cosine
 *        to dense prefill, greedy agreement with dense.
 *
 * Timing: host monotonic clock from the moment an agent's inputs are available to its first output id on
 * the host (kvcomm.md §6); prepare (prediction, weights, offsets, assembly) + the last-token forward and
 * sampling. Synthetic weights are reported as such. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#include <kvmesh.h>
#include <kvmesh_lab.h>

#include "bench.h"
#include "json_out.h"
#include "minitasks.h"
#include "stats.h"
#include "team.h"

#define median lab_median

static double now_ms(void) { return (double)kvm_now_ns() / 1e6; }

static void rand_ids(int32_t *ids, int n, uint64_t seed, int vocab) {
    int lo = vocab > 64 ? 16 : 1;
    for (int i = 0; i < n; i++) ids[i] = lo + (int32_t)(lab_mix64(seed * 1000003ULL + (uint64_t)i) % (uint64_t)(vocab - lo));
}

static void usage(void) {
    fprintf(stderr,
            "usage: kvmesh bench kvcomm (--synthetic NAME | --model PATH) [options]\n"
            "  --backend auto|cpu|cuda     (default auto)\n"
            "  --workload ttft|team|pipeline|revise|arith   (default ttft)\n"
            "  --set kvcomm.KEY=VALUE      a KVCOMM switch (repeatable), e.g. --set kvcomm.gamma=0.5\n"
            "  --kv-budget-mb N            KV pool size (default: the model's default)\n"
            "  --out DIR                   write the full JSON there\n"
            " ttft: --agents 5 --input 1000 --prefix 512 --output 512 --warmup 2 --requests 3\n"
            "       --bandwidth-gbs B      bandwidth of the alignment floor (default 2990 on CUDA = H100 measured copy,\n"
            "                              perf.md; 20 on the CPU)\n"
            " team, pipeline, revise, arith (the fidelity workloads, lab/team.h: accuracy per role, the headline over the\n"
            "       roles that are not degenerate under dense, which are named):\n"
            "       --requests 300 --modes dense,full,rotation --warm 10 --cos-samples 32 --max-tokens 12\n"
            "       modes: dense, full, rotation, rotation+ph, rotation+pf (kvcomm.md Tab. 5 rows);\n"
            "              oracle[-ph|-pf][@NAME]  full KVCOMM with the true per-request deltas (all shared\n"
            "                                      placeholders, or only NAME; -ph/-pf: only that piece);\n"
            "              full+recompute          full KVCOMM with kvcomm.recompute_below=8 (short pieces recomputed)\n"
            "              full+blend              ours (= default): full KVCOMM, short pieces and text segments\n"
            "                                      recomputed, 50%% of the other rows (where anchors disagree most)\n"
            "                                      to start with, and the fidelity guard (kvcomm.guard)\n"
            "              default                 what kv = \"kvcomm\" runs (kvcomm.preset=blend); spec = the paper's\n"
            "              blend@F                 the blended policy with kvcomm.recompute_frac=F and no guard\n"
            "                                      (the accuracy-vs-reuse curve of scripts/bench/kvcomm_curve.py)\n"
            "              gate@S                  the blended policy with kvcomm.recompute_frac=0 and\n"
            "                                      kvcomm.recompute_spread=S (rows whose predicted error passes S)\n"
            "              oselect@F               blend@F with the rows ranked by their true error against a dense\n"
            "                                      prefill (the selection oracle: how far a ranking by error could go)\n"
            "              aselect@F               blend@F with the rows ranked by the attention the agent's own rows\n"
            "                                      give them in a dense prefill (the attention oracle)\n"
            "              wselect@F               blend@F with the rows ranked by their true error times that\n"
            "                                      attention (the weighted oracle)\n"
            "       --set applies after the mode (e.g. --modes full+blend --set kvcomm.recompute_frac=0.3)\n"
            "       --seed 1000            (needs a model with a tokenizer; the trained minitasks models)\n");
}

typedef struct opts {
    const char *synth, *model, *backend, *workload, *out, *modes;
    const char *sets[32];
    int n_sets;
    size_t kv_mb;
    int agents, input, prefix, output, warmup, requests, warm, cos_samples, max_tokens;
    uint64_t seed;
    double bw_gbs;
} opts_t;

static int apply_sets(kvm_kvcomm_config_t *c, const opts_t *o) {
    for (int i = 0; i < o->n_sets; i++) {
        char kv[256];
        snprintf(kv, sizeof kv, "%s", o->sets[i]);
        char *eq = strchr(kv, '=');
        if (!eq) return kvm_seterr(KVM_EINVAL, "--set %s: expected KEY=VALUE", o->sets[i]);
        *eq = 0;
        int rc = kvm_kvcomm_config_set(c, kv, eq + 1);
        if (rc) return rc;
    }
    return 0;
}

static void write_json(const opts_t *o, const char *name, cJSON *root) {
    if (!o->out) return;
    mkdir(o->out, 0755);
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", o->out, name);
    if (lab_json_write(root, path) == 0) fprintf(stderr, "wrote %s\n", path);
    else fprintf(stderr, "cannot write %s\n", path);
}

/* ==== the TTFT workload ================================================================================== */

typedef struct ttft_rec {
    double dense, reuse, kvcomm, first, others;
    int mode, n_prompt, exact, offset, naive, recomputed, n_anchor_max;
    int guard; /* kvcomm_report_t.guard: the fidelity guard checked this call (before serving: 1 or 2; after: 3) */
    double align_ms;
    int align_tokens;
    double align_bytes;
} ttft_rec_t;

/* The model of a benchmark: its handle, facts and the name the reports print. */
typedef struct bench_model {
    kvm_model_t *m;
    kvm_model_info_t info;
    char name[128];
} bench_model_t;

/* The TTFT workload's table, summary lines and JSON (--out) from the records rec[(warmup + requests) * agents]. */
static void ttft_report(const bench_model_t *bm, const opts_t *o, kvm_comm_t *c, const ttft_rec_t *rec, char (*agent)[32]) {
    kvm_model_t *m = bm->m;
    const kvm_model_info_t *mc = &bm->info;
    const int A = o->agents, R = o->warmup + o->requests;
    char card[256];
    kvm_model_device_describe(m, card, sizeof card);
    char cfgs[512];
    kvm_kvcomm_config_str(kvm_comm_config(c), cfgs, sizeof cfgs);
    kvm_comm_stats_t st;
    kvm_comm_stats(c, &st);
    int n_anchors = 0;
    for (int i = 0; i < st.n_pools; i++) {
        kvm_comm_pool_stats_t ps;
        kvm_comm_pool_stats(c, i, &ps);
        n_anchors += ps.n_anchors;
    }
    printf("\nkvmesh bench kvcomm (ttft): %s on %s (%s)%s\n", bm->name, mc->backend, card,
           strstr(bm->name, "synthetic") || !kvm_model_tokenizer(m) ? ", SYNTHETIC/RANDOM WEIGHTS" : "");
    printf("agents %d, input %d, prefix %d, output %d tokens; %d warm-up + %d measured requests\n", A, o->input,
           o->prefix, o->output, o->warmup, o->requests);
    printf("switches: %s\n\n", cfgs);
    printf("%-6s %7s %10s %10s %8s %9s %9s %9s %7s  %s\n", "agent", "prompt", "dense ms", "reuse ms", "speedup",
           "kvcomm", "1st-tok", "others", "reuse%", "exact/offset/naive/recomputed");
    cJSON *root = cJSON_CreateObject(), *ja = cJSON_AddArrayToObject(root, "agents");
    cJSON_AddStringToObject(root, "model", bm->name);
    cJSON_AddStringToObject(root, "backend", mc->backend);
    cJSON_AddStringToObject(root, "device", card);
    cJSON_AddStringToObject(root, "switches", cfgs);
    cJSON_AddNumberToObject(root, "input", o->input);
    cJSON_AddNumberToObject(root, "prefix", o->prefix);
    cJSON_AddNumberToObject(root, "output", o->output);
    double *v = malloc((size_t)R * 6 * sizeof(double));
    double align_ms = 0, align_bytes = 0;
    int align_tok = 0, n_reuse = 0, n_meas = 0, n_checked_before = 0;
    for (int i = 0; i < A; i++) {
        int n = 0, nr = 0;
        double *dn = v, *ru = v + R, *kc = v + 2 * R, *ft = v + 3 * R, *ot = v + 4 * R;
        ttft_rec_t last = {0};
        for (int r = o->warmup; r < R; r++) {
            const ttft_rec_t *x = &rec[(size_t)r * A + i];
            dn[n] = x->dense, ru[n] = x->reuse, kc[n] = x->kvcomm, ft[n] = x->first, ot[n] = x->others;
            n++;
            nr += x->mode == KVM_COMM_REUSE;
            n_checked_before += x->guard == 1 || x->guard == 2;
            align_ms += x->align_ms, align_bytes += x->align_bytes, align_tok += x->align_tokens;
            last = *x;
        }
        n_reuse += nr, n_meas += n;
        double md = median(dn, n), mr = median(ru, n);
        printf("%-6s %7d %10.2f %10.2f %7.2fx %9.2f %9.2f %9.2f %6.0f%%  %d/%d/%d/%d\n", agent[i], last.n_prompt, md,
               mr, mr > 0 ? md / mr : 0, median(kc, n), median(ft, n), median(ot, n), n ? 100.0 * nr / n : 0,
               last.exact, last.offset, last.naive, last.recomputed);
        cJSON *o1 = cJSON_CreateObject();
        cJSON_AddStringToObject(o1, "agent", agent[i]);
        cJSON_AddNumberToObject(o1, "prompt_tokens", last.n_prompt);
        cJSON_AddNumberToObject(o1, "dense_ttft_ms_median", md);
        cJSON_AddNumberToObject(o1, "reuse_ttft_ms_median", mr);
        cJSON_AddNumberToObject(o1, "kvcomm_ms_median", median(kc, n));
        cJSON_AddNumberToObject(o1, "first_token_ms_median", median(ft, n));
        cJSON_AddNumberToObject(o1, "others_ms_median", median(ot, n));
        cJSON_AddNumberToObject(o1, "reuse_share", n ? (double)nr / n : 0);
        cJSON *reps = cJSON_AddArrayToObject(o1, "reps");
        for (int r = 0; r < R; r++) {
            const ttft_rec_t *x = &rec[(size_t)r * A + i];
            cJSON *e = cJSON_CreateObject();
            cJSON_AddBoolToObject(e, "warmup", r < o->warmup);
            cJSON_AddStringToObject(e, "mode", x->mode == KVM_COMM_REUSE ? "reuse" : "dense");
            const lab_json_num_t nums[] = {{"dense_ms", x->dense}, {"reuse_ms", x->reuse}, {"kvcomm_ms", x->kvcomm},
                                           {"first_token_ms", x->first}, {"exact", x->exact}, {"offset", x->offset},
                                           {"naive", x->naive}, {"recomputed", x->recomputed},
                                           {"anchors", x->n_anchor_max}};
            lab_json_add_nums(e, nums, sizeof nums / sizeof nums[0]);
            cJSON_AddItemToArray(reps, e);
        }
        cJSON_AddItemToArray(ja, o1);
    }
    free(v);
    double per1k = align_tok ? align_ms / (align_tok / 1000.0) : 0;
    double floor1k = align_tok ? (align_bytes / (o->bw_gbs * 1e9) * 1e3) / (align_tok / 1000.0) : 0;
    /* anchor memory: bases and deltas as stored (backend memory in the KV dtype, deltas q8 unless kvcomm.deltas=kv;
     * host fp32 on the CPU backend with an fp32 pool) */
    double per_anchor = n_anchors ? (double)st.anchor_bytes / n_anchors : 0;
    printf("\nreuse rate (measured requests): %.1f%% (%d of %d agent invocations)\n",
           n_meas ? 100.0 * n_reuse / n_meas : 0, n_reuse, n_meas);
    if (n_checked_before)
        printf("fidelity guard: %d of the %d measured calls were in their agent's guard warm-up (its first 32 REUSE "
               "calls) and checked before serving: their reuse ms include a dense prefill and 8 batched greedy steps "
               "(docs/kvcomm.md, \"The fidelity guard\"); --warmup 40 measures past the warm-up, --set kvcomm.guard=off "
               "without the guard\n", n_checked_before, n_meas);
    printf("alignment (weights + offsets + assembly): %.3f ms per 1K reused tokens; bandwidth floor %.3f ms per 1K "
           "at %.0f GB/s (bf16 bytes of bases, deltas, anchor bases, writes) -> %.1fx the floor\n", per1k, floor1k,
           o->bw_gbs, floor1k > 0 ? per1k / floor1k : 0);
    printf("anchors: %d in %d pools, %.1f MiB in all, %.2f MiB per anchor (own storage in %s memory: deltas %s, bases "
           "not shared in the KV cache's dtype); %d bases share their segment's blocks in the store (%.1f MiB, in the "
           "KV budget), %llu were copied out when the store needed the blocks\n",
           n_anchors, st.n_pools, st.anchor_bytes / 1048576.0, per_anchor / 1048576.0,
           strcmp(bm->info.backend, "cpu") ? "device" : "host",
           kvm_comm_config(c)->deltas == KVM_KVCOMM_DELTAS_Q8 ? "q8 (int8, a scale per head row)" : "in the KV dtype",
           st.anchors_shared, st.shared_base_bytes / 1048576.0, (unsigned long long)st.anchors_unshared);
    cJSON_AddNumberToObject(root, "reuse_rate", n_meas ? (double)n_reuse / n_meas : 0);
    cJSON_AddNumberToObject(root, "align_ms_per_1k", per1k);
    cJSON_AddNumberToObject(root, "align_floor_ms_per_1k", floor1k);
    cJSON_AddNumberToObject(root, "bandwidth_gbs", o->bw_gbs);
    cJSON_AddNumberToObject(root, "anchors", n_anchors);
    cJSON_AddNumberToObject(root, "anchor_bytes", (double)st.anchor_bytes);
    cJSON_AddNumberToObject(root, "anchor_bytes_per_anchor", per_anchor);
    cJSON_AddNumberToObject(root, "anchors_base_shared", st.anchors_shared);
    cJSON_AddNumberToObject(root, "shared_base_bytes", (double)st.shared_base_bytes);
    cJSON_AddNumberToObject(root, "anchors_unshared", (double)st.anchors_unshared);
    write_json(o, "kvcomm_ttft.json", root);
    cJSON_Delete(root);
}

static int run_ttft(const bench_model_t *bm, const opts_t *o) {
    kvm_model_t *m = bm->m;
    const kvm_model_info_t *mc = &bm->info;
    const int A = o->agents, V = mc->vocab_size, G = 8;
    kvm_comm_opts_t co = {.kv_budget_bytes = o->kv_mb << 20, .kvcomm_set = true};
    kvm_kvcomm_config_default(&co.kvcomm);
    if (apply_sets(&co.kvcomm, o)) {
        fprintf(stderr, "kvmesh bench kvcomm: %s\n", kvm_errmsg());
        return 2;
    }
    /* the paper's TTFT run used gamma = 1 (kvcomm.md §8): on after the --set switches (a preset resets every
     * switch), unless they set it themselves */
    bool own_force = false;
    for (int i = 0; i < o->n_sets; i++) own_force |= strstr(o->sets[i], "force_reuse=") != NULL;
    if (!own_force) co.kvcomm.force_reuse = true;
    int need = o->prefix + o->input + (A - 1) * (o->output + G) + 2 * G + 16;
    if (mc->max_context > 0 && need + o->output > mc->max_context) {
        fprintf(stderr, "kvmesh bench kvcomm: the last agent needs %d tokens, beyond the model's context of %d "
                "(use smaller --input/--prefix/--output)\n", need + o->output, mc->max_context);
        return 2;
    }
    kvm_comm_t *c = kvm_comm_create(m, &co);
    if (!c) {
        fprintf(stderr, "kvmesh bench kvcomm: %s\n", kvm_errmsg());
        return 1;
    }
    /* templates: prefix ++ {input} ++ glue ++ {agent:a0} ++ glue ... */
    kvm_template_t **tm = calloc((size_t)A, sizeof *tm);
    int32_t *texts = malloc((size_t)A * (o->prefix + (size_t)(A + 1) * G) * sizeof(int32_t));
    char (*names)[64] = calloc((size_t)A, sizeof *names);
    char (*agent)[32] = calloc((size_t)A, sizeof *agent);
    for (int i = 0; i < A; i++) {
        snprintf(agent[i], sizeof agent[i], "a%d", i);
        snprintf(names[i], sizeof names[i], "agent:a%d:current", i);
    }
    int rc = 0;
    for (int i = 0; i < A && !rc; i++) {
        kvm_piece_t pc[2 * 32 + 2];
        int np = 0;
        int32_t *tx = texts + (size_t)i * (o->prefix + (size_t)(A + 1) * G);
        rand_ids(tx, o->prefix + (A + 1) * G, 0x7e3a0000ULL + (uint64_t)i, V);
        pc[np++] = (kvm_piece_t){.kind = KVM_PIECE_TEXT, .ids = tx, .n_ids = o->prefix};
        pc[np++] = (kvm_piece_t){.kind = KVM_PIECE_PLACEHOLDER, .text = "input"};
        pc[np++] = (kvm_piece_t){.kind = KVM_PIECE_TEXT, .ids = tx + o->prefix, .n_ids = G};
        for (int j = 0; j < i && j < 32; j++) {
            pc[np++] = (kvm_piece_t){.kind = KVM_PIECE_PLACEHOLDER, .text = names[j]};
            pc[np++] = (kvm_piece_t){.kind = KVM_PIECE_TEXT, .ids = tx + o->prefix + (size_t)(j + 1) * G, .n_ids = G};
        }
        kvm_template_desc_t d = {.agent = agent[i], .pieces = pc, .n_pieces = np, .raw = true};
        tm[i] = kvm_template_create(c, &d);
        if (!tm[i]) rc = kvm_errcode() ? kvm_errcode() : KVM_EINTERNAL;
    }
    const int R = o->warmup + o->requests;
    ttft_rec_t *rec = calloc((size_t)R * A, sizeof *rec);
    int32_t *content = malloc((size_t)o->input * sizeof(int32_t)), hdr[8];
    kvm_generate_params_t gp = kvm_generate_default_params(), gp1;
    gp.temperature = 0; /* greedy */
    gp.ignore_eos = true;
    gp1 = gp;
    gp.max_tokens = o->output;
    gp1.max_tokens = 1;
    kvm_prepared_t *p = kvm_prepared_create();
    if (!p) rc = KVM_ENOMEM;
    const double row_bytes = 2.0 * mc->n_layers * mc->n_kv_heads * mc->head_dim * 2.0; /* bf16 K+V per token */
    /* a delta row: q8 (kvcomm.deltas, one byte and a 4-byte scale per head row of D) or bf16 */
    const double delta_row_bytes =
        kvm_comm_config(c)->deltas == KVM_KVCOMM_DELTAS_Q8 ? row_bytes / 2 * (1 + 4.0 / mc->head_dim) : row_bytes;
    for (int r = 0; r < R && !rc; r++) {
        fprintf(stderr, "request %d/%d%s\n", r + 1, R, r < o->warmup ? " (warm-up)" : "");
        kvm_comm_request_t *rq = kvm_comm_request_begin(c, (uint64_t)r + 1);
        rand_ids(content, o->input, 0xc0117e47ULL + (uint64_t)r, V);
        rand_ids(hdr, 8, 0x4eade4ULL, V);
        kvm_segment_t **resp = calloc((size_t)A, sizeof *resp);
        double t0 = now_ms();
        kvm_segment_t *in = NULL;
        rc = kvm_comm_segment_ids(c, KVM_PRODUCER_INPUT, "input", hdr, 8, content, o->input, &in);
        double t_seg = now_ms() - t0;
        for (int i = 0; i < A && !rc; i++) {
            ttft_rec_t *x = &rec[(size_t)r * A + i];
            kvm_binding_t b[33];
            int nb = 0;
            b[nb++] = (kvm_binding_t){"input", in};
            for (int j = 0; j < i && j < 32; j++) b[nb++] = (kvm_binding_t){names[j], resp[j]};
            /* reused */
            kvm_prompt_t pr = {.tmpl = tm[i], .bindings = b, .n_bindings = nb, .policy = KVM_KV_KVCOMM};
            kvm_generation_t res;
            memset(&res, 0, sizeof res);
            double a0 = now_ms();
            rc = kvm_comm_prepare(rq, &pr, p);
            double prep_ms = now_ms() - a0;
            if (rc) break;
            int n_rest = 0;
            const int32_t *rest = kvm_prepared_rest(p, &n_rest);
            rc = kvm_seq_generate(m, kvm_prepared_seq(p), rest, n_rest, &gp, NULL, NULL, &res);
            if (!rc) rc = kvm_comm_complete(rq, p, &res, &resp[i]);
            const kvm_comm_report_t *rp = kvm_prepared_report(p);
            x->mode = rp->mode;
            x->guard = rp->guard;
            kvm_prepared_prompt(p, &x->n_prompt);
            x->exact = rp->exact_tokens;
            x->offset = rp->offset_tokens;
            x->naive = rp->naive_tokens;
            x->recomputed = rp->recomputed_tokens;
            x->kvcomm = rp->predict_ms + rp->weights_ms + rp->offset_ms + rp->assemble_ms;
            x->first = res.ttft_ms;
            x->reuse = prep_ms + res.ttft_ms + (i == 0 ? t_seg : 0);
            x->others = x->reuse - x->kvcomm - x->first;
            if (rp->mode == KVM_COMM_REUSE) {
                x->align_ms = rp->weights_ms + rp->offset_ms + rp->assemble_ms;
                x->align_tokens = rp->offset_tokens + rp->naive_tokens;
                /* floor: read base rows + N anchors (deltas of T+S rows, bases of T rows) + template rows,
                 * write the T+S rows, for every placeholder (bf16 bytes; deltas as stored) */
                for (int k = 0; k < rp->n_placeholders; k++) {
                    double T = rp->ph[k].tokens, S = rp->ph[k].text_tokens, N = rp->ph[k].n_eligible;
                    x->align_bytes += row_bytes * (T + S + N * T + (T + S)) + delta_row_bytes * N * (T + S);
                    if (rp->ph[k].n_eligible > x->n_anchor_max) x->n_anchor_max = rp->ph[k].n_eligible;
                }
            }
            kvm_generation_clear(&res);
            kvm_prepared_release(p);
            if (rc) break;
            /* dense: full prefill of the same ids */
            pr.policy = KVM_KV_DENSE;
            a0 = now_ms();
            rc = kvm_comm_prepare(rq, &pr, p);
            prep_ms = now_ms() - a0;
            if (rc) break;
            rest = kvm_prepared_rest(p, &n_rest);
            rc = kvm_seq_generate(m, kvm_prepared_seq(p), rest, n_rest, &gp1, NULL, NULL, &res);
            x->dense = prep_ms + res.ttft_ms;
            kvm_generation_clear(&res);
            kvm_prepared_release(p);
        }
        if (!rc) rc = kvm_comm_request_end(rq);
        else kvm_comm_request_abort(rq);
        for (int i = 0; i < A; i++) kvm_segment_release(resp[i]);
        free(resp);
        kvm_segment_release(in);
    }
    if (rc) {
        fprintf(stderr, "kvmesh bench kvcomm: %s\n", kvm_errmsg());
    } else {
        ttft_report(bm, o, c, rec, agent);
    }
    kvm_prepared_free(p);
    free(content);
    free(rec);
    for (int i = 0; i < A; i++) kvm_template_free(tm[i]);
    free(tm);
    free(texts);
    free(names);
    free(agent);
    kvm_comm_free(c);
    return rc ? 1 : 0;
}

/* ==== the team (fidelity) workload ======================================================================= */

typedef void (*team_stat_fn)(const kvm_team_result_t *r, int role, double *mean_ms, double *p50_ms);

/* a per-call time of a team run (kvm_team_ttft, kvm_team_prep_cpu), overall and per role, into its JSON object as
 * KEY_mean, KEY_p50 and KEY_per_role [{mean, p50}] */
static void team_time_json(cJSON *o1, const kvm_team_result_t *r, team_stat_fn fn, const char *key) {
    double tm = 0, tp = 0;
    char k1[64];
    fn(r, -1, &tm, &tp);
    snprintf(k1, sizeof k1, "%s_mean", key);
    cJSON_AddNumberToObject(o1, k1, tm);
    snprintf(k1, sizeof k1, "%s_p50", key);
    cJSON_AddNumberToObject(o1, k1, tp);
    snprintf(k1, sizeof k1, "%s_per_role", key);
    cJSON *tr = cJSON_AddArrayToObject(o1, k1);
    for (int k = 0; k < r->n_roles; k++) {
        fn(r, k, &tm, &tp);
        cJSON *e = cJSON_CreateObject();
        cJSON_AddNumberToObject(e, "mean", tm);
        cJSON_AddNumberToObject(e, "p50", tp);
        cJSON_AddItemToArray(tr, e);
    }
}

static void team_ttft_json(cJSON *o1, const kvm_team_result_t *r) {
    team_time_json(o1, r, kvm_team_ttft, "ttft_ms");
    team_time_json(o1, r, kvm_team_prep_cpu, "prepare_cpu_ms");
}

/* the per-call time tables of the team runs: time to first token, and the prepare call's CPU time */
static void team_ttft_table(const char *backend, int wl, const kvm_team_result_t *res, char (*names)[32], int nm) {
    const char *title[2] = {"time to first token per agent call (prepare + remaining prompt forward + first id; host wall "
                            "ms)", "CPU time of the prepare call (KVCOMM + recompute pass; process CPU ms, all threads)"};
    const team_stat_fn stat[2] = {kvm_team_ttft, kvm_team_prep_cpu};
    for (int t = 0; t < 2; t++) {
        printf("\n%s on %s, mean / p50:\n%-14s %15s", title[t], backend, "mode", "all");
        for (int k = 0; k < kvm_team_n_roles(wl); k++) printf(" %15.15s", kvm_team_role_name(wl, k));
        printf("\n");
        for (int i = 0; i < nm; i++) {
            printf("%-14s", names[i]);
            for (int k = -1; k < kvm_team_n_roles(wl); k++) {
                double tm = 0, tp = 0;
                stat[t](&res[i], k, &tm, &tp);
                printf(" %7.2f/%7.2f", tm, tp);
            }
            printf("\n");
        }
    }
}

static int run_team(const bench_model_t *bm, const opts_t *o) {
    kvm_model_t *m = bm->m;
    const int wl = kvm_team_workload_from_name(o->workload), R = kvm_team_n_roles(wl);
    if (!kvm_model_tokenizer(m)) {
        fprintf(stderr, "kvmesh bench kvcomm: the %s workload needs a model with a tokenizer\n", o->workload);
        return 2;
    }
    enum { MAX_MODES = 8 };
    char modes[256];
    int n_modes = 1;
    for (const char *c = o->modes; *c; c++) n_modes += *c == ',';
    if (strlen(o->modes) >= sizeof modes || n_modes > MAX_MODES) {
        fprintf(stderr, "kvmesh bench kvcomm: --modes takes at most %d modes in %zu characters ('%s' has %d); run the "
                "others in a second command\n", MAX_MODES, sizeof modes - 1, o->modes, n_modes);
        return 2;
    }
    snprintf(modes, sizeof modes, "%s", o->modes);
    kvm_team_result_t res[MAX_MODES];
    char names[MAX_MODES][32];
    memset(res, 0, sizeof res);
    int nm = 0, rc = 0, dense_i = -1;
    char cfgs[MAX_MODES][512];
    for (char *tok = strtok(modes, ","); tok && nm < MAX_MODES && !rc; tok = strtok(NULL, ",")) {
        fprintf(stderr, "mode %s ...\n", tok);
        kvm_team_opts_t to;
        kvm_team_opts_default(&to);
        to.requests = o->requests;
        to.warm = o->warm;
        to.cos_samples = o->cos_samples;
        to.max_tokens = o->max_tokens;
        to.seed = o->seed;
        to.workload = wl;
        to.kv_budget_bytes = o->kv_mb << 20;
        if (!strcmp(tok, "dense")) to.policy = KVM_KV_PREFIX;
        else if (!strncmp(tok, "oracle", 6)) { /* oracle[-ph|-pf][@NAME]: full KVCOMM with the true deltas */
            const char *rest = tok + 6, *at = strchr(tok, '@');
            to.oracle = KVM_ORACLE_ALL;
            if (!strncmp(rest, "-ph", 3)) to.oracle = KVM_ORACLE_PH, rest += 3;
            else if (!strncmp(rest, "-pf", 3)) to.oracle = KVM_ORACLE_PF, rest += 3;
            if (*rest && *rest != '@') {
                fprintf(stderr, "kvmesh bench kvcomm: unknown mode '%s' (oracle[-ph|-pf][@NAME])\n", tok);
                rc = KVM_EINVAL;
                break;
            }
            to.oracle_only = at ? at + 1 : NULL;
        } else if (!strcmp(tok, "full+recompute")) { /* full KVCOMM, short pieces recomputed */
            to.cfg.recompute_below = KVM_TEAM_RECOMPUTE_BELOW;
        } else if (!strcmp(tok, "full+blend") || !strcmp(tok, "default")) { /* ours: the blended policy (team.h) */
            kvm_team_blend_policy(&to.cfg);
        } else if (!strncmp(tok, "blend@", 6)) { /* the blended policy at another recompute fraction (the curve) */
            kvm_team_blend_policy(&to.cfg);
            to.cfg.guard = false; /* a point of the static curve */
            rc = kvm_kvcomm_config_set(&to.cfg, "recompute_frac", tok + 6);
        } else if (!strncmp(tok, "oselect@", 8) || !strncmp(tok, "aselect@", 8) || !strncmp(tok, "wselect@", 8)) {
            /* blend@F, the rows ranked by their true error, the attention they get or both (oracles) */
            kvm_team_blend_policy(&to.cfg);
            to.cfg.guard = false;
            to.oracle_select = tok[0] == 'o'   ? KVM_ORACLE_SELECT_ERROR
                               : tok[0] == 'a' ? KVM_ORACLE_SELECT_ATTENTION
                                               : KVM_ORACLE_SELECT_WEIGHTED;
            rc = kvm_kvcomm_config_set(&to.cfg, "recompute_frac", tok + 8);
        } else if (!strncmp(tok, "gate@", 5)) { /* the blend with the predicted-error gate instead of a fraction */
            kvm_team_blend_policy(&to.cfg);
            to.cfg.guard = false;
            rc = kvm_kvcomm_config_set(&to.cfg, "recompute_frac", "0");
            if (!rc) rc = kvm_kvcomm_config_set(&to.cfg, "recompute_spread", tok + 5);
        } else if (!strcmp(tok, "spec")) { /* the paper's policy */
            rc = kvm_kvcomm_config_set(&to.cfg, "preset", "spec");
        } else rc = kvm_kvcomm_ablation(&to.cfg, tok);
        if (rc || (rc = apply_sets(&to.cfg, o))) break;
        kvm_kvcomm_config_str(&to.cfg, cfgs[nm], sizeof cfgs[nm]);
        size_t cl = strlen(cfgs[nm]);
        snprintf(cfgs[nm] + cl, sizeof cfgs[nm] - cl, " oracle=%d%s%s%s", to.oracle, to.oracle_only ? "@" : "", to.oracle_only ? to.oracle_only : "",
                 to.oracle_select == KVM_ORACLE_SELECT_ERROR       ? " oracle_select=error"
                 : to.oracle_select == KVM_ORACLE_SELECT_ATTENTION ? " oracle_select=attention"
                 : to.oracle_select == KVM_ORACLE_SELECT_WEIGHTED  ? " oracle_select=weighted"
                                                                   : "");
        snprintf(names[nm], sizeof names[nm], "%s", tok);
        rc = kvm_team_run(m, &to, dense_i >= 0 ? &res[dense_i] : NULL, &res[nm]);
        if (!strcmp(tok, "dense")) dense_i = nm;
        nm++;
    }
    if (rc) {
        fprintf(stderr, "kvmesh bench kvcomm: %s\n", kvm_errmsg());
    } else {
        const int L = bm->info.n_layers;
        char why[KVM_TEAM_ROLES][96];
        const unsigned degen = dense_i >= 0 ? kvm_team_degenerate_roles(&res[dense_i], why) : 0;
        printf("\nkvmesh bench kvcomm (%s): %s on %s; %d requests x %d agents (minitasks eval seed %llu)\n", o->workload,
               bm->name, bm->info.backend, o->requests, R, (unsigned long long)o->seed);
        if (dense_i < 0) printf("no dense mode: every role is in acc%% (degenerate roles are found by the dense run)\n");
        for (int k = 0; k < R; k++)
            if (degen >> k & 1) printf("degenerate role left out of acc%%: %s (%s)\n", kvm_team_role_name(wl, k), why[k]);
        printf("acc%% = calls right over the other roles; per-role columns: accuracy (difference to dense)\n");
        printf("%-14s %6s", "mode", "acc%");
        for (int k = 0; k < R; k++) printf(" %15.15s", kvm_team_role_name(wl, k));
        printf(" %7s %10s %10s %7s %7s  %s\n", "reuse%", "reuse%warm", "tok-reuse%", "agree%", "anchors",
               "exact/offset/naive/recomputed tokens");
        cJSON *root = cJSON_CreateObject(), *jm = cJSON_AddArrayToObject(root, "modes");
        cJSON_AddStringToObject(root, "model", bm->name);
        cJSON_AddStringToObject(root, "workload", o->workload);
        cJSON_AddNumberToObject(root, "requests", o->requests);
        cJSON *jr = cJSON_AddArrayToObject(root, "roles"), *jd = cJSON_AddArrayToObject(root, "degenerate_roles");
        for (int k = 0; k < R; k++) {
            cJSON_AddItemToArray(jr, cJSON_CreateString(kvm_team_role_name(wl, k)));
            if (degen >> k & 1) {
                cJSON *e = cJSON_CreateObject();
                cJSON_AddStringToObject(e, "role", kvm_team_role_name(wl, k));
                cJSON_AddStringToObject(e, "why", why[k]);
                cJSON_AddItemToArray(jd, e);
            }
        }
        for (int i = 0; i < nm; i++) {
            kvm_team_result_t *r = &res[i];
            double acc = kvm_team_accuracy_except(r, degen);
            printf("%-14s %6.1f", names[i], acc);
            for (int k = 0; k < R; k++) {
                const double a = r->total[k] ? 100.0 * r->correct[k] / r->total[k] : 0;
                const kvm_team_result_t *d = dense_i >= 0 ? &res[dense_i] : NULL;
                char cell[32];
                if (d && d->total[k] && i != dense_i)
                    snprintf(cell, sizeof cell, "%.1f (%+.1f)%s", a, a - 100.0 * d->correct[k] / d->total[k], degen >> k & 1 ? "*" : "");
                else snprintf(cell, sizeof cell, "%.1f%s", a, degen >> k & 1 ? "*" : "");
                printf(" %15s", cell);
            }
            /* tokens beyond the exact prefix whose KV came from another agent's segment (offset or naive) */
            const double beyond = (double)(r->input - r->exact), tok_reuse = beyond > 0 ? (r->offset + r->naive) / beyond : 0;
            char agree[16] = "-"; /* measured against an earlier dense mode of the same run only */
            if (r->agree_n) snprintf(agree, sizeof agree, "%.1f", 100.0 * r->agree / r->agree_n);
            else if (i == dense_i) snprintf(agree, sizeof agree, "%.1f", 100.0);
            printf(" %7.1f %10.1f %10.1f %7s %7d  %llu/%llu/%llu/%llu\n", r->invocations ? 100.0 * r->reuse / r->invocations : 0,
                   r->invocations_warm ? 100.0 * r->reuse_warm / r->invocations_warm : 0, 100.0 * tok_reuse, agree, r->anchors,
                   (unsigned long long)r->exact,
                   (unsigned long long)r->offset, (unsigned long long)r->naive, (unsigned long long)r->recomputed);
            cJSON *o1 = cJSON_CreateObject();
            cJSON_AddStringToObject(o1, "mode", names[i]);
            cJSON_AddStringToObject(o1, "switches", cfgs[i]);
            cJSON_AddNumberToObject(o1, "accuracy", acc); /* over the roles that are not degenerate */
            cJSON_AddNumberToObject(o1, "accuracy_all_roles", kvm_team_accuracy(r));
            cJSON *pr = cJSON_AddArrayToObject(o1, "accuracy_per_role");
            for (int k = 0; k < R; k++)
                cJSON_AddItemToArray(pr, cJSON_CreateNumber(r->total[k] ? 100.0 * r->correct[k] / r->total[k] : 0));
            cJSON_AddNumberToObject(o1, "reuse_rate", r->invocations ? (double)r->reuse / r->invocations : 0);
            cJSON_AddNumberToObject(o1, "reuse_rate_after_warmup",
                                    r->invocations_warm ? (double)r->reuse_warm / r->invocations_warm : 0);
            if (r->agree_n || i == dense_i)
                cJSON_AddNumberToObject(o1, "greedy_agreement_with_dense", r->agree_n ? (double)r->agree / r->agree_n : 1);
            const lab_json_num_t nums[] = {
                {"anchors", r->anchors}, {"anchor_bytes", (double)r->anchor_bytes}, {"exact_tokens", (double)r->exact},
                {"offset_tokens", (double)r->offset}, {"naive_tokens", (double)r->naive},
                {"recomputed_tokens", (double)r->recomputed}, {"cos_samples", r->cos_n}, {"max_abs_err", r->max_abs_err},
                {"max_abs_dense", r->max_abs_dense}, {"short_recomputed_tokens", r->short_recomputed},
                {"selected_recomputed_tokens", r->selected_recomputed}, {"recompute_items", r->recompute_items},
                {"guard_checked", r->guard_checked}, {"guard_served_dense", r->guard_dense},
                {"guard_late", r->guard_late},
                {"guard_tokens", (double)r->guard_tokens}, {"token_reuse_beyond_prefix", tok_reuse}};
            lab_json_add_nums(o1, nums, sizeof nums / sizeof nums[0]);
            team_ttft_json(o1, r);
            cJSON *ck = cJSON_AddArrayToObject(o1, "cos_k"), *cv = cJSON_AddArrayToObject(o1, "cos_v");
            cJSON *lk = cJSON_AddArrayToObject(o1, "rel_l2_k"), *lv = cJSON_AddArrayToObject(o1, "rel_l2_v");
            for (int l = 0; l < L && r->cos_n; l++) {
                cJSON_AddItemToArray(ck, cJSON_CreateNumber(r->cos_k[l] / r->cos_n));
                cJSON_AddItemToArray(cv, cJSON_CreateNumber(r->cos_v[l] / r->cos_n));
                cJSON_AddItemToArray(lk, cJSON_CreateNumber(r->l2_k[l] / r->cos_n));
                cJSON_AddItemToArray(lv, cJSON_CreateNumber(r->l2_v[l] / r->cos_n));
            }
            cJSON_AddItemToArray(jm, o1);
        }
        team_ttft_table(bm->info.backend, wl, res, names, nm);
        printf("\nper-layer cosine to dense prefill of the reused rows, K/V (mean over %d sampled REUSE invocations):\n",
               o->cos_samples);
        for (int i = 0; i < nm; i++) {
            kvm_team_result_t *r = &res[i];
            if (!r->cos_n) continue;
            printf("%-14s", names[i]);
            for (int l = 0; l < L; l++) printf(" L%d %.3f/%.3f", l, r->cos_k[l] / r->cos_n, r->cos_v[l] / r->cos_n);
            printf("\n");
        }
        printf("\nmax |reused - dense| over all K/V elements of those rows (dense max |x| in brackets):\n");
        for (int i = 0; i < nm; i++)
            if (res[i].cos_n) printf("%-14s %.3g [%.3g]\n", names[i], res[i].max_abs_err, res[i].max_abs_dense);
        for (int i = 0; i < nm; i++) /* the fidelity guard (kvcomm.guard, kvcomm.md §5.2) */
            if (res[i].guard_checked)
                printf("%-14s guard: %d calls checked against dense, %d disagreed before serving (served dense), %d "
                       "after the call (the agent's next calls recompute more), %llu tokens computed by the checks "
                       "(the prompts' own: %llu)\n", names[i], res[i].guard_checked, res[i].guard_dense,
                       res[i].guard_late, (unsigned long long)res[i].guard_tokens, (unsigned long long)res[i].input);
        write_json(o, "kvcomm_team.json", root);
        cJSON_Delete(root);
    }
    for (int i = 0; i < nm; i++) kvm_team_result_free(&res[i]);
    return rc ? 1 : 0;
}

/* ==== entry ============================================================================================== */

int lab_bench_kvcomm(int argc, char **argv, kvm_lab_params_fn fill) {
    opts_t o = {.backend = NULL, .workload = "ttft", .modes = "dense,full,rotation", .agents = 5, .input = 1000,
                .prefix = 512, .output = 512, .warmup = 2, .requests = -1, .warm = 10, .cos_samples = 32,
                .max_tokens = 12, .seed = KVM_MT_DEFAULT_EVAL_SEED, .bw_gbs = 0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has = i + 1 < argc;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage();
            return 0;
        } else if (!strcmp(a, "--synthetic") && has) o.synth = argv[++i];
        else if (!strcmp(a, "--model") && has) o.model = argv[++i];
        else if (!strcmp(a, "--backend") && has) o.backend = argv[++i];
        else if (!strcmp(a, "--workload") && has) o.workload = argv[++i];
        else if (!strcmp(a, "--out") && has) o.out = argv[++i];
        else if (!strcmp(a, "--modes") && has) o.modes = argv[++i];
        else if (!strcmp(a, "--set") && has && o.n_sets < 32) o.sets[o.n_sets++] = argv[++i];
        else if (!strcmp(a, "--kv-budget-mb") && has) o.kv_mb = (size_t)atol(argv[++i]);
        else if (!strcmp(a, "--agents") && has) o.agents = atoi(argv[++i]);
        else if (!strcmp(a, "--input") && has) o.input = atoi(argv[++i]);
        else if (!strcmp(a, "--prefix") && has) o.prefix = atoi(argv[++i]);
        else if (!strcmp(a, "--output") && has) o.output = atoi(argv[++i]);
        else if (!strcmp(a, "--warmup") && has) o.warmup = atoi(argv[++i]);
        else if (!strcmp(a, "--requests") && has) o.requests = atoi(argv[++i]);
        else if (!strcmp(a, "--warm") && has) o.warm = atoi(argv[++i]);
        else if (!strcmp(a, "--cos-samples") && has) o.cos_samples = atoi(argv[++i]);
        else if (!strcmp(a, "--max-tokens") && has) o.max_tokens = atoi(argv[++i]);
        else if (!strcmp(a, "--seed") && has) o.seed = (uint64_t)strtoull(argv[++i], NULL, 10);
        else if (!strcmp(a, "--bandwidth-gbs") && has) o.bw_gbs = atof(argv[++i]);
        else {
            fprintf(stderr, "kvmesh bench kvcomm: unknown or incomplete option '%s'\n", a);
            usage();
            return 2;
        }
    }
    bool ttft = !strcmp(o.workload, "ttft");
    if (o.requests < 0) o.requests = ttft ? 3 : 300;
    if (!o.synth == !o.model || (!ttft && kvm_team_workload_from_name(o.workload) < 0) || o.agents < 1 || o.agents > 32 || o.input < 1 ||
        o.prefix < 1 || o.output < 1 || o.warmup < 0 || o.requests < 1) {
        usage();
        return 2;
    }
    kvm_model_params_t mp = {.backend = o.backend};
    if ((fill && fill(&mp)) || kvm_model_params_check(&mp)) {
        fprintf(stderr, "kvmesh bench kvcomm: %s\n", kvm_errmsg());
        return 2;
    }
    bench_model_t bm = {0};
    if (o.synth) snprintf(bm.name, sizeof bm.name, "synthetic:%.100s", o.synth);
    bm.m = kvm_model_load(o.synth ? bm.name : o.model, &mp);
    if (!bm.m) {
        fprintf(stderr, "kvmesh bench kvcomm: %s\n", kvm_errmsg());
        return 1;
    }
    kvm_model_info(bm.m, &bm.info);
    if (!o.synth) snprintf(bm.name, sizeof bm.name, "%s", bm.info.name);
    if (o.bw_gbs <= 0) o.bw_gbs = strcmp(bm.info.backend, "cpu") ? 2990 : 20; /* H100 measured copy; a DRAM guess */
    int rc = ttft ? run_ttft(&bm, &o) : run_team(&bm, &o);
    kvm_model_free(bm.m);
    return rc;
}
