/* test_tokenizer.c - the tokenizer without network: llama2.c tokenizer.bin (stories260K's tok512.bin,
 * ids from a line-by-line Python transcription of llama2.c run.c's encode), the two hand-made HF
 * tokenizer.json files in tests/data/tokenizer/ against HF tokenizers 0.23 goldens, streaming, and every
 * malformed-input error. The real-tokenizer parity tests are in test_tokenizer_parity.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <unistd.h>

#include "test_tokenizer_common.h"

#define TOK512 KVM_SHARED_DIR "/models/stories260K/tok512.bin"

static kvm_tokenizer_t *load_tok512(void) {
    if (!kvm_file_exists(TOK512)) {
        fprintf(stderr, "SKIP: %s not found (shared data absent)\n", TOK512);
        return NULL;
    }
    kvm_tokenizer_t *t = kvm_tokenizer_load_bin(TOK512, 512);
    if (!t) fail_msg("%s", kvm_errmsg());
    return t;
}

static void expect_ids(const kvm_tokenizer_t *t, const char *text, int flags, const int32_t *want, int nwant) {
    int32_t *ids = NULL;
    int n = -1;
    assert_int_equal(kvm_tokenize(t, text, strlen(text), flags, &ids, &n), 0);
    if (n != nwant || memcmp(ids, want, sizeof *ids * (size_t)n)) {
        tt_print_ids("want", want, nwant);
        tt_print_ids("got ", ids, n);
        kvm_free(ids);
        fail_msg("ids differ for '%s'", text);
    }
    kvm_free(ids);
}

/* ---- llama2.c ------------------------------------------------------------------------------------ */

static void test_llama2c_encodes_like_run_c(void **s) {
    (void)s;
    kvm_tokenizer_t *t = load_tok512();
    if (!t) skip();
    /* expected ids: scripts' transcription of run.c encode() (dummy prefix, byte fallback, best-score merges) */
    static const int32_t a[] = {1, 403, 407, 261, 378};
    static const int32_t b[] = {1, 326, 269, 317, 263, 377, 267, 265, 282, 295, 433};
    static const int32_t c[] = {1, 346, 306, 414, 432, 263, 304, 341, 443, 410, 198, 138, 412, 410, 435, 412, 450,
                                410, 231, 192, 163, 232, 168, 192, 410, 243, 162, 155, 131};
    static const int32_t d[] = {1, 410, 410, 259, 424, 414, 410, 262, 427, 412, 331, 419, 13, 416, 411, 424, 421, 271, 411};
    static const int32_t e[] = {1};
    expect_ids(t, "Once upon a time", KVM_TOK_ADD_BOS, a, 5);
    expect_ids(t, "Tim and Lily went to the park", KVM_TOK_ADD_BOS, b, 11);
    expect_ids(t, "Hello, world! \xC3\x87" "a va? \xE4\xBD\xA0\xE5\xA5\xBD \xF0\x9F\x98\x80", KVM_TOK_ADD_BOS, c, 29);
    expect_ids(t, "  two  spaces\nnewline", KVM_TOK_ADD_BOS, d, 19);
    expect_ids(t, "", KVM_TOK_ADD_BOS, e, 1);
    expect_ids(t, "Once upon a time", 0, a + 1, 4); /* no BOS without the flag */
    kvm_tokenizer_free(t);
}

static void test_llama2c_reports_bos_eos_and_kind(void **s) {
    (void)s;
    kvm_tokenizer_t *t = load_tok512();
    if (!t) skip();
    assert_string_equal(kvm_tokenizer_kind(t), "llama2c");
    assert_int_equal(kvm_tokenizer_vocab_size(t), 512);
    assert_int_equal(kvm_tokenizer_bos(t), 1);
    assert_int_equal(kvm_tokenizer_eos(t), 2);
    assert_true(kvm_tokenizer_adds_bos(t));
    assert_true(kvm_tokenizer_is_special(t, 1));
    assert_false(kvm_tokenizer_is_special(t, 403));
    assert_int_equal(kvm_tokenizer_find(t, "<0x0A>"), 13);
    assert_string_equal(kvm_tokenizer_chat_template(t), "");
    kvm_tokenizer_free(t);
}

