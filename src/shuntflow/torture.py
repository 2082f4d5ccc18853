"""Integrity torture test: a client/server pair that checks every byte across switches.

Run both ends under the preload library (``shuntflow exec ... -- python -m shuntflow.torture``).
Each connection carries, in both directions at once, a pseudo-random stream derived from a
per-connection seed, written in chunks from 1 B to 1 MiB with random pauses, then half-closed.
Each end checks every byte it reads against the stream it expects, and that the stream ends
exactly at EOF. At the end each side prints one JSON summary line; the exit code is non-zero on
any mismatch, loss, duplicate, reset or hang.

Every data call picks its entry point at random (seeded: the client's --seed, and each
connection's seed in its header, replay the choices): send/recv, write/read, writev/readv,
sendmsg/recvmsg with several buffers, sendto/recvfrom, sendmmsg/recvmmsg, sendfile from a file,
a recvmsg MSG_PEEK whose bytes the next read must return, a recv MSG_WAITALL that must come back
whole unless the stream ends, and a FIONREAD whose count the next read must deliver. The summary
counts calls and bytes per entry point: all of them, those of connections that ended switched,
and those made while the socket already was the host connection.

`mesh` is both ends at once, for an all-to-all run: one process per container serves every peer's
client and, once told `go` on stdin, opens one connection to every peer's server at once, all
in one event loop (see shuntflow.bench.scale).

Which path a connection ended on is read from the socket itself: SO_NETNS_COOKIE names the
network namespace the socket was created in, so a connection that was switched reports the host
namespace's cookie (--host-cookie), not the container's. A socket that reports neither, or whose
cookie cannot be read, is a failed connection.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import random
import select
import socket
import struct
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO, Any

SO_NETNS_COOKIE = 71
HEADER = struct.Struct("<4sIQQQ")  # magic, conn id, seed, client->server, server->client bytes
MAGIC = b"SFT1"
STYLES = ("blocking", "epoll", "epoll-et", "poll")
MAX_CHUNK = 1 << 20
# The library's data entry points, as the calls that reach them (peek, waitall and fionread are
# recvmsg/recv/ioctl variants whose results the next read must agree with).
PLAIN_READS = ("recv", "read", "readv", "recvmsg", "recvfrom", "recvmmsg")
READ_CALLS = (*PLAIN_READS, "peek", "waitall", "fionread")
WRITE_CALLS = ("send", "write", "writev", "sendmsg", "sendto", "sendfile", "sendmmsg")
CALLS = READ_CALLS + WRITE_CALLS
MSG_WAITFORONE = 0x10000


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


# The global scope (dlopen(NULL)), not libc.so.6 by name: under LD_PRELOAD it finds the
# preloaded library's wrappers first, which a handle on libc itself would bypass.
_LIBC = ctypes.CDLL(None, use_errno=True)
_recvmmsg = _LIBC.recvmmsg
_recvmmsg.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_Mmsghdr),
    ctypes.c_uint,
    ctypes.c_int,
    ctypes.c_void_p,
]
_recvmmsg.restype = ctypes.c_int
_sendmmsg = _LIBC.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int


def _mmsg_vector(messages: list[list[tuple[int, int]]]) -> tuple[Any, list[Any]]:
    """An mmsghdr array, one message per list of (address, length) iovecs, and the ctypes
    objects that must outlive the call."""
    vec = (_Mmsghdr * len(messages))()
    keep: list[Any] = [vec]
    for i, iovs in enumerate(messages):
        arr = (_Iovec * len(iovs))(*[_Iovec(addr, n) for addr, n in iovs])
        keep.append(arr)
        vec[i].msg_hdr.msg_iov = ctypes.cast(arr, ctypes.POINTER(_Iovec))
        vec[i].msg_hdr.msg_iovlen = len(iovs)
    return vec, keep


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")  # EAGAIN makes a BlockingIOError


def split(rng: random.Random, n: int, most: int) -> list[int]:
    """n as 1..most positive parts."""
    k = rng.randint(1, max(1, min(most, n)))
    cuts = sorted(rng.sample(range(1, n), k - 1)) if k > 1 else []
    return [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]


def netns_cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def own_netns_cookie() -> int:
    with socket.socket() as probe:
        return netns_cookie(probe)


@dataclass(frozen=True)
class Cookies:
    """The namespace cookies a connection's socket may report: this process's (the overlay) and
    its host's (0: not given, then any other cookie counts as the host's)."""

    own: int
    host: int = 0

    def on_host(self, cookie: int) -> bool:
        if cookie == self.own:
            return False
        if self.host and cookie != self.host:
            raise ValueError(f"socket of namespace cookie {cookie}: neither own nor the host's")
        return True


def endpoints(sock: socket.socket) -> str:
    try:
        return f"{sock.getsockname()[1]}->{sock.getpeername()[1]}"
    except OSError:
        return "?"


def local_endpoint(sock: socket.socket, port: int) -> str:
    """`endpoints` of a socket whose connect failed: its local port, if bound, and `port`."""
    try:
        local = sock.getsockname()[1]
    except OSError:
        return ""
    return f"{local}->{port}" if local else ""


def stream(seed: int, direction: int, size: int) -> bytes:
    return random.Random(seed * 2 + direction).randbytes(size)


@dataclass
class ConnResult:
    conn_id: int
    seed: int = 0
    sent: int = 0
    received: int = 0
    expected: int = 0
    first_bad: int = -1
    bad_bytes: int = 0  # bytes read that differ from the stream, or past its end, or missing
    error: str = ""
    cookie_error: str = ""
    waitall_short: int = 0  # MSG_WAITALL reads that returned short mid-stream
    switched: bool = False
    done: bool = False
    started: float = field(default_factory=time.monotonic)
    endpoints: str = ""
    peer: str = ""  # the other end's overlay address
    seconds: float = 0.0
    # per call name: calls, bytes, calls made on the host socket, their bytes
    io: dict[str, list[int]] = field(default_factory=lambda: {n: [0, 0, 0, 0] for n in CALLS})

    @property
    def ok(self) -> bool:
        return (
            self.done
            and not self.error
            and not self.cookie_error
            and self.first_bad < 0
            and self.received == self.expected
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


class Violation(Exception):
    """A call returned what its contract rules out (recorded in the result before raising)."""


@dataclass
class Side:
    """One end of one connection: what it must send and what it must receive, and the calls
    that move it (each picks its entry point from `reads`/`writes` with the side's own RNGs)."""

    sock: socket.socket
    result: ConnResult
    out: bytes
    expect: bytes
    plan: Plan
    cookies: Cookies
    blocking: bool = True
    reads: tuple[str, ...] = READ_CALLS
    writes: tuple[str, ...] = WRITE_CALLS
    sent: int = 0
    got: int = 0
    wr_closed: bool = False
    eof: bool = False
    resume_at: float = 0.0
    on_host: bool = False
    last_read: str = ""  # the kind of the last read call, for the report of an early EOF
    file: IO[bytes] | None = None
    peer: Any = None
    rrng: random.Random = field(default_factory=random.Random)
    wrng: random.Random = field(default_factory=random.Random)

    def seed_calls(self, seed: int) -> None:
        self.rrng = random.Random(f"{seed}/read")
        self.wrng = random.Random(f"{seed}/write")

    # -- checking ----------------------------------------------------------------------------

    def check(self, data: bytes) -> None:
        end = self.got + len(data)
        if end > len(self.expect):
            self.fail_at(len(self.expect), f"{end - len(self.expect)} bytes past the end")
            self.result.bad_bytes += end - max(len(self.expect), self.got)
            data = data[: max(0, len(self.expect) - self.got)]
            end = self.got + len(data)
        want = self.expect[self.got : end]
        if data != want:
            wrong = [i for i, (a, b) in enumerate(zip(data, want, strict=True)) if a != b]
            self.result.bad_bytes += len(wrong)
            self.fail_at(self.got + wrong[0], "mismatch")
        self.got = end
        self.result.received = end

    def fail_at(self, offset: int, why: str) -> None:
        if self.result.first_bad < 0:
            self.result.first_bad = offset
            self.result.error = self.result.error or f"{why} at byte {offset}"

    def violation(self, why: str) -> Violation:
        self.fail_at(self.got, why)
        return Violation(why)

    def host_now(self) -> bool:
        """Whether the fd is the host connection now (once it is, it stays so)."""
        if not self.on_host:
            try:
                self.on_host = self.cookies.on_host(netns_cookie(self.sock))
            except (OSError, ValueError) as exc:
                self.result.cookie_error = self.result.cookie_error or repr(exc)
                raise
        return self.on_host

    def count(self, name: str, nbytes: int, host: bool) -> None:
        c = self.result.io[name]
        c[0] += 1
        c[1] += nbytes
        if host:
            c[2] += 1
            c[3] += nbytes

    # -- reading -----------------------------------------------------------------------------

    def read_once(self, want: int) -> bytes:
        """One read call of a random kind for up to `want` bytes, checked: b"" at EOF.
        BlockingIOError when a non-blocking socket has nothing yet."""
        name = self.last_read = self.rrng.choice(self.reads)
        host = self.host_now()
        data = self._read(name, want)
        self.count(name, len(data), host)
        self.check(data)
        return data

    def _read(self, name: str, want: int) -> bytes:
        fd = self.sock.fileno()
        if name == "recv":
            return self.sock.recv(want)
        if name == "read":
            return os.read(fd, want)
        if name == "recvfrom":
            return self.sock.recvfrom(want)[0]
        if name in ("readv", "recvmsg"):
            bufs = [bytearray(n) for n in split(self.rrng, want, 4)]
            n = os.readv(fd, bufs) if name == "readv" else self.sock.recvmsg_into(bufs)[0]
            return b"".join(bufs)[:n]
        if name == "recvmmsg":
            return self._recvmmsg(want)
        if name == "waitall":
            data = self.sock.recv(want, socket.MSG_WAITALL)
            # Whole, unless the stream ends within it (a non-blocking socket ignores the flag),
            # or a signal or an error cut it short, which the kernel allows: counted, and the
            # caller asserts none where nothing signals the process or resets a connection.
            if self.blocking and 0 < len(data) < want and self.got + len(data) != len(self.expect):
                self.result.waitall_short += 1
            return data
        if name == "peek":
            buf = bytearray(want)
            n = self.sock.recvmsg_into([buf], 0, socket.MSG_PEEK)[0]
            data = self._follow(want, f"a peek of {n} bytes")
            if (n == 0) != (len(data) == 0) or data[:n] != buf[:n]:
                raise self.violation(f"peeked {n} bytes, then read {len(data)} other ones")
            return data
        if name == "fionread":
            avail = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, bytes(4)))[0]
            data = self._follow(want, f"FIONREAD {avail}") if avail > 0 else self._follow(want)
            # What the fd's socket holds is the next read's, on either socket: the switch point
            # is only taken once the overlay's bytes are all read. A 0 promises nothing: at the
            # switch point it is the drained overlay's count while the host socket holds bytes.
            if avail > 0 and len(data) < min(avail, want):
                raise self.violation(f"FIONREAD said {avail}, then read {len(data)} of {want}")
            return data
        raise ValueError(f"no read call {name!r}")

    def _follow(self, want: int, after: str = "") -> bytes:
        """The read after a peek or FIONREAD, of a plain kind; EAGAIN is a violation `after`
        something said bytes (or the end) were there."""
        name = self.rrng.choice(tuple(n for n in PLAIN_READS if n in self.reads) or PLAIN_READS)
        self.last_read += f" then {name}"
        try:
            return self._read(name, want)
        except BlockingIOError:
            if after:
                raise self.violation(f"EAGAIN after {after}") from None
            raise

    def _recvmmsg(self, want: int) -> bytes:
        buf = bytearray(want)
        base = ctypes.addressof((ctypes.c_char * want).from_buffer(buf))
        messages: list[list[tuple[int, int]]] = []
        starts: list[int] = []
        at = 0
        for size in split(self.rrng, want, 3):
            starts.append(at)
            iovs = []
            for part in split(self.rrng, size, 2):
                iovs.append((base + at, part))
                at += part
            messages.append(iovs)
        vec, _keep = _mmsg_vector(messages)
        # A blocking socket would wait for every message: MSG_WAITFORONE stops after the first.
        flags = MSG_WAITFORONE if self.blocking or self.rrng.random() < 0.5 else 0
        rc = _recvmmsg(self.sock.fileno(), vec, len(messages), flags, None)
        if rc < 0:
            _raise_errno("recvmmsg")
        lens = [int(vec[i].msg_len) for i in range(rc)]
        data = b"".join(bytes(buf[starts[i] : starts[i] + lens[i]]) for i in range(rc))
        # TCP fills the messages in stream order, and an empty one says the stream ended there
        # (each further message of the call is empty too): the end, as 0 is to the other calls,
        # which the next read reports again. Where the stream ended is checked as for them.
        if 0 in lens and any(lens[lens.index(0) :]):
            raise self.violation(f"recvmmsg: bytes after an empty message {lens}")
        return data

    # -- writing -----------------------------------------------------------------------------

    def write_once(self, n: int) -> int:
        """One write call of a random kind for up to the next n bytes of the stream: bytes
        written. BlockingIOError when a non-blocking socket takes nothing now."""
        name = self.wrng.choice(self.writes)
        host = self.host_now()
        done = self._write(name, self.sent, n)
        if done <= 0:
            raise self.violation(f"{name} of {n} bytes returned {done}")
        self.count(name, done, host)
        self.sent += done
        return done

    def _pieces(self, view: memoryview) -> list[memoryview]:
        parts, at = [], 0
        for size in split(self.wrng, len(view), 4):
            parts.append(view[at : at + size])
            at += size
        return parts

    def _write(self, name: str, at: int, n: int) -> int:
        view = memoryview(self.out)[at : at + n]
        fd = self.sock.fileno()
        if name == "send":
            return self.sock.send(view)
        if name == "write":
            return os.write(fd, view)
        if name == "writev":
            return os.writev(fd, self._pieces(view))
        if name == "sendmsg":
            return self.sock.sendmsg(self._pieces(view))
        if name == "sendto":
            if self.peer is None:
                self.peer = self.sock.getpeername()
            return self.sock.sendto(view, self.peer)
        if name == "sendfile":
            if self.file is None:
                # The whole stream, written once: the socket keeps references to the file's
                # pages until they are sent, so a page must never change after a sendfile.
                self.file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by finish)
                self.file.write(self.out)
                self.file.flush()
            return os.sendfile(fd, self.file.fileno(), at, n)  # short: the caller goes on
        if name == "sendmmsg":
            return self._sendmmsg(at, n)
        raise ValueError(f"no write call {name!r}")

    def _sendmmsg(self, at: int, n: int) -> int:
        base = ctypes.cast(ctypes.c_char_p(self.out), ctypes.c_void_p).value
        assert base is not None
        messages: list[list[tuple[int, int]]] = []
        sizes = split(self.wrng, n, 3)
        pos = at
        for size in sizes:
            iovs = []
            for part in split(self.wrng, size, 2):
                iovs.append((base + pos, part))
                pos += part
            messages.append(iovs)
        vec, _keep = _mmsg_vector(messages)
        rc = _sendmmsg(self.sock.fileno(), vec, len(messages), 0)
        if rc < 0:
            _raise_errno("sendmmsg")
        lens = [int(vec[i].msg_len) for i in range(rc)]
        # A message sent in part and a later one sent at all would leave a hole in the stream.
        if any(lens[i] != sizes[i] for i in range(rc - 1)):
            raise self.violation(f"sendmmsg: message sent in part before others {lens} {sizes}")
        return sum(lens)

    def finish(self) -> None:
        try:
            self.result.switched = self.cookies.on_host(netns_cookie(self.sock))
        except (OSError, ValueError) as exc:
            # Evidence that cannot be read proves nothing: the connection fails.
            self.result.cookie_error = self.result.cookie_error or repr(exc)
        if self.got < len(self.expect):
            self.result.bad_bytes += len(self.expect) - self.got
        if self.got != len(self.expect) and not self.result.error:
            self.result.error = (
                f"short stream: {self.got} of {len(self.expect)} bytes (EOF: {self.last_read})"
            )
        self.result.sent = self.sent
        if not self.result.endpoints:
            self.result.endpoints = endpoints(self.sock)
        self.result.seconds = round(time.monotonic() - self.result.started, 4)
        if self.file is not None:
            self.file.close()
        self.sock.close()
        # Done only once its fds are closed: the client's next connection may take their place
        # (with `--concurrency 1` at the fd limit, one fd is all it has).
        self.result.done = True


