/* cmd_tokenize.c - `kvmesh tokenize`: prints the token ids of a text as a one-line JSON array. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/core/core.h"
#include "runtime/model/tokenizer.h"

static void tokenize_help(FILE *f) {
    fprintf(f,
            "usage: kvmesh tokenize (--model DIR|FILE | --tokenizer FILE) --text TEXT [options]\n\n"
            "Prints the token ids of TEXT as a JSON array on one line.\n\n"
            "  --model DIR|FILE   HF model directory (its tokenizer.json + tokenizer_config.json) or a tokenizer.json\n"
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

static bool ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

/* Counts the entries of a llama2.c tokenizer.bin (they must end exactly at the end of the file). */
static int count_bin_entries(const char *path) {
    char *data = NULL;
    size_t size = 0;
    if (kvm_read_file(path, &data, &size, 256u << 20)) return -1;
    size_t off = 4;
    int n = 0;
    while (off + 8 <= size) {
        int32_t len;
        memcpy(&len, data + off + 4, 4);
        if (len < 0 || (size_t)len > size - off - 8) break;
        off += 8 + (size_t)len;
        n++;
    }
    kvm_free(data);
    return off == size ? n : -1;
}

/* The tokenizer_config.json beside a tokenizer.json, if there is one (buf receives the path). */
static const char *sibling_config(const char *json_path, char *buf, size_t cap) {
    const char *slash = strrchr(json_path, '/');
    size_t dl = slash ? (size_t)(slash - json_path) : 0;
    if (dl + 32 > cap) return NULL;
    if (slash) memcpy(buf, json_path, dl);
    snprintf(buf + dl, cap - dl, "%stokenizer_config.json", slash ? "/" : "");
    return kvm_file_exists(buf) ? buf : NULL;
}

static kvm_tokenizer_t *open_tokenizer(const char *model, const char *tokp, int vocab_size) {
    char jp[4096], cp[4096];
    if (tokp) {
        if (ends_with(tokp, ".json")) return kvm_tokenizer_load_hf(tokp, sibling_config(tokp, cp, sizeof cp));
        if (vocab_size <= 0) vocab_size = count_bin_entries(tokp);
        if (vocab_size <= 0) {
            kvm_seterr(KVM_EFORMAT, "%s: cannot count the entries of this llama2.c tokenizer.bin: pass --vocab-size N", tokp);
            return NULL;
        }
        return kvm_tokenizer_load_bin(tokp, vocab_size);
    }
    if (kvm_dir_exists(model)) {
        if (kvm_path_join(jp, sizeof jp, model, "tokenizer.json") || kvm_path_join(cp, sizeof cp, model, "tokenizer_config.json")) {
            kvm_seterr(KVM_ERANGE, "%s: path too long", model);
            return NULL;
        }
        if (!kvm_file_exists(jp)) {
            kvm_seterr(KVM_ENOENT, "%s: no tokenizer.json in this model directory", model);
            return NULL;
        }
        return kvm_tokenizer_load_hf(jp, kvm_file_exists(cp) ? cp : NULL);
    }
    if (ends_with(model, ".json")) return kvm_tokenizer_load_hf(model, sibling_config(model, cp, sizeof cp));
    kvm_seterr(KVM_EINVAL, "%s: not a model directory or tokenizer.json (a llama2.c .bin model keeps its tokenizer "
               "apart: pass --tokenizer tokenizer.bin)", model);
    return NULL;
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
    kvm_tokenizer_t *t = open_tokenizer(model, tokp, vocab_size);
    if (!t) {
        fprintf(stderr, "kvmesh tokenize: %s\n", kvm_errmsg());
        return 1;
    }
    int32_t *ids = NULL;
    int n = 0;
    int rc = kvm_tokenize(t, text, strlen(text), flags, &ids, &n);
    if (rc) {
        fprintf(stderr, "kvmesh tokenize: %s\n", kvm_errmsg());
        kvm_tokenizer_free(t);
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
    kvm_tokenizer_free(t);
    return 0;
}
