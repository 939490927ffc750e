"""Byzantine sites: 3 of 15 send hostile updates; robust aggregation keeps the global update near the honest one.

The strategy-level tests use CNN-AM's real parameter shapes (1.2 M values), the server's real guard and Flower's
real strategies, and poison updates with the same functions the simulation's hostile sites use
(simulation.attacks). The honest sites' updates agree to within 3 % (an IID federation); the hostile sites' own
updates point elsewhere (their data differs, which is why they lie). The figure is the relative L2 distance between
the aggregated update and the example-weighted mean of the honest updates alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from client.config import RunSettings
from server.replies import bound_to_median_norm
from server.strategies import create_strategy
from server.strategy import GuardedStrategy
from simulation.attacks import ATTACK_REGISTRY, LIED_COUNT, attacker_partitions, flip_labels
from tests.test_strategy import _Proxy

NUM_SITES, NUM_ATTACKERS = 15, 3
HONEST_SPREAD = 0.03
TOLERANCE = 0.05
UPDATE_ATTACKS = ["scale", "sign-flip", "lie-count", "noise"]
ROBUST = ["fedmedian", "fedtrimmedavg", "krum"]


def _norm(arrays) -> float:
    return float(np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for a in arrays)))


def _unit(rng: np.random.Generator, shapes) -> list[np.ndarray]:
    arrays = [rng.standard_normal(shape) for shape in shapes]
    norm = _norm(arrays)
    return [a / norm for a in arrays]


@pytest.fixture(scope="module")
def federation():
    """Global weights and one update per site: honest = a common direction + 3 % site noise (norm 1), hostile =
    another direction of the same norm; plus each site's example count."""
    from server.server_app import initial_weights

    global_weights = initial_weights(RunSettings())
    shapes = [w.shape for w in global_weights]
    rng = np.random.default_rng(7)
    common = _unit(rng, shapes)
    hostile = set(range(NUM_SITES - NUM_ATTACKERS, NUM_SITES))
    updates, counts = [], []
    for site in range(NUM_SITES):
        if site in hostile:
            update = _unit(rng, shapes)
        else:
            noise = _unit(rng, shapes)
            update = [c + HONEST_SPREAD * n for c, n in zip(common, noise)]
        updates.append([u.astype(np.float32) for u in update])
        counts.append(int(rng.integers(100, 500)))
    return global_weights, updates, counts, hostile


def _make_guard(name: str, global_weights, *, norm_bound: float = 0.0) -> GuardedStrategy:
    common = {"min_fit_clients": 1, "min_available_clients": 1,
              "initial_parameters": ndarrays_to_parameters(global_weights)}
    options = {"proximal_mu": 0.0, "server_lr": 0.1, "trimmed_beta": 0.2, "krum_malicious": NUM_ATTACKERS}
    guard = GuardedStrategy(
        create_strategy(name, common=common, options=options),
        expected_shapes=[w.shape for w in global_weights],
        # The guard's own norm bound is a defence of its own (it rejects x100 updates of a norm-1 site); it is set
        # out of the way here so that the aggregation rules face the attacks.
        max_update_norm=1e4,
        max_examples=LIED_COUNT,
        norm_bound=norm_bound,
    )
    guard._global = global_weights
    return guard


def _aggregate_distance(federation, *, strategy: str, attack: str, norm_bound: float = 0.0) -> float:
    """Relative L2 distance between the guarded strategy's update and the honest sites' FedAvg update."""
    global_weights, updates, counts, hostile = federation
    rng = np.random.default_rng(11)
    results = []
    for site, (update, count) in enumerate(zip(updates, counts)):
        if site in hostile:
            update, count = ATTACK_REGISTRY[attack].poison(update, count, rng)
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), count, {"client-id": f"site-{site:02d}"})
        results.append((_Proxy(str(site)), fitres))
    parameters, _ = _make_guard(strategy, global_weights, norm_bound=norm_bound).aggregate_fit(1, results, [])
    aggregated = [a.astype(np.float64) - g for a, g in zip(parameters_to_ndarrays(parameters), global_weights)]
    honest = [s for s in range(NUM_SITES) if s not in hostile]
    total = sum(counts[s] for s in honest)
    reference = [sum(counts[s] * updates[s][k].astype(np.float64) for s in honest) / total
                 for k in range(len(global_weights))]
    return _norm([a - r for a, r in zip(aggregated, reference)]) / _norm(reference)


