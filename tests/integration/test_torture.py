"""The integrity torture test across the testbed: every byte of many concurrent full-duplex
connections checked end to end while they switch (src/shuntflow/torture.py does the checking).

Every data call of the pair picks one of the library's entry points at random; each run must
have moved bytes through every one of them on connections that ended switched, with calls made
on the host socket itself. The kernels' counters of both paths (`PathBytes`) must account for
the bytes: those the pair moved on the host socket crossed the host path, and every byte crossed
one path or the other.

The short variants run in CI; `pytest --long` adds the long run (>= 10,000 switched connections).
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shuntflow import torture
from shuntflow.native import MAX_THRESHOLD
from shuntflow.router import control
from shuntflow.testbed import Testbed

from .apps import (
    PathBytes,
    assert_intact,
    assert_path,
    install_path_counters,
    mode_env,
    read_path,
    router_status,
    run_torture,
    start_script_server,
)

pytestmark = pytest.mark.root

TESTBED_PREFIX = "it"
TESTBED_ROUTERS = True


def assert_every_call(summary: dict[str, Any]) -> None:
    """Every entry point moved bytes on connections that ended switched, and with calls made
    once the fd was the host connection (else the run proves nothing about it across a switch)."""
    for name in torture.CALLS:
        io = summary["io"][name]
        assert io["switched_bytes"] > 0 and io["host_bytes"] > 0, (summary["role"], name, io)
    # Nothing signals these processes or resets their connections: every MSG_WAITALL read that
    # did not meet the stream's end came back whole, across switch points too.
    assert summary["waitall_short"] == 0, (summary["role"], summary["waitall_short"])


def tcp_retransmits(tb: Testbed) -> int:
    """Segments the containers' TCP stacks (the overlay sockets) retransmitted so far."""
    total = 0
    for h in tb.hosts:
        for c in h.containers:
            snmp = c.run(["cat", "/proc/net/snmp"], capture_output=True, text=True).stdout
            names, values = [line.split() for line in snmp.splitlines() if line.startswith("Tcp:")]
            total += int(values[names.index("RetransSegs")])
    return total


@dataclass
class Paths:
    """What the kernels counted on both paths during one torture run."""

    sent: PathBytes  # by all hosts, on each path
    overlay_retransmits: int


def run_counted(
    tb: Testbed, *args: Any, **kwargs: Any
) -> tuple[dict[str, Any], dict[str, Any], Paths]:
    """run_torture, and what the paths carried meanwhile."""
    install_path_counters(tb)
    before, retrans = read_path(tb), tcp_retransmits(tb)
    client, server = run_torture(tb, *args, **kwargs)
    paths = Paths(read_path(tb) - before, tcp_retransmits(tb) - retrans)
    return client, server, paths


# The overlay's TCP MSS (MTU 1450 less the IP and TCP headers), what one retransmitted segment
# adds to the overlay's payload at most.
OVERLAY_MSS = 1450 - 40
# The payload estimate of a SYN or SYN-ACK counts its 8 option bytes beyond the timestamps.
SYN_SLACK = 2 * 8


def assert_paths_carried(client: dict[str, Any], server: dict[str, Any], paths: Paths) -> None:
    """The kernels' path counters against the bytes the pair moved (client["bytes"]: both
    directions, every byte checked)."""
    d, conns = paths.sent, client["connections"]
    payload = client["bytes"]
    # Bytes an end wrote with a call made once its fd was the host socket, or read so, were on
    # no other path; per direction the larger of writer's and reader's count is proven.
    on_host = max(client["host_sent"], server["host_received"]) + max(
        server["host_sent"], client["host_received"]
    )
    assert on_host > 0, (client["host_sent"], server["host_sent"])
    assert d.host_payload >= on_host, f"host path carried {d}, {on_host} bytes were moved on it"
    # Each byte crosses exactly one path (the overlay up to the writer's S, the host path after
    # it), so payload <= overlay + host; both counters only add headers' slack and retransmits.
    assert d.overlay_payload + d.host_payload >= payload, f"{d}: {payload} bytes moved"
    # The overlay carried none of the bytes proven on the host path: at most the rest, plus each
    # connection's header and SYN options, plus what its retransmits repeated.
    most = (
        payload
        - on_host
        + conns * (torture.HEADER.size + SYN_SLACK)
        + paths.overlay_retransmits * OVERLAY_MSS
    )
    assert d.overlay_payload <= most, f"VXLAN carried {d}, at most {most} expected"


