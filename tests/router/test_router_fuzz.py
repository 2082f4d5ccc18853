"""Fuzzing the router's two protocols against real router processes.

Two standalone routers (127.0.0.1 and 127.0.0.2, a static overlay map) with a well-behaved
library on each. Malformed, truncated, oversized and slow inputs go to router A's library socket
and router B's peer port. For every input the router must close that client only, log why, and
keep serving: afterwards the bystander libraries were never dropped, a real switch between the
two routers works, and the routers' open fds and RSS did not grow (bounds below).

Peer-port inputs are structured `PeerMsg` frames ("SFR2") as well as bytes: valid-looking OFFERs
with bad MACs (drawn, wrong key, signed for another connection), timestamps outside the window,
replayed nonces, ANSWERs, wrong magics (the old "SFR1" too), truncated, oversized and random,
from an allowed peer and from a source that is none. Each must get the one log line and reason
`router_fuzz.peer_verdict` predicts, move the router's counters by exactly one, and only an
authentic OFFER gets an ANSWER (authentic itself, and a refusal).

The default run is small; `pytest --long` runs well over 100,000 inputs.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shuntflow.router.auth import make_offer
from shuntflow.router.testing import TEST_KEY, FakeLibrary, RouterProcess, free_port
from shuntflow.wire import (
    MSG_SIZE,
    PEER_MAGIC,
    PEER_SIZE,
    Msg,
    MsgType,
    PeerMsg,
    Status,
    Tuple4,
    underlay_binding,
)

from .router_fuzz import (
    AUTH_WINDOW_MS,
    BYSTANDER_IP,
    NEVER_ISSUED_FLOOR,
    PEER_EVENTS,
    Datagram,
    LogTail,
    PeerInput,
    PeerOutcome,
    check_peer_outcomes,
    events,
    hello,
    library_datagrams,
    peer_inputs,
    reason_of,
    rss_kib,
    run_library_scripts,
    run_peer_inputs,
)

pytestmark = pytest.mark.router

MAP = {"198.19.1.0/24": "127.0.0.1", "198.19.2.0/24": "127.0.0.2"}
# Short deadlines so slow inputs cost the test little; the logic is the same as with defaults.
OFFER_READ_TIMEOUT_MS = 250
PEER_IDLE_TIMEOUT_MS = 400  # for the first byte of an OFFER (default 30 s)
HELLO_TIMEOUT_MS = 250
MAX_CLIENTS = 64
MAX_INCOMING = 64
# After the fuzz, allowed growth over the warmed-up router: no fd at all, and this much RSS
# (Python's allocator keeps some arenas; a leak of one object per input would be far more).
RSS_GROWTH_KIB = 6 * 1024


@dataclass
class Env:
    a: RouterProcess
    b: RouterProcess
    port: int
    bystanders: list[FakeLibrary]
    inputs: int = 0
    switch_index: int = 0
    log_a: LogTail = field(init=False)
    log_b: LogTail = field(init=False)

    def __post_init__(self) -> None:
        self.log_a = LogTail(self.a.log_file)
        self.log_b = LogTail(self.b.log_file)

    def switch_works(self) -> None:
        """A real switch through both routers, between two libraries that were there all along."""
        self.switch_index += 1
        t = Tuple4.parse(f"198.19.1.250:{10000 + self.switch_index}", f"{BYSTANDER_IP}:443")
        la, lb = self.bystanders
        lb.owned.add(t.mirrored())
        res = la.wait_result(la.request(t))
        assert res.msg.status == Status.OK, Status(res.msg.status).name
        lb.wait_host([t.key()])
        for lib in (la, lb):
            assert not lib.closed_by_router.is_set()
        for r in (self.a, self.b):
            info = r.status()["router"]
            assert info["clients_ready"] >= 1, info
        # each switch A served is one SWITCH_REQ -> SWITCH_RES sample
        assert self.a.status()["router"]["switch_req_res_us"]["count"] >= self.switch_index

    def peer_counters(self) -> Counter[str]:
        """Router B's counters of the peer-side events."""
        info = self.b.status()["router"]
        sec = info["security"]
        return Counter(
            peer_dropped=info["peer_connections_dropped"],
            peer_rejected=sec["peers_rejected"],
            offer_rejected=sec["offers_rejected"],
            offer_refused=sum(n for k, n in info["failures"].items() if k.startswith("offer_")),
        )

    def resources(self) -> tuple[int, int, int, int]:
        return (
            self.a.settled_fd_count(),
            self.b.settled_fd_count(),
            rss_kib(self.a.pid),
            rss_kib(self.b.pid),
        )


