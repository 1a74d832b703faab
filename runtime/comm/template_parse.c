/* template_parse.c - the one template grammar (see template_parse.h and docs/lua-api.md). */
#include "template_parse.h"

#include <ctype.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "prompt.h"

#define FORMS                                                                                      \
    "the forms are {input}, {input.KEY}, {agent.NAME}, {agent.NAME.prev}, {tool.NAME}, {state.KEY} " \
    "(\"{{\" and \"}}\" are literal braces)"

static bool name_char(char c) { return isalnum((unsigned char)c) || c == '_' || c == '-'; }
static bool group_char(char c) { return name_char(c) || c == '.' || c == ':'; }
static bool is_sep(char c) { return c == '.' || c == ':'; }

/* The parser runs twice over the text: once to measure (parts == NULL: counts parts and string bytes),
 * once to fill one allocation of that size. */
typedef struct sink {
    kvm_tpl_part_t *parts;
    char *str;    /* next free string byte (filling) */
    int n;        /* parts so far */
    size_t bytes; /* string bytes so far */
} sink_t;

/* Copies a ++ b[0..nb) ++ c as one string into the sink; NULL while measuring. */
static const char *put(sink_t *k, const char *a, const char *b, size_t nb, const char *c) {
    size_t na = strlen(a), nc = strlen(c);
    k->bytes += na + nb + nc + 1;
    if (!k->parts) return NULL;
    char *d = k->str;
    memcpy(d, a, na);
    memcpy(d + na, b, nb);
    memcpy(d + na + nb, c, nc + 1);
    k->str += na + nb + nc + 1;
    return d;
}

static kvm_tpl_part_t *add(sink_t *k, kvm_tpl_src_t src, size_t offset) {
    kvm_tpl_part_t *p = k->parts ? &k->parts[k->n] : NULL;
    if (p) *p = (kvm_tpl_part_t){.src = src, .offset = offset};
    k->n++;
    return p;
}

/* Emits t[from..to) as a text part, "{{" and "}}" unescaped (the span never splits an escape). */
static void emit_text(sink_t *k, const char *t, size_t from, size_t to) {
    if (from >= to) return;
    size_t n = 0;
    for (size_t i = from; i < to; i++, n++)
        if ((t[i] == '{' || t[i] == '}') && t[i + 1] == t[i]) i++;
    kvm_tpl_part_t *p = add(k, KVM_TPL_TEXT, from);
    k->bytes += n + 1;
    if (!p) return;
    char *d = k->str;
    for (size_t i = from, w = 0; i < to; i++, w++) {
        d[w] = t[i];
        if ((t[i] == '{' || t[i] == '}') && t[i + 1] == t[i]) i++;
    }
    d[n] = '\0';
    p->text = d;
    k->str += n + 1;
}

/* The placeholder whose braces are at t[open] and t[close]: validated and emitted. */
static int emit_placeholder(sink_t *k, const char *t, size_t open, size_t close) {
    const char *in = t + open + 1;
    size_t n = close - open - 1;
    const char *seg[4];
    size_t seg_len[4];
    int nseg = 0;
    for (size_t s = 0;;) { /* split at '.' / ':'; more than 3 segments is a bad form anyway */
        size_t e = s;
        while (e < n && !is_sep(in[e])) e++;
        if (nseg < 4) {
            seg[nseg] = in + s;
            seg_len[nseg] = e - s;
        }
        nseg++;
        if (e >= n) break;
        s = e + 1;
    }
    bool empty = false;
    for (int i = 1; i < nseg && i < 4; i++) empty |= seg_len[i] == 0;
#define KW(s) (seg_len[0] == strlen(s) && !strncmp(seg[0], s, seg_len[0]))
    kvm_tpl_src_t src = KVM_TPL_TEXT;
    const char *pre = "", *suf = "";
    if (KW("input") && nseg <= 2) {
        src = KVM_TPL_INPUT;
        pre = nseg == 2 ? "state:input." : "input";
    } else if (KW("agent") && nseg == 2) {
        src = KVM_TPL_AGENT, pre = "agent:", suf = ":current";
    } else if (KW("agent") && nseg == 3 && seg_len[2] == 4 && !strncmp(seg[2], "prev", 4)) {
        src = KVM_TPL_AGENT_PREV, pre = "agent:", suf = ":prev";
    } else if (KW("tool") && nseg == 2) {
        src = KVM_TPL_TOOL, pre = "tool:";
    } else if (KW("state") && nseg == 2) {
        src = KVM_TPL_STATE, pre = "state:";
    }
    bool known = KW("input") || KW("agent") || KW("tool") || KW("state");
#undef KW
    if (src == KVM_TPL_TEXT || empty)
        return kvm_seterr(KVM_EINVAL, "template: %s placeholder '{%.*s}' at offset %zu; " FORMS, known ? "bad" : "unknown",
                          (int)n, in, open);
    kvm_tpl_part_t *p = add(k, src, open);
    bool has_key = nseg >= 2;
    const char *key = has_key ? seg[1] : "";
    size_t key_len = has_key ? seg_len[1] : 0;
    const char *name = put(k, pre, key, key_len, suf);
    const char *source = put(k, "", in, n, "");
    const char *key_copy = has_key ? put(k, "", key, key_len, "") : NULL;
    if (p) {
        p->text = name;
        p->source = source;
        p->key = key_copy;
    }
    return 0;
}

