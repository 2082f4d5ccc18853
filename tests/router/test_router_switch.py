"""Two real routers on loopback (A = 127.0.0.1, B = 127.0.0.2, one peer port, one --map file),
with fake libraries speaking SEQPACKET + SCM_RIGHTS: the switch itself, refusals, duplicates
and crossing offers (invariant 5), and fd hygiene of the router processes.

The overlay plan of the map: support.MAP.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from shuntflow.router.testing import FakeLibrary, RouterProcess, offer_bytes, recv_exact
from shuntflow.wire import PEER_SIZE, Mode, MsgType, PeerMsg, Status, Tuple4

from .support import assert_pair, start_pair, tup

pytestmark = pytest.mark.router


@pytest.fixture(scope="module")
def routers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RouterProcess, RouterProcess]]:
    a, b, _ = start_pair(tmp_path_factory.mktemp("rt-switch"))
    yield a, b
    assert b.stop() == 0, b.log()
    assert a.stop() == 0, a.log()
    for r in (a, b):
        assert not r.socket.exists() and not r.control.exists(), "sockets left behind"
        assert "level=error" not in r.log(), r.log()


def test_switch_hands_both_ends_of_one_connection(
    routers: tuple[RouterProcess, RouterProcess],
) -> None:
    a, b = routers
    t = tup(1)
    with FakeLibrary(a.socket) as la, FakeLibrary(b.socket, owned={t.mirrored()}) as lb:
        res = la.wait_result(la.request(t, seq=7))
        assert res.msg.status == Status.OK, Status(res.msg.status).name
        assert res.msg.seq == 7 and res.msg.tuple == t
        assert res.sock is not None
        lb.wait_host([t.key()])
        # B's library was asked with B's view of the tuple, a router seq (high bit set),
        # and got the fd with that seq.
        claim = lb.claims[-1]
        assert claim.tuple == t.mirrored() and claim.seq & 0x8000_0000
        assert lb.results[claim.seq].msg.status == Status.OK
        assert lb.results[claim.seq].msg.tuple == t.mirrored()
        assert_pair(res.sock, lb.host[t.key()])
        # A host connection between the two routers' underlay addresses, in the host ns.
        assert res.sock.getsockname()[0] == "127.0.0.1"
        assert res.sock.getpeername() == ("127.0.0.2", b.status()["router"]["peer_port"])
        # Big transfer both ways through the passed fds: nothing swallowed by the routers.
        blob = bytes(range(256)) * 4096
        sender = threading.Thread(target=res.sock.sendall, args=(blob,))
        sender.start()
        got = bytearray()
        peer = lb.host[t.key()]
        while len(got) < len(blob):
            chunk = peer.recv(65536)
            assert chunk
            got += chunk
        sender.join()
        assert bytes(got) == blob


def refusal_reason(r: RouterProcess, t: Tuple4, timeout: float = 5.0) -> str:
    """The detail of router `r`'s offer_refused line for the offer of `t` (its peer's view)."""
    want = f"tuple={t.mirrored()} "
    deadline = time.monotonic() + timeout
    while True:
        for line in r.log().splitlines():
            if "event=offer_refused" in line and want in line:
                m = re.search(r'detail="([^"]*)"', line)
                assert m, line
                return m[1]
        assert time.monotonic() < deadline, f"no offer_refused for {want} in {r.log()[-2000:]}"
        time.sleep(0.01)


def test_nobody_claims_is_peer_refused_fast(routers: tuple[RouterProcess, RouterProcess]) -> None:
    a, b = routers
    t = tup(2)
    with FakeLibrary(a.socket) as la, FakeLibrary(b.socket, owned=set()) as lb:
        res = la.wait_result(la.request(t))
        assert res.msg.status == Status.PEER_REFUSED and res.sock is None
        assert len(lb.claims) == 1 and not lb.host
        # All said NOT_MINE: refused on that, not at the claim timeout.
        assert refusal_reason(b, t) == "all libraries said NOT_MINE"


def test_silent_library_times_out_into_peer_refused(
    routers: tuple[RouterProcess, RouterProcess],
) -> None:
    a, b = routers
    t = tup(3)
    with FakeLibrary(a.socket) as la, FakeLibrary(b.socket, answer_claims=False) as lb:
        start = time.monotonic()
        res = la.wait_result(la.request(t))
        elapsed = time.monotonic() - start
        assert res.msg.status == Status.PEER_REFUSED and res.sock is None
        # Refused at the claim timeout (250 ms: a timer never fires early), for that reason.
        assert elapsed >= 0.25, elapsed
        assert refusal_reason(b, t) == "claim timed out"
        assert lb.claims


def test_late_claim_gets_no_fd(routers: tuple[RouterProcess, RouterProcess]) -> None:
    """A library claiming after the timeout is told TIMEOUT, and the initiator stays refused."""
    a, b = routers
    t = tup(4)
    with (
        FakeLibrary(a.socket) as la,
        FakeLibrary(b.socket, owned={t.mirrored()}, claim_delay=0.5) as lb,
    ):
        res = la.wait_result(la.request(t))
        assert res.msg.status == Status.PEER_REFUSED
        claim_seq = None
        deadline = time.monotonic() + 2
        while claim_seq is None and time.monotonic() < deadline:
            claim_seq = lb.claims[-1].seq if lb.claims else None
            time.sleep(0.01)
        assert claim_seq is not None
        late = lb.wait_result(claim_seq, timeout=2)
        assert late.msg.status == Status.TIMEOUT and late.sock is None
        assert not lb.host


def wait_claimed(lib: FakeLibrary, t: Tuple4) -> None:
    deadline = time.monotonic() + 5
    while not any(c.tuple == t for c in lib.claims):
        assert time.monotonic() < deadline, f"no claim for {t}"
        time.sleep(0.005)


def own_request_served(la: FakeLibrary, first: int, lb: FakeLibrary, own: int) -> None:
    """A's request and B's own one were each answered OK on its seq, with the two ends of one
    host connection."""
    mine = lb.wait_result(own)
    assert mine.msg.status == Status.OK and mine.sock is not None, mine.msg
    res = la.wait_result(first)
    assert res.msg.status == Status.OK and res.sock is not None, res.msg
    assert_pair(res.sock, mine.sock)


def test_own_request_wins_the_claim(routers: tuple[RouterProcess, RouterProcess]) -> None:
    """The accepting end's own SWITCH_REQ, arriving while a peer's OFFER for the same connection
    waits for its claim, takes that OFFER's connection at once: one host connection, each
    library answered on its own request's seq, no CLAIM_RES needed."""
    a, b = routers
    t = tup(40)
    with FakeLibrary(a.socket) as la, FakeLibrary(b.socket, answer_claims=False) as lb:
        first = la.request(t)
        wait_claimed(lb, t.mirrored())
        own_request_served(la, first, lb, lb.request(t.mirrored()))
        assert not la.extra_host and not lb.extra_host
    assert any(
        "event=switch_done how=claimed" in line and f"tuple={t.mirrored()} " in line
        for line in b.log().splitlines()
    ), b.log()[-2000:]


