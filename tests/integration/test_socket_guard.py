"""The router's BPF socket guard on this kernel (loading its programs needs root), also under
the privileges the deployment files give the router."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shuntflow.router.guard import SocketGuard, cgroup2_root

pytestmark = pytest.mark.root


def test_guard_refuses_marked_sockets_and_leaves_nothing() -> None:
    """Two guards stack (two routers on one kernel); closing both detaches everything."""
    first, second = SocketGuard(0x5F5F01), SocketGuard(0x5F5F01)
    first.start()
    second.start()
    try:
        first.close()  # the other router's programs still hold
        with socket.socket() as s:
            second.protect(s)
            with pytest.raises(PermissionError):
                s.bind(("127.0.0.1", 0))
            with pytest.raises(PermissionError):
                s.connect(("127.0.0.1", 9))
        with socket.socket() as plain:  # an unmarked socket is none of its business
            plain.bind(("127.0.0.1", 0))
        assert second.counters()["refused_bind"] >= 2  # its self-test's and ours
    finally:
        second.close()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x5F5F01)
        s.bind(("127.0.0.1", 0))  # no program left attached


# ---- the guard under a deployment's own privileges ------------------------------------------

ROOT = Path(__file__).resolve().parents[2]

# In the sandbox: set the guard up, hand the test a marked socket and a plain one (as the router
# hands host sockets to containers), hold the programs until stdin closes.
SANDBOXED = """
import socket, sys
from shuntflow.router.guard import SocketGuard
guard = SocketGuard(0x5F5F03)
guard.start()
print(guard.cgroup, flush=True)
marked, plain = socket.socket(), socket.socket()
guard.protect(marked)
socket.send_fds(socket.socket(fileno=int(sys.argv[1])), [b"s"], [marked.fileno(), plain.fileno()])
sys.stdin.read()
guard.close()
"""


def daemonset_caps() -> list[str]:
    for doc in yaml.safe_load_all((ROOT / "deploy/kubernetes/daemonset.yaml").read_text()):
        if doc and doc["kind"] == "DaemonSet":
            (router,) = doc["spec"]["template"]["spec"]["containers"]
            return [c.lower() for c in router["securityContext"]["capabilities"]["add"]]
    raise AssertionError("no DaemonSet")


def systemd_caps() -> list[str]:
    unit = (ROOT / "deploy/systemd/shuntflow-router.service").read_text()
    (line,) = re.findall(r"^CapabilityBoundingSet=(.*)$", unit, re.M)
    return [c.lower().removeprefix("cap_") for c in line.split()]


@pytest.mark.parametrize("deployment", ["daemonset", "systemd"])
def test_guard_holds_with_the_deployments_capabilities(deployment: str, tmp_path: Path) -> None:
    """The router as a pod runs it: in a cgroup of its own, seen through its own cgroup
    namespace (whose root is that cgroup), with only the capabilities the deployment file
    grants. The guard must come up there (the self-test included) and still refuse connect
    and bind to the marked sockets it hands to processes in other cgroups (this test's), whose
    programs the kernel picks by the socket's cgroup, the router's, not the caller's."""
    caps = daemonset_caps() if deployment == "daemonset" else systemd_caps()
    hierarchy = cgroup2_root()
    cgroup = hierarchy / f"shuntflow-test-guard-{os.getpid()}"
    cgroup.mkdir()
    ours, theirs = socket.socketpair()
    code = tmp_path / "sandboxed.py"
    code.write_text(SANDBOXED)
    inner = (
        f"umount {hierarchy} 2>/dev/null; mount -t cgroup2 cgroup2 {hierarchy} && "
        f"exec {sys.executable} {code} {theirs.fileno()}"
    )
    bounding = ",".join(["-all"] + [f"+{c}" for c in caps])
    script = (
        f"echo $$ > {cgroup}/cgroup.procs && exec setpriv --bounding-set {bounding} "
        f'unshare --cgroup --mount --propagation private sh -c "{inner}"'
    )
    child = subprocess.Popen(
        ["sh", "-c", script],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    theirs.close()
    try:
        assert child.stdout is not None and child.stderr is not None
        seen = child.stdout.readline().strip()
        assert seen == str(hierarchy), child.stderr.read()[-2000:]  # its namespace's root
        ours.settimeout(30)
        _, fds, _, _ = socket.recv_fds(ours, 8, 2)
        marked, plain = (socket.socket(fileno=fd) for fd in fds)
        with marked, plain, socket.create_server(("127.0.0.1", 0)) as server:
            with pytest.raises(PermissionError):
                marked.connect(server.getsockname())
            with pytest.raises(PermissionError):
                marked.bind(("127.0.0.1", 0))
            plain.connect(server.getsockname())  # an unmarked socket is none of its business
        assert (cgroup / "cgroup.procs").read_text().split() == [str(child.pid)]
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        ours.close()
        cgroup.rmdir()
