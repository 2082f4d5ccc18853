/* api.c -- what the Python router calls (src/shuntflow/router/native.py, through ctypes).
 *
 * Python keeps everything that is not per connection: configuration, accepting and admitting
 * library channels (it hands us the fd after HELLO), the overlay map and attachments read from
 * netlink (pushed here when they change), the socket guard, status, metrics and logging. Every
 * call takes the lock and wakes the loop; none blocks on the network. Strings and tables are
 * copied: Python's buffers may go as soon as a call returns. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "sfs.h"

void *sfs_loop(void *arg);

SFS_API size_t sfs_config_size(void)
{
    return sizeof(struct sfs_config);
}

SFS_API struct sfs *sfs_new(const struct sfs_config *cfg, int listen_fd)
{
    struct sfs *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return NULL;
    s->cfg = *cfg;
    s->seq = 1;
    pthread_mutex_init(&s->lock, NULL);
    int sv[2];
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    s->wake_r = s->wake_w = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->epfd < 0 || s->wake_r < 0 ||
        socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
        free(s);
        return NULL;
    }
    s->ev_fd = sv[0];
    s->ev_py = sv[1];
    int big = 4 << 20;
    setsockopt(s->ev_fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
    setsockopt(s->ev_py, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
    s->replay = sfp_replay_new((uint32_t)cfg->auth_window_ms, (uint32_t)cfg->max_nonces);
    smap_init(&s->clients, 1024);
    smap_init(&s->in_progress, 4096);
    smap_init(&s->done, 4096);
    smap_init(&s->refused, 1024);
    smap_init(&s->claims, 1024);
    smap_init(&s->finished, 4096);
    smap_init(&s->stats, 256);
    smap_init(&s->diag_seq, 256);
    smap_init(&s->backoff, 64);
    smap_init(&s->pool, 64);
    smap_init(&s->idle_per_peer, 64);
    s->wake_io = (struct sfs_io){.kind = IO_WAKE, .fd = s->wake_r};
    s->listen_io = (struct sfs_io){.kind = IO_LISTENER, .fd = listen_fd};
    socklen_t sl = sizeof(s->listen_addr);
    if (getsockname(listen_fd, (struct sockaddr *)&s->listen_addr, &sl) < 0 ||
        s->listen_addr.sin_family != AF_INET)
        memset(&s->listen_addr, 0, sizeof(s->listen_addr));
    io_watch(s, &s->wake_io, EPOLLIN);
    io_watch(s, &s->listen_io, EPOLLIN);
    return s;
}

/* Python's end of the event channel: one JSON object per datagram. */
SFS_API int sfs_event_fd(struct sfs *s)
{
    return s->ev_py;
}

SFS_API int sfs_start(struct sfs *s)
{
    s->running = 1;
    int rc = pthread_create(&s->thread, NULL, sfs_loop, s);
    if (rc != 0)
        s->running = 0;
    return -rc;
}

/* Stops the thread, closes every client ("router shutting down": events Python reads after
 * this returns), every peer connection and in-progress request; the listener fd stays
 * Python's. */
SFS_API void sfs_stop(struct sfs *s)
{
    pthread_mutex_lock(&s->lock);
    s->stopping = 1;
    sfs_wakeup(s);
    pthread_mutex_unlock(&s->lock);
    if (s->running)
        pthread_join(s->thread, NULL);
    s->running = 0;
    pthread_mutex_lock(&s->lock);
    io_unwatch(s, &s->listen_io);
    switch_close_all(s);
    while (s->clients.oldest != NULL)
        client_close(s, s->clients.oldest->val, "router shutting down", 0);
    pool_close_all(s);
    peers_close_all(s);
    for (size_t i = 0; i < s->ngrave; i++)
        free(s->grave[i]);
    s->ngrave = 0;
    pthread_mutex_unlock(&s->lock);
}

