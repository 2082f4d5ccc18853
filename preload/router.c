/* router.c -- the agent's channel to the router of its host (docs/wire.md section 1).
 *
 * One persistent SOCK_SEQPACKET connection per process, opened by the agent. The agent thread
 * reads it alone: host connections (SWITCH_RES with SCM_RIGHTS), peer routers' claims
 * (CLAIM_REQ), statistics requests; and it sends the answers and the figures other parts queue
 * (SWITCH_DONE, SWITCH_CALLS). One frame alone may come from an application thread: the
 * SWITCH_REQ of the connection whose threshold it crossed (sf_router_request_now), one
 * non-blocking send of one datagram, so the switch starts without waking the agent; any doubt
 * and the agent asks instead. A destination host that did not answer is left alone for a while
 * (backoff), and a router that is away only means that connections stay on the overlay until it
 * is back. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include "agent.h"

#define AG_BACKOFF_SLOTS 64
#define AG_REPORT_QUEUE 512 /* two frames per switch end: SWITCH_DONE, SWITCH_CALLS */
#define AG_REPORT_LAG_MS 60 /* a report may wait that long for the agent's next round */

struct dest_backoff {
    uint32_t ip;
    uint64_t until_ms;
    uint64_t step_ms;
};

static struct {
    int chan;                  /* set by the agent under sf_agent_mu; app threads read it under it */
    int unconnected;           /* the agent's: a channel socket whose connect failed, kept */
    uint64_t chan_retry_ms, chan_step_ms;
    uint32_t seq;              /* the last SWITCH_REQ's; atomic: the agent and app threads ask */
    int warned_router;
    int chan_watched;          /* in the agent's epoll (not before the agent runs) */
    struct dest_backoff backoff[AG_BACKOFF_SLOTS];      /* under sf_agent_mu */
    struct sf_msg reports[AG_REPORT_QUEUE];             /* under sf_agent_mu: frames to send */
    unsigned reports_len;
    uint64_t reports_since_ms;                          /* when the oldest queued one was */
    _Atomic uint64_t switches_done, switches_failed;
    _Atomic uint64_t asked_by_app, asked_by_agent; /* SWITCH_REQs sent, by who sent them */
} rt = {.chan = -1, .unconnected = -1};

static void ix_forget_all(void);

int sf_router_connected(void) {
    return rt.chan >= 0;
}

void sf_count_switch(int ok) {
    atomic_fetch_add(ok ? &rt.switches_done : &rt.switches_failed, 1);
}

void sf_router_after_fork_child(void) {
    int mine[2] = {rt.chan, rt.unconnected};
    for (int i = 0; i < 2; i++)
        if (mine[i] >= 0)
            sf_private_close(mine[i]);
    rt.chan = rt.unconnected = -1;
    rt.chan_watched = 0;
    rt.reports_len = 0; /* the parent reports its own switches */
    ix_forget_all();
    rt.chan_retry_ms = 0;
}

void sf_router_private_moved(int from, int to) {
    pthread_mutex_lock(&sf_agent_mu);
    if (rt.chan == from) {
        rt.chan = to;
        if (rt.chan_watched)
            sf_agent_rewatch(from, to, EPOLLIN, AG_TAG_CHAN);
    }
    if (rt.unconnected == from)
        rt.unconnected = to;
    pthread_mutex_unlock(&sf_agent_mu);
}

static uint32_t next_seq(void) {
    return __atomic_add_fetch(&rt.seq, 1, __ATOMIC_RELAXED);
}

/* ---- addresses and lookups ---------------------------------------------------------------- */

static int fill_addrs(struct sf_conn *c) {
    if (c->have_addrs)
        return 0;
    socklen_t ll = sizeof c->local, rl = sizeof c->remote;
    if (real.getsockname(c->fd, (struct sockaddr *)&c->local, &ll) != 0 ||
        real.getpeername(c->fd, (struct sockaddr *)&c->remote, &rl) != 0 ||
        c->local.sin_family != AF_INET || c->remote.sin_family != AF_INET)
        return -1;
    c->have_addrs = 1;
    /* The leader is the end whose (ip, port) is lower in network byte order (docs/wire.md). */
    int cmp = memcmp(&c->local.sin_addr, &c->remote.sin_addr, 4);
    if (cmp == 0)
        cmp = memcmp(&c->local.sin_port, &c->remote.sin_port, 2);
    c->leader = cmp < 0;
    return 0;
}

/* ---- finding a connection by its tuple -------------------------------------------------- */

/* The router names a connection by its tuple (SWITCH_RES, CLAIM_REQ). A walk of the fd table per
 * frame took 61 % of the agent's CPU with 10,000 idle connections at 3,000 switches/s offered,
 * and claims were answered past the router's timeout, so the agent keeps an index: tuple ->
 * (fd, generation), open addressing, its own thread's alone. New connections reach it through a
 * queue that sf_conn_start fills (one lock, no wake-up) and the agent drains before each
 * lookup; a connect still in progress has no peer address yet and waits on a list until it has
 * one. An entry is checked against its slot on every hit (kind, generation, tuple), so a closed
 * or reused fd is never mistaken for the connection; stale entries are dropped when the table
 * is rebuilt. Whenever the index may be incomplete (the queue overflowed, a fork, no memory) a
 * miss falls back to the walk, which indexes everything it sees. */

