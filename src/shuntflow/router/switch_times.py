# Switch times reported by the libraries (SWITCH_DONE): how long from "this connection should
# move" to "the first byte goes on the host path", the figure issue 4's p99 <= 1 ms target is about.
#
# Why the router keeps them: the libraries live inside applications and have nowhere to put
# figures; the router already collects per-process stats and answers `shuntflow status`. It keeps
# a bounded window of recent samples (not a running histogram) so the bench can ask for exactly
# the samples of one measured run by index, and status can give percentiles of the recent past.

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


class SwitchTimes:
    """Samples in µs, each with a running index; only initiating ends' samples count."""

    def __init__(self, window: int = WINDOW) -> None:
        self._samples: collections.deque[int] = collections.deque(maxlen=window)
        self.total = 0  # index the next sample gets
        self.claimed = 0  # samples of ends that were claimed for a peer (not in the window)

    def record(self, micros: int, initiated: bool) -> None:
        if not initiated:
            self.claimed += 1
            return
        self._samples.append(micros)
        self.total += 1

    def since(self, index: int) -> list[int]:
        """Samples with a running index >= `index` that are still in the window."""
        first = self.total - len(self._samples)
        skip = max(0, index - first)
        return list(self._samples)[skip:]

    def summary(self) -> dict[str, Any]:
        values = sorted(self._samples)
        out: dict[str, Any] = {"count": self.total, "window": len(values)}
        if values:
            out.update(p50=percentile(values, 50), p99=percentile(values, 99), max=values[-1])
        return out
