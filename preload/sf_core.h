/* sf_core.h -- the state every part of the preload library shares.
 *
 * The library lives inside unmodified programs (redis, nginx, memcached...). It must never crash
 * them, never block them on the router, and cost an array lookup on the fast path. The pieces:
 *   core.c        configuration, the real_* table resolved once, the per-fd table, private fds, fork
 *   phase.c       where a connection is in its switch: the only writer of c->phase (phase.h)
 *   agent.c       the background thread and its work queue; slim mode's blocking switch
 *   router.c      the agent's channel to the router: requests, claims, statistics, reports
 *   handoff.c     the in-band handoff on the host connection: begin, commit, pump, abort, expiry
 *   linger.c      host sockets of connections closed before the peer's last handoff frame
 *   swap.c        putting the host socket in place of the overlay socket on the same fd number
 *   switchpoint.c an application thread that meets the overlay's FIN while a switch is under way
 *   wrap_sock.c   socket lifecycle wrappers (socket, connect, accept, close, dup, fcntl, ...)
 *   wrap_io.c     data wrappers (read/write/send/recv/sendfile...): counting and redirection
 *   wrap_event.c  epoll/poll/select wrappers
 *   window.c      timing the data calls made while a connection switches (SWITCH_CALLS)
 *   uring.c       noticing io_uring, whose I/O no wrapper sees: such a process switches nothing
 *   fin.c         the overlay FIN of a commit, sent only once the peer holds the SYNC
 * docs/wire.md explains the handoff; docs/design.md its phases and the invariants it keeps.
 *
 * Locks, in the order they may be taken: c->wmu, then c->mu (under c->mu, c->wmu is only tried),
 * then c->tmu, the agent's sf_agent_mu or fin.c's, and last the fd table's. */
#ifndef SF_CORE_H
#define SF_CORE_H

#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "phase.h"
#include "sf_wire.h"

/* musl (the library's second build, for Alpine-based containers) differs from glibc in what the
 * wrappers see: the mmsg calls take unsigned flags, ioctl an int request, and with _GNU_SOURCE
 * its headers make the
 * LFS64 names (sendfile64, fcntl64) macros for the plain ones. Undefined here, those names stay
 * our own wrappers and table entries; musl has no such symbols, so they resolve to NULL and
 * core.c falls back to the plain calls, which are 64-bit there anyway. */
#ifdef __GLIBC__
typedef int sf_mmsg_flags;
typedef unsigned long sf_ioctl_req;
#else
typedef unsigned sf_mmsg_flags;
typedef int sf_ioctl_req;
#include <fcntl.h>
#include <sys/sendfile.h>
#undef sendfile64
#undef fcntl64
#endif

#define SF_EXPORT __attribute__((visibility("default")))
#define SF_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define SF_LIKELY(x) __builtin_expect(!!(x), 1)
#define SF_NOINLINE __attribute__((noinline))

