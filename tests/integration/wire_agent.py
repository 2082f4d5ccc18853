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
"""

from __future__ import annotations

import array
import json
import os
import socket
import sys
import time
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


def channel(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.send(Msg(MsgType.HELLO, seq=0, pid=os.getpid(), arg=2).pack())
    msg, _fds = receive(s)
    assert msg is not None and msg.type is MsgType.HELLO_ACK, msg
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
    s = channel(path)
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


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "ask":
        result = ask(args[0], args[1], args[2])
    elif cmd == "claim":
        result = claim(args[0], float(args[1]))
    elif cmd == "hold":
        hold(args[0], int(args[1]))
        return
    elif cmd == "rogue":
        result = rogue(args[0], int(args[1]), args[2], args[3], args[4], args[5])
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
