/* sched.c - continuous batching over kvm_forward (see sched.h). */
#include "sched.h"

#include <stdio.h>
#include <string.h>

enum { SR_QUEUED = 0, SR_PREFILL, SR_DECODE, SR_DONE };

typedef struct sreq {
    kvm_sched_req_t r;
    int32_t *prompt;         /* [r.n_prompt] copy */
    int prompt_pos;          /* prompt tokens already forwarded */
    char **stop;             /* copies of the stop strings */
    int n_stop;
    int32_t *stop_ids;
    int n_stop_ids;
    kvm_sampler_t *sampler;
    float *logits;           /* [vocab] */
    int32_t *hist;           /* prompt context + output, for repetition penalty */
    int n_hist, cap_hist;
    int32_t *out;
    int n_out, cap_out;
    char *text;
    size_t text_len, text_cap;
    int32_t pending;         /* sampled id not yet forwarded, -1 none */
    int base;                /* tokens the caller's seq held at submit (kept on preemption) */
    int n_preempted;
    int phase;
    bool mem_wait;           /* the KV budget was full: retried once another request has finished */
    int stop_reason;
    int status;
    char error[512];
    uint64_t t_submit, t_first_fwd, t_first_tok, t_end;
    int n_forward, batch_max, rows_max;
    double batch_sum;
    struct sreq *next;
} sreq_t;

struct kvm_sched {
    kvm_model_t *m;
    kvm_sched_opts_t o;
    sreq_t *head, *tail;     /* all requests not yet taken, in submit order */
    int n_pending;
    kvm_batch_item_t *items; /* [max_active] scratch */
    sreq_t **item_req;
    kvm_sched_stats_t st;
    uint64_t n_finished;     /* requests finished so far (wakes requests waiting for KV memory) */
    uint64_t wake_at;        /* n_finished seen when the waiters were last woken */
};

kvm_sched_t *kvm_sched_create(kvm_model_t *m, const kvm_sched_opts_t *o) {
    if (!m) {
        kvm_seterr(KVM_EINVAL, "sched: no model");
        return NULL;
    }
    kvm_sched_t *s = kvm_calloc(1, sizeof *s);
    if (!s) return NULL;
    s->m = m;
    s->o.max_rows = o && o->max_rows > 0 ? o->max_rows : 256;
    s->o.max_active = o && o->max_active > 0 ? o->max_active : 64;
    s->items = kvm_calloc((size_t)s->o.max_active, sizeof *s->items);
    s->item_req = kvm_calloc((size_t)s->o.max_active, sizeof *s->item_req);
    if (!s->items || !s->item_req || kvm_forward_init(m, s->o.max_rows) != 0) {
        kvm_sched_free(s);
        return NULL;
    }
    return s;
}

static void sreq_free(sreq_t *q) {
    if (!q) return;
    kvm_free(q->prompt);
    for (int i = 0; i < q->n_stop; i++) kvm_free(q->stop[i]);
    kvm_free(q->stop);
    kvm_free(q->stop_ids);
    if (q->sampler) kvm_sampler_free(q->sampler);
    kvm_free(q->logits);
    kvm_free(q->hist);
    kvm_free(q->out);
    kvm_free(q->text);
    kvm_free(q);
}

void kvm_sched_free(kvm_sched_t *s) {
    if (!s) return;
    for (sreq_t *q = s->head, *n; q; q = n) {
        n = q->next;
        sreq_free(q);
    }
    kvm_free(s->items);
    kvm_free(s->item_req);
    kvm_free(s);
}

static int push_i32(int32_t **a, int *n, int *cap, int32_t v) {
    if (*n == *cap) {
        int nc = *cap ? *cap * 2 : 64;
        int32_t *na = kvm_realloc(*a, (size_t)nc * sizeof *na);
        if (!na) return KVM_ENOMEM;
        *a = na;
        *cap = nc;
    }
    (*a)[(*n)++] = v;
    return 0;
}

