"""`fer-sim demo`: what `make demo` runs: a short federated simulation on the embedded synthetic dataset."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from client.config import RunSettings

# Sized to finish in about two minutes on a 2-core laptop while still showing learning, non-IID clients and the report.
DEMO_SETTINGS = RunSettings(
    dataset="synthetic=2400",
    num_clients=4,
    partition="dirichlet",
    alpha=1.0,
    model="cnn_am",
    num_server_rounds=8,
    local_epochs=4,
    batch_size=32,
    strategy="fedavg",
    min_clients=4,
)


def demo(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (new or empty).")] = None,
) -> None:
    """Run a short federated simulation on synthetic faces and print where its report is."""
    from simulation.cli.run_cmd import execute

    out = out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    settings = DEMO_SETTINGS.replace(out_dir=str(out))
    typer.echo(
        f"fer-fl demo: {settings.num_clients} simulated clients, {settings.num_server_rounds} rounds of "
        f"{settings.strategy} on SYNTHETIC faces (model {settings.model}); nothing leaves this machine."
    )
    summary = execute(settings)
    typer.echo(
        f"accuracy on the synthetic test set: {summary.initial_accuracy:.3f} (initial model) -> "
        f"{summary.final_accuracy:.3f} after {summary.rounds} rounds ({summary.seconds:.0f}s)"
    )
    typer.echo(f"report: {out / 'report.md'}")
