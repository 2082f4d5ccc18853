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
    "| {rate} vs overlay | avg vs overlay | p99 vs overlay | {rate} vs host | avg vs host "
    "| p99 vs host |"
)


def workload_table(summaries: list[ModeSummary]) -> list[str]:
    unit = summaries[0].unit if summaries else "req"
    rate = "MiB/s" if unit == "MiB" else "req/s"
    lines = [HEADER.format(rate=rate, unit=unit), "|" + "---|" * 14]
    for m in summaries:
        if m.failed == m.reps:
            err = m.errors[0] if m.errors else "failed"
            lines.append(f"| {m.mode} | failed: {err.replace('|', '/')[:160]} |" + " |" * 12)
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
            _ratio(o["rps"]),
            _ratio(o["avg_us"]),
            _ratio(o["p99_us"]),
            _ratio(h["rps"]),
            _ratio(h["avg_us"]),
            _ratio(h["p99_us"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
        f"- placement: {meta.get('placement')}; repetitions: {meta.get('repetitions')}; "
        f"duration per run: {meta.get('duration_s')} s; testbed: {meta.get('prefix')}",
        "- values are medians over repetitions; ratios are taken per repetition against the "
        "mode in the same repetition, shown as median [min-max]; below 1 is better for "
        "latency and CPU, above 1 for req/s",
    ]
    if meta.get("interrupted"):
        lines.append("- **interrupted**: the tables hold what was measured before the stop")
    for lbl, summaries in s.items():
        lines += ["", f"## {lbl}", ""]
        lines += workload_table(summaries)
    failed = [r for r in rows if not r.ok]
    if failed:
        lines += ["", "## Failures", ""]
        seen: set[tuple[str, str, str]] = set()
        for r in failed:
            key = (r.label, r.mode, r.error or "")
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"- {r.label} / {r.mode} (rep {r.repetition}): {r.error}")
    return "\n".join(lines) + "\n"


def write_markdown(out: Path, meta: dict[str, Any], rows: list[Row]) -> Path:
    path = out / "results.md"
    path.write_text(markdown(meta, rows))
    return path