int kvm_sched_submit(kvm_sched_t *s, const kvm_sched_req_t *r) {
    if (!s || !r || !r->seq || !r->prompt || r->n_prompt < 1)
        return kvm_seterr(KVM_EINVAL, "sched: a request needs a sequence and at least one prompt token");
    sreq_t *q = kvm_calloc(1, sizeof *q);
    if (!q) return KVM_ENOMEM;
    q->r = *r;
    q->pending = -1;
    int vocab = s->m->cfg.vocab_size;
    q->prompt = kvm_malloc((size_t)r->n_prompt * sizeof *q->prompt);
    q->logits = kvm_malloc((size_t)vocab * sizeof *q->logits);
    q->sampler = kvm_sampler_create(&r->gen.sampling, vocab);
    if (!q->prompt || !q->logits || !q->sampler) goto fail;
    memcpy(q->prompt, r->prompt, (size_t)r->n_prompt * sizeof *q->prompt);
    if (r->gen.n_stop_strings > 0) {
        q->stop = kvm_calloc((size_t)r->gen.n_stop_strings, sizeof *q->stop);
        if (!q->stop) goto fail;
        for (int i = 0; i < r->gen.n_stop_strings; i++) {
            const char *ss = r->gen.stop_strings[i];
            if (!ss || !*ss) continue;
            if (!(q->stop[q->n_stop++] = kvm_strdup(ss))) goto fail;
        }
    }
    int n_ids = r->gen.n_stop_ids + (r->gen.ignore_eos ? 0 : s->m->cfg.n_eos);
    if (n_ids > 0) {
        q->stop_ids = kvm_malloc((size_t)n_ids * sizeof *q->stop_ids);
        if (!q->stop_ids) goto fail;
        for (int i = 0; i < r->gen.n_stop_ids; i++) q->stop_ids[q->n_stop_ids++] = r->gen.stop_ids[i];
        if (!r->gen.ignore_eos)
            for (int i = 0; i < s->m->cfg.n_eos; i++) q->stop_ids[q->n_stop_ids++] = s->m->cfg.eos_ids[i];
    }
    for (int i = 0; i < r->seq->n_tokens; i++)
        if (push_i32(&q->hist, &q->n_hist, &q->cap_hist, r->seq->tokens[i])) goto fail;
    for (int i = 0; i < r->n_prompt; i++)
        if (push_i32(&q->hist, &q->n_hist, &q->cap_hist, r->prompt[i])) goto fail;
    q->base = r->seq->n_tokens;
    q->t_submit = kvm_now_ns();
    q->r.gen.stop_strings = NULL; /* copies live in q->stop */
    q->r.gen.stop_ids = NULL;
    if (s->tail) s->tail->next = q;
    else s->head = q;
    s->tail = q;
    s->n_pending++;
    return 0;
fail:
    sreq_free(q);
    return kvm_seterr(KVM_ENOMEM, "sched: out of memory queuing a request");
}

static void finish(sreq_t *q, int reason) {
    q->mem_wait = false;
    q->phase = SR_DONE;
    q->stop_reason = reason;
    q->t_end = kvm_now_ns();
}

static void fail_req(sreq_t *q, int code, const char *msg) {
    q->status = code;
    snprintf(q->error, sizeof q->error, "%s", msg && *msg ? msg : kvm_strerror(code));
    finish(q, KVM_STOP_NONE);
}

static int text_append(sreq_t *q, const char *b, size_t n) {
    if (q->text_len + n + 1 > q->text_cap) {
        size_t nc = q->text_cap ? q->text_cap * 2 : 256;
        while (nc < q->text_len + n + 1) nc *= 2;
        char *nt = kvm_realloc(q->text, nc);
        if (!nt) return KVM_ENOMEM;
        q->text = nt;
        q->text_cap = nc;
    }
    memcpy(q->text + q->text_len, b, n);
    q->text_len += n;
    q->text[q->text_len] = '\0';
    return 0;
}

