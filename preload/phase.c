/* phase.c -- the only writer of a connection's phase (phase.h has the diagram).
 *
 * One place, so that what must happen at every change does happen at every change: the count of
 * connections in transition stays true, the time of the change is noted (the agent's timeouts,
 * the event wrappers' "just swapped"), threads waiting on c->cv look again, and the switch
 * window learns how an attempt ended. A debug build (SF_DEBUG) also checks each change against
 * the table of allowed transitions and that the caller holds c->mu, and aborts with the fd and
 * both phases named: a wrong change is a bug to find in a test, not a state to run on in. */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sf_core.h"

_Atomic int sf_in_transition;
_Atomic uint64_t sf_busy_since_us;

const char *sf_phase_name(int phase) {
    static const char *const names[SF_P_COUNT] = {
        [SF_P_OVERLAY] = "OVERLAY",     [SF_P_PINNED] = "PINNED", [SF_P_REQUESTED] = "REQUESTED",
        [SF_P_HANDSHAKE] = "HANDSHAKE", [SF_P_COMMITTED] = "COMMITTED",
        [SF_P_BROKEN] = "BROKEN",       [SF_P_HOST] = "HOST",
    };
    return phase >= 0 && phase < SF_P_COUNT ? names[phase] : "?";
}

#ifdef SF_DEBUG
#define TO(p) (1u << (p))
/* phase.h's list, one row per phase: the phases it may change to. */
static const unsigned allowed[SF_P_COUNT] = {
    [SF_P_OVERLAY] = TO(SF_P_REQUESTED) | TO(SF_P_PINNED),
    [SF_P_PINNED] = 0,
    [SF_P_REQUESTED] = TO(SF_P_HANDSHAKE) | TO(SF_P_OVERLAY) | TO(SF_P_PINNED),
    [SF_P_HANDSHAKE] = TO(SF_P_COMMITTED) | TO(SF_P_OVERLAY) | TO(SF_P_BROKEN),
    [SF_P_COMMITTED] = TO(SF_P_HOST) | TO(SF_P_BROKEN) | TO(SF_P_HANDSHAKE),
    [SF_P_BROKEN] = 0,
    [SF_P_HOST] = 0,
};

static void die(const struct sf_conn *c, int from, int to, const char *why) {
    SF_LOG("fd %d: %s %s -> %s", c->fd, why, sf_phase_name(from), sf_phase_name(to));
    fprintf(stderr, "shuntflow: fd %d: %s %s -> %s\n", c->fd, why, sf_phase_name(from),
            sf_phase_name(to));
    abort();
}

static void check_transition(struct sf_conn *c, int from, int to) {
    if (from < 0 || from >= SF_P_COUNT || to < 0 || to >= SF_P_COUNT ||
        !(allowed[from] & TO(to)))
        die(c, from, to, "illegal phase transition");
    /* trylock succeeds only if nobody held it: the caller did not (which the process's only
     * thread need not: nobody else can look). */
    if (!sf_sole_thread() && pthread_mutex_trylock(&c->mu) == 0) {
        pthread_mutex_unlock(&c->mu);
        die(c, from, to, "phase transition without c->mu:");
    }
}

static void check_reset(struct sf_conn *c, int from, int to) {
    if (to != SF_P_OVERLAY && to != SF_P_PINNED && to != SF_P_HOST)
        die(c, from, to, "a new life cannot start in transition:");
}

static void check_count(const struct sf_conn *c, int from, int to, int count) {
    if (count < 0)
        die(c, from, to, "connections in transition went below 0 at");
}
#else
static inline void check_transition(struct sf_conn *c, int from, int to) {
    (void)c, (void)from, (void)to;
}
static inline void check_reset(struct sf_conn *c, int from, int to) {
    (void)c, (void)from, (void)to;
}
static inline void check_count(const struct sf_conn *c, int from, int to, int count) {
    (void)c, (void)from, (void)to, (void)count;
}
#endif

