/* switch.c -- the switch logic: a library's SWITCH_REQ (an Outgoing), a peer's OFFER (an
 * Incoming and its Claim), and the one in-progress table keyed by the connection (the same key
 * from both ends) that keeps invariant 5: one host connection per overlay connection.
 *
 *   SWITCH_REQ -> owner, attachment, policy -> resolve peer host -> (higher end: grace) -> OFFER
 *       -> ANSWER -> SWITCH_RES + fd (marked)
 *   OFFER (authentic: peers.c) -> sender owns its overlay address, policy -> CLAIM_REQ to the
 *       libraries of the container attached at our end (again while the connection waits in a
 *       listener's queue) -> first CLAIM_RES OK whose namespace holds the tuple -> ANSWER OK
 *       -> SWITCH_RES + fd
 *   crossing offers: a router holding its own unanswered request for the mirrored tuple
 *       accepts the lower end's OFFER (and serves its library with it) and answers the higher's
 *       DUPLICATE; the higher end's request waits a grace for the lower end's OFFER first
 *       (follower_grace_ms for slim, follower_grace_shuntflow_us for shuntflow; not if we
 *       refused that OFFER already), so a switch both ends want costs one OFFER. An
 *       initiator answered DUPLICATE waits duplicate_wait_ms for the peer's own OFFER to
 *       serve it.
 * Every failure before the handoff is a non-OK status and no fd: the library stays on the
 * overlay. Host-level failures put the peer host in backoff. Same rules as the Python router
 * had (its daemon.py), now without a Python call per switch. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "sfs.h"

#define SEQ_HIGH 0x80000000u
#define FINISHED_KEPT 4096

static const char *NAMES[] = {"OK",          "NOT_MINE",    "NO_ROUTE", "PEER_UNREACHABLE",
                              "PEER_REFUSED", "DENIED",     "DUPLICATE", "INTERNAL",
                              "BAD_MESSAGE", "TIMEOUT"};

const char *status_name(unsigned status)
{
    return status < sizeof(NAMES) / sizeof(NAMES[0]) ? NAMES[status] : "UNKNOWN";
}

uint32_t next_seq(struct sfs *s)
{
    uint32_t seq = s->seq | SEQ_HIGH;
    if (++s->seq > 0x7fffffffu) {
        s->seq = 1;
        s->seq_wrapped = 1;
    }
    return seq;
}

/* Could the router have sent this seq to someone? Else the client is making it up. */
int seq_issued(const struct sfs *s, uint32_t seq)
{
    if (!(seq & SEQ_HIGH))
        return 0;
    uint32_t low = seq & 0x7fffffffu;
    return s->seq_wrapped || (low > 0 && low < s->seq);
}

static void describe_res(char *out, size_t len, int res, uint32_t host)
{
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &host, ip, sizeof(ip));
    const char *kind = res == RES_REMOTE ? "remote" : res == RES_LOCAL ? "local" : "unknown";
    if (res != RES_UNKNOWN && host != 0)
        snprintf(out, len, "%s:%s", kind, ip);
    else
        snprintf(out, len, "%s", kind);
}

static void ev_client(struct ev *e, struct sfs *s, uint64_t id)
{
    ev_int(e, "client", (int64_t)id);
    struct sfs_client *c = client_get(s, id);
    if (c != NULL && c->pid != 0)
        ev_int(e, "pid", c->pid);
}

static void fail(struct sfs *s, uint64_t client, uint32_t seq, const struct sf_tuple *t,
                 uint16_t status, const char *detail)
{
    s->failures[FAIL_PLAIN][status & 15]++;
    struct sfs_client *c = client_get(s, client);
    struct ev e;
    ev_begin(&e, EV_LOG, "info", "switch_failed");
    ev_client(&e, s, client);
    ev_int(&e, "seq", seq);
    ev_tuple(&e, "tuple", t);
    ev_str(&e, "status", status_name(status));
    if (detail != NULL && detail[0])
        ev_str(&e, "detail", detail);
    if (c != NULL) {
        if (status != SF_DUPLICATE)
            c->switches_failed++;
        struct sf_msg m = msg_for(SF_SWITCH_RES, status, seq, t);
        client_send(s, c, &m, -1);
    }
    ev_send(s, &e);
}

/* The host connection's two ends, this router's first, from the MAC'd binding of the peer
 * connection it was (docs/wire.md section 2: initiator's address and port, then responder's),
 * so the log line costs no getsockname/getpeername. */
struct ends {
    struct sockaddr_in local, remote;
};

static struct ends ends_of(const struct sfs_peerconn *pc)
{
    struct ends e = {{.sin_family = AF_INET}, {.sin_family = AF_INET}};
    struct sockaddr_in *first = pc->incoming ? &e.remote : &e.local;
    struct sockaddr_in *second = pc->incoming ? &e.local : &e.remote;
    memcpy(&first->sin_addr.s_addr, pc->binding, 4);
    memcpy(&first->sin_port, pc->binding + 4, 2);
    memcpy(&second->sin_addr.s_addr, pc->binding + 6, 4);
    memcpy(&second->sin_port, pc->binding + 10, 2);
    return e;
}

