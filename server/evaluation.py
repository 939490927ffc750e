"""Server-side evaluation of the global model on a held-out test set."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from client import task, wire
from client.data.preprocess import FERTorchDataset
from models import create_model
from server.metrics import classification_metrics


class ServerEvaluator:
    """Evaluates weights on fixed test images: loss, accuracy, macro-F1, per-class recall, confusion matrix.

    Args:
        model_name: registry name of the federation's model (DP build, as clients use).
        images: uint8 (N, H, W) test faces.
        labels: int64 (N,) labels.
        flip_tta: score each face by the mean softmax of the face and its mirror (the run's recipe says).
    """

    def __init__(self, *, model_name: str, images: np.ndarray, labels: np.ndarray, flip_tta: bool = False,
                 batch_size: int = 256) -> None:
        self.model = create_model(model_name, dp=True)
        self.loader = DataLoader(FERTorchDataset(images, labels), batch_size=batch_size)
        self.flip_tta = flip_tta

    def __call__(self, server_round: int, weights: list[np.ndarray]) -> tuple[float, dict[str, Any]]:
        wire.set_weights(self.model, weights)
        with torch.inference_mode():
            result = task.evaluate(self.model, self.loader, flip_tta=self.flip_tta)
        metrics = classification_metrics(result.targets, result.predictions)
        return result.loss, metrics
