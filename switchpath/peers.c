/* peers.c -- the peer port: connections from other routers, each carrying one OFFER (docs/wire.md
 * section 2).
 *
 * A source that is not an allowed peer is closed before a byte is read. Then the connection
 * waits for its first byte (a peer's pool keeps connections idle by design, up to the idle
 * timeout), and the rest of the frame may not dawdle (offer_read_timeout_ms). We never read past
 * the 88 bytes of the OFFER: the next bytes belong to the libraries.
 * Why connections still without a byte are evicted, oldest first, rather than new ones refused:
 * anyone on an allowed source can open thousands, but so does a peer's pool, by design. When one
 * source holds more than max_idle_per_peer of them, or the listener is full, the oldest one idle
 * for over IDLE_AGE goes; a real OFFER follows its connect within milliseconds. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "sfs.h"

#define IDLE_AGE_US 2000000u

static void ev_peer(struct ev *e, struct sfs_peerconn *pc)
{
    ev_ip(e, "peer", pc->peer_ip, pc->peer_port);
}

static void drop(struct sfs *s, struct sfs_peerconn *pc, const char *reason)
{
    s->peer_dropped++;
    struct ev e;
    ev_begin(&e, EV_LOG, "warning", "peer_dropped");
    ev_peer(&e, pc);
    ev_str(&e, "reason", reason);
    ev_send(s, &e);
    peer_free(s, pc);
}

static void idle_count(struct sfs *s, uint32_t ip, int delta)
{
    uint8_t k[12] = {0};
    memcpy(k, &ip, 4);
    struct snode *n = delta > 0 ? smap_put(&s->idle_per_peer, k, NULL)
                                : smap_get(&s->idle_per_peer, k);
    if (n == NULL)
        return;
    n->aux += (uint64_t)(int64_t)delta;
    if (n->aux == 0)
        smap_del(&s->idle_per_peer, n);
}

static uint64_t idle_of(struct sfs *s, uint32_t ip)
{
    uint8_t k[12] = {0};
    memcpy(k, &ip, 4);
    struct snode *n = smap_get(&s->idle_per_peer, k);
    return n ? n->aux : 0;
}

static void unwait(struct sfs *s, struct sfs_peerconn *pc)
{
    if (!pc->waiting)
        return;
    pc->waiting = 0;
    if (pc->prev)
        pc->prev->next = pc->next;
    else
        s->wait_head = pc->next;
    if (pc->next)
        pc->next->prev = pc->prev;
    else
        s->wait_tail = pc->prev;
    pc->prev = pc->next = NULL;
    idle_count(s, pc->peer_ip, -1);
}

void peer_free(struct sfs *s, struct sfs_peerconn *pc)
{
    unwait(s, pc);
    timer_disarm(s, &pc->timer);
    if (pc->io.fd >= 0) {
        io_unwatch(s, &pc->io);
        close(pc->io.fd);
        pc->io.fd = -1;
    }
    if (pc->incoming)
        s->incoming--;
    sfs_defer_free(s, pc, &pc->io);
}

/* Shuts the oldest waiting connection (of `ip`, or of anyone if 0) with no byte pending that
 * has waited IDLE_AGE; its read then sees EOF and it is dropped with `why`. */
