"""Readers of the clients' own reports: pure functions from output text to numbers.

Each returns a ClientResult; latencies are in µs. `cdf` holds (latency_us, fraction <= it)
points, enough for a CDF plot and for merging two clients (mix), not every sample.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field


class ParseError(ValueError):
    """The client's output is not what this reader expects (the row records it as error)."""


@dataclass
class ClientResult:
    requests: int
    seconds: float
    avg_us: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    p999_us: float | None = None
    cdf: list[tuple[float, float]] = field(default_factory=list)
    errors: int = 0
    unit: str = "req"
    extra: dict[str, float] = field(default_factory=dict)
    # Requests the processes' CPU time was spent on, when the client measures only a part of
    # its run (sockperf leaves its warm-up out of the statistics, not out of the CPU time).
    cpu_requests: int | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def quantile(cdf: list[tuple[float, float]], q: float) -> float | None:
    """Smallest latency whose cumulative fraction reaches q (HdrHistogram's convention)."""
    for value, frac in cdf:
        if frac >= q - 1e-12:
            return value
    return cdf[-1][0] if cdf else None


def _thin(cdf: list[tuple[float, float]], points: int = 200) -> list[tuple[float, float]]:
    """At most ~`points` points, keeping the tail (where the interesting differences are)."""
    if len(cdf) <= points:
        return cdf
    keep: list[tuple[float, float]] = []
    last_frac = -1.0
    for value, frac in cdf:
        tail = 1.0 - frac
        step = 0.005 if tail > 0.05 else 0.0005 if tail > 0.005 else 0.00005
        if frac - last_frac >= step or frac >= 1.0:
            keep.append((value, frac))
            last_frac = frac
    if keep[-1] != cdf[-1]:
        keep.append(cdf[-1])
    return keep


def cdf_from_samples(samples: list[float]) -> list[tuple[float, float]]:
    s = sorted(samples)
    n = len(s)
    return _thin([(v, (i + 1) / n) for i, v in enumerate(s)])


# -- sockperf ping-pong -------------------------------------------------------------------

_SP_TOTAL = re.compile(r"\[Total Run\] RunTime=[0-9.]+ sec;.*?ReceivedMessages=(\d+)")
_SP_VALID = re.compile(
    r"\[Valid Duration\] RunTime=([0-9.]+) sec; SentMessages=(\d+); ReceivedMessages=(\d+)"
)
_SP_AVG = re.compile(r"avg-(?:rtt|lat)=\s*([0-9.]+)")
_SP_PCT = re.compile(r"percentile\s+([0-9.]+)\s*=\s*([0-9.]+)")


def sockperf(text: str, full_log: str | None = None) -> ClientResult:
    """`sockperf ping-pong --full-rtt` output; samples from its --full-log if given."""
    valid = _SP_VALID.findall(text)
    avg = _SP_AVG.findall(text)
    if not valid or not avg:
        raise ParseError("sockperf printed no [Valid Duration] summary")
    seconds, _sent, received = valid[-1]
    total = _SP_TOTAL.findall(text)
    pct = {float(p): float(v) for p, v in _SP_PCT.findall(text)}
    cdf: list[tuple[float, float]] = []
    if full_log:
        samples = []
        for line in full_log.splitlines():
            parts = line.split(",")
            if len(parts) == 4 and parts[0].strip().isdigit():
                samples.append(float(parts[3]))
        cdf = cdf_from_samples(samples) if samples else []
    if not cdf:
        cdf = sorted((v, p / 100) for p, v in pct.items())
    return ClientResult(
        requests=int(received),
        seconds=float(seconds),
        avg_us=float(avg[-1]),
        p50_us=pct.get(50.0),
        p99_us=pct.get(99.0),
        p999_us=pct.get(99.9),
        cdf=cdf,
        cpu_requests=int(total[-1]) if total else None,
    )


# -- redis-benchmark (full output, --precision 3) ---------------------------------------

_RB_DONE = re.compile(r"(\d+) requests completed in ([0-9.]+) seconds")
_RB_DIST = re.compile(
    r"^\s*([0-9.]+)% <= ([0-9.]+) milliseconds \(cumulative count (\d+)\)", re.MULTILINE
)
_RB_SUMMARY = re.compile(
    r"avg\s+min\s+p50\s+p95\s+p99\s+max\s*\n\s*([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)"
    r"\s+([0-9.]+)\s+([0-9.]+)"
)
_RB_RPS = re.compile(r"throughput summary: ([0-9.]+) requests per second")


