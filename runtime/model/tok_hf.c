/* tok_hf.c - loads an HF tokenizer.json (model type BPE) and its tokenizer_config.json.
 *
 * What is read: model (vocab, merges as "a b" strings or [a, b] arrays, unk_token, byte_fallback,
 * fuse_unk, ignore_merges), added_tokens, normalizer, pre_tokenizer, decoder, post_processor; from the
 * config: bos_token, eos_token, add_bos_token, chat_template. Sequence steps are flattened. Anything we
 * do not implement is refused with KVM_EUNSUPPORTED naming the component and its type, never guessed;
 * malformed input gives KVM_EFORMAT naming the file and the JSON field. */
#include "../core/json.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/core.h"
#include "tok_internal.h"

/* ---- JSON helpers ---------------------------------------------------------------------------- */

static const cJSON *jget(const cJSON *o, const char *k) { return cJSON_IsObject(o) ? cJSON_GetObjectItemCaseSensitive(o, k) : NULL; }

static bool jbool(const cJSON *o, const char *k, bool dflt) {
    const cJSON *v = jget(o, k);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : dflt;
}

static const char *jstr(const cJSON *o, const char *k) {
    const cJSON *v = jget(o, k);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* A token named in a config: "<s>" or {"content": "<s>", ...} (AddedToken form), or NULL. */
static const char *jtoken(const cJSON *o, const char *k) {
    const cJSON *v = jget(o, k);
    if (cJSON_IsString(v)) return v->valuestring;
    if (cJSON_IsObject(v)) return jstr(v, "content");
    return NULL;
}

static bool jint(const cJSON *v, long long lo, long long hi, long long *out) {
    if (!cJSON_IsNumber(v)) return false;
    double d = v->valuedouble;
    if (!(d >= (double)lo && d <= (double)hi) || d != (double)(long long)d) return false; /* range first: no UB cast */
    *out = (long long)d;
    return true;
}

static char *dupn(const char *s, size_t n) {
    char *p = kvm_malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

/* ---- pipeline parsing ------------------------------------------------------------------------------ */

typedef struct {
    const char *path;
    kvm_tokenizer_t *t;
} ctx_t;

static int grow(void **arr, int n, size_t elem) {
    void *p = kvm_realloc(*arr, (size_t)(n + 1) * elem);
    if (!p) return KVM_ENOMEM;
    *arr = p;
    memset((char *)p + (size_t)n * elem, 0, elem);
    return 0;
}

/* The pattern of a Split/Replace: {"String": s} or {"Regex": r}. */
static int read_pattern(ctx_t *c, const cJSON *o, const char *field, const char **s, const char **re) {
    const cJSON *p = jget(o, "pattern");
    *s = jstr(p, "String");
    *re = jstr(p, "Regex");
    if (!*s && !*re)
        return kvm_seterr(KVM_EFORMAT, "%s: %s.pattern: expected {\"String\": ...} or {\"Regex\": ...}", c->path, field);
    return 0;
}

static int parse_normalizer(ctx_t *c, const cJSON *o, const char *field) {
    if (!o || cJSON_IsNull(o)) return 0;
    const char *type = jstr(o, "type");
    if (!type) return kvm_seterr(KVM_EFORMAT, "%s: %s: missing \"type\"", c->path, field);
    kvm_tokenizer_t *t = c->t;
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = jget(o, "normalizers"), *it;
        if (!cJSON_IsArray(list)) return kvm_seterr(KVM_EFORMAT, "%s: %s.normalizers: expected an array", c->path, field);
        cJSON_ArrayForEach(it, list) {
            int rc = parse_normalizer(c, it, field);
            if (rc) return rc;
        }
        return 0;
    }
    tok_norm_t n = {0};
    if (!strcmp(type, "NFC")) {
        n.type = TOK_NORM_NFC;
    } else if (!strcmp(type, "NFD")) {
        n.type = TOK_NORM_NFD;
    } else if (!strcmp(type, "Prepend")) {
        const char *p = jstr(o, "prepend");
        if (!p) return kvm_seterr(KVM_EFORMAT, "%s: %s (Prepend): missing string \"prepend\"", c->path, field);
        n.type = TOK_NORM_PREPEND;
        if (!(n.a = kvm_strdup(p))) return KVM_ENOMEM;
    } else if (!strcmp(type, "Replace")) {
        const char *s, *re, *content = jstr(o, "content");
        int rc = read_pattern(c, o, field, &s, &re);
        if (rc) return rc;
        if (!s) return kvm_seterr(KVM_EUNSUPPORTED, "%s: %s (Replace): regex patterns are not supported (\"%s\")", c->path, field, re);
        if (!content || !*s) return kvm_seterr(KVM_EFORMAT, "%s: %s (Replace): needs a non-empty pattern and a \"content\"", c->path, field);
        n.type = TOK_NORM_REPLACE;
        n.a = kvm_strdup(s);
        n.b = kvm_strdup(content);
        if (!n.a || !n.b) return kvm_free(n.a), kvm_free(n.b), KVM_ENOMEM;
    } else {
        return kvm_seterr(KVM_EUNSUPPORTED, "%s: %s: normalizer type \"%s\" is not supported (NFC, NFD, Prepend, Replace, Sequence are)",
                          c->path, field, type);
    }
    if (grow((void **)&t->norm, t->n_norm, sizeof *t->norm)) return kvm_free(n.a), kvm_free(n.b), KVM_ENOMEM;
    t->norm[t->n_norm++] = n;
    return 0;
}

/* The regexes we implement, as tokenizer.json spells them. */
static const struct {
    const char *re;
    int id;
} known_regex[] = {
    {"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+", TOK_RE_GPT2},
    {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
     TOK_RE_LLAMA3},
    {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
     TOK_RE_QWEN2},
};

static int parse_prepend_scheme(ctx_t *c, const cJSON *o, const char *field, int *out) {
    const char *ps = jstr(o, "prepend_scheme");
    if (ps) {
        if (!strcmp(ps, "always")) *out = TOK_PREPEND_ALWAYS;
        else if (!strcmp(ps, "first")) *out = TOK_PREPEND_FIRST;
        else if (!strcmp(ps, "never")) *out = TOK_PREPEND_NEVER;
        else return kvm_seterr(KVM_EFORMAT, "%s: %s.prepend_scheme: \"%s\" is not always/first/never", c->path, field, ps);
    } else {
        *out = jbool(o, "add_prefix_space", true) ? TOK_PREPEND_ALWAYS : TOK_PREPEND_NEVER; /* older files */
    }
    return 0;
}

static int parse_pretok(ctx_t *c, const cJSON *o, const char *field) {
    if (!o || cJSON_IsNull(o)) return 0;
    const char *type = jstr(o, "type");
    if (!type) return kvm_seterr(KVM_EFORMAT, "%s: %s: missing \"type\"", c->path, field);
    kvm_tokenizer_t *t = c->t;
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = jget(o, "pretokenizers"), *it;
        if (!cJSON_IsArray(list)) return kvm_seterr(KVM_EFORMAT, "%s: %s.pretokenizers: expected an array", c->path, field);
        cJSON_ArrayForEach(it, list) {
            int rc = parse_pretok(c, it, field);
            if (rc) return rc;
        }
        return 0;
    }
    tok_pre_t p = {0};
    if (!strcmp(type, "Split")) {
        const char *s, *re, *beh = jstr(o, "behavior");
        int rc = read_pattern(c, o, field, &s, &re);
        if (rc) return rc;
        if (re) {
            p.type = TOK_PRE_SPLIT_REGEX;
            for (size_t i = 0; i < sizeof known_regex / sizeof known_regex[0]; i++)
                if (!strcmp(re, known_regex[i].re)) p.regex = known_regex[i].id;
            if (!p.regex)
                return kvm_seterr(KVM_EUNSUPPORTED, "%s: %s (Split): regex \"%s\" is not one we implement (GPT-2, Llama-3, Qwen2 patterns)",
                                  c->path, field, re);
        } else {
            if (!*s) return kvm_seterr(KVM_EFORMAT, "%s: %s (Split): empty pattern", c->path, field);
            p.type = TOK_PRE_SPLIT_STRING;
            if (!(p.pattern = kvm_strdup(s))) return KVM_ENOMEM;
        }
        if (!beh) beh = "Isolated";
        if (!strcmp(beh, "Removed")) p.behavior = TOK_SPLIT_REMOVED;
        else if (!strcmp(beh, "Isolated")) p.behavior = TOK_SPLIT_ISOLATED;
        else if (!strcmp(beh, "MergedWithPrevious")) p.behavior = TOK_SPLIT_MERGED_PREV;
        else if (!strcmp(beh, "MergedWithNext")) p.behavior = TOK_SPLIT_MERGED_NEXT;
        else if (!strcmp(beh, "Contiguous")) p.behavior = TOK_SPLIT_CONTIGUOUS;
        else {
            kvm_free(p.pattern);
            return kvm_seterr(KVM_EFORMAT, "%s: %s (Split).behavior: unknown \"%s\"", c->path, field, beh);
        }
        p.invert = jbool(o, "invert", false);
    } else if (!strcmp(type, "ByteLevel")) {
        p.type = TOK_PRE_BYTELEVEL;
        p.flag = jbool(o, "add_prefix_space", true);
        p.use_regex = jbool(o, "use_regex", true);
    } else if (!strcmp(type, "Digits")) {
        p.type = TOK_PRE_DIGITS;
        p.flag = jbool(o, "individual_digits", false);
    } else if (!strcmp(type, "Metaspace")) {
        const char *r = jstr(o, "replacement");
        p.type = TOK_PRE_METASPACE;
        p.flag = jbool(o, "split", true);
        int rc = parse_prepend_scheme(c, o, field, &p.prepend);
        if (rc) return rc;
        if (!(p.pattern = kvm_strdup(r && *r ? r : "\xE2\x96\x81"))) return KVM_ENOMEM;
    } else if (!strcmp(type, "WhitespaceSplit")) {
        p.type = TOK_PRE_WSPLIT;
    } else {
        return kvm_seterr(KVM_EUNSUPPORTED,
                          "%s: %s: pre-tokenizer type \"%s\" is not supported (Split, ByteLevel, Digits, Metaspace, WhitespaceSplit, Sequence are)",
                          c->path, field, type);
    }
    if (grow((void **)&t->pre, t->n_pre, sizeof *t->pre)) return kvm_free(p.pattern), KVM_ENOMEM;
    t->pre[t->n_pre++] = p;
    return 0;
}

