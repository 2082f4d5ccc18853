"""The native switch path (switchpath/) and the Python router read and write the same frames.

Each rule lives twice: in C (switchpath/peerframe.c, libframe.c, owner.c) and in Python (auth.py
with wire.py, library_channel.py, ownership.py). These tests load the C library with ctypes and
put both halves to the same inputs: frames made on one side are checked on the other, byte for
byte where the output is deterministic; refusals must agree, reasons included; the ownership
check asks the kernel about the same live and closed sockets from both sides (in another
namespace: tests/integration/test_switchpath_netns.py). The ctypes half: tests/switchpath.py.

The library is built from switchpath/ by `make` (the test's fixture), or taken from
SHUNTFLOW_SWITCHPATH when that is set (`make test-asan` runs these tests against the
AddressSanitizer build that way).
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shuntflow.router import auth, ownership
from shuntflow.router.library_channel import read_frame
from shuntflow.wire import (
    MSG_MAGIC,
    MSG_SIZE,
    PEER_MAGIC,
    Msg,
    MsgType,
    PeerMsg,
    Status,
    Tuple4,
    WireError,
    underlay_binding,
)

from ..switchpath import (
    Frame,
    MsgBuf,
    Native,
    PythonOwner,
    ctuple,
    diag_socket,
    load_native,
    pytuple,
    tup_of,
)

KEY = b"0123456789abcdef0123456789abcdef-cluster"
BINDING = underlay_binding(("198.18.0.1", 40000), ("198.18.0.2", 7890))
TUP = Tuple4.parse("10.244.1.5:43210", "10.244.2.7:6379")


class Replay:
    """An sfp_replay cache, freed when the test is done with it."""

    def __init__(self, native: Native, window_ms: int, max_nonces: int) -> None:
        self.n = native
        self.ptr = native.lib.sfp_replay_new(window_ms, max_nonces)
        assert self.ptr

    def check(self, key: bytes, offer: bytes, binding: bytes, now: int) -> str | None:
        why = ctypes.create_string_buffer(128)
        res = self.n.lib.sfp_offer_check(
            self.ptr, key, len(key), Frame.from_buffer_copy(offer), binding, now, why, 128
        )
        return None if res is None else str(res.decode())

    def __len__(self) -> int:
        return int(self.n.lib.sfp_replay_size(self.ptr))

    def free(self) -> None:
        self.n.lib.sfp_replay_free(self.ptr)


@pytest.fixture(scope="module")
def native() -> Native:
    return load_native()


@pytest.fixture
def replay(native: Native) -> Iterator[Any]:
    made: list[Replay] = []

    def make(window_ms: int, max_nonces: int) -> Replay:
        made.append(Replay(native, window_ms, max_nonces))
        return made[-1]

    yield make
    for r in made:
        r.free()


def checker_verdict(
    checker: auth.OfferChecker, frame: bytes, binding: bytes, now: int
) -> str | None:
    """auth.OfferChecker's verdict as peer.py reaches it: the type first, then the checker."""
    msg = PeerMsg.unpack(frame)
    if msg.type is not MsgType.OFFER:
        return f"expected OFFER, got {msg.type.name}"
    v = checker.check(msg, binding, now)
    return None if v.ok else v.reason


# -- OFFER and ANSWER both ways ------------------------------------------------------------


def test_offer_made_in_c_is_python_bytes_and_verifies_there(native: Native) -> None:
    frame = native.offer_make(KEY, 77, TUP, BINDING)
    msg = PeerMsg.unpack(frame)
    assert (msg.type, msg.status, msg.seq, msg.tuple) == (MsgType.OFFER, Status.OK, 77, TUP)
    # The same fields signed by Python give the same 88 bytes.
    again = PeerMsg(MsgType.OFFER, Status.OK, 77, TUP, msg.timestamp_ms, msg.nonce)
    assert again.signed(KEY, BINDING).pack() == frame
    assert msg.verify(KEY, BINDING)
    assert not msg.verify(KEY, underlay_binding(("198.18.0.1", 40001), ("198.18.0.2", 7890)))
    checker = auth.OfferChecker(KEY, 60_000, 16)
    assert checker_verdict(checker, frame, BINDING, msg.timestamp_ms) is None
    # Fresh nonces: two offers never share one.
    assert PeerMsg.unpack(native.offer_make(KEY, 77, TUP, BINDING)).nonce != msg.nonce


