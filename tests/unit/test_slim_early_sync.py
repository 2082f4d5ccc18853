"""Slim mode's early SYNC (docs/wire.md section 3): a slim leader whose connect() waits for the
switch sends its SYNC as soon as its host connection arrives, before the follower's READY, and
holds its overlay FIN until that READY.

A fake router on a Unix socket serves a real process under the library (slim mode, the overlay
127.0.0.0/8): it hands the connecting end a TCP connection whose other end the test holds and
plays the follower on, while the test's plain listener (no library) is the overlay's server.
The client's overlay address 127.0.0.1 is below the server's 127.0.0.2: it leads.

- READY never comes, the host connection ends: the SYNC was the only byte on it, so the client
  goes back to the overlay, where its first bytes arrive whole and nothing was cut.
- READY, then the follower's SYNC: the client's overlay FIN follows READY (never before), and
  its application's bytes take the host connection.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from shuntflow.native import app_environment
from shuntflow.router.testing import recv_exact
from shuntflow.wire import HOP_SIZE, Hop, HopType, Mode, Msg, MsgType, Status, Tuple4

from .fakerouter import greet, hand_over, next_request, router_listener, tcp_listener

CHILD = textwrap.dedent(
    """
    import json, socket, sys
    c = socket.socket()
    c.bind(("127.0.0.1", 0))
    c.connect(("127.0.0.2", int(sys.argv[1])))  # slim: returns once the switch is over
    print(json.dumps({"connected": c.getsockname()[1]}), flush=True)
    c.sendall(b"ping")
    got = b""
    while len(got) < 4:
        b = c.recv(4 - len(got))
        if not b:
            break
        got += b
    print(json.dumps({"got": got.decode()}), flush=True)
    c.close()
    """
)


@dataclass
class Slim:
    chan: socket.socket  # the library's channel to the fake router
    overlay: socket.socket  # the server's end of the overlay connection
    host: socket.socket  # the follower's end of the host connection handed to the client
    child: subprocess.Popen[str]
    request: Msg

    def line(self) -> dict[str, object]:
        assert self.child.stdout is not None
        line = self.child.stdout.readline()
        assert line, "the client exited early"
        result: dict[str, object] = json.loads(line)
        return result

    def no_overlay_fin(self) -> None:
        """Nothing on the overlay yet, the FIN least of all."""
        self.overlay.settimeout(0.3)
        with pytest.raises(TimeoutError):
            self.overlay.recv(1)
        self.overlay.settimeout(10)

    def answer_later_requests(self) -> threading.Thread:
        """Any request after this one is DENIED: the connection stays where it is."""

        def serve() -> None:
            try:
                while True:
                    data = self.chan.recv(64)
                    if not data:
                        return
                    m = Msg.unpack(data)
                    if m.type == MsgType.SWITCH_REQ:
                        res = Msg(MsgType.SWITCH_RES, Status.DENIED, m.seq, tuple=m.tuple)
                        self.chan.send(res.pack())
            except OSError:
                return

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        return t


@contextmanager
def slim_switch(tmp_path: Path) -> Iterator[Slim]:
    """The client's connect() under way, its SWITCH_REQ answered with a host connection."""
    router, path = router_listener(tmp_path)
    server, hosts = tcp_listener("127.0.0.2"), tcp_listener("127.0.0.1")
    env = app_environment(Mode.SLIM, router_socket=path, overlay_cidr="127.0.0.0/8")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(server.getsockname()[1])],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    opened: list[socket.socket] = [router, server, hosts]
    try:
        chan, hello = greet(router, child.pid)
        opened.append(chan)
        assert hello.arg == Mode.SLIM, hello
        overlay, _ = server.accept()
        opened.append(overlay)
        overlay.settimeout(10)
        req = next_request(chan)
        want = Tuple4.parse(
            f"127.0.0.1:{overlay.getpeername()[1]}", f"127.0.0.2:{server.getsockname()[1]}"
        )
        assert req.tuple == want and req.tuple.local_is_leader(), req
        host = hand_over(chan, hosts, req)
        opened.append(host)
        yield Slim(chan, overlay, host, child, req)
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for s in opened:
            s.close()


def test_no_ready_goes_back_to_the_overlay(tmp_path: Path) -> None:
    with slim_switch(tmp_path) as sw:
        sync = Hop.unpack(recv_exact(sw.host, HOP_SIZE, 10))
        assert sync.type == HopType.SYNC and sync.seq == 0, sync  # before any READY
        sw.no_overlay_fin()
        sw.answer_later_requests()
        sw.host.close()  # the follower never had it: no READY, then EOF
        assert sw.line()["connected"] == sw.request.tuple.local.port
        assert recv_exact(sw.overlay, 4, 10) == b"ping"  # on the overlay, first byte to last
        sw.overlay.sendall(b"pong")
        assert sw.line() == {"got": "pong"}
        assert sw.overlay.recv(1) == b""  # then the client's close, not before


def test_ready_releases_the_overlay_fin(tmp_path: Path) -> None:
    with slim_switch(tmp_path) as sw:
        sync = Hop.unpack(recv_exact(sw.host, HOP_SIZE, 10))
        assert sync.type == HopType.SYNC and sync.seq == 0, sync
        sw.no_overlay_fin()  # the FIN waits for the READY
        sw.host.sendall(Hop(HopType.READY, 0, 0).pack() + Hop(HopType.SYNC, 0, 0).pack())
        assert sw.overlay.recv(1) == b""  # the client's overlay stream ends at S = 0
        sw.overlay.shutdown(socket.SHUT_WR)  # ours too: the switch point
        sw.line()  # connect() returned
        assert recv_exact(sw.host, 4, 10) == b"ping"  # on the host connection
        sw.host.sendall(b"pong")
        assert sw.line() == {"got": "pong"}
        assert sw.host.recv(1) == b""
