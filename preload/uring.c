/* uring.c -- noticing io_uring, the one I/O path no libc wrapper sees.
 *
 * Socket I/O submitted through an io_uring never passes through read/write/send/recv, so the
 * library can neither count it nor redirect it: a write queued on the ring before a commit is
 * missing from S, and a read pending on the overlay socket at the swap completes with the
 * overlay's FIN, which the application takes for EOF. Either loses bytes. So a process that
 * holds a ring switches nothing from then on (docs/design.md, "What stays on the overlay"): its
 * own thresholds pin the connection to the overlay, and it answers NOT_MINE to a peer's claim.
 *
 * Two ways to notice, because liburing may issue the setup syscall itself (inline assembly)
 * instead of through libc: the syscall() wrapper sees io_uring_setup when it goes through libc,
 * and otherwise the ring's mapping shows in /proc/self/maps ("anon_inode:[io_uring]"), which the
 * agent reads when it starts and then at most once per SF_URING_SCAN_MS (less often where reading
 * it is dear), and a switch decision too if that read is due.
 *
 * The maps file is opened once, with the agent's other fds, and read again from offset 0 at each
 * scan (the kernel regenerates it). Opened per scan, it took an fd for a moment once a second, and
 * an application at its fd limit whose socket() or open() fell in that moment got EMFILE for an
 * fd it never saw. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sf_core.h"

#define SF_URING_SCAN_MS 1000
/* A process with a huge address space (a JVM: 100,000 mappings, megabytes of text) would spend
 * percents of a CPU re-reading its maps every second: scans are spaced so they cost at most 1 %. */
#define SF_URING_SCAN_SHARE 100

static _Atomic int uring_seen;
static _Atomic uint64_t last_scan_ms, scan_period_ms = SF_URING_SCAN_MS;

static void note_uring(const char *how) {
    if (atomic_exchange(&uring_seen, 1) == 0)
        SF_LOG("io_uring in use (%s): this process switches no connection from now on", how);
}

/* -1 where the agent has not started in this process or /proc is not there. maps_mu keeps one
 * scan at a time (a trigger's and the agent's tick can meet) and the number from moving under
 * one (sf_uring_private_moved). */
static int maps_fd = -1;
static pthread_mutex_t maps_mu = PTHREAD_MUTEX_INITIALIZER;

int sf_uring_open(void) {
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == EMFILE || errno == ENFILE)
            return -1;
        /* No /proc in this container: the syscall() wrapper alone notices rings, as on an
         * architecture it does not cover the other way round. */
        SF_LOG("cannot read /proc/self/maps (%s): a ring set up without libc's syscall() goes "
               "unnoticed", strerror(errno));
        return 0;
    }
    fd = sf_private_fd(fd);
    pthread_mutex_lock(&maps_mu);
    maps_fd = fd;
    pthread_mutex_unlock(&maps_mu);
    return 0;
}

void sf_uring_close(void) {
    pthread_mutex_lock(&maps_mu);
    if (maps_fd >= 0) {
        sf_private_close(maps_fd);
        maps_fd = -1;
    }
    pthread_mutex_unlock(&maps_mu);
}

/* The parent's fd reads the parent's maps (the file holds the address space of whoever opened
 * it): the child's agent opens its own. */
void sf_uring_after_fork_child(void) {
    pthread_mutex_init(&maps_mu, NULL);
    sf_uring_close();
}

void sf_uring_private_moved(int from, int to) {
    pthread_mutex_lock(&maps_mu);
    if (maps_fd == from)
        maps_fd = to;
    pthread_mutex_unlock(&maps_mu);
}

static int maps_show_uring(void) {
    pthread_mutex_lock(&maps_mu);
    int fd = maps_fd;
    if (fd < 0) {
        pthread_mutex_unlock(&maps_mu);
        return 0;
    }
    /* A line never exceeds PATH_MAX plus ~80 bytes; keep the tail of each buffer so a name
     * split across two reads is still found. */
    static const char needle[] = "anon_inode:[io_uring]";
    const size_t keep = sizeof needle - 2;
    char buf[8192];
    size_t have = 0;
    int found = 0;
    off_t at = 0;
    for (;;) {
        ssize_t n = pread(fd, buf + have, sizeof buf - 1 - have, at);
        if (n <= 0)
            break;
        at += n;
        have += (size_t)n;
        buf[have] = '\0';
        if (strstr(buf, needle) != NULL) {
            found = 1;
            break;
        }
        if (have > keep) {
            memmove(buf, buf + have - keep, keep);
            have = keep;
        }
    }
    pthread_mutex_unlock(&maps_mu);
    return found;
}

