"""`shuntflow container-args`: the flags that give a container started by a real runtime (podman,
docker) the preload library, the router's socket and the library's environment.

    podman run $(shuntflow container-args --mode shuntflow) IMAGE CMD
    docker run $(shuntflow container-args --socket /run/shuntflow/router.sock) IMAGE CMD

Why bind mounts: the container has its own root filesystem and mount namespace, so neither the
host's library file nor the router's socket is there otherwise. The socket's directory is mounted
rather than the socket itself, so a restarted router's new socket is seen at once. The output is
one line of words without quoting, made for `$(...)`: a path that would need quoting (a space)
or that the runtimes' `-v SRC:DST:ro` syntax cannot carry (a colon, a comma) is refused.

The library appears in the container under a fixed name, whatever the host file is called (the
installed build, a debug build, a file given with --library): /opt/shuntflow/lib/libshuntflow.so,
or libshuntflow-musl.so beside it for the musl build, the same paths the Kubernetes init container
fills. A container's LD_PRELOAD then never depends on how the host named its file.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path, PurePosixPath
from typing import Annotated

import typer

from shuntflow.native import (
    DEFAULT_THRESHOLD,
    MAX_THRESHOLD,
    OVERLAY_CIDR,
    LibraryMissing,
    library_path,
)
from shuntflow.wire import Mode

DEFAULT_SOCKET = Path("/run/shuntflow/router.sock")
LIB_DIR = PurePosixPath("/opt/shuntflow/lib")  # where the library appears in the container
LIB_IN = LIB_DIR / "libshuntflow.so"
LIB_IN_MUSL = LIB_DIR / "libshuntflow-musl.so"
SOCKET_DIR = PurePosixPath("/run/shuntflow")  # where the router's socket directory appears


class ArgsError(ValueError):
    """A value the runtime flags cannot carry; the message is one line for the user."""


def _plain(what: str, value: str) -> str:
    bad = [c for c in value if c.isspace() or c in ":,'\"\\$`"]
    if bad or not value:
        raise ArgsError(f"{what} {value!r}: no spaces, quotes, ':' or ',' in paths given here")
    return value


def container_args(
    mode: Mode = Mode.SHUNTFLOW,
    socket: Path = DEFAULT_SOCKET,
    library: Path | None = None,
    threshold: int = DEFAULT_THRESHOLD,
    overlay: str = OVERLAY_CIDR,
    netns: str | None = None,
    log: str | None = None,
    musl: bool = False,
) -> list[str]:
    """The `podman run` / `docker run` flags, one word each. `netns`: a named network namespace
    (/run/netns/NAME) to join, as `--network ns:PATH` (podman; docker has no such mode). `musl`:
    the library (`library`, else the installed one) is the musl build."""
    lib = library if library is not None else library_path(musl=musl)
    try:
        net = ipaddress.IPv4Network(overlay, strict=False)
    except ValueError:
        raise ArgsError(f"--overlay {overlay!r} is not an IPv4 CIDR") from None
    if not 1 <= threshold <= MAX_THRESHOLD:
        raise ArgsError(f"--threshold {threshold} must be from 1 to {MAX_THRESHOLD}")
    if not socket.is_absolute():
        raise ArgsError(f"--socket {socket}: give an absolute path")
    lib_in = LIB_IN_MUSL if musl else LIB_IN
    socket_in = SOCKET_DIR / _plain("--socket", socket.name)
    args: list[str] = []
    if netns is not None:
        args += ["--network", f"ns:/run/netns/{_plain('network namespace', netns)}"]
    args += [
        "--volume",
        f"{_plain('library', str(lib.resolve()))}:{lib_in}:ro",
        "--volume",
        f"{_plain('--socket', str(socket.parent))}:{SOCKET_DIR}:ro",
        "--env",
        f"LD_PRELOAD={lib_in}",
        "--env",
        f"SHUNTFLOW_MODE={mode.name.lower()}",
        "--env",
        f"SHUNTFLOW_ROUTER={socket_in}",
        "--env",
        f"SHUNTFLOW_THRESHOLD={threshold}",
        "--env",
        f"SHUNTFLOW_OVERLAY={net}",
    ]
    if log is not None:
        args += ["--env", f"SHUNTFLOW_LOG={_plain('--log', log)}"]
    return args


def container_args_command(
    mode: Annotated[
        str, typer.Option("--mode", metavar="overlay|slim|shuntflow", help="The library's mode.")
    ] = "shuntflow",
    socket: Annotated[
        Path, typer.Option("--socket", help="The router's library socket on this host.")
    ] = DEFAULT_SOCKET,
    testbed_container: Annotated[
        str | None,
        typer.Option(
            "--testbed-container",
            metavar="NAME",
            help="A testbed container (e.g. sf-h1-c1): join its network namespace (podman's "
            "--network ns:) and use its host's router.",
        ),
    ] = None,
    threshold: Annotated[
        int, typer.Option("--threshold", help="Data syscalls before a connection is switched.")
    ] = DEFAULT_THRESHOLD,
    overlay: Annotated[
        str,
        typer.Option("--overlay", metavar="CIDR", help="Switchable addresses: the pod network."),
    ] = OVERLAY_CIDR,
    musl: Annotated[
        bool,
        typer.Option(
            "--musl",
            help="Mount the musl build (libshuntflow-musl.so), for Alpine-based images; with "
            "--library, that file is a musl build.",
        ),
    ] = False,
    library: Annotated[
        Path | None,
        typer.Option(
            "--library",
            help="A library file to mount instead of the installed one (in the container it is "
            "/opt/shuntflow/lib/libshuntflow.so, or libshuntflow-musl.so with --musl).",
        ),
    ] = None,
    log: Annotated[
        str | None,
        typer.Option(
            "--log", metavar="stderr|PATH", help="The library's log (a path in the container)."
        ),
    ] = None,
) -> None:
    """Print `podman run` / `docker run` flags that load ShuntFlow into a container.

    Bind mounts for the library and the router's socket directory, and the environment:
    `podman run $(shuntflow container-args) IMAGE CMD`."""
    try:
        modes = {m.name.lower(): m for m in Mode}
        if mode not in modes:
            raise ArgsError(f"--mode must be one of {', '.join(modes)}, got {mode!r}")
        netns = None
        if testbed_container is not None:
            from shuntflow.testbed.plan import TestbedError, container_prefix
            from shuntflow.testbed.testbed import Testbed

            prefix = container_prefix(testbed_container)
            if prefix is None:
                raise ArgsError(f"{testbed_container!r} is not a testbed container name")
            try:
                tb = Testbed.load(prefix)
                c = tb.container(testbed_container)
            except TestbedError as e:
                raise ArgsError(str(e)) from None
            socket, netns = tb.host(c.host_index).router_socket, c.netns
        words = container_args(modes[mode], socket, library, threshold, overlay, netns, log, musl)
    except (ArgsError, LibraryMissing) as e:
        typer.echo(f"shuntflow container-args: error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(" ".join(words))
