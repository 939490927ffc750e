"""Central (client-level) DP: clients clip, every client weighs the same, the server adds noise of std σC/n."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import parameters_to_ndarrays

from client.client_app import make_client_app
from client.config import ConfigError, RunSettings
from privacy.accounting import central_epsilon
from privacy.central import CentralDP, add_central_noise
from server.server_app import build_privacy_report, initial_weights
from server.strategies import create_strategy
from server.strategy import GuardedStrategy
from tests.test_client_app import _make_context, _make_message
from tests.test_strategy import SHAPES, _make_delta, _make_fitres, _params, _Proxy

from flwr.compat.common import recorddict_compat as compat


def _make_central_guard(*, noise: float, clip: float) -> GuardedStrategy:
    initial = [np.zeros(s, np.float32) for s in SHAPES]
    common = {"min_fit_clients": 1, "min_available_clients": 1, "initial_parameters": _params(initial)}
    guard = GuardedStrategy(
        create_strategy("fedavg", common=common, options={}),
        expected_shapes=SHAPES,
        max_update_norm=10.0,
        max_examples=1000,
        central_dp=CentralDP(noise_multiplier=noise, clipping_norm=clip),
    )
    guard._global = [np.ones(s, np.float32) for s in SHAPES]
    return guard


def test_noise_has_std_sigma_c_over_n_and_zero_mean():
    """On a million coordinates the added noise has the calibrated std σC/n (within 1 %) and mean ~0."""
    settings = CentralDP(noise_multiplier=1.5, clipping_norm=2.0)
    zeros = [np.zeros(1_000_000, np.float32)]

    noisy = add_central_noise(zeros, settings=settings, num_clients=4, rng=np.random.default_rng(0))

    assert noisy[0].dtype == np.float32
    assert float(noisy[0].std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.01)
    assert abs(float(noisy[0].mean())) < 0.005
    assert not zeros[0].any()  # the input is left untouched


def test_central_dp_averages_uniformly_whatever_the_example_counts():
    """Under central DP a client claiming 30 examples weighs as much as one claiming 10 (noise ~0 here)."""
    guard = _make_central_guard(noise=1e-9, clip=5.0)
    results = [
        (_Proxy("1"), _make_fitres(_make_delta(1.0), num_examples=30, client="a")),
        (_Proxy("2"), _make_fitres(_make_delta(-0.5), num_examples=10, client="b")),
    ]

    parameters, _ = guard.aggregate_fit(1, results, [])

    expected = 1.0 + (1.0 - 0.5) / 2  # the uniform mean, not (30*1 - 10*0.5)/40
    assert all(np.allclose(a, expected, atol=1e-6) for a in parameters_to_ndarrays(parameters))
    assert guard.report(1).central_noise_std == pytest.approx(1e-9 * 5.0 / 2)


def test_server_reclips_an_over_norm_update_to_the_central_clip():
    """A plain-round client that skipped the clip (norm 5 C) moves the mean by no more than a clipped one would:
    the server scales it to C itself and the round's report names it."""
    # Prepare
    clip = 1.0
    guard = _make_central_guard(noise=1e-9, clip=clip)
    over = _make_delta(5 * clip / np.sqrt(10))  # SHAPES hold 10 values: L2 norm 5 C
    honest = _make_delta(-0.1)
    results = [
        (_Proxy("1"), _make_fitres(over, client="greedy")),
        (_Proxy("2"), _make_fitres(honest, client="honest")),
    ]

    # Execute
    parameters, _ = guard.aggregate_fit(1, results, [])

    # Assert
    clipped = clip / np.sqrt(10)  # each value of the update scaled to norm C
    expected = 1.0 + (clipped - 0.1) / 2
    assert all(np.allclose(a, expected, atol=1e-6) for a in parameters_to_ndarrays(parameters))
    assert guard.report(1).reclipped == ["greedy"]


