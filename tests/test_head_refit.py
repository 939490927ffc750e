"""head-refit: at the end of a run the server re-fits the model's linear classifier on the public slice, body frozen
(client/refit.py refit_classifier, server/head_refit.py); the baseline takes the same step, the run records it."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from client import refit, wire
from client.config import ConfigError, RunSettings
from client.data.synthetic import make_synthetic
from models import create_model, list_models
from server.evaluation import ServerEvaluator
from server.head_refit import HeadRefit
from server.public_pretrain import public_training_data
from server.records import HeadRefitRecord, RoundRecord
from server.rundir import RunDirectory
from server.server_app import load_server_test_set
from simulation.centralized import run_centralized
from simulation.runner import run_simulation


def _make_settings(**changes) -> RunSettings:
    """A small synthetic federation with a public slice of 30 % whose final classifier is re-fitted on it."""
    base = RunSettings(dataset="synthetic=600", num_clients=3, min_clients=3, partition="dirichlet", alpha=0.5,
                       public_fraction=0.3, public_epochs=1, head_refit=True, local_epochs=1, seed=7)
    return base.replace(**changes)


def _make_faces(n: int = 120, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic uint8 faces and their labels."""
    return make_synthetic(n, seed=seed)


def _make_model(name: str = "cnn_am", seed: int = 0, **cfg) -> torch.nn.Module:
    """A seeded GroupNorm build of a registered model."""
    torch.manual_seed(seed)
    return create_model(name, dp=True, **cfg)


