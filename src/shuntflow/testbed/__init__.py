"""The testbed: N hosts x M containers in network namespaces, joined by a kernel VXLAN overlay.

from shuntflow.testbed import Testbed, TestbedError
with Testbed.up(prefix="sf", hosts=2, containers=2) as tb:
    c1, c2 = tb.hosts[0].containers[0], tb.hosts[1].containers[0]
    c1.run(["ping", "-c1", c2.ip])          # inside sf-h1-c1
    c1.host.run(["ip", "-br", "addr"])      # inside sf-h1, c1's host
"""

from shuntflow.testbed.nodes import Container, Host, Node
from shuntflow.testbed.plan import TestbedError
from shuntflow.testbed.testbed import Testbed, list_testbeds

__all__ = ["Container", "Host", "Node", "Testbed", "TestbedError", "list_testbeds"]
