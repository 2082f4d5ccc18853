"""The frames exchanged between preload library, router and peer router (docs/wire.md).

This is the Python half; ``preload/sf_wire.h`` is the C half, and ``tests/unit/test_wire.py``
checks both encode the same bytes.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass, replace

MSG_MAGIC = 0x314C4653  # "SFL1": library <-> router
PEER_MAGIC = 0x32524653  # "SFR2": router <-> router (authenticated; "SFR1" had no MAC)
HOP_MAGIC = 0x31484653  # "SFH1": library <-> library
PROTOCOL_VERSION = 1

# magic, type, status, seq, pid, local_ip, remote_ip, local_port, remote_port, reserved, arg, arg2.
# Addresses and ports are raw network-order bytes, as in struct sockaddr_in.
_MSG = struct.Struct("<IHHII4s4s2s2sIQQ")
MSG_SIZE = _MSG.size
_HOP = struct.Struct("<IHHQ")
HOP_SIZE = _HOP.size
# magic, type, status, seq, reserved, local_ip, remote_ip, local_port, remote_port, reserved2,
# timestamp_ms, nonce; the 32-byte HMAC-SHA256 over these 56 bytes follows.
_PEER_HEAD = struct.Struct("<IHHII4s4s2s2sIQ16s")
PEER_NONCE_SIZE = 16
PEER_MAC_SIZE = 32
PEER_HEAD_SIZE = _PEER_HEAD.size
PEER_SIZE = PEER_HEAD_SIZE + PEER_MAC_SIZE


class MsgType(enum.IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    SWITCH_REQ = 3
    SWITCH_RES = 4
    CLAIM_REQ = 5
    CLAIM_RES = 6
    STATS_REQ = 7
    CONN_INFO = 8
    STATS_END = 9
    SWITCH_DONE = 10
    SWITCH_CALLS = 11
    OFFER = 16
    ANSWER = 17


class Status(enum.IntEnum):
    OK = 0
    NOT_MINE = 1
    NO_ROUTE = 2
    PEER_UNREACHABLE = 3
    PEER_REFUSED = 4
    DENIED = 5
    DUPLICATE = 6
    INTERNAL = 7
    BAD_MESSAGE = 8
    TIMEOUT = 9


class Mode(enum.IntEnum):
    OVERLAY = 0
    SLIM = 1
    SHUNTFLOW = 2


class Path(enum.IntEnum):
    OVERLAY = 0
    SWITCHING = 1
    HOST = 2
    PINNED = 3


class HopType(enum.IntEnum):
    READY = 1
    SYNC = 2
    ABORT = 3


HOP_F_SHUT_WR = 0x1

LIBRARY_TYPES = frozenset(MsgType) - {MsgType.OFFER, MsgType.ANSWER}
PEER_TYPES = frozenset({MsgType.OFFER, MsgType.ANSWER})


class WireError(ValueError):
    """A frame that is not a valid frame of the expected conversation."""


@dataclass(frozen=True, order=True)
class Endpoint:
    ip: ipaddress.IPv4Address
    port: int

    def raw(self) -> bytes:
        """Six bytes in network order: the leader is the end whose raw() is lower."""
        return self.ip.packed + self.port.to_bytes(2, "big")

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class Tuple4:
    """An overlay TCP connection seen from one end: ``local`` is that end."""

    local: Endpoint
    remote: Endpoint

    def mirrored(self) -> Tuple4:
        return Tuple4(self.remote, self.local)

    def local_is_leader(self) -> bool:
        return self.local.raw() < self.remote.raw()

    def key(self) -> tuple[Endpoint, Endpoint]:
        """The same key from both ends of the connection."""
        a, b = sorted((self.local, self.remote), key=Endpoint.raw)
        return (a, b)

    def __str__(self) -> str:
        return f"{self.local}->{self.remote}"

    @staticmethod
    def parse(local: str, remote: str) -> Tuple4:
        def ep(text: str) -> Endpoint:
            host, _, port = text.rpartition(":")
            return Endpoint(ipaddress.IPv4Address(host), int(port))

        return Tuple4(ep(local), ep(remote))


_ZERO = Tuple4(Endpoint(ipaddress.IPv4Address(0), 0), Endpoint(ipaddress.IPv4Address(0), 0))


@dataclass(frozen=True)
class Msg:
    type: MsgType
    status: int = Status.OK
    seq: int = 0
    pid: int = 0
    tuple: Tuple4 = _ZERO
    arg: int = 0
    arg2: int = 0

    def pack(self) -> bytes:
        t = self.tuple
        return _MSG.pack(
            MSG_MAGIC,
            int(self.type),
            int(self.status),
            self.seq,
            self.pid,
            t.local.ip.packed,
            t.remote.ip.packed,
            t.local.port.to_bytes(2, "big"),
            t.remote.port.to_bytes(2, "big"),
            0,
            self.arg,
            self.arg2,
        )

    @staticmethod
    def unpack(data: bytes) -> Msg:
        """Decode one frame; raises WireError for anything but a well-formed frame."""
        if len(data) != MSG_SIZE:
            raise WireError(f"frame is {len(data)} bytes, expected {MSG_SIZE}")
        (got_magic, mtype, status, seq, pid, lip, rip, lport, rport, _res, arg, arg2) = _MSG.unpack(
            data
        )
        if got_magic != MSG_MAGIC:
            raise WireError(f"bad magic {got_magic:#x}")
        kind = _frame_type(mtype, LIBRARY_TYPES)
        return Msg(kind, status, seq, pid, _tuple(lip, lport, rip, rport), arg, arg2)


def _frame_type(value: int, allowed: frozenset[MsgType]) -> MsgType:
    try:
        kind = MsgType(value)
    except ValueError:
        raise WireError(f"unknown frame type {value}") from None
    if kind not in allowed:
        raise WireError(f"frame type {kind.name} not allowed here")
    return kind


def _tuple(lip: bytes, lport: bytes, rip: bytes, rport: bytes) -> Tuple4:
    return Tuple4(
        Endpoint(ipaddress.IPv4Address(lip), int.from_bytes(lport, "big")),
        Endpoint(ipaddress.IPv4Address(rip), int.from_bytes(rport, "big")),
    )


@dataclass(frozen=True)
class PeerMsg:
    """One router <-> router frame (docs/wire.md section 2): OFFER or ANSWER, MAC'd.

    The MAC is HMAC-SHA256 with the cluster key over the first 56 bytes (everything but the MAC)
    followed by the underlay binding (`underlay_binding`, not sent: both ends read it from the
    TCP connection): type, status, seq, tuple, timestamp and nonce are all covered, so an
    OFFER's MAC can never pass as an ANSWER's, an ANSWER is bound to the OFFER whose nonce it
    echoes, and a frame is valid only on the TCP connection it was made for."""

    type: MsgType
    status: int = Status.OK
    seq: int = 0
    tuple: Tuple4 = _ZERO
    timestamp_ms: int = 0
    nonce: bytes = bytes(PEER_NONCE_SIZE)
    mac: bytes = bytes(PEER_MAC_SIZE)

    def head(self) -> bytes:
        """The 56 MAC'd bytes."""
        t = self.tuple
        if len(self.nonce) != PEER_NONCE_SIZE:
            raise WireError(f"nonce is {len(self.nonce)} bytes, expected {PEER_NONCE_SIZE}")
        return _PEER_HEAD.pack(
            PEER_MAGIC,
            int(self.type),
            int(self.status),
            self.seq,
            0,
            t.local.ip.packed,
            t.remote.ip.packed,
            t.local.port.to_bytes(2, "big"),
            t.remote.port.to_bytes(2, "big"),
            0,
            self.timestamp_ms,
            self.nonce,
        )

    def signed(self, key: bytes, binding: bytes = b"") -> PeerMsg:
        """The same frame with its MAC computed under `key` for the connection `binding`."""
        return replace(self, mac=peer_mac(key, self.head() + binding))

    def pack(self) -> bytes:
        if len(self.mac) != PEER_MAC_SIZE:
            raise WireError(f"mac is {len(self.mac)} bytes, expected {PEER_MAC_SIZE}")
        return self.head() + self.mac

    def verify(self, key: bytes, binding: bytes = b"") -> bool:
        """Constant-time check of the MAC under `key` for the connection `binding`."""
        return hmac.compare_digest(self.mac, peer_mac(key, self.head() + binding))

    @staticmethod
    def unpack(data: bytes) -> PeerMsg:
        """Decode (not authenticate) one frame; raises WireError unless well-formed."""
        if len(data) != PEER_SIZE:
            raise WireError(f"peer frame is {len(data)} bytes, expected {PEER_SIZE}")
        (magic, mtype, status, seq, _r, lip, rip, lport, rport, _r2, ts, nonce) = _PEER_HEAD.unpack(
            data[:PEER_HEAD_SIZE]
        )
        if magic != PEER_MAGIC:
            raise WireError(f"bad magic {magic:#x}")
        kind = _frame_type(mtype, PEER_TYPES)
        return PeerMsg(
            kind, status, seq, _tuple(lip, lport, rip, rport), ts, nonce, data[PEER_HEAD_SIZE:]
        )


def peer_mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def underlay_binding(initiator: tuple[str, int], responder: tuple[str, int]) -> bytes:
    """12 bytes naming the underlay TCP connection: initiator ip, port, responder ip, port
    (network order). Both routers read it from their socket; it is MAC'd, never sent."""
    out = b""
    for ip, port in (initiator, responder):
        out += ipaddress.IPv4Address(ip).packed + port.to_bytes(2, "big")
    return out


@dataclass(frozen=True)
class Hop:
    type: HopType
    flags: int = 0
    seq: int = 0

    def pack(self) -> bytes:
        return _HOP.pack(HOP_MAGIC, int(self.type), self.flags, self.seq)

    @staticmethod
    def unpack(data: bytes) -> Hop:
        if len(data) != HOP_SIZE:
            raise WireError(f"hop frame is {len(data)} bytes, expected {HOP_SIZE}")
        magic, htype, flags, seq = _HOP.unpack(data)
        if magic != HOP_MAGIC:
            raise WireError(f"bad hop magic {magic:#x}")
        try:
            kind = HopType(htype)
        except ValueError:
            raise WireError(f"unknown hop type {htype}") from None
        return Hop(kind, flags, seq)