/* ---- the connections worth a look --------------------------------------------------------
 *
 * While any switch is under way, every epoll wait settles the connections at their switch
 * point before it waits and checks its events against those in handoff or just swapped after
 * (wrap_event.c), and the agent's tick expires stalled attempts (handoff.c). A walk over the
 * fd table loads every slot of each chunk of 1024 fd numbers in use, 456 bytes apart: 10 % of
 * the applications' CPU in router load (100 idle connections, 50 switches/s), repeated at every
 * wait of every event loop of the process. These walks go over the connections that entered a transition instead:
 * each is listed when it does (under c->mu, in sf_set_phase), and dropped by the first walk
 * that finds it neither in transition nor swapped less than SF_RECENT_SWAP_MS ago, nor its
 * number reused since. No memory to list one: the walks go over the whole table from then on.
 * The lock is a leaf: nothing else is taken while it is held. */
struct sw_ref {
    int fd;
    uint32_t gen;
};

static struct {
    pthread_mutex_t mu;
    struct sw_ref *refs;
    unsigned n, cap;
    int overflow;
} sw = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void list_add(struct sf_conn *c) {
    uint32_t gen = atomic_load(&c->gen);
    pthread_mutex_lock(&sw.mu);
    if (c->listed != gen + 1 && !sw.overflow) {
        if (sw.n == sw.cap) {
            unsigned cap = sw.cap ? sw.cap * 2 : 64;
            struct sw_ref *grown = realloc(sw.refs, cap * sizeof *grown);
            if (grown == NULL)
                sw.overflow = 1;
            else {
                sw.refs = grown;
                sw.cap = cap;
            }
        }
        if (!sw.overflow) {
            sw.refs[sw.n++] = (struct sw_ref){c->fd, gen};
            c->listed = gen + 1;
        }
    }
    pthread_mutex_unlock(&sw.mu);
}

/* Caller holds sw.mu. The slot's fields are read without its c->mu: a stale answer keeps an
 * entry one walk longer, or drops one whose connection the walk would have skipped anyway. */
static int still_worth_a_look(const struct sw_ref *r, uint64_t now) {
    struct sf_conn *c = sf_slot(r->fd);
    if (c == NULL || atomic_load(&c->gen) != r->gen || atomic_load(&c->kind) != SF_CONN) {
        if (c != NULL && c->listed == r->gen + 1)
            c->listed = 0;
        return 0;
    }
    int phase = atomic_load(&c->phase);
    if (sf_phase_in_transition(phase) || sf_swapped_recently(c, now))
        return 1;
    c->listed = 0;
    return 0;
}

void sf_for_each_switching(void (*fn)(struct sf_conn *, void *), void *arg) {
    struct sw_ref local[64], *refs = local;
    pthread_mutex_lock(&sw.mu);
    if (sw.overflow) {
        pthread_mutex_unlock(&sw.mu);
        sf_for_each_conn(fn, arg);
        return;
    }
    uint64_t now = sw.n > 0 ? sf_now_ms() : 0;
    unsigned n = 0;
    for (unsigned i = 0; i < sw.n; i++)
        if (still_worth_a_look(&sw.refs[i], now))
            sw.refs[n++] = sw.refs[i];
    sw.n = n;
    if (n > sizeof local / sizeof local[0] && (refs = malloc(n * sizeof *refs)) == NULL) {
        pthread_mutex_unlock(&sw.mu);
        sf_for_each_conn(fn, arg);
        return;
    }
    memcpy(refs, sw.refs, n * sizeof *refs);
    pthread_mutex_unlock(&sw.mu);
    for (unsigned i = 0; i < n; i++) {
        struct sf_conn *c = sf_slot(refs[i].fd);
        if (c != NULL && atomic_load(&c->gen) == refs[i].gen &&
            atomic_load(&c->kind) == SF_CONN)
            fn(c, arg);
    }
    if (refs != local)
        free(refs);
}

/* The list names the parent's connections, which the child keeps; a walk drops those the child
 * pinned (core.c). Only the lock needs making again. */
void sf_switching_after_fork_child(void) {
    pthread_mutex_init(&sw.mu, NULL);
}

