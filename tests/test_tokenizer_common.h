/* test_tokenizer_common.h - helpers the tokenizer tests share: reading the corpus and the HF goldens
 * (tests/data/tokenizer/, written by scripts/fixtures/make_tokenizer_goldens.py) and comparing a loaded
 * tokenizer against them. Included by tests/test_tokenizer*.c only. */
#ifndef KVM_TEST_TOKENIZER_COMMON_H
#define KVM_TEST_TOKENIZER_COMMON_H

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/core/core.h"
#include "runtime/model/tokenizer.h"

#define TOKDATA KVM_SOURCE_DIR "/tests/data/tokenizer"

/* The cache scripts/fetch-tokenizers.sh fills (KVM_TOKENIZER_CACHE overrides). */
static inline void tt_cache_path(char *buf, size_t cap, const char *name, const char *file) {
    const char *c = getenv("KVM_TOKENIZER_CACHE");
    if (c && *c) snprintf(buf, cap, "%s/%s/%s", c, name, file);
    else snprintf(buf, cap, "%s/build-deps/tokenizers/%s/%s", KVM_SOURCE_DIR, name, file);
}

/* Lines of a JSONL file as parsed cJSON objects (NULL-terminated array; free with tt_lines_free). */
static inline cJSON **tt_read_jsonl(const char *path, int *n) {
    char *text = NULL;
    size_t len = 0;
    *n = 0;
    if (kvm_read_file(path, &text, &len, 0)) return NULL;
    int cap = 16;
    cJSON **v = calloc((size_t)cap + 1, sizeof *v);
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (!*line) continue;
        if (*n == cap) {
            cap *= 2;
            v = realloc(v, ((size_t)cap + 1) * sizeof *v);
        }
        v[(*n)++] = cJSON_Parse(line);
        v[*n] = NULL;
    }
    kvm_free(text);
    return v;
}

static inline void tt_lines_free(cJSON **v, int n) {
    for (int i = 0; i < n; i++) cJSON_Delete(v[i]);
    free(v);
}

static inline bool tt_ids_equal(const cJSON *arr, const int32_t *ids, int n) {
    if (!cJSON_IsArray(arr) || cJSON_GetArraySize(arr) != n) return false;
    for (int i = 0; i < n; i++)
        if ((int32_t)cJSON_GetArrayItem(arr, i)->valuedouble != ids[i]) return false;
    return true;
}

static inline void tt_print_ids(const char *label, const int32_t *ids, int n) {
    fprintf(stderr, "    %s [", label);
    for (int i = 0; i < n; i++) fprintf(stderr, "%s%d", i ? ", " : "", ids[i]);
    fprintf(stderr, "]\n");
}

/* Compares one encode mode of every corpus string with the golden field; returns the mismatch count
 * and prints the first few. */
static inline int tt_check_encode(const kvm_tokenizer_t *t, cJSON **corpus, cJSON **gold, int n, const char *field,
                                  int flags, const char *label) {
    int bad = 0;
    for (int i = 0; i < n; i++) {
        const char *text = cJSON_GetObjectItem(corpus[i], "text")->valuestring;
        const cJSON *want = cJSON_GetObjectItem(gold[i + 1], field);
        if (!cJSON_IsArray(want)) continue;
        int32_t *ids = NULL;
        int nid = 0;
        int rc = kvm_tokenize(t, text, strlen(text), flags, &ids, &nid);
        if (rc || !tt_ids_equal(want, ids, nid)) {
            if (bad++ < 5) {
                char *w = cJSON_PrintUnformatted(want);
                fprintf(stderr, "  [%s %s] '%s' (rc %d %s)\n    want %s\n", label, field,
                        cJSON_GetObjectItem(corpus[i], "name")->valuestring, rc, rc ? kvm_errmsg() : "", w);
                tt_print_ids("got ", ids, nid);
                free(w);
            }
        }
        kvm_free(ids);
    }
    return bad;
}

/* decode(ids) against the golden decode (both skip modes), and the streamed bytes against decode. */
static inline int tt_check_decode(const kvm_tokenizer_t *t, cJSON **corpus, cJSON **gold, int n, const char *label) {
    int bad = 0;
    for (int i = 0; i < n; i++) {
        const cJSON *g = gold[i + 1];
        const cJSON *ids_j = cJSON_GetObjectItem(g, "ids");
        int nid = cJSON_GetArraySize(ids_j);
        int32_t *ids = calloc((size_t)nid + 1, sizeof *ids);
        bool any_special = false;
        for (int k = 0; k < nid; k++) {
            ids[k] = (int32_t)cJSON_GetArrayItem(ids_j, k)->valuedouble;
            any_special |= kvm_tokenizer_is_special(t, ids[k]);
        }
        const char *name = cJSON_GetObjectItem(corpus[i], "name")->valuestring;
        for (int skip = 0; skip < 2; skip++) {
            const char *want = cJSON_GetObjectItem(g, skip ? "decoded_skip" : "decoded")->valuestring;
            char *out = NULL;
            size_t len = 0;
            int rc = kvm_detokenize(t, ids, nid, skip, &out, &len);
            if (rc || strlen(want) != len || memcmp(want, out, len)) {
                if (bad++ < 5) fprintf(stderr, "  [%s decode skip=%d] '%s': want '%s' got '%s' (rc %d)\n", label, skip, name, want, out ? out : "", rc);
            }
            kvm_free(out);
        }
        if (!any_special) { /* streaming: the per-token bytes concatenate to the decoded text */
            const char *want = cJSON_GetObjectItem(g, "decoded")->valuestring;
            char *acc = calloc(strlen(want) + 64 * (size_t)nid + 1, 1);
            size_t al = 0;
            int32_t prev = -1;
            for (int k = 0; k < nid; k++) {
                char buf[256];
                int nb = kvm_token_bytes(t, prev, ids[k], buf, sizeof buf);
                if (nb < 0) break;
                memcpy(acc + al, buf, (size_t)nb);
                al += (size_t)nb;
                prev = ids[k];
            }
            if (al != strlen(want) || memcmp(acc, want, al)) {
                if (bad++ < 5) fprintf(stderr, "  [%s stream] '%s': want '%s' got '%.*s'\n", label, name, want, (int)al, acc);
            }
            free(acc);
        }
        free(ids);
    }
    return bad;
}

