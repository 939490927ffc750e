"""keep-momentum: a site's optimiser momentum carries on from one of its rounds to the next, on its node only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from torch import nn

from client import task
from client.client_app import make_client_app
from client.config import ConfigError, RunSettings
from client.data.preprocess import FERTorchDataset
from client.trainer import momentum_record
from models import create_model
from models.recipe import TrainingRecipe
from server.server_app import initial_weights
from tests.test_client_app import _make_message
from tests.test_local_splits import SETTINGS, _make_client

# Plain SGD with momentum 0.9, a constant rate, no augmentation, decay or smoothing: one step is checkable by hand.
PLAIN = TrainingRecipe(optimizer="sgd", lr=0.1, schedule="constant", warmup=0.0, weight_decay=0.0,
                       label_smoothing=0.0, augment="none", class_balance="none", flip_tta=False)


def _make_faces(n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` seeded random 48x48 grey faces and labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 48, 48), dtype=np.uint8), rng.integers(0, 7, size=n)


def _make_model(seed: int = 0) -> nn.Module:
    """A linear classifier over the pixels: no dropout, no normalisation, so a step has a closed form."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48 * 48, 7))


def test_a_round_starts_from_the_kept_buffers_and_keeps_the_new_ones():
    """One step with a kept buffer b moves each parameter by -lr (0.9 b + g) and keeps 0.9 b + g (torch's SGD)."""
    # Prepare
    images, labels = _make_faces()
    model = _make_model()
    start = [p.detach().clone() for p in model.parameters()]
    rng = np.random.default_rng(1)
    kept = [rng.normal(size=tuple(p.shape)).astype(np.float32) for p in model.parameters()]
    carry = task.MomentumCarry(buffers=[b.copy() for b in kept])
    # the gradient of the mean cross-entropy over the 8 faces at the start, computed apart
    reference = _make_model()
    faces = FERTorchDataset(images, labels)  # the loader's own standardisation, without augmentation
    x = torch.stack([faces[i][0] for i in range(len(faces))])
    nn.functional.cross_entropy(reference(x), torch.as_tensor(labels)).backward()
    grads = [p.grad.numpy() for p in reference.parameters()]

    # Execute: one batch of all 8 faces is one step
    task.train_round(model, images, labels, recipe=PLAIN, batch_size=8, seed=0, server_round=1, num_rounds=1,
                     epochs=1, carry=carry)

    # Assert
    for p0, p1, b, g, new in zip(start, model.parameters(), kept, grads, carry.buffers):
        np.testing.assert_allclose(new, 0.9 * b + g, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(p1.detach().numpy(), p0.numpy() - 0.1 * (0.9 * b + g), rtol=1e-4, atol=1e-6)


def test_a_first_round_is_the_round_without_the_carry():
    """With nothing kept yet the round trains exactly as without keep-momentum, and then holds one buffer per
    parameter."""
    # Prepare
    images, labels = _make_faces(n=32)
    with_carry, without = _make_model(), _make_model()
    carry = task.MomentumCarry()

    # Execute
    for model, kept in ((with_carry, carry), (without, None)):
        task.train_round(model, images, labels, recipe=PLAIN, batch_size=8, seed=3, server_round=1, num_rounds=1,
                         epochs=1, carry=kept)

    # Assert
    for a, b in zip(with_carry.parameters(), without.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [b.shape for b in carry.buffers] == [tuple(p.shape) for p in with_carry.parameters()]
    assert all(np.abs(b).sum() > 0 for b in carry.buffers)


def test_buffers_that_do_not_fit_the_model_are_refused():
    """Buffers of another architecture raise a ValueError naming the mismatch instead of training with them."""
    # Prepare
    images, labels = _make_faces()
    carry = task.MomentumCarry(buffers=[np.zeros((3, 3), np.float32)])

    # Execute / Assert
    with pytest.raises(ValueError, match="do not fit"):
        task.train_round(_make_model(), images, labels, recipe=PLAIN, batch_size=8, seed=0, server_round=1,
                         num_rounds=1, epochs=1, carry=carry)


def test_a_site_keeps_its_momentum_in_its_node_state_between_rounds(tmp_path):
    """A node's second round starts from the momentum its first ended with (kept in its context state, not in the
    reply); without keep-momentum the state stays empty and the second round's update differs."""
    # Prepare
    settings = SETTINGS  # test_local_splits' node: 120 synthetic faces, local-splits 4
    keeping = _make_client(settings.replace(keep_momentum=True), tmp_path)
    plain = _make_client(settings, tmp_path)
    weights = keeping.get_parameters({})

    # Execute
    first_keeping, _, metrics = keeping.fit(weights, {"server-round": 1})
    first_plain, _, _ = plain.fit(weights, {"server-round": 1})
    kept = [a.copy() for a in keeping.state.array_records[momentum_record("cnn_am")].to_numpy_ndarrays()]
    second_keeping, _, _ = keeping.fit(weights, {"server-round": 2})
    second_plain, _, _ = plain.fit(weights, {"server-round": 2})

    # Assert
    for a, b in zip(first_keeping, first_plain):
        np.testing.assert_array_equal(a, b)
    trained = list(create_model(settings.model, dp=True).parameters())
    assert [k.shape for k in kept] == [tuple(p.shape) for p in trained] and any(np.abs(k).sum() > 0 for k in kept)
    assert momentum_record("cnn_am") not in plain.state.array_records
    assert not all(np.array_equal(a, b) for a, b in zip(second_keeping, second_plain))
    assert not any(isinstance(v, (list, np.ndarray)) for v in metrics.values())


@pytest.mark.parametrize("changes", [{"dp_epsilon": 8.0}, {"optimizer": "adam"}])
def test_keep_momentum_without_a_momentum_to_keep_is_refused(changes):
    """keep-momentum with DP-SGD or Adam is refused in one line naming the key."""
    # Execute / Assert
    with pytest.raises(ConfigError, match="keep-momentum") as refused:
        RunSettings(dataset="synthetic=20", keep_momentum=True, **changes).validate()
    assert "\n" not in str(refused.value)


def test_the_client_app_keeps_the_buffers_in_the_nodes_flower_context(tmp_path, superlink_identity, caplog):
    """Two TRAIN messages through the real ClientApp with the node's one Context (as its SuperNode holds it between a
    run's messages): the first stores the buffers in the context state, the second trains on from them, and no reply
    carries more than the delta."""
    # Prepare
    settings = SETTINGS.replace(keep_momentum=True)
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=settings.to_run_config(),
                      node_config={"dataset": "synthetic=120", "client-id": "site-a", "state-dir": str(tmp_path)})
    weights = initial_weights(settings)
    app = make_client_app()

    # Execute
    with caplog.at_level("INFO", logger="fer_fl.client"):
        first = app(_make_message("train", weights, {"server-round": 1}), context)
        kept_after_first = momentum_record("cnn_am") in context.state.array_records
        resumed_first = "kept from its last round" in caplog.text
        second = app(_make_message("train", weights, {"server-round": 2}), context)

    # Assert
    assert kept_after_first and not resumed_first
    assert "round 2: training on from the momentum this node kept from its last round" in caplog.text
    for reply in (first, second):
        assert not reply.has_error(), reply.error if reply.has_error() else ""
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=False)
        assert [d.shape for d in parameters_to_ndarrays(fitres.parameters)] == [w.shape for w in weights]
        assert momentum_record("cnn_am") not in reply.content.array_records