static int parse_decoder(ctx_t *c, const cJSON *o, const char *field) {
    if (!o || cJSON_IsNull(o)) return 0;
    const char *type = jstr(o, "type");
    if (!type) return kvm_seterr(KVM_EFORMAT, "%s: %s: missing \"type\"", c->path, field);
    kvm_tokenizer_t *t = c->t;
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = jget(o, "decoders"), *it;
        if (!cJSON_IsArray(list)) return kvm_seterr(KVM_EFORMAT, "%s: %s.decoders: expected an array", c->path, field);
        cJSON_ArrayForEach(it, list) {
            int rc = parse_decoder(c, it, field);
            if (rc) return rc;
        }
        return 0;
    }
    tok_dec_t d = {0};
    if (!strcmp(type, "ByteLevel")) {
        d.type = TOK_DEC_BYTELEVEL;
    } else if (!strcmp(type, "ByteFallback")) {
        d.type = TOK_DEC_BYTEFALLBACK;
    } else if (!strcmp(type, "Fuse")) {
        d.type = TOK_DEC_FUSE;
    } else if (!strcmp(type, "Replace")) {
        const char *s, *re, *content = jstr(o, "content");
        int rc = read_pattern(c, o, field, &s, &re);
        if (rc) return rc;
        if (!s) return kvm_seterr(KVM_EUNSUPPORTED, "%s: %s (Replace): regex patterns are not supported", c->path, field);
        if (!content || !*s) return kvm_seterr(KVM_EFORMAT, "%s: %s (Replace): needs a non-empty pattern and a \"content\"", c->path, field);
        d.type = TOK_DEC_REPLACE;
        d.a = kvm_strdup(s);
        d.b = kvm_strdup(content);
        if (!d.a || !d.b) return kvm_free(d.a), kvm_free(d.b), KVM_ENOMEM;
    } else if (!strcmp(type, "Strip")) {
        const char *content = jstr(o, "content");
        long long start = 0, stop = 0;
        if (jget(o, "start") && !jint(jget(o, "start"), 0, 1 << 20, &start))
            return kvm_seterr(KVM_EFORMAT, "%s: %s (Strip).start: expected a non-negative integer", c->path, field);
        if (jget(o, "stop") && !jint(jget(o, "stop"), 0, 1 << 20, &stop))
            return kvm_seterr(KVM_EFORMAT, "%s: %s (Strip).stop: expected a non-negative integer", c->path, field);
        d.type = TOK_DEC_STRIP;
        d.start = (int)start;
        d.stop = (int)stop;
        if (!(d.a = kvm_strdup(content ? content : " "))) return KVM_ENOMEM;
    } else if (!strcmp(type, "Metaspace")) {
        const char *r = jstr(o, "replacement");
        int scheme, rc = parse_prepend_scheme(c, o, field, &scheme);
        if (rc) return rc;
        d.type = TOK_DEC_METASPACE;
        d.prepend = scheme != TOK_PREPEND_NEVER;
        if (!(d.a = kvm_strdup(r && *r ? r : "\xE2\x96\x81"))) return KVM_ENOMEM;
    } else {
        return kvm_seterr(KVM_EUNSUPPORTED,
                          "%s: %s: decoder type \"%s\" is not supported (ByteLevel, ByteFallback, Fuse, Replace, Strip, Metaspace, Sequence are)",
                          c->path, field, type);
    }
    if (grow((void **)&t->dec, t->n_dec, sizeof *t->dec)) return kvm_free(d.a), kvm_free(d.b), KVM_ENOMEM;
    t->dec[t->n_dec++] = d;
    return 0;
}

