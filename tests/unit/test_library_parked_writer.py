"""A commit that comes due while the application's writer waits for room on the overlay
(docs/design.md, "A blocking write the commit can land in"): that writer holds the connection's
write lock but is in no call, so the agent makes the commit for it, and the writer sends the
rest of its call on the host connection when it next runs. On a busy CPU that next run came
0.5-3 ms later, and the peer's bytes waited for this end's SYNC meanwhile.

A real process under the library (shuntflow mode, overlay 127.0.0.0/8) leads a switch that a
fake router on a Unix socket serves; the test holds the overlay's server (which reads nothing
until the commit, so the writer's one large sendall fills the overlay and waits) and the
follower's end of the host connection. Once the writer waits for room, the test freezes that
one thread (ptrace: the rest of the process runs on) and only then hands over the host
connection and sends READY. The SYNC must come while the writer is frozen, and the overlay must
then end at its S; thawed, the writer sends the rest of the stream on the host connection."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import socket
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shuntflow.router.testing import recv_exact
from shuntflow.wire import HOP_SIZE, Hop, HopType

from .fakerouter import hand_over, library_child, next_request, tcp_listener

THRESHOLD = 4
BODY = 16 << 20  # far more than the overlay's buffers take before the sender waits

CHILD = textwrap.dedent(
    """
    import json, socket, sys, threading
    c = socket.socket()
    c.bind(("127.0.0.1", 0))
    c.connect(("127.0.0.2", int(sys.argv[1])))
    for i in range(int(sys.argv[2])):  # the threshold's call asks for the switch
        c.sendall(b"m%02d" % i)
    body = bytes(range(256)) * (int(sys.argv[3]) // 256)
    started = threading.Event()
    tid = []

    def write():
        tid.append(threading.get_native_id())
        started.set()
        c.sendall(body)

    writer = threading.Thread(target=write)
    writer.start()
    started.wait()
    print(json.dumps({"port": c.getsockname()[1], "tid": tid[0]}), flush=True)
    writer.join()
    print(json.dumps({"sent": len(body)}), flush=True)
    sys.stdin.readline()
    c.close()
    """
)

PPOLL = {"x86_64": 271, "aarch64": 73}[platform.machine()]
PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 17, 0x4206, 0x4207
WALL = 0x40000000  # waitpid's __WALL: a thread of another process is a clone child
_libc = ctypes.CDLL(None, use_errno=True)


def _ptrace(request: int, tid: int) -> None:
    if _libc.ptrace(request, tid, None, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}")


def _in_ppoll(pid: int, tid: int) -> bool:
    text = Path(f"/proc/{pid}/task/{tid}/syscall").read_text()
    return text.split()[0] == str(PPOLL)


@contextmanager
def frozen_in_ppoll(pid: int, tid: int) -> Iterator[None]:
    """Thread `tid` of `pid` stopped (only it) inside its wait for room: the library's ppoll."""
    deadline = time.monotonic() + 20
    while True:
        assert time.monotonic() < deadline, "the writer never waited for room"
        if _in_ppoll(pid, tid):
            _ptrace(PTRACE_SEIZE, tid)
            _ptrace(PTRACE_INTERRUPT, tid)
            os.waitpid(tid, WALL)
            if _in_ppoll(pid, tid):  # not caught between two of its ticks
                break
            _ptrace(PTRACE_DETACH, tid)
        time.sleep(0.001)
    try:
        yield
    finally:
        _ptrace(PTRACE_DETACH, tid)


def recv_to_end(sock: socket.socket, limit: int, timeout: float) -> bytes:
    """Everything until the peer's FIN (at most `limit` bytes)."""
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) <= limit and (chunk := sock.recv(1 << 20)):
        buf += chunk
    return bytes(buf)


def recv_count(sock: socket.socket, size: int, timeout: float) -> bytes:
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < size and (chunk := sock.recv(min(1 << 20, size - len(buf)))):
        buf += chunk
    return bytes(buf)


def test_the_agent_commits_for_a_writer_that_waits_for_room(tmp_path: Path) -> None:
    server, hosts = tcp_listener("127.0.0.2"), tcp_listener("127.0.0.1")
    args = [str(server.getsockname()[1]), str(THRESHOLD), str(BODY)]
    with server, hosts, library_child(tmp_path, CHILD, args, THRESHOLD) as (child, chan):
        assert child.stdin is not None and child.stdout is not None
        overlay, _ = server.accept()
        req = next_request(chan)
        info = json.loads(child.stdout.readline())
        assert req.tuple.local_is_leader() and req.tuple.local.port == info["port"], req
        stream = b"".join(b"m%02d" % i for i in range(THRESHOLD)) + bytes(range(256)) * (
            BODY // 256
        )
        with overlay:
            with frozen_in_ppoll(child.pid, info["tid"]):
                host = hand_over(chan, hosts, req)
                host.sendall(Hop(HopType.READY).pack())
                sync = Hop.unpack(recv_exact(host, HOP_SIZE, 10))
                assert sync.type == HopType.SYNC, sync
                s = sync.seq
                assert THRESHOLD * 3 < s < len(stream), s
                # The leader's overlay FIN right after S, the writer still frozen.
                assert recv_to_end(overlay, s, 10) == stream[:s]
                host.sendall(Hop(HopType.SYNC, 0, 0).pack())  # this follower wrote nothing
            with host:
                assert recv_count(host, len(stream) - s, 30) == stream[s:]
                assert json.loads(child.stdout.readline()) == {"sent": BODY}
                child.stdin.write("\n")
                child.stdin.flush()
                assert child.wait(30) == 0
                assert host.recv(1) == b""
