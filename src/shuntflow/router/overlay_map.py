# Overlay IP -> underlay (host) IP, read from the kernel's own VXLAN state, with a static fallback.
#
# Why netlink: Docker's overlay driver, Flannel and Calico-VXLAN all program the VXLAN device
# statically: a neighbour entry (overlay IP -> MAC) and an FDB entry (MAC -> dst underlay IP).
# Reading those two tables answers "which host holds this container" without any key-value
# store. Flannel adds one indirection: the neighbour entry is for the remote host's gateway
# address, and a route "10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink" leads to it; we follow
# routes on the device too. The tables are dumped in a worker thread (netlink dumps block),
# re-read on a cache miss (rate-limited) and periodically.
# Why a static map too: hosts without a VXLAN device of their own (tests, a router outside the
# overlay) give a JSON file {"198.19.2.1": "198.18.0.2", "198.19.3.0/24": "198.18.0.3"}.
# An overlay IP whose FDB entry has no dst, or whose host is this host, is LOCAL: same-host
# traffic never crosses VXLAN, so the router answers NO_ROUTE for it.

from __future__ import annotations

import asyncio
import enum
import ipaddress
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

IPv4 = ipaddress.IPv4Address
Net = ipaddress.IPv4Network


class Kind(enum.Enum):
    REMOTE = "remote"
    LOCAL = "local"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Resolution:
    kind: Kind
    host: IPv4 | None = None
    source: str = ""

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.host}" if self.host else self.kind.value


class MapError(ValueError):
    pass


def _longest_match(entries: list[tuple[Net, IPv4]], ip: IPv4) -> IPv4 | None:
    best: tuple[int, IPv4] | None = None
    for net, value in entries:
        if ip in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, value)
    return best[1] if best else None


class StaticMap:
    """`{"overlay ip or cidr": "host ip"}`; the longest prefix wins."""

    def __init__(self, entries: dict[str, str]) -> None:
        parsed: list[tuple[Net, IPv4]] = []
        for key, value in entries.items():
            try:
                parsed.append((Net(key, strict=False), IPv4(value)))
            except (ValueError, TypeError) as exc:
                raise MapError(f"bad map entry {key!r}: {value!r} ({exc})") from None
        self.entries = parsed

    @staticmethod
    def load(path: Path) -> StaticMap:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MapError(f"--map {path}: {exc}") from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise MapError(f'--map {path}: expected a JSON object {{"overlay": "host ip"}}')
        return StaticMap(data)

    def lookup(self, ip: IPv4) -> IPv4 | None:
        return _longest_match(self.entries, ip)


@dataclass
class VxlanTables:
    """One snapshot of the device's neighbour table, FDB and routes."""

    ifindex: int | None = None
    neigh: dict[IPv4, str] = field(default_factory=dict)  # overlay IP -> MAC
    fdb: dict[str, IPv4 | None] = field(default_factory=dict)  # MAC -> dst (None: local)
    routes: list[tuple[Net, IPv4]] = field(default_factory=list)  # dst net -> gateway
    taken_at: float = 0.0
    error: str | None = None

    def lookup(self, ip: IPv4, host_ip: IPv4) -> Resolution:
        mac = self.neigh.get(ip)
        if mac is None:
            gateway = _longest_match(self.routes, ip)
            if gateway is not None:
                mac = self.neigh.get(gateway)
        if mac is None or mac not in self.fdb:
            return Resolution(Kind.UNKNOWN)
        dst = self.fdb[mac]
        if dst is None or dst == host_ip:
            return Resolution(Kind.LOCAL, dst, "netlink")
        return Resolution(Kind.REMOTE, dst, "netlink")


