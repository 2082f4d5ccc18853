/* agent.c -- the background thread that moves connections, so the application never waits.
 *
 * One agent per process, started at the first tracked connection (and again in a forked child,
 * lazily). It owns every conversation the switch needs:
 *   - the persistent SOCK_SEQPACKET channel to the router (docs/wire.md section 1): switch
 *     requests, claims from peer routers, statistics;
 *   - the first 16-byte frames on each new host connection (docs/wire.md section 3): READY,
 *     SYNC, ABORT. It reads exactly those frames and never an application byte.
 * Application threads only hand it work (a queue and an eventfd) and, when a write is in flight
 * at the moment the agent wants to commit, finish that commit themselves (sf_agent_commit).
 * Any failure before a commit leaves the connection on the overlay (fail-open). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/un.h>
#include <unistd.h>

#include "sf_core.h"

#define AG_QUEUE 4096
#define AG_BACKOFF_SLOTS 64
#define AG_REQUEST_TIMEOUT_MS 3000
#define AG_READY_TIMEOUT_MS 1000
#define AG_TAG_EVENT 0xFFFFFFFFFFFFFFFEull
#define AG_TAG_CHAN 0xFFFFFFFFFFFFFFFDull
#define AG_REPORT_QUEUE 512 /* two frames per switch end: SWITCH_DONE, SWITCH_CALLS */
#define AG_LINGER_MAX 256
#define AG_LINGER_MS 30000
#define AG_EXIT_LINGER_MS 2000

/* A host socket whose connection the application closed before the peer's last handoff frame
 * came; see sf_agent_linger_host. */
struct lingering {
    int fd;
    uint8_t len;
    uint8_t hop[16];
    uint64_t until_ms;
};

struct dest_backoff {
    uint32_t ip;
    uint64_t until_ms;
    uint64_t step_ms;
};

static struct {
    pthread_mutex_t mu;        /* queue, channel fd, backoff table */
    pid_t pid;                 /* process that started this agent; a fork child has another */
    int epfd, evfd, chan;
    uint64_t chan_retry_ms, chan_step_ms;
    uint32_t seq;
    struct { int fd; uint32_t gen; } queue[AG_QUEUE];
    unsigned q_head, q_len;
    struct dest_backoff backoff[AG_BACKOFF_SLOTS];
    struct sf_msg reports[AG_REPORT_QUEUE]; /* frames waiting for the agent to send them */
    unsigned reports_len;
    struct lingering lingering[AG_LINGER_MAX]; /* host sockets of closed connections (below) */
    unsigned n_lingering;
    _Atomic uint64_t switches_done, switches_failed;
    int warned_router;
} ag = {.mu = PTHREAD_MUTEX_INITIALIZER, .epfd = -1, .evfd = -1, .chan = -1};

static void *agent_main(void *arg);

void sf_agent_count_switch(int ok) {
    atomic_fetch_add(ok ? &ag.switches_done : &ag.switches_failed, 1);
}

/* ---- starting, forking -------------------------------------------------------------------- */

void sf_agent_ensure(void) {
    pid_t me = getpid();
    if (SF_UNLIKELY(__atomic_load_n(&ag.pid, __ATOMIC_ACQUIRE) != me)) {
        pthread_mutex_lock(&ag.mu);
        if (ag.pid != me) {
            int epfd = real.epoll_create1(EPOLL_CLOEXEC);
            int evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
            if (epfd < 0 || evfd < 0) {
                if (epfd >= 0) real.close(epfd);
                if (evfd >= 0) real.close(evfd);
                SF_LOG("agent: cannot create its fds (%s); staying on the overlay", strerror(errno));
                pthread_mutex_unlock(&ag.mu);
                return;
            }
            ag.epfd = sf_private_fd(epfd);
            ag.evfd = sf_private_fd(evfd);
            struct epoll_event ev = {.events = EPOLLIN, .data.u64 = AG_TAG_EVENT};
            real.epoll_ctl(ag.epfd, EPOLL_CTL_ADD, ag.evfd, &ev);
            /* The agent must never take a signal meant for the application. */
            sigset_t all, old;
            sigfillset(&all);
            pthread_sigmask(SIG_SETMASK, &all, &old);
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            pthread_attr_setstacksize(&attr, 256 * 1024);
            pthread_t tid;
            int rc = pthread_create(&tid, &attr, agent_main, NULL);
            pthread_attr_destroy(&attr);
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            if (rc != 0) {
                SF_LOG("agent: cannot start its thread (%s)", strerror(rc));
                real.close(ag.epfd); sf_private_forget(ag.epfd);
                real.close(ag.evfd); sf_private_forget(ag.evfd);
                ag.epfd = ag.evfd = -1;
            } else {
                __atomic_store_n(&ag.pid, me, __ATOMIC_RELEASE);
            }
        }
        pthread_mutex_unlock(&ag.mu);
    }
}

void sf_agent_after_fork_child(void) {
    pthread_mutex_init(&ag.mu, NULL);
    int fds[3] = {ag.epfd, ag.evfd, ag.chan};
    for (int i = 0; i < 3; i++)
        if (fds[i] >= 0) {
            real.close(fds[i]);
            sf_private_forget(fds[i]);
        }
    ag.epfd = ag.evfd = ag.chan = -1;
    ag.q_len = ag.q_head = 0;
    ag.reports_len = 0; /* the parent reports its own switches */
    for (unsigned i = 0; i < ag.n_lingering; i++) {
        real.close(ag.lingering[i].fd); /* the parent drains them */
        sf_private_forget(ag.lingering[i].fd);
    }
    ag.n_lingering = 0;
    sf_fins_after_fork_child();
    ag.chan_retry_ms = 0;
    ag.pid = 0;
}

