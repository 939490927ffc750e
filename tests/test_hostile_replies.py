"""Hostile replies never crash the server: property-based tests that throw arbitrary reply contents at the guard.

A client controls every field of its FitRes / EvaluateRes: the tensors, the example count, the loss and each
metric value. Whatever it sends, `GuardedStrategy.aggregate_fit` / `aggregate_evaluate` (and the round record the
ServerApp builds from them) must not raise, and the result must equal the aggregate of the well-formed replies
alone, computed independently here in float64.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server.server_app import FerWorkflow, weighted_mean_of
from server.strategies import create_strategy
from server.strategy import GuardedStrategy
from tests.test_strategy import SHAPES, _Proxy

MAX_NORM = 10.0
MAX_EXAMPLES = 1000
GLOBAL = [np.ones(s, np.float32) for s in SHAPES]
# Values no metric rule accepts (bytes, non-finite, None, negative, a string with a control character).
ALWAYS_BAD = [b"oops", float("nan"), float("inf"), float("-inf"), None, -1.5, "oops\n"]
# A reply's example count that is no count: none, over the cap, or not an int.
BAD_COUNTS = st.one_of(
    st.integers(max_value=0), st.integers(min_value=MAX_EXAMPLES + 1), st.booleans(), st.floats(),
    st.text(max_size=5), st.none(),
)
# A reply's metrics that are not a dict.
BAD_METRICS = st.sampled_from([None, [1, 2], "oops", 3.0])
# Any value a Flower metric can hold, for keys the server does not know (they must be ignored, whatever they are).
ANY_SCALAR = st.one_of(
    st.text(max_size=20), st.binary(max_size=20), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
# What client/trainer.py puts in a fit reply, and what the server reads of a node's DP status.
LABEL_KEYS = ("client-id", "profile", "dp-client-id", "dp-ledger-id")
NUMBER_KEYS = ("train-loss", "train-accuracy", "train-examples", "update-norm", "update-clipped", "dp-ledger-seq",
               "dp-epsilon-spent", "dp-epsilon-budget", "dp-delta", "dp-steps", "dp-rounds-charged")
JUNK_METRICS = st.dictionaries(st.text(min_size=1, max_size=8).map(lambda k: f"x-{k}"), ANY_SCALAR, max_size=3)


def _make_guard() -> GuardedStrategy:
    """FedAvg inside the guard, with the ServerApp's own metrics hooks (server_app.build_strategy)."""
    common = {
        "min_fit_clients": 1,
        "min_evaluate_clients": 1,
        "min_available_clients": 1,
        "initial_parameters": ndarrays_to_parameters(GLOBAL),
        "fit_metrics_aggregation_fn": weighted_mean_of("train-loss"),
        "evaluate_metrics_aggregation_fn": weighted_mean_of("accuracy"),
    }
    options = {"proximal_mu": 0.0, "server_lr": 0.1, "trimmed_beta": 0.2, "krum_malicious": 0}
    guard = GuardedStrategy(
        create_strategy("fedavg", common=common, options=options),
        expected_shapes=SHAPES,
        max_update_norm=MAX_NORM,
        max_examples=MAX_EXAMPLES,
    )
    guard._global = [g.copy() for g in GLOBAL]
    return guard


def _status() -> Status:
    return Status(code=Code.OK, message="")


# A well-formed delta: every value in [-1, 1], so its norm (at most sqrt(10)) is inside MAX_NORM.
valid_deltas = st.tuples(
    *[hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)) for shape in SHAPES]
).map(list)


@st.composite
def valid_fit(draw) -> dict:
    """The parts of a well-formed fit reply (the client-id is given when the reply is built)."""
    metrics = draw(JUNK_METRICS)
    if draw(st.booleans()):
        metrics["train-loss"] = draw(st.floats(0, 10))
    if draw(st.booleans()):
        metrics["dp-ledger-seq"] = draw(st.integers(0, 100))
    return {"delta": draw(valid_deltas), "num_examples": draw(st.integers(1, MAX_EXAMPLES)), "metrics": metrics}


