"""The run directory that `fer-sim` and `fer-server` write, and what reads it back (report, evaluate, resume).

Layout:
    config.json, config.toml   the resolved configuration (TOML only when it is representable, see write_config)
    metrics.jsonl, metrics.csv one record per round; round 0 is the initial model
    partition.json             who holds which labels (simulations)
    model.pt, model.json       the final global model: a plain state_dict (loads with weights_only=True) + metadata
    checkpoints/round-XXX.*    per-round checkpoints, same format
    summary.json               headline numbers; privacy.json (runs with DP or SecAgg+); plots/, report.md
                               (server.report)

Each record is typed (server/records.py, privacy/report.py, models/card.py) and carries a schema_version; reading
one of another version fails with one line naming the file. docs/run-directory.md describes every file and field.

Every file is written to a temporary name in the same folder and renamed over the target (os.replace is atomic on
POSIX), then the folder is fsynced, so a reader or a crash never sees half a file, and no temporary survives a
successful write. A model and its sidecar are a pair: the sidecar records the model's sha256 and is renamed in first,
and only a pair whose hashes agree counts as a checkpoint (see save_model, latest_checkpoint).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client.data.labels import EMOTIONS, NUM_CLASSES
from models.card import ModelCard
from privacy.atomic import atomic_write
from privacy.report import PrivacyReport
from server.records import RoundRecord, RunSummary

CONFIG_JSON = "config.json"
CONFIG_TOML = "config.toml"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
PARTITION_JSON = "partition.json"
SUMMARY_JSON = "summary.json"
PRIVACY_JSON = "privacy.json"
MODEL_PT = "model.pt"
CHECKPOINTS = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^round-(\d+)\.pt$")

log = logging.getLogger("fer_fl.server")


def check_new_run_dir(path: Path) -> None:
    """Refuses a folder a new run cannot use: a new run never mixes its files with an old one's.

    `fer-server` calls it before starting anything (the ServerApp makes the folder later, in the SuperLink's
    process); RunDirectory calls it for every new run.

    Raises:
        FileExistsError: `path` is a file, or a folder that is not empty; the message names it in one line.
    """
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if any(path.iterdir()):
        raise FileExistsError(
            f"run directory {path} already exists and is not empty; choose another --out or resume it"
        )


class RunDirectory:
    """One run's output folder.

    Args:
        path: the folder.
        create: make it (and parents) if missing; False opens an existing run for reading (report, evaluate).
        resume: continue a run already there: its metrics are loaded and later rounds replace the ones they
            supersede (see append_round).

    Raises:
        FileExistsError: the folder exists and is not empty while neither resume nor create=False says that is
            intended: a new run never mixes its files with an old one's.
        FileNotFoundError: resume or create=False for a folder that does not exist.
        SchemaVersionError: metrics.jsonl was written under another schema version (one line naming the file).
        ValueError: metrics.jsonl holds a line that is not a round record.
    """

    def __init__(self, path: Path | str, *, create: bool = True, resume: bool = False) -> None:
        self.path = Path(path)
        if resume or not create:
            if not self.path.is_dir():
                raise FileNotFoundError(f"run directory {self.path} does not exist")
        else:
            check_new_run_dir(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
        self._rounds: list[RoundRecord] = self._read_rounds()

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Writes config.json, and config.toml when the config is plain enough for TOML.

        TOML has no null and no mixed-type arrays; rather than invent encodings, config.toml is written only when
        the config converts as it is (a stale one from an earlier call is removed otherwise), and config.json is
        always the reference.
        """
        self.write_json(CONFIG_JSON, config)
        text = _toml_text(_jsonable(config))
        toml_path = self.path / CONFIG_TOML
        if text is None:
            toml_path.unlink(missing_ok=True)
        else:
            atomic_write(toml_path, text.encode())

    def append_round(self, record: RoundRecord) -> None:
        """Adds one round's record to metrics.jsonl (as one JSON line) and metrics.csv (as one flat row).

        A record for round r replaces every stored record with round >= r: after a resume from the checkpoint of
        round r-1, the rounds the interrupted run had already logged from r on belong to a model history that no
        longer exists, and keeping them would report rounds twice. Both files are rewritten atomically, so they
        never hold half a line and always agree.
        """
        # Stored as it reads back (NaN and infinity become None), so rounds() always equals what is on disk.
        clean = RoundRecord.from_json(_jsonable(record.to_json()))
        self._rounds = [r for r in self._rounds if r.round < record.round] + [clean]
        lines = "".join(json.dumps(_jsonable(r.to_json()), separators=(",", ":")) + "\n" for r in self._rounds)
        atomic_write(self.path / METRICS_JSONL, lines.encode())
        atomic_write(self.path / METRICS_CSV, _csv_text(self._rounds).encode())

    def rounds(self) -> list[RoundRecord]:
        """The round records, in round order."""
        return list(self._rounds)

    def write_partition(self, stats: Mapping[str, Any]) -> None:
        """partition.json: the output of simulation.partition.partition_stats (plus anything the caller adds)."""
        self.write_json(PARTITION_JSON, stats)

    def save_model(self, state_dict: Mapping[str, Any], *, model_name: str, model_cfg: Mapping[str, Any],
                   round: int, data_seed: int | None = None, image_size: int | None = None,  # noqa: A002
                   dataset: str | None = None, checkpoint: bool = False) -> Path:
        """Saves a model as a plain state_dict plus its card (models.card.ModelCard) as JSON; returns the .pt path.

        Without `checkpoint` it is the run's final model (model.pt / model.json); with it, checkpoints/round-XXX.pt.
        Tensors are copied to CPU and numpy arrays (Flower's parameter format) converted, so the file loads with
        `torch.load(path, weights_only=True)` on any machine. `data_seed`, `image_size` and `dataset` say which
        test set `fer-sim evaluate` rebuilds by default.
        """
        import torch

        tensors = {key: _to_tensor(value) for key, value in state_dict.items()}
        if checkpoint:
            target = self.path / CHECKPOINTS / f"round-{round:03d}.pt"
            target.parent.mkdir(exist_ok=True)
        else:
            target = self.path / MODEL_PT
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        payload = buffer.getvalue()
        card = ModelCard(name=model_name, cfg=dict(model_cfg), round=int(round), classes=EMOTIONS,
                         sha256=hashlib.sha256(payload).hexdigest(), data_seed=data_seed, image_size=image_size,
                         dataset=dataset)
        # The pair is committed by the model file: the sidecar (naming the new payload's sha256) is renamed into
        # place first, the .pt last, each fsynced with its directory. A crash in between leaves a sidecar whose
        # sha256 does not match the .pt beside it (or no .pt), which is_complete_pair refuses, so a resume falls
        # back to the previous complete checkpoint instead of loading half a pair.
        atomic_write(target.with_suffix(".json"), _json_bytes(card.to_json()))
        atomic_write(target, payload)
        return target

    def latest_checkpoint(self) -> Path | None:
        """The complete checkpoint (see is_complete_pair) with the highest round number, or None.

        An incomplete pair, left by a crash while a round's checkpoint was being written or rewritten, is skipped
        (and logged): resuming from it would fail, or load weights that the sidecar does not describe.
        """
        found = []
        for path in (self.path / CHECKPOINTS).glob("round-*.pt"):
            match = _CHECKPOINT_NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        for _, path in sorted(found, reverse=True):
            if is_complete_pair(path):
                return path
            log.warning("skipping the incomplete checkpoint %s (interrupted while it was written)", path.name)
        return None

    def write_summary(self, summary: RunSummary) -> None:
        """summary.json (see server.records.summarize)."""
        self.write_json(SUMMARY_JSON, summary.to_json())

    def summary(self) -> RunSummary | None:
        """summary.json, or None before the run finished."""
        data = self.read_json(SUMMARY_JSON)
        return None if data is None else RunSummary.from_json(data, source=str(self.path / SUMMARY_JSON))

    def write_privacy(self, report: PrivacyReport) -> None:
        """privacy.json (see privacy.report.privacy_report)."""
        self.write_json(PRIVACY_JSON, report.to_json())

    def privacy(self) -> PrivacyReport | None:
        """privacy.json, or None for a run without DP or SecAgg+."""
        data = self.read_json(PRIVACY_JSON)
        return None if data is None else PrivacyReport.from_json(data, source=str(self.path / PRIVACY_JSON))

    def write_json(self, name: str, obj: Any) -> None:
        """Writes `obj` as indented JSON to `name` inside the run directory, atomically.

        numpy scalars and arrays become numbers and lists, paths become strings, and NaN or infinity become null
        (JSON has no spelling for them; a diverged loss still shows as a gap rather than an unreadable file).
        """
        target = self._inside(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, _json_bytes(obj))

    def read_json(self, name: str) -> Any | None:
        """The parsed JSON file `name`, or None when it does not exist."""
        target = self._inside(name)
        if not target.exists():
            return None
        return json.loads(target.read_text())

    def _inside(self, name: str) -> Path:
        target = (self.path / name).resolve()
        if self.path.resolve() not in target.parents:
            raise ValueError(f"{name!r} is outside the run directory")
        return target

    def _read_rounds(self) -> list[RoundRecord]:
        path = self.path / METRICS_JSONL
        if not path.exists():
            return []
        records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
            records.append(RoundRecord.from_json(data, source=f"{path}:{number}"))
        return sorted(records, key=lambda r: r.round)