/* Every golden check for one tokenizer over one corpus (corpus_file and golden_prefix + name + ".jsonl" in
 * tests/data/tokenizer); returns the total mismatch count (-1: files unreadable). */
static inline int tt_check_corpus(const kvm_tokenizer_t *t, const char *corpus_file, const char *golden_prefix,
                                  const char *golden_name) {
    char path[512], cpath[512];
    int nc = 0, ng = 0;
    snprintf(cpath, sizeof cpath, "%s/%s", TOKDATA, corpus_file);
    cJSON **corpus = tt_read_jsonl(cpath, &nc);
    snprintf(path, sizeof path, "%s/%s%s.jsonl", TOKDATA, golden_prefix, golden_name);
    cJSON **gold = tt_read_jsonl(path, &ng);
    if (!corpus || !gold || ng != nc + 1) {
        fprintf(stderr, "cannot read corpus/golden %s (%d vs %d lines)\n", path, nc, ng);
        tt_lines_free(corpus, nc);
        tt_lines_free(gold, ng);
        return -1;
    }
    int bad = 0;
    bad += tt_check_encode(t, corpus, gold, nc, "ids", KVM_TOK_PARSE_SPECIAL, golden_name);
    bad += tt_check_encode(t, corpus, gold, nc, "ids_nospecial", 0, golden_name);
    bad += tt_check_encode(t, corpus, gold, nc, "ids_bos", KVM_TOK_PARSE_SPECIAL | KVM_TOK_ADD_BOS, golden_name);
    bad += tt_check_decode(t, corpus, gold, nc, golden_name);
    if (bad) fprintf(stderr, "%s (%s): %d mismatches against HF tokenizers over %d strings\n", golden_name, corpus_file, bad, nc);
    else fprintf(stderr, "%s (%s): %d strings x 3 encode modes + decode + streaming match HF tokenizers\n", golden_name, corpus_file, nc);
    tt_lines_free(corpus, nc);
    tt_lines_free(gold, ng);
    return bad;
}

/* The hand-written corpus (tests/data/tokenizer/corpus.jsonl). */
static inline int tt_check_all(const kvm_tokenizer_t *t, const char *golden_name) {
    return tt_check_corpus(t, "corpus.jsonl", "golden-", golden_name);
}

/* The seeded random stress corpus (corpus-random.jsonl); 0 with a loud note when its goldens are absent. */
static inline int tt_check_random(const kvm_tokenizer_t *t, const char *golden_name) {
    char path[512];
    snprintf(path, sizeof path, "%s/golden-random-%s.jsonl", TOKDATA, golden_name);
    if (!kvm_file_exists(path)) {
        fprintf(stderr, "NOTE: %s absent: random-corpus parity not checked\n", path);
        return 0;
    }
    return tt_check_corpus(t, "corpus-random.jsonl", "golden-random-", golden_name);
}

/* Text of at least `target` bytes: parts[rand() % n_parts] concatenated after srand(seed), so the same
 * on every run (free with free()). */
static inline char *tt_seeded_text(const char *const *parts, int n_parts, size_t target, unsigned seed) {
    size_t longest = 0;
    for (int i = 0; i < n_parts; i++) longest = strlen(parts[i]) > longest ? strlen(parts[i]) : longest;
    char *buf = malloc(target + longest + 1);
    size_t len = 0;
    srand(seed);
    while (len < target) {
        const char *p = parts[rand() % n_parts];
        memcpy(buf + len, p, strlen(p));
        len += strlen(p);
    }
    buf[len] = '\0';
    return buf;
}

/* Encodes text with `flags` (timed), decodes the ids back (skipping special tokens when skip_special) and
 * asserts the text comes back exactly and the encode took milliseconds (under 200 ms; 2 s in a sanitizer
 * build). Needs <cmocka.h> included before this header. */
static inline void tt_roundtrip_in_milliseconds(const kvm_tokenizer_t *t, const char *text, int flags, bool skip_special,
                                                const char *label) {
    int32_t *ids = NULL;
    int n = 0;
    uint64_t t0 = kvm_now_ns();
    assert_int_equal(kvm_tokenize(t, text, strlen(text), flags, &ids, &n), 0);
    double ms = (double)(kvm_now_ns() - t0) / 1e6;
    fprintf(stderr, "%s: 10 KB encoded in %.2f ms (%d tokens)\n", label, ms, n);
    char *back = NULL;
    assert_int_equal(kvm_detokenize(t, ids, n, skip_special, &back, NULL), 0);
    assert_string_equal(back, text);
    assert_true(ms < (getenv("KVM_SANITIZED") ? 2000.0 : 200.0));
    kvm_free(back);
    kvm_free(ids);
}

#endif