def read_vxlan_tables(device: str, netns: str | None = None) -> VxlanTables:
    """Blocking netlink dump of `device` (in `netns`, default: the caller's namespace)."""
    from pyroute2 import IPRoute

    kwargs: dict[str, Any] = {"netns": netns} if netns else {}
    tables = VxlanTables(taken_at=time.monotonic())
    with IPRoute(**kwargs) as ipr:
        found = ipr.link_lookup(ifname=device)
        if not found:
            tables.error = f"no device {device}"
            return tables
        idx = int(found[0])
        tables.ifindex = idx
        for msg in ipr.get_neighbours(ifindex=idx, family=2):
            dst, mac = msg.get_attr("NDA_DST"), msg.get_attr("NDA_LLADDR")
            if msg.get("ifindex") == idx and dst and mac:
                tables.neigh[IPv4(dst)] = str(mac).lower()
        for msg in ipr.fdb("dump", ifindex=idx):
            mac = msg.get_attr("NDA_LLADDR")
            if msg.get("ifindex") != idx or not mac or mac == "00:00:00:00:00:00":
                continue
            dst = msg.get_attr("NDA_DST")
            mac = str(mac).lower()
            if not dst:
                # e.g. the bridge's learned/own entries on this port: only says "no dst"
                # when the VXLAN driver itself has none for this MAC.
                tables.fdb.setdefault(mac, None)
                continue
            try:
                tables.fdb[mac] = IPv4(dst)
            except ValueError:  # an IPv6 underlay: not ours to use
                continue
        for msg in ipr.get_routes(family=2):
            gw = msg.get_attr("RTA_GATEWAY")
            if msg.get_attr("RTA_OIF") == idx and gw:
                net = Net(f"{msg.get_attr('RTA_DST') or '0.0.0.0'}/{msg['dst_len']}")
                tables.routes.append((net, IPv4(gw)))
    return tables


class Resolver:
    """Async front: netlink snapshot first, then the static map; refreshes on a miss."""

    def __init__(
        self,
        host_ip: IPv4,
        static: StaticMap | None = None,
        vxlan_dev: str | None = None,
        netns: str | None = None,
        min_refresh_interval: float = 0.2,
    ) -> None:
        self.host_ip = host_ip
        self.static = static
        self.vxlan_dev = vxlan_dev
        self.netns = netns
        self.min_refresh_interval = min_refresh_interval
        self.tables = VxlanTables()
        self.refreshes = 0
        self._refreshing: asyncio.Task[None] | None = None

    def lookup(self, ip: IPv4) -> Resolution:
        """From the current snapshot only; never blocks."""
        if self.vxlan_dev is not None:
            res = self.tables.lookup(ip, self.host_ip)
            if res.kind is not Kind.UNKNOWN:
                return res
        if self.static is not None:
            host = self.static.lookup(ip)
            if host is not None:
                kind = Kind.LOCAL if host == self.host_ip else Kind.REMOTE
                return Resolution(kind, host, "map")
        return Resolution(Kind.UNKNOWN)

    def _knows_host(self, ip: IPv4) -> bool:
        if self.vxlan_dev is not None and ip in self.tables.fdb.values():
            return True
        return self.static is not None and any(h == ip for _, h in self.static.entries)

    async def is_known_host(self, ip: IPv4) -> bool:
        """Is `ip` the underlay address of a host the overlay map sends traffic to?"""
        if self._knows_host(ip):
            return True
        if self.vxlan_dev is not None:
            age = time.monotonic() - self.tables.taken_at
            if age >= self.min_refresh_interval:
                await self.refresh()
                return self._knows_host(ip)
        return False

    async def resolve(self, ip: IPv4) -> Resolution:
        res = self.lookup(ip)
        if res.kind is Kind.UNKNOWN and self.vxlan_dev is not None:
            age = time.monotonic() - self.tables.taken_at
            if age >= self.min_refresh_interval:
                await self.refresh()
                res = self.lookup(ip)
        return res

    async def refresh(self) -> None:
        """One netlink dump at a time; concurrent callers wait for the same one."""
        if self.vxlan_dev is None:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._do_refresh(self.vxlan_dev))
        await asyncio.shield(self._refreshing)

    async def _do_refresh(self, device: str) -> None:
        try:
            tables = await asyncio.to_thread(read_vxlan_tables, device, self.netns)
        except Exception as exc:  # netlink trouble must not kill the router
            tables = VxlanTables(taken_at=time.monotonic(), error=f"{type(exc).__name__}: {exc}")
        if tables.error is not None and self.tables.ifindex is not None:
            # Keep serving the last good snapshot, but remember the failure for `status`.
            tables = replace(self.tables, taken_at=tables.taken_at, error=tables.error)
        self.tables = tables
        self.refreshes += 1

    def describe(self) -> dict[str, Any]:
        return {
            "vxlan_dev": self.vxlan_dev,
            "neighbours": len(self.tables.neigh),
            "fdb": len(self.tables.fdb),
            "routes": len(self.tables.routes),
            "netlink_error": self.tables.error,
            "refreshes": self.refreshes,
            "static_entries": len(self.static.entries) if self.static else 0,
        }
