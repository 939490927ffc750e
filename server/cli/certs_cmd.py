"""`fer-server certs`: a private CA and a server certificate for the SuperLink."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer


def certs(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for ca.crt, ca.key, server.pem, server.key.")] = Path(
        "certs"
    ),
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="A DNS name or IP the sites dial; repeat. localhost and 127.0.0.1 are always added."),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    overwrite: Annotated[bool, typer.Option(help="Replace existing certificates (sites must get the new ca.crt).")] = False,
) -> None:
    """Create the CA, the server certificate and the FAB signing key. Give every site ca.crt and
    trusted-entities.yaml; keep the .key files secret."""
    from server.certs import make_certificates

    # Loopback is always included: the coordinator's own `flwr` CLI reaches its SuperLink through it.
    hosts = list(dict.fromkeys([*(host or []), "localhost", "127.0.0.1"]))
    try:
        files = make_certificates(out_dir=out, hosts=hosts, days=days, overwrite=overwrite)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    typer.echo(f"CA certificate (give to every site): {files.ca_cert}")
    typer.echo(f"FAB signing key's public half (give to every site with ca.crt): {files.trusted_entities}")
    typer.echo(f"server certificate for {', '.join(hosts)}: {files.server_cert}")
    typer.echo(f"private keys (keep here, mode 0600): {files.ca_key}, {files.server_key}, {files.signing_key}")
