"""The application takes a number the library is using (docs/design.md, "The library's own fds
stay out of the way"): dup2 onto one of the library's private fds, in the middle of a switch,
moves the library's fd to a new number first, and everything that named the old one follows it.

A real process under the library (shuntflow mode, overlay 127.0.0.0/8) leads a switch that a
fake router on a Unix socket serves: it hands the process a TCP connection whose other end the
test holds and plays the follower on, while the test's plain listener is the overlay's server.
Once the leader has committed (its SYNC read by the test), the process dup2s /dev/null onto
every number of the library's range: its router channel, its agent's epoll set and eventfd, the
host connection it is handing the connection over to, and the overlay copies its FIN waits on.
The switch must then finish as if nothing happened: the overlay's FIN after the SYNC's
acknowledgement, the follower's bytes before and after its switch point in order, the
process's next bytes on the host connection, the router channel still answering a claim; and
the process's numbers now name /dev/null."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from shuntflow.native import app_environment
from shuntflow.router.testing import recv_exact
from shuntflow.wire import HOP_SIZE, Hop, HopType, Mode, Status, Tuple4

from .fakerouter import claim, greet, hand_over, next_request, router_listener, tcp_listener

THRESHOLD = 16
LIMIT = 1024  # the process's fd limit: the library's own numbers start 128 below it
PRIVATE_BASE = LIMIT - 128

CHILD = textwrap.dedent(
    """
    import json, os, socket, sys
    c = socket.socket()
    c.bind(("127.0.0.1", 0))
    c.connect(("127.0.0.2", int(sys.argv[1])))
    idle = socket.create_connection(("127.0.0.2", int(sys.argv[1])))  # stays on the overlay
    for i in range(int(sys.argv[2])):  # the threshold's call asks for the switch
        c.sendall(b"m%02d" % i)
    print(json.dumps({"port": c.getsockname()[1], "idle": idle.getsockname()[1]}), flush=True)
    sys.stdin.readline()  # the test has the leader's SYNC: the switch is under way
    base = int(sys.argv[3])
    taken = sorted(int(n) for n in os.listdir("/proc/self/fd") if int(n) >= base)
    null = os.open("/dev/null", os.O_RDONLY)
    for n in taken:
        os.dup2(null, n)
    os.close(null)
    names = [os.readlink(f"/proc/self/fd/{n}") for n in taken]
    def name(n):
        try:
            return os.readlink(f"/proc/self/fd/{n}")
        except FileNotFoundError:  # listdir's own
            return "closed"

    watched = {}  # the numbers the library's epoll sets watch, and what they name
    for n in os.listdir("/proc/self/fd"):
        if name(n) == "anon_inode:[eventpoll]":
            for line in open(f"/proc/self/fdinfo/{n}"):
                if line.startswith("tfd:"):
                    watched[int(line.split()[1])] = name(line.split()[1])
    print(json.dumps({"taken": taken, "names": names, "watched": watched}), flush=True)
    got = b""
    while len(got) < 10:
        b = c.recv(10 - len(got))
        if not b:
            break
        got += b
    c.sendall(b"after")
    print(json.dumps({"got": got.decode()}), flush=True)
    sys.stdin.readline()
    c.close()
    idle.close()
    """
)


def limit_fds() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, hard))


def test_dup2_onto_the_librarys_fds_mid_switch(tmp_path: Path) -> None:
    router, path = router_listener(tmp_path)
    server, hosts = tcp_listener("127.0.0.2"), tcp_listener("127.0.0.1")
    env = app_environment(
        Mode.SHUNTFLOW,
        router_socket=path,
        threshold=THRESHOLD,
        overlay_cidr="127.0.0.0/8",
        log=str(tmp_path / "lib.log"),
    )
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(server.getsockname()[1]), "20", str(PRIVATE_BASE)],
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=limit_fds,
    )
    opened: list[socket.socket] = [router, server, hosts]
    assert child.stdin is not None and child.stdout is not None
    try:
        chan, _ = greet(router, child.pid)
        opened.append(chan)
        overlay, _ = server.accept()
        idle_overlay, _ = server.accept()
        opened += [overlay, idle_overlay]
        overlay.settimeout(10)
        req = next_request(chan)
        ports = json.loads(child.stdout.readline())
        remote = f"127.0.0.2:{server.getsockname()[1]}"
        local, idle = f"127.0.0.1:{ports['port']}", f"127.0.0.1:{ports['idle']}"
        assert req.tuple == Tuple4.parse(local, remote) and req.tuple.local_is_leader(), req

        host = hand_over(chan, hosts, req)
        opened.append(host)
        overlay.sendall(b"hello")  # the follower's bytes before its switch point
        host.sendall(Hop(HopType.READY).pack())
        sent = b"".join(b"m%02d" % i for i in range(20))
        sync = Hop.unpack(recv_exact(host, HOP_SIZE, 10))
        assert sync == Hop(HopType.SYNC, 0, len(sent)), sync  # the leader's commit

        child.stdin.write("\n")
        child.stdin.flush()
        report = json.loads(child.stdout.readline())
        # The channel, the agent's epoll set and eventfd, the host connection (no swap before the
        # follower's SYNC); the FIN's copies too, unless the SYNC's acknowledgement let it go.
        assert len(report["taken"]) >= 4, report
        assert report["names"] == ["/dev/null"] * len(report["taken"]), report
        # The agent's watches (its eventfd, the channel, the host connection) moved with them.
        watched = {int(n): name for n, name in report["watched"].items()}
        assert len(watched) >= 3 and not set(watched) & set(report["taken"]), report
        assert all(n.startswith("socket:") or n == "anon_inode:[eventfd]" for n in watched.values())

        assert recv_exact(overlay, len(sent) + 1, 10) == sent  # then the overlay's FIN
        host.sendall(Hop(HopType.SYNC, 0, 5).pack() + b"world")
        overlay.shutdown(socket.SHUT_WR)
        assert json.loads(child.stdout.readline()) == {"got": "helloworld"}
        assert recv_exact(host, 5, 10) == b"after"  # the application's bytes after the swap
        # The router channel, under its new number, still answers: the idle connection is the
        # process's to switch, the switched one no longer.
        assert claim(chan, 7, idle, remote) == Status.OK
        assert claim(chan, 8, local, remote) == Status.NOT_MINE

        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(30) == 0
        assert host.recv(1) == b""  # the application's close ends the host connection
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for s in opened:
            s.close()