static void test_llama2c_decode_strips_the_space_after_bos_and_maps_byte_tokens(void **s) {
    (void)s;
    kvm_tokenizer_t *t = load_tok512();
    if (!t) skip();
    const char *text = "Hello, world! \xC3\x87" "a va?\n  x";
    int32_t *ids = NULL;
    int n = 0;
    assert_int_equal(kvm_tokenize(t, text, strlen(text), KVM_TOK_ADD_BOS, &ids, &n), 0);
    char *out = NULL;
    size_t len = 0;
    assert_int_equal(kvm_detokenize(t, ids, n, true, &out, &len), 0);
    assert_string_equal(out, text);
    assert_int_equal(len, strlen(text));
    kvm_free(out);
    /* streaming: the same bytes, token by token; byte tokens give raw (partial UTF-8) bytes */
    char acc[256] = {0}, buf[64];
    size_t al = 0;
    for (int i = 1; i < n; i++) {
        int nb = kvm_token_bytes(t, ids[i - 1], ids[i], buf, sizeof buf);
        assert_true(nb >= 0);
        memcpy(acc + al, buf, (size_t)nb);
        al += (size_t)nb;
    }
    assert_string_equal(acc, text);
    assert_int_equal(kvm_token_bytes(t, 1, 13, buf, sizeof buf), 1); /* <0x0A> */
    assert_int_equal(buf[0], '\n');
    kvm_free(ids);
    kvm_tokenizer_free(t);
}

/* run.c merges over the whole text at once: 10 KB is one merge problem of ~10K symbols. */
static void test_llama2c_encodes_10kb_in_milliseconds(void **s) {
    (void)s;
    kvm_tokenizer_t *t = load_tok512();
    if (!t) skip();
    static const char *const words[] = {"Once ", "upon ", "a ", "time ", "Lily ", "saw ", "a ", "big ", "dog. ", "\n"};
    char *text = tt_seeded_text(words, 10, 10 * 1024, 4242);
    tt_roundtrip_in_milliseconds(t, text, KVM_TOK_ADD_BOS, true, "llama2.c");
    free(text);
    kvm_tokenizer_free(t);
}

static void test_llama2c_truncated_file_is_a_format_error(void **s) {
    (void)s;
    if (!kvm_file_exists(TOK512)) {
        fprintf(stderr, "SKIP: %s not found\n", TOK512);
        skip();
    }
    char *data = NULL;
    size_t len = 0;
    assert_int_equal(kvm_read_file(TOK512, &data, &len, 0), 0);
    char path[] = "/tmp/kvm_tok_trunc_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, data, len / 2), (ssize_t)(len / 2));
    close(fd);
    assert_null(kvm_tokenizer_load_bin(path, 512));
    assert_int_equal(kvm_errcode(), KVM_EFORMAT);
    assert_non_null(strstr(kvm_errmsg(), path));
    /* the whole file but more tokens asked for than it has */
    assert_null(kvm_tokenizer_load_bin(TOK512, 1000));
    assert_int_equal(kvm_errcode(), KVM_EFORMAT);
    assert_null(kvm_tokenizer_load_bin("/nonexistent/tok.bin", 512));
    assert_non_null(strstr(kvm_errmsg(), "/nonexistent/tok.bin"));
    unlink(path);
    kvm_free(data);
}

/* ---- hand-made HF tokenizers vs HF goldens ---------------------------------------------------------- */

static void test_tiny_metaspace_tokenizer_matches_hf(void **s) {
    (void)s;
    kvm_tokenizer_t *t = kvm_tokenizer_load_hf(TOKDATA "/tiny-metaspace.json", NULL);
    assert_non_null(t);
    assert_string_equal(kvm_tokenizer_kind(t), "bpe-sentencepiece");
    assert_int_equal(tt_check_all(t, "tiny-metaspace"), 0);
    assert_int_equal(tt_check_random(t, "tiny-metaspace"), 0);
    kvm_tokenizer_free(t);
}