# ---- blocking style: one reader and one writer thread per connection ----------------------


def run_blocking(side: Side) -> None:
    def writer() -> None:
        try:
            while side.sent < len(side.out):
                end = side.sent + side.plan.chunk(len(side.out) - side.sent)
                while side.sent < end:  # a short write: the next call, of any kind, goes on
                    side.write_once(end - side.sent)
                side.plan.maybe_pause()
            side.sock.shutdown(socket.SHUT_WR)
        except Exception as exc:  # any failure, the tool's own included, must fail the run
            side.result.error = side.result.error or f"write: {exc!r}"

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        while side.read_once(side.plan.chunk(MAX_CHUNK)):
            pass
    except Exception as exc:
        side.result.error = side.result.error or f"read: {exc!r}"
    thread.join()
    side.finish()


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
        side.blocking = False
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
                side.write_once(n)
            except BlockingIOError:
                return
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
                data = side.read_once(side.plan.chunk(MAX_CHUNK))
            except BlockingIOError:
                return
            if not data:
                side.eof = True
                return

    def _resume(self) -> None:
        """Re-arm (MOD) writability for paused senders whose pause is over."""
        now = time.monotonic()
        with self.lock:
            paused = [s for s in self.sides.values() if 0 < s.resume_at <= now]
        for side in paused:
            side.resume_at = 0.0
            if not side.wr_closed:  # more to send, or at least the half-close after the last
                self.poller.modify(side.sock.fileno(), self._mask(read=True, write=True))

    def run(self, until: Callable[[], bool], deadline: float) -> None:
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
                    side.finish()
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


