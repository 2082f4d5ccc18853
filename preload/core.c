/* core.c -- configuration, the real_* table, the per-fd state table, private fds, logging, fork.
 *
 * Everything here runs inside the host program, so it must not allocate on the fast path, must
 * survive being called before the constructor (another library's constructor may open sockets),
 * and must stay silent unless SHUNTFLOW_LOG asks. */
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "sf_core.h"

struct sf_real real;
struct sf_config sf_cfg;
_Atomic int sf_ready;
int sf_log_on;
_Atomic int sf_oneshot_regs;
_Atomic uint64_t sf_last_swap_ms;

static int log_fd = -1;
static int private_base;
static pthread_mutex_t init_mu = PTHREAD_MUTEX_INITIALIZER;

struct sf_conn *_Atomic sf_table[SF_CHUNK];
static pthread_mutex_t table_mu = PTHREAD_MUTEX_INITIALIZER;

static void *resolve(const char *name) {
    return dlsym(RTLD_NEXT, name);
}

static void resolve_real(void) {
#define R(field, sym) real.field = resolve(sym)
    R(socket, "socket"); R(connect, "connect"); R(accept, "accept"); R(accept4, "accept4");
    R(bind, "bind"); R(listen, "listen"); R(close, "close"); R(close_range, "close_range");
    R(closefrom, "closefrom"); R(shutdown, "shutdown"); R(setsockopt, "setsockopt");
    R(getsockopt, "getsockopt"); R(getsockname, "getsockname"); R(getpeername, "getpeername");
    R(dup, "dup"); R(dup2, "dup2"); R(dup3, "dup3"); R(fcntl, "fcntl"); R(fcntl64, "fcntl64");
    R(ioctl, "ioctl"); R(read, "read"); R(write, "write"); R(readv, "readv"); R(writev, "writev");
    R(recv, "recv"); R(send, "send"); R(recvfrom, "recvfrom"); R(sendto, "sendto");
    R(recvmsg, "recvmsg"); R(sendmsg, "sendmsg"); R(recvmmsg, "recvmmsg"); R(sendmmsg, "sendmmsg");
    R(sendfile, "sendfile"); R(sendfile64, "sendfile64"); R(splice, "splice");
    R(read_chk, "__read_chk"); R(recv_chk, "__recv_chk"); R(recvfrom_chk, "__recvfrom_chk");
    R(epoll_create, "epoll_create"); R(epoll_create1, "epoll_create1"); R(epoll_ctl, "epoll_ctl");
    R(epoll_wait, "epoll_wait"); R(epoll_pwait, "epoll_pwait"); R(epoll_pwait2, "epoll_pwait2");
    R(poll, "poll"); R(poll_chk, "__poll_chk"); R(ppoll, "ppoll"); R(select, "select");
    R(pselect, "pselect"); R(pthread_create, "pthread_create");
#undef R
    if (real.fcntl64 == NULL)
        real.fcntl64 = real.fcntl;
    if (real.sendfile64 == NULL)
        real.sendfile64 = real.sendfile;
}

uint64_t sf_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Caller holds c->mu; returns with it held, after a broadcast of c->cv or `ms` at most. */
void sf_cv_wait_ms(struct sf_conn *c, long ms) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts); /* the condvar's default clock */
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000)
        ts.tv_sec++, ts.tv_nsec -= 1000000000;
    pthread_cond_timedwait(&c->cv, &c->mu, &ts);
}

uint64_t sf_now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

void sf_log(const char *fmt, ...) {
    char buf[512];
    int saved = errno;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int n = snprintf(buf, sizeof buf, "%lld.%06ld shuntflow[%d]: ", (long long)ts.tv_sec,
                     ts.tv_nsec / 1000, (int)getpid());
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    if (log_fd >= 0 && real.write != NULL)
        (void)!real.write(log_fd, buf, (size_t)n);
    errno = saved;
}

static int parse_cidr(const char *text, uint32_t *net, uint32_t *mask) {
    char addr[32];
    const char *slash = strchr(text, '/');
    size_t len = slash ? (size_t)(slash - text) : strlen(text);
    if (len == 0 || len >= sizeof addr)
        return -1;
    memcpy(addr, text, len);
    addr[len] = 0;
    struct in_addr in;
    if (inet_pton(AF_INET, addr, &in) != 1)
        return -1;
    long bits = 32;
    if (slash) {
        char *end;
        bits = strtol(slash + 1, &end, 10);
        if (end == slash + 1 || *end != 0 || bits < 0 || bits > 32)
            return -1;
    }
    uint32_t m = bits == 0 ? 0 : htonl(~0u << (32 - bits));
    *mask = m;
    *net = in.s_addr & m;
    return 0;
}

