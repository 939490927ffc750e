"""Turning a site's images into model inputs: face detection and alignment, standardisation, augmentation.

The face pipeline uses only detectors that ship inside the OpenCV wheel (Haar cascades), or a YuNet model the user
already has on disk, because a hospital node may have no internet access and must not fetch models at run time.
Datasets that are already cropped faces (FER2013, RAF-DB aligned, the synthetic set) skip detection and go straight
to `standardize`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from pathlib import Path

import click
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from client.data.labels import NUM_CLASSES

DETECTORS = ("haar", "yunet")

# Below one grey level of spread an image is blank for practical purposes; dividing by a smaller std would turn
# quantisation noise into full-scale contrast.
_STD_FLOOR = 1.0 / 255.0


@dataclass(frozen=True)
class FaceResult:
    """One detected, aligned face and the geometry that produced it (exposed so alignment can be checked).

    Attributes:
        face: the aligned crop, uint8 (size, size).
        box: the detected face box (x, y, w, h) in input-image pixels.
        eyes: centres of the eye on the image's left and the eye on its right, in input-image pixels, or None when
            eyes were not found and the box was cropped unrotated.
        angle: degrees the image was rotated by to level the eye line (counter-clockwise as displayed; 0 without
            eyes).
        transform: 2x3 affine matrix mapping input-image (x, y) to `face` pixel coordinates.
    """

    face: np.ndarray
    box: tuple[int, int, int, int]
    eyes: tuple[tuple[float, float], tuple[float, float]] | None
    angle: float
    transform: np.ndarray


class FacePreprocessor:
    """Grayscale -> largest face -> eye-based alignment -> crop with margin -> resize.

    Args:
        size: side of the square output face.
        detector: "haar" (OpenCV's bundled frontal-face and eye cascades) or "yunet" (cv2.FaceDetectorYN, whose
            landmarks give the eyes; needs `yunet_model`).
        yunet_model: path to a YuNet .onnx file the user supplies; nothing is downloaded.
        margin: extra context added on each side of the detected box, as a fraction of its side. Haar boxes run from
            brow to lip; 0.1 brings in chin and forehead, close to how FER2013's faces are framed.
    """

    def __init__(self, *, size: int = 48, detector: str = "haar", yunet_model: str | None = None,
                 margin: float = 0.1) -> None:
        if detector not in DETECTORS:
            raise click.ClickException(f"unknown face detector {detector!r}; choose one of {', '.join(DETECTORS)}")
        if size < 8:
            raise ValueError(f"size must be at least 8, got {size}")
        if margin < 0:
            raise ValueError(f"margin must be non-negative, got {margin}")
        self.size, self.detector, self.margin = size, detector, margin
        if detector == "yunet":
            if yunet_model is None:
                raise click.ClickException("the yunet detector needs a model file: pass yunet_model=PATH to a .onnx")
            if not Path(yunet_model).is_file():
                raise click.ClickException(f"YuNet model file not found: {yunet_model}")
            self._yunet = cv2.FaceDetectorYN.create(str(yunet_model), "", (320, 320), 0.6, 0.3, 50)
        else:
            self._faces = _cascade("haarcascade_frontalface_default.xml")
            self._eyes = _cascade("haarcascade_eye.xml")

    def process(self, image: np.ndarray) -> np.ndarray | None:
        """Returns the aligned uint8 (size, size) face from a grayscale or BGR image, or None if no face is found."""
        result = self.process_detailed(image)
        return None if result is None else result.face

    def process_detailed(self, image: np.ndarray) -> FaceResult | None:
        """Like `process`, but also returns the box, eye centres, rotation and transform that were used."""
        gray = to_gray(image)
        if self.detector == "yunet":
            found = self._detect_yunet(gray)
        else:
            found = self._detect_haar(gray)
        if found is None:
            return None
        box, eyes = found
        return self._align(gray, box, eyes)

    def _detect_haar(self, gray: np.ndarray):
        # Equalising only for detection makes the cascades work under the dim or uneven light of a ward, while the
        # crop keeps the original intensities (standardisation deals with those later).
        equalized = cv2.equalizeHist(gray)
        faces = self._faces.detectMultiScale(equalized, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        if len(faces) == 0:
            return None
        x, y, w, h = (int(v) for v in max(faces, key=lambda f: int(f[2]) * int(f[3])))
        # Eyes sit in the upper half of a Haar face box; searching only there keeps nostrils and mouth corners,
        # which the eye cascade also likes, out of the candidates. The region is equalised on its own: a
        # whole-image histogram is dominated by background and can leave the eyes washed out.
        top, bottom = y + h // 10, y + (h * 6) // 10
        region = cv2.equalizeHist(np.ascontiguousarray(gray[top:bottom, x:x + w]))
        candidates = self._eyes.detectMultiScale(region, scaleFactor=1.1, minNeighbors=5,
                                                 minSize=(max(8, w // 9), max(8, w // 9)),
                                                 maxSize=(w // 2, w // 2))
        centres = [(x + float(ex) + ew / 2.0, top + float(ey) + eh / 2.0, float(ew)) for ex, ey, ew, eh in candidates]
        return (x, y, w, h), _pick_eye_pair(centres, (x, y, w, h))

    def _detect_yunet(self, gray: np.ndarray):
        bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
        self._yunet.setInputSize((gray.shape[1], gray.shape[0]))
        _, faces = self._yunet.detect(bgr)
        if faces is None or len(faces) == 0:
            return None
        best = max(faces, key=lambda f: float(f[2]) * float(f[3]))
        box = tuple(int(round(v)) for v in best[:4])
        # YuNet's first two landmarks are the subject's right and left eye; order them as they appear in the image.
        eyes = sorted([(float(best[4]), float(best[5])), (float(best[6]), float(best[7]))])
        return box, (eyes[0], eyes[1])

    def _align(self, gray: np.ndarray, box, eyes) -> FaceResult:
        x, y, w, h = box
        centre = (x + w / 2.0, y + h / 2.0)
        angle = 0.0
        if eyes is not None:
            (lx, ly), (rx, ry) = eyes
            angle = math.degrees(math.atan2(ry - ly, rx - lx))
        side = max(w, h) * (1.0 + 2.0 * self.margin)
        crop = max(1, int(round(side)))
        # Rotate about the box centre and move it to the crop's centre in one warp, at the source resolution; the
        # area-interpolated resize afterwards avoids the aliasing a direct large down-scaling warp would add.
        matrix = cv2.getRotationMatrix2D(centre, angle, 1.0)
        matrix[:, 2] += (crop / 2.0 - centre[0], crop / 2.0 - centre[1])
        aligned = cv2.warpAffine(gray, matrix, (crop, crop), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REPLICATE)
        interpolation = cv2.INTER_AREA if crop > self.size else cv2.INTER_LINEAR
        face = cv2.resize(aligned, (self.size, self.size), interpolation=interpolation)
        transform = matrix * (self.size / crop)
        return FaceResult(face=face, box=(int(x), int(y), int(w), int(h)), eyes=eyes, angle=angle,
                          transform=transform)


def _cascade(name: str) -> cv2.CascadeClassifier:
    path = Path(cv2.data.haarcascades) / name
    classifier = cv2.CascadeClassifier(str(path))
    if classifier.empty():
        raise RuntimeError(f"OpenCV's bundled cascade {path} could not be loaded; reinstall opencv-python-headless")
    return classifier


def _pick_eye_pair(centres, box):
    """Chooses the eye-cascade hits that form the most plausible pair, or None.

    A pair needs one hit on each side of the box's midline, a spacing of 20-70 % of the face width and a tilt
    under 35 degrees; among those, the pair whose midpoint is nearest where eyes usually are and whose sizes agree
    best wins.
    """
    x, y, w, h = box
    mid_x = x + w / 2.0
    best, best_cost = None, math.inf
    for lx, ly, ls in centres:
        for rx, ry, rs in centres:
            if not (lx < mid_x < rx):
                continue
            dx, dy = rx - lx, ry - ly
            if not (0.2 * w <= math.hypot(dx, dy) <= 0.7 * w) or abs(math.degrees(math.atan2(dy, dx))) > 35:
                continue
            cost = (abs((lx + rx) / 2 - mid_x) / w + abs((ly + ry) / 2 - (y + 0.38 * h)) / h
                    + abs(ls - rs) / w)
            if cost < best_cost:
                best, best_cost = ((lx, ly), (rx, ry)), cost
    return best


def to_gray(image: np.ndarray) -> np.ndarray:
    """Returns a uint8 grayscale view of a grayscale, BGR or BGRA uint8 image."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    raise ValueError(f"expected a grayscale, BGR or BGRA image, got shape {image.shape}")


