# A bounded window of recent latencies in microseconds, for the router's status and the bench:
# the switch times the libraries report (SWITCH_DONE: decided -> first byte on the host path,
# the figure the 1 ms p99 target of docs/performance.md is about) and the router's own
# SWITCH_REQ -> SWITCH_RES.
#
# Why the last samples and not a histogram: people and the load generator want exact
# percentiles of recent switches, and the bench wants exactly the samples of one measured run,
# which it asks for by running index (`since`). 16,384 samples cover many seconds of switching
# and never grow.

from __future__ import annotations

import collections
import math
from typing import Any

WINDOW = 16384


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class LatencyWindow:
    """Samples in µs, each with a running index (`total` is the next one's)."""

    def __init__(self, window: int = WINDOW) -> None:
        self._samples: collections.deque[int] = collections.deque(maxlen=window)
        self.total = 0

    def add(self, micros: int) -> None:
        self._samples.append(max(0, micros))
        self.total += 1

    def since(self, index: int) -> list[int]:
        """Samples with a running index >= `index` that are still in the window."""
        first = self.total - len(self._samples)
        return list(self._samples)[max(0, index - first) :]

    def summary(self) -> dict[str, Any]:
        """count over all time; p50, p99 and max over the window (absent before a sample)."""
        values = sorted(self._samples)
        out: dict[str, Any] = {"count": self.total, "window": len(values)}
        if values:
            out.update(p50=percentile(values, 50), p99=percentile(values, 99), max=values[-1])
        return out