@pytest.mark.parametrize(
    ("style", "threshold"),
    [
        ("blocking", 1),
        ("epoll", 4),
        ("epoll-et", 1),
        ("poll", 16),
    ],
)
def test_torture_shuntflow(testbed: Testbed, style: str, threshold: int) -> None:
    port = 7700 + {"blocking": 1, "epoll": 2, "epoll-et": 3, "poll": 4}[style]
    reported_before = switch_times_reported(testbed)
    calls_before = switch_calls_reported(testbed)
    client, server, paths = run_counted(testbed, "shuntflow", style, threshold, 120, port)
    assert_intact(client, 120)
    assert_intact(server, 120)
    assert_every_call(client)
    assert_every_call(server)
    assert_paths_carried(client, server, paths)
    # Every switched connection had at least one end whose threshold started it, and that end
    # reported its switch time (threshold -> first byte on the host path) to its router.
    deadline = time.monotonic() + 30  # a wait for the reports, not a bound on their speed
    while switch_times_reported(testbed) - reported_before < client["switched"]:
        assert time.monotonic() < deadline, (reported_before, switch_times_reported(testbed))
        time.sleep(0.05)
    assert client["switched"] > 0
    # Every end that switched timed the application's data calls during its switch and told its
    # router once the swap was done (SWITCH_CALLS): one report per completed switch end. That is
    # at least every end the application saw on the host path, and at most every end a router
    # handed a host connection (a swap can land just as the application closes the connection,
    # after torture looked at it: a completed switch torture counts as not switched).
    ends = client["switched"] + server["switched"]
    deadline = time.monotonic() + 30
    while switch_calls_reported(testbed).count - calls_before.count < ends:
        assert time.monotonic() < deadline, (ends, calls_before, switch_calls_reported(testbed))
        time.sleep(0.05)
    time.sleep(0.2)  # reports of ends torture did not count come the same way
    after = switch_calls_reported(testbed)
    assert ends <= after.count - calls_before.count <= after.served - calls_before.served
    assert after.timed - calls_before.timed > 0
    samples = switch_call_samples(testbed, calls_before.index)
    assert len(samples) == after.count - calls_before.count
    # Plausible, not fast: the longest call of a switch, in µs, between 0 and 10 s.
    assert all(0 <= us < 10_000_000 for us in samples), samples
    assert max(samples) > 0


@dataclass
class CallReports:
    count: int  # completed switch ends reported with SWITCH_CALLS
    timed: int  # calls timed in them
    served: int  # host connections the routers handed to libraries
    index: dict[int, int]  # per host: its router's running index of those reports


def switch_calls_reported(tb: Testbed) -> CallReports:
    r = CallReports(0, 0, 0, {})
    for h in tb.hosts:
        info = control.query(Path(f"{h.router_socket}.ctl"))["router"]
        r.count += info["switch_call_max_us"]["count"]
        r.timed += info["switch_calls_timed"]
        r.served += info["switches_served"]
        r.index[h.index] = info["switch_call_max_us"]["count"]
    return r


def switch_call_samples(tb: Testbed, since: dict[int, int]) -> list[int]:
    samples: list[int] = []
    for h in tb.hosts:
        got = control.query(Path(f"{h.router_socket}.ctl"), "switch_calls", since=since[h.index])
        samples += got["samples"]
    return samples


def switch_times_reported(tb: Testbed) -> int:
    total = 0
    for h in tb.hosts:
        info = control.query(Path(f"{h.router_socket}.ctl"))["router"]["switch_time_us"]
        total += info["count"]
        if info["count"]:
            assert 0 < info["p50"] <= info["p99"] <= info["max"], info
    return total


# One end of a one-way stream: it accepts, waits PAUSE seconds, reads FIRST bytes, then reads
# nothing until the file GO exists, then the rest; it prints the bytes' count and SHA-256. With
# THREADED the reading is a thread's, as in a server that hands each connection to one.
SINK_SERVER = r"""
import hashlib, os, socket, sys, threading, time
ls = socket.create_server((sys.argv[1], 7720))
print("listening", flush=True)
conn, _ = ls.accept()
def sink():
    time.sleep(PAUSE)
    h, n = hashlib.sha256(), 0
    while n < FIRST and (data := conn.recv(min(1 << 16, FIRST - n))):
        h.update(data)
        n += len(data)
    while not os.path.exists(GO):
        time.sleep(0.01)
    while data := conn.recv(1 << 16):
        h.update(data)
        n += len(data)
    print(n, h.hexdigest(), flush=True)
if THREADED:
    reader = threading.Thread(target=sink)
    reader.start()
    reader.join()
else:
    sink()
"""

