/* wrap_event.c -- epoll, poll and select.
 *
 * epoll_ctl is recorded for every tracked socket, because the swap must re-register the new
 * socket in every epoll instance with the same events and 64-bit data (nginx and ab store
 * pointers there). The waits only do work while a switch is under way: a connection that has
 * reached its switch point is swapped before the kernel is asked, so the wait sees the host
 * socket; and fired EPOLLONESHOT registrations are noted so the swap does not re-arm them. */
#include <errno.h>

#include "sf_core.h"

static void mark_epoll(int fd) {
    struct sf_conn *c = fd >= 0 ? sf_slot_alloc(fd) : NULL;
    if (c != NULL) {
        pthread_mutex_lock(&c->mu);
        sf_slot_reset(c);
        atomic_store(&c->kind, SF_EPOLL);
        pthread_mutex_unlock(&c->mu);
    }
}

SF_EXPORT int epoll_create(int size) {
    sf_ensure_init();
    int fd = real.epoll_create(size);
    if (sf_cfg.enabled)
        mark_epoll(fd);
    return fd;
}

SF_EXPORT int epoll_create1(int flags) {
    sf_ensure_init();
    int fd = real.epoll_create1(flags);
    if (sf_cfg.enabled)
        mark_epoll(fd);
    return fd;
}

/* The records serve a swap still to come, and the event fixes of the first moments after one
 * (fix_conn_events). A PINNED connection has neither; a HOST one only while a swap is recent.
 * Past that, nothing reads them again until the fd number is closed: drop them once, then the
 * call is the real one (an event loop that changes its interest at every request, as redis
 * does, pays no lock for it on a switched connection). BROKEN keeps them: a FIN still owed
 * takes them off at the close (forget_fd). */
static inline int records_retired(int phase) {
    return phase == SF_P_PINNED ||
           (phase == SF_P_HOST &&
            atomic_load_explicit(&sf_last_swap_ms, memory_order_relaxed) == 0);
}

static SF_NOINLINE void drop_records(struct sf_conn *c) {
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < c->n_regs; i++)
        if (c->regs[i].events & EPOLLONESHOT)
            atomic_fetch_sub(&sf_oneshot_regs, 1);
    c->n_regs = 0;
    pthread_mutex_unlock(&c->mu);
}

SF_EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev) {
    sf_ensure_init();
    struct sf_conn *c = sf_slot(fd);
    int kind = c ? atomic_load_explicit(&c->kind, memory_order_acquire) : SF_NONE;
    if (kind != SF_SOCK && kind != SF_CONN)
        return real.epoll_ctl(epfd, op, fd, ev);
    if (kind == SF_CONN &&
        records_retired(atomic_load_explicit(&c->phase, memory_order_relaxed))) {
        if (SF_UNLIKELY(c->n_regs != 0))
            drop_records(c);
        return real.epoll_ctl(epfd, op, fd, ev);
    }
    /* Under c->mu so a swap never runs between the kernel's change and our record of it (in a
     * process of one thread, no swap can). */
    int sole = sf_sole_thread();
    if (!sole)
        pthread_mutex_lock(&c->mu);
    int rc = real.epoll_ctl(epfd, op, fd, ev);
    int err = errno;
    if (rc == 0 && sf_epreg_record_locked(c, op, epfd, ev) != 0 && op == EPOLL_CTL_ADD) {
        /* Mid-switch with no memory to remember it for the swap: refused, as the kernel
         * refuses one it has no memory for, rather than lost at the swap. */
        real.epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
        rc = -1;
        err = ENOMEM;
    }
    if (!sole)
        pthread_mutex_unlock(&c->mu);
    errno = err;
    return rc;
}

static void settle_one(struct sf_conn *c, void *arg) {
    (void)arg;
    if (atomic_load(&c->kind) == SF_CONN && atomic_load(&c->phase) == SF_P_COMMITTED &&
        c->peer_synced)
        sf_maybe_swap(c);
}

/* Swap every connection that is at its switch point, so the wait watches the right socket. */
static void settle(void) {
    if (SF_UNLIKELY(atomic_load_explicit(&sf_in_transition, memory_order_relaxed) > 0)) {
        int err = errno;
        sf_for_each_switching(settle_one, NULL);
        errno = err;
    }
}

