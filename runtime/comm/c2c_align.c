/* c2c_align.c - C2C token alignment across tokenizers (../shared/spec/c2c.md §4) and the aligned-mode prefill
 * (spec §5, §6): see c2c_align.h for the rules and for what the engine cannot do exactly (pads). */
#include "c2c_align.h"

#include <stdlib.h>
#include <string.h>

#include "../core/core.h"
#include "../kv/kv.h"

#define C2C_SENTINEL '\x1e' /* stands for a message's content while a conversation is rendered */

void kvm_c2c_aligned_free(kvm_c2c_aligned_t *a) {
    if (!a) return;
    kvm_free(a->r_ids), kvm_free(a->s_ids), kvm_free(a->fuse), kvm_free(a->r_pad), kvm_free(a->s_pad);
    kvm_free(a->sec_start), kvm_free(a->sec_message);
    memset(a, 0, sizeof *a);
}

kvm_c2c_strategy_t kvm_c2c_strategy_of(const char *token_alignment) {
    if (token_alignment && !strcmp(token_alignment, "first")) return KVM_C2C_ALIGN_FIRST;
    if (token_alignment && !strcmp(token_alignment, "longest")) return KVM_C2C_ALIGN_LONGEST;
    return 0;
}

static bool c2c_valid(const kvm_c2c_align_side_t *sd, int32_t id) {
    return id >= 0 && id < kvm_tokenizer_vocab_size(sd->tok);
}

/* Characters (code points) of a valid UTF-8 string: Python's len() of the decoded string. */
static size_t c2c_chars(const char *p, size_t len) {
    size_t n = 0;
    for (size_t i = 0; i < len; i++) n += ((unsigned char)p[i] & 0xC0) != 0x80;
    return n;
}

/* The single id decoded alone, special tokens kept, no space clean-up (the tokenizer's own decoder). */
static int c2c_decode1(const kvm_c2c_align_side_t *sd, int32_t id, char **out, size_t *len) {
    return kvm_detokenize(sd->tok, &id, 1, false, out, len);
}

static bool c2c_special(const kvm_c2c_align_side_t *r, int32_t id) {
    return kvm_tokenizer_is_special(r->tok, id) || id == r->pad || id == r->eos || id == r->bos || id == r->unk;
}

/* kvm_c2c_map_token; *n_cand = how many ids the re-encoding gave (-1 for a special token). */
static int c2c_map(const kvm_c2c_align_side_t *r, const kvm_c2c_align_side_t *s, int32_t rid,
                   kvm_c2c_strategy_t strategy, int32_t *sid, int *n_cand) {
    const int32_t fallback = c2c_valid(s, s->unk) ? s->unk : 0;
    if (!c2c_valid(r, rid)) return kvm_seterr(KVM_EINVAL, "c2c align: receiver id %d is not in its vocabulary", rid);
    if (strategy != KVM_C2C_ALIGN_FIRST && strategy != KVM_C2C_ALIGN_LONGEST)
        return kvm_seterr(KVM_EINVAL, "c2c align: strategy %d is not first or longest", (int)strategy);
    char *text = NULL;
    size_t tlen = 0;
    int rc = c2c_decode1(r, rid, &text, &tlen);
    if (rc) return rc;
    *n_cand = -1;
    /* special tokens: by role, then by string (the receiver's role ids count as special) */
    if (c2c_special(r, rid)) {
        const int32_t roles[4][2] = {{r->pad, s->pad}, {r->eos, s->eos}, {r->bos, s->bos}, {r->unk, s->unk}};
        int32_t id = -1;
        for (int k = 0; k < 4 && id < 0; k++)
            if (rid == roles[k][0] && c2c_valid(s, roles[k][1])) id = roles[k][1];
        if (id < 0) id = kvm_tokenizer_find(s->tok, text);
        kvm_free(text);
        *sid = c2c_valid(s, id) ? id : fallback;
        return 0;
    }
    /* a message token: decoded alone, re-encoded with the sharer's tokenizer */
    int32_t *ids = NULL;
    int n = 0;
    rc = kvm_tokenize(s->tok, text, tlen, KVM_TOK_PARSE_SPECIAL, &ids, &n);
    kvm_free(text);
    if (rc) return kvm_errctx(rc, "c2c align: re-encoding receiver id %d with the sharer's tokenizer", rid);
    *n_cand = n;
    *sid = n ? ids[0] : fallback;
    if (n > 1 && strategy == KVM_C2C_ALIGN_LONGEST) {
        size_t best = 0;
        for (int i = 0; i < n && !rc; i++) {
            char *c = NULL;
            size_t clen = 0;
            if ((rc = c2c_decode1(s, ids[i], &c, &clen))) break;
            const size_t chars = c2c_chars(c, clen);
            kvm_free(c);
            if (chars > best) best = chars, *sid = ids[i]; /* strictly longer: the earlier wins a tie */
        }
    }
    kvm_free(ids);
    return rc;
}

