"""The testbed's names, addresses and argument parsing: no root, no kernel state."""

from __future__ import annotations

import ipaddress

import pytest
from typer.testing import CliRunner

from shuntflow.cli import app
from shuntflow.testbed import plan
from shuntflow.testbed.cli import ExecOptions, split_exec_args
from shuntflow.testbed.nodes import host_from_dict, host_to_dict, plan_hosts
from shuntflow.testbed.plan import (
    MAX_CONTAINERS,
    MAX_HOSTS,
    TestbedError,
    TestbedUsageError,
    container_prefix,
    is_testbed_netns,
    parse_cpu_list,
    validate_count,
    validate_prefix,
)


@pytest.mark.parametrize("prefix", ["sf", "a", "tt1", "abcdefgh", "x9"])
def test_valid_prefixes(prefix: str) -> None:
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["", "Bad_Prefix!", "1ab", "abcdefghi", "a-b", "SF", "a b"])
def test_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(TestbedUsageError, match="invalid prefix"):
        validate_prefix(prefix)


@pytest.mark.parametrize("value", [0, -1, 21, True])
def test_count_bounds(value: int) -> None:
    with pytest.raises(TestbedError, match="between 1 and 20"):
        validate_count("hosts", value, 20)


def test_largest_plan_fits_interface_names_and_address_plan() -> None:
    hosts = plan_hosts("abcdefgh", MAX_HOSTS, MAX_CONTAINERS)
    macs = set()
    for h in hosts:
        assert ipaddress.ip_address(h.underlay_ip) in ipaddress.ip_network("198.18.0.0/16")
        for c in h.containers:
            assert ipaddress.ip_address(c.overlay_ip) in ipaddress.ip_network("198.19.0.0/16")
            assert c.mac.startswith("02:42:c6:13:")
            macs.add(c.mac)
    assert len(macs) == MAX_HOSTS * MAX_CONTAINERS
    for name in ("abcdefgh-ulbr", "abcdefgh-eth0", "abcdefgh-h20", "abcdefgh-c20"):
        assert len(name) <= 15  # IFNAMSIZ - 1


def test_plan_addresses() -> None:
    (h1, h2) = plan_hosts("sf", 2, 2)
    c = h2.containers[0]
    assert (h2.netns, h2.underlay_ip, h2.vxlan_dev) == ("sf-h2", "198.18.0.2", "sf-vx")
    assert str(h2.router_socket) == "/run/shuntflow/sf/h2/router.sock"
    assert (c.name, c.netns, c.host_index, c.index) == ("sf-h2-c1", "sf-h2-c1", 2, 1)
    assert (c.overlay_ip, c.mac) == ("198.19.2.1", "02:42:c6:13:02:01")
    assert plan_hosts("sf", 12, 11)[11].containers[10].mac == "02:42:c6:13:0c:0b"
    assert host_from_dict(host_to_dict(h1)) == h1
    # Each container knows its host, also when read back from the state file.
    back = host_from_dict(host_to_dict(h2))
    assert all(c.host is h for h in (h1, h2, back) for c in h.containers)
    assert (back.containers[0].host_index, back.containers[0].ip, back.ip) == (2, c.ip, h2.ip)
    wrong = host_to_dict(h1)
    wrong["containers"][0]["host_index"] = 2  # type: ignore[index]
    with pytest.raises(ValueError, match="container sf-h1-c1 of host 2 under sf-h1"):
        host_from_dict(wrong)


def test_down_patterns_match_only_the_prefix() -> None:
    mine = ["sf-ul", "sf-h1", "sf-h12", "sf-h1-c1", "sf-h20-c20"]
    others = [
        "sf2-h1",
        "sf-h1x",
        "xsf-h1",
        "sf-ulbr",
        "sf-h",
        "sf-h1-c",
        "sf",
        "sf-h1-c1-x",
        "rt1-h1",
    ]
    assert all(is_testbed_netns("sf", n) for n in mine)
    assert not any(is_testbed_netns("sf", n) for n in others)


