"""What a client's reply may carry: the checks every update, example count and metric passes before the strategy
sees it, and the norm bound a round's accepted updates may be held to (server/strategy.py's GuardedStrategy
applies them).

A reply is untrusted input: each check returns why it is refused, or None, and never raises on a malformed value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from client.config import DP_TRAIN_MODES
from privacy.accounting import ACCOUNTANTS
from privacy.guard import UpdateRejected, scale_update, update_norm
from privacy.report import DP_METRIC_KEYS


def validate_update(
    arrays: list[np.ndarray],
    *,
    expected_shapes: list[tuple[int, ...]],
    num_examples: int,
    max_norm: float,
    max_examples: int,
) -> str | None:
    """Returns why an update must be rejected, or None if it is acceptable.

    Checks, in order: the number of arrays, each array's shape and dtype (float32), finiteness, the global L2
    norm against `max_norm`, and the example count (a positive integer no larger than `max_examples`).
    """
    if len(arrays) != len(expected_shapes):
        return f"expected {len(expected_shapes)} arrays, got {len(arrays)}"
    for index, (array, shape) in enumerate(zip(arrays, expected_shapes)):
        if tuple(array.shape) != tuple(shape):
            return f"array {index} has shape {tuple(array.shape)}, expected {tuple(shape)}"
        if array.dtype != np.float32:
            return f"array {index} has dtype {array.dtype}, expected float32"
    try:
        norm = update_norm(arrays)
    except UpdateRejected as err:
        return str(err)
    # A tolerance of 0.1 % absorbs float32 rounding of a client that clipped exactly to the bound.
    if norm > max_norm * 1.001:
        return f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    return validate_count(num_examples, max_examples=max_examples)


def validate_count(num_examples: Any, *, max_examples: int) -> str | None:
    """Why a claimed example count must be rejected (not a positive integer up to `max_examples`), or None."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
        return f"num-examples {num_examples!r} is not an integer"
    if num_examples <= 0:
        return f"num-examples {num_examples} is not positive"
    if num_examples > max_examples:
        return f"num-examples {num_examples} exceeds the plausible maximum {max_examples}"
    return None


_MAX_ID_LENGTH = 128


def is_label(value: Any) -> bool:
    """A short printable string: it ends up in logs and metrics.jsonl, so no control characters (log forging)."""
    return isinstance(value, str) and 0 < len(value) <= _MAX_ID_LENGTH and value.isprintable()


def is_finite_number(value: Any) -> bool:
    """A finite int or float; bool is an int in Python but never a measurement."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
    )


def is_count(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 0


def _is_flag(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_)) or (is_count(value) and value in (0, 1))


_Rule = tuple[str, Callable[[Any], bool]]
_LABEL: _Rule = ("a short printable string", is_label)
_NON_NEGATIVE: _Rule = ("a finite number >= 0", lambda v: is_finite_number(v) and v >= 0)
_FRACTION: _Rule = ("a number in [0, 1]", lambda v: is_finite_number(v) and 0 <= v <= 1)
_COUNT: _Rule = ("a non-negative integer", is_count)
_FLAG: _Rule = ("a boolean", _is_flag)

# What a client's fit reply may carry (client/trainer.py); anything else is dropped unread.
FIT_METRICS: dict[str, _Rule] = {
    "client-id": _LABEL,
    "profile": _LABEL,
    "train-loss": _NON_NEGATIVE,
    "train-accuracy": _FRACTION,
    "train-examples": _COUNT,
    "update-norm": _NON_NEGATIVE,
    "update-clipped": _FLAG,
}
# The DP status a node reports (privacy.dp.DPClient.status under privacy.report.DP_METRIC_KEYS): the server compares
# and sums these and writes them to privacy.json, so every key's type is pinned; a dp- key not listed is dropped.
_DP_RULES: dict[str, _Rule] = {
    "client_id": _LABEL,
    "ledger_id": _LABEL,
    "ledger_seq": _COUNT,
    "epsilon_spent": _NON_NEGATIVE,
    "epsilon_budget": _NON_NEGATIVE,
    "delta": _FRACTION,
    "noise_multiplier": _NON_NEGATIVE,
    "max_grad_norm": _NON_NEGATIVE,
    "sample_rate": _FRACTION,
    "steps": _COUNT,
    "accountant": (f"one of {', '.join(ACCOUNTANTS)}", lambda v: isinstance(v, str) and v in ACCOUNTANTS),
    "rounds_charged": _COUNT,
    "secure_mode": _FLAG,
    "dp_train": (f"one of {', '.join(DP_TRAIN_MODES)}", lambda v: isinstance(v, str) and v in DP_TRAIN_MODES),
    "trainable_params": _COUNT,
    "frozen_params": _COUNT,
}
DP_METRICS: dict[str, _Rule] = {DP_METRIC_KEYS[name]: rule for name, rule in _DP_RULES.items()}
EVALUATE_METRICS: dict[str, _Rule] = {
    "client-id": _LABEL,
    "accuracy": _FRACTION,
    "metrics-withheld": _FLAG,
}


def validate_metrics(
    metrics: Any, *, rules: Mapping[str, _Rule], dp_status: bool = False
) -> tuple[dict[str, Any], str | None]:
    """Checks a reply's metrics against `rules`: returns (the known metrics, None) or ({}, why it is rejected).

    A known key with a value of the wrong kind rejects the reply (it is malformed or hostile: a loss of "oops" or
    NaN, a ledger sequence of True); unknown keys are dropped, so nothing the server does not expect reaches an
    aggregator, a log line or the run directory, and a newer client with an extra metric still takes part.
    With `dp_status` (fit replies) the DP status keys (DP_METRICS) are checked too.
    """
    if not isinstance(metrics, Mapping):
        return {}, f"metrics are a {type(metrics).__name__}, not a mapping"
    known: dict[str, Any] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            continue
        rule = rules.get(key) or (DP_METRICS.get(key) if dp_status else None)
        if rule is None:
            continue
        kind, check = rule
        if not check(value):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            return {}, f"metric {key[:_MAX_ID_LENGTH]!r} must be {kind}, got {shown}"
        known[key] = value.item() if isinstance(value, np.generic) else value
    return known, None


def bound_to_median_norm(deltas: list[list[np.ndarray]], *, factor: float) -> tuple[list[list[np.ndarray]], list[int]]:
    """Scales every update whose L2 norm exceeds `factor` x the median norm of `deltas` down to that bound.

    The server-side norm bounding of Sun et al. 2019 ("Can you really backdoor federated learning?"), with the
    bound taken from the round itself: as long as most updates are honest the median norm is an honest norm, so a
    site cannot buy influence by scaling its update, whatever the aggregation rule. It does not help against an
    update that points the wrong way at an honest norm (sign flips, noise); median, trimmed mean and Krum do.

    Returns:
        The bounded deltas (unchanged arrays where within the bound) and the indices of those scaled down.
    """
    norms = [update_norm(delta) for delta in deltas]
    bound = factor * float(np.median(norms))
    bounded, scaled = [], []
    for index, (delta, norm) in enumerate(zip(deltas, norms)):
        if norm > bound > 0:
            bounded.append(scale_update(delta, bound / norm))
            scaled.append(index)
        else:
            bounded.append(delta)
    return bounded, scaled
