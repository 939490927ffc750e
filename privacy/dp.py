"""Local sample-level DP-SGD with one (ε, δ) budget for the whole federation, kept across rounds.

:class:`DPClient` glues the ledger, the calibration and Opacus together for one client:

1. σ is calibrated once from the *federation's* target (ε, δ), the Poisson sample rate
   q = batch_size / dataset_size and the planned total steps (planned rounds × local epochs × steps
   per epoch, with ceil(dataset_size / batch_size) steps per epoch).
2. :meth:`DPClient.begin_round` projects ε after the round from the ledger's full history, declines
   with :class:`BudgetExhausted` when it would pass the budget, and otherwise charges the ledger
   (fsynced) *before* returning the plan: nothing trains, so nothing leaves, uncharged.
3. :meth:`DPClient.make_private` wraps the model and optimizer with Opacus (per-sample gradients,
   flat clipping, Gaussian noise) and builds an Opacus :class:`~opacus.data_loader.DPDataLoader` with
   Poisson sampling at exactly rate q. Its accountant is restored from the ledger's history, so it
   reports the composition of all rounds rather than restarting at every round the way a fresh
   ``PrivacyEngine`` per round does. A step hook refuses any step beyond the plan, or with a σ or clip
   norm other than the plan's, before the optimizer applies it.

``DPSettings(secure_mode=True)`` draws both the Poisson sampling (:mod:`privacy.sampling`) and the noise from the
OS-keyed ChaCha20 generator of :mod:`privacy.noise`, which says why Opacus's own ``secure_mode`` cannot serve here;
deployed nodes always use it. ``PrivacyEngine`` is not used at all: the
pieces are assembled directly so that q, the steps and the accounting are exactly the ones charged.

One round on a client::

    ledger = PrivacyLedger.open(ledger_path, key_file=key, anchor_path=anchor, client_id=node,
                                budget_epsilon=3.0, delta=1e-5)
    dp = DPClient(settings=DPSettings(epsilon=3.0, delta=1e-5), ledger=ledger, dataset_size=len(train),
                  batch_size=64, local_epochs=1, planned_rounds=num_rounds)
    plan = dp.begin_round(server_round=server_round)  # charged and fsynced here; BudgetExhausted declines the round
    private = dp.make_private(model=model, optimizer=optimizer, dataset=train, plan=plan)
    for _ in range(plan.local_epochs):
        for x, y in private.loader:                             # Poisson batches, possibly empty
            private.optimizer.zero_grad()
            private.criterion(private.model(x), y).backward()
            private.optimizer.step()
    metrics = dp.status()  # sent with the update; ledger_seq / ledger_id let the server flag rollbacks

``client/trainer.py`` (``FerClient._fit_private``) is the real caller: it opens the DPClient through
``client/dp_training.py`` and lets BudgetExhausted reach Flower, which replies with an error naming the reason; the
server goes on without that site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from opacus.accountants import create_accountant
from opacus.grad_sample import prepare_module
from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS
from opacus.optimizers import get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.validators.module_validator import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from privacy.accounting import ACCOUNTANTS, calibrate_noise_multiplier, compute_epsilon, merge_history
from privacy.bookkeeping import BookKeepingLoss, BookKeepingModule, release_bookkeeping_hooks
from privacy.ledger import BudgetExhausted, LedgerError, PrivacyLedger
from privacy.noise import _secure_optimizer_class, _SecureRandom
from privacy.sampling import _PoissonDataLoader

__all__ = [
    "BudgetExhausted",
    "DPClient",
    "DPSettings",
    "LedgerError",
    "PlanExceeded",
    "PrivateTraining",
    "RoundPlan",
    "GRAD_SAMPLE_MODES",
]

# "ew" (expanded weights) is left out: it raises on the empty batches Poisson sampling produces.
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost", "bk")


class PlanExceeded(RuntimeError):
    """Training tried to take a step the ledger was not charged for; the step is not applied."""


@dataclass(frozen=True)
class DPSettings:
    """A client's DP-SGD configuration.

    Attributes:
        epsilon: ε budget for the whole federation (not per round).
        delta: δ of the budget; keep it well below 1 / dataset size.
        max_grad_norm: Per-example gradient clipping norm C.
        accountant: ``"rdp"`` (default) or ``"prv"`` (tighter, slower).
        secure_mode: Draw sampling and noise from a CSPRNG keyed by the OS, with the floating-point-attack
            defence (every deployed node; a few percent of a CNN-AM step, benchmarks/bench_models.py). Without
            it, torch's default generator is used, which whoever knows its seed can replay.
    """

    epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    secure_mode: bool = False

    def __post_init__(self) -> None:
        for name in ("epsilon", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"DPSettings.{name} must be a positive finite number, got {value!r}")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0.0 < self.delta < 1.0:
            raise ValueError(f"DPSettings.delta must lie strictly between 0 and 1, got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"DPSettings.accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        if not isinstance(self.secure_mode, bool):
            raise ValueError(f"DPSettings.secure_mode must be a bool, got {self.secure_mode!r}")


@dataclass(frozen=True)
class RoundPlan:
    """What one round may do, already charged to the ledger."""

    server_round: int
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    batch_size: int
    local_epochs: int
    steps_per_epoch: int
    steps: int
    epsilon_before: float
    epsilon_after: float
    epsilon_budget: float
    delta: float
    accountant: str
    ledger_seq: int


class PrivateTraining(NamedTuple):
    """The Opacus-wrapped training objects for one round.

    Train with ``model`` (it shares its parameters with the model passed in; read weights from the
    original, whose ``state_dict`` keys are unprefixed), step ``optimizer`` once per batch of
    ``loader``, and compute the loss with ``criterion`` (Opacus's two-pass wrapper in ghost mode, the
    criterion given otherwise). Batches can be empty under Poisson sampling; still call
    ``optimizer.step()`` for them, since skipping would make the update depend on the sample size.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    criterion: Any


