"""`fer-server start` (also plain `fer-server`): start the SuperLink, submit our app, follow it, write the report.

Secure by default: TLS with the certificates `fer-server certs` made, and only enrolled SuperNodes may join.
`--insecure` turns both off and says so loudly on stderr.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer

from client.cli.runner import option_group
from privacy.cli_options import PrivacyOptions
from server.cli.enroll_cmd import DEFAULT_STATE

if TYPE_CHECKING:
    from client.config import RunSettings

# A SecAgg+ stage waits this long for slow nodes before treating them as dropped (0 would wait forever).
DEFAULT_SECAGG_TIMEOUT = 120.0
# A plain round going on without a node that has not answered in 15 minutes (lost reply, dead node) beats
# waiting forever; the node's update is simply absent from that round, as with any failure.
DEFAULT_ROUND_TIMEOUT = 900.0
INSECURE_WARNING = (
    "WARNING: --insecure: TLS and node authentication are OFF. Anyone who can reach this port can join the "
    "federation and read every model update in transit. Use only for a throw-away local test."
)


@dataclass(frozen=True)
class ListenOptions:
    """How `fer-server start` and `resume` run the SuperLink (see `client.cli.runner.option_group`)."""

    certs: Annotated[Path, typer.Option("--certs", help="Folder from `fer-server certs`.")] = Path("certs")
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="SuperLink state (SQLite), Flower home and log.")
    ] = DEFAULT_STATE
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "0.0.0.0"
    port: Annotated[int, typer.Option(help="The one HTTPS port SuperNodes and the CLI use.")] = 9092
    connect_host: Annotated[
        str, typer.Option(help="Name this machine's own CLI dials; must be in the certificate's hosts.")
    ] = "127.0.0.1"
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no node authentication (loud warning).")] = False
    enroll: Annotated[
        list[Path] | None, typer.Option("--enroll", help="A site's node.pub to enrol before the run; repeat.")
    ] = None
    timeout: Annotated[float | None, typer.Option("--timeout", help="Give up after this many seconds.")] = None
    keep_running: Annotated[
        bool, typer.Option(help="Keep the SuperLink running after the run (Ctrl-C to stop).")
    ] = False


def with_default_timeouts(settings: RunSettings) -> RunSettings:
    """`settings` with the coordinator's stage and round timeouts where the run config leaves them at 0 (never)."""
    if settings.secure_agg and settings.secagg_timeout == 0:
        settings = settings.replace(secagg_timeout=DEFAULT_SECAGG_TIMEOUT)
    if settings.round_timeout == 0:
        settings = settings.replace(round_timeout=DEFAULT_ROUND_TIMEOUT)
    return settings