static int evict_idle(struct sfs *s, uint32_t ip, const char *why)
{
    uint64_t now = now_us();
    for (struct sfs_peerconn *pc = s->wait_head; pc != NULL; pc = pc->next) {
        if (now - pc->since < IDLE_AGE_US)
            return 0; /* oldest first: the rest are younger */
        if (ip != 0 && pc->peer_ip != ip)
            continue;
        char b;
        ssize_t n = recv(pc->io.fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        if (n > 0)
            continue; /* its OFFER is in: not idle */
        unwait(s, pc);
        snprintf(pc->evicted, sizeof(pc->evicted), "%s", why);
        s->evictions++;
        shutdown(pc->io.fd, SHUT_RDWR);
        return 1;
    }
    return 0;
}

static void incoming_timeout(struct sfs *s, struct sfs_timer *t)
{
    struct sfs_peerconn *pc = (struct sfs_peerconn *)((char *)t -
                                                      offsetof(struct sfs_peerconn, timer));
    char why[96];
    if (pc->state == PC_OFFER_PARKED) { /* no refreshed map in time: decide on what we have */
        pc->map_gen = UINT64_MAX;
        switch_offer(s, pc);
        return;
    }
    if (pc->state == PC_IDLE)
        snprintf(why, sizeof(why), "idle for %gs without an OFFER",
                 s->cfg.peer_idle_timeout_ms / 1000.0);
    else if (pc->state == PC_ADMIT)
        snprintf(why, sizeof(why), "source check timed out");
    else
        snprintf(why, sizeof(why), "no complete OFFER within %gs",
                 s->cfg.offer_read_timeout_ms / 1000.0);
    drop(s, pc, why);
}

static void start_waiting(struct sfs *s, struct sfs_peerconn *pc)
{
    if (idle_of(s, pc->peer_ip) >= (uint64_t)s->cfg.max_idle_per_peer) {
        char why[96];
        snprintf(why, sizeof(why), "source holds more than %d idle connections",
                 s->cfg.max_idle_per_peer);
        evict_idle(s, pc->peer_ip, why);
    }
    pc->state = PC_IDLE;
    pc->since = now_us();
    pc->waiting = 1;
    pc->prev = s->wait_tail;
    pc->next = NULL;
    if (s->wait_tail)
        s->wait_tail->next = pc;
    else
        s->wait_head = pc;
    s->wait_tail = pc;
    idle_count(s, pc->peer_ip, +1);
    timer_arm(s, &pc->timer, pc->since + (uint64_t)s->cfg.peer_idle_timeout_ms * 1000);
    io_watch(s, &pc->io, EPOLLIN);
}

static void reject_source(struct sfs *s, struct sfs_peerconn *pc, const char *why)
{
    s->peers_rejected++;
    struct ev e;
    ev_begin(&e, EV_LOG, "warning", "peer_rejected");
    ev_peer(&e, pc);
    ev_str(&e, "reason", why);
    ev_send(s, &e);
    peer_free(s, pc);
}

static const char *NOT_PEER = "source is no host of the overlay map (set peer_allow to widen)";

/* Admission, once (again) the map can say; 0 if `pc` was closed or goes on waiting. */
static void admit(struct sfs *s, struct sfs_peerconn *pc)
{
    int ok = peer_allowed(s, pc->peer_ip);
    if (ok == 1) {
        start_waiting(s, pc);
        return;
    }
    if (s->nallow_peers > 0) {
        reject_source(s, pc, "source not in peer_allow");
        return;
    }
    if (ok == 0 || pc->state == PC_ADMIT) {
        reject_source(s, pc, NOT_PEER);
        return;
    }
    /* Unknown while the map may be stale: wait for Python's refresh, then decide once. */
    pc->state = PC_ADMIT;
    pc->map_gen = s->map_gen;
    timer_arm(s, &pc->timer, now_us() + (uint64_t)s->cfg.map_wait_ms * 1000);
    map_request_refresh(s);
}

void peers_map_updated(struct sfs *s)
{
    /* Connections waiting for the map sit on no list but the timer heap: collect them first,
     * since deciding one changes the heap. */
    size_t n = 0;
    struct sfs_peerconn **todo = malloc((s->nheap + 1) * sizeof(*todo));
    if (todo == NULL)
        return; /* their timers still fire */
    for (size_t i = 0; i < s->nheap; i++) {
        struct sfs_timer *t = s->heap[i];
        if (t->fire != incoming_timeout)
            continue;
        struct sfs_peerconn *pc = (struct sfs_peerconn *)((char *)t -
                                                          offsetof(struct sfs_peerconn, timer));
        if ((pc->state == PC_ADMIT || pc->state == PC_OFFER_PARKED) &&
            pc->map_gen != s->map_gen)
            todo[n++] = pc;
    }
    for (size_t i = 0; i < n; i++) {
        if (todo[i]->state == PC_ADMIT) {
            admit(s, todo[i]);
        } else {
            todo[i]->map_gen = UINT64_MAX;
            timer_disarm(s, &todo[i]->timer);
            switch_offer(s, todo[i]);
        }
    }
    free(todo);
}

void peers_accept(struct sfs *s)
{
    for (;;) {
        struct sockaddr_in sa;
        socklen_t sl = sizeof(sa);
        int fd = accept4(s->listen_io.fd, (struct sockaddr *)&sa, &sl,
                         SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
                struct ev e;
                ev_begin(&e, EV_LOG, "error", "peer_accept_failed");
                ev_str(&e, "error", strerror(errno));
                ev_send(s, &e);
            }
            return;
        }
        if (s->incoming >= (size_t)s->cfg.max_incoming) {
            char why[96];
            snprintf(why, sizeof(why), "%d offers being read: the oldest idle one goes",
                     s->cfg.max_incoming);
            if (!evict_idle(s, 0, why)) {
                s->peer_dropped++;
                close(fd);
                struct ev e;
                ev_begin(&e, EV_LOG, "warning", "peer_dropped");
                ev_ip(&e, "peer", sa.sin_addr.s_addr, -1);
                ev_str(&e, "reason", "too many incoming offers");
                ev_send(s, &e);
                continue;
            }
        }
        struct sfs_peerconn *pc = calloc(1, sizeof(*pc));
        if (pc == NULL) {
            close(fd);
            continue;
        }
        peer_delay_acks(fd);
        pc->io = (struct sfs_io){.kind = IO_PEER, .fd = fd};
        pc->incoming = 1;
        pc->peer_ip = sa.sin_addr.s_addr;
        pc->peer_port = ntohs(sa.sin_port);
        pc->state = PC_NEW;
        if (s->listen_addr.sin_addr.s_addr != INADDR_ANY) {
            binding_put(pc->binding, &sa, &s->listen_addr);
            pc->bound = 1;
        }
        timer_init(&pc->timer, incoming_timeout);
        s->incoming++;
        admit(s, pc);
    }
}

