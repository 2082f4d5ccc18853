# The router daemon: the Python half of the router, around its native switch path.
#
# What runs where (docs/design.md, "The native switch path"): every per-connection decision --
# library frames after HELLO, SWITCH_REQ and CLAIM_RES, the peer port and its OFFERs, the warm
# pool, the in-progress table that keeps one host connection per overlay connection, the
# leader rule and the fd handoff -- runs in switchpath/ (C, one thread: native.py binds it).
# This file keeps what is not per connection: configuration, accepting library channels and
# admitting them (credentials, namespace, attached container, per-container cap) up to their
# HELLO, the overlay map and attachments read from netlink (pushed to the switch path when they
# change, and at once when it misses an address), the socket guard, status, metrics and
# logging. The switch path writes its own log lines, in this log's format, to the same file;
# what it sends back here is rare: a client it closed, a map miss, statistics rows.
#
# Failures before the handoff only ever produce a non-OK status (never an fd), so the library
# stays on the overlay: that is the protocol's fail-open. Host-level failures (peer unreachable,
# silent) put the peer host in exponential backoff so a dead peer is not stormed.

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import time
from typing import Any

from shuntflow.router import native
from shuntflow.router.attachment import Attachments
from shuntflow.router.auth import ClusterKeyError, load_cluster_key
from shuntflow.router.config import RouterConfig
from shuntflow.router.control import ControlServer
from shuntflow.router.guard import GuardError, SocketGuard
from shuntflow.router.latency import LatencyWindow
from shuntflow.router.library_channel import LibraryClient, LibraryServer, RouterSetupError
from shuntflow.router.logfmt import LOGGER_NAME, get_logger
from shuntflow.router.metrics import RouterMetrics
from shuntflow.router.overlay_map import Resolver, StaticMap
from shuntflow.router.ownership import OwnershipChecker
from shuntflow.router.stats import ProcessStats, router_status

log = get_logger()