def test_offer_made_in_python_verifies_in_c(native: Native, replay: Any) -> None:
    offer = auth.make_offer(KEY, 5, TUP, BINDING)
    parsed, why = native.parse(offer.pack(), MsgType.OFFER)
    assert why is None and parsed == offer.pack()
    r = replay(60_000, 16)
    assert r.check(KEY, offer.pack(), BINDING, offer.timestamp_ms) is None
    assert len(r) == 1


def test_answers_are_the_same_bytes_both_ways(native: Native) -> None:
    offer = auth.make_offer(KEY, 9, TUP, BINDING)
    for status in (Status.OK, Status.PEER_REFUSED, Status.DUPLICATE):
        c_answer = native.answer_make(KEY, offer.pack(), int(status), BINDING)
        assert c_answer == auth.make_answer(KEY, offer, status, BINDING).pack()
        assert auth.answer_matches(KEY, offer, PeerMsg.unpack(c_answer), BINDING) is None
        assert native.answer_check(KEY, offer.pack(), c_answer, BINDING) is None
    c_offer = native.offer_make(KEY, 10, TUP, BINDING)
    py_answer = auth.make_answer(KEY, PeerMsg.unpack(c_offer), Status.OK, BINDING).pack()
    assert native.answer_check(KEY, c_offer, py_answer, BINDING) is None


def _bad_answers(offer: PeerMsg) -> dict[str, tuple[PeerMsg, bytes, bytes]]:
    """name -> (answer, key it was signed with, binding it was signed for)."""
    good = auth.make_answer(KEY, offer, Status.OK, BINDING)
    other_tuple = Tuple4.parse("10.244.1.5:43211", "10.244.2.7:6379")
    other_binding = underlay_binding(("198.18.0.1", 40000), ("198.18.0.3", 7890))
    flipped = bytes([offer.nonce[0] ^ 1]) + offer.nonce[1:]
    return {
        "wrong nonce": (replace(good, nonce=flipped), KEY, BINDING),
        "wrong tuple": (replace(good, tuple=other_tuple), KEY, BINDING),
        "mirrored tuple": (
            replace(good, tuple=offer.tuple.mirrored()),
            KEY,
            BINDING,
        ),
        "wrong seq": (replace(good, seq=offer.seq + 1), KEY, BINDING),
        "wrong binding": (good, KEY, other_binding),
        "wrong key": (good, b"another cluster key of 32+ bytes!!", BINDING),
        "an OFFER": (replace(good, type=MsgType.OFFER), KEY, BINDING),
        # The timestamp is MAC'd but not compared: the nonce already names the OFFER.
        "other timestamp": (
            replace(good, timestamp_ms=offer.timestamp_ms + 1),
            KEY,
            BINDING,
        ),
    }


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong nonce", "ANSWER does not match the OFFER"),
        ("wrong tuple", "ANSWER does not match the OFFER"),
        ("mirrored tuple", "ANSWER does not match the OFFER"),
        ("wrong seq", "ANSWER does not match the OFFER"),
        ("wrong binding", "ANSWER MAC invalid (peer has another cluster key)"),
        ("wrong key", "ANSWER MAC invalid (peer has another cluster key)"),
        ("an OFFER", "expected ANSWER, got OFFER"),
        ("other timestamp", None),
    ],
)
def test_answer_binding_refusals_agree(native: Native, case: str, reason: str | None) -> None:
    offer = auth.make_offer(KEY, 41, TUP, BINDING)
    answer, key, binding = _bad_answers(offer)[case]
    frame = answer.signed(key, binding).pack()
    assert auth.answer_matches(KEY, offer, PeerMsg.unpack(frame), BINDING) == reason
    assert native.answer_check(KEY, offer.pack(), frame, BINDING) == reason