/* The libc functions the wrappers stand in front of, resolved once with dlsym(RTLD_NEXT). */
struct sf_real {
    int (*socket)(int, int, int);
    int (*connect)(int, const struct sockaddr *, socklen_t);
    int (*accept)(int, struct sockaddr *, socklen_t *);
    int (*accept4)(int, struct sockaddr *, socklen_t *, int);
    int (*bind)(int, const struct sockaddr *, socklen_t);
    int (*listen)(int, int);
    int (*close)(int);
    int (*close_range)(unsigned, unsigned, int);
    void (*closefrom)(int);
    int (*shutdown)(int, int);
    int (*setsockopt)(int, int, int, const void *, socklen_t);
    int (*getsockopt)(int, int, int, void *, socklen_t *);
    int (*getsockname)(int, struct sockaddr *, socklen_t *);
    int (*getpeername)(int, struct sockaddr *, socklen_t *);
    int (*dup)(int);
    int (*dup2)(int, int);
    int (*dup3)(int, int, int);
    int (*fcntl)(int, int, ...);
    int (*fcntl64)(int, int, ...);
    int (*ioctl)(int, sf_ioctl_req, ...);
    ssize_t (*read)(int, void *, size_t);
    ssize_t (*write)(int, const void *, size_t);
    ssize_t (*readv)(int, const struct iovec *, int);
    ssize_t (*writev)(int, const struct iovec *, int);
    ssize_t (*recv)(int, void *, size_t, int);
    ssize_t (*send)(int, const void *, size_t, int);
    ssize_t (*recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
    ssize_t (*sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
    ssize_t (*recvmsg)(int, struct msghdr *, int);
    ssize_t (*sendmsg)(int, const struct msghdr *, int);
    int (*recvmmsg)(int, struct mmsghdr *, unsigned, sf_mmsg_flags, struct timespec *);
    int (*sendmmsg)(int, struct mmsghdr *, unsigned, sf_mmsg_flags);
    ssize_t (*sendfile)(int, int, off_t *, size_t);
    ssize_t (*sendfile64)(int, int, off_t *, size_t);
    ssize_t (*splice)(int, off_t *, int, off_t *, size_t, unsigned);
    ssize_t (*read_chk)(int, void *, size_t, size_t);
    ssize_t (*recv_chk)(int, void *, size_t, size_t, int);
    ssize_t (*recvfrom_chk)(int, void *, size_t, size_t, int, struct sockaddr *, socklen_t *);
    int (*epoll_create)(int);
    int (*epoll_create1)(int);
    int (*epoll_ctl)(int, int, int, struct epoll_event *);
    int (*epoll_wait)(int, struct epoll_event *, int, int);
    int (*epoll_pwait)(int, struct epoll_event *, int, int, const sigset_t *);
    int (*epoll_pwait2)(int, struct epoll_event *, int, const struct timespec *, const sigset_t *);
    int (*poll)(struct pollfd *, nfds_t, int);
    int (*poll_chk)(struct pollfd *, nfds_t, int, size_t);
    int (*ppoll)(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *);
    int (*select)(int, fd_set *, fd_set *, fd_set *, struct timeval *);
    int (*pselect)(int, fd_set *, fd_set *, fd_set *, const struct timespec *, const sigset_t *);
    int (*pthread_create)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);
};
extern struct sf_real real;

/* In a single-threaded process, the connection's data call that starts the agent (or the one
 * halfway to its threshold, if lower). The agent thread makes the process multi-threaded, and then the kernel
 * takes a reference on the file in every fd system call and glibc brackets every blocking one
 * for cancellation: a one-request connection (3-4 data calls at each end) never needs the
 * agent, and is spared that. A process that has a thread of its own already pays that, so its
 * agent starts with its first connection, as does the agent of one that makes its second thread
 * once it holds a connection (agent.c pthread_create). A peer's claim comes at the peer's
 * threshold, by when this end has normally made this many calls; the router holds a claim for
 * the claim timeout until this process's channel says HELLO. */
#define SF_AGENT_CALL 8

struct sf_config {
    int mode;                /* enum sf_mode */
    uint32_t threshold;      /* data syscalls before a switch (shuntflow mode) */
    uint32_t agent_call;     /* the data call of a connection that starts the agent; 0: its start */
    char router_path[108];   /* sun_path of the router's socket; empty = no router */
    struct { uint32_t net, mask; } overlay[8]; /* network order */
    int n_overlay;
    int enabled;             /* 0: track nothing at all (no router, no overlay, bad config) */
    int agent_pinned;        /* SHUNTFLOW_AGENT_CPUS given: the agent thread runs there */
    cpu_set_t agent_cpus;
};
extern struct sf_config sf_cfg;

/* What an fd number is to the library. Untracked fds never get past the first check. */
enum sf_kind { SF_NONE = 0, SF_SOCK, SF_CONN, SF_EPOLL, SF_PRIVATE };

struct sf_epreg {
    int epfd;
    uint32_t events;
    uint8_t disarmed;   /* EPOLLONESHOT registration that has fired and was not re-armed */
    epoll_data_t data;
};

/* One per fd number, allocated on first use and reused: a racing thread never sees freed memory.
 * Grouped by the part that writes each field; the others only read them. */
struct sf_conn {
    /* Read by every data call (wrap_io.c), so first. */
    _Atomic int kind;             /* enum sf_kind: core.c, wrap_sock.c, wrap_event.c */
    _Atomic int phase;            /* enum sf_phase: phase.c alone writes it */
    _Atomic uint32_t calls;       /* data syscalls seen (shuntflow threshold) */
    _Atomic uint32_t next_trigger; /* calls at which the next switch attempt starts */
    _Atomic uint32_t gen;         /* bumped when the fd number is closed and reused */
    int fd;
    /* Bytes the fast path moved (wrap_io.c): only in a final phase, HOST or PINNED, so they
     * belong to the path that phase names (sf_host_bytes, sf_overlay_bytes). One writer per
     * direction in practice (the thread reading, the thread writing), so a plain load and store,
     * no locked instruction: two threads calling the same direction at once may lose a count,
     * never a byte. */
    _Atomic uint64_t final_in, final_out;
    /* A socket error a read took from the kernel but could not return with its bytes (a
     * MSG_WAITALL read going on across the switch point, an event wrapper's peek): the kernel
     * reports an error once and a dead socket then reads as EOF, so the next read returns it.
     * Here, beside the phase: the fast path of a read looks at it too. */
    _Atomic int read_err;
    pthread_mutex_t mu;           /* phase changes, host_fd, epoll records, the swap */
    pthread_mutex_t wmu;          /* held across each application write, and by the commit */
    pthread_cond_t cv;            /* phase left the handoff (swapped, aborted, broken) */