static int push_id(int32_t **arr, int *n, int32_t id) {
    if (grow((void **)arr, *n, sizeof **arr)) return KVM_ENOMEM;
    (*arr)[(*n)++] = id;
    return 0;
}

/* TemplateProcessing "single": special tokens before the sequence $A go to the prefix, after it to the
 * suffix; ids come from "special_tokens". Bert/Roberta processing: cls before, sep after. */
static int parse_post(ctx_t *c, const cJSON *o, const char *field) {
    if (!o || cJSON_IsNull(o)) return 0;
    const char *type = jstr(o, "type");
    if (!type) return kvm_seterr(KVM_EFORMAT, "%s: %s: missing \"type\"", c->path, field);
    kvm_tokenizer_t *t = c->t;
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = jget(o, "processors"), *it;
        if (!cJSON_IsArray(list)) return kvm_seterr(KVM_EFORMAT, "%s: %s.processors: expected an array", c->path, field);
        cJSON_ArrayForEach(it, list) {
            int rc = parse_post(c, it, field);
            if (rc) return rc;
        }
        return 0;
    }
    if (!strcmp(type, "ByteLevel")) return 0; /* offsets only */
    if (!strcmp(type, "TemplateProcessing")) {
        const cJSON *single = jget(o, "single"), *specials = jget(o, "special_tokens"), *it;
        if (!cJSON_IsArray(single)) return kvm_seterr(KVM_EFORMAT, "%s: %s.single: expected an array", c->path, field);
        bool after = false;
        cJSON_ArrayForEach(it, single) {
            if (jget(it, "Sequence")) {
                after = true;
                continue;
            }
            const char *name = jstr(jget(it, "SpecialToken"), "id");
            if (!name) return kvm_seterr(KVM_EFORMAT, "%s: %s.single: an item is neither Sequence nor SpecialToken", c->path, field);
            const cJSON *ids = jget(jget(specials, name), "ids"), *idv;
            if (!cJSON_IsArray(ids))
                return kvm_seterr(KVM_EFORMAT, "%s: %s.special_tokens: \"%s\" missing or without \"ids\"", c->path, field, name);
            cJSON_ArrayForEach(idv, ids) {
                long long id;
                if (!jint(idv, 0, t->vocab_size - 1, &id))
                    return kvm_seterr(KVM_EFORMAT, "%s: %s.special_tokens[\"%s\"].ids: id outside 0..%d", c->path, field, name, t->vocab_size - 1);
                int rc = after ? push_id(&t->post_suffix, &t->n_post_suffix, (int32_t)id)
                               : push_id(&t->post_prefix, &t->n_post_prefix, (int32_t)id);
                if (rc) return rc;
            }
        }
        return 0;
    }
    if (!strcmp(type, "BertProcessing") || !strcmp(type, "RobertaProcessing")) {
        long long cls, sep;
        const cJSON *cj = jget(o, "cls"), *sj = jget(o, "sep");
        if (!cJSON_IsArray(cj) || !cJSON_IsArray(sj) || !jint(cJSON_GetArrayItem(cj, 1), 0, t->vocab_size - 1, &cls) ||
            !jint(cJSON_GetArrayItem(sj, 1), 0, t->vocab_size - 1, &sep))
            return kvm_seterr(KVM_EFORMAT, "%s: %s (%s): cls/sep must be [token, id] with id in range", c->path, field, type);
        if (push_id(&t->post_prefix, &t->n_post_prefix, (int32_t)cls) || push_id(&t->post_suffix, &t->n_post_suffix, (int32_t)sep))
            return KVM_ENOMEM;
        return 0;
    }
    return kvm_seterr(KVM_EUNSUPPORTED, "%s: %s: post-processor type \"%s\" is not supported", c->path, field, type);
}