@option_group(ListenOptions, into="listen")
@option_group(PrivacyOptions, into="privacy")
def start(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (new or empty).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML file of run-config keys.")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="The server's held-out test data, KIND=PATH (default: synthetic).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model name.")] = None,
    init_model: Annotated[str | None, typer.Option(
        help="Start round 0 from these weights: a shipped reference (fer_vgg@fer2013) or a model.pt. Sets --model "
             "to its architecture.")] = None,
    public_fraction: Annotated[float | None, typer.Option(
        help="Pretrain round 0 in the clear on this stratified fraction of --dataset's training split (the "
             "coordinator's own public faces) before round 1. 0 = none.")] = None,
    public_epochs: Annotated[int | None, typer.Option(help="Epochs of public pretraining (default 2).")] = None,
    rounds: Annotated[int | None, typer.Option(help="Server rounds.")] = None,
    min_clients: Annotated[int | None, typer.Option(help="Wait for this many nodes before round 1.")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs per round.")] = None,
    strategy: Annotated[str | None, typer.Option(help="fedavg | fedprox | fedadam | fedmedian | ...")] = None,
    privacy: PrivacyOptions = PrivacyOptions(),
    secagg_timeout: Annotated[float | None, typer.Option(help="Seconds per SecAgg+ stage (default 120).")] = None,
    round_timeout: Annotated[
        float | None, typer.Option(help="Seconds a round waits for replies before going on without them (default 900).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the initial model.")] = None,
    listen: ListenOptions = ListenOptions(),
) -> None:
    """Start the SuperLink and run the federation to its last round, writing the run directory."""
    from client.config import ConfigError, RunSettings
    from client.config_file import read_run_config_file
    from client.dp_training import check_model_dp_options
    from server.rundir import check_new_run_dir

    out = (out or Path("runs") / time.strftime("server-%Y%m%d-%H%M%S")).resolve()
    try:
        check_new_run_dir(out)
        run_config: dict[str, Any] = read_run_config_file(config) if config else {}
    except (FileExistsError, ConfigError) as err:
        raise click.ClickException(str(err)) from None
    overrides = {
        "dataset": dataset, "model": model, "init-model": init_model, "public-fraction": public_fraction,
        "public-epochs": public_epochs, "num-server-rounds": rounds, "min-clients": min_clients,
        "local-epochs": local_epochs, "strategy": strategy, "secagg-timeout": secagg_timeout,
        "round-timeout": round_timeout, "seed": seed, **privacy.overrides(),
    }
    run_config.update({k: v for k, v in overrides.items() if v is not None})
    run_config["out-dir"] = str(out)
    run_config["resume-from"] = ""
    try:
        settings = with_default_timeouts(RunSettings.from_run_config(run_config))
        if settings.init_model:
            from server.init_model import with_init_model

            settings = with_init_model(settings, model_given="model" in run_config)
        check_model_dp_options(settings)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    launch(settings=settings, listen=listen)


def launch(
    *,
    settings: RunSettings,
    listen: ListenOptions,
    command: str = "fer-server start",
    banner: str | None = None,
) -> None:
    """Starts the SuperLink, enrols keys, submits the run and follows it; shared by `start` and `resume`.

    A live predecessor (a fer-server on the same state or run directory, or anything on the port) stops it before
    anything is written (server.locks.CoordinatorLocks.probe; the locks are taken once the data and certificates checked out). The SuperLink's whole process tree dies with this process, however it
    dies, and holds the locks until it is gone: a later `resume` can never race a leftover of this one.
    """
    from server.deploy import DeployError, SuperLink, SuperLinkSettings, TlsFiles
    from server.locks import CoordinatorLocks
    from server.ledger_registry import REGISTRY_FILE, LedgerRegistryError, NodeLedgers
    from server.records import format_round
    from server.report import write_report
    from server.rundir import RunDirectory

    run_dir = Path(settings.out_dir)
    enroll = listen.enroll or []
    try:
        CoordinatorLocks.probe(state_dir=listen.state_dir, run_dir=run_dir, host=listen.host, port=listen.port)
    except DeployError as err:
        raise click.ClickException(str(err)) from None
    if banner:
        typer.echo(banner)
    _check_server_data(settings)
    # The coordinator's record of each node's privacy ledger outlives this run: a resume or the next run with the
    # same state folder still refuses a node whose ledger went back or was replaced (server/ledger_registry.py).
    settings = settings.replace(ledger_registry=str(Path(listen.state_dir).resolve() / REGISTRY_FILE))
    try:
        NodeLedgers(Path(settings.ledger_registry))
    except LedgerRegistryError as err:
        raise click.ClickException(str(err)) from None
    for key in enroll:
        if not key.is_file():
            raise click.ClickException(f"public key file {key} does not exist")
    try:
        tls = None if listen.insecure else TlsFiles.from_dir(listen.certs)
    except DeployError as err:
        raise click.ClickException(str(err)) from None
    if listen.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    link_settings = SuperLinkSettings(
        state_dir=listen.state_dir, host=listen.host, port=listen.port, tls=tls, insecure=listen.insecure,
        connect_host=listen.connect_host,
    )
    try:
        locks = CoordinatorLocks.claim(
            state_dir=listen.state_dir, run_dir=run_dir, host=listen.host, port=listen.port, command=command
        )
        try:
            link = SuperLink.start(link_settings, pass_fds=locks.fds)
        except BaseException:
            locks.release()
            raise
    except DeployError as err:
        raise click.ClickException(str(err)) from None
    locks.add_helper(link.process.pid)
    try:
        scheme = "http" if listen.insecure else "https"
        typer.echo(f"SuperLink listening on {scheme}://{listen.host}:{listen.port} (state: {link.state_dir})")
        for key in enroll:
            typer.echo(f"enrolled node {link.enroll(key)} ({key.name})")
        typer.echo(f"waiting for {settings.min_clients} nodes to come online", nl=True)
        link.wait_for_nodes(settings.min_clients, timeout=listen.timeout)
        run_id = link.submit(app_dir=app_dir(), run_config=settings.to_run_config())
        typer.echo(f"run {run_id} submitted: {settings.num_server_rounds} rounds of {settings.model}")
        link.follow(run_id, run_dir=run_dir, timeout=listen.timeout, on_round=lambda r: typer.echo(
            format_round(r, num_rounds=settings.num_server_rounds)))
        report = write_report(run_dir)
        typer.echo(f"run directory: {run_dir} (report: {report.name})")
        summary = RunDirectory(run_dir, create=False).summary()
        if summary is not None and summary.final_accuracy is not None:
            typer.echo(f"final accuracy {summary.final_accuracy:.4f}")
        if listen.keep_running:
            typer.echo("SuperLink keeps running; Ctrl-C stops it")
            while link.process is not None and link.process.poll() is None:
                time.sleep(1.0)
    except DeployError as err:
        raise click.ClickException(str(err)) from None
    finally:
        link.stop()
        locks.release()


def app_dir() -> Path:
    """The folder whose pyproject.toml declares our Flower app (what `flwr run` packages)."""
    return Path(__file__).resolve().parents[2]


def _check_server_data(settings) -> None:
    from client.data.formats import DatasetError
    from client.node_data import parse_dataset_list

    try:
        for entry in parse_dataset_list(settings.dataset):
            from client.data.formats import load_dataset

            load_dataset(entry.spec, image_size=settings.image_size, seed=settings.seed)
    except DatasetError as err:
        raise click.ClickException(str(err)) from None
