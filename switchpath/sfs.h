/* sfs.h -- what the files of the native switch path share (docs/design.md, "The native switch
 * path").
 *
 * One struct sfs per router process, driven by one thread of its own (loop.c) around one epoll
 * set. Everything below is touched only with s->lock held: the loop thread holds it except
 * while it sleeps in epoll_wait, and every call from Python (api.c) takes it, so the Python
 * side may push tables or ask for status at any time without a second copy of the state.
 *
 * Files: loop.c the thread, timers and the event channel to Python; util.c maps, the timer heap
 * and the JSON event writer; tables.c policy, overlay map, attachments, backoff and the recently
 * switched table; clients.c the library channels; peers.c the peer port (incoming OFFERs);
 * pool.c outgoing peer connections and their warm pool; switch.c the switch logic (the
 * in-progress table, the leader rule, claims); api.c the functions Python calls. */
#ifndef SF_SFS_H
#define SF_SFS_H

#include <netinet/in.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "libframe.h"
#include "owner.h"
#include "peerframe.h"
#include "sf_wire.h"

#define SFS_API __attribute__((visibility("default")))

/* ---- settings, pushed once by Python (native.py mirrors this struct) ---- */
struct sfs_config {
    uint32_t host_ip; /* network order */
    uint16_t peer_port; /* host order */
    uint16_t pad0;
    int32_t owner_check, guard_on, map_refreshable;
    uint32_t guard_mark;
    int32_t connect_timeout_ms, answer_timeout_ms, offer_read_timeout_ms, peer_idle_timeout_ms;
    int32_t peer_pool_size, duplicate_wait_ms, follower_grace_ms, follower_grace_shuntflow_us;
    int32_t claim_timeout_ms;
    int32_t max_outstanding, max_incoming, max_idle_per_peer, backoff_initial_ms;
    int32_t backoff_max_ms, auth_window_ms, max_nonces, map_wait_ms;
    int32_t keylen;
    uint8_t key[SFP_KEY_MAX];
};

/* ---- small generic map: 12-byte keys, insertion order kept (oldest first) ---- */
struct snode {
    struct snode *chain, *older, *newer;
    uint8_t key[12];
    void *val;
    uint64_t aux;
};
struct smap {
    struct snode **b;
    size_t nb, count;
    struct snode *oldest, *newest;
};
void smap_init(struct smap *m, size_t nbuckets);
void smap_free(struct smap *m); /* nodes only; values are the caller's */
struct snode *smap_get(const struct smap *m, const void *key);
struct snode *smap_put(struct smap *m, const void *key, void *val); /* new or existing */
void smap_del(struct smap *m, struct snode *n);
void smap_key_u64(uint8_t out[12], uint64_t v);

/* ---- timers: an indexed min-heap, so an object can disarm its timer when it goes ---- */
struct sfs;
struct sfs_timer {
    uint64_t at;
    int idx; /* -1: not armed */
    void (*fire)(struct sfs *, struct sfs_timer *);
};
void timer_init(struct sfs_timer *t, void (*fire)(struct sfs *, struct sfs_timer *));
void timer_arm(struct sfs *s, struct sfs_timer *t, uint64_t at_us);
void timer_disarm(struct sfs *s, struct sfs_timer *t);
uint64_t now_us(void); /* CLOCK_MONOTONIC */

/* ---- what epoll's data.ptr points at ---- */
enum { IO_WAKE = 1, IO_LISTENER, IO_CLIENT, IO_PEER };
struct sfs_io {
    int kind;
    int fd;
    uint32_t events; /* registered with epoll; 0: not registered */
};
int io_watch(struct sfs *s, struct sfs_io *io, uint32_t events);
void io_unwatch(struct sfs *s, struct sfs_io *io);

