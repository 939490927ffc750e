"""The data one node trains and evaluates on, and how a node gets it.

A node's data is a pair of in-memory splits: its local training set and its local test set (used for federated
evaluation). On a real hospital node both come from the node's own dataset; in a simulation they come from one
partition of a shared dataset (the `simulation` package supplies that provider).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from client.data.formats import FERDataset, load_dataset


@dataclass(frozen=True)
class NodeData:
    """One node's local data. Images are uint8 (N, H, W) faces; labels int64 in the shared label space."""

    client_id: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    synthetic: bool = False

    @property
    def num_train(self) -> int:
        return len(self.train_labels)


@dataclass(frozen=True)
class DatasetEntry:
    """One `KIND=PATH[@CLIENTS]` entry of a run's `dataset` setting."""

    spec: str
    clients: int | None


def parse_dataset_list(text: str) -> list[DatasetEntry]:
    """Parses `"fer2013=/d/fer@6;rafdb=/d/raf@4"` into entries; a missing `@N` leaves the client count open.

    Raises:
        ValueError: an empty entry or a client count that is not a positive integer (the message names it).
    """
    entries = []
    for raw in text.split(";"):
        raw = raw.strip()
        if not raw:
            raise ValueError(f"empty dataset entry in {text!r}")
        spec, sep, count = raw.rpartition("@")
        if not sep:
            entries.append(DatasetEntry(raw, None))
            continue
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"dataset entry {raw!r}: the client count after '@' must be a positive integer")
        entries.append(DatasetEntry(spec, int(count)))
    return entries


@functools.lru_cache(maxsize=4)
def cached_dataset(spec: str, image_size: int, seed: int) -> FERDataset:
    """Loads a dataset once per process: simulated clients and repeated rounds reuse the decoded arrays."""
    return load_dataset(spec, image_size=image_size, seed=seed)


def stratified_holdout(labels: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices into (train, test) with about `fraction` of every class in test.

    Per-class rounding keeps every class that has at least two samples present on both sides, so a small
    node's local test set still covers what it trains on.
    """
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * fraction))
        if fraction > 0 and len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train = np.sort(np.concatenate(train_idx)) if train_idx else np.zeros(0, np.int64)
    test = np.sort(np.concatenate(test_idx)) if test_idx else np.zeros(0, np.int64)
    return train, test


def node_data_from_indices(
    dataset: FERDataset, indices: np.ndarray, *, client_id: str, test_fraction: float, seed: int
) -> NodeData:
    """Builds a node's data from a subset of a dataset's train split, holding out a local test set."""
    split = dataset.splits["train"]
    labels = split.labels[indices]
    local_train, local_test = stratified_holdout(labels, fraction=test_fraction, seed=seed)
    return NodeData(
        client_id=client_id,
        train_images=split.images[indices[local_train]],
        train_labels=labels[local_train],
        test_images=split.images[indices[local_test]],
        test_labels=labels[local_test],
        synthetic=dataset.synthetic,
    )


def load_node_data(*, spec: str, client_id: str, image_size: int, seed: int, test_fraction: float) -> NodeData:
    """A real node's data: its dataset's train split, and its test split when it has one (else a holdout)."""
    dataset = cached_dataset(spec, image_size, seed)
    train = dataset.splits["train"]
    if "test" in dataset.splits and len(dataset.splits["test"].labels) > 0:
        test = dataset.splits["test"]
        return NodeData(
            client_id=client_id,
            train_images=train.images,
            train_labels=train.labels,
            test_images=test.images,
            test_labels=test.labels,
            synthetic=dataset.synthetic,
        )
    return node_data_from_indices(
        dataset, np.arange(len(train.labels)), client_id=client_id, test_fraction=test_fraction, seed=seed
    )
