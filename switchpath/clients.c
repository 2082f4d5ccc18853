/* clients.c -- the library channels once Python admitted them (docs/wire.md section 1).
 *
 * Python accepts a channel, checks who is on the other end (SO_PEERCRED, namespace, attached
 * container, per-container cap) and answers its HELLO; then the fd is ours. Here: every datagram
 * must be one valid frame a library may send (sfl_parse), no fd may come with it, replies wait
 * in a bounded queue while the client's socket is full, and a passed host fd is closed once the
 * kernel holds the client's copy. A client that breaks the protocol is closed with the reason,
 * which Python logs; everyone else keeps being served.
 * Cold frames (CONN_INFO, STATS_END, SWITCH_DONE, SWITCH_CALLS) go on to Python as events with
 * our verdict on them: Python keeps the figures and the status document. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "sfs.h"

#define MAX_SEND_QUEUE 4096
#define READS_PER_WAKEUP 64
#define READ_BATCH 16
#define MAX_HANDED 65536

struct sfs_client *client_get(struct sfs *s, uint64_t id)
{
    uint8_t k[12];
    smap_key_u64(k, id);
    struct snode *n = smap_get(&s->clients, k);
    return n ? n->val : NULL;
}

static void client_free(struct sfs *s, struct sfs_client *c)
{
    uint8_t k[12];
    smap_key_u64(k, c->id);
    struct snode *n = smap_get(&s->clients, k);
    if (n != NULL && n->val == c)
        smap_del(&s->clients, n);
    for (size_t i = 0; i < c->qlen; i++) {
        struct qent *q = &c->q[(c->qhead + i) % c->qcap];
        if (q->fd >= 0)
            close(q->fd);
    }
    free(c->q);
    smap_free(&c->outstanding);
    smap_free(&c->handed);
    sfs_defer_free(s, c, &c->io);
}

void client_close(struct sfs *s, struct sfs_client *c, const char *reason, int violation)
{
    if (c->closed)
        return;
    c->closed = 1;
    io_unwatch(s, &c->io);
    close(c->io.fd);
    struct ev e;
    ev_begin(&e, EV_CLOSED, NULL, NULL);
    ev_int(&e, "client", (int64_t)c->id);
    ev_str(&e, "reason", reason);
    ev_int(&e, "violation", violation);
    ev_send(s, &e);
    uint64_t id = c->id;
    client_free(s, c);
    switch_client_closed(s, id);
}

static int send_one(struct sfs_client *c, const struct qent *q)
{
    struct iovec iov = {.iov_base = (void *)&q->msg, .iov_len = sizeof(q->msg)};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (q->fd >= 0) {
        memset(&u, 0, sizeof(u));
        mh.msg_control = u.buf;
        mh.msg_controllen = sizeof(u.buf);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &q->fd, sizeof(int));
    }
    ssize_t n;
    do
        n = sendmsg(c->io.fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : 0;
}

/* Sends what the queue holds; 0, or -1 if the client was closed. */
static int flush(struct sfs *s, struct sfs_client *c)
{
    while (c->qlen > 0) {
        struct qent *q = &c->q[c->qhead];
        int rc = send_one(c, q);
        if (rc == -EAGAIN) {
            io_watch(s, &c->io, EPOLLIN | EPOLLOUT);
            return 0;
        }
        if (rc < 0) {
            char why[96];
            snprintf(why, sizeof(why), "send failed: %s", strerror(-rc));
            client_close(s, c, why, 0);
            return -1;
        }
        if (q->fd >= 0)
            close(q->fd); /* the client holds its own copy now */
        c->qhead = (c->qhead + 1) % c->qcap;
        c->qlen--;
        c->frames_out++;
    }
    if (c->io.events & EPOLLOUT)
        io_watch(s, &c->io, EPOLLIN);
    return 0;
}