/* SWITCH_RES OK with the host socket `fd`, which is closed here either way; 1 if handed. */
static int deliver(struct sfs *s, uint64_t client, uint32_t seq, const struct sf_tuple *t,
                   int fd, const char *how, uint32_t peer, uint64_t requested_at,
                   const struct ends *ends)
{
    if (s->cfg.guard_on) {
        uint32_t mark = s->cfg.guard_mark;
        if (setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) < 0) {
            char why[120];
            snprintf(why, sizeof(why), "cannot mark the host socket: %s", strerror(errno));
            close(fd);
            fail(s, client, seq, t, SF_INTERNAL, why);
            return 0;
        }
    }
    struct sfs_client *c = client_get(s, client);
    struct sf_msg m = msg_for(SF_SWITCH_RES, SF_OK, seq, t);
    struct ev e;
    if (c != NULL && client_send(s, c, &m, fd)) {
        c->switches_ok++;
        client_handed(c, t);
        if (requested_at != 0)
            lat_add(&s->lat[LAT_REQ_RES], now_us() - requested_at);
        if (strcmp(how, "initiated") == 0)
            s->served_initiated++;
        else
            s->served_accepted++;
        ev_begin(&e, EV_LOG, "info", "switch_done");
        ev_str(&e, "how", how);
        ev_client(&e, s, client);
        ev_int(&e, "seq", seq);
        ev_tuple(&e, "tuple", t);
        ev_ip(&e, "peer", peer, -1);
        ev_ip(&e, "host_local", ends->local.sin_addr.s_addr, ntohs(ends->local.sin_port));
        ev_ip(&e, "host_remote", ends->remote.sin_addr.s_addr, ntohs(ends->remote.sin_port));
        ev_send(s, &e);
        return 1;
    }
    if (c == NULL)
        close(fd); /* client_send closed it when the client exists */
    s->handoffs_lost++;
    ev_begin(&e, EV_LOG, "warning", "handoff_lost");
    ev_str(&e, "how", how);
    ev_int(&e, "client", (int64_t)client);
    ev_tuple(&e, "tuple", t);
    ev_str(&e, "reason", "library gone");
    ev_send(s, &e);
    return 0;
}

/* NULL if the client's namespace holds `t` and the overlay reaches that container at
 * t->local_ip, else why not. */
static const char *not_owner(struct sfs *s, struct sfs_client *c, const struct sf_tuple *t,
                             char *buf, size_t len)
{
    if (!s->cfg.owner_check)
        return NULL;
    if (c->diag_fd < 0) {
        snprintf(buf, len, "owner: %s", c->owner_error);
        return buf;
    }
    char why[160];
    if (!client_ns_holds(s, c, t, why, sizeof(why))) {
        s->owner_denials++;
        snprintf(buf, len, "owner: %s", why);
        return buf;
    }
    /* A copy of the tuple on some namespace's loopback is no connection of the overlay. */
    if (c->nsid < 0 || attach_owner(s, t->local_ip) != c->nsid) {
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &t->local_ip, ip, sizeof(ip));
        s->owner_denials++;
        snprintf(buf, len, "owner: %s is not an overlay address of the caller's container", ip);
        return buf;
    }
    return NULL;
}

static const char *handoff_refusal(struct sfs *s)
{
    return s->handoff_refusal[0] ? s->handoff_refusal : NULL;
}

/* ---- Outgoing ---- */

static void out_timer(struct sfs *s, struct sfs_timer *t);
static void out_step(struct sfs *s, struct sfs_out *o);

static void unpark(struct sfs *s, struct sfs_out *o)
{
    if (!o->parked)
        return;
    for (struct sfs_out **p = &s->parked; *p != NULL; p = &(*p)->park_next)
        if (*p == o) {
            *p = o->park_next;
            break;
        }
    o->parked = 0;
    o->park_next = NULL;
}

/* The request is over: `status` < 0 means it was answered already. */
static void out_finish(struct sfs *s, struct sfs_out *o, int status, const char *detail)
{
    struct snode *n = smap_get(&s->in_progress, o->key.raw);
    if (n != NULL && n->val == o)
        smap_del(&s->in_progress, n);
    struct sfs_client *c = client_get(s, o->client);
    if (c != NULL) {
        uint8_t k[12];
        smap_key_u64(k, o->seq);
        struct snode *q = smap_get(&c->outstanding, k);
        if (q != NULL)
            smap_del(&c->outstanding, q);
    }
    if (status >= 0 && !o->answered) {
        o->answered = 1;
        fail(s, o->client, o->seq, &o->t, (uint16_t)status, detail);
    }
    unpark(s, o);
    timer_disarm(s, &o->timer);
    if (o->conn != NULL) {
        o->conn->out = NULL;
        peer_free(s, o->conn);
    }
    free(o);
}

static void offer(struct sfs *s, struct sfs_out *o)
{
    if (o->answered) {
        out_finish(s, o, -1, NULL);
        return;
    }
    o->state = O_OFFER;
    pool_take_or_connect(s, o); /* may finish `o` at once */
}

