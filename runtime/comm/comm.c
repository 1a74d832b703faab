/* comm.c - the comm context, switches, agent templates (kvcomm.md §2.2), shared-content segments (§2.3) and
 * requests. Contract in prompt.h; prompt assembly is in prepare.c, the anchor pools in kvcomm.c, the KVCOMM
 * arithmetic on the backend's ops in kvcomm_dev.c. */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm_internal.h"

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

static const char *const W_NAMES[] = {"l2", "nearest"};
static const char *const CRIT_NAMES[] = {"length+entropy", "length"};
static const char *const NORM_NAMES[] = {"raw", "per_element"};
static const char *const BOUND_NAMES[] = {"strict", "reference"};
static const char *const NOANCHOR_NAMES[] = {"dense", "naive"};
static const char *const RESP_NAMES[] = {"compute", "drop"};
static const char *const DELTA_NAMES[] = {"q8", "kv"};
static const char *const RANK_NAMES[] = {"spread", "attention", "attention_spread"};
/* research switches that ran only on the removed host path (kvcomm.md §3 says why each went) */
static const char *const REMOVED[] = {"frame", "align", "align_window", "recompute_select"};

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
    BOOLSW("guard", guard)
    ENUMSW("weights", weights, W_NAMES, "l2|nearest")
    ENUMSW("criterion", criterion, CRIT_NAMES, "length+entropy|length")
    ENUMSW("dist_norm", dist_norm, NORM_NAMES, "raw|per_element")
    ENUMSW("pool_bound", pool_bound, BOUND_NAMES, "strict|reference")
    ENUMSW("no_anchor", no_anchor, NOANCHOR_NAMES, "dense|naive")
    ENUMSW("resp_last_token", resp_last_token, RESP_NAMES, "compute|drop")
    ENUMSW("deltas", deltas, DELTA_NAMES, "q8|kv")
    ENUMSW("recompute_rank", recompute_rank, RANK_NAMES, "spread|attention|attention_spread")
