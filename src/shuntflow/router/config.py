# The router's settings: one frozen dataclass, filled from CLI flags and/or a TOML file.
#
# Why a separate module: the CLI, the daemon and the tests all build a RouterConfig, and every
# rule about what is a valid setting (addresses, ports, timeouts, "need a VXLAN device or a map")
# lives here once, raising ConfigError with one readable line that the CLI turns into exit 2.

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from shuntflow.router.auth import ClusterKeyError, load_cluster_key
from shuntflow.router.metrics import MetricsAddressError, parse_address
from shuntflow.router.policy import Policy, PolicyError

DEFAULT_PEER_PORT = 4790
# A claim waits for the peer libraries' agent threads, which a busy application can starve
# (redis io-threads spin): 50 ms refused switches on a loaded 2-vCPU CI machine, and each refusal
# doubles the calls before the next try. The wait is off the application's path, so be patient.
DEFAULT_CLAIM_TIMEOUT_MS = 250


class ConfigError(ValueError):
    """A setting that cannot work; the message is one line for the user."""


@dataclass(frozen=True)
class RouterConfig:
    socket: Path
    host_ip: str
    peer_port: int = DEFAULT_PEER_PORT
    vxlan_dev: str | None = None
    map_file: Path | None = None
    log_file: Path | None = None
    log_level: str = "info"
    claim_timeout_ms: int = DEFAULT_CLAIM_TIMEOUT_MS
    cluster_key: Path | None = None  # required: validate() refuses to go without it
    # Underlay sources a peer router may connect from; empty: the hosts the overlay map knows.
    peer_allow: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()  # policy rules, see policy.Rule.parse; deny wins
    deny: tuple[str, ...] = ()
    # Off only where fake libraries hold no real connections (the router's unit tests).
    owner_check: bool = True
    metrics: str | None = None  # HOST:PORT of the Prometheus endpoint; None: no endpoint
    # The kernel refuses connect/bind on handed-over sockets (guard.py); without it (off, or
    # failing to load) the router hands out nothing unless this is off.
    socket_guard: bool = True
    # Below: not on the CLI (TOML only); sane defaults for a real host.
    connect_timeout_ms: int = 1000
    answer_timeout_ms: int = 2000
    offer_read_timeout_ms: int = 2000
    peer_idle_timeout_ms: int = 30000  # a warm (pooled) connection waits this long for its OFFER
    peer_pool_size: int = 4  # warm connections kept to each peer in use; 0 = connect per switch
    hello_timeout_ms: int = 2000
    duplicate_wait_ms: int = 1000
    # The higher end's request waits this long for the lower end's crossing offer before making
    # its own: one offer per switch instead of two when both ends ask together. Slim libraries
    # ask at connect/accept; a shuntflow end at its threshold, and while it waits its bytes cross
    # VXLAN (docs/design.md, "One host connection per overlay connection").
    follower_grace_ms: int = 5
    follower_grace_shuntflow_us: int = 150
    stats_timeout_ms: int = 500
    max_clients: int = 4096
    max_clients_per_netns: int = 1024  # library channels from one container's namespace
    # SWITCH_REQs of one library channel in the works at once; more are DENIED. At 3,000
    # switches/s on a loaded 2-vCPU machine a request can take 100-300 ms, so 256 was reached.
    max_outstanding: int = 4096
    max_incoming: int = 1024
    backoff_initial_ms: int = 100
    backoff_max_ms: int = 5000
    refresh_interval_s: float = 5.0
    refresh_min_interval_ms: int = 200
    netns: str | None = None  # read the VXLAN state of this named netns (tests); None = own ns
    auth_window_ms: int = 10_000  # an OFFER's timestamp may be this far off our clock
    max_nonces: int = 200_000  # replay cache bound (offers accepted within 2 x window)
    guard_mark: int = 0x53  # SO_MARK of handed-over sockets, which the guard's programs match
    max_idle_per_peer: int = 64  # connections from one source still waiting for their OFFER

    @property
    def control_socket(self) -> Path:
        return self.socket.with_name(self.socket.name + ".ctl")

    def validate(self) -> RouterConfig:
        try:
            ip = ipaddress.IPv4Address(self.host_ip)
        except ValueError:
            raise ConfigError(f"--host-ip {self.host_ip!r} is not an IPv4 address") from None
        if ip.is_unspecified or ip.is_multicast:
            raise ConfigError(f"--host-ip {self.host_ip} must be a unicast address of this host")
        if not 1 <= self.peer_port <= 65535:
            raise ConfigError(f"--peer-port {self.peer_port} is not a TCP port (1-65535)")
        if not 1 <= self.claim_timeout_ms <= 10_000:
            raise ConfigError(f"--claim-timeout-ms {self.claim_timeout_ms} must be 1..10000")
        if self.vxlan_dev is None and self.map_file is None:
            raise ConfigError("need --vxlan-dev or --map (or both): nothing to resolve overlay IPs")
        if self.vxlan_dev is not None and not 1 <= len(self.vxlan_dev) <= 15:
            raise ConfigError(f"--vxlan-dev {self.vxlan_dev!r} is not an interface name")
        if self.map_file is not None and not self.map_file.is_file():
            raise ConfigError(f"--map {self.map_file}: no such file")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level {self.log_level!r}: use debug, info, warning or error")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_ms", "_s")) and value <= 0:
                raise ConfigError(f"{f.name} must be positive")
            if f.name.startswith("max_") and value < 1:
                raise ConfigError(f"{f.name} must be at least 1")
        if not 0 < self.guard_mark <= 0xFFFFFFFF:
            raise ConfigError(f"guard_mark {self.guard_mark:#x} must be 1..0xffffffff")
        if not 0 <= self.peer_pool_size <= 64:
            raise ConfigError(f"peer_pool_size {self.peer_pool_size} must be 0..64")
        if not 0 <= self.follower_grace_shuntflow_us <= 1_000_000:
            raise ConfigError(
                f"follower_grace_shuntflow_us {self.follower_grace_shuntflow_us} must be "
                "0..1000000 (µs; 0 offers at once)"
            )
        if len(str(self.control_socket).encode()) >= 108:
            raise ConfigError(f"--socket {self.socket}: path too long for a Unix socket")
        for cidr in self.peer_allow:
            try:
                ipaddress.IPv4Network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"--peer-allow {cidr!r} is not an IPv4 address or CIDR") from None
        self.policy()
        if self.metrics is not None:
            try:
                parse_address(self.metrics)
            except MetricsAddressError as exc:
                raise ConfigError(str(exc)) from None
        if self.cluster_key is None:
            raise ConfigError(
                "missing --cluster-key FILE (the key shared by all routers, mode 0600)"
            )
        try:
            load_cluster_key(self.cluster_key)
        except ClusterKeyError as exc:
            raise ConfigError(str(exc)) from None
        return self

    def policy(self) -> Policy:
        try:
            return Policy.parse(self.allow, self.deny)
        except PolicyError as exc:
            raise ConfigError(str(exc)) from None


