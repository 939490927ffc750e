"""Tests for face detection and alignment, standardisation, augmentation and the torch dataset."""

from __future__ import annotations

import functools
import math

import click
import cv2
import numpy as np
import pytest
import torch
from skimage import data as skimage_data

from client.data.preprocess import Augment, FacePreprocessor, FERTorchDataset, standardize

# Pupil centres in skimage's astronaut photograph, picked by hand on an 8x enlargement (image's left eye first).
ASTRONAUT_EYES = np.array([[203.5, 101.0], [246.3, 103.8]])
ASTRONAUT_EYE_ANGLE = math.degrees(math.atan2(103.8 - 101.0, 246.3 - 203.5))  # her head is tilted about 3.7 deg
# A point between the eyes and the mouth, used as the centre for the rotated copies.
ASTRONAUT_FACE_CENTRE = (225.0, 115.0)


@functools.cache
def _astronaut_bgr() -> np.ndarray:
    """The astronaut photograph (512x512) as an OpenCV BGR image."""
    return cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR)


def _rotated_astronaut(degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """The astronaut rotated counter-clockwise (as displayed) about her face, and the 2x3 matrix that did it."""
    matrix = cv2.getRotationMatrix2D(ASTRONAUT_FACE_CENTRE, degrees, 1.0)
    rotated = cv2.warpAffine(_astronaut_bgr(), matrix, (512, 512), borderMode=cv2.BORDER_REFLECT_101)
    return rotated, matrix


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Maps (k, 2) points through a 2x3 affine matrix."""
    return np.c_[points, np.ones(len(points))] @ matrix.T


def _textured_face(size: int = 48) -> np.ndarray:
    """A deterministic uint8 test image with structure in every direction (so flips and rotations show)."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (size, size), dtype=np.uint8), (5, 5), 0)
    cv2.circle(image, (size // 3, size // 3), size // 8, 250, -1)
    cv2.rectangle(image, (size // 2, size * 2 // 3), (size - 4, size - 6), 20, -1)
    return image


def _bar_image(size: int = 64) -> np.ndarray:
    """A thick horizontal white bar through the centre of a black square."""
    image = np.zeros((size, size), dtype=np.uint8)
    image[size // 2 - 3:size // 2 + 3, 8:size - 8] = 255
    return image


def _bar_angle(image: np.ndarray) -> float:
    """Orientation of the bright bar in degrees from its second-order image moments (y down, as OpenCV draws)."""
    m = cv2.moments((image > 127).astype(np.uint8), binaryImage=True)
    return math.degrees(0.5 * math.atan2(2 * m["mu11"], m["mu20"] - m["mu02"]))


# ---------------------------------------------------------------------------------------------------- face pipeline


def test_astronaut_face_is_found_where_the_face_is():
    """The Haar detector finds one face box around the astronaut's face: both pupils inside, plausible size."""
    preprocessor = FacePreprocessor(size=48)

    result = preprocessor.process_detailed(_astronaut_bgr())

    assert result is not None
    x, y, w, h = result.box
    for eye_x, eye_y in ASTRONAUT_EYES:
        assert x < eye_x < x + w and y < eye_y < y + h / 2
    assert 70 <= w <= 130 and 70 <= h <= 130
    assert abs(x + w / 2 - ASTRONAUT_FACE_CENTRE[0]) < 15 and abs(y + h / 2 - ASTRONAUT_FACE_CENTRE[1]) < 15


def test_astronaut_eyes_are_found_at_the_pupils():
    """The detected eye centres lie within 4 px of the hand-labelled pupils."""
    preprocessor = FacePreprocessor(size=48)

    result = preprocessor.process_detailed(_astronaut_bgr())

    assert result.eyes is not None
    np.testing.assert_allclose(np.array(result.eyes), ASTRONAUT_EYES, atol=4.0)


@pytest.mark.parametrize("degrees", [-15.0, -8.0, 0.0, 8.0, 15.0])
def test_alignment_levels_the_eye_line_of_a_rotated_photo(degrees):
    """After rotating the photo by a known angle, alignment undoes it: true pupils end up level in the crop."""
    image, rotation = _rotated_astronaut(degrees)
    true_eyes = _apply(rotation, ASTRONAUT_EYES)
    preprocessor = FacePreprocessor(size=96)

    result = preprocessor.process_detailed(image)

    # A counter-clockwise turn of the photo lowers the eye line's angle (y down) by the same amount.
    assert result.angle == pytest.approx(ASTRONAUT_EYE_ANGLE - degrees, abs=2.5)
    aligned_eyes = _apply(result.transform, true_eyes)
    left, right = aligned_eyes
    assert abs(right[1] - left[1]) < 1.5
    # Eyes land left and right of centre, in the upper half, at a face-like spacing.
    assert left[0] < 48 < right[0] and 20 < left[1] < 48
    assert 0.25 * 96 < right[0] - left[0] < 0.55 * 96


def test_transform_reproduces_the_crop():
    """Warping the photo with the reported transform gives the returned face (up to resampling)."""
    preprocessor = FacePreprocessor(size=96)
    gray = cv2.cvtColor(_astronaut_bgr(), cv2.COLOR_BGR2GRAY)

    result = preprocessor.process_detailed(gray)
    rewarped = cv2.warpAffine(gray, result.transform, (96, 96), flags=cv2.INTER_AREA,
                              borderMode=cv2.BORDER_REPLICATE)

    difference = np.abs(rewarped.astype(int) - result.face.astype(int))
    assert difference.mean() < 6.0


@pytest.mark.parametrize("size", [48, 64])
def test_process_returns_uint8_face_of_requested_size_from_gray_or_bgr(size):
    """Gray and BGR versions of the same photo give the same (size, size) uint8 face."""
    preprocessor = FacePreprocessor(size=size)
    gray = cv2.cvtColor(_astronaut_bgr(), cv2.COLOR_BGR2GRAY)

    from_bgr = preprocessor.process(_astronaut_bgr())
    from_gray = preprocessor.process(gray)

    assert from_bgr.shape == (size, size) and from_bgr.dtype == np.uint8
    np.testing.assert_array_equal(from_bgr, from_gray)
    # A face, not a blank patch: real contrast inside the crop.
    assert from_bgr.std() > 20


def test_largest_face_is_picked():
    """With a small and a large copy of the face in one picture, the large one is returned."""
    face = _astronaut_bgr()[40:200, 140:310]
    canvas = np.full((400, 700, 3), 200, dtype=np.uint8)
    canvas[20:180, 20:190] = face
    large = cv2.resize(face, None, fx=1.8, fy=1.8)
    canvas[60:60 + large.shape[0], 300:300 + large.shape[1]] = large

    result = FacePreprocessor(size=48).process_detailed(canvas)

    x, y, w, h = result.box
    assert x > 300 and w > 150
    assert result.eyes is not None


def test_without_eyes_the_box_is_cropped_unrotated():
    """When a band hides the eyes, the face is still cropped, with no rotation and the box centred."""
    image = _astronaut_bgr().copy()
    cv2.rectangle(image, (190, 97), (262, 107), (128, 128, 128), -1)
    preprocessor = FacePreprocessor(size=48, margin=0.1)

    result = preprocessor.process_detailed(image)

    assert result is not None and result.eyes is None and result.angle == 0.0
    x, y, w, h = result.box
    np.testing.assert_allclose(_apply(result.transform, np.array([[x + w / 2, y + h / 2]]))[0], (24.0, 24.0),
                               atol=0.5)
    # No rotation: the matrix is a pure scale (by 48 / (1.2 w)) and shift.
    scale = 48 / round(w * 1.2)
    np.testing.assert_allclose(result.transform[:, :2], [[scale, 0.0], [0.0, scale]], atol=1e-9)


@pytest.mark.parametrize("make_image", [
    lambda: np.zeros((200, 200), dtype=np.uint8),
    lambda: np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8),
    lambda: np.full((120, 160, 3), 90, dtype=np.uint8),
], ids=["black", "noise", "flat-bgr"])
def test_no_face_gives_none(make_image):
    """Images without a face return None from both process and process_detailed."""
    preprocessor = FacePreprocessor(size=48)
    image = make_image()

    assert preprocessor.process(image) is None
    assert preprocessor.process_detailed(image) is None


def test_missing_yunet_model_is_a_clear_error_naming_the_path(tmp_path):
    """Asking for YuNet with a model file that does not exist raises a one-line error with the path in it."""
    missing = tmp_path / "face_detection_yunet_2023mar.onnx"

    with pytest.raises(click.ClickException, match="face_detection_yunet_2023mar.onnx") as raised:
        FacePreprocessor(detector="yunet", yunet_model=str(missing))

    assert str(missing) in raised.value.format_message()
    assert "\n" not in raised.value.format_message()


@pytest.mark.parametrize("kwargs,match", [
    ({"detector": "mtcnn"}, "unknown face detector"),
    ({"detector": "yunet"}, "needs a model file"),
])
def test_bad_detector_options_are_rejected(kwargs, match):
    """An unknown detector or YuNet without a model raises a ClickException saying so."""
    with pytest.raises(click.ClickException, match=match):
        FacePreprocessor(**kwargs)


@pytest.mark.parametrize("image", [
    np.zeros((10, 10), dtype=np.float32),
    np.zeros((10, 10, 2), dtype=np.uint8),
], ids=["float", "two-channel"])
def test_unsupported_images_are_rejected(image):
    """Non-uint8 or oddly shaped inputs raise ValueError instead of being silently misread."""
    with pytest.raises(ValueError):
        FacePreprocessor().process(image)


# ------------------------------------------------------------------------------------------------------ standardize


def test_standardize_golden_values():
    """A 2x2 ramp standardises to the hand-computed values."""
    images = np.array([[[0, 51], [102, 153]]], dtype=np.uint8)

    result = standardize(images)

    # Scaled: 0, .2, .4, .6; mean .3; population std sqrt(.05).
    expected = np.array([[[[-1.3416408, -0.4472136], [0.4472136, 1.3416408]]]], dtype=np.float32)
    assert result.shape == (1, 1, 2, 2) and result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-6)


def test_standardize_blank_and_nearly_blank_images():
    """A blank image becomes zeros; a one-grey-level blip is divided by the floor, not by its tiny std."""
    images = np.array([[[7, 7], [7, 7]], [[100, 101], [100, 100]]], dtype=np.uint8)

    result = standardize(images)

    np.testing.assert_array_equal(result[0], np.zeros((1, 2, 2), dtype=np.float32))
    np.testing.assert_allclose(result[1, 0], [[-0.25, 0.75], [-0.25, -0.25]], atol=1e-5)


def test_standardize_matches_an_independent_per_image_computation():
    """Each image is standardised with its own mean and std (checked in float64 against numpy)."""
    images = np.random.default_rng(1).integers(0, 256, (5, 12, 9), dtype=np.uint8)

    result = standardize(images)

    scaled = images.astype(np.float64) / 255.0
    expected = (scaled - scaled.mean(axis=(1, 2), keepdims=True)) / scaled.std(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(result[:, 0], expected, atol=1e-5)


def test_standardize_removes_brightness_and_contrast_differences():
    """The same face under different (unclipped) brightness and contrast standardises to the same input."""
    face = _textured_face().astype(np.float64)
    dim = np.rint(face * 0.6 + 10).astype(np.uint8)
    bright = np.rint(face * 0.9 + 20).astype(np.uint8)

    result = standardize(np.stack([dim, bright]))

    # Only rounding to whole grey levels (half a level each, in the dimmer image's std units) separates them.
    rounding = 1.0 / (0.6 * face.std())
    assert rounding < 0.05
    np.testing.assert_allclose(result[0], result[1], atol=rounding)


def test_standardize_rejects_non_uint8_batches():
    """Float input or a missing batch axis raises ValueError."""
    with pytest.raises(ValueError):
        standardize(np.zeros((2, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        standardize(np.zeros((4, 4), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------- Augment


def test_augment_is_reproducible_per_seed():
    """Same generator seed, same output; another seed, another output."""
    augment = Augment()
    face = _textured_face()

    first = augment(face, np.random.default_rng(42))
    again = augment(face, np.random.default_rng(42))
    other = augment(face, np.random.default_rng(43))

    assert first.dtype == np.uint8 and first.shape == face.shape
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_flip_really_mirrors_about_half_the_time():
    """With everything else off, each output is the input or its exact mirror image, in roughly equal shares."""
    augment = Augment(rotation=0.0, flip=True, scale=(1.0, 1.0), brightness=0.0, contrast=0.0, shift=0.0)
    face = _textured_face()

    outputs = [augment(face, np.random.default_rng(seed)) for seed in range(60)]

    flipped = [np.array_equal(out, face[:, ::-1]) for out in outputs]
    unchanged = [np.array_equal(out, face) for out in outputs]
    assert all(f != u for f, u in zip(flipped, unchanged, strict=True))
    assert 18 <= sum(flipped) <= 42


def test_everything_off_is_the_identity_and_does_not_alias():
    """With every option off the output equals the input but is a separate array."""
    augment = Augment(rotation=0.0, flip=False, scale=(1.0, 1.0), brightness=0.0, contrast=0.0, shift=0.0)
    face = _textured_face()

    out = augment(face, np.random.default_rng(0))

    np.testing.assert_array_equal(out, face)
    assert out is not face


def test_rotation_stays_within_its_range():
    """A horizontal bar comes out tilted by at most the configured angle, and by a visible amount for some seeds."""
    augment = Augment(rotation=10.0, flip=False, scale=(1.0, 1.0), brightness=0.0, contrast=0.0, shift=0.0)
    bar = _bar_image()

    angles = [_bar_angle(augment(bar, np.random.default_rng(seed))) for seed in range(30)]

    assert _bar_angle(bar) == pytest.approx(0.0, abs=1e-6)
    assert max(abs(a) for a in angles) <= 10.5
    assert max(abs(a) for a in angles) > 6.0
    assert min(angles) < 0 < max(angles)


def test_scale_changes_the_bar_length_within_range():
    """Zooming by s in [0.9, 1.1] scales the bar's length by the same factor."""
    augment = Augment(rotation=0.0, flip=False, scale=(0.9, 1.1), brightness=0.0, contrast=0.0, shift=0.0)
    bar = _bar_image()
    length = (bar > 127).any(axis=0).sum()

    ratios = [(augment(bar, np.random.default_rng(seed)) > 127).any(axis=0).sum() / length for seed in range(20)]

    assert 0.88 <= min(ratios) < 0.97 and 1.03 < max(ratios) <= 1.12


def test_brightness_shifts_every_pixel_by_the_same_bounded_amount():
    """Brightness alone adds one constant per image, at most 20 % of full scale."""
    augment = Augment(rotation=0.0, flip=False, scale=(1.0, 1.0), brightness=0.2, contrast=0.0, shift=0.0)
    face = np.clip(_textured_face(), 60, 190)  # stays clear of clipping after a +/-51 shift

    shifts = []
    for seed in range(10):
        difference = augment(face, np.random.default_rng(seed)).astype(int) - face.astype(int)
        assert difference.max() - difference.min() <= 1
        shifts.append(float(np.median(difference)))

    assert max(abs(s) for s in shifts) <= 51
    assert len(set(shifts)) > 3


# ------------------------------------------------------------------------------------------------- FERTorchDataset


def _faces_and_labels(n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """n distinct textured 48x48 faces and labels cycling through the seven classes."""
    faces = np.stack([np.roll(_textured_face(), 5 * k, axis=1) for k in range(n)])
    return faces, np.arange(n, dtype=np.int64) % 7


def test_eval_dataset_returns_standardized_unaugmented_items():
    """Without augmentation each item is exactly standardize(image) and its label, every time it is read."""
    faces, labels = _faces_and_labels()
    dataset = FERTorchDataset(faces, labels)
    expected = standardize(faces)

    for index in range(len(faces)):
        tensor, label = dataset[index]
        again, _ = dataset[index]
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (1, 48, 48)
        assert label.dtype == torch.int64 and int(label) == labels[index]
        np.testing.assert_array_equal(tensor.numpy(), expected[index])
        assert torch.equal(tensor, again)


def test_training_dataset_is_reproducible_and_fresh_each_epoch():
    """Same seed, same augmented items in any visiting order; a second read of an item is augmented anew."""
    faces, labels = _faces_and_labels()
    forward = FERTorchDataset(faces, labels, augment=Augment(), seed=5)
    backward = FERTorchDataset(faces, labels, augment=Augment(), seed=5)
    other_seed = FERTorchDataset(faces, labels, augment=Augment(), seed=6)

    first_epoch = [forward[i][0] for i in range(len(faces))]
    reversed_epoch = [backward[i][0] for i in reversed(range(len(faces)))][::-1]
    second_epoch = [forward[i][0] for i in range(len(faces))]
    other = [other_seed[i][0] for i in range(len(faces))]

    assert all(torch.equal(a, b) for a, b in zip(first_epoch, reversed_epoch, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first_epoch, second_epoch, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first_epoch, other, strict=True))


def test_dataset_batches_through_a_dataloader():
    """A DataLoader stacks items into (B, 1, 48, 48) float32 batches with int64 labels."""
    faces, labels = _faces_and_labels()
    loader = torch.utils.data.DataLoader(FERTorchDataset(faces, labels, augment=Augment()), batch_size=4)

    images, targets = next(iter(loader))

    assert tuple(images.shape) == (4, 1, 48, 48) and images.dtype == torch.float32
    assert targets.tolist() == labels[:4].tolist()


@pytest.mark.parametrize("labels", [np.array([0, 7]), np.array([-1, 0]), np.array([0.0, 1.0]), np.array([0])],
                         ids=["too-high", "negative", "float", "wrong-length"])
def test_dataset_rejects_bad_labels(labels):
    """Labels outside 0..6, non-integer labels or a length mismatch raise ValueError."""
    faces = np.zeros((2, 48, 48), dtype=np.uint8)

    with pytest.raises(ValueError):
        FERTorchDataset(faces, labels)
