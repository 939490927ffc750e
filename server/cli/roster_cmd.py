"""`fer-server roster`: the list of enrolled sites' public keys that sites pin to check each other's SecAgg+ keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer


def roster(
    public_keys: Annotated[list[Path], typer.Argument(help="Every enrolled site's node.pub (name = file stem).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The roster file to write.")] = Path(
        "certs/secagg-roster.yaml"
    ),
) -> None:
    """Write secagg-roster.yaml from the sites' public keys. Give it to every site with ca.crt: a site that pins it
    refuses SecAgg+ neighbours whose keys no enrolled site signed (a coordinator swapping in keys of its own)."""
    from privacy.secagg_identity import write_roster

    names = [key.stem for key in public_keys]
    if len(set(names)) != len(names):
        raise click.ClickException("two public key files have the same name; rename them after their sites")
    try:
        path = write_roster(out, dict(zip(names, public_keys, strict=True)))
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    typer.echo(f"SecAgg+ roster of {len(names)} sites (give to every site with ca.crt): {path}")
