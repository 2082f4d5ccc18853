/* pool.c -- outgoing peer connections: the OFFER/ANSWER exchange, and the warm pool of idle
 * connected sockets so that a switch does not wait for a TCP handshake and the peer's accept.
 *
 * A pooled connection carries one OFFER and then becomes the host connection, so the pool
 * refills shortly after the takes stop (REFILL_DELAY after the last one the pool served:
 * refilling at once, or in the middle of a burst, would compete with the very switches that
 * took them; once the pool is down to half what it was filled to, the refill is no longer put
 * off, so a steady stream of switches does not find it empty), to twice as many as were asked
 * for since the last refill if that is more than peer_pool_size (up to POOL_BURST_MAX): a burst
 * of switches, or slim mode's one per connection, would otherwise empty the pool before each
 * refill and pay a TCP handshake to the peer router inside every switch after that. The
 * largest burst seen within KEEP_WARM stays the pool's size until then (the periodic refill
 * replaces aged connections up to it): the next burst of that size finds its connections warm
 * instead of connecting for most of its switches, each then waiting for the handshake, the
 * peer's accept and one more wake-up of both routers. A few connects a round (REFILL_STEP), so
 * a refill does not hold up switches still under way. A connection is used only while younger
 * than half the peer's idle timeout, so we never race the peer closing an idle one; a pooled
 * one is watched for reading (the peer sends nothing before our OFFER: an event is its close,
 * and it is dropped); one the peer closed anyway before answering is not the peer's failure
 * (it may have restarted): the offer is made again on a fresh connection. Only peers switched
 * to recently keep a pool (KEEP_WARM).
 * The source address is --host-ip (IP_BIND_ADDRESS_NO_PORT: the port is chosen at connect, no
 * ephemeral port exhaustion from bind-before-connect); the responder checks it against its map. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "sfs.h"

#define KEEP_WARM_US 60000000u
#define REFILL_DELAY_US 5000u
#define POOL_BURST_MAX 32u
#define REFILL_STEP 4u

static struct sfs_peerconn *pc_of(struct sfs_timer *t)
{
    return (struct sfs_peerconn *)((char *)t - offsetof(struct sfs_peerconn, timer));
}

static struct pool_peer *pool_of(struct sfs *s, uint32_t peer, int create);

/* An established peer connection goes into delayed-ACK (ping-pong) mode before its first frame.
 * The OFFER and the ANSWER answer each other, and so do the handoff frames the libraries then
 * exchange on it (docs/wire.md section 3): each frame's ACK rides on the reply, where a fresh
 * connection's quick-ACK mode would send it as a packet of its own, from inside the sender's
 * send. The libraries put the connection back into quick-ACK mode at their commit (handoff.c),
 * before any application byte. */
void peer_delay_acks(int fd)
{
    int zero = 0;
    setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &zero, sizeof(zero));
}

static void pool_unlink(struct pool_peer *pp, struct sfs_peerconn *pc)
{
    if (pc->prev)
        pc->prev->next = pc->next;
    else
        pp->head = pc->next;
    if (pc->next)
        pc->next->prev = pc->prev;
    else
        pp->tail = pc->prev;
    pc->prev = pc->next = NULL;
    pp->idle--;
}

static void conn_timeout(struct sfs *s, struct sfs_timer *t)
{
    struct sfs_peerconn *pc = pc_of(t);
    if (pc->state == PC_POOLED) {
        struct pool_peer *pp = pool_of(s, pc->peer_ip, 0);
        if (pp != NULL)
            pool_unlink(pp, pc);
        peer_free(s, pc);
        return;
    }
    struct sfs_out *o = pc->out;
    if (pc->state == PC_CONNECTING && o == NULL) { /* a refill */
        struct pool_peer *pp = pool_of(s, pc->peer_ip, 0);
        if (pp != NULL)
            pp->filling--;
        peer_free(s, pc);
        return;
    }
    pc->out = NULL;
    if (o != NULL)
        o->conn = NULL;
    int connecting = pc->state == PC_CONNECTING;
    peer_free(s, pc);
    if (o != NULL)
        switch_offer_result(s, o, connecting ? SF_PEER_UNREACHABLE : SF_TIMEOUT,
                            connecting ? "connect timed out" : "no ANSWER in time", NULL);
}

