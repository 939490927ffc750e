"""`fer-client keygen`: the node's authentication key pair."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer


def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the key pair.")] = Path("keys"),
    name: Annotated[str, typer.Option(help="File stem: NAME.key (private) and NAME.pub.")] = "node",
    overwrite: Annotated[bool, typer.Option(help="Replace existing keys (the node must be enrolled again).")] = False,
) -> None:
    """Make the node's key pair. Send NAME.pub to the coordinator (`fer-server enroll`); keep NAME.key here."""
    from client.deploy import generate_node_keys

    try:
        keys = generate_node_keys(out_dir=out, name=name, overwrite=overwrite)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    typer.echo(f"private key (keep on this node, mode 0600): {keys.private_key}")
    typer.echo(f"public key (send to the coordinator): {keys.public_key}")
