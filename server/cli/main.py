"""`fer-server`: the coordinator's command. One module per sub-command; this file only wires them together.

`fer-server [OPTIONS]` with no sub-command is `fer-server start [OPTIONS]`.
"""

from __future__ import annotations

import signal
import sys

from client.cli.runner import add_commands, cli_app, run_cli

app = cli_app(
    "fer-server",
    "Coordinate a federated FER run across sites: certificates, node enrolment, SuperLink, resume.",
    no_args_is_help=False,  # no arguments means `start` (see main)
)


def _register() -> None:
    # Command modules keep Flower imports inside the commands, so `fer-server --help` stays fast.
    from server.cli import certs_cmd, enroll_cmd, ledger_cmd, resume_cmd, roster_cmd, serve_cmd

    add_commands(app, {
        "certs": certs_cmd.certs, "start": serve_cmd.start, "enroll": enroll_cmd.enroll, "nodes": enroll_cmd.nodes,
        "revoke": enroll_cmd.revoke, "resume": resume_cmd.resume, "roster": roster_cmd.roster,
        "forget-ledger": ledger_cmd.forget_ledger,
    })


def _terminate(signum, frame) -> None:
    # SIGTERM (a service manager, a test) must run the same clean-up as Ctrl-C: stop the SuperLink's tree.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    # SIGINT is installed explicitly too: a shell starts background jobs with SIGINT ignored, and Python then
    # keeps it ignored, so `kill -INT` on a backgrounded fer-server would do nothing.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _terminate)
    _register()
    commands = {info.name for info in app.registered_commands}
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0] not in commands and args[0] not in ("--help", "-h")):
        args.insert(0, "start")
    sys.exit(run_cli(app, "fer-server", args))
