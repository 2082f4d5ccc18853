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
    if (fd >= 0)
        sf_private_close(fd);
}

/* The host connection's private number, which host_fd no longer names (caller holds c->mu). A
 * writer holding c->wmu may be inside a call on it, so it is closed by whoever next releases
 * c->wmu; at once if an earlier number is still pending, for c->wmu has then been held since,
 * and its holder loaded that one, never this one (writer_host_fd closes a pending number before
 * it loads host_fd). Overwriting the pending one would leak it. */
void sf_release_host_fd(struct sf_conn *c, int host) {
    if (__atomic_load_n(&c->pending_close_host, __ATOMIC_SEQ_CST) >= 0) {
        sf_private_close(host);
        return;
    }
    __atomic_store_n(&c->pending_close_host, host, __ATOMIC_SEQ_CST);
    if (pthread_mutex_trylock(&c->wmu) == 0)
        sf_wmu_unlock(c);
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

/* The options a host connection takes over from the overlay socket, copied as soon as the host
 * connection arrives (off the application's path; the commit, which an application thread may
 * be waiting for, then copies only the last three). From then on setsockopt mirrors the
 * application's changes onto the host connection (wrap_sock.c). Not TCP_QUICKACK: it reads back
 * the kernel's transient ping-pong state, and setting it from a busy connection would pin
 * delayed ACKs on the new one. */
enum {
    OPT_KEEPALIVE, OPT_KEEPIDLE, OPT_KEEPINTVL, OPT_KEEPCNT, OPT_USER_TIMEOUT, OPT_TOS,
    OPT_PRIORITY, OPT_RCVTIMEO, OPT_SNDTIMEO, OPT_NOTSENT_LOWAT, OPT_CONGESTION, OPT_NODELAY,
    OPT_CORK, OPT_LINGER, OPT_RCVLOWAT, OPT_ZEROCOPY, OPT_N
};
static const struct {
    int level, name;
    socklen_t size;
} opts[OPT_N] = {
    [OPT_KEEPALIVE] = {SOL_SOCKET, SO_KEEPALIVE, sizeof(int)},
    [OPT_KEEPIDLE] = {IPPROTO_TCP, TCP_KEEPIDLE, sizeof(int)},
    [OPT_KEEPINTVL] = {IPPROTO_TCP, TCP_KEEPINTVL, sizeof(int)},
    [OPT_KEEPCNT] = {IPPROTO_TCP, TCP_KEEPCNT, sizeof(int)},
    [OPT_USER_TIMEOUT] = {IPPROTO_TCP, TCP_USER_TIMEOUT, sizeof(int)},
    [OPT_TOS] = {IPPROTO_IP, IP_TOS, sizeof(int)},
    [OPT_PRIORITY] = {SOL_SOCKET, SO_PRIORITY, sizeof(int)},
    [OPT_RCVTIMEO] = {SOL_SOCKET, SO_RCVTIMEO, sizeof(struct timeval)},
    [OPT_SNDTIMEO] = {SOL_SOCKET, SO_SNDTIMEO, sizeof(struct timeval)},
    [OPT_NOTSENT_LOWAT] = {IPPROTO_TCP, TCP_NOTSENT_LOWAT, sizeof(int)},
    [OPT_CONGESTION] = {IPPROTO_TCP, TCP_CONGESTION, 16},
    [OPT_NODELAY] = {IPPROTO_TCP, TCP_NODELAY, sizeof(int)},
    [OPT_CORK] = {IPPROTO_TCP, TCP_CORK, sizeof(int)},
    [OPT_LINGER] = {SOL_SOCKET, SO_LINGER, sizeof(struct linger)},
    [OPT_RCVLOWAT] = {SOL_SOCKET, SO_RCVLOWAT, sizeof(int)},
    /* Recorded, never copied: a socket that has it does not switch (sf_zerocopy_on). */
    [OPT_ZEROCOPY] = {SOL_SOCKET, SO_ZEROCOPY, sizeof(int)},
};
#define OPT(i) (1u << (i))
#define OPTS_ALL (OPT(OPT_N) - 1)
/* Which of them an overlay socket can hold at other than the kernel's built-in value without a
 * setsockopt the library saw: the keepalive times, TCP_NOTSENT_LOWAT and the congestion control
 * default to the network namespace's sysctls (the overlay's and the host connection's differ in
 * general), and the congestion control may come from the route too; these are always copied. IP_TOS
 * of an accepted socket may be the client's, reflected (net.ipv4.tcp_reflect_tos): read, and copied
 * if not 0. Every other one has its built-in value until something sets it, on the socket or on the
 * listener it was accepted from (an accepted socket inherits the listener's); the setsockopt
 * wrapper records those in opts_set. The host connection the router passes has the built-in values
 * of all of them (the switch path sets none of these), so an option nobody set needs no copy: a
 * lone switch spends its first fd's work on the handful of system calls that matter, where reading
 * and writing all fifteen cost some thirty of them, on the critical path whenever the switch's
 * processes share a CPU. Where the record may miss a change (the socket or its listener existed at
 * a fork, went to another process by SCM_RIGHTS, or the listener came from before the library), all
 * are copied. */
#define OPTS_NETNS \
    (OPT(OPT_KEEPIDLE) | OPT(OPT_KEEPINTVL) | OPT(OPT_KEEPCNT) | OPT(OPT_NOTSENT_LOWAT) | \
     OPT(OPT_CONGESTION))

/* Bumped at every fork: parent and child share every socket open then, and neither's
 * setsockopt wrapper sees the other's changes. */
static _Atomic uint32_t opts_epoch = 1;

void sf_sockopts_forked(void) {
    atomic_fetch_add(&opts_epoch, 1);
}

/* The record of c's options holds: made in this epoch, never marked unknown since. */
static int opts_known(struct sf_conn *c) {
    return atomic_load(&c->opts_epoch) == atomic_load(&opts_epoch);
}

/* The option's index in opts, OPT_N if it is none of them. */
static int opt_index(int level, int name) {
    int i = 0;
    while (i < OPT_N && (opts[i].level != level || opts[i].name != name))
        i++;
    return i;
}

unsigned sf_sockopt_bit(int level, int name) {
    int i = opt_index(level, name);
    return i < OPT_N ? OPT(i) : 0;
}

/* Before the slot's kind is published (a release store, which orders these for its readers). */
void sf_sockopts_track(struct sf_conn *c, uint16_t set) {
    atomic_store_explicit(&c->opts_set, set, memory_order_relaxed);
    atomic_store_explicit(&c->opts_epoch, atomic_load(&opts_epoch), memory_order_relaxed);
}

uint16_t sf_sockopts_inherited(struct sf_conn *listener) {
    return listener != NULL && opts_known(listener) ? atomic_load(&listener->opts_set)
                                                    : UINT16_MAX;
}

void sf_sockopts_unknown(int fd) {
    struct sf_conn *c = sf_slot(fd);
    if (c != NULL)
        atomic_store(&c->opts_epoch, 0); /* never a current epoch */
}

void sf_sockopts_passed(const struct msghdr *msg) {
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(msg); cm; cm = CMSG_NXTHDR((struct msghdr *)msg, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        int n = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + (size_t)i * sizeof fd, sizeof fd);
            sf_sockopts_unknown(fd);
        }
    }
}

