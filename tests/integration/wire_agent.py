"""A hostile or curious process for test_security.py: speaks the router's wire protocols
(shuntflow.wire) by hand from inside a testbed namespace and prints what it got as one JSON line.

    wire_agent.py ask SOCKET LOCAL REMOTE
        HELLO, then SWITCH_REQ for LOCAL->REMOTE (its own view); the SWITCH_RES status and how
        many fds came with it.
    wire_agent.py claim SOCKET SECONDS
        HELLO, prints "ready", then answers CLAIM_RES OK to every CLAIM_REQ (forged claims) for
        SECONDS; every CLAIM_REQ and SWITCH_RES it saw.
    wire_agent.py hold SOCKET N
        Opens N channels one after the other, each saying HELLO; prints how many got HELLO_ACK
        and how many the router closed instead, then keeps the acknowledged ones open until its
        stdin closes.
    wire_agent.py rogue PEER_IP PORT KEY_FILE LOCAL REMOTE FOREIGN_SRC
        On the peer port: (a) an OFFER MAC'd with a wrong key, (b) a valid OFFER (built with the
        cluster key for its connection) and then the same bytes again, over a new connection
        and over a new connection from the same source port, (c) a valid fresh OFFER from
        FOREIGN_SRC. For each: the ANSWER (status, MAC valid) or "closed" if none came.

The commands below are an unprivileged attacker's; the tests run them as nobody, most of them
under `unshare -Urn` (a user and network namespace of their own, no privilege on the host).

    wire_agent.py copy-ask SOCKET LOCAL REMOTE
        Makes a loopback TCP pair with exactly LOCAL->REMOTE in its own namespace (a copy of
        someone else's overlay connection), then asks for it as `ask` does.
    wire_agent.py copy-claim SOCKET SECONDS
        As `claim`, but copies each offered tuple onto its loopback first; reads what arrives on
        a handed-over fd for up to a second.
    wire_agent.py escape SOCKET LOCAL REMOTE LOOPBACK_PORT PEER_IP PEER_PORT
        Connects LOCAL->REMOTE on the overlay, asks for its host connection, then tries to make
        that socket something else: clear its mark, disconnect and connect to the host's
        127.0.0.1:LOOPBACK_PORT and to PEER_IP:PEER_PORT, bind, listen (a listener stays open
        until stdin closes).
    wire_agent.py spawn-hold SOCKET NAMESPACES N
        NAMESPACES times `unshare -Urn` + `hold SOCKET N`; prints the total acked and refused,
        holds until stdin closes.
    wire_agent.py report SOCKET LOCAL REMOTE N SECONDS
        Says SWITCH_DONE for a connection it never had, then answers every STATS_REQ with one
        CONN_INFO row for LOCAL->REMOTE (on the overlay) and N invented ones, for SECONDS.
    wire_agent.py flood PEER_IP PORT SECONDS HOLD RATE
        Reconnects to the peer port in a loop for SECONDS, at most RATE connects a second,
        keeping up to HOLD connections open (the oldest closed to make room); how many connects
        succeeded and failed.
"""

from __future__ import annotations

import array
import ctypes
import errno
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections import deque
from typing import Any

from shuntflow.router.auth import answer_matches, make_offer
from shuntflow.wire import (
    MSG_SIZE,
    PEER_SIZE,
    Msg,
    MsgType,
    PeerMsg,
    Status,
    Tuple4,
    underlay_binding,
)


class Refused(Exception):
    """The router closed the channel instead of acknowledging HELLO."""


def channel(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    try:
        s.send(Msg(MsgType.HELLO, seq=0, pid=os.getpid(), arg=2).pack())
        msg, _fds = receive(s)
    except OSError:
        msg = None
    if msg is None:
        s.close()
        raise Refused
    assert msg.type is MsgType.HELLO_ACK, msg
    return s


def receive(s: socket.socket) -> tuple[Msg | None, int]:
    data, anc, _flags, _ = s.recvmsg(MSG_SIZE, socket.CMSG_SPACE(16))
    fds = array.array("i")
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % 4])
    for fd in fds:
        os.close(fd)
    return (Msg.unpack(data) if data else None), len(fds)


