/* wrap_io.c -- the data path: every read and write entry point real programs use.
 *
 * Fast path: an fd that is not a tracked connection costs one table lookup, a switched (or
 * pinned) one that and a byte count (sf_fast_conn). A connection still on the overlay counts its
 * data calls (the shuntflow threshold) and its bytes per path. During a switch this file does
 * what the handoff needs from application threads:
 *   - writes go to the host connection once this end has committed (S is fixed);
 *   - a 0-byte overlay read may be the switch point rather than EOF (sf_wait_handoff);
 *   - a socket error that a read takes from the kernel reaches the application: the kernel
 *     reports it once, after which the dead socket reads as a clean EOF (invariant 1).
 * Writes hold c->wmu so the agent can fix S at a moment when no write is in flight. A call that
 * begins while its connection switches is also timed (window.c); the phase it loads anyway
 * says whether that can be the case. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/sendfile.h>
#include <unistd.h>

#include "sf_core.h"

struct io {
    ssize_t (*call)(struct io *, int fd);
    const void *cbuf;
    void *buf;
    size_t len;
    int flags;
    const struct iovec *iov;
    int iovcnt;
    struct sockaddr *addr;
    socklen_t *addrlen;
    const struct sockaddr *daddr;
    socklen_t daddrlen;
    struct msghdr *msg;
    const struct msghdr *cmsg;
    struct mmsghdr *mmsg;
    unsigned vlen;
    struct timespec *timeout;
    int in_fd;
    off_t *offset;
    int use64;
    ssize_t bytes; /* bytes moved by the last call (differs from its result for *mmsg) */
};

/* Returns the trigger it compared with: UINT32_MAX once a switch is decided and under way. */
static uint32_t count_call(struct sf_conn *c) {
    uint32_t n;
    if (sf_sole_thread()) {
        /* Nobody else counts: a plain add, not a locked one. */
        n = atomic_load_explicit(&c->calls, memory_order_relaxed) + 1;
        atomic_store_explicit(&c->calls, n, memory_order_relaxed);
    } else {
        n = atomic_fetch_add_explicit(&c->calls, 1, memory_order_relaxed) + 1;
    }
    if (SF_UNLIKELY(n == sf_cfg.agent_call)) {
        int saved = errno;
        sf_agent_ensure();
        errno = saved;
    }
    uint32_t trigger = atomic_load_explicit(&c->next_trigger, memory_order_relaxed);
    if (SF_UNLIKELY(n >= trigger) && sf_cfg.mode == SF_MODE_SHUNTFLOW &&
        atomic_load_explicit(&c->phase, memory_order_relaxed) == SF_P_OVERLAY) {
        atomic_store(&c->next_trigger, UINT32_MAX); /* the agent sets the next one if it fails */
        sf_agent_trigger(c);
        return UINT32_MAX;
    }
    return trigger;
}

static ssize_t finish_host_write(struct sf_conn *c, ssize_t n, struct io *op) {
    if (n > 0)
        atomic_fetch_add_explicit(&c->host_bytes, (uint64_t)op->bytes, memory_order_relaxed);
    return n;
}

/* ---- a blocking write the commit can land in ------------------------------------------------
 *
 * A commit needs a moment with no write in flight, and a blocking write of a large buffer holds
 * c->wmu for as long as the overlay takes to drain it into the socket: the commit waited for it,
 * and every byte of that write crossed the overlay, though most were not even in the socket yet
 * when the commit was wanted. So while a switch is under way a blocking write goes out in pieces:
 * what the overlay socket takes now, then, while it is full, a wait for room in short ticks,
 * between which a commit that became due is made by this writer. S is then the bytes the overlay
 * took, and the rest of the call goes on the host connection, as the next write would. The
 * application sees one call that returns when all of it is taken, as before; it waits only where
 * the plain call would have waited (the overlay socket full), never for the router or the peer.
 *
 * "What the socket takes now" is a MSG_DONTWAIT send for a buffer list; sendfile has no such
 * flag (and O_NONBLOCK would reach other threads' calls on the socket), so its piece is a count
 * the send buffer has room for (SO_MEMINFO), which the kernel takes without waiting. sendmmsg
 * is split message by message. A message with control data or over 64 buffers, and sockets
 * with a send timeout, keep the plain call.
 *
 * On the overlay with no switch under way, each piece the socket takes after a wait for room
 * counts as a data call, as it would for a writer that polls: so a failed attempt (a peer that
 * had not accepted yet, say) is retried at twice the calls, as for any connection, and not only
 * once this one call has returned. A connection stuck behind a full overlay is the one most
 * worth moving. */

#define SPLIT_IOV_MAX 64
#define SPLIT_TICK_NS 100000L /* how soon a commit made due is seen while the overlay is full */
#define SPLIT_IDLE_TICK_NS 1000000L
#define SPLIT_NO (-2)
#define SPLIT_MAX_RW 0x7ffff000L /* what one sendfile moves at most (the kernel's MAX_RW_COUNT) */
/* A sendfile of at most this much keeps the plain call: its piece would cost a getsockopt more,
 * and the commit waits for it at most until the socket has that much room again. */
#define SPLIT_FILE_MIN 65536
#define SPLIT_MMSG_MAX 1024      /* the messages one sendmmsg sends at most (UIO_MAXIOV) */
#ifndef SO_MEMINFO
#define SO_MEMINFO 55
#endif
/* struct sk_meminfo's words (linux/sock_diag.h) */
#define MEMINFO_SNDBUF 3
#define MEMINFO_WMEM_QUEUED 5
#define MEMINFO_WORDS 9

static int fd_nonblocking(int fd, int flags);
static ssize_t call_sendfile(struct io *op, int fd);

/* The bytes of one split call: a buffer list (iov), or a file range (sendfile from in_fd at
 * *offset, or at its file position if offset is NULL; each piece moves either on, as the plain
 * call would). */
struct wsrc {
    const struct iovec *iov;
    int n;
    int flags;
    int in_fd;
    off_t *offset;
    int use64;
    size_t total;
};

static size_t iov_len(const struct iovec *iov, int n) {
    size_t total = 0;
    for (int i = 0; i < n; i++)
        total += iov[i].iov_len;
    return total;
}

/* A buffer list as a source: 0 if it cannot be split (a list the kernel would refuse with
 * EFAULT gets the plain call, which says so). */
