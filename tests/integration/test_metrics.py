"""The routers' Prometheus endpoints on a real testbed: `testbed status --json` names each one
(`metrics_url`, in its host's namespace), a scrape parses with prometheus-client's own parser, and
the counters move with a real switch: a redis connection driven past the threshold by a client
that keeps it open while the endpoints are scraped, its values read back byte for byte."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shuntflow.testbed import Host, Testbed

from ..support import SHUNTFLOW
from .apps import RESP_CLIENT, Apps, PathBytes, assert_path, redis_server

pytestmark = pytest.mark.root

TESTBED_PREFIX = "dy1"
TESTBED_ROUTERS = True

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# SETs of random values on one connection, then "wrote" and the bytes moved so far; on a line on
# stdin one PING (once both ends are on the host path: bytes there whatever the switch's timing),
# then "pinged" and the bytes so far; on the next line it reads every value back (printing
# "same" and the GET phase's bytes) and closes, so the scrapes see it open on the host path.
CLIENT = (
    RESP_CLIENT
    + r"""
values = [bytes.fromhex(x) for x in sys.stdin.readline().split()]
for i, v in enumerate(values):
    assert call(b"SET", b"m%d" % i, v) == b"+OK\r\n"
print("wrote", payload, flush=True)
sys.stdin.readline()
assert call(b"PING") == b"+PONG\r\n"
print("pinged", payload, flush=True)
sys.stdin.readline()
payload = 0
back = [call(b"GET", b"m%d" % i) for i in range(len(values))]
print("same" if back == values else "DIFFERENT", payload, flush=True)
"""
)


def scrape(host: Host, url: str) -> Samples:
    """Every sample of one scrape, read from inside the host's network namespace."""

    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
            return str(resp.read().decode())

    samples: Samples = {}
    for family in text_string_to_metric_families(host.in_netns(get)):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(scrapes: list[Samples], name: str, **labels: str) -> float:
    return sum(value(s, name, **labels) for s in scrapes)


