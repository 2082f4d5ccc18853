"""The library finds the connection a router frame names (docs/design.md, "One agent thread per
process"): a fake router on a Unix socket asks a real process under the library, by CLAIM_REQ,
about connections it holds, has closed, and holds on reused fd numbers. Mine means CLAIM_RES OK,
anything else NOT_MINE; a closed connection, or an old tuple whose fd number now carries
another connection, must never be taken for a live one.

The process opens its channel with its first connection and starts its agent at a connection's
8th data call. The first claims name connections opened before that, which never reached the
agent's queue (the agent walks the fd table for them at its start), and more new connections
than the queue holds opened after it: the index falls back to walking the fd table once. The
later claims come after a few new connections, which reach the index through the queue alone."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from shuntflow.wire import Status

from .fakerouter import claim, library_child

# 2 x EARLY tracked connections (both ends are in the process) before the agent starts, 2 x PAIRS
# after it and before the first claim: more than the 4,096 new connections its queue holds.
EARLY = 100
PAIRS = 2500
REUSED = 200

CHILD = textwrap.dedent(
    """
    import json, socket, sys
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8192)
    port = ls.getsockname()[1]
    pairs = []

    def open_pairs(n):
        for _ in range(n):
            c = socket.create_connection(("127.0.0.1", port))
            s, _ = ls.accept()
            pairs.append((c, s))

    def views(c, s):
        a, b = c.getsockname(), c.getpeername()
        return [[f"{a[0]}:{a[1]}", f"{b[0]}:{b[1]}"], [f"{b[0]}:{b[1]}", f"{a[0]}:{a[1]}"]]

    def report(**lists):
        print(json.dumps(lists), flush=True)
        sys.stdin.readline()

    open_pairs(int(sys.argv[3]))
    c, s = pairs[0]
    for _ in range(4):  # 8 data calls at each end start the agent
        c.sendall(b"x")
        s.recv(1)
        s.sendall(b"y")
        c.recv(1)
    open_pairs(int(sys.argv[1]))
    report(live=[v for c, s in pairs[:: 50] for v in views(c, s)])
    # Close some, open as many (their fd numbers come back), and a few more.
    n = int(sys.argv[2])
    closed = [v for c, s in pairs[:n] for v in views(c, s)]
    fds = sorted(x.fileno() for c, s in pairs[:n] for x in (c, s))
    for c, s in pairs[:n]:
        c.close()
        s.close()
    del pairs[:n]
    open_pairs(n)
    fresh = pairs[-n:]
    reused = sorted(x.fileno() for c, s in fresh for x in (c, s))
    report(closed=closed, fresh=[v for c, s in fresh for v in views(c, s)], same_fds=fds == reused)
    """
)


def test_claims_find_live_connections_only(tmp_path: Path) -> None:
    with library_child(
        tmp_path, CHILD, [str(PAIRS), str(REUSED), str(EARLY)], threshold=1_000_000
    ) as (child, chan):
        assert child.stdin is not None and child.stdout is not None
        seq = 0x80000000

        first = json.loads(child.stdout.readline())
        for local, remote in first["live"]:
            seq += 1
            assert claim(chan, seq, local, remote) == Status.OK, (local, remote)
        child.stdin.write("\n")
        child.stdin.flush()

        second = json.loads(child.stdout.readline())
        assert second["same_fds"]  # the new connections took the closed ones' numbers
        for local, remote in second["closed"]:
            seq += 1
            assert claim(chan, seq, local, remote) == Status.NOT_MINE, (local, remote)
        for local, remote in second["fresh"]:
            seq += 1
            assert claim(chan, seq, local, remote) == Status.OK, (local, remote)
        # a tuple nobody in the process holds
        seq += 1
        assert claim(chan, seq, "127.0.0.1:1", "127.0.0.2:2") == Status.NOT_MINE
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(30) == 0
