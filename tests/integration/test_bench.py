"""`shuntflow bench` on real testbeds: what it writes, how it fails, and what it leaves behind.
Never timings. Prefixes bt1..bt9 belong to these tests (the readers of the clients' reports and
the options: tests/unit/test_bench_results.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shuntflow.bench.metrics import REQUIRED_FIELDS
from shuntflow.testbed import Testbed
from shuntflow.testbed.nsutil import list_netns

from ..support import CLI, bench, table_rows
from .locks import prefix_lock

pytestmark = pytest.mark.root

MakeTestbed = Callable[..., Testbed]


# -- real runs ---------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_tiny_run_writes_rows_table_and_plots(make_testbed: MakeTestbed, tmp_path: Path) -> None:
    make_testbed("bt1", routers=True)
    out = tmp_path / "out"
    # A relative --out: every path the servers and clients get must still resolve.
    p = bench(
        "--prefix", "bt1",
        "--workload", "rr,web-short,web-keepalive",
        "--modes", "overlay,shuntflow",
        "--repetitions", "1",
        "--duration", "1",
        "--out", "out",
        cwd=tmp_path,
    )  # fmt: skip
    doc = json.loads((out / "results.json").read_text())
    rows = doc["rows"]
    failed = [(r["workload"], r["mode"], r["error"]) for r in rows if r["error"]]
    assert not failed, failed
    assert p.returncode == 0, p.stderr[-2000:]
    assert {(r["workload"], r["mode"]) for r in rows} == {
        (w, m) for w in ("rr", "web-short", "web-keepalive") for m in ("overlay", "shuntflow")
    }
    for r in rows:
        assert set(REQUIRED_FIELDS) <= r.keys()
        assert r["requests"] > 0 and r["rps"] > 0 and r["avg_us"] > 0
        assert r["p50_us"] <= r["p99_us"] <= r["p999_us"]
        assert r["cpu_us_per_req"] > 0 and r["placement"] == "same"
        _check_worker_connections(r)
        tool = "sockperf" if r["workload"] == "rr" else "wrk"
        # The server and the client, each as a `shuntflow exec` line one can paste.
        assert len(r["command"]) == 2
        assert all(c.startswith("shuntflow exec bt1-h") for c in r["command"])
        assert tool in r["command"][1]
        if r["mode"] == "shuntflow":
            assert "--mode shuntflow" in r["command"][1]
        else:
            assert "--mode" not in r["command"][1]
            assert r["switch_p99_us"] is None and r["switch_call_max_us"] is None
    # sockperf's one long connection switched: its switch time is in the row, and so is the
    # longest data call its ends made during the switch.
    rr = next(r for r in rows if r["workload"] == "rr" and r["mode"] == "shuntflow")
    assert rr["switches"] >= 1 and 0 < rr["switch_p50_us"] <= rr["switch_p99_us"], rr
    assert rr["switch_call_max_us"] is not None and rr["switch_call_max_us"] >= 0, rr
    meta = doc["meta"]
    for key in ("date", "kernel", "cpu_model", "nproc", "command", "placement", "git"):
        assert key in meta
    assert meta["testbed"] == "existing, reused"

    md = (out / "results.md").read_text()
    for section in ("rr 64B", "web-short c8", "web-keepalive c8"):
        assert [ln.split("|")[1].strip() for ln in table_rows(md, section)] == [
            "overlay",
            "shuntflow",
        ]
    pngs = sorted(f.name for f in out.glob("*.png"))
    assert {"latency_cdf.png", "latency_percentiles.png", "cpu_per_request.png"} <= set(pngs)
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The existing testbed is left as it was.
    assert "bt1-h1-c1" in list_netns()


@pytest.mark.timeout(180)
def test_integrity_run_counts_the_checked_bytes_and_their_path(
    make_testbed: MakeTestbed, tmp_path: Path
) -> None:
    make_testbed("bt4", routers=True)
    p = bench(
        "--prefix", "bt4", "--workload", "integrity", "--modes", "overlay,shuntflow@4",
        "--repetitions", "1", "--duration", "1", "--out", str(tmp_path),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r["mode"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows.keys() == {"overlay", "shuntflow@4"}
    for r in rows.values():
        assert r["error"] is None and r["client_errors"] == 0, r
        assert r["requests"] == 40 and r["unit"] == "conn", r
        assert r["extra"]["bad_bytes"] == 0 and r["extra"]["payload_bytes"] > 0, r
    overlay, switched = rows["overlay"], rows["shuntflow@4"]
    # On the overlay every byte crossed VXLAN; the same seeded streams switched, and those
    # connections' bytes after their switch point crossed the host path instead.
    assert overlay["vxlan_bytes"] >= overlay["extra"]["payload_bytes"], overlay
    assert switched["extra"]["payload_bytes"] == overlay["extra"]["payload_bytes"]
    assert switched["extra"]["switched"] >= 1 and switched["switches"] >= 1, switched
    md = (tmp_path / "results.md").read_text()
    assert "| integrity c8 | shuntflow@4 |" in md


def _check_worker_connections(r: dict[str, Any]) -> None:
    """nginx's own count of the connections each worker served against what wrk opened.

    Which worker the kernel's reuseport hash picks is chance (all 8 on one of 2 workers has
    probability 2^-7), so the spread itself is not asserted, only that the counts add up."""
    counts = r["worker_connections"]
    if r["workload"] == "rr":
        assert counts is None, r
        return
    assert isinstance(counts, dict) and len(counts) == 2, r  # every worker, idle ones too
    total = sum(counts.values())
    if r["workload"] == "web-keepalive":
        assert total == 8, r  # wrk -c8 opens its 8 connections once
    else:
        # A connection per request: those wrk completed, plus at most the 8 it cut off at the
        # end or lost to a socket error (nginx logs a request it answered even when the client
        # has gone).
        assert r["requests"] <= total <= r["requests"] + 8 + r["client_errors"], r


@pytest.mark.timeout(120)
def test_failing_mode_gives_error_rows_and_the_run_goes_on(
    make_testbed: MakeTestbed, tmp_path: Path
) -> None:
    # Without routers the library modes cannot work: they fail, host and overlay still run.
    make_testbed("bt2", routers=False)
    out = tmp_path / "out"
    p = bench(
        "--prefix", "bt2", "--workload", "web-short", "--modes", "host,overlay,slim",
        "--repetitions", "1", "--duration", "1", "--out", str(out),
    )  # fmt: skip
    assert p.returncode == 1
    rows = {r["mode"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["slim"]["error"] and "router" in rows["slim"]["error"]
    assert rows["host"]["error"] is None and rows["host"]["requests"] > 0
    assert rows["overlay"]["error"] is None and rows["overlay"]["requests"] > 0
    md = (out / "results.md").read_text()
    assert "## Failures" in md and "slim" in md.split("## Failures", 1)[1]


@pytest.mark.timeout(120)
def test_ctrl_c_keeps_what_was_measured_and_removes_its_own_testbed(tmp_path: Path) -> None:
    prefix = "bt3"
    with prefix_lock(prefix):
        Testbed.down_prefix(prefix)
        out = tmp_path / "out"
        proc = subprocess.Popen(
            [
                *CLI, "bench", "--prefix", prefix, "--workload", "web-short",
                "--modes", "host,overlay", "--repetitions", "20", "--duration", "1",
                "--out", str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                path = out / "results.json"
                if path.exists() and json.loads(path.read_text())["rows"]:
                    break
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.2)
            else:
                pytest.fail("no row was measured within 60 s")
            proc.send_signal(signal.SIGINT)
            _stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            Testbed.down_prefix(prefix)
    assert proc.returncode == 130, stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["interrupted"] is True and doc["rows"]
    assert "interrupted" in (out / "results.md").read_text()
    assert not [n for n in list_netns() if re.fullmatch(rf"{prefix}-.*", n)], "testbed left up"
    # Nothing the bench started survives it.
    leftovers = subprocess.run(
        ["pgrep", "-f", f"nginx -p {out}"], capture_output=True, text=True
    ).stdout.split()
    assert not [pid for pid in leftovers if int(pid) != os.getpid()]