def ask(path: str, local: str, remote: str) -> dict[str, Any]:
    try:
        s = channel(path)
    except Refused:
        return {"status": "channel refused", "fds": 0}
    s.send(Msg(MsgType.SWITCH_REQ, seq=77, tuple=Tuple4.parse(local, remote)).pack())
    s.settimeout(10)
    while True:
        msg, fds = receive(s)
        if msg is None:
            return {"status": "closed", "fds": fds}
        if msg.type is MsgType.SWITCH_RES and msg.seq == 77:
            return {"status": Status(msg.status).name, "fds": fds}


def claim(path: str, seconds: float) -> dict[str, Any]:
    s = channel(path)
    print("ready", flush=True)
    claims: list[str] = []
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            msg, fds = receive(s)
        except TimeoutError:
            break
        if msg is None:
            break
        if msg.type is MsgType.CLAIM_REQ:
            claims.append(str(msg.tuple))
            s.send(Msg(MsgType.CLAIM_RES, Status.OK, msg.seq, tuple=msg.tuple).pack())
        elif msg.type is MsgType.SWITCH_RES:
            results.append({"seq": msg.seq, "status": Status(msg.status).name, "fds": fds})
        elif msg.type is MsgType.STATS_REQ:
            s.send(Msg(MsgType.STATS_END, seq=msg.seq).pack())
    return {"claims": claims, "results": results}


def hold(path: str, n: int) -> None:
    held, refused = [], 0
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(path)
            s.send(Msg(MsgType.HELLO, seq=0, pid=os.getpid(), arg=2).pack())
            msg, _fds = receive(s)
        except OSError:
            msg = None
        if msg is not None and msg.type is MsgType.HELLO_ACK:
            held.append(s)
        else:
            refused += 1
            s.close()
    print(json.dumps({"acked": len(held), "refused": refused}), flush=True)
    sys.stdin.read()


def connect(peer: str, port: int, source: tuple[str, int] = ("", 0)) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(5)
    s.bind(source)
    s.connect((peer, port))
    return s


def binding(s: socket.socket) -> bytes:
    return underlay_binding(s.getsockname(), s.getpeername())


def answer_of(s: socket.socket, key: bytes, offer: PeerMsg) -> dict[str, Any]:
    bound = binding(s)
    s.settimeout(5)
    buf = b""
    try:
        while len(buf) < PEER_SIZE:
            chunk = s.recv(PEER_SIZE - len(buf))
            if not chunk:
                break
            buf += chunk
    except ConnectionResetError:
        pass
    finally:
        s.close()
    if len(buf) < PEER_SIZE:
        return {"answer": "closed", "bytes": len(buf)}
    answer = PeerMsg.unpack(buf)
    return {
        "answer": Status(answer.status).name,
        "mac_ok": answer_matches(key, offer, answer, bound) is None,
    }


def rogue(peer: str, port: int, key_file: str, local: str, remote: str, foreign: str) -> Any:
    with open(key_file, "rb") as fh:
        key = fh.read().strip()
    t = Tuple4.parse(local, remote)
    out: dict[str, Any] = {}
    s = connect(peer, port)
    forged = make_offer(b"not the cluster key, but just as long!!", 1, t, binding(s))
    s.sendall(forged.pack())
    out["bad_mac"] = answer_of(s, key, forged)
    s = connect(peer, port)
    source = s.getsockname()
    valid = make_offer(key, 2, t, binding(s))
    s.sendall(valid.pack())
    out["valid"] = answer_of(s, key, valid)
    # The captured bytes over a new connection: the MAC binds them to the first one.
    s = connect(peer, port)
    s.sendall(valid.pack())
    out["replay"] = answer_of(s, key, valid)
    # ... and over a new connection from the very same source address and port: the MAC holds,
    # the nonce cache refuses it.
    time.sleep(0.2)  # the router closed first; let our end finish closing
    s = connect(peer, port, source)
    out["replay_same_port"] = {"same_source": s.getsockname() == source}
    s.sendall(valid.pack())
    out["replay_same_port"].update(answer_of(s, key, valid))
    try:
        s = connect(peer, port, (foreign, 0))
        fresh = make_offer(key, 3, t, binding(s))
        s.sendall(fresh.pack())
        out["foreign"] = answer_of(s, key, fresh)
    except OSError as exc:
        out["foreign"] = {"answer": "closed", "error": str(exc)}
    return out


