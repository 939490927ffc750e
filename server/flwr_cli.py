"""`python -m server.flwr_cli ARGS`: Flower's `flwr` CLI, signing the FAB that `flwr run` builds.

Flower's CLI builds the FAB from the app folder and uploads it with an empty verification record; it has no
option to sign it (server/fab_signing.py says why sites need a signature). When `FER_FAB_SIGNING_KEY` names the
coordinator's key, this entry point wraps the one function that turns the built FAB into the request
(`flwr.cli.run.run.fab_to_proto`) so the record carries the coordinator's signature over exactly the bytes sent;
everything else is Flower's own command, unchanged. Without the variable it is plain `flwr`.
"""

from __future__ import annotations

import importlib
import sys


def main() -> None:
    from server.fab_signing import sign_fab, signing_key_from_env

    try:
        key = signing_key_from_env()
    except ValueError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)
    if key is not None:
        # `flwr.cli.run.run` is shadowed by the `run` function in its package's namespace: import the module.
        run_module = importlib.import_module("flwr.cli.run.run")
        unsigned = run_module.fab_to_proto

        def signed_fab_to_proto(fab):
            proto = unsigned(fab)
            if fab.content:
                proto.verifications.update(sign_fab(fab.content, key))
            return proto

        run_module.fab_to_proto = signed_fab_to_proto

    from flwr.cli.app import app

    app()


if __name__ == "__main__":
    main()
