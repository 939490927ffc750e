"""Update validation and the guarded strategies: malformed replies are rejected, the round goes on with the rest."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

from server.strategies import create_strategy, list_strategies
from server.strategy import GuardedStrategy, validate_update

SHAPES = [(3, 2), (4,)]


class _Proxy(ClientProxy):
    """A ClientProxy is only an identity for strategies; the transport methods are never called here."""

    def get_properties(self, ins, timeout, group_id):  # pragma: no cover - not used by aggregation
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


def _make_delta(value: float) -> list[np.ndarray]:
    return [np.full(shape, value, dtype=np.float32) for shape in SHAPES]


def _make_fitres(arrays, *, num_examples: int = 10, client: str = "c") -> FitRes:
    return FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(arrays),
        num_examples=num_examples,
        metrics={"client-id": client, "train-loss": 1.0},
    )


def _make_guard(name: str = "fedavg", **options) -> GuardedStrategy:
    initial = [np.zeros(s, np.float32) for s in SHAPES]
    common = {"min_fit_clients": 1, "min_available_clients": 1, "initial_parameters": ndarrays_to_parameters(initial)}
    opts = {"proximal_mu": 0.1, "server_lr": 0.1, "trimmed_beta": 0.2, "krum_malicious": 0} | options
    guard = GuardedStrategy(
        create_strategy(name, common=common, options=opts),
        expected_shapes=SHAPES,
        max_update_norm=10.0,
        max_examples=1000,
    )
    guard._global = [np.ones(s, np.float32) for s in SHAPES]  # the global model the deltas were computed against
    return guard


def _params(arrays) -> Parameters:
    return ndarrays_to_parameters(arrays)


@pytest.mark.parametrize(
    ("arrays", "num_examples", "expected"),
    [
        (_make_delta(0.1)[:1], 10, "expected 2 arrays"),
        ([np.zeros((2, 3), np.float32), np.zeros(4, np.float32)], 10, "shape"),
        ([np.zeros((3, 2), np.float64), np.zeros(4, np.float32)], 10, "dtype"),
        ([np.full((3, 2), np.nan, np.float32), np.zeros(4, np.float32)], 10, "NaN or Inf"),
        ([np.zeros((3, 2), np.float32), np.full(4, np.inf, np.float32)], 10, "NaN or Inf"),
        (_make_delta(5.0), 10, "exceeds the bound"),
        (_make_delta(0.1), 0, "not positive"),
        (_make_delta(0.1), -3, "not positive"),
        (_make_delta(0.1), 10**9, "plausible maximum"),
    ],
)
def test_validate_update_names_the_problem(arrays, num_examples, expected):
    """Each kind of malformed update is rejected with a reason that names it."""
    reason = validate_update(arrays, expected_shapes=SHAPES, num_examples=num_examples, max_norm=10.0, max_examples=1000)

    assert expected in reason


def test_validate_update_passes_a_good_update():
    """A well-formed update within the bounds has no reason to be rejected."""
    assert validate_update(_make_delta(0.1), expected_shapes=SHAPES, num_examples=10, max_norm=10.0,
                           max_examples=1000) is None


def test_malformed_updates_are_rejected_and_the_round_goes_on():
    """With one good, one NaN and one zero-count reply, the aggregate is global + the good delta alone."""
    guard = _make_guard()
    results = [
        (_Proxy("1"), _make_fitres(_make_delta(0.5), client="good")),
        (_Proxy("2"), _make_fitres([np.full((3, 2), np.nan, np.float32), np.zeros(4, np.float32)], client="nan")),
        (_Proxy("3"), _make_fitres(_make_delta(0.2), num_examples=0, client="zero")),
    ]

    parameters, _ = guard.aggregate_fit(1, results, [])

    aggregated = parameters_to_ndarrays(parameters)
    assert [a.tolist() for a in aggregated] == [np.full(s, 1.5, np.float32).tolist() for s in SHAPES]
    report = guard.report(1)
    assert report.num_accepted == 1
    assert {r["client"] for r in report.rejected} == {"nan", "zero"}


def test_fedavg_weights_deltas_by_example_count():
    """FedAvg through the guard equals global + the example-weighted mean of deltas (an independent computation)."""
    guard = _make_guard()
    results = [
        (_Proxy("1"), _make_fitres(_make_delta(1.0), num_examples=30, client="a")),
        (_Proxy("2"), _make_fitres(_make_delta(-1.0), num_examples=10, client="b")),
    ]

    parameters, _ = guard.aggregate_fit(1, results, [])

    expected = 1.0 + (30 * 1.0 + 10 * -1.0) / 40
    assert all(np.allclose(a, expected) for a in parameters_to_ndarrays(parameters))


def test_no_acceptable_update_leaves_the_model_unchanged():
    """When every reply is malformed the strategy returns no parameters (the workflow keeps the old model)."""
    guard = _make_guard()

    parameters, metrics = guard.aggregate_fit(1, [(_Proxy("1"), _make_fitres(_make_delta(9.0)))], [])

    assert parameters is None and metrics == {}
    assert guard.report(1).rejected[0]["reason"].startswith("update norm")


def test_undecodable_bytes_are_rejected_not_unpickled():
    """A reply whose tensors are not .npy bytes is rejected (numpy loads with allow_pickle=False)."""
    guard = _make_guard()
    bogus = FitRes(Status(Code.OK, ""), Parameters(tensors=[b"\x80\x04not-npy", b""], tensor_type="numpy.ndarray"), 5, {})

    parameters, _ = guard.aggregate_fit(1, [(_Proxy("1"), bogus)], [])

    assert parameters is None
    assert "undecodable" in guard.report(1).rejected[0]["reason"]


SERVER_OPTIMISERS = ("fedadam", "fedavgm", "fedyogi")  # their step depends on the server lr, not just the average


@pytest.mark.parametrize("name", [name for name in list_strategies() if name not in SERVER_OPTIMISERS])
def test_every_strategy_aggregates_identical_updates_to_that_update(name):
    """Identical accepted deltas must give global + delta under every registered averaging rule."""
    guard = _make_guard(name)
    results = [(_Proxy(str(i)), _make_fitres(_make_delta(0.5), client=f"c{i}")) for i in range(5)]

    parameters, _ = guard.aggregate_fit(1, results, [])

    assert all(np.allclose(a, 1.5) for a in parameters_to_ndarrays(parameters))


def test_fedadam_steps_from_its_initial_weights_towards_identical_updates():
    """FedAdam starts from its initial (zero) weights and takes one adaptive step towards the average (1.5)."""
    guard = _make_guard("fedadam")
    results = [(_Proxy(str(i)), _make_fitres(_make_delta(0.5), client=f"c{i}")) for i in range(5)]

    parameters, _ = guard.aggregate_fit(1, results, [])

    assert all(np.all((a > 0) & (a < 1.5)) for a in parameters_to_ndarrays(parameters))


def test_fedavgm_matches_sgd_with_momentum_on_the_averaged_update():
    """FedAvgM's two rounds equal heavy-ball SGD on the negated average delta, computed here independently."""
    lr, momentum = 0.5, 0.9
    guard = _make_guard("fedavgm", server_lr=lr, server_momentum=momentum)
    guard._global = [np.zeros(s, np.float32) for s in SHAPES]  # the strategy's own initial weights
    weights = np.zeros(1)
    velocity = None
    for server_round, deltas in ((1, (0.2, 0.6)), (2, (-0.1, 0.3))):
        results = [(_Proxy(str(i)), _make_fitres(_make_delta(d), num_examples=n, client=f"c{i}"))
                   for i, (d, n) in enumerate(zip(deltas, (10, 30)))]

        parameters, _ = guard.aggregate_fit(server_round, results, [])

        gradient = -(deltas[0] * 10 + deltas[1] * 30) / 40
        velocity = gradient if velocity is None else momentum * velocity + gradient
        weights = weights - lr * velocity
        got = parameters_to_ndarrays(parameters)
        assert all(np.allclose(a, weights[0], atol=1e-6) for a in got)
        guard._global = got


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_lr_zero_takes_the_strategys_default(name):
    """server-lr 0 gives the adaptive optimisers their 0.01 step, the one RunSettings documents."""
    initial = ndarrays_to_parameters([np.zeros(s, np.float32) for s in SHAPES])
    strategy = create_strategy(name, common={"initial_parameters": initial}, options={"server_lr": 0.0})

    assert strategy.eta == pytest.approx(0.01)


