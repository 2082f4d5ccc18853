/* wrap_sock.c -- the socket lifecycle: which fds are connections worth tracking, and keeping the
 * per-fd table true when the application creates, duplicates, closes and configures fds.
 *
 * Tracking starts at connect() to, or accept() from, an address inside SHUNTFLOW_OVERLAY. In slim
 * mode those two calls return only once the host socket is in place (Slim's behaviour); in
 * shuntflow mode they return at once and the data path counts. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/close_range.h>
#include <stdarg.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "sf_core.h"

static int is_tcp4(int domain, int type) {
    return domain == AF_INET && (type & 0xf) == SOCK_STREAM;
}

SF_EXPORT int socket(int domain, int type, int protocol) {
    sf_ensure_init();
    int fd = real.socket(domain, type, protocol);
    if (fd >= 0 && sf_cfg.enabled && is_tcp4(domain, type)) {
        struct sf_conn *c = sf_slot(fd);
        if (SF_UNLIKELY(c == NULL))
            c = sf_slot_alloc(fd);
        if (c != NULL && sf_slot_clean(c)) {
            /* The close of the number's last life reset it (a connect() resets its counters
             * once more): only the kind is news. */
            sf_sockopts_track(c, 0);
            atomic_store_explicit(&c->kind, SF_SOCK, memory_order_release);
        } else if (c != NULL) {
            pthread_mutex_lock(&c->mu);
            sf_slot_reset(c);
            sf_sockopts_track(c, 0);
            atomic_store(&c->kind, SF_SOCK);
            pthread_mutex_unlock(&c->mu);
        }
    }
    return fd;
}

/* Slim mode, non-blocking socket: Slim blocks here too; we wait for the overlay handshake, swap,
 * and still answer EINPROGRESS so the application's own connect-completion logic runs. */
static void slim_after_connect(struct sf_conn *c, int in_progress) {
    if (in_progress) {
        struct pollfd p = {.fd = c->fd, .events = POLLOUT};
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        /* getpeername, not SO_ERROR: reading SO_ERROR would clear the error the app must see. */
        if (real.poll(&p, 1, 10000) != 1 ||
            real.getpeername(c->fd, (struct sockaddr *)&peer, &len) != 0)
            return;
    }
    sf_agent_switch_now(c);
}

SF_EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    sf_ensure_init();
    struct sf_conn *c = sf_slot(fd);
    int kind = c ? atomic_load(&c->kind) : SF_NONE;
    if (kind == SF_CONN && atomic_load(&c->phase) == SF_P_HOST && c->via_connect &&
        !c->connect_reported) {
        /* Second connect() after EINPROGRESS (hiredis, APR): the host socket is connected. */
        c->connect_reported = 1;
        return 0;
    }
    if (kind != SF_SOCK || !sf_is_overlay_addr(addr))
        return real.connect(fd, addr, len);
    int rc = real.connect(fd, addr, len);
    int err = errno;
    if (rc == 0 || err == EINPROGRESS) {
        sf_conn_start(c, addr, 1);
        if (sf_cfg.mode == SF_MODE_SLIM) {
            slim_after_connect(c, rc != 0);
            c->connect_reported = rc == 0;
        }
    }
    errno = err;
    return rc;
}

static int listener_is_tcp4(int fd) {
    struct sf_conn *l = sf_slot(fd);
    if (l != NULL && atomic_load(&l->kind) == SF_SOCK)
        return 1;
    int domain = 0, type = 0;
    socklen_t len = sizeof domain;
    if (real.getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0)
        return 0;
    len = sizeof type;
    if (real.getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || !is_tcp4(domain, type))
        return 0;
    /* A listener inherited from before the library was loaded, or received from another
     * process: remember it, its options unknown. */
    l = sf_slot_alloc(fd);
    if (l != NULL) {
        sf_sockopts_unknown(fd);
        atomic_store(&l->kind, SF_SOCK);
    }
    return 1;
}

