"""The site's store of delivered final models (client/delivery.py): the ClientApp answering the coordinator's
delivery message, what it refuses, how it writes, `fer-client models`, and predict's default model."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import EvaluateIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from client import delivery, wire
from client.cli.main import main as fer_client
from client.client_app import make_client_app
from client.config import RunSettings
from client.data.labels import EMOTIONS
from client.delivery import (CARD_KEY, DELIVER_KEY, DeliveredModelCard, DeliveryRefused, list_delivered,
                             store_delivered_model, weights_sha256)
from client.inference.model import load_torch_model, resolve_model
from models.reference import best_reference, reference_path
from models import create_model
from privacy.ledger import PrivacyLedger, generate_key_file

SETTINGS = RunSettings(dataset="synthetic=280", model="cnn_am", out_dir="unused")

pytestmark = pytest.mark.usefixtures("superlink_identity")


def _make_weights(seed: int = 0, name: str = "cnn_am") -> list[np.ndarray]:
    """A federated-build model's weights in the wire format."""
    torch.manual_seed(seed)
    return wire.get_weights(create_model(name, dp=True))


def _make_card(weights: list[np.ndarray], **overrides) -> DeliveredModelCard:
    """The card a coordinator sends with `weights`."""
    fields = {"name": "cnn_am", "round": 2, "classes": EMOTIONS, "cfg": {"dp": True}, "image_size": 48,
              "run_id": "1234", "weights_sha256": weights_sha256(weights),
              "server_metrics": {"accuracy": 0.31, "macro_f1": 0.2}, "secure_aggregation": True}
    return DeliveredModelCard(**{**fields, **overrides})


def _make_context(state_dir: Path, **node) -> Context:
    """A deployed node of a run of SETTINGS."""
    config = {"dataset": "synthetic=280", "client-id": "site-a", "state-dir": str(state_dir), **node}
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config=SETTINGS.to_run_config())


def _make_delivery(weights: list[np.ndarray], card: dict | str) -> Message:
    """The coordinator's delivery message, as server/delivery.py builds it."""
    config = {DELIVER_KEY: True, CARD_KEY: card if isinstance(card, str) else json.dumps(card)}
    content = compat.evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters(weights), config), True)
    return Message(content=content, dst_node_id=7, message_type=MessageType.EVALUATE, group_id="deliver-2")


def _reply_metrics(reply: Message) -> dict:
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    return dict(compat.recorddict_to_evaluateres(reply.content).metrics)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_delivery_message_stores_weights_and_card_that_load_weights_only(tmp_path):
    """The ClientApp stores a delivered model as models/<run>-r<round>.pt + .json; it loads (weights_only) into the
    same weights and the card carries the coordinator's figures and the file's sha256."""
    # Prepare
    weights = _make_weights()
    card = _make_card(weights)
    # Execute
    reply = make_client_app()(_make_delivery(weights, card.to_json()), _make_context(tmp_path))
    # Assert
    assert _reply_metrics(reply) == {"delivered": 1, "sha256": card.weights_sha256}
    assert _files(tmp_path) == ["models/1234-r2.json", "models/1234-r2.pt"]
    state = torch.load(tmp_path / "models/1234-r2.pt", weights_only=True)
    assert weights_sha256([np.concatenate([v.reshape(-1).numpy() for v in state.values()])]) == card.weights_sha256
    model, spec = load_torch_model(tmp_path / "models/1234-r2.pt")
    assert np.array_equal(wire.get_weights(model)[0], weights[0]) and spec.name == "cnn_am"
    (held,) = list_delivered(tmp_path)
    assert (held.card.run_id, held.card.round, held.card.server_metrics["accuracy"]) == ("1234", 2, 0.31)
    assert held.card.secure_aggregation is True and held.card.epsilon_spent is None  # this node keeps no ledger
    assert held.card.delivered_at is not None and len(held.card.sha256) == 64