static void out_timer(struct sfs *s, struct sfs_timer *t)
{
    struct sfs_out *o = (struct sfs_out *)((char *)t - offsetof(struct sfs_out, timer));
    switch (o->state) {
    case O_RESOLVE: /* no refreshed map in time: decide on what we have */
        unpark(s, o);
        o->map_gen = UINT64_MAX;
        out_step(s, o);
        return;
    case O_GRACE:
        offer(s, o);
        return;
    case O_DUPWAIT:
        out_finish(s, o, o->answered ? -1 : SF_TIMEOUT,
                   "peer answered DUPLICATE and its own offer never came");
        return;
    default:
        return;
    }
}

/* How long the higher end's request waits for the lower end's crossing OFFER (µs). */
static uint64_t grace_us(struct sfs *s, const struct sfs_out *o)
{
    struct sfs_client *c = client_get(s, o->client);
    if (c != NULL && c->slim)
        return (uint64_t)s->cfg.follower_grace_ms * 1000;
    return (uint64_t)s->cfg.follower_grace_shuntflow_us;
}

static void out_step(struct sfs *s, struct sfs_out *o)
{
    char why[160], res[64];
    uint32_t host = 0;
    if (o->answered) {
        out_finish(s, o, -1, NULL);
        return;
    }
    int own = map_lookup(s, o->t.local_ip, &host); /* a local container is never in the tables */
    if (own == RES_REMOTE) {
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &o->t.local_ip, ip, sizeof(ip));
        describe_res(res, sizeof(res), own, host);
        snprintf(why, sizeof(why), "%s is not on this host (%s)", ip, res);
        out_finish(s, o, SF_DENIED, why);
        return;
    }
    host = 0;
    int dest = map_lookup(s, o->t.remote_ip, &host);
    if (dest == RES_UNKNOWN && s->cfg.map_refreshable && o->map_gen != UINT64_MAX) {
        o->map_gen = s->map_gen; /* wait for the next map, once */
        o->parked = 1;
        o->park_next = s->parked;
        s->parked = o;
        timer_arm(s, &o->timer, now_us() + (uint64_t)s->cfg.map_wait_ms * 1000);
        map_request_refresh(s);
        return;
    }
    if (dest != RES_REMOTE || host == 0) {
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &o->t.remote_ip, ip, sizeof(ip));
        describe_res(res, sizeof(res), dest, host);
        snprintf(why, sizeof(why), "%s resolves to %s", ip, res);
        out_finish(s, o, SF_NO_ROUTE, why);
        return;
    }
    o->peer = host;
    if (backoff_blocked(s, host)) {
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &host, ip, sizeof(ip));
        s->backoff_refusals++;
        snprintf(why, sizeof(why), "peer %s in backoff", ip);
        out_finish(s, o, SF_PEER_UNREACHABLE, why);
        return;
    }
    uint64_t grace = grace_us(s, o);
    if (!tuple_local_leads(&o->t) && grace > 0 && !recently_refused(s, &o->key)) {
        /* Both ends of a busy connection cross the threshold within a round trip or so: give
         * the lower end's OFFER a moment to come, so a switch costs one offer, not two, and
         * this end's router answers it without a claim. Slim ends ask at connect/accept, so
         * that OFFER is on its way; a shuntflow end's wait is short, as the other end may be
         * milliseconds from its threshold while this end's bytes cross VXLAN (docs/design.md,
         * "One host connection per overlay connection"). Not when the lower end's OFFER came
         * and no library here took it (it came before the accept): that end asks again only
         * later. */
        o->state = O_GRACE;
        timer_arm(s, &o->timer, now_us() + grace);
        return;
    }
    offer(s, o);
}

void switch_map_updated(struct sfs *s)
{
    struct sfs_out *list = s->parked;
    s->parked = NULL;
    while (list != NULL) {
        struct sfs_out *o = list;
        list = o->park_next;
        o->parked = 0;
        o->park_next = NULL;
        timer_disarm(s, &o->timer);
        o->map_gen = UINT64_MAX;
        out_step(s, o);
    }
}

static void claim_done(struct sfs *s, struct sfs_in *in);

/* A peer's OFFER for this tuple waits for its claim, and the library asking now passed the
 * same checks a positive CLAIM_RES must (owner, attachment, policy: switch_request): it is the
 * owner the claim looks for, so the claim is its, without waiting for its CLAIM_RES. In slim
 * mode the OFFER usually comes before the accepting end's accept(), and so before its
 * request. 1 if the request is served that way. */
static int request_wins_claim(struct sfs *s, void *entry, struct sfs_client *c, uint32_t seq,
                              const struct sf_tuple *t)
{
    struct sfs_in *in = entry;
    if (in->kind != E_IN || in->seq == 0 || in->winner != 0 || !tuple_eq(&in->t, t))
        return 0;
    for (size_t i = 0; i < in->nasked; i++)
        if (in->asked[i] == c->id)
            in->pending[i] = 0; /* its CLAIM_RES, should one follow, comes late */
    in->winner = c->id;
    in->won_seq = seq;
    claim_done(s, in);
    return 1;
}