static void open_log(void) {
    const char *where = getenv("SHUNTFLOW_LOG");
    if (where == NULL || *where == 0 || strcmp(where, "0") == 0)
        return;
    int fd = (strcmp(where, "stderr") == 0 || strcmp(where, "1") == 0)
                 ? real.fcntl(2, F_DUPFD_CLOEXEC, 0)
                 : open(where, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) {
        log_fd = sf_private_fd(fd);
        sf_log_on = 1;
    }
}

/* "0", "0,2", "0-3,6" (as taskset -c takes them); 0 if the text is not such a list. */
static int parse_cpu_list(const char *text, cpu_set_t *set) {
    CPU_ZERO(set);
    const char *p = text;
    while (*p) {
        char *end;
        long lo = strtol(p, &end, 10), hi = lo;
        if (end == p || lo < 0 || lo >= CPU_SETSIZE)
            return 0;
        p = end;
        if (*p == '-') {
            hi = strtol(p + 1, &end, 10);
            if (end == p + 1 || hi < lo || hi >= CPU_SETSIZE)
                return 0;
            p = end;
        }
        for (long cpu = lo; cpu <= hi; cpu++)
            CPU_SET((int)cpu, set);
        if (*p == ',')
            p++;
        else if (*p)
            return 0;
    }
    return CPU_COUNT(set) > 0;
}

/* The retry after a failed attempt comes at twice the calls made (agent.c), which must not wrap
 * the 32-bit count. src/shuntflow/native.py's MAX_THRESHOLD says the same to the CLI. */
#define THRESHOLD_MAX 1000000000L

static void read_config(void) {
    const char *mode = getenv("SHUNTFLOW_MODE");
    sf_cfg.mode = SF_MODE_SHUNTFLOW;
    if (mode != NULL && *mode) {
        if (strcmp(mode, "overlay") == 0)
            sf_cfg.mode = SF_MODE_OVERLAY;
        else if (strcmp(mode, "slim") == 0)
            sf_cfg.mode = SF_MODE_SLIM;
        else if (strcmp(mode, "shuntflow") != 0)
            SF_LOG("SHUNTFLOW_MODE=%s is not overlay|slim|shuntflow; using shuntflow", mode);
    }
    sf_cfg.threshold = 64;
    const char *th = getenv("SHUNTFLOW_THRESHOLD");
    if (th != NULL && *th) {
        char *end;
        long v = strtol(th, &end, 10);
        if (*end != 0 || v < 1 || v > THRESHOLD_MAX)
            SF_LOG("SHUNTFLOW_THRESHOLD=%s is not a whole number from 1 to %ld; using %u", th,
                   THRESHOLD_MAX, sf_cfg.threshold);
        else
            sf_cfg.threshold = (uint32_t)v;
    }
    const char *cpus = getenv("SHUNTFLOW_AGENT_CPUS");
    if (cpus != NULL && *cpus) {
        sf_cfg.agent_pinned = parse_cpu_list(cpus, &sf_cfg.agent_cpus);
        if (!sf_cfg.agent_pinned)
            SF_LOG("SHUNTFLOW_AGENT_CPUS=%s is not a CPU list like 0 or 0,2-3; ignored", cpus);
    }
    const char *router = getenv("SHUNTFLOW_ROUTER");
    if (router != NULL && strlen(router) < sizeof sf_cfg.router_path)
        strcpy(sf_cfg.router_path, router);
    else if (router != NULL)
        SF_LOG("SHUNTFLOW_ROUTER path is too long for a Unix socket; no switching");
    const char *overlay = getenv("SHUNTFLOW_OVERLAY");
    if (overlay != NULL) {
        char list[256];
        snprintf(list, sizeof list, "%s", overlay);
        char *save = NULL;
        for (char *tok = strtok_r(list, ", ", &save); tok && sf_cfg.n_overlay < 8;
             tok = strtok_r(NULL, ", ", &save)) {
            if (parse_cidr(tok, &sf_cfg.overlay[sf_cfg.n_overlay].net,
                           &sf_cfg.overlay[sf_cfg.n_overlay].mask) == 0)
                sf_cfg.n_overlay++;
            else
                SF_LOG("SHUNTFLOW_OVERLAY entry '%s' is not an IPv4 CIDR; ignored", tok);
        }
    }
    sf_cfg.enabled = sf_cfg.n_overlay > 0;
    if (sf_cfg.mode != SF_MODE_OVERLAY && sf_cfg.router_path[0] == 0) {
        SF_LOG("SHUNTFLOW_ROUTER is not set: connections stay on the overlay");
        sf_cfg.mode = SF_MODE_OVERLAY;
    }
    if (!sf_cfg.enabled)
        SF_LOG("SHUNTFLOW_OVERLAY names no network: the library only passes calls through");
    /* Shuntflow mode starts the agent at a connection's SF_AGENT_CALL-th data call, or halfway
     * to its threshold if that comes first: a process whose connections never get that far (one
     * request each) stays single-threaded (agent.c). Never at the threshold itself: the start
     * (a thread, its fds) would lengthen the call that begins the switch, and the switch would
     * wait for the channel. A threshold of 1 starts it with the connection, as slim mode's
     * connect()/accept() does. */
    if (sf_cfg.mode == SF_MODE_SHUNTFLOW)
        sf_cfg.agent_call = sf_cfg.threshold <= 1               ? 0
                            : sf_cfg.threshold / 2 < SF_AGENT_CALL ? sf_cfg.threshold / 2
                                                                   : SF_AGENT_CALL;
}

