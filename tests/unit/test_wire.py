"""The C and Python halves of docs/wire.md encode the same bytes.

wire_probe.c is compiled against preload/sf_wire.h and prints the bytes of sample frames, the
offset and size of every field, and every enum value; Python must produce and decode the same.
Also: malformed frames raise WireError, and any valid frame round-trips.
"""

from __future__ import annotations

import ipaddress
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shuntflow import wire
from shuntflow.wire import (
    HOP_F_SHUT_WR,
    HOP_MAGIC,
    MSG_MAGIC,
    MSG_SIZE,
    PEER_MAGIC,
    PEER_SIZE,
    Endpoint,
    Hop,
    HopType,
    Msg,
    MsgType,
    PeerMsg,
    Status,
    Tuple4,
    WireError,
)

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# docs/wire.md, section 1: offset and size of every field of struct sf_msg; section 3: sf_hop.
DOC_MSG_LAYOUT = {
    "magic": (0, 4),
    "type": (4, 2),
    "status": (6, 2),
    "seq": (8, 4),
    "pid": (12, 4),
    "local_ip": (16, 4),
    "remote_ip": (20, 4),
    "local_port": (24, 2),
    "remote_port": (26, 2),
    "reserved": (28, 4),
    "arg": (32, 8),
    "arg2": (40, 8),
}
DOC_HOP_LAYOUT = {"magic": (0, 4), "type": (4, 2), "flags": (6, 2), "seq": (8, 8)}
# Section 2: struct sf_peer_msg.
DOC_PEER_LAYOUT = {
    "magic": (0, 4),
    "type": (4, 2),
    "status": (6, 2),
    "seq": (8, 4),
    "reserved": (12, 4),
    "local_ip": (16, 4),
    "remote_ip": (20, 4),
    "local_port": (24, 2),
    "remote_port": (26, 2),
    "reserved2": (28, 4),
    "timestamp_ms": (32, 8),
    "nonce": (40, 16),
    "mac": (56, 32),
}
KEY = b"k" * 32

SAMPLE_TUPLE = Tuple4.parse("198.19.1.2:40001", "198.19.2.3:80")


def sample(kind: MsgType, status: Status) -> Msg:
    return Msg(kind, status, 0x81020304, 4242, SAMPLE_TUPLE, 0x1122334455667788, 12345678901)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.fail("no C compiler: the wire check needs gcc (apt-get install gcc)")
    exe = tmp_path_factory.mktemp("probe") / "wire_probe"
    cmd = [gcc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "preload")]
    subprocess.run([*cmd, "-o", str(exe), str(HERE / "wire_probe.c")], check=True)
    out: dict[str, list[str]] = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split(
        "\n"
    ):
        if line:
            head, _, rest = line.partition(" ")
            out.setdefault(head, []).append(rest)
    return out


def _pairs(lines: list[str]) -> dict[str, list[int]]:
    return {
        name: [int(x) for x in rest.split()] for name, _, rest in (s.partition(" ") for s in lines)
    }


def test_msg_bytes_identical(probe: dict[str, list[str]]) -> None:
    c_bytes = bytes.fromhex(probe["msg"][0])
    py = sample(MsgType.SWITCH_RES, Status.DUPLICATE)
    assert py.pack() == c_bytes
    assert Msg.unpack(c_bytes) == py


def test_switch_calls_bytes_identical(probe: dict[str, list[str]]) -> None:
    """SWITCH_CALLS as the library's window.c fills it: status, tuple, longest call, calls."""
    c_bytes = bytes.fromhex(probe["calls"][0])
    py = Msg(MsgType.SWITCH_CALLS, Status.TIMEOUT, tuple=SAMPLE_TUPLE, arg=1_500_000, arg2=7)
    assert py.pack() == c_bytes
    assert Msg.unpack(c_bytes) == py
    assert c_bytes[4:6] == (11).to_bytes(2, "little")


def sample_peer(kind: MsgType, status: Status, mac: bytes = bytes(range(0xA0, 0xC0))) -> PeerMsg:
    nonce = bytes(range(0x10, 0x20))
    return PeerMsg(kind, status, 0x81020304, SAMPLE_TUPLE, 1764140000123, nonce, mac)


def test_peer_msg_bytes_identical(probe: dict[str, list[str]]) -> None:
    c_bytes = bytes.fromhex(probe["peer"][0])
    py = sample_peer(MsgType.ANSWER, Status.PEER_REFUSED)
    assert py.pack() == c_bytes
    assert PeerMsg.unpack(c_bytes) == py
    # Bytes 16..27 are the tuple exactly as in sf_msg.
    assert c_bytes[16:28] == bytes.fromhex(probe["msg"][0])[16:28]


