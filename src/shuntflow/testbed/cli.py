"""Commands of the testbed: placeholder until the testbed lands."""

import typer

app = typer.Typer(help="Build and remove the VXLAN testbed.", no_args_is_help=True)


def exec_command(container: str, cmd: list[str] = typer.Argument(...)) -> None:
    """Run CMD inside a testbed container."""
    raise typer.Exit(2)
