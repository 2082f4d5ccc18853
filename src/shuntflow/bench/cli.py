"""`shuntflow bench` and `shuntflow demo`.

Option values are taken as text and checked by bench.spec, so every bad value gives one
error line and exit code 2, as the testbed's commands do.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn

import typer

from shuntflow.bench import procs
from shuntflow.bench.metrics import Row
from shuntflow.bench.spec import (
    FULL_DURATION,
    FULL_REPETITIONS,
    MAX_DURATION,
    MAX_REPETITIONS,
    PLACEMENTS,
    QUICK_DURATION,
    QUICK_REPETITIONS,
    SWEEP_THRESHOLDS,
    WORKLOADS,
    BenchConfig,
    BenchError,
    BenchUsageError,
    parse_modes,
    parse_positive,
    parse_workloads,
    placement_cpus,
)
from shuntflow.native import MAX_THRESHOLD
from shuntflow.testbed.plan import DEFAULT_PREFIX, TestbedError, TestbedUsageError, validate_prefix


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"shuntflow: error: {message}", err=True)
    raise typer.Exit(code)


@dataclass
class Outcome:
    out: Path
    rows: list[Row] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    interrupted: bool = False
    markdown: str = ""

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]


def build_config(
    workload: str | None,
    modes: str | None,
    thresholds: str | None,
    repetitions: str | None,
    duration: str | None,
    placement: str,
    quick: bool,
    prefix: str,
) -> BenchConfig:
    try:
        validate_prefix(prefix)
    except TestbedUsageError as e:
        raise BenchUsageError(str(e)) from None
    if thresholds is None and modes is None and not quick:
        # A full default run is the complete comparison, the threshold sweep included.
        thresholds = ",".join(str(t) for t in SWEEP_THRESHOLDS)
    placement_cpus(placement)
    reps = (
        parse_positive("--repetitions", repetitions, MAX_REPETITIONS)
        if repetitions is not None
        else (QUICK_REPETITIONS if quick else FULL_REPETITIONS)
    )
    secs = (
        parse_positive("--duration", duration, MAX_DURATION)
        if duration is not None
        else (QUICK_DURATION if quick else FULL_DURATION)
    )
    return BenchConfig(
        workloads=parse_workloads(workload, quick),
        modes=parse_modes(modes, thresholds),
        repetitions=reps,
        duration=secs,
        placement=placement,
        quick=quick,
        prefix=prefix,
    )


def _default_out() -> Path:
    return Path("results") / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP stop the run at the next wait: clean up, keep what was
    measured. A second signal raises at once.

    The first signal only sets a flag that the runner checks in each of its waits, so nothing
    is interrupted half-way (writing results.json, starting a process): an exception raised
    from a handler may even be swallowed when it lands in fork's after-fork hooks. And only
    in this process: pyroute2 (under the testbed API) forks short-lived helpers that inherit
    the handler and get SIGTERM from their parent; such a copy just exits.
    """
    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        if procs.STOP.is_set():
            raise KeyboardInterrupt
        procs.STOP.set()

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, handler) for s in sigs}
    procs.STOP.clear()
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def testbed_for(prefix: str) -> Iterator[tuple[Any, bool]]:
    """(testbed, made_here): an existing testbed is used as it is and left up."""
    from shuntflow.testbed import Testbed, build

    if build.exists(prefix):
        yield Testbed.load(prefix), False
        return
    typer.echo(f"bench: no testbed {prefix!r}; bringing one up (removed afterwards)", err=True)
    try:
        tb = Testbed.up(prefix=prefix)
    except BaseException:
        # `up` removes what it built when it fails, except on a signal between steps.
        with contextlib.suppress(Exception):
            Testbed.down_prefix(prefix)
        raise
    try:
        yield tb, True
    finally:
        # Shielded from a second Ctrl-C: a half-removed testbed is worse than a slow exit.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            Testbed.down_prefix(prefix)
            typer.echo(f"bench: testbed {prefix!r} removed", err=True)
        finally:
            signal.signal(signal.SIGINT, old)


