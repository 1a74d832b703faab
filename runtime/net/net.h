/* net.h - the daemon's ZeroMQ sockets (interfaces.md §3.1, §3.5, §3.6; docs/protocol.md): a ROUTER for requests
 * and replies, an XPUB for events with one sequence number across topics. It knows frames, peers and queues, not
 * what messages mean: the request decoder is request.h, the handlers are agents/serve.c.
 *
 * Every send uses ZMQ_DONTWAIT. A reply to a peer whose pipe is full waits in that peer's queue (in order, at most
 * client_queue messages, terminal messages always), flushed by the next kvm_net_recv; an event for a subscriber
 * at its high-water mark is dropped and counted (XPUB_NODROP reports it).
 * Thread-safety: none; one thread owns a kvm_net_t (ZeroMQ sockets are not thread-safe). */
#ifndef KVM_NET_H
#define KVM_NET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "request.h"

typedef struct kvm_net kvm_net_t;

typedef struct kvm_net_params {
    const char *bind;        /* the ROUTER endpoint ("tcp://127.0.0.1:*" picks a free port) */
    const char *events;      /* the XPUB endpoint; NULL = no events */
    bool allow_public;       /* a non-loopback tcp:// bind without CURVE is refused unless set */
    int hwm;                 /* ZMQ_SNDHWM / ZMQ_RCVHWM (0 = 10000) */
    size_t max_frame;        /* ZMQ_MAXMSGSIZE: a peer sending a larger frame is disconnected (0 = 256 MiB) */
    int client_queue;        /* replies queued per peer whose pipe is full (0 = 4096) */
    /* CURVE (interfaces.md §3.7): the server's secret key, 40 Z85 characters in a file of mode 0600 (NULL = no
     * CURVE), and the allow-list of client public keys (Z85, one per line; '#' comments). With CURVE, a ZAP
     * handler on inproc://zeromq.zap.01 admits only the listed keys, and a public bind is allowed. */
    const char *curve_secret_file;
    const char *curve_allow_file;
} kvm_net_params_t;

/* Binds the sockets. NULL + message (KVM_EINVAL for a public bind without allow_public, KVM_EIO for libzmq). */
kvm_net_t *kvm_net_create(const kvm_net_params_t *p);
void kvm_net_free(kvm_net_t *n);
/* The bound address of the requests (events = false) or events socket, the port resolved; "" if none. */
const char *kvm_net_endpoint(const kvm_net_t *n, bool events);

#define KVM_NET_MAX_FRAMES 32 /* frames kept per message; a longer message reports KVM_NET_MAX_FRAMES + 1 */

/* One received message: the peer's routing id and the frames after it (valid until the next kvm_net_recv). */
typedef struct kvm_net_msg {
    const uint8_t *peer;
    size_t peer_len;
    kvm_req_frame_t frames[KVM_NET_MAX_FRAMES];
    int n_frames;            /* KVM_NET_MAX_FRAMES + 1 when there were more (the rest were read and dropped) */
} kvm_net_msg_t;

/* Flushes queued replies, reads subscriptions, and waits up to timeout_ms (0 = not at all) for a request.
 * 1 and *m filled, 0 for none, <0 on a libzmq error (interrupted waits are 0). */
int kvm_net_recv(kvm_net_t *n, int timeout_ms, kvm_net_msg_t *m);

/* Sends [peer][""][header][payload (if plen or payload)] to a peer. 0 sent or queued; KVM_ESLOWCLIENT when
 * the peer's queue is full (the message is dropped and counted; a terminal message is queued anyway);
 * KVM_ENOENT when the peer is gone (EHOSTUNREACH); KVM_EIO otherwise. */
int kvm_net_send(kvm_net_t *n, const void *peer, size_t peer_len, const char *header, const void *payload,
                 size_t plen, bool terminal);
/* The same with n_pay payload frames (segment.get's three). */
int kvm_net_sendv(kvm_net_t *n, const void *peer, size_t peer_len, const char *header, const kvm_req_frame_t *pay,
                  int n_pay, bool terminal);
/* Drops the replies queued for a peer; how many. */
int kvm_net_forget(kvm_net_t *n, const void *peer, size_t peer_len);

/* Publishes [topic][seq: u64 big-endian][body] on the events socket; the seq it used, or -1 when dropped (a
 * subscriber at its high-water mark; counted) or there is no events socket. */
int64_t kvm_net_publish(kvm_net_t *n, const char *topic, const char *body);

typedef struct kvm_net_stats {
    uint64_t received, sent, queued, dropped_replies, dropped_events, next_seq;
    int subscriptions;       /* subscribe messages seen minus unsubscribes */
    int queued_now;          /* replies waiting in peer queues */
    uint64_t curve_denied;   /* CURVE handshakes refused (key not in the allow-list) */
} kvm_net_stats_t;

void kvm_net_stats(const kvm_net_t *n, kvm_net_stats_t *out);

#endif
