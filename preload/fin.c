/* fin.c -- the overlay FIN of a commit, sent only once the peer holds the SYNC.
 *
 * A commit ends this end's overlay stream with a FIN, which the peer reads as the switch point:
 * it then looks on the host connection for this end's SYNC, which says where the overlay
 * stream ended (S) and that the rest follows there. Were the FIN to arrive while the SYNC is
 * lost (the host connection reset with the SYNC in flight), the peer would find no SYNC and
 * could only take the FIN for the end of the stream, whose tail went down with the host
 * connection: a silently shortened stream. So the FIN waits for the peer's kernel to
 * acknowledge the SYNC. An acknowledged SYNC sits in the peer's socket and stays readable even
 * after the connection is reset; a FIN with no SYNC to be found is then always the peer
 * application's own. If the host connection dies before the acknowledgement, the overlay gets a
 * reset instead of the FIN: this end's stream was cut, and the peer reads just that.
 *
 * The FIN itself is the agent's: the commit hands it private copies of both sockets, and the
 * agent sends the FIN once it released c->mu (its own commit) or in its next round (woken for
 * it when the commit was an application thread's), or, while the SYNC is not acknowledged yet,
 * settles them on a 1 ms tick. Sent inline, the shutdown ran the whole overlay path, the
 * peer's side included (27-110 µs on the test VM), inside the committing application call, or
 * under c->mu on the agent, where the application's threads met it. The peer's readers do not
 * depend on it alone: the SYNC's arrival ends their overlay reads too (handoff.c
 * sf_handoff_pump_locked). The acknowledgement is usually in by the time the SYNC's send
 * returns (the peer quick-ACKs handoff frames, and on one machine the whole path runs inside the
 * send). */
#include <errno.h>
#include <linux/sockios.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "sf_core.h"

#define FIN_MAX 256
#define FIN_WAIT_MS 30000

/* The kernel's struct tcp_info reaches further than glibc's copy of it: tcpi_bytes_acked
 * (Linux 4.1) is the 64-bit field at byte 120, tcpi_state the first byte. */
#define TCPI_BYTES_ACKED_AT 120

struct owed_fin {
    int overlay, host;   /* private copies of the two sockets */
    uint64_t acked_mark; /* the host connection's bytes_acked once the SYNC is acknowledged
                          * (0: it was when the FIN was handed over) */
    uint64_t since_us, until_ms;
};

static struct {
    pthread_mutex_t mu;
    struct owed_fin owed[FIN_MAX];
    _Atomic unsigned n;
} fins = {.mu = PTHREAD_MUTEX_INITIALIZER};

static int host_acked(int host, uint64_t *acked, uint8_t *state) {
    unsigned char ti[256];
    socklen_t len = sizeof ti;
    if (real.getsockopt(host, IPPROTO_TCP, TCP_INFO, ti, &len) != 0 ||
        len < TCPI_BYTES_ACKED_AT + sizeof *acked)
        return -1;
    memcpy(acked, ti + TCPI_BYTES_ACKED_AT, sizeof *acked);
    *state = ti[0];
    return 0;
}

/* Called right after the SYNC went out on `host` (no other writer: the caller holds c->wmu): the
 * count of bytes acknowledged once everything sent so far, the SYNC last, is. That is the bytes
 * acknowledged plus those not yet (SIOCOUTQ), which must be read as of one moment: an ACK
 * between the two reads counts its bytes twice, and the SYNC's own ACK, which the peer sends at
 * once, often lands there. Such a mark waits for bytes that never come once both ends have
 * closed their side, and the closed connection then reads as dead (settle), for a reset that
 * throws away what the overlay still held for this end. So the acknowledged count is read on
 * both sides of SIOCOUTQ until it is the same. 0: unknown (the FIN then goes out at once, as it
 * did before this file). */
uint64_t sf_fin_mark(int host) {
    for (int tries = 0; tries < 4; tries++) {
        uint64_t before, after;
        uint8_t state;
        int outq;
        if (host_acked(host, &before, &state) != 0 || real.ioctl(host, SIOCOUTQ, &outq) != 0 ||
            outq < 0 || host_acked(host, &after, &state) != 0)
            return 0;
        if (before == after)
            return after + (uint64_t)outq;
    }
    return 0;
}

static int sync_acked(int host, uint64_t mark) {
    uint64_t acked;
    uint8_t state;
    return host_acked(host, &acked, &state) == 0 && acked >= mark;
}

/* connect(AF_UNSPEC) disconnects a TCP socket with a reset to the peer, and needs no close. It
 * resets the socket itself, whatever other numbers (fin.c's copy) still name it. */
void sf_reset_socket(int fd) {
    struct sockaddr unspec = {.sa_family = AF_UNSPEC};
    real.connect(fd, &unspec, sizeof unspec);
}

