"""Fuzz inputs for the router's two protocols, the oracle that says what the router must do with
each, and the drivers that send them to a live router process.

Frames are built with shuntflow.wire's encoders (`Msg`, `PeerMsg`, `auth.make_offer`'s signing)
and never laid out by hand; a wrong magic is written over the encoded frame's first 4 bytes, and
any 16-bit value goes in as a type. The rest is byte-level (truncation, extension, random bytes).

Library channel (SOCK_SEQPACKET): every connection runs a script of datagrams that ends in exactly
one input the router must drop the client for, so each connection yields exactly one
`client_dropped` log line whose reason the oracle predicts (the decoder's own error text for
frames that do not decode).

Peer port (TCP, docs/wire.md section 2): every connection must be closed by the router and yield
exactly one of `peer_rejected` (source is no allowed peer), `peer_closed_idle` (closed without a
byte), `peer_dropped` (no complete or no decodable OFFER), `offer_rejected` (MAC, time window,
replayed nonce) or `offer_refused` (authentic OFFER the router answered with a refusal), the one
`peer_verdict` predicts from the bytes sent on that very connection. Only an authentic OFFER gets
an ANSWER, and that ANSWER must be authentic too and never OK.
"""

from __future__ import annotations

import array
import contextlib
import errno
import ipaddress
import os
import re
import selectors
import socket
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

from hypothesis import strategies as st

from shuntflow.router.auth import answer_matches, now_ms
from shuntflow.router.library_channel import FROM_LIBRARY
from shuntflow.wire import (
    HOP_MAGIC,
    MSG_MAGIC,
    MSG_SIZE,
    PEER_MAC_SIZE,
    PEER_MAGIC,
    PEER_NONCE_SIZE,
    PEER_SIZE,
    Endpoint,
    Msg,
    MsgType,
    PeerMsg,
    Status,
    Tuple4,
    WireError,
    underlay_binding,
)

SEQ_HIGH = 0x8000_0000
# Router-chosen seqs count up from 1; nothing in a test run gets near this, so a reply frame with
# a seq whose low 31 bits are at least this is certainly for a seq the router never sent.
NEVER_ISSUED_FLOOR = 0x4000_0000
# Kept out of the fuzz tuples: the bystander libraries own connections of this address.
BYSTANDER_IP = "198.19.2.250"
REPLY_TYPES = frozenset({MsgType.CLAIM_RES, MsgType.CONN_INFO, MsgType.STATS_END})


# -- structured values -----------------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
ips = st.one_of(
    st.builds(lambda i: f"198.19.1.{i}", st.integers(0, 255)),  # this host's containers
    st.builds(lambda i: f"198.19.2.{i}", st.integers(0, 249)),  # the peer host's
    st.sampled_from(["0.0.0.0", "255.255.255.255", "127.0.0.1", "198.18.0.1"]),
    st.builds(lambda n: str(ipaddress.IPv4Address(n)), u32),
)
endpoints = st.builds(lambda ip, port: Endpoint(ipaddress.IPv4Address(ip), port), ips, u16)
tuples = st.builds(Tuple4, endpoints, endpoints)
magics = st.one_of(
    st.sampled_from([MSG_MAGIC, PEER_MAGIC, HOP_MAGIC, 0x31524653]),  # 0x31524653: old "SFR1"
    u32,
    st.just(MSG_MAGIC ^ 0x8000_0000),
)
known_types = st.sampled_from(sorted(int(t) for t in MsgType))
any_type = st.one_of(known_types, known_types, u16)


def with_magic(frame: bytes, magic: int) -> bytes:
    """`frame` with its first 4 bytes (the magic, little-endian) replaced."""
    return magic.to_bytes(4, "little") + frame[4:]


def msg(kind: int, status: int, seq: int, pid: int, t: Tuple4, arg: int, arg2: int) -> Msg:
    # Msg.pack writes int(type), so any 16-bit value goes on the wire, known type or not.
    return Msg(cast(MsgType, kind), status, seq, pid, t, arg, arg2)


