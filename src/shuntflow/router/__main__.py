# `python -m shuntflow.router --socket ... --host-ip ...`: the router command alone.
#
# Why: tests and service managers start the daemon without going through the top-level CLI
# (fewer imports, no bench/testbed code loaded); it is exactly `shuntflow router`.

import typer

from shuntflow.router.cli import router_command

typer.run(router_command)
