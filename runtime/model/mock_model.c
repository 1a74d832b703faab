/* mock_model.c - a model without weights: a word vocabulary and a forward pass that echoes (see
 * mock_model.h). */
#include "mock_model.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include "forward.h"

enum { MOCK_BOS = 0, MOCK_EOS = 1, MOCK_FIRST_WORD = 2 };
/* the three ids of word w: MOCK_FIRST_WORD + 3 * w + kind */
enum { KIND_SYSTEM = 0, KIND_USER = 1, KIND_SAID = 2 };

typedef struct mock {
    bool fail;
    char **words;            /* [n_words] owned */
    int n_words;
    int32_t *slots;          /* [cap_slots] open addressing: word index + 1, 0 = empty */
    size_t cap_slots;        /* power of two, twice KVM_MOCK_MAX_WORDS */
} mock_t;

static bool is_word_id(int32_t id) { return id >= MOCK_FIRST_WORD && id < MOCK_FIRST_WORD + 3 * KVM_MOCK_MAX_WORDS; }
static int kind_of(int32_t id) { return (id - MOCK_FIRST_WORD) % 3; }
static int word_of(int32_t id) { return (id - MOCK_FIRST_WORD) / 3; }
static int32_t id_of(int w, int kind) { return MOCK_FIRST_WORD + 3 * w + kind; }

/* The index of word s[0..n), numbered now if new; -1 (KVM_ERANGE, message) when the vocabulary is full. */
static int intern(mock_t *mk, const char *s, size_t n) {
    size_t mask = mk->cap_slots - 1, i = kvm_hash64(s, n, KVM_HASH_SEED) & mask;
    for (; mk->slots[i]; i = (i + 1) & mask) {
        const char *w = mk->words[mk->slots[i] - 1];
        if (strlen(w) == n && !memcmp(w, s, n)) return mk->slots[i] - 1;
    }
    if (mk->n_words == KVM_MOCK_MAX_WORDS) {
        kvm_seterr(KVM_ERANGE, "mock model: more than %d different words", KVM_MOCK_MAX_WORDS);
        return -1;
    }
    char *w = kvm_malloc(n + 1);
    if (!w) {
        kvm_seterr(KVM_ENOMEM, "mock model: out of memory adding a word");
        return -1;
    }
    memcpy(w, s, n);
    w[n] = 0;
    mk->words[mk->n_words] = w;
    mk->slots[i] = ++mk->n_words;
    return mk->n_words - 1;
}

/* Appends the ids (of kind) of the words of text to ids[*n..] (room for strlen(text) / 2 + 1 more). */
static int encode_words(mock_t *mk, const char *text, int kind, int32_t *ids, int *n) {
    for (const char *p = text ? text : ""; *p;) {
        while (*p && isspace((unsigned char)*p)) p++;
        if (!*p) break;
        const char *e = p;
        while (*e && !isspace((unsigned char)*e)) e++;
        int w = intern(mk, p, (size_t)(e - p));
        if (w < 0) return kvm_errcode();
        ids[(*n)++] = id_of(w, kind);
        p = e;
    }
    return 0;
}

static int mock_encode(const kvm_model_t *m, const char *system, const char *user, int32_t **ids, int *n) {
    mock_t *mk = m->impl_state;
    size_t room = (system ? strlen(system) : 0) / 2 + (user ? strlen(user) : 0) / 2 + 3;
    int32_t *v = kvm_malloc(room * sizeof *v);
    if (!v) return kvm_seterr(KVM_ENOMEM, "mock model: out of memory encoding a prompt");
    int k = 0;
    int rc = encode_words(mk, system, KIND_SYSTEM, v, &k);
    if (!rc) rc = encode_words(mk, user, KIND_USER, v, &k);
    if (rc) {
        kvm_free(v);
        return rc;
    }
    if (k == 0) v[k++] = MOCK_BOS; /* a prompt has at least one token */
    *ids = v;
    *n = k;
    return 0;
}

static int mock_token_bytes(const kvm_model_t *m, int32_t prev, int32_t id, char *buf, size_t cap) {
    const mock_t *mk = m->impl_state;
    if (!is_word_id(id) || word_of(id) >= mk->n_words) return 0; /* BOS, EOS */
    const char *w = mk->words[word_of(id)];
    bool space = is_word_id(prev) && kind_of(prev) == KIND_SAID;
    int n = snprintf(buf, cap, "%s%s", space ? " " : "", w);
    return n < (int)cap ? n : kvm_seterr(KVM_ERANGE, "mock model: word of %zu bytes, buffer holds %zu", strlen(w), cap);
}

/* What the echo says after toks[0..n): the next user word not yet said, else EOS. */
static int32_t echo_next(const int32_t *toks, int n) {
    int said = 0;
    for (int i = 0; i < n; i++) said += is_word_id(toks[i]) && kind_of(toks[i]) == KIND_SAID;
    for (int i = 0; i < n; i++)
        if (is_word_id(toks[i]) && kind_of(toks[i]) == KIND_USER && said-- == 0) return toks[i] + 1; /* its said id */
    return MOCK_EOS;
}

static void put_logits(float *row, int vocab, int32_t id) {
    for (int v = 0; v < vocab; v++) row[v] = -1e9f;
    row[id] = 0;
}