static void test_tiny_digits_bytelevel_tokenizer_matches_hf(void **s) {
    (void)s;
    kvm_tokenizer_t *t = kvm_tokenizer_load_hf(TOKDATA "/tiny-digits.json", NULL);
    assert_non_null(t);
    assert_string_equal(kvm_tokenizer_kind(t), "bpe-bytelevel");
    assert_int_equal(tt_check_all(t, "tiny-digits"), 0);
    assert_int_equal(tt_check_random(t, "tiny-digits"), 0);
    kvm_tokenizer_free(t);
}

static void test_template_post_processor_gives_bos(void **s) {
    (void)s;
    kvm_tokenizer_t *t = kvm_tokenizer_load_hf(TOKDATA "/tiny-digits.json", NULL);
    assert_non_null(t);
    int32_t bos = kvm_tokenizer_find(t, "<|bos|>");
    assert_true(bos > 0);
    assert_int_equal(kvm_tokenizer_bos(t), bos);
    assert_true(kvm_tokenizer_adds_bos(t));
    assert_int_equal(kvm_tokenizer_eos(t), kvm_tokenizer_find(t, "<|endoftext|>")); /* no config: fallback name */
    int32_t *ids = NULL;
    int n = 0;
    assert_int_equal(kvm_tokenize(t, "7", 1, KVM_TOK_ADD_BOS, &ids, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], bos);
    assert_int_equal(ids[1], '7'); /* byte-level ids 0..255 are in byte-map order: '7' is printable */
    kvm_free(ids);
    kvm_tokenizer_free(t);
}

/* Reasoned by hand from tiny-metaspace.json: "<sep>" has lstrip, so the space before it goes with it;
 * "the" opens the text (prepend_scheme first) -> "▁the" (335); "end" follows an added token, so no "▁",
 * and no merge joins e+n or n+d -> e n d. Without lstrip a "▁" (259) would come before <sep>. */
static void test_lstrip_added_token_takes_the_space_before_it(void **s) {
    (void)s;
    kvm_tokenizer_t *t = kvm_tokenizer_load_hf(TOKDATA "/tiny-metaspace.json", NULL);
    assert_non_null(t);
    static const int32_t want[] = {335, 474, 264, 273, 263};
    expect_ids(t, "the <sep>end", 0, want, 5);
    kvm_tokenizer_free(t);
}

static void test_special_tokens_are_text_without_parse_special(void **s) {
    (void)s;
    kvm_tokenizer_t *t = kvm_tokenizer_load_hf(TOKDATA "/tiny-digits.json", NULL);
    assert_non_null(t);
    int32_t im_end = kvm_tokenizer_find(t, "<|im_end|>"), think = kvm_tokenizer_find(t, "<think>");
    int32_t *ids = NULL;
    int n = 0;
    assert_int_equal(kvm_tokenize(t, "<|im_end|>", 10, KVM_TOK_PARSE_SPECIAL, &ids, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], im_end);
    kvm_free(ids);
    assert_int_equal(kvm_tokenize(t, "<|im_end|>", 10, 0, &ids, &n), 0);
    assert_true(n > 1);
    for (int i = 0; i < n; i++) assert_int_not_equal(ids[i], im_end);
    kvm_free(ids);
    /* a non-special added token is always matched (HF's default) */
    assert_int_equal(kvm_tokenize(t, "<think>", 7, 0, &ids, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], think);
    kvm_free(ids);
    kvm_tokenizer_free(t);
}

static void test_streaming_gives_partial_utf8_bytes_for_bytelevel(void **s) {
    (void)s;
    kvm_tokenizer_t *t = kvm_tokenizer_load_hf(TOKDATA "/tiny-digits.json", NULL);
    assert_non_null(t);
    int32_t *ids = NULL;
    int n = 0;
    assert_int_equal(kvm_tokenize(t, "\xE4\xBD\xA0", 3, 0, &ids, &n), 0); /* 你: no merges -> 3 byte tokens */
    assert_int_equal(n, 3);
    char buf[16];
    int32_t prev = -1;
    const char want[] = "\xE4\xBD\xA0";
    for (int i = 0; i < 3; i++) {
        assert_int_equal(kvm_token_bytes(t, prev, ids[i], buf, sizeof buf), 1);
        assert_int_equal((unsigned char)buf[0], (unsigned char)want[i]);
        prev = ids[i];
    }
    /* a lone continuation byte decodes (non-streaming) to U+FFFD, as HF's from_utf8_lossy does */
    char *out = NULL;
    assert_int_equal(kvm_detokenize(t, ids + 1, 1, false, &out, NULL), 0);
    assert_string_equal(out, "\xEF\xBF\xBD");
    kvm_free(out);
    kvm_free(ids);
    kvm_tokenizer_free(t);
}