def is_complete_pair(path: Path | str) -> bool:
    """Whether `path` (a .pt) and its .json sidecar are both there and the sidecar's sha256 matches the .pt."""
    model_path = Path(path)
    try:
        meta = json.loads(model_path.with_suffix(".json").read_text())
        digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("sha256") == digest


def flatten_round(record: Mapping[str, Any]) -> dict[str, Any]:
    """One round record as a flat CSV row.

    Nested keys are joined with "." ("server.accuracy", "federated.distribution.worst_10pct"). Lists of
    NUM_CLASSES scalars under a "per_class_*" or "support" key get one column per emotion
    ("server.per_class_recall.happy"); other lists of scalars one per index; None values are left blank.
    Per-client blocks ("clients"), the confusion matrix and other lists of lists or dicts (rejected updates) stay
    in metrics.jsonl only: their width changes from round to round.
    """
    row: dict[str, Any] = {}
    _flatten_into(row, "", record)
    return row


def _flatten_into(row: dict[str, Any], prefix: str, value: Any) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key == "clients":
                continue
            _flatten_into(row, f"{prefix}{key}" if not prefix else f"{prefix}.{key}", item)
    elif isinstance(value, (list, tuple)):
        if not all(item is None or isinstance(item, (int, float, str, bool)) for item in value):
            return
        key = prefix.rsplit(".", 1)[-1]
        per_class = key.startswith("per_class") or key == "support"
        names = EMOTIONS if per_class and len(value) == NUM_CLASSES else range(len(value))
        for name, item in zip(names, value):
            row[f"{prefix}.{name}"] = item
    elif value is not None:
        # A missing block (round 0 has no "federated") would otherwise become a column of its own.
        row[prefix] = value


def _csv_text(records: list[RoundRecord]) -> str:
    rows = [flatten_round(_jsonable(record.to_json())) for record in records]
    header: dict[str, None] = {}
    for row in rows:
        header.update(dict.fromkeys(row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(header), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _to_tensor(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").clone()
    return torch.from_numpy(np.array(value, copy=True))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(key): _jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n").encode()


def _toml_text(config: Any) -> str | None:
    import tomli_w  # Flower's own dependency (it writes pyproject run configs with it)

    if not isinstance(config, dict):
        return None
    try:
        return tomli_w.dumps(config)
    except (TypeError, ValueError):
        return None


