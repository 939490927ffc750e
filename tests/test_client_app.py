"""The ClientApp called directly with Flower Messages: what a SuperNode would hand it, no network needed."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from client.client_app import make_client_app
from client.config import RunSettings
from client.trainer import bound_update
from server.server_app import initial_weights

SETTINGS = RunSettings(dataset="synthetic=280", model="cnn_am", local_epochs=1, batch_size=32, out_dir="unused")


# Every test here builds Messages as the SuperLink's ServerApp would (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("superlink_identity")


def _make_context(tmp_path) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"dataset": "synthetic=280", "client-id": "site-a", "state-dir": str(tmp_path)},
        state=RecordDict(),
        run_config=SETTINGS.to_run_config(),
    )


def _make_message(kind: str, weights: list[np.ndarray], config: dict) -> Message:
    parameters = ndarrays_to_parameters(weights)
    if kind == "train":
        content, message_type = compat.fitins_to_recorddict(FitIns(parameters, config), True), MessageType.TRAIN
    else:
        content, message_type = compat.evaluateins_to_recorddict(EvaluateIns(parameters, config), True), MessageType.EVALUATE
    return Message(content=content, dst_node_id=7, message_type=message_type, group_id="1")


def test_train_message_returns_a_delta_of_the_global_shapes_and_num_examples(tmp_path):
    """A TRAIN reply carries one float32 delta per global array and num-examples = the node's training set size."""
    weights = initial_weights(SETTINGS)
    app = make_client_app()

    reply = app(_make_message("train", weights, {"server-round": 1, "proximal-mu": 0.0}), _make_context(tmp_path))

    assert not reply.has_error(), reply.error if reply.has_error() else ""
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=False)
    delta = parameters_to_ndarrays(fitres.parameters)
    assert [d.shape for d in delta] == [w.shape for w in weights]
    assert all(d.dtype == np.float32 for d in delta)
    # synthetic=280 has 280 training images; the node holds out none because the set has its own test split.
    assert fitres.num_examples == 280
    assert fitres.metrics["client-id"] == "site-a"
    norm = np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in delta))
    assert norm == pytest.approx(fitres.metrics["update-norm"], rel=1e-5)
    assert norm > 0


def _independent_accuracy(weights: list[np.ndarray]) -> float:
    """The accuracy of `weights` on synthetic=280's test split, computed without the client's evaluation code:
    per-image standardisation written out here, one forward pass, argmax against the labels."""
    import torch

    from client import wire
    from client.data.formats import load_dataset
    from models import create_model

    test = load_dataset("synthetic=280", image_size=SETTINGS.image_size, seed=SETTINGS.seed).splits["test"]
    images = test.images.astype(np.float64) / 255.0
    mean = images.mean(axis=(1, 2), keepdims=True)
    std = np.maximum(images.std(axis=(1, 2), keepdims=True), 1.0 / 255.0)
    model = create_model(SETTINGS.model, dp=True)
    wire.set_weights(model, weights)
    model.eval()
    with torch.no_grad():
        faces = torch.from_numpy(((images - mean) / std)[:, None].astype(np.float32))
        # The model's recipe evaluates with flip averaging: the mean softmax of each face and its mirror.
        probs = torch.softmax(model(faces), 1) + torch.softmax(model(torch.flip(faces, dims=(-1,))), 1)
    return float((probs.argmax(dim=1).numpy() == test.labels).mean())


def test_evaluate_message_reports_accuracy_on_the_local_test_split(tmp_path):
    """An EVALUATE reply counts the node's test split and reports the accuracy an independent pass computes."""
    # Prepare: weights moved off the initial ones, so predictions are not all one class
    rng = np.random.default_rng(3)
    weights = [w + rng.normal(0.0, 0.05, w.shape).astype(np.float32) for w in initial_weights(SETTINGS)]
    app = make_client_app()
    # Execute
    reply = app(_make_message("evaluate", weights, {"server-round": 1}), _make_context(tmp_path))
    # Assert
    evalres = compat.recorddict_to_evaluateres(reply.content)
    assert evalres.num_examples == 56  # synthetic test split = N // 5
    expected = _independent_accuracy(weights)
    assert evalres.metrics["accuracy"] == pytest.approx(expected, abs=1e-9)
    assert 0.0 < expected < 1.0


def test_clientapp_component_loads_without_torch():
    """The ClientApp Flower loads for every message imports no torch (nor the ServerApp): SecAgg+'s protocol
    stages, which never reach the training client, start that much faster in a fresh process."""
    import subprocess
    import sys

    # Prepare
    probe = "import sys, simulation.apps; print(sorted(m for m in ('torch', 'server.server_app') if m in sys.modules))"

    # Execute
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)

    # Assert
    assert result.stdout.strip() == "[]"