static int track_accepted(int lfd, int fd, struct sockaddr *addr, socklen_t *addrlen) {
    if (fd < 0 || !sf_cfg.enabled || !listener_is_tcp4(lfd))
        return fd;
    struct sockaddr_in peer;
    const struct sockaddr *known = NULL;
    if (addr != NULL && addrlen != NULL && *addrlen >= sizeof peer) {
        known = addr;
    } else if (sf_cfg.mode == SF_MODE_SLIM || SF_UNLIKELY(sf_claims_refused_live())) {
        socklen_t pl = sizeof peer;
        if (real.getpeername(fd, (struct sockaddr *)&peer, &pl) == 0)
            known = (struct sockaddr *)&peer;
    }
    struct sf_conn *c = sf_slot(fd);
    if (SF_UNLIKELY(c == NULL) && (c = sf_slot_alloc(fd)) == NULL)
        return fd;
    struct sf_conn *l = sf_slot(lfd);
    uint8_t buf_locked = l != NULL && l->buf_locked;
    uint16_t opts = sf_sockopts_inherited(l); /* an accepted socket starts with its listener's */
    if (sf_slot_clean(c)) {
        c->buf_locked = buf_locked; /* nobody else looks at a slot of kind SF_NONE */
        sf_sockopts_track(c, opts);
        atomic_store_explicit(&c->kind, SF_SOCK, memory_order_release);
    } else {
        pthread_mutex_lock(&c->mu);
        sf_slot_reset(c);
        sf_sockopts_track(c, opts);
        atomic_store(&c->kind, SF_SOCK);
        c->buf_locked = buf_locked;
        pthread_mutex_unlock(&c->mu);
    }
    if (known != NULL && !sf_is_overlay_addr(known))
        return fd;
    sf_conn_start(c, known, 0);
    if (sf_cfg.mode == SF_MODE_SLIM) {
        sf_agent_switch_now(c);
    } else if (sf_cfg.mode == SF_MODE_SHUNTFLOW && SF_UNLIKELY(sf_claims_refused_live()) &&
               sf_claim_was_refused(known)) {
        /* Its peer asked to switch it before we accepted it (router.c note_refused_claim). */
        atomic_store(&c->next_trigger, UINT32_MAX);
        sf_agent_trigger(c);
    }
    return fd;
}

SF_EXPORT int accept(int fd, struct sockaddr *addr, socklen_t *addrlen) {
    sf_ensure_init();
    int nfd = real.accept(fd, addr, addrlen);
    int err = errno;
    nfd = track_accepted(fd, nfd, addr, addrlen);
    errno = err;
    return nfd;
}

SF_EXPORT int accept4(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags) {
    sf_ensure_init();
    int nfd = real.accept4(fd, addr, addrlen, flags);
    int err = errno;
    nfd = track_accepted(fd, nfd, addr, addrlen);
    errno = err;
    return nfd;
}

/* ---- forgetting fds ------------------------------------------------------------------------- */

