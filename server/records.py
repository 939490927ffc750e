"""The records a run writes, typed: one round of metrics.jsonl / metrics.csv and the run's summary.json.

Each record has one `to_json()` and one `from_json()`, and carries `schema_version`: a reader refuses a version it
does not know (models.card.parse_record) instead of guessing at its shape. The ServerApp, the centralised
baseline and the CLIs build rounds with `build_round`, print them with `format_round`, and summarise a run with
`summarize`. The privacy report (privacy/report.py) and the model card (models/card.py) live in the lowest layer
that needs them. docs/run-directory.md describes every file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client.config import RunSettings
from client.data.labels import EMOTIONS
from models.card import parse_record
from server.metrics import client_distribution

SCHEMA_VERSION = 1


@dataclass
class RoundReport:
    """What the guard saw in one round (server/strategy.py); build_round turns it into the round's record."""

    num_results: int = 0
    num_accepted: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    train_loss: float | None = None
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_loss: float | None = None
    eval_clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_rejected: list[dict[str, str]] = field(default_factory=list)
    eval_withheld: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    central_noise_std: float | None = None
    # The server's training loss on the public slice after aggregation (server-learning), None without it.
    server_train_loss: float | None = None
    # Clients whose masked vector was left out of the SecAgg+ sum (refused before unmasking; also in `rejected`).
    excluded_from_sum: list[str] = field(default_factory=list)
    # Clients whose individual update the server scaled down to the central-DP clip (plain rounds only).
    reclipped: list[str] = field(default_factory=list)
    # Clients whose delta was scaled down to the round's median-norm bound (server-side norm bounding).
    norm_bounded: list[str] = field(default_factory=list)
    # The classifier's re-fit on the public slice at the end of the run (head-refit), None in other rounds.
    head_refit: HeadRefitRecord | None = None


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of dataclass `cls` that `data` holds (keys the dataclass does not know are ignored)."""
    return {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}


@dataclass(frozen=True)
class HeadRefitRecord:
    """The last round's re-fit of the classifier on the public slice (`head-refit`, server/head_refit.py).

    The round's `server` evaluation scores the re-fitted model, the one the run saves and delivers; `server_before`
    scores the model as training left it, so the step's gain is on record.

    Attributes:
        public_faces: the public faces fitted on (each also mirrored).
        l2: head-refit-l2, the pull towards the trained classifier.
        loss_before, loss_after: mean cross-entropy on those faces under the classifier before and after.
        server_before: the server evaluation (loss plus server.metrics.classification_metrics) of the model before
            the re-fit; None without a server test set.
    """

    public_faces: int
    l2: float
    loss_before: float
    loss_after: float
    server_before: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["server_before"] = None if self.server_before is None else dict(self.server_before)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HeadRefitRecord:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class ClientEval:
    """One site's evaluation of the global model on its own test split."""

    accuracy: float
    num_examples: int


