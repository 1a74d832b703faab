/* c2c_docs.c - the blinded-receiver documents of the C2C demonstration (c2c_docs.h). */
#include "c2c_docs.h"

#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <kvmesh_lab.h>

#include "minitasks_eval.h"

/* The id of text when it is exactly one token, else -1. */
static int32_t single_token(const kvm_tokenizer_t *t, const char *text) {
    int32_t *ids = NULL;
    int n = 0;
    if (kvm_tokenize(t, text, strlen(text), 0, &ids, &n)) return -1;
    int32_t id = n == 1 ? ids[0] : -1;
    kvm_free(ids);
    return id;
}

int lab_c2c_docgen_init(lab_c2c_docgen_t *g, kvm_model_t *m, int split, uint64_t seed, int lo, int hi) {
    memset(g, 0, sizeof *g);
    if (split != KVM_MT_TRAIN && split != KVM_MT_EVAL) return kvm_seterr(KVM_EINVAL, "c2c docs: bad split %d", split);
    if (lo < 2 || hi < lo || hi > 48) return kvm_seterr(KVM_EINVAL, "c2c docs: facts %d-%d: need 2 <= LO <= HI <= 48", lo, hi);
    kvm_mt_run_t run; /* the rendering check of `kvmesh eval minitasks` */
    int rc = kvm_mt_run_init(&run, m, 0);
    if (rc) return rc;
    kvm_mt_run_free(&run);
    g->model = m;
    g->tok = kvm_model_tokenizer(m);
    g->split = split;
    g->seed = seed;
    g->opts.min_facts = lo;
    g->opts.max_facts = hi;
    kvm_model_info_t info;
    kvm_model_info(m, &info);
    g->bos_id = info.bos_id;
    g->hash_id = single_token(g->tok, "#");
    if (g->hash_id < 0) return kvm_seterr(KVM_EMODEL, "c2c docs: '#' is not a single token of %s's tokenizer", info.name);
    for (int d = 0; d < 10; d++) {
        char s[2] = {(char)('0' + d), 0};
        g->digit_id[d] = single_token(g->tok, s);
        if (g->digit_id[d] < 0)
            return kvm_seterr(KVM_EMODEL, "c2c docs: the digit '%s' is not a single token of %s's tokenizer", s, info.name);
    }
    return 0;
}

void lab_c2c_doc_clear(lab_c2c_doc_t *d) {
    if (!d) return;
    free(d->sharer);
    free(d->receiver);
    memset(d, 0, sizeof *d);
}

/* The chat rendering of (system, user) tokenized as the engine tokenizes prompts, into a malloc'ed copy. */
static int encode(const lab_c2c_docgen_t *g, const char *system, const char *user, int32_t **out, int *n) {
    char *text = NULL;
    int rc = kvm_model_chat_render(g->model, system, user, &text);
    if (rc) return rc;
    int32_t *ids = NULL;
    rc = kvm_tokenize(g->tok, text, strlen(text), KVM_TOK_ADD_BOS | KVM_TOK_PARSE_SPECIAL, &ids, n);
    kvm_free(text);
    if (rc) return rc;
    *out = malloc((size_t)(*n > 0 ? *n : 1) * sizeof **out);
    if (!*out) rc = kvm_seterr(KVM_ENOMEM, "c2c docs: out of memory");
    else memcpy(*out, ids, (size_t)*n * sizeof **out);
    kvm_free(ids);
    return rc;
}

