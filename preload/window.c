/* window.c -- how long the application's data calls take while their connection switches.
 *
 * docs/performance.md sets a target for it: the longest data call during a switch is no longer
 * than the overlay's own p99.9 latency. The window opens when this end decides to switch (its
 * threshold reached, or a peer's claim accepted: when decided_us is set) and closes when the
 * host socket is in place, or when the attempt ends without that (aborted, broken, pinned, the
 * fd closed). Every data call that begins inside it is timed for its whole duration, waiting
 * for the peer included, even if it returns after the close: a blocking read that meets the
 * overlay's FIN, swaps, and then waits on the host socket is exactly the call the target is
 * about. So the report waits for the window's last call in flight; then the agent sends
 * SWITCH_CALLS (longest call, calls timed, how the window closed) to the router.
 *
 * Only calls whose phase says a window may be open get here (sf_window_maybe_open): the others
 * pay neither this lock nor a clock read. */
#include <arpa/inet.h>
#include <errno.h>
#include <string.h>

#include "sf_core.h"

static void send_report(const struct sf_msg *m) {
    SF_LOG("port %u->%u: switch window closed (status %u): %llu calls timed, longest %llu us",
           ntohs(m->local_port), ntohs(m->remote_port), m->status, (unsigned long long)m->arg2,
           (unsigned long long)m->arg);
    sf_router_report(m);
}

/* Caller holds c->tmu. */
static void take_report(struct sf_conn *c, struct sf_msg *out) {
    c->win_report = 0;
    *out = c->win_msg;
    out->arg = c->win_max_us;
    out->arg2 = c->win_calls;
}

void sf_window_open(struct sf_conn *c) {
    struct sf_msg m;
    int flush = 0;
    pthread_mutex_lock(&c->tmu);
    if (c->win_open) {
        /* One window per switch: a claim for a switch this end had decided itself, or slim's
         * retry, continues it. */
        pthread_mutex_unlock(&c->tmu);
        return;
    }
    if (c->win_report) {
        /* A call of the previous window is still in flight (a blocking read, say): report that
         * window without it rather than mix two attempts in one figure. */
        take_report(c, &m);
        flush = 1;
    }
    c->win_id++;
    __atomic_store_n(&c->win_open, 1, __ATOMIC_RELAXED);
    c->win_inflight = 0;
    c->win_calls = 0;
    c->win_max_us = 0;
    pthread_mutex_unlock(&c->tmu);
    if (flush)
        send_report(&m);
}

void sf_window_close(struct sf_conn *c, int status) {
    struct sf_msg m;
    int now = 0;
    /* Every close and new socket comes here; most never had a window. One opening right now
     * races with this close as it would with the locked check (the application is closing an
     * fd another of its threads is using). */
    if (!__atomic_load_n(&c->win_open, __ATOMIC_RELAXED))
        return;
    pthread_mutex_lock(&c->tmu);
    if (c->win_open) {
        __atomic_store_n(&c->win_open, 0, __ATOMIC_RELAXED);
        /* Without its addresses (closed before it was ever connected) there is nothing to name
         * the connection by, and the router never heard of it either. */
        if (c->have_addrs) {
            memset(&c->win_msg, 0, sizeof c->win_msg);
            c->win_msg.magic = SF_MSG_MAGIC;
            c->win_msg.type = SF_SWITCH_CALLS;
            c->win_msg.status = (uint16_t)status;
            c->win_msg.local_ip = c->local.sin_addr.s_addr;
            c->win_msg.remote_ip = c->remote.sin_addr.s_addr;
            c->win_msg.local_port = c->local.sin_port;
            c->win_msg.remote_port = c->remote.sin_port;
            if (c->win_inflight == 0) {
                take_report(c, &m);
                now = 1;
            } else {
                c->win_report = 1;
            }
        }
    }
    pthread_mutex_unlock(&c->tmu);
    if (now)
        send_report(&m);
}

/* Every phase change within a connection's life goes through sf_set_phase (phase.c), so this is
 * where the window learns how the switch ended; a closed connection's window is closed by
 * sf_slot_reset. The status is what the router is told (docs/wire.md, SWITCH_CALLS). */
void sf_window_phase(struct sf_conn *c, int old, int phase) {
    int status;
    if (phase == SF_P_HOST)
        status = SF_OK;
    else if (phase == SF_P_BROKEN)
        status = SF_PEER_UNREACHABLE; /* the host connection died after this end committed */
    else if (phase > SF_P_PINNED)
        return; /* still switching */
    else if (old >= SF_P_REQUESTED)
        status = c->last_status != SF_OK ? c->last_status : SF_INTERNAL; /* the abort's */
    else
        status = SF_NO_ROUTE; /* pinned before the router was asked: not switchable */
    sf_window_close(c, status);
}

int sf_window_enter(struct sf_conn *c, struct sf_timed *t) {
    pthread_mutex_lock(&c->tmu);
    int open = c->win_open;
    if (open) {
        t->id = c->win_id;
        c->win_inflight++;
        c->win_calls++;
    }
    pthread_mutex_unlock(&c->tmu);
    if (open)
        t->start_us = sf_now_us();
    return open;
}

void sf_window_leave(struct sf_conn *c, const struct sf_timed *t) {
    uint64_t took = sf_now_us() - t->start_us;
    struct sf_msg m;
    int due = 0;
    int saved = errno; /* the application reads the call's errno after us */
    pthread_mutex_lock(&c->tmu);
    /* A newer window has begun meanwhile: it already reported this call's one without it. */
    if (t->id == c->win_id) {
        if (took > c->win_max_us)
            c->win_max_us = took;
        if (--c->win_inflight == 0 && c->win_report) {
            take_report(c, &m);
            due = 1;
        }
    }
    pthread_mutex_unlock(&c->tmu);
    if (due)
        send_report(&m);
    errno = saved;
}

/* Only the forking thread lives on in the child, and the parent reports its own switches. */
void sf_window_after_fork_child(struct sf_conn *c) {
    pthread_mutex_init(&c->tmu, NULL);
    __atomic_store_n(&c->win_open, 0, __ATOMIC_RELAXED);
    c->win_report = 0;
    c->win_inflight = 0;
}