@dataclass(frozen=True)
class FederatedEval:
    """The sites' evaluation of a round's global model: example-weighted, per site, and its spread over sites."""

    loss: float | None
    accuracy: float
    clients: dict[str, ClientEval]
    distribution: dict[str, Any]  # server.metrics.client_distribution

    def to_json(self) -> dict[str, Any]:
        return {"loss": self.loss, "accuracy": self.accuracy,
                "clients": {cid: dataclasses.asdict(c) for cid, c in self.clients.items()},
                "distribution": dict(self.distribution)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FederatedEval:
        clients = {str(cid): ClientEval(**_known(ClientEval, c)) for cid, c in (data.get("clients") or {}).items()}
        return cls(loss=data.get("loss"), accuracy=data["accuracy"], clients=clients,
                   distribution=dict(data.get("distribution") or {}))


@dataclass(frozen=True)
class FitRecord:
    """What happened to a round's updates: who was in the aggregate, who was refused and why, the training loss.

    Attributes:
        failed, failure: the round produced no aggregate (SecAgg+ halted, ...) and why.
        clients: whose update is in the aggregate (client IDs, also under SecAgg+): with the enrolled sites, it
            says who dropped.
        rejected: {"client", "reason"} per refused update; failures: errors sites replied with.
        train_loss: example-weighted mean of the sites' reported training loss.
        server_train_loss: the server's loss on the public slice in its step after aggregation (server-learning).
        secagg_excluded: refused under SecAgg+ before unmasking: their vectors are not in the sum.
        reclipped: scaled down by the server to the central-DP clip; norm_bounded: scaled down to the round's
            median-norm bound (written as {"count", "clients"}, so metrics.csv gets a count).
        secagg_quantization: server.secagg.QuantizationCost.to_json() of the round, under SecAgg+.
    """

    num_clients: int = 0
    num_accepted: int = 0
    num_rejected: int = 0
    failed: bool = False
    failure: str | None = None
    clients: list[str] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    train_loss: float | None = None
    server_train_loss: float | None = None
    central_noise_std: float | None = None
    secagg_excluded: list[str] = field(default_factory=list)
    reclipped: list[str] = field(default_factory=list)
    norm_bounded: list[str] = field(default_factory=list)
    secagg_quantization: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["norm_bounded"] = {"count": len(self.norm_bounded), "clients": list(self.norm_bounded)}
        if self.secagg_quantization is None:
            del data["secagg_quantization"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FitRecord:
        known = _known(cls, data)
        if isinstance(known.get("norm_bounded"), Mapping):
            known["norm_bounded"] = list(known["norm_bounded"].get("clients") or [])
        return cls(**known)


@dataclass(frozen=True)
class EvaluateStatus:
    """Evaluation replies that carried no figures: withheld by sites under DP-SGD or SecAgg+ (unless they opted
    in, client/trainer.py), or refused as malformed."""

    num_withheld: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class RoundRecord:
    """One line of metrics.jsonl (and one row of metrics.csv). Round 0 is the initial model: no `fit`.

    Attributes:
        server: the server-side evaluation on the held-out test set: loss plus server.metrics.classification_metrics
            (accuracy, macro_f1, per-class lists, confusion_matrix, ...); None without a server test set.
        federated: the sites' evaluation; None when no site reported figures.
        evaluate: evaluation replies without figures; None when there were none.
        privacy: each DP node's cumulative {"epsilon_spent", "epsilon_budget"} so far; None without DP nodes.
        fit: the round's updates; None for round 0.
        head_refit: the classifier's re-fit on the public slice (last round, head-refit); None otherwise.
    """

    round: int
    seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    server: dict[str, Any] | None = None
    federated: FederatedEval | None = None
    evaluate: EvaluateStatus | None = None
    privacy: dict[str, dict[str, Any]] | None = None
    fit: FitRecord | None = None
    head_refit: HeadRefitRecord | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.round, bool) or not isinstance(self.round, int):
            raise ValueError(f"a round record needs an integer 'round', got {self.round!r}")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "round": self.round, "seconds": self.seconds, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
            "server": None if self.server is None else dict(self.server),
            "federated": None if self.federated is None else self.federated.to_json(),
        }
        if self.evaluate is not None:
            data["evaluate"] = dataclasses.asdict(self.evaluate)
        if self.privacy is not None:
            data["privacy"] = {cid: dict(p) for cid, p in self.privacy.items()}
        if self.fit is not None:
            data["fit"] = self.fit.to_json()
        if self.head_refit is not None:
            data["head_refit"] = self.head_refit.to_json()
        data["schema_version"] = self.schema_version
        return data

    @classmethod
    def from_json(cls, data: Any, *, source: str = "round record") -> RoundRecord:
        """Reads one line of metrics.jsonl; keys this version does not know are ignored. Raises what
        models.card.parse_record raises, and ValueError for a round that is not an integer."""
        return parse_record(data, supported=SCHEMA_VERSION, source=source, kind="round record", build=lambda d: cls(
            round=d.get("round"), seconds=d.get("seconds") or 0.0, bytes_up=d.get("bytes_up") or 0,
            bytes_down=d.get("bytes_down") or 0, server=d.get("server"),
            federated=FederatedEval.from_json(d["federated"]) if d.get("federated") else None,
            evaluate=EvaluateStatus(**_known(EvaluateStatus, d["evaluate"])) if d.get("evaluate") else None,
            privacy=d.get("privacy"),
            fit=FitRecord.from_json(d["fit"]) if d.get("fit") is not None else None,
            head_refit=HeadRefitRecord.from_json(d["head_refit"]) if d.get("head_refit") is not None else None,
        ))

    @property
    def server_accuracy(self) -> float | None:
        return _finite((self.server or {}).get("accuracy"))


