"""The crr client: connect, one HTTP/1.0 request, read to EOF, close, in a loop, timing each.

Why our own client: no packaged tool fits. netperf's TCP_CRR is not in Debian main; ab -c 1
is the right loop but reports percentiles in whole milliseconds (a cycle here is ~70-130 µs)
and no p99.9; wrk and redis-benchmark -k 0 start their clock after connect() has completed,
which leaves out exactly the part (connection setup) that slim and shuntflow change.

Why C and not Python: client and server share one vCPU, so client overhead lands in every
latency; Python's per-iteration cost (~10-15 µs) would dilute the ratios between modes.
The source lives here as text because the package ships only Python files and the preload
library; the bench compiles it with the system C compiler (the same one `pip install .` needs
for the library) into its own work directory.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from shuntflow.bench.spec import BenchError

SOURCE = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* One cycle; 0 if the server answered 200 and closed. */
static int cycle(const struct sockaddr_in *sa, const char *req, size_t req_len) {
    static char buf[65536];
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    if (connect(fd, (const struct sockaddr *)sa, sizeof *sa) != 0) { close(fd); return -1; }
    size_t off = 0;
    while (off < req_len) {
        ssize_t n = write(fd, req + off, req_len - off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) { close(fd); return -1; }
        off += (size_t)n;
    }
    size_t got = 0;
    int ok = 0;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) { close(fd); return -1; }
        if (n == 0) break;
        if (got == 0 && n >= 12 && memcmp(buf + 9, "200", 3) == 0) ok = 1;
        got += (size_t)n;
    }
    close(fd);
    return ok ? 0 : -1;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s IP PORT SECONDS PATH\n", argv[0]);
        return 2;
    }
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) { fprintf(stderr, "bad IP\n"); return 2; }
    double seconds = atof(argv[3]);
    char req[512];
    int req_len = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n",
                           argv[4], argv[1]);

    size_t cap = 1 << 16, n = 0;
    uint64_t *lat = malloc(cap * sizeof *lat);
    long errors = 0;
    uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9), t = start;
    while (t < end) {
        uint64_t t0 = now_ns();
        int rc = cycle(&sa, req, (size_t)req_len);
        t = now_ns();
        if (rc != 0) {
            errors++;
            /* A refused or reset connection returns at once; do not spin on it. */
            struct timespec pause = {0, 1000000};
            nanosleep(&pause, NULL);
            t = now_ns();
            continue;
        }
        if (n == cap) {
            cap *= 2;
            lat = realloc(lat, cap * sizeof *lat);
            if (!lat) { fprintf(stderr, "out of memory\n"); return 1; }
        }
        lat[n++] = t - t0;
    }
    double elapsed = (double)(t - start) / 1e9;
    qsort(lat, n, sizeof *lat, cmp_u64);
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += (double)lat[i];
    static const double pcts[] = {0, 1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95,
                                  97, 98, 99, 99.5, 99.9, 99.95, 99.99, 100};
    printf("{\"requests\": %zu, \"errors\": %ld, \"seconds\": %.6f, \"avg_us\": %.3f, \"pct\": [",
           n, errors, elapsed, n ? sum / (double)n / 1e3 : 0.0);
    for (size_t i = 0; i < sizeof pcts / sizeof pcts[0]; i++) {
        double v = 0;
        if (n) {
            /* nearest-rank: the smallest sample with at least p% of samples at or below it */
            size_t rank = (size_t)(pcts[i] / 100.0 * (double)n + 0.999999);
            if (rank < 1) rank = 1;
            if (rank > n) rank = n;
            v = (double)lat[rank - 1] / 1e3;
        }
        printf("%s[%g, %.3f]", i ? ", " : "", pcts[i], v);
    }
    printf("]}\n");
    free(lat);
    return n ? 0 : 1;
}
"""


def build(work: Path) -> Path:
    """Compile the client into `work` (once per source version) and return its path."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError("crr needs a C compiler (cc) to build its client; install gcc")
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
    exe = work / f"sf-crr-{digest}"
    if exe.exists():
        return exe
    src = work / "sf-crr.c"
    src.write_text(SOURCE)
    proc = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(exe), str(src)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise BenchError(f"cannot build the crr client: {proc.stderr.strip()[:300]}")
    return exe
