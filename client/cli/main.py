"""`fer-client`: a hospital's or home hub's command. One module per sub-command; this file only wires them."""

from __future__ import annotations

import sys

import typer

from client.cli.runner import run_cli

app = typer.Typer(
    name="fer-client",
    help="Join a federated FER run from this site: make the node's keys, check the data, start the SuperNode.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from client.cli import export_cmd, keygen_cmd, predict_cmd, start_cmd, watch_cmd

    app.command("keygen")(keygen_cmd.keygen)
    app.command("start")(start_cmd.start)
    app.command("predict")(predict_cmd.predict)
    app.command("watch")(watch_cmd.watch)
    app.command("export")(export_cmd.export)
    app.command("adapt")(__import__("client.cli.adapt_cmd", fromlist=["adapt"]).adapt)


def main(argv: list[str] | None = None) -> None:
    _register()
    sys.exit(run_cli(app, "fer-client", argv))
