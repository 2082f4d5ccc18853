"""Running real servers and clients in testbed containers, and proving which path they took.

The path is proved three ways, none of which trusts the library's own word:
- the VXLAN devices' byte counters (a switched connection's bytes do not cross them);
- the routers' switch counters (`switches_served` from their control sockets);
- sockets in the host namespaces: a switched connection is an established TCP connection between
  two underlay addresses on the routers' peer port, visible with `ss` there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shuntflow.native import app_environment
from shuntflow.router.control import query
from shuntflow.testbed import Container, Testbed
from shuntflow.wire import Mode

PEER_PORT = 4790
MODES = ("overlay", "slim", "shuntflow")
TEST_THRESHOLD = 16


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


def start_script_server(
    tb: Testbed, c: Container, script: str, env: dict[str, str]
) -> subprocess.Popen[str]:
    """`python -c script <c's overlay IP>` in container c, once it printed "listening"."""
    proc = tb.popen(
        c,
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
    tb: Testbed, c: Container, script: str, server_ip: str, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """`python -c script <server_ip>` in container c, output captured."""
    return tb.run(
        c,
        [sys.executable, "-c", script, server_ip],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Counters:
    vxlan: int
    switches: int


class Apps:
    """The two ends of every test: server in <prefix>-h2-c1, client in <prefix>-h1-c1."""

    def __init__(self, tb: Testbed) -> None:
        self.tb = tb
        self.client_c = tb.hosts[0].containers[0]
        self.server_c = tb.hosts[1].containers[0]
        self.server_ip = self.server_c.overlay_ip

    def counters(self) -> Counters:
        vxlan = sum(sum(self.tb.vxlan_counters(h.index)) for h in self.tb.hosts)
        sock = self.tb.hosts[0].router_socket
        status = query(sock.with_name(sock.name + ".ctl"), timeout=5.0)
        return Counters(vxlan, int(status["router"]["switches_served"]))

    def wait_listening(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.tb.run(
                self.server_c, ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True
            ).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise AssertionError(f"nothing listens on port {port} in {self.server_c.name}")

    @contextmanager
    def server(
        self, argv: list[str], mode: str | None, port: int, threshold: int = TEST_THRESHOLD
    ) -> Iterator[subprocess.Popen[str]]:
        proc = self.tb.popen(
            self.server_c,
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
        return self.tb.run(
            self.client_c,
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
        return self.tb.popen(
            self.client_c,
            argv,
            env=mode_env(self.tb, self.client_c, mode, threshold),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def host_connections(self) -> list[str]:
        """Established TCP connections between the hosts on the routers' peer port that an
        application holds. The router's own warm, idle connections of its pool do not count, nor
        do those no process holds yet: the peer's pool refills even in overlay mode, and its
        connections wait in this router's accept queue for a moment."""
        host = self.tb.hosts[0]
        router = f"pid={int(host.router_pid_file.read_text())},"
        out = self.tb.run(
            host.netns,
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

        def application_holds(line: str) -> bool:
            return any(owner != router for owner in re.findall(r"pid=\d+,", line))

        return [line for line in out.splitlines() if application_holds(line)]


def assert_path(
    mode: str, before: Counters, after: Counters, payload: int, min_switches: int = 1
) -> None:
    """overlay: every byte crossed VXLAN, nothing switched. slim/shuntflow: the bulk did not."""
    crossed = after.vxlan - before.vxlan
    switches = after.switches - before.switches
    if mode == "overlay":
        assert switches == 0, f"overlay mode switched {switches} connections"
        assert crossed >= payload, f"only {crossed} VXLAN bytes for {payload} payload bytes"
    else:
        assert switches >= min_switches, f"{mode}: {switches} switches, expected >= {min_switches}"
        assert crossed < payload // 4, f"{mode}: {crossed} VXLAN bytes for {payload} payload bytes"
