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

STATE_LOCK = "fer-client.lock"
SUPERNODE_LOG = "supernode.log"  # everything the SuperNode printed; its tracebacks go here only (client/relay.py)
RELAY_DRAIN_SECONDS = 5.0
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
    ledger_key: Annotated[
        Path | None, typer.Option(help="Key file of the privacy ledger (default STATE_DIR/ledger.key).")
    ] = None,
    ledger_anchor: Annotated[Path | None, typer.Option(help="Anchor file guarding the ledger against rollback.")] = None,
    new_privacy_ledger: Annotated[
        bool,
        typer.Option("--new-privacy-ledger",
                     help="First start of a node: make its privacy-ledger key. Refused when the node already has "
                          "one; after a lost state folder it starts a NEW budget (loud; the coordinator refuses the "
                          "node until it runs `fer-server forget-ledger`)."),
    ] = False,
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
    secagg_roster: Annotated[
        Path | None,
        typer.Option(help="The coordinator's secagg-roster.yaml (default: next to --ca-cert when it is there): "
                          "refuse SecAgg+ neighbours whose keys no distinct enrolled site signed."),
    ] = None,
    secagg_min_threshold: Annotated[
        int, typer.Option(help="Refuse SecAgg+ rounds whose reconstruction threshold is below this (it must "
                               "always exceed half the shares).")
    ] = 2,
) -> None:
    """Check the data, then join the federation and train when the coordinator asks (Ctrl-C leaves)."""
    from client.data.formats import DatasetError
    from client.deploy import SuperNodeSettings, check_data, free_port
    from client.lifetime import InstanceLock, LockedError
    from client.config import ConfigError
    from client.node_config import NodeSettings
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
    state_dir = state_dir.resolve()
    lock_path = state_dir / STATE_LOCK
    holder = InstanceLock.holder_of(lock_path)  # before anything is written: a refused start leaves no trace
    if holder is not None:
        raise click.ClickException(_in_use(state_dir, holder))
    try:
        described = check_data(spec=dataset, image_size=image_size)
    except DatasetError as err:
        raise click.ClickException(str(err)) from None
    typer.echo(f"data check: {described}")
    trusted_entities = _trusted_entities(trusted_entities, ca_cert=ca_cert, insecure=insecure)
    files = _ledger_files(state_dir, ledger_key=ledger_key, ledger_anchor=ledger_anchor,
                          new=new_privacy_ledger)
    try:
        node = NodeSettings(
            dataset=_absolute_spec(dataset),
            client_id=client_id or None,
            profile=profile,
            state_dir=state_dir,
            ledger_key=files.key.resolve(),
            ledger_anchor=ledger_anchor.resolve() if ledger_anchor else None,
            dp_epsilon=float(dp_epsilon) if dp_epsilon is not None else None,
            require_secure_agg=require_secure_agg,
            share_metrics=share_metrics,
            **_secagg_node_config(secagg_roster, ca_cert=ca_cert, key=key, min_threshold=secagg_min_threshold),
        )
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    try:
        lock = InstanceLock.acquire(lock_path, command="fer-client start")
    except LockedError as err:  # lost a race with another start on the same folder
        raise click.ClickException(_in_use(state_dir, err.holder)) from None

    if new_privacy_ledger:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        files.create_key()
        print(f"NEW PRIVACY LEDGER: made the ledger key {files.key}; this node's DP budget starts from zero. If it "
              "ever trained before, its coordinator refuses its updates until it runs `fer-server forget-ledger "
              f"{client_id or 'CLIENT_ID'}`. Keep a copy of the key with the node's keys.", file=sys.stderr, flush=True)
    settings = SuperNodeSettings(
        superlink=server,
        node_config=node.to_node_config(),
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
    try:
        _run_supernode(settings, lock=lock)
    finally:
        lock.release()


class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, _frame) -> None:
    raise _Stopped(signum)


