"""Real servers and clients from Debian packages across the VXLAN testbed, in each library mode.

Every test checks the application's own result (exit status, error counts, exact byte counts)
under load from the application's own client, then writes and reads back checked data on a
connection of ours and proves from the kernel which path that data took (tests/integration/apps.py
says how).

Every test runs on the Docker-style overlay in every mode; redis and nginx in shuntflow mode
run on the Flannel-style one too (`--layout flannel`: routed pod subnets, the router resolving
remote pods through the VXLAN device's routes), which keeps the suite's time in bounds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shuntflow.testbed import Testbed

from .apps import MODES, RESP_CLIENT, Apps, PathBytes, assert_path, redis_server
from .locks import prefix_lock

pytestmark = pytest.mark.root

PREFIXES = {"docker": "at", "flannel": "dy2"}


def cases(flannel: bool = False) -> list[Any]:
    """(layout, mode) for a test: every mode on docker (ids as plain as before), and
    shuntflow mode on flannel when asked."""
    out = [pytest.param("docker", m, id=m) for m in MODES]
    if flannel:
        out.append(pytest.param("flannel", "shuntflow", id="flannel-shuntflow"))
    return out


@pytest.fixture(scope="module")
def layout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def testbed(layout: str) -> Iterator[Testbed]:
    """One 2x2 testbed with routers per layout; pytest runs a layout's tests together."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    prefix = PREFIXES[layout]
    with prefix_lock(prefix):
        Testbed.down_prefix(prefix)
        try:
            tb = Testbed.up(prefix=prefix, hosts=2, containers=2, routers=True, layout=layout)
        except BaseException:
            Testbed.down_prefix(prefix)
            raise
        try:
            yield tb
        finally:
            tb.down()


@pytest.fixture(scope="module")
def apps(testbed: Testbed) -> Apps:
    return Apps(testbed)


# ---- redis -------------------------------------------------------------------------------


# Per command: with io-threads spinning, a 2-vCPU machine that is busy elsewhere serves only a few
# hundred requests a second (seen here in every mode), so the load stays modest.
REDIS_REQUESTS = 8000


