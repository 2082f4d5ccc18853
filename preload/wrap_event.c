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

SF_EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev) {
    sf_ensure_init();
    struct sf_conn *c = sf_slot(fd);
    int kind = c ? atomic_load_explicit(&c->kind, memory_order_relaxed) : SF_NONE;
    if (kind != SF_SOCK && kind != SF_CONN)
        return real.epoll_ctl(epfd, op, fd, ev);
    /* Under c->mu so a swap never runs between the kernel's change and our record of it. */
    pthread_mutex_lock(&c->mu);
    int rc = real.epoll_ctl(epfd, op, fd, ev);
    int err = errno;
    if (rc == 0)
        sf_epreg_record_locked(c, op, epfd, ev);
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
        sf_for_each_conn(settle_one, NULL);
        errno = err;
    }
}

static int after_epoll_wait(int epfd, struct epoll_event *evs, int n) {
    if (n > 0 && SF_UNLIKELY(atomic_load_explicit(&sf_oneshot_regs, memory_order_relaxed) > 0)) {
        int err = errno;
        sf_epreg_mark_fired(epfd, evs, n);
        errno = err;
    }
    return n;
}

SF_EXPORT int epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout) {
    sf_ensure_init();
    settle();
    return after_epoll_wait(epfd, evs, real.epoll_wait(epfd, evs, max, timeout));
}

SF_EXPORT int epoll_pwait(int epfd, struct epoll_event *evs, int max, int timeout,
                          const sigset_t *mask) {
    sf_ensure_init();
    settle();
    return after_epoll_wait(epfd, evs, real.epoll_pwait(epfd, evs, max, timeout, mask));
}

SF_EXPORT int epoll_pwait2(int epfd, struct epoll_event *evs, int max,
                           const struct timespec *timeout, const sigset_t *mask) {
    sf_ensure_init();
    if (real.epoll_pwait2 == NULL) {
        errno = ENOSYS;
        return -1;
    }
    settle();
    return after_epoll_wait(epfd, evs, real.epoll_pwait2(epfd, evs, max, timeout, mask));
}

SF_EXPORT int poll(struct pollfd *fds, nfds_t n, int timeout) {
    sf_ensure_init();
    settle();
    return real.poll(fds, n, timeout);
}

SF_EXPORT int __poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t fdslen) {
    sf_ensure_init();
    settle();
    return real.poll_chk(fds, n, timeout, fdslen);
}

SF_EXPORT int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *timeout,
                    const sigset_t *mask) {
    sf_ensure_init();
    settle();
    return real.ppoll(fds, n, timeout, mask);
}

SF_EXPORT int select(int n, fd_set *r, fd_set *w, fd_set *e, struct timeval *timeout) {
    sf_ensure_init();
    settle();
    return real.select(n, r, w, e, timeout);
}

SF_EXPORT int pselect(int n, fd_set *r, fd_set *w, fd_set *e, const struct timespec *timeout,
                      const sigset_t *mask) {
    sf_ensure_init();
    settle();
    return real.pselect(n, r, w, e, timeout, mask);
}
