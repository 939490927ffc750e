"""`fer-server forget-ledger CLIENT_ID`: accept a site's announced privacy-ledger reset.

The coordinator keeps the last ledger id and sequence number it accepted from every node (server/ledger_registry.py)
and refuses a node whose ledger was replaced. When a site lost its state and started a new ledger on purpose
(`fer-client start --new-privacy-ledger`), its operator tells the coordinator, who drops the old record here; the
node's next update then starts a new one. Nothing else changes, and the command says what it dropped.
"""

from __future__ import annotations

from typing import Annotated

import click
import typer

from server.cli.enroll_cmd import DEFAULT_STATE, StateDirOpt


def forget_ledger(
    client_id: Annotated[str, typer.Argument(help="The node's client id (as in metrics.jsonl and privacy.json).")],
    state_dir: StateDirOpt = DEFAULT_STATE,
) -> None:
    """Drop one node's privacy-ledger record, accepting the new ledger it will report (a reset its site announced)."""
    from server.ledger_registry import REGISTRY_FILE, LedgerRegistryError, NodeLedgers

    path = state_dir / REGISTRY_FILE
    if not path.is_file():
        raise click.ClickException(f"{path} does not exist: this coordinator keeps no ledger record in {state_dir}")
    try:
        ledgers = NodeLedgers(path)
    except LedgerRegistryError as err:
        raise click.ClickException(str(err)) from None
    mark = ledgers.forget(client_id)
    if mark is None:
        raise click.ClickException(f"{path} holds no ledger record for {client_id!r}")
    ledgers.save()
    typer.echo(f"forgot the privacy ledger {mark.ledger_id} of {client_id} (sequence {mark.ledger_seq}, round "
               f"{mark.server_round}); its next update starts a new record")
