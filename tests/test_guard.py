"""The client-side update guard: what may be masked for secure aggregation, and how it is norm-clipped."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.guard import GuardInfo, UpdateRejected, guard_update

SHAPES = [(4, 3), (3,), ()]


def _make_update(scale: float = 1.0) -> list[np.ndarray]:
    """A float32 update whose global L2 norm is 5 * scale (a 3-4-5 triangle spread over the tensors)."""
    first = np.zeros((4, 3), np.float32)
    first[0, 0] = 3.0
    second = np.zeros(3, np.float32)
    second[1] = 4.0
    return [first * scale, second * scale, np.array(0.0, np.float32)]


def test_update_within_bound_passes_unchanged():
    """Norm 5 under a bound of 6: same values, same dtype, norm reported."""
    # Prepare
    update = _make_update()

    # Execute
    guarded, info = guard_update(update, reference_shapes=SHAPES, max_norm=6.0)

    # Assert
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(guarded, update))
    assert info == GuardInfo(norm_before=pytest.approx(5.0), norm_after=pytest.approx(5.0), clipped=False, scale=1.0)


def test_update_over_bound_is_scaled_to_the_bound():
    """Norm 10 with bound 2: every value scaled by 0.2, direction kept, float32 kept."""
    # Prepare
    update = _make_update(scale=2.0)

    # Execute
    guarded, info = guard_update(update, reference_shapes=SHAPES, max_norm=2.0)

    # Assert
    assert info.clipped and info.scale == pytest.approx(0.2)
    assert info.norm_before == pytest.approx(10.0) and info.norm_after == pytest.approx(2.0, rel=1e-6)
    assert guarded[0][0, 0] == pytest.approx(1.2) and guarded[1][1] == pytest.approx(1.6)
    assert all(a.dtype == np.float32 for a in guarded)


def test_no_bound_validates_only():
    """max_norm None: a huge but finite update passes untouched, its norm computed without overflow."""
    # Prepare
    update = _make_update(scale=1e30)

    # Execute
    guarded, info = guard_update(update, reference_shapes=SHAPES, max_norm=None)

    # Assert
    assert info.norm_before == pytest.approx(5e30, rel=1e-6)
    assert not info.clipped and guarded[0][0, 0] == update[0][0, 0]


def _nan(update):
    update[0][1, 2] = np.nan
    return update


def _inf(update):
    update[1][0] = np.inf
    return update


def _wrong_shape(update):
    update[0] = update[0].reshape(3, 4)
    return update


def _missing(update):
    return update[:2]


def _integer(update):
    update[1] = np.array([0, 1, 2], np.int64)
    return update


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_nan, "tensor 0 contains NaN or Inf"),
        (_inf, "tensor 1 contains NaN or Inf"),
        (_wrong_shape, "tensor 0 has shape (3, 4), the global model has (4, 3)"),
        (_missing, "update has 2 tensors, the global model has 3"),
        (_integer, "tensor 1 has dtype int64"),
    ],
)
def test_bad_update_is_rejected_naming_the_tensor(spoil, message):
    """NaN, Inf, a wrong shape, a missing tensor or an integer tensor is refused with a message saying which."""
    # Prepare
    update = spoil(_make_update())

    # Execute / Assert
    with pytest.raises(UpdateRejected) as caught:
        guard_update(update, reference_shapes=SHAPES, max_norm=10.0)
    assert message in str(caught.value)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("inf"), float("nan")])
def test_invalid_bound_is_a_value_error(max_norm):
    """A bound that is not finite and positive is a configuration error, not a rejected update."""
    # Execute / Assert
    with pytest.raises(ValueError, match="max_norm must be a finite positive number"):
        guard_update(_make_update(), reference_shapes=SHAPES, max_norm=max_norm)