int kvm_c2c_map_token(const kvm_c2c_align_side_t *r, const kvm_c2c_align_side_t *s, int32_t rid,
                      kvm_c2c_strategy_t strategy, int32_t *sid) {
    int n_cand;
    return c2c_map(r, s, rid, strategy, sid, &n_cand);
}

/* ---- section alignment --------------------------------------------------------------------------------- */

typedef struct c2c_rows {
    kvm_c2c_aligned_t *a;
    int cap;
} c2c_rows_t;

static int c2c_grow(c2c_rows_t *w, int need) {
    kvm_c2c_aligned_t *a = w->a;
    if (a->n + need <= w->cap) return 0;
    int cap = w->cap ? w->cap : 64;
    while (cap < a->n + need) cap *= 2;
    int32_t *ri = kvm_realloc(a->r_ids, (size_t)cap * sizeof *ri);
    if (ri) a->r_ids = ri;
    int32_t *si = ri ? kvm_realloc(a->s_ids, (size_t)cap * sizeof *si) : NULL;
    if (si) a->s_ids = si;
    uint8_t *fu = si ? kvm_realloc(a->fuse, (size_t)cap) : NULL;
    if (fu) a->fuse = fu;
    uint8_t *rp = fu ? kvm_realloc(a->r_pad, (size_t)cap) : NULL;
    if (rp) a->r_pad = rp;
    uint8_t *sp = rp ? kvm_realloc(a->s_pad, (size_t)cap) : NULL;
    if (!sp) return kvm_seterr(KVM_ENOMEM, "c2c align: out of memory for %d rows", cap);
    a->s_pad = sp;
    w->cap = cap;
    return 0;
}

static void c2c_row(kvm_c2c_aligned_t *a, int32_t r, int32_t s, bool fuse, bool rpad, bool spad) {
    a->r_ids[a->n] = r, a->s_ids[a->n] = s, a->fuse[a->n] = fuse, a->r_pad[a->n] = rpad, a->s_pad[a->n] = spad;
    a->r_pads += rpad, a->s_pads += spad;
    a->n++;
}

static int c2c_encode(const kvm_c2c_align_side_t *sd, const char *who, const kvm_c2c_section_t *sec, int i,
                      int32_t **ids, int *n) {
    const int flags = KVM_TOK_PARSE_SPECIAL | (i == 0 && sd->add_bos ? KVM_TOK_ADD_BOS : 0);
    int rc = kvm_tokenize(sd->tok, sec->text, sec->len, flags, ids, n);
    return rc ? kvm_errctx(rc, "c2c align: the %s's section %d", who, i) : 0;
}

static int c2c_align_one(const kvm_c2c_align_side_t *r, const kvm_c2c_section_t *rs, const kvm_c2c_align_side_t *s,
                         const kvm_c2c_section_t *ss, int i, kvm_c2c_strategy_t strategy, c2c_rows_t *w) {
    kvm_c2c_aligned_t *a = w->a;
    int32_t *ri = NULL, *si = NULL;
    int nr = 0, ns = 0, rc;
    if ((rc = c2c_encode(r, "receiver", rs, i, &ri, &nr))) return rc;
    if (rs->message) {
        if ((rc = c2c_grow(w, nr))) goto out;
        for (int t = 0; t < nr && !rc; t++) {
            int32_t sid = 0;
            int n_cand = 0;
            if ((rc = c2c_map(r, s, ri[t], strategy, &sid, &n_cand))) break;
            a->mapped_special += n_cand < 0;
            a->mapped_several += n_cand > 1;
            a->mapped_empty += n_cand == 0;
            c2c_row(a, ri[t], sid, true, false, false);
        }
        goto out;
    }
    if ((rc = c2c_encode(s, "sharer", ss, i, &si, &ns))) goto out;
    const int len = nr > ns ? nr : ns;
    if (nr < len && !c2c_valid(r, r->pad)) {
        rc = kvm_seterr(KVM_EINVAL, "c2c align: template section %d is %d tokens for the receiver and %d for the sharer, "
                        "and the receiver has no pad token to pad it (spec §4)", i, nr, ns);
        goto out;
    }
    if (ns < len && !c2c_valid(s, s->pad)) {
        rc = kvm_seterr(KVM_EINVAL, "c2c align: template section %d is %d tokens for the receiver and %d for the sharer, "
                        "and the sharer has no pad token to pad it (spec §4)", i, nr, ns);
        goto out;
    }
    if ((rc = c2c_grow(w, len))) goto out;
    for (int t = 0; t < len; t++)
        c2c_row(a, t < nr ? ri[t] : r->pad, t < ns ? si[t] : s->pad, false, t >= nr, t >= ns);
out:
    kvm_free(ri), kvm_free(si);
    return rc;
}

