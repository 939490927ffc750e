"""`fer-sim evaluate`: the metrics of a saved model on a dataset split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import click
import typer


def evaluate_saved_model(
    *, model_path: Path, dataset: str, split: str, image_size: int | None = None, seed: int | None = None,
    flip_tta: bool | None = None,
) -> dict[str, Any]:
    """Loads `model.pt` (+ its `model.json`) and returns accuracy, macro-F1, per-class recall and confusion matrix,
    with flip averaging as the model's recipe says (or `flip_tta`), and under `flip_averaging` both readings.

    `image_size` and `seed` (which synthetic faces to generate) default to the run's, recorded in `model.json`, so
    evaluating a run's model on `synthetic=N` scores the same test faces its server did. `flip_tta` (averaging
    each face with its mirror) defaults to the model's recipe, as the server's evaluation does.

    Raises:
        click.ClickException: a missing or unreadable model file, or a dataset problem, in one line.
    """
    from torch.utils.data import DataLoader

    from client import task
    from client.data.formats import DatasetError, load_dataset
    from client.data.preprocess import FERTorchDataset
    from models import model_recipe
    from server.metrics import classification_metrics

    from models.card import SchemaVersionError
    from models.files import build_model, load_model

    try:
        # load_model reads with weights_only=True and checks the sha256 recorded beside the file: a checkpoint is
        # data, never code, and a truncated or replaced file is refused rather than evaluated.
        state, card = load_model(model_path)
        name = card.name
        model = build_model(card)
        model.load_state_dict(state)
    except (FileNotFoundError, SchemaVersionError) as err:
        raise click.ClickException(str(err)) from None
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise click.ClickException(f"{model_path}: cannot load the model ({first_line})") from None
    image_size = image_size or card.image_size or 48
    seed = (card.data_seed or 0) if seed is None else seed
    try:
        # Scoring needs only the split scored on: image folders may hold test/ alone, or bare <emotion>/ folders.
        data = load_dataset(dataset, image_size=image_size, seed=seed, test_only=split != "train")
    except DatasetError as err:
        raise click.ClickException(str(err)) from None
    if split not in data.splits:
        raise click.ClickException(f"--split {split!r}: {dataset} has splits {', '.join(sorted(data.splits))}")
    part = data.splits[split]
    loader = DataLoader(FERTorchDataset(part.images, part.labels), batch_size=256)
    flip_tta = model_recipe(name).flip_tta if flip_tta is None else flip_tta
    # Both readings, so a reader sees what flip averaging buys; the headline figures are the recipe's (or --flip-tta).
    results = {tta: task.evaluate(model, loader, flip_tta=tta) for tta in (False, True)}
    result = results[flip_tta]
    metrics = classification_metrics(result.targets, result.predictions)
    readings = {}
    for tta, reading in results.items():
        scored = classification_metrics(reading.targets, reading.predictions)
        readings["on" if tta else "off"] = {"loss": reading.loss, **{key: scored[key] for key in (
            "accuracy", "macro_f1", "per_class_recall", "confusion_matrix")}}
    return {
        "model": name,
        "dataset": dataset,
        "split": split,
        "synthetic": data.synthetic,
        "num_examples": result.num_examples,
        "loss": result.loss,
        "flip_tta": flip_tta,
        **metrics,
        "flip_averaging": readings,
    }


def evaluate(
    model: Annotated[Path, typer.Option(
        "--model", "-m",
        help="A run's model.pt (model.json must sit beside it), or a shipped reference (fer_vgg@fer2013).")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="KIND=PATH, or synthetic.")],
    split: Annotated[str, typer.Option(help="Split to evaluate on.")] = "test",
    seed: Annotated[
        int | None, typer.Option(help="Seed of synthetic data (default: the run's, from model.json).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Evaluate a saved model: accuracy, macro-F1, per-class recall and the confusion matrix."""
    result = evaluate_saved_model(model_path=model, dataset=dataset, split=split, seed=seed)
    if as_json:
        typer.echo(json.dumps(result))
        return
    from client.data.labels import EMOTIONS

    typer.echo(f"{result['model']} on {dataset} [{split}] ({result['num_examples']} images"
               f"{', synthetic' if result['synthetic'] else ''})")
    typer.echo(f"accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}")
    for name, recall in zip(EMOTIONS, result["per_class_recall"]):
        typer.echo(f"  recall {name:<9} {'n/a' if recall is None else f'{recall:.3f}'}")