    /* phase.c */
    uint64_t phase_since_ms;      /* when the phase last changed (0 after a reset) */
    _Atomic int phase_waiters;    /* threads in sf_phase_wait, woken by every phase change */

    /* The data path (wrap_io.c) and the socket wrappers (wrap_sock.c). */
    _Atomic uint64_t tx, rx;      /* application bytes on the overlay, before a final phase */
    _Atomic uint64_t host_bytes;  /* and on the host connection, before the fast path took over */
    uint8_t via_connect;
    uint8_t connect_reported;     /* slim, non-blocking connect: the next connect() returns 0 */
    uint8_t app_shut_wr;
    uint8_t buf_locked;           /* the app set SO_SNDBUF/SO_RCVBUF: carry them over */
    /* The copied options (swap.c) set through this library on this socket or its listener, and
     * the fork epoch they were seen in (swap.c): another epoch means some may have been set unseen. */
    _Atomic uint16_t opts_set;
    _Atomic uint32_t opts_epoch;

    /* The request (agent.c, router.c). */
    struct sockaddr_in local, remote; /* overlay addresses, network order; valid when have_addrs */
    uint8_t have_addrs;
    uint8_t leader;               /* this end's (ip, port) is the lower one (docs/wire.md) */
    uint8_t attempted;            /* the last trigger was acted on (slim waits on it) */
    uint16_t last_status;         /* why the last attempt failed (enum sf_status) */
    int outstanding;              /* router answers still expected while REQUESTED */
    _Atomic uint64_t decided_us;  /* when this switch was decided (threshold or claim) */
    _Atomic int initiated;        /* 1: this end's threshold decided it; 0: a peer's claim */

