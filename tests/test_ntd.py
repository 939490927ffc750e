"""Not-true distillation (FedNTD): the local loss term that keeps the global model's ranking of the other classes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from client import task, wire
from client.config import ConfigError, RunSettings
from client.task import not_true_distillation
from models import create_model
from server.server_app import initial_weights
from tests.test_local_splits import _make_client


def _golden(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, tau: float) -> float:
    """tau² · mean over faces of KL(teacher ‖ student) over the not-true classes, written out in numpy."""
    total = 0.0
    for s, t, y in zip(student, teacher, labels):
        s, t = np.delete(s, y) / tau, np.delete(t, y) / tau
        p_t = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
        log_p_s = s - s.max() - np.log(np.exp(s - s.max()).sum())
        total += float((p_t * (np.log(p_t) - log_p_s)).sum())
    return tau ** 2 * total / len(labels)


def _make_logits(seed: int = 0, n: int = 9, classes: int = 7):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, classes)) * 2, rng.normal(size=(n, classes)) * 2, rng.integers(0, classes, n)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_the_term_equals_an_independent_computation(tau):
    """The loss equals tau² · KL over the not-true classes computed in numpy."""
    # Prepare
    student, teacher, labels = _make_logits()
    # Execute
    value = not_true_distillation(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), tau=tau)
    # Assert
    assert float(value) == pytest.approx(_golden(student, teacher, labels, tau), rel=1e-9)


def test_the_true_class_gets_no_gradient_and_a_matching_student_costs_nothing():
    """Only not-true logits are pulled; where they already match the teacher's the term is 0."""
    # Prepare
    student, teacher, labels = _make_logits(seed=1)
    logits = torch.tensor(student, requires_grad=True)
    labels_t = torch.tensor(labels)
    # Execute
    not_true_distillation(logits, torch.tensor(teacher), labels_t, tau=3.0).backward()
    same = not_true_distillation(torch.tensor(teacher) + 5.0, torch.tensor(teacher), labels_t, tau=3.0)
    # Assert
    true_grad = logits.grad.gather(1, labels_t[:, None])
    assert torch.count_nonzero(true_grad) == 0
    assert torch.count_nonzero(logits.grad) == len(labels) * 6
    assert float(same) == pytest.approx(0.0, abs=1e-12)


def test_training_with_the_term_stays_closer_to_the_teacher_on_the_not_true_classes():
    """The same seeded steps with weight 1 end nearer the round's global model, not-true classes only, than weight 0."""
    # Prepare
    from client.data.preprocess import standardize
    from client.data.synthetic import make_synthetic

    images, labels = make_synthetic(96, seed=3)
    images, labels = torch.from_numpy(standardize(images)), torch.from_numpy(labels)
    torch.manual_seed(0)
    start = create_model("cnn_am", dp=True, width=0.5)
    teacher = copy.deepcopy(start).eval().requires_grad_(False)

    def trained(beta: float) -> float:
        model = copy.deepcopy(start)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=16)
        task.train(model, loader, epochs=3, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
                   teacher=teacher, distill_beta=beta)
        with torch.no_grad():
            return float(not_true_distillation(model.eval()(images), teacher(images), labels, tau=3.0))

    # Execute
    plain, distilled = trained(0.0), trained(1.0)
    # Assert
    assert distilled < 0.5 * plain


def test_a_site_distills_from_the_model_the_round_sent(tmp_path):
    """With ntd-beta the site's delta is the recipe's training plus the term towards the received global model."""
    # Prepare
    settings = RunSettings(dataset="synthetic=120", model="cnn_am", local_epochs=1, batch_size=16, out_dir="unused",
                           num_server_rounds=4, ntd_beta=1.0)
    client = _make_client(settings, tmp_path)
    weights = initial_weights(settings)
    seed = client._seed(2)

    def expected(beta: float) -> list[np.ndarray]:
        torch.manual_seed(seed)
        model = create_model(settings.model, dp=True)
        wire.set_weights(model, weights)
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        data = client.setup.data
        local = task.prepare_training(model, data.train_images, data.train_labels,
                                      recipe=settings.recipe(synthetic=True), batch_size=16, seed=seed,
                                      server_round=2, num_rounds=4)
        task.train(model, local.loader, epochs=1, optimizer=local.optimizer, criterion=local.criterion,
                   lr_at=local.lr_at, teacher=teacher, distill_beta=beta)
        return [new - old for new, old in zip(wire.get_weights(model), weights)]

    # Execute
    delta, _, _ = client.fit(weights, {"server-round": 2})
    # Assert
    for got, want in zip(delta, expected(1.0)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert max(float(np.abs(g - e).max()) for g, e in zip(delta, expected(0.0))) > 1e-4


@pytest.mark.parametrize("changes", [{"ntd_beta": -1.0}, {"ntd_beta": float("nan")},
                                     {"ntd_beta": 1.0, "dp_epsilon": 3.0}])
def test_a_bad_or_private_ntd_beta_is_refused_naming_the_key(changes):
    """A negative or NaN weight, or one with DP-SGD, is refused in one line naming ntd-beta."""
    with pytest.raises(ConfigError, match="ntd-beta") as refused:
        RunSettings(dataset="synthetic=20", **changes).validate()
    assert "\n" not in str(refused.value)
