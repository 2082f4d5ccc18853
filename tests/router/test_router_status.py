"""The control socket (`<socket>.ctl`, JSON lines), `shuntflow status`, and the router's CLI:
flags, TOML config, and one-line errors with exit 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shuntflow.native import router_command
from shuntflow.router.cli import find_routers
from shuntflow.router.config import ConfigError, RouterConfig, build_config, load_toml
from shuntflow.router.control import query
from shuntflow.router.testing import (
    ConnRow,
    FakeLibrary,
    RouterProcess,
    free_port,
    write_key_file,
)
from shuntflow.wire import Mode, Status, Tuple4
from shuntflow.wire import Path as ConnPath

from ..support import SHUNTFLOW
from .support import start_pair

pytestmark = pytest.mark.router

MAP = {"198.19.1.0/24": "127.0.0.1", "198.19.2.0/24": "127.0.0.2"}
BASE = ["--socket", "{dir}/r.sock", "--host-ip", "127.0.0.1", "--map", "{map}"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RouterProcess, RouterProcess]]:
    a, b, _ = start_pair(tmp_path_factory.mktemp("rt-status"), MAP, names=("h1", "h2"))
    yield a, b
    b.stop()
    a.stop()


def test_status_json_has_clients_and_conn_info(pair: tuple[RouterProcess, RouterProcess]) -> None:
    a, b = pair
    t1 = Tuple4.parse("198.19.1.1:40000", "198.19.2.1:80")
    t2 = Tuple4.parse("198.19.1.1:40001", "198.19.2.2:6379")
    rows = [
        ConnRow(t1, ConnPath.HOST, 1000, 123456),
        ConnRow(t2, ConnPath.OVERLAY, 42, 0),
        ConnRow(Tuple4.parse("198.19.1.1:40002", "198.19.2.2:6379"), ConnPath.SWITCHING, 7, 0),
        ConnRow(Tuple4.parse("198.19.1.1:40003", "198.19.2.2:6379"), ConnPath.PINNED, 9, 0),
    ]
    with (
        FakeLibrary(a.socket, pid=111, rows=rows, switches=(3, 1)),
        FakeLibrary(a.socket, pid=222, mode=Mode.SLIM, answer_stats=False),
        FakeLibrary(a.socket, pid=333, mode=Mode.OVERLAY),
        FakeLibrary(b.socket, owned={t1.mirrored()}) as lb,
        FakeLibrary(a.socket, pid=444) as la,
    ):
        assert la.wait_result(la.request(t1)).msg.status == Status.OK
        lb.wait_host([t1.key()])
        start = time.monotonic()
        st = query(a.control)
        elapsed = time.monotonic() - start
        # One silent library costs the 500 ms stats timeout (a timer never fires early), and the
        # answer still came within the query's own 5 s: the others' rows are all there below.
        assert elapsed >= 0.5, elapsed
        info = st["router"]
        assert info["host_ip"] == "127.0.0.1" and info["pid"] == a.pid
        assert info["clients"] == 4 and info["clients_ready"] == 4
        assert info["switches_served"] == 1 and info["switches_initiated"] == 1
        assert info["uptime_s"] > 0 and info["config"]["claim_timeout_ms"] == 250
        procs = {p["pid"]: p for p in st["processes"]}
        assert set(procs) == {111, 222, 333, 444}
        p = procs[111]
        assert p["complete"] and p["mode"] == "shuntflow"
        assert (p["switches_done"], p["switches_failed"]) == (3, 1)
        assert p["connections"] == [
            {
                "pid": 111,
                "local": "198.19.1.1:40000",
                "remote": "198.19.2.1:80",
                "path": "host",
                "overlay_bytes": 1000,
                "host_bytes": 123456,
            },
            {
                "pid": 111,
                "local": "198.19.1.1:40001",
                "remote": "198.19.2.2:6379",
                "path": "overlay",
                "overlay_bytes": 42,
                "host_bytes": 0,
            },
            {
                "pid": 111,
                "local": "198.19.1.1:40002",
                "remote": "198.19.2.2:6379",
                "path": "switching",
                "overlay_bytes": 7,
                "host_bytes": 0,
            },
            {
                "pid": 111,
                "local": "198.19.1.1:40003",
                "remote": "198.19.2.2:6379",
                "path": "pinned",
                "overlay_bytes": 9,
                "host_bytes": 0,
            },
        ]
        assert not procs[222]["complete"] and procs[222]["mode"] == "slim"
        assert procs[222]["connections"] == []
        assert procs[333]["complete"] and procs[333]["connections"] == []
        assert procs[444]["router_switches_ok"] == 1

        # `shuntflow status --json` over both routers.
        out = subprocess.run(
            [SHUNTFLOW, "status", "--json", "--socket", str(a.socket), "--socket", str(b.socket)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert [r["status"]["router"]["host_ip"] for r in doc["routers"]] == [
            "127.0.0.1",
            "127.0.0.2",
        ]
        # The table.
        out = subprocess.run(
            [SHUNTFLOW, "status", "--socket", str(a.socket)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert out.returncode == 0, out.stderr
        assert "198.19.1.1:40000" in out.stdout and "120.6 KiB" in out.stdout
        assert "switching" in out.stdout and "(no answer in time)" in out.stdout


def test_control_socket_protocol(pair: tuple[RouterProcess, RouterProcess]) -> None:
    a, _b = pair
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(a.control))
        f = s.makefile("rwb")
        for line, check in [
            (b"not json\n", lambda r: "error" in r),
            (b'{"cmd": "bogus"}\n', lambda r: "unknown cmd" in r["error"]),
            (b"[1]\n", lambda r: "error" in r),
            (b'{"cmd": "ping"}\n', lambda r: r["ok"] is True and r["pid"] == a.pid),
            (b'{"cmd": "status"}\n', lambda r: r["router"]["host_ip"] == "127.0.0.1"),
        ]:
            f.write(line)
            f.flush()
            assert check(json.loads(f.readline())), line
        f.write(b"x" * 70000 + b"\n")
        f.flush()
        assert "too long" in json.loads(f.readline())["error"]
    assert query(a.control, "ping")["ok"] is True  # still serving


def test_status_finds_testbed_routers(
    pair: tuple[RouterProcess, RouterProcess], tmp_path: Path
) -> None:
    a, b = pair
    run = tmp_path / "run"
    (run / "rt-x").mkdir(parents=True)
    # The testbed's state.json names each host's router socket.
    state = {"prefix": "rt-x", "hosts": [{"index": 1, "router_socket": str(a.socket)}]}
    (run / "rt-x" / "state.json").write_text(json.dumps(state))
    assert find_routers("rt-x", run) == [a.socket]
    # The h*/router.sock layout is found without state.json too.
    (run / "rt-y" / "h2").mkdir(parents=True)
    (run / "rt-y" / "h2" / "router.sock").symlink_to(b.socket)
    assert find_routers("rt-y", run) == [run / "rt-y" / "h2" / "router.sock"]
    assert find_routers("rt-none", run) == []


def test_status_reports_dead_router(tmp_path: Path) -> None:
    out = subprocess.run(
        [SHUNTFLOW, "status", "--json", "--socket", str(tmp_path / "nope.sock")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "error" in json.loads(out.stdout)["routers"][0]
    out = subprocess.run(
        [SHUNTFLOW, "status", "--prefix", "rt-surely-absent"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1 and "no routers found" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host-ip", "127.0.0.1", "--map", "{map}"], "missing --socket"),
        (["--socket", "{dir}/r.sock", "--map", "{map}"], "missing --host-ip"),
        (["--socket", "{dir}/r.sock", "--host-ip", "nope", "--map", "{map}"], "not an IPv4"),
        (["--socket", "{dir}/r.sock", "--host-ip", "0.0.0.0", "--map", "{map}"], "unicast"),
        (["--socket", "{dir}/r.sock", "--host-ip", "127.0.0.1"], "need --vxlan-dev or --map"),
        (["--socket", "{dir}/r.sock", "--host-ip", "127.0.0.1", "--map", "{dir}/x"], "no such"),
        (
            [*BASE[:4], "--map", "{bad}", "--cluster-key", "{key}"],
            "--map",
        ),
        (
            [*BASE, "--peer-port", "70000"],
            "not a TCP port",
        ),
        (
            [*BASE, "--claim-timeout-ms", "0"],
            "--claim-timeout-ms",
        ),
        (
            ["--socket", "{dir}/r.sock", "--host-ip", "127.0.0.1", "--vxlan-dev", "x" * 20],
            "not an interface name",
        ),
        (["--config", "{dir}/missing.toml"], "no such file"),
        (["--config", "{badtoml}"], "unknown key"),
        (BASE, "missing --cluster-key"),
        ([*BASE, "--cluster-key", "{dir}/nokey"], "no such file"),
        ([*BASE, "--cluster-key", "{openkey}"], "mode 0640 lets group or others read it"),
        ([*BASE, "--cluster-key", "{shortkey}"], "need at least 32"),
        ([*BASE, "--cluster-key", "{key}", "--deny", "198.19.0.0/33"], "policy rule"),
        ([*BASE, "--cluster-key", "{key}", "--allow", "*:0"], "ports must be 1..65535"),
        ([*BASE, "--cluster-key", "{key}", "--peer-allow", "nope"], "--peer-allow 'nope'"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "map.json").write_text(json.dumps(MAP))
    (tmp_path / "bad.json").write_text("[]")
    (tmp_path / "bad.toml").write_text('socket = "r.sock"\nhost_ip = "127.0.0.1"\nfoo = 1\n')
    write_key_file(tmp_path / "key")
    write_key_file(tmp_path / "short.key", b"too short")
    os.chmod(write_key_file(tmp_path / "open.key"), 0o640)
    subst = {
        "key": str(tmp_path / "key"),
        "shortkey": str(tmp_path / "short.key"),
        "openkey": str(tmp_path / "open.key"),
        "dir": str(tmp_path),
        "map": str(tmp_path / "map.json"),
        "bad": str(tmp_path / "bad.json"),
        "badtoml": str(tmp_path / "bad.toml"),
    }
    argv = [a.format(**subst) for a in args]
    out = subprocess.run([SHUNTFLOW, "router", *argv], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shuntflow router: error:"), out.stderr
    assert message in lines[0]
    assert not (tmp_path / "r.sock").exists()


def test_toml_config(tmp_path: Path) -> None:
    (tmp_path / "map.json").write_text(json.dumps(MAP))
    port = free_port(["127.0.0.1"])
    cfg_file = tmp_path / "router.toml"
    cfg_file.write_text(
        "[router]\n"
        'socket = "sock/router.sock"\n'
        'host-ip = "127.0.0.1"\n'
        f"peer_port = {port}\n"
        'map = "map.json"\n'
        "claim-timeout-ms = 80\n"
        "backoff_max_ms = 2000\n"
        'cluster-key = "cluster.key"\n'
        'deny = ["198.19.2.0/24:6379", ":11211"]\n'
        "owner-check = false\n"
    )
    write_key_file(tmp_path / "cluster.key")
    values = load_toml(cfg_file)
    assert values["socket"] == tmp_path / "sock" / "router.sock"  # relative to the file
    assert values["map_file"] == tmp_path / "map.json"
    cfg = build_config(values, {"claim_timeout_ms": 90})  # flags win
    assert isinstance(cfg, RouterConfig) and cfg.claim_timeout_ms == 90
    assert cfg.backoff_max_ms == 2000 and cfg.peer_port == port
    assert cfg.cluster_key == tmp_path / "cluster.key"
    assert cfg.deny == ("198.19.2.0/24:6379", ":11211") and cfg.owner_check is False
    assert build_config(values, {"deny": ("198.19.9.9",)}).deny == ("198.19.9.9",)
    assert cfg.control_socket == tmp_path / "sock" / "router.sock.ctl"
    with pytest.raises(ConfigError, match="peer_port must be int"):
        build_config({**values, "peer_port": "4790"}, {})
    # The real thing: a router started from the file alone.
    log = tmp_path / "router.log"
    proc = subprocess.Popen(
        router_command([SHUNTFLOW, "router", "--config", str(cfg_file), "--log-file", str(log)]),
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                st = query(tmp_path / "sock" / "router.sock.ctl")
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert st["router"]["peer_port"] == port
        assert st["router"]["config"]["claim_timeout_ms"] == 80
        security = st["router"]["security"]
        assert security["policy"] == {"allow": [], "deny": ["198.19.2.0/24:6379", ":11211"]}
        assert security["owner_check"] is False
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        if proc.stderr:
            proc.stderr.close()
    assert not (tmp_path / "sock" / "router.sock").exists()
    assert "event=router_started" in log.read_text()
