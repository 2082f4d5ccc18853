"""Building a testbed through netlink, one recorded step at a time, and taking it down by name.

Every namespace is written to state.json before it is created, so `down` after a crash finds
it; `down` also scans /run/netns for the testbed's name patterns, so it needs no state at all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from shuntflow.native import router_command
from shuntflow.router.auth import write_cluster_key
from shuntflow.testbed import nsutil
from shuntflow.testbed.nodes import Container, Host, host_to_dict, plan_hosts
from shuntflow.testbed.plan import (
    DEFAULT_LAYOUT,
    FLANNEL_PORT,
    FLANNEL_VNI,
    OVERLAY_MTU,
    OVERLAY_NET,
    POD_PREFIX_LEN,
    PREFIX_LEN,
    VXLAN_PORT,
    VXLAN_VNI,
    TestbedError,
    cluster_key_path,
    container_if,
    container_port,
    host_bridge,
    host_uplink,
    is_testbed_netns,
    pod_gateway,
    pod_subnet,
    run_dir,
    underlay_bridge,
    underlay_netns,
    underlay_port,
    validate_layout,
    validate_prefix,
    vtep_ip,
    vtep_mac,
)

STATE_FILE = "state.json"
# A deadline, not a wait: `up` goes on as soon as every router listens (about 1 s, Python's own
# start). Seen at 4-5 s on a 2-vCPU machine shared by several test runs, so 5 s was too tight.
ROUTER_START_TIMEOUT = 30.0
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 0x04
_SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
}
# Threads that build namespaces side by side: the kernel's setup of a namespace and the netlink
# round trips wait more than they compute, so 8 hosts x 8 containers come up in about a third of
# the time one thread takes.
BUILD_WORKERS = 8

T = TypeVar("T")


@contextmanager
def rtnl(ns: str) -> Iterator[Any]:
    """A netlink socket inside namespace `ns`, closed at once: an open one would keep it alive."""
    # flags=0: never create a namespace by accident (pyroute2's default is O_CREAT).
    with IPRoute(netns=ns, flags=0) as ipr:
        yield ipr


def in_rtnl(ns: str, fn: Callable[[Any], T]) -> T:
    """fn(ipr) with a netlink socket of namespace `ns`, on a thread that entered it: unlike
    `rtnl`, no helper process (pyroute2 forks one per socket opened with netns=)."""

    def body() -> T:
        with IPRoute() as ipr:
            return fn(ipr)

    result: T = nsutil.in_netns(ns, body)
    return result


def parallel(fn: Callable[[T], None], items: Iterable[T]) -> None:
    """fn(item) for every item on BUILD_WORKERS threads; the first error is raised once every
    call already running has returned (and none not yet started will start), so a `down` that
    follows finds everything that was made."""
    todo = list(items)
    if len(todo) <= 1:
        for item in todo:
            fn(item)
        return
    pool = ThreadPoolExecutor(max_workers=min(BUILD_WORKERS, len(todo)))
    try:
        for future in [pool.submit(fn, item) for item in todo]:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _index(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise TestbedError(f"device {ifname} missing")
    return int(found[0])


def write_state(prefix: str, state: dict[str, Any]) -> None:
    path = run_dir(prefix) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def read_state(prefix: str) -> dict[str, Any] | None:
    try:
        data = json.loads((run_dir(prefix) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def existing_netns(prefix: str) -> list[str]:
    return [n for n in nsutil.list_netns() if is_testbed_netns(prefix, n)]


def exists(prefix: str) -> bool:
    return run_dir(prefix).exists() or bool(existing_netns(prefix))


class Builder:
    """Builds one testbed step by step; `steps()` is what `Testbed.up` runs in order."""

    def __init__(
        self,
        prefix: str,
        hosts: int,
        containers: int,
        routers: bool,
        router_args: Sequence[str] = (),
        layout: str = DEFAULT_LAYOUT,
    ) -> None:
        self.prefix = validate_prefix(prefix)
        self.layout = validate_layout(layout)
        self.router_args = list(router_args)
        self.n_hosts = hosts
        self.n_containers = containers
        self.routers = routers
        self.hosts: list[Host] = plan_hosts(prefix, hosts, containers)
        self.state: dict[str, Any] = {
            "version": 1,
            "prefix": prefix,
            "hosts_count": hosts,
            "containers_per_host": containers,
            "routers": routers,
            "layout": layout,
            "router_args": list(router_args),
            "cluster_key": str(cluster_key_path(prefix)),
            "complete": False,
            "created": time.time(),
            "underlay_netns": underlay_netns(prefix),
            "underlay_bridge": underlay_bridge(prefix),
            "namespaces": [],
            "router_pids": {},
            "hosts": [host_to_dict(h) for h in self.hosts],
        }
        self.router_procs: dict[int, subprocess.Popen[bytes]] = {}

    # -- bookkeeping ------------------------------------------------------------------

    def claim(self) -> None:
        """Create the run directory; mkdir is atomic, so two `up`s of one prefix cannot both win."""
        try:
            run_dir(self.prefix).parent.mkdir(parents=True, exist_ok=True)
            run_dir(self.prefix).mkdir(mode=0o755)
        except FileExistsError:
            raise already_exists(self.prefix) from None
        except OSError as e:
            raise TestbedError(f"cannot create {run_dir(self.prefix)}: {e.strerror}") from None
        for h in self.hosts:
            h.run_dir.mkdir(mode=0o755)
        self.save()

    def save(self) -> None:
        write_state(self.prefix, self.state)

    @staticmethod
    def new_netns(name: str) -> None:
        def setup() -> None:  # inside the new namespace
            nsutil.write_sysctls_here(_SYSCTLS)
            with IPRoute() as ipr:
                ipr.link("set", index=_index(ipr, "lo"), state="up")

        nsutil.create_netns(name, then=setup)

    # -- steps ------------------------------------------------------------------------

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        """The build after `claim()`, in order; each step is safe to abandon midway."""
        steps: list[tuple[str, Callable[[], None]]] = [
            ("namespaces", self.make_namespaces),
            ("underlay", self.make_underlay),
        ]
        for h in self.hosts:
            steps.append((f"host {h.index}", lambda h=h: self.make_host(h)))  # type: ignore[misc]
        steps.append(("overlay state", self.program_overlay))
        if self.routers:
            steps.append(("routers", self.start_routers))
        steps.append(("complete", self.mark_complete))
        return steps

    def make_namespaces(self) -> None:
        names = [underlay_netns(self.prefix)]
        for h in self.hosts:
            names.append(h.netns)
            names.extend(c.netns for c in h.containers)
        # Recorded before any is made: `down` after a crash finds each one made so far.
        self.state["namespaces"].extend(names)
        self.save()
        parallel(self.new_netns, names)

    def make_underlay(self) -> None:
        p = self.prefix
        ul = underlay_netns(p)

        def bridge(ipr: Any) -> None:
            ipr.link("add", ifname=underlay_bridge(p), kind="bridge")
            ipr.link("set", index=_index(ipr, underlay_bridge(p)), state="up")

        in_rtnl(ul, bridge)
        parallel(self._uplink, self.hosts)

    def _uplink(self, h: Host) -> None:
        p = self.prefix
        ul = underlay_netns(p)

        # The pair is created inside the host namespace with its peer put straight into the
        # underlay namespace, so no device ever appears in the root namespace.
        def host_end(ipr: Any) -> None:
            ul_fd = nsutil.open_netns(ul)
            try:
                ipr.link(
                    "add",
                    ifname=host_uplink(p),
                    kind="veth",
                    peer={"ifname": underlay_port(p, h.index), "net_ns_fd": ul_fd},
                )
            finally:
                os.close(ul_fd)
            up = _index(ipr, host_uplink(p))
            ipr.addr("add", index=up, address=h.underlay_ip, prefixlen=PREFIX_LEN)
            ipr.link("set", index=up, state="up")

        def underlay_end(ipr: Any) -> None:
            port = _index(ipr, underlay_port(p, h.index))
            ipr.link("set", index=port, master=_index(ipr, underlay_bridge(p)), state="up")

        in_rtnl(h.netns, host_end)
        in_rtnl(ul, underlay_end)

    def make_host(self, h: Host) -> None:
        if self.layout == "flannel":
            self.make_flannel_host(h)
            return
        p = self.prefix

        def host_side(ipr: Any) -> None:
            ipr.link("add", ifname=host_bridge(p), kind="bridge", mtu=OVERLAY_MTU)
            br = _index(ipr, host_bridge(p))
            ipr.link(
                "add",
                ifname=h.vxlan_dev,
                kind="vxlan",
                vxlan_id=VXLAN_VNI,
                vxlan_port=VXLAN_PORT,
                vxlan_local=h.underlay_ip,
                vxlan_link=_index(ipr, host_uplink(p)),
                vxlan_learning=0,
                vxlan_proxy=1,
                mtu=OVERLAY_MTU,
            )
            vx = _index(ipr, h.vxlan_dev)
            ipr.link("set", index=vx, master=br, state="up")
            self._container_veths(ipr, h, br)
            ipr.link("set", index=br, state="up")

        def container_side(c: Container) -> None:
            def body(ipr: Any) -> None:
                eth = _index(ipr, container_if(p))
                ipr.addr("add", index=eth, address=c.overlay_ip, prefixlen=PREFIX_LEN)
                ipr.link("set", index=eth, state="up")
                # Remote containers as permanent neighbours: every host of the testbed shares
                # one kernel, whose ARP table is one for all namespaces and overflows at
                # gc_thresh3 (1,024 by default) learned entries; 8 x 8 containers that all talk
                # to each other would learn 3,584 and the kernel would drop their SYNs for want
                # of an entry. Permanent entries do not count against it. On real hosts each
                # kernel learns only its own containers' peers, as it still does here for
                # containers of the same host.
                for other in self.hosts:
                    if other.index == h.index:
                        continue
                    for o in other.containers:
                        ipr.neigh(
                            "add", dst=o.overlay_ip, lladdr=o.mac, ifindex=eth, state=NUD_PERMANENT
                        )

            in_rtnl(c.netns, body)

        in_rtnl(h.netns, host_side)
        parallel(container_side, h.containers)

    def _container_veths(self, ipr: Any, h: Host, bridge: int) -> None:
        p = self.prefix
        for c in h.containers:
            c_fd = nsutil.open_netns(c.netns)
            try:
                ipr.link(
                    "add",
                    ifname=container_port(p, c.index),
                    kind="veth",
                    mtu=OVERLAY_MTU,
                    peer={
                        "ifname": container_if(p),
                        "net_ns_fd": c_fd,
                        "address": c.mac,
                        "mtu": OVERLAY_MTU,
                    },
                )
            finally:
                os.close(c_fd)
            port = _index(ipr, container_port(p, c.index))
            ipr.link("set", index=port, master=bridge, state="up")

    def make_flannel_host(self, h: Host) -> None:
        """Flannel's VXLAN backend: the containers on a bridge that routes their /24 (the CNI
        bridge plugin's part), and a VXLAN device outside the bridge with its own MAC and the
        subnet's .0 as address, which the host routes remote subnets through."""
        p = self.prefix
        nsutil.write_sysctls(h.netns, {"net.ipv4.ip_forward": "1"})

        def host_side(ipr: Any) -> None:
            ipr.link("add", ifname=host_bridge(p), kind="bridge", mtu=OVERLAY_MTU)
            br = _index(ipr, host_bridge(p))
            ipr.addr("add", index=br, address=pod_gateway(h.index), prefixlen=POD_PREFIX_LEN)
            ipr.link(
                "add",
                ifname=h.vxlan_dev,
                kind="vxlan",
                vxlan_id=FLANNEL_VNI,
                vxlan_port=FLANNEL_PORT,
                vxlan_local=h.underlay_ip,
                vxlan_link=_index(ipr, host_uplink(p)),
                vxlan_learning=0,
                address=vtep_mac(h.index),
                mtu=OVERLAY_MTU,
            )
            vx = _index(ipr, h.vxlan_dev)
            ipr.addr("add", index=vx, address=vtep_ip(h.index), prefixlen=32)
            ipr.link("set", index=vx, state="up")
            self._container_veths(ipr, h, br)
            ipr.link("set", index=br, state="up")

        def container_side(c: Container) -> None:
            def body(ipr: Any) -> None:
                eth = _index(ipr, container_if(p))
                ipr.addr("add", index=eth, address=c.overlay_ip, prefixlen=POD_PREFIX_LEN)
                ipr.link("set", index=eth, state="up")
                # The cluster's pod network through the bridge; nothing else leaves.
                ipr.route("add", dst=OVERLAY_NET, gateway=pod_gateway(h.index), oif=eth)

            in_rtnl(c.netns, body)

        in_rtnl(h.netns, host_side)
        parallel(container_side, h.containers)

    def program_overlay(self) -> None:
        if self.layout == "flannel":
            self.program_flannel()
        else:
            self.program_docker()

    def program_flannel(self) -> None:
        """Flannel's way, per remote host: `<subnet> via <vtep ip> dev <vxlan> onlink`, a
        permanent neighbour <vtep ip> -> <vtep mac>, an FDB entry <vtep mac> -> its underlay IP."""

        def program(h: Host) -> None:
            def body(ipr: Any) -> None:
                vx = _index(ipr, h.vxlan_dev)
                for other in self.hosts:
                    if other.index == h.index:
                        continue
                    ipr.neigh(
                        "add",
                        dst=vtep_ip(other.index),
                        lladdr=vtep_mac(other.index),
                        ifindex=vx,
                        state=NUD_PERMANENT,
                    )
                    ipr.fdb("add", ifindex=vx, lladdr=vtep_mac(other.index), dst=other.underlay_ip)
                    ipr.route(
                        "add",
                        dst=pod_subnet(other.index),
                        gateway=vtep_ip(other.index),
                        oif=vx,
                        flags=RTNH_F_ONLINK,
                    )

            in_rtnl(h.netns, body)

        parallel(program, self.hosts)

    def program_docker(self) -> None:
        """Docker's overlay driver way: every remote container is a static ARP + FDB entry."""

        def program(h: Host) -> None:
            def body(ipr: Any) -> None:
                vx = _index(ipr, h.vxlan_dev)
                for other in self.hosts:
                    if other.index == h.index:
                        continue
                    for c in other.containers:
                        ipr.neigh(
                            "add", dst=c.overlay_ip, lladdr=c.mac, ifindex=vx, state=NUD_PERMANENT
                        )
                        ipr.fdb("add", ifindex=vx, lladdr=c.mac, dst=other.underlay_ip)

            in_rtnl(h.netns, body)

        parallel(program, self.hosts)

    def router_argv(self, h: Host) -> list[str]:
        return router_command(
            [
                sys.executable,
                "-m",
                "shuntflow.cli",
                "router",
                "--socket",
                str(h.router_socket),
                "--host-ip",
                h.underlay_ip,
                "--vxlan-dev",
                h.vxlan_dev,
                "--log-file",
                str(h.router_log),
                "--cluster-key",
                str(cluster_key_path(self.prefix)),
                "--metrics",
                h.metrics_address,
                *self.router_args,
            ]
        )

    def start_routers(self) -> None:
        # One fresh key per testbed: its routers trust each other and no other testbed's.
        write_cluster_key(cluster_key_path(self.prefix))
        for h in self.hosts:
            proc = start_detached(h, self.router_argv(h), h.router_log)
            self.router_procs[h.index] = proc
            h.router_pid_file.write_text(f"{proc.pid}\n")
            self.state["router_pids"][str(h.index)] = proc.pid
            self.save()
        deadline = time.monotonic() + ROUTER_START_TIMEOUT
        for h in self.hosts:
            proc = self.router_procs[h.index]
            while not h.router_socket.exists():
                if proc.poll() is not None or time.monotonic() >= deadline:
                    why = (
                        f"exited with code {proc.returncode}"
                        if proc.poll() is not None
                        else f"did not create {h.router_socket} within {ROUTER_START_TIMEOUT:g} s"
                    )
                    raise TestbedError(
                        f"router of host {h.index} ({h.netns}) {why}; "
                        f"last lines of {h.router_log}:\n{log_tail(h.router_log)}"
                    )
                time.sleep(0.02)

    def mark_complete(self) -> None:
        self.state["complete"] = True
        self.save()