/* ---- library clients (clients.c) ---- */
struct qent {
    struct sf_msg msg;
    int fd; /* passed with the frame, ours to close once sent; -1: none */
};
struct sfs_client {
    struct sfs_io io;
    uint64_t id;
    uint32_t pid, cred_pid;
    int64_t nsid; /* -1: attached nowhere */
    int diag_fd;  /* -1: no ownership check possible, owner_error says why */
    char owner_error[160];
    struct qent *q;
    size_t qhead, qlen, qcap;
    struct smap outstanding; /* SWITCH_REQ seqs being worked on */
    struct smap handed;      /* tuple keys handed to it, oldest evicted */
    uint64_t switches_ok, switches_failed, frames_in, frames_out;
    int closed;
    int slim; /* its HELLO said slim mode: it switches every connection it accepts */
};
struct sfs_client *client_get(struct sfs *s, uint64_t id);
int client_send(struct sfs *s, struct sfs_client *c, const struct sf_msg *m, int fd);
void client_close(struct sfs *s, struct sfs_client *c, const char *reason, int violation);
void client_readable(struct sfs *s, struct sfs_client *c);
void client_writable(struct sfs *s, struct sfs_client *c);
/* Does the client's network namespace hold `t` (sock_diag; `why` says why not)? */
int client_ns_holds(struct sfs *s, struct sfs_client *c, const struct sf_tuple *t, char *why,
                    size_t whylen);
int client_ns_unaccepted(struct sfs *s, struct sfs_client *c, const struct sf_tuple *t);

/* ---- tuples ---- */
struct tkey {
    uint8_t raw[12]; /* the lower end's 6 raw bytes, then the other's */
};
struct tkey tuple_key(const struct sf_tuple *t);
int tuple_local_leads(const struct sf_tuple *t);
int tuple_eq(const struct sf_tuple *a, const struct sf_tuple *b);
struct sf_msg msg_for(uint16_t type, uint16_t status, uint32_t seq, const struct sf_tuple *t);

/* ---- peer connections, both directions (peers.c, pool.c) ---- */
enum pc_state {
    PC_NEW,        /* incoming: just accepted */
    PC_ADMIT,      /* incoming: source being checked (map refresh pending) */
    PC_IDLE,       /* incoming: no byte yet */
    PC_READING,    /* incoming: part of the OFFER */
    PC_HELD,       /* incoming: OFFER taken, being decided; not read */
    PC_OFFER_PARKED, /* incoming: OFFER taken, its sender's address waits for the map */
    PC_CONNECTING, /* outgoing */
    PC_POOLED,     /* outgoing, warm, idle */
    PC_OFFERED,    /* outgoing: OFFER sent, reading the ANSWER */
};
struct sfs_out;
struct sfs_peerconn {
    struct sfs_io io;
    int state;
    int incoming;
    int from_pool; /* outgoing: was a warm connection (retry on a fresh one if it died) */
    uint32_t peer_ip; /* network order: the other router */
    uint16_t peer_port;
    uint64_t since;
    struct sfs_timer timer;
    struct sfs_peerconn *prev, *next; /* incoming: waiting list (oldest first); pool: its queue */
    int waiting; /* on the waiting list */
    uint8_t buf[sizeof(struct sf_peer_msg)];
    size_t got;
    struct sf_peer_msg offer; /* outgoing: ours; incoming: theirs */
    uint8_t binding[SFP_BINDING_SIZE];
    int bound; /* binding is filled (from accept's and the listener's addresses, or at connect) */
    struct sfs_out *out; /* outgoing: the request it offers for */
    char evicted[160];   /* incoming: why it was shut before its OFFER */
    uint64_t map_gen;    /* PC_ADMIT: the map generation it missed in */
};
void peers_accept(struct sfs *s);
void peer_event(struct sfs *s, struct sfs_peerconn *pc, uint32_t events);
void peer_free(struct sfs *s, struct sfs_peerconn *pc);
int peer_send_answer(struct sfs *s, struct sfs_peerconn *pc, uint16_t status);
void peers_map_updated(struct sfs *s);
void pool_take_or_connect(struct sfs *s, struct sfs_out *o);
void binding_put(uint8_t out[SFP_BINDING_SIZE], const struct sockaddr_in *initiator,
                 const struct sockaddr_in *responder);
void pool_forget(struct sfs *s, uint32_t peer);
void pool_maintain(struct sfs *s);
void peer_delay_acks(int fd);
void pool_close_all(struct sfs *s);
void outconn_event(struct sfs *s, struct sfs_peerconn *pc, uint32_t events);
void peers_close_all(struct sfs *s);