@pytest.mark.parametrize("attack, reason", [
    ("tampered weights", "does not match the card"),
    ("card of other weights", "does not match the card"),
    ("another architecture", "not this run's model"),
    ("weights that do not fit", "do not fit architecture"),
    ("non-finite weights", "NaN or infinite"),
    ("run id naming a path", "is not a plain name"),
    ("card not JSON", "not JSON"),
])
def test_a_bad_delivery_is_refused_in_one_logged_line_and_nothing_is_written(tmp_path, caplog, attack, reason):
    """Weights that differ from the card's sha256, another architecture, weights that do not fit the model, NaNs,
    a run id that names a path and a card that is no JSON are each refused: one warning, a reply saying why,
    no file, and the node answers (no error reply)."""
    # Prepare
    weights = _make_weights()
    card = _make_card(weights).to_json()
    if attack == "tampered weights":
        weights = [weights[0].copy()]
        weights[0][5] += 1e-3
    elif attack == "card of other weights":
        card["weights_sha256"] = weights_sha256(_make_weights(seed=1))
    elif attack == "another architecture":
        weights = _make_weights(name="dmsnet_iot")
        card.update(name="dmsnet_iot", weights_sha256=weights_sha256(weights))
    elif attack == "weights that do not fit":
        weights = [weights[0][:-10]]
        card["weights_sha256"] = weights_sha256(weights)
    elif attack == "non-finite weights":
        weights = [weights[0].copy()]
        weights[0][3] = np.nan
        card["weights_sha256"] = weights_sha256(weights)
    elif attack == "run id naming a path":
        card["run_id"] = "../../escaped"
    elif attack == "card not JSON":
        card = "{not json"
    # Execute
    with caplog.at_level(logging.WARNING, logger="fer_fl.client"):
        reply = make_client_app()(_make_delivery(weights, card), _make_context(tmp_path / "node"))
    # Assert
    metrics = _reply_metrics(reply)
    assert metrics["delivered"] == 0 and reason in metrics["reason"]
    (line,) = [r.getMessage() for r in caplog.records if "refused the delivered final model" in r.getMessage()]
    assert reason in line and "\n" not in line
    assert not (tmp_path / "node").exists() or _files(tmp_path / "node") == []
    assert _files(tmp_path) == []  # nothing escaped the state directory either


def test_other_evaluate_messages_still_evaluate(tmp_path):
    """An EVALUATE message without the delivery flag reaches the training client: a real evaluation reply."""
    # Prepare
    weights = _make_weights()
    message = _make_delivery(weights, "{}")
    message.content.config_records["evaluateins.config"] = ConfigRecord({"server-round": 1})
    # Execute
    metrics = _reply_metrics(make_client_app()(message, _make_context(tmp_path)))
    # Assert
    assert "delivered" not in metrics and 0.0 <= metrics["accuracy"] <= 1.0
    assert not (tmp_path / "models").exists()


def test_a_simulated_node_stores_nothing(tmp_path):
    """A simulated node answers a delivery without writing: its state lives in the run directory."""
    weights = _make_weights()
    reply = make_client_app()(_make_delivery(weights, _make_card(weights).to_json()),
                              _make_context(tmp_path, **{"partition-id": 0}))
    assert _reply_metrics(reply)["delivered"] == 0
    assert _files(tmp_path) == []


def test_the_card_carries_the_sites_own_epsilon_from_its_ledger(tmp_path):
    """A node that keeps a privacy ledger stores its cumulative ε (the ledger's last charge) on the card."""
    # Prepare
    key = generate_key_file(tmp_path / "ledger.key")
    ledger = PrivacyLedger.open(tmp_path / "privacy.ledger", key_file=key, anchor_path=tmp_path / "privacy.anchor",
                                client_id="site-a", budget_epsilon=8.0, delta=1e-5)
    ledger.charge(server_round=1, noise_multiplier=1.1, sample_rate=0.1, steps=10, epsilon_after=1.25)
    ledger.charge(server_round=2, noise_multiplier=1.1, sample_rate=0.1, steps=10, epsilon_after=2.5)
    weights = _make_weights()
    # Execute
    reply = make_client_app()(_make_delivery(weights, _make_card(weights).to_json()),
                              _make_context(tmp_path, **{"ledger-key": str(key)}))
    # Assert
    assert _reply_metrics(reply)["delivered"] == 1
    (held,) = list_delivered(tmp_path)
    assert held.card.epsilon_spent == pytest.approx(2.5)