def test_slim_library_not_mine_yet_holds_the_claim(
    patient_routers: tuple[RouterProcess, RouterProcess],
) -> None:
    """A slim library says NOT_MINE to a connection it has not accepted yet: the claim waits for
    its accept-time request rather than refuse the OFFER (a shuntflow library's NOT_MINE is
    refused at once: test_nobody_claims_is_peer_refused_fast). The claim timeout is 10 s here,
    so a slow machine cannot time the claim out before the request comes."""
    a, b = patient_routers
    t = tup(41)
    with FakeLibrary(a.socket) as la, FakeLibrary(b.socket, mode=Mode.SLIM, owned=set()) as lb:
        first = la.request(t)
        wait_claimed(lb, t.mirrored())
        time.sleep(0.05)  # its NOT_MINE is in, or the test proves less (the request wins anyway)
        own_request_served(la, first, lb, lb.request(t.mirrored()))
    refused = [line for line in b.log().splitlines() if "event=offer_refused" in line]
    assert not [line for line in refused if f"tuple={t.mirrored()} " in line], refused


def test_slim_port_reused_within_a_second_switches_again(
    routers: tuple[RouterProcess, RouterProcess],
) -> None:
    """Slim libraries ask for every connection they make or accept: the same tuple again right
    after its switch (a client port reused at a high connection rate) is a new connection, and
    it is switched, not refused as a duplicate of the last one."""
    a, b = routers
    t = tup(42)
    with (
        FakeLibrary(a.socket, mode=Mode.SLIM) as la,
        FakeLibrary(b.socket, mode=Mode.SLIM, owned={t.mirrored()}) as lb,
    ):
        first = la.wait_result(la.request(t))
        assert first.msg.status == Status.OK and first.sock is not None, first.msg
        lb.wait_host([t.key()])
        again = la.request(t)  # well within the recently-switched table's second
        deadline = time.monotonic() + 5
        while sum(c.tuple == t.mirrored() for c in lb.claims) < 2:  # the new OFFER's claim
            assert time.monotonic() < deadline, lb.claims
            time.sleep(0.005)
        own = lb.wait_result(lb.request(t.mirrored()))  # its accept-time request
        assert own.msg.status == Status.OK and own.sock is not None, own.msg
        res = la.wait_result(again)
        assert res.msg.status == Status.OK and res.sock is not None, res.msg
        assert_pair(res.sock, own.sock)


