"""A claim that came before the accept (docs/design.md, "A claim waits for the accept"): the
connecting end reached its threshold while its connection still waited in the listener's queue
here, so the library said NOT_MINE. The application thread that accepts that connection within
the next second asks for its switch at once, whatever its own count of calls; its router then
hands it the OFFER's connection instead of asking again milliseconds later.

A real process under the library (shuntflow mode, overlay 127.0.0.0/8, a threshold it never
reaches) listens; the test, as its router, claims two of the connections waiting in its queue,
one more than a second before the accept and one just before, and leaves a third unclaimed.
Only the freshly claimed one may be asked for: the first SWITCH_REQ names it, and the library's
own report shows the other two on the overlay, not switching."""

from __future__ import annotations

import json
import socket
import textwrap
import time
from pathlib import Path

from shuntflow.wire import Msg, MsgType, Status, Tuple4
from shuntflow.wire import Path as ConnPath

from .fakerouter import claim, library_child, next_request

CHILD = textwrap.dedent(
    """
    import json, socket, sys
    ls = socket.socket()
    ls.bind(("127.0.0.2", 0))
    ls.listen(8)
    # A connection of its own opens the router channel, and 8 data calls start the agent,
    # which answers claims.
    c = socket.create_connection(ls.getsockname())
    s, _ = ls.accept()
    for _ in range(4):
        c.sendall(b"x")
        s.recv(1)
        s.sendall(b"y")
        c.recv(1)
    print(json.dumps({"port": ls.getsockname()[1]}), flush=True)
    sys.stdin.readline()
    conns, peers = [], []
    for _ in range(int(sys.argv[1])):
        conn, addr = ls.accept()
        conns.append(conn)  # kept open: the library's report names them
        peers.append(f"{addr[0]}:{addr[1]}")
    print(json.dumps({"accepted": peers}), flush=True)
    sys.stdin.readline()
    """
)


def paths(chan: socket.socket, seq: int) -> dict[Tuple4, ConnPath]:
    """The library's report of its connections (STATS_REQ): each tuple's path."""
    chan.send(Msg(MsgType.STATS_REQ, Status.OK, seq).pack())
    out: dict[Tuple4, ConnPath] = {}
    while (m := Msg.unpack(chan.recv(64))).type != MsgType.STATS_END or m.seq != seq:
        if m.type == MsgType.CONN_INFO and m.seq == seq:
            out[m.tuple] = ConnPath(m.status)
    return out


def name(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"{host}:{port}"


def test_a_connection_claimed_before_its_accept_is_asked_for_at_the_accept(
    tmp_path: Path,
) -> None:
    with library_child(tmp_path, CHILD, ["3"], threshold=1_000_000) as (child, chan):
        assert child.stdin is not None and child.stdout is not None
        port = json.loads(child.stdout.readline())["port"]
        server = f"127.0.0.2:{port}"
        # Queued in this order, accepted in this order.
        unclaimed, stale, fresh = (
            socket.create_connection(("127.0.0.2", port), timeout=10) for _ in range(3)
        )
        with unclaimed, stale, fresh:
            assert claim(chan, 101, server, name(stale)) == Status.NOT_MINE
            time.sleep(1.2)  # past the second a refused claim is remembered for
            assert claim(chan, 102, server, name(fresh)) == Status.NOT_MINE
            child.stdin.write("\n")
            child.stdin.flush()
            accepted = json.loads(child.stdout.readline())["accepted"]
            assert accepted == [name(unclaimed), name(stale), name(fresh)]

            req = next_request(chan)
            assert req.tuple == Tuple4.parse(server, name(fresh)), req
            seen = paths(chan, 103)
            assert seen[Tuple4.parse(server, name(fresh))] == ConnPath.SWITCHING, seen
            assert seen[Tuple4.parse(server, name(unclaimed))] == ConnPath.OVERLAY, seen
            assert seen[Tuple4.parse(server, name(stale))] == ConnPath.OVERLAY, seen
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.wait(30) == 0