def _release_stale_hooks(model: nn.Module) -> None:
    """Removes the per-sample-gradient hooks an earlier round's wrapper left on ``model``.

    Opacus refuses to wrap a model twice, and a process that keeps its model between rounds (a
    simulation actor, a test) would otherwise fail from the second round on.
    """
    release_bookkeeping_hooks(model)
    handles = getattr(model, "autograd_grad_sample_hooks", None)
    if handles is None:
        return
    while handles:
        handles.pop().remove()
    delattr(model, "autograd_grad_sample_hooks")
    for p in model.parameters():
        for attr in OPACUS_PARAM_MONKEYPATCH_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)


class DPClient:
    """One client's DP-SGD state across rounds: calibration, ledger charging, Opacus set-up.

    Build it every round (Flower rebuilds clients every round anyway); all state that must outlive the
    process is in the ledger.
    """

    def __init__(
        self,
        *,
        settings: DPSettings,
        ledger: PrivacyLedger,
        dataset_size: int,
        batch_size: int,
        local_epochs: int,
        planned_rounds: int,
    ) -> None:
        """Calibrates σ for the whole federation.

        Args:
            settings: The client's DP configuration.
            ledger: The client's opened ledger; its budget, δ and accountant must match ``settings``.
            dataset_size: Number of training examples N on this client.
            batch_size: Expected batch size B (Poisson sampling, q = B / N).
            local_epochs: Local epochs per round.
            planned_rounds: Rounds the federation plans to run; σ is calibrated so that this many
                rounds spend the whole budget.

        Raises:
            ValueError: A size out of range, or a ledger whose terms differ from ``settings``.
        """
        for name, value in (
            ("dataset_size", dataset_size),
            ("batch_size", batch_size),
            ("local_epochs", local_epochs),
            ("planned_rounds", planned_rounds),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if batch_size > dataset_size:
            raise ValueError(f"batch_size ({batch_size}) must not exceed dataset_size ({dataset_size})")
        for name, mine, recorded in (
            ("epsilon", settings.epsilon, ledger.budget_epsilon),
            ("delta", settings.delta, ledger.delta),
            ("accountant", settings.accountant, ledger.accountant),
        ):
            if mine != recorded:
                raise ValueError(f"DPSettings.{name}={mine!r} differs from the ledger's {recorded!r}")
        self._settings = settings
        self._ledger = ledger
        self._dataset_size = dataset_size
        self._batch_size = batch_size
        self._local_epochs = local_epochs
        self._planned_rounds = planned_rounds
        self._sample_rate = batch_size / dataset_size
        self._steps_per_epoch = math.ceil(dataset_size / batch_size)
        self._steps_per_round = local_epochs * self._steps_per_epoch
        self._noise_multiplier = calibrate_noise_multiplier(
            epsilon=settings.epsilon,
            delta=settings.delta,
            sample_rate=self._sample_rate,
            steps=planned_rounds * self._steps_per_round,
            accountant=settings.accountant,
        )
        self._secure_random = _SecureRandom() if settings.secure_mode else None
        self._accountant = create_accountant(mechanism=settings.accountant)
        self._accountant.history = merge_history(ledger.history)
        self._used_plans: set[int] = set()

    @property
    def noise_multiplier(self) -> float:
        """The calibrated σ."""
        return self._noise_multiplier

    @property
    def accountant(self):
        """Opacus accountant holding every step of every round so far (restored from the ledger)."""
        return self._accountant

    def begin_round(self, *, server_round: int) -> RoundPlan:
        """Plans one round and charges its full spend to the ledger before returning.

        Args:
            server_round: The server's round number (recorded; a retried round is charged again).

        Returns:
            The charged plan, to pass to :meth:`make_private`.

        Raises:
            BudgetExhausted: The round would take ε past the budget; nothing is charged.
            LedgerError: The ledger could not be written safely.
        """
        epsilon_before = self._ledger.spent_epsilon
        entry = (self._noise_multiplier, self._sample_rate, self._steps_per_round)
        epsilon_after = compute_epsilon(
            history=[*self._ledger.history, entry], delta=self._settings.delta, accountant=self._settings.accountant
        )
        # The ledger refuses an over-budget charge itself as well; raised here first with the same numbers.
        if epsilon_after > self._settings.epsilon:
            raise BudgetExhausted(
                server_round=server_round,
                epsilon_spent=epsilon_before,
                epsilon_projected=epsilon_after,
                epsilon_budget=self._settings.epsilon,
                delta=self._settings.delta,
            )
        self._ledger.charge(
            server_round=server_round,
            noise_multiplier=self._noise_multiplier,
            sample_rate=self._sample_rate,
            steps=self._steps_per_round,
            epsilon_after=epsilon_after,
        )
        return RoundPlan(
            server_round=server_round,
            noise_multiplier=self._noise_multiplier,
            max_grad_norm=self._settings.max_grad_norm,
            sample_rate=self._sample_rate,
            batch_size=self._batch_size,
            local_epochs=self._local_epochs,
            steps_per_epoch=self._steps_per_epoch,
            steps=self._steps_per_round,
            epsilon_before=epsilon_before,
            epsilon_after=epsilon_after,
            epsilon_budget=self._settings.epsilon,
            delta=self._settings.delta,
            accountant=self._settings.accountant,
            ledger_seq=self._ledger.seq,
        )

    def make_private(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Dataset,
        plan: RoundPlan,
        criterion: Any = None,
        grad_sample_mode: str = "hooks",
        num_workers: int = 0,
        views: int = 1,
    ) -> PrivateTraining:
        """Wraps one round's model, optimizer and data for DP-SGD under a charged plan.

        Args:
            model: An Opacus-compatible model (``create_model(name, dp=True)``: no BatchNorm). Hooks an
                earlier round left on it are removed first, so one model object can serve every round.
            optimizer: An optimizer over ``model``'s parameters.
            dataset: The client's training set, of ``dataset_size`` (image, label) items.
            plan: The plan :meth:`begin_round` just returned; each plan can be used once.
            criterion: Loss with mean reduction; ``nn.CrossEntropyLoss()`` when omitted.
            grad_sample_mode: Per-sample-gradient engine: Opacus's ``"hooks"`` (default), ``"functorch"``
                or ``"ghost"`` (ghost clipping: less memory), or ``"bk"`` (book-keeping clipping, one backward
                pass: see :mod:`privacy.bookkeeping`). Ghost and bk need the returned criterion.
            views: Augmentation multiplicity K: ``dataset`` yields K augmented views per item (K, C, H, W) and
                each sample's gradient is the mean over its views before clipping. Only ``"bk"`` can average
                before clipping; Opacus's engines would clip every view as a sample of its own.
            num_workers: DataLoader worker processes.

        Returns:
            The wrapped objects; see :class:`PrivateTraining`.

        Raises:
            ValueError: A stale or reused plan, a dataset of another size, an optimizer over other
                parameters, an unknown ``grad_sample_mode``, or a model Opacus cannot train privately.
        """
        if plan.ledger_seq != self._ledger.seq or plan.noise_multiplier != self._noise_multiplier:
            raise ValueError(
                f"plan for round {plan.server_round} is not the ledger's latest charge (seq {plan.ledger_seq}, "
                f"ledger at {self._ledger.seq}); call begin_round again"
            )
        if plan.ledger_seq in self._used_plans:
            raise ValueError(f"plan for round {plan.server_round} was already used; each charge pays for one run")
        if len(dataset) != self._dataset_size:
            raise ValueError(f"dataset has {len(dataset)} items, the plan was charged for {self._dataset_size}")
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {grad_sample_mode!r}")
        if views != 1 and grad_sample_mode != "bk":
            raise ValueError(f"augmentation multiplicity (views={views}) needs grad_sample_mode 'bk', got "
                             f"{grad_sample_mode!r}: it would clip each view as a sample of its own")
        parameters = {id(p) for p in model.parameters()}
        if any(id(p) not in parameters for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("optimizer holds parameters that are not the model's")
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(f"model cannot be trained with DP-SGD: {errors[0]} (build it with dp=True)")
        criterion = nn.CrossEntropyLoss() if criterion is None else criterion
        self._used_plans.add(plan.ledger_seq)

        _release_stale_hooks(model)
        if grad_sample_mode == "bk":
            # Each backward pass replaces .grad with one batch's clipped sum, so batches cannot accumulate.
            private_model = BookKeepingModule(model, max_grad_norm=plan.max_grad_norm, views=views)
        else:
            extra = {"max_grad_norm": plan.max_grad_norm} if grad_sample_mode == "ghost" else {}
            private_model = prepare_module(
                model, grad_sample_mode=grad_sample_mode, batch_first=True, loss_reduction="mean", **extra
            )
            # Poisson sampling composes one batch per step; accumulating several would break the accounting.
            private_model.forbid_grad_accumulation()
        # bk hands over the same clipped sum as ghost clipping, so it shares ghost's noise-adding optimizer.
        engine = "ghost" if grad_sample_mode == "bk" else grad_sample_mode
        optimizer_class = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=engine)
        if self._secure_random is not None:
            optimizer_class = _secure_optimizer_class(optimizer_class)
        private_optimizer = optimizer_class(
            optimizer,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            expected_batch_size=plan.batch_size,
            loss_reduction="mean",
            secure_mode=self._settings.secure_mode,
        )
        if self._secure_random is not None:
            private_optimizer.secure_random = self._secure_random
        private_optimizer.attach_step_hook(self._step_hook(plan))
        loader = _PoissonDataLoader(
            dataset,
            sample_rate=plan.sample_rate,
            steps=plan.steps_per_epoch,
            secure_random=self._secure_random,
            num_workers=num_workers,
        )
        if grad_sample_mode == "ghost":
            criterion = DPLossFastGradientClipping(private_model, private_optimizer, criterion, "mean")
        elif grad_sample_mode == "bk":
            criterion = BookKeepingLoss(private_model, criterion)
        # The accountant resumes from every round charged before this one.
        self._accountant.history = merge_history(self._ledger.history[:-1])
        return PrivateTraining(model=private_model, optimizer=private_optimizer, loader=loader, criterion=criterion)

    def _step_hook(self, plan: RoundPlan):
        taken = 0

        def hook(optimizer) -> None:
            nonlocal taken
            if optimizer.noise_multiplier != plan.noise_multiplier or optimizer.max_grad_norm != plan.max_grad_norm:
                raise PlanExceeded(
                    f"optimizer noise_multiplier/max_grad_norm changed to {optimizer.noise_multiplier}/"
                    f"{optimizer.max_grad_norm}; the round was charged for {plan.noise_multiplier}/{plan.max_grad_norm}"
                )
            if taken >= plan.steps:
                raise PlanExceeded(
                    f"round {plan.server_round} was charged for {plan.steps} steps; step {taken + 1} refused"
                )
            taken += 1
            self._accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)

        return hook

    def status(self) -> dict[str, float | int | str | bool]:
        """Scalar privacy figures for Flower metrics and ``privacy.json`` (see ``privacy.report``)."""
        history = self._ledger.history
        return {
            "client_id": self._ledger.client_id,
            "epsilon_spent": self._ledger.spent_epsilon,
            "epsilon_budget": self._settings.epsilon,
            "delta": self._settings.delta,
            "noise_multiplier": self._noise_multiplier,
            "max_grad_norm": self._settings.max_grad_norm,
            "sample_rate": self._sample_rate,
            "steps": sum(steps for _, _, steps in history),
            "accountant": self._settings.accountant,
            "rounds_charged": len(history),
            "ledger_seq": self._ledger.seq,
            "ledger_id": self._ledger.ledger_id,
            "secure_mode": self._settings.secure_mode,
        }
