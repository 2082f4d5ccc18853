"""The router's Prometheus endpoint without a testbed: address parsing, how a status() answer
becomes metric families, and a real scrape of RouterMetrics over 127.0.0.1, parsed with
prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shuntflow.router.config import ConfigError, build_config
from shuntflow.router.metrics import MetricsAddressError, RouterMetrics, parse_address

STATUS: dict[str, Any] = {
    "router": {
        "switches_initiated": 7,
        "switches_accepted": 5,
        "failures": {
            "DENIED": 2,
            "NO_ROUTE": 1,
            "offer_DENIED": 3,
            "offer_PEER_REFUSED": 4,
            "claim_DENIED": 6,
        },
        "handoffs_lost": 1,
        "clients": 3,
        "clients_ready": 2,
        "clients_accepted": 9,
        "clients_rejected": 8,
        "backoff_refusals": 11,
        "in_progress": 1,
        "started_at": 1700000000.5,
        "security": {"owner_denials": 2, "offers_rejected": 12, "peers_rejected": 13},
    },
    "processes": [
        {
            "complete": True,
            "connections": [
                {"path": "host", "overlay_bytes": 100, "host_bytes": 5000},
                {"path": "overlay", "overlay_bytes": 70, "host_bytes": 0},
                {"path": "switching", "overlay_bytes": 30, "host_bytes": 0},
            ],
        },
        {"complete": False, "connections": []},
    ],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9477", ("127.0.0.1", 9477)), ("0.0.0.0:80", ("0.0.0.0", 80))],
)
def test_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9477", ":9477", "1.2.3.4:", "1.2.3.4:0", "x.y:9477", "a:70000"])
def test_bad_address(text: str) -> None:
    with pytest.raises(MetricsAddressError, match="--metrics"):
        parse_address(text)


def test_bad_address_is_a_config_error(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("k" * 64)
    key.chmod(0o600)
    base = {"socket": tmp_path / "s", "host_ip": "127.0.0.1", "vxlan_dev": "vx0"}
    with pytest.raises(ConfigError, match="--metrics 'nope'"):
        build_config({}, {**base, "cluster_key": key, "metrics": "nope"})
    assert build_config({}, {**base, "cluster_key": key, "metrics": "127.0.0.1:1"}).metrics


def test_scrape() -> None:
    port = free_port()

    async def status() -> dict[str, Any]:
        return STATUS

    async def main() -> str:
        metrics = RouterMetrics(f"127.0.0.1:{port}", asyncio.get_running_loop(), status)
        metrics.start()
        try:
            for us in (400, 1200, 1200, 2_000_000):
                metrics.switch_done(us)

            def get() -> str:
                url = f"http://127.0.0.1:{port}/metrics"
                with urllib.request.urlopen(url, timeout=10) as resp:
                    return str(resp.read().decode())

            # The scrape thread needs the loop free to run status() on it.
            return await asyncio.to_thread(get)
        finally:
            metrics.close()

    samples = parse(asyncio.run(main()))

    def v(name: str, **labels: str) -> float:
        return samples[(f"shuntflow_{name}", frozenset(labels.items()))]

    assert v("switches_total", role="initiated", result="ok") == 7
    assert v("switches_total", role="accepted", result="ok") == 5
    assert v("switches_total", role="initiated", result="denied") == 2
    assert v("switches_total", role="initiated", result="no_route") == 1
    assert v("switches_total", role="accepted", result="denied") == 3
    assert v("switches_total", role="accepted", result="peer_refused") == 4
    assert v("handoffs_lost_total") == 1
    assert {
        r: v("refusals_total", reason=r)
        for r in (
            "switch_denied",
            "claim_denied",
            "offer_denied",
            "offer_rejected",
            "peer_rejected",
            "client_rejected",
            "backoff",
        )
    } == {
        "switch_denied": 2,
        "claim_denied": 6,
        "offer_denied": 3,
        "offer_rejected": 12,
        "peer_rejected": 13,
        "client_rejected": 8,
        "backoff": 11,
    }
    assert v("owner_denials_total") == 2
    assert [v("connections", path=p) for p in ("overlay", "switching", "host", "pinned")] == [
        1,
        1,
        1,
        0,
    ]
    assert v("connection_bytes", path="overlay") == 200
    assert v("connection_bytes", path="host") == 5000
    assert v("library_channels", state="connected") == 3
    assert v("library_channels", state="ready") == 2
    assert v("library_channels", state="unanswered") == 1
    assert v("library_channels_accepted_total") == 9
    assert v("switches_in_progress") == 1
    assert v("router_start_time_seconds") == 1700000000.5
    assert v("switch_duration_seconds_count") == 4
    assert v("switch_duration_seconds_sum") == pytest.approx(2.0028)
    assert v("switch_duration_seconds_bucket", le="0.0005") == 1
    assert v("switch_duration_seconds_bucket", le="0.0015") == 3
    assert v("switch_duration_seconds_bucket", le="1.0") == 3
    assert v("switch_duration_seconds_bucket", le="+Inf") == 4


def test_port_in_use_is_an_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        async def status() -> dict[str, Any]:
            return STATUS

        async def main() -> None:
            metrics = RouterMetrics(f"127.0.0.1:{port}", asyncio.get_running_loop(), status)
            with pytest.raises(OSError):
                metrics.start()

        asyncio.run(main())