/* Handles one sampled id: stop ids, output text, stop strings, length and context limits. Leaves the
 * request DONE or with the id pending for the next decode step. */
static void accept_token(kvm_sched_t *s, sreq_t *q, int32_t id) {
    if (!q->t_first_tok) q->t_first_tok = kvm_now_ns();
    for (int i = 0; i < q->n_stop_ids; i++)
        if (q->stop_ids[i] == id) {
            finish(q, KVM_STOP_EOS);
            return;
        }
    int32_t prev = q->n_hist ? q->hist[q->n_hist - 1] : -1;
    if (push_i32(&q->out, &q->n_out, &q->cap_out, id) || push_i32(&q->hist, &q->n_hist, &q->cap_hist, id)) {
        fail_req(q, KVM_ENOMEM, "sched: out of memory growing the output");
        return;
    }
    char buf[256];
    /* models without a tokenizer (synthetic weights) show ids as text */
    int nb = s->m->tok ? kvm_token_bytes(s->m->tok, prev, id, buf, sizeof buf) : snprintf(buf, sizeof buf, "%s<%d>", q->n_out > 1 ? " " : "", (int)id);
    if (nb > 0 && text_append(q, buf, (size_t)nb)) {
        fail_req(q, KVM_ENOMEM, "sched: out of memory growing the output text");
        return;
    }
    for (int i = 0; i < q->n_stop; i++) {
        /* the token may overshoot the stop string: search the tail that this token could complete */
        size_t sl = strlen(q->stop[i]);
        size_t from = q->text_len > sl + (size_t)(nb > 0 ? nb : 0) ? q->text_len - sl - (size_t)(nb > 0 ? nb : 0) : 0;
        char *hit = q->text ? strstr(q->text + from, q->stop[i]) : NULL;
        if (hit) {
            q->text_len = (size_t)(hit - q->text);
            q->text[q->text_len] = '\0';
            finish(q, KVM_STOP_STRING);
            return;
        }
    }
    int max_tokens = q->r.gen.max_tokens > 0 ? q->r.gen.max_tokens : 256;
    if (q->n_out >= max_tokens) {
        finish(q, KVM_STOP_LENGTH);
        return;
    }
    int total = q->r.seq->n_tokens + 1;
    if (total >= s->m->cfg.max_seq_len || (q->r.gen.max_total_tokens > 0 && total >= q->r.gen.max_total_tokens)) {
        finish(q, KVM_STOP_CONTEXT);
        return;
    }
    q->pending = id;
    q->phase = SR_DECODE;
}

/* Activates queued requests (FIFO) while fewer than max_active are running. */
static void activate(kvm_sched_t *s) {
    int active = 0;
    for (sreq_t *q = s->head; q; q = q->next)
        if (q->phase == SR_PREFILL || q->phase == SR_DECODE) active++;
    for (sreq_t *q = s->head; q && active < s->o.max_active; q = q->next) {
        if (q->phase != SR_QUEUED) continue;
        if (q->r.seq->n_tokens + q->r.n_prompt >= s->m->cfg.max_seq_len) {
            char msg[256];
            snprintf(msg, sizeof msg, "sched: prompt of %d tokens (+%d cached) does not fit the context of %d", q->r.n_prompt,
                     q->r.seq->n_tokens, s->m->cfg.max_seq_len);
            fail_req(q, KVM_ERANGE, msg);
            continue;
        }
        q->phase = SR_PREFILL;
        active++;
    }
}

/* Preemption (as vLLM's recompute mode): drops everything q computed (its seq back to what the caller
 * gave), so its blocks return to the pool, and restarts it from its prompt once another request has
 * finished. Nothing was delivered yet, and the sampler restarts from its seed, so the result is the
 * same as without preemption. */
