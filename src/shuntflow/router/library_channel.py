# The router's side of the library <-> router channel (docs/wire.md section 1), up to HELLO.
#
# One AF_UNIX SOCK_SEQPACKET listening socket; one persistent connection per application process.
# Here: accepting a channel, establishing who is on the other end (SO_PEERCRED, its network
# namespace, the container the overlay reaches there: ownership.py, attachment.py), admitting it
# or not (at most max_clients, max_per_netns per container, attached containers only), and its
# first frame, which must be a valid HELLO within a deadline (else idle connections could fill
# the client table for good). At HELLO the channel goes to the native switch path
# (daemon.Router.on_hello), which answers it and serves every later frame; the client record
# stays here for status and for the bookkeeping when the switch path reports it closed.
# Why raw recvmsg instead of asyncio streams: SEQPACKET keeps one frame per datagram, which
# streams would blur, and a passed fd must be seen (and closed) to be refused.

from __future__ import annotations

import array
import asyncio
import os
import select
import socket
import stat
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Protocol

from shuntflow.router.attachment import Attachments
from shuntflow.router.logfmt import ensure_dir, get_logger
from shuntflow.router.ownership import NsKey, OwnerError, OwnershipChecker
from shuntflow.wire import MSG_SIZE, Msg, MsgType, WireError

log = get_logger()

# Frames a library may send; the others of section 1 go router -> library only.
FROM_LIBRARY = frozenset(
    {
        MsgType.HELLO,
        MsgType.SWITCH_REQ,
        MsgType.CLAIM_RES,
        MsgType.CONN_INFO,
        MsgType.STATS_END,
        MsgType.SWITCH_DONE,
        MsgType.SWITCH_CALLS,
    }
)
_UCRED = struct.Struct("3i")


class RouterSetupError(RuntimeError):
    """The router cannot start (socket path in use, permission...); one line for the user."""


class LibraryHandler(Protocol):
    def on_hello(self, client: LibraryClient, seq: int) -> None: ...
    def on_client_closed(self, client: LibraryClient) -> None: ...


def prepare_socket_path(path: Path, kind: socket.SocketKind) -> None:
    """Create parent dirs (0755); remove a stale socket; refuse if a live one answers."""
    ensure_dir(path.parent)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RouterSetupError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # stale: nobody listens
        return
    finally:
        probe.close()
    raise RouterSetupError(f"{path}: another router is already listening there")


def read_frame(data: bytes, flags: int, nfds: int) -> tuple[Msg | None, str]:
    """The frame in one datagram (recvmsg of MSG_SIZE + 1 bytes: `flags` its flags, `nfds`
    the fds that came with it), or why it is none a library may send. The switch path's
    sfl_parse applies the same rules to every later frame (tests check the two agree)."""
    if nfds:
        return None, "library passed file descriptors to the router"
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) != MSG_SIZE:
        size = f"more than {MSG_SIZE}" if flags & socket.MSG_TRUNC else str(len(data))
        if not data:
            return None, f"empty frame (0 bytes), expected {MSG_SIZE}"
        return None, f"frame is {size} bytes, expected {MSG_SIZE}"
    try:
        msg = Msg.unpack(data)
    except WireError as exc:
        return None, str(exc)
    if msg.type not in FROM_LIBRARY:
        return None, f"frame type {msg.type.name} may not come from a library"
    return msg, ""


def _passed_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