def _router(d: Path, ip: str, port: int) -> RouterProcess:
    (d / "map.json").write_text(json.dumps(MAP))
    (d / "router.toml").write_text(
        f"offer_read_timeout_ms = {OFFER_READ_TIMEOUT_MS}\n"
        f"peer_idle_timeout_ms = {PEER_IDLE_TIMEOUT_MS}\n"
        f"auth_window_ms = {AUTH_WINDOW_MS}\n"
        # No warm connections: with an idle timeout this short, A's pool (refreshed every 5 s)
        # would hold connections B has already timed out, so B's log would gather pool timeouts
        # and both routers' fd counts would swing by the pool's size at random moments. The
        # pool is not what is fuzzed here; B's listener is.
        "peer_pool_size = 0\n"
        f"hello_timeout_ms = {HELLO_TIMEOUT_MS}\n"
        f"max_clients = {MAX_CLIENTS}\n"
        f"max_incoming = {MAX_INCOMING}\n"
    )
    return RouterProcess(
        d / "router.sock",
        ip,
        port,
        ["--map", str(d / "map.json"), "--config", str(d / "router.toml")],
    )


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    port = free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _router(tmp_path / "a", "127.0.0.1", port)
    try:
        b = _router(tmp_path / "b", "127.0.0.2", port)
    except BaseException:
        a.stop()
        raise
    libs: list[FakeLibrary] = []
    try:
        libs = [FakeLibrary(a.socket), FakeLibrary(b.socket)]
        e = Env(a, b, port, libs)
        e.switch_works()  # warm-up: every code path of a switch has run once before measuring
        yield e
        for r in (a, b):
            errors = [ln for ln in r.log().splitlines() if "level=error" in ln]
            assert not errors, errors[:5]
    finally:
        for lib in libs:
            lib.close()
        b.stop()
        a.stop()


def wait_events(
    tail: LogTail, names: tuple[str, ...], count: int, timeout: float = 5.0
) -> list[str]:
    """The next `count` log lines of these events (the router logs just after it closes)."""
    found: list[str] = []
    deadline = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < deadline:
        found += events(tail.read(), names)
        if len(found) < count:
            time.sleep(0.01)
    return found


# -- library channel -------------------------------------------------------------------------

scripts = st.lists(
    st.one_of(
        st.lists(library_datagrams(), min_size=1, max_size=5),
        # most clients say HELLO first, so the fuzz reaches the frames behind it
        st.builds(lambda rest: [hello(), *rest], st.lists(library_datagrams(), max_size=5)),
        st.builds(lambda rest: [hello(), *rest], st.lists(library_datagrams(), max_size=5)),
    ),
    min_size=1,
    max_size=8,
)


