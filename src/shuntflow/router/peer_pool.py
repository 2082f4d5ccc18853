# Warm connections to peer routers, so that a switch does not wait for a TCP handshake and the
# peer router's accept().
#
# Why: on the testbed, connect() plus the peer's accept took ~240 µs of a ~1.4 ms switch, on the
# path the p99 <= 1 ms target is about. A pooled connection is an idle, connected TCP socket to
# the peer router's port, on which the peer waits for an OFFER (up to its idle timeout, see
# PeerListener). A connection carries one OFFER and then becomes the host connection, so the pool
# refills in the background after each take. A connection is used only while younger than half
# the peer's idle timeout, so the initiator never races the peer closing an idle one. Only peers
# this router switched to recently get a pool: an idle cluster holds no connections.

from __future__ import annotations

import asyncio
import collections
import socket
import time

from shuntflow.router.logfmt import get_logger
from shuntflow.router.peer import PeerConnectError, connect_peer

log = get_logger()

KEEP_WARM_S = 60.0  # a peer switched to within this long keeps its pool filled
# The refill waits a little: connecting at once would compete on this event loop (and the peer's)
# with the very switch that took the connection.
REFILL_DELAY_S = 0.005


def _alive(sock: socket.socket) -> bool:
    """An idle pooled connection has nothing to read; EOF or an error means the peer dropped it."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # EOF, or bytes the peer never should have sent


class PeerPool:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        source_ip: str,
        port: int,
        size: int,
        max_age: float,
        connect_timeout: float,
    ) -> None:
        self.loop = loop
        self.source_ip = source_ip
        self.port = port
        self.size = size
        self.max_age = max_age
        self.connect_timeout = connect_timeout
        self._idle: dict[str, collections.deque[tuple[float, socket.socket]]] = {}
        self._last_use: dict[str, float] = {}
        self._filling: dict[str, asyncio.Task[None]] = {}
        self.hits = 0
        self.misses = 0

    def take(self, peer: str) -> socket.socket | None:
        """A live connection to `peer`'s router, or None (the caller connects itself)."""
        if self.size <= 0:
            return None
        now = time.monotonic()
        self._last_use[peer] = now
        idle = self._idle.get(peer)
        found = None
        while idle:
            born, sock = idle.popleft()
            if now - born < self.max_age and _alive(sock):
                found = sock
                break
            sock.close()
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        if peer not in self._filling:
            self.loop.call_later(REFILL_DELAY_S, self._refill, peer)
        return found

    def forget(self, peer: str) -> None:
        """The peer failed: drop its connections and stop keeping it warm."""
        self._last_use.pop(peer, None)
        task = self._filling.pop(peer, None)
        if task is not None:
            task.cancel()
        for _, sock in self._idle.pop(peer, ()):
            sock.close()

    def maintain(self) -> None:
        """Periodic: drop aged connections; refill peers in use, forget the others."""
        now = time.monotonic()
        for peer in list(self._idle):
            idle = self._idle[peer]
            while idle and now - idle[0][0] >= self.max_age:
                idle.popleft()[1].close()
            if now - self._last_use.get(peer, 0.0) < KEEP_WARM_S:
                self._refill(peer)
            elif not idle:
                del self._idle[peer]
                self._last_use.pop(peer, None)

    def _refill(self, peer: str) -> None:
        if peer not in self._filling and len(self._idle.get(peer, ())) < self.size:
            task = self.loop.create_task(self._fill(peer))
            self._filling[peer] = task
            task.add_done_callback(lambda t: self._fill_done(peer, t))

    def _fill_done(self, peer: str, task: asyncio.Task[None]) -> None:
        if self._filling.get(peer) is task:
            del self._filling[peer]

    async def _fill(self, peer: str) -> None:
        idle = self._idle.setdefault(peer, collections.deque())
        while len(idle) < self.size:
            try:
                sock = await connect_peer(
                    self.loop, self.source_ip, peer, self.port, self.connect_timeout
                )
            except PeerConnectError as exc:
                log.debug("peer_pool_connect_failed", peer=peer, detail=str(exc))
                return
            idle.append((time.monotonic(), sock))

    def describe(self) -> dict[str, object]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "idle": {peer: len(q) for peer, q in self._idle.items()},
        }

    async def close(self) -> None:
        tasks = list(self._filling.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for idle in self._idle.values():
            for _, sock in idle:
                sock.close()
        self._idle.clear()
