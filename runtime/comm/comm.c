/* comm.c - the comm context, switches, agent templates (kvcomm.md §2.2), shared-content segments (§2.3),
 * requests and prompt assembly (§3.1, §3.2, §3.7, §3.8, §5, §6). Contract in prompt.h; the anchor math
 * is in kvcomm.c. */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm_internal.h"

static double ms_since(uint64_t t0) { return (double)(kvm_now_ns() - t0) / 1e6; }

/* ==== switches ======================================================================================= */

void kvm_kvcomm_config_default(kvm_kvcomm_config_t *c) {
    memset(c, 0, sizeof *c);
    c->enable = true;
    c->rotate = true;
    c->ph_offset = true;
    c->pf_offset = true;
    c->weights = KVM_KVCOMM_W_L2;
    c->criterion = KVM_KVCOMM_CRIT_LENGTH_ENTROPY;
    c->gamma = 0.3f;
    c->max_anchors = 20;
    c->evict_window = 5;
    c->dist_norm = KVM_KVCOMM_DIST_RAW;
    c->frame = KVM_KVCOMM_FRAME_F0;
    c->pool_bound = KVM_KVCOMM_POOL_STRICT;
    c->no_anchor = KVM_KVCOMM_NOANCHOR_DENSE;
    c->resp_last_token = KVM_KVCOMM_RESP_COMPUTE;
}

static int parse_bool(const char *v, bool *out) {
    if (!strcmp(v, "on") || !strcmp(v, "true") || !strcmp(v, "1") || !strcmp(v, "yes")) *out = true;
    else if (!strcmp(v, "off") || !strcmp(v, "false") || !strcmp(v, "0") || !strcmp(v, "no")) *out = false;
    else return -1;
    return 0;
}

static int parse_enum(const char *v, const char *const *names, int n, int *out) {
    for (int i = 0; i < n; i++)
        if (!strcmp(v, names[i])) {
            *out = i;
            return 0;
        }
    return -1;
}

static const char *const W_NAMES[] = {"l2", "nearest", "cosine"};
static const char *const CRIT_NAMES[] = {"length+entropy", "length"};
static const char *const NORM_NAMES[] = {"raw", "per_element"};
static const char *const FRAME_NAMES[] = {"f0", "reference"};
static const char *const BOUND_NAMES[] = {"strict", "reference"};
static const char *const NOANCHOR_NAMES[] = {"dense", "naive"};
static const char *const RESP_NAMES[] = {"compute", "drop"};
static const char *const ALIGN_NAMES[] = {"position", "content"};
static const char *const SELECT_NAMES[] = {"offset", "layer1", "spread"};

int kvm_kvcomm_config_set(kvm_kvcomm_config_t *c, const char *key, const char *value) {
    if (!key || !value) return kvm_seterr(KVM_EINVAL, "kvcomm switch: key and value are required");
    const char *k = !strncmp(key, "kvcomm.", 7) ? key + 7 : key;
    int e = 0, bad = 0;
    char *end = NULL;
#define BOOLSW(name, field)                                                                                   \
    if (!strcmp(k, name)) {                                                                                   \
        if (parse_bool(value, &c->field))                                                                     \
            return kvm_seterr(KVM_EINVAL, "kvcomm.%s: '%s' is not on|off", name, value);                      \
        return 0;                                                                                             \
    }
#define ENUMSW(name, field, tab, list)                                                                        \
    if (!strcmp(k, name)) {                                                                                   \
        if (parse_enum(value, tab, (int)(sizeof tab / sizeof tab[0]), &e))                                    \
            return kvm_seterr(KVM_EINVAL, "kvcomm.%s: '%s' is not one of %s", name, value, list);             \
        c->field = e;                                                                                         \
        return 0;                                                                                             \
    }
    BOOLSW("enable", enable)
    BOOLSW("rotate", rotate)
    BOOLSW("ph_offset", ph_offset)
    BOOLSW("pf_offset", pf_offset)
    BOOLSW("force_reuse", force_reuse)
    ENUMSW("weights", weights, W_NAMES, "l2|nearest|cosine")
    ENUMSW("criterion", criterion, CRIT_NAMES, "length+entropy|length")
    ENUMSW("dist_norm", dist_norm, NORM_NAMES, "raw|per_element")
    ENUMSW("frame", frame, FRAME_NAMES, "f0|reference")
    ENUMSW("pool_bound", pool_bound, BOUND_NAMES, "strict|reference")
    ENUMSW("no_anchor", no_anchor, NOANCHOR_NAMES, "dense|naive")
    ENUMSW("resp_last_token", resp_last_token, RESP_NAMES, "compute|drop")
    ENUMSW("align", align, ALIGN_NAMES, "position|content")
    ENUMSW("recompute_select", recompute_select, SELECT_NAMES, "offset|layer1|spread")
#undef BOOLSW
#undef ENUMSW
    if (!strcmp(k, "gamma")) {
        double g = strtod(value, &end);
        bad = !end || *end || !(g >= 0 && g <= 1e6);
        if (bad) return kvm_seterr(KVM_EINVAL, "kvcomm.gamma: '%s' is not a non-negative number", value);
        c->gamma = (float)g;
        return 0;
    }
    if (!strcmp(k, "max_anchors") || !strcmp(k, "evict_window") || !strcmp(k, "anchor_budget_bytes")) {
        long long v = strtoll(value, &end, 10);
        if (!end || *end || v < 1) return kvm_seterr(KVM_EINVAL, "kvcomm.%s: '%s' is not a positive integer", k, value);
        if (!strcmp(k, "max_anchors")) c->max_anchors = (int)v;
        else if (!strcmp(k, "evict_window")) c->evict_window = (int)v;
        else c->anchor_budget_bytes = (size_t)v;
        return 0;
    }
    if (!strcmp(k, "recompute_below") || !strcmp(k, "recompute_text")) { /* ours: kvm_comm_recompute_short */
        long long v = strtoll(value, &end, 10);
        if (!end || *end || v < 0 || v > 1000000)
            return kvm_seterr(KVM_EINVAL, "kvcomm.%s: '%s' is not a token count >= 0 (0 = off)", k, value);
        *(k[10] == 'b' ? &c->recompute_below : &c->recompute_text) = (int)v;
        return 0;
    }
    if (!strcmp(k, "preset")) { /* spec = the defaults; blend = ours, kvcomm.md §5.2 */
        if (!strcmp(value, "spec")) {
            kvm_kvcomm_config_default(c);
        } else if (!strcmp(value, "blend")) {
            kvm_kvcomm_ablation(c, "full");
            c->align = KVM_KVCOMM_ALIGN_POSITION;
            c->recompute_below = 8;
            c->recompute_text = 64;
            c->recompute_frac = KVM_KVCOMM_BLEND_FRAC;
            c->recompute_select = KVM_KVCOMM_SELECT_SPREAD;
        } else {
            return kvm_seterr(KVM_EINVAL, "kvcomm.preset: '%s' is not one of spec|blend", value);
        }
        return 0;
    }
    if (!strcmp(k, "recompute_frac")) { /* ours: kvm_comm_recompute_short */
        double f = strtod(value, &end);
        if (!end || *end || !(f >= 0 && f <= 1))
            return kvm_seterr(KVM_EINVAL, "kvcomm.recompute_frac: '%s' is not a fraction in [0, 1] (0 = off)", value);
        c->recompute_frac = (float)f;
        return 0;
    }
    if (!strcmp(k, "align_window")) { /* ours: kvcomm.align=content */
        long long v = strtoll(value, &end, 10);
        if (!end || *end || v < 0 || v > 1000000)
            return kvm_seterr(KVM_EINVAL, "kvcomm.align_window: '%s' is not a row count >= 0 (0 = any row)", value);
        c->align_window = (int)v;
        return 0;
    }
    return kvm_seterr(KVM_EINVAL, "unknown KVCOMM switch '%s' (known: enable rotate ph_offset pf_offset weights criterion "
                      "gamma max_anchors evict_window dist_norm frame pool_bound no_anchor resp_last_token force_reuse "
                      "anchor_budget_bytes recompute_below recompute_text recompute_frac recompute_select align align_window preset)", key);
}

int kvm_kvcomm_ablation(kvm_kvcomm_config_t *c, const char *name) {
    if (!strcmp(name, "dense")) c->enable = false;
    else if (!strcmp(name, "rotation")) c->enable = true, c->rotate = true, c->ph_offset = false, c->pf_offset = false;
    else if (!strcmp(name, "rotation+ph")) c->enable = true, c->rotate = true, c->ph_offset = true, c->pf_offset = false;
    else if (!strcmp(name, "rotation+pf")) c->enable = true, c->rotate = true, c->ph_offset = false, c->pf_offset = true;
    else if (!strcmp(name, "full")) c->enable = true, c->rotate = true, c->ph_offset = true, c->pf_offset = true;
    else return kvm_seterr(KVM_EINVAL, "unknown ablation '%s' (dense, rotation, rotation+ph, rotation+pf, full)", name);
    return 0;
}

