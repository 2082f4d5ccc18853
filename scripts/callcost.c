/* callcost.c -- what a wrapped data call costs: cheap syscalls on a connected loopback TCP
 * connection (recv that finds nothing, a 0-byte send, epoll_wait with nothing ready and with an
 * event ready), each timed with the TSC; the minimum and the median of N calls. Run it with and
 * without the library (scripts/callcost.sh does, in each configuration): the difference is the
 * wrapper's.
 * With SF_IDLE_THREAD set it starts an idle second thread first, as the library's agent is:
 * the kernel's fd lookup is cheaper in a single-threaded process. x86-64 only (rdtscp). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <x86intrin.h>

static unsigned long *cycles;

static int by_value(const void *a, const void *b) {
    unsigned long x = *(const unsigned long *)a, y = *(const unsigned long *)b;
    return x < y ? -1 : x > y;
}

static void report(const char *name, long n) {
    qsort(cycles, (size_t)n, sizeof *cycles, by_value);
    printf(" %s %lu/%lu", name, cycles[0], cycles[n / 2]);
}

static void *idle(void *arg) {
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

#define TIMED(n, expr, ok)                                                                        \
    for (long i_ = 0; i_ < (n); i_++) {                                                           \
        unsigned aux_;                                                                            \
        unsigned long t_ = __rdtscp(&aux_);                                                       \
        if ((expr) != (ok)) {                                                                     \
            perror(#expr);                                                                        \
            return 1;                                                                             \
        }                                                                                         \
        cycles[i_] = __rdtscp(&aux_) - t_;                                                        \
    }

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000;
    cycles = malloc(sizeof *cycles * (size_t)n);
    pthread_t t;
    if (getenv("SF_IDLE_THREAD") != NULL && pthread_create(&t, NULL, idle, NULL) != 0)
        return 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    int l = socket(AF_INET, SOCK_STREAM, 0), c = socket(AF_INET, SOCK_STREAM, 0);
    if (cycles == NULL || l < 0 || c < 0 || bind(l, (struct sockaddr *)&a, sizeof a) != 0 ||
        listen(l, 1) != 0 || getsockname(l, (struct sockaddr *)&a, &alen) != 0 ||
        connect(c, (struct sockaddr *)&a, sizeof a) != 0) {
        perror("loopback connection");
        return 1;
    }
    int s = accept(l, NULL, NULL), ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN}, out[8];
    if (s < 0 || ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) != 0) {
        perror("accept/epoll");
        return 1;
    }
    char buf[64] = {0};
    printf("cycles min/median:");
    TIMED(n, recv(s, buf, sizeof buf, MSG_DONTWAIT), -1);
    report("recv", n);
    TIMED(n, send(c, buf, 0, 0), 0);
    report("send", n);
    TIMED(n, epoll_wait(ep, out, 8, 0), 0);
    report("epoll_wait(0)", n);
    /* With a timeout, as event loops wait: one byte stays unread, so the wait returns at once. */
    if (send(c, buf, 1, 0) != 1)
        return 1;
    TIMED(n, epoll_wait(ep, out, 8, 100), 1);
    report("epoll_wait(100)", n);
    printf("\n");
    return 0;
}