static int tok_utf8_put_test(uint32_t cp, char *out) {
    if (cp < 0x80) return out[0] = (char)cp, 1;
    if (cp < 0x800) return out[0] = (char)(0xC0 | (cp >> 6)), out[1] = (char)(0x80 | (cp & 0x3F)), 2;
    if (cp < 0x10000)
        return out[0] = (char)(0xE0 | (cp >> 12)), out[1] = (char)(0x80 | ((cp >> 6) & 0x3F)), out[2] = (char)(0x80 | (cp & 0x3F)), 3;
    out[0] = (char)(0xF0 | (cp >> 18)), out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F)), out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static void test_random_text_round_trips_through_bytelevel(void **s) {
    (void)s;
    kvm_tokenizer_t *t = kvm_tokenizer_load_hf(TOKDATA "/tiny-digits.json", NULL);
    assert_non_null(t);
    srand(20260517);
    static const uint32_t pool[] = {'a', 'Z', ' ', '\n', '\t', '7', '\'', '<', '|', 0xE9, 0x4F60, 0x1F600, 0x200D, 0x3000, 0xA0};
    for (int iter = 0; iter < 200; iter++) {
        char text[256];
        size_t len = 0;
        int nch = 1 + rand() % 40;
        for (int k = 0; k < nch; k++) len += (size_t)tok_utf8_put_test(pool[rand() % 15], text + len);
        text[len] = '\0';
        int32_t *ids = NULL;
        int n = 0;
        assert_int_equal(kvm_tokenize(t, text, len, KVM_TOK_PARSE_SPECIAL, &ids, &n), 0);
        char *out = NULL;
        size_t olen = 0;
        assert_int_equal(kvm_detokenize(t, ids, n, false, &out, &olen), 0);
        assert_int_equal(olen, len);
        assert_memory_equal(out, text, len);
        kvm_free(out);
        kvm_free(ids);
    }
    kvm_tokenizer_free(t);
}

/* Arbitrary bytes (invalid UTF-8 included) never crash any encoder; byte-level streaming gives them back
 * exactly, and llama2.c decodes them back exactly. */
static void test_random_bytes_encode_without_crashing(void **s) {
    (void)s;
    kvm_tokenizer_t *bl = kvm_tokenizer_load_hf(TOKDATA "/tiny-digits.json", NULL);
    kvm_tokenizer_t *ms = kvm_tokenizer_load_hf(TOKDATA "/tiny-metaspace.json", NULL);
    kvm_tokenizer_t *l2 = kvm_file_exists(TOK512) ? kvm_tokenizer_load_bin(TOK512, 512) : NULL;
    assert_non_null(bl);
    assert_non_null(ms);
    srand(31337);
    for (int iter = 0; iter < 300; iter++) {
        char text[200];
        size_t len = 1 + (size_t)(rand() % 199);
        for (size_t k = 0; k < len; k++) text[k] = (char)(rand() % 256);
        int32_t *ids = NULL;
        int n = 0;
        assert_int_equal(kvm_tokenize(ms, text, len, KVM_TOK_PARSE_SPECIAL | KVM_TOK_ADD_BOS, &ids, &n), 0);
        assert_true(n > 0);
        kvm_free(ids);
        assert_int_equal(kvm_tokenize(bl, text, len, KVM_TOK_PARSE_SPECIAL, &ids, &n), 0);
        char acc[1024], buf[64];
        size_t al = 0;
        int32_t prev = -1;
        for (int k = 0; k < n; k++) {
            int nb = kvm_token_bytes(bl, prev, ids[k], buf, sizeof buf);
            assert_true(nb >= 0 && nb <= (int)sizeof buf && al + (size_t)nb < sizeof acc);
            if (nb > 0 && nb <= (int)sizeof buf) memcpy(acc + al, buf, (size_t)nb);
            al += (size_t)nb;
            prev = ids[k];
        }
        assert_int_equal(al, len);
        assert_memory_equal(acc, text, len);
        kvm_free(ids);
        if (l2) {
            char *out = NULL;
            size_t olen = 0;
            assert_int_equal(kvm_tokenize(l2, text, len, KVM_TOK_ADD_BOS, &ids, &n), 0);
            assert_int_equal(kvm_detokenize(l2, ids, n, true, &out, &olen), 0);
            assert_int_equal(olen, len);
            assert_memory_equal(out, text, len);
            kvm_free(out);
            kvm_free(ids);
        }
    }
    kvm_tokenizer_free(bl);
    kvm_tokenizer_free(ms);
    kvm_tokenizer_free(l2);
}

