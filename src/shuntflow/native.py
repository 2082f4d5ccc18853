"""Where the preload library lives and how an application process is configured to use it;
how a router process is started under a sanitizer runtime."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from shuntflow.wire import Mode

# From the bench's threshold sweep (docs/performance.md, "Latest full run"): 1 and 4 also switch
# one-request connections (crr 2x overlay at 1); 16-256 leave them alone and perform alike on long
# ones, 256 leaving busy connections on the overlay longer. 64 sits in the middle of that flat
# region.
DEFAULT_THRESHOLD = 64
# The largest SHUNTFLOW_THRESHOLD the library takes (preload/core.c, THRESHOLD_MAX).
MAX_THRESHOLD = 1_000_000_000
OVERLAY_CIDR = "198.19.0.0/16"


class LibraryMissing(RuntimeError):
    pass


def library_path(musl: bool = False) -> Path:
    """The installed libshuntflow.so; SHUNTFLOW_LIBRARY overrides it (a library built in place).

    `musl`: libshuntflow-musl.so, the build for musl-based containers (e.g. Alpine), made where
    musl-gcc was installed when the package was (Debian's musl-tools)."""
    if musl:
        path = Path(__file__).parent / "_native" / "libshuntflow-musl.so"
        if not path.is_file():
            raise LibraryMissing(
                f"musl build of the library not found at {path}; install musl-gcc (Debian: "
                "musl-tools) and reinstall the package (`pip install .`)"
            )
        return path
    override = os.environ.get("SHUNTFLOW_LIBRARY")
    path = Path(override) if override else Path(__file__).parent / "_native" / "libshuntflow.so"
    if not path.is_file():
        raise LibraryMissing(
            f"preload library not found at {path}; reinstall the package (`pip install .`)"
        )
    return path


def app_environment(
    mode: Mode,
    router_socket: Path,
    threshold: int = DEFAULT_THRESHOLD,
    overlay_cidr: str = OVERLAY_CIDR,
    log: str | None = None,
    agent_cpus: str | None = None,
) -> dict[str, str]:
    """The variables that load the library into a process and point it at its router.

    `agent_cpus` (a CPU list like 0 or 0,2-3) puts the library's background thread there rather
    than on the application's CPUs, so the switch work never competes with the application."""
    env = {
        "LD_PRELOAD": str(library_path()),
        "SHUNTFLOW_MODE": mode.name.lower(),
        "SHUNTFLOW_THRESHOLD": str(threshold),
        "SHUNTFLOW_ROUTER": str(router_socket),
        "SHUNTFLOW_OVERLAY": overlay_cidr,
    }
    if log:
        env["SHUNTFLOW_LOG"] = log
    if agent_cpus:
        env["SHUNTFLOW_AGENT_CPUS"] = agent_cpus
    return env


def router_command(argv: Sequence[str]) -> list[str]:
    """A router's command line as it is to be started: unchanged, or, when
    SHUNTFLOW_ROUTER_PRELOAD names a library (the AddressSanitizer runtime, for `make
    test-asan`), run through `env` with that library in LD_PRELOAD and leak detection off
    unless ASAN_OPTIONS says otherwise.

    Why: a switch path built with AddressSanitizer (SHUNTFLOW_SWITCHPATH) can only be loaded
    into a process whose first library is the ASan runtime, and Python is not linked with it.
    Why through `env` in the command rather than the parent's environment: only the router is
    to carry the runtime, not `ip netns exec` or the applications a test starts beside it; and
    leak detection would report what the interpreter keeps until exit, not bugs."""
    preload = os.environ.get("SHUNTFLOW_ROUTER_PRELOAD")
    if not preload:
        return list(argv)
    inherited = os.environ.get("LD_PRELOAD")
    env = [f"LD_PRELOAD={preload}:{inherited}" if inherited else f"LD_PRELOAD={preload}"]
    env.append(f"ASAN_OPTIONS={os.environ.get('ASAN_OPTIONS') or 'detect_leaks=0'}")
    return ["env", *env, *argv]
