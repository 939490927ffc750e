"""The Flower wire format of a model: its whole `state_dict` as ONE flat float32 vector.

Why one vector: Flower 1.41 ships every array of a message as separate objects, one HTTP request per object on each
hop (SuperLink -> SuperNode -> ClientApp and back). DMSNet-IoT's 242 tensors made 236 objects per message, and
those requests were most of a deployed round's time and what contended for the SuperLink's SQLite lock; one vector
is 4 objects. Every aggregation rule here is element-wise (Krum flattens anyway), and SecAgg+ masks a vector, so
nothing else needs the per-tensor split.

This is the Flower adapter's concern only: the training loops (`client.task`) work on models and their
`state_dict`s and never see this format. The ServerApp, the server's evaluator and the training client pack and
unpack here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """Returns the model's state as ONE flat float32 vector (a one-element list), in `state_dict` order."""
    state = model.state_dict()
    return [np.concatenate([value.detach().cpu().reshape(-1).numpy().astype(np.float32) for value in state.values()])]


def set_weights(model: nn.Module, weights: Sequence[np.ndarray]) -> None:
    """Loads the flat vector `get_weights` produces into `model`; a wrong count or size raises ValueError."""
    state = model.state_dict()
    if len(weights) != 1:
        raise ValueError(f"expected one flat parameter vector, got {len(weights)} arrays")
    flat = np.asarray(weights[0])
    sizes = [value.numel() for value in state.values()]
    if flat.shape != (sum(sizes),):
        raise ValueError(f"parameter vector has shape {flat.shape}, this model needs ({sum(sizes)},)")
    new_state = {}
    offset = 0
    for (name, current), size in zip(state.items(), sizes):
        piece = flat[offset : offset + size].reshape(tuple(current.shape))
        new_state[name] = torch.as_tensor(piece.copy(), dtype=current.dtype)
        offset += size
    model.load_state_dict(new_state, strict=True)
