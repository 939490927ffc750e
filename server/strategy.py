"""Aggregation strategies and the validation every update passes before any strategy sees it.

Flower's strategies aggregate whatever arrives: wrong shapes, NaN, Inf and absurd example counts included. One
malformed reply then poisons the global model for every site. `GuardedStrategy` wraps any registered strategy,
rejects such replies with a logged reason, and lets the round go on with the rest.

Clients send deltas (see `client.client_app`); the guard turns each accepted delta back into full weights
(`global + delta`) so that every Flower strategy, robust ones included, works on weights exactly as documented.
Under secure aggregation the guard receives one already-aggregated delta and checks that instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

from privacy.central import CentralDP, add_central_noise

log = logging.getLogger("fer_fl.server")

StrategyFactory = Callable[..., Strategy]
_STRATEGIES: dict[str, StrategyFactory] = {}


def register_strategy(name: str) -> Callable[[StrategyFactory], StrategyFactory]:
    """Registers a factory `(**common, options) -> Strategy` under `name`."""

    def decorator(factory: StrategyFactory) -> StrategyFactory:
        if name in _STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        _STRATEGIES[name] = factory
        return factory

    return decorator


def list_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def create_strategy(name: str, *, common: dict[str, Any], options: dict[str, Any]) -> Strategy:
    """Builds a registered Flower strategy.

    Args:
        name: registry name, e.g. "fedavg".
        common: keyword arguments every Flower strategy takes (fractions, minimum clients, initial parameters).
        options: strategy-specific knobs (`proximal_mu`, `server_lr`, `trimmed_beta`, `krum_malicious`).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in _STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(list_strategies())}")
    return _STRATEGIES[name](common=common, **options)


@register_strategy("fedavg")
def _fedavg(*, common: dict, **_: Any) -> Strategy:
    return FedAvg(**common)


@register_strategy("fedprox")
def _fedprox(*, common: dict, proximal_mu: float, **_: Any) -> Strategy:
    return FedProx(**common, proximal_mu=proximal_mu)


@register_strategy("fedadam")
def _fedadam(*, common: dict, server_lr: float, **_: Any) -> Strategy:
    # eta_l is only used by Flower to log; the client's own lr drives local training.
    return FedAdam(**common, eta=server_lr, eta_l=server_lr, beta_1=0.9, beta_2=0.99, tau=1e-3)


@register_strategy("fedmedian")
def _fedmedian(*, common: dict, **_: Any) -> Strategy:
    return FedMedian(**common)


@register_strategy("fedtrimmedavg")
def _fedtrimmedavg(*, common: dict, trimmed_beta: float, **_: Any) -> Strategy:
    return FedTrimmedAvg(**common, beta=trimmed_beta)


@register_strategy("krum")
def _krum(*, common: dict, krum_malicious: int, **_: Any) -> Strategy:
    return Krum(**common, num_malicious_clients=krum_malicious, num_clients_to_keep=0)


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
    for index, array in enumerate(arrays):
        if not np.all(np.isfinite(array)):
            return f"array {index} contains NaN or Inf"
    norm = math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))
    # A tolerance of 0.1 % absorbs float32 rounding of a client that clipped exactly to the bound.
    if norm > max_norm * 1.001:
        return f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
        return f"num-examples {num_examples!r} is not an integer"
    if num_examples <= 0:
        return f"num-examples {num_examples} is not positive"
    if num_examples > max_examples:
        return f"num-examples {num_examples} exceeds the plausible maximum {max_examples}"
    return None


@dataclass
class RoundReport:
    """What the guard saw in one round; the ServerApp turns it into the round's metrics record."""

    num_results: int = 0
    num_accepted: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    train_loss: float | None = None
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_loss: float | None = None
    eval_clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    central_noise_std: float | None = None


EvaluateFn = Callable[[int, list[np.ndarray]], tuple[float, dict[str, Any]]]


