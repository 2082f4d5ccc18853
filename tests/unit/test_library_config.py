"""The library's own reading of SHUNTFLOW_THRESHOLD: the range the CLI enforces
(shuntflow.native.MAX_THRESHOLD) is the one the library takes, and a value out of it is logged
with that range and replaced by the default rather than taken or wrapped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shuntflow.native import DEFAULT_THRESHOLD, MAX_THRESHOLD, Mode, app_environment


def library_log(tmp_path: Path, threshold: str) -> str:
    log = tmp_path / "lib.log"
    env = app_environment(Mode.SHUNTFLOW, router_socket=tmp_path / "none.sock", log=str(log))
    env["SHUNTFLOW_THRESHOLD"] = threshold
    done = subprocess.run([sys.executable, "-c", "pass"], env={**os.environ, **env}, timeout=30)
    assert done.returncode == 0
    return log.read_text()


@pytest.mark.parametrize("value", [1, 4, MAX_THRESHOLD])
def test_threshold_in_range_is_taken(tmp_path: Path, value: int) -> None:
    text = library_log(tmp_path, str(value))
    assert f" threshold={value} " in text, text
    assert "SHUNTFLOW_THRESHOLD=" not in text, text


@pytest.mark.parametrize("value", ["0", "-3", str(MAX_THRESHOLD + 1), str(1 << 32), "64x"])
def test_threshold_out_of_range_is_named_and_replaced(tmp_path: Path, value: str) -> None:
    text = library_log(tmp_path, value)
    assert f"SHUNTFLOW_THRESHOLD={value} is not a whole number from 1 to {MAX_THRESHOLD}" in text
    assert f" threshold={DEFAULT_THRESHOLD} " in text, text
