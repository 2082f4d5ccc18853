/* swap.c -- putting the host socket in place of the overlay socket, on the same fd number.
 *
 * The application keeps its fd number, its epoll registrations (same events, same 64-bit data,
 * in every epoll instance), its fd and file flags and its socket options; only the socket under
 * the number changes. So this file also keeps what the swap carries over: the record of every
 * epoll registration of a tracked socket (wrap_event.c reports each epoll_ctl), and the socket
 * options, copied onto the host connection when it arrives and at the commit. Order matters
 * (docs/design.md, "The swap keeps the fd number"): epoll keys a registration by (file, fd), so
 * each registration is deleted while the number still names the overlay socket, then dup3
 * replaces it, then the registration is added back.
 * The swap runs at the switch point (phase.h's COMMITTED -> HOST), from whichever thread gets
 * there first: the agent, a reader, or an event loop (switchpoint.c). */
#include <errno.h>
#include <fcntl.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "sf_core.h"

/* The host connection's private number a swap or a drop left for the holder of c->wmu. */
void sf_close_pending_host(struct sf_conn *c) {
    int fd = __atomic_exchange_n(&c->pending_close_host, -1, __ATOMIC_SEQ_CST);
    if (fd >= 0) {
        real.close(fd);
        sf_private_forget(fd);
    }
}

/* Every holder of c->wmu releases it here: a swap that ran while a write was in flight left the
 * host connection's private number for the writer to close. */
void sf_wmu_unlock(struct sf_conn *c) {
    sf_close_pending_host(c);
    pthread_mutex_unlock(&c->wmu);
    /* A number left pending after our look, whose leaver's trylock met our hold, would wait for
     * the next holder; meanwhile drop_host_fd takes it for a holder's and closes the next number
     * dropped at once, which may be that holder's. */
    if (__atomic_load_n(&c->pending_close_host, __ATOMIC_SEQ_CST) >= 0 &&
        pthread_mutex_trylock(&c->wmu) == 0)
        sf_wmu_unlock(c);
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

/* -1: no memory to record a new registration of a connection in the middle of a switch, whose
 * swap would then lose it; the caller undoes it. */
int sf_epreg_record_locked(struct sf_conn *c, int op, int epfd, struct epoll_event *ev) {
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
                    /* Cannot re-register it at a swap: on the overlay, never swap it; once
                     * final, no swap is to come; mid-switch, which cannot be stopped from
                     * here, the registration is refused instead (phase.h). */
                    int phase = atomic_load(&c->phase);
                    if (phase == SF_P_OVERLAY)
                        sf_set_phase(c, SF_P_PINNED);
                    return sf_phase_switching(phase) ? -1 : 0;
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
    return 0;
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
    /* A writer's commit whose rest is still to come (its FIN, while c->fd names the overlay). */
    sf_handoff_finish_locked(c);
    /* The socket options are on the host socket already, copied by the agent once it held the
     * connection, and setsockopt mirrors every later change (wrap_sock.c); unless an
     * application thread committed before the agent could copy them. */
    sf_handoff_copy_opts_locked(c);
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
    /* The mark first: a wait that begins between the two must not find the process quiet
     * (no switch in transition, none recent), which would spare it a look at its events. */
    atomic_store(&sf_last_swap_ms, sf_now_ms());
    sf_set_phase(c, SF_P_HOST);
    __atomic_store_n(&c->host_fd, -1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&c->pending_close_host, host, __ATOMIC_SEQ_CST);
    sf_rd_host_drop(c); /* readers now find the host socket on c->fd */
    if (pthread_mutex_trylock(&c->wmu) == 0)
        sf_wmu_unlock(c);
    sf_count_switch(1);
    SF_LOG("fd %d: switched to the host path (S=%llu, S_peer=%llu, in transition %d)", fd,
           (unsigned long long)atomic_load(&c->tx), (unsigned long long)c->peer_s,
           atomic_load(&sf_in_transition));
    return 0;
}

int sf_maybe_swap(struct sf_conn *c) {
    pthread_mutex_lock(&c->mu);
    if (sf_at_switch_point(c))
        sf_swap_locked(c);
    int host = atomic_load(&c->phase) == SF_P_HOST;
    pthread_mutex_unlock(&c->mu);
    return host;
}

/* sf_maybe_swap for an application thread past the peer's S, which reads on without the swap
 * (sf_past_peer_s) and so has no need to wait for c->mu: its holder swaps once done (the agent
 * after a commit or the frames it pumped, a writer after its commit, a reader at the overlay's
 * end), and the agent's tick catches any other (handoff.c expire). */
void sf_try_swap(struct sf_conn *c) {
    if (pthread_mutex_trylock(&c->mu) != 0)
        return;
    if (sf_at_switch_point(c))
        sf_swap_locked(c);
    pthread_mutex_unlock(&c->mu);
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