void kvm_kvcomm_config_str(const kvm_kvcomm_config_t *c, char *buf, size_t cap) {
    snprintf(buf, cap,
             "enable=%s rotate=%s ph_offset=%s pf_offset=%s weights=%s criterion=%s gamma=%.2f V=%d W=%d dist_norm=%s "
             "frame=%s pool_bound=%s no_anchor=%s resp_last_token=%s force_reuse=%s recompute_below=%d recompute_text=%d recompute_frac=%.2f recompute_select=%s "
             "align=%s align_window=%d",
             c->enable ? "on" : "off", c->rotate ? "on" : "off", c->ph_offset ? "on" : "off", c->pf_offset ? "on" : "off",
             W_NAMES[c->weights % 3], CRIT_NAMES[c->criterion % 2], c->gamma, c->max_anchors, c->evict_window,
             NORM_NAMES[c->dist_norm % 2], FRAME_NAMES[c->frame % 2], BOUND_NAMES[c->pool_bound % 2],
             NOANCHOR_NAMES[c->no_anchor % 2], RESP_NAMES[c->resp_last_token % 2], c->force_reuse ? "on" : "off",
             c->recompute_below, c->recompute_text, c->recompute_frac, SELECT_NAMES[c->recompute_select % 3],
             ALIGN_NAMES[c->align % 2], c->align_window);
}

const char *kvm_ph_decision_name(int d) {
    switch (d) {
    case KVM_PH_DENSE: return "dense";
    case KVM_PH_SHARED: return "shared";
    case KVM_PH_NEW_ANCHOR: return "new_anchor";
    case KVM_PH_NO_ANCHOR: return "no_anchor_for_consumer";
    case KVM_PH_NAIVE: return "naive";
    case KVM_PH_EXACT_CTX: return "exact_ctx";
    }
    return "?";
}

/* ==== context ======================================================================================== */

kvm_comm_t *kvm_comm_create(kvm_model_t *m, const kvm_comm_opts_t *opts) {
    kvm_core_init();
    if (!m || !m->inv_freq) {
        kvm_seterr(KVM_EINVAL, "comm: a loaded model is required");
        return NULL;
    }
    kvm_comm_t *c = kvm_calloc(1, sizeof *c);
    if (!c) return NULL;
    c->m = m;
    if (opts && opts->kvcomm_set) c->cfg = opts->kvcomm;
    else kvm_kvcomm_config_default(&c->cfg);
    c->g = (comm_geom_t){m->cfg.n_layers, m->cfg.n_kv_heads, m->cfg.head_dim};
    c->pool = kvm_model_kv_pool(m, opts ? opts->kv_budget_bytes : 0);
    if (!c->pool) {
        kvm_free(c);
        return NULL;
    }
    kvm_rope_params_t rp = {.inv_freq = m->inv_freq, .n_freq = m->cfg.head_dim / 2, .layout = m->cfg.rope_layout};
    c->store = kvm_kv_store_create(c->pool, &rp);
    if (!c->store) {
        kvm_kv_pool_free(c->pool);
        kvm_free(c);
        return NULL;
    }
    return c;
}

void kvm_comm_free(kvm_comm_t *c) {
    if (!c) return;
    if (c->active_requests) KVM_LOGW("comm: freed with %d requests still open", c->active_requests);
    for (int i = 0; i < c->n_pools; i++) {
        for (int k = 0; k < c->pools[i].n; k++) comm_anchor_unref(c, c->pools[i].a[k]);
        kvm_free(c->pools[i].a);
    }
    kvm_free(c->pools);
    comm_dev_ctx_free(c);
    kvm_kv_store_free(c->store);
    kvm_kv_pool_free(c->pool);
    kvm_free(c);
}

kvm_kv_store_t *kvm_comm_store(kvm_comm_t *c) { return c->store; }
kvm_model_t *kvm_comm_model(kvm_comm_t *c) { return c->m; }
kvm_kvcomm_config_t *kvm_comm_config(kvm_comm_t *c) { return &c->cfg; }

/* Runs ids through the model on seq (no logits), in chunks. */
static int comm_prefill(kvm_comm_t *c, kvm_seq_t *seq, const int32_t *ids, int n) {
    const int chunk = 1024;
    for (int i = 0; i < n; i += chunk) {
        int k = n - i < chunk ? n - i : chunk;
        kvm_batch_item_t it = {.seq = seq, .tokens = ids + i, .n_tokens = k};
        int rc = kvm_forward(c->m, &it, 1);
        if (rc) return rc;
    }
    return 0;
}

/* Reads rows [pos, pos+n) of seq into host fp32 and re-bases the keys to F0 (shift by -pos). */
static int read_f0(kvm_comm_t *c, const kvm_seq_t *seq, int pos, int n, float *out) {
    int rc = kvm_kv_read_rows(c->pool, seq->blocks, pos, n, out);
    if (rc || !pos) return rc;
    const comm_geom_t *g = &c->g;
    for (int l = 0; l < g->L; l++)
        for (int h = 0; h < g->H; h++)
            kvm_rope_rotate_rows(out + comm_idx(g, n, l, 0, h, 0), n, g->D, g->D, -pos, NULL, c->m->inv_freq,
                                 c->m->cfg.rope_layout);
    return 0;
}

/* ==== templates ====================================================================================== */


static bool is_blank(const char *s) {
    for (; *s; s++)
        if (!isspace((unsigned char)*s)) return false;
    return true;
}

static bool is_blank_n(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isspace((unsigned char)s[i])) return false;
    return true;
}

static bool valid_ph_name(const char *n) {
    if (!n || !*n || strlen(n) >= KVM_COMM_NAME_MAX) return false;
    if (!strcmp(n, "input")) return true;
    if (!strncmp(n, "tool:", 5) && n[5]) return true;
    if (!strncmp(n, "state:", 6) && n[6]) return true;
    if (!strncmp(n, "agent:", 6)) {
        const char *c = strrchr(n, ':');
        return c > n + 6 && (!strcmp(c, ":current") || !strcmp(c, ":prev"));
    }
    return false;
}

typedef struct tpiece {
    bool ph;
    char *text;          /* owned (text pieces after rendering) */
    const int32_t *ids;  /* given ids (raw) */
    int n_ids;
    int ph_index;
} tpiece_t;

#define PH_MARK "\x1ekvmph"

void kvm_template_free(kvm_template_t *t) {
    if (!t) return;
    kvm_seq_free(&t->seq);
    comm_dev_template_free(t);
    for (int i = 0; i <= KVM_COMM_MAX_PH; i++) kvm_free(t->P[i]);
    kvm_free(t->ids);
    kvm_free(t->agent);
    kvm_free(t);
}

static int append_ids(int32_t **buf, int *n, int *cap, const int32_t *ids, int k) {
    if (*n + k > *cap) {
        int nc = *cap ? *cap : 256;
        while (nc < *n + k) nc *= 2;
        int32_t *nb = kvm_realloc(*buf, (size_t)nc * sizeof(int32_t));
        if (!nb) return KVM_ENOMEM;
        *buf = nb;
        *cap = nc;
    }
    memcpy(*buf + *n, ids, (size_t)k * sizeof(int32_t));
    *n += k;
    return 0;
}

