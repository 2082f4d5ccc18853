/* agent.c -- the background thread that moves connections, so the application never waits.
 *
 * One agent per process, started with the first connection in a process that is multi-threaded
 * already, else when a connection first needs it: at its sf_cfg.agent_call-th data call, before
 * its trigger (slim: at connect() or accept()), or at the application's next thread; again in a
 * forked child. Until then a single-threaded process stays so. Application threads only hand it
 * work: a trigger goes on a queue and an eventfd wakes the thread, unless the triggering thread
 * could send the SWITCH_REQ itself without waiting (router.c sf_router_request_now); a frame for
 * the router goes on router.c's report queue. The thread then serves what its epoll reports: the
 * queue, the router channel (router.c), the handoff frames on each new host connection
 * (handoff.c), and on a tick the timers (handoff expiry, lingering host sockets, owed FINs,
 * io_uring). When a write is in flight at the moment the agent wants to commit, the writer
 * finishes that commit itself (handoff.c). Any failure before a commit leaves the connection on
 * the overlay (fail-open). Slim mode's blocking switch is here too: it is a trigger and a wait. */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "agent.h"

#define AG_QUEUE 4096

pthread_mutex_t sf_agent_mu = PTHREAD_MUTEX_INITIALIZER;

static struct {
    pid_t pid;                 /* process that started this agent; a fork child has another */
    /* 1 once this process's agent runs; cleared in a fork child (atfork), so asking costs a
     * load, not a getpid() (a system call, ~0.4 us on a VM). */
    _Atomic int running;
    int epfd, evfd;
    struct { int fd; uint32_t gen; } queue[AG_QUEUE];
    unsigned q_head, q_len;
} ag = {.epfd = -1, .evfd = -1};

static void *agent_main(void *arg);

static __thread int on_agent;
static _Atomic uint64_t wakes_by_ms; /* when the agent's current wait ends at the latest */

/* A report queued by an application thread (the switch time at its commit, the switch window's
 * calls when its last call returns) waits for the agent's next round if that comes within
 * `lag_ms`: the eventfd write that would wake it sooner is a wake-up across CPUs on the
 * application's own call. While a switch is under way the agent's rounds are 50 ms apart at
 * most (tick_ms). */
int sf_agent_awake_within(uint64_t lag_ms) {
    uint64_t by = atomic_load(&wakes_by_ms), now = sf_now_ms();
    return on_agent || (by > now && by <= now + lag_ms);
}

/* The agent settles owed FINs at the end of every round of its loop and sends the queued reports
 * before its next wait, so work it queues itself needs no wake-up: an eventfd write, and one
 * more round for nothing. */
int sf_agent_is_self(void) {
    return on_agent;
}

int sf_agent_started(void) {
    return ag.epfd >= 0;
}

int sf_agent_is_this_process(void) {
    return __atomic_load_n(&ag.pid, __ATOMIC_ACQUIRE) == getpid();
}

/* 0 if watched; -1 before the agent's start (no epoll yet) or on failure. */
int sf_agent_watch(int fd, uint32_t events, uint64_t tag) {
    struct epoll_event ev = {.events = events, .data.u64 = tag};
    return ag.epfd >= 0 ? real.epoll_ctl(ag.epfd, EPOLL_CTL_ADD, fd, &ev) : -1;
}

void sf_agent_unwatch(int fd) {
    real.epoll_ctl(ag.epfd, EPOLL_CTL_DEL, fd, NULL);
}

/* A watched fd got a new number (sf_private_move): epoll keys a watch by file and number, so the
 * old one would go on reporting under a number the application now owns, and no unwatch by the
 * new number could end it. Called while `from` is still ours. */
void sf_agent_rewatch(int from, int to, uint32_t events, uint64_t tag) {
    if (ag.epfd >= 0 && real.epoll_ctl(ag.epfd, EPOLL_CTL_DEL, from, NULL) == 0)
        sf_agent_watch(to, events, tag);
}

void sf_agent_kick_locked(void) {
    if (ag.evfd >= 0) {
        uint64_t one = 1;
        (void)!real.write(ag.evfd, &one, sizeof one);
    }
}

/* New work that no fd of the agent's epoll announces (fin.c's owed FINs). */
void sf_agent_wake(void) {
    pthread_mutex_lock(&sf_agent_mu);
    sf_agent_kick_locked();
    pthread_mutex_unlock(&sf_agent_mu);
}

/* ---- starting, forking -------------------------------------------------------------------- */

