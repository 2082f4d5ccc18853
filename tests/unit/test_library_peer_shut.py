"""A peer that shut down writing before the switch (docs/wire.md section 3, SYNC flag bit 0):
once the application has read the stream's end, every later read says the end again, across
the commit and the swap, never EAGAIN.

A real process under the library (shuntflow mode, overlay 127.0.0.0/8) leads a switch that a
fake router on a Unix socket serves; the test holds the follower's end of the host connection
and the overlay's server. The follower's application writes "hello" and shuts down writing on
the overlay; the leader reads it and the end (it has not committed: that end is the peer's
own). Then the leader commits, and the follower's SYNC comes with the shut-down flag, its host
connection's FIN held back: a non-blocking read of the host socket would now say EAGAIN, where
the stream has ended. The leader's reads, plain and MSG_PEEK, must say the end until the FIN
is in and after; its writes go on the host connection."""

from __future__ import annotations

import json
import socket
import textwrap
from pathlib import Path

from shuntflow.router.testing import recv_exact
from shuntflow.wire import HOP_F_SHUT_WR, HOP_SIZE, Hop, HopType, Tuple4

from .fakerouter import hand_over, library_child, next_request, tcp_listener

THRESHOLD = 4

CHILD = textwrap.dedent(
    """
    import json, select, socket, sys, time
    c = socket.socket()
    c.bind(("127.0.0.1", 0))
    c.connect(("127.0.0.2", int(sys.argv[1])))
    for i in range(int(sys.argv[2])):  # the threshold's call asks for the switch
        c.sendall(b"m%02d" % i)
    print(json.dumps({"port": c.getsockname()[1]}), flush=True)
    c.setblocking(False)

    def reads(n):
        # n rounds of a peek and a plain read, each what it returned or "EAGAIN"
        out = []
        for _ in range(n):
            for flags in (socket.MSG_PEEK, 0):
                try:
                    out.append(c.recv(64, flags).decode())
                except BlockingIOError:
                    out.append("EAGAIN")
            time.sleep(0.02)
        return out

    sys.stdin.readline()  # the follower wrote and shut down writing on the overlay
    got = b""
    while True:
        select.select([c], [], [], 10)
        b = c.recv(64)
        if not b:
            break
        got += b
    print(json.dumps({"got": got.decode()}), flush=True)
    sys.stdin.readline()  # the follower's SYNC is out, its host FIN held back
    before_fin = reads(10)
    c.sendall(b"after")
    print(json.dumps({"before_fin": before_fin}), flush=True)
    sys.stdin.readline()  # the host FIN is out
    time.sleep(0.2)
    print(json.dumps({"after_fin": reads(3)}), flush=True)
    c.close()
    """
)


def test_end_read_before_the_commit_stays_the_end(tmp_path: Path) -> None:
    server, hosts = tcp_listener("127.0.0.2"), tcp_listener("127.0.0.1")
    args = [str(server.getsockname()[1]), str(THRESHOLD)]
    with (
        server,
        hosts,
        library_child(tmp_path, CHILD, args, THRESHOLD, tmp_path / "lib.log") as (child, chan),
    ):
        assert child.stdin is not None and child.stdout is not None

        def tell() -> None:
            assert child.stdin is not None
            child.stdin.write("\n")
            child.stdin.flush()

        overlay, _ = server.accept()
        overlay.settimeout(10)
        req = next_request(chan)
        port = json.loads(child.stdout.readline())["port"]
        local, remote = f"127.0.0.1:{port}", f"127.0.0.2:{server.getsockname()[1]}"
        assert req.tuple == Tuple4.parse(local, remote) and req.tuple.local_is_leader(), req
        host = hand_over(chan, hosts, req)
        with overlay, host:
            overlay.sendall(b"hello")
            overlay.shutdown(socket.SHUT_WR)  # the follower application's own end
            tell()
            assert json.loads(child.stdout.readline()) == {"got": "hello"}

            host.sendall(Hop(HopType.READY).pack())
            sent = b"".join(b"m%02d" % i for i in range(THRESHOLD))
            assert Hop.unpack(recv_exact(host, HOP_SIZE, 10)) == Hop(HopType.SYNC, 0, len(sent))
            host.sendall(Hop(HopType.SYNC, HOP_F_SHUT_WR, 5).pack())
            assert recv_exact(overlay, len(sent), 10) == sent
            assert overlay.recv(1) == b""  # the leader's overlay FIN: its commit is whole
            tell()
            report = json.loads(child.stdout.readline())
            assert report["before_fin"] == [""] * 20, report
            assert recv_exact(host, 5, 10) == b"after"

            host.shutdown(socket.SHUT_WR)
            tell()
            assert json.loads(child.stdout.readline()) == {"after_fin": [""] * 6}
            assert child.wait(30) == 0
            assert host.recv(1) == b""  # the application's close ends the host connection
