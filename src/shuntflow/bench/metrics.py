"""Result rows and what is computed from them: medians, and ratios taken per repetition.

Ratios are formed inside one repetition (the modes of a repetition ran back to back, so slow
drift of the machine cancels) and only then summarised; a median of per-pair ratios is what
reproduces within a few percent on the test machine (docs/performance.md, Method and metrics).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

# Fields every row carries, in this order in results.json.
REQUIRED_FIELDS = (
    "workload",
    "mode",
    "repetition",
    "requests",
    "rps",
    "avg_us",
    "p50_us",
    "p99_us",
    "p999_us",
    "cpu_us_per_req",
    "switches",
    "vxlan_bytes",
    "command",
    "placement",
    "duration_s",
    "error",
)
RATIO_METRICS = ("rps", "avg_us", "p50_us", "p99_us", "p999_us", "cpu_us_per_req")
# switch_p99_us: per run, the p99 of the switch times the libraries reported (threshold reached ->
# first byte on the host path), then the median over repetitions like every other value.
# switch_call_max_us: per run, the longest application data call any end made during a switch
# (target, docs/performance.md: no longer than the overlay's p99.9); the report also takes its max.
# vxlan_share: the client host's VXLAN bytes over the payload the client moved (workloads whose
# client reports it: integrity), encapsulation included, so a little above the payload's share.
VALUE_METRICS = (
    *RATIO_METRICS,
    "router_cpu_us_per_req",
    "switch_p50_us",
    "switch_p99_us",
    "switch_call_max_us",
    "vxlan_share",
)
REFERENCES = ("overlay", "host")


@dataclass
class Row:
    workload: str
    mode: str
    repetition: int
    placement: str
    case: str = ""
    threshold: int | None = None
    order: int = 0
    requests: int | None = None
    rps: float | None = None
    unit: str = "req"
    avg_us: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    p999_us: float | None = None
    cpu_us_per_req: float | None = None
    server_cpu_us: float | None = None
    client_cpu_us: float | None = None
    router_cpu_us_per_req: float | None = None
    switches: int | None = None
    switch_failures: int | None = None
    switch_p50_us: float | None = None
    switch_p99_us: float | None = None
    switch_call_max_us: float | None = None
    vxlan_bytes: int | None = None
    # Connections each server worker served during the measurement, by worker pid (nginx
    # workloads; None for servers that keep no such log and in results written before it).
    worker_connections: dict[str, int] | None = None
    client_errors: int = 0
    duration_s: float | None = None
    command: list[str] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)
    started_at: str = ""
    error: str | None = None
    extra: dict[str, float] = field(default_factory=dict)
    latency_cdf: list[tuple[float, float]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return label(self.workload, self.case)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def vxlan_share(self) -> float | None:
        payload = self.extra.get("payload_bytes")
        if self.vxlan_bytes is None or not payload:
            return None
        return self.vxlan_bytes / payload

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        ordered = {k: d.pop(k) for k in REQUIRED_FIELDS}
        ordered.update(d)
        ordered["latency_cdf"] = [[round(v, 3), round(f, 6)] for v, f in self.latency_cdf]
        for k in ("rps", "avg_us", "p50_us", "p99_us", "p999_us", "cpu_us_per_req"):
            if isinstance(ordered[k], float):
                ordered[k] = round(ordered[k], 3)
        return ordered


def label(workload: str, case: str) -> str:
    return f"{workload} {case}" if case else workload


@dataclass
class Stat:
    median: float
    low: float
    high: float
    n: int
    # The median's 95 % confidence interval, None below 6 values (order statistics, below).
    ci: tuple[float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"median": self.median, "min": self.low, "max": self.high, "n": self.n}
        if self.ci is not None:
            d["ci95"] = list(self.ci)
        return d


def median_ci_ranks(n: int, level: float = 0.95) -> tuple[int, int] | None:
    """1-based ranks (k, n + 1 - k) of the sorted values that bound the median with at least
    `level` confidence, whatever the distribution: the median lies below the k-th value only
    if fewer than k of n values fall below it, a Binomial(n, 1/2) tail. None if even the
    extremes fall short (n < 6 at 95 %)."""
    tail, k, cum = (1 - level) / 2, 0, 0.0
    while True:
        cum += math.comb(n, k) / 2**n  # P(fewer than k + 1 values below the median)
        if cum > tail:
            break
        k += 1
    return (k, n + 1 - k) if k >= 1 else None


def stat(values: list[float]) -> Stat | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    ranks = median_ci_ranks(len(vals))
    ci = (vals[ranks[0] - 1], vals[ranks[1] - 1]) if ranks else None
    return Stat(statistics.median(vals), vals[0], vals[-1], len(vals), ci)


@dataclass
class ModeSummary:
    mode: str
    threshold: int | None
    unit: str
    reps: int
    failed: int
    values: dict[str, Stat | None]
    ratios: dict[str, dict[str, Stat | None]]  # reference -> metric -> stat
    switches: Stat | None
    cdf: list[tuple[float, float]]
    errors: list[str]
    # Per repetition that has them, the connections each worker served, busiest first.
    worker_connections: list[list[int]] = field(default_factory=list)


def groups(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows by workload label, in the order workloads first appeared."""
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(r.label, []).append(r)
    return out