static void test_bad_arguments_are_errors_not_crashes(void **s) {
    (void)s;
    kvm_tokenizer_t *t = kvm_tokenizer_load_hf(TOKDATA "/tiny-digits.json", NULL);
    assert_non_null(t);
    int32_t *ids = NULL;
    int n = -1;
    assert_int_equal(kvm_tokenize(t, NULL, 0, 0, &ids, &n), 0); /* empty text */
    assert_int_equal(n, 0);
    kvm_free(ids);
    assert_int_equal(kvm_tokenize(NULL, "x", 1, 0, &ids, &n), KVM_EINVAL);
    int32_t bad[] = {5, 999999};
    char *out = NULL;
    assert_int_equal(kvm_detokenize(t, bad, 2, false, &out, NULL), KVM_ERANGE);
    assert_null(out);
    char buf[4];
    assert_int_equal(kvm_token_bytes(t, -1, -3, buf, sizeof buf), KVM_ERANGE);
    int32_t big = kvm_tokenizer_find(t, "<|im_start|>");
    assert_int_equal(kvm_token_bytes(t, -1, big, buf, sizeof buf), KVM_ERANGE); /* 12 bytes do not fit in 4 */
    assert_int_equal(kvm_tokenizer_find(t, "no such token"), -1);
    kvm_tokenizer_free(t);
}

/* ---- split behaviours ------------------------------------------------------------------------------ */

/* Loads a tokenizer.json text from memory (through a temp file). */
static kvm_tokenizer_t *load_json_text(const char *json) {
    char path[] = "/tmp/kvm_tok_mem_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, json, strlen(json)), (ssize_t)strlen(json));
    close(fd);
    kvm_tokenizer_t *t = kvm_tokenizer_load_hf(path, NULL);
    unlink(path);
    if (!t) fail_msg("%s", kvm_errmsg());
    return t;
}

/* HF's SplitDelimiterBehavior examples ("the-final--countdown" split on "-"). With ignore_merges and no
 * merges, a piece in the vocabulary becomes its one id, so the ids spell out the pieces. */
static void test_split_behaviours_follow_hf_documentation(void **s) {
    (void)s;
    static const char *vocab =
        "{\"t\":0,\"h\":1,\"e\":2,\"-\":3,\"f\":4,\"i\":5,\"n\":6,\"a\":7,\"l\":8,\"c\":9,\"o\":10,\"u\":11,"
        "\"d\":12,\"w\":13,\"the\":14,\"final\":15,\"countdown\":16,\"the-\":17,\"final-\":18,\"-final\":19,"
        "\"-countdown\":20,\"--\":21}";
    static const struct {
        const char *behavior;
        bool invert;
        int32_t want[6];
        int n;
    } cases[] = {
        {"Removed", false, {14, 15, 16}, 3},
        {"Isolated", false, {14, 3, 15, 3, 3, 16}, 6},
        {"MergedWithPrevious", false, {17, 18, 3, 16}, 4},
        {"MergedWithNext", false, {14, 19, 3, 20}, 4},
        {"Contiguous", false, {14, 3, 15, 21, 16}, 5},
        {"Removed", true, {3, 3, 3}, 3},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char json[2048];
        snprintf(json, sizeof json,
                 "{\"model\": {\"type\": \"BPE\", \"ignore_merges\": true, \"vocab\": %s, \"merges\": []},"
                 " \"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"String\": \"-\"}, \"behavior\": \"%s\","
                 " \"invert\": %s}}",
                 vocab, cases[i].behavior, cases[i].invert ? "true" : "false");
        kvm_tokenizer_t *t = load_json_text(json);
        fprintf(stderr, "  %s%s\n", cases[i].behavior, cases[i].invert ? " (inverted)" : "");
        expect_ids(t, "the-final--countdown", 0, cases[i].want, cases[i].n);
        kvm_tokenizer_free(t);
    }
}

