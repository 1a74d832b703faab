/* test_minitasks.c - the minitasks generator: deterministic, answers right by construction (re-derived
 * here from the item text), role variants that differ, held-out contents never in the train split. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "runtime/core/core.h"
#include "lab/minitasks.h"

/* FNV-1a of the JSONL of items [0, n) of (task, split, seed), random roles */
static uint64_t jsonl_hash(int task, int split, uint64_t seed, int n) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    kvm_mt_item_t it;
    for (int k = 0; k < n; k++) {
        assert_int_equal(kvm_mt_make(&it, task, split, seed, (uint64_t)k, -1), 0);
        assert_int_equal(kvm_mt_write_jsonl(f, &it), 0);
    }
    fclose(f);
    uint64_t h = kvm_hash64(buf, len, KVM_HASH_SEED);
    free(buf);
    return h;
}

static void test_same_seed_gives_the_same_bytes(void **st) {
    (void)st;
    assert_true(jsonl_hash(-1, KVM_MT_TRAIN, 7, 300) == jsonl_hash(-1, KVM_MT_TRAIN, 7, 300));
    assert_true(jsonl_hash(-1, KVM_MT_EVAL, 1000, 100) == jsonl_hash(-1, KVM_MT_EVAL, 1000, 100));
}

static void test_different_seeds_give_different_items(void **st) {
    (void)st;
    assert_true(jsonl_hash(-1, KVM_MT_TRAIN, 1, 50) != jsonl_hash(-1, KVM_MT_TRAIN, 2, 50));
    for (int t = 0; t < KVM_MT_N_TASKS; t++) assert_true(jsonl_hash(t, KVM_MT_EVAL, 1000, 20) != jsonl_hash(t, KVM_MT_EVAL, 1001, 20));
}

/* The bundled models were trained on exactly these bytes: any change to the generator must be a
 * deliberate one (update this hash, retrain, regenerate docs). The first item is spelled out too. */
static void test_generator_output_is_pinned(void **st) {
    (void)st;
    kvm_mt_item_t it;
    assert_int_equal(kvm_mt_make(&it, -1, KVM_MT_TRAIN, 1, 1, -1), 0);
    assert_string_equal(it.id, "transform/train/1/1/count");
    assert_string_equal(it.user, "List: 2 0 3 7 3 5");
    assert_string_equal(it.answer, "6");
    uint64_t h = jsonl_hash(-1, KVM_MT_TRAIN, 1, 2000);
    fprintf(stderr, "generator hash (seed 1, 2000 train items): %016llx\n", (unsigned long long)h);
    assert_true(h == 0x9b8707f8dc90ffd6ULL);
}

/* ---- re-deriving answers from the text ------------------------------------------------------- */

typedef struct facts {
    int n;
    char name[48][16];
    int value[48];
    char ask[64];
    int finder; /* -1 when absent */
} facts_t;

static void parse_facts(const char *user, facts_t *f) {
    memset(f, 0, sizeof *f);
    f->finder = -1;
    const char *p = user;
    while (*p) {
        const char *e = strchr(p, '\n');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        char line[64];
        assert_true(len < sizeof line);
        memcpy(line, p, len);
        line[len] = 0;
        char nm[16];
        int v;
        if (!strncmp(line, "Ask: ", 5)) snprintf(f->ask, sizeof f->ask, "%s", line + 5);
        else if (sscanf(line, "Finder: %d", &v) == 1) f->finder = v;
        else {
            assert_int_equal(sscanf(line, "%15[A-Za-z]: %d", nm, &v), 2);
            assert_true(v >= 1000 && v <= 9999);
            assert_true(f->n < 48);
            snprintf(f->name[f->n], sizeof f->name[0], "%s", nm);
            f->value[f->n++] = v;
        }
        p += len + (e ? 1 : 0);
    }
    for (int i = 0; i < f->n; i++)
        for (int j = i + 1; j < f->n; j++) assert_string_not_equal(f->name[i], f->name[j]);
}

static int fact_index(const facts_t *f, const char *name) {
    for (int i = 0; i < f->n; i++)
        if (!strcmp(f->name[i], name)) return i;
    fail_msg("asked name %s is not among the facts", name);
    return -1;
}