def restart_router(prefix: str, h: Host, state: dict[str, Any]) -> subprocess.Popen[bytes]:
    """Stop the router of `h` if it still runs, start a new one as `up` did, wait for its
    socket (a SIGKILLed router leaves its socket file behind, so that is removed first)."""
    old = router_pid(h)
    if router_alive(old):
        assert old is not None
        nsutil.terminate([old], group=True)
    h.router_socket.unlink(missing_ok=True)
    builder = Builder(
        prefix,
        state["hosts_count"],
        state["containers_per_host"],
        routers=True,
        router_args=state.get("router_args", ()),
        layout=state.get("layout", DEFAULT_LAYOUT),
    )
    proc = start_detached(h, builder.router_argv(h), h.router_log)
    h.router_pid_file.write_text(f"{proc.pid}\n")
    state.setdefault("router_pids", {})[str(h.index)] = proc.pid
    write_state(prefix, state)
    deadline = time.monotonic() + ROUTER_START_TIMEOUT
    while not h.router_socket.exists():
        if proc.poll() is not None or time.monotonic() >= deadline:
            raise TestbedError(
                f"restarted router of host {h.index} ({h.netns}) did not come up; "
                f"last lines of {h.router_log}:\n{log_tail(h.router_log)}"
            )
        time.sleep(0.02)
    return proc