def fuzz_library(e: Env, examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(batch=scripts)
    def one_batch(batch: list[list[Datagram]]) -> None:
        assert e.a.proc.poll() is None, "router A died"
        samples = e.a.status()["router"]["switch_time_us"]["count"]
        calls_before = switch_calls_counts(e.a)
        outcomes = run_library_scripts(e.a.socket, batch)
        for out in outcomes:
            assert out.closed, f"router kept a client that sent {out.expect}"
            assert not out.stray, out.stray
            assert out.acks == out.expect.hello_acks
        e.inputs += sum(o.inputs for o in outcomes)
        lines = wait_events(e.log_a, ("client_dropped", "client_closed"), len(outcomes))
        assert len(lines) == len(outcomes), lines
        logged = [reason_of(ln) for ln in lines]
        for ln in lines:
            assert "event=client_dropped" in ln and "level=warning" in ln, ln
        for want in sorted((o.expect.drop_reason for o in outcomes), key=len, reverse=True):
            match = next((r for r in logged if want in r), None)
            assert match is not None, f"no drop logged with {want!r}; logged: {logged}"
            logged.remove(match)
        # every SWITCH_DONE (arg2 = 1) before the drop was taken as one switch time sample
        own_done = sum(o.expect.own_switch_done for o in outcomes)
        assert e.a.status()["router"]["switch_time_us"]["count"] - samples == own_done
        # every SWITCH_CALLS before the drop was taken as a sample or left out, as predicted
        taken = sum(o.expect.switch_calls for o in outcomes)
        rejected = sum(o.expect.switch_calls_rejected for o in outcomes)
        after = switch_calls_counts(e.a)
        assert (after[0] - calls_before[0], after[1] - calls_before[1]) == (taken, rejected)

    one_batch()


def switch_calls_counts(r: RouterProcess) -> tuple[int, int]:
    """SWITCH_CALLS frames router `r` took (completed or failed window) and left out."""
    info = r.status()["router"]
    taken = info["switch_call_max_us"]["count"] + info["switch_call_max_failed_us"]["count"]
    return taken, info["switch_calls_rejected"]


def test_library_channel_fuzz(env: Env) -> None:
    before = env.resources()
    fuzz_library(env, 150)
    env.switch_works()
    check_no_growth(env, before)
    assert env.inputs >= 500


# -- peer port -------------------------------------------------------------------------------


def settle(tail: LogTail, quiet: float = 0.5) -> None:
    """Skip log lines until the router has been quiet for a while (late refusals of offers
    that earlier fuzz made router A send)."""
    last = time.monotonic()
    while time.monotonic() - last < quiet:
        if tail.read():
            last = time.monotonic()
        time.sleep(0.05)


def peer_batch(e: Env, batch: list[PeerInput], allowed: bool, timeout: float = 0.0) -> Counter[str]:
    """Send `batch` to router B's peer port from an allowed peer (127.0.0.1, a host of B's map)
    or from nobody's address (127.0.0.3); check every connection's outcome, log line and
    counter; the events seen."""
    assert e.b.proc.poll() is None, "router B died"
    src = "127.0.0.1" if allowed else "127.0.0.3"
    timeout = timeout or max(OFFER_READ_TIMEOUT_MS, PEER_IDLE_TIMEOUT_MS) / 1000 + 3
    before = e.peer_counters()
    outcomes = run_peer_inputs(("127.0.0.2", e.port), batch, src, timeout, TEST_KEY)
    e.inputs += len(batch)
    lines = wait_events(e.log_b, PEER_EVENTS, len(batch))
    seen, problems = check_peer_outcomes(outcomes, lines, allowed, TEST_KEY)
    assert not problems, "\n".join(problems[:20])
    assert sum(seen.values()) == len(batch)
    counted = e.peer_counters() - before
    assert counted == Counter({k: n for k, n in seen.items() if k != "peer_closed_idle"}), (
        counted,
        seen,
    )
    return seen


def fuzz_peer(e: Env, examples: int, max_batch: int = 12) -> Counter[str]:
    settle(e.log_b)
    total: Counter[str] = Counter()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        batch=st.lists(peer_inputs(), min_size=1, max_size=max_batch),
        allowed=st.sampled_from([True, True, True, False]),
    )
    def one_batch(batch: list[PeerInput], allowed: bool) -> None:
        total.update(peer_batch(e, batch, allowed))

    one_batch()
    return total


def test_peer_port_fuzz(env: Env) -> None:
    before = env.resources()
    seen = fuzz_peer(env, 40)
    print(f"\npeer events: {dict(seen)}")
    env.switch_works()
    check_no_growth(env, before)


