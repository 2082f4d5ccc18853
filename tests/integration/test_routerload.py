"""The router load generator, tiny: idle tracked connections stay up and every churn connection
is switched by the real routers and the real library (the full-size run is
`python -m shuntflow.bench.routerload`, see its docstring). Counts only, never timings."""

from __future__ import annotations

import pytest

from shuntflow.bench.routerload import Params, run
from shuntflow.testbed import Testbed

from .conftest import MakeTestbed

pytestmark = pytest.mark.root

IDLE, SWITCHES = 500, 200


def test_router_load_tiny(make_testbed: MakeTestbed) -> None:
    tb: Testbed = make_testbed("fz2", hosts=2, containers=1, routers=True)
    r = run(tb, Params(idle=IDLE, switches=SWITCHES, rate=200, switch_timeout=20, sample_every=50))
    assert r["idle_phase"]["idle"] == IDLE and not r["idle_phase"]["errors"]
    # every idle connection is tracked by the library at both ends, before and after the churn
    assert r["tracked_before"] == {1: IDLE, 2: IDLE}
    assert r["tracked_after"] == {1: IDLE, 2: IDLE}
    churn = r["churn"]
    assert churn["started"] == SWITCHES and churn["errors"] == 0, churn
    # a connection that happens to reuse a just-switched 4-tuple stays on the overlay (README,
    # Limits); every other one is switched
    assert churn["timed_out"] == churn["timed_out_reused"], churn
    assert churn["switched"] == SWITCHES - churn["timed_out"], churn
    assert churn["latency_us"]["count"] == churn["switched"]
    assert churn["idle_still_open"] == IDLE
    routers = r["routers"]
    # one initiated switch per switched connection, each accepted by the other router
    switched = churn["switched"]
    assert routers[1]["switches_initiated"] + routers[2]["switches_initiated"] == switched
    assert routers[1]["switches_accepted"] + routers[2]["switches_accepted"] == switched
    for x in routers.values():
        assert x["handoffs_lost"] == 0
        # what a router refused, from its log: at most the crossing offers of one connection
        # and the reused tuples, both DUPLICATE
        assert all(" DUPLICATE: " in why for why in x["refusals_logged"]), x["refusals_logged"]
        assert x["switch_req_res_us"]["count"] >= x["switches_initiated"]
    assert r["server"]["accepted"] == IDLE + SWITCHES
    assert r["server"]["closed"] >= SWITCHES  # the idle ones close as the client exits
    # a footprint sample at the start, one per 50 connections seen switched, one at rest after
    # the warm-up (80 switched: 40 % of 200) and one at the end, each with both routers' RSS and
    # fds read from /proc
    samples = r["samples"]
    quiet = [s for s in samples if s.get("quiet")]
    assert len(quiet) == 2 and quiet[-1] is samples[-1], samples
    assert quiet[0]["switched"] >= 80
    progress = [s["switched"] for s in samples[1:-1] if not s.get("quiet")]
    assert [0, *progress, switched] == [0, *range(50, switched + 1, 50), switched]
    for s in samples:
        for i in (1, 2):
            assert s["routers"][i]["rss_kib"] > 0 and s["routers"][i]["fds"] > 0, s
    assert set(r["footprint"]) == {1, 2}
    assert r["footprint"][1]["reference_at_switches"] == quiet[0]["switched"]
