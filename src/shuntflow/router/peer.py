# The router <-> router conversation (docs/wire.md section 2): OFFER one way, ANSWER back, and
# then the very same TCP connection is the application's host connection.
#
# Why it is written with raw non-blocking sockets and loop.sock_* calls: a router must never
# read past the one frame it expects (the next bytes belong to the libraries), so there
# is no buffered reader here, only "recv at most what is still missing". Every read has a
# deadline so a slow or silent peer (slowloris) costs a task for at most a couple of seconds.
# The initiator side binds its source to --host-ip so the connection leaves from the host's
# underlay address, which the responder checks against its overlay map.
# Authentication (auth.py): a source address that is not an allowed peer is closed before a byte
# is read; an OFFER whose MAC, timestamp or nonce fails is closed without an ANSWER (a rogue
# learns nothing, not even whether the tuple exists); the initiator accepts only an ANSWER MAC'd
# with the cluster key over its own OFFER's nonce.
# Why connections still waiting for their first byte are evicted, oldest first, rather than new
# ones refused: a peer's pool keeps a few such connections open by design, so an idle connection
# looks like a peer's; but anyone on an allowed source can open thousands. When one source holds
# more than max_idle_per_peer of them, or the listener is full, the oldest one idle for over
# IDLE_AGE (no byte pending) goes. A real OFFER follows its connect within milliseconds, so a
# peer's burst of fresh offers is left alone, and a peer whose pooled connection was evicted
# offers again on a new connection.

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shuntflow.router.auth import OfferChecker, answer_matches, make_answer, make_offer
from shuntflow.router.library_channel import RouterSetupError
from shuntflow.router.logfmt import get_logger
from shuntflow.wire import (
    PEER_SIZE,
    MsgType,
    PeerMsg,
    Status,
    Tuple4,
    WireError,
    underlay_binding,
)

log = get_logger()

# Linux: don't reserve an ephemeral port at bind() time, pick it at connect() (no exhaustion
# from bind-before-connect). Not exported by Python 3.11's socket module.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# A connection without a byte for this long is idle (pooled, or a flood), not an OFFER on its way:
# an initiator waits 2 s for its ANSWER (answer_timeout_ms), so a later OFFER is dead anyway.
IDLE_AGE = 2.0


class PeerClosed(EOFError):
    """The peer closed the connection before a whole frame arrived."""

    def __init__(self, message: str, nothing: bool) -> None:
        super().__init__(message)
        self.nothing = nothing  # not one byte of the frame came


async def send_frame(loop: asyncio.AbstractEventLoop, sock: socket.socket, frame: bytes) -> None:
    """A frame is tiny and the send buffer nearly always has room: try before waiting, which
    saves an event-loop round on the switch path."""
    try:
        sent = sock.send(frame)
    except BlockingIOError:
        sent = 0
    if sent < len(frame):
        await loop.sock_sendall(sock, frame[sent:])


async def read_exact(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int, head: bytes = b""
) -> bytes:
    """Exactly `size` bytes, `head` being the first of them; never one more."""
    buf = bytearray(head)
    while len(buf) < size:
        try:  # already there: no event-loop round
            chunk = sock.recv(size - len(buf))
        except BlockingIOError:
            chunk = await loop.sock_recv(sock, size - len(buf))
        if not chunk:
            raise PeerClosed(f"connection closed after {len(buf)} of {size} bytes", not buf)
        buf += chunk
    return bytes(buf)


@dataclass(frozen=True)
class OfferResult:
    status: Status
    sock: socket.socket | None = None
    detail: str = ""
    unanswered: bool = False  # the connection failed before any byte of an ANSWER came


class PeerConnectError(OSError):
    """No TCP connection to the peer router (refused, unreachable, timed out)."""


async def connect_peer(
    loop: asyncio.AbstractEventLoop, source_ip: str, peer_ip: str, peer_port: int, timeout: float
) -> socket.socket:
    """A connected, non-blocking TCP socket from `source_ip` to the peer router."""
    sock = socket.socket(
        socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    )
    try:
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
        except OSError as exc:
            raise RouterSetupError(f"bind {source_ip}: {exc.strerror}") from None
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (peer_ip, peer_port))
        except TimeoutError:
            raise PeerConnectError("connect timed out") from None
        except OSError as exc:
            raise PeerConnectError(f"connect: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def send_offer(
    loop: asyncio.AbstractEventLoop,
    key: bytes,
    source_ip: str,
    peer_ip: str,
    peer_port: int,
    tup: Tuple4,
    seq: int,
    connect_timeout: float,
    answer_timeout: float,
    pooled: socket.socket | None = None,
) -> OfferResult:
    """OFFER `tup` (initiator's view) to the peer router and read its one ANSWER, on `pooled`
    (a warm connection from PeerPool) or on a new connection.

    A pooled connection the peer closed before answering is not the peer's failure (it may have
    restarted): the offer is made again on a new connection. On status OK the connected socket is
    returned and now belongs to the caller."""
    if pooled is not None:
        res = await _offer_on(loop, key, pooled, tup, seq, answer_timeout)
        if not res.unanswered:
            return res
    try:
        sock = await connect_peer(loop, source_ip, peer_ip, peer_port, connect_timeout)
    except PeerConnectError as exc:
        return OfferResult(Status.PEER_UNREACHABLE, detail=str(exc))
    except RouterSetupError as exc:
        return OfferResult(Status.INTERNAL, detail=str(exc))
    return await _offer_on(loop, key, sock, tup, seq, answer_timeout)


