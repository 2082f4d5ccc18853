"""The workloads: which real server to start and which clients to run against it.

A workload knows only argv lists and how to read the clients' reports; where the processes run
(namespace, CPU, library environment) is the runner's job. Every path a command names is under
the bench's own work directory, so the recorded commands can be re-run by hand.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shuntflow.bench import crr, parse
from shuntflow.bench.spec import BenchError

Parser = Callable[[str], parse.ClientResult]

# A closed-loop client at this many requests per second per connection-count is what the
# reference VM does on the overlay; it turns a duration into redis-benchmark's request count.
REDIS_RATE = {1: 30_000, 20: 30_000}
WEB_FILE = "1k.bin"
WEB_FILE_SIZE = 1024
CRR_FILE = "64.bin"
CRR_FILE_SIZE = 64

WRK_LUA = r"""
-- Printed as one JSON line so the bench reads wrk's own histogram, p99.9 included.
done = function(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.status + e.timeout
  io.write(string.format(
    'SFJSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors":%d,' ..
    '"mean_us":%.3f,"min_us":%d,"max_us":%d,"pct":[',
    summary.requests, summary.duration, summary.bytes, errors,
    latency.mean, latency.min, latency.max))
  local ps = {0.1,1,5,10,20,30,40,50,60,70,75,80,85,90,95,97,98,99,99.5,99.9,99.95,99.99,100}
  for i, p in ipairs(ps) do
    if i > 1 then io.write(",") end
    io.write(string.format("[%g,%d]", p, latency:percentile(p)))
  end
  io.write("]}\n")
end
"""


@dataclass
class ClientSpec:
    label: str
    argv: list[str]
    parse: Parser


@dataclass
class ClientCase:
    """Clients started together; one row each, plus a `combined` row when there are several."""

    name: str
    clients: list[ClientSpec]


@dataclass
class Target:
    """Where this run's server listens, and the files this run may write."""

    ip: str
    work: Path  # the bench's work directory (configs, built client)
    raw: Path  # per-run outputs (full logs); unique per workload, mode and repetition
    duration: int
    quick: bool


@dataclass
class Workload:
    name: str
    port: int
    server: Callable[[Target, int], list[str]]
    cases: Callable[[Target, int], list[ClientCase]]
    needs: list[str] = field(default_factory=list)
    prepare: Callable[[Path], None] | None = None
    # The file where the server writes one line "<worker pid> <connection number>" per connection
    # it served (read once the server has exited), or None when the server keeps no such log.
    conns_log: Callable[[Target], Path] | None = None


# -- redis --------------------------------------------------------------------------------


def _redis_server(t: Target, port: int) -> list[str]:
    return [
        "redis-server",
        "--bind", t.ip,
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "no",
        "--daemonize", "no",
        "--dir", str(t.work),
        "--logfile", "",
    ]  # fmt: skip


def _redis_cases(t: Target, port: int) -> list[ClientCase]:
    cases = []
    for conns in (1, 20):
        for test in ("get", "set"):
            # Two of the four cases fit a quick run; each case is half the duration because
            # four of them run per server start.
            if t.quick and test == "set":
                continue
            n = max(1000, int(REDIS_RATE[conns] * t.duration / 2))
            argv = [
                "redis-benchmark",
                "-h", t.ip,
                "-p", str(port),
                "-c", str(conns),
                "-n", str(n),
                "-t", test,
                "--precision", "3",
            ]  # fmt: skip
            name = f"c{conns}-{test}"
            cases.append(ClientCase(name, [ClientSpec(name, argv, parse.redis_benchmark)]))
    return cases


# -- memcached ----------------------------------------------------------------------------


def _memcached_server(t: Target, port: int) -> list[str]:
    return ["memcached", "-u", "root", "-l", t.ip, "-p", str(port), "-t", "2", "-U", "0"]


def _memcached_cases(t: Target, port: int) -> list[ClientCase]:
    argv = [
        "memcaslap",
        "-s", f"{t.ip}:{port}",
        "-T", "1",
        "-c", "1",
        "-X", "64",
        "-t", f"{t.duration}s",
        # One statistics dump at the end: without -S memaslap reports no average latency.
        "-S", f"{t.duration}s",
    ]  # fmt: skip
    return [ClientCase("c1", [ClientSpec("c1", argv, parse.memaslap)])]


# -- nginx --------------------------------------------------------------------------------


def nginx_prefix(work: Path) -> Path:
    return work / "nginx"


def _nginx_prepare(work: Path) -> None:
    root = nginx_prefix(work)
    html = root / "html"
    html.mkdir(parents=True, exist_ok=True)
    for sub in ("logs", "tmp"):
        (root / sub).mkdir(exist_ok=True)
    # Fixed pseudo-random content: compressible files would make a different benchmark.
    seed = b"shuntflow-bench"
    data = bytearray()
    while len(data) < WEB_FILE_SIZE:
        seed = bytes((b * 31 + 7 + i) & 0xFF for i, b in enumerate(seed * 2))[:64]
        data += seed
    (html / WEB_FILE).write_bytes(bytes(data[:WEB_FILE_SIZE]))
    (html / CRR_FILE).write_bytes(bytes(data[:CRR_FILE_SIZE]))
    (work / "report.lua").write_text(WRK_LUA)


def nginx_conns_log(t: Target) -> Path:
    return Path(f"{t.raw}-conns.log")


def nginx_conf(root: Path, ip: str, port: int, conns_log: Path) -> str:
    tmp = root / "tmp"
    return f"""# written by shuntflow bench for one run; nginx -p {root}
daemon off;
master_process on;
# Workers stay root so nothing changes credentials between the library's load and its use.
user root;
worker_processes 2;
pid {root}/nginx.pid;
error_log {root}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    # One line per connection, at its first request: how many connections each worker served.
    # Buffered, so the log costs no write per connection; workers flush it when they exit.
    map $connection_requests $sf_first_request {{ 1 1; default 0; }}
    log_format sf_conns '$pid $connection';
    access_log {conns_log} sf_conns buffer=64k if=$sf_first_request;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    server {{
        # A listener per worker, spread by the kernel's hash: with one shared listener the
        # spread depends on how long accept() takes (slim's blocking accept hands the next
        # connection to the other worker, an instant accept leaves most on one), which would
        # make the modes differ by something other than their network path.
        listen {ip}:{port} backlog=4096 reuseport;
        root {root}/html;
    }}
}}
"""


def _nginx_server(t: Target, port: int) -> list[str]:
    root = nginx_prefix(t.work)
    conf = root / f"nginx-{t.ip}-{port}.conf"
    log = nginx_conns_log(t)
    # nginx appends: a log left by an earlier run into the same directory would count twice.
    log.unlink(missing_ok=True)
    conf.write_text(nginx_conf(root, t.ip, port, log))
    return ["nginx", "-p", str(root), "-c", str(conf), "-e", str(root / "logs" / "error.log")]


def _wrk(t: Target, port: int, conns: int, close: bool, seconds: int) -> list[str]:
    argv = ["wrk", "-t", "1", "-c", str(conns), "-d", f"{seconds}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv += ["-s", str(t.work / "report.lua"), f"http://{t.ip}:{port}/{WEB_FILE}"]
    return argv


def _keepalive_cases(t: Target, port: int) -> list[ClientCase]:
    argv = _wrk(t, port, 8, False, t.duration)
    return [ClientCase("c8", [ClientSpec("c8", argv, parse.wrk)])]


def _short_cases(t: Target, port: int) -> list[ClientCase]:
    argv = _wrk(t, port, 8, True, t.duration)
    return [ClientCase("c8", [ClientSpec("c8", argv, parse.wrk)])]


def _mix_cases(t: Target, port: int) -> list[ClientCase]:
    # Closed loops set the split by speed, not by request: 2 persistent against 4 one-shot
    # connections gives roughly one third of the requests on persistent connections (the
    # observed share is in the rows).
    long = _wrk(t, port, 2, False, t.duration)
    short = _wrk(t, port, 4, True, t.duration)
    return [
        ClientCase(
            "mix",
            [ClientSpec("long", long, parse.wrk), ClientSpec("short", short, parse.wrk)],
        )
    ]


def _crr_cases(t: Target, port: int) -> list[ClientCase]:
    exe = t.work / "sf-crr"
    argv = [str(exe), t.ip, str(port), str(t.duration), f"/{CRR_FILE}"]
    return [ClientCase("c1", [ClientSpec("c1", argv, parse.crr)])]


def _crr_prepare(work: Path) -> None:
    _nginx_prepare(work)
    built = crr.build(work)
    link = work / "sf-crr"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(built.name, link)


# -- sockperf -----------------------------------------------------------------------------


def _sockperf_server(t: Target, port: int) -> list[str]:
    return ["sockperf", "server", "--tcp", "-i", t.ip, "-p", str(port)]


def _rr_cases(t: Target, port: int) -> list[ClientCase]:
    log = t.raw.with_suffix(".sockperf.csv")
    argv = [
        "sockperf", "ping-pong", "--tcp",
        "-i", t.ip,
        "-p", str(port),
        "-m", "64",
        # Without --dontwarmup sockperf idles 2 s before every run; its own in-run warm-up
        # (the first ~0.4 s, switch included) still stays out of the measured part.
        "--dontwarmup",
        "-t", str(t.duration),
        "--full-rtt",
        "--full-log", str(log),
    ]  # fmt: skip

    def read(text: str) -> parse.ClientResult:
        try:
            full = log.read_text()
        except OSError:
            full = None
        return parse.sockperf(text, full)

    return [ClientCase("64B", [ClientSpec("64B", argv, read)])]


# -- iperf3 -------------------------------------------------------------------------------


def _iperf_server(t: Target, port: int) -> list[str]:
    return ["iperf3", "-s", "-B", t.ip, "-p", str(port)]


def _stream_cases(t: Target, port: int) -> list[ClientCase]:
    argv = ["iperf3", "-c", t.ip, "-p", str(port), "-t", str(t.duration), "-J"]
    return [ClientCase("single", [ClientSpec("single", argv, parse.iperf3)])]


# -- integrity: the torture pair, every byte checked, and which path carried it ---------------

# Streams of 0 to 400 KiB each way in chunks of up to 64 KiB, some with pauses: how many of their
# bytes still cross VXLAN shows how soon a switch lands in a stream's life.
INTEGRITY_MAX_BYTES = 400 * 1024
INTEGRITY_CONNECTIONS_PER_S = 40


def _torture_server(t: Target, port: int) -> list[str]:
    # It serves until the bench stops it: a server that exits after its last connection would
    # read as one that died during the run.
    return [
        sys.executable, "-m", "shuntflow.torture", "server",
        "--bind", t.ip,
        "--port", str(port),
        "--connections", str(1 << 30),
        "--timeout", str(24 * 3600),
    ]  # fmt: skip


def _integrity_cases(t: Target, port: int) -> list[ClientCase]:
    conns = max(20, INTEGRITY_CONNECTIONS_PER_S * t.duration)
    argv = [
        sys.executable, "-m", "shuntflow.torture", "client",
        "--host", t.ip,
        "--port", str(port),
        "--connections", str(conns),
        "--concurrency", "8",
        "--max-bytes", str(INTEGRITY_MAX_BYTES),
        "--timeout", str(max(120, 20 * t.duration)),
    ]  # fmt: skip
    return [ClientCase("c8", [ClientSpec("c8", argv, parse.torture)])]


WORKLOADS: dict[str, Workload] = {
    "kv-redis": Workload(
        "kv-redis", 6379, _redis_server, _redis_cases, ["redis-server", "redis-benchmark"]
    ),
    "kv-memcached": Workload(
        "kv-memcached", 11211, _memcached_server, _memcached_cases, ["memcached", "memcaslap"]
    ),
    "web-keepalive": Workload(
        "web-keepalive",
        8080,
        _nginx_server,
        _keepalive_cases,
        ["nginx", "wrk"],
        _nginx_prepare,
        nginx_conns_log,
    ),
    "web-short": Workload(
        "web-short",
        8080,
        _nginx_server,
        _short_cases,
        ["nginx", "wrk"],
        _nginx_prepare,
        nginx_conns_log,
    ),
    "rr": Workload("rr", 11111, _sockperf_server, _rr_cases, ["sockperf"]),
    "crr": Workload(
        "crr", 8080, _nginx_server, _crr_cases, ["nginx"], _crr_prepare, nginx_conns_log
    ),
    "mix": Workload(
        "mix", 8080, _nginx_server, _mix_cases, ["nginx", "wrk"], _nginx_prepare, nginx_conns_log
    ),
    "stream": Workload("stream", 5201, _iperf_server, _stream_cases, ["iperf3"]),
    "integrity": Workload("integrity", 7600, _torture_server, _integrity_cases),
}


def missing_tools(names: list[str]) -> dict[str, list[str]]:
    """Workload -> programs it needs that are not on PATH."""
    out: dict[str, list[str]] = {}
    for n in names:
        gone = [p for p in WORKLOADS[n].needs if shutil.which(p) is None]
        if gone:
            out[n] = gone
    return out


def prepare(names: list[str], work: Path) -> dict[str, str]:
    """Write configs and build what the workloads need; workload -> error for those that can't."""
    errors: dict[str, str] = {}
    for n in names:
        step = WORKLOADS[n].prepare
        if step is None:
            continue
        try:
            step(work)
        except (BenchError, OSError) as e:
            errors[n] = str(e)
    return errors