def mode_order(rows: list[Row]) -> list[str]:
    seen: dict[str, None] = {}
    # The run rotates modes per repetition; repetition 0 has them in the order asked for.
    for r in sorted(rows, key=lambda r: (r.repetition, r.order)):
        seen.setdefault(r.mode, None)
    return list(seen)


def _ratio(row: Row, ref: Row | None, metric: str) -> float | None:
    if ref is None or not ref.ok or not row.ok:
        return None
    a, b = getattr(row, metric), getattr(ref, metric)
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def summarise(rows: list[Row]) -> dict[str, list[ModeSummary]]:
    """Per workload label, one summary per mode."""
    out: dict[str, list[ModeSummary]] = {}
    for lbl, grp in groups(rows).items():
        by_rep_mode = {(r.repetition, r.mode): r for r in grp}
        summaries = []
        for mode in mode_order(grp):
            mine = [r for r in grp if r.mode == mode]
            good = [r for r in mine if r.ok]
            values = {
                m: stat([getattr(r, m) for r in good if getattr(r, m) is not None])
                for m in VALUE_METRICS
            }
            ratios: dict[str, dict[str, Stat | None]] = {}
            for ref in REFERENCES:
                ratios[ref] = {}
                for m in RATIO_METRICS:
                    rs = [_ratio(r, by_rep_mode.get((r.repetition, ref)), m) for r in good]
                    ratios[ref][m] = stat([x for x in rs if x is not None])
            summaries.append(
                ModeSummary(
                    mode=mode,
                    threshold=mine[0].threshold,
                    unit=mine[0].unit,
                    reps=len(mine),
                    failed=len(mine) - len(good),
                    values=values,
                    ratios=ratios,
                    switches=stat([float(r.switches) for r in good if r.switches is not None]),
                    cdf=_median_cdf(good),
                    errors=sorted({r.error for r in mine if r.error}),
                    worker_connections=[
                        sorted(r.worker_connections.values(), reverse=True)
                        for r in good
                        if r.worker_connections
                    ],
                )
            )
        out[lbl] = summaries
    return out


def _median_cdf(rows: list[Row]) -> list[tuple[float, float]]:
    """The CDF of the repetition whose p50 is the median one: a real run, not a blend."""
    with_cdf = [r for r in rows if r.latency_cdf and r.p50_us is not None]
    if not with_cdf:
        return []
    with_cdf.sort(key=lambda r: r.p50_us or 0.0)
    return with_cdf[(len(with_cdf) - 1) // 2].latency_cdf


def summary_json(s: dict[str, list[ModeSummary]]) -> dict[str, Any]:
    def st(x: Stat | None) -> dict[str, float | int] | None:
        return x.to_json() if x else None

    return {
        lbl: [
            {
                "mode": m.mode,
                "threshold": m.threshold,
                "unit": m.unit,
                "repetitions": m.reps,
                "failed": m.failed,
                "values": {k: st(v) for k, v in m.values.items()},
                "ratios": {ref: {k: st(v) for k, v in d.items()} for ref, d in m.ratios.items()},
                "switches": st(m.switches),
                "errors": m.errors,
                "worker_connections": m.worker_connections,
            }
            for m in ms
        ]
        for lbl, ms in s.items()
    }