def test_no_library_on_peer_host(routers: tuple[RouterProcess, RouterProcess]) -> None:
    a, _b = routers
    with FakeLibrary(a.socket) as la:
        res = la.wait_result(la.request(tup(5)))
        assert res.msg.status == Status.PEER_REFUSED


def test_no_route_for_local_and_unknown(routers: tuple[RouterProcess, RouterProcess]) -> None:
    a, _b = routers
    with FakeLibrary(a.socket) as la:
        local = tup(6, remote="198.19.1.9:80")  # same host: never crosses VXLAN
        unknown = tup(7, remote="198.19.99.1:80")
        assert la.wait_result(la.request(local)).msg.status == Status.NO_ROUTE
        assert la.wait_result(la.request(unknown)).msg.status == Status.NO_ROUTE
        # A library claiming an overlay address of another host is denied.
        spoof = tup(8, local="198.19.2.7")
        assert la.wait_result(la.request(spoof)).msg.status == Status.DENIED
        bad = Tuple4.parse("198.19.1.1:0", "198.19.2.1:80")
        assert la.wait_result(la.request(bad)).msg.status == Status.BAD_MESSAGE


def test_second_request_for_same_tuple_is_duplicate(
    routers: tuple[RouterProcess, RouterProcess],
) -> None:
    a, b = routers
    t = tup(9)
    with (
        FakeLibrary(a.socket) as la,
        FakeLibrary(b.socket, owned={t.mirrored()}, claim_delay=0.02) as lb,
    ):
        first = la.request(t)
        second = la.request(t)
        assert la.wait_result(second).msg.status == Status.DUPLICATE
        assert la.wait_result(first).msg.status == Status.OK
        lb.wait_host([t.key()])
        # Just switched: a new request or a stray offer for it is a duplicate too.
        assert la.wait_result(la.request(t)).msg.status == Status.DUPLICATE
        assert len(la.host) == 1 and not la.extra_host and not lb.extra_host


