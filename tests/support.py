"""Helpers for tests of every group (tests/unit, tests/router, tests/integration): running the
`shuntflow` command as a user does, and reading the tables it writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "shuntflow.cli"]
# The installed console script, as a user runs it (it must exist beside this interpreter).
SHUNTFLOW = str(Path(sys.executable).parent / "shuntflow")


def bench(
    *args: str, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "bench", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def table_rows(md: str, section: str) -> list[str]:
    part = md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [ln for ln in part.splitlines() if ln.startswith("| ") and not ln.startswith("| mode")]