void switch_request(struct sfs *s, struct sfs_client *c, const struct sf_msg *m)
{
    struct sf_tuple t = sfl_tuple(m);
    uint8_t sk[12];
    char buf[200];
    smap_key_u64(sk, m->seq);
    if (smap_get(&c->outstanding, sk) != NULL) {
        fail(s, c->id, m->seq, &t, SF_BAD_MESSAGE, "seq already outstanding");
        return;
    }
    if (c->outstanding.count >= (size_t)s->cfg.max_outstanding) {
        /* Bounds what one library can make the router hold; a library asks once per
         * connection, so it gets here only with that many of them waiting for an answer.
         * INTERNAL, not DENIED: the library retries such a connection later, while a DENIED
         * one stays on the overlay for good. */
        snprintf(buf, sizeof(buf), "too many outstanding requests (max_outstanding %d)",
                 s->cfg.max_outstanding);
        fail(s, c->id, m->seq, &t, SF_INTERNAL, buf);
        return;
    }
    if (!sfl_valid_tuple(&t)) {
        fail(s, c->id, m->seq, &t, SF_BAD_MESSAGE, "invalid tuple");
        return;
    }
    const char *refusal = handoff_refusal(s);
    if (refusal == NULL)
        refusal = not_owner(s, c, &t, buf, sizeof(buf));
    if (refusal == NULL)
        refusal = policy_refusal(s, &t, buf, sizeof(buf));
    if (refusal != NULL) {
        fail(s, c->id, m->seq, &t, SF_DENIED, refusal);
        return;
    }
    struct tkey key = tuple_key(&t);
    struct snode *busy = smap_get(&s->in_progress, key.raw);
    if (busy != NULL && request_wins_claim(s, busy->val, c, m->seq, &t))
        return;
    if (busy != NULL || (recently_done(s, &key) && !c->slim)) {
        fail(s, c->id, m->seq, &t, SF_DUPLICATE, "tuple already being switched");
        return;
    }
    struct sfs_out *o = calloc(1, sizeof(*o));
    if (o == NULL || smap_put(&s->in_progress, key.raw, o) == NULL ||
        smap_put(&c->outstanding, sk, NULL) == NULL) {
        struct snode *n = smap_get(&s->in_progress, key.raw);
        if (n != NULL && n->val == o)
            smap_del(&s->in_progress, n);
        free(o);
        fail(s, c->id, m->seq, &t, SF_INTERNAL, "router out of memory");
        return;
    }
    o->kind = E_OUT;
    o->key = key;
    o->t = t;
    o->client = c->id;
    o->seq = m->seq;
    o->requested_at = now_us();
    o->state = O_RESOLVE;
    timer_init(&o->timer, out_timer);
    out_step(s, o);
}

void switch_offer_result(struct sfs *s, struct sfs_out *o, uint16_t status, const char *detail,
                         struct sfs_peerconn *pc)
{
    if (status == SF_PEER_UNREACHABLE || status == SF_TIMEOUT) {
        pool_forget(s, o->peer);
        double ms = backoff_failure(s, o->peer, status);
        char num[32];
        snprintf(num, sizeof(num), "%.1f", ms);
        struct ev e;
        ev_begin(&e, EV_LOG, "info", "peer_backoff");
        ev_ip(&e, "peer", o->peer, -1);
        ev_str(&e, "status", status_name(status));
        ev_str(&e, "interval_ms", num);
        ev_send(s, &e);
    } else if (status != SF_INTERNAL) {
        backoff_success(s, o->peer); /* its router answered: the host is fine */
    }
    if (status == SF_OK) {
        int fd = pc->io.fd;
        pc->io.fd = -1;
        struct ends ends = ends_of(pc);
        peer_free(s, pc);
        if (o->answered) { /* the leader's offer already served this request */
            close(fd);
            struct ev e;
            ev_begin(&e, EV_LOG, "warning", "extra_host_connection_closed");
            ev_tuple(&e, "tuple", &o->t);
            ev_ip(&e, "peer", o->peer, -1);
            ev_send(s, &e);
            out_finish(s, o, -1, NULL);
            return;
        }
        o->answered = 1;
        mark_done(s, &o->key);
        deliver(s, o->client, o->seq, &o->t, fd, "initiated", o->peer, o->requested_at, &ends);
        out_finish(s, o, -1, NULL);
        return;
    }
    if (status == SF_DUPLICATE && !o->answered) {
        o->state = O_DUPWAIT;
        timer_arm(s, &o->timer, now_us() + (uint64_t)s->cfg.duplicate_wait_ms * 1000);
        return;
    }
    out_finish(s, o, status == SF_DUPLICATE ? -1 : status, detail);
}

/* ---- Incoming ---- */

static void ev_src(struct ev *e, struct sfs_peerconn *pc)
{
    ev_ip(e, "peer", pc->peer_ip, -1);
}

/* The OFFER is refused with `status`: ANSWER it and close. */
static void refuse(struct sfs *s, struct sfs_peerconn *pc, const struct sf_tuple *t, int kind,
                   uint16_t status, const char *detail)
{
    s->failures[kind][status & 15]++;
    struct ev e;
    ev_begin(&e, EV_LOG, "info", "offer_refused");
    ev_src(&e, pc);
    ev_tuple(&e, "tuple", t);
    ev_str(&e, "status", status_name(status));
    ev_str(&e, "detail", detail);
    ev_send(s, &e);
    peer_send_answer(s, pc, status);
    peer_free(s, pc);
}