def test_bound_update_scales_to_the_norm_and_refuses_non_finite():
    """Updates above the bound are scaled onto it; NaN never leaves the node."""
    delta = [np.full(4, 3.0, np.float32)]  # norm 6

    bounded, norm, clipped = bound_update(delta, max_norm=2.0)

    assert norm == pytest.approx(6.0) and clipped
    assert np.linalg.norm(bounded[0]) == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(FloatingPointError):
        bound_update([np.array([np.nan], np.float32)], max_norm=1.0)


def test_private_training_spends_budget_cumulatively_across_train_messages(tmp_path):
    """Under dp-epsilon the node's reported ε grows from one round's message to the next, within its budget."""
    settings = SETTINGS.replace(dp_epsilon=8.0, num_server_rounds=3)
    context = _make_context(tmp_path)
    context.run_config.update(settings.to_run_config())
    context.node_config["partition-id"] = 0  # a simulated node: its ledger key is created in its state dir
    app = make_client_app()
    weights = initial_weights(settings)

    spent, sample_rates = [], []
    for server_round in (1, 2):
        reply = app(_make_message("train", weights, {"server-round": server_round, "proximal-mu": 0.0}), context)
        assert not reply.has_error(), reply.error if reply.has_error() else ""
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=False)
        assert all(np.all(np.isfinite(d)) for d in parameters_to_ndarrays(fitres.parameters))
        spent.append(fitres.metrics["dp-epsilon-spent"])
        sample_rates.append(fitres.metrics["dp-sample-rate"] * fitres.num_examples)

    assert 0 < spent[0] < spent[1] <= 8.0
    # Poisson batches of dp-batch-size (128) expected, not the non-private batch-size (32)
    assert sample_rates == pytest.approx([settings.dp_batch_size] * 2)
    assert not (tmp_path / "released-update.npz").exists()  # simulated nodes keep no individual update


@pytest.mark.parametrize(
    ("run_epsilon", "node_epsilon", "expected"),
    [(0.0, None, 0.0), (8.0, None, 8.0), (8.0, 3.0, 3.0), (3.0, 8.0, 3.0), (0.0, 2.0, 2.0)],
)
def test_a_nodes_own_budget_caps_the_runs(run_epsilon, node_epsilon, expected):
    """A node's dp-epsilon lowers the run's budget, or imposes DP-SGD on a run without it; it never raises it."""
    from client.client_app import node_settings
    from client.node_config import NodeSettings

    node_config = {"dataset": "synthetic=280"} if node_epsilon is None else {"dataset": "synthetic=280",
                                                                            "dp-epsilon": str(node_epsilon)}

    settings = node_settings(SETTINGS.replace(dp_epsilon=run_epsilon), NodeSettings.from_node_config(node_config))

    assert settings.dp_epsilon == expected


@pytest.mark.parametrize("name", ["cnn_am", "dmsnet_iot"])
def test_weights_travel_as_one_vector_and_load_back_exactly(name):
    """get_weights gives one float32 vector of every state entry; set_weights restores the state bit for bit."""
    import torch

    from client import wire
    from models import create_model

    torch.manual_seed(0)
    source, target = create_model(name, dp=True), create_model(name, dp=True)

    weights = wire.get_weights(source)
    wire.set_weights(target, weights)

    assert len(weights) == 1 and weights[0].dtype == np.float32
    assert weights[0].size == sum(v.numel() for v in source.state_dict().values())
    for (key, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), key
    with pytest.raises(ValueError, match="needs"):
        wire.set_weights(target, [weights[0][:-1]])


def test_a_repeated_round_gets_the_released_update_without_a_second_charge(tmp_path):
    """The same round with the same global weights (a resumed server) is answered from the released update."""
    from privacy.ledger import PrivacyLedger, generate_key_file

    settings = SETTINGS.replace(dp_epsilon=8.0, num_server_rounds=3)
    context = _make_context(tmp_path)
    context.run_config.update(settings.to_run_config())
    generate_key_file(tmp_path / "ledger.key")  # a deployed node: its operator made the key, no partition-id
    app = make_client_app()
    weights = initial_weights(settings)

    replies = [compat.recorddict_to_fitres(app(_make_message("train", weights, {"server-round": 1}), context).content,
                                           keep_input=False) for _ in range(2)]
    moved = [weights[0] + 0.01]
    third = compat.recorddict_to_fitres(app(_make_message("train", moved, {"server-round": 1}), context).content,
                                        keep_input=False)

    first, second = (parameters_to_ndarrays(r.parameters) for r in replies)
    assert np.array_equal(first[0], second[0])
    assert replies[1].metrics["dp-epsilon-spent"] == replies[0].metrics["dp-epsilon-spent"]
    assert third.metrics["dp-epsilon-spent"] > replies[0].metrics["dp-epsilon-spent"]  # new weights: trained, paid
    ledger = PrivacyLedger.open(tmp_path / "privacy.ledger", key_file=tmp_path / "ledger.key",
                                anchor_path=tmp_path / "ledger.anchor", client_id="site-a", budget_epsilon=8.0,
                                delta=settings.dp_delta)
    assert [r.server_round for r in ledger.rounds] == [1, 1]


