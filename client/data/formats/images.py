"""Image files of a dataset: listing folders, then decoding the files in threads into fitted grayscale faces.

cv2 releases the GIL while decoding, so threads decode in parallel. Unreadable files and photos without a face are
skipped and counted; each decoded image's digest and blank kind are kept for the audit (`audit.py`).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from client.data.formats.audit import _blank_kind, _digest, _LoadProblems, _SplitContent
from client.data.formats.dataset import SPLIT_ORDER, DatasetError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp"})


@dataclass(frozen=True)
class _Item:
    split: str
    label: int
    relpath: str  # POSIX path relative to the dataset root


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crops to a square (so faces keep their proportions) and resizes to `size`."""
    h, w = image.shape
    if (h, w) == (size, size):
        return image
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top:top + side, left:left + side]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interpolation)


def _worker_count() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    # Twice the cores: part of each task is waiting on file reads, not decoding.
    return max(1, min(16, 2 * cores))


def _face_preprocessor_factory(image_size: int) -> Callable[[], Callable[[np.ndarray], np.ndarray | None]]:
    from client.data.preprocess import FacePreprocessor  # only the face-detecting kinds need OpenCV's detector

    return lambda: FacePreprocessor(size=image_size).process


def _decode_items(root: Path, items: list[_Item], *, image_size: int, detect_faces: bool,
                  loaded: _LoadProblems, native_sizes: Counter[str]) -> dict[str, _SplitContent]:
    """Decodes every listed file; unreadable files and photos without a face are skipped and counted."""
    n = len(items)
    images = np.empty((n, image_size, image_size), dtype=np.uint8)
    status: list[str | None] = ["pending"] * n
    digests: list[bytes] = [b""] * n
    blank: list[str | None] = [None] * n
    sizes: list[str] = [""] * n
    make_face_finder = _face_preprocessor_factory(image_size) if detect_faces else None
    per_thread = threading.local()  # one face detector per thread: OpenCV's detectors are not shared safely

    def decode_range(lo: int, hi: int) -> None:
        find_face = None
        if make_face_finder is not None:
            find_face = getattr(per_thread, "find_face", None)
            if find_face is None:
                find_face = per_thread.find_face = make_face_finder()
        for i in range(lo, hi):
            try:
                with open(os.path.join(root, items[i].relpath), "rb") as handle:
                    buffer = np.frombuffer(handle.read(), dtype=np.uint8)
            except OSError:
                status[i] = "unreadable"
                continue
            image = cv2.imdecode(buffer, cv2.IMREAD_GRAYSCALE) if buffer.size else None
            if image is None:
                status[i] = "unreadable"
                continue
            sizes[i] = f"{image.shape[1]}x{image.shape[0]}"
            digests[i] = _digest(image)
            blank[i] = _blank_kind(image)
            if find_face is None:
                images[i] = _fit(image, image_size)
            else:
                face = find_face(image)
                if face is None:
                    status[i] = "no_face"
                    continue
                images[i] = _fit(face, image_size)
            status[i] = None

    chunk = 256
    with ThreadPoolExecutor(max_workers=_worker_count()) as pool:
        # list() re-raises a worker's exception here instead of losing it.
        list(pool.map(lambda lo: decode_range(lo, min(lo + chunk, n)), range(0, n, chunk)))

    contents: dict[str, _SplitContent] = {}
    for name in SPLIT_ORDER:
        indices = [i for i in range(n) if items[i].split == name]
        if not indices:
            continue
        kept = []
        for i in indices:
            if status[i] == "unreadable":
                loaded.unreadable.add(items[i].relpath)
                continue
            native_sizes[sizes[i]] += 1  # a size found in the data, whether or not a face was found in it
            if status[i] is None:
                kept.append(i)
            else:
                loaded.no_face.add(items[i].relpath)
        # Items of a split are contiguous; a view avoids copying the images when nothing was skipped.
        split_images = (images[indices[0]:indices[-1] + 1] if len(kept) == indices[-1] - indices[0] + 1
                        else images[kept])
        contents[name] = _SplitContent(
            images=split_images,
            labels=np.array([items[i].label for i in kept], dtype=np.int64),
            sources=[items[i].relpath for i in kept],
            digests=[digests[i] for i in kept],
            blank=[blank[i] for i in kept],
        )
    return contents


def _subdirs(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted((e for e in entries if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as err:
        raise DatasetError(f"{folder}: cannot list folder ({err.strerror})") from err


def _files_under(root: Path, folder: str) -> list[str]:
    """All files below `root/folder`, recursively (a hospital may sort an emotion's photos by patient), as sorted
    POSIX paths relative to `root`. Plain strings: pathlib costs seconds on a 30,000-file dataset."""
    found: list[str] = []
    base = os.path.join(root, folder)
    for dirpath, dirnames, filenames in os.walk(base):
        # Hidden entries are OS metadata (.DS_Store, AppleDouble "._x.jpg"), never data.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        found.extend(f"{rel}/{f}" for f in filenames if not f.startswith("."))
    found.sort()
    return found
