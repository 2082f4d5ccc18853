/* handoff.c -- the in-band handoff on a new host connection (docs/wire.md section 3).
 *
 * Once the router has passed this end its host connection, the two libraries exchange 16-byte
 * frames on it before any application byte: the follower's READY, each end's SYNC (S, the bytes
 * its application wrote on the overlay), or the leader's ABORT. This file begins that exchange,
 * reads exactly those frames and never an application byte (pump), commits (fixes S, moves
 * writes to the host connection, ends the overlay stream), and ends an attempt that failed
 * (abort before a commit, BROKEN after one) or took too long (expiry). The swap itself, once
 * the overlay stream is read to the peer's S, is swap.c's.
 *
 * The agent thread runs most of it, but not all: a commit waits for the application's write in
 * flight, so the writer holding c->wmu then commits itself (sf_handoff_commit), and a reader
 * that met the overlay's FIN pumps the frames itself rather than wait for the agent
 * (switchpoint.c). Every step runs under c->mu. */
#include <errno.h>
#include <fcntl.h>
#include <netinet/tcp.h>
#include <string.h>
#include <unistd.h>

#include "agent.h"

#define AG_READY_TIMEOUT_MS 1000

/* Acknowledge the next segment at once, not after the delayed-ACK timer: a peer's overlay FIN
 * waits for the acknowledgement of its SYNC (fin.c). Not sticky: the kernel may go back to
 * delaying ACKs after a few segments, which by then carry application data. */
