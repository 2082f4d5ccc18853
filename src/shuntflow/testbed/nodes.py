"""The hosts and containers of a testbed, as objects that run programs inside their network
namespace, as Mininet's nodes do: `c.run([...])`, `c.popen([...])`, `c.host.run([...])`.

`plan_hosts` gives the shape of a testbed from its prefix and counts alone (no kernel state), and
`host_to_dict`/`host_from_dict` carry it through the testbed's state file.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from shuntflow.testbed import nsutil
from shuntflow.testbed.plan import (
    METRICS_PORT,
    TestbedUsageError,
    container_mac,
    container_netns,
    host_netns,
    host_run_dir,
    overlay_ip,
    underlay_ip,
    vxlan_dev,
)

Cpus = int | Iterable[int] | None
T = TypeVar("T")


def _cpu_set(cpu: Cpus) -> set[int] | None:
    if cpu is None:
        return None
    cpus = {cpu} if isinstance(cpu, int) else {int(c) for c in cpu}
    available = os.sched_getaffinity(0)
    if not cpus or not cpus <= available:
        raise TestbedUsageError(
            f"cannot pin to CPU(s) {sorted(cpus)}: this process may use {sorted(available)}"
        )
    return cpus


class Node:
    """A network namespace of the testbed that programs run in (set `netns` in the subclass).

    A process enters the namespace between fork and exec (setns in its preexec_fn), so it is
    this process's own child, with its pid, its pipes and its exit status, as with subprocess."""

    netns: str

    def _popen_kwargs(
        self, fd: int, cpu: Cpus, env: dict[str, str] | None, kw: dict[str, Any]
    ) -> dict[str, Any]:
        kw = dict(kw)
        kw["preexec_fn"] = nsutil.make_preexec(fd, _cpu_set(cpu), kw.pop("preexec_fn", None))
        if env is not None:
            kw["env"] = {**os.environ, **env}
        return kw

    def popen(
        self,
        argv: Sequence[str],
        cpu: Cpus = None,
        env: dict[str, str] | None = None,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """subprocess.Popen of `argv` inside this namespace, optionally pinned to `cpu`.

        `env` is added to (and overrides) this process's environment, so
        `env=shuntflow.native.app_environment(...)` is enough to load the library.
        """
        fd = nsutil.open_netns(self.netns)
        try:
            return subprocess.Popen(list(argv), **self._popen_kwargs(fd, cpu, env, popen_kwargs))
        finally:
            os.close(fd)

    def run(
        self,
        argv: Sequence[str],
        cpu: Cpus = None,
        env: dict[str, str] | None = None,
        timeout: float | None = 60.0,
        **run_kwargs: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """subprocess.run of `argv` inside this namespace (same keywords as subprocess.run)."""
        fd = nsutil.open_netns(self.netns)
        try:
            return subprocess.run(
                list(argv), timeout=timeout, **self._popen_kwargs(fd, cpu, env, run_kwargs)
            )
        finally:
            os.close(fd)

    def in_netns(self, fn: Callable[[], T]) -> T:
        """`fn()` in this process, on a thread inside this namespace: a socket it makes belongs
        to the namespace and stays usable from any thread."""
        result: T = nsutil.in_netns(self.netns, fn)
        return result


@dataclass(frozen=True)
class Container(Node):
    name: str
    netns: str
    index: int
    overlay_ip: str
    mac: str
    # The back reference is left out of ==, hash and repr, which would otherwise recurse.
    host: Host = field(compare=False, repr=False)

    @property
    def host_index(self) -> int:
        return self.host.index

    @property
    def ip(self) -> str:
        return self.overlay_ip


@dataclass(frozen=True)
class Host(Node):
    index: int
    netns: str
    underlay_ip: str
    router_socket: Path
    vxlan_dev: str
    containers: list[Container] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.netns

    @property
    def ip(self) -> str:
        return self.underlay_ip

    @property
    def run_dir(self) -> Path:
        return self.router_socket.parent

    @property
    def metrics_address(self) -> str:
        return f"{self.underlay_ip}:{METRICS_PORT}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_address}/metrics"

    @property
    def router_log(self) -> Path:
        return self.run_dir / "router.log"

    @property
    def router_pid_file(self) -> Path:
        return self.run_dir / "router.pid"

    def add_container(self, name: str, netns: str, index: int, overlay_ip: str, mac: str) -> None:
        self.containers.append(Container(name, netns, index, overlay_ip, mac, host=self))


@dataclass(frozen=True)
class Underlay(Node):
    """The namespace of the underlay's bridge, the network the hosts share."""

    netns: str
    bridge: str


def plan_hosts(prefix: str, hosts: int, containers: int) -> list[Host]:
    result = []
    for i in range(1, hosts + 1):
        h = Host(
            index=i,
            netns=host_netns(prefix, i),
            underlay_ip=underlay_ip(i),
            router_socket=host_run_dir(prefix, i) / "router.sock",
            vxlan_dev=vxlan_dev(prefix),
        )
        for j in range(1, containers + 1):
            name = container_netns(prefix, i, j)
            h.add_container(name, name, j, overlay_ip(i, j), container_mac(i, j))
        result.append(h)
    return result


def host_to_dict(h: Host) -> dict[str, object]:
    return {
        "index": h.index,
        "netns": h.netns,
        "underlay_ip": h.underlay_ip,
        "router_socket": str(h.router_socket),
        "vxlan_dev": h.vxlan_dev,
        "containers": [
            {
                "name": c.name,
                "netns": c.netns,
                "host_index": c.host_index,
                "index": c.index,
                "overlay_ip": c.overlay_ip,
                "mac": c.mac,
            }
            for c in h.containers
        ],
    }


def host_from_dict(d: dict[str, object]) -> Host:
    raw_containers = d["containers"]
    assert isinstance(raw_containers, list)
    h = Host(
        index=int(str(d["index"])),
        netns=str(d["netns"]),
        underlay_ip=str(d["underlay_ip"]),
        router_socket=Path(str(d["router_socket"])),
        vxlan_dev=str(d["vxlan_dev"]),
    )
    for c in raw_containers:
        if int(c["host_index"]) != h.index:
            raise ValueError(f"container {c['name']} of host {c['host_index']} under {h.netns}")
        h.add_container(
            str(c["name"]), str(c["netns"]), int(c["index"]), str(c["overlay_ip"]), str(c["mac"])
        )
    return h
