"""Real containers: podman (Debian's) runs redis-server and redis-benchmark each in its own
container on two testbed hosts -- own root filesystem, mount and PID namespaces, the testbed
container's network namespace -- with the library and the router's socket bind-mounted and the
environment passed, all from `shuntflow container-args`. The path is proved by the host-namespace
sockets and the VXLAN counters, the data by values read back."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shuntflow.testbed import Testbed

from .apps import Apps, redis_server
from .conftest import MakeTestbed
from .containers import (
    container_args,
    glibc_rootfs,
    podman_pid,
    podman_rm,
    podman_run,
    same_ns,
    switches_served,
)

pytestmark = pytest.mark.root

PREFIX = "dy4"
SERVER_NAME = f"{PREFIX}-redis"
THRESHOLD = "16"


@pytest.fixture(scope="module")
def testbed(make_testbed_module: MakeTestbed) -> Testbed:
    return make_testbed_module(PREFIX, hosts=2, containers=1, routers=True)


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rootfs")
    return glibc_rootfs(
        root, ["/usr/bin/redis-server", "/usr/bin/redis-benchmark", "/usr/bin/redis-cli"]
    )


@pytest.fixture
def server(testbed: Testbed, rootfs: Path) -> Iterator[int]:
    """redis-server in a podman container in <prefix>-h2-c1; yields its pid (ours)."""
    c = testbed.hosts[1].containers[0]
    podman_rm(SERVER_NAME)
    argv = [
        *podman_run(),
        "-d",
        "--name",
        SERVER_NAME,
        *container_args(c.name, "--threshold", THRESHOLD),
        "--rootfs",
        str(rootfs),
        *redis_server(c.overlay_ip, "/usr/bin/redis-server"),
    ]
    started = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        Apps(testbed).wait_listening(6379)
        yield podman_pid(SERVER_NAME)
    finally:
        podman_rm(SERVER_NAME)


def client(testbed: Testbed, rootfs: Path, argv: list[str], interactive: bool = False) -> list[str]:
    c = testbed.hosts[0].containers[0]
    return [
        *podman_run(),
        "--rm",
        *(["-i"] if interactive else []),
        *container_args(c.name, "--threshold", THRESHOLD),
        "--rootfs",
        str(rootfs),
        *argv,
    ]


def test_redis_in_podman_containers(testbed: Testbed, rootfs: Path, server: int) -> None:
    apps = Apps(testbed)
    server_c = testbed.hosts[1].containers[0]
    client_c = testbed.hosts[0].containers[0]
    # A container of its own, in the testbed container's network namespace, library loaded.
    assert same_ns(server, "net", f"/run/netns/{server_c.netns}")
    assert not same_ns(server, "mnt", "/proc/self/ns/mnt")
    assert not same_ns(server, "pid", "/proc/self/ns/pid")
    assert not (Path(f"/proc/{server}/root") / "usr/bin/python3").exists()
    maps = Path(f"/proc/{server}/maps").read_text()
    assert "/opt/shuntflow/lib/libshuntflow.so" in maps

    before, switches_before = apps.path(), switches_served(testbed)
    bench = subprocess.Popen(
        client(
            testbed,
            rootfs,
            [
                "/usr/bin/redis-benchmark",
                "-h",
                apps.server_ip,
                "-c",
                "4",
                "-n",
                "20000",
                "-d",
                "1024",
                "-t",
                "set,get",
                "-q",
                "--csv",
            ],
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The benchmark's connections, once switched, are TCP connections between the two hosts'
    # underlay addresses in the host namespace, held by the containerized processes.
    held: list[str] = []
    holders: set[int] = set()
    while bench.poll() is None and not held:
        held = apps.host_connections()
        holders = apps.application_pids(held)
        # Whoever holds them is inside the client container (checked while it still runs).
        for pid in holders:
            with contextlib.suppress(FileNotFoundError):
                assert same_ns(pid, "net", f"/run/netns/{client_c.netns}")
                assert not same_ns(pid, "mnt", "/proc/self/ns/mnt")
        time.sleep(0.05)
    out, err = bench.communicate(timeout=180)
    assert bench.returncode == 0, out + err
    assert '"SET"' in out and '"GET"' in out, out
    path = apps.path() - before
    switches = switches_served(testbed) - switches_before
    payload = 2 * 20000 * 1024  # the values written, and read back
    print(
        f"podman redis-benchmark: {switches} switches served (both routers); host path carried "
        f"{path.host_payload} B payload in {path.host_packets} packets, VXLAN "
        f"{path.overlay_payload} B payload in {path.overlay_packets} packets, for {payload} B of "
        f"values; {len(held)} host-namespace connections held by pids {sorted(holders)}"
    )
    assert held, "no host-namespace connection held by the benchmark"
    assert all(testbed.hosts[0].underlay_ip in line for line in held), held
    # Each byte crossed one path or the other. Which share took which depends on how soon the
    # switches completed (a busy machine delays them); that connections of the containerized
    # benchmark did switch is shown by the host-namespace sockets its processes held (above).
    assert path.overlay_payload + path.host_payload >= payload, path

    # Values written and read back on one redis-cli connection in a third container. Its path is
    # not asserted: a connection this short may end before its switch completes on a busy
    # machine (the benchmark above proved the path).
    values = {f"key:{i}": secrets.token_hex(secrets.randbelow(600) + 1) for i in range(300)}
    script = "".join(f"SET {k} {v}\n" for k, v in values.items())
    script += "".join(f"GET {k}\n" for k in values)
    result = subprocess.run(
        client(testbed, rootfs, ["/usr/bin/redis-cli", "-h", apps.server_ip], interactive=True),
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stdout.split("\n")
    assert lines[:300] == ["OK"] * 300, result.stdout[:300] + result.stderr
    assert lines[300:600] == list(values.values())