messages = st.builds(msg, any_type, u16, u32, u32, tuples, u64, u64)


@dataclass(frozen=True)
class Datagram:
    data: bytes
    fds: int = 0  # pipe fds to pass along with it (SCM_RIGHTS)


def _reply_seq(m: Msg) -> Msg:
    """Make a reply frame's seq one the router certainly never issued (else the outcome would
    depend on the router's counter)."""
    if m.seq & SEQ_HIGH and (m.seq & 0x7FFF_FFFF) < NEVER_ISSUED_FLOOR:
        return Msg(m.type, m.status, m.seq | NEVER_ISSUED_FLOOR, m.pid, m.tuple, m.arg, m.arg2)
    return m


@st.composite
def library_datagrams(draw: st.DrawFn) -> Datagram:
    shape = draw(
        st.sampled_from(
            ["frame", "frame", "frame", "truncated", "extended", "oversized", "random", "fds"]
        )
    )
    m = draw(messages)
    if int(m.type) in REPLY_TYPES:
        m = _reply_seq(m)
    magic = draw(st.one_of(st.just(MSG_MAGIC), st.just(MSG_MAGIC), magics))
    frame = with_magic(m.pack(), magic)
    if shape == "truncated":
        return Datagram(frame[: draw(st.integers(0, MSG_SIZE - 1))])
    if shape == "extended":
        return Datagram(frame + draw(st.binary(min_size=1, max_size=64)))
    if shape == "oversized":
        return Datagram(frame * draw(st.integers(2, 1300)))  # up to ~62 KB in one datagram
    if shape == "random":
        return Datagram(draw(st.binary(min_size=0, max_size=200)))
    if shape == "fds":
        return Datagram(
            frame if draw(st.booleans()) else b"", draw(st.integers(1, 253))
        )  # SCM_MAX_FD
    return Datagram(frame)


def hello(pid: int = 0) -> Datagram:
    return Datagram(Msg(MsgType.HELLO, pid=pid or os.getpid(), arg=2).pack())


# -- the oracle ------------------------------------------------------------------------------


@dataclass
class Expect:
    """What the router must do with one connection's script."""

    drop_reason: str  # a substring of the logged reason
    hello_acks: int  # HELLO_ACKs it must send before closing
    switch_seqs: set[int] = field(default_factory=set)  # SWITCH_RES may come for these only
    # SWITCH_DONE frames with arg2 = 1 the router takes (each adds one switch time sample)
    own_switch_done: int = 0
    # SWITCH_CALLS frames the router takes as a sample (OK or failed window) / leaves out
    switch_calls: int = 0
    switch_calls_rejected: int = 0


def judge(script: Sequence[Datagram]) -> tuple[list[Datagram], Expect]:
    """Cut the script after the first input the router must drop the client for (appending a
    terminator if there is none) and say what must happen."""
    hello_done = False
    acks = 0
    switches: set[int] = set()
    done = 0
    calls = [0, 0]  # taken, rejected
    sent: list[Datagram] = []
    for d in script:
        sent.append(d)
        reason = _drop_reason(d, hello_done)
        if reason is not None:
            return sent, Expect(reason, acks, switches, done, *calls)
        m = Msg.unpack(d.data)
        if m.type is MsgType.HELLO:
            hello_done = True
            acks += 1
        elif m.type is MsgType.SWITCH_REQ:
            switches.add(m.seq)
        elif m.type is MsgType.SWITCH_DONE and m.arg2 == 1:
            done += 1
        elif m.type is MsgType.SWITCH_CALLS:
            calls[0 if _switch_calls_plausible(m) else 1] += 1
    terminator = Datagram(b"\0")
    sent.append(terminator)
    return sent, Expect("frame is 1 bytes", acks, switches, done, *calls)


