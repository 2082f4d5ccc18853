"""All to all at scale: every container serves every remote container and connects to every
remote container at once, all under the library in shuntflow mode, every byte checked.

    shuntflow scale [--hosts 8] [--containers 8] [--prefix sf] [--threshold 16] [--out FILE]

On a testbed of H hosts x C containers (brought up if the prefix has none, removed afterwards)
each container runs one `python -m shuntflow.torture mesh` process: a checking server for the
clients of every container on another host, and a client that, once every server listens,
opens one connection to each of them at once: H*C * (H-1)*C connections in flight together
(3,584 at 8 x 8), each a pseudo-random stream both ways of --min-bytes..--max-bytes, written in
chunks of up to --max-chunk bytes with random pauses, so that it crosses the threshold and
lives long enough to switch while all the others switch too. Each end checks every byte it
reads and reads its socket's SO_NETNS_COOKIE at the end: the cookie of its host's namespace
means the connection ended on the host path.

Reported (and written to --out as JSON): connections and how many completed intact at both
ends, bytes checked, bad bytes (wrong, past the end or missing), connections switched (by the
client end's and the server end's cookie) in all and per ordered host pair, and each router's
RSS and fd count (its process and descendants, from /proc) before, at most during, and after
the run. The exit code is 0 only if every connection completed intact and every host pair
switched at least one connection.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from shuntflow import torture
from shuntflow.bench.routerload import footprint
from shuntflow.native import app_environment
from shuntflow.testbed import Container, Host, Testbed, build
from shuntflow.wire import Mode

STYLES = ("epoll", "epoll-et", "poll")


@dataclass(frozen=True)
class Params:
    threshold: int = 16
    port: int = 7800
    style: str = "epoll"
    min_bytes: int = 32 * 1024
    max_bytes: int = 64 * 1024
    max_chunk: int = 4096
    pause: float = 0.2  # chance of a pause after a chunk
    pause_max: float = 0.02  # seconds
    timeout: float = 900.0  # each process's hang bound
    sample_s: float = 1.0  # between router footprint samples during the run


def host_cookie(h: Host) -> int:
    """SO_NETNS_COOKIE of a socket made in host `h`'s namespace: what a switched connection
    reports."""
    return int(h.in_netns(torture.own_netns_cookie))


def _router_pids(tb: Testbed) -> dict[int, int]:
    pids = {}
    for h in tb.hosts:
        pid = build.router_pid(h)
        if pid is None or not build.router_alive(pid):
            raise RuntimeError(f"router of {h.netns} is not running")
        pids[h.index] = pid
    return pids


def mesh_argv(tb: Testbed, c: Container, p: Params, cookie: int) -> list[str]:
    peers = [o.overlay_ip for o in tb.containers if o.host_index != c.host_index]
    return [
        sys.executable,
        "-m",
        "shuntflow.torture",
        "mesh",
        "--bind",
        c.overlay_ip,
        "--port",
        str(p.port),
        "--peers",
        ",".join(peers),
        "--style",
        p.style,
        "--timeout",
        str(p.timeout),
        "--min-bytes",
        str(p.min_bytes),
        "--max-bytes",
        str(p.max_bytes),
        "--max-chunk",
        str(p.max_chunk),
        "--pause",
        str(p.pause),
        "--pause-max",
        str(p.pause_max),
        "--seed",
        str(1000 * c.host_index + c.index),
        "--host-cookie",
        str(cookie),
    ]


def _stop(procs: dict[str, subprocess.Popen[str]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
    for proc in procs.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def run(tb: Testbed, p: Params) -> dict[str, Any]:
    """One all-to-all run on a testbed with routers; returns every figure of the report."""
    if len(tb.hosts) < 2:
        raise ValueError("an all-to-all run needs at least 2 hosts")
    cookies = {h.index: host_cookie(h) for h in tb.hosts}
    routers = _router_pids(tb)
    logs = tb.run_dir / "scale"
    logs.mkdir(exist_ok=True)
    procs: dict[str, subprocess.Popen[str]] = {}
    errs: dict[str, IO[str]] = {}
    result: dict[str, Any] = {
        "params": asdict(p),
        "prefix": tb.prefix,
        "hosts": len(tb.hosts),
        "containers_per_host": len(tb.hosts[0].containers),
    }
    try:
        for c in tb.containers:
            env = app_environment(
                Mode.SHUNTFLOW, router_socket=tb.host(c).router_socket, threshold=p.threshold
            )
            errs[c.name] = open(logs / f"{c.name}.err", "w")  # noqa: SIM115 (closed below)
            procs[c.name] = c.popen(
                mesh_argv(tb, c, p, cookies[c.host_index]),
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errs[c.name],
                text=True,
            )
        for name, proc in procs.items():
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line or json.loads(line).get("listening") != p.port:
                raise RuntimeError(f"{name}: no listening line: {line!r}, see {logs}")
        before = {i: footprint(pid) for i, pid in routers.items()}
        t0 = time.monotonic()
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        peak = {i: dict(f) for i, f in before.items()}
        deadline = t0 + p.timeout + 60
        while any(proc.poll() is None for proc in procs.values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"mesh processes still running after {p.timeout + 60:g} s")
            for i, pid in routers.items():
                now = footprint(pid)
                peak[i] = {k: max(peak[i][k], now[k]) for k in now}
            time.sleep(p.sample_s)
        result["seconds"] = round(time.monotonic() - t0, 1)
        after = {i: footprint(pid) for i, pid in routers.items()}
        summaries: dict[str, dict[str, Any]] = {}
        for name, proc in procs.items():
            assert proc.stdout is not None
            lines = proc.stdout.read().strip().splitlines()
            if not lines:
                err = (logs / f"{name}.err").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name}: exit {proc.returncode}, no summary: {err}")
            summaries[name] = json.loads(lines[-1])
    finally:
        _stop(procs)
        for f in errs.values():
            f.close()
    result["routers"] = {
        i: {"pid": pid, "before": before[i], "max": peak[i], "after": after[i]}
        for i, pid in routers.items()
    }
    result.update(aggregate(tb, summaries))
    return result


def aggregate(tb: Testbed, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Totals over every mesh process, and per ordered host pair (client's host, server's)."""
    host_of = {c.overlay_ip: c.host_index for c in tb.containers}
    pairs: dict[str, dict[str, int]] = {
        f"{a.index}->{b.index}": {"connections": 0, "switched_client": 0, "switched_server": 0}
        for a in tb.hosts
        for b in tb.hosts
        if a.index != b.index
    }
    keys = (
        "connections",
        "ok",
        "bad",
        "missing",
        "switched",
        "cookie_errors",
        "waitall_short",
        "bytes",  # sent and received, by this end
        "received",
        "host_sent",  # written by calls made once the fd was the host connection
        "bad_bytes",
    )
    totals = {role: dict.fromkeys(keys, 0) for role in ("client", "server")}
    failures: list[Any] = []
    bad_headers = 0
    for name, s in summaries.items():
        me = tb.container(name).host_index
        bad_headers += s["bad_headers"]
        for role in ("client", "server"):
            for k in totals[role]:
                totals[role][k] += s[role][k]
            failures += [(name, role, f) for f in s[role]["failures"]]
        for peer, (n, switched, _bytes) in s["client"]["per_peer"].items():
            pair = pairs[f"{me}->{host_of[peer]}"]
            pair["connections"] += n
            pair["switched_client"] += switched
        for peer, (_n, switched, _bytes) in s["server"]["per_peer"].items():
            pairs[f"{host_of[peer]}->{me}"]["switched_server"] += switched
    n = len(tb.containers)
    expected = sum(
        len(h.containers) * (n - len(h.containers)) for h in tb.hosts
    )  # every container to every container on another host
    c, s = totals["client"], totals["server"]
    unproven = [k for k, v in pairs.items() if not (v["switched_client"] or v["switched_server"])]
    return {
        "expected_connections": expected,
        "totals": totals,
        "connections_completed": min(c["ok"], s["ok"]),
        "bytes_checked": c["received"] + s["received"],
        "bad_bytes": c["bad_bytes"] + s["bad_bytes"],
        "switched": {"client_end": c["switched"], "server_end": s["switched"]},
        "pairs": pairs,
        "pairs_without_switch": unproven,
        "bad_headers": bad_headers,
        "failures": failures[:10],
        "passed": (
            c["ok"] == s["ok"] == expected
            and c["missing"] == s["missing"] == 0
            and c["bad_bytes"] == s["bad_bytes"] == 0
            and bad_headers == 0
            and not unproven
        ),
    }