struct fix_arg {
    int epfd;
    struct epoll_event *evs;
    int n;
    uint64_t now;
};

/* No switch under way, none recent: the waits have nothing to fix. */
static inline int quiet(void) {
    return atomic_load_explicit(&sf_in_transition, memory_order_relaxed) == 0 &&
           atomic_load_explicit(&sf_last_swap_ms, memory_order_relaxed) == 0;
}

/* Events need a second look while a switch is under way, and just after one. Two loads
 * otherwise: the clock is read only while a swap is recent, and the mark of the last swap is
 * cleared once it is not, so a process whose switches are over reads no clock here at all. */
static int events_need_fixing(uint64_t *now) {
    if (SF_LIKELY(quiet()))
        return 0;
    if (atomic_load_explicit(&sf_in_transition, memory_order_relaxed) > 0) {
        *now = sf_now_ms();
        return 1;
    }
    uint64_t last = atomic_load_explicit(&sf_last_swap_ms, memory_order_relaxed);
    if (SF_LIKELY(last == 0))
        return 0;
    *now = sf_now_ms();
    if (sf_recent_ms(last, *now))
        return 1;
    /* Fails if another swap came meanwhile: its mark stays. */
    atomic_compare_exchange_strong(&sf_last_swap_ms, &last, 0);
    return 0;
}

static void fix_conn_events(struct sf_conn *c, void *arg) {
    struct fix_arg *a = arg;
    int phase = atomic_load(&c->phase);
    int recent = sf_swapped_recently(c, a->now);
    if (atomic_load(&c->kind) != SF_CONN || (!sf_phase_in_handoff(phase) && !recent))
        return;
    for (int i = 0; i < c->n_regs; i++) {
        if (c->regs[i].epfd != a->epfd)
            continue;
        for (int k = 0; k < a->n; k++) {
            if (a->evs[k].data.u64 != c->regs[i].data.u64)
                continue;
            uint32_t ev = recent ? sf_recheck_ready(c, a->evs[k].events, c->regs[i].events)
                                 : sf_settle_ready(c, a->evs[k].events, c->regs[i].events);
            if (ev == 0)
                a->evs[k--] = a->evs[--a->n];
            else
                a->evs[k].events = ev;
        }
    }
}

static SF_NOINLINE int fix_epoll_events(int epfd, struct epoll_event *evs, int n) {
    int err = errno;
    uint64_t now = 0;
    if (SF_UNLIKELY(events_need_fixing(&now))) {
        struct fix_arg a = {epfd, evs, n, now};
        sf_for_each_switching(fix_conn_events, &a);
        n = a.n;
    }
    if (SF_UNLIKELY(atomic_load_explicit(&sf_oneshot_regs, memory_order_relaxed) > 0))
        sf_epreg_mark_fired(epfd, evs, n);
    errno = err;
    return n;
}

/* Runs after every wait that returned events; costs two loads unless a switch is under way or
 * recent, or an EPOLLONESHOT registration is recorded. */
static inline int after_epoll_wait(int epfd, struct epoll_event *evs, int n) {
    if (n <= 0 || (SF_LIKELY(quiet()) &&
                   atomic_load_explicit(&sf_oneshot_regs, memory_order_relaxed) == 0))
        return n;
    return fix_epoll_events(epfd, evs, n);
}

/* A wait retried after its stale events were dropped keeps the caller's deadline: the retry
 * waits for what is left of the timeout, not for a fresh one. That needs the time the wait
 * began, but only a wait with a timeout that may be retried: one that begins while no switch is
 * under way nor recent reads no clock (the common case, every wait of a process whose
 * connections are switched or never switch). Should a switch begin during it and drop its
 * events after all, the retry counts from that switch's start (sf_busy_since_us): later than
 * the wait's own start, so the retry may end late by the part of the wait before it, never
 * early. */
static inline uint64_t wait_start(int has_timeout) {
    if (!has_timeout || quiet())
        return 0;
    return sf_now_us();
}

static uint64_t retry_start(uint64_t start_us) {
    return start_us != 0 ? start_us : atomic_load(&sf_busy_since_us);
}

