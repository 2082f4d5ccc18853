"""Commands of the bench: placeholder until the bench lands."""

import typer


def bench_command() -> None:
    """Run the benchmark."""
    raise typer.Exit(2)


def demo_command() -> None:
    """Run the demo."""
    raise typer.Exit(2)
