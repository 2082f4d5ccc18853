"""The all-to-all run's arithmetic and options, without a testbed: what counts as passed."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from typer.testing import CliRunner

from shuntflow import torture
from shuntflow.bench import scale
from shuntflow.cli import app
from shuntflow.testbed import Testbed
from shuntflow.testbed.nodes import plan_hosts


def end(peers: dict[str, list[int]], switched: int) -> dict[str, Any]:
    n = sum(v[0] for v in peers.values())
    return {
        "connections": n,
        "ok": n,
        "bad": 0,
        "missing": 0,
        "switched": switched,
        "cookie_errors": 0,
        "waitall_short": 0,
        "bytes": 200 * n,
        "received": 100 * n,
        "host_sent": 50 * n,
        "bad_bytes": 0,
        "failures": [],
        "per_peer": peers,
    }


def clean() -> tuple[Testbed, dict[str, dict[str, Any]]]:
    """2 hosts x 2 containers, every connection switched at both ends."""
    tb = Testbed("x", plan_hosts("x", 2, 2), {})
    summaries = {}
    for c in tb.containers:
        peers = {o.overlay_ip: [1, 1, 200] for o in tb.containers if o.host_index != c.host_index}
        summaries[c.name] = {"bad_headers": 0, "client": end(peers, 2), "server": end(peers, 2)}
    return tb, summaries


def test_all_intact_and_switched_passes() -> None:
    tb, summaries = clean()
    r = scale.aggregate(tb, summaries)
    assert r["expected_connections"] == 8
    assert r["bytes_checked"] == 1600 and r["bad_bytes"] == 0
    assert r["pairs"] == {
        "1->2": {"connections": 4, "switched_client": 4, "switched_server": 4},
        "2->1": {"connections": 4, "switched_client": 4, "switched_server": 4},
    }
    assert r["pairs_without_switch"] == [] and r["passed"]


def test_a_bad_byte_fails() -> None:
    tb, summaries = clean()
    summaries["x-h2-c1"]["server"]["bad_bytes"] = 1
    r = scale.aggregate(tb, summaries)
    assert r["bad_bytes"] == 1 and not r["passed"]


def test_a_missing_connection_fails() -> None:
    tb, summaries = clean()
    summaries["x-h1-c2"]["client"]["ok"] -= 1
    assert not scale.aggregate(tb, summaries)["passed"]


def test_a_host_pair_without_a_switch_fails() -> None:
    tb, summaries = clean()
    for c in tb.hosts[0].containers:  # host 1's clients and host 2's servers: none switched
        s = summaries[c.name]["client"]
        s["per_peer"] = {ip: [n, 0, b] for ip, (n, _, b) in s["per_peer"].items()}
    for c in tb.hosts[1].containers:
        s = summaries[c.name]["server"]
        s["per_peer"] = {ip: [n, 0, b] for ip, (n, _, b) in s["per_peer"].items()}
    r = scale.aggregate(tb, copy.deepcopy(summaries))
    assert r["pairs_without_switch"] == ["1->2"] and not r["passed"]
    # one end's cookie is enough to prove the pair
    summaries["x-h2-c1"]["server"]["per_peer"]["198.19.1.1"][1] = 1
    assert scale.aggregate(tb, summaries)["passed"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hosts", "1"], "--hosts must be between 2 and 20"),
        (["--containers", "0"], "--containers must be between 1 and 20"),
        (["--style", "blocking"], "--style must be one of"),
        (["--min-bytes", "100", "--max-bytes", "10"], "--max-bytes must be between 100"),
        (["--prefix", "Bad"], "invalid prefix"),
    ],
)
def test_scale_options_are_checked(args: list[str], message: str) -> None:
    r = CliRunner().invoke(app, ["scale", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_torture_counts_bad_bytes() -> None:
    """A wrong byte counts once, bytes past the stream's end each; the first bad offset stays."""
    r = torture.ConnResult(0, expected=10)
    plan = torture.Plan(random.Random(0), 0.0, 10)
    side = torture.Side(None, r, b"", bytes(range(10)), plan, torture.Cookies(1))  # type: ignore[arg-type]
    side.check(bytes([0, 1, 9, 3]))
    side.check(bytes(range(4, 12)))
    assert (r.bad_bytes, r.first_bad, r.received) == (3, 2, 10)
