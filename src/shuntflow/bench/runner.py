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

from shuntflow.bench import procs, workloads
from shuntflow.bench.metrics import Row
from shuntflow.bench.parse import ClientResult, ParseError, merge
from shuntflow.bench.spec import BenchConfig, BenchError, ModeSpec
from shuntflow.native import DEFAULT_THRESHOLD, LibraryMissing, app_environment
from shuntflow.router import control
from shuntflow.testbed import Testbed
from shuntflow.testbed.plan import Container, Host

SERVER_HOST, CLIENT_HOST = 2, 1
# Each measurement listens on the next port of its workload's range: servers that do not set
# SO_REUSEADDR (sockperf) cannot bind a port that still has TIME_WAIT connections.
PORT_SPAN = 64
# Grace on top of the expected client run time before a client counts as hung.
CLIENT_GRACE_S = 30.0


def clean_environment() -> None:
    """Drop any library settings of our own: tb.popen adds the mode's environment to ours."""
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

    @property
    def netns(self) -> str:
        return self.host.netns if self.mode.host_net else self.container.netns

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
        )

    def command(self, argv: list[str]) -> str:
        """The same process as a `shuntflow exec` line anyone can paste."""
        words = ["shuntflow", "exec", self.container.name, *self.mode.exec_flags()]
        cpu = _cpu_text(self.cpus)
        if cpu is not None:
            words += ["--cpu", cpu]
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

    def __post_init__(self) -> None:
        prefix = self.tb.prefix
        self.server_c = self.tb.container(f"{prefix}-h{SERVER_HOST}-c1")
        self.client_c = self.tb.container(f"{prefix}-h{CLIENT_HOST}-c1")
        self.work = self.out / "work"
        self.raw = self.out / "raw"
        status = self.tb.status()
        self.router_pids = [h["router_pid"] for h in status["hosts"] if h["router_alive"]]
        self.routers_up = bool(status["routers"]) and len(self.router_pids) == len(
            status["hosts"]
        )

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
        try:
            for rep, wl, pos, mode in steps:
                self.progress.step(f"rep {rep + 1}/{self.cfg.repetitions}  {wl}  {mode.name}")
                new = self.measure(workloads.WORKLOADS[wl], mode, rep, pos)
                self.rows.extend(new)
                self.on_rows(self.rows)
                self.progress.advance()
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
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
        )
        client = Side(
            "client",
            self.client_c,
            self.tb.host(self.client_c),
            mode,
            self.cfg.client_cpus,
        )
        return server, client

    def _row(self, wl: str, case: str, mode: ModeSpec, rep: int, pos: int, **kw: Any) -> Row:
        return Row(
            workload=wl,
            case=case,
            mode=mode.name,
            threshold=mode.sweep_threshold,
            repetition=rep,
            order=pos,
            placement=self.cfg.placement,
            started_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **kw,
        )

    def measure(self, wl: workloads.Workload, mode: ModeSpec, rep: int, pos: int) -> list[Row]:
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
        except (OSError, LibraryMissing, BenchError) as e:
            done = {r.case for r in rows}
            todo = [lbl for c in cases for lbl in _labels(c) if lbl not in done]
            rows += failed(f"{type(e).__name__}: {e}", todo)
        return rows

    @contextlib.contextmanager
    def _spawn(
        self, side: Side, argv: list[str], log: IO[bytes]
    ) -> Iterator[subprocess.Popen[bytes]]:
        proc = self.tb.popen(
            side.netns,
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
        for h in self.tb.hosts:
            try:
                st = control.query(Path(f"{h.router_socket}.ctl"), timeout=5.0)["router"]
                switches += int(st["switches_initiated"])
                failures += sum(
                    int(v) for k, v in dict(st.get("failures", {})).items() if "DUPLICATE" not in k
                )
            except (OSError, ValueError, KeyError, TypeError):
                ok = False
        try:
            vx_rx, vx_tx = self.tb.vxlan_counters(self.client_c.host_index)
            vxlan: int | None = vx_rx + vx_tx
        except Exception:  # netlink trouble must not cost the measurement
            vxlan = None
        return Snapshot(
            server_cpu_ns=procs.tree_oncpu_ns(server.pid),
            router_cpu_ns=procs.oncpu_ns(self.router_pids) if self.router_pids else None,
            switches=switches if ok else None,
            switch_failures=failures if ok else None,
            vxlan_bytes=vxlan,
        )

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
            return self._row(
                wl, lbl, mode, rep, pos, command=commands, processes=processes, **kw
            )

        if server.poll() is not None:
            return [row(lbl, error=f"server exited with code {server.returncode}") for lbl in
                    _labels(case)]  # fmt: skip

        files = []
        before = self.snapshot(server)
        t0 = time.monotonic()
        started: list[tuple[workloads.ClientSpec, subprocess.Popen[bytes], Path, Path]] = []
        try:
            for c in case.clients:
                stem = f"{base}-{case.name}-{c.label}".replace(" ", "_")
                out_path, err_path = self.raw / f"{stem}.out", self.raw / f"{stem}.err"
                out_f, err_f = out_path.open("wb"), err_path.open("wb")
                files += [out_f, err_f]
                p = self.tb.popen(
                    client_side.netns,
                    c.argv,
                    cpu=client_side.cpus,
                    env=client_side.env(),
                    stdin=subprocess.DEVNULL,
                    stdout=out_f,
                    stderr=err_f,
                    start_new_session=True,
                )
                self._live.append(p)
                started.append((c, p, out_path, err_path))
            reaped: list[tuple[int, float] | str] = []
            limit = t0 + self.cfg.duration * 4 + CLIENT_GRACE_S
            for _c, p, _o, _e in started:
                try:
                    reaped.append(procs.reap(p, max(0.0, limit - time.monotonic())))
                except procs.Timeout:
                    procs.kill_now(p)
                    reaped.append("client did not finish in time (killed)")
                self._live.remove(p)
        finally:
            for _c, p, _o, _e in started:
                if p in self._live:
                    procs.kill_now(p)
                    self._live.remove(p)
            for f in files:
                f.close()
        elapsed = time.monotonic() - t0
        after = self.snapshot(server)

        results: list[ClientResult | None] = []
        errors: list[str | None] = []
        for (c, _p, out_path, err_path), r in zip(started, reaped, strict=True):
            if isinstance(r, str):
                results.append(None)
                errors.append(r)
                continue
            code, _cpu = r
            try:
                res = c.parse(out_path.read_text(errors="replace"))
            except (ParseError, ValueError, KeyError, OSError) as e:
                why = f"exit code {code}" if code else str(e)
                results.append(None)
                errors.append(f"{c.argv[0]}: {why}; {_tail(err_path) or _tail(out_path)}")
                continue
            if res.requests <= 0:
                results.append(None)
                errors.append(f"{c.argv[0]}: no request completed; {_tail(err_path)}")
                continue
            results.append(res)
            errors.append(None)

        client_cpu_s = sum(r[1] for r in reaped if not isinstance(r, str))
        server_cpu_us = (after.server_cpu_ns - before.server_cpu_ns) / 1e3
        router_us = (
            (after.router_cpu_ns - before.router_cpu_ns) / 1e3
            if after.router_cpu_ns is not None and before.router_cpu_ns is not None
            else None
        )
        shared = {
            "switches": _delta(before.switches, after.switches),
            "switch_failures": _delta(before.switch_failures, after.switch_failures),
            "vxlan_bytes": _delta(before.vxlan_bytes, after.vxlan_bytes),
            "duration_s": round(elapsed, 3),
        }

        def from_result(lbl: str, res: ClientResult, cpu: bool, **kw: Any) -> Row:
            total_cpu = server_cpu_us + client_cpu_s * 1e6
            cpu_reqs = res.cpu_requests or res.requests
            return row(
                lbl,
                requests=res.requests,
                rps=res.rps,
                unit=res.unit,
                avg_us=res.avg_us,
                p50_us=res.p50_us,
                p99_us=res.p99_us,
                p999_us=res.p999_us,
                cpu_us_per_req=total_cpu / cpu_reqs if cpu and cpu_reqs else None,
                server_cpu_us=server_cpu_us if cpu else None,
                client_cpu_us=client_cpu_s * 1e6 if cpu else None,
                router_cpu_us_per_req=(
                    router_us / cpu_reqs if cpu and router_us is not None and cpu_reqs else None
                ),
                client_errors=res.errors,
                extra=res.extra,
                latency_cdf=res.cdf,
                **kw,
            )

        if len(case.clients) == 1:
            res, err = results[0], errors[0]
            if res is None:
                return [row(case.name, error=err, **shared)]
            return [from_result(case.name, res, True, **shared)]

        # Several clients at once: each alone (server CPU cannot be split between them), and
        # the combined stream of requests that the server saw.
        out: list[Row] = []
        for (c, *_), res, err in zip(started, results, errors, strict=True):
            if res is None:
                out.append(row(c.label, error=err))
            else:
                out.append(from_result(c.label, res, False, duration_s=shared["duration_s"]))
        if any(r is None for r in results):
            first = next(e for e in errors if e)
            out.append(row("combined", error=first, **shared))
        else:
            good = [r for r in results if r is not None]
            combined = merge(good, max(r.seconds for r in good))
            out.append(from_result("combined", combined, True, **shared))
            total = combined.requests
            for r, res in zip(out, good, strict=False):
                r.extra = {**r.extra, "share": res.requests / total if total else 0.0}
        return out


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
