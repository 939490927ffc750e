"""Training recipes (models/recipe.py): schedule values, augmentation, flip averaging, registry defaults, and a
default `fer-sim run` that learns."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from client import task
from client import config as run_config
from client.config import ConfigError, RunSettings
from client.data.preprocess import Augment, FERTorchDataset, make_augment
from client.data.synthetic import make_synthetic
from models import list_models, model_recipe, recipe
from models.recipe import TrainingRecipe, scheduled_lr


def _make_recipe(**changes) -> TrainingRecipe:
    """A recipe with peak 0.1 and 20 % warm-up, so golden values are easy to write down."""
    return dataclasses.replace(TrainingRecipe(lr=0.1, warmup=0.2), **changes)


def _make_faces(n: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic uint8 faces and labels."""
    return make_synthetic(n, seed=seed)


def _golden_warmup_cosine(t: float, *, peak: float, warmup: float) -> float:
    """Warm-up from 0.1 x peak to peak, then half a cosine period down to 0, written out independently."""
    if t < warmup:
        return peak * (0.1 + 0.9 * t / warmup)
    return peak * (1 + math.cos(math.pi * (t - warmup) / (1 - warmup))) / 2


@pytest.mark.parametrize("num_rounds", [1, 3, 5, 10])
def test_warmup_cosine_gives_each_round_its_slice_of_the_schedule(num_rounds):
    """Round r of R starts at progress (r-1)/R of the warm-up-then-cosine curve."""
    chosen = _make_recipe(schedule="warmup-cosine")

    got = [chosen.round_lr(server_round=r, num_rounds=num_rounds) for r in range(1, num_rounds + 1)]

    want = [_golden_warmup_cosine((r - 1) / num_rounds, peak=0.1, warmup=0.2) for r in range(1, num_rounds + 1)]
    assert got == pytest.approx(want, rel=1e-12)


def test_schedule_golden_values_for_five_rounds():
    """Five rounds, 20 % warm-up: 0.01 at the start, the peak at round 2, then cosine 0.1·(1+cos(πk/4))/2."""
    chosen = _make_recipe(schedule="warmup-cosine")

    got = [chosen.round_lr(server_round=r, num_rounds=5) for r in range(1, 6)]

    assert got == pytest.approx([0.01, 0.1, 0.0853553390593, 0.05, 0.0146446609407], rel=1e-9)
    assert chosen.round_lr(server_round=5, num_rounds=5, fraction=1.0) == pytest.approx(0.0, abs=1e-15)
    assert chosen.round_lr(server_round=1, num_rounds=5, fraction=0.5) == pytest.approx(0.01 + 0.09 * 0.5)


def test_step_schedule_divides_by_ten_at_half_and_three_quarters():
    """Step decay: the peak after warm-up, /10 from half-way, /100 from three quarters."""
    chosen = _make_recipe(schedule="step", warmup=0.0)

    got = [chosen.round_lr(server_round=r, num_rounds=4) for r in range(1, 5)]

    assert got == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_constant_schedule_and_clamping():
    """'constant' ignores progress; progress outside [0, 1] (a resumed round past the plan) is clamped."""
    assert scheduled_lr(schedule="constant", peak=0.3, warmup=0.5, progress=0.0) == 0.3
    assert _make_recipe().round_lr(server_round=9, num_rounds=4) == pytest.approx(0.0, abs=1e-15)
    assert _make_recipe().lr_at(-1.0) == pytest.approx(0.01)


