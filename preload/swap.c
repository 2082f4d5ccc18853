/* swap.c -- putting the host socket in place of the overlay socket, on the same fd number.
 *
 * The application keeps its fd number, its epoll registrations (same events, same 64-bit data,
 * in every epoll instance), its fd and file flags and its socket options; only the socket under
 * the number changes. Order matters (docs/design.md, "The swap keeps the fd number"): epoll keys a
 * registration by (file, fd), so each registration is deleted while the number still names the
 * overlay socket, then dup3 replaces it, then the registration is added back. */
#include <errno.h>
#include <fcntl.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "sf_core.h"

void sf_set_phase(struct sf_conn *c, int phase) {
    int old = atomic_load(&c->phase);
    int was = old >= SF_P_REQUESTED && old < SF_P_HOST;
    int is = phase >= SF_P_REQUESTED && phase < SF_P_HOST;
    if (is && !was)
        atomic_fetch_add(&sf_in_transition, 1);
    else if (was && !is)
        atomic_fetch_sub(&sf_in_transition, 1);
    atomic_store(&c->phase, phase);
    c->phase_since_ms = sf_now_ms();
    pthread_cond_broadcast(&c->cv);
    sf_window_phase(c, old, phase);
}

/* Every holder of c->wmu releases it here: a swap that ran while a write was in flight left the
 * host connection's private number for the writer to close. */
void sf_wmu_unlock(struct sf_conn *c) {
    int fd = c->pending_close_host;
    if (fd >= 0) {
        c->pending_close_host = -1;
        real.close(fd);
        sf_private_forget(fd);
    }
    pthread_mutex_unlock(&c->wmu);
}

/* ---- socket options: read from the old socket, set on the new one ------------------------- */

struct sockopt_id {
    int level, name;
};

/* Copied as soon as the host connection arrives, off the application's path: the commit, which
 * an application thread may be waiting for, then copies only the few below. From then on
 * setsockopt mirrors the application's changes onto the host connection (wrap_sock.c). */
static const struct sockopt_id early_opts[] = {
    {SOL_SOCKET, SO_KEEPALIVE},     {IPPROTO_TCP, TCP_KEEPIDLE}, {IPPROTO_TCP, TCP_KEEPINTVL},
    {IPPROTO_TCP, TCP_KEEPCNT},     {IPPROTO_TCP, TCP_USER_TIMEOUT}, {IPPROTO_IP, IP_TOS},
    {SOL_SOCKET, SO_PRIORITY},
};
/* Not TCP_QUICKACK: it reads back the kernel's transient ping-pong state, and setting it from a
 * busy connection would pin delayed ACKs on the new one. */

static void copy_opt(int from, int to, int level, int name, size_t size) {
    char val[64];
    socklen_t len = (socklen_t)size;
    if (real.getsockopt(from, level, name, val, &len) == 0)
        real.setsockopt(to, level, name, val, len);
}

int sf_sockopt_waits_for_commit(int level, int name) {
    return (level == IPPROTO_TCP && (name == TCP_NODELAY || name == TCP_CORK)) ||
           (level == SOL_SOCKET && name == SO_LINGER);
}

/* Until the commit the host connection carries the handoff frames, which the application's
 * TCP_CORK would hold back and its Nagle delay, and the agent may still close it on an abort,
 * which a lingering close would turn into a wait. */
void sf_copy_sockopts_at_commit(int from, int to) {
    copy_opt(from, to, IPPROTO_TCP, TCP_NODELAY, sizeof(int));
    copy_opt(from, to, IPPROTO_TCP, TCP_CORK, sizeof(int));
    copy_opt(from, to, SOL_SOCKET, SO_LINGER, sizeof(struct linger));
}

void sf_copy_sockopts_early(int from, int to, int with_bufs) {
    for (size_t i = 0; i < sizeof early_opts / sizeof early_opts[0]; i++)
        copy_opt(from, to, early_opts[i].level, early_opts[i].name, sizeof(int));
    copy_opt(from, to, SOL_SOCKET, SO_RCVTIMEO, sizeof(struct timeval));
    copy_opt(from, to, SOL_SOCKET, SO_SNDTIMEO, sizeof(struct timeval));
    char cc[16];
    socklen_t len = sizeof cc;
    if (real.getsockopt(from, IPPROTO_TCP, TCP_CONGESTION, cc, &len) == 0)
        real.setsockopt(to, IPPROTO_TCP, TCP_CONGESTION, cc, (socklen_t)strnlen(cc, len));
    /* Buffer sizes only when the application fixed them: setting one turns off the kernel's
     * autotuning, which would cost a default socket its throughput. The kernel reports twice
     * the value that was set. */
    if (with_bufs) {
        int names[2] = {SO_SNDBUF, SO_RCVBUF};
        for (int i = 0; i < 2; i++) {
            int v;
            socklen_t vl = sizeof v;
            if (real.getsockopt(from, SOL_SOCKET, names[i], &v, &vl) == 0) {
                v /= 2;
                real.setsockopt(to, SOL_SOCKET, names[i], &v, sizeof v);
            }
        }
    }
}