static void preempt(kvm_sched_t *s, sreq_t *q) {
    kvm_seq_truncate(q->r.seq, q->base);
    q->prompt_pos = 0;
    q->n_out = 0;
    q->text_len = 0;
    if (q->text) q->text[0] = '\0';
    q->n_hist = q->base + q->r.n_prompt;
    q->pending = -1;
    q->t_first_tok = 0;
    kvm_sampler_t *ns = kvm_sampler_create(&q->r.gen.sampling, s->m->cfg.vocab_size);
    if (ns) {
        kvm_sampler_free(q->sampler);
        q->sampler = ns;
    }
    q->phase = SR_PREFILL;
    q->mem_wait = true;
    q->n_preempted++;
}

int kvm_sched_step(kvm_sched_t *s) {
    activate(s);
    if (s->n_finished != s->wake_at) { /* someone finished (its KV is being freed): retry the waiters */
        s->wake_at = s->n_finished;
        for (sreq_t *q = s->head; q; q = q->next) q->mem_wait = false;
    }
    int n = 0, rows = 0;
    /* decode work first: one row each, so generating agents never wait behind long prefills */
    for (sreq_t *q = s->head; q && n < s->o.max_active; q = q->next) {
        if (q->phase != SR_DECODE || q->mem_wait || rows + 1 > s->o.max_rows) continue;
        kvm_batch_item_t *it = &s->items[n];
        memset(it, 0, sizeof *it);
        it->seq = q->r.seq;
        it->tokens = &q->pending;
        it->n_tokens = 1;
        it->logits = q->logits;
        s->item_req[n++] = q;
        rows++;
    }
    for (sreq_t *q = s->head; q && n < s->o.max_active; q = q->next) {
        if (q->phase != SR_PREFILL || q->mem_wait) continue;
        int left = q->r.n_prompt - q->prompt_pos, room = s->o.max_rows - rows;
        if (room <= 0) break;
        int chunk = left < room ? left : room;
        kvm_batch_item_t *it = &s->items[n];
        memset(it, 0, sizeof *it);
        it->seq = q->r.seq;
        it->tokens = q->prompt + q->prompt_pos;
        it->n_tokens = chunk;
        it->logits = chunk == left ? q->logits : NULL;
        s->item_req[n++] = q;
        rows += chunk;
    }
    if (n == 0) {
        /* every request left waits for KV memory: break the deadlock by preempting the youngest
         * waiter that holds computed KV (the others retry), or, if none does, by failing the youngest */
        sreq_t *victim = NULL, *youngest = NULL;
        for (sreq_t *q = s->head; q; q = q->next) {
            if (!q->mem_wait) continue;
            youngest = q;
            if (q->r.seq->n_tokens > q->base) victim = q;
        }
        if (!youngest) return 0;
        if (victim) preempt(s, victim);
        else fail_req(youngest, KVM_ENOMEM, youngest->error[0] ? youngest->error : "sched: KV budget exhausted");
        for (sreq_t *q = s->head; q; q = q->next)
            if (q != victim) q->mem_wait = false;
        return 0;
    }
    uint64_t t0 = kvm_now_ns();
    int rc = kvm_forward(s->m, s->items, n);
    if (rc != 0) {
        /* isolate the failing request(s): run each item alone; the others proceed. A request that
         * found the KV budget full waits until another finishes (its memory is then released), unless
         * nothing else is in flight. */
        char msg[512];
        snprintf(msg, sizeof msg, "%s", kvm_errmsg());
        for (int i = 0; i < n; i++) {
            sreq_t *q = s->item_req[i];
            if (!q) continue; /* preempted earlier in this loop */
            int r1 = n == 1 ? rc : kvm_forward(s->m, &s->items[i], 1);
            if (r1 == 0) continue;
            /* the KV budget is full. While other requests run, q waits for one of them to finish
             * (finishing releases memory). If q is the last one running, a waiting request that holds
             * computed KV is preempted to make room; if there is none, q fails. */
            if (r1 == KVM_ENOMEM) {
                int running = 0;
                sreq_t *victim = NULL;
                for (sreq_t *o = s->head; o; o = o->next) {
                    if (o == q || !(o->phase == SR_PREFILL || o->phase == SR_DECODE)) continue;
                    if (!o->mem_wait) running++;
                    else if (o->r.seq->n_tokens > o->base) victim = o; /* the youngest such */
                }
                if (running > 0) {
                    q->mem_wait = true;
                    snprintf(q->error, sizeof q->error, "%s", n == 1 ? msg : kvm_errmsg());
                    s->item_req[i] = NULL;
                    continue;
                }
                if (victim) {
                    preempt(s, victim);
                    s->item_req[i] = NULL; /* q retries on the next step */
                    continue;
                }
            }
            fail_req(q, r1, n == 1 ? msg : kvm_errmsg());
            s->n_finished++;
            s->item_req[i] = NULL;
        }
    }
    double fwd_ms = (double)(kvm_now_ns() - t0) / 1e6;
    s->st.steps++;
    s->st.rows += (uint64_t)rows;
    s->st.items += (uint64_t)n;
    if (n > s->st.max_items) s->st.max_items = n;
    s->st.forward_ms += fwd_ms;
    for (int i = 0; i < n; i++) {
        sreq_t *q = s->item_req[i];
        if (!q) continue;
        kvm_batch_item_t *it = &s->items[i];
        if (!q->t_first_fwd) q->t_first_fwd = t0;
        q->n_forward++;
        q->batch_sum += n;
        if (n > q->batch_max) q->batch_max = n;
        if (rows > q->rows_max) q->rows_max = rows;
        if (q->phase == SR_PREFILL) {
            q->prompt_pos += it->n_tokens;
            if (q->prompt_pos < q->r.n_prompt) continue;
        }
        int32_t id = kvm_sampler_sample(q->sampler, q->logits, q->hist, q->n_hist);
        if (id < 0) {
            fail_req(q, KVM_EINTERNAL, "sched: the sampler returned no token");
            continue;
        }
        accept_token(s, q, id);
    }
    return n;
}

