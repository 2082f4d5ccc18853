# `shuntflow router` (run one per host) and `shuntflow status` (ask every router what it tracks).
#
# Why here: src/shuntflow/cli.py only assembles the parts' commands; this file turns flags and
# an optional TOML file into a RouterConfig (bad settings: one error line, exit 2), sets up the
# structured log and runs the asyncio daemon. `status` finds a testbed's routers from
# /run/shuntflow/<prefix>/ (state.json written by the testbed, or the h*/router.sock layout), asks
# each one's control socket, and prints a table or one JSON document.

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shuntflow.router.config import (
    DEFAULT_CLAIM_TIMEOUT_MS,
    DEFAULT_PEER_PORT,
    ConfigError,
    build_config,
    load_toml,
)
from shuntflow.router.control import query
from shuntflow.router.library_channel import RouterSetupError
from shuntflow.router.logfmt import setup_logging
from shuntflow.router.overlay_map import MapError, StaticMap

RUN_DIR = Path("/run/shuntflow")


def _fail(command: str, message: str, code: int) -> typer.Exit:
    typer.echo(f"shuntflow {command}: error: {message}", err=True)
    return typer.Exit(code)


def router_command(
    socket_path: Annotated[
        Path | None,
        typer.Option(
            "--socket", help="Library socket path (SEQPACKET, mode 0666); control is PATH.ctl."
        ),
    ] = None,
    host_ip: Annotated[
        str | None,
        typer.Option("--host-ip", help="This host's underlay IP: peer listener, offer source."),
    ] = None,
    peer_port: Annotated[
        int | None,
        typer.Option("--peer-port", help=f"Peer routers' TCP port (default {DEFAULT_PEER_PORT})."),
    ] = None,
    vxlan_dev: Annotated[
        str | None,
        typer.Option("--vxlan-dev", help="VXLAN device whose neighbours + FDB map overlay IPs."),
    ] = None,
    map_file: Annotated[
        Path | None,
        typer.Option("--map", help='Static JSON map {"overlay ip or cidr": "host ip"} (fallback).'),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML file with the same keys (flags win).")
    ] = None,
    log_file: Annotated[
        Path | None, typer.Option("--log-file", help="Log here instead of stderr.")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="debug|info|warning|error (default info).")
    ] = None,
    claim_timeout_ms: Annotated[
        int | None,
        typer.Option(
            "--claim-timeout-ms",
            help=f"Time libraries get to claim an offer (default {DEFAULT_CLAIM_TIMEOUT_MS}).",
        ),
    ] = None,
    cluster_key: Annotated[
        Path | None,
        typer.Option(
            "--cluster-key",
            help="Key file shared by all routers (mode 0600, >= 32 bytes); MACs every OFFER.",
        ),
    ] = None,
    peer_allow: Annotated[
        list[str] | None,
        typer.Option(
            "--peer-allow",
            help="Underlay CIDR peer routers may connect from (repeatable; default: the hosts "
            "the overlay map knows).",
        ),
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            help="Switch only connections with an end in CIDR[:PORT[-PORT]] (repeatable).",
        ),
    ] = None,
    deny: Annotated[
        list[str] | None,
        typer.Option(
            "--deny", help="Never switch connections with an end in CIDR[:PORT[-PORT]]; wins."
        ),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            help="Serve Prometheus metrics on HOST:PORT (http://HOST:PORT/metrics).",
        ),
    ] = None,
    owner_check: Annotated[
        bool | None,
        typer.Option(
            "--owner-check/--no-owner-check",
            help="Check the asking process's namespace holds the connection (default on).",
        ),
    ] = None,
    socket_guard: Annotated[
        bool | None,
        typer.Option(
            "--socket-guard/--no-socket-guard",
            help="Have the kernel refuse connect/bind on handed-over sockets (BPF; default on, "
            "and without it nothing is handed over).",
        ),
    ] = None,
) -> None:
    """Run the per-host router (in the host network namespace) until SIGTERM."""
    from shuntflow.router.daemon import run_router

    try:
        file_values = load_toml(config) if config is not None else {}
        cfg = build_config(
            file_values,
            {
                "socket": socket_path,
                "host_ip": host_ip,
                "peer_port": peer_port,
                "vxlan_dev": vxlan_dev,
                "map_file": map_file,
                "log_file": log_file,
                "log_level": log_level,
                "claim_timeout_ms": claim_timeout_ms,
                "cluster_key": cluster_key,
                # An option not given is an empty list here: let the file's value stand.
                "peer_allow": tuple(peer_allow) if peer_allow else None,
                "allow": tuple(allow) if allow else None,
                "deny": tuple(deny) if deny else None,
                "owner_check": owner_check,
                "metrics": metrics,
                "socket_guard": socket_guard,
            },
        )
        if cfg.map_file is not None:
            StaticMap.load(cfg.map_file)
    except (ConfigError, MapError) as exc:
        raise _fail("router", str(exc), 2) from None
    setup_logging(cfg.log_file, cfg.log_level)
    try:
        asyncio.run(run_router(cfg))
    except RouterSetupError as exc:
        raise _fail("router", str(exc), 1) from None
    except KeyboardInterrupt:
        pass