@pytest.mark.parametrize(("name", "bias_correction"), [("fedadam", True), ("fedyogi", False)])
def test_adaptive_first_step_divides_by_root_v_plus_server_tau(name, bias_correction):
    """Round 1's step equals eta * m / (sqrt(v) + tau) computed here, so server-tau reaches Flower's optimiser."""
    eta, tau, beta_1, beta_2 = 0.1, 0.15, 0.9, 0.99
    guard = _make_guard(name, server_lr=eta, server_tau=tau)  # initial weights 0; the accepted average is 1.5
    results = [(_Proxy(str(i)), _make_fitres(_make_delta(0.5), client=f"c{i}")) for i in range(3)]

    parameters, _ = guard.aggregate_fit(1, results, [])

    m, v = (1 - beta_1) * 1.5, (1 - beta_2) * 1.5**2  # both moments start at zero
    rate = eta * np.sqrt(1 - beta_2**2) / (1 - beta_1**2) if bias_correction else eta  # Flower 1.41: Adam's only
    assert all(np.allclose(a, rate * m / (np.sqrt(v) + tau)) for a in parameters_to_ndarrays(parameters))


def test_unknown_strategy_lists_known_ones():
    """create_strategy names the known strategies when given an unknown one."""
    with pytest.raises(ValueError, match="known: fedadam, fedavg, fedavgm"):
        create_strategy("fedsgd", common={}, options={})


