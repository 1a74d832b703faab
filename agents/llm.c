/* llm.c - agent steps on models through runtime/comm and runtime/sched (see llm.h). */
#include "llm.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "../runtime/comm/c2c.h"
#include "../runtime/comm/c2c_align.h"
#include "../runtime/comm/prompt.h"
#include "../runtime/model/mock_model.h"
#include "../runtime/sched/sched.h"

int wf_kv_policy_parse(const char *s) {
    kvm_kv_policy_t p;
    return s && kvm_kv_policy_parse(s, &p) == 0 ? (int)p : -1;
}

/* ---- jobs and models -------------------------------------------------------------------------- */

typedef struct job {
    wf_llm_result_t res;
    int model;
    uint64_t t_submit;
    kvm_prepared_t prep;     /* the assembled prompt (its seq holds the reused/computed KV) */
    bool has_prep;
    kvm_comm_request_t *rq;  /* the run's KVCOMM request (borrowed from the model) */
    kvm_segment_t *bound[KVM_COMM_MAX_PH]; /* references held while the step runs */
    int n_bound;
    char *run_id, *agent;
    double prepare_ms;
    /* deferred (admission control, docs/kv-store.md): the KV pool could not hold the step beside the others;
     * prepared again, oldest first, as KV frees up, or failed once it has waited kv_wait_ms */
    bool deferred;
    uint64_t wait_since;     /* when it first waited for KV (0: never) */
    uint64_t tmpl_key;       /* the template its prepared prompt points at (tmpl_held) */
    bool tmpl_held;
    wf_llm_req_t req;        /* owned copy of the request (strings below) */
    wf_piece_t *rq_pieces;
    wf_turn_t *rq_turns;
    char **rq_strs;
    int n_rq_strs;
    bool done;
    bool canceled;           /* its run ended: stop at the next token (wf_llm_cancel_run) */
    uint64_t deadline;       /* req.timeout_ms after submit or retry (0: none); checked at every token */
    bool timed_out;          /* stopped at its deadline */
    bool over_budget;        /* stopped at the run's wall-time budget (req.run_deadline_ns) */
    int attempts;            /* calls made so far (1 + retries) */
    uint64_t not_before;     /* a retry waits for its backoff until then */
    struct wf_llm *l;        /* the engine, for the token hook */
    kvm_account_t *acct;     /* req.acct, retained: what the step allocates is charged there */
    uint64_t refused0;       /* its refusals when the step was submitted */
    struct job *next;
} job_t;

/* Per model: templates (one per agent and template text), the live KVCOMM requests (one per run)
 * and the segments bound to placeholders (per run and placeholder name, with the text they hold). */
typedef struct ltmpl {
    char *agent;
    uint64_t key;            /* hash of system + pieces (text and names) */
    kvm_template_t *t;       /* NULL when comm/ rejected the template */
    char *err;               /* why it was rejected (the step then runs on plain ids, dense) */
    int users;               /* jobs whose prepared prompt points at t (it is not evicted while > 0) */
} ltmpl_t;

/* A segment bound to (run, placeholder) with the text it holds. Only its id is kept: between steps
 * the store may evict it under memory pressure (it is then computed again when needed); a step
 * holds references to its bound segments from prepare to complete. */
typedef struct lseg {
    char *run, *name, *text;
    uint64_t seg_id;
} lseg_t;

typedef struct lreq {
    char *run;
    kvm_comm_request_t *rq;
} lreq_t;

typedef struct lmodel {
    char *path;
    kvm_model_t *m;          /* any model, the mock ones included (mock_model.h) */
    kvm_comm_t *comm;        /* KV store + KVCOMM over the model's pool */
    kvm_sched_t *sched;
    ltmpl_t *tmpls;
    int n_tmpls;
    lseg_t *segs;
    int n_segs;
    lreq_t *reqs;
    int n_reqs;
    uint64_t last_done;      /* when a step of this model last finished (KV was freed): kv_wait_ms counts from it */
} lmodel_t;

/* A C2C fuser opened for a (receiver, sharer) pair of the engine's models. */
typedef struct lc2c {
    char *path;
    int receiver, sharer;
    kvm_c2c_fuser_t *f;
} lc2c_t;

struct wf_llm {
    wf_llm_opts_t o;
    lmodel_t *models;
    int n_models;
    lc2c_t *c2c;
    int n_c2c;
    job_t *jobs;             /* submitted, not taken */
    int n_jobs;
    uint64_t steps, seqs;
    int max_seqs;
};

wf_llm_t *wf_llm_create(const wf_llm_opts_t *o) {
    wf_llm_t *l = kvm_calloc(1, sizeof *l);
    if (!l) return NULL;
    if (o) l->o = *o;
    return l;
}

/* Whether the step's memory account refused an allocation since the step was submitted: the run is at its memory cap,
 * so an out-of-memory failure of the step is that, not a full KV pool to wait for. */
static bool job_over_cap(const job_t *j) { return j->acct && kvm_account_refusals(j->acct) > j->refused0; }

static int job_cap_error(const job_t *j) {
    return kvm_seterr(KVM_ELUA_MEMORY, "agent '%s': the step does not fit its run's memory cap (%zu bytes, %zu in use): %s",
                      j->req.agent ? j->req.agent : "?", kvm_account_cap(j->acct), kvm_account_bytes(j->acct), kvm_errmsg());
}

static void job_free(job_t *j) {
    if (!j) return;
    kvm_account_t *acct = j->acct;
    wf_llm_result_clear(&j->res);
    if (j->has_prep) kvm_prepared_release(&j->prep);
    for (int i = 0; i < j->n_bound; i++) kvm_segment_release(j->bound[i]);
    for (int i = 0; i < j->n_rq_strs; i++) kvm_free(j->rq_strs[i]);
    kvm_free(j->rq_strs);
    kvm_free(j->rq_pieces);
    kvm_free(j->rq_turns);
    kvm_free(j->run_id);
    kvm_free(j->agent);
    kvm_free(j);
    kvm_account_release(acct);
}

/* <state_dir>/<the anchor file name of m> */
static int state_path(const wf_llm_t *l, const lmodel_t *m, char *buf, size_t cap) {
    char name[160];
    kvm_comm_anchors_file_name(m->comm, name, sizeof name);
    return kvm_path_join(buf, cap, l->o.state_dir, name);
}

/* Anchors of the state folder into a model just opened. No file: a first start. A file that does not check out
 * is set aside as <file>.bad (never read again, never overwritten) and the model starts without anchors. */
static void state_load(const wf_llm_t *l, lmodel_t *m) {
    char path[4096];
    int n = 0;
    if (!l->o.state_dir || !m->comm || kvm_model_is_mock(m->m) || state_path(l, m, path, sizeof path)) return;
    int rc = kvm_comm_load_anchors(m->comm, path, &n);
    if (!rc) {
        if (!l->o.quiet) KVM_LOGI("state: %d anchors of %s from %s", n, m->m->name, path);
        return;
    }
    if (rc == KVM_ENOENT) return;
    char bad[4200];
    snprintf(bad, sizeof bad, "%s.bad", path);
    /* an error, not a warning: what the runtime learned is lost, and batch runs show errors only */
    KVM_LOGE("state: %s; set aside as %s, starting without anchors", kvm_errmsg(), bad);
    if (rename(path, bad) != 0) KVM_LOGW("state: cannot set '%s' aside", path);
}

int wf_llm_save_state(wf_llm_t *l) {
    int first = 0;
    for (int i = 0; l && l->o.state_dir && i < l->n_models; i++) {
        lmodel_t *m = &l->models[i];
        char path[4096];
        if (!m->comm || kvm_model_is_mock(m->m)) continue;
        int rc = state_path(l, m, path, sizeof path);
        if (!rc) rc = kvm_comm_save_anchors(m->comm, path);
        if (rc && !first) first = kvm_errctx(rc, "state: model '%s'", m->path);
    }
    return first;
}

void wf_llm_free(wf_llm_t *l) {
    if (!l) return;
    if (wf_llm_save_state(l)) KVM_LOGW("%s: the anchors learned since the last save are lost", kvm_errmsg());
    for (job_t *j = l->jobs, *n; j; j = n) {
        n = j->next;
        job_free(j);
    }
    for (int i = 0; i < l->n_c2c; i++) {
        kvm_c2c_free(l->c2c[i].f);
        kvm_free(l->c2c[i].path);
    }
    kvm_free(l->c2c);
    for (int i = 0; i < l->n_models; i++) {
        lmodel_t *m = &l->models[i];
        if (m->sched) kvm_sched_free(m->sched);
        for (int k = 0; k < m->n_segs; k++) {
            kvm_free(m->segs[k].run);
            kvm_free(m->segs[k].name);
            kvm_free(m->segs[k].text);
        }
        kvm_free(m->segs);
        for (int k = 0; k < m->n_reqs; k++) {
            kvm_comm_request_abort(m->reqs[k].rq);
            kvm_free(m->reqs[k].run);
        }
        kvm_free(m->reqs);
        for (int k = 0; k < m->n_tmpls; k++) {
            kvm_template_free(m->tmpls[k].t);
            kvm_free(m->tmpls[k].agent);
            kvm_free(m->tmpls[k].err);
        }
        kvm_free(m->tmpls);
        if (m->comm) kvm_comm_free(m->comm);
        if (m->m) kvm_model_free(m->m);
        kvm_free(m->path);
    }
    kvm_free(l->models);
    kvm_free(l);
}

