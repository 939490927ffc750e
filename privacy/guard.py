"""The last check an update passes on the client before it is masked for secure aggregation.

Under SecAgg+ the server only ever sees the sum of masked integer vectors, so it cannot tell a NaN, a wrongly shaped
tensor or a huge value from a good update: Flower 1.41's quantiser turns NaN into finite garbage and clips values
beyond `clipping_range` without a word. Whatever must be refused therefore has to be refused here, where the
update is still in the clear, and the L2 norm clip that bounds it (so the quantiser never has to clip) happens here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


class UpdateRejected(ValueError):
    """An update that must not leave the client: non-finite, mis-shaped or not floating point."""


@dataclass(frozen=True)
class GuardInfo:
    """What `guard_update` did, in plain numbers a client can put into its metrics.

    Attributes:
        norm_before: Global L2 norm of the update as it arrived.
        norm_after: Global L2 norm of the update as returned (<= max_norm when a bound was given).
        clipped: Whether the update was scaled down.
        scale: The factor applied (1.0 when not clipped).
    """

    norm_before: float
    norm_after: float
    clipped: bool
    scale: float


def guard_update(
    arrays: Sequence[NDArray[np.floating]],
    *,
    reference_shapes: Sequence[tuple[int, ...]],
    max_norm: float | None,
) -> tuple[list[NDArray[np.floating]], GuardInfo]:
    """Validates an update and scales it to a global L2 norm of at most `max_norm`.

    Args:
        arrays: The update, one array per model tensor (a model delta, new minus global).
        reference_shapes: The shapes the server's global model has, in the same order.
        max_norm: Bound on the global L2 norm over all arrays; None validates without clipping.

    Returns:
        The (possibly scaled) arrays, with their dtypes kept, and a `GuardInfo`.

    Raises:
        UpdateRejected: on a count or shape mismatch, a non-floating dtype or any NaN/Inf, naming the tensor.
        ValueError: when `max_norm` is not a finite positive number.
    """
    if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite positive number, got {max_norm!r}")
    if len(arrays) != len(reference_shapes):
        raise UpdateRejected(f"update has {len(arrays)} tensors, the global model has {len(reference_shapes)}")
    for index, (array, shape) in enumerate(zip(arrays, reference_shapes, strict=True)):
        if tuple(array.shape) != tuple(shape):
            raise UpdateRejected(f"tensor {index} has shape {tuple(array.shape)}, the global model has {tuple(shape)}")
        if not np.issubdtype(array.dtype, np.floating):
            # An integer tensor (e.g. BatchNorm's num_batches_tracked) has no meaningful average delta.
            raise UpdateRejected(f"tensor {index} has dtype {array.dtype}; only floating-point tensors can be sent")
    norm = update_norm(arrays)
    if max_norm is None or norm <= max_norm:
        return [np.asarray(array) for array in arrays], GuardInfo(norm, norm, clipped=False, scale=1.0)
    scale = max_norm / norm
    scaled = scale_update(arrays, scale)
    norm_after = math.sqrt(sum(_squared_norm(array) for array in scaled))
    return scaled, GuardInfo(norm, norm_after, clipped=True, scale=scale)


def update_norm(arrays: Sequence[NDArray[np.floating]]) -> float:
    """The global L2 norm of an update, refusing one that holds NaN or Inf.

    The one finiteness and norm check of the project: the client bounds its update with it (client/trainer.py),
    the SecAgg+ guard above and the server's validation and median-norm bounding (server/strategy.py) measure with
    it, so a client that clipped exactly to a bound is measured the same way by the server.

    Raises:
        UpdateRejected: a tensor holds NaN or Inf (naming it), or the norm overflows float64.
    """
    squared_norm = 0.0
    for index, array in enumerate(arrays):
        tensor_squared = _squared_norm(np.asarray(array))
        if not math.isfinite(tensor_squared):
            raise UpdateRejected(f"tensor {index} contains NaN or Inf")
        squared_norm += tensor_squared
    norm = math.sqrt(squared_norm)
    if not math.isfinite(norm):
        raise UpdateRejected("update norm overflows float64; the update is not a plausible model delta")
    return norm


def scale_update(arrays: Sequence[NDArray[np.floating]], scale: float) -> list[NDArray[np.floating]]:
    """Every array times `scale`, each keeping its dtype (a float32 update stays float32 on the wire)."""
    return [(np.asarray(array) * scale).astype(np.asarray(array).dtype, copy=False) for array in arrays]


def _squared_norm(array: NDArray[np.floating]) -> float:
    """Sum of squares in float64; NaN or Inf when the array holds any, since every term is non-negative.

    One BLAS dot product over a float64 copy. Float32 accumulation gave a norm 3e-5 (relative) away from the float64
    one on the model delta of tests/test_client_app.py, more than the client/server agreement on a clipped norm
    should rest on, and float32 squares overflow for large but finite values.
    """
    flat = np.asarray(array).reshape(-1).astype(np.float64, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):  # NaN/Inf are reported by the caller, not raised here
        return float(np.dot(flat, flat))
