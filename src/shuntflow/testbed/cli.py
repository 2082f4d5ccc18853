"""Commands of the testbed: `shuntflow testbed up|down|status` and `shuntflow exec`.

Numbers and choices are taken as text and checked here rather than by click, so that every bad
value gives one error line (click's own messages span several lines and a usage banner).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, NoReturn

import typer

from shuntflow.native import MAX_THRESHOLD
from shuntflow.testbed.plan import (
    DEFAULT_CONTAINERS,
    DEFAULT_HOSTS,
    DEFAULT_LAYOUT,
    DEFAULT_PREFIX,
    MAX_CONTAINERS,
    MAX_HOSTS,
    TestbedError,
    TestbedUsageError,
    container_prefix,
    parse_cpu_list,
    validate_layout,
    validate_prefix,
)

app = typer.Typer(
    help="Build, inspect and remove the VXLAN testbed (network namespaces; needs root).",
    no_args_is_help=True,
)

MODES = ("overlay", "slim", "shuntflow")


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"shuntflow: error: {message}", err=True)
    raise typer.Exit(code)


def fail_from(e: TestbedError) -> NoReturn:
    fail(str(e), 2 if isinstance(e, TestbedUsageError) else 1)


def parse_int(option: str, text: str, maximum: int, minimum: int = 1) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise TestbedUsageError(f"{option} must be a whole number, got {text!r}") from None
    if not minimum <= value <= maximum:
        raise TestbedUsageError(f"{option} must be between {minimum} and {maximum}, got {value}")
    return value


def _guarded(fn: Callable[[], None]) -> None:
    try:
        fn()
    except TestbedError as e:
        fail_from(e)
    except KeyboardInterrupt:
        fail("interrupted", 130)


@app.command("up")
def up_command(
    hosts: str = typer.Option(
        str(DEFAULT_HOSTS), "--hosts", metavar="N", help=f"Hosts, 1..{MAX_HOSTS}."
    ),
    containers: str = typer.Option(
        str(DEFAULT_CONTAINERS),
        "--containers",
        metavar="M",
        help=f"Containers per host, 1..{MAX_CONTAINERS}.",
    ),
    prefix: str = typer.Option(
        DEFAULT_PREFIX, "--prefix", metavar="P", help="Name prefix of namespaces and devices."
    ),
    no_routers: bool = typer.Option(
        False, "--no-routers", help="Do not start a router in each host namespace."
    ),
    layout: str = typer.Option(
        DEFAULT_LAYOUT,
        "--layout",
        metavar="docker|flannel",
        help="Program the overlay as Docker's overlay driver (one L2 segment) or as Flannel's "
        "VXLAN backend (a routed /24 per host).",
    ),
) -> None:
    """Build N hosts x M containers joined by a VXLAN overlay, and start one router per host."""
    from shuntflow.testbed.testbed import Testbed

    def body() -> None:
        validate_prefix(prefix)
        n = parse_int("--hosts", hosts, MAX_HOSTS)
        m = parse_int("--containers", containers, MAX_CONTAINERS)
        validate_layout(layout)
        tb = Testbed.up(prefix=prefix, hosts=n, containers=m, routers=not no_routers, layout=layout)
        typer.echo(f"testbed {prefix} up: {n} hosts x {m} containers, {layout} layout")
        _print_status(tb.status())

    _guarded(body)


@app.command("down")
def down_command(
    prefix: str = typer.Option(DEFAULT_PREFIX, "--prefix", metavar="P", help="Testbed to remove."),
) -> None:
    """Remove everything `up` made for PREFIX (also after a failed `up`); safe to run twice."""
    from shuntflow.testbed.testbed import Testbed

    def body() -> None:
        validate_prefix(prefix)
        if os.geteuid() != 0:
            raise TestbedError("removing a testbed needs root")
        done = Testbed.down_prefix(prefix)
        if not any(done.values()):
            typer.echo(f"testbed {prefix}: nothing to remove")
            return
        typer.echo(
            f"testbed {prefix} down: {len(done['namespaces_removed'])} namespaces removed, "
            f"{len(done['routers_stopped'])} routers and "
            f"{len(done['processes_stopped'])} other processes stopped"
        )

    _guarded(body)


@app.command("status")
def status_command(
    prefix: str = typer.Option(DEFAULT_PREFIX, "--prefix", metavar="P", help="Testbed to show."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Hosts, containers, addresses, MACs, VXLAN devices and routers of a testbed."""
    from shuntflow.testbed.testbed import Testbed

    def body() -> None:
        validate_prefix(prefix)
        status = Testbed.load(prefix, allow_incomplete=True).status()
        if as_json:
            typer.echo(json.dumps(status, indent=2))
        else:
            _print_status(status)

    _guarded(body)