def own_fds(
    a: RouterProcess, b: RouterProcess, target: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Each router's fd count without the peer pools' warm connections (each of which is one fd
    in both routers), once it stops moving or reaches `target`. A pool refilling after a burst
    holds connections in flight (connecting at one end, not yet accepted or not yet pooled at
    the other) that neither count covers: on a loaded machine they can take seconds to land."""
    deadline = time.monotonic() + 20
    last = None
    while True:
        pooled = a.pooled() + b.pooled()
        now = (a.fd_count() - pooled, b.fd_count() - pooled)
        if now == target or (target is None and now == last) or time.monotonic() > deadline:
            return now
        last = now
        time.sleep(0.1)


@pytest.mark.parametrize("rounds", [3])
def test_simultaneous_requests_give_one_connection(
    patient_routers: tuple[RouterProcess, RouterProcess], rounds: int
) -> None:
    """Both ends ask for the same 200 connections at once: exactly one host connection each,
    both libraries hold its two ends, and the routers keep no fd."""
    a, b = patient_routers
    fds_before = own_fds(a, b)
    listing_before = (a.fds(), b.fds())
    for r in range(rounds):
        # Vary who leads: half the tuples have A's end lower, half B's.
        tuples = [tup(1000 + i, remote=f"198.19.2.{1 + i % 2}:{80 + r}") for i in range(100)]
        tuples += [
            Tuple4.parse(f"198.19.1.200:{30000 + i}", f"198.19.0.{100 + r}:{40000 + i}")
            for i in range(100)
        ]
        tuples += [
            Tuple4.parse(f"198.19.1.{10 + r}:{50000 + i}", f"198.19.2.3:{60000 + i}")
            for i in range(10)
        ]
        leaders = sum(t.local_is_leader() for t in tuples)
        assert 0 < leaders < len(tuples)
        with (
            FakeLibrary(a.socket, owned=set(tuples)) as la,
            FakeLibrary(b.socket, owned={t.mirrored() for t in tuples}) as lb,
        ):
            seqs: list[tuple[int, int]] = []
            for t in tuples:
                seqs.append((la.request(t), lb.request(t.mirrored())))
            keys = [t.key() for t in tuples]
            la.wait_host(keys)
            lb.wait_host(keys)
            statuses: dict[str, int] = {}
            for sa, sb in seqs:
                for lib, seq in ((la, sa), (lb, sb)):
                    st = Status(lib.wait_result(seq).msg.status).name
                    statuses[st] = statuses.get(st, 0) + 1
            assert set(statuses) <= {"OK", "DUPLICATE"}, statuses
            assert not la.extra_host and not lb.extra_host
            assert len(la.host) == len(lb.host) == len(tuples)
            for t in tuples:
                x, y = la.host[t.key()], lb.host[t.key()]
                assert x.getsockname() == y.getpeername() and x.getpeername() == y.getsockname()
            assert_pair(la.host[keys[0]], lb.host[keys[0]])
            assert_pair(la.host[keys[-1]], lb.host[keys[-1]])
    # No fd kept by either router once the libraries are gone.
    fds_after = own_fds(a, b, target=fds_before)
    leaked = [
        {fd: what for fd, what in r.fds().items() if before.get(fd) != what}
        for r, before in zip((a, b), listing_before, strict=True)
    ]
    pools = [r.status()["router"]["peer_pool"]["idle"] for r in (a, b)]
    assert fds_after == fds_before, (leaked, pools)
    for r in (a, b):
        info = r.status()["router"]
        assert info["in_progress"] == 0
        assert info["handoffs_lost"] == 0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.001)


@contextmanager
def patient_pair(
    tmp_path: Path, claim_timeout_ms: int
) -> Iterator[tuple[RouterProcess, RouterProcess]]:
    """Two routers whose slim follower end waits up to 30 s for the leader's offer: how long
    the leader's request takes to arrive then decides nothing (the default is 5 ms, which a busy
    machine can miss between two requests). Both must stop cleanly on the way out."""
    config = tmp_path / "router.toml"
    config.write_text("follower-grace-ms = 30000\n")
    extra = ["--config", str(config), "--claim-timeout-ms", str(claim_timeout_ms)]
    a, b, _ = start_pair(tmp_path, args=extra)
    try:
        yield a, b
    finally:
        assert b.stop() == 0, b.log()
        assert a.stop() == 0, a.log()


@pytest.fixture
def patient_routers(
    tmp_path: Path,
) -> Iterator[tuple[RouterProcess, RouterProcess]]:
    """A patient pair whose claim timeout is 10 s (250 ms by default), which a library
    answering a burst of claims on a loaded machine is sure to meet."""
    with patient_pair(tmp_path, 10_000) as pair:
        yield pair


def test_both_slim_ends_asking_costs_one_offer(
    patient_routers: tuple[RouterProcess, RouterProcess],
) -> None:
    """Slim mode: the follower end asks first, the leader after it (both ask at connect and
    accept): the follower's router waits for the leader's offer instead of making its own, so
    no offer is refused as a duplicate and the leader's router initiates every one of these
    switches."""
    a, b = patient_routers
    tuples = [tup(3000 + i) for i in range(20)]  # A's ends (198.19.1.1) lead
    assert all(t.local_is_leader() for t in tuples)
    before = {r: r.status()["router"] for r in (a, b)}
    with (
        FakeLibrary(a.socket, mode=Mode.SLIM, owned=set(tuples)) as la,
        FakeLibrary(b.socket, mode=Mode.SLIM, owned={t.mirrored() for t in tuples}) as lb,
    ):
        for t in tuples:
            sb = lb.request(t.mirrored())
            wait_for(lambda: b.status()["router"]["in_progress"] > 0, "the follower's request")
            sa = la.request(t)
            assert la.wait_result(sa).msg.status == Status.OK
            assert lb.wait_result(sb).msg.status == Status.OK
            assert_pair(la.host[t.key()], lb.host[t.key()])
    after = {r: r.status()["router"] for r in (a, b)}

    def delta(r: RouterProcess, name: str) -> int:
        return int(after[r][name]) - int(before[r][name])

    assert delta(a, "switches_initiated") == len(tuples)
    assert delta(b, "switches_initiated") == 0
    assert delta(b, "switches_accepted") == len(tuples)
    for r in (a, b):
        refused = {k: n for k, n in after[r]["failures"].items() if k.startswith("offer_")}
        assert refused == {k: n for k, n in before[r]["failures"].items() if k.startswith("offer_")}


def test_shuntflow_higher_end_waits_only_its_own_grace(
    patient_routers: tuple[RouterProcess, RouterProcess],
) -> None:
    """Shuntflow mode: the higher end reached its threshold, the lower end's may be far off, and
    every byte the higher end writes meanwhile crosses VXLAN. Its request is held for the
    shuntflow grace (150 µs), not slim's (30 s here): its router offers, and the lower end's
    library takes the claim."""
    a, b = patient_routers
    t = tup(3050)  # A's end (198.19.1.1) leads
    assert t.local_is_leader()
    before = {r: r.status()["router"] for r in (a, b)}
    with (
        FakeLibrary(a.socket, owned={t}) as la,
        FakeLibrary(b.socket, owned={t.mirrored()}) as lb,
    ):
        sb = lb.request(t.mirrored())
        res = lb.wait_result(sb)  # 5 s, not the 30 s grace
        assert res.msg.status == Status.OK, res.msg
        la.wait_host([t.key()])
        assert_pair(la.host[t.key()], lb.host[t.key()])
    after = {r: r.status()["router"] for r in (a, b)}
    assert int(after[b]["switches_initiated"]) - int(before[b]["switches_initiated"]) == 1
    assert int(after[a]["switches_accepted"]) - int(before[a]["switches_accepted"]) == 1


def test_slim_follower_after_a_refused_leader_offers_at_once(tmp_path: Path) -> None:
    """The leader's offer reached the follower's host before the follower's slim library held
    the connection (not accepted yet), and its claim ran out; the leader asks again only later.
    The follower's request that follows is not held for the leader's offer (30 s here): its
    router offers at once, and the leader's library takes the claim."""
    t = tup(3100)  # A's end (198.19.1.1) leads
    assert t.local_is_leader()
    with (
        patient_pair(tmp_path, 300) as (a, b),
        FakeLibrary(a.socket, owned={t}) as la,
        # owns nothing yet: says NOT_MINE, and the claim waits for its accept()
        FakeLibrary(b.socket, mode=Mode.SLIM) as lb,
    ):
        sa = la.request(t)
        res = la.wait_result(sa)
        assert res.msg.status == Status.PEER_REFUSED and res.sock is None, res.msg
        lb.owned.add(t.mirrored())  # accepted now
        sb = lb.request(t.mirrored())
        res = lb.wait_result(sb)  # 5 s, not the 30 s grace
        assert res.msg.status == Status.OK, res.msg
        la.wait_host([t.key()])
        assert_pair(la.host[t.key()], lb.host[t.key()])
        wait_in_progress(a, 0)
        wait_in_progress(b, 0)