static int iov_src(struct wsrc *s, const struct iovec *iov, size_t n, int flags) {
    if (n > SPLIT_IOV_MAX || (iov == NULL && n > 0))
        return 0;
    s->iov = iov;
    s->n = (int)n;
    s->flags = flags;
    s->total = iov_len(iov, s->n);
    return 1;
}

/* One send of the list's bytes from offset `done` on. On a connected TCP socket write, send,
 * sendto and writev are this call (sendto's address is ignored there). One buffer (every write
 * and send) goes out with send: the kernel's sendmsg first copies in the message header and the
 * buffer list. */
static ssize_t send_from(int fd, const struct iovec *iov, int n, size_t done, int flags) {
    if (n == 1 && done < iov[0].iov_len)
        return real.send(fd, (const char *)iov[0].iov_base + done, iov[0].iov_len - done, flags);
    struct iovec rest[SPLIT_IOV_MAX];
    int k = 0;
    for (int i = 0; i < n; i++) {
        size_t len = iov[i].iov_len;
        if (done >= len) {
            done -= len;
            continue;
        }
        rest[k].iov_base = (char *)iov[i].iov_base + done;
        rest[k].iov_len = len - done;
        done = 0;
        k++;
    }
    struct msghdr m = {.msg_iov = rest, .msg_iovlen = (size_t)k};
    return real.sendmsg(fd, &m, flags);
}

static ssize_t file_send(const struct wsrc *s, int fd, size_t count) {
    return (s->use64 ? real.sendfile64 : real.sendfile)(fd, s->in_fd, s->offset, count);
}

/* Bytes the socket's send buffer takes before a send waits (the kernel waits once what it has
 * queued reaches the buffer's size); -1 if the kernel does not say. */
static long send_room(int fd) {
    uint32_t mem[MEMINFO_WORDS];
    socklen_t len = sizeof mem;
    if (real.getsockopt(fd, SOL_SOCKET, SO_MEMINFO, mem, &len) != 0 ||
        len < (MEMINFO_WMEM_QUEUED + 1) * sizeof mem[0])
        return -1;
    long room = (long)mem[MEMINFO_SNDBUF] - (long)mem[MEMINFO_WMEM_QUEUED];
    return room > 0 ? room : 0;
}

/* One piece from `done` on that does not wait for room, of at most *asked bytes (set to what
 * was asked for): EAGAIN if the socket has none. (Should the kernel not say how much room
 * there is, a sendfile piece is the rest of the call, as the plain call would send it.) One
 * getsockopt before each sendfile piece: a socket with room takes the whole call in one. */
static ssize_t send_nowait(const struct wsrc *s, int fd, size_t done, size_t *asked) {
    *asked = s->total - done;
    if (s->iov != NULL)
        return send_from(fd, s->iov, s->n, done, s->flags | MSG_DONTWAIT);
    long room = send_room(fd);
    if (room == 0) {
        errno = EAGAIN;
        return -1;
    }
    /* A margin for the buffers' own overhead, which the kernel counts against the room too. */
    if (room > 0 && (size_t)(room - room / 8) < *asked)
        *asked = (size_t)(room - room / 8);
    return file_send(s, fd, *asked);
}

/* The rest of a split call from `done` on with plain blocking calls on `fd`, counted in
 * *counter. */
static ssize_t send_rest(int fd, const struct wsrc *s, size_t done, _Atomic uint64_t *counter) {
    while (done < s->total) {
        size_t want = s->total - done;
        ssize_t m = s->iov != NULL ? send_from(fd, s->iov, s->n, done, s->flags)
                                   : file_send(s, fd, want);
        if (m <= 0)
            return done > 0 ? (ssize_t)done : m; /* as an interrupted or failed send returns */
        atomic_fetch_add_explicit(counter, (uint64_t)m, memory_order_relaxed);
        done += (size_t)m;
        if (s->iov == NULL && (size_t)m < want)
            break; /* the file ended (or a signal came): the plain sendfile returns short too */
    }
    return (ssize_t)done;
}

static int has_sndtimeo(int fd) {
    struct timeval tv = {0, 0};
    socklen_t len = sizeof tv;
    return real.getsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, &len) == 0 &&
           (tv.tv_sec != 0 || tv.tv_usec != 0);
}

/* Still on the overlay, where a commit may yet come. A write that began before the decision
 * counts too: the decision is often another thread's call (a reader's) made while this write
 * waits for room, and the commit would wait for that write. */
static int commit_may_come(int phase) {
    return phase == SF_P_OVERLAY || phase == SF_P_REQUESTED || phase == SF_P_HANDSHAKE;
}

/* How long a writer waiting for room sleeps before it looks for a commit again: short once a
 * switch is decided, longer before (a decision moves it to the short one at the next look). */
static long split_tick_ns(struct sf_conn *c, int phase) {
    int decided = phase != SF_P_OVERLAY ||
                  atomic_load_explicit(&c->next_trigger, memory_order_relaxed) == UINT32_MAX;
    return decided ? SPLIT_TICK_NS : SPLIT_IDLE_TICK_NS;
}

/* The host connection's number for a writer that holds c->wmu and is in no call on a host
 * number. A number dropped while c->wmu is held is left for its holder to close, and a second
 * one dropped meanwhile is closed at once, on the promise that the holder never loaded it. A
 * split write outlives attempts (one ends while it waits for room, the next begins and this
 * writer commits it), so it would load the second number while the first was pending, and
 * another thread's drop closed it under its send: the number came back as the router channel's
 * new socket (ENOTCONN). So the pending number, which this writer is not in, is closed before
 * the load, under c->mu, which every drop holds: then a drop of the loaded number is deferred. */
static int writer_host_fd(struct sf_conn *c) {
    /* Nothing pending after the load: a drop of the loaded number, from now on, leaves it to
     * us, the holder of c->wmu. c->mu would wait for whatever the agent does under it (the
     * rest of a commit, a swap), which a writer right after a commit met nearly every time. */
    int host = __atomic_load_n(&c->host_fd, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&c->pending_close_host, __ATOMIC_SEQ_CST) < 0)
        return host;
    pthread_mutex_lock(&c->mu);
    sf_close_pending_host(c);
    host = c->host_fd;
    pthread_mutex_unlock(&c->mu);
    return host;
}

