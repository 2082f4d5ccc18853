/* util.c -- the switch path's small tools: a map with 12-byte keys, an indexed timer heap, the
 * JSON records that carry events to Python, and tuples.
 *
 * Why a hand-rolled map: the keys are fixed 12-byte blobs (a connection's two ends, a seq, an
 * address), and two of the tables must drop their oldest entry when full, so every map also
 * keeps its insertion order. Its bucket array grows with it (never shrinks).
 * Why JSON for events: Python already logs key=value lines from keyword arguments; one
 * json.loads per record turns a native event into exactly the call the Python path made, so
 * the log lines tests and operators grep stay the same. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "sfs.h"

/* The router's log: where and from which level on (sfs_set_log). Process-wide, as the log is. */
int log_fd = -1;
int log_threshold = 20;

/* ---- map ---- */

static size_t hash12(const uint8_t *k)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (int i = 0; i < 12; i++)
        h = (h ^ k[i]) * 1099511628211ull;
    return (size_t)(h ^ (h >> 29));
}

void smap_init(struct smap *m, size_t nbuckets)
{
    memset(m, 0, sizeof(*m));
    m->nb = nbuckets;
    m->b = calloc(nbuckets, sizeof(*m->b));
    if (m->b == NULL)
        abort(); /* at start only: a router without memory cannot run */
}

void smap_free(struct smap *m)
{
    while (m->oldest != NULL)
        smap_del(m, m->oldest);
    free(m->b);
    m->b = NULL;
}

struct snode *smap_get(const struct smap *m, const void *key)
{
    for (struct snode *n = m->b[hash12(key) % m->nb]; n != NULL; n = n->chain)
        if (memcmp(n->key, key, 12) == 0)
            return n;
    return NULL;
}

/* Chains stay short as a map fills: a client's handed tuples (up to 65,536) in the 256 buckets
 * it started with made each lookup walk a few hundred nodes, 7 % of a router's CPU. Should the
 * larger bucket array not be had, the map goes on with its chains as they are. */
static void smap_grow(struct smap *m)
{
    size_t nb = m->nb * 4;
    struct snode **b = calloc(nb, sizeof(*b));
    if (b == NULL)
        return;
    for (struct snode *n = m->oldest; n != NULL; n = n->newer) {
        size_t h = hash12(n->key) % nb;
        n->chain = b[h];
        b[h] = n;
    }
    free(m->b);
    m->b = b;
    m->nb = nb;
}

struct snode *smap_put(struct smap *m, const void *key, void *val)
{
    struct snode *n = smap_get(m, key);
    if (n != NULL) {
        n->val = val;
        return n;
    }
    if (m->count >= m->nb * 2)
        smap_grow(m);
    n = calloc(1, sizeof(*n));
    if (n == NULL)
        return NULL;
    memcpy(n->key, key, 12);
    n->val = val;
    size_t h = hash12(key) % m->nb;
    n->chain = m->b[h];
    m->b[h] = n;
    n->older = m->newest;
    if (m->newest != NULL)
        m->newest->newer = n;
    else
        m->oldest = n;
    m->newest = n;
    m->count++;
    return n;
}

void smap_del(struct smap *m, struct snode *n)
{
    struct snode **p = &m->b[hash12(n->key) % m->nb];
    while (*p != n)
        p = &(*p)->chain;
    *p = n->chain;
    if (n->older != NULL)
        n->older->newer = n->newer;
    else
        m->oldest = n->newer;
    if (n->newer != NULL)
        n->newer->older = n->older;
    else
        m->newest = n->older;
    m->count--;
    free(n);
}

void smap_key_u64(uint8_t out[12], uint64_t v)
{
    memset(out, 0, 12);
    memcpy(out, &v, sizeof(v));
}

/* ---- timers ---- */

uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

void timer_init(struct sfs_timer *t, void (*fire)(struct sfs *, struct sfs_timer *))
{
    t->at = 0;
    t->idx = -1;
    t->fire = fire;
}

static void heap_swap(struct sfs *s, size_t a, size_t b)
{
    struct sfs_timer *x = s->heap[a];
    s->heap[a] = s->heap[b];
    s->heap[b] = x;
    s->heap[a]->idx = (int)a;
    s->heap[b]->idx = (int)b;
}

static void heap_up(struct sfs *s, size_t i)
{
    while (i > 0 && s->heap[(i - 1) / 2]->at > s->heap[i]->at) {
        heap_swap(s, i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
}

static void heap_down(struct sfs *s, size_t i)
{
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < s->nheap && s->heap[l]->at < s->heap[m]->at)
            m = l;
        if (r < s->nheap && s->heap[r]->at < s->heap[m]->at)
            m = r;
        if (m == i)
            return;
        heap_swap(s, i, m);
        i = m;
    }
}