int kvm_c2c_align_sections(const kvm_c2c_align_side_t *r, const kvm_c2c_section_t *rsec, int nr,
                           const kvm_c2c_align_side_t *s, const kvm_c2c_section_t *ssec, int ns,
                           kvm_c2c_strategy_t strategy, kvm_c2c_aligned_t *out) {
    if (!out) return kvm_seterr(KVM_EINVAL, "c2c align: no output");
    memset(out, 0, sizeof *out);
    if (!r || !s || !r->tok || !s->tok || (nr && !rsec) || (ns && !ssec) || nr < 0 || ns < 0)
        return kvm_seterr(KVM_EINVAL, "c2c align: both sides need a tokenizer and their sections");
    if (strategy != KVM_C2C_ALIGN_FIRST && strategy != KVM_C2C_ALIGN_LONGEST)
        return kvm_seterr(KVM_EINVAL, "c2c align: strategy %d is not first or longest", (int)strategy);
    if (nr != ns)
        return kvm_seterr(KVM_EINVAL, "c2c align: the receiver's rendering has %d sections and the sharer's %d (spec §4: "
                          "the section counts must match)", nr, ns);
    for (int i = 0; i < nr; i++) {
        if (rsec[i].message != ssec[i].message)
            return kvm_seterr(KVM_EINVAL, "c2c align: section %d is a %s for the receiver but a %s for the sharer (spec §4)",
                              i, rsec[i].message ? "message" : "template", ssec[i].message ? "message" : "template");
        if (rsec[i].message && (rsec[i].len != ssec[i].len || memcmp(rsec[i].text, ssec[i].text, rsec[i].len)))
            return kvm_seterr(KVM_EINVAL, "c2c align: message section %d differs between the receiver's and the sharer's "
                              "rendering", i);
    }
    kvm_c2c_aligned_t *a = out;
    a->strategy = strategy;
    a->n_sections = nr;
    a->sec_start = kvm_malloc((size_t)(nr + 1) * sizeof *a->sec_start);
    a->sec_message = kvm_malloc((size_t)(nr ? nr : 1));
    c2c_rows_t w = {.a = a};
    int rc = a->sec_start && a->sec_message ? c2c_grow(&w, 1) : kvm_seterr(KVM_ENOMEM, "c2c align: out of memory");
    for (int i = 0; i < nr && !rc; i++) {
        a->sec_start[i] = a->n;
        a->sec_message[i] = rsec[i].message;
        rc = c2c_align_one(r, &rsec[i], s, &ssec[i], i, strategy, &w);
    }
    if (rc) {
        kvm_c2c_aligned_free(a);
        return rc;
    }
    a->sec_start[nr] = a->n;
    for (int t = a->n - 1; t >= 0 && a->r_pad[t]; t--) a->r_pads_trailing++;
    const int last = nr ? a->sec_start[nr - 1] : 0;
    for (int t = 0; t < last; t++) a->s_pads_run += a->s_pad[t];
    return 0;
}

/* ---- conversations ------------------------------------------------------------------------------------- */

/* Renders msgs with each content replaced by the sentinel and cuts the text there: *secs (kvm_malloc; the texts
 * point into *text and into msgs) alternates template, message, ..., template: 2n + 1 sections. */
