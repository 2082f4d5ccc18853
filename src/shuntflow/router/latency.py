# A bounded latency record for the router's status: count, p50, p99 and max in microseconds.
#
# Why a ring of the last samples and not a histogram: the router's status is read by people and
# by the load generator after a run, both of which want exact percentiles of recent switches;
# 65,536 32-bit samples (256 KiB) cover a minute at 1,000 switches/s and never grow.

from __future__ import annotations

import array

WINDOW = 65_536


class LatencyRecord:
    def __init__(self, window: int = WINDOW) -> None:
        self._ring = array.array("I", bytes(4 * window))
        self._window = window
        self.count = 0
        self.max_us = 0

    def add(self, seconds: float) -> None:
        us = min(max(int(seconds * 1e6), 0), 0xFFFF_FFFF)
        self._ring[self.count % self._window] = us
        self.count += 1
        self.max_us = max(self.max_us, us)

    def describe(self) -> dict[str, int | None]:
        """p50/p99 over the last `window` samples (None before the first); max over all."""
        n = min(self.count, self._window)
        if n == 0:
            return {"count": 0, "p50": None, "p99": None, "max": None}
        samples = sorted(self._ring[:n])
        return {
            "count": self.count,
            "p50": samples[(n - 1) // 2],
            "p99": samples[min(n - 1, (n * 99) // 100)],
            "max": self.max_us,
        }
