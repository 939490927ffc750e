"""class-balance "logit-adjust" (client.task.LogitAdjustedLoss): the loss each site trains under label skew."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from client import task
from client.config import ConfigError, RunSettings
from client.data.synthetic import make_synthetic
from client.node_data import cached_dataset
from client.trainer import fit_label_prior
from models.recipe import TrainingRecipe
from server.public_pretrain import public_split, target_label_prior


def _skewed_labels() -> np.ndarray:
    """A site's labels: 80 happy (3), 15 neutral (6), 5 sad (4), no other class."""
    return np.array([3] * 80 + [6] * 15 + [4] * 5)


def _golden_smoothed_ce(logits: np.ndarray, labels: np.ndarray, frequency: np.ndarray, eps: float) -> float:
    """Label-smoothed cross-entropy of logits + log frequency over the classes of nonzero frequency, written out
    with numpy: mean over rows of -sum q log p, q spreading eps over those classes."""
    held = np.flatnonzero(frequency)
    z = logits[:, held] + np.log(frequency[held])
    log_p = z - z.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    q = np.full_like(log_p, eps / len(held))
    q[np.arange(len(labels)), np.searchsorted(held, labels)] += 1 - eps
    return float(-(q * log_p).sum(1).mean())


def _fit_bias(criterion: nn.Module, labels: np.ndarray, steps: int = 600) -> np.ndarray:
    """Trains a bias-only classifier (the faces carry no signal) under `criterion`; returns its softmax."""
    bias = torch.zeros(7, requires_grad=True)
    optimizer = torch.optim.SGD([bias], lr=0.5)
    targets = torch.as_tensor(labels)
    for _ in range(steps):
        optimizer.zero_grad()
        criterion(bias.expand(len(targets), 7), targets).backward()
        optimizer.step()
    return torch.softmax(bias.detach(), 0).numpy()


def test_label_log_prior_is_the_log_of_the_frequencies():
    """label_log_prior: log(count / n); a class the site lacks is -inf."""
    labels = _skewed_labels()

    log_prior = task.label_log_prior(labels, num_classes=7).numpy()

    assert log_prior[[3, 4, 6]] == pytest.approx(np.log([0.80, 0.05, 0.15]), abs=1e-6)
    assert np.isneginf(log_prior[[0, 1, 2, 5]]).all()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_adjusted_loss_is_cross_entropy_of_the_shifted_logits_over_the_held_classes(smoothing):
    """LogitAdjustedLoss equals smoothed cross-entropy of logits + log prior over the site's classes, computed
    independently with numpy."""
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(12, 7)).astype(np.float32), rng.choice([3, 4, 6], 12)
    site = _skewed_labels()

    loss = task.LogitAdjustedLoss(task.label_log_prior(site, num_classes=7), label_smoothing=smoothing)(
        torch.from_numpy(logits), torch.from_numpy(labels))

    frequency = np.bincount(site, minlength=7) / len(site)
    assert float(loss) == pytest.approx(_golden_smoothed_ce(logits, labels, frequency, smoothing), rel=1e-5)


def test_a_class_the_site_lacks_gets_no_gradient_even_with_label_smoothing():
    """The logits of classes absent from the site are untouched by its loss (smoothing 0.1 included)."""
    logits = torch.randn(8, 7, requires_grad=True)
    criterion = task.LogitAdjustedLoss(task.label_log_prior(_skewed_labels(), num_classes=7), label_smoothing=0.1)

    criterion(logits, torch.tensor([3, 3, 4, 6, 3, 6, 3, 3])).backward()

    assert torch.count_nonzero(logits.grad[:, [0, 1, 2, 5]]) == 0
    assert torch.count_nonzero(logits.grad[:, [3, 4, 6]]) == 24


def test_a_skewed_site_learns_its_label_mix_with_plain_cross_entropy_and_not_with_logit_adjust():
    """On faces with no signal, cross-entropy learns the site's 80 % happy; the adjusted loss learns no preference
    at all (every class stays at 1/7), so nothing of the site's mix reaches the weights the server averages."""
    labels = _skewed_labels()

    plain = _fit_bias(nn.CrossEntropyLoss(), labels)
    adjusted = _fit_bias(task.LogitAdjustedLoss(task.label_log_prior(labels, num_classes=7)), labels)

    assert plain[[3, 4, 6]] == pytest.approx([0.80, 0.05, 0.15], abs=0.01)
    assert adjusted == pytest.approx([1 / 7] * 7, abs=1e-3)


