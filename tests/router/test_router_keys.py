"""Two routers on loopback whose cluster keys differ never switch: the peer rejects the OFFER's
MAC and the asking library gets PEER_UNREACHABLE, no fd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shuntflow.router.testing import FakeLibrary, RouterProcess, free_port, write_key_file
from shuntflow.wire import Status, Tuple4

pytestmark = pytest.mark.router


def test_routers_with_different_keys_never_switch(tmp_path: Path) -> None:
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps({"198.19.1.0/24": "127.0.0.1", "198.19.2.0/24": "127.0.0.2"}))
    port = free_port()
    a = RouterProcess(tmp_path / "a.sock", "127.0.0.1", port, ["--map", str(map_file)])
    try:
        b = RouterProcess(
            tmp_path / "b.sock",
            "127.0.0.2",
            port,
            ["--map", str(map_file)],
            key_file=write_key_file(tmp_path / "b.key", b"another cluster's key, 32+ bytes!"),
        )
        try:
            t = Tuple4.parse("198.19.1.1:30000", "198.19.2.1:80")
            with FakeLibrary(a.socket) as la, FakeLibrary(b.socket, owned={t.mirrored()}) as lb:
                res = la.wait_result(la.request(t))
                assert res.msg.status == Status.PEER_UNREACHABLE and res.sock is None
                assert not lb.claims and not lb.host
            assert "event=offer_rejected" in b.log() and 'reason="bad MAC"' in b.log()
            assert b.status()["router"]["security"]["offers_rejected"] == 1
        finally:
            b.stop()
    finally:
        a.stop()
