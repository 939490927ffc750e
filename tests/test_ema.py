"""The average of the global model over rounds (server-ema): its values, what the server scores, saves and resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.common import parameters_to_ndarrays

from client import wire
from models import create_model
from models.files import load_model
from server.ema import ParameterEMA, ema_decay
from server.rundir import RunDirectory
from server.server_app import initial_weights
from simulation.runner import run_simulation
from tests.test_simulation import _make_settings
from tests.test_strategy import SHAPES, _make_delta, _make_fitres, _make_guard, _Proxy


def _make_models(*values: float) -> list[list[np.ndarray]]:
    return [[np.full(shape, v, dtype=np.float32) for shape in SHAPES] for v in values]


def test_ema_equals_the_hand_computed_warmed_up_average():
    """Three updates give d_t = min(decay, (1+t)/(10+t)) applied by hand, step by step."""
    w0, w1, w2, w3 = _make_models(0.0, 1.0, 5.0, -2.0)
    ema = ParameterEMA(decay=0.3, weights=w0)

    for w in (w1, w2, w3):
        result = ema.update(w)

    d1, d2, d3 = 2 / 11, 3 / 12, 0.3  # (1+3)/(10+3) = 0.31 > 0.3: the cap binds from the third update on
    expected = d3 * (d2 * (d1 * 0.0 + (1 - d1) * 1.0) + (1 - d2) * 5.0) + (1 - d3) * -2.0
    assert [ema_decay(decay=0.3, updates=t) for t in (1, 2, 3)] == pytest.approx([d1, d2, d3])
    for array in result:
        assert array.dtype == np.float32
        np.testing.assert_allclose(array, expected, rtol=1e-6)


def test_ema_keeps_integer_arrays_at_their_newest_value_and_copies_its_inputs():
    """A counter is not averaged, and changing the caller's arrays later does not change the average."""
    start = [np.zeros(3, np.float32), np.array([4], np.int64)]
    ema = ParameterEMA(decay=0.5, weights=start)
    new = [np.ones(3, np.float32), np.array([7], np.int64)]

    ema.update(new)
    new[0][:] = 100.0
    start[0][:] = 100.0

    np.testing.assert_allclose(ema.weights[0], 1 - 2 / 11)
    assert ema.weights[1].tolist() == [7]


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_ema_refuses_a_decay_outside_the_open_interval(decay):
    """A decay of 0 (no average) or 1 (never moves) is refused with the setting's name."""
    with pytest.raises(ValueError, match="server-ema"):
        ParameterEMA(decay=decay, weights=_make_models(0.0)[0])


def test_guard_scores_the_average_and_trains_on_the_raw_mean():
    """With an EMA the server evaluates the average; the next round starts from the plain FedAvg mean."""
    guard = _make_guard()
    guard.ema = ParameterEMA(decay=0.9, weights=guard._global)  # round 0: all ones
    scored = []
    guard.evaluate_fn = lambda rnd, weights: (scored.append([w.copy() for w in weights]) or 0.0, {"accuracy": 0.5})
    replies = [(_Proxy(f"c{i}"), _make_fitres(_make_delta(v), client=f"c{i}")) for i, v in enumerate((0.2, 0.4))]

    parameters, _ = guard.aggregate_fit(1, replies, [])
    guard.evaluate(1, parameters)

    raw = parameters_to_ndarrays(parameters)
    np.testing.assert_allclose(raw[0], 1.3, rtol=1e-6)  # the mean delta 0.3 on top of the global ones
    d1 = 2 / 11
    np.testing.assert_allclose(scored[0][0], d1 * 1.0 + (1 - d1) * 1.3, rtol=1e-6)


@pytest.mark.slow
def test_a_run_saves_the_average_of_its_checkpoints(tmp_path):
    """model.pt equals the EMA of round 0's model and each round's checkpoint, recomputed from the files."""
    out = tmp_path / "run"
    settings = _make_settings(out, num_clients=2, min_clients=2, local_epochs=1, server_ema=0.5)
    run_simulation(settings, run_dir=RunDirectory(out), num_cpus=2)

    ema = ParameterEMA(decay=0.5, weights=initial_weights(settings))
    for r in (1, 2):
        ema.update(_weights_in(out / "checkpoints" / f"round-{r:03d}.pt", settings.model))
    final, _ = load_model(out / "model.pt")
    last, _ = load_model(out / "checkpoints" / "round-002.pt")

    for got, want in zip(_weights_in(out / "model.pt", settings.model), ema.weights):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(final[k], last[k]) for k in final)  # the average, not the last raw model
    config = json.loads((out / "config.json").read_text())
    assert config["server-ema"] == 0.5


def _weights_in(path, model_name: str) -> list[np.ndarray]:
    """The arrays a saved model holds, in the order they travel (client.wire)."""
    state, _ = load_model(path)
    model = create_model(model_name, dp=True)
    model.load_state_dict(state)
    return wire.get_weights(model)
