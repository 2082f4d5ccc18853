"""Invariant 6 on a real testbed (2 hosts x 2 containers, routers as `testbed up` starts them):
only the owner gets a host connection, peer routers authenticate every OFFER, and the policy
keeps denied connections on the overlay.

The hostile side is a process speaking the wire protocols by hand (wire_agent.py), inside a
container (library channel) or a host namespace (peer port). Real connections are made inside
the containers' namespaces, so the routers' sock_diag checks see exactly what a library would.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shuntflow.router.control import query
from shuntflow.router.testing import FakeLibrary
from shuntflow.testbed import Node, Testbed
from shuntflow.testbed.nsutil import pid_cmdline
from shuntflow.testbed.plan import cluster_key_path, host_uplink
from shuntflow.wire import Tuple4

from .apps import (
    assert_intact,
    connect,
    install_path_counters,
    log_of,
    new_lines,
    read_path,
    run_torture,
)

pytestmark = pytest.mark.root

AGENT = str(Path(__file__).with_name("wire_agent.py"))
PREFIX = "sc1"


@pytest.fixture(scope="module")
def tb(make_testbed_module: Any) -> Iterator[Testbed]:
    testbed: Testbed = make_testbed_module(PREFIX, routers=True)
    yield testbed


def status(h: Any) -> dict[str, Any]:
    info: dict[str, Any] = query(h.router_socket.with_name("router.sock.ctl"))["router"]
    return info


def agent(where: Node, *args: str) -> dict[str, Any]:
    out = where.run([sys.executable, AGENT, *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_testbed_key_is_private_and_given_to_every_router(tb: Testbed) -> None:
    key = cluster_key_path(PREFIX)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_bytes().strip()) >= 32
    for h in tb.hosts:
        argv = pid_cmdline(status(h)["pid"])
        assert argv[argv.index("--cluster-key") + 1] == str(key)


def test_only_the_owner_gets_a_host_connection(tb: Testbed) -> None:
    h1, h2 = tb.hosts
    c11, c12 = h1.containers
    c21, c22 = h2.containers
    conn, accepted, t = connect(c11, c21, 8100)
    with conn, accepted:
        before1, before2 = len(log_of(h1)), len(log_of(h2))
        st2 = status(h2)
        # (a) A process in c12 asks for c11's connection: c12's namespace does not hold it.
        stolen = agent(c12, "ask", str(h1.router_socket), str(t.local), str(t.remote))
        # (b) c11 asks for a connection to an address the overlay never connected.
        never = f"{c22.overlay_ip}:9"
        made_up = agent(c11, "ask", str(h1.router_socket), f"{c11.overlay_ip}:45678", never)
        assert stolen == {"status": "DENIED", "fds": 0}
        assert made_up == {"status": "DENIED", "fds": 0}
        lines = new_lines(h1, before1)
        denied = [x for x in lines if "status=DENIED" in x and "event=switch_failed" in x]
        assert len(denied) == 2, lines
        assert f"tuple={t}" in denied[0] and "no such TCP connection" in denied[0]
        assert f"tuple={c11.overlay_ip}:45678->{never}" in denied[1]
        # Nothing reached the peer router: no offer, no claim.
        assert not [x for x in new_lines(h2, before2) if "offer" in x or "claim" in x]
        assert status(h2)["switches_accepted"] == st2["switches_accepted"]
        assert status(h1)["security"]["owner_denials"] >= 2

        # The owner itself gets it (the check is not a blanket refusal): the claimer on h2
        # answers from c21's namespace, which holds the other end.
        with FakeLibrary(h2.router_socket, owned={t.mirrored()}, netns=c21.netns) as lb:
            owner = agent(c11, "ask", str(h1.router_socket), str(t.local), str(t.remote))
            assert owner == {"status": "OK", "fds": 1}
            lb.wait_host([t.key()])


def test_forged_claim_is_denied(tb: Testbed) -> None:
    h1, h2 = tb.hosts
    c11 = h1.containers[0]
    c21, c22 = h2.containers
    conn, accepted, t = connect(c11, c21, 8101)  # c21's end has no library: nobody claims it
    forger = c22.popen(
        [sys.executable, AGENT, "claim", str(h2.router_socket), "4"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert forger.stdout is not None and forger.stdout.readline().strip() == "ready"
        before2 = len(log_of(h2))
        with conn, accepted:
            asked = agent(c11, "ask", str(h1.router_socket), str(t.local), str(t.remote))
        out, _ = forger.communicate(timeout=15)
    finally:
        if forger.poll() is None:
            forger.kill()
            forger.wait()
    forged = json.loads(out.strip().splitlines()[-1])
    assert asked == {"status": "PEER_REFUSED", "fds": 0}
    # The claim goes only to the libraries of the container attached at the tuple's address
    # (c21, which has none here): the forger in c22 never hears of it.
    assert forged == {"claims": [], "results": []}, forged
    lines = new_lines(h2, before2)
    refused = [x for x in lines if "event=offer_refused" in x and f"tuple={t.mirrored()}" in x]
    assert len(refused) == 1 and "no library in the container at" in refused[0], lines
    assert not [x for x in lines if "event=switch_done" in x]


def test_rogue_on_the_peer_port(tb: Testbed) -> None:
    h1, h2 = tb.hosts
    c11 = h1.containers[0]
    c21 = h2.containers[0]
    foreign = "198.18.0.201"
    h1.run(["ip", "addr", "add", f"{foreign}/16", "dev", host_uplink(PREFIX)], check=True)
    t = Tuple4.parse(f"{c11.overlay_ip}:46000", f"{c21.overlay_ip}:8102")  # initiator's view
    with FakeLibrary(h2.router_socket, netns=c21.netns) as watcher:  # owns nothing: NOT_MINE
        before = len(log_of(h2))
        st = status(h2)
        res = agent(
            h1,
            "rogue",
            h2.underlay_ip,
            "4790",
            str(cluster_key_path(PREFIX)),
            str(t.local),
            str(t.remote),
            foreign,
        )
        lines = new_lines(h2, before)
        # The one valid OFFER is authentic: it is handled (one claim, refused by the library)
        # and its ANSWER carries a valid MAC. Everything else is closed without an answer.
        assert res["valid"] == {"answer": "PEER_REFUSED", "mac_ok": True}, res
        assert res["bad_mac"]["answer"] == "closed", res
        assert res["replay"]["answer"] == "closed", res
        assert res["replay_same_port"] == {"same_source": True, "answer": "closed", "bytes": 0}
        assert res["foreign"]["answer"] == "closed", res
        assert len(watcher.claims) == 1 and watcher.claims[0].tuple == t.mirrored()
        rejected = [x for x in lines if "event=offer_rejected" in x]
        reasons = [x.split("reason=")[1] for x in rejected]
        assert reasons == ['"bad MAC"', '"bad MAC"', '"replayed nonce"'], lines
        peer_rejected = [x for x in lines if "event=peer_rejected" in x]
        assert len(peer_rejected) == 1 and f"peer={foreign}:" in peer_rejected[0]
        sec = status(h2)["security"]
        assert sec["offers_rejected"] == st["security"]["offers_rejected"] + 3
        assert sec["peers_rejected"] == st["security"]["peers_rejected"] + 1
    # The routers keep serving real switches (real library, both modes).
    for mode, port in (("shuntflow", 7901), ("slim", 7902)):
        client, server = run_torture(tb, mode, "blocking", 1, 8, port)
        assert_intact(client, 8)
        assert_intact(server, 8)
        assert client["switched"] > 0 and server["switched"] > 0, (mode, client, server)


def test_policy_deny_keeps_a_port_on_the_overlay(make_testbed: Any) -> None:
    tb: Testbed = make_testbed("sc2", routers=True, router_args=["--deny", ":7911"])
    h1, h2 = tb.hosts
    install_path_counters(tb)
    client, server = run_torture(tb, "shuntflow", "blocking", 1, 8, 7911, max_bytes=64 * 1024)
    assert_intact(client, 8)
    assert_intact(server, 8)
    assert client["switched"] == 0 and server["switched"] == 0
    path = read_path(tb)  # every byte the connections moved (counted once, by the client)
    assert path.overlay_payload >= client["bytes"] > 0, (path, client["bytes"])
    lines = log_of(h1) + log_of(h2)
    denied = [x for x in lines if 'detail="policy: deny rule :7911"' in x]
    assert denied and all("status=DENIED" in x for x in denied), lines[-20:]
    assert not [x for x in lines if "event=switch_done" in x and ":7911" in x]
    assert status(h1)["switches_served"] == 0 and status(h2)["switches_served"] == 0
    # Another port still switches.
    client, server = run_torture(tb, "shuntflow", "blocking", 1, 8, 7912)
    assert_intact(client, 8)
    assert_intact(server, 8)
    assert client["switched"] > 0 and server["switched"] > 0
    assert status(h1)["security"]["policy"] == {"allow": [], "deny": [":7911"]}


def test_one_namespace_cannot_take_every_client_slot(make_testbed: Any, tmp_path: Path) -> None:
    """One container's processes get at most `max_clients_per_netns` library channels at their
    host's router; another container's library still gets one, and closed channels free their
    slots. (Before, one container could hold all `max_clients` and keep every other
    container's connections on the overlay.)"""
    conf = tmp_path / "router.toml"
    conf.write_text("max_clients_per_netns = 4\n")
    tb: Testbed = make_testbed("sc3", routers=True, router_args=["--config", str(conf)])
    h1 = tb.hosts[0]
    first, second = [c for c in tb.containers if tb.host(c) is h1][:2]
    sock = str(h1.router_socket)

    def hold_and_release(where: Any, n: int) -> dict[str, Any]:
        out = where.run(
            [sys.executable, AGENT, "hold", sock, str(n)],
            input="",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result

    before = len(log_of(h1))
    holder = first.popen(
        [sys.executable, AGENT, "hold", sock, "6"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert json.loads(holder.stdout.readline()) == {"acked": 4, "refused": 2}
        assert hold_and_release(second, 1) == {"acked": 1, "refused": 0}
        info = status(h1)
        assert info["clients_rejected"] == 2 and info["clients"] == 4, info
        shown = subprocess.run(
            [str(Path(sys.executable).parent / "shuntflow"), "status", "--prefix", "sc3"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "COLUMNS": "400"},  # one line per router, unwrapped
        )
        assert "4 clients (2 turned away)" in shown.stdout, shown.stdout + shown.stderr
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    rejected = [x for x in new_lines(h1, before) if "event=client_rejected" in x]
    assert len(rejected) == 2 and all("one network namespace" in x for x in rejected), rejected
    deadline = time.monotonic() + 5
    while status(h1)["clients"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hold_and_release(first, 4) == {"acked": 4, "refused": 0}