def standardize(images: np.ndarray) -> np.ndarray:
    """Scales uint8 faces to [0, 1], then gives each image zero mean and unit standard deviation.

    Per-image rather than dataset statistics, deliberately: in a federation a dataset-wide mean and std would have
    to be computed across sites (leaking a summary of every site's images) or differ between sites (so the same
    face would reach the model differently at each hospital). Per-image statistics need nothing shared, and they
    remove the global brightness and contrast differences between cameras and wards, which carry no expression.
    The std is floored at one grey level so blank or nearly blank images come out as zeros and small noise rather
    than amplified quantisation noise.

    Args:
        images: uint8 array (N, H, W).

    Returns:
        float32 array (N, 1, H, W).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    scaled = images.astype(np.float32) / 255.0
    mean = scaled.mean(axis=(1, 2), keepdims=True, dtype=np.float64).astype(np.float32)
    std = scaled.std(axis=(1, 2), keepdims=True, dtype=np.float64).astype(np.float32)
    scaled -= mean
    scaled /= np.maximum(std, _STD_FLOOR)
    return scaled[:, None, :, :]


class Augment:
    """Training-only augmentation of uint8 (H, W) faces, reproducible from the numpy Generator it is given.

    Each call draws, in a fixed order: a rotation, a scale, a crop offset, a flip, a brightness and a contrast
    change, then (only when `erasing` > 0, so outputs without erasing are those of the earlier versions) an
    erased rectangle; the same generator state always gives the same output whatever other options are off.

    Args:
        rotation: maximum absolute rotation in degrees; faces in the wild tilt by about this much.
        flip: mirror half of the images; expressions are (nearly) symmetric, so this doubles the data for free.
        scale: range of the zoom factor; with `shift`, it is a random scale-and-crop of the face.
        brightness: maximum additive brightness change, as a fraction of the full 0-255 range.
        contrast: maximum relative contrast change around the image's mean.
        shift: maximum crop offset in each direction, as a fraction of the image side.
        erasing: probability of random erasing (Zhong et al. 2020): a rectangle of 2-20 % of the image, aspect
            ratio 0.3-3.3, is filled with uniform noise, so the net cannot lean on any one part of the face
            (FER faces in the wild are occluded by hands, glasses and hair).
    """

    def __init__(self, *, rotation: float = 10.0, flip: bool = True, scale: tuple[float, float] = (0.9, 1.1),
                 brightness: float = 0.2, contrast: float = 0.2, shift: float = 0.05, erasing: float = 0.0) -> None:
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be an increasing pair of positive factors, got {scale}")
        if min(rotation, brightness, contrast, shift) < 0:
            raise ValueError("rotation, brightness, contrast and shift must be non-negative")
        if not 0 <= erasing <= 1:
            raise ValueError(f"erasing is a probability in [0, 1], got {erasing}")
        self.rotation = rotation
        self.flip = flip
        self.scale = (float(scale[0]), float(scale[1]))
        self.brightness = brightness
        self.contrast = contrast
        self.shift = shift
        self.erasing = erasing

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Returns an augmented copy of `image` (uint8, same shape)."""
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"expected a uint8 (H, W) image, got {image.dtype} {image.shape}")
        h, w = image.shape
        angle = rng.uniform(-self.rotation, self.rotation)
        zoom = rng.uniform(*self.scale)
        offset_x, offset_y = rng.uniform(-self.shift, self.shift, 2) * (w, h)
        mirror = rng.random() < 0.5
        brightness = rng.uniform(-self.brightness, self.brightness) * 255.0
        contrast = 1.0 + rng.uniform(-self.contrast, self.contrast)

        out = image
        if angle != 0.0 or zoom != 1.0 or offset_x != 0.0 or offset_y != 0.0:
            matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, zoom)
            matrix[:, 2] += (offset_x, offset_y)
            # Reflecting the border keeps the face's surroundings plausible; a constant fill would add a frame the
            # model could learn to look for.
            out = cv2.warpAffine(out, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        if self.flip and mirror:
            out = cv2.flip(out, 1)
        if brightness != 0.0 or contrast != 1.0:
            values = out.astype(np.float32)
            mean = values.mean()
            values = (values - mean) * contrast + mean + brightness
            out = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        if self.erasing > 0 and rng.random() < self.erasing:
            out = out.copy() if out is image else out
            area = rng.uniform(0.02, 0.2) * h * w
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            eh = min(h, max(1, round(math.sqrt(area * aspect))))
            ew = min(w, max(1, round(math.sqrt(area / aspect))))
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            out[top:top + eh, left:left + ew] = rng.integers(0, 256, (eh, ew), dtype=np.uint8)
        return out.copy() if out is image else out


def make_augment(level: str) -> Augment | None:
    """The training augmentation of a recipe's `augment` level ("none", "light" or "strong"; models/recipe.py).

    "light" is the project's earlier default. "strong" is the recipe the environment guide measured on FER2013
    (flip / affine / erasing): shifts of up to 10 % of the side (a random crop of a padded face) and random erasing
    with probability 0.5.
    """
    if level == "none":
        return None
    if level == "light":
        return Augment()
    if level == "strong":
        return Augment(shift=0.1, erasing=0.5)
    raise ValueError(f"unknown augmentation level {level!r}; known: none, light, strong")


class FERTorchDataset(Dataset):
    """Faces and labels as (standardised float32 (1, H, W) tensor, int64 label) pairs for a DataLoader.

    With an `augment`, item i's k-th access is augmented with a generator seeded from (seed, i, k): each epoch sees
    fresh augmentations, yet a run is reproducible from `seed` regardless of the order the sampler visits items.
    (With DataLoader worker processes the per-item access counts live in each worker, so reproducibility then also
    depends on the worker layout.) Without `augment` items are returned unchanged, which is what evaluation needs.

    Args:
        images: uint8 (N, H, W) faces.
        labels: integer (N,) labels in the project's label space.
        augment: training augmentation, or None for evaluation.
        seed: seed for the augmentation generators.
        views: augmentation multiplicity K: an item is K independently augmented views stacked as (K, 1, H, W),
            for DP-SGD's per-sample mean over views (privacy.bookkeeping.BookKeepingModule, `aug-mult`); 1
            returns the usual (1, H, W) tensor.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, augment: Augment | None = None,
                 seed: int = 0, views: int = 1) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError(f"expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"expected {len(images)} integer labels, got {labels.dtype} {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}")
        if views < 1 or (views > 1 and augment is None):
            raise ValueError(f"views must be 1, or more than 1 with an augment (K copies of one face add nothing); "
                             f"got {views}")
        self.images = images
        self.labels = labels.astype(np.int64)
        self.augment = augment
        self.seed = seed
        self.views = views
        self._draws = np.zeros(len(images), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        label = torch.tensor(self.labels[index], dtype=torch.int64)
        if self.views > 1:
            return torch.stack([self._view(index) for _ in range(self.views)]), label
        return self._view(index), label

    def _view(self, index: int) -> torch.Tensor:
        """Item `index` as a standardised (1, H, W) tensor, augmented afresh on every call when there is an augment."""
        image = self.images[index]
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, index, int(self._draws[index])))
            self._draws[index] += 1
            image = self.augment(image, rng)
        return torch.from_numpy(standardize(image[None])[0])