/* ---- epoll registrations ------------------------------------------------------------------ */

void sf_epreg_record_locked(struct sf_conn *c, int op, int epfd, struct epoll_event *ev) {
    int i = 0;
    while (i < c->n_regs && c->regs[i].epfd != epfd)
        i++;
    if (op == EPOLL_CTL_DEL) {
        if (i < c->n_regs) {
            if (c->regs[i].events & EPOLLONESHOT)
                atomic_fetch_sub(&sf_oneshot_regs, 1);
            c->regs[i] = c->regs[--c->n_regs];
        }
    } else if (ev != NULL) {
        if (i == c->n_regs) {
            if (c->n_regs == c->cap_regs) {
                int cap = c->cap_regs ? c->cap_regs * 2 : 2;
                struct sf_epreg *grown = realloc(c->regs, (size_t)cap * sizeof *grown);
                if (grown == NULL) {
                    sf_set_phase(c, SF_P_PINNED); /* cannot re-register it: never swap it */
                    return;
                }
                c->regs = grown;
                c->cap_regs = cap;
            }
            c->n_regs++;
        } else if (c->regs[i].events & EPOLLONESHOT) {
            atomic_fetch_sub(&sf_oneshot_regs, 1);
        }
        c->regs[i].epfd = epfd;
        c->regs[i].events = ev->events;
        c->regs[i].data = ev->data;
        c->regs[i].disarmed = 0;
        if (ev->events & EPOLLONESHOT)
            atomic_fetch_add(&sf_oneshot_regs, 1);
    }
}

struct epfd_arg {
    int epfd;
    const struct epoll_event *evs;
    int n;
};

static void drop_epfd(struct sf_conn *c, void *arg) {
    struct epfd_arg *a = arg;
    if (c->n_regs == 0)
        return;
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < c->n_regs;) {
        if (c->regs[i].epfd == a->epfd) {
            if (c->regs[i].events & EPOLLONESHOT)
                atomic_fetch_sub(&sf_oneshot_regs, 1);
            c->regs[i] = c->regs[--c->n_regs];
        } else {
            i++;
        }
    }
    pthread_mutex_unlock(&c->mu);
}

void sf_epreg_drop_epfd(int epfd) {
    struct epfd_arg a = {epfd, NULL, 0};
    sf_for_each_conn(drop_epfd, &a);
}

/* A fired EPOLLONESHOT registration stays disarmed until the app re-arms it with MOD; the swap
 * must re-add it disarmed too, or another thread could get a second event for the same fd. */
static void mark_fired(struct sf_conn *c, void *arg) {
    struct epfd_arg *a = arg;
    if (c->n_regs == 0)
        return;
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < c->n_regs; i++) {
        struct sf_epreg *r = &c->regs[i];
        if (r->epfd != a->epfd || !(r->events & EPOLLONESHOT))
            continue;
        for (int k = 0; k < a->n; k++)
            if (a->evs[k].data.u64 == r->data.u64)
                r->disarmed = 1;
    }
    pthread_mutex_unlock(&c->mu);
}

void sf_epreg_mark_fired(int epfd, const struct epoll_event *evs, int n) {
    struct epfd_arg a = {epfd, evs, n};
    sf_for_each_conn(mark_fired, &a);
}

/* ---- the swap ----------------------------------------------------------------------------- */

/* Caller holds c->mu and has checked the switch point: rx == S_peer, the peer's SYNC is in, our
 * own writes already go to host_fd. */