/* Applies "KEY=VALUE" KVCOMM switches in order. */
static int apply_switches(kvm_kvcomm_config_t *c, const char *const *sets, int n) {
    int rc = 0;
    for (int i = 0; !rc && i < n; i++) {
        char key[128];
        const char *kv = sets[i], *eq = strchr(kv, '=');
        if (!eq) return kvm_seterr(KVM_EINVAL, "--kvcomm takes KEY=VALUE (got '%s')", kv);
        snprintf(key, sizeof key, "%.*s", (int)(eq - kv), kv);
        rc = kvm_kvcomm_config_set(c, key, eq + 1);
    }
    return rc;
}

/* The KVCOMM settings of a model into co: the default policy, then the model's own switches (`sets`, from
 * kvmesh.model{kvcomm = {...}}), then the engine's options (ablation, then KEY=VALUE switches: the CLI, the API's
 * runtime parameters and the daemon's), which win. */
static int comm_opts(const wf_llm_opts_t *o, const char *const *sets, int n_sets, kvm_kvcomm_config_t *cfg) {
    kvm_kvcomm_config_default(cfg);
    /* The runtime's KVCOMM keeps the answers of dense: preset=blend (docs/kvcomm.md §5.2) unless the switches ask
     * for the paper's policy (preset=spec resets to it) or one of its ablations (they are rows of the paper's
     * table, on its settings). */
    bool paper = o->kvcomm_ablation != NULL;
    for (int i = 0; i < o->n_kvcomm_set; i++) paper |= !strncmp(o->kvcomm_set[i], "ablation=", 9);
    for (int i = 0; i < n_sets; i++) paper |= !strncmp(sets[i], "ablation=", 9);
    if (!paper) kvm_kvcomm_config_set(cfg, "preset", "blend");
    int rc = apply_switches(cfg, sets, n_sets);
    if (!rc && o->kvcomm_ablation) rc = kvm_kvcomm_ablation(cfg, o->kvcomm_ablation);
    if (!rc) rc = apply_switches(cfg, o->kvcomm_set, o->n_kvcomm_set);
    return rc;
}

int wf_llm_model_open(wf_llm_t *l, const char *path, const char *const *kvcomm, int n_kvcomm, int *idx) {
    *idx = -3;
    if (!path || !*path) return kvm_seterr(KVM_EINVAL, "model: empty path");
    kvm_comm_opts_t co = {.kv_budget_bytes = l->o.kv_bytes, .kvcomm_set = true};
    int rc = comm_opts(&l->o, kvcomm, n_kvcomm, &co.kvcomm);
    if (rc) return kvm_errctx(rc, "model '%s'", path);
    for (int i = 0; i < l->n_models; i++)
        if (!strcmp(l->models[i].path, path)) {
            char want[512], have[512];
            kvm_kvcomm_config_str(&co.kvcomm, want, sizeof want);
            kvm_kvcomm_config_str(kvm_comm_config(l->models[i].comm), have, sizeof have);
            if (strcmp(want, have))
                return kvm_seterr(KVM_EINVAL, "model '%s' is already open with other KVCOMM switches (%s); one model "
                                  "has one KVCOMM configuration", path, have);
            *idx = i;
            return 0;
        }
    lmodel_t *nm = kvm_realloc(l->models, (size_t)(l->n_models + 1) * sizeof *nm);
    if (!nm) return KVM_ENOMEM;
    l->models = nm;
    lmodel_t *m = &l->models[l->n_models];
    memset(m, 0, sizeof *m);
    if (!(m->path = kvm_strdup(path))) return KVM_ENOMEM;
    kvm_model_params_t lo = l->o.model;
    lo.quiet = lo.quiet || l->o.quiet;
    m->m = kvm_model_load(path, &lo); /* "mock:echo" too: the mock model plugs in below the scheduler */
    if (!m->m && kvm_errcode() != KVM_ENOMEM) *idx = -1;
    if (m->m && !m->m->tok && !kvm_model_is_mock(m->m) && strncmp(path, "synthetic:", 10)) {
        /* agents speak text: only synthetic weights (benchmarks) run on hashed words */
        kvm_seterr(KVM_EINVAL, "the model has no tokenizer (no tokenizer.json or tokenizer.bin was found with it): "
                               "agents read and write text, so put the model's tokenizer beside its weights");
        kvm_model_free(m->m);
        m->m = NULL;
        *idx = -2;
    }
    m->comm = m->m ? kvm_comm_create(m->m, &co) : NULL;
    kvm_sched_opts_t so = {.max_rows = l->o.max_rows, .max_active = l->o.max_active};
    m->sched = m->comm ? kvm_sched_create(m->m, &so) : NULL;
    if (!m->sched) {
        rc = kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
        if (m->comm) kvm_comm_free(m->comm);
        kvm_model_free(m->m);
        kvm_free(m->path);
        return kvm_errctx(rc, "model '%s'", path);
    }
    state_load(l, m);
    *idx = l->n_models++;
    return 0;
}

const kvm_model_t *wf_llm_model(const wf_llm_t *l, int idx) { return idx >= 0 && idx < l->n_models ? l->models[idx].m : NULL; }

const char *wf_llm_model_name(const wf_llm_t *l, int idx) {
    if (idx < 0 || idx >= l->n_models) return "?";
    return l->models[idx].m->name;
}

void wf_llm_model_describe(const wf_llm_t *l, int idx, wf_llm_model_info_t *out) {
    memset(out, 0, sizeof *out);
    if (idx < 0 || idx >= l->n_models) return;
    const lmodel_t *m = &l->models[idx];
    kvm_trace_model_t *t = &out->t;
    t->path = m->path;
    const kvm_config_t *c = &m->m->cfg;
    t->engine = kvm_model_is_mock(m->m) ? "mock" : "model";
    t->name = m->m->name;
    t->arch = c->arch_name;
    t->n_layers = c->n_layers;
    t->dim = c->dim;
    t->vocab_size = c->vocab_size;
    t->max_seq_len = c->max_seq_len;
    t->chat_format = kvm_chat_format_name(c->chat_format);
    snprintf(out->model_id, sizeof out->model_id, "%016llx", (unsigned long long)m->m->model_id);
    t->model_id = out->model_id;
    kvm_model_describe(m->m, out->describe, sizeof out->describe);
    t->describe = out->describe;
    if (m->comm) {
        kvm_kvcomm_config_str(kvm_comm_config(m->comm), out->kvcomm, sizeof out->kvcomm);
        t->kvcomm = out->kvcomm;
    }
}

/* ---- rendering -------------------------------------------------------------------------------- */

static char *join_pieces(const wf_piece_t *p, int n) {
    size_t len = 1;
    for (int i = 0; i < n; i++) len += p[i].text ? strlen(p[i].text) : 0;
    char *s = kvm_malloc(len), *w = s;
    if (!s) return NULL;
    for (int i = 0; i < n; i++)
        if (p[i].text) {
            size_t k = strlen(p[i].text);
            memcpy(w, p[i].text, k);
            w += k;
        }
    *w = '\0';
    return s;
}

char *wf_llm_render_plain(const char *system, const wf_piece_t *pieces, int n) {
    char *user = join_pieces(pieces, n);
    if (!user) return NULL;
    if (!system || !*system) return user;
    size_t a = strlen(system), b = strlen(user);
    char *s = kvm_malloc(a + b + 3);
    if (s) {
        memcpy(s, system, a);
        memcpy(s + a, "\n\n", 2);
        memcpy(s + a + 2, user, b + 1);
    }
    kvm_free(user);
    return s;
}

/* The prompt of a tool-call continuation: system, user, then the turns, rendered in the model's chat format and
 * tokenized with its special tokens. ChatML only (Qwen's tool-call convention); the mock model answers the last
 * turn. */
static int encode_turns(const kvm_model_t *mm, const wf_llm_req_t *r, const char *user, int32_t **ids, int *n) {
    if (kvm_model_is_mock(mm)) return kvm_prompt_encode(mm, r->system, r->turns[r->n_turns - 1].content, false, ids, n);
    if (!mm->tok || mm->cfg.chat_format != KVM_CHAT_CHATML)
        return kvm_seterr(KVM_EUNSUPPORTED, "agent '%s': model-driven tool calls need a model with the ChatML chat format "
                          "(Qwen's <tool_call> convention); model %s has another or none", r->agent ? r->agent : "?", mm->name);
    kvm_chat_msg_t *msgs = kvm_calloc((size_t)r->n_turns + 2, sizeof *msgs);
    if (!msgs) return KVM_ENOMEM;
    int k = 0;
    if (r->system && *r->system) msgs[k++] = (kvm_chat_msg_t){"system", r->system};
    msgs[k++] = (kvm_chat_msg_t){"user", user};
    for (int i = 0; i < r->n_turns; i++) msgs[k++] = (kvm_chat_msg_t){r->turns[i].role, r->turns[i].content};
    char *text = NULL;
    int rc = kvm_chat_render(mm->cfg.chat_format, msgs, k, true, &text);
    kvm_free(msgs);
    if (rc) return rc;
    rc = kvm_tokenize(mm->tok, text, strlen(text), (mm->cfg.add_bos ? KVM_TOK_ADD_BOS : 0) | KVM_TOK_PARSE_SPECIAL, ids, n);
    kvm_free(text);
    return rc;
}

