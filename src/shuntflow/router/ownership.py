# "Only the owner" (invariant 6, docs/design.md): does the network namespace of the process on the
# other end of a library channel hold this overlay 4-tuple as a live TCP connection?
#
# How: SO_PEERCRED (and SO_PEERPIDFD, against pid reuse) name the process when its channel is
# accepted; its /proc/<pid>/ns/net names the namespace. A NETLINK_SOCK_DIAG socket opened inside
# that namespace answers an exact-tuple inet_diag_req_v2 (no dump: the kernel does one hash
# lookup) with the socket's state and inode.
# Why a netlink socket per namespace, cached and refcounted by the channels of that namespace:
# a netlink socket is bound to the namespace it was created in, and creating it there needs a
# setns() -- done once in a short-lived thread, since setns(CLONE_NEWNET) changes only the
# calling thread and the event loop thread must stay in the host namespace. The check itself is
# then one sendmsg + recv on the event loop (the kernel answers inside sendmsg), tens of
# microseconds. The socket is closed with the last channel of its namespace, since an open one
# would keep a deleted container's namespace alive.
# Why the inode must be non-zero: a TCP socket the application already closed (orphaned, or a
# FIN_WAIT2 time-wait entry, which sock_diag reports with its FIN_WAIT2 substate) has none, and
# nobody owns it any more.

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from shuntflow.wire import Tuple4

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
NLMSG_DONE = 3
CLONE_NEWNET = 0x40000000
SO_PEERPIDFD = 77  # Linux >= 6.5; not exported by Python 3.11's socket module
INET_DIAG_NOCOOKIE = 0xFFFFFFFF

_NLHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid (ports and
# addresses in network order, interface, cookie).
_REQ = struct.Struct("=BBBBI2s2s16s16sII I")
# inet_diag_msg: family, state, timer, retrans, sockid, expires, rqueue, wqueue, uid, inode.
_MSG = struct.Struct("=BBBB2s2s16s16sIII IIIII")

TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}
# Synchronized states in which a handoff legitimately runs: the torture test half-closes, and a
# half-closed connection still carries bytes one way.
OWNED_STATES = frozenset({1, 4, 5, 8})

NsKey = tuple[int, int]  # (st_dev, st_ino) of the namespace file

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class OwnerError(Exception):
    """The owner of a channel cannot be established; every request from it is refused."""


def _open_diag_socket() -> socket.socket:
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    )
    sock.bind((0, 0))
    sock.settimeout(0.5)
    return sock


def _diag_socket_in(ns_fd: int) -> socket.socket:
    """A sock_diag socket created inside the namespace `ns_fd`, from a short-lived thread."""
    box: list[socket.socket | BaseException] = []

    def body() -> None:
        try:
            _setns(ns_fd)
            box.append(_open_diag_socket())
        except BaseException as exc:  # handed to the caller
            box.append(exc)

    t = threading.Thread(target=body, name="sf-netns-diag")
    t.start()
    t.join()
    result = box[0]
    if isinstance(result, BaseException):
        raise OwnerError(f"cannot open sock_diag in namespace: {result}")
    return result


@dataclass
class _Diag:
    sock: socket.socket
    users: int
    seq: int = 0


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