/* ---- the switch logic (switch.c) ---- */
enum { E_OUT = 1, E_IN };
enum out_state { O_RESOLVE, O_GRACE, O_OFFER, O_DUPWAIT };
struct sfs_out {
    int kind; /* E_OUT */
    struct tkey key;
    struct sf_tuple t; /* the library's view */
    uint64_t client;
    uint32_t seq;
    int answered;
    int state;
    uint32_t peer; /* network order */
    uint64_t requested_at, map_gen;
    struct sfs_timer timer;
    struct sfs_peerconn *conn;
    struct sfs_out *park_next; /* waiting for a map refresh */
    int parked;
};
struct sfs_in {
    int kind; /* E_IN */
    struct tkey key;
    struct sf_tuple t; /* ours */
    struct sfs_peerconn *conn;
    uint32_t seq;       /* the claim's, 0 while none */
    uint64_t *asked;    /* client ids */
    uint8_t *pending;   /* per asked client */
    size_t nasked;
    uint64_t winner; /* 0: none yet */
    uint32_t won_seq; /* the winner's own SWITCH_REQ, when that won the claim; else 0 */
    char nobody[80]; /* why, should no library be there to ask */
    struct sfs_timer timer;
    struct sfs_timer reask; /* the connection is not accepted yet: ask again then */
    uint32_t reask_us;
};
void switch_request(struct sfs *s, struct sfs_client *c, const struct sf_msg *m);
const char *switch_claim_res(struct sfs *s, struct sfs_client *c, const struct sf_msg *m,
                             char *why, size_t len);
void client_handed(struct sfs_client *c, const struct sf_tuple *t);
void switch_client_closed(struct sfs *s, uint64_t id);
void switch_client_added(struct sfs *s, struct sfs_client *c);
void switch_offer(struct sfs *s, struct sfs_peerconn *pc);
void switch_offer_result(struct sfs *s, struct sfs_out *o, uint16_t status, const char *detail,
                         struct sfs_peerconn *pc);
void switch_map_updated(struct sfs *s);
void switch_close_all(struct sfs *s);
uint32_t next_seq(struct sfs *s);
int seq_issued(const struct sfs *s, uint32_t seq);
const char *status_name(unsigned status);

/* ---- tables pushed from Python (tables.c; native.py mirrors these structs) ---- */
struct rule {
    uint32_t net, mask; /* host order */
    uint16_t first, last;
    int32_t deny;
    char text[64];
};
struct mapent {
    uint32_t net, mask; /* host order */
    uint32_t host;      /* network order; 0: none */
    int32_t tier;       /* 0 netlink, 1 static map: a tier-0 match wins */
    int32_t local;      /* the host is this one */
};
enum { RES_UNKNOWN, RES_LOCAL, RES_REMOTE };
int map_lookup(const struct sfs *s, uint32_t ip_net, uint32_t *host);
int map_known_host(const struct sfs *s, uint32_t ip_net);
int64_t attach_owner(const struct sfs *s, uint32_t ip_net); /* -1 none */
const char *policy_refusal(const struct sfs *s, const struct sf_tuple *t, char *buf,
                           size_t len);
int peer_allowed(const struct sfs *s, uint32_t ip_net); /* 1 yes, 0 no, -1 ask the map */
int backoff_blocked(struct sfs *s, uint32_t peer);
double backoff_failure(struct sfs *s, uint32_t peer, uint16_t status);
void backoff_success(struct sfs *s, uint32_t peer);
int recently_done(struct sfs *s, const struct tkey *k);
void mark_done(struct sfs *s, const struct tkey *k);
int recently_refused(struct sfs *s, const struct tkey *k);
void mark_refused(struct sfs *s, const struct tkey *k);
void done_expire(struct sfs *s);
void map_request_refresh(struct sfs *s);

/* ---- events to Python: one JSON object per datagram (util.c) ---- */
#define EV_MAX 2048
#define LOG_BATCH (16 * EV_MAX)
enum { EV_LOG = 1, EV_CLOSED, EV_MAP_MISS, EV_ROW, EV_STATS_END, EV_SWITCH_DONE,
       EV_SWITCH_CALLS };
struct ev {
    char buf[EV_MAX];
    size_t len;
    int overflow;
    int log;  /* EV_LOG: a key=value line written to the log, not a record for Python */
    int skip; /* a log line below the level */
};
extern int log_fd, log_threshold;
void ev_begin(struct ev *e, int type, const char *level, const char *event);
void ev_str(struct ev *e, const char *k, const char *v);
void ev_int(struct ev *e, const char *k, int64_t v);
void ev_uint(struct ev *e, const char *k, uint64_t v);
void ev_tuple(struct ev *e, const char *k, const struct sf_tuple *t);
void ev_ip(struct ev *e, const char *k, uint32_t ip_net, int port_host);
void ev_send(struct sfs *s, struct ev *e);
void log_flush(struct sfs *s);
const char *frame_reason(const char *why, const uint8_t *buf, char *out, size_t len);
void fmt_tuple(char *out, size_t len, const struct sf_tuple *t);

