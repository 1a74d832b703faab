/* minitasks.c - deterministic generator and scorer of the minitasks suite (see minitasks.h and
 * docs/minitasks.md). Only libc and, through include/kvmesh_lab.h, the status module and the core PRNG:
 * scripts/train builds a standalone generator from these files for the GPU machine. */
#include "minitasks.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include <kvmesh_lab.h>

/* ======================================== PRNG ============================================== */

/* The core PRNG (runtime/core/rng.h) is the generator this file was written with; only the seeding
 * from five words is ours (stream tags, below, keep the task, role and content draws independent). */
static void mt_rng_init(kvm_rng_t *r, uint64_t a, uint64_t b, uint64_t c, uint64_t d, uint64_t e) {
    const uint64_t w[5] = {a, b, c, d, e};
    kvm_rng_seed_words(r, w, 5);
}

/* ===================================== vocabulary =========================================== */

static const char *const mt_names[] = {
    "Tom",  "Ben",  "Sam",  "Max",  "Leo",  "Jack", "Tim",  "Dan",  "Ned",  "Joe",  "Ray",  "Ted",  "Bob",
    "Jim",  "Ron",  "Kim",  "Ann",  "Amy",  "Eve",  "Zoe",  "Mia",  "Lily", "Lucy", "Emma", "Rose", "Kate",
    "Jane", "Sue",  "May",  "Ivy",  "Ada",  "Nina", "Omar", "Hugo", "Ivan", "Carl", "Paul", "Mark", "Owen",
    "Finn", "Luke", "Adam", "Noah", "Ella", "Anna", "Sara", "Lena", "Nora", "Ruth", "Iris", "Jade", "Cleo",
    "Ezra", "Levi", "Milo", "Otto", "Seth", "Theo", "Vera", "Wade", "Yara", "Zack", "Gus",  "Hal"};
#define MT_N_NAMES ((int)(sizeof mt_names / sizeof mt_names[0]))

/* 16 words with distinct first letters a..p, so alphabetical order is the order of first letters. */
static const char *const mt_words[] = {"ant", "bee", "cat", "dog", "egg", "fox", "gum", "hat",
                                       "ink", "jam", "kit", "log", "mud", "net", "owl", "pig"};
#define MT_N_WORDS 16

static const char *const mt_objects[] = {"ball", "kite", "hat", "box", "cake", "book", "boat", "bell", "cup", "drum"};
static const char *const mt_colors[] = {"red", "blue", "green", "big", "small", "little", "yellow", "pink"};
static const char *const mt_places[] = {"park", "garden", "forest", "beach", "house", "school", "river", "hill"};
static const char *const mt_animals[] = {"dog", "cat", "bird", "frog", "fish", "duck", "bunny", "bear"};
static const char *const mt_feelings[] = {"happy", "sad", "excited", "scared", "proud", "sleepy"};
#define MT_PICK(r, arr) (arr[kvm_rng_below((r), sizeof arr / sizeof arr[0])])

/* ======================================= roles ============================================== */

typedef struct mt_role {
    const char *name;
    const char *system;
} mt_role_t;

static const mt_role_t mt_roles[KVM_MT_N_TASKS][KVM_MT_MAX_ROLES] = {
    [KVM_MT_RECALL] = {{"value", "Answer with the number."},
                       {"reverse", "Answer with the number, digits reversed."}},
    [KVM_MT_ARITH] = {{"result", "Answer with the result."},
                      {"reverse", "Answer with the result, digits reversed."}},
    [KVM_MT_TRANSFORM] = {{"reverse", "Reverse the list."}, {"sort", "Sort the list."}, {"count", "Count the items."}},
    [KVM_MT_STORY] = {{"teller", "You tell short stories."}},
    [KVM_MT_TEAM] = {{"finder", "You are the finder. Answer with the number of the asked name."},
                     {"checker", "You are the checker. Say yes if the finder is right, else no."},
                     {"reverser", "You are the reverser. Reverse the digits of the finder's answer."},
                     {"neighbour", "You are the neighbour. Answer with the name after the asked name."}},
};

