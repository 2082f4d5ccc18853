"""select() while a connection switches: a blocking program must never be told "readable" for
nothing.

The pattern is iperf3's, where it hung in the bench: the server waits in select() on its
listener and an idle control connection, then does a blocking read of whatever select reported.
At the switch point the overlay socket's FIN (or an event of the socket the agent has just
swapped out) made select report the control connection readable although the stream had no byte
for it; the server then blocked in read() while the client waited for it to accept the data
connection. Each round below is one such exchange on fresh connections with threshold 1, so the
control connection switches right while the server sits in select().
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from shuntflow.testbed import Testbed

from .apps import SCRIPT_PRELUDE, mode_env, run_script_client, start_script_server
from .conftest import MakeTestbed

pytestmark = pytest.mark.root

ROUNDS = 40
PORT = 7811

# One round: control connection C, "hello" -> "ok"; the client opens data connection D and waits
# on C; the server select()s on the listener and C, blocking-reads C if select says so (a real
# message there would be a protocol error), accepts D, reads its 64 KiB, answers "go" on C. The
# client ends the run with "done!" on a last control connection.
SERVER = f"""
import hashlib, select, socket, sys
lst = socket.create_server((sys.argv[1], {PORT}))
print("listening", flush=True)
rnd = 0
while True:
    c, _ = lst.accept()
    first = c.recv(5, socket.MSG_WAITALL)
    if first == b"done!":
        break
    assert first == b"hello", first
    c.sendall(b"ok")
    while True:
        r, _, _ = select.select([lst, c], [], [])
        if c in r:
            sys.exit(f"round {{rnd}}: control readable, got {{c.recv(16)!r}}")
        d, _ = lst.accept()
        break
    data = b""
    while len(data) < 65536:
        chunk = d.recv(65536 - len(data))
        if not chunk:
            sys.exit(f"round {{rnd}}: data connection ended early")
        data += chunk
    c.sendall(hashlib.sha256(data).hexdigest().encode())
    d.close()
    c.close()
    rnd += 1
print("served", rnd)
"""

# Rounds whose control connection switched count; one that fell back to the overlay (the
# design's answer to a router or peer too slow under load) proved nothing and is run again.
CLIENT = (
    SCRIPT_PRELUDE
    + f"""
with socket.socket() as probe:
    own = netns_cookie(probe)
switched = fell_back = 0
deadline = time.monotonic() + 50
while switched < {ROUNDS}:
    if time.monotonic() > deadline:
        socket.create_connection((sys.argv[1], {PORT})).sendall(b"done!")
        sys.exit(f"only {{switched}} rounds switched ({{fell_back}} fell back)")
    c = socket.create_connection((sys.argv[1], {PORT}))
    c.sendall(b"hello")
    assert c.recv(2, socket.MSG_WAITALL) == b"ok"
    # The swap puts a socket of the host namespace under the fd number: wait for it, so that
    # the server sits in select() all through its own end's switch.
    wait = time.monotonic() + 10
    while netns_cookie(c) == own and time.monotonic() < wait:
        time.sleep(0.001)
    if netns_cookie(c) == own:
        fell_back += 1
    else:
        switched += 1
    d = socket.create_connection((sys.argv[1], {PORT}))
    payload = os.urandom(65536)
    d.sendall(payload)
    digest = c.recv(64, socket.MSG_WAITALL).decode()
    assert digest == hashlib.sha256(payload).hexdigest(), (switched, digest)
    d.close()
    c.close()
socket.create_connection((sys.argv[1], {PORT})).sendall(b"done!")
print("done", switched, fell_back)
"""
)


def test_select_never_reports_a_switch_point_as_readable(
    make_testbed: MakeTestbed, tmp_path: Path
) -> None:
    tb: Testbed = make_testbed("sl1", hosts=2, containers=1, routers=True)
    client_c, server_c = tb.hosts[0].containers[0], tb.hosts[1].containers[0]
    logs = {"server": tmp_path / "server.log", "client": tmp_path / "client.log"}
    server = start_script_server(
        server_c, SERVER, mode_env(tb, server_c, "shuntflow", threshold=1, log=logs["server"])
    )
    try:
        client = run_script_client(
            client_c,
            CLIENT,
            server_c.overlay_ip,
            mode_env(tb, client_c, "shuntflow", threshold=1, log=logs["client"]),
            timeout=90,
        )
    except subprocess.TimeoutExpired:
        server.kill()
        out, _ = server.communicate()
        pytest.fail(f"hung: a blocking read after select never returned\nserver: {out}")
    try:
        out, _ = server.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        out, _ = server.communicate()
        pytest.fail(
            f"server hung; client: {client.stdout} {client.stderr[-500:]}\nserver: {out}\n"
            + logs["server"].read_text()[-3000:]
        )
    assert client.returncode == 0, client.stderr[-2000:]
    word, switched, fell_back = client.stdout.split()
    # Every counted round's control connection was a socket of the host namespace (its netns
    # cookie) while the server sat in select(); the server served each round the client ran.
    assert word == "done" and int(switched) == ROUNDS, client.stdout
    assert server.returncode == 0 and out.split() == ["served", str(ROUNDS + int(fell_back))], out
    print(f"\nselect: {ROUNDS} rounds switched, {fell_back} fell back and were run again")