def test_frozen_values_keep_the_previous_global_and_get_no_noise():
    """With dp-train, values outside the trained part stay at the previous global model even when a client moved
    them, and only the trained values carry noise, of std σC/n."""
    # Prepare
    shapes = [(200, 100), (50,)]
    mask = np.zeros(shapes[0], bool)
    mask[:100] = True  # half of the first array trains; the second array is frozen
    trainable = (mask, np.zeros(shapes[1], bool))
    previous = [np.full(s, 0.5, np.float32) for s in shapes]
    common = {"min_fit_clients": 1, "min_available_clients": 1, "initial_parameters": _params(previous)}
    guard = GuardedStrategy(
        create_strategy("fedavg", common=common, options={}),
        expected_shapes=shapes, max_update_norm=10.0, max_examples=1000,
        central_dp=CentralDP(noise_multiplier=0.8, clipping_norm=1.0, trainable=trainable),
    )
    guard._global = previous
    deltas = [[np.full(s, v, np.float32) * 0.001 for s in shapes] for v in (1.0, 2.0, 3.0, 4.0)]
    results = [(_Proxy(str(i)), _make_fitres(d, client=f"c{i}")) for i, d in enumerate(deltas)]

    # Execute
    first, second = parameters_to_ndarrays(guard.aggregate_fit(1, results, [])[0])

    # Assert
    assert np.array_equal(first[~mask], previous[0][~mask])  # moved by every client, kept exactly
    assert np.array_equal(second, previous[1])
    noise = first[mask] - (0.5 + 0.0025)
    assert float(noise.std()) == pytest.approx(0.8 * 1.0 / 4, rel=0.03)
    assert guard.central_dp.noised_values == 10_000


def test_central_dp_noise_on_the_aggregate_matches_its_calibration():
    """The aggregate minus the exact uniform mean has the std σC/n the round reports."""
    big_shapes = [(200, 100), (50,)]
    initial = [np.zeros(s, np.float32) for s in big_shapes]
    common = {"min_fit_clients": 1, "min_available_clients": 1, "initial_parameters": _params(initial)}
    guard = GuardedStrategy(
        create_strategy("fedavg", common=common, options={}),
        expected_shapes=big_shapes, max_update_norm=10.0, max_examples=1000,
        central_dp=CentralDP(noise_multiplier=0.8, clipping_norm=1.0),
    )
    guard._global = initial
    deltas = [[np.full(s, v, np.float32) * 0.001 for s in big_shapes] for v in (1.0, 2.0, 3.0, 4.0)]
    results = [(_Proxy(str(i)), _make_fitres(d, client=f"c{i}")) for i, d in enumerate(deltas)]

    parameters, _ = guard.aggregate_fit(1, results, [])

    noise = np.concatenate([(a - 0.0025).ravel() for a in parameters_to_ndarrays(parameters)])
    assert guard.report(1).central_noise_std == pytest.approx(0.8 * 1.0 / 4)
    assert float(noise.std()) == pytest.approx(0.2, rel=0.03)


@pytest.mark.usefixtures("superlink_identity")
def test_client_clips_to_central_clip_and_weighs_one(tmp_path):
    """Under central DP the client's delta norm is at most central-clip and its aggregation weight is 1."""
    settings = RunSettings(dataset="synthetic=280", model="cnn_am", local_epochs=1, batch_size=32,
                           out_dir="unused", central_dp_noise=1.0, central_clip=0.05)
    context = _make_context(tmp_path)
    context.run_config.update(settings.to_run_config())
    app = make_client_app()

    reply = app(_make_message("train", initial_weights(settings), {"server-round": 1, "proximal-mu": 0.0}), context)

    fitres = compat.recorddict_to_fitres(reply.content, keep_input=False)
    delta = parameters_to_ndarrays(fitres.parameters)
    norm = np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in delta))
    assert norm == pytest.approx(0.05, rel=1e-4)  # one epoch of Adam moves the weights far more than 0.05
    assert fitres.metrics["update-clipped"] is True or fitres.metrics["update-clipped"] == 1
    assert fitres.num_examples == 1
    assert fitres.metrics["train-examples"] == 280