/* A writer that waits for room on the overlay holds c->wmu but is in no call on it, and S (the
 * bytes the overlay took) is what it has counted: the agent may make a commit that comes due
 * meanwhile itself (handoff.c sf_handoff_request_commit). Waiting for this thread to wake and
 * make it, the application's other threads on a busy CPU ran first for 0.5-3 ms, while the
 * peer's writes, past its own commit, waited for this end's SYNC, and this end's next pieces
 * went on the overlay (docs/design.md, "A blocking write the commit can land in"). 0 if the
 * commit is already due: the caller makes it. */
static int park_writer(struct sf_conn *c) {
    pthread_mutex_lock(&c->mu);
    __atomic_store_n(&c->writer_parked, 1, __ATOMIC_SEQ_CST);
    int due = __atomic_load_n(&c->commit_wanted, __ATOMIC_SEQ_CST);
    if (due)
        __atomic_store_n(&c->writer_parked, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&c->mu);
    return !due;
}

static void unpark_writer(struct sf_conn *c) {
    pthread_mutex_lock(&c->mu);
    /* Atomic: the agent loads it without c->mu (sf_handoff_request_commit). */
    __atomic_store_n(&c->writer_parked, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&c->mu);
}

/* Caller holds c->wmu and saw commit_may_come. Returns the bytes of `s` sent, as the plain call
 * would (-1 with errno if none), every byte counted; *committed if this writer made the
 * commit. */