SFS_API void sfs_free(struct sfs *s)
{
    smap_free(&s->clients);
    smap_free(&s->in_progress);
    smap_free(&s->done);
    smap_free(&s->refused);
    smap_free(&s->claims);
    smap_free(&s->finished);
    smap_free(&s->stats);
    smap_free(&s->diag_seq);
    for (struct snode *n = s->backoff.oldest; n; n = n->newer)
        free(n->val);
    smap_free(&s->backoff);
    for (struct snode *n = s->pool.oldest; n; n = n->newer)
        free(n->val);
    smap_free(&s->pool);
    smap_free(&s->idle_per_peer);
    sfp_replay_free(s->replay);
    close(s->epfd);
    close(s->wake_r);
    close(s->ev_fd);
    close(s->ev_py);
    free(s->heap);
    free(s->grave);
    free(s->rules);
    free(s->map);
    free(s->known_hosts);
    free(s->attach);
    free(s->allow_net);
    free(s->allow_mask);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

/* An admitted channel at its HELLO: the fd is ours from now on (closed on failure too), and its
 * first frame is our HELLO_ACK (seq `hello_seq`): once the library has it, it may be asked to
 * claim, so it must be ours before. */
SFS_API int sfs_add_client(struct sfs *s, int fd, uint64_t id, uint32_t pid, uint32_t cred_pid,
                           int64_t nsid, int diag_fd, const char *owner_error,
                           uint32_t hello_seq, uint32_t mode)
{
    struct sfs_client *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        close(fd);
        return -ENOMEM;
    }
    c->io = (struct sfs_io){.kind = IO_CLIENT, .fd = fd};
    c->id = id;
    c->pid = pid;
    c->cred_pid = cred_pid;
    c->nsid = nsid;
    c->diag_fd = diag_fd;
    c->slim = mode == SF_MODE_SLIM;
    snprintf(c->owner_error, sizeof(c->owner_error), "%s", owner_error ? owner_error : "");
    smap_init(&c->outstanding, 64);
    smap_init(&c->handed, 256);
    uint8_t k[12];
    smap_key_u64(k, id);
    pthread_mutex_lock(&s->lock);
    int rc = 0;
    if (smap_put(&s->clients, k, c) == NULL || io_watch(s, &c->io, EPOLLIN) < 0) {
        struct snode *n = smap_get(&s->clients, k);
        if (n != NULL)
            smap_del(&s->clients, n);
        smap_free(&c->outstanding);
        smap_free(&c->handed);
        close(fd);
        free(c);
        rc = -ENOMEM;
    } else {
        struct sf_msg ack = msg_for(SF_HELLO_ACK, SF_OK, hello_seq, NULL);
        ack.arg = SF_PROTOCOL_VERSION;
        if (client_send(s, c, &ack, -1))
            switch_client_added(s, c);
    }
    sfs_wakeup(s);
    pthread_mutex_unlock(&s->lock);
    return rc;
}

