"""Loads the facial-expression datasets people actually have into one in-memory form.

Researchers bring FER2013 (as the original CSV or as the image folders most copies circulate as) and RAF-DB;
hospitals bring folders of photographs sorted by emotion; a newcomer brings nothing and gets a synthetic set. All
of them end up as a `FERDataset`: per split, `(N, S, S)` uint8 grayscale faces, int64 labels in the shared label
space of `client.data.labels`, and one source string per sample so that every problem can be traced to a file.

A user's data problem is raised as `DatasetError`, whose message is one line naming the file (and row or line), so
that the CLI can print it without a traceback. Problems that are normal in large real datasets (a few unreadable
files, blank images, duplicates, photos without a detectable face) are not fatal: they are skipped or kept as the
case may be, counted, and reported in `FERDataset.problems`, which `fer-sim inspect` prints.

One module per format (`fer2013`, `rafdb`, `folders`, `synthetic`), the image files they share (`images`), the
problem counting and content audit (`audit`), and the dataset type (`dataset`); this module reads the spec and hands
it to its format's loader. Callers import from here.
"""

from __future__ import annotations

import os
from pathlib import Path

from client.data.formats.audit import BLANK_RANGE, MAX_EXAMPLES
from client.data.formats.dataset import _EXPECTED, KINDS, SPLIT_ORDER, DatasetError, FERDataset, Split
from client.data.formats.fer2013 import FER2013_SIDE, _fer2013_csv_in, _load_fer2013_csv
from client.data.formats.folders import _load_labelled_tree
from client.data.formats.images import IMAGE_EXTENSIONS
from client.data.formats.rafdb import _load_rafdb
from client.data.formats.synthetic import SYNTHETIC_DEFAULT_TRAIN, _load_synthetic

__all__ = [
    "BLANK_RANGE",
    "FER2013_SIDE",
    "IMAGE_EXTENSIONS",
    "KINDS",
    "MAX_EXAMPLES",
    "SPLIT_ORDER",
    "SYNTHETIC_DEFAULT_TRAIN",
    "DatasetError",
    "FERDataset",
    "Split",
    "load_dataset",
    "parse_dataset_spec",
]


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


def load_dataset(spec: str, *, image_size: int = 48, seed: int = 0, test_only: bool = False) -> FERDataset:
    """Loads the dataset named by `spec` into memory, every face resized to `image_size` x `image_size`.

    Args:
        spec: "fer2013=PATH" (a CSV file, a folder holding one, or train/ test/ image folders), "rafdb=PATH",
            "folder=PATH" (uncropped photos: faces are detected and aligned), "faces=PATH" (already-cropped faces),
            "synthetic" or "synthetic=N" (N training faces, default 3500, plus N//5 test faces).
        image_size: side of the square faces returned.
        seed: seed of the synthetic generator; file-based datasets are deterministic without one.
        test_only: the data is for scoring a model (`fer-sim evaluate`): image folders may hold `test/` alone,
            and bare `<emotion>/` folders are read as the test split.

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
        return _load_labelled_tree(kind, arg, image_size=image_size, detect_faces=False, test_only=test_only)
    if kind == "rafdb":
        return _load_rafdb(arg, image_size=image_size)
    return _load_labelled_tree(kind, arg, image_size=image_size, detect_faces=kind == "folder", test_only=test_only)
