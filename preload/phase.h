/* phase.h -- where a tracked connection is in its switch, and the only way that changes.
 *
 * Every part of the library asks "where is this connection?" (the data path on every call, the
 * agent at each handoff step, the event wrappers), and one part alone answers by changing it:
 * phase.c. A change within a connection's life goes through sf_set_phase, under c->mu, and must
 * be one of the transitions below (a debug build, make DEBUG=1, aborts on any other); a slot that
 * starts a new life (a new connection on the number, a closed one, a fork child's inherited one)
 * takes its first phase from sf_phase_reset. Both keep sf_in_transition, the count the event
 * wrappers and the agent use to know that any switch is under way, true.
 *
 *                decided            host fd            SYNC sent          switch point
 *   OVERLAY ------------> REQUESTED -------> HANDSHAKE -------> COMMITTED ---------> HOST
 *    |  ^  ^                |   |              |   |  ^             |   |
 *    |  |  +----------------+   |              |   |  +-------------+   |
 *    |  |    abort, retry       |              |   |   the SYNC's send  |
 *    |  +-----------------------|--------------+   |   failed: undone   |
 *    |       abort, retry       |                  |                    |
 *    v                          |                  v                    |
 *   PINNED <--------------------+                BROKEN <---------------+
 *          abort, final                  a follower's SYNC    the host connection died
 *                                        could not be sent    before the peer's SYNC
 *
 *   OVERLAY   -> REQUESTED  the threshold was reached (the router is asked) or a peer's claim
 *                           was accepted
 *   OVERLAY   -> PINNED     not switchable: outside the overlay, dup'd, spliced, io_uring,
 *                           no memory to record an epoll registration
 *   REQUESTED -> HANDSHAKE  the router passed the host connection
 *   REQUESTED -> OVERLAY    refused for now, no answer in time, router channel lost: retried
 *   REQUESTED -> PINNED     refused for good (no route, policy), io_uring
 *   HANDSHAKE -> COMMITTED  S is fixed and the SYNC goes out (set just before the send)
 *   HANDSHAKE -> OVERLAY    the peer's ABORT, no READY in time, the host connection failed
 *   HANDSHAKE -> BROKEN     a follower's SYNC could not be sent: its leader had committed
 *   COMMITTED -> HANDSHAKE  that SYNC's send failed, so nothing was committed after all; the
 *                           same step goes on to OVERLAY or BROKEN
 *   COMMITTED -> HOST       the switch point: every overlay byte read, the peer's SYNC in
 *   COMMITTED -> BROKEN     the host connection died before the peer's SYNC came
 *   PINNED, BROKEN, HOST    final until the fd number is closed
 *
 * Ordered: the data path compares ranges (an OVERLAY or PINNED connection is below REQUESTED). */
#ifndef SF_PHASE_H
#define SF_PHASE_H

#include <stdatomic.h>
#include <stdint.h>

enum sf_phase {
    SF_P_OVERLAY = 0,   /* on the overlay, counting */
    SF_P_PINNED,        /* stays on the overlay for good (dup'd, inherited by fork, not switchable) */
    SF_P_REQUESTED,     /* the router was asked (or a claim accepted), no host fd yet */
    SF_P_HANDSHAKE,     /* holds the host connection, READY/SYNC exchange, nothing committed */
    SF_P_COMMITTED,     /* S fixed, writes go to the host connection, reading the overlay up to S_peer */
    SF_P_BROKEN,        /* committed, then the host connection died before the peer's SYNC */
    SF_P_HOST,          /* swapped: the fd is the host socket */
    SF_P_COUNT
};

struct sf_conn;

/* Connections in REQUESTED, HANDSHAKE, COMMITTED or BROKEN: while it is 0, the event wrappers and
 * the agent's timers have nothing to look at. */
extern _Atomic int sf_in_transition;
/* When sf_in_transition last left 0 (sf_now_us): the event wrappers' bound for a wait that
 * began before any switch was under way (wrap_event.c). */
extern _Atomic uint64_t sf_busy_since_us;

void sf_set_phase(struct sf_conn *c, int phase);   /* a transition above; caller holds c->mu */
/* Sleep until the attempt under way ends (a final phase, or OVERLAY), `ms` at most, if the phase
 * is still `phase`; not holding c->mu. */
void sf_phase_wait(struct sf_conn *c, int phase, long ms);
void sf_phase_reset(struct sf_conn *c, int phase); /* a new life: OVERLAY, PINNED or HOST */
const char *sf_phase_name(int phase);
/* Calls fn for every connection that is in transition or was swapped less than
 * SF_RECENT_SWAP_MS ago (and maybe a few more): the event wrappers' and the agent's walks, which
 * need no other connection, without a look at every slot of the fd table. */
void sf_for_each_switching(void (*fn)(struct sf_conn *, void *), void *arg);
void sf_switching_after_fork_child(void);

/* Counted in sf_in_transition: between the decision to switch and the swap, BROKEN included. */
static inline int sf_phase_in_transition(int phase) {
    return phase >= SF_P_REQUESTED && phase < SF_P_HOST;
}

/* An attempt is under way and may still end in a swap. */
static inline int sf_phase_switching(int phase) {
    return phase >= SF_P_REQUESTED && phase <= SF_P_COMMITTED;
}

/* This end holds the host connection, not yet swapped in: handoff frames may be on it. */
static inline int sf_phase_in_handoff(int phase) {
    return phase == SF_P_HANDSHAKE || phase == SF_P_COMMITTED;
}

/* Nothing moves the connection any more until its fd number is closed. */
static inline int sf_phase_final(int phase) {
    return phase == SF_P_HOST || phase == SF_P_PINNED || phase == SF_P_BROKEN;
}

/* Caller holds c->mu. The peer may have ended its overlay stream, so an overlay EOF now may be
 * the switch point rather than the application's: the peer shuts the overlay only after our
 * READY (we are the follower, it the leader) or our SYNC (we committed), and its SYNC is not in
 * yet. */
int sf_peer_may_have_committed(const struct sf_conn *c);

/* Caller holds c->mu. Committed, the peer's SYNC is in and every overlay byte up to its S has
 * been read: the host socket can take the fd number. */
int sf_at_switch_point(const struct sf_conn *c);

#endif
