"""`shuntflow bench`: what it writes, how it fails, and what it leaves behind. Never timings.

Prefixes bt1..bt9 belong to these tests. The readers of the clients' reports are checked on
captured output first (no root needed), then real runs on a testbed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shuntflow.bench import parse
from shuntflow.bench.metrics import REQUIRED_FIELDS, Row, summarise
from shuntflow.bench.report import markdown
from shuntflow.bench.runner import Runner
from shuntflow.bench.spec import BenchConfig, BenchUsageError, mode_spec, parse_modes
from shuntflow.native import DEFAULT_THRESHOLD
from shuntflow.testbed import Testbed
from shuntflow.testbed.nsutil import list_netns

from .locks import prefix_lock

MakeTestbed = Callable[..., Testbed]

CLI = [sys.executable, "-m", "shuntflow.cli"]


def bench(
    *args: str, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "bench", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


# -- readers of the clients' own reports ------------------------------------------------

SOCKPERF = (
    (
        "sockperf: [Total Run] RunTime=1.000 sec; Warm up time=400 msec; "
        "SentMessages=38066; ReceivedMessages=38065\n"
    )
    + """\
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=0.550 sec; SentMessages=21355; ReceivedMessages=21355
sockperf: \x1b[2;35m====> avg-rtt=25.748 (std-dev=30.520)\x1b[0m
sockperf: ---> <MAX> observation = 3296.477
sockperf: ---> percentile 99.999 = 3296.477
sockperf: ---> percentile 99.990 =  281.066
sockperf: ---> percentile 99.900 =   74.159
sockperf: ---> percentile 99.000 =   41.060
sockperf: ---> percentile 90.000 =   25.688
sockperf: ---> percentile 50.000 =   24.816
sockperf: ---> <MIN> observation =   24.546
"""
)

REDIS = """\
GET: rps=0.0 (overall: nan) avg_msec=nan (overall: nan)\r====== GET ======
  20000 requests completed in 0.68 seconds
  1 parallel clients

Latency by percentile distribution:
0.000% <= 0.031 milliseconds (cumulative count 18251)
93.750% <= 0.039 milliseconds (cumulative count 19482)
99.805% <= 0.103 milliseconds (cumulative count 19969)
99.902% <= 0.119 milliseconds (cumulative count 19984)
100.000% <= 3.215 milliseconds (cumulative count 20000)

Cumulative distribution of latencies:
99.845% <= 0.103 milliseconds (cumulative count 19969)
100.000% <= 4.103 milliseconds (cumulative count 20000)

Summary:
  throughput summary: 29542.10 requests per second
  latency summary (msec):
          avg       min       p50       p95       p99       max
        0.030     0.024     0.031     0.039     0.071     3.215
"""

WRK = (
    "Running 2s test @ http://198.19.2.1:8080/1k.bin\n"
    'SFJSON {"requests":53079,"duration_us":2000444,"bytes":67091856,"errors":3,'
    '"mean_us":235.272,"min_us":43,"max_us":1466,"pct":[[1,103],[50,224],[99,508],'
    "[99.9,679],[100,0]]}\n"
)

MEMASLAP = """\
Total Statistics (29065 events)
   Min:        16
   Max:      3261
   Avg:        68
Run time: 2.0s Ops: 29066 TPS: 14531 Net_rate: 16.3M/s
"""


def test_sockperf_reader_uses_the_valid_part_and_full_rtt() -> None:
    r = parse.sockperf(SOCKPERF)
    assert (r.requests, r.seconds) == (21355, 0.550)
    assert (r.avg_us, r.p50_us, r.p99_us, r.p999_us) == (25.748, 24.816, 41.060, 74.159)
    # CPU time covers the whole run, warm-up included, so it is divided by all messages.
    assert r.cpu_requests == 38065


def test_sockperf_reader_prefers_the_full_log_for_the_cdf() -> None:
    log = "packet, txTime(sec), rxTime(sec), rtt(usec)\n" + "".join(
        f"{i}, 1.0, 1.0, {10 + i}\n" for i in range(100)
    )
    r = parse.sockperf(SOCKPERF, log)
    assert r.cdf[0] == (10.0, 0.01) and r.cdf[-1] == (109.0, 1.0)


def test_redis_reader_takes_p999_from_the_percentile_block() -> None:
    r = parse.redis_benchmark(REDIS)
    assert r.requests == 20000
    assert r.rps == pytest.approx(29542.10)
    assert (r.avg_us, r.p50_us, r.p99_us) == pytest.approx((30.0, 31.0, 71.0))
    assert r.p999_us == pytest.approx(119.0)  # first point at or above 99.9 %
    assert r.cdf[-1] == (pytest.approx(3215.0), 1.0)


def test_wrk_reader_replaces_the_empty_top_bucket_with_max() -> None:
    r = parse.wrk(WRK)
    assert (r.requests, r.errors) == (53079, 3)
    assert (r.p50_us, r.p99_us, r.p999_us) == (224.0, 508.0, 679.0)
    assert r.cdf[-1] == (1466.0, 1.0)


def test_memaslap_reader_gives_no_percentiles() -> None:
    r = parse.memaslap(MEMASLAP)
    assert (r.requests, r.avg_us, r.p50_us) == (29066, 68.0, None)


def test_iperf3_reader_counts_mebibytes() -> None:
    doc = {"end": {"sum_received": {"bytes": 3 * parse.MIB, "seconds": 1.5}}}
    r = parse.iperf3(json.dumps(doc))
    assert (r.unit, r.requests, r.rps) == ("MiB", 3, 2.0)
    with pytest.raises(parse.ParseError, match="refused"):
        parse.iperf3(json.dumps({"start": {}, "end": {}, "error": "refused"}))


def test_readers_reject_output_without_a_report() -> None:
    for reader in (parse.sockperf, parse.redis_benchmark, parse.wrk, parse.memaslap, parse.crr):
        with pytest.raises(parse.ParseError):
            reader("Connection refused\n")


def test_merge_weights_by_requests() -> None:
    fast = parse.ClientResult(300, 1.0, avg_us=10.0, cdf=[(10.0, 1.0)])
    slow = parse.ClientResult(100, 1.0, avg_us=50.0, cdf=[(50.0, 1.0)])
    m = parse.merge([fast, slow], 1.0)
    assert m.requests == 400 and m.avg_us == pytest.approx(20.0)
    assert m.p50_us == 10.0 and m.p99_us == 50.0


def test_worker_connections_counts_each_connection_once_and_keeps_idle_workers() -> None:
    log = "101 1\n102 2\n101 3\n101 3\n\n101 4\n"
    assert parse.worker_connections(log, {101, 102, 103}) == {"101": 3, "102": 1, "103": 0}
    # A worker that replaced one during the run still counts.
    assert parse.worker_connections("104 9\n", {101}) == {"101": 0, "104": 1}
    with pytest.raises(parse.ParseError, match="line 2"):
        parse.worker_connections("101 1\n101 - GET /\n", {101})


def test_table_shows_connections_per_worker_and_reads_rows_without_them() -> None:
    rows = [
        Row("web-keepalive", "overlay", 0, "same", case="c8", avg_us=90,
            worker_connections={"7": 3, "9": 5}),
        Row("web-keepalive", "overlay", 1, "same", case="c8", avg_us=95,
            worker_connections={"7": 8, "9": 0}),
        Row("web-short", "overlay", 0, "same", case="c8", avg_us=200,
            worker_connections={"7": 20417, "9": 19876}),
    ]  # fmt: skip
    # A row as results.json held it before the field existed.
    old = Row("rr", "overlay", 0, "same", case="64B", avg_us=30).to_json()
    del old["worker_connections"]
    rows.append(Row(**old))
    md = markdown({}, rows)
    cell = {sec: _table_rows(md, sec)[0].split("|")[-2].strip() for sec in
            ("web-keepalive c8", "web-short c8", "rr 64B")}  # fmt: skip
    assert cell == {"web-keepalive c8": "5/3 8/0", "web-short c8": "20.4k/19.9k", "rr 64B": "-"}


# -- options -----------------------------------------------------------------------------


def test_modes_always_include_overlay_and_fold_the_default_threshold() -> None:
    names = [m.name for m in parse_modes("slim", f"1,{DEFAULT_THRESHOLD}")]
    assert names == ["overlay", "slim", "shuntflow@1", "shuntflow"]
    assert mode_spec("host").exec_flags() == ["--host-net"]
    assert mode_spec("shuntflow@4").exec_flags() == ["--mode", "shuntflow", "--threshold", "4"]
    with pytest.raises(BenchUsageError, match="unknown mode"):
        mode_spec("fast")


def test_plan_rotates_modes_per_repetition() -> None:
    cfg = BenchConfig(["rr"], parse_modes("host,overlay,slim", None), 3, 1, "free", False, "x")
    runner = Runner.__new__(Runner)  # plan() needs only the configuration
    runner.cfg = cfg
    order = [[m.name for r, _w, _p, m in runner.plan() if r == rep] for rep in range(3)]
    assert order == [
        ["host", "overlay", "slim"],
        ["overlay", "slim", "host"],
        ["slim", "host", "overlay"],
    ]


def test_ratios_are_taken_within_each_repetition() -> None:
    rows = []
    # Repetition 1 is twice as slow for every mode: per-repetition ratios stay exactly 0.5.
    for rep, scale in ((0, 1.0), (1, 2.0)):
        rows.append(Row("rr", "overlay", rep, "same", avg_us=40 * scale, rps=1000 / scale))
        rows.append(Row("rr", "shuntflow", rep, "same", avg_us=20 * scale, rps=2000 / scale))
    s = summarise(rows)["rr"]
    sf = next(m for m in s if m.mode == "shuntflow")
    ratio = sf.ratios["overlay"]["avg_us"]
    assert ratio is not None and (ratio.median, ratio.low, ratio.high) == (0.5, 0.5, 0.5)
    assert sf.ratios["host"]["avg_us"] is None


def test_summary_compares_the_longest_call_in_a_switch_with_overlay_p999() -> None:
    rows = []
    for rep, (p999, stall) in enumerate([(100.0, 40.0), (120.0, 150.0), (110.0, 60.0)]):
        rows.append(Row("rr", "overlay", rep, "same", avg_us=40, p999_us=p999))
        rows.append(Row("rr", "shuntflow", rep, "same", avg_us=30, switch_call_max_us=stall))
        rows.append(Row("crr", "overlay", rep, "same", avg_us=90, p999_us=p999))
        rows.append(Row("crr", "shuntflow", rep, "same", avg_us=95))  # nothing switched
    md = markdown({}, rows)
    # The worst repetition (150) against the overlay's median p99.9 (110).
    assert "| rr | shuntflow | 150 | 110 | no |" in md
    assert "| crr | shuntflow | - | 110 | no switch |" in md
    table = _table_rows(md, "rr")
    assert table[1].split("|")[10].strip() == "60"  # the column: median over repetitions


def test_bad_workload_is_one_error_line_and_exit_2() -> None:
    p = bench("--workload", "rr,nosuch", "--prefix", "bt9")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "nosuch" in lines[0] and "kv-redis" in lines[0]
    assert lines[0].startswith("shuntflow: error:")


@pytest.mark.parametrize(
    "args",
    [
        ["--modes", "host,turbo"],
        ["--repetitions", "0"],
        ["--duration", "soon"],
        ["--placement", "middle"],
        ["--thresholds", "1,x"],
    ],
)
def test_bad_option_values_are_one_error_line_and_exit_2(args: list[str]) -> None:
    p = bench(*args, "--prefix", "bt9")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr


# -- real runs ---------------------------------------------------------------------------


def _table_rows(md: str, section: str) -> list[str]:
    part = md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [ln for ln in part.splitlines() if ln.startswith("| ") and not ln.startswith("| mode")]


@pytest.mark.root
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
        assert [ln.split("|")[1].strip() for ln in _table_rows(md, section)] == [
            "overlay",
            "shuntflow",
        ]
    pngs = sorted(f.name for f in out.glob("*.png"))
    assert {"latency_cdf.png", "latency_percentiles.png", "cpu_per_request.png"} <= set(pngs)
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The existing testbed is left as it was.
    assert "bt1-h1-c1" in list_netns()


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


@pytest.mark.root
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


@pytest.mark.root
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
