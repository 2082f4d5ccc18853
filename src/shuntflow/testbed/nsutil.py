"""Network namespaces: create, enter, remove, and find or stop the processes inside them."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pyroute2 import netns as pr_netns

from shuntflow.testbed.plan import NETNS_DIR, TestbedError

CLONE_NEWNET = 0x40000000

_libc: Any = None


def _libc_setns() -> Callable[[int, int], int]:
    """A setns(fd, nstype) callable, loaded before any fork so a preexec_fn only calls it."""
    native = getattr(os, "setns", None)  # Python >= 3.12
    if native is not None:

        def call(fd: int, nstype: int) -> int:
            native(fd, nstype)
            return 0

        return call
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = _libc.setns

    def call_c(fd: int, nstype: int) -> int:
        if fn(fd, nstype) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return 0

    return call_c


def _libc_unshare() -> Callable[[int], None]:
    native = getattr(os, "unshare", None)  # Python >= 3.12
    if native is not None:
        return native  # type: ignore[no-any-return]
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = _libc.unshare

    def call(flags: int) -> None:
        if fn(flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare: {os.strerror(err)}")

    return call


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def create_netns(name: str, then: Callable[[], Any] | None = None) -> None:
    """Create namespace `name` (as `ip netns add`), then run `then` inside it.

    On a short-lived thread: unshare(CLONE_NEWNET) moves only that thread into a new namespace,
    which a bind mount under /run/netns keeps once the thread is gone. pyroute2's own `create`
    forks a helper process for it (~7 ms each here, and as much again for each netlink socket
    opened with netns=), which was most of the time a large testbed took.
    """
    if netns_exists(name):
        raise TestbedError(f"network namespace {name} already exists")
    unshare = _libc_unshare()

    def body() -> None:
        unshare(CLONE_NEWNET)
        pr_netns.attach(name, "thread-self")
        if then is not None:
            then()

    _on_thread(f"netns-new-{name}", body)


def remove_netns(name: str) -> bool:
    """Unmount and unlink the namespace; the kernel frees it with its devices once unused."""
    path = netns_path(name)
    if not path.exists():
        return False
    try:
        pr_netns.remove(name)
    except FileNotFoundError:
        return False
    return True


def open_netns(name: str) -> int:
    try:
        return os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TestbedError(f"network namespace {name} does not exist") from None


def enter_netns_fd(fd: int) -> None:
    """Move the calling thread into the namespace of `fd` (the whole process if single-threaded)."""
    _libc_setns()(fd, CLONE_NEWNET)


def make_preexec(
    fd: int, cpus: set[int] | None, chain: Callable[[], Any] | None = None
) -> Callable[[], None]:
    """A preexec_fn for subprocess: enter the namespace, pin, then the caller's own preexec_fn."""
    setns = _libc_setns()

    def preexec() -> None:
        setns(fd, CLONE_NEWNET)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        if chain is not None:
            chain()

    return preexec


def in_netns(name: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` on a short-lived thread that entered namespace `name`.

    setns(CLONE_NEWNET) affects only the calling thread, and /proc/sys/net resolves against the
    thread's namespace, so a thread is enough and the rest of the process never moves.
    """
    fd = open_netns(name)

    def body() -> Any:
        enter_netns_fd(fd)
        return fn()

    try:
        return _on_thread(f"netns-{name}", body)
    finally:
        os.close(fd)


def _on_thread(name: str, fn: Callable[[], Any]) -> Any:
    """fn() on a new thread, its result or exception passed back: a thread that changes its
    network namespace ends with it, so the caller's never changes."""
    result: list[Any] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            result.append(fn())
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0] if result else None


def write_sysctls(name: str, values: dict[str, str]) -> None:
    in_netns(name, lambda: write_sysctls_here(values))


def write_sysctls_here(values: dict[str, str]) -> None:
    """Sysctls of the calling thread's network namespace."""
    for key, value in values.items():
        path = Path("/proc/sys") / key.replace(".", "/")
        if not path.exists() and key.startswith("net.ipv6."):
            continue  # IPv6 compiled out or disabled at boot: nothing to disable
        path.write_text(value)


# -- processes ---------------------------------------------------------------------------


def pid_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may itself contain ")".
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def is_router_cmdline(args: list[str]) -> bool:
    """The PID-reuse guard: only a process that looks like a ShuntFlow router gets a signal."""
    joined = " ".join(args)
    return "shuntflow" in joined and "router" in args


def pids_in_netns(names: Iterable[str]) -> dict[int, str]:
    """Processes (other than this one) whose network namespace is one of `names`."""
    wanted: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(netns_path(name))
        except OSError:
            continue
        wanted[(st.st_dev, st.st_ino)] = name
    found: dict[int, str] = {}
    if not wanted:
        return found
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        hit = wanted.get((st.st_dev, st.st_ino))
        if hit is not None and pid_alive(int(entry)):
            found[int(entry)] = hit
    return found


def terminate(pids: Iterable[int], grace: float = 3.0, group: bool = False) -> list[int]:
    """SIGTERM, wait up to `grace` s, then SIGKILL what is left; returns the pids signalled."""
    targets = [p for p in set(pids) if p > 1 and p != os.getpid()]

    def send(pid: int, sig: signal.Signals) -> None:
        try:
            if group and os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise

    for pid in targets:
        send(pid, signal.SIGTERM)
    # Zombies count as gone (pid_alive): reaping is left to each child's parent, so that a
    # caller's Popen still sees its own process's exit status.
    deadline = time.monotonic() + grace
    while True:
        left = [p for p in targets if pid_alive(p)]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    for pid in left:
        send(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while left and time.monotonic() < deadline:
        left = [p for p in left if pid_alive(p)]
        if left:
            time.sleep(0.02)
    return targets
