/* test_c2c_align.c - C2C token alignment across two DIFFERENT tokenizers (../shared/spec/c2c.md §4) and the
 * aligned-mode prefill (spec §5, §6; runtime/comm/c2c_align.h). The test writes variants of the bundled
 * models/minillama-2m tokenizer.json:
 *   V1 (a receiver's): the special ids permuted (<|im_start|> 0, <|im_end|> 1, <|endoftext|> 2), the merges of
 *      "user", "system" and "assistant" dropped (so those words split differently) and their ids reused for the new
 *      tokens "xdog", "dogcat" and a new special "<|tool|>" (the same vocabulary size, 633);
 *   V2 (a sharer's): the character 'Q' is not in the vocabulary (no unk), so "Q" encodes to nothing.
 * Every rule of the message-token mapping gets a case (single, several + first, several + longest, a tie, empty,
 * each special role, a special by string, a special the sharer lacks), then section counts, padding on either side,
 * and the prefill: a receiver directory (minillama-2m with V1) and the sharer models/miniqwen3-6m with an untrained
 * `longest` / `message_tokens` fuser: exactly the message rows are fused. CPU backend. */
#include <ftw.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include <kvmesh.h>

#include "runtime/comm/c2c_align.h"
#include "runtime/core/core.h"
#include "runtime/core/json.h"
#include "runtime/kv/kv.h"
#include "test_common.h"

TC_TMPDIR_FIXTURE("kvm_c2c_align")

static char g_v1[512], g_v2[512], g_base[512], g_cfg[512];
static kvm_tokenizer_t *g_tb, *g_t1, *g_t2; /* bundled, V1, V2 */

static cJSON *read_json(const char *path) {
    cJSON *j = NULL;
    if (kvm_json_read_object(path, 0, NULL, &j)) fail_msg("%s: %s", path, kvm_errmsg());
    return j;
}

static void write_json(const char *path, const cJSON *j) {
    char *s = cJSON_Print(j);
    FILE *f = fopen(path, "w");
    assert_non_null(s), assert_non_null(f);
    fputs(s, f);
    fclose(f);
    cJSON_free(s);
}

static void set_id(cJSON *vocab, const char *piece, int id) {
    assert_non_null(cJSON_GetObjectItemCaseSensitive(vocab, piece));
    cJSON_ReplaceItemInObjectCaseSensitive(vocab, piece, cJSON_CreateNumber(id));
}

static void rename_piece(cJSON *vocab, const char *from, const char *to) {
    cJSON *v = cJSON_GetObjectItemCaseSensitive(vocab, from);
    assert_non_null(v);
    const int id = v->valueint;
    cJSON_DeleteItemFromObjectCaseSensitive(vocab, from);
    cJSON_AddNumberToObject(vocab, to, id);
}

static void drop_merge(cJSON *merges, const char *a, const char *b) {
    int i = 0;
    for (cJSON *m = merges->child; m; m = m->next, i++)
        if (!strcmp(cJSON_GetArrayItem(m, 0)->valuestring, a) && !strcmp(cJSON_GetArrayItem(m, 1)->valuestring, b)) {
            cJSON_DeleteItemFromArray(merges, i);
            return;
        }
    fail_msg("merge %s %s not found", a, b);
}

static void add_merge(cJSON *merges, const char *a, const char *b) {
    const char *ab[2] = {a, b};
    cJSON_AddItemToArray(merges, cJSON_CreateStringArray(ab, 2));
}

static void write_variants(void) {
    cJSON *j = read_json(g_base);
    cJSON *model = cJSON_GetObjectItem(j, "model"), *vocab = cJSON_GetObjectItem(model, "vocab");
    cJSON *merges = cJSON_GetObjectItem(model, "merges"), *added = cJSON_GetObjectItem(j, "added_tokens");
    const int user = cJSON_GetObjectItem(vocab, "user")->valueint;
    (void)user;
    const int assistant = cJSON_GetObjectItem(vocab, "assistant")->valueint;
    /* V1: permuted special ids */
    const char *sp[3] = {"<|im_start|>", "<|im_end|>", "<|endoftext|>"};
    for (int k = 0; k < 3; k++) set_id(vocab, sp[k], k);
    for (cJSON *a = added->child; a; a = a->next) {
        const char *c = cJSON_GetObjectItem(a, "content")->valuestring;
        for (int k = 0; k < 3; k++)
            if (!strcmp(c, sp[k])) cJSON_ReplaceItemInObjectCaseSensitive(a, "id", cJSON_CreateNumber(k));
    }
    /* V1: words that split differently, new tokens on their ids */
    drop_merge(merges, "us", "er"), drop_merge(merges, "sy", "stem"), drop_merge(merges, "assist", "ant");
    rename_piece(vocab, "user", "xdog"), rename_piece(vocab, "system", "dogcat"), rename_piece(vocab, "assistant", "<|tool|>");
    add_merge(merges, "x", "dog"), add_merge(merges, "dog", "cat");
    cJSON *tool = cJSON_CreateObject();
    cJSON_AddNumberToObject(tool, "id", assistant);
    cJSON_AddStringToObject(tool, "content", "<|tool|>");
    cJSON_AddFalseToObject(tool, "single_word"), cJSON_AddFalseToObject(tool, "lstrip");
    cJSON_AddFalseToObject(tool, "rstrip"), cJSON_AddFalseToObject(tool, "normalized");
    cJSON_AddTrueToObject(tool, "special");
    cJSON_AddItemToArray(added, tool);
    write_json(g_v1, j);
    cJSON_Delete(j);
    /* V2: no 'Q' */
    j = read_json(g_base);
    rename_piece(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "model"), "vocab"), "Q", "QQQQ");
    write_json(g_v2, j);
    cJSON_Delete(j);
}

static kvm_tokenizer_t *load_tok(const char *path) {
    kvm_tokenizer_t *t = kvm_tokenizer_load_hf(path, g_cfg);
    if (!t) fail_msg("tokenizer %s: %s", path, kvm_errmsg());
    return t;
}