def _switch_calls_plausible(m: Msg) -> bool:
    """docs/wire.md, SWITCH_CALLS: a known status, a tuple of two distinct, specified ends, and
    no longest call without a call timed."""
    t = m.tuple
    return (
        m.status in {int(s) for s in Status}
        and 0 not in (t.local.port, t.remote.port)
        and not t.local.ip.is_unspecified
        and not t.remote.ip.is_unspecified
        and t.local != t.remote
        and not (m.arg > 0 and m.arg2 == 0)
    )


def _drop_reason(d: Datagram, hello_done: bool) -> str | None:
    if d.fds:
        return "library passed file descriptors to the router"
    if not d.data:
        return "empty frame"
    if len(d.data) > MSG_SIZE + 1:  # the router reads one byte more than a frame
        return f"frame is more than {MSG_SIZE} bytes"
    if len(d.data) != MSG_SIZE:
        return f"frame is {len(d.data)} bytes"
    try:
        m = Msg.unpack(d.data)
    except WireError as exc:
        return str(exc)
    if m.type not in FROM_LIBRARY:
        return "may not come from a library"
    if m.type is MsgType.HELLO:
        return "second HELLO" if hello_done else None
    if not hello_done:
        return "first frame must be HELLO"
    if m.type in REPLY_TYPES:
        return "the router never sent"
    return None


# -- log reading -----------------------------------------------------------------------------

_REASON = re.compile(r'reason=("(?:[^"\\]|\\.)*"|\S+)')