def new_side(
    sock: socket.socket,
    result: ConnResult,
    out: bytes,
    expect: bytes,
    plan: Plan,
    cookies: Cookies,
    args: argparse.Namespace,
) -> Side:
    side = Side(sock, result, out, expect, plan, cookies)
    side.reads = tuple(n for n in args.calls if n in READ_CALLS) or READ_CALLS
    side.writes = tuple(n for n in args.calls if n in WRITE_CALLS) or WRITE_CALLS
    side.seed_calls(result.seed)
    return side


def io_totals(results: list[ConnResult]) -> dict[str, dict[str, int]]:
    """Per call name: calls and bytes; those of connections that ended switched; those made on
    the host socket."""
    keys = ("calls", "bytes", "host_calls", "host_bytes", "switched_calls", "switched_bytes")
    totals = {name: dict.fromkeys(keys, 0) for name in CALLS}
    for r in results:
        for name, (calls, nbytes, host_calls, host_bytes) in r.io.items():
            t = totals[name]
            t["calls"] += calls
            t["bytes"] += nbytes
            t["host_calls"] += host_calls
            t["host_bytes"] += host_bytes
            if r.switched:
                t["switched_calls"] += calls
                t["switched_bytes"] += nbytes
    return totals


def summarize(
    role: str, results: list[ConnResult], started: float, expected_conns: int, seed: int | None
) -> int:
    summary = summary_of(role, results, started, expected_conns, seed)
    print(json.dumps(summary), flush=True)
    return 0 if summary["bad"] == 0 and summary["missing"] == 0 else 1


