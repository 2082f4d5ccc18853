"""The router's latency record: exact percentiles over a bounded window, max over all time."""

from __future__ import annotations

from shuntflow.router.latency import LatencyRecord


def test_empty() -> None:
    assert LatencyRecord().describe() == {"count": 0, "p50": None, "p99": None, "max": None}


def test_percentiles_in_microseconds() -> None:
    rec = LatencyRecord()
    for us in range(1, 101):  # 1..100 us, shuffled order does not matter
        rec.add((101 - us) / 1e6)
    assert rec.describe() == {"count": 100, "p50": 50, "p99": 100, "max": 100}


def test_window_forgets_old_samples_but_not_the_max() -> None:
    rec = LatencyRecord(window=4)
    rec.add(1.0)  # 1 s, pushed out of the window by the four below
    for _ in range(4):
        rec.add(0.000_010)
    assert rec.describe() == {"count": 5, "p50": 10, "p99": 10, "max": 1_000_000}