def test_metrics_aggregator_weights_by_examples_and_skips_empty_replies():
    """Flower's metrics hook gets the example-weighted mean; replies without the key or examples do not count."""
    from server.server_app import weighted_mean_of

    aggregate = weighted_mean_of("accuracy")

    assert aggregate([(10, {"accuracy": 0.5}), (30, {"accuracy": 0.9}), (0, {"accuracy": 1.0}), (5, {})]) == {
        "accuracy": pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    }
    assert aggregate([(5, {})]) == {}


# --- robust rules against an outlier ------------------------------------------------------------------------------

def _make_outlier_round(*, honest: int = 4, seed: int = 0) -> list[list[np.ndarray]]:
    """`honest` deltas scattered around 0.2 (per element) and one last outlier at 3.0 on every element: norm 9.5,
    inside the guard's bound of 10, so only the aggregation rule can keep it out."""
    rng = np.random.default_rng(seed)
    deltas = [[rng.uniform(0.1, 0.3, shape).astype(np.float32) for shape in SHAPES] for _ in range(honest)]
    return [*deltas, [np.full(shape, 3.0, np.float32) for shape in SHAPES]]


def _aggregate(name: str, deltas: list[list[np.ndarray]], **options) -> list[np.ndarray]:
    guard = _make_guard(name, **options)
    results = [(_Proxy(str(i)), _make_fitres(d, num_examples=10 + 7 * i, client=f"c{i}")) for i, d in enumerate(deltas)]
    parameters, _ = guard.aggregate_fit(1, results, [])
    assert guard.report(1).num_accepted == len(deltas)  # the guard let the outlier through: the rule must cope
    return parameters_to_ndarrays(parameters)


def test_fedavg_is_pulled_by_an_outlier():
    """The contrast the robust rules are tested against: FedAvg's example-weighted mean moves towards the outlier."""
    deltas = _make_outlier_round()
    weights = np.array([10 + 7 * i for i in range(len(deltas))], float)

    aggregated = _aggregate("fedavg", deltas)

    for k, array in enumerate(aggregated):
        expected = 1.0 + sum(w * d[k] for w, d in zip(weights, deltas)) / weights.sum()
        np.testing.assert_allclose(array, expected, rtol=1e-5)
        assert np.all(array > 1.3)  # every honest delta is <= 0.3


def test_fedmedian_takes_the_coordinate_wise_median():
    """FedMedian gives global + the per-element median of the deltas, which the outlier cannot move past the
    honest values."""
    deltas = _make_outlier_round()

    aggregated = _aggregate("fedmedian", deltas)

    for k, array in enumerate(aggregated):
        stacked = np.stack([d[k] for d in deltas])
        np.testing.assert_allclose(array, 1.0 + np.median(stacked, axis=0), rtol=1e-6)
        assert np.all(array <= 1.3)