def build_round(
    server_round: int,
    *,
    seconds: float,
    report: RoundReport,
    server: Mapping[str, Any] | None,
    privacy: Mapping[str, Mapping[str, Any]] | None = None,
    failure: str | None = None,
    quantization: Mapping[str, Any] | None = None,
) -> RoundRecord:
    """The one builder of a round's record, from what the guard (or the centralised loop) saw in the round.

    Args:
        report: the round's tally (a centralised round is one client whose update was accepted).
        server: the server-side evaluation, or None.
        privacy: each DP node's last status (only epsilon_spent and epsilon_budget are kept).
        failure: why the round failed (no aggregate), or None.
        quantization: the round's SecAgg+ quantisation cost, or None.
    """
    federated = None
    if report.eval_clients:
        clients = {cid: ClientEval(accuracy=c["accuracy"], num_examples=c["num_examples"])
                   for cid, c in report.eval_clients.items()}
        total = sum(c.num_examples for c in clients.values())
        federated = FederatedEval(
            loss=report.eval_loss,
            accuracy=sum(c.accuracy * c.num_examples for c in clients.values()) / total,
            clients=clients,
            distribution=client_distribution([c.accuracy for c in clients.values()]),
        )
    fit = None
    if server_round > 0:
        fit = FitRecord(
            failed=failure is not None, failure=failure, num_clients=report.num_results,
            num_accepted=report.num_accepted, clients=sorted(report.clients), num_rejected=len(report.rejected),
            rejected=list(report.rejected), failures=list(report.failures), train_loss=report.train_loss,
            server_train_loss=report.server_train_loss, central_noise_std=report.central_noise_std,
            secagg_excluded=list(report.excluded_from_sum),
            reclipped=list(report.reclipped), norm_bounded=list(report.norm_bounded),
            secagg_quantization=None if quantization is None else dict(quantization),
        )
    withheld = report.eval_withheld or report.eval_rejected
    return RoundRecord(
        round=server_round, seconds=seconds, bytes_up=report.bytes_up, bytes_down=report.bytes_down,
        server=None if server is None else dict(server), federated=federated,
        evaluate=EvaluateStatus(report.eval_withheld, list(report.eval_rejected)) if withheld else None,
        privacy={cid: {"epsilon_spent": p.get("epsilon_spent"), "epsilon_budget": p.get("epsilon_budget")}
                 for cid, p in sorted(privacy.items())} if privacy else None,
        fit=fit,
        head_refit=report.head_refit,
    )


def format_round(record: RoundRecord, *, num_rounds: int) -> str:
    """The one terminal line of a round (fer-server's progress, the ServerApp's log, fer-sim's progress bar)."""
    accuracy = record.server_accuracy
    shown = f"accuracy {accuracy:.4f}" if accuracy is not None else "no server test set"
    if record.round == 0 or record.fit is None:
        return f"round {record.round} (initial model): {shown}"
    status = "FAILED " if record.fit.failed else ""
    return (f"round {record.round}/{num_rounds}: {status}{shown}, {record.fit.num_accepted} updates accepted, "
            f"{record.fit.num_rejected} rejected, {record.seconds:.1f} s")


