"""Testbed fixtures for integration tests of every part.

Each part uses its own prefixes so concurrent runs never collide (testbed `tt*`, router `rt*`,
library `lt*`, bench `bt*`):

    TESTBED_PREFIX = "rt1"          # module-level: the `testbed` fixture below builds it
    TESTBED_ROUTERS = True          # optional, default False (also TESTBED_HOSTS/_CONTAINERS)

    def test_x(testbed): ...        # one 2x2 testbed per module, torn down after it

    @pytest.mark.parametrize("testbed", ["rt2"], indirect=True)
    def test_y(testbed): ...        # or the prefix as an indirect parameter

    def test_z(make_testbed):
        tb = make_testbed("rt3", hosts=2, containers=1, routers=True)   # torn down after the test
        # router_args=["--deny", ":6379"]: extra `shuntflow router` flags for every router
        # layout="flannel": the overlay as Flannel's VXLAN backend programs it (default docker)

A stale testbed of the same prefix (left by a killed run) is removed before building.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack

import pytest

from shuntflow.testbed import Testbed

from ..conftest import NEEDS_ROOT
from .locks import prefix_lock

MakeTestbed = Callable[..., Testbed]


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(NEEDS_ROOT, pytrace=False)


def _fresh(
    prefix: str,
    hosts: int,
    containers: int,
    routers: bool,
    router_args: Sequence[str] = (),
    layout: str = "docker",
) -> Testbed:
    Testbed.down_prefix(prefix)
    return Testbed.up(
        prefix=prefix,
        hosts=hosts,
        containers=containers,
        routers=routers,
        router_args=router_args,
        layout=layout,
    )


class _Factory:
    def __init__(self) -> None:
        self.made: list[str] = []
        self.locks = ExitStack()

    def __call__(
        self,
        prefix: str,
        hosts: int = 2,
        containers: int = 2,
        routers: bool = False,
        router_args: Sequence[str] = (),
        layout: str = "docker",
    ) -> Testbed:
        _require_root()
        self.locks.enter_context(prefix_lock(prefix))
        # Recorded before building: a failed `up` may still leave something to remove.
        self.made.append(prefix)
        return _fresh(prefix, hosts, containers, routers, router_args, layout)

    def teardown(self) -> None:
        errors = []
        for prefix in reversed(self.made):
            try:
                Testbed.down_prefix(prefix)
            except Exception as e:  # keep tearing down the others
                errors.append(e)
        self.locks.close()
        if errors:
            raise errors[0]


@pytest.fixture
def make_testbed() -> Iterator[MakeTestbed]:
    """`make_testbed(prefix, hosts=2, containers=2, routers=False)`, removed after the test."""
    factory = _Factory()
    try:
        yield factory
    finally:
        factory.teardown()


@pytest.fixture(scope="module")
def make_testbed_module() -> Iterator[MakeTestbed]:
    """As `make_testbed`, but the testbeds live until the end of the module."""
    factory = _Factory()
    try:
        yield factory
    finally:
        factory.teardown()


@pytest.fixture(scope="module")
def testbed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    """A 2x2 testbed for the module; prefix from an indirect param or `TESTBED_PREFIX`."""
    _require_root()
    prefix = getattr(request, "param", None) or getattr(request.module, "TESTBED_PREFIX", None)
    if not prefix:
        raise pytest.UsageError(
            f"{request.module.__name__}: set TESTBED_PREFIX (e.g. 'rt1') or parametrize "
            "`testbed` indirectly with a prefix of your part"
        )
    hosts = getattr(request.module, "TESTBED_HOSTS", 2)
    containers = getattr(request.module, "TESTBED_CONTAINERS", 2)
    routers = getattr(request.module, "TESTBED_ROUTERS", False)
    with prefix_lock(prefix):
        try:
            tb = _fresh(prefix, hosts, containers, routers)
        except BaseException:
            Testbed.down_prefix(prefix)
            raise
        try:
            yield tb
        finally:
            tb.down()