int sf_swap_locked(struct sf_conn *c) {
    int fd = c->fd, host = c->host_fd;
    int fdflags = real.fcntl(fd, F_GETFD);
    int flflags = real.fcntl(fd, F_GETFL);
    if (fdflags < 0 || flflags < 0)
        return -1;
    /* No copy of the socket options here: the commit copied them onto the host socket, and
     * setsockopt mirrors every later change to it (wrap_sock.c). A second copy cost ~30 µs of
     * the application's own call that met the switch point. */
    /* The overlay socket is about to close. With SO_LINGER {1,0} that close would reset it, and
     * a reset throws away overlay bytes the peer may not have read yet. */
    struct linger off = {0, 0};
    real.setsockopt(fd, SOL_SOCKET, SO_LINGER, &off, sizeof off);
    for (int i = 0; i < c->n_regs; i++)
        real.epoll_ctl(c->regs[i].epfd, EPOLL_CTL_DEL, fd, NULL);
    /* A thread blocked in read or poll on this number sleeps on the overlay socket itself, and
     * dup3 does not wake it: only the peer's overlay FIN would, which may come late or, on a
     * lossy overlay, never, while the data it waits for is already on the host connection. The
     * overlay stream is complete (rx == S_peer), so ending its read side loses nothing: the
     * sleeper reads 0, finds the fd swapped and reads the host socket (wrap_io.c do_read). */
    real.shutdown(fd, SHUT_RD);
    if (real.dup3(host, fd, (fdflags & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0) {
        int err = errno;
        for (int i = 0; i < c->n_regs; i++) {
            struct epoll_event ev = {.events = c->regs[i].events, .data = c->regs[i].data};
            real.epoll_ctl(c->regs[i].epfd, EPOLL_CTL_ADD, fd, &ev);
        }
        SF_LOG("fd %d: dup3 failed (%s)", fd, strerror(err));
        return -1;
    }
    real.fcntl(fd, F_SETFL, flflags);
    for (int i = 0; i < c->n_regs; i++) {
        struct sf_epreg *r = &c->regs[i];
        struct epoll_event ev = {.events = r->events, .data = r->data};
        if (r->disarmed)
            ev.events = EPOLLONESHOT; /* registered, but reports nothing until re-armed */
        real.epoll_ctl(r->epfd, EPOLL_CTL_ADD, fd, &ev);
    }
    /* From here writers use c->fd, which now is the host socket. One may be inside
     * write(host) right now (writes went there since the commit): the private number is closed
     * by whoever next releases c->wmu, and only after host_fd stopped naming it. */
    sf_set_phase(c, SF_P_HOST);
    atomic_store(&sf_last_swap_ms, sf_now_ms());
    __atomic_store_n(&c->host_fd, -1, __ATOMIC_SEQ_CST);
    c->pending_close_host = host;
    if (pthread_mutex_trylock(&c->wmu) == 0)
        sf_wmu_unlock(c);
    sf_agent_count_switch(1);
    SF_LOG("fd %d: switched to the host path (S=%llu, S_peer=%llu, in transition %d)", fd,
           (unsigned long long)atomic_load(&c->tx), (unsigned long long)c->peer_s,
           atomic_load(&sf_in_transition));
    return 0;
}

static int at_switch_point(struct sf_conn *c) {
    return atomic_load(&c->phase) == SF_P_COMMITTED && c->peer_synced && c->host_fd >= 0 &&
           atomic_load(&c->rx) == c->peer_s;
}

int sf_maybe_swap(struct sf_conn *c) {
    pthread_mutex_lock(&c->mu);
    if (at_switch_point(c))
        sf_swap_locked(c);
    int host = atomic_load(&c->phase) == SF_P_HOST;
    pthread_mutex_unlock(&c->mu);
    return host;
}

/* A read on the overlay returned 0 while a switch is under way. Decide whether that is the
 * switch point (swap, the caller reads again), the peer's real EOF, or not yet known.
 *
 * The peer sends its SYNC on the host connection before its FIN on the overlay, so when the FIN
 * is here the SYNC is already in flight on the faster path: this thread reads it itself rather
 * than wait for the agent. Returning EAGAIN instead would break programs that take a readable
 * socket's EAGAIN for an error (wrk does), so even a non-blocking caller waits here, briefly. */
int sf_wait_handoff(struct sf_conn *c, int nonblock) {
    uint64_t deadline = sf_now_ms() + (nonblock ? 500 : 5000);
    int result = SF_WAIT_EOF;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        int phase = atomic_load(&c->phase);
        if (phase == SF_P_HOST) {
            result = SF_WAIT_SWAPPED;
            break;
        }
        /* The peer only shuts the overlay after it got our READY (we are the follower) or our
         * SYNC (we committed); in every other phase the EOF is the application's own. */
        int peer_may_have_committed = (phase == SF_P_HANDSHAKE && !c->leader) ||
                                      (phase == SF_P_COMMITTED && !c->peer_synced);
        if (peer_may_have_committed) {
            sf_agent_pump_locked(c);
            if (c->commit_wanted && pthread_mutex_trylock(&c->wmu) == 0) {
                sf_agent_commit_locked(c);
                sf_wmu_unlock(c);
                sf_agent_finish_commit_locked(c);
            }
        }
        if (at_switch_point(c)) {
            result = sf_swap_locked(c) == 0 ? SF_WAIT_SWAPPED : SF_WAIT_RESET;
            break;
        }
        phase = atomic_load(&c->phase);
        peer_may_have_committed = (phase == SF_P_HANDSHAKE && !c->leader) ||
                                  (phase == SF_P_COMMITTED && !c->peer_synced);
        if (!peer_may_have_committed) {
            /* BROKEN too: the peer dropped the host connection before it committed, so its
             * overlay stream, FIN included, is complete. Unless its SYNC reached us: then it
             * had committed, and the rest of its stream died with the host connection. */
            result = phase == SF_P_BROKEN && c->peer_synced ? SF_WAIT_RESET : SF_WAIT_EOF;
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
    SF_LOG("fd %d: overlay EOF in phase %d: %d (rx %llu, S_peer %llu%s)", c->fd,
           atomic_load(&c->phase), result, (unsigned long long)atomic_load(&c->rx),
           (unsigned long long)c->peer_s, c->peer_synced ? "" : " unknown");
    pthread_mutex_unlock(&c->mu);
    return result;
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
    char byte;
    int phase = atomic_load(&c->phase);
    if ((events & EPOLLIN) && real.recv(c->fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) > 0 &&
        phase == atomic_load(&c->phase))
        return events & ~hangup;
    pthread_mutex_lock(&c->mu);
    phase = atomic_load(&c->phase);
    if (phase == SF_P_HOST) {
        /* Swapped by another thread since the caller looked: the event is the overlay's. */
        pthread_mutex_unlock(&c->mu);
        return sf_recheck_ready(c, events, wanted);
    }
    if (phase != SF_P_HANDSHAKE && phase != SF_P_COMMITTED) {
        pthread_mutex_unlock(&c->mu);
        return events;
    }
    ssize_t n = real.recv(c->fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n != 0) {
        /* Overlay data still to read (or nothing at all): the hang-up is not the app's news. */
        pthread_mutex_unlock(&c->mu);
        return n > 0 ? events & ~hangup : events;
    }
    if (!c->peer_synced) {
        sf_agent_pump_locked(c);
        if (c->commit_wanted && pthread_mutex_trylock(&c->wmu) == 0) {
            sf_agent_commit_locked(c);
            sf_wmu_unlock(c);
            sf_agent_finish_commit_locked(c);
        }
    }
    if (at_switch_point(c))
        sf_swap_locked(c);
    phase = atomic_load(&c->phase);
    uint32_t result;
    if (phase == SF_P_HOST) {
        struct pollfd p = {.fd = c->fd, .events = (short)(wanted & (EPOLLIN | EPOLLOUT | EPOLLRDHUP))};
        result = real.poll(&p, 1, 0) == 1 ? (uint32_t)(unsigned short)p.revents : 0;
    } else if ((phase == SF_P_COMMITTED && !c->peer_synced) ||
               (phase == SF_P_HANDSHAKE && !c->leader)) {
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

/* A switch ended without a swap after an event of this fd was held back: ask epoll to look at
 * the socket again (MOD re-evaluates readiness), or an edge-triggered reader would never hear
 * of the EOF or data it was not shown. Caller holds c->mu. */
void sf_rearm_locked(struct sf_conn *c) {
    if (!c->suppressed)
        return;
    c->suppressed = 0;
    for (int i = 0; i < c->n_regs; i++) {
        struct sf_epreg *r = &c->regs[i];
        if (r->disarmed)
            continue;
        struct epoll_event ev = {.events = r->events, .data = r->data};
        real.epoll_ctl(r->epfd, EPOLL_CTL_MOD, c->fd, &ev);
    }
}

/* The fd was swapped a moment ago, maybe by another thread while the application's wait was
 * returning: the event may be the old overlay socket's FIN. Report what the host socket really
 * has instead, so nobody reads EOF or EAGAIN out of a stale event. */
uint32_t sf_recheck_ready(struct sf_conn *c, uint32_t events, uint32_t wanted) {
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLRDHUP)))
        return events;
    struct pollfd p = {.fd = c->fd, .events = (short)(wanted & (EPOLLIN | EPOLLOUT | EPOLLRDHUP))};
    return real.poll(&p, 1, 0) == 1 ? (uint32_t)(unsigned short)p.revents : 0;
}
