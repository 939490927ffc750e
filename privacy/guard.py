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
    squared_norm = 0.0
    for index, (array, shape) in enumerate(zip(arrays, reference_shapes, strict=True)):
        if tuple(array.shape) != tuple(shape):
            raise UpdateRejected(f"tensor {index} has shape {tuple(array.shape)}, the global model has {tuple(shape)}")
        if not np.issubdtype(array.dtype, np.floating):
            # An integer tensor (e.g. BatchNorm's num_batches_tracked) has no meaningful average delta.
            raise UpdateRejected(f"tensor {index} has dtype {array.dtype}; only floating-point tensors can be sent")
        tensor_squared = _squared_norm(array)
        if not math.isfinite(tensor_squared):
            raise UpdateRejected(f"tensor {index} contains NaN or Inf")
        squared_norm += tensor_squared
    norm = math.sqrt(squared_norm)
    if not math.isfinite(norm):
        raise UpdateRejected("update norm overflows float64; the update is not a plausible model delta")
    if max_norm is None or norm <= max_norm:
        return [np.asarray(array) for array in arrays], GuardInfo(norm, norm, clipped=False, scale=1.0)
    scale = max_norm / norm
    scaled = [(array * scale).astype(array.dtype, copy=False) for array in arrays]
    norm_after = math.sqrt(sum(_squared_norm(array) for array in scaled))
    return scaled, GuardInfo(norm, norm_after, clipped=True, scale=scale)


def _squared_norm(array: NDArray[np.floating]) -> float:
    """Sum of squares; NaN or Inf when the array holds any, since every term is non-negative.

    One BLAS dot product in the array's own precision (a single pass over a 1.2 M-value update); float64 only when
    float32 squares overflow, so that a large but finite update is measured rather than mistaken for Inf.
    """
    flat = array.reshape(-1)
    with np.errstate(over="ignore"):  # an overflow is handled below, not an error
        squared = float(np.dot(flat, flat))
    if math.isinf(squared) and flat.dtype != np.float64 and np.isfinite(flat).all():
        wide = flat.astype(np.float64)
        squared = float(np.dot(wide, wide))
    return squared