#undef BOOLSW
#undef ENUMSW
    if (!strcmp(k, "gamma")) {
        double g = strtod(value, &end);
        bad = end == value || *end || !(g >= 0 && g <= 1e6);
        if (bad) return kvm_seterr(KVM_EINVAL, "kvcomm.gamma: '%s' is not a non-negative number", value);
        c->gamma = (float)g;
        return 0;
    }
    if (!strcmp(k, "max_anchors") || !strcmp(k, "evict_window") || !strcmp(k, "anchor_budget_bytes")) {
        long long v = strtoll(value, &end, 10);
        if (end == value || *end || v < 1) return kvm_seterr(KVM_EINVAL, "kvcomm.%s: '%s' is not a positive integer", k, value);
        if (!strcmp(k, "max_anchors") && v >= KVM_KVCOMM_MAX_ANCHORS)
            return kvm_seterr(KVM_EINVAL, "kvcomm.max_anchors: %lld is more than %d (a pool may reach V + 1 anchors; the "
                              "KVCOMM ops take %d)", v, KVM_KVCOMM_MAX_ANCHORS - 1, KVM_KVCOMM_MAX_ANCHORS);
        if (!strcmp(k, "max_anchors")) c->max_anchors = (int)v;
        else if (!strcmp(k, "evict_window")) c->evict_window = (int)v;
        else c->anchor_budget_bytes = (size_t)v;
        return 0;
    }
    if (!strcmp(k, "recompute_below") || !strcmp(k, "recompute_text")) { /* ours: the recompute pass of kvm_comm_prepare */
        long long v = strtoll(value, &end, 10);
        if (end == value || *end || v < 0 || v > 1000000)
            return kvm_seterr(KVM_EINVAL, "kvcomm.%s: '%s' is not a token count >= 0 (0 = off)", k, value);
        *(k[10] == 'b' ? &c->recompute_below : &c->recompute_text) = (int)v;
        return 0;
    }
    if (!strcmp(k, "preset")) { /* spec = the defaults; blend = ours, kvcomm.md §5.2 */
        if (!strcmp(value, "spec")) {
            kvm_kvcomm_config_default(c);
        } else if (!strcmp(value, "blend")) {
            kvm_kvcomm_ablation(c, "full");
            c->recompute_below = KVM_KVCOMM_BLEND_BELOW;
            c->recompute_text = 64;
            c->recompute_frac = KVM_KVCOMM_BLEND_FRAC;
            c->guard = true;
        } else {
            return kvm_seterr(KVM_EINVAL, "kvcomm.preset: '%s' is not one of spec|blend", value);
        }
        return 0;
    }
    if (!strcmp(k, "ablation")) return kvm_kvcomm_ablation(c, value); /* the paper's Tab. 5 rows */
    if (!strcmp(k, "recompute_spread")) { /* ours: the recompute pass's gate on the predicted offset error */
        double f = strtod(value, &end);
        if (end == value || *end || !(f >= 0 && f <= 1e6))
            return kvm_seterr(KVM_EINVAL, "kvcomm.recompute_spread: '%s' is not a non-negative number (0 = off)", value);
        c->recompute_spread = (float)f;
        return 0;
    }
    if (!strcmp(k, "recompute_frac")) { /* ours: the recompute pass of kvm_comm_prepare */
        double f = strtod(value, &end);
        if (end == value || *end || !(f >= 0 && f <= 1))
            return kvm_seterr(KVM_EINVAL, "kvcomm.recompute_frac: '%s' is not a fraction in [0, 1] (0 = off)", value);
        c->recompute_frac = (float)f;
        return 0;
    }
    for (size_t i = 0; i < sizeof REMOVED / sizeof REMOVED[0]; i++)
        if (!strcmp(k, REMOVED[i]))
            return kvm_seterr(KVM_EINVAL, "kvcomm.%s was removed: it ran only on the host path that KVCOMM no longer has "
                              "(docs/kvcomm.md §3)", k);
    return kvm_seterr(KVM_EINVAL, "unknown KVCOMM switch '%s' (known: enable rotate ph_offset pf_offset weights criterion "
                      "gamma max_anchors evict_window dist_norm pool_bound no_anchor resp_last_token force_reuse "
                      "anchor_budget_bytes recompute_below recompute_text recompute_frac recompute_spread recompute_rank guard deltas "
                      "preset ablation)", key);
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
    char spread[128] = ""; /* printed when on, so the lines of the other settings stay as they were */
    if (c->recompute_spread > 0) snprintf(spread, sizeof spread, " recompute_spread=%g", (double)c->recompute_spread);
    if (c->guard) snprintf(spread + strlen(spread), sizeof spread - strlen(spread), " guard=on");
    if (c->deltas) snprintf(spread + strlen(spread), sizeof spread - strlen(spread), " deltas=%s", DELTA_NAMES[c->deltas % 2]);
    if (c->recompute_rank)
        snprintf(spread + strlen(spread), sizeof spread - strlen(spread), " recompute_rank=%s", RANK_NAMES[c->recompute_rank % 3]);
    snprintf(buf, cap,
             "enable=%s rotate=%s ph_offset=%s pf_offset=%s weights=%s criterion=%s gamma=%.2f V=%d W=%d dist_norm=%s "
             "pool_bound=%s no_anchor=%s resp_last_token=%s force_reuse=%s recompute_below=%d recompute_text=%d "
             "recompute_frac=%.2f%s",
             c->enable ? "on" : "off", c->rotate ? "on" : "off", c->ph_offset ? "on" : "off", c->pf_offset ? "on" : "off",
             W_NAMES[c->weights % 2], CRIT_NAMES[c->criterion % 2], c->gamma, c->max_anchors, c->evict_window,
             NORM_NAMES[c->dist_norm % 2], BOUND_NAMES[c->pool_bound % 2], NOANCHOR_NAMES[c->no_anchor % 2],
             RESP_NAMES[c->resp_last_token % 2], c->force_reuse ? "on" : "off", c->recompute_below, c->recompute_text,
             c->recompute_frac, spread);
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
    c->g = (comm_geom_t){m->cfg.n_layers, m->cfg.n_kv_heads, m->cfg.head_dim, 4}; /* esize: below, once the pool is there */
    c->pool = kvm_model_kv_pool(m, opts ? opts->kv_budget_bytes : 0);
    if (!c->pool) {
        kvm_free(c);
        return NULL;
    }
    c->g.esize = c->pool->ops == kvm_ops_cpu() && c->pool->geom.dtype == KVM_F32 ? 4 : (int)kvm_dtype_size(c->pool->geom.dtype);
    kvm_rope_params_t rp = {.inv_freq = m->inv_freq, .n_freq = m->cfg.head_dim / 2, .layout = m->cfg.rope_layout};
    c->store = kvm_kv_store_create(c->pool, &rp);
    if (!c->store) {
        kvm_kv_pool_free(c->pool);
        kvm_free(c);
        return NULL;
    }
    kvm_kv_store_set_holder(c->store, comm_reclaim_anchor, c);
    comm_dev_check(c, c->kvcomm_off, sizeof c->kvcomm_off);
    if (c->kvcomm_off[0]) KVM_LOGW("comm: KVCOMM is off on this model (the KVCOMM policy prepares dense): %s", c->kvcomm_off);
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
    kvm_free(c->guards);
    comm_dev_ctx_free(c);
    kvm_kv_store_free(c->store);
    kvm_kv_pool_free(c->pool);
    kvm_free(c);
}