async def _offer_on(
    loop: asyncio.AbstractEventLoop,
    key: bytes,
    sock: socket.socket,
    tup: Tuple4,
    seq: int,
    answer_timeout: float,
) -> OfferResult:
    """The OFFER/ANSWER exchange on a connected socket, which is closed unless the answer is OK."""
    keep = False
    try:
        try:
            # The MAC binds the OFFER to this very TCP connection (auth.py).
            binding = underlay_binding(sock.getsockname(), sock.getpeername())
        except OSError as exc:
            return OfferResult(
                Status.PEER_UNREACHABLE, detail=f"connect: {exc.strerror}", unanswered=True
            )
        offer = make_offer(key, seq, tup, binding)
        try:
            async with asyncio.timeout(answer_timeout):
                await send_frame(loop, sock, offer.pack())
                data = await read_exact(loop, sock, PEER_SIZE)
        except TimeoutError:
            return OfferResult(Status.TIMEOUT, detail="no ANSWER in time")
        except PeerClosed as exc:
            return OfferResult(
                Status.PEER_UNREACHABLE, detail=f"offer exchange: {exc}", unanswered=exc.nothing
            )
        except OSError as exc:
            return OfferResult(
                Status.PEER_UNREACHABLE, detail=f"offer exchange: {exc}", unanswered=True
            )
        try:
            answer = PeerMsg.unpack(data)
        except WireError as exc:
            return OfferResult(Status.INTERNAL, detail=f"bad ANSWER: {exc}")
        mismatch = answer_matches(key, offer, answer, binding)
        if mismatch is not None:
            return OfferResult(Status.INTERNAL, detail=mismatch)
        try:
            status = Status(answer.status)
        except ValueError:
            return OfferResult(Status.INTERNAL, detail=f"unknown ANSWER status {answer.status}")
        if status is Status.OK:
            keep = True
            return OfferResult(Status.OK, sock)
        return OfferResult(status, detail="answered by the peer router")
    finally:
        if not keep:
            sock.close()


async def send_answer(
    loop: asyncio.AbstractEventLoop,
    key: bytes,
    sock: socket.socket,
    offer: PeerMsg,
    status: Status,
    timeout: float,
) -> bool:
    """Send the ANSWER for `offer`; False if the initiator is gone."""
    try:
        binding = underlay_binding(sock.getpeername(), sock.getsockname())
    except OSError:
        return False
    frame = make_answer(key, offer, status, binding).pack()
    try:
        async with asyncio.timeout(timeout):
            await send_frame(loop, sock, frame)
    except (OSError, TimeoutError):
        return False
    return True


# Called with (connection, source ip, authenticated OFFER); True if it took the connection.
OfferHandler = Callable[[socket.socket, str, PeerMsg], Awaitable[bool]]
# Called with a source ip at accept; None if it may be a peer router, else why not.
PeerAdmission = Callable[[str], Awaitable[str | None]]