/* ---- model ------------------------------------------------------------------------------------- */

/* Largest id among model.vocab and added_tokens, validating both lists' shapes. */
static int scan_ids(ctx_t *c, const cJSON *vocab, const cJSON *added, long long *max_id) {
    const cJSON *it;
    *max_id = -1;
    cJSON_ArrayForEach(it, vocab) {
        long long id;
        if (!jint(it, 0, (1 << 24) - 1, &id))
            return kvm_seterr(KVM_EFORMAT, "%s: model.vocab[\"%s\"]: expected an id in 0..16777215", c->path, it->string ? it->string : "");
        if (id > *max_id) *max_id = id;
    }
    if (added && !cJSON_IsNull(added)) {
        if (!cJSON_IsArray(added)) return kvm_seterr(KVM_EFORMAT, "%s: added_tokens: expected an array", c->path);
        int i = 0;
        cJSON_ArrayForEach(it, added) {
            long long id;
            const char *content = jstr(it, "content");
            if (!jint(jget(it, "id"), 0, (1 << 24) - 1, &id))
                return kvm_seterr(KVM_EFORMAT, "%s: added_tokens[%d].id: expected an id in 0..16777215", c->path, i);
            if (!content || !*content)
                return kvm_seterr(KVM_EFORMAT, "%s: added_tokens[%d].content: expected a non-empty string", c->path, i);
            if (id > *max_id) *max_id = id;
            i++;
        }
    }
    if (*max_id < 0) return kvm_seterr(KVM_EFORMAT, "%s: model.vocab: empty", c->path);
    return 0;
}

