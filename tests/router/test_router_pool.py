"""Warm peer connections (peer_pool.py) and the switch figures (latency.py: switch times and the
longest data calls during switches), against two real router processes on 127.0.0.1 /
127.0.0.2 with a static map."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shuntflow.router.control import query
from shuntflow.router.latency import LatencyWindow, percentile
from shuntflow.router.testing import FakeLibrary, RouterProcess
from shuntflow.wire import Msg, MsgType, Status, Tuple4

from .support import assert_pair, start_pair, tup

pytestmark = pytest.mark.router


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[RouterProcess, RouterProcess, Path, int]]:
    a, b, port = start_pair(tmp_path)
    yield a, b, tmp_path / "map.json", port
    for r in (a, b):
        r.stop()
        assert "level=error" not in r.log(), r.log()


def pool(r: RouterProcess) -> dict[str, object]:
    info: dict[str, object] = r.status()["router"]["peer_pool"]
    return info


def wait_warm(r: RouterProcess, peer: str, n: int = 4) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        idle = pool(r)["idle"]
        assert isinstance(idle, dict)
        if idle.get(peer) == n:
            return
        time.sleep(0.02)
    raise AssertionError(f"pool to {peer} never warmed: {pool(r)}")


def wait_idle_at_least(r: RouterProcess, peer: str, n: int) -> None:
    deadline = time.monotonic() + 5
    while True:
        idle = pool(r)["idle"]
        assert isinstance(idle, dict)
        if idle.get(peer, 0) >= n:
            return
        assert time.monotonic() < deadline, pool(r)
        time.sleep(0.02)


def burst(a: RouterProcess, b: RouterProcess, ts: list[Tuple4]) -> None:
    """All of `ts` asked for at once from A, each claimed at B."""
    with (
        FakeLibrary(a.socket) as la,
        FakeLibrary(b.socket, owned={t.mirrored() for t in ts}) as lb,
    ):
        for seq in [la.request(t) for t in ts]:
            assert la.wait_result(seq).msg.status == Status.OK
        lb.wait_host([t.key() for t in ts])


def switch(a: RouterProcess, b: RouterProcess, t: Tuple4) -> None:
    with FakeLibrary(a.socket) as la, FakeLibrary(b.socket, owned={t.mirrored()}) as lb:
        res = la.wait_result(la.request(t))
        assert res.msg.status == Status.OK, Status(res.msg.status).name
        assert res.sock is not None
        lb.wait_host([t.key()])
        assert_pair(res.sock, lb.host[t.key()])


def test_switches_use_warm_connections(
    pair: tuple[RouterProcess, RouterProcess, Path, int],
) -> None:
    a, b, _map, _port = pair
    assert pool(a) == {"hits": 0, "misses": 0, "idle": {}}  # nothing kept before it is needed
    switch(a, b, tup(1))
    assert pool(a)["misses"] == 1
    for i in range(2, 8):
        # Back to back, six switches can outrun the refill of a 4-connection pool: a miss then
        # says how fast a connect is, not whether a warm connection is used when there is one.
        wait_warm(a, "127.0.0.2")
        switch(a, b, tup(i))
    # Each warm connection carried one OFFER and became a host connection; the pool refilled.
    assert pool(a)["hits"] == 6 and pool(a)["misses"] == 1
    wait_warm(a, "127.0.0.2")
    # B holds the other end of every warm connection, waiting for its OFFER, and drops none.
    assert b.status()["router"]["peer_connections_dropped"] == 0


def test_pool_grows_for_a_burst(
    pair: tuple[RouterProcess, RouterProcess, Path, int],
) -> None:
    """Ten switches at once empty a 4-connection pool; the refill then keeps twice as many as
    were asked for since the last one, so a burst of that size finds them warm next time."""
    a, b, _map, _port = pair
    switch(a, b, tup(20))
    wait_warm(a, "127.0.0.2")
    burst(a, b, [tup(21 + i) for i in range(10)])
    wait_idle_at_least(a, "127.0.0.2", 8)
    assert b.status()["router"]["peer_connections_dropped"] == 0


def test_pool_stays_warm_for_the_last_burst(
    pair: tuple[RouterProcess, RouterProcess, Path, int],
) -> None:
    """After a burst, single switches do not draw the pool down to peer_pool_size: it is
    refilled to at least the burst's size, and the next burst of that size finds every
    connection it needs warm (the base build left 9 of 10)."""
    a, b, _map, _port = pair
    switch(a, b, tup(40))
    wait_warm(a, "127.0.0.2")
    burst(a, b, [tup(41 + i) for i in range(10)])
    for i in range(14):  # single switches take more than the 2x refill left over the burst
        wait_idle_at_least(a, "127.0.0.2", 10)
        switch(a, b, tup(60 + i))
    wait_idle_at_least(a, "127.0.0.2", 10)
    misses = pool(a)["misses"]
    burst(a, b, [tup(80 + i) for i in range(10)])
    assert pool(a)["misses"] == misses, pool(a)
    assert b.status()["router"]["peer_connections_dropped"] == 0


def test_warm_connections_to_a_restarted_peer_are_not_a_failure(
    pair: tuple[RouterProcess, RouterProcess, Path, int],
) -> None:
    a, b, map_file, port = pair
    switch(a, b, tup(1))
    wait_warm(a, "127.0.0.2")
    assert b.stop() == 0
    b2 = RouterProcess(b.socket, "127.0.0.2", port, ["--map", str(map_file)])
    try:
        switch(a, b2, tup(2))  # every warm connection is dead: found out, then a new one
        info = a.status()["router"]
        assert info["peer_backoffs"] == {}, info["peer_backoffs"]
        assert not any(k.startswith("PEER_UNREACHABLE") for k in info["failures"]), info
    finally:
        b2.stop()


def test_switch_times_from_libraries(
    pair: tuple[RouterProcess, RouterProcess, Path, int],
) -> None:
    a, _b, _map, _port = pair
    t = tup(9)
    with FakeLibrary(a.socket) as la:
        for us in (900, 100, 500, 300, 700):
            la.send(Msg(MsgType.SWITCH_DONE, tuple=t, arg=us, arg2=1))
        la.send(Msg(MsgType.SWITCH_DONE, tuple=t, arg=99_999, arg2=0))  # claimed: not counted
        deadline = time.monotonic() + 3
        while a.status()["router"]["switch_time_us"]["count"] < 5:
            assert time.monotonic() < deadline, a.status()["router"]["switch_time_us"]
            time.sleep(0.02)
        summary = a.status()["router"]["switch_time_us"]
        assert summary == {"count": 5, "window": 5, "p50": 500, "p99": 900, "max": 900}
        assert query(a.control, "switch_times", since=3) == {"next": 5, "samples": [300, 700]}
        assert "error" in query(a.control, "switch_times", since=-1)
        assert not la.closed_by_router.is_set()


def test_switch_calls_from_libraries(
    pair: tuple[RouterProcess, RouterProcess, Path, int],
) -> None:
    """SWITCH_CALLS in -> switch_call_max_us (status) and `switch_calls` (control) out: every
    completed end counts, initiated or claimed; failed windows apart; garbage left out."""
    a, _b, _map, _port = pair
    t = tup(10)

    def wait_seen(n: int) -> dict[str, Any]:
        deadline = time.monotonic() + 3
        while True:
            info: dict[str, Any] = a.status()["router"]
            seen = (
                info["switch_call_max_us"]["count"]
                + info["switch_call_max_failed_us"]["count"]
                + info["switch_calls_rejected"]
            )
            if seen >= n:
                return info
            assert time.monotonic() < deadline, info
            time.sleep(0.02)

    with FakeLibrary(a.socket) as la, FakeLibrary(a.socket) as lb:
        # (longest call µs, calls timed); the two ends of one switch, then of another
        la.send(Msg(MsgType.SWITCH_CALLS, Status.OK, tuple=t, arg=400, arg2=3))
        lb.send(Msg(MsgType.SWITCH_CALLS, Status.OK, tuple=t.mirrored(), arg=80, arg2=1))
        wait_seen(2)
        la.send(Msg(MsgType.SWITCH_CALLS, Status.OK, tuple=t, arg=2500, arg2=40))
        lb.send(Msg(MsgType.SWITCH_CALLS, Status.OK, tuple=t.mirrored(), arg=0, arg2=0))
        la.send(Msg(MsgType.SWITCH_CALLS, Status.TIMEOUT, tuple=t, arg=3_000_000, arg2=9))
        garbage = [
            Msg(MsgType.SWITCH_CALLS, 999, tuple=t, arg=5, arg2=1),  # no such status
            Msg(MsgType.SWITCH_CALLS, Status.OK, arg=5, arg2=1),  # no tuple
            Msg(MsgType.SWITCH_CALLS, Status.OK, tuple=t, arg=2**64 - 1, arg2=0),  # no calls
        ]
        for m in garbage:
            lb.send(m)
        info = wait_seen(5 + len(garbage))
        assert info["switch_call_max_us"] == {
            "count": 4,
            "window": 4,
            "p50": 80,
            "p99": 2500,
            "max": 2500,
        }
        assert info["switch_calls_timed"] == 44
        assert info["switch_call_max_failed_us"]["count"] == 1
        assert info["switch_call_max_failed_us"]["max"] == 3_000_000
        assert info["switch_calls_rejected"] == 3
        assert sorted(query(a.control, "switch_calls")["samples"][:2]) == [80, 400]
        assert sorted(query(a.control, "switch_calls", since=2)["samples"]) == [0, 2500]
        assert query(a.control, "switch_calls", since=4) == {"next": 4, "samples": []}
        assert "error" in query(a.control, "switch_calls", since=-1)
        assert "error" in query(a.control, "switch_calls", since="0")
        # Figures are no requests: neither client lost its channel over garbage in them.
        assert not la.closed_by_router.is_set() and not lb.closed_by_router.is_set()
    log = a.log()
    assert log.count("event=switch_calls_rejected") == 3, log
    for reason in ("unknown status 999", "invalid tuple", "without any call timed"):
        assert reason in log, reason


def test_latency_window() -> None:
    st = LatencyWindow(window=4)
    for us in range(1, 11):
        st.add(us * 10)
    assert st.total == 10
    assert st.since(0) == [70, 80, 90, 100]  # the older ones left the window
    assert st.since(8) == [90, 100]
    assert st.since(10) == []
    assert st.summary() == {"count": 10, "window": 4, "p50": 80, "p99": 100, "max": 100}
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([7], 99) == 7
    assert LatencyWindow().summary() == {"count": 0, "window": 0}