def _objective_gradient(features: np.ndarray, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                        w0: np.ndarray, l2: float) -> np.ndarray:
    """The gradient of mean cross-entropy + l2 |W - W0|^2 in (W, b), written out in numpy (float64)."""
    logits = features @ weight.T + bias
    logits -= logits.max(1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs[np.arange(len(labels)), labels] -= 1.0
    probs /= len(labels)
    return np.concatenate([(probs.T @ features + 2 * l2 * (weight - w0)).ravel(), probs.sum(0)])


def test_head_refit_without_a_public_slice_is_refused_naming_the_key():
    """RunSettings refuses head-refit when there is no public slice to fit on."""
    with pytest.raises(ConfigError, match="head-refit .* needs public-fraction > 0"):
        RunSettings().replace(head_refit=True)


def test_a_negative_l2_is_refused_naming_the_key():
    """head-refit-l2 below zero is a one-line configuration error."""
    with pytest.raises(ConfigError, match="head-refit-l2 must be a finite number >= 0"):
        _make_settings(head_refit_l2=-1.0)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_has_a_linear_classifier_to_refit(name):
    """classifier_layer finds the one nn.Linear that forward_head adds beyond pre_logits, for every model."""
    # Prepare
    model = create_model(name, dp=True)
    images = torch.zeros(2, 1, 48, 48)
    # Execute
    layer = refit.classifier_layer(model)
    model.eval()
    with torch.no_grad():
        embedding = model.forward_head(model.forward_features(images), pre_logits=True)
        logits = model(images)
    # Assert
    assert isinstance(layer, torch.nn.Linear)
    torch.testing.assert_close(layer(embedding), logits)


@pytest.mark.parametrize("l2", [0.01, 0.1])
def test_the_fit_is_the_optimum_of_the_regularised_cross_entropy(l2):
    """At the returned classifier the objective's gradient, computed independently in numpy, vanishes."""
    # Prepare
    model = _make_model()
    images, labels = _make_faces()
    layer = refit.classifier_layer(model)
    w0 = layer.weight.detach().double().numpy().copy()
    features = refit.embed(model, images, flip=True).flatten(0, 1).double().numpy()
    # Execute
    result = refit.refit_classifier(model, images, labels, l2=l2)
    # Assert
    gradient = _objective_gradient(features, np.repeat(labels, 2), layer.weight.detach().double().numpy(),
                                   layer.bias.detach().double().numpy(), w0, l2)
    assert np.abs(gradient).max() < 1e-4
    assert result.loss_after < result.loss_before
    assert result.num_examples == len(labels)


def test_only_the_classifier_changes():
    """Every state_dict entry but the classifier's weight and bias comes back bit-identical."""
    # Prepare
    model = _make_model()
    before = copy.deepcopy(model.state_dict())
    images, labels = _make_faces()
    # Execute
    refit.refit_classifier(model, images, labels, l2=1e-3)
    # Assert
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_a_classifier_bent_towards_one_class_is_straightened():
    """A head pushed to predict one class (what label skew does) re-fits to what the unbent head re-fits to."""
    # Prepare
    model = _make_model()
    images, labels = _make_faces(240)
    refit.refit_classifier(model, images, labels, l2=0.1)
    unbent, bent = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        refit.classifier_layer(bent).bias[0] += 1e4
    score = ServerEvaluator(model_name="cnn_am", images=images, labels=labels, flip_tta=True)
    bent_accuracy = score(1, wire.get_weights(bent))[1]["accuracy"]
    # Execute
    refit.refit_classifier(unbent, images, labels, l2=0.1)
    refit.refit_classifier(bent, images, labels, l2=0.1)
    # Assert
    assert bent_accuracy == pytest.approx(np.mean(labels == 0))
    straightened = score(1, wire.get_weights(bent))[1]["accuracy"]
    assert straightened > bent_accuracy + 0.05
    assert straightened == pytest.approx(score(1, wire.get_weights(unbent))[1]["accuracy"], abs=0.01)


def test_the_embedding_with_flip_holds_both_mirror_views():
    """embed(flip=True)[:, 1] is the embedding of the mirrored faces."""
    # Prepare
    model = _make_model()
    images, _ = _make_faces(8)
    # Execute
    both = refit.embed(model, images, flip=True)
    mirrored = refit.embed(model, np.ascontiguousarray(images[:, :, ::-1]), flip=False)
    # Assert
    assert both.shape[:2] == (8, 2)
    torch.testing.assert_close(both[:, 1], mirrored)


def test_the_step_is_deterministic_and_records_what_it_did():
    """The same weights give the same re-fitted model twice; the record names the faces, the l2 and the losses."""
    # Prepare
    settings = _make_settings(head_refit_l2=0.01)
    weights = wire.get_weights(_make_model(settings.model))
    images, _, _ = public_training_data(settings)
    # Execute
    first, record = HeadRefit(settings)(weights, evaluate=lambda w: {"accuracy": 0.25})
    again, _ = HeadRefit(settings)(weights)
    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert record.public_faces == len(images) and record.l2 == 0.01
    assert record.loss_after < record.loss_before
    assert record.server_before == {"accuracy": 0.25}
    assert HeadRefitRecord.from_json(json.loads(json.dumps(record.to_json()))) == record


def test_the_centralised_baseline_takes_the_same_step_and_records_it(tmp_path):
    """fer-sim centralized with head-refit: the last round scores the re-fitted model it saves, records the score of
    the model before the step, and report.md says so."""
    # Prepare
    settings = _make_settings(num_server_rounds=2, out_dir=str(tmp_path / "central"))
    run_dir = RunDirectory(tmp_path / "central")
    # Execute
    run_centralized(settings, run_dir=run_dir)
    # Assert
    rounds = [RoundRecord.from_json(json.loads(line))
              for line in (tmp_path / "central" / "metrics.jsonl").read_text().splitlines()]
    assert [r.head_refit is not None for r in rounds] == [False, False, True]
    last = rounds[-1]
    state = torch.load(tmp_path / "central" / "model.pt", weights_only=True)
    model = create_model(settings.model, dp=True)
    model.load_state_dict(state)
    images, labels = load_server_test_set(settings)[:2]
    score = ServerEvaluator(model_name=settings.model, images=images, labels=labels,
                            flip_tta=settings.recipe(synthetic=True).flip_tta)
    assert score(2, wire.get_weights(model))[1]["accuracy"] == pytest.approx(last.server["accuracy"])
    assert 0 <= last.head_refit.server_before["accuracy"] <= 1
    assert last.head_refit.loss_after < last.head_refit.loss_before
    report = (tmp_path / "central" / "report.md").read_text()
    assert f"re-fitted on {last.head_refit.public_faces} public faces (head-refit" in report


@pytest.mark.slow
def test_a_federation_delivers_and_scores_the_refitted_model(tmp_path):
    """Through the real ServerApp and ClientApps: the last round's record carries the re-fit, model.pt is the last
    checkpoint with its classifier re-fitted (body identical), and privacy.json says the slice was used so."""
    # Prepare
    out = tmp_path / "run"
    settings = _make_settings(num_server_rounds=2, out_dir=str(out))
    # Execute
    run_simulation(settings, run_dir=RunDirectory(out), num_cpus=2)
    # Assert
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [("head_refit" in r) for r in rounds] == [False, False, True]
    record = HeadRefitRecord.from_json(rounds[-1]["head_refit"])
    assert record.loss_after < record.loss_before and record.server_before is not None
    final = torch.load(out / "model.pt", weights_only=True)
    raw = torch.load(out / "checkpoints" / "round-002.pt", weights_only=True)
    changed = {k for k in final if not torch.equal(final[k], raw[k])}
    assert changed == {"classifier.weight", "classifier.bias"}
    expected = create_model(settings.model, dp=True)
    expected.load_state_dict(raw)
    images, labels, _ = public_training_data(settings)
    refit.refit_classifier(expected, images, labels, l2=settings.head_refit_l2)
    torch.testing.assert_close(final["classifier.weight"], expected.state_dict()["classifier.weight"])
    assert json.loads((out / "privacy.json").read_text())["public_data"]["head_refit"] is True
