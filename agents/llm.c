/* llm.c - agent steps on models: the mock engine and the model engine on runtime/sched (see llm.h). */
#include "llm.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include "../runtime/sched/sched.h"

const char *wf_kv_policy_name(wf_kv_policy_t p) {
    switch (p) {
    case WF_KV_DENSE: return "dense";
    case WF_KV_PREFIX: return "prefix";
    default: return "kvcomm";
    }
}

int wf_kv_policy_parse(const char *s) {
    if (!s) return -1;
    if (!strcmp(s, "dense")) return WF_KV_DENSE;
    if (!strcmp(s, "prefix")) return WF_KV_PREFIX;
    if (!strcmp(s, "kvcomm")) return WF_KV_KVCOMM;
    return -1;
}

/* ---- jobs and models -------------------------------------------------------------------------- */

typedef struct job {
    wf_llm_result_t res;
    int model;
    /* mock */
    char **words;            /* output words still to emit */
    int n_words, emitted, prefilled, max_tokens;
    char **stop;
    int n_stop;
    uint64_t t_submit, t_first;
    int n_forward, batch_max;
    double batch_sum;
    /* model engine */
    kvm_seq_t seq;
    bool has_seq;
    bool done;
    struct job *next;
} job_t;

typedef struct lmodel {
    char *path;
    bool mock;
    bool mock_fail;          /* mock:fail - every step fails (error-path tests) */
    kvm_model_t *m;
    kvm_kv_pool_t *pool;
    kvm_sched_t *sched;
} lmodel_t;

