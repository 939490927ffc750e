"""A procedurally drawn facial-expression dataset: the embedded default for demos and tests, no files needed.

Every face is drawn with OpenCV primitives (face oval, hair, eyes, brows, nose, mouth) on a canvas twice the output
size and reduced with area interpolation, so features a pixel or two wide still come out anti-aliased.

The expression lives only in the geometry, as it does in real faces: mouth curvature, opening, width and an
asymmetric upper-lip raise; eye opening; brow height and tilt. Each of the seven classes has a prototype in that
parameter space, and a sample is the neutral face moved towards its class prototype by a random intensity, plus
per-parameter jitter, so weak expressions of different classes overlap (a faint sadness looks neutral, fear and
surprise share raised brows and wide eyes, anger and disgust share lowered brows).

Everything else is nuisance that a model must learn to ignore: identity (face shape, feature spacing, skin tone,
hair), pose (in-plane rotation, translation, scale), illumination (a linear gradient plus global brightness and
contrast), sensor noise, and partial occlusion (a block, a hand, glasses or a mask band). The pose jitter is what
defeats a linear classifier on raw pixels: the same mouth shape lands on different pixels in every image, while a
small CNN's shared filters and pooling absorb the shift.

A simulated patient (`Patient`) is one person seen many times: a single identity, and optionally expressions that
are systematically shifted, each named expression drawn with another's prototype (a drooping mouth that makes the
resting face read as sad, a smile too faint to read as one). A model trained on everyone else misreads that patient
in a consistent way, which is what personal adaptation (`fer-client adapt`, client/inference/adapt.py) corrects.

Calibrated on this project's 2-core CPU (tests/test_synthetic.py asserts it, benchmarks/bench_synthetic.py measures
it): a small CNN trained for five epochs on 2,100 images reaches about 72 % test accuracy on 700 fresh ones, while a
tuned logistic regression on the standardised pixels stays near 26 % (chance is 14 %).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import cv2
import numpy as np

from client.data.labels import EMOTIONS, NUM_CLASSES

# Faces are drawn at this multiple of the output size and then area-reduced: features are only a few pixels wide
# at 48x48, and drawing them directly would snap every curve to the pixel grid.
_SUPERSAMPLE = 2
# Fixed-point fractional bits for OpenCV's drawing calls, so sub-pixel geometry is not rounded away.
_SHIFT = 4

# Expression parameters, in this order, with the neutral value each class prototype is measured against:
#   curve      mouth-corner lift: +1 a smile, -1 corners pulled down
#   open       mouth opening (0 closed, 1 wide open)
#   width      mouth width relative to the identity's own (below 1 pursed/round, above 1 stretched)
#   eye_open   eyelid opening relative to the identity's own (below 1 narrowed, above 1 widened)
#   brow_h     brow height (+1 raised, -1 lowered)
#   brow_tilt  inner-brow lift relative to the outer end (+1 inner raised as in sadness, -1 knitted as in anger)
#   lip_raise  one-sided upper-lip raise (the sneer of disgust)
_PARAMS = ("curve", "open", "width", "eye_open", "brow_h", "brow_tilt", "lip_raise")
_NEUTRAL = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
_PROTOTYPES: dict[str, tuple[float, ...]] = {
    #            curve  open  width eye_open brow_h brow_tilt lip_raise
    "angry":    (-0.30, 0.00, 0.80, 0.55, -0.90, -1.00, 0.00),
    "disgust":  (-0.45, 0.15, 0.90, 0.70, -0.55, -0.40, 1.00),
    "fear":     (-0.25, 0.50, 1.25, 1.45, 0.75, 0.70, 0.00),
    "happy":    (1.00, 0.30, 1.15, 0.80, 0.10, 0.00, 0.00),
    "sad":      (-0.90, 0.00, 0.95, 0.80, 0.15, 1.00, 0.00),
    "surprise": (0.00, 1.00, 0.75, 1.55, 1.00, 0.15, 0.00),
    "neutral":  tuple(_NEUTRAL),
}
_PROTOTYPE_MATRIX = np.array([_PROTOTYPES[name] for name in EMOTIONS])
# Per-parameter jitter added after blending, in the parameters' own units.
_JITTER = np.array([0.15, 0.08, 0.07, 0.10, 0.15, 0.16, 0.10])

_MOUTH_T = np.linspace(-1.0, 1.0, 15)
_MOUTH_BULGE = 1.0 - _MOUTH_T**2

# How often each nuisance occurs.
_OCCLUSION_RATE = 0.30
_GLASSES_RATE = 0.12


# Per-sample quantities that make a person look like themselves (face shape, feature spacing, colouring): a Patient
# fixes them to one draw. Pose, illumination, occlusion and the expression itself still vary between pictures.
_IDENTITY = ("face_rx", "face_ry", "eye_dx", "eye_y", "eye_w", "eye_h", "brow_gap", "brow_len", "brow_thick",
             "nose_len", "mouth_y", "mouth_w", "skin", "hair", "hair_top", "iris", "lip_side")


@dataclass(frozen=True)
class Patient:
    """One simulated person whose expressions a model trained on everyone else misreads systematically.

    Attributes:
        identity_seed: seeds the single identity every face of this patient has.
        looks_like: expression -> the expression whose prototype this patient's face shows when they have the
            first one (e.g. {"neutral": "sad", "sad": "neutral"}: a resting face that reads as sad). Labels stay
            the true expression. Unnamed expressions look as everyone's do. A mapping that sends two expressions
            to the same prototype makes them indistinguishable, which no adaptation can undo.
    """

    identity_seed: int
    looks_like: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (*self.looks_like, *self.looks_like.values()):
            if name not in EMOTIONS:
                raise ValueError(f"Patient.looks_like: {name!r} is not one of {', '.join(EMOTIONS)}")

    def shown(self, labels: np.ndarray) -> np.ndarray:
        """The expression each face is drawn with, for true `labels`."""
        table = np.array([EMOTIONS.index(self.looks_like.get(name, name)) for name in EMOTIONS], dtype=np.int64)
        return table[labels]


def make_synthetic(n: int, *, seed: int, image_size: int = 48,
                   patient: Patient | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draws `n` synthetic faces with balanced expression labels.

    Args:
        n: number of images.
        seed: everything random derives from this one seed, so the same seed gives byte-identical arrays on any
            machine (OpenCV's drawing and warping are deterministic) and a federation can rebuild a client's
            partition without shipping images.
        image_size: side of the square output; faces are drawn in a 48-pixel frame and scaled, so other sizes are
            the same faces at another resolution.
        patient: draw every face as this one simulated patient (one identity, shifted expressions) instead of a
            crowd of identities; None (the default) leaves the output byte-identical to the generator without it.

    Returns:
        images: uint8 array of shape (n, image_size, image_size), grayscale.
        labels: int64 array of shape (n,), in the project's label space (client.data.labels.EMOTIONS); class counts
            differ by at most one.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % NUM_CLASSES
    rng.shuffle(labels)
    params = _sample_params(n, labels if patient is None else patient.shown(labels), rng)
    if patient is not None:
        # One draw of the crowd's identity distribution, from the patient's own seed.
        identity = _sample_params(1, labels[:1], np.random.default_rng(patient.identity_seed))
        for key in _IDENTITY:
            params[key] = np.repeat(identity[key], n)
    canvas = image_size * _SUPERSAMPLE
    scale = canvas / 48.0
    images = np.empty((n, image_size, image_size), dtype=np.uint8)
    # Plain Python floats: the drawing code does scalar arithmetic, which is several times slower on numpy scalars.
    columns = {key: values.tolist() for key, values in params.items()}
    for i in range(n):
        face = _draw_face({key: values[i] for key, values in columns.items()}, canvas, scale)
        images[i] = cv2.resize(face, (image_size, image_size), interpolation=cv2.INTER_AREA)
    _apply_photometrics(images, params, rng)
    return images, labels


def _sample_params(n: int, labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draws every per-sample random quantity up front, vectorised, in a fixed order (fast and reproducible)."""
    u = rng.uniform
    # Intensity below ~0.4 makes an expression barely distinguishable from neutral: that is the intended overlap.
    intensity = u(0.4, 1.0, n)
    expression = _NEUTRAL + intensity[:, None] * (_PROTOTYPE_MATRIX[labels] - _NEUTRAL)
    expression += rng.normal(0.0, 1.0, (n, len(_PARAMS))) * _JITTER
    params = {name: expression[:, k] for k, name in enumerate(_PARAMS)}
    params["open"] = np.clip(params["open"], 0.0, None)
    params["lip_raise"] = np.clip(params["lip_raise"], 0.0, None)
    # Happiness is shown with the mouth closed or open (a grin); the opening draw above is its average.
    happy = labels == EMOTIONS.index("happy")
    params["open"][happy] *= u(0.0, 2.2, int(happy.sum()))
    params.update(
        lip_side=rng.choice([-1.0, 1.0], n),
        # Identity, in the 48-pixel frame.
        face_rx=u(13.5, 17.5, n), face_ry=u(17.0, 21.5, n),
        eye_dx=u(0.36, 0.47, n), eye_y=u(0.16, 0.30, n), eye_w=u(2.5, 3.5, n), eye_h=u(1.3, 2.0, n),
        brow_gap=u(3.2, 4.6, n), brow_len=u(4.0, 6.0, n), brow_thick=u(0.9, 1.6, n),
        nose_len=u(0.12, 0.24, n), mouth_y=u(0.44, 0.58, n), mouth_w=u(0.34, 0.48, n),
        skin=u(105.0, 215.0, n), background=u(20.0, 235.0, n), hair=u(15.0, 200.0, n),
        hair_top=u(0.15, 0.45, n), iris=u(10.0, 70.0, n),
        # Pose: degrees, 48-frame pixels, multiplicative.
        angle=u(-12.0, 12.0, n), shift_x=u(-3.0, 3.0, n), shift_y=u(-3.0, 3.0, n), zoom=u(0.88, 1.1, n),
        # Occlusion: 0 none, 1 block, 2 hand, 3 mask band; glasses independently.
        occlusion=np.where(u(0, 1, n) < _OCCLUSION_RATE, rng.integers(1, 4, n), 0),
        occ_x=u(0.0, 1.0, n), occ_y=u(0.0, 1.0, n), occ_size=u(0.0, 1.0, n), occ_tone=u(0.0, 255.0, n),
        glasses=u(0, 1, n) < _GLASSES_RATE,
        # Illumination and noise, applied after drawing.
        grad_angle=u(0.0, 2 * math.pi, n), grad_strength=u(0.0, 0.45, n),
        contrast=u(0.6, 1.25, n), brightness=u(-35.0, 35.0, n), noise=u(2.0, 10.0, n),
    )
    return params