kvm_template_t *kvm_template_create(kvm_comm_t *c, const kvm_template_desc_t *d) {
    if (!c || !d || !d->pieces || d->n_pieces <= 0) {
        kvm_seterr(KVM_EINVAL, "template: no pieces");
        return NULL;
    }
    const char *agent = d->agent && *d->agent ? d->agent : "agent";
    kvm_model_t *m = c->m;
    /* ---- validate the caller's pieces ---- */
    int n_ph = 0;
    for (int i = 0; i < d->n_pieces; i++) {
        const kvm_piece_t *p = &d->pieces[i];
        if (p->kind == KVM_PIECE_PLACEHOLDER) {
            if (!valid_ph_name(p->text)) {
                kvm_seterr(KVM_EINVAL, "template '%s': piece %d: bad placeholder name '%s' (input, tool:<n>, "
                           "agent:<n>:current, agent:<n>:prev, state:<k>)", agent, i, p->text ? p->text : "(null)");
                return NULL;
            }
            if (i > 0 && d->pieces[i - 1].kind == KVM_PIECE_PLACEHOLDER) {
                kvm_seterr(KVM_EINVAL, "template '%s': placeholders %d and %d have no text between them", agent, i - 1, i);
                return NULL;
            }
            if (++n_ph > KVM_COMM_MAX_PH) {
                kvm_seterr(KVM_EINVAL, "template '%s': more than %d placeholders", agent, KVM_COMM_MAX_PH);
                return NULL;
            }
        } else if (p->kind == KVM_PIECE_TEXT) {
            if (p->ids ? p->n_ids <= 0 : (!p->text || is_blank(p->text))) {
                kvm_seterr(KVM_EINVAL, "template '%s': text piece %d is empty or whitespace only (it would misalign "
                           "placeholders and text segments, kvcomm.md §2.2)", agent, i);
                return NULL;
            }
            if (p->ids && !d->raw) {
                kvm_seterr(KVM_EINVAL, "template '%s': piece %d gives token ids, which only raw templates take", agent, i);
                return NULL;
            }
        } else {
            kvm_seterr(KVM_EINVAL, "template '%s': piece %d has unknown kind %d", agent, i, (int)p->kind);
            return NULL;
        }
    }
    if (d->raw && (d->pieces[0].kind != KVM_PIECE_TEXT || d->pieces[d->n_pieces - 1].kind != KVM_PIECE_TEXT)) {
        kvm_seterr(KVM_EINVAL, "template '%s': a raw template must start and end with text (every placeholder needs "
                   "exactly one non-empty text segment after it)", agent);
        return NULL;
    }
    if (!d->raw && !m->tok) {
        kvm_seterr(KVM_EINVAL, "template '%s': model %s has no tokenizer; give token ids in a raw template", agent, m->name);
        return NULL;
    }
    kvm_template_t *t = kvm_calloc(1, sizeof *t);
    if (!t) return NULL;
    t->c = c;
    t->agent = kvm_strdup(agent);
    kvm_seq_init(&t->seq, c->pool);
    tpiece_t tp[2 * KVM_COMM_MAX_PH + 2];
    int ntp = 0;
    memset(tp, 0, sizeof tp);
    char *rendered = NULL, *user = NULL;
    int32_t *ids = NULL, *dummy = NULL;
    int n_ids = 0, cap_ids = 0, n_dummy = 0;
    int rc = 0;
    if (!t->agent) goto fail;
    /* ---- render into alternating text / placeholder pieces ---- */
    if (d->raw) {
        for (int i = 0; i < d->n_pieces; i++) {
            const kvm_piece_t *p = &d->pieces[i];
            tp[ntp].ph = p->kind == KVM_PIECE_PLACEHOLDER;
            if (tp[ntp].ph) snprintf(t->ph_name[t->n_ph], KVM_COMM_NAME_MAX, "%s", p->text), tp[ntp].ph_index = t->n_ph++;
            else if (p->ids) tp[ntp].ids = p->ids, tp[ntp].n_ids = p->n_ids;
            else if (!(tp[ntp].text = kvm_strdup(p->text))) goto fail;
            ntp++;
        }
    } else {
        size_t len = 1;
        for (int i = 0; i < d->n_pieces; i++) len += strlen(d->pieces[i].text) + 32;
        user = kvm_malloc(len);
        if (!user) goto fail;
        user[0] = 0;
        size_t at = 0;
        int k = 0;
        for (int i = 0; i < d->n_pieces; i++) {
            if (d->pieces[i].kind == KVM_PIECE_PLACEHOLDER) {
                snprintf(t->ph_name[k], KVM_COMM_NAME_MAX, "%s", d->pieces[i].text);
                at += (size_t)snprintf(user + at, len - at, PH_MARK "%02d\x1e", k++);
            } else {
                at += (size_t)snprintf(user + at, len - at, "%s", d->pieces[i].text);
            }
        }
        t->n_ph = k;
        kvm_chat_msg_t msgs[2];
        int nm = 0;
        if (d->system && *d->system) msgs[nm++] = (kvm_chat_msg_t){"system", d->system};
        msgs[nm++] = (kvm_chat_msg_t){"user", user};
        rc = kvm_chat_render(m->cfg.chat_format, msgs, nm, true, &rendered);
        if (rc) goto fail;
        if (m->cfg.chat_format == KVM_CHAT_NONE && d->system && *d->system) {
            /* plain concatenation: keep the system text apart from the user text by a newline */
            char *r2 = kvm_malloc(strlen(rendered) + 2);
            if (!r2) goto fail;
            size_t sl = strlen(d->system);
            memcpy(r2, rendered, sl);
            r2[sl] = '\n';
            strcpy(r2 + sl + 1, rendered + sl);
            kvm_free(rendered);
            rendered = r2;
        }
        char *p = rendered;
        for (int i = 0; i <= k; i++) {
            char *mk = i < k ? strstr(p, PH_MARK) : NULL;
            size_t tl = mk ? (size_t)(mk - p) : strlen(p);
            if (tl == 0 || (i > 0 && is_blank_n(p, tl))) {
                kvm_seterr(KVM_EINVAL, "template '%s': the text %s placeholder %d is empty or whitespace only after "
                           "rendering", agent, i == 0 ? "before" : "after", i == 0 ? 1 : i);
                goto fail;
            }
            tp[ntp].text = kvm_malloc(tl + 1);
            if (!tp[ntp].text) goto fail;
            memcpy(tp[ntp].text, p, tl);
            tp[ntp].text[tl] = 0;
            ntp++;
            if (mk) {
                tp[ntp].ph = true;
                tp[ntp].ph_index = i;
                ntp++;
                p = mk + strlen(PH_MARK) + 3;
            }
        }
    }
    /* ---- tokenize each text piece separately; dummies in the placeholders ---- */
    if (m->tok) {
        rc = kvm_tokenize(m->tok, "[...]", 5, 0, &dummy, &n_dummy);
        if (rc) goto fail;
    }
    int ti = 0;
    for (int i = 0; i < ntp; i++) {
        if (tp[i].ph) {
            int pi = tp[i].ph_index;
            t->ps[pi] = n_ids;
            if (n_dummy) rc = append_ids(&ids, &n_ids, &cap_ids, dummy, n_dummy);
            else {
                int32_t dd[4];
                for (int q = 0; q < 4; q++) dd[q] = ids[n_ids - 1];
                rc = append_ids(&ids, &n_ids, &cap_ids, dd, 4);
            }
            t->pe[pi] = n_ids;
            if (rc) goto fail;
        } else {
            t->ts[ti] = n_ids;
            if (tp[i].ids) {
                rc = append_ids(&ids, &n_ids, &cap_ids, tp[i].ids, tp[i].n_ids);
            } else {
                int32_t *pid = NULL;
                int np = 0;
                int flags = KVM_TOK_PARSE_SPECIAL | (i == 0 && m->cfg.add_bos ? KVM_TOK_ADD_BOS : 0);
                rc = kvm_tokenize(m->tok, tp[i].text, strlen(tp[i].text), flags, &pid, &np);
                if (!rc && np <= 0) rc = kvm_seterr(KVM_EINVAL, "template '%s': text piece %d tokenizes to nothing", agent, i);
                if (!rc) rc = append_ids(&ids, &n_ids, &cap_ids, pid, np);
                kvm_free(pid);
            }
            if (rc) goto fail;
            t->te[ti] = n_ids;
            ti++;
        }
    }
    if (ti != t->n_ph + 1) {
        rc = kvm_seterr(KVM_EINVAL, "template '%s': expected %d text segments around %d placeholders, found %d", agent,
                        t->n_ph + 1, t->n_ph, ti);
        goto fail;
    }
    t->ids = ids;
    t->n_ids = n_ids;
    ids = NULL;
    /* ---- hash: agent, names, text ids ---- */
    t->hash = kvm_hash64(t->agent, strlen(t->agent), KVM_HASH_SEED);
    for (int i = 0; i < t->n_ph; i++) t->hash = kvm_hash64(t->ph_name[i], strlen(t->ph_name[i]), t->hash);
    for (int i = 0; i <= t->n_ph; i++)
        t->hash = kvm_hash64(t->ids + t->ts[i], (size_t)(t->te[i] - t->ts[i]) * sizeof(int32_t), t->hash);
    /* ---- prefill once; keep the text segments ---- */
    rc = comm_prefill(c, &t->seq, t->ids, t->n_ids);
    if (rc) goto fail;
    for (int i = 1; i <= t->n_ph; i++) {
        int S = t->te[i] - t->ts[i];
        t->P[i] = kvm_malloc(comm_rows_elems(&c->g, S) * sizeof(float));
        if (!t->P[i]) goto fail;
        rc = read_f0(c, &t->seq, t->ts[i], S, t->P[i]);
        if (rc) goto fail;
    }
    /* the device path reads the text segments from device copies: make them now rather than in the
     * template's first REUSE request, whose TTFT would otherwise pay the uploads */
    if (comm_dev_on(c) && (rc = comm_dev_template_prepare(t)) != 0) goto fail;
    kvm_seq_truncate(&t->seq, t->te[0]);
    kvm_prefix_index_insert(c->store, &t->seq, t->seq.n_tokens);
    for (int i = 0; i < ntp; i++) kvm_free(tp[i].text);
    kvm_free(dummy);
    kvm_free(user);
    kvm_free(rendered);
    return t;
fail:
    if (!rc && !kvm_errcode()) kvm_seterr(KVM_ENOMEM, "template '%s': out of memory", agent);
    for (int i = 0; i < ntp; i++) kvm_free(tp[i].text);
    kvm_free(ids);
    kvm_free(dummy);
    kvm_free(user);
    kvm_free(rendered);
    kvm_template_free(t);
    return NULL;
}

