"""The human-readable side of a run directory: PNG plots and a report.md that shows them.

Everything is read back from the files (config.json, metrics.jsonl, summary.json, partition.json, privacy.json),
so the report can be rebuilt for any finished or interrupted run; a missing optional piece only drops its section.
Figures are drawn on matplotlib's object API with the Agg renderer (no pyplot global state, no display needed).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.data.labels import EMOTIONS
from server.metrics import summarize
from privacy.atomic import atomic_write
from server.rundir import CONFIG_JSON, PARTITION_JSON, PRIVACY_JSON, SUMMARY_JSON, RunDirectory

PLOTS = "plots"
REPORT_MD = "report.md"
_DPI = 110


def write_report(run_dir: Path | str) -> Path:
    """Draws the run's plots into plots/ and writes report.md beside them; returns the report's path.

    Sections: summary, configuration, accuracy and loss per round (server-side and federated), per-round table,
    final per-class results and confusion matrix, per-client accuracy of the last federated evaluation and the
    rejected updates, the partition's label distribution, and a Privacy section when privacy.json exists.
    Titles and the report say "synthetic" when the config names the synthetic dataset.

    Raises:
        FileNotFoundError: `run_dir` does not exist.
    """
    run = RunDirectory(run_dir, create=False)
    config = run.read_json(CONFIG_JSON) or {}
    rounds = run.rounds()
    partition = run.read_json(PARTITION_JSON)
    privacy = run.read_json(PRIVACY_JSON)
    summary = run.read_json(SUMMARY_JSON)
    if summary is None and rounds:
        summary = summarize(rounds, seconds=sum(float(r.get("seconds") or 0) for r in rounds),
                            model_name=str(_find_key(config, "model") or "unknown"))
    synthetic = _is_synthetic(config)
    tag = " (synthetic data)" if synthetic else ""
    plots = run.path / PLOTS
    plots.mkdir(exist_ok=True)

    def draw(name: str, painter: Callable[..., bool], *args: Any) -> str | None:
        return _save_figure(plots / name, painter, *args, tag=tag)

    figures = {
        "accuracy": draw("accuracy.png", _plot_accuracy, rounds),
        "loss": draw("loss.png", _plot_loss, rounds),
        "clients": draw("clients.png", _plot_clients, rounds),
        "confusion": draw("confusion.png", _plot_confusion, rounds),
        "partition": draw("partition.png", _plot_partition, partition),
        "privacy": draw("privacy.png", _plot_privacy, privacy),
    }
    text = _markdown(run.path.name, config, rounds, summary, partition, privacy, figures, synthetic)
    target = run.path / REPORT_MD
    atomic_write(target, text.encode())
    return target


# ---------------------------------------------------------------- figures


def _save_figure(target: Path, painter: Callable[..., bool], *args: Any, tag: str) -> str | None:
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


def _series(rounds: Sequence[dict], block: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for record in rounds:
        value = (record.get(block) or {}).get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(record["round"])
            ys.append(float(value))
    return xs, ys


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


def _plot_accuracy(figure: Any, rounds: Sequence[dict], *, tag: str) -> bool:
    worst = [(r["round"], (r.get("federated") or {}).get("distribution", {}).get("worst_10pct")) for r in rounds]
    worst = [(x, y) for x, y in worst if isinstance(y, (int, float))]
    lines = [
        ("server accuracy (held-out test set)", *_series(rounds, "server", "accuracy"), "-"),
        ("server macro-F1", *_series(rounds, "server", "macro_f1"), "--"),
        ("federated accuracy (clients' test splits)", *_series(rounds, "federated", "accuracy"), "-"),
        ("federated worst 10 % of clients", [x for x, _ in worst], [float(y) for _, y in worst], ":"),
    ]
    return _plot_lines(figure, lines, title=f"Accuracy per round{tag}", ylabel="accuracy", unit_range=True)


def _plot_loss(figure: Any, rounds: Sequence[dict], *, tag: str) -> bool:
    lines = [
        ("server loss (held-out test set)", *_series(rounds, "server", "loss"), "-"),
        ("federated loss (clients' test splits)", *_series(rounds, "federated", "loss"), "-"),
        ("training loss (clients, mean)", *_series(rounds, "fit", "train_loss"), "--"),
    ]
    return _plot_lines(figure, lines, title=f"Loss per round{tag}", ylabel="loss", unit_range=False)


def _last_clients(rounds: Sequence[dict]) -> tuple[int, dict[str, float]] | None:
    for record in reversed(rounds):
        clients = (record.get("federated") or {}).get("clients") or {}
        accuracies = {str(cid): float(block["accuracy"]) for cid, block in clients.items()
                      if isinstance(block, Mapping) and isinstance(block.get("accuracy"), (int, float))}
        if accuracies:
            return record["round"], accuracies
    return None


def _client_order(cid: str) -> tuple[int, Any]:
    return (0, int(cid)) if cid.lstrip("-").isdigit() else (1, cid)


def _plot_clients(figure: Any, rounds: Sequence[dict], *, tag: str) -> bool:
    found = _last_clients(rounds)
    if found is None:
        return False
    round_number, accuracies = found
    ids = sorted(accuracies, key=_client_order)
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


def _last_confusion(rounds: Sequence[dict]) -> tuple[int, np.ndarray] | None:
    for record in reversed(rounds):
        matrix = (record.get("server") or {}).get("confusion_matrix")
        if matrix:
            return record["round"], np.asarray(matrix, dtype=float)
    return None


def _plot_confusion(figure: Any, rounds: Sequence[dict], *, tag: str) -> bool:
    found = _last_confusion(rounds)
    if found is None:
        return False
    round_number, counts = found
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
class _PartitionView:
    """partition.json in one shape, whichever of the accepted layouts it was written in."""

    clients: list[str]
    counts: np.ndarray  # clients x classes
    classes: list[str]
    profiles: list[str | None]
    skew: dict[str, float]  # label skew (mean TV) per dataset, or {"": value} for a single split


def _partition_view(partition: Mapping[str, Any] | None) -> _PartitionView | None:
    """Reads either one `partition_stats` block (per_client at the top) or a federation layout:

    {"clients": {id: {"per_class": [...], "profile": ..., "dataset": ...}}, "datasets": {spec: partition_stats}}.
    """
    if not partition:
        return None
    classes = [str(c) for c in partition.get("classes") or EMOTIONS]
    skew: dict[str, float] = {}
    if partition.get("per_client"):
        counts = np.asarray(partition["per_client"], dtype=float)
        ids = [str(c) for c in partition.get("client_ids") or range(len(counts))]
        profiles = list(partition.get("profiles") or [None] * len(counts))
        if isinstance(partition.get("label_skew_tv"), (int, float)):
            skew[""] = float(partition["label_skew_tv"])
    elif isinstance(partition.get("clients"), Mapping) and partition["clients"]:
        entries = [(str(cid), e) for cid, e in partition["clients"].items() if isinstance(e, Mapping)]
        rows = []
        for _, entry in entries:
            per_class = entry.get("per_class") or []
            rows.append([per_class.get(c, 0) for c in classes] if isinstance(per_class, Mapping) else per_class)
        if not rows or any(len(row) != len(rows[0]) for row in rows) or not rows[0]:
            return None
        counts = np.asarray(rows, dtype=float)
        ids = [cid for cid, _ in entries]
        profiles = [entry.get("profile") for _, entry in entries]
        for spec, block in (partition.get("datasets") or {}).items():
            if isinstance(block, Mapping) and isinstance(block.get("label_skew_tv"), (int, float)):
                skew[str(spec)] = float(block["label_skew_tv"])
        classes = [str(c) for c in next((b.get("classes") for b in (partition.get("datasets") or {}).values()
                                         if isinstance(b, Mapping) and b.get("classes")), classes)]
    else:
        return None
    if counts.ndim != 2 or counts.shape[1] != len(classes):
        classes = [str(k) for k in range(counts.shape[1])] if counts.ndim == 2 else classes
    return _PartitionView(ids, counts, classes, profiles, skew)


def _plot_partition(figure: Any, partition: Mapping[str, Any] | None, *, tag: str) -> bool:
    view = _partition_view(partition)
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
    skew = ", ".join(f"{spec + ' ' if spec else ''}{value:.2f}" for spec, value in view.skew.items())
    subtitle = f"\nlabel skew (mean TV from the global mix): {skew}" if skew else ""
    axes.set(title=f"Label distribution per client{tag}{subtitle}", xlabel="client", ylabel="samples")
    axes.legend(fontsize=8, ncol=2)
    return True


def _privacy_clients(privacy: Mapping[str, Any] | None) -> list[dict]:
    """privacy.json's per-client entries as a list of dicts, each with a "client" key."""
    clients = (privacy or {}).get("clients")
    if isinstance(clients, Mapping):
        return [{"client": str(cid), **entry} for cid, entry in clients.items() if isinstance(entry, Mapping)]
    if isinstance(clients, list):
        return [{"client": str(entry.get("client", i)), **entry} for i, entry in enumerate(clients)
                if isinstance(entry, Mapping)]
    return []


