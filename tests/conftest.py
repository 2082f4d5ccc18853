"""Options and markers shared by every test: `--long`, and skipping `root` tests without root."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long", action="store_true", default=False, help="also run tests marked `long`"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_long = pytest.mark.skip(reason="long-running variant; run with --long")
    skip_root = pytest.mark.skip(reason="needs root for network namespaces")
    is_root = os.geteuid() == 0
    for item in items:
        if item.get_closest_marker("long") and not config.getoption("--long"):
            item.add_marker(skip_long)
        if item.get_closest_marker("root") and not is_root:
            item.add_marker(skip_root)