@st.composite
def hostile_fit(draw) -> dict:
    """A fit reply with at least one field that no honest client sends."""
    reply = draw(valid_fit())
    flaw = draw(st.sampled_from(["arrays", "tensors", "count", "metric", "metrics"]))
    if flaw == "arrays":
        delta = reply["delta"]
        kind = draw(st.sampled_from(["missing", "extra", "shape", "dtype", "nan", "inf", "norm"]))
        if kind == "missing":
            delta = delta[:-1]
        elif kind == "extra":
            delta = delta + [np.zeros(3, np.float32)]
        elif kind == "shape":
            delta = [delta[0].reshape(-1)] + delta[1:]
        elif kind == "dtype":
            delta = [delta[0].astype(draw(st.sampled_from([np.float64, np.float16, np.int32])))] + delta[1:]
        elif kind in ("nan", "inf"):
            delta = [d.copy() for d in delta]
            delta[draw(st.integers(0, len(SHAPES) - 1))].flat[0] = np.nan if kind == "nan" else -np.inf
        else:
            delta = [d + np.float32(draw(st.floats(50, 1e20))) for d in delta]
        reply["parameters"] = ndarrays_to_parameters(delta)
    elif flaw == "tensors":
        tensors = draw(st.one_of(st.lists(st.binary(max_size=40), max_size=3), st.just([None]), st.just(None)))
        reply["parameters"] = Parameters(tensors=tensors, tensor_type="numpy.ndarray")
    elif flaw == "count":
        reply["num_examples"] = draw(BAD_COUNTS)
    elif flaw == "metric":
        key = draw(st.sampled_from(LABEL_KEYS + NUMBER_KEYS))
        bad = ALWAYS_BAD + ([] if key in LABEL_KEYS else ["oops"])
        reply["metrics"] = {**reply["metrics"], key: draw(st.sampled_from(bad))}
    else:
        reply["metrics"] = draw(BAD_METRICS)
    return reply


def _named(metrics, client: str):
    """A reply's metrics with `client` as its client-id unless it names one (or is no dict)."""
    if isinstance(metrics, dict) and "client-id" not in metrics:
        return {**metrics, "client-id": client}
    return metrics


def _fitres(reply: dict, client: str) -> FitRes:
    parameters = reply.get("parameters") or ndarrays_to_parameters(reply["delta"])
    return FitRes(status=_status(), parameters=parameters, num_examples=reply["num_examples"],
                  metrics=_named(reply["metrics"], client))


def _draw_replies(plan, *, good, hostile, to_result) -> tuple[list, list[dict]]:
    """A good or a hostile reply from site i for each (is_good, data) of `plan`: the (proxy, result) pairs the
    strategy receives, and the good replies."""
    drawn = [(is_good, data.draw(good() if is_good else hostile())) for is_good, data in plan]
    results = [(_Proxy(str(i)), to_result(reply, f"site-{i}")) for i, (_, reply) in enumerate(drawn)]
    return results, [reply for is_good, reply in drawn if is_good]


def _expected_fedavg(replies: list[dict]) -> list[np.ndarray]:
    """global + the example-weighted mean of the deltas, in float64."""
    total = sum(r["num_examples"] for r in replies)
    return [
        g.astype(np.float64) + sum(r["num_examples"] * r["delta"][k].astype(np.float64) for r in replies) / total
        for k, g in enumerate(GLOBAL)
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.data()), min_size=1, max_size=8))
def test_aggregate_fit_never_raises_and_equals_fedavg_over_the_valid_replies(plan):
    """Any mix of good and hostile fit replies: no exception; the aggregate is FedAvg over the good ones only."""
    # Prepare
    guard = _make_guard()
    results, valid = _draw_replies(plan, good=valid_fit, hostile=hostile_fit, to_result=_fitres)

    # Execute
    parameters, _ = guard.aggregate_fit(1, results, [])
    record = FerWorkflow(strategy=guard, num_rounds=1, start_weights=GLOBAL)._record(1, 0.0).to_json()

    # Assert
    report = guard.report(1)
    assert report.num_accepted == len(valid)
    assert len(report.rejected) == len(results) - len(valid)
    assert record["fit"]["num_rejected"] == len(results) - len(valid)
    if not valid:
        assert parameters is None
        return
    for actual, expected in zip(parameters_to_ndarrays(parameters), _expected_fedavg(valid)):
        np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=1e-5, atol=1e-5)
    losses = [(r["metrics"]["train-loss"], r["num_examples"]) for r in valid if "train-loss" in r["metrics"]]
    if losses:
        assert math.isclose(report.train_loss, sum(l * n for l, n in losses) / sum(n for _, n in losses),
                            rel_tol=1e-9, abs_tol=1e-9)