def test_answer_tampered_after_signing_is_refused(native: Native) -> None:
    offer = auth.make_offer(KEY, 41, TUP, BINDING)
    frame = bytearray(auth.make_answer(KEY, offer, Status.PEER_REFUSED, BINDING).pack())
    frame[6] = Status.OK  # the status turned into an acceptance on the way
    why = "ANSWER MAC invalid (peer has another cluster key)"
    assert auth.answer_matches(KEY, offer, PeerMsg.unpack(bytes(frame)), BINDING) == why
    assert native.answer_check(KEY, offer.pack(), bytes(frame), BINDING) == why


def test_reserved_bytes_are_outside_the_mac_on_both_sides(native: Native, replay: Any) -> None:
    """wire.py packs reserved fields as 0 whatever was received: C must MAC the same head."""
    offer = auth.make_offer(KEY, 3, TUP, BINDING)
    raw = bytearray(offer.pack())
    raw[12:16] = b"\xff\xff\xff\xff"
    raw[28:32] = b"\x01\x02\x03\x04"
    py = checker_verdict(auth.OfferChecker(KEY, 60_000, 4), bytes(raw), BINDING, offer.timestamp_ms)
    assert py is None
    assert replay(60_000, 4).check(KEY, bytes(raw), BINDING, offer.timestamp_ms) is None


# -- the responder's checks: MAC, window, replay, cache bound -----------------------------


def _offer_at(ts: int, nonce: bytes, seq: int = 1, key: bytes = KEY) -> bytes:
    return PeerMsg(MsgType.OFFER, Status.OK, seq, TUP, ts, nonce).signed(key, BINDING).pack()


def test_offer_refusals_agree(native: Native, replay: Any) -> None:
    now = 1_800_000_000_000
    window = 5000
    r = replay(window, 2)
    checker = auth.OfferChecker(KEY, window, 2)
    steps: list[tuple[bytes, int, str | None]] = [
        (_offer_at(now, b"A" * 16), now, None),
        (_offer_at(now, b"A" * 16), now, "replayed nonce"),
        (_offer_at(now, b"A" * 16, seq=2), now, "replayed nonce"),
        (
            _offer_at(now + window + 1, b"B" * 16),
            now,
            f"timestamp +{window + 1} ms off, window 5000 ms",
        ),
        (
            _offer_at(now - window - 7, b"B" * 16),
            now,
            f"timestamp -{window + 7} ms off, window 5000 ms",
        ),
        (_offer_at(now + window, b"B" * 16), now, None),  # the edge of the window still passes
        (_offer_at(now, b"C" * 16), now, "replay cache full (2 nonces)"),
        (_offer_at(now, b"C" * 16, key=b"x" * 32), now, "bad MAC"),
        (
            native.answer_make(KEY, _offer_at(now, b"D" * 16), 0, BINDING),
            now,
            "expected OFFER, got ANSWER",
        ),
        # A's expiry is now + window: still remembered at that instant, forgotten one ms later.
        (_offer_at(now + window, b"A" * 16), now + window, "replayed nonce"),
        (_offer_at(now + window, b"C" * 16), now + window, "replay cache full (2 nonces)"),
        (_offer_at(now + window + 1, b"C" * 16), now + window + 1, None),
        (_offer_at(now + window + 1, b"A" * 16), now + window + 1, "replay cache full (2 nonces)"),
    ]
    for i, (frame, at, want) in enumerate(steps):
        assert checker_verdict(checker, frame, BINDING, at) == want, f"python, step {i}"
        assert r.check(KEY, frame, BINDING, at) == want, f"C, step {i}"
        assert len(r) == len(checker), f"cache size, step {i}"


def test_zero_capacity_cache_refuses_every_offer(native: Native, replay: Any) -> None:
    frame = _offer_at(1000, b"Z" * 16)
    assert replay(100, 0).check(KEY, frame, BINDING, 1000) == "replay cache full (0 nonces)"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(-150, 150), st.integers(0, 80)),
        min_size=1,
        max_size=60,
    ),
    st.integers(0, 6),
)
def test_replay_cache_matches_offer_checker(
    native: Native, ops: list[tuple[int, int, int]], max_nonces: int
) -> None:
    """Random sequences of offers (few nonces, skewed clocks, time moving on) get the same
    verdicts from both caches, and both remember as many nonces after each."""
    window = 100
    r = Replay(native, window, max_nonces)
    checker = auth.OfferChecker(KEY, window, max_nonces)
    now = 10_000
    try:
        for nonce_no, skew, advance in ops:
            now += advance
            frame = _offer_at(now + skew, bytes([nonce_no]) * 16)
            assert r.check(KEY, frame, BINDING, now) == checker_verdict(
                checker, frame, BINDING, now
            )
            assert len(r) == len(checker)
    finally:
        r.free()


