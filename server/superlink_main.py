"""`python -m server.superlink_main --fer-control-token FILE [--fer-trusted-entities FILE] ARGS`: Flower's
`flower-superlink`, with a longer SQLite lock wait and with only fer-server allowed to drive it.

Flower 1.41's SQL state sets `PRAGMA busy_timeout = 5000`: a request that waits more than 5 s for the database
lock fails with HTTP 500. With ten SuperNodes pushing updates on a small coordinator that happens, and a reply
lost that way leaves the round waiting for it (measured: 10 nodes on 2 cores, round 1 never completed). Waiting
longer for the lock only makes a request slower, never wrong, so this entry point raises the wait to
`FER_SUPERLINK_BUSY_TIMEOUT_MS` (default 120 000).

Flower's open-source SuperLink lets anyone who reaches its port use the Control API (enrol keys, submit or stop
runs, read logs) and claim ServerApp tasks on the Runtime API. `--fer-control-token` (required: the guard fails
closed) installs server/control_guard.py: Control and Runtime only from this machine, Control only with the token,
SuperExec authentication on; `--fer-trusted-entities` makes StartRun accept only FABs signed by the coordinator's
key (server/fab_signing.py). Both options are removed before Flower's own command parses the rest, unchanged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_BUSY_TIMEOUT_MS = 120_000
TOKEN_OPTION = "--fer-control-token"
TRUSTED_OPTION = "--fer-trusted-entities"


def split_fer_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Our options (each `--name VALUE` or `--name=VALUE`) and the rest of the command line, for Flower."""
    ours: dict[str, str] = {}
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        name, sep, value = arg.partition("=")
        if name in (TOKEN_OPTION, TRUSTED_OPTION):
            if not sep:
                value = next(args, "")
            if not value:
                sys.exit(f"fer-fl: {name} needs a file")
            ours[name] = value
        else:
            rest.append(arg)
    return ours, rest


def raise_busy_timeout() -> None:
    """Makes Flower's own pragma hook set busy_timeout to `FER_SUPERLINK_BUSY_TIMEOUT_MS` (see above)."""
    import flwr.supercore.sql_mixin as sql_mixin

    timeout_ms = int(os.environ.get("FER_SUPERLINK_BUSY_TIMEOUT_MS", DEFAULT_BUSY_TIMEOUT_MS))
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(timeout_ms) if name == "busy_timeout" else value) for name, value in sql_mixin.SQLITE_PRAGMAS
    )


def main() -> None:
    from flwr.superlink.cli import flower_superlink

    from server.control_guard import install

    ours, rest = split_fer_options(sys.argv[1:])
    if TOKEN_OPTION not in ours:
        sys.exit(f"fer-fl: {TOKEN_OPTION} FILE is required (fer-server creates it); refusing to start an "
                 "unguarded SuperLink")
    sys.argv = [sys.argv[0], *rest]
    raise_busy_timeout()
    trusted = ours.get(TRUSTED_OPTION)
    install(token_file=Path(ours[TOKEN_OPTION]), trusted_entities_file=Path(trusted) if trusted else None)
    flower_superlink()


if __name__ == "__main__":
    main()
