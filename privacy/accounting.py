"""Privacy accounting: noise calibration and ε for local DP-SGD and for central (client-level) DP.

Everything here is a pure function of a history of Poisson-subsampled Gaussian mechanisms, each
``(noise_multiplier σ, sample_rate q, steps)``, evaluated with Opacus's accountants. The history is
mechanism-agnostic, which is what lets the ledger store it and any later process restore it: the ε of a
federation is the composition of every step any round ever took, not the ε of the last round.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")

HistoryEntry = tuple[float, float, int]


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must lie strictly between 0 and 1, got {delta!r}")


def _check_sample_rate(rate: float, *, name: str = "sample_rate") -> None:
    if not (0.0 < rate <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {rate!r}")


def _check_count(value: object, *, name: str, positive: bool) -> None:
    """A bool is no count, and steps or rounds come in whole numbers (a float such as 3.0 passes)."""
    if isinstance(value, bool) or int(value) != value or value < int(positive):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} integer, got {value!r}")


def merge_history(history: Sequence[Sequence[float]]) -> list[HistoryEntry]:
    """Validates a history and merges adjacent entries with the same (σ, q).

    Merging is what Opacus's own accountants do step by step; doing it here too makes three rounds of
    ``(σ, q, s)`` evaluate exactly like one ``(σ, q, 3s)`` (the PRV accountant's discretisation
    depends on how the history is split), so the ε of the planned federation equals the calibration
    target it was solved for.

    Args:
        history: Entries ``(noise_multiplier, sample_rate, steps)``.

    Returns:
        The merged history as a list of tuples; entries with zero steps are dropped.

    Raises:
        ValueError: An entry with σ ≤ 0, q outside (0, 1], or negative or non-integer steps.
    """
    merged: list[HistoryEntry] = []
    for index, entry in enumerate(history):
        if len(entry) != 3:
            raise ValueError(f"history[{index}] must be (noise_multiplier, sample_rate, steps), got {entry!r}")
        sigma, rate, steps = float(entry[0]), float(entry[1]), entry[2]
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"history[{index}] noise_multiplier must be positive, got {sigma!r}")
        _check_sample_rate(rate, name=f"history[{index}] sample_rate")
        _check_count(steps, name=f"history[{index}] steps", positive=False)
        steps = int(steps)
        if steps == 0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == rate:
            merged[-1] = (sigma, rate, merged[-1][2] + steps)
        else:
            merged.append((sigma, rate, steps))
    return merged


def compute_epsilon(*, history: Sequence[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """ε spent by the composition of every mechanism in ``history`` at the given δ.

    Args:
        history: Entries ``(noise_multiplier, sample_rate, steps)``, in the order they ran.
        delta: Target δ of the (ε, δ) guarantee.
        accountant: ``"rdp"`` (Rényi DP, Opacus's default analysis) or ``"prv"`` (privacy random
            variables; tighter, slower, an upper bound on its own numerical error).

    Returns:
        ε; 0.0 for an empty history.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    merged = merge_history(history)
    if not merged:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = merged
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def _calibrate_cached(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


def calibrate_noise_multiplier(
    *, epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """Smallest σ (to Opacus's 0.01-in-ε search tolerance) whose ``steps`` steps at rate q spend ≤ ε.

    Calibrating against the planned total steps of the whole federation (rounds × local epochs ×
    steps per epoch) is what makes ε a budget for the federation rather than for one round.
    Cached per process because Flower rebuilds the client every round with the same arguments.

    Args:
        epsilon: Target ε for all ``steps`` together.
        delta: Target δ.
        sample_rate: Poisson sampling rate q of each step.
        steps: Total number of noisy steps planned.
        accountant: ``"rdp"`` or ``"prv"``; calibrate with the accountant that will report.

    Returns:
        The noise multiplier σ; ``compute_epsilon`` of ``[(σ, q, steps)]`` is ≤ ``epsilon``.

    Raises:
        ValueError: A parameter out of range, or a budget so small that σ would exceed 10⁶.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
    _check_sample_rate(sample_rate)
    _check_count(steps, name="steps", positive=True)
    return _calibrate_cached(float(epsilon), float(delta), float(sample_rate), int(steps), accountant)


def central_epsilon(
    *, noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """Client-level ε of central DP: Gaussian noise on the sum of clipped client updates.

    Flower's fixed-clipping DP (client-side clipping, server-side noise) clips every update to norm C
    and adds N(0, (σC)²) to the sum (σC/n on the mean), so one round is a Gaussian mechanism of
    noise multiplier σ with respect to adding or removing one client, and sampling a fraction q of the
    clients is subsampling with rate q. Flower samples a fixed number of clients rather than each one
    independently, so the Poisson analysis used here is the standard approximation (exact for q = 1).
    The analysis needs each client to weigh the same in the aggregate (uniform mean, as in McMahan et al.
    2018): with FedAvg weighted by example counts, a client of weight w > 1/n moves the mean by up to
    w·C, so the effective σ is σ/(n·w), smaller than the one passed here.

    Args:
        noise_multiplier: σ, the noise standard deviation over the clipping norm.
        sample_rate: Fraction of clients taking part in each round, in (0, 1].
        rounds: Number of rounds in which the aggregate was released.
        delta: Target δ (for client-level DP, small relative to 1/number of clients).
        accountant: ``"rdp"`` or ``"prv"``.

    Returns:
        ε after ``rounds`` rounds; 0.0 for zero rounds.
    """
    _check_count(rounds, name="rounds", positive=False)
    return compute_epsilon(history=[(noise_multiplier, sample_rate, int(rounds))], delta=delta, accountant=accountant)
