"""The client mod that answers the coordinator's delivery of the final model (issue 14 item 1).

It is mounted on every ClientApp, which Flower loads afresh for every message, SecAgg+'s protocol stages included;
so this module stays torch-free and the code that checks and stores the model (client/delivery.py, which reads
models.card and so imports torch) is imported only when a delivery message arrives.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("fer_fl.client")

# The EVALUATE config keys of the delivery message (server/delivery.py sends them).
DELIVER_KEY = "deliver-final-model"
CARD_KEY = "final-model-card"


def receive_final_model(msg, ctxt, call_next):
    """Client mod: stores the final model the coordinator delivers; every other message passes through.

    The delivery is an EVALUATE message whose config holds `deliver-final-model` (server/delivery.py). The reply is
    an EvaluateRes with no loss and no examples, whose metrics say `delivered` (1 or 0) and, when refused, why.
    Anything that goes wrong is one logged line and a refusal in the reply, never an error that stops the node.
    """
    from flwr.app import Message, MessageType
    from flwr.common import Code, EvaluateRes, Status
    from flwr.compat.common import recorddict_compat as compat

    if msg.metadata.message_type != MessageType.EVALUATE:
        return call_next(msg, ctxt)
    config = msg.content.config_records.get("evaluateins.config")
    if config is None or not config.get(DELIVER_KEY):
        return call_next(msg, ctxt)
    try:
        from client.delivery import accept_delivery  # torch and models.card: only for the delivery

        stored = accept_delivery(msg, ctxt)
        metrics: dict[str, Any] = {"delivered": int(stored is not None)}
        if stored is None:
            metrics["reason"] = "simulated node: the run directory holds the model"
        else:
            metrics["sha256"] = stored.card.weights_sha256
            log.info("stored the final model of run %s (round %d) in %s", stored.card.run_id, stored.card.round,
                     stored.path)
    except Exception as err:  # noqa: BLE001 - a delivery must never stop the node; the reason is logged and sent
        reason = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("refused the delivered final model: %s", reason)
        metrics = {"delivered": 0, "reason": reason[:300]}
    res = EvaluateRes(status=Status(code=Code.OK, message=""), loss=0.0, num_examples=0, metrics=metrics)
    return Message(compat.evaluateres_to_recorddict(res), reply_to=msg)
