/* bench_engine.c - `kvmesh bench engine` (the dense engine's TTFT and decode speed against the hardware's
 * floors and HF transformers) and the dispatch of `kvmesh bench` (kvm_lab_cmd_bench; `bench kvcomm` is
 * bench_kvcomm.c). lab/, on include/kvmesh_lab.h.
 *
 * Method (../shared/spec/perf.md §6): device time from events recorded on the op stream around each step,
 * host time from a monotonic clock around the whole call (end-to-end: ids up, logits down); warm-up steps
 * first; medians and p10-p90 over many reps; three different prompts rotated; random non-zero token ids.
 * Decode steps run through the captured CUDA graph (and once more eagerly, kvm_forward_set_graphs off, for
 * the record). Synthetic weights: the report says so. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include <kvmesh.h>
#include <kvmesh_lab.h>

#include "bench.h"
#include "cpu_limits.h"
#include "json_out.h"
#include "stats.h"

/* perf.md §1: H100 SXM datasheet and measured ceilings */
#define PEAK_BF16_TFLOPS 989.4
#define MEAS_GEMM_TFLOPS 798.0
#define PEAK_HBM_TBS 3.35
#define MEAS_COPY_TBS 2.99

typedef lab_stats_t stats_t;
#define stats_of lab_stats_of

static cJSON *stats_json(const stats_t *s, const double *reps) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "median", s->med);
    cJSON_AddNumberToObject(o, "p10", s->p10);
    cJSON_AddNumberToObject(o, "p90", s->p90);
    cJSON_AddNumberToObject(o, "mean", s->mean);
    cJSON_AddNumberToObject(o, "n", s->n);
    if (reps) cJSON_AddItemToObject(o, "reps", cJSON_CreateDoubleArray(reps, s->n));
    return o;
}

/* One timed measurement: device ms (events) and host ms of each rep. */
typedef struct timing {
    double *dev, *host;
    int n;
} timing_t;

static void timing_init(timing_t *t, int reps) {
    t->dev = calloc((size_t)reps, sizeof(double));
    t->host = calloc((size_t)reps, sizeof(double));
    t->n = 0;
}
static void timing_free(timing_t *t) {
    free(t->dev);
    free(t->host);
}

static void bench_help(FILE *f) {
    fprintf(f,
            "usage: kvmesh bench engine (--synthetic NAME | --model PATH) [options]\n"
            "       kvmesh bench kvcomm ...   (the KVCOMM benchmark: kvmesh bench kvcomm --help)\n"
            "       kvmesh bench blame ...    (failure attribution and the schema cache: kvmesh bench blame --help)\n"
            "       kvmesh bench c2c ...      (C2C: the blinded receiver of spec section 9, --timing: kvmesh bench c2c --help)\n\n"
            "Measures the dense engine: TTFT of a P-token prompt (batch 1), decode ms/token at batch 1 and batch B\n"
            "with a P-token context, tokens/s, achieved TFLOP/s and GB/s, against the floors of perf.md (on the H100);\n"
            "on the CPU against its own limits measured in the same run (FMA peak, OpenBLAS SGEMM when installed,\n"
            "streaming read and copy bandwidth).\n\n"
            "  --synthetic NAME   llama-3.1-8b, qwen2.5-7b, qwen3-0.6b, qwen2.5-0.5b, llama-3.2-1b, qwen3-8b, tiny-*\n"
            "                     (real shapes, seeded synthetic bf16 weights made on the device)\n"
            "  --model PATH       a model directory or file instead\n"
            "  --backend B        auto (default), cpu or cuda\n"
            "  --prompt P         prompt / context tokens (default 1024)\n"
            "  --batch B          decode batch (default 16)\n"
            "  --reps N           timed reps of each measurement (default 20; decode uses 5N)\n"
            "  --warmup N         untimed reps first (default 3)\n"
            "  --no-eager         skip the eager (no CUDA graph) decode measurements\n"
            "  --profile          then time every op of one eager prefill and decode step (GPU), per op, and\n"
            "                     the device timeline: time between ops, before the first op and after the last\n"
            "  --json FILE        write every rep and the summary as JSON\n"
            "  --hf-json FILE     the output of scripts/bench/hf_engine.py, shown beside ours\n");
}

