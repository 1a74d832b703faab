/* sched.c - continuous batching over kvm_forward (see sched.h). */
#include "sched.h"

#include <stdio.h>
#include <string.h>

enum { SR_QUEUED = 0, SR_PREFILL, SR_DECODE, SR_DONE };

typedef struct sreq {
    kvm_sched_req_t r;
    int32_t *prompt;         /* [r.n_prompt] copy */
    int prompt_pos;          /* prompt tokens already forwarded */
    kvm_decode_t dec;        /* history, output and the stop rules */
    kvm_sampler_t *sampler;
    float *logits;           /* [vocab] while active (made at activation, freed when done: max_active rows at most;
                                engine scratch, charged to no account) */
    kvm_account_t *acct;     /* the memory account entered when it was submitted (retained): its output is charged there */
    int32_t pending;         /* sampled id not yet forwarded, -1 none */
    int base;                /* tokens the caller's seq held at submit (kept on preemption) */
    int n_preempted;
    int resv;                /* KV blocks reserved at activation (admission control), 0 when not active */
    int blocks0;             /* blocks its sequence held then */
    int phase;
    bool mem_wait;           /* the KV budget was full: retried once another request has finished */
    bool never_fits;         /* failed because its prompt needs more KV blocks than the whole pool */
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
    bool kv_blocked;         /* the head of the queue waits for KV blocks (admission control) */
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
    kvm_decode_free(&q->dec);
    if (q->sampler) kvm_sampler_free(q->sampler);
    kvm_free(q->logits);
    kvm_account_t *a = q->acct;
    kvm_free(q);
    kvm_account_release(a);
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

int kvm_sched_submit(kvm_sched_t *s, const kvm_sched_req_t *r) {
    if (!s || !r || !r->seq || !r->prompt || r->n_prompt < 1)
        return kvm_seterr(KVM_EINVAL, "sched: a request needs a sequence and at least one prompt token");
    sreq_t *q = kvm_calloc(1, sizeof *q);
    if (!q) return KVM_ENOMEM;
    q->r = *r;
    if ((q->acct = kvm_account_current())) kvm_account_retain(q->acct);
    q->pending = -1;
    int vocab = s->m->cfg.vocab_size;
    int rc = kvm_decode_init(&q->dec, s->m, &r->gen, r->on_token, r->on_token_ud);
    if (!rc) rc = kvm_decode_context(&q->dec, r->seq->tokens, r->seq->n_tokens);
    if (!rc) rc = kvm_decode_context(&q->dec, r->prompt, r->n_prompt);
    if (!rc) {
        q->prompt = kvm_malloc((size_t)r->n_prompt * sizeof *q->prompt);
        q->sampler = kvm_sampler_create(&r->gen.sampling, vocab);
        if (!q->prompt || !q->sampler) rc = kvm_errcode() == KVM_EINVAL ? KVM_EINVAL : KVM_ENOMEM;
    }
    if (rc) {
        if (rc == KVM_ENOMEM && kvm_errcode() != KVM_ENOMEM) kvm_seterr(rc, "sched: out of memory queuing a request");
        sreq_free(q);
        return rc;
    }
    memcpy(q->prompt, r->prompt, (size_t)r->n_prompt * sizeof *q->prompt);
    q->base = r->seq->n_tokens;
    q->t_submit = kvm_now_ns();
    q->r.gen.stop_strings = NULL; /* the decode state holds copies */
    q->r.gen.stop_ids = NULL;
    if (s->tail) s->tail->next = q;
    else s->head = q;
    s->tail = q;
    s->n_pending++;
    return 0;
}

static void finish(sreq_t *q, int reason) {
    kvm_free(q->logits);
    q->logits = NULL;
    q->mem_wait = false;
    q->resv = 0;
    q->phase = SR_DONE;
    q->stop_reason = reason;
    q->t_end = kvm_now_ns();
}

static void fail_req(sreq_t *q, int code, const char *msg) {
    q->status = code;
    snprintf(q->error, sizeof q->error, "%s", msg && *msg ? msg : kvm_strerror(code));
    finish(q, KVM_STOP_NONE);
}

/* Hands one sampled id to the request's decode state (the stop rules). Leaves the request DONE or
 * with the id pending for the next decode step. */
static void accept_token(sreq_t *q, int32_t id) {
    if (!q->t_first_tok) q->t_first_tok = kvm_now_ns();
    int stop = KVM_STOP_NONE;
    if (kvm_decode_accept(&q->dec, id, q->r.seq->n_tokens, &stop) != 0) {
        fail_req(q, kvm_errcode(), kvm_errmsg());
        return;
    }
    if (stop != KVM_STOP_NONE) {
        finish(q, stop);
        return;
    }
    q->pending = id;
    q->phase = SR_DECODE;
}

/* KV blocks q needs to be admitted: its prompt and one more block of decode room, counting the copy of a shared
 * partial last block. Decoding beyond that is covered by waiting and preemption (sched.h). */
static int admission_blocks(const sreq_t *q) {
    const kvm_seq_t *sq = q->r.seq;
    int64_t tokens = (int64_t)sq->n_tokens + q->r.n_prompt;
    int need = (int)((tokens + KVM_KV_BLOCK - 1) / KVM_KV_BLOCK) + 1 - sq->n_blocks;
    if (sq->n_blocks > 0 && sq->n_tokens % KVM_KV_BLOCK && sq->pool->refcount[sq->blocks[sq->n_blocks - 1]] > 1) need++;
    return need > 0 ? need : 0;
}

/* Blocks the active requests reserved at admission and have not allocated yet. */
static int outstanding_blocks(const kvm_sched_t *s) {
    int out = 0;
    for (const sreq_t *q = s->head; q; q = q->next) {
        if (q->phase != SR_PREFILL && q->phase != SR_DECODE) continue;
        int left = q->resv - (q->r.seq->n_blocks - q->blocks0);
        if (left > 0) out += left;
    }
    return out;
}

/* Admission control: whether q's blocks fit beside what the active requests reserved (the store's cache is
 * evicted for them first). The first request always goes (it may then wait, preempt or fail: sched.h). */
static bool admit(sreq_t *q, int active, int *outstanding) {
    kvm_kv_pool_t *p = q->r.seq->pool;
    int need = admission_blocks(q);
    if (active > 0 && p->n_free - *outstanding < need) {
        if (p->reclaim) p->reclaim(p->reclaim_ud, *outstanding + need); /* evicts only unreferenced cache */
        if (p->n_free - *outstanding < need) return false;
    }
    q->resv = need;
    q->blocks0 = q->r.seq->n_blocks;
    *outstanding += need;
    return true;
}

/* Activates queued requests in submit order while fewer than max_active run and the KV pool can hold them
 * (admission control: the head of the queue waits for running requests to finish; nothing overtakes it).
 * A request whose prompt needs more blocks than the whole pool can never run and fails at once. */
static void activate(kvm_sched_t *s) {
    s->kv_blocked = false;
    int active = 0;
    for (sreq_t *q = s->head; q; q = q->next)
        if (q->phase == SR_PREFILL || q->phase == SR_DECODE) active++;
    int outstanding = -1;
    for (sreq_t *q = s->head; q && active < s->o.max_active; q = q->next) {
        if (q->phase != SR_QUEUED) continue;
        char msg[256];
        if (q->r.seq->n_tokens + q->r.n_prompt > s->m->cfg.max_seq_len) {
            snprintf(msg, sizeof msg, "sched: prompt of %d tokens (+%d cached) does not fit the context of %d", q->r.n_prompt,
                     q->r.seq->n_tokens, s->m->cfg.max_seq_len);
            fail_req(q, KVM_ERANGE, msg);
            continue;
        }
        int need = admission_blocks(q), cap = q->r.seq->pool->n_blocks;
        if (need > cap) {
            snprintf(msg, sizeof msg, "sched: the prompt of %d tokens (+%d cached) needs %d KV blocks of %d tokens, the "
                     "whole KV pool has %d: it can never fit (raise the KV budget)", q->r.n_prompt, q->r.seq->n_tokens,
                     need, KVM_KV_BLOCK, cap);
            fail_req(q, KVM_ENOMEM, msg);
            q->never_fits = true;
            continue;
        }
        if (outstanding < 0) outstanding = outstanding_blocks(s);
        if (!admit(q, active, &outstanding)) {
            s->kv_blocked = true;
            return;
        }
        /* the logits row: the model's scratch, for active requests only (a queue of a thousand holds none) */
        kvm_account_t *a = kvm_account_enter(NULL);
        q->logits = kvm_malloc((size_t)s->m->cfg.vocab_size * sizeof *q->logits);
        kvm_account_enter(a);
        if (!q->logits) {
            outstanding -= q->resv;
            fail_req(q, KVM_ENOMEM, "sched: out of memory for a logits row");
            continue;
        }
        q->phase = SR_PREFILL;
        active++;
    }
}

/* Preemption (as vLLM's recompute mode): drops everything q computed (its seq back to what the caller
 * gave), so its blocks return to the pool, and restarts it from its prompt once another request has
 * finished. The sampler restarts from its seed, so the output comes again the same; the stream is not
 * shown what it was shown before (the decode state remembers how far it got). */
static void preempt(kvm_sched_t *s, sreq_t *q) {
    kvm_seq_truncate(q->r.seq, q->base);
    q->blocks0 = q->r.seq->n_blocks; /* its reservation is allocated again from here */
    q->prompt_pos = 0;
    kvm_decode_restart(&q->dec);
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
        int32_t id = kvm_sampler_sample(q->sampler, q->logits, q->dec.hist, q->dec.n_hist);
        if (id < 0) {
            fail_req(q, KVM_ENOMEM, "sched: out of memory sampling the next token");
            continue;
        }
        kvm_account_t *prev = kvm_account_enter(q->acct); /* the output grows: the request's owner pays */
        accept_token(q, id);
        kvm_account_enter(prev);
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
        out->ids = kvm_decode_take_ids(&q->dec, &out->n_ids);
        out->text = kvm_decode_take_text(&q->dec, NULL);
        if ((!out->ids || !out->text) && !out->status) {
            out->status = KVM_ENOMEM;
            snprintf(out->error, sizeof out->error, "sched: out of memory handing over the output");
        }
        out->stop_reason = q->stop_reason;
        out->kv_never_fits = q->never_fits;
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

bool kvm_sched_admit(kvm_sched_t *s) {
    activate(s);
    return s->kv_blocked;
}

void kvm_sched_done_clear(kvm_sched_done_t *d) {
    if (!d) return;
    kvm_free(d->ids);
    kvm_free(d->text);
    memset(d, 0, sizeof *d);
}

const kvm_sched_stats_t *kvm_sched_stats(const kvm_sched_t *s) { return &s->st; }

/* ---- generation: the scheduler with one request ---------------------------------------------- */

int kvm_generate(kvm_model_t *m, kvm_seq_t *seq, const int32_t *prompt, int n_prompt, const kvm_gen_params_t *p,
                 kvm_token_cb cb, void *ud, kvm_gen_result_t *res) {
    memset(res, 0, sizeof *res);
    if (!m || !seq || !prompt || n_prompt <= 0)
        return kvm_seterr(KVM_EINVAL, "generate: the prompt is empty (at least one token must be run)");
    kvm_gen_params_t defp = kvm_gen_default_params();
    /* prefill in chunks of at most 512 tokens on the CPU (a small workspace), 4096 on a GPU (GEMM
     * efficiency): one pass per chunk, as many rows as the prompt has up to that */
    const int chunk = m->ops == kvm_ops_cpu() ? 512 : 4096;
    kvm_sched_opts_t so = {.max_rows = n_prompt < chunk ? n_prompt : chunk, .max_active = 1};
    kvm_sched_t *s = kvm_sched_create(m, &so);
    if (!s) return kvm_errcode() ? kvm_errcode() : KVM_ENOMEM;
    kvm_sched_req_t r = {.seq = seq, .prompt = prompt, .n_prompt = n_prompt, .gen = p ? *p : defp, .on_token = cb, .on_token_ud = ud};
    int rc = kvm_sched_submit(s, &r);
    while (!rc && kvm_sched_pending(s) > 0 && s->head->phase != SR_DONE) kvm_sched_step(s);
    kvm_sched_done_t d;
    if (!rc && kvm_sched_take(s, &d) == 1) {
        rc = d.status ? kvm_seterr(d.status, "%s", d.error) : 0;
        if (!rc) {
            res->ids = d.ids;
            res->n_ids = d.n_ids;
            res->text = d.text;
            res->text_len = strlen(d.text);
            res->n_prompt = d.n_prompt;
            res->stop_reason = d.stop_reason;
            res->ttft_ms = d.ttft_ms;
            res->decode_ms = d.decode_ms;
            d.ids = NULL;
            d.text = NULL;
        }
        kvm_sched_done_clear(&d);
    }
    kvm_sched_free(s);
    return rc;
}
