/* streamcheck: one TCP connection carrying a known byte stream each way at once, every byte
 * checked on arrival. Built by the tests with musl-gcc (and gcc), run under the preload library,
 * so that a switch in the middle of the stream is checked byte for byte in both directions.
 *
 *   streamcheck server IP PORT BYTES [hold]   prints "listening", serves one connection
 *   streamcheck client IP PORT BYTES [hold]
 *
 * Each end first writes the HEAD bytes of its stream one byte per call, enough calls to cross
 * the library's threshold, then reads what comes until its socket is a socket of another network
 * namespace than its own (SO_NETNS_COOKIE): the connection has switched, and the rest of both
 * streams must cross the host path, which the tests check in the kernel's counters. Then it
 * writes the rest in chunks of varying size (alternating write() and send(), so both wrappers are
 * on the path), shuts down writing, and reads until EOF, comparing with the peer's generator.
 * With "hold", once switched it says "switched" on stderr and waits for a line (or EOF) on stdin
 * before the rest: the test looks at the host connection while it is sure to be open, where a
 * poll of a stream that crosses the host path in a fraction of a second could miss it.
 * Output: "ok sent=N received=N" and exit 0, or "MISMATCH ..." / "ERROR ..." and exit 1. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HEAD 32 /* bytes written one per call: more calls than the tests' threshold */
#define SWITCH_WAIT_S 60
#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif

struct gen {
    uint64_t state;
    uint8_t buf[8];
    unsigned used;
};

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static uint8_t next_byte(struct gen *g) {
    if (g->used == sizeof g->buf) {
        uint64_t v = xorshift(&g->state);
        memcpy(g->buf, &v, sizeof g->buf);
        g->used = 0;
    }
    return g->buf[g->used++];
}

static int fail(const char *what) {
    printf("ERROR %s: %s\n", what, strerror(errno));
    return 1;
}

static uint64_t netns_cookie(int fd) {
    uint64_t cookie = 0;
    socklen_t len = sizeof cookie;
    if (getsockopt(fd, SOL_SOCKET, SO_NETNS_COOKIE, &cookie, &len) != 0)
        return 0;
    return cookie;
}

/* Checks r bytes read against the peer's generator; 0 on a mismatch (printed). */
static int check(const uint8_t *buf, ssize_t r, struct gen *in, unsigned long long *received) {
    for (ssize_t i = 0; i < r; i++, (*received)++) {
        uint8_t want = next_byte(in);
        if (buf[i] != want) {
            printf("MISMATCH at byte %llu: got %02x, want %02x\n", *received, buf[i], want);
            return 0;
        }
    }
    return 1;
}

/* The head of the stream, one byte per call, then reads until the fd is a host socket. */
static int head_until_switched(int fd, struct gen *out, struct gen *in, uint64_t own,
                               unsigned long long *sent, unsigned long long *received) {
    static uint8_t rbuf[16384];
    for (int i = 0; i < HEAD; i++) {
        uint8_t b = next_byte(out);
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        if (poll(&p, 1, 30000) <= 0 || write(fd, &b, 1) != 1)
            return fail("head write");
        (*sent)++;
    }
    time_t deadline = time(NULL) + SWITCH_WAIT_S;
    while (netns_cookie(fd) == own) {
        if (time(NULL) > deadline) {
            printf("ERROR the connection did not switch within %d s\n", SWITCH_WAIT_S);
            return 1;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 1) == 1) {
            ssize_t r = read(fd, rbuf, sizeof rbuf);
            if (r < 0 && errno != EAGAIN && errno != EINTR)
                return fail("head read");
            if (r == 0) {
                printf("ERROR EOF before the switch\n");
                return 1;
            }
            if (r > 0 && !check(rbuf, r, in, received))
                return 1;
        }
    }
    return 0;
}

