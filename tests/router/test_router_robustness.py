"""The router survives its clients: garbage on the library socket and on the peer port drops
that one client (logged with the reason) and everybody else keeps being served; a dead peer
host is backed off instead of stormed; SIGTERM removes the sockets."""

from __future__ import annotations

import array
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from shuntflow.router.testing import TEST_KEY, FakeLibrary, RouterProcess, free_port
from shuntflow.wire import MSG_MAGIC, PEER_MAGIC, Msg, MsgType, PeerMsg, Status, Tuple4

from .support import start_pair

pytestmark = pytest.mark.router

MAP = {"198.19.1.0/24": "127.0.0.1", "198.19.2.0/24": "127.0.0.2", "198.19.3.0/24": "127.0.0.3"}


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RouterProcess, RouterProcess, int]]:
    a, b, port = start_pair(tmp_path_factory.mktemp("rt-robust"), MAP)
    yield a, b, port
    b.stop()
    a.stop()


def switch_works(a: RouterProcess, b: RouterProcess, i: int) -> None:
    t = Tuple4.parse(f"198.19.1.5:{10000 + i}", "198.19.2.5:443")
    with FakeLibrary(a.socket) as la, FakeLibrary(b.socket, owned={t.mirrored()}) as lb:
        res = la.wait_result(la.request(t))
        assert res.msg.status == Status.OK, Status(res.msg.status).name
        lb.wait_host([t.key()])


def raw_frame(magic: int = MSG_MAGIC, kind: int = MsgType.HELLO, seq: int = 0) -> bytes:
    raw = bytearray(Msg(MsgType.HELLO, seq=seq, pid=os.getpid()).pack())
    raw[0:4] = magic.to_bytes(4, "little")
    raw[4:6] = kind.to_bytes(2, "little")
    return bytes(raw)