class PeerListener:
    """TCP listener on --host-ip:--peer-port; reads one OFFER per connection, with deadlines."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host_ip: str,
        port: int,
        on_offer: OfferHandler,
        read_timeout: float,
        idle_timeout: float,
        max_incoming: int,
        admit: PeerAdmission,
        checker: OfferChecker,
        max_idle_per_peer: int = 64,
    ) -> None:
        self.loop = loop
        self.admit = admit
        self.checker = checker
        self.rejected_peers = 0  # connections from addresses that are not allowed peers
        self.rejected_offers = 0  # OFFERs failing MAC, time window or replay check
        self.host_ip = host_ip
        self.port = port
        self.on_offer = on_offer
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.max_incoming = max_incoming
        self.handlers: set[asyncio.Task[None]] = set()
        self.max_idle_per_peer = max_idle_per_peer
        self.waiting: dict[socket.socket, tuple[str, float]] = {}  # no byte yet: source, since
        self.waiting_per_peer: Counter[str] = Counter()
        self.evicted: dict[socket.socket, str] = {}  # -> why
        self.evictions = 0
        self.dropped = 0
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        sock = socket.socket(
            socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host_ip, self.port))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            raise RouterSetupError(
                f"cannot listen on {self.host_ip}:{self.port}: {exc.strerror}"
            ) from None
        self._sock = sock
        self._accept_task = self.loop.create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, addr = await self.loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                log.error("peer_accept_failed", error=exc.strerror or str(exc))
                await asyncio.sleep(0.05)
                continue
            if len(self.handlers) >= self.max_incoming and not self._evict_idle(
                None, f"{self.max_incoming} offers being read: the oldest idle one goes", IDLE_AGE
            ):
                self.dropped += 1
                conn.close()
                log.warning("peer_dropped", peer=addr[0], reason="too many incoming offers")
                continue
            conn.setblocking(False)
            task = self.loop.create_task(self._handle(conn, str(addr[0]), int(addr[1])))
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)

    async def _handle(self, conn: socket.socket, peer: str, port: int) -> None:
        taken = False
        try:
            why = await self.admit(peer)
            if why is not None:
                self.rejected_peers += 1
                log.warning("peer_rejected", peer=f"{peer}:{port}", reason=why)
                return
            if self.waiting_per_peer[peer] >= self.max_idle_per_peer:
                self._evict_idle(
                    peer,
                    f"source holds more than {self.max_idle_per_peer} idle connections",
                    IDLE_AGE,
                )
            self.waiting[conn] = (peer, time.monotonic())
            self.waiting_per_peer[peer] += 1
            # A peer's pool keeps connections idle until a switch needs one (peer_pool.py), so
            # the first byte may take up to idle_timeout; the rest of the frame may not dawdle.
            try:
                async with asyncio.timeout(self.idle_timeout):
                    head = await self.loop.sock_recv(conn, PEER_SIZE)
            except TimeoutError:
                self._drop(peer, port, f"idle for {self.idle_timeout:g}s without an OFFER")
                return
            finally:
                self._unwait(conn)
            evicted = self.evicted.pop(conn, None)
            if evicted is not None:
                self._drop(peer, port, f"evicted before its OFFER: {evicted}")
                return
            if not head:
                # Not an offence: a peer's pool lets aged connections go this way.
                log.info("peer_closed_idle", peer=f"{peer}:{port}")
                return
            async with asyncio.timeout(self.read_timeout):
                data = await read_exact(self.loop, conn, PEER_SIZE, head)
            msg = PeerMsg.unpack(data)
            if msg.type is not MsgType.OFFER:
                raise WireError(f"expected OFFER, got {msg.type.name}")
            verdict = self.checker.check(msg, underlay_binding((peer, port), conn.getsockname()))
            if not verdict.ok:
                self.rejected_offers += 1
                log.warning(
                    "offer_rejected",
                    peer=f"{peer}:{port}",
                    tuple=msg.tuple,
                    seq=msg.seq,
                    reason=verdict.reason,
                )
                return
            taken = await self.on_offer(conn, peer, msg)
        except TimeoutError:
            self._drop(peer, port, f"no complete OFFER within {self.read_timeout:g}s")
        except PeerClosed as exc:
            self._drop(peer, port, str(exc))
        except WireError as exc:
            self._drop(peer, port, str(exc))
        except OSError as exc:
            self._drop(peer, port, f"socket error: {exc.strerror or exc}")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.error("offer_handler_error", exc=True, peer=peer)
        finally:
            self._unwait(conn)
            self.evicted.pop(conn, None)
            if not taken:
                conn.close()

    def _unwait(self, conn: socket.socket) -> None:
        entry = self.waiting.pop(conn, None)
        if entry is not None:
            peer = entry[0]
            self.waiting_per_peer[peer] -= 1
            if self.waiting_per_peer[peer] <= 0:
                del self.waiting_per_peer[peer]

    def _evict_idle(self, peer: str | None, why: str, min_age: float) -> bool:
        """Shut the oldest waiting connection (of `peer`, or any) with no byte pending that has
        waited min_age seconds; its handler then reads EOF and logs the eviction. False if there
        is none."""
        now = time.monotonic()
        for conn, (source, since) in self.waiting.items():
            if now - since < min_age:
                return False  # oldest first: the rest are younger
            if peer is not None and source != peer:
                continue
            try:
                if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    continue  # its OFFER is in: not idle
            except BlockingIOError:
                pass
            except OSError:
                pass  # already broken: evicting it costs nothing
            self._unwait(conn)
            self.evicted[conn] = why
            self.evictions += 1
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            return True
        return False

    def _drop(self, peer: str, port: int, reason: str) -> None:
        self.dropped += 1
        log.warning("peer_dropped", peer=f"{peer}:{port}", reason=reason)

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
        tasks = list(self.handlers)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, *(t for t in [self._accept_task] if t), return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