/* ---- model engine ----------------------------------------------------------------------------- */

static uint64_t hash_str(const char *x, uint64_t h) { return kvm_hash64(x ? x : "", x ? strlen(x) + 1 : 1, h); }

/* The agent's template record for this prompt shape (created once; comm/ validates it). */
static ltmpl_t *get_template(lmodel_t *m, const wf_llm_req_t *r) {
    uint64_t key = hash_str(r->agent, hash_str(r->system, KVM_HASH_SEED));
    for (int i = 0; i < r->n_pieces; i++) key = hash_str(r->pieces[i].is_slot ? r->pieces[i].name : r->pieces[i].text, key ^ (uint64_t)r->pieces[i].is_slot);
    for (int i = 0; i < m->n_tmpls; i++)
        if (m->tmpls[i].key == key) return &m->tmpls[i];
    ltmpl_t *nt = kvm_realloc(m->tmpls, (size_t)(m->n_tmpls + 1) * sizeof *nt);
    if (!nt) return NULL;
    m->tmpls = nt;
    ltmpl_t *t = &nt[m->n_tmpls];
    memset(t, 0, sizeof *t);
    kvm_piece_t *pc = kvm_calloc((size_t)r->n_pieces + 1, sizeof *pc);
    if (!pc) return NULL;
    for (int i = 0; i < r->n_pieces; i++)
        pc[i] = (kvm_piece_t){.kind = r->pieces[i].is_slot ? KVM_PIECE_PLACEHOLDER : KVM_PIECE_TEXT,
                              .text = r->pieces[i].is_slot ? r->pieces[i].name : r->pieces[i].text};
    kvm_template_desc_t d = {.agent = r->agent, .system = r->system, .pieces = pc, .n_pieces = r->n_pieces};
    t->t = kvm_template_create(m->comm, &d);
    kvm_free(pc);
    if (!t->t && kvm_errcode() == KVM_ENOMEM) /* the KV pool is full now: the step waits, the template is made later */
        return NULL;
    if (!t->t) {
        t->err = kvm_strdup(kvm_errmsg());
        KVM_LOGW("agent '%s': template not usable for KV reuse (%s); its steps run dense", r->agent ? r->agent : "?", kvm_errmsg());
    }
    t->agent = kvm_strdup(r->agent ? r->agent : "");
    t->key = key;
    m->n_tmpls++;
    return t;
}

static kvm_comm_request_t *get_request(lmodel_t *m, const char *run) {
    for (int i = 0; i < m->n_reqs; i++)
        if (!strcmp(m->reqs[i].run, run)) return m->reqs[i].rq;
    lreq_t *nr = kvm_realloc(m->reqs, (size_t)(m->n_reqs + 1) * sizeof *nr);
    if (!nr) return NULL;
    m->reqs = nr;
    char *name = kvm_strdup(run);
    kvm_comm_request_t *rq = name ? kvm_comm_request_begin(m->comm, hash_str(run, KVM_HASH_SEED)) : NULL;
    if (!rq) { /* nothing is recorded half-made (a NULL run name would be compared later) */
        kvm_free(name);
        return NULL;
    }
    nr[m->n_reqs].run = name;
    nr[m->n_reqs].rq = rq;
    m->n_reqs++;
    return rq;
}

static lseg_t *find_seg(lmodel_t *m, const char *run, const char *name) {
    for (int i = 0; i < m->n_segs; i++)
        if (!strcmp(m->segs[i].run, run) && !strcmp(m->segs[i].name, name)) return &m->segs[i];
    return NULL;
}

/* Records segment id seg_id under (run, name) with its text, replacing any older one. */
static int put_seg(lmodel_t *m, const char *run, const char *name, const char *text, uint64_t seg_id) {
    lseg_t *e = find_seg(m, run, name);
    char *t = kvm_strdup(text ? text : "");
    if (!t) return KVM_ENOMEM;
    if (!e) { /* an entry is added whole or not at all (find_seg compares its names) */
        char *r = kvm_strdup(run), *n = kvm_strdup(name);
        lseg_t *ns = r && n ? kvm_realloc(m->segs, (size_t)(m->n_segs + 1) * sizeof *ns) : NULL;
        if (!ns) {
            kvm_free(r);
            kvm_free(n);
            kvm_free(t);
            return KVM_ENOMEM;
        }
        m->segs = ns;
        e = &ns[m->n_segs++];
        *e = (lseg_t){.run = r, .name = n};
    } else
        kvm_free(e->text);
    e->seg_id = seg_id;
    e->text = t;
    return 0;
}

/* The segment holding `text` for placeholder `name` of this run, with a new reference for the
 * caller: the recorded one if its text is the same and the store still has it (an agent's response
 * keeps the KV it was generated with), else computed now. */
static kvm_segment_t *bind_seg(lmodel_t *m, const char *run, const char *name, const char *text) {
    lseg_t *e = find_seg(m, run, name);
    if (e && e->seg_id && !strcmp(e->text, text)) {
        kvm_segment_t *g = kvm_segment_get(kvm_comm_store(m->comm), e->seg_id);
        if (g) return g;
        kvm_errclear(); /* evicted: compute it again */
    }
    kvm_producer_kind_t kind = !strncmp(name, "input", 5) || !strncmp(name, "state:input.", 12) ? KVM_PRODUCER_INPUT
                               : !strncmp(name, "tool:", 5) ? KVM_PRODUCER_TOOL
                                                            : KVM_PRODUCER_STATE;
    kvm_segment_t *seg = NULL;
    if (kvm_comm_segment_text(m->comm, kind, name, text, strlen(text), &seg) != 0) return NULL;
    if (put_seg(m, run, name, text, kvm_segment_info(seg)->id) != 0) {
        kvm_segment_release(seg);
        return NULL;
    }
    return seg;
}

/* Assembles the prompt through runtime/comm (dense / exact prefix / KVCOMM by the agent's policy)
 * and queues its remaining tokens on the scheduler. Templates comm/ rejects (or empty placeholder
 * content) fall back to a plain chat-rendered prompt run dense; the trace says why. */
/* Models without a tokenizer (synthetic weights for benchmarks): each whitespace-separated word of
 * the prompt becomes one id (a hash into the vocabulary), so prompt lengths track the text. */
static int words_to_ids(const kvm_model_t *mm, const char *system, const wf_piece_t *pieces, int n, int32_t **ids, int *n_ids) {
    char *text = wf_llm_render_plain(system, pieces, n);
    if (!text) return KVM_ENOMEM;
    int cap = 64, k = 0;
    int32_t *v = kvm_malloc((size_t)cap * sizeof *v);
    if (!v) {
        kvm_free(text);
        return KVM_ENOMEM;
    }
    int vocab = mm->cfg.vocab_size > 2 ? mm->cfg.vocab_size : 2;
    if (mm->cfg.bos_id >= 0) v[k++] = mm->cfg.bos_id;
    for (const char *p = text; *p;) {
        while (*p && isspace((unsigned char)*p)) p++;
        if (!*p) break;
        const char *e = p;
        while (*e && !isspace((unsigned char)*e)) e++;
        if (k == cap) {
            cap *= 2;
            int32_t *nv = kvm_realloc(v, (size_t)cap * sizeof *nv);
            if (!nv) {
                kvm_free(v);
                kvm_free(text);
                return KVM_ENOMEM;
            }
            v = nv;
        }
        v[k++] = (int32_t)(1 + kvm_hash64(p, (size_t)(e - p), KVM_HASH_SEED) % (uint64_t)(vocab - 1));
        p = e;
    }
    if (k == 0) v[k++] = 1;
    kvm_free(text);
    *ids = v;
    *n_ids = k;
    return 0;
}

/* The scheduler's stream of a job's text: to the engine's token hook; a canceled job stops here. */
static int job_token(void *ud, int32_t id, const char *text, size_t len) {
    job_t *j = ud;
    if (j->canceled) return 1;
    if (j->deadline || j->req.run_deadline_ns) {
        const uint64_t now = kvm_now_ns();
        j->over_budget = j->req.run_deadline_ns && now > j->req.run_deadline_ns;
        j->timed_out = !j->over_budget && j->deadline && now > j->deadline;
        if (j->over_budget || j->timed_out) return 1;
    }
    const wf_llm_opts_t *o = &j->l->o;
    return o->on_token ? o->on_token(o->on_token_ud, j->res.tag, j->req.run_id, j->req.agent, id, text, len) : 0;
}

static int c2c_prefill(wf_llm_t *l, lmodel_t *m, job_t *j, const wf_llm_req_t *r, cJSON *detail);
static void job_release_prep(lmodel_t *m, job_t *j);