struct wf_llm {
    wf_llm_opts_t o;
    lmodel_t *models;
    int n_models;
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

static void job_free(job_t *j) {
    if (!j) return;
    wf_llm_result_clear(&j->res);
    for (int i = 0; i < j->n_words; i++) kvm_free(j->words[i]);
    kvm_free(j->words);
    for (int i = 0; i < j->n_stop; i++) kvm_free(j->stop[i]);
    kvm_free(j->stop);
    if (j->has_seq) kvm_seq_free(&j->seq);
    kvm_free(j);
}

void wf_llm_free(wf_llm_t *l) {
    if (!l) return;
    for (job_t *j = l->jobs, *n; j; j = n) {
        n = j->next;
        job_free(j);
    }
    for (int i = 0; i < l->n_models; i++) {
        lmodel_t *m = &l->models[i];
        if (m->sched) kvm_sched_free(m->sched);
        if (m->pool) kvm_kv_pool_free(m->pool);
        if (m->m) kvm_model_free(m->m);
        kvm_free(m->path);
    }
    kvm_free(l->models);
    kvm_free(l);
}

int wf_llm_model_open(wf_llm_t *l, const char *path, int *idx) {
    if (!path || !*path) return kvm_seterr(KVM_EINVAL, "model: empty path");
    for (int i = 0; i < l->n_models; i++)
        if (!strcmp(l->models[i].path, path)) {
            *idx = i;
            return 0;
        }
    lmodel_t *nm = kvm_realloc(l->models, (size_t)(l->n_models + 1) * sizeof *nm);
    if (!nm) return KVM_ENOMEM;
    l->models = nm;
    lmodel_t *m = &l->models[l->n_models];
    memset(m, 0, sizeof *m);
    if (!(m->path = kvm_strdup(path))) return KVM_ENOMEM;
    if (!strncmp(path, "mock:", 5)) {
        m->mock = true;
        m->mock_fail = !strcmp(path + 5, "fail");
    } else {
        kvm_load_opts_t lo = {0};
        lo.backend = l->o.backend;
        lo.quiet = l->o.quiet;
        m->m = kvm_model_load(path, &lo);
        if (!m->m) {
            kvm_free(m->path);
            return kvm_errctx(kvm_errcode() ? kvm_errcode() : KVM_EIO, "model '%s'", path);
        }
        m->pool = kvm_model_kv_pool(m->m, l->o.kv_bytes);
        kvm_sched_opts_t so = {.max_rows = l->o.max_rows, .max_active = l->o.max_active};
        m->sched = m->pool ? kvm_sched_create(m->m, &so) : NULL;
        if (!m->sched) {
            int rc = kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
            if (m->pool) kvm_kv_pool_free(m->pool);
            kvm_model_free(m->m);
            kvm_free(m->path);
            return kvm_errctx(rc, "model '%s'", path);
        }
    }
    *idx = l->n_models++;
    return 0;
}

const char *wf_llm_model_name(const wf_llm_t *l, int idx) {
    if (idx < 0 || idx >= l->n_models) return "?";
    return l->models[idx].m ? l->models[idx].m->name : l->models[idx].path;
}

cJSON *wf_llm_model_describe(const wf_llm_t *l, int idx) {
    cJSON *o = cJSON_CreateObject();
    if (!o || idx < 0 || idx >= l->n_models) return o;
    const lmodel_t *m = &l->models[idx];
    cJSON_AddStringToObject(o, "path", m->path);
    if (m->mock) {
        cJSON_AddStringToObject(o, "engine", "mock");
        cJSON_AddStringToObject(o, "chat_format", "plain");
        return o;
    }
    const kvm_config_t *c = &m->m->cfg;
    cJSON_AddStringToObject(o, "engine", "model");
    cJSON_AddStringToObject(o, "name", m->m->name);
    cJSON_AddStringToObject(o, "arch", c->arch_name);
    cJSON_AddNumberToObject(o, "n_layers", c->n_layers);
    cJSON_AddNumberToObject(o, "dim", c->dim);
    cJSON_AddNumberToObject(o, "vocab_size", c->vocab_size);
    cJSON_AddNumberToObject(o, "max_seq_len", c->max_seq_len);
    cJSON_AddStringToObject(o, "chat_format", kvm_chat_format_name(c->chat_format));
    char id[24];
    snprintf(id, sizeof id, "%016llx", (unsigned long long)m->m->model_id);
    cJSON_AddStringToObject(o, "model_id", id);
    char desc[512];
    kvm_model_describe(m->m, desc, sizeof desc);
    cJSON_AddStringToObject(o, "describe", desc);
    return o;
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

/* ---- mock engine ------------------------------------------------------------------------------ */

/* Splits the user message into words; the mock "generates" them back one per step (an echo model). */
static int mock_prepare(job_t *j, const wf_llm_req_t *r) {
    char *user = join_pieces(r->pieces, r->n_pieces);
    if (!user) return KVM_ENOMEM;
    int cap = 16, n_prompt = 0;
    j->words = kvm_malloc((size_t)cap * sizeof *j->words);
    if (!j->words) {
        kvm_free(user);
        return KVM_ENOMEM;
    }
    const char *p = user;
    for (;;) {
        while (*p && isspace((unsigned char)*p)) p++;
        if (!*p) break;
        const char *e = p;
        while (*e && !isspace((unsigned char)*e)) e++;
        n_prompt++;
        if (j->n_words < j->max_tokens) {
            if (j->n_words == cap) {
                cap *= 2;
                char **nw = kvm_realloc(j->words, (size_t)cap * sizeof *nw);
                if (!nw) {
                    kvm_free(user);
                    return KVM_ENOMEM;
                }
                j->words = nw;
            }
            char *w = kvm_malloc((size_t)(e - p) + 1);
            if (!w) {
                kvm_free(user);
                return KVM_ENOMEM;
            }
            memcpy(w, p, (size_t)(e - p));
            w[e - p] = '\0';
            j->words[j->n_words++] = w;
        }
        p = e;
    }
    kvm_free(user);
    if (r->system) {
        for (const char *q = r->system; *q;) {
            while (*q && isspace((unsigned char)*q)) q++;
            if (!*q) break;
            while (*q && !isspace((unsigned char)*q)) q++;
            n_prompt++;
        }
    }
    j->res.n_prompt = n_prompt;
    j->res.kv.recomputed = n_prompt;
    snprintf(j->res.kv.mode, sizeof j->res.kv.mode, "dense");
    j->res.text = kvm_strdup("");
    return j->res.text ? 0 : KVM_ENOMEM;
}

static void mock_finish(job_t *j, int reason) {
    j->done = true;
    j->res.stop_reason = reason;
    uint64_t now = kvm_now_ns();
    j->res.ttft_ms = j->t_first ? (double)(j->t_first - j->t_submit) / 1e6 : (double)(now - j->t_submit) / 1e6;
    j->res.decode_ms = j->t_first ? (double)(now - j->t_first) / 1e6 : 0;
    j->res.n_forward = j->n_forward;
    j->res.batch_max_seqs = j->batch_max;
    j->res.batch_mean_seqs = j->n_forward ? j->batch_sum / j->n_forward : 0;
    j->res.batch_max_rows = j->batch_max;
}

/* One step of a mock job: the first step is the "prefill", each later one emits a word. */
static void mock_advance(job_t *j, bool fail, int batch) {
    j->n_forward++;
    j->batch_sum += batch;
    if (batch > j->batch_max) j->batch_max = batch;
    if (fail) {
        j->res.status = KVM_EIO;
        j->res.error = kvm_strdup("mock:fail model: failure requested by the model name");
        mock_finish(j, KVM_STOP_NONE);
        return;
    }
    if (!j->prefilled) {
        j->prefilled = 1;
        if (j->n_words == 0) mock_finish(j, KVM_STOP_EOS);
        return;
    }
    if (!j->t_first) j->t_first = kvm_now_ns();
    const char *w = j->words[j->emitted++];
    size_t a = strlen(j->res.text), b = strlen(w);
    char *t = kvm_realloc(j->res.text, a + b + 2);
    if (!t) {
        j->res.status = KVM_ENOMEM;
        j->res.error = kvm_strdup("mock: out of memory");
        mock_finish(j, KVM_STOP_NONE);
        return;
    }
    j->res.text = t;
    if (a) t[a++] = ' ';
    memcpy(t + a, w, b + 1);
    j->res.n_out++;
    for (int i = 0; i < j->n_stop; i++) {
        char *hit = strstr(t, j->stop[i]);
        if (hit) {
            *hit = '\0';
            mock_finish(j, KVM_STOP_STRING);
            return;
        }
    }
    if (j->emitted >= j->n_words) mock_finish(j, j->n_words >= j->max_tokens ? KVM_STOP_LENGTH : KVM_STOP_EOS);
}

/* ---- model engine ----------------------------------------------------------------------------- */

/* Renders and encodes the prompt for a real model: the chat format when the model has one (system =
 * role, user = the pieces joined), else plain text. Fills res.prompt_text / prompt_ids. */
static int model_prepare(lmodel_t *m, job_t *j, const wf_llm_req_t *r) {
    char *user = join_pieces(r->pieces, r->n_pieces);
    if (!user) return KVM_ENOMEM;
    bool chat = m->m->cfg.chat_format != KVM_CHAT_NONE;
    int rc;
    if (chat) {
        kvm_chat_msg_t msgs[2];
        int nm = 0;
        if (r->system && *r->system) msgs[nm++] = (kvm_chat_msg_t){"system", r->system};
        msgs[nm++] = (kvm_chat_msg_t){"user", user};
        rc = kvm_chat_render(m->m->cfg.chat_format, msgs, nm, true, &j->res.prompt_text);
        if (rc == 0) rc = kvm_prompt_encode(m->m, r->system, user, true, &j->res.prompt_ids, &j->res.n_prompt);
    } else {
        j->res.prompt_text = wf_llm_render_plain(r->system, r->pieces, r->n_pieces);
        rc = j->res.prompt_text ? kvm_prompt_encode(m->m, NULL, j->res.prompt_text, false, &j->res.prompt_ids, &j->res.n_prompt)
                                : KVM_ENOMEM;
    }
    kvm_free(user);
    if (rc != 0) return rc;
    if (j->res.n_prompt < 1) return kvm_seterr(KVM_EINVAL, "agent '%s': the prompt encodes to no tokens", r->agent ? r->agent : "?");
    /* Dense prefill: every prompt token is computed here. Prefix and KVCOMM reuse plug in through
     * runtime/comm (prompt assembly) and then report exact/offset counts instead. */
    j->res.kv.recomputed = j->res.n_prompt;
    snprintf(j->res.kv.mode, sizeof j->res.kv.mode, "dense");
    kvm_seq_init(&j->seq, m->pool);
    j->has_seq = true;
    kvm_sched_req_t sr = {0};
    sr.seq = &j->seq;
    sr.prompt = j->res.prompt_ids;
    sr.n_prompt = j->res.n_prompt;
    sr.gen.max_tokens = r->max_tokens;
    sr.gen.sampling = r->sampling;
    sr.gen.stop_strings = r->stop;
    sr.gen.n_stop_strings = r->n_stop;
    sr.tag = (uint64_t)(uintptr_t)j;
    return kvm_sched_submit(m->sched, &sr);
}

/* ---- the interface ---------------------------------------------------------------------------- */

int wf_llm_submit(wf_llm_t *l, const wf_llm_req_t *r) {
    if (!r || r->model < 0 || r->model >= l->n_models) return kvm_seterr(KVM_EINVAL, "llm: unknown model index");
    job_t *j = kvm_calloc(1, sizeof *j);
    if (!j) return KVM_ENOMEM;
    j->model = r->model;
    j->res.tag = r->tag;
    j->t_submit = kvm_now_ns();
    j->max_tokens = r->max_tokens > 0 ? r->max_tokens : 256;
    lmodel_t *m = &l->models[r->model];
    int rc = 0;
    if (m->mock) {
        if (r->n_stop > 0) {
            j->stop = kvm_calloc((size_t)r->n_stop, sizeof *j->stop);
            if (!j->stop) rc = KVM_ENOMEM;
            for (int i = 0; !rc && i < r->n_stop; i++)
                if (r->stop[i] && *r->stop[i] && !(j->stop[j->n_stop++] = kvm_strdup(r->stop[i]))) rc = KVM_ENOMEM;
        }
        if (!rc) rc = mock_prepare(j, r);
        if (!rc) j->res.prompt_text = wf_llm_render_plain(r->system, r->pieces, r->n_pieces);
        if (!rc && !j->res.prompt_text) rc = KVM_ENOMEM;
    } else {
        rc = model_prepare(m, j, r);
    }
    if (rc != 0) {
        job_free(j);
        return rc;
    }
    j->next = l->jobs;
    l->jobs = j;
    l->n_jobs++;
    return 0;
}

int wf_llm_step(wf_llm_t *l) {
    int total = 0;
    for (int mi = 0; mi < l->n_models; mi++) {
        lmodel_t *m = &l->models[mi];
        int n = 0;
        if (m->mock) {
            for (job_t *j = l->jobs; j; j = j->next)
                if (j->model == mi && !j->done) n++;
            for (job_t *j = l->jobs; j; j = j->next)
                if (j->model == mi && !j->done) mock_advance(j, m->mock_fail, n);
        } else {
            n = kvm_sched_step(m->sched);
            if (n < 0) return n;
            kvm_sched_done_t d;
            while (kvm_sched_take(m->sched, &d) == 1) {
                job_t *j = (job_t *)(uintptr_t)d.tag;
                j->done = true;
                j->res.status = d.status;
                if (d.status) j->res.error = kvm_strdup(d.error);
                j->res.text = d.text;
                d.text = NULL;
                j->res.n_out = d.n_ids;
                j->res.stop_reason = d.stop_reason;
                j->res.queue_ms = d.queue_ms;
                j->res.ttft_ms = d.ttft_ms + (double)(0);
                j->res.decode_ms = d.decode_ms;
                j->res.n_forward = d.n_forward;
                j->res.batch_max_seqs = d.batch_max_seqs;
                j->res.batch_mean_seqs = d.batch_mean_seqs;
                j->res.batch_max_rows = d.batch_max_rows;
                kvm_sched_done_clear(&d);
                kvm_seq_free(&j->seq);
                j->has_seq = false;
            }
        }
        if (n > 0) {
            l->steps++;
            l->seqs += (uint64_t)n;
            if (n > l->max_seqs) l->max_seqs = n;
        }
        total += n;
    }
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

void wf_llm_result_clear(wf_llm_result_t *r) {
    if (!r) return;
    kvm_free(r->error);
    kvm_free(r->text);
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