@pytest.mark.parametrize("norm_bound", [0.0, 1.5], ids=["plain", "norm-bounded"])
@pytest.mark.parametrize("attack", UPDATE_ATTACKS)
@pytest.mark.parametrize("strategy", ROBUST)
def test_robust_strategies_stay_within_5_percent_of_the_honest_aggregate(federation, strategy, attack, norm_bound):
    """Median, trimmed mean and Krum (with or without server-side norm bounding) move < 5 % under 3 of 15
    hostile sites."""
    # Execute
    distance = _aggregate_distance(federation, strategy=strategy, attack=attack, norm_bound=norm_bound)

    # Assert
    assert distance < TOLERANCE, f"{strategy} under {attack}: {distance:.3f}"


@pytest.mark.parametrize("attack", UPDATE_ATTACKS)
def test_fedavg_is_pulled_away_by_the_same_attacks(federation, attack):
    """The same 3 hostile sites move FedAvg's update by more than 5 %: the robust results above are not vacuous."""
    # Execute
    distance = _aggregate_distance(federation, strategy="fedavg", attack=attack)

    # Assert
    assert distance > TOLERANCE, f"fedavg under {attack}: {distance:.3f}"


def test_norm_bounding_takes_the_amplification_out_of_scaled_updates(federation):
    """Server-side norm bounding cuts FedAvg's x100 distortion more than tenfold; what is left is the hostile sites'
    pull at an honest norm, which bounding cannot see (the robust rules above remove it)."""
    # Execute
    unbounded = _aggregate_distance(federation, strategy="fedavg", attack="scale")
    bounded = _aggregate_distance(federation, strategy="fedavg", attack="scale", norm_bound=1.0)

    # Assert
    assert unbounded > 1.0
    assert bounded < unbounded / 10


def test_bound_to_median_norm_scales_only_the_outliers():
    """Norms 1, 2, 3, 100 with factor 1.5: the median is 2.5, so only 100 (to 3.75) is scaled down."""
    # Prepare
    deltas = [[np.full(4, value / 2, np.float32)] for value in (1.0, 2.0, 3.0, 100.0)]  # L2 norm = value

    # Execute
    bounded, scaled = bound_to_median_norm(deltas, factor=1.5)

    # Assert
    assert scaled == [3]
    assert [round(_norm(d), 5) for d in bounded] == [1.0, 2.0, 3.0, 3.75]
    assert bounded[0][0] is deltas[0][0]


def test_attackers_are_drawn_from_the_seed_and_labels_flip_pairwise():
    """The hostile sites are a reproducible, seed-dependent subset; a flipped label set has class k as 6 - k."""
    # Prepare
    settings = RunSettings(num_clients=15, attackers=3)

    # Execute
    chosen = attacker_partitions(settings, num_sites=15)
    again = attacker_partitions(settings, num_sites=15)
    other = {attacker_partitions(settings.replace(seed=s), num_sites=15) for s in range(5)}

    # Assert
    assert chosen == again and len(set(chosen)) == 3 and all(0 <= p < 15 for p in chosen)
    assert len(other) > 1
    assert flip_labels(np.arange(7, dtype=np.int64)).tolist() == [6, 5, 4, 3, 2, 1, 0]


@pytest.mark.slow
def test_fer_sim_run_with_attackers_records_and_plays_them(tmp_path):
    """`fer-sim run --attackers 1 --attack scale` on synthetic faces: config.json, partition.json, summary.json and
    report.md name the hostile site, and the server's guard rejects its x100 update (it exceeds max-update-norm,
    which the honest sites clip to)."""
    from typer.testing import CliRunner

    from simulation.cli.main import _register, app

    # Prepare
    _register()
    out = tmp_path / "run"
    args = ["run", "--dataset", "synthetic=300", "--num-clients", "3", "--rounds", "1", "--local-epochs", "1",
            "--attackers", "1", "--attack", "scale", "--config", str(_config(tmp_path)), "--out", str(out)]

    # Execute
    result = CliRunner().invoke(app, args)

    # Assert
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["attackers"], config["attack"]) == (1, "scale")
    summary = json.loads((out / "summary.json").read_text())
    hostile = summary["attackers"]
    assert len(hostile) == 1 and summary["attack"] == "scale"
    partition = json.loads((out / "partition.json").read_text())
    assert [c for c, v in partition["clients"].items() if v["attacker"]] == hostile
    assert hostile[0] in (out / "report.md").read_text()
    round_1 = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1]
    assert [r["client"] for r in round_1["fit"]["rejected"]] == hostile
    assert "exceeds the bound" in round_1["fit"]["rejected"][0]["reason"]


def _config(tmp_path):
    """Keys without a command-line option: honest sites clip to norm 1, so a x100 update cannot pass the guard."""
    path = tmp_path / "run.toml"
    path.write_text('max-update-norm = 1.0\nmin-clients = 3\n')
    return path
