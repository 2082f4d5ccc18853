# The router daemon: asyncio wiring and the switch logic between libraries and peer routers.
#
# Why it is one class: the decisions that keep invariant 5 (one host connection per overlay
# connection) all read and write one in-progress table keyed by Tuple4.key() -- the same key
# from both ends -- so it lives in one place, mutated only on the event loop thread, with every
# check that matters done after the last await that precedes the mutation.
#
#   library SWITCH_REQ -> its namespace holds the tuple, and is the container attached to the
#       overlay at the tuple's local address? policy allows it? -> resolve peer host
#       -> OFFER (MAC'd) over TCP -> ANSWER (MAC'd) -> SWITCH_RES + fd (marked: guard.py)
#   peer OFFER (allowed source, valid MAC, fresh, not replayed: peer.py) -> check sender owns
#       the source overlay IP, policy -> CLAIM_REQ to the libraries of the container attached
#       at the tuple's local address only -> first CLAIM_RES OK whose namespace holds the tuple
#       -> ANSWER OK -> SWITCH_RES + fd to that library
#   crossing offers: the leader's offer is accepted by a router that holds its own outgoing
#       offer (and it serves the library's request with it); the follower's gets DUPLICATE.
#       A follower's request waits a few ms for the leader's offer before offering itself, so
#       a switch both ends want costs one offer, not two.
#
# Failures before the handoff only ever produce a non-OK status (never an fd), so the library
# stays on the overlay: that is the protocol's fail-open. Host-level failures (peer unreachable,
# silent) put the peer host in exponential backoff so a dead peer is not stormed.

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from shuntflow.router import native
from shuntflow.router.attachment import Attachments
from shuntflow.router.auth import ClusterKeyError, OfferChecker, load_cluster_key
from shuntflow.router.config import RouterConfig
from shuntflow.router.control import ControlServer
from shuntflow.router.guard import GuardError, SocketGuard
from shuntflow.router.latency import LatencyWindow
from shuntflow.router.library_channel import (
    LibraryClient,
    LibraryServer,
    ProtocolViolation,
    RouterSetupError,
)
from shuntflow.router.logfmt import LOGGER_NAME, get_logger
from shuntflow.router.metrics import RouterMetrics
from shuntflow.router.overlay_map import Kind, Resolver, StaticMap
from shuntflow.router.ownership import OwnershipChecker
from shuntflow.router.peer import PeerListener, send_answer, send_offer
from shuntflow.router.peer_pool import PeerPool
from shuntflow.wire import Endpoint, Mode, Msg, MsgType, Path, PeerMsg, Status, Tuple4

log = get_logger()

SEQ_HIGH = 0x8000_0000  # router-chosen seqs (CLAIM_REQ, STATS_REQ) have the high bit set
HOST_FAILURES = frozenset({Status.PEER_UNREACHABLE, Status.TIMEOUT})
# A key switched this recently is answered DUPLICATE: the peer's crossing offer for the same
# connection may land just after ours completed (milliseconds later as a rule). Kept short, since a
# new connection reusing the 4-tuple meanwhile is refused too; an offer later than this only
# costs a claim its libraries answer NOT_MINE.
DONE_TTL = 1.0
MAX_ROWS_PER_CLIENT = 100_000
# Tuples remembered per client as handed to it (its host-path reports count only for these).
MAX_HANDED_PER_CLIENT = 65_536
FINISHED_CLAIMS_KEPT = 4096
Key = tuple[Endpoint, Endpoint]
_STATUS_CODES = frozenset(int(s) for s in Status)


@dataclass(eq=False)
class Outgoing:
    """A library's SWITCH_REQ being worked on."""

    client: LibraryClient
    seq: int
    tuple: Tuple4  # the library's view
    answered: bool = False  # a SWITCH_RES was (or is being) sent for it
    served: asyncio.Event = field(default_factory=asyncio.Event)
    requested_at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class Incoming:
    """A peer's OFFER being claimed."""

    tuple: Tuple4  # this side's view
    peer: str


@dataclass(eq=False)
class Claim:
    seq: int
    tuple: Tuple4
    asked: frozenset[int]
    pending: set[int]
    winner: asyncio.Future[LibraryClient | None]


@dataclass(eq=False)
class StatsWait:
    client_id: int
    rows: list[dict[str, Any]]
    done: asyncio.Future[tuple[int, int] | None]
    rejected: int = 0


@dataclass
class _PeerBackoff:
    failures: int = 0
    until: float = 0.0
    last: str = ""