def test_peer_mac_covers_every_byte_before_it() -> None:
    good = sample_peer(MsgType.OFFER, Status.OK).signed(KEY)
    raw = good.pack()
    assert len(raw) == PEER_SIZE == 88
    assert PeerMsg.unpack(raw).verify(KEY)
    assert not PeerMsg.unpack(raw).verify(b"x" * 32)
    for i in range(PEER_SIZE):
        if 12 <= i < 16 or 28 <= i < 32:
            continue  # reserved: decoding drops them, so they are re-packed as 0
        bad = bytearray(raw)
        bad[i] ^= 0x01
        try:
            msg = PeerMsg.unpack(bytes(bad))
        except WireError:
            continue  # magic or type no longer valid: refused before the MAC
        assert not msg.verify(KEY), f"flipping byte {i} kept the MAC valid"
    # The underlay binding: initiator ip, port, responder ip, port, network order.
    b = wire.underlay_binding(("198.18.0.1", 40000), ("198.18.0.2", 4790))
    assert b == bytes([198, 18, 0, 1]) + (40000).to_bytes(2, "big") + bytes([198, 18, 0, 2]) + (
        4790
    ).to_bytes(2, "big")
    assert good.verify(KEY) and not good.verify(KEY, b)
    # An OFFER's MAC is not an ANSWER's.
    as_answer = PeerMsg(
        MsgType.ANSWER, good.status, good.seq, good.tuple, good.timestamp_ms, good.nonce, good.mac
    )
    assert not as_answer.verify(KEY)


def test_hop_bytes_identical(probe: dict[str, list[str]]) -> None:
    c_bytes = bytes.fromhex(probe["hop"][0])
    py = Hop(HopType.SYNC, HOP_F_SHUT_WR, 0x0102030405060708)
    assert py.pack() == c_bytes
    assert Hop.unpack(c_bytes) == py


def test_addresses_are_network_order(probe: dict[str, list[str]]) -> None:
    """Bytes 16..27 are the sockaddr_in bytes, unconverted: 198.19.1.2, port 40001 = 0x9c41."""
    raw = bytes.fromhex(probe["msg"][0])
    assert raw[16:20] == ipaddress.IPv4Address("198.19.1.2").packed
    assert raw[20:24] == ipaddress.IPv4Address("198.19.2.3").packed
    assert raw[24:26] == (40001).to_bytes(2, "big")
    assert raw[26:28] == (80).to_bytes(2, "big")


def test_layout_matches_doc_and_python(probe: dict[str, list[str]]) -> None:
    offsets = _pairs(probe["off"])
    for field, (off, size) in DOC_MSG_LAYOUT.items():
        assert offsets[f"sf_msg.{field}"] == [off, size], field
    for field, (off, size) in DOC_HOP_LAYOUT.items():
        assert offsets[f"sf_hop.{field}"] == [off, size], field
    for field, (off, size) in DOC_PEER_LAYOUT.items():
        assert offsets[f"sf_peer_msg.{field}"] == [off, size], field
    sizes = _pairs(probe["size"])
    assert sizes["sf_peer_msg"] == [PEER_SIZE] == [88]
    assert wire._PEER_HEAD.size == DOC_PEER_LAYOUT["mac"][0]
    assert sizes["sf_msg"] == [MSG_SIZE] == [48]
    assert sizes["sf_hop"] == [wire.HOP_SIZE] == [16]
    # Python's struct format puts every field at the documented offset too.
    fmt = wire._MSG.format.lstrip("<")
    py_offsets = []
    pos = 0
    for code in ["I", "H", "H", "I", "I", "4s", "4s", "2s", "2s", "I", "Q", "Q"]:
        py_offsets.append(pos)
        pos += struct.calcsize("<" + code)
    assert fmt == "IHHII4s4s2s2sIQQ"
    assert py_offsets == [off for off, _ in DOC_MSG_LAYOUT.values()]


def test_constants_and_enums_match(probe: dict[str, list[str]]) -> None:
    msg_magic, peer_magic, hop_magic, version = (int(x) for x in probe["const"][0].split())
    assert (msg_magic, peer_magic, hop_magic) == (MSG_MAGIC, PEER_MAGIC, HOP_MAGIC)
    assert version == wire.PROTOCOL_VERSION
    assert MSG_MAGIC.to_bytes(4, "little") == b"SFL1"
    assert PEER_MAGIC.to_bytes(4, "little") == b"SFR2"
    assert HOP_MAGIC.to_bytes(4, "little") == b"SFH1"
    c_enums = _pairs(probe["enum"])
    seen = set()
    for qualified, (value,) in c_enums.items():
        cls_name, _, member = qualified.partition(".")
        assert getattr(wire, cls_name)[member] == value, qualified
        seen.add(cls_name)
    assert seen == {"MsgType", "Status", "Mode", "Path", "HopType"}
    # Every Python enum member exists in C (no value only one side knows).
    for cls_name in seen:
        for member in getattr(wire, cls_name):
            assert f"{cls_name}.{member.name}" in c_enums
    assert _pairs(probe["flag"])["HOP_F_SHUT_WR"] == [HOP_F_SHUT_WR]


