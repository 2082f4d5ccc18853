"""results.json (rows + how they were made) and results.md (one table per workload)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from shuntflow.bench.metrics import ModeSummary, Row, Stat, summarise, summary_json

# A version probe per tool; each prints its version on the first line of stdout or stderr.
TOOL_VERSIONS = {
    "redis-server": ["redis-server", "--version"],
    "memcached": ["memcached", "-V"],
    "nginx": ["nginx", "-v"],
    "wrk": ["wrk", "-v"],
    "sockperf": ["sockperf", "--version"],
    "iperf3": ["iperf3", "--version"],
}


def _first_line(argv: list[str]) -> str | None:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (p.stdout + "\n" + p.stderr).splitlines():
        if line.strip():
            return line.strip()
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> dict[str, Any] | None:
    """The commit of the source tree the bench came from (the package dir, else the cwd)."""
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        try:
            head = subprocess.run(
                ["git", "-C", str(where), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if head.returncode != 0:
                continue
            dirty = subprocess.run(
                ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def metadata(extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["shuntflow", *sys.argv[1:]]),
        "kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "nproc": os.cpu_count(),
        "git": _git_commit(),
        "python": platform.python_version(),
        "tools": {k: _first_line(v) for k, v in TOOL_VERSIONS.items()},
        **extra,
    }


def write_json(out: Path, meta: dict[str, Any], rows: list[Row]) -> Path:
    path = out / "results.json"
    doc = {
        "meta": meta,
        "summary": summary_json(summarise(rows)),
        "rows": [r.to_json() for r in rows],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    # Atomic, so an interrupted run never leaves a half-written file behind.
    os.replace(tmp, path)
    return path


# -- Markdown -----------------------------------------------------------------------------


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 10000:
        return f"{x / 1000:.1f}k"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.1f}"


def _val(s: Stat | None) -> str:
    return _num(s.median) if s else "-"


def _count(s: Stat | None) -> str:
    if s is None:
        return "-"
    return f"{s.median:.0f}" if s.median == int(s.median) else f"{s.median:.1f}"


def _ratio(s: Stat | None) -> str:
    if s is None:
        return "-"
    if s.n == 1:
        return f"{s.median:.2f}"
    return f"{s.median:.2f} [{s.low:.2f}-{s.high:.2f}]"


HEADER = (
    "| mode | {rate} | avg µs | p50 µs | p99 µs | p99.9 µs | CPU µs/{unit} | switches "
    "| switch p99 µs | longest call in a switch µs "
    "| {rate} vs overlay | avg vs overlay | p99 vs overlay | {rate} vs host | avg vs host "
    "| p99 vs host | conns/worker |"
)


def _spread(per_rep: list[list[int]]) -> str:
    """Connections per worker, busiest first, for each repetition: "4/4 5/3 8/0"."""
    if not per_rep:
        return "-"

    def n(x: int) -> str:
        return f"{x / 1000:.1f}k" if x >= 10000 else str(x)

    return " ".join("/".join(n(x) for x in counts) for counts in per_rep)


def workload_table(summaries: list[ModeSummary]) -> list[str]:
    unit = summaries[0].unit if summaries else "req"
    rate = f"{unit}/s"
    lines = [HEADER.format(rate=rate, unit=unit), "|" + "---|" * 17]
    for m in summaries:
        if m.failed == m.reps:
            err = m.errors[0] if m.errors else "failed"
            lines.append(f"| {m.mode} | failed: {err.replace('|', '/')[:160]} |" + " |" * 15)
            continue
        v, o, h = m.values, m.ratios["overlay"], m.ratios["host"]
        mode = m.mode + (f" ({m.failed}/{m.reps} failed)" if m.failed else "")
        cells = [
            mode,
            _val(v["rps"]),
            _val(v["avg_us"]),
            _val(v["p50_us"]),
            _val(v["p99_us"]),
            _val(v["p999_us"]),
            _val(v["cpu_us_per_req"]),
            _count(m.switches),
            _count(v["switch_p99_us"]),
            _count(v["switch_call_max_us"]),
            _ratio(o["rps"]),
            _ratio(o["avg_us"]),
            _ratio(o["p99_us"]),
            _ratio(h["rps"]),
            _ratio(h["avg_us"]),
            _ratio(h["p99_us"]),
            _spread(m.worker_connections),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_table(s: dict[str, list[ModeSummary]]) -> list[str]:
    """One line per workload: each mode's avg / p99 latency (or rate) relative to overlay."""
    modes = list(dict.fromkeys(m.mode for ms in s.values() for m in ms if m.mode != "overlay"))
    lines = [
        "| workload | overlay avg / p99 µs | " + " | ".join(modes) + " |",
        "|" + "---|" * (len(modes) + 2),
    ]
    for lbl, ms in s.items():
        by = {m.mode: m for m in ms}
        ov = by.get("overlay")
        if ov is None or ov.failed == ov.reps:
            lines.append(f"| {lbl} | failed |" + " |" * len(modes))
            continue
        rate = ov.values["avg_us"] is None
        base = (
            f"{_val(ov.values['rps'])} {ov.unit}/s"
            if rate
            else f"{_val(ov.values['avg_us'])} / {_val(ov.values['p99_us'])}"
        )
        cells = []
        for mode in modes:
            m = by.get(mode)
            if m is None:
                cells.append("")
            elif m.failed == m.reps:
                cells.append("failed")
            elif rate:
                cells.append(_short(m.ratios["overlay"]["rps"]))
            else:
                r = m.ratios["overlay"]
                cells.append(f"{_short(r['avg_us'])} / {_short(r['p99_us'])}")
        lines.append(f"| {lbl} | {base} | " + " | ".join(cells) + " |")
    return lines