static const char *const mt_task_names[KVM_MT_N_TASKS] = {"recall", "arithmetic", "transform", "story", "team"};

const char *kvm_mt_task_name(int task) {
    return (task >= 0 && task < KVM_MT_N_TASKS) ? mt_task_names[task] : "?";
}

int kvm_mt_task_from_name(const char *name) {
    if (!name) return -1;
    if (!strcmp(name, "arith")) return KVM_MT_ARITH;
    for (int t = 0; t < KVM_MT_N_TASKS; t++)
        if (!strcmp(name, mt_task_names[t])) return t;
    return -1;
}

int kvm_mt_n_roles(int task) {
    if (task < 0 || task >= KVM_MT_N_TASKS) return 0;
    int n = 0;
    while (n < KVM_MT_MAX_ROLES && mt_roles[task][n].name) n++;
    return n;
}

const char *kvm_mt_role_name(int task, int role) {
    return (role >= 0 && role < kvm_mt_n_roles(task)) ? mt_roles[task][role].name : NULL;
}

const char *kvm_mt_role_system(int task, int role) {
    return (role >= 0 && role < kvm_mt_n_roles(task)) ? mt_roles[task][role].system : NULL;
}

int kvm_mt_role_from_name(int task, const char *name) {
    if (!name) return -1;
    for (int r = 0; r < kvm_mt_n_roles(task); r++)
        if (!strcmp(name, mt_roles[task][r].name)) return r;
    return -1;
}

/* =================================== text building ========================================== */

typedef struct mt_buf {
    char *p;
    size_t cap, len;
    bool overflow;
} mt_buf_t;

static void mt_buf_init(mt_buf_t *b, char *p, size_t cap) {
    b->p = p;
    b->cap = cap;
    b->len = 0;
    b->overflow = false;
    p[0] = 0;
}

static void mt_addf(mt_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void mt_addf(mt_buf_t *b, const char *fmt, ...) {
    if (b->overflow) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= b->cap - b->len) {
        b->overflow = true;
        b->p[b->cap - 1] = 0;
        return;
    }
    b->len += (size_t)n;
}

void kvm_mt_reverse_str(const char *s, char *out, size_t cap) {
    size_t n = strlen(s);
    if (cap == 0) return;
    if (n >= cap) n = cap - 1;
    for (size_t i = 0; i < n; i++) out[i] = s[n - 1 - i];
    out[n] = 0;
}

static bool mt_is_palindrome(const char *s) {
    size_t n = strlen(s);
    for (size_t i = 0; i < n / 2; i++)
        if (s[i] != s[n - 1 - i]) return false;
    return true;
}

/* A 4-digit value 1000..9999 whose digit string is not a palindrome (so "value" and "reversed"
 * answers always differ). */
static int mt_value4(kvm_rng_t *r) {
    for (;;) {
        int v = kvm_rng_range(r, 1000, 9999);
        char s[8];
        snprintf(s, sizeof s, "%d", v);
        if (!mt_is_palindrome(s)) return v;
    }
}

/* Picks k distinct indices of [0, n) in random order (partial Fisher-Yates); k <= n <= 64. */
static void mt_pick_distinct(kvm_rng_t *r, int n, int k, int *out) {
    int pool[64];
    for (int i = 0; i < n; i++) pool[i] = i;
    for (int i = 0; i < k; i++) {
        int j = i + (int)kvm_rng_below(r, (uint64_t)(n - i));
        int t = pool[i];
        pool[i] = pool[j];
        pool[j] = t;
        out[i] = pool[i];
    }
}

/* ================================= task generators ========================================== *
 * Each fills `content` (the role-independent user text, hashed for the split partition) and then the
 * item's user text and answer for the requested role. They return false when the drawn content must
 * be rejected for reasons of their own (the caller draws again). */

typedef struct mt_facts {
    int n;
    int name[48];  /* index into mt_names */
    int value[48];
} mt_facts_t;

