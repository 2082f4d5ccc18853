/* owner.c -- "only the owner" on the native switch path: does the network namespace a
 * NETLINK_SOCK_DIAG socket was opened in hold this TCP connection, live and still open?
 *
 * The Python half is OwnershipChecker.owns and _lookup in src/shuntflow/router/ownership.py; the
 * rules and the refusal reasons here are the same (tests/unit/test_switchpath_frames.py asks both
 * about the same sockets). The Python router opens the diag socket inside the namespace, which
 * needs a setns() in a throwaway thread, and hands over its fd; this file only asks.
 *
 * Why one exact-tuple inet_diag_req_v2 and not a dump: the kernel answers it with one hash
 * lookup, inside sendmsg, whatever the number of sockets in the namespace.
 * Why the reply's tuple is compared again: for an exact request the kernel may fall back to a
 * listener on the local port, which is not the connection asked about.
 * Why the reply's sequence number is compared: a query that timed out may be answered late, and
 * that answer must not be read as the answer to the next one.
 * Why a non-zero inode: a socket its process closed (orphaned, or a time-wait entry that
 * sock_diag reports as FIN_WAIT2) has none, and nobody owns it any more. */

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h> /* the TCP_ESTABLISHED... states */

#include "owner.h"

#define SF_API __attribute__((visibility("default")))

/* Python's recv size: one exact-tuple answer is a single message of about 100 bytes. */
#define DIAG_RECV_SIZE 8192

static const char *const tcp_state_name[] = {
    [TCP_ESTABLISHED] = "ESTABLISHED", [TCP_SYN_SENT] = "SYN_SENT",
    [TCP_SYN_RECV] = "SYN_RECV",       [TCP_FIN_WAIT1] = "FIN_WAIT1",
    [TCP_FIN_WAIT2] = "FIN_WAIT2",     [TCP_TIME_WAIT] = "TIME_WAIT",
    [TCP_CLOSE] = "CLOSE",             [TCP_CLOSE_WAIT] = "CLOSE_WAIT",
    [TCP_LAST_ACK] = "LAST_ACK",       [TCP_LISTEN] = "LISTEN",
    [TCP_CLOSING] = "CLOSING",
};

/* Synchronized states a handoff legitimately runs in: a half-closed connection still carries
 * bytes one way. */
static int owned_state(int state) {
    return state == TCP_ESTABLISHED || state == TCP_FIN_WAIT1 || state == TCP_FIN_WAIT2 ||
           state == TCP_CLOSE_WAIT;
}