def stall_table(s: dict[str, list[ModeSummary]]) -> list[str]:
    """The stall target of docs/performance.md, per workload and shuntflow mode: the longest
    application data call any end made during a switch (max over repetitions: the target is
    about the worst stall) against the overlay's own p99.9 latency (median over repetitions, as
    everywhere else)."""
    lines = [
        "| workload | mode | longest data call in a switch µs | overlay p99.9 µs | target met |",
        "|---|---|---|---|---|",
    ]
    for lbl, ms in s.items():
        ov = next((m for m in ms if m.mode == "overlay"), None)
        p999 = ov.values["p999_us"] if ov is not None else None
        for m in ms:
            if not m.mode.startswith("shuntflow"):
                continue
            worst = m.values["switch_call_max_us"]
            if m.failed == m.reps:
                met = "failed"
            elif worst is None:
                met = "no switch"
            elif p999 is None:
                met = "-"  # the client reports no p99.9 (kv-memcached, stream)
            else:
                met = "yes" if worst.high <= p999.median else "no"
            longest = _num(worst.high) if worst else "-"
            lines.append(f"| {lbl} | {m.mode} | {longest} | {_val(p999)} | {met} |")
    return lines


def vxlan_table(s: dict[str, list[ModeSummary]]) -> list[str]:
    """Per workload whose client reports its payload (integrity) and mode: the share of that
    payload the client host's VXLAN device carried, median [min-max] over repetitions."""
    lines = ["| workload | mode | VXLAN bytes / payload |", "|---|---|---|"]
    for lbl, ms in s.items():
        for m in ms:
            share = m.values["vxlan_share"]
            if share is not None:
                lines.append(f"| {lbl} | {m.mode} | {_share(share)} |")
    return lines


def _ci(s: Stat | None) -> str:
    if s is None or s.ci is None:
        return "-"
    return f"{s.median:.3f} [{s.ci[0]:.3f}-{s.ci[1]:.3f}]"


def interval_table(s: dict[str, list[ModeSummary]]) -> list[str]:
    """Per workload and mode, the per-repetition ratios to overlay with the median's 95 %
    confidence interval: what a bound such as "<= 1.02x overlay" needs to be judged. Only
    where there are enough repetitions for one (6)."""
    lines = [
        "| workload | mode | n | avg vs overlay | p50 vs overlay | CPU per request vs overlay "
        "| rate vs overlay |",
        "|---|---|---|---|---|---|---|",
    ]
    for lbl, ms in s.items():
        for m in ms:
            r = m.ratios["overlay"]
            if m.mode == "overlay" or not any(x is not None and x.ci for x in r.values()):
                continue
            n = max(x.n for x in r.values() if x is not None)
            cells = [_ci(r[k]) for k in ("avg_us", "p50_us", "cpu_us_per_req", "rps")]
            lines.append(f"| {lbl} | {m.mode} | {n} | " + " | ".join(cells) + " |")
    return lines