static int group_setup(void **st) {
    if (setup(st)) return -1;
    snprintf(g_base, sizeof g_base, "%s/models/minillama-2m/tokenizer.json", KVM_SOURCE_DIR);
    snprintf(g_cfg, sizeof g_cfg, "%s/models/minillama-2m/tokenizer_config.json", KVM_SOURCE_DIR);
    snprintf(g_v1, sizeof g_v1, "%s/v1.tokenizer.json", g_dir);
    snprintf(g_v2, sizeof g_v2, "%s/v2.tokenizer.json", g_dir);
    write_variants();
    g_tb = load_tok(g_base), g_t1 = load_tok(g_v1), g_t2 = load_tok(g_v2);
    return 0;
}

static int group_teardown(void **st) {
    kvm_tokenizer_free(g_tb), kvm_tokenizer_free(g_t1), kvm_tokenizer_free(g_t2);
    return teardown(st);
}

static int32_t id_of(const kvm_tokenizer_t *t, const char *piece) {
    const int32_t id = kvm_tokenizer_find(t, piece);
    if (id < 0) fail_msg("no token '%s'", piece);
    return id;
}

/* the sides as the bundled tokenizer_config.json says: pad <|endoftext|>, eos <|im_end|>, no bos, no unk */
static kvm_c2c_align_side_t side_v1(void) { return (kvm_c2c_align_side_t){g_t1, 2, 1, -1, -1, false}; }
static kvm_c2c_align_side_t side_b(void) { return (kvm_c2c_align_side_t){g_tb, 0, 2, -1, -1, false}; }

static int32_t map(const kvm_c2c_align_side_t *r, const kvm_c2c_align_side_t *s, int32_t rid, kvm_c2c_strategy_t k) {
    int32_t sid = -7;
    if (kvm_c2c_map_token(r, s, rid, k, &sid)) fail_msg("map %d: %s", rid, kvm_errmsg());
    return sid;
}

/* The variants are what the test means: V1 really differs from the bundled tokenizer. */
static void test_the_variants_differ(void **st) {
    (void)st;
    assert_int_equal(kvm_tokenizer_vocab_size(g_t1), kvm_tokenizer_vocab_size(g_tb));
    assert_int_equal(id_of(g_t1, "<|im_start|>"), 0);
    assert_int_equal(id_of(g_tb, "<|im_start|>"), 1);
    int32_t *ids = NULL;
    int n = 0;
    assert_int_equal(kvm_tokenize(g_tb, "user", 4, 0, &ids, &n), 0);
    assert_int_equal(n, 1);
    kvm_free(ids);
    assert_int_equal(kvm_tokenize(g_t1, "user", 4, 0, &ids, &n), 0);
    assert_int_equal(n, 2); /* us er */
    kvm_free(ids);
    assert_int_equal(kvm_tokenize(g_t1, "xdog", 4, 0, &ids, &n), 0);
    assert_int_equal(n, 1);
    kvm_free(ids);
    assert_int_equal(kvm_tokenize(g_t2, "Q", 1, 0, &ids, &n), 0);
    assert_int_equal(n, 0); /* dropped: not in V2's vocabulary, no unk */
    kvm_free(ids);
}

