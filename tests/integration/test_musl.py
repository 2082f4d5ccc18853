"""The library's musl build in musl containers: a client and a server built from this
repository's own C source (tests/integration/streamcheck.c) with musl-gcc, each in a podman
container whose root filesystem holds musl's loader and the program only (no glibc), on two
testbed hosts. The library comes in by bind mount (`shuntflow container-args --musl`); their
connection switches to the host path mid-stream, and every byte each way is checked."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shuntflow.native import library_path
from shuntflow.testbed import Testbed

from .apps import Apps
from .conftest import MakeTestbed
from .containers import (
    MUSL_LOADER,
    container_args,
    musl_rootfs,
    podman_pid,
    podman_rm,
    podman_run,
    same_ns,
    switches_served,
)

pytestmark = pytest.mark.root

PREFIX = "dy5"
SERVER_NAME = f"{PREFIX}-streamcheck"
SOURCE = Path(__file__).with_name("streamcheck.c")
BYTES = 16 * 1024 * 1024  # each way
HEAD = 32  # streamcheck.c: the bytes each end writes before it waits for the switch
PORT = "7000"


@pytest.fixture(scope="module")
def testbed(make_testbed_module: MakeTestbed) -> Testbed:
    return make_testbed_module(PREFIX, hosts=2, containers=1, routers=True)


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    musl_gcc = shutil.which("musl-gcc")
    assert musl_gcc is not None, "musl-gcc missing: run scripts/setup.sh (Debian's musl-tools)"
    build = tmp_path_factory.mktemp("musl-build")
    binary = build / "streamcheck"
    subprocess.run(
        [musl_gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(SOURCE)],
        check=True,
        timeout=120,
    )
    interp = subprocess.run(
        ["readelf", "-l", str(binary)], capture_output=True, text=True, check=True
    ).stdout
    assert f"[Requesting program interpreter: {MUSL_LOADER}]" in interp
    root = musl_rootfs(tmp_path_factory.mktemp("musl-rootfs"), {"/usr/bin/streamcheck": binary})
    files = {p.name for p in root.rglob("*") if p.is_file()}
    assert files == {"ld-musl-x86_64.so.1", "streamcheck"}, files
    return root


@pytest.fixture
def server(testbed: Testbed, rootfs: Path) -> Iterator[int]:
    c = testbed.hosts[1].containers[0]
    podman_rm(SERVER_NAME)
    started = subprocess.run(
        [
            *podman_run(),
            "-d",
            "--name",
            SERVER_NAME,
            *container_args(c.name, "--musl", "--threshold", "16"),
            "--rootfs",
            str(rootfs),
            "/usr/bin/streamcheck",
            "server",
            c.overlay_ip,
            PORT,
            str(BYTES),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr
    try:
        Apps(testbed).wait_listening(int(PORT))
        yield podman_pid(SERVER_NAME)
    finally:
        podman_rm(SERVER_NAME)


def test_musl_client_and_server_switch_and_keep_every_byte(
    testbed: Testbed, rootfs: Path, server: int
) -> None:
    apps = Apps(testbed)
    client_c = testbed.hosts[0].containers[0]
    assert same_ns(server, "net", f"/run/netns/{testbed.hosts[1].containers[0].netns}")
    assert not same_ns(server, "mnt", "/proc/self/ns/mnt")
    maps = Path(f"/proc/{server}/maps").read_text()
    assert "/opt/shuntflow/lib/libshuntflow-musl.so" in maps and MUSL_LOADER in maps
    assert "libc.so.6" not in maps  # no glibc in the process at all
    assert library_path(musl=True).name == "libshuntflow-musl.so"

    before, switches_before = apps.path(), switches_served(testbed)
    client = subprocess.Popen(
        [
            *podman_run(),
            "--rm",
            "-i",
            *container_args(client_c.name, "--musl", "--threshold", "16"),
            "--rootfs",
            str(rootfs),
            "/usr/bin/streamcheck",
            "client",
            apps.server_ip,
            PORT,
            str(BYTES),
            "hold",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The client says when its socket is the host connection, and waits for us to look: the
    # rest of the stream crosses the host path in a fraction of a second, which a poll missed.
    assert client.stderr is not None
    switched = client.stderr.readline()
    held = apps.host_connections() if switched == "switched\n" else []
    out, err = client.communicate(input="\n", timeout=180)
    err = switched + err
    assert client.returncode == 0 and out == f"ok sent={BYTES} received={BYTES}\n", out + err
    subprocess.run(["podman", "wait", SERVER_NAME], capture_output=True, timeout=60)
    logs = subprocess.run(
        ["podman", "logs", SERVER_NAME], capture_output=True, text=True, timeout=60
    ).stdout
    assert logs == f"listening\nok sent={BYTES} received={BYTES}\n", logs
    path = apps.path() - before
    switches = switches_served(testbed) - switches_before
    print(
        f"musl streamcheck: {switches} switches served (both routers); host path carried "
        f"{path.host_payload} B payload, VXLAN {path.overlay_payload} B in "
        f"{path.overlay_packets} packets, for {2 * BYTES} B both ways"
    )
    assert held, "the connection never showed up on the host path"
    # streamcheck's ends each wrote HEAD bytes, one per call, then waited for their switch (their
    # sockets' namespace cookie): the rest of both streams crossed the host path, and the
    # overlay carried only the heads (and the SYNs' 8 bytes of extra options each), each at
    # most twice (a spurious retransmit when a busy machine delays an ACK past the RTO).
    assert path.host_payload >= 2 * (BYTES - HEAD), path
    assert path.overlay_payload <= 2 * (2 * HEAD) + 16, path