/* Queues one frame with `fd` attached (ours to close either way); 0 if the client is gone. */
int client_send(struct sfs *s, struct sfs_client *c, const struct sf_msg *m, int fd)
{
    if (c == NULL || c->closed) {
        if (fd >= 0)
            close(fd);
        return 0;
    }
    if (c->qlen == MAX_SEND_QUEUE) {
        if (fd >= 0)
            close(fd);
        client_close(s, c, "send queue overflow (client not reading)", 0);
        return 0;
    }
    if (c->qlen == c->qcap) {
        size_t cap = c->qcap ? c->qcap * 2 : 8;
        struct qent *q = malloc(cap * sizeof(*q));
        if (q == NULL) {
            if (fd >= 0)
                close(fd);
            client_close(s, c, "router out of memory", 0);
            return 0;
        }
        for (size_t i = 0; i < c->qlen; i++)
            q[i] = c->q[(c->qhead + i) % c->qcap];
        free(c->q);
        c->q = q;
        c->qcap = cap;
        c->qhead = 0;
    }
    c->q[(c->qhead + c->qlen) % c->qcap] = (struct qent){.msg = *m, .fd = fd};
    c->qlen++;
    if (c->io.events & EPOLLOUT)
        return 1; /* the writable event flushes in order */
    return flush(s, c) == 0;
}

void client_writable(struct sfs *s, struct sfs_client *c)
{
    flush(s, c);
}

static int hung_up(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP));
}

/* A report about `t` counts only if it comes from the container that holds it (daemon.py
 * _reports_own). */
static int reports_own(struct sfs *s, struct sfs_client *c, const struct sf_tuple *t, int path)
{
    if (!s->cfg.owner_check)
        return 1;
    if (!sfl_valid_tuple(t))
        return 0;
    if (path == SF_PATH_HOST) {
        struct tkey k = tuple_key(t);
        return smap_get(&c->handed, k.raw) != NULL;
    }
    if (c->diag_fd < 0)
        return 0;
    char why[160];
    return client_ns_holds(s, c, t, why, sizeof(why));
}

/* One sock_diag query in the client's namespace. The netlink sequence is kept per diag socket
 * (several clients of one container share it), so a late answer to an earlier, timed-out query
 * is told apart from this one's. */
int client_ns_holds(struct sfs *s, struct sfs_client *c, const struct sf_tuple *t, char *why,
                    size_t whylen)
{
    uint8_t dk[12];
    smap_key_u64(dk, (uint64_t)c->diag_fd);
    struct snode *n = smap_put(&s->diag_seq, dk, NULL);
    uint32_t seq = n ? (uint32_t)n->aux : 0;
    s->owner_checks++;
    int ok = sfo_owns(c->diag_fd, &seq, t, 500, why, whylen);
    if (n != NULL)
        n->aux = seq;
    return ok;
}

/* The same, asking whether the tuple waits in a listener's queue (sfo_unaccepted). */
int client_ns_unaccepted(struct sfs *s, struct sfs_client *c, const struct sf_tuple *t)
{
    uint8_t dk[12];
    smap_key_u64(dk, (uint64_t)c->diag_fd);
    struct snode *n = smap_put(&s->diag_seq, dk, NULL);
    uint32_t seq = n ? (uint32_t)n->aux : 0;
    s->owner_checks++;
    int yes = sfo_unaccepted(c->diag_fd, &seq, t, 500);
    if (n != NULL)
        n->aux = seq;
    return yes;
}

static void forward(struct sfs *s, struct sfs_client *c, int type, const struct sf_msg *m,
                    int verdict)
{
    struct sf_tuple t = sfl_tuple(m);
    struct ev e;
    ev_begin(&e, type, NULL, NULL);
    ev_int(&e, "client", (int64_t)c->id);
    ev_int(&e, "seq", m->seq);
    ev_int(&e, "status", m->status);
    ev_tuple(&e, "tuple", &t);
    ev_uint(&e, "arg", m->arg);
    ev_uint(&e, "arg2", m->arg2);
    ev_int(&e, "ok", verdict);
    ev_send(s, &e);
}

static void stats_frame(struct sfs *s, struct sfs_client *c, const struct sf_msg *m)
{
    uint8_t k[12];
    smap_key_u64(k, m->seq);
    struct snode *n = smap_get(&s->stats, k);
    if (n == NULL || n->aux != c->id)
        return; /* late answer to a STATS_REQ Python gave up on */
    if (m->type == SF_STATS_END) {
        forward(s, c, EV_STATS_END, m, 1);
        smap_del(&s->stats, n);
        return;
    }
    struct sf_tuple t = sfl_tuple(m);
    forward(s, c, EV_ROW, m, reports_own(s, c, &t, m->status));
}

