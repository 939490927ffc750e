"""Local training and evaluation loops. Plain PyTorch: nothing here knows about Flower, Messages or Contexts, nor
how weights travel (that is `client.wire`, the Flower adapter's): the loops work on models and their state_dicts.

The same loops serve centralised baselines, simulated clients and real hospital nodes, so a difference between a
federated and a centralised result can only come from federation itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class TrainResult:
    """What one call to `train` did; all plain numbers so any caller can report them."""

    loss: float
    accuracy: float
    num_examples: int
    steps: int


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int
    predictions: np.ndarray
    targets: np.ndarray


def make_optimizer(model: nn.Module, *, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Builds the local optimiser. Adam is the CNN-AM paper's choice; SGD is the usual choice under DP-SGD."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: adam, sgd")


def train(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module | None = None,
    proximal_mu: float = 0.0,
    reference: Sequence[torch.Tensor] | None = None,
    device: str = "cpu",
) -> TrainResult:
    """Trains `model` in place for `epochs` passes over `loader`.

    Args:
        model: the model to train (already on `device`).
        loader: yields (images, labels) batches; under DP-SGD this is Opacus's Poisson-sampled loader, whose
            batches can be empty: those still take an optimiser step (the noise is added and the step counted,
            exactly as the accountant assumed) but do not count in the loss and accuracy.
        epochs: local epochs.
        optimizer: the optimiser, possibly wrapped by Opacus.
        criterion: the loss; defaults to cross-entropy (Opacus's ghost clipping supplies its own wrapper).
        proximal_mu: FedProx's μ; adds μ/2·‖w − w_global‖² so heterogeneous clients drift less from the global model.
        reference: the global parameters the proximal term pulls towards (same order as `model.parameters()`).
        device: torch device.
    """
    if proximal_mu > 0 and reference is None:
        raise ValueError("proximal_mu > 0 needs the reference (global) parameters")
    criterion = criterion or nn.CrossEntropyLoss()
    model.train()
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = model(images)
            loss = criterion(logits, labels)
            if proximal_mu > 0:
                prox = sum(((p - r) ** 2).sum() for p, r in zip(params, reference))
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            optimizer.step()
            steps += 1
            if len(labels) == 0:
                continue
            total_loss += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
    if seen == 0:
        return TrainResult(loss=float("nan"), accuracy=0.0, num_examples=0, steps=steps)
    return TrainResult(loss=total_loss / seen, accuracy=correct / seen, num_examples=seen, steps=steps)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, device: str = "cpu") -> EvalResult:
    """Evaluates `model` on `loader`: mean cross-entropy, accuracy, and every prediction for richer metrics."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    model.eval()
    total_loss, preds, targets = 0.0, [], []
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        total_loss += float(criterion(logits, labels))
        preds.append(logits.argmax(1).cpu().numpy())
        targets.append(labels.cpu().numpy())
    if not targets:
        return EvalResult(float("nan"), 0.0, 0, np.zeros(0, np.int64), np.zeros(0, np.int64))
    y_pred, y_true = np.concatenate(preds), np.concatenate(targets)
    return EvalResult(
        loss=total_loss / len(y_true),
        accuracy=float((y_pred == y_true).mean()),
        num_examples=len(y_true),
        predictions=y_pred.astype(np.int64),
        targets=y_true.astype(np.int64),
    )
