"""The one entry point: `shuntflow testbed|exec|router|status|bench|demo|scale|container-args`.

Each part owns its commands (testbed/cli.py, router/cli.py, bench/cli.py); this file only
assembles them, so the folder listing and `shuntflow --help` show the same architecture.
"""

from __future__ import annotations

import typer

from shuntflow import __version__
from shuntflow import runtime as runtime_cli
from shuntflow.bench import cli as bench_cli
from shuntflow.router import cli as router_cli
from shuntflow.testbed import cli as testbed_cli

app = typer.Typer(
    help="ShuntFlow: container TCP connections start on the overlay and move to the host "
    "network in the background once they prove worth it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shuntflow {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """ShuntFlow command-line interface."""


app.add_typer(testbed_cli.app, name="testbed")
app.command("exec", context_settings={"allow_interspersed_args": False})(testbed_cli.exec_command)
app.command("router")(router_cli.router_command)
app.command("status")(router_cli.status_command)
app.command("bench")(bench_cli.bench_command)
app.command("demo")(bench_cli.demo_command)
app.command("scale")(bench_cli.scale_command)
app.command("container-args")(runtime_cli.container_args_command)


if __name__ == "__main__":
    app()