/* A figure, not a request: a SWITCH_DONE for a tuple not handed to this client is left out of
 * the figures (reports_rejected), and the client keeps its channel. */
static void switch_done_report(struct sfs *s, struct sfs_client *c, const struct sf_msg *m)
{
    struct sf_tuple t = sfl_tuple(m);
    struct tkey k = tuple_key(&t);
    struct ev e;
    if (s->cfg.owner_check && smap_get(&c->handed, k.raw) == NULL) {
        s->reports_rejected++;
        ev_begin(&e, EV_LOG, "warning", "report_rejected");
        ev_int(&e, "client", (int64_t)c->id);
        if (c->pid)
            ev_int(&e, "pid", c->pid);
        ev_str(&e, "frame", "SWITCH_DONE");
        ev_tuple(&e, "tuple", &t);
        ev_str(&e, "reason", "no host connection was handed to this client for it");
        ev_send(s, &e);
        return;
    }
    if (m->arg2 == 1)
        lat_add(&s->lat[LAT_SWITCH_TIME], m->arg);
    else
        s->switch_times_claimed++;
    ev_begin(&e, EV_LOG, "debug", "switch_done");
    ev_int(&e, "client", (int64_t)c->id);
    ev_tuple(&e, "tuple", &t);
    ev_uint(&e, "us", m->arg);
    ev_uint(&e, "own", m->arg2);
    ev_send(s, &e);
}

/* The longest application call of one switch end; one the library could not have meant is
 * logged and left out (the client stays). */
static void switch_calls_report(struct sfs *s, struct sfs_client *c, const struct sf_msg *m)
{
    struct sf_tuple t = sfl_tuple(m);
    char why[64];
    const char *reason = NULL;
    struct ev e;
    if (m->status > SF_TIMEOUT) {
        snprintf(why, sizeof(why), "unknown status %u", m->status);
        reason = why;
    } else if (!sfl_valid_tuple(&t)) {
        reason = "invalid tuple";
    } else if (m->arg > 0 && m->arg2 == 0) {
        reason = "a longest call without any call timed";
    }
    if (reason != NULL) {
        s->switch_calls_rejected++;
        ev_begin(&e, EV_LOG, "warning", "switch_calls_rejected");
        ev_int(&e, "client", (int64_t)c->id);
        ev_tuple(&e, "tuple", &t);
        ev_str(&e, "reason", reason);
        ev_send(s, &e);
        return;
    }
    if (m->status == SF_OK) {
        lat_add(&s->lat[LAT_CALL_MAX], m->arg);
        s->switch_calls_timed += m->arg2;
    } else {
        lat_add(&s->lat[LAT_CALL_MAX_FAILED], m->arg);
    }
    ev_begin(&e, EV_LOG, "debug", "switch_calls");
    ev_int(&e, "client", (int64_t)c->id);
    ev_tuple(&e, "tuple", &t);
    ev_str(&e, "status", status_name(m->status));
    ev_uint(&e, "max_us", m->arg);
    ev_uint(&e, "calls", m->arg2);
    ev_send(s, &e);
}

/* 0, or the reason the client is closed for. */
static const char *dispatch(struct sfs *s, struct sfs_client *c, const struct sf_msg *m,
                            char *why, size_t len)
{
    switch (m->type) {
    case SF_HELLO:
        return "second HELLO on one channel";
    case SF_SWITCH_REQ:
        switch_request(s, c, m);
        return NULL;
    case SF_CLAIM_RES:
        if (!seq_issued(s, m->seq)) {
            snprintf(why, len, "CLAIM_RES for seq %#x the router never sent", m->seq);
            return why;
        }
        return switch_claim_res(s, c, m, why, len);
    case SF_CONN_INFO:
    case SF_STATS_END:
        if (!seq_issued(s, m->seq)) {
            snprintf(why, len, "%s for seq %#x the router never sent",
                     m->type == SF_CONN_INFO ? "CONN_INFO" : "STATS_END", m->seq);
            return why;
        }
        stats_frame(s, c, m);
        return NULL;
    case SF_SWITCH_DONE:
        switch_done_report(s, c, m);
        return NULL;
    case SF_SWITCH_CALLS:
        switch_calls_report(s, c, m);
        return NULL;
    default:
        return "frame type may not come from a library"; /* sfl_parse lets none through */
    }
}