/* The options of c that may differ between its overlay socket and a new host connection. */
static unsigned opts_recorded(struct sf_conn *c) {
    return opts_known(c) ? atomic_load(&c->opts_set) | OPTS_NETNS : OPTS_ALL;
}

static unsigned opts_to_copy(struct sf_conn *c, int from) {
    unsigned m = opts_recorded(c);
    if (!(m & OPT(OPT_TOS)) && !c->via_connect) {
        int tos = 0;
        socklen_t len = sizeof tos;
        if (real.getsockopt(from, IPPROTO_IP, IP_TOS, &tos, &len) != 0 || tos != 0)
            m |= OPT(OPT_TOS);
    }
    /* Setting IP_TOS sets the priority too on some kernels: both, in this order. */
    if (m & (OPT(OPT_TOS) | OPT(OPT_PRIORITY)))
        m |= OPT(OPT_TOS) | OPT(OPT_PRIORITY);
    return m;
}

/* net.ipv4.tcp_notsent_lowat of this process's network namespace, the overlay's: what a
 * TCP_NOTSENT_LOWAT of 0 stands for; -1 if unreadable. */
static long long netns_notsent_lowat = -1;

/* Read where the agent takes its fds, before this process's first switch: a file opened for a
 * moment later could take the fd an application at its limit was about to get. */