def copy_tuple(local: str, remote: str) -> tuple[socket.socket, socket.socket]:
    """In this process's own network namespace: a loopback TCP pair with exactly local->remote."""
    t = Tuple4.parse(local, remote)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for ip in {str(t.local.ip), str(t.remote.ip)}:
        subprocess.run(["ip", "addr", "replace", f"{ip}/32", "dev", "lo"], check=True)
    with socket.create_server((str(t.remote.ip), t.remote.port)) as listener:
        conn = socket.socket()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        conn.bind((str(t.local.ip), t.local.port))
        conn.connect((str(t.remote.ip), t.remote.port))
        accepted, _ = listener.accept()
    return conn, accepted


def copy_ask(path: str, local: str, remote: str) -> dict[str, Any]:
    pair = copy_tuple(local, remote)
    result = ask(path, local, remote)
    for s in pair:
        s.close()
    return result


def receive_fd(s: socket.socket) -> tuple[Msg | None, socket.socket | None]:
    data, anc, _flags, _ = s.recvmsg(MSG_SIZE, socket.CMSG_SPACE(16))
    fds = array.array("i")
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % 4])
    for fd in fds[1:]:
        os.close(fd)
    return (Msg.unpack(data) if data else None), (socket.socket(fileno=fds[0]) if fds else None)


def copy_claim(path: str, seconds: float) -> dict[str, Any]:
    try:
        s = channel(path)
    except Refused:
        print("ready", flush=True)
        return {"channel": "refused", "claims": [], "results": []}
    print("ready", flush=True)
    claims: list[str] = []
    results: list[dict[str, Any]] = []
    copies: list[socket.socket] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            msg, host = receive_fd(s)
        except TimeoutError:
            break
        if msg is None:
            break
        if msg.type is MsgType.CLAIM_REQ:
            claims.append(str(msg.tuple))
            copies.extend(copy_tuple(str(msg.tuple.local), str(msg.tuple.remote)))
            s.send(Msg(MsgType.CLAIM_RES, Status.OK, msg.seq, tuple=msg.tuple).pack())
        elif msg.type is MsgType.SWITCH_RES:
            got = b""
            if host is not None:
                host.settimeout(1.0)
                try:
                    while chunk := host.recv(4096):
                        got += chunk
                except OSError:
                    pass
                host.close()
            results.append(
                {
                    "status": Status(msg.status).name,
                    "fds": int(host is not None),
                    "read": got.decode(errors="replace"),
                }
            )
        elif msg.type is MsgType.STATS_REQ:
            s.send(Msg(MsgType.STATS_END, seq=msg.seq).pack())
    return {"claims": claims, "results": results}


_libc = ctypes.CDLL(None, use_errno=True)


def _disconnect(s: socket.socket) -> str:
    unspec = (ctypes.c_ubyte * 16)()  # sa_family 0: AF_UNSPEC
    if _libc.connect(s.fileno(), unspec, ctypes.sizeof(unspec)) == 0:
        return "ok"
    return errno.errorcode[ctypes.get_errno()]


def _attempt(call: Any) -> str:
    try:
        call()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def escape(
    path: str, local: str, remote: str, loopback_port: int, peer_ip: str, peer_port: int
) -> dict[str, Any]:
    t = Tuple4.parse(local, remote)
    overlay = socket.socket()
    overlay.bind((str(t.local.ip), t.local.port))
    overlay.connect((str(t.remote.ip), t.remote.port))
    try:
        s = channel(path)
    except Refused:
        return {"status": "channel refused"}
    s.send(Msg(MsgType.SWITCH_REQ, seq=78, tuple=t).pack())
    s.settimeout(10)
    while True:
        msg, host = receive_fd(s)
        if msg is None:
            return {"status": "closed"}
        if msg.type is MsgType.SWITCH_RES and msg.seq == 78:
            break
    out: dict[str, Any] = {"status": Status(msg.status).name, "fds": int(host is not None)}
    if host is None:
        return out
    out["host_local"] = "{}:{}".format(*host.getsockname())
    out["set_mark"] = _attempt(lambda: host.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0))
    host.settimeout(2)
    for name, target in (
        ("loopback", ("127.0.0.1", loopback_port)),
        ("peer", (peer_ip, peer_port)),
    ):
        out[f"disconnect_{name}"] = _disconnect(host)
        out[f"connect_{name}"] = _attempt(lambda target=target: host.connect(target))
        if out[f"connect_{name}"] == "ok":
            out[f"local_{name}"] = "{}:{}".format(*host.getsockname())
    out["disconnect"] = _disconnect(host)
    out["bind"] = _attempt(lambda: host.bind(("0.0.0.0", 0)))
    out["listen"] = _attempt(lambda: host.listen(4))
    if out["listen"] == "ok":
        # Kept listening until stdin closes, so that the test can try to reach it.
        out["listening"] = "{}:{}".format(*host.getsockname())
        print(json.dumps(out), flush=True)
        sys.stdin.read()
    return out


