"""The human-readable side of a run directory: report.md and the PNG plots it shows (server/plots.py).

Everything is read back through the typed records (server/records.py, privacy/report.py) and the run's settings
(config.json), so the report can be rebuilt for any finished or interrupted run; a missing optional piece only
drops its section.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.config import RunSettings
from client.data.labels import EMOTIONS
from client.node_data import parse_dataset_list
from privacy.atomic import atomic_write
from privacy.report import PrivacyReport, PublicData
from server import plots
from server.plots import PLOTS, PartitionView, privacy_clients
from server.records import RoundRecord, RunSummary, summarize
from server.rundir import CONFIG_JSON, PARTITION_JSON, RunDirectory

REPORT_MD = "report.md"


def write_report(run_dir: Path | str) -> Path:
    """Draws the run's plots into plots/ and writes report.md beside them; returns the report's path.

    Sections: summary, configuration, accuracy and loss per round (server-side and federated), per-round table,
    final per-class results and confusion matrix, per-client accuracy of the last federated evaluation and the
    rejected updates, the partition's label distribution, and a Privacy section when privacy.json exists.
    Titles and the report say "synthetic" when the run's dataset is the synthetic one.

    Raises:
        FileNotFoundError: `run_dir` does not exist.
        ConfigError: config.json is not a run config.
        SchemaVersionError: a record of another schema version.
    """
    run = RunDirectory(run_dir, create=False)
    config = run.read_json(CONFIG_JSON)
    settings = None if config is None else RunSettings.from_run_config(config)
    rounds = run.rounds()
    partition = PartitionView.from_json(run.read_json(PARTITION_JSON))
    privacy = run.privacy()
    summary = run.summary()
    if summary is None and rounds and settings is not None:
        summary = summarize(rounds, seconds=sum(r.seconds for r in rounds), settings=settings)
    synthetic = _is_synthetic(settings, summary)
    tag = " (synthetic data)" if synthetic else ""
    (run.path / PLOTS).mkdir(exist_ok=True)

    def draw(name: str, painter: Callable[..., bool], *args: Any) -> str | None:
        return plots.save_figure(run.path / PLOTS / name, painter, *args, tag=tag)

    figures = {
        "accuracy": draw("accuracy.png", plots.plot_accuracy, rounds),
        "loss": draw("loss.png", plots.plot_loss, rounds),
        "clients": draw("clients.png", plots.plot_clients, rounds),
        "confusion": draw("confusion.png", plots.plot_confusion, rounds),
        "partition": draw("partition.png", plots.plot_partition, partition),
        "privacy": draw("privacy.png", plots.plot_privacy, privacy),
    }
    text = _markdown(run.path.name, settings, rounds, summary, partition, privacy, figures, synthetic)
    target = run.path / REPORT_MD
    atomic_write(target, text.encode())
    return target


def _is_synthetic(settings: RunSettings | None, summary: RunSummary | None) -> bool:
    """What the runner recorded, else whether any of the run's datasets is the synthetic one."""
    if summary is not None and summary.synthetic is not None:
        return summary.synthetic
    return settings is not None and any(e.spec.startswith("synthetic") for e in parse_dataset_list(settings.dataset))


# ---------------------------------------------------------------- markdown


def _markdown(name: str, settings: RunSettings | None, rounds: Sequence[RoundRecord], summary: RunSummary | None,
              partition: PartitionView | None, privacy: PrivacyReport | None,
              figures: Mapping[str, str | None], synthetic: bool) -> str:
    out: list[str] = [f"# fer-fl run report: {name}" + (" (synthetic data)" if synthetic else ""), ""]
    if synthetic:
        out += ["> **Synthetic data.** This run used the procedurally generated synthetic FER dataset; its numbers "
                "show that the system works, not how well it recognises real faces.", ""]
    public = privacy.public_data if privacy is not None else None
    if public is not None and public.warning:
        out += [f"> **Warning.** {public.warning}.", ""]
    if summary:
        out += ["## Summary", "", *_table(["", "value"], _summary_rows(summary)), ""]
        out += _failed_rounds(summary, rounds)
    scalars = [] if settings is None else list(settings.to_run_config().items())
    if scalars:
        out += ["## Configuration", "", *_table(["setting", "value"], [[k, _cell(v)] for k, v in scalars]), ""]
    out += _image_section("Accuracy and loss per round", [figures.get("accuracy"), figures.get("loss")])
    if rounds:
        out += ["## Rounds", "", *_rounds_table(rounds), ""]
    out += _final_classes(rounds, figures.get("confusion"))
    out += _clients_section(rounds, figures.get("clients"))
    if partition is not None:
        out += _partition_section(partition, figures.get("partition"))
    if privacy is not None:
        out += _privacy_section(privacy, figures.get("privacy"))
    return "\n".join(out).rstrip() + "\n"


def _summary_rows(summary: RunSummary) -> list[list[str]]:
    """One row per headline figure. Lists and nested blocks are shown too (flattened): summary.json's
    failed_rounds is a list, and a report that dropped it would show a run with failed rounds as a clean one."""
    rows = []
    for key, value in summary.to_json().items():
        if isinstance(value, Mapping):
            rows += [[f"{key}.{sub}", _fmt(sub, inner)] for sub, inner in _flat_scalars(value)]
        elif isinstance(value, list):
            rows.append([key, ", ".join(_cell(item) for item in value) or "none"])
        else:
            rows.append([key, _fmt(key, value)])
    return rows