def test_prepare_training_uses_the_sites_own_prior_under_logit_adjust():
    """prepare_training with class_balance 'logit-adjust' builds the adjusted loss from these labels, smoothed as the
    recipe says."""
    images, _ = make_synthetic(100, seed=0)
    labels = _skewed_labels()
    model = nn.Sequential(nn.Flatten(), nn.Linear(48 * 48, 7))

    local = task.prepare_training(model, images, labels, recipe=TrainingRecipe(class_balance="logit-adjust"),
                                  batch_size=16, seed=0, server_round=1, num_rounds=2)

    assert isinstance(local.criterion, task.LogitAdjustedLoss)
    assert torch.equal(local.criterion.log_prior, task.label_log_prior(labels, num_classes=7))
    assert local.criterion.label_smoothing == TrainingRecipe().label_smoothing


def test_the_run_setting_reaches_the_recipe():
    """`class-balance logit-adjust` in the run config is what the run's recipe trains with."""
    settings = RunSettings(class_balance="logit-adjust")

    assert settings.recipe().class_balance == "logit-adjust"
    assert RunSettings().recipe().class_balance == "none"


def _make_settings(**changes) -> RunSettings:
    """A small synthetic federation that logit-adjusts towards its 30 % public slice's mix."""
    base = RunSettings(dataset="synthetic=600", num_clients=3, min_clients=3, partition="dirichlet", alpha=0.5,
                       public_fraction=0.3, seed=7, class_balance="logit-adjust")
    return base.replace(**changes)


def test_where_the_site_mix_is_the_target_the_loss_is_plain_cross_entropy():
    """prepare_training with label_prior = the data's own mix (centralised training, public pretraining) gives
    exactly the recipe's smoothed cross-entropy."""
    images, labels = make_synthetic(70, seed=1)
    frequency = np.bincount(labels, minlength=7) / len(labels)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48 * 48, 7))
    logits, targets = torch.randn(9, 7), torch.as_tensor(labels[:9])

    local = task.prepare_training(model, images, labels, recipe=TrainingRecipe(class_balance="logit-adjust"),
                                  batch_size=16, seed=0, server_round=1, num_rounds=2, label_prior=frequency)

    plain = nn.CrossEntropyLoss(label_smoothing=TrainingRecipe().label_smoothing)
    assert float(local.criterion(logits, targets)) == pytest.approx(float(plain(logits, targets)), rel=1e-5)


@pytest.mark.parametrize("prior", ["1,2,3", "1,1,1,1,1,1,0", "1,1,1,1,1,1,nan", "happy"])
def test_a_bad_label_prior_is_refused_naming_the_key(prior):
    """label-prior must be public, uniform or seven positive counts; anything else is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="label-prior"):
        RunSettings(label_prior=prior).validate()


def test_a_public_label_prior_without_a_public_slice_is_refused():
    """logit-adjust towards the public mix needs public-fraction > 0."""
    with pytest.raises(ConfigError, match="public-fraction"):
        _make_settings(public_fraction=0.0)


def test_the_target_prior_is_what_the_run_says():
    """target_label_prior: the public slice's counts + 1, uniform, or the given counts normalised; None when the
    recipe does not logit-adjust."""
    settings = _make_settings()
    labels = cached_dataset("synthetic=600", settings.image_size, settings.seed).splits["train"].labels
    public = labels[public_split(settings, "synthetic=600").public]

    counts = np.bincount(public, minlength=7) + 1
    assert target_label_prior(settings) == pytest.approx(counts / counts.sum())
    assert target_label_prior(settings.replace(label_prior="uniform")) == pytest.approx([1 / 7] * 7)
    assert target_label_prior(settings.replace(label_prior="2,1,1,4,2,1,1")) == pytest.approx(
        np.array([2, 1, 1, 4, 2, 1, 1]) / 12)
    assert target_label_prior(settings.replace(class_balance="none")) is None


def test_the_fit_config_carries_the_target_and_the_site_reads_it_back():
    """The ServerApp's fit config holds the target as text; the site parses the same frequencies from it, and
    refuses a config that lacks it or garbles it."""
    from server.server_app import build_strategy, initial_weights

    settings = _make_settings(public_epochs=1)
    config = build_strategy(settings, initial_weights(settings)).inner.on_fit_config_fn(3)

    assert fit_label_prior(config, settings) == pytest.approx(target_label_prior(settings), abs=1e-7)
    assert fit_label_prior({}, settings.replace(class_balance="none")) is None
    with pytest.raises(ValueError, match="sent none"):
        fit_label_prior({"server-round": 3}, settings)
    with pytest.raises(ConfigError, match="fit config's label-prior"):
        fit_label_prior({**config, "label-prior": "0.5,0.5"}, settings)
