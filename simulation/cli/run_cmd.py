"""`fer-sim run` and `fer-sim centralized`.

`run` is a federated simulation with the project's Flower apps on Flower's simulation engine; `centralized` is its
baseline on the pooled data. Both take the same options, so a comparison changes one word of the command line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer

from client.config import STRATEGIES, ConfigError, RunSettings
from client.data.formats import DatasetError
from client.cli.runner import option_group
from privacy.cli_options import PrivacyOptions

if TYPE_CHECKING:
    from server.records import RoundRecord, RunSummary

DatasetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--dataset",
        "-d",
        help="KIND=PATH[@CLIENTS]; repeat for several (e.g. fer2013=DIR@6 and rafdb=DIR@4). Default: synthetic.",
    ),
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML file of run-config keys.")]
IntOpt = int | None
FloatOpt = float | None
StrOpt = str | None


def _make_command(mode: str):
    @option_group(PrivacyOptions, into="privacy")
    def command(
        dataset: DatasetOpt = None,
        config: ConfigOpt = None,
        num_clients: Annotated[IntOpt, typer.Option("--num-clients", "-n", help="Simulated clients.")] = None,
        partition: Annotated[StrOpt, typer.Option(help="iid | dirichlet | pathological | quantity.")] = None,
        alpha: Annotated[FloatOpt, typer.Option(help="Dirichlet concentration (lower = more label skew).")] = None,
        classes_per_client: Annotated[IntOpt, typer.Option(help="Classes per client for 'pathological'.")] = None,
        profiles: Annotated[StrOpt, typer.Option(help="Client profile mix, e.g. hospital=0.3,iot=0.7.")] = None,
        model: Annotated[StrOpt, typer.Option(help="Model name (`fer-sim models` lists them).")] = None,
        init_model: Annotated[StrOpt, typer.Option(
            help="Start from these weights instead of a random model: a shipped reference (fer_vgg@fer2013; "
                 "`fer-sim models` lists them) or a model.pt. Sets --model to its architecture.")] = None,
        public_fraction: Annotated[FloatOpt, typer.Option(
            help="Public pretraining: set aside this stratified fraction of the training data (no site gets it) and "
                 "pretrain round 0's model on it in the clear before round 1 (after --init-model). 0 = none.")] = None,
        public_epochs: Annotated[IntOpt, typer.Option(help="Epochs of public pretraining (default 2).")] = None,
        public_batch_size: Annotated[IntOpt, typer.Option(
            help="Batch size of public pretraining (default: --batch-size).")] = None,
        public_lr: Annotated[FloatOpt, typer.Option(
            help="Peak learning rate of public pretraining (default: --lr, or the model's recipe).")] = None,
        rounds: Annotated[IntOpt, typer.Option(help="Server rounds.")] = None,
        local_epochs: Annotated[IntOpt, typer.Option(help="Local epochs per round.")] = None,
        local_splits: Annotated[
            IntOpt, typer.Option(help="Shorter rounds: each round trains on the next 1/N of each site's shuffled data.")
        ] = None,
        lr: Annotated[FloatOpt, typer.Option(help="Peak local learning rate (default: the model's recipe).")] = None,
        optimizer: Annotated[StrOpt, typer.Option(help="adam | sgd | sgd-nesterov (default: the recipe's).")] = None,
        lr_schedule: Annotated[
            StrOpt, typer.Option(help="constant | warmup-cosine | step, run over the rounds (default: the recipe's).")
        ] = None,
        warmup: Annotated[FloatOpt, typer.Option(help="Fraction of the run spent warming up the rate.")] = None,
        weight_decay: Annotated[FloatOpt, typer.Option(help="Optimiser weight decay.")] = None,
        label_smoothing: Annotated[FloatOpt, typer.Option(help="Cross-entropy label smoothing.")] = None,
        augment: Annotated[
            StrOpt, typer.Option(help="none | light | strong (strong adds random erasing and wider shifts).")
        ] = None,
        class_balance: Annotated[
            StrOpt, typer.Option(help="Rare classes and label skew: none | weights (inverse-frequency loss) | sampling | "
                                         "logit-adjust (the loss adds the site's log label prior).")
        ] = None,
        label_prior: Annotated[StrOpt, typer.Option(
            help="logit-adjust's target label mix: public (the public slice's; needs --public-fraction) | uniform | "
                 "seven class counts n0,...,n6.")] = None,
        flip_tta: Annotated[
            StrOpt, typer.Option(help="on | off: evaluate on the mean softmax of each face and its mirror.")
        ] = None,
        batch_size: Annotated[IntOpt, typer.Option(help="Local batch size.")] = None,
        strategy: Annotated[
            StrOpt, typer.Option(help=" | ".join(STRATEGIES) + ".")
        ] = None,
        proximal_mu: Annotated[FloatOpt, typer.Option(help="FedProx μ.")] = None,
        server_lr: Annotated[
            FloatOpt, typer.Option(help="Server learning rate of fedavgm / fedadam / fedyogi (0 = the strategy's).")
        ] = None,
        server_momentum: Annotated[FloatOpt, typer.Option(help="fedavgm's server momentum.")] = None,
        server_tau: Annotated[FloatOpt, typer.Option(help="fedadam / fedyogi's floor on the per-coordinate "
                                                          "normaliser sqrt(v) + tau.")] = None,
        server_ema: Annotated[
            FloatOpt, typer.Option(help="Evaluate, save and deliver the average of the global model over rounds, "
                                        "at this decay (0 = off; no privacy cost).")
        ] = None,
        server_learning: Annotated[bool | None, typer.Option(
            "--server-learning/--no-server-learning",
            help="After each round's aggregation the server trains the global model on the public slice, as a site "
                 "trains on its data (needs --public-fraction; no privacy cost). `fer-sim centralized` then pools "
                 "the public slice too.")] = None,
        head_refit: Annotated[bool | None, typer.Option(
            "--head-refit/--no-head-refit",
            help="At the end the server re-fits the model's classifier on the public slice, body frozen (needs "
                 "--public-fraction; no privacy cost). `fer-sim centralized` takes the same step.")] = None,
        head_refit_l2: Annotated[FloatOpt, typer.Option(
            help="The re-fit's pull towards the trained classifier, head-refit-l2 * |W - W_trained|^2.")] = None,
        ntd_beta: Annotated[FloatOpt, typer.Option(
            help="Each site adds this weight of not-true distillation towards the round's global model (FedNTD; "
                 "0 = off; non-private runs).")] = None,
        keep_momentum: Annotated[bool | None, typer.Option(
            "--keep-momentum/--no-keep-momentum",
            help="Each site keeps its optimiser's momentum from one of its rounds to the next, on its node, instead "
                 "of restarting it (for short rounds, --local-splits; non-private runs).")] = None,
        fraction_fit: Annotated[FloatOpt, typer.Option(help="Fraction of clients trained per round.")] = None,
        fraction_evaluate: Annotated[FloatOpt, typer.Option(help="Fraction of clients evaluating per round.")] = None,
        seed: Annotated[IntOpt, typer.Option(help="The same seed gives the same metrics on CPU (with --fraction-fit 1).")] = None,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (new or empty).")] = None,
        privacy: PrivacyOptions = PrivacyOptions(),
        attackers: Annotated[
            IntOpt, typer.Option(help="Simulated sites (chosen by the seed) that play --attack; 0 = none.")
        ] = None,
        attack: Annotated[
            StrOpt, typer.Option(help="scale (x100) | sign-flip (x-10) | lie-count (1e6 examples) | noise | label-flip")
        ] = None,
        norm_bound: Annotated[
            FloatOpt, typer.Option(help="Server-side norm bounding: scale updates to at most this x the round's "
                                        "median update norm (0 = off).")
        ] = None,
        verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's own logs.")] = False,
    ) -> None:
        from simulation.cli.options import resolve_settings

        out = out or Path("runs") / time.strftime(f"{mode}-%Y%m%d-%H%M%S")
        overrides: dict[str, Any] = {
            "dataset": ";".join(dataset) if dataset else None,
            "num-clients": num_clients,
            "partition": partition,
            "alpha": alpha,
            "classes-per-client": classes_per_client,
            "profile-mix": profiles,
            "model": model,
            "init-model": init_model,
            "public-fraction": public_fraction,
            "public-epochs": public_epochs,
            "public-batch-size": public_batch_size,
            "public-lr": public_lr,
            "num-server-rounds": rounds,
            "local-epochs": local_epochs,
            "local-splits": local_splits,
            "lr": lr,
            "optimizer": optimizer,
            "lr-schedule": lr_schedule,
            "warmup": warmup,
            "weight-decay": weight_decay,
            "label-smoothing": label_smoothing,
            "augment": augment,
            "class-balance": class_balance,
            "label-prior": label_prior,
            "flip-tta": flip_tta,
            "batch-size": batch_size,
            "strategy": strategy,
            "proximal-mu": proximal_mu,
            "server-lr": server_lr,
            "server-momentum": server_momentum,
            "server-tau": server_tau,
            "server-ema": server_ema,
            "server-learning": server_learning,
            "head-refit": head_refit,
            "head-refit-l2": head_refit_l2,
            "ntd-beta": ntd_beta,
            "keep-momentum": keep_momentum,
            "fraction-fit": fraction_fit,
            "fraction-evaluate": fraction_evaluate,
            "seed": seed,
            "out-dir": str(out),
            "attackers": attackers,
            "attack": attack,
            "norm-bound": norm_bound,
            **privacy.overrides(),
        }
        settings = resolve_settings(config_file=config, overrides=overrides)
        summary = execute(settings, mode=mode, verbose=verbose)
        label = "synthetic data, " if summary.synthetic else ""
        typer.echo(
            f"{mode}: final accuracy {summary.final_accuracy:.4f} (best {summary.best_accuracy:.4f}; "
            f"{label}{summary.rounds} rounds, {summary.seconds:.0f}s)"
        )
        typer.echo(f"report: {Path(settings.out_dir) / 'report.md'}")

    command.__doc__ = (
        "Run a federated simulation and write its run directory (metrics, model, plots, report.md)."
        if mode == "federated"
        else "Train the same model on the clients' pooled data (the baseline) and write the same outputs."
    )
    return command


run = _make_command("federated")
centralized = _make_command("centralized")


def execute(settings: RunSettings, *, mode: str = "federated", verbose: bool = False) -> RunSummary:
    """Runs a simulation or its baseline with a per-round progress bar; user mistakes become one-line errors."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from client.dp_training import check_model_dp_options
    from models import list_models
    from server.records import format_round
    from server.rundir import RunDirectory

    if mode == "centralized" and (settings.dp_enabled or settings.secure_agg or settings.central_dp_enabled):
        # The baseline is the non-private upper bound; a private "centralized" run would compare with nothing.
        raise click.ClickException(
            "fer-sim centralized trains without privacy; drop --dp-epsilon, --secure-agg and --central-dp-noise"
        )
    if mode == "centralized" and settings.attackers:
        raise click.ClickException("fer-sim centralized has no sites to make hostile; drop --attackers")
    if mode == "centralized" and settings.local_splits != 1:
        # Its rounds are whole passes over the pooled data: at the same passes, give it --rounds = rounds / splits.
        raise click.ClickException("fer-sim centralized trains whole passes a round; drop --local-splits")
    if mode == "centralized" and settings.ntd_beta > 0:
        raise click.ClickException("fer-sim centralized has no global model to distill from; drop --ntd-beta")
    if mode == "centralized" and settings.keep_momentum:
        raise click.ClickException("fer-sim centralized keeps one optimiser for the whole run; drop --keep-momentum")
    if settings.model not in list_models():
        raise click.ClickException(f"--model {settings.model!r} is unknown; known: {', '.join(list_models())}")
    try:
        check_model_dp_options(settings)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    fresh = not Path(settings.out_dir).exists()
    try:
        run_dir = RunDirectory(settings.out_dir)
    except (FileExistsError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    try:
        # The data and the federation's layout are checked before anything is written, so a user's mistake leaves
        # no half-made run behind (the plan is cached: the run reuses it).
        from simulation.federation import federation_plan

        federation_plan(settings)
    except (DatasetError, ConfigError, ValueError) as err:  # ValueError: the partitioner's one-line refusals
        if fresh:
            run_dir.path.rmdir()  # made empty just above; rmdir cannot remove anything else
        raise click.ClickException(str(err)) from None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        bar = progress.add_task("round 0 (initial model)", total=settings.num_server_rounds)

        def on_round(record: RoundRecord) -> None:
            description = format_round(record, num_rounds=settings.num_server_rounds)
            progress.update(bar, completed=record.round, description=description)

        try:
            if mode == "centralized":
                from simulation.centralized import run_centralized

                return run_centralized(settings, run_dir=run_dir, on_round=on_round)
            from simulation.runner import run_simulation

            return run_simulation(settings, run_dir=run_dir, on_round=on_round, verbose=verbose)
        except (DatasetError, ConfigError) as err:
            raise click.ClickException(str(err)) from None