void sf_agent_ensure(void) {
    if (SF_LIKELY(atomic_load_explicit(&ag.running, memory_order_acquire)))
        return;
    pid_t me = getpid();
    if (__atomic_load_n(&ag.pid, __ATOMIC_ACQUIRE) != me) {
        pthread_mutex_lock(&sf_agent_mu);
        if (ag.pid != me) {
            /* The fds the library keeps are taken here and at the agent's start (the router's
             * channel), never anew for a moment later: at its fd limit, an application meets
             * EMFILE only for the fds a switch takes (README, Limits). */
            int epfd = real.epoll_create1(EPOLL_CLOEXEC);
            int evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
            if (epfd < 0 || evfd < 0 || sf_uring_open() != 0) {
                int err = errno;
                if (epfd >= 0) real.close(epfd);
                if (evfd >= 0) real.close(evfd);
                errno = err;
                SF_LOG("agent: cannot create its fds (%s); staying on the overlay", strerror(errno));
                pthread_mutex_unlock(&sf_agent_mu);
                return;
            }
            ag.epfd = sf_private_fd(epfd);
            ag.evfd = sf_private_fd(evfd);
            sf_sockopts_read_netns();
            sf_agent_watch(ag.evfd, EPOLLIN, AG_TAG_EVENT);
            /* The agent must never take a signal meant for the application. */
            sigset_t all, old;
            sigfillset(&all);
            pthread_sigmask(SIG_SETMASK, &all, &old);
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            pthread_attr_setstacksize(&attr, 256 * 1024);
            pthread_t tid;
            int rc = real.pthread_create(&tid, &attr, agent_main, NULL);
            pthread_attr_destroy(&attr);
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            if (rc != 0) {
                SF_LOG("agent: cannot start its thread (%s)", strerror(rc));
                sf_private_close(ag.epfd);
                sf_private_close(ag.evfd);
                sf_uring_close();
                ag.epfd = ag.evfd = -1;
            } else {
                __atomic_store_n(&ag.pid, me, __ATOMIC_RELEASE);
                /* Sequentially consistent: against sf_conn_start's store of the kind and load
                 * of this flag (a connection that saw 0 is found by the index's walk). */
                atomic_store(&ag.running, 1);
            }
        }
        pthread_mutex_unlock(&sf_agent_mu);
    }
}

int sf_agent_running(void) {
    return atomic_load(&ag.running);
}

static _Atomic int conn_seen; /* shuntflow mode: a connection was tracked in this process */

/* A connection began while no agent runs. Shuntflow mode starts the agent now if the process is
 * multi-threaded already or its threshold is 1, else at a connection's sf_cfg.agent_call-th
 * data call or at the process's next thread (pthread_create below); slim mode at the trigger
 * its connect or accept makes. */
void sf_agent_conn_started(void) {
    if (sf_cfg.mode != SF_MODE_SHUNTFLOW)
        return;
    if (!atomic_load_explicit(&conn_seen, memory_order_relaxed))
        atomic_store(&conn_seen, 1);
    /* Under musl (no flag) a process starts its agent with its first connection. */
    if (!sf_sole_thread() || sf_cfg.agent_call == 0)
        sf_agent_ensure();
    else if (!sf_router_connected())
        /* No thread yet, but the channel: the router admits it (a pass through its Python side,
         * about a millisecond) long before this process's first switch, which would otherwise
         * wait for it; a peer's claim waits in it until the agent starts (which then watches
         * it). Open already, it needs nothing more until then. */
        sf_router_open();
}

/* A process holding a connection that makes a second thread is multi-threaded from now on, agent
 * or not: the agent starts now, so that a claim for a connection that makes no call (a server
 * thread that accepts, hands the connection to a new thread and does not read it yet) finds this
 * process's channel. */
SF_EXPORT int pthread_create(pthread_t *tid, const pthread_attr_t *attr, void *(*fn)(void *),
                             void *arg) {
    sf_ensure_init();
    int rc = real.pthread_create(tid, attr, fn, arg);
    if (rc == 0 && SF_UNLIKELY(atomic_load_explicit(&conn_seen, memory_order_relaxed)) &&
        !sf_agent_running()) {
        int saved = errno;
        sf_agent_ensure();
        errno = saved;
    }
    return rc;
}

void sf_agent_after_fork_child(void) {
    pthread_mutex_init(&sf_agent_mu, NULL);
    int fds[2] = {ag.epfd, ag.evfd};
    for (int i = 0; i < 2; i++)
        if (fds[i] >= 0)
            sf_private_close(fds[i]);
    ag.epfd = ag.evfd = -1;
    ag.q_len = ag.q_head = 0;
    sf_router_after_fork_child();
    sf_linger_after_fork_child();
    sf_fins_after_fork_child();
    sf_uring_after_fork_child();
    ag.pid = 0;
    atomic_store(&ag.running, 0);
}