class GuardedStrategy(Strategy):
    """Validates updates, rebuilds weights from deltas, and delegates aggregation to a Flower strategy.

    Args:
        inner: the Flower strategy that aggregates accepted weights.
        expected_shapes: the global model's array shapes.
        max_update_norm: L2 bound on an individual (or aggregated) delta.
        max_examples: the largest plausible example count one client may claim.
        evaluate_fn: server-side evaluation `(round, weights) -> (loss, metrics)` on the held-out test set.
        central_dp: central (client-level) DP: every accepted update weighs the same and the mean gets Gaussian
            noise of std σC/n (see privacy.central); None for none.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        expected_shapes: list[tuple[int, ...]],
        max_update_norm: float,
        max_examples: int,
        evaluate_fn: EvaluateFn | None = None,
        central_dp: CentralDP | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.expected_shapes = expected_shapes
        self.max_update_norm = max_update_norm
        self.max_examples = max_examples
        self.evaluate_fn = evaluate_fn
        self.central_dp = central_dp
        self.reports: dict[int, RoundReport] = {}
        self.server_metrics: dict[int, dict[str, Any]] = {}
        # Latest DP status each node reported (epsilon spent, ledger sequence): for privacy.json and rollback checks.
        self.privacy: dict[str, dict[str, Any]] = {}
        self._global: list[np.ndarray] | None = None

    def __repr__(self) -> str:
        return f"GuardedStrategy({self.inner!r})"

    def report(self, server_round: int) -> RoundReport:
        return self.reports.setdefault(server_round, RoundReport())

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._global = parameters_to_ndarrays(parameters)
        # Flower's strategies size the sample from the nodes online *before* they wait for min_available_clients,
        # so a node that comes back while the round waits for it is online but one sample slot short: with
        # fraction-fit 1.0 a random online site sat the round out (4 of 5 sampled in tests/test_deploy_faults.py).
        # Waiting first lets the sample size see every node that is online.
        client_manager.wait_for(int(getattr(self.inner, "min_available_clients", 1)))
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        size = sum(len(t) for t in parameters.tensors)
        self.report(server_round).bytes_down += size * len(instructions)
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        report = self.report(server_round)
        report.num_results = len(results)
        report.failures = [_failure_reason(f) for f in failures]
        for reason in report.failures:
            log.warning("round %d: a client failed: %s", server_round, reason)
        accepted: list[tuple[ClientProxy, FitRes]] = []
        losses: list[tuple[float, int]] = []
        for proxy, res in results:
            client_id = str(res.metrics.get("client-id", proxy.cid))
            report.bytes_up += sum(len(t) for t in res.parameters.tensors)
            reason = self._check(res)
            if reason is not None:
                log.warning("round %d: rejected the update of client %s: %s", server_round, client_id, reason)
                report.rejected.append({"client": client_id, "reason": reason})
                continue
            privacy = {k[3:]: v for k, v in res.metrics.items() if k.startswith("dp-")}
            reason = self._check_ledger(client_id, privacy)
            if reason is not None:
                log.warning("round %d: rejected the update of client %s: %s", server_round, client_id, reason)
                report.rejected.append({"client": client_id, "reason": reason})
                continue
            if privacy:
                self.privacy[client_id] = privacy
            delta = parameters_to_ndarrays(res.parameters)
            weights = [g + d for g, d in zip(self._global, delta)]
            accepted.append((proxy, _replaced(res, parameters=ndarrays_to_parameters(weights))))
            report.clients[client_id] = {
                "num_examples": int(res.num_examples),
                "train_loss": _as_float(res.metrics.get("train-loss")),
            }
            loss = _as_float(res.metrics.get("train-loss"))
            if loss is not None:
                losses.append((loss, int(res.num_examples)))
        # Replies arrive in completion order; a fixed order makes float aggregation, and so the run, reproducible.
        accepted.sort(key=lambda item: str(item[1].metrics.get("client-id", item[0].cid)))
        report.num_accepted = len(accepted)
        if losses:
            report.train_loss = sum(l * n for l, n in losses) / sum(n for _, n in losses)
        if not accepted:
            log.warning("round %d: no acceptable update; the global model is unchanged", server_round)
            return None, {}
        if self.central_dp is None:
            return self.inner.aggregate_fit(server_round, accepted, failures)
        # The noise is calibrated for a uniform mean: a client's example count must not buy it more weight.
        uniform = [(proxy, _replaced(res, num_examples=1)) for proxy, res in accepted]
        parameters, metrics = self.inner.aggregate_fit(server_round, uniform, failures)
        if parameters is None:
            return None, metrics
        mean = parameters_to_ndarrays(parameters)
        noisy = add_central_noise(mean, settings=self.central_dp, num_clients=len(uniform))
        report.central_noise_std = self.central_dp.noise_std(len(uniform))
        return ndarrays_to_parameters(noisy), metrics

    def _check_ledger(self, client_id: str, privacy: dict[str, Any]) -> str | None:
        """A node's privacy ledger only moves forward: a replaced ledger or a lower sequence number means its
        recorded spend was rolled back (e.g. both ledger and anchor restored from a backup), which the node
        alone cannot detect."""
        previous = self.privacy.get(client_id)
        if not privacy or previous is None:
            return None
        if privacy.get("ledger_id") != previous.get("ledger_id"):
            return "its privacy ledger was replaced since its last update (possible budget reset)"
        if int(privacy.get("ledger_seq", -1)) <= int(previous.get("ledger_seq", -1)):
            return (
                f"its privacy ledger went back from sequence {previous.get('ledger_seq')} "
                f"to {privacy.get('ledger_seq')} (possible rollback)"
            )
        return None

    def _check(self, res: FitRes) -> str | None:
        try:
            arrays = parameters_to_ndarrays(res.parameters)
        except Exception as err:  # a peer's bytes are untrusted: any decoding failure is a rejection
            return f"undecodable arrays ({type(err).__name__})"
        return validate_update(
            arrays,
            expected_shapes=self.expected_shapes,
            num_examples=res.num_examples,
            max_norm=self.max_update_norm,
            max_examples=self.max_examples,
        )

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        report = self.report(server_round)
        valid = [(p, r) for p, r in results if r.num_examples > 0 and math.isfinite(r.loss)]
        valid.sort(key=lambda item: str(item[1].metrics.get("client-id", item[0].cid)))
        for proxy, res in valid:
            client_id = str(res.metrics.get("client-id", proxy.cid))
            report.eval_clients[client_id] = {
                "accuracy": _as_float(res.metrics.get("accuracy")),
                "loss": float(res.loss),
                "num_examples": int(res.num_examples),
            }
        if not valid:
            return None, {}
        total = sum(r.num_examples for _, r in valid)
        report.eval_loss = sum(r.loss * r.num_examples for _, r in valid) / total
        accuracy = sum(float(r.metrics.get("accuracy", 0.0)) * r.num_examples for _, r in valid) / total
        return report.eval_loss, {"accuracy": accuracy}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        if self.evaluate_fn is None:
            return None
        loss, metrics = self.evaluate_fn(server_round, parameters_to_ndarrays(parameters))
        self.server_metrics[server_round] = {"loss": loss, **metrics}
        return loss, metrics


def _replaced(res: FitRes, **changes: Any) -> FitRes:
    """A copy of `res` with some fields changed (FitRes is a plain dataclass; the original stays untouched)."""
    return dataclasses.replace(res, **changes)


def _failure_reason(failure: Any) -> str:
    if isinstance(failure, BaseException):
        return str(failure) or type(failure).__name__
    _, res = failure
    return getattr(getattr(res, "status", None), "message", "") or "client reported a failure"


def _as_float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None