static int run(int fd, unsigned long long bytes, int is_client, uint64_t own, int hold) {
    struct gen out = {.state = is_client ? 0x5eed0001ULL : 0x5eed0002ULL, .used = 8};
    struct gen in = {.state = is_client ? 0x5eed0002ULL : 0x5eed0001ULL, .used = 8};
    uint64_t sizes = is_client ? 77 : 78;
    unsigned long long sent = 0, received = 0;
    static uint8_t wbuf[16384], rbuf[16384];
    size_t wlen = 0, woff = 0;
    unsigned calls = 0;
    int eof = 0, shut = 0;

    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0)
        return fail("fcntl");
    if (bytes < HEAD) {
        printf("ERROR BYTES must be at least %d\n", HEAD);
        return 1;
    }
    if (head_until_switched(fd, &out, &in, own, &sent, &received) != 0)
        return 1;
    if (hold) {
        char line;
        fprintf(stderr, "switched\n");
        fflush(stderr);
        while (read(0, &line, 1) == 1 && line != '\n')
            ;
    }
    while (!eof || !shut) {
        if (woff == wlen && sent < bytes) {
            size_t n = 1 + (size_t)(xorshift(&sizes) % sizeof wbuf);
            if (n > bytes - sent)
                n = (size_t)(bytes - sent);
            for (size_t i = 0; i < n; i++)
                wbuf[i] = next_byte(&out);
            wlen = n;
            woff = 0;
        }
        if (woff == wlen && sent == bytes && !shut) {
            if (shutdown(fd, SHUT_WR) != 0)
                return fail("shutdown");
            shut = 1;
        }
        struct pollfd p = {.fd = fd, .events = (short)((eof ? 0 : POLLIN) | (woff < wlen ? POLLOUT : 0))};
        if (p.events == 0)
            continue;
        if (poll(&p, 1, 30000) <= 0) {
            printf("ERROR poll: %s after sent=%llu received=%llu\n", errno ? strerror(errno) : "timeout",
                   sent, received);
            return 1;
        }
        if (woff < wlen && (p.revents & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t w = (calls++ & 1) ? send(fd, wbuf + woff, wlen - woff, 0)
                                      : write(fd, wbuf + woff, wlen - woff);
            if (w < 0 && errno != EAGAIN && errno != EINTR)
                return fail("write");
            if (w > 0) {
                woff += (size_t)w;
                sent += (unsigned long long)w;
            }
        }
        if (!eof && (p.revents & (POLLIN | POLLERR | POLLHUP))) {
            ssize_t r = (calls++ & 1) ? recv(fd, rbuf, sizeof rbuf, 0) : read(fd, rbuf, sizeof rbuf);
            if (r < 0 && errno != EAGAIN && errno != EINTR)
                return fail("read");
            if (r == 0)
                eof = 1;
            if (r > 0 && !check(rbuf, r, &in, &received))
                return 1;
        }
    }
    if (received != bytes) {
        printf("MISMATCH: stream ended after %llu of %llu bytes\n", received, bytes);
        return 1;
    }
    printf("ok sent=%llu received=%llu\n", sent, received);
    return 0;
}

int main(int argc, char **argv) {
    int hold = argc == 6 && strcmp(argv[5], "hold") == 0;
    if ((argc != 5 && !hold) || (strcmp(argv[1], "server") != 0 && strcmp(argv[1], "client") != 0)) {
        fprintf(stderr, "usage: streamcheck server|client IP PORT BYTES [hold]\n");
        return 2;
    }
    int is_client = strcmp(argv[1], "client") == 0;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[3]))};
    if (inet_pton(AF_INET, argv[2], &addr.sin_addr) != 1) {
        fprintf(stderr, "streamcheck: bad address %s\n", argv[2]);
        return 2;
    }
    unsigned long long bytes = strtoull(argv[4], NULL, 10);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return fail("socket");
    uint64_t own = netns_cookie(fd); /* a fresh socket: this process's own namespace */
    if (is_client) {
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0)
            return fail("connect");
    } else {
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 1) != 0)
            return fail("listen");
        printf("listening\n");
        fflush(stdout);
        int c = accept(fd, NULL, NULL);
        if (c < 0)
            return fail("accept");
        close(fd);
        fd = c;
    }
    int rc = run(fd, bytes, is_client, own, hold);
    close(fd);
    fflush(stdout);
    return rc;
}
