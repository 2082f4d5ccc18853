"""Integrity torture test: a client/server pair that checks every byte across switches.

Run both ends under the preload library (``shuntflow exec ... -- python -m shuntflow.torture``).
Each connection carries, in both directions at once, a pseudo-random stream derived from a
per-connection seed, written in chunks from 1 B to 1 MiB with random pauses, then half-closed.
Each end checks every byte it reads against the stream it expects, and that the stream ends
exactly at EOF. At the end each side prints one JSON summary line; the exit code is non-zero on
any mismatch, loss, duplicate, reset or hang.

Which path a connection ended on is read from the socket itself: SO_NETNS_COOKIE names the
network namespace the socket was created in, so a connection that was switched reports the host
namespace's cookie, not the container's.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import json
import random
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

SO_NETNS_COOKIE = 71
HEADER = struct.Struct("<4sIQQQ")  # magic, conn id, seed, client->server, server->client bytes
MAGIC = b"SFT1"
STYLES = ("blocking", "epoll", "epoll-et", "poll")
MAX_CHUNK = 1 << 20


def netns_cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def own_netns_cookie() -> int:
    with socket.socket() as probe:
        return netns_cookie(probe)


def endpoints(sock: socket.socket) -> str:
    try:
        return f"{sock.getsockname()[1]}->{sock.getpeername()[1]}"
    except OSError:
        return "?"


def stream(seed: int, direction: int, size: int) -> bytes:
    return random.Random(seed * 2 + direction).randbytes(size)


@dataclass
class ConnResult:
    conn_id: int
    sent: int = 0
    received: int = 0
    expected: int = 0
    first_bad: int = -1
    error: str = ""
    switched: bool = False
    done: bool = False
    started: float = field(default_factory=time.monotonic)
    endpoints: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.done and not self.error and self.first_bad < 0 and self.received == self.expected
        )


@dataclass
class Plan:
    """What one connection sends: its chunk sizes and the pauses between them."""

    rng: random.Random
    pause_prob: float
    max_chunk: int
    pause_max: float = 0.003

    def chunk(self, remaining: int) -> int:
        # Mostly small writes (they drive the syscall count), sometimes large ones.
        kind = self.rng.random()
        if kind < 0.6:
            size = self.rng.randint(1, 512)
        elif kind < 0.9:
            size = self.rng.randint(512, 65536)
        else:
            size = self.rng.randint(65536, max(65536, self.max_chunk))
        return max(1, min(size, remaining, self.max_chunk))

    def maybe_pause(self) -> None:
        if self.rng.random() < self.pause_prob:
            time.sleep(self.rng.random() * self.pause_max)


@dataclass
class Side:
    """One end of one connection: what it must send and what it must receive."""

    sock: socket.socket
    result: ConnResult
    out: bytes
    expect: bytes
    plan: Plan
    sent: int = 0
    got: int = 0
    wr_closed: bool = False
    eof: bool = False
    resume_at: float = 0.0
    header: bytearray = field(default_factory=bytearray)

    def check(self, data: bytes) -> None:
        end = self.got + len(data)
        if end > len(self.expect):
            self.fail_at(len(self.expect), f"{end - len(self.expect)} bytes past the end")
            data = data[: max(0, len(self.expect) - self.got)]
            end = self.got + len(data)
        if data != self.expect[self.got : end] and self.result.first_bad < 0:
            for i, byte in enumerate(data):
                if byte != self.expect[self.got + i]:
                    self.fail_at(self.got + i, "mismatch")
                    break
        self.got = end
        self.result.received = end

    def fail_at(self, offset: int, why: str) -> None:
        if self.result.first_bad < 0:
            self.result.first_bad = offset
            self.result.error = self.result.error or f"{why} at byte {offset}"

    def finish(self, own_cookie: int) -> None:
        with contextlib.suppress(OSError):
            self.result.switched = netns_cookie(self.sock) != own_cookie
        if self.got != len(self.expect) and not self.result.error:
            self.result.error = f"short stream: {self.got} of {len(self.expect)} bytes"
        self.result.sent = self.sent
        if not self.result.endpoints:
            self.result.endpoints = endpoints(self.sock)
        self.result.seconds = round(time.monotonic() - self.result.started, 4)
        self.result.done = True
        self.sock.close()


# ---- blocking style: one reader and one writer thread per connection ----------------------


def run_blocking(side: Side, own_cookie: int) -> None:
    def writer() -> None:
        try:
            while side.sent < len(side.out):
                n = side.plan.chunk(len(side.out) - side.sent)
                side.sock.sendall(side.out[side.sent : side.sent + n])
                side.sent += n
                side.plan.maybe_pause()
            side.sock.shutdown(socket.SHUT_WR)
        except Exception as exc:  # any failure, the tool's own included, must fail the run
            side.result.error = side.result.error or f"write: {exc!r}"

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        while True:
            want = side.plan.chunk(MAX_CHUNK)
            # MSG_WAITALL and MSG_PEEK are how real clients differ; both must survive a switch.
            flags = socket.MSG_WAITALL if side.plan.rng.random() < 0.1 else 0
            if side.plan.rng.random() < 0.05:
                side.sock.recv(min(want, 16), socket.MSG_PEEK)
            data = side.sock.recv(want, flags)
            if not data:
                break
            side.check(data)
    except Exception as exc:
        side.result.error = side.result.error or f"read: {exc!r}"
    thread.join()
    side.finish(own_cookie)


# ---- non-blocking styles: one event loop for all connections of this process ---------------


class Loop:
    def __init__(self, style: str) -> None:
        self.style = style
        self.sides: dict[int, Side] = {}
        self.lock = threading.Lock()
        self.poller: select.epoll | select.poll
        if style == "poll":
            self.poller = select.poll()
        else:
            self.poller = select.epoll()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self._register(self.wake_r.fileno(), read=True, write=False)

    def _mask(self, read: bool, write: bool) -> int:
        if self.style == "poll":
            return (select.POLLIN if read else 0) | (select.POLLOUT if write else 0)
        mask = (select.EPOLLIN if read else 0) | (select.EPOLLOUT if write else 0)
        return mask | (select.EPOLLET if self.style == "epoll-et" else 0)

    def _register(self, fd: int, read: bool, write: bool) -> None:
        self.poller.register(fd, self._mask(read, write))

    def add(self, side: Side) -> None:
        side.sock.setblocking(False)
        with self.lock:
            self.sides[side.sock.fileno()] = side
        self._register(side.sock.fileno(), read=True, write=True)
        self.wake_w.send(b"x")

    def _pump_write(self, side: Side) -> None:
        if time.monotonic() < side.resume_at:
            return
        while side.sent < len(side.out):
            n = side.plan.chunk(len(side.out) - side.sent)
            try:
                done = side.sock.send(side.out[side.sent : side.sent + n])
            except BlockingIOError:
                return
            side.sent += done
            if side.plan.rng.random() < side.plan.pause_prob:
                # A pause: stop asking for writability until it is over (_resume re-arms).
                side.resume_at = time.monotonic() + side.plan.rng.random() * side.plan.pause_max
                self.poller.modify(side.sock.fileno(), self._mask(read=True, write=False))
                return
        if not side.wr_closed:
            side.sock.shutdown(socket.SHUT_WR)
            side.wr_closed = True

    def _pump_read(self, side: Side) -> None:
        while not side.eof:
            try:
                data = side.sock.recv(side.plan.chunk(MAX_CHUNK))
            except BlockingIOError:
                return
            if not data:
                side.eof = True
                return
            side.check(data)

    def _resume(self) -> None:
        """Re-arm (MOD) writability for paused senders whose pause is over."""
        now = time.monotonic()
        with self.lock:
            paused = [s for s in self.sides.values() if 0 < s.resume_at <= now]
        for side in paused:
            side.resume_at = 0.0
            if not side.wr_closed:  # more to send, or at least the half-close after the last
                self.poller.modify(side.sock.fileno(), self._mask(read=True, write=True))

    def run(self, own_cookie: int, until: Callable[[], bool], deadline: float) -> None:
        while not until() and time.monotonic() < deadline:
            self._resume()
            events = self.poller.poll(2 if self.style == "poll" else 0.002)
            for fd, _mask in events:
                if fd == self.wake_r.fileno():
                    with contextlib.suppress(BlockingIOError):
                        self.wake_r.recv(4096)
                    continue
                with self.lock:
                    side = self.sides.get(fd)
                if side is None:
                    continue
                try:
                    self._pump_write(side)
                    self._pump_read(side)
                except Exception as exc:
                    side.result.error = side.result.error or f"io: {exc!r}"
                    side.eof = side.wr_closed = True
                    side.sent = len(side.out)
                if side.eof and side.wr_closed:
                    self.poller.unregister(fd)
                    with self.lock:
                        del self.sides[fd]
                    side.finish(own_cookie)
                elif side.sent >= len(side.out):
                    self.poller.modify(fd, self._mask(read=True, write=False))


# ---- the two programs ---------------------------------------------------------------------


def make_plan(seed: int, conn_id: int, args: argparse.Namespace) -> Plan:
    """Every fourth connection writes small chunks with long pauses, so it lives long enough
    that it must switch."""
    if conn_id % 4 == 0:
        return Plan(random.Random(seed), 0.4, min(args.max_chunk, 4096), pause_max=0.03)
    return Plan(random.Random(seed), args.pause, args.max_chunk)


def sizes_for(rng: random.Random, max_bytes: int) -> int:
    roll = rng.random()
    if roll < 0.3:
        return rng.randint(0, 64)  # short: stays under most thresholds
    if roll < 0.8:
        return rng.randint(64, 65536)
    return rng.randint(65536, max_bytes)


def summarize(role: str, results: list[ConnResult], started: float, expected_conns: int) -> int:
    bad = [r for r in results if not r.ok]
    missing = expected_conns - len(results)
    summary = {
        "role": role,
        "connections": len(results),
        "ok": len(results) - len(bad),
        "bad": len(bad),
        "missing": missing,
        "switched": sum(r.switched for r in results),
        "bytes": sum(r.sent + r.received for r in results),
        "seconds": round(time.monotonic() - started, 3),
        # Never connected (connect() itself failed), with their errors: these carry no byte.
        "unconnected": collections.Counter(r.error for r in bad if not r.endpoints),
        "failures": [asdict(r) for r in bad[:20]],  # the first few, in full
        "per_conn": {r.conn_id: [r.sent, r.received, r.switched, r.seconds] for r in results},
    }
    print(json.dumps(summary), flush=True)
    return 0 if not bad and missing == 0 else 1


def serve(args: argparse.Namespace) -> int:
    own = own_netns_cookie()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.bind, args.port))
    listener.listen(1024)
    print(json.dumps({"role": "server", "listening": args.port}), flush=True)
    results: list[ConnResult] = []
    threads: list[threading.Thread] = []
    loop = Loop(args.style) if args.style != "blocking" else None
    started = time.monotonic()
    deadline = started + args.timeout
    if loop is not None:
        loop_thread = threading.Thread(
            target=loop.run,
            args=(own, lambda: len(results) == args.connections and not loop.sides, deadline),
            daemon=True,
        )
        loop_thread.start()
    listener.settimeout(1.0)
    while len(results) < args.connections and time.monotonic() < deadline:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        try:
            header = conn.recv(HEADER.size, socket.MSG_WAITALL)
        except OSError as exc:  # reset before its header: a failed connection, id unknown
            results.append(
                ConnResult(-1, error=f"header: {exc!r}", done=True, endpoints=endpoints(conn))
            )
            conn.close()
            continue
        if len(header) != HEADER.size:
            conn.close()
            continue
        magic, conn_id, seed, c2s, s2c = HEADER.unpack(header)
        if magic != MAGIC:
            print(json.dumps({"role": "server", "error": "bad header"}), flush=True)
            return 1
        result = ConnResult(conn_id, expected=c2s, endpoints=endpoints(conn))
        results.append(result)
        plan = make_plan(seed ^ 0x5EED, conn_id, args)
        side = Side(conn, result, stream(seed, 1, s2c), stream(seed, 0, c2s), plan)
        if loop is None:
            t = threading.Thread(target=run_blocking, args=(side, own), daemon=True)
            t.start()
            threads.append(t)
        else:
            loop.add(side)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if loop is not None:
        loop_thread.join(max(0.0, deadline - time.monotonic()))
    for r in results:
        if not r.done:
            r.error = r.error or "hung past the deadline"
    return summarize("server", results, started, args.connections)


def client(args: argparse.Namespace) -> int:
    own = own_netns_cookie()
    rng = random.Random(args.seed)
    results: list[ConnResult] = []
    threads: list[threading.Thread] = []
    loop = Loop(args.style) if args.style != "blocking" else None
    started = time.monotonic()
    deadline = started + args.timeout
    if loop is not None:
        loop_thread = threading.Thread(
            target=loop.run,
            args=(
                own,
                lambda: all(r.done for r in results) and len(results) == args.connections,
                deadline,
            ),
            daemon=True,
        )
        loop_thread.start()
    for conn_id in range(args.connections):
        while sum(not r.done for r in results) >= args.concurrency:
            if time.monotonic() > deadline:
                break
            time.sleep(0.002)
        seed = rng.getrandbits(48)
        c2s, s2c = sizes_for(rng, args.max_bytes), sizes_for(rng, args.max_bytes)
        result = ConnResult(conn_id, expected=s2c)
        try:
            source = (args.source, 0) if args.source else None
            sock = socket.create_connection((args.host, args.port), 10, source)
        except OSError as exc:
            result.error, result.done = f"connect: {exc}", True
            results.append(result)
            continue
        sock.settimeout(None)
        result.endpoints = endpoints(sock)
        results.append(result)
        header = HEADER.pack(MAGIC, conn_id, seed, c2s, s2c)
        try:
            sock.sendall(header)
        except OSError as exc:  # a reset connection is that connection's failure, not the run's
            result.error, result.done = f"header: {exc!r}", True
            sock.close()
            continue
        plan = make_plan(seed, conn_id, args)
        side = Side(sock, result, stream(seed, 0, c2s), stream(seed, 1, s2c), plan)
        if loop is None:
            t = threading.Thread(target=run_blocking, args=(side, own), daemon=True)
            t.start()
            threads.append(t)
        else:
            loop.add(side)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if loop is not None:
        loop_thread.join(max(0.0, deadline - time.monotonic()))
    for r in results:
        if not r.done:
            r.error = r.error or "hung past the deadline"
    return summarize("client", results, started, args.connections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shuntflow.torture", description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    for name in ("server", "client"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, default=7700)
        p.add_argument("--connections", type=int, default=100)
        p.add_argument("--style", choices=STYLES, default="blocking")
        p.add_argument("--timeout", type=float, default=120.0, help="hang bound, seconds")
        p.add_argument("--pause", type=float, default=0.02, help="chance of a pause per chunk")
        p.add_argument("--max-chunk", type=int, default=MAX_CHUNK)
    sub.choices["server"].add_argument("--bind", default="0.0.0.0")
    c = sub.choices["client"]
    c.add_argument("--host", required=True)
    c.add_argument("--source", default="", help="local address to connect from")
    c.add_argument("--concurrency", type=int, default=32)
    c.add_argument("--max-bytes", type=int, default=1 << 20)
    c.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        return serve(args) if args.role == "server" else client(args)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"torture: port {args.port} is in use", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
