# Which container is attached to the overlay at each local overlay address, as the kernel says.
#
# Why: a network namespace costs nothing (`unshare -Urn` needs no privilege), and inside one a
# process can give its loopback any address and hold a TCP pair with any 4-tuple. So "the
# caller's namespace holds the tuple" (ownership.py) proves nothing about who owns an overlay
# address. What a container cannot forge from inside is the host's wiring: the host has one veth
# per container (on the overlay bridge, or routed), and the kernel reports, for each, the
# namespace its peer lives in (IFLA_LINK_NETNSID, an id in the router's own namespace) and the
# peer's ifindex. The
# addresses on that peer interface are the container's overlay addresses. A caller's namespace is
# compared by that same id (RTM_GETNSID with the namespace's fd): a namespace no veth leads to
# has no id the bridge knows, so it is attached nowhere.
#
# Why raw netlink here rather than pyroute2: three fixed requests, read synchronously on the
# event loop (a few hundred microseconds on a cache miss), and pyroute2 does not encode
# IFA_TARGET_NETNSID, which reads another namespace's addresses without entering it.
# An address found in two attached namespaces (a container with CAP_NET_ADMIN copied another's)
# belongs to neither: serving one of them could hand over the other's connections.

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass, field

IPv4 = ipaddress.IPv4Address

RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWNSID, RTM_GETNSID = 88, 90
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO, IFLA_LINK_NETNSID = 5, 10, 18, 37
IFLA_IFNAME = 3
IFLA_INFO_KIND = 1
IFA_ADDRESS, IFA_LOCAL, IFA_TARGET_NETNSID = 1, 2, 10
NETNSA_NSID, NETNSA_FD = 1, 3
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12

_NLHDR = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTA = struct.Struct("=HH")


class NetlinkError(OSError):
    pass