def test_replay_cache_grows_and_forgets(native: Native, replay: Any) -> None:
    """Many nonces: the set grows past its first size, and all expire together."""
    r = replay(1000, 5000)
    for i in range(3000):
        assert r.check(KEY, _offer_at(50_000, i.to_bytes(16, "big")), BINDING, 50_000) is None
    assert len(r) == 3000
    for i in range(0, 3000, 7):
        assert (
            r.check(KEY, _offer_at(50_000, i.to_bytes(16, "big")), BINDING, 50_500)
            == "replayed nonce"
        )
    assert r.check(KEY, _offer_at(51_001, b"n" * 16), BINDING, 51_001) is None
    assert len(r) == 1


# -- parsing peer frames -----------------------------------------------------------------


def _python_peer_parse(data: bytes, want: MsgType) -> str | None:
    try:
        msg = PeerMsg.unpack(data)
    except WireError as exc:
        return str(exc)
    if msg.type is not want:
        return f"expected {want.name}, got {msg.type.name}"
    return None


def _same_refusal(c: str | None, py: str | None) -> None:
    """Equal, or for the two values a static string cannot hold (a size, a magic, a type
    number) the Python wording up to the number."""
    if c is None or py is None:
        assert c == py
        return
    numbered = {
        "bad magic": "bad magic 0x",
        "unknown frame type": "unknown frame type ",
        "peer frame is not 88 bytes, expected 88": "peer frame is ",
    }
    if c in numbered:
        assert py.startswith(numbered[c]), (c, py)
    else:
        assert c == py


@pytest.mark.parametrize("want", [MsgType.OFFER, MsgType.ANSWER])
def test_peer_parse_agrees_on_every_type_and_size(native: Native, want: MsgType) -> None:
    good = auth.make_offer(KEY, 1, TUP, BINDING).pack()
    cases = [good[:n] for n in (0, 1, 55, 87)] + [good + b"\0", good + b"\0" * 40]
    cases.append(struct.pack("<I", PEER_MAGIC ^ 1) + good[4:])
    cases.append(struct.pack("<I", MSG_MAGIC) + good[4:])
    cases += [good[:4] + struct.pack("<H", t) + good[6:] for t in range(0, 20)]
    cases.append(good[:4] + struct.pack("<H", 0xFFFF) + good[6:])
    for data in cases:
        parsed, why = native.parse(data, want)
        _same_refusal(why, _python_peer_parse(data, want))
        if why is None:
            assert parsed == data


# -- library frames: the channel's rules ---------------------------------------------------


HELLO = Msg(MsgType.HELLO, Status.OK, 1, 4242, arg=2).pack()


def python_channel_verdict(data: bytes, fds: int, loop: asyncio.AbstractEventLoop) -> str | None:
    """Sends `data` (with `fds` fds) over a real SEQPACKET pair and reads it as the router's
    channel reads a datagram (library_channel.read_frame); None if it is a frame a library may
    send."""
    del loop  # the reader is a plain function now
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        if fds:
            with open(os.devnull, "rb") as f:
                rights = array.array("i", [f.fileno()] * fds)
                ours.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        else:
            ours.send(data)
        got, anc, flags, _ = theirs.recvmsg(MSG_SIZE + 1, socket.CMSG_SPACE(8 * 4))
        passed = [
            fd
            for level, kind, payload in anc
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
            for fd in array.array("i", payload[: len(payload) - len(payload) % 4])
        ]
        for fd in passed:
            os.close(fd)
        msg, why = read_frame(got, flags, len(passed))
        return None if msg is not None else why


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def _lib_cases() -> list[tuple[bytes, int]]:
    t = Tuple4.parse("10.244.1.5:43210", "10.244.2.7:6379")
    good = Msg(MsgType.SWITCH_REQ, Status.OK, 7, 99, t, 1, 2).pack()
    cases = [(good, 0)] + [(good[:n], 0) for n in (0, 1, 20, 47)]
    cases += [(good + b"\0", 0), (good + b"\0" * 2, 0), (good * 3, 0)]
    cases += [(struct.pack("<I", MSG_MAGIC + 1) + good[4:], 0)]
    cases += [(struct.pack("<I", PEER_MAGIC) + good[4:], 0)]
    cases += [(good[:4] + struct.pack("<H", ty) + good[6:], 0) for ty in range(0, 20)]
    cases += [(good[:4] + struct.pack("<H", 0xFFFF) + good[6:], 0)]
    cases += [(good, 1), (good, 3), (HELLO, 1), (b"", 1), (good[:10], 2)]
    return cases