static ssize_t split_src(struct sf_conn *c, const struct wsrc *s, int *committed) {
    size_t done = 0;
    int checked = 0, waited = 0;
    for (;;) {
        int phase = atomic_load(&c->phase);
        if (phase == SF_P_COMMITTED || phase == SF_P_HOST) {
            /* Read once: once swapped, c->fd is the host socket and the private number stays
             * open while we hold c->wmu. */
            int host = writer_host_fd(c);
            if (host < 0 && atomic_load(&c->phase) != SF_P_HOST)
                continue; /* the host connection was dropped, under c->mu with BROKEN */
            return send_rest(host >= 0 ? host : c->fd, s, done, &c->host_bytes);
        }
        if (phase == SF_P_BROKEN && c->sync_out) {
            if (done > 0)
                return (ssize_t)done;
            errno = ECONNRESET;
            return -1;
        }
        if (!commit_may_come(phase))
            return send_rest(c->fd, s, done, &c->tx);
        if (c->commit_wanted) {
            /* Before the next piece, not after it: once the overlay has room again, a piece
             * can be a third of its send buffer, all of it bytes the host path would carry. */
            sf_handoff_commit(c);
            *committed = 1;
            continue;
        }
        size_t asked;
        ssize_t m = send_nowait(s, c->fd, done, &asked);
        if (m > 0) {
            atomic_fetch_add_explicit(&c->tx, (uint64_t)m, memory_order_relaxed);
            done += (size_t)m;
            if (done == s->total || (s->iov == NULL && (size_t)m < asked))
                return (ssize_t)done; /* all of it, or the file ended */
            if (waited && phase == SF_P_OVERLAY)
                count_call(c);
            waited = 0;
            continue;
        }
        if (m == 0 && s->iov == NULL)
            return (ssize_t)done; /* sendfile at the file's end */
        if (m < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return done > 0 ? (ssize_t)done : -1;
        if (!checked) {
            /* The overlay is full: what the plain call would do now depends on the socket. */
            checked = 1;
            if (fd_nonblocking(c->fd, s->flags)) {
                if (done > 0)
                    return (ssize_t)done;
                errno = EAGAIN;
                return -1;
            }
            if (has_sndtimeo(c->fd))
                return send_rest(c->fd, s, done, &c->tx);
        }
        if (!park_writer(c))
            continue; /* the commit came due: made at the top, before any more bytes */
        struct pollfd p = {.fd = c->fd, .events = POLLOUT};
        struct timespec tick = {0, split_tick_ns(c, phase)};
        int rc = real.ppoll(&p, 1, &tick, NULL);
        int err = errno;
        unpark_writer(c);
        /* A signal ends a blocking send that took bytes with their count; with none taken the
         * wait goes on, as a restarted send would. */
        if (rc < 0 && err == EINTR && done > 0)
            return (ssize_t)done;
        waited = 1;
    }
}

/* sendmmsg, message by message, as the kernel sends them: a message sent in part (a signal, a
 * non-blocking socket's full buffer) or one that fails ends the call, which returns the
 * messages sent, or -1 if the first failed. */
static ssize_t split_mmsg(struct sf_conn *c, const struct io *op, int *committed) {
    unsigned vlen = op->vlen < SPLIT_MMSG_MAX ? op->vlen : SPLIT_MMSG_MAX;
    struct wsrc s = {.in_fd = -1};
    for (unsigned i = 0; i < vlen; i++)
        if (op->mmsg[i].msg_hdr.msg_controllen != 0 ||
            !iov_src(&s, op->mmsg[i].msg_hdr.msg_iov, op->mmsg[i].msg_hdr.msg_iovlen, op->flags))
            return SPLIT_NO;
    if (vlen == 0)
        return SPLIT_NO;
    for (unsigned i = 0; i < vlen; i++) {
        struct msghdr *h = &op->mmsg[i].msg_hdr;
        iov_src(&s, h->msg_iov, h->msg_iovlen, op->flags);
        ssize_t m = s.total > 0 ? split_src(c, &s, committed) : 0;
        if (m < 0)
            return i > 0 ? (ssize_t)i : -1;
        op->mmsg[i].msg_len = (unsigned)m;
        if ((size_t)m < s.total)
            return (ssize_t)i + 1;
    }
    return (ssize_t)vlen;
}

/* Caller holds c->wmu and saw commit_may_come. Returns SPLIT_NO if the plain call must be made
 * (nothing was sent), else the call's result with every byte counted; *committed if this writer
 * made the commit. */
static ssize_t split_write(struct sf_conn *c, const struct io *op, int *committed) {
    if (op->mmsg != NULL)
        return split_mmsg(c, op, committed);
    struct wsrc s = {.in_fd = -1};
    struct iovec one;
    if (op->call == call_sendfile) {
        if (op->len <= SPLIT_FILE_MIN)
            return SPLIT_NO;
        s.in_fd = op->in_fd;
        s.offset = op->offset;
        s.use64 = op->use64;
        s.total = op->len < (size_t)SPLIT_MAX_RW ? op->len : (size_t)SPLIT_MAX_RW;
    } else if (op->cmsg != NULL) {
        if (op->cmsg->msg_controllen != 0 ||
            !iov_src(&s, op->cmsg->msg_iov, op->cmsg->msg_iovlen, op->flags))
            return SPLIT_NO;
    } else if (op->iov != NULL) {
        if (op->iovcnt < 0 || !iov_src(&s, op->iov, (size_t)op->iovcnt, op->flags))
            return SPLIT_NO;
    } else {
        one.iov_base = (void *)op->cbuf;
        one.iov_len = op->len;
        iov_src(&s, &one, 1, op->flags);
    }
    if (s.total == 0)
        return SPLIT_NO;
    return split_src(c, &s, committed);
}

static ssize_t do_write(struct sf_conn *c, struct io *op, int phase) {
    if (phase == SF_P_HOST)
        return finish_host_write(c, op->call(op, c->fd), op);
    if (phase == SF_P_PINNED || (phase == SF_P_OVERLAY && sf_sole_thread())) {
        /* On the overlay in a process of one thread (count_call, which may start the agent,
         * came first): no commit can come while this write runs, so nothing needs c->wmu or a
         * split write; a thread the application makes later ends this before its next write. */
        ssize_t n = op->call(op, c->fd);
        if (n > 0)
            sf_count_add(&c->tx, (uint64_t)op->bytes, phase == SF_P_OVERLAY);
        return n;
    }
    pthread_mutex_lock(&c->wmu);
    phase = atomic_load(&c->phase);
    if (SF_UNLIKELY(phase == SF_P_BROKEN) && c->sync_out) {
        /* This end's stream was cut after S: its bytes since then died with the host
         * connection. One more byte on the overlay, whose FIN may still wait for the SYNC's
         * acknowledgement (fin.c), would land after S where the peer expects those. (A
         * follower whose SYNC never left goes on writing on the overlay: its stream is
         * whole there, and the leader reads it to its end.) */
        sf_wmu_unlock(c);
        errno = ECONNRESET;
        return -1;
    }
    /* Read once: a swap in another thread clears it (after its dup3, so c->fd is then the host
     * socket, and it leaves the private number open while we hold c->wmu). */
    int host = phase == SF_P_COMMITTED ? writer_host_fd(c) : -1;
    int to_host = host >= 0;
    int committed = 0;
    ssize_t n = commit_may_come(phase) ? split_write(c, op, &committed) : SPLIT_NO;
    if (n == SPLIT_NO) {
        n = op->call(op, to_host ? host : c->fd);
        int call_err = errno;
        if (n > 0)
            atomic_fetch_add_explicit(to_host || phase == SF_P_HOST ? &c->host_bytes : &c->tx,
                                      (uint64_t)op->bytes, memory_order_relaxed);
        errno = call_err;
    }
    int err = errno;
    if (c->commit_wanted) {
        sf_handoff_commit(c);
        committed = 1;
    }
    sf_wmu_unlock(c);
    if (committed)
        sf_handoff_finish(c);
    /* The agent may have asked between our check and the unlock; its trylock failed then. */
    if (SF_UNLIKELY(c->commit_wanted))
        sf_handoff_request_commit(c);
    else if (committed)
        sf_maybe_swap(c);
    errno = err;
    return n;
}

static int fd_nonblocking(int fd, int flags) {
    if (flags & MSG_DONTWAIT)
        return 1;
    int fl = real.fcntl(fd, F_GETFL);
    return fl >= 0 && (fl & O_NONBLOCK);
}

/* recvmmsg counts messages, and at the end of a TCP stream the kernel reports each message of the
 * call empty: an empty first message is what 0 is to the other calls. */
static int mmsg_at_end(const struct io *op, ssize_t n) {
    return op->mmsg != NULL && n > 0 && op->mmsg[0].msg_len == 0;
}

/* Messages after an empty one met the overlay's end, which may be the switch point rather than
 * EOF: return those before it, and let the next call find out (its bytes are not consumed). */
static ssize_t mmsg_until_empty(struct io *op, ssize_t n) {
    for (ssize_t i = 1; i < n; i++)
        if (op->mmsg[i].msg_len == 0)
            return i;
    return n;
}

void sf_keep_read_err(struct sf_conn *c, int err) {
    if (err != 0 && err != EAGAIN && err != EWOULDBLOCK && err != EINTR)
        atomic_store(&c->read_err, err);
}

#define PAST_S_NO (-2)

/* Every overlay byte up to the peer's S is read and its SYNC is in, but this end has not
 * swapped yet: read the host connection, without waiting for the commit and the swap
 * (switchpoint.c, "readers past the peer's S"). The host socket's O_NONBLOCK is the overlay's
 * (mirrored while in the handoff). PAST_S_NO if the readers' number is gone (swapped, broken,
 * closed): the caller looks again. */
static ssize_t read_past_s(struct sf_conn *c, struct io *op) {
    /* The peer had shut down writing at S: the stream ends here, and the overlay, read to S_peer
     * and ended, says so in the call's own terms (0, recvmmsg's empty message), where the host
     * socket would say EAGAIN until the FIN behind the SYNC is in (phase.c peer_end_in). */
    if (c->peer_shut_wr)
        return op->call(op, c->fd);
    int host = sf_rd_host_get(c);
    if (host < 0)
        return PAST_S_NO;
    ssize_t n = op->call(op, host);
    int err = errno;
    sf_rd_host_put(c);
    if (n > 0 && !(op->flags & MSG_PEEK))
        atomic_fetch_add_explicit(&c->host_bytes, (uint64_t)op->bytes, memory_order_relaxed);
    errno = err;
    return n;
}

/* A read met the end of the stream, settled by sf_wait_handoff or sf_host_end_before_swap: 1 to
 * read again (swapped), else 0 with the call's result in *ret (`end` if it is the stream's). */
static int settled_end(int wait, ssize_t end, ssize_t *ret) {
    switch (wait) {
    case SF_WAIT_SWAPPED:
        return 1;
    case SF_WAIT_AGAIN:
        errno = EAGAIN;
        *ret = -1;
        return 0;
    case SF_WAIT_RESET:
        errno = ECONNRESET;
        *ret = -1;
        return 0;
    default:
        *ret = end;
        return 0;
    }
}

/* A read of the overlay socket failed (`err`) after its stream was read to the peer's S, and the
 * fd was swapped or can be read past S meanwhile. A reader asleep in the overlay socket when the
 * swap came is woken by the swap's shutdown, but on a busy CPU it may run only after a reset of
 * the overlay reached it too (the peer resets its overlay rather than send the FIN when it
 * cannot tell that its SYNC arrived, fin.c): that reset ends a stream already complete, and the
 * rest is on the host connection. */
static int overlay_done_before(struct sf_conn *c, uint64_t rx_before, int err) {
    if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR ||
        !__atomic_load_n(&c->peer_synced, __ATOMIC_ACQUIRE) || rx_before != c->peer_s)
        return 0;
    int phase = atomic_load(&c->phase);
    return phase == SF_P_HOST || sf_past_peer_s(c, phase);
}