int kvm_template_n_placeholders(const kvm_template_t *t) { return t->n_ph; }
const char *kvm_template_placeholder(const kvm_template_t *t, int i) {
    return i >= 0 && i < t->n_ph ? t->ph_name[i] : NULL;
}
uint64_t kvm_template_hash(const kvm_template_t *t) { return t->hash; }
int kvm_template_n_tokens(const kvm_template_t *t) { return t->n_ids; }
const char *kvm_template_agent(const kvm_template_t *t) { return t->agent; }

/* ==== segments of shared content (§2.3) =============================================================== */

int kvm_comm_segment_ids(kvm_comm_t *c, kvm_producer_kind_t kind, const char *producer_id, const int32_t *header,
                         int n_header, const int32_t *content, int n_content, kvm_segment_t **out) {
    *out = NULL;
    if (n_content <= 0) return kvm_seterr(KVM_EINVAL, "segment '%s': empty content", producer_id ? producer_id : "");
    int n = n_header + n_content;
    int32_t *ids = kvm_malloc((size_t)n * sizeof(int32_t));
    if (!ids) return KVM_ENOMEM;
    if (n_header) memcpy(ids, header, (size_t)n_header * sizeof(int32_t));
    memcpy(ids + n_header, content, (size_t)n_content * sizeof(int32_t));
    kvm_seq_t seq;
    kvm_seq_init(&seq, c->pool);
    int rc = comm_prefill(c, &seq, ids, n);
    if (!rc) {
        kvm_segment_info_t meta = {.producer_kind = kind,
                                   .producer_id = producer_id ? producer_id : "",
                                   .producer_ctx_hash = kvm_ctx_hash(ids, n_header),
                                   .producer_pos = n_header,
                                   .drop_num = n_header};
        rc = kvm_segment_publish(c->store, &seq, n_header, n_content, -n_header, &meta, out);
    }
    kvm_seq_free(&seq);
    kvm_free(ids);
    return rc;
}

int kvm_comm_segment_text(kvm_comm_t *c, kvm_producer_kind_t kind, const char *producer_id, const char *text,
                          size_t len, kvm_segment_t **out) {
    *out = NULL;
    kvm_model_t *m = c->m;
    if (!m->tok) return kvm_seterr(KVM_EINVAL, "segment: model %s has no tokenizer (use kvm_comm_segment_ids)", m->name);
    if (!text || !len) return kvm_seterr(KVM_EINVAL, "segment '%s': empty text", producer_id ? producer_id : "");
    const char *lead = "";
    if (kind == KVM_PRODUCER_INPUT) lead = c->cfg.lead_input ? c->cfg.lead_input : "The task is:\n\n";
    else if (kind == KVM_PRODUCER_TOOL) lead = c->cfg.lead_tool ? c->cfg.lead_tool : "Tool result:\n\n";
    else if (kind == KVM_PRODUCER_STATE) lead = c->cfg.lead_state ? c->cfg.lead_state : "Value:\n\n";
    /* header text = user-role header of the chat format + lead-in */
    char *role_hdr = NULL;
    if (kind != KVM_PRODUCER_TEXT && m->cfg.chat_format != KVM_CHAT_NONE) {
        kvm_chat_msg_t msg = {"user", "\x1e"};
        int rc = kvm_chat_render(m->cfg.chat_format, &msg, 1, false, &role_hdr);
        if (rc) return rc;
        char *mk = strchr(role_hdr, '\x1e');
        if (mk) *mk = 0;
    }
    size_t hl = (role_hdr ? strlen(role_hdr) : 0) + strlen(lead);
    char *hdr = kvm_malloc(hl + 1);
    if (!hdr) {
        kvm_free(role_hdr);
        return KVM_ENOMEM;
    }
    snprintf(hdr, hl + 1, "%s%s", role_hdr ? role_hdr : "", lead);
    kvm_free(role_hdr);
    int32_t *h_ids = NULL, *c_ids = NULL, *j_ids = NULL, *l_ids = NULL;
    int nh = 0, nc = 0, nj = 0, nl = 0;
    int flags = m->cfg.add_bos ? KVM_TOK_ADD_BOS : 0;
    int rc = kvm_tokenize(m->tok, hdr, hl, flags | KVM_TOK_PARSE_SPECIAL, &h_ids, &nh);
    if (!rc) rc = kvm_tokenize(m->tok, text, len, 0, &c_ids, &nc);
    /* boundary check: lead ++ content must tokenize as lead then content */
    if (!rc && *lead) {
        size_t ll = strlen(lead);
        char *joint = kvm_malloc(ll + len + 1);
        if (!joint) rc = KVM_ENOMEM;
        else {
            memcpy(joint, lead, ll);
            memcpy(joint + ll, text, len);
            joint[ll + len] = 0;
            rc = kvm_tokenize(m->tok, joint, ll + len, 0, &j_ids, &nj);
            if (!rc) rc = kvm_tokenize(m->tok, lead, ll, 0, &l_ids, &nl);
            kvm_free(joint);
        }
        if (!rc && (nj != nl + nc || memcmp(j_ids, l_ids, (size_t)nl * 4) || memcmp(j_ids + nl, c_ids, (size_t)nc * 4)))
            KVM_LOGW("tokenization_boundary: segment '%s': the content does not split cleanly after the lead-in; "
                     "using header ++ content tokenized alone", producer_id ? producer_id : "");
    }
    if (!rc && nc <= 0) rc = kvm_seterr(KVM_EINVAL, "segment '%s': the text tokenizes to nothing", producer_id ? producer_id : "");
    if (!rc) rc = kvm_comm_segment_ids(c, kind, producer_id, h_ids, nh, c_ids, nc, out);
    kvm_free(hdr);
    kvm_free(h_ids);
    kvm_free(c_ids);
    kvm_free(j_ids);
    kvm_free(l_ids);
    return rc;
}

/* ==== requests ======================================================================================== */

kvm_comm_request_t *kvm_comm_request_begin(kvm_comm_t *c, uint64_t request_id) {
    kvm_comm_request_t *rq = kvm_calloc(1, sizeof *rq);
    if (!rq) return NULL;
    rq->c = c;
    rq->id = request_id;
    rq->dev = comm_dev_on(c);
    if (c->n_pools) {
        rq->snaps = kvm_calloc((size_t)c->n_pools, sizeof *rq->snaps);
        if (!rq->snaps) {
            kvm_free(rq);
            return NULL;
        }
        for (int i = 0; i < c->n_pools; i++) {
            comm_pool_t *p = &c->pools[i];
            rq->snaps[i].pool = i;
            rq->snaps[i].a = kvm_malloc((size_t)(p->n ? p->n : 1) * sizeof(comm_anchor_t *));
            if (!rq->snaps[i].a) {
                rq->n_snaps = i;
                comm_request_free_state(rq);
                kvm_free(rq);
                return NULL;
            }
            for (int k = 0; k < p->n; k++) {
                p->a[k]->refs++;
                rq->snaps[i].a[k] = p->a[k];
            }
            rq->snaps[i].n = p->n;
        }
        rq->n_snaps = c->n_pools;
    }
    c->active_requests++;
    return rq;
}

int kvm_comm_request_end(kvm_comm_request_t *rq) {
    if (!rq) return 0;
    int rc = comm_commit(rq);
    rq->c->active_requests--;
    comm_request_free_state(rq);
    kvm_free(rq);
    return rc;
}

void kvm_comm_request_abort(kvm_comm_request_t *rq) {
    if (!rq) return;
    rq->c->active_requests--;
    comm_request_free_state(rq);
    kvm_free(rq);
}

/* The sample (name, content of g) of this request; created (with its F0 base read) on first use. */
static int get_sample(kvm_comm_request_t *rq, const char *name, const kvm_segment_t *g, int *out) {
    const kvm_segment_info_t *gi = kvm_segment_info(g);
    uint64_t key = kvm_hash64(gi->ids, (size_t)gi->n_tokens * sizeof(int32_t), kvm_hash64(&rq->id, 8, KVM_HASH_SEED));
    for (int i = 0; i < rq->n_samples; i++)
        if (rq->samples[i].key == key && !strcmp(rq->samples[i].name, name)) {
            *out = i;
            return 0;
        }
    if (rq->n_samples == rq->cap_samples) {
        int cap = rq->cap_samples ? rq->cap_samples * 2 : 8;
        comm_sample_t *ns = kvm_realloc(rq->samples, (size_t)cap * sizeof *ns);
        if (!ns) return KVM_ENOMEM;
        rq->samples = ns;
        rq->cap_samples = cap;
    }
    comm_sample_t *s = &rq->samples[rq->n_samples];
    memset(s, 0, sizeof *s);
    snprintf(s->name, sizeof s->name, "%s", name);
    s->key = key;
    s->T = gi->n_tokens;
    if (rq->dev) { /* device path (kvcomm_dev.c): the base stays in the pool; X is read only if needed */
        int drc = comm_dev_sample_bind(rq->c, s, g);
        if (drc) return drc;
        *out = rq->n_samples++;
        return 0;
    }
    s->X = kvm_malloc(comm_rows_elems(&rq->c->g, s->T) * sizeof(float));
    if (!s->X) return KVM_ENOMEM;
    int rc = kvm_segment_read_f32(g, 0, s->T, s->X);
    if (rc) {
        kvm_free(s->X);
        return rc;
    }
    *out = rq->n_samples++;
    return 0;
}