def test_library_frames_accepted_and_refused_alike(
    native: Native, loop: asyncio.AbstractEventLoop
) -> None:
    accepted = 0
    for data, fds in _lib_cases():
        py = python_channel_verdict(data, fds, loop)
        parsed, why = native.lib_parse(data, fds)
        _same_refusal(why, py)
        if why is None:
            accepted += 1
            assert parsed == data
            msg = Msg.unpack(data)
            c_tuple = native.lib.sfl_tuple(MsgBuf.from_buffer_copy(data))
            assert pytuple(c_tuple) == msg.tuple
            mirrored = native.lib.sfl_mirrored(ctypes.byref(c_tuple))
            assert pytuple(mirrored) == msg.tuple.mirrored()
    # Every type a library may send, and none other.
    assert accepted == 7 + 1  # the seven types, plus the original SWITCH_REQ


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 0xFFFF),
    st.binary(min_size=42, max_size=42),
    st.sampled_from([MSG_MAGIC, MSG_MAGIC, PEER_MAGIC, 0]),
)
def test_random_library_frames_agree(
    native: Native, loop: asyncio.AbstractEventLoop, mtype: int, rest: bytes, magic: int
) -> None:
    data = struct.pack("<IH", magic, mtype) + rest
    parsed, why = native.lib_parse(data, 0)
    _same_refusal(why, python_channel_verdict(data, 0, loop))
    if why is None:
        assert parsed == data


_ADDRS = st.sampled_from(["0.0.0.0", "10.0.0.1", "10.0.0.2", "255.255.255.255"])
_PORTS = st.sampled_from([0, 1, 6379, 65535])


def _valid_tuple(t: Tuple4) -> bool:
    """docs/wire.md's valid tuple: ports non-zero, addresses specified, two different ends."""
    return (
        t.local.port != 0
        and t.remote.port != 0
        and not t.local.ip.is_unspecified
        and not t.remote.ip.is_unspecified
        and t.local != t.remote
    )


@settings(max_examples=300, deadline=None)
@given(_ADDRS, _PORTS, _ADDRS, _PORTS)
def test_valid_tuple_as_the_wire_says(
    native: Native, lip: str, lport: int, rip: str, rport: int
) -> None:
    t = Tuple4.parse(f"{lip}:{lport}", f"{rip}:{rport}")
    ct = ctuple(t)
    assert bool(native.lib.sfl_valid_tuple(ctypes.byref(ct))) == _valid_tuple(t)


# -- ownership: the kernel asked from both sides ------------------------------------------


def _wait_state(owner: PythonOwner, t: Tuple4, reason_part: str) -> None:
    """The kernel moves a closed connection through its states on its own: wait for it."""
    for _ in range(200):
        if reason_part in owner.owns(t)[1]:
            return
        time.sleep(0.01)


