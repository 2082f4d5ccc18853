"""The router load bench's count of refusals, read from router log lines as the routers write
them (key=value, quoted values with escapes)."""

from __future__ import annotations

from shuntflow.bench.routerload import refusals

T = "ts=2026-12-05T00:54:21.001Z level=info"
LOG = "\n".join(
    [
        f"{T} event=switch_done how=initiated client=1 seq=1 tuple=198.19.1.1:1->198.19.2.1:9101",
        f"{T} event=switch_failed client=5 seq=11912 tuple=198.19.2.1:9103->198.19.1.1:28236"
        ' status=INTERNAL detail="too many outstanding requests (max_outstanding 4096)"',
        f"{T} event=switch_failed client=5 seq=11913 tuple=198.19.2.1:9103->198.19.1.1:28237"
        ' status=INTERNAL detail="too many outstanding requests (max_outstanding 4096)"',
        f"{T} event=offer_refused peer=198.18.0.1 tuple=198.19.2.1:9103->198.19.1.1:28236"
        ' status=PEER_REFUSED detail="claim timed out"',
        f"{T} event=claim_denied client=2 seq=7 tuple=198.19.2.1:9103->198.19.1.1:1"
        ' status=DENIED detail="owner: said \\"mine\\" = no"',
        f"{T} event=claim_res_late client=2 seq=9 ok=True answer=TIMEOUT",
        f'{T} event=peer_dropped peer=198.18.0.1 reason="too many incoming offers"',
    ]
).encode()


def test_refusals_by_event_status_and_detail() -> None:
    assert refusals(LOG) == {
        "switch_failed INTERNAL: too many outstanding requests (max_outstanding 4096)": 2,
        "offer_refused PEER_REFUSED: claim timed out": 1,
        'claim_denied DENIED: owner: said \\"mine\\" = no': 1,
        "peer_dropped ?: too many incoming offers": 1,
    }
    assert next(iter(refusals(LOG))).startswith("switch_failed INTERNAL")  # most frequent first
    assert refusals(b"") == {}