static void set_private_base(void) {
    struct rlimit rl;
    rlim_t cur = 1024;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
        cur = rl.rlim_cur;
    if (cur > SF_MAX_FD)
        cur = SF_MAX_FD;
    /* Our fds sit at the top of the app's range so select() users never see their own fds
     * pushed past 1024 by us; 128 leaves room for the agent's in-flight host connections. */
    private_base = cur > 256 ? (int)cur - 128 : (int)cur / 2;
}

/* Only the forking thread survives in the child, so any lock another thread held is gone for
 * good: re-create every lock. Inherited connections stay on the overlay in the child (the parent
 * owns their switch); connections the parent already switched stay switched. */
static void atfork_child(void) {
    pthread_mutex_init(&table_mu, NULL);
    for (unsigned hi = 0; hi < SF_CHUNK; hi++) {
        struct sf_conn *chunk = atomic_load(&sf_table[hi]);
        if (chunk == NULL)
            continue;
        for (unsigned i = 0; i < SF_CHUNK; i++) {
            struct sf_conn *c = &chunk[i];
            pthread_mutex_init(&c->mu, NULL);
            pthread_mutex_init(&c->wmu, NULL);
            pthread_cond_init(&c->cv, NULL);
            sf_window_after_fork_child(c);
            if (atomic_load(&c->kind) != SF_CONN)
                continue;
            if (c->host_fd >= 0) {
                sf_private_close(c->host_fd);
                c->host_fd = -1;
            }
            sf_rd_host_after_fork_child(c);
            if (atomic_load(&c->phase) != SF_P_HOST)
                sf_phase_reset(c, SF_P_PINNED);
        }
    }
    sf_switching_after_fork_child();
    sf_agent_after_fork_child();
}

void sf_init(void) {
    pthread_mutex_lock(&init_mu);
    if (!atomic_load(&sf_ready)) {
        resolve_real();
        set_private_base();
        open_log();
        read_config();
        pthread_atfork(sf_sockopts_forked, NULL, atfork_child);
        atomic_store_explicit(&sf_ready, 1, memory_order_release);
        SF_LOG("loaded: mode=%d threshold=%u router=%s overlays=%d", sf_cfg.mode,
               sf_cfg.threshold, sf_cfg.router_path, sf_cfg.n_overlay);
    }
    pthread_mutex_unlock(&init_mu);
}

__attribute__((constructor(101))) static void sf_constructor(void) {
    sf_init();
}

