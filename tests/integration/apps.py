"""Running real servers and clients in testbed containers, and proving which path they took:
what the integration tests share (the torture pair, real overlay connections and the routers'
logs too). Helpers shared between test files live here, never in a test file.

The path is proved from the kernel, never from the project's own word (its counters or logs):
- nftables counters in each host namespace's output hook count what the host sent on each path:
  VXLAN-encapsulated packets (UDP 4789; 8472 in the flannel layout) for the overlay, TCP on the
  routers' peer port for the host path (`PathBytes`). A switched connection's bytes after its
  switch point cross only the host path; a connection left on the overlay never touches it.
- sockets in the host namespaces: a switched connection is an established TCP connection between
  two underlay addresses on the routers' peer port, held by the application (`ss`).
- SO_NETNS_COOKIE of the application's own socket, read by the content clients: a switched fd
  is a socket of the host namespace (`SWITCH_WAIT`).

Real-application tests check the path on the same phase whose content they check: a client of
ours waits, on its own socket's namespace cookie, until its connection has switched, then the
test snapshots the counters, and the client writes and reads back the checked data.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shuntflow import torture
from shuntflow.native import app_environment
from shuntflow.router.control import query
from shuntflow.testbed import Container, Host, Testbed
from shuntflow.wire import Mode, Tuple4

PEER_PORT = 4790
MODES = ("overlay", "slim", "shuntflow")
TEST_THRESHOLD = 16


# The head of every content client: `wait_switched(sock, ping)` calls `ping()` (one request and
# its reply) until `sock` is a socket of another network namespace than this process's, i.e. the
# library has put the host connection on its fd number (at once in slim mode; never waited for in
# overlay mode), then says "ready" and waits for the test's "go".
# The start of every Python program the tests run under the library: which namespace a socket
# lives in (its SO_NETNS_COOKIE), and a checked echo.
SCRIPT_PRELUDE = r"""
import hashlib, json, os, socket, sys, threading, time
SO_NETNS_COOKIE = 71
def netns_cookie(s):
    return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
def echo(s, m):
    s.sendall(m)
    got = b""
    while len(got) < len(m):
        got += s.recv(65536)
    assert got == m, (got, m)
"""

SWITCH_WAIT = (
    SCRIPT_PRELUDE
    + r"""
def wait_switched(s, ping):
    if sys.argv[2] != "overlay":
        with socket.socket() as probe:
            own = netns_cookie(probe)
        deadline = time.monotonic() + 60
        while netns_cookie(s) == own:
            if time.monotonic() > deadline:
                sys.exit("the connection did not switch within 60 s")
            ping()
            time.sleep(0.001)
    print("ready", flush=True)
    if sys.stdin.readline() != "go\n":
        sys.exit("no go from the test")
"""
)


def redis_server(ip: str, exe: str = "redis-server") -> list[str]:
    """redis-server on `ip`:6379, no persistence to disk, no protected mode (the tests' clients
    come from other namespaces)."""
    return [
        exe,
        "--bind",
        ip,
        "--port",
        "6379",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]


# A redis client for test scripts: connects to argv[1]:6379; `call(*args)` sends one command and
# returns a bulk reply's bytes, or any other reply's line (with its CRLF); `payload` counts the
# bytes written and read, both ways.
RESP_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 6379))
f = s.makefile("rwb")
payload = 0
def call(*args):
    global payload
    req = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    f.write(req)
    f.flush()
    line = f.readline()
    payload += len(req) + len(line)
    if not line.startswith(b"$"):
        return line
    data = f.read(int(line[1:]) + 2)
    payload += len(data)
    return data[:-2]
"""


def mode_env(
    tb: Testbed,
    c: Container,
    mode: str | None,
    threshold: int = TEST_THRESHOLD,
    log: Path | None = None,
) -> dict[str, str]:
    """The library's environment for `mode` in container `c`; `log`: the library's log file
    (else $SHUNTFLOW_LOG: to debug a failing test, SHUNTFLOW_LOG=/tmp/x.log)."""
    if mode is None:
        return {}
    host = tb.host(c.host_index)
    return app_environment(
        Mode[mode.upper()],
        router_socket=host.router_socket,
        threshold=threshold,
        log=str(log) if log is not None else os.environ.get("SHUNTFLOW_LOG"),
    )