static int model_prepare(lmodel_t *m, job_t *j, const wf_llm_req_t *r) {
    uint64_t t0 = kvm_now_ns();
    const char *run = r->run_id ? r->run_id : "";
    cJSON *detail = cJSON_CreateObject();
    int rc = 0;
    ltmpl_t none = {0};
    ltmpl_t *lt = m->m->tok && !r->prompt_ids ? get_template(m, r) : &none;
    if (!lt) {
        cJSON_Delete(detail);
        return kvm_errctx(KVM_ENOMEM, "agent '%s': building its template", r->agent);
    }
    bool use_tmpl = lt->t != NULL && m->m->tok != NULL && r->n_turns == 0 && !r->prompt_ids;
    const char *why = r->n_turns > 0 ? "a tool-call continuation (the model's turn and the tool responses after the user message) runs dense"
                      : m->m->tok    ? lt->err
                      : kvm_model_is_mock(m->m) ? "the mock model keeps no KV to reuse: run dense"
                                                : "the model has no tokenizer (synthetic weights): prompt words hashed to ids, run dense";
    for (int i = 0; use_tmpl && i < r->n_pieces; i++)
        if (r->pieces[i].is_slot && (!r->pieces[i].text || !r->pieces[i].text[0])) {
            use_tmpl = false;
            why = "a placeholder is empty (its producer has not run yet)";
        }
    if (use_tmpl) {
        kvm_binding_t b[KVM_COMM_MAX_PH];
        int nb = 0;
        j->rq = get_request(m, run);
        if (!j->rq) rc = kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
        for (int i = 0; !rc && i < r->n_pieces; i++) {
            if (!r->pieces[i].is_slot) continue;
            bool dup = false;
            for (int k = 0; k < nb; k++) dup |= !strcmp(b[k].name, r->pieces[i].name);
            if (dup) continue;
            if (nb == KVM_COMM_MAX_PH) {
                rc = kvm_seterr(KVM_EINVAL, "agent '%s': more than %d placeholders", r->agent, KVM_COMM_MAX_PH);
                break;
            }
            kvm_segment_t *seg = bind_seg(m, run, r->pieces[i].name, r->pieces[i].text);
            if (!seg) rc = kvm_errctx(kvm_errcode() ? kvm_errcode() : KVM_ENOMEM, "agent '%s': placeholder %s", r->agent, r->pieces[i].name);
            else {
                b[nb++] = (kvm_binding_t){.name = r->pieces[i].name, .seg = seg};
                j->bound[j->n_bound++] = seg;
            }
        }
        if (!rc) {
            /* a C2C step assembles its prompt as text: the fused section is computed here, not reused */
            kvm_prompt_t p = {.tmpl = lt->t, .bindings = b, .n_bindings = nb, .policy = r->c2c ? KVM_KV_DENSE : r->kv};
            rc = kvm_comm_prepare(j->rq, &p, &j->prep);
            if (!rc) {
                j->has_prep = true;
                lt->users++;
                j->tmpl_key = lt->key;
                j->tmpl_held = true;
            }
        }
    } else if (r->c2c) {
        rc = kvm_seterr(KVM_EINVAL, "agent '%s': C2C (kv_from via c2c) needs the receiver's prompt as a template: %s",
                        r->agent ? r->agent : "?", why ? why : "no template");
    } else {
        j->rq = NULL;
        char *user = join_pieces(r->pieces, r->n_pieces);
        int32_t *ids = NULL;
        int n = 0;
        if (!user) rc = KVM_ENOMEM;
        else if (r->prompt_ids) {
            ids = kvm_malloc((size_t)r->n_prompt_ids * sizeof *ids);
            if (!ids) rc = KVM_ENOMEM;
            else memcpy(ids, r->prompt_ids, (size_t)r->n_prompt_ids * sizeof *ids), n = r->n_prompt_ids;
            why = "a prompt given as token ids (generate) runs dense or on exact prefix hits";
        } else if (r->n_turns > 0) rc = encode_turns(m->m, r, user, &ids, &n);
        else if (m->m->tok || kvm_model_is_mock(m->m)) rc = kvm_prompt_encode(m->m, r->system, user, m->m->cfg.chat_format != KVM_CHAT_NONE, &ids, &n);
        else rc = words_to_ids(m->m, r->system, r->pieces, r->n_pieces, &ids, &n);
        kvm_free(user);
        if (!rc) rc = kvm_comm_prepare_ids(m->comm, ids, n, r->kv == KVM_KV_PREFIX ? KVM_KV_PREFIX : KVM_KV_DENSE, &j->prep);
        if (!rc) j->has_prep = true;
        kvm_free(ids);
        cJSON_AddStringToObject(detail, "fallback", why ? why : "no template");
    }
    if (rc) {
        for (int i = 0; i < j->n_bound; i++) kvm_segment_release(j->bound[i]);
        j->n_bound = 0;
        cJSON_Delete(detail);
        return rc;
    }
    if (r->c2c && (rc = c2c_prefill(j->l, m, j, r, detail))) {
        job_release_prep(m, j);
        cJSON_Delete(detail);
        return rc;
    }
    if (r->kv != KVM_KV_KVCOMM || r->c2c) { /* dense / prefix need the ids only: let the store evict them */
        for (int i = 0; i < j->n_bound; i++) kvm_segment_release(j->bound[i]);
        j->n_bound = 0;
    }
    const kvm_comm_report_t *rep = &j->prep.report;
    kvm_free(j->res.prompt_ids);
    kvm_free(j->res.prompt_text);
    cJSON_Delete(j->res.kv_detail);
    j->res.kv_detail = NULL;
    kvm_free(j->run_id);
    kvm_free(j->agent);
    j->res.n_prompt = j->prep.n_prompt;
    j->res.prompt_ids = kvm_malloc((size_t)(j->prep.n_prompt > 0 ? j->prep.n_prompt : 1) * sizeof *j->res.prompt_ids);
    if (j->res.prompt_ids) memcpy(j->res.prompt_ids, j->prep.prompt_ids, (size_t)j->prep.n_prompt * sizeof *j->res.prompt_ids);
    size_t tl = 0;
    if (r->prompt_ids && !m->m->tok) j->res.prompt_text = kvm_strdup("");
    else if (!m->m->tok) j->res.prompt_text = wf_llm_render_plain(r->system, r->pieces, r->n_pieces);
    else if (kvm_detokenize(m->m->tok, j->prep.prompt_ids, j->prep.n_prompt, false, &j->res.prompt_text, &tl) != 0)
        j->res.prompt_text = NULL;
    j->res.kv.exact = rep->exact_tokens;
    j->res.kv.offset = rep->offset_tokens;
    j->res.kv.naive = rep->naive_tokens;
    j->res.kv.recomputed = rep->recomputed_tokens;
    j->res.kv.fused = rep->fused_tokens;
    if (r->c2c) { /* c2c_prefill: the section's rows fused, the rest computed by the receiver */
        j->res.kv.fused = j->prep.report.fused_tokens;
        j->res.kv.recomputed = j->prep.n_prompt - j->res.kv.fused;
    }
    int anchors = 0;
    for (int i = 0; i < rep->n_placeholders; i++)
        if (rep->ph[i].decision == KVM_PH_SHARED && rep->ph[i].n_eligible > anchors) anchors = rep->ph[i].n_eligible;
    j->res.kv.anchors = anchors;
    snprintf(j->res.kv.mode, sizeof j->res.kv.mode, "%s",
             r->c2c ? "c2c" : rep->mode == KVM_COMM_REUSE ? "reuse" : rep->exact_tokens > 0 ? "prefix" : "dense");
    cJSON_AddStringToObject(detail, "policy", r->c2c ? "c2c" : kvm_kv_policy_name(r->kv));
    if (use_tmpl) {
        /* the report is the struct above; its one serialiser's text goes into the trace as is (never parsed back) */
        int need = kvm_comm_report_json(rep, NULL, 0);
        char *buf = need > 0 ? kvm_malloc((size_t)need + 1) : NULL;
        if (buf) {
            kvm_comm_report_json(rep, buf, (size_t)need + 1);
            cJSON *rj = cJSON_CreateRaw(buf);
            if (rj && !cJSON_AddItemToObject(detail, "report", rj)) cJSON_Delete(rj); /* its key's copy failed */
            kvm_free(buf);
        }
    }
    j->res.kv_detail = detail;
    j->run_id = kvm_strdup(run);
    j->agent = kvm_strdup(r->agent ? r->agent : "");
    j->prepare_ms = (double)(kvm_now_ns() - t0) / 1e6;
    kvm_sched_req_t sr = {0};
    sr.seq = &j->prep.seq;
    sr.prompt = j->prep.rest_ids;
    sr.n_prompt = j->prep.n_rest;
    sr.gen.max_tokens = r->max_tokens;
    sr.gen.sampling = r->sampling;
    sr.gen.stop_strings = r->stop;
    sr.gen.n_stop_strings = r->n_stop;
    sr.gen.ignore_eos = r->ignore_eos;
    sr.tag = (uint64_t)(uintptr_t)j;
    sr.on_token = job_token;
    sr.on_token_ud = j;
    return kvm_sched_submit(m->sched, &sr);
}

