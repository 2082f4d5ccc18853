/* agent.h -- what the agent's parts share with each other, and nothing the wrappers need.
 *
 * The agent is one background thread per process (agent.c) serving three conversations, one
 * file each, in the way an event loop keeps its loop apart from what it serves:
 *   agent.c    the thread, its epoll and the work queue application threads hand it; slim mode
 *   router.c   the channel to the router: requests, claims, statistics, reports, backoff
 *   handoff.c  the frames on a new host connection: begin, commit, pump, abort, expiry
 *   linger.c   host sockets of connections closed before the peer's last handoff frame
 * All of their shared state sits behind one lock, sf_agent_mu: a c->mu may be held when it is
 * taken, and under it only the fd table's lock is (for a new private fd). */
#ifndef SF_AGENT_H
#define SF_AGENT_H

#include <sys/epoll.h>

#include "sf_core.h"

#define AG_REQUEST_TIMEOUT_MS 3000
/* Tags of the agent's epoll; any other tag is a host connection's (generation << 32 | fd). */
#define AG_TAG_EVENT 0xFFFFFFFFFFFFFFFEull
#define AG_TAG_CHAN 0xFFFFFFFFFFFFFFFDull
/* How a host connection is watched while its handoff frames may come. */
#define SF_HANDOFF_WATCH (EPOLLIN | EPOLLRDHUP)
static inline uint64_t sf_handoff_tag(struct sf_conn *c) {
    return ((uint64_t)atomic_load(&c->gen) << 32) | (uint32_t)c->fd;
}

/* agent.c */
extern pthread_mutex_t sf_agent_mu; /* the queue, the agent's fds, backoff, reports, lingering */
int sf_agent_started(void);          /* its epoll exists; ask under sf_agent_mu */
int sf_agent_is_this_process(void);  /* started by this process, not inherited across fork */
int sf_agent_watch(int fd, uint32_t events, uint64_t tag);
void sf_agent_unwatch(int fd);
void sf_agent_rewatch(int from, int to, uint32_t events, uint64_t tag); /* a watched fd moved */
void sf_agent_kick_locked(void);     /* wake the agent; caller holds sf_agent_mu */
void sf_retry_later_locked(struct sf_conn *c); /* the next trigger at twice the calls so far */

/* router.c */
int sf_router_open(void);            /* 0 if the channel is open (opened now if it may be) */
void sf_router_index_all(void);      /* the agent's start: index the connections made before it */
int sf_router_connected(void);
void sf_router_request(struct sf_conn *c); /* a trigger taken from the queue */
int sf_router_request_now(struct sf_conn *c); /* the trigger's own thread asks: 1 if it did */
void sf_router_on_readable(void);
void sf_router_send_reports(void);
int sf_router_reports_wait_ms(void);  /* the epoll bound while reports wait, 0 if none */
void sf_router_report_switch_time(struct sf_conn *c);
void sf_router_at_exit(void);
void sf_router_after_fork_child(void);
void sf_router_private_moved(int from, int to);

/* handoff.c */
void sf_handoff_begin_locked(struct sf_conn *c, int host_fd);
void sf_handoff_abort_locked(struct sf_conn *c, int status, int retry);
void sf_handoff_on_readable(uint64_t tag);
void sf_handoff_watch_locked(struct sf_conn *c);
void sf_handoff_expire_all(uint64_t now);

/* linger.c */
unsigned sf_lingering(void);
void sf_linger_poll(uint64_t now);
void sf_linger_after_fork_child(void);
void sf_linger_private_moved(int from, int to);
void sf_linger_at_exit(void);

#endif
