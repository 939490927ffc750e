"""Central (client-level) DP: clients clip their update, the server adds Gaussian noise to the uniform mean.

This is Flower's "client-side fixed clipping" scheme (`fixedclipping_mod` + `DifferentialPrivacyClientSideFixedClipping`)
adapted to this project's update path, for two reasons Flower's own pieces cannot be used as they are:

- our clients send model *deltas* (so secure aggregation quantises small numbers); Flower's `fixedclipping_mod`
  subtracts the global model from what the client returns, which would clip `delta - global` instead of the delta;
- Flower's server wrapper adds noise of std σC/m to whatever the wrapped strategy returns, but FedAvg weights
  clients by their example counts, so one client can move the mean by more than C/m and the stated ε is then too
  small (see `privacy.accounting.central_epsilon`). Here every client weighs the same (DP-FedAvg, McMahan et al.
  2018): a client reports a weight of 1 and its real count in the `train-examples` metric.

The noise is drawn from a generator seeded by the operating system, never from the run's seed: anyone who knows
the published seed could otherwise regenerate the noise and subtract it. Central-DP runs are therefore not
bit-reproducible, by design.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class CentralDP:
    """Server-side settings of central DP.

    Attributes:
        noise_multiplier: σ; the noise std on the sum of clipped updates is σ·clipping_norm.
        clipping_norm: C, the L2 bound every client clips its update to before sending it.
        trainable: per array of the model, True where the run trains the value (`dp-train`, models.finetune
            `trainable_mask`); None trains every value. The rest of the model is public (round 0's) and stays as
            it was: the server keeps it from the previous global model whatever a client sent, and adds no noise
            to it. Why: the noise's norm grows with the square root of the noised dimension while the clipped
            signal stays at most C; CNN-AM's head is 903 values of 1.2 million, 36x less noise on the mean.
    """

    noise_multiplier: float
    clipping_norm: float
    trainable: tuple[np.ndarray, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be positive, got {self.noise_multiplier!r}")
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ValueError(f"clipping_norm must be positive, got {self.clipping_norm!r}")

    def noise_std(self, num_clients: int) -> float:
        """Standard deviation of the noise on the uniform mean of `num_clients` clipped updates: σC/n."""
        if num_clients < 1:
            raise ValueError(f"num_clients must be at least 1, got {num_clients}")
        return self.noise_multiplier * self.clipping_norm / num_clients

    @property
    def noised_values(self) -> int | None:
        """How many values get noise (the trainable ones); None when every value does."""
        return None if self.trainable is None else int(sum(int(mask.sum()) for mask in self.trainable))

    def keep_frozen(self, mean: list[np.ndarray], previous: list[np.ndarray]) -> list[np.ndarray]:
        """`mean` with every value the run does not train taken from `previous` (the global model the updates
        started from): a client that changed a frozen value changes nothing, and no client's data reaches the
        model outside the noised part."""
        if self.trainable is None:
            return mean
        return [np.where(mask, m, p).astype(m.dtype, copy=False) for m, p, mask in zip(mean, previous, self.trainable)]


def add_central_noise(
    mean_update: list[np.ndarray],
    *,
    settings: CentralDP,
    num_clients: int,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Returns `mean_update` plus i.i.d. N(0, (σC/n)²) noise on every trained coordinate (all of them unless
    `settings.trainable` says otherwise); a new list, inputs untouched.

    Args:
        mean_update: the uniform mean of `num_clients` updates, each clipped to `settings.clipping_norm`.
        settings: σ and C.
        num_clients: how many updates the mean is over (the survivors, not the sampled count: a mean over
            fewer clients moves more per client, so it needs the larger noise).
        rng: the generator; None draws a fresh one from operating-system entropy (the production choice).
    """
    generator = rng if rng is not None else np.random.default_rng()
    std = settings.noise_std(num_clients)
    masks = settings.trainable or [None] * len(mean_update)
    noisy = []
    for array, mask in zip(mean_update, masks):
        noise = generator.normal(0.0, std, size=array.shape)
        noisy.append((array + (noise if mask is None else noise * mask)).astype(array.dtype, copy=False))
    return noisy