struct moved {
    int from, to;
};

static void move_host_fd(struct sf_conn *c, void *arg) {
    struct moved *m = arg;
    if (c->host_fd == m->from)
        c->host_fd = m->to;
    if (c->pending_close_host == m->from)
        c->pending_close_host = m->to;
}

void sf_agent_private_moved(int from, int to) {
    struct moved m = {from, to};
    int *mine[3] = {&ag.epfd, &ag.evfd, &ag.chan};
    for (int i = 0; i < 3; i++)
        if (*mine[i] == from)
            *mine[i] = to;
    pthread_mutex_lock(&ag.mu);
    for (unsigned i = 0; i < ag.n_lingering; i++)
        if (ag.lingering[i].fd == from)
            ag.lingering[i].fd = to;
    pthread_mutex_unlock(&ag.mu);
    sf_fins_private_moved(from, to);
    sf_for_each_conn(move_host_fd, &m);
}

/* ---- host connections the application closed mid-handoff ---------------------------------- */

/* The application closed a connection whose host socket may still get a handoff frame from the
 * peer (its SYNC, when this end had committed or the peer may have). Closed now, the socket
 * would be orphaned, and a frame arriving at an orphaned socket makes the kernel reset the
 * connection: the peer then loses whatever of this end's last writes was still in flight, and
 * reads ECONNRESET where it should read EOF (seen in an underlay flap, where the SYNC came
 * late). So the agent keeps it: FIN now, after the data; close once the frame is in (or the
 * peer's EOF, an error, AG_LINGER_MS). Bytes after the frame still reset it on close, as they
 * would an overlay socket closed with unread data. Caller holds c->mu and c->wmu. Returns 0 if
 * the agent took the socket, -1 if the caller must close it itself. */
int sf_agent_linger_host(int host, const uint8_t *partial, int len) {
    struct linger lg;
    socklen_t ll = sizeof lg;
    if (real.getsockopt(host, SOL_SOCKET, SO_LINGER, &lg, &ll) == 0 && lg.l_onoff &&
        lg.l_linger == 0)
        return -1; /* the application asked for a reset on close */
    int taken = -1;
    pthread_mutex_lock(&ag.mu);
    if (ag.epfd >= 0 && ag.n_lingering < AG_LINGER_MAX) {
        real.epoll_ctl(ag.epfd, EPOLL_CTL_DEL, host, NULL);
        real.shutdown(host, SHUT_WR);
        struct lingering *l = &ag.lingering[ag.n_lingering++];
        l->fd = host;
        l->len = (uint8_t)len;
        memcpy(l->hop, partial, (size_t)len);
        l->until_ms = sf_now_ms() + AG_LINGER_MS;
        taken = 0;
    }
    pthread_mutex_unlock(&ag.mu);
    if (taken == 0)
        SF_LOG("host fd %d: its connection closed before the peer's last handoff frame; kept "
               "until it comes", host);
    return taken;
}

