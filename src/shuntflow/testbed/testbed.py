"""The Mininet-like API: `Testbed.up(...)`, `Testbed.load(prefix)`, `tb.down()`; its hosts and
containers run programs inside their namespaces: `tb.container("sf-h1-c1").popen([...])`."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from shuntflow.testbed import build, nsutil
from shuntflow.testbed.nodes import Container, Host, Underlay, host_from_dict
from shuntflow.testbed.plan import (
    DEFAULT_CONTAINERS,
    DEFAULT_HOSTS,
    DEFAULT_LAYOUT,
    DEFAULT_PREFIX,
    FLANNEL_PORT,
    MAX_CONTAINERS,
    MAX_HOSTS,
    RUN_ROOT,
    VXLAN_PORT,
    TestbedError,
    TestbedUsageError,
    run_dir,
    underlay_bridge,
    underlay_netns,
    validate_count,
    validate_layout,
    validate_prefix,
)


class Testbed:
    """A built testbed. Get one from `Testbed.up(...)` or `Testbed.load(prefix)`."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, prefix: str, hosts: list[Host], state: dict[str, Any]) -> None:
        self.prefix = prefix
        self.hosts = hosts
        self._state = state
        self._router_procs: dict[int, subprocess.Popen[bytes]] = {}

    # -- life cycle -------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        prefix: str = DEFAULT_PREFIX,
        hosts: int = DEFAULT_HOSTS,
        containers: int = DEFAULT_CONTAINERS,
        routers: bool = True,
        router_args: Sequence[str] = (),
        layout: str = DEFAULT_LAYOUT,
    ) -> Testbed:
        """Build the testbed; on any failure remove what was built and raise TestbedError.

        `router_args` are extra `shuntflow router` flags for every router (e.g. --deny);
        `layout` is how the overlay is programmed: "docker" or "flannel" (plan.LAYOUTS)."""
        validate_prefix(prefix)
        validate_count("hosts", hosts, MAX_HOSTS)
        validate_count("containers", containers, MAX_CONTAINERS)
        validate_layout(layout)
        if os.geteuid() != 0:
            raise TestbedError("the testbed needs root (network namespaces); run it as root")
        if build.exists(prefix):
            raise build.already_exists(prefix)
        builder = build.Builder(prefix, hosts, containers, routers, router_args, layout)
        # Claiming is atomic and tears nothing down if it fails: losing that race means the
        # testbed belongs to someone else.
        builder.claim()
        try:
            for name, step in builder.steps():
                try:
                    step()
                except TestbedError:
                    raise
                except Exception as e:
                    raise TestbedError(f"testbed {prefix!r}: step {name!r} failed: {e}") from e
        except BaseException:
            build.down(prefix)
            raise
        tb = cls(prefix, builder.hosts, builder.state)
        tb._router_procs = builder.router_procs
        return tb

    @classmethod
    def load(cls, prefix: str = DEFAULT_PREFIX, *, allow_incomplete: bool = False) -> Testbed:
        """The testbed `up` recorded in /run/shuntflow/<prefix>/state.json."""
        validate_prefix(prefix)
        state = build.read_state(prefix)
        if state is None:
            others = list_testbeds()
            hint = f" (existing: {', '.join(others)})" if others else ""
            raise TestbedError(
                f"no testbed {prefix!r}{hint}; run `shuntflow testbed up --prefix {prefix}`"
            )
        if not state.get("complete") and not allow_incomplete:
            raise TestbedError(
                f"testbed {prefix!r} is incomplete (its `up` did not finish); "
                f"run `shuntflow testbed down --prefix {prefix}`"
            )
        try:
            hosts = [host_from_dict(h) for h in state["hosts"]]
        except (KeyError, TypeError, ValueError, AssertionError) as e:
            raise TestbedError(
                f"state of testbed {prefix!r} is unreadable ({e}); "
                f"run `shuntflow testbed down --prefix {prefix}`"
            ) from None
        return cls(prefix, hosts, state)

    @staticmethod
    def down_prefix(prefix: str = DEFAULT_PREFIX) -> dict[str, list[Any]]:
        """Remove testbed `prefix` found by its names alone; idempotent."""
        return build.down(prefix)

    def down(self) -> dict[str, list[Any]]:
        result = build.down(self.prefix)
        for proc in self._router_procs.values():
            proc.poll()
        return result

    def __enter__(self) -> Testbed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def __repr__(self) -> str:
        n = len(self.hosts)
        m = len(self.hosts[0].containers) if self.hosts else 0
        return f"<Testbed {self.prefix!r} {n} hosts x {m} containers>"

    def restart_router(self, host: int | str | Container) -> int:
        """(Re)start the router of one host, e.g. after it was killed; returns its new pid.

        A router still running is stopped first (SIGTERM). Returns once the new router listens
        on its socket, so applications started afterwards, and libraries that reconnect, find it.
        """
        h = self.host(host)
        proc = build.restart_router(self.prefix, h, self._state)
        self._router_procs[h.index] = proc
        return proc.pid

    # -- lookup -----------------------------------------------------------------------

    @property
    def containers(self) -> list[Container]:
        return [c for h in self.hosts for c in h.containers]

    @property
    def layout(self) -> str:
        return str(self._state.get("layout", DEFAULT_LAYOUT))

    @property
    def vxlan_port(self) -> int:
        """The UDP port the overlay's VXLAN packets go to."""
        return FLANNEL_PORT if self.layout == "flannel" else VXLAN_PORT

    @property
    def underlay(self) -> Underlay:
        return Underlay(underlay_netns(self.prefix), underlay_bridge(self.prefix))

    @property
    def run_dir(self) -> Path:
        return run_dir(self.prefix)

    def host(self, ref: int | str | Container) -> Host:
        """Host by index (1-based), by namespace name, or the host of a container."""
        if isinstance(ref, Container):
            ref = ref.host_index
        for h in self.hosts:
            if ref in (h.index, h.netns):
                return h
        valid = ", ".join(h.netns for h in self.hosts)
        raise TestbedUsageError(f"no host {ref!r} in testbed {self.prefix!r}; hosts: {valid}")

    def container(self, name: str) -> Container:
        for c in self.containers:
            if c.name == name:
                return c
        valid = ", ".join(c.name for c in self.containers)
        raise TestbedUsageError(
            f"no container {name!r} in testbed {self.prefix!r}; containers: {valid}"
        )

    # -- observation ------------------------------------------------------------------

    def vxlan_counters(self, host_index: int) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of the host's VXLAN device, read through netlink."""
        return build.vxlan_counters(self.host(host_index))

    def status(self) -> dict[str, Any]:
        hosts = []
        for h in self.hosts:
            pid = build.router_pid(h)
            hosts.append(
                {
                    "index": h.index,
                    "netns": h.netns,
                    "netns_present": nsutil.netns_exists(h.netns),
                    "underlay_ip": h.underlay_ip,
                    "vxlan_dev": h.vxlan_dev,
                    "router_socket": str(h.router_socket),
                    "router_socket_present": h.router_socket.exists(),
                    "router_log": str(h.router_log),
                    "router_pid": pid,
                    "router_alive": build.router_alive(pid),
                    # Reached from the host's namespace (or another host's, over the underlay).
                    "metrics_url": h.metrics_url if self._state.get("routers") else None,
                    "containers": [
                        {
                            "name": c.name,
                            "netns": c.netns,
                            "netns_present": nsutil.netns_exists(c.netns),
                            "host_index": c.host_index,
                            "index": c.index,
                            "overlay_ip": c.overlay_ip,
                            "mac": c.mac,
                        }
                        for c in h.containers
                    ],
                }
            )
        return {
            "prefix": self.prefix,
            "run_dir": str(self.run_dir),
            "complete": bool(self._state.get("complete")),
            "routers": bool(self._state.get("routers")),
            "layout": self.layout,
            "underlay_netns": underlay_netns(self.prefix),
            "underlay_netns_present": nsutil.netns_exists(underlay_netns(self.prefix)),
            "underlay_bridge": underlay_bridge(self.prefix),
            "hosts": hosts,
        }


def list_testbeds() -> list[str]:
    """Prefixes that have a run directory (complete or not)."""
    try:
        return sorted(p.parent.name for p in RUN_ROOT.glob(f"*/{build.STATE_FILE}"))
    except OSError:
        return []
