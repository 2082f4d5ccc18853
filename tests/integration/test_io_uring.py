"""A process that holds an io_uring switches nothing: I/O submitted on a ring bypasses every
wrapper, so the library could neither count it into S nor move a read pending on the overlay
socket (it would complete with the overlay's FIN, which the application takes for EOF).

The torture server makes a ring before it serves, in one of the two ways the library must
notice: through libc's syscall() (as the Rust io-uring crate does), or behind the library's back
(libc's own syscall symbol, as liburing's inline syscalls would) and mapped, as every ring is.
The client crosses the threshold on every connection and asks; the server's library must
refuse every claim, its own thresholds must pin its connections, and every byte must arrive
over the overlay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shuntflow.testbed import Testbed

from .apps import assert_intact, install_path_counters, read_path, run_torture

pytestmark = pytest.mark.root

# argv: how ("syscall" | "hidden"), then shuntflow.torture's arguments.
RING_THEN_SERVE = """
import ctypes, mmap, sys
from shuntflow import torture
SYS_IO_URING_SETUP = 425
how = sys.argv[1]
# "syscall": the global scope's syscall, which the preloaded library wraps; "hidden": libc's
# own symbol, which it never sees.
call = (ctypes.CDLL(None) if how == "syscall" else ctypes.CDLL("libc.so.6")).syscall
call.restype = ctypes.c_long
params = ctypes.create_string_buffer(120)  # struct io_uring_params
fd = call(ctypes.c_long(SYS_IO_URING_SETUP), ctypes.c_long(4), params)
assert fd >= 0, "io_uring_setup failed"
ring = mmap.mmap(fd, 4096, offset=0)  # IORING_OFF_SQ_RING: the mapping every ring has
sys.exit(torture.main(sys.argv[2:]))
"""


@pytest.mark.parametrize(("how", "port"), [("syscall", 7931), ("hidden", 7932)])
def test_a_process_with_a_ring_switches_nothing(
    make_testbed: Any, tmp_path: Path, how: str, port: int
) -> None:
    tb: Testbed = make_testbed(f"ur{how[0]}", hosts=2, containers=1, routers=True)
    install_path_counters(tb)
    log = tmp_path / "server-lib.log"
    client, server = run_torture(
        tb,
        "shuntflow",
        "blocking",
        1,
        24,
        port,
        max_bytes=64 * 1024,
        concurrency=8,
        timeout=60,
        server_program=("-c", RING_THEN_SERVE, how),
        server_log=log,
    )
    assert_intact(client, 24)
    assert_intact(server, 24)
    assert client["switched"] == 0 and server["switched"] == 0, (client, server)
    # Every byte the connections moved (each counted once, by the client) crossed VXLAN. (The
    # host path carried the routers' refused offers: no application byte, nothing to compare.)
    path = read_path(tb)
    assert path.overlay_payload >= client["bytes"] > 0, (path, client["bytes"])
    text = log.read_text()
    why = "io_uring_setup" if how == "syscall" else "its ring is mapped"
    assert f"io_uring in use ({why})" in text, text[-2000:]
    # The client asked: the server's router offered nothing its library accepted.
    routers = [h.router_log.read_text() for h in tb.hosts]
    assert "event=switch_done" not in "".join(routers)
    assert "PEER_REFUSED" in routers[1], routers[1][-2000:]