int wf_llm_c2c_open(wf_llm_t *l, const char *path, int receiver, int sharer, int *idx) {
    if (receiver < 0 || receiver >= l->n_models || sharer < 0 || sharer >= l->n_models)
        return kvm_seterr(KVM_EINVAL, "c2c: model index out of range");
    for (int i = 0; i < l->n_c2c; i++)
        if (!strcmp(l->c2c[i].path, path) && l->c2c[i].receiver == receiver && l->c2c[i].sharer == sharer) {
            *idx = i;
            return 0;
        }
    if (receiver == sharer)
        return kvm_seterr(KVM_EINVAL, "%s: the receiver and the sharer are the same model (%s); C2C is between two "
                          "checkpoints (one model shares KV through kv = \"kvcomm\")", path, l->models[receiver].path);
    kvm_c2c_fuser_t *f = kvm_c2c_open(path, l->models[receiver].m, l->models[sharer].m);
    if (!f) return kvm_errcode() ? kvm_errcode() : KVM_EINVAL;
    if (kvm_c2c_strategy_of(f->cfg.token_alignment) && strcmp(f->cfg.fuse_tokens, "message_tokens")) {
        kvm_seterr(KVM_EINVAL, "%s: token_alignment '%s' with fuse_tokens '%s' is not a mode kv_from runs (spec §4: "
                   "aligned mode fuses message_tokens; identity fuses the section's rows)", path, f->cfg.token_alignment,
                   f->cfg.fuse_tokens);
        kvm_c2c_free(f);
        return KVM_EINVAL;
    }
    lc2c_t *n = kvm_realloc(l->c2c, (size_t)(l->n_c2c + 1) * sizeof *n);
    char *p = kvm_strdup(path);
    if (!n || !p) {
        if (n) l->c2c = n;
        kvm_free(p);
        kvm_c2c_free(f);
        return kvm_seterr(KVM_ENOMEM, "c2c: out of memory");
    }
    l->c2c = n;
    n[l->n_c2c] = (lc2c_t){.path = p, .receiver = receiver, .sharer = sharer, .f = f};
    *idx = l->n_c2c++;
    return 0;
}

/* The sharer's own rendering of the step's prompt up to the C2C section (aligned mode, spec §4: each model renders
 * its own template): the same system and user text in the sharer's chat format, the section's content cut out.
 * *head: kvm_malloc, *len its length. */
static int c2c_sharer_head(const kvm_model_t *sharer, const wf_llm_req_t *r, char **head, size_t *len) {
    *head = NULL, *len = 0;
    size_t cap = 2;
    for (int i = 0; i < r->n_pieces; i++) cap += r->pieces[i].text ? strlen(r->pieces[i].text) : 0;
    char *user = kvm_malloc(cap), *text = NULL;
    if (!user) return kvm_seterr(KVM_ENOMEM, "C2C: out of memory");
    size_t at = 0;
    int marks = 0, rc = 0;
    for (int i = 0; i < r->n_pieces && !rc; i++) {
        const wf_piece_t *pc = &r->pieces[i];
        if (pc->is_slot && pc->name && !strcmp(pc->name, r->c2c_section)) {
            user[at++] = '\x1e', marks++;
            continue;
        }
        const size_t n = pc->text ? strlen(pc->text) : 0;
        if (n && memchr(pc->text, '\x1e', n))
            rc = kvm_seterr(KVM_EINVAL, "C2C aligned mode: the prompt holds the byte 0x1E (it marks the section)");
        else memcpy(user + at, pc->text ? pc->text : "", n), at += n;
    }
    user[at] = 0;
    if (!rc && marks != 1)
        rc = kvm_seterr(KVM_EINVAL, "the C2C section {%s} appears %d times in the prompt (aligned mode needs it once)",
                        r->c2c_section, marks);
    if (!rc && (!r->system || !memchr(r->system, '\x1e', strlen(r->system))))
        rc = kvm_prompt_render(sharer, r->system, user, &text);
    else if (!rc)
        rc = kvm_seterr(KVM_EINVAL, "C2C aligned mode: the system prompt holds the byte 0x1E (it marks the section)");
    kvm_free(user);
    if (rc) return kvm_errctx(rc, "rendering the sharer's prompt");
    const char *cut = strchr(text, '\x1e');
    if (!cut || strchr(cut + 1, '\x1e')) {
        kvm_free(text);
        return kvm_seterr(KVM_EINVAL, "the sharer's chat format (%s) does not hold the C2C section once",
                          kvm_chat_format_name(sharer->cfg.chat_format));
    }
    *len = (size_t)(cut - text);
    text[*len] = 0;
    *head = text;
    return 0;
}

/* Aligned mode (a first / longest fuser: the two models' tokenizers differ, spec §4): the receiver's rows before the
 * section beside the sharer's own rendering of them (c2c_sharer_head), the section's rows mapped token by token and
 * fused; the rest is the scheduler's. o (may be NULL) gets the alignment's counts. */
static int c2c_prefill_aligned(const lc2c_t *c, lmodel_t *m, lmodel_t *sm, kvm_prepared_t *p, const wf_llm_req_t *r,
                               int a, int len, kvm_c2c_stats_t *st, cJSON *o) {
    char *head = NULL;
    size_t hl = 0;
    kvm_c2c_aligned_t al;
    int rc = c2c_sharer_head(sm->m, r, &head, &hl);
    if (!rc) rc = kvm_c2c_align_span(c->f, m->m, sm->m, p->prompt_ids, p->n_prompt, a, len, head, hl, &al);
    kvm_free(head);
    if (rc) return rc;
    rc = kvm_c2c_prefill_aligned_head(c->f, m->m, &p->seq, sm->m, kvm_comm_pool(sm->comm), &al, st);
    if (rc == KVM_EUNSUPPORTED && al.r_pads > 0)
        kvm_errctx(rc, "aligned mode: the sharer reads the prompt before {%s} as %d tokens and the receiver as %d (fewer "
                   "words before the section, e.g. the section first in the template, may avoid receiver pads)",
                   r->c2c_section, al.sec_start[1] - al.s_pads_run, a);
    if (!rc && p->seq.n_tokens != a + len) { /* cannot happen: receiver pads before the section are refused */
        kvm_seq_truncate(&p->seq, 0);
        rc = kvm_seterr(KVM_EINVAL, "C2C aligned prefill left %d rows, not %d", p->seq.n_tokens, a + len);
    }
    if (!rc && o) {
        cJSON_AddStringToObject(o, "alignment", c->f->cfg.token_alignment);
        cJSON_AddNumberToObject(o, "sharer_head_tokens", al.sec_start[1] - al.s_pads_run);
        cJSON_AddNumberToObject(o, "sharer_pads", al.s_pads_run);
        cJSON_AddNumberToObject(o, "mapped_several", al.mapped_several);
        cJSON_AddNumberToObject(o, "mapped_empty", al.mapped_empty);
    }
    kvm_c2c_aligned_free(&al);
    return rc;
}

/* The C2C prefill of a prepared (dense, empty-sequence) step: the receiver computes the prompt up to placeholder
 * r->c2c_section; kvm_c2c_prefill has the sharer prefill the same tokens and the section, and fuses the section's rows
 * into the receiver's cache (aligned mode: c2c_prefill_aligned); the rest of the prompt is left to the scheduler
 * (receiver only). detail gets "c2c": the fused range, the sharer, the fuser, the open gates per layer and the times. */
static int c2c_prefill(wf_llm_t *l, lmodel_t *m, job_t *j, const wf_llm_req_t *r, cJSON *detail) {
    const int fi = r->c2c - 1;
    if (fi < 0 || fi >= l->n_c2c || &l->models[l->c2c[fi].receiver] != m)
        return kvm_seterr(KVM_EINVAL, "agent '%s': C2C fuser %d is not open for this model", r->agent, fi);
    const lc2c_t *c = &l->c2c[fi];
    kvm_prepared_t *p = &j->prep;
    const kvm_comm_report_t *rep = &p->report;
    int a = -1, len = 0;
    for (int i = 0; i < rep->n_placeholders; i++)
        if (r->c2c_section && !strcmp(rep->ph[i].name, r->c2c_section)) a = rep->ph[i].start_pos, len = rep->ph[i].tokens;
    if (a < 0 || len <= 0)
        return kvm_seterr(KVM_EINVAL, "agent '%s': the C2C section {%s} is not in its prompt (or is empty)", r->agent,
                          r->c2c_section ? r->c2c_section : "?");
    if (p->n_cached != 0 || p->seq.n_tokens != 0 || a + len >= p->n_prompt)
        return kvm_seterr(KVM_EINVAL, "agent '%s': the C2C section {%s} must be followed by prompt text (the last prompt "
                          "token runs on the receiver alone, spec §5)", r->agent, r->c2c_section);
    lmodel_t *sm = &l->models[c->sharer];
    int rc = 0;
    const bool aligned = kvm_c2c_strategy_of(c->f->cfg.token_alignment) != 0;
    cJSON *al = aligned ? cJSON_CreateObject() : NULL;
    const uint64_t t0 = kvm_now_ns();
    if (a > 0 && !aligned) {
        kvm_batch_item_t it = {.seq = &p->seq, .tokens = p->prompt_ids, .n_tokens = a};
        rc = kvm_forward(m->m, &it, 1);
    }
    const double pre_ms = (double)(kvm_now_ns() - t0) / 1e6;
    kvm_c2c_stats_t st = {0};
    if (!rc && aligned) rc = c2c_prefill_aligned(c, m, sm, p, r, a, len, &st, al);
    else if (!rc) rc = kvm_c2c_prefill(c->f, m->m, &p->seq, sm->m, kvm_comm_pool(sm->comm), p->prompt_ids + a, len, len, NULL, &st);
    if (rc) {
        cJSON_Delete(al);
        kvm_seq_truncate(&p->seq, 0);
        return kvm_errctx(rc, "C2C prefill from '%s'", sm->path); /* the caller names the agent */
    }
    p->n_cached = a + len;
    p->rest_ids = p->prompt_ids + a + len;
    p->n_rest = p->n_prompt - a - len;
    p->report.fused_tokens = len;
    cJSON *o = cJSON_AddObjectToObject(detail, "c2c");
    if (o) {
        cJSON_AddStringToObject(o, "section", r->c2c_section);
        cJSON_AddNumberToObject(o, "start", a);
        cJSON_AddNumberToObject(o, "fused", len);
        cJSON_AddStringToObject(o, "sharer", sm->path);
        cJSON_AddStringToObject(o, "fuser", c->path);
        cJSON *gk = cJSON_AddArrayToObject(o, "gates_k"), *gv = cJSON_AddArrayToObject(o, "gates_v");
        for (int i = 0; i < kvm_c2c_n_layers(c->f); i++) {
            if (gk) cJSON_AddItemToArray(gk, cJSON_CreateBool(kvm_c2c_gate_open(c->f, i, 0)));
            if (gv) cJSON_AddItemToArray(gv, cJSON_CreateBool(kvm_c2c_gate_open(c->f, i, 1)));
        }
        cJSON_AddNumberToObject(o, "prefix_ms", pre_ms);
        cJSON_AddNumberToObject(o, "prefill_ms", st.prefill_ms);
        cJSON_AddNumberToObject(o, "fuse_ms", st.fuse_ms);
        if (al && !cJSON_AddItemToObject(o, "aligned", al)) cJSON_Delete(al);
        al = NULL;
    }
    cJSON_Delete(al);
    return 0;
}