    /* The handoff (handoff.c; fin.c its FIN). */
    int host_fd;                  /* the host connection before the swap, -1 otherwise */
    uint8_t hop_len;
    uint8_t hop[16];              /* a handoff frame read in part */
    uint8_t peer_synced;
    uint8_t peer_shut_wr;         /* the peer's SYNC: its application had shut down writing at S */
    uint8_t commit_wanted;        /* the agent wants to commit; the writer holding wmu does it */
    uint8_t writer_parked;        /* the holder of wmu waits for room, in no call on the overlay:
                                   * the agent may commit for it (under c->mu, wrap_io.c) */
    uint8_t commit_finish_due;    /* committed; the rest is done before c->mu is released */
    uint8_t fin_owed;             /* fin.c keeps a copy of the overlay socket for its FIN */
    uint8_t sync_out;             /* this end's SYNC went out: its overlay stream ended at S */
    uint8_t ack_owed;             /* slim: a frame's ACK waits for this end's SYNC to carry it */
    uint8_t slim_waiting;         /* slim: connect() or accept() waits for this switch */
    uint8_t waiter_watches;       /* slim: that thread, not the agent, reads the handoff frames */
    uint8_t early_sync;           /* slim leader: SYNC out before the follower's READY */
    uint8_t fin_due;              /* slim leader: READY in, the commit's FIN not out yet */
    uint64_t early_host_mark;     /* host_bytes when the early SYNC left */
    uint8_t opts_copied;          /* the early socket options are on the host connection */
    uint64_t peer_s;
    uint64_t sync_acked_mark;     /* fin.c: the host bytes acknowledged once our SYNC is */
    /* Readers past the peer's S before the swap (wrap_io.c read_past_s, switchpoint.c): a
     * private number of the host connection of their own, so that no read waits for c->mu,
     * and the number is closed only once no reader can be about to use it. */
    _Atomic int rd_host;          /* -1 until the peer's SYNC is in, and after the swap */
    _Atomic int rd_users;         /* readers between their load of rd_host and their call's end */
    _Atomic int rd_close;         /* a number rd_host named, closed by its last reader */

    /* The swap and what it carries over (swap.c, switchpoint.c). */
    int pending_close_host;       /* a writer held c->wmu when host_fd went: it closes it */
    uint8_t suppressed;           /* an epoll event of this fd was held back during a switch */
    uint32_t listed;              /* phase.c: gen + 1 of this slot's entry in the list of switching
                                   * connections, 0 if none; under that list's lock */
    struct sf_epreg *regs;
    int n_regs, cap_regs;