@pytest.mark.usefixtures("superlink_identity")
def test_a_site_under_central_dp_on_the_head_changes_only_the_head(tmp_path):
    """With dp-train head the site trains the classifier alone: its delta is zero everywhere else."""
    from models import create_model
    from models.finetune import trainable_mask

    settings = RunSettings(dataset="synthetic=280", model="cnn_am", local_epochs=1, batch_size=32, out_dir="unused",
                           central_dp_noise=1.0, central_clip=1.0, dp_train="head")
    context = _make_context(tmp_path)
    context.run_config.update(settings.to_run_config())

    reply = make_client_app()(_make_message("train", initial_weights(settings), {"server-round": 1,
                                                                                "proximal-mu": 0.0}), context)

    delta = parameters_to_ndarrays(compat.recorddict_to_fitres(reply.content, keep_input=False).parameters)[0]
    head = trainable_mask(create_model("cnn_am", dp=True), "head").numpy()
    assert not delta[~head].any()
    assert np.abs(delta[head]).max() > 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"central_dp_noise": 1.0}, "central-clip"),
        ({"central_dp_noise": 1.0, "central_clip": 1.0, "strategy": "krum"}, "fedavg or fedprox"),
        ({"central_dp_noise": -1.0}, "central-dp-noise"),
    ],
)
def test_invalid_central_dp_settings_name_the_key(changes, message):
    """A central-DP setting that would make the reported ε wrong is refused with the key in the message."""
    with pytest.raises(ConfigError, match=message):
        RunSettings(**changes).validate()


def test_privacy_report_gives_the_central_epsilon_of_the_released_rounds():
    """privacy.json's central ε is the accountant's for (σ, fraction-fit, rounds released, δ)."""
    settings = RunSettings(central_dp_noise=1.1, central_clip=1.0, fraction_fit=0.5, num_server_rounds=5)
    guard = _make_central_guard(noise=1.1, clip=1.0)
    for server_round in (1, 2, 3):  # 3 of the 5 planned rounds released their noisy mean
        guard.report(server_round).central_noise_std = 0.1

    report = build_privacy_report(settings, guard).to_json()

    expected = central_epsilon(noise_multiplier=1.1, sample_rate=0.5, rounds=3, delta=settings.dp_delta)
    assert report["central"]["epsilon"] == pytest.approx(expected)
    assert report["central"]["rounds"] == 3
    assert report["central"]["epsilon"] > central_epsilon(noise_multiplier=1.1, sample_rate=0.5, rounds=2,
                                                          delta=settings.dp_delta)


def test_fer_sim_run_passes_every_privacy_option_to_the_settings(monkeypatch, tmp_path):
    """Each privacy flag of `fer-sim run` lands in its run-config key."""
    from client.cli.runner import run_cli
    from server.records import RunSummary
    from simulation.cli import main, run_cmd

    seen = {}
    monkeypatch.setattr(run_cmd, "execute", lambda settings, **_: seen.setdefault("s", settings) and RunSummary(
        model=settings.model, strategy=settings.strategy, dataset=settings.dataset, rounds=0, seconds=0.0,
        accuracy_source="server", final_accuracy=0.0, best_accuracy=0.0))
    args = ["run", "--out", str(tmp_path / "r"), "--dp-epsilon", "3", "--dp-delta", "1e-6", "--max-grad-norm", "0.7",
            "--accountant", "prv", "--dp-optimizer", "adam", "--dp-lr", "0.01", "--dp-batch-size", "64",
            "--secure-agg", "--secagg-shares", "4", "--secagg-threshold", "3",
            "--central-dp-noise", "0.9", "--central-clip", "0.5"]

    main._register()
    exit_code = run_cli(main.app, "fer-sim", args)

    assert exit_code == 0
    s = seen["s"]
    assert (s.dp_epsilon, s.dp_delta, s.max_grad_norm, s.accountant) == (3.0, 1e-6, 0.7, "prv")
    assert (s.dp_optimizer, s.dp_lr, s.dp_batch_size) == ("adam", 0.01, 64)
    assert (s.secure_agg, s.secagg_shares, s.secagg_threshold) == (True, 4, 3)
    assert (s.central_dp_noise, s.central_clip) == (0.9, 0.5)


