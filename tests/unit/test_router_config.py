"""The router's TOML: the shuntflow grace is in µs and may be 0 (offer at once); out of range it
is refused with its name and range, as a bad flag would be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shuntflow.router.config import ConfigError, build_config, load_toml
from shuntflow.router.testing import write_key_file


def config_with(tmp_path: Path, line: str) -> Path:
    (tmp_path / "map.json").write_text(json.dumps({"198.19.2.0/24": "198.18.0.2"}))
    write_key_file(tmp_path / "cluster.key")
    path = tmp_path / "router.toml"
    path.write_text(
        'socket = "r.sock"\nhost-ip = "127.0.0.1"\nmap = "map.json"\n'
        f'cluster-key = "cluster.key"\n{line}\n'
    )
    return path


def test_the_shuntflow_grace_defaults_to_150_us(tmp_path: Path) -> None:
    cfg = build_config(load_toml(config_with(tmp_path, "")), {})
    assert (cfg.follower_grace_shuntflow_us, cfg.follower_grace_ms) == (150, 5)


@pytest.mark.parametrize("value", [0, 1, 1_000_000])
def test_the_shuntflow_grace_takes_its_range(tmp_path: Path, value: int) -> None:
    path = config_with(tmp_path, f"follower-grace-shuntflow-us = {value}")
    assert build_config(load_toml(path), {}).follower_grace_shuntflow_us == value


@pytest.mark.parametrize("value", [-1, 1_000_001])
def test_the_shuntflow_grace_out_of_range_is_refused(tmp_path: Path, value: int) -> None:
    path = config_with(tmp_path, f"follower-grace-shuntflow-us = {value}")
    with pytest.raises(ConfigError, match=r"follower_grace_shuntflow_us .* must be 0\.\.1000000"):
        build_config(load_toml(path), {})