/* Linear-layer parameters touched per token (layers + lm_head) and KV bytes per token. */
static void model_sizes(const kvm_model_info_t *c, double *p_layers, double *p_head, double *kv_tok_bytes, int kv_elem) {
    double D = c->dim, QD = (double)c->n_heads * c->head_dim, KD = (double)c->n_kv_heads * c->head_dim, F = c->hidden_dim;
    *p_layers = c->n_layers * (D * QD + 2 * D * KD + QD * D + 3 * D * F);
    *p_head = (double)c->vocab_size * D;
    *kv_tok_bytes = (double)c->n_layers * KD * 2 * kv_elem;
}

static void print_row(const char *what, double ours, const char *unit, double hf, double floor1, double floor2) {
    char hfs[32] = "-", f1[32] = "-", f2[32] = "-", vs[32] = "-";
    if (hf > 0) snprintf(hfs, sizeof hfs, "%.2f", hf);
    if (hf > 0 && ours > 0) snprintf(vs, sizeof vs, "%.2fx", hf / ours);
    if (floor1 > 0) snprintf(f1, sizeof f1, "%.2f", floor1);
    if (floor2 > 0) snprintf(f2, sizeof f2, "%.2f", floor2);
    printf("| %-34s | %9.3f | %-6s | %9s | %8s | %9s | %9s |\n", what, ours, unit, hfs, vs, f1, f2);
}