def redis_benchmark(text: str) -> ClientResult:
    # redis-benchmark redraws its progress line with \r; only the final report matters.
    text = text.replace("\r", "\n")
    done = _RB_DONE.findall(text)
    summary = _RB_SUMMARY.search(text)
    if not done or summary is None:
        raise ParseError("redis-benchmark printed no summary (did the test fail?)")
    requests, seconds = int(done[-1][0]), float(done[-1][1])
    avg, _mn, p50, _p95, p99, _mx = (float(x) * 1000 for x in summary.groups())
    # Only the "Latency by percentile distribution" block: it ends where the coarser
    # "Cumulative distribution of latencies" block starts.
    head = text.split("Cumulative distribution of latencies")[0]
    dist = [(float(ms) * 1000, int(count)) for _p, ms, count in _RB_DIST.findall(head)]
    total = max((c for _v, c in dist), default=0)
    cdf = [(v, c / total) for v, c in dist] if total else []
    rps = _RB_RPS.search(text)
    # "completed in" rounds to 10 ms; the rps line does not, so derive the time from it.
    if rps and float(rps.group(1)) > 0:
        seconds = requests / float(rps.group(1))
    return ClientResult(
        requests=requests,
        seconds=seconds,
        avg_us=avg,
        p50_us=p50,
        p99_us=p99,
        p999_us=quantile(cdf, 0.999),
        cdf=cdf,
    )


# -- wrk with the bench's Lua reporter --------------------------------------------------

WRK_MARK = "SFJSON "


def wrk(text: str) -> ClientResult:
    """wrk output with the line that bench's done() hook prints (see workloads.WRK_LUA)."""
    lines = [ln for ln in text.splitlines() if ln.startswith(WRK_MARK)]
    if not lines:
        raise ParseError("wrk printed no report line (did the Lua script load?)")
    data = json.loads(lines[-1][len(WRK_MARK) :])
    requests = int(data["requests"])
    seconds = float(data["duration_us"]) / 1e6
    pct = [(float(v), float(p) / 100) for p, v in data["pct"]]
    # wrk reports percentile(100) as 0 when the histogram's top bucket is empty; use max.
    pct = [(v if p < 1.0 else float(data["max_us"]), p) for v, p in pct]
    cdf = sorted(pct, key=lambda x: x[1])
    return ClientResult(
        requests=requests,
        seconds=seconds,
        avg_us=float(data["mean_us"]) if requests else None,
        p50_us=quantile(cdf, 0.50) if requests else None,
        p99_us=quantile(cdf, 0.99) if requests else None,
        p999_us=quantile(cdf, 0.999) if requests else None,
        cdf=cdf if requests else [],
        errors=int(data["errors"]),
    )


# -- memaslap (memcaslap) ---------------------------------------------------------------

_MA_RUN = re.compile(r"Run time: ([0-9.]+)s Ops: (\d+) TPS: (\d+)")
_MA_TOTAL_AVG = re.compile(r"Total Statistics \(\d+ events\).*?Avg:\s+([0-9.]+)", re.DOTALL)
_MA_GLOBAL = re.compile(r"^Global\s+\S+\s+\d+\s+\d+\s+\S+\s+\d+\s+\d+\s+\d+\s+([0-9.]+)", re.M)


def memaslap(text: str) -> ClientResult:
    """memaslap's final lines; it reports avg and a log2 histogram only, so no percentiles."""
    run = _MA_RUN.findall(text)
    if not run:
        raise ParseError("memaslap printed no 'Run time' summary")
    seconds, ops, _tps = run[-1]
    avg = _MA_TOTAL_AVG.findall(text) or _MA_GLOBAL.findall(text)
    return ClientResult(
        requests=int(ops), seconds=float(seconds), avg_us=float(avg[-1]) if avg else None
    )


# -- iperf3 -J ----------------------------------------------------------------------------

MIB = 1 << 20


