"""`fer-server enroll`, `nodes`, `revoke`: which SuperNodes may join, through Flower's node registration.

They talk to the SuperLink a running `fer-server` started (same --state-dir), over its Control API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer

StateDirOpt = Annotated[
    Path, typer.Option("--state-dir", help="The running fer-server's state folder.")
]
DEFAULT_STATE = Path("fer-server-state")


def _link(state_dir: Path):
    from server.deploy import DeployError, SuperLink

    try:
        return SuperLink.attach(state_dir)
    except DeployError as err:
        raise click.ClickException(str(err)) from None


def enroll(
    public_key: Annotated[Path, typer.Argument(help="The site's node.pub (from `fer-client keygen`).")],
    name: Annotated[str | None, typer.Option(help="A name for the node.")] = None,
    state_dir: StateDirOpt = DEFAULT_STATE,
) -> None:
    """Allow a site's SuperNode to join (its public key is registered with the SuperLink)."""
    from server.deploy import DeployError

    if not public_key.is_file():
        raise click.ClickException(f"public key file {public_key} does not exist")
    try:
        node_id = _link(state_dir).enroll(public_key, name=name)
    except DeployError as err:
        raise click.ClickException(str(err)) from None
    typer.echo(f"enrolled node {node_id} ({public_key})")


def nodes(state_dir: StateDirOpt = DEFAULT_STATE) -> None:
    """List enrolled SuperNodes and whether they are online."""
    from server.deploy import DeployError

    try:
        listed = _link(state_dir).nodes()
    except DeployError as err:
        raise click.ClickException(str(err)) from None
    if not listed:
        typer.echo("no nodes enrolled")
    for node in listed:
        typer.echo(f"{node['node-id']}\t{node.get('status', '?')}\tonline since {node.get('online-at', 'N/A')}")


def revoke(
    node_id: Annotated[str, typer.Argument(help="Node id (from `fer-server nodes`).")],
    state_dir: StateDirOpt = DEFAULT_STATE,
) -> None:
    """Remove a SuperNode: its key can no longer join."""
    from server.deploy import DeployError

    try:
        _link(state_dir).revoke(node_id)
    except DeployError as err:
        raise click.ClickException(str(err)) from None
    typer.echo(f"revoked node {node_id}")