int lab_c2c_doc_make(const lab_c2c_docgen_t *g, uint64_t i, lab_c2c_doc_t *d) {
    memset(d, 0, sizeof *d);
    kvm_mt_item_t it;
    int rc = kvm_mt_make_ex(&it, KVM_MT_RECALL, g->split, g->seed, i, 0, &g->opts);
    if (rc) return rc;
    /* the fact lines are "<name>: <4 digits>" joined by '\n', then "\nAsk: <name>"; names hold no digits */
    char *ask = strstr(it.user, "\nAsk: ");
    if (!ask) return kvm_seterr(KVM_EINTERNAL, "c2c docs: item %s has no 'Ask:' line", it.id);
    char blind[sizeof it.user];
    memcpy(blind, it.user, sizeof blind);
    int facts = 1, digits = 0;
    for (char *p = blind; p < blind + (ask - it.user); p++) {
        if (*p == '\n') facts++;
        if (*p >= '0' && *p <= '9') {
            *p = '#';
            digits++;
        }
    }
    if (digits != 4 * facts || strlen(it.answer) != 4)
        return kvm_seterr(KVM_EINTERNAL, "c2c docs: item %s: %d value digits for %d facts", it.id, digits, facts);
    d->i = i;
    d->facts = facts;
    memcpy(d->answer_text, it.answer, 5);
    for (int k = 0; k < 4; k++) d->answer[k] = g->digit_id[it.answer[k] - '0'];
    int nb = 0;
    rc = encode(g, it.system, it.user, &d->sharer, &d->n);
    if (!rc) rc = encode(g, it.system, blind, &d->receiver, &nb);
    if (rc) {
        lab_c2c_doc_clear(d);
        return kvm_errctx(rc, "c2c docs: item %s", it.id);
    }
    /* Blinding must keep the length and change exactly the value digits, each a single digit token into '#': then
     * every other token is the same string on both sides, so the offsets agree and the changed tokens are exactly
     * the 4 * facts value digits of the text. */
    int changed = 0;
    bool ok = nb == d->n;
    for (int k = 0; ok && k < d->n; k++) {
        if (d->sharer[k] == d->receiver[k]) continue;
        bool digit = false;
        for (int v = 0; v < 10; v++) digit |= d->sharer[k] == g->digit_id[v];
        ok = digit && d->receiver[k] == g->hash_id;
        changed++;
    }
    if (!ok || changed != digits) {
        int n = d->n;
        lab_c2c_doc_clear(d);
        return kvm_seterr(KVM_EMODEL,
                          "c2c docs: item %s: blinding the values does not replace exactly their %d digit tokens by '#' "
                          "(%d and %d tokens, %d changed): this tokenizer merges digits or '#' with their neighbours",
                          it.id, digits, n, nb, changed);
    }
    return 0;
}

static int write_ids(FILE *f, const char *key, const int32_t *ids, int n) {
    int rc = fprintf(f, ",\"%s\":[", key) < 0;
    for (int k = 0; k < n; k++) rc |= fprintf(f, k ? ",%d" : "%d", (int)ids[k]) < 0;
    rc |= fputc(']', f) == EOF;
    return rc;
}

int lab_c2c_doc_write(FILE *f, const lab_c2c_doc_t *d) {
    int rc = fprintf(f, "{\"i\":%llu,\"facts\":%d,\"n\":%d,\"n_fuse\":%d", (unsigned long long)d->i, d->facts, d->n,
                     d->n - 1) < 0;
    rc |= write_ids(f, "sharer", d->sharer, d->n);
    rc |= write_ids(f, "receiver", d->receiver, d->n);
    rc |= write_ids(f, "answer", d->answer, 4);
    rc |= fprintf(f, ",\"answer_text\":\"%s\"}\n", d->answer_text) < 0;
    return rc ? kvm_seterr(KVM_EIO, "c2c docs: write failed") : 0;
}

/* A non-negative integer field of o (at most max), or -1 with a message. */
static long long int_field(const cJSON *o, const char *key, long long max) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v) return kvm_seterr(KVM_EFORMAT, "field '%s' is missing", key), -1;
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > (double)max || v->valuedouble != (double)(long long)v->valuedouble)
        return kvm_seterr(KVM_EFORMAT, "field '%s' is not an integer in [0, %lld]", key, max), -1;
    return (long long)v->valuedouble;
}