static void mt_draw_facts(kvm_rng_t *r, mt_facts_t *f, int lo, int hi) {
    f->n = kvm_rng_range(r, lo, hi);
    mt_pick_distinct(r, MT_N_NAMES, f->n, f->name);
    for (int i = 0; i < f->n; i++) f->value[i] = mt_value4(r);
}

static void mt_write_facts(mt_buf_t *b, const mt_facts_t *f) {
    for (int i = 0; i < f->n; i++) mt_addf(b, "%s%s: %d", i ? "\n" : "", mt_names[f->name[i]], f->value[i]);
}

static bool mt_gen_recall(kvm_rng_t *r, kvm_mt_item_t *it, mt_buf_t *content, int lo, int hi) {
    mt_facts_t f;
    mt_draw_facts(r, &f, lo ? lo : 8, hi ? hi : 48);
    int q = (int)kvm_rng_below(r, (uint64_t)f.n);
    mt_write_facts(content, &f);
    mt_addf(content, "\nAsk: %s", mt_names[f.name[q]]);
    snprintf(it->user, sizeof it->user, "%s", content->p);
    char v[16];
    snprintf(v, sizeof v, "%d", f.value[q]);
    if (it->role == 0) snprintf(it->answer, sizeof it->answer, "%s", v);
    else kvm_mt_reverse_str(v, it->answer, sizeof it->answer);
    return true;
}

/* 2-digit or 3-digit operand, equally likely. */
static int mt_operand(kvm_rng_t *r) { return kvm_rng_below(r, 2) ? kvm_rng_range(r, 100, 999) : kvm_rng_range(r, 10, 99); }

static bool mt_gen_arith(kvm_rng_t *r, kvm_mt_item_t *it, mt_buf_t *content) {
    int form = (int)kvm_rng_below(r, 4);
    int a = mt_operand(r), b = mt_operand(r), c = mt_operand(r), res;
    switch (form) {
    case 0: /* a + b */
        res = a + b;
        mt_addf(content, "Compute: %d + %d", a, b);
        break;
    case 1: /* a - b, a >= b */
        if (a < b) { int t = a; a = b; b = t; }
        res = a - b;
        mt_addf(content, "Compute: %d - %d", a, b);
        break;
    case 2: /* a + b - c, c <= a + b */
        if (c > a + b) return false;
        res = a + b - c;
        mt_addf(content, "Compute: %d + %d - %d", a, b, c);
        break;
    default: /* a - b + c, b <= a */
        if (a < b) { int t = a; a = b; b = t; }
        res = a - b + c;
        mt_addf(content, "Compute: %d - %d + %d", a, b, c);
        break;
    }
    char v[16];
    snprintf(v, sizeof v, "%d", res);
    /* The two roles must give different answers: reject palindromic results (single digits too). */
    if (mt_is_palindrome(v)) return false;
    snprintf(it->user, sizeof it->user, "%s", content->p);
    if (it->role == 0) snprintf(it->answer, sizeof it->answer, "%s", v);
    else kvm_mt_reverse_str(v, it->answer, sizeof it->answer);
    return true;
}

