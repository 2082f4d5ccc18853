# The binding to the router's native switch path (switchpath/, built into libsfswitch.so):
# ctypes calls into it, and the events it sends back.
#
# Why ctypes: a handful of cold calls (start, hand over a client, push a table, read the
# counters), each of which releases the GIL; the per-switch work never comes back to Python.
# The native side runs its own thread; it reports through one SEQPACKET socketpair, one JSON
# object per datagram, which the daemon reads on its event loop (add_reader).
# SHUNTFLOW_SWITCHPATH=<path> loads another build (e.g. the AddressSanitizer one of
# `make -C switchpath SANITIZE=1`).

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shuntflow.router.config import RouterConfig
from shuntflow.router.policy import Policy

KEY_MAX = 1024
# How long a request whose address missed the overlay map waits for Python's refresh of it.
MAP_WAIT_MS = 1000

# Records the native side sends Python (switchpath/sfs.h); its log lines it writes itself.
EV_CLOSED, EV_MAP_MISS, EV_ROW, EV_STATS_END = 2, 3, 4, 5
# Its latency windows (sfs.h LAT_*): SWITCH_REQ -> SWITCH_RES OK, the libraries' SWITCH_DONE of
# initiating ends, SWITCH_CALLS' longest call of completed and of failed switches.
REQ_RES, SWITCH_TIME, CALL_MAX, CALL_MAX_FAILED = range(4)


class SwitchPathError(RuntimeError):
    """The native switch path cannot be loaded or started; one line for the user."""


class _Config(ctypes.Structure):
    _fields_ = [
        ("host_ip", ctypes.c_uint32),
        ("peer_port", ctypes.c_uint16),
        ("pad0", ctypes.c_uint16),
        ("owner_check", ctypes.c_int32),
        ("guard_on", ctypes.c_int32),
        ("map_refreshable", ctypes.c_int32),
        ("guard_mark", ctypes.c_uint32),
        ("connect_timeout_ms", ctypes.c_int32),
        ("answer_timeout_ms", ctypes.c_int32),
        ("offer_read_timeout_ms", ctypes.c_int32),
        ("peer_idle_timeout_ms", ctypes.c_int32),
        ("peer_pool_size", ctypes.c_int32),
        ("duplicate_wait_ms", ctypes.c_int32),
        ("follower_grace_ms", ctypes.c_int32),
        ("follower_grace_shuntflow_us", ctypes.c_int32),
        ("claim_timeout_ms", ctypes.c_int32),
        ("max_outstanding", ctypes.c_int32),
        ("max_incoming", ctypes.c_int32),
        ("max_idle_per_peer", ctypes.c_int32),
        ("backoff_initial_ms", ctypes.c_int32),
        ("backoff_max_ms", ctypes.c_int32),
        ("auth_window_ms", ctypes.c_int32),
        ("max_nonces", ctypes.c_int32),
        ("map_wait_ms", ctypes.c_int32),
        ("keylen", ctypes.c_int32),
        ("key", ctypes.c_uint8 * KEY_MAX),
    ]


class _Rule(ctypes.Structure):
    """switchpath/sfs.h `struct rule`."""

    _fields_ = [
        ("net", ctypes.c_uint32),
        ("mask", ctypes.c_uint32),
        ("first", ctypes.c_uint16),
        ("last", ctypes.c_uint16),
        ("deny", ctypes.c_int32),
        ("text", ctypes.c_char * 64),
    ]


class _MapEntry(ctypes.Structure):
    """switchpath/sfs.h `struct mapent`."""

    _fields_ = [
        ("net", ctypes.c_uint32),
        ("mask", ctypes.c_uint32),
        ("host", ctypes.c_uint32),
        ("tier", ctypes.c_int32),
        ("local", ctypes.c_int32),
    ]


def library_path() -> Path:
    override = os.environ.get("SHUNTFLOW_SWITCHPATH")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "_native" / "libsfswitch.so"


def _net_order(ip: ipaddress.IPv4Address | str) -> int:
    """An address as the C side keeps it: the 4 bytes of network order, read as a native int."""
    return int.from_bytes(ipaddress.IPv4Address(ip).packed, "little")