static int parse_merges(ctx_t *c, const cJSON *merges) {
    kvm_tokenizer_t *t = c->t;
    if (tok_pairmap_init(&t->merges, (size_t)cJSON_GetArraySize(merges))) return KVM_ENOMEM;
    const cJSON *it;
    int rank = 0;
    kvm_sb_t cat = {0};
    cJSON_ArrayForEach(it, merges) {
        const char *a, *b;
        size_t la, lb;
        if (cJSON_IsString(it)) {
            const char *s = it->valuestring, *sp = strchr(s, ' ');
            if (!sp || strchr(sp + 1, ' ') || sp == s || !sp[1]) {
                kvm_sb_free(&cat);
                return kvm_seterr(KVM_EFORMAT, "%s: model.merges[%d]: \"%s\" is not two tokens separated by one space", c->path, rank, s);
            }
            a = s, la = (size_t)(sp - s), b = sp + 1, lb = strlen(b);
        } else if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 && cJSON_IsString(cJSON_GetArrayItem(it, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(it, 1))) {
            a = cJSON_GetArrayItem(it, 0)->valuestring, la = strlen(a);
            b = cJSON_GetArrayItem(it, 1)->valuestring, lb = strlen(b);
        } else {
            kvm_sb_free(&cat);
            return kvm_seterr(KVM_EFORMAT, "%s: model.merges[%d]: expected \"a b\" or [\"a\", \"b\"]", c->path, rank);
        }
        int32_t ia = tok_strmap_get(&t->vocab, a, la), ib = tok_strmap_get(&t->vocab, b, lb);
        cat.len = 0;
        if (kvm_sb_append(&cat, a, la) || kvm_sb_append(&cat, b, lb)) return kvm_sb_free(&cat), KVM_ENOMEM;
        int32_t im = tok_strmap_get(&t->vocab, cat.s, cat.len);
        if (ia < 0 || ib < 0 || im < 0) {
            const char *which = ia < 0 ? a : ib < 0 ? b : cat.s;
            int wl = (int)(ia < 0 ? la : ib < 0 ? lb : cat.len);
            kvm_seterr(KVM_EFORMAT, "%s: model.merges[%d]: references unknown token \"%.*s\" (not in model.vocab)", c->path, rank, wl, which);
            kvm_sb_free(&cat);
            return KVM_EFORMAT;
        }
        if (tok_pairmap_put(&t->merges, ia, ib, rank, im)) return kvm_sb_free(&cat), KVM_ENOMEM;
        rank++;
    }
    kvm_sb_free(&cat);
    return 0;
}