static double hf_get(cJSON *hf, const char *key) {
    if (!hf) return 0;
    cJSON *v = cJSON_GetObjectItem(hf, key);
    if (cJSON_IsObject(v)) v = cJSON_GetObjectItem(v, "median");
    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

/* One forward step; when t is set, its device time (events where the backend has them, else host time) and
 * its host time are appended to t. */
static int timed_forward(kvm_model_t *m, kvm_batch_item_t *items, int n, timing_t *t) {
    double dev = 0, host = 0;
    int rc = kvm_forward_timed(m, items, n, &dev, &host);
    if (!rc && t) {
        t->host[t->n] = host;
        t->dev[t->n] = dev;
        t->n++;
    }
    return rc;
}

/* Runs `reps` greedy decode steps of the n sequences (one token each, the argmax made on the backend),
 * truncating back to ctx after each so the context stays at ctx + 1. */
static int time_decode(kvm_model_t *m, kvm_seq_t **seqs, int n, int ctx, int warmup, int reps, timing_t *t) {
    kvm_model_info_t info;
    kvm_model_info(m, &info);
    const int V = info.vocab_size;
    kvm_batch_item_t *items = calloc((size_t)n, sizeof *items);
    int32_t *tok = calloc((size_t)n, sizeof(int32_t));
    int32_t *next = calloc((size_t)n, sizeof(int32_t));
    int rc = 0;
    for (int r = 0; r < warmup + reps && !rc; r++) {
        for (int i = 0; i < n; i++) {
            /* greedy feedback (on the device: only the token ids come back) */
            tok[i] = r == 0 ? (int32_t)(lab_mix64((uint64_t)r * 7919 + i) % (uint64_t)V) : next[i];
            items[i] = (kvm_batch_item_t){.seq = seqs[i], .tokens = &tok[i], .n_tokens = 1, .logits = NULL, .next_token = &next[i]};
        }
        rc = timed_forward(m, items, n, r >= warmup ? t : NULL);
        for (int i = 0; i < n; i++) kvm_seq_truncate(seqs[i], ctx);
    }
    free(items);
    free(tok);
    free(next);
    return rc;
}

/* TTFT: prefills P tokens (the three prompts rotated) into s (emptied first) warmup + reps times, the logits of
 * the last row to the host; times the last reps into t (device events where the backend has them). */
static int time_prefill(kvm_model_t *m, kvm_seq_t *s, const int32_t *prompts, float *logits, int P, int warmup, int reps,
                        timing_t *t) {
    int rc = 0;
    for (int r = 0; r < warmup + reps && !rc; r++) {
        kvm_seq_truncate(s, 0);
        kvm_batch_item_t it = {.seq = s, .tokens = prompts + (size_t)(r % 3) * P, .n_tokens = P, .logits = logits};
        rc = timed_forward(m, &it, 1, r >= warmup ? t : NULL);
    }
    return rc;
}

/* --profile: one eager step of each kind with every op timed (events around each op add a little), the decode
 * steps once per few-row matmul kernel (kvm_cuda_opts_t.skinny); graphs and the CUDA settings are restored. */
static int profile_steps(kvm_model_t *m, kvm_kv_pool_t *pool, kvm_seq_t **seqs, const int32_t *prompts, float *logits,
                         int P, int B, bool graphs_on) {
    char lbl[64];
    kvm_forward_set_graphs(m, false);
    kvm_seq_t *sp = kvm_seq_create(pool);
    kvm_batch_item_t it = {.seq = sp, .tokens = prompts, .n_tokens = P, .logits = logits};
    kvm_cuda_profile_begin();
    int rc = sp ? kvm_forward(m, &it, 1) : KVM_ENOMEM;
    snprintf(lbl, sizeof lbl, "prefill %d tokens", P);
    kvm_cuda_profile_end(stdout, lbl);
    kvm_seq_destroy(sp);
    const kvm_cuda_opts_t cuda_set = kvm_cuda_get_opts(); /* restored after the comparison */
    const char *modes[3] = {NULL, "gemv", "mma"};
    for (int k = 0; k < 3 && !rc; k++) {
        kvm_cuda_opts_t co = cuda_set;
        if (modes[k]) co.skinny = k == 1 ? KVM_CUDA_SKINNY_GEMV : KVM_CUDA_SKINNY_MMA;
        kvm_cuda_set_opts(&co);
        timing_t tp;
        timing_init(&tp, 3);
        kvm_cuda_profile_begin();
        rc = time_decode(m, seqs, 1, P, 0, 1, &tp);
        snprintf(lbl, sizeof lbl, "decode batch 1, skinny matmul %s", modes[k] ? modes[k] : "default");
        kvm_cuda_profile_end(stdout, lbl);
        if (!rc) {
            kvm_cuda_profile_begin();
            rc = time_decode(m, seqs, B, P, 0, 1, &tp);
            snprintf(lbl, sizeof lbl, "decode batch %d, skinny matmul %s", B, modes[k] ? modes[k] : "default");
            kvm_cuda_profile_end(stdout, lbl);
        }
        timing_free(&tp);
    }
    kvm_cuda_set_opts(&cuda_set);
    kvm_forward_set_graphs(m, graphs_on);
    if (rc) fprintf(stderr, "kvmesh bench engine (profile): %s\n", kvm_errmsg());
    return rc;
}

/* The figures of one `bench engine` run: what is printed and written to --json. */
typedef struct engine_report {
    const char *path, *card;
    char date[64];
    bool synthetic, graphs; /* synthetic weights; decode through graphs */
    char weights[8], kv[8];  /* dtypes as the report prints them: "BF16", "F32", ... */
    double load_s;
    int P, B, warmup;
    timing_t tt, d1, d1e, dB, dBe; /* TTFT, decode batch 1 (graph, eager), batch B (graph, eager); owned */
    stats_t st_tt, st_tth, st_d1, st_d1h, st_d1e, st_dB, st_dBh, st_dBe;
    double flops, b1_bytes, bB_bytes, tok_s_1, tok_s_B;
    double ttft_floor_peak, ttft_floor_meas, d1_floor_peak, d1_floor_meas, dB_floor_peak, dB_floor_meas;
    double hf_tt, hf_d1, hf_dB;
    /* the floors' rates: FLOP/s at peak and measured GEMM, bytes/s at peak and measured copy (H100 constants on
     * the GPU; on the CPU, cpu's measurements of this run) */
    double peak_flops, meas_flops, peak_bw, meas_bw;
    bool on_cpu;
    lab_cpu_limits_t cpu;
} engine_report_t;

/* Statistics, floors and the HF figures of r's timings (model sizes from model_sizes). */
static void report_figures(engine_report_t *r, const kvm_model_info_t *c, double p_layers, double p_head, double kv_tok,
                           cJSON *hf) {
    const int P = r->P, B = r->B;
    time_t now = time(NULL);
    strftime(r->date, sizeof r->date, "%Y-%m-%d %H:%M UTC", gmtime(&now));
    r->st_tt = stats_of(r->tt.dev, r->tt.n);
    r->st_tth = stats_of(r->tt.host, r->tt.n);
    r->st_d1 = stats_of(r->d1.dev, r->d1.n);
    r->st_d1h = stats_of(r->d1.host, r->d1.n);
    r->st_d1e = stats_of(r->d1e.dev, r->d1e.n);
    r->st_dB = stats_of(r->dB.dev, r->dB.n);
    r->st_dBh = stats_of(r->dB.host, r->dB.n);
    r->st_dBe = stats_of(r->dBe.dev, r->dBe.n);
    const double HQ = c->n_heads, HD = c->head_dim, L = c->n_layers;
    r->flops = 2.0 * p_layers * P + 2.0 * p_head + 2.0 * L * HQ * HD * (double)P * (P + 1);
    double w_bytes = (p_layers + p_head) * (!strcmp(r->weights, "F32") ? 4 : 2);
    r->b1_bytes = w_bytes + (P + 1) * kv_tok;
    r->bB_bytes = w_bytes + (double)B * (P + 1) * kv_tok;
    if (r->on_cpu) {
        r->peak_flops = r->cpu.fma_gflops * 1e9;
        r->meas_flops = r->cpu.sgemm_gflops * 1e9;
        r->peak_bw = r->cpu.read_gbs * 1e9;
        r->meas_bw = r->cpu.copy_gbs * 1e9;
    } else {
        r->peak_flops = PEAK_BF16_TFLOPS * 1e12;
        r->meas_flops = MEAS_GEMM_TFLOPS * 1e12;
        r->peak_bw = PEAK_HBM_TBS * 1e12;
        r->meas_bw = MEAS_COPY_TBS * 1e12;
    }
    /* floors in ms; 0 (printed "-") where a rate is unknown */
#define FLOOR_MS(amount, rate) ((rate) > 0 ? (amount) / (rate) * 1e3 : 0)
    r->ttft_floor_peak = FLOOR_MS(r->flops, r->peak_flops);
    r->ttft_floor_meas = FLOOR_MS(r->flops, r->meas_flops);
    r->d1_floor_peak = FLOOR_MS(r->b1_bytes, r->peak_bw);
    r->d1_floor_meas = FLOOR_MS(r->b1_bytes, r->meas_bw);
    r->dB_floor_peak = FLOOR_MS(r->bB_bytes, r->peak_bw);
    r->dB_floor_meas = FLOOR_MS(r->bB_bytes, r->meas_bw);
#undef FLOOR_MS
    r->tok_s_1 = r->st_d1.med > 0 ? 1000.0 / r->st_d1.med : 0;
    r->tok_s_B = r->st_dB.med > 0 ? 1000.0 * B / r->st_dB.med : 0;
    r->hf_tt = hf_get(hf, "ttft_ms");
    r->hf_d1 = hf_get(hf, "decode_b1_ms");
    r->hf_dB = hf_get(hf, "decode_bB_ms");
}

/* The CPU's limits measured in this run and our ratios to them (the floors' columns of the table). */
static void print_cpu_limits(const engine_report_t *r) {
    const lab_cpu_limits_t *L = &r->cpu;
    const double ours = r->flops / (r->st_tt.med * 1e6);
    printf("CPU limits, measured in this run on %d thread%s: FMA peak %.1f GFLOP/s (%s); ", L->threads,
           L->threads == 1 ? "" : "s", L->fma_gflops, L->isa);
    if (L->sgemm_name) printf("%s on the prefill's GEMM shapes %.1f GFLOP/s; ", L->sgemm_name, L->sgemm_gflops);
    else printf("no tuned SGEMM installed (Debian: apt-get install libopenblas0-pthread); ");
    printf("streaming read %.1f GB/s, copy %.1f GB/s\n", L->read_gbs, L->copy_gbs);
    printf("floor@peak = FMA peak (prefill) / streaming read (decode); floor@meas = the tuned SGEMM / copy\n");
    printf("prefill: %.1f GFLOP/s = %.0f%% of the FMA peak", ours, L->fma_gflops > 0 ? 100.0 * ours / L->fma_gflops : 0);
    if (L->sgemm_gflops > 0) printf(", %.2fx the tuned SGEMM's rate", ours / L->sgemm_gflops);
    printf("; decode b=1 reads %.1f MB a token: %.1f GB/s = %.0f%% of the streaming read\n", r->b1_bytes / 1e6,
           r->b1_bytes / (r->st_d1.med * 1e6), L->read_gbs > 0 ? 100.0 * r->b1_bytes / (r->st_d1.med * 1e6) / L->read_gbs : 0);
}

static void print_report(const engine_report_t *r) {
    printf("\nkvmesh bench engine — %s, %s\n", r->path, r->date);
    printf("card: %s\n", r->card);
    printf("model: %s; %s weights%s; KV %s; load %.1f s\n", r->path, r->weights,
           r->synthetic ? " (SYNTHETIC, seeded)" : "", r->kv, r->load_s);
    printf("workload: prompt %d tokens (TTFT, batch 1); decode at %d-token context, batch 1 and %d; %d warm-up, %d/%d reps\n",
           r->P, r->P, r->B, r->warmup, r->tt.n, r->d1.n);
    printf("\n| metric (median, device time)        |      ours | unit   |        HF |  HF/ours | floor@peak | floor@meas |\n");
    printf("|------------------------------------|-----------|--------|-----------|----------|-----------|-----------|\n");
    print_row("TTFT prefill", r->st_tt.med, "ms", r->hf_tt, r->ttft_floor_peak, r->ttft_floor_meas);
    print_row("TTFT prefill, host end-to-end", r->st_tth.med, "ms", 0, 0, 0);
    /* rates per ms: FLOP/ms / 1e9 = TFLOP/s; on the CPU GFLOP/s and GB/s read better */
    const double rs = r->on_cpu ? 1e6 : 1e9;
    const char *fl_unit = r->on_cpu ? "GFLOP/s" : "TFLOP/s", *bw_unit = r->on_cpu ? "GB/s" : "TB/s";
    print_row("prefill achieved", r->flops / (r->st_tt.med * rs), fl_unit, 0, 0, 0);
    print_row(r->graphs ? "decode b=1 (graph)" : "decode b=1", r->st_d1.med, "ms/tok", r->hf_d1, r->d1_floor_peak, r->d1_floor_meas);
    if (r->d1e.n) print_row("decode b=1 (eager)", r->st_d1e.med, "ms/tok", 0, 0, 0);
    print_row("decode b=1, host end-to-end", r->st_d1h.med, "ms/tok", 0, 0, 0);
    print_row("decode b=1 achieved", r->b1_bytes / (r->st_d1.med * rs), bw_unit, 0, 0, 0);
    print_row("decode b=1 tokens/s", r->tok_s_1, "tok/s", r->hf_d1 > 0 ? 1000.0 / r->hf_d1 : 0, 0, 0);
    char lbl[64];
    snprintf(lbl, sizeof lbl, "decode b=%d step%s", r->B, r->graphs ? " (graph)" : "");
    print_row(lbl, r->st_dB.med, "ms", r->hf_dB, r->dB_floor_peak, r->dB_floor_meas);
    if (r->dBe.n) {
        snprintf(lbl, sizeof lbl, "decode b=%d step (eager)", r->B);
        print_row(lbl, r->st_dBe.med, "ms", 0, 0, 0);
    }
    snprintf(lbl, sizeof lbl, "decode b=%d step, host end-to-end", r->B);
    print_row(lbl, r->st_dBh.med, "ms", 0, 0, 0);
    snprintf(lbl, sizeof lbl, "decode b=%d tokens/s", r->B);
    print_row(lbl, r->tok_s_B, "tok/s", r->hf_dB > 0 ? 1000.0 * r->B / r->hf_dB : 0, 0, 0);
    snprintf(lbl, sizeof lbl, "decode b=%d achieved", r->B);
    print_row(lbl, r->bB_bytes / (r->st_dB.med * rs), bw_unit, 0, 0, 0);
    printf("\nspread (p10-p90): TTFT %.3f-%.3f ms; decode b=1 %.3f-%.3f ms; b=%d %.3f-%.3f ms\n", r->st_tt.p10, r->st_tt.p90,
           r->st_d1.p10, r->st_d1.p90, r->B, r->st_dB.p10, r->st_dB.p90);
    printf("batch %d / batch 1 tokens/s: %.2fx (target >= %s)\n", r->B, r->tok_s_1 > 0 ? r->tok_s_B / r->tok_s_1 : 0,
           r->on_cpu ? "4x" : "10x");
    if (r->on_cpu) {
        print_cpu_limits(r);
        return;
    }
    printf("floors: prefill %.2f GFLOP (%.0f / %.0f TFLOP/s: datasheet / measured GEMM); decode b=1 %.2f GB, b=%d %.2f GB "
           "(%.2f / %.2f TB/s: datasheet / measured copy)\n",
           r->flops / 1e9, PEAK_BF16_TFLOPS, MEAS_GEMM_TFLOPS, r->b1_bytes / 1e9, r->B, r->bB_bytes / 1e9, PEAK_HBM_TBS, MEAS_COPY_TBS);
}

typedef lab_json_num_t json_num_t;
#define add_nums lab_json_add_nums

static void write_report_json(const engine_report_t *r, const char *json_path, cJSON *hf) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "bench", "engine");
    cJSON_AddStringToObject(o, "model", r->path);
    cJSON_AddBoolToObject(o, "synthetic_weights", r->synthetic);
    cJSON_AddStringToObject(o, "card", r->card);
    cJSON_AddStringToObject(o, "date", r->date);
    cJSON_AddStringToObject(o, "weights_dtype", r->weights);
    const json_num_t shape[] = {{"prompt_tokens", r->P}, {"batch", r->B}, {"warmup", r->warmup}};
    add_nums(o, shape, sizeof shape / sizeof shape[0]);
    const struct {
        const char *key;
        const stats_t *st;
        const double *reps;
    } times[] = {{"ttft_ms", &r->st_tt, r->tt.dev},           {"ttft_host_ms", &r->st_tth, r->tt.host},
                 {"decode_b1_ms", &r->st_d1, r->d1.dev},      {"decode_b1_host_ms", &r->st_d1h, r->d1.host},
                 {"decode_b1_eager_ms", &r->st_d1e, r->d1e.dev}, {"decode_bB_ms", &r->st_dB, r->dB.dev},
                 {"decode_bB_host_ms", &r->st_dBh, r->dB.host}, {"decode_bB_eager_ms", &r->st_dBe, r->dBe.dev}};
    for (size_t i = 0; i < sizeof times / sizeof times[0]; i++)
        cJSON_AddItemToObject(o, times[i].key, stats_json(times[i].st, times[i].reps));
    const json_num_t rates[] = {{"prefill_flops", r->flops},
                                {"prefill_tflops", r->flops / (r->st_tt.med * 1e9)},
                                {"decode_b1_bytes", r->b1_bytes},
                                {"decode_b1_tbs", r->b1_bytes / (r->st_d1.med * 1e9)},
                                {"decode_bB_bytes", r->bB_bytes},
                                {"decode_bB_tbs", r->bB_bytes / (r->st_dB.med * 1e9)},
                                {"tokens_per_s_b1", r->tok_s_1},
                                {"tokens_per_s_bB", r->tok_s_B}};
    add_nums(o, rates, sizeof rates / sizeof rates[0]);
    const json_num_t floors[] = {{"ttft_peak", r->ttft_floor_peak},     {"ttft_measured_gemm", r->ttft_floor_meas},
                                 {"decode_b1_peak", r->d1_floor_peak},  {"decode_b1_measured_copy", r->d1_floor_meas},
                                 {"decode_bB_peak", r->dB_floor_peak},  {"decode_bB_measured_copy", r->dB_floor_meas}};
    add_nums(cJSON_AddObjectToObject(o, "floors_ms"), floors, sizeof floors / sizeof floors[0]);
    if (hf) cJSON_AddItemToObject(o, "hf", cJSON_Duplicate(hf, 1));
    if (lab_json_write(o, json_path)) fprintf(stderr, "kvmesh bench engine: cannot write %s\n", json_path);
    cJSON_Delete(o);
}