/* A non-blocking connect from host_ip to `peer`'s router; NULL and `why` if it failed at once. */
static struct sfs_peerconn *connect_peer(struct sfs *s, uint32_t peer, char *why, size_t len,
                                         int *internal)
{
    *internal = 0;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(why, len, "socket: %s", strerror(errno));
        *internal = 1;
        return NULL;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = s->cfg.host_ip};
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &s->cfg.host_ip, ip, sizeof(ip));
        snprintf(why, len, "bind %s: %s", ip, strerror(errno));
        close(fd);
        *internal = 1;
        return NULL;
    }
    sa.sin_addr.s_addr = peer;
    sa.sin_port = htons(s->cfg.peer_port);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 && errno != EINPROGRESS) {
        snprintf(why, len, "connect: %s", strerror(errno));
        close(fd);
        return NULL;
    }
    struct sfs_peerconn *pc = calloc(1, sizeof(*pc));
    if (pc == NULL) {
        close(fd);
        snprintf(why, len, "out of memory");
        *internal = 1;
        return NULL;
    }
    pc->io = (struct sfs_io){.kind = IO_PEER, .fd = fd};
    pc->peer_ip = peer;
    pc->peer_port = s->cfg.peer_port;
    pc->state = PC_CONNECTING;
    pc->since = now_us();
    timer_init(&pc->timer, conn_timeout);
    timer_arm(s, &pc->timer, pc->since + (uint64_t)s->cfg.connect_timeout_ms * 1000);
    io_watch(s, &pc->io, EPOLLOUT);
    return pc;
}

/* The MAC'd binding (docs/wire.md section 2): initiator's address and port, then responder's. */
void binding_put(uint8_t out[SFP_BINDING_SIZE], const struct sockaddr_in *initiator,
                 const struct sockaddr_in *responder)
{
    memcpy(out, &initiator->sin_addr.s_addr, 4);
    memcpy(out + 4, &initiator->sin_port, 2);
    memcpy(out + 6, &responder->sin_addr.s_addr, 4);
    memcpy(out + 10, &responder->sin_port, 2);
}

/* An outgoing connection's binding once it is connected: the far end is the one we connected
 * to, so only our port (chosen at connect) needs asking for. */
static int outgoing_binding(struct sfs_peerconn *pc)
{
    struct sockaddr_in self, peer = {.sin_family = AF_INET};
    socklen_t sl = sizeof(self);
    if (getsockname(pc->io.fd, (struct sockaddr *)&self, &sl) < 0 || self.sin_family != AF_INET)
        return -1;
    peer.sin_addr.s_addr = pc->peer_ip;
    peer.sin_port = htons(pc->peer_port);
    binding_put(pc->binding, &self, &peer);
    pc->bound = 1;
    return 0;
}

/* ---- the exchange ---- */

static void send_offer(struct sfs *s, struct sfs_peerconn *pc)
{
    struct sfs_out *o = pc->out;
    char why[96];
    if (!pc->bound && outgoing_binding(pc) < 0) {
        int pooled = pc->from_pool;
        o->conn = NULL;
        peer_free(s, pc);
        if (pooled) { /* dead before a byte: not the peer's failure */
            pool_take_or_connect(s, o);
            return;
        }
        switch_offer_result(s, o, SF_PEER_UNREACHABLE, "connect: not connected", NULL);
        return;
    }
    if (sfp_offer_make(s->cfg.key, (size_t)s->cfg.keylen, o->seq, &o->t, pc->binding,
                       &pc->offer) < 0) {
        o->conn = NULL;
        peer_free(s, pc);
        switch_offer_result(s, o, SF_INTERNAL, "no randomness for the OFFER's nonce", NULL);
        return;
    }
    if (!pc->from_pool)
        peer_delay_acks(pc->io.fd); /* pooled ones were at refill_connected */
    pc->state = PC_OFFERED;
    pc->got = 0;
    timer_arm(s, &pc->timer, now_us() + (uint64_t)s->cfg.answer_timeout_ms * 1000);
    /* a fresh connection's send buffer always holds 88 bytes: no partial send to resume */
    ssize_t n = send(pc->io.fd, &pc->offer, sizeof(pc->offer), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n != (ssize_t)sizeof(pc->offer)) {
        int pooled = pc->from_pool;
        snprintf(why, sizeof(why), "offer exchange: %s", n < 0 ? strerror(errno) : "short send");
        o->conn = NULL;
        peer_free(s, pc);
        if (pooled) {
            pool_take_or_connect(s, o);
            return;
        }
        switch_offer_result(s, o, SF_PEER_UNREACHABLE, why, NULL);
        return;
    }
    io_watch(s, &pc->io, EPOLLIN);
}

