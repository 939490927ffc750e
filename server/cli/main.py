"""`fer-server`: the coordinator's command. One module per sub-command; this file only wires them together.

`fer-server [OPTIONS]` with no sub-command is `fer-server start [OPTIONS]`.
"""

from __future__ import annotations

import signal
import sys

import typer

from client.cli.runner import run_cli

app = typer.Typer(
    name="fer-server",
    help="Coordinate a federated FER run across sites: certificates, node enrolment, SuperLink, resume.",
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMANDS = ("certs", "start", "enroll", "nodes", "revoke", "resume", "roster", "forget-ledger")


def _register() -> None:
    # Command modules keep Flower imports inside the commands, so `fer-server --help` stays fast.
    from server.cli import certs_cmd, enroll_cmd, ledger_cmd, resume_cmd, roster_cmd, serve_cmd

    app.command("certs")(certs_cmd.certs)
    app.command("start")(serve_cmd.start)
    app.command("enroll")(enroll_cmd.enroll)
    app.command("nodes")(enroll_cmd.nodes)
    app.command("revoke")(enroll_cmd.revoke)
    app.command("resume")(resume_cmd.resume)
    app.command("roster")(roster_cmd.roster)
    app.command("forget-ledger")(ledger_cmd.forget_ledger)


def _terminate(signum, frame) -> None:
    # SIGTERM (a service manager, a test) must run the same clean-up as Ctrl-C: stop the SuperLink's tree.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    # SIGINT is installed explicitly too: a shell starts background jobs with SIGINT ignored, and Python then
    # keeps it ignored, so `kill -INT` on a backgrounded fer-server would do nothing.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _terminate)
    _register()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0] not in COMMANDS and args[0] not in ("--help", "-h")):
        args.insert(0, "start")
    sys.exit(run_cli(app, "fer-server", args))