def test_fedprox_proximal_term_equals_hand_written_proximal_sgd():
    """task.train with μ > 0 takes SGD steps on CE + μ/2·‖w − w_global‖², the gradient written out by hand here
    (∇CE + μ·(w − w_global)), and ends closer to the global weights than with μ = 0."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from client import task

    # Prepare: 4 fixed batches, so the proximal term (zero at the first step) acts from the second on
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=generator), torch.randint(0, 3, (32,), generator=generator))
    torch.manual_seed(0)
    start = torch.nn.Linear(6, 3)
    reference = [p.detach().clone() for p in start.parameters()]
    lr, mu = 0.5, 2.0

    def trained(proximal_mu: float) -> list:
        model = torch.nn.Linear(6, 3)
        model.load_state_dict(start.state_dict())
        task.train(model, DataLoader(data, batch_size=8), epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                   proximal_mu=proximal_mu, reference=reference)
        return [p.detach() for p in model.parameters()]

    by_hand = [r.clone() for r in reference]
    for images, labels in DataLoader(data, batch_size=8):
        weights = [w.clone().requires_grad_() for w in by_hand]
        loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(images, *weights), labels)
        grads = torch.autograd.grad(loss, weights)
        by_hand = [w.detach() - lr * (g + mu * (w.detach() - r)) for w, g, r in zip(weights, grads, reference)]

    # Execute
    proximal, plain = trained(mu), trained(0.0)

    # Assert
    for got, want in zip(proximal, by_hand):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    distance = lambda ws: float(sum(((w - r) ** 2).sum() for w, r in zip(ws, reference)))  # noqa: E731
    assert distance(proximal) < 0.9 * distance(plain)


@pytest.mark.slow  # two local trainings of CNN-AM on 280 faces
def test_fedprox_servers_mu_reaches_the_client_and_shortens_its_update(tmp_path):
    """The ServerApp's fedprox fit config carries μ; a client trained under it (same seed, same batches) sends a
    shorter update than under μ = 0."""
    from server.server_app import build_strategy

    # Prepare
    settings = SETTINGS.replace(strategy="fedprox", proximal_mu=5.0)
    weights = initial_weights(settings)
    config = build_strategy(settings, weights).inner.on_fit_config_fn(1)
    app = make_client_app()

    # Execute
    norms = {}
    for mu in (config["proximal-mu"], 0.0):
        reply = app(_make_message("train", weights, {**config, "proximal-mu": mu}), _make_context(tmp_path / str(mu)))
        norms[mu] = compat.recorddict_to_fitres(reply.content, keep_input=False).metrics["update-norm"]

    # Assert
    assert config == {"server-round": 1, "proximal-mu": 5.0}
    assert 0 < norms[5.0] < 0.9 * norms[0.0]


def _make_deployed_node(state_dir, *, dp_epsilon: float, key_dir=None) -> tuple[Context, RunSettings]:
    """A deployed node (no partition-id) whose operator made its ledger key, in a run at `dp_epsilon`."""
    from privacy.ledger import generate_key_file

    settings = SETTINGS.replace(dp_epsilon=dp_epsilon, num_server_rounds=3)
    context = _make_context(state_dir)
    context.run_config.update(settings.to_run_config())
    key = (key_dir or state_dir) / "ledger.key"
    generate_key_file(key)
    context.node_config["ledger-key"] = str(key)
    return context, settings


def _train(context: Context, weights: list[np.ndarray], server_round: int = 1):
    """One TRAIN message through the real ClientApp; the reply Message."""
    return make_client_app()(_make_message("train", weights, {"server-round": server_round}), context)


def _delta(reply) -> np.ndarray:
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    return parameters_to_ndarrays(compat.recorddict_to_fitres(reply.content, keep_input=False).parameters)[0]


@pytest.mark.slow
def test_a_deployed_nodes_dp_noise_cannot_be_replayed_from_the_run_config(tmp_path):
    """Attack (server replay): two trainings with identical config, data, weights and round give different DP
    updates on deployed nodes (OS-keyed noise and sampling); a simulation stays reproducible and says so."""
    # Prepare: two deployed nodes, and two simulated runs of the same partition, all else identical
    contexts = [_make_deployed_node(tmp_path / f"node-{i}", dp_epsilon=8.0)[0] for i in range(2)]
    simulated = []
    for i in range(2):
        context, _ = _make_deployed_node(tmp_path / f"sim-{i}", dp_epsilon=8.0)
        context.node_config["partition-id"] = 0
        simulated.append(context)
    weights = initial_weights(SETTINGS)

    # Execute
    deployed = [_delta(_train(c, weights)) for c in contexts]
    replies = [_train(c, weights) for c in simulated]

    # Assert: what the coordinator could recompute from the run config no longer matches the real update
    assert not np.array_equal(deployed[0], deployed[1])
    assert np.array_equal(_delta(replies[0]), _delta(replies[1]))
    metrics = compat.recorddict_to_fitres(replies[0].content, keep_input=False).metrics
    assert metrics["dp-secure-mode"] is False


@pytest.mark.slow
def test_a_deployed_node_with_a_ledger_trains_under_dp_when_the_run_asks_for_none(tmp_path):
    """Attack: the coordinator sends dp-epsilon 0 to a node with a ledger; the node trains under DP-SGD with its
    ledger's budget (charged, reported), never plain."""
    from privacy.ledger import PrivacyLedger

    # Prepare: the node trained a DP round before (its ledger exists), now a run without DP
    context, _ = _make_deployed_node(tmp_path, dp_epsilon=8.0)
    weights = initial_weights(SETTINGS)
    _delta(_train(context, weights, server_round=1))
    context.run_config.update(SETTINGS.replace(dp_epsilon=0.0, num_server_rounds=3).to_run_config())

    # Execute
    reply = _train(context, [weights[0] + 0.01], server_round=1)

    # Assert
    _delta(reply)
    metrics = compat.recorddict_to_fitres(reply.content, keep_input=False).metrics
    assert metrics["dp-epsilon-budget"] == 8.0 and metrics["dp-secure-mode"] is True
    ledger = PrivacyLedger.open_existing(tmp_path / "privacy.ledger", key_file=tmp_path / "ledger.key",
                                         anchor_path=tmp_path / "ledger.anchor", client_id="site-a")
    assert len(ledger.rounds) == 2 and metrics["dp-epsilon-spent"] == ledger.spent_epsilon


