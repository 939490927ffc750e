"""An exponential moving average of the global model over rounds (`server-ema`, issue 13 item 3).

De et al. 2022 ("Unlocking high-accuracy differentially private image classification through scale", section 3.3)
average DP-SGD's iterates: each step carries fresh noise, and the average of the last iterates carries less of it
than any one of them. In a federation the server sees one new global model a round, so the average runs over
rounds: after round t it holds `ema = d * ema + (1 - d) * global_t`. The global models are what the server
already releases, so the average is post-processing and costs no privacy (local or central DP alike).

Training goes on from the raw global model; the average is what the server evaluates each round, what the run
saves as its model and what it delivers. Checkpoints keep the raw model (what training resumes from); a resumed
run starts its average afresh at the checkpoint.

The decay warms up as TensorFlow's ExponentialMovingAverage does with `num_updates`: d_t = min(decay,
(1 + t) / (10 + t)). A federation runs tens of rounds, not the thousands of steps a DP-SGD run averages over; with
a fixed d = 0.9 the round-0 model would still weigh 0.9**5 = 0.59 after five rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def ema_decay(*, decay: float, updates: int) -> float:
    """The decay used for the `updates`-th update (1-based): `decay`, warmed up over the first rounds."""
    return min(decay, (1 + updates) / (10 + updates))


@dataclass
class ParameterEMA:
    """The running average of the global model's arrays.

    Args:
        decay: the largest decay (0 < decay < 1); early updates use less (see ema_decay).
        weights: the model the average starts from (round 0's, or a resumed run's checkpoint).
    """

    decay: float
    weights: list[np.ndarray]
    updates: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.decay < 1:
            raise ValueError(f"server-ema must be in (0, 1) (0 = off), got {self.decay}")
        self.weights = [np.array(w, dtype=w.dtype, copy=True) for w in self.weights]

    def update(self, weights: list[np.ndarray]) -> list[np.ndarray]:
        """Moves the average towards the new global `weights`; returns the average (the caller's arrays are not
        kept). Integer arrays (counters) take the new value: an average of them means nothing."""
        if len(weights) != len(self.weights):
            raise ValueError(f"the global model has {len(weights)} arrays, the average {len(self.weights)}")
        self.updates += 1
        d = ema_decay(decay=self.decay, updates=self.updates)
        self.weights = [
            (d * old + (1 - d) * new).astype(old.dtype) if np.issubdtype(old.dtype, np.floating)
            else np.array(new, copy=True)
            for old, new in zip(self.weights, weights)
        ]
        return self.weights