SFS_API int sfs_set_policy(struct sfs *s, const struct rule *in, size_t n)
{
    struct rule *r = calloc(n + 1, sizeof(*r));
    if (r == NULL)
        return -ENOMEM;
    memcpy(r, in, n * sizeof(*r));
    for (size_t i = 0; i < n; i++)
        r[i].text[sizeof(r[i].text) - 1] = '\0'; /* logged as a string */
    pthread_mutex_lock(&s->lock);
    free(s->rules);
    s->rules = r;
    s->nrules = n;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

/* The overlay map (netlink snapshot and static map) and the hosts it knows; requests waiting
 * for a refresh are decided on it. */
SFS_API int sfs_set_map(struct sfs *s, const struct mapent *in, size_t n,
                        const uint32_t *hosts, size_t nhosts)
{
    struct mapent *m = calloc(n + 1, sizeof(*m));
    uint32_t *h = calloc(nhosts + 1, sizeof(*h));
    if (m == NULL || h == NULL) {
        free(m);
        free(h);
        return -ENOMEM;
    }
    memcpy(m, in, n * sizeof(*m));
    memcpy(h, hosts, nhosts * sizeof(*h));
    pthread_mutex_lock(&s->lock);
    free(s->map);
    free(s->known_hosts);
    s->map = m;
    s->nmap = n;
    s->known_hosts = h;
    s->nknown = nhosts;
    s->map_dirty = 1;
    sfs_wakeup(s);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* (address in host order << 32) | nsid, one per overlay address attached to one container. */
SFS_API int sfs_set_attach(struct sfs *s, const uint64_t *pairs, size_t n)
{
    uint64_t *a = calloc(n + 1, sizeof(*a));
    if (a == NULL)
        return -ENOMEM;
    memcpy(a, pairs, n * sizeof(*a));
    qsort(a, n, sizeof(*a), cmp_u64);
    pthread_mutex_lock(&s->lock);
    free(s->attach);
    s->attach = a;
    s->nattach = n;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

SFS_API int sfs_set_peer_allow(struct sfs *s, const uint32_t *nets, const uint32_t *masks,
                               size_t n)
{
    uint32_t *a = calloc(n + 1, sizeof(*a)), *b = calloc(n + 1, sizeof(*b));
    if (a == NULL || b == NULL) {
        free(a);
        free(b);
        return -ENOMEM;
    }
    memcpy(a, nets, n * sizeof(*a));
    memcpy(b, masks, n * sizeof(*b));
    pthread_mutex_lock(&s->lock);
    free(s->allow_net);
    free(s->allow_mask);
    s->allow_net = a;
    s->allow_mask = b;
    s->nallow_peers = n;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

/* Non-empty: why no socket may be handed over at all (the guard is wanted but not working). */
SFS_API void sfs_set_handoff_refusal(struct sfs *s, const char *why)
{
    pthread_mutex_lock(&s->lock);
    snprintf(s->handoff_refusal, sizeof(s->handoff_refusal), "%s", why ? why : "");
    pthread_mutex_unlock(&s->lock);
}

/* Sends STATS_REQ to a client; its seq (rows come as events), or 0 if the client is gone. */
SFS_API uint32_t sfs_stats_req(struct sfs *s, uint64_t client)
{
    pthread_mutex_lock(&s->lock);
    uint32_t seq = 0;
    struct sfs_client *c = client_get(s, client);
    if (c != NULL) {
        seq = next_seq(s);
        uint8_t k[12];
        smap_key_u64(k, seq);
        struct snode *n = smap_put(&s->stats, k, NULL);
        if (n != NULL)
            n->aux = client;
        struct sf_msg m = msg_for(SF_STATS_REQ, SF_OK, seq, NULL);
        if (!client_send(s, c, &m, -1))
            seq = 0;
    }
    sfs_wakeup(s);
    pthread_mutex_unlock(&s->lock);
    return seq;
}

SFS_API void sfs_stats_forget(struct sfs *s, uint32_t seq)
{
    uint8_t k[12];
    smap_key_u64(k, seq);
    pthread_mutex_lock(&s->lock);
    struct snode *n = smap_get(&s->stats, k);
    if (n != NULL)
        smap_del(&s->stats, n);
    pthread_mutex_unlock(&s->lock);
}

/* Samples (µs) of window `which` (LAT_*) with a running index >= `since`, at most `max`;
 * *total the next index. */
SFS_API size_t sfs_samples(struct sfs *s, int which, uint64_t since, uint32_t *out, size_t max,
                           uint64_t *total)
{
    if (which < 0 || which > LAT_CALL_MAX_FAILED)
        return 0;
    pthread_mutex_lock(&s->lock);
    const struct latring *r = &s->lat[which];
    uint64_t first = r->total > LAT_RING ? r->total - LAT_RING : 0;
    if (since < first)
        since = first;
    size_t n = 0;
    for (uint64_t i = since; i < r->total && n < max; i++)
        out[n++] = r->v[i % LAT_RING];
    *total = r->total;
    pthread_mutex_unlock(&s->lock);
    return n;
}

/* Where native log lines go (a dup of the router's log fd, ours to close) and from which
 * level on (logging's numbers: 10 debug .. 40 error). */
SFS_API void sfs_set_log(struct sfs *s, int fd, int threshold)
{
    pthread_mutex_lock(&s->lock);
    log_flush(s);
    if (log_fd >= 0)
        close(log_fd);
    log_fd = fd;
    log_threshold = threshold;
    pthread_mutex_unlock(&s->lock);
}

/* ---- status: one JSON object ---- */

struct sb {
    char *p;
    size_t len, cap;
};

static void sb_printf(struct sb *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#include <stdarg.h>
static void sb_printf(struct sb *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b->p + b->len, b->len < b->cap ? b->cap - b->len : 0, fmt, ap);
    va_end(ap);
    if (n > 0)
        b->len += (size_t)n;
}

/* Writes the counters into `buf`; the length needed (retry with a bigger buffer if >= len). */
SFS_API size_t sfs_status_json(struct sfs *s, char *buf, size_t len)
{
    struct sb b = {buf, 0, len};
    static const char *kinds[] = {"", "offer_", "claim_"};
    pthread_mutex_lock(&s->lock);
    sb_printf(&b,
              "{\"served_initiated\":%llu,\"served_accepted\":%llu,\"handoffs_lost\":%llu,"
              "\"backoff_refusals\":%llu,\"owner_checks\":%llu,\"owner_denials\":%llu,"
              "\"peers_rejected\":%llu,\"offers_rejected\":%llu,\"peer_dropped\":%llu,"
              "\"pool_hits\":%llu,\"pool_misses\":%llu,\"events_dropped\":%llu,"
              "\"in_progress\":%zu,\"replay_cache\":%zu,\"evictions\":%llu,"
              "\"switch_times_claimed\":%llu,\"switch_calls_timed\":%llu,"
              "\"switch_calls_rejected\":%llu,\"reports_rejected\":%llu,\"failures\":{",
              (unsigned long long)s->served_initiated, (unsigned long long)s->served_accepted,
              (unsigned long long)s->handoffs_lost, (unsigned long long)s->backoff_refusals,
              (unsigned long long)s->owner_checks, (unsigned long long)s->owner_denials,
              (unsigned long long)s->peers_rejected, (unsigned long long)s->offers_rejected,
              (unsigned long long)s->peer_dropped, (unsigned long long)s->pool_hits,
              (unsigned long long)s->pool_misses, (unsigned long long)s->events_dropped,
              s->in_progress.count, sfp_replay_size(s->replay), (unsigned long long)s->evictions,
              (unsigned long long)s->switch_times_claimed,
              (unsigned long long)s->switch_calls_timed,
              (unsigned long long)s->switch_calls_rejected,
              (unsigned long long)s->reports_rejected);
    const char *sep = "";
    for (int k = 0; k < 3; k++)
        for (unsigned st = 0; st < 16; st++)
            if (s->failures[k][st]) {
                sb_printf(&b, "%s\"%s%s\":%llu", sep, kinds[k], status_name(st),
                          (unsigned long long)s->failures[k][st]);
                sep = ",";
            }
    sb_printf(&b, "},\"peer_backoffs\":{");
    sep = "";
    uint64_t now = now_us();
    for (struct snode *n = s->backoff.oldest; n; n = n->newer) {
        struct backoff_state *bo = n->val;
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, n->key, ip, sizeof(ip));
        long long left = bo->until > now ? (long long)((bo->until - now + 500) / 1000) : 0;
        sb_printf(&b, "%s\"%s\":{\"failures\":%u,\"remaining_ms\":%lld,\"last_status\":\"%s\"}",
                  sep, ip, bo->failures, left, status_name(bo->last));
        sep = ",";
    }
    sb_printf(&b, "},\"pool_idle\":{");
    sep = "";
    for (struct snode *n = s->pool.oldest; n; n = n->newer) {
        struct pool_peer *pp = n->val;
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, n->key, ip, sizeof(ip));
        sb_printf(&b, "%s\"%s\":%zu", sep, ip, pp->idle);
        sep = ",";
    }
    sb_printf(&b, "},\"clients\":{");
    sep = "";
    for (struct snode *n = s->clients.oldest; n; n = n->newer) {
        struct sfs_client *c = n->val;
        sb_printf(&b, "%s\"%llu\":[%llu,%llu,%llu,%llu]", sep, (unsigned long long)c->id,
                  (unsigned long long)c->switches_ok, (unsigned long long)c->switches_failed,
                  (unsigned long long)c->frames_in, (unsigned long long)c->frames_out);
        sep = ",";
    }
    sb_printf(&b, "}}");
    pthread_mutex_unlock(&s->lock);
    if (b.len < len)
        buf[b.len] = 0;
    return b.len;
}
