"""A short run of the switch path's libFuzzer harnesses (switchpath/fuzz/), AddressSanitizer and
UndefinedBehaviorSanitizer on: any crash, sanitizer report or failed harness check fails the test.

`make fuzz` is the long run (a million inputs per fuzzer); this one is 20,000 each, a few
seconds. The harnesses must also be able to fail: built against a copy of the C sources with a
deliberate bug, the same short run has to find it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_fuzz() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sf_fuzz", ROOT / "scripts" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sf_fuzz"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()


@pytest.fixture(scope="module")
def built() -> None:
    fuzz.build()


@pytest.mark.parametrize("name", fuzz.FUZZERS)
def test_short_fuzz_run_finds_nothing(built: None, name: str, tmp_path: Path) -> None:
    res = fuzz.run(name, 20_000, tmp_path)
    assert res.returncode == 0, f"{name} failed:\n{res.output[-3000:]}"
    assert res.stats.startswith("#20000\tDONE"), res.stats
    assert not list(tmp_path.glob("crash-*"))


def _fuzzer_with_bug(tmp: Path, name: str, source: str, anchor: str, bug: str) -> Path:
    """`name` built as `make fuzz` builds it, from a copy of switchpath/ with one edit."""
    tree = tmp / "tree"
    shutil.copytree(
        ROOT / "switchpath", tree / "switchpath", ignore=shutil.ignore_patterns("build")
    )
    (tree / "preload").mkdir()
    shutil.copy2(ROOT / "preload" / "sf_wire.h", tree / "preload" / "sf_wire.h")
    path = tree / "switchpath" / source
    text = path.read_text()
    assert text.count(anchor) == 1, f"{source}: the anchor {anchor!r} moved"
    path.write_text(text.replace(anchor, bug))
    subprocess.run(["make", "-s", "-C", str(tree / "switchpath"), f"build/fuzz/{name}"], check=True)
    return tree / "switchpath" / "build" / "fuzz"


@pytest.mark.parametrize(
    ("name", "source", "anchor", "bug"),
    [
        # A library may now send HELLO_ACK.
        (
            "fuzz_libframe",
            "libframe.c",
            '[SF_HELLO_ACK] = "frame type HELLO_ACK may not come from a library"',
            "[SF_HELLO_ACK] = NULL",
        ),
        # A nonce forgotten one millisecond early: reachable only with MAC-valid frames.
        (
            "fuzz_peerframe_mac",
            "peerframe.c",
            "r->heap[0].expiry < now_ms",
            "r->heap[0].expiry <= now_ms",
        ),
        # A read past the received bytes: for AddressSanitizer to see.
        (
            "fuzz_peerframe",
            "peerframe.c",
            "if (len != sizeof(m)) return",
            "if (len < 4) return",
        ),
    ],
)
def test_fuzzers_find_a_planted_bug(
    name: str, source: str, anchor: str, bug: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fuzz, "FUZZ_DIR", _fuzzer_with_bug(tmp_path, name, source, anchor, bug))
    work = tmp_path / "work"
    res = fuzz.run(name, 20_000, work, seed=1)
    assert res.returncode != 0, f"{name} did not find the bug: {res.stats}"
    assert list(work.glob("crash-*")), res.output[-3000:]