/* Message tokens: one result; several with first / longest; a tie (the earlier wins); empty (unk, else 0). */
static void test_message_tokens_map_by_re_encoding(void **st) {
    (void)st;
    kvm_c2c_align_side_t r = side_v1(), s = side_b();
    /* single: "the" is one token in both */
    assert_int_equal(map(&r, &s, id_of(g_t1, "the"), KVM_C2C_ALIGN_FIRST), id_of(g_tb, "the"));
    assert_int_equal(map(&r, &s, id_of(g_t1, "the"), KVM_C2C_ALIGN_LONGEST), id_of(g_tb, "the"));
    /* several: "xdog" -> x dog in the bundled tokenizer */
    int32_t *ids = NULL;
    int n = 0;
    assert_int_equal(kvm_tokenize(g_tb, "xdog", 4, 0, &ids, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], id_of(g_tb, "x"));
    assert_int_equal(ids[1], id_of(g_tb, "dog"));
    kvm_free(ids);
    assert_int_equal(map(&r, &s, id_of(g_t1, "xdog"), KVM_C2C_ALIGN_FIRST), id_of(g_tb, "x"));
    assert_int_equal(map(&r, &s, id_of(g_t1, "xdog"), KVM_C2C_ALIGN_LONGEST), id_of(g_tb, "dog"));
    /* a tie: "dogcat" -> dog cat (3 characters each): the earlier */
    assert_int_equal(kvm_tokenize(g_tb, "dogcat", 6, 0, &ids, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(ids[1], id_of(g_tb, "cat"));
    kvm_free(ids);
    assert_int_equal(map(&r, &s, id_of(g_t1, "dogcat"), KVM_C2C_ALIGN_LONGEST), id_of(g_tb, "dog"));
    assert_int_equal(map(&r, &s, id_of(g_t1, "dogcat"), KVM_C2C_ALIGN_FIRST), id_of(g_tb, "dog"));
    /* empty: the bundled "Q" re-encodes to nothing with V2 -> V2's unk, else 0 */
    kvm_c2c_align_side_t rb = side_b(), s2 = {g_t2, 0, 2, -1, -1, false};
    assert_int_equal(map(&rb, &s2, id_of(g_tb, "Q"), KVM_C2C_ALIGN_LONGEST), 0);
    s2.unk = 5;
    assert_int_equal(map(&rb, &s2, id_of(g_tb, "Q"), KVM_C2C_ALIGN_FIRST), 5);
    /* a bad id */
    int32_t sid;
    assert_int_equal(kvm_c2c_map_token(&r, &s, 633, KVM_C2C_ALIGN_FIRST, &sid), KVM_EINVAL);
    assert_int_equal(kvm_c2c_map_token(&r, &s, 3, 0, &sid), KVM_EINVAL);
}

/* Special tokens: pad / eos / bos / unk by role, other specials by string, else unk (or 0). */
static void test_special_tokens_map_by_role_then_string(void **st) {
    (void)st;
    kvm_c2c_align_side_t r = side_v1(), s = side_b();
    /* pad: V1's <|endoftext|> (2) -> the sharer's pad (0); with another sharer pad id, that one (the role wins) */
    assert_int_equal(map(&r, &s, 2, KVM_C2C_ALIGN_FIRST), 0);
    s.pad = 7;
    assert_int_equal(map(&r, &s, 2, KVM_C2C_ALIGN_FIRST), 7);
    s = side_b();
    /* eos: V1's <|im_end|> (1) -> 2 */
    assert_int_equal(map(&r, &s, 1, KVM_C2C_ALIGN_LONGEST), 2);
    s.eos = 9;
    assert_int_equal(map(&r, &s, 1, KVM_C2C_ALIGN_LONGEST), 9);
    s = side_b();
    /* bos: a receiver bos (here <|im_start|>, 0) -> the sharer's bos; a sharer without bos -> by string (1) */
    r.bos = 0, s.bos = 11;
    assert_int_equal(map(&r, &s, 0, KVM_C2C_ALIGN_FIRST), 11);
    s.bos = -1;
    assert_int_equal(map(&r, &s, 0, KVM_C2C_ALIGN_FIRST), 1);
    r = side_v1();
    /* unk: a receiver unk id -> the sharer's unk */
    r.unk = id_of(g_t1, "<|tool|>"), s.unk = 13;
    assert_int_equal(map(&r, &s, r.unk, KVM_C2C_ALIGN_FIRST), 13);
    r = side_v1(), s = side_b();
    /* another special by its string: V1's <|im_start|> (0) -> the bundled one (1) */
    assert_true(kvm_tokenizer_is_special(g_t1, 0));
    assert_int_equal(map(&r, &s, 0, KVM_C2C_ALIGN_LONGEST), 1);
    /* a special the sharer does not have: unk, else 0 */
    const int32_t tool = id_of(g_t1, "<|tool|>");
    assert_true(kvm_tokenizer_is_special(g_t1, tool));
    assert_int_equal(map(&r, &s, tool, KVM_C2C_ALIGN_FIRST), 0);
    s.unk = 5;
    assert_int_equal(map(&r, &s, tool, KVM_C2C_ALIGN_FIRST), 5);
}

static void check_shape(const kvm_c2c_aligned_t *a) {
    assert_true(a->n > 0);
    assert_int_equal(a->sec_start[0], 0);
    assert_int_equal(a->sec_start[a->n_sections], a->n);
    int rp = 0, spd = 0;
    for (int i = 0; i < a->n_sections; i++)
        for (int t = a->sec_start[i]; t < a->sec_start[i + 1]; t++) {
            assert_int_equal(a->fuse[t], a->sec_message[i]); /* exactly the message rows are fused */
            if (a->fuse[t]) assert_false(a->r_pad[t] || a->s_pad[t]);
            rp += a->r_pad[t], spd += a->s_pad[t];
        }
    assert_int_equal(rp, a->r_pads);
    assert_int_equal(spd, a->s_pads);
}

/* A conversation: each side renders its own template (ChatML); the template sections are right-padded on the shorter
 * side; message rows map 1:1 (so the same count on both sides); positions 0..N-1 for both. */
static void test_a_conversation_aligns_with_sharer_pads(void **st) {
    (void)st;
    kvm_c2c_align_side_t r = side_v1(), s = side_b();
    const kvm_chat_msg_t msgs[] = {{"system", "Be brief."}, {"user", "the xdog <|im_end|> dogcat Q"}};
    kvm_c2c_aligned_t a;
    if (kvm_c2c_align_chat(&r, KVM_CHAT_CHATML, &s, KVM_CHAT_CHATML, msgs, 2, true, KVM_C2C_ALIGN_LONGEST, &a))
        fail_msg("align: %s", kvm_errmsg());
    check_shape(&a);
    assert_int_equal(a.n_sections, 5);
    assert_int_equal(a.sec_message[1], 1);
    assert_int_equal(a.sec_message[3], 1);
    /* V1 splits "system" (sy stem), "user" (us er), "assistant" (assist ant): the sharer is padded with its pad, the
     * receiver never */
    assert_int_equal(a.r_pads, 0);
    assert_int_equal(a.s_pads, 3);
    assert_int_equal(a.r_pads_trailing, 0);
    assert_int_equal(a.s_pads_run, 2); /* "system" and "user"; "assistant" is in the last section */
    for (int t = 0; t < a.n; t++)
        if (a.s_pad[t]) assert_int_equal(a.s_ids[t], 0);
    /* section 0 is "<|im_start|>system\n": V1 <|im_start|>(0) sy stem \n; bundled <|im_start|>(1) system \n pad */
    assert_int_equal(a.sec_start[1], 4);
    assert_int_equal(a.r_ids[0], 0);
    assert_int_equal(a.s_ids[0], 1);
    assert_int_equal(a.s_ids[1], id_of(g_tb, "system"));
    assert_int_equal(a.s_pad[3], 1);
    /* the user message: the, ' ', xdog, ' ', <|im_end|>, ' ', dogcat, ' ', Q (the pre-tokenizer isolates spaces) */
    const int m = a.sec_start[3];
    assert_int_equal(a.sec_start[4] - m, 9);
    assert_int_equal(a.s_ids[m + 0], id_of(g_tb, "the"));
    assert_int_equal(a.s_ids[m + 2], id_of(g_tb, "dog")); /* longest */
    assert_int_equal(a.r_ids[m + 4], 1);                  /* V1's <|im_end|> */
    assert_int_equal(a.s_ids[m + 4], 2);                  /* the sharer's eos */
    assert_int_equal(a.s_ids[m + 6], id_of(g_tb, "dog")); /* tie: the earlier */
    assert_int_equal(a.s_ids[m + 8], id_of(g_tb, "Q"));
    assert_int_equal(a.mapped_several, 2);
    assert_int_equal(a.mapped_special, 1);
    assert_int_equal(a.mapped_empty, 0);
    assert_int_equal(a.strategy, KVM_C2C_ALIGN_LONGEST);
    kvm_c2c_aligned_free(&a);
    /* first: the same rows, "xdog" -> x */
    assert_int_equal(kvm_c2c_align_chat(&r, KVM_CHAT_CHATML, &s, KVM_CHAT_CHATML, msgs, 2, true, KVM_C2C_ALIGN_FIRST, &a), 0);
    assert_int_equal(a.s_ids[a.sec_start[3] + 2], id_of(g_tb, "x"));
    kvm_c2c_aligned_free(&a);
}

/* The receiver's template shorter than the sharer's: the receiver gets pads (its own pad id) and every later
 * receiver position shifts; the empty rule counted. */
static void test_a_shorter_receiver_gets_pads(void **st) {
    (void)st;
    kvm_c2c_align_side_t r = side_b(), s = side_v1();
    const kvm_chat_msg_t msgs[] = {{"user", "Q the"}};
    kvm_c2c_aligned_t a;
    assert_int_equal(kvm_c2c_align_chat(&r, KVM_CHAT_CHATML, &s, KVM_CHAT_CHATML, msgs, 1, true, KVM_C2C_ALIGN_FIRST, &a), 0);
    check_shape(&a);
    /* "<|im_start|>user\n": bundled 3 tokens, V1 4: one receiver pad at row 3 */
    assert_int_equal(a.sec_start[1], 4);
    assert_int_equal(a.r_pad[3], 1);
    assert_int_equal(a.r_ids[3], 0); /* the bundled pad */
    assert_int_equal(a.s_ids[0], 0); /* V1's <|im_start|> */
    assert_int_equal(a.r_pads, 2);   /* and "assistant" in the last section, trailing */
    assert_int_equal(a.r_pads_trailing, 1);
    assert_int_equal(a.s_pads, 0);
    kvm_c2c_aligned_free(&a);
    /* the empty rule: V2 lacks 'Q' */
    kvm_c2c_align_side_t s2 = {g_t2, 0, 2, -1, -1, false};
    assert_int_equal(kvm_c2c_align_chat(&r, KVM_CHAT_CHATML, &s2, KVM_CHAT_CHATML, msgs, 1, true, KVM_C2C_ALIGN_FIRST, &a), 0);
    assert_int_equal(a.mapped_empty, 1);
    assert_int_equal(a.s_ids[a.sec_start[1]], 0);
    kvm_c2c_aligned_free(&a);
    /* no pad token on the side that needs one */
    r.pad = -1;
    assert_int_equal(kvm_c2c_align_chat(&r, KVM_CHAT_CHATML, &s, KVM_CHAT_CHATML, msgs, 1, true, KVM_C2C_ALIGN_FIRST, &a),
                     KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "receiver has no pad token"));
}

/* Sections must match in count and kind; a message's text must be the same on both sides. */
static void test_section_mismatches_are_refused(void **st) {
    (void)st;
    kvm_c2c_align_side_t r = side_v1(), s = side_b();
    const kvm_c2c_section_t three[] = {{"<|im_start|>user\n", 17, false}, {"hi", 2, true}, {"<|im_end|>\n", 11, false}};
    const kvm_c2c_section_t one[] = {{"<|im_start|>user\nhi<|im_end|>\n", 30, false}};
    const kvm_c2c_section_t kinds[] = {{"<|im_start|>user\n", 17, false}, {"hi", 2, false}, {"<|im_end|>\n", 11, false}};
    const kvm_c2c_section_t other[] = {{"<|im_start|>user\n", 17, false}, {"ho", 2, true}, {"<|im_end|>\n", 11, false}};
    kvm_c2c_aligned_t a;
    assert_int_equal(kvm_c2c_align_sections(&r, three, 3, &s, one, 1, KVM_C2C_ALIGN_FIRST, &a), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "3 sections and the sharer's 1"));
    assert_non_null(strstr(kvm_errmsg(), "spec §4"));
    assert_null(a.r_ids);
    assert_int_equal(kvm_c2c_align_sections(&r, three, 3, &s, kinds, 3, KVM_C2C_ALIGN_FIRST, &a), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "section 1 is a message for the receiver but a template"));
    assert_int_equal(kvm_c2c_align_sections(&r, three, 3, &s, other, 3, KVM_C2C_ALIGN_FIRST, &a), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "message section 1 differs"));
    assert_int_equal(kvm_c2c_align_sections(&r, three, 3, &s, three, 3, (kvm_c2c_strategy_t)0, &a), KVM_EINVAL);
    assert_int_equal(kvm_c2c_align_sections(&r, three, 3, &s, three, 3, KVM_C2C_ALIGN_FIRST, &a), 0);
    assert_int_equal(a.n_sections, 3);
    kvm_c2c_aligned_free(&a);
    /* a role holding the sentinel byte */
    const kvm_chat_msg_t bad[] = {{"us\x1e" "er", "hi"}};
    assert_int_equal(kvm_c2c_align_chat(&r, KVM_CHAT_CHATML, &s, KVM_CHAT_CHATML, bad, 1, true, KVM_C2C_ALIGN_FIRST, &a),
                     KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "0x1E"));
}

