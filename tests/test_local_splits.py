"""Shorter rounds at the same passes (`local-splits`): each round a site trains on the next part of a seeded
permutation of its data, so `splits` rounds train every face once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client import task, wire
from client.config import ConfigError, RunSettings
from client.node_config import NodeSettings
from client.node_data import cached_dataset, node_data_from_indices
from client.node_setup import NodeSetup
from client.trainer import SLICE_SEED_RECORD, FerClient
from models import create_model
from server.server_app import initial_weights

SETTINGS = RunSettings(dataset="synthetic=120", model="cnn_am", local_epochs=1, batch_size=16, out_dir="unused",
                       num_server_rounds=4, local_splits=4)


def _make_client(settings: RunSettings, tmp_path) -> FerClient:
    """A simulated node holding all 120 synthetic training faces (partition 3 of 4 seeds its rounds)."""
    dataset = cached_dataset(settings.dataset, settings.image_size, settings.seed)
    data = node_data_from_indices(dataset, np.arange(len(dataset.splits["train"].labels)), client_id="site-3",
                                  test_fraction=0.2, seed=settings.seed)
    node = NodeSettings(partition_id=3, num_partitions=4, simulated=True)
    setup = NodeSetup(data=data, profile="default", local_epochs=1, batch_size=settings.batch_size,
                      state_dir=tmp_path)
    return FerClient(setup=setup, settings=settings, node=node)


def _train_on(rows: np.ndarray, client: FerClient, weights: list[np.ndarray], server_round: int) -> list[np.ndarray]:
    """The delta of the recipe's training on `rows` of the node's data, computed without the FerClient."""
    seed = client._seed(server_round)
    torch.manual_seed(seed)
    model = create_model(SETTINGS.model, dp=True)
    wire.set_weights(model, weights)
    data = client.setup.data
    local = task.prepare_training(model, data.train_images[rows], data.train_labels[rows],
                                  recipe=SETTINGS.recipe(synthetic=True), batch_size=SETTINGS.batch_size, seed=seed,
                                  server_round=server_round, num_rounds=SETTINGS.num_server_rounds)
    task.train(model, local.loader, epochs=1, optimizer=local.optimizer, criterion=local.criterion,
               lr_at=local.lr_at)
    return [new - old for new, old in zip(wire.get_weights(model), weights)]


@pytest.mark.parametrize("num_examples, splits", [(280, 4), (7, 3), (101, 8)])
def test_consecutive_rounds_train_every_example_once_an_epoch(num_examples, splits):
    """`splits` consecutive rounds partition a site's examples into near-equal sorted parts; each epoch reshuffles."""
    # Execute
    epochs = [[task.round_slice(num_examples, splits=splits, seed=11, server_round=epoch * splits + part + 1)
               for part in range(splits)] for epoch in range(2)]
    again = task.round_slice(num_examples, splits=splits, seed=11, server_round=1)
    other_seed = task.round_slice(num_examples, splits=splits, seed=12, server_round=1)

    # Assert
    for parts in epochs:
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(num_examples))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert all(np.array_equal(part, np.sort(part)) for part in parts)
    assert np.array_equal(epochs[0][0], again)
    assert not np.array_equal(epochs[0][0], epochs[1][0]) and not np.array_equal(epochs[0][0], other_seed)


def test_fewer_examples_than_splits_still_train_one_a_round():
    """A site with fewer faces than splits trains one face a round, and each of its faces within an epoch."""
    parts = [task.round_slice(3, splits=8, seed=5, server_round=r) for r in range(1, 9)]
    assert all(len(part) == 1 for part in parts)
    assert sorted({int(part[0]) for part in parts}) == [0, 1, 2]


def test_one_split_is_every_example_and_zero_is_refused():
    """splits 1 trains every example in order; splits 0 is a programming error, refused."""
    assert np.array_equal(task.round_slice(5, splits=1, seed=0, server_round=1), np.arange(5))
    with pytest.raises(ValueError, match="splits must be at least 1"):
        task.round_slice(5, splits=0, seed=0, server_round=1)


def test_splits_without_a_run_long_slice_seed_is_refused():
    """train_round with splits > 1 and no slice_seed is refused: a round's own seed would reshuffle each round."""
    model = create_model(SETTINGS.model, dp=True)
    with pytest.raises(ValueError, match="slice_seed"):
        task.train_round(model, np.zeros((8, 1, 48, 48), np.float32), np.zeros(8, np.int64),
                         recipe=SETTINGS.recipe(synthetic=True), batch_size=4, seed=1, server_round=1, num_rounds=4,
                         epochs=1, splits=4)


def test_a_round_trains_exactly_its_slice(tmp_path):
    """A site's delta with local-splits 4 equals the recipe's training on round_slice's rows, not on all its data."""
    # Prepare
    client = _make_client(SETTINGS, tmp_path)
    weights = initial_weights(SETTINGS)
    num_train = len(client.setup.data.train_labels)
    rows = task.round_slice(num_train, splits=4, seed=client._slice_seed(), server_round=2)

    # Execute
    delta, num_examples, _ = client.fit(weights, {"server-round": 2})

    # Assert
    expected = _train_on(rows, client, weights, server_round=2)
    everything = _train_on(np.arange(num_train), client, weights, server_round=2)
    assert num_examples == num_train  # FedAvg still weighs a site by its size
    assert num_train // 4 <= len(rows) <= -(-num_train // 4)
    for got, want in zip(delta, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert max(float(np.abs(g - e).max()) for g, e in zip(delta, everything)) > 1e-4


def test_a_deployed_node_keeps_one_slice_seed_for_the_run(tmp_path):
    """A deployed node draws its slice seed once and keeps it in its context state; another node draws its own."""
    # Prepare
    simulated = _make_client(SETTINGS, tmp_path)
    first = FerClient(setup=simulated.setup, settings=SETTINGS, node=NodeSettings(dataset="synthetic=120"))
    again = FerClient(setup=simulated.setup, settings=SETTINGS, node=first.node, state=first.state)
    other = FerClient(setup=simulated.setup, settings=SETTINGS, node=first.node)

    # Execute
    seed = first._slice_seed()

    # Assert
    assert again._slice_seed() == seed == first._slice_seed()
    assert int(first.state.config_records[SLICE_SEED_RECORD]["seed"]) == seed
    assert other._slice_seed() != seed
    assert seed != SETTINGS.seed * 1_000_003  # not derivable from the run's seed, which the coordinator knows


@pytest.mark.parametrize("changes, key", [({"local_splits": 0}, "local-splits"),
                                          ({"dp_epsilon": 3.0}, "local-splits")])
def test_bad_local_splits_are_refused_naming_the_key(changes, key):
    """local-splits below 1, or with DP-SGD (whose accountant samples all the data), is refused in one line."""
    with pytest.raises(ConfigError, match=key) as refused:
        SETTINGS.replace(**changes).validate()
    assert "\n" not in str(refused.value)