def test_train_sets_the_scheduled_rate_before_every_step():
    """task.train gives step k of n the rate lr_at(k / n) (read back from the optimiser after each step)."""
    model = nn.Linear(4, 7)
    images, labels = torch.randn(12, 4), torch.arange(12) % 7
    loader = DataLoader(list(zip(images, labels)), batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    seen: list[float] = []
    original = optimizer.step

    def step(*args, **kwargs):
        seen.append(optimizer.param_groups[0]["lr"])
        return original(*args, **kwargs)

    optimizer.step = step

    task.train(model, loader, epochs=2, optimizer=optimizer, lr_at=lambda f: 1.0 + f)

    assert seen == pytest.approx([1.0 + k / 6 for k in range(6)])


def test_augmentation_is_deterministic_per_seed():
    """Same seed, same tensors; another seed, other tensors."""
    images, labels = _make_faces()

    def batch(seed: int) -> torch.Tensor:
        dataset = FERTorchDataset(images, labels, augment=make_augment("strong"), seed=seed)
        return torch.stack([dataset[i][0] for i in range(len(dataset))])

    first, again, other = batch(1), batch(1), batch(2)

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("level", ["light", "strong"])
def test_augmentation_keeps_shape_range_and_label(level):
    """Augmented items keep the (1, 48, 48) shape, finite standardised values and their label."""
    images, labels = _make_faces(32)
    dataset = FERTorchDataset(images, labels, augment=make_augment(level), seed=3)

    for i in range(len(dataset)):
        tensor, label = dataset[i]
        assert tensor.shape == (1, 48, 48) and tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all()
        assert int(label) == labels[i]


def test_erasing_changes_a_rectangle_and_keeps_uint8_range():
    """With erasing certain and every other change off, exactly one rectangle of the face differs."""
    image = np.full((48, 48), 128, dtype=np.uint8)
    augment = Augment(rotation=0.0, flip=False, scale=(1.0, 1.0), brightness=0.0, contrast=0.0, shift=0.0,
                      erasing=1.0)

    out = augment(image, np.random.default_rng(0))

    rows, cols = np.nonzero(out != image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert len(rows) > 0
    box = out[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    area = box.size / image.size
    assert 0.02 * 0.5 <= area <= 0.2 * 1.5  # 2-20 % of the face, give or take rounding of the sides


def test_strong_augmentation_erases_and_light_does_not():
    """The recipe levels: 'strong' adds erasing to 'light', 'none' is no augmentation."""
    assert make_augment("strong").erasing == 0.5
    assert make_augment("light").erasing == 0.0
    assert make_augment("none") is None
    with pytest.raises(ValueError, match="augmentation level"):
        make_augment("heavy")


def test_flip_averaged_evaluation_is_the_mean_of_the_two_softmaxes():
    """evaluate(flip_tta=True) predicts argmax of (softmax(x) + softmax(mirror x)) / 2, loss −log of it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48 * 48, 7))
    images, labels = _make_faces(40)
    loader = DataLoader(FERTorchDataset(images, labels), batch_size=16)
    x = torch.stack([FERTorchDataset(images, labels)[i][0] for i in range(40)])
    with torch.no_grad():
        plain = torch.softmax(model(x), 1).numpy()
        mirrored = torch.softmax(model(x.flip(-1)), 1).numpy()
    mean = (plain + mirrored) / 2

    flipped = task.evaluate(model, loader, flip_tta=True)
    unflipped = task.evaluate(model, loader, flip_tta=False)

    assert np.array_equal(flipped.predictions, mean.argmax(1))
    assert flipped.loss == pytest.approx(float(-np.log(mean[np.arange(40), labels]).mean()), rel=1e-5)
    assert np.array_equal(unflipped.predictions, plain.argmax(1))
    assert unflipped.loss == pytest.approx(float(-np.log(plain[np.arange(40), labels]).mean()), rel=1e-5)
    assert not np.array_equal(mean.argmax(1), plain.argmax(1))  # the test can tell the two apart


@pytest.mark.parametrize("name", list_models())
def test_run_settings_default_to_the_models_recipe(name):
    """RunSettings with no recipe key set resolves to exactly the registry's recipe of its model."""
    settings = RunSettings(model=name)

    assert settings.recipe() == model_recipe(name)
    assert settings.train_lr == model_recipe(name).lr
    assert settings.train_optimizer == model_recipe(name).optimizer


def test_each_recipe_key_overrides_the_registry():
    """A run-config key set explicitly wins over the model's recipe."""
    settings = RunSettings.from_run_config({
        "lr": 0.3, "optimizer": "adam", "lr-schedule": "step", "warmup": 0.0, "weight-decay": 0.0,
        "label-smoothing": 0.0, "augment": "none", "class-balance": "weights", "flip-tta": "off",
    })

    assert settings.recipe() == TrainingRecipe(optimizer="adam", lr=0.3, schedule="step", warmup=0.0,
                                               weight_decay=0.0, label_smoothing=0.0, augment="none",
                                               class_balance="weights", flip_tta=False)


def test_synthetic_faces_train_strong_augmentation_as_light_unless_asked():
    """On synthetic faces the recipe's unasked-for 'strong' becomes 'light'; an explicit --augment is kept."""
    assert model_recipe("cnn_am").augment == "strong"

    assert RunSettings().recipe(synthetic=True).augment == "light"
    assert RunSettings().recipe(synthetic=False).augment == "strong"
    assert RunSettings(augment="strong").recipe(synthetic=True).augment == "strong"


def test_dp_runs_keep_their_own_optimiser_and_rate():
    """Under DP-SGD the local optimiser and rate are dp-optimizer and dp-lr, not the recipe's."""
    settings = RunSettings(dp_epsilon=8.0)

    assert (settings.train_optimizer, settings.train_lr) == (settings.dp_optimizer, settings.dp_lr)


@pytest.mark.parametrize(("key", "value"), [("lr-schedule", "cyclic"), ("augment", "max"), ("flip-tta", "yes"),
                                            ("class-balance", "oversample"), ("optimizer", "rmsprop"), ("lr", -1.0)])
def test_invalid_recipe_values_name_the_key(key, value):
    """A recipe key with an unknown value raises a one-line ConfigError naming it."""
    with pytest.raises(ConfigError, match=key):
        RunSettings.from_run_config({key: value})


def test_config_choices_match_the_recipe_module():
    """client/config.py repeats the recipe's choices (to stay torch-free); they must not drift apart."""
    assert run_config.SCHEDULES == recipe.SCHEDULES
    assert run_config.AUGMENTS == recipe.AUGMENTS
    assert run_config.CLASS_BALANCES == recipe.CLASS_BALANCES
    assert run_config.OPTIMIZERS == recipe.RECIPE_OPTIMIZERS


def test_class_weights_make_every_present_class_weigh_the_same():
    """Inverse-frequency weights: count x weight is equal across present classes; absent classes weigh 0."""
    labels = np.array([0] * 60 + [1] * 30 + [3] * 10)

    weights = task.class_weights(labels, num_classes=7).numpy()

    counts = np.bincount(labels, minlength=7)
    assert weights[[2, 4, 5, 6]].tolist() == [0, 0, 0, 0]
    assert counts[[0, 1, 3]] * weights[[0, 1, 3]] == pytest.approx([100 / 3] * 3)


def test_class_balanced_sampling_draws_the_rare_class_as_often_as_the_others():
    """With 'sampling' a 5 % class makes up about a third of a 3-class epoch."""
    labels = np.array([0] * 95 + [1] * 100 + [2] * 5)
    sampler = task.class_balanced_sampler(labels, generator=torch.Generator().manual_seed(0))

    drawn = labels[np.array(list(sampler))]
    drawn = np.concatenate([drawn] + [labels[np.array(list(sampler))] for _ in range(9)])

    assert abs((drawn == 2).mean() - 1 / 3) < 0.05


def test_prepare_training_builds_what_the_recipe_says():
    """prepare_training: Nesterov SGD with the recipe's decay, smoothed loss, and round 2 of 4's slice of the curve."""
    images, labels = _make_faces(20)
    chosen = _make_recipe(class_balance="weights")
    model = nn.Sequential(nn.Flatten(), nn.Linear(48 * 48, 7))

    local = task.prepare_training(model, images, labels, recipe=chosen, batch_size=8, seed=0, server_round=2,
                                  num_rounds=4)

    group = local.optimizer.param_groups[0]
    assert isinstance(local.optimizer, torch.optim.SGD) and group["nesterov"] and group["momentum"] == 0.9
    assert group["weight_decay"] == chosen.weight_decay
    assert local.criterion.label_smoothing == chosen.label_smoothing
    assert torch.equal(local.criterion.weight, task.class_weights(labels, num_classes=7))
    assert local.lr_at(0.0) == pytest.approx(_golden_warmup_cosine(0.25, peak=0.1, warmup=0.2))
    assert local.lr_at(0.5) == pytest.approx(_golden_warmup_cosine(0.375, peak=0.1, warmup=0.2))
    assert local.loader.batch_size == 8 and len(local.loader.dataset) == 20


@pytest.mark.slow
def test_default_run_learns_synthetic_faces(tmp_path):
    """`fer-sim run` with no options (RunSettings' defaults) reaches at least 0.60 on its synthetic test faces."""
    from server.rundir import RunDirectory
    from simulation.runner import run_simulation

    settings = RunSettings(out_dir=str(tmp_path / "run"))

    summary = run_simulation(settings, run_dir=RunDirectory(tmp_path / "run"), num_cpus=2)

    assert summary.initial_accuracy < 0.2
    assert summary.final_accuracy >= 0.60
