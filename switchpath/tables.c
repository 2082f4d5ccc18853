/* tables.c -- the answers the switch logic looks up: policy, overlay address -> host, which
 * container is attached at a local overlay address, which sources may be peer routers, the
 * per-peer backoff and the recently switched connections.
 *
 * Why Python computes and pushes them: reading the kernel's VXLAN and veth state (netlink
 * dumps, pyroute2) and parsing the configuration are rare and already written there; what runs
 * per switch is a lookup, done here without a round trip to Python. A lookup that misses while
 * the map may be stale asks Python for a refresh (an event) and the request waits for the new
 * map (switch.c, peers.c), as the Python router's resolver did. */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sfs.h"

#define DONE_TTL_US 1000000u /* daemon.py's DONE_TTL: see there for why 1 s */
/* A refused leader asks again only after twice its calls, or not at all if its connection ends:
 * a follower asking within this time offers at once (switch.c out_step). */
#define REFUSED_TTL_US 1000000u

static int rule_matches_end(const struct rule *r, uint32_t ip_net, uint16_t port_net)
{
    uint32_t ip = ntohl(ip_net);
    uint16_t port = ntohs(port_net);
    return (ip & r->mask) == r->net && port >= r->first && port <= r->last;
}

static int rule_matches(const struct rule *r, const struct sf_tuple *t)
{
    return rule_matches_end(r, t->local_ip, t->local_port) ||
           rule_matches_end(r, t->remote_ip, t->remote_port);
}

/* Deny wins; an empty allow list allows everything not denied (policy.py). */
const char *policy_refusal(const struct sfs *s, const struct sf_tuple *t, char *buf, size_t len)
{
    int any_allow = 0, allowed = 0;
    for (size_t i = 0; i < s->nrules; i++) {
        const struct rule *r = &s->rules[i];
        if (r->deny && rule_matches(r, t)) {
            snprintf(buf, len, "policy: deny rule %s", r->text);
            return buf;
        }
        if (!r->deny) {
            any_allow = 1;
            allowed = allowed || rule_matches(r, t);
        }
    }
    if (any_allow && !allowed)
        return "policy: no allow rule matches";
    return NULL;
}

/* The netlink snapshot first, then the static map; the longest prefix within each. */
int map_lookup(const struct sfs *s, uint32_t ip_net, uint32_t *host)
{
    uint32_t ip = ntohl(ip_net);
    const struct mapent *best = NULL;
    for (size_t i = 0; i < s->nmap; i++) {
        const struct mapent *m = &s->map[i];
        if ((ip & m->mask) != m->net)
            continue;
        if (best == NULL || m->tier < best->tier ||
            (m->tier == best->tier && m->mask > best->mask))
            best = m;
    }
    if (best == NULL)
        return RES_UNKNOWN;
    *host = best->host;
    return best->local ? RES_LOCAL : RES_REMOTE;
}

int map_known_host(const struct sfs *s, uint32_t ip_net)
{
    for (size_t i = 0; i < s->nknown; i++)
        if (s->known_hosts[i] == ip_net)
            return 1;
    return 0;
}

int64_t attach_owner(const struct sfs *s, uint32_t ip_net)
{
    uint64_t ip = ntohl(ip_net);
    size_t lo = 0, hi = s->nattach;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        uint64_t at = s->attach[mid] >> 32;
        if (at == ip)
            return (int64_t)(uint32_t)s->attach[mid];
        if (at < ip)
            lo = mid + 1;
        else
            hi = mid;
    }
    return -1;
}

int peer_allowed(const struct sfs *s, uint32_t ip_net)
{
    if (s->nallow_peers > 0) {
        uint32_t ip = ntohl(ip_net);
        for (size_t i = 0; i < s->nallow_peers; i++)
            if ((ip & s->allow_mask[i]) == s->allow_net[i])
                return 1;
        return 0;
    }
    if (map_known_host(s, ip_net))
        return 1;
    return s->cfg.map_refreshable ? -1 : 0;
}

void map_request_refresh(struct sfs *s)
{
    if (s->map_asked)
        return;
    s->map_asked = 1;
    struct ev e;
    ev_begin(&e, EV_MAP_MISS, NULL, NULL);
    ev_send(s, &e);
}

/* ---- backoff per peer host: refuse for initial * 2^(n-1), capped; reset on an answer ---- */

static struct backoff_state *backoff_of(struct sfs *s, uint32_t peer, int create)
{
    uint8_t k[12] = {0};
    memcpy(k, &peer, 4);
    struct snode *n = smap_get(&s->backoff, k);
    if (n != NULL || !create)
        return n ? n->val : NULL;
    struct backoff_state *b = calloc(1, sizeof(*b));
    if (b == NULL)
        return NULL;
    if (smap_put(&s->backoff, k, b) == NULL) {
        free(b);
        return NULL;
    }
    return b;
}

int backoff_blocked(struct sfs *s, uint32_t peer)
{
    struct backoff_state *b = backoff_of(s, peer, 0);
    return b != NULL && b->until > now_us();
}

double backoff_failure(struct sfs *s, uint32_t peer, uint16_t status)
{
    struct backoff_state *b = backoff_of(s, peer, 1);
    if (b == NULL)
        return 0;
    b->failures++;
    double ms = s->cfg.backoff_initial_ms;
    for (uint32_t i = 1; i < b->failures && ms < s->cfg.backoff_max_ms; i++)
        ms *= 2;
    if (ms > s->cfg.backoff_max_ms)
        ms = s->cfg.backoff_max_ms;
    b->until = now_us() + (uint64_t)(ms * 1000);
    b->last = status;
    return ms;
}

void backoff_success(struct sfs *s, uint32_t peer)
{
    uint8_t k[12] = {0};
    memcpy(k, &peer, 4);
    struct snode *n = smap_get(&s->backoff, k);
    if (n != NULL) {
        free(n->val);
        smap_del(&s->backoff, n);
    }
}

/* ---- recently switched: a crossing offer that lands just after ours completed; recently
 * refused: a leader's OFFER that no library here took ---- */

static int recent(const struct smap *m, const struct tkey *k)
{
    struct snode *n = smap_get(m, k->raw);
    return n != NULL && n->aux > now_us();
}

static void mark(struct smap *m, const struct tkey *k, uint64_t ttl_us)
{
    struct snode *n = smap_put(m, k->raw, NULL);
    if (n != NULL) {
        n->aux = now_us() + ttl_us;
        /* keep the insertion order the expiry order: re-put moves nothing, so re-add */
        if (n != m->newest) {
            smap_del(m, n);
            n = smap_put(m, k->raw, NULL);
            if (n != NULL)
                n->aux = now_us() + ttl_us;
        }
    }
}

static void expire(struct smap *m, uint64_t now)
{
    while (m->oldest != NULL && m->oldest->aux <= now)
        smap_del(m, m->oldest);
}

int recently_done(struct sfs *s, const struct tkey *k)
{
    return recent(&s->done, k);
}

void mark_done(struct sfs *s, const struct tkey *k)
{
    mark(&s->done, k, DONE_TTL_US);
}

int recently_refused(struct sfs *s, const struct tkey *k)
{
    return recent(&s->refused, k);
}

void mark_refused(struct sfs *s, const struct tkey *k)
{
    mark(&s->refused, k, REFUSED_TTL_US);
}

void done_expire(struct sfs *s)
{
    uint64_t now = now_us();
    expire(&s->done, now);
    expire(&s->refused, now);
}