def _plot_privacy(figure: Any, privacy: Mapping[str, Any] | None, *, tag: str) -> bool:
    clients = [c for c in _privacy_clients(privacy) if isinstance(c.get("epsilon_spent"), (int, float))]
    if not clients:
        return False
    clients.sort(key=lambda c: _client_order(c["client"]))
    axes = figure.add_subplot()
    positions = range(len(clients))
    axes.bar(positions, [c["epsilon_spent"] for c in clients], color="tab:purple", label="ε spent")
    budgets = [(i, c.get("epsilon_budget")) for i, c in enumerate(clients)]
    budgets = [(i, b) for i, b in budgets if isinstance(b, (int, float))]
    if budgets:
        axes.scatter([i for i, _ in budgets], [b for _, b in budgets], marker="_", s=400, color="black",
                     label="ε budget")
    axes.set_xticks(list(positions), [c["client"] for c in clients], rotation=90 if len(clients) > 12 else 0)
    axes.set(title=f"Privacy spend per client{tag}", xlabel="client", ylabel="ε")
    axes.legend()
    return True


# ---------------------------------------------------------------- markdown


def _markdown(name: str, config: Mapping[str, Any], rounds: Sequence[dict], summary: Mapping[str, Any] | None,
              partition: Mapping[str, Any] | None, privacy: Mapping[str, Any] | None,
              figures: Mapping[str, str | None], synthetic: bool) -> str:
    out: list[str] = [f"# fer-fl run report: {name}" + (" (synthetic data)" if synthetic else ""), ""]
    if synthetic:
        out += ["> **Synthetic data.** This run used the procedurally generated synthetic FER dataset; its numbers "
                "show that the system works, not how well it recognises real faces.", ""]
    if summary:
        out += ["## Summary", "", *_table(["", "value"], _summary_rows(summary)), ""]
        out += _failed_rounds(summary, rounds)
    scalars = _flat_scalars(config)
    if scalars:
        out += ["## Configuration", "", *_table(["setting", "value"], [[k, _cell(v)] for k, v in scalars]), ""]
    out += _image_section("Accuracy and loss per round", [figures.get("accuracy"), figures.get("loss")])
    if rounds:
        out += ["## Rounds", "", *_rounds_table(rounds), ""]
    out += _final_classes(rounds, figures.get("confusion"))
    out += _clients_section(rounds, figures.get("clients"))
    if partition:
        out += _partition_section(partition, figures.get("partition"))
    if privacy is not None:
        out += _privacy_section(privacy, figures.get("privacy"))
    return "\n".join(out).rstrip() + "\n"


