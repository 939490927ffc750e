"""`fer-client start`: check this site's data, then run a Flower SuperNode against the coordinator.

The data is opened here first, exactly as the ClientApp will open it, so an unreadable dataset is one clear line
at start-up rather than failed rounds later. Only the dataset's *path* goes into the node config; images stay on
this machine and are never logged.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import click
import typer

INSECURE_WARNING = (
    "WARNING: --insecure: no TLS and no node authentication. Model updates cross the network in the clear. "
    "Use only for a throw-away local test."
)


def start(
    server: Annotated[str, typer.Option("--server", "-s", help="The coordinator's HOST:PORT.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="This site's data, KIND=PATH (or synthetic=N).")],
    ca_cert: Annotated[Path | None, typer.Option("--ca-cert", help="The coordinator's ca.crt.")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="This node's private key (`fer-client keygen`).")] = None,
    trusted_entities: Annotated[
        Path | None,
        typer.Option("--trusted-entities",
                     help="The coordinator's trusted-entities.yaml (default: next to --ca-cert); only app bundles "
                          "its key signed run here."),
    ] = None,
    client_id: Annotated[str | None, typer.Option(help="Name in the coordinator's metrics (default: node id).")] = None,
    profile: Annotated[str | None, typer.Option(help="hospital | iot (local training effort).")] = None,
    state_dir: Annotated[Path, typer.Option(help="Privacy ledger, Flower home and log of this node.")] = Path(
        "fer-client-state"
    ),
    ledger_key: Annotated[Path | None, typer.Option(help="Key file of the privacy ledger (HMAC).")] = None,
    ledger_anchor: Annotated[Path | None, typer.Option(help="Anchor file guarding the ledger against rollback.")] = None,
    require_secure_agg: Annotated[bool, typer.Option(help="Refuse to train in rounds without SecAgg+.")] = False,
    share_metrics: Annotated[
        bool,
        typer.Option(help="Send per-site loss, accuracy and example counts in the clear under SecAgg+ or DP-SGD "
                          "(default: withheld; DP runs never send training metrics)."),
    ] = False,
    dp_epsilon: Annotated[
        float | None,
        typer.Option(help="This node's own DP budget ε for the whole run: it trains under DP-SGD at the smaller "
                          "of this and the coordinator's dp-epsilon, even when the coordinator asks for none."),
    ] = None,
    runtime_port: Annotated[int, typer.Option(help="Local port for the ClientApp API (0: pick a free one).")] = 0,
    isolation: Annotated[str, typer.Option(help="subprocess (Flower starts each ClientApp) or process.")] = "subprocess",
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no node authentication (loud warning).")] = False,
    max_retries: Annotated[int | None, typer.Option(help="Reconnect attempts (default: forever).")] = None,
    image_size: Annotated[int, typer.Option(help="Image size of the pre-join check (the run's image-size).")] = 48,
) -> None:
    """Check the data, then join the federation and train when the coordinator asks (Ctrl-C leaves)."""
    from client.data.formats import DatasetError
    from client.deploy import SuperNodeSettings, check_data, free_port, start_supernode, stop_tree
    from client.profiles import PROFILES

    if dp_epsilon is not None and not dp_epsilon > 0:
        raise click.ClickException(f"--dp-epsilon must be positive, got {dp_epsilon}")
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    else:
        for label, path in (("--ca-cert", ca_cert), ("--key", key)):
            if path is None:
                raise click.ClickException(f"{label} is required (or --insecure for a local test)")
            if not path.is_file():
                raise click.ClickException(f"{label} file {path} does not exist")
    if profile is not None and profile not in PROFILES:
        raise click.ClickException(f"--profile must be one of {', '.join(PROFILES)}; got {profile!r}")
    if isolation not in ("subprocess", "process"):
        raise click.ClickException(f"--isolation must be subprocess or process; got {isolation!r}")
    try:
        described = check_data(spec=dataset, image_size=image_size)
    except DatasetError as err:
        raise click.ClickException(str(err)) from None
    typer.echo(f"data check: {described}")
    trusted_entities = _trusted_entities(trusted_entities, ca_cert=ca_cert, insecure=insecure)

    state_dir = state_dir.resolve()
    node_config = {"dataset": _absolute_spec(dataset), "state-dir": str(state_dir)}
    if client_id:
        node_config["client-id"] = client_id
    if profile:
        node_config["profile"] = profile
    if ledger_key is None:
        # The ledger's key must exist before the first DP round; a real node never has the ClientApp create it
        # (a wiped state folder must not silently restart the budget), so it is made here, once, on first start.
        ledger_key = state_dir / "ledger.key"
        if not ledger_key.exists():
            from privacy.ledger import generate_key_file

            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            generate_key_file(ledger_key)
            typer.echo(f"created the privacy ledger key {ledger_key} (keep a copy with the node's keys)")
    elif not ledger_key.is_file():
        raise click.ClickException(f"--ledger-key file {ledger_key} does not exist")
    node_config["ledger-key"] = str(ledger_key.resolve())
    if ledger_anchor:
        node_config["ledger-anchor"] = str(ledger_anchor.resolve())
    if require_secure_agg:
        node_config["require-secure-agg"] = "true"
    if share_metrics:
        node_config["share-metrics"] = "true"
    if dp_epsilon is not None:
        node_config["dp-epsilon"] = float(dp_epsilon)
    settings = SuperNodeSettings(
        superlink=server,
        node_config=node_config,
        state_dir=state_dir,
        ca_cert=None if insecure else ca_cert.resolve(),
        private_key=None if insecure else key.resolve(),
        insecure=insecure,
        runtime_port=runtime_port or free_port(),
        isolation=isolation,
        max_retries=max_retries,
        trusted_entities=trusted_entities,
    )
    typer.echo(f"joining {server} as {client_id or 'this node'} (Ctrl-C leaves)")
    process = start_supernode(settings)
    # Our own SIGTERM must stop the SuperNode and its ClientApps too, not orphan them.
    signal.signal(signal.SIGTERM, lambda *_: (stop_tree(process), sys.exit(143)))
    try:
        code = process.wait()
    except KeyboardInterrupt:
        stop_tree(process)
        raise
    if code != 0:
        raise click.ClickException(f"the SuperNode exited with code {code} (refused or unreachable server?)")


def _trusted_entities(path: Path | None, *, ca_cert: Path | None, insecure: bool) -> Path | None:
    """The trusted-entities file the SuperNode pins (client/trusted_entities.py): the option, else the one the
    coordinator handed out next to ca.crt. Required unless --insecure (then used only when given)."""
    from client.trusted_entities import TRUSTED_ENTITIES, load_trusted_entities

    if path is None:
        if insecure:
            return None
        path = ca_cert.parent / TRUSTED_ENTITIES
        if not path.is_file():
            raise click.ClickException(
                f"no {TRUSTED_ENTITIES} next to --ca-cert ({path}): get it from the coordinator with ca.crt, or "
                "pass --trusted-entities"
            )
    try:
        load_trusted_entities(path)
    except ValueError as err:
        raise click.ClickException(f"--trusted-entities {err}") from None
    return path.resolve()


def _absolute_spec(spec: str) -> str:
    """KIND=PATH with PATH made absolute: the ClientApp runs with another working directory."""
    kind, sep, arg = spec.partition("=")
    if not sep or kind == "synthetic":
        return spec
    return f"{kind}={Path(arg).expanduser().resolve()}"