/* `phase` is the one the caller loaded; every further round loads it again. */
static ssize_t do_read(struct sf_conn *c, struct io *op, size_t want, int phase) {
    int peek = op->flags & MSG_PEEK;
    for (;; phase = atomic_load_explicit(&c->phase, memory_order_acquire)) {
        if (phase == SF_P_HOST) {
            ssize_t n = op->call(op, c->fd);
            if (n > 0 && !peek)
                atomic_fetch_add_explicit(&c->host_bytes, (uint64_t)op->bytes,
                                          memory_order_relaxed);
            return n;
        }
        if (sf_past_peer_s(c, phase)) {
            ssize_t n = read_past_s(c, op);
            if (n != PAST_S_NO) {
                if (want == 0 || (n != 0 && !mmsg_at_end(op, n)))
                    return n;
                ssize_t ret;
                int wait = sf_host_end_before_swap(c, fd_nonblocking(c->fd, op->flags));
                if (!settled_end(wait, n, &ret))
                    return ret;
                continue;
            }
        }
        /* Without the readers' number, the switch point needs c->mu, which the agent may hold
         * for long in a burst: check without it first (a stale answer either way only costs
         * the locked check below). */
        if (phase == SF_P_COMMITTED && __atomic_load_n(&c->peer_synced, __ATOMIC_ACQUIRE) &&
            atomic_load(&c->rx) == c->peer_s && sf_maybe_swap(c))
            continue;
        uint64_t rx_before = atomic_load(&c->rx);
        ssize_t n = op->call(op, c->fd);
        int err = errno;
        ssize_t end = n; /* what the call returns at the stream's end: 0, or recvmmsg's count */
        if (mmsg_at_end(op, n))
            n = 0;
        else if (n > 0 && op->mmsg != NULL)
            n = mmsg_until_empty(op, n);
        if (n > 0) {
            /* Only once every overlay byte is read can the fd have been swapped under us. */
            int from_host = atomic_load(&c->phase) == SF_P_HOST && c->peer_synced &&
                            rx_before == c->peer_s;
            if (!peek)
                sf_count_add(from_host ? &c->host_bytes : &c->rx, (uint64_t)op->bytes,
                             sf_sole_thread());
            if (!from_host && !peek && c->peer_synced &&
                atomic_load(&c->phase) == SF_P_COMMITTED)
                sf_try_swap(c);
            errno = err;
            return n;
        }
        if (n < 0 && overlay_done_before(c, rx_before, err))
            continue;
        if (n < 0 || want == 0) {
            errno = err;
            return n < 0 ? n : end;
        }
        phase = atomic_load(&c->phase);
        if (phase == SF_P_HOST)
            continue; /* swapped while we read the overlay's FIN: read the host socket */
        if (phase < SF_P_REQUESTED)
            return end;
        if (phase == SF_P_BROKEN) {
            /* Bytes of the stream died with the host connection (sf_broken_lost): this end of
             * the overlay is not the stream's end, it is a reset. */
            if (!sf_broken_lost(c))
                return end;
            errno = ECONNRESET;
            return -1;
        }
        if (sf_past_peer_s(c, phase))
            continue; /* the overlay's read side was ended at the peer's S: read the host */
        /* Maybe the switch point: decided under c->mu, so an in-flight commit is seen whole. */
        ssize_t ret;
        if (!settled_end(sf_wait_handoff(c, fd_nonblocking(c->fd, op->flags)), end, &ret))
            return ret;
    }
}

static ssize_t set_bytes(struct io *op, ssize_t n) {
    op->bytes = n > 0 ? n : 0;
    return n;
}

/* ---- the calls, one small adapter each ----------------------------------------------------- */

static ssize_t call_read(struct io *op, int fd) { return set_bytes(op, real.read(fd, op->buf, op->len)); }
static ssize_t call_write(struct io *op, int fd) { return set_bytes(op, real.write(fd, op->cbuf, op->len)); }
static ssize_t call_readv(struct io *op, int fd) { return set_bytes(op, real.readv(fd, op->iov, op->iovcnt)); }
static ssize_t call_writev(struct io *op, int fd) { return set_bytes(op, real.writev(fd, op->iov, op->iovcnt)); }
static ssize_t call_recv(struct io *op, int fd) { return set_bytes(op, real.recv(fd, op->buf, op->len, op->flags)); }
static ssize_t call_send(struct io *op, int fd) { return set_bytes(op, real.send(fd, op->cbuf, op->len, op->flags)); }
static ssize_t call_recvfrom(struct io *op, int fd) {
    return set_bytes(op, real.recvfrom(fd, op->buf, op->len, op->flags, op->addr, op->addrlen));
}
static ssize_t call_sendto(struct io *op, int fd) {
    return set_bytes(op, real.sendto(fd, op->cbuf, op->len, op->flags, op->daddr, op->daddrlen));
}
static ssize_t call_recvmsg(struct io *op, int fd) { return set_bytes(op, real.recvmsg(fd, op->msg, op->flags)); }
static ssize_t call_sendmsg(struct io *op, int fd) { return set_bytes(op, real.sendmsg(fd, op->cmsg, op->flags)); }
static ssize_t call_sendfile(struct io *op, int fd) {
    return set_bytes(op, (op->use64 ? real.sendfile64 : real.sendfile)(fd, op->in_fd, op->offset, op->len));
}

static ssize_t mmsg_bytes(struct io *op, int n) {
    ssize_t total = 0;
    for (int i = 0; i < n; i++)
        total += op->mmsg[i].msg_len;
    op->bytes = total;
    return n;
}
static ssize_t call_recvmmsg(struct io *op, int fd) {
    return mmsg_bytes(op, real.recvmmsg(fd, op->mmsg, op->vlen, op->flags, op->timeout));
}
static ssize_t call_sendmmsg(struct io *op, int fd) {
    return mmsg_bytes(op, real.sendmmsg(fd, op->mmsg, op->vlen, op->flags));
}