def _summary_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """One row per headline figure. Lists and nested blocks are shown too (flattened): summary.json's
    failed_rounds is a list, and a report that dropped it would show a run with failed rounds as a clean one."""
    rows = []
    for key, value in summary.items():
        if isinstance(value, Mapping):
            rows += [[f"{key}.{sub}", _fmt(sub, inner)] for sub, inner in _flat_scalars(value)]
        elif isinstance(value, list):
            rows.append([key, ", ".join(_cell(item) for item in value) or "none"])
        else:
            rows.append([key, _fmt(key, value)])
    return rows


def _failed_rounds(summary: Mapping[str, Any], rounds: Sequence[dict]) -> list[str]:
    """A warning under the summary naming each failed round and why (from metrics.jsonl), if any failed."""
    failed = summary.get("failed_rounds")
    if not isinstance(failed, list) or not failed:
        return []
    reasons = {r["round"]: (r.get("fit") or {}).get("failure") for r in rounds}
    lines = [f"> **{len(failed)} round{'s' if len(failed) != 1 else ''} failed** (no aggregate was applied; the "
             "model carried over unchanged):", ">"]
    lines += [f"> - round {rnd}: {reasons.get(rnd) or 'no reason recorded'}" for rnd in failed]
    return [*lines, ""]