static void in_free(struct sfs *s, struct sfs_in *in)
{
    struct snode *n = smap_get(&s->in_progress, in->key.raw);
    if (n != NULL && n->val == in)
        smap_del(&s->in_progress, n);
    if (in->seq != 0) {
        uint8_t k[12];
        smap_key_u64(k, in->seq);
        n = smap_get(&s->claims, k);
        if (n != NULL && n->val == in)
            smap_del(&s->claims, n);
    }
    timer_disarm(s, &in->timer);
    timer_disarm(s, &in->reask);
    if (in->conn != NULL)
        peer_free(s, in->conn);
    free(in->asked);
    free(in->pending);
    free(in);
}

/* Crossing offers, the sender leads: its connection serves our library's request. */
static void accept_for_request(struct sfs *s, struct sfs_peerconn *pc, struct sfs_out *o)
{
    o->answered = 1;
    if (!peer_send_answer(s, pc, SF_OK)) {
        fail(s, o->client, o->seq, &o->t, SF_PEER_UNREACHABLE, "initiator gone");
        peer_free(s, pc);
    } else {
        mark_done(s, &o->key);
        int fd = pc->io.fd;
        pc->io.fd = -1;
        uint32_t src = pc->peer_ip;
        struct ends ends = ends_of(pc);
        peer_free(s, pc);
        deliver(s, o->client, o->seq, &o->t, fd, "accepted_leader", src, o->requested_at,
                &ends);
    }
    /* served: a request waiting for this (grace, DUPLICATE) is over; one whose own OFFER is
     * out waits for its answer (and closes an extra connection) */
    if (o->state == O_GRACE || o->state == O_DUPWAIT)
        out_finish(s, o, -1, NULL);
}

static int pending_count(const struct sfs_in *in)
{
    int n = 0;
    for (size_t i = 0; i < in->nasked; i++)
        n += in->pending[i];
    return n;
}

/* A slim library asks for every connection it makes or accepts, as it does: its request for a
 * tuple switched within the last second (the recently-switched table), or an OFFER for one to
 * its container, is a new connection on a reused port, not that switch again (whose ends hold
 * it on the host path and say NOT_MINE to a claim for it). Refused as DUPLICATE, both ends
 * would wait for a result that never comes: slim's connect() for its 3 s. */
static int slim_container(struct sfs *s, uint32_t local_ip)
{
    int64_t owner = s->cfg.owner_check ? attach_owner(s, local_ip) : -1;
    if (s->cfg.owner_check && owner < 0)
        return 0;
    for (struct snode *n = s->clients.oldest; n != NULL; n = n->newer) {
        struct sfs_client *c = n->val;
        if (!c->closed && c->slim && (!s->cfg.owner_check || c->nsid == owner))
            return 1;
    }
    return 0;
}

/* A slim library says NOT_MINE to a connection it has not accepted yet, and switches it as soon
 * as it does: its SWITCH_REQ then wins the claim (switch_request). */
static int asked_slim(struct sfs *s, const struct sfs_in *in)
{
    for (size_t i = 0; i < in->nasked; i++) {
        struct sfs_client *c = client_get(s, in->asked[i]);
        if (c != NULL && !c->closed && c->slim)
            return 1;
    }
    return 0;
}

static void check_claim(struct sfs *s, struct sfs_in *in);

#define REASK_FIRST_US 500u
#define REASK_MAX_US 8000u

/* All said NOT_MINE, and the connection waits in the listener's queue of their container: no
 * process holds it yet, so no library could know it. The application accepts it in a moment
 * (the OFFER often outruns the accept: the connecting end reached its threshold first), and a
 * claim asked again then is taken. Refused instead, the initiator would ask again only after
 * twice its calls, and its bytes crossed the overlay meanwhile. */
static int not_accepted_yet(struct sfs *s, struct sfs_in *in)
{
    if (!s->cfg.owner_check)
        return 0;
    for (size_t i = 0; i < in->nasked; i++) {
        struct sfs_client *c = client_get(s, in->asked[i]);
        if (c != NULL && !c->closed && c->diag_fd >= 0)
            return client_ns_unaccepted(s, c, &in->t);
    }
    return 0;
}

static void reask_claim(struct sfs *s, struct sfs_timer *t)
{
    struct sfs_in *in = (struct sfs_in *)((char *)t - offsetof(struct sfs_in, reask));
    if (in->seq == 0 || in->winner != 0)
        return;
    uint32_t seq = in->seq;
    struct sf_msg m = msg_for(SF_CLAIM_REQ, SF_OK, seq, &in->t);
    in->seq = 0; /* as in claim(): a send may close a client, which must not end this claim */
    for (size_t i = 0; i < in->nasked; i++) {
        struct sfs_client *c = client_get(s, in->asked[i]);
        in->pending[i] = c != NULL && !c->closed;
        if (in->pending[i])
            client_send(s, c, &m, -1);
    }
    for (size_t i = 0; i < in->nasked; i++)
        if (client_get(s, in->asked[i]) == NULL)
            in->pending[i] = 0;
    in->seq = seq;
    check_claim(s, in);
}

