# The socket guard: the kernel refuses connect() and bind() on every socket the router hands to a
# container and lets no connection reach it should it listen, so a container that disconnects
# its host socket (connect(AF_UNSPEC)) cannot point it at the host's loopback services or the
# peer routers' port, nor serve anything with it in the host namespace. bpf/guard.bpf.c holds
# the programs; they match sockets by SO_MARK, which the router sets before the handoff and
# which a container cannot change (the socket belongs to the host's namespace: CAP_NET_ADMIN
# there).
#
# Why ctypes to libbpf (Debian's libbpf1) rather than a C loader or bpftool: the router needs four
# calls (open, load, attach, destroy) and their errors as exceptions in its own log; a loader
# binary would add a build product, a process per start and output parsing, and bpftool cannot
# set the mark before loading nor create cgroup links that die with their holder.
# Why links held open, never pinned: a link lives as long as its fd, so whatever way the router
# ends (SIGTERM, SIGKILL), the kernel detaches its programs and nothing is left behind. Every
# router on a machine attaches its own three links (cgroup links stack: BPF_F_ALLOW_MULTI), so
# routers never share or fight over state; with the same mark, any router still running guards
# the sockets every router handed out.
# Why a self-test after attaching: a program attached where the kernel does not run it (a socket
# outside the hierarchy the router found, a kernel that skips cgroup programs) fails silently. A
# marked socket that can still connect or bind, or a marked listener that accepts a connection,
# means the guard does not hold, and the router then hands out nothing.

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import socket
from pathlib import Path

from shuntflow.router.logfmt import get_logger

log = get_logger()

DEFAULT_MARK = 0x53
PROGRAMS = ("guard_connect4", "guard_bind4", "guard_ingress")


class GuardError(RuntimeError):
    """The guard cannot be set up; one line for the log."""


def object_path() -> Path:
    return Path(__file__).resolve().parent.parent / "_native" / "guard.bpf.o"