def start_detached(h: Host, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start `argv` in host `h`'s namespace in its own session, output appended to `log`."""
    with open(log, "ab") as out:
        return h.popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
        )


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "  (no log)"
    tail = text.strip().splitlines()[-lines:]
    return "\n".join("  " + line for line in tail) if tail else "  (log is empty)"


def already_exists(prefix: str) -> TestbedError:
    return TestbedError(
        f"testbed {prefix!r} already exists; run `shuntflow testbed down --prefix {prefix}` first"
    )


def router_pid(h: Host) -> int | None:
    try:
        return int(h.router_pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def router_alive(pid: int | None) -> bool:
    return (
        pid is not None
        and nsutil.pid_alive(pid)
        and nsutil.is_router_cmdline(nsutil.pid_cmdline(pid))
    )


def down(prefix: str) -> dict[str, list[Any]]:
    """Remove everything a testbed with `prefix` consists of; safe on a half-built or gone one."""
    validate_prefix(prefix)
    rdir = run_dir(prefix)
    state = read_state(prefix) or {}

    router_pids: set[int] = set()
    for pid_file in rdir.glob("h*/router.pid"):
        with suppress(OSError, ValueError):
            router_pids.add(int(pid_file.read_text().strip()))
    for pid in (state.get("router_pids") or {}).values():
        if isinstance(pid, int):
            router_pids.add(pid)
    routers = [p for p in router_pids if router_alive(p)]
    nsutil.terminate(routers, group=True)

    names = set(existing_netns(prefix))
    names.update(
        n for n in state.get("namespaces", []) if isinstance(n, str) and is_testbed_netns(prefix, n)
    )
    # Anything still running in the namespaces (servers, exec'd commands) would keep them, and
    # their devices, alive after the names are gone.
    stray = nsutil.pids_in_netns(names)
    nsutil.terminate(stray.keys())

    removed = [n for n in sorted(names) if nsutil.remove_netns(n)]
    had_dir = rdir.exists()
    if had_dir:
        shutil.rmtree(rdir, ignore_errors=True)
    return {
        "routers_stopped": sorted(routers),
        "processes_stopped": sorted(stray),
        "namespaces_removed": removed,
        "run_dir_removed": [str(rdir)] if had_dir else [],
    }


def vxlan_counters(h: Host) -> tuple[int, int]:
    try:
        with rtnl(h.netns) as ipr:
            links = ipr.get_links(_index(ipr, h.vxlan_dev))
    except (NetlinkError, OSError) as e:
        raise TestbedError(f"cannot read {h.vxlan_dev} in {h.netns}: {e}") from None
    stats = links[0].get("stats64") or links[0].get("stats")
    return int(stats["rx_bytes"]), int(stats["tx_bytes"])