def summary_of(
    role: str,
    results: list[ConnResult],
    started: float,
    expected_conns: int,
    seed: int | None,
    per_conn: bool = True,
) -> dict[str, Any]:
    """The counts of one end's connections; `per_conn`: with a list per connection (else per
    peer address: connections, switched, bytes)."""
    bad = [r for r in results if not r.ok]
    missing = expected_conns - len(results)
    io = io_totals(results)
    summary = {
        "role": role,
        "connections": len(results),
        "ok": len(results) - len(bad),
        "bad": len(bad),
        "missing": missing,
        "switched": sum(r.switched for r in results),
        "cookie_errors": sum(bool(r.cookie_error) for r in results),
        "waitall_short": sum(r.waitall_short for r in results),
        "seed": seed,
        "io": io,
        # Bytes this end wrote / read with calls made once its fd was the host connection.
        "host_sent": sum(io[n]["host_bytes"] for n in WRITE_CALLS),
        "host_received": sum(io[n]["host_bytes"] for n in READ_CALLS),
        "bytes": sum(r.sent + r.received for r in results),
        "received": sum(r.received for r in results),
        "bad_bytes": sum(r.bad_bytes for r in results),
        "seconds": round(time.monotonic() - started, 3),
        # Never connected (connect() itself failed), with their errors: these carry no byte.
        "unconnected": collections.Counter(r.error for r in bad if r.error.startswith("connect:")),
        "failures": [asdict(r) for r in bad[: 20 if per_conn else 5]],  # the first few, in full
    }
    if per_conn:
        summary["per_conn"] = {
            r.conn_id: [r.sent, r.received, r.switched, r.seconds] for r in results
        }
    else:
        peers: dict[str, list[int]] = {}
        for r in results:
            p = peers.setdefault(r.peer, [0, 0, 0])
            p[0] += 1
            p[1] += r.switched
            p[2] += r.sent + r.received
        summary["per_peer"] = peers
    return summary