def wait_closed(sock: socket.socket, timeout: float = 3.0) -> None:
    """The router closed this client: recv sees EOF (frames it sent before are skipped)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sock.recv(4096) == b"":
                return
        except ConnectionResetError:
            return
    raise AssertionError("router did not close the client")


def wait_log(r: RouterProcess, needle: str, timeout: float = 3.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in r.log().splitlines():
            if needle in line:
                return line
        time.sleep(0.02)
    raise AssertionError(f"{needle!r} not in log:\n{r.log()[-3000:]}")


HELLO = raw_frame()
GARBAGE_UNIX = [
    ("short", [b"\x01" * 10], "frame is 10 bytes"),
    ("long", [HELLO + b"\0"], "frame is 49 bytes"),
    ("very long", [HELLO * 20], "frame is more than 48 bytes"),
    ("empty-ish", [b"\0"], "frame is 1 bytes"),
    ("bad magic", [raw_frame(magic=0xDEADBEEF)], "bad magic 0xdeadbeef"),
    ("peer magic", [raw_frame(magic=PEER_MAGIC, kind=MsgType.OFFER)], "bad magic"),
    ("unknown type", [raw_frame(kind=99)], "unknown frame type 99"),
    ("router-only type", [HELLO, raw_frame(kind=MsgType.CLAIM_REQ)], "may not come from a library"),
    ("hello ack", [raw_frame(kind=MsgType.HELLO_ACK)], "may not come from a library"),
    ("no hello", [raw_frame(kind=MsgType.SWITCH_REQ)], "first frame must be HELLO"),
    ("calls, no hello", [raw_frame(kind=MsgType.SWITCH_CALLS)], "first frame must be HELLO"),
    ("two hellos", [HELLO, HELLO], "second HELLO"),
    ("unknown claim", [HELLO, raw_frame(kind=MsgType.CLAIM_RES, seq=0x8FFF_0000)], "never sent"),
    ("claim low seq", [HELLO, raw_frame(kind=MsgType.CLAIM_RES, seq=5)], "never sent"),
    ("unknown stats", [HELLO, raw_frame(kind=MsgType.CONN_INFO, seq=0x8FFF_0001)], "never sent"),
]


@pytest.mark.parametrize(
    ("name", "frames", "reason"), GARBAGE_UNIX, ids=[g[0] for g in GARBAGE_UNIX]
)
def test_library_garbage_drops_only_that_client(
    env: tuple[RouterProcess, RouterProcess, int], name: str, frames: list[bytes], reason: str
) -> None:
    a, b, _port = env
    # A well-behaved library connected before the garbage keeps working after it.
    index = [g[0] for g in GARBAGE_UNIX].index(name)
    t = Tuple4.parse(f"198.19.1.6:{20000 + index}", "198.19.2.6:443")
    with FakeLibrary(a.socket) as bystander, FakeLibrary(b.socket, owned={t.mirrored()}):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as bad:
            bad.connect(str(a.socket))
            for frame in frames:
                bad.send(frame)
            wait_closed(bad)
        line = wait_log(a, reason)
        assert "event=client_dropped" in line and "level=warning" in line
        res = bystander.wait_result(bystander.request(t))
        assert res.msg.status == Status.OK
        assert not bystander.closed_by_router.is_set()


def test_library_passing_fds_is_dropped_and_fd_not_kept(
    env: tuple[RouterProcess, RouterProcess, int],
) -> None:
    a, b, _port = env
    before = a.settled_fd_count()
    r, w = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as bad:
            bad.connect(str(a.socket))
            bad.sendmsg([HELLO], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]))])
            wait_closed(bad)
    finally:
        os.close(r)
        os.close(w)
    wait_log(a, "passed file descriptors")
    assert a.settled_fd_count(target=before) == before, a.fds()
    switch_works(a, b, 1)


def test_peer_port_garbage(env: tuple[RouterProcess, RouterProcess, int]) -> None:
    a, b, port = env
    # A slow client (1 byte/s) runs in the background while the others are dropped.
    slow_result: list[str] = []

    def slow() -> None:
        with socket.create_connection(("127.0.0.2", port)) as s:
            start = time.monotonic()
            s.settimeout(0.05)
            for i in range(30):  # till the router closes it (2 s); 30 s if it never does
                try:
                    s.send(bytes([i]))
                except OSError:
                    break
                try:
                    if s.recv(10) == b"":
                        break
                except TimeoutError:
                    pass
                except OSError:
                    break
                time.sleep(0.95)
            else:
                slow_result.append("never closed")
                return
            slow_result.append(f"{time.monotonic() - start:.2f}")

    slow_thread = threading.Thread(target=slow)
    slow_thread.start()

    # Random bytes: a full 88-byte frame with a bad magic.
    with socket.create_connection(("127.0.0.2", port)) as s:
        s.sendall(b"\xff\xff\xff\xff" + os.urandom(84))
        wait_closed(s)
    # A short frame, then close.
    with socket.create_connection(("127.0.0.2", port)) as s:
        s.sendall(b"SFR2" + os.urandom(6))
    # Connect and close at once: what a peer's pool does with an aged connection, no offence.
    socket.create_connection(("127.0.0.2", port)).close()
    # A well-formed frame of the wrong type (ANSWER instead of OFFER).
    with socket.create_connection(("127.0.0.2", port)) as s:
        t = Tuple4.parse("198.19.1.1:1", "198.19.2.1:2")
        s.sendall(PeerMsg(MsgType.ANSWER, tuple=t).signed(TEST_KEY).pack())
        wait_closed(s)
    # Library frames on the peer port.
    with socket.create_connection(("127.0.0.2", port)) as s:
        s.sendall(Msg(MsgType.HELLO).pack() * 2)
        wait_closed(s)

    wait_log(b, "bad magic")
    wait_log(b, "connection closed after 10 of 88 bytes")
    wait_log(b, "event=peer_closed_idle")
    wait_log(b, "expected OFFER, got ANSWER")
    switch_works(a, b, 2)  # served while the slow client is still connected
    slow_thread.join(40)
    # Closed by the router, at its 2 s offer timeout (a timer never fires early; the router's
    # clock may start a moment before ours, after the handshake, hence 1.5).
    assert slow_result and slow_result[0] != "never closed", slow_result
    assert float(slow_result[0]) >= 1.5, slow_result
    wait_log(b, "no complete OFFER within 2s")
    switch_works(a, b, 3)
    assert b.status()["router"]["peer_connections_dropped"] >= 5


def test_backoff_after_peer_unreachable(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A peer host that refuses connections is backed off: within the interval a request is
    refused without trying, after it the router tries again and the interval doubles; once the
    peer is up, a success clears it. The first interval is 1 s here (100 ms by default), so each
    check made within an interval has a second to land, even on a loaded machine."""
    d = tmp_path_factory.mktemp("rt-backoff")
    (d / "map.json").write_text(
        json.dumps({"198.19.1.0/24": "127.0.0.4", "198.19.3.0/24": "127.0.0.3"})
    )
    (d / "a.toml").write_text("backoff_initial_ms = 1000\n")
    port = free_port(("127.0.0.4", "127.0.0.3"))
    args = ["--map", str(d / "map.json")]
    a = RouterProcess(
        d / "a" / "router.sock", "127.0.0.4", port, [*args, "--config", str(d / "a.toml")]
    )

    def backoff() -> dict[str, int]:
        b: dict[str, int] = a.status()["router"]["peer_backoffs"].get("127.0.0.3", {})
        return b

    def interval_over() -> None:
        deadline = time.monotonic() + 10
        while backoff().get("remaining_ms", 0) > 0:
            assert time.monotonic() < deadline, backoff()
            time.sleep(0.02)

    try:
        with FakeLibrary(a.socket) as la:

            def ask(i: int) -> Status:
                t = Tuple4.parse(f"198.19.1.9:{30000 + i}", "198.19.3.1:80")
                return Status(la.wait_result(la.request(t)).msg.status)

            assert ask(1) is Status.PEER_UNREACHABLE  # 127.0.0.3: nobody listens
            info = a.status()["router"]
            assert backoff()["failures"] == 1 and 0 < backoff()["remaining_ms"] <= 1000
            refusals = info["backoff_refusals"]
            # Within the interval: refused without trying (the failure count does not grow).
            assert ask(2) is Status.PEER_UNREACHABLE
            info = a.status()["router"]
            assert info["backoff_refusals"] == refusals + 1
            assert backoff()["failures"] == 1
            # After it: tried again, failed again, interval doubled.
            interval_over()
            assert ask(3) is Status.PEER_UNREACHABLE
            assert backoff()["failures"] == 2 and 1000 < backoff()["remaining_ms"] <= 2000
            backoffs = r"event=peer_backoff peer=127.0.0.3 .*interval_ms=(\S+)"
            intervals = re.findall(backoffs, a.log())
            assert intervals == ["1000.0", "2000.0"], a.log()[-2000:]

            # The peer host comes up: after the interval, a success clears the backoff.
            c = RouterProcess(d / "c" / "router.sock", "127.0.0.3", port, args)
            try:
                t = Tuple4.parse("198.19.1.9:31000", "198.19.3.1:80")
                with FakeLibrary(c.socket, owned={t.mirrored()}):
                    interval_over()
                    res = la.wait_result(la.request(t))
                    assert res.msg.status == Status.OK
                assert a.status()["router"]["peer_backoffs"] == {}
            finally:
                c.stop()
    finally:
        a.stop()


