"""Runs the comparison: every repetition runs every workload in every mode, modes rotated.

One measurement = start the server in its namespace with the mode's environment, wait until
it listens, take a snapshot (server on-CPU time, routers' switch counters and on-CPU time,
VXLAN bytes), run the client(s) to completion, snapshot again, stop the server by PID.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from shuntflow.bench import parse, procs, workloads
from shuntflow.bench.metrics import Row
from shuntflow.bench.parse import ClientResult, ParseError, merge
from shuntflow.bench.spec import BenchConfig, BenchError, ModeSpec
from shuntflow.native import DEFAULT_THRESHOLD, LibraryMissing, app_environment
from shuntflow.router import control
from shuntflow.router.latency import percentile
from shuntflow.testbed import Testbed
from shuntflow.testbed.nodes import Container, Host, Node

SERVER_HOST, CLIENT_HOST = 2, 1
# Each measurement listens on the next port of its workload's range: servers that do not set
# SO_REUSEADDR (sockperf) cannot bind a port that still has TIME_WAIT connections.
PORT_SPAN = 64
# A client that runs past twice its duration plus this is hung (sockperf alone idles 2 s
# before it starts); the limit is short because a hang costs the run this much time.
CLIENT_GRACE_S = 8.0


def clean_environment() -> None:
    """Drop any library settings of our own: popen adds the mode's environment to ours."""
    for key in [k for k in os.environ if k.startswith("SHUNTFLOW_") and k != "SHUNTFLOW_LIBRARY"]:
        del os.environ[key]
    preload = [p for p in os.environ.get("LD_PRELOAD", "").split() if "libshuntflow" not in p]
    if preload:
        os.environ["LD_PRELOAD"] = " ".join(preload)
    else:
        os.environ.pop("LD_PRELOAD", None)


def _cpu_text(cpus: set[int] | None) -> str | None:
    return ",".join(str(c) for c in sorted(cpus)) if cpus is not None else None


@dataclass
class Side:
    """One end (server or client) of a measurement in one mode."""

    role: str
    container: Container
    host: Host
    mode: ModeSpec
    cpus: set[int] | None
    agent_cpus: set[int] | None = None

    @property
    def node(self) -> Node:
        """Where its programs run: the host's namespace in a host-network mode, else the
        container's."""
        return self.host if self.mode.host_net else self.container

    @property
    def netns(self) -> str:
        return self.node.netns

    @property
    def ip(self) -> str:
        return self.host.underlay_ip if self.mode.host_net else self.container.overlay_ip

    def env(self) -> dict[str, str]:
        if self.mode.library is None:
            return {}
        return app_environment(
            self.mode.library,
            router_socket=self.host.router_socket,
            threshold=self.mode.threshold or DEFAULT_THRESHOLD,
            agent_cpus=self._agent_cpus(),
        )

    def _agent_cpus(self) -> str | None:
        return _cpu_text(self.agent_cpus) if self.mode.library is not None else None

    def command(self, argv: list[str]) -> str:
        """The same process as a `shuntflow exec` line anyone can paste."""
        words = ["shuntflow", "exec", self.container.name, *self.mode.exec_flags()]
        cpu = _cpu_text(self.cpus)
        if cpu is not None:
            words += ["--cpu", cpu]
        agent = self._agent_cpus()
        if agent is not None:
            words += ["--agent-cpus", agent]
        return shlex.join([*words, "--", *argv])

    def describe(self, argv: list[str]) -> dict[str, Any]:
        return {
            "role": self.role,
            "netns": self.netns,
            "cpus": _cpu_text(self.cpus),
            "env": self.env(),
            "argv": argv,
        }


@dataclass
class Snapshot:
    server_cpu_ns: int
    router_cpu_ns: int | None
    switches: int | None
    switch_failures: int | None
    vxlan_bytes: int | None
    switch_index: dict[int, int]  # per host: the index its router gives the next switch time
    calls_index: dict[int, int]  # the same for the longest data call of a switch end


