"""Real container runtimes over the testbed: minimal root filesystems built from this machine's
own binaries (no image registry needed), and podman invocations that work on this VM.

A root filesystem here holds the given programs, every shared library `ldd` names for them, and
the dynamic loader: enough for a container with its own mount namespace to run them, and nothing
of the host's Python or the ShuntFlow package, so the library can only come in by bind mount.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from pathlib import Path

from shuntflow.router.control import query
from shuntflow.testbed import Testbed

from ..support import SHUNTFLOW


def _copy(src: str, root: Path) -> None:
    dest = root / src.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(src).resolve(), dest)


def glibc_rootfs(root: Path, programs: list[str]) -> Path:
    """`root` with `programs` (absolute paths) and what `ldd` says they load."""
    for prog in programs:
        _copy(prog, root)
        out = subprocess.run(["ldd", prog], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            words = line.split()
            path = words[2] if "=>" in words and len(words) > 2 else words[0]
            if path.startswith("/"):  # copied under the name the program asks for
                _copy(path, root)
    for d in ("tmp", "etc", "proc", "dev", "sys", "run"):
        (root / d).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/nonexistent\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    return root


def podman_run() -> list[str]:
    """`podman run` as this VM needs it: runc (crun refuses its hybrid cgroups), cgroupfs (no
    systemd session), and rlimits within this process's hard limits (podman's defaults exceed
    them, and runc may not raise a limit)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nproc = 4096 if nproc == resource.RLIM_INFINITY else min(nproc, 4096)
    nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 65536)
    return [
        "podman",
        "--runtime",
        "runc",
        "--cgroup-manager",
        "cgroupfs",
        "run",
        "--ulimit",
        f"nofile={nofile}:{nofile}",
        "--ulimit",
        f"nproc={nproc}:{nproc}",
    ]


def container_args(testbed_container: str, *extra: str) -> list[str]:
    """What `shuntflow container-args` prints for a testbed container, split as `$(...)` does."""
    out = subprocess.run(
        [SHUNTFLOW, "container-args", "--testbed-container", testbed_container, *extra],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return out.split()


def podman_pid(name: str) -> int:
    out = subprocess.run(
        ["podman", "inspect", name], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return int(json.loads(out)[0]["State"]["Pid"])


def podman_rm(name: str) -> None:
    subprocess.run(
        ["podman", "--runtime", "runc", "rm", "-f", "-t", "2", name],
        capture_output=True,
        timeout=60,
    )


def same_ns(pid: int, kind: str, other: str | Path) -> bool:
    return Path(f"/proc/{pid}/ns/{kind}").stat().st_ino == Path(other).stat().st_ino


MUSL_LOADER = "/lib/ld-musl-x86_64.so.1"


def musl_rootfs(root: Path, programs: dict[str, Path]) -> Path:
    """`root` with musl's loader (which is also its libc) and `programs` {path in root: file}:
    what an Alpine-based image holds for a dynamically linked C program, and no glibc at all."""
    _copy(MUSL_LOADER, root)
    for inside, built in programs.items():
        dest = root / inside.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, dest)
    for d in ("tmp", "etc", "proc", "dev", "sys", "run"):
        (root / d).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    return root


def switches_served(tb: Testbed) -> int:
    """Switches both routers served (each switch counts once on each)."""
    return sum(
        int(query(h.router_socket.with_name("router.sock.ctl"))["router"]["switches_served"])
        for h in tb.hosts
    )