struct moved {
    int from, to;
};

/* host_fd and pending_close_host are c->mu's: the agent may be handing the connection over
 * while an application thread's dup2 moves the number. */
static void move_host_fd(struct sf_conn *c, void *arg) {
    struct moved *m = arg;
    if (atomic_load(&c->kind) != SF_CONN)
        return;
    pthread_mutex_lock(&c->mu);
    if (c->host_fd == m->from) {
        c->host_fd = m->to;
        sf_agent_rewatch(m->from, m->to, SF_HANDOFF_WATCH, sf_handoff_tag(c));
    }
    if (c->pending_close_host == m->from)
        c->pending_close_host = m->to;
    int from = m->from;
    atomic_compare_exchange_strong(&c->rd_host, &from, m->to);
    from = m->from;
    atomic_compare_exchange_strong(&c->rd_close, &from, m->to);
    pthread_mutex_unlock(&c->mu);
}

void sf_agent_private_moved(int from, int to) {
    struct moved m = {from, to};
    if (ag.epfd == from)
        ag.epfd = to;
    if (ag.evfd == from) {
        ag.evfd = to;
        sf_agent_rewatch(from, to, EPOLLIN, AG_TAG_EVENT);
    }
    sf_router_private_moved(from, to);
    sf_linger_private_moved(from, to);
    sf_fins_private_moved(from, to);
    sf_uring_private_moved(from, to);
    sf_for_each_conn(move_host_fd, &m);
}

/* What the exiting thread finishes for the agent, in this order: the overlay FINs still owed
 * (fin.c), the reports still queued (router.c), the host sockets kept for a last frame
 * (linger.c). */
__attribute__((destructor)) static void agent_at_exit(void) {
    sf_fins_at_exit();
    sf_router_at_exit();
    sf_linger_at_exit();
}

/* ---- the work queue: application threads -> agent ---------------------------------------- */

/* Caller holds c->mu. Retry after twice as many calls as so far: a storm of failures costs
 * little. */
void sf_retry_later_locked(struct sf_conn *c) {
    uint32_t calls = atomic_load(&c->calls);
    c->next_trigger = calls * 2 > sf_cfg.threshold ? calls * 2 : sf_cfg.threshold;
}

/* Nobody will take this trigger: the agent could not start (the process is at its fd limit)
 * or its queue is full. The attempt ends before it began, as when the peer host is in backoff:
 * retry after twice the calls, close the switch window (else every later call would be timed),
 * and let a slim connect() waiting for the attempt go on at once. */
static void trigger_dropped(struct sf_conn *c) {
    pthread_mutex_lock(&c->mu);
    if (atomic_load(&c->phase) == SF_P_OVERLAY) {
        if (atomic_load(&c->next_trigger) == UINT32_MAX)
            sf_retry_later_locked(c);
        sf_window_close(c, SF_PEER_UNREACHABLE);
    }
    c->last_status = SF_INTERNAL;
    c->attempted = 1;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    SF_LOG("fd %d: no agent thread to switch it; stays on the overlay", c->fd);
}

void sf_agent_trigger(struct sf_conn *c) {
    atomic_store(&c->decided_us, sf_now_us());
    atomic_store(&c->initiated, 1);
    sf_window_open(c);
    sf_agent_ensure();
    int saved = errno;
    int asked = sf_router_request_now(c);
    errno = saved;
    if (asked)
        return;
    int queued = 0;
    pthread_mutex_lock(&sf_agent_mu);
    if (ag.evfd >= 0 && ag.q_len < AG_QUEUE) {
        unsigned slot = (ag.q_head + ag.q_len++) % AG_QUEUE;
        ag.queue[slot].fd = c->fd;
        ag.queue[slot].gen = atomic_load(&c->gen);
        sf_agent_kick_locked();
        queued = 1;
    }
    pthread_mutex_unlock(&sf_agent_mu);
    if (SF_UNLIKELY(!queued))
        trigger_dropped(c);
}

/* sf_router_request can leave a triggered connection on the overlay without asking the router
 * (peer host in backoff, no router channel, not connected yet): that attempt is over, and so is
 * the window its trigger opened. Unless the application has triggered again since (next_trigger
 * is back at UINT32_MAX and another queue entry follows): the window goes on for that attempt. */
static void end_window_unless_requested(struct sf_conn *c) {
    pthread_mutex_lock(&c->mu);
    if (atomic_load(&c->kind) == SF_CONN && atomic_load(&c->phase) == SF_P_OVERLAY &&
        atomic_load(&c->next_trigger) != UINT32_MAX)
        sf_window_close(c, SF_PEER_UNREACHABLE);
    pthread_mutex_unlock(&c->mu);
}

