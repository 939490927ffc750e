"""`fer-sim`: the researcher's command. One module per sub-command; this file only wires them together."""

from __future__ import annotations

import sys

import typer

from client.cli.runner import run_cli

app = typer.Typer(
    name="fer-sim",
    help="Study federated facial-expression recognition: inspect datasets, list models, run simulations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Imported here so `fer-sim --help` stays fast and a broken optional command cannot break the others.
    from simulation.cli import inspect_cmd

    app.command("inspect")(inspect_cmd.inspect)


def main() -> None:
    _register()
    sys.exit(run_cli(app, "fer-sim"))