static void read_answer(struct sfs *s, struct sfs_peerconn *pc)
{
    struct sfs_out *o = pc->out;
    char why[160];
    for (;;) {
        ssize_t n = recv(pc->io.fd, pc->buf + pc->got, sizeof(pc->buf) - pc->got, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n <= 0) {
            int nothing = pc->got == 0, pooled = pc->from_pool;
            if (n < 0)
                snprintf(why, sizeof(why), "offer exchange: %s", strerror(errno));
            else
                snprintf(why, sizeof(why),
                         "offer exchange: connection closed after %zu of %zu bytes", pc->got,
                         sizeof(pc->buf));
            o->conn = NULL;
            peer_free(s, pc);
            if (pooled && (nothing || n < 0)) {
                pool_take_or_connect(s, o);
                return;
            }
            switch_offer_result(s, o, SF_PEER_UNREACHABLE, why, NULL);
            return;
        }
        pc->got += (size_t)n;
        if (pc->got == sizeof(pc->buf))
            break;
    }
    struct sf_peer_msg ans;
    uint16_t status = SF_INTERNAL;
    const char *bad = sfp_parse(pc->buf, pc->got, SF_ANSWER, &ans);
    if (bad != NULL) {
        snprintf(why, sizeof(why), "bad ANSWER: %s", bad);
    } else if ((bad = sfp_answer_check(s->cfg.key, (size_t)s->cfg.keylen, &pc->offer, &ans,
                                       pc->binding)) != NULL) {
        snprintf(why, sizeof(why), "%s", bad);
    } else if (ans.status > SF_TIMEOUT) {
        snprintf(why, sizeof(why), "unknown ANSWER status %u", ans.status);
    } else {
        status = ans.status;
        snprintf(why, sizeof(why), "answered by the peer router");
    }
    o->conn = NULL;
    pc->out = NULL;
    timer_disarm(s, &pc->timer);
    io_unwatch(s, &pc->io);
    if (status == SF_OK) {
        switch_offer_result(s, o, SF_OK, "", pc); /* pc is the caller's now */
        return;
    }
    peer_free(s, pc);
    switch_offer_result(s, o, status, why, NULL);
}

static void refill_connected(struct sfs *s, struct sfs_peerconn *pc)
{
    struct pool_peer *pp = pool_of(s, pc->peer_ip, 0);
    if (pp == NULL) {
        peer_free(s, pc);
        return;
    }
    pp->filling--;
    if (outgoing_binding(pc) < 0) {
        peer_free(s, pc);
        return;
    }
    peer_delay_acks(pc->io.fd);
    pc->state = PC_POOLED;
    pc->since = now_us();
    /* Watched for reading from now on: the peer sends nothing before our OFFER, so an event
     * while pooled is its close (dropped here, not found dead at the next switch), and the
     * OFFER's ANSWER needs no second epoll_ctl. */
    io_watch(s, &pc->io, EPOLLIN);
    /* used only while younger than half the peer's idle timeout */
    timer_arm(s, &pc->timer, pc->since + (uint64_t)s->cfg.peer_idle_timeout_ms * 500);
    pc->prev = pp->tail;
    pc->next = NULL;
    if (pp->tail)
        pp->tail->next = pc;
    else
        pp->head = pc;
    pp->tail = pc;
    pp->idle++;
}

