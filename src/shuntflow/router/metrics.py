# The router's Prometheus endpoint (`shuntflow router --metrics HOST:PORT`).
#
# Why built from status() at scrape time: the switch path already keeps every counter the
# operator needs (status() serves them to `shuntflow status`), so a scrape reads those instead of
# adding work per frame. The one exception is the switch-time histogram: its buckets must count
# every sample, which the status window (recent samples only) cannot give after the fact, so
# on_switch_done observes it -- after the switch, off its path.
#
# The HTTP server is prometheus-client's own (a thread); a scrape runs the router's status()
# on the event loop (run_coroutine_threadsafe), so every figure is read on the loop thread,
# consistent with itself, with no lock added to the router.

# prometheus-client is imported only where a router serves metrics: every `shuntflow` command
# loads this module (for parse_address, through the router's config), and the import costs them
# a fifth of a second.

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector

NAMESPACE = "shuntflow"
# Switch times run from ~0.5 ms (warm, idle) to tens of ms (a starved agent thread); the
# buckets resolve the 1-3 ms where a lone switch lands on a small machine.
SWITCH_BUCKETS = (
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
SCRAPE_TIMEOUT_S = 5.0
PATHS = ("overlay", "switching", "host", "pinned")


class MetricsAddressError(ValueError):
    """A --metrics value that is not HOST:PORT."""


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv4 address or `localhost`; `0.0.0.0` for every address) -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise MetricsAddressError(f"--metrics {text!r}: use HOST:PORT, e.g. 127.0.0.1:9477")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise MetricsAddressError(f"--metrics {text!r}: port {port} is not a TCP port (1-65535)")
    if host != "localhost":
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise MetricsAddressError(
                f"--metrics {text!r}: {host!r} is not an IPv4 address"
            ) from None
    return host, port


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(f"{NAMESPACE}_{name}", doc, labels=labels)


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, labels=labels)