/* ---- one application call: counted, maybe timed, then done ------------------------------- */

static ssize_t io_write(struct sf_conn *c, struct io *op) {
    uint32_t trigger = count_call(c);
    int phase = atomic_load_explicit(&c->phase, memory_order_acquire);
    struct sf_timed t;
    if (SF_LIKELY(!sf_window_maybe_open(phase, trigger)) || !sf_window_enter(c, &t))
        return do_write(c, op, phase);
    ssize_t n = do_write(c, op, phase);
    sf_window_leave(c, &t);
    return n;
}

/* MSG_WAITALL stops at the overlay's FIN at the switch point; the rest comes from the host.
 * Returns the bytes got so far if a further read fails, as the kernel's MSG_WAITALL does, and,
 * as the kernel does, leaves the error for the next read: this read took it from the socket. */
static ssize_t recv_waitall(struct sf_conn *c, struct io *op, ssize_t n) {
    size_t got = (size_t)n, total = op->len;
    char *base = op->buf;
    while (got < total) {
        op->buf = base + got;
        op->len = total - got;
        count_call(c);
        n = do_read(c, op, op->len, atomic_load_explicit(&c->phase, memory_order_acquire));
        if (n < 0)
            sf_keep_read_err(c, errno);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    return (ssize_t)got;
}

/* waitall: recv's MSG_WAITALL, which is one application call however many reads it takes. */
static ssize_t io_read(struct sf_conn *c, struct io *op, size_t want, int waitall) {
    uint32_t trigger = count_call(c);
    if (SF_UNLIKELY(atomic_load_explicit(&c->read_err, memory_order_relaxed) != 0)) {
        int err = atomic_exchange(&c->read_err, 0);
        if (err != 0) {
            errno = err;
            return -1;
        }
    }
    int phase = atomic_load_explicit(&c->phase, memory_order_acquire);
    struct sf_timed t;
    int timed = SF_UNLIKELY(sf_window_maybe_open(phase, trigger)) && sf_window_enter(c, &t);
    ssize_t n = do_read(c, op, want, phase);
    if (waitall && n > 0 && (size_t)n < want && phase != SF_P_HOST && phase != SF_P_PINNED)
        n = recv_waitall(c, op, n);
    if (timed)
        sf_window_leave(c, &t);
    return n;
}

/* ---- the full path, one per call (kept out of the wrappers so their fast path needs no
 * stack frame of its own) ----------------------------------------------------------------- */

static SF_NOINLINE ssize_t slow_read(struct sf_conn *c, void *buf, size_t len) {
    struct io op = {.call = call_read, .buf = buf, .len = len};
    return io_read(c, &op, len, 0);
}

static SF_NOINLINE ssize_t slow_write(struct sf_conn *c, const void *buf, size_t len) {
    struct io op = {.call = call_write, .cbuf = buf, .len = len};
    return io_write(c, &op);
}

static SF_NOINLINE ssize_t slow_readv(struct sf_conn *c, const struct iovec *iov, int iovcnt) {
    struct io op = {.call = call_readv, .iov = iov, .iovcnt = iovcnt};
    return io_read(c, &op, iov_len(iov, iovcnt), 0);
}

static SF_NOINLINE ssize_t slow_writev(struct sf_conn *c, const struct iovec *iov, int iovcnt) {
    struct io op = {.call = call_writev, .iov = iov, .iovcnt = iovcnt};
    return io_write(c, &op);
}

static SF_NOINLINE ssize_t slow_recv(struct sf_conn *c, void *buf, size_t len, int flags) {
    struct io op = {.call = call_recv, .buf = buf, .len = len, .flags = flags};
    return io_read(c, &op, len, flags & MSG_WAITALL);
}

static SF_NOINLINE ssize_t slow_send(struct sf_conn *c, const void *buf, size_t len, int flags) {
    struct io op = {.call = call_send, .cbuf = buf, .len = len, .flags = flags};
    return io_write(c, &op);
}

static SF_NOINLINE ssize_t slow_recvfrom(struct sf_conn *c, void *buf, size_t len, int flags,
                                         struct sockaddr *addr, socklen_t *addrlen) {
    struct io op = {.call = call_recvfrom, .buf = buf, .len = len, .flags = flags, .addr = addr,
                    .addrlen = addrlen};
    return io_read(c, &op, len, flags & MSG_WAITALL);
}

static SF_NOINLINE ssize_t slow_sendto(struct sf_conn *c, const void *buf, size_t len, int flags,
                                       const struct sockaddr *addr, socklen_t addrlen) {
    struct io op = {.call = call_sendto, .cbuf = buf, .len = len, .flags = flags, .daddr = addr,
                    .daddrlen = addrlen};
    return io_write(c, &op);
}

static SF_NOINLINE ssize_t slow_recvmsg(struct sf_conn *c, struct msghdr *msg, int flags) {
    struct io op = {.call = call_recvmsg, .msg = msg, .flags = flags};
    return io_read(c, &op, iov_len(msg->msg_iov, (int)msg->msg_iovlen), 0);
}

static SF_NOINLINE ssize_t slow_sendmsg(struct sf_conn *c, const struct msghdr *msg, int flags) {
    struct io op = {.call = call_sendmsg, .cmsg = msg, .flags = flags};
    return io_write(c, &op);
}

static SF_NOINLINE int slow_recvmmsg(struct sf_conn *c, struct mmsghdr *vec, unsigned vlen,
                                     sf_mmsg_flags flags, struct timespec *timeout) {
    struct io op = {.call = call_recvmmsg, .mmsg = vec, .vlen = vlen, .flags = flags,
                    .timeout = timeout};
    /* The first message's room: an empty first message with room is the end, or the switch
     * point (do_read). */
    size_t want = vlen > 0 ? iov_len(vec[0].msg_hdr.msg_iov, (int)vec[0].msg_hdr.msg_iovlen) : 0;
    return (int)io_read(c, &op, want, 0);
}

static SF_NOINLINE int slow_sendmmsg(struct sf_conn *c, struct mmsghdr *vec, unsigned vlen,
                                     sf_mmsg_flags flags) {
    struct io op = {.call = call_sendmmsg, .mmsg = vec, .vlen = vlen, .flags = flags};
    return (int)io_write(c, &op);
}

/* ---- exported wrappers ---------------------------------------------------------------------- */

/* Each starts with the fast path (sf_fast_conn): an fd that is no connection of ours is the real
 * call; a connection in a final phase the real call and a byte count; only a connection that
 * counts towards its switch, or is switching, takes the full path (io_read, io_write). */

/* A read also takes the full path while an error is kept for it (c->read_err): io_read
 * returns that first. */
static inline struct sf_conn *sf_fast_read_conn(int fd, struct sf_conn **slow) {
    struct sf_conn *f = sf_fast_conn(fd, slow);
    if (f != NULL && SF_UNLIKELY(atomic_load_explicit(&f->read_err, memory_order_relaxed) != 0)) {
        *slow = f;
        return NULL;
    }
    return f;
}

/* A connection on the overlay in a process of one thread (no agent, so no switch under way or
 * decided), whose call is neither the one that starts the agent nor its trigger, and which holds
 * no kept read error: the call is counted here, and then it is the real call and a byte count
 * (quiet_read, quiet_write). The full path would make the same call after looking at all that
 * again; a one-request connection makes nothing but such calls. */
static inline int quiet_call(struct sf_conn *c, int reading) {
    if (atomic_load_explicit(&c->phase, memory_order_relaxed) != SF_P_OVERLAY ||
        !sf_sole_thread() ||
        (reading && atomic_load_explicit(&c->read_err, memory_order_relaxed) != 0))
        return 0;
    uint32_t n = atomic_load_explicit(&c->calls, memory_order_relaxed) + 1;
    if (n == sf_cfg.agent_call || n >= atomic_load_explicit(&c->next_trigger, memory_order_relaxed))
        return 0;
    atomic_store_explicit(&c->calls, n, memory_order_relaxed);
    return 1;
}

static ssize_t quiet_read(struct sf_conn *c, ssize_t n, int flags) {
    if (n > 0 && !(flags & MSG_PEEK))
        sf_count_add(&c->rx, (uint64_t)n, 1);
    return n;
}

static ssize_t quiet_write(struct sf_conn *c, ssize_t n) {
    if (n > 0)
        sf_count_add(&c->tx, (uint64_t)n, 1);
    return n;
}

/* A peek moves no bytes. */
static ssize_t final_read(struct sf_conn *f, ssize_t n, int flags) {
    if (!(flags & MSG_PEEK))
        sf_count_final(&f->final_in, n);
    return n;
}

static ssize_t final_write(struct sf_conn *f, ssize_t n) {
    sf_count_final(&f->final_out, n);
    return n;
}

static ssize_t vec_bytes(const struct mmsghdr *vec, int n) {
    ssize_t total = 0;
    for (int i = 0; i < n; i++)
        total += vec[i].msg_len;
    return total;
}

SF_EXPORT ssize_t read(int fd, void *buf, size_t len) {
    sf_ensure_init();
    struct sf_conn *c, *f = sf_fast_read_conn(fd, &c);
    if (SF_LIKELY(c == NULL))
        return f == NULL ? real.read(fd, buf, len) : final_read(f, real.read(fd, buf, len), 0);
    if (quiet_call(c, 1))
        return quiet_read(c, real.read(fd, buf, len), 0);
    return slow_read(c, buf, len);
}

SF_EXPORT ssize_t write(int fd, const void *buf, size_t len) {
    sf_ensure_init();
    struct sf_conn *c, *f = sf_fast_conn(fd, &c);
    if (SF_LIKELY(c == NULL))
        return f == NULL ? real.write(fd, buf, len) : final_write(f, real.write(fd, buf, len));
    if (quiet_call(c, 0))
        return quiet_write(c, real.write(fd, buf, len));
    return slow_write(c, buf, len);
}

SF_EXPORT ssize_t readv(int fd, const struct iovec *iov, int iovcnt) {
    sf_ensure_init();
    struct sf_conn *c, *f = sf_fast_read_conn(fd, &c);
    if (SF_LIKELY(c == NULL))
        return f == NULL ? real.readv(fd, iov, iovcnt)
                         : final_read(f, real.readv(fd, iov, iovcnt), 0);
    if (quiet_call(c, 1))
        return quiet_read(c, real.readv(fd, iov, iovcnt), 0);
    return slow_readv(c, iov, iovcnt);
}

SF_EXPORT ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    sf_ensure_init();
    struct sf_conn *c, *f = sf_fast_conn(fd, &c);
    if (SF_LIKELY(c == NULL))
        return f == NULL ? real.writev(fd, iov, iovcnt)
                         : final_write(f, real.writev(fd, iov, iovcnt));
    if (quiet_call(c, 0))
        return quiet_write(c, real.writev(fd, iov, iovcnt));
    return slow_writev(c, iov, iovcnt);
}