/* The fds a datagram carried are never ours to keep: closed; how many there were. */
static int drop_fds(struct msghdr *mh)
{
    int nfds = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(mh); cm; cm = CMSG_NXTHDR(mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
            close(fd);
            nfds++;
        }
    }
    if (mh->msg_flags & MSG_CTRUNC)
        nfds += 1; /* fds the kernel dropped for us still were fds */
    return nfds;
}

/* One datagram of `n` bytes; -1 if the client is gone. */
static int handle_one(struct sfs *s, struct sfs_client *c, const uint8_t *buf, size_t n,
                      struct msghdr *mh)
{
    int nfds = drop_fds(mh);
    if (n == 0 && nfds == 0) {
        /* SEQPACKET delivers an empty datagram as a 0-byte read too: only a hangup is leaving */
        if (hung_up(c->io.fd))
            client_close(s, c, "disconnected", 0);
        else
            client_close(s, c, "empty frame (0 bytes), expected 48", 1);
        return -1;
    }
    /* exactly 49 bytes arrive whole; more are cut (MSG_TRUNC): "more than 48" */
    size_t len = (mh->msg_flags & MSG_TRUNC) ? sizeof(struct sf_msg) + 2 : n;
    struct sf_msg m;
    char reason[80];
    const char *bad = sfl_parse(buf, len, nfds, &m);
    if (bad != NULL) {
        if (len >= 8)
            bad = frame_reason(bad, buf, reason, sizeof(reason));
        client_close(s, c, bad, 1);
        return -1;
    }
    c->frames_in++;
    char why[160] = "";
    bad = dispatch(s, c, &m, why, sizeof(why));
    if (bad != NULL && !c->closed) {
        client_close(s, c, bad, 1);
        return -1;
    }
    return c->closed ? -1 : 0;
}

/* Up to READ_BATCH datagrams per recvmmsg: a wake-up with one frame in costs one call, not a
 * second one to learn there is no more (fewer than asked for means the queue was empty). */
void client_readable(struct sfs *s, struct sfs_client *c)
{
    struct mmsghdr mv[READ_BATCH];
    struct iovec iov[READ_BATCH];
    uint8_t buf[READ_BATCH][sizeof(struct sf_msg) + 1];
    union {
        char b[CMSG_SPACE(8 * sizeof(int))];
        struct cmsghdr align;
    } u[READ_BATCH];
    for (int done = 0; done < READS_PER_WAKEUP; done += READ_BATCH) {
        for (int i = 0; i < READ_BATCH; i++) {
            iov[i] = (struct iovec){.iov_base = buf[i], .iov_len = sizeof(buf[i])};
            mv[i] = (struct mmsghdr){.msg_hdr = {.msg_iov = &iov[i],
                                                 .msg_iovlen = 1,
                                                 .msg_control = u[i].b,
                                                 .msg_controllen = sizeof(u[i].b)}};
        }
        int n = recvmmsg(c->io.fd, mv, READ_BATCH, MSG_CMSG_CLOEXEC | MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            char why[96];
            snprintf(why, sizeof(why), "receive failed: %s", strerror(errno));
            client_close(s, c, why, 0);
            return;
        }
        int i = 0;
        while (i < n && handle_one(s, c, buf[i], mv[i].msg_len, &mv[i].msg_hdr) == 0)
            i++;
        if (i < n) { /* the client is gone: what else came is dropped, fds closed */
            while (++i < n)
                drop_fds(&mv[i].msg_hdr);
            return;
        }
        if (n < READ_BATCH)
            return;
    }
}

/* Remembers `t` as handed to `c`: its host-path reports of it count. */
void client_handed(struct sfs_client *c, const struct sf_tuple *t)
{
    struct tkey k = tuple_key(t);
    smap_put(&c->handed, k.raw, NULL);
    if (c->handed.count > MAX_HANDED)
        smap_del(&c->handed, c->handed.oldest);
}
