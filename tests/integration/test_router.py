"""The routers of a real testbed (2 hosts x 2 containers, kernel VXLAN overlay programmed like
Docker's, one router per host namespace started by the testbed with --vxlan-dev only): overlay
IPs resolve from the kernel's neighbour table + FDB, host connections cross the underlay
between the host namespaces, and `shuntflow status --prefix` finds every router."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shuntflow.router.control import query
from shuntflow.router.testing import FakeLibrary
from shuntflow.wire import Status, Tuple4

from ..support import SHUNTFLOW
from .apps import Apps, PathBytes, assert_path

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


SERVER = r"""
import socket
SO_NETNS_COOKIE = 71
def cookie(s):
    return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
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
print("switched" if cookie(c) != cookie(s) else "overlay", flush=True)
"""

# After SWITCH_WAIT (apps.py): waits until its fd is a host-namespace socket, then echoes 200
# checked messages, all of them after the switch point.
CLIENT = r"""
s = socket.create_connection((sys.argv[1], 9000))
def echo(m):
    s.sendall(m)
    got = b""
    while len(got) < len(m):
        got += s.recv(65536)
    assert got == m
wait_switched(s, lambda: echo(b"ping"))
payload = 0
for i in range(200):
    m = (b"%06d" % i) * 100
    echo(m)
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
ASKING_CLIENT = r"""
import json, socket, sys, threading, time
SO_NETNS_COOKIE = 71
def cookie(s):
    return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
s = socket.create_connection((sys.argv[1], 9000))
def echo(m):
    s.sendall(m)
    got = b""
    while len(got) < len(m):
        got += s.recv(65536)
    assert got == m
echo(b"a")
echo(b"b")
time.sleep(0.5)
with socket.socket() as probe:
    own = cookie(probe)
deadline = time.monotonic() + 30
i = 0
while cookie(s) == own and time.monotonic() < deadline:
    echo(b"%06d" % i)
    i += 1
    time.sleep(0.001)
print(json.dumps({"tid": threading.get_native_id(), "switched": cookie(s) != own}))
"""


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
