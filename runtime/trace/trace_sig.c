/* trace_sig.c - the deterministic signature of a failure (trace_sig.h; spec correct.md §3.1, §4.1). */
#include "trace_sig.h"

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../core/core.h"
#include "../core/map.h"
#include "../core/rng.h"
#include "../core/sb.h"

/* ---- small text helpers ------------------------------------------------------------------------------ */

uint64_t tsig_fnv1a(const void *p, size_t n) {
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ULL;
    return h;
}

/* Case-insensitive (ASCII) substring test. */
static bool ci_contains(const char *hay, const char *needle) {
    size_t m = strlen(needle);
    if (!m) return true;
    for (const char *p = hay; *p; p++) {
        size_t i = 0;
        while (i < m && p[i] && tolower((unsigned char)p[i]) == tolower((unsigned char)needle[i])) i++;
        if (i == m) return true;
    }
    return false;
}

void kvm_agent_normalize(const char *raw, char *out, size_t cap) {
    if (!cap) return;
    out[0] = '\0';
    if (!raw) return;
    size_t n = strlen(raw);
    /* \s*\(.*\)$ : from the first '(' when the label ends with ')' */
    if (n && raw[n - 1] == ')') {
        const char *open = strchr(raw, '(');
        if (open) n = (size_t)(open - raw);
    }
    size_t b = 0;
    while (b < n && isspace((unsigned char)raw[b])) b++;
    while (n > b && isspace((unsigned char)raw[n - 1])) n--;
    size_t k = 0;
    for (size_t i = b; i < n && k + 1 < cap; i++) out[k++] = (char)tolower((unsigned char)raw[i]);
    out[k] = '\0';
}

/* ---- keyword phrases (correct.md §3.1) --------------------------------------------------------------- */

enum { PH_FAB0 = 0, PH_END0 = 6, PH_VER0 = 9, PH_FAIL0 = 11, PH_HEDGE0 = 15, PH_N = 17 };
static const char *const phrases[PH_N] = {
    "assume", "simulate", "sample data", "for demonstration", "placeholder", "mock", /* FABRICATION */
    "TERMINATE", "TASK_COMPLETE", "Final Answer",                                  /* PREMATURE_END */
    "verified", "confirmed correct",                                               /* UNVERIFIED_CLAIM */
    "error", "traceback", "timeout", "exitcode: 1",                                /* TOOL_FAIL */
    "unable to access", "cannot",                                                  /* HEDGE */
};

int tsig_n_phrases(void) { return PH_N; }
const char *tsig_phrase(int i) { return i >= 0 && i < PH_N ? phrases[i] : NULL; }

uint64_t tsig_phrases_in(const char *content) {
    if (!content || !*content) return 0;
    size_t n = strlen(content);
    char stack[4096], *low = n < sizeof stack ? stack : kvm_malloc(n + 1);
    if (!low) { /* no memory: the slow way */
        uint64_t m = 0;
        for (int i = 0; i < PH_N; i++)
            if (ci_contains(content, phrases[i])) m |= 1ULL << i;
        return m;
    }
    for (size_t i = 0; i <= n; i++) low[i] = (char)tolower((unsigned char)content[i]);
    uint64_t m = 0;
    for (int i = 0; i < PH_N; i++) {
        char p[32];
        size_t k = 0;
        for (; phrases[i][k] && k + 1 < sizeof p; k++) p[k] = (char)tolower((unsigned char)phrases[i][k]);
        p[k] = '\0';
        if (strstr(low, p)) m |= 1ULL << i;
    }
    if (low != stack) kvm_free(low);
    return m;
}

static bool any_in(uint64_t m, int from, int to) {
    for (int i = from; i < to; i++)
        if (m & (1ULL << i)) return true;
    return false;
}

const char *tsig_flag_name(int bit) {
    static const char *const names[TSIG_N_FLAGS] = {"FABRICATION", "PREMATURE_END", "UNVERIFIED_CLAIM", "TOOL_FAIL",
                                                    "HEDGE", "REPEAT", "UNGROUNDED", "TERMINATES"};
    return bit >= 0 && bit < TSIG_N_FLAGS ? names[bit] : "?";
}

/* ---- error templates (Drain-style masking) ----------------------------------------------------------- */