def test_owns_live_closed_and_listener(native: Native) -> None:
    owner = PythonOwner()
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    seq = ctypes.c_uint32(0)
    with diag_socket() as d:
        try:
            for t in (tup_of(client), tup_of(server)):
                assert native.owns(d.fileno(), seq, t) == (True, "ESTABLISHED")
                assert owner.owns(t) == (True, "ESTABLISHED")
            # Only the listener's port is ours: the kernel's fallback must not count.
            lport = listener.getsockname()[1]
            nobody = Tuple4.parse(f"127.0.0.1:{lport}", "127.0.0.1:9")
            why = "no such TCP connection in the process's network namespace"
            assert native.owns(d.fileno(), seq, nobody) == (False, why)
            assert owner.owns(nobody) == (False, why)
            # The client closes: its end is left without a process, the server's half-open.
            ct, st_ = tup_of(client), tup_of(server)
            client.close()
            _wait_state(owner, ct, "FIN_WAIT2")
            c_verdict = native.owns(d.fileno(), seq, ct)
            assert c_verdict == owner.owns(ct)
            assert c_verdict == (
                False,
                "connection is FIN_WAIT2 but closed by its process (no inode)",
            )
            _wait_state(owner, st_, "CLOSE_WAIT")
            assert native.owns(d.fileno(), seq, st_) == (True, "CLOSE_WAIT") == owner.owns(st_)
            server.close()
            _wait_state(owner, ct, "TIME_WAIT")
            c_verdict = native.owns(d.fileno(), seq, ct)
            assert c_verdict == owner.owns(ct)
            assert not c_verdict[0]
            assert seq.value == 6  # one netlink sequence number per query
        finally:
            for s in (client, server, listener):
                s.close()
            owner.close()