def test_peer_port_cases(env: Env) -> None:
    """One input of each kind, each with the exact outcome the oracle predicts (the fuzz draws
    the same kinds, this makes sure every one of them is there)."""
    before = env.resources()
    t = Tuple4.parse("198.19.1.7:40000", "198.19.2.7:80")  # initiator's (A's) view
    offer = PeerMsg(MsgType.OFFER, tuple=t)
    window = AUTH_WINDOW_MS
    cases = [
        PeerInput(offer, mac="valid"),  # authentic: refused, with an authentic ANSWER
        PeerInput(offer, mac="valid", end="silent"),  # no FIN needed for a whole frame
        PeerInput(offer, mac="valid", tail=5000),  # bytes after the frame are never read
        PeerInput(offer, mac="drawn"),  # MAC of zeros
        PeerInput(offer, mac="wrong key"),
        PeerInput(offer, mac="elsewhere"),  # a valid OFFER copied onto another connection
        PeerInput(offer, mac="valid", skew_ms=window + 5000),
        PeerInput(offer, mac="valid", skew_ms=-window - 5000),
        PeerInput(offer, mac="valid", skew_ms=-(1 << 62)),  # the epoch
        PeerInput(offer, mac="valid", nonce_group=1),  # one of these two is a replay
        PeerInput(offer, mac="valid", nonce_group=1),
        PeerInput(replace(offer, type=MsgType.ANSWER), mac="valid"),
        PeerInput(replace(offer, type=MsgType.HELLO), mac="valid"),
        PeerInput(replace(offer, type=cast(MsgType, 999)), mac="valid"),
        PeerInput(offer, mac="valid", magic=0x31524653),  # "SFR1"
        PeerInput(offer, mac="valid", magic=PEER_MAGIC ^ 1),
        PeerInput(offer, mac="valid", cut=PEER_SIZE - 1),
        PeerInput(offer, mac="valid", cut=PEER_SIZE // 2, end="silent"),
        PeerInput(raw=os.urandom(PEER_SIZE)),
        PeerInput(raw=b"GET / HTTP/1.0\r\n\r\n"),
        PeerInput(),  # connect and close: a peer's warm pool letting one go
        PeerInput(end="silent"),  # connect and wait: the idle deadline
    ]
    seen = peer_batch(env, cases, allowed=True)
    assert seen == Counter(
        offer_refused=4,  # 3 authentic + the first of the replayed pair
        offer_rejected=7,  # zero MAC, wrong key, elsewhere, 3 timestamps, replay
        peer_dropped=10,
        peer_closed_idle=1,
    ), seen
    # a replay of an OFFER accepted earlier, re-signed for a new connection (only a key holder
    # could): still refused by the nonce cache
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.connect(("127.0.0.2", env.port))
        binding = underlay_binding(s.getsockname(), s.getpeername())
        first = make_offer(TEST_KEY, 1, t, binding)
        s.sendall(first.pack())
        s.settimeout(5)
        assert PeerMsg.unpack(s.recv(PEER_SIZE)).status == Status.PEER_REFUSED
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.connect(("127.0.0.2", env.port))
        binding = underlay_binding(s.getsockname(), s.getpeername())
        s.sendall(replace(first, seq=2).signed(TEST_KEY, binding).pack())
        s.settimeout(5)
        assert s.recv(PEER_SIZE) == b""  # closed without an ANSWER
    lines = wait_events(env.log_b, PEER_EVENTS, 2)
    assert "event=offer_refused" in lines[0], lines
    assert "event=offer_rejected" in lines[1] and 'reason="replayed nonce"' in lines[1], lines
    # the same kinds from a source that is no peer: closed before a byte is read
    seen = peer_batch(env, cases, allowed=False)
    assert seen == Counter(peer_rejected=len(cases)), seen
    env.switch_works()
    check_no_growth(env, before)


# -- out-of-order replies, seqs never issued -------------------------------------------------


class RawClient:
    """A library connection that says exactly what the test tells it to."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(str(path))
        self.sock.settimeout(5)

    def send(self, m: Msg) -> None:
        self.sock.send(m.pack())

    def recv(self) -> tuple[Msg | None, int]:
        """Next frame (None at EOF) and the number of fds that came with it."""
        data, anc, _flags, _ = self.sock.recvmsg(MSG_SIZE + 1, socket.CMSG_SPACE(16))
        nfds = 0
        for _level, _kind, payload in anc:
            for i in range(0, len(payload) - len(payload) % 4, 4):
                os.close(int.from_bytes(payload[i : i + 4], "little"))
                nfds += 1
        return (Msg.unpack(data) if data else None), nfds

    def close(self) -> None:
        self.sock.close()


def test_out_of_order_replies(env: Env) -> None:
    """Replies for a real claim in every wrong order, then for seqs the router never sent."""
    before = env.resources()
    la, lb = env.bystanders
    x = RawClient(env.b.socket)
    try:
        x.send(Msg(MsgType.HELLO, pid=os.getpid(), arg=2))
        assert x.recv()[0] == Msg(MsgType.HELLO_ACK, arg=1)
        t = Tuple4.parse("198.19.1.250:20001", f"{BYSTANDER_IP}:8080")
        mine = t.mirrored()
        lb.claim_delay = 0.02  # x answers first
        lb.owned.add(mine)
        seq = la.request(t)
        claim, nfds = x.recv()
        assert claim is not None and claim.type is MsgType.CLAIM_REQ and nfds == 0
        s = claim.seq
        # answers of the wrong kind for a live claim: ignored
        x.send(Msg(MsgType.CONN_INFO, 2, s, tuple=mine, arg=1 << 63))
        x.send(Msg(MsgType.STATS_END, 0, s, arg=7, arg2=9))
        x.send(Msg(MsgType.CLAIM_RES, Status.NOT_MINE, s, tuple=mine))
        x.send(Msg(MsgType.CLAIM_RES, Status.NOT_MINE, s, tuple=mine))  # repeated
        assert la.wait_result(seq).msg.status == Status.OK  # lb won the claim
        lb.wait_host([t.key()])
        # a late "it's mine" after the claim went to lb: told DUPLICATE, never given an fd
        x.send(Msg(MsgType.CLAIM_RES, Status.OK, s, tuple=mine))
        late, nfds = x.recv()
        assert late is not None and late.type is MsgType.SWITCH_RES and nfds == 0
        assert late.status == Status.DUPLICATE and late.seq == s
        # a status query while x answers a different seq, then its own one twice
        status_done: list[dict[str, object]] = []
        thread = threading.Thread(target=lambda: status_done.append(env.b.status()))
        thread.start()
        stats_req, _ = x.recv()
        assert stats_req is not None and stats_req.type is MsgType.STATS_REQ
        x.send(Msg(MsgType.CONN_INFO, 99, s, tuple=mine))  # the claim's seq: ignored
        x.send(Msg(MsgType.STATS_END, 0, stats_req.seq, arg=1, arg2=2))
        x.send(Msg(MsgType.STATS_END, 0, stats_req.seq, arg=3, arg2=4))
        thread.join(5)
        assert status_done, "status query hung"
        # finally a reply for a seq the router never sent: x, and only x, is dropped
        never = s + NEVER_ISSUED_FLOOR
        x.send(Msg(MsgType.CLAIM_RES, Status.OK, never, tuple=mine))
        assert x.recv() == (None, 0)
    finally:
        x.close()
        lb.claim_delay = 0.0
    line = wait_events(env.log_b, ("client_dropped",), 1)[0]
    assert f"seq {never:#x} the router never sent" in reason_of(line)
    assert "claim_res_repeated" in env.b.log() and "claim_res_late" in env.b.log()
    env.switch_works()
    check_no_growth(env, before)


# -- slow clients ----------------------------------------------------------------------------


def test_library_slowloris(env: Env) -> None:
    """Clients that connect and never say HELLO fill the client table only until the HELLO
    deadline; byte-by-byte and half frames are dropped at once (one datagram = one frame)."""
    before = env.resources()
    drip = [[Datagram(b"S")] for _ in range(10)] + [[hello(), Datagram(b"SFL1" * 6)]]
    outcomes = run_library_scripts(env.a.socket, drip)
    assert all(o.closed and not o.stray for o in outcomes), outcomes
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(MAX_CLIENTS * 2)]
    try:
        for s in idle:
            s.connect(str(env.a.socket))
        # every idle one is closed by the router: at once beyond the table's size, the others
        # once the deadline passes
        for s in idle:
            s.settimeout(HELLO_TIMEOUT_MS / 1000 + 5)
            assert s.recv(MSG_SIZE) == b""
    finally:
        for s in idle:
            s.close()
    with FakeLibrary(env.a.socket) as newcomer:  # the table has room again
        assert not newcomer.closed_by_router.is_set()
    a_log = env.a.log()
    assert a_log.count('reason="no HELLO within') >= MAX_CLIENTS - 2
    assert "event=client_rejected" in a_log
    env.switch_works()
    check_no_growth(env, before)


def test_peer_slowloris(env: Env) -> None:
    """A byte every 20 ms, half a frame then silence, and more idle connections than the router
    takes at once: each is cut at the read deadline; then the router serves again."""
    before = env.resources()
    settle(env.log_b)
    frame = PeerMsg(MsgType.OFFER, tuple=Tuple4.parse("198.19.1.9:1", "198.19.2.9:2"))
    slow = [PeerInput(frame, mac="valid", end="silent", drip=0.02)]
    half = [PeerInput(frame, mac="valid", cut=PEER_SIZE // 2, end="silent") for _ in range(5)]
    idle = [PeerInput(end="silent") for _ in range(MAX_INCOMING * 2)]
    results: list[list[PeerOutcome]] = []

    def run(inputs: list[PeerInput]) -> Callable[[], None]:
        return lambda: results.append(
            run_peer_inputs(("127.0.0.2", env.port), inputs, "127.0.0.1", 10, TEST_KEY)
        )

    threads = [threading.Thread(target=run(x)) for x in (slow, half, idle)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(20)
    outcomes = [o for r in results for o in r]
    assert len(outcomes) == 1 + 5 + MAX_INCOMING * 2
    assert all(o.closed and not o.received for o in outcomes)
    total = len(outcomes)
    lines = wait_events(env.log_b, ("peer_dropped",), total)
    assert len(lines) == total, lines
    why = Counter(
        "too many"
        if "too many incoming offers" in ln
        else "idle"
        if f"idle for {PEER_IDLE_TIMEOUT_MS / 1000:g}s without an OFFER" in ln
        else "slow"
        if f"no complete OFFER within {OFFER_READ_TIMEOUT_MS / 1000:g}s" in ln
        else ln
        for ln in lines
    )
    # At most MAX_INCOMING held at once: the rest of the idle ones were turned away at once,
    # but for the slots whose holders could have been cut before the batch's last connect (a
    # held connection is cut no sooner than its deadline after its connect; on a loaded machine
    # the batch's connects can take longer than the read deadline).
    last = max(o.sent_at_ms for o in outcomes)
    freed = sum(
        o.sent_at_ms + (OFFER_READ_TIMEOUT_MS if o.data else PEER_IDLE_TIMEOUT_MS) <= last
        for o in outcomes
    )
    assert why["too many"] >= total - MAX_INCOMING - freed, (why, freed)
    assert why["idle"] >= MAX_INCOMING - 6, why
    assert why["too many"] + why["idle"] + why["slow"] == total, why
    env.switch_works()
    check_no_growth(env, before)


# -- control socket --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
control_lines = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ")),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.just("cmd"), json_values).map(lambda v: json.dumps(v).encode()),
    st.integers(1, 20_000).map(lambda n: b"[" * n + b"]" * n),  # deeper than json can parse
    st.sampled_from([b'{"cmd": "ping"}', b'{"cmd": "status"}']),
)


def test_control_socket_fuzz(env: Env) -> None:
    """Every line gets one JSON object back on the same connection; none closes it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(env.a.control))
        s.settimeout(10)
        reader = s.makefile("rb")

        @settings(max_examples=200, deadline=None, database=None)
        @given(line=control_lines)
        def one_line(line: bytes) -> None:
            s.sendall(line + b"\n")
            if not line.strip():
                return  # blank lines are skipped without an answer
            answer = json.loads(reader.readline())
            assert isinstance(answer, dict)
            assert "error" in answer or "ok" in answer or "router" in answer, answer

        one_line()
        s.sendall(b'{"cmd": "ping"}\n')
        assert json.loads(reader.readline())["ok"] is True
    errors = [ln for ln in env.a.log().splitlines() if "event=control_error" in ln]
    assert not errors, errors[:3]