static int owe(int overlay, int host, uint64_t mark) {
    int ov = sf_private_dup(overlay);
    int h = sf_private_dup(host);
    int kept = -1;
    pthread_mutex_lock(&fins.mu);
    if (ov >= 0 && h >= 0 && fins.n < FIN_MAX) {
        fins.owed[fins.n] = (struct owed_fin){ov, h, mark, sf_now_us(), sf_now_ms() + FIN_WAIT_MS};
        atomic_fetch_add(&fins.n, 1);
        kept = 0;
    }
    pthread_mutex_unlock(&fins.mu);
    if (kept != 0) {
        int fds[2] = {ov, h};
        for (int i = 0; i < 2; i++)
            if (fds[i] >= 0)
                sf_private_close(fds[i]);
    }
    return kept;
}

/* The commit's FIN. Caller holds c->mu; c->fd still names the overlay socket. */
void sf_fin_after_sync(struct sf_conn *c) {
    uint64_t mark = c->sync_acked_mark;
    int acked = mark == 0 || sync_acked(c->host_fd, mark);
    if (owe(c->fd, c->host_fd, acked ? 0 : mark) == 0) {
        c->fin_owed = 1;
        if (!acked)
            SF_LOG("fd %d: overlay FIN waits for the peer to acknowledge the SYNC", c->fd);
        if (!sf_agent_is_self())
            sf_agent_wake();
        return;
    }
    /* No fd or no room to keep it: the FIN goes now, unacknowledged SYNC or not, as it did
     * before this file. */
    real.shutdown(c->fd, SHUT_WR);
}

/* A slim leader's FIN once the READY is in, if that costs no wait: 1 if it went out. */
int sf_fin_if_acked(struct sf_conn *c) {
    if (c->sync_acked_mark != 0 && !sync_acked(c->host_fd, c->sync_acked_mark))
        return 0;
    real.shutdown(c->fd, SHUT_WR);
    return 1;
}

unsigned sf_fins_owed(void) {
    return atomic_load(&fins.n);
}

/* 1 once the FIN or the reset is out. */
static int settle(struct owed_fin *f, uint64_t now) {
    uint64_t acked;
    uint8_t state;
    int known = host_acked(f->host, &acked, &state) == 0;
    if (f->acked_mark == 0 || (known && acked >= f->acked_mark)) {
        real.shutdown(f->overlay, SHUT_WR);
        SF_LOG("overlay fd %d: FIN after the SYNC's acknowledgement, %llu us late", f->overlay,
               (unsigned long long)(sf_now_us() - f->since_us));
        return 1;
    }
    if (known && state != TCP_CLOSE && now <= f->until_ms)
        return 0;
    SF_LOG("overlay fd %d: reset; the host connection %s before the peer had this end's SYNC",
           f->overlay, known && state != TCP_CLOSE ? "stalled" : "died");
    sf_reset_socket(f->overlay);
    return 1;
}

static void forget(unsigned i) {
    struct owed_fin *f = &fins.owed[i];
    int fds[2] = {f->overlay, f->host};
    for (int k = 0; k < 2; k++)
        sf_private_close(fds[k]);
    *f = fins.owed[atomic_load(&fins.n) - 1];
    atomic_fetch_sub(&fins.n, 1);
}

/* The agent, every tick while some are owed. */
void sf_fins_poll(uint64_t now) {
    pthread_mutex_lock(&fins.mu);
    for (unsigned i = 0; i < atomic_load(&fins.n);) {
        if (settle(&fins.owed[i], now))
            forget(i);
        else
            i++;
    }
    pthread_mutex_unlock(&fins.mu);
}

void sf_fins_private_moved(int from, int to) {
    pthread_mutex_lock(&fins.mu);
    for (unsigned i = 0; i < atomic_load(&fins.n); i++) {
        if (fins.owed[i].overlay == from)
            fins.owed[i].overlay = to;
        if (fins.owed[i].host == from)
            fins.owed[i].host = to;
    }
    pthread_mutex_unlock(&fins.mu);
}

/* The parent sends them; the child's copies only would keep the sockets open. */
void sf_fins_after_fork_child(void) {
    pthread_mutex_init(&fins.mu, NULL);
    while (atomic_load(&fins.n) > 0)
        forget(0);
}

/* At exit the kernel would close the copies, FIN and all: wait a little for the
 * acknowledgements first, as for lingering host sockets (linger.c). */
void sf_fins_at_exit(void) {
    uint64_t until = sf_now_ms() + 2000;
    while (atomic_load(&fins.n) > 0 && pthread_mutex_trylock(&fins.mu) == 0) {
        pthread_mutex_unlock(&fins.mu);
        uint64_t now = sf_now_ms();
        sf_fins_poll(now);
        if (now >= until)
            break;
        real.poll(NULL, 0, 1);
    }
}