@pytest.mark.parametrize(
    ("layout", "mode"), cases(flannel=True), indirect=["layout"], scope="module"
)
def test_redis(apps: Apps, mode: str, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    server = [
        *redis_server(apps.server_ip),
        "--dir",
        str(tmp_path),
        "--io-threads",
        "2",
        "--io-threads-do-reads",
        "yes",
    ]
    with apps.server(server, mode, 6379):
        # Load on long connections, with a BGSAVE fork while they are live.
        before = apps.path()
        bench = apps.client_popen(
            [
                "redis-benchmark",
                "-h",
                apps.server_ip,
                "-c",
                "4",
                "-n",
                str(REDIS_REQUESTS),
                "-d",
                "1024",
                "-t",
                "set,get",
                "-q",
                "--csv",
            ],
            mode,
        )
        time.sleep(0.3)
        save = apps.client(["redis-cli", "-h", apps.server_ip, "bgsave"], mode)
        assert "Background saving started" in save.stdout, save.stdout + save.stderr
        out, _ = bench.communicate(timeout=120)
        assert bench.returncode == 0, out
        rates = dict(re.findall(r'"(SET|GET)","([0-9.]+)"', out))
        assert set(rates) == {"SET", "GET"} and all(float(v) > 0 for v in rates.values()), out
        # The values of 1,024 B written, and read back: each crossed one path or the other.
        assert_conserved(apps.path() - before, 2 * REDIS_REQUESTS * 1024)

        result, path = apps.checked_phase(REDIS_CHECK, mode)
        assert result["checked"] == 300 and result["bad"] == 0, result
        assert_path(mode, PathBytes(), path, result["payload"], conns=1)


def assert_conserved(path: PathBytes, payload: int) -> None:
    """A load phase's bytes each crossed one path or the other. Which share took which path is
    not asserted: in shuntflow mode that depends on how soon the switches complete."""
    assert path.overlay_payload + path.host_payload >= payload, f"{path} for {payload} bytes"


REDIS_CHECK = (
    RESP_CLIENT
    + r"""
wait_switched(s, lambda: call(b"PING"))
payload = 0
sizes = [int.from_bytes(os.urandom(2), "big") % 4000 + 1 for _ in range(300)]
values = {b"key:%d" % i: os.urandom(n) for i, n in enumerate(sizes)}
ok = sum(call(b"SET", k, v) == b"+OK\r\n" for k, v in values.items())
bad = sum(call(b"GET", k) != v for k, v in values.items()) + len(values) - ok
print(json.dumps({"checked": len(values), "bad": bad, "payload": payload}))
"""
)


# ---- memcached ---------------------------------------------------------------------------

MEMCACHED_CHECK = r"""
s = socket.create_connection((sys.argv[1], 11211))
f = s.makefile("rwb")
payload = 0
def send(data):
    global payload
    f.write(data)
    f.flush()
    payload += len(data)
def readline():
    global payload
    line = f.readline()
    payload += len(line)
    return line
def ping():
    send(b"version\r\n")
    assert readline().startswith(b"VERSION ")
wait_switched(s, ping)
payload = 0
values = {f"k{i}": os.urandom(int.from_bytes(os.urandom(2), "big") % 4000 + 1) for i in range(1000)}
bad = 0
for k, v in values.items():
    send(b"set %s 0 0 %d\r\n%s\r\n" % (k.encode(), len(v), v))
    bad += readline() != b"STORED\r\n"
for k, v in values.items():
    send(b"get %s\r\n" % k.encode())
    header = readline().split()
    data = f.read(int(header[3]) + 2)
    payload += len(data)
    bad += data[:-2] != v
    bad += readline() != b"END\r\n"
print(json.dumps({"checked": len(values), "bad": bad, "payload": payload}))
"""


@pytest.mark.parametrize(("layout", "mode"), cases(), indirect=["layout"], scope="module")
def test_memcached(apps: Apps, mode: str) -> None:
    # -u nobody: memcached drops root after start, the library must keep working.
    server = [
        "memcached",
        "-u",
        "nobody",
        "-l",
        apps.server_ip,
        "-p",
        "11211",
        "-t",
        "4",
        "-m",
        "256",
        "-U",
        "0",
    ]
    with apps.server(server, mode, 11211):
        slap = apps.client(
            [
                "memcslap",
                f"--servers={apps.server_ip}:11211",
                "--concurrency=4",
                "--execute-number=4000",
                "--binary",
            ],
            mode,
        )
        assert slap.returncode == 0, slap.stdout + slap.stderr
        assert re.search(r"Time to set\s+16000 keys by\s+4 threads", slap.stdout), slap.stdout
        result, path = apps.checked_phase(MEMCACHED_CHECK, mode)
        assert result["checked"] == 1000 and result["bad"] == 0, result
        assert_path(mode, PathBytes(), path, result["payload"], conns=1)


# ---- nginx -------------------------------------------------------------------------------

HTTP_CHECK = r"""
import hashlib, http.client
conn = http.client.HTTPConnection(sys.argv[1], 8080)
def get(name):
    conn.request("GET", "/" + name)
    r = conn.getresponse()
    body = r.read()
    assert r.status == 200, r.status
    return body
get("f1k")
wait_switched(conn.sock, lambda: get("f1k"))
sums, payload = {}, 0
for _ in range(5):
    for name in json.loads(sys.argv[3]):
        body = get(name)
        payload += len(body)  # headers not counted: the host path must carry at least the bodies
        sums.setdefault(name, set()).add(hashlib.sha256(body).hexdigest())
print(json.dumps({"sums": {k: sorted(v) for k, v in sums.items()}, "payload": payload}))
"""


@pytest.fixture(scope="module")
def docroot() -> Iterator[tuple[Path, dict[str, str]]]:
    root = Path(tempfile.mkdtemp(prefix="sf-nginx-"))
    (root / "html").mkdir()
    (root / "logs").mkdir()
    (root / "tmp").mkdir()
    sums = {}
    for name, size in (("f1k", 1000), ("f100k", 100_000), ("f3m", 3_000_000)):
        data = os.urandom(size)
        (root / "html" / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    for p in [root, *root.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o644)
    yield root, sums
    for p in sorted(root.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    root.rmdir()


def nginx_conf(root: Path, ip: str) -> Path:
    conf = root / "nginx.conf"
    conf.write_text(f"""
worker_processes 2;
user www-data;
daemon off;
pid {root}/logs/nginx.pid;
error_log {root}/logs/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 100000;
  server {{ listen {ip}:8080; root {root}/html; }}
}}
""")
    return conf


@pytest.mark.parametrize(
    ("layout", "mode"), cases(flannel=True), indirect=["layout"], scope="module"
)
def test_nginx(apps: Apps, mode: str, docroot: tuple[Path, dict[str, str]]) -> None:
    root, sums = docroot
    conf = nginx_conf(root, apps.server_ip)
    with apps.server(["nginx", "-p", str(root), "-c", str(conf)], mode, 8080):
        url = f"http://{apps.server_ip}:8080"
        # Short connections (ab without -k): in shuntflow mode, under the threshold, they never
        # leave the overlay; in slim mode each is switched at setup.
        before = apps.path()
        ab = apps.client(["ab", "-n", "300", "-c", "4", f"{url}/f1k"], mode)
        assert "Complete requests:      300" in ab.stdout, ab.stdout + ab.stderr
        assert "Failed requests:        0" in ab.stdout, ab.stdout
        short = apps.path() - before
        if mode == "slim":
            assert short.host_payload >= 300 * 1000, f"slim: short connections: {short}"
        else:
            assert short.host_payload <= 0, f"{mode}: short connections switched: {short}"
        # Keep-alive load: sendfile + TCP_CORK on the server side of a switch.
        before = apps.path()
        wrk = apps.client(["wrk", "-t2", "-c8", "-d2s", f"{url}/f100k"], mode)
        assert "Requests/sec" in wrk.stdout, wrk.stdout + wrk.stderr
        assert "Non-2xx" not in wrk.stdout, wrk.stdout
        assert "Socket errors" not in wrk.stdout, wrk.stdout
        requests = int(re.search(r"(\d+) requests in", wrk.stdout).group(1))  # type: ignore[union-attr]
        assert_conserved(apps.path() - before, requests * 100_000)
        # Every byte of every file, over one keep-alive connection, after its switch.
        result, path = apps.checked_phase(HTTP_CHECK, mode, json.dumps(list(sums)))
        assert result["sums"] == {k: [v] for k, v in sums.items()}, result
        assert_path(mode, PathBytes(), path, result["payload"], conns=1)


# ---- sockperf and iperf3 -----------------------------------------------------------------


@pytest.mark.parametrize(("layout", "mode"), cases(), indirect=["layout"], scope="module")
def test_sockperf_ping_pong(apps: Apps, mode: str) -> None:
    # A port per mode: sockperf's listener does not reuse one left in TIME_WAIT by the last run.
    port = 11111 + MODES.index(mode)
    with apps.server(
        ["sockperf", "server", "--tcp", "-i", apps.server_ip, "-p", str(port)], mode, port
    ):
        before = apps.path()
        client = apps.client_popen(
            [
                "sockperf",
                "ping-pong",
                "--tcp",
                "-i",
                apps.server_ip,
                "-p",
                str(port),
                "-t",
                "3",
                "-m",
                "64",
            ],
            mode,
        )
        # sockperf connects, waits, warms up, then measures: look while it runs.
        during: list[str] = []
        deadline = time.monotonic() + 30
        while client.poll() is None and time.monotonic() < deadline:
            during += apps.host_connections()
            time.sleep(0.2)
        out, _ = client.communicate(timeout=30)
        path = apps.path() - before
    assert client.returncode == 0 and "avg-latency" in out, out
    assert "ERROR" not in out
    if mode == "overlay":
        assert during == [] and path.host_payload <= 0, (during, path)
    else:
        # The live connection is a socket of the host namespaces, between the underlay IPs, and
        # the host path carried its 64 B messages.
        assert any(apps.tb.hosts[1].underlay_ip in line for line in during), during
        assert path.host_payload >= 64 * 1000, path


IPERF_BYTES = 100 << 20
IPERF_BLOCK = 128 << 10


@pytest.mark.parametrize(("layout", "mode"), cases(), indirect=["layout"], scope="module")
def test_iperf3(apps: Apps, mode: str) -> None:
    port = 5201 + MODES.index(mode)  # a port per mode, as for sockperf
    with apps.server(["iperf3", "-s", "-B", apps.server_ip, "-p", str(port), "-1"], mode, port):
        before = apps.path()
        client = ["iperf3", "-c", apps.server_ip, "-p", str(port), "-J"]
        run = apps.client([*client, "-n", str(IPERF_BYTES), "-l", str(IPERF_BLOCK)], mode)
        path = apps.path() - before
    report = json.loads(run.stdout)
    assert "error" not in report, report.get("error")
    # iperf3 writes whole 128 KiB blocks and checks the count after each; about 1 run in 3 it
    # writes one block past -n (seen in overlay mode too).
    sent = report["end"]["sum_sent"]["bytes"]
    assert sent in (IPERF_BYTES, IPERF_BYTES + IPERF_BLOCK), report["end"]["sum_sent"]
    # iperf3's server stops reading when the client's TEST_END arrives on the control
    # connection, which can overtake data still in flight; it then closes, and the kernel
    # drops that tail (esnet/iperf#382; seen in overlay mode too, where the library never
    # switches: 100,532,224 of 104,857,600 counted). So the sender's count is exact and the
    # receiver's is what the paths must have carried.
    received = report["end"]["sum_received"]["bytes"]
    assert 0 < received <= sent, report["end"]
    if mode == "shuntflow":
        # Where the stream's head went depends on how soon the switch completed; every byte
        # crossed one path or the other (the content and path of a switched stream are proved
        # by the other tests' checked phases).
        assert_conserved(path, received)
    else:
        # Slim switches both of iperf3's connections (control and data) at setup.
        assert_path(mode, PathBytes(), path, received, conns=2, setup=True)