def _share(s: Stat) -> str:
    if s.n == 1:
        return f"{s.median:.1%}"
    return f"{s.median:.1%} [{s.low:.1%}-{s.high:.1%}]"


def _short(s: Stat | None) -> str:
    return f"{s.median:.2f}" if s else "-"


def markdown(meta: dict[str, Any], rows: list[Row]) -> str:
    s = summarise(rows)
    git = meta.get("git") or {}
    commit = (git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
    lines = [
        "# ShuntFlow bench",
        "",
        f"- date: {meta.get('date')}; command: `{meta.get('command')}`",
        f"- machine: {meta.get('cpu_model')}, {meta.get('nproc')} vCPUs, kernel "
        f"{meta.get('kernel')}; commit {commit}",
        f"- placement: {meta.get('placement')} (routers and library threads on CPUs "
        f"{meta.get('infra_cpus') or 'unpinned'}); repetitions: {meta.get('repetitions')}; "
        f"duration per run: {meta.get('duration_s')} s; testbed: {meta.get('prefix')}",
        "- values are medians over repetitions; ratios are taken per repetition against the "
        "mode in the same repetition, shown as median [min-max]; below 1 is better for "
        "latency and CPU, above 1 for req/s",
        "- conns/worker: for each repetition, the connections each server worker served, "
        "busiest first (nginx has 2 workers, each with its own `reuseport` listener)",
    ]
    if meta.get("interrupted"):
        lines.append("- **interrupted**: the tables hold what was measured before the stop")
    if s:
        lines += [
            "",
            "## Summary",
            "",
            "Median per-repetition ratio to overlay of avg / p99 latency (below 1 is faster); "
            "where the client reports no latency (stream), of its rate (above 1 is faster).",
            "",
        ]
        lines += summary_table(s)
        stall = stall_table(s)
        if len(stall) > 2:
            lines += [
                "",
                "The longest application data call during a switch (the target: no longer "
                "than the overlay's own p99.9): per run the longest call any end made between its "
                "decision to switch and the swap, blocking calls with their wait; the max over "
                "repetitions against overlay's median p99.9.",
                "",
            ]
            lines += stall
        intervals = interval_table(s)
        if len(intervals) > 2:
            lines += [
                "",
                "Per-repetition ratios to overlay: median [95 % confidence interval of the "
                "median, from order statistics, whatever the distribution]. A bound such as "
                "1.02 is met when the interval lies below it, missed when it lies above it, and "
                "not resolved by this run when the interval contains it.",
                "",
            ]
            lines += intervals
        shares = vxlan_table(s)
        if len(shares) > 2:
            lines += [
                "",
                "The bytes still on the overlay: the client host's VXLAN device bytes (rx+tx, "
                "encapsulation included) over the payload the client moved, both directions.",
                "",
            ]
            lines += shares
    for lbl, summaries in s.items():
        lines += ["", f"## {lbl}", ""]
        lines += workload_table(summaries)
    failed = [r for r in rows if not r.ok]
    if failed:
        lines += ["", "## Failures", "", "The first error of each workload and mode:", ""]
        count: dict[tuple[str, str], int] = {}
        first: dict[tuple[str, str], Row] = {}
        for r in failed:
            count[(r.label, r.mode)] = count.get((r.label, r.mode), 0) + 1
            first.setdefault((r.label, r.mode), r)
        for (lbl, mode), r in first.items():
            reps = sum(1 for x in rows if x.label == lbl and x.mode == mode)
            error = (r.error or "")[:400]
            lines.append(
                f"- {lbl} / {mode}: {count[(lbl, mode)]} of {reps} failed "
                f"(first: rep {r.repetition}): {error}"
            )
    return "\n".join(lines) + "\n"


def write_markdown(out: Path, meta: dict[str, Any], rows: list[Row]) -> Path:
    path = out / "results.md"
    path.write_text(markdown(meta, rows))
    return path
