"""Bad conditions that must cost nothing but speed: no router at all. (A router killed mid-run:
test_fault_injection.py.)

Every byte is checked by the torture pair; the connections must simply stay on the overlay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shuntflow.testbed import Testbed

from .apps import assert_intact, run_torture

pytestmark = pytest.mark.root


@pytest.fixture
def faultbed(make_testbed: Any) -> Testbed:
    tb: Testbed = make_testbed("ft", routers=True)
    return tb


def test_router_absent(faultbed: Testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "lib.log"
    monkeypatch.setenv("SHUNTFLOW_LOG", str(log))
    for h in faultbed.hosts:  # the libraries look for a router that is not there
        object.__setattr__(h, "router_socket", tmp_path / f"missing-{h.index}.sock")
    client, server = run_torture(faultbed, "shuntflow", "blocking", 1, 40, 7741)
    assert_intact(client, 40)
    assert_intact(server, 40)
    assert client["switched"] == 0 and server["switched"] == 0
    warnings = [line for line in log.read_text().splitlines() if "unreachable" in line]
    # One warning per process, not one per connection.
    assert len(warnings) == 2, warnings
    # No channel, no request: neither the application threads nor the agent sent one.
    asked = [line for line in log.read_text().splitlines() if "asked the router" in line]
    assert asked == [], asked[:5]
