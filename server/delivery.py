"""Sends the final model to the sites when a deployed run ends (issue 14 item 1; the node's side: client/delivery.py).

One EVALUATE message per node on Flower's legacy message path, the one every round already uses: its parameters are
the final global weights, its config the flag `deliver-final-model` and the card as JSON. The nodes are those of
this run still connected when it ends: on the legacy path every round samples from exactly these (fraction-fit 1.0,
the deployment default, samples all of them), and each was admitted by node authentication. A node that refuses
or does not answer in time is logged; the run's own results are already written, so delivery never fails a run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
from flwr.app import Message, MessageType
from flwr.common import EvaluateIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import Grid

from client.config import RunSettings
from client.data.labels import EMOTIONS
from client.delivery import CARD_KEY, DELIVER_KEY, DeliveredModelCard, weights_sha256
from models.card import SCHEMA_VERSION, check_schema_version
from server.rundir import RunDirectory

log = logging.getLogger("fer_fl.server")

# Seconds to wait for the nodes' answers when the run sets no round timeout: a node stores ~1 MB and answers at
# once, but its ClientApp process starts first (a few seconds, more on a loaded machine).
DEFAULT_TIMEOUT_S = 300.0
# The coordinator's test metrics a card carries (ServerEvaluator's names).
CARD_METRICS = ("accuracy", "macro_f1", "loss")


DELIVERY_JSON = "delivery.json"


@dataclass(frozen=True)
class DeliveryOutcome:
    """Which nodes stored the final model, and why the others did not (node id -> reason): the run directory's
    delivery.json, the coordinator's record of who holds its model (the ServerApp's log is not kept)."""

    round: int
    weights_sha256: str
    delivered: tuple[int, ...]
    refused: dict[int, str]

    def to_json(self) -> dict:
        return {"round": self.round, "weights_sha256": self.weights_sha256, "delivered": list(self.delivered),
                "refused": {str(node): reason for node, reason in sorted(self.refused.items())},
                "schema_version": SCHEMA_VERSION}

    @classmethod
    def from_json(cls, data: dict, *, source: str = DELIVERY_JSON) -> DeliveryOutcome:
        check_schema_version(data, supported=SCHEMA_VERSION, source=source)
        return cls(round=int(data["round"]), weights_sha256=str(data["weights_sha256"]),
                   delivered=tuple(int(n) for n in data["delivered"]),
                   refused={int(node): str(reason) for node, reason in data["refused"].items()})


def final_model_card(*, settings: RunSettings, run_id: int | str, final_round: int, weights: list[np.ndarray],
                     server_metrics: dict | None) -> DeliveredModelCard:
    """The card the coordinator sends with the final weights (the node adds its file's sha256, ε and date)."""
    metrics = {key: float(server_metrics[key]) for key in CARD_METRICS
               if isinstance((server_metrics or {}).get(key), (int, float))}
    return DeliveredModelCard(
        name=settings.model, round=final_round, classes=EMOTIONS, cfg={"dp": True}, run_id=str(run_id),
        weights_sha256=weights_sha256(weights), image_size=settings.image_size, server_metrics=metrics, secure_aggregation=settings.secure_agg,
    )


def deliver_final_model(grid: Grid, *, weights: list[np.ndarray], card: DeliveredModelCard,
                        timeout: float | None = None) -> DeliveryOutcome:
    """Sends `weights` and `card` to every node of the run and collects their answers.

    Args:
        grid: the run's Grid.
        weights: the final global weights (Flower wire format).
        card: from final_model_card.
        timeout: seconds to wait for the answers (DEFAULT_TIMEOUT_S when None).
    """
    node_ids = sorted(grid.get_node_ids())
    config = {DELIVER_KEY: True, CARD_KEY: json.dumps(card.to_json())}
    parameters = ndarrays_to_parameters(weights)
    messages = [
        Message(content=compat.evaluateins_to_recorddict(EvaluateIns(parameters, config), True), dst_node_id=node,
                message_type=MessageType.EVALUATE, group_id=f"deliver-{card.round}")
        for node in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout or DEFAULT_TIMEOUT_S))
    delivered, refused = [], {node: "no answer" for node in node_ids}
    for reply in replies:
        node = reply.metadata.src_node_id
        if not reply.has_content():
            refused[node] = f"error: {reply.error.reason}"
            continue
        metrics = compat.recorddict_to_evaluateres(reply.content).metrics
        if metrics.get("delivered") == 1 and metrics.get("sha256") == card.weights_sha256:
            delivered.append(node)
            refused.pop(node, None)
        else:
            refused[node] = str(metrics.get("reason", "refused"))
    for node, reason in sorted(refused.items()):
        log.warning("final model: node %d did not store it: %s", node, reason)
    log.info("final model (round %d, weights sha256 %s…) stored by %d of %d sites", card.round,
             card.weights_sha256[:12], len(delivered), len(node_ids))
    return DeliveryOutcome(round=card.round, weights_sha256=card.weights_sha256, delivered=tuple(sorted(delivered)),
                           refused=refused)


def deliver_at_end(grid: Grid, *, settings: RunSettings, run_id: int | str, weights: list[np.ndarray],
                   run_dir: RunDirectory) -> DeliveryOutcome | None:
    """What the deployed ServerApp calls after the last round: the card from the run's round records, the
    delivery, and its outcome in `run_dir/delivery.json`. Any failure is one logged line (None): the run's results
    are written already.
    """
    try:
        rounds = run_dir.rounds()
        final_round = max((r.round for r in rounds), default=settings.num_server_rounds)
        scored = [r.server for r in rounds if r.server]
        card = final_model_card(settings=settings, run_id=run_id, final_round=final_round, weights=weights,
                                server_metrics=scored[-1] if scored else None)
        outcome = deliver_final_model(grid, weights=weights, card=card, timeout=settings.round_timeout or None)
        run_dir.write_json(DELIVERY_JSON, outcome.to_json())
        return outcome
    except Exception as err:  # noqa: BLE001 - delivery comes after the run's results; it must not fail the run
        log.warning("final model: delivery to the sites failed: %s", str(err).splitlines()[0] if str(err) else err)
        return None