#define IX_FRESH 4096
#define IX_MIN_CAP 1024u
#define IX_EMPTY (-1)
#define IX_GONE (-2)

struct ix_ent {
    uint8_t key[12];
    int fd; /* IX_EMPTY, IX_GONE, or the fd */
    uint32_t gen;
};

struct ix_ref {
    int fd;
    uint32_t gen;
};

static struct {
    struct ix_ref ring[IX_FRESH]; /* under sf_agent_mu: connections started since the drain */
    unsigned len;
    int overflow;
} fresh;

static struct {
    struct ix_ent *t;
    size_t cap, used; /* used: live and gone slots */
    struct ix_ref *pending; /* connects in progress: no peer address yet */
    size_t npending, cappending;
    int incomplete; /* a miss must walk the table */
} ix = {.incomplete = 1};

void sf_router_note_conn(struct sf_conn *c) {
    uint32_t gen = atomic_load(&c->gen);
    pthread_mutex_lock(&sf_agent_mu);
    if (fresh.len < IX_FRESH) {
        fresh.ring[fresh.len].fd = c->fd;
        fresh.ring[fresh.len++].gen = gen;
    } else {
        fresh.overflow = 1;
    }
    pthread_mutex_unlock(&sf_agent_mu);
}

static void key_of_msg(uint8_t key[12], const struct sf_msg *m) {
    memcpy(key, &m->local_ip, 4);
    memcpy(key + 4, &m->remote_ip, 4);
    memcpy(key + 8, &m->local_port, 2);
    memcpy(key + 10, &m->remote_port, 2);
}

static void key_of_conn(uint8_t key[12], const struct sf_conn *c) {
    memcpy(key, &c->local.sin_addr.s_addr, 4);
    memcpy(key + 4, &c->remote.sin_addr.s_addr, 4);
    memcpy(key + 8, &c->local.sin_port, 2);
    memcpy(key + 10, &c->remote.sin_port, 2);
}

static size_t ix_hash(const uint8_t key[12]) {
    uint64_t a, b = 0;
    memcpy(&a, key, 8);
    memcpy(&b, key + 8, 4);
    uint64_t x = a ^ (b * 0x9e3779b97f4a7c15ull);
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return (size_t)x;
}

/* The connection an entry names, if its slot still holds it. */
static struct sf_conn *ix_live(const struct ix_ent *e) {
    struct sf_conn *c = sf_slot(e->fd);
    if (c == NULL || atomic_load(&c->kind) != SF_CONN || atomic_load(&c->gen) != e->gen ||
        !c->have_addrs)
        return NULL;
    uint8_t key[12];
    key_of_conn(key, c);
    return memcmp(key, e->key, 12) == 0 ? c : NULL;
}

static void ix_place(struct ix_ent *t, size_t cap, const struct ix_ent *e) {
    size_t i = ix_hash(e->key) & (cap - 1);
    while (t[i].fd != IX_EMPTY)
        i = (i + 1) & (cap - 1);
    t[i] = *e;
}

/* A table of at least 4x the live entries, the stale ones left out; -1 without memory. */
static int ix_rebuild(void) {
    size_t live = 0;
    for (size_t i = 0; i < ix.cap; i++)
        if (ix.t[i].fd >= 0 && ix_live(&ix.t[i]) != NULL)
            live++;
        else if (ix.t[i].fd >= 0)
            ix.t[i].fd = IX_GONE;
    size_t cap = IX_MIN_CAP;
    while (cap < (live + 1) * 4)
        cap *= 2;
    struct ix_ent *t = malloc(cap * sizeof *t);
    if (t == NULL)
        return -1;
    for (size_t i = 0; i < cap; i++)
        t[i].fd = IX_EMPTY;
    for (size_t i = 0; i < ix.cap; i++)
        if (ix.t[i].fd >= 0)
            ix_place(t, cap, &ix.t[i]);
    free(ix.t);
    ix.t = t;
    ix.cap = cap;
    ix.used = live;
    return 0;
}

static void ix_put(struct sf_conn *c) {
    struct ix_ent e = {.fd = c->fd, .gen = atomic_load(&c->gen)};
    key_of_conn(e.key, c);
    if ((ix.used + 1) * 2 > ix.cap && ix_rebuild() != 0) {
        ix.incomplete = 1; /* this one is not in: misses walk */
        return;
    }
    size_t i = ix_hash(e.key) & (ix.cap - 1), slot = SIZE_MAX;
    for (; ix.t[i].fd != IX_EMPTY; i = (i + 1) & (ix.cap - 1)) {
        if (ix.t[i].fd >= 0 && memcmp(ix.t[i].key, e.key, 12) == 0) {
            /* The tuple's new connection, the old one closed; or a dup of a connection on the
             * host path, which answers as the original does: the lower fd, as a walk finds. */
            if (ix.t[i].fd == e.fd || ix_live(&ix.t[i]) == NULL)
                ix.t[i] = e;
            return;
        }
        if (ix.t[i].fd == IX_GONE && slot == SIZE_MAX)
            slot = i;
    }
    if (slot == SIZE_MAX) {
        slot = i;
        ix.used++;
    }
    ix.t[slot] = e;
}