def _image_section(title: str, paths: Sequence[str | None]) -> list[str]:
    present = [path for path in paths if path]
    if not present:
        return []
    lines = [f"## {title}", ""]
    for path in present:
        lines += [f"![{Path(path).stem}]({path})", ""]
    return lines


def _rounds_table(rounds: Sequence[dict]) -> list[str]:
    header = ["round", "server acc", "macro-F1", "server loss", "federated acc", "worst 10 %", "clients",
              "rejected", "seconds"]
    rows = []
    for record in rounds:
        server = record.get("server") or {}
        federated = record.get("federated") or {}
        fit = record.get("fit") or {}
        rows.append([
            str(record["round"]), _pct(server.get("accuracy")), _num(server.get("macro_f1")),
            _num(server.get("loss")), _pct(federated.get("accuracy")),
            _pct((federated.get("distribution") or {}).get("worst_10pct")),
            _cell(fit.get("num_clients")), _cell(fit.get("num_rejected")), _num(record.get("seconds")),
        ])
    return _table(header, rows)


def _final_classes(rounds: Sequence[dict], confusion: str | None) -> list[str]:
    final = next((r.get("server") for r in reversed(rounds) if (r.get("server") or {}).get("per_class_recall")),
                 None)
    lines: list[str] = []
    if final:
        recall = final.get("per_class_recall") or []
        f1 = final.get("per_class_f1") or [None] * len(recall)
        support = final.get("support") or [None] * len(recall)
        names = list(EMOTIONS) if len(recall) == len(EMOTIONS) else [str(k) for k in range(len(recall))]
        rows = [[name, _pct(r), _num(f), _cell(s)] for name, r, f, s in zip(names, recall, f1, support)]
        lines += ["## Final per-class results (server-side test set)", "",
                  *_table(["class", "recall", "F1", "support"], rows), "",
                  "A class absent from the test set has no recall or F1 (shown as —) and is left out of macro-F1.",
                  ""]
    if confusion:
        if not lines:
            lines += ["## Final confusion matrix", ""]
        lines += [f"![confusion matrix]({confusion})", ""]
    return lines


def _clients_section(rounds: Sequence[dict], clients_plot: str | None) -> list[str]:
    rejected = [(r["round"], item) for r in rounds for item in ((r.get("fit") or {}).get("rejected") or [])]
    if not clients_plot and not rejected:
        return []
    lines = ["## Clients", ""]
    if clients_plot:
        lines += [f"![per-client accuracy]({clients_plot})", ""]
    if rejected:
        rows = [[str(rnd), _cell(item.get("client")), _cell(item.get("reason"))] for rnd, item in rejected]
        lines += ["Rejected updates:", "", *_table(["round", "client", "reason"], rows), ""]
    else:
        lines += ["No update was rejected.", ""]
    return lines


