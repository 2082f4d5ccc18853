"""The routers of a real testbed (2 hosts x 2 containers, kernel VXLAN overlay programmed like
Docker's, one router per host namespace started by the testbed with --vxlan-dev only): overlay
IPs resolve from the kernel's neighbour table + FDB, host connections cross the underlay
between the host namespaces, and `shuntflow status --prefix` finds every router."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shuntflow.router.control import query
from shuntflow.router.testing import FakeLibrary
from shuntflow.wire import Status, Tuple4

from ..support import SHUNTFLOW
from .apps import SCRIPT_PRELUDE, Apps, PathBytes, assert_path

pytestmark = pytest.mark.root

TESTBED_PREFIX = "rt1"
TESTBED_ROUTERS = True


def overlay_connection(
    client: Any, server: Any, port: int
) -> tuple[socket.socket, socket.socket, socket.socket]:
    """A real TCP connection client -> server:port over the overlay, each socket made inside
    its container's namespace (by a thread that entered it): the ownership check finds it."""
    listener = server.in_netns(lambda: socket.create_server((server.overlay_ip, port), backlog=4))
    conn = client.in_netns(lambda: socket.create_connection((server.overlay_ip, port), timeout=5))
    accepted, _ = listener.accept()
    return conn, accepted, listener


def test_switch_crosses_the_underlay(testbed: Any) -> None:
    h1, h2 = testbed.hosts
    c11, c12 = h1.containers
    c21 = h2.containers[0]
    conn, accepted, listener = overlay_connection(c11, c21, 8080)
    t = Tuple4.parse("{}:{}".format(*conn.getsockname()), "{}:{}".format(*conn.getpeername()))
    with (
        conn,
        accepted,
        listener,
        FakeLibrary(h1.router_socket, netns=c11.netns) as la,
        FakeLibrary(h2.router_socket, owned={t.mirrored()}, netns=c21.netns) as lb,
    ):
        res = la.wait_result(la.request(t))
        assert res.msg.status == Status.OK, Status(res.msg.status).name
        assert res.sock is not None
        lb.wait_host([t.key()])
        x, y = res.sock, lb.host[t.key()]
        # Built in the host namespaces: underlay addresses, the peer router's port.
        assert x.getsockname()[0] == h1.underlay_ip
        assert x.getpeername() == (h2.underlay_ip, 4790)
        assert x.getsockname() == y.getpeername() and x.getpeername() == y.getsockname()
        x.settimeout(5)
        y.settimeout(5)
        payload = b"over the underlay" * 1000
        x.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += y.recv(65536)
        assert got == payload
        y.sendall(b"back")
        assert x.recv(10) == b"back"
        # Same-host and unknown destinations never switch (the ownership check comes first:
        # these connections exist).
        conn2, acc2, lis2 = overlay_connection(c11, c12, 8081)
        with conn2, acc2, lis2:
            local = Tuple4.parse(
                "{}:{}".format(*conn2.getsockname()), "{}:{}".format(*conn2.getpeername())
            )
            assert la.wait_result(la.request(local)).msg.status == Status.NO_ROUTE
        # A library on h1 claiming h2's overlay address, or a connection nobody holds: denied.
        unknown = Tuple4.parse(f"{c11.overlay_ip}:41002", "198.19.9.9:80")
        assert la.wait_result(la.request(unknown)).msg.status == Status.DENIED
        spoof = Tuple4.parse(f"{c21.overlay_ip}:41003", f"{c11.overlay_ip}:80")
        assert la.wait_result(la.request(spoof)).msg.status == Status.DENIED


def test_claim_asked_again_once_accepted(testbed: Any) -> None:
    """The OFFER reaches the accepting end while its connection waits in the listener's queue,
    so no library there can know it (the connecting end reached its threshold first): the
    claim is asked again until the application accepts it, and taken then. Refused instead,
    the connecting end would ask again only after twice its calls."""
    h1, h2 = testbed.hosts
    c11, c21 = h1.containers[0], h2.containers[0]
    listener = c21.in_netns(lambda: socket.create_server((c21.overlay_ip, 8082), backlog=4))
    conn = c11.in_netns(lambda: socket.create_connection((c21.overlay_ip, 8082), timeout=5))
    t = Tuple4.parse("{}:{}".format(*conn.getsockname()), "{}:{}".format(*conn.getpeername()))
    with (
        conn,
        listener,
        FakeLibrary(h1.router_socket, netns=c11.netns) as la,
        FakeLibrary(h2.router_socket, netns=c21.netns) as lb,
    ):
        seq = la.request(t)
        deadline = time.monotonic() + 5
        while not lb.claims:  # asked, and said NOT_MINE: it holds no such connection yet
            assert time.monotonic() < deadline, la.results
            time.sleep(0.001)
        accepted, _ = listener.accept()
        with accepted:
            lb.owned.add(t.mirrored())
            res = la.wait_result(seq)
            assert res.msg.status == Status.OK, Status(res.msg.status).name
            lb.wait_host([t.key()])
            assert len(lb.claims) >= 2, lb.claims
            assert all(c.seq == lb.claims[0].seq for c in lb.claims)  # one claim, asked again