void sf_uring_refresh(uint64_t now_ms) {
    if (atomic_load_explicit(&uring_seen, memory_order_relaxed))
        return;
    uint64_t last = atomic_load(&last_scan_ms);
    if (last != 0 && now_ms - last < atomic_load(&scan_period_ms))
        return;
    atomic_store(&last_scan_ms, now_ms);
    uint64_t start = sf_now_us();
    if (maps_show_uring())
        note_uring("its ring is mapped");
    uint64_t cost_ms = (sf_now_us() - start) / 1000;
    uint64_t period = cost_ms * SF_URING_SCAN_SHARE;
    atomic_store(&scan_period_ms, period > SF_URING_SCAN_MS ? period : SF_URING_SCAN_MS);
}

/* The application thread's question at its trigger, which must not read /proc: 1 if a ring was
 * seen or the next scan is due (then the agent asks sf_uses_io_uring, as before), 0 if the last
 * scan is fresh and found none. Also 0 before the first scan if the agent runs: it makes that
 * scan first thing, before it reads any answer, and looks again before it takes a host
 * connection (router.c on_switch_res), so a request sent now commits nothing in a process with
 * a ring. At a low threshold the trigger comes a call or two after the agent's start, and
 * leaving the request to the agent made it wait for the thread's start and that scan. */
int sf_uring_maybe(uint64_t now_ms) {
    if (atomic_load_explicit(&uring_seen, memory_order_relaxed))
        return 1;
    uint64_t last = atomic_load(&last_scan_ms);
    if (last == 0)
        return !sf_agent_running();
    return now_ms - last >= atomic_load(&scan_period_ms);
}

int sf_uses_io_uring(void) {
    sf_uring_refresh(sf_now_ms());
    return atomic_load_explicit(&uring_seen, memory_order_relaxed);
}

/* syscall() is issued here, not forwarded to libc's: it runs in constructors and allocators
 * (jemalloc) before the library has resolved anything, where a dlsym would recurse. Only where
 * the calling convention is spelled out below; elsewhere the maps scan alone notices rings. */
#if defined(__x86_64__) || defined(__aarch64__)
static long raw_syscall(long n, long a1, long a2, long a3, long a4, long a5, long a6) {
    long ret;
#if defined(__x86_64__)
    register long r10 __asm__("r10") = a4;
    register long r8 __asm__("r8") = a5;
    register long r9 __asm__("r9") = a6;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
#else
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a1;
    register long x1 __asm__("x1") = a2;
    register long x2 __asm__("x2") = a3;
    register long x3 __asm__("x3") = a4;
    register long x4 __asm__("x4") = a5;
    register long x5 __asm__("x5") = a6;
    __asm__ volatile("svc 0"
                     : "+r"(x0)
                     : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                     : "memory");
    ret = x0;
#endif
    if (ret < 0 && ret > -4096) {
        errno = (int)-ret;
        return -1;
    }
    return ret;
}

/* glibc's syscall() takes six arguments whatever the number; so does this. */
SF_EXPORT long syscall(long number, ...) {
    va_list ap;
    va_start(ap, number);
    long a[6];
    for (int i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);
    va_end(ap);
    long rc = raw_syscall(number, a[0], a[1], a[2], a[3], a[4], a[5]);
    /* Past the setsockopt wrapper: the socket's record of its options no longer holds. */
    if (SF_UNLIKELY(number == SYS_setsockopt))
        sf_sockopts_unknown((int)a[0]);
    if (SF_UNLIKELY(number == SYS_io_uring_setup) && rc >= 0) {
        int err = errno;
        note_uring("io_uring_setup");
        errno = err;
    }
    return rc;
}
#endif
