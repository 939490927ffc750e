"""The final model of a federation, delivered to every site that took part (issue 14 item 1).

When a run ends the coordinator's ServerApp sends the final global weights, with a card saying what they are, to
each participating node over the federation itself (server/delivery.py): one extra EVALUATE message whose config
carries `deliver-final-model` and the card as JSON. The node's ClientApp answers it in a client mod (client/delivery_mod.py) that calls
`accept_delivery` here instead of evaluating: it checks the weights and stores them in its state directory as `models/<run>-r<round>.pt` (a plain
state_dict that loads with `weights_only=True`) with the card beside it (`.json`), both written atomically.

Why the node may trust what it stores: the message came over the node's authenticated channel (TLS to the
coordinator's certificate, node authentication) from the app bundle the coordinator signed (docs/deployment.md);
and the node checks the weights against the sha256 in the card, the architecture against the model the run config
names and the label order against its own, so a corrupted or mismatched payload is refused in one logged line and
nothing is written. A refusal never stops the node.

The stored card is a `ModelCard`-compatible sidecar (name, cfg, round, classes, num_classes, format, sha256 of the
.pt file, image_size), so `models.files.load_model` and `fer-client predict` read a delivered model like a run's
model.pt, plus the delivery's provenance: run, the coordinator's test metrics, the site's own cumulative ε (from its
ledger), whether SecAgg+ was on, and `weights_sha256`, the digest of the weights as they travelled.

Simulations do not deliver: `fer-sim` runs its own ServerApp (simulation/runner.py), which never sends the message,
and a simulated node that receives one anyway (`flwr run` under the simulation engine) answers without storing:
every simulated site's state lives in the run directory, which already holds model.pt once.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from client.data.labels import EMOTIONS
from client.delivery_mod import CARD_KEY, DELIVER_KEY  # noqa: F401 - the wire keys, re-exported
from client.replay import global_digest
from models.card import ModelCard
from privacy.atomic import atomic_write

log = logging.getLogger("fer_fl.client")

MODELS_DIR = "models"
# A run id becomes a file name: letters, digits, '.', '_' and '-' only, so a card can never name a path elsewhere.
_RUN_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


class DeliveryRefused(ValueError):
    """The node will not store a delivered model; the message is one line saying why."""


@dataclass(frozen=True, kw_only=True)
class DeliveredModelCard(ModelCard):
    """What a delivered model is and where it came from: the JSON beside `models/<run>-r<round>.pt`.

    A `models.card.ModelCard` (the run directory's model sidecar: name, round, classes, cfg, sha256 of the stored
    .pt file, image_size, format), so the one model-file reader reads both, plus the delivery's provenance. The
    coordinator fills what it knows; the node adds `sha256`, `epsilon_spent` and `delivered_at` when it stores the
    weights.

    Attributes:
        run_id: the coordinator's run (Flower's run id); names the file.
        weights_sha256: sha256 of the weights as sent (see weights_sha256()); the node refuses weights that differ.
        server_metrics: the coordinator's test metrics of the final model (accuracy, macro_f1, loss; as it reported
            them: on its held-out test set, synthetic in a test deployment).
        secure_aggregation: whether SecAgg+ hid each site's update (the final model is then the aggregate).
        epsilon_spent: the node's own cumulative ε from its privacy ledger when it stored the model; None without
            a ledger.
        delivered_at: when the node stored it (UTC, ISO 8601).
    """

    run_id: str
    weights_sha256: str
    server_metrics: dict[str, float] = field(default_factory=dict)
    secure_aggregation: bool = False
    epsilon_spent: float | None = None
    delivered_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **super().to_json(), "run_id": self.run_id, "weights_sha256": self.weights_sha256,
            "server_metrics": dict(self.server_metrics), "secure_aggregation": bool(self.secure_aggregation),
            "epsilon_spent": self.epsilon_spent, "delivered_at": self.delivered_at,
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str = "model card") -> DeliveredModelCard:
        """Reads a card (unknown keys ignored).

        Raises:
            DeliveryRefused: not a card of this schema, or a field of the wrong kind (named with `source`).
        """
        if not isinstance(data, Mapping):
            raise DeliveryRefused(f"{source}: expected a JSON object, got {type(data).__name__}")
        for key in ("name", "round", "classes", "run_id", "weights_sha256"):
            if key not in data:
                raise DeliveryRefused(f"{source}: no {key!r}")
        try:
            model = ModelCard.from_json(data, source=source)
            metrics = data.get("server_metrics") or {}
            epsilon = data.get("epsilon_spent")
            card = cls(
                **{f.name: getattr(model, f.name) for f in fields(ModelCard)},
                run_id=_text(data["run_id"], "run_id"), weights_sha256=_text(data["weights_sha256"], "weights_sha256"),
                server_metrics={str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                secure_aggregation=bool(data.get("secure_aggregation", False)),
                epsilon_spent=None if epsilon is None else float(epsilon), delivered_at=data.get("delivered_at"),
            )
        except KeyError as err:
            raise DeliveryRefused(f"{source}: no {err.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as err:
            raise DeliveryRefused(str(err) if str(err).startswith(source) else f"{source}: {err}") from None
        if card.round < 0:
            raise DeliveryRefused(f"{source}: round must be a non-negative integer, got {card.round}")
        if not _RUN_ID.match(card.run_id):
            raise DeliveryRefused(f"{source}: run id {card.run_id!r} is not a plain name")
        return card

    @property
    def file_name(self) -> str:
        """`<run>-r<round>.pt`: the weights' file name in STATE_DIR/models."""
        return f"{self.run_id}-r{self.round}.pt"