/* ==== prompt assembly ================================================================================== */

typedef struct prep_ph {
    int decision;
    int sample;        /* index in rq->samples, -1 if none */
    int t_ph, t_pf, T, S;
    kvm_segment_t *seg;
    comm_anchor_t **usable;
    int n_usable;
} prep_ph_t;

typedef struct prep_priv {
    kvm_comm_request_t *rq;
    const kvm_template_t *tmpl;
    int n_ph;
    prep_ph_t ph[KVM_COMM_MAX_PH];
    int n_exact;        /* leading rows of the cache that are exact */
    float *row_score;   /* kvcomm.recompute_frac: [n_prompt] relative offset of each offset-corrected placeholder
                         * row (0 elsewhere), or NULL */
} prep_priv_t;

void kvm_prepared_release(kvm_prepared_t *p) {
    if (!p) return;
    if (p->seq.pool) kvm_seq_free(&p->seq);
    prep_priv_t *pv = p->priv;
    if (pv) {
        for (int i = 0; i < pv->n_ph; i++) {
            kvm_segment_release(pv->ph[i].seg);
            kvm_free(pv->ph[i].usable);
        }
        kvm_free(pv->row_score);
        kvm_free(pv);
    }
    kvm_free(p->prompt_ids);
    memset(p, 0, sizeof *p);
}

/* Longest exact prefix of ids[0..n) (at most max_tokens): the prefix index or, if longer, the template's
 * segment 0 (when ids start with it). seq must be empty. Returns the rows now in seq. */
static int exact_prefix(kvm_comm_t *c, const kvm_template_t *t, const int32_t *ids, int n, int max_tokens,
                        kvm_seq_t *seq) {
    int hit = kvm_prefix_index_lookup(c->store, ids, n, max_tokens, seq);
    if (hit < 0) return hit;
    int s0 = t ? t->seq.n_tokens : 0;
    if (s0 > max_tokens) s0 = max_tokens;
    if (t && s0 > hit && s0 <= n && !memcmp(ids, t->seq.tokens, (size_t)s0 * sizeof(int32_t))) {
        kvm_seq_free(seq);
        kvm_seq_init(seq, c->pool);
        int rc = kvm_seq_share_prefix(seq, &t->seq, s0);
        if (rc) return rc;
        hit = s0;
    }
    return hit;
}

int kvm_comm_prepare_ids(kvm_comm_t *c, const int32_t *ids, int n, kvm_kv_policy_t policy, kvm_prepared_t *out) {
    memset(out, 0, sizeof *out);
    if (!ids || n <= 0) return kvm_seterr(KVM_EINVAL, "prepare: empty prompt");
    if (policy == KVM_KV_KVCOMM)
        return kvm_seterr(KVM_EINVAL, "prepare: a prompt given as ids has no placeholders; use EXACT or TEXT");
    kvm_seq_init(&out->seq, c->pool);
    out->prompt_ids = kvm_malloc((size_t)n * sizeof(int32_t));
    if (!out->prompt_ids) return KVM_ENOMEM;
    memcpy(out->prompt_ids, ids, (size_t)n * sizeof(int32_t));
    out->n_prompt = n;
    int e = 0;
    if (policy == KVM_KV_PREFIX) {
        e = exact_prefix(c, NULL, ids, n, n - 1, &out->seq);
        if (e < 0) {
            int rc = e;
            kvm_prepared_release(out);
            return rc;
        }
    }
    out->n_cached = e;
    out->rest_ids = out->prompt_ids + e;
    out->n_rest = n - e;
    kvm_comm_report_t *r = &out->report;
    r->mode = KVM_COMM_DENSE;
    r->policy = policy;
    r->input_tokens = n;
    r->exact_tokens = e;
    r->recomputed_tokens = n - e;
    prep_priv_t *pv = kvm_calloc(1, sizeof *pv);
    if (!pv) {
        kvm_prepared_release(out);
        return KVM_ENOMEM;
    }
    pv->n_exact = e;
    out->priv = pv;
    return 0;
}

/* Copies rows [r0, r1) of a tensor `src` of n rows into rows [d0, ...) of a tensor `dst` of dn rows. */
/* kvcomm.recompute_frac: per row t of a T-row placeholder, |offset|^2 / |base|^2 over layers 1..L-1, K and V. */
static void row_scores(const comm_geom_t *g, const float *X, const float *Y, int T, float *out) {
    for (int t = 0; t < T; t++) {
        double dd = 0, xx = 0;
        for (int l = 1; l < g->L; l++)
            for (int kv = 0; kv < 2; kv++)
                for (int h = 0; h < g->H; h++) {
                    const float *x = X + comm_idx(g, T, l, kv, h, t), *y = Y + comm_idx(g, T, l, kv, h, t);
                    for (int k = 0; k < g->D; k++) dd += ((double)y[k] - x[k]) * ((double)y[k] - x[k]), xx += (double)x[k] * x[k];
                }
        out[t] = (float)(dd / (xx + 1e-30)) + 1e-30f; /* > 0 marks a candidate row */
    }
}

static int cmp_score_desc(const void *a, const void *b) {
    float x = ((const float *)a)[0], y = ((const float *)b)[0];
    return x < y ? 1 : x > y ? -1 : 0;
}

/* A view of p's block table cut at row `at` (it owns nothing: never kvm_seq_free it). tokens: a scratch copy of
 * the prompt ids of capacity n_prompt, which the forward's bookkeeping writes into. */
static kvm_seq_t seq_view(kvm_comm_t *c, const kvm_prepared_t *p, int at, int32_t *tokens) {
    return (kvm_seq_t){.pool = c->pool, .blocks = p->seq.blocks, .n_blocks = p->seq.n_blocks,
                       .cap_blocks = p->seq.n_blocks, .tokens = tokens, .n_tokens = at, .cap_tokens = p->n_prompt};
}

/* recompute_select=layer1: recomputes layers 0-1 of rows [E, E+n) in place (one partial pass; layer 0 is exact
 * everywhere, so layer 1 comes out exact too) and replaces each candidate's score (score[row] > 0) by the
 * relative change of its layer-1 K/V. */
static int layer1_scores(kvm_comm_t *c, kvm_prepared_t *p, int E, int n, float *score) {
    const comm_geom_t *g = &c->g;
    if (g->L < 2) return 0;
    size_t e = comm_rows_elems(g, n);
    float *est = kvm_malloc(e * sizeof(float)), *tru = kvm_malloc(e * sizeof(float));
    int32_t *scratch = kvm_malloc((size_t)p->n_prompt * sizeof(int32_t));
    int rc = est && tru && scratch ? 0 : KVM_ENOMEM;
    if (!rc) rc = kvm_kv_read_rows(c->pool, p->seq.blocks, E, n, est);
    if (!rc) {
        memcpy(scratch, p->prompt_ids, (size_t)p->n_prompt * sizeof(int32_t));
        kvm_seq_t v = seq_view(c, p, E, scratch);
        kvm_batch_item_t it = {.seq = &v, .tokens = p->prompt_ids + E, .n_tokens = n};
        rc = kvm_forward_layers(c->m, &it, 1, 2);
    }
    if (!rc) rc = kvm_kv_read_rows(c->pool, p->seq.blocks, E, n, tru);
    if (!rc) {
        for (int t = 0; t < n; t++) {
            if (score[E + t] <= 0) continue;
            double dd = 0, yy = 0;
            for (int kv = 0; kv < 2; kv++)
                for (int h = 0; h < g->H; h++) {
                    const float *x = est + comm_idx(g, n, 1, kv, h, t), *y = tru + comm_idx(g, n, 1, kv, h, t);
                    for (int k = 0; k < g->D; k++) dd += ((double)x[k] - y[k]) * ((double)x[k] - y[k]), yy += (double)y[k] * y[k];
                }
            score[E + t] = (float)(dd / (yy + 1e-30)) + 1e-30f;
        }
        p->report.layer1_rows = n;
    }
    kvm_free(est);
    kvm_free(tru);
    kvm_free(scratch);
    return rc;
}