static void count_transition(struct sf_conn *c, int from, int to) {
    int was = sf_phase_in_transition(from), is = sf_phase_in_transition(to);
    if (is && !was) {
        /* Before the count: whoever sees it above 0 sees this time too. */
        if (atomic_load(&sf_in_transition) == 0)
            atomic_store(&sf_busy_since_us, sf_now_us());
        atomic_fetch_add(&sf_in_transition, 1);
    }
    else if (was && !is)
        check_count(c, from, to, atomic_fetch_sub(&sf_in_transition, 1) - 1);
}

void sf_set_phase(struct sf_conn *c, int phase) {
    int old = atomic_load(&c->phase);
    check_transition(c, old, phase);
    count_transition(c, old, phase);
    /* Stamped first: whoever sees the new phase sees its stamp, not the old phase's. */
    c->phase_since_ms = sf_now_ms();
    atomic_store(&c->phase, phase);
    /* After the store: a walk in between would find it not in transition and drop it. */
    if (sf_phase_in_transition(phase) && !sf_phase_in_transition(old))
        list_add(c);
    pthread_cond_broadcast(&c->cv);
    if ((sf_phase_final(phase) || phase == SF_P_OVERLAY ||
         (old == SF_P_REQUESTED && phase == SF_P_HANDSHAKE)) &&
        atomic_load(&c->phase_waiters) > 0)
        syscall(SYS_futex, (int *)&c->phase, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    sf_window_phase(c, old, phase);
}

/* A waiter on c->cv wakes holding nothing and then waits for c->mu, which the thread that
 * changed the phase still holds (the swap goes on after it): two wake-ups, each across CPUs
 * when the waiter is an application thread and the agent runs elsewhere. This waits on the
 * phase word itself (a futex), so it needs no lock to learn the new phase, and is woken only
 * when the host connection arrives (it then watches that itself: agent.c waiter_pump) and when
 * the attempt ends (a final phase, or back to OVERLAY), not at each step of the handoff.
 * The count before the load, the phase before the count in sf_set_phase: an end is either seen
 * here or woken. */
void sf_phase_wait(struct sf_conn *c, int phase, long ms) {
    atomic_fetch_add(&c->phase_waiters, 1);
    if (atomic_load(&c->phase) == phase) {
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
        syscall(SYS_futex, (int *)&c->phase, FUTEX_WAIT_PRIVATE, phase, &ts, NULL, 0);
    }
    atomic_fetch_sub(&c->phase_waiters, 1);
}

/* No window to tell and nobody to wake: the window of a closed connection was closed with it
 * (sf_slot_reset), and a new connection, or a fork child's copy, has no waiters yet. */
void sf_phase_reset(struct sf_conn *c, int phase) {
    int old = atomic_load(&c->phase);
    check_reset(c, old, phase);
    count_transition(c, old, phase);
    /* The process's only thread: nobody loads it but this thread, so a plain store, not a
     * locked exchange (twice a connection: at its start, at its close). */
    if (sf_sole_thread())
        atomic_store_explicit(&c->phase, phase, memory_order_release);
    else
        atomic_store(&c->phase, phase);
    c->phase_since_ms = 0;
}

int sf_peer_may_have_committed(const struct sf_conn *c) {
    int phase = atomic_load(&c->phase);
    return (phase == SF_P_HANDSHAKE && !c->leader) || (phase == SF_P_COMMITTED && !c->peer_synced);
}

/* A peer whose application had shut down writing at S sends its host connection's FIN right
 * after its SYNC. Until that FIN is in, the host socket would read "no data yet" where the
 * overlay reads the stream's end, which the application may have been told already: a leader
 * reads the peer's overlay FIN as the end before it commits, rightly, and the swap would then
 * turn that end into EAGAIN. */
static int peer_end_in(const struct sf_conn *c) {
    if (!c->peer_shut_wr)
        return 1;
    char byte;
    int saved = errno;
    int in = real.recv(c->host_fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) >= 0 || errno != EAGAIN;
    errno = saved;
    return in;
}

int sf_at_switch_point(const struct sf_conn *c) {
    return atomic_load(&c->phase) == SF_P_COMMITTED && c->peer_synced && c->host_fd >= 0 &&
           atomic_load(&c->rx) == c->peer_s && peer_end_in(c);
}
