"""Names, addresses and the shape of a testbed: pure functions, no kernel state.

Everything the builder, `down` and the CLI agree on lives here, so that `down` can find a
half-built testbed from its names alone and the unit tests can check the plan without root.
The hosts and containers these names and addresses make up: nodes.py.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_PREFIX = "sf"
DEFAULT_HOSTS = 2
DEFAULT_CONTAINERS = 2
MAX_HOSTS = 20
MAX_CONTAINERS = 20

RUN_ROOT = Path("/run/shuntflow")
NETNS_DIR = Path("/run/netns")

VXLAN_VNI = 42
VXLAN_PORT = 4789
OVERLAY_MTU = 1450
UNDERLAY_NET = "198.18.0.0/16"
OVERLAY_NET = "198.19.0.0/16"
PREFIX_LEN = 16
# Each router's Prometheus endpoint, on its host's underlay address (one per namespace, so the
# same port on every host).
METRICS_PORT = 9477

# How the overlay is programmed. docker: one L2 segment (198.19.0.0/16), every remote container a
# static neighbour + FDB entry, as Docker's overlay driver does. flannel: as Flannel's VXLAN
# backend, routed: a /24 pod subnet per host behind a bridge, the VXLAN device holding the
# subnet's .0 as its VTEP address, and per remote host a route to its subnet via its VTEP, a
# neighbour entry for that VTEP and an FDB entry for its MAC.
LAYOUTS = ("docker", "flannel")
DEFAULT_LAYOUT = "docker"
FLANNEL_VNI = 1
FLANNEL_PORT = 8472  # the kernel's own VXLAN port, which Flannel leaves as it is
POD_PREFIX_LEN = 24

# Interface names are limited to 15 bytes; the longest we make is "<8 chars>-ulbr" (13).
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
CONTAINER_NAME_RE = re.compile(r"^([a-z][a-z0-9]{0,7})-h([0-9]+)-c([0-9]+)$")


class TestbedError(Exception):
    """A testbed operation failed; the message is meant for the user, one clear sentence."""

    __test__ = False  # not a pytest test class, despite the name


class TestbedUsageError(TestbedError):
    """The caller asked for something invalid (the CLI exits with 2 for these)."""

    __test__ = False


def validate_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not PREFIX_RE.match(prefix):
        raise TestbedUsageError(
            f"invalid prefix {prefix!r}: use 1-8 characters, a lowercase letter first, "
            "then lowercase letters or digits"
        )
    return prefix


def validate_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise TestbedUsageError(f"invalid layout {layout!r}: use {' or '.join(LAYOUTS)}")
    return layout


def validate_count(what: str, value: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise TestbedUsageError(f"{what} must be between 1 and {maximum}, got {value!r}")
    return value


# -- names -------------------------------------------------------------------------------


def underlay_netns(prefix: str) -> str:
    return f"{prefix}-ul"


def underlay_bridge(prefix: str) -> str:
    return f"{prefix}-ulbr"


def host_netns(prefix: str, i: int) -> str:
    return f"{prefix}-h{i}"


def container_netns(prefix: str, i: int, j: int) -> str:
    return f"{prefix}-h{i}-c{j}"


def host_uplink(prefix: str) -> str:
    """The host's end of its underlay veth (inside the host namespace)."""
    return f"{prefix}-ul"


def underlay_port(prefix: str, i: int) -> str:
    """The underlay namespace's end of host i's veth, enslaved to the underlay bridge."""
    return f"{prefix}-h{i}"


def host_bridge(prefix: str) -> str:
    return f"{prefix}-br"


def vxlan_dev(prefix: str) -> str:
    return f"{prefix}-vx"


def container_port(prefix: str, j: int) -> str:
    """The host's end of container j's veth, enslaved to the host bridge."""
    return f"{prefix}-c{j}"


def container_if(prefix: str) -> str:
    return f"{prefix}-eth0"


def is_testbed_netns(prefix: str, name: str) -> bool:
    """Whether namespace `name` is one a testbed with `prefix` makes; `down` removes only these."""
    p = re.escape(prefix)
    return re.fullmatch(rf"{p}-ul|{p}-h[0-9]+|{p}-h[0-9]+-c[0-9]+", name) is not None


# -- addresses ---------------------------------------------------------------------------


def underlay_ip(i: int) -> str:
    return f"198.18.0.{i}"


def overlay_ip(i: int, j: int) -> str:
    return f"198.19.{i}.{j}"


def container_mac(i: int, j: int) -> str:
    # 02 = locally administered; 42 as Docker; c6:13 = 198.19, then host and container.
    return f"02:42:c6:13:{i:02x}:{j:02x}"


def pod_subnet(i: int) -> str:
    """Host i's pod subnet in the flannel layout."""
    return f"198.19.{i}.0/{POD_PREFIX_LEN}"


def vtep_ip(i: int) -> str:
    """Host i's VXLAN device address in the flannel layout: its subnet's .0, as Flannel's."""
    return f"198.19.{i}.0"


def vtep_mac(i: int) -> str:
    """Host i's VXLAN device MAC in the flannel layout (container 0 of host i: never used)."""
    return container_mac(i, 0)


def pod_gateway(i: int) -> str:
    """The bridge's address on host i, the containers' gateway in the flannel layout. Flannel's
    CNI gives the bridge .1; here .254, so that container j keeps 198.19.i.j in both layouts."""
    return f"198.19.{i}.254"


# -- run directory -----------------------------------------------------------------------


def run_dir(prefix: str) -> Path:
    return RUN_ROOT / prefix


def cluster_key_path(prefix: str) -> Path:
    """The testbed's routers' shared key (mode 0600), made by `testbed up`."""
    return run_dir(prefix) / "cluster.key"


def host_run_dir(prefix: str, i: int) -> Path:
    return run_dir(prefix) / f"h{i}"


def container_prefix(name: str) -> str | None:
    """The prefix a container name implies (`sf-h1-c2` -> `sf`), None if it is not one."""
    m = CONTAINER_NAME_RE.match(name)
    return m.group(1) if m else None


def parse_cpu_list(text: str) -> set[int]:
    """`1`, `0,1`, `0-3,6` -> a set of CPU numbers (as taskset -c takes them)."""
    cpus: set[int] = set()
    if not text.strip():
        raise TestbedUsageError("empty CPU list")
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
        if not m:
            raise TestbedUsageError(
                f"bad CPU list {text!r}: use numbers and ranges, e.g. 1 or 0,1 or 0-3"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise TestbedUsageError(f"bad CPU range {part!r} in {text!r}")
        cpus.update(range(lo, hi + 1))
    return cpus
