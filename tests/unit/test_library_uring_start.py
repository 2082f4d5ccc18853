"""A process that holds an io_uring switches nothing, even when its first switch comes before the
agent has looked for a ring (docs/design.md, "One agent thread per process"): at a low threshold
the application thread sends the request itself then, and the agent, which looks for a ring
first thing and again before it takes a host connection, must refuse the host connection the
router hands it.

A real single-threaded process under the library makes a ring behind the library's back (libc's
own syscall symbol, so only the ring's mapping shows it), then runs connections whose both ends
it holds at threshold 4. The fake router answers every request with one end of a real TCP
connection and keeps the other: the library must close each without a handoff frame (a READY or
SYNC would mean it took the connection), and every byte must stay on the overlay."""

from __future__ import annotations

import hashlib
import json
import socket
import textwrap
from pathlib import Path

from shuntflow.wire import Msg, MsgType

from .fakerouter import hand_over, library_child, tcp_listener

CHILD = textwrap.dedent(
    """
    import ctypes, hashlib, json, mmap, socket, sys, time
    call = ctypes.CDLL("libc.so.6").syscall
    call.restype = ctypes.c_long
    params = ctypes.create_string_buffer(120)  # struct io_uring_params
    fd = call(ctypes.c_long(425), ctypes.c_long(4), params)  # io_uring_setup
    assert fd >= 0, "io_uring_setup failed"
    ring = mmap.mmap(fd, 4096, offset=0)
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    sent, got = hashlib.sha256(), hashlib.sha256()
    for k in range(4):
        c = socket.create_connection(ls.getsockname())
        s, _ = ls.accept()
        for i in range(40):
            msg = bytes([k, i]) * (i + 1)
            sent.update(msg)
            c.sendall(msg)
            data = b""
            while len(data) < len(msg):
                data += s.recv(len(msg) - len(data))
            s.sendall(data)
            back = b""
            while len(back) < len(msg):
                back += c.recv(len(msg) - len(back))
            got.update(back)
            if i >= 2:  # past the trigger: the answer comes while the connection is in use
                time.sleep(0.002)
        c.close()
        s.close()
    print(json.dumps({"sent": sent.hexdigest(), "got": got.hexdigest()}), flush=True)
    """
)


def run_once(tmp_path: Path) -> tuple[list[socket.socket], str]:
    """One process; every request answered with a host connection. Returns the test's ends of
    those connections and the library's log, having checked the process's bytes."""
    tmp_path.mkdir()
    log = tmp_path / "lib.log"
    host_listener = tcp_listener("127.0.0.1")
    kept: list[socket.socket] = []
    with library_child(tmp_path, CHILD, [], threshold=4, log=log) as (child, chan):
        assert child.stdout is not None
        chan.settimeout(0.2)
        while child.poll() is None:
            try:
                data = chan.recv(64)
            except TimeoutError:
                continue
            if not data:
                break
            m = Msg.unpack(data)
            if m.type != MsgType.SWITCH_REQ:
                continue
            kept.append(hand_over(chan, host_listener, m))
        report = json.loads(child.stdout.readline())
        assert child.wait(30) == 0
    host_listener.close()
    want = hashlib.sha256(
        b"".join(bytes([k, i]) * (i + 1) for k in range(4) for i in range(40))
    ).hexdigest()
    assert report["sent"] == report["got"] == want
    return kept, log.read_text()


def test_a_ring_made_before_the_agent_looked_still_pins(tmp_path: Path) -> None:
    # The request goes out before the agent's first look only if the trigger, two calls after
    # the agent's start, beats the thread's start and its read of /proc/self/maps: nearly
    # always, and a few processes make sure one did (else no request would come at all: the
    # look found the ring first).
    for attempt in range(5):
        kept, text = run_once(tmp_path / str(attempt))
        # Every host connection handed over was closed unused: EOF, no frame.
        for s in kept:
            assert s.recv(64) == b"", "the library sent a handoff frame on a host connection"
            s.close()
        assert "io_uring in use (its ring is mapped)" in text, text[-2000:]
        assert "switched to the host path" not in text, text[-2000:]
        if kept:
            break
    assert kept, "no request reached the router before the agent's first look"