    /* The switch window (window.c): data calls that begin between the decision to switch and
     * the swap (or the end of the attempt) are timed, for the stall target (docs/performance.md).
     * Its own lock, not c->mu: the agent holds c->mu across handoff steps, and a timed call must
     * not wait for those to learn whether it is timed. */
    pthread_mutex_t tmu;
    uint8_t win_open;
    uint8_t win_report;           /* closed; reported when its last call in flight returns */
    uint32_t win_id;              /* which window a timed call belongs to */
    uint32_t win_inflight;        /* timed calls of window win_id not yet returned */
    uint32_t win_calls;
    uint64_t win_max_us;
    struct sf_msg win_msg;        /* the SWITCH_CALLS frame, status and tuple fixed at the close */
};

/* core.c */
void sf_init(void);
extern _Atomic int sf_ready;
static inline void sf_ensure_init(void) {
    if (SF_UNLIKELY(!atomic_load_explicit(&sf_ready, memory_order_acquire)))
        sf_init();
}
/* Two-level table indexed by fd number: 1024 chunks of 1024 slots covers 1M fds, and a chunk is
 * only allocated once a fd in its range is tracked (core.c). */
#define SF_CHUNK_BITS 10
#define SF_CHUNK (1u << SF_CHUNK_BITS)
#define SF_MAX_FD (SF_CHUNK * SF_CHUNK)
extern struct sf_conn *_Atomic sf_table[SF_CHUNK];
/* Existing slot or NULL, never allocates. Inline: every wrapper starts here. */
static inline struct sf_conn *sf_slot(int fd) {
    if (SF_UNLIKELY((unsigned)fd >= SF_MAX_FD))
        return NULL;
    struct sf_conn *chunk = atomic_load_explicit(&sf_table[(unsigned)fd >> SF_CHUNK_BITS],
                                                 memory_order_acquire);
    return chunk ? &chunk[(unsigned)fd & (SF_CHUNK - 1)] : NULL;
}
struct sf_conn *sf_slot_alloc(int fd);     /* slot for fd, allocated if needed (NULL if no memory) */
void sf_slot_reset(struct sf_conn *c);     /* the fd number was closed */
/* Nothing of an earlier life is left that sf_slot_reset would clear and sf_conn_start does not
 * (SF_NONE is only ever entered by a reset, or from SF_PRIVATE, whose number bumps gen). */
static inline int sf_slot_clean(struct sf_conn *c) {
    return atomic_load_explicit(&c->kind, memory_order_acquire) == SF_NONE && c->n_regs == 0 &&
           !c->buf_locked && !__atomic_load_n(&c->win_open, __ATOMIC_RELAXED);
}
void sf_conn_start(struct sf_conn *c, const struct sockaddr *peer, int via_connect);
int sf_is_overlay_addr(const struct sockaddr *sa);
int sf_private_fd(int fd);                 /* move fd to the private high range (CLOEXEC) */
int sf_private_dup(int fd);                /* a duplicate there, or -1 */
int sf_is_private(int fd);
void sf_private_close(int fd);             /* close one of them */
void sf_private_move(int fd);             /* the app wants this number: move ours away */
uint64_t sf_now_ms(void);
void sf_cv_wait_ms(struct sf_conn *c, long ms); /* caller holds c->mu */
uint64_t sf_now_us(void);
void sf_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
extern int sf_log_on;
#define SF_LOG(...) do { if (SF_UNLIKELY(sf_log_on)) sf_log(__VA_ARGS__); } while (0)
void sf_for_each_conn(void (*fn)(struct sf_conn *, void *), void *arg);
extern _Atomic int sf_oneshot_regs;
extern _Atomic uint64_t sf_last_swap_ms;       /* when this process last swapped a connection */
#define SF_RECENT_SWAP_MS 50

/* A stamp of sf_now_ms() less than SF_RECENT_SWAP_MS before now. A stamp another thread took
 * after this one read now is recent too, not an age wrapped around to "long ago". */
static inline int sf_recent_ms(uint64_t stamp, uint64_t now) {
    return stamp >= now || now - stamp < SF_RECENT_SWAP_MS;
}

static inline int sf_swapped_recently(const struct sf_conn *c, uint64_t now) {
    return atomic_load(&c->phase) == SF_P_HOST && sf_recent_ms(c->phase_since_ms, now);
}

/* The data path's fast path (invariant 7, docs/design.md): the fd is no connection of ours, or
 * one in a final phase where the fd is the socket its bytes go through (HOST: swapped; PINNED:
 * stays on the overlay). Then a data call is the real call and a counter, nothing else: no
 * lock, no locked instruction, no clock read. Returns the connection whose counter to bump, or
 * NULL with *slow set to the connection that needs the full path. */
static inline struct sf_conn *sf_fast_conn(int fd, struct sf_conn **slow) {
    struct sf_conn *c = sf_slot(fd);
    *slow = NULL;
    /* Acquire: a connection new on this number is seen with its first phase (sf_conn_start
     * sets it before the kind), never with the last one of the number's previous life. */
    if (SF_LIKELY(c == NULL) ||
        atomic_load_explicit(&c->kind, memory_order_acquire) != SF_CONN)
        return NULL;
    int phase = atomic_load_explicit(&c->phase, memory_order_relaxed);
    if (SF_LIKELY(phase == SF_P_HOST || phase == SF_P_PINNED))
        return c;
    *slow = c;
    return NULL;
}

static inline void sf_count_final(_Atomic uint64_t *counter, ssize_t n) {
    if (n > 0)
        atomic_store_explicit(counter,
                              atomic_load_explicit(counter, memory_order_relaxed) + (uint64_t)n,
                              memory_order_relaxed);
}

/* Bytes per path so far (CONN_INFO, the close log); the fast path's count goes to the final
 * phase's path. */
static inline uint64_t sf_final_bytes(struct sf_conn *c) {
    return atomic_load_explicit(&c->final_in, memory_order_relaxed) +
           atomic_load_explicit(&c->final_out, memory_order_relaxed);
}
static inline uint64_t sf_overlay_bytes(struct sf_conn *c) {
    uint64_t n = atomic_load(&c->tx) + atomic_load(&c->rx);
    return atomic_load(&c->phase) == SF_P_PINNED ? n + sf_final_bytes(c) : n;
}
static inline uint64_t sf_host_bytes(struct sf_conn *c) {
    uint64_t n = atomic_load(&c->host_bytes);
    return atomic_load(&c->phase) == SF_P_HOST ? n + sf_final_bytes(c) : n;
}

/* glibc's flag: 1 while the process has one thread; pthread_create clears it before the new
 * thread exists and nothing sets it back. musl exports none (then: never sole). */
extern char __libc_single_threaded __attribute__((weak));

/* The calling thread is the process's only one. Then no agent runs (it is a thread), no other
 * thread can hold a connection's lock or be in a call on it, and no switch is under way, nor
 * can one be decided, committed or swapped except by this thread's own calls: a connection's
 * locks guard nothing. Whoever reads it after a call that may start the agent (count_call)
 * reads it again. */
static inline int sf_sole_thread(void) {
    return &__libc_single_threaded != NULL && __libc_single_threaded;
}

/* A counter only this thread writes while it is the sole one: a plain add, not a locked one. */
static inline void sf_count_add(_Atomic uint64_t *counter, uint64_t n, int sole) {
    if (sole)
        atomic_store_explicit(counter, atomic_load_explicit(counter, memory_order_relaxed) + n,
                              memory_order_relaxed);
    else
        atomic_fetch_add_explicit(counter, n, memory_order_relaxed);
}

static inline struct sf_conn *sf_tracked(int fd) {
    struct sf_conn *c = sf_slot(fd);
    if (c == NULL || atomic_load_explicit(&c->kind, memory_order_relaxed) != SF_CONN)
        return NULL;
    return c;
}

/* agent.c */
void sf_agent_ensure(void);                /* start this process's agent thread once */
int sf_agent_running(void);                /* this process's agent runs */
void sf_agent_conn_started(void);          /* a connection began: start the agent now? */
void sf_agent_trigger(struct sf_conn *c);  /* never blocks */
void sf_router_note_conn(struct sf_conn *c); /* a new connection, for the agent's tuple index */
int sf_agent_switch_now(struct sf_conn *c);/* slim mode: trigger and wait; 0 if swapped */
void sf_agent_after_fork_child(void);
void sf_agent_private_moved(int from, int to);
void sf_agent_wake(void);                  /* the agent looks at its work again */
int sf_agent_is_self(void);                /* the calling thread is this process's agent */
int sf_agent_awake_within(uint64_t lag_ms); /* the agent's next round comes that soon */

/* router.c */
void sf_router_report(const struct sf_msg *m); /* queue a frame for the router; never blocks */
void sf_count_switch(int ok);              /* for the router's statistics */
extern _Atomic uint64_t sf_refused_live_until;
/* A claim said NOT_MINE to lately may be accepted: every accept asks, so inline, one load. */
static inline int sf_claims_refused_live(void) {
    return atomic_load_explicit(&sf_refused_live_until, memory_order_relaxed) != 0;
}
int sf_claim_was_refused(const struct sockaddr *peer); /* ...and this accepted peer's was */

/* handoff.c */
void sf_handoff_commit(struct sf_conn *c); /* caller holds c->wmu; then sf_handoff_finish */
void sf_handoff_finish(struct sf_conn *c); /* the rest of a commit (options, FIN), if due */
void sf_handoff_finish_locked(struct sf_conn *c); /* the same, caller holds c->mu */
void sf_handoff_request_commit(struct sf_conn *c); /* commit now if no write is in flight */
void sf_handoff_pump_locked(struct sf_conn *c);    /* caller holds c->mu */
void sf_handoff_catch_up_locked(struct sf_conn *c); /* pump, and commit if due; holds c->mu */
void sf_handoff_settle_ack_locked(struct sf_conn *c); /* an ACK the SYNC did not carry: now */
void sf_handoff_copy_opts_locked(struct sf_conn *c); /* the early socket options, once */

/* linger.c */
void sf_linger_conn_locked(struct sf_conn *c); /* caller holds c->mu */

/* window.c */
/* From the calls counter's trigger value and the phase a data call already loaded: could a
 * switch window be open? Only then is the window looked at, so a connection that is not
 * switching pays no lock and no clock read. The second case is a decision the agent has not
 * picked up yet (count_call set next_trigger to UINT32_MAX, the phase is still OVERLAY). */
static inline int sf_window_maybe_open(int phase, uint32_t trigger) {
    return sf_phase_switching(phase) ||
           (phase == SF_P_OVERLAY && trigger == UINT32_MAX);
}
struct sf_timed {
    uint32_t id;
    uint64_t start_us;
};
void sf_window_open(struct sf_conn *c);              /* a switch was decided (threshold, claim) */
void sf_window_close(struct sf_conn *c, int status); /* caller holds c->mu */
void sf_window_phase(struct sf_conn *c, int old, int phase); /* from sf_set_phase */
int sf_window_enter(struct sf_conn *c, struct sf_timed *t); /* 1: time this call */
void sf_window_leave(struct sf_conn *c, const struct sf_timed *t);
void sf_window_after_fork_child(struct sf_conn *c);

/* fin.c */
uint64_t sf_fin_mark(int host);             /* right after the SYNC is sent */
void sf_fin_after_sync(struct sf_conn *c);     /* the commit's FIN; caller holds c->mu */
int sf_fin_if_acked(struct sf_conn *c);         /* the FIN only if the SYNC is acknowledged */
unsigned sf_fins_owed(void);
void sf_fins_poll(uint64_t now);               /* the agent's tick while some are owed */
void sf_fins_private_moved(int from, int to);
void sf_fins_after_fork_child(void);
void sf_fins_at_exit(void);
void sf_reset_socket(int fd);                  /* a reset to the peer, without a close */

/* uring.c */
int sf_uring_open(void);                   /* the agent's maps fd; -1 at the fd limit */
void sf_uring_close(void);
void sf_uring_after_fork_child(void);
void sf_uring_private_moved(int from, int to);
void sf_uring_refresh(uint64_t now_ms);    /* rescan for a ring if the last look is stale */
int sf_uses_io_uring(void);                /* 1: this process switches nothing any more */
int sf_uring_maybe(uint64_t now_ms);       /* seen, or a scan is due: without reading /proc */

/* swap.c */
int sf_maybe_swap(struct sf_conn *c);      /* swap if the switch point is reached; 1 if HOST */
void sf_try_swap(struct sf_conn *c);       /* the same if c->mu is free, else leave it */
int sf_swap_locked(struct sf_conn *c);     /* caller holds c->mu */
void sf_wmu_unlock(struct sf_conn *c);     /* release c->wmu, closing a deferred host fd */
void sf_close_pending_host(struct sf_conn *c); /* close the host fd left for the wmu holder */
void sf_release_host_fd(struct sf_conn *c, int host); /* host_fd gave it up; caller holds c->mu */
int sf_epreg_record_locked(struct sf_conn *c, int op, int epfd, struct epoll_event *ev);
void sf_epreg_drop_epfd(int epfd);
void sf_epreg_mark_fired(int epfd, const struct epoll_event *evs, int n);
void sf_rearm_locked(struct sf_conn *c);
void sf_copy_sockopts_early(struct sf_conn *c, int from, int to); /* when the host fd arrives */
void sf_copy_sockopts_at_commit(struct sf_conn *c, int from, int to);
void sf_copy_sockopts_at_swap(struct sf_conn *c, int from, int to);
int sf_zerocopy_on(struct sf_conn *c);     /* SO_ZEROCOPY on: it never switches (swap.c) */
unsigned sf_sockopt_bit(int level, int name);  /* the option's bit in opts_set, 0 if not copied */
void sf_sockopts_track(struct sf_conn *c, uint16_t set); /* a new socket: what was set so far */
void sf_sockopts_passed(const struct msghdr *msg); /* sockets sent away by SCM_RIGHTS */
void sf_sockopts_unknown(int fd);          /* fd's options may have changed unseen */
void sf_sockopts_forked(void);             /* every socket's record is stale now */
void sf_sockopts_read_netns(void);         /* the namespace's defaults; at the agent's start */
uint16_t sf_sockopts_inherited(struct sf_conn *listener); /* an accepted socket's start */
/* A change the application makes in `phase` is made on the host connection too. */
int sf_sockopt_mirrored(int level, int name, int phase);

/* wrap_io.c */
void sf_keep_read_err(struct sf_conn *c, int err); /* the next read returns it (c->read_err) */

/* switchpoint.c */
int sf_wait_handoff(struct sf_conn *c, int nonblock); /* see switchpoint.c */
int sf_host_end_before_swap(struct sf_conn *c, int nonblock); /* the same, for a read past S */
/* A BROKEN connection whose stream lost bytes with the host connection: the peer's after its S
 * (its SYNC came), or this end's written since its own S (before the peer's SYNC, the host path
 * carries only those). Its reads end with ECONNRESET rather than the overlay's FIN, and its
 * close resets the overlay rather than end it with a FIN, as over a TCP connection that lost
 * bytes: an application that reacts to the error by closing must not look, to its peer, like
 * one that ended the stream (that peer's own bytes since S are lost too). Otherwise nothing is
 * lost: the overlay's FIN is the peer's real end. */
static inline int sf_broken_lost(struct sf_conn *c) {
    return atomic_load(&c->phase) == SF_P_BROKEN &&
           (__atomic_load_n(&c->peer_synced, __ATOMIC_ACQUIRE) ||
            atomic_load_explicit(&c->host_bytes, memory_order_relaxed) > 0);
}
/* Past the peer's S before the swap: the next bytes are the host connection's. */
static inline int sf_past_peer_s(struct sf_conn *c, int phase) {
    return sf_phase_in_handoff(phase) && __atomic_load_n(&c->peer_synced, __ATOMIC_ACQUIRE) &&
           atomic_load(&c->rx) == c->peer_s &&
           atomic_load_explicit(&c->rd_host, memory_order_relaxed) >= 0;
}
void sf_rd_host_open_locked(struct sf_conn *c);  /* the peer's SYNC is in; caller holds c->mu */
void sf_rd_host_drop(struct sf_conn *c);          /* swapped, broken or closed */
int sf_rd_host_get(struct sf_conn *c);            /* a reader's number, or -1; then _put */
void sf_rd_host_put(struct sf_conn *c);
void sf_rd_host_wake(struct sf_conn *c);          /* after the SYNC: readers waiting for it */
void sf_rd_host_after_fork_child(struct sf_conn *c);
enum { SF_WAIT_SWAPPED = 0, SF_WAIT_EOF, SF_WAIT_AGAIN, SF_WAIT_RESET };
uint32_t sf_settle_ready(struct sf_conn *c, uint32_t events, uint32_t wanted);
uint32_t sf_recheck_ready(struct sf_conn *c, uint32_t events, uint32_t wanted);

#endif