@st.composite
def valid_evaluate(draw) -> dict:
    metrics = {**draw(JUNK_METRICS), "accuracy": draw(st.floats(0, 1))}
    return {"loss": draw(st.floats(0, 20)), "num_examples": draw(st.integers(1, MAX_EXAMPLES)), "metrics": metrics}


@st.composite
def hostile_evaluate(draw) -> dict:
    reply = draw(valid_evaluate())
    flaw = draw(st.sampled_from(["loss", "count", "accuracy", "missing", "client", "metrics"]))
    if flaw == "loss":
        reply["loss"] = draw(st.sampled_from(ALWAYS_BAD + ["oops", True]))
    elif flaw == "count":
        reply["num_examples"] = draw(BAD_COUNTS)
    elif flaw == "accuracy":
        reply["metrics"]["accuracy"] = draw(st.sampled_from(ALWAYS_BAD + ["oops", 1.5, True]))
    elif flaw == "missing":
        del reply["metrics"]["accuracy"]
    elif flaw == "client":
        reply["metrics"]["client-id"] = draw(st.sampled_from(ALWAYS_BAD + [7, "x" * 500]))
    else:
        reply["metrics"] = draw(BAD_METRICS)
    return reply


def _evaluateres(reply: dict, client: str) -> EvaluateRes:
    return EvaluateRes(status=_status(), loss=reply["loss"], num_examples=reply["num_examples"],
                       metrics=_named(reply["metrics"], client))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.data()), min_size=1, max_size=8))
def test_aggregate_evaluate_never_raises_and_averages_the_valid_replies(plan):
    """Any mix of good and hostile evaluate replies: no exception (also building the round record, whose
    per-client spread rejects non-finite accuracies); loss and accuracy are the weighted means of the good ones."""
    # Prepare
    guard = _make_guard()
    results, valid = _draw_replies(plan, good=valid_evaluate, hostile=hostile_evaluate, to_result=_evaluateres)

    # Execute
    loss, metrics = guard.aggregate_evaluate(1, results, [])
    record = FerWorkflow(strategy=guard, num_rounds=1, start_weights=GLOBAL)._record(1, 0.0).to_json()

    # Assert
    assert len(guard.report(1).eval_rejected) == len(results) - len(valid)
    if not valid:
        assert loss is None and metrics == {} and record["federated"] is None
        return
    total = sum(r["num_examples"] for r in valid)
    assert math.isclose(loss, sum(r["loss"] * r["num_examples"] for r in valid) / total, rel_tol=1e-9, abs_tol=1e-12)
    accuracy = sum(r["metrics"]["accuracy"] * r["num_examples"] for r in valid) / total
    assert math.isclose(metrics["accuracy"], accuracy, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(record["federated"]["accuracy"], accuracy, rel_tol=1e-9, abs_tol=1e-12)
    assert record["federated"]["distribution"]["n"] == len(valid)


def test_a_metric_value_of_oops_is_rejected_not_raised():
    """The reproduced crash: train-loss "oops" (fit) and accuracy "oops" (evaluate) are rejected with a reason."""
    # Prepare
    guard = _make_guard()
    good = FitRes(_status(), ndarrays_to_parameters([np.zeros(s, np.float32) for s in SHAPES]), 10,
                  {"client-id": "good", "train-loss": 1.0})
    bad = FitRes(_status(), ndarrays_to_parameters([np.zeros(s, np.float32) for s in SHAPES]), 10,
                 {"client-id": "bad", "train-loss": "oops"})
    bad_eval = EvaluateRes(_status(), 1.0, 10, {"client-id": "bad", "accuracy": "oops"})

    # Execute
    parameters, fit_metrics = guard.aggregate_fit(1, [(_Proxy("1"), good), (_Proxy("2"), bad)], [])
    loss, _ = guard.aggregate_evaluate(1, [(_Proxy("2"), bad_eval)], [])

    # Assert
    assert parameters is not None and fit_metrics == {"train-loss": 1.0}
    assert guard.report(1).rejected == [{"client": "bad", "reason": "metric 'train-loss' must be a finite number >= 0, "
                                                                    "got 'oops'"}]
    assert loss is None
    assert "accuracy" in guard.report(1).eval_rejected[0]["reason"]
