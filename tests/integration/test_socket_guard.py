"""The router's BPF socket guard on this kernel: loading its programs needs root."""

from __future__ import annotations

import socket

import pytest

from shuntflow.router.guard import SocketGuard

pytestmark = pytest.mark.root


def test_guard_refuses_marked_sockets_and_leaves_nothing() -> None:
    """Two guards stack (two routers on one kernel); closing both detaches everything."""
    first, second = SocketGuard(0x5F5F01), SocketGuard(0x5F5F01)
    first.start()
    second.start()
    try:
        first.close()  # the other router's programs still hold
        with socket.socket() as s:
            second.protect(s)
            with pytest.raises(PermissionError):
                s.bind(("127.0.0.1", 0))
            with pytest.raises(PermissionError):
                s.connect(("127.0.0.1", 9))
        with socket.socket() as plain:  # an unmarked socket is none of its business
            plain.bind(("127.0.0.1", 0))
        assert second.counters()["refused_bind"] >= 2  # its self-test's and ours
    finally:
        second.close()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x5F5F01)
        s.bind(("127.0.0.1", 0))  # no program left attached
