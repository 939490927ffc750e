"""`fer-client adapt`: fit a personal head for one patient or camera from a carer's corrections, on this device.

    fer-client adapt CORRECTIONS --name bed-3 [--model PATH] [--state-dir DIR]

CORRECTIONS holds one folder per expression (`sad/`, `happy/`, ...; dataset folder names such as `sadness` work
too) with the patient's faces: the aligned crops `fer-client watch --save-uncertain` writes, or pictures in which
the face is found as in training. The head is written to STATE_DIR/personal/NAME.pt with its card NAME.json and is
used only by `predict`/`watch --personal NAME`; it never leaves the device and never enters a federated round.
stdout: the card as one JSON line; stderr: a one-line summary. Bad input is one line naming it, exit code 1, and
nothing is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from client.cli.predict_cmd import ModelOption, StateDirOption


def adapt(
    corrections: Annotated[Path, typer.Argument(help="Folder of emotion folders of the patient's faces.")],
    name: Annotated[str, typer.Option("--name", help="The patient or camera the head is for (its file name).")],
    model: ModelOption = None,
    state_dir: StateDirOption = Path("fer-client-state"),
    epochs: Annotated[int, typer.Option(help="Passes over the corrections.")] = 100,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-2,
    anchor: Annotated[float, typer.Option(
        help="Pull towards the federated head (weight of the squared distance; 0: free fit).")] = 0.3,
    seed: Annotated[int, typer.Option(help="Seed of the mini-batch order.")] = 0,
) -> int:
    """Fit a personal head for one patient from a carer's labelled faces (kept on this device only).

    The "accuracy on them" it reports is on the corrections themselves (a fit, not a held-out figure).
    """
    from client.inference.adapt import AdaptSettings, adapt as fit, count_unlabelled, personal_paths
    from client.inference.model import resolve_model

    settings = AdaptSettings(epochs=epochs, lr=lr, anchor=anchor, seed=seed)
    weights, _ = personal_paths(state_dir, name)  # a bad name is refused before any image is read
    base = resolve_model(model=model, runtime="torch", state_dir=state_dir)
    card = fit(base=base, corrections=corrections, name=name, state_dir=state_dir, settings=settings)
    sys.stdout.write(json.dumps(card.to_json()) + "\n")
    unlabelled = count_unlabelled(corrections)
    note = f"; {unlabelled} unlabelled images at the top of {corrections} not used" if unlabelled else ""
    counts = ", ".join(f"{emotion} {count}" for emotion, count in card.per_class.items())
    print(f"fer-client: personal head {name!r}: {card.corrections} corrections ({counts}), accuracy on them "
          f"{card.accuracy_before:.2f} -> {card.accuracy_after:.2f}; saved to {weights}{note}", file=sys.stderr)
    return 0

