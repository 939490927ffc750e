"""Folders of images sorted by emotion: `folder=` (photos: faces are detected and aligned), `faces=` (face crops)
and FER2013's image folders (`fer2013=` without a CSV).

Layouts: `<root>/<emotion>/...` or `<root>/{train,test}/<emotion>/...`; files may sit in subfolders below an
emotion folder (a hospital may sort an emotion's photos by patient).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from client.data.formats.audit import _finish, _LoadProblems
from client.data.formats.dataset import _EXPECTED, SPLIT_ORDER, DatasetError, FERDataset
from client.data.formats.fer2013 import _fer2013_test_split
from client.data.formats.images import IMAGE_EXTENSIONS, _decode_items, _files_under, _Item, _subdirs
from client.data.labels import EMOTIONS, label_of


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


def _load_labelled_tree(kind: str, root_arg: str, *, image_size: int, detect_faces: bool,
                        test_only: bool = False) -> FERDataset:
    """Loads `<root>/<emotion>/...` or `<root>/{train,test}/<emotion>/...` image folders.

    With `test_only` (scoring a model on held-out faces), a tree may hold `test/` without `train/`, and bare
    `<emotion>/` folders are the test split rather than the training split.
    """
    root = Path(root_arg)
    if not root.is_dir():
        raise DatasetError(f"{root_arg}: is a file, expected {_EXPECTED[kind]}")
    loaded = _LoadProblems()
    items: list[_Item] = []
    top = _subdirs(root)
    split_dirs = {e.name.lower(): e for e in top if e.name.lower() in ("train", "test")}
    if split_dirs or kind == "fer2013":
        if "train" not in split_dirs and not (test_only and "test" in split_dirs):
            raise DatasetError(f"{root_arg}: no train/ folder (expected {_EXPECTED[kind]})")
        for entry in top:
            if entry.name.lower() not in ("train", "test"):
                loaded.unknown_folders[entry.name] = len(_files_under(root, entry.name))
        if test_only and "test" in split_dirs:
            split_dirs.pop("train", None)  # scoring a model reads only what it is scored on
        for name, entry in sorted(split_dirs.items(), key=lambda kv: SPLIT_ORDER.index(kv[0])):
            if name == "test" and kind == "fer2013":
                split_of = _fer2013_test_split
            else:
                split_of = lambda _filename, name=name: name  # noqa: E731
            if _scan_emotion_folders(root, entry.name, split_of, loaded, items) == 0:
                raise DatasetError(f"{entry.path}: no emotion folders ({', '.join(EMOTIONS)}) inside")
        fmt = "fer2013-folder" if kind == "fer2013" else kind
    else:
        bare_split = "test" if test_only else "train"
        if _scan_emotion_folders(root, "", lambda _filename: bare_split, loaded, items) == 0:
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
    required = "test" if test_only else "train"
    return _finish(kind, fmt, root_arg, contents, loaded, native_sizes, required=required)
