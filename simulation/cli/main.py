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
    # Command modules keep torch, Flower and Ray imports inside the commands, so `fer-sim --help` stays fast.
    from simulation.cli import demo_cmd, evaluate_cmd, inspect_cmd, run_cmd
    from simulation.cli import models_cmd

    app.command("demo")(demo_cmd.demo)
    app.command("inspect")(inspect_cmd.inspect)
    app.command("run")(run_cmd.run)
    app.command("centralized")(run_cmd.centralized)
    app.command("evaluate")(evaluate_cmd.evaluate)
    app.command("models")(models_cmd.models)


def main() -> None:
    _register()
    sys.exit(run_cli(app, "fer-sim"))
