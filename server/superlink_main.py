"""`python -m server.superlink_main ARGS`: Flower's `flower-superlink`, with a longer SQLite lock wait.

Flower 1.41's SQL state sets `PRAGMA busy_timeout = 5000`: a request that waits more than 5 s for the database
lock fails with HTTP 500. With ten SuperNodes pushing updates on a small coordinator that happens, and a reply
lost that way leaves the round waiting for it (measured: 10 nodes on 2 cores, round 1 never completed). Waiting
longer for the lock only makes a request slower, never wrong, so this entry point raises the wait to
`FER_SUPERLINK_BUSY_TIMEOUT_MS` (default 120 000) and then runs Flower's own command unchanged.
"""

from __future__ import annotations

import os

DEFAULT_BUSY_TIMEOUT_MS = 120_000


def main() -> None:
    import flwr.supercore.sql_mixin as sql_mixin
    from flwr.superlink.cli import flower_superlink

    timeout_ms = int(os.environ.get("FER_SUPERLINK_BUSY_TIMEOUT_MS", DEFAULT_BUSY_TIMEOUT_MS))
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(timeout_ms) if name == "busy_timeout" else value) for name, value in sql_mixin.SQLITE_PRAGMAS
    )
    flower_superlink()


if __name__ == "__main__":
    main()
