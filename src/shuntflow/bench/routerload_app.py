"""The two programs of the router load test, run inside testbed containers under the library.

    python -m shuntflow.bench.routerload_app server --ip IP --port P --ports N
    python -m shuntflow.bench.routerload_app client --host IP --port P --ports N \\
        --idle 10000 --switches 30000 --rate 1000 --threshold 4 --switch-timeout 5

The client first opens `--idle` connections that never send a byte (tracked by the library, never
switched) and prints `{"phase": "idle_ready", ...}`; it then waits for a line on stdin (the driver
snapshots the routers meanwhile) and runs the churn: `--switches` new connections at `--rate` per
second, each exchanging one-byte pings until its data-syscall count crosses `--threshold`, then
waiting until its fd is a host-namespace socket (SO_NETNS_COOKIE, polled every millisecond; the
library's own interposers stay out of it), then saying bye; the server closes first so TIME_WAIT
lands on its side. With `--progress-every N` it prints `{"phase": "progress", "switched": K}`
each time K, the connections seen switched so far, reaches a multiple of N (the driver samples
the routers then); with `--quiet-at K`, once K have switched it starts no more until those in
flight are done, prints `{"phase": "quiet", ...}` and waits for a stdin line (the driver samples
the routers at rest). `--until-switched` makes `--switches` the number of connections to see
switched rather than to start. It prints `{"phase": "churn_done", ...}` and waits for one more
stdin line before it closes the idle connections and exits.

Why Python and one epoll loop per program: it is the load on the routers that is measured, and
at 1,000 new connections per second a single loop spends well under a vCPU; threads would only add
lock traffic to the library under test. Each program still starts one thread that only sleeps:
a single-threaded process starts the library's agent (and with it tells its router of its
connections) only at a connection's 8th data call, and the idle connections, which make none,
would then be no load on the routers at all. A multi-threaded server's are, from their connect.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import heapq
import itertools
import json
import resource
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

SO_NETNS_COOKIE = 71
PING, BYE = b"p", b"b"
# Each waiting connection is polled every POLL_S for its first FINE_POLL_FOR_S, then every
# COARSE_POLL_S: a backlog of slow switches must not eat the CPU the switches need.
POLL_S = 0.001
# The routers refuse a 4-tuple for this long after switching it (daemon.DONE_TTL): a connection
# reusing one is expected to stay on the overlay, and is counted apart.
REUSE_WINDOW_S = 10.0
FINE_POLL_FOR_S = 0.02
COARSE_POLL_S = 0.01


def netns_cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def raise_nofile(wanted: int) -> int:
    """Soft limit up to `wanted`; the hard limit too where allowed (CAP_SYS_RESOURCE), else up
    to it (this VM's sandbox has a hard limit of 20,000 and no such capability)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted and hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


# -- server ----------------------------------------------------------------------------------


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def serve(ip: str, port: int, ports: int, nofile: int) -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    raise_nofile(nofile)
    ep = select.epoll()
    listeners: dict[int, socket.socket] = {}
    for p in range(port, port + ports):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((ip, p))
        ls.listen(4096)
        ls.setblocking(False)
        listeners[ls.fileno()] = ls
        ep.register(ls.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    accepted = closed = 0
    emit({"listening": list(range(port, port + ports))})
    try:
        while True:
            for fd, _ev in ep.poll(1.0):
                listener = listeners.get(fd)
                if listener is not None:
                    while True:
                        try:
                            c, _ = listener.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as exc:  # EMFILE: leave it in the backlog
                            emit({"accept_error": exc.strerror})
                            break
                        c.setblocking(False)
                        conns[c.fileno()] = c
                        ep.register(c.fileno(), select.EPOLLIN)
                        accepted += 1
                    continue
                c = conns[fd]
                try:
                    data = c.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data and BYE not in data:
                    try:
                        c.send(PING * data.count(PING))
                        continue
                    except OSError:
                        pass
                ep.unregister(fd)
                del conns[fd]
                c.close()
                closed += 1
    except KeyboardInterrupt:
        pass
    finally:
        emit({"accepted": accepted, "closed": closed, "open": len(conns)})


# -- client ----------------------------------------------------------------------------------

CONNECTING, PINGING, SWITCHING, CLOSING = range(4)


@dataclass
class Churn:
    sock: socket.socket
    state: int = CONNECTING
    pongs: int = 0
    crossed_at: float = 0.0
    next_check: float = 0.0
    reused: bool = False  # its 4-tuple was switched less than REUSE_WINDOW_S ago


@dataclass
class ClientStats:
    started: int = 0
    switched: int = 0
    timed_out: int = 0
    reused: int = 0
    timed_out_reused: int = 0
    errors: int = 0
    done: int = 0


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.ep = select.epoll()
        self.addrs = [(args.host, p) for p in range(args.port, args.port + args.ports)]
        self.churn: dict[int, Churn] = {}
        self.waiting: dict[int, Churn] = {}  # crossed the threshold, not yet on the host path
        # (next check, tie-breaker, fd, connection): only the checks that are due are looked at,
        # so a backlog of waiting connections costs its checks, not a walk of it every round
        self.due: list[tuple[float, int, int, Churn]] = []
        self.tie = itertools.count()
        self.starting_s = 0.0  # from the first start to the last, the quiet pause left out
        self.stats = ClientStats()
        self.latencies: list[float] = []
        self.switched_at: dict[tuple[int, int], float] = {}  # (local port, server port)
        self.errors: dict[str, int] = {}
        with socket.socket() as probe:
            self.own_cookie = netns_cookie(probe)
        # Each ping is one send and one recv on the client: crossing after this many pongs.
        self.pongs_needed = max(1, (args.threshold + 1) // 2)

    def _error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def open_idle(self) -> list[socket.socket]:
        idle: list[socket.socket] = []
        pending: dict[int, socket.socket] = {}
        n = 0
        while len(idle) < self.a.idle:
            while n < self.a.idle and len(pending) < 256:
                s = socket.socket()
                s.setblocking(False)
                rc = s.connect_ex(self.addrs[n % len(self.addrs)])
                n += 1
                if rc not in (0, errno.EINPROGRESS):
                    self._error(f"idle connect: {errno.errorcode.get(rc, rc)}")
                    s.close()
                    continue
                pending[s.fileno()] = s
                self.ep.register(s.fileno(), select.EPOLLOUT)
            if not pending and n >= self.a.idle:
                break
            for fd, _ev in self.ep.poll(1.0):
                s = pending.pop(fd)
                self.ep.unregister(fd)
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._error(f"idle connect: {errno.errorcode.get(err, err)}")
                    s.close()
                else:
                    idle.append(s)
        return idle

    def _start_one(self) -> None:
        s = socket.socket()
        s.setblocking(False)
        rc = s.connect_ex(self.addrs[self.stats.started % len(self.addrs)])
        self.stats.started += 1
        if rc not in (0, errno.EINPROGRESS):
            self._error(f"connect: {errno.errorcode.get(rc, rc)}")
            self.stats.errors += 1
            s.close()
            return
        self.churn[s.fileno()] = Churn(s)
        self.ep.register(s.fileno(), select.EPOLLOUT)

    def _finish(self, fd: int, c: Churn, error: str | None = None) -> None:
        if error:
            self._error(error)
            self.stats.errors += 1
        else:
            self.stats.done += 1
        self.waiting.pop(fd, None)
        self.churn.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):  # not registered while it waits
            self.ep.unregister(fd)
        c.sock.close()

    def _bye(self, fd: int, c: Churn) -> None:
        c.state = CLOSING
        try:
            c.sock.send(BYE)
        except OSError as exc:
            self._finish(fd, c, f"bye: {exc.strerror}")
            return
        self.ep.register(fd, select.EPOLLIN)

    def _on_event(self, fd: int) -> None:
        c = self.churn.get(fd)
        if c is None:
            return
        if c.state == CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._finish(fd, c, f"connect: {errno.errorcode.get(err, err)}")
                return
            c.state = PINGING
            last = self.switched_at.get(_ports(c.sock))
            if last is not None and time.monotonic() - last < REUSE_WINDOW_S:
                c.reused = True
                self.stats.reused += 1
            self.ep.modify(fd, select.EPOLLIN)
            self._ping(fd, c)
            return
        try:
            data = c.sock.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(fd, c, f"recv: {exc.strerror}")
            return
        if c.state == CLOSING:
            if not data:
                self._finish(fd, c)
            return
        if not data:
            self._finish(fd, c, "server closed early")
            return
        c.pongs += data.count(PING)
        if c.pongs >= self.pongs_needed:
            c.state = SWITCHING
            c.crossed_at = c.next_check = time.monotonic()
            self.ep.unregister(fd)
            self.waiting[fd] = c
            heapq.heappush(self.due, (c.next_check, next(self.tie), fd, c))
        else:
            self._ping(fd, c)

    def _ping(self, fd: int, c: Churn) -> None:
        try:
            c.sock.send(PING)
        except OSError as exc:
            self._finish(fd, c, f"send: {exc.strerror}")

    def _check_waiting(self, now: float) -> None:
        while self.due and self.due[0][0] <= now:
            _, _, fd, c = heapq.heappop(self.due)
            if self.waiting.get(fd) is not c:
                continue  # finished meanwhile; its fd number may name another connection now
            age = now - c.crossed_at
            try:
                moved = netns_cookie(c.sock) != self.own_cookie
            except OSError as exc:
                self._finish(fd, c, f"getsockopt: {exc.strerror}")
                continue
            if moved:
                self.latencies.append(age)
                self.stats.switched += 1
                self.switched_at[_ports(c.sock)] = now
                every = self.a.progress_every
                if every and self.stats.switched % every == 0:
                    emit({"phase": "progress", "switched": self.stats.switched})
            elif age > self.a.switch_timeout:
                self.stats.timed_out += 1
                self.stats.timed_out_reused += c.reused
            else:
                c.next_check = now + (POLL_S if age < FINE_POLL_FOR_S else COARSE_POLL_S)
                heapq.heappush(self.due, (c.next_check, next(self.tie), fd, c))
                continue
            del self.waiting[fd]
            self._bye(fd, c)

    def _enough(self) -> bool:
        target = int(self.a.switches)
        return (self.stats.switched if self.a.until_switched else self.stats.started) >= target

    def run_churn(self) -> float:
        start = paused = time.monotonic()
        quiet_at = self.a.quiet_at
        while True:
            now = time.monotonic()
            due = int((now - start) * self.a.rate) + 1
            draining = quiet_at and self.stats.switched >= quiet_at
            while (
                not draining
                and not self._enough()
                and self.stats.started < due
                and len(self.churn) < self.a.max_inflight
            ):
                self._start_one()
                self.starting_s = now - start
            if draining and not self.churn:
                # Nothing in flight: the driver samples the routers at rest, then says go on;
                # the rate's clock skips the pause.
                emit({"phase": "quiet", "switched": self.stats.switched})
                paused = time.monotonic()
                sys.stdin.readline()
                start += time.monotonic() - paused
                quiet_at = 0
                continue
            if self._enough() and not self.churn:
                return time.monotonic() - start
            for fd, _ev in self.ep.poll(POLL_S):
                self._on_event(fd)
            if self.due:
                self._check_waiting(time.monotonic())

    def main(self) -> None:
        nofile = raise_nofile(self.a.idle + self.a.max_inflight + 1024)
        t0 = time.monotonic()
        idle = self.open_idle()
        emit(
            {
                "phase": "idle_ready",
                "idle": len(idle),
                "seconds": round(time.monotonic() - t0, 3),
                "nofile": nofile,
                "errors": self.errors,
            }
        )
        sys.stdin.readline()
        seconds = self.run_churn()
        lat = sorted(self.latencies)
        emit(
            {
                "phase": "churn_done",
                "seconds": round(seconds, 3),
                "started": self.stats.started,
                "done": self.stats.done,
                "switched": self.stats.switched,
                "timed_out": self.stats.timed_out,
                "reused_tuples": self.stats.reused,
                "timed_out_reused": self.stats.timed_out_reused,
                "errors": self.stats.errors,
                "error_kinds": self.errors,
                "rate": round(self.stats.switched / seconds, 1) if seconds else None,
                # the rate connections were started at: below --rate, the client fell behind
                "start_rate": (
                    round(self.stats.started / self.starting_s, 1) if self.starting_s else None
                ),
                "latency_us": {
                    "count": len(lat),
                    "p50": _us(percentile(lat, 0.50)),
                    "p99": _us(percentile(lat, 0.99)),
                    "max": _us(lat[-1] if lat else None),
                    "resolution_us": [int(POLL_S * 1e6), int(COARSE_POLL_S * 1e6)],
                },
                "idle_still_open": sum(1 for s in idle if _alive(s)),
            }
        )
        sys.stdin.readline()
        for s in idle:
            s.close()


def _ports(s: socket.socket) -> tuple[int, int]:
    """(local port, server port): the server address is the same for every connection."""
    return (s.getsockname()[1], s.getpeername()[1])


def _us(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1e6)


def _alive(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shuntflow.bench.routerload_app")
    sub = ap.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--ip", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--ports", type=int, default=4)
    s.add_argument("--nofile", type=int, default=65536)
    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--ports", type=int, default=4)
    c.add_argument("--idle", type=int, default=10_000)
    c.add_argument("--switches", type=int, default=30_000)
    c.add_argument("--rate", type=float, default=1000.0)
    c.add_argument("--threshold", type=int, default=4)
    c.add_argument("--switch-timeout", type=float, default=5.0)
    c.add_argument("--max-inflight", type=int, default=4000)
    c.add_argument("--progress-every", type=int, default=0, help="switches per progress line")
    c.add_argument(
        "--until-switched",
        action="store_true",
        help="--switches counts connections seen switched, not connections started",
    )
    c.add_argument(
        "--quiet-at",
        type=int,
        default=0,
        help="once this many switched: let those in flight finish, print a quiet line, wait for "
        "a stdin line",
    )
    args = ap.parse_args(argv)
    threading.Thread(target=threading.Event().wait, name="multi-threaded", daemon=True).start()
    if args.role == "server":
        serve(args.ip, args.port, args.ports, args.nofile)
    else:
        Client(args).main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
