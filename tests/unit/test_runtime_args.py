"""`shuntflow container-args`: the podman/docker run flags, as words, and its refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from shuntflow.cli import app
from shuntflow.native import library_path
from shuntflow.runtime import ArgsError, container_args
from shuntflow.wire import Mode


def test_flags_for_a_plain_host() -> None:
    words = container_args(Mode.SHUNTFLOW)
    assert words == [
        "--volume",
        f"{library_path().resolve()}:/opt/shuntflow/lib/libshuntflow.so:ro",
        "--volume",
        "/run/shuntflow:/run/shuntflow:ro",
        "--env",
        "LD_PRELOAD=/opt/shuntflow/lib/libshuntflow.so",
        "--env",
        "SHUNTFLOW_MODE=shuntflow",
        "--env",
        "SHUNTFLOW_ROUTER=/run/shuntflow/router.sock",
        "--env",
        "SHUNTFLOW_THRESHOLD=64",
        "--env",
        "SHUNTFLOW_OVERLAY=198.19.0.0/16",
    ]
    # Only podman's `--network ns:` is runtime-specific, and only with a namespace.
    assert "--network" not in words


def test_flags_with_everything(tmp_path: Path) -> None:
    lib = tmp_path / "my-musl-build.so"
    lib.write_bytes(b"")
    words = container_args(
        Mode.SLIM,
        Path("/run/shuntflow/x1/h2/router.sock"),
        library=lib,
        threshold=5,
        overlay="10.244.7.9/16",
        netns="x1-h2-c1",
        log="stderr",
        musl=True,
    )
    assert words[:2] == ["--network", "ns:/run/netns/x1-h2-c1"]
    assert f"{lib}:/opt/shuntflow/lib/libshuntflow-musl.so:ro" in words
    assert "/run/shuntflow/x1/h2:/run/shuntflow:ro" in words
    envs = [w for w in words if "=" in w and not w.startswith("-")]
    assert envs == [
        "LD_PRELOAD=/opt/shuntflow/lib/libshuntflow-musl.so",
        "SHUNTFLOW_MODE=slim",
        "SHUNTFLOW_ROUTER=/run/shuntflow/router.sock",
        "SHUNTFLOW_THRESHOLD=5",
        "SHUNTFLOW_OVERLAY=10.244.0.0/16",
        "SHUNTFLOW_LOG=stderr",
    ]


def test_the_container_path_is_fixed_whatever_the_host_file_is_called(tmp_path: Path) -> None:
    """A debug build or a renamed copy lands where the installed build does, so a container's
    LD_PRELOAD never depends on the host's file name (docs/deploy.md)."""
    lib = tmp_path / "libshuntflow-debug.so"
    lib.write_bytes(b"")
    for musl, inside in [(False, "libshuntflow.so"), (True, "libshuntflow-musl.so")]:
        words = container_args(Mode.SHUNTFLOW, library=lib, musl=musl)
        assert f"{lib.resolve()}:/opt/shuntflow/lib/{inside}:ro" in words
        assert f"LD_PRELOAD=/opt/shuntflow/lib/{inside}" in words
    r = CliRunner().invoke(app, ["container-args", "--library", str(lib), "--musl"])
    assert r.exit_code == 0, r.output
    assert f"--volume {lib.resolve()}:/opt/shuntflow/lib/libshuntflow-musl.so:ro " in r.output
    assert "--env LD_PRELOAD=/opt/shuntflow/lib/libshuntflow-musl.so " in r.output


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"socket": Path("/run/a b/router.sock")}, "no spaces"),
        ({"socket": Path("/run/a:b/router.sock")}, "no spaces"),
        ({"socket": Path("router.sock")}, "absolute"),
        ({"overlay": "10.0.0/8x"}, "not an IPv4 CIDR"),
        ({"threshold": 0}, "from 1 to 1000000000"),
        ({"threshold": 1_000_000_001}, "from 1 to 1000000000"),
        ({"log": "/tmp/x y"}, "no spaces"),
    ],
)
def test_refusals(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ArgsError, match=message):
        container_args(Mode.SHUNTFLOW, **kwargs)  # type: ignore[arg-type]


def test_cli() -> None:
    r = CliRunner().invoke(app, ["container-args", "--mode", "overlay", "--threshold", "9"])
    assert r.exit_code == 0, r.output
    assert "--env SHUNTFLOW_MODE=overlay --env SHUNTFLOW_ROUTER" in r.output
    assert len(r.output.strip().splitlines()) == 1
    bad = CliRunner().invoke(app, ["container-args", "--mode", "fast"])
    assert bad.exit_code == 2 and "--mode must be one of" in bad.output
    bad = CliRunner().invoke(app, ["container-args", "--testbed-container", "nope"])
    assert bad.exit_code == 2 and "not a testbed container name" in bad.output