class LogTail:
    """New lines of a router log since the last call (the file only grows)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def read(self) -> list[str]:
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line being written stays for the next call
        self.offset += end
        return data[:end].decode(errors="replace").splitlines()


def reason_of(line: str) -> str:
    m = _REASON.search(line)
    if m is None:
        return ""
    value = m.group(1)
    return value[1:-1].replace('\\"', '"') if value.startswith('"') else value


def events(lines: Iterable[str], names: Iterable[str]) -> list[str]:
    wanted = tuple(f"event={n} " for n in names)
    return [ln for ln in lines if any(w in ln for w in wanted)]


# -- library channel driver ------------------------------------------------------------------


@dataclass
class LibOutcome:
    expect: Expect
    inputs: int
    closed: bool = False
    acks: int = 0
    stray: list[str] = field(default_factory=list)  # anything the router must not have sent


def _send_datagram(sock: socket.socket, d: Datagram) -> None:
    if not d.fds:
        sock.send(d.data)
        return
    pipes = [os.pipe() for _ in range((d.fds + 1) // 2)]
    fds = [fd for pair in pipes for fd in pair][: d.fds]
    try:
        sock.sendmsg([d.data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    finally:
        for pair in pipes:
            for fd in pair:
                os.close(fd)


def run_library_scripts(
    path: Path, scripts: Sequence[Sequence[Datagram]], timeout: float = 5.0
) -> list[LibOutcome]:
    """All scripts at once, one connection each; wait until the router closed every one."""
    socks: list[socket.socket] = []
    outcomes: list[LibOutcome] = []
    try:
        for script in scripts:
            sent, expect = judge(script)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            socks.append(s)
            s.connect(str(path))
            outcomes.append(LibOutcome(expect, len(sent)))
            for i, d in enumerate(sent):
                try:
                    _send_datagram(s, d)
                except OSError as exc:
                    # Only the last input may find the connection gone (dropped for it).
                    if i != len(sent) - 1 or exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                        outcomes[-1].stray.append(f"send of input {i} failed: {exc}")
                    break
        _collect(socks, outcomes, timeout)
    finally:
        for s in socks:
            s.close()
    return outcomes


def _collect(socks: list[socket.socket], outcomes: list[LibOutcome], timeout: float) -> None:
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    open_count = len(socks)
    deadline = time.monotonic() + timeout
    while open_count and time.monotonic() < deadline:
        for key, _ in sel.select(0.1):
            s, out = cast(socket.socket, key.fileobj), outcomes[key.data]
            while True:
                try:
                    data, anc, _flags, _ = s.recvmsg(4096, socket.CMSG_SPACE(16))
                except BlockingIOError:
                    break
                except ConnectionResetError:
                    data, anc = b"", []
                for _level, _kind, payload in anc:
                    out.stray.append(f"router passed {len(payload) // 4} fd(s)")
                    for fd in array.array("i", payload[: len(payload) - len(payload) % 4]):
                        os.close(fd)
                if not data:
                    out.closed = True
                    sel.unregister(s)
                    open_count -= 1
                    break
                _check_reply(data, out)
    sel.close()


def _check_reply(data: bytes, out: LibOutcome) -> None:
    try:
        m = Msg.unpack(data)
    except WireError as exc:
        out.stray.append(f"undecodable frame from the router: {exc}")
        return
    if m.type is MsgType.HELLO_ACK:
        out.acks += 1
    elif m.type is not MsgType.SWITCH_RES or m.seq not in out.expect.switch_seqs:
        out.stray.append(f"unexpected {m.type.name} seq {m.seq:#x} status {m.status}")
    elif m.status == 0:
        out.stray.append(f"SWITCH_RES OK for fuzz request {m.seq:#x}")


# -- peer port: inputs ----------------------------------------------------------------------

U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
# The routers' auth_window_ms (their TOML sets it) and how far from its edge a drawn timestamp
# stays, so that the test's and the router's clocks reading a few ms apart never matter.
AUTH_WINDOW_MS = 10_000
AUTH_MARGIN_MS = 2_000
OTHER_KEY = b"not-the-cluster-key-of-these-routers-0123456789"
MAC_KINDS = ("drawn", "valid", "elsewhere", "wrong key")

peer_msgs = st.builds(
    lambda kind, status, seq, t, ts, nonce, mac: PeerMsg(
        cast(MsgType, kind), status, seq, t, ts, nonce, mac
    ),
    st.one_of(st.just(int(MsgType.OFFER)), st.just(int(MsgType.ANSWER)), any_type),
    u16,
    u32,
    tuples,
    u64,
    st.binary(min_size=PEER_NONCE_SIZE, max_size=PEER_NONCE_SIZE),
    st.binary(min_size=PEER_MAC_SIZE, max_size=PEER_MAC_SIZE),
)
_far = st.integers(AUTH_WINDOW_MS + AUTH_MARGIN_MS, 1 << 63)
skews = st.one_of(
    st.just(0),
    st.just(0),
    st.integers(-(AUTH_WINDOW_MS - AUTH_MARGIN_MS), AUTH_WINDOW_MS - AUTH_MARGIN_MS),
    _far,
    _far.map(lambda n: -n),  # clamped at 0: the epoch
)


@dataclass(frozen=True)
class PeerInput:
    """One connection to the peer port.

    A structured frame (`msg`) is finished once the connection exists, because a valid MAC binds
    it to that connection's 4-tuple. `mac`: "drawn" keeps msg.mac (and its timestamp and nonce);
    "valid" signs with the cluster key for this connection, "elsewhere" for another connection
    (an OFFER copied onto a connection it was not made for), "wrong key" with another key. A
    signed frame gets the sender's clock + `skew_ms` as timestamp and a fresh nonce, or the
    batch's nonce number `nonce_group`: inputs sharing one replay each other."""

    msg: PeerMsg | None = None
    mac: str = "drawn"
    skew_ms: int = 0
    nonce_group: int | None = None
    magic: int = PEER_MAGIC
    cut: int | None = None  # only the first `cut` bytes of the frame
    tail: int = 0  # random bytes after the frame
    raw: bytes = b""  # the bytes, if there is no msg
    end: str = "close"  # "close": FIN after the bytes; "silent": the router must time out
    drip: float = 0.0  # seconds between single bytes (slowloris); 0 = all at once


