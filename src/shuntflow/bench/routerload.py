"""The routers under load: many idle tracked connections and a steady churn of switches.

    python -m shuntflow.bench.routerload [--prefix fz1] [--idle 10000] [--rate 1000] \\
        [--switches 30000] [--threshold 4] [--sample-every 1000] [--warmup N] \\
        [--max-inflight N] [--until-switched] [--out FILE]

In testbed PREFIX (brought up with 2 hosts x 1 container if missing, and removed afterwards) the
server of routerload_app runs in <prefix>-h2-c1 and the client in <prefix>-h1-c1, both in
shuntflow mode with the real preload library and the testbed's real routers. The client holds
`--idle` idle connections while `--switches` new ones cross the threshold, get switched and close
at `--rate` per second. Printed (and written to --out as JSON): the number of tracked connections
the routers report, both routers' CPU (utime+stime from /proc over the churn) and RSS, switches
done and failed (client and routers; the refusals each router logged during the churn, by
event, status and detail), the rate the client started connections at, and switch latency: the
client's (threshold crossed -> its fd is a host socket, 1 ms polling), the routers' SWITCH_REQ
-> SWITCH_RES, and the libraries' own `switch_time_us` when the routers report it.

Footprint over the churn (`--sample-every N`): each time the client has seen another N
connections switched, each router's RSS (VmRSS) and open fds are read from /proc, summed over
the router's process and its descendants, so the samples mean the same whatever the router is
built from. Once `--warmup` connections have switched (default WARMUP_FRACTION of them) the
client lets those in flight finish and waits while the routers are sampled at rest: the
reference. The last sample is taken at rest too, after the churn. A router is called flat when
its last sample is within FLAT_RSS_KIB (or FLAT_RSS_FRACTION, the larger) and FLAT_FDS of the
reference: a leak of a few hundred bytes or one fd per switch would show as tens of MiB or
thousands of fds by 100,000 switches. `--until-switched` makes `--switches` the number of
connections seen switched, and `--max-inflight` small makes the churn a closed loop, so that
the run drives that many switches whatever the machine's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from shuntflow.native import app_environment
from shuntflow.router.control import query
from shuntflow.testbed import Testbed, build
from shuntflow.testbed.nodes import Host
from shuntflow.wire import Mode

# The bounds of "flat" (see the docstring): absolute, or relative to the reference sample's RSS,
# whichever is larger; fds move with the switches in flight and the peer pool's refills (4 warm
# connections per peer), so a few more at one sample than at another mean nothing.
FLAT_RSS_KIB = 4096
FLAT_RSS_FRACTION = 0.05
FLAT_FDS = 8
# The Python router keeps the last 16,384 samples of four timings (router/latency.py); the router
# that initiates fewer switches fills them only after ~33,000. A run's warm-up covers that.
WARMUP_FRACTION = 0.4
SYSCTLS = {"net.ipv4.tcp_tw_reuse": "1", "net.ipv4.ip_local_port_range": "1024 65000"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Params:
    idle: int = 10_000
    switches: int = 30_000
    rate: float = 1000.0
    threshold: int = 4
    port: int = 9100
    ports: int = 4
    switch_timeout: float = 5.0
    sample_every: int = 0  # switches between footprint samples; 0: only before and after
    warmup: int | None = None  # switches before the reference sample (None: WARMUP_FRACTION)
    max_inflight: int = 4000  # churn connections open at once (a small one: a closed loop)
    until_switched: bool = False  # `switches` counts connections switched, not started


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_split(pid: int) -> tuple[float, float]:
    """(main thread, all other threads) CPU seconds: the applications are single-threaded
    Python, so the other threads are the library's agent."""
    whole = cpu_seconds(pid)  # /proc/PID/stat counts every thread, task/PID/stat the main one
    stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    main = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return main, whole - main