static void offer_read(struct sfs *s, struct sfs_peerconn *pc)
{
    for (;;) {
        ssize_t n = recv(pc->io.fd, pc->buf + pc->got, sizeof(pc->buf) - pc->got, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            char why[96];
            snprintf(why, sizeof(why), "socket error: %s", strerror(errno));
            drop(s, pc, why);
            return;
        }
        if (n == 0) {
            if (pc->evicted[0]) {
                char why[200];
                snprintf(why, sizeof(why), "evicted before its OFFER: %s", pc->evicted);
                drop(s, pc, why);
            } else if (pc->got == 0) {
                /* Not an offence: a peer's pool lets aged connections go this way. */
                struct ev e;
                ev_begin(&e, EV_LOG, "info", "peer_closed_idle");
                ev_peer(&e, pc);
                ev_send(s, &e);
                peer_free(s, pc);
            } else {
                char why[96];
                snprintf(why, sizeof(why), "connection closed after %zu of %zu bytes", pc->got,
                         sizeof(pc->buf));
                drop(s, pc, why);
            }
            return;
        }
        if (pc->got == 0) {
            unwait(s, pc);
            pc->state = PC_READING;
            timer_arm(s, &pc->timer, now_us() + (uint64_t)s->cfg.offer_read_timeout_ms * 1000);
        }
        pc->got += (size_t)n;
        if (pc->got == sizeof(pc->buf))
            break;
    }
    const char *bad = sfp_parse(pc->buf, pc->got, SF_OFFER, &pc->offer);
    if (bad != NULL) {
        char reason[80];
        drop(s, pc, frame_reason(bad, pc->buf, reason, sizeof(reason)));
        return;
    }
    if (!pc->bound && sfp_binding(pc->io.fd, 0, pc->binding) < 0) {
        drop(s, pc, "socket error: binding");
        return;
    }
    char why[160];
    if (sfp_offer_check(s->replay, s->cfg.key, (size_t)s->cfg.keylen, &pc->offer, pc->binding,
                        sfp_now_ms(), why, sizeof(why)) != NULL) {
        s->offers_rejected++;
        struct sf_tuple t = {pc->offer.local_ip, pc->offer.remote_ip, pc->offer.local_port,
                             pc->offer.remote_port};
        struct ev e;
        ev_begin(&e, EV_LOG, "warning", "offer_rejected");
        ev_peer(&e, pc);
        ev_tuple(&e, "tuple", &t);
        ev_int(&e, "seq", pc->offer.seq);
        ev_str(&e, "reason", why);
        ev_send(s, &e);
        peer_free(s, pc);
        return;
    }
    pc->state = PC_HELD;
    timer_disarm(s, &pc->timer);
    io_unwatch(s, &pc->io);
    switch_offer(s, pc);
}

void peer_event(struct sfs *s, struct sfs_peerconn *pc, uint32_t events)
{
    if (!pc->incoming) {
        outconn_event(s, pc, events);
        return;
    }
    if (pc->state == PC_IDLE || pc->state == PC_READING)
        offer_read(s, pc);
}

/* The ANSWER to the OFFER `pc` carried; 1 if sent whole. A fresh connection's send buffer
 * always has room for 88 bytes, so a short send means the initiator is gone. */
int peer_send_answer(struct sfs *s, struct sfs_peerconn *pc, uint16_t status)
{
    struct sf_peer_msg ans;
    sfp_answer_make(s->cfg.key, (size_t)s->cfg.keylen, &pc->offer, status, pc->binding, &ans);
    ssize_t n;
    do
        n = send(pc->io.fd, &ans, sizeof(ans), MSG_DONTWAIT | MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n == (ssize_t)sizeof(ans);
}

void peers_close_all(struct sfs *s)
{
    while (s->wait_head != NULL)
        peer_free(s, s->wait_head);
}