def start_script_server(c: Container, script: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """`python -c script <c's overlay IP>` in container c, once it printed "listening"."""
    proc = c.popen(
        [sys.executable, "-c", script, c.overlay_ip],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline() != "listening\n":
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"script server did not start: {err[-2000:]}")
    return proc


def run_script_client(
    c: Container, script: str, server_ip: str, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """`python -c script <server_ip>` in container c, output captured."""
    return c.run(
        [sys.executable, "-c", script, server_ip],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Apps:
    """The two ends of every test: server in <prefix>-h2-c1, client in <prefix>-h1-c1."""

    def __init__(self, tb: Testbed) -> None:
        self.tb = tb
        self.client_c = tb.hosts[0].containers[0]
        self.server_c = tb.hosts[1].containers[0]
        self.server_ip = self.server_c.overlay_ip
        install_path_counters(tb)

    def path(self) -> PathBytes:
        return read_path(self.tb)

    def wait_listening(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.server_c.run(
                ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True
            ).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise AssertionError(f"nothing listens on port {port} in {self.server_c.name}")

    @contextmanager
    def server(
        self, argv: list[str], mode: str | None, port: int, threshold: int = TEST_THRESHOLD
    ) -> Iterator[subprocess.Popen[str]]:
        proc = self.server_c.popen(
            argv,
            env=mode_env(self.tb, self.server_c, mode, threshold),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            self.wait_listening(port)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def client(
        self,
        argv: list[str],
        mode: str | None,
        threshold: int = TEST_THRESHOLD,
        timeout: float = 120.0,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return self.client_c.run(
            argv,
            env=mode_env(self.tb, self.client_c, mode, threshold),
            timeout=timeout,
            input=stdin,
            capture_output=True,
            text=True,
        )

    def client_popen(
        self, argv: list[str], mode: str | None, threshold: int = TEST_THRESHOLD
    ) -> subprocess.Popen[str]:
        return self.client_c.popen(
            argv,
            env=mode_env(self.tb, self.client_c, mode, threshold),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def python_client(
        self, script: str, mode: str | None, *args: str, threshold: int = TEST_THRESHOLD
    ) -> subprocess.Popen[str]:
        """`python -c script server_ip *args` in the client container, every stream a pipe."""
        return self.client_c.popen(
            [sys.executable, "-c", script, self.server_ip, *args],
            env=mode_env(self.tb, self.client_c, mode, threshold),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def checked_phase(
        self, script: str, mode: str, *args: str, timeout: float = 120.0
    ) -> tuple[dict[str, Any], PathBytes]:
        """Runs a content client (`SWITCH_WAIT` + `script`, argv: server IP, mode, *args): once
        it reports its connection switched (at once on the overlay), the counters are read, the
        client writes and reads back its data, and its JSON result is returned with what the
        paths carried meanwhile. The result holds `payload`: the bytes the client wrote and read
        in the checked part."""
        proc = self.python_client(SWITCH_WAIT + script, mode, mode, *args)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            ready = proc.stdout.readline()
            if ready != "ready\n":
                proc.kill()
                _, err = proc.communicate()
                raise AssertionError(f"content client: {ready!r} {err[-2000:]}")
            before = self.path()
            out, err = proc.communicate("go\n", timeout=timeout)
            after = self.path()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err[-2000:]
        result: dict[str, Any] = json.loads(out)
        return result, after - before

    def host_connections(self) -> list[str]:
        """Established TCP connections between the hosts on the routers' peer port that an
        application holds. The router's own warm, idle connections of its pool do not count, nor
        do those no process holds yet: the peer's pool refills even in overlay mode, and its
        connections wait in this router's accept queue for a moment."""
        host = self.tb.hosts[0]
        out = host.run(
            [
                "ss",
                "-tnpH",
                "state",
                "established",
                f"( dport = :{PEER_PORT} or sport = :{PEER_PORT} )",
            ],
            capture_output=True,
            text=True,
        ).stdout

        return [line for line in out.splitlines() if self.application_pids([line])]

    def application_pids(self, lines: list[str]) -> set[int]:
        """The processes other than the first host's router that hold the sockets of `ss -p`
        lines. A handed-over socket is held by the router and the library at once for the moment
        between the fd's arrival and the router's close of its copy."""
        router = int(self.tb.hosts[0].router_pid_file.read_text())
        owners = {int(pid) for line in lines for pid in re.findall(r"pid=(\d+),", line)}
        return owners - {router}


# Bytes around a TCP segment's payload in a packet as the output hook counts it (the IP packet).
# TCP timestamps are on, so a segment's TCP header is 32 bytes; SACK blocks (up to 40 bytes of
# options) appear only after a loss, which the testbed's veths do not have.
TCP_IP_HEADER = 20 + 32
# The overlay's packets are counted encapsulated: outer IP, UDP and VXLAN headers and the inner
# Ethernet frame around the inner IP packet.
VXLAN_HEADER = 20 + 8 + 8 + 14
# After its switch point a connection's overlay carries at most its FIN, the peer's FIN and their
# ACKs, possibly each retransmitted once: 8 payload-free packets.
RETIRED_OVERLAY_PACKETS = 8


def path_table(vxlan_port: int) -> str:
    # Handshakes are left out of the host path: the routers open warm peer connections whenever
    # their pool refills, and a SYN's options (8 bytes more than the timestamps the payload
    # estimate allows for) would read as payload on a path that carried none (one CI run: 64 B
    # from four warm connections during a phase of short connections).
    return f"""table inet sf_path {{
    counter overlay {{ }}
    counter host {{ }}
    chain output {{
        type filter hook output priority 0; policy accept;
        udp dport {vxlan_port} counter name "overlay"
        tcp sport {PEER_PORT} tcp flags & syn == 0 counter name "host"
        tcp dport {PEER_PORT} tcp flags & syn == 0 counter name "host"
    }}
}}
"""


@dataclass(frozen=True)
class PathBytes:
    """What the kernels of all hosts sent on each path: bytes (IP packets) and packets."""

    overlay_bytes: int = 0
    overlay_packets: int = 0
    host_bytes: int = 0
    host_packets: int = 0

    def __sub__(self, other: PathBytes) -> PathBytes:
        return PathBytes(
            self.overlay_bytes - other.overlay_bytes,
            self.overlay_packets - other.overlay_packets,
            self.host_bytes - other.host_bytes,
            self.host_packets - other.host_packets,
        )

    @property
    def overlay_payload(self) -> int:
        """TCP payload the overlay carried (headers taken off each packet)."""
        return self.overlay_bytes - (VXLAN_HEADER + TCP_IP_HEADER) * self.overlay_packets

    @property
    def host_payload(self) -> int:
        """TCP payload the host path carried."""
        return self.host_bytes - TCP_IP_HEADER * self.host_packets


def install_path_counters(tb: Testbed) -> None:
    """Adds (or resets) the `sf_path` nftables counters in every host namespace."""
    for h in tb.hosts:
        h.run(["nft", "delete", "table", "inet", "sf_path"], capture_output=True)
        done = h.run(
            ["nft", "-f", "-"],
            input=path_table(tb.vxlan_port),
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr


def router_status(tb: Testbed, host: int, timeout: float = 5.0) -> dict[str, Any]:
    """Host `host`'s router status (`shuntflow status`), from its control socket."""
    sock = tb.host(host).router_socket
    return query(sock.with_name(sock.name + ".ctl"), timeout=timeout)


def read_path(tb: Testbed) -> PathBytes:
    total = PathBytes()
    for h in tb.hosts:
        out = h.run(
            ["nft", "-j", "list", "counters", "table", "inet", "sf_path"],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, f"no path counters in {h.netns}: {out.stderr}"
        counters = {
            c["counter"]["name"]: c["counter"]
            for c in json.loads(out.stdout)["nftables"]
            if "counter" in c
        }
        total = PathBytes(
            total.overlay_bytes + counters["overlay"]["bytes"],
            total.overlay_packets + counters["overlay"]["packets"],
            total.host_bytes + counters["host"]["bytes"],
            total.host_packets + counters["host"]["packets"],
        )
    return total


def assert_path(
    mode: str, before: PathBytes, after: PathBytes, payload: int, conns: int, setup: bool = False
) -> None:
    """The path of a phase that moved `payload` bytes (both directions) on `conns` connections.

    overlay: every byte crossed VXLAN, and the host path carried none.
    slim / shuntflow, for a phase that began after every connection's switch point: every byte
    crossed the host path, and the overlay carried only the retired sockets' FINs and ACKs
    (`setup`: and the connections' overlay handshakes, 3 packets each, for slim mode's
    switch at setup)."""
    d = after - before
    if mode == "overlay":
        assert d.overlay_payload >= payload, f"overlay mode: VXLAN carried {d}, payload {payload}"
        assert d.host_payload <= 0, f"overlay mode: the host path carried {d}"
    else:
        assert d.host_payload >= payload, f"{mode}: host path carried {d}, payload {payload}"
        most = conns * (RETIRED_OVERLAY_PACKETS + (3 if setup else 0))
        # A SYN and its SYN-ACK carry 8 bytes of options more than the timestamps (MSS, window
        # scale, SACK permitted), which the payload estimate takes for payload.
        options = conns * 16 if setup else 0
        assert d.overlay_packets <= most and d.overlay_payload <= options, (
            f"{mode}: after the switch VXLAN carried {d} for {conns} connections (at most "
            f"{most} payload-free packets)"
        )


# -- the torture pair (src/shuntflow/torture.py) ------------------------------------------


def run_torture(
    tb: Testbed,
    mode: str,
    style: str,
    threshold: int,
    connections: int,
    port: int,
    max_bytes: int = 256 * 1024,
    concurrency: int = 16,
    timeout: float = 120,
    server_program: Sequence[str] = ("-m", "shuntflow.torture"),
    server_log: Path | None = None,
    calls: Sequence[str] = torture.CALLS,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The torture pair, client in <prefix>-h1-c1 and server in <prefix>-h2-c1, both in `mode`;
    the server as `python <server_program> server ...` (a script that prepares the process, then
    runs shuntflow.torture), its library logging to `server_log`; `calls`: the data calls the
    pair picks from. Their two summaries."""
    client_c, server_c = tb.hosts[0].containers[0], tb.hosts[1].containers[0]
    cookie = {h.index: host_netns_cookie(h) for h in tb.hosts}
    common = [
        "--port",
        str(port),
        "--connections",
        str(connections),
        "--style",
        style,
        "--timeout",
        str(timeout),
        "--calls",
        ",".join(calls),
    ]
    server = server_c.popen(
        [
            sys.executable,
            *server_program,
            "server",
            *common,
            "--host-cookie",
            str(cookie[server_c.host_index]),
        ],
        env=mode_env(tb, server_c, mode, threshold, log=server_log),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        assert first, server.communicate(timeout=10)[1][-2000:]
        assert json.loads(first)["listening"] == port
        client = client_c.run(
            [
                sys.executable,
                "-m",
                "shuntflow.torture",
                "client",
                *common,
                "--host",
                server_c.overlay_ip,
                "--max-bytes",
                str(max_bytes),
                "--concurrency",
                str(concurrency),
                "--seed",
                str(port),
                "--host-cookie",
                str(cookie[client_c.host_index]),
            ],
            env=mode_env(tb, client_c, mode, threshold),
            timeout=timeout + 30,
            capture_output=True,
            text=True,
        )
        out, _ = server.communicate(timeout=timeout + 30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert client.stdout.strip(), client.stderr
    return json.loads(client.stdout.strip().splitlines()[-1]), json.loads(
        out.strip().splitlines()[-1]
    )


def host_netns_cookie(host: Host) -> int:
    """SO_NETNS_COOKIE of a socket made in `host`'s namespace: what a switched connection's
    socket reports. In-process (a thread enters the namespace): the tests that time a fault from
    before run_torture must not wait for a probe process."""
    return int(host.in_netns(torture.own_netns_cookie))


def assert_intact(summary: dict[str, Any], connections: int) -> None:
    assert summary["missing"] == 0, summary
    assert summary["bad"] == 0, (
        f"seed {summary.get('seed')}",
        [
            (f["conn_id"], f["seed"], f["endpoints"], f["error"], f["cookie_error"], f["first_bad"])
            for f in summary["failures"]
        ],
    )
    assert summary["ok"] == connections
    assert summary["cookie_errors"] == 0


# -- connections and router logs ---------------------------------------------------------


def connect(
    client: Container, server: Container, port: int
) -> tuple[socket.socket, socket.socket, Tuple4]:
    """A real overlay connection client -> server:port, both ends inside their namespaces."""
    listener = server.in_netns(lambda: socket.create_server((server.overlay_ip, port), backlog=4))
    with listener:
        conn = client.in_netns(
            lambda: socket.create_connection((server.overlay_ip, port), timeout=5)
        )
        accepted, _ = listener.accept()
    t = Tuple4.parse("{}:{}".format(*conn.getsockname()), "{}:{}".format(*conn.getpeername()))
    return conn, accepted, t


def log_of(h: Host) -> list[str]:
    return h.router_log.read_text().splitlines()


def new_lines(h: Host, before: int) -> list[str]:
    return log_of(h)[before:]
