"""The router's security pieces on their own: cluster key files, OFFER authentication (MAC,
time window, replay cache), allow/deny policy rules, the sock_diag ownership check on real
loopback connections, and where the socket guard finds cgroup v2. (Two routers with different
keys: tests/router/test_router_keys.py; the guard's programs: tests/integration.)"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest

from shuntflow.router.auth import (
    ClusterKeyError,
    OfferChecker,
    answer_matches,
    load_cluster_key,
    make_answer,
    make_offer,
    now_ms,
    write_cluster_key,
)
from shuntflow.router.guard import GuardError, cgroup2_root
from shuntflow.router.ownership import OwnershipChecker
from shuntflow.router.policy import Policy, PolicyError, Rule
from shuntflow.router.testing import write_key_file
from shuntflow.wire import Status, Tuple4, underlay_binding

KEY = b"0123456789abcdef0123456789abcdef"
T = Tuple4.parse("198.19.1.2:40001", "198.19.2.3:80")


# -- cluster key files ----------------------------------------------------------------------


def test_written_key_is_0600_and_loads(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_cluster_key(tmp_path / "k")
    finally:
        os.umask(old)
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert len(load_cluster_key(tmp_path / "k")) == 64
    with pytest.raises(FileExistsError):
        write_cluster_key(tmp_path / "k")  # never overwrites a key


@pytest.mark.parametrize(
    ("mode", "content", "match"),
    [
        (0o644, KEY, "mode 0644 lets group or others read it"),
        (0o604, KEY, "mode 0604"),
        (0o600, b"short\n", "5 bytes, need at least 32"),
        (0o600, b"x" * 5000, "longer than 4096"),
    ],
)
def test_bad_key_files(tmp_path: Path, mode: int, content: bytes, match: str) -> None:
    path = write_key_file(tmp_path / "k", content)
    os.chmod(path, mode)
    with pytest.raises(ClusterKeyError, match=match):
        load_cluster_key(path)


def test_key_must_be_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(ClusterKeyError, match="no such file"):
        load_cluster_key(tmp_path / "missing")
    (tmp_path / "d").mkdir(mode=0o700)
    with pytest.raises(ClusterKeyError, match="not a regular file"):
        load_cluster_key(tmp_path / "d")
    write_key_file(tmp_path / "real", KEY)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ClusterKeyError):
        load_cluster_key(tmp_path / "link")


# -- OFFER authentication -------------------------------------------------------------------


def test_offer_accepted_once_then_replay_refused() -> None:
    checker = OfferChecker(KEY, window_ms=10_000, max_nonces=100)
    offer = make_offer(KEY, 1, T)
    assert checker.check(offer).ok
    verdict = checker.check(offer)
    assert not verdict.ok and verdict.reason == "replayed nonce"
    assert checker.check(make_offer(KEY, 1, T)).ok  # same tuple, fresh nonce: fine


def test_offer_with_wrong_key_or_tampered_tuple() -> None:
    checker = OfferChecker(KEY, 10_000, 100)
    assert checker.check(make_offer(b"y" * 32, 1, T)).reason == "bad MAC"
    good = make_offer(KEY, 1, T)
    assert checker.check(replace(good, tuple=T.mirrored())).reason == "bad MAC"
    assert checker.check(replace(good, timestamp_ms=good.timestamp_ms + 1)).reason == "bad MAC"


def test_offer_is_valid_only_on_its_own_underlay_connection() -> None:
    """A copy of an OFFER raced over another TCP connection fails: the MAC covers the underlay
    4-tuple both routers read from their socket."""
    checker = OfferChecker(KEY, 10_000, 100)
    mine = underlay_binding(("198.18.0.1", 40000), ("198.18.0.2", 4790))
    other = underlay_binding(("198.18.0.1", 40001), ("198.18.0.2", 4790))
    offer = make_offer(KEY, 1, T, mine)
    assert checker.check(offer, other).reason == "bad MAC"
    assert checker.check(offer).reason == "bad MAC"
    assert checker.check(offer, mine).ok
    answer = make_answer(KEY, offer, Status.OK, mine)
    assert answer_matches(KEY, offer, answer, mine) is None
    assert "MAC invalid" in (answer_matches(KEY, offer, answer, other) or "")


def test_offer_time_window() -> None:
    checker = OfferChecker(KEY, window_ms=1000, max_nonces=100)
    offer = make_offer(KEY, 1, T)
    assert "window 1000 ms" in checker.check(offer, now=offer.timestamp_ms + 1001).reason
    assert "window" in checker.check(offer, now=offer.timestamp_ms - 1001).reason
    assert checker.check(offer, now=offer.timestamp_ms + 999).ok


def test_replay_cache_is_bounded_and_expires() -> None:
    checker = OfferChecker(KEY, window_ms=1000, max_nonces=3)
    now = now_ms()
    offers = [make_offer(KEY, i, T) for i in range(4)]
    for o in offers[:3]:
        assert checker.check(o, now=now).ok
    full = checker.check(offers[3], now=now)
    assert not full.ok and "replay cache full" in full.reason
    # Once the window has passed, the old nonces go (their frames fail the window anyway).
    # The offers' clocks may differ by a millisecond: the window must have passed for all.
    later = max(o.timestamp_ms for o in offers[:3]) + 1001
    assert "window" in checker.check(offers[0], now=later).reason
    fresh = replace(make_offer(KEY, 9, T), timestamp_ms=later).signed(KEY)
    assert checker.check(fresh, now=later).ok
    assert len(checker) == 1


def test_answer_binds_to_its_offer() -> None:
    offer = make_offer(KEY, 5, T)
    answer = make_answer(KEY, offer, Status.OK)
    assert answer_matches(KEY, offer, answer) is None
    other = make_offer(KEY, 5, T)
    assert answer_matches(KEY, other, answer) == "ANSWER does not match the OFFER"
    assert "MAC invalid" in (answer_matches(KEY, offer, make_answer(b"z" * 32, offer, 0)) or "")


# -- policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "net", "ports"),
    [
        ("198.19.2.0/24", "198.19.2.0/24", (0, 65535)),
        ("198.19.2.7", "198.19.2.7/32", (0, 65535)),
        ("198.19.0.0/16:6379", "198.19.0.0/16", (6379, 6379)),
        (":11211", "0.0.0.0/0", (11211, 11211)),
        ("*:8000-8100", "0.0.0.0/0", (8000, 8100)),
    ],
)
def test_rule_parse(text: str, net: str, ports: tuple[int, int]) -> None:
    rule = Rule.parse(text)
    assert str(rule.net) == net and (rule.first_port, rule.last_port) == ports


@pytest.mark.parametrize(
    "text", ["", "*", "198.19.0.0/33", "nope", ":0", ":70000", ":90-80", "1.2.3.4:x", "::1"]
)
def test_bad_rules(text: str) -> None:
    with pytest.raises(PolicyError, match="policy rule"):
        Rule.parse(text)


def test_policy_deny_wins_and_matches_either_end() -> None:
    t = Tuple4.parse("198.19.1.1:40000", "198.19.2.1:6379")
    assert Policy().refusal(t) is None  # default: everything
    deny = Policy.parse((), (":6379",))
    assert deny.refusal(t) == "policy: deny rule :6379"
    assert deny.refusal(t.mirrored()) == "policy: deny rule :6379"  # from the server's side
    assert deny.refusal(Tuple4.parse("198.19.1.1:40000", "198.19.2.1:80")) is None
    allow = Policy.parse(("198.19.2.0/24:6379",), ())
    assert allow.refusal(t) is None and allow.refusal(t.mirrored()) is None
    assert allow.refusal(Tuple4.parse("198.19.1.1:1", "198.19.3.1:6379")) == (
        "policy: no allow rule matches"
    )
    both = Policy.parse(("198.19.0.0/16",), ("198.19.2.1",))
    assert both.refusal(t) == "policy: deny rule 198.19.2.1"


# -- ownership via sock_diag ----------------------------------------------------------------


def test_ownership_of_real_connections() -> None:
    checker = OwnershipChecker()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs, socket.create_server(("127.0.0.1", 0)) as listener:
        ns, pid = checker.attach(theirs)
        assert pid == os.getpid() and ns == checker.own_ns and checker.namespaces() == 1
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        server, _ = listener.accept()
        t = Tuple4.parse("{}:{}".format(*client.getsockname()), f"127.0.0.1:{port}")
        assert checker.owns(ns, t).reason == "ESTABLISHED"
        assert checker.owns(ns, t.mirrored()).ok
        # The listener on the local port is not a connection to some other peer.
        fake = Tuple4.parse(f"127.0.0.1:{port}", "127.0.0.1:5555")
        assert "no such TCP connection" in checker.owns(ns, fake).reason
        client.shutdown(socket.SHUT_WR)
        time.sleep(0.05)
        assert checker.owns(ns, t).reason == "FIN_WAIT2"
        assert checker.owns(ns, t.mirrored()).reason == "CLOSE_WAIT"
        client.close()
        time.sleep(0.05)
        assert "closed by its process" in checker.owns(ns, t).reason
        server.close()
        time.sleep(0.05)
        assert not checker.owns(ns, t.mirrored()).ok
        checker.detach(ns)
        assert checker.namespaces() == 0
        assert checker.owns(ns, t).reason == "namespace not attached"
    checker.close()


# -- the socket guard -----------------------------------------------------------------------


def test_cgroup2_root_in_both_layouts() -> None:
    unified = (
        "29 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
        "30 29 0:26 /sys.slice /run/x rw shared:4 - cgroup2 cgroup2 rw\n"
    )
    hybrid = (
        "25 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n"
        "26 25 0:23 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
        "27 25 0:24 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    )
    assert cgroup2_root(unified) == Path("/sys/fs/cgroup")
    assert cgroup2_root(hybrid) == Path("/sys/fs/cgroup/unified")
    with pytest.raises(GuardError, match="no cgroup v2"):
        cgroup2_root("26 25 0:23 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")