/* ---- the prefill: receiver = minillama-2m with V1, sharer = models/miniqwen3-6m --------------------------- */

/* Copies the file at from to to, replacing each occurrence of a by b and of c by d (NULL: none). */
static void copy_patched(const char *from, const char *to, const char *a, const char *b, const char *c, const char *d) {
    char *buf = NULL;
    if (kvm_read_file(from, &buf, NULL, 0)) fail_msg("%s: %s", from, kvm_errmsg());
    FILE *f = fopen(to, "wb");
    assert_non_null(f);
    const char *pats[2][2] = {{a, b}, {c, d}};
    const char *p = buf;
    for (;;) {
        const char *best = NULL;
        int k = -1;
        for (int i = 0; i < 2; i++) {
            const char *q = pats[i][0] ? strstr(p, pats[i][0]) : NULL;
            if (q && (!best || q < best)) best = q, k = i;
        }
        if (!best) break;
        fwrite(p, 1, (size_t)(best - p), f);
        fputs(pats[k][1], f);
        p = best + strlen(pats[k][0]);
    }
    fputs(p, f);
    fclose(f);
    kvm_free(buf);
}

static kvm_model_t *load_dir(const char *dir) {
    kvm_load_opts_t opts = {.backend = "cpu", .quiet = true};
    kvm_model_t *m = kvm_model_load_opts(dir, &opts);
    if (!m) fail_msg("load %s: %s", dir, kvm_errmsg());
    return m;
}