class BadHeader(Exception):
    """A connection that does not start with the torture header: not one of ours."""


def accepted(
    conn: socket.socket,
    args: argparse.Namespace,
    cookies: Cookies,
    results: list[ConnResult],
    plan_for: Callable[[int, int, argparse.Namespace], Plan],
    header_timeout: float | None = None,
) -> Side | None:
    """The server end of an accepted connection, once its header is read (its result appended
    to `results`); None if it ended or failed before, or sent no header in `header_timeout`."""
    conn.settimeout(header_timeout)
    try:
        header = conn.recv(HEADER.size, socket.MSG_WAITALL)
        conn.settimeout(None)
    except OSError as exc:  # reset before its header: a failed connection, id unknown
        results.append(
            ConnResult(-1, error=f"header: {exc!r}", done=True, endpoints=endpoints(conn))
        )
        conn.close()
        return None
    if len(header) != HEADER.size:
        conn.close()
        return None
    magic, conn_id, seed, c2s, s2c = HEADER.unpack(header)
    if magic != MAGIC:
        conn.close()
        raise BadHeader
    result = ConnResult(conn_id, seed ^ 0x5EED, expected=c2s, endpoints=endpoints(conn))
    results.append(result)
    plan = plan_for(result.seed, conn_id, args)
    return new_side(conn, result, stream(seed, 1, s2c), stream(seed, 0, c2s), plan, cookies, args)


