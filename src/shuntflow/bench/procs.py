"""Processes under measurement: on-CPU time, reaping with rusage, waiting for a listening port.

On-CPU time comes from the processes themselves (schedstat of every thread, rusage of reaped
clients), never /proc/stat: on the reference VM /proc/stat under-counts by ~30 %.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

PROC = Path("/proc")

# Set by the CLI's signal handler; every wait below checks it and unwinds the run with
# KeyboardInterrupt from a point where that is safe.
STOP = threading.Event()


def check_stop() -> None:
    if STOP.is_set():
        raise KeyboardInterrupt


def descendants(root: int) -> set[int]:
    """`root` and every process below it (nginx workers, forked helpers)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; fields after the last ')' are safe.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def pin(pids: Iterable[int], cpus: set[int] | None) -> Callable[[], None]:
    """Move every thread of `pids` to `cpus` (None: leave them); returns what undoes it.

    For the routers, which the testbed started and outlive the bench: threads that end or
    appear meanwhile are skipped or keep their inherited set."""
    saved: dict[int, set[int]] = {}
    if cpus is not None:
        for pid in pids:
            for tid in _tasks(pid):
                with contextlib.suppress(OSError):
                    before = os.sched_getaffinity(tid)
                    os.sched_setaffinity(tid, cpus)
                    saved[tid] = before

    def undo() -> None:
        for tid, before in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, before)

    return undo


def oncpu_ns(pids: Iterable[int]) -> int:
    """Sum of on-CPU time of every thread of `pids` (first field of schedstat, in ns)."""
    total = 0
    for pid in pids:
        try:
            tasks = list((PROC / str(pid) / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


def tree_oncpu_ns(root: int) -> int:
    return oncpu_ns(descendants(root))


class Timeout(Exception):
    pass


def reap(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, float]:
    """Wait for `proc` to exit; (exit code, user+system CPU seconds of it and its children).

    wait4 gives the rusage of exactly that child, all its threads included, which is the
    client's own on-CPU time without a race against its exit.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        check_stop()
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            code = os.waitstatus_to_exitcode(status)
            proc.returncode = code  # so Popen never waits for the pid we reaped
            return code, ru.ru_utime + ru.ru_stime
        if time.monotonic() >= deadline:
            raise Timeout(str(proc.args))
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process (its group too: nginx workers), SIGKILL what is left after `grace`."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace)
    # Workers that outlived their master (the group id stays theirs).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def kill_now(proc: subprocess.Popen[bytes]) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
            proc.wait(5)


def netdev_bytes(pid: int, device: str) -> int | None:
    """rx + tx bytes of `device` in the network namespace of `pid` (/proc/PID/net/dev).

    Read through a process of that namespace instead of netlink: pyroute2 forks a helper per
    namespace switch, which is slow and unsafe next to signal handlers.
    """
    try:
        lines = (PROC / str(pid) / "net" / "dev").read_text().splitlines()[2:]
    except OSError:
        return None
    for line in lines:
        name, _, rest = line.partition(":")
        if name.strip() == device:
            fields = rest.split()
            return int(fields[0]) + int(fields[8])
    return None


def _listening_ports(pid: int) -> set[int]:
    """Ports in LISTEN state in the network namespace of `pid` (its /proc/PID/net/tcp)."""
    ports: set[int] = set()
    try:
        lines = (PROC / str(pid) / "net" / "tcp").read_text().splitlines()[1:]
    except OSError:
        return ports
    for line in lines:
        parts = line.split()
        if len(parts) > 3 and parts[3] == "0A":
            ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 10.0) -> None:
    """Until the server listens on `port`.

    Read from the server's own namespace view instead of connecting: a probe connection would
    be one more connection for the library and the routers to count.
    """
    deadline = time.monotonic() + timeout
    while True:
        check_stop()
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening")
        if port in _listening_ports(proc.pid):
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"server did not listen on port {port} within {timeout:.0f} s")
        time.sleep(0.01)