# Three small writes, then the whole stream in one blocking call (SEND): at threshold 4 the switch
# is decided as that call begins.
BULK_CLIENT = r"""
import ctypes, hashlib, os, random, socket, sys, tempfile
from shuntflow.torture import _mmsg_vector, _sendmmsg
size = int(sys.argv[2])
data = random.Random(7).randbytes(size)
s = socket.create_connection((sys.argv[1], 7720))
SNDBUF
for i in range(3):
    s.send(data[i : i + 1])
SEND
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(size, hashlib.sha256(data).hexdigest(), flush=True)
"""

# Each is one call for the whole rest of the stream (a view, a file, or buffers: no copy first),
# which a plain blocking call returns only once all of it is taken.
BULK_SENDS = {
    "sendall": "s.sendall(memoryview(data)[3:])",
    # From the file's offset given with the call (the kernel moves the caller's offset on).
    "sendfile": """
f = tempfile.TemporaryFile()
f.write(data)
f.flush()
n = os.sendfile(s.fileno(), f.fileno(), 3, size - 3)
assert n == size - 3, n
""",
    # From the file's position, which the call must move on by exactly what it sent.
    "sendfile-pos": """
f = tempfile.TemporaryFile()
f.write(data)
f.seek(3)
n = os.sendfile(s.fileno(), f.fileno(), None, size)
assert n == size - 3 and f.tell() == size, (n, f.tell())
""",
    # Eight messages of two buffers each: all of them sent, each whole.
    "sendmmsg": """
base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
cuts = [3 + (size - 3) * i // 16 for i in range(17)]
msgs = [[(base + cuts[i], cuts[i + 1] - cuts[i]) for i in (j, j + 1)] for j in range(0, 16, 2)]
vec, keep = _mmsg_vector(msgs)
n = _sendmmsg(s.fileno(), vec, len(msgs), 0)
lens = [int(vec[i].msg_len) for i in range(len(msgs))]
assert n == 8 and lens == [cuts[j + 2] - cuts[j] for j in range(0, 16, 2)], (n, lens)
""",
}


def connection_paths(tb: Testbed, host: int, pid: int) -> list[str]:
    """The path of each connection process `pid` has, as its router's status shows it."""
    answer = router_status(tb, host, timeout=10.0)
    return [
        row["path"] for p in answer["processes"] if p["cred_pid"] == pid for row in p["connections"]
    ]


@dataclass
class BulkRun:
    overlay: int  # payload bytes VXLAN carried
    host: int  # payload bytes the host path carried
    router_lines: list[str]  # the client's router's log lines about the client


