"""`fer-client`: a hospital's or home hub's command. One module per sub-command; this file only wires them."""

from __future__ import annotations

import sys

from client.cli.runner import add_commands, cli_app, run_cli

app = cli_app(
    "fer-client",
    "Join a federated FER run from this site: make the node's keys, check the data, start the SuperNode.",
)


def _register() -> None:
    from client.cli import adapt_cmd, export_cmd, keygen_cmd, models_cmd, predict_cmd, start_cmd, watch_cmd

    add_commands(app, {
        "keygen": keygen_cmd.keygen, "start": start_cmd.start, "predict": predict_cmd.predict,
        "watch": watch_cmd.watch, "export": export_cmd.export, "adapt": adapt_cmd.adapt,
        "models": models_cmd.models,
    })


def main(argv: list[str] | None = None) -> None:
    _register()
    sys.exit(run_cli(app, "fer-client", argv))
