"""Fuzz inputs for the router's two protocols, the oracle that says what the router must do with
each, and the drivers that send them to a live router process.

Why the frames are built with shuntflow.wire's encoder and never laid out by hand: the peer frame
is changing (authentication), and Msg.pack takes any integer for type, status and magic, which is
all the malformation the structured inputs need; the rest is byte-level (truncation, extension,
random bytes), which does not care about the layout either.

Library channel (SOCK_SEQPACKET): every connection runs a script of datagrams that ends in exactly
one input the router must drop the client for, so each connection yields exactly one
`client_dropped` log line whose reason the oracle predicts (the decoder's own error text for
frames that do not decode). Peer port (TCP): every connection must be closed by the router and
yield exactly one `peer_dropped` or `offer_refused` line, whatever the frame looks like.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from hypothesis import strategies as st

from shuntflow.router.library_channel import FROM_LIBRARY
from shuntflow.wire import (
    HOP_MAGIC,
    MSG_MAGIC,
    MSG_SIZE,
    PEER_MAGIC,
    Endpoint,
    Msg,
    MsgType,
    Tuple4,
    WireError,
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
    st.sampled_from([MSG_MAGIC, PEER_MAGIC, HOP_MAGIC]), u32, st.just(MSG_MAGIC ^ 0x8000_0000)
)
known_types = st.sampled_from(sorted(int(t) for t in MsgType))
any_type = st.one_of(known_types, known_types, u16)


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
    frame = m.pack(magic)
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


def judge(script: Sequence[Datagram]) -> tuple[list[Datagram], Expect]:
    """Cut the script after the first input the router must drop the client for (appending a
    terminator if there is none) and say what must happen."""
    hello_done = False
    acks = 0
    switches: set[int] = set()
    sent: list[Datagram] = []
    for d in script:
        sent.append(d)
        reason = _drop_reason(d, hello_done)
        if reason is not None:
            return sent, Expect(reason, acks, switches)
        m = Msg.unpack(d.data)
        if m.type is MsgType.HELLO:
            hello_done = True
            acks += 1
        elif m.type is MsgType.SWITCH_REQ:
            switches.add(m.seq)
    terminator = Datagram(b"\0")
    sent.append(terminator)
    return sent, Expect("frame is 1 bytes", acks, switches)


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


# -- peer port driver ------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerInput:
    data: bytes
    end: str  # "close": FIN after the bytes; "silent": keep quiet, the router must time out
    drip: float = 0.0  # seconds between single bytes (slowloris); 0 = all at once


@st.composite
def peer_inputs(draw: st.DrawFn) -> PeerInput:
    shape = draw(
        st.sampled_from(["frame", "frame", "offer", "truncated", "oversized", "random", "empty"])
    )
    m = draw(messages)
    if shape == "offer":  # well-formed OFFER, fields as they come: refused, never taken
        m = Msg(MsgType.OFFER, m.status, m.seq, m.pid, m.tuple, m.arg, m.arg2)
    frame = m.pack(draw(st.one_of(st.just(PEER_MAGIC), st.just(PEER_MAGIC), magics)))
    if shape == "truncated":
        data = frame[: draw(st.integers(1, len(frame) - 1))]
    elif shape == "oversized":
        data = frame + os.urandom(draw(st.integers(1, 64 * 1024)))
    elif shape == "random":
        data = draw(st.binary(min_size=1, max_size=300))
    elif shape == "empty":
        data = b""
    else:
        data = frame
    end = draw(st.sampled_from(["close", "close", "silent"]))
    return PeerInput(data, end)


def run_peer_inputs(
    addr: tuple[str, int], inputs: Sequence[PeerInput], source: str, timeout: float
) -> list[str]:
    """Every input on its own connection, all at once; problems found (the router must close
    each connection by itself, within `timeout`)."""
    problems: list[str] = []
    socks: list[socket.socket] = []
    try:
        for inp in inputs:
            s = socket.socket()
            socks.append(s)
            s.bind((source, 0))
            s.connect(addr)
            # the router may close (RST) as soon as it has judged the first 48 bytes
            with contextlib.suppress(OSError):
                if inp.drip:
                    for b in inp.data:
                        s.send(bytes([b]))
                        time.sleep(inp.drip)
                elif inp.data:
                    s.sendall(inp.data)
                if inp.end == "close":
                    s.shutdown(socket.SHUT_WR)
        sel = selectors.DefaultSelector()
        for i, s in enumerate(socks):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)
        left = set(range(len(socks)))
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for key, _ in sel.select(0.1):
                s = cast(socket.socket, key.fileobj)
                try:
                    while s.recv(65536):
                        pass  # an ANSWER (refusal) may come before the close
                except BlockingIOError:
                    continue
                except OSError:
                    pass  # RST: the router closed with our bytes unread
                sel.unregister(s)
                left.discard(key.data)
        sel.close()
        problems += [f"input {i} ({inputs[i]!r:.120}) still open" for i in sorted(left)]
    finally:
        for s in socks:
            s.close()
    return problems


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