int kvm_comm_recompute_short(kvm_comm_t *c, kvm_prepared_t *p) {
    if (!c || !p) return kvm_seterr(KVM_EINVAL, "recompute_short: comm and prepared prompt are required");
    prep_priv_t *pv = p->priv;
    kvm_comm_report_t *r = &p->report;
    const kvm_kvcomm_config_t *cfg = &c->cfg;
    const int N = p->n_prompt;
    /* row_score exists when recompute_frac > 0 and some placeholder was offset-corrected (kvm_comm_prepare) */
    const bool select = pv && pv->row_score && cfg->recompute_frac > 0;
    if (!pv || r->mode != KVM_COMM_REUSE || p->n_cached != N - 1 || r->n_placeholders <= 0) return 0;
    if (!select && cfg->recompute_below <= 0 && cfg->recompute_text <= 0) return 0;
    const int E = pv->n_exact, n = N - 1 - E;
    for (int row = E; row < N - 1; row++)
        if (c->pool->refcount[p->seq.blocks[row / KVM_KV_BLOCK]] != 1) {
            kvm_prepared_release(p);
            return kvm_seterr(KVM_EINTERNAL, "recompute_short: assembled row %d sits in a shared block", row);
        }
    int rc = 0;
    if (select && cfg->recompute_select == KVM_KVCOMM_SELECT_LAYER1 && n > 0) rc = layer1_scores(c, p, E, n, pv->row_score);
    /* mark: 2 = a span of recompute_below / recompute_text (the rule of kvm_comm_recompute_short), 1 = selected */
    char *mark = kvm_calloc((size_t)N, 1);
    float *cand = kvm_malloc((size_t)2 * N * sizeof(float));
    if (!rc && (!mark || !cand)) rc = KVM_ENOMEM;
    int nc = 0, k = 0, n2 = 0;
    for (int j = 0; j < r->n_placeholders && !rc; j++) {
        const kvm_comm_ph_report_t *ph = &r->ph[j];
        if (ph->decision != KVM_PH_SHARED && ph->decision != KVM_PH_NAIVE) continue;
        int a = ph->start_pos, b = ph->start_pos + ph->tokens + ph->text_tokens;
        if (ph->tokens >= cfg->recompute_below) {
            if (cfg->recompute_text <= 0 || ph->text_tokens <= 0 || ph->text_tokens >= cfg->recompute_text) continue;
            a = ph->start_pos + ph->tokens;
        }
        for (int row = a > E ? a : E; row < b && row < N - 1; row++) mark[row] = 2;
    }
    for (int row = E; row < N - 1 && !rc; row++) {
        n2 += mark[row] == 2;
        if (select && !mark[row] && pv->row_score[row] > 0)
            cand[2 * nc] = pv->row_score[row], cand[2 * nc + 1] = (float)row, nc++;
    }
    if (!rc) {
        k = (int)ceil((double)cfg->recompute_frac * nc);
        if (k > nc) k = nc;
        qsort(cand, (size_t)nc, 2 * sizeof(float), cmp_score_desc);
        for (int i = 0; i < k; i++) mark[(int)cand[2 * i + 1]] = 1;
    }
    const int nb = k + n2;
    int32_t *scratch = kvm_malloc((size_t)N * sizeof(int32_t));
    int32_t *pos = kvm_malloc((size_t)(nb ? nb : 1) * sizeof(int32_t)), *tok = kvm_malloc((size_t)(nb ? nb : 1) * sizeof(int32_t));
    if (!rc && (!scratch || !pos || !tok)) rc = KVM_ENOMEM;
    if (!rc && nb > 0) {
        memcpy(scratch, p->prompt_ids, (size_t)N * sizeof(int32_t));
        /* one item that recomputes the marked rows in place (kvm_batch_item_t.positions) on a view of the
         * assembled sequence: at every layer all of them write their K/V before the layer's attention, and row t
         * attends to rows [0, t], so each row sees the fresh K/V of every recomputed row before it (a contiguous
         * span comes out as a prefill of it would). One item, not one per row: an attention kernel reads the
         * context once per query tile. */
        int i = 0;
        for (int row = E; row < N - 1; row++)
            if (mark[row]) pos[i] = row, tok[i] = p->prompt_ids[row], i++;
        kvm_seq_t view = seq_view(c, p, N - 1, scratch);
        kvm_batch_item_t item = {.seq = &view, .tokens = tok, .n_tokens = nb, .positions = pos};
        r->recompute_items = 1;
        rc = kvm_forward(c->m, &item, 1);
    }
    if (!rc) {
        for (int i = 0; i < nb; i++) {
            int cat = comm_reuse_row_cat(r, cfg, pos[i]);
            if (cat == 0) r->exact_tokens--;
            else if (cat == 1) r->offset_tokens--;
            else r->naive_tokens--;
            r->recomputed_tokens++;
            if (mark[pos[i]] == 2) r->short_recomputed++;
            else r->selected_recomputed++;
        }
    }
    kvm_free(mark);
    kvm_free(cand);
    kvm_free(scratch);
    kvm_free(pos);
    kvm_free(tok);
    if (rc) {
        kvm_prepared_release(p);
        return rc;
    }
    KVM_ASSERT(p->seq.n_tokens == N - 1);
    return 0;
}

static void copy_rows(const comm_geom_t *g, const float *src, int n, int r0, int r1, float *dst, int dn, int d0) {
    if (r1 <= r0) return;
    for (int l = 0; l < g->L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < g->H; h++)
                memcpy(dst + comm_idx(g, dn, l, kv, h, d0), src + comm_idx(g, n, l, kv, h, r0),
                       (size_t)(r1 - r0) * g->D * sizeof(float));
}

