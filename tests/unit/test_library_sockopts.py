"""A switched connection keeps its socket options (docs/design.md, "The swap keeps the fd
number"): the host socket under the application's fd number must answer every option the library
carries over as the overlay socket did, including those the library copies only when they can
differ (swap.c): the ones whose defaults are the network namespace's, those set on the socket or
inherited from its listener, a client's TOS reflected onto the accepted socket, and those changed
where the library's record cannot see it (a forked child, another holder of the socket passed by
SCM_RIGHTS). TCP_NOTSENT_LOWAT reads back 0 until something sets it on the socket, and then means
its namespace's net.ipv4.tcp_notsent_lowat: the options are compared by what holds for each
socket, 0 read as the sysctl of the namespace the socket is in. SO_RCVLOWAT is set above the
handoff frames' size: the library must not put it on the host connection before the swap.

A real process under the library, both ends of each connection in it, in a network namespace of
its own whose keepalive times, congestion control and TOS reflection differ from the root
namespace's; a fake router in the test process (the root namespace) answers each pair of
requests with the two ends of a real TCP connection, on which the two libraries run the
handoff. The process compares each end's options before and after its swap (the namespace
cookie tells which socket an fd names)."""

from __future__ import annotations

import json
import socket
import textwrap
from pathlib import Path

from shuntflow.wire import Msg, MsgType

from .fakerouter import pair_requests, paired_child, tcp_listener

THRESHOLD = 16

CHILD = textwrap.dedent(
    """
    import ctypes, json, os, socket, struct, subprocess, sys
    T, S, IP = socket.IPPROTO_TCP, socket.SOL_SOCKET, socket.IPPROTO_IP
    SO_NETNS_COOKIE = 71

    with open("/proc/sys/net/ipv4/tcp_notsent_lowat") as f:
        ROOT_LOWAT = int(f.read())
    # A namespace whose defaults differ from the root namespace's (the host connections').
    assert ctypes.CDLL(None, use_errno=True).unshare(0x40000000) == 0  # CLONE_NEWNET
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for name, value in [("tcp_keepalive_time", "611"), ("tcp_keepalive_intvl", "31"),
                        ("tcp_keepalive_probes", "5"), ("tcp_congestion_control", "reno"),
                        ("tcp_reflect_tos", "1"), ("tcp_notsent_lowat", "131072")]:
        with open(f"/proc/sys/net/ipv4/{name}", "w") as f:
            f.write(value)

    OPTS = {
        "keepalive": (S, socket.SO_KEEPALIVE, 4), "keepidle": (T, socket.TCP_KEEPIDLE, 4),
        "keepintvl": (T, socket.TCP_KEEPINTVL, 4), "keepcnt": (T, socket.TCP_KEEPCNT, 4),
        "user_timeout": (T, socket.TCP_USER_TIMEOUT, 4), "tos": (IP, socket.IP_TOS, 4),
        "priority": (S, socket.SO_PRIORITY, 4), "rcvtimeo": (S, socket.SO_RCVTIMEO, 16),
        "sndtimeo": (S, socket.SO_SNDTIMEO, 16), "congestion": (T, socket.TCP_CONGESTION, 16),
        "nodelay": (T, socket.TCP_NODELAY, 4), "cork": (T, socket.TCP_CORK, 4),
        "linger": (S, socket.SO_LINGER, 8),
        "notsent_lowat": (T, socket.TCP_NOTSENT_LOWAT, 4),
        "rcvlowat": (S, socket.SO_RCVLOWAT, 4),
    }

    def cookie(s):
        return s.getsockopt(S, SO_NETNS_COOKIE, 8).hex()

    with socket.socket() as probe:
        OWN_NS = cookie(probe)

    def options(s):
        got = {k: s.getsockopt(l, n, size).hex() for k, (l, n, size) in OPTS.items()}
        if int.from_bytes(bytes.fromhex(got["notsent_lowat"]), "little") == 0:
            ns = 131072 if cookie(s) == OWN_NS else ROOT_LOWAT
            got["notsent_lowat"] = ns.to_bytes(4, "little").hex()
        return got

    def tv(sec):
        return struct.pack("ll", int(sec), int(sec % 1 * 1e6))

    def listener(**set_on):
        ls = socket.socket()
        for k, v in set_on.items():
            ls.setsockopt(OPTS[k][0], OPTS[k][1], v)
        ls.bind(("127.0.0.1", 0))
        ls.listen(8)
        return ls

    def pair(ls, before_connect=()):
        c = socket.socket()
        for k, v in before_connect:
            c.setsockopt(OPTS[k][0], OPTS[k][1], v)
        c.connect(ls.getsockname())
        s, _ = ls.accept()
        return c, s

    # The sockets that live through a fork first: every socket open at a fork is.
    early = listener()
    cases = {}
    # Changed by a forked child through its copies of the fds.
    c, s = pair(early)
    pid = os.fork()
    if pid == 0:
        for x in (c, s):
            x.setsockopt(S, socket.SO_KEEPALIVE, 1)
            x.setsockopt(T, socket.TCP_USER_TIMEOUT, 7777)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    cases["forked"] = (c, s)
    # A listener made before a fork (a pre-forking server's), changed by the child after it
    # (its TOS is not inherited here: the accepted socket reflects the client's).
    ls = listener()
    pid = os.fork()
    if pid == 0:
        ls.setsockopt(IP, socket.IP_TOS, 0x48)
        ls.setsockopt(S, socket.SO_KEEPALIVE, 1)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    cases["listener_forked"] = pair(ls)
    # Changed through another fd of the same socket, passed by SCM_RIGHTS.
    c, s = pair(early)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    socket.send_fds(a, [b"x"], [c.fileno()])
    _, fds, _, _ = socket.recv_fds(b, 1, 1)
    other = socket.socket(fileno=fds[0])
    other.setsockopt(IP, socket.IP_TOS, 0x48)
    other.setsockopt(T, socket.TCP_KEEPCNT, 3)
    other.detach()
    os.close(fds[0])
    cases["passed"] = (c, s)
    # Set by a raw setsockopt through syscall(), past the setsockopt wrapper.
    c, s = pair(early)
    val = ctypes.c_int(0x68)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    sys_setsockopt = {"x86_64": 54, "aarch64": 208}[os.uname().machine]
    assert libc.syscall(ctypes.c_long(sys_setsockopt), ctypes.c_long(c.fileno()), ctypes.c_long(IP),
                        ctypes.c_long(socket.IP_TOS), ctypes.byref(val), ctypes.c_long(4)) == 0
    cases["raw"] = (c, s)

    plain = listener()
    # Nothing set anywhere: the namespace's defaults only.
    cases["plain"] = pair(plain)
    # Set on the client socket, and on a listener its accepted socket inherits them from.
    c, s = pair(listener(keepalive=1, keepintvl=17, tos=0x20, sndtimeo=tv(2.5),
                         linger=struct.pack("ii", 1, 3), congestion=b"cubic", notsent_lowat=4096,
                         rcvlowat=2048))
    for k, v in [("keepalive", 1), ("keepidle", 111), ("user_timeout", 5000), ("priority", 3),
                 ("rcvtimeo", tv(1.5)), ("nodelay", 1), ("congestion", b"bbr"),
                 ("notsent_lowat", 8192), ("rcvlowat", 4096)]:
        c.setsockopt(OPTS[k][0], OPTS[k][1], v)
    cases["set"] = (c, s)
    # The client's TOS, reflected onto the accepted socket by the namespace's sysctl.
    cases["reflected"] = pair(plain, [("tos", 0x28)])

    before = {name: [options(c), options(s)] for name, (c, s) in cases.items()}
    cookies = {name: [cookie(c), cookie(s)] for name, (c, s) in cases.items()}
    print(json.dumps({name: [[f"{x[0]}:{x[1]}" for x in (c.getsockname(), c.getpeername())]]
                      for name, (c, s) in cases.items()}), flush=True)
    sys.stdin.readline()  # the router is listening for the requests
    swapped = {}
    for i in range(400):
        for name, (c, s) in cases.items():
            if name in swapped:
                continue
            c.sendall(b"q")
            assert s.recv(1) == b"q"
            s.sendall(b"r")
            assert c.recv(1) == b"r"
            now = [cookie(c), cookie(s)]
            if now[0] != cookies[name][0] and now[1] != cookies[name][1]:
                swapped[name] = [options(c), options(s)]
        if len(swapped) == len(cases):
            break
    print(json.dumps({"before": before, "after": swapped,
                      "host_defaults": options(socket.socket())}), flush=True)
    """
)


