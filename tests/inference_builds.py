"""Builders shared by the inference tests and benchmarks/bench_inference.py: a bedside video of synthetic faces with
known expression segments, and a tiny model trained on those faces so its output is known."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from client.data.labels import EMOTIONS
from client.data.preprocess import Augment, FacePreprocessor, standardize
from client.data.synthetic import make_synthetic

FRAME_W, FRAME_H = 640, 480
FACE_SIDE = 200
FPS = 10.0


@dataclass(frozen=True)
class Segment:
    """Frames [first, last] of the video show one face with expression `emotion`."""

    emotion: str
    first: int
    last: int

    def span(self, fps: float = FPS) -> tuple[float, float]:
        return self.first / fps, self.last / fps


def pick_faces(emotions: tuple[str, ...], *, seed: int = 3) -> dict[str, np.ndarray]:
    """One synthetic 96-pixel face per emotion that OpenCV's Haar detector finds once pasted on a frame."""
    images, labels = make_synthetic(140, seed=seed, image_size=96)
    detector = FacePreprocessor()
    chosen: dict[str, np.ndarray] = {}
    for image, label in zip(images, labels):
        name = EMOTIONS[int(label)]
        if name in emotions and name not in chosen and all(
                detector.process(paste(image, index)) is not None for index in (0, 1)):
            chosen[name] = image
    missing = set(emotions) - set(chosen)
    if missing:
        raise RuntimeError(f"no detectable synthetic face for {sorted(missing)} with seed {seed}")
    return chosen


def paste(face: np.ndarray, frame_index: int) -> np.ndarray:
    """A 640x480 BGR frame with `face` enlarged near the centre, moving a pixel to and fro as a resting patient does."""
    frame = np.full((FRAME_H, FRAME_W), 90, dtype=np.uint8)
    big = cv2.resize(face, (FACE_SIDE, FACE_SIDE), interpolation=cv2.INTER_CUBIC)
    x = 220 + frame_index % 2
    y = 140 + frame_index % 2
    frame[y:y + FACE_SIDE, x:x + FACE_SIDE] = big
    return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)


def write_video(path: Path, plan: list[tuple[str, int]], faces: dict[str, np.ndarray]) -> list[Segment]:
    """Writes an MJPG .avi at FPS whose consecutive segments show the planned (emotion, frame count)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (FRAME_W, FRAME_H))
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write MJPG video")
    segments, index = [], 0
    for emotion, count in plan:
        for _ in range(count):
            writer.write(paste(faces[emotion], index))
            index += 1
        segments.append(Segment(emotion=emotion, first=index - count, last=index - 1))
    writer.release()
    return segments


def train_controlled_model(faces: dict[str, np.ndarray], *, name: str = "cnn_am", cfg: dict | None = None,
                           steps: int = 30, seed: int = 0):
    """A small model trained for a few seconds on augmented crops of `faces`, so that it names each face's emotion.

    The crops come from the same detector and alignment the bedside pipeline uses, so what the model saw in
    training is what it sees in the video.
    """
    import torch

    from models import create_model

    cfg = dict(cfg or {"width": 0.25})
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    detector = FacePreprocessor()
    crops = {emotion: detector.process(paste(face, 0)) for emotion, face in faces.items()}
    augment = Augment(rotation=4.0, flip=False, scale=(0.95, 1.05), brightness=0.05, contrast=0.05, shift=0.03)
    model = create_model(name, dp=True, **cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    names = list(crops)
    model.train()
    for _ in range(steps):
        labels = rng.integers(0, len(names), 16)
        batch = np.stack([augment(crops[names[k]], rng) for k in labels])
        targets = torch.tensor([EMOTIONS.index(names[k]) for k in labels])
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(standardize(batch))), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), {"dp": True, **cfg}


def save_run_model(run_path: Path, model, *, name: str, cfg: dict) -> Path:
    """Saves `model` as a run directory's model.pt + model.json, the format fer-server writes."""
    from server.rundir import RunDirectory

    return RunDirectory(run_path).save_model(model.state_dict(), model_name=name, model_cfg=cfg, round=1)
