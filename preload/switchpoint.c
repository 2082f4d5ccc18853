/* switchpoint.c -- the switch point as an application thread meets it.
 *
 * The peer ends its overlay stream with a FIN once it has committed, so while a switch is under
 * way an application thread may see that FIN before the agent has the peer's SYNC: a read that
 * returns 0, or an event loop told that the fd is readable or hung up. Shown as it is, the
 * application would take it for the end of the stream. Here it is settled instead, under c->mu
 * so that a commit in flight is seen whole: pump the handoff frames waiting and commit if due
 * (handoff.c), swap if every overlay byte is read (swap.c), and only then tell the caller what
 * it met: the switch point (swapped: read the host socket), the peer's real EOF, a reset, or not
 * known yet. Just after a swap, events are checked against the host socket too. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "sf_core.h"

/* What the swapped-in host socket has of what the caller waits for. */
static uint32_t host_readiness(struct sf_conn *c, uint32_t wanted) {
    struct pollfd p = {.fd = c->fd, .events = (short)(wanted & (EPOLLIN | EPOLLOUT | EPOLLRDHUP))};
    return real.poll(&p, 1, 0) == 1 ? (uint32_t)(unsigned short)p.revents : 0;
}

/* ---- readers past the peer's S ---------------------------------------------------------------
 *
 * Once the peer's SYNC is in and every overlay byte up to its S is read, the peer's next bytes
 * are on the host connection, whatever this end's own commit and swap are up to. A reader then
 * reads the host connection at once rather than wait for them: they run under c->mu, mostly on
 * the agent, which shares its CPU with the routers, and took 100-280 µs there (the commit's
 * SYNC and its overlay FIN each run the whole network path inline). The reader uses a private
 * number of its own (rd_host) rather than host_fd, whose number a commit that fails, a swap or
 * a close may give up at any moment; rd_host's number is closed only by the last reader that
 * may have loaded it. */

/* Caller holds c->mu; the peer's SYNC was just read. */
void sf_rd_host_open_locked(struct sf_conn *c) {
    if (c->host_fd < 0 || atomic_load(&c->rd_host) >= 0)
        return;
    /* The reader's call is the application's: a non-blocking socket must not block on it. The
     * commit makes the same change (so once committed, with the fcntl wrapper mirroring every
     * later one, the host connection has it already); until then the handoff frames use
     * MSG_DONTWAIT anyway. */
    if (atomic_load(&c->phase) != SF_P_COMMITTED) {
        int fl = real.fcntl(c->fd, F_GETFL);
        int hfl = real.fcntl(c->host_fd, F_GETFL);
        if (fl < 0 || hfl < 0)
            return;
        if ((hfl & O_NONBLOCK) != (fl & O_NONBLOCK) &&
            real.fcntl(c->host_fd, F_SETFL, (hfl & ~O_NONBLOCK) | (fl & O_NONBLOCK)) < 0)
            return;
    }
    int fd = sf_private_dup(c->host_fd);
    if (fd >= 0)
        atomic_store(&c->rd_host, fd);
}

static void close_rd(int fd) {
    if (fd >= 0)
        sf_private_close(fd);
}

/* Readers that loaded the number before this are still counted in rd_users: the last of them
 * closes it (sf_rd_host_put); a reader that loads it after sees -1. */
void sf_rd_host_drop(struct sf_conn *c) {
    int fd = atomic_exchange(&c->rd_host, -1);
    if (fd < 0)
        return;
    /* One still pending belongs to an earlier connection on this fd number, whose reader has
     * been inside its call since before that connection was closed: past its load, so the
     * number can go. */
    close_rd(atomic_exchange(&c->rd_close, fd));
    if (atomic_load(&c->rd_users) == 0)
        close_rd(atomic_exchange(&c->rd_close, -1));
}

int sf_rd_host_get(struct sf_conn *c) {
    atomic_fetch_add(&c->rd_users, 1);
    int fd = atomic_load(&c->rd_host);
    if (fd < 0)
        sf_rd_host_put(c);
    return fd;
}

void sf_rd_host_put(struct sf_conn *c) {
    if (atomic_fetch_sub(&c->rd_users, 1) == 1)
        close_rd(atomic_exchange(&c->rd_close, -1));
}

/* Only the forking thread lives on in the child: no reader is left to close them. */
void sf_rd_host_after_fork_child(struct sf_conn *c) {
    atomic_store(&c->rd_users, 0);
    close_rd(atomic_exchange(&c->rd_host, -1));
    close_rd(atomic_exchange(&c->rd_close, -1));
}

