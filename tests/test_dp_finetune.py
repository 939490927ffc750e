"""dp-train: which parameters DP-SGD trains (models.finetune); frozen ones get no gradient, no noise and stay put."""

from __future__ import annotations

import warnings

import pytest
import torch

from client import task, wire
from client.config import DP_TRAIN_MODES as CONFIG_MODES
from client.config import ConfigError, RunSettings
from models import DP_TRAIN_MODES, create_model, dp_trainable_names, freeze_for_dp, list_models
from models.finetune import trainable_mask
from privacy.dp import DPClient, DPSettings
from privacy.ledger import PrivacyLedger, generate_key_file

DELTA = 1e-5
# The registry's models, but the 24 M-parameter ResNet-50 build (tracing it costs seconds and adds no case); the
# DMSNet builds take ~7 s each to build and trace on a loaded CPU, so they run with the slow tests.
MODELS = [pytest.param(name, marks=pytest.mark.slow) if name.startswith("dmsnet") else name
          for name in list_models() if name != "dmsnet_heavy"]


@pytest.fixture(autouse=True)
def _quiet_opacus():
    # Opacus warns about backward hooks on inputs without grad and about empty Poisson batches.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _make_client(tmp_path, *, size: int, batch_size: int) -> DPClient:
    """A DP client with its ledger in tmp_path, as a node builds it at the start of a round."""
    key = tmp_path / "ledger.key"
    generate_key_file(key)
    ledger = PrivacyLedger.open(tmp_path / "ledger.bin", key_file=key, anchor_path=tmp_path / "ledger.anchor",
                                client_id="site-a", budget_epsilon=8.0, delta=DELTA)
    return DPClient(settings=DPSettings(epsilon=8.0, delta=DELTA), ledger=ledger, dataset_size=size,
                    batch_size=batch_size, local_epochs=1, planned_rounds=2)


def _make_faces(size: int) -> torch.utils.data.TensorDataset:
    """Random 48x48 faces with labels."""
    generator = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(size, 1, 48, 48, generator=generator),
                                          torch.randint(0, 7, (size,), generator=generator))


def test_config_and_models_list_the_same_modes():
    """client.config mirrors models.finetune's modes (it cannot import torch), and validates dp-train by name."""
    assert CONFIG_MODES == DP_TRAIN_MODES
    with pytest.raises(ConfigError, match="dp-train"):
        RunSettings(dp_train="encoder", dp_epsilon=3.0).validate()
    with pytest.raises(ConfigError, match="dp-train 'head' .* needs dp-epsilon"):
        RunSettings(dp_train="head").validate()
    RunSettings(dp_train="head", dp_epsilon=3.0).validate()
    RunSettings(dp_train="head", central_dp_noise=1.0, central_clip=1.0).validate()


@pytest.mark.parametrize("name", MODELS)
def test_modes_nest_and_head_is_what_forward_head_adds_beyond_pre_logits(name):
    """head (the classifier) < last (last block + head) < all, for every registered model; counts add up."""
    # Prepare
    model = create_model(name, dp=True)
    total = sum(p.numel() for p in model.parameters())
    classifier = {n for n, _ in model.named_parameters() if n.startswith("classifier.")}

    # Execute
    names = {mode: dp_trainable_names(model, mode) for mode in DP_TRAIN_MODES}
    counts = {mode: freeze_for_dp(model, mode) for mode in DP_TRAIN_MODES}

    # Assert
    assert names["head"] == classifier
    assert names["head"] < names["last"] < names["all"] == {n for n, _ in model.named_parameters()}
    assert all(c.trainable + c.frozen == total for c in counts.values())
    assert counts["head"].trainable < counts["last"].trainable < counts["all"].trainable == total
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names["last"]  # applied last


@pytest.mark.parametrize("mode", ["hooks", "bk"])
@pytest.mark.parametrize("dp_train", ["head", "last"])
def test_frozen_parameters_get_no_gradient_no_noise_and_stay_bit_identical(tmp_path, mode, dp_train):
    """Under real Opacus (hooks) and book-keeping (bk) DP-SGD, a round trains only the chosen parameters: the frozen
    ones never hold a gradient (so no noise was added to them) and are bit-identical afterwards."""
    # Prepare
    torch.manual_seed(0)
    model = create_model("fer_vgg", dp=True, base=8, stages=2, depth=1)
    counts = freeze_for_dp(model, dp_train)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    client = _make_client(tmp_path, size=64, batch_size=16)
    plan = client.begin_round(server_round=1)
    optimizer = task.make_optimizer(model, name="sgd", lr=0.5)
    private = client.make_private(model=model, optimizer=optimizer, dataset=_make_faces(64), plan=plan,
                                  grad_sample_mode=mode)
    grads_seen: list[set[str]] = []

    # Execute
    for images, labels in private.loader:
        private.optimizer.zero_grad()
        private.criterion(private.model(images), labels).backward()
        private.optimizer.step()
        grads_seen.append({n for n, p in model.named_parameters() if p.grad is not None})

    # Assert
    assert frozen and counts.frozen == sum(p.numel() for p in frozen.values())
    noised = {id(p) for p in private.optimizer.params}
    assert noised == {id(p) for n, p in model.named_parameters() if n in trained}
    assert len(grads_seen) == plan.steps and all(seen == set(trained) for seen in grads_seen)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], value) for n, value in frozen.items())
    assert all(not torch.equal(after[n], value) for n, value in trained.items())


@pytest.mark.parametrize("mode", DP_TRAIN_MODES)
@pytest.mark.parametrize("name", MODELS)
def test_trainable_mask_marks_exactly_what_freeze_for_dp_trains(name, mode):
    """The flat mask has one entry per value the wire sends and as many True entries as freeze_for_dp trains."""
    model = create_model(name, dp=True)

    mask = trainable_mask(model, mode)
    counts = freeze_for_dp(model, mode)

    params = dict(model.named_parameters())
    expected = torch.cat([torch.full((v.numel(),), k in params and params[k].requires_grad)
                          for k, v in model.state_dict().items()])
    assert mask.numel() == wire.get_weights(model)[0].size
    assert int(mask.sum()) == counts.trainable
    assert torch.equal(mask, expected)