class Router:
    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.host_ip = ipaddress.IPv4Address(cfg.host_ip)
        static = StaticMap.load(cfg.map_file) if cfg.map_file else None
        self.resolver = Resolver(
            self.host_ip,
            static,
            cfg.vxlan_dev,
            cfg.netns,
            min_refresh_interval=cfg.refresh_min_interval_ms / 1000,
        )
        if cfg.cluster_key is None:
            raise RouterSetupError("no cluster key configured")
        try:
            self.key = load_cluster_key(cfg.cluster_key)
        except ClusterKeyError as exc:
            raise RouterSetupError(str(exc)) from None
        self.policy = cfg.policy()
        self.peer_allow = [ipaddress.IPv4Network(c, strict=False) for c in cfg.peer_allow]
        self.owners = OwnershipChecker() if cfg.owner_check else None
        self.attachments = (
            Attachments(cfg.vxlan_dev, cfg.refresh_min_interval_ms / 1000)
            if cfg.owner_check
            else None
        )
        self.guard = SocketGuard(cfg.guard_mark) if cfg.socket_guard else None
        self.guard_error: str | None = None
        self._guard_seen: dict[str, int] = {}
        self.libs = LibraryServer(
            cfg.socket,
            self,
            self.loop,
            cfg.max_clients,
            self.owners,
            cfg.hello_timeout_ms / 1000,
            cfg.max_clients_per_netns,
            self.attachments,
        )
        self.native: native.SwitchPath | None = None
        self._native_pushed: tuple[int, int] = (-1, -1)
        self._native_listener: socket.socket | None = None
        self._counters: dict[str, Any] = {}  # the switch path's, as last read
        self.control = ControlServer(cfg.control_socket, self)
        self.stats = ProcessStats(self.loop, cfg.stats_timeout_ms / 1000)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started_at = time.time()
        self.switch_times = LatencyWindow()  # libraries' SWITCH_DONE of the initiating ends
        self.req_to_res = LatencyWindow()  # SWITCH_REQ received -> SWITCH_RES OK sent
        # SWITCH_CALLS: per switch end, the longest application data call made during it (target,
        # docs/performance.md: no longer than the overlay's p99.9). Completed switches, every end
        # (initiated or claimed: the stall is the application's wherever it sits); failed
        # attempts apart.
        self.switch_call_max = LatencyWindow()
        self.switch_call_max_failed = LatencyWindow()
        self.metrics = RouterMetrics(cfg.metrics, self.loop, self.status) if cfg.metrics else None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.attachments is not None:
            self.attachments.refresh()
            if self.attachments.tables.error:
                log.warning("attachments_unavailable", error=self.attachments.tables.error)
        if self.guard is not None:
            try:
                self.guard.start()
                self._guard_seen = self.guard.counters()
            except GuardError as exc:
                # The router still runs (every connection stays on the overlay), and says why.
                self.guard_error = str(exc)
                log.error("socket_guard_unavailable", reason=self.guard_error)
        if self.cfg.vxlan_dev is not None:
            await self.resolver.refresh()
            if self.resolver.tables.error:
                log.warning("overlay_map_unavailable", error=self.resolver.tables.error)
        # The control socket first: whoever waits for the library socket (the testbed) may ask
        # for the status at once.
        await self.control.start()
        try:
            self._start_native()
            self.libs.start()
            if self.metrics is not None:
                try:
                    self.metrics.start()
                except OSError as exc:
                    raise RouterSetupError(
                        f"cannot serve metrics on {self.cfg.metrics}: {exc.strerror}"
                    ) from None
        except BaseException:
            self.libs.close()
            self._stop_native()
            await self.control.close()
            raise
        self._spawn(self._housekeeping())
        log.info(
            "router_started",
            pid=os.getpid(),
            socket=self.cfg.socket,
            host_ip=self.cfg.host_ip,
            peer_port=self.cfg.peer_port,
            vxlan_dev=self.cfg.vxlan_dev,
            map=self.cfg.map_file,
            owner_check=self.owners is not None,
            socket_guard=(
                None
                if self.guard is None
                else ("off: " + self.guard_error if self.guard_error else "on")
            ),
            attached_containers=len(self.attachments.tables.addresses)
            if self.attachments
            else None,
            peer_allow=",".join(self.cfg.peer_allow) or "overlay-map hosts",
            allow=",".join(self.cfg.allow) or None,
            deny=",".join(self.cfg.deny) or None,
            metrics=self.cfg.metrics,
            **{k: v for k, v in self.resolver.describe().items() if k in ("neighbours", "fdb")},
        )

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, shut down cleanly."""
        await self.start()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.remove_signal_handler(sig)
            await self.stop()

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._stop_native()
        self.libs.close()
        await self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.owners is not None:
            self.owners.close()
        if self.attachments is not None:
            self.attachments.close()
        if self.guard is not None:
            self.guard.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        served = self._counters.get("served_initiated", 0) + self._counters.get(
            "served_accepted", 0
        )
        log.info("router_stopped", served=served)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.refresh_interval_s)
            if self.attachments is not None:
                self.attachments.refresh()
            self._log_guard_refusals()
            self._pull_native()  # the metrics' switch-time histogram between scrapes
            try:
                await self.resolver.refresh()
            except Exception:
                log.error("overlay_map_refresh_failed", exc=True)
            self._push_tables()

    def _log_guard_refusals(self) -> None:
        """One line when the kernel refused something on a handed-over socket since the last."""
        if self.guard is None or self.guard_error is not None:
            return
        now = self.guard.counters()
        if now != self._guard_seen:
            log.warning(
                "socket_guard_refused",
                reason="connect, bind or a connection to a listener on a handed-over socket",
                **{k: v - self._guard_seen.get(k, 0) for k, v in now.items()},
            )
            self._guard_seen = now

    def _handoff_refusal(self) -> str | None:
        """Why no socket may be handed over at all (the guard is wanted but not working)."""
        if self.guard is not None and self.guard_error is not None:
            return f"socket guard unavailable: {self.guard_error}"
        return None

    # -- the native switch path ------------------------------------------------------------

    def _start_native(self) -> None:
        listener = socket.socket(
            socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.cfg.host_ip, self.cfg.peer_port))
            listener.listen(1024)
        except OSError as exc:
            listener.close()
            raise RouterSetupError(
                f"cannot listen on {self.cfg.host_ip}:{self.cfg.peer_port}: {exc.strerror}"
            ) from None
        self._native_listener = listener
        try:
            sp = native.SwitchPath(
                self.cfg, self.key, listener, map_refreshable=self.cfg.vxlan_dev is not None
            )
        except native.SwitchPathError as exc:
            raise RouterSetupError(str(exc)) from None
        self.native = sp
        self._native_log()
        sp.set_policy(self.policy)
        sp.set_peer_allow(self.peer_allow)
        sp.set_handoff_refusal(self._handoff_refusal())
        self._push_tables(force=True)
        self.loop.add_reader(sp.events.fileno(), self._on_native_events)
        try:
            sp.start()
        except native.SwitchPathError as exc:
            raise RouterSetupError(str(exc)) from None

    def _native_log(self) -> None:
        """Per-switch lines are written by the native side itself, in this log's format, to the
        same file: the router's Python does no work per switch."""
        assert self.native is not None
        logger = logging.getLogger(LOGGER_NAME)
        fd = -1
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if stream is not None:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    stream.flush()
                    fd = stream.fileno()
                    break
        self.native.set_log(fd, logger.getEffectiveLevel())

    def _pull_native(self) -> None:
        """The native side's latency samples into the router's windows (and the metrics)."""
        sp = self.native
        if sp is None:
            return
        for which, window in (
            (native.REQ_RES, self.req_to_res),
            (native.SWITCH_TIME, self.switch_times),
            (native.CALL_MAX, self.switch_call_max),
            (native.CALL_MAX_FAILED, self.switch_call_max_failed),
        ):
            samples, total = sp.samples(which, window.total)
            for us in samples:
                window.add(us)
                if which == native.SWITCH_TIME and self.metrics is not None:
                    self.metrics.switch_done(us)
            window.total = total

    def _stop_native(self) -> None:
        sp = self.native
        if sp is None:
            return
        self.loop.remove_reader(sp.events.fileno())
        sp.stop()
        self._on_native_events()  # the clients it closed
        self._counters = sp.counters()
        sp.close()
        self.native = None
        if self._native_listener is not None:
            self._native_listener.close()
            self._native_listener = None

    def _push_tables(self, force: bool = False) -> None:
        """Hands the overlay map and the attachments to the native side when they changed."""
        sp = self.native
        if sp is None:
            return
        stamp = (
            self.resolver.refreshes,
            self.attachments.refreshes if self.attachments is not None else 0,
        )
        if not force and stamp == self._native_pushed:
            return
        self._native_pushed = stamp
        entries: list[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address | None, int, bool]] = []
        hosts: set[ipaddress.IPv4Address] = set()
        tables = self.resolver.tables
        if self.cfg.vxlan_dev is not None:
            for ip, mac in tables.neigh.items():
                if mac in tables.fdb:
                    dst = tables.fdb[mac]
                    local = dst is None or dst == self.host_ip
                    entries.append((ipaddress.IPv4Network(ip), dst, 0, local))
            for net, gateway in tables.routes:
                gw_mac = tables.neigh.get(gateway)
                if gw_mac is not None and gw_mac in tables.fdb:
                    gw_dst = tables.fdb[gw_mac]
                    entries.append((net, gw_dst, 0, gw_dst is None or gw_dst == self.host_ip))
            hosts.update(h for h in tables.fdb.values() if h is not None)
        if self.resolver.static is not None:
            for net, host in self.resolver.static.entries:
                entries.append((net, host, 1, host == self.host_ip))
                hosts.add(host)
        sp.set_map(entries, hosts)
        if self.attachments is not None:
            sp.set_attachments(self.attachments.tables.owner)

    async def _refresh_for_native(self) -> None:
        """An address missed the map: re-read it if stale, and push it (the requests waiting
        for it are decided on what comes, as resolver.resolve did)."""
        try:
            if self.cfg.vxlan_dev is not None:
                age = time.monotonic() - self.resolver.tables.taken_at
                if age >= self.resolver.min_refresh_interval:
                    await self.resolver.refresh()
            if self.attachments is not None:
                self.attachments.refresh_if_stale()
        except Exception:
            log.error("overlay_map_refresh_failed", exc=True)
        self._push_tables(force=True)

    def on_hello(self, client: LibraryClient, seq: int) -> None:
        """The channel is the switch path's from its HELLO on (it sends the HELLO_ACK: once the
        library has it, it may be asked to claim, so it must be the switch path's before)."""
        sp = self.native
        if sp is None:  # shutting down
            client.close("router shutting down")
            return
        diag = None
        if self.owners is not None and client.ns_key is not None:
            diag = self.owners.diag_fd(client.ns_key)
        self._push_tables()
        fd = client.hand_off()
        if not sp.add_client(
            fd,
            client.id,
            client.pid,
            client.cred_pid,
            client.nsid,
            diag,
            client.owner_error,
            seq,
            client.mode,
        ):
            client.close("router out of memory")

    def _on_native_events(self) -> None:
        sp = self.native
        if sp is None:
            return
        for ev in sp.read_events():
            try:
                self._native_event(ev)
            except Exception:
                log.error("native_event_error", exc=True, record=str(ev)[:200])

    def _native_event(self, ev: dict[str, Any]) -> None:
        kind = ev.pop("t")
        if kind == native.EV_MAP_MISS:
            self._spawn(self._refresh_for_native())
            return
        client = self.libs.clients.get(int(ev["client"]))
        if kind == native.EV_CLOSED:
            if client is not None:
                client.close(ev["reason"], violation=bool(ev["violation"]))
            return
        if client is None:
            return
        self.stats.on_event(kind, client, ev)

    def on_client_closed(self, client: LibraryClient) -> None:
        self.stats.client_closed(client)

    # -- status ----------------------------------------------------------------------------

    def switch_times_since(self, index: int) -> dict[str, Any]:
        self._pull_native()
        return {"next": self.switch_times.total, "samples": self.switch_times.since(index)}

    def switch_calls_since(self, index: int) -> dict[str, Any]:
        self._pull_native()
        return {"next": self.switch_call_max.total, "samples": self.switch_call_max.since(index)}

    async def status(self) -> dict[str, Any]:
        if self.native is not None:
            self._counters = self.native.counters()
            self._pull_native()
        clients = self.libs.ready_clients()
        processes = await asyncio.gather(
            *(self.stats.collect(c, self.native, self._counters) for c in clients)
        )
        return {
            "router": router_status(self, self._counters, len(clients)),
            "processes": list(processes),
        }


async def run_router(cfg: RouterConfig) -> None:
    router = Router(cfg)
    await router.run()
