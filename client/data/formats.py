"""Loads the facial-expression datasets people actually have into one in-memory form.

Researchers bring FER2013 (as the original CSV or as the image folders most copies circulate as) and RAF-DB;
hospitals bring folders of photographs sorted by emotion; a newcomer brings nothing and gets a synthetic set. All
of them end up as a `FERDataset`: per split, `(N, S, S)` uint8 grayscale faces, int64 labels in the shared label
space of `client.data.labels`, and one source string per sample so that every problem can be traced to a file.

A user's data problem is raised as `DatasetError`, whose message is one line naming the file (and row or line), so
that the CLI can print it without a traceback. Problems that are normal in large real datasets (a few unreadable
files, blank images, duplicates, photos without a detectable face) are not fatal: they are skipped or kept as the
case may be, counted, and reported in `FERDataset.problems`, which `fer-sim inspect` prints.
"""

from __future__ import annotations

import csv
import hashlib
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from client.data.labels import EMOTIONS, NUM_CLASSES, RAFDB_TO_LABEL, label_of

KINDS: tuple[str, ...] = ("fer2013", "rafdb", "folder", "faces", "synthetic")
SPLIT_ORDER: tuple[str, ...] = ("train", "test", "private_test")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp"})

FER2013_SIDE = 48
SYNTHETIC_DEFAULT_TRAIN = 3500
# At most this many sources are listed per problem, so a report stays readable on a 100,000-image folder.
MAX_EXAMPLES = 10
# An image whose grey levels span at most this range is blank. Not zero: JPEG ringing leaves a flat grey FER2013
# image (Training_3542668) with a range of 3, while the least uniform real face in FER2013 spans 47 levels.
BLANK_RANGE = 8

_USAGE_TO_SPLIT = {"training": "train", "publictest": "test", "privatetest": "private_test"}
_CSV_COLUMNS = ("emotion", "pixels", "usage")
_RAFDB_LABEL_FILE = Path("EmoLabel") / "list_patition_label.txt"


