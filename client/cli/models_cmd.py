"""`fer-client models`: the models federations delivered to this site, newest first (client/delivery.py).

    fer-client models [--state-dir DIR] [--json]

One line per model: run, round, delivery date, the coordinator's test accuracy, the site's cumulative ε when it was
stored, whether SecAgg+ was on, and the first 12 hex digits of the weights' sha256. `--json` prints one JSON object
per line (the stored card plus its `path`), for scripts. A site that holds none gets one line saying so (exit 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from client.cli.predict_cmd import StateDirOption

_COLUMNS = ("run", "round", "delivered", "accuracy", "epsilon", "secagg", "sha256")


def models(
    state_dir: StateDirOption = Path("fer-client-state"),
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per model (its card and path).")] = False,
) -> None:
    """List the final models federations delivered to this site, newest first (predict and watch use the first)."""
    from client.delivery import list_delivered, models_dir

    held = list_delivered(state_dir)
    if as_json:
        for model in held:
            typer.echo(json.dumps({**model.card.to_json(), "path": str(model.path)}))
        return
    if not held:
        typer.echo(f"no delivered models in {models_dir(state_dir)}")
        return
    rows = [_COLUMNS, *(_row(model.card) for model in held)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _row(card) -> tuple[str, ...]:
    accuracy = card.server_metrics.get("accuracy")
    return (
        card.run_id,
        str(card.round),
        (card.delivered_at or "-").replace("T", " ").removesuffix("+00:00"),
        "-" if accuracy is None else f"{accuracy:.4f}",
        "-" if card.epsilon_spent is None else f"{card.epsilon_spent:.3g}",
        "on" if card.secure_aggregation else "off",
        card.weights_sha256[:12],
    )