@dataclass(frozen=True)
class RunSummary:
    """summary.json: a run's headline numbers, from its round records (see summarize) plus what its runner knows.

    Accuracy figures come from the server-side evaluation when rounds have one, else from the federated one;
    `accuracy_source` says which, so two runs are only compared on the same footing. Round 0 (the initial model)
    counts for `initial_accuracy` and `best_accuracy` but not as a training round nor for traffic.
    """

    model: str
    strategy: str
    dataset: str
    rounds: int
    seconds: float
    accuracy_source: str
    final_accuracy: float | None = None
    best_accuracy: float | None = None
    best_round: int | None = None
    initial_accuracy: float | None = None
    macro_f1: float | None = None
    final_federated_accuracy: float | None = None
    final_worst_10pct: float | None = None
    client_accuracy: dict[str, Any] | None = None
    seconds_per_round: float | None = None
    bytes_per_round: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    rejected_updates: int = 0
    failed_rounds: list[int] = field(default_factory=list)
    secure_aggregation: bool = False
    local_dp: bool = False
    classes: list[str] = field(default_factory=lambda: list(EMOTIONS))
    mode: str = "federated"
    # What only the runner knows (simulations and the centralised baseline); None where it does not apply.
    synthetic: bool | None = None
    num_clients: int | None = None
    train_examples: int | None = None
    wall_seconds: float | None = None
    attack: str | None = None
    attackers: list[str] | None = None
    byzantine: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        # What only a runner knows is left out where it does not apply (a deployment has no attackers to name).
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k in _RUNNER_FIELDS and v is None)}

    @classmethod
    def from_json(cls, data: Any, *, source: str = "summary.json") -> RunSummary:
        """Reads summary.json (errors: see models.card.parse_record)."""
        return parse_record(data, supported=SCHEMA_VERSION, source=source, kind="run summary",
                            build=lambda d: cls(**_known(cls, d)))

    def replace(self, **changes: Any) -> RunSummary:
        return dataclasses.replace(self, **changes)


_RUNNER_FIELDS = ("synthetic", "num_clients", "train_examples", "wall_seconds", "attack", "attackers", "byzantine")


def summarize(rounds: Sequence[RoundRecord], *, seconds: float, settings: RunSettings,
              mode: str = "federated") -> RunSummary:
    """The one summary of a run's round records (federated and centralised alike)."""
    ordered = sorted(rounds, key=lambda record: record.round)
    source = "server" if any(r.server_accuracy is not None for r in ordered) else "federated"

    def accuracy(record: RoundRecord) -> float | None:
        if source == "server":
            return record.server_accuracy
        return None if record.federated is None else _finite(record.federated.accuracy)

    scored = [(r.round, accuracy(r)) for r in ordered]
    scored = [(rnd, acc) for rnd, acc in scored if acc is not None]
    training = [r for r in ordered if r.round > 0]
    final = ordered[-1] if ordered else None
    best_round, best_accuracy = max(scored, key=lambda item: (item[1], -item[0])) if scored else (None, None)
    traffic = [int(r.bytes_up) + int(r.bytes_down) for r in training]
    last_fed = next((r.federated for r in reversed(training) if r.federated is not None), None)
    return RunSummary(
        model=settings.model,
        strategy=settings.strategy,
        dataset=settings.dataset,
        mode=mode,
        rounds=max((r.round for r in training), default=0),
        seconds=float(seconds),
        accuracy_source=source,
        final_accuracy=scored[-1][1] if scored else None,
        best_accuracy=best_accuracy,
        best_round=best_round,
        initial_accuracy=next((acc for rnd, acc in scored if rnd == 0), None),
        macro_f1=_finite((final.server or {}).get("macro_f1")) if final and source == "server" else None,
        final_federated_accuracy=None if last_fed is None else _finite(last_fed.accuracy),
        final_worst_10pct=None if last_fed is None else _finite(last_fed.distribution.get("worst_10pct")),
        client_accuracy=None if last_fed is None else dict(last_fed.distribution),
        seconds_per_round=float(seconds) / len(training) if training else None,
        bytes_per_round=float(np.mean(traffic)) if traffic else 0.0,
        bytes_up=sum(int(r.bytes_up) for r in training),
        bytes_down=sum(int(r.bytes_down) for r in training),
        rejected_updates=sum(r.fit.num_rejected for r in training if r.fit is not None),
        failed_rounds=[r.round for r in training if r.fit is not None and r.fit.failed],
        secure_aggregation=settings.secure_agg,
        local_dp=settings.dp_enabled,
    )


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None
