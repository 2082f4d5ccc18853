"""Invariant 3 across a switch: the fd number stays, its addresses stay the overlay's, and its
socket options, fd flags and file flags are the application's, including options it changes
while the switch is under way.

Both ends change TCP_KEEPIDLE and TCP_USER_TIMEOUT on every message, so changes land before the
handoff, between the commit and the swap, and after it. Once the fd is a host socket (its
network namespace cookie is no longer the container's), each end reads every option back from
the fd itself and compares it with the last value it set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shuntflow.testbed import Testbed

from .apps import SCRIPT_PRELUDE, mode_env, run_script_client, start_script_server
from .conftest import MakeTestbed

pytestmark = pytest.mark.root

CONNECTIONS = 30
ROUNDS = 40
PORT = 7821

# Shared by both ends: set the options, change two of them per message, read them all back.
COMMON = (
    SCRIPT_PRELUDE
    + """
import fcntl, struct
T = socket.IPPROTO_TCP

def setup(s, nodelay, cloexec):
    s.setsockopt(T, socket.TCP_NODELAY, nodelay)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    s.setsockopt(T, socket.TCP_KEEPINTVL, 9)
    s.setsockopt(T, socket.TCP_KEEPCNT, 4)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 5))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 200000)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x10)
    s.set_inheritable(not cloexec)

def change(s, i):
    s.setsockopt(T, socket.TCP_KEEPIDLE, 100 + i)
    s.setsockopt(T, socket.TCP_USER_TIMEOUT, 20000 + i)
    return i

def check(s, last, nodelay, cloexec, peer, cookie0):
    got = {
        "fd_is_host_socket": netns_cookie(s) != cookie0,
        "peer": "%s:%d" % s.getpeername()[:2],
        "nodelay": s.getsockopt(T, socket.TCP_NODELAY),
        "keepalive": s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "keepidle": s.getsockopt(T, socket.TCP_KEEPIDLE),
        "keepintvl": s.getsockopt(T, socket.TCP_KEEPINTVL),
        "keepcnt": s.getsockopt(T, socket.TCP_KEEPCNT),
        "user_timeout": s.getsockopt(T, socket.TCP_USER_TIMEOUT),
        "linger": list(struct.unpack("ii", s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))),
        "sndbuf": s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        "tos": s.getsockopt(socket.IPPROTO_IP, socket.IP_TOS),
        "cloexec": bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
        "nonblock": bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK),
    }
    want = {
        "fd_is_host_socket": True, "peer": peer, "nodelay": nodelay, "keepalive": 1,
        "keepidle": 100 + last, "keepintvl": 9, "keepcnt": 4, "user_timeout": 20000 + last,
        "linger": [1, 5], "sndbuf": 400000, "tos": 0x10, "cloexec": cloexec, "nonblock": False,
    }
    return {k: (got[k], want[k]) for k in want if got[k] != want[k]}
"""
)

SERVER = (
    COMMON
    + f"""
lst = socket.create_server((sys.argv[1], {PORT}))
print("listening", flush=True)
report = []
for n in range({CONNECTIONS}):
    c, addr = lst.accept()
    cookie0 = netns_cookie(c)
    setup(c, nodelay=0, cloexec=False)
    last = None
    while True:
        msg = c.recv(8, socket.MSG_WAITALL)
        if not msg:
            break
        last = change(c, int(msg))
        c.sendall(msg)
    report.append(check(c, last, 0, False, "%s:%d" % addr[:2], cookie0))
    c.close()
print(json.dumps(report))
"""
)

CLIENT = (
    COMMON
    + f"""
report = []
for n in range({CONNECTIONS}):
    c = socket.create_connection((sys.argv[1], {PORT}))
    cookie0, fd = netns_cookie(c), c.fileno()
    setup(c, nodelay=1, cloexec=True)
    for i in range({ROUNDS}):
        change(c, i)
        c.sendall(b"%08d" % i)
        assert c.recv(8, socket.MSG_WAITALL) == b"%08d" % i, (n, i)
    # The last rounds may still run on the overlay: wait for the swap before reading back.
    deadline = time.monotonic() + 3
    while netns_cookie(c) == cookie0 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert c.fileno() == fd
    report.append(check(c, {ROUNDS} - 1, 1, True, "%s:{PORT}" % sys.argv[1], cookie0))
    c.shutdown(socket.SHUT_WR)
    assert c.recv(1) == b""
    c.close()
print(json.dumps(report))
"""
)


def test_fd_keeps_its_options_flags_and_addresses_across_a_switch(
    make_testbed: MakeTestbed, tmp_path: Path
) -> None:
    tb: Testbed = make_testbed("tr1", hosts=2, containers=1, routers=True)
    client_c, server_c = tb.hosts[0].containers[0], tb.hosts[1].containers[0]
    logs = {"server": tmp_path / "server.log", "client": tmp_path / "client.log"}
    server = start_script_server(
        server_c, SERVER, mode_env(tb, server_c, "shuntflow", threshold=4, log=logs["server"])
    )
    try:
        client = run_script_client(
            client_c,
            CLIENT,
            server_c.overlay_ip,
            mode_env(tb, client_c, "shuntflow", threshold=4, log=logs["client"]),
            timeout=120,
        )
        out, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert client.returncode == 0, client.stderr[-2000:]
    assert server.returncode == 0, err[-2000:]
    sides = {"client": json.loads(client.stdout), "server": json.loads(out)}
    for side, report in sides.items():
        assert len(report) == CONNECTIONS
        bad = {n: diff for n, diff in enumerate(report) if diff}
        assert not bad, (side, bad, logs[side].read_text()[-3000:])