/* A bundled model's files (models/<name>) with V1 as its tokenizer (eos <|im_end|> = 1, pad <|endoftext|> = 2
 * there), in g_dir/<name>-v1; dir gets the folder. */
static void v1_dir(const char *name, char *dir, size_t cap) {
    char base[600], src[700], dst[700];
    snprintf(dir, cap, "%s/%s-v1", g_dir, name);
    mkdir(dir, 0755);
    snprintf(base, sizeof base, "%s/models/%s", KVM_SOURCE_DIR, name);
    snprintf(src, sizeof src, "%s/model.safetensors", base);
    snprintf(dst, sizeof dst, "%s/model.safetensors", dir);
    if (access(dst, F_OK)) assert_int_equal(symlink(src, dst), 0);
    snprintf(src, sizeof src, "%s/config.json", base);
    snprintf(dst, sizeof dst, "%s/config.json", dir);
    copy_patched(src, dst, "\"eos_token_id\": 2", "\"eos_token_id\": 1", "\"pad_token_id\": 0", "\"pad_token_id\": 2");
    snprintf(src, sizeof src, "%s/generation_config.json", base);
    snprintf(dst, sizeof dst, "%s/generation_config.json", dir);
    copy_patched(src, dst, "\"eos_token_id\": 2", "\"eos_token_id\": 1", "\"pad_token_id\": 0", "\"pad_token_id\": 2");
    snprintf(dst, sizeof dst, "%s/tokenizer_config.json", dir);
    copy_patched(g_cfg, dst, NULL, NULL, NULL, NULL);
    snprintf(dst, sizeof dst, "%s/tokenizer.json", dir);
    copy_patched(g_v1, dst, NULL, NULL, NULL, NULL);
}

/* minillama-2m with V1 */
static kvm_model_t *receiver_v1(void) {
    char dir[600];
    v1_dir("minillama-2m", dir, sizeof dir);
    return load_dir(dir);
}

static size_t kv_floats(const kvm_model_t *m, int n) {
    return (size_t)m->cfg.n_layers * 2 * m->cfg.n_kv_heads * (size_t)n * m->cfg.head_dim;
}

/* Rows [t0, t1) of every layer and branch of two read-outs of n rows are bit-identical. */
static bool rows_equal(const kvm_model_t *m, const float *a, const float *b, int n, int t0, int t1) {
    const size_t D = (size_t)m->cfg.head_dim;
    for (size_t blk = 0; blk < (size_t)m->cfg.n_layers * 2 * m->cfg.n_kv_heads; blk++)
        for (int t = t0; t < t1; t++)
            if (memcmp(a + (blk * n + t) * D, b + (blk * n + t) * D, D * sizeof *a)) return false;
    return true;
}

static const kvm_chat_msg_t k_msgs[] = {{"system", "You answer in one word."},
                                        {"user", "the xdog saw a dogcat by the river. What did the xdog see?"}};

/* The aligned prefill: the run succeeds; with every gate closed it is bit for bit the receiver's own prefill (rows
 * and logits); with open gates the rows before the first message are the receiver's own, exactly the message rows
 * are fused (a replay that fuses only the message sections gives the same cache and logits, bit for bit, and every
 * message row moved), and the sharer's KV is freed. */