kvm_kv_store_t *kvm_comm_store(kvm_comm_t *c) { return c->store; }
kvm_model_t *kvm_comm_model(kvm_comm_t *c) { return c->m; }
kvm_kvcomm_config_t *kvm_comm_config(kvm_comm_t *c) { return &c->cfg; }

/* Runs ids through the model on seq (no logits), in chunks. */
int comm_prefill(kvm_comm_t *c, kvm_seq_t *seq, const int32_t *ids, int n) {
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
int comm_read_f0(kvm_comm_t *c, const kvm_seq_t *seq, int pos, int n, float *out) {
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

/* The caller's pieces of template `agent` (kvcomm.md §2.2 rules); 0 or KVM_EINVAL naming the piece. */
static int tmpl_validate(const kvm_model_t *m, const kvm_template_desc_t *d, const char *agent) {
    int n_ph = 0;
    for (int i = 0; i < d->n_pieces; i++) {
        const kvm_piece_t *p = &d->pieces[i];
        if (p->kind == KVM_PIECE_PLACEHOLDER) {
            if (!valid_ph_name(p->text))
                return kvm_seterr(KVM_EINVAL, "template '%s': piece %d: bad placeholder name '%s' (input, tool:<n>, "
                                  "agent:<n>:current, agent:<n>:prev, state:<k>)", agent, i, p->text ? p->text : "(null)");
            if (i > 0 && d->pieces[i - 1].kind == KVM_PIECE_PLACEHOLDER)
                return kvm_seterr(KVM_EINVAL, "template '%s': placeholders %d and %d have no text between them", agent,
                                  i - 1, i);
            if (++n_ph > KVM_COMM_MAX_PH)
                return kvm_seterr(KVM_EINVAL, "template '%s': more than %d placeholders", agent, KVM_COMM_MAX_PH);
        } else if (p->kind == KVM_PIECE_TEXT) {
            if (p->ids ? p->n_ids <= 0 : (!p->text || is_blank(p->text)))
                return kvm_seterr(KVM_EINVAL, "template '%s': text piece %d is empty or whitespace only (it would "
                                  "misalign placeholders and text segments, kvcomm.md §2.2)", agent, i);
            if (p->ids && !d->raw)
                return kvm_seterr(KVM_EINVAL, "template '%s': piece %d gives token ids, which only raw templates take",
                                  agent, i);
        } else {
            return kvm_seterr(KVM_EINVAL, "template '%s': piece %d has unknown kind %d", agent, i, (int)p->kind);
        }
    }
    if (d->raw && (d->pieces[0].kind != KVM_PIECE_TEXT || d->pieces[d->n_pieces - 1].kind != KVM_PIECE_TEXT))
        return kvm_seterr(KVM_EINVAL, "template '%s': a raw template must start and end with text (every placeholder "
                          "needs exactly one non-empty text segment after it)", agent);
    if (!d->raw && !m->tok)
        return kvm_seterr(KVM_EINVAL, "template '%s': model %s has no tokenizer; give token ids in a raw template", agent,
                          m->name);
    return 0;
}

/* The user message of a chat template rendered in the model's chat format (system + user + assistant header) with
 * a marker in each placeholder; t->ph_name and t->n_ph are filled. *out: one allocation. */
static int tmpl_render_chat(const kvm_model_t *m, const kvm_template_desc_t *d, kvm_template_t *t, char **out) {
    size_t len = 1;
    for (int i = 0; i < d->n_pieces; i++) len += strlen(d->pieces[i].text) + 32;
    char *user = kvm_malloc(len), *rendered = NULL;
    if (!user) return KVM_ENOMEM;
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
    int rc = kvm_prompt_render(m, d->system, user, &rendered);
    kvm_free(user);
    *out = rc ? NULL : rendered;
    return rc;
}

int kvm_prompt_render(const kvm_model_t *m, const char *system, const char *user, char **out) {
    *out = NULL;
    kvm_chat_msg_t msgs[2];
    int nm = 0;
    char *rendered = NULL;
    if (system && *system) msgs[nm++] = (kvm_chat_msg_t){"system", system};
    msgs[nm++] = (kvm_chat_msg_t){"user", user};
    int rc = kvm_chat_render(m->cfg.chat_format, msgs, nm, true, &rendered);
    if (!rc && m->cfg.chat_format == KVM_CHAT_NONE && system && *system) {
        /* plain concatenation: keep the system text apart from the user text by a newline */
        char *r2 = kvm_malloc(strlen(rendered) + 2);
        if (!r2) rc = KVM_ENOMEM;
        else {
            size_t sl = strlen(system);
            memcpy(r2, rendered, sl);
            r2[sl] = '\n';
            strcpy(r2 + sl + 1, rendered + sl);
            kvm_free(rendered);
            rendered = r2;
        }
    }
    if (rc) kvm_free(rendered);
    else *out = rendered;
    return rc;
}

/* Renders the template into alternating text / placeholder pieces tp[0..*ntp) (text owned by tp). */
static int tmpl_pieces(const kvm_model_t *m, const kvm_template_desc_t *d, kvm_template_t *t, tpiece_t *tp, int *ntp) {
    if (d->raw) {
        for (int i = 0; i < d->n_pieces; i++) {
            const kvm_piece_t *p = &d->pieces[i];
            tp[*ntp].ph = p->kind == KVM_PIECE_PLACEHOLDER;
            if (tp[*ntp].ph) snprintf(t->ph_name[t->n_ph], KVM_COMM_NAME_MAX, "%s", p->text), tp[*ntp].ph_index = t->n_ph++;
            else if (p->ids) tp[*ntp].ids = p->ids, tp[*ntp].n_ids = p->n_ids;
            else if (!(tp[*ntp].text = kvm_strdup(p->text))) return KVM_ENOMEM;
            (*ntp)++;
        }
        return 0;
    }
    char *rendered = NULL;
    int rc = tmpl_render_chat(m, d, t, &rendered);
    const int k = t->n_ph;
    char *p = rendered;
    for (int i = 0; i <= k && !rc; i++) {
        char *mk = i < k ? strstr(p, PH_MARK) : NULL;
        size_t tl = mk ? (size_t)(mk - p) : strlen(p);
        if (tl == 0 || (i > 0 && is_blank_n(p, tl))) {
            rc = kvm_seterr(KVM_EINVAL, "template '%s': the text %s placeholder %d is empty or whitespace only after "
                            "rendering", t->agent, i == 0 ? "before" : "after", i == 0 ? 1 : i);
            break;
        }
        if (!(tp[*ntp].text = kvm_malloc(tl + 1))) rc = KVM_ENOMEM;
        if (rc) break;
        memcpy(tp[*ntp].text, p, tl);
        tp[*ntp].text[tl] = 0;
        (*ntp)++;
        if (mk) {
            tp[*ntp].ph = true;
            tp[*ntp].ph_index = i;
            (*ntp)++;
            p = mk + strlen(PH_MARK) + 3;
        }
    }
    kvm_free(rendered);
    return rc;
}

/* Tokenizes each text piece on its own (BOS on the first when the model adds one), a dummy in each placeholder;
 * fills t->ids, t->n_ids and the spans ts/te, ps/pe. */
static int tmpl_tokenize(const kvm_model_t *m, kvm_template_t *t, const tpiece_t *tp, int ntp) {
    int32_t *ids = NULL, *dummy = NULL;
    int n_ids = 0, cap_ids = 0, n_dummy = 0, ti = 0, rc = 0;
    if (m->tok) rc = kvm_tokenize(m->tok, "[...]", 5, 0, &dummy, &n_dummy);
    for (int i = 0; i < ntp && !rc; i++) {
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
            continue;
        }
        t->ts[ti] = n_ids;
        if (tp[i].ids) {
            rc = append_ids(&ids, &n_ids, &cap_ids, tp[i].ids, tp[i].n_ids);
        } else {
            int32_t *pid = NULL;
            int np = 0;
            int flags = KVM_TOK_PARSE_SPECIAL | (i == 0 && m->cfg.add_bos ? KVM_TOK_ADD_BOS : 0);
            rc = kvm_tokenize(m->tok, tp[i].text, strlen(tp[i].text), flags, &pid, &np);
            if (!rc && np <= 0) rc = kvm_seterr(KVM_EINVAL, "template '%s': text piece %d tokenizes to nothing", t->agent, i);
            if (!rc) rc = append_ids(&ids, &n_ids, &cap_ids, pid, np);
            kvm_free(pid);
        }
        t->te[ti++] = n_ids;
    }
    kvm_free(dummy);
    if (!rc && ti != t->n_ph + 1)
        rc = kvm_seterr(KVM_EINVAL, "template '%s': expected %d text segments around %d placeholders, found %d", t->agent,
                        t->n_ph + 1, t->n_ph, ti);
    if (rc) {
        kvm_free(ids);
        return rc;
    }
    t->ids = ids;
    t->n_ids = n_ids;
    return 0;
}

/* Hashes the template (agent, names, text ids), prefills it once and keeps its text segments: segment 0 as an
 * exact prefix (shared by reference, in the prefix index), segments 1..n re-based to F0 (host and backend copies). */
static int tmpl_prefill(kvm_comm_t *c, kvm_template_t *t) {
    t->hash = kvm_hash64(t->agent, strlen(t->agent), KVM_HASH_SEED);
    for (int i = 0; i < t->n_ph; i++) t->hash = kvm_hash64(t->ph_name[i], strlen(t->ph_name[i]), t->hash);
    for (int i = 0; i <= t->n_ph; i++)
        t->hash = kvm_hash64(t->ids + t->ts[i], (size_t)(t->te[i] - t->ts[i]) * sizeof(int32_t), t->hash);
    int rc = comm_prefill(c, &t->seq, t->ids, t->n_ids);
    for (int i = 1; i <= t->n_ph && !rc; i++) {
        int S = t->te[i] - t->ts[i];
        t->P[i] = kvm_malloc(comm_rows_elems(&c->g, S) * sizeof(float));
        rc = t->P[i] ? comm_read_f0(c, &t->seq, t->ts[i], S, t->P[i]) : KVM_ENOMEM;
    }
    /* the op path reads the text segments from backend copies: make them now rather than in the template's first
     * REUSE request, whose TTFT would otherwise pay the uploads */
    if (!rc && !c->kvcomm_off[0]) rc = comm_dev_template_prepare(t);
    if (rc) return rc;
    kvm_seq_truncate(&t->seq, t->te[0]);
    kvm_prefix_index_insert(c->store, &t->seq, t->seq.n_tokens);
    return 0;
}

kvm_template_t *kvm_template_create(kvm_comm_t *c, const kvm_template_desc_t *d) {
    if (!c || !d || !d->pieces || d->n_pieces <= 0) {
        kvm_seterr(KVM_EINVAL, "template: no pieces");
        return NULL;
    }
    const char *agent = d->agent && *d->agent ? d->agent : "agent";
    if (tmpl_validate(c->m, d, agent)) return NULL;
    kvm_template_t *t = kvm_calloc(1, sizeof *t);
    if (!t) return NULL;
    t->c = c;
    t->agent = kvm_strdup(agent);
    kvm_seq_init(&t->seq, c->pool);
    tpiece_t tp[2 * KVM_COMM_MAX_PH + 2];
    int ntp = 0;
    memset(tp, 0, sizeof tp);
    int rc = t->agent ? tmpl_pieces(c->m, d, t, tp, &ntp) : KVM_ENOMEM;
    if (!rc) rc = tmpl_tokenize(c->m, t, tp, ntp);
    if (!rc) rc = tmpl_prefill(c, t);
    for (int i = 0; i < ntp; i++) kvm_free(tp[i].text);
    if (!rc) return t;
    if (!kvm_errcode()) kvm_seterr(KVM_ENOMEM, "template '%s': out of memory", agent);
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