static int cmp_added(const void *x, const void *y) {
    const tok_added_t *a = x, *b = y;
    unsigned char fa = (unsigned char)a->content[0], fb = (unsigned char)b->content[0];
    if (fa != fb) return fa < fb ? -1 : 1;
    if (a->len != b->len) return a->len > b->len ? -1 : 1; /* longest first */
    return a->id < b->id ? -1 : a->id > b->id;
}

static int parse_added(ctx_t *c, const cJSON *added) {
    kvm_tokenizer_t *t = c->t;
    int n = cJSON_IsArray(added) ? cJSON_GetArraySize(added) : 0;
    if (n == 0) return 0;
    t->added = kvm_calloc((size_t)n, sizeof *t->added);
    if (!t->added) return KVM_ENOMEM;
    const cJSON *it;
    cJSON_ArrayForEach(it, added) {
        long long id = 0;
        jint(jget(it, "id"), 0, t->vocab_size - 1, &id); /* validated by scan_ids */
        const char *content = jstr(it, "content");
        tok_added_t *a = &t->added[t->n_added];
        a->len = strlen(content);
        if (!(a->content = dupn(content, a->len))) return KVM_ENOMEM;
        t->n_added++;
        a->id = (int32_t)id;
        a->special = jbool(it, "special", false);
        a->lstrip = jbool(it, "lstrip", false);
        a->rstrip = jbool(it, "rstrip", false);
        a->single_word = jbool(it, "single_word", false);
        a->normalized = jbool(it, "normalized", !a->special);
        if (tok_set_piece(t, a->id, content, a->len, false)) return KVM_ENOMEM;
        if (a->special) t->special[a->id] = 1;
    }
    qsort(t->added, (size_t)t->n_added, sizeof *t->added, cmp_added);
    for (int i = t->n_added - 1; i >= 0; i--) t->added_by_byte[(unsigned char)t->added[i].content[0]] = i;
    return 0;
}