static int c2c_sections(kvm_chat_format_t fmt, const char *who, const kvm_chat_msg_t *msgs, int n, bool add_gen,
                        char **text, kvm_c2c_section_t **secs) {
    *text = NULL, *secs = NULL;
    kvm_chat_msg_t *m = kvm_malloc((size_t)(n ? n : 1) * sizeof *m);
    kvm_c2c_section_t *sec = kvm_malloc((size_t)(2 * n + 1) * sizeof *sec);
    static const char sentinel[2] = {C2C_SENTINEL, 0};
    int rc = m && sec ? 0 : kvm_seterr(KVM_ENOMEM, "c2c align: out of memory");
    for (int i = 0; i < n && !rc; i++) {
        if (msgs[i].role && strchr(msgs[i].role, C2C_SENTINEL))
            rc = kvm_seterr(KVM_EINVAL, "c2c align: message %d's role holds the byte 0x1E", i);
        m[i] = (kvm_chat_msg_t){msgs[i].role, sentinel};
    }
    if (!rc) rc = kvm_chat_render(fmt, m, n, add_gen, text);
    int k = 0;
    const char *p = *text;
    for (int i = 0; !rc && i <= n; i++) {
        const char *e = i < n ? strchr(p, C2C_SENTINEL) : p + strlen(p);
        if (!e || (i == n && strchr(p, C2C_SENTINEL))) {
            rc = kvm_seterr(KVM_EINVAL, "c2c align: the %s's chat format (%s) does not hold each of the %d messages "
                            "once", who, kvm_chat_format_name(fmt), n);
            break;
        }
        sec[k++] = (kvm_c2c_section_t){p, (size_t)(e - p), false};
        if (i < n) {
            const char *c = msgs[i].content ? msgs[i].content : "";
            sec[k++] = (kvm_c2c_section_t){c, strlen(c), true};
            p = e + 1;
        }
    }
    kvm_free(m);
    if (rc) {
        kvm_free(sec), kvm_free(*text);
        *text = NULL;
        return rc;
    }
    *secs = sec;
    return 0;
}

int kvm_c2c_align_chat(const kvm_c2c_align_side_t *r, kvm_chat_format_t rfmt, const kvm_c2c_align_side_t *s,
                       kvm_chat_format_t sfmt, const kvm_chat_msg_t *msgs, int n, bool add_generation_prompt,
                       kvm_c2c_strategy_t strategy, kvm_c2c_aligned_t *out) {
    if (out) memset(out, 0, sizeof *out);
    if (n < 0 || (n && !msgs)) return kvm_seterr(KVM_EINVAL, "c2c align: no messages");
    char *rt = NULL, *st = NULL;
    kvm_c2c_section_t *rs = NULL, *ss = NULL;
    int rc = c2c_sections(rfmt, "receiver", msgs, n, add_generation_prompt, &rt, &rs);
    if (!rc) rc = c2c_sections(sfmt, "sharer", msgs, n, add_generation_prompt, &st, &ss);
    if (!rc) rc = kvm_c2c_align_sections(r, rs, 2 * n + 1, s, ss, 2 * n + 1, strategy, out);
    kvm_free(rt), kvm_free(st), kvm_free(rs), kvm_free(ss);
    return rc;
}

int kvm_c2c_align_side_of(const kvm_model_t *m, kvm_c2c_align_side_t *side) {
    if (!m || !m->tok) return kvm_seterr(KVM_EINVAL, "c2c align: model %s has no tokenizer", m ? m->name : "(null)");
    const kvm_tokenizer_t *t = m->tok;
    *side = (kvm_c2c_align_side_t){.tok = t, .pad = m->cfg.pad_id, .eos = kvm_tokenizer_eos(t),
                                   .bos = kvm_tokenizer_bos(t), .unk = kvm_tokenizer_unk(t), .add_bos = m->cfg.add_bos};
    if (!c2c_valid(side, side->pad)) side->pad = side->eos;
    return 0;
}