static void drain_queue(void) {
    uint64_t count;
    (void)!real.read(ag.evfd, &count, sizeof count);
    for (;;) {
        pthread_mutex_lock(&sf_agent_mu);
        if (ag.q_len == 0) {
            pthread_mutex_unlock(&sf_agent_mu);
            return;
        }
        int fd = ag.queue[ag.q_head].fd;
        uint32_t gen = ag.queue[ag.q_head].gen;
        ag.q_head = (ag.q_head + 1) % AG_QUEUE;
        ag.q_len--;
        pthread_mutex_unlock(&sf_agent_mu);
        struct sf_conn *c = sf_slot(fd);
        if (c != NULL && atomic_load(&c->gen) == gen) {
            sf_router_request(c);
            end_window_unless_requested(c);
        }
    }
}

/* ---- the loop ----------------------------------------------------------------------------- */

/* The switch work (router frames, handoff frames, the commit) is off the application's path
 * but not off its CPU: pinned with the application, the agent competes with the very calls it
 * must not delay. SHUNTFLOW_AGENT_CPUS puts it on housekeeping CPUs instead. */
static void pin_agent(void) {
    if (!sf_cfg.agent_pinned)
        return;
    int rc = pthread_setaffinity_np(pthread_self(), sizeof sf_cfg.agent_cpus, &sf_cfg.agent_cpus);
    if (rc != 0)
        SF_LOG("agent: cannot run on SHUNTFLOW_AGENT_CPUS (%s); it stays on the application's CPUs",
               strerror(rc));
}

static int tick_ms(void) {
    int timeout = atomic_load(&sf_in_transition) > 0 || sf_lingering() > 0 ? 50 : 1000;
    int reports = sf_router_reports_wait_ms();
    if (reports > 0 && timeout > reports)
        timeout = reports;
    if (sf_fins_owed() > 0)
        timeout = 1;
    if (!sf_router_connected() && timeout > 250)
        timeout = 250;
    return timeout;
}

static void *agent_main(void *arg) {
    (void)arg;
    pid_t me = getpid();
    on_agent = 1;
    pin_agent();
    uint64_t last_tick = sf_now_ms();
    /* A ring made before the first connection is known before any claim is answered. */
    sf_uring_refresh(last_tick);
    /* Open the channel now so that peers' claims reach this process even before it triggers. */
    sf_router_open();
    /* A trigger queued while this thread was starting (at a low threshold the switch comes a
     * call or two after the agent's start, before its first look for a ring, so the
     * application thread could not send it) goes out before the walk of the fd table: the
     * walk is for the answer, which comes hundreds of µs later. */
    drain_queue();
    sf_router_index_all();
    while (__atomic_load_n(&ag.pid, __ATOMIC_ACQUIRE) == me || ag.pid == 0) {
        struct epoll_event evs[64];
        int timeout = tick_ms();
        atomic_store(&wakes_by_ms, sf_now_ms() + (uint64_t)timeout);
        /* After the deadline is known: a report queued from here on either sees it or, if the
         * wait is long, wakes it (sf_router_report). Before it, what the last round queued. */
        sf_router_send_reports();
        int n = real.epoll_wait(ag.epfd, evs, 64, timeout);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u64 == AG_TAG_EVENT)
                drain_queue();
            else if (evs[i].data.u64 == AG_TAG_CHAN)
                sf_router_on_readable();
            else
                sf_handoff_on_readable(evs[i].data.u64);
        }
        uint64_t now = sf_now_ms();
        sf_router_open(); /* if it is closed and its retry is due */
        sf_uring_refresh(now);
        if (sf_lingering() > 0)
            sf_linger_poll(now);
        if (now - last_tick >= 50 && atomic_load(&sf_in_transition) > 0) {
            last_tick = now;
            sf_handoff_expire_all(now);
        }
        /* Last, so that FINs this round owed go out now (sf_agent_is_self). */
        if (sf_fins_owed() > 0)
            sf_fins_poll(now);
    }
    return NULL;
}

/* ---- slim mode ---------------------------------------------------------------------------- */

/* Slim's switch at setup: the caller (connect or accept) waits until the host socket is in
 * place. Like Slim, a connect waits for the server application to accept: while the peer router
 * answers that nobody owns the other end yet, it asks again. The wait ends at the swap, or after
 * a bound, after which the switch carries on in the background as in shuntflow mode.
 * The caller sends the request itself, as any triggering thread does (sf_agent_trigger), and
 * sleeps on the phase word (sf_phase_wait) rather than on c->cv, so the end of the attempt
 * wakes it once, not once for the condition and again for c->mu, which the agent still holds
 * while it finishes the swap. */
