"""FER2013 as the original CSV: emotion,pixels,Usage with 48*48 space-separated grey levels per row.

Also how `fer2013=PATH` is told apart from FER2013's image folders (`_fer2013_csv_in`; the folders load through
`folders.py`) and which test split a FER2013 image file belongs to.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np

from client.data.formats.audit import _blank_kind, _digest, _finish, _LoadProblems, _SplitContent
from client.data.formats.dataset import SPLIT_ORDER, DatasetError, FERDataset
from client.data.formats.images import _fit, _subdirs
from client.data.labels import NUM_CLASSES

FER2013_SIDE = 48
_USAGE_TO_SPLIT = {"training": "train", "publictest": "test", "privatetest": "private_test"}
_CSV_COLUMNS = ("emotion", "pixels", "usage")


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
