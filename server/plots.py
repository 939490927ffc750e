"""The PNG figures of a run's report (server/report.py), drawn from its typed records.

Figures are drawn on matplotlib's object API with the Agg renderer (no pyplot global state, no display needed).
A painter returns False when its record holds nothing to draw; the report then leaves the figure out.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.data.labels import EMOTIONS
from privacy.atomic import atomic_write
from privacy.report import ClientPrivacy, PrivacyReport
from server.records import RoundRecord

PLOTS = "plots"
_DPI = 110


def save_figure(target: Path, painter: Callable[..., bool], *args: Any, tag: str) -> str | None:
    """Runs `painter(figure, *args, tag=...)`; saves the PNG if it drew something and returns its relative path."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.5), dpi=_DPI, layout="constrained")
    if not painter(figure, *args, tag=tag):
        target.unlink(missing_ok=True)
        return None
    buffer = io.BytesIO()
    # The title is also stored as PNG text metadata, so tools (and tests) can tell what a plot shows unopened.
    figure.savefig(buffer, format="png", metadata={"Title": figure.axes[0].get_title()})
    atomic_write(target, buffer.getvalue())
    return f"{PLOTS}/{target.name}"


def _series(rounds: Sequence[RoundRecord], value: Callable[[RoundRecord], Any]) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for record in rounds:
        found = value(record)
        if isinstance(found, (int, float)) and not isinstance(found, bool) and math.isfinite(found):
            xs.append(record.round)
            ys.append(float(found))
    return xs, ys


def server_value(key: str) -> Callable[[RoundRecord], Any]:
    """Reads one figure of a round's server-side evaluation (None without one)."""
    return lambda record: (record.server or {}).get(key)


def federated_accuracy(record: RoundRecord) -> float | None:
    return None if record.federated is None else record.federated.accuracy


def federated_loss(record: RoundRecord) -> float | None:
    return None if record.federated is None else record.federated.loss


def federated_worst(record: RoundRecord) -> float | None:
    return None if record.federated is None else record.federated.distribution.get("worst_10pct")


def _train_loss(record: RoundRecord) -> float | None:
    return None if record.fit is None else record.fit.train_loss


def _plot_lines(figure: Any, lines: list[tuple[str, list[int], list[float], str]], *, title: str,
                ylabel: str, unit_range: bool) -> bool:
    lines = [line for line in lines if line[1]]
    if not lines:
        return False
    axes = figure.add_subplot()
    for label, xs, ys, style in lines:
        axes.plot(xs, ys, style, label=label, marker="o", markersize=3)
    axes.set(title=title, xlabel="round", ylabel=ylabel)
    if unit_range:
        axes.set_ylim(0, 1)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend()
    return True


def plot_accuracy(figure: Any, rounds: Sequence[RoundRecord], *, tag: str) -> bool:
    lines = [
        ("server accuracy (held-out test set)", *_series(rounds, server_value("accuracy")), "-"),
        ("server macro-F1", *_series(rounds, server_value("macro_f1")), "--"),
        ("federated accuracy (clients' test splits)", *_series(rounds, federated_accuracy), "-"),
        ("federated worst 10 % of clients", *_series(rounds, federated_worst), ":"),
    ]
    return _plot_lines(figure, lines, title=f"Accuracy per round{tag}", ylabel="accuracy", unit_range=True)


def plot_loss(figure: Any, rounds: Sequence[RoundRecord], *, tag: str) -> bool:
    lines = [
        ("server loss (held-out test set)", *_series(rounds, server_value("loss")), "-"),
        ("federated loss (clients' test splits)", *_series(rounds, federated_loss), "-"),
        ("training loss (clients, mean)", *_series(rounds, _train_loss), "--"),
    ]
    return _plot_lines(figure, lines, title=f"Loss per round{tag}", ylabel="loss", unit_range=False)


def client_order(cid: str) -> tuple[int, Any]:
    """Numeric IDs in numeric order, then names."""
    return (0, int(cid)) if cid.lstrip("-").isdigit() else (1, cid)


def _last(rounds: Sequence[RoundRecord], value: Callable[[RoundRecord], Any]) -> tuple[int, Any] | None:
    """The last round whose `value` is non-empty, with that value."""
    return next(((r.round, value(r)) for r in reversed(rounds) if value(r)), None)


def _client_accuracies(record: RoundRecord) -> dict[str, float]:
    clients = record.federated.clients if record.federated is not None else {}
    return {cid: float(c.accuracy) for cid, c in clients.items()}