#define SLIM_ACCEPT_WAIT_MS 1000
#define SLIM_RETRY_MS 2
#define SLIM_COMMITTED_WAIT_MS 200

/* The handoff's frames wake the waiting thread as well as the agent: it runs the step they call
 * for itself (under c->mu, as a reader at the switch point does), rather than wait for the
 * agent, which shares its CPU with the routers, to run it and then wake it. Until the peer's
 * SYNC only: what follows it on the host connection is the peer application's. 0 if there is
 * no host connection to watch. The poll's bound covers a frame the agent took between our look
 * at the phase and the poll (no wake-up then: the phase word is not polled). The agent does not
 * watch the connection meanwhile (sf_handoff_begin_locked), and takes over should this thread
 * stop waiting first. */
static int waiter_pump(struct sf_conn *c, int phase) {
    if (phase != SF_P_HANDSHAKE && phase != SF_P_COMMITTED)
        return 0;
    /* Without c->mu: the agent that woke us still holds it, finishing the step that set the
     * phase. A number read as it changes is only polled, and checked under c->mu after. */
    int host = __atomic_load_n(&c->host_fd, __ATOMIC_ACQUIRE);
    if (host < 0 || __atomic_load_n(&c->peer_synced, __ATOMIC_RELAXED))
        return 0;
    uint64_t tag = ((uint64_t)atomic_load(&c->gen) << 32) | (uint32_t)c->fd;
    struct pollfd p = {.fd = host, .events = POLLIN | POLLRDHUP};
    if (real.poll(&p, 1, 2) > 0)
        sf_handoff_on_readable(tag);
    return 1;
}

int sf_agent_switch_now(struct sf_conn *c) {
    uint64_t start = sf_now_ms();
    uint64_t deadline = start + AG_REQUEST_TIMEOUT_MS;
    pthread_mutex_lock(&c->mu);
    c->attempted = 0;
    c->slim_waiting = 1; /* a leader may send its SYNC early (handoff.c) */
    pthread_mutex_unlock(&c->mu);
    sf_agent_trigger(c);
    for (;;) {
        int phase = atomic_load(&c->phase);
        uint64_t now = sf_now_ms();
        if (sf_phase_final(phase) || now > deadline)
            break;
        /* Committed: only the peer's SYNC is missing. It normally follows at once; if the peer
         * is busy writing (it gave up waiting for us), the drain finishes in the background. */
        if (phase == SF_P_COMMITTED && !c->early_sync &&
            deadline > now + SLIM_COMMITTED_WAIT_MS)
            deadline = now + SLIM_COMMITTED_WAIT_MS;
        if (phase != SF_P_OVERLAY) {
            if (!waiter_pump(c, phase))
                sf_phase_wait(c, phase, 20);
            continue;
        }
        pthread_mutex_lock(&c->mu);
        if (atomic_load(&c->phase) != SF_P_OVERLAY) {
            pthread_mutex_unlock(&c->mu);
            continue;
        }
        if (!c->attempted) {
            sf_cv_wait_ms(c, 20); /* the agent has the trigger; sf_router_request wakes us */
            pthread_mutex_unlock(&c->mu);
            continue;
        }
        if (c->last_status != SF_PEER_REFUSED || now - start > SLIM_ACCEPT_WAIT_MS) {
            pthread_mutex_unlock(&c->mu);
            break;
        }
        /* The server has not accepted yet. Its own accept() usually starts the switch from its
         * side first (a claim moves us on, and wakes this wait); ask again only if nothing
         * happened meanwhile. */
        sf_cv_wait_ms(c, SLIM_RETRY_MS);
        int again = atomic_load(&c->phase) == SF_P_OVERLAY;
        if (again)
            c->attempted = 0;
        pthread_mutex_unlock(&c->mu);
        if (again)
            sf_agent_trigger(c);
    }
    pthread_mutex_lock(&c->mu);
    c->slim_waiting = 0;
    /* Given up with the handoff under way: the agent reads its frames from now on. */
    if (c->waiter_watches && c->host_fd >= 0 && !c->peer_synced &&
        sf_phase_in_handoff(atomic_load(&c->phase)))
        sf_handoff_watch_locked(c);
    c->waiter_watches = 0;
    pthread_mutex_unlock(&c->mu);
    return atomic_load(&c->phase) == SF_P_HOST ? 0 : -1;
}