@pytest.mark.slow
def test_simulation_with_secure_aggregation_and_central_dp_reports_central_epsilon(tmp_path):
    """A real Flower simulation under SecAgg+ and central DP: noise of σC/3 each round, ε in privacy.json."""
    import json

    from server.rundir import RunDirectory
    from simulation.runner import run_simulation

    settings = RunSettings(
        dataset="synthetic=700", num_clients=3, min_clients=3, partition="iid", model="cnn_am", num_server_rounds=2,
        local_epochs=1, out_dir=str(tmp_path / "run"), secure_agg=True, central_dp_noise=0.5, central_clip=0.5,
    )

    run_simulation(settings, run_dir=RunDirectory(tmp_path / "run"), num_cpus=2)

    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["fit"]["num_accepted"] for r in rounds[1:]] == [3, 3]
    assert [r["fit"]["central_noise_std"] for r in rounds[1:]] == pytest.approx([0.5 * 0.5 / 3] * 2)
    assert [r["fit"]["secagg_quantization"]["num_clients"] for r in rounds[1:]] == [3, 3]
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert privacy["secure_aggregation"] is True
    # Clients clip to C = 0.5 and weigh 1 (max-weight 1), so one level is 2C/2**24 and the average is off by at most
    # one level per client over a total weight of 3.
    quantization = privacy["secure_aggregation_quantization"]
    assert quantization["step"] == pytest.approx(2 * 0.5 / 2**24)
    assert quantization["max_abs_error_of_average"] == pytest.approx(2 * 0.5 / 2**24)
    assert quantization["max_abs_error_per_update"] == pytest.approx(2 * 0.5 / 2**24)
    assert len(quantization["rounds"]) == 2
    assert privacy["central"]["epsilon"] == pytest.approx(
        central_epsilon(noise_multiplier=0.5, sample_rate=1.0, rounds=2, delta=settings.dp_delta)
    )


@pytest.mark.slow
def test_central_dp_on_the_head_trains_and_noises_only_the_head(tmp_path):
    """A real run under SecAgg+ and central DP with dp-train head: every value outside the head is round 0's, bit
    for bit, the head moved, and privacy.json names the part and how many values were noised."""
    import json

    from client import wire
    from models import create_model
    from models.files import load_model
    from models.finetune import trainable_mask
    from server.rundir import RunDirectory
    from simulation.runner import run_simulation

    settings = RunSettings(
        dataset="synthetic=700", num_clients=3, min_clients=3, partition="iid", model="cnn_am", num_server_rounds=2,
        local_epochs=1, out_dir=str(tmp_path / "run"), secure_agg=True, central_dp_noise=0.5, central_clip=0.5,
        dp_train="head",
    )

    run_simulation(settings, run_dir=RunDirectory(tmp_path / "run"), num_cpus=2)

    start = initial_weights(settings)[0]
    state, _ = load_model(tmp_path / "run" / "model.pt")
    model = create_model("cnn_am", dp=True)
    model.load_state_dict(state)
    final = wire.get_weights(model)[0]
    head = trainable_mask(model, "head").numpy()
    assert np.array_equal(final[~head], start[~head])
    assert not np.allclose(final[head], start[head])
    central = json.loads((tmp_path / "run" / "privacy.json").read_text())["central"]
    assert (central["dp_train"], central["noised_values"]) == ("head", int(head.sum()))
