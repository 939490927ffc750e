"""Training recipes: how each registered model is trained when the run configuration does not say otherwise.

A recipe is typed data the registry records beside each model (`models.model_recipe(name)`); `RunSettings` resolves
every recipe key it leaves at "recipe" from it, so `fer-sim run --model X` trains X the way X was measured to train.

The starting recipe is the one the environment guide measured on this CPU: a 0.3 M-parameter VGG-style net with
SGD Nesterov + one-cycle, flip / affine / erasing augmentation, label smoothing 0.1 and flip averaging reaches about
0.64 on FER2013 PublicTest in 12 epochs, where CNN-AM's Adam-at-3e-4 recipe reaches 0.58 in 15: "the recipe is the
gap". The learning-rate schedule is a function of training *progress* in [0, 1], so the same recipe runs over
epochs (centralized) and over rounds (federated: round r of R covers progress [(r-1)/R, r/R)).

Imports nothing, as everything in `models/` beside torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

SCHEDULES = ("constant", "warmup-cosine", "step")
AUGMENTS = ("none", "light", "strong")
CLASS_BALANCES = ("none", "weights", "sampling", "logit-adjust")
RECIPE_OPTIMIZERS = ("adam", "sgd", "sgd-nesterov")
# Step decay: the learning rate is divided by 10 at each of these fractions of training (the classic 50 % / 75 %).
STEP_MILESTONES = (0.5, 0.75)
# Warm-up starts from this fraction of the peak rather than from 0, so the very first step already moves weights.
WARMUP_START = 0.1


@dataclass(frozen=True)
class TrainingRecipe:
    """How to train one model (non-private runs; DP-SGD keeps its own dp-optimizer / dp-lr / dp-batch-size).

    Attributes:
        optimizer: "adam", "sgd" (momentum 0.9) or "sgd-nesterov" (Nesterov momentum 0.9).
        lr: the peak learning rate (the constant one under schedule "constant").
        schedule: "constant", "warmup-cosine" (linear warm-up from WARMUP_START x lr, then cosine to 0) or "step"
            (warm-up, then lr/10 at each STEP_MILESTONES fraction).
        warmup: the fraction of training spent warming up (0 = none).
        weight_decay: L2 weight decay given to the optimiser.
        label_smoothing: cross-entropy label smoothing; FER2013's labels are noisy (human agreement is about 65 %),
            so a little smoothing keeps the net from fitting the mislabelled faces with full confidence.
        augment: "none", "light" (rotation, zoom, shift, flip, brightness/contrast: the project's earlier default)
            or "strong" (light with wider shifts plus random erasing).
        class_balance: how the rare class (disgust is 1.5 % of FER2013's training set) is handled: "none",
            "weights" (inverse-frequency loss weights), "sampling" (class-balanced sampling) or "logit-adjust"
            (the loss sees the logits plus the log of the site's own label frequencies, so the net learns scores
            free of that site's label mix: client.task.LogitAdjustedLoss; for label-skewed federations,
            docs/benchmarks.md measures where it helps).
        flip_tta: evaluate on the mean of the softmax of each face and its mirror image.
    """

    optimizer: str = "sgd-nesterov"
    lr: float = 0.02
    schedule: str = "warmup-cosine"
    warmup: float = 0.1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    augment: str = "strong"
    class_balance: str = "none"
    flip_tta: bool = True

    def __post_init__(self) -> None:
        for name, value, options in (("optimizer", self.optimizer, RECIPE_OPTIMIZERS),
                                     ("schedule", self.schedule, SCHEDULES), ("augment", self.augment, AUGMENTS),
                                     ("class_balance", self.class_balance, CLASS_BALANCES)):
            if value not in options:
                raise ValueError(f"recipe {name} must be one of {', '.join(options)}; got {value!r}")
        if self.lr <= 0 or not 0 <= self.warmup < 1 or self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError("recipe needs lr > 0, warmup in [0, 1), weight_decay >= 0, label_smoothing in [0, 1)")

    def lr_at(self, progress: float) -> float:
        """The learning rate at `progress` (fraction of training done, clamped to [0, 1])."""
        return scheduled_lr(schedule=self.schedule, peak=self.lr, warmup=self.warmup, progress=progress)

    def round_lr(self, *, server_round: int, num_rounds: int, fraction: float = 0.0) -> float:
        """The learning rate `fraction` of the way through round `server_round` (1-based) of `num_rounds`.

        The schedule runs over rounds: round r covers progress [(r-1)/R, r/R). Each client computes this from the
        round number in the fit config and num-server-rounds in the run config it already holds, so no learning
        rate travels from the server (one source of truth, nothing new on the wire). The centralised baseline
        passes epochs-groups as rounds, so both walk the same curve over the same passes over the data.
        """
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        return self.lr_at((server_round - 1 + fraction) / num_rounds)

    def round_schedule(self, *, server_round: int, num_rounds: int) -> Callable[[float], float]:
        """`round_lr` of one round as a function of the fraction of that round done (what `client.task.train`'s
        `lr_at` takes)."""
        return lambda fraction: self.round_lr(server_round=server_round, num_rounds=num_rounds, fraction=fraction)


def scheduled_lr(*, schedule: str, peak: float, warmup: float, progress: float) -> float:
    """The learning rate of `schedule` at `progress` in [0, 1] (values outside are clamped).

    Args:
        schedule: one of SCHEDULES.
        peak: the largest learning rate, reached at the end of warm-up.
        warmup: fraction of training spent warming up linearly from WARMUP_START x peak (not used by "constant").
        progress: fraction of training done; a federation passes ((round - 1) + step / steps_in_round) / rounds.
    """
    t = min(max(float(progress), 0.0), 1.0)
    if schedule == "constant":
        return peak
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if t < warmup:
        return peak * (WARMUP_START + (1.0 - WARMUP_START) * t / warmup)
    if schedule == "step":
        return peak * 0.1 ** sum(t >= m for m in STEP_MILESTONES)
    return peak * 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / (1.0 - warmup)))