/* The results of scripts/bench/hf_engine.py (NULL, said on stderr, when the file cannot be read or parsed). */
static cJSON *read_hf_json(const char *path) {
    FILE *f = fopen(path, "rb");
    char *text = NULL;
    long len = -1;
    if (f && fseek(f, 0, SEEK_END) == 0 && (len = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0)
        text = malloc((size_t)len + 1);
    if (text && fread(text, 1, (size_t)len, f) == (size_t)len) text[len] = 0;
    else free(text), text = NULL;
    if (f) fclose(f);
    cJSON *hf = text ? cJSON_Parse(text) : NULL;
    free(text);
    if (!hf) fprintf(stderr, "kvmesh bench engine: cannot read the HF results %s (continuing without)\n", path);
    return hf;
}

/* A dtype name of kvmesh_lab.h ("bf16") as the report prints it ("BF16"). */
static void dtype_upper(char *out, size_t cap, const char *name) {
    size_t i = 0;
    for (; name[i] && i + 1 < cap; i++) out[i] = (char)(name[i] >= 'a' && name[i] <= 'z' ? name[i] - 32 : name[i]);
    out[i] = 0;
}

/* The options of `bench engine`. */
typedef struct engine_opts {
    const char *synth, *model, *backend, *json_path, *hf_path;
    int P, B, reps, warmup;
    bool eager, profile;
} engine_opts_t;

/* Parses argv into *o: 0, 1 for --help (printed), 2 on a usage error (said). */
static int engine_args(int argc, char **argv, engine_opts_t *o) {
    *o = (engine_opts_t){.P = 1024, .B = 16, .reps = 20, .warmup = 3, .eager = true};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has = i + 1 < argc;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            bench_help(stdout);
            return 1;
        } else if (!strcmp(a, "--synthetic") && has) o->synth = argv[++i];
        else if (!strcmp(a, "--model") && has) o->model = argv[++i];
        else if (!strcmp(a, "--backend") && has) o->backend = argv[++i];
        else if (!strcmp(a, "--prompt") && has) o->P = atoi(argv[++i]);
        else if (!strcmp(a, "--batch") && has) o->B = atoi(argv[++i]);
        else if (!strcmp(a, "--reps") && has) o->reps = atoi(argv[++i]);
        else if (!strcmp(a, "--warmup") && has) o->warmup = atoi(argv[++i]);
        else if (!strcmp(a, "--json") && has) o->json_path = argv[++i];
        else if (!strcmp(a, "--hf-json") && has) o->hf_path = argv[++i];
        else if (!strcmp(a, "--no-eager")) o->eager = false;
        else if (!strcmp(a, "--profile")) o->profile = true;
        else {
            fprintf(stderr, "kvmesh bench engine: unknown or incomplete option '%s' (see --help)\n", a);
            return 2;
        }
    }
    if (!o->synth == !o->model || o->P < 2 || o->B < 1 || o->reps < 1 || o->warmup < 0) {
        fprintf(stderr, "kvmesh bench engine: give exactly one of --synthetic NAME or --model PATH (see --help)\n");
        return 2;
    }
    return 0;
}