static int left_ms(int timeout, uint64_t start_us) {
    if (timeout <= 0)
        return timeout;
    uint64_t elapsed = (sf_now_us() - retry_start(start_us)) / 1000;
    return elapsed >= (uint64_t)timeout ? 0 : timeout - (int)elapsed;
}

static const struct timespec *left_ts(const struct timespec *ts, uint64_t start_us,
                                      struct timespec *buf) {
    if (ts == NULL)
        return NULL;
    uint64_t total = (uint64_t)ts->tv_sec * 1000000u + (uint64_t)ts->tv_nsec / 1000u;
    uint64_t elapsed = sf_now_us() - retry_start(start_us);
    uint64_t left = elapsed >= total ? 0 : total - elapsed;
    buf->tv_sec = (time_t)(left / 1000000u);
    buf->tv_nsec = (long)(left % 1000000u) * 1000;
    return buf;
}

/* An event dropped above must not turn a wait with no timeout into a spurious timeout. */
/* `call` is the first wait, `again` a retry's (with what is left of the timeout). */
#define EPOLL_RETRY(has_timeout, call, again)                                                     \
    do {                                                                                          \
        sf_ensure_init();                                                                         \
        uint64_t start_ = wait_start(has_timeout);                                                \
        struct timespec left_;                                                                    \
        (void)left_;                                                                              \
        for (int retry_ = 0;; retry_ = 1) {                                                       \
            settle();                                                                             \
            int n_ = retry_ ? (again) : (call);                                                   \
            int fixed_ = after_epoll_wait(epfd, evs, n_);                                         \
            if (fixed_ != 0 || n_ == 0)                                                           \
                return fixed_;                                                                    \
        }                                                                                         \
    } while (0)

SF_EXPORT int epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout) {
    EPOLL_RETRY(timeout > 0, real.epoll_wait(epfd, evs, max, timeout),
                real.epoll_wait(epfd, evs, max, left_ms(timeout, start_)));
}

SF_EXPORT int epoll_pwait(int epfd, struct epoll_event *evs, int max, int timeout,
                          const sigset_t *mask) {
    EPOLL_RETRY(timeout > 0, real.epoll_pwait(epfd, evs, max, timeout, mask),
                real.epoll_pwait(epfd, evs, max, left_ms(timeout, start_), mask));
}

SF_EXPORT int epoll_pwait2(int epfd, struct epoll_event *evs, int max,
                           const struct timespec *timeout, const sigset_t *mask) {
    if (real.epoll_pwait2 == NULL) {
        errno = ENOSYS;
        return -1;
    }
    EPOLL_RETRY(timeout != NULL, real.epoll_pwait2(epfd, evs, max, timeout, mask),
                real.epoll_pwait2(epfd, evs, max, left_ts(timeout, start_, &left_), mask));
}

/* poll's pollfd names the fd directly, so no lookup by epoll data is needed. */
static int after_poll(struct pollfd *fds, nfds_t nfds, int n) {
    uint64_t now = 0;
    if (n <= 0 || SF_LIKELY(!events_need_fixing(&now)))
        return n;
    int err = errno;
    for (nfds_t i = 0; i < nfds; i++) {
        struct sf_conn *c = fds[i].revents ? sf_tracked(fds[i].fd) : NULL;
        if (c == NULL)
            continue;
        uint32_t ev = sf_swapped_recently(c, now)
                          ? sf_recheck_ready(c, (uint16_t)fds[i].revents, (uint16_t)fds[i].events)
                          : sf_settle_ready(c, (uint16_t)fds[i].revents, (uint16_t)fds[i].events);
        fds[i].revents = (short)ev;
        if (ev == 0)
            n--;
    }
    errno = err;
    return n;
}

#define POLL_RETRY(has_timeout, call, again)                                                      \
    do {                                                                                          \
        sf_ensure_init();                                                                         \
        uint64_t start_ = wait_start(has_timeout);                                                \
        struct timespec left_;                                                                    \
        (void)left_;                                                                              \
        for (int retry_ = 0;; retry_ = 1) {                                                       \
            settle();                                                                             \
            int n_ = retry_ ? (again) : (call);                                                   \
            int fixed_ = after_poll(fds, n, n_);                                                  \
            if (fixed_ != 0 || n_ == 0)                                                           \
                return fixed_;                                                                    \
        }                                                                                         \
    } while (0)