@st.composite
def peer_inputs(draw: st.DrawFn) -> PeerInput:
    shape = draw(
        st.sampled_from(
            ["frame", "offer", "offer", "offer", "truncated", "oversized", "random", "empty"]
        )
    )
    end = draw(st.sampled_from(["close", "close", "silent"]))
    if shape == "random":
        return PeerInput(raw=draw(st.binary(min_size=1, max_size=300)), end=end)
    if shape == "empty":
        return PeerInput(end=end)
    m = draw(peer_msgs)
    if shape == "offer":
        m = replace(m, type=MsgType.OFFER)
    mac = draw(st.sampled_from(["drawn", "valid", "valid", "valid", "elsewhere", "wrong key"]))
    return PeerInput(
        msg=m,
        mac=mac,
        skew_ms=draw(skews) if mac != "drawn" else 0,
        nonce_group=draw(st.one_of(st.none(), st.none(), st.integers(0, 2))),
        magic=draw(st.one_of(st.just(PEER_MAGIC), st.just(PEER_MAGIC), magics)),
        cut=draw(st.integers(1, PEER_SIZE - 1)) if shape == "truncated" else None,
        tail=draw(st.integers(1, 64 * 1024)) if shape == "oversized" else 0,
        end=end,
    )


def _elsewhere(binding: bytes) -> bytes:
    """The binding of another connection: the initiator's port + 1."""
    port = (int.from_bytes(binding[4:6], "big") + 1) % 0x10000
    return binding[:4] + port.to_bytes(2, "big") + binding[6:]


def build_peer_bytes(inp: PeerInput, key: bytes, binding: bytes, nonces: dict[int, bytes]) -> bytes:
    """What goes on the connection whose underlay binding is `binding`."""
    if inp.msg is None:
        return inp.raw
    m = inp.msg
    if inp.mac != "drawn":
        if inp.nonce_group is None:
            nonce = os.urandom(PEER_NONCE_SIZE)
        else:
            nonce = nonces.setdefault(inp.nonce_group, os.urandom(PEER_NONCE_SIZE))
        ts = min(max(now_ms() + inp.skew_ms, 0), U64_MAX)
        m = replace(m, timestamp_ms=ts, nonce=nonce)
        if inp.mac == "valid":
            m = m.signed(key, binding)
        elif inp.mac == "elsewhere":
            m = m.signed(key, _elsewhere(binding))
        else:
            m = m.signed(OTHER_KEY, binding)
    frame = with_magic(m.pack(), inp.magic)
    if inp.cut is not None:
        return frame[: inp.cut]
    return frame + os.urandom(inp.tail)


# -- peer port: the oracle -------------------------------------------------------------------

NOT_A_PEER = "source is no host of the overlay map"


@dataclass(frozen=True)
class PeerVerdict:
    """The one event the router must log for a connection, with a substring of its reason.
    event "authentic": an OFFER that passes MAC and time window; of all those with one nonce,
    one is `offer_refused` (with an ANSWER), every other `offer_rejected` as a replay."""

    event: str
    reason: str = ""
    nonce: bytes = b""


