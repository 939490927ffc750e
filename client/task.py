"""Local training and evaluation loops. Plain PyTorch: nothing here knows about Flower, Messages or Contexts, nor
how weights travel (that is `client.wire`, the Flower adapter's): the loops work on models and their state_dicts.

The same loops serve centralised baselines, simulated clients and real hospital nodes, so a difference between a
federated and a centralised result can only come from federation itself.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from client.data.labels import NUM_CLASSES
from client.data.preprocess import FERTorchDataset, make_augment
from models.recipe import TrainingRecipe


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
    """Builds the local optimiser. Adam is the CNN-AM paper's choice; SGD is the usual choice under DP-SGD;
    SGD with Nesterov momentum is the recipes' choice (models/recipe.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name in ("sgd", "sgd-nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=name == "sgd-nesterov")
    raise ValueError(f"unknown optimizer {name!r}; known: adam, sgd, sgd-nesterov")


@dataclass(frozen=True)
class LocalTraining:
    """What `train` needs for one round of a recipe (non-private runs; DP-SGD builds its own through Opacus)."""

    loader: DataLoader
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    lr_at: Callable[[float], float]


def prepare_training(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, recipe: TrainingRecipe,
                     batch_size: int, seed: int, server_round: int, num_rounds: int,
                     label_prior: Sequence[float] | None = None, num_workers: int = 0) -> LocalTraining:
    """The loader, optimiser, loss and round schedule of `recipe` for round `server_round` of `num_rounds`.

    One implementation for federated clients (client.trainer) and the centralised baseline (simulation.centralized),
    so a gap between them can only come from federation. The augmentation is seeded by `seed` (the same seed gives
    the same batches), class balancing uses these labels only (the site's own data), and the optimiser is built
    fresh, as every client builds it each round; its momentum restarts with the round. `label_prior` is the
    label mix logit-adjust trains towards (RunSettings.label_prior, resolved by the server; None = uniform).
    `num_workers` > 0 augments in that many loader processes (a GPU run, whose one CPU core cannot feed it; the
    augmentation then also depends on the worker layout, see FERTorchDataset).
    """
    augment = make_augment(recipe.augment)
    dataset = FERTorchDataset(images, labels, augment=augment, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    sampler = class_balanced_sampler(labels, generator=generator) if recipe.class_balance == "sampling" else None
    loader = DataLoader(dataset, batch_size=min(batch_size, max(1, len(dataset))), shuffle=sampler is None,
                        sampler=sampler, generator=generator if sampler is None else None, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    weights = class_weights(labels, num_classes=NUM_CLASSES) if recipe.class_balance == "weights" else None
    if recipe.class_balance == "logit-adjust":  # the site's own label mix goes into the loss, not the weights
        shift = label_log_prior(labels, num_classes=NUM_CLASSES)
        if label_prior is not None:
            shift = shift - torch.log(torch.as_tensor(label_prior, dtype=torch.float32))
        criterion = LogitAdjustedLoss(shift, label_smoothing=recipe.label_smoothing)
    else:
        criterion = make_criterion(label_smoothing=recipe.label_smoothing, class_weights=weights)
    return LocalTraining(
        loader=loader,
        optimizer=make_optimizer(model, name=recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay),
        criterion=criterion,
        lr_at=recipe.round_schedule(server_round=server_round, num_rounds=num_rounds),
    )


def round_slice(num_examples: int, *, splits: int, seed: int, server_round: int) -> np.ndarray:
    """The indices a site trains on in round `server_round` under `local-splits`: part (round - 1) mod splits of a
    permutation of its examples drawn from `seed` for epoch (round - 1) // splits, in ascending order (at least
    one index). splits 1 = every example.

    Why parts of one permutation, not a fresh random slice each round: then `splits` consecutive rounds train every
    example exactly once, as an epoch of the centralised run does, so "10 passes" means each face 10 times at every
    site. Independent slices leave a face out of 8 rounds at 1/8 with probability (7/8)^8 = 0.34 and show others
    two or three times. `seed` must therefore be the same in every round of a run (the node's slice seed).
    """
    if splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    if splits == 1 or num_examples == 0:
        return np.arange(num_examples)
    epoch, part = divmod(max(server_round, 1) - 1, splits)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    rows = order[part * num_examples // splits:(part + 1) * num_examples // splits]
    return np.sort(rows if rows.size else order[[part % num_examples]])


def make_criterion(*, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> nn.Module:
    """The training loss: cross-entropy with the recipe's label smoothing and optional class weights."""
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)


def label_log_prior(labels: np.ndarray, *, num_classes: int) -> torch.Tensor:
    """log of the label frequencies of `labels`; -inf for a class they lack (LogitAdjustedLoss leaves it out)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    with np.errstate(divide="ignore"):
        return torch.tensor(np.log(counts / max(counts.sum(), 1.0)), dtype=torch.float32)


class LogitAdjustedLoss(nn.CrossEntropyLoss):
    """Cross-entropy on logits + log π_site − log π_target: the site's own label mix π_site (`label_log_prior`) is
    added inside the loss, the target mix π_target taken out (prepare_training passes the shift, `log_prior`).

    Why: under label skew a site's plain cross-entropy teaches the shared head its own label mix (a site of mostly
    happy faces raises "happy" everywhere), and averaging sites with opposite mixes fights over the head. With the
    shift inside the loss, the logits every site learns estimate log p(face | emotion) + log π_target, the same
    quantity at every site (the logit-adjusted loss of Menon et al., ICLR 2021; balanced softmax, Ren et al.,
    NeurIPS 2020; applied per site as in FedLC, Zhang et al., ICML 2022). Where a site's mix is the target mix
    (centralised training on the pooled data, public pretraining) the shift is 0 and this is plain cross-entropy.

    The target matters: with a uniform target the net is a classifier for balanced emotions, and a weak one then
    over-predicts rare classes (measured: CNN-AM deep pretrained 3 epochs on FER2013's 20 % public slice scored 0.04
    on PublicTest, predicting disgust), so RunSettings.label_prior defaults to the public slice's mix.

    A class the site lacks has prior 0, so it leaves the softmax: its logit gets no gradient at all, and label
    smoothing spreads over the classes the site holds. With a pseudo-count instead, an absent class's softmax stays
    below label smoothing's target for it (0.1 / 7), so every site lacking the class would keep raising its logit.
    """

    def __init__(self, log_prior: torch.Tensor, *, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
        self.register_buffer("log_prior", log_prior)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        held = torch.isfinite(self.log_prior).to(logits.device)
        log_p = torch.log_softmax(logits[:, held] + self.log_prior.to(logits.device)[held], dim=1)
        column = torch.cumsum(held.long(), 0)[labels] - 1  # each label's column among the held classes
        per_face = -(1 - self.label_smoothing) * log_p.gather(1, column[:, None]).squeeze(1)
        per_face = per_face - self.label_smoothing * log_p.mean(1)
        if self.reduction == "none":
            return per_face
        return per_face.sum() if self.reduction == "sum" else per_face.mean()


def not_true_distillation(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                          tau: float) -> torch.Tensor:
    """tau² · KL(teacher ‖ student) over each face's not-true classes, at temperature tau; mean over faces.

    Why: under label skew a site forgets what the global model knew about the classes it holds few of; its true-class
    signal is its own to learn, but the ranking of the other classes is global knowledge. Distilling only the
    not-true classes keeps that knowledge without holding the site back on its own labels (FedNTD, Lee et al.,
    NeurIPS 2022; tau 3 and weight 1 are the paper's defaults).
    """
    classes = logits.shape[1]
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], False)
    student = torch.log_softmax(logits[keep].view(-1, classes - 1) / tau, dim=1)
    target = torch.softmax(teacher_logits[keep].view(-1, classes - 1) / tau, dim=1)
    return tau ** 2 * nn.functional.kl_div(student, target, reduction="batchmean")


def class_weights(labels: np.ndarray, *, num_classes: int) -> torch.Tensor:
    """Inverse-frequency loss weights, normalised to mean 1 over the classes present (absent classes weigh 0).

    A class with n_c of N examples weighs N / (K · n_c), K the number of present classes: every present class then
    contributes equally to the loss, which is what makes FER2013's 1.5 % disgust visible to the gradient.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def class_balanced_sampler(labels: np.ndarray, *, generator: torch.Generator) -> torch.utils.data.Sampler:
    """Draws len(labels) examples per epoch with replacement, each class equally likely (the rare class repeats)."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    weights = torch.tensor(1.0 / counts[labels], dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(labels), replacement=True,
                                                  generator=generator)


def train(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module | None = None,
    proximal_mu: float = 0.0,
    reference: Sequence[torch.Tensor] | None = None,
    lr_at: Callable[[float], float] | None = None,
    teacher: nn.Module | None = None,
    distill_beta: float = 0.0,
    distill_tau: float = 3.0,
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
        lr_at: the learning-rate schedule over this call: lr_at(f) is the rate of the step taken when a fraction f
            of this call's steps is done (set on every parameter group before each step); None keeps the
            optimiser's rate. Callers map f to their own progress (a round's slice of the run, see
            models.recipe.TrainingRecipe.round_schedule).
        teacher: the global model as the round received it (frozen): with `distill_beta` > 0 each step adds
            distill_beta · `not_true_distillation` towards its predictions (FedNTD).
        distill_beta: the weight of that term (0 = off).
        distill_tau: its temperature.
        device: torch device.
    """
    if proximal_mu > 0 and reference is None:
        raise ValueError("proximal_mu > 0 needs the reference (global) parameters")
    if distill_beta > 0 and teacher is None:
        raise ValueError("distill_beta > 0 needs the teacher (global) model")
    criterion = criterion or nn.CrossEntropyLoss()
    model.train()
    total_loss, correct, seen, samples, steps = 0.0, 0, 0, 0, 0
    params = [p for p in model.parameters() if p.requires_grad]
    total_steps = max(1, epochs * len(loader)) if lr_at is not None else 1
    for _ in range(epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            samples += len(labels)
            if images.dim() == 5:
                # K augmented views per sample (augmentation multiplicity): rows b*K .. b*K+K-1 are sample b, the
                # layout privacy.bookkeeping averages per sample before clipping.
                views = images.shape[1]
                images, labels = images.flatten(0, 1), labels.repeat_interleave(views)
            if lr_at is not None:
                lr = lr_at(min(steps / total_steps, 1.0))
                for group in optimizer.param_groups:
                    group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            logits = model(images)
            loss = criterion(logits, labels)
            if distill_beta > 0:
                with torch.no_grad():
                    teacher_logits = teacher(images)
                loss = loss + distill_beta * not_true_distillation(logits, teacher_logits, labels, tau=distill_tau)
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
            seen += len(labels)  # rows: K per sample under augmentation multiplicity
    if seen == 0:
        return TrainResult(loss=float("nan"), accuracy=0.0, num_examples=0, steps=steps)
    return TrainResult(loss=total_loss / seen, accuracy=correct / seen, num_examples=samples, steps=steps)


@dataclass
class MomentumCarry:
    """The optimiser momentum a site keeps from one of its rounds to the next (`keep-momentum`).

    Why: SGD's momentum 0.9 needs about ten steps to build up, and under `local-splits` a round is a few steps (at
    1/8 of an epoch a FER2013 site takes about 7), so a momentum that restarts every round never reaches its
    steady size: over 7 steps from zero the sum of the step multipliers is 23 where a running momentum gives 70, and
    the site's round moves the model about a third as far as the same steps do in centralised training. Kept, the
    buffer carries on as a centralised run's does. It is the site's own state, built from its own gradients: it
    stays on the node (Flower's node context) and never leaves it.

    Measured, it does not close the gap it was built for: CNN-AM deep, Dirichlet 0.5, 1/8 rounds from the public
    start, validation 0.473 with server momentum and 0.481 without, against 0.494 with the momentum restarting
    (docs/benchmarks.md, "Keeping each site's momentum"), so `keep-momentum` is off by default.

    Args:
        buffers: one momentum buffer per trained parameter, in the optimiser's order; None before the site's first
            round (the optimiser starts from zero, as without the carry).
    """

    buffers: list[np.ndarray] | None = None

    def load_into(self, optimizer: torch.optim.Optimizer) -> None:
        """Sets `optimizer`'s momentum buffers to the carried ones (nothing before the first round).

        Raises:
            ValueError: the carried buffers do not fit the optimiser's parameters (another model or dp-train).
        """
        if self.buffers is None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        shapes = [tuple(p.shape) for p in params]
        if [tuple(b.shape) for b in self.buffers] != shapes:
            raise ValueError(f"the kept momentum has {len(self.buffers)} buffers that do not fit the optimiser's "
                             f"{len(params)} parameters")
        for p, buffer in zip(params, self.buffers):
            optimizer.state[p]["momentum_buffer"] = torch.tensor(buffer, dtype=p.dtype)

    def save_from(self, optimizer: torch.optim.Optimizer) -> None:
        """Keeps `optimizer`'s momentum buffers (zeros for a parameter that got no step)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.buffers = [optimizer.state[p]["momentum_buffer"].detach().cpu().numpy().copy()
                        if optimizer.state.get(p, {}).get("momentum_buffer") is not None
                        else np.zeros(tuple(p.shape), dtype=np.float32) for p in params]


def train_round(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, recipe: TrainingRecipe, batch_size: int,
                seed: int, server_round: int, num_rounds: int, epochs: int, splits: int = 1,
                slice_seed: int | None = None, label_prior: Sequence[float] | None = None, proximal_mu: float = 0.0,
                ntd_beta: float = 0.0, carry: MomentumCarry | None = None) -> TrainResult:
    """One round of `recipe`'s non-private training of `model`, in place: what a site does with its faces each
    round, the server's `server-learning` does with the public slice, and the public pretraining does once.

    One implementation of the round (the slice, the recipe's loader, optimiser, loss and schedule, the training),
    so that the site, the server's steps and round 0 cannot drift apart.

    Args:
        model: the model as the round starts (the received global model); trained in place.
        images, labels: the data the round trains on.
        recipe, batch_size, label_prior: as `prepare_training`.
        seed: seeds the round's augmentation and shuffling.
        server_round, num_rounds: where the round sits in the run's schedule.
        epochs: passes over the round's data.
        splits: `local-splits`: the round trains on 1/splits of the data, the next part of this epoch's
            permutation (`round_slice`).
        slice_seed: seeds those permutations; the same in every round of a run, so required when splits > 1 (a
            round's own seed would draw a fresh permutation each round and lose the once-an-epoch guarantee).
        proximal_mu: FedProx's weight, towards the model as the round received it (0 = off).
        ntd_beta: not-true distillation's weight, towards a frozen copy of the model as the round received it
            (FedNTD; 0 = off).
        carry: `keep-momentum`: the optimiser starts from these momentum buffers, and they are replaced by the
            ones it ends with (None = momentum restarts with the round).
    """
    if splits > 1:
        if slice_seed is None:
            raise ValueError(f"splits {splits} needs a slice_seed that stays the same across the run's rounds")
        rows = round_slice(len(labels), splits=splits, seed=slice_seed, server_round=server_round)
        images, labels = images[rows], labels[rows]
    local = prepare_training(model, images, labels, recipe=recipe, batch_size=batch_size, seed=seed,
                             server_round=server_round, num_rounds=num_rounds, label_prior=label_prior)
    reference = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if ntd_beta > 0 else None
    if carry is not None:
        carry.load_into(local.optimizer)
    result = train(model, local.loader, epochs=epochs, optimizer=local.optimizer, criterion=local.criterion,
                   proximal_mu=proximal_mu, reference=reference, lr_at=local.lr_at, teacher=teacher,
                   distill_beta=ntd_beta)
    if carry is not None:
        carry.save_from(local.optimizer)
    return result


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, flip_tta: bool = False, device: str = "cpu") -> EvalResult:
    """Evaluates `model` on `loader`: mean cross-entropy, accuracy, and every prediction for richer metrics.

    With `flip_tta` each face is scored by the mean of the softmax of the face and of its mirror image (expressions
    are nearly symmetric, so the two views are two honest guesses), and the loss is the negative log of that mean.
    """
    model.eval()
    total_loss, preds, targets = 0.0, [], []
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        log_probs = predict_log_proba(model, images, flip_tta=flip_tta)
        total_loss += float(nn.functional.nll_loss(log_probs, labels, reduction="sum"))
        preds.append(log_probs.argmax(1).cpu().numpy())
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


@torch.no_grad()
def predict_log_proba(model: nn.Module, images: torch.Tensor, *, flip_tta: bool = False) -> torch.Tensor:
    """Log class probabilities of `images` (B, C, H, W); with `flip_tta`, the log of the mean of the softmax of the
    images and of their mirrors (computed as a log-sum-exp, so confident predictions do not underflow)."""
    log_probs = torch.log_softmax(model(images), dim=1)
    if flip_tta:
        mirrored = torch.log_softmax(model(torch.flip(images, dims=(-1,))), dim=1)
        log_probs = torch.logsumexp(torch.stack((log_probs, mirrored)), dim=0) - math.log(2.0)
    return log_probs