def _sockets_from_state(obj: Any) -> list[Path]:
    """Every `...router.sock` path (or router_socket key) anywhere in the testbed's state."""
    found: list[Path] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, str) and (
                key in ("router_socket", "router_sock") or value.endswith("router.sock")
            ):
                found.append(Path(value))
            else:
                found.extend(_sockets_from_state(value))
    elif isinstance(obj, list):
        for value in obj:
            found.extend(_sockets_from_state(value))
    return found


def find_routers(prefix: str, run_dir: Path = RUN_DIR) -> list[Path]:
    base = run_dir / prefix
    paths: list[Path] = []
    with contextlib.suppress(OSError, ValueError):
        paths += _sockets_from_state(json.loads((base / "state.json").read_text()))
    paths += sorted(base.glob("h*/router.sock"))
    seen: dict[str, Path] = {}
    for p in paths:
        seen.setdefault(str(p), p)
    return list(seen.values())


def _control_path(sock: Path) -> Path:
    return sock if sock.name.endswith(".ctl") else sock.with_name(sock.name + ".ctl")


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _guard_text(guard: Any) -> str:
    if not isinstance(guard, dict):
        return "socket guard off"
    if guard.get("error"):
        return f"socket guard FAILED, nothing handed over: {guard['error']}"
    return (
        f"socket guard on (mark {guard.get('mark')}, refused {guard.get('refused_connect', 0)} "
        f"connect, {guard.get('refused_bind', 0)} bind)"
    )


def _print_tables(results: list[dict[str, Any]]) -> None:
    console = Console()
    for entry in results:
        if "error" in entry:
            console.print(f"[bold red]router {entry['socket']}[/]: {entry['error']}")
            continue
        info = entry["status"]["router"]
        backoffs = ", ".join(
            f"{peer} ({b['failures']} fails, {b['remaining_ms']} ms)"
            for peer, b in info.get("peer_backoffs", {}).items()
        )
        failures = ", ".join(f"{k}={v}" for k, v in sorted(info.get("failures", {}).items()))
        rejected = info.get("clients_rejected", 0)  # over max_clients or the namespace's cap
        console.print(
            f"[bold]router {info['host_ip']}[/] pid {info['pid']} up {info['uptime_s']:.0f}s "
            f"socket {entry['socket']}: {info['clients']} clients"
            + (f" ({rejected} turned away)" if rejected else "")
            + f", {info['switches_served']} switches served"
            + (f", failures: {failures}" if failures else "")
            + (f", backoff: {backoffs}" if backoffs else "")
        )
        sec = info.get("security")
        if sec:
            policy = sec.get("policy", {})
            console.print(
                f"  security: owner check {'on' if sec.get('owner_check') else 'OFF'}, "
                f"{sec.get('owner_denials', 0)} owner denials, "
                f"{sec.get('offers_rejected', 0)} offers and {sec.get('peers_rejected', 0)} "
                f"peers rejected; allow {policy.get('allow') or 'all'}, "
                f"deny {policy.get('deny') or 'none'}; " + _guard_text(sec.get("socket_guard")),
                markup=False,
            )
        table = Table(show_edge=False, pad_edge=False)
        for col in ("pid", "local", "remote", "path", "overlay", "host"):
            table.add_column(col, justify="right" if col in ("overlay", "host", "pid") else "left")
        for proc in entry["status"]["processes"]:
            for row in proc["connections"]:
                table.add_row(
                    str(row["pid"]),
                    row["local"],
                    row["remote"],
                    row["path"],
                    _human(row["overlay_bytes"]),
                    _human(row["host_bytes"]),
                )
            if not proc["complete"]:
                table.add_row(str(proc["pid"]), "(no answer in time)", "", "", "", "")
        if table.row_count:
            console.print(table)
        for proc in entry["status"]["processes"]:
            console.print(
                f"  pid {proc['pid']} ({proc['mode']}): switches done {proc['switches_done']}, "
                f"failed {proc['switches_failed']}"
            )


def status_command(
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON document instead of tables.")
    ] = False,
    sockets: Annotated[
        list[Path] | None,
        typer.Option("--socket", help="A router's socket (repeatable); default: the testbed's."),
    ] = None,
    prefix: Annotated[
        str, typer.Option("--prefix", help="Testbed prefix (/run/shuntflow/PREFIX).")
    ] = "sf",
) -> None:
    """Show every tracked connection per router, with its path (overlay / switching / host)."""
    paths = list(sockets) if sockets else find_routers(prefix)
    if not paths:
        raise _fail("status", f"no routers found under {RUN_DIR / prefix} (use --socket)", 1)
    results: list[dict[str, Any]] = []
    for path in paths:
        try:
            results.append({"socket": str(path), "status": query(_control_path(path))})
        except (OSError, ValueError) as exc:
            results.append({"socket": str(path), "error": f"{type(exc).__name__}: {exc}"})
    if json_out:
        typer.echo(json.dumps({"routers": results}, indent=2, default=str))
    else:
        _print_tables(results)
    if any("error" in r for r in results):
        raise typer.Exit(1)