/* An id list field of o with exactly n entries, each in [0, vocab) (vocab > 0) or >= 0, into a malloc'ed array. */
static int ids_field(const cJSON *o, const char *key, int n, int vocab, int32_t **out) {
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!a) return kvm_seterr(KVM_EFORMAT, "field '%s' is missing", key);
    if (!cJSON_IsArray(a)) return kvm_seterr(KVM_EFORMAT, "field '%s' is not a list of token ids", key);
    if (cJSON_GetArraySize(a) != n)
        return kvm_seterr(KVM_EFORMAT, "field '%s' has %d ids, expected %d", key, cJSON_GetArraySize(a), n);
    int32_t *ids = malloc((size_t)(n > 0 ? n : 1) * sizeof *ids);
    if (!ids) return kvm_seterr(KVM_ENOMEM, "out of memory");
    int k = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, a) {
        double x = cJSON_IsNumber(v) ? v->valuedouble : -1;
        if (x < 0 || x != (double)(int32_t)x || (vocab > 0 && x >= vocab)) {
            free(ids);
            if (vocab > 0) return kvm_seterr(KVM_EFORMAT, "field '%s': entry %d is not a token id in [0, %d)", key, k, vocab);
            return kvm_seterr(KVM_EFORMAT, "field '%s': entry %d is not a token id", key, k);
        }
        ids[k++] = (int32_t)x;
    }
    *out = ids;
    return 0;
}

static const char *const doc_keys[] = {"i", "facts", "n", "n_fuse", "sharer", "receiver", "answer", "answer_text"};

int lab_c2c_doc_parse(const char *line, int vocab, int32_t hash_id, lab_c2c_doc_t *d) {
    memset(d, 0, sizeof *d);
    cJSON *o = cJSON_Parse(line);
    if (!o || !cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return kvm_seterr(KVM_EFORMAT, "not a JSON object");
    }
    int rc = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, o) {
        bool known = false;
        for (size_t k = 0; k < sizeof doc_keys / sizeof doc_keys[0]; k++) known |= c->string && !strcmp(c->string, doc_keys[k]);
        if (!known) {
            rc = kvm_seterr(KVM_EFORMAT, "unknown field '%s'", c->string ? c->string : "");
            goto out;
        }
    }
    long long i = int_field(o, "i", (1LL << 53)), facts = int_field(o, "facts", 48), n = int_field(o, "n", 1 << 20),
              nf = int_field(o, "n_fuse", 1 << 20);
    if (i < 0 || facts < 0 || n < 0 || nf < 0) {
        rc = KVM_EFORMAT;
        goto out;
    }
    if (n < 2 || nf != n - 1) {
        rc = kvm_seterr(KVM_EFORMAT, "fields 'n' (%lld) and 'n_fuse' (%lld): need n >= 2 and n_fuse = n - 1", n, nf);
        goto out;
    }
    d->i = (uint64_t)i;
    d->facts = (int)facts;
    d->n = (int)n;
    int32_t *ans = NULL;
    if ((rc = ids_field(o, "sharer", d->n, vocab, &d->sharer)) || (rc = ids_field(o, "receiver", d->n, vocab, &d->receiver)) ||
        (rc = ids_field(o, "answer", 4, vocab, &ans)))
        goto out;
    memcpy(d->answer, ans, sizeof d->answer);
    free(ans);
    const cJSON *at = cJSON_GetObjectItemCaseSensitive(o, "answer_text");
    if (!cJSON_IsString(at) || strlen(at->valuestring) != 4 || strspn(at->valuestring, "0123456789") != 4) {
        rc = kvm_seterr(KVM_EFORMAT, "field 'answer_text' is not a string of 4 digits");
        goto out;
    }
    memcpy(d->answer_text, at->valuestring, 5);
    for (int k = 0; hash_id >= 0 && k < d->n; k++)
        if (d->sharer[k] != d->receiver[k] && d->receiver[k] != hash_id) {
            rc = kvm_seterr(KVM_EFORMAT, "fields 'sharer' and 'receiver' differ at token %d where the receiver has no '#' (%d)",
                            k, (int)hash_id);
            goto out;
        }
out:
    cJSON_Delete(o);
    if (rc) lab_c2c_doc_clear(d);
    return rc;
}