struct sf_conn *sf_slot_alloc(int fd) {
    if ((unsigned)fd >= SF_MAX_FD)
        return NULL;
    unsigned hi = (unsigned)fd >> SF_CHUNK_BITS;
    struct sf_conn *chunk = atomic_load_explicit(&sf_table[hi], memory_order_acquire);
    if (chunk == NULL) {
        pthread_mutex_lock(&table_mu);
        chunk = atomic_load(&sf_table[hi]);
        if (chunk == NULL) {
            chunk = calloc(SF_CHUNK, sizeof *chunk);
            if (chunk != NULL) {
                for (unsigned i = 0; i < SF_CHUNK; i++) {
                    pthread_mutex_init(&chunk[i].mu, NULL);
                    pthread_mutex_init(&chunk[i].wmu, NULL);
                    pthread_cond_init(&chunk[i].cv, NULL);
                    pthread_mutex_init(&chunk[i].tmu, NULL);
                    chunk[i].fd = (int)((hi << SF_CHUNK_BITS) | i);
                    chunk[i].host_fd = -1;
                    chunk[i].pending_close_host = -1;
                    chunk[i].rd_host = -1;
                    chunk[i].rd_close = -1;
                }
                atomic_store_explicit(&sf_table[hi], chunk, memory_order_release);
            }
        }
        pthread_mutex_unlock(&table_mu);
    }
    return chunk ? &chunk[(unsigned)fd & (SF_CHUNK - 1)] : NULL;
}

void sf_for_each_conn(void (*fn)(struct sf_conn *, void *), void *arg) {
    for (unsigned hi = 0; hi < SF_CHUNK; hi++) {
        struct sf_conn *chunk = atomic_load_explicit(&sf_table[hi], memory_order_acquire);
        if (chunk == NULL)
            continue;
        for (unsigned i = 0; i < SF_CHUNK; i++)
            if (atomic_load_explicit(&chunk[i].kind, memory_order_relaxed) != SF_NONE)
                fn(&chunk[i], arg);
    }
}

/* Caller holds c->mu, or the slot is not yet visible to anyone. Relaxed: whoever reads these
 * either holds c->mu too, or first loads c->kind with acquire, which the caller stores after
 * them with release (or under c->mu); a sequentially consistent store is a locked exchange on
 * x86, and these ran three times per connection. */
static void reset_counters(struct sf_conn *c, int phase) {
    sf_phase_reset(c, phase);
    atomic_store_explicit(&c->calls, 0, memory_order_relaxed);
    atomic_store_explicit(&c->tx, 0, memory_order_relaxed);
    atomic_store_explicit(&c->rx, 0, memory_order_relaxed);
    atomic_store_explicit(&c->host_bytes, 0, memory_order_relaxed);
    atomic_store_explicit(&c->read_err, 0, memory_order_relaxed);
    atomic_store_explicit(&c->final_in, 0, memory_order_relaxed);
    atomic_store_explicit(&c->final_out, 0, memory_order_relaxed);
    atomic_store_explicit(&c->next_trigger, 0, memory_order_relaxed);
    c->have_addrs = c->leader = c->via_connect = c->connect_reported = 0;
    c->app_shut_wr = c->commit_wanted = c->commit_finish_due = c->hop_len = 0;
    c->writer_parked = 0;
    c->peer_synced = c->peer_shut_wr = 0;
    c->attempted = 0;
    c->fin_owed = c->sync_out = c->ack_owed = 0;
    c->slim_waiting = c->waiter_watches = c->early_sync = c->fin_due = 0;
    c->early_host_mark = 0;
    c->suppressed = 0;
    c->outstanding = 0;
    c->peer_s = 0;
}

/* The fd number was closed (or is about to name a new socket). Caller holds c->mu, or the slot
 * is not yet visible to anyone. */
void sf_slot_reset(struct sf_conn *c) {
    /* Closed mid-switch: the window ends with the connection (reported while the addresses
     * are still known). */
    sf_window_close(c, SF_INTERNAL);
    reset_counters(c, SF_P_OVERLAY);
    for (int i = 0; i < c->n_regs; i++)
        if (c->regs[i].events & EPOLLONESHOT)
            atomic_fetch_sub(&sf_oneshot_regs, 1);
    c->n_regs = 0;
    c->buf_locked = 0;
    atomic_store_explicit(&c->opts_epoch, 0, memory_order_relaxed); /* nothing known */
    if (sf_sole_thread()) {
        /* No reader of either without c->mu but this thread: plain stores, not locked ones. */
        atomic_store_explicit(&c->kind, SF_NONE, memory_order_release);
        atomic_store_explicit(&c->gen, atomic_load_explicit(&c->gen, memory_order_relaxed) + 1,
                              memory_order_relaxed);
    } else {
        atomic_store(&c->kind, SF_NONE);
        atomic_fetch_add(&c->gen, 1);
    }
}