static struct sf_conn *ix_get(const uint8_t key[12]) {
    if (ix.t == NULL)
        return NULL;
    for (size_t i = ix_hash(key) & (ix.cap - 1); ix.t[i].fd != IX_EMPTY;
         i = (i + 1) & (ix.cap - 1)) {
        if (ix.t[i].fd < 0 || memcmp(ix.t[i].key, key, 12) != 0)
            continue;
        struct sf_conn *c = ix_live(&ix.t[i]);
        if (c == NULL)
            ix.t[i].fd = IX_GONE;
        return c;
    }
    return NULL;
}

static void ix_pend(int fd, uint32_t gen) {
    if (ix.npending == ix.cappending) {
        size_t cap = ix.cappending ? ix.cappending * 2 : 64;
        struct ix_ref *p = realloc(ix.pending, cap * sizeof *p);
        if (p == NULL) {
            ix.incomplete = 1;
            return;
        }
        ix.pending = p;
        ix.cappending = cap;
    }
    ix.pending[ix.npending].fd = fd;
    ix.pending[ix.npending++].gen = gen;
}

/* Indexes the connection if its addresses can be had; 0 if it is not (yet) a connection. */
static int ix_try(int fd, uint32_t gen, int *gone) {
    struct sf_conn *c = sf_slot(fd);
    *gone = c == NULL || atomic_load(&c->kind) != SF_CONN || atomic_load(&c->gen) != gen;
    if (*gone)
        return 0;
    if (!c->have_addrs) {
        pthread_mutex_lock(&c->mu);
        fill_addrs(c);
        pthread_mutex_unlock(&c->mu);
    }
    if (!c->have_addrs)
        return 0;
    ix_put(c);
    return 1;
}

static void ix_drain(void) {
    static struct ix_ref batch[IX_FRESH];
    pthread_mutex_lock(&sf_agent_mu);
    unsigned n = fresh.len;
    memcpy(batch, fresh.ring, n * sizeof batch[0]);
    fresh.len = 0;
    if (fresh.overflow)
        ix.incomplete = 1;
    fresh.overflow = 0;
    pthread_mutex_unlock(&sf_agent_mu);
    for (unsigned i = 0; i < n; i++) {
        int gone;
        if (!ix_try(batch[i].fd, batch[i].gen, &gone) && !gone)
            ix_pend(batch[i].fd, batch[i].gen);
    }
}

/* The connects that were in progress: those now connected are indexed, the closed dropped. */
static void ix_retry_pending(void) {
    size_t keep = 0;
    for (size_t i = 0; i < ix.npending; i++) {
        int gone;
        if (!ix_try(ix.pending[i].fd, ix.pending[i].gen, &gone) && !gone)
            ix.pending[keep++] = ix.pending[i];
    }
    ix.npending = keep;
}

static void ix_walk_one(struct sf_conn *c, void *arg) {
    (void)arg;
    if (atomic_load(&c->kind) != SF_CONN)
        return;
    int gone;
    if (!ix_try(c->fd, atomic_load(&c->gen), &gone) && !gone)
        ix_pend(c->fd, atomic_load(&c->gen));
}

/* Indexes every connection of the fd table, if the index may be incomplete. */
static void ix_walk_all(void) {
    if (!ix.incomplete)
        return;
    ix.incomplete = 0; /* set again should the walk fail to index something */
    ix.npending = 0;   /* the walk lists the connects still in progress again */
    sf_for_each_conn(ix_walk_one, NULL);
}

/* The agent's start, before it reads a frame: a process that made its connections before its
 * agent ran (single-threaded, the agent started at a connection's 8th data call) has none of
 * them indexed, and its first SWITCH_RES or CLAIM_REQ would walk the table right on the switch's
 * path. The walk reads every slot of the table's chunks, and their pages the first time: 56-138
 * µs for sockperf and redis-benchmark, on the agent's first switch, between the host fd's arrival
 * and the leader's commit. Here it is done some calls before the threshold instead. */
void sf_router_index_all(void) {
    ix_drain();
    ix_walk_all();
}

static struct sf_conn *find_by_tuple(const struct sf_msg *m) {
    uint8_t key[12];
    key_of_msg(key, m);
    ix_drain();
    struct sf_conn *c = ix_get(key);
    if (c != NULL)
        return c;
    if (ix.incomplete) {
        ix_walk_all();
    } else if (ix.npending > 0) {
        ix_retry_pending();
    } else {
        return NULL;
    }
    return ix_get(key);
}

static void ix_forget_all(void) {
    free(ix.t);
    free(ix.pending);
    ix.t = NULL;
    ix.pending = NULL;
    ix.cap = ix.used = ix.npending = ix.cappending = 0;
    ix.incomplete = 1;
    fresh.len = 0;
    fresh.overflow = 0;
}

