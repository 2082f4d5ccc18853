"""The mutation check's table still fits the code: every mutant's anchors apply exactly once.

`make mutants` (scripts/mutants.py) is too long for `make test`; this keeps a refactor that moves
the mutated code from silently leaving a mutant with nothing to break."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_mutants() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sf_mutants", ROOT / "scripts" / "mutants.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_exactly_once_to_this_tree() -> None:
    mutants = load_mutants()
    assert mutants.anchor_problems(ROOT) == []
    assert len(mutants.MUTANTS) >= 6


def test_each_mutant_changes_its_files(tmp_path: Path) -> None:
    mutants = load_mutants()
    for m in mutants.MUTANTS:
        tree = tmp_path / m.name
        paths = {e.path for e in m.edits}
        for rel in paths:
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            (tree / rel).write_bytes((ROOT / rel).read_bytes())
        mutants.apply(tree, m)
        changed = {rel for rel in paths if (tree / rel).read_bytes() != (ROOT / rel).read_bytes()}
        assert changed == paths, m.name


@pytest.mark.parametrize("count", [0, 2])
def test_a_moved_anchor_names_the_mutant_and_the_file(tmp_path: Path, count: int) -> None:
    mutants = load_mutants()
    m = next(m for m in mutants.MUTANTS if m.name == "byte-dropped")
    edit = m.edits[0]
    target = tmp_path / edit.path
    target.parent.mkdir(parents=True)
    target.write_text("/* code moved */\n" + edit.anchor * count)
    with pytest.raises(mutants.AnchorError) as err:
        mutants.apply(tmp_path, m)
    text = str(err.value)
    assert "'byte-dropped'" in text and edit.path in text and f"found {count} times" in text
    assert target.read_text() == "/* code moved */\n" + edit.anchor * count  # left untouched