def test_status_over_the_testbed(testbed: Any) -> None:
    h1, h2 = testbed.hosts
    # From a container of each host: a namespace attached to no overlay address gets no channel.
    with (
        FakeLibrary(h1.router_socket, netns=h1.containers[0].netns),
        FakeLibrary(h2.router_socket, netns=h2.containers[0].netns),
    ):
        out = subprocess.run(
            [SHUNTFLOW, "status", "--json", "--prefix", TESTBED_PREFIX],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        routers = json.loads(out.stdout)["routers"]
        infos = sorted((r["status"]["router"] for r in routers), key=lambda i: i["host_ip"])
        assert [i["host_ip"] for i in infos] == [h1.underlay_ip, h2.underlay_ip]
        for info in infos:
            assert info["clients"] >= 1
            # Each router sees the other host's containers in its VXLAN device.
            assert info["overlay_map"]["vxlan_dev"] == h1.vxlan_dev
            assert info["overlay_map"]["neighbours"] >= len(h2.containers)
            assert info["overlay_map"]["netlink_error"] is None


def test_routers_are_in_the_host_namespaces(testbed: Any) -> None:
    for h in testbed.hosts:
        pid = query(h.router_socket.with_name("router.sock.ctl"), "ping")["pid"]
        own = Path(f"/proc/{pid}/ns/net").stat().st_ino
        ns = Path(f"/run/netns/{h.netns}").stat().st_ino
        assert own == ns


SERVER = (
    SCRIPT_PRELUDE
    + r"""
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000))
s.listen()
print("listening", flush=True)
c, _ = s.accept()
while True:
    d = c.recv(65536)
    if not d:
        break
    c.sendall(d)
print("switched" if netns_cookie(c) != netns_cookie(s) else "overlay", flush=True)
"""
)

# After SWITCH_WAIT (apps.py): waits until its fd is a host-namespace socket, then echoes 200
# checked messages, all of them after the switch point.
CLIENT = r"""
s = socket.create_connection((sys.argv[1], 9000))
wait_switched(s, lambda: echo(s, b"ping"))
payload = 0
for i in range(200):
    m = (b"%06d" % i) * 100
    echo(s, m)
    payload += 2 * len(m)
    time.sleep(0.002)
print(json.dumps({"payload": payload}))
"""


def test_real_library_switches_through_the_routers(testbed: Any) -> None:
    """Unmodified Python echo client/server with libshuntflow.so (shuntflow mode): the stream
    stays intact, both ends' fds become sockets of their host namespaces, and every byte after
    the switch crosses the host path, none of it VXLAN."""
    apps = Apps(testbed)
    with apps.server([sys.executable, "-c", SERVER], "shuntflow", 9000) as server:
        result, path = apps.checked_phase(CLIENT, "shuntflow")
        out, _ = server.communicate(timeout=10)
        assert server.returncode == 0 and out.split() == ["listening", "switched"], out
    assert_path("shuntflow", PathBytes(), path, result["payload"], conns=1)


# Two echoes (4 data calls: below the threshold), a pause in which the library's agent has long
# opened its router channel (it does so when the process tracks its first connection), then
# echoes on the main thread until the fd is a host-namespace socket.
ASKING_CLIENT = (
    SCRIPT_PRELUDE
    + r"""
s = socket.create_connection((sys.argv[1], 9000))
echo(s, b"a")
echo(s, b"b")
time.sleep(0.5)
with socket.socket() as probe:
    own = netns_cookie(probe)
deadline = time.monotonic() + 30
i = 0
while netns_cookie(s) == own and time.monotonic() < deadline:
    echo(s, b"%06d" % i)
    i += 1
    time.sleep(0.001)
print(json.dumps({"tid": threading.get_native_id(), "switched": netns_cookie(s) != own}))
"""
)


def test_the_application_thread_asks_the_router_itself(
    testbed: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data call that reaches the threshold sends the SWITCH_REQ from its own thread when
    the router channel is up (no agent wake-up before the request): each library names the
    thread that sent it, and in these single-threaded programs that is the main thread (its
    thread id is the pid), not the agent."""
    log = tmp_path / "lib.log"
    monkeypatch.setenv("SHUNTFLOW_LOG", str(log))
    apps = Apps(testbed)
    with apps.server([sys.executable, "-c", SERVER], "shuntflow", 9000) as server:
        done = apps.client([sys.executable, "-c", ASKING_CLIENT, apps.server_ip], "shuntflow")
        assert done.returncode == 0, done.stderr[-2000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
        served, _ = server.communicate(timeout=10)
    assert out["switched"] and served.split() == ["listening", "switched"], (out, served)
    asks = [line for line in log.read_text().splitlines() if "asked the router" in line]
    by_app: dict[int, list[int]] = {}
    for line in asks:
        m = re.search(r"shuntflow\[(\d+)\]: .*by the application thread (\d+)\)", line)
        if m:
            by_app.setdefault(int(m[1]), []).append(int(m[2]))
    # The client asked, from the thread that printed its id; nothing was left to the agent.
    assert out["tid"] in by_app, asks
    assert by_app[out["tid"]] == [out["tid"]] * len(by_app[out["tid"]]), asks
    client_asks = [x for x in asks if f"shuntflow[{out['tid']}]:" in x]
    assert not [x for x in client_asks if "by the agent" in x], client_asks
    # Every request an application thread sent came from that process's main thread.
    assert all(tids == [pid] * len(tids) for pid, tids in by_app.items()), asks


ECHO_SERVER = (
    SCRIPT_PRELUDE
    + r"""
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9002))
s.listen(512)
print("listening", flush=True)
def serve(c):
    with c:
        while d := c.recv(65536):
            c.sendall(d)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""
)