static void check_claim(struct sfs *s, struct sfs_in *in)
{
    /* nobody asked yet: waiting for a library of the container (claim()); all said NOT_MINE
     * but one of them is slim: waiting for its accept() (the claim's timeout bounds both) */
    if (in->seq == 0)
        return;
    if (in->winner == 0 && (in->nasked == 0 || pending_count(in) > 0 || asked_slim(s, in)))
        return;
    if (in->winner == 0 && not_accepted_yet(s, in)) {
        /* Asked again soon, then less often, until the claim's timeout ends it. */
        in->reask_us = in->reask_us == 0 ? REASK_FIRST_US
                       : in->reask_us < REASK_MAX_US ? in->reask_us * 2
                                                      : REASK_MAX_US;
        timer_arm(s, &in->reask, now_us() + in->reask_us);
        return;
    }
    claim_done(s, in);
}

static void claim_timeout(struct sfs *s, struct sfs_timer *t)
{
    claim_done(s, (struct sfs_in *)((char *)t - offsetof(struct sfs_in, timer)));
}

static void claim_done(struct sfs *s, struct sfs_in *in)
{
    uint8_t k[12];
    smap_key_u64(k, in->seq);
    struct snode *n = smap_get(&s->claims, k);
    if (n != NULL)
        smap_del(&s->claims, n);
    n = smap_put(&s->finished, k, NULL);
    if (n != NULL)
        n->aux = in->winner ? SF_DUPLICATE : SF_TIMEOUT;
    while (s->finished.count > FINISHED_KEPT)
        smap_del(&s->finished, s->finished.oldest);
    /* the winner's SWITCH_RES answers its own request if that won, else the claim */
    uint32_t seq = in->won_seq != 0 ? in->won_seq : in->seq;
    in->seq = 0; /* no longer a claim: a close of a client asked changes nothing now */
    struct sfs_peerconn *pc = in->conn;
    if (in->winner == 0) {
        in->conn = NULL;
        mark_refused(s, &in->key);
        refuse(s, pc, &in->t, FAIL_OFFER, SF_PEER_REFUSED,
               in->nasked == 0             ? in->nobody
               : pending_count(in) == 0 ? "all libraries said NOT_MINE"
                                        : "claim timed out");
        in_free(s, in);
        return;
    }
    struct sfs_client *w = client_get(s, in->winner);
    if (w == NULL) {
        s->handoffs_lost++;
        struct ev e;
        ev_begin(&e, EV_LOG, "warning", "handoff_lost");
        ev_str(&e, "how", "claimed");
        ev_tuple(&e, "tuple", &in->t);
        ev_str(&e, "reason", "claimer gone");
        ev_send(s, &e);
        in_free(s, in); /* closes the connection: the initiator's library sees EOF */
        return;
    }
    if (!peer_send_answer(s, pc, SF_OK)) {
        fail(s, in->winner, seq, &in->t, SF_PEER_UNREACHABLE, "initiator gone");
        in_free(s, in);
        return;
    }
    mark_done(s, &in->key);
    int fd = pc->io.fd;
    pc->io.fd = -1;
    uint32_t src = pc->peer_ip;
    struct ends ends = ends_of(pc);
    struct sf_tuple t = in->t;
    uint64_t winner = in->winner;
    in_free(s, in);
    deliver(s, winner, seq, &t, fd, "claimed", src, 0, &ends);
}

static void refuse_claim(struct sfs *s, struct sfs_in *in, const char *why)
{
    struct sfs_peerconn *pc = in->conn;
    in->conn = NULL;
    refuse(s, pc, &in->t, FAIL_OFFER, SF_PEER_REFUSED, why);
    in_free(s, in);
}

