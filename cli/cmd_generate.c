/* cmd_generate.c - `kvmesh generate` and `kvmesh info`, on the public API (include/kvmesh.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kvmesh.h>

#include "cli_env.h"

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

/* Loads the model of `kvmesh CMD` with the CLI's environment mapped onto the parameters; NULL after printing
 * why (exit status in *status: 2 for a bad setting, 1 for a model that does not load). */
static kvm_model_t *load_model(const char *cmd, const char *model, const char *tokp, const char *backend, int *status) {
    kvm_model_params_t mp = kvm_model_default_params();
    mp.tokenizer_path = tokp;
    mp.backend = backend;
    if (cli_env_model_params(&mp) != 0) {
        fprintf(stderr, "kvmesh %s: %s\n", cmd, kvm_errmsg());
        *status = 2;
        return NULL;
    }
    kvm_model_t *m = kvm_model_load(model, &mp);
    if (!m) {
        fprintf(stderr, "kvmesh %s: %s\n", cmd, kvm_errmsg());
        *status = 1;
    }
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

typedef struct gen_args {
    const char *model, *tokp, *prompt, *backend;
    const char *stops[16];
    bool echo;
    int max_tokens; /* 0 = not given */
    kvm_generate_params_t gp;
} gen_args_t;

/* Parses the options into *a; -1 to go on, else the exit status. */
static int parse_generate(int argc, char **argv, gen_args_t *a) {
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) {
            generate_help(stdout);
            return 0;
        } else if (!strcmp(o, "--chat")) {
            a->gp.chat = true;
        } else if (!strcmp(o, "--ignore-eos")) {
            a->gp.ignore_eos = true;
        } else if (!strcmp(o, "--no-echo")) {
            a->echo = false;
        } else if (!need_arg(i, argc, o)) {
            return 2;
        } else if (!strcmp(o, "--model")) {
            a->model = argv[++i];
        } else if (!strcmp(o, "--tokenizer")) {
            a->tokp = argv[++i];
        } else if (!strcmp(o, "--prompt")) {
            a->prompt = argv[++i];
        } else if (!strcmp(o, "--system")) {
            a->gp.system = argv[++i];
        } else if (!strcmp(o, "--backend")) {
            a->backend = argv[++i];
        } else if (!strcmp(o, "--max-tokens")) {
            if (!parse_count(o, argv[++i], &a->max_tokens)) return 2;
        } else if (!strcmp(o, "--steps")) {
            if (!parse_count(o, argv[++i], &a->gp.max_total_tokens)) return 2;
        } else if (!strcmp(o, "--temperature")) {
            a->gp.temperature = (float)atof(argv[++i]);
        } else if (!strcmp(o, "--top-k")) {
            a->gp.top_k = atoi(argv[++i]);
        } else if (!strcmp(o, "--top-p")) {
            a->gp.top_p = (float)atof(argv[++i]);
        } else if (!strcmp(o, "--repetition-penalty")) {
            a->gp.repetition_penalty = (float)atof(argv[++i]);
        } else if (!strcmp(o, "--seed")) {
            a->gp.seed = strtoull(argv[++i], NULL, 10);
        } else if (!strcmp(o, "--stop")) {
            if (a->gp.n_stop == 16) {
                fprintf(stderr, "kvmesh generate: at most 16 --stop strings\n");
                return 2;
            }
            a->stops[a->gp.n_stop++] = argv[++i];
        } else {
            fprintf(stderr, "kvmesh generate: unknown option '%s' (see --help)\n", o);
            return 2;
        }
    }
    if (!a->model || !a->prompt) {
        fprintf(stderr, "kvmesh generate: --model and --prompt are required (see --help)\n");
        return 2;
    }
    if (a->max_tokens > 0) a->gp.max_tokens = a->max_tokens;
    else if (a->gp.max_total_tokens > 0) a->gp.max_tokens = a->gp.max_total_tokens;
    a->gp.stop = a->stops;
    return -1;
}

/* Prints the prompt as the model reads it (its ids decoded, special tokens left out). */
static void echo_prompt(const kvm_model_t *m, const char *prompt) {
    const kvm_tokenizer_t *tok = kvm_model_tokenizer(m);
    int32_t *ids = NULL;
    int n = 0;
    char *text = NULL;
    size_t len = 0;
    if (tok && kvm_tokenize(tok, prompt, strlen(prompt), KVM_TOK_ADD_BOS, &ids, &n) == 0 &&
        kvm_detokenize(tok, ids, n, true, &text, &len) == 0)
        fwrite(text, 1, len, stdout);
    kvm_free(text);
    kvm_free(ids);
}

int cmd_generate(int argc, char **argv) {
    gen_args_t a = {.echo = true, .gp = kvm_generate_default_params()};
    int rc = parse_generate(argc, argv, &a);
    if (rc >= 0) return rc;
    fprintf(stderr, "kvmesh: loading %s ...\n", a.model);
    kvm_model_t *m = load_model("generate", a.model, a.tokp, a.backend, &rc);
    if (!m) return rc;
    char desc[512];
    kvm_model_describe(m, desc, sizeof desc);
    fprintf(stderr, "kvmesh: %s\n", desc);
    if (a.echo && !a.gp.chat) echo_prompt(m, a.prompt);
    kvm_generation_t res;
    rc = kvm_model_generate(m, a.prompt, &a.gp, stream_cb, NULL, &res);
    if (rc) {
        fprintf(stderr, "\nkvmesh generate: %s\n", kvm_errmsg());
    } else {
        kvm_model_info_t info;
        kvm_model_info(m, &info);
        printf("\n");
        fflush(stdout);
        double tps = res.n_ids > 1 && res.decode_ms > 0 ? (res.n_ids - 1) / (res.decode_ms / 1e3) : 0;
        fprintf(stderr, "prompt tokens: %d, generated tokens: %d, TTFT: %.1f ms, decode: %.1f tokens/s, stop: %s, backend: %s\n",
                res.n_prompt, res.n_ids, res.ttft_ms, tps, kvm_stop_reason_name(res.stop_reason), info.backend);
    }
    kvm_generation_clear(&res);
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
    int rc = 0;
    kvm_model_t *m = load_model("info", model, tokp, backend, &rc);
    if (!m) return rc;
    char desc[512];
    kvm_model_describe(m, desc, sizeof desc);
    printf("%s\n", desc);
    kvm_model_info_t info;
    kvm_model_info(m, &info);
    printf("chat format: %s; bos: %d; eos:", info.chat_format, info.bos_id);
    for (int i = 0; i < info.n_eos; i++) printf(" %d", info.eos_ids[i]);
    printf("; tokenizer: %s; max context: %d\n", info.tokenizer, info.max_context);
    kvm_model_free(m);
    return 0;
}
