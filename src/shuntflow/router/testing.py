# Test doubles for the router's neighbours: a fake preload library (Python, real SEQPACKET socket,
# real SCM_RIGHTS) and a handle on a router subprocess.
#
# Why in the package and not under tests/: the unit tests, the integration tests and a developer
# poking at a live router (python -i) all need the same well-behaved library stand-in, and it
# must track docs/wire.md exactly like the real one does; keeping it next to the router keeps it
# type-checked and in step with the protocol. Nothing in the router imports it.

from __future__ import annotations

import array
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shuntflow.native import router_command
from shuntflow.router.control import query
from shuntflow.wire import MSG_SIZE, Endpoint, Mode, Msg, MsgType, Status, Tuple4, WireError

Key = tuple[Endpoint, Endpoint]

# The cluster key every RouterProcess gets unless told otherwise, so routers of one test trust
# each other and a test can MAC its own frames with it.
TEST_KEY = b"shuntflow-router-tests-cluster-key-0123456789abcdef"


def write_key_file(path: Path, key: bytes = TEST_KEY) -> Path:
    """`key` in a 0600 file at `path` (replaced if present)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key)
    finally:
        os.close(fd)
    return path


@dataclass
class Result:
    msg: Msg
    sock: socket.socket | None


@dataclass
class ConnRow:
    tuple: Tuple4
    path: int
    overlay_bytes: int
    host_bytes: int


@dataclass
class FakeLibrary:
    """Speaks section 1 of docs/wire.md like libshuntflow.so would, from a Python thread.

    - claims (CLAIM_RES OK) every offered tuple in `owned` it does not hold a host fd for yet;
    - answers STATS_REQ with `rows` and `switches`;
    - keeps every SWITCH_RES (with its fd as a socket) in `results`, keyed by seq.

    Strict, as the real library must be: a frame it cannot parse, a frame a library never
    receives, an fd anywhere but on a SWITCH_RES OK (exactly one there), a SWITCH_RES OK without
    its fd, or one for a seq it never asked or claimed is a protocol error of the router. Each is
    kept in `errors`, and close() (so the `with` block) raises AssertionError on them.

    With `netns`, the channel is connected by a helper process inside that network namespace
    (which stays alive until close()), so the router's ownership check looks there: a test
    that holds real TCP connections in that namespace can then ask for them."""

    path: Path
    pid: int = field(default_factory=os.getpid)
    mode: Mode = Mode.SHUNTFLOW
    owned: set[Tuple4] = field(default_factory=set)
    answer_claims: bool = True
    claim_delay: float = 0.0
    rows: list[ConnRow] = field(default_factory=list)
    switches: tuple[int, int] = (0, 0)
    answer_stats: bool = True
    netns: str | None = None

    def __post_init__(self) -> None:
        self._helper: subprocess.Popen[bytes] | None = None
        self._helper_ctl: socket.socket | None = None
        if self.netns is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.sock.connect(str(self.path))
        else:
            self.sock, self._helper, self._helper_ctl = connect_from_netns(self.path, self.netns)
        self.results: dict[int, Result] = {}
        self.claims: list[Msg] = []
        self.host: dict[Key, socket.socket] = {}  # every host fd received, by tuple key
        self.extra_host: list[socket.socket] = []  # a second fd for a key already held: a bug
        self.closed_by_router = threading.Event()
        self.errors: list[str] = []  # the router's protocol errors towards this library
        self._asked: set[int] = set()  # seqs of our SWITCH_REQs and of claims we said OK to
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._seq = itertools.count(1)
        self._hello = threading.Event()
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()
        self.send(Msg(MsgType.HELLO, seq=0, pid=self.pid, arg=int(self.mode)))
        if not self._hello.wait(5):
            raise TimeoutError("no HELLO_ACK from the router")

    def send(self, msg: Msg) -> None:
        with self._send_lock:
            if msg.type is MsgType.SWITCH_REQ or (
                msg.type is MsgType.CLAIM_RES and msg.status == Status.OK
            ):
                self._asked.add(msg.seq)
            self.sock.send(msg.pack())

    def _error(self, what: str, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        self.errors.append(what)

    def request(self, t: Tuple4, seq: int | None = None) -> int:
        seq = next(self._seq) if seq is None else seq
        self.send(Msg(MsgType.SWITCH_REQ, seq=seq, tuple=t))
        return seq

    def wait_result(self, seq: int, timeout: float = 5.0) -> Result:
        deadline = time.monotonic() + timeout
        with self._cond:
            while seq not in self.results:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed_by_router.is_set():
                    raise TimeoutError(f"no SWITCH_RES for seq {seq}")
                self._cond.wait(left)
            return self.results[seq]

    def wait_host(self, keys: Sequence[Key], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(k in self.host for k in keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sum(k not in self.host for k in keys)
                    raise TimeoutError(f"{missing} of {len(keys)} host connections missing")
                self._cond.wait(left)

    def _reader(self) -> None:
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(
                    MSG_SIZE + 1, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC
                )
            except OSError:
                break
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds.extend(arr)
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                self._error(f"frame or fds truncated (flags {flags:#x}, {len(data)} B)", fds)
                continue
            if not data:
                if fds:
                    self._error(f"{len(fds)} fds on the channel's end", fds)
                break
            try:
                msg = Msg.unpack(data)
            except WireError as e:
                self._error(f"unparseable frame ({e}): {data.hex()}", fds)
                continue
            self._handle(msg, fds)
        self.closed_by_router.set()
        with self._cond:
            self._cond.notify_all()

    def _handle(self, msg: Msg, fds: list[int]) -> None:
        ok_switch = msg.type is MsgType.SWITCH_RES and msg.status == Status.OK
        if len(fds) != (1 if ok_switch else 0):
            self._error(f"{len(fds)} fds on {msg.type.name} status {msg.status}", fds)
            return
        if msg.type is MsgType.SWITCH_RES and msg.seq not in self._asked:
            self._error(f"SWITCH_RES for seq {msg.seq:#x}, never asked nor claimed", fds)
            return
        sock = socket.socket(fileno=fds[0]) if fds else None
        if msg.type is MsgType.HELLO_ACK:
            self._hello.set()
        elif msg.type is MsgType.SWITCH_RES:
            with self._cond:
                self.results[msg.seq] = Result(msg, sock)
                if sock is not None:
                    key = msg.tuple.key()
                    if key in self.host:
                        self.extra_host.append(sock)
                    else:
                        self.host[key] = sock
                self._cond.notify_all()
        elif msg.type is MsgType.CLAIM_REQ:
            self.claims.append(msg)
            if not self.answer_claims:
                return
            if self.claim_delay:
                time.sleep(self.claim_delay)
            with self._cond:
                mine = msg.tuple in self.owned and msg.tuple.key() not in self.host
            status = Status.OK if mine else Status.NOT_MINE
            with contextlib.suppress(OSError):  # closed meanwhile
                self.send(Msg(MsgType.CLAIM_RES, status, msg.seq, tuple=msg.tuple))
        elif msg.type is MsgType.STATS_REQ:
            if self.answer_stats:
                with contextlib.suppress(OSError):
                    self._answer_stats(msg)
        else:
            self._error(f"{msg.type.name} is not a frame the router sends a library", [])

    def _answer_stats(self, msg: Msg) -> None:
        for row in self.rows:
            self.send(
                Msg(
                    MsgType.CONN_INFO,
                    row.path,
                    msg.seq,
                    tuple=row.tuple,
                    arg=row.overlay_bytes,
                    arg2=row.host_bytes,
                )
            )
        done, failed = self.switches
        self.send(Msg(MsgType.STATS_END, seq=msg.seq, arg=done, arg2=failed))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(2)
        if self._helper_ctl is not None:
            self._helper_ctl.close()  # the helper's recv sees EOF and it exits
        if self._helper is not None:
            try:
                self._helper.wait(5)
            except subprocess.TimeoutExpired:
                self._helper.kill()
                self._helper.wait()
        with self._cond:
            for s in [*self.host.values(), *self.extra_host]:
                s.close()
            for r in self.results.values():
                if r.sock is not None:
                    r.sock.close()
        if self.errors:
            raise AssertionError(f"the router broke the library protocol: {self.errors}")

    def __enter__(self) -> FakeLibrary:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            self.close()
        except AssertionError:
            if exc_type is None:  # else the test's own failure is the one to report
                raise


# Runs in the namespace: connects the channel, hands it to the test, waits for the test's EOF.
_HELPER = """
import array, socket, sys
ctl = socket.socket(fileno=int(sys.argv[2]))
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
ctl.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]))])
s.close()
ctl.recv(1)
"""


def connect_from_netns(
    path: Path, netns: str
) -> tuple[socket.socket, subprocess.Popen[bytes], socket.socket]:
    """A router channel whose SO_PEERCRED names a live process in namespace `netns`."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    cmd = ["ip", "netns", "exec", netns, sys.executable, "-c", _HELPER, str(path)]
    proc = subprocess.Popen(
        [*cmd, str(theirs.fileno())], pass_fds=(theirs.fileno(),), preexec_fn=_die_with_parent
    )
    theirs.close()
    ours.settimeout(10)
    try:
        _data, anc, _flags, _ = ours.recvmsg(1, socket.CMSG_SPACE(4))
        fds = [
            fd
            for level, kind, payload in anc
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
            for fd in array.array("i", payload[: len(payload) - len(payload) % 4])
        ]
        if len(fds) != 1:
            raise RuntimeError(f"helper in {netns} passed {len(fds)} fds")
    except BaseException:
        ours.close()
        proc.kill()
        proc.wait()
        raise
    ours.settimeout(None)
    return socket.socket(fileno=fds[0]), proc, ours


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies (a killed pytest leaves no router)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class RouterProcess:
    """`python -m shuntflow.router ...` as a subprocess, ready when its control socket answers.

    It gets TEST_KEY (in a 0600 file next to its socket) unless `key_file` is given, and runs
    without the ownership check unless `owner_check`: the fake libraries of the router tests
    ask for tuples no process holds."""

    def __init__(
        self,
        socket_path: Path,
        host_ip: str,
        peer_port: int,
        extra: Sequence[str] = (),
        log_file: Path | None = None,
        netns: str | None = None,
        key_file: Path | None = None,
        owner_check: bool = False,
    ) -> None:
        if key_file is None:
            # In the nearest existing directory: the router creates its socket's own parents
            # (with modes the tests check).
            base = socket_path.parent
            while not base.exists():
                base = base.parent
            key_file = write_key_file(base / f"{socket_path.parent.name}-{socket_path.name}.key")
        self.key_file = key_file
        self.socket = socket_path
        self.control = socket_path.with_name(socket_path.name + ".ctl")
        self.log_file = log_file or socket_path.with_name(socket_path.name + ".log")
        cmd = [
            sys.executable,
            "-m",
            "shuntflow.router",
            "--socket",
            str(socket_path),
            "--host-ip",
            host_ip,
            "--peer-port",
            str(peer_port),
            "--log-file",
            str(self.log_file),
            "--cluster-key",
            str(key_file),
            "--owner-check" if owner_check else "--no-owner-check",
            # Fake libraries on loopback: no kernel guard either, unless ownership is real.
            "--socket-guard" if owner_check else "--no-socket-guard",
            *extra,
        ]
        cmd = router_command(cmd)
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                _out, err = self.proc.communicate()
                raise RuntimeError(f"router exited {self.proc.returncode}: {err.decode()}")
            try:
                query(self.control, "ping", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError("router did not come up") from None
                time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fd_count(self) -> int:
        """Open fds, without control connections: the one a status query just used stays open
        until the router's control thread has seen the client close it, a moment later on a
        loaded machine, and is no fd the router keeps."""
        return sum(
            1
            for what in self.fds().values()
            if not (what.startswith("unix ") and what.endswith(".ctl") and " st=03 " in what)
        )

    def fds(self) -> dict[int, str]:
        """fd number -> what it is (readlink of /proc/PID/fd/N, sockets with their addresses)."""
        out: dict[int, str] = {}
        base = f"/proc/{self.proc.pid}/fd"
        sockets = self._socket_table()
        for name in os.listdir(base):
            with contextlib.suppress(OSError):
                target = os.readlink(f"{base}/{name}")
                inode = target.removeprefix("socket:[").removesuffix("]")
                out[int(name)] = sockets.get(inode, target)
        return out

    def _socket_table(self) -> dict[str, str]:
        table: dict[str, str] = {}
        for proto in ("tcp", "unix"):
            with contextlib.suppress(OSError):
                lines = Path(f"/proc/{self.proc.pid}/net/{proto}").read_text().splitlines()[1:]
                for line in lines:
                    cols = line.split()
                    if proto == "tcp" and len(cols) > 9:
                        table[cols[9]] = f"tcp {cols[1]}->{cols[2]} st={cols[3]}"
                    elif proto == "unix" and len(cols) > 6:
                        path = cols[7] if len(cols) > 7 else ""
                        table[cols[6]] = f"unix type={cols[4]} st={cols[5]} {path}"
        return table

    def settled_fd_count(self, timeout: float = 3.0, target: int | None = None) -> int:
        """The fd count once it stops moving (or reaches `target`)."""
        deadline = time.monotonic() + timeout
        last = self.fd_count()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.fd_count()
            if (target is not None and now == target) or (target is None and now == last):
                return now
            last = now
        return last

    def status(self) -> dict[str, Any]:
        return query(self.control)

    def pooled(self) -> int:
        """Warm connections this router keeps to its peers (each holds an fd at both ends)."""
        idle: dict[str, int] = self.status()["router"]["peer_pool"]["idle"]
        return sum(idle.values())

    def log(self) -> str:
        try:
            return self.log_file.read_text()
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, timeout: float = 3.0) -> str:
        """The log once it holds `needle`. The switch path reports to the router's Python
        thread, which writes the line, so a line may trail the frame it is about."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if needle in text or time.monotonic() > deadline:
                return text
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.communicate()
        return self.proc.returncode


def free_port(ips: Sequence[str] = ("127.0.0.1", "127.0.0.2", "127.0.0.3")) -> int:
    """A TCP port that is free on every one of `ips` right now (routers share one peer port)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((ips[0], 0))
            port = int(probe.getsockname()[1])
        ok = True
        for ip in ips:
            with socket.socket() as s:
                try:
                    s.bind((ip, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no free port")


def recv_exact(sock: socket.socket, size: int, timeout: float = 5.0) -> bytes:
    """Exactly `size` bytes from a stream socket; short only if the peer closed first."""
    sock.settimeout(timeout)
    buf = b""
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def offer_bytes(sock: socket.socket, seq: int, t: Tuple4, key: bytes = TEST_KEY) -> bytes:
    """A valid OFFER for `t` on the connected peer-port socket `sock` (MAC'd with its binding)."""
    from shuntflow.router.auth import make_offer
    from shuntflow.wire import underlay_binding

    return make_offer(key, seq, t, underlay_binding(sock.getsockname(), sock.getpeername())).pack()