static void claim(struct sfs *s, struct sfs_peerconn *pc, const struct sf_tuple *t,
                  const struct tkey *key)
{
    struct sfs_in *in = calloc(1, sizeof(*in));
    if (in == NULL || smap_put(&s->in_progress, key->raw, in) == NULL) {
        free(in);
        refuse(s, pc, t, FAIL_OFFER, SF_INTERNAL, "router out of memory");
        return;
    }
    in->kind = E_IN;
    in->key = *key;
    in->t = *t;
    in->conn = pc;
    timer_init(&in->timer, claim_timeout);
    timer_init(&in->reask, reask_claim);
    /* Only the container the overlay reaches at our end's address hears of it: the others
     * could copy the tuple and say "mine", and would learn who talks to whom. */
    int64_t owner = s->cfg.owner_check ? attach_owner(s, t->local_ip) : -1;
    size_t n = 0;
    in->asked = calloc(s->clients.count + 1, sizeof(*in->asked));
    in->pending = calloc(s->clients.count + 1, 1);
    if (in->asked == NULL || in->pending == NULL) {
        refuse_claim(s, in, "router out of memory");
        return;
    }
    for (struct snode *c = s->clients.oldest; c != NULL; c = c->newer) {
        struct sfs_client *cl = c->val;
        if (cl->closed || (s->cfg.owner_check && (owner < 0 || cl->nsid != owner)))
            continue;
        in->asked[n] = cl->id;
        in->pending[n++] = 1;
    }
    in->nasked = n;
    if (n == 0) {
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &t->local_ip, ip, sizeof(ip));
        if (s->cfg.owner_check && owner < 0) {
            snprintf(in->nobody, sizeof(in->nobody), "no container attached at %s", ip);
            refuse_claim(s, in, in->nobody);
            return;
        }
        /* A library connects its channel when its agent starts (with its process's first
         * connection, or in a single-threaded process at a connection's 8th data call): the
         * accepting end's may well be this very connection, its HELLO on the way. The claim
         * waits for one (switch_client_added) as long as it would wait for an answer. */
        snprintf(in->nobody, sizeof(in->nobody), "%s%s",
                 s->cfg.owner_check ? "no library in the container at " : "no library connected",
                 s->cfg.owner_check ? ip : "");
    }
    uint32_t seq = next_seq(s);
    uint8_t k[12];
    smap_key_u64(k, seq);
    if (smap_put(&s->claims, k, in) == NULL) {
        refuse_claim(s, in, "router out of memory");
        return;
    }
    struct sf_msg m = msg_for(SF_CLAIM_REQ, SF_OK, seq, t);
    for (size_t i = 0; i < n; i++) /* a send may close a client: in->seq is 0 meanwhile */
        client_send(s, client_get(s, in->asked[i]), &m, -1);
    for (size_t i = 0; i < n; i++)
        if (client_get(s, in->asked[i]) == NULL)
            in->pending[i] = 0;
    in->seq = seq;
    timer_arm(s, &in->timer, now_us() + (uint64_t)s->cfg.claim_timeout_ms * 1000);
    check_claim(s, in); /* all of them may have gone while we sent */
}

void switch_offer(struct sfs *s, struct sfs_peerconn *pc)
{
    struct sf_tuple theirs = {pc->offer.local_ip, pc->offer.remote_ip, pc->offer.local_port,
                              pc->offer.remote_port};
    struct sf_tuple t = sfl_mirrored(&theirs);
    char why[200], res[64], ip[INET_ADDRSTRLEN], src[INET_ADDRSTRLEN];
    if (!sfl_valid_tuple(&t)) {
        refuse(s, pc, &t, FAIL_OFFER, SF_BAD_MESSAGE, "invalid tuple");
        return;
    }
    const char *refusal = handoff_refusal(s);
    if (refusal == NULL)
        refusal = policy_refusal(s, &t, why, sizeof(why));
    if (refusal != NULL) {
        refuse(s, pc, &t, FAIL_OFFER, SF_DENIED, refusal);
        return;
    }
    /* Only the host that holds the initiator's overlay address may offer for it. */
    uint32_t host = 0;
    int sender = map_lookup(s, theirs.local_ip, &host);
    if (sender == RES_UNKNOWN && s->cfg.map_refreshable && pc->map_gen != UINT64_MAX) {
        pc->state = PC_OFFER_PARKED;
        pc->map_gen = s->map_gen;
        timer_arm(s, &pc->timer, now_us() + (uint64_t)s->cfg.map_wait_ms * 1000);
        map_request_refresh(s);
        return;
    }
    if (sender != RES_REMOTE || host != pc->peer_ip) {
        inet_ntop(AF_INET, &theirs.local_ip, ip, sizeof(ip));
        inet_ntop(AF_INET, &pc->peer_ip, src, sizeof(src));
        describe_res(res, sizeof(res), sender, host);
        snprintf(why, sizeof(why), "%s is %s, not on %s", ip, res, src);
        refuse(s, pc, &t, FAIL_OFFER, SF_DENIED, why);
        return;
    }
    host = 0;
    int mine = map_lookup(s, t.local_ip, &host);
    if (mine == RES_REMOTE) {
        inet_ntop(AF_INET, &t.local_ip, ip, sizeof(ip));
        describe_res(res, sizeof(res), mine, host);
        snprintf(why, sizeof(why), "%s is not on this host (%s)", ip, res);
        refuse(s, pc, &t, FAIL_OFFER, SF_DENIED, why);
        return;
    }
    struct tkey key = tuple_key(&t);
    struct snode *n = smap_get(&s->in_progress, key.raw);
    if (n != NULL && *(int *)n->val == E_OUT) {
        struct sfs_out *o = n->val;
        if (!o->answered && tuple_eq(&o->t, &t) && tuple_local_leads(&theirs)) {
            accept_for_request(s, pc, o);
            return;
        }
    }
    if (n != NULL || (recently_done(s, &key) && !slim_container(s, t.local_ip))) {
        refuse(s, pc, &t, FAIL_OFFER, SF_DUPLICATE, "tuple already being switched");
        return;
    }
    claim(s, pc, &t, &key);
}