int kvm_comm_prepare(kvm_comm_request_t *rq, const kvm_prompt_t *p, kvm_prepared_t *out) {
    memset(out, 0, sizeof *out);
    if (!rq || !p || !p->tmpl) return kvm_seterr(KVM_EINVAL, "prepare: request and template are required");
    kvm_comm_t *c = rq->c;
    const kvm_template_t *t = p->tmpl;
    const comm_geom_t *g = &c->g;
    const kvm_kvcomm_config_t *cfg = &c->cfg;
    if (t->c != c) return kvm_seterr(KVM_EINVAL, "prepare: template '%s' belongs to another comm context", t->agent);
    uint64_t t0 = kvm_now_ns();
    kvm_seq_init(&out->seq, c->pool);
    prep_priv_t *pv = kvm_calloc(1, sizeof *pv);
    if (!pv) return KVM_ENOMEM;
    out->priv = pv;
    pv->rq = rq;
    pv->tmpl = t;
    pv->n_ph = t->n_ph;
    kvm_comm_report_t *r = &out->report;
    r->policy = p->policy;
    r->template_hash = t->hash;
    r->n_placeholders = t->n_ph;
    int rc = 0;
    /* ---- bind and check the segments; lay out positions (§3.2) ---- */
    int N = t->n_ids;
    for (int i = 0; i < t->n_ph; i++) {
        prep_ph_t *ph = &pv->ph[i];
        ph->sample = -1;
        kvm_segment_t *seg = NULL;
        for (int b = 0; b < p->n_bindings; b++)
            if (p->bindings[b].name && !strcmp(p->bindings[b].name, t->ph_name[i])) seg = p->bindings[b].seg;
        if (!seg) {
            rc = kvm_seterr(KVM_EINVAL, "prepare: template '%s' needs a segment for placeholder '%s'", t->agent,
                            t->ph_name[i]);
            goto fail;
        }
        rc = kvm_segment_check(seg, c->pool, 0);
        if (rc) {
            kvm_errctx(rc, "prepare: template '%s', placeholder '%s'", t->agent, t->ph_name[i]);
            goto fail;
        }
        kvm_segment_ref(seg);
        ph->seg = seg;
        ph->T = kvm_segment_info(seg)->n_tokens;
        ph->S = t->te[i + 1] - t->ts[i + 1];
        N += ph->T - (t->pe[i] - t->ps[i]);
    }
    out->prompt_ids = kvm_malloc((size_t)N * sizeof(int32_t));
    if (!out->prompt_ids) {
        rc = KVM_ENOMEM;
        goto fail;
    }
    {
        int at = 0;
        memcpy(out->prompt_ids, t->ids, (size_t)t->te[0] * sizeof(int32_t));
        at = t->te[0];
        for (int i = 0; i < t->n_ph; i++) {
            prep_ph_t *ph = &pv->ph[i];
            ph->t_ph = at;
            memcpy(out->prompt_ids + at, kvm_segment_info(ph->seg)->ids, (size_t)ph->T * sizeof(int32_t));
            at += ph->T;
            ph->t_pf = at;
            memcpy(out->prompt_ids + at, t->ids + t->ts[i + 1], (size_t)ph->S * sizeof(int32_t));
            at += ph->S;
        }
        KVM_ASSERT(at == N);
    }
    out->n_prompt = N;
    r->input_tokens = N;
    for (int i = 0; i < t->n_ph; i++) {
        prep_ph_t *ph = &pv->ph[i];
        kvm_comm_ph_report_t *pr = &r->ph[i];
        snprintf(pr->name, sizeof pr->name, "%s", t->ph_name[i]);
        pr->segment_id = kvm_segment_info(ph->seg)->id;
        pr->tokens = ph->T;
        pr->start_pos = ph->t_ph;
        pr->text_tokens = ph->S;
        pr->decision = KVM_PH_DENSE;
    }
    /* ---- decide (§3.1 step 2) ---- */
    bool kv = p->policy == KVM_KV_KVCOMM && cfg->enable && t->n_ph > 0;
    bool dense = !kv;
    bool rotation_only = !cfg->ph_offset && !cfg->pf_offset;
    uint64_t tp = kvm_now_ns();
    for (int i = 0; kv && i < t->n_ph; i++) {
        prep_ph_t *ph = &pv->ph[i];
        kvm_comm_ph_report_t *pr = &r->ph[i];
        const kvm_segment_info_t *gi = kvm_segment_info(ph->seg);
        if (gi->producer_ctx_hash == kvm_ctx_hash(out->prompt_ids, ph->t_ph) && gi->producer_pos == ph->t_ph) {
            ph->decision = KVM_PH_EXACT_CTX; /* §5: same context, same place: as is */
            continue;
        }
        if (rotation_only) {
            ph->decision = KVM_PH_NAIVE;
            continue;
        }
        rc = get_sample(rq, t->ph_name[i], ph->seg, &ph->sample);
        if (rc) goto fail;
        comm_sample_t *s = &rq->samples[ph->sample];
        rc = comm_predict(rq, s);
        if (rc) goto fail;
        pr->sample_key = s->key;
        pr->predicted_new = s->is_new;
        pr->n_pool = s->n_pool;
        pr->n_eligible = s->n_eligible;
        pr->entropy = s->entropy;
        pr->threshold = s->threshold;
        if (s->is_new) {
            ph->decision = KVM_PH_NEW_ANCHOR;
            dense = true;
            continue;
        }
        rc = comm_usable(rq, s, t->agent, t->hash, &ph->usable, &ph->n_usable);
        if (rc) goto fail;
        pr->n_eligible = ph->n_usable;
        if (ph->n_usable == 0) {
            if (cfg->no_anchor == KVM_KVCOMM_NOANCHOR_NAIVE) {
                ph->decision = KVM_PH_NAIVE;
            } else {
                ph->decision = KVM_PH_NO_ANCHOR;
                dense = true;
            }
            continue;
        }
        ph->decision = KVM_PH_SHARED;
    }
    r->predict_ms = ms_since(tp);
    /* ---- exact prefix (§5) ---- */
    int E = exact_prefix(c, t, out->prompt_ids, N, N - 1, &out->seq);
    if (E < 0) {
        rc = E;
        goto fail;
    }
    if (dense) {
        r->mode = KVM_COMM_DENSE;
        for (int i = 0; i < t->n_ph; i++) {
            int d = pv->ph[i].decision;
            if (d != KVM_PH_NEW_ANCHOR && d != KVM_PH_NO_ANCHOR) pv->ph[i].decision = KVM_PH_DENSE;
            r->ph[i].decision = pv->ph[i].decision;
        }
        out->n_cached = E;
        r->exact_tokens = E;
        r->recomputed_tokens = N - E;
        pv->n_exact = E;
    } else {
        /* ---- REUSE (§3.6, §3.7): rows [E, N-1) from segments, offsets in F0, one write, one shift ---- */
        r->mode = KVM_COMM_REUSE;
        if (rq->dev) { /* device path (kvcomm_dev.c): weights, offsets, shift and scatter on the backend */
            comm_dev_ph_t dph[KVM_COMM_MAX_PH];
            for (int i = 0; i < t->n_ph; i++)
                dph[i] = (comm_dev_ph_t){pv->ph[i].decision, pv->ph[i].sample, pv->ph[i].t_ph, pv->ph[i].t_pf, pv->ph[i].T,
                                         pv->ph[i].S, pv->ph[i].seg, pv->ph[i].usable, pv->ph[i].n_usable};
            if (cfg->recompute_frac > 0 && !pv->row_score && !(pv->row_score = kvm_calloc((size_t)N, sizeof(float)))) {
                rc = KVM_ENOMEM;
                goto fail;
            }
            rc = comm_dev_reuse(rq, t, dph, out, E, N, pv->row_score);
            if (rc) goto fail;
            goto reuse_done;
        }
        const bool ref_frame = cfg->frame == KVM_KVCOMM_FRAME_REFERENCE;
        int n_tail = N - 1 - E;
        float *tail = NULL, *xh = NULL, *ph_out = NULL;
        int32_t *deltas = NULL;
        r->exact_tokens = E;
        if (n_tail > 0) {
            tail = kvm_malloc(comm_rows_elems(g, n_tail) * sizeof(float));
            deltas = kvm_calloc((size_t)n_tail, sizeof(int32_t));
            if (!tail || !deltas) {
                kvm_free(tail), kvm_free(deltas);
                rc = KVM_ENOMEM;
                goto fail;
            }
        }
        for (int i = 0; i < t->n_ph && !rc; i++) {
            prep_ph_t *ph = &pv->ph[i];
            kvm_comm_ph_report_t *pr = &r->ph[i];
            pr->decision = ph->decision;
            const float *P = t->P[i + 1];
            int T = ph->T, S = ph->S;
            const float *Xsrc = NULL, *Psrc = P;
            if (ph->decision == KVM_PH_SHARED) {
                comm_sample_t *s = &rq->samples[ph->sample];
                uint64_t tw = kvm_now_ns();
                rc = comm_weights(c, s, ph->usable, ph->n_usable);
                r->weights_ms += ms_since(tw);
                if (rc) break;
                /* the anchor with the largest mean placeholder key weight, for the trace */
                for (int n = 0; n < ph->n_usable; n++) {
                    double mw = 0;
                    for (int q = 0; q < T; q++) mw += s->w_kph[(size_t)n * T + q];
                    mw /= T;
                    if (mw > pr->top_weight) pr->top_weight = (float)mw, pr->top_anchor = ph->usable[n]->key;
                }
                uint64_t to = kvm_now_ns();
                xh = kvm_malloc(comm_rows_elems(g, T) * sizeof(float));
                ph_out = kvm_malloc(comm_rows_elems(g, S) * sizeof(float));
                if (!xh || !ph_out) {
                    rc = KVM_ENOMEM;
                    break;
                }
                if (ref_frame)
                    rc = comm_mix_reference(c, s, ph->usable, ph->n_usable, t->agent, P, S, ph->t_ph, ph->t_pf, xh,
                                            ph_out, cfg->ph_offset, cfg->pf_offset);
                else
                    comm_apply(c, s, ph->usable, ph->n_usable, t->agent, P, S, xh, ph_out, cfg->ph_offset,
                               cfg->pf_offset);
                r->offset_ms += ms_since(to);
                Xsrc = xh;
                Psrc = ph_out;
                if (cfg->recompute_frac > 0 && cfg->ph_offset && T >= cfg->recompute_below) {
                    if (!pv->row_score) pv->row_score = kvm_calloc((size_t)N, sizeof(float));
                    if (!pv->row_score) {
                        rc = KVM_ENOMEM;
                        break;
                    }
                    if (cfg->recompute_select == KVM_KVCOMM_SELECT_SPREAD)
                        comm_spread_scores(c, s, ph->usable, ph->n_usable, t->agent, xh, pv->row_score + ph->t_ph);
                    else
                        row_scores(g, s->X, xh, T, pv->row_score + ph->t_ph);
                }
            } else {
                xh = kvm_malloc(comm_rows_elems(g, T) * sizeof(float));
                if (!xh) {
                    rc = KVM_ENOMEM;
                    break;
                }
                rc = kvm_segment_read_f32(ph->seg, 0, T, xh);
                Xsrc = xh;
            }
            /* rows of this placeholder and its text segment that land in [E, N-1) */
            int a0 = ph->t_ph > E ? 0 : E - ph->t_ph, a1 = T;
            if (ph->t_ph + a1 > N - 1) a1 = N - 1 - ph->t_ph;
            int b0 = ph->t_pf > E ? 0 : E - ph->t_pf, b1 = S;
            if (ph->t_pf + b1 > N - 1) b1 = N - 1 - ph->t_pf;
            if (!rc && a1 > a0) copy_rows(g, Xsrc, T, a0, a1, tail, n_tail, ph->t_ph + a0 - E);
            if (!rc && b1 > b0) copy_rows(g, Psrc, S, b0, b1, tail, n_tail, ph->t_pf + b0 - E);
            /* F0: row t of a piece sits at t, so every row of the piece moves by the piece's start (reference
             * frame: the mixed rows are already at their target) */
            bool placed = ref_frame && ph->decision == KVM_PH_SHARED;
            for (int q = a0; q < a1; q++) deltas[ph->t_ph + q - E] = cfg->rotate && !placed ? ph->t_ph : 0;
            for (int q = b0; q < b1; q++) deltas[ph->t_pf + q - E] = cfg->rotate && !placed ? ph->t_pf : 0;
            int na = a1 > a0 ? a1 - a0 : 0, nb = b1 > b0 ? b1 - b0 : 0;
            if (ph->decision == KVM_PH_SHARED) {
                r->offset_tokens += (cfg->ph_offset ? na : 0) + (cfg->pf_offset ? nb : 0);
                r->naive_tokens += (cfg->ph_offset ? 0 : na) + (cfg->pf_offset ? 0 : nb);
            } else if (ph->decision == KVM_PH_EXACT_CTX) {
                r->exact_tokens += na;
                r->naive_tokens += nb;
            } else {
                r->naive_tokens += na + nb;
            }
            kvm_free(xh);
            kvm_free(ph_out);
            xh = ph_out = NULL;
        }
        kvm_free(xh);
        kvm_free(ph_out);
        /* segment-0 rows beyond the exact prefix cannot exist (E >= |seg 0|), so the tail is covered */
        uint64_t ta = kvm_now_ns();
        if (!rc && n_tail > 0) {
            rc = kvm_seq_reserve(&out->seq, N - 1);
            if (!rc) rc = kvm_kv_write_rows(c->pool, out->seq.blocks, E, n_tail, tail);
            if (!rc && cfg->rotate) rc = kvm_kv_shift(c->store, out->seq.blocks, E, n_tail, 0, deltas);
            if (!rc) rc = kvm_seq_push_tokens(&out->seq, out->prompt_ids + E, n_tail);
        }
        r->assemble_ms = ms_since(ta);
        kvm_free(tail);
        kvm_free(deltas);
        if (rc) goto fail;
    reuse_done:
        out->n_cached = N - 1;
        r->recomputed_tokens = 1;
        pv->n_exact = E;
    }
    out->rest_ids = out->prompt_ids + out->n_cached;
    out->n_rest = N - out->n_cached;
    r->anchors_staged = rq->n_staged;
    KVM_ASSERT(r->exact_tokens + r->offset_tokens + r->naive_tokens + r->recomputed_tokens + r->fused_tokens == N);
    (void)t0;
    return 0;
fail:
    kvm_prepared_release(out);
    return rc ? rc : KVM_EINTERNAL;
}