void timer_disarm(struct sfs *s, struct sfs_timer *t)
{
    if (t->idx < 0)
        return;
    size_t i = (size_t)t->idx, last = s->nheap - 1;
    if (i != last) {
        heap_swap(s, i, last);
        s->nheap--;
        heap_down(s, i);
        heap_up(s, i);
    } else {
        s->nheap--;
    }
    t->idx = -1;
}

void timer_arm(struct sfs *s, struct sfs_timer *t, uint64_t at_us)
{
    timer_disarm(s, t);
    if (s->nheap == s->capheap) {
        size_t cap = s->capheap ? s->capheap * 2 : 256;
        struct sfs_timer **h = realloc(s->heap, cap * sizeof(*h));
        if (h == NULL)
            abort(); /* cannot keep a deadline: better to die than to leak a peer forever */
        s->heap = h;
        s->capheap = cap;
    }
    t->at = at_us;
    t->idx = (int)s->nheap;
    s->heap[s->nheap++] = t;
    heap_up(s, (size_t)t->idx);
}

/* ---- tuples ---- */

static void raw6(uint8_t out[6], uint32_t ip, uint16_t port)
{
    memcpy(out, &ip, 4);
    memcpy(out + 4, &port, 2);
}

struct tkey tuple_key(const struct sf_tuple *t)
{
    uint8_t l[6], r[6];
    struct tkey k;
    raw6(l, t->local_ip, t->local_port);
    raw6(r, t->remote_ip, t->remote_port);
    int lower = memcmp(l, r, 6) < 0;
    memcpy(k.raw, lower ? l : r, 6);
    memcpy(k.raw + 6, lower ? r : l, 6);
    return k;
}

int tuple_local_leads(const struct sf_tuple *t)
{
    uint8_t l[6], r[6];
    raw6(l, t->local_ip, t->local_port);
    raw6(r, t->remote_ip, t->remote_port);
    return memcmp(l, r, 6) < 0;
}

int tuple_eq(const struct sf_tuple *a, const struct sf_tuple *b)
{
    return a->local_ip == b->local_ip && a->remote_ip == b->remote_ip &&
           a->local_port == b->local_port && a->remote_port == b->remote_port;
}

struct sf_msg msg_for(uint16_t type, uint16_t status, uint32_t seq, const struct sf_tuple *t)
{
    struct sf_msg m;
    memset(&m, 0, sizeof(m));
    m.magic = SF_MSG_MAGIC;
    m.type = type;
    m.status = status;
    m.seq = seq;
    if (t != NULL) {
        m.local_ip = t->local_ip;
        m.remote_ip = t->remote_ip;
        m.local_port = t->local_port;
        m.remote_port = t->remote_port;
    }
    return m;
}

void fmt_tuple(char *out, size_t len, const struct sf_tuple *t)
{
    char l[INET_ADDRSTRLEN], r[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &t->local_ip, l, sizeof(l));
    inet_ntop(AF_INET, &t->remote_ip, r, sizeof(r));
    snprintf(out, len, "%s:%u->%s:%u", l, ntohs(t->local_port), r, ntohs(t->remote_port));
}

/* ---- events ---- */

static void ev_raw(struct ev *e, const char *text, size_t n)
{
    if (e->len + n + 2 >= sizeof(e->buf)) {
        e->overflow = 1;
        return;
    }
    memcpy(e->buf + e->len, text, n);
    e->len += n;
}

static void ev_quoted(struct ev *e, const char *v)
{
    ev_raw(e, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
        char esc[8];
        if (*p == '"' || *p == '\\') {
            esc[0] = '\\';
            esc[1] = (char)*p;
            ev_raw(e, esc, 2);
        } else if (*p < 0x20 || *p >= 0x7f) {
            /* bytes from the wire never reach a log line raw */
            snprintf(esc, sizeof(esc), "\\u%04x", *p);
            ev_raw(e, esc, 6);
        } else {
            ev_raw(e, (const char *)p, 1);
        }
    }
    ev_raw(e, "\"", 1);
}

static void ev_key(struct ev *e, const char *k)
{
    if (e->log) { /* key=value, as logfmt.py writes it */
        ev_raw(e, " ", 1);
        ev_raw(e, k, strlen(k));
        ev_raw(e, "=", 1);
        return;
    }
    ev_raw(e, ",", 1);
    ev_quoted(e, k);
    ev_raw(e, ":", 1);
}

/* logfmt._quote: bare unless empty or holding a space, quote, '=', newline, tab or backslash. */
static void log_value(struct ev *e, const char *v)
{
    if (v[0] != 0 && strpbrk(v, " \"=\n\t\\") == NULL) {
        ev_raw(e, v, strlen(v));
        return;
    }
    ev_raw(e, "\"", 1);
    for (const char *p = v; *p; p++) {
        if (*p == '\\' || *p == '"')
            ev_raw(e, "\\", 1);
        if (*p == '\n')
            ev_raw(e, "\\n", 2);
        else
            ev_raw(e, p, 1);
    }
    ev_raw(e, "\"", 1);
}

static const char *LEVELS[] = {"debug", "info", "warning", "error"};

