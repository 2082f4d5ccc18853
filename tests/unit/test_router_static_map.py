"""The router's static overlay map (--map): longest prefix wins, and a bad file is a MapError."""

from __future__ import annotations

import json
from ipaddress import IPv4Address as IP
from pathlib import Path

import pytest

from shuntflow.router.overlay_map import MapError, StaticMap


def test_static_map_parsing(tmp_path: Path) -> None:
    m = StaticMap(
        {"198.19.0.0/16": "198.18.0.9", "198.19.2.0/24": "198.18.0.2", "198.19.2.7": "198.18.0.7"}
    )
    assert m.lookup(IP("198.19.2.7")) == IP("198.18.0.7")  # longest prefix wins
    assert m.lookup(IP("198.19.2.8")) == IP("198.18.0.2")
    assert m.lookup(IP("198.19.5.1")) == IP("198.18.0.9")
    assert m.lookup(IP("10.0.0.1")) is None
    bad = tmp_path / "bad.json"
    for content in ("[1, 2]", '{"198.19.2.1": 5}', "{not json", '{"x": "198.18.0.1"}'):
        bad.write_text(content)
        with pytest.raises(MapError):
            StaticMap.load(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"198.19.2.1": "198.18.0.2"}))
    assert StaticMap.load(good).lookup(IP("198.19.2.1")) == IP("198.18.0.2")