def wait_in_progress(r: RouterProcess, n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while r.status()["router"]["in_progress"] != n:
        assert time.monotonic() < deadline, r.status()["router"]
        time.sleep(0.005)


@pytest.mark.parametrize(
    ("b_end", "sender_leads"), [("198.19.2.50:5000", True), ("198.19.0.50:5000", False)]
)
def test_crossing_offer_leader_rule_on_the_wire(
    routers: tuple[RouterProcess, RouterProcess], b_end: str, sender_leads: bool
) -> None:
    """A raw peer on A's address offers a tuple while B's router holds its own offer for it.
    The rule: the leader's offer is accepted and serves B's library's request (OK, the fd with
    the request's seq); the follower's is answered DUPLICATE and B's library gets nothing.

    A's router is stopped meanwhile, so B's own offer waits for an answer for answer_timeout_ms
    (2 s) and is sure to be pending when the raw offer lands: exactly one outcome is right."""
    a, b = routers
    port = b.status()["router"]["peer_port"]
    t_b = Tuple4.parse(b_end, "198.19.1.50:6000")  # B's view; A's end is 198.19.1.50
    assert t_b.mirrored().local_is_leader() is sender_leads
    with FakeLibrary(b.socket, owned={t_b}) as lb, FakeLibrary(a.socket, answer_claims=False):
        os.kill(a.pid, signal.SIGSTOP)
        try:
            seq = lb.request(t_b, seq=4242)
            wait_in_progress(b, 1)  # B's entry for it: its own offer, or the follower's grace
            with socket.create_connection(
                ("127.0.0.2", port), source_address=("127.0.0.1", 0)
            ) as s:
                s.sendall(offer_bytes(s, 1, t_b.mirrored()))
                s.settimeout(2)
                answer = PeerMsg.unpack(recv_exact(s, PEER_SIZE))
                if sender_leads:
                    assert answer.status == Status.OK, Status(answer.status).name
                    res = lb.wait_result(seq)
                    assert res.msg.status == Status.OK and res.sock is not None
                    assert res.sock.getpeername() == s.getsockname()
                else:
                    assert answer.status == Status.DUPLICATE, Status(answer.status).name
                    assert seq not in lb.results and not lb.host
        finally:
            os.kill(a.pid, signal.SIGCONT)
        if not sender_leads:
            # B's own offer is answered once A runs again (A's library claims nothing).
            res = lb.wait_result(seq)
            assert res.msg.status != Status.OK and res.sock is None, res.msg
        wait_in_progress(b, 0)


def test_offer_from_wrong_host_is_denied(routers: tuple[RouterProcess, RouterProcess]) -> None:
    """Invariant 6: only the host holding the initiator's overlay address may offer for it."""
    _a, b = routers
    port = b.status()["router"]["peer_port"]
    t_b = Tuple4.parse("198.19.2.1:80", "198.19.3.5:7000")  # initiator claims to be on host .3
    with FakeLibrary(b.socket, owned={t_b}) as lb:
        with socket.create_connection(("127.0.0.2", port), source_address=("127.0.0.1", 0)) as s:
            s.sendall(offer_bytes(s, 1, t_b.mirrored()))
            s.settimeout(2)
            answer = PeerMsg.unpack(recv_exact(s, PEER_SIZE))
            assert answer.type is MsgType.ANSWER and answer.status == Status.DENIED
            assert s.recv(10) == b""  # closed after the frame
        assert not lb.claims and not lb.host


def test_router_never_reads_past_the_offer(routers: tuple[RouterProcess, RouterProcess]) -> None:
    """Bytes sent right behind the OFFER belong to the claiming library, not the router."""
    _a, b = routers
    port = b.status()["router"]["peer_port"]
    t_b = Tuple4.parse("198.19.2.1:80", "198.19.1.77:7777")
    with (
        FakeLibrary(b.socket, owned={t_b}) as lb,
        socket.create_connection(("127.0.0.2", port), source_address=("127.0.0.1", 0)) as s,
    ):
        if True:
            s.sendall(offer_bytes(s, 9, t_b.mirrored()) + b"APPDATA")
            s.settimeout(2)
            answer = PeerMsg.unpack(recv_exact(s, PEER_SIZE))
            assert answer.status == Status.OK and answer.seq == 9
            lb.wait_host([t_b.key()])
            host = lb.host[t_b.key()]
            host.settimeout(2)
            assert host.recv(100) == b"APPDATA"