/* The measurements of bench engine on a loaded model: TTFT, then decode at batch 1 and B (graphs, and eager when
 * asked), into *rep's timings; the report and --profile. Returns 0 or the failing step's code (said on stderr). */
static int engine_measure(kvm_model_t *m, const engine_opts_t *o, bool graphs_on, engine_report_t *rep, cJSON *hf) {
    const int P = o->P, B = o->B, reps = o->reps, warmup = o->warmup;
    kvm_model_info_t c;
    kvm_model_info(m, &c);
    int rc = kvm_forward_init(m, P);
    const int kv_elem = strcmp(kvm_model_kv_dtype(m), "f32") ? 2 : 4;
    double p_layers, p_head, kv_tok;
    model_sizes(&c, &p_layers, &p_head, &kv_tok, kv_elem);
    /* KV for B sequences of P + 2 tokens (+ slack for the block rounding) */
    size_t kv_bytes = (size_t)((double)(B + 1) * (P + 64) * kv_tok);
    kvm_kv_pool_t *pool = rc ? NULL : kvm_model_kv_pool(m, kv_bytes);
    if (!pool) {
        fprintf(stderr, "kvmesh bench engine: %s\n", kvm_errmsg());
        return KVM_ENOMEM;
    }
    const int V = c.vocab_size;
    const bool graphs = kvm_model_has_graphs(m);
    /* three prompts, rotated */
    int32_t *prompts = malloc((size_t)3 * P * sizeof(int32_t));
    for (int k = 0; k < 3 * P; k++) prompts[k] = (int32_t)(lab_mix64(0xbe7c4ULL + k) % (uint64_t)V);
    float *logits = malloc((size_t)V * sizeof(float));
    kvm_seq_t **seqs = calloc((size_t)B, sizeof *seqs);
    for (int i = 0; i < B; i++) seqs[i] = kvm_seq_create(pool);

    /* ---- 1. TTFT: prefill P tokens, logits of the last ---- */
    timing_init(&rep->tt, reps);
    kvm_seq_t *s0 = kvm_seq_create(pool);
    if (!rc) rc = time_prefill(m, s0, prompts, logits, P, warmup, reps, &rep->tt);
    /* ---- 2. decode at batch 1 with a P-token context ---- */
    timing_init(&rep->d1, reps * 5);
    timing_init(&rep->d1e, reps * 5);
    timing_init(&rep->dB, reps * 5);
    timing_init(&rep->dBe, reps * 5);
    if (!rc) rc = time_decode(m, &s0, 1, P, warmup, reps * 5, &rep->d1);
    if (!rc && o->eager && graphs) {
        kvm_forward_set_graphs(m, false);
        rc = time_decode(m, &s0, 1, P, warmup, reps * 5, &rep->d1e);
        kvm_forward_set_graphs(m, graphs_on);
    }
    /* ---- 3. decode at batch B, every sequence with a P-token context ---- */
    kvm_seq_destroy(s0);
    for (int i = 0; i < B && !rc; i++) {
        kvm_batch_item_t it = {.seq = seqs[i], .tokens = prompts + (size_t)(i % 3) * P, .n_tokens = P, .logits = NULL};
        rc = kvm_forward(m, &it, 1);
    }
    if (!rc) rc = time_decode(m, seqs, B, P, warmup, reps * 5, &rep->dB);
    if (!rc && o->eager && graphs) {
        kvm_forward_set_graphs(m, false);
        rc = time_decode(m, seqs, B, P, warmup, reps * 5, &rep->dBe);
        kvm_forward_set_graphs(m, graphs_on);
    }
    if (rc) fprintf(stderr, "kvmesh bench engine: %s\n", kvm_errmsg());

    rep->graphs = graphs;
    dtype_upper(rep->weights, sizeof rep->weights, kvm_model_device_dtype(m));
    dtype_upper(rep->kv, sizeof rep->kv, kvm_model_kv_dtype(m));
    rep->on_cpu = c.backend && !strcmp(c.backend, "cpu");
    if (rep->on_cpu && !rc) { /* after the engine's timings: the SGEMM library's idle threads must not disturb them */
        const int D = c.dim, QD = c.n_heads * c.head_dim, KD = c.n_kv_heads * c.head_dim, F = c.hidden_dim, L = c.n_layers;
        const lab_gemm_shape_t shapes[] = {{P, QD, D, L}, {P, KD, D, 2 * L}, {P, D, QD, L}, {P, F, D, 2 * L}, {P, D, F, L}};
        fprintf(stderr, "kvmesh bench engine: measuring the CPU's limits (FMA, SGEMM, memory; a few seconds)...\n");
        lab_cpu_limits_measure(kvm_threads(), shapes, (int)(sizeof shapes / sizeof shapes[0]), &rep->cpu);
    }
    report_figures(rep, &c, p_layers, p_head, kv_tok, hf);
    print_report(rep);
    if (o->json_path) write_report_json(rep, o->json_path, hf);
    if (!rc && o->profile && graphs) rc = profile_steps(m, pool, seqs, prompts, logits, P, B, graphs_on);
    for (int i = 0; i < B; i++) kvm_seq_destroy(seqs[i]);
    free(seqs);
    free(prompts);
    free(logits);
    kvm_kv_pool_free(pool);
    return rc;
}