static void expect_recall_facts(const kvm_mt_item_t *it, const facts_t *fp) {
    facts_t f = *fp;
    char v[16], rv[16];
    snprintf(v, sizeof v, "%d", f.value[fact_index(&f, f.ask)]);
    kvm_mt_reverse_str(v, rv, sizeof rv);
    assert_string_equal(it->answer, it->role == 0 ? v : rv);
}

static void expect_recall(const kvm_mt_item_t *it) {
    facts_t f;
    parse_facts(it->user, &f);
    assert_true(f.n >= 8 && f.n <= 48);
    expect_recall_facts(it, &f);
}

static void expect_arith(const kvm_mt_item_t *it) {
    int a, b, c;
    char o1, o2;
    int n = sscanf(it->user, "Compute: %d %c %d %c %d", &a, &o1, &b, &o2, &c);
    assert_true(n == 3 || n == 5);
    int ops[2] = {a, b};
    assert_true(ops[0] >= 10 && ops[0] <= 999 && ops[1] >= 10 && ops[1] <= 999);
    int res = o1 == '+' ? a + b : a - b;
    if (n == 5) res = o2 == '+' ? res + c : res - c;
    assert_true(res >= 0);
    char v[16], rv[16];
    snprintf(v, sizeof v, "%d", res);
    kvm_mt_reverse_str(v, rv, sizeof rv);
    assert_string_equal(it->answer, it->role == 0 ? v : rv);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void expect_transform(const kvm_mt_item_t *it) {
    assert_int_equal(strncmp(it->user, "List: ", 6), 0);
    char buf[256];
    snprintf(buf, sizeof buf, "%s", it->user + 6);
    char *tok[16];
    int n = 0;
    for (char *s = strtok(buf, " "); s; s = strtok(NULL, " ")) tok[n++] = s;
    assert_true(n >= 3 && n <= 7);
    char want[256] = "";
    if (it->role == 2) {
        snprintf(want, sizeof want, "%d", n);
    } else {
        char *order[16];
        for (int i = 0; i < n; i++) order[i] = it->role == 0 ? tok[n - 1 - i] : tok[i];
        if (it->role == 1) qsort(order, (size_t)n, sizeof order[0], cmp_str);
        for (int i = 0; i < n; i++) {
            if (i) strcat(want, " ");
            strcat(want, order[i]);
        }
    }
    assert_string_equal(it->answer, want);
}

static void expect_team(const kvm_mt_item_t *it) {
    facts_t f;
    parse_facts(it->user, &f);
    int q = fact_index(&f, f.ask);
    assert_true(q + 1 < f.n);
    assert_true(it->role == 0 ? f.finder < 0 : f.finder >= 1000);
    char v[16], rv[16];
    switch (it->role) {
    case 0: snprintf(v, sizeof v, "%d", f.value[q]); assert_string_equal(it->answer, v); break;
    case 1: assert_string_equal(it->answer, f.finder == f.value[q] ? "yes" : "no"); break;
    case 2:
        snprintf(v, sizeof v, "%d", f.finder);
        kvm_mt_reverse_str(v, rv, sizeof rv);
        assert_string_equal(it->answer, rv);
        break;
    default: assert_string_equal(it->answer, f.name[q + 1]); break;
    }
}

static void test_answers_are_right_by_construction(void **st) {
    (void)st;
    kvm_mt_item_t it;
    for (int split = 0; split < 2; split++)
        for (int t = 0; t < KVM_MT_N_TASKS; t++)
            for (int k = 0; k < 300; k++)
                for (int r = 0; r < kvm_mt_n_roles(t); r++) {
                    assert_int_equal(kvm_mt_make(&it, t, split, 11 + (uint64_t)split * 1000, (uint64_t)k, r), 0);
                    assert_string_equal(it.system, kvm_mt_role_system(t, r));
                    switch (t) {
                    case KVM_MT_RECALL: expect_recall(&it); break;
                    case KVM_MT_ARITH: expect_arith(&it); break;
                    case KVM_MT_TRANSFORM: expect_transform(&it); break;
                    case KVM_MT_TEAM: expect_team(&it); break;
                    default:
                        assert_non_null(strstr(it.user, it.key));
                        assert_non_null(strstr(it.answer, it.key));
                        assert_true(kvm_mt_score(&it, it.answer));
                        break;
                    }
                }
}

static void test_roles_of_one_content_give_different_answers(void **st) {
    (void)st;
    kvm_mt_item_t a, b;
    for (int t = 0; t < KVM_MT_N_TASKS; t++) {
        int nr = kvm_mt_n_roles(t);
        for (int k = 0; k < 400; k++)
            for (int r1 = 0; r1 < nr; r1++)
                for (int r2 = r1 + 1; r2 < nr; r2++) {
                    assert_int_equal(kvm_mt_make(&a, t, KVM_MT_EVAL, 1000, (uint64_t)k, r1), 0);
                    assert_int_equal(kvm_mt_make(&b, t, KVM_MT_EVAL, 1000, (uint64_t)k, r2), 0);
                    assert_string_not_equal(a.system, b.system);
                    /* same content: the facts/list/expression are shared (team adds the finder line) */
                    size_t la = strlen(a.user), lb = strlen(b.user);
                    assert_int_equal(memcmp(a.user, b.user, la < lb ? la : lb), 0);
                    /* the checker's yes/no never equals a number, a name or a reversed number */
                    assert_string_not_equal(a.answer, b.answer);
                }
    }
}

static void test_held_out_contents_never_appear_in_training(void **st) {
    (void)st;
    /* arithmetic has the smallest content space: collisions would show there first */
    enum { N = 6000 };
    static uint64_t train[N];
    kvm_mt_item_t it;
    for (int k = 0; k < N; k++) {
        assert_int_equal(kvm_mt_make(&it, KVM_MT_ARITH, KVM_MT_TRAIN, 1, (uint64_t)k, 0), 0);
        train[k] = kvm_hash64(it.user, strlen(it.user), KVM_HASH_SEED);
    }
    int same_train = 0;
    for (int k = 0; k < 2000; k++) {
        assert_int_equal(kvm_mt_make(&it, KVM_MT_ARITH, KVM_MT_EVAL, 1000, (uint64_t)k, 0), 0);
        uint64_t h = kvm_hash64(it.user, strlen(it.user), KVM_HASH_SEED);
        for (int j = 0; j < N; j++) assert_true(h != train[j]);
        /* and the same seed in the other split gives other contents */
        kvm_mt_item_t o;
        assert_int_equal(kvm_mt_make(&o, KVM_MT_ARITH, KVM_MT_TRAIN, 1000, (uint64_t)k, 0), 0);
        same_train += !strcmp(o.user, it.user);
    }
    assert_int_equal(same_train, 0);
}

static void test_mixture_follows_the_documented_weights(void **st) {
    (void)st;
    int count[KVM_MT_N_TASKS] = {0};
    kvm_mt_item_t it;
    for (int k = 0; k < 10000; k++) {
        assert_int_equal(kvm_mt_make(&it, -1, KVM_MT_TRAIN, 3, (uint64_t)k, -1), 0);
        count[it.task]++;
    }
    static const int pct[KVM_MT_N_TASKS] = {30, 25, 15, 5, 25};
    for (int t = 0; t < KVM_MT_N_TASKS; t++) assert_true(abs(count[t] - pct[t] * 100) < 200);
}

static void test_prompts_render_as_chatml_and_fit(void **st) {
    (void)st;
    kvm_mt_item_t it;
    char buf[4096];
    size_t longest = 0;
    for (int k = 0; k < 2000; k++) {
        assert_int_equal(kvm_mt_make(&it, -1, KVM_MT_EVAL, 1000, (uint64_t)k, -1), 0);
        int n = kvm_mt_render_chatml(&it, true, buf, sizeof buf);
        assert_true(n > 0);
        if ((size_t)n > longest) longest = (size_t)n;
        assert_int_equal(strncmp(buf, "<|im_start|>system\n", 19), 0);
        assert_non_null(strstr(buf, "<|im_end|>\n<|im_start|>assistant\n"));
        assert_int_equal(strcmp(buf + n - 11, "<|im_end|>\n"), 0);
    }
    /* 48 facts of at most 12 bytes plus headers: well under the 4096-byte buffers */
    assert_true(longest < 900);
    assert_int_equal(kvm_mt_render_chatml(&it, true, buf, 16), KVM_ERANGE);
}

static void test_score_trims_whitespace_and_wants_the_exact_answer(void **st) {
    (void)st;
    kvm_mt_item_t it;
    assert_int_equal(kvm_mt_make(&it, KVM_MT_RECALL, KVM_MT_EVAL, 1000, 0, 0), 0);
    char padded[1024];
    snprintf(padded, sizeof padded, "  %s \n", it.answer);
    assert_true(kvm_mt_score(&it, it.answer));
    assert_true(kvm_mt_score(&it, padded));
    snprintf(padded, sizeof padded, "%s0", it.answer);
    assert_false(kvm_mt_score(&it, padded));
    assert_false(kvm_mt_score(&it, ""));
    assert_false(kvm_mt_score(&it, NULL));
}

static void test_bad_task_role_or_split_is_an_error(void **st) {
    (void)st;
    kvm_mt_item_t it;
    assert_int_equal(kvm_mt_make(&it, KVM_MT_N_TASKS, KVM_MT_TRAIN, 1, 0, 0), KVM_EINVAL);
    assert_int_equal(kvm_mt_make(&it, KVM_MT_RECALL, KVM_MT_TRAIN, 1, 0, 2), KVM_EINVAL);
    assert_non_null(strstr(kvm_errmsg(), "recall"));
    assert_int_equal(kvm_mt_make(&it, KVM_MT_RECALL, 5, 1, 0, 0), KVM_EINVAL);
    assert_int_equal(kvm_mt_task_from_name("nope"), -1);
    assert_int_equal(kvm_mt_task_from_name("arith"), KVM_MT_ARITH);
    assert_int_equal(kvm_mt_role_from_name(KVM_MT_TEAM, "neighbour"), 3);
    assert_null(kvm_mt_role_name(KVM_MT_STORY, 1));
}

static void test_fact_range_option_bounds_the_facts(void **st) {
    (void)st;
    kvm_mt_item_t it;
    kvm_mt_opts_t o = {.min_facts = 2, .max_facts = 4};
    for (int k = 0; k < 200; k++) {
        assert_int_equal(kvm_mt_make_ex(&it, k % 2 ? KVM_MT_TEAM : KVM_MT_RECALL, KVM_MT_TRAIN, 3, (uint64_t)k, -1, &o), 0);
        facts_t f;
        parse_facts(it.user, &f);
        assert_true(f.n >= 2 && f.n <= 4);
        if (it.task == KVM_MT_RECALL) expect_recall_facts(&it, &f);
    }
    kvm_mt_opts_t bad = {.min_facts = 1, .max_facts = 4};
    assert_int_equal(kvm_mt_make_ex(&it, KVM_MT_RECALL, KVM_MT_TRAIN, 3, 0, 0, &bad), KVM_EINVAL);
    bad = (kvm_mt_opts_t){.min_facts = 9, .max_facts = 49};
    assert_int_equal(kvm_mt_make_ex(&it, KVM_MT_RECALL, KVM_MT_TRAIN, 3, 0, 0, &bad), KVM_EINVAL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_same_seed_gives_the_same_bytes),
        cmocka_unit_test(test_different_seeds_give_different_items),
        cmocka_unit_test(test_generator_output_is_pinned),
        cmocka_unit_test(test_answers_are_right_by_construction),
        cmocka_unit_test(test_roles_of_one_content_give_different_answers),
        cmocka_unit_test(test_held_out_contents_never_appear_in_training),
        cmocka_unit_test(test_mixture_follows_the_documented_weights),
        cmocka_unit_test(test_prompts_render_as_chatml_and_fit),
        cmocka_unit_test(test_score_trims_whitespace_and_wants_the_exact_answer),
        cmocka_unit_test(test_bad_task_role_or_split_is_an_error),
        cmocka_unit_test(test_fact_range_option_bounds_the_facts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