/* ---- latency samples Python pulls (SWITCH_REQ received -> SWITCH_RES OK sent) ---- */
#define LAT_RING 16384
struct latring {
    uint32_t v[LAT_RING];
    uint64_t total;
};
void lat_add(struct latring *r, uint64_t us);

/* ---- the switch path ---- */
struct pool_peer {
    uint32_t peer;
    struct sfs_peerconn *head, *tail;
    size_t idle, filling;
    size_t taken; /* switches that asked for a connection since the last refill */
    size_t want;  /* the refill under way fills up to this many (0: none under way) */
    size_t target; /* what the last refill filled up to */
    size_t peak;  /* the most taken between two refills (one burst), within KEEP_WARM */
    uint64_t peak_at;
    uint64_t last_use;
    struct sfs_timer refill;
};
struct backoff_state {
    uint32_t failures;
    uint64_t until;
    uint16_t last;
};

struct sfs {
    pthread_mutex_t lock;
    pthread_t thread;
    int running, stopping;
    int epfd, wake_r, wake_w, ev_fd, ev_py;
    struct sfs_io wake_io, listen_io;
    struct sfs_config cfg;
    struct sfp_replay *replay;

    struct sfs_timer **heap;
    size_t nheap, capheap;
    struct sfs_timer tick;

    struct smap clients;     /* id -> struct sfs_client */
    struct smap in_progress; /* tkey -> struct sfs_out / struct sfs_in */
    struct smap done;        /* tkey -> expiry (aux, µs) */
    struct smap refused;     /* tkey -> expiry (aux, µs): OFFERs no library here took */
    struct smap claims;      /* seq -> struct sfs_in */
    struct smap finished;    /* seq -> status (aux), the last FINISHED_KEPT */
    struct smap stats;       /* seq -> client id (aux) */
    struct smap diag_seq;    /* diag fd -> netlink seq (aux) */
    struct smap backoff;     /* peer -> struct backoff_state */
    struct smap pool;        /* peer -> struct pool_peer */
    struct smap idle_per_peer; /* source -> count (aux) */
    struct sfs_peerconn *wait_head, *wait_tail; /* incoming conns with no byte yet */
    size_t incoming;          /* incoming connections alive */
    struct sockaddr_in listen_addr; /* the listener's, if bound to one address: an incoming
                                     * connection's local end without a getsockname */
    uint32_t seq;
    int seq_wrapped;

    struct rule *rules;
    size_t nrules, nallow;
    struct mapent *map;
    size_t nmap;
    uint32_t *known_hosts; /* network order */
    size_t nknown;
    uint64_t *attach; /* (ip << 32) | nsid, sorted by ip: the address's one container */
    size_t nattach;
    uint32_t *allow_net, *allow_mask; /* peer_allow, host order */
    size_t nallow_peers;
    uint64_t map_gen;
    int map_asked;
    struct sfs_out *parked;
    int map_dirty;
    void **grave;
    size_t ngrave, capgrave;
    char handoff_refusal[200]; /* non-empty: hand nothing out (guard wanted, not working) */
    /* The loop's log lines of one round, written at its end in one write (log_flush) */
    int log_batching;
    size_t loglen, loglines;
    char logbuf[LOG_BATCH];

    /* counters Python reads */
    uint64_t served_initiated, served_accepted, handoffs_lost, backoff_refusals;
    uint64_t owner_checks, owner_denials, reports_rejected, peers_rejected, offers_rejected;
    uint64_t peer_dropped, pool_hits, pool_misses, events_dropped, evictions;
    uint64_t failures[3][16]; /* plain, offer_, claim_ x status */
    uint64_t switch_times_claimed, switch_calls_timed, switch_calls_rejected;
    /* SWITCH_REQ -> SWITCH_RES OK; libraries' SWITCH_DONE of initiating ends; SWITCH_CALLS'
     * longest call of completed and of failed switches */
    struct latring lat[4];
};

#define FAIL_PLAIN 0
#define FAIL_OFFER 1
#define FAIL_CLAIM 2
enum { LAT_REQ_RES, LAT_SWITCH_TIME, LAT_CALL_MAX, LAT_CALL_MAX_FAILED };

void sfs_wakeup(struct sfs *s);
void sfs_defer_free(struct sfs *s, void *p, struct sfs_io *io); /* at the end of the round */

#endif
