"""Overlay IP -> host IP from the kernel's VXLAN state (neighbour table + FDB, and Flannel-style
routes via a gateway), in a throw-away namespace `rt-map1` with a device `rt-vx`. Needs root
(network namespaces). The static map: tests/unit/test_router_static_map.py."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address as IP
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from shuntflow.router.overlay_map import Kind, Resolver, StaticMap, read_vxlan_tables
from shuntflow.router.testing import FakeLibrary, RouterProcess, free_port
from shuntflow.wire import Status, Tuple4

from .locks import prefix_lock

pytestmark = pytest.mark.root

NS = "rt-map1"
DEV = "rt-vx"
NUD_PERMANENT = 0x80
NTF_MASTER = 0x04
RTNH_F_ONLINK = 0x04


def _ns(*cmd: str) -> None:
    subprocess.run(["ip", *cmd], check=True, capture_output=True)


@pytest.fixture()
def vxlan_ns() -> Iterator[Any]:
    with prefix_lock(NS.split("-")[0]):  # another test run on this machine uses the same names
        yield from _vxlan_ns()


def _vxlan_ns() -> Iterator[Any]:
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)  # leftovers of a crash
    _ns("netns", "add", NS)
    try:
        with IPRoute(netns=NS) as ipr:
            ipr.link("set", index=1, state="up")
            ipr.addr("add", index=1, address="198.18.0.1", prefixlen=32)
            ipr.link("add", ifname="rt-br", kind="bridge")
            ipr.link("add", ifname=DEV, kind="vxlan", vxlan_id=42, vxlan_port=4789)
            idx = ipr.link_lookup(ifname=DEV)[0]
            br = ipr.link_lookup(ifname="rt-br")[0]
            ipr.link("set", index=idx, master=br)
            ipr.link("set", index=idx, state="up")
            ipr.link("set", index=br, state="up")
            # Docker overlay: container 198.19.2.1 on host 198.18.0.2.
            ipr.neigh(
                "add",
                dst="198.19.2.1",
                lladdr="02:42:c6:13:02:01",
                ifindex=idx,
                state=NUD_PERMANENT,
            )
            ipr.fdb("add", ifindex=idx, lladdr="02:42:c6:13:02:01", dst="198.18.0.2")
            # ... and the bridge's own (dst-less) entry for the same MAC on the VXLAN port.
            ipr.fdb(
                "add",
                ifindex=idx,
                lladdr="02:42:c6:13:02:01",
                master=br,
                state=NUD_PERMANENT,
                flags=NTF_MASTER,
            )
            # A container whose FDB dst is this very host: local.
            ipr.neigh(
                "add",
                dst="198.19.1.5",
                lladdr="02:42:c6:13:01:05",
                ifindex=idx,
                state=NUD_PERMANENT,
            )
            ipr.fdb("add", ifindex=idx, lladdr="02:42:c6:13:01:05", dst="198.18.0.1")
            # Flannel: 198.19.3.0/24 via 198.19.3.0 onlink; the gateway's MAC lives on 198.18.0.3.
            ipr.neigh(
                "add",
                dst="198.19.3.0",
                lladdr="02:42:c6:13:03:00",
                ifindex=idx,
                state=NUD_PERMANENT,
            )
            ipr.fdb("add", ifindex=idx, lladdr="02:42:c6:13:03:00", dst="198.18.0.3")
            ipr.route(
                "add", dst="198.19.3.0/24", gateway="198.19.3.0", oif=idx, flags=RTNH_F_ONLINK
            )
            # A neighbour without any FDB entry: unknown (fall back to the static map).
            ipr.neigh(
                "add",
                dst="198.19.4.1",
                lladdr="02:42:c6:13:04:01",
                ifindex=idx,
                state=NUD_PERMANENT,
            )
            yield ipr, idx
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def add_container(ipr: Any, idx: int) -> None:
    ipr.neigh("add", dst="198.19.2.9", lladdr="02:42:c6:13:02:09", ifindex=idx, state=NUD_PERMANENT)
    ipr.fdb("add", ifindex=idx, lladdr="02:42:c6:13:02:09", dst="198.18.0.2")


def test_read_tables(vxlan_ns: Any) -> None:
    tables = read_vxlan_tables(DEV, NS)
    assert tables.error is None
    assert tables.neigh[IP("198.19.2.1")] == "02:42:c6:13:02:01"
    assert tables.fdb["02:42:c6:13:02:01"] == IP("198.18.0.2")  # the dst-less entry lost
    assert tables.lookup(IP("198.19.2.1"), IP("198.18.0.1")).host == IP("198.18.0.2")
    assert read_vxlan_tables("rt-nodev", NS).error == "no device rt-nodev"


def test_resolver_netlink_and_static_fallback(vxlan_ns: Any, tmp_path: Path) -> None:
    ipr, idx = vxlan_ns
    static = StaticMap({"198.19.4.0/24": "198.18.0.4", "198.19.2.1": "198.18.0.99"})

    async def main() -> None:
        # An hour between refreshes: the test ages the snapshot itself instead of waiting, so a
        # slow thread hop cannot make the rate-limited miss refresh.
        r = Resolver(IP("198.18.0.1"), static, DEV, NS, min_refresh_interval=3600)
        await r.refresh()
        remote = await r.resolve(IP("198.19.2.1"))
        assert (remote.kind, remote.host, remote.source) == (
            Kind.REMOTE,
            IP("198.18.0.2"),
            "netlink",
        )
        local = await r.resolve(IP("198.19.1.5"))
        assert local.kind is Kind.LOCAL
        flannel = await r.resolve(IP("198.19.3.77"))
        assert (flannel.kind, flannel.host) == (Kind.REMOTE, IP("198.18.0.3"))
        fallback = await r.resolve(IP("198.19.4.1"))  # neighbour without FDB: static map
        assert (fallback.kind, fallback.host, fallback.source) == (
            Kind.REMOTE,
            IP("198.18.0.4"),
            "map",
        )
        assert (await r.resolve(IP("198.19.9.9"))).kind is Kind.UNKNOWN
        refreshes = r.refreshes
        # A new container appears: the miss re-reads the tables, at most once per interval.
        # (pyroute2's sync API cannot run on a thread with a running event loop.)
        await asyncio.to_thread(add_container, ipr, idx)
        assert (await r.resolve(IP("198.19.2.9"))).kind is Kind.UNKNOWN  # rate-limited
        assert r.refreshes == refreshes
        r.tables.taken_at -= 3600
        found = await r.resolve(IP("198.19.2.9"))
        assert (found.kind, found.host) == (Kind.REMOTE, IP("198.18.0.2"))
        assert r.refreshes == refreshes + 1
        # Concurrent misses share one dump.
        r.tables.taken_at -= 3600
        await asyncio.gather(*(r.resolve(IP(f"198.19.8.{i}")) for i in range(20)))
        assert r.refreshes == refreshes + 2

    asyncio.run(main())


def test_router_uses_vxlan_device(vxlan_ns: Any, tmp_path: Path) -> None:
    """A router inside the namespace with --vxlan-dev only (no map) resolves by netlink."""
    port = free_port(["127.0.0.1"])
    r = RouterProcess(tmp_path / "router.sock", "198.18.0.1", port, ["--vxlan-dev", DEV], netns=NS)
    try:
        with FakeLibrary(r.socket) as lib:
            local = Tuple4.parse("198.19.1.9:1000", "198.19.1.5:80")
            assert lib.wait_result(lib.request(local)).msg.status == Status.NO_ROUTE
            # Remote by netlink; 198.18.0.2 is unreachable from this namespace.
            remote = Tuple4.parse("198.19.1.9:1001", "198.19.2.1:80")
            assert lib.wait_result(lib.request(remote)).msg.status == Status.PEER_UNREACHABLE
            assert "peer=198.18.0.2" in r.wait_log("peer=198.18.0.2")
        info = r.status()["router"]["overlay_map"]
        assert info["vxlan_dev"] == DEV and info["fdb"] >= 3 and info["neighbours"] >= 4
    finally:
        assert r.stop() == 0


def test_no_namespace_left_behind() -> None:
    time.sleep(0)
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert NS not in out
