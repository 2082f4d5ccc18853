"""What the router tests share: an overlay plan for two routers on loopback, starting that pair,
connection tuples in it, and the check that two sockets are the ends of one working connection."""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from shuntflow.router.testing import RouterProcess, free_port
from shuntflow.wire import Tuple4

# 198.19.1.0/24 lives on A (127.0.0.1), 198.19.2.0/24 and 198.19.0.0/24 on B (127.0.0.2),
# 198.19.3.0/24 on a host 127.0.0.3 with no router.
MAP = {
    "198.19.1.0/24": "127.0.0.1",
    "198.19.2.0/24": "127.0.0.2",
    "198.19.0.0/24": "127.0.0.2",  # B's addresses below A's: B's end leads
    "198.19.3.0/24": "127.0.0.3",
}


def tup(i: int, local: str = "198.19.1.1", remote: str = "198.19.2.1:80") -> Tuple4:
    return Tuple4.parse(f"{local}:{20000 + i}", remote)


def assert_pair(x: socket.socket, y: socket.socket) -> None:
    """x and y are the two ends of one TCP connection, and bytes flow both ways."""
    assert x.getsockname() == y.getpeername()
    assert x.getpeername() == y.getsockname()
    x.settimeout(5)
    y.settimeout(5)
    x.sendall(b"ping from x")
    assert y.recv(100) == b"ping from x"
    y.sendall(b"pong from y")
    assert x.recv(100) == b"pong from y"


def start_pair(
    d: Path,
    plan: Mapping[str, str] = MAP,
    args: Sequence[str] = (),
    names: tuple[str, str] = ("a", "b"),
) -> tuple[RouterProcess, RouterProcess, int]:
    """Router A on 127.0.0.1 and B on 127.0.0.2, one peer port, the static map `plan`
    (in d/map.json); sockets under d/<name>/. Neither is left running if B fails to start."""
    map_file = d / "map.json"
    map_file.write_text(json.dumps(dict(plan)))
    port = free_port()
    argv = ["--map", str(map_file), *args]
    a = RouterProcess(d / names[0] / "router.sock", "127.0.0.1", port, argv)
    try:
        b = RouterProcess(d / names[1] / "router.sock", "127.0.0.2", port, argv)
    except BaseException:
        a.stop()
        raise
    return a, b, port
