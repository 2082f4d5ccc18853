"""Options and markers shared by every test: `--long`, and the groups, by what a test needs.

- tests/unit: nothing: pure logic, no root, no router process (marked neither `root` nor
  `router`);
- tests/router: real router processes on loopback, no root (every test marked `router`);
- tests/integration: root: network namespaces (the testbed, or a namespace of its own), BPF, the
  library against real routers (every test marked `root`).

The directory and the marker must agree: collection stops with the tests where they do not. A
test marked `root` fails without root with a message saying so, never skips, so a run without
root is never green by accident. To run only the tests that need no root: `pytest -m "not root"`
(or `pytest tests/unit tests/router`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# The marker each group's tests carry; a group's tests carry no other group's marker.
GROUP_MARKERS = {"unit": None, "router": "router", "integration": "root"}

NEEDS_ROOT = (
    "this test needs root (network namespaces, routers, the preload library on a testbed): "
    "run the suite as root, or only the tests that need no root with -m 'not root'"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long", action="store_true", default=False, help="also run tests marked `long`"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_long = pytest.mark.skip(reason="long-running variant; run with --long")
    misplaced = []
    for item in items:
        if item.get_closest_marker("long") and not config.getoption("--long"):
            item.add_marker(skip_long)
        problem = group_problem(item)
        if problem:
            misplaced.append(f"{item.nodeid}: {problem}")
    if misplaced:
        raise pytest.UsageError(
            "tests whose directory and markers disagree (tests/conftest.py says which goes "
            "where):\n" + "\n".join(misplaced)
        )


def group_problem(item: pytest.Item) -> str | None:
    """Why `item`'s markers do not fit its directory's group, None if they do."""
    try:
        group = Path(item.path).resolve().relative_to(TESTS).parts[0]
    except ValueError:
        return None  # not one of ours
    if group not in GROUP_MARKERS:
        return f"tests/{group} is no group ({', '.join(GROUP_MARKERS)})"
    want = GROUP_MARKERS[group]
    if want is not None and not item.get_closest_marker(want):
        return f"a test in tests/{group} must be marked `{want}`"
    others = [m for m in GROUP_MARKERS.values() if m not in (None, want)]
    wrong = [m for m in others if item.get_closest_marker(m)]
    if wrong:
        return f"a test in tests/{group} must not be marked `{wrong[0]}`"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.fail(NEEDS_ROOT, pytrace=False)