def _failed_rounds(summary: RunSummary, rounds: Sequence[RoundRecord]) -> list[str]:
    """A warning under the summary naming each failed round and why (from metrics.jsonl), if any failed."""
    failed = summary.failed_rounds
    if not failed:
        return []
    reasons = {r.round: r.fit.failure for r in rounds if r.fit is not None}
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


def _rounds_table(rounds: Sequence[RoundRecord]) -> list[str]:
    header = ["round", "server acc", "macro-F1", "server loss", "federated acc", "worst 10 %", "clients",
              "rejected", "seconds"]
    rows = []
    for record in rounds:
        server, fit = record.server or {}, record.fit
        rows.append([
            str(record.round), _pct(server.get("accuracy")), _num(server.get("macro_f1")),
            _num(server.get("loss")), _pct(plots.federated_accuracy(record)), _pct(plots.federated_worst(record)),
            _cell(fit and fit.num_clients), _cell(fit and fit.num_rejected), _num(record.seconds),
        ])
    return _table(header, rows)


def _final_classes(rounds: Sequence[RoundRecord], confusion: str | None) -> list[str]:
    final = next((r.server for r in reversed(rounds) if (r.server or {}).get("per_class_recall")), None)
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
    refit = next((r.head_refit for r in reversed(rounds) if r.head_refit is not None), None)
    if refit is not None:
        before = refit.server_before or {}
        lines += [f"The final model's classifier was re-fitted on {refit.public_faces} public faces (head-refit, "
                  f"l2 {refit.l2:g}): server accuracy {_pct(before.get('accuracy'))} before, as training left "
                  f"it; the figures above score the re-fitted model.", ""]
    if confusion:
        if not lines:
            lines += ["## Final confusion matrix", ""]
        lines += [f"![confusion matrix]({confusion})", ""]
    return lines


def _clients_section(rounds: Sequence[RoundRecord], clients_plot: str | None) -> list[str]:
    rejected = [(r.round, item) for r in rounds if r.fit is not None for item in r.fit.rejected]
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


def _partition_section(view: PartitionView, plot: str | None) -> list[str]:
    sizes = view.counts.sum(axis=1)
    lines = ["## Data partition", "",
             f"- clients: {len(view.clients)}, samples: {int(sizes.sum())}",
             f"- client sizes (min / median / max): {int(sizes.min())} / {int(np.median(sizes))} / {int(sizes.max())}"]
    for spec, value in view.skew.items():
        lines.append(f"- label skew ({spec}), mean total-variation distance from the global label mix: {value:.3f}")
    for kind in sorted({p for p in view.profiles if p}):
        members = [size for size, p in zip(sizes, view.profiles) if p == kind]
        lines.append(f"- profile {kind}: {len(members)} client{'s' if len(members) != 1 else ''}, "
                     f"{np.mean(members):.0f} samples each on average")
    lines.append("")
    if plot:
        lines += [f"![label distribution per client]({plot})", ""]
    return lines


def _privacy_section(privacy: PrivacyReport, plot: str | None) -> list[str]:
    """Each DP site's row, named by its client_id, then the run-level facts and the threat model in words."""
    lines = ["## Privacy", ""]
    clients = privacy_clients(privacy)
    if clients:
        entries = [{"client": c.client_id, **{k: v for k, v in c.to_json().items() if k != "client_id"}}
                   for c in clients]
        columns = [k for k in entries[0] if any(e[k] is not None for e in entries)]
        lines += [*_table(columns, [[_cell(e[k]) for k in columns] for e in entries]), ""]
    document = privacy.to_json()
    prose = [(k, v) for k, v in document.items() if isinstance(v, str) and len(v) > 80]
    facts = [(k, v) for k, v in _flat_scalars({k: v for k, v in document.items() if k not in ("clients", "public_data")})
             if not (isinstance(v, str) and len(v) > 80)]
    lines += [f"- {key}: {_cell(value)}" for key, value in facts]
    if facts:
        lines.append("")
    if privacy.public_data is not None:
        lines += _public_data_lines(privacy.public_data)
    for key, text in prose:
        lines += [f"**{key.replace('_', ' ').capitalize()}.** {text}", ""]
    if plot:
        lines += [f"![privacy spend per client]({plot})", ""]
    return lines


def _public_data_lines(public: PublicData) -> list[str]:
    """What round 0's model learnt in the clear: each public slice (faces per class), the init-model and its data."""
    lines = ["### Public data (used in the clear, counted in no epsilon)", ""]
    for item in public.slices:
        classes = ", ".join(f"{name} {n}" for name, n in zip(EMOTIONS, item.per_class))
        lines.append(f"- public slice of {item.dataset}: {item.faces} faces ({classes}), held by no site; the server "
                     f"pretrained on it for {public.pretrain_epochs} epochs"
                     + ("; and trained each round's global model on it again (server-learning)"
                        if public.server_learning else "")
                     + ("; and re-fitted the final model's classifier on it (head-refit)" if public.head_refit else ""))
    if public.init_model:
        lines.append(f"- init-model: {public.init_model} (trained on {public.init_model_dataset or 'unknown data'})")
    if public.warning:
        lines.append(f"- warning: {public.warning}")
    lines += [f"- protection: {public.protection}", ""]
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