# One connection starts the agent (at its 8th data call: 4 echoes) and so opens the router channel,
# without reaching the threshold itself; on "go", CONNS connections each cross the threshold
# (argv[2]) with checked echoes, more requests than the channel's socket buffer holds (about
# 280 frames of 48 bytes with the default 208 KiB); on "go", echoes on all of them until each
# is a host-namespace socket (or 20 s), every reply checked.
QUEUE_CLIENT = (
    SCRIPT_PRELUDE
    + r"""
CONNS = 320
first = socket.create_connection((sys.argv[1], 9002))
for _ in range(4):
    echo(first, b"hello")
time.sleep(0.5)
print("ready", flush=True)
assert sys.stdin.readline() == "go\n"
conns = [socket.create_connection((sys.argv[1], 9002)) for _ in range(CONNS)]
for i, s in enumerate(conns):
    for j in range(int(sys.argv[2]) // 2 + 1):
        echo(s, b"%d.%d" % (i, j))
print("asked", flush=True)
assert sys.stdin.readline() == "go\n"
with socket.socket() as probe:
    own = netns_cookie(probe)
deadline = time.monotonic() + 20
n = 0
while time.monotonic() < deadline and any(netns_cookie(s) == own for s in conns):
    for i, s in enumerate(conns):
        echo(s, b"%d:%d" % (i, n))
    n += 1
    time.sleep(0.002)
print(json.dumps({"switched": sum(netns_cookie(s) != own for s in conns), "echoes": n}))
"""
)


def test_a_full_router_channel_falls_back_to_the_agent(
    testbed: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With its router stopped, the channel takes only so many datagrams: the application
    threads' non-blocking SWITCH_REQs that do not fit fall back to the agent, whose send finds
    the channel full too and gives the attempt up (status INTERNAL, retried later). Nothing
    blocks, every echo is intact, and once the router runs again the connections switch."""
    log = tmp_path / "lib.log"
    monkeypatch.setenv("SHUNTFLOW_LOG", str(log))
    h1 = testbed.hosts[0]
    router = int(h1.router_pid_file.read_text())
    apps = Apps(testbed)

    def client_lines(pid: int) -> list[str]:
        return [x for x in log.read_text().splitlines() if f"shuntflow[{pid}]:" in x]

    with apps.server([sys.executable, "-c", ECHO_SERVER], "shuntflow", 9002):
        client = apps.python_client(QUEUE_CLIENT, "shuntflow", "16", threshold=16)
        assert client.stdin is not None and client.stdout is not None
        try:
            assert client.stdout.readline() == "ready\n"
            opened = f"router channel open: {h1.router_socket}"
            pid = next(
                int(m[1])
                for x in log.read_text().splitlines()
                if x.endswith(opened) and (m := re.search(r"shuntflow\[(\d+)\]", x))
            )
            os.kill(router, signal.SIGSTOP)
            try:
                client.stdin.write("go\n")
                client.stdin.flush()
                # A blocking send would hang the client here, with its router stopped.
                ready, _, _ = select.select([client.stdout], [], [], 60)
                assert ready, "the client blocked while its router was stopped"
                assert client.stdout.readline() == "asked\n"
                # The agent tries each request the channel did not take, 100 ms apiece.
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not any(
                    "switch abandoned (status 7)" in x for x in client_lines(pid)
                ):
                    time.sleep(0.05)
                lines = client_lines(pid)
            finally:
                os.kill(router, signal.SIGCONT)
            client.stdin.write("go\n")
            client.stdin.flush()
            out, err = client.communicate(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    assert client.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    direct = [x for x in lines if "by the application thread" in x]
    given_up = [x for x in lines if "switch abandoned (status 7)" in x]
    # Some requests fit in the stopped router's queue, sent by the application threads; the
    # others went to the agent, whose own send could not get through either.
    assert direct and given_up, lines[-40:]
    assert all(x.endswith(f"by the application thread {pid})") for x in direct), direct
    # The router, running again, served what was queued and the retries: the connections
    # switched, their echoes intact (checked by the client).
    assert result["switched"] > 0, result
    print(
        f"\nrouter stopped: {len(direct)} requests sent by application threads, "
        f"{len(given_up)} left to the agent and given up; then {result['switched']} of 320 switched"
    )