def bulk_write(
    tb: Testbed,
    call: str,
    size: int,
    tmp: Path,
    threaded: bool,
    pause: float,
    first: int,
    sndbuf: int = 0,
) -> BulkRun:
    """One SEND call of `size` bytes from a client at threshold 4 to SINK_SERVER, whose reader
    waits for the client's connection to be on the host path (router status) after reading
    `first` bytes: until then the write stays blocked on a full overlay, so only a commit that
    lands inside it moves it. `sndbuf`, if set, is the client socket's SO_SNDBUF."""
    server_c, client_c = tb.hosts[1].containers[0], tb.hosts[0].containers[0]
    go = tmp / "go"
    install_path_counters(tb)
    before = read_path(tb)
    script = (
        SINK_SERVER.replace("GO", repr(str(go)))
        .replace("PAUSE", str(pause))
        .replace("FIRST", str(first))
        .replace("THREADED", str(threaded))
    )
    # The reading end never asks itself (its threshold is out of reach): it is claimed for the
    # writer's request, so the switch starts with the write, never before it.
    server = start_script_server(
        server_c, script, mode_env(tb, server_c, "shuntflow", threshold=MAX_THRESHOLD)
    )
    client = client_c.popen(
        [
            sys.executable,
            "-c",
            BULK_CLIENT.replace("sys.argv[2]", str(size))
            .replace(
                "SNDBUF",
                f"s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, {sndbuf})" if sndbuf else "",
            )
            .replace("SEND", BULK_SENDS[call]),
            server_c.overlay_ip,
        ],
        env=mode_env(tb, client_c, "shuntflow", threshold=4),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tb.host(client_c.host_index).router_log

    def client_lines() -> list[str]:
        return [x for x in log.read_text().splitlines() if f" pid={client.pid} " in x]

    try:
        deadline = time.monotonic() + 60  # a hang bound, not a speed
        while connection_paths(tb, client_c.host_index, client.pid) != ["host"]:
            assert client.poll() is None, client.communicate()
            assert time.monotonic() < deadline, (
                "the writer's connection did not reach the host path while its write was "
                f"blocked; its router said: {client_lines()}"
            )
            time.sleep(0.05)
        go.touch()
        out, err = client.communicate(timeout=120)
        got, _ = server.communicate(timeout=60)
    finally:
        for proc in (client, server):
            proc.kill()
            proc.wait()
    assert client.returncode == 0, err[-2000:]
    assert got.split() == out.split(), (got, out)
    d = read_path(tb) - before
    assert d.overlay_payload + d.host_payload >= size, d
    return BulkRun(d.overlay_payload, d.host_payload, client_lines())


@pytest.mark.parametrize("call", list(BULK_SENDS))
def test_commit_lands_inside_a_blocking_write(testbed: Testbed, call: str, tmp_path: Path) -> None:
    """A blocking write in flight when the switch is decided does not hold the commit back
    until it returns: the commit lands inside it, and the rest of that one call crosses the host
    path. The reader reads nothing until the writer's connection is on the host path: a commit
    that waited for the call would never come. The same for sendfile (from an offset, or the
    file's position) and sendmmsg."""
    size = 128 << 20
    run = bulk_write(testbed, call, size, tmp_path, threaded=True, pause=0, first=0)
    # The overlay took what its sockets' buffers hold (a few MiB) before the commit; the rest of
    # the call went on the host path.
    assert run.overlay < size // 4, f"VXLAN carried {run.overlay} of {size} bytes"
    assert run.host > size // 2, run
    print(f"\n{call}: VXLAN carried {run.overlay} of {size} bytes, host {run.host}")


def test_failed_switch_is_retried_inside_a_blocking_write(testbed: Testbed, tmp_path: Path) -> None:
    """A single-threaded reader that sleeps after its accept has no agent to answer the claim
    (it starts at the process's 8th data call), so the first attempt times out at the peer's
    router. The writer's one call goes on, and the attempt is retried inside it: its pieces after
    waits for room count as calls. The reader reads 32 MiB, then waits for the host path. The
    retry comes at twice the calls, four pieces after waits: the writer's send buffer is set to
    256 KiB so that those 32 MiB are dozens of pieces, not the handful an autotuned buffer of
    several MiB may take them in (a piece is what the buffer has room for)."""
    size, first = 128 << 20, 32 << 20
    run = bulk_write(
        testbed, "sendall", size, tmp_path, threaded=False, pause=2.0, first=first, sndbuf=256 << 10
    )
    failed = [x for x in run.router_lines if "event=switch_failed" in x]
    assert failed and "status=PEER_REFUSED" in failed[0], run.router_lines
    assert any("event=switch_done" in x for x in run.router_lines), run.router_lines
    assert run.overlay < size // 2, f"VXLAN carried {run.overlay} of {size} bytes"
    assert run.host > size // 2, run
    print(f"\nretried: VXLAN carried {run.overlay} of {size} bytes, host {run.host}")


def test_torture_slim(testbed: Testbed) -> None:
    client, server, paths = run_counted(testbed, "slim", "epoll", 1, 60, 7711)
    assert_intact(client, 60)
    assert_intact(server, 60)
    assert client["switched"] == 60 and server["switched"] == 60
    # Switched at connect: every byte on the host path, the overlay only set up and torn down.
    assert_path("slim", PathBytes(), paths.sent, client["bytes"], 60, setup=True)


def test_torture_overlay_mode_never_switches(testbed: Testbed) -> None:
    client, server, paths = run_counted(testbed, "overlay", "blocking", 1, 40, 7712)
    assert_intact(client, 40)
    assert_intact(server, 40)
    assert client["switched"] == 0 and server["switched"] == 0
    assert client["host_sent"] == server["host_sent"] == 0
    assert_path("overlay", PathBytes(), paths.sent, client["bytes"], 40)


@pytest.mark.long
@pytest.mark.timeout(1800)  # the pair's own hang bound is 1500 s
@pytest.mark.parametrize(
    ("style", "n", "min_switched"), [("epoll", 24000, 10_000), ("blocking", 6000, 0)]
)
def test_torture_long(testbed: Testbed, style: str, n: int, min_switched: int) -> None:
    client, server, paths = run_counted(
        testbed,
        "shuntflow",
        style,
        1,
        n,
        7720 + len(style),
        max_bytes=64 * 1024,
        concurrency=48,
        timeout=1500,
    )
    calls = {name: io["calls"] for name, io in client["io"].items()}
    print(
        f"\nlong torture {style}: {client['connections']} connections, "
        f"{client['switched']} switched, {client['bytes']} bytes checked, "
        f"{client['seconds']} s, bad {client['bad'] + server['bad']}, {paths}, "
        f"client calls {calls}"
    )
    assert_intact(client, n)
    assert_intact(server, n)
    assert_every_call(client)
    assert_every_call(server)
    assert_paths_carried(client, server, paths)
    assert client["switched"] >= min_switched and server["switched"] >= min_switched