def _progress() -> tuple[Any, Any]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from shuntflow.bench.runner import Progress as Hooks

    bar = Progress(
        TextColumn("{task.description:<42}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    task = bar.add_task("bench", total=None)
    hooks = Hooks(
        start=lambda total: bar.update(task, total=total),
        step=lambda text: bar.update(task, description=text),
        advance=lambda: bar.advance(task),
    )
    return bar, hooks


def run_bench(cfg: BenchConfig, out: Path) -> Outcome:
    from shuntflow.bench import plots, report
    from shuntflow.bench.runner import Runner
    from shuntflow.native import DEFAULT_THRESHOLD, library_path

    if os.geteuid() != 0:
        raise BenchError("the bench needs root (network namespaces); run it as root")
    # Absolute, so that the recorded commands (and nginx -p, which resolves its config
    # relative to its prefix) work from any directory.
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    outcome = Outcome(out)
    t0 = time.monotonic()
    server_cpus, client_cpus = cfg.server_cpus, cfg.client_cpus
    meta_extra: dict[str, Any] = {
        "prefix": cfg.prefix,
        "placement": cfg.placement,
        "server_cpus": sorted(server_cpus) if server_cpus is not None else None,
        "client_cpus": sorted(client_cpus) if client_cpus is not None else None,
        "infra_cpus": sorted(cfg.infra_cpus) if cfg.infra_cpus is not None else None,
        "repetitions": cfg.repetitions,
        "duration_s": cfg.duration,
        "quick": cfg.quick,
        "workloads": cfg.workloads,
        "modes": [m.name for m in cfg.modes],
        "default_threshold": DEFAULT_THRESHOLD,
    }
    with contextlib.suppress(Exception):
        meta_extra["library"] = str(library_path())
    meta = report.metadata(meta_extra)
    runner: Runner | None = None

    def save(rows: list[Row]) -> None:
        report.write_json(out, meta, rows)

    with _stop_on_signals():
        try:
            with testbed_for(cfg.prefix) as (tb, made):
                meta["testbed"] = "brought up by the bench" if made else "existing, reused"
                meta["server"] = f"{cfg.prefix}-h2-c1"
                meta["client"] = f"{cfg.prefix}-h1-c1"
                bar, hooks = _progress()
                runner = Runner(cfg, tb, out, on_rows=save, progress=hooks)
                with bar:
                    runner.run()
                outcome.interrupted = runner.interrupted or procs.STOP.is_set()
        except KeyboardInterrupt:
            outcome.interrupted = True
        finally:
            rows = runner.rows if runner is not None else []
            meta["interrupted"] = outcome.interrupted
            meta["wall_s"] = round(time.monotonic() - t0, 1)
            if runner is not None:
                meta["prepare_errors"] = runner.prepare_errors
            outcome.rows = rows
            outcome.files.append(report.write_json(out, meta, rows))
            outcome.files.append(report.write_markdown(out, meta, rows))
            outcome.markdown = report.markdown(meta, rows)
            try:
                outcome.files += plots.write_all(out, rows)
            except Exception as e:  # plots are a convenience; the numbers are already saved
                typer.echo(f"bench: plots failed: {type(e).__name__}: {e}", err=True)
    return outcome


def _summary(o: Outcome) -> None:
    typer.echo(f"bench: {len(o.rows)} rows, {len(o.failed)} failed; results in {o.out}")
    for f in o.files:
        typer.echo(f"  {f}")
    if o.interrupted:
        typer.echo("bench: interrupted; the files hold what was measured before the stop")
    if o.failed:
        shown: set[tuple[str, str, str | None]] = set()
        for r in o.failed:
            key = (r.label, r.mode, r.error)
            if key not in shown and len(shown) < 10:
                shown.add(key)
                typer.echo(f"  failed: {r.label} / {r.mode}: {r.error}", err=True)


def _exit_code(o: Outcome) -> int:
    if o.interrupted:
        return 130
    return 1 if o.failed or not o.rows else 0


def _guard(fn: Any) -> Outcome:
    try:
        result: Outcome = fn()
        return result
    except BenchUsageError as e:
        fail(str(e), 2)
    except (BenchError, TestbedError) as e:
        fail(str(e), 2 if isinstance(e, TestbedUsageError) else 1)
    except KeyboardInterrupt:
        fail("interrupted", 130)


WORKLOAD_HELP = f"Comma-separated workloads, or all: {', '.join(WORKLOADS)}."


def bench_command(
    workload: str | None = typer.Option(
        None, "--workload", "--workloads", "-w", metavar="LIST", help=WORKLOAD_HELP
    ),
    modes: str | None = typer.Option(
        None,
        "--modes",
        metavar="LIST",
        help="host, overlay, lib-overlay, slim, shuntflow, shuntflow@N "
        "(default host,overlay,slim,shuntflow).",
    ),
    thresholds: str | None = typer.Option(
        None,
        "--thresholds",
        metavar="LIST",
        help="Add shuntflow@T for each T, e.g. 1,4,16,64,256 (a full default run has these).",
    ),
    repetitions: str | None = typer.Option(
        None, "--repetitions", "-r", metavar="N", help="Repetitions (default 5, quick 3)."
    ),
    duration: str | None = typer.Option(
        None, "--duration", metavar="S", help="Seconds per client run (default 3, quick 1)."
    ),
    placement: str = typer.Option(
        "same",
        "--placement",
        metavar="|".join(PLACEMENTS),
        help="same: server and client on one vCPU; split: one each; free: unpinned. With same "
        "or split, routers and the libraries' threads run on the CPUs left, if any.",
    ),
    quick: bool = typer.Option(
        False, "--quick", help="Under 3 minutes: fewer repetitions, 1 s runs, fewer workloads."
    ),
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="DIR", help="Output directory (default results/<UTC time>)."),
    ] = None,
    prefix: str = typer.Option(
        DEFAULT_PREFIX, "--prefix", metavar="P", help="Testbed to use (brought up if absent)."
    ),
) -> None:
    """Run real servers and clients in every mode, side by side; write JSON, Markdown, PNGs."""

    def body() -> Outcome:
        cfg = build_config(
            workload, modes, thresholds, repetitions, duration, placement, quick, prefix
        )
        return run_bench(cfg, out or _default_out())

    outcome = _guard(body)
    _summary(outcome)
    raise typer.Exit(_exit_code(outcome))