def test_switched_sockets_keep_their_options(tmp_path: Path) -> None:
    # The root namespace's defaults, which a host connection starts with.
    fresh = socket.socket()
    root_idle = fresh.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
    root_cc = fresh.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0")
    fresh.close()
    assert root_idle != 611 and root_cc != b"reno"
    assert Path("/proc/sys/net/ipv4/tcp_notsent_lowat").read_text().strip() != "131072"

    host_listener = tcp_listener("127.0.0.1")
    held: list[socket.socket] = []
    with paired_child(tmp_path, CHILD, THRESHOLD) as (child, chan, cases):
        assert child.stdin is not None and child.stdout is not None
        # Each connection's two requests (one from each end), answered together with the two
        # ends of one host connection.
        waiting: dict[frozenset[str], Msg] = {}
        answered = 0
        chan.settimeout(30)
        while answered < len(cases):
            m = Msg.unpack(chan.recv(64))
            if m.type != MsgType.SWITCH_REQ:
                continue
            ends = pair_requests(chan, host_listener, waiting, m)
            held += ends
            answered += 1 if ends else 0
        report = json.loads(child.stdout.readline())
        assert child.wait(30) == 0
    for s in held:
        s.close()
    host_listener.close()

    assert set(report["after"]) == set(cases), ("not all switched", report["after"].keys())
    for name in cases:
        for end, before, after in zip(
            ("client", "server"), report["before"][name], report["after"][name], strict=True
        ):
            assert before == after, (name, end, before, after)
    # The cases are real: the namespace's defaults are not the root's, and what was set shows.
    plain = report["before"]["plain"][0]
    assert plain["keepidle"] == (611).to_bytes(4, "little").hex()
    assert bytes.fromhex(plain["congestion"]).rstrip(b"\0") == b"reno"
    assert report["before"]["reflected"][1]["tos"] == (0x28).to_bytes(4, "little").hex()
    assert report["before"]["forked"][0]["user_timeout"] == (7777).to_bytes(4, "little").hex()
    assert report["before"]["listener_forked"][1]["keepalive"] == (1).to_bytes(4, "little").hex()
    assert report["before"]["passed"][0]["tos"] == (0x48).to_bytes(4, "little").hex()
    assert report["before"]["raw"][0]["tos"] == (0x68).to_bytes(4, "little").hex()
    assert report["before"]["set"][1]["congestion"] != plain["congestion"]
    assert plain["notsent_lowat"] == (131072).to_bytes(4, "little").hex()
    assert report["before"]["set"][0]["notsent_lowat"] == (8192).to_bytes(4, "little").hex()
    assert report["before"]["set"][1]["notsent_lowat"] == (4096).to_bytes(4, "little").hex()
    assert report["before"]["set"][0]["rcvlowat"] == (4096).to_bytes(4, "little").hex()
    assert report["before"]["set"][1]["rcvlowat"] == (2048).to_bytes(4, "little").hex()