/* The strategy of an aligned-mode fuser and the two models' sides; KVM_EINVAL for an identity fuser. */
static int c2c_fuser_sides(const kvm_c2c_fuser_t *f, const kvm_model_t *receiver, const kvm_model_t *sharer,
                           kvm_c2c_strategy_t *strategy, kvm_c2c_align_side_t *r, kvm_c2c_align_side_t *s) {
    *strategy = kvm_c2c_strategy_of(f->cfg.token_alignment);
    if (!*strategy)
        return kvm_seterr(KVM_EINVAL, "%s: token_alignment '%s' aligns nothing (one id list for both models: "
                          "kvm_c2c_prefill)", f->json_path, f->cfg.token_alignment);
    int rc = kvm_c2c_align_side_of(receiver, r);
    return rc ? rc : kvm_c2c_align_side_of(sharer, s);
}

int kvm_c2c_align_models(const kvm_c2c_fuser_t *f, const kvm_model_t *receiver, const kvm_model_t *sharer,
                         const kvm_chat_msg_t *msgs, int n, kvm_c2c_aligned_t *out) {
    if (out) memset(out, 0, sizeof *out);
    if (!f || !receiver || !sharer || !out) return kvm_seterr(KVM_EINVAL, "c2c align: a fuser and both models are needed");
    kvm_c2c_strategy_t strategy;
    kvm_c2c_align_side_t r, s;
    int rc = c2c_fuser_sides(f, receiver, sharer, &strategy, &r, &s);
    if (!rc)
        rc = kvm_c2c_align_chat(&r, receiver->cfg.chat_format, &s, sharer->cfg.chat_format, msgs, n, true, strategy, out);
    return rc;
}

int kvm_c2c_align_span(const kvm_c2c_fuser_t *f, const kvm_model_t *receiver, const kvm_model_t *sharer,
                       const int32_t *r_ids, int n, int at, int len, const char *s_head, size_t s_head_len,
                       kvm_c2c_aligned_t *out) {
    if (out) memset(out, 0, sizeof *out);
    if (!f || !receiver || !sharer || !out || !r_ids || !s_head)
        return kvm_seterr(KVM_EINVAL, "c2c align: a fuser, both models, the receiver's ids and the sharer's head are needed");
    if (at < 0 || len <= 0 || at + len >= n)
        return kvm_seterr(KVM_EINVAL, "c2c align: the message rows [%d, %d) must lie inside the %d-token prompt with "
                          "at least one token after them", at, at + len, n);
    kvm_c2c_strategy_t strategy;
    kvm_c2c_align_side_t r, s;
    int rc = c2c_fuser_sides(f, receiver, sharer, &strategy, &r, &s);
    if (rc) return rc;
    kvm_c2c_aligned_t *a = out;
    a->strategy = strategy;
    a->n_sections = 3;
    a->sec_start = kvm_malloc(4 * sizeof *a->sec_start);
    a->sec_message = kvm_malloc(3);
    c2c_rows_t w = {.a = a};
    int32_t *si = NULL;
    int ns = 0;
    const kvm_c2c_section_t head = {s_head, s_head_len, false};
    rc = a->sec_start && a->sec_message ? 0 : kvm_seterr(KVM_ENOMEM, "c2c align: out of memory");
    if (!rc) rc = c2c_encode(&s, "sharer", &head, 0, &si, &ns);
    const int h = at > ns ? at : ns;
    if (!rc && at < h && !c2c_valid(&r, r.pad))
        rc = kvm_seterr(KVM_EINVAL, "c2c align: the text before the message is %d tokens for the receiver and %d for the "
                        "sharer, and the receiver has no pad token to pad it (spec §4)", at, ns);
    if (!rc && ns < h && !c2c_valid(&s, s.pad))
        rc = kvm_seterr(KVM_EINVAL, "c2c align: the text before the message is %d tokens for the receiver and %d for the "
                        "sharer, and the sharer has no pad token to pad it (spec §4)", at, ns);
    if (!rc) rc = c2c_grow(&w, h + n - at); /* every row: h, then the message's and the rest's */
    if (!rc) { /* section 0: each model's own tokens of the text before the message, the shorter side padded */
        a->sec_start[0] = 0, a->sec_message[0] = 0;
        for (int t = 0; t < h; t++) c2c_row(a, t < at ? r_ids[t] : r.pad, t < ns ? si[t] : s.pad, false, t >= at, t >= ns);
        a->sec_start[1] = a->n, a->sec_message[1] = 1;
    }
    for (int t = at; !rc && t < at + len; t++) { /* section 1: the message, token by token */
        int32_t sid = 0;
        int n_cand = 0;
        if ((rc = c2c_map(&r, &s, r_ids[t], strategy, &sid, &n_cand))) break;
        a->mapped_special += n_cand < 0;
        a->mapped_several += n_cand > 1;
        a->mapped_empty += n_cand == 0;
        c2c_row(a, r_ids[t], sid, true, false, false);
    }
    if (!rc) { /* section 2: the rest of the prompt, the receiver's alone (the sharer side is never run) */
        a->sec_start[2] = a->n, a->sec_message[2] = 0;
        const int32_t sp = c2c_valid(&s, s.pad) ? s.pad : 0;
        for (int t = at + len; t < n; t++) c2c_row(a, r_ids[t], sp, false, false, true);
        a->sec_start[3] = a->n;
        for (int t = 0; t < a->sec_start[2]; t++) a->s_pads_run += a->s_pad[t];
    }
    kvm_free(si);
    if (rc) kvm_c2c_aligned_free(a);
    return rc;
}