/* The fd number is about to stop naming what we tracked (close, or dup2 over it). */
static void forget_fd(int fd) {
    struct sf_conn *c = sf_slot(fd);
    if (c == NULL)
        return;
    int kind = atomic_load(&c->kind);
    if (kind == SF_NONE || kind == SF_PRIVATE)
        return;
    if (kind == SF_EPOLL)
        sf_epreg_drop_epfd(fd);
    if (kind == SF_CONN)
        SF_LOG("fd %d (port %u->%u): closed in phase %d after %u counted data calls, overlay "
               "%llu bytes, host %llu bytes", fd, ntohs(c->local.sin_port),
               ntohs(c->remote.sin_port), atomic_load(&c->phase), atomic_load(&c->calls),
               (unsigned long long)sf_overlay_bytes(c), (unsigned long long)sf_host_bytes(c));
    /* The process's only thread: nobody else can hold c->mu, and no switch left a host
     * connection, a readers' number or an owed FIN behind (they take the agent, a thread). */
    int sole = sf_sole_thread();
    if (!sole)
        pthread_mutex_lock(&c->mu);
    /* fin.c's copy keeps the overlay socket open past this close, and with it the epoll
     * registrations of this number, which would go on reporting a closed fd. */
    if (kind == SF_CONN && c->fin_owed && atomic_load(&c->phase) != SF_P_HOST)
        for (int i = 0; i < c->n_regs; i++)
            real.epoll_ctl(c->regs[i].epfd, EPOLL_CTL_DEL, fd, NULL);
    /* The host connection's private number goes with the fd; if a writer is in it, the writer
     * closes it on its way out (sf_wmu_unlock). Handoff frames still unread on it are consumed
     * first: closing over them would reset the connection the peer is about to read its EOF
     * from. Application bytes after them stay, and reset it as an overlay close would. */
    if (c->host_fd >= 0) {
        sf_handoff_pump_locked(c);
    }
    /* Set only under c->mu, which we hold: no exchange (a locked instruction) for none. */
    if (atomic_load_explicit(&c->rd_host, memory_order_relaxed) >= 0)
        sf_rd_host_drop(c);
    if (kind == SF_CONN && sf_broken_lost(c)) {
        SF_LOG("fd %d: closed after bytes were lost with the host connection: overlay reset",
               fd);
        sf_reset_socket(fd);
    }
    sf_linger_conn_locked(c); /* the peer's SYNC may still come */
    int host = c->host_fd;
    if (host >= 0) {
        __atomic_store_n(&c->host_fd, -1, __ATOMIC_SEQ_CST);
        sf_release_host_fd(c, host);
    }
    sf_slot_reset(c);
    if (!sole)
        pthread_mutex_unlock(&c->mu);
}

SF_EXPORT int close(int fd) {
    sf_ensure_init();
    struct sf_conn *c = sf_slot(fd);
    if (c != NULL) {
        int kind = atomic_load(&c->kind);
        if (kind == SF_PRIVATE)
            return 0; /* a close-everything loop must not take the library's own fds */
        if (kind != SF_NONE)
            forget_fd(fd);
    }
    return real.close(fd);
}

SF_EXPORT int close_range(unsigned first, unsigned last, int flags) {
    sf_ensure_init();
    if (flags & CLOSE_RANGE_CLOEXEC)
        return real.close_range(first, last, flags);
    /* Close around the library's private fds, which live at the top of the range. */
    unsigned from = first;
    for (unsigned fd = first; fd <= last && fd < (1u << 20); fd++) {
        struct sf_conn *c = sf_slot((int)fd);
        if (c == NULL) {
            fd |= 1023; /* no chunk here: skip to the next one */
            continue;
        }
        int kind = atomic_load(&c->kind);
        if (kind == SF_PRIVATE) {
            if (fd > from && real.close_range(from, fd - 1, flags) != 0)
                return -1;
            from = fd + 1;
        } else if (kind != SF_NONE) {
            forget_fd((int)fd);
        }
    }
    if (from > last)
        return 0;
    return real.close_range(from, last, flags);
}

SF_EXPORT void closefrom(int lowfd) {
    close_range(lowfd < 0 ? 0 : (unsigned)lowfd, ~0u, 0);
}

/* ---- duplicates ----------------------------------------------------------------------------- */

/* A socket reachable through two fd numbers cannot be swapped consistently: keep it on the
 * overlay. A connection that is already on the host path stays there; the new number answers
 * with the same overlay addresses. */
static void note_dup(int oldfd, int newfd) {
    struct sf_conn *c = sf_tracked(oldfd);
    if (c == NULL || newfd < 0)
        return;
    pthread_mutex_lock(&c->mu);
    int phase = atomic_load(&c->phase);
    if (phase == SF_P_OVERLAY)
        sf_set_phase(c, SF_P_PINNED);
    struct sockaddr_in local = c->local, remote = c->remote;
    int have = c->have_addrs;
    pthread_mutex_unlock(&c->mu);
    if (phase == SF_P_HOST && have) {
        struct sf_conn *d = sf_slot_alloc(newfd);
        if (d != NULL) {
            pthread_mutex_lock(&d->mu);
            sf_slot_reset(d);
            d->local = local;
            d->remote = remote;
            d->have_addrs = 1;
            sf_phase_reset(d, SF_P_HOST);
            atomic_store(&d->kind, SF_CONN);
            pthread_mutex_unlock(&d->mu);
        }
    }
}

