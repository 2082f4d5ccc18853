"""One test run at a time per testbed prefix on this machine.

Test modules build testbeds under fixed prefixes. Two runs of the suite on one machine (two
checkouts, or a developer's run beside a mutation run) would otherwise tear down each other's
namespaces halfway. Each run takes an exclusive lock per prefix before it builds, and holds it
until its teardown is done; a second run waits for it.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_DIR = Path("/run/shuntflow-test-locks")
WAIT_S = 1800.0


@contextmanager
def prefix_lock(prefix: str) -> Iterator[None]:
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_DIR / f"{prefix}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"testbed prefix {prefix!r} stayed locked by another test run for "
                        f"{WAIT_S:.0f} s ({LOCK_DIR}/{prefix}.lock)"
                    ) from None
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)
