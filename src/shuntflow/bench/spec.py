"""What a bench run is asked to do: modes, workloads, placement, durations, and their parsing.

Pure data and validation, no processes: the CLI turns every bad value into one error line
(BenchUsageError, exit 2) before anything is started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from shuntflow.native import DEFAULT_THRESHOLD, MAX_THRESHOLD
from shuntflow.wire import Mode

BASE_MODES = ("host", "overlay", "lib-overlay", "slim", "shuntflow")
DEFAULT_MODES = ("host", "overlay", "slim", "shuntflow")
SWEEP_THRESHOLDS = (1, 4, 16, 64, 256)
WORKLOADS = (
    "kv-redis",
    "kv-memcached",
    "web-keepalive",
    "web-short",
    "rr",
    "crr",
    "mix",
    "stream",
    "integrity",
)
# --quick leaves out kv-memcached (memaslap gives no percentiles, so it adds little to a demo)
# and stream and integrity (bandwidth and the bytes' path, not the latency ShuntFlow is about);
# that keeps it under 3 minutes.
QUICK_WORKLOADS = ("rr", "kv-redis", "web-keepalive", "web-short", "crr", "mix")
PLACEMENTS = ("same", "split", "free")

FULL_REPETITIONS = 5
QUICK_REPETITIONS = 3
FULL_DURATION = 3
QUICK_DURATION = 1
MAX_DURATION = 600
MAX_REPETITIONS = 100


class BenchError(Exception):
    """The bench cannot run; the message is one sentence for the user."""


class BenchUsageError(BenchError):
    """A bad option value (the CLI exits with 2)."""


@dataclass(frozen=True)
class ModeSpec:
    """One column of the comparison: where the processes run and how the library is set."""

    name: str
    host_net: bool
    library: Mode | None
    threshold: int | None = None

    @property
    def sweep_threshold(self) -> int | None:
        """The threshold this mode contributes to the sweep plot (shuntflow modes only)."""
        return self.threshold if self.library is Mode.SHUNTFLOW else None

    def exec_flags(self) -> list[str]:
        """The `shuntflow exec` options that reproduce this mode by hand."""
        flags = ["--host-net"] if self.host_net else []
        if self.library is not None:
            flags += ["--mode", self.library.name.lower()]
            if self.threshold is not None:
                flags += ["--threshold", str(self.threshold)]
        return flags


def mode_spec(name: str) -> ModeSpec:
    if name == "host":
        return ModeSpec(name, True, None)
    if name == "overlay":
        return ModeSpec(name, False, None)
    if name == "lib-overlay":
        return ModeSpec(name, False, Mode.OVERLAY)
    if name == "slim":
        return ModeSpec(name, False, Mode.SLIM)
    if name == "shuntflow":
        return ModeSpec(name, False, Mode.SHUNTFLOW, DEFAULT_THRESHOLD)
    base, sep, t = name.partition("@")
    if base == "shuntflow" and sep:
        threshold = parse_positive("threshold", t, MAX_THRESHOLD)
        if threshold == DEFAULT_THRESHOLD:
            return mode_spec("shuntflow")
        return ModeSpec(f"shuntflow@{threshold}", False, Mode.SHUNTFLOW, threshold)
    raise BenchUsageError(
        f"unknown mode {name!r}; choose from {', '.join(BASE_MODES)} or shuntflow@N"
    )


def parse_positive(what: str, text: str, maximum: int = 2**31 - 1) -> int:
    try:
        value = int(text.strip(), 10)
    except ValueError:
        raise BenchUsageError(f"{what} must be a whole number, got {text!r}") from None
    if not 1 <= value <= maximum:
        raise BenchUsageError(f"{what} must be between 1 and {maximum}, got {value}")
    return value


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_workloads(text: str | None, quick: bool) -> list[str]:
    if text is None:
        return list(QUICK_WORKLOADS if quick else WORKLOADS)
    names = _split(text)
    if names == ["all"]:
        return list(WORKLOADS)
    if not names:
        raise BenchUsageError("--workload is empty; choose from " + ", ".join(WORKLOADS))
    for n in names:
        if n not in WORKLOADS:
            raise BenchUsageError(
                f"unknown workload {n!r}; choose from {', '.join(WORKLOADS)} (or all)"
            )
    return list(dict.fromkeys(names))


def parse_modes(text: str | None, thresholds: str | None) -> list[ModeSpec]:
    names = list(DEFAULT_MODES) if text is None else _split(text)
    if not names and not thresholds:
        raise BenchUsageError("--modes is empty; choose from " + ", ".join(BASE_MODES))
    specs = [mode_spec(n) for n in names]
    for t in _split(thresholds or ""):
        specs.append(mode_spec(f"shuntflow@{parse_positive('--thresholds', t, MAX_THRESHOLD)}"))
    unique = list({s.name: s for s in specs}.values())
    if "overlay" not in {s.name for s in unique}:
        # Every ratio is taken against overlay in the same repetition.
        unique.insert(0, mode_spec("overlay"))
    return unique


def placement_cpus(placement: str) -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, client CPUs) for a placement; None means unpinned."""
    if placement not in PLACEMENTS:
        raise BenchUsageError(
            f"unknown placement {placement!r}; choose from {', '.join(PLACEMENTS)}"
        )
    if placement == "free":
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    # vCPU 0 takes most interrupts and housekeeping, so the measured pair goes on the last one.
    last = cpus[-1]
    if placement == "same":
        return {last}, {last}
    if len(cpus) < 2:
        raise BenchUsageError("--placement split needs two CPUs; this process may use one")
    return {last}, {cpus[-2]}


def infra_cpus(placement: str) -> set[int] | None:
    """Where the routers and the libraries' background threads run: the CPUs the measured pair
    is not pinned to, if there are any. The switch work is off the application's path; this keeps
    it off the application's CPU too, as a deployment with housekeeping CPUs would."""
    server, client = placement_cpus(placement)
    if server is None or client is None:
        return None
    rest = set(os.sched_getaffinity(0)) - server - client
    return rest or None


@dataclass
class BenchConfig:
    workloads: list[str]
    modes: list[ModeSpec]
    repetitions: int
    duration: int
    placement: str
    quick: bool
    prefix: str

    @property
    def server_cpus(self) -> set[int] | None:
        return placement_cpus(self.placement)[0]

    @property
    def client_cpus(self) -> set[int] | None:
        return placement_cpus(self.placement)[1]

    @property
    def infra_cpus(self) -> set[int] | None:
        return infra_cpus(self.placement)