static int verdict(int ok, char *why, size_t whylen, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int verdict(int ok, char *why, size_t whylen, const char *fmt, ...) {
    va_list ap;
    if (why != NULL && whylen > 0) {
        va_start(ap, fmt);
        vsnprintf(why, whylen, fmt, ap);
        va_end(ap);
    }
    return ok;
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

enum lookup { FOUND, NONE, FAILED };

/* Reads replies until the one for `seq` decides. FOUND fills *state and *inode; FAILED leaves
 * errno-style text in why. */
static enum lookup lookup(int fd, uint32_t seq, const struct sf_tuple *t, int timeout_ms,
                          int *state, uint32_t *inode, char *why, size_t whylen) {
    /* Aligned for the netlink headers and inet_diag_msg read in place. */
    union {
        struct nlmsghdr h;
        uint8_t bytes[DIAG_RECV_SIZE];
    } buf;
    int64_t deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    /* The kernel answers an exact-tuple request inside the send, so the reply is usually
     * queued already: read first, and poll only when there is nothing yet. */
    int readable = 1;

    for (;;) {
        if (!readable) {
            int64_t left = deadline - now_ms();
            struct pollfd p = {.fd = fd, .events = POLLIN};
            int r = poll(&p, 1, left > 0 ? (int)left : 0);
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) {
                verdict(0, why, whylen, "sock_diag: %s", strerror(errno));
                return FAILED;
            }
            if (r == 0) {
                verdict(0, why, whylen, "sock_diag: timed out");
                return FAILED;
            }
        }
        ssize_t n = recv(fd, buf.bytes, sizeof(buf.bytes), MSG_DONTWAIT);
        readable = 0;
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (n < 0) {
            verdict(0, why, whylen, "sock_diag: %s", strerror(errno));
            return FAILED;
        }
        size_t pos = 0, len = (size_t)n;
        while (pos + sizeof(struct nlmsghdr) <= len) {
            struct nlmsghdr *h = (struct nlmsghdr *)(buf.bytes + pos);
            if (h->nlmsg_len < sizeof(struct nlmsghdr)) {
                verdict(0, why, whylen, "sock_diag: malformed netlink reply");
                return FAILED;
            }
            const uint8_t *body = buf.bytes + pos + sizeof(struct nlmsghdr);
            size_t end = pos + h->nlmsg_len < len ? pos + h->nlmsg_len : len;
            size_t bodylen = end - (pos + sizeof(struct nlmsghdr));
            pos += NLMSG_ALIGN(h->nlmsg_len);
            if (h->nlmsg_seq != seq) continue; /* a late answer to an earlier, timed-out query */
            if (h->nlmsg_type == NLMSG_ERROR) {
                int err = 0;
                if (bodylen >= sizeof(int)) {
                    memcpy(&err, body, sizeof(int));
                    err = -err;
                }
                if (err == 0 || err == ENOENT) return NONE; /* no socket with that tuple */
                verdict(0, why, whylen, "sock_diag: %s", strerror(err));
                return FAILED;
            }
            if (h->nlmsg_type == NLMSG_DONE) return NONE;
            if (h->nlmsg_type == SOCK_DIAG_BY_FAMILY && bodylen >= sizeof(struct inet_diag_msg)) {
                struct inet_diag_msg m;
                memcpy(&m, body, sizeof(m));
                if (m.id.idiag_sport == t->local_port && m.id.idiag_dport == t->remote_port &&
                    m.id.idiag_src[0] == t->local_ip && m.id.idiag_dst[0] == t->remote_ip) {
                    *state = m.idiag_state;
                    *inode = m.idiag_inode;
                    return FOUND;
                }
                return NONE; /* the kernel's fallback to a listener on the local port */
            }
        }
    }
}

/* One exact-tuple query: FOUND with *state and *inode, NONE, or FAILED with the reason. */
static enum lookup query(int diag_fd, uint32_t *seq, const struct sf_tuple *t, int timeout_ms,
                         int *state, uint32_t *inode, char *why, size_t whylen) {
    struct {
        struct nlmsghdr h;
        struct inet_diag_req_v2 r;
    } req;
    if (diag_fd < 0) {
        verdict(0, why, whylen, "namespace not attached");
        return FAILED;
    }
    *seq += 1; /* wraps at 2^32, as ownership.py masks it */
    memset(&req, 0, sizeof(req));
    req.h.nlmsg_len = sizeof(req);
    req.h.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    req.h.nlmsg_flags = NLM_F_REQUEST;
    req.h.nlmsg_seq = *seq;
    req.r.sdiag_family = AF_INET;
    req.r.sdiag_protocol = IPPROTO_TCP;
    req.r.idiag_states = 0xFFFFFFFFu;
    req.r.id.idiag_sport = t->local_port;
    req.r.id.idiag_dport = t->remote_port;
    req.r.id.idiag_src[0] = t->local_ip;
    req.r.id.idiag_dst[0] = t->remote_ip;
    req.r.id.idiag_cookie[0] = INET_DIAG_NOCOOKIE;
    req.r.id.idiag_cookie[1] = INET_DIAG_NOCOOKIE;
    for (;;) {
        ssize_t n = send(diag_fd, &req, sizeof(req), MSG_NOSIGNAL);
        if (n == (ssize_t)sizeof(req)) break;
        if (n < 0 && errno == EINTR) continue;
        verdict(0, why, whylen, "sock_diag: %s", n < 0 ? strerror(errno) : "short send");
        return FAILED;
    }
    return lookup(diag_fd, *seq, t, timeout_ms, state, inode, why, whylen);
}

SF_API int sfo_owns(int diag_fd, uint32_t *seq, const struct sf_tuple *t, int timeout_ms,
                    char *why, size_t whylen) {
    int state = 0;
    uint32_t inode = 0;
    switch (query(diag_fd, seq, t, timeout_ms, &state, &inode, why, whylen)) {
    case FAILED:
        return 0;
    case NONE:
        return verdict(0, why, whylen,
                       "no such TCP connection in the process's network namespace");
    case FOUND:
        break;
    }
    char number[16];
    const char *name = NULL;
    if (state >= 0 && (size_t)state < sizeof(tcp_state_name) / sizeof(tcp_state_name[0]))
        name = tcp_state_name[state];
    if (name == NULL) {
        snprintf(number, sizeof(number), "%d", state);
        name = number;
    }
    if (!owned_state(state)) return verdict(0, why, whylen, "connection is %s", name);
    if (inode == 0)
        return verdict(0, why, whylen, "connection is %s but closed by its process (no inode)",
                       name);
    return verdict(1, why, whylen, "%s", name);
}

/* A connection the kernel established that no process has accepted yet: in the listener's
 * queue a socket has no file, so no inode (a process-closed one has left ESTABLISHED and
 * CLOSE_WAIT by then). */
SF_API int sfo_unaccepted(int diag_fd, uint32_t *seq, const struct sf_tuple *t, int timeout_ms) {
    int state = 0;
    uint32_t inode = 1;
    char why[8];
    return query(diag_fd, seq, t, timeout_ms, &state, &inode, why, sizeof(why)) == FOUND &&
           (state == TCP_ESTABLISHED || state == TCP_CLOSE_WAIT) && inode == 0;
}