static bool is_scheme_char(int c) { return isalnum(c) || c == '+' || c == '.' || c == '-'; }
static bool is_word(int c) { return isalnum(c) || c == '_'; }

/* URLs [A-Za-z][A-Za-z0-9+.-]*://[^\s'"]+ -> <URL> */
static void mask_urls(const char *s, kvm_sb_t *o) {
    size_t i = 0, n = strlen(s);
    while (i < n) {
        if (!isalpha((unsigned char)s[i])) {
            kvm_sb_putc(o, s[i++]);
            continue;
        }
        size_t j = i;
        while (j < n && is_scheme_char((unsigned char)s[j])) j++;
        if (!strncmp(s + j, "://", 3) && j + 3 < n && !isspace((unsigned char)s[j + 3]) && s[j + 3] != '\'' &&
            s[j + 3] != '"') {
            size_t e = j + 3;
            while (e < n && !isspace((unsigned char)s[e]) && s[e] != '\'' && s[e] != '"') e++;
            kvm_sb_puts(o, "<URL>");
            i = e;
        } else { /* a later start inside this run ends at the same j: no match either */
            kvm_sb_append(o, s + i, j - i);
            i = j;
        }
    }
}

/* '...' and "..." (no newline inside) -> <S> */
static void mask_quotes(const char *s, kvm_sb_t *o) {
    for (size_t i = 0; s[i];) {
        if (s[i] == '\'' || s[i] == '"') {
            const char *e = s + i + 1;
            while (*e && *e != s[i] && *e != '\n') e++;
            if (*e == s[i]) {
                kvm_sb_puts(o, "<S>");
                i = (size_t)(e - s) + 1;
                continue;
            }
        }
        kvm_sb_putc(o, s[i++]);
    }
}

static bool is_strip(int c) { return c == ',' || c == ';' || c == '(' || c == ')' || c == '[' || c == ']'; }

/* whitespace-delimited tokens that (stripped of ,;()[]) start with / ./ ../ ~/ or X:\ -> <PATH> */
static void mask_paths(const char *s, kvm_sb_t *o) {
    for (size_t i = 0; s[i];) {
        if (isspace((unsigned char)s[i])) {
            kvm_sb_putc(o, s[i++]);
            continue;
        }
        size_t e = i;
        while (s[e] && !isspace((unsigned char)s[e])) e++;
        size_t b = i, f = e;
        while (b < f && is_strip((unsigned char)s[b])) b++;
        while (f > b && is_strip((unsigned char)s[f - 1])) f--;
        const char *t = s + b;
        size_t len = f - b;
        bool path = len > 0 && (t[0] == '/' || (len > 1 && !strncmp(t, "./", 2)) || (len > 2 && !strncmp(t, "../", 3)) ||
                                (len > 1 && !strncmp(t, "~/", 2)) ||
                                (len > 2 && isalpha((unsigned char)t[0]) && t[1] == ':' && t[2] == '\\'));
        if (path) {
            kvm_sb_append(o, s + i, b - i);
            kvm_sb_puts(o, "<PATH>");
            kvm_sb_append(o, s + f, e - f);
        } else kvm_sb_append(o, s + i, e - i);
        i = e;
    }
}

/* 0x[0-9A-Fa-f]+ and bare tokens of >= 8 hex digits with a digit and a letter -> <HEX> */
static void mask_hex(const char *s, kvm_sb_t *o) {
    for (size_t i = 0; s[i];) {
        if (s[i] == '0' && (s[i + 1] == 'x' || s[i + 1] == 'X') && isxdigit((unsigned char)s[i + 2])) {
            size_t e = i + 2;
            while (isxdigit((unsigned char)s[e])) e++;
            kvm_sb_puts(o, "<HEX>");
            i = e;
            continue;
        }
        if (isxdigit((unsigned char)s[i]) && (i == 0 || !is_word((unsigned char)s[i - 1]))) {
            size_t e = i;
            bool digit = false, letter = false;
            while (isxdigit((unsigned char)s[e])) {
                if (isdigit((unsigned char)s[e])) digit = true;
                else letter = true;
                e++;
            }
            if (e - i >= 8 && digit && letter && !is_word((unsigned char)s[e])) {
                kvm_sb_puts(o, "<HEX>");
                i = e;
                continue;
            }
        }
        kvm_sb_putc(o, s[i++]);
    }
}

