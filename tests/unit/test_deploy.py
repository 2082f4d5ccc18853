"""The deployment files under deploy/: every Kubernetes manifest validates against the
Kubernetes schema (kubernetes-validate, strict: no unknown fields), the router settings they and
the systemd unit carry are accepted by the router's own config loader, the pieces agree with
each other (paths, flags, volumes), and systemd accepts the unit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml

from shuntflow.cli import app
from shuntflow.router.config import build_config, load_toml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"
# The oldest Kubernetes release still maintained when these were written, and the newest the
# validator knows: the manifests must hold for both.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((f"{path.name}:{doc['kind']}", doc))
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in documents() if d["kind"] == kind]


def test_the_manifests_are_there() -> None:
    kinds = sorted(d["kind"] for _, d in documents())
    assert kinds == ["ConfigMap", "DaemonSet", "Deployment", "Namespace", "Secret", "Service"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "doc"), documents(), ids=[n for n, _ in documents()])
def test_manifest_validates(name: str, doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_can_fail() -> None:
    (ds,) = by_kind("DaemonSet")
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, VERSIONS[0], strict=True)


def _key(tmp_path: Path) -> Path:
    key = tmp_path / "cluster.key"
    key.write_text("k" * 64)
    key.chmod(0o600)
    return key


def router_settings(text: str, tmp_path: Path, **overrides: Any) -> Any:
    toml = tmp_path / "router.toml"
    toml.write_text(text)
    return build_config(load_toml(toml), {"cluster_key": _key(tmp_path), **overrides})


def daemonset_router() -> dict[str, Any]:
    (ds,) = by_kind("DaemonSet")
    (router,) = ds["spec"]["template"]["spec"]["containers"]
    return dict(router)


def test_daemonset_privileges() -> None:
    (ds,) = by_kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert "hostIPC" not in pod
    assert pod["automountServiceAccountToken"] is False
    sc = daemonset_router()["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    # What they are for: the DaemonSet's comments; that they suffice for the socket guard:
    # tests/integration/test_socket_guard.py.
    assert sc["capabilities"] == {
        "drop": ["ALL"],
        "add": ["SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN"],
    }
    for init in pod["initContainers"]:
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    secret = next(v for v in pod["volumes"] if "secret" in v)
    assert secret["secret"]["defaultMode"] == 0o400  # the router refuses a group-readable key


def test_daemonset_flags_are_the_routers(tmp_path: Path) -> None:
    router_cmd = typer.main.get_command(app).commands["router"]  # type: ignore[attr-defined]
    known = {opt for p in router_cmd.params for opt in getattr(p, "opts", [])}
    args = daemonset_router()["args"]
    assert args[0] == "router"
    flags = dict(a.split("=", 1) for a in args[1:])
    assert set(flags) <= known, set(flags) - known
    # Kubernetes expands $(NODE_IP) from the downward API; check the rest with an address.
    env = {e["name"]: e for e in daemonset_router()["env"]}
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    values = {k: v.replace("$(NODE_IP)", "192.0.2.10") for k, v in flags.items()}
    assert values["--metrics"] == "192.0.2.10:9477"
    (cm,) = by_kind("ConfigMap")
    mounts = {m["name"]: m for m in daemonset_router()["volumeMounts"]}
    assert values["--config"] == mounts["config"]["mountPath"]
    assert mounts["config"]["subPath"] in cm["data"]
    cfg = router_settings(
        cm["data"]["router.toml"],
        tmp_path,
        host_ip=values["--host-ip"],
        metrics=values["--metrics"],
    )
    assert cfg.vxlan_dev == "flannel.1"
    assert cfg.allow == ("10.244.0.0/16",)
    # The paths in the settings are where the pod mounts them.
    assert cfg.socket.parent == Path(mounts["socket-dir"]["mountPath"])
    key_in_settings = load_toml(_write(tmp_path / "cm.toml", cm["data"]["router.toml"]))
    assert key_in_settings["cluster_key"].parent == Path(mounts["cluster-key"]["mountPath"])
    (secret,) = by_kind("Secret")
    assert key_in_settings["cluster_key"].name in secret["stringData"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_workload_finds_what_the_daemonset_puts_on_the_node() -> None:
    (ds,) = by_kind("DaemonSet")
    ds_volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    (deployment,) = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    (container,) = pod["containers"]
    mounts = {volumes[m["name"]]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    # The library: in the node directory the init container fills, at the path LD_PRELOAD names.
    lib_dir = ds_volumes["library"]["hostPath"]["path"]
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    assert any(lib_dir in arg for arg in init["command"])
    assert env["LD_PRELOAD"] == f"{mounts[lib_dir]}/libshuntflow.so"
    # The router's socket: in the node directory the router's pod mounts as its socket dir.
    sock_dir = ds_volumes["socket-dir"]["hostPath"]["path"]
    assert Path(env["SHUNTFLOW_ROUTER"]).parent == Path(mounts[sock_dir])
    assert env["SHUNTFLOW_MODE"] == "shuntflow"
    (service,) = by_kind("Service")
    assert service["spec"]["clusterIP"] == "None"  # pod addresses, which the library can switch


def test_systemd_settings(tmp_path: Path) -> None:
    cfg = router_settings(
        (SYSTEMD / "router.toml").read_text(),
        tmp_path,
        host_ip="192.0.2.10",
        metrics="192.0.2.10:9477",
    )
    assert str(cfg.socket) == "/run/shuntflow/router.sock"
    unit = (SYSTEMD / "shuntflow-router.service").read_text()
    assert "RuntimeDirectory=shuntflow" in unit
    default = (SYSTEMD / "shuntflow-router.default").read_text()
    assert re.search(r"^SHUNTFLOW_HOST_IP=\S+$", default, re.M)


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze missing: run scripts/setup.sh"
    shuntflow = Path(sys.executable).parent / "shuntflow"
    unit = (SYSTEMD / "shuntflow-router.service").read_text()
    assert "ExecStart=/usr/local/bin/shuntflow " in unit
    # Verified with the binary where this checkout has it (systemd checks it is executable).
    (tmp_path / "shuntflow-router.service").write_text(
        unit.replace("/usr/local/bin/shuntflow", str(shuntflow))
    )
    out = subprocess.run(
        [analyze, "verify", str(tmp_path / "shuntflow-router.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "shuntflow-router.service" not in out.stderr, out.stderr
