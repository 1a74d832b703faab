/* net.c - the daemon's ZeroMQ sockets (net.h). */
#include "net.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <zmq.h>

#include "../core/core.h"
#include "../core/map.h"

/* A reply waiting for its peer's pipe. */
typedef struct qmsg {
    struct qmsg *next;
    uint8_t *peer;
    size_t peer_len;
    char *header;
    kvm_req_frame_t *pay;    /* [n_pay] frames, their bytes in the same allocation */
    int n_pay;
} qmsg_t;

#define MAX_KEYS 1024

struct kvm_net {
    void *ctx, *router, *pub, *zap;
    char (*keys)[41];        /* CURVE allow-list, Z85 */
    int n_keys;
    kvm_net_params_t p;
    char ep[2][256];
    zmq_msg_t parts[KVM_NET_MAX_FRAMES + 1]; /* [0] the peer, then the frames */
    int n_parts;
    qmsg_t *qhead, *qtail;
    kvm_map_t qcount;        /* peer -> replies queued */
    kvm_net_stats_t st;
};

static int zerr(const char *what) { return kvm_seterr(KVM_EIO, "zmq: %s: %s", what, zmq_strerror(zmq_errno())); }

/* Whether an endpoint stays on this machine: ipc://, inproc://, or tcp:// on a loopback address. */
static bool local_endpoint(const char *ep) {
    if (!strncmp(ep, "ipc://", 6) || !strncmp(ep, "inproc://", 9)) return true;
    static const char *const ok[] = {"tcp://127.0.0.1:", "tcp://localhost:", "tcp://[::1]:", "tcp://lo:"};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
        if (!strncmp(ep, ok[i], strlen(ok[i]))) return true;
    return false;
}

static int set_int(void *s, int opt, int v, const char *what) { return zmq_setsockopt(s, opt, &v, sizeof v) ? zerr(what) : 0; }

/* Options every socket gets (§3.1). */
static int common_opts(kvm_net_t *n, void *s) {
    int64_t maxmsg = (int64_t)n->p.max_frame;
    int rc = set_int(s, ZMQ_SNDHWM, n->p.hwm, "ZMQ_SNDHWM");
    if (!rc) rc = set_int(s, ZMQ_RCVHWM, n->p.hwm, "ZMQ_RCVHWM");
    if (!rc) rc = set_int(s, ZMQ_LINGER, 0, "ZMQ_LINGER");
    if (!rc && zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg)) rc = zerr("ZMQ_MAXMSGSIZE");
    if (!rc) rc = set_int(s, ZMQ_HEARTBEAT_IVL, 1000, "ZMQ_HEARTBEAT_IVL");
    if (!rc) rc = set_int(s, ZMQ_HEARTBEAT_TIMEOUT, 3000, "ZMQ_HEARTBEAT_TIMEOUT");
    if (!rc) rc = set_int(s, ZMQ_HEARTBEAT_TTL, 3000, "ZMQ_HEARTBEAT_TTL");
    return rc;
}

static int bind_one(kvm_net_t *n, void *s, const char *ep, int which) {
    if (!n->p.allow_public && !local_endpoint(ep))
        return kvm_seterr(KVM_EINVAL, "%s: not a loopback or ipc endpoint; a public bind needs CURVE (a secret key and an "
                                      "allow-list of client keys) or allow_public", ep);
    if (zmq_bind(s, ep)) return kvm_seterr(KVM_EIO, "zmq: cannot bind %s: %s", ep, zmq_strerror(zmq_errno()));
    size_t len = sizeof n->ep[which];
    if (zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, n->ep[which], &len)) return zerr("ZMQ_LAST_ENDPOINT");
    return 0;
}

/* Reads the Z85 key of 40 characters that starts a file; the file must not be readable by others. */
static int read_secret(const char *path, char key[41]) {
    struct stat st;
    if (stat(path, &st) != 0) return kvm_seterr(KVM_EIO, "CURVE secret key %s: %s", path, strerror(errno));
    if (st.st_mode & 077) return kvm_seterr(KVM_EINVAL, "CURVE secret key %s: readable by others (chmod 600 it)", path);
    FILE *f = fopen(path, "r");
    size_t n = f ? fread(key, 1, 40, f) : 0;
    if (f) fclose(f);
    key[40] = '\0';
    if (n != 40) return kvm_seterr(KVM_EINVAL, "CURVE secret key %s: not 40 Z85 characters", path);
    return 0;
}

