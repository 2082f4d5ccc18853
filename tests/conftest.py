"""Options and markers shared by every test: `--long`, and `root` tests that fail without root.

A test marked `root` builds network namespaces or runs the library against real routers: as a
non-root user it fails with a message saying so, never skips, so a run without root is never
green by accident. To run only the tests that need no root: `pytest -m "not root"`.
"""

from __future__ import annotations

import os

import pytest

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
    for item in items:
        if item.get_closest_marker("long") and not config.getoption("--long"):
            item.add_marker(skip_long)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.fail(NEEDS_ROOT, pytrace=False)