def plot_clients(figure: Any, rounds: Sequence[RoundRecord], *, tag: str) -> bool:
    found = _last(rounds, _client_accuracies)
    if found is None:
        return False
    round_number, accuracies = found
    ids = sorted(accuracies, key=client_order)
    values = np.array([accuracies[cid] for cid in ids])
    worst_count = max(1, math.ceil(0.1 * len(values)))
    axes = figure.add_subplot()
    axes.bar(range(len(ids)), values, color="tab:blue")
    axes.axhline(values.mean(), color="black", linestyle="--", label=f"mean {values.mean():.3f}")
    worst = np.sort(values)[:worst_count].mean()
    axes.axhline(worst, color="tab:red", linestyle=":", label=f"worst 10 % {worst:.3f}")
    axes.set_xticks(range(len(ids)), ids, rotation=90 if len(ids) > 12 else 0, fontsize=8 if len(ids) > 12 else 10)
    axes.set(title=f"Per-client accuracy, round {round_number}{tag}", xlabel="client", ylabel="accuracy",
             ylim=(0, 1))
    axes.legend()
    return True


def plot_confusion(figure: Any, rounds: Sequence[RoundRecord], *, tag: str) -> bool:
    found = _last(rounds, server_value("confusion_matrix"))
    if found is None:
        return False
    round_number, counts = found[0], np.asarray(found[1], dtype=float)
    names = list(EMOTIONS) if len(counts) == len(EMOTIONS) else [str(k) for k in range(len(counts))]
    rows = counts.sum(axis=1, keepdims=True)
    # Row-normalised colours show recall per true class regardless of how many test images each class has.
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    figure.set_size_inches(6.5, 5.5)
    axes = figure.add_subplot()
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            axes.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                      color="white" if share[i, j] > 0.6 else "black")
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set(title=f"Confusion matrix, round {round_number}{tag}", xlabel="predicted", ylabel="true")
    figure.colorbar(image, ax=axes, label="share of the true class")
    return True


@dataclass(frozen=True)
class PartitionView:
    """partition.json (simulation.federation.federation_stats) as arrays: who holds how many of each class."""

    clients: list[str]
    counts: np.ndarray  # clients x classes
    classes: list[str]
    profiles: list[str | None]
    skew: dict[str, float]  # label skew (mean TV from the global mix) per dataset

    @classmethod
    def from_json(cls, partition: Mapping[str, Any] | None) -> PartitionView | None:
        """{"clients": {id: {"per_class", "profile", "dataset", ...}}, "datasets": {spec: partition_stats}}, or None
        when it lists no client."""
        if not partition or not partition.get("clients"):
            return None
        datasets = partition.get("datasets") or {}
        entries = list(partition["clients"].items())
        counts = np.asarray([entry["per_class"] for _, entry in entries], dtype=float)
        classes = next((list(block["classes"]) for block in datasets.values() if block.get("classes")), None)
        if classes is None or len(classes) != counts.shape[1]:
            classes = list(EMOTIONS) if counts.shape[1] == len(EMOTIONS) else [str(k) for k in range(counts.shape[1])]
        return cls(clients=[str(cid) for cid, _ in entries], counts=counts, classes=[str(c) for c in classes],
                   profiles=[entry.get("profile") for _, entry in entries],
                   skew={str(spec): float(block["label_skew_tv"]) for spec, block in datasets.items()
                         if isinstance(block.get("label_skew_tv"), (int, float))})


def plot_partition(figure: Any, view: PartitionView | None, *, tag: str) -> bool:
    if view is None:
        return False
    many = len(view.clients) > 12
    labels = [cid if many or not profile else f"{cid}\n{profile}" for cid, profile in zip(view.clients, view.profiles)]
    axes = figure.add_subplot()
    bottom = np.zeros(len(view.counts))
    for k, name in enumerate(view.classes):
        axes.bar(range(len(view.counts)), view.counts[:, k], bottom=bottom, label=name, color=f"C{k}")
        bottom += view.counts[:, k]
    axes.set_xticks(range(len(labels)), labels, rotation=90 if many else 0, fontsize=7 if many else 8)
    skew = ", ".join(f"{spec} {value:.2f}" for spec, value in view.skew.items())
    subtitle = f"\nlabel skew (mean TV from the global mix): {skew}" if skew else ""
    axes.set(title=f"Label distribution per client{tag}{subtitle}", xlabel="client", ylabel="samples")
    axes.legend(fontsize=8, ncol=2)
    return True


def privacy_clients(privacy: PrivacyReport | None) -> list[ClientPrivacy]:
    """The report's clients in client order."""
    return sorted(privacy.clients, key=lambda c: client_order(c.client_id)) if privacy else []


def plot_privacy(figure: Any, privacy: PrivacyReport | None, *, tag: str) -> bool:
    clients = privacy_clients(privacy)
    if not clients:
        return False
    axes = figure.add_subplot()
    positions = range(len(clients))
    axes.bar(positions, [c.epsilon_spent for c in clients], color="tab:purple", label="ε spent")
    axes.scatter(list(positions), [c.epsilon_budget for c in clients], marker="_", s=400, color="black",
                 label="ε budget")
    axes.set_xticks(list(positions), [c.client_id for c in clients], rotation=90 if len(clients) > 12 else 0)
    axes.set(title=f"Privacy spend per client{tag}", xlabel="client", ylabel="ε")
    axes.legend()
    return True