SF_EXPORT ssize_t recv(int fd, void *buf, size_t len, int flags) {
    sf_ensure_init();
    struct sf_conn *c, *f = sf_fast_read_conn(fd, &c);
    if (SF_LIKELY(c == NULL))
        return f == NULL ? real.recv(fd, buf, len, flags)
                         : final_read(f, real.recv(fd, buf, len, flags), flags);
    if (quiet_call(c, 1))
        return quiet_read(c, real.recv(fd, buf, len, flags), flags);
    return slow_recv(c, buf, len, flags);
}

SF_EXPORT ssize_t send(int fd, const void *buf, size_t len, int flags) {
    sf_ensure_init();
    struct sf_conn *c, *f = sf_fast_conn(fd, &c);
    if (SF_LIKELY(c == NULL))
        return f == NULL ? real.send(fd, buf, len, flags)
                         : final_write(f, real.send(fd, buf, len, flags));
    if (quiet_call(c, 0))
        return quiet_write(c, real.send(fd, buf, len, flags));
    return slow_send(c, buf, len, flags);
}

SF_EXPORT ssize_t recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *addr,
                           socklen_t *addrlen) {
    sf_ensure_init();
    struct sf_conn *c, *f = sf_fast_read_conn(fd, &c);
    if (SF_LIKELY(c == NULL))
        return f == NULL ? real.recvfrom(fd, buf, len, flags, addr, addrlen)
                         : final_read(f, real.recvfrom(fd, buf, len, flags, addr, addrlen), flags);
    if (quiet_call(c, 1))
        return quiet_read(c, real.recvfrom(fd, buf, len, flags, addr, addrlen), flags);
    return slow_recvfrom(c, buf, len, flags, addr, addrlen);
}

