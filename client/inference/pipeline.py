"""One frame through the site's model: decode -> detect -> align -> standardise -> classify.

Detection and alignment are the training pipeline's own (client.data.preprocess.FacePreprocessor), and so is the
standardisation, so a face reaches the model at the bedside exactly as faces reached it in training. The
preprocessor keeps the largest face of a frame, which is what a bedside camera framing one patient needs; several
faces per frame would need a detector change there, not a second detector here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from client.data.labels import EMOTIONS
from client.data.preprocess import FacePreprocessor, FaceResult, standardize, to_gray
from client.inference.model import Classifier, softmax


@dataclass(frozen=True)
class FaceObservation:
    """One classified face in one frame.

    Attributes:
        box: (x, y, w, h) in frame pixels.
        face: the aligned uint8 crop the model saw (kept in memory only; written nowhere unless asked).
        probabilities: (7,) float32 in EMOTIONS order.
        detected: True when the detector ran on this frame; False when the crop reused the last detection's
            alignment (detect every k-th frame).
        transform: the 2x3 frame-to-crop affine map, reusable on the next frames.
    """

    box: tuple[int, int, int, int]
    face: np.ndarray
    probabilities: np.ndarray
    detected: bool
    transform: np.ndarray

    @property
    def emotion(self) -> str:
        return EMOTIONS[int(np.argmax(self.probabilities))]


@dataclass
class StageTimes:
    """Seconds spent per stage since the pipeline was made (for the log and the benchmark)."""

    detect: float = 0.0
    classify: float = 0.0
    detections: int = 0
    classifications: int = 0
    samples: list = field(default_factory=list)


class FramePipeline:
    """Finds, aligns and classifies the face in a frame.

    Args:
        classifier: a runtime from client.inference.model.load_classifier.
        detector: "haar" or "yunet" (see FacePreprocessor).
        yunet_model: the YuNet .onnx file for detector="yunet".
        detect_every: run the detector on every k-th frame only and, in between, crop the same place with the last
            alignment: a patient in bed moves little between frames, and the detector is most of a frame's cost
            (benchmarks/bench_inference.py measures both). 1 detects on every frame.
        detect_width: detect and align on a copy of the frame shrunk to this width (0: full resolution). The Haar
            cascade's cost grows with the pixel count; a face that fills a bedside frame is still several times the
            48-pixel crop at 320 wide. Boxes and alignment are mapped back to full-frame coordinates.
    """

    def __init__(self, *, classifier: Classifier, detector: str = "haar", yunet_model: str | None = None,
                 detect_every: int = 1, detect_width: int = 0) -> None:
        if detect_every < 1:
            raise ValueError(f"detect_every must be at least 1, got {detect_every}")
        if detect_width < 0:
            raise ValueError(f"detect_width must be 0 (full resolution) or positive, got {detect_width}")
        self.detect_width = detect_width
        self.classifier = classifier
        self.preprocessor = FacePreprocessor(size=classifier.card.image_size, detector=detector,
                                             yunet_model=yunet_model)
        self.detect_every = detect_every
        self.times = StageTimes()
        self._frames = 0
        self._last: FaceResult | None = None

    def process(self, image: np.ndarray) -> list[FaceObservation]:
        """The faces in one BGR or grayscale frame (at most one, see module docstring), classified."""
        detect_now = self._frames % self.detect_every == 0 or self._last is None
        self._frames += 1
        if detect_now:
            start = time.perf_counter()
            found = self._detect(image)
            self.times.detect += time.perf_counter() - start
            self.times.detections += 1
            self._last = found
        else:
            found = self._recrop(image, self._last)
        if found is None:
            return []
        probabilities = self.classify([found.face])[0]
        return [FaceObservation(box=found.box, face=found.face, probabilities=probabilities, detected=detect_now,
                                transform=found.transform)]

    def classify(self, faces: list[np.ndarray]) -> np.ndarray:
        """(N, 7) probabilities for aligned uint8 faces."""
        start = time.perf_counter()
        probabilities = softmax(self.classifier.logits(standardize(np.stack(faces))))
        self.times.classify += time.perf_counter() - start
        self.times.classifications += len(faces)
        return probabilities

    def reset(self) -> None:
        """Forgets the last detection (a new file or stream starts)."""
        self._frames = 0
        self._last = None

    def _detect(self, image: np.ndarray) -> FaceResult | None:
        width = image.shape[1]
        if not self.detect_width or width <= self.detect_width:
            return self.preprocessor.process_detailed(image)
        scale = self.detect_width / width
        small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        found = self.preprocessor.process_detailed(small)
        if found is None:
            return None
        # The transform maps small-frame pixels to the crop; composing it with the shrink maps full-frame pixels.
        transform = found.transform.copy()
        transform[:, :2] *= scale
        box = tuple(int(round(v / scale)) for v in found.box)
        eyes = None if found.eyes is None else tuple((x / scale, y / scale) for x, y in found.eyes)
        return FaceResult(face=found.face, box=box, eyes=eyes, angle=found.angle, transform=transform)

    def _recrop(self, image: np.ndarray, last: FaceResult) -> FaceResult:
        size = self.preprocessor.size
        face = cv2.warpAffine(to_gray(image), last.transform, (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)
        return FaceResult(face=face, box=last.box, eyes=last.eyes, angle=last.angle, transform=last.transform)


def annotate(image: np.ndarray, box: tuple[int, int, int, int], label: str) -> np.ndarray:
    """A BGR copy of `image` with the box and its label drawn (for --annotate; the caller decides to write it)."""
    out = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    x, y, w, h = box
    cv2.rectangle(out, (x, y), (x + w, y + h), (0, 200, 0), 2)
    cv2.putText(out, label, (x, max(14, y - 6)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 200, 0), 1, cv2.LINE_AA)
    return out