/* [0-9]+(\.[0-9]+)? -> <N>, then whitespace runs -> one space, trimmed */
static void mask_numbers_ws(const char *s, kvm_sb_t *o) {
    bool space = false;
    for (size_t i = 0; s[i];) {
        if (isdigit((unsigned char)s[i])) {
            while (isdigit((unsigned char)s[i])) i++;
            if (s[i] == '.' && isdigit((unsigned char)s[i + 1])) {
                i++;
                while (isdigit((unsigned char)s[i])) i++;
            }
            if (space && o->len) kvm_sb_putc(o, ' ');
            space = false;
            kvm_sb_puts(o, "<N>");
            continue;
        }
        if (isspace((unsigned char)s[i])) {
            space = true;
            i++;
            continue;
        }
        if (space && o->len) kvm_sb_putc(o, ' ');
        space = false;
        kvm_sb_putc(o, s[i++]);
    }
}

char *tsig_mask_line(const char *line, size_t len) {
    char *cur = kvm_strndup(line, len);
    void (*const pass[])(const char *, kvm_sb_t *) = {mask_urls, mask_quotes, mask_paths, mask_hex, mask_numbers_ws};
    for (size_t p = 0; cur && p < sizeof pass / sizeof *pass; p++) {
        kvm_sb_t o = KVM_SB_INIT;
        if (kvm_sb_reserve(&o, strlen(cur) + 1)) {
            kvm_free(cur);
            return NULL;
        }
        pass[p](cur, &o);
        kvm_free(cur);
        cur = kvm_sb_take(&o, NULL);
        if (!cur) cur = kvm_strdup(""); /* an empty result */
    }
    return cur;
}

/* [b, e) of the first (first = true) or last non-empty line of s[0..n). */
static bool nonempty_line(const char *s, size_t n, bool first, size_t *b, size_t *e) {
    bool found = false;
    for (size_t i = 0; i < n;) {
        size_t j = i;
        while (j < n && s[j] != '\n') j++;
        size_t x = i;
        while (x < j && isspace((unsigned char)s[x])) x++;
        if (x < j) {
            *b = i, *e = j, found = true;
            if (first) return true;
        }
        i = j + 1;
    }
    return found;
}

char *tsig_error_template(const char *content, bool error) {
    if (!content) content = "";
    const char *tb = strstr(content, "Traceback (most recent call last):");
    size_t n = strlen(content), b = 0, e = 0;
    bool exitcode = false;
    if (!tb && nonempty_line(content, n, true, &b, &e)) {
        for (size_t i = b; i + 10 <= e; i++)
            if (!strncmp(content + i, "exitcode: ", 10) && i + 10 < e && content[i + 10] >= '1' && content[i + 10] <= '9') {
                exitcode = true;
                break;
            }
    }
    if (!error && !tb && !exitcode) return NULL;
    bool ok = tb ? nonempty_line(tb, n - (size_t)(tb - content), false, &b, &e) : nonempty_line(content, n, true, &b, &e);
    if (tb) b += (size_t)(tb - content), e += (size_t)(tb - content);
    if (!ok) return kvm_strdup("");
    return tsig_mask_line(content + b, e - b);
}

/* ---- MinHash ------------------------------------------------------------------------------------------ */

#define MERSENNE61 ((1ULL << 61) - 1)

void tsig_minhash_fns_default(tsig_minhash_fns_t *fns) {
    uint64_t st = 0x6b766d6573680001ULL; /* "kvmesh" + 1: fixed forever (the snapshot stores the pairs anyway) */
    for (int i = 0; i < TSIG_MINHASH; i++) {
        do fns->a[i] = kvm_splitmix64_next(&st) % MERSENNE61;
        while (fns->a[i] == 0);
        fns->b[i] = kvm_splitmix64_next(&st) % MERSENNE61;
    }
}

static uint64_t mod61(unsigned __int128 v) {
    uint64_t lo = (uint64_t)(v & MERSENNE61), hi = (uint64_t)(v >> 61);
    uint64_t r = lo + (hi & MERSENNE61) + (uint64_t)(hi >> 61); /* hi < 2^67 >> 61 tiny */
    while (r >= MERSENNE61) r -= MERSENNE61;
    return r;
}

