# Peer-router authentication (docs/wire.md section 2): the cluster key, OFFER/ANSWER MACs, the
# time window and the replay cache.
#
# Why an HMAC in the one OFFER frame rather than a challenge-response: a challenge costs one more
# round trip on every switch, and the switch time is what ShuntFlow sells. A fresh random nonce
# plus the sender's timestamp give the same replay protection with one frame each way, provided
# the responder remembers every nonce it accepted for as long as the timestamp would still pass
# the window check; after that the window check itself refuses the frame, so the cache stays
# bounded by (offers per second) x (2 x window).
# Why the MAC also covers the underlay TCP 4-tuple (read from the socket, never sent): the
# accepted OFFER's connection *becomes* the host connection. Without the binding, someone who
# sees an OFFER on the underlay could race it over their own TCP connection and be handed the
# application's stream; with it, a copy is only valid on the very connection it was made for.

from __future__ import annotations

import heapq
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from shuntflow.wire import PEER_NONCE_SIZE, MsgType, PeerMsg, Status, Tuple4

MIN_KEY_BYTES = 32


class ClusterKeyError(ValueError):
    """The cluster key file cannot be used; one line for the user."""


def load_cluster_key(path: Path) -> bytes:
    """The key bytes (surrounding whitespace stripped); refuses group/other access."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ClusterKeyError(f"cluster key {path}: no such file") from None
    except OSError as exc:
        raise ClusterKeyError(f"cluster key {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ClusterKeyError(f"cluster key {path}: not a regular file")
        if st.st_mode & 0o077:
            raise ClusterKeyError(
                f"cluster key {path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others "
                "read it; chmod 600"
            )
        data = os.read(fd, 4097)
    finally:
        os.close(fd)
    key = data.strip()
    if len(data) > 4096:
        raise ClusterKeyError(f"cluster key {path}: longer than 4096 bytes")
    if len(key) < MIN_KEY_BYTES:
        raise ClusterKeyError(
            f"cluster key {path}: {len(key)} bytes, need at least {MIN_KEY_BYTES}"
        )
    return key


def write_cluster_key(path: Path) -> None:
    """A fresh random key (64 hex characters), created 0600 whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
    finally:
        os.close(fd)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def make_offer(key: bytes, seq: int, tup: Tuple4, binding: bytes = b"") -> PeerMsg:
    return PeerMsg(
        MsgType.OFFER, Status.OK, seq, tup, now_ms(), secrets.token_bytes(PEER_NONCE_SIZE)
    ).signed(key, binding)


def make_answer(key: bytes, offer: PeerMsg, status: Status, binding: bytes = b"") -> PeerMsg:
    """Bound to `offer` by its nonce; the MAC proves the responder holds the key too."""
    return PeerMsg(
        MsgType.ANSWER, status, offer.seq, offer.tuple, offer.timestamp_ms, offer.nonce
    ).signed(key, binding)


def answer_matches(key: bytes, offer: PeerMsg, answer: PeerMsg, binding: bytes = b"") -> str | None:
    """None if `answer` is the authentic answer to `offer`, else why not."""
    if answer.type is not MsgType.ANSWER:
        return f"expected ANSWER, got {answer.type.name}"
    if not answer.verify(key, binding):
        return "ANSWER MAC invalid (peer has another cluster key)"
    if answer.nonce != offer.nonce or answer.tuple != offer.tuple or answer.seq != offer.seq:
        return "ANSWER does not match the OFFER"
    return None


@dataclass
class OfferVerdict:
    ok: bool
    reason: str = ""


class OfferChecker:
    """MAC, time window and replay cache for incoming OFFERs."""

    def __init__(self, key: bytes, window_ms: int, max_nonces: int) -> None:
        self.key = key
        self.window_ms = window_ms
        self.max_nonces = max_nonces
        self._seen: set[bytes] = set()
        self._expiry: list[tuple[int, bytes]] = []  # heap of (drop after, nonce)

    def _expire(self, now: int) -> None:
        while self._expiry and self._expiry[0][0] < now:
            _, nonce = heapq.heappop(self._expiry)
            self._seen.discard(nonce)

    def check(self, offer: PeerMsg, binding: bytes = b"", now: int | None = None) -> OfferVerdict:
        """Accept each authentic OFFER once; a False verdict says why (for the log).

        `binding`: the underlay connection it arrived on (wire.underlay_binding)."""
        if not offer.verify(self.key, binding):
            return OfferVerdict(False, "bad MAC")
        now = now_ms() if now is None else now
        skew = offer.timestamp_ms - now
        if abs(skew) > self.window_ms:
            return OfferVerdict(False, f"timestamp {skew:+d} ms off, window {self.window_ms} ms")
        self._expire(now)
        if offer.nonce in self._seen:
            return OfferVerdict(False, "replayed nonce")
        if len(self._seen) >= self.max_nonces:
            # Evicting a live nonce would reopen it to replay: refuse instead (fail-open: the
            # connection stays on the overlay) until old ones age out of the window.
            return OfferVerdict(False, f"replay cache full ({self.max_nonces} nonces)")
        self._seen.add(offer.nonce)
        # After timestamp + window the window check refuses the frame on its own.
        heapq.heappush(self._expiry, (offer.timestamp_ms + self.window_ms, offer.nonce))
        return OfferVerdict(True)

    def __len__(self) -> int:
        return len(self._seen)