int kvm_comm_complete(kvm_comm_request_t *rq, kvm_prepared_t *p, const kvm_gen_result_t *res, kvm_segment_t **response) {
    if (response) *response = NULL;
    prep_priv_t *pv = p ? p->priv : NULL;
    if (!pv) return kvm_seterr(KVM_EINVAL, "complete: not a prepared prompt");
    kvm_comm_t *c = rq ? rq->c : NULL;
    if (!c) return kvm_seterr(KVM_EINVAL, "complete: a request is required");
    const comm_geom_t *g = &c->g;
    const kvm_template_t *t = pv->tmpl;
    const int N = p->n_prompt;
    if (p->seq.n_tokens < N)
        return kvm_seterr(KVM_EINVAL, "complete: the sequence holds %d tokens, fewer than the %d-token prompt (run "
                          "kvm_generate on rest_ids first)", p->seq.n_tokens, N);
    kvm_comm_report_t *r = &p->report;
    int rc = 0;
    /* ---- DENSE: register the exact prompt blocks; fill deltas of new anchors (§3.8) ---- */
    if (r->mode == KVM_COMM_DENSE) {
        kvm_prefix_index_insert(c->store, &p->seq, N);
        for (int i = 0; t && i < pv->n_ph && !rc; i++) {
            prep_ph_t *ph = &pv->ph[i];
            if (ph->decision != KVM_PH_NEW_ANCHOR && ph->decision != KVM_PH_NO_ANCHOR) continue;
            comm_sample_t *s = &rq->samples[ph->sample];
            float *rph = kvm_malloc(comm_rows_elems(g, ph->T) * sizeof(float));
            float *rpf = kvm_malloc(comm_rows_elems(g, ph->S) * sizeof(float) + 1);
            if (!rph || !rpf) rc = KVM_ENOMEM;
            if (!rc && !s->X) rc = comm_dev_sample_x(c, s); /* device path: the base was left in the pool */
            if (!rc) rc = read_f0(c, &p->seq, ph->t_ph, ph->T, rph);
            if (!rc) rc = read_f0(c, &p->seq, ph->t_pf, ph->S, rpf);
            if (!rc)
                rc = comm_materialize(rq, s, t->agent, t->hash, rph, rpf, t->P[i + 1], ph->S, ph->t_ph, ph->t_pf);
            if (!rc) r->ph[i].materialized = true;
            kvm_free(rph);
            kvm_free(rpf);
        }
        r->anchors_staged = rq->n_staged;
    }
    if (rc) return rc;
    /* ---- statistics ---- */
    c->st.invocations++;
    if (r->mode == KVM_COMM_REUSE) c->st.reuse_invocations++;
    c->st.exact_tokens += (uint64_t)r->exact_tokens;
    c->st.offset_tokens += (uint64_t)r->offset_tokens;
    c->st.naive_tokens += (uint64_t)r->naive_tokens;
    c->st.recomputed_tokens += (uint64_t)r->recomputed_tokens;
    c->st.input_tokens += (uint64_t)r->input_tokens;
    /* ---- the response segment (§2.3) ---- */
    if (!response || !res || res->n_ids <= 0) return 0;
    int rows = p->seq.n_tokens - N;
    if (res->stop_reason == KVM_STOP_LENGTH && c->cfg.resp_last_token == KVM_KVCOMM_RESP_COMPUTE && rows < res->n_ids) {
        kvm_batch_item_t it = {.seq = &p->seq, .tokens = &res->ids[res->n_ids - 1], .n_tokens = 1};
        rc = kvm_forward(c->m, &it, 1);
        if (rc) return rc;
        rows++;
    }
    if (rows <= 0) return 0;
    kvm_segment_info_t meta = {.producer_kind = KVM_PRODUCER_AGENT,
                               .producer_id = t ? t->agent : "",
                               .producer_ctx_hash = kvm_ctx_hash(p->seq.tokens, N),
                               .producer_pos = N};
    return kvm_segment_publish(c->store, &p->seq, N, rows, -N, &meta, response);
}

/* ==== report / stats ==================================================================================== */

int kvm_comm_report_json(const kvm_comm_report_t *r, char *buf, size_t cap) {
    size_t at = 0;
#define PUT(...)                                                                                              \
    do {                                                                                                      \
        int k_ = snprintf(buf + (at < cap ? at : cap), at < cap ? cap - at : 0, __VA_ARGS__);                 \
        if (k_ > 0) at += (size_t)k_;                                                                         \
    } while (0)
    if (!buf) cap = 0;
    PUT("{\"mode\":\"%s\",\"policy\":\"%s\",\"input_tokens\":%d,\"exact\":%d,\"offset\":%d,\"naive\":%d,"
        "\"recomputed\":%d,\"fused\":%d,\"template_hash\":\"%016llx\",\"predict_ms\":%.3f,\"weights_ms\":%.3f,"
        "\"offset_ms\":%.3f,\"assemble_ms\":%.3f,\"anchors_staged\":%d,\"short_recomputed\":%d,"
        "\"selected_recomputed\":%d,\"recompute_items\":%d,\"placeholders\":[",
        r->mode == KVM_COMM_REUSE ? "reuse" : "dense",
        r->policy == KVM_KV_KVCOMM ? "kvcomm" : r->policy == KVM_KV_DENSE ? "text" : "exact", r->input_tokens,
        r->exact_tokens, r->offset_tokens, r->naive_tokens, r->recomputed_tokens, r->fused_tokens,
        (unsigned long long)r->template_hash, r->predict_ms, r->weights_ms, r->offset_ms, r->assemble_ms,
        r->anchors_staged, r->short_recomputed, r->selected_recomputed, r->recompute_items);
    for (int i = 0; i < r->n_placeholders && i < KVM_COMM_MAX_PH; i++) {
        const kvm_comm_ph_report_t *p = &r->ph[i];
        PUT("%s{\"name\":\"%s\",\"segment\":%llu,\"sample\":\"%016llx\",\"tokens\":%d,\"start\":%d,\"text_tokens\":%d,"
            "\"decision\":\"%s\",\"predicted_new\":%s,\"pool\":%d,\"eligible\":%d,\"entropy\":%.4f,\"threshold\":%.4f,"
            "\"top_anchor\":\"%016llx\",\"top_weight\":%.4f,\"materialized\":%s}",
            i ? "," : "", p->name, (unsigned long long)p->segment_id, (unsigned long long)p->sample_key, p->tokens,
            p->start_pos, p->text_tokens, kvm_ph_decision_name(p->decision), p->predicted_new ? "true" : "false",
            p->n_pool, p->n_eligible, p->entropy, p->threshold, (unsigned long long)p->top_anchor, p->top_weight,
            p->materialized ? "true" : "false");
    }
    PUT("]}");
#undef PUT
    return (int)at;
}

void kvm_comm_stats(const kvm_comm_t *c, kvm_comm_stats_t *out) {
    *out = c->st;
    out->n_pools = c->n_pools;
    out->anchor_bytes = c->anchor_bytes;
}

int kvm_comm_pool_stats(const kvm_comm_t *c, int i, kvm_comm_pool_stats_t *out) {
    if (i < 0 || i >= c->n_pools) return kvm_seterr(KVM_ERANGE, "comm: pool %d of %d", i, c->n_pools);
    const comm_pool_t *p = &c->pools[i];
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "%s", p->name);
    out->n_anchors = p->n;
    out->created = p->created;
    out->evicted = p->evicted;
    out->predictions = p->predictions;
    out->predicted_new = p->predicted_new;
    for (int k = 0; k < p->n; k++) out->bytes += p->a[k]->bytes;
    return 0;
}