static void test_the_aligned_prefill_fuses_exactly_the_message_rows(void **st) {
    (void)st;
    kvm_model_t *R = receiver_v1(), *S = NULL;
    {
        char d[600];
        snprintf(d, sizeof d, "%s/models/miniqwen3-6m", KVM_SOURCE_DIR);
        S = load_dir(d);
    }
    char jp[600], jc[600], ji[600];
    snprintf(jp, sizeof jp, "%s/longest.c2c.json", g_dir);
    snprintf(jc, sizeof jc, "%s/closed.c2c.json", g_dir);
    snprintf(ji, sizeof ji, "%s/identity.c2c.json", g_dir);
    kvm_c2c_init_opts_t o = {.seed = 3, .hidden = 16, .token_alignment = "longest"};
    assert_int_equal(kvm_c2c_write_untrained(jp, R, S, &o), 0);
    o.closed = "k0,k1,k2,k3,k4,k5,v0,v1,v2,v3,v4,v5";
    assert_int_equal(kvm_c2c_write_untrained(jc, R, S, &o), 0);
    kvm_c2c_init_opts_t oi = {.seed = 3, .hidden = 16};
    assert_int_equal(kvm_c2c_write_untrained(ji, R, S, &oi), 0);
    o.token_alignment = "nearest";
    assert_int_equal(kvm_c2c_write_untrained(jc, R, S, &o), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "'nearest'"));
    kvm_c2c_fuser_t *f = kvm_c2c_open(jp, R, S), *fc = kvm_c2c_open(jc, R, S), *fi = kvm_c2c_open(ji, R, S);
    if (!f || !fc || !fi) fail_msg("open: %s", kvm_errmsg());
    assert_string_equal(f->cfg.token_alignment, "longest");
    assert_string_equal(f->cfg.fuse_tokens, "message_tokens");

    kvm_c2c_aligned_t a;
    if (kvm_c2c_align_models(f, R, S, k_msgs, 2, &a)) fail_msg("align: %s", kvm_errmsg());
    check_shape(&a);
    assert_int_equal(a.r_pads, 0);
    assert_true(a.s_pads_run > 0); /* the sharer is padded before the last section */
    assert_true(a.mapped_several >= 2);
    int n_msg = 0;
    for (int t = 0; t < a.n; t++) n_msg += a.fuse[t];
    const int N = a.n, V = R->cfg.vocab_size, m0 = a.sec_start[1];
    assert_true(n_msg > 0 && m0 > 0);

    kvm_kv_pool_t *rp = kvm_model_kv_pool(R, 0), *sp = kvm_model_kv_pool(S, 0);
    const int sp_free = sp->n_free;
    float *la = malloc((size_t)V * sizeof *la), *lb = malloc((size_t)V * sizeof *lb);
    float *ka = malloc(kv_floats(R, N) * sizeof *ka), *kb = malloc(kv_floats(R, N) * sizeof *kb);
    float *ku = malloc(kv_floats(R, N) * sizeof *ku);

    /* the receiver's own prefill of its aligned ids (no pads: all N rows) */
    kvm_seq_t *own = kvm_seq_create(rp);
    kvm_batch_item_t io = {.seq = own, .tokens = a.r_ids, .n_tokens = N, .logits = lb};
    assert_int_equal(kvm_forward(R, &io, 1), 0);
    assert_int_equal(kvm_seq_read_rows(own, 0, N, kb), 0);

    /* every gate closed: the same cache and logits, bit for bit */
    kvm_seq_t *rs = kvm_seq_create(rp);
    kvm_c2c_stats_t stt;
    if (kvm_c2c_prefill_aligned(fc, R, rs, S, sp, &a, la, &stt)) fail_msg("prefill (closed): %s", kvm_errmsg());
    assert_int_equal(rs->n_tokens, N);
    assert_int_equal(stt.fused_tokens, n_msg);
    assert_int_equal(stt.gates_k_open + stt.gates_v_open, 0);
    assert_int_equal(kvm_seq_read_rows(rs, 0, N, ka), 0);
    assert_true(rows_equal(R, ka, kb, N, 0, N));
    assert_memory_equal(la, lb, (size_t)V * sizeof *la);
    assert_int_equal(sp->n_free, sp_free);
    kvm_seq_destroy(rs);

    /* open gates */
    rs = kvm_seq_create(rp);
    if (kvm_c2c_prefill_aligned(f, R, rs, S, sp, &a, la, &stt)) fail_msg("prefill: %s", kvm_errmsg());
    assert_int_equal(rs->n_tokens, N);
    assert_int_equal(stt.fused_tokens, n_msg);
    assert_int_equal(stt.gates_k_open + stt.gates_v_open, 12);
    assert_int_equal(sp->n_free, sp_free); /* the sharer's KV is freed */
    assert_int_equal(kvm_seq_read_rows(rs, 0, N, ka), 0);
    assert_true(rows_equal(R, ka, kb, N, 0, m0)); /* before the first message: the receiver's own */
    assert_false(rows_equal(R, ka, kb, N, m0, N));

    /* the replay: sections in order, the message sections fused by hand (kvm_c2c_fuse), nothing else */
    kvm_seq_t *rh = kvm_seq_create(rp), *sh = kvm_seq_create(sp);
    const int last = a.n_sections - 1;
    int moved_rows = 0;
    for (int i = 0; i <= last; i++) {
        const int p = a.sec_start[i], len = a.sec_start[i + 1] - p;
        if (!len) continue;
        kvm_batch_item_t ri = {.seq = rh, .tokens = a.r_ids + p, .n_tokens = len, .logits = i == last ? lb : NULL};
        assert_int_equal(kvm_forward(R, &ri, 1), 0);
        if (i == last) break;
        kvm_batch_item_t si = {.seq = sh, .tokens = a.s_ids + p, .n_tokens = len};
        assert_int_equal(kvm_forward(S, &si, 1), 0);
        if (!a.sec_message[i]) continue;
        assert_int_equal(kvm_seq_read_rows(rh, 0, p + len, ku), 0);
        kvm_c2c_cache_t cr, cs;
        int32_t *d1, *d2;
        assert_int_equal(kvm_c2c_seq_view(f, rh, &cr, &d1), 0);
        assert_int_equal(kvm_c2c_seq_view(f, sh, &cs, &d2), 0);
        assert_int_equal(kvm_c2c_fuse(f, &cr, &cs, p, len), 0);
        assert_int_equal(kvm_seq_read_rows(rh, 0, p + len, kb), 0);
        assert_true(rows_equal(R, ku, kb, p + len, 0, p)); /* earlier rows untouched by this fusion */
        for (int t = p; t < p + len; t++) moved_rows += !rows_equal(R, ku, kb, p + len, t, t + 1);
    }
    assert_int_equal(moved_rows, n_msg); /* every message row was changed by its fusion */
    assert_int_equal(kvm_seq_read_rows(rh, 0, N, kb), 0);
    assert_true(rows_equal(R, ka, kb, N, 0, N));
    assert_memory_equal(la, lb, (size_t)V * sizeof *la);
    fprintf(stderr, "c2c aligned prefill: %d rows, %d message rows fused, %d sharer pads run, %d tokens mapped to "
                    "several; prefill %.2f ms, fuse %.2f ms, last section %.2f ms\n",
            N, n_msg, a.s_pads_run, a.mapped_several, stt.prefill_ms, stt.fuse_ms, stt.rest_ms);
    kvm_seq_destroy(rh), kvm_seq_destroy(sh);

    /* refusals, the receiver's sequence unchanged */
    kvm_seq_t *re = kvm_seq_create(rp);
    assert_int_equal(kvm_c2c_prefill_aligned(fi, R, re, S, sp, &a, la, NULL), KVM_EINVAL); /* identity fuser */
    assert_non_null(strstr(kvm_errmsg(), "not aligned mode"));
    assert_int_equal(kvm_c2c_prefill_aligned(f, R, rs, S, sp, &a, la, NULL), KVM_EINVAL); /* rseq not empty */
    kvm_c2c_aligned_t empty = {.strategy = KVM_C2C_ALIGN_LONGEST};
    assert_int_equal(kvm_c2c_prefill_aligned(f, R, re, S, sp, &empty, la, NULL), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "no rows"));
    assert_int_equal(rs->n_tokens, N);
    assert_int_equal(kvm_c2c_prefill(f, R, re, S, sp, a.r_ids, N, N - 1, la, NULL), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "spec §4"));
    kvm_c2c_aligned_t b;
    assert_int_equal(kvm_c2c_align_models(fi, R, S, k_msgs, 2, &b), KVM_EINVAL);
    /* an alignment of another strategy */
    kvm_c2c_align_side_t sr, ss;
    assert_int_equal(kvm_c2c_align_side_of(R, &sr), 0);
    assert_int_equal(kvm_c2c_align_side_of(S, &ss), 0);
    assert_int_equal(sr.pad, 2);
    assert_int_equal(sr.eos, 1);
    assert_int_equal(kvm_c2c_align_chat(&sr, KVM_CHAT_CHATML, &ss, KVM_CHAT_CHATML, k_msgs, 2, true, KVM_C2C_ALIGN_FIRST, &b), 0);
    assert_int_equal(kvm_c2c_prefill_aligned(f, R, re, S, sp, &b, la, NULL), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "strategy 'first'"));
    kvm_c2c_aligned_free(&b);
    /* receiver pads before the last section (a receiver rendered with the bundled tokenizer, the sharer with V1):
     * refused naming spec §4 */
    kvm_c2c_align_side_t rb = side_b(), s1 = side_v1();
    assert_int_equal(kvm_c2c_align_chat(&rb, KVM_CHAT_CHATML, &s1, KVM_CHAT_CHATML, k_msgs, 2, true, KVM_C2C_ALIGN_LONGEST, &b), 0);
    assert_true(b.r_pads > b.r_pads_trailing);
    assert_int_equal(kvm_c2c_prefill_aligned(f, R, re, S, sp, &b, la, NULL), KVM_EUNSUPPORTED);
    assert_non_null(strstr(kvm_errmsg(), "spec §4"));
    assert_non_null(strstr(kvm_errmsg(), "is a pad"));
    assert_int_equal(re->n_tokens, 0);
    /* trailing receiver pads only (a conversation whose last section alone is shorter): dropped, the run succeeds */
    const kvm_chat_msg_t one[] = {{"tool", "the xdog"}};
    kvm_c2c_aligned_free(&b);
    assert_int_equal(kvm_c2c_align_chat(&rb, KVM_CHAT_CHATML, &s1, KVM_CHAT_CHATML, one, 1, true, KVM_C2C_ALIGN_LONGEST, &b), 0);
    assert_int_equal(b.r_pads, b.r_pads_trailing);
    assert_true(b.r_pads_trailing > 0);
    if (kvm_c2c_prefill_aligned(f, R, re, S, sp, &b, la, NULL)) fail_msg("trailing pads: %s", kvm_errmsg());
    assert_int_equal(re->n_tokens, b.n - b.r_pads_trailing);
    kvm_c2c_aligned_free(&b);

    kvm_c2c_aligned_free(&a);
    free(la), free(lb), free(ka), free(kb), free(ku);
    kvm_seq_destroy(own), kvm_seq_destroy(rs), kvm_seq_destroy(re);
    kvm_kv_pool_free(rp), kvm_kv_pool_free(sp);
    kvm_c2c_free(f), kvm_c2c_free(fc), kvm_c2c_free(fi);
    kvm_model_free(R), kvm_model_free(S);
}