static void fill_tuple(struct sf_msg *m, const struct sf_conn *c) {
    m->local_ip = c->local.sin_addr.s_addr;
    m->remote_ip = c->remote.sin_addr.s_addr;
    m->local_port = c->local.sin_port;
    m->remote_port = c->remote.sin_port;
}

/* ---- per-destination backoff -------------------------------------------------------------- */

static int dest_blocked(uint32_t ip, uint64_t now) {
    for (int i = 0; i < AG_BACKOFF_SLOTS; i++)
        if (rt.backoff[i].ip == ip && rt.backoff[i].until_ms > now)
            return 1;
    return 0;
}

static void dest_failed(uint32_t ip, int failed) {
    uint64_t now = sf_now_ms();
    pthread_mutex_lock(&sf_agent_mu);
    struct dest_backoff *slot = NULL, *oldest = &rt.backoff[0];
    for (int i = 0; i < AG_BACKOFF_SLOTS; i++) {
        if (rt.backoff[i].ip == ip) slot = &rt.backoff[i];
        if (rt.backoff[i].until_ms < oldest->until_ms) oldest = &rt.backoff[i];
    }
    if (!failed) {
        if (slot) slot->step_ms = 0, slot->until_ms = 0;
    } else {
        if (!slot) {
            slot = oldest;
            slot->ip = ip;
            slot->step_ms = 0;
        }
        slot->step_ms = slot->step_ms ? slot->step_ms * 2 : 100;
        if (slot->step_ms > 10000) slot->step_ms = 10000;
        slot->until_ms = now + slot->step_ms;
    }
    pthread_mutex_unlock(&sf_agent_mu);
}

/* ---- the channel -------------------------------------------------------------------------- */