class LibraryClient:
    """One connected application process."""

    def __init__(self, cid: int, sock: socket.socket, server: LibraryServer) -> None:
        self.id = cid
        self.sock = sock
        self.server = server
        self.loop = server.loop
        self.pid = 0  # from HELLO (the process's own view; may be a pid namespace's)
        self.cred_pid, self.cred_uid = 0, -1  # SO_PEERCRED, in the router's view
        self.ns_key: NsKey | None = None  # its network namespace, for the ownership check
        # The id the router's namespace gives that namespace; the container it is, if a veth
        # of the overlay bridge leads there (attachment.py). None: attached nowhere.
        self.nsid: int | None = None
        self.owner_error = "ownership not established"  # why ns_key is None
        self.mode = 0
        self.ready = False  # HELLO received
        self.native = False  # handed to the native switch path: its socket is not ours
        self.closed = False
        self.close_reason = ""
        self.connected_at = time.time()
        self._hello_deadline: asyncio.TimerHandle | None = None
        try:
            pid, uid, _gid = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
            self.cred_pid, self.cred_uid = pid, uid
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"LibraryClient(id={self.id}, pid={self.pid or self.cred_pid})"

    # -- receiving -------------------------------------------------------------------------

    def on_readable(self) -> None:
        """The first frame (the channel is the switch path's once it was a HELLO)."""
        if self.closed or self.native:
            return
        try:
            self._read_first()
        except Exception:
            log.error("client_handler_error", exc=True, client=self.id, pid=self.pid)
            self.close("router internal error while handling a frame")

    def _read_first(self) -> None:
        try:
            data, anc, flags, _addr = self.sock.recvmsg(
                MSG_SIZE + 1, socket.CMSG_SPACE(8 * 4), socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"receive failed: {exc.strerror or exc}")
            return
        fds = _passed_fds(anc)
        for fd in fds:
            os.close(fd)
        # SEQPACKET delivers an empty datagram as a 0-byte read too: only a hangup is the
        # client leaving.
        if not data and not fds and self._peer_hung_up():
            self.close("disconnected")
            return
        msg, why = read_frame(data, flags, len(fds))
        if msg is None:
            self.close(why, violation=True)
            return
        self._hello(msg)

    def _peer_hung_up(self) -> bool:
        p = select.poll()
        p.register(self.sock, select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP) for _fd, ev in p.poll(0))

    def start_hello_deadline(self, seconds: float) -> None:
        def expired() -> None:
            if not self.ready:
                self.close(f"no HELLO within {seconds:g}s", violation=True)

        self._hello_deadline = self.loop.call_later(seconds, expired)

    def _hello(self, msg: Msg) -> None:
        if msg.type is not MsgType.HELLO:
            self.close(f"first frame must be HELLO, got {msg.type.name}", violation=True)
            return
        self.ready = True
        if self._hello_deadline is not None:
            self._hello_deadline.cancel()
        self.pid = msg.pid
        self.mode = int(msg.arg)
        log.info(
            "client_hello",
            client=self.id,
            pid=self.pid,
            cred_pid=self.cred_pid,
            uid=self.cred_uid,
            mode=self.mode,
        )
        self.server.handler.on_hello(self, msg.seq)

    # -- closing ---------------------------------------------------------------------------

    def hand_off(self) -> int:
        """Stop serving this channel here; the socket's fd, now the caller's."""
        self.loop.remove_reader(self.sock.fileno())
        self.native = True
        return self.sock.detach()

    def close(self, reason: str, violation: bool = False) -> None:
        if self.closed:
            return
        if self._hello_deadline is not None:
            self._hello_deadline.cancel()
        if not self.native:  # a handed-off channel is closed by its new owner
            fd = self.sock.fileno()
            if fd >= 0:
                self.loop.remove_reader(fd)
            self.sock.close()
        self.closed = True
        self.close_reason = reason
        self.server.clients.pop(self.id, None)
        self.server.forget_container_slot(self.nsid)
        if self.ns_key is not None and self.server.owners is not None:
            self.server.owners.detach(self.ns_key)
            self.ns_key = None
        emit = log.warning if violation else log.info
        emit(
            "client_dropped" if violation else "client_closed",
            client=self.id,
            pid=self.pid or None,
            cred_pid=self.cred_pid,
            reason=reason,
        )
        try:
            self.server.handler.on_client_closed(self)
        except Exception:
            log.error("client_close_handler_error", exc=True, client=self.id)