def iperf3(text: str) -> ClientResult:
    """Throughput as MiB (the 'requests' of a stream) per second."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ParseError(f"iperf3 output is not JSON: {e}") from None
    recv = data.get("end", {}).get("sum_received")
    if recv is None:
        raise ParseError(f"iperf3: {data.get('error', 'no sum_received in its report')}")
    nbytes, seconds = float(recv["bytes"]), float(recv["seconds"])
    return ClientResult(
        requests=round(nbytes / MIB),
        seconds=seconds,
        unit="MiB",
        extra={"gbit_s": nbytes * 8 / seconds / 1e9 if seconds else 0.0},
    )


# -- the bench's own crr client ---------------------------------------------------------


def crr(text: str) -> ClientResult:
    """The JSON line sf-crr prints (bench/crr.py)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    if not lines:
        raise ParseError("crr client printed no report")
    data = json.loads(lines[-1])
    requests = int(data["requests"])
    cdf = [(float(v), float(p) / 100) for p, v in data["pct"]]
    return ClientResult(
        requests=requests,
        seconds=float(data["seconds"]),
        avg_us=float(data["avg_us"]) if requests else None,
        p50_us=quantile(cdf, 0.50) if requests else None,
        p99_us=quantile(cdf, 0.99) if requests else None,
        p999_us=quantile(cdf, 0.999) if requests else None,
        cdf=cdf if requests else [],
        errors=int(data["errors"]),
    )


# -- the torture client (integrity) ------------------------------------------------------


def torture(text: str) -> ClientResult:
    """The summary line `python -m shuntflow.torture client` prints: connections as the
    requests, the bytes it moved and checked (both directions) as `payload_bytes`."""
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    try:
        data = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError as e:
        raise ParseError(f"torture client: its summary is not JSON: {e}") from None
    if data.get("role") != "client":
        raise ParseError("torture client printed no summary")
    return ClientResult(
        requests=int(data["connections"]),
        seconds=float(data["seconds"]),
        errors=int(data["bad"]) + int(data["missing"]),
        unit="conn",
        extra={
            "payload_bytes": float(data["bytes"]),
            "bad_bytes": float(data["bad_bytes"]),
            "switched": float(data["switched"]),
        },
    )


# -- merging (mix: two clients against one server) --------------------------------------


def _frac_at(cdf: list[tuple[float, float]], x: float) -> float:
    """F(x) by linear interpolation between the recorded points."""
    if not cdf or x < cdf[0][0]:
        return 0.0
    prev_v, prev_f = cdf[0]
    for v, f in cdf:
        if v >= x:
            if v == prev_v:
                return f
            return prev_f + (f - prev_f) * (x - prev_v) / (v - prev_v)
        prev_v, prev_f = v, f
    return 1.0


def merge(parts: list[ClientResult], seconds: float) -> ClientResult:
    """One result for requests of several clients: the request-weighted mixture."""
    live = [p for p in parts if p.requests > 0]
    requests = sum(p.requests for p in parts)
    if not live:
        return ClientResult(requests=requests, seconds=seconds)
    weights = [p.requests / sum(q.requests for q in live) for p in live]
    avg = None
    if all(p.avg_us is not None for p in live):
        avg = sum(w * (p.avg_us or 0.0) for w, p in zip(weights, live, strict=True))
    xs = sorted({v for p in live for v, _f in p.cdf})
    cdf = [(x, sum(w * _frac_at(p.cdf, x) for w, p in zip(weights, live, strict=True))) for x in xs]
    cdf = _thin(cdf)
    return ClientResult(
        requests=requests,
        seconds=seconds,
        avg_us=avg,
        p50_us=quantile(cdf, 0.50) if cdf else None,
        p99_us=quantile(cdf, 0.99) if cdf else None,
        p999_us=quantile(cdf, 0.999) if cdf else None,
        cdf=cdf,
        errors=sum(p.errors for p in parts),
    )


def worker_connections(text: str, workers: set[int]) -> dict[str, int]:
    """Connections per server worker, from a log of "<worker pid> <connection number>" lines.

    Every worker in `workers` is in the answer, those that served nothing with 0, so a spread
    of 8/0 is told from one worker alone; a pid not in `workers` (a worker that was replaced
    during the run) is counted under its own pid."""
    seen: set[tuple[int, int]] = set()
    counts = {pid: 0 for pid in workers}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit():
            raise ParseError(f"connection log line {n}: expected '<pid> <connection>': {line!r}")
        pid, conn = int(parts[0]), int(parts[1])
        if (pid, conn) not in seen:
            seen.add((pid, conn))
            counts[pid] = counts.get(pid, 0) + 1
    return {str(pid): counts[pid] for pid in sorted(counts)}
