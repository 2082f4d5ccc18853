"""A stand-in router for the library's tests that need no testbed: a SOCK_SEQPACKET listener on a
Unix socket, and a Python child under the library pointed at it. The child's router channel is
accepted and greeted (HELLO, HELLO_ACK); the test then speaks the wire on it as a router would,
down to handing the child a host connection whose other end the test holds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shuntflow.native import app_environment
from shuntflow.wire import Mode, Msg, MsgType, Status, Tuple4


def router_listener(tmp_path: Path) -> tuple[socket.socket, Path]:
    """The stand-in router's listener, and the path a library is pointed at."""
    path = tmp_path / "router.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(4)
    listener.settimeout(30)
    return listener, path


def tcp_listener(ip: str) -> socket.socket:
    """A plain listener (no library) on an ephemeral port."""
    s = socket.create_server((ip, 0), backlog=16)
    s.settimeout(30)
    return s


def greet(listener: socket.socket, pid: int) -> tuple[socket.socket, Msg]:
    """Accept the channel of process `pid` (it opens with the process's first connection) and
    answer its HELLO: the channel, and the HELLO."""
    chan, _ = listener.accept()
    chan.settimeout(30)
    hello = Msg.unpack(chan.recv(64))
    assert hello.type == MsgType.HELLO and hello.pid == pid, hello
    chan.send(Msg(MsgType.HELLO_ACK, Status.OK, hello.seq, arg=1).pack())
    return chan, hello


def next_request(chan: socket.socket) -> Msg:
    """The library's next SWITCH_REQ; anything sent before it is passed over."""
    while (m := Msg.unpack(chan.recv(64))).type != MsgType.SWITCH_REQ:
        pass
    return m


def pair_requests(
    chan: socket.socket, hosts: socket.socket, waiting: dict[frozenset[str], Msg], req: Msg
) -> list[socket.socket]:
    """A SWITCH_REQ from one end of a connection whose two ends are both under the library: held
    in `waiting` until the other end's comes, then both answered with the two ends of one host
    connection to `hosts`, as the two routers would. Returns that connection's two ends (the
    caller keeps them open), or nothing while the request waits."""
    key = frozenset((str(req.tuple.local), str(req.tuple.remote)))
    first = waiting.pop(key, None)
    if first is None:
        waiting[key] = req
        return []
    a = socket.create_connection(hosts.getsockname())
    b, _ = hosts.accept()
    for r, end in ((first, a), (req, b)):
        res = Msg(MsgType.SWITCH_RES, Status.OK, r.seq, tuple=r.tuple)
        socket.send_fds(chan, [res.pack()], [end.fileno()])
    return [a, b]


def hand_over(chan: socket.socket, hosts: socket.socket, req: Msg) -> socket.socket:
    """Answer `req` with a host connection to `hosts`, as a router does: the library gets one
    end with its SWITCH_RES, the test the other (returned)."""
    lib_end = socket.create_connection(hosts.getsockname())
    host, _ = hosts.accept()
    host.settimeout(10)
    res = Msg(MsgType.SWITCH_RES, Status.OK, req.seq, tuple=req.tuple)
    socket.send_fds(chan, [res.pack()], [lib_end.fileno()])
    lib_end.close()  # the library holds its own copy now
    return host


@contextmanager
def library_child(
    tmp_path: Path, code: str, args: list[str], threshold: int, log: Path | None = None
) -> Iterator[tuple[subprocess.Popen[str], socket.socket]]:
    """Run `python -c code args` under the library (overlay 127.0.0.0/8), yield it with its
    greeted channel; the child is killed if still running on the way out."""
    listener, path = router_listener(tmp_path)
    env = app_environment(
        Mode.SHUNTFLOW,
        router_socket=path,
        threshold=threshold,
        overlay_cidr="127.0.0.0/8",
        log=None if log is None else str(log),
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        chan, _ = greet(listener, child.pid)
        yield child, chan
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        listener.close()


@contextmanager
def paired_child(
    tmp_path: Path, code: str, threshold: int
) -> Iterator[tuple[subprocess.Popen[str], socket.socket, dict[str, Any]]]:
    """library_child for a child that holds both ends of its connections: it prints them on one
    JSON line and waits for a line on its stdin, which this sends once it has read them;
    yields the child, its channel and what it printed."""
    with library_child(tmp_path, code, [], threshold=threshold) as (child, chan):
        assert child.stdin is not None and child.stdout is not None
        conns = json.loads(child.stdout.readline())
        child.stdin.write("\n")
        child.stdin.flush()
        yield child, chan, conns


def claim(chan: socket.socket, seq: int, local: str, remote: str) -> int:
    """Ask the library, as its router would, whether the connection (local, remote) is its own:
    the CLAIM_RES status."""
    t = Tuple4.parse(local, remote)
    chan.send(Msg(MsgType.CLAIM_REQ, Status.OK, seq, tuple=t).pack())
    while True:
        m = Msg.unpack(chan.recv(64))
        if m.type == MsgType.CLAIM_RES and m.seq == seq:
            assert m.tuple == t, m
            return m.status
