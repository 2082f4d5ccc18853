"""`testbed up --layout flannel`: the overlay programmed as Flannel's VXLAN backend does it, checked
in the kernel's own tables (3 hosts, so every host has two remote subnets), pod-to-pod traffic
across it, and the routers' overlay map resolving every remote pod through the routes."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import Any

import pytest

from shuntflow.router.control import query
from shuntflow.router.overlay_map import Kind, read_vxlan_tables
from shuntflow.testbed import Node, Testbed

from .conftest import MakeTestbed

pytestmark = pytest.mark.root

PREFIX = "dy3"
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 0x04


@pytest.fixture(scope="module")
def flannel(make_testbed_module: MakeTestbed) -> Iterator[Testbed]:
    tb = make_testbed_module(PREFIX, hosts=3, containers=2, routers=True, layout="flannel")
    yield tb


def _ip(node: Node, *args: str, tool: str = "ip") -> Any:
    out = node.run([tool, "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def test_kernel_state_is_flannels(flannel: Testbed) -> None:
    assert flannel.layout == "flannel"
    dev = flannel.hosts[0].vxlan_dev
    for h in flannel.hosts:
        others = [o for o in flannel.hosts if o is not h]
        (link,) = _ip(h, "-d", "link", "show", dev)
        vx = link["linkinfo"]["info_data"]
        assert (vx["id"], vx["port"], vx.get("learning", False)) == (1, 8472, False)
        assert "master" not in link  # routed, not bridged
        assert link["address"] == f"02:42:c6:13:{h.index:02x}:00"
        addrs = [(a["local"], a["prefixlen"]) for a in _ip(h, "addr", "show", dev)[0]["addr_info"]]
        assert addrs == [(f"198.19.{h.index}.0", 32)]
        routes = {
            r["dst"]: (r.get("gateway"), "onlink" in r.get("flags", []))
            for r in _ip(h, "route", "show", "dev", dev)
        }
        assert routes == {f"198.19.{o.index}.0/24": (f"198.19.{o.index}.0", True) for o in others}
        neigh = {n["dst"]: (n["lladdr"], n["state"]) for n in _ip(h, "neigh", "show", "dev", dev)}
        assert neigh == {
            f"198.19.{o.index}.0": (f"02:42:c6:13:{o.index:02x}:00", ["PERMANENT"]) for o in others
        }
        fdb = {
            (e["mac"], e["dst"])
            for e in _ip(h, "fdb", "show", "dev", dev, tool="bridge")
            if "dst" in e
        }
        assert fdb == {(f"02:42:c6:13:{o.index:02x}:00", o.underlay_ip) for o in others}
        # Forwarding between the pod bridge and the VXLAN device.
        forward = h.run(
            ["sysctl", "-n", "net.ipv4.ip_forward"], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert forward == "1"
        for c in h.containers:
            addr = _ip(c, "addr", "show", "dev", f"{PREFIX}-eth0")[0]["addr_info"]
            assert [(a["local"], a["prefixlen"]) for a in addr] == [(c.overlay_ip, 24)]


def test_every_pod_reaches_every_remote_pod(flannel: Testbed) -> None:
    before = [sum(flannel.vxlan_counters(h.index)) for h in flannel.hosts]
    for c in flannel.containers:
        for other in flannel.containers:
            if other.host_index == c.host_index:
                continue
            out = c.run(["ping", "-c1", "-W3", "-s", "1000", other.overlay_ip], capture_output=True)
            assert out.returncode == 0, (c.name, other.name, out.stdout)
    after = [sum(flannel.vxlan_counters(h.index)) for h in flannel.hosts]
    # 4 remote pods per pod, a 1 KB echo each way: every host's VXLAN device carried them.
    for b, a in zip(before, after, strict=True):
        assert a - b >= 2 * 4 * 2 * 1000


def test_overlay_map_resolves_every_remote_pod(flannel: Testbed) -> None:
    for h in flannel.hosts:
        tables = read_vxlan_tables(h.vxlan_dev, h.netns)
        assert tables.error is None
        host_ip = ipaddress.IPv4Address(h.underlay_ip)
        for c in flannel.containers:
            res = tables.lookup(ipaddress.IPv4Address(c.overlay_ip), host_ip)
            if c.host_index == h.index:
                assert res.kind is not Kind.REMOTE, (h.netns, c.name, res)
            else:
                expected = flannel.host(c.host_index).underlay_ip
                assert (res.kind, str(res.host)) == (Kind.REMOTE, expected), (h.netns, c.name)
        # The router reads the same tables: two remote hosts, through routes.
        status = query(h.router_socket.with_name("router.sock.ctl"))
        overlay_map = status["router"]["overlay_map"]
        assert (overlay_map["routes"], overlay_map["neighbours"], overlay_map["fdb"]) == (2, 2, 2)
        assert overlay_map["netlink_error"] is None
