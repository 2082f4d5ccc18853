"""An unprivileged attacker inside a container, on a real testbed (routers as `testbed up`
starts them): it must not get another container's connection from either end, must not turn a
handed-over host socket into another host-network socket, and must not crowd the other
containers off their router. A flood on the peer port must not stop real switches.

The attacker runs as nobody (setpriv), mostly under `unshare -Urn`: a user and network namespace
of its own, which costs no privilege. It speaks the wire protocols by hand (wire_agent.py). Every
test also checks that legitimate switches go on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import shuntflow
from shuntflow.router.control import query
from shuntflow.router.testing import FakeLibrary
from shuntflow.testbed import Node, Testbed
from shuntflow.wire import Status, Tuple4

from .apps import assert_intact, connect, log_of, new_lines, run_torture

pytestmark = pytest.mark.root

PREFIX = "sy1"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
# The wire agent's command line, set by `agent_anyone_can_run` for the module.
AGENT: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def agent_anyone_can_run() -> Iterator[None]:
    """nobody may not be able to reach the checkout or its venv (a clone under a 0700 temp
    directory): the agent runs from a world-readable copy of itself and of the package (it needs
    only the standard library), with the interpreter the venv was made from."""
    root = Path(tempfile.mkdtemp(prefix="sf-agent-"))
    root.chmod(0o755)
    shutil.copy(Path(__file__).with_name("wire_agent.py"), root / "wire_agent.py")
    shutil.copytree(
        Path(shuntflow.__file__).parent,
        root / "shuntflow",
        ignore=shutil.ignore_patterns("_native", "__pycache__"),
    )
    AGENT[:] = [os.path.realpath(sys.executable), str(root / "wire_agent.py")]
    yield
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def tb(make_testbed_module: Any) -> Iterator[Testbed]:
    testbed: Testbed = make_testbed_module(PREFIX, routers=True)
    yield testbed


def status(h: Any) -> dict[str, Any]:
    info: dict[str, Any] = query(h.router_socket.with_name("router.sock.ctl"))["router"]
    return info


def attacker_argv(args: Sequence[str], own_netns: bool = True) -> list[str]:
    unshare = ["unshare", "-Urn"] if own_netns else []
    return [*NOBODY, *unshare, *AGENT, *args]


def attack(where: Node, *args: str, own_netns: bool = True) -> dict[str, Any]:
    out = where.run(attacker_argv(args, own_netns), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_copied_tuple_gets_no_host_connection(tb: Testbed) -> None:
    """Attack 1: container A copies container B's 4-tuple onto the loopback of a namespace of
    its own and asks its router for B's host connection."""
    h1, h2 = tb.hosts
    a, b = h1.containers
    server = h2.containers[0]
    conn, accepted, t = connect(b, server, 8200)
    with (
        conn,
        accepted,
        FakeLibrary(h2.router_socket, owned={t.mirrored()}, netns=server.netns) as peer_lib,
    ):
        before1, before2 = len(log_of(h1)), len(log_of(h2))
        stolen = attack(a, "copy-ask", str(h1.router_socket), str(t.local), str(t.remote))
        assert stolen == {"status": "channel refused", "fds": 0}, stolen
        assert not peer_lib.host and not peer_lib.claims
        lines = new_lines(h1, before1)
        refused = [x for x in lines if "event=client_rejected" in x]
        assert len(refused) == 1, lines
        assert "attached to no overlay address" in refused[0], refused
        assert not [x for x in new_lines(h2, before2) if "event=switch_done" in x]
        # B itself still gets its connection.
        own = agent_root(b, "ask", str(h1.router_socket), str(t.local), str(t.remote))
        assert own == {"status": "OK", "fds": 1}
        peer_lib.wait_host([t.key()])