/* The allow-list: one Z85 public key (40 characters) per line, '#' comments and blank lines skipped. */
static int read_allow(kvm_net_t *n, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return kvm_seterr(KVM_EIO, "CURVE allow-list %s: %s", path, strerror(errno));
    n->keys = kvm_calloc(MAX_KEYS, sizeof *n->keys);
    char line[256];
    int rc = n->keys ? 0 : KVM_ENOMEM, ln = 0;
    while (!rc && fgets(line, sizeof line, f)) {
        ln++;
        size_t len = strcspn(line, "\r\n");
        line[len] = '\0';
        if (len == 0 || line[0] == '#') continue;
        uint8_t bin[32];
        if (len != 40 || !zmq_z85_decode(bin, line)) rc = kvm_seterr(KVM_EINVAL, "%s:%d: not a Z85 public key", path, ln);
        else if (n->n_keys == MAX_KEYS) rc = kvm_seterr(KVM_ERANGE, "%s: more than %d keys", path, MAX_KEYS);
        else memcpy(n->keys[n->n_keys++], line, 41);
    }
    fclose(f);
    return rc;
}

/* CURVE on a server socket: the secret key, the server role and the ZAP domain. */
static int curve_opts(kvm_net_t *n, void *s, const char *secret) {
    int one = 1;
    if (zmq_setsockopt(s, ZMQ_CURVE_SERVER, &one, sizeof one) || zmq_setsockopt(s, ZMQ_CURVE_SECRETKEY, secret, 40) ||
        zmq_setsockopt(s, ZMQ_ZAP_DOMAIN, "kvmesh", 6))
        return zerr("CURVE options");
    return 0;
}

/* Loads the keys and binds the ZAP handler (before any CURVE socket binds). */
static int curve_setup(kvm_net_t *n, char secret[41]) {
    if (!zmq_has("curve")) return kvm_seterr(KVM_EUNSUPPORTED, "this libzmq has no CURVE");
    if (!n->p.curve_allow_file) return kvm_seterr(KVM_EINVAL, "CURVE needs an allow-list of client keys");
    int rc = read_secret(n->p.curve_secret_file, secret);
    if (!rc) rc = read_allow(n, n->p.curve_allow_file);
    if (!rc && !(n->zap = zmq_socket(n->ctx, ZMQ_REP))) rc = zerr("ZAP socket");
    if (!rc && zmq_bind(n->zap, "inproc://zeromq.zap.01")) rc = zerr("bind inproc://zeromq.zap.01");
    return rc;
}