def memory_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc (PPid of each process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def footprint(pid: int) -> dict[str, int]:
    """RSS (KiB) and open fds of `pid` and its descendants; a process that exits meanwhile
    counts for nothing."""
    rss = fds = 0
    for p in process_tree(pid):
        try:
            rss += memory_kib(p).get("VmRSS", 0)
            fds += fd_count(p)
        except OSError:
            continue
    return {"rss_kib": rss, "fds": fds}


def warmup_of(p: Params) -> int:
    return max(1, round(p.switches * WARMUP_FRACTION) if p.warmup is None else p.warmup)


def flatness(samples: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per router: the first sample, the reference (the first quiet one: the churn paused after
    the warm-up, nothing in flight), the last (quiet too: after the churn), the maxima, the
    growth from reference to last, and whether that is within the bounds."""
    out: dict[int, dict[str, Any]] = {}
    ref_sample = next(s for s in samples if s.get("quiet"))
    for i in samples[0]["routers"]:
        first, ref, last = (s["routers"][i] for s in (samples[0], ref_sample, samples[-1]))
        rss_growth = last["rss_kib"] - ref["rss_kib"]
        fd_growth = last["fds"] - ref["fds"]
        rss_bound = max(FLAT_RSS_KIB, round(FLAT_RSS_FRACTION * ref["rss_kib"]))
        out[i] = {
            "first": first,
            "reference": ref,
            "reference_at_switches": ref_sample["switched"],
            "last": last,
            "max_rss_kib": max(s["routers"][i]["rss_kib"] for s in samples),
            "max_fds": max(s["routers"][i]["fds"] for s in samples),
            "rss_growth_kib": rss_growth,
            "fd_growth": fd_growth,
            "rss_bound_kib": rss_bound,
            "fd_bound": FLAT_FDS,
            "flat": rss_growth <= rss_bound and fd_growth <= FLAT_FDS,
        }
    return out


# The router's log lines of a refused switch (its key=value format, router/logfmt.py): the event,
# then status= and detail= among the fields; a peer connection the router closed before reading
# its OFFER (peer_dropped) has a reason= instead.
REFUSAL_EVENTS = ("switch_failed", "offer_refused", "claim_denied", "peer_dropped")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def refusals(log: bytes) -> dict[str, int]:
    """Refusals in a stretch of a router's log, counted by "event status: detail"."""
    out: dict[str, int] = {}
    for line in log.decode(errors="replace").splitlines():
        fields: dict[str, str] = dict(_FIELD.findall(line))
        if fields.get("event") not in REFUSAL_EVENTS:
            continue
        detail = fields.get("detail", fields.get("reason", "")).strip('"')
        key = f"{fields['event']} {fields.get('status', '?')}: {detail}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _control(h: Host) -> Path:
    return h.router_socket.with_name(h.router_socket.name + ".ctl")


def _router_pid(h: Host) -> int:
    pid = build.router_pid(h)
    if pid is None or not build.router_alive(pid):
        raise RuntimeError(f"router of {h.netns} is not running")
    return pid


def _status(h: Host) -> dict[str, Any]:
    return query(_control(h), timeout=60)


def _tracked(status: dict[str, Any]) -> int:
    return sum(len(p["connections"]) for p in status["processes"])


def _line(stream: IO[str], proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    line = stream.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"{what}: no output (exit {proc.poll()}): {err[-2000:]}")
    obj: dict[str, Any] = json.loads(line)
    return obj


def tune(tb: Testbed) -> None:
    for node in [*tb.hosts, *tb.containers]:
        for key, value in SYSCTLS.items():
            node.run(["sysctl", "-q", "-w", f"{key}={value}"], check=True)


def run(tb: Testbed, p: Params) -> dict[str, Any]:
    """One load run on a testbed with routers; returns every figure of the report."""
    tune(tb)
    client_c, server_c = tb.hosts[0].containers[0], tb.hosts[1].containers[0]
    routers = {h.index: _router_pid(h) for h in tb.hosts[:2]}
    app = [sys.executable, "-m", "shuntflow.bench.routerload_app"]
    ports = ["--port", str(p.port), "--ports", str(p.ports)]
    nofile = str(p.idle * 2 + 16_384)

    def env(c: Any) -> dict[str, str]:
        return app_environment(
            Mode.SHUNTFLOW, router_socket=tb.host(c).router_socket, threshold=p.threshold
        )

    result: dict[str, Any] = {"params": p.__dict__, "prefix": tb.prefix}
    server = server_c.popen(
        [*app, "server", "--ip", server_c.overlay_ip, *ports, "--nofile", nofile],
        env=env(server_c),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client: subprocess.Popen[str] | None = None
    try:
        assert server.stdout is not None
        _line(server.stdout, server, "server")
        client = client_c.popen(
            [
                *app,
                "client",
                "--host",
                server_c.overlay_ip,
                *ports,
                "--idle",
                str(p.idle),
                "--switches",
                str(p.switches),
                "--rate",
                str(p.rate),
                "--threshold",
                str(p.threshold),
                "--switch-timeout",
                str(p.switch_timeout),
                "--progress-every",
                str(p.sample_every),
                "--max-inflight",
                str(p.max_inflight),
                "--quiet-at",
                str(warmup_of(p)),
                *(["--until-switched"] if p.until_switched else []),
            ],
            env=env(client_c),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None and client.stdin is not None
        result["idle_phase"] = _line(client.stdout, client, "client")
        before = {i: _status(h)["router"] for i, h in enumerate(tb.hosts[:2], 1)}
        result["tracked_before"] = {i: _tracked(_status(h)) for i, h in enumerate(tb.hosts[:2], 1)}
        log0 = {i: h.router_log.stat().st_size for i, h in enumerate(tb.hosts[:2], 1)}
        cpu0 = {i: cpu_seconds(pid) for i, pid in routers.items()}
        apps0 = {"client": thread_split(client.pid), "server": thread_split(server.pid)}
        mem0 = {i: memory_kib(pid) for i, pid in routers.items()}
        t0 = time.monotonic()

        def sample(switched: int) -> dict[str, Any]:
            return {
                "switched": switched,
                "t_s": round(time.monotonic() - t0, 3),
                "routers": {i: footprint(pid) for i, pid in routers.items()},
            }

        samples = [sample(0)]
        client.stdin.write("go\n")
        client.stdin.flush()
        while True:
            msg = _line(client.stdout, client, "client")
            if msg.get("phase") == "progress":
                samples.append(sample(int(msg["switched"])))
            elif msg.get("phase") == "quiet":
                result["reference"] = sample(int(msg["switched"])) | {"quiet": True}
                samples.append(result["reference"])
                client.stdin.write("on\n")
                client.stdin.flush()
            else:
                break
        result["churn"] = msg
        wall = time.monotonic() - t0
        samples.append(sample(int(msg["switched"])) | {"quiet": True})
        result["samples"] = samples
        result["footprint"] = flatness(samples)
        cpu1 = {i: cpu_seconds(pid) for i, pid in routers.items()}
        apps1 = {"client": thread_split(client.pid), "server": thread_split(server.pid)}
        result["apps_cpu_percent"] = {
            name: {
                "application": round(100 * (apps1[name][0] - apps0[name][0]) / wall, 1),
                "library_agent": round(100 * (apps1[name][1] - apps0[name][1]) / wall, 1),
            }
            for name in apps0
        }
        mem1 = {i: memory_kib(pid) for i, pid in routers.items()}
        after_status = {i: _status(h) for i, h in enumerate(tb.hosts[:2], 1)}
        logged = {}
        for i, h in enumerate(tb.hosts[:2], 1):
            with open(h.router_log, "rb") as f:
                f.seek(log0[i])
                logged[i] = refusals(f.read())
        result["tracked_after"] = {i: _tracked(s) for i, s in after_status.items()}
        client.stdin.write("end\n")
        client.stdin.flush()
        client.wait(60)
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    out, _err = server.communicate()
    result["server"] = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    switched = result["churn"]["switched"]
    result["routers"] = {}
    for i, pid in routers.items():
        info = after_status[i]["router"]
        b = before[i]
        cpu = cpu1[i] - cpu0[i]
        failures = {
            k: v - b["failures"].get(k, 0)
            for k, v in info["failures"].items()
            if v - b["failures"].get(k, 0)
        }
        result["routers"][i] = {
            "pid": pid,
            "cpu_s": round(cpu, 3),
            "cpu_percent": round(100 * cpu / wall, 1),
            "cpu_us_per_switch": round(cpu * 1e6 / switched) if switched else None,
            "rss_kib_before": mem0[i]["VmRSS"],
            "rss_kib_after": mem1[i]["VmRSS"],
            "rss_kib_peak": mem1[i]["VmHWM"],
            "fds": fd_count(pid),
            "switches_initiated": info["switches_initiated"] - b["switches_initiated"],
            "switches_accepted": info["switches_accepted"] - b["switches_accepted"],
            "failures": failures,
            "refusals_logged": logged[i],
            "handoffs_lost": info["handoffs_lost"] - b["handoffs_lost"],
            "switch_req_res_us": info.get("switch_req_res_us"),
            "switch_time_us": info.get("switch_time_us"),
        }
    result["churn_wall_s"] = round(wall, 3)
    return result


def summary(r: dict[str, Any]) -> str:
    c = r["churn"]
    lines = [
        f"router load on testbed {r['prefix']}: {r['idle_phase']['idle']} idle connections "
        f"(routers see {r['tracked_before']} tracked), {c['started']} churn connections "
        f"at target {r['params']['rate']:g}/s over {c['seconds']} s",
        f"  client: switched {c['switched']}, stayed on the overlay (timeout) {c['timed_out']} "
        f"({c['timed_out_reused']} of them reused a 4-tuple switched < 10 s before; "
        f"{c['reused_tuples']} reuses in all), "
        f"errors {c['errors']} {c['error_kinds'] or ''}; started at {c['start_rate']}/s, "
        f"switched {c['rate']}/s over the whole churn (its tail waits out the timeouts); "
        f"idle still open {c['idle_still_open']}",
        f"  CPU % of the applications' main threads and libraries' agents: {r['apps_cpu_percent']}",
        f"  client latency threshold->host fd (us; polled every "
        f"{c['latency_us']['resolution_us'][0]} us for 20 ms, then every "
        f"{c['latency_us']['resolution_us'][1]} us): "
        f"p50 {c['latency_us']['p50']} p99 {c['latency_us']['p99']} max {c['latency_us']['max']}",
    ]
    for i, x in r["routers"].items():
        lines.append(
            f"  router h{i} pid {x['pid']}: CPU {x['cpu_s']} s ({x['cpu_percent']} %, "
            f"{x['cpu_us_per_switch']} us/switch), RSS {x['rss_kib_before']} -> "
            f"{x['rss_kib_after']} KiB (peak {x['rss_kib_peak']}), fds {x['fds']}, "
            f"initiated {x['switches_initiated']} accepted {x['switches_accepted']}, "
            f"failures {x['failures']}, handoffs lost {x['handoffs_lost']}"
        )
        for why, n in x["refusals_logged"].items():
            lines.append(f"    logged {n} x {why}")
        lines.append(f"    SWITCH_REQ->SWITCH_RES us (recent): {x['switch_req_res_us']}")
        if x["switch_time_us"] is not None:
            lines.append(f"    libraries' switch_time_us: {x['switch_time_us']}")
    for i, f in r.get("footprint", {}).items():
        lines.append(
            f"  router h{i} footprint over {len(r['samples'])} samples: RSS KiB first "
            f"{f['first']['rss_kib']}, at {f['reference_at_switches']} switches "
            f"{f['reference']['rss_kib']}, last {f['last']['rss_kib']}, max {f['max_rss_kib']} "
            f"(growth {f['rss_growth_kib']}, bound {f['rss_bound_kib']}); fds first "
            f"{f['first']['fds']}, reference {f['reference']['fds']}, last {f['last']['fds']}, "
            f"max {f['max_fds']} (growth {f['fd_growth']}, bound {f['fd_bound']}): "
            + ("flat" if f["flat"] else "NOT FLAT")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shuntflow.bench.routerload")
    ap.add_argument("--prefix", default="fz1")
    ap.add_argument("--idle", type=int, default=Params.idle)
    ap.add_argument("--switches", type=int, default=Params.switches)
    ap.add_argument("--rate", type=float, default=Params.rate)
    ap.add_argument("--threshold", type=int, default=Params.threshold)
    ap.add_argument("--port", type=int, default=Params.port)
    ap.add_argument("--switch-timeout", type=float, default=Params.switch_timeout)
    ap.add_argument(
        "--sample-every", type=int, default=Params.sample_every, help="switches per sample"
    )
    ap.add_argument("--warmup", type=int, help="switches before the reference sample")
    ap.add_argument("--max-inflight", type=int, default=Params.max_inflight)
    ap.add_argument(
        "--until-switched",
        action="store_true",
        help="--switches counts connections switched (the churn goes on until then)",
    )
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    params = Params(
        idle=a.idle,
        switches=a.switches,
        rate=a.rate,
        threshold=a.threshold,
        port=a.port,
        switch_timeout=a.switch_timeout,
        sample_every=a.sample_every,
        warmup=a.warmup,
        max_inflight=a.max_inflight,
        until_switched=a.until_switched,
    )
    made = not build.exists(a.prefix)
    tb = (
        Testbed.up(prefix=a.prefix, hosts=2, containers=1, routers=True)
        if made
        else Testbed.load(a.prefix)
    )
    try:
        result = run(tb, params)
    finally:
        if made:
            tb.down()
    print(summary(result))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return 0 if all(f["flat"] for f in result["footprint"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