def serve(args: argparse.Namespace) -> int:
    cookies = Cookies(own_netns_cookie(), args.host_cookie)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.bind, args.port))
    listener.listen(1024)
    # The port bound, which differs from --port 0.
    print(json.dumps({"role": "server", "listening": listener.getsockname()[1]}), flush=True)
    results: list[ConnResult] = []
    threads: list[threading.Thread] = []
    loop = Loop(args.style) if args.style != "blocking" else None
    started = time.monotonic()
    deadline = started + args.timeout
    if loop is not None:
        loop_thread = threading.Thread(
            target=loop.run,
            args=(lambda: len(results) == args.connections and not loop.sides, deadline),
            daemon=True,
        )
        loop_thread.start()
    listener.settimeout(1.0)
    while len(results) < args.connections and time.monotonic() < deadline:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        try:
            side = accepted(conn, args, cookies, results, make_plan)
        except BadHeader:
            print(json.dumps({"role": "server", "error": "bad header"}), flush=True)
            return 1
        if side is None:
            continue
        if loop is None:
            t = threading.Thread(target=run_blocking, args=(side,), daemon=True)
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
    return summarize("server", results, started, args.connections, None)


def client(args: argparse.Namespace) -> int:
    cookies = Cookies(own_netns_cookie(), args.host_cookie)
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
        result = ConnResult(conn_id, seed, expected=s2c)
        sock = None
        try:
            sock = socket.socket()
            if args.source:
                sock.bind((args.source, 0))
            sock.settimeout(10)
            sock.connect((args.host, args.port))
        except OSError as exc:
            result.error, result.done = f"connect: {exc}", True
            if sock is not None:
                # The local port, if it got one, names the connection: its peer may have
                # accepted it, and the library switched it, before the connect's result was read.
                result.endpoints = local_endpoint(sock, args.port)
                sock.close()
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
        side = new_side(
            sock, result, stream(seed, 0, c2s), stream(seed, 1, s2c), plan, cookies, args
        )
        if loop is None:
            t = threading.Thread(target=run_blocking, args=(side,), daemon=True)
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
    return summarize("client", results, started, args.connections, args.seed)


