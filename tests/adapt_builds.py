"""Builders shared by tests/test_adapt.py and benchmarks/bench_adapt.py: the simulated patient, a small federated
model trained on everyone else's synthetic faces, and a carer's corrections folder."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from client.data.labels import EMOTIONS
from client.data.preprocess import standardize
from client.data.synthetic import Patient, make_synthetic
from tests.inference_builds import save_run_model

# A patient whose resting face reads as sad and whose sad face reads as neutral (a drooping mouth), and whose smile
# reads as surprise and surprise as a smile; the other three expressions look as everyone's do.
PATIENT = Patient(identity_seed=5, looks_like={"neutral": "sad", "sad": "neutral", "happy": "surprise",
                                                "surprise": "happy"})
# Seeds of the data sets: the base model's training faces, the corrections, the patient's held-out faces, everyone
# else's held-out faces. All different, so nothing is evaluated on what it was fitted on.
TRAIN_SEED, CORRECTION_SEED, PATIENT_TEST_SEED, OTHERS_TEST_SEED = 11, 31, 21, 99


def train_synthetic_base(root: Path, *, n: int = 2100, epochs: int = 5, seed: int = 0) -> Path:
    """A small cnn_am (width 0.25) trained on `n` ordinary synthetic faces, saved as a run's model.pt (10-30 s).

    Adam under a one-cycle schedule, batch 64: about 69 % on fresh synthetic faces after 5 epochs on 2,100.
    """
    import torch

    from models import create_model

    torch.manual_seed(seed)
    images, labels = make_synthetic(n, seed=TRAIN_SEED)
    x, y = torch.from_numpy(standardize(images)), torch.from_numpy(labels)
    cfg = {"width": 0.25, "drop_rate": 0.2}
    model = create_model("cnn_am", dp=True, **cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=epochs * math.ceil(n / batch))
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(n).split(batch):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
            schedule.step()
    return save_run_model(root, model.eval(), name="cnn_am", cfg={"dp": True, **cfg})


def write_corrections(folder: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """A carer's corrections as adapt reads them: FOLDER/<emotion>/<i>.png (aligned crops)."""
    for index, (image, label) in enumerate(zip(images, labels)):
        target = folder / EMOTIONS[int(label)]
        target.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target / f"{index:04d}.png"), image)
    return folder


def accuracy(classifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of a client.inference.model classifier on aligned uint8 faces."""
    return float((classifier.logits(standardize(images)).argmax(1) == labels).mean())
