"""The classifier's re-fit on the public slice at the end of a run (`head-refit`).

Plain Python and torch: the federated run (server/strategy.py, in its last round) and the centralised baseline
(simulation/centralized.py, after its last round) call the same `HeadRefit`, so both sides of a comparison take the
same step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from client import refit, wire
from client.config import RunSettings
from models import create_model
from server.public_pretrain import public_training_data
from server.records import HeadRefitRecord

log = logging.getLogger("fer_fl.server")

Evaluate = Callable[[list[np.ndarray]], dict[str, Any] | None]


class HeadRefit:
    """`head-refit`: re-fits the model's linear classifier on the public slice, the rest of the model frozen
    (client/refit.py refit_classifier, which says why).

    It reads only the model the run produced and public faces the coordinator holds in the clear, so it is
    post-processing: no site's data, no epsilon (privacy.json names the public slice). Deterministic: L-BFGS on
    fixed embeddings, no randomness.

    Args:
        settings: the run's settings (public-fraction > 0).
    """

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self.images, self.labels, synthetic = public_training_data(settings)
        self.flip = settings.recipe(synthetic=synthetic).flip_tta

    def __call__(self, weights: list[np.ndarray], *, evaluate: Evaluate | None = None
                 ) -> tuple[list[np.ndarray], HeadRefitRecord]:
        """`weights` with the classifier re-fitted, and the record of the step.

        Args:
            weights: the model as training left it (the server-ema average where there is one).
            evaluate: scores weights on the server's test set, for the record's `server_before`; None for none.
        """
        model = create_model(self.settings.model, dp=True)
        wire.set_weights(model, weights)
        result = refit.refit_classifier(model, self.images, self.labels, l2=self.settings.head_refit_l2,
                                        flip=self.flip)
        log.info("head re-fit on %d public faces (l2 %g): loss %.4f -> %.4f (not private, no epsilon)",
                 result.num_examples, self.settings.head_refit_l2, result.loss_before, result.loss_after)
        record = HeadRefitRecord(public_faces=result.num_examples, l2=self.settings.head_refit_l2,
                                 loss_before=result.loss_before, loss_after=result.loss_after,
                                 server_before=evaluate(weights) if evaluate is not None else None)
        return wire.get_weights(model), record