/* ---- kv_from in aligned mode: one placeholder of the receiver's prompt, the sharer's own rendering before it ---- */

typedef struct kvf_seen {
    int steps, fused, recomputed, tokens_in, status;
    char text[128], mode[16], err[512];
} kvf_seen_t;

static void kvf_on_step(void *ud, const kvm_step_event_t *e) {
    kvf_seen_t *s = ud;
    if (!e->agent || strcmp(e->agent, "answerer")) return;
    s->steps++;
    s->fused = e->kv_fused, s->recomputed = e->kv_recomputed, s->tokens_in = e->tokens_in, s->status = e->status;
    snprintf(s->text, sizeof s->text, "%s", e->text ? e->text : "");
    snprintf(s->mode, sizeof s->mode, "%s", e->kv_mode ? e->kv_mode : "");
    snprintf(s->err, sizeof s->err, "%s", e->error ? e->error : "");
}

/* reader (sharer) -> answerer (receiver, kv_from the reader's {input.docs} through fuser fp) on inputs (NULL: two
 * facts and a question); the run's status */
static int kvf_run(const char *rdir, const char *sdir, const char *fp, const char *inputs, kvf_seen_t *s) {
    memset(s, 0, sizeof *s);
    kvm_runtime_params_t rp = kvm_runtime_default_params();
    rp.echo_print = false;
    kvm_runtime_t *rt = kvm_runtime_create(&rp);
    assert_non_null(rt);
    char src[3072];
    snprintf(src, sizeof src,
             "local q = kvmesh.model('%s')\nlocal l = kvmesh.model('%s')\nlocal g = kvmesh.graph{}\n"
             "g:agent('reader', { model = q, max_tokens = 2, system = 'Answer with the number.',\n"
             "  template = 'Facts: {input.docs}\\nAsk: {input.q}' })\n"
             "g:agent('answerer', { model = l, max_tokens = 6, ignore_eos = true, system = 'Answer with the number.',\n"
             "  template = 'Facts: {input.docs}\\nAsk: {input.q}',\n"
             "  kv_from = { agent = 'reader', via = 'c2c', fuser = '%s', section = 'input.docs' } })\n"
             "g:edge(kvmesh.START, 'reader')\ng:edge('reader', 'answerer')\nreturn g\n", sdir, rdir, fp);
    kvm_workflow_params_t wp = kvm_workflow_default_params();
    wp.on_step = kvf_on_step;
    wp.ud = s;
    kvm_workflow_t *wf = kvm_workflow_load_string(rt, "kvf.lua", src, strlen(src), &wp);
    if (!wf) fail_msg("load: %s", kvm_errmsg());
    kvm_run_params_t p = kvm_run_default_params();
    p.inputs_json = inputs ? inputs : "{\"docs\": \"the xdog: 4312. the dogcat: 7781.\", \"q\": \"the xdog\"}";
    kvm_run_t *r = kvm_run_start(wf, &p);
    if (!r) fail_msg("run: %s", kvm_errmsg());
    while (kvm_runtime_step(rt) > 0) {
    }
    const char *msg = NULL;
    const int rc = kvm_run_status(r, &msg);
    if (rc && !s->err[0]) snprintf(s->err, sizeof s->err, "%s", msg ? msg : "");
    kvm_workflow_free(wf);
    kvm_runtime_free(rt);
    return rc;
}

