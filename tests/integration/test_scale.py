"""All to all: every container of a testbed connects to every container on another host at
once, each connection a stream checked byte for byte at both ends while it switches
(shuntflow.bench.scale, `shuntflow scale`).

CI runs 4 hosts x 4 containers (192 connections at once); `pytest --long` adds 8 x 8 (3,584).
Counts, bytes and paths only, never timings: every connection completes intact at both ends,
no byte is wrong or missing, every ordered host pair switched at least one connection (its
socket's SO_NETNS_COOKIE is its host's namespace), and the kernels' counters of both paths
account for the bytes.
"""

from __future__ import annotations

import pytest

from shuntflow.bench import scale
from shuntflow.testbed import Testbed

from .apps import install_path_counters, read_path
from .conftest import MakeTestbed

pytestmark = pytest.mark.root


def run_checked(tb: Testbed, params: scale.Params) -> dict[str, object]:
    install_path_counters(tb)
    before = read_path(tb)
    r = scale.run(tb, params)
    paths = read_path(tb) - before
    n = len(tb.hosts) * len(tb.hosts[0].containers)
    expected = n * (n - len(tb.hosts[0].containers))
    assert r["expected_connections"] == expected
    c, s = r["totals"]["client"], r["totals"]["server"]
    assert r["bad_headers"] == 0
    for end in (c, s):
        assert end["connections"] == expected, (end, r["failures"])
        assert end["missing"] == 0 and end["bad"] == 0, (end, r["failures"])
        assert end["ok"] == expected
        assert end["bad_bytes"] == 0, end
        assert end["cookie_errors"] == 0, end
        # nothing signals the processes or resets a connection: no MSG_WAITALL read came back
        # short before its stream's end
        assert end["waitall_short"] == 0, end
    # every byte one end sent the other read, and checked
    assert c["received"] + s["received"] == r["bytes_checked"] == c["bytes"] == s["bytes"]
    assert r["bad_bytes"] == 0
    # every ordered host pair (client's host, server's host) moved a connection to the host path
    assert r["pairs_without_switch"] == [], r["pairs"]
    assert all(p["connections"] == expected // len(r["pairs"]) for p in r["pairs"].values())
    assert c["switched"] > 0 and s["switched"] > 0
    # The kernels: bytes written on a host socket crossed only the host path (each direction is
    # counted once, at the sending host's output hook), and every byte crossed one path or the
    # other.
    on_host = c["host_sent"] + s["host_sent"]
    assert on_host > 0
    assert paths.host_payload >= on_host, (paths, on_host)
    assert paths.overlay_payload + paths.host_payload >= c["bytes"], (paths, c["bytes"])
    # every router still runs and was sampled
    for x in r["routers"].values():
        assert x["after"]["rss_kib"] > 0 and x["after"]["fds"] > 0
    assert r["passed"]
    return r


def test_all_to_all_4x4(make_testbed: MakeTestbed) -> None:
    tb = make_testbed("sc", hosts=4, containers=4, routers=True)
    run_checked(tb, scale.Params(timeout=240))


@pytest.mark.long
@pytest.mark.timeout(2400)  # the processes' own hang bound is 1800 s
def test_all_to_all_8x8(make_testbed: MakeTestbed) -> None:
    tb = make_testbed("sc", hosts=8, containers=8, routers=True)
    r = run_checked(tb, scale.Params(timeout=1800))
    print("\n" + scale.summary(r))
