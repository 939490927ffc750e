"""Centralised accuracy of one model trained with its recipe on FER2013: what an hour of this CPU buys.

    .venv/bin/python benchmarks/bench_accuracy.py --model cnn_am [--minutes 60] [--epochs 30] [--quick]
        [--data ../shared/data/fer2013] [--recipe KEY=VALUE ...] [--norm gn|bn] [--threads N]
        [--device auto|cpu|cuda] [--workers N]

Trains `--model` on FER2013's training split with the model's recipe (models/recipe.py; `--recipe lr=0.05` etc.
change single keys), holding out a stratified validation split carved from the training set (`--val-fraction`):
the per-epoch figure is validation accuracy, and anything tuned is tuned on it, never on PublicTest. PublicTest
(`test/`) is scored once, at the end: accuracy, macro-F1 and per-class recall, with and without flip averaging.

The learning-rate schedule runs over `--epochs`; with `--minutes N` the plan is cut to the epochs that fit the
budget, estimated from the first epoch's time (the schedule then still ends at 0 instead of being stopped
half-way). `--quick` trains on a small slice (2,000 training, 500 test faces, 2 epochs) to check the script in
under two minutes. Prints one line per epoch and writes benchmarks/results/bench_accuracy_<model>[_quick].json
(atomically) and a PNG of validation accuracy against wall-clock time beside it.

`--device cuda` trains on a GPU when one is lent (issue 12 item 7; benchmarks/gpu_dmsnet_light.sh is the prepared
run); the default `auto` takes a GPU only where torch sees one, so nothing here depends on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from client import task
from client.data.formats import load_dataset
from client.data.labels import EMOTIONS
from client.data.preprocess import FERTorchDataset
from models import count_params, create_model, model_options, model_recipe
from models.layers import batch_norm, group_norm
from privacy.atomic import atomic_write, atomic_write_with
from server.metrics import classification_metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICK_TRAIN, QUICK_TEST, QUICK_EPOCHS = 2000, 500, 2


def stratified_split(labels: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation): `fraction` of each class, drawn by `seed`, goes to validation."""
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        val.append(members[: max(1, round(fraction * len(members)))])
    val_idx = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def stratified_slice(labels: np.ndarray, *, n: int, seed: int) -> np.ndarray:
    """About `n` indices with the class mix of `labels` (for --quick)."""
    _, picked = stratified_split(labels, fraction=min(1.0, n / len(labels)), seed=seed)
    return picked


def parse_recipe(base, pairs: list[str]):
    """The recipe with each KEY=VALUE of `--recipe` applied (values take the type of the field they replace)."""
    return dataclasses.replace(base, **field_pairs(pairs, base, what="--recipe"))


def field_pairs(pairs: list[str], base, *, what: str) -> dict:
    """KEY=VALUE pairs naming fields of the dataclass instance `base` (kebab- or snake-case), typed like them;
    the other benchmarks' `--set` takes RunSettings fields this way."""
    fields = {name: getattr(base, name) for name in base.__dataclass_fields__}
    return typed_pairs(pairs, fields, what=what, normalise=True)


def parse_cfg(model: str, pairs: list[str]) -> dict:
    """The model options of `--cfg KEY=VALUE` (values take the type of the option's default)."""
    return typed_pairs(pairs, model_options(model), what="--cfg")