void ev_begin(struct ev *e, int type, const char *level, const char *event)
{
    e->len = 0;
    e->overflow = 0;
    e->skip = 0;
    e->log = type == EV_LOG;
    if (e->log) {
        int lv = 0;
        while (lv < 3 && strcmp(LEVELS[lv], level) != 0)
            lv++;
        if ((lv + 1) * 10 < log_threshold || log_fd < 0) {
            e->skip = 1;
            return;
        }
        struct timespec ts;
        struct tm tm;
        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        char head[96];
        int n = snprintf(head, sizeof(head),
                         "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s event=",
                         tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                         tm.tm_sec, ts.tv_nsec / 1000000, level);
        ev_raw(e, head, (size_t)n);
        log_value(e, event);
        return;
    }
    char head[32];
    int n = snprintf(head, sizeof(head), "{\"t\":%d", type);
    ev_raw(e, head, (size_t)n);
}

void ev_str(struct ev *e, const char *k, const char *v)
{
    if (v == NULL || e->skip)
        return;
    ev_key(e, k);
    if (e->log)
        log_value(e, v);
    else
        ev_quoted(e, v);
}

void ev_int(struct ev *e, const char *k, int64_t v)
{
    char num[32];
    if (e->skip)
        return;
    int n = snprintf(num, sizeof(num), "%lld", (long long)v);
    ev_key(e, k);
    ev_raw(e, num, (size_t)n);
}

void ev_uint(struct ev *e, const char *k, uint64_t v)
{
    char num[32];
    if (e->skip)
        return;
    int n = snprintf(num, sizeof(num), "%llu", (unsigned long long)v);
    ev_key(e, k);
    ev_raw(e, num, (size_t)n);
}

void ev_tuple(struct ev *e, const char *k, const struct sf_tuple *t)
{
    char buf[64];
    if (e->skip)
        return;
    fmt_tuple(buf, sizeof(buf), t);
    ev_str(e, k, buf);
}

void ev_ip(struct ev *e, const char *k, uint32_t ip_net, int port_host)
{
    char ip[INET_ADDRSTRLEN], buf[32];
    if (e->skip)
        return;
    inet_ntop(AF_INET, &ip_net, ip, sizeof(ip));
    if (port_host >= 0)
        snprintf(buf, sizeof(buf), "%s:%d", ip, port_host);
    else
        snprintf(buf, sizeof(buf), "%s", ip);
    ev_str(e, k, buf);
}

void ev_send(struct sfs *s, struct ev *e)
{
    if (e->skip)
        return;
    if (e->log) {
        /* One write per line on the router's own log (O_APPEND when a file): Python writes its
         * lines the same way, so the two never cut into each other. */
        if (e->overflow) {
            e->len = sizeof(e->buf) - 64;
            e->overflow = 0;
            ev_raw(e, " truncated=1", 12);
        }
        ev_raw(e, "\n", 1);
        if (!s->log_batching) {
            ssize_t n = write(log_fd, e->buf, e->len);
            if (n != (ssize_t)e->len)
                s->events_dropped++;
            return;
        }
        if (s->loglen + e->len > sizeof(s->logbuf))
            log_flush(s);
        memcpy(s->logbuf + s->loglen, e->buf, e->len);
        s->loglen += e->len;
        s->loglines++;
        return;
    }
    if (e->overflow) {
        /* a field too long for a record: say so rather than send half an object */
        e->len = 0;
        ev_raw(e, "{\"t\":0", 6);
    }
    ev_raw(e, "}", 1);
    /* Never block the switch path on Python: a full channel drops the record, counted. */
    if (send(s->ev_fd, e->buf, e->len, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
        s->events_dropped++;
}

/* The lines of a round go out in one write: a switch logs one or two lines at each router, and
 * a write per line was a syscall per line on the switch path. Whole lines in one O_APPEND write
 * still never cut into Python's lines. */
void log_flush(struct sfs *s)
{
    if (s->loglen == 0)
        return;
    ssize_t n = log_fd >= 0 ? write(log_fd, s->logbuf, s->loglen) : -1;
    if (n != (ssize_t)s->loglen)
        s->events_dropped += s->loglines;
    s->loglen = 0;
    s->loglines = 0;
}

/* The parsers' reasons are static strings; the figure wire.py's wording adds is ours to add. */
const char *frame_reason(const char *why, const uint8_t *buf, char *out, size_t len)
{
    uint32_t magic;
    uint16_t type;
    memcpy(&magic, buf, sizeof(magic));
    memcpy(&type, buf + 4, sizeof(type));
    if (strcmp(why, "bad magic") == 0)
        snprintf(out, len, "bad magic 0x%x", magic);
    else if (strcmp(why, "unknown frame type") == 0)
        snprintf(out, len, "unknown frame type %u", type);
    else
        return why;
    return out;
}

void lat_add(struct latring *r, uint64_t us)
{
    r->v[r->total % LAT_RING] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
    r->total++;
}
