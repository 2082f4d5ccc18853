# The router's statistics: what each library process says about its connections, and the status
# document built from that and the switch path's counters (`shuntflow router status`, metrics).
#
# Why apart from daemon.py: the daemon runs the router (lifecycle, tables, admission); this is
# the read side. A status request asks every ready library for its connections (STATS_REQ,
# sent by the switch path, which also checks each CONN_INFO row is the sender's and forwards the
# verdict); the rows are gathered here with a deadline, so a library that never answers costs
# one timeout and is shown as incomplete rather than holding the answer up.

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shuntflow.router import native
from shuntflow.router.library_channel import LibraryClient
from shuntflow.router.logfmt import get_logger
from shuntflow.wire import Mode, Path, Tuple4

if TYPE_CHECKING:
    from shuntflow.router.daemon import Router

log = get_logger()

MAX_ROWS_PER_CLIENT = 100_000


def enum_name(enum_type: type[Path] | type[Mode], value: int) -> str:
    try:
        return enum_type(value).name.lower()
    except ValueError:
        return f"unknown({value})"


@dataclass(eq=False)
class StatsWait:
    client_id: int
    rows: list[dict[str, Any]]
    done: asyncio.Future[tuple[int, int] | None]
    rejected: int = 0


class ProcessStats:
    """The libraries' answers to STATS_REQ, per request seq, until each ends or times out."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.waits: dict[int, StatsWait] = {}
        self.reports_rejected = 0  # CONN_INFO rows for tuples not the sender's

    def on_event(self, kind: int, client: LibraryClient, ev: dict[str, Any]) -> None:
        """A statistics row or end the switch path forwarded (native.EV_ROW, EV_STATS_END)."""
        wait = self.waits.get(int(ev["seq"]))
        if wait is None or wait.client_id != client.id or wait.done.done():
            return  # late answer to a timed-out STATS_REQ
        if kind == native.EV_STATS_END:
            wait.done.set_result((int(ev["arg"]), int(ev["arg2"])))
        elif not ev["ok"]:
            wait.rejected += 1
        elif len(wait.rows) < MAX_ROWS_PER_CLIENT:
            local, _, remote = str(ev["tuple"]).partition("->")
            t = Tuple4.parse(local, remote)
            wait.rows.append(
                {
                    "pid": client.pid,
                    "local": str(t.local),
                    "remote": str(t.remote),
                    "path": enum_name(Path, int(ev["status"])),
                    "overlay_bytes": ev["arg"],
                    "host_bytes": ev["arg2"],
                }
            )

    def client_closed(self, client: LibraryClient) -> None:
        for wait in self.waits.values():
            if wait.client_id == client.id and not wait.done.done():
                wait.done.set_result(None)

    async def collect(
        self, client: LibraryClient, sp: native.SwitchPath | None, counters: dict[str, Any]
    ) -> dict[str, Any]:
        """One process's part of the status: its own figures and its connections."""
        seq = sp.stats_request(client.id) if sp is not None else 0
        wait = StatsWait(client.id, [], self.loop.create_future())
        self.waits[seq] = wait
        result: tuple[int, int] | None = None
        try:
            if seq:
                result = await asyncio.wait_for(asyncio.shield(wait.done), self.timeout_s)
        except TimeoutError:
            result = None
        finally:
            self.waits.pop(seq, None)
            if sp is not None and seq:
                sp.stats_forget(seq)
        if wait.rejected:
            self.reports_rejected += wait.rejected
            log.warning(
                "report_rejected",
                client=client.id,
                pid=client.pid,
                frame="CONN_INFO",
                rows=wait.rejected,
                reason="tuples the sender's container does not hold",
            )
        ok, failed = counters.get("clients", {}).get(str(client.id), [0, 0])[:2]
        return {
            "client": client.id,
            "pid": client.pid,
            "cred_pid": client.cred_pid,
            "uid": client.cred_uid,
            "mode": enum_name(Mode, client.mode),
            "connected_s": round(time.time() - client.connected_at, 3),
            "complete": result is not None,
            "switches_done": result[0] if result else None,
            "switches_failed": result[1] if result else None,
            "router_switches_ok": ok,
            "router_switches_failed": failed,
            "connections": wait.rows,
            "rows_rejected": wait.rejected,
        }


def router_status(r: Router, n: dict[str, Any], clients: int) -> dict[str, Any]:
    """The router's own part of the status; `n` is the switch path's counters."""
    cfg = r.cfg
    served_initiated = n.get("served_initiated", 0)
    served_accepted = n.get("served_accepted", 0)
    return {
        "host_ip": cfg.host_ip,
        "peer_port": cfg.peer_port,
        "pid": os.getpid(),
        "socket": str(cfg.socket),
        "started_at": r.started_at,
        "uptime_s": round(time.time() - r.started_at, 3),
        "clients": len(r.libs.clients),
        "clients_ready": clients,
        "clients_accepted": r.libs.accepted,
        "clients_rejected": r.libs.rejected,
        "switches_served": served_initiated + served_accepted,
        "switches_initiated": served_initiated,
        "switches_accepted": served_accepted,
        "failures": dict(n.get("failures", {})),
        "handoffs_lost": n.get("handoffs_lost", 0),
        "switch_req_res_us": r.req_to_res.summary(),
        "backoff_refusals": n.get("backoff_refusals", 0),
        "peer_backoffs": n.get("peer_backoffs", {}),
        "in_progress": n.get("in_progress", 0),
        "peer_pool": {
            "hits": n.get("pool_hits", 0),
            "misses": n.get("pool_misses", 0),
            "idle": n.get("pool_idle", {}),
        },
        "switch_time_us": r.switch_times.summary(),
        "switch_call_max_us": r.switch_call_max.summary(),
        "switch_calls_timed": n.get("switch_calls_timed", 0),
        "switch_call_max_failed_us": r.switch_call_max_failed.summary(),
        "switch_calls_rejected": n.get("switch_calls_rejected", 0),
        "peer_connections_dropped": n.get("peer_dropped", 0),
        "native_events_dropped": n.get("events_dropped", 0),
        "security": {
            "owner_check": r.owners is not None,
            "owner_checks": n.get("owner_checks", 0) if r.owners else 0,
            "owner_denials": n.get("owner_denials", 0),
            "owner_namespaces": r.owners.namespaces() if r.owners else 0,
            "attachments": r.attachments.describe() if r.attachments else None,
            "socket_guard": (
                None if r.guard is None else {**r.guard.describe(), "error": r.guard_error}
            ),
            "reports_rejected": r.stats.reports_rejected + n.get("reports_rejected", 0),
            "peers_rejected": n.get("peers_rejected", 0),
            "offers_rejected": n.get("offers_rejected", 0),
            "replay_cache": n.get("replay_cache", 0),
            "policy": r.policy.describe(),
            "peer_allow": list(cfg.peer_allow) or "overlay-map hosts",
        },
        "overlay_map": r.resolver.describe(),
        "config": {
            "vxlan_dev": cfg.vxlan_dev,
            "map": str(cfg.map_file) if cfg.map_file else None,
            "claim_timeout_ms": cfg.claim_timeout_ms,
            "log_file": str(cfg.log_file) if cfg.log_file else None,
        },
    }