int sf_is_overlay_addr(const struct sockaddr *sa) {
    if (sa == NULL || sa->sa_family != AF_INET)
        return 0;
    uint32_t ip = ((const struct sockaddr_in *)sa)->sin_addr.s_addr;
    for (int i = 0; i < sf_cfg.n_overlay; i++)
        if ((ip & sf_cfg.overlay[i].mask) == sf_cfg.overlay[i].net)
            return 1;
    return 0;
}

/* fd c->fd now carries an overlay connection: start counting. Epoll registrations made while it
 * was an unconnected socket are kept. peer may be NULL (then it is learned lazily). */
void sf_conn_start(struct sf_conn *c, const struct sockaddr *peer, int via_connect) {
    /* The process's only thread: nobody else can hold c->mu, nor walk the table. */
    int sole = sf_sole_thread();
    if (!sole)
        pthread_mutex_lock(&c->mu);
    reset_counters(c, sf_cfg.mode == SF_MODE_OVERLAY ? SF_P_PINNED : SF_P_OVERLAY);
    c->via_connect = (uint8_t)via_connect;
    atomic_store_explicit(&c->next_trigger, sf_cfg.threshold, memory_order_relaxed);
    if (peer != NULL && peer->sa_family == AF_INET)
        memcpy(&c->remote, peer, sizeof c->remote);
    /* Sequentially consistent, as the agent's start and its walk of the table are: a connection
     * that finds no agent running here is not queued for the agent's index, and the index of an
     * agent that starts after it is incomplete, so its walk of the table at its start meets this
     * kind (agent.c sf_agent_ensure). An agent this thread starts later sees it anyway. */
    if (sole) {
        atomic_store_explicit(&c->kind, SF_CONN, memory_order_release);
    } else {
        atomic_store(&c->kind, SF_CONN);
        pthread_mutex_unlock(&c->mu);
    }
    if (sf_cfg.mode == SF_MODE_OVERLAY)
        return;
    if (sf_agent_running())
        sf_router_note_conn(c);
    else
        sf_agent_conn_started();
}

int sf_private_fd(int fd) {
    if (fd < 0)
        return fd;
    int moved = real.fcntl(fd, F_DUPFD_CLOEXEC, private_base);
    if (moved < 0) {
        /* The high range is full: keep the low fd rather than failing; CLOEXEC all the same. */
        real.fcntl(fd, F_SETFD, FD_CLOEXEC);
        moved = fd;
    } else {
        real.close(fd);
    }
    struct sf_conn *c = sf_slot_alloc(moved);
    if (c != NULL) {
        /* A connection closed behind the library's back (a raw close) may have held this number:
         * its queued work must not match whatever the number names after us. */
        atomic_fetch_add(&c->gen, 1);
        atomic_store(&c->kind, SF_PRIVATE);
    }
    return moved;
}

/* A private duplicate of fd, made in the high range at once: a dup() would take the lowest free
 * number for a moment, which an application at its fd limit may be about to need. -1 if the
 * high range has no room. */
int sf_private_dup(int fd) {
    int d = real.fcntl(fd, F_DUPFD_CLOEXEC, private_base);
    if (d < 0)
        return -1;
    struct sf_conn *c = sf_slot_alloc(d);
    if (c != NULL) {
        atomic_fetch_add(&c->gen, 1);
        atomic_store(&c->kind, SF_PRIVATE);
    }
    return d;
}

int sf_is_private(int fd) {
    struct sf_conn *c = sf_slot(fd);
    return c != NULL && atomic_load_explicit(&c->kind, memory_order_relaxed) == SF_PRIVATE;
}

static void private_forget(int fd) {
    struct sf_conn *c = sf_slot(fd);
    if (c != NULL && atomic_load(&c->kind) == SF_PRIVATE)
        atomic_store(&c->kind, SF_NONE);
}

/* Forgotten first: once closed, the number may at once be another thread's private dup, whose
 * mark a late forget would wipe out. */
void sf_private_close(int fd) {
    private_forget(fd);
    real.close(fd);
}

/* The application asked for fd number `fd`, which holds one of ours (dup2 onto it): give ours a
 * new number first, and tell whoever holds it. */
void sf_private_move(int fd) {
    int moved = real.fcntl(fd, F_DUPFD_CLOEXEC, private_base);
    if (moved < 0)
        return;
    struct sf_conn *c = sf_slot_alloc(moved);
    if (c != NULL) {
        atomic_fetch_add(&c->gen, 1);
        atomic_store(&c->kind, SF_PRIVATE);
    }
    if (log_fd == fd)
        log_fd = moved;
    sf_agent_private_moved(fd, moved);
    private_forget(fd);
}
