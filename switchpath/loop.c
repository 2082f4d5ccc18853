/* loop.c -- the switch path's one thread: epoll, timers, and the end-of-round work.
 *
 * Why one thread and one lock: the decisions that keep one host connection per overlay
 * connection all read and write the in-progress table, so exactly one thread runs them, as the
 * Python router ran them on its event loop. Python's calls (api.c) take the same lock; the loop
 * drops it only while it sleeps, and an API call wakes it (eventfd) so that a new deadline or a
 * new table is seen at once.
 * Why frees wait for the end of the round: one epoll round returns events for many objects, and
 * handling one (a claim answered, a client closed) may end another whose event is still in the
 * batch. A dead object's io kind is 0 and its event is skipped; it is freed after the round.
 * Why epoll_pwait2: timers are kept in µs (a claim is asked again 0.5 ms after all said
 * NOT_MINE), and epoll_wait's millisecond timeout rounded each of them up to the next
 * millisecond: the 0.5 ms came after 1 ms. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "sfs.h"

#define TICK_US 1000000u
#define MAX_EVENTS 256

int io_watch(struct sfs *s, struct sfs_io *io, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = io};
    int op = io->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    if (io->events == events)
        return 0;
    if (epoll_ctl(s->epfd, op, io->fd, &ev) < 0)
        return -1;
    io->events = events;
    return 0;
}

void io_unwatch(struct sfs *s, struct sfs_io *io)
{
    if (io->events && io->fd >= 0)
        epoll_ctl(s->epfd, EPOLL_CTL_DEL, io->fd, NULL);
    io->events = 0;
}

void sfs_defer_free(struct sfs *s, void *p, struct sfs_io *io)
{
    io->kind = 0;
    if (s->ngrave == s->capgrave) {
        size_t cap = s->capgrave ? s->capgrave * 2 : 64;
        void **g = realloc(s->grave, cap * sizeof(*g));
        if (g == NULL) {
            /* cannot defer: leaking one object beats freeing one an event may still name */
            return;
        }
        s->grave = g;
        s->capgrave = cap;
    }
    s->grave[s->ngrave++] = p;
}

void sfs_wakeup(struct sfs *s)
{
    uint64_t one = 1;
    ssize_t n = write(s->wake_w, &one, sizeof(one));
    (void)n; /* a full eventfd is awake already */
}

static void tick(struct sfs *s, struct sfs_timer *t)
{
    done_expire(s);
    pool_maintain(s);
    timer_arm(s, t, now_us() + TICK_US);
}

static void dispatch(struct sfs *s, struct epoll_event *ev)
{
    struct sfs_io *io = ev->data.ptr;
    switch (io->kind) {
    case IO_WAKE: {
        uint64_t v;
        ssize_t n = read(io->fd, &v, sizeof(v));
        (void)n;
        return;
    }
    case IO_LISTENER:
        peers_accept(s);
        return;
    case IO_CLIENT: {
        struct sfs_client *c = (struct sfs_client *)io;
        if (ev->events & EPOLLOUT)
            client_writable(s, c);
        if (io->kind == IO_CLIENT && (ev->events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
            client_readable(s, c);
        return;
    }
    case IO_PEER:
        peer_event(s, (struct sfs_peerconn *)io, ev->events);
        return;
    default:
        return; /* ended earlier in this round */
    }
}

static void end_of_round(struct sfs *s)
{
    if (s->map_dirty) {
        s->map_dirty = 0;
        s->map_gen++;
        s->map_asked = 0;
        switch_map_updated(s);
        peers_map_updated(s);
    }
    uint64_t now = now_us();
    while (s->nheap > 0 && s->heap[0]->at <= now) {
        struct sfs_timer *t = s->heap[0];
        timer_disarm(s, t);
        t->fire(s, t);
    }
    for (size_t i = 0; i < s->ngrave; i++)
        free(s->grave[i]);
    s->ngrave = 0;
}

#define MAX_WAIT_US 60000000u

/* How long the loop may sleep: until the earliest timer, NULL for no timer. */
static struct timespec *next_timeout(struct sfs *s, struct timespec *ts)
{
    if (s->nheap == 0)
        return NULL;
    uint64_t now = now_us(), at = s->heap[0]->at;
    uint64_t us = at <= now ? 0 : at - now;
    if (us > MAX_WAIT_US)
        us = MAX_WAIT_US;
    ts->tv_sec = (time_t)(us / 1000000u);
    ts->tv_nsec = (long)(us % 1000000u) * 1000;
    return ts;
}

/* epoll_pwait2, or on a kernel older than 5.11 epoll_wait with the timeout rounded up to ms. */
static int wait_events(struct sfs *s, struct epoll_event *evs, const struct timespec *ts)
{
    static int no_pwait2;
    if (!no_pwait2) {
        int n = epoll_pwait2(s->epfd, evs, MAX_EVENTS, ts, NULL);
        if (n >= 0 || errno != ENOSYS)
            return n;
        no_pwait2 = 1;
    }
    int ms = ts == NULL ? -1 : (int)(ts->tv_sec * 1000 + (ts->tv_nsec + 999999) / 1000000);
    return epoll_wait(s->epfd, evs, MAX_EVENTS, ms);
}

void *sfs_loop(void *arg);
void *sfs_loop(void *arg)
{
    struct sfs *s = arg;
    struct epoll_event evs[MAX_EVENTS];
    pthread_mutex_lock(&s->lock);
    timer_init(&s->tick, tick);
    timer_arm(s, &s->tick, now_us() + TICK_US);
    while (!s->stopping) {
        struct timespec ts;
        const struct timespec *timeout = next_timeout(s, &ts);
        pthread_mutex_unlock(&s->lock);
        int n = wait_events(s, evs, timeout);
        pthread_mutex_lock(&s->lock);
        s->log_batching = 1;
        for (int i = 0; i < n; i++)
            dispatch(s, &evs[i]);
        end_of_round(s);
        log_flush(s);
        s->log_batching = 0; /* Python's calls between rounds log at once */
    }
    timer_disarm(s, &s->tick);
    pthread_mutex_unlock(&s->lock);
    return NULL;
}