def test_fedtrimmedavg_drops_the_extremes_of_each_coordinate():
    """With beta 0.2 and 5 clients, each element drops its lowest and highest value (the outlier's among them)
    and averages the middle 3 without example weights."""
    deltas = _make_outlier_round()

    aggregated = _aggregate("fedtrimmedavg", deltas, trimmed_beta=0.2)

    for k, array in enumerate(aggregated):
        middle = np.sort(np.stack([d[k] for d in deltas]), axis=0)[1:-1]
        np.testing.assert_allclose(array, 1.0 + middle.mean(axis=0), rtol=1e-6)
        assert np.all(array <= 1.3)


def test_krum_selects_the_most_central_update_never_the_outlier():
    """Krum (f = 1) returns the one update whose n - f - 2 nearest neighbours are closest, scored here by hand."""
    deltas = _make_outlier_round()
    flat = [np.concatenate([a.ravel() for a in d]).astype(np.float64) for d in deltas]
    keep = len(flat) - 1 - 2
    scores = [sorted(float(((x - y) ** 2).sum()) for j, y in enumerate(flat) if j != i)[:keep]
              for i, x in enumerate(flat)]
    chosen = int(np.argmin([sum(s) for s in scores]))

    aggregated = _aggregate("krum", deltas, krum_malicious=1)

    assert chosen != len(deltas) - 1
    for k, array in enumerate(aggregated):
        np.testing.assert_allclose(array, 1.0 + deltas[chosen][k], rtol=1e-6)


def test_a_node_that_reconnects_while_the_round_waits_is_sampled_with_every_other():
    """min-available 3, two nodes online, a third joins while the round waits: all three are sampled."""
    # Prepare
    import threading

    from flwr.server.client_manager import SimpleClientManager

    guard = _make_guard()
    guard.inner.min_available_clients = 3
    manager = SimpleClientManager()
    for cid in ("a", "b"):
        manager.register(_Proxy(cid))
    late = threading.Timer(0.3, manager.register, args=(_Proxy("c"),))

    # Execute
    late.start()
    instructions = guard.configure_fit(1, _params(_make_delta(0.0)), manager)
    late.join()

    # Assert
    assert sorted(proxy.cid for proxy, _ in instructions) == ["a", "b", "c"]


def _run_rounds(name: str, *, step: list[np.ndarray] | None, rounds: int = 3) -> list[list[np.ndarray]]:
    """`rounds` rounds of two clients replying fixed deltas; with `step`, a server step that adds it after round 1."""
    guard = _make_guard(name, server_lr=0.5, server_momentum=0.9)
    guard._global = [np.zeros(s, np.float32) for s in SHAPES]  # the strategy's own initial weights
    if step is not None:
        guard.server_step = lambda r, w: ([a + b for a, b in zip(w, step)] if r == 1 else w, 0.0)
    history = []
    for server_round in range(1, rounds + 1):
        results = [(_Proxy(str(i)), _make_fitres(_make_delta(d), client=f"c{i}"))
                   for i, d in enumerate((0.2 * server_round, -0.1))]
        parameters, _ = guard.aggregate_fit(server_round, results, [])
        guard._global = parameters_to_ndarrays(parameters)  # what configure_fit sends the next round
        history.append(guard._global)
    return history


@pytest.mark.parametrize("name", list_strategies())
def test_a_server_step_moves_the_model_as_if_it_had_been_there(name):
    """After a server-learning step every strategy's later rounds equal the run without it, shifted by the step:
    no server optimiser re-applies (FedAvgM's momentum) or re-scales (FedAdam) the step in later rounds."""
    # Prepare
    step = [np.full(s, 0.3, np.float32) for s in SHAPES]

    # Execute
    plain = _run_rounds(name, step=None)
    stepped = _run_rounds(name, step=step)

    # Assert
    for server_round, (a, b) in enumerate(zip(plain, stepped), start=1):
        for x, y, s in zip(a, b, step):
            np.testing.assert_allclose(y, x + s, atol=1e-5, err_msg=f"round {server_round}")