static void quickack_host(int host) {
    int one = 1;
    real.setsockopt(host, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
}

/* ---- ending an attempt -------------------------------------------------------------------- */

/* Caller holds c->mu. Once committed, application writers use host_fd under c->wmu only, so a
 * writer may be inside write(host_fd) right now (a host connection that fails while committed
 * goes BROKEN from under it): as at the swap, the number is left for whoever next releases
 * c->wmu (sf_release_host_fd). Closing it here instead would let the writer hit EBADF, or write
 * application bytes into whatever connection the number names next. */
static void drop_host_fd(struct sf_conn *c) {
    sf_rd_host_drop(c);
    int host = c->host_fd;
    if (host < 0)
        return;
    sf_agent_unwatch(host);
    __atomic_store_n(&c->host_fd, -1, __ATOMIC_SEQ_CST);
    sf_release_host_fd(c, host);
}

/* Before any commit: the connection simply stays on the overlay. Caller holds c->mu. */
void sf_handoff_abort_locked(struct sf_conn *c, int status, int retry) {
    drop_host_fd(c);
    c->hop_len = 0;
    c->outstanding = 0;
    sf_retry_later_locked(c);
    c->last_status = (uint16_t)status;
    sf_set_phase(c, retry ? SF_P_OVERLAY : SF_P_PINNED);
    sf_rearm_locked(c);
    sf_count_switch(0);
    SF_LOG("fd %d: switch abandoned (status %d), stays on the overlay", c->fd, status);
}

/* After this end's commit, before the peer's SYNC: the bytes written since S went to a host
 * connection the peer will never read. Caller holds c->mu. */
static void break_committed(struct sf_conn *c) {
    drop_host_fd(c);
    sf_set_phase(c, SF_P_BROKEN);
    sf_rearm_locked(c);
}

/* ---- beginning ---------------------------------------------------------------------------- */

/* The agent reads the handoff frames of this connection. Caller holds c->mu. */
void sf_handoff_watch_locked(struct sf_conn *c) {
    c->waiter_watches = 0;
    sf_agent_watch(c->host_fd, SF_HANDOFF_WATCH, sf_handoff_tag(c));
}

static void early_sync_locked(struct sf_conn *c);

/* Caller holds c->mu; the connection is REQUESTED and host_fd is the router's fd, private. */
void sf_handoff_begin_locked(struct sf_conn *c, int host_fd) {
    /* The handoff frames are tiny and each waits for the other's: with Nagle on, a frame
     * behind the router's unacknowledged ANSWER waits for a delayed ACK (40 ms here). The
     * application's own TCP_NODELAY setting is put on the connection at the commit. */
    int one = 1;
    real.setsockopt(host_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->host_fd = host_fd;
    c->hop_len = 0;
    c->peer_synced = 0;
    sf_set_phase(c, SF_P_HANDSHAKE);
    /* A slim connect() or accept() waiting for this switch reads the frames itself (agent.c
     * waiter_pump): the agent reacting to them too would only fight it for c->mu. */
    c->waiter_watches = c->slim_waiting;
    if (!c->waiter_watches)
        sf_handoff_watch_locked(c);
    if (!c->leader) {
        struct sf_hop ready = {.magic = SF_HOP_MAGIC, .type = SF_HOP_READY};
        if (real.send(host_fd, &ready, sizeof ready, MSG_DONTWAIT | MSG_NOSIGNAL) != sizeof ready) {
            sf_handoff_abort_locked(c, SF_PEER_UNREACHABLE, 1);
            return;
        }
        /* The leader's SYNC, which its overlay FIN waits for. Not in slim mode: this end's own
         * SYNC follows it at once and carries the ACK (ack_frame). */
        if (sf_cfg.mode != SF_MODE_SLIM)
            quickack_host(host_fd);
    }
    /* After the READY: the peer's commit waits for that frame, not for these. A leader copies
     * them once it has looked for the follower's READY (sf_handoff_copy_opts_locked), which is
     * often in already (the follower's fd may come first): its commit should not wait for some
     * twenty syscalls. The host connection is not the application's before the swap, and
     * setsockopt mirrors changes onto it meanwhile. A slim leader whose connect() or accept()
     * waits sends its SYNC now, and copies them after it. */
    c->opts_copied = 0;
    if (!c->leader)
        sf_handoff_copy_opts_locked(c);
    else if (sf_cfg.mode == SF_MODE_SLIM && c->slim_waiting)
        early_sync_locked(c);
}

/* Caller holds c->mu. Once per attempt, before the swap (sf_swap_locked at the latest). */
void sf_handoff_copy_opts_locked(struct sf_conn *c) {
    if (c->opts_copied || c->host_fd < 0 || !sf_phase_in_handoff(atomic_load(&c->phase)))
        return;
    c->opts_copied = 1;
    sf_copy_sockopts_early(c, c->fd, c->host_fd);
}

/* ---- the commit --------------------------------------------------------------------------- */

/* Fix S and move writes to the host connection. Caller holds c->wmu (so no write is in flight)
 * and c->mu, and calls sf_handoff_finish_locked after. */
static void commit_locked(struct sf_conn *c) {
    int wanted = c->commit_wanted;
    c->commit_wanted = 0;
    if (!wanted || atomic_load(&c->phase) != SF_P_HANDSHAKE || c->host_fd < 0)
        return;
    int fl = real.fcntl(c->fd, F_GETFL);
    int hfl = real.fcntl(c->host_fd, F_GETFL);
    if (fl >= 0 && hfl >= 0 && (hfl & O_NONBLOCK) != (fl & O_NONBLOCK))
        real.fcntl(c->host_fd, F_SETFL, (hfl & ~O_NONBLOCK) | (fl & O_NONBLOCK));
    struct sf_hop sync = {.magic = SF_HOP_MAGIC, .type = SF_HOP_SYNC,
                          .flags = c->app_shut_wr ? SF_HOP_F_SHUT_WR : 0,
                          .seq = atomic_load(&c->tx)};
    /* COMMITTED before the SYNC leaves: a reader that sees the peer's answering FIN must find
     * this phase (it decides under c->mu, which we hold). */
    sf_set_phase(c, SF_P_COMMITTED);
    if (real.send(c->host_fd, &sync, sizeof sync, MSG_DONTWAIT | MSG_NOSIGNAL) != sizeof sync) {
        sf_set_phase(c, SF_P_HANDSHAKE); /* the SYNC did not leave: nothing is committed */
        /* The leader has not committed anything yet: stay on the overlay. A follower's leader
         * already has, so that connection's tail is lost with the host connection: report it. */
        if (c->leader)
            sf_handoff_abort_locked(c, SF_PEER_UNREACHABLE, 1);
        else
            break_committed(c);
        return;
    }
    /* Taken after the send, not before, so that the SYNC goes out a few system calls earlier. */
    c->sync_acked_mark = sf_fin_mark(c->host_fd);
    c->sync_out = 1;
    c->ack_owed = 0; /* the SYNC carried it */
    if (c->app_shut_wr)
        real.shutdown(c->host_fd, SHUT_WR);
    else
        quickack_host(c->host_fd); /* the peer's SYNC, so its overlay FIN need not wait */
    c->commit_finish_due = 1;
}

/* The rest of a commit need not hold back the application's writes, which go to the host
 * connection once S is fixed and the SYNC is out: whoever commits for a blocked writer releases
 * c->wmu first and does this after, still under c->mu (which keeps c->fd naming the overlay
 * socket and orders it with setsockopt's mirror). In a burst of switches the agent shares its
 * vCPU with busy routers, and every syscall under c->wmu was a chance to be preempted with a
 * writer waiting (1.5 ms seen in kv-redis c20).
 *   - The options held back for the handoff frames (TCP_NODELAY, TCP_CORK, SO_LINGER) take the
 *     application's values; writes in between only miss a cork's batching.
 *   - The early options, if nobody copied them yet, only on the agent: an application thread
 *     that commits leaves their some twenty syscalls to the swap, which the agent nearly always
 *     makes (sf_swap_locked copies them if still due).
 *   - The overlay's FIN right after S, handed to the agent (fin.c). */
void sf_handoff_finish_locked(struct sf_conn *c) {
    if (c->commit_finish_due) {
        c->commit_finish_due = 0;
        if (sf_agent_is_self())
            sf_handoff_copy_opts_locked(c);
        sf_copy_sockopts_at_commit(c, c->fd, c->host_fd);
        sf_router_report_switch_time(c);
        if (!c->early_sync)
            sf_fin_after_sync(c);
    }
}

/* Slim mode, the leader, its connect() or accept() waiting for this switch: its application
 * cannot write before the swap, so its SYNC goes out with the host connection's arrival, not a
 * trip later on the follower's READY, and the follower commits as soon as it holds the
 * connection (docs/wire.md section 3). What the READY still guards is the overlay's FIN, which
 * waits for it: should the host connection end before a READY, the follower never had it (it
 * sends READY before reading a frame, so before it could see the SYNC), and nothing went on the
 * host path, so this end goes back to the overlay (host_failed). Caller holds c->mu. */
static void early_sync_locked(struct sf_conn *c) {
    if (pthread_mutex_trylock(&c->wmu) != 0)
        return; /* another thread of the application writes: READY first, as usual */
    c->commit_wanted = 1;
    c->early_sync = 1;
    c->early_host_mark = atomic_load(&c->host_bytes);
    commit_locked(c);
    sf_wmu_unlock(c);
    if (atomic_load(&c->phase) == SF_P_COMMITTED)
        sf_handoff_finish_locked(c);
    else
        c->early_sync = 0; /* the SYNC did not leave: aborted, on the overlay */
}

/* The host connection ended before the READY of an early SYNC (caller holds c->mu). */
static void undo_early_sync(struct sf_conn *c) {
    c->early_sync = 0;
    if (pthread_mutex_trylock(&c->wmu) == 0) {
        if (atomic_load(&c->host_bytes) == c->early_host_mark) {
            c->sync_out = 0;
            sf_set_phase(c, SF_P_HANDSHAKE);
            sf_handoff_abort_locked(c, SF_PEER_UNREACHABLE, 1);
            sf_wmu_unlock(c);
            return;
        }
        sf_wmu_unlock(c);
    }
    /* The slim wait gave up and the application wrote on the host path meanwhile. */
    break_committed(c);
    sf_count_switch(0);
}

/* Caller holds c->wmu but not c->mu: the commit alone. The writer sends its bytes on the host
 * connection first (a split write's rest: the peer's reader waits for them) and then calls
 * sf_handoff_finish, once it has released c->wmu; so does the swap, should it come between. The
 * caller swaps, if due, once it has released c->wmu: the swap closes the host fd's private
 * number only when no writer holds c->wmu. */
void sf_handoff_commit(struct sf_conn *c) {
    pthread_mutex_lock(&c->mu);
    commit_locked(c);
    pthread_mutex_unlock(&c->mu);
}

void sf_handoff_finish(struct sf_conn *c) {
    pthread_mutex_lock(&c->mu);
    sf_handoff_finish_locked(c);
    pthread_mutex_unlock(&c->mu);
}

/* The agent wants to commit: do it now unless an application write is in flight, in which case
 * the writer does it when its write returns (wrap_io.c checks commit_wanted after unlocking).
 * A writer that holds c->wmu only to wait for room on the overlay (writer_parked, set and
 * cleared under c->mu) is in no call: the commit is made for it, and it sends the rest of its
 * call on the host connection when it wakes. */
void sf_handoff_request_commit(struct sf_conn *c) {
    /* Against the writer's park (wrap_io.c park_writer): each stores its flag, then loads the
     * other's, so one of the two sees the other and makes the commit. */
    __atomic_store_n(&c->commit_wanted, 1, __ATOMIC_SEQ_CST);
    int have_wmu = pthread_mutex_trylock(&c->wmu) == 0;
    if (!have_wmu && !__atomic_load_n(&c->writer_parked, __ATOMIC_SEQ_CST))
        return; /* a write is in flight: its writer commits when it returns */
    pthread_mutex_lock(&c->mu);
    int committed = 0;
    if (have_wmu || c->writer_parked) {
        commit_locked(c);
        committed = c->commit_finish_due;
        if (have_wmu)
            sf_wmu_unlock(c);
        sf_handoff_finish_locked(c);
    }
    pthread_mutex_unlock(&c->mu);
    if (!committed)
        return;
    /* The FIN at once, c->mu released: it is also what wakes the peer's reader when the peer's
     * agent is slow to read the SYNC (then the reader reads it itself). */
    if (sf_agent_is_self() && sf_fins_owed() > 0)
        sf_fins_poll(sf_now_ms());
    sf_maybe_swap(c);
}

/* ---- the frames --------------------------------------------------------------------------- */

static void host_failed(struct sf_conn *c, const char *why) {
    int phase = atomic_load(&c->phase);
    SF_LOG("fd %d: host connection failed in phase %d (%s, %s)", c->fd, phase,
           c->leader ? "leader" : "follower", why);
    if (phase == SF_P_HANDSHAKE) {
        sf_handoff_abort_locked(c, SF_PEER_UNREACHABLE, 1);
    } else if (phase == SF_P_COMMITTED && c->early_sync) {
        undo_early_sync(c);
    } else if (phase == SF_P_COMMITTED && !c->peer_synced) {
        break_committed(c);
        sf_count_switch(0);
    }
}

/* Reads at most one frame's worth from the host connection. Returns 1 if a frame is complete,
 * 0 if not yet, -1 if the connection failed (host_failed has run). */
static int read_hop(struct sf_conn *c, struct sf_hop *out) {
    ssize_t n = real.recv(c->host_fd, c->hop + c->hop_len, sizeof(struct sf_hop) - c->hop_len,
                     MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        host_failed(c, n == 0 ? "EOF" : strerror(errno));
        return -1;
    }
    if (n < 0)
        return 0;
    c->hop_len = (uint8_t)(c->hop_len + n);
    if (c->hop_len < sizeof(struct sf_hop))
        return 0;
    c->hop_len = 0;
    memcpy(out, c->hop, sizeof *out);
    if (out->magic != SF_HOP_MAGIC) {
        host_failed(c, "bad frame");
        return -1;
    }
    return 1;
}

/* ACK a frame now, not after the delayed-ACK timer: the sender's next small write with Nagle on
 * (nginx's corked response once uncorked, with TCP_NODELAY off) is held back until its small,
 * unacknowledged handoff frame is acknowledged, and our application, waiting for that
 * response, sends nothing to carry the ACK. That cost 40 ms per switch.
 * Except for a frame this end answers with its own SYNC at once: the leader's answer to READY,
 * and in slim mode the follower's to the leader's SYNC. The SYNC carries the ACK, where a
 * separate one would be one more packet ahead of it, sent inline through the host path, on the
 * way to the leader's commit (and to slim's connect() and accept()). Owed until then: if the
 * commit does not follow at once after all (a write in flight, after slim's wait gave up),
 * sf_handoff_settle_ack_locked sends it. (A shuntflow follower armed quick ACKs when it sent
 * its READY, so the kernel has acknowledged the leader's SYNC on arrival, for the leader's
 * overlay FIN.) */
static void ack_frame(struct sf_conn *c, const struct sf_hop *hop, int phase) {
    /* The READY after an early SYNC: nobody waits for its ACK, the follower's SYNC right behind
     * it gets one (and carries this one along). */
    if (hop->type == SF_HOP_READY && c->early_sync)
        return;
    if (phase == SF_P_HANDSHAKE &&
        ((hop->type == SF_HOP_READY && c->leader) ||
         (sf_cfg.mode == SF_MODE_SLIM && hop->type == SF_HOP_SYNC && !c->leader)))
        c->ack_owed = 1;
    else
        quickack_host(c->host_fd);
}

/* Caller holds c->mu. */
void sf_handoff_settle_ack_locked(struct sf_conn *c) {
    if (c->ack_owed && c->host_fd >= 0 && atomic_load(&c->phase) == SF_P_HANDSHAKE)
        quickack_host(c->host_fd);
    c->ack_owed = 0;
}

/* Apply the handoff frames already waiting on the host connection, never reading past the
 * peer's SYNC (what follows it is application data). Caller holds c->mu. Both the agent and a
 * reader thread that met the overlay's FIN call this; c->mu keeps frames whole. */
void sf_handoff_pump_locked(struct sf_conn *c) {
    while (c->host_fd >= 0 && !c->peer_synced) {
        int phase = atomic_load(&c->phase);
        struct sf_hop hop;
        if (!sf_phase_in_handoff(phase) || read_hop(c, &hop) != 1)
            return;
        ack_frame(c, &hop, phase);
        if (hop.type == SF_HOP_READY && c->leader && phase == SF_P_COMMITTED && c->early_sync) {
            /* The follower holds the connection: the FIN may go, at once if the SYNC is
             * acknowledged, else with the follower's SYNC, which acknowledges it. */
            c->early_sync = 0;
            c->fin_due = !sf_fin_if_acked(c);
        } else if (hop.type == SF_HOP_READY && c->leader && phase == SF_P_HANDSHAKE) {
            c->commit_wanted = 1;
        } else if (hop.type == SF_HOP_SYNC && !c->early_sync &&
                   (phase == SF_P_COMMITTED || !c->leader)) {
            c->peer_s = hop.seq;
            c->peer_shut_wr = (hop.flags & SF_HOP_F_SHUT_WR) != 0;
            sf_rd_host_open_locked(c);
            __atomic_store_n(&c->peer_synced, 1, __ATOMIC_RELEASE);
            /* Every overlay byte read: the peer's next ones are on the host connection. A
             * reader asleep on the overlay would wait for the peer's FIN or the swap, however
             * late the commit that comes before them: end the overlay's read side now (its
             * stream is complete), which wakes it onto the host connection (wrap_io.c
             * do_read), and event loops with it (sf_settle_ready). */
            if (atomic_load(&c->rx) == c->peer_s && atomic_load(&c->rd_host) >= 0)
                real.shutdown(c->fd, SHUT_RD);
            sf_rd_host_wake(c);
            if (c->fin_due) {
                c->fin_due = 0;
                sf_fin_after_sync(c);
            }
            sf_agent_unwatch(c->host_fd);
            if (phase == SF_P_HANDSHAKE)
                c->commit_wanted = 1;
            pthread_cond_broadcast(&c->cv);
        } else if (hop.type == SF_HOP_ABORT && phase == SF_P_HANDSHAKE) {
            sf_handoff_abort_locked(c, SF_PEER_REFUSED, 1);
        } else {
            SF_LOG("fd %d: unexpected handoff frame %u in phase %d", c->fd, hop.type, phase);
            host_failed(c, "unexpected frame");
        }
    }
}

/* Caller holds c->mu: an application thread met the switch point's signs (the overlay's FIN)
 * before the agent did. Apply the frames waiting, and make the commit they call for unless
 * another thread holds c->wmu (a writer commits when its write returns, the agent when it gets
 * the c->mu its caller holds). */
void sf_handoff_catch_up_locked(struct sf_conn *c) {
    sf_handoff_pump_locked(c);
    if (c->commit_wanted && pthread_mutex_trylock(&c->wmu) == 0) {
        commit_locked(c);
        sf_wmu_unlock(c);
        sf_handoff_finish_locked(c);
    }
    sf_handoff_settle_ack_locked(c);
}

void sf_handoff_on_readable(uint64_t tag) {
    int fd = (int)(uint32_t)tag;
    uint32_t gen = (uint32_t)(tag >> 32);
    struct sf_conn *c = sf_slot(fd);
    if (c == NULL)
        return;
    pthread_mutex_lock(&c->mu);
    if (atomic_load(&c->gen) == gen)
        sf_handoff_pump_locked(c);
    int want_commit = c->commit_wanted;
    pthread_mutex_unlock(&c->mu);
    if (want_commit)
        sf_handoff_request_commit(c);
    if (c->ack_owed) {
        pthread_mutex_lock(&c->mu);
        sf_handoff_settle_ack_locked(c);
        pthread_mutex_unlock(&c->mu);
    }
    if (c->peer_synced)
        sf_maybe_swap(c);
}

/* ---- expiry ------------------------------------------------------------------------------- */

static void expire(struct sf_conn *c, void *arg) {
    uint64_t now = *(uint64_t *)arg;
    if (atomic_load(&c->kind) != SF_CONN)
        return;
    int phase = atomic_load(&c->phase);
    if (phase != SF_P_REQUESTED && phase != SF_P_HANDSHAKE && phase != SF_P_COMMITTED)
        return;
    pthread_mutex_lock(&c->mu);
    phase = atomic_load(&c->phase);
    /* `now` was read before this pass began: a phase set since (by an application thread, on
     * another CPU) can be younger than it, and an unsigned age would wrap to "expired". */
    uint64_t age = now > c->phase_since_ms ? now - c->phase_since_ms : 0;
    if (phase == SF_P_COMMITTED && c->fin_due) {
        /* READY in, but no follower's SYNC to bring the SYNC's ACK along: the FIN waits for
         * the ACK on fin.c's tick. */
        c->fin_due = 0;
        sf_fin_after_sync(c);
    } else if (sf_at_switch_point(c)) {
        sf_swap_locked(c); /* an application thread's sf_try_swap found c->mu taken */
    } else if (phase == SF_P_REQUESTED && age > AG_REQUEST_TIMEOUT_MS) {
        sf_handoff_abort_locked(c, SF_TIMEOUT, 1);
    } else if (phase == SF_P_HANDSHAKE && c->leader && !c->commit_wanted &&
               age > AG_READY_TIMEOUT_MS) {
        /* Only the leader may give up: the follower waits for SYNC or ABORT. */
        struct sf_hop abort_hop = {.magic = SF_HOP_MAGIC, .type = SF_HOP_ABORT};
        (void)!real.send(c->host_fd, &abort_hop, sizeof abort_hop, MSG_DONTWAIT | MSG_NOSIGNAL);
        sf_handoff_abort_locked(c, SF_TIMEOUT, 1);
    }
    int want_commit = c->commit_wanted && atomic_load(&c->phase) == SF_P_HANDSHAKE;
    pthread_mutex_unlock(&c->mu);
    /* A commit asked for while some holder of c->wmu was busy: try again. */
    if (want_commit)
        sf_handoff_request_commit(c);
}

/* The agent's tick while any connection is in transition. */
void sf_handoff_expire_all(uint64_t now) {
    sf_for_each_switching(expire, &now);
}