def mesh_plan(seed: int, _conn_id: int, args: argparse.Namespace) -> Plan:
    """Every connection alike: chunks up to --max-chunk with a chance of a pause after each, so
    that it lives long enough to switch while thousands of others do too."""
    return Plan(random.Random(seed), args.pause, args.max_chunk, pause_max=args.pause_max)


def mesh(args: argparse.Namespace) -> int:
    """Both ends of an all-to-all run in one process: accept one connection from every peer,
    and on `go` (a stdin line) connect to every peer at once; one event loop for all of them."""
    cookies = Cookies(own_netns_cookie(), args.host_cookie)
    peers = [p for p in args.peers.split(",") if p]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.bind, args.port))
    listener.listen(1024)
    print(json.dumps({"role": "mesh", "listening": args.port}), flush=True)
    served: list[ConnResult] = []
    opened: list[ConnResult] = []
    loop = Loop(args.style)
    # Peers may connect before our own `go`: the accept side runs from the start.
    started = time.monotonic()
    deadline = started + args.timeout
    bad_header: list[bool] = []

    def accept_all() -> None:
        listener.settimeout(1.0)
        while len(served) < len(peers) and time.monotonic() < deadline:
            try:
                conn, addr = listener.accept()
            except TimeoutError:
                continue
            before = len(served)
            try:
                # One peer that never sends its header must not hold up the others' accepts.
                side = accepted(conn, args, cookies, served, mesh_plan, header_timeout=30)
            except BadHeader:
                bad_header.append(True)
                continue
            if len(served) > before:
                served[-1].peer = addr[0]
            if side is not None:
                loop.add(side)

    acceptor = threading.Thread(target=accept_all, daemon=True)
    acceptor.start()
    loop_thread = threading.Thread(
        target=loop.run,
        args=(
            lambda: (
                len(served) == len(opened) == len(peers) and all(r.done for r in served + opened)
            ),
            deadline,
        ),
        daemon=True,
    )
    loop_thread.start()
    if sys.stdin.readline().strip() != "go":
        print(json.dumps({"role": "mesh", "error": "no go on stdin"}), flush=True)
        return 1
    client_started = time.monotonic()
    rng = random.Random(args.seed)
    # Every connect at once (non-blocking), each then sent its header and handed to the loop as
    # it completes; the kernel's own SYN retries bound each one, the run's deadline all of them.
    connecting: dict[int, tuple[socket.socket, ConnResult, int, int]] = {}
    poller = select.poll()
    for conn_id, peer in enumerate(peers):
        seed = rng.getrandbits(48)
        c2s = rng.randint(args.min_bytes, args.max_bytes)
        s2c = rng.randint(args.min_bytes, args.max_bytes)
        result = ConnResult(conn_id, seed, expected=s2c, peer=peer)
        opened.append(result)
        sock = socket.socket()
        try:
            sock.bind((args.bind, 0))
            sock.setblocking(False)
            rc = sock.connect_ex((peer, args.port))
        except OSError as exc:
            rc = exc.errno or errno.EIO
        if rc not in (0, errno.EINPROGRESS):
            result.error, result.done = f"connect: {os.strerror(rc)}", True
            sock.close()
            continue
        connecting[sock.fileno()] = (sock, result, c2s, s2c)
        poller.register(sock.fileno(), select.POLLOUT)
    while connecting and time.monotonic() < deadline:
        for fd, _events in poller.poll(1000):
            sock, result, c2s, s2c = connecting.pop(fd)
            poller.unregister(fd)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            try:
                if err:
                    raise OSError(err, os.strerror(err))
                sock.setblocking(True)
                result.endpoints = endpoints(sock)
                sock.sendall(HEADER.pack(MAGIC, result.conn_id, result.seed, c2s, s2c))
            except OSError as exc:
                result.error, result.done = f"connect: {exc!r}", True
                sock.close()
                continue
            side = new_side(
                sock,
                result,
                stream(result.seed, 0, c2s),
                stream(result.seed, 1, s2c),
                mesh_plan(result.seed, result.conn_id, args),
                cookies,
                args,
            )
            loop.add(side)
    for sock, result, _c2s, _s2c in connecting.values():
        result.error, result.done = "connect: not connected by the deadline", True
        sock.close()
    acceptor.join(max(0.0, deadline - time.monotonic()))
    loop_thread.join(max(0.0, deadline - time.monotonic()))
    listener.close()
    for r in served + opened:
        if not r.done:
            r.error = r.error or "hung past the deadline"
    server = summary_of("server", served, started, len(peers), None, per_conn=False)
    client = summary_of("client", opened, client_started, len(peers), args.seed, per_conn=False)
    print(
        json.dumps(
            {"role": "mesh", "bad_headers": len(bad_header), "server": server, "client": client}
        ),
        flush=True,
    )
    intact = all(x["bad"] == 0 and x["missing"] == 0 for x in (server, client))
    return 0 if intact and not bad_header else 1