class LibraryServer:
    """The listening SEQPACKET socket and the set of connected clients."""

    def __init__(
        self,
        path: Path,
        handler: LibraryHandler,
        loop: asyncio.AbstractEventLoop,
        max_clients: int = 4096,
        owners: OwnershipChecker | None = None,
        hello_timeout: float = 2.0,
        max_per_netns: int = 1024,
        attachments: Attachments | None = None,
    ) -> None:
        self.path = path
        self.owners = owners
        self.attachments = attachments
        self.handler = handler
        self.loop = loop
        self.max_clients = max_clients
        self.max_per_netns = max_per_netns
        self.per_container: Counter[int] = Counter()
        self.hello_timeout = hello_timeout
        self.clients: dict[int, LibraryClient] = {}
        self.accepted = 0
        self.rejected = 0
        self._next_id = 1
        self._sock: socket.socket | None = None

    def start(self) -> None:
        prepare_socket_path(self.path, socket.SOCK_SEQPACKET)
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o666)  # application processes may have dropped root
            sock.listen(512)
        except OSError as exc:
            sock.close()
            raise RouterSetupError(f"cannot listen on {self.path}: {exc.strerror}") from None
        self._sock = sock
        self.loop.add_reader(sock.fileno(), self._on_accept)

    def forget_container_slot(self, nsid: int | None) -> None:
        if self.owners is None or nsid is None or nsid not in self.per_container:
            return
        self.per_container[nsid] -= 1
        if self.per_container[nsid] <= 0:
            del self.per_container[nsid]

    def ready_clients(self) -> list[LibraryClient]:
        return [c for c in self.clients.values() if c.ready and not c.closed]

    def _on_accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: log, keep the listener
                log.error("accept_failed", error=exc.strerror or str(exc))
                return
            if len(self.clients) >= self.max_clients:
                self.rejected += 1
                conn.close()
                log.warning("client_rejected", reason="too many clients", limit=self.max_clients)
                continue
            conn.setblocking(False)
            client = LibraryClient(self._next_id, conn, self)
            self._next_id += 1
            if self.owners is not None:
                # At accept, while the connecting process is certainly alive: its namespace
                # is what every later ownership check of this channel asks.
                nsid_of = self.attachments.nsid_of if self.attachments else (lambda _fd: None)
                try:
                    client.ns_key, _pid, client.nsid = self.owners.attach_with_id(conn, nsid_of)
                except OwnerError as exc:
                    client.owner_error = str(exc)
                    log.warning("client_owner_unknown", client=client.id, reason=str(exc))
            if not self._admit_from_namespace(client):
                continue
            self.accepted += 1
            self.clients[client.id] = client
            self.loop.add_reader(conn.fileno(), client.on_readable)
            client.start_hello_deadline(self.hello_timeout)
            log.debug("client_connected", client=client.id, cred_pid=client.cred_pid)

    def _admit_from_namespace(self, client: LibraryClient) -> bool:
        """A channel only for a process of a container attached to the overlay, and at most
        max_per_netns per container: one container's processes could otherwise keep the
        others' libraries off the router (they would stay on the overlay). Namespaces are free
        to make, so a namespace no overlay veth leads to gets none: it holds no overlay address
        and has nothing to switch. Without the ownership check (unit tests) namespaces are not
        known and only max_clients applies."""
        if self.owners is None:
            return True
        reason = None
        nsid = client.nsid
        if self.attachments is not None and not self.attachments.attached(nsid):
            reason = "network namespace attached to no overlay address"
            if client.ns_key is None:
                reason += f" ({client.owner_error})"
        elif nsid is not None and self.per_container[nsid] >= self.max_per_netns:
            reason = "too many clients from one network namespace (container)"
        if reason is None:
            if nsid is not None:
                self.per_container[nsid] += 1
            return True
        self.rejected += 1
        if client.ns_key is not None:
            self.owners.detach(client.ns_key)
        client.sock.close()
        log.warning(
            "client_rejected",
            reason=reason,
            limit=self.max_per_netns,
            cred_pid=client.cred_pid,
            nsid=nsid,
        )
        return False

    def close(self) -> None:
        for client in list(self.clients.values()):
            if not client.native:  # those the native switch path closes itself
                client.close("router shutting down")
        if self._sock is not None:
            self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            self.path.unlink(missing_ok=True)
