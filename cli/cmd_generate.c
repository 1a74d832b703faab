/* cmd_generate.c - `kvmesh generate` and `kvmesh info`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/model/generate.h"

static void generate_help(FILE *f) {
    fprintf(f,
            "usage: kvmesh generate --model PATH --prompt TEXT [options]\n\n"
            "Generates text, streaming tokens as they come, then prints one line of figures on stderr.\n\n"
            "  --model PATH            HF model directory, llama2.c checkpoint (.bin) or synthetic:<name>\n"
            "  --tokenizer FILE        tokenizer.bin for llama2.c checkpoints (default: beside the model)\n"
            "  --prompt TEXT           the prompt (required)\n"
            "  --system TEXT           system prompt (with --chat)\n"
            "  --chat                  render the prompt in the model's chat format (Llama-3, ChatML, Llama-2)\n"
            "  --max-tokens N          new tokens at most, N >= 1 (default 256; with --steps, N of --steps)\n"
            "  --steps N               llama2.c convention: stop when the sequence (prompt included) has N tokens\n"
            "  --temperature T         0 = greedy (default: the model's generation_config, else 0)\n"
            "  --top-k K               keep the K most likely tokens (0 = off)\n"
            "  --top-p P               nucleus sampling mass (1 = off)\n"
            "  --repetition-penalty R  HF-style penalty over prompt + output (1 = off)\n"
            "  --seed S                sampling seed (default 0)\n"
            "  --stop TEXT             stop when the output contains TEXT (repeatable)\n"
            "  --ignore-eos            keep generating past end-of-sequence tokens\n"
            "  --backend B             auto (default), cpu or cuda\n"
            "  --no-echo               do not print the prompt before the output\n"
            "  --help                  this text\n\n"
            "example:\n"
            "  kvmesh generate --model ../shared/models/stories260K/stories260K.bin \\\n"
            "      --tokenizer ../shared/models/stories260K/tok512.bin --prompt \"Once upon a time\" --max-tokens 64\n");
}

/* Loads the model of `kvmesh CMD`; NULL after printing why. */
static kvm_model_t *load_model(const char *cmd, const char *model, const char *tokp, const char *backend) {
    kvm_load_opts_t lo = {.tokenizer_path = tokp, .backend = backend};
    kvm_model_t *m = kvm_model_load(model, &lo);
    if (!m) fprintf(stderr, "kvmesh %s: %s\n", cmd, kvm_errmsg());
    return m;
}

static int stream_cb(void *ud, int32_t id, const char *bytes, size_t n) {
    (void)ud;
    (void)id;
    fwrite(bytes, 1, n, stdout);
    fflush(stdout);
    return 0;
}

/* An integer option value >= 1, or a usage message naming the option. */
static int parse_count(const char *opt, const char *v, int *out) {
    char *end = NULL;
    long x = strtol(v, &end, 10);
    if (!*v || *end || x < 1 || x > (1L << 30)) {
        fprintf(stderr, "kvmesh generate: %s must be a whole number of at least 1 (got '%s')\n", opt, v);
        return 0;
    }
    *out = (int)x;
    return 1;
}

static int need_arg(int i, int argc, const char *opt) {
    if (i + 1 >= argc) {
        fprintf(stderr, "kvmesh generate: %s needs a value (see --help)\n", opt);
        return 0;
    }
    return 1;
}