static int mt_cmp_int(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

static bool mt_gen_transform(kvm_rng_t *r, kvm_mt_item_t *it, mt_buf_t *content) {
    int n = kvm_rng_range(r, 3, 7);
    bool words = kvm_rng_below(r, 2);
    int v[8] = {0}, sorted[8];
    if (words) mt_pick_distinct(r, MT_N_WORDS, n, v);
    else
        for (int i = 0; i < n; i++) v[i] = (int)kvm_rng_below(r, 10);
    memcpy(sorted, v, sizeof v);
    qsort(sorted, (size_t)n, sizeof sorted[0], mt_cmp_int);
    /* reversed == sorted (a list in descending order, e.g. all equal digits) would make two roles agree */
    bool rev_is_sorted = true;
    for (int i = 0; i < n; i++)
        if (v[n - 1 - i] != sorted[i]) rev_is_sorted = false;
    if (rev_is_sorted) return false;
    mt_addf(content, "List:");
    for (int i = 0; i < n; i++) {
        if (words) mt_addf(content, " %s", mt_words[v[i]]);
        else mt_addf(content, " %d", v[i]);
    }
    snprintf(it->user, sizeof it->user, "%s", content->p);
    mt_buf_t a;
    mt_buf_init(&a, it->answer, sizeof it->answer);
    if (it->role == 2) {
        mt_addf(&a, "%d", n);
    } else {
        for (int i = 0; i < n; i++) {
            int x = it->role == 0 ? v[n - 1 - i] : sorted[i];
            if (words) mt_addf(&a, "%s%s", i ? " " : "", mt_words[x]);
            else mt_addf(&a, "%s%d", i ? " " : "", x);
        }
    }
    return true;
}

static bool mt_gen_story(kvm_rng_t *r, kvm_mt_item_t *it, mt_buf_t *content) {
    const char *h = mt_names[kvm_rng_below(r, MT_N_NAMES)];
    const char *col = MT_PICK(r, mt_colors), *obj = MT_PICK(r, mt_objects);
    const char *place = MT_PICK(r, mt_places), *animal = MT_PICK(r, mt_animals);
    const char *feel = MT_PICK(r, mt_feelings), *feel2 = MT_PICK(r, mt_feelings);
    mt_addf(content, "Tell a story about %s and a %s %s.", h, col, obj);
    snprintf(it->user, sizeof it->user, "%s", content->p);
    snprintf(it->key, sizeof it->key, "%s", h);
    mt_buf_t a;
    mt_buf_init(&a, it->answer, sizeof it->answer);
    mt_addf(&a, "Once upon a time, %s had a %s %s.", h, col, obj);
    if (kvm_rng_below(r, 2)) mt_addf(&a, " One day, %s went to the %s.", h, place);
    else mt_addf(&a, " %s took the %s to the %s.", h, obj, place);
    if (kvm_rng_below(r, 2)) mt_addf(&a, " At the %s, %s saw a %s.", place, h, animal);
    else mt_addf(&a, " There, a %s wanted to play with the %s.", animal, obj);
    switch (kvm_rng_below(r, 3)) {
    case 0: mt_addf(&a, " The %s was %s.", animal, feel); break;
    case 1: mt_addf(&a, " %s and the %s played all day.", h, animal); break;
    default: mt_addf(&a, " %s gave the %s to the %s.", h, obj, animal); break;
    }
    if (kvm_rng_below(r, 2)) mt_addf(&a, " %s felt %s.", h, feel2);
    mt_addf(&a, " In the end, %s went home with the %s.", h, obj);
    return true;
}

/* The team workload (docs/minitasks.md): facts + "Ask: <name>" shared by all four agents; the
 * checker, reverser and neighbour also read the finder's answer X, which in training is right half
 * of the time and otherwise another fact's value or the value with one digit changed. */
static bool mt_gen_team(kvm_rng_t *r, kvm_mt_item_t *it, mt_buf_t *content, int lo, int hi) {
    mt_facts_t f;
    mt_draw_facts(r, &f, lo ? lo : 8, hi ? hi : 32);
    int q = (int)kvm_rng_below(r, (uint64_t)(f.n - 1)); /* never the last fact: the neighbour needs one after */
    int x = f.value[q];
    if (kvm_rng_below(r, 2)) {
        if (kvm_rng_below(r, 2)) {
            int o = (int)kvm_rng_below(r, (uint64_t)(f.n - 1));
            x = f.value[o >= q ? o + 1 : o];
        } else {
            char s[8];
            snprintf(s, sizeof s, "%d", x);
            int pos = (int)kvm_rng_below(r, 4);
            int d = s[pos] - '0';
            int nd = (d + 1 + (int)kvm_rng_below(r, 9)) % 10; /* any other digit */
            if (pos == 0 && nd == 0) nd = d == 1 ? 2 : 1;
            s[pos] = (char)('0' + nd);
            x = atoi(s);
        }
    }
    char xs[8];
    snprintf(xs, sizeof xs, "%d", x);
    if (mt_is_palindrome(xs)) return false; /* the reverser's answer must differ from X */
    mt_write_facts(content, &f);
    mt_addf(content, "\nAsk: %s\nFinder: %s", mt_names[f.name[q]], xs);
    mt_buf_t u;
    mt_buf_init(&u, it->user, sizeof it->user);
    mt_write_facts(&u, &f);
    mt_addf(&u, "\nAsk: %s", mt_names[f.name[q]]);
    if (it->role != 0) mt_addf(&u, "\nFinder: %s", xs);
    switch (it->role) {
    case 0: snprintf(it->answer, sizeof it->answer, "%d", f.value[q]); break;
    case 1: snprintf(it->answer, sizeof it->answer, "%s", x == f.value[q] ? "yes" : "no"); break;
    case 2: kvm_mt_reverse_str(xs, it->answer, sizeof it->answer); break;
    default: snprintf(it->answer, sizeof it->answer, "%s", mt_names[f.name[q + 1]]); break;
    }
    return true;
}

/* ===================================== the item ============================================= */

/* training mixture in percent, by task id */
static const int mt_mix[KVM_MT_N_TASKS] = {30, 25, 15, 5, 25};

/* stream tags keep the draws of the task choice, the role choice and the content independent */
enum { MT_TAG_MIX = 0x6d6978, MT_TAG_ROLE = 0x726f6c65, MT_TAG_CONTENT = 0x636f6e74 };

int kvm_mt_make(kvm_mt_item_t *it, int task, int split, uint64_t seed, uint64_t index, int role) {
    return kvm_mt_make_ex(it, task, split, seed, index, role, NULL);
}

int kvm_mt_make_ex(kvm_mt_item_t *it, int task, int split, uint64_t seed, uint64_t index, int role,
                   const kvm_mt_opts_t *opts) {
    if (!it) return kvm_seterr(KVM_EINVAL, "minitasks: NULL item");
    int lo = opts ? opts->min_facts : 0, hi = opts ? opts->max_facts : 0;
    if ((lo || hi) && !(lo >= 2 && lo <= hi && hi <= 48))
        return kvm_seterr(KVM_EINVAL, "minitasks: fact range %d-%d is not within 2-48 (min <= max)", lo, hi);
    if (split != KVM_MT_TRAIN && split != KVM_MT_EVAL)
        return kvm_seterr(KVM_EINVAL, "minitasks: split %d is neither train (0) nor eval (1)", split);
    if (task >= KVM_MT_N_TASKS) return kvm_seterr(KVM_EINVAL, "minitasks: task %d out of range", task);
    kvm_rng_t r;
    if (task < 0) {
        mt_rng_init(&r, seed, (uint64_t)split, MT_TAG_MIX, index, 0);
        int p = (int)kvm_rng_below(&r, 100), t = 0;
        while (p >= mt_mix[t]) p -= mt_mix[t++];
        task = t;
    }
    int n_roles = kvm_mt_n_roles(task);
    if (role >= n_roles)
        return kvm_seterr(KVM_EINVAL, "minitasks: task '%s' has %d roles, role %d requested", kvm_mt_task_name(task),
                          n_roles, role);
    if (role < 0) {
        mt_rng_init(&r, seed, (uint64_t)split, MT_TAG_ROLE + (uint64_t)task, index, 0);
        role = (int)kvm_rng_below(&r, (uint64_t)n_roles);
    }
    memset(it, 0, sizeof *it);
    it->task = (kvm_mt_task_t)task;
    it->split = (kvm_mt_split_t)split;
    it->seed = seed;
    it->index = index;
    it->role = role;
    it->exact = task != KVM_MT_STORY;
    snprintf(it->system, sizeof it->system, "%s", mt_roles[task][role].system);
    char content[2048];
    for (uint64_t attempt = 0;; attempt++) {
        mt_buf_t cb;
        mt_buf_init(&cb, content, sizeof content);
        mt_rng_init(&r, seed, (uint64_t)split, MT_TAG_CONTENT + (uint64_t)task, index, attempt);
        it->answer[0] = it->user[0] = it->key[0] = 0;
        bool ok = false;
        switch (task) {
        case KVM_MT_RECALL: ok = mt_gen_recall(&r, it, &cb, lo, hi); break;
        case KVM_MT_ARITH: ok = mt_gen_arith(&r, it, &cb); break;
        case KVM_MT_TRANSFORM: ok = mt_gen_transform(&r, it, &cb); break;
        case KVM_MT_STORY: ok = mt_gen_story(&r, it, &cb); break;
        default: ok = mt_gen_team(&r, it, &cb, lo, hi); break;
        }
        if (!ok || cb.overflow) continue;
        /* content-hash partition: 1 in 8 contents is reserved for evaluation */
        uint64_t h = 0xcbf29ce484222325ULL;
        for (const char *s = content; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ULL;
        bool held_out = (h >> 32) % 8 == 0;
        if (held_out == (split == KVM_MT_EVAL)) break;
    }
    snprintf(it->id, sizeof it->id, "%s/%s/%llu/%llu/%s", kvm_mt_task_name(task), split ? "eval" : "train",
             (unsigned long long)seed, (unsigned long long)index, mt_roles[task][role].name);
    return 0;
}

int kvm_mt_render_chatml(const kvm_mt_item_t *it, bool with_answer, char *buf, size_t cap) {
    if (!buf || cap == 0) return kvm_seterr(KVM_ERANGE, "minitasks: no room to render the prompt");
    mt_buf_t b;
    mt_buf_init(&b, buf, cap);
    mt_addf(&b, "<|im_start|>system\n%s<|im_end|>\n<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n", it->system,
            it->user);
    if (with_answer) mt_addf(&b, "%s<|im_end|>\n", it->answer);
    if (b.overflow)
        return kvm_seterr(KVM_ERANGE, "minitasks: item %s does not fit a %zu-byte prompt buffer", it->id, cap);
    return (int)b.len;
}

bool kvm_mt_score(const kvm_mt_item_t *it, const char *output) {
    if (!output) return false;
    const char *s = output;
    while (*s && isspace((unsigned char)*s)) s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1])) n--;
    if (!it->exact) {
        if (n == 0) return false;
        char tmp[1024];
        if (n >= sizeof tmp) n = sizeof tmp - 1;
        memcpy(tmp, s, n);
        tmp[n] = 0;
        return strstr(tmp, it->key) != NULL;
    }
    return n == strlen(it->answer) && !memcmp(s, it->answer, n);
}