# -- the whole thing, at size ----------------------------------------------------------------


def check_no_growth(e: Env, before: tuple[int, int, int, int]) -> None:
    fds_a, fds_b, rss_a, rss_b = e.resources()
    print(
        f"\nrouter A: fds {before[0]} -> {fds_a}, RSS {before[2]} -> {rss_a} KiB; "
        f"router B: fds {before[1]} -> {fds_b}, RSS {before[3]} -> {rss_b} KiB; "
        f"{e.inputs} inputs"
    )
    assert (fds_a, fds_b) == before[:2], (e.a.fds(), e.b.fds())
    if os.environ.get("SHUNTFLOW_ROUTER_PRELOAD"):
        # Under the sanitizer runtime (make test-asan) freed blocks sit in ASan's quarantine
        # (256 MiB by default), so RSS measures the quarantine, not the router; the fd check
        # above and the normal suite's run of this check hold the bound.
        return
    assert rss_a - before[2] <= RSS_GROWTH_KIB
    assert rss_b - before[3] <= RSS_GROWTH_KIB


@pytest.mark.long
@pytest.mark.timeout(2400)  # ~10 minutes on a shared 2-vCPU VM, mostly hypothesis itself
def test_fuzz_100k(env: Env) -> None:
    fuzz_library(env, 2_000)  # warm up the allocator before the baseline
    before = env.resources()
    while env.inputs < 80_000:
        fuzz_library(env, 2_000)
    seen: Counter[str] = Counter()
    while env.inputs < 100_000:
        seen += fuzz_peer(env, 200, max_batch=40)
    print(f"\npeer events: {dict(seen)}")
    test_library_slowloris(env)
    test_peer_slowloris(env)
    env.switch_works()
    check_no_growth(env, before)
    assert env.inputs >= 100_000