def test_a_failed_card_write_leaves_no_model_listed_and_no_temporary_file(tmp_path, monkeypatch):
    """Weights are written before their card, each atomically: when the card's write fails the weights alone are
    not a model (not listed, not used by predict) and no temporary file is left behind."""
    # Prepare
    real_write = delivery.atomic_write

    def failing_card_write(target, payload, **kwargs):
        if Path(target).suffix == ".json":
            raise OSError(28, "No space left on device")
        return real_write(target, payload, **kwargs)

    monkeypatch.setattr(delivery, "atomic_write", failing_card_write)
    weights = _make_weights()
    # Execute
    with pytest.raises(OSError):
        store_delivered_model(state_dir=tmp_path, weights=weights, card=_make_card(weights), expected_model="cnn_am")
    # Assert
    assert list_delivered(tmp_path) == []
    assert _files(tmp_path) == ["models/1234-r2.pt"]
    # predict falls back past the orphaned weights to the shipped reference
    assert resolve_model(model=None, runtime="torch", state_dir=tmp_path) == reference_path(best_reference())


def _store_three(state_dir: Path) -> list[DeliveredModelCard]:
    """Three deliveries: run 10 round 3 (day 1), run 11 round 2 (day 3), run 12 round 5 (day 2)."""
    cards = []
    for run_id, rounds, day in (("10", 3, 1), ("11", 2, 3), ("12", 5, 2)):
        weights = _make_weights(seed=int(run_id))
        cards.append(store_delivered_model(
            state_dir=state_dir, weights=weights, card=_make_card(weights, run_id=run_id, round=rounds),
            expected_model="cnn_am", epsilon_spent=0.5 * day,
            now=dt.datetime(2026, 12, day, 9, 0, tzinfo=dt.timezone.utc)).card)
    return cards


def test_listing_is_newest_first_and_predict_defaults_to_the_newest(tmp_path, capsys):
    """`fer-client models --json` lists deliveries newest first; the table shows run, round, date, accuracy, ε,
    SecAgg+ and the sha256 prefix; resolve_model (predict, watch) picks the newest for PyTorch, none for ONNX."""
    # Prepare
    cards = {card.run_id: card for card in _store_three(tmp_path)}
    # Execute
    with pytest.raises(SystemExit) as json_exit:
        fer_client(["models", "--state-dir", str(tmp_path), "--json"])
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with pytest.raises(SystemExit):
        fer_client(["models", "--state-dir", str(tmp_path)])
    table = capsys.readouterr().out.splitlines()
    # Assert
    assert json_exit.value.code == 0
    assert [(m["run_id"], m["round"]) for m in listed] == [("11", 2), ("12", 5), ("10", 3)]
    assert listed[0]["path"] == str(tmp_path / "models" / "11-r2.pt")
    assert table[0].split() == ["run", "round", "delivered", "accuracy", "epsilon", "secagg", "sha256"]
    assert table[1].split() == ["11", "2", "2026-12-03", "09:00:00", "0.3100", "1.5", "on",
                                cards["11"].weights_sha256[:12]]
    assert resolve_model(model=None, runtime="torch", state_dir=tmp_path) == tmp_path / "models" / "11-r2.pt"
    with pytest.raises(Exception, match="no model available"):
        resolve_model(model=None, runtime="onnx", state_dir=tmp_path)


def test_models_command_on_a_site_without_deliveries_says_so(tmp_path, capsys):
    """A site that holds no delivered model gets one line naming where it looked, exit 0."""
    with pytest.raises(SystemExit) as done:
        fer_client(["models", "--state-dir", str(tmp_path)])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"no delivered models in {tmp_path / 'models'}\n"


def test_card_round_trips_and_refuses_a_card_without_a_name():
    """to_json/from_json is the identity on a stored card; a card missing a field is one line naming it."""
    weights = _make_weights()
    card = _make_card(weights, sha256="ab" * 32, epsilon_spent=1.5, delivered_at="2026-12-05T09:00:00+00:00")
    assert DeliveredModelCard.from_json(card.to_json()) == card
    data = card.to_json()
    del data["name"]
    with pytest.raises(DeliveryRefused, match="no 'name'"):
        DeliveredModelCard.from_json(data, source="x.json")


def test_the_delivery_outcome_round_trips_and_refuses_another_schema_version():
    """delivery.json reads back as the DeliveryOutcome written; a record of another schema version is refused."""
    # Prepare
    from models.card import SchemaVersionError
    from server.delivery import DeliveryOutcome

    outcome = DeliveryOutcome(round=2, weights_sha256="ab" * 32, delivered=(3, 7), refused={9: "no answer"})

    # Execute
    data = json.loads(json.dumps(outcome.to_json()))

    # Assert
    assert DeliveryOutcome.from_json(data) == outcome
    with pytest.raises(SchemaVersionError, match="delivery.json: schema_version 2"):
        DeliveryOutcome.from_json({**data, "schema_version": 2})