/* Whether g[0..n) starts like a placeholder: a keyword and a separator ("agent.x" in "{agent.x and"). */
static bool opens_placeholder(const char *g, size_t n) {
    static const char *const kws[] = {"input", "agent", "tool", "state"};
    for (size_t i = 0; i < sizeof kws / sizeof *kws; i++) {
        size_t kl = strlen(kws[i]);
        if (n > kl && !strncmp(g, kws[i], kl) && is_sep(g[kl])) return true;
    }
    return false;
}

static int scan(const char *t, sink_t *k) {
    size_t len = strlen(t), run = 0, i = 0;
    while (i < len) {
        if ((t[i] == '{' || t[i] == '}') && t[i + 1] == t[i]) { /* "{{" / "}}": literal */
            i += 2;
            continue;
        }
        if (t[i] != '{') {
            i++;
            continue;
        }
        size_t e = i + 1;
        while (group_char(t[e])) e++;
        if (e == i + 1 || t[e] != '}') { /* not a placeholder: literal text, unless it opens one */
            if (opens_placeholder(t + i + 1, e - i - 1))
                return kvm_seterr(KVM_EINVAL, "template: placeholder '{%.*s' at offset %zu is not closed; " FORMS, (int)(e - i - 1),
                                  t + i + 1, i);
            i++;
            continue;
        }
        emit_text(k, t, run, i);
        int rc = emit_placeholder(k, t, i, e);
        if (rc) return rc;
        i = run = e + 1;
    }
    emit_text(k, t, run, len);
    return 0;
}

int kvm_template_parse_parts(const char *text, kvm_tpl_part_t **parts, int *n_parts) {
    *parts = NULL;
    *n_parts = 0;
    if (!text) return kvm_seterr(KVM_EINVAL, "template: text is NULL");
    sink_t m = {0};
    int rc = scan(text, &m);
    if (rc || m.n == 0) return rc;
    size_t head = (size_t)m.n * sizeof(kvm_tpl_part_t);
    char *mem = kvm_malloc(head + m.bytes);
    if (!mem) return kvm_seterr(KVM_ENOMEM, "template: out of memory parsing %zu bytes", strlen(text));
    sink_t f = {.parts = (kvm_tpl_part_t *)(void *)mem, .str = mem + head};
    rc = scan(text, &f);
    KVM_ASSERT(rc == 0 && f.n == m.n && (size_t)(f.str - (mem + head)) == m.bytes);
    *parts = f.parts;
    *n_parts = f.n;
    return 0;
}

int kvm_template_parse(const char *text, kvm_piece_t **pieces, int *n_pieces) {
    *pieces = NULL;
    *n_pieces = 0;
    kvm_tpl_part_t *parts;
    int n;
    int rc = kvm_template_parse_parts(text, &parts, &n);
    if (rc) return rc;
    size_t bytes = (size_t)n * sizeof(kvm_piece_t);
    for (int i = 0; i < n; i++) bytes += strlen(parts[i].text) + 1;
    char *mem = kvm_malloc(bytes ? bytes : 1);
    if (!mem) {
        kvm_free(parts);
        return kvm_seterr(KVM_ENOMEM, "template: out of memory");
    }
    kvm_piece_t *pc = (kvm_piece_t *)(void *)mem;
    char *s = mem + (size_t)n * sizeof(kvm_piece_t);
    for (int i = 0; i < n; i++) {
        size_t len = strlen(parts[i].text);
        memcpy(s, parts[i].text, len + 1);
        pc[i] = (kvm_piece_t){.kind = parts[i].src == KVM_TPL_TEXT ? KVM_PIECE_TEXT : KVM_PIECE_PLACEHOLDER, .text = s};
        s += len + 1;
    }
    kvm_free(parts);
    *pieces = pc;
    *n_pieces = n;
    return 0;
}