def demo_command(
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="DIR", help="Output directory (default results/<UTC time>)."),
    ] = None,
) -> None:
    """Testbed up, a quick bench, the table and the plots, testbed down (an existing
    testbed `sf` is used and left up)."""

    def body() -> Outcome:
        cfg = build_config(None, None, None, None, None, "same", True, DEFAULT_PREFIX)
        return run_bench(cfg, out or _default_out())

    outcome = _guard(body)
    typer.echo(outcome.markdown)
    typer.echo("Plots:")
    for f in outcome.files:
        if f.suffix == ".png":
            typer.echo(f"  {f}")
    _summary(outcome)
    sys.stdout.flush()
    raise typer.Exit(_exit_code(outcome))


def scale_command(
    hosts: str = typer.Option("8", "--hosts", metavar="N", help="Hosts of a testbed brought up."),
    containers: str = typer.Option(
        "8", "--containers", metavar="M", help="Containers per host of a testbed brought up."
    ),
    prefix: str = typer.Option(
        DEFAULT_PREFIX,
        "--prefix",
        metavar="P",
        help="Testbed to use: an existing one as it is, else one of N x M is brought up and "
        "removed afterwards.",
    ),
    threshold: str = typer.Option("16", "--threshold", metavar="T", help="Library threshold."),
    min_bytes: str = typer.Option(
        str(32 * 1024), "--min-bytes", metavar="B", help="Shortest stream, per direction."
    ),
    max_bytes: str = typer.Option(
        str(64 * 1024), "--max-bytes", metavar="B", help="Longest stream, per direction."
    ),
    style: str = typer.Option("epoll", "--style", metavar="epoll|epoll-et|poll"),
    timeout: str = typer.Option("900", "--timeout", metavar="S", help="Hang bound, seconds."),
    out: Annotated[
        Path | None, typer.Option("--out", metavar="FILE", help="Write the report as JSON.")
    ] = None,
) -> None:
    """All to all: every container connects to every container on another host at once, each
    connection a checked stream that switches; bytes, bad bytes, switches, routers' RSS and fds."""
    from shuntflow.bench import scale
    from shuntflow.testbed.cli import parse_int
    from shuntflow.testbed.plan import MAX_CONTAINERS, MAX_HOSTS

    try:
        validate_prefix(prefix)
        n = parse_int("--hosts", hosts, MAX_HOSTS, minimum=2)
        m = parse_int("--containers", containers, MAX_CONTAINERS)
        if style not in scale.STYLES:
            raise TestbedUsageError(f"--style must be one of {', '.join(scale.STYLES)}")
        lo = parse_int("--min-bytes", min_bytes, 1 << 30)
        params = scale.Params(
            threshold=parse_int("--threshold", threshold, MAX_THRESHOLD),
            min_bytes=lo,
            max_bytes=parse_int("--max-bytes", max_bytes, 1 << 30, minimum=lo),
            style=style,
            timeout=parse_int("--timeout", timeout, 86400),
        )
    except TestbedUsageError as e:
        fail(str(e), 2)
    if os.geteuid() != 0:
        fail("the scale run needs root (network namespaces); run it as root")
    try:
        result = scale.run_on(prefix, n, m, params, out)
    except (TestbedError, RuntimeError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    typer.echo(scale.summary(result))
    raise typer.Exit(0 if result["passed"] else 1)