void sf_sockopts_read_netns(void) {
    netns_notsent_lowat = -1;
    int fd = open("/proc/sys/net/ipv4/tcp_notsent_lowat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    char buf[24];
    ssize_t n = real.read(fd, buf, sizeof buf - 1);
    real.close(fd);
    if (n <= 0)
        return;
    buf[n] = '\0';
    char *end;
    unsigned long long v = strtoull(buf, &end, 10);
    if (end != buf && v <= UINT32_MAX)
        netns_notsent_lowat = (long long)v;
}

static void copy_opt(int from, int to, int i) {
    char val[64];
    socklen_t len = opts[i].size;
    if (real.getsockopt(from, opts[i].level, opts[i].name, val, &len) != 0)
        return;
    if (i == OPT_CONGESTION)
        len = (socklen_t)strnlen(val, len);
    if (i == OPT_NOTSENT_LOWAT) {
        /* 0 reads back until the socket is given one: the overlay namespace's sysctl is what
         * holds for it, and the host connection's namespace may have another. */
        int lowat;
        memcpy(&lowat, val, sizeof lowat);
        if (lowat == 0) {
            if (netns_notsent_lowat < 0)
                return;
            lowat = (int)(uint32_t)netns_notsent_lowat; /* a u32: UINT32_MAX is no limit */
            memcpy(val, &lowat, sizeof lowat);
        }
    }
    real.setsockopt(to, opts[i].level, opts[i].name, val, len);
}

/* A change is mirrored from the stage its option is copied at: most as soon as the host
 * connection is there; the commit's (below, OPT_NODELAY to OPT_LINGER) once committed;
 * SO_RCVLOWAT only by the swap: until then the library reads its handoff frames, a few bytes
 * each, from the host connection, and under a higher low-water mark poll does not report them
 * (the agent then waits for the application's own reads to find them; in a test that copied it
 * early, some switches never completed). */
int sf_sockopt_mirrored(int level, int name, int phase) {
    int i = opt_index(level, name);
    if (i == OPT_RCVLOWAT)
        return 0;
    if (i >= OPT_NODELAY && i <= OPT_LINGER)
        return phase == SF_P_COMMITTED;
    return phase == SF_P_HANDSHAKE || phase == SF_P_COMMITTED;
}

/* Until the commit the host connection carries the handoff frames, which the application's
 * TCP_CORK would hold back and its Nagle delay, and the agent may still close it on an abort,
 * which a lingering close would turn into a wait. TCP_NODELAY is on on the host connection for
 * the frames (handoff.c): off again if the overlay socket has it off. */
void sf_copy_sockopts_at_commit(struct sf_conn *c, int from, int to) {
    unsigned m = opts_recorded(c);
    if (m & OPT(OPT_NODELAY)) {
        copy_opt(from, to, OPT_NODELAY);
    } else {
        int zero = 0;
        real.setsockopt(to, IPPROTO_TCP, TCP_NODELAY, &zero, sizeof zero);
    }
    for (int i = OPT_CORK; i <= OPT_LINGER; i++)
        if (m & OPT(i))
            copy_opt(from, to, i);
}

/* The kernel queues a MSG_ZEROCOPY send's completion on the socket that made it, numbered by
 * that socket's own count: those of the overlay socket would be lost at the swap (the
 * application would wait for them, its buffers held, forever), and the host socket's would
 * number from 0 again. A connection whose socket has SO_ZEROCOPY on therefore stays on the
 * overlay. A system call only where the record says it may be on. Caller holds c->mu. */
int sf_zerocopy_on(struct sf_conn *c) {
    if (!(opts_recorded(c) & OPT(OPT_ZEROCOPY)))
        return 0;
    int on = 0;
    socklen_t len = sizeof on;
    return real.getsockopt(c->fd, SOL_SOCKET, SO_ZEROCOPY, &on, &len) == 0 && on != 0;
}

void sf_copy_sockopts_at_swap(struct sf_conn *c, int from, int to) {
    if (opts_recorded(c) & OPT(OPT_RCVLOWAT))
        copy_opt(from, to, OPT_RCVLOWAT);
}

void sf_copy_sockopts_early(struct sf_conn *c, int from, int to) {
    unsigned m = opts_to_copy(c, from);
    for (int i = 0; i <= OPT_CONGESTION; i++)
        if (m & OPT(i))
            copy_opt(from, to, i);
    /* Buffer sizes only when the application fixed them: setting one turns off the kernel's
     * autotuning, which would cost a default socket its throughput. The kernel reports twice
     * the value that was set. */
    if (c->buf_locked) {
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
    sf_copy_sockopts_at_swap(c, fd, host);
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
     * write(host) right now (writes went there since the commit): sf_release_host_fd. */
    /* The mark first: a wait that begins between the two must not find the process quiet
     * (no switch in transition, none recent), which would spare it a look at its events. */
    atomic_store(&sf_last_swap_ms, sf_now_ms());
    sf_set_phase(c, SF_P_HOST);
    __atomic_store_n(&c->host_fd, -1, __ATOMIC_SEQ_CST);
    sf_rd_host_drop(c); /* readers now find the host socket on c->fd */
    sf_release_host_fd(c, host);
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