/* Gives back what a prepared step holds: its prompt's KV, the segments bound to it and its template. */
static void job_release_prep(lmodel_t *m, job_t *j) {
    if (j->has_prep) kvm_prepared_release(&j->prep);
    j->has_prep = false;
    for (int i = 0; i < j->n_bound; i++) kvm_segment_release(j->bound[i]);
    j->n_bound = 0;
    for (int i = 0; j->tmpl_held && i < m->n_tmpls; i++)
        if (m->tmpls[i].key == j->tmpl_key) m->tmpls[i].users--;
    j->tmpl_held = false;
}

/* Frees the templates no prepared step points at (their prefix KV is pinned while they live); they are made
 * again when next needed. Returns how many were freed. */
static int evict_idle_templates(lmodel_t *m) {
    int n = 0;
    for (int i = 0; i < m->n_tmpls;) {
        ltmpl_t *t = &m->tmpls[i];
        if (!t->t || t->users > 0) {
            i++;
            continue;
        }
        kvm_template_free(t->t);
        kvm_free(t->agent);
        kvm_free(t->err);
        m->tmpls[i] = m->tmpls[--m->n_tmpls];
        n++;
    }
    return n;
}

/* model_prepare, once more after freeing the idle templates when the KV pool was full; charged to the step's account.
 * KVM_ELUA_MEMORY when that account refused an allocation (the run's memory cap, not the KV pool: no use waiting). */
static int prepare_job(lmodel_t *m, job_t *j) {
    kvm_account_t *prev = kvm_account_enter(j->acct);
    int rc = model_prepare(m, j, &j->req);
    if (rc == KVM_ENOMEM && !job_over_cap(j) && evict_idle_templates(m) > 0) rc = model_prepare(m, j, &j->req);
    kvm_account_enter(prev);
    if (rc && job_over_cap(j)) rc = job_cap_error(j);
    return rc;
}

/* After generation: comm/ fills anchor deltas and the prefix index and publishes the response as a
 * segment, which later placeholders of this run reuse ("agent:<agent>:current"; the older one moves
 * to ":prev"). */
static void model_complete(lmodel_t *m, job_t *j, const kvm_sched_done_t *d) {
    if (!j->has_prep) return;
    kvm_gen_result_t gr = {0};
    gr.ids = d->ids;
    gr.n_ids = d->n_ids;
    gr.text = d->text;
    gr.stop_reason = d->stop_reason;
    kvm_segment_t *resp = NULL;
    /* a C2C step's cache holds fused rows: never published as a prefix or a response segment (spec §6: a fused
     * segment is no receiver's own prefill) */
    if (j->rq && !j->req.c2c && d->status == 0 && j->prep.seq.n_tokens >= j->prep.n_prompt) {
        if (kvm_comm_complete(j->rq, &j->prep, &gr, &resp) != 0)
            KVM_LOGW("agent '%s': completing its KV bookkeeping failed: %s", j->agent, kvm_errmsg());
    }
    if (resp && (!j->run_id || !j->agent)) { /* their copies failed (out of memory): the response is not recorded */
        kvm_segment_release(resp);
        resp = NULL;
    }
    if (resp) {
        char cur[256], prev[256];
        snprintf(cur, sizeof cur, "agent:%s:current", j->agent);
        snprintf(prev, sizeof prev, "agent:%s:prev", j->agent);
        lseg_t *old = find_seg(m, j->run_id, cur);
        if (old && old->seg_id) {
            char *t = kvm_strdup(old->text);
            if (t) put_seg(m, j->run_id, prev, t, old->seg_id);
            kvm_free(t);
        }
        put_seg(m, j->run_id, cur, d->text ? d->text : "", kvm_segment_info(resp)->id);
        kvm_segment_release(resp); /* cached in the store; found again by id */
    }
    job_release_prep(m, j);
}

int wf_llm_run_end(wf_llm_t *l, const char *run_id) {
    int rc = 0;
    for (int mi = 0; mi < l->n_models; mi++) {
        lmodel_t *m = &l->models[mi];
        for (int i = 0; i < m->n_reqs; i++)
            if (!strcmp(m->reqs[i].run, run_id)) {
                bool busy = false;
                for (job_t *j = l->jobs; j; j = j->next) busy |= j->rq == m->reqs[i].rq;
                int r1 = busy ? (kvm_comm_request_abort(m->reqs[i].rq), 0) : kvm_comm_request_end(m->reqs[i].rq);
                if (r1 && !rc) rc = r1;
                for (job_t *j = l->jobs; j; j = j->next)
                    if (j->rq == m->reqs[i].rq) j->rq = NULL;
                kvm_free(m->reqs[i].run);
                m->reqs[i] = m->reqs[--m->n_reqs];
                break;
            }
        for (int i = 0; i < m->n_segs;)
            if (!strcmp(m->segs[i].run, run_id)) {
                kvm_free(m->segs[i].run);
                kvm_free(m->segs[i].name);
                kvm_free(m->segs[i].text);
                m->segs[i] = m->segs[--m->n_segs];
            } else
                i++;
    }
    return rc;
}

/* Copies r (strings, pieces, stop list) into j->rq so the step can be prepared later. */
static int req_copy(job_t *j, const wf_llm_req_t *r) {
    int n_strs = 4 + 2 * r->n_pieces + r->n_stop + 2 * r->n_turns + (r->prompt_ids ? 1 : 0);
    j->rq_strs = kvm_calloc((size_t)n_strs, sizeof *j->rq_strs);
    j->rq_pieces = kvm_calloc((size_t)r->n_pieces + 1, sizeof *j->rq_pieces);
    j->rq_turns = kvm_calloc((size_t)r->n_turns + 1, sizeof *j->rq_turns);
    if (!j->rq_strs || !j->rq_pieces || !j->rq_turns) return KVM_ENOMEM;
    j->req = *r;
#define DUP(dst, src)                                                       \
    do {                                                                    \
        if (src) {                                                          \
            if (!(j->rq_strs[j->n_rq_strs] = kvm_strdup(src))) return KVM_ENOMEM; \
            (dst) = j->rq_strs[j->n_rq_strs++];                             \
        }                                                                   \
    } while (0)
    DUP(j->req.agent, r->agent);
    DUP(j->req.run_id, r->run_id);
    DUP(j->req.system, r->system);
    DUP(j->req.c2c_section, r->c2c_section);
    for (int i = 0; i < r->n_pieces; i++) {
        j->rq_pieces[i] = r->pieces[i];
        DUP(j->rq_pieces[i].name, r->pieces[i].name);
        DUP(j->rq_pieces[i].text, r->pieces[i].text);
    }
    j->req.pieces = j->rq_pieces;
    for (int i = 0; i < r->n_turns; i++) {
        DUP(j->rq_turns[i].role, r->turns[i].role);
        DUP(j->rq_turns[i].content, r->turns[i].content);
    }
    j->req.turns = j->rq_turns;
    if (r->prompt_ids) { /* kept in rq_strs too (freed with them) */
        if (r->n_prompt_ids < 1) return kvm_seterr(KVM_EINVAL, "llm: a prompt of token ids needs at least one id");
        int32_t *ids = kvm_malloc((size_t)r->n_prompt_ids * sizeof *ids);
        if (!ids) return KVM_ENOMEM;
        memcpy(ids, r->prompt_ids, (size_t)r->n_prompt_ids * sizeof *ids);
        j->rq_strs[j->n_rq_strs++] = (char *)ids;
        j->req.prompt_ids = ids;
    }
    /* stop strings: a pointer array inside rq_strs' tail would need its own allocation; keep the
     * strings in rq_strs and point req.stop at them */
    j->req.stop = (const char *const *)(j->rq_strs + j->n_rq_strs);
    for (int i = 0; i < r->n_stop; i++) {
        if (!(j->rq_strs[j->n_rq_strs] = kvm_strdup(r->stop[i] ? r->stop[i] : ""))) return KVM_ENOMEM;
        j->n_rq_strs++;
    }
#undef DUP
    return 0;
}