static int parse_model(ctx_t *c, const cJSON *model) {
    kvm_tokenizer_t *t = c->t;
    const cJSON *vocab = jget(model, "vocab"), *it;
    cJSON_ArrayForEach(it, vocab) {
        long long id = 0;
        jint(it, 0, t->vocab_size - 1, &id); /* validated by scan_ids */
        size_t len = strlen(it->string);
        if (t->pieces[id] && (t->piece_len[id] != len || memcmp(t->pieces[id], it->string, len)))
            return kvm_seterr(KVM_EFORMAT, "%s: model.vocab: id %lld is given to two tokens (\"%.40s\" and \"%.40s\")",
                              c->path, id, t->pieces[id], it->string);
        if (tok_set_piece(t, (int32_t)id, it->string, len, true)) return KVM_ENOMEM;
    }
    const char *unk = jstr(model, "unk_token");
    if (unk) {
        t->unk = tok_strmap_get(&t->vocab, unk, strlen(unk));
        if (t->unk < 0) return kvm_seterr(KVM_EFORMAT, "%s: model.unk_token: \"%s\" is not in model.vocab", c->path, unk);
    }
    t->byte_fallback = jbool(model, "byte_fallback", false);
    t->fuse_unk = jbool(model, "fuse_unk", false);
    t->ignore_merges = jbool(model, "ignore_merges", false);
    const char *csp = jstr(model, "continuing_subword_prefix"), *eow = jstr(model, "end_of_word_suffix");
    if (csp && *csp) return kvm_seterr(KVM_EUNSUPPORTED, "%s: model.continuing_subword_prefix \"%s\" is not supported", c->path, csp);
    if (eow && *eow) return kvm_seterr(KVM_EUNSUPPORTED, "%s: model.end_of_word_suffix \"%s\" is not supported", c->path, eow);
    const cJSON *dropout = jget(model, "dropout");
    if (cJSON_IsNumber(dropout) && dropout->valuedouble > 0)
        return kvm_seterr(KVM_EUNSUPPORTED, "%s: model.dropout %g: BPE dropout is not supported", c->path, dropout->valuedouble);
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_ids[b] = tok_strmap_get(&t->vocab, name, 6);
    }
    return parse_merges(c, jget(model, "merges"));
}

/* ---- tokenizer_config.json ---------------------------------------------------------------------------- */

static int32_t find_token(const kvm_tokenizer_t *t, const char *s) { return s ? kvm_tokenizer_find(t, s) : -1; }

static int apply_config(kvm_tokenizer_t *t, const char *cfg_path) {
    cJSON *cfg = NULL;
    if (cfg_path) {
        int rc = kvm_json_read_object(cfg_path, 64u << 20, "tokenizer config", &cfg);
        if (rc) return rc;
    }
    const char *bos = jtoken(cfg, "bos_token"), *eos = jtoken(cfg, "eos_token");
    t->bos = find_token(t, bos);
    if (bos && t->bos < 0) KVM_LOGW("%s: bos_token \"%s\" is not a token of the tokenizer", cfg_path, bos);
    if (t->bos < 0 && t->n_post_prefix > 0) t->bos = t->post_prefix[0];
    t->eos = find_token(t, eos);
    if (eos && t->eos < 0) KVM_LOGW("%s: eos_token \"%s\" is not a token of the tokenizer", cfg_path, eos);
    static const char *eos_names[] = {"</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<eos>"};
    for (size_t i = 0; t->eos < 0 && !cfg_path && i < sizeof eos_names / sizeof eos_names[0]; i++) t->eos = find_token(t, eos_names[i]);
    const cJSON *abos = jget(cfg, "add_bos_token");
    if (cJSON_IsBool(abos)) {
        /* transformers rebuilds the post-processor from add_bos_token: follow it */
        t->adds_bos = cJSON_IsTrue(abos) && t->bos >= 0;
        if (t->adds_bos && t->n_post_prefix == 0) {
            if (push_id(&t->post_prefix, &t->n_post_prefix, t->bos)) return cJSON_Delete(cfg), KVM_ENOMEM;
        } else if (!t->adds_bos) {
            t->n_post_prefix = 0;
        }
    } else {
        t->adds_bos = t->n_post_prefix > 0;
    }
    const cJSON *tmpl = jget(cfg, "chat_template");
    const char *tpl = NULL;
    if (cJSON_IsString(tmpl)) {
        tpl = tmpl->valuestring;
    } else if (cJSON_IsArray(tmpl)) { /* [{"name": "default", "template": ...}, ...] */
        const cJSON *it;
        cJSON_ArrayForEach(it, tmpl) {
            const char *name = jstr(it, "name"), *body = jstr(it, "template");
            if (body && (!tpl || (name && !strcmp(name, "default")))) tpl = body;
        }
    }
    if (tpl) {
        char *dup = kvm_strdup(tpl);
        if (!dup) return cJSON_Delete(cfg), KVM_ENOMEM;
        kvm_free(t->chat_template);
        t->chat_template = dup;
    }
    cJSON_Delete(cfg);
    return 0;
}