def test_a_node_with_an_exhausted_ledger_declines_a_run_without_dp(tmp_path):
    """Attack: dp-epsilon 0 sent to a node whose ledger is spent: it declines (error reply), it does not train."""
    from privacy.ledger import BudgetExhausted, PrivacyLedger

    # Prepare: a ledger charged up to its whole budget
    context, _ = _make_deployed_node(tmp_path, dp_epsilon=0.0)
    ledger = PrivacyLedger.open(tmp_path / "privacy.ledger", key_file=tmp_path / "ledger.key",
                                anchor_path=tmp_path / "ledger.anchor", client_id="site-a", budget_epsilon=2.0,
                                delta=SETTINGS.dp_delta)
    ledger.charge(server_round=1, noise_multiplier=1.0, sample_rate=0.5, steps=10, epsilon_after=2.0)

    # Execute / Assert: the node refuses (a SuperNode turns this into an error reply); nothing was trained or charged
    with pytest.raises(BudgetExhausted, match="privacy budget exhausted"):
        _train(context, initial_weights(SETTINGS), server_round=2)
    assert len(PrivacyLedger.open_existing(tmp_path / "privacy.ledger", key_file=tmp_path / "ledger.key",
                                           anchor_path=tmp_path / "ledger.anchor", client_id="site-a").rounds) == 1


def test_a_wiped_state_folder_does_not_restart_the_budget(tmp_path):
    """Attack: the node's state folder (ledger and anchor) is wiped while its key lives elsewhere; the next DP
    round is refused instead of opening a fresh, empty ledger."""
    import shutil

    from privacy.ledger import LedgerError

    # Prepare: one charged DP round, then `rm -r STATE_DIR`
    state_dir = tmp_path / "state"
    context, _ = _make_deployed_node(state_dir, dp_epsilon=8.0, key_dir=tmp_path)
    weights = initial_weights(SETTINGS)
    _delta(_train(context, weights, server_round=1))
    shutil.rmtree(state_dir)

    # Execute / Assert: refused (a SuperNode turns this into an error reply), and no new ledger was opened
    with pytest.raises(LedgerError, match="state folder wiped"):
        _train(context, [weights[0] + 0.01], server_round=2)
    assert not (state_dir / "privacy.ledger").exists()