class DatasetError(Exception):
    """A problem with the user's data; its message is one line naming the file (and row) at fault."""

    def __init__(self, message: str) -> None:
        # One line is the contract with the CLI: a stray newline from a path or an OS message would break it.
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset: faces, labels, and where each face came from.

    Attributes:
        images: (N, H, W) uint8 grayscale faces, all resized to the dataset's image size.
        labels: (N,) int64 labels in 0..6 (see `client.data.labels.EMOTIONS`).
        sources: per sample, the file relative to the dataset root, "file.csv:LINE" for a CSV row, or
            "synthetic:i" for a generated face; kept so any finding can be traced back to the user's file.
    """

    images: np.ndarray
    labels: np.ndarray
    sources: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.sources)
        if self.images.ndim != 3 or self.images.dtype != np.uint8 or self.images.shape[0] != n:
            raise ValueError(f"images must be ({n}, H, W) uint8, got {self.images.shape} {self.images.dtype}")
        if self.labels.shape != (n,) or self.labels.dtype != np.int64:
            raise ValueError(f"labels must be ({n},) int64, got {self.labels.shape} {self.labels.dtype}")

    def __len__(self) -> int:
        return len(self.sources)


@dataclass
class FERDataset:
    """A loaded dataset in the shared label space.

    Attributes:
        kind: "fer2013", "rafdb", "folder", "faces" or "synthetic".
        format: the on-disk format found, e.g. "fer2013-csv", "fer2013-folder", "rafdb-aligned", "rafdb-original",
            "folder", "faces", "synthetic".
        root: the path the user gave (None for synthetic data).
        splits: "train" and, when the data has them, "test" and "private_test". A folder without a train/test
            split has only "train"; the federated code splits it.
        problems: what loading skipped or found (unreadable and non-image files, unknown class folders, missing
            files, photos without a face, blank images, duplicates within and across splits); JSON-able, with at
            most `MAX_EXAMPLES` sources per problem and never pixel data.
        native_sizes: how many images had each native size "WxH", before cropping and resizing.
    """

    kind: str
    format: str
    root: str | None
    splits: dict[str, Split]
    problems: dict
    native_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def synthetic(self) -> bool:
        """True for generated data, which every output made from it must say."""
        return self.kind == "synthetic"


def parse_dataset_spec(spec: str) -> tuple[str, str | None]:
    """Splits "KIND=PATH" (or "synthetic", "synthetic=N") into the kind and its argument.

    Raises:
        DatasetError: unknown kind, or a kind that needs a path given none.
    """
    kind, sep, arg = spec.strip().partition("=")
    kind = kind.strip().lower()
    arg = arg.strip()
    if kind not in KINDS:
        raise DatasetError(f"unknown dataset kind '{kind}' in '{spec}'; known kinds: {', '.join(KINDS)} "
                           f"(written KIND=PATH, or 'synthetic')")
    if kind == "synthetic":
        return kind, arg or None
    if not arg:
        raise DatasetError(f"dataset kind '{kind}' needs a path: {kind}=PATH")
    return kind, os.path.expanduser(arg)


def load_dataset(spec: str, *, image_size: int = 48, seed: int = 0) -> FERDataset:
    """Loads the dataset named by `spec` into memory, every face resized to `image_size` x `image_size`.

    Args:
        spec: "fer2013=PATH" (a CSV file, a folder holding one, or train/ test/ image folders), "rafdb=PATH",
            "folder=PATH" (uncropped photos: faces are detected and aligned), "faces=PATH" (already-cropped faces),
            "synthetic" or "synthetic=N" (N training faces, default 3500, plus N//5 test faces).
        image_size: side of the square faces returned.
        seed: seed of the synthetic generator; file-based datasets are deterministic without one.

    Raises:
        DatasetError: the data cannot be used; the message names the file (and row).
    """
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    kind, arg = parse_dataset_spec(spec)
    if kind == "synthetic":
        return _load_synthetic(arg, image_size=image_size, seed=seed)
    assert arg is not None
    root = Path(arg)
    if not root.exists():
        raise DatasetError(f"{arg}: no such file or folder (expected {_EXPECTED[kind]})")
    if kind == "fer2013":
        csv_file = _fer2013_csv_in(root)
        if csv_file is not None:
            return _load_fer2013_csv(csv_file, root_arg=arg, image_size=image_size)
        return _load_labelled_tree(kind, arg, image_size=image_size, detect_faces=False)
    if kind == "rafdb":
        return _load_rafdb(arg, image_size=image_size)
    return _load_labelled_tree(kind, arg, image_size=image_size, detect_faces=kind == "folder")


_EXPECTED = {
    "fer2013": "a FER2013 CSV file (emotion,pixels,Usage) or a folder with train/<emotion>/*.jpg",
    "rafdb": "a RAF-DB basic folder with EmoLabel/list_patition_label.txt and Image/aligned or Image/original",
    "folder": "a folder of <emotion>/ or train/<emotion>/ and test/<emotion>/ subfolders of photos",
    "faces": "a folder of <emotion>/ or train/<emotion>/ and test/<emotion>/ subfolders of face crops",
}


# ---------------------------------------------------------------------------------------------------------------
# Problems: counted while loading, then the content audit (blank images, duplicates) over the loaded splits.


class _Tally:
    """Counts one kind of problem and keeps the first few sources as examples."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def add(self, source: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(source)

    def as_dict(self) -> dict:
        return {"count": self.count, "examples": list(self.examples)}


@dataclass
class _LoadProblems:
    """What a loader skipped; the content audit adds the rest."""

    unreadable: _Tally = field(default_factory=_Tally)
    non_image: _Tally = field(default_factory=_Tally)
    missing: _Tally = field(default_factory=_Tally)
    no_face: _Tally = field(default_factory=_Tally)
    # Skipped folder (relative path) -> number of files in it.
    unknown_folders: dict[str, int] = field(default_factory=dict)


@dataclass
class _SplitContent:
    """A loaded split plus what the audit needs about each sample's native (pre-resize) pixels."""

    images: np.ndarray
    labels: np.ndarray
    sources: list[str]
    digests: list[bytes]
    blank: list[str | None]  # None, "all_black" or "flat"


def _digest(image: np.ndarray) -> bytes:
    hasher = hashlib.blake2b(np.ascontiguousarray(image), digest_size=16)
    hasher.update(np.asarray(image.shape, dtype=np.int64).tobytes())
    return hasher.digest()


def _blank_kind(image: np.ndarray) -> str | None:
    low, high, _, _ = cv2.minMaxLoc(image)
    if high - low > BLANK_RANGE:
        return None
    return "all_black" if high <= BLANK_RANGE else "flat"


def _capped_groups(groups: Iterable[list[str]], *, per_group: int = 2) -> list[list[str]]:
    """Lists example groups, `per_group` sources each, at most MAX_EXAMPLES sources in all."""
    out: list[list[str]] = []
    for group in groups:
        if (len(out) + 1) * per_group > MAX_EXAMPLES:
            break
        out.append(group[:per_group])
    return out


def _one_per_label(group: list[int], content: _SplitContent) -> list[str]:
    """The first source of each label in a duplicate group, so an example shows the conflict itself."""
    firsts: dict[int, str] = {}
    for i in group:
        firsts.setdefault(int(content.labels[i]), content.sources[i])
    return list(firsts.values())


def _audit(contents: dict[str, _SplitContent]) -> dict:
    """Finds blank images, duplicates within each split and images shared between splits."""
    blank_by_split: dict[str, int] = {}
    blank_kinds: Counter[str] = Counter()
    blank_examples = _Tally()
    by_digest: dict[str, dict[bytes, list[int]]] = {}
    duplicates_by_split: dict[str, dict] = {}
    for name, content in contents.items():
        blank_by_split[name] = 0
        for source, kind in zip(content.sources, content.blank):
            if kind is not None:
                blank_by_split[name] += 1
                blank_kinds[kind] += 1
                blank_examples.add(source)
        groups: dict[bytes, list[int]] = {}
        for index, digest in enumerate(content.digests):
            groups.setdefault(digest, []).append(index)
        by_digest[name] = groups
        repeated = sorted((g for g in groups.values() if len(g) > 1), key=lambda g: content.sources[g[0]])
        conflicting = [g for g in repeated if len({int(content.labels[i]) for i in g}) > 1]
        duplicates_by_split[name] = {
            "groups": len(repeated),
            "extra_copies": sum(len(g) - 1 for g in repeated),
            "conflicting_groups": len(conflicting),
            "examples": _capped_groups([content.sources[i] for i in g] for g in repeated),
            "conflicting_examples": _capped_groups(_one_per_label(g, content) for g in conflicting),
        }

    shared_by_pair: dict[str, dict] = {}
    names = list(contents)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            common = sorted(by_digest[first].keys() & by_digest[second].keys(),
                            key=lambda d: contents[first].sources[by_digest[first][d][0]])
            shared_by_pair[f"{first}/{second}"] = {
                "groups": len(common),
                "images": {first: sum(len(by_digest[first][d]) for d in common),
                           second: sum(len(by_digest[second][d]) for d in common)},
                "examples": _capped_groups([contents[first].sources[by_digest[first][d][0]],
                                            contents[second].sources[by_digest[second][d][0]]] for d in common),
            }

    return {
        "blank": {"count": sum(blank_by_split.values()), "all_black": blank_kinds["all_black"],
                  "flat": blank_kinds["flat"], "by_split": blank_by_split, "examples": blank_examples.examples},
        "duplicates": {
            "groups": sum(d["groups"] for d in duplicates_by_split.values()),
            "extra_copies": sum(d["extra_copies"] for d in duplicates_by_split.values()),
            "conflicting_groups": sum(d["conflicting_groups"] for d in duplicates_by_split.values()),
            "by_split": duplicates_by_split,
        },
        "shared_across_splits": {
            "groups": sum(p["groups"] for p in shared_by_pair.values()),
            "by_pair": shared_by_pair,
        },
    }


def _finish(kind: str, fmt: str, root: str | None, contents: dict[str, _SplitContent], loaded: _LoadProblems,
            native_sizes: Counter[str]) -> FERDataset:
    """Drops empty optional splits, audits the content and assembles the dataset."""
    where = root or "synthetic data"
    if not contents.get("train") or len(contents["train"].sources) == 0:
        if any(len(c.sources) for c in contents.values()):
            raise DatasetError(f"{where}: no readable training images (train split is empty)")
        raise DatasetError(f"{where}: no readable images found ({loaded.unreadable.count} unreadable, "
                           f"{loaded.no_face.count} without a face, {loaded.missing.count} missing)")
    contents = {name: contents[name] for name in SPLIT_ORDER if name in contents and contents[name].sources}
    problems = {
        "unreadable": loaded.unreadable.as_dict(),
        "non_image": loaded.non_image.as_dict(),
        "unknown_folders": {"count": sum(loaded.unknown_folders.values()),
                            "folders": dict(sorted(loaded.unknown_folders.items())[:MAX_EXAMPLES])},
        "missing": loaded.missing.as_dict(),
        "no_face": loaded.no_face.as_dict(),
        **_audit(contents),
    }
    splits = {name: Split(images=c.images, labels=c.labels, sources=tuple(c.sources)) for name, c in contents.items()}
    return FERDataset(kind=kind, format=fmt, root=root, splits=splits, problems=problems,
                      native_sizes=dict(native_sizes.most_common()))


# ---------------------------------------------------------------------------------------------------------------
# Image files: listing, then decoding in threads (cv2 releases the GIL while decoding).


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


def _scan_emotion_folders(root: Path, folder: str, split_of: Callable[[str], str], loaded: _LoadProblems,
                          items: list[_Item]) -> int:
    """Lists `root/folder/<emotion>/**` images into `items`; returns how many emotion folders were found."""
    found = 0
    for entry in _subdirs(root / folder):
        relfolder = f"{folder}/{entry.name}" if folder else entry.name
        files = _files_under(root, relfolder)
        label = label_of(entry.name)
        if label is None:
            loaded.unknown_folders[relfolder] = len(files)
            continue
        found += 1
        for relpath in files:
            filename = relpath.rsplit("/", 1)[-1]
            if os.path.splitext(filename)[1].lower() not in IMAGE_EXTENSIONS:
                loaded.non_image.add(relpath)
                continue
            items.append(_Item(split=split_of(filename), label=label, relpath=relpath))
    return found


def _fer2013_csv_in(root: Path) -> Path | None:
    """The CSV to read for `fer2013=PATH`: PATH itself, or the only CSV in a folder without image folders."""
    if root.is_file():
        return root
    if any(e.name.lower() == "train" for e in _subdirs(root)):
        return None
    csvs = sorted(p for p in root.glob("*.csv") if p.is_file())
    return csvs[0] if len(csvs) == 1 else None


def _fer2013_test_split(filename: str) -> str:
    return "private_test" if filename.startswith("PrivateTest_") else "test"


def _load_labelled_tree(kind: str, root_arg: str, *, image_size: int, detect_faces: bool) -> FERDataset:
    """Loads `<root>/<emotion>/...` or `<root>/{train,test}/<emotion>/...` image folders."""
    root = Path(root_arg)
    if not root.is_dir():
        raise DatasetError(f"{root_arg}: is a file, expected {_EXPECTED[kind]}")
    loaded = _LoadProblems()
    items: list[_Item] = []
    top = _subdirs(root)
    split_dirs = {e.name.lower(): e for e in top if e.name.lower() in ("train", "test")}
    if split_dirs or kind == "fer2013":
        if "train" not in split_dirs:
            raise DatasetError(f"{root_arg}: no train/ folder (expected {_EXPECTED[kind]})")
        for entry in top:
            if entry.name.lower() not in split_dirs:
                loaded.unknown_folders[entry.name] = len(_files_under(root, entry.name))
        for name, entry in sorted(split_dirs.items(), key=lambda kv: SPLIT_ORDER.index(kv[0])):
            if name == "test" and kind == "fer2013":
                split_of = _fer2013_test_split
            else:
                split_of = lambda _filename, name=name: name  # noqa: E731
            if _scan_emotion_folders(root, entry.name, split_of, loaded, items) == 0:
                raise DatasetError(f"{entry.path}: no emotion folders ({', '.join(EMOTIONS)}) inside")
        fmt = "fer2013-folder" if kind == "fer2013" else kind
    else:
        if _scan_emotion_folders(root, "", lambda _filename: "train", loaded, items) == 0:
            raise DatasetError(f"{root_arg}: no emotion folders ({', '.join(EMOTIONS)}) and no train/ test/ "
                               f"folders inside (expected {_EXPECTED[kind]})")
        fmt = kind
    if not items:
        raise DatasetError(f"{root_arg}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in its emotion "
                           f"folders")
    items.sort(key=lambda it: (SPLIT_ORDER.index(it.split), it.relpath))
    native_sizes: Counter[str] = Counter()
    contents = _decode_items(root, items, image_size=image_size, detect_faces=detect_faces, loaded=loaded,
                             native_sizes=native_sizes)
    return _finish(kind, fmt, root_arg, contents, loaded, native_sizes)


# ---------------------------------------------------------------------------------------------------------------
# FER2013 CSV: emotion,pixels,Usage with 48*48 space-separated grey levels per row.


def _read_csv_header(name: str, reader) -> tuple[int, int, int | None]:
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError(f"{name}: empty file, expected a header emotion,pixels,Usage") from None
    columns = [c.strip().lower() for c in header]
    unexpected = [header[i] for i, c in enumerate(columns) if c not in _CSV_COLUMNS]
    if unexpected or "emotion" not in columns or "pixels" not in columns or len(set(columns)) != len(columns):
        raise DatasetError(f"{name}:1: header is '{','.join(header)}', expected emotion,pixels,Usage")
    usage = columns.index("usage") if "usage" in columns else None
    return columns.index("emotion"), columns.index("pixels"), usage


def _parse_csv_row(row: list[str], *, name: str, line: int, columns: tuple[int, int, int | None],
                   n_columns: int) -> tuple[str, int, np.ndarray]:
    if len(row) != n_columns:
        raise DatasetError(f"{name}:{line}: {len(row)} fields, expected {n_columns} (emotion,pixels,Usage)")
    emotion_at, pixels_at, usage_at = columns
    text = row[emotion_at].strip()
    try:
        label = int(text)
    except ValueError:
        raise DatasetError(f"{name}:{line}: emotion '{text[:20]}' is not an integer 0..{NUM_CLASSES - 1}") from None
    if not 0 <= label < NUM_CLASSES:
        raise DatasetError(f"{name}:{line}: emotion {label} is out of range 0..{NUM_CLASSES - 1}")
    try:
        pixels = np.fromstring(row[pixels_at], dtype=np.int64, sep=" ")
    except ValueError:
        bad = next((t for t in row[pixels_at].split() if not t.lstrip("+").isdigit()), "?")
        raise DatasetError(f"{name}:{line}: pixel '{bad[:20]}' is not an integer 0..255") from None
    if pixels.size != FER2013_SIDE * FER2013_SIDE:
        raise DatasetError(f"{name}:{line}: pixel row has {pixels.size} values, expected "
                           f"{FER2013_SIDE * FER2013_SIDE} ({FER2013_SIDE}x{FER2013_SIDE})")
    if pixels.min() < 0 or pixels.max() > 255:
        bad_value = int(pixels[(pixels < 0) | (pixels > 255)][0])
        raise DatasetError(f"{name}:{line}: pixel value {bad_value} is outside 0..255")
    split = "train"
    if usage_at is not None:
        usage = row[usage_at].strip()
        split = _USAGE_TO_SPLIT.get(usage.lower(), "")
        if not split:
            raise DatasetError(f"{name}:{line}: Usage '{usage[:20]}' is not Training, PublicTest or PrivateTest")
    return split, label, pixels.astype(np.uint8).reshape(FER2013_SIDE, FER2013_SIDE)


def _load_fer2013_csv(path: Path, *, root_arg: str, image_size: int) -> FERDataset:
    """Loads the original fer2013.csv (Usage optional: without it every row is training data)."""
    name = str(path)
    rows: dict[str, tuple[list[int], list[str], list[np.ndarray]]] = {s: ([], [], []) for s in SPLIT_ORDER}
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            columns = _read_csv_header(name, reader)
            n_columns = 3 if columns[2] is not None else 2
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                split, label, pixels = _parse_csv_row(row, name=name, line=reader.line_num, columns=columns,
                                                      n_columns=n_columns)
                labels, sources, images = rows[split]
                labels.append(label)
                sources.append(f"{path.name}:{reader.line_num}")
                images.append(pixels)
    except UnicodeDecodeError:
        raise DatasetError(f"{name}: not a text CSV file (expected emotion,pixels,Usage)") from None
    except csv.Error as err:
        raise DatasetError(f"{name}:{reader.line_num}: malformed CSV ({err})") from None
    except OSError as err:
        raise DatasetError(f"{name}: cannot read ({err.strerror})") from None

    contents: dict[str, _SplitContent] = {}
    for split, (labels, sources, images) in rows.items():
        if not labels:
            continue
        native = np.stack(images)
        fitted = native if image_size == FER2013_SIDE else np.stack([_fit(im, image_size) for im in native])
        contents[split] = _SplitContent(images=fitted, labels=np.array(labels, dtype=np.int64), sources=sources,
                                        digests=[_digest(im) for im in native],
                                        blank=[_blank_kind(im) for im in native])
    if not contents:
        raise DatasetError(f"{name}: no data rows after the header")
    sizes = Counter({f"{FER2013_SIDE}x{FER2013_SIDE}": sum(len(c.sources) for c in contents.values())})
    return _finish("fer2013", "fer2013-csv", root_arg, contents, _LoadProblems(), sizes)


# ---------------------------------------------------------------------------------------------------------------
# RAF-DB basic: EmoLabel/list_patition_label.txt + Image/aligned (cropped, aligned) or Image/original (photos).


def _load_rafdb(root_arg: str, *, image_size: int) -> FERDataset:
    root = Path(root_arg)
    if not (root / _RAFDB_LABEL_FILE).is_file() and (root / "basic" / _RAFDB_LABEL_FILE).is_file():
        root = root / "basic"  # the archive unpacks to basic/; accept its parent too
    label_file = root / _RAFDB_LABEL_FILE
    if not label_file.is_file():
        raise DatasetError(f"{label_file}: not found (expected {_EXPECTED['rafdb']})")
    aligned, original = root / "Image" / "aligned", root / "Image" / "original"
    if aligned.is_dir():
        fmt, image_dir = "rafdb-aligned", aligned
    elif original.is_dir():
        fmt, image_dir = "rafdb-original", original
    else:
        raise DatasetError(f"{root / 'Image'}: no aligned/ or original/ image folder (expected {_EXPECTED['rafdb']})")

    loaded = _LoadProblems()
    items: list[_Item] = []
    try:
        lines = label_file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{label_file}: cannot read as text ({err})") from None
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label_file}:{number}"
        if len(fields) != 2:
            raise DatasetError(f"{where}: expected 'IMAGE LABEL' (e.g. 'train_00001.jpg 5'), got '{line[:40]}'")
        filename, raf_label = fields
        split = "train" if filename.startswith("train_") else "test" if filename.startswith("test_") else ""
        if not split:
            raise DatasetError(f"{where}: image name '{filename[:40]}' does not start with train_ or test_")
        if not raf_label.isdigit() or int(raf_label) not in RAFDB_TO_LABEL:
            raise DatasetError(f"{where}: label '{raf_label[:20]}' is out of range 1..7")
        stem, suffix = os.path.splitext(filename)
        image_name = f"{stem}_aligned{suffix}" if fmt == "rafdb-aligned" else filename
        relpath = f"Image/{image_dir.name}/{image_name}"
        if not os.path.isfile(os.path.join(root, relpath)):
            loaded.missing.add(relpath)
            continue
        items.append(_Item(split=split, label=RAFDB_TO_LABEL[int(raf_label)], relpath=relpath))
    if not items and loaded.missing.count == 0:
        raise DatasetError(f"{label_file}: no labelled images listed")
    items.sort(key=lambda it: (SPLIT_ORDER.index(it.split), it.relpath))
    native_sizes: Counter[str] = Counter()
    contents = _decode_items(root, items, image_size=image_size, detect_faces=fmt == "rafdb-original",
                             loaded=loaded, native_sizes=native_sizes)
    return _finish("rafdb", fmt, root_arg, contents, loaded, native_sizes)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic: generated in memory, no files.


def _load_synthetic(arg: str | None, *, image_size: int, seed: int) -> FERDataset:
    if arg is None:
        n_train = SYNTHETIC_DEFAULT_TRAIN
    else:
        if not arg.isdigit() or int(arg) < 5:
            raise DatasetError(f"synthetic={arg}: N must be an integer >= 5 (N training faces, N//5 test faces)")
        n_train = int(arg)
    from client.data.synthetic import make_synthetic

    # The test faces come from their own seed stream, so they are never copies of training faces.
    test_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
    contents: dict[str, _SplitContent] = {}
    for split, n, split_seed in (("train", n_train, seed), ("test", n_train // 5, test_seed)):
        images, labels = make_synthetic(n, seed=split_seed, image_size=image_size)
        images = np.ascontiguousarray(images, dtype=np.uint8)
        contents[split] = _SplitContent(images=images, labels=np.asarray(labels, dtype=np.int64),
                                        sources=[f"synthetic:{i}" for i in range(n)],
                                        digests=[_digest(im) for im in images],
                                        blank=[_blank_kind(im) for im in images])
    sizes = Counter({f"{image_size}x{image_size}": n_train + n_train // 5})
    return _finish("synthetic", "synthetic", None, contents, _LoadProblems(), sizes)