@dataclass
class Progress:
    """What the runner tells whoever shows progress; the CLI plugs rich into it."""

    start: Callable[[int], None] = lambda total: None
    step: Callable[[str], None] = lambda text: None
    advance: Callable[[], None] = lambda: None


@dataclass
class Runner:
    cfg: BenchConfig
    tb: Testbed
    out: Path
    on_rows: Callable[[list[Row]], None] = lambda rows: None
    progress: Progress = field(default_factory=Progress)
    rows: list[Row] = field(default_factory=list)
    interrupted: bool = False
    prepare_errors: dict[str, str] = field(default_factory=dict)
    _live: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _seq: int = 0
    _started_at: str = ""

    def __post_init__(self) -> None:
        prefix = self.tb.prefix
        self.server_c = self.tb.container(f"{prefix}-h{SERVER_HOST}-c1")
        self.client_c = self.tb.container(f"{prefix}-h{CLIENT_HOST}-c1")
        self.work = self.out / "work"
        self.raw = self.out / "raw"
        status = self.tb.status()
        self.router_pid_of = {
            int(h["index"]): int(h["router_pid"]) for h in status["hosts"] if h["router_alive"]
        }
        self.router_pids = list(self.router_pid_of.values())
        self.routers_up = bool(status["routers"]) and len(self.router_pids) == len(status["hosts"])

    # -- the plan -------------------------------------------------------------------------

    def plan(self) -> list[tuple[int, str, int, ModeSpec]]:
        """(repetition, workload, position, mode): A B C D, then B C D A, ..."""
        modes = self.cfg.modes
        steps = []
        for rep in range(self.cfg.repetitions):
            k = rep % len(modes)
            rotated = modes[k:] + modes[:k]
            for wl in self.cfg.workloads:
                for pos, mode in enumerate(rotated):
                    steps.append((rep, wl, pos, mode))
        return steps

    def run(self) -> list[Row]:
        self.work.mkdir(parents=True, exist_ok=True)
        self.raw.mkdir(parents=True, exist_ok=True)
        clean_environment()
        missing = workloads.missing_tools(self.cfg.workloads)
        self.prepare_errors = {
            wl: f"not installed: {', '.join(tools)}" for wl, tools in missing.items()
        }
        ready = [w for w in self.cfg.workloads if w not in self.prepare_errors]
        self.prepare_errors.update(workloads.prepare(ready, self.work))
        steps = self.plan()
        self.progress.start(len(steps))
        unpin = procs.pin(self.router_pids, self.cfg.infra_cpus)
        try:
            for rep, wl, pos, mode in steps:
                procs.check_stop()
                self.progress.step(f"rep {rep + 1}/{self.cfg.repetitions}  {wl}  {mode.name}")
                new = self.measure(workloads.WORKLOADS[wl], mode, rep, pos)
                self.rows.extend(new)
                self.on_rows(self.rows)
                self.progress.advance()
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            unpin()
            for p in self._live:
                procs.kill_now(p)
            self._live.clear()
        return self.rows

    # -- one measurement ------------------------------------------------------------------

    def sides(self, mode: ModeSpec) -> tuple[Side, Side]:
        server = Side(
            "server",
            self.server_c,
            self.tb.host(self.server_c),
            mode,
            self.cfg.server_cpus,
            self.cfg.infra_cpus,
        )
        client = Side(
            "client",
            self.client_c,
            self.tb.host(self.client_c),
            mode,
            self.cfg.client_cpus,
            self.cfg.infra_cpus,
        )
        return server, client

    def _row(self, wl: str, case: str, mode: ModeSpec, rep: int, pos: int, **kw: Any) -> Row:
        kw.setdefault("started_at", self._started_at)
        return Row(
            workload=wl,
            case=case,
            mode=mode.name,
            threshold=mode.sweep_threshold,
            repetition=rep,
            order=pos,
            placement=self.cfg.placement,
            **kw,
        )

    def measure(self, wl: workloads.Workload, mode: ModeSpec, rep: int, pos: int) -> list[Row]:
        self._started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        server_side, client_side = self.sides(mode)
        base = f"{wl.name}-{mode.name.replace('@', '_t')}-r{rep}"
        target = workloads.Target(
            ip=server_side.ip,
            work=self.work,
            raw=self.raw / base,
            duration=self.cfg.duration,
            quick=self.cfg.quick,
        )
        self._seq += 1
        port = wl.port + self._seq % PORT_SPAN
        cases = wl.cases(target, port)

        def failed(message: str, only: list[str] | None = None) -> list[Row]:
            out = []
            for case in cases:
                for lbl in _labels(case):
                    if only is None or lbl in only:
                        out.append(self._row(wl.name, lbl, mode, rep, pos, error=message))
            return out

        if wl.name in self.prepare_errors:
            return failed(self.prepare_errors[wl.name])
        if mode.library is not None and not self.routers_up:
            return failed("testbed has no running routers; library modes need them")
        try:
            server_argv = wl.server(target, port)
            server_log = (self.raw / f"{base}-server.log").open("wb")
        except (OSError, LibraryMissing) as e:
            return failed(f"cannot prepare the server: {e}")
        rows: list[Row] = []
        workers: set[int] = set()
        try:
            with server_log, self._spawn(server_side, server_argv, server_log) as server:
                try:
                    procs.wait_listening(server, port)
                except RuntimeError as e:
                    return failed(f"{e}; {_tail(self.raw / f'{base}-server.log')}")
                for case in cases:
                    rows += self.run_case(
                        wl.name, case, mode, rep, pos, base, server, server_side,
                        client_side, server_argv,
                    )  # fmt: skip
                # Taken after the clients: the workers may fork after the port listens.
                workers = procs.descendants(server.pid) - {server.pid}
        except (OSError, LibraryMissing, BenchError, RuntimeError, ValueError) as e:
            # Anything one measurement trips over costs that measurement, not the run.
            done = {r.case for r in rows}
            todo = [lbl for c in cases for lbl in _labels(c) if lbl not in done]
            rows += failed(f"bench: {type(e).__name__}: {e}", todo)
        if wl.conns_log is not None:
            _add_worker_connections(wl.conns_log(target), workers, cases, rows)
        return rows

    @contextlib.contextmanager
    def _spawn(
        self, side: Side, argv: list[str], log: IO[bytes]
    ) -> Iterator[subprocess.Popen[bytes]]:
        proc = side.node.popen(
            argv,
            cpu=side.cpus,
            env=side.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._live.append(proc)
        try:
            yield proc
        finally:
            procs.stop(proc)
            self._live.remove(proc)

    def snapshot(self, server: subprocess.Popen[bytes]) -> Snapshot:
        switches = failures = 0
        ok = True
        index: dict[int, int] = {}
        calls_index: dict[int, int] = {}
        for h in self.tb.hosts:
            try:
                st = control.query(Path(f"{h.router_socket}.ctl"), timeout=5.0)["router"]
                index[h.index] = int(st["switch_time_us"]["count"])
                calls_index[h.index] = int(st["switch_call_max_us"]["count"])
                switches += int(st["switches_initiated"])
                failures += sum(
                    int(v) for k, v in dict(st.get("failures", {})).items() if "DUPLICATE" not in k
                )
            except (OSError, ValueError, KeyError, TypeError):
                ok = False
        vxlan = self._vxlan_bytes()
        return Snapshot(
            server_cpu_ns=procs.tree_oncpu_ns(server.pid),
            router_cpu_ns=procs.oncpu_ns(self.router_pids) if self.router_pids else None,
            switches=switches if ok else None,
            switch_failures=failures if ok else None,
            vxlan_bytes=vxlan,
            switch_index=index,
            calls_index=calls_index,
        )

    def switch_samples(self, cmd: str, since: dict[int, int]) -> list[int]:
        """The samples (µs) the routers were told about since the snapshot `since`: switch
        times (cmd "switch_times") or each switch end's longest data call ("switch_calls")."""
        samples: list[int] = []
        for h in self.tb.hosts:
            if h.index not in since:
                continue
            try:
                got = control.query(Path(f"{h.router_socket}.ctl"), cmd, 5.0, since=since[h.index])
                samples += [int(x) for x in got["samples"]]
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return samples

    def _vxlan_bytes(self) -> int | None:
        """Bytes through the client host's VXLAN device: all the pair's overlay traffic."""
        host = self.tb.host(self.client_c)
        pid = self.router_pid_of.get(host.index)
        if pid is not None:
            return procs.netdev_bytes(pid, host.vxlan_dev)
        try:
            rx, tx = self.tb.vxlan_counters(host.index)
        except Exception:  # netlink trouble must not cost the measurement
            return None
        return rx + tx

    def run_case(
        self,
        wl: str,
        case: workloads.ClientCase,
        mode: ModeSpec,
        rep: int,
        pos: int,
        base: str,
        server: subprocess.Popen[bytes],
        server_side: Side,
        client_side: Side,
        server_argv: list[str],
    ) -> list[Row]:
        commands = [server_side.command(server_argv)] + [
            client_side.command(c.argv) for c in case.clients
        ]
        processes = [server_side.describe(server_argv)] + [
            client_side.describe(c.argv) for c in case.clients
        ]

        def row(lbl: str, **kw: Any) -> Row:
            return self._row(wl, lbl, mode, rep, pos, command=commands, processes=processes, **kw)

        if server.poll() is not None:
            message = f"server exited with code {server.returncode}"
            return [row(lbl, error=message) for lbl in _labels(case)]

        before = self.snapshot(server)
        t0 = time.monotonic()
        runs = self._run_clients(case, client_side, f"{base}-{case.name}")
        elapsed = time.monotonic() - t0
        died = server.poll()
        after = self.snapshot(server)

        results = [_read(run) for run in runs]
        if died is not None:
            # The client's complaint (refused, reset) is a consequence; say what caused it.
            results = [
                f"server exited with code {died} during the run; {r}" if isinstance(r, str) else r
                for r in results
            ]
        client_cpu_s = sum(run.cpu_s for run in runs)
        server_cpu_us = (after.server_cpu_ns - before.server_cpu_ns) / 1e3
        router_us = (
            (after.router_cpu_ns - before.router_cpu_ns) / 1e3
            if after.router_cpu_ns is not None and before.router_cpu_ns is not None
            else None
        )
        times = sorted(self.switch_samples("switch_times", before.switch_index))
        call_max = self.switch_samples("switch_calls", before.calls_index)
        shared: dict[str, Any] = {
            "switch_p50_us": percentile(times, 50) if times else None,
            "switch_p99_us": percentile(times, 99) if times else None,
            "switch_call_max_us": max(call_max) if call_max else None,
            "switches": _delta(before.switches, after.switches),
            "switch_failures": _delta(before.switch_failures, after.switch_failures),
            "vxlan_bytes": _delta(before.vxlan_bytes, after.vxlan_bytes),
            "duration_s": round(elapsed, 3),
        }

        def measured(lbl: str, res: ClientResult, with_cpu: bool, **kw: Any) -> Row:
            cpu_reqs = res.cpu_requests or res.requests
            total_us = server_cpu_us + client_cpu_s * 1e6
            return row(
                lbl,
                requests=res.requests,
                rps=res.rps,
                unit=res.unit,
                avg_us=res.avg_us,
                p50_us=res.p50_us,
                p99_us=res.p99_us,
                p999_us=res.p999_us,
                cpu_us_per_req=total_us / cpu_reqs if with_cpu and cpu_reqs else None,
                server_cpu_us=server_cpu_us if with_cpu else None,
                client_cpu_us=client_cpu_s * 1e6 if with_cpu else None,
                router_cpu_us_per_req=(
                    router_us / cpu_reqs
                    if with_cpu and router_us is not None and cpu_reqs
                    else None
                ),
                client_errors=res.errors,
                extra=res.extra,
                latency_cdf=res.cdf,
                **kw,
            )

        if len(case.clients) == 1:
            only = results[0]
            if isinstance(only, str):
                return [row(case.name, error=only, **shared)]
            return [measured(case.name, only, True, **shared)]

        # Several clients at once: a row for each alone (the server's CPU time cannot be split
        # between them), and one for the combined stream of requests the server saw.
        out: list[Row] = []
        for c, r in zip(case.clients, results, strict=True):
            if isinstance(r, str):
                out.append(row(c.label, error=r))
            else:
                out.append(measured(c.label, r, False, duration_s=shared["duration_s"]))
        good = [r for r in results if not isinstance(r, str)]
        bad = [r for r in results if isinstance(r, str)]
        if bad:
            out.append(row("combined", error=bad[0], **shared))
            return out
        combined = merge(good, max(g.seconds for g in good))
        for part_row, part in zip(out, good, strict=True):
            share = part.requests / combined.requests if combined.requests else 0.0
            part_row.extra = {**part_row.extra, "share": round(share, 4)}
        out.append(measured("combined", combined, True, **shared))
        return out

    def _run_clients(self, case: workloads.ClientCase, side: Side, stem: str) -> list[ClientRun]:
        """Start every client of the case at once, reap them all (killing any that hang)."""
        runs: list[ClientRun] = []
        files: list[IO[bytes]] = []
        try:
            for c in case.clients:
                name = f"{stem}-{c.label}".replace(" ", "_")
                run = ClientRun(c, self.raw / f"{name}.out", self.raw / f"{name}.err")
                out_f, err_f = run.out.open("wb"), run.err.open("wb")
                files += [out_f, err_f]
                run.proc = side.node.popen(
                    c.argv,
                    cpu=side.cpus,
                    env=side.env(),
                    stdin=subprocess.DEVNULL,
                    stdout=out_f,
                    stderr=err_f,
                    start_new_session=True,
                )
                self._live.append(run.proc)
                runs.append(run)
            limit = time.monotonic() + self.cfg.duration * 2 + CLIENT_GRACE_S
            for run in runs:
                assert run.proc is not None
                try:
                    run.code, run.cpu_s = procs.reap(run.proc, max(0.0, limit - time.monotonic()))
                except procs.Timeout:
                    procs.kill_now(run.proc)
                    limit_s = self.cfg.duration * 2 + CLIENT_GRACE_S
                    run.hung = f"client still running after {limit_s:.0f} s (hung; killed)"
        finally:
            for run in runs:
                if run.proc is not None and run.proc in self._live:
                    if run.proc.returncode is None:
                        procs.kill_now(run.proc)
                    self._live.remove(run.proc)
            for f in files:
                f.close()
        return runs


@dataclass
class ClientRun:
    spec: workloads.ClientSpec
    out: Path
    err: Path
    proc: subprocess.Popen[bytes] | None = None
    code: int | None = None
    cpu_s: float = 0.0
    hung: str | None = None


def _read(run: ClientRun) -> ClientResult | str:
    """The client's result, or why there is none."""
    tool = run.spec.argv[0].rsplit("/", 1)[-1]
    if run.hung:
        return run.hung
    try:
        res = run.spec.parse(run.out.read_text(errors="replace"))
    except (ParseError, ValueError, KeyError, OSError) as e:
        why = f"exit code {run.code}" if run.code else str(e)
        return f"{tool}: {why}; {_tail(run.err) or _tail(run.out)}"
    if res.requests <= 0:
        return f"{tool}: no request completed; {_tail(run.err) or _tail(run.out)}"
    return res


def _add_worker_connections(
    log: Path, workers: set[int], cases: list[workloads.ClientCase], rows: list[Row]
) -> None:
    """Put the connections each worker served into the rows that stand for the whole server
    run (a case's only row, or its combined row), read once the server has exited: the
    server writes its log when it exits. No log (the server never started), no count."""
    try:
        counts = parse.worker_connections(log.read_text(), workers)
    except (OSError, ParseError):
        return
    whole = {_labels(c)[-1] for c in cases}
    for r in rows:
        if r.case in whole:
            r.worker_connections = counts


def _labels(case: workloads.ClientCase) -> list[str]:
    if len(case.clients) == 1:
        return [case.name]
    return [c.label for c in case.clients] + ["combined"]


def _delta(a: int | None, b: int | None) -> int | None:
    return b - a if a is not None and b is not None else None


def _tail(path: Path, limit: int = 300) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[-limit:]
