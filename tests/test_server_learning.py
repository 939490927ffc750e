"""server-learning: after every aggregation the server trains the global model on the public slice, as a site trains
on its own data (server/public_pretrain.py ServerLearning); the baseline pools the slice, the run records it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from client import wire
from client.config import ConfigError, RunSettings
from models import create_model
from models.finetune import trainable_mask
from server.evaluation import ServerEvaluator
from server.public_pretrain import public_split, public_training_data
from server.server_learning import ServerLearning
from server.rundir import RunDirectory
from simulation.centralized import pooled_training_data
from simulation.runner import run_simulation


def _make_settings(**changes) -> RunSettings:
    """A small synthetic federation with a public slice of 30 % that the server trains on every round."""
    base = RunSettings(dataset="synthetic=600", num_clients=3, min_clients=3, partition="dirichlet", alpha=0.5,
                       public_fraction=0.3, public_epochs=1, server_learning=True, local_epochs=1, seed=7)
    return base.replace(**changes)


def _random_weights(settings: RunSettings, seed: int = 0) -> list[np.ndarray]:
    """A seeded random global model of the run's architecture (the GroupNorm build federations train)."""
    torch.manual_seed(seed)
    return wire.get_weights(create_model(settings.model, dp=True))


def test_server_learning_without_a_public_slice_is_refused_naming_the_key():
    """RunSettings refuses server-learning when there is no public slice to train on."""
    with pytest.raises(ConfigError, match="server-learning .* needs public-fraction > 0"):
        RunSettings().replace(server_learning=True)


def test_a_step_lowers_the_global_models_loss_on_the_public_slice():
    """The step trains: three passes over the slice lower the model's loss on it, and change it."""
    # Prepare
    settings = _make_settings(local_epochs=3)
    images, labels, _ = public_training_data(settings)
    score = ServerEvaluator(model_name=settings.model, images=images, labels=labels, flip_tta=False)
    weights = _random_weights(settings)

    # Execute
    stepped, loss = ServerLearning(settings)(1, weights)

    # Assert
    assert score(1, stepped)[0] < score(1, weights)[0]
    assert math.isfinite(loss) and loss > 0
    assert any(not np.array_equal(a, b) for a, b in zip(stepped, weights))


def test_the_step_is_seeded_by_the_run_and_the_round():
    """The same round gives the same model twice; another round draws other batches."""
    # Prepare
    settings = _make_settings()
    weights = _random_weights(settings)

    # Execute
    first, _ = ServerLearning(settings)(2, weights)
    again, _ = ServerLearning(settings)(2, weights)
    other, _ = ServerLearning(settings)(3, weights)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))


def test_with_local_splits_a_step_is_a_sites_share_of_the_slice(caplog):
    """Under local-splits 4 a round's step trains local-epochs passes over a quarter of the slice, as a site does."""
    # Prepare
    settings = _make_settings(local_splits=4, local_epochs=2, batch_size=16)
    faces = len(public_split(settings, settings.dataset).public) // 4  # round 1: the first quarter of the epoch

    # Execute
    with caplog.at_level("INFO", logger="fer_fl.server"):
        ServerLearning(settings)(1, _random_weights(settings))

    # Assert
    assert f"{faces} public faces, {2 * math.ceil(faces / 16)} steps" in caplog.text


def test_under_dp_train_head_the_step_leaves_the_frozen_parameters_alone():
    """With dp-train head the server trains what the sites train: the frozen values come back unchanged."""
    # Prepare
    settings = _make_settings(dp_epsilon=8.0, dp_train="head")
    weights = _random_weights(settings)
    mask = trainable_mask(create_model(settings.model, dp=True), "head").numpy()

    # Execute
    stepped, _ = ServerLearning(settings)(1, weights)

    # Assert
    before = np.concatenate([w.ravel() for w in weights])
    after = np.concatenate([w.ravel() for w in stepped])
    np.testing.assert_array_equal(after[~mask], before[~mask])
    assert not np.array_equal(after[mask], before[mask])


def test_the_centralised_baseline_pools_the_public_slice_under_server_learning():
    """The baseline sees every face the federation trains on: the sites' training sets plus the public slice."""
    # Prepare
    settings = _make_settings()
    public_images, public_labels, _ = public_training_data(settings)

    # Execute
    images, labels = pooled_training_data(settings)
    private_images, private_labels = pooled_training_data(settings.replace(server_learning=False))

    # Assert
    assert len(labels) == len(private_labels) + len(public_labels)
    np.testing.assert_array_equal(np.bincount(labels, minlength=7),
                                  np.bincount(private_labels, minlength=7) + np.bincount(public_labels, minlength=7))


@pytest.mark.slow
def test_a_federation_records_the_servers_step_every_round(tmp_path):
    """Through the real ServerApp and ClientApps: every round's record carries the server's loss on the public
    slice, and privacy.json, partition.json and report.md say the slice was trained on every round."""
    # Prepare
    out = tmp_path / "run"
    settings = _make_settings(num_server_rounds=2, out_dir=str(out))

    # Execute
    run_simulation(settings, run_dir=RunDirectory(out), num_cpus=2)

    # Assert
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["fit"]["server_train_loss"] for r in rounds if r["round"] > 0]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert json.loads((out / "privacy.json").read_text())["public_data"]["server_learning"] is True
    assert json.loads((out / "partition.json").read_text())["public_slice"]["server_learning"] is True
    assert "trained each round's global model on it again (server-learning)" in (out / "report.md").read_text()