_PATH_KEYS = {"socket", "map_file", "log_file", "cluster_key"}
_ALIASES = {"map": "map_file", "config": None, "cluster_key_file": "cluster_key"}


def load_toml(path: Path) -> dict[str, Any]:
    """Keys as the CLI flags (dashes or underscores); `map` is an alias of `map_file`."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    if isinstance(raw.get("router"), dict):
        raw = raw["router"]
    known = {f.name: f for f in fields(RouterConfig)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        name = _ALIASES.get(name, name) or ""
        if name not in known:
            raise ConfigError(f"--config {path}: unknown key {key!r}")
        if name in _PATH_KEYS:
            value = (path.parent / str(value)) if not Path(str(value)).is_absolute() else value
            value = Path(value)
        out[name] = value
    return out


def build_config(file_values: dict[str, Any], overrides: dict[str, Any]) -> RouterConfig:
    """CLI flags (non-None overrides) win over the TOML file."""
    merged = dict(file_values)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    if "socket" not in merged:
        raise ConfigError("missing --socket PATH (flag or config key)")
    if "host_ip" not in merged:
        raise ConfigError("missing --host-ip IP (flag or config key)")
    for f in fields(RouterConfig):
        if f.name in merged:
            merged[f.name] = _check_type(f.name, str(f.type), merged[f.name])
    return RouterConfig(**merged).validate()


def _check_type(name: str, typ: str, value: Any) -> Any:
    optional = typ.endswith("| None")
    base = typ.removesuffix("| None").strip()
    if value is None and optional:
        return None
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if base == "str" and isinstance(value, str):
        return value
    if base == "Path" and isinstance(value, str | Path):
        return Path(value)
    if base == "bool" and isinstance(value, bool):
        return value
    if (
        base == "tuple[str, ...]"
        and isinstance(value, list | tuple)
        and all(isinstance(v, str) for v in value)
    ):
        return tuple(value)
    if base == "tuple[str, ...]" and isinstance(value, str):
        return (value,)
    shown = "a list of strings" if base == "tuple[str, ...]" else base
    raise ConfigError(f"{name} must be {shown}, got {value!r}")