def families(status: dict[str, Any]) -> list[Metric]:
    """The metric families one `status()` answer gives (everything but the histogram)."""
    r = status["router"]
    failures: dict[str, int] = r.get("failures", {})
    sec: dict[str, Any] = r.get("security", {})
    out: list[Metric] = []

    switches = _counter(
        "switches",
        "Switches this router worked on, by role (initiated: for a library's request; accepted: "
        "for a peer router's offer) and result (ok, or the status it refused or failed with).",
        ["role", "result"],
    )
    switches.add_metric(["initiated", "ok"], r["switches_initiated"])
    switches.add_metric(["accepted", "ok"], r["switches_accepted"])
    for key, n in sorted(failures.items()):
        if key.startswith("offer_"):
            switches.add_metric(["accepted", key.removeprefix("offer_").lower()], n)
        elif key.startswith("claim_"):
            continue  # a library that claimed a connection it does not hold: a refusal below
        else:
            switches.add_metric(["initiated", key.lower()], n)
    out.append(switches)

    lost = _counter(
        "handoffs_lost", "Host connections whose library went away before it got the fd.", []
    )
    lost.add_metric([], r.get("handoffs_lost", 0))
    out.append(lost)

    refusals = _counter(
        "refusals",
        "Requests the router turned down, by reason: switch_denied (a library's request: not "
        "its connection, or policy), claim_denied (a library claimed a "
        "connection its namespace does not hold), offer_denied (a peer's offer: policy or "
        "address ownership), offer_rejected (bad MAC, stale or replayed offer), peer_rejected "
        "(a peer port connection from a source not allowed), client_rejected (a library channel "
        "over max-clients or the per-namespace cap), backoff (a request for a peer in backoff).",
        ["reason"],
    )
    for reason, n in (
        ("switch_denied", failures.get("DENIED", 0)),
        ("claim_denied", failures.get("claim_DENIED", 0)),
        ("offer_denied", failures.get("offer_DENIED", 0)),
        ("offer_rejected", sec.get("offers_rejected", 0)),
        ("peer_rejected", sec.get("peers_rejected", 0)),
        ("client_rejected", r.get("clients_rejected", 0)),
        ("backoff", r.get("backoff_refusals", 0)),
    ):
        refusals.add_metric([reason], n)
    out.append(refusals)

    owner = _counter(
        "owner_denials", "Requests refused because the asking namespace did not hold them.", []
    )
    owner.add_metric([], sec.get("owner_denials", 0))
    out.append(owner)

    conns: dict[str, int] = dict.fromkeys(PATHS, 0)
    nbytes = {"overlay": 0, "host": 0}
    unanswered = 0
    for proc in status.get("processes", []):
        if not proc.get("complete"):
            unanswered += 1
        for row in proc.get("connections", []):
            conns[row["path"]] = conns.get(row["path"], 0) + 1
            nbytes["overlay"] += int(row.get("overlay_bytes") or 0)
            nbytes["host"] += int(row.get("host_bytes") or 0)
    by_path = _gauge(
        "connections",
        "TCP connections the libraries on this host track now, by path (overlay, switching, "
        "host; pinned: kept on the overlay for good, e.g. after splice).",
        ["path"],
    )
    for path, n in conns.items():
        by_path.add_metric([path], n)
    out.append(by_path)

    bytes_by_path = _gauge(
        "connection_bytes",
        "Bytes the connections tracked now have carried, by path (a connection's bytes leave "
        "this sum when it closes).",
        ["path"],
    )
    for path, n in nbytes.items():
        bytes_by_path.add_metric([path], n)
    out.append(bytes_by_path)

    channels = _gauge(
        "library_channels",
        "Library channels (one per process with the library loaded), by state: connected "
        "(all), ready (said HELLO), unanswered (did not answer this scrape's stats request).",
        ["state"],
    )
    channels.add_metric(["connected"], r.get("clients", 0))
    channels.add_metric(["ready"], r.get("clients_ready", 0))
    channels.add_metric(["unanswered"], unanswered)
    out.append(channels)

    accepted = _counter(
        "library_channels_accepted", "Library channels accepted since the router started.", []
    )
    accepted.add_metric([], r.get("clients_accepted", 0))
    out.append(accepted)

    in_progress = _gauge("switches_in_progress", "Switches being negotiated now.")
    in_progress.add_metric([], r.get("in_progress", 0))
    out.append(in_progress)

    started = _gauge("router_start_time_seconds", "When the router started, Unix time.")
    started.add_metric([], r.get("started_at", 0))
    out.append(started)
    return out


class _StatusCollector:
    """A prometheus-client collector (collect/describe) over the router's status()."""

    def __init__(self, loop: asyncio.AbstractEventLoop, source: Callable[[], Awaitable[Any]]):
        self.loop = loop
        self.source = source

    def collect(self) -> Iterator[Metric]:
        async def status() -> dict[str, Any]:
            result: dict[str, Any] = await self.source()
            return result

        future = asyncio.run_coroutine_threadsafe(status(), self.loop)
        yield from families(future.result(SCRAPE_TIMEOUT_S))

    def describe(self) -> list[Metric]:
        return []  # collected on demand only: registering must not run a scrape


class RouterMetrics:
    """The registry and HTTP endpoint of one router."""

    def __init__(
        self,
        address: str,
        loop: asyncio.AbstractEventLoop,
        status: Callable[[], Awaitable[dict[str, Any]]],
    ) -> None:
        from prometheus_client import CollectorRegistry, Histogram

        self.host, self.port = parse_address(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.switch_seconds = Histogram(
            "switch_duration_seconds",
            "Switch time the initiating libraries report: threshold crossed to the first byte "
            "on the host path.",
            namespace=NAMESPACE,
            buckets=SWITCH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(cast("Collector", _StatusCollector(loop, status)))
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> None:
        """Listen; OSError (address in use, not this host's) goes to the caller."""
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(
            self.port, addr=self.host, registry=self.registry
        )

    def switch_done(self, micros: int) -> None:
        self.switch_seconds.observe(micros / 1e6)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