def _partition_section(partition: Mapping[str, Any], plot: str | None) -> list[str]:
    view = _partition_view(partition)
    lines = ["## Data partition", ""]
    if view is not None:
        sizes = view.counts.sum(axis=1)
        lines += [f"- clients: {len(view.clients)}, samples: {int(sizes.sum())}",
                  f"- client sizes (min / median / max): {int(sizes.min())} / {int(np.median(sizes))} / "
                  f"{int(sizes.max())}"]
        for spec, value in view.skew.items():
            where = f" ({spec})" if spec else ""
            lines.append(f"- label skew{where}, mean total-variation distance from the global label mix: {value:.3f}")
        kinds = sorted({p for p in view.profiles if p})
        for kind in kinds:
            members = [size for size, p in zip(sizes, view.profiles) if p == kind]
            lines.append(f"- profile {kind}: {len(members)} client{'s' if len(members) != 1 else ''}, "
                         f"{np.mean(members):.0f} samples each on average")
    for key in ("scheme", "alpha"):
        if isinstance(partition.get(key), (str, int, float)):
            lines.append(f"- {key}: {partition[key]}")
    lines.append("")
    if plot:
        lines += [f"![label distribution per client]({plot})", ""]
    return lines


def _privacy_section(privacy: Mapping[str, Any], plot: str | None) -> list[str]:
    lines = ["## Privacy", ""]
    clients = _privacy_clients(privacy)
    if clients:
        preferred = ["client", "epsilon_spent", "epsilon_budget", "delta", "noise_multiplier", "max_grad_norm",
                     "sample_rate", "steps", "accountant"]
        seen = dict.fromkeys(k for c in clients for k in c if not isinstance(c[k], (dict, list)))
        columns = [k for k in preferred if k in seen] + [k for k in seen if k not in preferred]
        rows = [[_cell(c.get(k)) for k in columns] for c in sorted(clients, key=lambda c: _client_order(c["client"]))]
        lines += [*_table(columns, rows), ""]
    prose = [(k, v) for k, v in privacy.items() if isinstance(v, str) and len(v) > 80]
    facts = [(k, v) for k, v in _flat_scalars({k: v for k, v in privacy.items() if k != "clients"})
             if not (isinstance(v, str) and len(v) > 80)]
    lines += [f"- {key}: {_cell(value)}" for key, value in facts]
    if facts:
        lines.append("")
    for key, text in prose:
        lines += [f"**{key.replace('_', ' ').capitalize()}.** {text}", ""]
    if plot:
        lines += [f"![privacy spend per client]({plot})", ""]
    return lines


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_escape(str(c)) for c in row) + " |" for row in rows]
    return lines


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _flat_scalars(obj: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            items += _flat_scalars(value, f"{name}.")
        elif isinstance(value, list):
            if all(not isinstance(v, (dict, list)) for v in value):
                items.append((name, ", ".join(str(v) for v in value)))
        else:
            items.append((name, value))
    return items


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _pct(value: Any) -> str:
    return f"{100 * value:.1f} %" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _cell(value)
    if "accuracy" in key or "worst_10pct" in key:
        return _pct(value)
    if key.startswith("bytes"):
        return _bytes(value)
    return _cell(value)


def _bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def _find_key(obj: Any, wanted: str) -> Any:
    if isinstance(obj, Mapping):
        if wanted in obj and not isinstance(obj[wanted], (dict, list)):
            return obj[wanted]
        for value in obj.values():
            found = _find_key(value, wanted)
            if found is not None:
                return found
    return None


def _is_synthetic(config: Any, under_dataset_key: bool = False) -> bool:
    """True when a `synthetic` flag is set or a value under a key naming the dataset mentions "synthetic"."""
    if isinstance(config, Mapping):
        if config.get("synthetic") is True:
            return True
        return any(_is_synthetic(value, under_dataset_key or "dataset" in str(key).lower())
                   for key, value in config.items())
    if isinstance(config, list):
        return any(_is_synthetic(value, under_dataset_key) for value in config)
    return under_dataset_key and isinstance(config, str) and "synthetic" in config.lower()