const char *switch_claim_res(struct sfs *s, struct sfs_client *c, const struct sf_msg *m,
                             char *why, size_t len)
{
    int ok = m->status == SF_OK;
    uint8_t k[12];
    smap_key_u64(k, m->seq);
    struct snode *n = smap_get(&s->claims, k);
    struct sf_tuple mt = sfl_tuple(m);
    struct ev e;
    if (n == NULL) {
        struct snode *f = smap_get(&s->finished, k);
        uint16_t late = f ? (uint16_t)f->aux : SF_TIMEOUT;
        ev_begin(&e, EV_LOG, "info", "claim_res_late");
        ev_int(&e, "client", (int64_t)c->id);
        ev_int(&e, "seq", m->seq);
        ev_str(&e, "ok", ok ? "True" : "False");
        ev_str(&e, "answer", status_name(late));
        ev_send(s, &e);
        if (ok) { /* it expects a SWITCH_RES for this seq: tell it there is no fd */
            struct sf_msg r = msg_for(SF_SWITCH_RES, late, m->seq, &mt);
            client_send(s, c, &r, -1);
        }
        return NULL;
    }
    struct sfs_in *in = n->val;
    size_t i = 0;
    while (i < in->nasked && in->asked[i] != c->id)
        i++;
    if (i == in->nasked) {
        snprintf(why, len, "CLAIM_RES for claim %#x this client was not asked", m->seq);
        return why;
    }
    if (!in->pending[i]) {
        ev_begin(&e, EV_LOG, "info", "claim_res_repeated");
        ev_int(&e, "client", (int64_t)c->id);
        ev_int(&e, "seq", m->seq);
        ev_send(s, &e);
        return NULL;
    }
    in->pending[i] = 0;
    if (ok) {
        char buf[200];
        const char *refusal = not_owner(s, c, &in->t, buf, sizeof(buf));
        if (refusal != NULL) {
            /* It said "mine" and waits for a SWITCH_RES of this seq: it gets one, no fd. */
            s->failures[FAIL_CLAIM][SF_DENIED]++;
            struct sf_msg r = msg_for(SF_SWITCH_RES, SF_DENIED, m->seq, &in->t);
            client_send(s, c, &r, -1);
            ev_begin(&e, EV_LOG, "info", "claim_denied");
            ev_int(&e, "client", (int64_t)c->id);
            if (c->pid)
                ev_int(&e, "pid", c->pid);
            ev_int(&e, "cred_pid", c->cred_pid);
            ev_int(&e, "seq", m->seq);
            ev_tuple(&e, "tuple", &in->t);
            ev_str(&e, "status", "DENIED");
            ev_str(&e, "detail", refusal);
            ev_send(s, &e);
        } else if (in->winner == 0) {
            in->winner = c->id;
        } else {
            struct sf_msg r = msg_for(SF_SWITCH_RES, SF_DUPLICATE, m->seq, &in->t);
            client_send(s, c, &r, -1);
        }
    }
    check_claim(s, in);
    return NULL;
}

/* A library just said HELLO: the open claims for its container ask it too. */
void switch_client_added(struct sfs *s, struct sfs_client *c)
{
    for (struct snode *n = s->claims.oldest; n != NULL; n = n->newer) {
        struct sfs_in *in = n->val;
        if (in->winner != 0 ||
            (s->cfg.owner_check && (c->nsid < 0 || attach_owner(s, in->t.local_ip) != c->nsid)))
            continue;
        uint64_t *asked = realloc(in->asked, (in->nasked + 1) * sizeof(*asked));
        if (asked == NULL)
            continue;
        in->asked = asked;
        uint8_t *pending = realloc(in->pending, in->nasked + 1);
        if (pending == NULL)
            continue;
        in->pending = pending;
        in->asked[in->nasked] = c->id;
        in->pending[in->nasked++] = 1;
        struct sf_msg m = msg_for(SF_CLAIM_REQ, SF_OK, in->seq, &in->t);
        /* a failed send closed the client, which may have ended claims: stop walking them */
        if (!client_send(s, c, &m, -1) || c->closed)
            return;
    }
}

void switch_client_closed(struct sfs *s, uint64_t id)
{
    /* By seq, not pointer: ending one claim sends frames, and a send may close another client,
     * which may end another claim. */
    size_t n = 0;
    uint32_t *todo = malloc((s->claims.count + 1) * sizeof(*todo));
    if (todo == NULL)
        return; /* their timeouts end them */
    for (struct snode *c = s->claims.oldest; c != NULL; c = c->newer) {
        struct sfs_in *in = c->val;
        for (size_t i = 0; i < in->nasked; i++)
            if (in->asked[i] == id && in->pending[i]) {
                in->pending[i] = 0;
                todo[n++] = in->seq;
            }
    }
    for (size_t i = 0; i < n; i++) {
        uint8_t k[12];
        smap_key_u64(k, todo[i]);
        struct snode *c = smap_get(&s->claims, k);
        if (c != NULL)
            check_claim(s, c->val);
    }
    free(todo);
}

void switch_close_all(struct sfs *s)
{
    while (s->in_progress.oldest != NULL) {
        void *v = s->in_progress.oldest->val;
        if (*(int *)v == E_OUT)
            out_finish(s, v, SF_INTERNAL, "router shutting down");
        else
            in_free(s, v);
    }
}
