/* linger.c -- host sockets of connections closed before the peer's last handoff frame came.
 *
 * The application closed a connection whose host socket may still get a handoff frame from the
 * peer (its SYNC, when this end had committed or the peer may have). Closed now, the socket
 * would be orphaned, and a frame arriving at an orphaned socket makes the kernel reset the
 * connection: the peer then loses whatever of this end's last writes was still in flight, and
 * reads ECONNRESET where it should read EOF (seen in an underlay flap, where the SYNC came
 * late). So the agent keeps it: FIN now, after the data; close once the frame is in (or the
 * peer's EOF, an error, AG_LINGER_MS). Bytes after the frame still reset it on close, as they
 * would an overlay socket closed with unread data. A process that exits meanwhile waits for
 * them a little (sf_linger_at_exit). */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "agent.h"

#define AG_LINGER_MAX 256
#define AG_LINGER_MS 30000
#define AG_EXIT_LINGER_MS 2000

struct lingering {
    int fd;
    uint8_t len;
    uint8_t hop[16];
    uint64_t until_ms;
};

/* Under sf_agent_mu. */
static struct {
    struct lingering kept[AG_LINGER_MAX];
    unsigned n;
} lg;

unsigned sf_lingering(void) {
    return lg.n;
}

/* Caller holds c->mu and c->wmu. Returns 0 if the agent took the socket, -1 if the caller must
 * close it itself. */
static int linger_host(int host, const uint8_t *partial, int len) {
    struct linger lo;
    socklen_t ll = sizeof lo;
    if (real.getsockopt(host, SOL_SOCKET, SO_LINGER, &lo, &ll) == 0 && lo.l_onoff &&
        lo.l_linger == 0)
        return -1; /* the application asked for a reset on close */
    int taken = -1;
    pthread_mutex_lock(&sf_agent_mu);
    if (sf_agent_started() && lg.n < AG_LINGER_MAX) {
        sf_agent_unwatch(host);
        real.shutdown(host, SHUT_WR);
        struct lingering *l = &lg.kept[lg.n++];
        l->fd = host;
        l->len = (uint8_t)len;
        memcpy(l->hop, partial, (size_t)len);
        l->until_ms = sf_now_ms() + AG_LINGER_MS;
        taken = 0;
    }
    pthread_mutex_unlock(&sf_agent_mu);
    if (taken == 0)
        SF_LOG("host fd %d: its connection closed before the peer's last handoff frame; kept "
               "until it comes", host);
    return taken;
}

/* Caller holds c->mu: the application is done with the connection (it closed it, or the
 * process exits) while the peer's SYNC may still come. Unless a writer is in the host socket
 * (it is then closed as before), the agent keeps it. */
void sf_linger_conn_locked(struct sf_conn *c) {
    if (c->host_fd < 0 || c->peer_synced || !sf_phase_in_handoff(atomic_load(&c->phase)))
        return;
    if (pthread_mutex_trylock(&c->wmu) != 0)
        return;
    if (linger_host(c->host_fd, c->hop, c->hop_len) == 0)
        __atomic_store_n(&c->host_fd, -1, __ATOMIC_SEQ_CST);
    sf_wmu_unlock(c);
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

/* Caller holds sf_agent_mu. */
static void close_lingering_done(uint64_t now) {
    for (unsigned i = 0; i < lg.n;) {
        struct lingering *l = &lg.kept[i];
        if (linger_done(l, now)) {
            sf_private_close(l->fd);
            *l = lg.kept[--lg.n];
        } else {
            i++;
        }
    }
}

/* The agent's tick while some are kept. */
void sf_linger_poll(uint64_t now) {
    pthread_mutex_lock(&sf_agent_mu);
    close_lingering_done(now);
    pthread_mutex_unlock(&sf_agent_mu);
}

void sf_linger_private_moved(int from, int to) {
    pthread_mutex_lock(&sf_agent_mu);
    for (unsigned i = 0; i < lg.n; i++)
        if (lg.kept[i].fd == from)
            lg.kept[i].fd = to;
    pthread_mutex_unlock(&sf_agent_mu);
}

void sf_linger_after_fork_child(void) {
    for (unsigned i = 0; i < lg.n; i++) {
        sf_private_close(lg.kept[i].fd); /* the parent drains them */
    }
    lg.n = 0;
}

/* At exit the kernel closes what the application left open, host sockets mid-handoff too. */
static void linger_open_conn(struct sf_conn *c, void *arg) {
    (void)arg;
    if (atomic_load(&c->kind) != SF_CONN || pthread_mutex_trylock(&c->mu) != 0)
        return;
    if (c->host_fd >= 0)
        sf_handoff_pump_locked(c);
    sf_linger_conn_locked(c);
    pthread_mutex_unlock(&c->mu);
}

/* A process that exits right after such a close (or with such a connection open) would take
 * the kept sockets with it, and the late frame would reset the connection after all: the
 * exiting thread waits for it, up to AG_EXIT_LINGER_MS. Only if the locks are free (see
 * sf_router_at_exit); not after _exit. */
void sf_linger_at_exit(void) {
    if (!sf_agent_is_this_process())
        return;
    if (atomic_load(&sf_in_transition) > 0)
        sf_for_each_conn(linger_open_conn, NULL);
    if (pthread_mutex_trylock(&sf_agent_mu) != 0)
        return;
    uint64_t until = sf_now_ms() + AG_EXIT_LINGER_MS;
    for (;;) {
        uint64_t now = sf_now_ms();
        close_lingering_done(now);
        if (lg.n == 0 || now >= until)
            break;
        struct pollfd p[AG_LINGER_MAX];
        for (unsigned i = 0; i < lg.n; i++)
            p[i] = (struct pollfd){.fd = lg.kept[i].fd, .events = POLLIN};
        real.poll(p, lg.n, (int)(until - now));
    }
    pthread_mutex_unlock(&sf_agent_mu);
}