@dataclass(frozen=True)
class DeliveredModel:
    """A model the node holds: its weights file and card."""

    path: Path
    card: DeliveredModelCard


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def weights_sha256(weights: Sequence[np.ndarray]) -> str:
    """The sha256 of a model's weights in the Flower wire format (client/wire.py: one flat vector in `state_dict`
    order), taken as float32, the precision the model holds them in: replay.global_digest's dtype, shape and bytes.

    Computed on the arrays, not on a file, so the coordinator and the node agree whatever torch version serialises
    them; `weights_sha256(wire.get_weights(model))` of a model loaded from the run's model.pt gives the same value.
    """
    return global_digest([np.asarray(array, dtype="<f4") for array in weights])


def models_dir(state_dir: Path) -> Path:
    """Where a node keeps delivered models: STATE_DIR/models."""
    return Path(state_dir) / MODELS_DIR


def store_delivered_model(*, state_dir: Path, weights: Sequence[np.ndarray], card: DeliveredModelCard,
                          expected_model: str, epsilon_spent: float | None = None,
                          now: _dt.datetime | None = None) -> DeliveredModel:
    """Checks a delivered model and stores it in `state_dir/models` (weights first, then the card: a card on disk
    always has its weights, and each file is replaced atomically).

    Args:
        state_dir: the node's state directory.
        weights: the weights as received (Flower wire format).
        card: the card the coordinator sent with them.
        expected_model: the architecture the node's run config names; any other is refused.
        epsilon_spent: the node's cumulative ε from its ledger (None without one).
        now: the delivery time (tests pass one to order deliveries).

    Raises:
        DeliveryRefused: the weights do not match the card's sha256, the architecture or label order is not the
            node's, the weights are not finite or do not fit the architecture. Nothing is written then.
    """
    import torch

    from client import wire
    from models import create_model

    if card.name != expected_model:
        raise DeliveryRefused(f"architecture {card.name!r} is not this run's model {expected_model!r}")
    if tuple(card.classes) != EMOTIONS:
        raise DeliveryRefused(f"classes {list(card.classes)} are not this node's {list(EMOTIONS)}")
    received = weights_sha256(weights)
    if received != card.weights_sha256:
        raise DeliveryRefused(f"weights sha256 {received[:12]}… does not match the card's {card.weights_sha256[:12]}…")
    if not all(np.isfinite(np.asarray(w)).all() for w in weights):
        raise DeliveryRefused("the weights hold NaN or infinite values")
    try:
        model = create_model(card.name, dp=bool(card.cfg.get("dp", True)))
        wire.set_weights(model, weights)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise DeliveryRefused(f"the weights do not fit architecture {card.name!r} ({err})") from None
    buffer = io.BytesIO()
    torch.save({key: value.detach().cpu().clone() for key, value in model.state_dict().items()}, buffer)
    payload = buffer.getvalue()
    stored = replace(card, sha256=hashlib.sha256(payload).hexdigest(), epsilon_spent=epsilon_spent,
                     delivered_at=(now or _dt.datetime.now(_dt.timezone.utc)).isoformat(timespec="seconds"))
    folder = models_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = atomic_write(folder / stored.file_name, payload)
    atomic_write(path.with_suffix(".json"), json.dumps(stored.to_json(), indent=2) + "\n")
    return DeliveredModel(path=path, card=stored)