/* kv_from with a `longest` fuser: (1) on the bundled pair (one tokenizer) it fuses the same rows as the identity fuser
 * of the same weights and answers the same; (2) between different tokenizers (receiver minillama-2m with V1, sharer
 * miniqwen3-6m) it runs: the section's rows fused, the rest the receiver's; (3) where the sharer's own rendering
 * before the section is longer than the receiver's (receiver pads, spec §4), the step fails naming the rule. */
static void test_kv_from_runs_aligned_mode(void **st) {
    (void)st;
    const char *mr = KVM_SOURCE_DIR "/models/minillama-2m", *ms = KVM_SOURCE_DIR "/models/miniqwen3-6m";
    char rv1[600], sv1[600], fid[700], flg[700], fx[700], fy[700];
    v1_dir("minillama-2m", rv1, sizeof rv1);
    v1_dir("miniqwen3-6m", sv1, sizeof sv1);
    kvm_model_t *R = load_dir(mr), *S = load_dir(ms), *R1 = load_dir(rv1), *S1 = load_dir(sv1);
    snprintf(fid, sizeof fid, "%s/kvf-id.c2c.json", g_dir);
    snprintf(flg, sizeof flg, "%s/kvf-lg.c2c.json", g_dir);
    snprintf(fx, sizeof fx, "%s/kvf-x.c2c.json", g_dir);
    snprintf(fy, sizeof fy, "%s/kvf-y.c2c.json", g_dir);
    kvm_c2c_init_opts_t oi = {.seed = 5, .hidden = 16}, ol = {.seed = 5, .hidden = 16, .token_alignment = "longest"};
    assert_int_equal(kvm_c2c_write_untrained(fid, R, S, &oi), 0);
    assert_int_equal(kvm_c2c_write_untrained(flg, R, S, &ol), 0);
    assert_int_equal(kvm_c2c_write_untrained(fx, R1, S, &ol), 0);
    assert_int_equal(kvm_c2c_write_untrained(fy, R, S1, &ol), 0);
    kvm_model_free(R), kvm_model_free(S), kvm_model_free(R1), kvm_model_free(S1);

    kvf_seen_t a, b, c, d;
    if (kvf_run(mr, ms, fid, NULL, &a)) fail_msg("identity: %s", a.err);
    if (kvf_run(mr, ms, flg, NULL, &b)) fail_msg("longest: %s", b.err);
    fprintf(stderr, "kv_from, one tokenizer: identity '%s' (%d fused of %d), longest '%s' (%d fused of %d)\n", a.text,
            a.fused, a.tokens_in, b.text, b.fused, b.tokens_in);
    assert_int_equal(a.steps, 1), assert_int_equal(b.steps, 1);
    assert_string_equal(b.mode, "c2c");
    assert_true(a.fused > 5);
    assert_int_equal(b.fused, a.fused);
    assert_int_equal(b.tokens_in, a.tokens_in);
    assert_int_equal(b.fused + b.recomputed, b.tokens_in);
    assert_string_equal(b.text, a.text);

    if (kvf_run(rv1, ms, fx, NULL, &c)) fail_msg("V1 receiver: %s", c.err);
    fprintf(stderr, "kv_from, two tokenizers: '%s' (%d fused of %d)\n", c.text, c.fused, c.tokens_in);
    assert_string_equal(c.mode, "c2c");
    assert_true(c.fused > 5);
    assert_int_equal(c.fused + c.recomputed, c.tokens_in);
    assert_true(c.text[0] != 0);

    assert_int_not_equal(kvf_run(mr, sv1, fy, NULL, &d), 0);
    fprintf(stderr, "kv_from, receiver pads: %s\n", d.err);
    assert_non_null(strstr(d.err, "spec §4"));
    assert_non_null(strstr(d.err, "is a pad"));

    /* hostile content: the byte the sharer's rendering cuts at, in the other placeholder and in the section itself */
    const char *bad[2] = {"{\"docs\": \"the xdog: 4312.\", \"q\": \"the \\u001exdog\"}",
                          "{\"docs\": \"the \\u001exdog: 4312.\", \"q\": \"the xdog\"}"};
    assert_int_not_equal(kvf_run(mr, ms, flg, bad[0], &d), 0);
    assert_non_null(strstr(d.err, "0x1E"));
    if (kvf_run(mr, ms, flg, bad[1], &d)) fail_msg("0x1E inside the section (its content is not rendered): %s", d.err);
    assert_string_equal(d.mode, "c2c");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_the_variants_differ),
        cmocka_unit_test(test_message_tokens_map_by_re_encoding),
        cmocka_unit_test(test_special_tokens_map_by_role_then_string),
        cmocka_unit_test(test_a_conversation_aligns_with_sharer_pads),
        cmocka_unit_test(test_a_shorter_receiver_gets_pads),
        cmocka_unit_test(test_section_mismatches_are_refused),
        cmocka_unit_test(test_the_aligned_prefill_fuses_exactly_the_message_rows),
        cmocka_unit_test(test_kv_from_runs_aligned_mode),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
