/* fuzz_tokenizer.c - libFuzzer target: HF tokenizer.json loading, then encoding and decoding
 * (runtime/model/tokenizer.c, tok_hf.c, tok_pipeline.c, tok_unicode.c).
 *
 * The input is cut at FZ_SEP into tokenizer.json, the text to encode, and an optional
 * tokenizer_config.json; with one part only, the part is the tokenizer and its own last 64 bytes are the
 * text. A tokenizer that loads encodes the text with each flag combination; every id must lie in the
 * vocabulary, decoding them (with and without special tokens) must succeed or fail with a message, and streaming them one by one with
 * kvm_token_bytes must fit the buffer kvm_tokenizer_max_token_bytes promises. */
#include "fuzz_util.h"

#include "runtime/core/core.h"
#include "runtime/model/tokenizer.h"

#include <string.h>

#define CHECK(cond) FZ_CHECK("fuzz_tokenizer", cond)

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    fz_init_library();
    return 0;
}

static void check_stream(const kvm_tokenizer_t *t, const int32_t *ids, int n) {
    int cap = kvm_tokenizer_max_token_bytes(t);
    CHECK(cap > 0);
    char *buf = kvm_malloc((size_t)cap);
    if (!buf) abort();
    for (int i = 0; i < n; i++) {
        int k = kvm_token_bytes(t, i ? ids[i - 1] : -1, ids[i], buf, (size_t)cap);
        CHECK(k < cap);
    }
    kvm_free(buf);
}

static void encode_decode(const kvm_tokenizer_t *t, const char *text, size_t len) {
    int vocab = kvm_tokenizer_vocab_size(t);
    CHECK(vocab > 0);
    for (int flags = 0; flags <= (KVM_TOK_ADD_BOS | KVM_TOK_PARSE_SPECIAL); flags++) {
        int32_t *ids = NULL;
        int n = 0;
        int rc = kvm_tokenize(t, text, len, flags, &ids, &n);
        fz_report("kvm_tokenize", rc);
        if (rc) {
            CHECK(rc < 0 && *kvm_errmsg());
            kvm_errclear();
            continue;
        }
        CHECK(n >= 0 && (n == 0 || ids));
        for (int i = 0; i < n; i++) CHECK(ids[i] >= 0 && ids[i] < vocab);
        for (int skip = 0; skip <= 1; skip++) {
            char *out = NULL;
            size_t olen = 0;
            rc = kvm_detokenize(t, ids, n, skip, &out, &olen);
            fz_report("kvm_detokenize", rc);
            /* an id the tokenizer's own template names but no token has (a malformed post_processor)
             * encodes, and decoding it is a clear error: allowed */
            CHECK(rc == 0 ? out && strlen(out) <= olen : rc < 0 && *kvm_errmsg());
            kvm_free(out);
        }
        if (flags == 0) check_stream(t, ids, n);
        kvm_free(ids);
    }
    (void)kvm_tokenizer_find(t, text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_part_t parts[3] = {{0}};
    int n = fz_split(data, size, parts, 3);
    char tj[600], tc[600];
    fz_write("tokenizer.json", parts[0].data, parts[0].size, tj, sizeof tj);
    bool has_cfg = n > 2 && parts[2].size;
    if (has_cfg) fz_write("tokenizer_config.json", parts[2].data, parts[2].size, tc, sizeof tc);
    kvm_tokenizer_t *t = kvm_tokenizer_load_hf(tj, has_cfg ? tc : NULL);
    fz_report("kvm_tokenizer_load_hf", t ? 0 : kvm_errcode());
    if (!t) {
        CHECK(*kvm_errmsg());
        kvm_errclear();
        return 0;
    }
    fz_part_t text = n > 1 ? parts[1] : parts[0];
    if (n == 1 && text.size > 64) {
        text.data += text.size - 64;
        text.size = 64;
    }
    char *s = fz_cstr(text.data, text.size);
    encode_decode(t, s, text.size);
    free(s);
    kvm_tokenizer_free(t);
    kvm_errclear();
    return 0;
}
