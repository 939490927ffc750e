"""`fer-sim`: the researcher's command. One module per sub-command; this file only wires them together."""

from __future__ import annotations

import sys

from client.cli.runner import add_commands, cli_app, run_cli

app = cli_app(
    "fer-sim", "Study federated facial-expression recognition: inspect datasets, list models, run simulations."
)


def _register() -> None:
    # Command modules keep torch, Flower and Ray imports inside the commands, so `fer-sim --help` stays fast.
    from simulation.cli import demo_cmd, evaluate_cmd, inspect_cmd, models_cmd, run_cmd

    add_commands(app, {
        "demo": demo_cmd.demo, "inspect": inspect_cmd.inspect, "run": run_cmd.run, "centralized": run_cmd.centralized,
        "evaluate": evaluate_cmd.evaluate, "models": models_cmd.models,
    })


def main() -> None:
    _register()
    sys.exit(run_cli(app, "fer-sim"))