def list_delivered(state_dir: Path | None) -> list[DeliveredModel]:
    """The models a node holds, newest delivery first (then highest round). A card that cannot be read or whose
    weights file is missing is left out (logged); the weights' sha256 is checked when a model is loaded."""
    folder = models_dir(state_dir) if state_dir is not None else None
    if folder is None or not folder.is_dir():
        return []
    held = []
    for card_path in sorted(folder.glob("*.json")):
        weights = card_path.with_suffix(".pt")
        try:
            card = DeliveredModelCard.from_json(json.loads(card_path.read_text()), source=str(card_path))
        except (OSError, ValueError) as err:
            log.warning("skipping %s: %s", card_path, err)
            continue
        if weights.is_file():
            held.append(DeliveredModel(path=weights, card=card))
    return sorted(held, key=lambda m: (m.card.delivered_at or "", m.card.round, m.path.name), reverse=True)


def latest_delivered(state_dir: Path | None) -> Path | None:
    """The weights file of the newest delivered model, None when the node holds none."""
    held = list_delivered(state_dir)
    return held[0].path if held else None


def site_epsilon(node) -> float | None:
    """The node's cumulative ε from its privacy ledger (read only, nothing written); None when it keeps none.

    Args:
        node: the node's parsed node config (`client.node_config.NodeSettings`).
    """
    from privacy.ledger import read_ledger

    if node.state_dir is None:
        return None
    files = node.ledger_files(state_dir=node.state_dir)
    if not files.ledger.exists():
        return None
    _, rounds = read_ledger(files.ledger, key_file=files.key)
    return rounds[-1].epsilon_after if rounds else 0.0


def accept_delivery(msg, ctxt) -> DeliveredModel | None:
    """Checks and stores the delivered model; None for a simulated node (it stores nothing)."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from client.config import RunSettings
    from client.node_config import NodeSettings

    node = NodeSettings.from_node_config(ctxt.node_config, node_id=ctxt.node_id)
    if node.simulated:
        return None
    if node.state_dir is None:
        raise DeliveryRefused("this node has no state directory to store the model in")
    ins = compat.recorddict_to_evaluateins(msg.content, keep_input=True)
    raw = ins.config.get(CARD_KEY)
    try:
        card_json = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError as err:
        raise DeliveryRefused(f"the card is not JSON ({err})") from None
    card = DeliveredModelCard.from_json(card_json, source="the delivered card")
    settings = RunSettings.from_run_config(dict(ctxt.run_config))
    return store_delivered_model(state_dir=node.state_dir, weights=parameters_to_ndarrays(ins.parameters), card=card,
                                 expected_model=settings.model, epsilon_spent=site_epsilon(node))
