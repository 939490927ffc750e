"""Every registered model, in its DP build (GroupNorm, as the federation trains it) and at a small size, learns the
synthetic faces: after a short centralised training its accuracy on held-out faces is well above chance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from client.data.preprocess import standardize
from client.data.synthetic import make_synthetic
from models import create_model, list_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN_SIZE = 1050
TEST_SIZE = 700
CHANCE = 1 / 7
# Per model: small build, epochs, Adam's peak learning rate, and the held-out accuracy it must reach. With 700
# test faces a model guessing at chance scores 14.3% ± 1.3% (one standard deviation), so 20% is already 4σ above
# chance; the federation's two models (cnn_am, dmsnet_iot) must reach about twice chance. The deep backbones
# (ResNet-50, VGG-16) are cut to one block per stage: at full depth they need minutes of this CPU to leave chance.
# DMSNet's GroupNorm build collapses to a constant output with Adam much above 1e-3 (the CNN-AM paper's rate).
# CNN-AM deep and FER-VGG learn these faces slowly (measured: 0.237 and 0.243 with the settings below; at chance
# after 4 epochs at 3e-3), though both reach 0.66 on FER2013 (docs/benchmarks.md): the bar is the deep models' 0.20.
RECIPES = {
    "cnn_am": ({"width": 0.5}, 4, 3e-3, 0.35),
    "cnn_am_deep": ({"width": 1.0}, 5, 3e-4, 0.20),
    "fer_vgg": ({"base": 16}, 8, 3e-4, 0.20),
    "dmsnet_iot": ({"width": 0.5}, 5, 1e-3, 0.24),
    "dmsnet_heavy": ({"width": 0.125, "depths": (1, 1, 1, 1)}, 4, 1e-3, 0.20),
    "dmsnet_light": ({"width": 0.125, "depths": (1, 1, 1, 1, 1)}, 5, 1e-3, 0.20),
}


@pytest.fixture(scope="module")
def faces() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint train and test draws of the synthetic dataset, standardized as the clients do."""
    out = {}
    for split, (size, seed) in {"train": (TRAIN_SIZE, 0), "test": (TEST_SIZE, 1)}.items():
        images, labels = make_synthetic(size, seed=seed)
        out[split] = torch.from_numpy(standardize(images)), torch.from_numpy(labels)
    return out


def _train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float) -> None:
    """Adam with a one-cycle schedule peaking at `lr`, batch 32: a few epochs reach what a flat rate needs more for."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(labels) / 32)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=order).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
            schedule.step()


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_short_training_beats_chance_on_held_out_faces(name, faces):
    """A few epochs on 1,050 synthetic faces put held-out accuracy well above the 1/7 of guessing."""
    # Prepare
    cfg, epochs, lr, required = RECIPES[name]
    torch.manual_seed(0)
    model = create_model(name, dp=True, **cfg)
    # Execute
    _train(model, *faces["train"], epochs=epochs, lr=lr)
    model.eval()
    test_images, test_labels = faces["test"]
    with torch.no_grad():
        accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item()
    # Assert
    assert accuracy >= required > CHANCE, f"{name}: held-out accuracy {accuracy:.3f} < {required}"