/* The peer's SYNC is in (sf_handoff_pump_locked, after peer_synced): wake the readers that
 * wait for it in wait_for_sync. Once per switch, so no count of waiters. */
void sf_rd_host_wake(struct sf_conn *c) {
    syscall(SYS_futex, (int *)&c->rd_host, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* A reader met the overlay's end while the peer may have committed. c->mu is the agent's for
 * as long as it reads the peer's SYNC, commits and swaps, and on a vCPU shared with the routers
 * that was 100-280 µs of lock wait; the reader needs only the SYNC, after which it reads the
 * host connection (do_read). So, while c->mu is taken and no readers' number exists yet, it
 * sleeps on that number (the SYNC's arrival stores it and wakes it), looking again every
 * 100 µs for anything else that ends the wait. 1: read on (past S, or swapped); 0: the caller
 * holds c->mu. */
static int wait_for_sync(struct sf_conn *c) {
    for (;;) {
        if (pthread_mutex_trylock(&c->mu) == 0)
            return 0;
        int phase = atomic_load(&c->phase);
        if (phase == SF_P_HOST || sf_past_peer_s(c, phase))
            return 1;
        if (atomic_load(&c->rd_host) >= 0 || !sf_phase_in_handoff(phase))
            break;
        struct timespec tick = {0, 100000};
        syscall(SYS_futex, (int *)&c->rd_host, FUTEX_WAIT_PRIVATE, -1, &tick, NULL, 0);
    }
    pthread_mutex_lock(&c->mu);
    return 0;
}

static int settle_end_locked(struct sf_conn *c, int nonblock);

/* A read on the overlay returned 0 while a switch is under way. Decide whether that is the
 * switch point (swap, the caller reads again), the peer's real EOF, or not yet known.
 *
 * The peer sends its SYNC on the host connection before its FIN on the overlay, so when the FIN
 * is here the SYNC is already in flight on the faster path: this thread reads it itself rather
 * than wait for the agent. Returning EAGAIN instead would break programs that take a readable
 * socket's EAGAIN for an error (wrk does), so even a non-blocking caller waits here, briefly. */
int sf_wait_handoff(struct sf_conn *c, int nonblock) {
    if (wait_for_sync(c))
        return SF_WAIT_SWAPPED; /* the caller reads again: the host socket, one way or other */
    return settle_end_locked(c, nonblock);
}

/* A reader past the peer's S met the host connection's end before this end swapped. That is the
 * peer's real end only if the connection is whole: a host connection that died reads as EOF too
 * once another call took its error, such as the commit's SYNC, which failed and is about to
 * make the connection BROKEN. Decided as at the overlay's end, under c->mu, so that a commit in
 * flight is seen whole. */
int sf_host_end_before_swap(struct sf_conn *c, int nonblock) {
    pthread_mutex_lock(&c->mu);
    return settle_end_locked(c, nonblock);
}

/* Caller holds c->mu, which this releases. */
static int settle_end_locked(struct sf_conn *c, int nonblock) {
    uint64_t deadline = sf_now_ms() + (nonblock ? 500 : 5000);
    int result = SF_WAIT_EOF;
    for (;;) {
        int phase = atomic_load(&c->phase);
        if (phase == SF_P_HOST) {
            result = SF_WAIT_SWAPPED;
            break;
        }
        /* Unless the peer may have committed, the EOF is the application's own. */
        if (sf_peer_may_have_committed(c))
            sf_handoff_catch_up_locked(c);
        if (sf_at_switch_point(c)) {
            result = sf_swap_locked(c) == 0 ? SF_WAIT_SWAPPED : SF_WAIT_RESET;
            break;
        }
        phase = atomic_load(&c->phase);
        if (!sf_peer_may_have_committed(c)) {
            /* BROKEN too: the peer dropped the host connection before it committed, so its
             * overlay stream, FIN included, is complete. Unless bytes died with the host
             * connection (its SYNC reached us, or we wrote since our S): a reset then. */
            result = sf_broken_lost(c) ? SF_WAIT_RESET : SF_WAIT_EOF;
            break;
        }
        if (sf_now_ms() > deadline) {
            result = nonblock ? SF_WAIT_AGAIN : SF_WAIT_RESET;
            break;
        }
        int host = c->host_fd;
        if (host >= 0 && !c->peer_synced) {
            pthread_mutex_unlock(&c->mu);
            struct pollfd p = {.fd = host, .events = POLLIN};
            real.poll(&p, 1, 5);
            pthread_mutex_lock(&c->mu);
        } else {
            /* The commit is due, but another thread holds c->wmu: a writer, which commits as
             * soon as its write returns, or the agent, waiting for the c->mu this releases. The
             * commit's phase change broadcasts c->cv. */
            sf_cv_wait_ms(c, 1);
        }
    }
    SF_LOG("fd %d: stream's end met in phase %d: %d (rx %llu, S_peer %llu%s)", c->fd,
           atomic_load(&c->phase), result, (unsigned long long)atomic_load(&c->rx),
           (unsigned long long)c->peer_s, c->peer_synced ? "" : " unknown");
    pthread_mutex_unlock(&c->mu);
    return result;
}

/* One byte of the overlay, peeked. A peek takes a pending socket error (a reset) as a read
 * does, and the application, told the fd is readable, would then read a clean EOF: the error
 * is kept for its next read instead. */
static ssize_t peek_overlay(struct sf_conn *c) {
    char byte;
    ssize_t n = real.recv(c->fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0)
        sf_keep_read_err(c, errno);
    return n;
}

/* An event loop was just told that fd c->fd is readable or hung up. While a switch is under way
 * that may be nothing but the overlay's FIN at the switch point, which the application must not
 * see: it would read EOF, or EAGAIN where it expected data. Settle it here: swap if this is the
 * switch point and report the host socket's real readiness instead, or drop the overlay's
 * hang-up bits. `events` uses the bits poll and epoll share (IN, OUT, HUP, RDHUP, ERR);
 * `wanted` is what the caller asked for. Returns the events to report (0 = drop the event). */
uint32_t sf_settle_ready(struct sf_conn *c, uint32_t events, uint32_t wanted) {
    const uint32_t hangup = EPOLLHUP | EPOLLRDHUP;
    if (!(events & (EPOLLIN | hangup)))
        return events;
    /* The common case takes no lock: bytes to read make EPOLLIN true whatever the overlay's
     * FIN, and c->mu is what the agent holds while it commits, which must not hold up an event
     * loop that has data. A phase change meanwhile (a swap: the host socket's other bits may
     * differ) takes the locked path. */
    int phase = atomic_load(&c->phase);
    if ((events & EPOLLIN) && peek_overlay(c) > 0 && phase == atomic_load(&c->phase))
        return events & ~hangup;
    pthread_mutex_lock(&c->mu);
    phase = atomic_load(&c->phase);
    if (phase == SF_P_HOST) {
        /* Swapped by another thread since the caller looked: the event is the overlay's. */
        pthread_mutex_unlock(&c->mu);
        return sf_recheck_ready(c, events, wanted);
    }
    if (!sf_phase_in_handoff(phase)) {
        pthread_mutex_unlock(&c->mu);
        return events;
    }
    ssize_t n = peek_overlay(c);
    if (n != 0) {
        /* Overlay data still to read (or nothing at all): the hang-up is not the app's news. */
        pthread_mutex_unlock(&c->mu);
        return n > 0 ? events & ~hangup : events;
    }
    if (!c->peer_synced)
        sf_handoff_catch_up_locked(c);
    if (sf_at_switch_point(c))
        sf_swap_locked(c);
    phase = atomic_load(&c->phase);
    uint32_t result;
    if (phase == SF_P_HOST) {
        result = host_readiness(c, wanted);
    } else if (sf_peer_may_have_committed(c)) {
        /* The answer is on its way: the swap will report the host socket's readiness, and a
         * switch that fails instead re-arms the registrations (sf_rearm_locked). */
        result = events & ~(hangup | EPOLLIN);
        c->suppressed = 1;
    } else {
        result = events; /* a real EOF */
    }
    SF_LOG("fd %d: ready %#x -> %#x in phase %d (rx %llu, S_peer %llu%s)", c->fd, events, result,
           phase, (unsigned long long)atomic_load(&c->rx), (unsigned long long)c->peer_s,
           c->peer_synced ? "" : " unknown");
    pthread_mutex_unlock(&c->mu);
    return result;
}

/* The fd was swapped a moment ago, maybe by another thread while the application's wait was
 * returning: the event may be the old overlay socket's FIN. Report what the host socket really
 * has instead, so nobody reads EOF or EAGAIN out of a stale event. */
uint32_t sf_recheck_ready(struct sf_conn *c, uint32_t events, uint32_t wanted) {
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLRDHUP)))
        return events;
    return host_readiness(c, wanted);
}
