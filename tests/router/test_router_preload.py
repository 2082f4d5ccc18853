"""`make test-asan`'s plumbing: SHUNTFLOW_ROUTER_PRELOAD puts a library (the AddressSanitizer
runtime) first into every router process the tests start, and only there.

A switch path built with AddressSanitizer can only be loaded into a process whose first library
is the ASan runtime; these tests check the router comes up that way and still works, and that
nothing changes when the variable is unset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shuntflow.native import router_command
from shuntflow.router.testing import RouterProcess, free_port

pytestmark = pytest.mark.router

ASAN_RUNTIME = subprocess.run(
    ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
).stdout.strip()


def test_router_command_unchanged_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHUNTFLOW_ROUTER_PRELOAD", raising=False)
    argv = [sys.executable, "-m", "shuntflow.router", "--socket", "/x"]
    assert router_command(argv) == argv


def test_router_command_preloads_and_keeps_asan_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHUNTFLOW_ROUTER_PRELOAD", "/lib/a.so")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("ASAN_OPTIONS", raising=False)
    assert router_command(["r"]) == [
        "env",
        "LD_PRELOAD=/lib/a.so",
        "ASAN_OPTIONS=detect_leaks=0",
        "r",
    ]
    monkeypatch.setenv("LD_PRELOAD", "/lib/b.so")
    monkeypatch.setenv("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1")
    assert router_command(["r"]) == [
        "env",
        "LD_PRELOAD=/lib/a.so:/lib/b.so",  # the sanitizer runtime must come first
        "ASAN_OPTIONS=detect_leaks=1:abort_on_error=1",
        "r",
    ]


def test_router_runs_with_the_asan_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Path(ASAN_RUNTIME).is_file(), ASAN_RUNTIME
    monkeypatch.setenv("SHUNTFLOW_ROUTER_PRELOAD", ASAN_RUNTIME)
    monkeypatch.delenv("ASAN_OPTIONS", raising=False)
    (tmp_path / "map.json").write_text(json.dumps({}))
    r = RouterProcess(
        tmp_path / "h1" / "router.sock",
        "127.0.0.1",
        free_port(),
        ["--map", str(tmp_path / "map.json")],
    )
    try:
        maps = Path(f"/proc/{r.pid}/maps").read_text()
        asan = os.path.basename(os.path.realpath(ASAN_RUNTIME))
        assert asan in maps, f"{asan} not mapped into the router"
        environ = Path(f"/proc/{r.pid}/environ").read_bytes().split(b"\0")
        assert b"ASAN_OPTIONS=detect_leaks=0" in environ
        assert r.status()["router"]["clients"] == 0  # it serves its control socket
    finally:
        assert r.stop() == 0