/* The application wants a number the library is using: move ours out of the way first. */
static void make_room(int newfd) {
    if (sf_is_private(newfd))
        sf_private_move(newfd);
    forget_fd(newfd);
}

SF_EXPORT int dup(int oldfd) {
    sf_ensure_init();
    int fd = real.dup(oldfd);
    if (fd >= 0) {
        forget_fd(fd);
        note_dup(oldfd, fd);
    }
    return fd;
}

SF_EXPORT int dup2(int oldfd, int newfd) {
    sf_ensure_init();
    if (oldfd == newfd)
        return real.dup2(oldfd, newfd);
    make_room(newfd);
    int fd = real.dup2(oldfd, newfd);
    if (fd >= 0)
        note_dup(oldfd, fd);
    return fd;
}

SF_EXPORT int dup3(int oldfd, int newfd, int flags) {
    sf_ensure_init();
    if (oldfd != newfd)
        make_room(newfd);
    int fd = real.dup3(oldfd, newfd, flags);
    if (fd >= 0)
        note_dup(oldfd, fd);
    return fd;
}

/* ---- flags and options: mirrored onto the host connection while writes go there ------------- */

static int host_fd_if_committed(struct sf_conn *c) {
    return sf_phase_in_handoff(atomic_load(&c->phase)) ? c->host_fd : -1;
}

/* O_NONBLOCK changes must not interleave with a swap, which reads the old socket's flags and
 * sets them on the new one: lock out the swap while the flag changes, and while writes go to the
 * host connection, change it there too. Returns the locked connection, or NULL. */
static struct sf_conn *lock_for_flags(int fd) {
    struct sf_conn *c = sf_tracked(fd);
    /* In a process of one thread no switch is under way: no host connection to change too, no
     * swap to lock out. */
    if (c == NULL || sf_phase_final(atomic_load(&c->phase)) || sf_sole_thread())
        return NULL;
    pthread_mutex_lock(&c->mu);
    return c;
}

static void mirror_nonblock_locked(struct sf_conn *c) {
    int host = host_fd_if_committed(c);
    int fl = real.fcntl(c->fd, F_GETFL);
    int hfl = host >= 0 ? real.fcntl(host, F_GETFL) : -1;
    if (fl >= 0 && hfl >= 0)
        real.fcntl(host, F_SETFL, (hfl & ~O_NONBLOCK) | (fl & O_NONBLOCK));
}

static int fcntl_common(int fd, int cmd, void *arg, int (*fn)(int, int, ...)) {
    struct sf_conn *c = cmd == F_SETFL ? lock_for_flags(fd) : NULL;
    int rc = fn(fd, cmd, arg);
    int err = errno;
    if (c != NULL) {
        if (rc == 0)
            mirror_nonblock_locked(c);
        pthread_mutex_unlock(&c->mu);
    }
    if (rc >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)) {
        forget_fd(rc);
        note_dup(fd, rc);
    }
    errno = err;
    return rc;
}

SF_EXPORT int fcntl(int fd, int cmd, ...) {
    sf_ensure_init();
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return fcntl_common(fd, cmd, arg, real.fcntl);
}

SF_EXPORT int fcntl64(int fd, int cmd, ...) {
    sf_ensure_init();
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return fcntl_common(fd, cmd, arg, real.fcntl64);
}

SF_EXPORT int ioctl(int fd, sf_ioctl_req request, ...) {
    sf_ensure_init();
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    /* nginx sets O_NONBLOCK this way */
    struct sf_conn *c = request == FIONBIO ? lock_for_flags(fd) : NULL;
    int rc = real.ioctl(fd, request, arg);
    if (c != NULL) {
        int err = errno;
        if (rc == 0)
            mirror_nonblock_locked(c);
        pthread_mutex_unlock(&c->mu);
        errno = err;
    }
    return rc;
}