static void test_whitespace_split_drops_the_spaces(void **s) {
    (void)s;
    kvm_tokenizer_t *t = load_json_text(
        "{\"model\": {\"type\": \"BPE\", \"ignore_merges\": true, \"vocab\": {\"a\": 0, \"bc\": 1, \"b\": 2, \"c\": 3},"
        " \"merges\": []}, \"pre_tokenizer\": {\"type\": \"WhitespaceSplit\"}}");
    static const int32_t want[] = {0, 1, 0};
    expect_ids(t, " a  bc\t\u3000a ", 0, want, 3);
    kvm_tokenizer_free(t);
}

/* ---- NFC / NFD normalizers ------------------------------------------------------------------------ */

/* tiny-digits.json with the given normalizer: byte-level with every byte in the vocabulary, so decode
 * gives back exactly the normalized text. Returns the loaded tokenizer; the temp file is removed. */
static kvm_tokenizer_t *tiny_with_normalizer(const char *type) {
    char *data = NULL;
    size_t len = 0;
    assert_int_equal(kvm_read_file(TOKDATA "/tiny-digits.json", &data, &len, 0), 0);
    cJSON *root = cJSON_Parse(data);
    kvm_free(data);
    assert_non_null(root);
    cJSON *norm = cJSON_CreateObject();
    cJSON_AddStringToObject(norm, "type", type);
    cJSON_ReplaceItemInObject(root, "normalizer", norm);
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    char path[] = "/tmp/kvm_tok_nf_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    cJSON_free(text);
    kvm_tokenizer_t *t = kvm_tokenizer_load_hf(path, NULL);
    unlink(path);
    assert_non_null(t);
    return t;
}

/* tests/data/tokenizer/nfc-cases.jsonl: crafted cases (reordering, blocking, exclusions, singletons,
 * Hangul) and seeded random mark sequences, with Python unicodedata's NFC and NFD as the reference. */
static void test_nfc_and_nfd_normalizers_match_unicodedata(void **s) {
    (void)s;
    kvm_tokenizer_t *nfc = tiny_with_normalizer("NFC"), *nfd = tiny_with_normalizer("NFD");
    int n = 0, bad = 0;
    cJSON **cases = tt_read_jsonl(TOKDATA "/nfc-cases.jsonl", &n);
    assert_non_null(cases);
    assert_true(n > 300);
    for (int i = 0; i < n; i++) {
        const char *text = cJSON_GetObjectItem(cases[i], "text")->valuestring;
        for (int form = 0; form < 2; form++) {
            const char *want = cJSON_GetObjectItem(cases[i], form ? "nfd" : "nfc")->valuestring;
            int32_t *ids = NULL;
            int nid = 0;
            char *out = NULL;
            assert_int_equal(kvm_tokenize(form ? nfd : nfc, text, strlen(text), 0, &ids, &nid), 0);
            assert_int_equal(kvm_detokenize(form ? nfd : nfc, ids, nid, false, &out, NULL), 0);
            if (strcmp(out, want) && bad++ < 5) fprintf(stderr, "  %s of '%s': want '%s' got '%s'\n", form ? "NFD" : "NFC", text, want, out);
            kvm_free(out);
            kvm_free(ids);
        }
    }
    tt_lines_free(cases, n);
    kvm_tokenizer_free(nfc);
    kvm_tokenizer_free(nfd);
    assert_int_equal(bad, 0);
}

/* ---- malformed tokenizer.json -------------------------------------------------------------------- */