/* ---- the aligned-mode prefill -------------------------------------------------------------------------- */

static double c2c_ms(uint64_t t0) { return (double)(kvm_now_ns() - t0) / 1e6; }

/* Fuses rows [pos, pos + n) of rseq from sseq (both hold them at the same positions). */
static int c2c_fuse_rows(kvm_c2c_fuser_t *f, kvm_seq_t *rseq, kvm_seq_t *sseq, int pos, int n) {
    for (int b = pos / KVM_KV_BLOCK; b <= (pos + n - 1) / KVM_KV_BLOCK; b++)
        if (rseq->pool->refcount[rseq->blocks[b]] != 1)
            return kvm_seterr(KVM_EINVAL, "c2c prefill: block %d of the receiver's sequence is shared; cannot fuse in place", b);
    kvm_c2c_cache_t rv, sv;
    int32_t *rdev = NULL, *sdev = NULL;
    int rc = kvm_c2c_seq_view(f, rseq, &rv, &rdev);
    if (!rc) rc = kvm_c2c_seq_view(f, sseq, &sv, &sdev);
    if (!rc) rc = kvm_c2c_fuse(f, &rv, &sv, pos, n);
    if (rdev) f->ops->free(rdev);
    if (sdev) f->ops->free(sdev);
    return rc;
}