int cmd_generate(int argc, char **argv) {
    const char *model = NULL, *tokp = NULL, *prompt = NULL, *system = NULL, *backend = NULL;
    const char *stops[16];
    int n_stops = 0;
    bool chat = false, echo = true;
    kvm_gen_params_t gp = kvm_gen_default_params();
    bool temp_set = false;
    int max_tokens = 0; /* 0 = not given */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            generate_help(stdout);
            return 0;
        } else if (!strcmp(a, "--chat")) {
            chat = true;
        } else if (!strcmp(a, "--ignore-eos")) {
            gp.ignore_eos = true;
        } else if (!strcmp(a, "--no-echo")) {
            echo = false;
        } else if (!need_arg(i, argc, a)) {
            return 2;
        } else if (!strcmp(a, "--model")) {
            model = argv[++i];
        } else if (!strcmp(a, "--tokenizer")) {
            tokp = argv[++i];
        } else if (!strcmp(a, "--prompt")) {
            prompt = argv[++i];
        } else if (!strcmp(a, "--system")) {
            system = argv[++i];
        } else if (!strcmp(a, "--backend")) {
            backend = argv[++i];
        } else if (!strcmp(a, "--max-tokens")) {
            if (!parse_count(a, argv[++i], &max_tokens)) return 2;
        } else if (!strcmp(a, "--steps")) {
            if (!parse_count(a, argv[++i], &gp.max_total_tokens)) return 2;
        } else if (!strcmp(a, "--temperature")) {
            gp.sampling.temperature = (float)atof(argv[++i]);
            temp_set = true;
        } else if (!strcmp(a, "--top-k")) {
            gp.sampling.top_k = atoi(argv[++i]);
        } else if (!strcmp(a, "--top-p")) {
            gp.sampling.top_p = (float)atof(argv[++i]);
        } else if (!strcmp(a, "--repetition-penalty")) {
            gp.sampling.repetition_penalty = (float)atof(argv[++i]);
        } else if (!strcmp(a, "--seed")) {
            gp.sampling.seed = strtoull(argv[++i], NULL, 10);
        } else if (!strcmp(a, "--stop")) {
            if (n_stops == 16) {
                fprintf(stderr, "kvmesh generate: at most 16 --stop strings\n");
                return 2;
            }
            stops[n_stops++] = argv[++i];
        } else {
            fprintf(stderr, "kvmesh generate: unknown option '%s' (see --help)\n", a);
            return 2;
        }
    }
    if (!model || !prompt) {
        fprintf(stderr, "kvmesh generate: --model and --prompt are required (see --help)\n");
        return 2;
    }
    if (max_tokens > 0) gp.max_tokens = max_tokens;
    else if (gp.max_total_tokens > 0) gp.max_tokens = gp.max_total_tokens;
    gp.stop_strings = stops;
    gp.n_stop_strings = n_stops;
    fprintf(stderr, "kvmesh: loading %s ...\n", model);
    kvm_model_t *m = load_model("generate", model, tokp, backend);
    if (!m) return 1;
    char desc[512];
    kvm_model_describe(m, desc, sizeof desc);
    fprintf(stderr, "kvmesh: %s\n", desc);
    if (!temp_set) gp.sampling.temperature = m->cfg.gen_temperature > 0 ? m->cfg.gen_temperature : 0;
    int32_t *ids = NULL;
    int n = 0;
    int rc = kvm_prompt_encode(m, system, prompt, chat, &ids, &n);
    kvm_kv_pool_t *pool = rc ? NULL : kvm_model_kv_pool(m, 0);
    if (!rc && !pool) rc = kvm_errcode();
    kvm_gen_result_t res = {0};
    if (!rc) {
        if (echo && !chat) {
            char *pt = NULL;
            size_t pl = 0;
            if (!kvm_detokenize(m->tok, ids, n, true, &pt, &pl)) {
                fwrite(pt, 1, pl, stdout);
                kvm_free(pt);
            }
        }
        kvm_seq_t seq;
        kvm_seq_init(&seq, pool);
        rc = kvm_generate(m, &seq, ids, n, &gp, stream_cb, NULL, &res);
        kvm_seq_free(&seq);
    }
    if (rc) {
        fprintf(stderr, "\nkvmesh generate: %s\n", kvm_errmsg());
    } else {
        printf("\n");
        fflush(stdout);
        double tps = res.n_ids > 1 && res.decode_ms > 0 ? (res.n_ids - 1) / (res.decode_ms / 1e3) : 0;
        fprintf(stderr, "prompt tokens: %d, generated tokens: %d, TTFT: %.1f ms, decode: %.1f tokens/s, stop: %s, backend: %s\n",
                n, res.n_ids, res.ttft_ms, tps, kvm_stop_reason_name(res.stop_reason), m->ops->name);
    }
    kvm_gen_result_free(&res);
    kvm_free(ids);
    kvm_kv_pool_free(pool);
    kvm_model_free(m);
    return rc ? 1 : 0;
}

int cmd_info(int argc, char **argv) {
    const char *model = NULL, *tokp = NULL, *backend = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: kvmesh info --model PATH [--tokenizer FILE] [--backend auto|cpu|cuda]\n\n"
                   "Loads a model and prints its shapes, dtypes, RoPE, chat format, EOS ids and the backend.\n");
            return 0;
        } else if (i + 1 < argc && !strcmp(argv[i], "--model")) {
            model = argv[++i];
        } else if (i + 1 < argc && !strcmp(argv[i], "--tokenizer")) {
            tokp = argv[++i];
        } else if (i + 1 < argc && !strcmp(argv[i], "--backend")) {
            backend = argv[++i];
        } else {
            fprintf(stderr, "kvmesh info: unknown option '%s' (see --help)\n", argv[i]);
            return 2;
        }
    }
    if (!model) {
        fprintf(stderr, "kvmesh info: --model is required\n");
        return 2;
    }
    kvm_model_t *m = load_model("info", model, tokp, backend);
    if (!m) return 1;
    char desc[512];
    kvm_model_describe(m, desc, sizeof desc);
    printf("%s\n", desc);
    printf("chat format: %s; bos: %d; eos:", kvm_chat_format_name(m->cfg.chat_format), m->cfg.bos_id);
    for (int i = 0; i < m->cfg.n_eos; i++) printf(" %d", m->cfg.eos_ids[i]);
    printf("; tokenizer: %s; max context: %d\n", m->tok ? kvm_tokenizer_kind(m->tok) : "none", m->cfg.max_seq_len);
    kvm_model_free(m);
    return 0;
}