SF_EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len) {
    sf_ensure_init();
    /* The option is recorded first, and even if the call fails (it may have changed something
     * all the same): the copy made when the host connection arrives (swap.c, under c->mu)
     * then either sees the bit and reads the value, or came before this call's lock, and the
     * call mirrors the change onto the host connection below. */
    unsigned bit = sf_sockopt_bit(level, name);
    int buf = level == SOL_SOCKET && (name == SO_SNDBUF || name == SO_RCVBUF);
    struct sf_conn *s = bit || buf ? sf_slot(fd) : NULL;
    int kind = s ? atomic_load(&s->kind) : SF_NONE;
    if ((kind == SF_SOCK || kind == SF_CONN) && bit) {
        if (sf_sole_thread()) /* nobody else can set one: no locked instruction */
            atomic_store_explicit(&s->opts_set,
                                  atomic_load_explicit(&s->opts_set, memory_order_relaxed) | bit,
                                  memory_order_relaxed);
        else
            atomic_fetch_or(&s->opts_set, (uint16_t)bit);
    }
    /* Like the flags: a change must not fall between the commit's or the swap's copy of the
     * options and their switch of socket, or the host connection keeps the old value (a
     * TCP_CORK left on stalls every later response). */
    struct sf_conn *c = lock_for_flags(fd);
    int rc = real.setsockopt(fd, level, name, val, len);
    int err = errno;
    if (c != NULL) {
        /* From the moment the host connection is there (the agent copied the options then),
         * but a few only from the commit or the swap (swap.c says why). */
        int host = sf_sockopt_mirrored(level, name, atomic_load(&c->phase)) ? c->host_fd : -1;
        if (rc == 0 && host >= 0)
            real.setsockopt(host, level, name, val, len);
        pthread_mutex_unlock(&c->mu);
    }
    if (buf && rc == 0 && (kind == SF_SOCK || kind == SF_CONN))
        s->buf_locked = 1;
    errno = err;
    return rc;
}

SF_EXPORT int shutdown(int fd, int how) {
    sf_ensure_init();
    struct sf_conn *c = sf_tracked(fd);
    if (c == NULL)
        return real.shutdown(fd, how);
    int phase = atomic_load(&c->phase);
    if (phase == SF_P_HOST || phase == SF_P_PINNED)
        return real.shutdown(fd, how);
    /* Quiesce writes so the shutdown lands at a definite S in the stream. */
    pthread_mutex_lock(&c->wmu);
    pthread_mutex_lock(&c->mu);
    int rc;
    if (how != SHUT_RD)
        c->app_shut_wr = 1;
    if (atomic_load(&c->phase) == SF_P_COMMITTED && c->host_fd >= 0) {
        /* The overlay's writing side is already shut at S; reading still needs it. */
        rc = real.shutdown(c->host_fd, how);
        if (rc == 0 && how != SHUT_WR)
            real.shutdown(fd, SHUT_RD);
    } else {
        rc = real.shutdown(fd, how);
    }
    int err = errno;
    pthread_mutex_unlock(&c->mu);
    sf_wmu_unlock(c);
    if (c->commit_wanted) /* the agent's commit request arrived while we held c->wmu */
        sf_handoff_request_commit(c);
    errno = err;
    return rc;
}

/* After the swap the kernel would answer with host addresses, and during the handoff the
 * overlay socket may already be closed by the FIN exchange: keep answering the overlay ones. */
static int overlay_name(int fd, struct sockaddr *addr, socklen_t *len, int peer) {
    struct sf_conn *c = sf_tracked(fd);
    if (c == NULL || atomic_load(&c->phase) < SF_P_HANDSHAKE || !c->have_addrs || len == NULL)
        return peer ? real.getpeername(fd, addr, len) : real.getsockname(fd, addr, len);
    const struct sockaddr_in *src = peer ? &c->remote : &c->local;
    socklen_t n = *len < sizeof *src ? *len : (socklen_t)sizeof *src;
    memcpy(addr, src, n);
    *len = sizeof *src;
    return 0;
}

SF_EXPORT int getpeername(int fd, struct sockaddr *addr, socklen_t *len) {
    sf_ensure_init();
    return overlay_name(fd, addr, len, 1);
}

SF_EXPORT int getsockname(int fd, struct sockaddr *addr, socklen_t *len) {
    sf_ensure_init();
    return overlay_name(fd, addr, len, 0);
}