/* ---- admission control: steps that wait for KV ------------------------------------------------------ */

#define KV_WAIT_MS_DEFAULT 300000.0

static double kv_wait_ms(const wf_llm_t *l) { return l->o.kv_wait_ms > 0 ? l->o.kv_wait_ms : KV_WAIT_MS_DEFAULT; }

static void defer_job(job_t *j) {
    j->deferred = true;
    if (!j->wait_since) j->wait_since = kvm_now_ns();
}

static void fail_job(job_t *j, int rc, const char *msg) {
    j->deferred = false;
    j->done = true;
    j->res.status = rc;
    kvm_free(j->res.error);
    j->res.error = kvm_strdup(msg);
}

/* Fails the deferred steps of model mi that have waited kv_wait_ms for KV while no step of the model finished
 * (a queue that moves is waited for: steps are prepared in submit order, so each gets its turn). */
static void expire_deferred(wf_llm_t *l, int mi) {
    lmodel_t *m = &l->models[mi];
    const kvm_kv_pool_t *p = kvm_comm_pool(m->comm);
    uint64_t now = kvm_now_ns();
    for (job_t *j = l->jobs; j; j = j->next) {
        if (j->model != mi || !j->deferred || j->not_before > now) continue;
        if (j->deadline && now > j->deadline) {
            char msg[300];
            snprintf(msg, sizeof msg, "timed out: its timeout_ms of %.0f ms passed while it waited for KV memory",
                     j->req.timeout_ms);
            j->res.attempts = j->attempts;
            fail_job(j, KVM_ETIMEDOUT, msg);
            continue;
        }
        uint64_t since = j->wait_since > m->last_done ? j->wait_since : m->last_done;
        if ((double)(now - since) / 1e6 <= kv_wait_ms(l)) continue;
        char msg[400];
        snprintf(msg, sizeof msg, "agent '%s': waited %.0f ms for KV memory while no step of its model finished "
                 "(kv_wait_ms): the KV pool has %d blocks of %d tokens, %d free, %d steps running; raise the KV budget or "
                 "kv_wait_ms", j->req.agent ? j->req.agent : "?", (double)(now - since) / 1e6, p->n_blocks, KVM_KV_BLOCK,
                 p->n_free, kvm_sched_pending(m->sched));
        fail_job(j, KVM_ENOMEM, msg);
    }
}

/* Prepares the deferred steps of model mi, oldest first, while the scheduler admits what it has (a step is
 * prepared only when the one before it got its KV). A step that does not fit while nothing else runs on the
 * model (nothing will free KV) can never run and fails. */
static void retry_deferred(wf_llm_t *l, int mi) {
    lmodel_t *m = &l->models[mi];
    for (;;) {
        const uint64_t now = kvm_now_ns();
        job_t *old = NULL;
        for (job_t *j = l->jobs; j; j = j->next)
            if (j->model == mi && j->deferred && !j->done && j->not_before <= now && (!old || j->t_submit < old->t_submit))
                old = j;
        /* the scheduler's queue waits for KV: the idle templates' pinned prefixes go first */
        if (!old || (kvm_sched_admit(m->sched) && (evict_idle_templates(m) == 0 || kvm_sched_admit(m->sched)))) return;
        int rc = prepare_job(m, old);
        if (rc == 0) {
            old->deferred = false;
            old->prepare_ms = (double)(kvm_now_ns() - old->t_submit) / 1e6; /* the wait counts in TTFT */
            continue;
        }
        if (rc == KVM_ENOMEM && kvm_sched_pending(m->sched) > 0) return; /* wait for more to finish */
        if (rc == KVM_ENOMEM) kvm_errctx(rc, "this step does not fit even with nothing else running");
        fail_job(old, rc, kvm_errmsg());
    }
}

/* ---- the interface ---------------------------------------------------------------------------- */

/* A step whose output is given (wf_llm_req_t.given_text): done now, taken by the next wf_llm_take. */
static int submit_given(wf_llm_t *l, const wf_llm_req_t *r) {
    job_t *j = kvm_calloc(1, sizeof *j);
    if (!j) return KVM_ENOMEM;
    j->model = r->model;
    j->l = l;
    j->res.tag = r->tag;
    j->t_submit = kvm_now_ns();
    j->attempts = 1;
    j->done = true;
    j->res.attempts = 1;
    j->res.text = kvm_strdup(r->given_text);
    j->res.prompt_text = wf_llm_render_plain(r->system, r->pieces, r->n_pieces);
    snprintf(j->res.kv.mode, sizeof j->res.kv.mode, "given");
    if (!j->res.text || !j->res.prompt_text) {
        job_free(j);
        return kvm_seterr(KVM_ENOMEM, "out of memory giving a step its output");
    }
    j->next = l->jobs;
    l->jobs = j;
    l->n_jobs++;
    return 0;
}

int wf_llm_submit(wf_llm_t *l, const wf_llm_req_t *r) {
    if (!r || r->model < 0 || r->model >= l->n_models) return kvm_seterr(KVM_EINVAL, "llm: unknown model index");
    if (r->given_text) return submit_given(l, r);
    kvm_account_t *prev = kvm_account_enter(r->acct); /* the step and its copies of the request are its run's */
    job_t *j = kvm_calloc(1, sizeof *j);
    if (!j) {
        kvm_account_enter(prev);
        return KVM_ENOMEM;
    }
    if ((j->acct = r->acct)) {
        kvm_account_retain(j->acct);
        j->refused0 = kvm_account_refusals(j->acct);
    }
    j->model = r->model;
    j->l = l;
    j->res.tag = r->tag;
    j->t_submit = kvm_now_ns();
    j->attempts = 1;
    if (r->timeout_ms > 0) j->deadline = j->t_submit + (uint64_t)(r->timeout_ms * 1e6);
    lmodel_t *m = &l->models[r->model];
    int rc = req_copy(j, r); /* kept: the step may have to be prepared again later */
    kvm_account_enter(prev);
    if (rc && job_over_cap(j)) rc = job_cap_error(j);
    /* admission control: behind steps that already wait for KV, this one waits too (nothing overtakes) */
    bool wait = false;
    for (job_t *o = l->jobs; !rc && o && !wait; o = o->next) wait = o->model == r->model && o->deferred;
    if (!rc && !wait) wait = kvm_sched_admit(m->sched);
    if (!rc && !wait) rc = prepare_job(m, j);
    if (wait || (rc == KVM_ENOMEM && kvm_sched_pending(m->sched) > 0)) {
        /* the KV pool is full now: keep the step and prepare it when running ones finish */
        defer_job(j);
        rc = 0;
    }
    if (rc == KVM_ENOMEM) kvm_errctx(rc, "this step does not fit even with nothing else running");
    if (rc != 0) {
        job_free(j);
        return rc;
    }
    j->next = l->jobs;
    l->jobs = j;
    l->n_jobs++;
    return 0;
}

/* Moves the scheduler's completions of model mi into their jobs; returns how many finished. A step
 * the KV budget could not hold beside the others is deferred instead (prepared again later). */
/* Whether status is one the request retries on. */
static bool retry_matches(const wf_llm_req_t *r, int status) {
    unsigned kind = status == KVM_ETIMEDOUT ? WF_RETRY_TIMEOUT : status == KVM_ENOMEM ? WF_RETRY_KV : WF_RETRY_ERROR;
    return (r->retry_on & kind) != 0;
}

/* A failed call with retries left: its KV goes back, and it waits for its backoff, then for KV, as a deferred
 * step (retry_deferred prepares it again). Returns whether it was retried. */
static bool retry_job(lmodel_t *m, job_t *j, const kvm_sched_done_t *d) {
    if (j->canceled || j->attempts > j->req.retry_max || !retry_matches(&j->req, d->status)) return false;
    job_release_prep(m, j);
    cJSON_Delete(j->res.kv_detail);
    j->res.kv_detail = NULL;
    kvm_free(j->run_id);
    kvm_free(j->agent);
    j->run_id = j->agent = NULL;
    const double backoff = j->req.retry_backoff_ms * (double)(1u << (j->attempts - 1 < 20 ? j->attempts - 1 : 20));
    KVM_LOGI("agent '%s': attempt %d failed (%s); retrying in %.0f ms", j->req.agent ? j->req.agent : "?", j->attempts,
             d->error[0] ? d->error : kvm_strerror(d->status), backoff);
    j->attempts++;
    j->timed_out = false;
    j->not_before = kvm_now_ns() + (uint64_t)(backoff * 1e6);
    j->deadline = j->req.timeout_ms > 0 ? j->not_before + (uint64_t)(j->req.timeout_ms * 1e6) : 0;
    j->wait_since = j->not_before; /* the KV wait counts from the end of the backoff */
    defer_job(j);
    return true;
}