def _load() -> ctypes.CDLL:
    path = library_path()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise SwitchPathError(f"cannot load the switch path {path}: {exc}") from None
    vp, u32, u64, sz = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t
    for name, res, args in (
        ("sfs_config_size", sz, []),
        ("sfs_new", vp, [ctypes.POINTER(_Config), ctypes.c_int]),
        ("sfs_event_fd", ctypes.c_int, [vp]),
        ("sfs_start", ctypes.c_int, [vp]),
        ("sfs_stop", None, [vp]),
        ("sfs_free", None, [vp]),
        (
            "sfs_add_client",
            ctypes.c_int,
            [
                vp,
                ctypes.c_int,
                u64,
                u32,
                u32,
                ctypes.c_int64,
                ctypes.c_int,
                ctypes.c_char_p,
                u32,
                u32,
            ],
        ),
        ("sfs_set_policy", ctypes.c_int, [vp, ctypes.POINTER(_Rule), sz]),
        (
            "sfs_set_map",
            ctypes.c_int,
            [vp, ctypes.POINTER(_MapEntry), sz, ctypes.POINTER(u32), sz],
        ),
        ("sfs_set_attach", ctypes.c_int, [vp, ctypes.POINTER(u64), sz]),
        ("sfs_set_peer_allow", ctypes.c_int, [vp, ctypes.POINTER(u32), ctypes.POINTER(u32), sz]),
        ("sfs_set_handoff_refusal", None, [vp, ctypes.c_char_p]),
        ("sfs_stats_req", u32, [vp, u64]),
        ("sfs_stats_forget", None, [vp, u32]),
        (
            "sfs_samples",
            sz,
            [vp, ctypes.c_int, u64, ctypes.POINTER(u32), sz, ctypes.POINTER(u64)],
        ),
        ("sfs_set_log", None, [vp, ctypes.c_int, ctypes.c_int]),
        ("sfs_status_json", sz, [vp, ctypes.c_char_p, sz]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    if lib.sfs_config_size() != ctypes.sizeof(_Config):
        raise SwitchPathError(f"{path}: built from another version of this package")
    return lib


class SwitchPath:
    """One native switch path: owns the listener fd it is given and the clients handed to it."""

    def __init__(
        self, cfg: RouterConfig, key: bytes, listener: socket.socket, map_refreshable: bool
    ) -> None:
        if len(key) > KEY_MAX:
            raise SwitchPathError(f"cluster key longer than {KEY_MAX} bytes")
        self._lib = _load()
        c = _Config()
        c.host_ip = _net_order(cfg.host_ip)
        c.peer_port = cfg.peer_port
        c.owner_check = int(cfg.owner_check)
        c.guard_on = int(cfg.socket_guard)
        c.map_refreshable = int(map_refreshable)
        c.guard_mark = cfg.guard_mark
        for name in (
            "connect_timeout_ms",
            "answer_timeout_ms",
            "offer_read_timeout_ms",
            "peer_idle_timeout_ms",
            "peer_pool_size",
            "duplicate_wait_ms",
            "follower_grace_ms",
            "follower_grace_shuntflow_us",
            "claim_timeout_ms",
            "max_outstanding",
            "max_incoming",
            "max_idle_per_peer",
            "backoff_initial_ms",
            "backoff_max_ms",
            "auth_window_ms",
            "max_nonces",
        ):
            setattr(c, name, int(getattr(cfg, name)))
        c.map_wait_ms = MAP_WAIT_MS
        c.keylen = len(key)
        ctypes.memmove(c.key, key, len(key))
        self._listener = listener
        handle = self._lib.sfs_new(ctypes.byref(c), listener.fileno())
        ctypes.memset(c.key, 0, KEY_MAX)
        if not handle:
            raise SwitchPathError("cannot create the switch path (out of memory or fds)")
        self._h = ctypes.c_void_p(handle)
        self.events = socket.socket(fileno=os.dup(self._lib.sfs_event_fd(self._h)))
        self.events.setblocking(False)
        self._started = False

    def start(self) -> None:
        rc = self._lib.sfs_start(self._h)
        if rc != 0:
            raise SwitchPathError(f"cannot start the switch path thread: {os.strerror(-rc)}")
        self._started = True

    def stop(self) -> None:
        """Ends the thread; every client is closed, with an event each (read them after)."""
        if self._started:
            self._lib.sfs_stop(self._h)
            self._started = False

    def close(self) -> None:
        self.stop()
        self.events.close()
        if self._h:
            self._lib.sfs_free(self._h)
            self._h = ctypes.c_void_p(None)

    # -- pushing what Python knows -----------------------------------------------------------

    def add_client(
        self,
        fd: int,
        cid: int,
        pid: int,
        cred_pid: int,
        nsid: int | None,
        diag_fd: int | None,
        owner_error: str,
        hello_seq: int,
        mode: int = 0,
    ) -> bool:
        """Hands a library channel over at its HELLO (answered there with HELLO_ACK, seq
        `hello_seq`; `mode` is the HELLO's: 1 slim); the fd is native's either way."""
        rc = self._lib.sfs_add_client(
            self._h,
            fd,
            cid,
            pid & 0xFFFFFFFF,
            max(0, cred_pid),
            -1 if nsid is None else nsid,
            -1 if diag_fd is None else diag_fd,
            owner_error.encode(errors="replace"),
            hello_seq & 0xFFFFFFFF,
            mode & 0xFFFFFFFF,
        )
        return bool(rc == 0)

    def set_policy(self, policy: Policy) -> None:
        rules = [(r, 0) for r in policy.allow] + [(r, 1) for r in policy.deny]
        arr = (_Rule * max(1, len(rules)))()
        for i, (rule, deny) in enumerate(rules):
            arr[i].net = int(rule.net.network_address)
            arr[i].mask = int(rule.net.netmask)
            arr[i].first, arr[i].last = rule.first_port, rule.last_port
            arr[i].deny = deny
            arr[i].text = rule.text.encode()[:63]
        self._lib.sfs_set_policy(self._h, arr, len(rules))

    def set_map(
        self,
        entries: list[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address | None, int, bool]],
        hosts: Iterable[ipaddress.IPv4Address],
    ) -> None:
        """(overlay net, its host or None, tier, host is this one), and every known host."""
        arr = (_MapEntry * max(1, len(entries)))()
        for i, (net, host, tier, local) in enumerate(entries):
            arr[i].net = int(net.network_address)
            arr[i].mask = int(net.netmask)
            arr[i].host = _net_order(host) if host is not None else 0
            arr[i].tier, arr[i].local = tier, int(local)
        known = sorted({_net_order(h) for h in hosts})
        harr = (ctypes.c_uint32 * max(1, len(known)))(*known)
        self._lib.sfs_set_map(self._h, arr, len(entries), harr, len(known))

    def set_attachments(self, owner: dict[ipaddress.IPv4Address, int]) -> None:
        pairs = [(int(ip) << 32) | (nsid & 0xFFFFFFFF) for ip, nsid in owner.items()]
        arr = (ctypes.c_uint64 * max(1, len(pairs)))(*pairs)
        self._lib.sfs_set_attach(self._h, arr, len(pairs))

    def set_peer_allow(self, nets: list[ipaddress.IPv4Network]) -> None:
        a = (ctypes.c_uint32 * max(1, len(nets)))(*(int(n.network_address) for n in nets))
        b = (ctypes.c_uint32 * max(1, len(nets)))(*(int(n.netmask) for n in nets))
        self._lib.sfs_set_peer_allow(self._h, a, b, len(nets))

    def set_handoff_refusal(self, why: str | None) -> None:
        self._lib.sfs_set_handoff_refusal(self._h, (why or "").encode())

    # -- asking ------------------------------------------------------------------------------

    def stats_request(self, cid: int) -> int:
        """STATS_REQ to a client; its seq, 0 if the client is gone."""
        return int(self._lib.sfs_stats_req(self._h, cid))

    def stats_forget(self, seq: int) -> None:
        self._lib.sfs_stats_forget(self._h, seq)

    def samples(self, which: int, since: int) -> tuple[list[int], int]:
        """Window `which`'s samples (µs) from running index `since` on; the next index."""
        size = 16384
        buf = (ctypes.c_uint32 * size)()
        total = ctypes.c_uint64(0)
        n = self._lib.sfs_samples(self._h, which, since, buf, size, ctypes.byref(total))
        return list(buf[:n]), int(total.value)

    def set_log(self, fd: int, level: int) -> None:
        """Native log lines go to `fd` (a dup is taken), from `level` (logging's numbers) on."""
        self._lib.sfs_set_log(self._h, os.dup(fd) if fd >= 0 else -1, level)

    def counters(self) -> dict[str, Any]:
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lib.sfs_status_json(self._h, buf, size)
            if n < size:
                out: dict[str, Any] = json.loads(buf.value.decode())
                return out
            size = n + 1

    def read_events(self) -> list[dict[str, Any]]:
        """Whatever the native side reported since the last call (never blocks)."""
        out: list[dict[str, Any]] = []
        while True:
            try:
                data = self.events.recv(8192)
            except (BlockingIOError, InterruptedError):
                return out
            if not data:
                return out
            out.append(json.loads(data))