def spawn_hold(path: str, namespaces: int, n: int) -> None:
    procs = [
        subprocess.Popen(
            ["unshare", "-Urn", sys.executable, __file__, "hold", path, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(namespaces)
    ]
    acked = refused = 0
    for p in procs:
        assert p.stdout is not None
        got = json.loads(p.stdout.readline())
        acked += got["acked"]
        refused += got["refused"]
    print(json.dumps({"acked": acked, "refused": refused}), flush=True)
    sys.stdin.read()
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
        p.wait()


def report(path: str, local: str, remote: str, n: int, seconds: float) -> dict[str, Any]:
    s = channel(path)
    invented = [
        Tuple4.parse(f"198.19.9.{1 + i % 250}:{1000 + i}", "198.19.8.8:80") for i in range(n)
    ]
    s.send(Msg(MsgType.SWITCH_DONE, seq=0, tuple=invented[0], arg=100, arg2=1).pack())
    print("ready", flush=True)
    answered = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            msg, _fds = receive(s)
        except TimeoutError:
            break
        if msg is None:
            break
        if msg.type is MsgType.STATS_REQ:
            real = Tuple4.parse(local, remote)
            for t in [real, *invented]:
                s.send(Msg(MsgType.CONN_INFO, 0, msg.seq, tuple=t, arg=1, arg2=0).pack())
            s.send(Msg(MsgType.STATS_END, seq=msg.seq).pack())
            answered += 1
    return {"answered": answered}


def flood(peer: str, port: int, seconds: float, hold_max: int, rate: float) -> dict[str, Any]:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hold_max + 256, hold_max + 256))
    held: deque[socket.socket] = deque()
    ok = failed = 0
    start = time.monotonic()
    deadline = start + seconds
    while (now := time.monotonic()) < deadline:
        ahead = (ok + failed) / rate - (now - start)
        if ahead > 0:
            time.sleep(ahead)
        s = socket.socket()
        s.settimeout(1)
        try:
            s.connect((peer, port))
            ok += 1
            held.append(s)
        except OSError:
            failed += 1
            s.close()
        while len(held) > hold_max:
            held.popleft().close()
    for s in held:
        s.close()
    return {"connects": ok, "failed": failed}


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "ask":
        result = ask(args[0], args[1], args[2])
    elif cmd == "claim":
        result = claim(args[0], float(args[1]))
    elif cmd == "hold":
        hold(args[0], int(args[1]))
        return
    elif cmd == "copy-ask":
        result = copy_ask(args[0], args[1], args[2])
    elif cmd == "copy-claim":
        result = copy_claim(args[0], float(args[1]))
    elif cmd == "escape":
        result = escape(args[0], args[1], args[2], int(args[3]), args[4], int(args[5]))
    elif cmd == "spawn-hold":
        spawn_hold(args[0], int(args[1]), int(args[2]))
        return
    elif cmd == "report":
        result = report(args[0], args[1], args[2], int(args[3]), float(args[4]))
    elif cmd == "flood":
        result = flood(args[0], int(args[1]), float(args[2]), int(args[3]), float(args[4]))
    elif cmd == "rogue":
        result = rogue(args[0], int(args[1]), args[2], args[3], args[4], args[5])
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