/* Checks every item before any sequence changes (as kvm_forward does). */
static int check_items(const kvm_model_t *m, const kvm_batch_item_t *items, int n_items) {
    const mock_t *mk = m->impl_state;
    if (mk->fail) return kvm_seterr(KVM_EIO, "mock:fail model: failure requested by the model name");
    for (int i = 0; i < n_items; i++) {
        const kvm_batch_item_t *it = &items[i];
        if (!it->seq || it->n_tokens <= 0 || !it->tokens)
            return kvm_seterr(KVM_EINVAL, "forward: batch item %d has no tokens or no sequence", i);
        if (it->positions)
            return kvm_seterr(KVM_EUNSUPPORTED, "mock model: batch item %d recomputes positions; the mock keeps no KV to recompute", i);
        for (int t = 0; t < it->n_tokens; t++)
            if (it->tokens[t] < 0 || it->tokens[t] >= m->cfg.vocab_size)
                return kvm_seterr(KVM_ERANGE, "forward: batch item %d token %d has id %d, outside the vocabulary [0, %d)", i, t,
                                  it->tokens[t], m->cfg.vocab_size);
        if (it->seq->n_tokens + it->n_tokens > m->cfg.max_seq_len)
            return kvm_seterr(KVM_ERANGE, "forward: batch item %d reaches position %d, beyond the context of %d", i,
                              it->seq->n_tokens + it->n_tokens - 1, m->cfg.max_seq_len);
    }
    return 0;
}

static int mock_forward(kvm_model_t *m, kvm_batch_item_t *items, int n_items) {
    int rc = check_items(m, items, n_items);
    for (int i = 0; !rc && i < n_items; i++) {
        rc = kvm_seq_reserve(items[i].seq, items[i].seq->n_tokens + items[i].n_tokens);
        for (int j = 0; rc && j < i; j++) { /* give back what the earlier items reserved */
            kvm_seq_t *s = items[j].seq;
            while (s->n_blocks > (s->n_tokens + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK) kvm_kv_block_unref(s->pool, s->blocks[--s->n_blocks]);
        }
    }
    for (int i = 0; !rc && i < n_items; i++) {
        kvm_batch_item_t *it = &items[i];
        int n0 = it->seq->n_tokens;
        rc = kvm_seq_push_tokens(it->seq, it->tokens, it->n_tokens);
        int rows = it->all_logits ? it->n_tokens : 1;
        for (int r = 0; !rc && r < rows; r++) {
            int32_t next = echo_next(it->seq->tokens, it->all_logits ? n0 + r + 1 : it->seq->n_tokens);
            if (it->logits) put_logits(it->logits + (size_t)r * m->cfg.vocab_size, m->cfg.vocab_size, next);
            if (it->next_token && r == rows - 1) *it->next_token = next;
        }
    }
    return rc;
}

static void mock_free(kvm_model_t *m) {
    mock_t *mk = m->impl_state;
    if (!mk) return;
    for (int i = 0; i < mk->n_words; i++) kvm_free(mk->words[i]);
    kvm_free(mk->words);
    kvm_free(mk->slots);
    kvm_free(mk);
    m->impl_state = NULL;
}

static const kvm_model_impl_t mock_impl = {
    .forward = mock_forward, .encode = mock_encode, .token_bytes = mock_token_bytes, .free = mock_free};

bool kvm_model_is_mock(const kvm_model_t *m) { return m && m->impl == &mock_impl; }

kvm_model_t *kvm_model_mock(const char *spec) {
    bool fail = spec && !strcmp(spec, "fail");
    if (!spec || (!fail && strcmp(spec, "echo"))) {
        kvm_seterr(KVM_EINVAL, "mock model 'mock:%s': unknown; there are mock:echo and mock:fail", spec ? spec : "");
        return NULL;
    }
    kvm_model_t *m = kvm_calloc(1, sizeof *m);
    mock_t *mk = kvm_calloc(1, sizeof *mk);
    if (!m || !mk) {
        kvm_free(m);
        kvm_free(mk);
        return NULL;
    }
    m->impl = &mock_impl;
    m->impl_state = mk;
    mk->fail = fail;
    mk->cap_slots = 2 * KVM_MOCK_MAX_WORDS;
    mk->words = kvm_calloc(KVM_MOCK_MAX_WORDS, sizeof *mk->words);
    mk->slots = kvm_calloc(mk->cap_slots, sizeof *mk->slots);
    snprintf(m->name, sizeof m->name, "mock:%s", spec);
    m->path = kvm_strdup(m->name);
    kvm_config_t *c = &m->cfg;
    snprintf(c->arch_name, sizeof c->arch_name, "mock");
    c->dim = c->hidden_dim = c->head_dim = 2;
    c->n_layers = c->n_heads = c->n_kv_heads = 1;
    c->vocab_size = MOCK_FIRST_WORD + 3 * KVM_MOCK_MAX_WORDS;
    c->max_seq_len = 8192;
    c->rms_eps = 1e-5f;
    c->rope_theta = 10000.0;
    c->bos_id = MOCK_BOS;
    c->eos_ids[0] = MOCK_EOS;
    c->n_eos = 1;
    c->pad_id = -1;
    c->weight_dtype = KVM_F32;
    m->model_id = kvm_hash64(m->name, strlen(m->name), KVM_HASH_SEED);
    m->ops = kvm_ops_cpu();
    int rc = !mk->words || !mk->slots || !m->path ? KVM_ENOMEM : kvm_model_build_rope(m); /* runtime/comm wants one */
    if (rc) {
        if (rc == KVM_ENOMEM) kvm_seterr(rc, "mock model: out of memory");
        kvm_model_free(m);
        return NULL;
    }
    return m;
}