/* ---- the loader ----------------------------------------------------------------------------------- */

kvm_tokenizer_t *kvm_tokenizer_load_hf(const char *json_path, const char *config_path) {
    kvm_core_init();
    if (!json_path) {
        kvm_seterr(KVM_EINVAL, "kvm_tokenizer_load_hf: path is NULL");
        return NULL;
    }
    kvm_errclear();
    cJSON *root;
    if (kvm_json_read_object(json_path, 1u << 30, "tokenizer", &root)) return NULL;
    kvm_tokenizer_t *t = NULL;
    ctx_t c = {.path = json_path};
    const cJSON *model = jget(root, "model");
    if (!cJSON_IsObject(model)) {
        kvm_seterr(KVM_EFORMAT, "%s: missing object field \"model\"", json_path);
        goto fail;
    }
    const char *mtype = jstr(model, "type");
    if (mtype && strcmp(mtype, "BPE")) {
        kvm_seterr(KVM_EUNSUPPORTED, "%s: model.type \"%s\" is not supported (only BPE)", json_path, mtype);
        goto fail;
    }
    const cJSON *vocab = jget(model, "vocab"), *merges = jget(model, "merges"), *added = jget(root, "added_tokens");
    if (!vocab) {
        kvm_seterr(KVM_EFORMAT, "%s: missing field model.vocab", json_path);
        goto fail;
    }
    if (!cJSON_IsObject(vocab)) {
        kvm_seterr(KVM_EUNSUPPORTED, "%s: model.vocab is not an object of token -> id (a Unigram vocabulary?); only BPE is supported",
                   json_path);
        goto fail;
    }
    if (!cJSON_IsArray(merges)) {
        kvm_seterr(KVM_EFORMAT, "%s: missing array field model.merges", json_path);
        goto fail;
    }
    long long max_id;
    if (scan_ids(&c, vocab, added, &max_id)) goto fail;
    t = tok_alloc(TOK_BPE_SENTENCEPIECE, (int)max_id + 1, json_path);
    if (!t) goto fail;
    c.t = t;
    if (parse_model(&c, model) || parse_added(&c, added) || parse_normalizer(&c, jget(root, "normalizer"), "normalizer") ||
        parse_pretok(&c, jget(root, "pre_tokenizer"), "pre_tokenizer") || parse_decoder(&c, jget(root, "decoder"), "decoder") ||
        parse_post(&c, jget(root, "post_processor"), "post_processor"))
        goto fail;
    for (int i = 0; i < t->n_pre; i++)
        if (t->pre[i].type == TOK_PRE_BYTELEVEL) t->kind = TOK_BPE_BYTELEVEL;
    for (int i = 0; i < t->n_dec; i++)
        if (t->dec[i].type == TOK_DEC_BYTELEVEL) t->kind = TOK_BPE_BYTELEVEL;
    if (apply_config(t, config_path)) goto fail;
    cJSON_Delete(root);
    return t;
fail:
    if (kvm_errcode() == 0) kvm_seterr(KVM_ENOMEM, "%s: out of memory", json_path);
    cJSON_Delete(root);
    kvm_tokenizer_free(t);
    return NULL;
}