/* 1 when the lingering socket can be closed. */
static int linger_done(struct lingering *l, uint64_t now) {
    for (;;) {
        ssize_t n = real.recv(l->fd, l->hop + l->len, sizeof(struct sf_hop) - l->len, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return now > l->until_ms;
        if (n <= 0)
            return 1;
        l->len = (uint8_t)(l->len + n);
        if (l->len < sizeof(struct sf_hop))
            continue;
        struct sf_hop hop;
        memcpy(&hop, l->hop, sizeof hop);
        l->len = 0;
        if (hop.magic != SF_HOP_MAGIC || hop.type != SF_HOP_READY)
            return 1; /* SYNC or ABORT: the last frame; anything else is not ours to read */
    }
}

/* Caller holds ag.mu. */
static void close_lingering_done(uint64_t now) {
    for (unsigned i = 0; i < ag.n_lingering;) {
        struct lingering *l = &ag.lingering[i];
        if (linger_done(l, now)) {
            real.close(l->fd);
            sf_private_forget(l->fd);
            *l = ag.lingering[--ag.n_lingering];
        } else {
            i++;
        }
    }
}

static void poll_lingering(uint64_t now) {
    pthread_mutex_lock(&ag.mu);
    close_lingering_done(now);
    pthread_mutex_unlock(&ag.mu);
}

/* Caller holds c->mu: the application is done with the connection (it closed it, or the
 * process exits) while the peer's SYNC may still come. Unless a writer is in the host socket
 * (it is then closed as before), the agent keeps it. */
void sf_agent_linger_conn_locked(struct sf_conn *c) {
    int phase = atomic_load(&c->phase);
    if (c->host_fd < 0 || c->peer_synced || (phase != SF_P_HANDSHAKE && phase != SF_P_COMMITTED))
        return;
    if (pthread_mutex_trylock(&c->wmu) != 0)
        return;
    if (sf_agent_linger_host(c->host_fd, c->hop, c->hop_len) == 0)
        __atomic_store_n(&c->host_fd, -1, __ATOMIC_SEQ_CST);
    sf_wmu_unlock(c);
}

/* At exit the kernel closes what the application left open, host sockets mid-handoff too. */
static void linger_open_conn(struct sf_conn *c, void *arg) {
    (void)arg;
    if (atomic_load(&c->kind) != SF_CONN || pthread_mutex_trylock(&c->mu) != 0)
        return;
    if (c->host_fd >= 0)
        sf_agent_pump_locked(c);
    sf_agent_linger_conn_locked(c);
    pthread_mutex_unlock(&c->mu);
}

/* A process that exits right after such a close (or with such a connection open) would take
 * the kept sockets with it, and the late frame would reset the connection after all: the
 * exiting thread waits for it, up to AG_EXIT_LINGER_MS. Only if the locks are free (see
 * send_reports_at_exit); not after _exit. */
__attribute__((destructor)) static void linger_at_exit(void) {
    if (__atomic_load_n(&ag.pid, __ATOMIC_ACQUIRE) != getpid())
        return;
    if (atomic_load(&sf_in_transition) > 0)
        sf_for_each_conn(linger_open_conn, NULL);
    if (pthread_mutex_trylock(&ag.mu) != 0)
        return;
    uint64_t until = sf_now_ms() + AG_EXIT_LINGER_MS;
    for (;;) {
        uint64_t now = sf_now_ms();
        close_lingering_done(now);
        if (ag.n_lingering == 0 || now >= until)
            break;
        struct pollfd p[AG_LINGER_MAX];
        for (unsigned i = 0; i < ag.n_lingering; i++)
            p[i] = (struct pollfd){.fd = ag.lingering[i].fd, .events = POLLIN};
        real.poll(p, ag.n_lingering, (int)(until - now));
    }
    pthread_mutex_unlock(&ag.mu);
}

/* ---- the work queue: application threads -> agent ---------------------------------------- */

/* Nobody will take this trigger: the agent could not start (the process is at its fd limit)
 * or its queue is full. The attempt ends before it began, as when the peer host is in backoff:
 * retry after twice the calls, close the switch window (else every later call would be timed),
 * and let a slim connect() waiting for the attempt go on at once. */
static void trigger_dropped(struct sf_conn *c) {
    pthread_mutex_lock(&c->mu);
    if (atomic_load(&c->phase) == SF_P_OVERLAY) {
        if (atomic_load(&c->next_trigger) == UINT32_MAX) {
            uint32_t calls = atomic_load(&c->calls);
            c->next_trigger = calls * 2 > sf_cfg.threshold ? calls * 2 : sf_cfg.threshold;
        }
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
    int queued = 0;
    pthread_mutex_lock(&ag.mu);
    if (ag.evfd >= 0 && ag.q_len < AG_QUEUE) {
        unsigned slot = (ag.q_head + ag.q_len++) % AG_QUEUE;
        ag.queue[slot].fd = c->fd;
        ag.queue[slot].gen = atomic_load(&c->gen);
        uint64_t one = 1;
        (void)!real.write(ag.evfd, &one, sizeof one);
        queued = 1;
    }
    pthread_mutex_unlock(&ag.mu);
    if (SF_UNLIKELY(!queued))
        trigger_dropped(c);
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

struct lookup {
    const struct sf_msg *m;
    struct sf_conn *found;
};

static void match_conn(struct sf_conn *c, void *arg) {
    struct lookup *l = arg;
    if (l->found || atomic_load(&c->kind) != SF_CONN)
        return;
    if (!c->have_addrs) {
        pthread_mutex_lock(&c->mu);
        fill_addrs(c);
        pthread_mutex_unlock(&c->mu);
    }
    if (c->have_addrs && c->local.sin_addr.s_addr == l->m->local_ip &&
        c->remote.sin_addr.s_addr == l->m->remote_ip && c->local.sin_port == l->m->local_port &&
        c->remote.sin_port == l->m->remote_port)
        l->found = c;
}

static struct sf_conn *find_by_tuple(const struct sf_msg *m) {
    struct lookup l = {m, NULL};
    sf_for_each_conn(match_conn, &l);
    return l.found;
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
        if (ag.backoff[i].ip == ip && ag.backoff[i].until_ms > now)
            return 1;
    return 0;
}

static void dest_failed(uint32_t ip, int failed) {
    uint64_t now = sf_now_ms();
    pthread_mutex_lock(&ag.mu);
    struct dest_backoff *slot = NULL, *oldest = &ag.backoff[0];
    for (int i = 0; i < AG_BACKOFF_SLOTS; i++) {
        if (ag.backoff[i].ip == ip) slot = &ag.backoff[i];
        if (ag.backoff[i].until_ms < oldest->until_ms) oldest = &ag.backoff[i];
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
    pthread_mutex_unlock(&ag.mu);
}

/* ---- the router channel ------------------------------------------------------------------- */

static int chan_send(const struct sf_msg *m) {
    if (ag.chan < 0)
        return -1;
    ssize_t n = real.send(ag.chan, m, sizeof *m, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n == (ssize_t)sizeof *m)
        return 0;
    if (n < 0 && errno == EAGAIN) {
        /* The router is slow; wait a little (this is the agent, not the application). */
        struct pollfd p = {.fd = ag.chan, .events = POLLOUT};
        if (real.poll(&p, 1, 100) == 1)
            n = real.send(ag.chan, m, sizeof *m, MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    return n == (ssize_t)sizeof *m ? 0 : -1;
}

static int chan_open(void) {
    if (ag.chan >= 0)
        return 0;
    uint64_t now = sf_now_ms();
    if (now < ag.chan_retry_ms)
        return -1;
    int fd = real.socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    memcpy(sun.sun_path, sf_cfg.router_path, sizeof sf_cfg.router_path);
    if (fd < 0 || real.connect(fd, (struct sockaddr *)&sun, sizeof sun) != 0) {
        int err = errno;
        if (fd >= 0) real.close(fd);
        ag.chan_step_ms = ag.chan_step_ms ? ag.chan_step_ms * 2 : 250;
        if (ag.chan_step_ms > 10000) ag.chan_step_ms = 10000;
        ag.chan_retry_ms = now + ag.chan_step_ms;
        if (!ag.warned_router++)
            SF_LOG("router at %s unreachable (%s): connections stay on the overlay",
                   sf_cfg.router_path, strerror(err));
        return -1;
    }
    ag.chan = sf_private_fd(fd);
    ag.chan_step_ms = 0;
    ag.warned_router = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = AG_TAG_CHAN};
    real.epoll_ctl(ag.epfd, EPOLL_CTL_ADD, ag.chan, &ev);
    struct sf_msg hello = {.magic = SF_MSG_MAGIC, .type = SF_HELLO, .pid = (uint32_t)getpid(),
                           .arg = (uint64_t)sf_cfg.mode};
    if (chan_send(&hello) != 0)
        return -1;
    SF_LOG("router channel open: %s", sf_cfg.router_path);
    return 0;
}

/* ---- phase changes that end a switch attempt ---------------------------------------------- */

/* Caller holds c->mu. Once committed, application writers use host_fd under c->wmu only, so a
 * writer may be inside write(host_fd) right now (a host connection that fails while committed
 * goes BROKEN from under it): as at the swap, the number is closed by whoever next releases
 * c->wmu. Closing it here instead would let the writer hit EBADF, or write application bytes
 * into whatever connection the number names next. */
static void drop_host_fd(struct sf_conn *c) {
    int host = c->host_fd;
    if (host < 0)
        return;
    real.epoll_ctl(ag.epfd, EPOLL_CTL_DEL, host, NULL);
    __atomic_store_n(&c->host_fd, -1, __ATOMIC_SEQ_CST);
    if (c->pending_close_host >= 0) {
        /* c->wmu has been held since an earlier number was left pending: its holder loaded
         * that one, never this one. */
        real.close(host);
        sf_private_forget(host);
        return;
    }
    c->pending_close_host = host;
    if (pthread_mutex_trylock(&c->wmu) == 0)
        sf_wmu_unlock(c);
}

/* Before any commit: the connection simply stays on the overlay. Caller holds c->mu. */
static void abort_switch(struct sf_conn *c, int status, int retry) {
    drop_host_fd(c);
    c->hop_len = 0;
    c->outstanding = 0;
    uint32_t calls = atomic_load(&c->calls);
    /* Retry after twice as many calls as so far: a storm of failures costs little. */
    c->next_trigger = calls * 2 > sf_cfg.threshold ? calls * 2 : sf_cfg.threshold;
    c->last_status = (uint16_t)status;
    sf_set_phase(c, retry ? SF_P_OVERLAY : SF_P_PINNED);
    sf_rearm_locked(c);
    sf_agent_count_switch(0);
    SF_LOG("fd %d: switch abandoned (status %d), stays on the overlay", c->fd, status);
}

/* ---- handling router messages ------------------------------------------------------------- */

static void start_request(struct sf_conn *c) {
    pthread_mutex_lock(&c->mu);
    c->attempted = 1;
    pthread_cond_broadcast(&c->cv);
    if (atomic_load(&c->phase) != SF_P_OVERLAY || atomic_load(&c->kind) != SF_CONN)
        goto out;
    if (fill_addrs(c) != 0) {
        c->next_trigger = atomic_load(&c->calls) + sf_cfg.threshold; /* not connected yet */
        goto out;
    }
    if (!sf_is_overlay_addr((struct sockaddr *)&c->remote) || sf_uses_io_uring()) {
        sf_set_phase(c, SF_P_PINNED);
        goto out;
    }
    uint64_t now = sf_now_ms();
    pthread_mutex_lock(&ag.mu);
    int blocked = dest_blocked(c->remote.sin_addr.s_addr, now);
    pthread_mutex_unlock(&ag.mu);
    if (blocked || chan_open() != 0) {
        uint32_t calls = atomic_load(&c->calls);
        c->next_trigger = calls * 2 > sf_cfg.threshold ? calls * 2 : sf_cfg.threshold;
        goto out;
    }
    struct sf_msg m = {.magic = SF_MSG_MAGIC, .type = SF_SWITCH_REQ, .seq = ++ag.seq};
    fill_tuple(&m, c);
    sf_set_phase(c, SF_P_REQUESTED);
    c->outstanding = 1;
    if (chan_send(&m) != 0)
        abort_switch(c, SF_INTERNAL, 1);
    else
        SF_LOG("fd %d (port %u->%u): asked the router for a host connection (seq %u)", c->fd,
               ntohs(c->local.sin_port), ntohs(c->remote.sin_port), m.seq);
out:
    pthread_mutex_unlock(&c->mu);
}

/* Acknowledge the next segment at once, not after the delayed-ACK timer: a peer's overlay FIN
 * waits for the acknowledgement of its SYNC (fin.c). Not sticky: the kernel may go back to
 * delaying ACKs after a few segments, which by then carry application data. */
static void quickack_host(int host) {
    int one = 1;
    real.setsockopt(host, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
}

static void begin_handshake(struct sf_conn *c, int host_fd) {
    /* The handoff frames are tiny and each waits for the other's: with Nagle on, a frame
     * behind the router's unacknowledged ANSWER waits for a delayed ACK (40 ms here). The
     * application's own TCP_NODELAY setting is put on the connection at the commit. */
    int one = 1;
    real.setsockopt(host_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->host_fd = host_fd;
    c->hop_len = 0;
    c->peer_synced = 0;
    sf_set_phase(c, SF_P_HANDSHAKE);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP,
                             .data.u64 = ((uint64_t)atomic_load(&c->gen) << 32) | (uint32_t)c->fd};
    real.epoll_ctl(ag.epfd, EPOLL_CTL_ADD, host_fd, &ev);
    if (!c->leader) {
        struct sf_hop ready = {.magic = SF_HOP_MAGIC, .type = SF_HOP_READY};
        if (real.send(host_fd, &ready, sizeof ready, MSG_DONTWAIT | MSG_NOSIGNAL) != sizeof ready) {
            abort_switch(c, SF_PEER_UNREACHABLE, 1);
            return;
        }
        quickack_host(host_fd); /* the leader's SYNC, which its overlay FIN waits for */
    }
    /* After the READY: the peer's commit waits for that frame, not for these. */
    sf_copy_sockopts_early(c->fd, host_fd, c->buf_locked);
}

enum { RECV_OK = 0, RECV_AGAIN, RECV_CLOSED, RECV_MALFORMED };

/* One frame from the router, with the fd it carries (or -1) in *fd. */
static int recv_frame(struct sf_msg *m, int *fd) {
    char cbuf[CMSG_SPACE(sizeof(int) * 4)];
    struct iovec iov = {.iov_base = m, .iov_len = sizeof *m};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                        .msg_controllen = sizeof cbuf};
    *fd = -1;
    ssize_t n = real.recvmsg(ag.chan, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
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

static void on_switch_res(const struct sf_msg *m, int fd) {
    struct sf_conn *c = find_by_tuple(m);
    if (c == NULL) {
        if (fd >= 0) real.close(fd);
        return;
    }
    pthread_mutex_lock(&c->mu);
    int phase = atomic_load(&c->phase);
    if (phase != SF_P_REQUESTED) {
        if (fd >= 0) {
            SF_LOG("fd %d: host connection arrived in phase %d; closed", c->fd, phase);
            real.close(fd);
        }
    } else if (m->status == SF_OK && fd >= 0 && sf_uses_io_uring()) {
        real.close(fd);
        abort_switch(c, SF_NO_ROUTE, 0);
    } else if (m->status == SF_OK && fd >= 0) {
        begin_handshake(c, sf_private_fd(fd));
    } else if (m->status == SF_DUPLICATE) {
        /* Another attempt for this connection is under way; its result will come. */
    } else if (--c->outstanding <= 0) {
        /* No route and policy are final. A refusal may just mean the peer has not accepted the
         * connection yet, so it is retried later for this connection only. So is an OK that
         * lost its fd on the way in (fd limit): fds may be free by the next attempt. */
        int final = m->status == SF_NO_ROUTE || m->status == SF_DENIED;
        if (m->status == SF_PEER_UNREACHABLE || m->status == SF_TIMEOUT)
            dest_failed(c->remote.sin_addr.s_addr, 1);
        abort_switch(c, m->status == SF_OK ? SF_INTERNAL : m->status, !final);
    }
    pthread_mutex_unlock(&c->mu);
}

static void on_claim(const struct sf_msg *m) {
    struct sf_msg r = *m;
    r.type = SF_CLAIM_RES;
    r.status = SF_NOT_MINE;
    struct sf_conn *c = sf_cfg.mode == SF_MODE_OVERLAY ? NULL : find_by_tuple(m);
    if (c != NULL) {
        pthread_mutex_lock(&c->mu);
        int phase = atomic_load(&c->phase);
        if (phase == SF_P_OVERLAY && sf_uses_io_uring()) {
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
    m.arg = atomic_load(&c->tx) + atomic_load(&c->rx);
    m.arg2 = atomic_load(&c->host_bytes);
    pthread_mutex_unlock(&c->mu);
    chan_send(&m);
}

static void on_stats(const struct sf_msg *m) {
    struct stats_walk w = {m->seq};
    sf_for_each_conn(report_conn, &w);
    struct sf_msg end = {.magic = SF_MSG_MAGIC, .type = SF_STATS_END, .seq = m->seq,
                         .arg = atomic_load(&ag.switches_done),
                         .arg2 = atomic_load(&ag.switches_failed)};
    chan_send(&end);
}

static void abort_requests(struct sf_conn *c, void *arg) {
    (void)arg;
    if (atomic_load(&c->kind) != SF_CONN)
        return;
    pthread_mutex_lock(&c->mu);
    if (atomic_load(&c->phase) == SF_P_REQUESTED)
        abort_switch(c, SF_PEER_UNREACHABLE, 1);
    pthread_mutex_unlock(&c->mu);
}

static void chan_lost(void) {
    SF_LOG("router channel closed: connections stay on the overlay until it is back");
    real.epoll_ctl(ag.epfd, EPOLL_CTL_DEL, ag.chan, NULL);
    real.close(ag.chan);
    sf_private_forget(ag.chan);
    ag.chan = -1;
    ag.chan_retry_ms = sf_now_ms() + 250;
    sf_for_each_conn(abort_requests, NULL);
}

static void on_chan_readable(void) {
    for (int i = 0; i < 64 && ag.chan >= 0; i++) {
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

/* ---- the handoff frames on the host connection -------------------------------------------- */

/* New work that no fd of the agent's epoll announces (fin.c's owed FINs). */
void sf_agent_wake(void) {
    pthread_mutex_lock(&ag.mu);
    if (ag.evfd >= 0) {
        uint64_t one = 1;
        (void)!real.write(ag.evfd, &one, sizeof one);
    }
    pthread_mutex_unlock(&ag.mu);
}

/* The figures the router keeps about switches (SWITCH_DONE at a commit, SWITCH_CALLS when a
 * switch window closes) arise where the switch happens to be, often on an application thread,
 * which must not touch the channel: it queues the frame and wakes the agent, which sends it. */
void sf_agent_report(const struct sf_msg *m) {
    pthread_mutex_lock(&ag.mu);
    if (ag.reports_len < AG_REPORT_QUEUE)
        ag.reports[ag.reports_len++] = *m;
    if (ag.evfd >= 0) {
        uint64_t one = 1;
        (void)!real.write(ag.evfd, &one, sizeof one);
    }
    pthread_mutex_unlock(&ag.mu);
}

/* The switch time: decided -> first byte on the host path. */
static void note_switch_time(struct sf_conn *c) {
    struct sf_msg m = {.magic = SF_MSG_MAGIC, .type = SF_SWITCH_DONE,
                       .arg = sf_now_us() - atomic_load(&c->decided_us),
                       .arg2 = (uint64_t)atomic_load(&c->initiated)};
    fill_tuple(&m, c);
    sf_agent_report(&m);
}

/* Caller holds ag.mu, which this releases. */
static void send_reports_unlock(void) {
    struct sf_msg batch[AG_REPORT_QUEUE];
    unsigned n = ag.reports_len;
    memcpy(batch, ag.reports, n * sizeof batch[0]);
    ag.reports_len = 0;
    pthread_mutex_unlock(&ag.mu);
    for (unsigned i = 0; i < n && ag.chan >= 0; i++)
        chan_send(&batch[i]);
}

static void send_reports(void) {
    pthread_mutex_lock(&ag.mu);
    send_reports_unlock();
}

/* Reports queued just before the process exits (the figures of its last switches) would die
 * with the agent thread: the exiting thread sends them. Only if ag.mu is free: exit() from a
 * signal handler may have interrupted its own holder. Not after _exit, nor for a window still
 * waiting for a call in flight. */
__attribute__((destructor)) static void send_reports_at_exit(void) {
    if (__atomic_load_n(&ag.pid, __ATOMIC_ACQUIRE) == getpid() &&
        pthread_mutex_trylock(&ag.mu) == 0)
        send_reports_unlock();
}

/* Fix S and move writes to the host connection. Caller holds c->wmu (so no write is in flight)
 * and c->mu, and calls sf_agent_finish_commit_locked after. */
void sf_agent_commit_locked(struct sf_conn *c) {
    int wanted = c->commit_wanted;
    c->commit_wanted = 0;
    if (!wanted || atomic_load(&c->phase) != SF_P_HANDSHAKE || c->host_fd < 0)
        return;
    int fl = real.fcntl(c->fd, F_GETFL);
    int hfl = real.fcntl(c->host_fd, F_GETFL);
    if (fl >= 0 && hfl >= 0)
        real.fcntl(c->host_fd, F_SETFL, (hfl & ~O_NONBLOCK) | (fl & O_NONBLOCK));
    struct sf_hop sync = {.magic = SF_HOP_MAGIC, .type = SF_HOP_SYNC,
                          .flags = c->app_shut_wr ? SF_HOP_F_SHUT_WR : 0,
                          .seq = atomic_load(&c->tx)};
    c->sync_acked_mark = sf_fin_mark(c->host_fd, sizeof sync);
    /* COMMITTED before the SYNC leaves: a reader that sees the peer's answering FIN must find
     * this phase (it decides under c->mu, which we hold). */
    sf_set_phase(c, SF_P_COMMITTED);
    if (real.send(c->host_fd, &sync, sizeof sync, MSG_DONTWAIT | MSG_NOSIGNAL) != sizeof sync) {
        atomic_store(&c->phase, SF_P_HANDSHAKE);
        /* The leader has not committed anything yet: stay on the overlay. A follower's leader
         * already has, so that connection's tail is lost with the host connection: report it. */
        if (c->leader) {
            abort_switch(c, SF_PEER_UNREACHABLE, 1);
        } else {
            drop_host_fd(c);
            sf_set_phase(c, SF_P_BROKEN);
            sf_rearm_locked(c);
        }
        return;
    }
    if (c->app_shut_wr)
        real.shutdown(c->host_fd, SHUT_WR);
    else
        quickack_host(c->host_fd); /* the peer's SYNC, so its overlay FIN need not wait */
    c->commit_finish_due = 1;
}

/* The rest of a commit need not hold back the application's writes, which go to the host
 * connection once S is fixed and the SYNC is out: whoever commits for a blocked writer releases
 * c->wmu first and does this after, still under c->mu (which keeps c->fd naming the overlay
 * socket and orders it with setsockopt's mirror). In a burst of switches the agent shares its
 * vCPU with busy routers, and every syscall under c->wmu was a chance to be preempted with a
 * writer waiting (1.5 ms seen in kv-redis c20).
 *   - The options held back for the handoff frames (TCP_NODELAY, TCP_CORK, SO_LINGER) take the
 *     application's values; writes in between only miss a cork's batching.
 *   - The overlay's FIN right after S tells the peer's readers where the overlay stream ends;
 *     the shutdown runs it through the whole overlay path (~40 µs here). */
void sf_agent_finish_commit_locked(struct sf_conn *c) {
    if (c->commit_finish_due) {
        c->commit_finish_due = 0;
        sf_copy_sockopts_at_commit(c->fd, c->host_fd);
        note_switch_time(c);
        sf_fin_after_sync(c);
    }
}

/* Caller holds c->wmu but not c->mu. The caller swaps, if due, once it has released c->wmu:
 * the swap closes the host fd's private number only when no writer holds c->wmu. */
void sf_agent_commit(struct sf_conn *c) {
    pthread_mutex_lock(&c->mu);
    sf_agent_commit_locked(c);
    sf_agent_finish_commit_locked(c);
    pthread_mutex_unlock(&c->mu);
}

/* The agent wants to commit: do it now unless an application write is in flight, in which case
 * the writer does it when its write returns (wrap_io.c checks commit_wanted after unlocking). */
void sf_agent_request_commit(struct sf_conn *c) {
    c->commit_wanted = 1;
    if (pthread_mutex_trylock(&c->wmu) == 0) {
        pthread_mutex_lock(&c->mu);
        sf_agent_commit_locked(c);
        sf_wmu_unlock(c);
        sf_agent_finish_commit_locked(c);
        pthread_mutex_unlock(&c->mu);
        sf_maybe_swap(c);
    }
}

static void host_failed(struct sf_conn *c, const char *why) {
    int phase = atomic_load(&c->phase);
    SF_LOG("fd %d: host connection failed in phase %d (%s, %s)", c->fd, phase,
           c->leader ? "leader" : "follower", why);
    if (phase == SF_P_HANDSHAKE) {
        abort_switch(c, SF_PEER_UNREACHABLE, 1);
    } else if (phase == SF_P_COMMITTED && !c->peer_synced) {
        /* We already sent later bytes there; the peer never will read them. */
        drop_host_fd(c);
        sf_set_phase(c, SF_P_BROKEN);
        sf_rearm_locked(c);
        sf_agent_count_switch(0);
    }
}

/* Reads at most one frame's worth from the host connection. Returns 1 if a frame is complete,
 * 0 if not yet, -1 if the connection failed (host_failed has run). */
static int read_hop(struct sf_conn *c, struct sf_hop *out) {
    ssize_t n = real.recv(c->host_fd, c->hop + c->hop_len, sizeof(struct sf_hop) - c->hop_len,
                     MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        host_failed(c, n == 0 ? "EOF" : strerror(errno));
        return -1;
    }
    if (n < 0)
        return 0;
    c->hop_len = (uint8_t)(c->hop_len + n);
    if (c->hop_len < sizeof(struct sf_hop))
        return 0;
    c->hop_len = 0;
    memcpy(out, c->hop, sizeof *out);
    /* ACK the frame now, not after the delayed-ACK timer: the sender's next small write with
     * Nagle on (nginx's corked response once uncorked, with TCP_NODELAY off) is held back until
     * its small, unacknowledged handoff frame is acknowledged, and our application, waiting for
     * that response, sends nothing to carry the ACK. That cost 40 ms per switch. */
    int one = 1;
    real.setsockopt(c->host_fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
    if (out->magic != SF_HOP_MAGIC) {
        host_failed(c, "bad frame");
        return -1;
    }
    return 1;
}

/* Apply the handoff frames already waiting on the host connection, never reading past the
 * peer's SYNC (what follows it is application data). Caller holds c->mu. Both the agent and a
 * reader thread that met the overlay's FIN call this; c->mu keeps frames whole. */
void sf_agent_pump_locked(struct sf_conn *c) {
    while (c->host_fd >= 0 && !c->peer_synced) {
        int phase = atomic_load(&c->phase);
        struct sf_hop hop;
        if ((phase != SF_P_HANDSHAKE && phase != SF_P_COMMITTED) || read_hop(c, &hop) != 1)
            return;
        if (hop.type == SF_HOP_READY && c->leader && phase == SF_P_HANDSHAKE) {
            c->commit_wanted = 1;
        } else if (hop.type == SF_HOP_SYNC && (phase == SF_P_COMMITTED || !c->leader)) {
            c->peer_s = hop.seq;
            c->peer_synced = 1;
            real.epoll_ctl(ag.epfd, EPOLL_CTL_DEL, c->host_fd, NULL);
            if (phase == SF_P_HANDSHAKE)
                c->commit_wanted = 1;
            pthread_cond_broadcast(&c->cv);
        } else if (hop.type == SF_HOP_ABORT && phase == SF_P_HANDSHAKE) {
            abort_switch(c, SF_PEER_REFUSED, 1);
        } else {
            SF_LOG("fd %d: unexpected handoff frame %u in phase %d", c->fd, hop.type, phase);
            host_failed(c, "unexpected frame");
        }
    }
}

static void on_host_readable(uint64_t tag) {
    int fd = (int)(uint32_t)tag;
    uint32_t gen = (uint32_t)(tag >> 32);
    struct sf_conn *c = sf_slot(fd);
    if (c == NULL)
        return;
    pthread_mutex_lock(&c->mu);
    if (atomic_load(&c->gen) == gen)
        sf_agent_pump_locked(c);
    int want_commit = c->commit_wanted;
    pthread_mutex_unlock(&c->mu);
    if (want_commit)
        sf_agent_request_commit(c);
    if (c->peer_synced)
        sf_maybe_swap(c);
}

/* ---- timeouts ----------------------------------------------------------------------------- */

static void expire(struct sf_conn *c, void *arg) {
    uint64_t now = *(uint64_t *)arg;
    if (atomic_load(&c->kind) != SF_CONN)
        return;
    int phase = atomic_load(&c->phase);
    if (phase != SF_P_REQUESTED && phase != SF_P_HANDSHAKE)
        return;
    pthread_mutex_lock(&c->mu);
    phase = atomic_load(&c->phase);
    uint64_t age = now - c->phase_since_ms;
    if (phase == SF_P_REQUESTED && age > AG_REQUEST_TIMEOUT_MS) {
        abort_switch(c, SF_TIMEOUT, 1);
    } else if (phase == SF_P_HANDSHAKE && c->leader && !c->commit_wanted &&
               age > AG_READY_TIMEOUT_MS) {
        /* Only the leader may give up: the follower waits for SYNC or ABORT. */
        struct sf_hop abort_hop = {.magic = SF_HOP_MAGIC, .type = SF_HOP_ABORT};
        (void)!real.send(c->host_fd, &abort_hop, sizeof abort_hop, MSG_DONTWAIT | MSG_NOSIGNAL);
        abort_switch(c, SF_TIMEOUT, 1);
    }
    int want_commit = c->commit_wanted && atomic_load(&c->phase) == SF_P_HANDSHAKE;
    pthread_mutex_unlock(&c->mu);
    /* A commit asked for while some holder of c->wmu was busy: try again. */
    if (want_commit)
        sf_agent_request_commit(c);
}

/* ---- the loop ----------------------------------------------------------------------------- */

/* start_request can leave a triggered connection on the overlay without asking the router (peer
 * host in backoff, no router channel, not connected yet): that attempt is over, and so is the
 * window its trigger opened. Unless the application has triggered again since (next_trigger is
 * back at UINT32_MAX and another queue entry follows): the window goes on for that attempt. */
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
        pthread_mutex_lock(&ag.mu);
        if (ag.q_len == 0) {
            pthread_mutex_unlock(&ag.mu);
            return;
        }
        int fd = ag.queue[ag.q_head].fd;
        uint32_t gen = ag.queue[ag.q_head].gen;
        ag.q_head = (ag.q_head + 1) % AG_QUEUE;
        ag.q_len--;
        pthread_mutex_unlock(&ag.mu);
        struct sf_conn *c = sf_slot(fd);
        if (c != NULL && atomic_load(&c->gen) == gen) {
            start_request(c);
            end_window_unless_requested(c);
        }
    }
}

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

static void *agent_main(void *arg) {
    (void)arg;
    pid_t me = getpid();
    pin_agent();
    uint64_t last_tick = sf_now_ms();
    /* A ring made before the first connection is known before any claim is answered. */
    sf_uring_refresh(last_tick);
    /* Open the channel now so that peers' claims reach this process even before it triggers. */
    chan_open();
    while (__atomic_load_n(&ag.pid, __ATOMIC_ACQUIRE) == me || ag.pid == 0) {
        struct epoll_event evs[64];
        int timeout = atomic_load(&sf_in_transition) > 0 || ag.n_lingering > 0 ? 50 : 1000;
        if (sf_fins_owed() > 0)
            timeout = 1;
        if (ag.chan < 0 && timeout > 250)
            timeout = 250;
        int n = real.epoll_wait(ag.epfd, evs, 64, timeout);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u64 == AG_TAG_EVENT)
                drain_queue();
            else if (evs[i].data.u64 == AG_TAG_CHAN)
                on_chan_readable();
            else
                on_host_readable(evs[i].data.u64);
        }
        uint64_t now = sf_now_ms();
        if (ag.chan < 0)
            chan_open();
        send_reports();
        sf_uring_refresh(now);
        if (ag.n_lingering > 0)
            poll_lingering(now);
        if (sf_fins_owed() > 0)
            sf_fins_poll(now);
        if (now - last_tick >= 50 && atomic_load(&sf_in_transition) > 0) {
            last_tick = now;
            sf_for_each_conn(expire, &now);
        }
    }
    return NULL;
}

/* ---- slim mode ---------------------------------------------------------------------------- */

/* Slim's switch at setup: the caller (connect or accept) waits until the host socket is in
 * place. Like Slim, a connect waits for the server application to accept: while the peer router
 * answers that nobody owns the other end yet, it asks again. The wait ends at the swap, or after
 * a bound, after which the switch carries on in the background as in shuntflow mode. */
#define SLIM_ACCEPT_WAIT_MS 1000
#define SLIM_RETRY_MS 2
#define SLIM_COMMITTED_WAIT_MS 200

int sf_agent_switch_now(struct sf_conn *c) {
    uint64_t start = sf_now_ms();
    uint64_t deadline = start + AG_REQUEST_TIMEOUT_MS;
    pthread_mutex_lock(&c->mu);
    c->attempted = 0;
    pthread_mutex_unlock(&c->mu);
    sf_agent_trigger(c);
    pthread_mutex_lock(&c->mu);
    for (;;) {
        int phase = atomic_load(&c->phase);
        uint64_t now = sf_now_ms();
        if (phase == SF_P_HOST || phase == SF_P_PINNED || phase == SF_P_BROKEN || now > deadline)
            break;
        /* Committed: only the peer's SYNC is missing. It normally follows at once; if the peer
         * is busy writing (it gave up waiting for us), the drain finishes in the background. */
        if (phase == SF_P_COMMITTED && deadline > now + SLIM_COMMITTED_WAIT_MS)
            deadline = now + SLIM_COMMITTED_WAIT_MS;
        if (phase == SF_P_OVERLAY && c->attempted) {
            if (c->last_status != SF_PEER_REFUSED || now - start > SLIM_ACCEPT_WAIT_MS)
                break;
            /* The server has not accepted yet. Its own accept() usually starts the switch
             * from its side first (a claim moves us on, and wakes this wait); ask again only
             * if nothing happened meanwhile. */
            sf_cv_wait_ms(c, SLIM_RETRY_MS);
            if (atomic_load(&c->phase) != SF_P_OVERLAY)
                continue;
            c->attempted = 0;
            pthread_mutex_unlock(&c->mu);
            sf_agent_trigger(c);
            pthread_mutex_lock(&c->mu);
            continue;
        }
        sf_cv_wait_ms(c, 20);
    }
    int ok = atomic_load(&c->phase) == SF_P_HOST;
    pthread_mutex_unlock(&c->mu);
    return ok ? 0 : -1;
}