def peer_verdict(
    data: bytes, end: str, allowed: bool, key: bytes, binding: bytes, sent_at_ms: int
) -> PeerVerdict:
    if not allowed:
        return PeerVerdict("peer_rejected", NOT_A_PEER)
    if not data:
        if end == "close":
            return PeerVerdict("peer_closed_idle")
        return PeerVerdict("peer_dropped", "without an OFFER")  # the idle deadline
    if len(data) < PEER_SIZE:
        if end == "close":
            return PeerVerdict("peer_dropped", f"closed after {len(data)} of {PEER_SIZE} bytes")
        return PeerVerdict("peer_dropped", "no complete OFFER within")
    try:
        m = PeerMsg.unpack(data[:PEER_SIZE])
    except WireError as exc:
        return PeerVerdict("peer_dropped", str(exc))
    if m.type is not MsgType.OFFER:
        return PeerVerdict("peer_dropped", f"expected OFFER, got {m.type.name}")
    if not m.verify(key, binding):
        return PeerVerdict("offer_rejected", "bad MAC")
    skew = abs(m.timestamp_ms - sent_at_ms)
    if skew > AUTH_WINDOW_MS + AUTH_MARGIN_MS // 2:
        return PeerVerdict("offer_rejected", "timestamp")
    assert skew < AUTH_WINDOW_MS - AUTH_MARGIN_MS // 2, f"drawn too near the window's edge: {m}"
    return PeerVerdict("authentic", nonce=m.nonce)


# -- peer port: driver -----------------------------------------------------------------------


@dataclass
class PeerOutcome:
    input: PeerInput
    source: tuple[str, int] = ("", 0)
    binding: bytes = b""
    data: bytes = b""  # what was sent (or meant to be: the router may cut it short)
    sent_at_ms: int = 0
    received: bytes = b""
    closed: bool = False


def run_peer_inputs(
    addr: tuple[str, int],
    inputs: Sequence[PeerInput],
    source: str,
    timeout: float,
    key: bytes,
) -> list[PeerOutcome]:
    """Every input on its own connection, all at once; wait (up to `timeout`) until the router
    closed each one by itself, keeping whatever it sent."""
    outcomes = [PeerOutcome(inp) for inp in inputs]
    socks: list[socket.socket] = []
    nonces: dict[int, bytes] = {}
    spare: list[socket.socket] = []
    ports: set[int] = set()
    try:
        for out in outcomes:
            inp = out.input
            # Log lines name connections by source port, so no two of a batch may share one. A
            # bind(port 0) port is released as soon as a reset closes its connection (the router
            # resets those it closes with bytes unread), and the next bind may get it again:
            # hold such sockets, bound, until the batch is over.
            while True:
                s = socket.socket()
                s.bind((source, 0))
                if s.getsockname()[1] not in ports:
                    break
                spare.append(s)
            socks.append(s)
            ports.add(s.getsockname()[1])
            s.connect(addr)
            out.source = s.getsockname()
            out.binding = underlay_binding(out.source, addr)
            out.sent_at_ms = now_ms()
            out.data = build_peer_bytes(inp, key, out.binding, nonces)
            # the router may close (RST) as soon as it has judged the first bytes
            with contextlib.suppress(OSError):
                if inp.drip:
                    for b in out.data:
                        s.send(bytes([b]))
                        time.sleep(inp.drip)
                elif out.data:
                    s.sendall(out.data)
                if inp.end == "close":
                    s.shutdown(socket.SHUT_WR)
        sel = selectors.DefaultSelector()
        for i, s in enumerate(socks):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)
        left = len(socks)
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for key_, _ in sel.select(0.1):
                s, out = cast(socket.socket, key_.fileobj), outcomes[key_.data]
                try:
                    while chunk := s.recv(65536):
                        out.received += chunk
                except BlockingIOError:
                    continue
                except OSError:
                    pass  # RST: the router closed with our bytes unread
                out.closed = True
                sel.unregister(s)
                left -= 1
        sel.close()
    finally:
        for s in socks + spare:
            s.close()
    return outcomes


def field_of(line: str, name: str) -> str:
    m = re.search(rf' {name}=("(?:[^"\\]|\\.)*"|\S+)', line)
    if m is None:
        return ""
    value = m.group(1)
    return value[1:-1].replace('\\"', '"') if value.startswith('"') else value


PEER_EVENTS = (
    "peer_rejected",
    "peer_closed_idle",
    "peer_dropped",
    "offer_rejected",
    "offer_refused",
)