def _pt(x: float, y: float, scale: float) -> tuple[int, int]:
    """A 48-frame point as the fixed-point canvas coordinate OpenCV's `shift` argument expects."""
    return int(round(x * scale * (1 << _SHIFT))), int(round(y * scale * (1 << _SHIFT)))


def _len(v: float, scale: float) -> int:
    return max(1, int(round(v * scale * (1 << _SHIFT))))


def _thick(v: float, scale: float) -> int:
    return max(1, int(round(v * scale)))


def _draw_face(p: dict, canvas: int, scale: float) -> np.ndarray:
    """Draws one face in the canonical pose, then applies its in-plane pose."""
    aa = cv2.LINE_AA
    img = np.full((canvas, canvas), p["background"], dtype=np.uint8)
    cx, cy = 24.0, 25.0
    rx, ry = p["face_rx"], p["face_ry"]
    skin = float(p["skin"])

    # Hair sits behind the face and shows above the forehead; its extent varies between identities.
    cv2.ellipse(img, _pt(cx, cy - ry * p["hair_top"], scale), (_len(rx * 1.12, scale), _len(ry * 0.95, scale)),
                0, 180, 360, float(p["hair"]), -1, aa, _SHIFT)
    cv2.ellipse(img, _pt(cx, cy, scale), (_len(rx, scale), _len(ry, scale)), 0, 0, 360, skin, -1, aa, _SHIFT)

    dark = skin * 0.35
    eye_y = cy - ry * p["eye_y"]
    eye_dx = rx * p["eye_dx"]
    eye_w = p["eye_w"]
    eye_h = max(0.35, p["eye_h"] * p["eye_open"])
    brow_y = eye_y - p["brow_gap"] - 1.8 * p["brow_h"]
    for side in (-1.0, 1.0):
        ex = cx + side * eye_dx
        cv2.ellipse(img, _pt(ex, eye_y, scale), (_len(eye_w, scale), _len(eye_h, scale)), 0, 0, 360,
                    min(255.0, skin + 45.0), -1, aa, _SHIFT)
        iris_r = min(eye_h, eye_w * 0.55)
        cv2.circle(img, _pt(ex, eye_y, scale), _len(iris_r, scale), float(p["iris"]), -1, aa, _SHIFT)
        # Upper lid line: narrowed eyes read mostly through it.
        cv2.ellipse(img, _pt(ex, eye_y, scale), (_len(eye_w, scale), _len(eye_h, scale)), 0, 180, 360, dark,
                    _thick(0.7, scale), aa, _SHIFT)
        inner = ex - side * p["brow_len"] * 0.35
        outer = ex + side * p["brow_len"] * 0.65
        tilt = 1.6 * p["brow_tilt"]
        cv2.line(img, _pt(inner, brow_y - tilt, scale), _pt(outer, brow_y + 0.5 * tilt, scale), dark,
                 _thick(p["brow_thick"], scale), aa, _SHIFT)

    nose_tip = cy + ry * p["nose_len"]
    cv2.line(img, _pt(cx, eye_y + 1.0, scale), _pt(cx - 0.6, nose_tip, scale), skin * 0.75, _thick(0.6, scale),
             aa, _SHIFT)
    cv2.line(img, _pt(cx - 2.0, nose_tip + 0.6, scale), _pt(cx + 1.8, nose_tip + 0.6, scale), skin * 0.6,
             _thick(0.7, scale), aa, _SHIFT)

    _draw_mouth(img, p, cx, cy + ry * p["mouth_y"], rx * p["mouth_w"] * p["width"], skin, scale)

    if p["glasses"]:
        for side in (-1.0, 1.0):
            cv2.circle(img, _pt(cx + side * eye_dx, eye_y, scale), _len(eye_w * 1.35, scale), 25.0,
                       _thick(0.8, scale), aa, _SHIFT)
        cv2.line(img, _pt(cx - eye_dx + eye_w * 1.35, eye_y, scale), _pt(cx + eye_dx - eye_w * 1.35, eye_y, scale),
                 25.0, _thick(0.8, scale), aa, _SHIFT)
    if p["occlusion"] == 3:
        # A surgical mask hides the mouth and part of the nose, leaving only eyes and brows to read.
        top = nose_tip - 1.0 - 3.0 * p["occ_y"]
        cv2.rectangle(img, _pt(cx - rx * 1.05, top, scale), _pt(cx + rx * 1.05, cy + ry * 0.95, scale),
                      150.0 + 100.0 * p["occ_tone"] / 255.0, -1, aa, _SHIFT)

    rotation = cv2.getRotationMatrix2D((cx * scale, cy * scale), float(p["angle"]), float(p["zoom"]))
    rotation[:, 2] += (p["shift_x"] * scale, p["shift_y"] * scale)
    img = cv2.warpAffine(img, rotation, (canvas, canvas), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    if p["occlusion"] == 1:
        w = 8.0 + 10.0 * p["occ_size"]
        x0, y0 = p["occ_x"] * (48.0 - w), p["occ_y"] * (48.0 - w)
        cv2.rectangle(img, _pt(x0, y0, scale), _pt(x0 + w, y0 + w * 0.8, scale), float(p["occ_tone"]), -1, aa,
                      _SHIFT)
    elif p["occlusion"] == 2:
        _draw_hand(img, p, skin, scale)
    return img


def _draw_mouth(img: np.ndarray, p: dict, mx: float, my: float, half_width: float, skin: float, scale: float) -> None:
    """Draws the lips as two parabola-like curves; their gap is the opening, filled dark."""
    t, bulge = _MOUTH_T, _MOUTH_BULGE
    base = my - 3.0 * p["curve"] * t * t
    # The sneer lifts the upper lip on one side only, centred about a third of the way to that corner.
    sneer = 2.2 * p["lip_raise"] * np.exp(-((t - 0.35 * p["lip_side"]) ** 2) / 0.12)
    opening = 5.0 * p["open"]
    upper = base - 0.35 * opening * bulge - sneer
    lower = base + 0.65 * opening * bulge
    k = len(t)
    # Upper lip left to right, then lower lip right to left: one closed outline of the opening.
    outline = np.empty((2 * k, 2))
    outline[:k, 0] = mx + half_width * t
    outline[:k, 1] = upper
    outline[k:] = outline[k - 1::-1]
    outline[k:, 1] = lower[::-1]
    pts = np.rint(outline * (scale * (1 << _SHIFT))).astype(np.int32)
    if p["open"] > 0.06 or p["lip_raise"] > 0.15:
        cv2.fillPoly(img, [pts], skin * 0.2, cv2.LINE_AA, _SHIFT)
    cv2.polylines(img, [pts[:k], pts[k:]], False, skin * 0.55, _thick(0.8, scale), cv2.LINE_AA, _SHIFT)


def _draw_hand(img: np.ndarray, p: dict, skin: float, scale: float) -> None:
    """A palm with four fingers raised from the lower edge, covering a cheek or the mouth."""
    aa = cv2.LINE_AA
    px = 8.0 + 32.0 * p["occ_x"]
    py = 40.0 + 6.0 * p["occ_y"]
    size = 7.0 + 4.0 * p["occ_size"]
    tone = float(np.clip(skin * 0.9 + 20.0, 0.0, 255.0))
    cv2.ellipse(img, _pt(px, py, scale), (_len(size, scale), _len(size * 0.8, scale)), 0, 0, 360, tone, -1, aa,
                _SHIFT)
    lean = (p["occ_size"] - 0.5) * 0.6
    for k in range(4):
        fx = px + (k - 1.5) * size * 0.45
        top = py - size * (1.6 + 0.2 * (k in (1, 2)))
        cv2.line(img, _pt(fx, py - size * 0.4, scale), _pt(fx + lean * size, top, scale), tone,
                 _thick(size * 0.38, scale), aa, _SHIFT)


def _apply_photometrics(images: np.ndarray, p: dict, rng: np.random.Generator) -> None:
    """Applies illumination gradient, brightness/contrast and Gaussian noise to the whole batch in place."""
    n, h, w = images.shape
    if n == 0:
        return
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    xs = (xs - (w - 1) / 2) / w
    ys = (ys - (h - 1) / 2) / h
    direction_x = np.cos(p["grad_angle"]).astype(np.float32)[:, None, None]
    direction_y = np.sin(p["grad_angle"]).astype(np.float32)[:, None, None]
    gain = 1.0 + 2.0 * p["grad_strength"].astype(np.float32)[:, None, None] * (direction_x * xs + direction_y * ys)
    out = images.astype(np.float32) * gain
    mean = out.mean(axis=(1, 2), keepdims=True)
    out = (out - mean) * p["contrast"].astype(np.float32)[:, None, None] + mean
    out += p["brightness"].astype(np.float32)[:, None, None]
    out += rng.standard_normal((n, h, w), dtype=np.float32) * p["noise"].astype(np.float32)[:, None, None]
    np.clip(np.rint(out), 0, 255, out=out)
    images[...] = out.astype(np.uint8)