/* Answers the ZAP requests waiting: 200 for a CURVE client whose key is allowed, 400 otherwise. */
static void serve_zap(kvm_net_t *n) {
    for (;;) {
        zmq_msg_t part[7];
        int np = 0, more = 1;
        while (more) {
            zmq_msg_t tmp, *m = np < 7 ? &part[np] : &tmp;
            zmq_msg_init(m);
            if (zmq_msg_recv(m, n->zap, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(m);
                for (int i = 0; i < np; i++) zmq_msg_close(&part[i]);
                return;
            }
            more = zmq_msg_more(m);
            if (m == &tmp) zmq_msg_close(m);
            else np++;
        }
        bool ok = false;
        if (np == 7 && zmq_msg_size(&part[5]) == 5 && !memcmp(zmq_msg_data(&part[5]), "CURVE", 5) && zmq_msg_size(&part[6]) == 32) {
            char z85[41];
            zmq_z85_encode(z85, zmq_msg_data(&part[6]), 32);
            for (int i = 0; i < n->n_keys && !ok; i++) ok = !strcmp(n->keys[i], z85);
        }
        if (!ok) n->st.curve_denied++;
        const char *id = np > 1 ? zmq_msg_data(&part[1]) : "";
        size_t idlen = np > 1 ? zmq_msg_size(&part[1]) : 0;
        zmq_send(n->zap, "1.0", 3, ZMQ_SNDMORE);
        zmq_send(n->zap, id, idlen, ZMQ_SNDMORE);
        zmq_send(n->zap, ok ? "200" : "400", 3, ZMQ_SNDMORE);
        zmq_send(n->zap, ok ? "OK" : "key not allowed", ok ? 2 : 15, ZMQ_SNDMORE);
        zmq_send(n->zap, "", 0, ZMQ_SNDMORE);
        zmq_send(n->zap, "", 0, 0);
        for (int i = 0; i < np; i++) zmq_msg_close(&part[i]);
    }
}

kvm_net_t *kvm_net_create(const kvm_net_params_t *p) {
    if (!p || !p->bind) {
        kvm_seterr(KVM_EINVAL, "kvm_net_create: no endpoint to bind");
        return NULL;
    }
    kvm_net_t *n = kvm_calloc(1, sizeof *n);
    if (!n) return NULL;
    n->p = *p;
    if (n->p.hwm <= 0) n->p.hwm = 10000;
    if (!n->p.max_frame) n->p.max_frame = 256u << 20;
    if (n->p.client_queue <= 0) n->p.client_queue = 4096;
    kvm_map_init(&n->qcount, KVM_MAP_STR);
    int rc = (n->ctx = zmq_ctx_new()) ? 0 : zerr("zmq_ctx_new");
    char secret[41] = "";
    bool curve = p->curve_secret_file != NULL;
    if (!rc && curve) rc = curve_setup(n, secret);
    if (curve) n->p.allow_public = true; /* authenticated: any address may bind */
    if (!rc && !(n->router = zmq_socket(n->ctx, ZMQ_ROUTER))) rc = zerr("ROUTER socket");
    if (!rc) rc = common_opts(n, n->router);
    if (!rc && curve) rc = curve_opts(n, n->router, secret);
    if (!rc) rc = set_int(n->router, ZMQ_ROUTER_MANDATORY, 1, "ZMQ_ROUTER_MANDATORY");
    if (!rc) rc = bind_one(n, n->router, p->bind, 0);
    if (!rc && p->events) {
        if (!(n->pub = zmq_socket(n->ctx, ZMQ_XPUB))) rc = zerr("XPUB socket");
        if (!rc) rc = common_opts(n, n->pub);
        if (!rc && curve) rc = curve_opts(n, n->pub, secret);
        /* no ZMQ_XPUB_NODROP: a subscriber at its high-water mark misses events (it sees the gap in seq), the
         * others do not (with NODROP one deaf subscriber made every subscriber miss them) */
        if (!rc) rc = bind_one(n, n->pub, p->events, 1);
    }
    if (rc) {
        kvm_net_free(n);
        return NULL;
    }
    return n;
}

static void close_parts(kvm_net_t *n) {
    for (int i = 0; i < n->n_parts; i++) zmq_msg_close(&n->parts[i]);
    n->n_parts = 0;
}

static void qmsg_free(qmsg_t *q) {
    kvm_free(q->peer);
    kvm_free(q->header);
    kvm_free(q->pay);
    kvm_free(q);
}

void kvm_net_free(kvm_net_t *n) {
    if (!n) return;
    close_parts(n);
    for (qmsg_t *q = n->qhead, *nx; q; q = nx) {
        nx = q->next;
        qmsg_free(q);
    }
    kvm_map_free(&n->qcount);
    if (n->router) zmq_close(n->router);
    if (n->pub) zmq_close(n->pub);
    if (n->zap) zmq_close(n->zap);
    kvm_free(n->keys);
    if (n->ctx) zmq_ctx_term(n->ctx);
    kvm_free(n);
}

const char *kvm_net_endpoint(const kvm_net_t *n, bool events) { return n ? n->ep[events ? 1 : 0] : ""; }

/* One attempt: 0 sent, or the errno of the first part (EAGAIN, EHOSTUNREACH, ...). */
static int try_send(kvm_net_t *n, const void *peer, size_t peer_len, const char *header, const kvm_req_frame_t *pay, int n_pay) {
    if (zmq_send(n->router, peer, peer_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) return zmq_errno();
    /* the rest of a message whose first part went cannot block (ZeroMQ queues multipart messages whole) */
    zmq_send(n->router, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT);
    zmq_send(n->router, header, strlen(header), (n_pay ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT);
    for (int i = 0; i < n_pay; i++)
        zmq_send(n->router, pay[i].data ? pay[i].data : "", pay[i].len, (i + 1 < n_pay ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT);
    n->st.sent++;
    return 0;
}

static uint64_t queued_for(const kvm_net_t *n, const void *peer, size_t peer_len) {
    kvm_mapval_t v;
    return kvm_map_get(&n->qcount, peer, peer_len, &v) ? v.u64 : 0;
}

static int enqueue(kvm_net_t *n, const void *peer, size_t peer_len, const char *header, const kvm_req_frame_t *pay, int n_pay) {
    qmsg_t *q = kvm_calloc(1, sizeof *q);
    if (!q) return KVM_ENOMEM;
    size_t bytes = (size_t)n_pay * sizeof *q->pay;
    for (int i = 0; i < n_pay; i++) bytes += pay[i].len;
    q->peer = kvm_malloc(peer_len ? peer_len : 1);
    q->header = kvm_strdup(header);
    q->pay = n_pay ? kvm_malloc(bytes) : NULL;
    if (!q->peer || !q->header || (n_pay && !q->pay) ||
        kvm_map_put(&n->qcount, peer, peer_len, KVM_MAPVAL_U64(queued_for(n, peer, peer_len) + 1))) {
        qmsg_free(q);
        return KVM_ENOMEM;
    }
    memcpy(q->peer, peer, peer_len);
    q->peer_len = peer_len;
    uint8_t *at = (uint8_t *)(q->pay + n_pay);
    for (int i = 0; i < n_pay; i++) {
        if (pay[i].len) memcpy(at, pay[i].data, pay[i].len);
        q->pay[i] = (kvm_req_frame_t){at, pay[i].len};
        at += pay[i].len;
    }
    q->n_pay = n_pay;
    if (n->qtail) n->qtail->next = q;
    else n->qhead = q;
    n->qtail = q;
    n->st.queued++;
    n->st.queued_now++;
    return 0;
}

int kvm_net_send(kvm_net_t *n, const void *peer, size_t peer_len, const char *header, const void *payload, size_t plen,
                 bool terminal) {
    kvm_req_frame_t f = {payload, plen};
    return kvm_net_sendv(n, peer, peer_len, header, &f, payload || plen ? 1 : 0, terminal);
}

int kvm_net_sendv(kvm_net_t *n, const void *peer, size_t peer_len, const char *header, const kvm_req_frame_t *pay,
                  int n_pay, bool terminal) {
    uint64_t waiting = queued_for(n, peer, peer_len);
    if (!waiting) {
        int e = try_send(n, peer, peer_len, header, pay, n_pay);
        if (!e) return 0;
        if (e == EHOSTUNREACH) return kvm_seterr(KVM_ENOENT, "peer gone");
        if (e != EAGAIN) return kvm_seterr(KVM_EIO, "zmq: send: %s", zmq_strerror(e));
    }
    if (waiting >= (uint64_t)n->p.client_queue && !terminal) {
        n->st.dropped_replies++;
        return kvm_seterr(KVM_ESLOWCLIENT, "peer's queue of %d replies is full", n->p.client_queue);
    }
    return enqueue(n, peer, peer_len, header, pay, n_pay);
}

static void unlink_queued(kvm_net_t *n, qmsg_t *prev, qmsg_t *q) {
    if (prev) prev->next = q->next;
    else n->qhead = q->next;
    if (n->qtail == q) n->qtail = prev;
    uint64_t c = queued_for(n, q->peer, q->peer_len);
    if (c <= 1) kvm_map_remove(&n->qcount, q->peer, q->peer_len, NULL);
    else kvm_map_put(&n->qcount, q->peer, q->peer_len, KVM_MAPVAL_U64(c - 1)); /* overwrite: no allocation */
    n->st.queued_now--;
    qmsg_free(q);
}

int kvm_net_forget(kvm_net_t *n, const void *peer, size_t peer_len) {
    int k = 0;
    for (qmsg_t *q = n->qhead, *prev = NULL, *nx; q; q = nx) {
        nx = q->next;
        if (q->peer_len == peer_len && !memcmp(q->peer, peer, peer_len)) {
            unlink_queued(n, prev, q);
            k++;
        } else {
            prev = q;
        }
    }
    return k;
}

/* Sends what the queues hold, in order per peer; a peer still full keeps the rest of its queue. */
static void flush_queues(kvm_net_t *n) {
    kvm_map_t blocked;
    kvm_map_init(&blocked, KVM_MAP_STR);
    for (qmsg_t *q = n->qhead, *prev = NULL, *nx; q; q = nx) {
        nx = q->next;
        if (kvm_map_get(&blocked, q->peer, q->peer_len, NULL)) {
            prev = q;
            continue;
        }
        int e = try_send(n, q->peer, q->peer_len, q->header, q->pay, q->n_pay);
        if (e == EAGAIN) {
            kvm_map_put(&blocked, q->peer, q->peer_len, KVM_MAPVAL_U64(1)); /* out of memory: tried again, no harm */
            prev = q;
            continue;
        }
        unlink_queued(n, prev, q); /* sent, or the peer is gone: either way done */
    }
    kvm_map_free(&blocked);
}

/* Subscription messages of the XPUB socket: counted, otherwise ignored. */
static void read_subscriptions(kvm_net_t *n) {
    for (;;) {
        uint8_t buf[256];
        int len = zmq_recv(n->pub, buf, sizeof buf, ZMQ_DONTWAIT);
        if (len < 0) return;
        if (len > 0 && buf[0] == 1) n->st.subscriptions++;
        else if (len > 0 && buf[0] == 0) n->st.subscriptions--;
    }
}

/* Reads the parts of one message already waiting on the ROUTER socket. */
static int read_message(kvm_net_t *n, kvm_net_msg_t *m) {
    int more = 1;
    while (more) {
        zmq_msg_t tmp, *part = n->n_parts <= KVM_NET_MAX_FRAMES ? &n->parts[n->n_parts] : &tmp;
        zmq_msg_init(part);
        if (zmq_msg_recv(part, n->router, ZMQ_DONTWAIT) < 0) {
            int e = zmq_errno();
            zmq_msg_close(part);
            /* a poll that said readable may find nothing (a peer gone meanwhile), a signal may interrupt */
            if (n->n_parts == 0 && (e == EAGAIN || e == EINTR)) return 0;
            return zerr("receive");
        }
        more = zmq_msg_more(part);
        if (part == &tmp) zmq_msg_close(part);
        else n->n_parts++;
        if (part == &tmp) m->n_frames = KVM_NET_MAX_FRAMES + 1;
    }
    m->peer = zmq_msg_data(&n->parts[0]);
    m->peer_len = zmq_msg_size(&n->parts[0]);
    if (m->n_frames != KVM_NET_MAX_FRAMES + 1) m->n_frames = n->n_parts - 1;
    for (int i = 1; i < n->n_parts; i++) m->frames[i - 1] = (kvm_req_frame_t){zmq_msg_data(&n->parts[i]), zmq_msg_size(&n->parts[i])};
    n->st.received++;
    return 1;
}

int kvm_net_recv(kvm_net_t *n, int timeout_ms, kvm_net_msg_t *m) {
    close_parts(n);
    memset(m, 0, sizeof *m);
    if (n->qhead) flush_queues(n);
    if (n->pub) read_subscriptions(n);
    if (n->zap) serve_zap(n);
    /* only sockets: an item with a NULL socket would poll its fd (0, stdin) */
    zmq_pollitem_t items[3] = {{n->router, 0, ZMQ_POLLIN, 0}};
    int ni = 1, ipub = -1, izap = -1;
    if (n->pub) items[ipub = ni++] = (zmq_pollitem_t){n->pub, 0, ZMQ_POLLIN, 0};
    if (n->zap) items[izap = ni++] = (zmq_pollitem_t){n->zap, 0, ZMQ_POLLIN, 0};
    int rc = zmq_poll(items, ni, n->qhead && timeout_ms > 10 ? 10 : timeout_ms);
    if (rc < 0) return zmq_errno() == EINTR ? 0 : zerr("poll");
    if (ipub >= 0 && (items[ipub].revents & ZMQ_POLLIN)) read_subscriptions(n);
    if (izap >= 0 && (items[izap].revents & ZMQ_POLLIN)) serve_zap(n);
    if (!(items[0].revents & ZMQ_POLLIN)) return 0;
    return read_message(n, m);
}

int64_t kvm_net_publish(kvm_net_t *n, const char *topic, const char *body) {
    if (!n->pub) return -1;
    uint64_t seq = n->st.next_seq;
    uint8_t be[8];
    for (int i = 0; i < 8; i++) be[i] = (uint8_t)(seq >> (56 - 8 * i));
    if (zmq_send(n->pub, topic, strlen(topic), ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
        n->st.dropped_events++; /* the socket refused it (ZeroMQ's own drops, per subscriber, are not counted) */
        return -1;
    }
    zmq_send(n->pub, be, sizeof be, ZMQ_SNDMORE | ZMQ_DONTWAIT);
    zmq_send(n->pub, body, strlen(body), ZMQ_DONTWAIT);
    n->st.next_seq++;
    return (int64_t)seq;
}

void kvm_net_stats(const kvm_net_t *n, kvm_net_stats_t *out) { *out = n->st; }