def _print_status(s: dict[str, Any]) -> None:
    state = "complete" if s["complete"] else "INCOMPLETE (run `down`)"
    typer.echo(
        f"testbed {s['prefix']}: {state}, {s.get('layout', 'docker')} layout, "
        f"run dir {s['run_dir']}"
    )
    typer.echo(f"  underlay  netns {s['underlay_netns']}  bridge {s['underlay_bridge']}")
    for h in s["hosts"]:
        if h["router_pid"] is None:
            router = "not started"
        else:
            router = f"pid {h['router_pid']} " + ("alive" if h["router_alive"] else "NOT RUNNING")
            if h.get("metrics_url"):
                router += f", metrics {h['metrics_url']}"
        missing = "" if h["netns_present"] else "  (namespace MISSING)"
        typer.echo(
            f"  host      {h['netns']:<14} {h['underlay_ip']:<15} vxlan {h['vxlan_dev']}"
            f"  router {h['router_socket']} ({router}){missing}"
        )
        for c in h["containers"]:
            missing = "" if c["netns_present"] else "  (namespace MISSING)"
            typer.echo(f"  container {c['name']:<14} {c['overlay_ip']:<15} mac {c['mac']}{missing}")


# -- exec --------------------------------------------------------------------------------


@dataclass
class ExecOptions:
    host_net: bool = False
    cpu: str | None = None
    mode: str | None = None
    threshold: str | None = None
    prefix: str | None = None
    agent_cpus: str | None = None
    command: list[str] = field(default_factory=list)


_VALUE_OPTIONS = {
    "--cpu": "cpu",
    "--mode": "mode",
    "--threshold": "threshold",
    "--prefix": "prefix",
    "--agent-cpus": "agent_cpus",
}


def split_exec_args(opts: ExecOptions, rest: list[str]) -> ExecOptions:
    """Take exec's own options that follow the container name, then the command.

    The top-level CLI stops parsing options at the container name (so a command's own options
    are never eaten), which leaves `exec C --cpu 1 -- CMD` for us: options up to `--` or to the
    first word that is not one of ours, then the command.
    """
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok == "--":
            i += 1
            break
        name, eq, inline = tok.partition("=")
        if tok == "--host-net":
            opts.host_net = True
            i += 1
        elif name in _VALUE_OPTIONS:
            if eq:
                value = inline
                i += 1
            elif i + 1 < len(rest):
                value = rest[i + 1]
                i += 2
            else:
                raise TestbedUsageError(f"option {name} needs a value")
            setattr(opts, _VALUE_OPTIONS[name], value)
        elif tok.startswith("-") and "--" in rest[i:]:
            raise TestbedUsageError(
                f"unknown exec option {tok!r} (put the command after `--`: exec C [OPTIONS] -- CMD)"
            )
        else:
            break
    opts.command = rest[i:]
    return opts


def exec_command(
    container: str = typer.Argument(
        ..., metavar="CONTAINER", help="Container name, e.g. sf-h1-c1."
    ),
    cmd: Annotated[
        list[str] | None,
        typer.Argument(metavar="-- CMD...", help="The command and its arguments."),
    ] = None,
    host_net: bool = typer.Option(
        False, "--host-net", help="Run in the container's host namespace instead (no overlay)."
    ),
    cpu: str | None = typer.Option(
        None, "--cpu", metavar="LIST", help="Pin to these CPUs, e.g. 1 or 0,1 (as taskset -c)."
    ),
    mode: str | None = typer.Option(
        None,
        "--mode",
        metavar="overlay|slim|shuntflow",
        help="Load the ShuntFlow library in this mode; without it CMD runs without the library.",
    ),
    threshold: str | None = typer.Option(
        None, "--threshold", metavar="N", help="Data syscalls before a connection is switched."
    ),
    prefix: str | None = typer.Option(
        None, "--prefix", metavar="P", help="Testbed prefix (default: CONTAINER's name up to -h)."
    ),
    agent_cpus: str | None = typer.Option(
        None,
        "--agent-cpus",
        metavar="LIST",
        help="Run the library's background thread on these CPUs (needs --mode).",
    ),
) -> None:
    """Run CMD in a testbed container's namespace; stdin, stdout and exit code pass through.

    Usage: shuntflow exec CONTAINER [--host-net] [--cpu LIST] [--mode M] [--threshold N]
    [--agent-cpus LIST] -- CMD ...
    """
    try:
        opts = split_exec_args(
            ExecOptions(host_net, cpu, mode, threshold, prefix, agent_cpus), list(cmd or [])
        )
        argv, env, ns_fd, cpus = _prepare_exec(container, opts)
    except TestbedError as e:
        fail_from(e)
    _do_exec(argv, env, ns_fd, cpus)