static char g_path[64];

/* Writes text to a fresh temp file (g_path), loads it, and checks the error code and that the message
 * names the file and contains `needle`. */
static void expect_load_error(const char *json, int code, const char *needle) {
    strcpy(g_path, "/tmp/kvm_tok_bad_XXXXXX");
    int fd = mkstemp(g_path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, json, strlen(json)), (ssize_t)strlen(json));
    close(fd);
    kvm_tokenizer_t *t = kvm_tokenizer_load_hf(g_path, NULL);
    if (t) {
        kvm_tokenizer_free(t);
        unlink(g_path);
        fail_msg("loaded a malformed tokenizer: %s", json);
    }
    fprintf(stderr, "  error as expected: %s\n", kvm_errmsg());
    assert_int_equal(kvm_errcode(), code);
    assert_non_null(strstr(kvm_errmsg(), g_path));
    assert_non_null(strstr(kvm_errmsg(), needle));
    unlink(g_path);
}

#define MODEL_OK "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\"]}"

static void test_not_json_is_a_format_error(void **s) {
    (void)s;
    expect_load_error("{\"model\": {\"vocab\": ", KVM_EFORMAT, "not valid JSON");
    expect_load_error("[1, 2, 3]", KVM_EFORMAT, "not a JSON object");
}

static void test_missing_model_or_vocab_names_the_field(void **s) {
    (void)s;
    expect_load_error("{\"version\": \"1.0\"}", KVM_EFORMAT, "\"model\"");
    expect_load_error("{\"model\": {\"type\": \"BPE\", \"merges\": []}}", KVM_EFORMAT, "model.vocab");
    expect_load_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}}}", KVM_EFORMAT, "model.merges");
    expect_load_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -4}, \"merges\": []}}", KVM_EFORMAT, "model.vocab[\"a\"]");
}

static void test_merges_with_unknown_tokens_are_refused(void **s) {
    (void)s;
    expect_load_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a b\"]}}", KVM_EFORMAT,
                      "model.merges[0]: references unknown token \"ab\"");
    expect_load_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"ab\": 1}, \"merges\": [[\"a\", \"q\"]]}}", KVM_EFORMAT,
                      "unknown token \"q\"");
    expect_load_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"abc\"]}}", KVM_EFORMAT, "model.merges[0]");
}

static void test_other_model_types_are_unsupported_by_name(void **s) {
    (void)s;
    expect_load_error("{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"a\": 0}}}", KVM_EUNSUPPORTED, "WordPiece");
    expect_load_error("{\"model\": {\"type\": \"Unigram\", \"vocab\": [[\"a\", -1.0]]}}", KVM_EUNSUPPORTED, "Unigram");
    expect_load_error("{\"model\": {\"vocab\": [[\"a\", -1.0]]}}", KVM_EUNSUPPORTED, "model.vocab");
}

static void test_unsupported_pipeline_steps_are_named(void **s) {
    (void)s;
    expect_load_error("{" MODEL_OK ", \"pre_tokenizer\": {\"type\": \"BertPreTokenizer\"}}", KVM_EUNSUPPORTED, "BertPreTokenizer");
    expect_load_error("{" MODEL_OK ", \"normalizer\": {\"type\": \"NFKC\"}}", KVM_EUNSUPPORTED, "NFKC");
    expect_load_error("{" MODEL_OK ", \"decoder\": {\"type\": \"WordPiece\"}}", KVM_EUNSUPPORTED, "WordPiece");
    expect_load_error("{" MODEL_OK ", \"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"\\\\w+\"}}}",
                      KVM_EUNSUPPORTED, "\\w+");
    expect_load_error("{" MODEL_OK ", \"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"String\": \" \"}, \"behavior\": \"Sideways\"}}",
                      KVM_EFORMAT, "Sideways");
}

