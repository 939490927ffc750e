"""Aggregation strategies, and the guard that applies the checks of server/replies.py before any strategy sees an
update.

Flower's strategies aggregate whatever arrives: wrong shapes, NaN, Inf and absurd example counts included. One
malformed reply then poisons the global model for every site. `GuardedStrategy` wraps any registered strategy,
rejects such replies with a logged reason, and lets the round go on with the rest.

Clients send deltas (see `client.trainer.FerClient.fit`); the guard turns each accepted delta back into full weights
(`global + delta`) so that every Flower strategy, robust ones included, works on weights exactly as documented.
Under secure aggregation the guard receives one already-aggregated delta and checks that instead.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
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
from flwr.server.strategy import Strategy

from privacy.central import CentralDP, add_central_noise
from privacy.guard import guard_update
from privacy.report import dp_status
from server.ema import ParameterEMA
from server.head_refit import HeadRefit
from server.ledger_registry import NodeLedgers
from server.records import RoundReport
from server.server_learning import follow_global_model
from server.replies import (
    EVALUATE_METRICS,
    FIT_METRICS,
    bound_to_median_norm,
    is_finite_number,
    is_label,
    is_count,
    validate_count,
    validate_metrics,
    validate_update,
)

log = logging.getLogger("fer_fl.server")

EvaluateFn = Callable[[int, list[np.ndarray]], tuple[float, dict[str, Any]]]


# A dataclass for its settings; identity equality and a short repr, as a Flower strategy has.
@dataclass(eq=False, repr=False)
class GuardedStrategy(Strategy):
    """Validates updates, rebuilds weights from deltas, and delegates aggregation to a Flower strategy.

    Args:
        inner: the Flower strategy that aggregates accepted weights.
        expected_shapes: the global model's array shapes.
        max_update_norm: L2 bound on an individual (or aggregated) delta.
        max_examples: the largest plausible example count one client may claim.
        evaluate_fn: server-side evaluation `(round, weights) -> (loss, metrics)` on the held-out test set.
        central_dp: central (client-level) DP: every accepted update weighs the same and the mean gets Gaussian
            noise of std σC/n (see privacy.central); None for none. Where the server sees individual updates
            (no secure aggregation) it scales each down to the clip C itself rather than trusting the client.
        secure_aggregation: whether fit results carry a SecAgg+ aggregate instead of individual updates; then
            refusals happen in `screen_masked_reply`, before the masked vectors are summed.
        ledgers: the record of each node's privacy ledger that rollbacks are checked against (kept on disk by
            deployments, server/ledger_registry.py); None keeps one in memory.
        norm_bound: server-side norm bounding: each accepted delta is scaled down to at most this multiple of
            the round's median delta norm before aggregation (see bound_to_median_norm); 0 for none.
        ema: the average of the global model over rounds (server/ema.py), updated with every new global model
            and the model `evaluate` scores; None for none.
        server_step: `(round, weights) -> (weights, training loss)`, applied to every new global model before it
            is averaged, scored or sent out (server-learning, server/server_learning.py); None for
            none.
        head_refit: the end-of-run step (server/head_refit.py HeadRefit): in round `final_round` the model the
            server scores (the average over rounds with `ema`) gets its classifier re-fitted before it is scored,
            and that model is the run's (`final_weights`); None for none.
        final_round: the run's last round (head_refit only).
    """

    inner: Strategy
    _: KW_ONLY
    expected_shapes: list[tuple[int, ...]]
    max_update_norm: float
    max_examples: int
    evaluate_fn: EvaluateFn | None = None
    central_dp: CentralDP | None = None
    secure_aggregation: bool = False
    ledgers: NodeLedgers | None = None
    norm_bound: float = 0.0
    ema: ParameterEMA | None = None
    server_step: Callable[[int, list[np.ndarray]], tuple[list[np.ndarray], float]] | None = None
    head_refit: HeadRefit | None = None
    final_round: int = 0
    # The run's model after head_refit's step in the final round; None until then (or without head_refit).
    final_weights: list[np.ndarray] | None = field(default=None, init=False)
    # What the guard saw, per round; the server-side evaluation per round.
    reports: dict[int, RoundReport] = field(default_factory=dict, init=False)
    server_metrics: dict[int, dict[str, Any]] = field(default_factory=dict, init=False)
    # Latest DP status each node reported (epsilon spent, ledger sequence): for privacy.json and rollback checks.
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)
    _global: list[np.ndarray] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.ledgers is None:
            self.ledgers = NodeLedgers()

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
        parameters, metrics = self._aggregate_fit(server_round, results, failures)
        if parameters is None or (self.server_step is None and self.ema is None):
            return parameters, metrics
        weights = parameters_to_ndarrays(parameters)
        if self.server_step is not None:
            weights, loss = self.server_step(server_round, weights)
            self.report(server_round).server_train_loss = loss
            parameters = ndarrays_to_parameters(weights)
            follow_global_model(self.inner, weights)
        if self.ema is not None:
            self.ema.update(weights)
        return parameters, metrics

    def _aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        report = self.report(server_round)
        report.num_results = len(results) + len(report.excluded_from_sum)
        report.failures = [_failure_reason(f) for f in failures]
        for reason in report.failures:
            log.warning("round %d: a client failed: %s", server_round, reason)
        accepted: list[tuple[ClientProxy, FitRes]] = []
        checked: list[tuple[str, ClientProxy, FitRes, list[np.ndarray], dict[str, Any]]] = []
        losses: list[tuple[float, int]] = []
        for proxy, res in results:
            client_id = _client_label(proxy, res)
            report.bytes_up += _payload_size(res)
            delta, metrics, reason = self._check(res)
            if reason is not None:
                log.warning("round %d: rejected the update of client %s: %s", server_round, client_id, reason)
                report.rejected.append({"client": client_id, "reason": reason})
                continue
            privacy = dp_status(metrics)
            reason = self.ledgers.check(client_id, privacy, server_round=server_round)
            if reason is not None:
                log.warning("round %d: rejected the update of client %s: %s", server_round, client_id, reason)
                report.rejected.append({"client": client_id, "reason": reason})
                continue
            if privacy:
                self.privacy[client_id] = privacy
                self.ledgers.accept(client_id, privacy, server_round=server_round)
            if self.central_dp is not None and not self.secure_aggregation:
                # Already validated (shapes, finite), so the guard only clips here.
                delta, info = guard_update(
                    delta, reference_shapes=self.expected_shapes, max_norm=self.central_dp.clipping_norm
                )
                if info.clipped:
                    log.warning("round %d: scaled the update of client %s down to the central-DP clip %g",
                                server_round, client_id, self.central_dp.clipping_norm)
                    report.reclipped.append(client_id)
            checked.append((client_id, proxy, res, delta, metrics))
            # Checked by validate_metrics: absent, or a finite number >= 0.
            loss = float(metrics["train-loss"]) if "train-loss" in metrics else None
            report.clients[client_id] = {"num_examples": int(res.num_examples), "train_loss": loss}
            if loss is not None:
                losses.append((loss, int(res.num_examples)))
        self.ledgers.save()
        # Replies arrive in completion order; a fixed order makes float aggregation, and so the run, reproducible.
        checked.sort(key=lambda item: item[0])
        deltas = [delta for _, _, _, delta, _ in checked]
        if self.norm_bound > 0 and deltas:
            deltas, bounded = bound_to_median_norm(deltas, factor=self.norm_bound)
            report.norm_bounded = [checked[i][0] for i in bounded]
        for (_, proxy, res, _, metrics), delta in zip(checked, deltas):
            weights = [g + d for g, d in zip(self._global, delta)]
            # Only the checked metrics travel on (to Flower's metrics hook and the report), never the raw ones.
            accepted.append((proxy, _replaced(res, parameters=ndarrays_to_parameters(weights), metrics=metrics)))
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
        mean = self.central_dp.keep_frozen(parameters_to_ndarrays(parameters), self._global)
        noisy = add_central_noise(mean, settings=self.central_dp, num_clients=len(uniform))
        report.central_noise_std = self.central_dp.noise_std(len(uniform))
        return ndarrays_to_parameters(noisy), metrics

    def screen_masked_reply(self, server_round: int, proxy: ClientProxy, res: FitRes) -> str | None:
        """Vets the clear metadata of a SecAgg+ reply before its masked vector joins the sum (issue 10 item 5).

        Under secure aggregation every FitRes later carries the same aggregate, so refusing a node in
        `aggregate_fit` would drop nothing from the sum: the refusal must happen here, where the workflow can still
        leave the node's vector out and unmask it as a dropped node. Checks what travels in the clear: the example
        count and the privacy-ledger sequence. The privacy record is committed later, in `aggregate_fit`, only if
        the round's aggregate is accepted.

        Returns:
            Why the node is refused (also recorded in the round's report), or None.
        """
        client_id = _client_label(proxy, res)
        privacy = dp_status(res.metrics) if isinstance(res.metrics, Mapping) else {}
        reason = validate_count(res.num_examples, max_examples=self.max_examples) or self.ledgers.check(
            client_id, privacy, server_round=server_round
        )
        if reason is not None:
            report = self.report(server_round)
            log.warning("round %d: left client %s out of the secure sum: %s", server_round, client_id, reason)
            report.rejected.append({"client": client_id, "reason": reason})
            report.excluded_from_sum.append(client_id)
        return reason

    def _check(self, res: FitRes) -> tuple[list[np.ndarray], dict[str, Any], str | None]:
        """Every field of a fit reply: the arrays (count, shapes, dtype, finiteness, norm), the example count and
        the metrics. Returns (delta, checked metrics, None) or ([], {}, why it is rejected); never raises."""
        try:
            arrays = parameters_to_ndarrays(res.parameters)
        except Exception as err:  # a peer's bytes are untrusted: any decoding failure is a rejection
            return [], {}, f"undecodable arrays ({type(err).__name__})"
        try:
            reason = validate_update(
                arrays,
                expected_shapes=self.expected_shapes,
                num_examples=res.num_examples,
                max_norm=self.max_update_norm,
                max_examples=self.max_examples,
            )
        except Exception as err:  # e.g. an object array or a count no comparison accepts: malformed, not fatal
            reason = f"malformed reply ({type(err).__name__})"
        if reason is not None:
            return [], {}, reason
        metrics, reason = validate_metrics(res.metrics, rules=FIT_METRICS, dp_status=True)
        if reason is not None:
            return [], {}, reason
        return arrays, metrics, None

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
        valid: list[tuple[str, EvaluateRes, dict[str, Any]]] = []
        for proxy, res in results:
            client_id = _client_label(proxy, res)
            metrics, reason = self._check_evaluate(res)
            if reason is not None:
                log.warning("round %d: rejected the evaluation of client %s: %s", server_round, client_id, reason)
                report.eval_rejected.append({"client": client_id, "reason": reason})
            elif metrics.get("metrics-withheld"):
                report.eval_withheld += 1
            else:
                valid.append((client_id, res, metrics))
        valid.sort(key=lambda item: item[0])
        for client_id, res, metrics in valid:
            report.eval_clients[client_id] = {
                "accuracy": float(metrics["accuracy"]),
                "loss": float(res.loss),
                "num_examples": int(res.num_examples),
            }
        if not valid:
            return None, {}
        total = sum(int(r.num_examples) for _, r, _ in valid)
        report.eval_loss = sum(float(r.loss) * int(r.num_examples) for _, r, _ in valid) / total
        accuracy = sum(float(m["accuracy"]) * int(r.num_examples) for _, r, m in valid) / total
        return report.eval_loss, {"accuracy": accuracy}

    def _check_evaluate(self, res: EvaluateRes) -> tuple[dict[str, Any], str | None]:
        """An evaluation reply: a finite loss >= 0, a count in [0, max-examples] and, when the count is positive,
        an accuracy in [0, 1]. A reply the site marked `metrics-withheld` carries no figures (see
        client/trainer.py)."""
        metrics, reason = validate_metrics(getattr(res, "metrics", None), rules=EVALUATE_METRICS)
        if reason is not None:
            return {}, reason
        if metrics.get("metrics-withheld"):
            return metrics, None
        num_examples, loss = getattr(res, "num_examples", None), getattr(res, "loss", None)
        if not is_count(num_examples) or not 0 < num_examples <= self.max_examples:
            return {}, f"num-examples {num_examples!r:.40} is not an integer in (0, {self.max_examples}]"
        if not (is_finite_number(loss) and loss >= 0):
            return {}, f"loss {loss!r:.40} is not a finite number >= 0"
        if "accuracy" not in metrics:
            return {}, "no accuracy"
        return metrics, None

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        # Flower calls this after every round's aggregation, a failed one included, so the final round's re-fit
        # happens here, before the round is scored: the last record then scores the model the run delivers.
        weights = self.ema.weights if self.ema is not None else parameters_to_ndarrays(parameters)
        if self.head_refit is not None and server_round == self.final_round > 0:
            weights, self.report(server_round).head_refit = self.head_refit(
                weights, evaluate=None if self.evaluate_fn is None else lambda w: self._score(server_round, w))
            self.final_weights = weights
        if self.evaluate_fn is None:
            return None
        loss, metrics = self.evaluate_fn(server_round, weights)
        self.server_metrics[server_round] = {"loss": loss, **metrics}
        return loss, metrics

    def _score(self, server_round: int, weights: list[np.ndarray]) -> dict[str, Any]:
        loss, metrics = self.evaluate_fn(server_round, weights)
        return {"loss": loss, **metrics}


def _replaced(res: FitRes, **changes: Any) -> FitRes:
    """A copy of `res` with some fields changed (FitRes is a plain dataclass; the original stays untouched)."""
    return dataclasses.replace(res, **changes)


def _client_label(proxy: ClientProxy, res: Any) -> str:
    """The name a reply's client goes by in logs and metrics: its `client-id` when that is a short printable
    string, else the node's ID (a hostile name must neither crash the round nor forge log lines)."""
    metrics = getattr(res, "metrics", None)
    claimed = metrics.get("client-id") if isinstance(metrics, Mapping) else None
    return claimed if is_label(claimed) else str(proxy.cid)


def _payload_size(res: Any) -> int:
    """Bytes of a reply's arrays, 0 when they are not a list of byte strings (the check then rejects them)."""
    try:
        return sum(len(t) for t in res.parameters.tensors if isinstance(t, (bytes, bytearray)))
    except (AttributeError, TypeError):
        return 0


def _failure_reason(failure: Any) -> str:
    if isinstance(failure, BaseException):
        return str(failure) or type(failure).__name__
    _, res = failure
    return getattr(getattr(res, "status", None), "message", "") or "client reported a failure"