def test_unaccepted_until_the_accept(native: Native) -> None:
    """The router asks a claim again while its connection waits in the listener's queue: only
    then, not for an accepted one, a closed one, or a tuple nobody has."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    seq = ctypes.c_uint32(0)
    with diag_socket() as d:
        try:
            theirs = tup_of(client).mirrored()  # the accepting end's view
            assert native.unaccepted(d.fileno(), seq, theirs)
            assert not native.unaccepted(d.fileno(), seq, tup_of(client))  # held: an inode
            lport = listener.getsockname()[1]
            nobody = Tuple4.parse(f"127.0.0.1:{lport}", "127.0.0.1:9")
            assert not native.unaccepted(d.fileno(), seq, nobody)
            server, _ = listener.accept()
            with server:
                assert tup_of(server) == theirs
                assert not native.unaccepted(d.fileno(), seq, theirs)
                server.close()
                assert not native.unaccepted(d.fileno(), seq, theirs)  # closed by its process
            assert seq.value == 5  # one netlink sequence number per query
        finally:
            client.close()
            listener.close()


# Scripted replies: the C reader and ownership._lookup fed the same netlink messages.

_NLHDR = struct.Struct("=IHHII")
_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sII I IIIII")


def _nl(mtype: int, seq: int, body: bytes) -> bytes:
    data = _NLHDR.pack(_NLHDR.size + len(body), mtype, 0, seq, 0) + body
    return data + b"\0" * (-len(data) % 4)


def _diag_reply(seq: int, t: Tuple4, state: int, inode: int) -> bytes:
    body = _DIAG_MSG.pack(
        socket.AF_INET,
        state,
        0,
        0,
        t.local.port.to_bytes(2, "big"),
        t.remote.port.to_bytes(2, "big"),
        t.local.ip.packed.ljust(16, b"\0"),
        t.remote.ip.packed.ljust(16, b"\0"),
        0,
        0xFFFFFFFF,
        0xFFFFFFFF,
        0,
        0,
        0,
        0,
        inode,
    )
    return _nl(20, seq, body)


def _err(seq: int, errno_: int) -> bytes:
    return _nl(2, seq, struct.pack("=i", -errno_) + b"\0" * 16)


def _scripted(
    native: Native, replies: list[bytes], t: Tuple4
) -> tuple[tuple[bool, str], tuple[bool, str]]:
    """Both verdicts when the 'kernel' (the other end of a datagram pair) has queued `replies`
    before the query with seq 5 is sent; nothing else will arrive."""
    c_side, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    py_side, kernel2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with c_side, kernel, py_side, kernel2:
        for r in replies:
            kernel.send(r)
            kernel2.send(r)
        seq = ctypes.c_uint32(4)
        c = native.owns(c_side.fileno(), seq, t, timeout_ms=100)
        checker = ownership.OwnershipChecker()
        py_side.settimeout(0.1)
        checker._diag[(0, 0)] = ownership._Diag(py_side, 1, seq=4)
        v = checker.owns((0, 0), t)
        return c, (v.ok, v.reason)


@pytest.mark.parametrize(
    ("replies", "want"),
    [
        ([], (False, "sock_diag: timed out")),
        ([_err(5, 0)], (False, "no such TCP connection in the process's network namespace")),
        ([_err(5, 2)], (False, "no such TCP connection in the process's network namespace")),
        ([_err(5, 13)], (False, "sock_diag: Permission denied")),
        ([_nl(3, 5, b"")], (False, "no such TCP connection in the process's network namespace")),
        ([_NLHDR.pack(8, 20, 0, 5, 0)], (False, "sock_diag: malformed netlink reply")),
        # Late answers to an earlier query come first: skipped, whatever they say.
        (
            [_diag_reply(4, TUP, 1, 77), _err(5, 2)],
            (False, "no such TCP connection in the process's network namespace"),
        ),
        ([_err(3, 13), _diag_reply(5, TUP, 1, 77)], (True, "ESTABLISHED")),
        ([_diag_reply(4, TUP, 1, 77) + _diag_reply(5, TUP, 8, 77)], (True, "CLOSE_WAIT")),
        # A listener on the local port, as the kernel may answer an exact query.
        (
            [_diag_reply(5, Tuple4.parse(f"0.0.0.0:{TUP.local.port}", "0.0.0.0:0"), 10, 5)],
            (False, "no such TCP connection in the process's network namespace"),
        ),
        ([_diag_reply(5, TUP, 4, 77)], (True, "FIN_WAIT1")),
        (
            [_diag_reply(5, TUP, 5, 0)],
            (False, "connection is FIN_WAIT2 but closed by its process (no inode)"),
        ),
        ([_diag_reply(5, TUP, 6, 0)], (False, "connection is TIME_WAIT")),
        ([_diag_reply(5, TUP, 2, 77)], (False, "connection is SYN_SENT")),
        ([_diag_reply(5, TUP, 10, 77)], (False, "connection is LISTEN")),
        ([_diag_reply(5, TUP, 42, 77)], (False, "connection is 42")),
        # A diag message too short to read, then the real answer.
        ([_nl(20, 5, b"\0" * 8) + _diag_reply(5, TUP, 1, 9)], (True, "ESTABLISHED")),
    ],
)
def test_reply_reading_agrees(native: Native, replies: list[bytes], want: tuple[bool, str]) -> None:
    c, py = _scripted(native, replies, TUP)
    assert c == py == want


def test_owns_refuses_without_a_socket(native: Native) -> None:
    seq = ctypes.c_uint32(0)
    assert native.owns(-1, seq, TUP) == (False, "namespace not attached")


def test_binding_from_a_socket(native: Native) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as c:
        s, _ = listener.accept()
        with s:
            out = (ctypes.c_uint8 * 12)()
            assert native.lib.sfp_binding(c.fileno(), 1, out) == 0
            assert bytes(out) == underlay_binding(c.getsockname(), c.getpeername())
            assert native.lib.sfp_binding(s.fileno(), 0, out) == 0
            assert bytes(out) == underlay_binding(s.getpeername(), s.getsockname())
    with socket.socket() as unconnected:
        assert native.lib.sfp_binding(unconnected.fileno(), 1, out) == -107  # ENOTCONN


@pytest.mark.parametrize("mac_byte", [0, 15, 16, 31])
def test_every_mac_byte_counts(native: Native, replay: Any, mac_byte: int) -> None:
    offer = auth.make_offer(KEY, 8, TUP, BINDING)
    raw = bytearray(offer.pack())
    raw[56 + mac_byte] ^= 0x80
    assert (
        checker_verdict(auth.OfferChecker(KEY, 60_000, 4), bytes(raw), BINDING, offer.timestamp_ms)
        == "bad MAC"
    )
    assert replay(60_000, 4).check(KEY, bytes(raw), BINDING, offer.timestamp_ms) == "bad MAC"
    answer = bytearray(auth.make_answer(KEY, offer, Status.OK, BINDING).pack())
    answer[56 + mac_byte] ^= 0x01
    why = "ANSWER MAC invalid (peer has another cluster key)"
    assert native.answer_check(KEY, offer.pack(), bytes(answer), BINDING) == why