static void test_bad_added_tokens_and_unk_are_format_errors(void **s) {
    (void)s;
    expect_load_error("{" MODEL_OK ", \"added_tokens\": [{\"id\": \"x\", \"content\": \"<x>\"}]}", KVM_EFORMAT, "added_tokens[0].id");
    expect_load_error("{" MODEL_OK ", \"added_tokens\": [{\"id\": 9, \"content\": \"\"}]}", KVM_EFORMAT, "added_tokens[0].content");
    expect_load_error("{\"model\": {\"type\": \"BPE\", \"unk_token\": \"<unk>\", \"vocab\": {\"a\": 0}, \"merges\": []}}", KVM_EFORMAT,
                      "model.unk_token");
    expect_load_error("{" MODEL_OK ", \"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"<s>\"}}], \"special_tokens\": {}}}",
                      KVM_EFORMAT, "post_processor.special_tokens");
}

static void test_bad_config_file_is_named(void **s) {
    (void)s;
    strcpy(g_path, "/tmp/kvm_tok_cfg_XXXXXX");
    int fd = mkstemp(g_path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "{bos_token", 10), 10);
    close(fd);
    assert_null(kvm_tokenizer_load_hf(TOKDATA "/tiny-digits.json", g_path));
    assert_int_equal(kvm_errcode(), KVM_EFORMAT);
    assert_non_null(strstr(kvm_errmsg(), g_path));
    unlink(g_path);
}

/* Every prefix of a valid tokenizer.json (seeded sample of cut points) loads or fails cleanly. */
static void test_truncated_tokenizer_json_never_crashes(void **s) {
    (void)s;
    char *data = NULL;
    size_t len = 0;
    assert_int_equal(kvm_read_file(TOKDATA "/tiny-digits.json", &data, &len, 0), 0);
    srand(77);
    int failures = 0;
    for (int i = 0; i < 60; i++) {
        size_t cut = (size_t)rand() % len;
        strcpy(g_path, "/tmp/kvm_tok_cut_XXXXXX");
        int fd = mkstemp(g_path);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, data, cut), (ssize_t)cut);
        close(fd);
        kvm_tokenizer_t *t = kvm_tokenizer_load_hf(g_path, NULL);
        if (!t) failures++, assert_true(kvm_errcode() < 0);
        kvm_tokenizer_free(t);
        unlink(g_path);
    }
    assert_int_equal(failures, 60); /* a cut JSON document is never valid */
    kvm_free(data);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama2c_encodes_like_run_c),
        cmocka_unit_test(test_llama2c_reports_bos_eos_and_kind),
        cmocka_unit_test(test_llama2c_decode_strips_the_space_after_bos_and_maps_byte_tokens),
        cmocka_unit_test(test_llama2c_encodes_10kb_in_milliseconds),
        cmocka_unit_test(test_llama2c_truncated_file_is_a_format_error),
        cmocka_unit_test(test_tiny_metaspace_tokenizer_matches_hf),
        cmocka_unit_test(test_tiny_digits_bytelevel_tokenizer_matches_hf),
        cmocka_unit_test(test_template_post_processor_gives_bos),
        cmocka_unit_test(test_lstrip_added_token_takes_the_space_before_it),
        cmocka_unit_test(test_special_tokens_are_text_without_parse_special),
        cmocka_unit_test(test_streaming_gives_partial_utf8_bytes_for_bytelevel),
        cmocka_unit_test(test_random_text_round_trips_through_bytelevel),
        cmocka_unit_test(test_random_bytes_encode_without_crashing),
        cmocka_unit_test(test_bad_arguments_are_errors_not_crashes),
        cmocka_unit_test(test_split_behaviours_follow_hf_documentation),
        cmocka_unit_test(test_whitespace_split_drops_the_spaces),
        cmocka_unit_test(test_nfc_and_nfd_normalizers_match_unicodedata),
        cmocka_unit_test(test_not_json_is_a_format_error),
        cmocka_unit_test(test_missing_model_or_vocab_names_the_field),
        cmocka_unit_test(test_merges_with_unknown_tokens_are_refused),
        cmocka_unit_test(test_other_model_types_are_unsupported_by_name),
        cmocka_unit_test(test_unsupported_pipeline_steps_are_named),
        cmocka_unit_test(test_bad_added_tokens_and_unk_are_format_errors),
        cmocka_unit_test(test_bad_config_file_is_named),
        cmocka_unit_test(test_truncated_tokenizer_json_never_crashes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
