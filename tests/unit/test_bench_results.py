"""`shuntflow bench` without a testbed: its readers of the clients' own reports (on captured
output), the results table, and its options. Never timings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shuntflow.bench import parse
from shuntflow.bench.metrics import Row, Stat, median_ci_ranks, stat, summarise
from shuntflow.bench.report import markdown
from shuntflow.bench.runner import Runner
from shuntflow.bench.spec import BenchConfig, BenchUsageError, mode_spec, parse_modes
from shuntflow.native import DEFAULT_THRESHOLD

from ..support import bench, table_rows

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


def test_torture_reader_takes_the_clients_checked_bytes() -> None:
    """On the torture pair's real output (loopback, no library): the bytes it moved are the
    sum of what both ends say they sent, every one checked."""
    torture = [sys.executable, "-m", "shuntflow.torture"]
    server = subprocess.Popen(
        [*torture, "server", "--bind", "127.0.0.1", "--port", "0", "--connections", "6"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["listening"]
        out = subprocess.run(
            [*torture, "client", "--host", "127.0.0.1", "--port", str(port),
             "--connections", "6", "--max-bytes", "200000", "--seed", "7"],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
        served = json.loads(server.communicate(timeout=120)[0].splitlines()[-1])
    finally:
        server.kill()
        server.wait()
    r = parse.torture(out)
    assert (r.unit, r.requests, r.errors) == ("conn", 6, 0)
    assert r.extra["bad_bytes"] == 0 and served["bad"] == 0
    assert r.extra["payload_bytes"] == served["bytes"] > 0
    with pytest.raises(parse.ParseError, match="no summary"):
        parse.torture('{"role": "server", "listening": 7600}\n')


def test_vxlan_share_is_vxlan_bytes_over_the_payload() -> None:
    rows = []
    for rep, (overlay, switched) in enumerate([(1020, 500), (1030, 300), (1010, 400)]):
        for mode, vx in (("overlay", overlay), ("shuntflow", switched)):
            rows.append(Row("integrity", mode, rep, "same", case="c8", rps=40.0, unit="conn",
                            vxlan_bytes=vx, extra={"payload_bytes": 1000.0}))  # fmt: skip
    rows.append(Row("rr", "overlay", 0, "same", case="64B", avg_us=30, vxlan_bytes=99))
    md = markdown({}, rows)
    assert "| integrity c8 | overlay | 102.0% [101.0%-103.0%] |" in md
    assert "| integrity c8 | shuntflow | 40.0% [30.0%-50.0%] |" in md
    assert "| rr 64B | overlay |" not in md  # no payload reported: no share
    assert "| mode | conn/s |" in md


def test_readers_reject_output_without_a_report() -> None:
    for reader in (parse.sockperf, parse.redis_benchmark, parse.wrk, parse.memaslap, parse.crr,
                   parse.torture):  # fmt: skip
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
    cell = {sec: table_rows(md, sec)[0].split("|")[-2].strip() for sec in
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


def test_median_interval_comes_from_order_statistics() -> None:
    # Known distribution-free 95 % ranks: none for 5 values, the extremes for 6, then e.g.
    # (4, 12) of 15 and (14, 27) of 40.
    assert [median_ci_ranks(n) for n in (5, 6, 10, 15, 40)] == [
        None,
        (1, 6),
        (2, 9),
        (4, 12),
        (14, 27),
    ]
    st = stat([float(x) for x in (9, 3, 15, 1, 7, 12, 5, 2, 14, 8, 4, 11, 6, 13, 10)])
    assert st is not None and (st.median, st.ci) == (8.0, (4.0, 12.0))
    assert stat([1.0, 2.0, 3.0]) == Stat(2.0, 1.0, 3.0, 3, None)


def test_interval_table_only_with_enough_repetitions() -> None:
    rows = []
    for rep in range(15):
        rows.append(Row("crr", "overlay", rep, "same", avg_us=200, cpu_us_per_req=50))
        # 1.000, 1.002, ... 1.028: median 1.014, interval [1.006-1.022]
        rows.append(Row("crr", "shuntflow", rep, "same", avg_us=200 * (1 + rep / 500)))
    md = markdown({}, rows)
    assert "| crr | shuntflow | 15 | 1.014 [1.006-1.022] | - | - | - |" in md
    assert "confidence interval" not in markdown({}, [r for r in rows if r.repetition < 5])


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
    table = table_rows(md, "rr")
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