def _prepare_exec(
    container: str, opts: ExecOptions
) -> tuple[list[str], dict[str, str], int, set[int] | None]:
    from shuntflow.testbed import nsutil
    from shuntflow.testbed.testbed import Testbed

    if not opts.command:
        raise TestbedUsageError("no command given: shuntflow exec CONTAINER [OPTIONS] -- CMD ...")
    prefix = opts.prefix or container_prefix(container)
    if prefix is None:
        raise TestbedUsageError(
            f"{container!r} is not a container name (expected P-h<i>-c<j>, e.g. sf-h1-c1)"
        )
    validate_prefix(prefix)
    if opts.mode is not None and opts.mode not in MODES:
        raise TestbedUsageError(f"--mode must be one of {', '.join(MODES)}, got {opts.mode!r}")
    threshold = None
    if opts.threshold is not None:
        threshold = parse_int("--threshold", opts.threshold, MAX_THRESHOLD)
        if opts.mode is None:
            raise TestbedUsageError("--threshold needs --mode")
    cpus = None if opts.cpu is None else _available_cpus("--cpu", opts.cpu)
    agent_cpus = None
    if opts.agent_cpus is not None:
        agent_cpus = ",".join(map(str, sorted(_available_cpus("--agent-cpus", opts.agent_cpus))))
        if opts.mode is None:
            raise TestbedUsageError("--agent-cpus needs --mode")

    tb = Testbed.load(prefix)
    c = tb.container(container)
    host = tb.host(c.host_index)
    ns = host.netns if opts.host_net else c.netns

    env = _env_without_library(dict(os.environ))
    if opts.mode is not None:
        from shuntflow.native import DEFAULT_THRESHOLD, LibraryMissing, app_environment
        from shuntflow.wire import Mode

        try:
            env.update(
                app_environment(
                    Mode[opts.mode.upper()],
                    router_socket=host.router_socket,
                    threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
                    log=os.environ.get("SHUNTFLOW_LOG"),
                    agent_cpus=agent_cpus,
                )
            )
        except LibraryMissing as e:
            raise TestbedError(str(e)) from None
    return opts.command, env, nsutil.open_netns(ns), cpus


def _available_cpus(flag: str, text: str) -> set[int]:
    cpus = parse_cpu_list(text)
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise TestbedUsageError(
            f"{flag} {text}: CPU(s) {sorted(cpus - allowed)} not available "
            f"(available: {','.join(map(str, sorted(allowed)))})"
        )
    return cpus


def _env_without_library(env: dict[str, str]) -> dict[str, str]:
    """Without --mode the command must not inherit the library from our own environment."""
    for key in [k for k in env if k.startswith("SHUNTFLOW_") and k != "SHUNTFLOW_LIBRARY"]:
        del env[key]
    preload = [p for p in env.get("LD_PRELOAD", "").split() if "libshuntflow" not in p]
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    return env


def _do_exec(argv: list[str], env: dict[str, str], ns_fd: int, cpus: set[int] | None) -> NoReturn:
    """Become the command: signals, the terminal and the exit status need no relaying."""
    from shuntflow.testbed import nsutil

    try:
        nsutil.enter_netns_fd(ns_fd)
    except OSError as e:
        fail(f"cannot enter the namespace: {e.strerror}")
    finally:
        os.close(ns_fd)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        fail(f"command not found: {argv[0]}", 127)
    except PermissionError:
        fail(f"permission denied: {argv[0]}", 126)
    except OSError as e:
        fail(f"cannot run {argv[0]}: {e.strerror}", 126)
