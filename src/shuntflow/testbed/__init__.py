"""The testbed: N hosts x M containers in network namespaces, joined by a kernel VXLAN overlay.

from shuntflow.testbed import Testbed, TestbedError
with Testbed.up(prefix="sf", hosts=2, containers=2) as tb:
    tb.run("sf-h1-c1", ["ping", "-c1", "198.19.2.1"])
"""

from shuntflow.testbed.plan import Container, Host, TestbedError
from shuntflow.testbed.testbed import Testbed, list_testbeds

__all__ = ["Container", "Host", "Testbed", "TestbedError", "list_testbeds"]