static int mt_json_str(FILE *f, const char *s) {
    if (fputc('"', f) == EOF) return -1;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        int rc;
        switch (c) {
        case '"': rc = fputs("\\\"", f); break;
        case '\\': rc = fputs("\\\\", f); break;
        case '\n': rc = fputs("\\n", f); break;
        case '\t': rc = fputs("\\t", f); break;
        case '\r': rc = fputs("\\r", f); break;
        default: rc = c < 0x20 ? fprintf(f, "\\u%04x", c) : fputc(c, f); break;
        }
        if (rc < 0) return -1;
    }
    return fputc('"', f) == EOF ? -1 : 0;
}

int kvm_mt_write_jsonl(FILE *f, const kvm_mt_item_t *it) {
    int rc = 0;
    rc |= fprintf(f, "{\"task\":") < 0;
    rc |= mt_json_str(f, kvm_mt_task_name(it->task)) < 0;
    rc |= fprintf(f, ",\"role\":") < 0;
    rc |= mt_json_str(f, kvm_mt_role_name(it->task, it->role)) < 0;
    rc |= fprintf(f, ",\"system\":") < 0;
    rc |= mt_json_str(f, it->system) < 0;
    rc |= fprintf(f, ",\"user\":") < 0;
    rc |= mt_json_str(f, it->user) < 0;
    rc |= fprintf(f, ",\"answer\":") < 0;
    rc |= mt_json_str(f, it->answer) < 0;
    rc |= fprintf(f, ",\"id\":") < 0;
    rc |= mt_json_str(f, it->id) < 0;
    rc |= fprintf(f, "}\n") < 0;
    return rc ? kvm_seterr(KVM_EIO, "minitasks: write failed") : 0;
}