static int chan_send(const struct sf_msg *m) {
    if (rt.chan < 0)
        return -1;
    ssize_t n = real.send(rt.chan, m, sizeof *m, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n == (ssize_t)sizeof *m)
        return 0;
    if (n < 0 && errno == EAGAIN) {
        /* The router is slow; wait a little (this is the agent, not the application). */
        struct pollfd p = {.fd = rt.chan, .events = POLLOUT};
        if (real.poll(&p, 1, 100) == 1)
            n = real.send(rt.chan, m, sizeof *m, MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    return n == (ssize_t)sizeof *m ? 0 : -1;
}

int sf_router_open(void) {
    if (rt.chan >= 0) {
        /* Opened by the application thread before the agent started: the agent watches it. */
        if (!rt.chan_watched && sf_agent_watch(rt.chan, EPOLLIN, AG_TAG_CHAN) == 0)
            rt.chan_watched = 1;
        return 0;
    }
    uint64_t now = sf_now_ms();
    if (now < rt.chan_retry_ms)
        return -1;
    /* A unix socket whose connect failed can connect again: kept between tries, it is one fd
     * the library holds all along rather than one it takes for a moment every try, which an
     * application at its fd limit would meet as EMFILE while the router is away. */
    int fd = rt.unconnected;
    if (fd < 0)
        fd = sf_private_fd(real.socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    memcpy(sun.sun_path, sf_cfg.router_path, sizeof sf_cfg.router_path);
    if (fd < 0 || real.connect(fd, (struct sockaddr *)&sun, sizeof sun) != 0) {
        int err = errno;
        rt.unconnected = fd;
        rt.chan_step_ms = rt.chan_step_ms ? rt.chan_step_ms * 2 : 250;
        if (rt.chan_step_ms > 10000) rt.chan_step_ms = 10000;
        rt.chan_retry_ms = now + rt.chan_step_ms;
        if (!rt.warned_router++)
            SF_LOG("router at %s unreachable (%s): connections stay on the overlay",
                   sf_cfg.router_path, strerror(err));
        return -1;
    }
    rt.unconnected = -1;
    rt.chan_step_ms = 0;
    rt.warned_router = 0;
    /* HELLO first: an application thread may send a SWITCH_REQ as soon as the channel shows. */
    struct sf_msg hello = {.magic = SF_MSG_MAGIC, .type = SF_HELLO, .pid = (uint32_t)getpid(),
                           .arg = (uint64_t)sf_cfg.mode};
    if (real.send(fd, &hello, sizeof hello, MSG_DONTWAIT | MSG_NOSIGNAL) != (ssize_t)sizeof hello) {
        sf_private_close(fd);
        rt.chan_retry_ms = now + 250;
        return -1;
    }
    pthread_mutex_lock(&sf_agent_mu);
    rt.chan = fd;
    pthread_mutex_unlock(&sf_agent_mu);
    rt.chan_watched = sf_agent_watch(fd, EPOLLIN, AG_TAG_CHAN) == 0;
    SF_LOG("router channel open: %s", sf_cfg.router_path);
    return 0;
}

/* ---- asking for a host connection --------------------------------------------------------- */

/* Its bytes would not all pass the wrappers (a ring in the process), or its socket's MSG_ZEROCOPY
 * completions would not follow it (swap.c sf_zerocopy_on). Asked again when the host connection
 * arrives: either may have begun since the request. Caller holds c->mu. */
static int not_switchable(struct sf_conn *c) {
    return sf_uses_io_uring() || sf_zerocopy_on(c);
}

void sf_router_request(struct sf_conn *c) {
    pthread_mutex_lock(&c->mu);
    c->attempted = 1;
    pthread_cond_broadcast(&c->cv);
    if (atomic_load(&c->phase) != SF_P_OVERLAY || atomic_load(&c->kind) != SF_CONN)
        goto out;
    if (fill_addrs(c) != 0) {
        c->next_trigger = atomic_load(&c->calls) + sf_cfg.threshold; /* not connected yet */
        goto out;
    }
    if (!sf_is_overlay_addr((struct sockaddr *)&c->remote) || not_switchable(c)) {
        sf_set_phase(c, SF_P_PINNED);
        goto out;
    }
    uint64_t now = sf_now_ms();
    pthread_mutex_lock(&sf_agent_mu);
    int blocked = dest_blocked(c->remote.sin_addr.s_addr, now);
    pthread_mutex_unlock(&sf_agent_mu);
    if (blocked || sf_router_open() != 0) {
        sf_retry_later_locked(c);
        goto out;
    }
    struct sf_msg m = {.magic = SF_MSG_MAGIC, .type = SF_SWITCH_REQ, .seq = next_seq()};
    fill_tuple(&m, c);
    sf_set_phase(c, SF_P_REQUESTED);
    c->outstanding = 1;
    if (chan_send(&m) != 0) {
        sf_handoff_abort_locked(c, SF_INTERNAL, 1);
    } else {
        atomic_fetch_add(&rt.asked_by_agent, 1);
        SF_LOG("fd %d (port %u->%u): asked the router for a host connection (seq %u, by the "
               "agent)", c->fd, ntohs(c->local.sin_port), ntohs(c->remote.sin_port), m.seq);
    }
out:
    pthread_mutex_unlock(&c->mu);
}

/* The application thread whose call reached the threshold sends the SWITCH_REQ itself, so the
 * switch starts without an agent wake-up. Only when nothing is in doubt: its locks free at once (it
 * never waits for one), the connection on the overlay with its addresses known, an overlay
 * destination, no io_uring by a fresh look nor SO_ZEROCOPY, the peer host not in backoff, the
 * channel open in this process and the datagram taken whole without blocking (SOCK_SEQPACKET: one
 * send is one frame, whatever other threads send at the same time). Otherwise it returns 0 and the
 * agent takes the trigger as before (sf_router_request), which also handles every refusal. What the
 * agent keeps doing: the answer (on_switch_res), the request's timeout (handoff.c expire, on its
 * next tick: at most a second late, should the router never answer), backoff on failures, and the
 * switch window, which the caller opened and which this request keeps open. errno is the caller's
 * to keep. */
int sf_router_request_now(struct sf_conn *c) {
    if (pthread_mutex_trylock(&c->mu) != 0)
        return 0;
    int sent = 0;
    uint64_t now = sf_now_ms();
    if (atomic_load(&c->phase) != SF_P_OVERLAY || atomic_load(&c->kind) != SF_CONN ||
        fill_addrs(c) != 0 || !sf_is_overlay_addr((struct sockaddr *)&c->remote) ||
        sf_uring_maybe(now) || sf_zerocopy_on(c))
        goto out;
    if (pthread_mutex_trylock(&sf_agent_mu) != 0)
        goto out;
    struct sf_msg m = {.magic = SF_MSG_MAGIC, .type = SF_SWITCH_REQ};
    if (rt.chan >= 0 && sf_agent_is_this_process() &&
        !dest_blocked(c->remote.sin_addr.s_addr, now)) {
        m.seq = next_seq();
        fill_tuple(&m, c);
        sent = real.send(rt.chan, &m, sizeof m, MSG_DONTWAIT | MSG_NOSIGNAL) == (ssize_t)sizeof m;
    }
    pthread_mutex_unlock(&sf_agent_mu);
    if (!sent)
        goto out;
    /* Under c->mu still: the answer, read by the agent, finds the connection REQUESTED. */
    c->attempted = 1;
    sf_set_phase(c, SF_P_REQUESTED);
    c->outstanding = 1;
    atomic_fetch_add(&rt.asked_by_app, 1);
    SF_LOG("fd %d (port %u->%u): asked the router for a host connection (seq %u, by the "
           "application thread %ld)", c->fd, ntohs(c->local.sin_port), ntohs(c->remote.sin_port),
           m.seq, (long)syscall(SYS_gettid));
out:
    pthread_mutex_unlock(&c->mu);
    return sent;
}

/* ---- frames from the router --------------------------------------------------------------- */

enum { RECV_OK = 0, RECV_AGAIN, RECV_CLOSED, RECV_MALFORMED };

/* One frame from the router, with the fd it carries (or -1) in *fd. */
static int recv_frame(struct sf_msg *m, int *fd) {
    char cbuf[CMSG_SPACE(sizeof(int) * 4)];
    struct iovec iov = {.iov_base = m, .iov_len = sizeof *m};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                        .msg_controllen = sizeof cbuf};
    *fd = -1;
    ssize_t n = real.recvmsg(rt.chan, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0)
        return errno == EAGAIN || errno == EINTR ? RECV_AGAIN : RECV_CLOSED;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        int nfds = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *fds = (int *)CMSG_DATA(cm);
        for (int i = 0; i < nfds; i++) {
            if (*fd < 0)
                *fd = fds[i];
            else
                real.close(fds[i]); /* never more than one expected */
        }
    }
    if (n == 0)
        return RECV_CLOSED;
    /* At RLIMIT_NOFILE the kernel drops the passed fd and sets MSG_CTRUNC: the frame still
     * counts, without its host connection (on_switch_res then leaves it on the overlay). */
    if (mh.msg_flags & MSG_CTRUNC)
        SF_LOG("router frame type %u arrived without its fd (no free fd in this process)",
               n >= 8 ? m->type : 0);
    if (n != (ssize_t)sizeof *m || m->magic != SF_MSG_MAGIC) {
        if (*fd >= 0)
            real.close(*fd);
        *fd = -1;
        SF_LOG("router sent a malformed frame (%zd bytes); ignored", n);
        return RECV_MALFORMED;
    }
    return RECV_OK;
}

/* Caller holds c->mu, which find_by_tuple did not: between the lookup and the lock the
 * application may have closed the fd and opened its next connection on the same number, and
 * that one may be REQUESTED too. It must not take the closed one's host connection (its peer
 * is the closed connection's peer, whose SYNC names another stream). */
static int still_names(const struct sf_conn *c, const struct sf_msg *m) {
    if (atomic_load(&c->kind) != SF_CONN || !c->have_addrs)
        return 0;
    uint8_t want[12], have[12];
    key_of_msg(want, m);
    key_of_conn(have, c);
    return memcmp(want, have, 12) == 0;
}

static void on_switch_res(const struct sf_msg *m, int fd) {
    struct sf_conn *c = find_by_tuple(m);
    if (c == NULL) {
        if (fd >= 0) real.close(fd);
        return;
    }
    pthread_mutex_lock(&c->mu);
    if (!still_names(c, m)) {
        pthread_mutex_unlock(&c->mu);
        SF_LOG("fd %d: host connection arrived for the connection the fd held before; closed",
               c->fd);
        if (fd >= 0) real.close(fd);
        return;
    }
    int phase = atomic_load(&c->phase);
    int began = 0;
    if (phase != SF_P_REQUESTED) {
        if (fd >= 0) {
            SF_LOG("fd %d: host connection arrived in phase %d; closed", c->fd, phase);
            real.close(fd);
        }
    } else if (m->status == SF_OK && fd >= 0 && not_switchable(c)) {
        real.close(fd);
        sf_handoff_abort_locked(c, SF_NO_ROUTE, 0);
    } else if (m->status == SF_OK && fd >= 0) {
        sf_handoff_begin_locked(c, sf_private_fd(fd));
        /* The peer's frame may be in already: the follower's READY (its fd often comes first),
         * or in slim mode a leader's early SYNC (it reaches the follower before its router's fd
         * does). Read it now rather than after another round of the agent's loop. */
        began = sf_cfg.mode == SF_MODE_SLIM ||
                (c->leader && atomic_load(&c->phase) == SF_P_HANDSHAKE);
    } else if (m->status == SF_DUPLICATE) {
        /* Another attempt for this connection is under way; its result will come. */
    } else if (--c->outstanding <= 0) {
        /* No route and policy are final. A refusal may just mean the peer has not accepted the
         * connection yet, so it is retried later for this connection only. So is an OK that
         * lost its fd on the way in (fd limit): fds may be free by the next attempt. */
        int final = m->status == SF_NO_ROUTE || m->status == SF_DENIED;
        if (m->status == SF_PEER_UNREACHABLE || m->status == SF_TIMEOUT)
            dest_failed(c->remote.sin_addr.s_addr, 1);
        sf_handoff_abort_locked(c, m->status == SF_OK ? SF_INTERNAL : m->status, !final);
    }
    uint64_t tag = ((uint64_t)atomic_load(&c->gen) << 32) | (uint32_t)c->fd;
    pthread_mutex_unlock(&c->mu);
    if (began) {
        sf_handoff_on_readable(tag);
        /* Committed by now if the READY was in (the commit copied them after its SYNC), else
         * waiting for it: the agent copies them meanwhile. Not while a writer is to commit
         * (its write was in flight): it would wait here for c->mu; the swap copies them. */
        pthread_mutex_lock(&c->mu);
        if (atomic_load(&c->gen) == (uint32_t)(tag >> 32) && !c->commit_wanted)
            sf_handoff_copy_opts_locked(c);
        pthread_mutex_unlock(&c->mu);
    }
}

/* Claims this process said NOT_MINE to for want of the connection: the connecting end reached
 * its threshold before this end's application accepted (its router asks again, for a while,
 * at growing intervals: switchpath/switch.c not_accepted_yet). The peer's threshold counts for
 * both ends, so the application thread that accepts one of them asks for its switch at once
 * (wrap_sock.c), and its router hands it the waiting OFFER's connection; waiting for the next
 * ask, the connecting end's bytes crossed VXLAN for up to 8 ms more. Written by the agent alone;
 * a torn read costs one early or one missed request, never a byte. */
#define REFUSED_SLOTS 16
#define REFUSED_MS 1000

static struct {
    _Atomic uint64_t peer;     /* the claim's remote (ip << 16 | port), network order */
    _Atomic uint64_t until_ms; /* 0: free */
} refused[REFUSED_SLOTS];
static unsigned refused_next;
_Atomic uint64_t sf_refused_live_until; /* the latest until_ms; 0: none can be live */

static uint64_t peer_key(uint32_t ip, uint16_t port) {
    return (uint64_t)ip << 16 | port;
}

static void note_refused_claim(const struct sf_msg *m) {
    uint64_t until = sf_now_ms() + REFUSED_MS;
    unsigned i = refused_next++ % REFUSED_SLOTS;
    atomic_store_explicit(&refused[i].peer, peer_key(m->remote_ip, m->remote_port),
                          memory_order_relaxed);
    atomic_store_explicit(&refused[i].until_ms, until, memory_order_release);
    atomic_store(&sf_refused_live_until, until);
}

int sf_claim_was_refused(const struct sockaddr *peer) {
    uint64_t live = atomic_load_explicit(&sf_refused_live_until, memory_order_relaxed);
    if (live == 0 || peer == NULL || peer->sa_family != AF_INET)
        return 0;
    uint64_t now = sf_now_ms();
    if (now > live) {
        atomic_compare_exchange_strong(&sf_refused_live_until, &live, 0);
        return 0;
    }
    const struct sockaddr_in *in = (const struct sockaddr_in *)peer;
    uint64_t key = peer_key(in->sin_addr.s_addr, in->sin_port);
    for (unsigned i = 0; i < REFUSED_SLOTS; i++) {
        uint64_t until = atomic_load_explicit(&refused[i].until_ms, memory_order_acquire);
        if (until >= now && atomic_load_explicit(&refused[i].peer, memory_order_relaxed) == key) {
            atomic_store_explicit(&refused[i].until_ms, 0, memory_order_relaxed);
            return 1;
        }
    }
    return 0;
}

static void on_claim(const struct sf_msg *m) {
    struct sf_msg r = *m;
    r.type = SF_CLAIM_RES;
    r.status = SF_NOT_MINE;
    struct sf_conn *c = sf_cfg.mode == SF_MODE_OVERLAY ? NULL : find_by_tuple(m);
    if (c != NULL) {
        pthread_mutex_lock(&c->mu);
        int phase = still_names(c, m) ? atomic_load(&c->phase) : SF_P_PINNED;
        if (phase == SF_P_OVERLAY && not_switchable(c)) {
            sf_set_phase(c, SF_P_PINNED);
        } else if (phase == SF_P_OVERLAY) {
            atomic_store(&c->decided_us, sf_now_us());
            atomic_store(&c->initiated, 0);
            sf_window_open(c);
            sf_set_phase(c, SF_P_REQUESTED);
            c->outstanding = 1;
            r.status = SF_OK;
        } else if (phase == SF_P_REQUESTED) {
            c->outstanding++;
            r.status = SF_OK;
        }
        pthread_mutex_unlock(&c->mu);
    } else if (sf_cfg.mode == SF_MODE_SHUNTFLOW) {
        note_refused_claim(m);
    }
    chan_send(&r);
}

struct stats_walk {
    uint32_t seq;
};

static void report_conn(struct sf_conn *c, void *arg) {
    struct stats_walk *w = arg;
    if (atomic_load(&c->kind) != SF_CONN)
        return;
    pthread_mutex_lock(&c->mu);
    fill_addrs(c);
    int phase = atomic_load(&c->phase);
    struct sf_msg m = {.magic = SF_MSG_MAGIC, .type = SF_CONN_INFO, .seq = w->seq};
    fill_tuple(&m, c);
    m.status = phase == SF_P_HOST     ? SF_PATH_HOST
               : phase == SF_P_PINNED ? SF_PATH_PINNED
               : phase >= SF_P_REQUESTED ? SF_PATH_SWITCHING
                                         : SF_PATH_OVERLAY;
    m.arg = sf_overlay_bytes(c);
    m.arg2 = sf_host_bytes(c);
    pthread_mutex_unlock(&c->mu);
    chan_send(&m);
}

static void on_stats(const struct sf_msg *m) {
    struct stats_walk w = {m->seq};
    sf_for_each_conn(report_conn, &w);
    struct sf_msg end = {.magic = SF_MSG_MAGIC, .type = SF_STATS_END, .seq = m->seq,
                         .arg = atomic_load(&rt.switches_done),
                         .arg2 = atomic_load(&rt.switches_failed)};
    chan_send(&end);
}

static void abort_requests(struct sf_conn *c, void *arg) {
    (void)arg;
    if (atomic_load(&c->kind) != SF_CONN)
        return;
    pthread_mutex_lock(&c->mu);
    if (atomic_load(&c->phase) == SF_P_REQUESTED)
        sf_handoff_abort_locked(c, SF_PEER_UNREACHABLE, 1);
    pthread_mutex_unlock(&c->mu);
}

static void chan_lost(void) {
    SF_LOG("router channel closed: connections stay on the overlay until it is back");
    pthread_mutex_lock(&sf_agent_mu); /* no application thread sends on it from now on */
    int chan = rt.chan;
    rt.chan = -1;
    rt.chan_watched = 0;
    pthread_mutex_unlock(&sf_agent_mu);
    sf_agent_unwatch(chan);
    sf_private_close(chan);
    rt.chan_retry_ms = sf_now_ms() + 250;
    sf_for_each_conn(abort_requests, NULL);
}

void sf_router_on_readable(void) {
    for (int i = 0; i < 64 && rt.chan >= 0; i++) {
        struct sf_msg m;
        int fd;
        int rc = recv_frame(&m, &fd);
        if (rc == RECV_AGAIN)
            return;
        if (rc == RECV_CLOSED) {
            if (fd >= 0)
                real.close(fd);
            chan_lost();
            return;
        }
        if (rc == RECV_MALFORMED)
            continue;
        switch (m.type) {
        case SF_HELLO_ACK: break;
        case SF_SWITCH_RES: on_switch_res(&m, fd); fd = -1; break;
        case SF_CLAIM_REQ: on_claim(&m); break;
        case SF_STATS_REQ: on_stats(&m); break;
        default: SF_LOG("router sent frame type %u; ignored", m.type); break;
        }
        if (fd >= 0)
            real.close(fd);
    }
}

/* ---- reports: frames other parts queue for the router ------------------------------------- */

/* The reports are held while a switch of this process is under way (in slim mode most of the
 * time at a connection rate that keeps one in flight; in a burst of switches, until the burst's
 * last one is done): each frame wakes the router on the vCPU the switches need, and reports are
 * figures, not steps of a switch. They go together once no switch is under way, or at
 * REPORT_HOLD_MS, or with the queue half full. Caller holds sf_agent_mu. */
#define REPORT_HOLD_MS 50

static int reports_held(uint64_t now) {
    return atomic_load(&sf_in_transition) > 0 && rt.reports_len < AG_REPORT_QUEUE / 2 &&
           now - rt.reports_since_ms < REPORT_HOLD_MS;
}

/* The figures the router keeps about switches (SWITCH_DONE at a commit, SWITCH_CALLS when a
 * switch window closes) arise where the switch happens to be, often on an application thread,
 * which must not touch the channel: it queues the frame for the agent, which sends it at the end
 * of its round. It is woken for it only if that round is not due soon or the queue fills up. */
void sf_router_report(const struct sf_msg *m) {
    pthread_mutex_lock(&sf_agent_mu);
    uint64_t now = sf_now_ms();
    if (rt.reports_len == 0)
        rt.reports_since_ms = now;
    if (rt.reports_len < AG_REPORT_QUEUE)
        rt.reports[rt.reports_len++] = *m;
    if (!reports_held(now) &&
        (rt.reports_len >= AG_REPORT_QUEUE / 4 || !sf_agent_awake_within(AG_REPORT_LAG_MS)))
        sf_agent_kick_locked();
    pthread_mutex_unlock(&sf_agent_mu);
}

/* The switch time: decided -> first byte on the host path. */
void sf_router_report_switch_time(struct sf_conn *c) {
    struct sf_msg m = {.magic = SF_MSG_MAGIC, .type = SF_SWITCH_DONE,
                       .arg = sf_now_us() - atomic_load(&c->decided_us),
                       .arg2 = (uint64_t)atomic_load(&c->initiated)};
    fill_tuple(&m, c);
    sf_router_report(&m);
}

/* Caller holds sf_agent_mu, which this releases. */
static void send_reports_unlock(void) {
    struct sf_msg batch[AG_REPORT_QUEUE];
    unsigned n = rt.reports_len;
    memcpy(batch, rt.reports, n * sizeof batch[0]);
    rt.reports_len = 0;
    pthread_mutex_unlock(&sf_agent_mu);
    for (unsigned i = 0; i < n && rt.chan >= 0; i++)
        chan_send(&batch[i]);
}

/* The agent's epoll bound while reports wait (0: none wait). */
int sf_router_reports_wait_ms(void) {
    return __atomic_load_n(&rt.reports_len, __ATOMIC_RELAXED) ? REPORT_HOLD_MS : 0;
}

void sf_router_send_reports(void) {
    pthread_mutex_lock(&sf_agent_mu);
    if (rt.reports_len == 0 || reports_held(sf_now_ms())) {
        pthread_mutex_unlock(&sf_agent_mu);
        return;
    }
    send_reports_unlock();
}

/* Reports queued just before the process exits (the figures of its last switches) would die
 * with the agent thread: the exiting thread sends them (agent_at_exit). Only if sf_agent_mu is
 * free: exit() from a signal handler may have interrupted its own holder. Not after _exit, nor
 * for a window still waiting for a call in flight. */
void sf_router_at_exit(void) {
    if (sf_agent_is_this_process() && pthread_mutex_trylock(&sf_agent_mu) == 0)
        send_reports_unlock();
}
