"""Commands of the router: placeholder until the router lands."""

import typer


def router_command() -> None:
    """Run a router."""
    raise typer.Exit(2)


def status_command() -> None:
    """Show tracked connections."""
    raise typer.Exit(2)