def _run_supernode(settings, *, lock) -> None:
    """Runs the SuperNode under its supervisor (client/lifetime.py) until it exits or we are told to stop.

    SIGTERM and SIGINT both stop it within seconds. Both handlers are installed explicitly: a shell starts a
    background job with SIGINT ignored, and Python then never raises KeyboardInterrupt (issue 15: Ctrl-C / kill
    -INT did nothing). The state directory's lock goes to the supervisor too, so a new fer-client on this folder
    is refused until the last process of this one's tree is gone.
    """
    from client.deploy import start_supernode
    from client.lifetime import cmdline, descendants, stop_tree

    def show(line: str) -> None:
        try:
            print(line, file=sys.stderr, flush=True)
        except OSError:
            pass  # a closed terminal must not stop the relay: the SuperNode would block on a full pipe

    previous = {signum: signal.signal(signum, _raise_stopped) for signum in (signal.SIGTERM, signal.SIGINT)}
    process = relay = None
    try:
        process, relay = start_supernode(settings, log_file=settings.state_dir / SUPERNODE_LOG, show=show,
                                         pass_fds=(lock.fd,))
        lock.add_helper(process.pid)
        code = process.wait()
        relay.join(timeout=RELAY_DRAIN_SECONDS)  # the SuperNode's last lines come before ours
    except _Stopped as stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        in_round = process is not None and any(
            "flwr-clientapp" in cmdline(pid) for pid in descendants(process.pid)
        )
        if process is not None:
            stop_tree(process, timeout=3.0)
        if relay is not None:
            relay.join(timeout=RELAY_DRAIN_SECONDS)
        name = signal.Signals(stop.signum).name
        print(f"fer-client: stopped on {name}; {_round_status(in_round)}; {_ledger_status(settings)}",
              file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if code != 0:
        raise click.ClickException(f"the SuperNode exited with code {code} (refused or unreachable server?)")


def _round_status(in_round: bool) -> str:
    if in_round:
        return ("a round was in progress: its ClientApp was stopped and its update not sent (if the ledger below "
                "charged it, a resumed round re-sends the same update at no new cost)")
    return "no round was in progress"


def _ledger_status(settings) -> str:
    """One clause on what this node's privacy ledger holds (no ledger: no DP round was ever charged)."""
    from privacy.ledger import LedgerError, read_ledger

    from client.node_config import NodeSettings

    node = NodeSettings.from_node_config(settings.node_config)
    files = node.ledger_files(state_dir=node.state_dir)
    if not files.ledger.exists():
        return "privacy ledger: no DP round charged"
    try:
        terms, rounds = read_ledger(files.ledger, key_file=files.key)
    except LedgerError as err:
        return f"privacy ledger unreadable ({err})"
    if not rounds:
        return "privacy ledger: no DP round charged"
    charged = ", ".join(str(r.server_round) for r in rounds)
    return (f"privacy ledger: rounds {charged} charged, epsilon {rounds[-1].epsilon_after:.3f} of "
            f"{float(terms['budget_epsilon']):.3f} spent")


def _in_use(state_dir: Path, holder) -> str:
    if holder is None:
        return f"state directory {state_dir} is in use by another process: stop it first or use another --state-dir"
    return f"state directory {state_dir} is in use by {holder.describe()}: {holder.advice('use another --state-dir')}"


def _ledger_files(state_dir: Path, *, ledger_key: Path | None, ledger_anchor: Path | None, new: bool):
    """The node's privacy-ledger files, checked before anything starts (client/dp_training.py `LedgerFiles`).

    A node's ledger key is made once, on purpose: without `--new-privacy-ledger` a missing key is refused, so
    `rm -r STATE_DIR` followed by the usual start command stops here instead of silently starting a new budget;
    with it, an existing key or ledger is refused, so the option cannot reset a live ledger either.
    """
    from client.dp_training import LedgerFiles
    from privacy.ledger import LedgerError

    files = LedgerFiles.of(state_dir=state_dir, key_file=ledger_key.resolve() if ledger_key else None,
                           anchor_path=ledger_anchor.resolve() if ledger_anchor else None)
    if new:
        present = [str(p) for p in (files.key, files.ledger, files.anchor, files.in_use) if p.exists()]
        if present:
            raise click.ClickException(
                f"--new-privacy-ledger: this node already has a privacy ledger ({', '.join(present)}); start "
                "without the option (it is for a node's first start, or a reset after moving all of these away)"
            )
        return files
    if not files.key.is_file():
        where = "--ledger-key file" if ledger_key else "privacy ledger key"
        raise click.ClickException(
            f"{where} {files.key} does not exist: a new node's first start is `fer-client start "
            "--new-privacy-ledger ...`; if this node's state folder was lost, read docs/deployment.md first (a new "
            "ledger restarts its budget, and its coordinator must accept the reset)"
        )
    try:
        files.check_not_wiped()
    except LedgerError as err:
        raise click.ClickException(str(err)) from None
    return files


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


def _secagg_node_config(roster: Path | None, *, ca_cert: Path | None, key: Path | None, min_threshold: int) -> dict:
    """The `NodeSettings` fields of the hardened SecAgg+ mod (privacy/secagg.py, issue 10 item 6): the node's key,
    with which it signs its SecAgg+ keys; the roster it pins to check its neighbours'; its threshold floor."""
    from privacy.secagg_identity import SECAGG_ROSTER, identity_of, load_roster

    if min_threshold < 2:
        raise click.ClickException(f"--secagg-min-threshold must be at least 2, got {min_threshold}")
    config: dict = {"secagg_min_threshold": min_threshold}
    if key is not None:
        config["node_key"] = key.resolve()
    if roster is None and ca_cert is not None and (ca_cert.parent / SECAGG_ROSTER).is_file():
        roster = ca_cert.parent / SECAGG_ROSTER
    if roster is None:
        return config
    try:
        members = load_roster(roster)
        own = identity_of(key) if key is not None else None
    except ValueError as err:
        raise click.ClickException(f"--secagg-roster {err}") from None
    if own is None:
        raise click.ClickException("--secagg-roster needs --key: this node signs its SecAgg+ keys with it")
    if own not in members:
        raise click.ClickException(f"--secagg-roster {roster}: this node's key {key} is not in it; ask the "
                                   "coordinator for the current roster")
    config["secagg_roster"] = roster.resolve()
    typer.echo(f"SecAgg+ roster pinned: {roster} ({len(members)} sites)")
    return config