def typed_pairs(pairs: list[str], defaults: dict, *, what: str, normalise: bool = False) -> dict:
    """KEY=VALUE pairs as {key: value}, each value of its default's type; an unknown key ends the script in one
    line naming `what` and the known keys."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        key = key.replace("-", "_") if normalise else key
        if key not in defaults:
            raise SystemExit(f"{what} {pair}: no key {key!r}; keys: {', '.join(defaults)}")
        kind = type(defaults[key])
        out[key] = value.lower() in ("1", "true", "on", "yes") if kind is bool else kind(value)
    return out


def score(model, images: np.ndarray, labels: np.ndarray, *, device: str = "cpu") -> dict:
    """Accuracy, macro-F1 and per-class recall, without and with flip averaging."""
    loader = DataLoader(FERTorchDataset(images, labels), batch_size=256)
    out = {}
    for name, flip in (("plain", False), ("flip_tta", True)):
        result = task.evaluate(model, loader, flip_tta=flip, device=device)
        metrics = classification_metrics(result.targets, result.predictions)
        out[name] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "loss": result.loss,
                     "per_class_recall": dict(zip(EMOTIONS, metrics["per_class_recall"]))}
    return out


def resolve_device(name: str) -> str:
    """`auto` is cuda where torch sees a GPU, else cpu; `cuda` without one ends the script in one line."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU on this machine (use --device cpu or auto)")
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn_am")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fer2013")
    parser.add_argument("--epochs", type=int, default=30, help="epochs the schedule is planned over")
    parser.add_argument("--minutes", type=float, default=0.0, help="training budget; 0 = run all --epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE",
                        help="change one recipe key, e.g. lr=0.05, schedule=step, class_balance=weights")
    parser.add_argument("--cfg", action="append", default=[], metavar="KEY=VALUE",
                        help="a model option, e.g. depth=5 for CNN-AM's deeper build (`fer-sim models` lists them)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="train in channels-last memory format: on this CPU max-pooling an NCHW map is ~7x "
                             "slower (18 ms against 2.4 ms for 64x32x48x48); the numbers are the same either way")
    parser.add_argument("--norm", choices=("gn", "bn"), default="gn",
                        help="gn: the GroupNorm build federations and DP use; bn: BatchNorm")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to train: auto = a GPU if torch sees one, else the CPU")
    parser.add_argument("--workers", type=int, default=0,
                        help="loader processes that augment (0 = in the training process, as on the 2-core CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small slice, 2 epochs: checks the script")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--save-model", type=Path, default=None, metavar="DIR",
                        help="also write the trained model as DIR/model.pt + model.json (a run's model format, so "
                             "`fer-sim evaluate`, `fer-client predict --model` and `fer-client export` take it)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = parse_recipe(model_recipe(args.model), args.recipe)

    started = time.perf_counter()
    data = load_dataset(f"fer2013={args.data}", seed=args.seed)
    if "test" not in data.splits:
        raise SystemExit(f"{args.data}: no test/ (PublicTest) split")
    train, test = data.splits["train"], data.splits["test"]
    x_train, y_train, x_test, y_test = train.images, train.labels, test.images, test.labels
    epochs = args.epochs
    if args.quick:
        keep = stratified_slice(y_train, n=QUICK_TRAIN, seed=args.seed)
        x_train, y_train = x_train[keep], y_train[keep]
        keep = stratified_slice(y_test, n=QUICK_TEST, seed=args.seed)
        x_test, y_test = x_test[keep], y_test[keep]
        epochs = QUICK_EPOCHS
    fit_idx, val_idx = stratified_split(y_train, fraction=args.val_fraction, seed=args.seed)
    load_seconds = time.perf_counter() - started
    print(f"data: {len(fit_idx)} train, {len(val_idx)} validation, {len(y_test)} PublicTest "
          f"(loaded in {load_seconds:.0f}s); recipe {recipe}", flush=True)

    torch.manual_seed(args.seed)
    cfg = parse_cfg(args.model, args.cfg)
    model = create_model(args.model, norm_layer=group_norm if args.norm == "gn" else batch_norm, **cfg)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    local = task.prepare_training(model, x_train[fit_idx], y_train[fit_idx], recipe=recipe,
                                  batch_size=args.batch_size, seed=args.seed, server_round=1, num_rounds=epochs,
                                  num_workers=args.workers)
    local.criterion.to(device)
    val_loader = DataLoader(FERTorchDataset(x_train[val_idx], y_train[val_idx]), batch_size=256)
    curve, train_seconds, epoch = [], 0.0, 0
    while epoch < epochs:
        epoch += 1
        tick = time.perf_counter()
        result = task.train(model, local.loader, epochs=1, optimizer=local.optimizer, criterion=local.criterion,
                            lr_at=recipe.round_schedule(server_round=epoch, num_rounds=epochs), device=device)
        train_seconds += time.perf_counter() - tick
        val = task.evaluate(model, val_loader, flip_tta=recipe.flip_tta, device=device)
        curve.append({"epoch": epoch, "train_loss": result.loss, "val_accuracy": val.accuracy,
                      "train_seconds": round(train_seconds, 1), "lr_end": local.optimizer.param_groups[0]["lr"]})
        print(f"epoch {epoch}/{epochs}: train loss {result.loss:.4f}, val accuracy {val.accuracy:.4f}, "
              f"{train_seconds:.0f}s", flush=True)
        if epoch == 1 and args.minutes > 0 and not args.quick:
            # Re-plan once: the schedule (progress = epoch / epochs) then ends at its last value within the budget.
            epochs = max(1, min(epochs, int(args.minutes * 60 / train_seconds)))

    final = score(model, x_test, y_test, device=device)
    results = {
        "model": args.model, "cfg": cfg, "norm": args.norm, "channels_last": args.channels_last,
        "params": count_params(model), "recipe": dataclasses.asdict(recipe),
        "batch_size": args.batch_size, "epochs": epoch, "minutes_budget": args.minutes, "quick": args.quick,
        "threads": torch.get_num_threads(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "workers": args.workers, "torch": torch.__version__, "train_examples": len(fit_idx), "val_examples": len(val_idx),
        "test_examples": len(y_test), "train_seconds": round(train_seconds, 1), "curve": curve,
        "val": score(model, x_train[val_idx], y_train[val_idx], device=device), "public_test": final,
        "note": "validation carved from train (stratified); PublicTest scored once after training",
    }
    for name, block in final.items():
        print(f"PublicTest {name}: accuracy {block['accuracy']:.4f}, macro-F1 {block['macro_f1']:.4f}, recall "
              + ", ".join(f"{k} {v:.2f}" for k, v in block["per_class_recall"].items() if v is not None))
    if args.save_model is not None:
        from server.rundir import RunDirectory

        # The GroupNorm build is the federated (dp=True) one; BatchNorm is the plain build.
        state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
        RunDirectory(args.save_model).save_model(state, model_name=args.model,
                                                 model_cfg={**cfg, "dp": args.norm == "gn"}, round=epoch, image_size=48,
                                                 dataset=f"fer2013={args.data}")
        print(f"saved the model in {args.save_model}/model.pt", flush=True)
    out = args.out or RESULTS / f"bench_accuracy_{args.model}{'_quick' if args.quick else ''}.json"
    atomic_write(out, json.dumps(results, indent=2) + "\n")
    _plot(curve, out.with_suffix(".png"), title=f"{args.model} ({args.norm}), validation accuracy")
    print(f"wrote {out}")


def _plot(curve: list[dict], path: Path, *, title: str) -> None:
    """Validation accuracy against training wall-clock minutes (Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([p["train_seconds"] / 60 for p in curve], [p["val_accuracy"] for p in curve], marker="o")
    axes.set(xlabel="training time (min)", ylabel="validation accuracy", title=title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write_with(path, lambda handle: figure.savefig(handle, format="png"))


if __name__ == "__main__":
    main()
