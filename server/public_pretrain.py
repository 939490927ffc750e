"""Public pretraining (`public-fraction`): the server trains round 0's model on a public slice of the run's training
data before round 1, so the sites fine-tune privately from a model that already knows faces.

For studies without a second dataset, the slice is carved from the run's own training split: a stratified fraction
F of every class, drawn with the run's seed (client.node_data.stratified_holdout, the split every local test set
uses). The slice belongs to no site: simulation.federation partitions only the rest, and partition.json records
the slice (`public_slice`). In a deployment the slice comes from the coordinator's own `dataset` (public faces it
holds), never from a site.

The pretraining is ordinary, non-private training with the model's recipe (client.task's loops, the ones every
client and the centralised baseline use): the data is public, so DP-SGD would protect nothing. Those steps are
therefore not counted in any epsilon, and privacy.json says which data was public (privacy.report.PublicData).
Plain Python and torch: nothing here knows about Flower.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from client import task, wire
from client.config import RunSettings, parse_label_prior
from client.data.labels import NUM_CLASSES
from client.node_data import cached_dataset, parse_dataset_list, stratified_holdout
from models import create_model
from privacy.report import PublicData, PublicSlice

log = logging.getLogger("fer_fl.server")


@dataclass(frozen=True)
class PublicSplit:
    """One dataset's training split cut in two: the public slice and what the sites share (indices into the
    dataset's train split, sorted)."""

    dataset: str
    public: np.ndarray
    private: np.ndarray


def public_split(settings: RunSettings, spec: str) -> PublicSplit:
    """The split of dataset `spec` (one entry of the run's `dataset`): a stratified public-fraction of each class
    is public, seeded by the run's seed and the entry's position; with public-fraction 0 every sample is private."""
    labels = cached_dataset(spec, settings.image_size, settings.seed).splits["train"].labels
    if settings.public_fraction <= 0:
        return PublicSplit(spec, np.zeros(0, np.int64), np.arange(len(labels), dtype=np.int64))
    position = [entry.spec for entry in parse_dataset_list(settings.dataset)].index(spec)
    private, public = stratified_holdout(labels, fraction=settings.public_fraction, seed=settings.seed + position)
    return PublicSplit(spec, public.astype(np.int64), private.astype(np.int64))


def public_slices(settings: RunSettings) -> tuple[PublicSlice, ...]:
    """The public slice of each of the run's datasets, as privacy.json and partition.json record them."""
    if settings.public_fraction <= 0:
        return ()
    slices = []
    for entry in parse_dataset_list(settings.dataset):
        split = public_split(settings, entry.spec)
        labels = cached_dataset(entry.spec, settings.image_size, settings.seed).splits["train"].labels
        counts = np.bincount(labels[split.public], minlength=NUM_CLASSES)
        slices.append(PublicSlice(dataset=entry.spec, faces=int(len(split.public)),
                                  per_class=tuple(int(n) for n in counts)))
    return tuple(slices)


def public_data(settings: RunSettings) -> PublicData | None:
    """What round 0's model learnt in the clear: the public slices and the init-model, or None for neither."""
    if settings.public_fraction <= 0 and not settings.init_model:
        return None
    from server.init_model import init_model_dataset, public_start_warning

    slices = public_slices(settings)
    return PublicData(
        slices=slices, pretrain_epochs=settings.public_epochs if slices else None,
        server_learning=settings.server_learning and bool(slices),
        head_refit=settings.head_refit and bool(slices),
        init_model=settings.init_model or None,
        init_model_dataset=init_model_dataset(settings) if settings.init_model else None,
        warning=public_start_warning(settings),
    )


def public_training_data(settings: RunSettings) -> tuple[np.ndarray, np.ndarray, bool]:
    """The public slices' faces and labels, pooled over the run's datasets, and whether any is synthetic."""
    images, labels, synthetic = [], [], False
    for entry in parse_dataset_list(settings.dataset):
        dataset = cached_dataset(entry.spec, settings.image_size, settings.seed)
        split = public_split(settings, entry.spec)
        images.append(dataset.splits["train"].images[split.public])
        labels.append(dataset.splits["train"].labels[split.public])
        synthetic = synthetic or dataset.synthetic
    return np.concatenate(images), np.concatenate(labels), synthetic


def pretrain_on_public(settings: RunSettings, weights: list[np.ndarray]) -> list[np.ndarray]:
    """Round 0's weights after public-epochs epochs of the model's recipe on the public slices, starting from
    `weights` (the seeded random model or the init-model); `weights` unchanged without a public slice.

    Seeded by the run's seed (the same run gives the same round 0); the recipe's schedule runs over the
    pretraining as over one round, with public-batch-size and public-lr (0: the run's batch-size and lr).
    """
    if settings.public_fraction <= 0:
        return weights
    images, labels, synthetic = public_training_data(settings)
    torch.manual_seed(settings.seed)
    model = create_model(settings.model, dp=True)
    wire.set_weights(model, weights)
    # The pretraining's values as the run's own, so RunSettings.recipe stays the one place lr overrides the recipe.
    own = settings.replace(lr=settings.public_lr or settings.lr,
                           batch_size=settings.public_batch_size or settings.batch_size)
    result = task.train_round(model, images, labels, recipe=own.recipe(synthetic=synthetic),
                              batch_size=own.batch_size, seed=settings.seed, server_round=1, num_rounds=1,
                              epochs=settings.public_epochs, label_prior=target_label_prior(settings))
    log.info("public pretraining: %d public faces, %d epochs, %d steps, train loss %.4f (not private, no epsilon)",
             len(labels), settings.public_epochs, result.steps, result.loss)
    return wire.get_weights(model)


def target_label_prior(settings: RunSettings) -> tuple[float, ...] | None:
    """The label mix logit-adjust trains towards (RunSettings.label_prior) as frequencies; None when the run's
    recipe does not logit-adjust.

    "public" is the public slices' label mix (`public_slices`, the counts privacy.json records) with one pseudo-count
    per class (a tiny slice may lack a class, and the target must be positive); it is what the coordinator already
    holds in the clear, so sending it to the sites in the fit config discloses nothing of theirs.
    """
    if settings.recipe().class_balance != "logit-adjust":
        return None
    if settings.label_prior == "uniform":
        return (1.0 / NUM_CLASSES,) * NUM_CLASSES
    if settings.label_prior != "public":
        return parse_label_prior(settings.label_prior)
    counts = np.ones(NUM_CLASSES) + sum(np.asarray(piece.per_class) for piece in public_slices(settings))
    return tuple(float(c) for c in counts / counts.sum())