int kvm_c2c_prefill_aligned_head(kvm_c2c_fuser_t *f, kvm_model_t *receiver, kvm_seq_t *rseq, kvm_model_t *sharer,
                                 kvm_kv_pool_t *spool, const kvm_c2c_aligned_t *a, kvm_c2c_stats_t *st) {
    if (!f || !receiver || !rseq || !sharer || !spool || !a)
        return kvm_seterr(KVM_EINVAL, "c2c prefill: a fuser, both models, the receiver's sequence, the sharer's pool "
                          "and an alignment are needed");
    const kvm_c2c_strategy_t strategy = kvm_c2c_strategy_of(f->cfg.token_alignment);
    if (!strategy || strcmp(f->cfg.fuse_tokens, "message_tokens"))
        return kvm_seterr(KVM_EINVAL, "%s: token_alignment '%s' with fuse_tokens '%s' is not aligned mode (spec §4: first "
                          "or longest with message_tokens); use kvm_c2c_prefill", f->json_path, f->cfg.token_alignment,
                          f->cfg.fuse_tokens);
    if (a->strategy != strategy)
        return kvm_seterr(KVM_EINVAL, "%s: the alignment was made with strategy '%s' but the fuser's token_alignment is '%s'",
                          f->json_path, a->strategy == KVM_C2C_ALIGN_FIRST ? "first" : "longest", f->cfg.token_alignment);
    if (receiver->ops != f->ops || sharer->ops != f->ops)
        return kvm_seterr(KVM_EINVAL, "%s: the fuser and both models must be on one backend", f->json_path);
    if (rseq->pool->model_id != receiver->model_id || spool->model_id != sharer->model_id)
        return kvm_seterr(KVM_EINVAL, "%s: the receiver's sequence or the sharer's pool belongs to another model",
                          f->json_path);
    if (rseq->n_tokens)
        return kvm_seterr(KVM_EINVAL, "c2c prefill: the aligned sequence starts at position 0, but the receiver's sequence "
                          "holds %d tokens", rseq->n_tokens);
    bool sane = a->n_sections >= 1 && a->n >= 1 && a->r_ids && a->s_ids && a->r_pad && a->sec_start && a->sec_message &&
                a->sec_start[0] == 0 && a->sec_start[a->n_sections] == a->n;
    for (int i = 0; sane && i < a->n_sections; i++) sane = a->sec_start[i] <= a->sec_start[i + 1];
    if (!sane)
        return kvm_seterr(KVM_EINVAL, "c2c prefill: the alignment has no rows or inconsistent section bounds (make it "
                          "with kvm_c2c_align_models / kvm_c2c_align_chat)");
    const int last = a->n_sections - 1, last0 = a->sec_start[last], n_run = a->n - a->r_pads_trailing;
    for (int t = 0; t < last0; t++)
        if (a->r_pad[t])
            return kvm_seterr(KVM_EUNSUPPORTED, "c2c prefill: the receiver's row %d is a pad (its template section is "
                              "shorter than the sharer's); spec §4 pads are unattended rows that keep their position, and "
                              "kvmesh's attention has no mask, so receiver pads are refused (only the last section's "
                              "trailing pads are dropped)", t);
    if (a->sec_message[last] || n_run <= last0)
        return kvm_seterr(KVM_EINVAL, "c2c prefill: the last section must be template text with at least one receiver "
                          "token (it runs on the receiver alone, spec §5)");
    kvm_c2c_stats_t s = {.pos0 = 0, .n_layers = f->cfg.receiver.n_layers};
    for (int l = 0; l < s.n_layers; l++) s.gates_k_open += f->layers[l][0].open, s.gates_v_open += f->layers[l][1].open;
    kvm_seq_t *sseq = kvm_seq_create(spool);
    if (!sseq) return kvm_seterr(KVM_ENOMEM, "c2c prefill: cannot make the sharer's sequence");
    int rc = 0;
    for (int i = 0; i < last && !rc; i++) {
        const int p = a->sec_start[i], len = a->sec_start[i + 1] - p;
        if (len == 0) continue;
        uint64_t t0 = kvm_now_ns();
        kvm_batch_item_t ri = {.seq = rseq, .tokens = a->r_ids + p, .n_tokens = len};
        kvm_batch_item_t si = {.seq = sseq, .tokens = a->s_ids + p, .n_tokens = len};
        if ((rc = kvm_forward(receiver, &ri, 1))) {
            kvm_errctx(rc, "c2c prefill: receiver '%s', section %d", receiver->name, i);
            break;
        }
        if ((rc = kvm_forward(sharer, &si, 1))) {
            kvm_errctx(rc, "c2c prefill: sharer '%s', section %d", sharer->name, i);
            break;
        }
        if (f->ops->sync) f->ops->sync();
        s.prefill_ms += c2c_ms(t0);
        if (!a->sec_message[i]) continue;
        t0 = kvm_now_ns();
        if ((rc = c2c_fuse_rows(f, rseq, sseq, p, len))) break;
        if (f->ops->sync) f->ops->sync();
        s.fuse_ms += c2c_ms(t0);
        s.fused_tokens += len;
    }
    kvm_seq_destroy(sseq);
    if (rc) kvm_seq_truncate(rseq, 0);
    else if (st) *st = s;
    return rc;
}

int kvm_c2c_prefill_aligned(kvm_c2c_fuser_t *f, kvm_model_t *receiver, kvm_seq_t *rseq, kvm_model_t *sharer,
                            kvm_kv_pool_t *spool, const kvm_c2c_aligned_t *a, float *logits, kvm_c2c_stats_t *st) {
    kvm_c2c_stats_t s = {0};
    int rc = kvm_c2c_prefill_aligned_head(f, receiver, rseq, sharer, spool, a, &s);
    if (rc) return rc;
    const int last0 = a->sec_start[a->n_sections - 1], n_run = a->n - a->r_pads_trailing;
    uint64_t t0 = kvm_now_ns();
    kvm_batch_item_t li = {.seq = rseq, .tokens = a->r_ids + last0, .n_tokens = n_run - last0, .logits = logits};
    if ((rc = kvm_forward(receiver, &li, 1))) {
        kvm_errctx(rc, "c2c prefill: receiver '%s', the last section", receiver->name);
        kvm_seq_truncate(rseq, 0);
        return rc;
    }
    s.rest_ms = c2c_ms(t0);
    if (st) *st = s;
    return 0;
}
