"""The native ownership check in another network namespace: a connection there is not ours,
even with a tuple ours could have, and ours is not the namespace's. Needs root (a namespace of
its own, `fr-owner`)."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
from typing import Any

import pytest

from shuntflow.router import ownership

from ..switchpath import Native, PythonOwner, diag_socket, load_native, tup_of
from .locks import prefix_lock

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def native() -> Native:
    return load_native()


def _in_netns(name: str, fn: Any) -> Any:
    """fn() run in a thread that entered namespace `name` (sockets it makes stay there)."""
    box: list[Any] = []

    def body() -> None:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            ownership._setns(fd)
        finally:
            os.close(fd)
        box.append(fn())

    th = threading.Thread(target=body)
    th.start()
    th.join()
    return box[0]


def test_owns_is_per_namespace(native: Native) -> None:
    """A connection in another namespace is not ours, even with a tuple ours could have."""
    name = "fr-owner"
    with prefix_lock("fr"):
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)

            def make() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
                d = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 4)
                d.bind((0, 0))
                ls = socket.create_server(("127.0.0.1", 0))
                c = socket.create_connection(ls.getsockname())
                s, _ = ls.accept()
                return d, ls, c, s

            foreign_diag, ls, c, s = _in_netns(name, make)
            seq = ctypes.c_uint32(0)
            t = tup_of(c)
            with diag_socket() as ours:
                try:
                    why = "no such TCP connection in the process's network namespace"
                    assert native.owns(ours.fileno(), seq, t) == (False, why)
                    owner = PythonOwner()
                    try:
                        assert owner.owns(t) == (False, why)
                    finally:
                        owner.close()
                    assert native.owns(foreign_diag.fileno(), seq, t) == (True, "ESTABLISHED")
                    # And the other way round: our live connection is not the namespace's.
                    hl = socket.create_server(("127.0.0.1", 0))
                    hc = socket.create_connection(hl.getsockname())
                    hs, _ = hl.accept()
                    with hl, hc, hs:
                        assert native.owns(ours.fileno(), seq, tup_of(hc))[0]
                        assert native.owns(foreign_diag.fileno(), seq, tup_of(hc)) == (False, why)
                finally:
                    for sock in (foreign_diag, ls, c, s):
                        sock.close()
        finally:
            subprocess.run(["ip", "netns", "del", name], check=True)
