/* cmd_tokenize.c - `kvmesh tokenize`: prints the token ids of a text as a one-line JSON array (include/kvmesh.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kvmesh.h>

static void tokenize_help(FILE *f) {
    fprintf(f,
            "usage: kvmesh tokenize (--model DIR|FILE | --tokenizer FILE) --text TEXT [options]\n\n"
            "Prints the token ids of TEXT as a JSON array on one line.\n\n"
            "  --model DIR|FILE   HF model directory (its tokenizer.json + tokenizer_config.json), a tokenizer.json, or a\n"
            "                     llama2.c checkpoint (.bin: its tokenizer.bin or tok<vocab>.bin beside it)\n"
            "  --tokenizer FILE   a tokenizer.json, or a llama2.c tokenizer.bin (for llama2.c .bin models)\n"
            "  --vocab-size N     entries in a llama2.c tokenizer.bin (default: counted from the file)\n"
            "  --text TEXT        the text to encode (required)\n"
            "  --no-special       treat special-token strings such as <|im_end|> as plain text\n"
            "                     (default: they become their ids, as HF tokenizers does)\n"
            "  --bos              add what the tokenizer adds at the start of a sequence (BOS)\n"
            "  --decode           print the decoded text of the ids on a second line\n"
            "  --help             this text\n\n"
            "examples:\n"
            "  kvmesh tokenize --model models/Qwen3-0.6B --text '<|im_start|>user' \n"
            "  kvmesh tokenize --tokenizer ../shared/models/stories260K/tok512.bin --bos --text 'Once upon a time'\n");
}

/* What tokenizes: a tokenizer loaded on its own (a tokenizer.json, a model directory or a llama2.c
 * tokenizer.bin), or, for a llama2.c checkpoint given as --model without --tokenizer, the checkpoint's own
 * (tokenizer.bin or tok<vocab>.bin beside it, found as `kvmesh generate` finds it). */
typedef struct tok_src {
    kvm_tokenizer_t *own;
    kvm_model_t *model;
    const kvm_tokenizer_t *t;
} tok_src_t;

static int open_tokenizer(const char *model, const char *tokp, int vocab_size, tok_src_t *s) {
    const char *path = tokp ? tokp : model;
    size_t n = strlen(path);
    if (!tokp && n >= 4 && !strcmp(path + n - 4, ".bin")) {
        kvm_model_params_t mp = kvm_model_default_params();
        mp.backend = "cpu";
        mp.quiet = true;
        s->model = kvm_model_load(model, &mp);
        s->t = s->model ? kvm_model_tokenizer(s->model) : NULL;
        if (s->model && !s->t)
            fprintf(stderr, "kvmesh tokenize: %s: no tokenizer.bin or tok<vocab>.bin beside this llama2.c checkpoint: "
                            "pass --tokenizer FILE\n", model);
    } else {
        s->t = s->own = kvm_tokenizer_load(path, vocab_size);
    }
    if (!s->model && !s->t) fprintf(stderr, "kvmesh tokenize: %s\n", kvm_errmsg());
    return s->t ? 0 : 1;
}

static void close_tokenizer(tok_src_t *s) {
    kvm_tokenizer_free(s->own);
    kvm_model_free(s->model);
}

int cmd_tokenize(int argc, char **argv) {
    const char *model = NULL, *tokp = NULL, *text = NULL;
    int flags = KVM_TOK_PARSE_SPECIAL, vocab_size = 0;
    bool decode = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has_val = i + 1 < argc;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            tokenize_help(stdout);
            return 0;
        } else if (!strcmp(a, "--no-special")) {
            flags &= ~KVM_TOK_PARSE_SPECIAL;
        } else if (!strcmp(a, "--bos")) {
            flags |= KVM_TOK_ADD_BOS;
        } else if (!strcmp(a, "--decode")) {
            decode = true;
        } else if (!strcmp(a, "--model") || !strcmp(a, "--tokenizer") || !strcmp(a, "--text") || !strcmp(a, "--vocab-size")) {
            if (!has_val) {
                fprintf(stderr, "kvmesh tokenize: %s needs a value (see --help)\n", a);
                return 2;
            }
            const char *v = argv[++i];
            if (!strcmp(a, "--model")) model = v;
            else if (!strcmp(a, "--tokenizer")) tokp = v;
            else if (!strcmp(a, "--text")) text = v;
            else {
                char *end;
                long n = strtol(v, &end, 10);
                if (*end || n <= 0 || n > (1 << 24)) {
                    fprintf(stderr, "kvmesh tokenize: --vocab-size '%s' is not a positive count\n", v);
                    return 2;
                }
                vocab_size = (int)n;
            }
        } else {
            fprintf(stderr, "kvmesh tokenize: unknown option '%s' (see --help)\n", a);
            return 2;
        }
    }
    if ((!model && !tokp) || !text) {
        fprintf(stderr, "kvmesh tokenize: needs --model or --tokenizer, and --text (see --help)\n");
        return 2;
    }
    tok_src_t src = {0};
    if (open_tokenizer(model, tokp, vocab_size, &src)) {
        close_tokenizer(&src);
        return 1;
    }
    const kvm_tokenizer_t *t = src.t;
    int32_t *ids = NULL;
    int n = 0;
    int rc = kvm_tokenize(t, text, strlen(text), flags, &ids, &n);
    if (rc) {
        fprintf(stderr, "kvmesh tokenize: %s\n", kvm_errmsg());
        close_tokenizer(&src);
        return 1;
    }
    putchar('[');
    for (int i = 0; i < n; i++) printf("%s%d", i ? ", " : "", ids[i]);
    printf("]\n");
    if (decode) {
        char *out = NULL;
        size_t len = 0;
        if (kvm_detokenize(t, ids, n, false, &out, &len) == 0) {
            fwrite(out, 1, len, stdout);
            putchar('\n');
        }
        kvm_free(out);
    }
    kvm_free(ids);
    close_tokenizer(&src);
    return 0;
}