def cgroup2_root(mountinfo: str | None = None) -> Path:
    """Where the cgroup v2 hierarchy's root is mounted: /sys/fs/cgroup (unified layout) or, on
    hybrid systems, /sys/fs/cgroup/unified; whatever /proc/self/mountinfo says."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    found: list[Path] = []
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if not sep or len(fields) < 5 or not tail.startswith("cgroup2 "):
            continue
        if fields[3] == "/":  # the hierarchy's root, not a bind mount of a sub-cgroup
            found.append(Path(fields[4].replace("\\040", " ")))
    if not found:
        raise GuardError("no cgroup v2 hierarchy mounted (mount -t cgroup2 none /sys/fs/cgroup)")
    return sorted(found, key=lambda p: len(p.parts))[0]


def _libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise GuardError(f"libbpf not found ({exc}); install libbpf1") from None
    vp = ctypes.c_void_p
    for fn, res, args in (
        ("bpf_object__open_file", vp, [ctypes.c_char_p, vp]),
        ("bpf_object__find_map_by_name", vp, [vp, ctypes.c_char_p]),
        ("bpf_map__initial_value", vp, [vp, ctypes.POINTER(ctypes.c_size_t)]),
        ("bpf_object__load", ctypes.c_int, [vp]),
        ("bpf_object__find_program_by_name", vp, [vp, ctypes.c_char_p]),
        ("bpf_program__attach_cgroup", vp, [vp, ctypes.c_int]),
        ("bpf_link__destroy", ctypes.c_int, [vp]),
        ("bpf_object__close", None, [vp]),
        ("bpf_map__fd", ctypes.c_int, [vp]),
        ("bpf_map_lookup_elem", ctypes.c_int, [ctypes.c_int, vp, vp]),
    ):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    return lib


def _err(what: str) -> GuardError:
    code = ctypes.get_errno()
    return GuardError(f"{what}: {os.strerror(code) if code else 'failed'}")


class SocketGuard:
    """Loads and attaches the guard; `protect(sock)` marks a socket before its handoff."""

    def __init__(self, mark: int = DEFAULT_MARK, obj: Path | None = None) -> None:
        if not 0 < mark <= 0xFFFFFFFF:
            raise GuardError(f"guard mark {mark:#x} must be 1..0xffffffff")
        self.mark = mark
        self.obj_path = obj or object_path()
        self.cgroup: Path | None = None
        self._lib: ctypes.CDLL | None = None
        self._obj: int | None = None
        self._links: list[int] = []
        self._counters: int | None = None  # fd of the programs' .bss map (3 x u64)

    def start(self) -> None:
        """Attach the programs and check they hold; GuardError (with nothing left) if not."""
        try:
            self._attach()
            self._self_test()
        except BaseException:
            self.close()
            raise

    def _attach(self) -> None:
        if not self.obj_path.is_file():
            raise GuardError(f"{self.obj_path} missing; reinstall the package (`pip install .`)")
        lib = self._lib = _libbpf()
        obj = lib.bpf_object__open_file(str(self.obj_path).encode(), None)
        if not obj:
            raise _err(f"open {self.obj_path}")
        self._obj = obj
        rodata = lib.bpf_object__find_map_by_name(obj, b".rodata")
        size = ctypes.c_size_t(0)
        data = lib.bpf_map__initial_value(rodata, ctypes.byref(size)) if rodata else None
        if not data or size.value < 4:
            raise GuardError(f"{self.obj_path}: no guard_mark to set")
        ctypes.c_uint32.from_address(data).value = self.mark
        if lib.bpf_object__load(obj) != 0:
            raise _err("load the guard programs (root, CONFIG_BPF_SYSCALL, kernel BTF)")
        bss = lib.bpf_object__find_map_by_name(obj, b".bss")
        fd = lib.bpf_map__fd(bss) if bss else -1
        if fd < 0:
            raise GuardError(f"{self.obj_path}: no counters")
        self._counters = fd
        self.cgroup = cgroup2_root()
        fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in PROGRAMS:
                prog = lib.bpf_object__find_program_by_name(obj, name.encode())
                if not prog:
                    raise GuardError(f"{self.obj_path}: no program {name}")
                link = lib.bpf_program__attach_cgroup(prog, fd)
                if not link:
                    raise _err(f"attach {name} to {self.cgroup}")
                self._links.append(link)
        finally:
            os.close(fd)

    def _self_test(self) -> None:
        """A marked socket must refuse connect and bind, and hear nothing when listening."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            self.protect(s)
            for what, addr in (("bind", ("127.0.0.1", 0)), ("connect", ("127.0.0.1", 9))):
                try:
                    if what == "bind":
                        s.bind(addr)
                    else:
                        s.connect(addr)
                except PermissionError:
                    continue
                except OSError as exc:
                    raise GuardError(f"self-test: {what} failed with {exc}, not EPERM") from None
                raise GuardError(f"self-test: a marked socket could still {what}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            self.protect(listener)
            listener.listen(1)  # autobinds to 0.0.0.0:<ephemeral>
            port = listener.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    probe.connect(("127.0.0.1", port))
                # Over loopback a SYN that is not dropped is answered at once.
                _r, writable, _x = select.select([], [probe], [], 0.05)
                if writable and probe.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    raise GuardError("self-test: a marked listener accepted a connection")

    def protect(self, sock: socket.socket) -> None:
        """Mark `sock`: from now on the kernel refuses to connect, bind or listen with it."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)

    def close(self) -> None:
        """Detach (the links die with their fds) and free the object."""
        lib = self._lib
        if lib is None:
            return
        for link in self._links:
            with contextlib.suppress(Exception):
                lib.bpf_link__destroy(link)
        self._links.clear()
        self._counters = None
        if self._obj is not None:
            lib.bpf_object__close(self._obj)
            self._obj = None

    def counters(self) -> dict[str, int]:
        """What the kernel refused so far (counted by every router's programs alike)."""
        if self._counters is None or not self._links:
            return {"refused_connect": 0, "refused_bind": 0, "dropped_listen": 0}
        assert self._lib is not None
        values = (ctypes.c_uint64 * 3)()
        key = ctypes.c_uint32(0)
        if self._lib.bpf_map_lookup_elem(self._counters, ctypes.byref(key), values) != 0:
            return {"refused_connect": -1, "refused_bind": -1, "dropped_listen": -1}
        return {
            "refused_connect": int(values[0]),
            "refused_bind": int(values[1]),
            "dropped_listen": int(values[2]),
        }

    def describe(self) -> dict[str, object]:
        return {
            "mark": f"{self.mark:#x}",
            "cgroup": str(self.cgroup) if self.cgroup else None,
            "programs": len(self._links),
            **self.counters(),
        }
