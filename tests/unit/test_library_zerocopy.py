"""A connection whose socket has SO_ZEROCOPY on stays on the overlay (docs/design.md, "What stays
on the overlay"): the kernel queues each MSG_ZEROCOPY send's completion on the socket that made
it, so a swap would lose those of the overlay socket, and an application waiting for them would
hold its buffers for ever.

A real process under the library, both ends of each connection in it, against a fake router in
the test process that hands each pair of requests the two ends of a real TCP connection. Three
connections have SO_ZEROCOPY on one end (set before connect, set after connect, inherited from
the listener) and send with MSG_ZEROCOPY; one has none. The plain one must switch (both ends'
network namespace cookies change) and the others must not; no zerocopy end may ask for a switch
or accept a claim; and every completion must reach the application."""

from __future__ import annotations

import json
import select
import socket
import textwrap
from pathlib import Path

from shuntflow.wire import Msg, MsgType, Status

from .fakerouter import claim, pair_requests, paired_child, tcp_listener

THRESHOLD = 8

CHILD = textwrap.dedent(
    """
    import ctypes, json, select, socket, struct, subprocess, sys, time
    SO_ZEROCOPY, SO_NETNS_COOKIE, MSG_ZEROCOPY = 60, 71, 0x4000000
    SO_EE_ORIGIN_ZEROCOPY = 5

    # A namespace of its own: a host connection (the fake router's, in the test's namespace)
    # shows as another namespace cookie.
    assert ctypes.CDLL(None, use_errno=True).unshare(0x40000000) == 0  # CLONE_NEWNET
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

    def cookie(s):
        return s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8).hex()

    def listener(zerocopy=False):
        ls = socket.socket()
        if zerocopy:
            ls.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
        ls.bind(("127.0.0.1", 0))
        ls.listen(8)
        return ls

    def pair(ls, before=False, after=False):
        c = socket.socket()
        if before:
            c.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
        c.connect(ls.getsockname())
        s, _ = ls.accept()
        if after:
            c.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
        return c, s

    def zerocopy(s):
        return s.getsockopt(socket.SOL_SOCKET, SO_ZEROCOPY) == 1

    def completions(s, want):
        got = 0
        p = select.poll()
        p.register(s, select.POLLERR)
        while got < want:
            if not p.poll(5000):
                break
            _, anc, _, _ = s.recvmsg(1, 1024, socket.MSG_ERRQUEUE)
            for level, kind, data in anc:
                errno, origin, _, _, _, lo, hi = struct.unpack_from("=IBBBBII", data)
                if origin == SO_EE_ORIGIN_ZEROCOPY:
                    got += hi - lo + 1
        return got

    plain, zl = listener(), listener(zerocopy=True)
    cases = {
        "plain": pair(plain),
        "before_connect": pair(plain, before=True),
        "after_connect": pair(plain, after=True),
        "listener": pair(zl),
    }
    print(json.dumps({name: [f"{x[0]}:{x[1]}" for x in (c.getsockname(), c.getpeername())]
                      for name, (c, s) in cases.items()}), flush=True)
    sys.stdin.readline()  # the router is ready
    first = {name: [cookie(c), cookie(s)] for name, (c, s) in cases.items()}
    sent = {}
    for i in range(2000):
        if i >= 60 and cookie(cases["plain"][0]) != first["plain"][0] and \
                cookie(cases["plain"][1]) != first["plain"][1]:
            break
        time.sleep(0.002)
        for name, (c, s) in cases.items():
            for a, b in ((c, s), (s, c)):
                msg = bytes([i % 256]) * (100 + i % 64)
                flags = MSG_ZEROCOPY if zerocopy(a) else 0
                assert a.send(msg, flags) == len(msg)
                sent[a.fileno()] = sent.get(a.fileno(), 0) + (1 if flags else 0)
                got = b""
                while len(got) < len(msg):
                    got += b.recv(len(msg) - len(got))
                assert got == msg, (name, i)
    report = {}
    for name, (c, s) in cases.items():
        report[name] = {
            "zerocopy": [zerocopy(c), zerocopy(s)],
            "switched": [cookie(c) != first[name][0], cookie(s) != first[name][1]],
            "sent": [sent.get(c.fileno(), 0), sent.get(s.fileno(), 0)],
            "completed": [completions(x, sent.get(x.fileno(), 0)) for x in (c, s)],
        }
    print(json.dumps(report), flush=True)
    sys.stdin.readline()  # claims are asked meanwhile
    """
)


def test_zerocopy_sockets_stay_on_the_overlay(tmp_path: Path) -> None:
    host_listener = tcp_listener("127.0.0.1")
    held: list[socket.socket] = []
    asked: set[str] = set()
    with paired_child(tmp_path, CHILD, THRESHOLD) as (child, chan, cases):
        assert child.stdin is not None and child.stdout is not None
        # Pairs of requests answered with the two ends of one host connection until the child
        # reports; a request whose other end never asks stays unanswered.
        waiting: dict[frozenset[str], Msg] = {}
        chan.settimeout(0.05)
        report = None
        while report is None:
            try:
                m = Msg.unpack(chan.recv(64))
            except TimeoutError:
                m = None
            if m is not None and m.type == MsgType.SWITCH_REQ:
                asked.add(str(m.tuple.local))
                held += pair_requests(chan, host_listener, waiting, m)
            if select.select([child.stdout], [], [], 0)[0]:
                report = json.loads(child.stdout.readline())
        # A zerocopy end refuses a peer's claim: it cannot take a host connection.
        chan.settimeout(10)
        refused = {
            name: claim(chan, 9000 + i, cases[name][0], cases[name][1])
            for i, name in enumerate(("before_connect", "after_connect"))
        }
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(30) == 0
    for s in held:
        s.close()
    host_listener.close()

    assert report["plain"]["switched"] == [True, True], report
    assert report["plain"]["zerocopy"] == [False, False]
    expect_zc = {
        "before_connect": [True, False],
        "after_connect": [True, False],
        "listener": [False, True],
    }
    for name, zc in expect_zc.items():
        r = report[name]
        assert r["zerocopy"] == zc, (name, r)
        for end in (0, 1):
            if zc[end]:
                assert not r["switched"][end], (name, "zerocopy end switched", r)
                assert r["sent"][end] > 0 and r["completed"][end] == r["sent"][end], (name, r)
                assert cases[name][end] not in asked, (name, "a zerocopy end asked", asked)
    assert refused == {"before_connect": Status.NOT_MINE, "after_connect": Status.NOT_MINE}