int kvm_sched_take(kvm_sched_t *s, kvm_sched_done_t *out) {
    sreq_t *prev = NULL;
    for (sreq_t *q = s->head; q; prev = q, q = q->next) {
        if (q->phase != SR_DONE) continue;
        if (prev) prev->next = q->next;
        else s->head = q->next;
        if (s->tail == q) s->tail = prev;
        s->n_pending--;
        s->n_finished++; /* its owner releases the sequence now */
        memset(out, 0, sizeof *out);
        out->tag = q->r.tag;
        out->status = q->status;
        snprintf(out->error, sizeof out->error, "%s", q->error);
        out->ids = q->out;
        out->n_ids = q->n_out;
        q->out = NULL;
        out->text = q->text ? q->text : kvm_strdup("");
        q->text = NULL;
        out->stop_reason = q->stop_reason;
        out->n_prompt = q->prompt_pos;
        uint64_t te = q->t_end ? q->t_end : kvm_now_ns();
        out->queue_ms = q->t_first_fwd ? (double)(q->t_first_fwd - q->t_submit) / 1e6 : (double)(te - q->t_submit) / 1e6;
        out->ttft_ms = q->t_first_tok ? (double)(q->t_first_tok - q->t_submit) / 1e6 : 0;
        out->decode_ms = q->t_first_tok ? (double)(te - q->t_first_tok) / 1e6 : 0;
        out->n_forward = q->n_forward;
        out->batch_max_seqs = q->batch_max;
        out->batch_mean_seqs = q->n_forward ? q->batch_sum / q->n_forward : 0;
        out->batch_max_rows = q->rows_max;
        sreq_free(q);
        return 1;
    }
    return 0;
}

int kvm_sched_pending(const kvm_sched_t *s) { return s ? s->n_pending : 0; }

void kvm_sched_done_clear(kvm_sched_done_t *d) {
    if (!d) return;
    kvm_free(d->ids);
    kvm_free(d->text);
    memset(d, 0, sizeof *d);
}

const kvm_sched_stats_t *kvm_sched_stats(const kvm_sched_t *s) { return &s->st; }