static void minhash_add(uint64_t *mins, const tsig_minhash_fns_t *fns, const char *sh, size_t n) {
    uint64_t x = tsig_fnv1a(sh, n) % MERSENNE61;
    for (int i = 0; i < TSIG_MINHASH; i++) {
        uint64_t h = mod61((unsigned __int128)fns->a[i] * x + fns->b[i]);
        if (h < mins[i]) mins[i] = h;
    }
}

/* ---- building ------------------------------------------------------------------------------------------ */

void tsig_free(tsig_t *s) {
    if (!s) return;
    for (int i = 0; s->tmpl && i < s->n_steps; i++) kvm_free(s->tmpl[i]);
    for (int i = 0; s->terms && i < s->n_terms; i++) kvm_free(s->terms[i].s);
    kvm_free(s->agent);
    kvm_free(s->flags);
    kvm_free(s->tmpl);
    kvm_free(s->tmpl_hash);
    kvm_free(s->tool);
    kvm_free(s->error);
    kvm_free(s->phrases);
    kvm_free(s->terms);
    kvm_free(s->feats);
    memset(s, 0, sizeof *s);
}

static bool is_user(const char *agent) { return !strcmp(agent, "human") || !strcmp(agent, "user"); }

/* Appends s (commas removed) to the grounding text. */
static int seen_add(kvm_sb_t *seen, const char *s) {
    for (; s && *s; s++)
        if (*s != ',' && kvm_sb_putc(seen, *s)) return KVM_ENOMEM;
    return kvm_sb_putc(seen, '\n');
}

/* A number of >= 2 digits or a "quoted" string of 3..80 characters of content absent from seen. */
static bool ungrounded(const char *content, const char *seen) {
    char buf[96];
    for (const char *p = content; *p; p++) {
        if (isdigit((unsigned char)*p) && (p == content || !isdigit((unsigned char)p[-1]))) {
            size_t k = 0, digits = 0;
            const char *q = p;
            while ((isdigit((unsigned char)*q) || *q == ',') && k + 1 < sizeof buf) {
                if (*q != ',') buf[k++] = *q, digits++;
                q++;
            }
            if (*q == '.' && isdigit((unsigned char)q[1])) {
                buf[k++] = *q++;
                while (isdigit((unsigned char)*q) && k + 1 < sizeof buf) buf[k++] = *q++, digits++;
            }
            buf[k] = '\0';
            if (digits >= 2 && !strstr(seen, buf)) return true;
            p = q - 1;
        } else if (*p == '"') {
            const char *e = strchr(p + 1, '"');
            if (!e) break;
            size_t len = (size_t)(e - p - 1);
            if (len >= 3 && len <= 80) {
                size_t k = 0;
                for (const char *x = p + 1; x < e; x++)
                    if (*x != ',') buf[k++] = *x;
                buf[k] = '\0';
                if (k && !strstr(seen, buf)) return true;
            }
            p = e;
        }
    }
    return false;
}

/* Key text tokens: runs of [a-z0-9_] after ASCII lower-casing, each digit run as one '0'. Calls fn per token. */
typedef struct tok_state {
    kvm_map_t counts;     /* token -> count */
    char prev[2][128];    /* the two previous tokens, for shingles */
    int n_prev;
    uint64_t mins[TSIG_MINHASH];
    const tsig_minhash_fns_t *fns;
    int n_tokens;
    int rc;
} tok_state_t;

static void tok_emit(tok_state_t *t, const char *tok, size_t n) {
    kvm_mapval_t v = {0};
    bool had = kvm_map_get(&t->counts, tok, n, &v);
    if (kvm_map_put(&t->counts, tok, n, KVM_MAPVAL_U64(had ? v.u64 + 1 : 1))) t->rc = KVM_ENOMEM;
    if (t->n_prev == 2) { /* the shingle "prev0 prev1 tok" */
        char sh[3 * 128 + 2];
        size_t a = strlen(t->prev[0]), b = strlen(t->prev[1]);
        memcpy(sh, t->prev[0], a);
        sh[a] = ' ';
        memcpy(sh + a + 1, t->prev[1], b);
        sh[a + 1 + b] = ' ';
        memcpy(sh + a + b + 2, tok, n);
        minhash_add(t->mins, t->fns, sh, a + b + 2 + n);
        memcpy(t->prev[0], t->prev[1], b + 1);
        memcpy(t->prev[1], tok, n);
        t->prev[1][n] = '\0';
    } else {
        memcpy(t->prev[t->n_prev], tok, n);
        t->prev[t->n_prev++][n] = '\0';
    }
    t->n_tokens++;
}