def agent_root(where: Node, *args: str) -> dict[str, Any]:
    """The legitimate side: a process of the container itself (the testbed runs them as root)."""
    out = where.run([*AGENT, *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_copied_claim_gets_nothing(tb: Testbed) -> None:
    """Attack 2: on the answering host, another container copies every offered tuple and
    answers "mine" before the real owner does."""
    h1, h2 = tb.hosts
    client = h1.containers[0]
    server, thief_c = h2.containers
    conn, accepted, t = connect(client, server, 8201)
    before2 = len(log_of(h2))
    thief = thief_c.popen(
        attacker_argv(["copy-claim", str(h2.router_socket), "6"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    received = b""
    try:
        assert thief.stdout is not None and thief.stdout.readline().strip() == "ready"
        # (the rest of stdout is read through the same buffered reader below)
        with (
            conn,
            accepted,
            FakeLibrary(
                h2.router_socket, owned={t.mirrored()}, netns=server.netns, claim_delay=0.05
            ) as real,
            FakeLibrary(h1.router_socket, owned={t}, netns=client.netns) as asker,
        ):
            res = asker.wait_result(asker.request(t))
            assert res.msg.status == Status.OK and res.sock is not None, res
            res.sock.sendall(b"PASSWORD=hunter2")
            with contextlib.suppress(TimeoutError):
                real.wait_host([t.key()], timeout=3)
            if t.key() in real.host:
                host = real.host[t.key()]
                host.settimeout(5)
                while len(received) < 16 and (chunk := host.recv(64)):
                    received += chunk
        assert thief.stdout is not None
        out = thief.stdout.read()
        thief.wait(timeout=15)
    finally:
        if thief.poll() is None:
            thief.kill()
            thief.wait()
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {"channel": "refused", "claims": [], "results": []}, got
    assert received == b"PASSWORD=hunter2"
    refused = [x for x in new_lines(h2, before2) if "event=client_rejected" in x]
    assert len(refused) == 1 and "attached to no overlay address" in refused[0], refused


def test_handed_over_socket_cannot_become_another_connection(tb: Testbed) -> None:
    """Attack 3: the owner of a switched connection disconnects its host socket and connects
    it again: to the host's loopback services, to the peer routers' port; or binds, listens."""
    h1, h2 = tb.hosts
    c11 = h1.containers[0]
    server = h2.containers[0]
    local = f"{c11.overlay_ip}:46100"
    remote = f"{server.overlay_ip}:8202"
    t = Tuple4.parse(local, remote)
    listener = server.in_netns(lambda: socket.create_server((server.overlay_ip, 8202), backlog=4))
    # A service on the host's loopback that no container should reach.
    service = h1.in_netns(lambda: socket.create_server(("127.0.0.1", 0), backlog=4))
    reached: list[str] = []

    def serve() -> None:
        service.settimeout(10)
        with contextlib.suppress(OSError):
            c, addr = service.accept()
            reached.append("{}:{}".format(*addr))
            c.close()

    held: list[socket.socket] = []

    def accept_overlay() -> None:
        listener.settimeout(10)
        with contextlib.suppress(OSError):
            held.append(listener.accept()[0])  # an accepted socket: owned by a process

    watcher = threading.Thread(target=serve, daemon=True)
    watcher.start()
    acceptor = threading.Thread(target=accept_overlay, daemon=True)
    acceptor.start()
    before1 = len(log_of(h1))
    heard: list[str] = []
    with (
        listener,
        service,
        FakeLibrary(h2.router_socket, owned={t.mirrored()}, netns=server.netns) as peer_lib,
    ):
        proc = c11.popen(
            attacker_argv(
                [
                    "escape",
                    str(h1.router_socket),
                    local,
                    remote,
                    str(service.getsockname()[1]),
                    h2.underlay_ip,
                    "4790",
                ],
                own_netns=False,
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline()
            assert line, proc.communicate(timeout=10)[1][-2000:]
            got = json.loads(line)
            if "listening" in got:
                # listen() itself may succeed; nothing may reach the listener.
                port = int(got["listening"].rsplit(":", 1)[1])
                for ip in ("127.0.0.1", h1.underlay_ip):
                    with contextlib.suppress(OSError):
                        h1.in_netns(
                            lambda ip=ip: socket.create_connection((ip, port), timeout=1)
                        ).close()
                        heard.append(ip)
            proc.stdin.close()
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        service.close()
        watcher.join(timeout=15)
        acceptor.join(timeout=15)
        peer_lib.wait_host([t.key()])
    for s in held:
        s.close()
    assert got["status"] == "OK" and got["fds"] == 1, got
    assert got["host_local"].startswith(h1.underlay_ip + ":")  # a host-namespace socket
    assert got["set_mark"] == "EPERM", got  # the mark belongs to the host's namespace
    assert got["connect_loopback"] == "EPERM" and got["connect_peer"] == "EPERM", json.dumps(got)
    assert got["bind"] == "EPERM", got
    # This kernel refuses listen() on a once-connected socket by itself (EINVAL); where one may
    # listen, the guard drops every packet addressed to it.
    assert got["listen"] in ("EPERM", "EINVAL", "ok") and heard == [], (got, heard)
    assert reached == []
    assert [x for x in new_lines(h1, before1) if "event=switch_done" in x and str(t) in x]
    guard = status(h1)["security"]["socket_guard"]
    assert guard["refused_connect"] >= 2 and guard["refused_bind"] >= 1, guard
    # The router logs what its programs refused (checked on its housekeeping round, 5 s).
    deadline = time.monotonic() + 15
    while not [x for x in new_lines(h1, before1) if "event=socket_guard_refused" in x]:
        assert time.monotonic() < deadline, new_lines(h1, before1)[-20:]
        time.sleep(0.2)


def test_invented_reports_do_not_count(tb: Testbed) -> None:
    """A process reports a switch it never had and answers STATS_REQ with one real connection
    and 2,000 invented ones: the status shows the real one only."""
    h1, h2 = tb.hosts
    c11 = h1.containers[0]
    conn, accepted, t = connect(c11, h2.containers[0], 8203)
    before = len(log_of(h1))
    times = status(h1)["switch_time_us"]
    with conn, accepted:
        reporter = c11.popen(
            attacker_argv(
                ["report", str(h1.router_socket), str(t.local), str(t.remote), "2000", "8"],
                own_netns=False,
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert reporter.stdout is not None and reporter.stdout.readline().strip() == "ready"
            shown = query(h1.router_socket.with_name("router.sock.ctl"), timeout=30)
        finally:
            reporter.kill()
            reporter.wait()
    procs = [p for p in shown["processes"] if p["cred_pid"] == reporter.pid]
    assert len(procs) == 1, shown["processes"]
    rows = procs[0]["connections"]
    assert [(r["local"], r["remote"]) for r in rows] == [(str(t.local), str(t.remote))], len(rows)
    assert procs[0]["rows_rejected"] == 2000
    assert shown["router"]["switch_time_us"] == times  # the invented SWITCH_DONE is not a sample
    lines = new_lines(h1, before)
    rejected = [x for x in lines if "event=report_rejected" in x]
    assert any("frame=SWITCH_DONE" in x for x in rejected), lines
    assert any("frame=CONN_INFO" in x and "rows=2000" in x for x in rejected), lines


def test_peer_port_flood_leaves_switches_working(tb: Testbed) -> None:
    """A process on an allowed underlay source reconnects to the peer port in a loop (300
    connects a second, up to 1,500 held open: more than the router reads offers from at once),
    while real connections switch. (After the guard, a container has no way to the peer port;
    this stands for what a handed-over socket gave it before, or for any host process.)"""
    h1, h2 = tb.hosts
    flooder = h1.popen(
        [*AGENT, "flood", h2.underlay_ip, "4790", "25", "1500", "300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(6)  # the flood holds more than the router reads offers from at once by now
        before1, before2 = len(log_of(h1)), len(log_of(h2))
        # Long enough connections that each is still open when its switch comes, however
        # slowly the loaded machine gets there.
        client, server = run_torture(
            tb, "shuntflow", "blocking", 1, 8, 7920, max_bytes=4 << 20, timeout=60
        )
        out, err = flooder.communicate(timeout=60)
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait()
    flood = json.loads(out.strip().splitlines()[-1])
    assert flood["connects"] > 1024, (flood, err[-2000:])
    assert_intact(client, 8)
    assert_intact(server, 8)
    assert client["switched"] > 0 and server["switched"] > 0, (client, server)
    lines = new_lines(h2, before2)
    assert [x for x in lines if "event=switch_done" in x and ":7920" in x], lines[-20:]
    # No real offer was turned away: the router made room by closing idle connections.
    assert not [x for x in lines if "too many incoming offers" in x]
    assert [x for x in lines if "evicted before its OFFER" in x]
    unreachable = [
        x
        for x in new_lines(h1, before1)
        if "event=switch_failed" in x and ("PEER_UNREACHABLE" in x or "TIMEOUT" in x)
    ]
    assert not unreachable, unreachable
    assert status(h2)["pid"] and status(h1)["pid"]  # both routers still answer


def test_namespaces_buy_no_channels(make_testbed: Any, tmp_path: Path) -> None:
    """Attack 4: one container's unprivileged process makes fresh `unshare -Urn` namespaces and
    opens channels from each until the router's table is full; another container's library must
    still get a channel."""
    conf = tmp_path / "router.toml"
    conf.write_text("max_clients = 8\nmax_clients_per_netns = 4\n")
    tb: Testbed = make_testbed("sy2", routers=True, router_args=["--config", str(conf)])
    h1 = tb.hosts[0]
    first, second = h1.containers
    sock = str(h1.router_socket)
    before = len(log_of(h1))
    holder = first.popen(
        [*NOBODY, *AGENT, "spawn-hold", sock, "3", "4"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        taken = json.loads(holder.stdout.readline())
        out = second.run(
            [*AGENT, "hold", sock, "1"],
            input="",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        other = json.loads(out.stdout.strip().splitlines()[-1])
        # The attacker's own container still has its slots.
        own = first.run(
            [*NOBODY, *AGENT, "hold", sock, "5"],
            input="",
            capture_output=True,
            text=True,
            timeout=30,
        )
        mine = json.loads(own.stdout.strip().splitlines()[-1])
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    assert taken == {"acked": 0, "refused": 12}, taken
    assert other == {"acked": 1, "refused": 0}, other
    assert mine == {"acked": 4, "refused": 1}, mine
    rejected = [x for x in new_lines(h1, before) if "event=client_rejected" in x]
    assert len([x for x in rejected if "attached to no overlay address" in x]) == 12, rejected
    assert len([x for x in rejected if "one network namespace" in x]) == 1, rejected
    # Legitimate switches on this testbed still happen.
    client, server = run_torture(tb, "shuntflow", "blocking", 1, 4, 7930)
    assert_intact(client, 4)
    assert_intact(server, 4)
    assert client["switched"] > 0 and server["switched"] > 0
