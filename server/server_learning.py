"""Server learning (`server-learning`): after each round's aggregation the server trains the new global model on the
public slice, and the server optimiser is told where the global model now is.

Plain Python and torch apart from `follow_global_model`, which knows Flower's server optimisers.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.common import ndarrays_to_parameters
from flwr.server.strategy import FedAvgM, Strategy

from client import task, wire
from client.config import RunSettings
from models import create_model, freeze_for_dp
from server.public_pretrain import public_training_data, target_label_prior

log = logging.getLogger("fer_fl.server")


class ServerLearning:
    """`server-learning`: after each round's aggregation the server trains the new global model on the public slice,
    as a site would train on its own data that round (local-epochs passes over the next 1/local-splits of it, the
    recipe's rate at that round of the schedule, the run's batch-size and logit-adjust target).

    Why: under label skew the averaged model leans towards whatever mix of labels the round's sites held; a few
    steps on a slice with the population's mix pull it back before it is evaluated and sent out again (Mai et al.
    2023, "Federated learning with server learning: enhancing performance for non-IID data"). It touches only the
    aggregate (the sum SecAgg+ reveals, after any central-DP noise) and public faces, so it is post-processing: no
    site's data, no epsilon. The steps are seeded by the run's seed and the round (a rerun gives the same model).

    Args:
        settings: the run's settings (public-fraction > 0).
    """

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self.images, self.labels, synthetic = public_training_data(settings)
        self.recipe = settings.recipe(synthetic=synthetic)
        self.label_prior = target_label_prior(settings)

    def __call__(self, server_round: int, weights: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
        """The global model `weights` after this round's public steps, and their mean training loss."""
        settings = self.settings
        seed = settings.seed + 104_729 * server_round  # a stream of its own: no site's round seed is reused
        torch.manual_seed(seed)
        model = create_model(settings.model, dp=True)
        wire.set_weights(model, weights)
        # The parameters the sites train (dp-train); the rest stay as round 0 left them, as privacy.json says.
        size = settings.image_size
        freeze_for_dp(model, settings.dp_train, input_size=(1, size, size))
        result = task.train_round(model, self.images, self.labels, recipe=self.recipe, batch_size=settings.batch_size,
                                  seed=seed, server_round=server_round, num_rounds=settings.num_server_rounds,
                                  epochs=settings.local_epochs, splits=settings.local_splits,
                                  slice_seed=settings.seed + 104_723,  # the run's stream of public slices
                                  label_prior=self.label_prior)
        faces = result.num_examples // settings.local_epochs  # each pass sees the round's slice once
        log.info("round %d: server learning, %d public faces, %d steps, train loss %.4f (not private, no epsilon)",
                 server_round, faces, result.steps, result.loss)
        return wire.get_weights(model), result.loss


def follow_global_model(inner: Strategy, weights: list[np.ndarray]) -> None:
    """Tells a server optimiser that the global model is now `weights` (after the server's own step).

    Flower's FedAvgM (with momentum or a server rate) keeps the model it last returned in `initial_parameters`, and
    FedOpt (FedAdam, FedYogi) in `current_weights`, and each takes its next pseudo-gradient against that
    copy. Left stale, the server's step would reappear in the next pseudo-gradient, enter the momentum and be
    applied again, amplified (tests/test_strategy.py pins each registered strategy against a run without the step).
    The other strategies aggregate the weights they are given and keep no copy.
    """
    if isinstance(inner, FedAvgM):
        inner.initial_parameters = ndarrays_to_parameters(weights)
    if hasattr(inner, "current_weights"):
        inner.current_weights = [np.array(w, copy=True) for w in weights]