static void refill(struct sfs *s, struct pool_peer *pp);
static void refill_step(struct sfs *s, struct pool_peer *pp);

void outconn_event(struct sfs *s, struct sfs_peerconn *pc, uint32_t events)
{
    if (pc->state == PC_CONNECTING) {
        /* a failed connect always reports EPOLLERR: only then is its error worth a call */
        int err = 0;
        socklen_t el = sizeof(err);
        if ((events & (EPOLLERR | EPOLLHUP)) &&
            getsockopt(pc->io.fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0)
            err = errno;
        if (err == 0 && !(events & (EPOLLERR | EPOLLHUP))) {
            if (pc->out != NULL)
                send_offer(s, pc);
            else
                refill_connected(s, pc);
            return;
        }
        char why[96];
        snprintf(why, sizeof(why), "connect: %s", strerror(err ? err : ECONNREFUSED));
        struct sfs_out *o = pc->out;
        if (o == NULL) {
            struct pool_peer *pp = pool_of(s, pc->peer_ip, 0);
            if (pp != NULL)
                pp->filling--;
            struct ev e;
            ev_begin(&e, EV_LOG, "debug", "peer_pool_connect_failed");
            ev_ip(&e, "peer", pc->peer_ip, -1);
            ev_str(&e, "detail", why);
            ev_send(s, &e);
            peer_free(s, pc);
            return;
        }
        o->conn = NULL;
        peer_free(s, pc);
        switch_offer_result(s, o, SF_PEER_UNREACHABLE, why, NULL);
        return;
    }
    if (pc->state == PC_OFFERED) {
        read_answer(s, pc);
        return;
    }
    if (pc->state == PC_POOLED) {
        struct pool_peer *pp = pool_of(s, pc->peer_ip, 0);
        if (pp != NULL)
            pool_unlink(pp, pc);
        peer_free(s, pc);
    }
}

/* ---- the pool ---- */

static void refill_fire(struct sfs *s, struct sfs_timer *t)
{
    struct pool_peer *pp = (struct pool_peer *)((char *)t - offsetof(struct pool_peer, refill));
    if (pp->want > 0) /* a refill under way: its next step, taken as asked then */
        refill_step(s, pp);
    else
        refill(s, pp);
}

static struct pool_peer *pool_of(struct sfs *s, uint32_t peer, int create)
{
    uint8_t k[12] = {0};
    memcpy(k, &peer, 4);
    struct snode *n = smap_get(&s->pool, k);
    if (n != NULL || !create)
        return n ? n->val : NULL;
    struct pool_peer *pp = calloc(1, sizeof(*pp));
    if (pp == NULL)
        return NULL;
    pp->peer = peer;
    timer_init(&pp->refill, refill_fire);
    if (smap_put(&s->pool, k, pp) == NULL) {
        free(pp);
        return NULL;
    }
    return pp;
}

static void refill(struct sfs *s, struct pool_peer *pp)
{
    uint64_t now = now_us();
    if (pp->taken >= pp->peak || now - pp->peak_at > KEEP_WARM_US) {
        pp->peak = pp->taken;
        pp->peak_at = now;
    }
    size_t want = (size_t)s->cfg.peer_pool_size;
    size_t burst = 2 * pp->taken > pp->peak ? 2 * pp->taken : pp->peak;
    if (burst > POOL_BURST_MAX)
        burst = POOL_BURST_MAX;
    if (want > 0 && burst > want)
        want = burst;
    pp->taken = 0;
    pp->want = want;
    pp->target = want;
    refill_step(s, pp);
}

/* At most REFILL_STEP connects a round: each runs the peer's handshake inline (tens of µs on a
 * shared VM), and 32 at once held up the switches of the burst that asked for them by a third of
 * a millisecond. The rest follow in the next rounds, after the events that came meanwhile. */
static void refill_step(struct sfs *s, struct pool_peer *pp)
{
    for (unsigned i = 0; pp->idle + pp->filling < pp->want; i++) {
        if (i == REFILL_STEP) {
            timer_arm(s, &pp->refill, now_us());
            return;
        }
        char why[96];
        int internal;
        struct sfs_peerconn *pc = connect_peer(s, pp->peer, why, sizeof(why), &internal);
        if (pc == NULL)
            return;
        pp->filling++;
    }
    pp->want = 0;
    if (pp->taken > 0) /* switches took from it meanwhile */
        timer_arm(s, &pp->refill, now_us() + REFILL_DELAY_US);
}

void pool_take_or_connect(struct sfs *s, struct sfs_out *o)
{
    struct sfs_peerconn *found = NULL;
    if (s->cfg.peer_pool_size > 0) {
        struct pool_peer *pp = pool_of(s, o->peer, 1);
        if (pp != NULL) {
            uint64_t now = now_us();
            pp->last_use = now;
            pp->taken++;
            while (pp->head != NULL && found == NULL) {
                struct sfs_peerconn *pc = pp->head;
                pool_unlink(pp, pc);
                /* one the peer closed is dropped at its event (outconn_event); should its
                 * event still be in this round's batch, the OFFER goes again on a fresh one */
                if (now - pc->since < (uint64_t)s->cfg.peer_idle_timeout_ms * 500)
                    found = pc;
                else
                    peer_free(s, pc);
            }
            if (found)
                s->pool_hits++;
            else
                s->pool_misses++;
            /* put off while the pool serves the takes (a burst under way) with half of it
             * left, not a refill's next step */
            if (pp->refill.idx < 0 ||
                (found != NULL && pp->want == 0 && 2 * pp->idle >= pp->target))
                timer_arm(s, &pp->refill, now + REFILL_DELAY_US);
        }
    }
    if (found != NULL) {
        found->from_pool = 1;
        found->out = o;
        o->conn = found;
        send_offer(s, found);
        return;
    }
    char why[96];
    int internal;
    struct sfs_peerconn *pc = connect_peer(s, o->peer, why, sizeof(why), &internal);
    if (pc == NULL) {
        switch_offer_result(s, o, internal ? SF_INTERNAL : SF_PEER_UNREACHABLE, why, NULL);
        return;
    }
    pc->out = o;
    o->conn = pc;
}

/* The peer failed: drop its connections and stop keeping it warm. */
void pool_forget(struct sfs *s, uint32_t peer)
{
    struct pool_peer *pp = pool_of(s, peer, 0);
    if (pp == NULL)
        return;
    while (pp->head != NULL) {
        struct sfs_peerconn *pc = pp->head;
        pool_unlink(pp, pc);
        peer_free(s, pc);
    }
    pp->last_use = 0;
    pp->want = 0;
    timer_disarm(s, &pp->refill);
}

/* Periodic: refill peers in use, forget the others (aged connections expire by their timer). */
void pool_maintain(struct sfs *s)
{
    uint64_t now = now_us();
    for (struct snode *n = s->pool.oldest, *next; n != NULL; n = next) {
        next = n->newer;
        struct pool_peer *pp = n->val;
        if (pp->refill.idx >= 0) /* a refill is due or under way anyway */
            continue;
        if (pp->last_use != 0 && now - pp->last_use < KEEP_WARM_US)
            refill(s, pp);
        else if (pp->idle == 0 && pp->filling == 0) {
            timer_disarm(s, &pp->refill);
            free(pp);
            smap_del(&s->pool, n);
        }
    }
}

void pool_close_all(struct sfs *s)
{
    for (struct snode *n = s->pool.oldest; n != NULL; n = n->newer) {
        struct pool_peer *pp = n->val;
        while (pp->head != NULL) {
            struct sfs_peerconn *pc = pp->head;
            pool_unlink(pp, pc);
            peer_free(s, pc);
        }
        timer_disarm(s, &pp->refill);
    }
}
