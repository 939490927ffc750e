"""Reading the files `fer-client predict` is given, so that one bad file is one named error and the rest go on.

OpenCV can be forgiving in ways that hide damage: builds whose libjpeg only warns return a half-grey picture for a
JPEG cut short (the 4.14 wheel pinned here refuses it, others may not), and `cv2.VideoCapture` simply stops early on
a truncated video. Both are checked here: a JPEG must end with its end-of-image marker, and a video that ends
before the frame count in its own header is reported as truncated (after its readable frames were used).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"


class MediaError(Exception):
    """A file that cannot be used; str() is one line that names the file and what is wrong."""


@dataclass(frozen=True)
class Frame:
    """One decoded picture: an image file (index 0, time None) or a video frame (its index and time in seconds)."""

    image: np.ndarray
    index: int
    time: float | None


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Files named directly, plus the images and videos inside named folders (recursively, sorted).

    Raises:
        MediaError: a named path does not exist, or a named folder holds no image or video (checked up front, so
            a typo is not found after an hour of video).
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
            if not found:
                raise MediaError(f"{path}: no image or video files in this folder")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise MediaError(f"{path}: no such file or folder")
    return files


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def read_image(path: Path) -> np.ndarray:
    """The image as BGR uint8.

    Raises:
        MediaError: unreadable, not an image OpenCV can decode, or a JPEG without its end marker (truncated).
    """
    try:
        payload = path.read_bytes()
    except OSError as err:
        raise MediaError(f"{path}: cannot read ({err.strerror or err})") from None
    image = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), cv2.IMREAD_COLOR) if payload else None
    if image is None:
        raise MediaError(f"{path}: not a readable image")
    if payload.startswith(_JPEG_SOI) and _JPEG_EOI not in payload[-64:]:
        # libjpeg fills what is missing with grey and only warns; a face found in half a picture is not a result.
        raise MediaError(f"{path}: truncated or corrupt JPEG (no end-of-image marker)")
    return image


def iter_video(path: Path) -> Iterator[Frame]:
    """Yields a video's frames with their index and time; raises at the end if the video was cut short.

    Raises:
        MediaError: the file cannot be opened as a video, has no frames, or ends before the frame count its header
            declares (truncated). The frames before the damage have been yielded by then.
    """
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise MediaError(f"{path}: not a readable video")
        fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
        declared = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        index = 0
        while True:
            ok, image = capture.read()
            if not ok or image is None:
                break
            time = index / fps if fps > 0 else capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            yield Frame(image=image, index=index, time=round(float(time), 4))
            index += 1
        if index == 0:
            raise MediaError(f"{path}: not a readable video (no frame could be decoded)")
        if declared > 0 and index < declared:
            raise MediaError(f"{path}: truncated video (decoded {index} of the {declared} frames its header declares)")
    finally:
        capture.release()


def video_fps(path: Path) -> float:
    """The frame rate a video declares (25 when it declares none), for writing an annotated copy."""
    capture = cv2.VideoCapture(str(path))
    try:
        fps = capture.get(cv2.CAP_PROP_FPS)
    finally:
        capture.release()
    return float(fps) if fps and fps > 0 else 25.0
