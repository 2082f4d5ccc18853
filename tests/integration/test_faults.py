"""Bad conditions that must cost nothing but speed: no router at all. (A router killed mid-run:
test_fault_injection.py.)

Every byte is checked by the torture pair; the connections must simply stay on the overlay.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shuntflow.native import app_environment
from shuntflow.testbed import Testbed
from shuntflow.wire import Mode

from .apps import assert_intact, run_torture

pytestmark = pytest.mark.root


@pytest.fixture
def faultbed(make_testbed: Any) -> Testbed:
    tb: Testbed = make_testbed("ft", routers=True)
    return tb


def test_router_absent(faultbed: Testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "lib.log"
    monkeypatch.setenv("SHUNTFLOW_LOG", str(log))
    for h in faultbed.hosts:  # the libraries look for a router that is not there
        object.__setattr__(h, "router_socket", tmp_path / f"missing-{h.index}.sock")
    client, server = run_torture(faultbed, "shuntflow", "blocking", 1, 40, 7741)
    assert_intact(client, 40)
    assert_intact(server, 40)
    assert client["switched"] == 0 and server["switched"] == 0
    warnings = [line for line in log.read_text().splitlines() if "unreachable" in line]
    # One warning per process, not one per connection.
    assert len(warnings) == 2, warnings
    # No channel, no request: neither the application threads nor the agent sent one.
    asked = [line for line in log.read_text().splitlines() if "asked the router" in line]
    assert asked == [], asked[:5]


# A tracked connection over loopback (the overlay here is 127.0.0.0/8), past the threshold, then
# 2.6 s of the agent's ticks: router retries at 0.25, 0.75 and 1.75 s, io_uring scans each second.
TRACKED_THEN_IDLE = """
import socket, time
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
c = socket.create_connection(srv.getsockname())
a, _ = srv.accept()
for _ in range(4):
    c.sendall(b"x")
    a.recv(1)
time.sleep(2.6)
"""


# One-request connections over loopback (the overlay here), then one that goes on, or a thread
# of the application's own made while a connection is open: the threads of the process (the
# kernel's list) after each. With argv[1] "threaded" the application makes a thread before its
# first connection. The application's threads wait until the end: a thread that ends may linger
# in the list for a moment after its join.
AGENT_START = """
import json, os, socket, sys, threading
done = threading.Event()
if sys.argv[1] == "threaded":
    threading.Thread(target=done.wait).start()
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(8)
def threads():
    return len(os.listdir("/proc/self/task"))
seen = []
for _ in range(20):
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    c.sendall(b"GET")
    a.recv(3)
    a.sendall(b"200")
    a.close()
    assert c.recv(3) == b"200" and c.recv(3) == b""
    c.close()
seen.append(threads())
if sys.argv[1] == "long":
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    for _ in range(4):  # 8 data calls at each end
        c.sendall(b"x")
        a.recv(1)
        a.sendall(b"y")
        c.recv(1)
    seen.append(threads())
if sys.argv[1] == "thread":
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    threading.Thread(target=done.wait).start()
    seen.append(threads())
done.set()
print(json.dumps(seen))
"""


@pytest.mark.parametrize(
    ("how", "threads"), [("long", [1, 2]), ("thread", [1, 3]), ("threaded", [3])]
)
def test_the_agent_starts_when_a_connection_needs_it(
    tmp_path: Path, how: str, threads: list[int]
) -> None:
    """A single-threaded process whose connections make a few data calls each (one request)
    never starts the agent thread: a multi-threaded process pays in every fd system call (the
    kernel's file reference, glibc's cancellation bracket). A connection's 8th data call starts
    it, and so does a thread the application makes while it holds a connection (a claim for that
    connection may come before it makes any call). A process that is multi-threaded already
    starts it with its first connection."""
    env = {
        **os.environ,
        **app_environment(
            Mode.SHUNTFLOW,
            tmp_path / "missing.sock",
            threshold=64,
            overlay_cidr="127.0.0.0/8",
            log=str(tmp_path / "lib.log"),
        ),
    }
    out = subprocess.run(
        [sys.executable, "-c", AGENT_START, how],
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    )
    assert json.loads(out.stdout) == threads, out.stdout
    log = (tmp_path / "lib.log").read_text()
    # 20 connections at each end were tracked, the agent tried the router once it ran.
    assert log.count("closed in phase") >= 40, log[-2000:]
    assert "unreachable" in log


def test_the_library_takes_its_fds_once(tmp_path: Path) -> None:
    """Every fd the library keeps is taken when its agent starts and kept: the io_uring scan
    rereads one /proc/self/maps fd and the router's channel retries on one socket. Taken anew at
    each scan or try, each was an fd held for a moment, and an application at its fd limit got
    EMFILE from a socket() that fell in that moment (the fd-limit test in
    test_fault_injection.py, now and then)."""
    trace = tmp_path / "trace"
    missing = tmp_path / "missing.sock"
    env = {
        **os.environ,
        **app_environment(
            Mode.SHUNTFLOW,
            missing,
            threshold=1,
            overlay_cidr="127.0.0.0/8",
            log=str(tmp_path / "lib.log"),
        ),
    }
    argv = ["strace", "-f", "-qq", "-e", "trace=openat,socket,connect", "-o", str(trace)]
    subprocess.run(
        [*argv, sys.executable, "-c", TRACKED_THEN_IDLE], env=env, check=True, timeout=60
    )
    calls = trace.read_text().splitlines()
    tries = [x for x in calls if "connect(" in x and str(missing) in x]
    maps = [x for x in calls if '"/proc/self/maps"' in x]
    channels = [x for x in calls if "socket(AF_UNIX, SOCK_SEQPACKET" in x]
    assert len(tries) >= 3, f"the agent did not retry its router: {tries}"
    assert "unreachable" in (tmp_path / "lib.log").read_text()
    assert len(maps) == 1, maps
    assert len(channels) == 1, channels