def check_peer_outcomes(
    outcomes: Sequence[PeerOutcome], lines: Sequence[str], allowed: bool, key: bytes
) -> tuple[Counter[str], list[str]]:
    """Match the router's log lines to the connections; (events seen, problems found).

    Lines of every event but offer_refused name the connection (peer=ip:port); offer_refused
    names the source address and the tuple (the router's view), matched by those."""
    problems: list[str] = []
    by_port: dict[str, list[str]] = {}
    refused: list[str] = []
    for ln in lines:
        if " event=offer_refused " in ln:
            refused.append(ln)
        else:
            by_port.setdefault(field_of(ln, "peer"), []).append(ln)
    seen: Counter[str] = Counter()
    groups: dict[bytes, list[PeerOutcome]] = {}  # authentic OFFERs without a line of their own
    for i, out in enumerate(outcomes):
        what = f"input {i} from port {out.source[1]} ({len(out.data)} bytes, {out.input!r:.160})"
        if not out.closed:
            problems.append(f"{what}: still open")
        v = peer_verdict(out.data, out.input.end, allowed, key, out.binding, out.sent_at_ms)
        mine = by_port.pop(f"{out.source[0]}:{out.source[1]}", [])
        if v.event == "authentic":
            groups.setdefault(v.nonce, [])
            if not mine:
                groups[v.nonce].append(out)
                continue
            v = PeerVerdict("offer_rejected", "replayed nonce")
        if len(mine) != 1:
            problems.append(f"{what}: want one {v.event} line, got {mine}")
            continue
        ln = mine[0]
        seen[v.event] += 1
        if f" event={v.event} " not in ln or v.reason not in field_of(ln, "reason"):
            problems.append(f"{what}: want {v.event} {v.reason!r}, got {ln}")
        if out.received:
            problems.append(f"{what}: the router answered a refused frame: {out.received[:96]!r}")
    for nonce, group in groups.items():
        if len(group) != 1:
            problems.append(f"{len(group)} authentic OFFERs with nonce {nonce.hex()} taken")
    taken = [out for group in groups.values() for out in group]
    for out in sorted(taken, key=lambda o: not o.received):
        seen["offer_refused"] += 1
        problems += _check_answer(out, key, refused)
    problems += [
        f"line for no connection of the batch: {ln}" for lns in by_port.values() for ln in lns
    ]
    problems += [f"offer_refused for no authentic OFFER of the batch: {ln}" for ln in refused]
    return seen, problems


def _check_answer(out: PeerOutcome, key: bytes, refused: list[str]) -> list[str]:
    """An authentic OFFER: refused with one log line and (unless its extra bytes made the close
    a reset) an authentic ANSWER that is not OK, with the status logged. Call it for the
    outcomes with an ANSWER first: one tuple may be refused twice, with different statuses."""
    offer = PeerMsg.unpack(out.data[:PEER_SIZE])
    status = ""
    problems: list[str] = []
    if out.received or not out.input.tail:
        try:
            answer = PeerMsg.unpack(out.received)
        except WireError as exc:
            return [f"{offer}: no ANSWER ({exc}): {out.received!r:.200}"]
        mismatch = answer_matches(key, offer, answer, out.binding)
        if mismatch is not None:
            problems.append(f"{offer}: {mismatch}")
        if answer.status == Status.OK:
            problems.append(f"{offer}: answered OK")
        status = Status(answer.status).name
    ours = str(offer.tuple.mirrored())
    for ln in refused:
        if (
            field_of(ln, "tuple") == ours
            and field_of(ln, "peer") == out.source[0]
            and field_of(ln, "status") == (status or field_of(ln, "status"))
        ):
            refused.remove(ln)
            return problems
    return [*problems, f"no offer_refused line with status {status or 'any'} for {offer}"]


# -- process measurements --------------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def reasons(lines: Iterable[str]) -> Counter[str]:
    return Counter(reason_of(ln) for ln in lines)