def test_metrics_url_in_testbed_status(testbed: Testbed) -> None:
    out = subprocess.run(
        [SHUNTFLOW, "testbed", "status", "--json", "--prefix", TESTBED_PREFIX],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    hosts = json.loads(out)["hosts"]
    assert [h["metrics_url"] for h in hosts] == [
        f"http://{h.underlay_ip}:9477/metrics" for h in testbed.hosts
    ]
    for h, entry in zip(testbed.hosts, hosts, strict=True):
        samples = scrape(h, entry["metrics_url"])
        started = value(samples, "shuntflow_router_start_time_seconds")
        assert 0 < time.time() - started < 3600
        assert value(samples, "shuntflow_library_channels", state="connected") == 0


def test_counters_move_with_a_switch(testbed: Testbed, tmp_path: Path) -> None:
    apps = Apps(testbed)
    urls = [h.metrics_url for h in testbed.hosts]
    tmp_path.chmod(0o777)
    server = [*redis_server(apps.server_ip), "--dir", str(tmp_path)]
    values = [secrets.token_bytes(secrets.randbelow(2000) + 1) for _ in range(400)]
    with apps.server(server, "shuntflow", 6379):
        before = [scrape(h, u) for h, u in zip(testbed.hosts, urls, strict=True)]
        client = apps.python_client(CLIENT, "shuntflow")
        assert client.stdin is not None and client.stdout is not None
        try:
            client.stdin.write(" ".join(v.hex() for v in values) + "\n")
            client.stdin.flush()
            wrote = client.stdout.readline().split()
            assert wrote[0] == "wrote", wrote
            # The switch's SWITCH_DONE report reaches the router just after the switch; each
            # end's library reports its connection on the host path once it swapped.
            deadline = time.monotonic() + 10
            while True:
                during = [scrape(h, u) for h, u in zip(testbed.hosts, urls, strict=True)]
                timed = total(during, "shuntflow_switch_duration_seconds_count") - total(
                    before, "shuntflow_switch_duration_seconds_count"
                )
                on_host = all(value(s, "shuntflow_connections", path="host") >= 1 for s in during)
                if (timed >= 1 and on_host) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            client.stdin.write("\n")
            client.stdin.flush()
            pinged = client.stdout.readline().split()
            assert pinged[0] == "pinged", pinged
            set_payload = int(pinged[1])
            during = [scrape(h, u) for h, u in zip(testbed.hosts, urls, strict=True)]
            # The other end's report may have come in since the wait above saw the first one.
            timed = total(during, "shuntflow_switch_duration_seconds_count") - total(
                before, "shuntflow_switch_duration_seconds_count"
            )
            held = apps.host_connections()
            # Both ends are on the host path now (checked below): the GET phase must cross it
            # whole, and the overlay carry no more than the retired sockets' FINs.
            path_before = apps.path()
            client.stdin.write("\n")
            client.stdin.flush()
            out, err = client.communicate(timeout=60)
            path = apps.path() - path_before
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        assert client.returncode == 0 and out.startswith("same "), out + err[-2000:]
        get_payload = int(out.split()[1])

    initiated = total(during, "shuntflow_switches_total", role="initiated", result="ok") - total(
        before, "shuntflow_switches_total", role="initiated", result="ok"
    )
    accepted = total(during, "shuntflow_switches_total", role="accepted", result="ok") - total(
        before, "shuntflow_switches_total", role="accepted", result="ok"
    )
    for h, s in zip(testbed.hosts, during, strict=True):
        shown = sorted(
            f"{n}{{{','.join(f'{k}={v}' for k, v in sorted(labels))}}} {val:g}"
            for (n, labels), val in s.items()
            if val
            and n.startswith(
                ("shuntflow_switches_total", "shuntflow_connection", "shuntflow_switch_duration")
            )
            and "bucket" not in n
        )
        print(f"metrics of {h.netns} after the switch: " + "; ".join(shown))
    # One connection, one switch: one router initiated it and the other accepted the offer.
    assert initiated == 1 and accepted == 1, (initiated, accepted)
    # Each end whose library asked for the switch times it; both may have (the follower's
    # request is then served by the leader's offer).
    assert timed in (1, 2), timed
    # The histogram is whole: +Inf bucket == count, and the switch landed in a finite bucket.
    for s in during:
        count = value(s, "shuntflow_switch_duration_seconds_count")
        assert value(s, "shuntflow_switch_duration_seconds_bucket", le="+Inf") == count
    assert (
        total(during, "shuntflow_switch_duration_seconds_bucket", le="1.0")
        - total(before, "shuntflow_switch_duration_seconds_bucket", le="1.0")
        == timed
    )
    # While the client holds it, both ends' connection is on the host path, with bytes there,
    # and the host namespace holds the matching underlay socket.
    assert len(held) >= 1, held
    for s in during:
        assert value(s, "shuntflow_connections", path="host") >= 1
        assert value(s, "shuntflow_connections", path="switching") == 0
        assert value(s, "shuntflow_library_channels", state="ready") >= 1
    host_bytes = total(during, "shuntflow_connection_bytes", path="host")
    overlay_bytes = total(during, "shuntflow_connection_bytes", path="overlay")
    # The threshold is crossed on the overlay; the PING went on the host path at both ends (how
    # the SETs split between the paths depends on how soon the switch completed).
    assert host_bytes > 0 and overlay_bytes > 0, (host_bytes, overlay_bytes)
    # Each end's library counted every byte its application moved once, on one path or the
    # other: what the client sent and received so far, its SETs, the PING and their replies (the
    # handoff's own frames are not the application's). After the swap those are the fast path's
    # counts.
    for h, s in zip(testbed.hosts, during, strict=True):
        moved = value(s, "shuntflow_connection_bytes", path="host") + value(
            s, "shuntflow_connection_bytes", path="overlay"
        )
        assert moved == set_payload, (h.netns, moved, set_payload)
    assert_path("shuntflow", PathBytes(), path, get_payload, conns=1)
    for s in during:
        for reason in ("switch_denied", "offer_rejected", "peer_rejected"):
            assert value(s, "shuntflow_refusals_total", reason=reason) == 0