class Backoff:
    """Per peer host: after a failure refuse for initial*2^(n-1), capped; reset on an answer."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.peers: dict[str, _PeerBackoff] = {}

    def blocked(self, peer: str) -> bool:
        state = self.peers.get(peer)
        return state is not None and state.until > time.monotonic()

    def failure(self, peer: str, status: Status) -> float:
        state = self.peers.setdefault(peer, _PeerBackoff())
        state.failures += 1
        interval = min(self.initial * 2.0 ** (state.failures - 1), self.maximum)
        state.until = time.monotonic() + interval
        state.last = status.name
        return interval

    def success(self, peer: str) -> None:
        self.peers.pop(peer, None)

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            peer: {
                "failures": s.failures,
                "remaining_ms": max(0, round((s.until - now) * 1000)),
                "last_status": s.last,
            }
            for peer, s in self.peers.items()
        }


def _valid_tuple(t: Tuple4) -> bool:
    return (
        t.local.port != 0
        and t.remote.port != 0
        and not t.local.ip.is_unspecified
        and not t.remote.ip.is_unspecified
        and t.local != t.remote
    )


def _enum_name(enum_type: type[Path] | type[Mode], value: int) -> str:
    try:
        return enum_type(value).name.lower()
    except ValueError:
        return f"unknown({value})"


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
        # The native switch path (switchpath/) serves library frames and peer connections
        # itself; the Python one is PeerListener, PeerPool and the handlers below.
        self.native: native.SwitchPath | None = None
        self._native_pushed: tuple[int, int] = (-1, -1)
        self._native_listener: socket.socket | None = None
        self.peers = PeerListener(
            self.loop,
            cfg.host_ip,
            cfg.peer_port,
            self.on_offer,
            cfg.offer_read_timeout_ms / 1000,
            cfg.peer_idle_timeout_ms / 1000,
            cfg.max_incoming,
            self._admit_peer,
            OfferChecker(self.key, cfg.auth_window_ms, cfg.max_nonces),
            cfg.max_idle_per_peer,
        )
        # Used while younger than half the peers' idle timeout (all routers share the setting).
        self.pool = PeerPool(
            self.loop,
            cfg.host_ip,
            cfg.peer_port,
            cfg.peer_pool_size,
            cfg.peer_idle_timeout_ms / 2000,
            cfg.connect_timeout_ms / 1000,
        )
        self.control = ControlServer(cfg.control_socket, self)
        self.backoff = Backoff(cfg.backoff_initial_ms / 1000, cfg.backoff_max_ms / 1000)
        self.in_progress: dict[Key, Outgoing | Incoming] = {}
        self.claims: dict[int, Claim] = {}
        self.stats_waits: dict[int, StatsWait] = {}
        self._finished_claims: collections.OrderedDict[int, Status] = collections.OrderedDict()
        self._done: dict[Key, float] = {}
        self._seq = 1
        self._seq_wrapped = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started_at = time.time()
        self.served_initiated = 0
        self.served_accepted = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.backoff_refusals = 0
        self.handoffs_lost = 0
        self.switch_times = LatencyWindow()  # libraries' SWITCH_DONE of the initiating ends
        self.switch_times_claimed = 0  # SWITCH_DONE of ends claimed for a peer (not timed here)
        self.req_to_res = LatencyWindow()  # SWITCH_REQ received -> SWITCH_RES OK sent
        # SWITCH_CALLS: per switch end, the longest application data call made during it (target,
        # docs/performance.md: no longer than the overlay's p99.9). Completed switches, every end
        # (initiated or claimed: the stall is the application's wherever it sits); failed
        # attempts apart.
        self.switch_call_max = LatencyWindow()
        self.switch_call_max_failed = LatencyWindow()
        self.switch_calls_timed = 0  # calls timed over the completed switches' windows
        self.switch_calls_rejected = 0
        self.owner_denials = 0
        self.metrics = RouterMetrics(cfg.metrics, self.loop, self.status) if cfg.metrics else None
        self.reports_rejected = 0  # CONN_INFO / SWITCH_DONE rows for tuples not the sender's
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
            if self.cfg.switch_path == "native":
                self._start_native()
            else:
                self.peers.start()
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
            await self.peers.close()
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
        await self.pool.close()
        await self.peers.close()
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
        log.info("router_stopped", served=self.served_initiated + self.served_accepted)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.refresh_interval_s)
            now = time.monotonic()
            for key in [k for k, exp in self._done.items() if exp <= now]:
                del self._done[key]
            if self.native is None:
                self.pool.maintain()
            if self.attachments is not None:
                self.attachments.refresh()
            self._log_guard_refusals()
            self._pull_native()  # the metrics' switch-time histogram between scrapes
            try:
                await self.resolver.refresh()
            except Exception:
                log.error("overlay_map_refresh_failed", exc=True)
            self._push_tables()

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
        self._on_native_events()  # the clients it closed, and its last lines
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

    def on_hello(self, client: LibraryClient, seq: int) -> bool:
        """Native: the channel is the switch path's from its HELLO on (it sends the ACK)."""
        sp = self.native
        if sp is None:
            return False
        diag = None
        if self.owners is not None and client.ns_key is not None:
            diag = self.owners.diag_fd(client.ns_key)
        self._push_tables()
        fd = client.hand_off()
        if not sp.add_client(
            fd, client.id, client.pid, client.cred_pid, client.nsid, diag, client.owner_error, seq
        ):
            client.close("router out of memory")
        return True

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
        local, _, remote = str(ev["tuple"]).partition("->")
        t = Tuple4.parse(local, remote)
        msg = Msg(
            MsgType.CONN_INFO,
            int(ev["status"]),
            int(ev["seq"]),
            tuple=t,
            arg=ev["arg"],
            arg2=ev["arg2"],
        )
        wait = self.stats_waits.get(msg.seq)
        if wait is None or wait.client_id != client.id or wait.done.done():
            return  # late answer to a timed-out STATS_REQ
        if kind == native.EV_STATS_END:
            wait.done.set_result((msg.arg, msg.arg2))
        elif not ev["ok"]:
            wait.rejected += 1
        else:
            self._add_row(wait, client, msg)

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

    # -- bookkeeping -----------------------------------------------------------------------

    def _next_seq(self) -> int:
        seq = self._seq | SEQ_HIGH
        self._seq += 1
        if self._seq > 0x7FFF_FFFF:
            self._seq, self._seq_wrapped = 1, True
        return seq

    def _issued(self, seq: int) -> bool:
        """Could the router have sent this seq (to someone)? Else the client is making it up."""
        if not seq & SEQ_HIGH:
            return False
        return self._seq_wrapped or 0 < (seq & 0x7FFF_FFFF) < self._seq

    def _recently_done(self, key: Key) -> bool:
        exp = self._done.get(key)
        return exp is not None and exp > time.monotonic()

    def _mark_done(self, key: Key) -> None:
        self._done[key] = time.monotonic() + DONE_TTL

    def _fail(
        self, client: LibraryClient, seq: int, t: Tuple4, status: Status, detail: str
    ) -> None:
        self.failures[status.name] += 1
        if status is not Status.DUPLICATE:
            client.switches_failed += 1
        client.send(Msg(MsgType.SWITCH_RES, status, seq, tuple=t))
        log.info(
            "switch_failed",
            client=client.id,
            pid=client.pid,
            seq=seq,
            tuple=t,
            status=status.name,
            detail=detail or None,
        )

    def _deliver(
        self,
        client: LibraryClient,
        seq: int,
        t: Tuple4,
        sock: socket.socket,
        how: str,
        peer: str,
        requested_at: float | None = None,
    ) -> bool:
        """SWITCH_RES OK with the host socket; our copy is closed either way."""
        if self.guard is not None:
            try:
                self.guard.protect(sock)
            except OSError as exc:
                sock.close()
                self._fail(client, seq, t, Status.INTERNAL, f"cannot mark the host socket: {exc}")
                return False
        try:
            host_local = "{}:{}".format(*sock.getsockname()[:2])
            host_remote = "{}:{}".format(*sock.getpeername()[:2])
        except OSError:
            host_local = host_remote = "?"
        if client.send(Msg(MsgType.SWITCH_RES, Status.OK, seq, tuple=t), sock):
            client.switches_ok += 1
            client.handed[t.key()] = None
            if len(client.handed) > MAX_HANDED_PER_CLIENT:
                del client.handed[next(iter(client.handed))]
            if requested_at is not None:
                self.req_to_res.add(int((time.monotonic() - requested_at) * 1e6))
            if how == "initiated":
                self.served_initiated += 1
            else:
                self.served_accepted += 1
            log.info(
                "switch_done",
                how=how,
                client=client.id,
                pid=client.pid,
                seq=seq,
                tuple=t,
                peer=peer,
                host_local=host_local,
                host_remote=host_remote,
            )
            return True
        self.handoffs_lost += 1
        log.warning("handoff_lost", how=how, client=client.id, tuple=t, reason="library gone")
        return False

    def _not_owner(self, client: LibraryClient, t: Tuple4) -> str | None:
        """None if the client's network namespace holds `t` (its own view), else why not."""
        if self.owners is None:
            return None
        if client.ns_key is None:
            return f"owner: {client.owner_error}"
        verdict = self.owners.owns(client.ns_key, t)
        if not verdict.ok:
            self.owner_denials += 1
            return f"owner: {verdict.reason}"
        # Its namespace holds the tuple; but only the container the overlay reaches at that
        # address owns it (a copy on some namespace's loopback is no connection of the overlay).
        if self.attachments is not None and not self.attachments.holds_address(
            client.nsid, t.local.ip
        ):
            self.owner_denials += 1
            return f"owner: {t.local.ip} is not an overlay address of the caller's container"
        return None

    def _handoff_refusal(self) -> str | None:
        """Why no socket may be handed over at all (the guard is wanted but not working)."""
        if self.guard is not None and self.guard_error is not None:
            return f"socket guard unavailable: {self.guard_error}"
        return None

    async def _admit_peer(self, ip: str) -> str | None:
        """None if `ip` may connect to the peer port, else why not (peer.PeerListener)."""
        addr = ipaddress.IPv4Address(ip)
        if self.peer_allow:
            if any(addr in net for net in self.peer_allow):
                return None
            return "source not in peer_allow"
        if await self.resolver.is_known_host(addr):
            return None
        return "source is no host of the overlay map (set peer_allow to widen)"

    # -- library frames (LibraryHandler) ---------------------------------------------------

    def on_switch_req(self, client: LibraryClient, msg: Msg) -> None:
        t, seq = msg.tuple, msg.seq
        if seq in client.outstanding:
            self._fail(client, seq, t, Status.BAD_MESSAGE, "seq already outstanding")
            return
        if len(client.outstanding) >= self.cfg.max_outstanding:
            self._fail(client, seq, t, Status.DENIED, "too many outstanding requests")
            return
        if not _valid_tuple(t):
            self._fail(client, seq, t, Status.BAD_MESSAGE, "invalid tuple")
            return
        refusal = self._handoff_refusal() or self._not_owner(client, t) or self.policy.refusal(t)
        if refusal is not None:
            self._fail(client, seq, t, Status.DENIED, refusal)
            return
        key = t.key()
        if key in self.in_progress or self._recently_done(key):
            self._fail(client, seq, t, Status.DUPLICATE, "tuple already being switched")
            return
        entry = Outgoing(client, seq, t)
        self.in_progress[key] = entry
        client.outstanding.add(seq)
        self._spawn(self._run_outgoing(entry))

    async def _run_outgoing(self, e: Outgoing) -> None:
        key = e.tuple.key()
        status: Status | None = Status.INTERNAL
        detail = ""
        try:
            status, detail = await self._outgoing(e)
        except asyncio.CancelledError:
            status, detail = Status.INTERNAL, "router shutting down"
            raise
        except Exception:
            log.error("switch_internal_error", exc=True, tuple=e.tuple)
            status, detail = Status.INTERNAL, "internal error"
        finally:
            if self.in_progress.get(key) is e:
                del self.in_progress[key]
            e.client.outstanding.discard(e.seq)
            if status is not None and not e.answered:
                e.answered = True
                self._fail(e.client, e.seq, e.tuple, status, detail)

    async def _outgoing(self, e: Outgoing) -> tuple[Status | None, str]:
        t = e.tuple
        own = self.resolver.lookup(t.local.ip)  # a local container is never in the tables
        if own.kind is Kind.REMOTE:
            return Status.DENIED, f"{t.local.ip} is not on this host ({own})"
        dest = await self.resolver.resolve(t.remote.ip)
        if dest.kind is not Kind.REMOTE or dest.host is None:
            return Status.NO_ROUTE, f"{t.remote.ip} resolves to {dest}"
        peer = str(dest.host)
        if self.backoff.blocked(peer):
            self.backoff_refusals += 1
            return Status.PEER_UNREACHABLE, f"peer {peer} in backoff"
        if not t.local_is_leader() and await self._served_by_leader(e):
            return None, ""
        if e.answered:
            return None, ""
        res = await send_offer(
            self.loop,
            self.key,
            self.cfg.host_ip,
            peer,
            self.cfg.peer_port,
            t,
            e.seq,
            self.cfg.connect_timeout_ms / 1000,
            self.cfg.answer_timeout_ms / 1000,
            pooled=self.pool.take(peer),
        )
        if res.status in HOST_FAILURES:
            self.pool.forget(peer)
            interval = self.backoff.failure(peer, res.status)
            log.info("peer_backoff", peer=peer, status=res.status.name, interval_ms=interval * 1000)
        elif res.status is not Status.INTERNAL:
            self.backoff.success(peer)  # its router answered: the host is fine
        if res.status is Status.OK:
            assert res.sock is not None
            if e.answered:  # the leader's offer already served this request
                res.sock.close()
                log.warning("extra_host_connection_closed", tuple=t, peer=peer)
                return None, ""
            e.answered = True
            self._mark_done(t.key())
            self._deliver(e.client, e.seq, t, res.sock, "initiated", peer, e.requested_at)
            return None, ""
        if res.status is Status.DUPLICATE:
            if not e.answered:
                try:
                    async with asyncio.timeout(self.cfg.duplicate_wait_ms / 1000):
                        await e.served.wait()
                except TimeoutError:
                    if not e.served.is_set():  # served in the very loop round the timer fired
                        return (
                            Status.TIMEOUT,
                            "peer answered DUPLICATE and its own offer never came",
                        )
            return None, ""
        return res.status, res.detail

    async def _served_by_leader(self, e: Outgoing) -> bool:
        """Give the leader's offer a moment to come (on_offer then serves `e` with it).

        Both ends of a busy connection cross the threshold within a round trip or so of each
        other. Offering from both ends cost two offers, a refusal and two pool refills per switch,
        and on a small machine the routers' CPU is the switch's critical path."""
        if not e.answered:
            try:
                async with asyncio.timeout(self.cfg.follower_grace_ms / 1000):
                    await e.served.wait()
            except TimeoutError:
                pass
        return e.answered

    def on_claim_res(self, client: LibraryClient, msg: Msg) -> None:
        seq = msg.seq
        if not self._issued(seq):
            raise ProtocolViolation(f"CLAIM_RES for seq {seq:#x} the router never sent")
        ok = msg.status == Status.OK
        claim = self.claims.get(seq)
        if claim is None:
            late = self._finished_claims.get(seq, Status.TIMEOUT)
            log.info("claim_res_late", client=client.id, seq=seq, ok=ok, answer=late.name)
            if ok:  # it expects a SWITCH_RES for this seq: tell it there is no fd
                client.send(Msg(MsgType.SWITCH_RES, late, seq, tuple=msg.tuple))
            return
        if client.id not in claim.asked:
            raise ProtocolViolation(f"CLAIM_RES for claim {seq:#x} this client was not asked")
        if client.id not in claim.pending:
            log.info("claim_res_repeated", client=client.id, seq=seq)
            return
        claim.pending.discard(client.id)
        if ok:
            refusal = self._not_owner(client, claim.tuple)
            if refusal is not None:
                # It said "mine" and waits for a SWITCH_RES of this seq: it gets one, no fd.
                self.failures["claim_DENIED"] += 1
                client.send(Msg(MsgType.SWITCH_RES, Status.DENIED, seq, tuple=claim.tuple))
                log.info(
                    "claim_denied",
                    client=client.id,
                    pid=client.pid,
                    cred_pid=client.cred_pid,
                    seq=seq,
                    tuple=claim.tuple,
                    status=Status.DENIED.name,
                    detail=refusal,
                )
                self._check_claim(claim)
                return
            if not claim.winner.done():
                claim.winner.set_result(client)
            else:
                client.send(Msg(MsgType.SWITCH_RES, Status.DUPLICATE, seq, tuple=claim.tuple))
        self._check_claim(claim)

    def _check_claim(self, claim: Claim) -> None:
        if not claim.pending and not claim.winner.done():
            claim.winner.set_result(None)

    def on_conn_info(self, client: LibraryClient, msg: Msg) -> None:
        if not self._issued(msg.seq):
            raise ProtocolViolation(f"CONN_INFO for seq {msg.seq:#x} the router never sent")
        wait = self.stats_waits.get(msg.seq)
        if wait is None or wait.client_id != client.id or wait.done.done():
            return  # late answer to a timed-out STATS_REQ
        if not self._reports_own(client, msg.tuple, msg.status):
            wait.rejected += 1
            return
        self._add_row(wait, client, msg)

    def _add_row(self, wait: StatsWait, client: LibraryClient, msg: Msg) -> None:
        if len(wait.rows) < MAX_ROWS_PER_CLIENT:
            wait.rows.append(
                {
                    "pid": client.pid,
                    "local": str(msg.tuple.local),
                    "remote": str(msg.tuple.remote),
                    "path": _enum_name(Path, msg.status),
                    "overlay_bytes": msg.arg,
                    "host_bytes": msg.arg2,
                }
            )

    def on_stats_end(self, client: LibraryClient, msg: Msg) -> None:
        if not self._issued(msg.seq):
            raise ProtocolViolation(f"STATS_END for seq {msg.seq:#x} the router never sent")
        wait = self.stats_waits.get(msg.seq)
        if wait is not None and wait.client_id == client.id and not wait.done.done():
            wait.done.set_result((msg.arg, msg.arg2))

    def _reports_own(self, client: LibraryClient, t: Tuple4, path: int) -> bool:
        """Does a report about `t` come from the container that holds it? A connection on the
        host path is one the router handed to this client; any other is a live socket of the
        client's namespace (an attached container's: no other gets a channel), overlay or not
        (a connection pinned to the overlay may be one to a non-overlay address)."""
        if self.owners is None:
            return True
        if not _valid_tuple(t):
            return False
        if path == Path.HOST:
            return t.key() in client.handed
        return client.ns_key is not None and self.owners.owns(client.ns_key, t).ok

    def _reject_report(self, client: LibraryClient, count: int, **fields: Any) -> None:
        self.reports_rejected += count
        log.warning("report_rejected", client=client.id, pid=client.pid, **fields)

    def on_switch_done(self, client: LibraryClient, msg: Msg) -> None:
        if self.owners is not None and msg.tuple.key() not in client.handed:
            self._reject_report(
                client,
                1,
                frame="SWITCH_DONE",
                tuple=msg.tuple,
                reason="no host connection was handed to this client for it",
            )
            return
        self._switch_done(client, msg)

    def _switch_done(self, client: LibraryClient, msg: Msg) -> None:
        if msg.arg2 == 1:
            self.switch_times.add(int(msg.arg))
            if self.metrics is not None:
                self.metrics.switch_done(int(msg.arg))
        else:
            self.switch_times_claimed += 1
        log.debug("switch_done", client=client.id, tuple=msg.tuple, us=msg.arg, own=msg.arg2)

    def on_switch_calls(self, client: LibraryClient, msg: Msg) -> None:
        # A figure, not a request: one the library could not have meant is left out of the
        # figures and logged, and the client keeps its channel (its switches are unaffected).
        reason = None
        if msg.status not in _STATUS_CODES:
            reason = f"unknown status {msg.status}"
        elif not _valid_tuple(msg.tuple):
            reason = "invalid tuple"
        elif msg.arg > 0 and msg.arg2 == 0:
            reason = "a longest call without any call timed"
        if reason is not None:
            self.switch_calls_rejected += 1
            log.warning("switch_calls_rejected", client=client.id, tuple=msg.tuple, reason=reason)
            return
        if msg.status == Status.OK:
            self.switch_call_max.add(int(msg.arg))
            self.switch_calls_timed += int(msg.arg2)
        else:
            self.switch_call_max_failed.add(int(msg.arg))
        log.debug(
            "switch_calls",
            client=client.id,
            tuple=msg.tuple,
            status=Status(msg.status).name,
            max_us=msg.arg,
            calls=msg.arg2,
        )

    def on_client_closed(self, client: LibraryClient) -> None:
        for claim in self.claims.values():
            if client.id in claim.pending:
                claim.pending.discard(client.id)
                self._check_claim(claim)
        for wait in self.stats_waits.values():
            if wait.client_id == client.id and not wait.done.done():
                wait.done.set_result(None)

    # -- peer offers -----------------------------------------------------------------------

    async def on_offer(self, conn: socket.socket, src: str, msg: PeerMsg) -> bool:
        """Handle one OFFER; True if `conn` was handed to a library."""
        answer_timeout = self.cfg.answer_timeout_ms / 1000
        theirs = msg.tuple  # the initiator's view
        t = theirs.mirrored()  # ours

        async def refuse(status: Status, detail: str) -> bool:
            self.failures[f"offer_{status.name}"] += 1
            log.info("offer_refused", peer=src, tuple=t, status=status.name, detail=detail)
            await send_answer(self.loop, self.key, conn, msg, status, answer_timeout)
            return False

        if not _valid_tuple(t):
            return await refuse(Status.BAD_MESSAGE, "invalid tuple")
        refusal = self._handoff_refusal() or self.policy.refusal(t)
        if refusal is not None:
            return await refuse(Status.DENIED, refusal)
        # Only the host that holds the initiator's overlay address may offer for it.
        sender = await self.resolver.resolve(theirs.local.ip)
        if sender.kind is not Kind.REMOTE or str(sender.host) != src:
            return await refuse(Status.DENIED, f"{theirs.local.ip} is {sender}, not on {src}")
        mine = self.resolver.lookup(t.local.ip)
        if mine.kind is Kind.REMOTE:
            return await refuse(Status.DENIED, f"{t.local.ip} is not on this host ({mine})")
        key = t.key()
        entry = self.in_progress.get(key)
        if (
            isinstance(entry, Outgoing)
            and not entry.answered
            and entry.tuple == t
            and theirs.local_is_leader()
        ):
            return await self._accept_for_request(conn, src, msg, entry)
        if entry is not None or self._recently_done(key):
            return await refuse(Status.DUPLICATE, "tuple already being switched")
        return await self._claim(conn, src, msg, t, key)

    async def _accept_for_request(
        self, conn: socket.socket, src: str, msg: PeerMsg, e: Outgoing
    ) -> bool:
        """Crossing offers, the sender leads: its connection serves our library's request."""
        e.answered = True
        try:
            if not await send_answer(
                self.loop, self.key, conn, msg, Status.OK, self.cfg.answer_timeout_ms / 1000
            ):
                self._fail(e.client, e.seq, e.tuple, Status.PEER_UNREACHABLE, "initiator gone")
                return False
            self._mark_done(e.tuple.key())
            return self._deliver(
                e.client, e.seq, e.tuple, conn, "accepted_leader", src, e.requested_at
            )
        finally:
            e.served.set()

    async def _claim(
        self, conn: socket.socket, src: str, msg: PeerMsg, t: Tuple4, key: Key
    ) -> bool:
        incoming = Incoming(t, src)
        self.in_progress[key] = incoming
        try:
            clients = self.libs.ready_clients()
            if self.attachments is not None:
                # Only the container the overlay reaches at our end's address hears of it: the
                # others could copy the tuple and say "mine", and would learn who talks to whom.
                owner = self.attachments.container_at(t.local.ip)
                clients = [c for c in clients if owner is not None and c.nsid == owner]
                if not clients:
                    why = (
                        f"no container attached at {t.local.ip}"
                        if owner is None
                        else f"no library in the container at {t.local.ip}"
                    )
                    return await self._refuse_claim(conn, src, msg, t, why)
            if not clients:
                return await self._refuse_claim(conn, src, msg, t, "no library connected")
            seq = self._next_seq()
            ids = frozenset(c.id for c in clients)
            claim = Claim(seq, t, ids, set(ids), self.loop.create_future())
            self.claims[seq] = claim
            winner: LibraryClient | None = None
            try:
                for c in clients:
                    c.send(Msg(MsgType.CLAIM_REQ, Status.OK, seq, tuple=t))
                self._check_claim(claim)  # all of them may have gone while we sent
                async with asyncio.timeout(self.cfg.claim_timeout_ms / 1000):
                    winner = await asyncio.shield(claim.winner)
            except TimeoutError:
                # An answer read in the loop round the timer fired still counts: the library that
                # said OK waits for this fd.
                winner = claim.winner.result() if claim.winner.done() else None
            finally:
                self.claims.pop(seq, None)
                self._finished_claims[seq] = Status.DUPLICATE if winner else Status.TIMEOUT
                while len(self._finished_claims) > FINISHED_CLAIMS_KEPT:
                    self._finished_claims.popitem(last=False)
            if winner is None:
                why = "all libraries said NOT_MINE" if not claim.pending else "claim timed out"
                return await self._refuse_claim(conn, src, msg, t, why)
            if winner.closed:
                self.handoffs_lost += 1
                log.warning("handoff_lost", how="claimed", tuple=t, reason="claimer gone")
                return False  # the caller closes conn: the initiator's library sees EOF
            if not await send_answer(
                self.loop, self.key, conn, msg, Status.OK, self.cfg.answer_timeout_ms / 1000
            ):
                self._fail(winner, seq, t, Status.PEER_UNREACHABLE, "initiator gone")
                return False
            self._mark_done(key)
            return self._deliver(winner, seq, t, conn, "claimed", src)
        finally:
            if self.in_progress.get(key) is incoming:
                del self.in_progress[key]

    async def _refuse_claim(
        self, conn: socket.socket, src: str, msg: PeerMsg, t: Tuple4, why: str
    ) -> bool:
        self.failures["offer_PEER_REFUSED"] += 1
        log.info("offer_refused", peer=src, tuple=t, status="PEER_REFUSED", detail=why)
        await send_answer(
            self.loop, self.key, conn, msg, Status.PEER_REFUSED, self.cfg.answer_timeout_ms / 1000
        )
        return False

    # -- status ----------------------------------------------------------------------------

    async def _client_stats(
        self, client: LibraryClient, counts: dict[str, list[int]] | None
    ) -> dict[str, Any]:
        seq = self.native.stats_request(client.id) if self.native else self._next_seq()
        wait = StatsWait(client.id, [], self.loop.create_future())
        self.stats_waits[seq] = wait
        result: tuple[int, int] | None = None
        try:
            if self.native is None:
                client.send(Msg(MsgType.STATS_REQ, Status.OK, seq))
            if seq:
                result = await asyncio.wait_for(
                    asyncio.shield(wait.done), self.cfg.stats_timeout_ms / 1000
                )
        except TimeoutError:
            result = None
        finally:
            self.stats_waits.pop(seq, None)
            if self.native is not None and seq:
                self.native.stats_forget(seq)
        if counts is not None:  # the native side counts a channel's switches
            client.switches_ok, client.switches_failed = counts.get(str(client.id), [0, 0])[:2]
        if wait.rejected:
            self._reject_report(
                client,
                wait.rejected,
                frame="CONN_INFO",
                rows=wait.rejected,
                reason="tuples the sender's container does not hold",
            )
        return {
            "client": client.id,
            "pid": client.pid,
            "cred_pid": client.cred_pid,
            "uid": client.cred_uid,
            "mode": _enum_name(Mode, client.mode),
            "connected_s": round(time.time() - client.connected_at, 3),
            "complete": result is not None,
            "switches_done": result[0] if result else None,
            "switches_failed": result[1] if result else None,
            "router_switches_ok": client.switches_ok,
            "router_switches_failed": client.switches_failed,
            "connections": wait.rows,
            "rows_rejected": wait.rejected,
        }

    def switch_times_since(self, index: int) -> dict[str, Any]:
        self._pull_native()
        return {"next": self.switch_times.total, "samples": self.switch_times.since(index)}

    def switch_calls_since(self, index: int) -> dict[str, Any]:
        self._pull_native()
        return {"next": self.switch_call_max.total, "samples": self.switch_call_max.since(index)}

    def _native_counters(self) -> dict[str, Any] | None:
        """The native side's counters, its figures folded into the router's own."""
        if self.native is None:
            return None
        n = self.native.counters()
        self.served_initiated = n["served_initiated"]
        self.served_accepted = n["served_accepted"]
        self.failures = collections.Counter(n["failures"])
        self.handoffs_lost = n["handoffs_lost"]
        self.backoff_refusals = n["backoff_refusals"]
        self.owner_denials = n["owner_denials"]
        self._pull_native()
        self.switch_times_claimed = n["switch_times_claimed"]
        self.switch_calls_timed = n["switch_calls_timed"]
        self.switch_calls_rejected = n["switch_calls_rejected"]
        return n

    async def status(self) -> dict[str, Any]:
        n = self._native_counters()
        clients = self.libs.ready_clients()
        counts = n["clients"] if n is not None else None
        processes = await asyncio.gather(*(self._client_stats(c, counts) for c in clients))
        if n is None:
            pool = self.pool.describe()
            backoffs = self.backoff.describe()
            in_progress = len(self.in_progress)
            dropped, rejected_peers = self.peers.dropped, self.peers.rejected_peers
            rejected_offers, replay = self.peers.rejected_offers, len(self.peers.checker)
            checks = self.owners.checks if self.owners else 0
        else:
            pool = {"hits": n["pool_hits"], "misses": n["pool_misses"], "idle": n["pool_idle"]}
            backoffs = n["peer_backoffs"]
            in_progress = n["in_progress"]
            dropped, rejected_peers = n["peer_dropped"], n["peers_rejected"]
            rejected_offers, replay = n["offers_rejected"], n["replay_cache"]
            checks = n["owner_checks"] if self.owners else 0
        return {
            "router": {
                "host_ip": self.cfg.host_ip,
                "peer_port": self.cfg.peer_port,
                "pid": os.getpid(),
                "socket": str(self.cfg.socket),
                "started_at": self.started_at,
                "uptime_s": round(time.time() - self.started_at, 3),
                "clients": len(self.libs.clients),
                "clients_ready": len(clients),
                "clients_accepted": self.libs.accepted,
                "clients_rejected": self.libs.rejected,
                "switches_served": self.served_initiated + self.served_accepted,
                "switches_initiated": self.served_initiated,
                "switches_accepted": self.served_accepted,
                "failures": dict(self.failures),
                "handoffs_lost": self.handoffs_lost,
                "switch_req_res_us": self.req_to_res.summary(),
                "backoff_refusals": self.backoff_refusals,
                "peer_backoffs": backoffs,
                "in_progress": in_progress,
                "peer_pool": pool,
                "switch_time_us": self.switch_times.summary(),
                "switch_call_max_us": self.switch_call_max.summary(),
                "switch_calls_timed": self.switch_calls_timed,
                "switch_call_max_failed_us": self.switch_call_max_failed.summary(),
                "switch_calls_rejected": self.switch_calls_rejected,
                "peer_connections_dropped": dropped,
                "security": {
                    "owner_check": self.owners is not None,
                    "owner_checks": checks,
                    "owner_denials": self.owner_denials,
                    "owner_namespaces": self.owners.namespaces() if self.owners else 0,
                    "attachments": self.attachments.describe() if self.attachments else None,
                    "socket_guard": (
                        None
                        if self.guard is None
                        else {**self.guard.describe(), "error": self.guard_error}
                    ),
                    "reports_rejected": self.reports_rejected
                    + (n["reports_rejected"] if n is not None else 0),
                    "peers_rejected": rejected_peers,
                    "offers_rejected": rejected_offers,
                    "replay_cache": replay,
                    "policy": self.policy.describe(),
                    "peer_allow": list(self.cfg.peer_allow) or "overlay-map hosts",
                },
                "overlay_map": self.resolver.describe(),
                "config": {
                    "vxlan_dev": self.cfg.vxlan_dev,
                    "map": str(self.cfg.map_file) if self.cfg.map_file else None,
                    "claim_timeout_ms": self.cfg.claim_timeout_ms,
                    "switch_path": self.cfg.switch_path,
                    "log_file": str(self.cfg.log_file) if self.cfg.log_file else None,
                },
            },
            "processes": list(processes),
        }


async def run_router(cfg: RouterConfig) -> None:
    router = Router(cfg)
    await router.run()