def _attrs(data: bytes, pos: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while pos + _RTA.size <= len(data):
        length, kind = _RTA.unpack_from(data, pos)
        if length < _RTA.size:
            break
        out[kind & 0x3FFF] = data[pos + _RTA.size : pos + length]
        pos += (length + 3) & ~3
    return out


def _rta(kind: int, payload: bytes) -> bytes:
    attr = _RTA.pack(_RTA.size + len(payload), kind) + payload
    return attr + b"\0" * (-len(attr) % 4)


class _Rtnl:
    """One NETLINK_ROUTE socket in the router's namespace; requests answered synchronously."""

    def __init__(self) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        self.sock.bind((0, 0))
        self.sock.settimeout(1.0)
        # Without strict checking the kernel ignores IFA_TARGET_NETNSID in an address dump.
        self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def request(self, mtype: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        self.sock.send(_NLHDR.pack(_NLHDR.size + len(body), mtype, flags, self.seq, 0) + body)
        out: list[tuple[int, bytes]] = []
        while True:
            data = self.sock.recv(1 << 16)
            pos = 0
            while pos + _NLHDR.size <= len(data):
                length, kind, _flags, seq, _pid = _NLHDR.unpack_from(data, pos)
                if length < _NLHDR.size:
                    raise NetlinkError(0, "malformed netlink reply")
                payload = data[pos + _NLHDR.size : pos + length]
                pos += (length + 3) & ~3
                if seq != self.seq:
                    continue
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if err:
                        raise NetlinkError(err, os.strerror(err))
                    return out
                out.append((kind, payload))
                if not flags & NLM_F_DUMP:
                    return out


@dataclass(frozen=True)
class Port:
    """One veth on the overlay bridge: the container namespace (by id) and its interface."""

    name: str
    nsid: int
    peer_ifindex: int


@dataclass
class Tables:
    ports: list[Port] = field(default_factory=list)
    owner: dict[IPv4, int] = field(default_factory=dict)  # overlay address -> nsid
    addresses: dict[int, frozenset[IPv4]] = field(default_factory=dict)  # nsid -> addresses
    conflicts: frozenset[IPv4] = frozenset()
    error: str | None = None
    read_at: float = 0.0


class Attachments:
    """Overlay address <-> attached container namespace (by nsid), refreshed on a miss."""

    def __init__(self, vxlan_dev: str | None, min_refresh_interval: float) -> None:
        self.vxlan_dev = vxlan_dev
        self.min_refresh_interval = min_refresh_interval
        self.tables = Tables()
        self.refreshes = 0
        self._rtnl = _Rtnl()

    def close(self) -> None:
        self._rtnl.close()

    # -- lookups (a dict each) -------------------------------------------------------------

    def container_at(self, ip: IPv4) -> int | None:
        """The nsid of the namespace attached at overlay address `ip`, if exactly one is."""
        nsid = self.tables.owner.get(ip)
        if nsid is None and self.refresh_if_stale():
            nsid = self.tables.owner.get(ip)
        return nsid

    def attached(self, nsid: int | None) -> bool:
        if nsid is None:
            return False
        if nsid not in self.tables.addresses:
            self.refresh_if_stale()
        return bool(self.tables.addresses.get(nsid))

    def holds_address(self, nsid: int | None, ip: IPv4) -> bool:
        return nsid is not None and self.container_at(ip) == nsid

    def nsid_of(self, ns_fd: int) -> int | None:
        """The id the router's namespace gives the namespace `ns_fd`; None if it has none."""
        body = struct.pack("=Bxxx", socket.AF_UNSPEC) + _rta(NETNSA_FD, struct.pack("=I", ns_fd))
        try:
            replies = self._rtnl.request(RTM_GETNSID, NLM_F_REQUEST, body)
        except OSError:
            return None
        for kind, payload in replies:
            if kind == RTM_NEWNSID:
                raw = _attrs(payload, 4).get(NETNSA_NSID)
                if raw is not None:
                    nsid: int = struct.unpack("=i", raw[:4])[0]
                    return nsid if nsid >= 0 else None
        return None

    # -- reading the kernel ----------------------------------------------------------------

    def refresh_if_stale(self) -> bool:
        """Re-read on a miss, at most every min_refresh_interval; True if it re-read."""
        if time.monotonic() - self.tables.read_at < self.min_refresh_interval:
            return False
        self.refresh()
        return True

    def refresh(self) -> None:
        tables = Tables(read_at=time.monotonic())
        try:
            tables.ports = self._ports()
            seen: dict[IPv4, set[int]] = {}
            for port in tables.ports:
                addrs = self._addresses(port.nsid, port.peer_ifindex)
                tables.addresses[port.nsid] = tables.addresses.get(port.nsid, frozenset()) | addrs
                for ip in addrs:
                    seen.setdefault(ip, set()).add(port.nsid)
            tables.conflicts = frozenset(ip for ip, ids in seen.items() if len(ids) > 1)
            tables.owner = {ip: next(iter(ids)) for ip, ids in seen.items() if len(ids) == 1}
            for nsid in list(tables.addresses):
                tables.addresses[nsid] = frozenset(
                    ip for ip in tables.addresses[nsid] if ip not in tables.conflicts
                )
        except OSError as exc:
            tables = Tables(error=str(exc), read_at=time.monotonic())
        self.tables = tables
        self.refreshes += 1

    def _ports(self) -> list[Port]:
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        links = []
        for kind, payload in self._rtnl.request(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, body):
            if kind != RTM_NEWLINK:
                continue
            _fam, _type, index, _flags, _change = _IFINFO.unpack_from(payload)
            links.append((index, _attrs(payload, _IFINFO.size)))
        names = {i: a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode() for i, a in links}
        bridge: int | None = None
        if self.vxlan_dev is not None:
            for index, attrs in links:
                if names[index] == self.vxlan_dev and IFLA_MASTER in attrs:
                    bridge = struct.unpack("=I", attrs[IFLA_MASTER][:4])[0]
        # Docker's layout bridges the VXLAN device with the containers' veths: only that bridge's
        # ports count. Routed layouts (Flannel's cni0 with the VXLAN device outside it, Calico's
        # unbridged cali* veths) reach containers by routes: every veth of this namespace whose
        # peer lives in another counts. Either way only the host's administrator (or its CNI)
        # can have made that veth: a container cannot add a link to the host's namespace.
        ports = []
        for index, attrs in links:
            if IFLA_LINK_NETNSID not in attrs or IFLA_LINK not in attrs:
                continue
            if bridge is not None and (
                IFLA_MASTER not in attrs or struct.unpack("=I", attrs[IFLA_MASTER][:4])[0] != bridge
            ):
                continue
            kind_attrs = _attrs(attrs.get(IFLA_LINKINFO, b""), 0)
            if kind_attrs.get(IFLA_INFO_KIND, b"").rstrip(b"\0") != b"veth":
                continue
            ports.append(
                Port(
                    names[index],
                    struct.unpack("=i", attrs[IFLA_LINK_NETNSID][:4])[0],
                    struct.unpack("=I", attrs[IFLA_LINK][:4])[0],
                )
            )
        return ports

    def _addresses(self, nsid: int, ifindex: int) -> frozenset[IPv4]:
        body = _IFADDR.pack(socket.AF_INET, 0, 0, 0, ifindex) + _rta(
            IFA_TARGET_NETNSID, struct.pack("=i", nsid)
        )
        found = set()
        for kind, payload in self._rtnl.request(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, body):
            if kind != RTM_NEWADDR:
                continue
            family, _plen, _flags, _scope, index = _IFADDR.unpack_from(payload)
            if family != socket.AF_INET or index != ifindex:
                continue
            attrs = _attrs(payload, _IFADDR.size)
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw is not None and len(raw) == 4:
                found.add(IPv4(raw))
        return frozenset(found)

    def describe(self) -> dict[str, object]:
        t = self.tables
        return {
            "containers": len(t.addresses),
            "addresses": len(t.owner),
            "conflicting_addresses": sorted(str(ip) for ip in t.conflicts),
            "error": t.error,
            "refreshes": self.refreshes,
        }