SF_EXPORT ssize_t sendto(int fd, const void *buf, size_t len, int flags,
                         const struct sockaddr *addr, socklen_t addrlen) {
    sf_ensure_init();
    struct sf_conn *c, *f = sf_fast_conn(fd, &c);
    if (SF_LIKELY(c == NULL))
        return f == NULL ? real.sendto(fd, buf, len, flags, addr, addrlen)
                         : final_write(f, real.sendto(fd, buf, len, flags, addr, addrlen));
    if (quiet_call(c, 0))
        return quiet_write(c, real.sendto(fd, buf, len, flags, addr, addrlen));
    return slow_sendto(c, buf, len, flags, addr, addrlen);
}

SF_EXPORT ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
    sf_ensure_init();
    struct sf_conn *c, *f = sf_fast_read_conn(fd, &c);
    if (SF_LIKELY(c == NULL))
        return f == NULL ? real.recvmsg(fd, msg, flags)
                         : final_read(f, real.recvmsg(fd, msg, flags), flags);
    if (quiet_call(c, 1))
        return quiet_read(c, real.recvmsg(fd, msg, flags), flags);
    return slow_recvmsg(c, msg, flags);
}

SF_EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags) {
    sf_ensure_init();
    if (SF_UNLIKELY(msg != NULL && msg->msg_controllen != 0))
        sf_sockopts_passed(msg);
    struct sf_conn *c, *f = sf_fast_conn(fd, &c);
    if (SF_LIKELY(c == NULL))
        return f == NULL ? real.sendmsg(fd, msg, flags)
                         : final_write(f, real.sendmsg(fd, msg, flags));
    if (quiet_call(c, 0))
        return quiet_write(c, real.sendmsg(fd, msg, flags));
    return slow_sendmsg(c, msg, flags);
}

SF_EXPORT int recvmmsg(int fd, struct mmsghdr *vec, unsigned vlen, sf_mmsg_flags flags,
                       struct timespec *timeout) {
    sf_ensure_init();
    struct sf_conn *c, *f = sf_fast_read_conn(fd, &c);
    if (SF_LIKELY(c == NULL)) {
        int n = real.recvmmsg(fd, vec, vlen, flags, timeout);
        if (f != NULL && n > 0)
            final_read(f, vec_bytes(vec, n), (int)flags);
        return n;
    }
    return slow_recvmmsg(c, vec, vlen, flags, timeout);
}

SF_EXPORT int sendmmsg(int fd, struct mmsghdr *vec, unsigned vlen, sf_mmsg_flags flags) {
    sf_ensure_init();
    for (unsigned i = 0; i < vlen; i++)
        if (SF_UNLIKELY(vec[i].msg_hdr.msg_controllen != 0))
            sf_sockopts_passed(&vec[i].msg_hdr);
    struct sf_conn *c, *f = sf_fast_conn(fd, &c);
    if (SF_LIKELY(c == NULL)) {
        int n = real.sendmmsg(fd, vec, vlen, flags);
        if (f != NULL && n > 0)
            final_write(f, vec_bytes(vec, n));
        return n;
    }
    return slow_sendmmsg(c, vec, vlen, flags);
}

static SF_NOINLINE ssize_t slow_sendfile(struct sf_conn *c, int in_fd, off_t *offset, size_t count,
                                         int use64) {
    struct io op = {.call = call_sendfile, .in_fd = in_fd, .offset = offset, .len = count,
                    .use64 = use64};
    return io_write(c, &op);
}

static ssize_t sendfile_common(int out_fd, int in_fd, off_t *offset, size_t count, int use64) {
    sf_ensure_init();
    struct sf_conn *c, *f = sf_fast_conn(out_fd, &c);
    if (SF_LIKELY(c == NULL)) {
        ssize_t n = (use64 ? real.sendfile64 : real.sendfile)(out_fd, in_fd, offset, count);
        return f == NULL ? n : final_write(f, n);
    }
    if (quiet_call(c, 0))
        return quiet_write(c, (use64 ? real.sendfile64 : real.sendfile)(out_fd, in_fd, offset,
                                                                         count));
    return slow_sendfile(c, in_fd, offset, count, use64);
}

SF_EXPORT ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count) {
    return sendfile_common(out_fd, in_fd, offset, count, 0);
}

SF_EXPORT ssize_t sendfile64(int out_fd, int in_fd, off_t *offset, size_t count) {
    return sendfile_common(out_fd, in_fd, offset, count, 1);
}

/* splice only counts: redirecting a pipe-to-socket splice mid-switch is not supported, so a
 * connection that splices is kept on the overlay. */
SF_EXPORT ssize_t splice(int fd_in, off_t *off_in, int fd_out, off_t *off_out, size_t len,
                         unsigned flags) {
    sf_ensure_init();
    struct sf_conn *c = sf_tracked(fd_out);
    if (c == NULL)
        c = sf_tracked(fd_in);
    if (c != NULL && atomic_load(&c->phase) == SF_P_OVERLAY) {
        pthread_mutex_lock(&c->mu);
        if (atomic_load(&c->phase) == SF_P_OVERLAY)
            sf_set_phase(c, SF_P_PINNED);
        pthread_mutex_unlock(&c->mu);
    }
    return real.splice(fd_in, off_in, fd_out, off_out, len, flags);
}

/* Fortified variants: the bounds check stays glibc's (it aborts the program), the call goes
 * through our wrappers. */
SF_EXPORT ssize_t __read_chk(int fd, void *buf, size_t len, size_t buflen) {
    sf_ensure_init();
    if (SF_UNLIKELY(len > buflen))
        return real.read_chk(fd, buf, len, buflen);
    return read(fd, buf, len);
}

SF_EXPORT ssize_t __recv_chk(int fd, void *buf, size_t len, size_t buflen, int flags) {
    sf_ensure_init();
    if (SF_UNLIKELY(len > buflen))
        return real.recv_chk(fd, buf, len, buflen, flags);
    return recv(fd, buf, len, flags);
}

SF_EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t len, size_t buflen, int flags,
                                 struct sockaddr *addr, socklen_t *addrlen) {
    sf_ensure_init();
    if (SF_UNLIKELY(len > buflen))
        return real.recvfrom_chk(fd, buf, len, buflen, flags, addr, addrlen);
    return recvfrom(fd, buf, len, flags, addr, addrlen);
}
