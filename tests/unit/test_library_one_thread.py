"""A process of one thread under the library (docs/design.md, "One agent thread per process"):
its connections take no lock and count their data calls in the wrappers themselves while no
agent runs, and that must lose nothing the full path keeps.

A real single-threaded process (Python, both ends of each connection in it) against a fake
router on a Unix socket: one-request connections are closed with every data call and byte
counted (the library's close log) and leave the process with one thread; a longer connection
starts the agent at its 8th data call and asks the router for a host connection at its
threshold, its bytes intact after the router's refusal."""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from pathlib import Path

from shuntflow.wire import Msg, MsgType, Status, Tuple4

from .fakerouter import library_child

SHORT = 20
THRESHOLD = 16
ROUNDS = 40  # round trips on the long connection: 80 data calls at each end

CHILD = textwrap.dedent(
    """
    import hashlib, json, os, socket, sys
    short, rounds = int(sys.argv[1]), int(sys.argv[2])

    def threads():
        return len(os.listdir("/proc/self/task"))

    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    port = ls.getsockname()[1]
    for _ in range(short):
        c = socket.create_connection(("127.0.0.1", port))
        s, _ = ls.accept()
        c.sendall(b"q" * 40)                  # client: 1
        assert s.recv(4096) == b"q" * 40      # server: 1
        s.sendall(b"r" * 164)                 # server: 2
        s.close()
        assert c.recv(4096) == b"r" * 164     # client: 2
        assert c.recv(4096) == b""            # client: 3
        c.close()
    before = threads()
    c = socket.create_connection(("127.0.0.1", port))
    s, _ = ls.accept()
    views = [[f"{a[0]}:{a[1]}", f"{b[0]}:{b[1]}"]
             for a, b in ((c.getsockname(), c.getpeername()), (s.getsockname(), s.getpeername()))]
    sent, got = hashlib.sha256(), hashlib.sha256()
    early = None
    for i in range(rounds):
        if i == 5:  # 10 data calls at each end: past the agent's start, short of the threshold
            early = threads()
        msg = bytes([i]) * (i + 1)
        sent.update(msg)
        c.sendall(msg)
        data = b""
        while len(data) < len(msg):
            data += s.recv(len(msg) - len(data))
        s.sendall(data)
        back = b""
        while len(back) < len(msg):
            back += c.recv(len(msg) - len(back))
        got.update(back)
    print(json.dumps({"threads_before": before, "threads_early": early,
                      "threads_after": threads(), "views": views,
                      "sent": sent.hexdigest(), "got": got.hexdigest()}), flush=True)
    sys.stdin.readline()
    c.close()
    s.close()
    """
)

CLOSED = re.compile(
    r"closed in phase (\d+) after (\d+) counted data calls, overlay (\d+) bytes, host (\d+) bytes"
)


def test_one_thread_counts_everything_and_still_switches(tmp_path: Path) -> None:
    log = tmp_path / "lib.log"
    asked: list[Tuple4] = []
    with library_child(
        tmp_path, CHILD, [str(SHORT), str(ROUNDS)], threshold=THRESHOLD, log=log
    ) as (child, chan):
        assert child.stdin is not None and child.stdout is not None
        report = json.loads(child.stdout.readline())
        # Both ends of the long connection reach the threshold: a request from each, which the
        # router refuses (they stay on the overlay and retry later, at twice the calls).
        while len(asked) < 2:
            m = Msg.unpack(chan.recv(64))
            if m.type == MsgType.SWITCH_REQ:
                asked.append(m.tuple)
                refused = Msg(MsgType.SWITCH_RES, Status.PEER_UNREACHABLE, m.seq, tuple=m.tuple)
                chan.send(refused.pack())
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(30) == 0

    # No agent for the one-request connections; the long one's 8th data call started it.
    assert report["threads_before"] == 1, report
    assert report["threads_early"] == report["threads_after"] == 2, report
    assert sorted(asked, key=str) == sorted((Tuple4.parse(*v) for v in report["views"]), key=str), (
        asked,
        report["views"],
    )
    want = hashlib.sha256(b"".join(bytes([i]) * (i + 1) for i in range(ROUNDS))).hexdigest()
    assert report["sent"] == report["got"] == want

    closes = [tuple(int(x) for x in m.groups()) for m in CLOSED.finditer(log.read_text())]
    # Every short connection: client 3 calls (40 out, 164 in), server 2; all on the overlay.
    short = sorted(c for c in closes if c[1] <= 3)
    assert short == sorted([(0, 2, 204, 0)] * SHORT + [(0, 3, 204, 0)] * SHORT), closes
    # The long connection's ends: every call and byte counted across the agent's start.
    long_bytes = 2 * sum(i + 1 for i in range(ROUNDS))
    long = [c for c in closes if c[1] > 3]
    assert len(long) == 2 and all(c[2] == long_bytes and c[3] == 0 for c in long), closes
    assert all(c[1] >= 2 * ROUNDS for c in long), closes