static int bench_engine(int argc, char **argv, kvm_lab_params_fn fill) {
    engine_opts_t o;
    int rc = engine_args(argc, argv, &o);
    if (rc) return rc == 1 ? 0 : rc;
    cJSON *hf = o.hf_path ? read_hf_json(o.hf_path) : NULL;
    char path[512];
    if (o.synth) snprintf(path, sizeof path, "synthetic:%s", o.synth);
    else snprintf(path, sizeof path, "%s", o.model);
    kvm_model_params_t mp = {.backend = o.backend, .quiet = false};
    if ((fill && fill(&mp)) || kvm_model_params_check(&mp)) {
        fprintf(stderr, "kvmesh bench engine: %s\n", kvm_errmsg());
        cJSON_Delete(hf);
        return 2;
    }
    uint64_t t_load = kvm_now_ns();
    kvm_model_t *m = kvm_model_load(path, &mp);
    if (!m) {
        fprintf(stderr, "kvmesh bench engine: %s\n", kvm_errmsg());
        cJSON_Delete(hf);
        return 1;
    }
    char card[256];
    kvm_model_device_describe(m, card, sizeof card);
    engine_report_t rep = {.path = path, .card = card, .synthetic = o.synth != NULL,
                           .load_s = (double)(kvm_now_ns() - t_load) / 1e9, .P = o.P, .B = o.B, .warmup = o.warmup};
    rc = engine_measure(m, &o, mp.cuda_graphs >= 0, &rep, hf);
    timing_free(&rep.tt);
    timing_free(&rep.d1);
    timing_free(&rep.d1e);
    timing_free(&rep.dB);
    timing_free(&rep.dBe);
    kvm_model_free(m);
    cJSON_Delete(hf);
    return rc ? 1 : 0;
}

int kvm_lab_cmd_bench(int argc, char **argv, kvm_lab_params_fn fill) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        bench_help(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "engine")) return bench_engine(argc - 1, argv + 1, fill);
    if (!strcmp(argv[1], "kvcomm")) return lab_bench_kvcomm(argc - 1, argv + 1, fill);
    if (!strcmp(argv[1], "blame")) return lab_bench_blame(argc - 1, argv + 1, fill);
    if (!strcmp(argv[1], "c2c")) return lab_bench_c2c(argc - 1, argv + 1, fill);
    fprintf(stderr, "kvmesh bench: unknown benchmark '%s' (engine, kvcomm, blame, c2c)\n", argv[1]);
    return 2;
}