def calls_arg(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.split(",") if n)
    unknown = [n for n in names if n not in CALLS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown calls {unknown}; known: {','.join(CALLS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shuntflow.torture", description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    for name in ("server", "client", "mesh"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, default=7700)
        p.add_argument("--connections", type=int, default=100)
        p.add_argument("--style", choices=STYLES, default="blocking")
        p.add_argument("--timeout", type=float, default=120.0, help="hang bound, seconds")
        p.add_argument("--pause", type=float, default=0.02, help="chance of a pause per chunk")
        p.add_argument("--max-chunk", type=int, default=MAX_CHUNK)
        p.add_argument(
            "--host-cookie",
            type=int,
            default=0,
            help="SO_NETNS_COOKIE of the host namespace (else any other than our own counts)",
        )
        p.add_argument(
            "--calls",
            type=calls_arg,
            default=CALLS,
            help=f"comma-separated data calls to pick from (default all: {','.join(CALLS)})",
        )
    sub.choices["server"].add_argument("--bind", default="0.0.0.0")
    c = sub.choices["client"]
    c.add_argument("--host", required=True)
    c.add_argument("--source", default="", help="local address to connect from")
    c.add_argument("--concurrency", type=int, default=32)
    c.add_argument("--max-bytes", type=int, default=1 << 20)
    c.add_argument("--seed", type=int, default=1)
    m = sub.choices["mesh"]
    m.add_argument("--bind", required=True, help="this container's overlay address")
    m.add_argument("--peers", required=True, help="comma-separated overlay addresses to connect to")
    m.add_argument("--min-bytes", type=int, default=32 * 1024, help="per direction")
    m.add_argument("--max-bytes", type=int, default=64 * 1024, help="per direction")
    m.add_argument("--pause-max", type=float, default=0.02, help="longest pause, seconds")
    m.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.role == "mesh" and args.style == "blocking":
        parser.error("mesh runs one event loop: --style epoll, epoll-et or poll")
    roles = {"server": serve, "client": client, "mesh": mesh}
    try:
        return roles[args.role](args)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"torture: port {args.port} is in use", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