class OwnershipChecker:
    """One sock_diag socket per network namespace in use by library channels."""

    def __init__(self) -> None:
        st = os.stat("/proc/self/ns/net")
        self.own_ns: NsKey = (st.st_dev, st.st_ino)
        self._diag: dict[NsKey, _Diag] = {}
        self.checks = 0

    # -- channels --------------------------------------------------------------------------

    def attach(self, conn: socket.socket) -> tuple[NsKey, int]:
        """Namespace and pid of the process on the other end of `conn` (at its connect())."""
        key, pid, _nsid = self.attach_with_id(conn, lambda _fd: None)
        return key, pid

    def attach_with_id(
        self, conn: socket.socket, nsid_of: Callable[[int], int | None]
    ) -> tuple[NsKey, int, int | None]:
        """As attach, plus `nsid_of(namespace fd)`: the id the router's namespace gives it."""
        pidfd = -1
        with contextlib.suppress(OSError):
            pidfd = int(conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = struct.unpack("3i", creds)[0]
            if pid <= 0:
                raise OwnerError("peer pid not visible from the router's pid namespace")
            try:
                ns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise OwnerError(f"/proc/{pid}/ns/net: {exc.strerror or exc}") from None
            try:
                if pidfd >= 0:
                    # Still alive after the open, so the pid was not reused under us.
                    try:
                        signal.pidfd_send_signal(pidfd, 0)
                    except ProcessLookupError:
                        raise OwnerError(f"process {pid} exited while connecting") from None
                st = os.fstat(ns_fd)
                key: NsKey = (st.st_dev, st.st_ino)
                nsid = nsid_of(ns_fd)
                entry = self._diag.get(key)
                if entry is not None:
                    entry.users += 1
                else:
                    sock = _open_diag_socket() if key == self.own_ns else _diag_socket_in(ns_fd)
                    self._diag[key] = _Diag(sock, 1)
                return key, pid, nsid
            finally:
                os.close(ns_fd)
        except OSError as exc:
            raise OwnerError(f"peer credentials: {exc.strerror or exc}") from None
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def detach(self, key: NsKey) -> None:
        entry = self._diag.get(key)
        if entry is None:
            return
        entry.users -= 1
        if entry.users <= 0:
            entry.sock.close()
            del self._diag[key]

    def diag_fd(self, key: NsKey) -> int | None:
        """The sock_diag socket of namespace `key` (the native switch path queries it)."""
        entry = self._diag.get(key)
        return entry.sock.fileno() if entry is not None else None

    def namespaces(self) -> int:
        return len(self._diag)

    def close(self) -> None:
        for entry in self._diag.values():
            entry.sock.close()
        self._diag.clear()

    # -- the check -------------------------------------------------------------------------

    def owns(self, key: NsKey, t: Tuple4) -> Verdict:
        """Does namespace `key` hold `t` (local = the asking process's end) as a live socket?"""
        entry = self._diag.get(key)
        if entry is None:
            return Verdict(False, "namespace not attached")
        self.checks += 1
        entry.seq = (entry.seq + 1) & 0xFFFFFFFF
        try:
            state, inode = _lookup(entry, t)
        except OSError as exc:
            return Verdict(False, f"sock_diag: {exc.strerror or exc}")
        if state is None:
            return Verdict(False, "no such TCP connection in the process's network namespace")
        name = TCP_STATES.get(state, str(state))
        if state not in OWNED_STATES:
            return Verdict(False, f"connection is {name}")
        if inode == 0:
            return Verdict(False, f"connection is {name} but closed by its process (no inode)")
        return Verdict(True, name)


def _lookup(entry: _Diag, t: Tuple4) -> tuple[int | None, int]:
    """(state, inode) of the TCP socket with exactly this tuple, or (None, 0)."""
    req = _REQ.pack(
        socket.AF_INET,
        socket.IPPROTO_TCP,
        0,
        0,
        0xFFFFFFFF,
        t.local.port.to_bytes(2, "big"),
        t.remote.port.to_bytes(2, "big"),
        t.local.ip.packed.ljust(16, b"\0"),
        t.remote.ip.packed.ljust(16, b"\0"),
        0,
        INET_DIAG_NOCOOKIE,
        INET_DIAG_NOCOOKIE,
    )
    hdr = _NLHDR.pack(_NLHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, entry.seq, 0)
    entry.sock.send(hdr + req)
    while True:
        data = entry.sock.recv(8192)
        pos = 0
        while pos + _NLHDR.size <= len(data):
            length, mtype, _flags, seq, _pid = _NLHDR.unpack_from(data, pos)
            if length < _NLHDR.size:
                raise OSError(0, "malformed netlink reply")
            body = data[pos + _NLHDR.size : pos + length]
            pos += (length + 3) & ~3
            if seq != entry.seq:
                continue  # a late answer to an earlier, timed-out request
            if mtype == NLMSG_ERROR:
                err = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
                if err in (0, 2):  # ENOENT: no socket with that tuple
                    return None, 0
                raise OSError(err, os.strerror(err))
            if mtype == NLMSG_DONE:
                return None, 0
            if mtype == SOCK_DIAG_BY_FAMILY and len(body) >= _MSG.size:
                f = _MSG.unpack_from(body)
                state, sport, dport, src, dst, inode = f[1], f[4], f[5], f[6], f[7], f[15]
                # The kernel falls back to a listener on the local port: not our connection.
                if (
                    sport == t.local.port.to_bytes(2, "big")
                    and dport == t.remote.port.to_bytes(2, "big")
                    and src[:4] == t.local.ip.packed
                    and dst[:4] == t.remote.ip.packed
                ):
                    return state, inode
                return None, 0