CAP = 8


def test_outstanding_cap_and_duplicate_seq(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A library has at most `max_outstanding` requests in the works: the next one is refused
    at once with INTERNAL (the library asks again later; DENIED would be final), a seq still
    outstanding is BAD_MESSAGE, and answered requests free their slots.

    B's library answers no claim until told, and both routers wait up to 10 s for it, so A's
    first CAP requests stay outstanding for the whole check (it takes milliseconds)."""
    d = tmp_path_factory.mktemp("rt-cap")
    (d / "map.json").write_text(json.dumps(MAP))
    (d / "a.toml").write_text(f"max_outstanding = {CAP}\nanswer_timeout_ms = 10000\n")
    port = free_port()
    a = RouterProcess(
        d / "a" / "router.sock",
        "127.0.0.1",
        port,
        ["--map", str(d / "map.json"), "--config", str(d / "a.toml")],
    )
    try:
        b = RouterProcess(
            d / "b" / "router.sock",
            "127.0.0.2",
            port,
            ["--map", str(d / "map.json"), "--claim-timeout-ms", "10000"],
        )
    except BaseException:
        a.stop()
        raise
    try:
        tuples = [Tuple4.parse(f"198.19.1.10:{1000 + i}", "198.19.2.10:80") for i in range(CAP)]
        with FakeLibrary(a.socket) as la:
            with FakeLibrary(b.socket, answer_claims=False) as lb:
                for i, t in enumerate(tuples):
                    la.request(t, seq=100 + i)
                extra = Tuple4.parse("198.19.1.10:2000", "198.19.2.10:80")
                over = la.wait_result(la.request(extra, seq=200))
                assert over.msg.status == Status.INTERNAL and over.sock is None, over.msg
                # The seq of an outstanding request, again: refused as such (before the cap).
                reused = Tuple4.parse("198.19.1.10:2001", "198.19.2.10:80")
                la.request(reused, seq=100)
                again = la.wait_result(100)
                assert again.msg.status == Status.BAD_MESSAGE and again.msg.tuple == reused
                assert sorted(la.results) == [100, 200], la.results  # the CAP others wait
                assert a.status()["router"]["in_progress"] == CAP
                deadline = time.monotonic() + 10
                while len(lb.claims) < CAP and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert len(lb.claims) == CAP, lb.claims
                # B's library says NOT_MINE: B refuses the offers, and A answers each request
                # (seq 100's answer replaces the BAD_MESSAGE of its reuse).
                for claim in lb.claims:
                    lb.send(Msg(MsgType.CLAIM_RES, Status.NOT_MINE, claim.seq, tuple=claim.tuple))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                answered = {
                    seq: r for seq, r in la.results.items() if r.msg.status != Status.BAD_MESSAGE
                }
                if len(answered) == CAP + 1:
                    break
                time.sleep(0.01)
            for i, t in enumerate(tuples):
                res = answered.get(100 + i)
                assert res is not None and res.msg.tuple == t, (i, la.results)
                assert res.msg.status == Status.PEER_REFUSED and res.sock is None, res.msg
            # Slots freed: a request is served again.
            t = Tuple4.parse("198.19.1.10:3000", "198.19.2.10:80")
            with FakeLibrary(b.socket, owned={t.mirrored()}) as lb2:
                res = la.wait_result(la.request(t, seq=300))
                assert res.msg.status == Status.OK and res.sock is not None, res.msg
                lb2.wait_host([t.key()])
    finally:
        assert b.stop() == 0
        assert a.stop() == 0


def test_sockets_modes_and_clean_shutdown(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    d = Path(tmp_path) / "deep" / "er"
    map_file = Path(tmp_path) / "map.json"
    map_file.write_text(json.dumps(MAP))
    old = os.umask(0o077)
    try:
        r = RouterProcess(d / "router.sock", "127.0.0.1", free_port(), ["--map", str(map_file)])
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
        assert stat.S_IMODE((d.parent).stat().st_mode) == 0o755
        assert stat.S_IMODE(r.socket.stat().st_mode) == 0o666
        assert stat.S_IMODE(r.control.stat().st_mode) == 0o600
        # A second router on the same socket refuses to start (exit 1, one line).
        args = ["--host-ip", "127.0.0.1", "--peer-port", str(free_port()), "--map", str(map_file)]
        # No socket guard, as RouterProcess starts the first: loading it needs root, and without
        # root libbpf writes its own lines to stderr before the router's.
        args += ["--cluster-key", str(r.key_file), "--no-socket-guard"]
        second = subprocess.run(
            [sys.executable, "-m", "shuntflow.router", "--socket", str(r.socket), *args],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert second.returncode == 1
        assert "another router is already listening" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert r.status()["router"]["clients"] == 0  # the first one is untouched
    finally:
        assert r.stop() == 0
    assert not r.socket.exists() and not r.control.exists()
    assert "event=router_stopped" in r.log()
    # A stale socket file (no router behind it) is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(d / "router.sock"))
    stale.close()
    r2 = RouterProcess(d / "router.sock", "127.0.0.1", free_port(), ["--map", str(map_file)])
    assert r2.stop() == 0


@pytest.mark.parametrize(
    ("frame", "fds", "error"),
    [
        (b"garbage", 0, "unparseable frame"),
        (Msg(MsgType.HELLO_ACK, seq=0).pack(), 1, "1 fds on HELLO_ACK"),
        (Msg(MsgType.SWITCH_RES, Status.OK, 5).pack(), 0, "0 fds on SWITCH_RES status 0"),
        (Msg(MsgType.SWITCH_RES, Status.OK, 5).pack(), 2, "2 fds on SWITCH_RES status 0"),
        (Msg(MsgType.SWITCH_RES, Status.OK, 6).pack(), 1, "seq 0x6, never asked"),
        (Msg(MsgType.SWITCH_REQ, seq=7).pack(), 0, "SWITCH_REQ is not a frame the router sends"),
    ],
    ids=["garbage", "fd-on-hello-ack", "ok-without-fd", "two-fds", "unknown-seq", "wrong-type"],
)
def test_fake_library_fails_on_what_the_real_one_refuses(
    tmp_path: os.PathLike[str], frame: bytes, fds: int, error: str
) -> None:
    """The router tests' library stand-in turns a protocol error of the router into a failure
    of the test that used it, instead of dropping the frame or closing the fd quietly."""
    from pathlib import Path

    path = Path(tmp_path) / "router.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen()

    def router() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)  # HELLO
            conn.send(Msg(MsgType.HELLO_ACK, seq=0).pack())
            conn.recv(4096)  # SWITCH_REQ seq 5
            passed = [os.open("/dev/null", os.O_RDONLY) for _ in range(fds)]
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", passed))]
            conn.sendmsg([frame], anc if passed else [])
            for fd in passed:
                os.close(fd)
            conn.recv(4096)  # the library's EOF

    t = threading.Thread(target=router)
    t.start()
    try:
        lib = FakeLibrary(path)
        lib.request(Tuple4.parse("198.19.1.1:1000", "198.19.2.1:80"), seq=5)
        deadline = time.monotonic() + 5
        while not lib.errors and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(AssertionError, match=error):
            lib.close()
    finally:
        t.join(5)
        listener.close()