# -- malformed frames ---------------------------------------------------------------------


def _good() -> bytes:
    return sample(MsgType.SWITCH_REQ, Status.OK).pack()


def _with_type(kind: int, magic: int = MSG_MAGIC) -> bytes:
    raw = bytearray(_good())
    raw[0:4] = magic.to_bytes(4, "little")
    raw[4:6] = kind.to_bytes(2, "little")
    return bytes(raw)


def _good_peer() -> bytes:
    return sample_peer(MsgType.OFFER, Status.OK).signed(KEY).pack()


def _peer_with(offset: int, value: int, size: int = 2) -> bytes:
    raw = bytearray(_good_peer())
    raw[offset : offset + size] = value.to_bytes(size, "little")
    return bytes(raw)


@pytest.mark.parametrize(
    ("data", "unpack", "match"),
    [
        (b"", Msg.unpack, "0 bytes"),
        (_good()[:47], Msg.unpack, "47 bytes"),
        (_good() + b"\0", Msg.unpack, "49 bytes"),
        (b"XXXX" + _good()[4:], Msg.unpack, "bad magic"),
        (_with_type(12), Msg.unpack, "unknown frame type 12"),
        (_with_type(0), Msg.unpack, "unknown frame type 0"),
        (_with_type(0xFFFF), Msg.unpack, "unknown frame type"),
        (_with_type(MsgType.OFFER), Msg.unpack, "not allowed"),
        (_with_type(MsgType.ANSWER), Msg.unpack, "not allowed"),
        (_peer_with(4, MsgType.SWITCH_REQ), PeerMsg.unpack, "not allowed"),
        (_peer_with(4, 99), PeerMsg.unpack, "unknown frame type 99"),
        (_peer_with(0, MSG_MAGIC, 4), PeerMsg.unpack, "bad magic"),
        (_good_peer()[:87], PeerMsg.unpack, "87 bytes"),
        (_good_peer() + b"\0", PeerMsg.unpack, "89 bytes"),
        (_good(), PeerMsg.unpack, "48 bytes"),
        (_with_type(MsgType.OFFER, PEER_MAGIC), Msg.unpack, "bad magic"),
    ],
)
def test_malformed_msg_raises(data: bytes, unpack: object, match: str) -> None:
    with pytest.raises(WireError, match=match):
        unpack(data)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (Hop(HopType.READY).pack()[:15], "15 bytes"),
        (Hop(HopType.READY).pack() + b"\0", "17 bytes"),
        (b"SFL1" + Hop(HopType.READY).pack()[4:], "bad hop magic"),
        (struct.pack("<IHHQ", HOP_MAGIC, 4, 0, 0), "unknown hop type 4"),
        (struct.pack("<IHHQ", HOP_MAGIC, 0, 0, 0), "unknown hop type 0"),
    ],
)
def test_malformed_hop_raises(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        Hop.unpack(data)


def test_wire_error_is_value_error() -> None:
    assert issubclass(WireError, ValueError)


# -- round trips --------------------------------------------------------------------------

endpoints = st.builds(
    Endpoint,
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(0, 65535),
)
library_types = st.sampled_from(sorted(wire.LIBRARY_TYPES))


@given(
    kind=library_types,
    status=st.integers(0, 65535),
    seq=st.integers(0, 2**32 - 1),
    pid=st.integers(0, 2**32 - 1),
    local=endpoints,
    remote=endpoints,
    arg=st.integers(0, 2**64 - 1),
    arg2=st.integers(0, 2**64 - 1),
)
def test_msg_round_trip(
    kind: MsgType,
    status: int,
    seq: int,
    pid: int,
    local: Endpoint,
    remote: Endpoint,
    arg: int,
    arg2: int,
) -> None:
    msg = Msg(kind, status, seq, pid, Tuple4(local, remote), arg, arg2)
    raw = msg.pack()
    assert len(raw) == MSG_SIZE
    assert Msg.unpack(raw) == msg
    peer = PeerMsg(MsgType.OFFER, status, seq, Tuple4(local, remote), arg, pid.to_bytes(16, "big"))
    peer = peer.signed(KEY)
    back = PeerMsg.unpack(peer.pack())
    assert back == peer and back.verify(KEY)


@given(a=endpoints, b=endpoints)
def test_key_and_leader_agree_from_both_ends(a: Endpoint, b: Endpoint) -> None:
    t = Tuple4(a, b)
    assert t.key() == t.mirrored().key()
    if a.raw() != b.raw():
        assert t.local_is_leader() != t.mirrored().local_is_leader()