/* The message of a failed call (owned): the scheduler's, or the timeout's, with the attempts it took. */
static char *job_error(const job_t *j, const kvm_sched_done_t *d) {
    char msg[512];
    if (j->over_budget)
        snprintf(msg, sizeof msg, "the run's wall-time budget ended during generation, after %d output tokens", d->n_ids);
    else if (j->timed_out)
        snprintf(msg, sizeof msg, "timed out: its timeout_ms of %.0f ms passed after %d output tokens", j->req.timeout_ms,
                 d->n_ids);
    else
        snprintf(msg, sizeof msg, "%s", d->error[0] ? d->error : kvm_strerror(d->status));
    if (j->attempts > 1) {
        size_t n = strlen(msg);
        snprintf(msg + n, sizeof msg - n, " (attempt %d of %d)", j->attempts, j->req.retry_max + 1);
    }
    return kvm_strdup(msg);
}

static int collect(wf_llm_t *l, int mi) {
    lmodel_t *m = &l->models[mi];
    int finished = 0;
    kvm_sched_done_t d;
    while (kvm_sched_take(m->sched, &d) == 1) {
        job_t *j = (job_t *)(uintptr_t)d.tag;
        /* the KV pool could not hold it beside the others (running ones, or idle templates): give its KV
         * back and prepare it again once some have finished (results do not change: nothing ran yet that
         * was delivered). One whose prompt is larger than the whole pool fails now. */
        if (d.status == KVM_ENOMEM && job_over_cap(j)) d.status = KVM_ELUA_MEMORY; /* the run's memory cap: no use waiting */
        bool others = d.status == KVM_ENOMEM && !d.kv_never_fits &&
                      (evict_idle_templates(m) > 0 || kvm_sched_pending(m->sched) > 0);
        if (others) {
            job_release_prep(m, j);
            defer_job(j);
            kvm_sched_done_clear(&d);
            continue;
        }
        /* a truncated output is not completed */
        if (j->over_budget && !d.status) d.status = KVM_EBUDGET;
        if (j->timed_out && !d.status) d.status = KVM_ETIMEDOUT;
        m->last_done = kvm_now_ns();
        if (d.status && retry_job(m, j, &d)) {
            kvm_sched_done_clear(&d);
            continue;
        }
        j->done = true;
        kvm_account_t *prev = kvm_account_enter(j->acct);
        model_complete(m, j, &d); /* before the text moves into the result */
        j->res.status = d.status;
        j->res.attempts = j->attempts;
        if (d.status) j->res.error = job_error(j, &d);
        kvm_account_enter(prev);
        j->res.text = d.text;
        d.text = NULL;
        j->res.out_ids = d.ids;
        d.ids = NULL;
        j->res.n_out = d.n_ids;
        j->res.stop_reason = d.stop_reason;
        j->res.queue_ms = d.queue_ms;
        j->res.ttft_ms = d.ttft_ms + j->prepare_ms; /* from "inputs ready": assembly included */
        j->res.decode_ms = d.decode_ms;
        j->res.n_forward = d.n_forward;
        j->res.batch_max_seqs = d.batch_max_seqs;
        j->res.batch_mean_seqs = d.batch_mean_seqs;
        j->res.batch_max_rows = d.batch_max_rows;
        kvm_sched_done_clear(&d);
        finished++;
    }
    return finished;
}

/* When nothing runs and every waiting step is in its retry backoff, sleeps until the first backoff ends (at most
 * 1 ms at a time), so that the runtime's loop does not spin. */
static void nap_if_only_backoffs(const wf_llm_t *l) {
    uint64_t now = kvm_now_ns(), first = UINT64_MAX;
    for (const job_t *j = l->jobs; j; j = j->next) {
        if (j->done) continue;
        if (!j->deferred || j->not_before <= now) return; /* something can run */
        if (j->not_before < first) first = j->not_before;
    }
    if (first == UINT64_MAX) return;
    uint64_t ns = first - now < 1000000u ? first - now : 1000000u;
    struct timespec ts = {0, (long)ns};
    nanosleep(&ts, NULL);
}

int wf_llm_step(wf_llm_t *l) {
    int total = 0;
    for (int mi = 0; mi < l->n_models; mi++) {
        lmodel_t *m = &l->models[mi];
        int n = kvm_sched_step(m->sched);
        if (n < 0) return n;
        collect(l, mi);
        expire_deferred(l, mi);
        retry_deferred(l, mi);
        if (n > 0) {
            l->steps++;
            l->seqs += (uint64_t)n;
            if (n > l->max_seqs) l->max_seqs = n;
        }
        total += n;
    }
    if (total == 0) nap_if_only_backoffs(l);
    return total;
}

int wf_llm_take(wf_llm_t *l, wf_llm_result_t *out) {
    job_t *prev = NULL;
    for (job_t *j = l->jobs; j; prev = j, j = j->next) {
        if (!j->done) continue;
        if (prev) prev->next = j->next;
        else l->jobs = j->next;
        l->n_jobs--;
        *out = j->res;
        memset(&j->res, 0, sizeof j->res);
        job_free(j);
        return 1;
    }
    return 0;
}

int wf_llm_pending(const wf_llm_t *l) { return l ? l->n_jobs : 0; }

int wf_llm_cancel_run(wf_llm_t *l, const char *run_id) {
    int n = 0;
    for (job_t *j = l->jobs; j && run_id; j = j->next) {
        if (j->done || j->canceled || !j->req.run_id || strcmp(j->req.run_id, run_id)) continue;
        j->canceled = true;
        n++;
        if (j->deferred) { /* never reached the scheduler: done now */
            j->deferred = false;
            j->done = true;
            j->res.status = KVM_ECANCELED;
            j->res.error = kvm_strdup("canceled");
        }
    }
    return n;
}

void wf_llm_result_clear(wf_llm_result_t *r) {
    if (!r) return;
    kvm_free(r->error);
    kvm_free(r->text);
    kvm_free(r->out_ids);
    kvm_free(r->prompt_text);
    kvm_free(r->prompt_ids);
    cJSON_Delete(r->kv_detail);
    memset(r, 0, sizeof *r);
}

void wf_llm_counters(const wf_llm_t *l, uint64_t *steps, uint64_t *seqs, int *max_seqs) {
    if (steps) *steps = l->steps;
    if (seqs) *seqs = l->seqs;
    if (max_seqs) *max_seqs = l->max_seqs;
}

static cJSON *comm_stats_json(const kvm_comm_t *c) {
    kvm_comm_stats_t st;
    kvm_comm_stats(c, &st);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "invocations", (double)st.invocations);
    cJSON_AddNumberToObject(o, "reuse_invocations", (double)st.reuse_invocations);
    cJSON_AddNumberToObject(o, "exact_tokens", (double)st.exact_tokens);
    cJSON_AddNumberToObject(o, "offset_tokens", (double)st.offset_tokens);
    cJSON_AddNumberToObject(o, "naive_tokens", (double)st.naive_tokens);
    cJSON_AddNumberToObject(o, "recomputed_tokens", (double)st.recomputed_tokens);
    cJSON_AddNumberToObject(o, "anchor_pools", st.n_pools);
    cJSON_AddNumberToObject(o, "anchor_bytes", (double)st.anchor_bytes);
    cJSON_AddNumberToObject(o, "anchors_created", (double)st.anchors_created);
    cJSON_AddNumberToObject(o, "anchors_evicted", (double)st.anchors_evicted);
    return o;
}

cJSON *wf_llm_stats_json(const wf_llm_t *l) {
    cJSON *o = cJSON_CreateObject(), *ms = cJSON_AddArrayToObject(o, "models");
    cJSON_AddNumberToObject(o, "forward_passes", (double)l->steps);
    cJSON_AddNumberToObject(o, "mean_batch_seqs", l->steps ? (double)l->seqs / (double)l->steps : 0);
    cJSON_AddNumberToObject(o, "max_batch_seqs", l->max_seqs);
    for (int i = 0; ms && i < l->n_models; i++) {
        wf_llm_model_info_t info;
        wf_llm_model_describe(l, i, &info);
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "path", info.t.path);
        cJSON_AddStringToObject(m, "engine", info.t.engine);
        if (info.t.describe) cJSON_AddStringToObject(m, "describe", info.t.describe);
        if (info.t.kvcomm) cJSON_AddStringToObject(m, "kvcomm", info.t.kvcomm);
        if (l->models[i].comm) { /* the KV pool's blocks: a finished or failed step has given its own back */
            const kvm_kv_pool_t *p = kvm_comm_pool(l->models[i].comm);
            cJSON_AddNumberToObject(m, "kv_blocks", p->n_blocks);
            cJSON_AddNumberToObject(m, "kv_blocks_free", p->n_free);
            cJSON_AddNumberToObject(m, "steps_running", kvm_sched_pending(l->models[i].sched));
        }
        cJSON *cs = l->models[i].comm ? comm_stats_json(l->models[i].comm) : NULL;
        if (cs && !cJSON_AddItemToObject(m, "kvcomm_stats", cs)) cJSON_Delete(cs);
        cJSON_AddItemToArray(ms, m);
    }
    return o;
}
