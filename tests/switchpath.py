"""The native switch path (switchpath/) loaded with ctypes, and the router's Python ownership
check beside it: what the switch path's tests share (tests/unit/test_switchpath_frames.py, and
tests/integration/test_switchpath_netns.py for another namespace).

The library is built from switchpath/ by `make` (`load_native`), or taken from
SHUNTFLOW_SWITCHPATH when that is set (`make test-asan` runs the tests against the
AddressSanitizer build that way).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shuntflow.router import ownership
from shuntflow.wire import MSG_SIZE, PEER_SIZE, Endpoint, MsgType, Tuple4

ROOT = Path(__file__).resolve().parents[1]


class CTuple(ctypes.Structure):
    _fields_ = (
        ("local_ip", ctypes.c_uint32),
        ("remote_ip", ctypes.c_uint32),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
    )


def ctuple(t: Tuple4) -> CTuple:
    """Network-order bytes, as struct sf_tuple holds them."""
    raw = (
        t.local.ip.packed
        + t.remote.ip.packed
        + t.local.port.to_bytes(2, "big")
        + t.remote.port.to_bytes(2, "big")
    )
    return CTuple.from_buffer_copy(raw)


def pytuple(c: CTuple) -> Tuple4:
    raw = bytes(c)
    return Tuple4(
        Endpoint(ipaddress.IPv4Address(raw[0:4]), int.from_bytes(raw[8:10], "big")),
        Endpoint(ipaddress.IPv4Address(raw[4:8]), int.from_bytes(raw[10:12], "big")),
    )


Frame = ctypes.c_char * PEER_SIZE
MsgBuf = ctypes.c_char * MSG_SIZE
_u8p = ctypes.c_char_p
_void_p = ctypes.c_void_p


class Native:
    """The C functions, typed."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        self.lib = lib
        sig: dict[str, tuple[Any, list[Any]]] = {
            "sfp_binding": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, _void_p]),
            "sfp_offer_make": (
                ctypes.c_int,
                [_u8p, ctypes.c_size_t, ctypes.c_uint32, _void_p, _u8p, _void_p],
            ),
            "sfp_answer_make": (
                None,
                [_u8p, ctypes.c_size_t, _void_p, ctypes.c_uint16, _u8p, _void_p],
            ),
            "sfp_parse": (ctypes.c_char_p, [_u8p, ctypes.c_size_t, ctypes.c_uint16, _void_p]),
            "sfp_answer_check": (ctypes.c_char_p, [_u8p, ctypes.c_size_t, _void_p, _void_p, _u8p]),
            "sfp_replay_new": (_void_p, [ctypes.c_uint32, ctypes.c_uint32]),
            "sfp_replay_free": (None, [_void_p]),
            "sfp_replay_size": (ctypes.c_size_t, [_void_p]),
            "sfp_offer_check": (
                ctypes.c_char_p,
                [
                    _void_p,
                    _u8p,
                    ctypes.c_size_t,
                    _void_p,
                    _u8p,
                    ctypes.c_uint64,
                    _void_p,
                    ctypes.c_size_t,
                ],
            ),
            "sfp_now_ms": (ctypes.c_uint64, []),
            "sfl_parse": (ctypes.c_char_p, [_u8p, ctypes.c_size_t, ctypes.c_int, _void_p]),
            "sfl_valid_tuple": (ctypes.c_int, [_void_p]),
            "sfl_tuple": (CTuple, [_void_p]),
            "sfl_mirrored": (CTuple, [_void_p]),
            "sfo_owns": (
                ctypes.c_int,
                [
                    ctypes.c_int,
                    ctypes.POINTER(ctypes.c_uint32),
                    _void_p,
                    ctypes.c_int,
                    _void_p,
                    ctypes.c_size_t,
                ],
            ),
            "sfo_unaccepted": (
                ctypes.c_int,
                [ctypes.c_int, ctypes.POINTER(ctypes.c_uint32), _void_p, ctypes.c_int],
            ),
        }
        for name, (restype, argtypes) in sig.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes

    # -- peer frames -----------------------------------------------------------------------

    def offer_make(self, key: bytes, seq: int, t: Tuple4, binding: bytes) -> bytes:
        out = Frame()
        ct = ctuple(t)
        assert self.lib.sfp_offer_make(key, len(key), seq, ctypes.byref(ct), binding, out) == 0
        return out.raw

    def answer_make(self, key: bytes, offer: bytes, status: int, binding: bytes) -> bytes:
        out = Frame()
        src = Frame.from_buffer_copy(offer)
        self.lib.sfp_answer_make(key, len(key), src, status, binding, out)
        return out.raw

    def parse(self, data: bytes, want: MsgType) -> tuple[bytes | None, str | None]:
        out = Frame()
        why = self.lib.sfp_parse(data, len(data), int(want), out)
        return (None, why.decode()) if why is not None else (out.raw, None)

    def answer_check(self, key: bytes, offer: bytes, answer: bytes, binding: bytes) -> str | None:
        why = self.lib.sfp_answer_check(
            key, len(key), Frame.from_buffer_copy(offer), Frame.from_buffer_copy(answer), binding
        )
        return None if why is None else str(why.decode())

    # -- library frames --------------------------------------------------------------------

    def lib_parse(self, data: bytes, nfds: int) -> tuple[bytes | None, str | None]:
        out = MsgBuf()
        why = self.lib.sfl_parse(data, len(data), nfds, out)
        return (None, why.decode()) if why is not None else (out.raw, None)

    # -- ownership -------------------------------------------------------------------------

    def owns(
        self, fd: int, seq: ctypes.c_uint32, t: Tuple4, timeout_ms: int = 500
    ) -> tuple[bool, str]:
        why = ctypes.create_string_buffer(256)
        ct = ctuple(t)
        ok = self.lib.sfo_owns(fd, ctypes.byref(seq), ctypes.byref(ct), timeout_ms, why, 256)
        return bool(ok), why.value.decode()

    def unaccepted(self, fd: int, seq: ctypes.c_uint32, t: Tuple4, timeout_ms: int = 500) -> bool:
        ct = ctuple(t)
        return bool(self.lib.sfo_unaccepted(fd, ctypes.byref(seq), ctypes.byref(ct), timeout_ms))


def load_native() -> Native:
    given_path = os.environ.get("SHUNTFLOW_SWITCHPATH")
    if given_path:
        return Native(Path(given_path))
    subprocess.run(["make", "-s", "-C", str(ROOT / "switchpath")], check=True)
    return Native(ROOT / "switchpath" / "build" / "libsfswitch.so")


# -- ownership: the kernel asked from both sides ------------------------------------------


@contextlib.contextmanager
def diag_socket() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 4)
    s.bind((0, 0))
    try:
        yield s
    finally:
        s.close()


class PythonOwner:
    """ownership.OwnershipChecker attached to this process's own namespace, as the router
    attaches a library channel (SO_PEERCRED of a connected AF_UNIX pair)."""

    def __init__(self) -> None:
        self.checker = ownership.OwnershipChecker()
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.key, _pid = self.checker.attach(self.a)

    def owns(self, t: Tuple4) -> tuple[bool, str]:
        v = self.checker.owns(self.key, t)
        return v.ok, v.reason

    def close(self) -> None:
        self.checker.close()
        self.a.close()
        self.b.close()


def tup_of(sock: socket.socket) -> Tuple4:
    (lh, lp), (rh, rp) = sock.getsockname(), sock.getpeername()
    return Tuple4.parse(f"{lh}:{lp}", f"{rh}:{rp}")