static void tokenize(tok_state_t *t, const char *s) {
    char tok[128];
    size_t k = 0;
    bool in_digits = false;
    for (const char *p = s;; p++) {
        int c = (unsigned char)*p;
        if (c >= 'A' && c <= 'Z') c += 'a' - 'A';
        bool w = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
        if (w) {
            bool d = c >= '0' && c <= '9';
            if (d && in_digits) continue;
            in_digits = d;
            if (k + 1 < sizeof tok) tok[k++] = d ? '0' : (char)c;
            continue;
        }
        if (k) tok_emit(t, tok, k); /* tokens longer than 127 bytes are cut (they still count once) */
        k = 0;
        in_digits = false;
        if (!*p) break;
    }
}

static int term_cmp(const void *a, const void *b) {
    const tsig_term_t *x = a, *y = b;
    if (x->n != y->n) return x->n > y->n ? -1 : 1;
    return strcmp(x->s, y->s);
}

static int feat_cmp(const void *a, const void *b) {
    const tsig_feat_t *x = a, *y = b;
    return x->key < y->key ? -1 : x->key > y->key;
}

static int feat_add(kvm_map_t *m, const char *ns, const char *a, const char *b) {
    char buf[512];
    int n = snprintf(buf, sizeof buf, "%s\x1f%s\x1f%s", ns, a, b ? b : "");
    uint64_t key = tsig_fnv1a(buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
    if (!key) key = 1;
    kvm_mapval_t v = {0};
    bool had = kvm_map_get_u64(m, key, &v);
    return kvm_map_put_u64(m, key, KVM_MAPVAL_U64(had ? v.u64 + 1 : 1));
}

double tsig_feat_cosine(const tsig_feat_t *a, int na, double norm_a, const tsig_feat_t *b, int nb, double norm_b) {
    if (norm_a <= 0 || norm_b <= 0) return 0;
    double dot = 0;
    for (int i = 0, j = 0; i < na && j < nb;) {
        if (a[i].key == b[j].key) dot += (double)a[i++].n * b[j++].n;
        else if (a[i].key < b[j].key) i++;
        else j++;
    }
    return dot / (norm_a * norm_b);
}

static const char *op_name(const tsig_t *s, int t) { return is_user(s->agent[t]) ? "task" : s->tool[t] ? "tool" : "chat"; }

static int build_steps(const kvm_failure_t *f, tsig_t *s) {
    kvm_sb_t seen = KVM_SB_INIT;
    int rc = seen_add(&seen, f->question);
    bool tool_before = false;
    uint64_t *chash = kvm_calloc((size_t)f->n_steps + 1, sizeof *chash);
    if (!chash) rc = KVM_ENOMEM;
    for (int t = 0; !rc && t < f->n_steps; t++) {
        const kvm_failure_step_t *st = &f->steps[t];
        const char *c = st->content ? st->content : "";
        kvm_agent_normalize(st->agent, s->agent[t], TSIG_AGENT);
        s->tool[t] = st->tool_result;
        uint64_t ph = tsig_phrases_in(c);
        s->phrases[t] = ph;
        unsigned fl = 0;
        if (any_in(ph, PH_FAB0, PH_END0)) fl |= TSIG_FABRICATION;
        if (any_in(ph, PH_END0, PH_VER0)) fl |= TSIG_TERMINATES | (tool_before ? 0 : TSIG_PREMATURE_END);
        if (any_in(ph, PH_VER0, PH_FAIL0) && !tool_before) fl |= TSIG_UNVERIFIED_CLAIM;
        if (any_in(ph, PH_FAIL0, PH_HEDGE0)) fl |= TSIG_TOOL_FAIL;
        if (any_in(ph, PH_HEDGE0, PH_N)) fl |= TSIG_HEDGE;
        if (*c) {
            chash[t] = tsig_fnv1a(c, strlen(c)) | 1;
            for (int u = t - 1; u >= 0 && u >= t - 6; u--)
                if (chash[u] == chash[t]) fl |= TSIG_REPEAT;
        }
        if (!st->tool_result && !is_user(s->agent[t]) && ungrounded(c, seen.s ? seen.s : "")) fl |= TSIG_UNGROUNDED;
        s->flags[t] = fl;
        s->tmpl[t] = tsig_error_template(c, st->error);
        if (s->tmpl[t]) s->tmpl_hash[t] = tsig_fnv1a(s->tmpl[t], strlen(s->tmpl[t])) | 1;
        s->error[t] = st->error || s->tmpl[t];
        if (st->tool_result) tool_before = true;
        rc = seen_add(&seen, c);
    }
    kvm_free(chash);
    kvm_sb_free(&seen);
    return rc;
}

static int build_keys(const kvm_failure_t *f, const tsig_minhash_fns_t *fns, int max_terms, tsig_t *s) {
    tok_state_t t = {.fns = fns};
    kvm_map_init(&t.counts, KVM_MAP_STR);
    for (int i = 0; i < TSIG_MINHASH; i++) t.mins[i] = UINT64_MAX;
    /* the key text: "Question: <q>" then "<agent>: <content>" per step, raw agent labels */
    tokenize(&t, "Question:");
    tokenize(&t, f->question ? f->question : "");
    for (int i = 0; i < f->n_steps; i++) {
        tokenize(&t, f->steps[i].agent ? f->steps[i].agent : "");
        tokenize(&t, f->steps[i].content ? f->steps[i].content : "");
    }
    if (t.n_tokens > 0 && t.n_tokens < 3) { /* one shingle of all of them */
        char sh[3 * 128 + 2];
        int k = snprintf(sh, sizeof sh, "%s%s%s", t.prev[0], t.n_prev > 1 ? " " : "", t.n_prev > 1 ? t.prev[1] : "");
        minhash_add(t.mins, fns, sh, (size_t)k);
    }
    for (int i = 0; i < TSIG_MINHASH; i++) s->minhash[i] = t.mins[i] == UINT64_MAX ? 0xFFFFFFFFu : (uint32_t)t.mins[i];
    int rc = t.rc;
    size_t n = kvm_map_len(&t.counts);
    s->terms = n ? kvm_calloc(n, sizeof *s->terms) : NULL;
    if (n && !s->terms) rc = KVM_ENOMEM;
    int counters[64] = {0};
    for (size_t i = 0; !rc && i < t.counts.cap; i++) {
        const kvm_map_entry_t *e = &t.counts.slots[i];
        if (!e->hash) continue;
        tsig_term_t *term = &s->terms[s->n_terms++];
        term->n = (int)e->val.u64;
        if (!(term->s = kvm_strndup(e->key.str, e->klen))) rc = KVM_ENOMEM;
        uint64_t h = tsig_fnv1a(e->key.str, e->klen);
        for (int b = 0; b < 64; b++) counters[b] += (h >> b & 1) ? term->n : -term->n;
    }
    for (int b = 0; b < 64; b++)
        if (counters[b] > 0) s->simhash |= 1ULL << b;
    if (!rc && s->n_terms > 1) qsort(s->terms, (size_t)s->n_terms, sizeof *s->terms, term_cmp);
    if (!rc && max_terms > 0 && s->n_terms > max_terms) {
        for (int i = max_terms; i < s->n_terms; i++) kvm_free(s->terms[i].s);
        s->n_terms = max_terms;
    }
    kvm_map_free(&t.counts);
    return rc;
}

/* The term counts of a free text (the same tokens as the key text), unsorted, into *out[*n] (kvm_free each s and
 * the array; NULL when none). 0 or KVM_ENOMEM. */
int tsig_text_terms(const char *text, const tsig_minhash_fns_t *fns, tsig_term_t **out, int *n_out) {
    tok_state_t t = {.fns = fns};
    kvm_map_init(&t.counts, KVM_MAP_STR);
    for (int i = 0; i < TSIG_MINHASH; i++) t.mins[i] = UINT64_MAX;
    tokenize(&t, text ? text : "");
    int rc = t.rc, k = 0;
    size_t n = kvm_map_len(&t.counts);
    tsig_term_t *terms = n ? kvm_calloc(n, sizeof *terms) : NULL;
    if (n && !terms) rc = KVM_ENOMEM;
    for (size_t i = 0; !rc && i < t.counts.cap; i++) {
        const kvm_map_entry_t *e = &t.counts.slots[i];
        if (!e->hash) continue;
        terms[k].n = (int)e->val.u64;
        if (!(terms[k++].s = kvm_strndup(e->key.str, e->klen))) rc = KVM_ENOMEM;
    }
    kvm_map_free(&t.counts);
    if (rc) {
        for (int i = 0; i < k; i++) kvm_free(terms[i].s);
        kvm_free(terms);
        return KVM_ENOMEM;
    }
    *out = terms;
    *n_out = k;
    return 0;
}

static int build_feats(tsig_t *s) {
    kvm_map_t m;
    kvm_map_init(&m, KVM_MAP_U64);
    int rc = 0;
    for (int t = 0; !rc && t < s->n_steps; t++) {
        if (t > 0) rc |= feat_add(&m, "ab", s->agent[t - 1], s->agent[t]) | feat_add(&m, "op", op_name(s, t - 1), op_name(s, t));
        if (s->tmpl[t]) rc |= feat_add(&m, "err", s->tmpl[t], NULL);
        for (int b = 0; b < TSIG_N_FLAGS; b++)
            if (s->flags[t] & (1u << b)) rc |= feat_add(&m, "flag", tsig_flag_name(b), NULL);
    }
    size_t n = kvm_map_len(&m);
    s->feats = !rc && n ? kvm_calloc(n, sizeof *s->feats) : NULL;
    if (!rc && n && !s->feats) rc = KVM_ENOMEM;
    double sq = 0;
    for (size_t i = 0; !rc && i < m.cap; i++)
        if (m.slots[i].hash) {
            s->feats[s->n_feats++] = (tsig_feat_t){m.slots[i].key.u64, (int)m.slots[i].val.u64};
            sq += (double)m.slots[i].val.u64 * (double)m.slots[i].val.u64;
        }
    if (!rc && s->n_feats > 1) qsort(s->feats, (size_t)s->n_feats, sizeof *s->feats, feat_cmp);
    s->feats_norm = sqrt(sq);
    kvm_map_free(&m);
    return rc ? KVM_ENOMEM : 0;
}

int tsig_build(const kvm_failure_t *f, const tsig_minhash_fns_t *fns, int max_terms, tsig_t *s) {
    memset(s, 0, sizeof *s);
    if (!f || f->n_steps < 0 || (f->n_steps > 0 && !f->steps))
        return kvm_seterr(KVM_EINVAL, "failure: no steps array for %d steps", f ? f->n_steps : 0);
    size_t n = (size_t)f->n_steps + 1;
    s->n_steps = f->n_steps;
    s->agent = kvm_calloc(n, sizeof *s->agent);
    s->flags = kvm_calloc(n, sizeof *s->flags);
    s->tmpl = kvm_calloc(n, sizeof *s->tmpl);
    s->tmpl_hash = kvm_calloc(n, sizeof *s->tmpl_hash);
    s->tool = kvm_calloc(n, sizeof *s->tool);
    s->error = kvm_calloc(n, sizeof *s->error);
    s->phrases = kvm_calloc(n, sizeof *s->phrases);
    int rc = !s->agent || !s->flags || !s->tmpl || !s->tmpl_hash || !s->tool || !s->error || !s->phrases ? KVM_ENOMEM : 0;
    kvm_errclear(); /* the allocator sets KVM_ENOMEM: a template cut short by a failed allocation is noticed below */
    if (!rc) rc = build_steps(f, s);
    if (!rc && kvm_errcode() == KVM_ENOMEM) rc = KVM_ENOMEM;
    if (!rc) rc = build_keys(f, fns, max_terms, s);
    if (!rc) rc = build_feats(s);
    if (rc) {
        tsig_free(s);
        return kvm_seterr(rc, "out of memory building a failure signature");
    }
    return 0;
}