def test_container_prefix() -> None:
    assert container_prefix("sf-h1-c2") == "sf"
    assert container_prefix("tt12-h3-c4") == "tt12"
    assert container_prefix("sf-h1") is None
    assert container_prefix("foo") is None


def test_cpu_lists() -> None:
    assert parse_cpu_list("1") == {1}
    assert parse_cpu_list("0,1") == {0, 1}
    assert parse_cpu_list("0-2,5") == {0, 1, 2, 5}
    for bad in ("", "a", "1-0", "1,,2", "-1"):
        with pytest.raises(TestbedUsageError):
            parse_cpu_list(bad)


def test_exec_options_after_the_container() -> None:
    o = split_exec_args(ExecOptions(), ["--cpu", "1", "--host-net", "--", "sh", "-c", "x"])
    assert (o.cpu, o.host_net, o.command) == ("1", True, ["sh", "-c", "x"])
    o = split_exec_args(ExecOptions(), ["--mode=slim", "--threshold", "3", "--", "--", "a"])
    assert (o.mode, o.threshold, o.command) == ("slim", "3", ["--", "a"])
    o = split_exec_args(ExecOptions(cpu="0"), ["ls", "--cpu", "1"])
    assert (o.cpu, o.command) == ("0", ["ls", "--cpu", "1"])  # the command's own options
    o = split_exec_args(ExecOptions(), ["--", "--host-net"])
    assert (o.host_net, o.command) == (False, ["--host-net"])
    with pytest.raises(TestbedUsageError, match="unknown exec option"):
        split_exec_args(ExecOptions(), ["--bogus", "--", "true"])
    with pytest.raises(TestbedUsageError, match="needs a value"):
        split_exec_args(ExecOptions(), ["--cpu"])


@pytest.mark.parametrize(
    "args",
    [["testbed"], ["testbed", "up"], ["testbed", "down"], ["testbed", "status"], ["exec"]],
)
def test_every_command_has_help(args: list[str]) -> None:
    r = CliRunner().invoke(app, [*args, "--help"])
    assert r.exit_code == 0, r.output
    assert "--help" in r.output


def test_flannel_layout_addresses() -> None:
    assert plan.LAYOUTS == ("docker", "flannel") and plan.DEFAULT_LAYOUT == "docker"
    assert plan.validate_layout("flannel") == "flannel"
    assert plan.pod_subnet(3) == "198.19.3.0/24"
    assert plan.vtep_ip(3) == "198.19.3.0"
    assert plan.pod_gateway(3) == "198.19.3.254"
    # The VTEP's MAC is nobody else's: containers count from 1.
    assert plan.vtep_mac(3) == "02:42:c6:13:03:00"
    macs = {c.mac for h in plan_hosts("x", 3, plan.MAX_CONTAINERS) for c in h.containers}
    assert plan.vtep_mac(3) not in macs
    ips = {c.overlay_ip for h in plan_hosts("x", 3, plan.MAX_CONTAINERS) for c in h.containers}
    assert not ips & {plan.vtep_ip(3), plan.pod_gateway(3)}


@pytest.mark.parametrize("layout", ["", "Docker", "calico", "flannel "])
def test_bad_layout(layout: str) -> None:
    with pytest.raises(plan.TestbedUsageError, match="invalid layout"):
        plan.validate_layout(layout)


def test_metrics_address_per_host() -> None:
    (h,) = plan_hosts("x", 1, 1)
    assert h.metrics_url == "http://198.18.0.1:9477/metrics"


def test_up_refuses_an_unknown_layout() -> None:
    r = CliRunner().invoke(app, ["testbed", "up", "--prefix", "dy9", "--layout", "calico"])
    assert r.exit_code == 2
    assert "invalid layout 'calico': use docker or flannel" in r.output