SF_EXPORT int poll(struct pollfd *fds, nfds_t n, int timeout) {
    POLL_RETRY(timeout > 0, real.poll(fds, n, timeout),
               real.poll(fds, n, left_ms(timeout, start_)));
}

SF_EXPORT int __poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t fdslen) {
    POLL_RETRY(timeout > 0, real.poll_chk(fds, n, timeout, fdslen),
               real.poll_chk(fds, n, left_ms(timeout, start_), fdslen));
}

SF_EXPORT int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *timeout,
                    const sigset_t *mask) {
    POLL_RETRY(timeout != NULL, real.ppoll(fds, n, timeout, mask),
               real.ppoll(fds, n, left_ts(timeout, start_, &left_), mask));
}

/* select's "readable" for a switching connection may be nothing but the overlay's FIN at the
 * switch point, or an event of the overlay socket the agent swapped out while select waited:
 * the application would then read the host socket and block (a blocking socket) or get EAGAIN.
 * Each such fd is settled as poll's are and kept only if really readable. Caller saved the
 * sets it passed in `in`, for a retry when nothing is left. */
struct fdsets {
    fd_set r, w, e;
};

static int after_select(int n, fd_set *r, fd_set *w, fd_set *e, int ret) {
    uint64_t now = 0;
    if (ret <= 0 || r == NULL || SF_LIKELY(!events_need_fixing(&now)))
        return ret;
    int err = errno;
    for (int fd = 0; fd < n && fd < FD_SETSIZE; fd++) {
        struct sf_conn *c = FD_ISSET(fd, r) ? sf_tracked(fd) : NULL;
        if (c == NULL)
            continue;
        uint32_t ev = sf_swapped_recently(c, now) ? sf_recheck_ready(c, EPOLLIN, EPOLLIN)
                                           : sf_settle_ready(c, EPOLLIN, EPOLLIN);
        if (ev & (EPOLLIN | EPOLLHUP | EPOLLRDHUP | EPOLLERR))
            continue;
        FD_CLR(fd, r);
        if (!(w != NULL && FD_ISSET(fd, w)) && !(e != NULL && FD_ISSET(fd, e)))
            ret--;
    }
    errno = err;
    return ret;
}

static void save_sets(struct fdsets *in, const fd_set *r, const fd_set *w, const fd_set *e) {
    if (r) in->r = *r;
    if (w) in->w = *w;
    if (e) in->e = *e;
}

static void restore_sets(const struct fdsets *in, fd_set *r, fd_set *w, fd_set *e) {
    if (r) *r = in->r;
    if (w) *w = in->w;
    if (e) *e = in->e;
}

/* select on Linux counts its timeval down itself; pselect's timeout is const. */
#define SELECT_RETRY(has_timeout, call, again)                                                    \
    do {                                                                                          \
        sf_ensure_init();                                                                         \
        uint64_t start_ = wait_start(has_timeout);                                                \
        struct timespec left_;                                                                    \
        (void)start_;                                                                             \
        (void)left_;                                                                              \
        struct fdsets in_;                                                                        \
        save_sets(&in_, r, w, e);                                                                 \
        for (int retry_ = 0;; retry_ = 1) {                                                       \
            settle();                                                                             \
            int n_ = retry_ ? (again) : (call);                                                   \
            int fixed_ = after_select(n, r, w, e, n_);                                            \
            if (fixed_ != 0 || n_ <= 0)                                                           \
                return fixed_;                                                                    \
            restore_sets(&in_, r, w, e);                                                          \
        }                                                                                         \
    } while (0)

SF_EXPORT int select(int n, fd_set *r, fd_set *w, fd_set *e, struct timeval *timeout) {
    SELECT_RETRY(0, real.select(n, r, w, e, timeout), real.select(n, r, w, e, timeout));
}

SF_EXPORT int pselect(int n, fd_set *r, fd_set *w, fd_set *e, const struct timespec *timeout,
                      const sigset_t *mask) {
    SELECT_RETRY(timeout != NULL, real.pselect(n, r, w, e, timeout, mask),
                 real.pselect(n, r, w, e, left_ts(timeout, start_, &left_), mask));
}