def summary(r: dict[str, Any]) -> str:
    c, s = r["totals"]["client"], r["totals"]["server"]
    pairs = r["pairs"]
    least = min(pairs.items(), key=lambda kv: kv[1]["switched_client"])
    lines = [
        f"all to all on testbed {r['prefix']}: {r['hosts']} hosts x {r['containers_per_host']} "
        f"containers, {r['expected_connections']} connections at once, threshold "
        f"{r['params']['threshold']}, {r['seconds']} s",
        f"  completed intact: {c['ok']} (client ends) / {s['ok']} (server ends) of "
        f"{r['expected_connections']}; missing {c['missing']} / {s['missing']}",
        f"  bytes checked {r['bytes_checked']}, bad bytes {r['bad_bytes']}",
        f"  switched (socket's namespace cookie is its host's): {c['switched']} client ends, "
        f"{s['switched']} server ends; per host pair min {least[1]['switched_client']} of "
        f"{least[1]['connections']} ({least[0]}), pairs without a switch: "
        f"{r['pairs_without_switch'] or 'none'}",
    ]
    for i, x in r["routers"].items():
        lines.append(
            f"  router h{i} pid {x['pid']}: RSS KiB {x['before']['rss_kib']} -> max "
            f"{x['max']['rss_kib']} -> {x['after']['rss_kib']}; fds {x['before']['fds']} -> max "
            f"{x['max']['fds']} -> {x['after']['fds']}"
        )
    for name, role, f in r["failures"]:
        lines.append(
            f"  failed: {name} {role} conn {f['conn_id']} peer {f['peer']}: {f['error']} "
            f"{f['cookie_error']}"
        )
    lines.append("  PASSED" if r["passed"] else "  FAILED")
    return "\n".join(lines)


def run_on(prefix: str, hosts: int, containers: int, p: Params, out: Path | None) -> dict[str, Any]:
    """`run` on testbed `prefix`, brought up with `hosts` x `containers` if it does not exist
    (and then removed afterwards); an existing one is used as it is."""
    made = not build.exists(prefix)
    t0 = time.monotonic()
    tb = (
        Testbed.up(prefix=prefix, hosts=hosts, containers=containers, routers=True)
        if made
        else Testbed.load(prefix)
    )
    up_s = round(time.monotonic() - t0, 1)
    try:
        result = run(tb, p)
    finally:
        if made:
            t0 = time.monotonic()
            tb.down()
            down_s: float | None = round(time.monotonic() - t0, 1)
        else:
            down_s = None
    result["testbed"] = {"brought_up": made, "up_s": up_s if made else None, "down_s": down_s}
    if out is not None:
        out.write_text(json.dumps(result, indent=2))
    return result
